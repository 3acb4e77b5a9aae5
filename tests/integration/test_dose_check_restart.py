"""A dose check stopped mid-gamma (the service killed or stopped) leaves no verdict, and the
next run computes it: the real store, the real warm worker, real RT Dose files."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from datetime import timedelta
from pathlib import Path

import numpy as np

from mqi_async.config import QaSettings, ToolsSettings
from mqi_async.domain.records import CaseKind, NewBeam, NewCase
from mqi_async.domain.tps import PhantomGrid
from mqi_async.domain.verdict import QaStatus, Thresholds
from mqi_async.dose import PlanRef, build_rt_dose
from mqi_async.engine.dose_checks import DoseChecker, DoseCheckSettings
from mqi_async.ingest.reader import CaseReader
from mqi_async.store import Store
from mqi_async.tools import DoseWorker, LocalToolRunner, Tools

#: big enough that one gamma takes a good part of a second
GRID = PhantomGrid(nx=120, ny=120, nz=60, dx=1.0, dy=1.0, dz=1.0, x0=-60, y0=-60, z0=-30)


def _dose(path: Path, scale: float) -> str:
    z, y, x = np.meshgrid(
        np.arange(GRID.nz) - 30.0, np.arange(GRID.ny) - 60.0, np.arange(GRID.nx) - 60.0,
        indexing="ij",
    )  # fmt: skip
    dose = scale * np.exp(-(x**2 + y**2 + z**2) / (2 * 15.0**2))
    plan = PlanRef(
        sop_instance_uid="2.25.1", study_instance_uid="2.25.2", frame_of_reference_uid="2.25.3"
    )
    build_rt_dose(dose, grid=GRID, plan=plan, beam_number=1).save_as(path, enforce_file_format=True)
    return str(path)


async def test_a_gamma_cut_short_leaves_no_verdict_and_the_next_run_gives_it(
    tmp_path: Path,
) -> None:
    db = tmp_path / "mqi.db"
    store = await Store.open(db)
    worker = DoseWorker(timeout_s=120, failure_code="gamma_failed", timeout_code="gamma_timeout")
    tools_settings = ToolsSettings()
    tools = LocalToolRunner(
        Tools(tools_settings), tools_settings, {}, worker, qa_worker=worker, qa=QaSettings()
    )
    try:
        for case_id, kind in (("T1", CaseKind.TREATMENT), ("planned-x", CaseKind.PLANNED)):
            await store.register_case(
                NewCase(
                    case_id=case_id, case_path=str(tmp_path), safe_name=case_id, kind=kind,
                    plan_path=str(tmp_path / "RP.dcm"),
                ),
                [NewBeam(beam_index=1, beam_number=1, beam_name="B1")],
            )  # fmt: skip
        delivered = _dose(tmp_path / "delivered.dcm", 1.02)
        planned = _dose(tmp_path / "planned.dcm", 1.0)
        # the runs are over: set the rows as the workflows would have left them
        with sqlite3.connect(db) as raw:
            for beam_id, output in (("T1_beam_1", delivered), ("planned-x_beam_1", planned)):
                raw.execute(
                    "UPDATE beams SET status = 'completed', outputs = ? WHERE beam_id = ?",
                    (json.dumps([output]), beam_id),
                )
            raw.execute("UPDATE cases SET status = 'completed'")
            raw.execute("UPDATE cases SET planned_case_id = 'planned-x' WHERE case_id = 'T1'")
        settings = DoseCheckSettings(
            reference="planned_mc",
            thresholds=Thresholds(),
            work_directory=tmp_path / "work",
            planned_inputs={},
        )
        source = CaseReader(scan_directory=tmp_path, fraction_window=timedelta(hours=1))

        def checker() -> DoseChecker:
            return DoseChecker(
                store=store, tools=tools, source=source, settings=settings,
                on_planned_case=lambda _: None,
            )  # fmt: skip

        task = asyncio.create_task(checker().check_pending())
        await asyncio.sleep(1.5)  # the worker has started and is computing the beam's gamma
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        assert await store.dose_checks("T1") == []
        # as after a restart: a new checker, a fresh worker process
        await checker().check_pending()
        checks = {c.beam_id: c for c in await store.dose_checks("T1")}
        assert set(checks) == {"T1_beam_1", None}
        assert checks["T1_beam_1"].status is QaStatus.PASSED
        assert checks[None].status is QaStatus.PASSED
        assert (tmp_path / "work" / "T1" / "qa" / "beam_1_gamma.npy").is_file()
    finally:
        await worker.aclose()
        await store.aclose()
