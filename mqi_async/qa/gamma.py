"""The gamma index (Low et al. 1998) of an evaluated dose against a reference dose, in numpy.

For every reference point at or above the lower cutoff, gamma is the smallest

    sqrt( (D_eval(r + o) - D_ref(r))**2 / dD**2 + |o|**2 / dd**2 )

over search offsets `o`, where D_eval is the evaluated dose interpolated trilinearly, dD the
dose criterion (a percentage of the global normalisation, or of the local reference dose) and
dd the distance criterion in mm. As in PyMedPhys `gamma` (and Wendling et al. 2007), the
offsets are sub-voxel steps of `dd / interp_fraction` out to `dd * max_gamma`; ours are the
points of a cubic lattice of that step inside that sphere, so no point of the sphere is
further than half a step's diagonal from a tested one. A point's search stops as soon as the
distance term alone of the remaining offsets cannot beat the best gamma found.

How it is fast. The offsets are sorted by length once and cut into bands one step wide. The
reference points are sorted into classes that share, along every axis, the same position
relative to the evaluated grid's nodes; on equal grids (or grids whose spacings have a small
rational ratio) nearly all points fall into a handful of classes. Within a class, the
trilinear weights of every offset are the same for all points, so the evaluated dose at all
offsets of a band, for a chunk of points, is one small matrix product of the points'
neighbouring evaluated voxels with a precomputed weight matrix. Points whose gamma is already
known leave the chunk band by band. Points in classes too small to share weights are
interpolated one by one (same result, slower). Memory is bounded by the chunk size.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

F32 = np.float32
_SNAP = 1e-6  # fractions this close to a node are on it (keeps classes exact and stable)
_MIN_CLASS_POINTS = 512  # smaller classes are interpolated point by point (a plan costs ~20 ms)
_CHUNK = 4096  # reference points per chunk
_MAX_STEPS = 25  # max_gamma * interp_fraction: bounds the search offsets and their tables


class GammaInputError(ValueError):
    """The doses or axes cannot be compared (shapes, axes not increasing, bad criteria)."""


class GammaCancelled(Exception):
    """`should_stop` returned true; the computation was abandoned."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GammaOptions:
    """Criteria of one gamma comparison (PyMedPhys `gamma` names in brackets)."""

    dose_percent: float = 3.0  # [dose_percent_threshold]
    distance_mm: float = 3.0  # [distance_mm_threshold]
    cutoff_percent: float = 10.0  # [lower_percent_dose_cutoff], of the normalisation
    local: bool = False  # [local_gamma]: dose criterion in percent of the local reference dose
    max_gamma: float = 2.0  # [max_gamma]: search radius distance_mm * max_gamma; gamma capped
    interp_fraction: int = 10  # [interp_fraction]: search step distance_mm / interp_fraction
    #: [global_normalisation]; None = the reference maximum
    normalisation: float | None = None

    def __post_init__(self) -> None:
        for name in ("dose_percent", "distance_mm", "max_gamma"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise GammaInputError(f"{name} must be a finite number > 0, not {value!r}")
        if not (math.isfinite(self.cutoff_percent) and self.cutoff_percent >= 0):
            raise GammaInputError(f"cutoff_percent must be >= 0, not {self.cutoff_percent!r}")
        if int(self.interp_fraction) != self.interp_fraction or self.interp_fraction < 1:
            raise GammaInputError(
                f"interp_fraction must be an integer >= 1, not {self.interp_fraction!r}"
            )
        if self.max_gamma * self.interp_fraction > _MAX_STEPS + 1e-9:
            # the search offsets grow as its cube, the per-axis tables about as its square
            raise GammaInputError(
                f"max_gamma x interp_fraction must be at most {_MAX_STEPS} (search steps out "
                f"to the largest radius), not {self.max_gamma * self.interp_fraction:g}"
            )
        if self.normalisation is not None and not (
            math.isfinite(self.normalisation) and self.normalisation > 0
        ):
            raise GammaInputError(f"normalisation must be > 0, not {self.normalisation!r}")


@dataclass(frozen=True, slots=True)
class GammaResult:
    """Gamma per reference point (NaN where not evaluated) and its summary numbers."""

    gamma: NDArray[np.float32]
    options: GammaOptions
    normalisation: float
    evaluated_points: int
    passed_points: int
    gamma_mean: float
    gamma_max: float
    seconds: float = 0.0
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def pass_rate_percent(self) -> float:
        if not self.evaluated_points:
            return float("nan")
        return 100.0 * self.passed_points / self.evaluated_points

    def summary(self) -> dict[str, object]:
        """The `mqi-async gamma --json` keys (CONTRACT.md "Dose checks")."""
        o = self.options

        def num(v: float, digits: int) -> float | None:
            return round(v, digits) if math.isfinite(v) else None

        return {
            "pass_rate_percent": num(self.pass_rate_percent, 2),
            "evaluated_points": self.evaluated_points,
            "gamma_mean": num(self.gamma_mean, 4),
            "gamma_max": num(self.gamma_max, 4),
            "dose_percent": float(o.dose_percent),
            "distance_mm": float(o.distance_mm),
            "cutoff_percent": float(o.cutoff_percent),
            "normalisation": "local" if o.local else "global",
            "seconds": round(self.seconds, 3),
        }


# --------------------------------------------------------------------------- geometry


def _check_axes(
    axes: Sequence[NDArray[np.float64]] | Sequence[Sequence[float]],
    shape: tuple[int, ...],
    what: str,
) -> tuple[list[NDArray[np.float64]], list[bool]]:
    """Axes as float64 arrays, increasing; the second list says which were reversed."""
    if len(axes) != len(shape):
        raise GammaInputError(f"{what}: {len(axes)} axes for a {len(shape)}-D dose")
    out, flipped = [], []
    for k, (ax, n) in enumerate(zip(axes, shape, strict=True)):
        a = np.asarray(ax, dtype=np.float64).ravel()
        if a.size != n:
            raise GammaInputError(f"{what}: axis {k} has {a.size} coordinates, the dose {n}")
        if not np.all(np.isfinite(a)):
            raise GammaInputError(f"{what}: axis {k} has non-finite coordinates")
        rev = False
        if a.size > 1:
            d = np.diff(a)
            if np.all(d < 0):
                a, rev = a[::-1].copy(), True
            elif not np.all(d > 0):
                raise GammaInputError(f"{what}: axis {k} is not strictly monotonic")
        out.append(a)
        flipped.append(rev)
    return out, flipped


@dataclass(frozen=True, slots=True)
class _AxisTable:
    """Along one axis, for each reference index i and each distinct offset value v: the
    evaluated grid's lower node at x_i + v, the fraction towards the next node, whether the
    position lies inside the grid, and i's class (indices that share every relative node and
    fraction, hence every interpolation weight)."""

    node: NDArray[np.int32]  # (n_ref, n_values) absolute lower node
    frac: NDArray[np.float32]  # (n_ref, n_values)
    valid: NDArray[np.bool_]  # (n_ref, n_values)
    base: NDArray[np.int64]  # (n_ref,) lower node of the reference point itself
    cls: NDArray[np.int64]  # (n_ref,) class of each reference index
    cls_rep: NDArray[np.int64]  # (n_classes,) one reference index of each class
    n_eval: int


def _axis_rows(
    ref: NDArray[np.float64], ev: NDArray[np.float64], values: NDArray[np.float64]
) -> tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.bool_], NDArray[np.int64]]:
    """Lower node, fraction, inside-ness at ref[i] + values[j], and ref[i]'s own node."""
    q = ref[:, None] + values[None, :]
    n_e = ev.size
    if n_e == 1:
        scale = max(float(np.max(np.abs(ev))), float(np.max(np.abs(ref))), 1.0)
        node = np.zeros(q.shape, dtype=np.int64)
        frac = np.zeros(q.shape)
        valid = np.abs(q - ev[0]) <= 1e-9 * scale
        return node, frac, valid, np.zeros(ref.size, dtype=np.int64)
    node = np.clip(np.searchsorted(ev, q, side="right") - 1, 0, n_e - 2)
    lo, hi = ev[node], ev[node + 1]
    frac = (q - lo) / (hi - lo)
    valid = (frac >= -_SNAP) & (frac <= 1.0 + _SNAP)
    np.clip(frac, 0.0, 1.0, out=frac)
    frac[frac < _SNAP] = 0.0
    up = (frac > 1.0 - _SNAP) & (node < n_e - 2)
    node[up] += 1
    frac[up] = 0.0
    frac[frac > 1.0 - _SNAP] = 1.0
    base = np.clip(np.searchsorted(ev, ref, side="right") - 1, 0, n_e - 2)
    return node, frac, valid, base


