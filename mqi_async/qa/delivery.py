"""The delivery check: one delivery's spot record against the plan, layer by layer.

For every energy layer the planned spots (MU at the plan's positions) and the delivered beam-on
samples (dose monitor counts x monitor range factor x MU per count, at the calibrated
positions) become two 2-D fluence maps on one grid, each spot or sample spread by the plan's
spot size (a Gaussian of the ScanningSpotSize FWHM). The delivered map is compared with the
planned one by a global 2-D gamma (the gamma engine of `qa.gamma`, normalised to the layer's
planned maximum). Beside the gamma: the meterset of each layer, the position of each spot
(the MU-weighted centroid of the samples nearest to it against its planned place), the layer
energies of PlanRange.txt, and layers that are missing, extra or delivered in another order.
The delivery's numbers are point-weighted over its layers, as the clinic's PTN checker does.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from mqi_async.domain.delivery_log import (
    DeliveryLogError,
    PlanRangeRow,
    PositionCalibration,
    parse_plan_range,
    parse_scv_init,
    ptn_layer_number,
    range_factor,
    scv_init_name,
)
from mqi_async.domain.errors import IngestError
from mqi_async.domain.fractions import parse_planinfo
from mqi_async.domain.verdict import QaStatus, Thresholds, classify, worst
from mqi_async.qa.gamma import GammaOptions, gamma
from mqi_async.qa.plan_layers import PlanLayersError, PlannedLayer, read_planned_layers
from mqi_async.qa.ptn import PtnFormatError, PtnRecord, read_ptn

_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
#: a spot is judged for position only when at least this share of its MU arrived near it
_SPOT_JUDGED_SHARE = 0.1
#: the grid never reaches further than this from the planned field's centre (mm)
_MAX_HALF_FIELD_MM = 250.0
_NEAREST_CHUNK = 4096
#: findings that fail a delivery whatever its gamma: a planned layer got no dose, or a layer
#: delivered another layer's spots
FAILING_DEVIATIONS = frozenset({"missing_layers", "layer_order"})


class DeliveryCheckError(Exception):
    """The check cannot be computed: `code` names why (ptn_unreadable, layer_count_mismatch, …)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryOptions:
    """How one delivery is judged (qa.delivery_gamma, qa.delivery, the verdict thresholds)."""

    gamma: GammaOptions = field(
        default_factory=lambda: GammaOptions(dose_percent=2.0, distance_mm=2.0, cutoff_percent=10.0)
    )
    thresholds: Thresholds = field(default_factory=Thresholds)
    #: the room's calibration where the case ships no scv_init file
    calibration: PositionCalibration
    mu_per_count: float
    grid_mm: float = 1.0
    #: spot FWHM where the plan gives no ScanningSpotSize
    default_spot_fwhm_mm: float = 8.0
    #: a layer whose MU-weighted mean spot position error exceeds this is named
    position_tolerance_mm: float = 1.0
    #: a layer (or the whole delivery) whose meterset differs more than this is named
    meterset_tolerance_percent: float = 2.0
    energy_tolerance_mev: float = 0.1


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerCheck:
    """One layer's numbers; `delivered` is False for a planned layer without a record."""

    layer: int
    energy_mev: float
    delivered: bool
    samples: int
    planned_mu: float
    delivered_mu: float
    meterset_error_percent: float | None
    mean_position_error_mm: float | None
    max_position_error_mm: float | None
    evaluated_points: int
    passed_points: int
    gamma_mean: float | None
    gamma_max: float | None
    recorded_energy_mev: float | None = None

    @property
    def pass_rate_percent(self) -> float | None:
        if not self.evaluated_points:
            return None
        return 100.0 * self.passed_points / self.evaluated_points

    def to_json(self) -> dict[str, object]:
        return {
            "layer": self.layer,
            "energy_mev": self.energy_mev,
            "recorded_energy_mev": self.recorded_energy_mev,
            "delivered": self.delivered,
            "samples": self.samples,
            "planned_mu": _round(self.planned_mu, 6),
            "delivered_mu": _round(self.delivered_mu, 6),
            "meterset_error_percent": _round(self.meterset_error_percent, 2),
            "mean_position_error_mm": _round(self.mean_position_error_mm, 3),
            "max_position_error_mm": _round(self.max_position_error_mm, 3),
            "evaluated_points": self.evaluated_points,
            "pass_rate_percent": _round(self.pass_rate_percent, 2),
            "gamma_mean": _round(self.gamma_mean, 4),
            "gamma_max": _round(self.gamma_max, 4),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Deviation:
    """A named finding: `code` (missing_layers, position_deviation, …), the layers, a sentence."""

    code: str
    layers: tuple[int, ...]
    detail: str

    def to_json(self) -> dict[str, object]:
        return {"code": self.code, "layers": list(self.layers), "detail": self.detail}


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryCheck:
    """The verdict of one delivery and the layer table behind it."""

    status: QaStatus
    layers: tuple[LayerCheck, ...]
    deviations: tuple[Deviation, ...]
    planned_mu: float
    delivered_mu: float
    seconds: float
    criteria: dict[str, float]
    calibration_source: str

    @property
    def evaluated_points(self) -> int:
        return sum(layer.evaluated_points for layer in self.layers)

    @property
    def pass_rate_percent(self) -> float | None:
        n = self.evaluated_points
        return 100.0 * sum(layer.passed_points for layer in self.layers) / n if n else None

    @property
    def gamma_mean(self) -> float | None:
        n = self.evaluated_points
        if not n:
            return None
        return sum((layer.gamma_mean or 0.0) * layer.evaluated_points for layer in self.layers) / n

    @property
    def gamma_max(self) -> float | None:
        values = [layer.gamma_max for layer in self.layers if layer.gamma_max is not None]
        return max(values) if values else None

    @property
    def meterset_error_percent(self) -> float | None:
        if self.planned_mu <= 0:
            return None
        return 100.0 * (self.delivered_mu - self.planned_mu) / self.planned_mu

    @property
    def max_position_error_mm(self) -> float | None:
        values = [
            x.max_position_error_mm for x in self.layers if x.max_position_error_mm is not None
        ]
        return max(values) if values else None

    @property
    def mean_position_error_mm(self) -> float | None:
        judged = [x for x in self.layers if x.mean_position_error_mm is not None]
        weight = sum(x.planned_mu for x in judged)
        if not judged or weight <= 0:
            return None
        return sum((x.mean_position_error_mm or 0.0) * x.planned_mu for x in judged) / weight

    def summary(self) -> dict[str, object]:
        """The numbers `status --json` shows for a delivery, plus the deviations."""
        return {
            "qa_status": str(self.status),
            "pass_rate_percent": _round(self.pass_rate_percent, 2),
            "gamma_mean": _round(self.gamma_mean, 4),
            "gamma_max": _round(self.gamma_max, 4),
            "evaluated_points": self.evaluated_points,
            "max_position_error_mm": _round(self.max_position_error_mm, 3),
            "mean_position_error_mm": _round(self.mean_position_error_mm, 3),
            "meterset_error_percent": _round(self.meterset_error_percent, 2),
            "planned_mu": _round(self.planned_mu, 6),
            "delivered_mu": _round(self.delivered_mu, 6),
            "deviations": [d.to_json() for d in self.deviations],
            "seconds": round(self.seconds, 3),
        }

    def to_json(self) -> dict[str, object]:
        """Everything: the summary, the criteria, the calibration used and the layer table."""
        return {
            **self.summary(),
            "criteria": dict(self.criteria),
            "calibration_source": self.calibration_source,
            "layers": [layer.to_json() for layer in self.layers],
        }


def _round(value: float | None, digits: int) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, digits) + 0.0  # never -0.0


