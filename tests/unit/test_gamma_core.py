"""The gamma core on cases with known answers: shifts, scalings, cutoffs, edges, grids."""

from __future__ import annotations

import math

import numpy as np
import pytest

import mqi_async.qa.gamma as core
from mqi_async.qa.gamma import GammaCancelled, GammaInputError, GammaOptions, gamma
from mqi_async.qa.synthetic import centred_axes, grid_axes, standard_field

# anisotropic voxels on purpose
AXES3 = centred_axes((21, 23, 25), (1.0, 1.5, 2.0))


SLOPE = 30.0  # Gy per mm on a 1000 Gy base: with a 0.1 % criterion one search step
# (0.3 mm) changes the dose by about 5 criteria, so only the exact shift matches


def ramp(axes: tuple[np.ndarray, ...], axis: int, shift: float = 0.0) -> np.ndarray:
    """A steep linear dose along one axis: 1000 + SLOPE * (coordinate - shift)."""
    mesh = np.meshgrid(*axes, indexing="ij")
    return 1000.0 + SLOPE * (mesh[axis] - shift)


def inner(g: np.ndarray, margin: int = 5) -> np.ndarray:
    return g[(slice(margin, -margin),) * g.ndim]


# -- analytic: a pure shift of d mm on a steep gradient gives gamma = d / DTA


@pytest.mark.parametrize("d", [0.3, 0.9, 1.5, 2.4])
def test_1d_shift_on_a_steep_gradient_is_d_over_dta(d: float) -> None:
    x = np.arange(-30.0, 30.01, 1.0)
    r = gamma(
        (x,),
        ramp((x,), 0),
        (x,),
        ramp((x,), 0, d),
        dose_percent=0.1,
        distance_mm=3,
        cutoff_percent=0,
    )
    np.testing.assert_allclose(inner(r.gamma), d / 3, atol=1e-5)


@pytest.mark.parametrize(
    ("axis", "d", "exact"),
    [(0, 1.5, True), (1, 1.5, False), (2, 1.5, True), (2, 0.6, True), (0, 0.6, False)],
)
def test_3d_shift_along_each_axis(axis: int, d: float, exact: bool) -> None:
    """Exact where the search shells hold the shift's direction (their poles lie on the last
    axis; the equator of a shell of an odd number of rings holds the first); elsewhere never
    below the true minimum and, on this steep ramp, within the shells' angular step of it."""
    ref, ev = ramp(AXES3, axis), ramp(AXES3, axis, d)
    r = gamma(
        AXES3, ref, AXES3, ev, dose_percent=0.1, distance_mm=3, cutoff_percent=0, max_gamma=1.1
    )
    g = inner(r.gamma)
    dd, dose_crit = 3.0, 0.1
    exact_min = d / math.sqrt(dd**2 + (dose_crit / 100 * float(ref.max()) / SLOPE) ** 2)
    assert float(g.min()) >= exact_min - 1e-5
    assert float(g.max() - g.min()) < 1e-3  # the same everywhere
    if exact:
        np.testing.assert_allclose(g, d / dd, atol=1e-5)
    else:
        assert float(g.max()) <= 2.2 * d / dd


def test_2d_shift_along_rows_and_columns() -> None:
    axes = centred_axes((31, 29), (1.0, 2.0))
    for axis in (0, 1):
        r = gamma(
            axes,
            ramp(axes, axis),
            axes,
            ramp(axes, axis, 1.5),
            dose_percent=0.1,
            distance_mm=3,
            cutoff_percent=0,
        )
        g = inner(r.gamma)
        assert float(g.min()) >= 0.49 and float(g.max()) <= 0.5 * 1.2


def test_a_shift_along_one_axis_is_not_one_along_another() -> None:
    """Gamma of a shift along z differs from the same shift along x on this anisotropic field:
    the core does not mix axes up."""
    field = standard_field(3, (21.0, 34.5, 50.0))
    ref = field(AXES3)
    g = {
        axis: gamma(
            AXES3,
            ref,
            AXES3,
            field(AXES3, [1.2 if a == axis else 0.0 for a in range(3)]),
            dose_percent=1,
            distance_mm=1,
            cutoff_percent=10,
        ).gamma
        for axis in range(3)
    }
    assert not np.allclose(g[0], g[2], equal_nan=True, atol=1e-3)
    # transposed data give the same verdict (not the same gammas to the last digit: the
    # search shells have their poles along the last axis, as PyMedPhys's do)
    t = gamma(
        AXES3[::-1],
        ref.transpose(2, 1, 0),
        AXES3[::-1],
        field(AXES3, [1.2, 0.0, 0.0]).transpose(2, 1, 0),
        dose_percent=1,
        distance_mm=1,
        cutoff_percent=10,
    )
    straight = g[0][~np.isnan(g[0])]
    assert abs(t.pass_rate_percent - 100 * float(np.mean(straight <= 1))) < 0.5


