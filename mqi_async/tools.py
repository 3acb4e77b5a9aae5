"""Local CPU tools (interpreter, raw -> RT Dose, post-processing) as asyncio subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from mqi_async.check_criteria import delivery_calibration, delivery_criteria, room_key
from mqi_async.config import QaSettings, ToolsSettings
from mqi_async.domain.errors import (
    PermanentError,
    TransientError,
)
from mqi_async.fluence_files import prepare_fluence_tree
from mqi_async.qa.client import GAMMA_OP, ask_worker, delivery_in_worker, delivery_request

#: the bundled interpreter simulator, used when `tools.interpreter` is null
BUNDLED_INTERPRETER = Path(__file__).parent / "demo" / "bin" / "mqi_interpreter"

_KILL_GRACE_S = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolResult:
    """How one tool run ended; its output is in `log_path`."""

    argv: tuple[str, ...]
    exit_code: int | None
    timed_out: bool
    log_path: Path
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def last_line(self) -> str:
        """The last non-empty log line, for error messages."""
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(max(0, self.log_path.stat().st_size - 4096))
                lines = fh.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return ""
        for line in reversed(lines):
            if line.strip():
                return line.strip()[:300]
        return ""


def fill_placeholders(argv: Sequence[str], values: Mapping[str, str]) -> list[str]:
    """Substitute `{name}` placeholders in each argument; unknown names are an error."""
    out = []
    for arg in argv:
        try:
            out.append(arg.format_map(dict(values)))
        except (KeyError, ValueError, IndexError) as exc:
            raise PermanentError("tool_missing", f"bad placeholder in {arg!r}: {exc}") from exc
    return out


def _resolve_executable(argv0: str) -> str | None:
    if os.sep in argv0:
        return argv0 if os.access(argv0, os.X_OK) and Path(argv0).is_file() else None
    return shutil.which(argv0)


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """TERM the whole process group, then KILL it if it lingers."""
    if proc.returncode is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, _KILL_GRACE_S), (signal.SIGKILL, _KILL_GRACE_S)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            async with asyncio.timeout(wait_s):
                await proc.wait()
            return
        except TimeoutError:
            continue


class Tools:
    """Runs the configured local tools, at most `max_concurrent` at a time."""

    def __init__(self, settings: ToolsSettings) -> None:
        self._settings = settings
        self._slots = asyncio.Semaphore(settings.max_concurrent or os.cpu_count() or 2)

    def interpreter_argv(self) -> list[str]:
        if self._settings.interpreter is not None:
            return list(self._settings.interpreter)
        return [
            sys.executable,
            str(BUNDLED_INTERPRETER),
            "--logdir",
            "{case_dir}",
            "--outputdir",
            "{csv_dir}",
        ]

    def check(self) -> list[str]:
        """Problems with the configured tools (missing executables), one line each."""
        problems = []
        candidates: list[tuple[str, list[str]]] = [("tools.interpreter", self.interpreter_argv())]
        if isinstance(self._settings.raw_to_dicom, list):
            candidates.append(("tools.raw_to_dicom", self._settings.raw_to_dicom))
        if self._settings.postprocess is not None:
            candidates.append(("tools.postprocess", self._settings.postprocess))
        for key, argv in candidates:
            if "{" in argv[0]:
                continue
            if _resolve_executable(argv[0]) is None:
                problems.append(f"{key}: {argv[0]!r} is not an executable file or on PATH")
        return problems

    async def run(
        self,
        argv: Sequence[str],
        *,
        log_path: Path,
        timeout_s: float,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> ToolResult:
        """Run one tool; stdout and stderr go to `log_path`; the group is killed on timeout or cancel.

        Its process group is recorded beside the log (`<log>.pid`): a run left behind by a
        killed service is stopped before the same tool runs again for the same output.
        """
        exe = _resolve_executable(argv[0])
        if exe is None:
            raise PermanentError(
                "tool_missing", f"{argv[0]!r} is not an executable file or on PATH"
            )
        log_path.parent.mkdir(parents=True, exist_ok=True)
        pid_file = log_path.with_suffix(".pid")
        await asyncio.to_thread(kill_recorded_group, pid_file)
        started = asyncio.get_running_loop().time()
        async with self._slots:
            with log_path.open("ab") as log:
                header = f"# {datetime.now(UTC).isoformat()} {' '.join(argv)}\n"
                log.write(header.encode())
                log.flush()
                proc = await asyncio.create_subprocess_exec(
                    exe,
                    *argv[1:],
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=asyncio.subprocess.STDOUT,
                    cwd=cwd,
                    env={**os.environ, **(env or {})},
                    start_new_session=True,  # its own process group, so kill reaches children
                )
                await asyncio.to_thread(record_group, pid_file, proc.pid)
                timed_out = False
                try:
                    async with asyncio.timeout(timeout_s):
                        await proc.wait()
                except TimeoutError:
                    timed_out = True
                    await _kill_group(proc)
                except asyncio.CancelledError:
                    await asyncio.shield(_kill_group(proc))
                    raise
                finally:
                    pid_file.unlink(missing_ok=True)
        return ToolResult(
            argv=tuple(argv),
            exit_code=proc.returncode,
            timed_out=timed_out,
            log_path=log_path,
            duration_s=asyncio.get_running_loop().time() - started,
        )


class DoseWorker:
    """One warm `python -m mqi_async.dose --serve` process: no interpreter start per beam.

    Requests go one at a time; a timeout or a crash kills its process group, and the next
    request starts a fresh worker. The numpy/pydicom work never runs on the event loop.
    """

    def __init__(
        self,
        *,
        timeout_s: float,
        failure_code: str = "dose_conversion_failed",
        timeout_code: str = "dose_conversion_failed",
    ) -> None:
        self._timeout_s = timeout_s
        self._failure_code = failure_code
        self._timeout_code = timeout_code
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    async def _start(self) -> asyncio.subprocess.Process:
        if self._proc is None or self._proc.returncode is not None:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "mqi_async.dose",
                "--serve",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
                start_new_session=True,
            )
        return self._proc

    async def request(self, payload: Mapping[str, object]) -> dict[str, object]:
        """Send one request and wait for its answer; raises TransientError if the worker fails."""
        async with self._lock:
            proc = await self._start()
            assert proc.stdin is not None and proc.stdout is not None
            try:
                async with asyncio.timeout(self._timeout_s):
                    proc.stdin.write((json.dumps(dict(payload)) + "\n").encode())
                    await proc.stdin.drain()
                    line = await proc.stdout.readline()
            except TimeoutError as exc:
                await self._kill()
                raise TransientError(
                    self._timeout_code,
                    f"the worker gave no answer within {self._timeout_s:g} s; it was stopped",
                ) from exc
            except (ConnectionError, BrokenPipeError) as exc:
                await self._kill()
                raise TransientError(self._failure_code, f"dose worker: {exc!r}") from exc
            except asyncio.CancelledError:
                await asyncio.shield(self._kill())
                raise
            if not line:
                await self._kill()
                raise TransientError(self._failure_code, "the dose worker exited")
            answer: dict[str, object] = json.loads(line)
            return answer

    async def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            await _kill_group(proc)

    async def aclose(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            async with asyncio.timeout(3):
                await proc.wait()
        except TimeoutError:
            await _kill_group(proc)


#: the dose gamma's search step is the distance criterion / this (PyMedPhys's interp_fraction)
GAMMA_INTERP_FRACTION = 10


def _write_plan_inputs(
    plan: Path,
    csv_dir: Path,
    beams: list[tuple[int, str]],
    mu_per_count: float,
    time_gain_ms: float,
    moqui: Mapping[str, str | int | float | bool],
) -> None:
    """csv_dir afresh: the RTPLAN under plan/ and the plan's fluence CSVs under log/."""
    from mqi_async.qa.plan_fluence import write_plan_fluence
    from mqi_async.qa.plan_layers import PlanLayersError

    _fresh_dir(csv_dir)
    (csv_dir / "plan").mkdir(parents=True)
    shutil.copy2(plan, csv_dir / "plan" / plan.name)
    try:
        write_plan_fluence(
            plan, csv_dir / "log", beams, mu_per_count=mu_per_count, time_gain_ms=time_gain_ms
        )
    except PlanLayersError as exc:
        raise PermanentError("delivery_plan_unreadable", str(exc)) from exc
    # the same checks as the interpreter's CSVs get (form, histories)
    prepare_fluence_tree(csv_dir / "log", moqui)