# ------------------------------------------------------------------------- reading a folder


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryRecord:
    """What a delivery folder holds, read and decoded."""

    #: layer number -> its record
    records: dict[int, PtnRecord]
    plan_range: dict[int, PlanRangeRow]
    start_layer: int | None
    stop_layer: int | None
    calibration: PositionCalibration
    calibration_source: str


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", "replace")


def _calibration(
    folder: Path, room: str | None, default: PositionCalibration
) -> tuple[PositionCalibration, str]:
    names = [scv_init_name(room)] if room else []
    names += [n for n in ("scv_init_G1.txt", "scv_init_G2.txt") if n not in names]
    # the room's file in the delivery folder, then in the case folder; only the room's own
    for place in (folder, folder.parent):
        candidate = place / names[0] if names else None
        if candidate is not None and candidate.is_file():
            try:
                return parse_scv_init(_read_text(candidate)), str(candidate)
            except (DeliveryLogError, OSError) as exc:
                raise DeliveryCheckError("calibration_invalid", f"{candidate}: {exc}") from exc
    return default, f"default for room {room}" if room else "default"


def read_delivery_folder(
    folder: str | os.PathLike[str], *, room: str | None, default_calibration: PositionCalibration
) -> DeliveryRecord:
    """Read a delivery folder's records, PlanRange and PlanInfo layer range.

    Raises:
        DeliveryCheckError: ptn_missing, ptn_unreadable, planrange_invalid, calibration_invalid.
    """
    path = Path(folder)
    calibration, source = _calibration(path, room, default_calibration)
    plan_range: dict[int, PlanRangeRow] = {}
    for name in ("PlanRange.txt", "PlanRange.csv"):
        candidate = path / name
        if candidate.is_file():
            try:
                plan_range = parse_plan_range(_read_text(candidate))
            except DeliveryLogError as exc:
                raise DeliveryCheckError("planrange_invalid", f"{candidate}: {exc}") from exc
            break
    start = stop = None
    info = path / "PlanInfo.txt"
    if info.is_file():
        try:
            planinfo = parse_planinfo(info.read_bytes())
            start, stop = planinfo.start_layer_number, planinfo.stop_layer_number
        except IngestError:
            pass  # ingest already judged the PlanInfo; the layer range is only a hint here
    ptn_files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".ptn" and p.is_file())
    if not ptn_files:
        raise DeliveryCheckError("ptn_missing", f"{path} holds no .ptn record")
    records: dict[int, PtnRecord] = {}
    for order, ptn in enumerate(ptn_files, start=1):
        try:
            record = read_ptn(ptn.read_bytes(), calibration)
        except PtnFormatError as exc:
            raise DeliveryCheckError("ptn_unreadable", f"{ptn.name}: {exc}") from exc
        number = ptn_layer_number(ptn.name) or record.layer_no or order
        if number in records:
            raise DeliveryCheckError(
                "ptn_unreadable", f"{ptn.name}: a second record for layer {number}"
            )
        records[number] = record
    return DeliveryRecord(
        records=records,
        plan_range=plan_range,
        start_layer=start,
        stop_layer=stop,
        calibration=calibration,
        calibration_source=source,
    )


