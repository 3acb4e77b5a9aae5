"""Fluence CSVs of the plan itself, in the log CSVs' form, for the planned MOQUI run.

The clinic's MOQUI build always reads its beam source from fluence CSVs (`logFilePath`); for
the run on the plan it gets one row per planned spot: `time_ms,x_mm,y_mm,count` with
count = the spot's MU / MU per count, rounded, so that a faithful delivery's log CSVs (dose
monitor counts x range factor) and the plan's carry the same counts at the same places. Files
are `<field folder>/<NN>_<E>MeV.csv`, the folder named as the interpreter names it, in the
single-line form every build reads right.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mqi_async.domain.naming import field_folder, layer_csv_name
from mqi_async.qa.plan_layers import PlannedLayer, read_planned_layers


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanFieldFiles:
    beam_number: int
    folder: Path
    layers: int
    spots: int


def f32_text(value: float) -> str:
    """A number as the interpreter writes it (numpy float32 `str()`), without numpy."""
    return repr(float(f"{value:.7g}") + 0.0)


def layer_csv(layer: PlannedLayer, *, mu_per_count: float, time_gain_ms: float) -> bytes:
    """One layer's rows on one line: `t,x,y,count,t,x,y,count,…` (spots in plan order)."""
    values: list[str] = []
    for index, (x, y, mu) in enumerate(
        zip(layer.x_mm.tolist(), layer.y_mm.tolist(), layer.mu.tolist(), strict=True)
    ):
        values += [
            f32_text(index * time_gain_ms),
            f32_text(x),
            f32_text(y),
            str(round(mu / mu_per_count)),
        ]
    return ",".join(values).encode()


def write_plan_fluence(
    plan_path: str | os.PathLike[str],
    out_dir: Path,
    beams: Sequence[tuple[int, str]],
    *,
    mu_per_count: float,
    time_gain_ms: float,
) -> list[PlanFieldFiles]:
    """Write `out_dir/<field>/<NN>_<E>MeV.csv` for each (BeamNumber, BeamName) given.

    Raises:
        PlanLayersError: the plan's spots of a beam cannot be read.
    """
    written: list[PlanFieldFiles] = []
    for number, name in beams:
        layers = read_planned_layers(plan_path, number)
        folder = out_dir / field_folder(name)
        folder.mkdir(parents=True, exist_ok=True)
        for k, layer in enumerate(layers, start=1):
            target = folder / layer_csv_name(k, layer.energy_mev)
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_bytes(layer_csv(layer, mu_per_count=mu_per_count, time_gain_ms=time_gain_ms))
            os.replace(tmp, target)
        written.append(
            PlanFieldFiles(
                beam_number=number,
                folder=folder,
                layers=len(layers),
                spots=sum(layer.mu.size for layer in layers),
            )
        )
    return written