class LocalToolRunner:
    """The engine's LocalTools: each tool run becomes success or a named error."""

    def __init__(
        self,
        tools: Tools,
        settings: ToolsSettings,
        moqui: Mapping[str, str | int | float | bool],
        dose_worker: DoseWorker,
        *,
        qa_worker: DoseWorker | None = None,
        qa: QaSettings | None = None,
        report_base: Mapping[str, object] | None = None,
        report_timeout_s: float = 600.0,
    ) -> None:
        self._tools = tools
        self._s = settings
        self._output_format = str(moqui.get("OutputFormat", "raw"))
        self._moqui = dict(moqui)
        self._dose = dose_worker
        # checks get their own worker, so a long check never holds up a beam's conversion
        self._qa_worker = qa_worker or dose_worker
        self._qa = qa or QaSettings()
        #: the report process's settings but the case (report.model.ReportSettings as JSON)
        self._report_base = dict(report_base or {})
        self._report_timeout_s = report_timeout_s

    def check(self) -> list[str]:
        return self._tools.check()

    async def interpret(self, *, case_path: Path, csv_dir: Path, log_path: Path) -> None:
        argv = fill_placeholders(
            self._tools.interpreter_argv(), {"case_dir": str(case_path), "csv_dir": str(csv_dir)}
        )
        # a run left by a killed service must stop before its folder is cleared and refilled
        await asyncio.to_thread(kill_recorded_group, log_path.with_suffix(".pid"))
        await asyncio.to_thread(_fresh_dir, csv_dir)
        result = await self._tools.run(
            argv, log_path=log_path, timeout_s=self._s.interpreter_timeout_seconds, cwd=csv_dir
        )
        if result.timed_out:
            raise TransientError(
                "interpreter_timeout",
                f"killed after {self._s.interpreter_timeout_seconds:.0f} s; see {log_path}",
            )
        if not result.ok:
            raise TransientError(
                "interpreter_failed",
                f"exit {result.exit_code}: {result.last_line() or 'no output'} (log: {log_path})",
            )
        # one CSV form every MOQUI build parses right; bad rows fail here, before any launch
        await asyncio.to_thread(prepare_fluence_tree, csv_dir / "log", self._moqui)

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
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(self._s.raw_to_dicom, list) and self._output_format != "dcm":
            await self._external_converter(source, target, log_path)
            return
        op = "validate" if self._output_format == "dcm" else "convert"
        answer = await self._dose.request(
            {
                "op": op,
                "input": str(source),
                "output": str(target),
                "tps": str(tps_input),
                "plan": str(plan),
                "beam_number": beam_number,
            }
        )
        if not answer.get("ok"):
            code = str(answer.get("code") or "dose_conversion_failed")
            detail = str(answer.get("detail") or "")
            await asyncio.to_thread(_append_line, log_path, f"{code}: {detail}")
            raise TransientError(code, detail)
        if not target.is_file():
            raise TransientError("dose_conversion_failed", f"{target} was not written")

    async def _external_converter(self, source: Path, target: Path, log_path: Path) -> None:
        assert isinstance(self._s.raw_to_dicom, list)
        # a private folder per beam: a converter that names its own file can only ever write
        # this beam's dose, never be mistaken for another beam's
        private = target.parent / f".convert-{target.stem}"
        await asyncio.to_thread(_fresh_dir, private)
        argv = fill_placeholders(
            self._s.raw_to_dicom,
            {
                "input": str(source),
                "output_dir": str(private),
                "output": str(private / target.name),
            },
        )
        result = await self._tools.run(
            argv, log_path=log_path, timeout_s=self._s.raw_to_dicom_timeout_seconds
        )
        if not result.ok:
            raise TransientError(
                "dose_conversion_failed", f"{result.last_line() or 'no output'} (log: {log_path})"
            )
        written = await asyncio.to_thread(lambda: sorted(private.glob("*.dcm")))
        if len(written) != 1:
            raise TransientError(
                "converter_output_ambiguous",
                f"{argv[0]} wrote {len(written)} .dcm files into {private}, expected exactly one",
            )
        await asyncio.to_thread(_publish, written[0], target, private)

    async def postprocess(self, *, values: Mapping[str, str], log_path: Path) -> bool | None:
        if self._s.postprocess is None:
            return None
        argv = fill_placeholders(self._s.postprocess, values)
        result = await self._tools.run(
            argv, log_path=log_path, timeout_s=self._s.postprocess_timeout_seconds
        )
        return result.ok

    async def write_plan_fluence(
        self, *, plan: Path, csv_dir: Path, beams: Sequence[tuple[int, str]], room: str | None
    ) -> None:
        """The planned run's inputs: plan/ and log/ (the plan's spots as fluence CSVs)."""
        key = room_key(room)
        d = self._qa.delivery
        await asyncio.to_thread(
            _write_plan_inputs,
            plan,
            csv_dir,
            list(beams),
            d.mu_per_count[key],
            d.calibration[key].time_gain_ms,
            self._moqui,
        )

    async def compare_doses(
        self, *, reference: Sequence[Path], evaluated: Sequence[Path], gamma_output: Path
    ) -> dict[str, object]:
        """The 3-D gamma of qa.gamma in the QA worker (the planned-vs-delivered dose check)."""
        g = self._qa.gamma
        request: dict[str, object] = {
            "op": GAMMA_OP,
            "reference": [str(p) for p in reference],
            "evaluated": [str(p) for p in evaluated],
            "dose_percent": g.dose_percent,
            "distance_mm": g.distance_mm,
            "cutoff_percent": g.cutoff_percent,
            "local": g.normalisation == "local",
            "max_gamma": g.max_gamma,
            "interp_fraction": GAMMA_INTERP_FRACTION,
            "gamma_output": str(gamma_output),
        }
        return await ask_worker(self._qa_worker, request, failure_code="gamma_failed")

    async def check_delivery(
        self,
        *,
        folder: Path,
        plan: Path,
        beam_number: int,
        room: str | None,
        detail_output: Path,
    ) -> dict[str, object]:
        """One delivery check in the QA worker (`mqi_async.qa.delivery`)."""
        if not await asyncio.to_thread(folder.is_dir):
            raise PermanentError("delivery_folder_missing", f"{folder} is gone")
        request = delivery_request(
            folder=folder,
            plan=plan,
            beam_number=beam_number,
            room=room_key(room),
            criteria=delivery_criteria(self._qa, room),
            calibration=delivery_calibration(self._qa, room),
            detail_output=detail_output,
        )
        return await delivery_in_worker(self._qa_worker, request)

    async def build_report(self, *, case_id: str, log_dir: Path) -> dict[str, object]:
        """The case report, written by its own process (`python -m mqi_async.report`), so
        plotting never runs on the loop; returns its paths and verdict.

        Raises:
            PermanentError: `unknown_case`, `internal_error`.
            TransientError: `report_failed` (the process failed), `report_timeout`.
        """
        request_file = log_dir / "report_request.json"
        document = {**self._report_base, "case_id": case_id}
        await asyncio.to_thread(_write_private_json, request_file, document)
        result = await self._tools.run(
            [sys.executable, "-m", "mqi_async.report", "--request", str(request_file)],
            log_path=log_dir / "report.log",
            timeout_s=self._report_timeout_s,
        )
        if result.timed_out:
            raise TransientError(
                "report_timeout",
                f"stopped after {self._report_timeout_s:g} s; see {result.log_path}",
            )
        answer = await _read_answer(result)
        if result.ok and answer is not None and answer.get("ok"):
            return answer
        if answer is not None and answer.get("code") in ("unknown_case", "internal_error"):
            raise PermanentError(str(answer["code"]), str(answer.get("detail") or ""))
        detail = (answer or {}).get("detail") or await asyncio.to_thread(result.last_line)
        raise TransientError(
            "report_failed", f"exit {result.exit_code}: {detail} (log {result.log_path})"
        )