# ------------------------------------------------------------------------------ the maps


@dataclass(frozen=True, slots=True)
class _Grid:
    y: NDArray[np.float64]
    x: NDArray[np.float64]


def _axis(lo: float, hi: float, step: float) -> NDArray[np.float64]:
    n = max(2, int(math.ceil((hi - lo) / step)) + 1)
    return lo + step * np.arange(n, dtype=np.float64)


def _layer_grid(
    planned: PlannedLayer, xs: NDArray[np.float64], ys: NDArray[np.float64], pad: float, step: float
) -> _Grid:
    cx, cy = float(np.mean(planned.x_mm)), float(np.mean(planned.y_mm))
    all_x = np.concatenate([planned.x_mm, xs])
    all_y = np.concatenate([planned.y_mm, ys])
    lo_x = max(float(all_x.min()) - pad, cx - _MAX_HALF_FIELD_MM)
    hi_x = min(float(all_x.max()) + pad, cx + _MAX_HALF_FIELD_MM)
    lo_y = max(float(all_y.min()) - pad, cy - _MAX_HALF_FIELD_MM)
    hi_y = min(float(all_y.max()) + pad, cy + _MAX_HALF_FIELD_MM)
    return _Grid(y=_axis(lo_y, hi_y, step), x=_axis(lo_x, hi_x, step))


