"""The report's planes: trilinear sampling checked on an analytic (linear) dose, and the cut
through the maximum."""

from __future__ import annotations

import numpy as np
import pytest

from mqi_async.qa.rtdose import DoseGrid
from mqi_async.report.planes import planes_through_max, sample


def _grid(z: np.ndarray, y: np.ndarray, x: np.ndarray, f: object) -> DoseGrid:
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    return DoseGrid(dose=f(zz, yy, xx), z=z, y=y, x=x, frame_of_reference_uid="1.2")  # type: ignore[operator]


def linear(z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    return 1.0 + 0.5 * z - 0.25 * y + 2.0 * x


def test_trilinear_sampling_is_exact_for_a_linear_dose_and_nan_outside() -> None:
    # a descending axis too, as RT Dose y axes can be
    grid = _grid(
        np.arange(0.0, 10.0, 2.0), np.arange(9.0, -1.0, -1.5), np.linspace(-3, 3, 7), linear
    )
    z = np.array([0.3, 4.1, 7.9])
    y = np.array([8.2, 0.5])
    x = np.array([-2.9, 0.0, 2.45])
    got = sample(grid, z, y, x)
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    np.testing.assert_allclose(got, linear(zz, yy, xx), rtol=1e-12)
    outside = sample(grid, np.array([-1.0, 20.0]), y, x)
    assert np.isnan(outside).all()


def test_planes_cross_at_the_reference_maximum_and_resample_the_evaluated_grid() -> None:
    z = np.arange(-10.0, 11.0, 2.0)
    y = np.arange(-8.0, 9.0, 2.0)
    x = np.arange(-6.0, 7.0, 2.0)

    def peak(zz: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        return np.exp(-((zz - 4) ** 2 + (yy + 2) ** 2 + (xx - 2) ** 2) / 20.0)

    reference = _grid(z, y, x, peak)
    # the evaluated dose on a finer, shifted grid: a linear field, so resampling is exact
    evaluated = _grid(
        np.arange(-11, 12, 1.0), np.arange(-9, 10, 1.0), np.arange(-7, 8, 1.0), linear
    )
    gamma = np.full(reference.shape, 0.5, dtype=np.float32)
    axial, coronal, sagittal = planes_through_max(reference, evaluated, gamma)
    assert axial.where == "z = 4.0 mm" and coronal.where == "y = -2.0 mm"
    assert sagittal.where == "x = 2.0 mm"
    assert axial.reference.shape == (y.size, x.size) and axial.h_label == "x (mm)"
    assert coronal.reference.shape == (z.size, x.size) and coronal.v_label == "z (mm)"
    assert sagittal.reference.shape == (z.size, y.size)
    yy, xx = np.meshgrid(y, x, indexing="ij")
    np.testing.assert_allclose(axial.evaluated, linear(np.full_like(yy, 4.0), yy, xx))
    assert axial.gamma is not None and float(axial.gamma.max()) == pytest.approx(0.5)
    # a gamma map of another shape is not drawn rather than drawn wrong
    assert planes_through_max(reference, evaluated, np.zeros((2, 2, 2)))[0].gamma is None
