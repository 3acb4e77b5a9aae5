"""Beam workflows: one idempotent step per phase, driven by the persisted status."""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from mqi_async.domain.claims import CLAIMS_DIR, claim_argv, claim_key, parse_owner, same_owner
from mqi_async.domain.errors import (
    FailureKind,
    HostUnavailableError,
    MqiError,
    PermanentError,
    TransientError,
    format_error,
    run_failure_code,
)
from mqi_async.domain.jobs import JobHandle, JobSpec, JobState, JobStatus
from mqi_async.domain.model import BeamStatus, RunStatus
from mqi_async.domain.moqui_log import failure_code_from_log
from mqi_async.domain.privacy import case_key
from mqi_async.domain.records import BeamRow, CaseRow, RunRow
from mqi_async.domain.scheduling import RUN_PROGRESS_START, decide_retry, run_progress
from mqi_async.domain.slurm import failure_code as slurm_failure_code
from mqi_async.domain.tps import TpsComputed, check_outputs, expected_outputs, render_tps_input
from mqi_async.engine.layout import CaseDirs, RemoteDirs
from mqi_async.engine.pollers import JobMonitor
from mqi_async.engine.ports import Clock, Host, LocalTools, Store
from mqi_async.engine.scheduler import GpuScheduler

log = logging.getLogger(__name__)

#: seconds the host may take to answer a case claim
CLAIM_TIMEOUT_S = 30.0

B = BeamStatus