#: points are first shared over a grid this many times finer than the map's (bilinear), so
#: the sharing blurs by far less than the spot size (about 0.1 % of the peak at 1 mm, 6 mm FWHM)
_FINE = 4


def _deposit(
    y_axis: NDArray[np.float64],
    x_axis: NDArray[np.float64],
    xs: NDArray[np.float64],
    ys: NDArray[np.float64],
    w: NDArray[np.float64],
) -> NDArray[np.float64]:
    """Point weights shared bilinearly onto the nodes of a grid (weights off it are dropped)."""
    ny, nx = y_axis.size, x_axis.size
    fx = (xs - x_axis[0]) / (x_axis[1] - x_axis[0])
    fy = (ys - y_axis[0]) / (y_axis[1] - y_axis[0])
    inside = (fx >= 0) & (fx <= nx - 1) & (fy >= 0) & (fy <= ny - 1)
    fx, fy, w = fx[inside], fy[inside], w[inside]
    ix = np.minimum(np.floor(fx).astype(np.int64), nx - 2)
    iy = np.minimum(np.floor(fy).astype(np.int64), ny - 2)
    tx, ty = fx - ix, fy - iy
    flat = np.zeros(ny * nx, dtype=np.float64)
    for dy, wy in ((0, 1.0 - ty), (1, ty)):
        for dx, wx in ((0, 1.0 - tx), (1, tx)):
            flat += np.bincount((iy + dy) * nx + (ix + dx), weights=w * wy * wx, minlength=ny * nx)
    return flat.reshape(ny, nx)


def _fine_axis(axis: NDArray[np.float64]) -> NDArray[np.float64]:
    step = float(axis[1] - axis[0]) / _FINE
    fine: NDArray[np.float64] = float(axis[0]) + step * np.arange(
        _FINE * (axis.size - 1) + 1, dtype=np.float64
    )
    return fine


def _gauss_matrix(
    rows: NDArray[np.float64], cols: NDArray[np.float64], sigma: float
) -> NDArray[np.float64]:
    d = rows[:, None] - cols[None, :]
    return np.exp(-0.5 * (d / sigma) ** 2) / (sigma * math.sqrt(2.0 * math.pi))


def _fluence(
    grid: _Grid,
    xs: NDArray[np.float64],
    ys: NDArray[np.float64],
    w: NDArray[np.float64],
    sigma: tuple[float, float],
) -> NDArray[np.float64]:
    """MU per mm² on the grid: every point's MU spread by a Gaussian of the spot's size."""
    fine_y, fine_x = _fine_axis(grid.y), _fine_axis(grid.x)
    nodes = _deposit(fine_y, fine_x, xs, ys, w)
    return (
        _gauss_matrix(grid.y, fine_y, sigma[1]) @ nodes @ _gauss_matrix(grid.x, fine_x, sigma[0]).T
    )


def _nearest_spot(
    spots_x: NDArray[np.float64],
    spots_y: NDArray[np.float64],
    xs: NDArray[np.float64],
    ys: NDArray[np.float64],
) -> NDArray[np.intp]:
    out = np.empty(xs.size, dtype=np.intp)
    for s in range(0, xs.size, _NEAREST_CHUNK):
        dx = xs[s : s + _NEAREST_CHUNK, None] - spots_x[None, :]
        dy = ys[s : s + _NEAREST_CHUNK, None] - spots_y[None, :]
        out[s : s + _NEAREST_CHUNK] = np.argmin(dx * dx + dy * dy, axis=1)
    return out