async def _read_answer(result: ToolResult) -> dict[str, object] | None:
    """The JSON line a tool printed last, if it printed one."""
    line = await asyncio.to_thread(result.last_line)
    try:
        answer = json.loads(line)
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else None


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def record_group(pid_file: Path, pid: int) -> None:
    """Write `<pid>\n<start ticks>\n<boot id>`: enough to know the group later, never a reused pid."""
    tmp = pid_file.with_name(pid_file.name + ".tmp")
    tmp.write_text(f"{pid}\n{_start_ticks(pid) or ''}\n{_boot_id()}\n")
    tmp.replace(pid_file)


def kill_recorded_group(pid_file: Path) -> bool:
    """Kill the process group recorded in `pid_file` if that very process still runs.

    True when an orphan was found and killed. The start time and boot id must match, so a
    pid reused by another program is never signalled.
    """
    try:
        pid_text, ticks, boot = (pid_file.read_text().splitlines() + ["", "", ""])[:3]
    except OSError:
        return False
    killed = False
    if pid_text.isdigit() and int(pid_text) > 1 and ticks and boot == _boot_id():
        pid = int(pid_text)
        if _start_ticks(pid) == ticks:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
                killed = True
            for _ in range(100):  # wait (bounded) until it is really gone
                if _start_ticks(pid) != ticks:
                    break
                time.sleep(0.02)
    pid_file.unlink(missing_ok=True)
    return killed


def _write_private_json(path: Path, document: Mapping[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(document, fh)


def _fresh_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, mode=0o700)


def _publish(written: Path, target: Path, private: Path) -> None:
    written.replace(target)
    shutil.rmtree(private, ignore_errors=True)


def _append_line(path: Path, line: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(line + "\n")
