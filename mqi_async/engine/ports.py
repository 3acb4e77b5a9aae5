"""What the engine needs from the outside world, as small protocols; service.py wires real ones."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Protocol

from mqi_async.domain.fractions import DeliveryRecord, Waiting
from mqi_async.domain.gpus import GpuSample
from mqi_async.domain.jobs import (
    CommandResult,
    JobHandle,
    JobSpec,
    JobStatus,
    ProgressCallback,
    TransferReport,
)
from mqi_async.domain.model import BeamStatus, CaseStatus, RunStatus
from mqi_async.domain.records import (
    BeamRow,
    CaseRow,
    CommandRow,
    CommandStatus,
    DeliveryRow,
    DeliveryToCheck,
    DoseCheckRow,
    LeaseRow,
    NewBeam,
    NewCase,
    NewDelivery,
    ResolvedCase,
    RunRow,
    TpsDoseFiles,
)
from mqi_async.domain.slurm import SlurmQueue
from mqi_async.domain.verdict import QaStatus


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...

    def monotonic(self) -> float: ...


class Host(Protocol):
    """One place MOQUI runs: a remote GPU server, this machine, the simulator, or a cluster.

    Every method has its own timeout and raises `HostUnavailableError` when the host
    cannot be reached, `TransientError` or `PermanentError` for other failures.
    """

    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> str:
        """`ssh`, `local`, `simulated` or `slurm`."""
        ...

    @property
    def leases_gpus(self) -> bool:
        """False when a scheduler (slurm) allocates GPUs itself."""
        ...

    @property
    def moqui_command(self) -> Sequence[str]:
        """The MOQUI executable as an argv prefix; the input file's path is appended."""
        ...

    @property
    def remote_root(self) -> str:
        """Absolute directory on the host under which every case lives."""
        ...

    async def start(self) -> None:
        """Connect (or prepare); a failure leaves the host paused, not broken."""
        ...

    async def aclose(self) -> None: ...

    def is_available(self) -> bool:
        """True while the host is connected (or believed reachable)."""
        ...

    async def run(self, argv: Sequence[str], *, timeout_s: float) -> CommandResult:
        """Run one short command; argv is quoted by the host."""
        ...

    async def put_tree(
        self, local_dir: Path, remote_dir: str, *, progress: ProgressCallback | None = None
    ) -> TransferReport:
        """Upload a directory tree; verified, atomic per file, skips files already there."""
        ...

    async def get_files(
        self,
        remote_dir: str,
        names: Sequence[str],
        local_dir: Path,
        *,
        progress: ProgressCallback | None = None,
    ) -> TransferReport:
        """Download named files of one remote directory; verified, atomic per file."""
        ...

    async def list_dir(self, remote_dir: str) -> dict[str, int]:
        """File name -> size of the regular files in a remote directory ({} if it is missing)."""
        ...

    async def spawn_job(self, spec: JobSpec) -> JobHandle:
        """Start a detached job; returns once its process-group id (or job id) is recorded."""
        ...

    async def attach_job(self, job_dir: str, *, fence: bool = False) -> JobHandle | None:
        """The handle of a job started in `job_dir`, or None if none was started there.

        With `fence`, a folder where nothing started is closed so nothing can start there later.
        """
        ...

    async def poll_jobs(self, handles: Sequence[JobHandle]) -> dict[str, JobStatus]:
        """One batched status read of many jobs, keyed by job_dir."""
        ...

    async def kill_job(self, handle: JobHandle) -> None:
        """Stop the whole process group (TERM, then KILL) or cancel the scheduler job."""
        ...

    async def queue_summary(self) -> SlurmQueue | None:
        """A batch cluster's queue and nodes (slurm); None for hosts whose GPUs are sampled."""
        ...

    async def sample_gpus(self) -> GpuSample:
        """Run the nvidia-smi queries under a remote timeout and parse them."""
        ...