def _axis_table(
    ref: NDArray[np.float64], ev: NDArray[np.float64], values: NDArray[np.float64]
) -> _AxisTable:
    n_ref, n_val = ref.size, values.size
    node = np.empty((n_ref, n_val), dtype=np.int32)
    frac = np.empty((n_ref, n_val), dtype=np.float32)
    valid = np.empty((n_ref, n_val), dtype=np.bool_)
    base = np.empty(n_ref, dtype=np.int64)
    cls = np.empty(n_ref, dtype=np.int64)
    seen: dict[bytes, int] = {}
    reps: list[int] = []
    rows = max(1, (1 << 20) // max(n_val, 1))  # bounded temporaries
    for r0 in range(0, n_ref, rows):
        r1 = min(n_ref, r0 + rows)
        nd, fr, ok, bs = _axis_rows(ref[r0:r1], ev, values)
        node[r0:r1], frac[r0:r1], valid[r0:r1], base[r0:r1] = nd, fr, ok, bs
        ticks = np.rint(fr / _SNAP).astype(np.int32)
        rel = (nd - bs[:, None]).astype(np.int32)
        for k in range(r1 - r0):
            key = rel[k].tobytes() + ticks[k].tobytes() + ok[k].tobytes()
            c = seen.get(key)
            if c is None:
                c = seen[key] = len(reps)
                reps.append(r0 + k)
            cls[r0 + k] = c
    return _AxisTable(node, frac, valid, base, cls, np.asarray(reps, dtype=np.int64), ev.size)


@dataclass(frozen=True, slots=True)
class _Band:
    """One search shell: its offsets as indices into the per-axis offset values."""

    idx: NDArray[np.intp]  # (F, 3)
    tt: NDArray[np.float32]  # (F,) (|o| / dd)**2
    next_tt: float  # (|o| / dd)**2 of the next shell (inf: none)


def _shell(distance: float, ndim: int, step: float) -> NDArray[np.float64]:
    """Points at `distance` from the origin, no two neighbours further apart than `step`.

    The same construction as PyMedPhys (after Wendling et al. 2007): 1-D, the two points
    +-d; 2-D, a circle of ceil(2 pi d / step) + 1 points; 3-D, rings of constant elevation
    (ceil(pi d / step) + 1 of them, poles included), each of ceil(2 pi r / step) + 1 points.
    Coordinates are in array-axis order.
    """
    if distance == 0:
        return np.zeros((1, ndim))
    if ndim == 1:
        return np.array([[distance], [-distance]])
    if ndim == 2:
        n = int(np.ceil(2 * np.pi * distance / step)) + 1
        theta = np.linspace(0, 2 * np.pi, n + 1)[:-1]
        return np.stack([distance * np.cos(theta), distance * np.sin(theta)], axis=1)
    rows = int(np.ceil(np.pi * distance / step)) + 1
    elevation = np.linspace(0, np.pi, rows)
    per_row = np.ceil(2 * np.pi * distance * np.sin(elevation) / step).astype(int) + 1
    parts = []
    for el, n in zip(elevation, per_row, strict=True):
        az = np.linspace(0, 2 * np.pi, n + 1)[:-1]
        parts.append(
            np.stack(
                [
                    distance * np.sin(el) * np.cos(az),
                    distance * np.sin(el) * np.sin(az),
                    distance * np.cos(el) * np.ones_like(az),
                ],
                axis=1,
            )
        )
    return np.concatenate(parts)


def _distances(dd: float, step: float, radius: float) -> list[float]:
    """0, step, 2 step, ... up to radius, with dd itself always among them (PyMedPhys's walk)."""
    out = []
    d = 0.0
    forced: float | None = dd
    while d <= radius:
        out.append(d)
        d += step
        if forced is not None and d >= forced:
            d, forced = forced, None
    return out


def _bands(
    dd: float, step: float, radius: float, ndim: int
) -> tuple[list[_Band], list[NDArray[np.float64]]]:
    """The search shells and, per (padded, 3-D) axis, the distinct offset values (mm)."""
    dists = _distances(dd, step, radius)
    shells = [_shell(d, ndim, step) for d in dists]
    pad = 3 - ndim
    shells = [np.concatenate([np.zeros((len(s), pad)), s], axis=1) for s in shells]
    allo = np.concatenate(shells)
    values, inverse = [], []
    for a in range(3):
        v, inv = np.unique(allo[:, a], return_inverse=True)
        values.append(v)
        inverse.append(inv.ravel())
    idx_all = np.stack(inverse, axis=1).astype(np.intp)
    bands, start = [], 0
    for k, (d, s) in enumerate(zip(dists, shells, strict=True)):
        stop = start + len(s)
        nxt = (dists[k + 1] / dd) ** 2 if k + 1 < len(dists) else math.inf
        tt = np.full(len(s), (d / dd) ** 2, dtype=F32)
        bands.append(_Band(idx_all[start:stop], tt, float(nxt)))
        start = stop
    return bands, values


# --------------------------------------------------------------------------- kernels

_BIG = np.float32(1e15)  # the dose difference of an offset outside the evaluated grid
_NOT_FOUND = 1e20  # gamma**2 at or above this: no offset was inside the evaluated grid
_GEMM_ELEMENTS = 1 << 19
# relative node (z, y, x), each in [-_CODE_HALF, _CODE_HALF), as one integer
_CODE = 1 << 20
_CODE_HALF = _CODE // 2
_CODE_BIAS = (
    _CODE_HALF * _CODE + _CODE_HALF
) * _CODE + _CODE_HALF  # rows per matrix product so that its result stays in cache


@dataclass(frozen=True, slots=True)
class _Group:
    """Offsets of one shell that fall in one 2x2x2 block of evaluated cells."""

    cols: NDArray[np.intp] | None  # block columns used; None: the first `k` columns
    k: int
    weights: NDArray[np.float32]  # (k, F), Fortran order: evaluated minus reference dose


@dataclass(frozen=True, slots=True)
class _PlanBand:
    need: int  # block columns that must be gathered before this shell
    tt: float  # (d / dd)**2 of the shell
    next_tt: float
    groups: tuple[_Group, ...]


@dataclass(frozen=True, slots=True)
class _ClassPlan:
    """What a class of reference points gathers (evaluated nodes relative to each point's
    own node, as flat offsets) and, per shell, the weight matrices of its offsets.

    Block columns: 0 the reference dose, 1 a constant 1 (it carries `_BIG` to the offsets
    outside the grid), then the nodes in the order the shells first need them.
    """

    node_off: NDArray[np.int64]
    bands: tuple[_PlanBand, ...]


def _class_plan(
    tables: Sequence[_AxisTable],
    rep: Sequence[int],
    bands: Sequence[_Band],
    strides: tuple[int, int],
) -> _ClassPlan:
    rel = [t.node[i] - t.base[i] for t, i in zip(tables, rep, strict=True)]
    frac = [t.frac[i] for t, i in zip(tables, rep, strict=True)]
    valid = [t.valid[i] for t, i in zip(tables, rep, strict=True)]
    col_of: dict[int, int] = {}  # node code (relative z, y, x) -> block column
    plan_bands: list[_PlanBand] = []
    for band in bands:
        idx = [band.idx[:, a] for a in range(3)]
        r = [rel[a][idx[a]] for a in range(3)]
        f = [frac[a][idx[a]] for a in range(3)]
        ok = valid[0][idx[0]] & valid[1][idx[1]] & valid[2][idx[2]]
        # the 8 corners of each offset's cell: node (relative) and trilinear weight
        corners = []
        for cz in (0, 1):
            for cy in (0, 1):
                for cx in (0, 1):
                    w = (
                        (f[0] if cz else 1 - f[0])
                        * (f[1] if cy else 1 - f[1])
                        * (f[2] if cx else 1 - f[2])
                    )
                    corners.append((r[0] + cz, r[1] + cy, r[2] + cx, w))
        # offsets of one 2x2x2 block of cells share one product (<= 27 nodes)
        key = (
            np.floor_divide(r[0] + 1, 2) * 1_000_000 + np.floor_divide(r[1] + 1, 2) * 1000
        ) + np.floor_divide(r[2] + 1, 2)
        groups: list[_Group] = []
        for gk in np.unique(key):
            sel = np.flatnonzero(key == gk)
            entries: list[tuple[NDArray[np.intp], NDArray[np.intp], NDArray[np.float64]]] = []
            for zz, yy, xx, w in corners:
                ws = w[sel]
                nz = np.flatnonzero(ws != 0)
                if nz.size == 0:
                    continue
                codes = (zz[sel][nz] * _CODE + yy[sel][nz]) * _CODE + xx[sel][nz]
                uniq, where = np.unique(codes, return_inverse=True)
                uniq_cols = np.empty(uniq.size, dtype=np.intp)
                for j, code in enumerate(uniq.tolist()):
                    c = col_of.get(code)
                    if c is None:
                        c = col_of[code] = 2 + len(col_of)
                    uniq_cols[j] = c
                cols = uniq_cols[where.ravel()]
                entries.append((cols, nz, ws[nz]))
            invalid = ~ok[sel]
            fixed = np.asarray([0, 1] if invalid.any() else [0], dtype=np.intp)
            used = np.unique(np.concatenate([fixed] + [e[0] for e in entries]))
            need = int(used.max()) + 1
            prefix = len(used) * 2 >= need
            rows = np.arange(need, dtype=np.intp) if prefix else used
            pos = np.full(need, -1, dtype=np.intp)
            pos[rows] = np.arange(len(rows))
            w = np.zeros((len(rows), len(sel)), dtype=np.float64)
            for cols, nz, ws in entries:
                np.add.at(w, (pos[cols], nz), ws)
            w[pos[0], :] = -1.0
            if invalid.any():
                w[pos[1], :] = np.where(invalid, float(_BIG), 0.0)
            groups.append(
                _Group(None if prefix else rows, len(rows), np.asfortranarray(w.astype(F32)))
            )
        plan_bands.append(
            _PlanBand(2 + len(col_of), float(band.tt[0]), band.next_tt, tuple(groups))
        )
    sy, sz = strides
    node_off = np.zeros(len(col_of), dtype=np.int64)
    for code, c in col_of.items():
        zy, x = divmod(code + _CODE_BIAS, _CODE)
        z, y = divmod(zy, _CODE)
        node_off[c - 2] = (z - _CODE_HALF) * sz + (y - _CODE_HALF) * sy + (x - _CODE_HALF)
    return _ClassPlan(node_off, tuple(plan_bands))


@dataclass(frozen=True, slots=True)
class _Problem:
    tables: tuple[_AxisTable, _AxisTable, _AxisTable]
    bands: list[_Band]
    ev: NDArray[np.float32]  # evaluated dose, flat (z, y, x) C order; scaled by 1/dD if global
    ev_shape: tuple[int, int, int]
    local: bool


class _Scratch:
    """Per-thread result buffer of the matrix products."""

    def __init__(self) -> None:
        self.buf = np.empty(0, dtype=F32)

    def get(self, n: int) -> NDArray[np.float32]:
        if self.buf.size < n:
            self.buf = np.empty(n, dtype=F32)
        return self.buf[:n]


def _solve_shared(
    prob: _Problem,
    plan: _ClassPlan,
    base: NDArray[np.int64],
    dref: NDArray[np.float32],
    inv: NDArray[np.float32],
    scratch: _Scratch,
) -> NDArray[np.float32]:
    """gamma**2 of points of one class; `base`: flat index of each point's own node,
    `dref`: reference dose in units of dD."""
    p = len(base)
    ncols = 2 + len(plan.node_off)
    block = np.empty((p, ncols), dtype=F32)
    block[:, 0] = dref
    block[:, 1] = 1.0
    got = 2
    result = np.full(p, np.inf, dtype=F32)
    best = np.full(p, np.inf, dtype=F32)
    pos = np.arange(p)
    n = p
    for band in plan.bands:
        if band.need > got:
            vals = prob.ev[base[:, None] + plan.node_off[got - 2 : band.need - 2][None, :]]
            if prob.local:
                vals *= inv[:, None]
            block[:n, got : band.need] = vals
            got = band.need
        for g in band.groups:
            f = g.weights.shape[1]
            rows = max(16, _GEMM_ELEMENTS // f)
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                a = block[r0:r1, : g.k] if g.cols is None else block[r0:r1, g.cols]
                d = np.matmul(a, g.weights, out=scratch.get((r1 - r0) * f).reshape(r1 - r0, f))
                np.square(d, out=d)
                m = d.min(axis=1)
                m += np.float32(band.tt)
                np.minimum(best[r0:r1], m, out=best[r0:r1])
        done = best[:n] <= band.next_tt
        if done.any():
            result[pos[done]] = best[:n][done]
            keep = ~done
            n = int(keep.sum())
            if n == 0:
                return result
            pos = pos[keep]
            base = base[keep]
            inv = inv[keep]
            best[:n] = best[: len(keep)][keep]
            block[:n, :got] = block[: len(keep), :got][keep]
    result[pos] = best[:n]
    return result


def _solve_points(
    prob: _Problem,
    ijk: NDArray[np.int64],
    dref: NDArray[np.float32],
    inv: NDArray[np.float32],
) -> NDArray[np.float32]:
    """gamma**2 of points interpolated one by one (classes too small to share weights)."""
    nz, ny, nx = prob.ev_shape
    t = prob.tables
    ev = prob.ev
    p = len(ijk)
    best = np.full(p, np.inf, dtype=F32)
    act = np.arange(p)
    for band in prob.bands:
        mz, my, mx = band.idx[:, 0], band.idx[:, 1], band.idx[:, 2]
        pts = ijk[act]
        iz, iy, ix = pts[:, 0:1], pts[:, 1:2], pts[:, 2:3]
        z0 = t[0].node[iz, mz].astype(np.int64)
        y0 = t[1].node[iy, my].astype(np.int64)
        x0 = t[2].node[ix, mx].astype(np.int64)
        fz, fy, fx = t[0].frac[iz, mz], t[1].frac[iy, my], t[2].frac[ix, mx]
        ok = t[0].valid[iz, mz] & t[1].valid[iy, my] & t[2].valid[ix, mx]
        z1 = np.minimum(z0 + 1, nz - 1) * (ny * nx)
        y1 = np.minimum(y0 + 1, ny - 1) * nx
        x1 = np.minimum(x0 + 1, nx - 1)
        z0 = z0 * (ny * nx)
        y0 = y0 * nx
        c00 = ev[z0 + y0 + x0]
        c00 += fx * (ev[z0 + y0 + x1] - c00)
        c01 = ev[z0 + y1 + x0]
        c01 += fx * (ev[z0 + y1 + x1] - c01)
        c10 = ev[z1 + y0 + x0]
        c10 += fx * (ev[z1 + y0 + x1] - c10)
        c11 = ev[z1 + y1 + x0]
        c11 += fx * (ev[z1 + y1 + x1] - c11)
        c00 += fy * (c01 - c00)
        c10 += fy * (c11 - c10)
        c00 += fz * (c10 - c00)
        if prob.local:
            c00 *= inv[act, None]
        c00 -= dref[act, None]
        np.square(c00, out=c00)
        c00[~ok] = np.inf
        m = c00.min(axis=1) + np.float32(band.tt[0])
        best[act] = np.minimum(best[act], m)
        act = act[best[act] > band.next_tt]
        if act.size == 0:
            break
    return best


def _blas_single_thread() -> contextlib.AbstractContextManager[object]:
    """One BLAS thread while we run our own threads (many BLAS threads fight over tiny
    products); a no-op where threadpoolctl is not installed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        return contextlib.nullcontext()
    limits: contextlib.AbstractContextManager[object] = threadpool_limits(  # type: ignore[no-untyped-call]
        limits=1, user_api="blas"
    )
    return limits


# --------------------------------------------------------------------------- entry point


def gamma(
    axes_reference: Sequence[NDArray[np.float64]] | Sequence[Sequence[float]],
    dose_reference: NDArray[np.floating],
    axes_evaluation: Sequence[NDArray[np.float64]] | Sequence[Sequence[float]],
    dose_evaluation: NDArray[np.floating],
    options: GammaOptions | None = None,
    *,
    threads: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    **criteria: float | bool | int | None,
) -> GammaResult:
    """Gamma of `dose_evaluation` against `dose_reference` (1-, 2- or 3-D, any grids).

    Axes are the voxel-centre coordinates in mm, one array per array axis (e.g. (z, y, x)
    for a (z, y, x) dose), increasing or decreasing, not necessarily uniform. Criteria come
    as `options` or as GammaOptions keywords (dose_percent=2, distance_mm=2, ...). Reference
    points below the cutoff, and those with no tested offset inside the evaluated grid, are
    NaN and not evaluated. `threads` defaults to the CPU count. `should_stop` is polled
    between chunks; when it returns true the call raises GammaCancelled.
    """
    started = time.perf_counter()
    if options is None:
        options = GammaOptions(**criteria)  # type: ignore[arg-type]
    elif criteria:
        raise GammaInputError("give either options or criteria keywords, not both")
    ref = np.asarray(dose_reference)
    evd = np.asarray(dose_evaluation)
    if ref.ndim not in (1, 2, 3) or evd.ndim != ref.ndim:
        raise GammaInputError(
            f"doses must both be 1-, 2- or 3-D arrays; got {ref.ndim}-D and {evd.ndim}-D"
        )
    if ref.size == 0 or evd.size == 0:
        raise GammaInputError("a dose grid is empty")
    if not (np.all(np.isfinite(ref)) and np.all(np.isfinite(evd))):
        raise GammaInputError("a dose holds NaN or infinite values")
    ax_r, flip_r = _check_axes(axes_reference, ref.shape, "reference")
    ax_e, flip_e = _check_axes(axes_evaluation, evd.shape, "evaluation")
    for k, rev in enumerate(flip_r):
        if rev:
            ref = np.flip(ref, axis=k)
    for k, rev in enumerate(flip_e):
        if rev:
            evd = np.flip(evd, axis=k)
    ndim = ref.ndim
    pad = 3 - ndim
    ax_r = [np.zeros(1)] * pad + ax_r
    ax_e = [np.zeros(1)] * pad + ax_e
    ref3 = ref.reshape((1,) * pad + ref.shape)
    ev_shape = (1,) * pad + evd.shape

    norm = float(options.normalisation) if options.normalisation is not None else float(ref.max())
    dd = float(options.distance_mm)
    step = dd / int(options.interp_fraction)
    bands, values = _bands(dd, step, dd * float(options.max_gamma), ndim)
    tables = (
        _axis_table(ax_r[0], ax_e[0], values[0]),
        _axis_table(ax_r[1], ax_e[1], values[1]),
        _axis_table(ax_r[2], ax_e[2], values[2]),
    )

    points = ref3 >= options.cutoff_percent / 100.0 * norm
    if options.local:
        points &= ref3 > 0
    if not norm > 0:
        points[...] = False
    flat_idx = np.flatnonzero(points)
    ijk = np.stack(np.unravel_index(flat_idx, ref3.shape), axis=1).astype(np.int64)
    dref64 = ref3.ravel()[flat_idx].astype(np.float64)
    frac_dd = options.dose_percent / 100.0
    if options.local:
        inv64 = 1.0 / (frac_dd * dref64)
        ev_flat = np.ascontiguousarray(evd, dtype=F32).ravel()
    else:
        inv_global = 1.0 / (frac_dd * norm) if norm > 0 else 1.0
        inv64 = np.full(len(flat_idx), inv_global)
        ev_flat = np.array(evd, dtype=F32).ravel()  # a copy: scaled in place
        ev_flat *= np.float32(inv_global)
    inv = inv64.astype(F32)
    # the reference in units of dD, rounded exactly as the evaluated dose is
    dref = dref64.astype(F32) * inv
    prob = _Problem(tables, bands, ev_flat, (ev_shape[0], ev_shape[1], ev_shape[2]), options.local)
    strides = (ev_shape[2], ev_shape[1] * ev_shape[2])
    base = (
        tables[0].base[ijk[:, 0]] * strides[1]
        + tables[1].base[ijk[:, 1]] * strides[0]
        + tables[2].base[ijk[:, 2]]
    )

    ncls = [len(t.cls_rep) for t in tables]
    cls = (tables[0].cls[ijk[:, 0]] * ncls[1] + tables[1].cls[ijk[:, 1]]) * ncls[2] + tables[2].cls[
        ijk[:, 2]
    ]
    order = np.argsort(cls, kind="stable")
    cls_sorted = cls[order]
    starts: NDArray[np.intp] = np.flatnonzero(np.r_[True, np.diff(cls_sorted) != 0])
    stops: NDArray[np.intp] = np.r_[starts[1:], len(order)]
    if not len(order):
        starts = stops = np.zeros(0, dtype=np.intp)

    jobs: list[tuple[_ClassPlan | None, NDArray[np.intp]]] = []
    loose: list[NDArray[np.intp]] = []
    shared_points = 0
    for a, b in zip(starts, stops, strict=True):
        members = order[a:b]
        if len(members) < _MIN_CLASS_POINTS:
            loose.append(members)
            continue
        c = int(cls_sorted[a])
        cz, rest = divmod(c, ncls[1] * ncls[2])
        cy, cx = divmod(rest, ncls[2])
        rep = (int(tables[0].cls_rep[cz]), int(tables[1].cls_rep[cy]), int(tables[2].cls_rep[cx]))
        plan = _class_plan(tables, rep, bands, strides)
        shared_points += len(members)
        jobs.extend((plan, members[s : s + _CHUNK]) for s in range(0, len(members), _CHUNK))
    if loose:
        rest_idx = np.concatenate(loose)
        step_pts = max(64, _CHUNK // 8)
        jobs.extend((None, rest_idx[s : s + step_pts]) for s in range(0, len(rest_idx), step_pts))

    best = np.full(len(flat_idx), np.inf, dtype=F32)
    local_scratch = threading.local()

    def run(job: tuple[_ClassPlan | None, NDArray[np.intp]]) -> None:
        if should_stop is not None and should_stop():
            raise GammaCancelled("gamma cancelled")
        plan, members = job
        if plan is None:
            best[members] = _solve_points(prob, ijk[members], dref[members], inv[members])
            return
        scratch = getattr(local_scratch, "s", None)
        if scratch is None:
            scratch = local_scratch.s = _Scratch()
        best[members] = _solve_shared(
            prob, plan, base[members], dref[members], inv[members], scratch
        )

    n_threads = threads if threads is not None else (os.cpu_count() or 1)
    with _blas_single_thread():
        if n_threads <= 1 or len(jobs) <= 1:
            for job in jobs:
                run(job)
        else:
            with ThreadPoolExecutor(max_workers=n_threads) as pool:
                for _ in pool.map(run, jobs):
                    pass

    found = best < _NOT_FOUND
    g = np.minimum(np.sqrt(best), np.float32(options.max_gamma))
    out = np.full(ref3.size, np.nan, dtype=F32)
    out[flat_idx[found]] = g[found]
    out = out.reshape(ref.shape)
    for k, rev in enumerate(flip_r):
        if rev:
            out = np.flip(out, axis=k)
    gv = g[found]
    return GammaResult(
        gamma=np.ascontiguousarray(out),
        options=options,
        normalisation=norm,
        evaluated_points=int(found.sum()),
        passed_points=int(np.count_nonzero(gv <= 1.0)),
        gamma_mean=float(gv.mean(dtype=np.float64)) if gv.size else float("nan"),
        gamma_max=float(gv.max()) if gv.size else float("nan"),
        seconds=time.perf_counter() - started,
        stats={"points": len(flat_idx), "shared_points": shared_points, "jobs": len(jobs)},
    )
