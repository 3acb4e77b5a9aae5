"""The service's side of the checks in the warm worker: requests as plain JSON, and answers.

Imports neither numpy nor pydicom, so the service process stays light; the worker
(`mqi_async.qa.worker.answer_delivery_request`) does the numerics.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Protocol

from mqi_async.domain.errors import (
    FailureKind,
    MqiError,
    PermanentError,
    TransientError,
    failure_info,
)

DELIVERY_OP = "delivery_check"
GAMMA_OP = "gamma"


class Requester(Protocol):
    """What a check needs of a worker: one JSON-able request in, one answer out."""

    async def request(self, payload: Mapping[str, object]) -> dict[str, object]: ...


def delivery_request(
    *,
    folder: str | os.PathLike[str],
    plan: str | os.PathLike[str],
    beam_number: int,
    room: str | None,
    criteria: Mapping[str, float],
    calibration: Mapping[str, float],
    detail_output: str | os.PathLike[str] | None = None,
) -> dict[str, object]:
    """The worker request for one delivery check.

    `criteria`: dose_percent, distance_mm, cutoff_percent, max_gamma, pass_percent,
    conditional_percent, mu_per_count, grid_mm, default_spot_fwhm_mm, position_tolerance_mm,
    meterset_tolerance_percent; `calibration`: x_offset, y_offset, x_gain_mm, y_gain_mm,
    time_gain_ms. `detail_output` (.json) receives the layer table.
    """
    request: dict[str, object] = {
        "op": DELIVERY_OP,
        "folder": str(folder),
        "plan": str(plan),
        "beam_number": beam_number,
        "room": room,
        "calibration": dict(calibration),
        **criteria,
    }
    if detail_output is not None:
        request["detail_output"] = str(detail_output)
    return request


async def ask_worker(
    worker: Requester, request: Mapping[str, object], *, failure_code: str
) -> dict[str, object]:
    """Send one request to a warm worker and return its `result`.

    Raises PermanentError with the worker's code when the request cannot be carried out (a
    named dose-check code), TransientError with that code for a transient one, the worker's
    own `*_timeout` error as it is, and `failure_code` when the worker itself failed.
    """
    try:
        answer = await worker.request(request)
    except MqiError as exc:
        if exc.code.endswith("_timeout"):
            raise
        raise TransientError(failure_code, f"the dose worker failed: {exc.detail}") from exc
    if answer.get("ok"):
        result = answer.get("result")
        if not isinstance(result, dict):
            raise TransientError(failure_code, f"the worker answered no result: {answer!r}")
        return result
    code = str(answer.get("code") or failure_code)
    detail = str(answer.get("detail") or "")
    if failure_info(code).kind is FailureKind.PERMANENT:
        raise PermanentError(code, detail)
    raise TransientError(code, detail)


async def delivery_in_worker(worker: Requester, request: Mapping[str, object]) -> dict[str, object]:
    """Run one delivery check in `worker`; returns its summary (see `ask_worker`)."""
    return await ask_worker(worker, request, failure_code="delivery_check_failed")
