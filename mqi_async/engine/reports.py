"""Case reports: written when a case's checks have all their verdicts, and again when one changes.

The report process (`python -m mqi_async.report`) reads the store and the dose files, draws,
writes `report.pdf` and `report.html` in the case's work folder and records them; this loop only
decides when, and backs off when one fails. A report never changes a case or a verdict.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from mqi_async.domain.errors import FailureKind, MqiError
from mqi_async.engine.layout import CaseDirs
from mqi_async.engine.ports import LocalTools, Store

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportWriterSettings:
    work_directory: Path
    #: tries of one report before it waits for a new verdict (or `mqi-async report`)
    max_attempts: int = 3
    backoff_initial_s: float = 30.0
    backoff_max_s: float = 600.0
    #: the safety net: verdicts wake the writer (one pass reads every finished case)
    idle_poll_s: float = 60.0


class ReportWriter:
    """Keeps every finished case's report as current as its verdicts; `wake()` after one."""

    def __init__(self, *, store: Store, tools: LocalTools, settings: ReportWriterSettings) -> None:
        self._store = store
        self._tools = tools
        self._s = settings
        self._wake = asyncio.Event()
        #: case id -> loop time before which a failed report is not tried again
        self._not_before: dict[str, float] = {}

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            self._wake.clear()
            await self.write_due()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._s.idle_poll_s):
                    await self._wake.wait()

    async def write_due(self) -> None:
        """One pass: every case whose report is missing or older than one of its verdicts."""
        loop = asyncio.get_running_loop()
        for case_id in await self._store.cases_to_report(max_attempts=self._s.max_attempts):
            if self._not_before.get(case_id, 0.0) > loop.time():
                continue
            case = await self._store.get_case(case_id)
            if case is None:
                continue
            dirs = CaseDirs.of(self._s.work_directory, case)
            try:
                built = await self._tools.build_report(case_id=case_id, log_dir=dirs.logs)
            except MqiError as exc:
                await self._failed(case_id, exc)
                continue
            self._not_before.pop(case_id, None)
            log.info(
                "case %s: report written (%s): %s",
                case_id,
                built.get("verdict"),
                built.get("pdf"),
                extra={"case_id": case_id, "code": "report"},
            )

    async def _failed(self, case_id: str, exc: MqiError) -> None:
        tries = await self._store.record_report_failure(case_id, error=str(exc))
        if exc.kind is FailureKind.PERMANENT:
            tries = self._s.max_attempts
        delay = min(self._s.backoff_max_s, self._s.backoff_initial_s * 2 ** max(0, tries - 1))
        self._not_before[case_id] = asyncio.get_running_loop().time() + delay
        log.warning(
            "case %s: report: %s (%d of %d tries)",
            case_id,
            exc,
            tries,
            self._s.max_attempts,
            extra={"case_id": case_id, "code": exc.code},
        )