# -- dose differences, normalisation, cutoff, cap


def test_identical_doses_give_zero() -> None:
    ref = standard_field(3, (21.0, 34.5, 50.0))(AXES3)
    r = gamma(AXES3, ref, AXES3, ref.copy())
    assert r.pass_rate_percent == 100.0
    assert r.gamma_max == 0.0


def test_global_scaling_in_a_flat_region() -> None:
    ref = np.full((15, 15, 15), 2.0)
    ax = centred_axes(ref.shape, (2.0, 2.0, 2.0))
    r = gamma(ax, ref, ax, ref * 1.015, dose_percent=3, distance_mm=3)
    np.testing.assert_allclose(inner(r.gamma, 4), 0.5, atol=1e-5)
    flat2 = np.full((30, 30), 2.0)
    ax2 = centred_axes(flat2.shape, (2.0, 2.0))
    r = gamma(ax2, flat2, ax2, flat2 * 1.06, dose_percent=3, distance_mm=3, max_gamma=1.5)
    np.testing.assert_allclose(r.gamma, 1.5)  # capped
    assert r.pass_rate_percent == 0.0


def test_local_gamma_is_relative_to_the_local_dose() -> None:
    x = np.arange(0.0, 100.0, 1.0)
    ref = np.where(x < 50, 1.0, 0.2)  # two flat levels, far apart
    ev = ref * 1.015
    g_local = gamma(
        (x,), ref, (x,), ev, dose_percent=3, distance_mm=1, local=True, cutoff_percent=5
    ).gamma
    g_global = gamma((x,), ref, (x,), ev, dose_percent=3, distance_mm=1, cutoff_percent=5).gamma
    np.testing.assert_allclose(g_local[5:45], 0.5, atol=1e-5)
    np.testing.assert_allclose(g_local[55:95], 0.5, atol=1e-5)
    np.testing.assert_allclose(g_global[55:95], 0.1, atol=1e-5)  # 0.003 / 0.03


def test_points_below_the_cutoff_are_not_evaluated() -> None:
    x = np.arange(100.0)
    ref = x / 99.0  # 0 .. 1
    r = gamma((x,), ref, (x,), ref, cutoff_percent=25)
    assert np.all(np.isnan(r.gamma[ref < 0.25]))
    assert not np.any(np.isnan(r.gamma[ref >= 0.25]))
    assert r.evaluated_points == int(np.sum(ref >= 0.25))


def test_normalisation_can_be_given() -> None:
    x = np.arange(50.0)
    ref = np.full(50, 1.0)
    r = gamma((x,), ref, (x,), ref * 1.01, dose_percent=1, normalisation=2.0)
    np.testing.assert_allclose(inner(r.gamma), 0.5, atol=1e-5)


# -- grids


def test_points_outside_the_evaluated_grid_are_not_evaluated() -> None:
    x = np.arange(0.0, 50.0, 1.0)
    ex = np.arange(20.0, 70.0, 1.0)
    ref = np.ones(50)
    r = gamma((x,), ref, (ex,), np.ones(50), distance_mm=3, max_gamma=1)
    # 17 has 20 within its 3 mm reach, 16 does not
    assert np.all(np.isnan(r.gamma[:17]))
    assert r.gamma[17] == pytest.approx(1.0)
    assert np.all(r.gamma[20:] == 0)
    assert r.evaluated_points == 33


def test_a_finer_evaluated_grid_of_the_same_field() -> None:
    field = standard_field(3, (21.0, 34.5, 50.0))
    ev_axes = grid_axes((41, 70, 50), (0.5, 0.5, 1.0), (-10.3, -17.4, -24.6))
    r = gamma(AXES3, field(AXES3), ev_axes, field(ev_axes), dose_percent=2, distance_mm=2)
    assert r.pass_rate_percent > 99.5
    assert r.evaluated_points > 0