def _position_errors(
    planned: PlannedLayer, xs: NDArray[np.float64], ys: NDArray[np.float64], mu: NDArray[np.float64]
) -> tuple[float | None, float | None]:
    """MU-weighted mean and max distance of each spot's delivered centroid from its plan.

    Samples are matched to the nearest planned spot after the layer's rigid offset (the
    difference of the MU-weighted centroids) is taken out, so a whole layer moved by more
    than half the spot spacing is still matched spot for spot; the distance itself is measured
    where the samples really are.
    """
    if not xs.size or not planned.mu.size or mu.sum() <= 0:
        return None, None
    dx = float(np.sum(mu * xs) / mu.sum() - np.sum(planned.mu * planned.x_mm) / planned.total_mu)
    dy = float(np.sum(mu * ys) / mu.sum() - np.sum(planned.mu * planned.y_mm) / planned.total_mu)
    nearest = _nearest_spot(planned.x_mm, planned.y_mm, xs - dx, ys - dy)
    n = planned.mu.size
    got = np.bincount(nearest, weights=mu, minlength=n)
    judged = got >= _SPOT_JUDGED_SHARE * planned.mu
    if not judged.any():
        return None, None
    cx = np.bincount(nearest, weights=mu * xs, minlength=n)[judged] / got[judged]
    cy = np.bincount(nearest, weights=mu * ys, minlength=n)[judged] / got[judged]
    err = np.hypot(cx - planned.x_mm[judged], cy - planned.y_mm[judged])
    weights = planned.mu[judged]
    return float(np.sum(err * weights) / np.sum(weights)), float(err.max())


# ----------------------------------------------------------------------------- the check


@dataclass(frozen=True, slots=True)
class _Delivered:
    x: NDArray[np.float64]
    y: NDArray[np.float64]
    mu: NDArray[np.float64]
    samples: int


def _delivered(
    record: PtnRecord | None, row: PlanRangeRow | None, mu_per_count: float
) -> _Delivered:
    if record is None:
        empty = np.zeros(0, dtype=np.float64)
        return _Delivered(empty, empty, empty, 0)
    factor, _known = range_factor(row.dose1_range if row is not None else None)
    mu = record.dose1 * factor * mu_per_count
    dosed = mu > 0
    return _Delivered(record.x_mm[dosed], record.y_mm[dosed], mu[dosed], record.samples)


def _sigma(planned: PlannedLayer, options: DeliveryOptions) -> tuple[float, float]:
    fwhm = planned.spot_fwhm_mm or (options.default_spot_fwhm_mm, options.default_spot_fwhm_mm)
    return (
        max(fwhm[0], options.grid_mm) / _FWHM_PER_SIGMA,
        max(fwhm[1], options.grid_mm) / _FWHM_PER_SIGMA,
    )


@dataclass(frozen=True, slots=True)
class LayerMaps:
    """A layer's planned and delivered fluence (MU/mm²) on its grid, and its gamma map."""

    y_mm: NDArray[np.float64]
    x_mm: NDArray[np.float64]
    planned: NDArray[np.float64]
    delivered: NDArray[np.float64]
    gamma: NDArray[np.float32]


def layer_maps(
    planned: PlannedLayer, delivered: _Delivered, options: DeliveryOptions
) -> tuple[_Grid, NDArray[np.float64], NDArray[np.float64]]:
    """A layer's grid (wide enough for the gamma's search) and its two fluence maps."""
    sigma = _sigma(planned, options)
    g = options.gamma
    pad = 3.0 * max(sigma) + g.distance_mm * g.max_gamma
    grid = _layer_grid(planned, delivered.x, delivered.y, pad, options.grid_mm)
    plan_map = _fluence(grid, planned.x_mm, planned.y_mm, planned.mu, sigma)
    dose_map = _fluence(grid, delivered.x, delivered.y, delivered.mu, sigma)
    return grid, plan_map, dose_map


