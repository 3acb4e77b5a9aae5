"""Smooth, dose-like test fields on regular grids: for tests, the benchmark and demos.

Every field is an analytic function of position, so an "evaluated" dose can be the same field
moved, scaled or blurred exactly, with no interpolation error of its own. Deterministic: the
only randomness is `noise`, drawn from a seeded generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

Axes = tuple[NDArray[np.float64], ...]


def grid_axes(shape: Sequence[int], spacing: Sequence[float], origin: Sequence[float]) -> Axes:
    """Voxel-centre coordinates (mm) per axis: origin + spacing * index."""
    return tuple(
        float(o) + float(s) * np.arange(int(n), dtype=np.float64)
        for n, s, o in zip(shape, spacing, origin, strict=True)
    )


def centred_axes(shape: Sequence[int], spacing: Sequence[float]) -> Axes:
    """Axes of a grid centred on 0 in every dimension."""
    return grid_axes(
        shape, spacing, [-(int(n) - 1) * float(s) / 2 for n, s in zip(shape, spacing, strict=True)]
    )


def _sigmoid(t: NDArray[np.float64]) -> NDArray[np.float64]:
    out: NDArray[np.float64] = 0.5 * (1.0 + np.tanh(0.5 * t))
    return out


@dataclass(frozen=True, slots=True)
class DoseField:
    """A box of dose with soft edges (penumbra), a depth modulation and Gaussian hot spots.

    `half_widths` and `centre` are in mm per axis (axis 0 first, as the arrays); the edge
    width `penumbra_mm` is the 20-80 % distance. Values peak near `peak` Gy.
    """

    half_widths: tuple[float, ...]
    centre: tuple[float, ...] | None = None
    penumbra_mm: float = 6.0
    peak: float = 2.0
    modulation: float = 0.15
    blobs: tuple[tuple[tuple[float, ...], float, float], ...] = ()

    def __call__(self, axes: Axes, shift_mm: Sequence[float] | None = None) -> NDArray[np.float64]:
        """The dose on the grid of `axes`, with the field moved by `shift_mm` (per axis)."""
        ndim = len(axes)
        if len(self.half_widths) != ndim:
            raise ValueError(f"field has {len(self.half_widths)} axes, grid has {ndim}")
        shift = tuple(shift_mm) if shift_mm is not None else (0.0,) * ndim
        centre = self.centre or (0.0,) * ndim
        mesh = np.meshgrid(
            *[ax - c - s for ax, c, s in zip(axes, centre, shift, strict=True)],
            indexing="ij",
            sparse=True,
        )
        # 20-80 % of the logistic is 2*ln(4) ~ 2.77 units
        k = 2.0 * np.log(4.0) / self.penumbra_mm
        dose: NDArray[np.float64] = np.ones([len(a) for a in axes])
        for m, hw in zip(mesh, self.half_widths, strict=True):
            dose = dose * _sigmoid(k * (hw - np.abs(m)))
        if self.modulation:
            depth = mesh[0] / max(self.half_widths[0], 1e-9)
            dose = dose * (1.0 + self.modulation * depth)
        for b_centre, b_sigma, b_amp in self.blobs:
            r2 = sum((m - c) ** 2 for m, c in zip(mesh, b_centre, strict=True))
            dose = dose + b_amp * np.exp(-0.5 * r2 / b_sigma**2)
        return np.asarray(self.peak * dose, dtype=np.float64)


def standard_field(ndim: int, extent_mm: Sequence[float]) -> DoseField:
    """A field filling about half of each extent, with two hot spots and one cold spot."""
    half = tuple(0.25 * float(e) for e in extent_mm)
    blobs = (
        (tuple(0.3 * h for h in half), 0.25 * min(half), 0.25),
        (tuple(-0.4 * h for h in half), 0.2 * min(half), -0.2),
        (tuple(0.9 * h * (-1) ** i for i, h in enumerate(half)), 0.3 * min(half), 0.15),
    )
    return DoseField(half_widths=half, blobs=blobs)


def noise(
    shape: Sequence[int], relative: float, seed: int, scale: float = 1.0
) -> NDArray[np.float64]:
    """Gaussian noise of standard deviation `relative * scale`, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    return np.asarray(rng.normal(0.0, relative * scale, size=tuple(shape)), dtype=np.float64)


#: the benchmark's grid: 150 x 200 x 200 voxels of 2 mm, (z, y, x)
BENCH_SHAPE = (150, 200, 200)
BENCH_SPACING = (2.0, 2.0, 2.0)


def benchmark_pair(
    shape: Sequence[int] = BENCH_SHAPE, spacing: Sequence[float] = BENCH_SPACING
) -> tuple[Axes, NDArray[np.float64], NDArray[np.float64]]:
    """(axes, reference, evaluated) of `make bench`: the standard field, and that field moved
    by (1.2, -0.8, 1.0) mm, scaled by 1.02, with 1 % (of the maximum) voxel noise, seed 1 --
    about what a delivered dose does to a plan's in a Monte Carlo recomputation."""
    axes = centred_axes(shape, spacing)
    field = standard_field(len(shape), [n * s for n, s in zip(shape, spacing, strict=True)])
    ref = field(axes)
    ev = field(axes, (1.2, -0.8, 1.0)) * 1.02 + noise(ref.shape, 0.01, 1, float(ref.max()))
    return axes, ref, np.clip(ev, 0.0, None)
