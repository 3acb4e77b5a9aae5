"""The interpreter's CSV tree on disk, rewritten into the form every MOQUI build reads right."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mqi_async.domain.errors import PermanentError
from mqi_async.domain.fluence import FluenceFormatError, normalise_layer, yields_no_histories
from mqi_async.domain.tps import TpsValue, moqui_bool, moqui_float, tps_lookup


@dataclass(frozen=True, slots=True, kw_only=True)
class FluenceReport:
    files: int
    rewritten: int
    spots: int


def prepare_fluence_tree(log_dir: Path, moqui: Mapping[str, TpsValue]) -> FluenceReport:
    """Rewrite every `<field>/*.csv` under log_dir into the single-line form, in place.

    Each changed file is replaced atomically. Raises PermanentError `csv_format_unsupported`
    for a CSV that is not rows of four numbers, and `zero_histories` for a field whose every
    spot truncates to 0 histories with the configured ParticlesPerHistory (skipped when the
    clinic build's NormalizeTotalHistories is on). A missing log_dir is left to the caller.
    """
    pph_text = tps_lookup(moqui, "ParticlesPerHistory")
    pph = moqui_float(pph_text) if pph_text is not None else -1.0
    normalised = moqui_bool(tps_lookup(moqui, "NormalizeTotalHistories") or "0")
    files = rewritten = spots = 0
    if not log_dir.is_dir():
        return FluenceReport(files=0, rewritten=0, spots=0)
    for field in sorted(p for p in log_dir.iterdir() if p.is_dir()):
        field_max = 0
        field_spots = 0
        for csv in sorted(field.glob("*.csv")):
            try:
                layer = normalise_layer(csv.read_bytes())
            except FluenceFormatError as exc:
                raise PermanentError(
                    "csv_format_unsupported", f"{field.name}/{csv.name}: {exc}"
                ) from exc
            files += 1
            field_spots += layer.spots
            field_max = max(field_max, layer.max_count)
            if layer.changed:
                tmp = csv.with_name(csv.name + ".tmp")
                tmp.write_bytes(layer.text)
                os.replace(tmp, csv)
                rewritten += 1
        spots += field_spots
        if field_spots and not normalised and yields_no_histories(field_max, pph):
            raise PermanentError(
                "zero_histories",
                f"field {field.name}: its largest log count {field_max} × ParticlesPerHistory "
                f"{pph_text} truncates to 0, so every one of its {field_spots} spots gets 0 "
                "histories; raise moqui.ParticlesPerHistory",
            )
    return FluenceReport(files=files, rewritten=rewritten, spots=spots)