class Store(Protocol):
    """The database as the engine sees it (mqi_async.store.Store satisfies it).

    Every status change is one transaction: the transition check, the row and its event.
    """

    async def register_case(
        self,
        case: NewCase,
        beams: Sequence[NewBeam] = (),
        deliveries: Sequence[NewDelivery] = (),
    ) -> tuple[CaseRow, bool]: ...

    async def attach_plan(
        self,
        case_id: str,
        *,
        beams: Sequence[NewBeam],
        deliveries: Sequence[NewDelivery] = (),
        plan_path: str | None = None,
        gantry: int | None = None,
        patient_id: str | None = None,
    ) -> list[BeamRow]: ...

    async def get_case(self, case_id: str) -> CaseRow | None: ...

    async def list_cases(self, statuses: Collection[CaseStatus] | None = None) -> list[CaseRow]: ...

    async def transition_case(
        self,
        case_id: str,
        status: CaseStatus,
        *,
        changes: Mapping[str, object] | None = None,
        message: str = "",
        data: Mapping[str, object] | None = None,
    ) -> CaseRow: ...

    async def update_case(self, case_id: str, changes: Mapping[str, object]) -> CaseRow: ...

    async def get_beam(self, beam_id: str) -> BeamRow | None: ...

    async def list_beams(self, case_id: str) -> list[BeamRow]: ...

    async def list_beams_in(self, statuses: Collection[BeamStatus]) -> list[BeamRow]: ...

    async def transition_beam(
        self,
        beam_id: str,
        status: BeamStatus,
        *,
        changes: Mapping[str, object] | None = None,
        message: str = "",
        data: Mapping[str, object] | None = None,
    ) -> BeamRow: ...

    async def update_beam(self, beam_id: str, changes: Mapping[str, object]) -> BeamRow: ...

    async def start_run(
        self,
        beam_id: str,
        *,
        host: str,
        gpu_uuids: Sequence[str],
        job_dir_for: Callable[[int], str],
    ) -> RunRow:
        """Insert the next attempt's run row and count it on the beam, in one transaction."""
        ...

    async def set_run_job(self, run_id: int, job_id: str) -> RunRow: ...

    async def finish_run(
        self,
        run_id: int,
        status: RunStatus,
        *,
        exit_code: int | None = None,
        signal: str | None = None,
        error: str | None = None,
    ) -> RunRow: ...

    async def list_runs(self, beam_id: str) -> list[RunRow]: ...

    async def list_open_runs(self) -> list[RunRow]: ...

    async def record_gpu_sample(self, sample: GpuSample) -> None: ...

    async def record_host_state(self, name: str, state: str, error: str | None) -> None: ...

    async def record_host_detail(self, name: str, detail: str | None) -> None: ...

    async def lease_gpus(self, beam_id: str, host: str, uuids: Sequence[str]) -> bool:
        """Lease all of the GPUs to the beam, or none of them."""
        ...

    async def release_leases(self, beam_id: str) -> int: ...

    async def list_leases(self, *, beam_id: str | None = None) -> list[LeaseRow]: ...

    async def append_event(
        self,
        kind: str,
        message: str,
        *,
        case_id: str | None = None,
        beam_id: str | None = None,
        data: Mapping[str, object] | None = None,
    ) -> object: ...

    async def pending_commands(self, limit: int = 100) -> list[CommandRow]: ...

    async def add_deliveries(self, case_id: str, deliveries: Sequence[NewDelivery]) -> list[str]:
        """Record the deliveries the case does not have yet; returns their ids."""
        ...

    async def deliveries_to_check(self, limit: int = 20) -> list[DeliveryToCheck]: ...

    async def count_deliveries(self, case_id: str) -> int: ...

    async def link_planned_case(
        self, case_id: str, planned: NewCase, beams: Sequence[NewBeam]
    ) -> tuple[CaseRow, bool]:
        """Make (or find) the planned case and point the treatment case at it."""
        ...

    async def cases_to_dose_check(self, limit: int = 50) -> list[CaseRow]: ...

    async def dose_checks(self, case_id: str) -> list[DoseCheckRow]: ...

    async def record_dose_check(
        self,
        case_id: str,
        beam_id: str | None,
        *,
        status: QaStatus,
        reason: str | None = None,
        result: Mapping[str, object] | None = None,
    ) -> None: ...

    async def reset_dose_checks(self, case_id: str, *, message: str) -> int: ...

    async def record_delivery_check(
        self,
        delivery: DeliveryRow,
        *,
        status: QaStatus,
        reason: str | None = None,
        result: Mapping[str, object] | None = None,
        detail_path: str | None = None,
    ) -> None: ...

    async def count_delivery_attempt(self, delivery_id: str, reason: str) -> int: ...

    async def reset_delivery_checks(self, case_id: str, *, message: str) -> int: ...

    async def cases_to_report(self, *, max_attempts: int, limit: int = 50) -> list[str]: ...

    async def record_report_failure(self, case_id: str, *, error: str) -> int: ...

    async def finish_command(
        self, command_id: int, status: CommandStatus, result: str | None = None
    ) -> object: ...