#: progress shown when a beam enters each phase (RUNNING then follows MOQUI's log)
PHASE_PROGRESS: dict[BeamStatus, int] = {
    B.PENDING: 0,
    B.UPLOADING: 5,
    B.QUEUED: 10,
    B.LAUNCHING: 15,
    B.RUNNING: RUN_PROGRESS_START,
    B.DOWNLOADING: 92,
    B.CONVERTING: 96,
    B.COMPLETED: 100,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    """What a step decided: the next status and the row changes that go with it."""

    to: BeamStatus
    changes: Mapping[str, object]
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkflowSettings:
    moqui_static: Mapping[str, str | int | float | bool]
    moqui_argv: Mapping[str, tuple[str, ...]]
    run_timeout_s: float
    max_attempts: int
    backoff_initial_s: float
    backoff_max_s: float
    step_timeout_s: float
    work_directory: Path
    #: keys the opaque case names used on hosts (store.secret, `<database>.key`)
    case_key_secret: bytes
    #: `<service id> <who>`: claims cases on hosts (see domain/claims.py); "" claims nothing
    service_owner: str = ""


class InputUploads:
    """Case inputs go to a host once; concurrent beams of a case share one upload.

    The first upload of a case to a host claims the case there for this service (`owner`),
    so a second service with its own database never runs it too.
    """

    def __init__(self, owner: str = "") -> None:
        self._owner = owner
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._done: set[tuple[str, str]] = set()

    async def _claim(self, host: Host, case: CaseRow) -> None:
        argv = claim_argv(host.remote_root, claim_key(case.case_path), self._owner)
        result = await host.run(argv, timeout_s=CLAIM_TIMEOUT_S)
        on_file = parse_owner(result.stdout)
        if on_file is None:
            raise TransientError(
                "remote_command_failed",
                f"host {host.name}: the case claim gave no answer (exit {result.exit_status}): "
                f"{result.stderr.strip()[-300:]}",
            )
        if not same_owner(on_file, self._owner):
            raise PermanentError(
                "case_claimed_elsewhere",
                f"host {host.name} runs this case for another service ({on_file}); "
                f"claim file {CLAIMS_DIR}/{claim_key(case.case_path)} under {host.remote_root}",
            )

    async def ensure(self, host: Host, case: CaseRow, local: Path, remote: str) -> None:
        key = (host.name, case.case_id)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key in self._done:
                return
            if self._owner:
                await self._claim(host, case)
            report = await host.put_tree(local, remote)
            log.info(
                "inputs of %s on %s: %d sent, %d already there",
                case.case_id,
                host.name,
                report.files_sent,
                report.files_skipped,
                extra={"case_id": case.case_id, "host": host.name},
            )
            self._done.add(key)

    def forget(self, case_id: str) -> None:
        for key in [k for k in self._done if k[1] == case_id]:
            self._done.discard(key)


class BeamWorkflow:
    """Runs one beam from its persisted status to a terminal or paused status."""

    def __init__(
        self,
        *,
        store: Store,
        hosts: Mapping[str, Host],
        monitors: Mapping[str, JobMonitor],
        scheduler: GpuScheduler,
        tools: LocalTools,
        clock: Clock,
        settings: WorkflowSettings,
        uploads: InputUploads,
        on_terminal: Callable[[str], Awaitable[None]],
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self._hosts = hosts
        self._monitors = monitors
        self._scheduler = scheduler
        self._tools = tools
        self._clock = clock
        self._s = settings
        self._uploads = uploads
        self._on_terminal = on_terminal
        self._rng = rng or random.Random()
        self._steps: dict[BeamStatus, Callable[[BeamRow, CaseRow], Awaitable[Step]]] = {
            B.UPLOADING: self._upload,
            B.QUEUED: self._queue,
            B.LAUNCHING: self._launch,
            B.RUNNING: self._wait_run,
            B.DOWNLOADING: self._download,
            B.CONVERTING: self._convert,
        }
        #: in-place failures of transfer/convert steps since the last success, per beam
        self._step_failures: dict[str, int] = {}

    def forget_uploads(self, case_id: str) -> None:
        self._uploads.forget(case_id)

    def case_key(self, case: CaseRow) -> str:
        """The case's name on hosts (folders, command lines, job names)."""
        return case_key(self._s.case_key_secret, case.case_id)

    async def run(self, beam_id: str) -> None:
        """Advance the beam until it is terminal, paused, or still pending its case."""
        while True:
            beam = await self._store.get_beam(beam_id)
            if beam is None or beam.status not in self._steps:
                return
            case = await self._store.get_case(beam.case_id)
            if case is None:
                return
            step = await self._advance(beam, case)
            beam = await self._store.transition_beam(
                beam_id, step.to, changes=step.changes, message=step.message
            )
            log.info(
                "%s -> %s %s",
                beam_id,
                step.to,
                step.message,
                extra={"beam_id": beam_id, "case_id": beam.case_id, "host": beam.host},
            )
            if beam.status.is_terminal:
                await self._on_terminal(beam.case_id)
                return
            if beam.status == B.PAUSED:
                return

    async def _advance(self, beam: BeamRow, case: CaseRow) -> Step:
        try:
            return await self._steps[beam.status](beam, case)
        except HostUnavailableError as exc:
            return Step(
                to=B.PAUSED,
                changes={"resume_status": beam.status, "error": str(exc)},
                message=f"paused: {exc}",
            )
        except MqiError as exc:
            return await self._on_step_error(beam, exc)

    async def _on_step_error(self, beam: BeamRow, exc: MqiError) -> Step:
        if exc.kind == FailureKind.PAUSE:
            return Step(
                to=B.PAUSED,
                changes={"resume_status": beam.status, "error": str(exc)},
                message=str(exc),
            )
        if exc.kind == FailureKind.PERMANENT:
            await self._release(beam)
            return Step(to=B.FAILED, changes={"error": str(exc)}, message=str(exc))
        # transient trouble moving or converting files: retry the same step with backoff
        n = self._step_failures.get(beam.beam_id, 0) + 1
        self._step_failures[beam.beam_id] = n
        if n >= self._s.max_attempts:
            await self._release(beam)
            return Step(
                to=B.FAILED, changes={"error": str(exc)}, message=f"gave up after {n} tries: {exc}"
            )
        delay = min(self._s.backoff_max_s, self._s.backoff_initial_s * 2 ** (n - 1))
        log.warning(
            "%s: %s; retrying in %.0f s", beam.beam_id, exc, delay, extra={"beam_id": beam.beam_id}
        )
        await asyncio.sleep(delay * self._rng.uniform(0.5, 1.0))
        return Step(to=beam.status, changes={"error": str(exc)}, message=f"retry after {exc.code}")

    async def _latest_run(self, beam_id: str) -> RunRow | None:
        runs = await self._store.list_runs(beam_id)
        return max(runs, key=lambda r: r.attempt) if runs else None

    async def _release(self, beam: BeamRow) -> None:
        await self._scheduler.release(beam.beam_id)

    # -- steps -------------------------------------------------------------------------

    async def _upload(self, beam: BeamRow, case: CaseRow) -> Step:
        dirs = CaseDirs.of(self._s.work_directory, case)
        # Sent ahead (while the beam waits for a GPU) only where it will run: with one host.
        # With several, patient data goes only to the host a beam is granted, at launch.
        for host in self._hosts.values() if len(self._hosts) == 1 else ():
            if not host.is_available():
                continue
            remote = RemoteDirs.of(host.remote_root, self.case_key(case), beam)
            try:
                await self._uploads.ensure(host, case, dirs.csv, remote.inputs)
            except MqiError as exc:
                # another host may still take the beam; launch re-uploads to its host
                log.warning(
                    "upload to %s failed: %s", host.name, exc, extra={"beam_id": beam.beam_id}
                )
        return Step(
            to=B.QUEUED, changes={"progress": PHASE_PROGRESS[B.QUEUED]}, message="inputs uploaded"
        )

    async def _queue(self, beam: BeamRow, case: CaseRow) -> Step:
        if beam.not_before_at is not None:
            # the deadline is wall time so it survives a restart; the wait is capped at the
            # longest backoff so a clock set back cannot hold a beam for hours
            wait_s = min(
                (beam.not_before_at - self._clock.now()).total_seconds(), self._s.backoff_max_s
            )
            if wait_s > 0:
                await asyncio.sleep(wait_s)
        grant = await self._scheduler.acquire(beam.beam_id, case.priority)
        return Step(
            to=B.LAUNCHING,
            changes={
                "host": grant.host,
                "gpu_uuids": list(grant.gpu_uuids),
                "gpu_indices": list(grant.gpu_indices),
                "progress": PHASE_PROGRESS[B.LAUNCHING],
                "not_before_at": None,
            },
            message=f"granted {grant.host} {','.join(map(str, grant.gpu_indices)) or '(scheduler)'}",
        )

    async def _launch(self, beam: BeamRow, case: CaseRow) -> Step:
        assert beam.host is not None
        host = self._hosts[beam.host]
        remote = RemoteDirs.of(host.remote_root, self.case_key(case), beam)
        run = await self._latest_run(beam.beam_id)
        if run is not None and run.status == RunStatus.LAUNCHING:
            # we crashed (or lost the host) around the spawn: adopt what started; otherwise the
            # launch below goes to the same folder, where at most one wrapper can ever run
            attached = await host.attach_job(run.job_dir)
            if attached is not None:
                return await self._adopt(run, attached, "re-attached after restart")
        else:
            run = None
        dirs = CaseDirs.of(self._s.work_directory, case)
        await self._uploads.ensure(host, case, dirs.csv, remote.inputs)
        indices = beam.gpu_indices
        if run is None:
            token = secrets.token_hex(4)
            run = await self._store.start_run(
                beam.beam_id,
                host=host.name,
                gpu_uuids=beam.gpu_uuids,
                job_dir_for=lambda n: remote.attempt(n, token),
            )
        gantry = case.gantry or 2
        tps = render_tps_input(
            self._s.moqui_static,
            TpsComputed(
                gpu_id=0,
                parent_dir=remote.inputs,
                dicom_dir=remote.plan,
                log_dir=remote.logs,
                output_dir=str(PurePosixPath(run.job_dir) / "dose"),
                beam_number=_beam_number(beam),
                gantry=gantry,
            ),
        )
        env: list[tuple[str, str]] = []
        if host.leases_gpus and indices:
            env = [
                ("CUDA_DEVICE_ORDER", "PCI_BUS_ID"),
                ("CUDA_VISIBLE_DEVICES", ",".join(map(str, indices))),
            ]
        argv = (*self._s.moqui_argv[host.name], str(PurePosixPath(run.job_dir) / "moqui_tps.in"))
        spec = JobSpec(
            job_dir=run.job_dir,
            argv=argv,
            env=tuple(env),
            files=(("moqui_tps.in", tps),),
            # ps and squeue show it to every user of the host: the opaque key, never the id
            name=f"mqi-{self.case_key(case)}-b{beam.beam_index}",
            time_limit_s=self._s.run_timeout_s,
        )
        try:
            handle = await host.spawn_job(spec)
        except HostUnavailableError:
            # the job may or may not have started: pause here; resuming checks its folder
            raise
        except (TransientError, PermanentError) as exc:
            # the reply may be lost while the job runs: adopt it, or fence the folder so that
            # nothing can start there once a new attempt has begun
            attached = await host.attach_job(run.job_dir, fence=True)
            if attached is not None:
                return await self._adopt(
                    run, attached, f"adopted after an uncertain launch ({exc})"
                )
            await self._store.finish_run(
                run.run_id, RunStatus.FAILED, error=format_error("launch_failed", str(exc))
            )
            return await self._attempt_failed(beam, "launch_failed", str(exc))
        return await self._adopt(
            run, handle, f"launched attempt {run.attempt} on {host.name} (job {handle.job_id})"
        )

    async def _adopt(self, run: RunRow, handle: JobHandle, message: str) -> Step:
        await self._store.set_run_job(run.run_id, handle.job_id)
        return Step(to=B.RUNNING, changes={"progress": RUN_PROGRESS_START}, message=message)

    async def _wait_run(self, beam: BeamRow, case: CaseRow) -> Step:
        assert beam.host is not None
        host = self._hosts[beam.host]
        run = await self._latest_run(beam.beam_id)
        if run is None or run.job_id is None:
            return await self._attempt_failed(beam, "run_lost", "no launched run is recorded")
        handle = JobHandle(job_dir=run.job_dir, job_id=run.job_id)
        watch_started = self._clock.monotonic()
        progress = max(beam.progress, RUN_PROGRESS_START)
        tail_file = (
            CaseDirs.of(self._s.work_directory, case).attempt(beam, run.attempt) / "moqui.log.tail"
        )

        async def on_tail(tail: str) -> None:
            nonlocal progress
            # the dashboard's `l` shows this while the full log is still on the host
            await asyncio.to_thread(_write_text, tail_file, tail)
            new = run_progress(tail, progress)
            if new > progress:
                progress = new
                await self._store.update_beam(beam.beam_id, {"progress": new})

        def over_time(status: JobStatus) -> bool:
            # the host's own measure of the run; queue time, outages and our restarts never
            # count. Without it, only the time this process has itself seen the job running.
            if status.state != JobState.RUNNING:
                return False
            ran_s = status.run_seconds
            if ran_s is None:
                ran_s = self._clock.monotonic() - watch_started
            return ran_s > self._s.run_timeout_s

        status = await self._monitors[host.name].wait_exit(handle, on_tail, give_up=over_time)
        if status.state == JobState.RUNNING:
            await host.kill_job(handle)  # a no-op for a job that has written its exit file
            after = (await host.poll_jobs([handle])).get(handle.job_dir)
            if not (after and after.state == JobState.EXITED and after.exit_code == 0):
                await self._store.finish_run(
                    run.run_id, RunStatus.KILLED, error=format_error("run_timeout")
                )
                await self._release(beam)
                return await self._attempt_failed(
                    beam, "run_timeout", f"killed after {self._s.run_timeout_s:.0f} s of running"
                )
            status = after  # it finished on its own just before the kill
        # the process is gone: free the GPUs now so the download overlaps the next run
        await self._release(beam)
        return await self._judge_run(beam, case, run, status, host)

    async def _judge_run(
        self, beam: BeamRow, case: CaseRow, run: RunRow, status: JobStatus, host: Host
    ) -> Step:
        tail = status.log_tail.strip().splitlines()[-3:] if status.log_tail else []
        last = " | ".join(line.strip() for line in tail)[:300]
        scheduler_code = slurm_failure_code(status.detail)
        if status.state == JobState.LOST:
            code = scheduler_code or "run_lost"
            listing = await host.list_dir(str(PurePosixPath(run.job_dir) / "dose"))
            outputs = expected_outputs(self._s.moqui_static, beam.beam_name or "")
            seen = sum(o.name in listing for o in outputs)
            detail = f"{status.detail}; {seen} of {len(outputs)} output file(s) present"
            await self._store.finish_run(
                run.run_id, RunStatus.LOST, error=format_error(code, detail)
            )
            return await self._attempt_failed(beam, code, detail)
        if status.exit_code != 0:
            # name by exit status, as a shell reports it (134 = abort); the signal goes in the text
            code = (
                scheduler_code
                or failure_code_from_log(status.log_tail or "")
                or run_failure_code(
                    status.exit_code, None if status.exit_code is not None else status.signal
                )
            )
            how = f"exit {status.exit_code}" + (f" (SIG{status.signal})" if status.signal else "")
            detail = f"MOQUI ended with {how}" + (f": {last}" if last else "")
            await self._store.finish_run(
                run.run_id,
                RunStatus.FAILED,
                exit_code=status.exit_code,
                signal=status.signal,
                error=format_error(code, detail),
            )
            return await self._attempt_failed(beam, code, detail)
        expected = expected_outputs(self._s.moqui_static, beam.beam_name or "")
        listing = await host.list_dir(str(PurePosixPath(run.job_dir) / "dose"))
        # a build may write another slab size, or .raw instead of .dcm (domain/tps.py)
        found = check_outputs(expected, listing)
        missing, short = list(found.missing), list(found.wrong_size)
        if missing or short:
            code = "missing_output" if missing else "short_output"
            detail = f"{'missing' if missing else 'wrong size'}: {', '.join(missing or short)}"
            await self._store.finish_run(
                run.run_id, RunStatus.FAILED, exit_code=0, error=format_error(code, detail)
            )
            return await self._attempt_failed(beam, code, detail)
        await self._store.finish_run(run.run_id, RunStatus.SUCCEEDED, exit_code=0)
        self._step_failures.pop(beam.beam_id, None)
        return Step(
            to=B.DOWNLOADING,
            changes={"progress": PHASE_PROGRESS[B.DOWNLOADING], "error": None},
            message="MOQUI finished",
        )

    async def _attempt_failed(self, beam: BeamRow, code: str, detail: str) -> Step:
        """A MOQUI attempt failed: queue another with backoff, or fail the beam."""
        current = await self._store.get_beam(beam.beam_id) or beam
        decision = decide_retry(
            code,
            attempts_used=current.attempts - current.attempts_base,
            max_attempts=self._s.max_attempts,
            now=self._clock.now(),
            initial_s=self._s.backoff_initial_s,
            max_s=self._s.backoff_max_s,
            rng=self._rng,
        )
        error = format_error(code, detail)
        if decision.retry:
            return Step(
                to=B.QUEUED,
                changes={
                    "error": error,
                    "not_before_at": decision.not_before,
                    "progress": PHASE_PROGRESS[B.QUEUED],
                },
                message=f"attempt {current.attempts} failed ({code}); retrying",
            )
        await self._release(beam)
        return Step(to=B.FAILED, changes={"error": error}, message=f"failed: {error}")

    async def _download(self, beam: BeamRow, case: CaseRow) -> Step:
        assert beam.host is not None
        host = self._hosts[beam.host]
        run = await self._latest_run(beam.beam_id)
        if run is None:
            raise PermanentError("internal_error", "no run to download")
        dirs = CaseDirs.of(self._s.work_directory, case)
        local = dirs.attempt(beam, run.attempt)
        expected = expected_outputs(self._s.moqui_static, beam.beam_name or "")
        listing = await host.list_dir(str(PurePosixPath(run.job_dir) / "dose"))
        names = [o.name for o in check_outputs(expected, listing).found] or [
            o.name for o in expected
        ]

        latest: list[tuple[int, int]] = []

        def progress(done: int, total: int) -> None:
            latest.append((done, total))

        async def publish_progress() -> None:
            # transfer callbacks are synchronous; the latest figure goes to the store twice a second
            while True:
                await asyncio.sleep(0.5)
                if latest:
                    done, total = latest[-1]
                    latest.clear()
                    await self._store.update_beam(
                        beam.beam_id, {"transfer_done_bytes": done, "transfer_total_bytes": total}
                    )

        failure: Exception | None = None
        async with asyncio.TaskGroup() as tg:
            reporter = tg.create_task(publish_progress())
            try:
                await host.get_files(
                    str(PurePosixPath(run.job_dir) / "dose"),
                    names,
                    local / "dose",
                    progress=progress,
                )
                await host.get_files(run.job_dir, ["moqui.log", "moqui_tps.in"], local)
            except Exception as exc:
                # raised after the group, so the step sees the named error, not an ExceptionGroup
                failure = exc
            finally:
                reporter.cancel()
        if failure is not None:
            raise failure
        if latest:
            done, total = latest[-1]
            await self._store.update_beam(
                beam.beam_id, {"transfer_done_bytes": done, "transfer_total_bytes": total}
            )
        return Step(
            to=B.CONVERTING,
            changes={"progress": PHASE_PROGRESS[B.CONVERTING]},
            message=f"downloaded {len(names)} file(s)",
        )

    async def _convert(self, beam: BeamRow, case: CaseRow) -> Step:
        run = await self._latest_run(beam.beam_id)
        if run is None:
            raise PermanentError("internal_error", "no run to convert")
        dirs = CaseDirs.of(self._s.work_directory, case)
        local = dirs.attempt(beam, run.attempt)
        outputs: list[str] = []
        expected = expected_outputs(self._s.moqui_static, beam.beam_name or "")
        present = await asyncio.to_thread(_file_sizes, local / "dose")
        for out in check_outputs(expected, present).found or expected:
            target = dirs.dose / f"{dirs.beam_stem(beam)}_{Path(out.name).stem}.dcm"
            await self._tools.make_rt_dose(
                source=local / "dose" / out.name,
                target=target,
                tps_input=local / "moqui_tps.in",
                plan=Path(case.plan_path or ""),
                beam_number=_beam_number(beam),
                log_path=local / "convert.log",
            )
            outputs.append(str(target))
        self._step_failures.pop(beam.beam_id, None)
        return Step(
            to=B.COMPLETED,
            changes={"progress": 100, "outputs": outputs, "error": None},
            message=f"RT Dose written: {', '.join(Path(o).name for o in outputs)}",
        )


def _beam_number(beam: BeamRow) -> int:
    if beam.beam_number is None:
        raise PermanentError("internal_error", f"{beam.beam_id} has no DICOM beam number")
    return beam.beam_number


def _file_sizes(folder: Path) -> dict[str, int]:
    try:
        return {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    except OSError:
        return {}


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8", errors="replace")
    tmp.replace(path)
