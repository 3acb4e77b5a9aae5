"""The report's pictures, as matplotlib figures (Agg): every axis in mm with units and legends."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.ticker import MaxNLocator
from numpy.typing import NDArray

from mqi_async.report.planes import Plane

#: A4 portrait, inches
PAGE = (8.27, 11.69)

VERDICT_COLOURS = {
    "passed": "#1a7f37",
    "conditional": "#b58a00",
    "failed": "#c62828",
    "error": "#c62828",
    "skipped": "#6e7781",
    "pending": "#6e7781",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportFigure:
    """One figure page, with the layer table and deviation lines that follow it (deliveries)."""

    title: str
    figure: Figure
    #: (header, rows)
    layers: tuple[tuple[str, ...], tuple[tuple[str, ...], ...]] | None = None
    deviations: tuple[str, ...] = ()


def _extent(h: NDArray[np.float64], v: NDArray[np.float64]) -> tuple[float, float, float, float]:
    dh = float(abs(h[1] - h[0])) / 2 if h.size > 1 else 0.5
    dv = float(abs(v[1] - v[0])) / 2 if v.size > 1 else 0.5
    return (float(h.min()) - dh, float(h.max()) + dh, float(v.min()) - dv, float(v.max()) + dv)


def _image(
    fig: Figure,
    ax: object,
    data: NDArray[np.float64],
    plane: Plane,
    style: Mapping[str, object],
    *,
    colorbar: bool = True,
    label: str | None = None,
) -> AxesImage:
    """One map with mm axes; its colour bar unless the row shares one."""
    from matplotlib.axes import Axes

    assert isinstance(ax, Axes)
    order_h = np.argsort(plane.h)
    order_v = np.argsort(plane.v)
    shown = np.asarray(data)[np.ix_(order_v, order_h)]
    im = ax.imshow(
        shown,
        origin="lower",
        extent=_extent(plane.h, plane.v),
        aspect="equal",
        **style,  # type: ignore[arg-type]
    )
    ax.set_xlabel(plane.h_label, fontsize=6)
    ax.set_ylabel(plane.v_label, fontsize=6)
    ax.tick_params(labelsize=5)
    ax.locator_params(nbins=4)
    if colorbar:
        _colorbar(fig, im, ax, label)
    return im


def _colorbar(fig: Figure, im: AxesImage, ax: object, label: object) -> None:
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)  # type: ignore[arg-type]
    bar.ax.tick_params(labelsize=5)
    bar.locator = MaxNLocator(5)
    bar.update_ticks()
    if isinstance(label, str):
        bar.set_label(label, fontsize=6)


def dose_figure(
    title: str,
    subtitle: str,
    planes: Sequence[Plane],
    *,
    reference_name: str,
    max_gamma: float,
    gamma_values: NDArray[np.float64] | None,
) -> Figure:
    """One beam (or the plan sum): reference, delivered, difference and gamma on three planes,
    and the gamma histogram."""
    fig = Figure(figsize=PAGE)
    fig.suptitle(title, fontsize=12, fontweight="bold", y=0.985)
    fig.text(0.5, 0.962, subtitle, ha="center", fontsize=8)
    grid = fig.add_gridspec(5, 3, left=0.08, right=0.95, top=0.94, bottom=0.05, hspace=0.45)
    top = max(float(np.nanmax(p.reference)) for p in planes) or 1.0
    # the difference in percent of the reference maximum, as the gamma's dose criterion is
    diffs = [100.0 * (p.evaluated - p.reference) / top for p in planes]
    diff_top = max(float(np.nanmax(np.abs(d))) if np.isfinite(d).any() else 0.0 for d in diffs)
    diff_top = max(diff_top, 0.1)
    rows: tuple[tuple[str, str, dict[str, object]], ...] = (
        (f"{reference_name} (Gy)", "reference", {"cmap": "jet", "vmin": 0, "vmax": top}),
        ("delivered (Gy)", "evaluated", {"cmap": "jet", "vmin": 0, "vmax": top}),
        (
            "delivered − reference (% of max)",
            "difference",
            {"cmap": "RdBu_r", "norm": TwoSlopeNorm(0.0, -diff_top, diff_top)},
        ),
    )
    for r, (label, which, style) in enumerate(rows):
        row_axes = []
        for c, plane in enumerate(planes):
            ax = fig.add_subplot(grid[r, c])
            data = {
                "reference": plane.reference,
                "evaluated": plane.evaluated,
                "difference": diffs[c],
            }[which]
            im = _image(fig, ax, data, plane, style, colorbar=False)
            ax.set_title(f"{label.split(' (')[0]} — {plane.name}, {plane.where}", fontsize=6)
            row_axes.append(ax)
        # one colour bar per row: its three planes share the scale
        _colorbar(fig, im, row_axes, label)
    gamma_axes = []
    gamma_image = None
    for c, plane in enumerate(planes):
        ax = fig.add_subplot(grid[3, c])
        gamma_axes.append(ax)
        if plane.gamma is None:
            ax.text(0.5, 0.5, "no gamma map", ha="center", va="center", fontsize=7)
            ax.set_axis_off()
            continue
        gmax = max(max_gamma, 1.01)
        gamma_image = _image(
            fig, ax, plane.gamma, plane,
            {"cmap": "coolwarm", "norm": TwoSlopeNorm(1.0, 0.0, gmax)}, colorbar=False,
        )  # fmt: skip
        ax.set_title(f"γ — {plane.name}, {plane.where}", fontsize=6)
    if gamma_image is not None:
        _colorbar(fig, gamma_image, gamma_axes, "γ (1 = criterion)")
    ax = fig.add_subplot(grid[4, :])
    gamma_histogram(ax, gamma_values, max_gamma)
    return fig


def gamma_histogram(ax: object, values: NDArray[np.float64] | None, max_gamma: float) -> None:
    from matplotlib.axes import Axes

    assert isinstance(ax, Axes)
    ax.set_title(
        "gamma histogram of the evaluated points (maps: blank below the dose cut-off)", fontsize=8
    )
    if values is None or not values.size:
        ax.text(0.5, 0.5, "no gamma map", ha="center", va="center", fontsize=7)
        ax.set_axis_off()
        return
    bins = np.linspace(0.0, max(max_gamma, 1.0), 41).tolist()
    passed = values[values <= 1.0]
    failed = values[values > 1.0]
    ax.hist(passed, bins=bins, color="#1a7f37", label=f"γ ≤ 1 ({passed.size:,} points)")
    ax.hist(failed, bins=bins, color="#c62828", label=f"γ > 1 ({failed.size:,} points)")
    ax.axvline(1.0, color="black", lw=0.8, ls="--", label="criterion γ = 1")
    ax.set_xlabel("γ (dimensionless)", fontsize=7)
    ax.set_ylabel("points", fontsize=7)
    ax.tick_params(labelsize=6)
    ax.legend(fontsize=6)


def _num(value: object) -> float:
    return (
        float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else np.nan
    )


def delivery_figure(
    title: str,
    subtitle: str,
    layers: Sequence[Mapping[str, object]],
    *,
    position_tolerance_mm: float,
    meterset_tolerance_percent: float,
    worst_layer: Mapping[str, object] | None,
) -> Figure:
    """One delivery: position and meterset deviations by layer, and the worst layer's 2-D gamma.

    `worst_layer`: layer, y, x (mm), planned, delivered (MU/mm²), gamma; None to leave it out.
    """
    fig = Figure(figsize=PAGE)
    fig.suptitle(title, fontsize=12, fontweight="bold", y=0.985)
    fig.text(0.5, 0.962, subtitle, ha="center", fontsize=8)
    grid = fig.add_gridspec(3, 3, left=0.09, right=0.95, top=0.93, bottom=0.06, hspace=0.45)
    n = np.array([_num(x.get("layer")) for x in layers])
    ax = fig.add_subplot(grid[0, :])
    ax.plot(n, [_num(x.get("mean_position_error_mm")) for x in layers], "o-", ms=3,
            label="mean spot position error (MU-weighted)")  # fmt: skip
    ax.plot(n, [_num(x.get("max_position_error_mm")) for x in layers], "s--", ms=3,
            label="largest spot position error")  # fmt: skip
    ax.axhline(position_tolerance_mm, color="#c62828", lw=0.8, ls=":",
               label=f"tolerance {position_tolerance_mm:g} mm (mean)")  # fmt: skip
    ax.set_xlabel("layer (delivery order)", fontsize=7)
    ax.set_ylabel("position error (mm)", fontsize=7)
    ax.set_title("spot position by layer", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=6)
    ax.legend(fontsize=6)
    ax = fig.add_subplot(grid[1, :])
    ax.bar(n, [_num(x.get("meterset_error_percent")) for x in layers], color="#4a6fa5",
           label="delivered − planned MU (% of planned)")  # fmt: skip
    for sign in (1, -1):
        ax.axhline(sign * meterset_tolerance_percent, color="#c62828", lw=0.8, ls=":",
                   label=f"±{meterset_tolerance_percent:g} % tolerance" if sign > 0 else None)  # fmt: skip
    missing = [int(v) for v, x in zip(n, layers, strict=True) if not x.get("delivered", True)]
    if missing:
        ax.scatter(missing, [0.0] * len(missing), marker="x", color="#c62828", zorder=3,
                   label="layer not delivered")  # fmt: skip
    ax.set_xlabel("layer (delivery order)", fontsize=7)
    ax.set_ylabel("meterset error (%)", fontsize=7)
    ax.set_title("meterset by layer", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=6)
    ax.legend(fontsize=6)
    if worst_layer is None:
        ax = fig.add_subplot(grid[2, :])
        ax.text(0.5, 0.5, "no layer fluence to show", ha="center", va="center", fontsize=8)
        ax.set_axis_off()
        return fig
    y = np.asarray(worst_layer["y"], dtype=np.float64)
    x = np.asarray(worst_layer["x"], dtype=np.float64)
    plane = Plane(
        name="layer", where="", h=x, v=y, h_label="x (mm, isocentre plane)",
        v_label="y (mm)", reference=np.zeros((y.size, x.size)),
        evaluated=np.zeros((y.size, x.size)), gamma=None,
    )  # fmt: skip
    planned = np.asarray(worst_layer["planned"], dtype=np.float64)
    delivered = np.asarray(worst_layer["delivered"], dtype=np.float64)
    gamma = np.asarray(worst_layer["gamma"], dtype=np.float64)
    top = float(max(planned.max(initial=0.0), delivered.max(initial=0.0))) or 1.0
    which = worst_layer["layer"]
    maps_row = grid[2, :].subgridspec(1, 3, wspace=0.75)
    for c, (label, data, style) in enumerate(
        (
            ("planned fluence (MU/mm²)", planned, {"cmap": "viridis", "vmin": 0, "vmax": top}),
            ("delivered fluence (MU/mm²)", delivered, {"cmap": "viridis", "vmin": 0, "vmax": top}),
            ("γ (1 = criterion)", gamma, {"cmap": "coolwarm", "norm": TwoSlopeNorm(1.0, 0.0, 2.0)}),
        )
    ):
        ax = fig.add_subplot(maps_row[0, c])
        _image(fig, ax, data, plane, style, label=label)
        ax.set_title(f"layer {which} (lowest γ pass rate): {label.split(' (')[0]}", fontsize=6)
    return fig
