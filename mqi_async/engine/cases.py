"""Case workflows: resolve the plan, interpret the logs once, aggregate beams, post-process."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mqi_async.domain.errors import FailureKind, IngestError, MqiError, format_error
from mqi_async.domain.fractions import DeliveryRecord, Waiting, delivery_id
from mqi_async.domain.model import BeamStatus, CaseStatus, aggregate_case_status, case_progress
from mqi_async.domain.records import CaseKind, CaseRow, NewBeam, NewDelivery, ResolvedCase
from mqi_async.engine.layout import CaseDirs
from mqi_async.engine.ports import CaseSource, Clock, LocalTools, Store

log = logging.getLogger(__name__)

C = CaseStatus


@dataclass(frozen=True, slots=True, kw_only=True)
class CaseSettings:
    work_directory: Path
    max_attempts: int
    backoff_initial_s: float
    backoff_max_s: float


class CaseWorkflow:
    """Drives one case through its case-level phases; beams run in their own workflows."""

    def __init__(
        self,
        *,
        store: Store,
        source: CaseSource,
        tools: LocalTools,
        clock: Clock,
        settings: CaseSettings,
        on_beams_ready: Callable[[str], None],
        on_new_deliveries: Callable[[str], None] = lambda _case_id: None,
        on_case_done: Callable[[str], None] = lambda _case_id: None,
    ) -> None:
        self._store = store
        self._source = source
        self._tools = tools
        self._clock = clock
        self._s = settings
        self._on_beams_ready = on_beams_ready
        self._on_new_deliveries = on_new_deliveries
        self._on_case_done = on_case_done

    async def run(self, case_id: str) -> None:
        while True:
            case = await self._store.get_case(case_id)
            if case is None:
                return
            if case.status in (C.PENDING, C.WAITING) and case.kind == CaseKind.PLANNED:
                # a planned case has its plan already (a retry brings it back here)
                await self._store.transition_case(
                    case_id, C.INTERPRETING, message="the plan's inputs, once more"
                )
            elif case.status in (C.PENDING, C.WAITING):
                if (
                    case.status == C.WAITING
                    and case.recheck_at
                    and case.recheck_at > self._clock.now()
                ):
                    return
                if not await self._resolve(case):
                    return
            elif case.status == C.INTERPRETING:
                if not await self._interpret(case):
                    return
            elif case.status == C.POSTPROCESSING:
                await self._postprocess(case)
                return
            else:
                return

    async def _fail(self, case: CaseRow, error: str) -> None:
        await self._store.transition_case(
            case.case_id, C.FAILED, changes={"error": error}, message=error
        )
        log.error("case %s failed: %s", case.case_id, error, extra={"case_id": case.case_id})

    async def _resolve(self, case: CaseRow) -> bool:
        try:
            found = await self._source.resolve(case.case_id, case.case_path, now=self._clock.now())
        except IngestError as exc:
            await self._fail(case, str(exc))
            return False
        if isinstance(found, Waiting):
            if case.status != C.WAITING or case.recheck_at != found.recheck_at:
                await self._store.transition_case(
                    case.case_id,
                    C.WAITING,
                    changes={"recheck_at": found.recheck_at},
                    message=f"waiting: {found.detail}",
                )
            return False
        res = found.resolution
        if not await self._store.list_beams(case.case_id):
            await self._attach(case, found)
            self._on_new_deliveries(case.case_id)
        for note in res.notes:
            await self._store.append_event("fraction", note, case_id=case.case_id)
        await self._store.transition_case(
            case.case_id,
            C.INTERPRETING,
            changes={"recheck_at": None, "error": None},
            message=f"{len(res.beams)} beam(s) from fraction {res.reference_fraction_index}",
        )
        return True

    async def _attach(self, case: CaseRow, found: ResolvedCase) -> None:
        res = found.resolution
        await self._store.attach_plan(
            case.case_id,
            beams=[
                NewBeam(
                    beam_index=b.treatment_index,
                    beam_number=b.beam_number,
                    beam_name=b.beam_name,
                    delivery_path=b.delivery_path,
                )
                for b in res.beams
            ],
            deliveries=[_new_delivery(case.case_id, d) for d in res.deliveries],
            plan_path=found.plan_path,
            gantry=found.plan.gantry,
            patient_id=found.plan.patient_id,
        )

    async def _make_inputs(self, case: CaseRow, dirs: CaseDirs) -> None:
        """The case's MOQUI inputs under dirs.csv: the interpreter's log CSVs, or for a
        planned case the plan's own spots as CSVs."""
        if case.kind == CaseKind.PLANNED:
            beams = await self._store.list_beams(case.case_id)
            await self._tools.write_plan_fluence(
                plan=Path(case.plan_path or ""),
                csv_dir=dirs.csv,
                beams=[(b.beam_number or 0, b.beam_name or "") for b in beams],
                room=case.room,
            )
            return
        # the tool starts each try in a fresh output dir, after stopping any leftover run
        await self._tools.interpret(
            case_path=Path(case.case_path),
            csv_dir=dirs.csv,
            log_path=dirs.logs / "interpreter.log",
        )
        await asyncio.to_thread(self._ensure_plan_copy, case, dirs)

    async def _interpret(self, case: CaseRow) -> bool:
        dirs = CaseDirs.of(self._s.work_directory, case)
        failures = 0
        while True:
            try:
                await self._make_inputs(case, dirs)
                break
            except MqiError as exc:
                failures += 1
                if exc.kind == FailureKind.PERMANENT or failures >= self._s.max_attempts:
                    await self._fail(case, str(exc))
                    return False
                delay = min(self._s.backoff_max_s, self._s.backoff_initial_s * 2 ** (failures - 1))
                await self._store.append_event(
                    "interpreter", f"{exc}; retry in {delay:.0f} s", case_id=case.case_id
                )
                await asyncio.sleep(delay)
        await self._store.transition_case(
            case.case_id,
            C.PROCESSING,
            changes={"interpreted_at": self._clock.now(), "progress": 0},
            message="fluence CSVs written",
        )
        for beam in await self._store.list_beams(case.case_id):
            if beam.status == BeamStatus.PENDING:
                await self._store.transition_beam(
                    beam.beam_id,
                    BeamStatus.UPLOADING,
                    changes={"progress": 5},
                    message="case inputs ready",
                )
        self._on_beams_ready(case.case_id)
        return False

    @staticmethod
    def _ensure_plan_copy(case: CaseRow, dirs: CaseDirs) -> None:
        logs = dirs.csv / "log"
        if not logs.is_dir() or not any(logs.rglob("*.csv")):
            raise MqiError("interpreter_no_output", f"no CSV under {logs}")
        plan_dir = dirs.csv / "plan"
        plan_dir.mkdir(parents=True, exist_ok=True)
        if case.plan_path and not any(plan_dir.iterdir()):
            # MOQUI needs the RTPLAN beside the CSVs; the real interpreter copies it, be sure
            shutil.copy2(case.plan_path, plan_dir / Path(case.plan_path).name)

    async def aggregate(self, case_id: str) -> None:
        """Set the case status from its beams (the one canonical rule)."""
        case = await self._store.get_case(case_id)
        if case is None or case.status not in (C.PROCESSING,):
            return
        beams = await self._store.list_beams(case_id)
        status = aggregate_case_status([b.status for b in beams])
        progress = case_progress([float(b.progress) for b in beams], [b.status for b in beams])
        if status is None or status == C.PROCESSING:
            return
        if status == C.FAILED:
            failed = [b for b in beams if b.status == BeamStatus.FAILED]
            first = failed[0].error or format_error("internal_error")
            error = first if len(failed) == 1 else f"{first} ({len(failed)} beams failed)"
            await self._store.transition_case(
                case_id, C.FAILED, changes={"error": error, "progress": progress}, message=error
            )
            self._on_case_done(case_id)
        elif status == C.CANCELLED:
            await self._store.transition_case(
                case_id,
                C.CANCELLED,
                changes={"error": format_error("cancelled")},
                message="all beams cancelled",
            )
            self._on_case_done(case_id)
        else:
            await self._store.transition_case(
                case_id,
                C.POSTPROCESSING,
                changes={"progress": 99, "error": None},
                message="all beams completed",
            )

    async def refresh_deliveries(self, case: CaseRow) -> None:
        """Record delivery folders that arrived after the case was resolved (a new fraction)."""
        try:
            records, problems = await self._source.list_deliveries(
                case.case_id, case.case_path, now=self._clock.now()
            )
        except IngestError as exc:
            await self._store.append_event(
                "delivery", f"new deliveries not read: {exc}", case_id=case.case_id
            )
            return
        added = await self._store.add_deliveries(
            case.case_id, [_new_delivery(case.case_id, d) for d in records]
        )
        for problem in problems:
            await self._store.append_event("delivery", problem, case_id=case.case_id)
        if added:
            log.info(
                "case %s: %d new delivery folder(s)",
                case.case_id,
                len(added),
                extra={"case_id": case.case_id},
            )
            self._on_new_deliveries(case.case_id)

    async def _postprocess(self, case: CaseRow) -> None:
        if case.kind == CaseKind.PLANNED:
            # a planned run's doses are references for dose checks; nothing to post-process
            await self._store.transition_case(
                case.case_id, C.COMPLETED, changes={"progress": 100}, message="planned doses ready"
            )
            self._on_case_done(case.case_id)
            return
        await self.refresh_deliveries(case)
        dirs = CaseDirs.of(self._s.work_directory, case)
        values = {
            "case_id": case.case_id,
            "case_dir": case.case_path,
            "work_dir": str(dirs.root),
            "dose_dir": str(dirs.dose),
            "csv_dir": str(dirs.csv),
        }
        message = "no post-processing configured"
        try:
            ok = await self._tools.postprocess(
                values=values, log_path=dirs.logs / "postprocess.log"
            )
            if ok is not None:
                message = "post-processing passed" if ok else "post-processing failed (see its log)"
        except MqiError as exc:
            # a failed gamma check is visible, but the dose itself is still valid
            message = f"post-processing failed: {exc}"
        await self._store.append_event("postprocess", message, case_id=case.case_id)
        await self._store.transition_case(
            case.case_id, C.COMPLETED, changes={"progress": 100}, message=message
        )
        self._on_case_done(case.case_id)


def _new_delivery(case_id: str, d: DeliveryRecord) -> NewDelivery:
    return NewDelivery(
        delivery_id=delivery_id(case_id, d.path),
        delivery_path=d.path,
        # folder names are the treatment room's local time
        delivered_at=d.delivered_at if d.delivered_at.tzinfo else d.delivered_at.astimezone(),
        fraction_index=d.fraction_index,
        raw_beam_number=d.beam_number,
        treatment_beam_index=d.treatment_index,
        is_reference=d.is_reference,
    )
