"""The config's check criteria as the plain numbers the QA worker and the report read."""

from __future__ import annotations

from typing import Literal

from mqi_async.config import QaSettings

#: the delivery gamma's cap: a gamma above it is reported as it (and the search stops there)
DELIVERY_MAX_GAMMA = 2.0

Room = Literal["G1", "G2"]


def room_key(room: str | None) -> Room:
    """The calibration room of a case (G2 unless it is G1)."""
    return "G1" if room == "G1" else "G2"


def delivery_criteria(qa: QaSettings, room: str | None) -> dict[str, float]:
    """qa.delivery_gamma, the thresholds and qa.delivery's numbers for one room."""
    d = qa.delivery
    key = room_key(room)
    return {
        "dose_percent": qa.delivery_gamma.dose_percent,
        "distance_mm": qa.delivery_gamma.distance_mm,
        "cutoff_percent": qa.delivery_gamma.cutoff_percent,
        "max_gamma": DELIVERY_MAX_GAMMA,
        "pass_percent": qa.pass_percent,
        "conditional_percent": qa.conditional_percent,
        "mu_per_count": d.mu_per_count[key],
        "grid_mm": d.grid_mm,
        "default_spot_fwhm_mm": d.default_spot_fwhm_mm,
        "position_tolerance_mm": d.position_tolerance_mm,
        "meterset_tolerance_percent": d.meterset_tolerance_percent,
    }


def delivery_calibration(qa: QaSettings, room: str | None) -> dict[str, float]:
    """The room's default scv_init calibration (a case's own file wins)."""
    return {k: float(v) for k, v in qa.delivery.calibration[room_key(room)].model_dump().items()}
