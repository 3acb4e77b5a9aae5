"""Gamma between two RT Dose files, with the named failures of CONTRACT.md "Dose checks"."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from mqi_async.domain.errors import PermanentError
from mqi_async.qa.gamma import GammaOptions, GammaResult, gamma
from mqi_async.qa.rtdose import DoseGrid, read_rt_dose, read_summed


def _fmt(bounds: tuple[tuple[float, float], ...]) -> str:
    return ", ".join(
        f"{name} [{lo:.1f}, {hi:.1f}]" for name, (lo, hi) in zip("zyx", bounds, strict=True)
    )


def compare_doses(
    reference: DoseGrid,
    evaluated: DoseGrid,
    options: GammaOptions,
    *,
    threads: int | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GammaResult:
    """Gamma of `evaluated` against `reference`. Raises PermanentError
    `frame_of_reference_mismatch`, `grids_do_not_overlap` or `reference_dose_zero`."""
    ref_for, ev_for = reference.frame_of_reference_uid, evaluated.frame_of_reference_uid
    if ref_for and ev_for and ref_for != ev_for:
        raise PermanentError(
            "frame_of_reference_mismatch",
            f"the reference is in frame of reference {ref_for}, the evaluated dose in "
            f"{ev_for}; they cannot be compared point by point",
        )
    reach = options.distance_mm * options.max_gamma
    rb, eb = reference.bounds(), evaluated.bounds()
    for (r_lo, r_hi), (e_lo, e_hi) in zip(rb, eb, strict=True):
        if r_lo > e_hi + reach or e_lo > r_hi + reach:
            raise PermanentError(
                "grids_do_not_overlap",
                f"the grids do not overlap: reference {_fmt(rb)}, evaluated {_fmt(eb)} (mm)",
            )
    result = gamma(
        reference.axes,
        reference.dose,
        evaluated.axes,
        evaluated.dose,
        options,
        threads=threads,
        should_stop=should_stop,
    )
    if result.stats.get("points", 0) == 0:
        raise PermanentError(
            "reference_dose_zero",
            f"no reference point is at or above {options.cutoff_percent:g} % of the "
            f"normalisation ({result.normalisation:g} Gy)",
        )
    if result.evaluated_points == 0:
        raise PermanentError(
            "grids_do_not_overlap",
            "no reference point above the cutoff lies inside the evaluated grid: reference "
            f"{_fmt(rb)}, evaluated {_fmt(eb)} (mm)",
        )
    return result


DosePaths = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


def _read(paths: DosePaths) -> DoseGrid:
    if isinstance(paths, (str, os.PathLike)):
        return read_rt_dose(paths)
    return read_summed(list(paths))


def compare_files(
    reference: DosePaths,
    evaluated: DosePaths,
    options: GammaOptions,
    *,
    threads: int | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GammaResult:
    """Read both RT Dose files (`dose_unreadable`, `unsupported_orientation`) and compare;
    a list of files on each side is their sum (a plan's beams; `dose_grids_differ`).
    `seconds` of the result counts the reading too."""
    started = time.perf_counter()
    ref = _read(reference)
    ev = _read(evaluated)
    result = compare_doses(ref, ev, options, threads=threads, should_stop=should_stop)
    return replace(result, seconds=time.perf_counter() - started)