def tiled_gamma(
    maps: Sequence[tuple[NDArray[np.float64], NDArray[np.float64]]], options: DeliveryOptions
) -> list[NDArray[np.float32]]:
    """The global 2-D gamma of every layer, each normalised to its own planned maximum.

    One call of the gamma engine for all layers: each layer's maps, divided by the layer's
    planned maximum, are tiles of one image, side by side with a gap wider than the search
    radius (so no search reaches another tile); with normalisation 1 the cutoff and the dose
    criterion are then per layer, exactly as one gamma per layer, without its per-call set-up.
    """
    g = options.gamma
    step = options.grid_mm
    gap = int(math.ceil(g.distance_mm * g.max_gamma / step)) + 2
    height = max(plan.shape[0] for plan, _ in maps)
    width = sum(plan.shape[1] for plan, _ in maps) + gap * (len(maps) + 1)
    ref = np.zeros((height, width), dtype=np.float64)
    ev = np.zeros((height, width), dtype=np.float64)
    columns: list[tuple[int, int, int]] = []
    col = gap
    for plan, dose in maps:
        ny, nx = plan.shape
        top = float(plan.max())
        scale = 1.0 / top if top > 0 else 0.0
        ref[:ny, col : col + nx] = plan * scale
        ev[:ny, col : col + nx] = dose * scale
        columns.append((col, ny, nx))
        col += nx + gap
    options_1 = GammaOptions(
        dose_percent=g.dose_percent,
        distance_mm=g.distance_mm,
        cutoff_percent=g.cutoff_percent,
        local=g.local,
        max_gamma=g.max_gamma,
        interp_fraction=g.interp_fraction,
        normalisation=1.0,
    )
    axes = [step * np.arange(height, dtype=np.float64), step * np.arange(width, dtype=np.float64)]
    result = gamma(axes, ref, axes, ev, options_1, threads=1)
    return [result.gamma[:ny, c : c + nx] for c, ny, nx in columns]


def _layer_check(
    number: int,
    planned: PlannedLayer,
    delivered: _Delivered,
    gamma_map: NDArray[np.float32],
    *,
    recorded_energy_mev: float | None,
    delivered_flag: bool,
    max_gamma: float,
) -> LayerCheck:
    mean_err, max_err = _position_errors(planned, delivered.x, delivered.y, delivered.mu)
    values = gamma_map[np.isfinite(gamma_map)]
    planned_mu = planned.total_mu
    delivered_mu = float(delivered.mu.sum())
    return LayerCheck(
        layer=number,
        energy_mev=planned.energy_mev,
        recorded_energy_mev=recorded_energy_mev,
        delivered=delivered_flag,
        samples=delivered.samples,
        planned_mu=planned_mu,
        delivered_mu=delivered_mu,
        meterset_error_percent=(
            100.0 * (delivered_mu - planned_mu) / planned_mu if planned_mu > 0 else None
        ),
        mean_position_error_mm=mean_err,
        max_position_error_mm=max_err,
        evaluated_points=int(values.size),
        passed_points=int(np.count_nonzero(values <= 1.0)),
        gamma_mean=float(values.mean()) if values.size else None,
        gamma_max=min(float(values.max()), max_gamma) if values.size else None,
    )


def _layers_text(layers: Sequence[int]) -> str:
    return ", ".join(str(n) for n in layers)


def _pattern_fits(got: _Delivered, layer: PlannedLayer, tolerance_mm: float) -> bool:
    """The samples lie on the layer's spots and reach (nearly) all of its MU's spots."""
    if not got.mu.size or layer.total_mu <= 0:
        return False
    nearest = _nearest_spot(layer.x_mm, layer.y_mm, got.x, got.y)
    reached = np.bincount(nearest, weights=got.mu, minlength=layer.mu.size)
    covered = float(layer.mu[reached >= _SPOT_JUDGED_SHARE * layer.mu].sum())
    mean_err, _ = _position_errors(layer, got.x, got.y, got.mu)
    return (
        covered >= (1.0 - _SPOT_JUDGED_SHARE) * layer.total_mu
        and mean_err is not None
        and mean_err <= tolerance_mm
    )


