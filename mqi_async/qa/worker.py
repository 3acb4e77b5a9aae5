"""Dose checks off the event loop: the requests the warm dose worker answers, and async clients.

The worker (`python -m mqi_async.dose --serve`, `mqi_async.tools.DoseWorker`) takes one JSON
request per line; `{"op": "gamma", ...}` is answered by `answer_gamma_request` with the
summary of CONTRACT.md (`mqi-async gamma --json`), `{"op": "delivery_check", ...}` by
`answer_delivery_request` with a delivery's verdict and numbers. Cancelling the awaiting task kills the
worker's process group, which stops the computation; memory stays bounded by the gamma's
chunks. This module imports no asyncio: `gamma_in_worker` awaits whatever worker it is given.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from mqi_async.domain.delivery_log import PositionCalibration
from mqi_async.domain.errors import (
    PermanentError,
)
from mqi_async.domain.verdict import Thresholds
from mqi_async.qa.client import DELIVERY_OP as DELIVERY_OP
from mqi_async.qa.client import GAMMA_OP as GAMMA_OP
from mqi_async.qa.client import Requester, ask_worker
from mqi_async.qa.compare import compare_files
from mqi_async.qa.delivery import DeliveryCheckError, DeliveryOptions, check_delivery
from mqi_async.qa.gamma import GammaInputError, GammaOptions


def gamma_request(
    reference: str | os.PathLike[str],
    evaluated: str | os.PathLike[str],
    options: GammaOptions,
    *,
    gamma_output: str | os.PathLike[str] | None = None,
) -> dict[str, object]:
    """The worker request for one gamma; `gamma_output` (.npy) receives the gamma map."""
    request: dict[str, object] = {
        "op": GAMMA_OP,
        "reference": str(reference),
        "evaluated": str(evaluated),
        "dose_percent": options.dose_percent,
        "distance_mm": options.distance_mm,
        "cutoff_percent": options.cutoff_percent,
        "local": options.local,
        "max_gamma": options.max_gamma,
        "interp_fraction": options.interp_fraction,
    }
    if gamma_output is not None:
        request["gamma_output"] = str(gamma_output)
    return request


def _options(request: Mapping[str, object]) -> GammaOptions:
    def num(key: str, default: float) -> float:
        value = request.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise GammaInputError(f"{key} must be a number, not {value!r}")
        return float(value)

    fraction = request.get("interp_fraction", 10)
    if isinstance(fraction, bool) or not isinstance(fraction, int):
        raise GammaInputError(f"interp_fraction must be an integer, not {fraction!r}")
    return GammaOptions(
        dose_percent=num("dose_percent", 3.0),
        distance_mm=num("distance_mm", 3.0),
        cutoff_percent=num("cutoff_percent", 10.0),
        local=bool(request.get("local", False)),
        max_gamma=num("max_gamma", 2.0),
        interp_fraction=fraction,
    )


def _paths(value: object) -> str | list[str]:
    """One file, or the files to sum."""
    if isinstance(value, list):
        return [str(v) for v in value]
    return str(value)


def answer_gamma_request(request: Mapping[str, object]) -> dict[str, object]:
    """Carry out one gamma request (in the worker); returns the summary.

    Raises:
        MqiError: dose_unreadable, frame_of_reference_mismatch, grids_do_not_overlap,
            unsupported_orientation, reference_dose_zero; internal_error for a bad request.
    """
    try:
        options = _options(request)
    except GammaInputError as exc:
        raise PermanentError("internal_error", f"bad gamma request: {exc}") from exc
    result = compare_files(_paths(request["reference"]), _paths(request["evaluated"]), options)
    summary = result.summary()
    target = request.get("gamma_output")
    if target:
        out = Path(str(target))
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, result.gamma)
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        summary["gamma_output"] = str(out)
    return summary


async def gamma_in_worker(
    worker: Requester,
    reference: str | os.PathLike[str],
    evaluated: str | os.PathLike[str],
    options: GammaOptions,
    *,
    gamma_output: str | os.PathLike[str] | None = None,
) -> dict[str, object]:
    """Run one gamma in `worker` (e.g. the service's DoseWorker) and return its summary.

    Raises the named failure the worker answered: PermanentError for the dose-check codes,
    TransientError (`gamma_failed`) when the worker itself failed.
    """
    request = gamma_request(reference, evaluated, options, gamma_output=gamma_output)
    return await ask_worker(worker, request, failure_code="gamma_failed")


# ------------------------------------------------------------------------ delivery checks


def delivery_options(request: Mapping[str, object]) -> DeliveryOptions:
    """The DeliveryOptions of a delivery request (`client.delivery_request`)."""

    def num(key: str) -> float:
        value = request.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise GammaInputError(f"{key} must be a number, not {value!r}")
        return float(value)

    calibration = request.get("calibration")
    if not isinstance(calibration, dict):
        raise GammaInputError("calibration must be an object")
    return DeliveryOptions(
        gamma=GammaOptions(
            dose_percent=num("dose_percent"),
            distance_mm=num("distance_mm"),
            cutoff_percent=num("cutoff_percent"),
            max_gamma=num("max_gamma"),
        ),
        thresholds=Thresholds(
            pass_percent=num("pass_percent"), conditional_percent=num("conditional_percent")
        ),
        calibration=PositionCalibration(**{k: float(v) for k, v in calibration.items()}),
        mu_per_count=num("mu_per_count"),
        grid_mm=num("grid_mm"),
        default_spot_fwhm_mm=num("default_spot_fwhm_mm"),
        position_tolerance_mm=num("position_tolerance_mm"),
        meterset_tolerance_percent=num("meterset_tolerance_percent"),
    )


def _write_json_atomically(target: Path, document: Mapping[str, object]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".part")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(document, fh, indent=1)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def answer_delivery_request(request: Mapping[str, object]) -> dict[str, object]:
    """Carry out one delivery check (in the worker); returns its summary.

    Raises:
        MqiError: the check's named code (ptn_unreadable, layer_count_mismatch, …) as a
            PermanentError; internal_error for a malformed request.
    """
    try:
        options = delivery_options(request)
        beam_number = request["beam_number"]
        if isinstance(beam_number, bool) or not isinstance(beam_number, int):
            raise GammaInputError(f"beam_number must be an integer, not {beam_number!r}")
    except (GammaInputError, KeyError, TypeError, ValueError) as exc:
        raise PermanentError("internal_error", f"bad delivery check request: {exc}") from exc
    room = request.get("room")
    try:
        check = check_delivery(
            str(request["folder"]),
            str(request["plan"]),
            beam_number,
            options,
            room=str(room) if room else None,
        )
    except DeliveryCheckError as exc:
        raise PermanentError(exc.code, exc.detail) from exc
    summary = check.summary()
    target = request.get("detail_output")
    if target:
        _write_json_atomically(Path(str(target)), check.to_json())
        summary["detail_output"] = str(target)
    return summary