class LocalTools(Protocol):
    """Local CPU tools; each raises a named MqiError when it fails."""

    async def interpret(self, *, case_path: Path, csv_dir: Path, log_path: Path) -> None:
        """Write the case's fluence CSVs into a fresh `csv_dir` (any earlier content is gone)."""
        ...

    async def make_rt_dose(
        self,
        *,
        source: Path,
        target: Path,
        tps_input: Path,
        plan: Path,
        beam_number: int,
        log_path: Path,
    ) -> None:
        """Convert a raw dose (or validate MOQUI's DICOM) into an RT Dose file at target."""
        ...

    async def postprocess(self, *, values: Mapping[str, str], log_path: Path) -> bool | None:
        """Run the post-processing command; None when none is configured."""
        ...

    async def write_plan_fluence(
        self, *, plan: Path, csv_dir: Path, beams: Sequence[tuple[int, str]], room: str | None
    ) -> None:
        """A fresh `csv_dir` with plan/ (the RTPLAN) and log/ (fluence CSVs of the plan's own
        spots, one field folder per (BeamNumber, BeamName)), for the planned MOQUI run."""
        ...

    async def compare_doses(
        self, *, reference: Sequence[Path], evaluated: Sequence[Path], gamma_output: Path
    ) -> dict[str, object]:
        """The 3-D gamma (qa.gamma) of the summed `evaluated` doses against the summed
        `reference` ones, off the loop; its summary. Raises the named PermanentError when they
        cannot be compared, TransientError when the worker failed."""
        ...

    async def build_report(self, *, case_id: str, log_dir: Path) -> dict[str, object]:
        """Write the case report (PDF and HTML) in a process of its own and record it.

        Raises PermanentError `unknown_case`; TransientError `report_failed`, `report_timeout`.
        """
        ...

    async def check_delivery(
        self,
        *,
        folder: Path,
        plan: Path,
        beam_number: int,
        room: str | None,
        detail_output: Path,
    ) -> dict[str, object]:
        """One delivery's record against the plan, off the loop; its summary numbers.

        Raises PermanentError with the check's code when it cannot be computed,
        TransientError when the worker failed or timed out.
        """
        ...


class CaseSource(Protocol):
    """Reads a case folder (off the event loop) and resolves it with the domain rules."""

    async def resolve(
        self, case_id: str, case_path: str, *, now: datetime
    ) -> ResolvedCase | Waiting:
        """Raises IngestError with a named code when the case is broken."""
        ...

    async def plan_uid(self, plan_path: str) -> str:
        """The RTPLAN's SOPInstanceUID (header only, off the loop)."""
        ...

    async def tps_doses(self, case_path: str, plan_uid: str) -> TpsDoseFiles:
        """The planned RT Doses in the case folder that reference the plan."""
        ...

    async def list_deliveries(
        self, case_id: str, case_path: str, *, now: datetime
    ) -> tuple[tuple[DeliveryRecord, ...], tuple[str, ...]]:
        """Every delivery folder of a resolved case with its fraction, and `code: sentence`
        for folders that match no beam. Raises IngestError when the plan cannot be read."""
        ...