def _order_swaps(
    failing: Sequence[int],
    planned: dict[int, PlannedLayer],
    delivered: dict[int, _Delivered],
    options: DeliveryOptions,
) -> list[tuple[int, int]]:
    """(delivered layer, planned layer it matches instead) for failing layers.

    Only a layer whose spot pattern does not fit its own plan is considered (a pattern that
    fits but with the wrong MU is a meterset deviation); it matches another layer whose spot
    pattern it fits and whose meterset it delivers within the meterset tolerance.
    """
    tol_mm = options.position_tolerance_mm
    swaps: list[tuple[int, int]] = []
    for k in failing:
        got = delivered.get(k)
        if got is None or not got.mu.size or _pattern_fits(got, planned[k], tol_mm):
            continue
        total = float(got.mu.sum())
        for j, other in planned.items():
            if j == k or other.total_mu <= 0:
                continue
            metered = abs(total / other.total_mu - 1.0) * 100.0
            if metered <= options.meterset_tolerance_percent and _pattern_fits(got, other, tol_mm):
                swaps.append((k, j))
                break
    return swaps


def check_delivery(
    folder: str | os.PathLike[str],
    plan_path: str | os.PathLike[str],
    beam_number: int,
    options: DeliveryOptions,
    *,
    room: str | None = None,
    on_layer: Callable[[LayerCheck, LayerMaps], None] | None = None,
) -> DeliveryCheck:
    """Judge one delivery folder against beam `beam_number` of the plan.

    Raises:
        DeliveryCheckError: the check cannot be computed (named code and a sentence).
    """
    started = time.perf_counter()
    try:
        layers = read_planned_layers(plan_path, beam_number)
    except PlanLayersError as exc:
        raise DeliveryCheckError("delivery_plan_unreadable", str(exc)) from exc
    if not layers:
        raise DeliveryCheckError(
            "delivery_plan_unreadable", f"beam {beam_number} of the plan has no spots"
        )
    record = read_delivery_folder(folder, room=room, default_calibration=options.calibration)
    planned = dict(enumerate(layers, start=1))
    extra = sorted(set(record.records) - set(planned))
    if extra:
        raise DeliveryCheckError(
            "layer_count_mismatch",
            f"the record holds layer(s) {_layers_text(extra)} but beam {beam_number} of the plan"
            f" has {len(planned)} layers",
        )
    first = max(1, record.start_layer or 1)
    last = min(len(planned), record.stop_layer or len(planned))
    expected = [n for n in planned if first <= n <= last] or list(planned)
    delivered = {
        n: _delivered(record.records.get(n), record.plan_range.get(n), options.mu_per_count)
        for n in expected
    }
    grids_and_maps = [layer_maps(planned[n], delivered[n], options) for n in expected]
    gammas = tiled_gamma([(p, d) for _, p, d in grids_and_maps], options)
    checks: list[LayerCheck] = []
    for n, (grid, plan_map, dose_map), gamma_map in zip(
        expected, grids_and_maps, gammas, strict=True
    ):
        row = record.plan_range.get(n)
        layer = _layer_check(
            n,
            planned[n],
            delivered[n],
            gamma_map,
            recorded_energy_mev=row.energy_mev if row is not None else None,
            delivered_flag=n in record.records,
            max_gamma=options.gamma.max_gamma,
        )
        checks.append(layer)
        if on_layer is not None:
            on_layer(layer, LayerMaps(grid.y, grid.x, plan_map, dose_map, gamma_map))
    deviations = _deviations(checks, planned, delivered, record, expected, options)
    planned_mu = sum(planned[n].total_mu for n in expected)
    delivered_mu = sum(float(delivered[n].mu.sum()) for n in expected)
    evaluated = sum(c.evaluated_points for c in checks)
    rate = 100.0 * sum(c.passed_points for c in checks) / evaluated if evaluated else math.nan
    g = options.gamma
    status = classify(rate, options.thresholds)
    if any(d.code in FAILING_DEVIATIONS for d in deviations):
        status = worst((status, QaStatus.FAILED))
    return DeliveryCheck(
        status=status,
        layers=tuple(checks),
        deviations=tuple(deviations),
        planned_mu=planned_mu,
        delivered_mu=delivered_mu,
        seconds=time.perf_counter() - started,
        criteria={
            "dose_percent": float(g.dose_percent),
            "distance_mm": float(g.distance_mm),
            "cutoff_percent": float(g.cutoff_percent),
            "max_gamma": float(g.max_gamma),
            "grid_mm": float(options.grid_mm),
            "pass_percent": float(options.thresholds.pass_percent),
            "conditional_percent": float(options.thresholds.conditional_percent),
            "mu_per_count": float(options.mu_per_count),
        },
        calibration_source=record.calibration_source,
    )


