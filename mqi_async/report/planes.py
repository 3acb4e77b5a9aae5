"""Axial, coronal and sagittal planes of a dose comparison through the reference's maximum."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from mqi_async.qa.rtdose import DoseGrid

Array = NDArray[np.float64]


@dataclass(frozen=True, slots=True, kw_only=True)
class Plane:
    """One plane: the reference, the evaluated dose on the reference's points, and gamma."""

    name: str
    #: e.g. "z = 12.0 mm"
    where: str
    #: horizontal and vertical coordinates (mm) and their axis names
    h: Array
    v: Array
    h_label: str
    v_label: str
    reference: Array
    evaluated: Array
    gamma: Array | None


def _weights(axis: Array, points: Array) -> tuple[NDArray[np.intp], NDArray[np.intp], Array, Array]:
    """Linear-interpolation neighbours and weights of `points` on `axis`; outside is NaN."""
    order = np.argsort(axis)
    a = axis[order]
    pos = np.interp(points, a, np.arange(a.size, dtype=np.float64))
    lo = np.clip(np.floor(pos).astype(np.intp), 0, max(a.size - 1, 0))
    hi = np.clip(lo + 1, 0, a.size - 1)
    w = pos - lo
    inside = (points >= a[0] - 1e-6) & (points <= a[-1] + 1e-6)
    mask = np.where(inside, 1.0, np.nan)
    return order[lo], order[hi], w, mask


def sample(grid: DoseGrid, z: Array, y: Array, x: Array) -> Array:
    """The dose at the rectilinear points z × y × x (trilinear; NaN outside the grid)."""
    zi0, zi1, zw, zm = _weights(grid.z, z)
    yi0, yi1, yw, ym = _weights(grid.y, y)
    xi0, xi1, xw, xm = _weights(grid.x, x)
    d = grid.dose
    out = np.zeros((z.size, y.size, x.size))
    for zi, zf in ((zi0, 1 - zw), (zi1, zw)):
        for yi, yf in ((yi0, 1 - yw), (yi1, yw)):
            for xi, xf in ((xi0, 1 - xw), (xi1, xw)):
                out += (
                    d[np.ix_(zi, yi, xi)]
                    * zf[:, None, None]
                    * yf[None, :, None]
                    * xf[None, None, :]
                )
    return out * zm[:, None, None] * ym[None, :, None] * xm[None, None, :]


def planes_through_max(
    reference: DoseGrid, evaluated: DoseGrid, gamma: NDArray[np.floating] | None
) -> list[Plane]:
    """The three orthogonal planes through the reference's maximum voxel."""
    iz, iy, ix = (int(i) for i in np.unravel_index(int(np.argmax(reference.dose)), reference.shape))
    z, y, x = reference.z, reference.y, reference.x
    g = None if gamma is None or gamma.shape != reference.shape else gamma.astype(np.float64)
    cuts = (
        ("axial", f"z = {z[iz]:.1f} mm", np.s_[iz, :, :], (z[iz : iz + 1], y, x), x, y, "x", "y"),
        ("coronal", f"y = {y[iy]:.1f} mm", np.s_[:, iy, :], (z, y[iy : iy + 1], x), x, z, "x", "z"),
        (
            "sagittal",
            f"x = {x[ix]:.1f} mm",
            np.s_[:, :, ix],
            (z, y, x[ix : ix + 1]),
            y,
            z,
            "y",
            "z",
        ),
    )
    planes = []
    for name, where, index, points, h, v, hl, vl in cuts:
        ev = sample(evaluated, *points).reshape(reference.dose[index].shape)
        planes.append(
            Plane(
                name=name,
                where=where,
                h=h,
                v=v,
                h_label=f"{hl} (mm)",
                v_label=f"{vl} (mm)",
                reference=reference.dose[index],
                evaluated=ev,
                gamma=None if g is None else g[index],
            )
        )
    return planes
