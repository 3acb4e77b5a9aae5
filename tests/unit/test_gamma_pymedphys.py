"""Agreement with PyMedPhys `gamma`, the field's reference implementation.

Generated smooth dose fields (soft-edged boxes with hot and cold spots), deterministic seeds,
small grids so each case takes seconds. Every case: the same criteria for both, pass rate
within 0.5 percentage points and evaluated points within 1 % (CONTRACT.md "Dose checks");
the gammas themselves are also compared, point by point.

The fields are anisotropic (different extents, voxel sizes and shifts per axis), so a mix-up
of axes in either direction changes the answer; `test_an_axis_mix_up_is_caught` shows that
these tolerances do catch one.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np
import pytest

from mqi_async.qa.gamma import GammaResult, gamma
from mqi_async.qa.synthetic import Axes, centred_axes, grid_axes, noise, standard_field

pymedphys = pytest.importorskip(
    "pymedphys",
    reason="PyMedPhys is not installed (a dev dependency: pip install -e '.[dev]'); "
    "the agreement tests need it",
)
pytestmark = pytest.mark.slow  # PyMedPhys takes seconds per case

# PyMedPhys's default interpolation is compiled with numba; without it use its scipy one
INTERP = "pymedphys" if importlib.util.find_spec("numba") else "scipy"


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    shift: tuple[float, ...]
    scale: float = 1.0
    noise: float = 0.0
    dose_percent: float = 2.0
    distance_mm: float = 2.0
    local: bool = False
    cutoff: float = 10.0
    max_gamma: float = 1.1
    #: evaluated grid (shape, spacing, origin); None: the reference grid
    eval_grid: tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...]] | None = None


SHAPE3 = (40, 50, 50)
SP3 = (2.5, 2.0, 1.5)
CASES = [
    Case("3d-shift-z", SHAPE3, SP3, (1.3, 0.0, 0.0), dose_percent=1, distance_mm=1),
    Case("3d-shift-y", SHAPE3, SP3, (0.0, 1.3, 0.0), dose_percent=1, distance_mm=1),
    Case("3d-shift-x", SHAPE3, SP3, (0.0, 0.0, 1.3), dose_percent=1, distance_mm=1),
    Case("3d-scale", SHAPE3, SP3, (0.0, 0.0, 0.0), scale=1.03, dose_percent=1, distance_mm=1),
    Case(
        "3d-noise",
        SHAPE3,
        SP3,
        (0.4, -0.3, 0.2),
        scale=1.01,
        noise=0.02,
        dose_percent=1,
        distance_mm=1,
    ),
    Case(
        "3d-noise-local",
        SHAPE3,
        SP3,
        (0.4, -0.3, 0.2),
        noise=0.01,
        local=True,
        dose_percent=1.5,
        distance_mm=1,
    ),
    Case(
        "3d-3%3mm-local",
        SHAPE3,
        SP3,
        (1.0, 1.0, -1.0),
        scale=0.96,
        noise=0.03,
        dose_percent=3,
        distance_mm=3,
        local=True,
        cutoff=20,
    ),
    Case(
        "3d-other-grid",
        SHAPE3,
        SP3,
        (0.5, -0.8, 0.3),
        noise=0.01,
        dose_percent=1,
        distance_mm=1,
        eval_grid=((33, 41, 61), (3.0, 2.5, 1.25), (-48.7, -50.3, -37.1)),
    ),
    Case(
        "3d-other-grid-local",
        SHAPE3,
        SP3,
        (0.5, -0.8, 0.3),
        scale=1.02,
        noise=0.005,
        local=True,
        dose_percent=2,
        distance_mm=1,
        eval_grid=((45, 52, 40), (2.2, 1.9, 1.9), (-49.1, -48.2, -37.3)),
    ),
    Case("2d-shift-rows", (120, 100), (1.0, 2.0), (1.2, 0.0), dose_percent=1, distance_mm=1),
    Case("2d-shift-cols", (120, 100), (1.0, 2.0), (0.0, 1.2), dose_percent=1, distance_mm=1),
    Case(
        "2d-noise-local",
        (120, 100),
        (1.0, 2.0),
        (0.3, -0.7),
        noise=0.02,
        local=True,
        dose_percent=2,
        distance_mm=1,
    ),
    Case(
        "2d-other-grid",
        (120, 100),
        (1.0, 2.0),
        (0.3, 0.5),
        scale=1.015,
        noise=0.01,
        dose_percent=1,
        distance_mm=1,
        eval_grid=((70, 160), (1.7, 1.25), (-59.0, -99.4)),
    ),
    Case("1d-shift", (300,), (0.5,), (0.8,), noise=0.01, dose_percent=1, distance_mm=1),
]


def make(
    case: Case, shift: tuple[float, ...] | None = None
) -> tuple[Axes, np.ndarray, Axes, np.ndarray]:
    ref_axes = centred_axes(case.shape, case.spacing)
    field = standard_field(
        len(case.shape), [n * s for n, s in zip(case.shape, case.spacing, strict=True)]
    )
    ref = field(ref_axes)
    ev_axes = ref_axes if case.eval_grid is None else grid_axes(*case.eval_grid)
    ev = field(ev_axes, shift if shift is not None else case.shift) * case.scale
    if case.noise:
        ev = ev + noise(ev.shape, case.noise, seed=17, scale=float(ref.max()))
    return ref_axes, ref, ev_axes, ev


def pymedphys_gamma(
    case: Case, ref_axes: Axes, ref: np.ndarray, ev_axes: Axes, ev: np.ndarray
) -> np.ndarray:
    return np.asarray(
        pymedphys.gamma(
            ref_axes,
            ref,
            ev_axes,
            ev,
            case.dose_percent,
            case.distance_mm,
            lower_percent_dose_cutoff=case.cutoff,
            interp_fraction=10,
            max_gamma=case.max_gamma,
            local_gamma=case.local,
            interp_algo=INTERP,
        )
    )


def ours(case: Case, ref_axes: Axes, ref: np.ndarray, ev_axes: Axes, ev: np.ndarray) -> GammaResult:
    return gamma(
        ref_axes,
        ref,
        ev_axes,
        ev,
        dose_percent=case.dose_percent,
        distance_mm=case.distance_mm,
        cutoff_percent=case.cutoff,
        max_gamma=case.max_gamma,
        local=case.local,
        interp_fraction=10,
    )


def pass_rate(g: np.ndarray) -> tuple[float, int]:
    valid = ~np.isnan(g)
    return 100.0 * float(np.mean(g[valid] <= 1)), int(valid.sum())


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_agrees_with_pymedphys(case: Case) -> None:
    ref_axes, ref, ev_axes, ev = make(case)
    theirs = pymedphys_gamma(case, ref_axes, ref, ev_axes, ev)
    mine = ours(case, ref_axes, ref, ev_axes, ev)
    their_rate, their_points = pass_rate(theirs)
    # a case that everyone passes would show nothing
    assert 20.0 < their_rate < 99.9, f"{case.name}: uninformative case, pass rate {their_rate}"
    assert abs(mine.pass_rate_percent - their_rate) <= 0.5, (mine.pass_rate_percent, their_rate)
    assert abs(mine.evaluated_points - their_points) <= 0.01 * their_points
    # stricter than the contract: the same points, the same gammas
    both = ~np.isnan(theirs) & ~np.isnan(mine.gamma)
    assert both.sum() >= 0.99 * their_points
    diff = np.abs(theirs[both] - mine.gamma[both])
    assert np.quantile(diff, 0.999) < 1e-3, f"gamma differs: max {diff.max():.4f}"
    assert abs(float(np.mean(theirs[both])) - mine.gamma_mean) < 1e-3


def test_an_axis_mix_up_is_caught() -> None:
    """Our gamma for a shift along z against PyMedPhys's for the same shift along x: the
    agreement tolerances reject it, so the tests above would catch such a bug."""
    case = CASES[0]
    ref_axes, ref, ev_axes, ev = make(case)
    mine = ours(case, ref_axes, ref, ev_axes, ev)
    _, _, _, ev_x = make(case, shift=(0.0, 0.0, 1.3))
    theirs_x = pymedphys_gamma(case, ref_axes, ref, ev_axes, ev_x)
    their_rate, _ = pass_rate(theirs_x)
    assert abs(mine.pass_rate_percent - their_rate) > 0.5
    # and transposed data (x and y read the wrong way round) disagree too
    case2 = CASES[9]
    r_axes, r, e_axes, e = make(case2)
    mine2 = ours(case2, r_axes, r, e_axes, e)
    swapped = pymedphys_gamma(case2, r_axes[::-1], r.T.copy(), e_axes[::-1], e.T.copy())
    assert abs(mine2.pass_rate_percent - pass_rate(swapped)[0]) <= 0.5  # transposing both is fine
    wrong = pymedphys_gamma(case2, r_axes, r, e_axes, make(case2, shift=(0.0, 1.2))[3])
    assert abs(mine2.pass_rate_percent - pass_rate(wrong)[0]) > 0.5