def _deviations(
    checks: Sequence[LayerCheck],
    planned: dict[int, PlannedLayer],
    delivered: dict[int, _Delivered],
    record: DeliveryRecord,
    expected: Sequence[int],
    options: DeliveryOptions,
) -> list[Deviation]:
    out: list[Deviation] = []
    missing = [c.layer for c in checks if not c.delivered or c.delivered_mu <= 0]
    if missing:
        out.append(
            Deviation(
                code="missing_layers",
                layers=tuple(missing),
                detail=f"no delivered dose for layer(s) {_layers_text(missing)}",
            )
        )
    if len(expected) < len(planned):
        out.append(
            Deviation(
                code="partial_delivery",
                layers=tuple(expected),
                detail=(
                    f"PlanInfo.txt delivers layers {expected[0]}-{expected[-1]}"
                    f" of {len(planned)}; only those are judged"
                ),
            )
        )
    tol = options.meterset_tolerance_percent
    off = [
        c
        for c in checks
        if c.layer not in missing
        and c.meterset_error_percent is not None
        and abs(c.meterset_error_percent) > tol
    ]
    if off:
        worst = max(off, key=lambda c: abs(c.meterset_error_percent or 0.0))
        out.append(
            Deviation(
                code="meterset_deviation",
                layers=tuple(c.layer for c in off),
                detail=(
                    f"{len(off)} layer(s) off by more than {tol:g} %; worst layer {worst.layer}:"
                    f" {worst.meterset_error_percent:+.1f} %"
                ),
            )
        )
    moved = [
        c
        for c in checks
        if c.mean_position_error_mm is not None
        and c.mean_position_error_mm > options.position_tolerance_mm
    ]
    if moved:
        worst = max(moved, key=lambda c: c.mean_position_error_mm or 0.0)
        out.append(
            Deviation(
                code="position_deviation",
                layers=tuple(c.layer for c in moved),
                detail=(
                    f"spots of {len(moved)} layer(s) lie more than"
                    f" {options.position_tolerance_mm:g} mm from the plan on average; worst"
                    f" layer {worst.layer}: {worst.mean_position_error_mm:.2f} mm"
                ),
            )
        )
    wrong_energy = [
        c
        for c in checks
        if c.recorded_energy_mev is not None
        and abs(c.recorded_energy_mev - c.energy_mev) > options.energy_tolerance_mev
    ]
    if wrong_energy:
        shown = ", ".join(
            f"{c.layer} ({c.recorded_energy_mev:g} MeV, planned {c.energy_mev:g})"
            for c in wrong_energy[:5]
        )
        out.append(
            Deviation(
                code="energy_mismatch",
                layers=tuple(c.layer for c in wrong_energy),
                detail=f"PlanRange.txt records other energies for layer(s) {shown}",
            )
        )
    failing = [
        c.layer
        for c in checks
        if c.pass_rate_percent is not None
        and c.pass_rate_percent < options.thresholds.pass_percent
        and c.layer not in missing
    ]
    swaps = _order_swaps(failing, planned, delivered, options)
    if swaps:
        out.append(
            Deviation(
                code="layer_order",
                layers=tuple(k for k, _ in swaps),
                detail="; ".join(
                    f"delivered layer {k} matches planned layer {j}" for k, j in swaps
                ),
            )
        )
    unknown = sorted(
        {
            row.dose1_range
            for n, row in record.plan_range.items()
            if n in expected
            and row.dose1_range is not None
            and not range_factor(row.dose1_range)[1]
        }
    )
    if unknown:
        out.append(
            Deviation(
                code="unknown_monitor_range",
                layers=(),
                detail=f"DOSE1_RANGE code(s) {unknown} are unknown; factor 1.0 was used",
            )
        )
    return out