def test_decreasing_axes_give_the_same_gamma() -> None:
    field = standard_field(3, (21.0, 34.5, 50.0))
    ref, ev = field(AXES3), field(AXES3, (0.5, -0.7, 0.9))
    up = gamma(AXES3, ref, AXES3, ev, dose_percent=1, distance_mm=1).gamma
    rev = [a[::-1] for a in AXES3]
    down = gamma(rev, ref[::-1, ::-1, ::-1], AXES3, ev, dose_percent=1, distance_mm=1).gamma
    np.testing.assert_allclose(down[::-1, ::-1, ::-1], up, atol=1e-6)


def test_shared_and_point_by_point_interpolation_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    field = standard_field(3, (21.0, 34.5, 50.0))
    ref = field(AXES3)
    ev_axes = grid_axes((20, 20, 20), (1.25, 2.0, 2.5), (-11.0, -17.0, -26.0))
    ev = field(ev_axes, (0.4, 0.3, -0.6)) * 1.01
    monkeypatch.setattr(core, "_MIN_CLASS_POINTS", 1)
    shared = gamma(AXES3, ref, ev_axes, ev, dose_percent=1, distance_mm=1)
    monkeypatch.setattr(core, "_MIN_CLASS_POINTS", 10**9)
    loose = gamma(AXES3, ref, ev_axes, ev, dose_percent=1, distance_mm=1)
    assert shared.stats["shared_points"] == shared.stats["points"]
    assert loose.stats["shared_points"] == 0
    np.testing.assert_allclose(shared.gamma, loose.gamma, atol=2e-5, equal_nan=True)


def test_threads_do_not_change_the_result() -> None:
    field = standard_field(3, (21.0, 34.5, 50.0))
    ref, ev = field(AXES3), field(AXES3, (0.5, -0.7, 0.9))
    one = gamma(AXES3, ref, AXES3, ev, dose_percent=1, distance_mm=1, threads=1)
    two = gamma(AXES3, ref, AXES3, ev, dose_percent=1, distance_mm=1, threads=2)
    np.testing.assert_array_equal(one.gamma, two.gamma)


# -- the call itself


def test_should_stop_cancels() -> None:
    ref = standard_field(3, (21.0, 34.5, 50.0))(AXES3)
    with pytest.raises(GammaCancelled):
        gamma(AXES3, ref, AXES3, ref, should_stop=lambda: True)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dose_percent": 0},
        {"distance_mm": -1},
        {"cutoff_percent": -5},
        {"max_gamma": float("nan")},
        {"interp_fraction": 0},
        {"max_gamma": 3.0, "interp_fraction": 10},  # too many search steps
        {"normalisation": 0.0},
    ],
)
def test_bad_criteria(kwargs: dict[str, float]) -> None:
    with pytest.raises(GammaInputError):
        GammaOptions(**kwargs)  # type: ignore[arg-type]


def test_bad_inputs() -> None:
    x = np.arange(5.0)
    with pytest.raises(GammaInputError, match="axes"):
        gamma((x, x), np.ones(5), (x,), np.ones(5))
    with pytest.raises(GammaInputError, match="coordinates"):
        gamma((x[:4],), np.ones(5), (x,), np.ones(5))
    with pytest.raises(GammaInputError, match="monotonic"):
        gamma((np.array([0.0, 1, 1, 2, 3]),), np.ones(5), (x,), np.ones(5))
    with pytest.raises(GammaInputError, match="NaN"):
        gamma((x,), np.array([1.0, np.nan, 1, 1, 1]), (x,), np.ones(5))
    with pytest.raises(GammaInputError, match="3-D"):
        gamma((x,), np.ones(5), (x, x), np.ones((5, 5)))


def test_summary_keys_follow_the_contract() -> None:
    x = np.arange(50.0)
    s = gamma((x,), np.ones(50), (x,), np.ones(50) * 1.01).summary()
    assert list(s) == [
        "pass_rate_percent",
        "evaluated_points",
        "gamma_mean",
        "gamma_max",
        "dose_percent",
        "distance_mm",
        "cutoff_percent",
        "normalisation",
        "seconds",
    ]
    assert s["normalisation"] == "global"
    assert s["pass_rate_percent"] == 100.0
