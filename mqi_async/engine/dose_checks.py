"""Dose checks: each beam's delivered dose against its reference, and the plan sum, per case.

The reference (`qa.reference`) is the dose of MOQUI run on the plan itself (`planned_mc`), the
TPS's planned RT Dose in the case folder (`tps_dose`), or nothing (`none`). For `planned_mc`
the checker makes a planned case as soon as a treatment case has its beams: the plan's own
spots as fluence CSVs, run like any beam (leases, retries, recovery), once per plan and set of
static MOQUI keys, so every case of an unchanged plan reuses it. When the treatment case and
its reference are done, the 3-D gamma of `qa.gamma` runs in the QA worker, never on the loop,
beam by beam and for the plan sum. A verdict never changes a case's pipeline status.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mqi_async.domain.errors import FailureKind, MqiError, format_error
from mqi_async.domain.model import BeamStatus, CaseStatus
from mqi_async.domain.records import BeamRow, CaseKind, CaseRow, NewBeam, NewCase
from mqi_async.domain.verdict import QaStatus, Thresholds, classify
from mqi_async.engine.layout import CaseDirs
from mqi_async.engine.ports import CaseSource, LocalTools, Store

log = logging.getLogger(__name__)

B = BeamStatus
C = CaseStatus

Reference = Literal["planned_mc", "tps_dose", "none"]


@dataclass(frozen=True, slots=True, kw_only=True)
class DoseCheckSettings:
    reference: Reference
    thresholds: Thresholds
    work_directory: Path
    #: what else makes two planned runs of one plan differ (static MOQUI keys, calibration)
    planned_inputs: Mapping[str, object]
    max_attempts: int = 3
    backoff_initial_s: float = 5.0
    backoff_max_s: float = 300.0
    idle_poll_s: float = 10.0


def planned_case_id(plan_uid: str, inputs: Mapping[str, object]) -> str:
    """`planned-<hash>`: one per plan SOPInstanceUID and set of inputs that change its dose."""
    text = json.dumps({"plan": plan_uid, **inputs}, sort_keys=True, default=str)
    return "planned-" + hashlib.sha256(text.encode()).hexdigest()[:20]


class DoseChecker:
    """Makes planned cases and computes the dose verdicts; `wake()` when a case finished."""

    def __init__(
        self,
        *,
        store: Store,
        tools: LocalTools,
        source: CaseSource,
        settings: DoseCheckSettings,
        on_planned_case: Callable[[str], None],
        on_checked: Callable[[], None] = lambda: None,
    ) -> None:
        self._store = store
        self._tools = tools
        self._source = source
        self._s = settings
        self._on_planned_case = on_planned_case
        #: told after a case's verdicts were written (the report follows)
        self._on_checked = on_checked
        self._wake = asyncio.Event()
        #: case id -> loop time before which a failed gamma is not tried again
        self._not_before: dict[str, float] = {}
        self._failures: dict[str, int] = {}

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            self._wake.clear()
            await self.check_pending()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._s.idle_poll_s):
                    await self._wake.wait()

    async def check_pending(self) -> None:
        """One pass over the treatment cases whose dose check has no verdict yet."""
        loop = asyncio.get_running_loop()
        for case in await self._store.cases_to_dose_check(limit=200):
            if self._not_before.get(case.case_id, 0.0) > loop.time():
                continue
            try:
                await self._step(case)
            except MqiError as exc:
                await self._failed(case, exc)

    async def _step(self, case: CaseRow) -> None:
        if self._s.reference == "none":
            await self._skip_all(case, format_error("dose_check_off"))
            return
        if self._s.reference == "planned_mc" and case.planned_case_id is None:
            await self._link_planned(case)
            return
        if not case.status.is_terminal:
            return
        beams = await self._store.list_beams(case.case_id)
        if self._s.reference == "planned_mc":
            references = await self._planned_references(case, beams)
        else:
            references = await self._tps_references(case, beams)
        if references is None:
            return  # the reference is still being computed
        await self._judge(case, beams, references)
        self._on_checked()

    # -- references ------------------------------------------------------------------------

    async def _link_planned(self, case: CaseRow) -> None:
        beams = await self._store.list_beams(case.case_id)
        if not beams or not case.plan_path:
            return
        uid = await self._source.plan_uid(case.plan_path)
        planned = planned_case_id(uid, {**self._s.planned_inputs, "room": case.room})
        row, created = await self._store.link_planned_case(
            case.case_id,
            NewCase(
                case_id=planned,
                case_path=case.case_path,
                safe_name=planned,
                room=case.room,
                status=C.INTERPRETING,
                plan_path=case.plan_path,
                gantry=case.gantry,
                patient_id=case.patient_id,
                kind=CaseKind.PLANNED,
            ),
            [
                NewBeam(beam_index=b.beam_index, beam_number=b.beam_number, beam_name=b.beam_name)
                for b in beams
            ],
        )
        log.info(
            "case %s: planned run %s (%s)",
            case.case_id,
            planned,
            "new" if created else f"reused, {row.status}",
            extra={"case_id": case.case_id},
        )
        if created:
            self._on_planned_case(planned)

    async def _planned_references(
        self, case: CaseRow, beams: Sequence[BeamRow]
    ) -> dict[int, list[str] | str] | None:
        """Beam number -> the planned dose files, or a `code: sentence` why there are none."""
        planned = await self._store.get_case(case.planned_case_id or "")
        if planned is None:
            await self._link_planned(case)
            return None
        if not planned.status.is_terminal:
            return None
        out: dict[int, list[str] | str] = {}
        for pb in await self._store.list_beams(planned.case_id):
            if pb.beam_number is None:
                continue
            if pb.status != B.COMPLETED or not pb.outputs:
                out[pb.beam_number] = format_error(
                    "planned_run_failed", pb.error or f"the planned run is {pb.status}"
                )
            elif not all(await asyncio.to_thread(_all_exist, pb.outputs)):
                out[pb.beam_number] = format_error("planned_dose_missing", ", ".join(pb.outputs))
            else:
                out[pb.beam_number] = list(pb.outputs)
        return out

    async def _tps_references(
        self, case: CaseRow, beams: Sequence[BeamRow]
    ) -> dict[int, list[str] | str] | None:
        uid = await self._source.plan_uid(case.plan_path or "")
        found = await self._source.tps_doses(case.case_path, uid)
        if not found.beams and not found.plan:
            await self._skip_all(case, format_error("no_tps_dose"))
            return None
        out: dict[int, list[str] | str] = {}
        for b in beams:
            if b.beam_number is not None and b.beam_number in found.beams:
                out[b.beam_number] = [found.beams[b.beam_number]]
            elif b.beam_number is not None:
                out[b.beam_number] = format_error(
                    "no_tps_dose", f"no planned RT Dose of beam {b.beam_number}"
                )
        if found.plan:
            out[_PLAN_SUM] = [found.plan]
        return out

    # -- verdicts --------------------------------------------------------------------------

    async def _judge(
        self, case: CaseRow, beams: Sequence[BeamRow], references: Mapping[int, list[str] | str]
    ) -> None:
        done = {c.beam_id for c in await self._store.dose_checks(case.case_id) if c.beam_id}
        qa_dir = CaseDirs.of(self._s.work_directory, case).root / "qa"
        all_ref: list[str] = []
        all_ev: list[str] = []
        for beam in beams:
            ref = references.get(beam.beam_number) if beam.beam_number is not None else None
            if beam.status == B.COMPLETED and beam.outputs and isinstance(ref, list):
                all_ref += ref
                all_ev += list(beam.outputs)
            if beam.beam_id in done:
                continue
            if beam.status != B.COMPLETED or not beam.outputs:
                await self._store.record_dose_check(
                    case.case_id,
                    beam.beam_id,
                    status=QaStatus.SKIPPED,
                    reason=format_error("no_delivered_dose", beam.error or str(beam.status)),
                )
            elif not isinstance(ref, list):
                reason = ref or format_error("planned_run_failed", "no planned run of this beam")
                status = QaStatus.SKIPPED if reason.startswith("no_tps") else QaStatus.ERROR
                await self._store.record_dose_check(
                    case.case_id, beam.beam_id, status=status, reason=reason
                )
            else:
                await self._gamma(
                    case,
                    beam.beam_id,
                    ref,
                    list(beam.outputs),
                    qa_dir / f"beam_{beam.beam_index}_gamma.npy",
                )
        await self._plan_sum(case, beams, references, all_ref, all_ev, qa_dir)

    async def _plan_sum(
        self,
        case: CaseRow,
        beams: Sequence[BeamRow],
        references: Mapping[int, list[str] | str],
        all_ref: list[str],
        all_ev: list[str],
        qa_dir: Path,
    ) -> None:
        delivered_all = all(b.status == B.COMPLETED and b.outputs for b in beams)
        plan_ref = references.get(_PLAN_SUM)
        if isinstance(plan_ref, list) and delivered_all:
            reference = plan_ref  # the TPS's own plan sum
        elif delivered_all and len(all_ev) == sum(len(b.outputs) for b in beams):
            reference = all_ref
        else:
            missing = [b.beam_id for b in beams if b.status != B.COMPLETED]
            reason = (
                format_error("no_delivered_dose", f"beams without a dose: {', '.join(missing)}")
                if missing
                else format_error("planned_run_failed", "a beam has no planned dose")
            )
            status = QaStatus.SKIPPED if missing else QaStatus.ERROR
            await self._store.record_dose_check(case.case_id, None, status=status, reason=reason)
            return
        await self._gamma(case, None, reference, all_ev, qa_dir / "plan_gamma.npy")

    async def _gamma(
        self,
        case: CaseRow,
        beam_id: str | None,
        reference: list[str],
        evaluated: list[str],
        output: Path,
    ) -> None:
        try:
            result = await self._tools.compare_doses(
                reference=[Path(p) for p in reference],
                evaluated=[Path(p) for p in evaluated],
                gamma_output=output,
            )
        except MqiError as exc:
            if exc.kind is not FailureKind.PERMANENT:
                raise
            await self._store.record_dose_check(
                case.case_id, beam_id, status=QaStatus.ERROR, reason=str(exc)
            )
            return
        rate = result.get("pass_rate_percent")
        status = classify(
            float(rate) if isinstance(rate, (int, float)) else float("nan"), self._s.thresholds
        )
        result = {**result, "reference": reference, "evaluated": evaluated}
        await self._store.record_dose_check(case.case_id, beam_id, status=status, result=result)
        self._failures.pop(case.case_id, None)
        log.info(
            "case %s %s: %s (pass rate %s %%)",
            case.case_id,
            beam_id or "plan sum",
            status,
            rate,
            extra={"case_id": case.case_id, "beam_id": beam_id, "code": "dose_check"},
        )

    async def _skip_all(self, case: CaseRow, reason: str) -> None:
        for beam in await self._store.list_beams(case.case_id):
            await self._store.record_dose_check(
                case.case_id, beam.beam_id, status=QaStatus.SKIPPED, reason=reason
            )
        await self._store.record_dose_check(
            case.case_id, None, status=QaStatus.SKIPPED, reason=reason
        )

    async def _failed(self, case: CaseRow, exc: MqiError) -> None:
        """A transient failure (the worker died or timed out): back off, then give up."""
        tries = self._failures.get(case.case_id, 0) + 1
        self._failures[case.case_id] = tries
        if exc.kind is FailureKind.PERMANENT or tries >= self._s.max_attempts:
            self._failures.pop(case.case_id, None)
            judged = {c.beam_id for c in await self._store.dose_checks(case.case_id)}
            for beam in await self._store.list_beams(case.case_id):
                if beam.beam_id not in judged:
                    await self._store.record_dose_check(
                        case.case_id, beam.beam_id, status=QaStatus.ERROR, reason=str(exc)
                    )
            await self._store.record_dose_check(
                case.case_id, None, status=QaStatus.ERROR, reason=str(exc)
            )
            return
        delay = min(self._s.backoff_max_s, self._s.backoff_initial_s * 2 ** (tries - 1))
        self._not_before[case.case_id] = asyncio.get_running_loop().time() + delay
        log.warning(
            "case %s: dose check: %s; tried again in %.3g s",
            case.case_id,
            exc,
            delay,
            extra={"case_id": case.case_id, "code": exc.code},
        )


#: the key of the plan-sum reference in a references mapping (BeamNumbers are >= 0)
_PLAN_SUM = -1


def _all_exist(paths: Sequence[str]) -> list[bool]:
    return [Path(p).is_file() for p in paths]
