"""A fixed clinic day for the dashboard tests: cases in every state, with verdicts.

Everything is stamped by one fixed clock, so ages and times on screen never change.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from mqi_async.domain.gpus import GpuInfo, GpuSample
from mqi_async.domain.model import BeamStatus as B
from mqi_async.domain.model import CaseStatus as C
from mqi_async.domain.records import NewBeam, NewCase, NewDelivery
from mqi_async.domain.verdict import QaStatus as Q
from mqi_async.store import Store
from mqi_async.ui.app import DashboardApp

#: when the store stamps everything
STORE_TIME = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
#: the dashboard's clock: ages read 1h12m
APP_TIME = STORE_TIME + timedelta(hours=1, minutes=12)
SCAN = Path("/data/incoming")

TO_RUNNING = (B.UPLOADING, B.QUEUED, B.LAUNCHING, B.RUNNING)
TO_DONE = (*TO_RUNNING, B.DOWNLOADING, B.CONVERTING, B.COMPLETED)


async def open_store(path: Path) -> Store:
    return await Store.open(path, now=lambda: STORE_TIME)


def make_app(store: Store, tmp_path: Path, **kw: Any) -> DashboardApp:
    kw.setdefault("refresh_hz", 20)
    return DashboardApp(
        store=store,
        work_directory=tmp_path / "work",
        hosts_state=lambda: {"sim": "connected"},
        scan_directory=SCAN,
        now=lambda: APP_TIME,
        **kw,
    )


async def walk(store: Store, beam_id: str, *path: B, **changes: Any) -> None:
    for status in path:
        await store.transition_beam(beam_id, status, changes=changes if status == path[-1] else {})


def _gamma(rate: float, mean: float, gmax: float, points: int = 812_345) -> dict[str, object]:
    return {
        "pass_rate_percent": rate,
        "gamma_mean": mean,
        "gamma_max": gmax,
        "evaluated_points": points,
    }


def _spots(rate: float, position_mm: float, meterset: float) -> dict[str, object]:
    return {
        "pass_rate_percent": rate,
        "max_position_error_mm": position_mm,
        "meterset_error_percent": meterset,
    }


def new_delivery(case_id: str, fraction: int, beam: int, at: datetime) -> NewDelivery:
    folder = at.strftime("%Y%m%d%H%M%S00")
    return NewDelivery(
        delivery_id=f"{case_id}/{folder}",
        delivery_path=f"{SCAN}/{case_id}/{folder}",
        delivered_at=at,
        fraction_index=fraction,
        raw_beam_number=beam,
        treatment_beam_index=beam,
        is_reference=fraction == 1,
    )


def deliveries_of(case_id: str, fractions: int, beams: int = 2) -> list[NewDelivery]:
    """`beams` deliveries a day, one day per fraction, from 1 March 07:30."""
    first = datetime(2026, 3, 1, 7, 30, tzinfo=UTC)
    return [
        new_delivery(case_id, f, b, first + timedelta(days=f - 1, minutes=3 * b))
        for f in range(1, fractions + 1)
        for b in range(1, beams + 1)
    ]


async def register(
    store: Store,
    case_id: str,
    *,
    beams: int = 2,
    room: str = "G1",
    deliveries: Sequence[NewDelivery] = (),
) -> None:
    await store.register_case(
        NewCase(case_id=case_id, case_path=f"{SCAN}/{case_id}", safe_name=case_id, room=room),
        beams=[
            NewBeam(beam_index=k, beam_number=k, beam_name=f"{k}G{90 * k:03d}")
            for k in range(1, beams + 1)
        ],
        deliveries=deliveries,
    )


async def complete(store: Store, case_id: str, beams: int = 2) -> None:
    await store.transition_case(case_id, C.INTERPRETING)
    await store.transition_case(case_id, C.PROCESSING)
    for k in range(1, beams + 1):
        await walk(store, f"{case_id}_beam_{k}", *TO_DONE, host="sim", progress=100)
    await store.transition_case(case_id, C.POSTPROCESSING)
    await store.transition_case(case_id, C.COMPLETED, changes={"progress": 100})


async def check_deliveries(
    store: Store, case_id: str, verdicts: dict[str, tuple[Q, dict[str, object] | None, str | None]]
) -> None:
    """Each delivery (by folder) gets its verdict; the others stay pending."""
    for d in await store.list_deliveries(case_id):
        if d.folder in verdicts:
            status, result, reason = verdicts[d.folder]
            await store.record_delivery_check(d, status=status, result=result, reason=reason)


async def seed_clinic(store: Store) -> None:
    """Five cases: all passed, mixed (a failed fraction), running, skipped, failed pipeline."""
    # GOOD: everything passed
    await register(store, "GOOD", deliveries=deliveries_of("GOOD", 2))
    await complete(store, "GOOD")
    await store.record_dose_check(
        "GOOD", "GOOD_beam_1", status=Q.PASSED, result=_gamma(99.12, 0.28, 1.6)
    )
    await store.record_dose_check(
        "GOOD", "GOOD_beam_2", status=Q.PASSED, result=_gamma(98.47, 0.31, 1.9)
    )
    await store.record_dose_check("GOOD", None, status=Q.PASSED, result=_gamma(98.83, 0.3, 1.9))
    await _check_all_deliveries(store, "GOOD", Q.PASSED, _spots(99.6, 0.4, 0.3))
    # MIXED: a conditional beam, and fraction 2 delivered 15 % too much on beam 2
    await register(store, "MIXED", beams=2, room="G2", deliveries=deliveries_of("MIXED", 3))
    await complete(store, "MIXED")
    await store.record_dose_check(
        "MIXED", "MIXED_beam_1", status=Q.PASSED, result=_gamma(97.05, 0.35, 1.7)
    )
    await store.record_dose_check(
        "MIXED", "MIXED_beam_2", status=Q.CONDITIONAL, result=_gamma(91.38, 0.62, 2.0)
    )
    await store.record_dose_check(
        "MIXED", None, status=Q.CONDITIONAL, result=_gamma(93.2, 0.5, 2.0)
    )
    await _check_all_deliveries(store, "MIXED", Q.PASSED, _spots(99.4, 0.5, 0.4))
    await check_deliveries(
        store,
        "MIXED",
        {
            "2026030207360000": (
                Q.FAILED,
                _spots(62.04, 0.6, 15.1),
                "meterset_deviation: 15.1 % more than planned",
            ),
        },
    )
    # RUN: still running, nothing judged yet
    await register(store, "RUN", deliveries=deliveries_of("RUN", 1))
    await store.transition_case("RUN", C.INTERPRETING)
    await store.transition_case("RUN", C.PROCESSING)
    await walk(store, "RUN_beam_1", *TO_RUNNING, host="sim", progress=40)
    await walk(store, "RUN_beam_2", B.UPLOADING, B.QUEUED)
    # SKIP: completed, no planned dose to compare with
    await register(store, "SKIP", beams=1)
    await complete(store, "SKIP", beams=1)
    reason = "no_tps_dose: no planned RT Dose for this plan in the case folder"
    await store.record_dose_check("SKIP", "SKIP_beam_1", status=Q.SKIPPED, reason=reason)
    await store.record_dose_check("SKIP", None, status=Q.SKIPPED, reason=reason)
    # FAIL: the pipeline failed, so did its check
    await register(store, "FAIL", beams=1, room="G2")
    await store.transition_case("FAIL", C.INTERPRETING)
    await store.transition_case("FAIL", C.PROCESSING)
    await walk(store, "FAIL_beam_1", B.UPLOADING, B.FAILED, error="moqui_exit_134: MOQUI crashed")
    await store.transition_case("FAIL", C.FAILED, changes={"error": "moqui_exit_134: beam 1"})
    await store.record_dose_check(
        "FAIL", "FAIL_beam_1", status=Q.ERROR, reason="no_dose: the beam has no dose to compare"
    )
    await store.record_dose_check(
        "FAIL", None, status=Q.ERROR, reason="no_dose: the beam has no dose to compare"
    )
    await store.record_gpu_sample(
        GpuSample(
            host="sim",
            taken_at=STORE_TIME,
            gpus=tuple(
                GpuInfo(
                    index=i,
                    uuid=f"GPU-{i}",
                    name="H200",
                    memory_total_mb=143771,
                    memory_used_mb=1024,
                    memory_free_mb=142747,
                    temperature_c=34,
                    utilization_pct=3,
                )
                for i in range(2)
            ),
        )
    )


async def _check_all_deliveries(
    store: Store, case_id: str, status: Q, result: dict[str, object]
) -> None:
    for d in await store.list_deliveries(case_id):
        await store.record_delivery_check(d, status=status, result=result)
