"""What a case report shows, read from the store and the plan in one go."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from mqi_async.config import Settings
from mqi_async.domain.plan import read_rtplan
from mqi_async.domain.records import DeliveryRow, DoseCheckRow, RunRow
from mqi_async.engine.layout import CaseDirs
from mqi_async.store import Store
from mqi_async.store.snapshot import BeamSnapshot, CaseSnapshot


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanInfo:
    label: str
    uid: str
    machine: str
    patient_id: str
    fractions_planned: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class BeamReport:
    beam: BeamSnapshot
    #: the beam's successful (else last) MOQUI run
    run: RunRow | None
    #: GPU model names of that run
    gpu_models: tuple[str, ...]
    qa: DoseCheckRow | None
    #: the gamma map saved by the dose check (.npy on the reference grid), if any
    gamma_map: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryReport:
    row: DeliveryRow
    #: the layer table and deviations written by the delivery check (its JSON), or {}
    detail: Mapping[str, object]


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportSettings:
    """What a report needs of the config, passed to the report process as JSON."""

    database: str
    #: the service's work_directory; the report goes into the case's folder there
    work_directory: str
    case_id: str
    #: qa section (config.QaSettings as JSON)
    qa: Mapping[str, object]
    moqui: Mapping[str, object]
    #: host name -> the MOQUI command line it runs
    engine_commands: Mapping[str, str] = field(default_factory=dict)
    version: str = ""

    def to_json(self) -> dict[str, object]:
        return {
            "database": self.database,
            "work_directory": self.work_directory,
            "case_id": self.case_id,
            "qa": dict(self.qa),
            "moqui": dict(self.moqui),
            "engine_commands": dict(self.engine_commands),
            "version": self.version,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, object]) -> ReportSettings:
        def mapping(key: str) -> Mapping[str, object]:
            value = doc.get(key) or {}
            if not isinstance(value, Mapping):
                raise ValueError(f"{key} must be an object")
            return value

        return cls(
            database=str(doc["database"]),
            work_directory=str(doc["work_directory"]),
            case_id=str(doc["case_id"]),
            qa=mapping("qa"),
            moqui=mapping("moqui"),
            engine_commands={k: str(v) for k, v in mapping("engine_commands").items()},
            version=str(doc.get("version") or ""),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportData:
    case: CaseSnapshot
    plan: PlanInfo | None
    #: why the plan could not be read (the report is built without it)
    plan_problem: str | None
    beams: tuple[BeamReport, ...]
    deliveries: tuple[DeliveryReport, ...]
    plan_path: str | None
    #: the plan-sum gamma map (.npy), if any
    plan_gamma_map: str | None
    #: the case's work folder, where the report is written
    output_dir: Path
    #: the moment the store was read
    as_of: datetime
    settings: ReportSettings


def _plan_info(path: str | None, patient_id: str | None) -> tuple[PlanInfo | None, str | None]:
    if not path:
        return None, "the case has no RTPLAN"
    try:
        plan = read_rtplan(path)
    except Exception as exc:  # a report is still worth having without the plan's names
        return None, f"{path}: {exc}"
    return (
        PlanInfo(
            label=plan.rt_plan_label,
            uid=plan.sop_instance_uid,
            machine=plan.machine_name,
            patient_id=patient_id or plan.patient_id,
            fractions_planned=_fractions_planned(path),
        ),
        None,
    )


def _fractions_planned(path: str) -> int | None:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["FractionGroupSequence"])
        value = ds.FractionGroupSequence[0].NumberOfFractionsPlanned
        return int(value)
    except Exception:
        return None


def _detail(path: str | None) -> Mapping[str, object]:
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _run_of(runs: Sequence[RunRow]) -> RunRow | None:
    done = [r for r in runs if str(r.status) == "succeeded"] or list(runs)
    return done[-1] if done else None


async def read_report_data(settings: ReportSettings) -> ReportData | None:
    """Everything the report shows; None when the case is unknown (or not a treatment case).

    Runs in the report's own process: the file reads here never touch the service's loop.
    """
    async with await Store.open_readonly(settings.database) as store:
        case, as_of = await store.case_snapshot(settings.case_id)
        row = await store.get_case(settings.case_id)
        if case is None or row is None:
            return None
        out = CaseDirs.of(Path(settings.work_directory), row).root
        models = {g.uuid: g.name for g in await store.list_gpus()}
        beams = []
        beam_rows = {b.beam_id: b for b in await store.list_beams(case.case_id)}
        for b in case.beams:
            run = _run_of(await store.list_runs(b.beam_id))
            index = beam_rows[b.beam_id].beam_index if b.beam_id in beam_rows else None
            gamma = None
            if index is not None:
                candidate = out / "qa" / f"beam_{index}_gamma.npy"
                gamma = str(candidate) if os.path.isfile(candidate) else None
            beams.append(
                BeamReport(
                    beam=b,
                    run=run,
                    gpu_models=tuple(
                        models.get(u, u) for u in (run.gpu_uuids if run is not None else ())
                    ),
                    qa=b.qa,
                    gamma_map=gamma,
                )
            )
    plan, problem = _plan_info(row.plan_path, row.patient_id)
    plan_gamma = out / "qa" / "plan_gamma.npy"
    return ReportData(
        case=case,
        plan=plan,
        plan_problem=problem,
        beams=tuple(beams),
        deliveries=tuple(
            DeliveryReport(row=d, detail=_detail(d.qa_detail_path)) for d in case.deliveries
        ),
        plan_path=row.plan_path,
        plan_gamma_map=str(plan_gamma) if plan_gamma.is_file() else None,
        output_dir=out,
        as_of=as_of,
        settings=settings,
    )


def report_settings(
    settings: Settings, case_id: str, engine_commands: Mapping[str, str] | None = None
) -> ReportSettings:
    """The report process's settings for one case, from the service's config (and the MOQUI
    command line each host runs, where the hosts are built)."""
    from mqi_async import __version__

    return ReportSettings(
        database=str(settings.database),
        work_directory=str(settings.work_directory),
        case_id=case_id,
        qa=settings.qa.model_dump(mode="json"),
        moqui=dict(settings.moqui),
        engine_commands=dict(engine_commands)
        if engine_commands is not None
        else {
            h.name: " ".join(h.moqui_command)
            if isinstance(h.moqui_command, list)
            else "(the host's default)"
            for h in settings.hosts
        },
        version=__version__,
    )
