"""Slurm output parsing, the status rule, and the batch script run by plain sh (no Slurm)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from mqi_async.config import Settings, SlurmHostSettings
from mqi_async.domain import slurm
from mqi_async.domain.errors import ConfigError
from mqi_async.domain.jobs import JobSpec, JobState
from mqi_async.domain.slurm import AcctRow, Observation, QueueRow, judge
from mqi_async.hpc.slurm import SlurmHost, batch_script
from mqi_async.hpc.ssh import ConnectLimiter
from mqi_async.service import build_hosts


def test_sbatch_parsable_output() -> None:
    assert slurm.parse_sbatch_output("1234\n") == "1234"
    assert slurm.parse_sbatch_output("1234;cluster\n") == "1234"
    assert slurm.parse_sbatch_output("sbatch: warning: x\n77\n") == "77"
    assert slurm.parse_sbatch_output("") is None
    assert slurm.parse_sbatch_output("Submitted batch job 5\n") is None


def test_squeue_rows_and_error_lines() -> None:
    text = (
        "5|PENDING|Resources\n6|PENDING|Priority\n1|RUNNING|None\n"
        "8|CANCELLED|None\n9|COMPLETING|(null)\n"
        "slurm_load_jobs error: Invalid job id specified\n"
    )
    rows = slurm.parse_squeue(text)
    assert rows["5"] == QueueRow(job_id="5", state="PENDING", reason="Resources")
    assert rows["1"].reason == "" and rows["9"].reason == ""
    assert set(rows) == {"5", "6", "1", "8", "9"}


def test_sacct_exit_codes_and_signals() -> None:
    rows = slurm.parse_sacct(
        "9|FAILED|3:0\n8|CANCELLED by 0|0:15\n7|TIMEOUT|0:0\n6|COMPLETED|0:0\n6.batch|X|0:0\n"
    )
    assert rows["9"] == AcctRow(job_id="9", state="FAILED", exit_code=3)
    assert rows["8"] == AcctRow(job_id="8", state="CANCELLED", exit_code=143, signal="TERM")
    assert rows["7"].exit_code == 0 and rows["7"].state == "TIMEOUT"
    assert "6.batch" not in rows


def test_gres_counts() -> None:
    assert slurm.gpu_count("gpu:4") == 4
    assert slurm.gpu_count("gpu:a100:2(IDX:0-1),gpu:v100:1(IDX:3)") == 3
    assert slurm.gpu_count("gpu:0") == 0
    assert slurm.gpu_count("(null)") == 0
    nodes = slurm.parse_sinfo_nodes("n1|mix|gpu:4|gpu:3(IDX:0-2)|\nn1|mix|gpu:4|gpu:3|\n")
    assert nodes == (slurm.SlurmNode(name="n1", state="mix", gpus_total=4, gpus_used=3),)


def test_queue_jobs_keep_names_with_bars() -> None:
    jobs = slurm.parse_queue_jobs(
        "5|PENDING|Resources|gres:gpu:1||0:00|mqi-a|b\n1|RUNNING|None|gres:gpu:1|n1|0:07|mqi-c\n"
    )
    assert [j.name for j in jobs] == ["mqi-a|b", "mqi-c"]
    queue = slurm.SlurmQueue(host="c", taken_at=None, jobs=jobs, nodes=())  # type: ignore[arg-type]
    assert [j.job_id for j in queue.pending] == ["5"]
    assert [j.job_id for j in queue.running] == ["1"]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 5400),
        ("1:30", 90),
        ("02:00:00", 7200),
        ("1-0", 86400),
        ("1-02:03", 93780),
        ("1-02:03:04", 93784),
        ("UNLIMITED", None),
    ],
)
def test_time_limits(text: str, seconds: int | None) -> None:
    assert slurm.parse_time_limit(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "1:2:3:4", "0", "1-x", "-5"])
def test_bad_time_limits(text: str) -> None:
    with pytest.raises(ValueError):
        slurm.parse_time_limit(text)


def test_time_limit_rounds_up_to_minutes() -> None:
    assert slurm.format_time_limit(1) == "00:01:00"
    assert slurm.format_time_limit(7200) == "02:00:00"
    assert slurm.format_time_limit(7201) == "02:01:00"
    assert slurm.format_time_limit(3 * 86400 + 60) == "3-00:01:00"


def test_named_failures() -> None:
    assert slurm.failure_code("TIMEOUT") == "slurm_timeout"
    assert slurm.failure_code("OUT_OF_MEMORY") == "slurm_out_of_memory"
    assert slurm.failure_code("NODE_FAIL") == "slurm_node_fail"
    assert slurm.failure_code("PREEMPTED") == "slurm_preempted"
    assert slurm.failure_code("CANCELLED") == "slurm_cancelled"
    assert slurm.failure_code("FAILED") is None
    assert slurm.failure_code("") is None and slurm.failure_code("Resources") is None


def test_controller_messages() -> None:
    assert slurm.controller_unreachable(
        "slurm_load_jobs error: Unable to contact slurm controller (connect failure)"
    )
    assert slurm.controller_unreachable("sbatch: error: Socket timed out on send/recv operation")
    assert not slurm.controller_unreachable("slurm_load_jobs error: Invalid job id specified")


def test_job_names_are_safe() -> None:
    assert slurm.job_name("mqi-a b;$(x)-b1") == "mqi-a_b___x_-b1"
    assert len(slurm.job_name("x" * 500)) == 100


# -- the status rule ----------------------------------------------------------------------

D = "/r/c/beam_1/1"


def _q(state: str, reason: str = "") -> QueueRow:
    return QueueRow(job_id="7", state=state, reason=reason)


def test_pending_is_queued_with_reason() -> None:
    v = judge(
        Observation(job_dir=D, queue_known=True, queue=_q("PENDING", "Resources")), settled=False
    )
    assert v.status is not None and v.status.state == JobState.QUEUED
    assert v.status.detail == "Resources"


def test_running_without_exit_file() -> None:
    v = judge(Observation(job_dir=D, queue_known=True, queue=_q("RUNNING")), settled=True)
    assert v.status is not None and v.status.state == JobState.RUNNING


def test_exit_file_with_final_state_names_it() -> None:
    obs = Observation(
        job_dir=D, exit_code=143, exit_signal="TERM", queue_known=True, queue=_q("TIMEOUT")
    )
    v = judge(obs, settled=False)
    assert v.status is not None and v.status.state == JobState.EXITED
    assert (v.status.exit_code, v.status.signal, v.status.detail) == (143, "TERM", "TIMEOUT")


def test_exit_file_while_completing_waits_then_decides() -> None:
    obs = Observation(job_dir=D, exit_code=0, queue_known=True, queue=_q("COMPLETING"))
    assert judge(obs, settled=False).status is None
    v = judge(obs, settled=True)
    assert v.status is not None and v.status.exit_code == 0


def test_exit_file_decides_when_controller_is_down() -> None:
    v = judge(Observation(job_dir=D, exit_code=3, queue_known=False), settled=False)
    assert v.status is not None and v.status.state == JobState.EXITED
    assert v.status.exit_code == 3 and v.status.detail == ""


def test_no_exit_file_and_controller_down_is_unknown() -> None:
    assert judge(Observation(job_dir=D, queue_known=False), settled=True).status is None


def test_final_without_exit_file_asks_sacct_after_settling() -> None:
    obs = Observation(job_dir=D, queue_known=True, queue=_q("NODE_FAIL"))
    assert judge(obs, settled=False) == slurm.Verdict(status=None)
    assert judge(obs, settled=True).needs_acct
    acct = AcctRow(job_id="7", state="NODE_FAIL", exit_code=0)
    v = judge(Observation(**{**_fields(obs), "acct": acct, "acct_known": True}), settled=True)
    assert v.status is not None and v.status.state == JobState.LOST
    assert v.status.detail == "NODE_FAIL"


def test_cancelled_before_start_has_a_non_zero_code() -> None:
    acct = AcctRow(job_id="7", state="CANCELLED", exit_code=143, signal="TERM")
    obs = Observation(job_dir=D, queue_known=True, queue=None, acct=acct, acct_known=True)
    v = judge(obs, settled=True)
    assert v.status is not None and v.status.state == JobState.EXITED
    assert (v.status.exit_code, v.status.detail) == (143, "CANCELLED")


def test_purged_job_with_failed_exit_file_gets_state_from_sacct() -> None:
    obs = Observation(job_dir=D, exit_code=143, exit_signal="TERM", queue_known=True)
    assert judge(obs, settled=False).needs_acct
    acct = AcctRow(job_id="7", state="TIMEOUT", exit_code=0)
    v = judge(Observation(**{**_fields(obs), "acct": acct, "acct_known": True}), settled=False)
    assert v.status is not None and v.status.detail == "TIMEOUT" and v.status.exit_code == 143


def test_completed_without_exit_file_is_lost() -> None:
    acct = AcctRow(job_id="7", state="COMPLETED", exit_code=0)
    obs = Observation(
        job_dir=D, queue_known=True, queue=_q("COMPLETED"), acct=acct, acct_known=True
    )
    v = judge(obs, settled=True)
    assert v.status is not None and v.status.state == JobState.LOST


def test_forgotten_job_without_record_is_lost() -> None:
    v = judge(Observation(job_dir=D, queue_known=True, acct_known=True), settled=True)
    assert v.status is not None and v.status.state == JobState.LOST


def test_timeout_with_exit_zero_is_never_a_success() -> None:
    obs = Observation(job_dir=D, exit_code=0, queue_known=True, queue=_q("TIMEOUT"))
    v = judge(obs, settled=False)
    assert v.status is not None and v.status.state == JobState.LOST
    assert v.status.detail == "TIMEOUT"


def _fields(obs: Observation) -> dict[str, object]:
    return {name: getattr(obs, name) for name in obs.__dataclass_fields__}


# -- the batch script, run by sh without Slurm -------------------------------------------


def _run_batch(job_dir: Path, spec: JobSpec, job_id: str) -> subprocess.CompletedProcess[str]:
    script = job_dir.parent / f"batch-{job_id}.sh"
    script.write_text(batch_script(spec))
    return subprocess.run(
        ["/bin/sh", str(script)],
        env={**os.environ, "SLURM_JOB_ID": job_id},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_batch_script_writes_exit_file_and_claims_once(tmp_path: Path) -> None:
    job_dir = tmp_path / "a b;$(touch x)" / "1"
    job_dir.mkdir(parents=True)
    marker = tmp_path / "ran"
    spec = JobSpec(
        job_dir=str(job_dir),
        argv=("sh", "-c", f'echo "it ran $MQI_X"; echo once >> "{marker}"; exit 3'),
        env=(("MQI_X", "a'b"),),
    )
    res = _run_batch(job_dir, spec, "41")
    assert res.returncode == 3
    assert (job_dir / "exit_code").read_text() == "3\n\n"
    assert (job_dir / "slurm.claim" / "job_id").read_text() == "41\n"
    assert (job_dir / "moqui.log").read_text() == "it ran a'b\n"
    assert not (tmp_path / "x").exists()
    # a duplicate job for the same directory does nothing
    again = _run_batch(job_dir, spec, "42")
    assert again.returncode == 0 and "already run by job 41" in again.stderr
    assert marker.read_text() == "once\n"
    assert (job_dir / "slurm.claim" / "job_id").read_text() == "41\n"


def test_batch_script_records_a_signal(tmp_path: Path) -> None:
    job_dir = tmp_path / "1"
    job_dir.mkdir()
    spec = JobSpec(job_dir=str(job_dir), argv=("sh", "-c", "kill -SEGV $$"))
    res = _run_batch(job_dir, spec, "5")
    assert res.returncode == 139
    assert (job_dir / "exit_code").read_text() == "139\nSEGV\n"


def test_batch_script_rejects_bad_specs() -> None:
    with pytest.raises(ValueError):
        batch_script(JobSpec(job_dir="/x", argv=()))
    with pytest.raises(ValueError):
        batch_script(JobSpec(job_dir="/x", argv=("a",), env=(("1BAD", "v"),)))
    with pytest.raises(ValueError):
        batch_script(JobSpec(job_dir="/x\0y", argv=("a",)))


# -- configuration ------------------------------------------------------------------------


def _slurm_settings(**kw: object) -> SlurmHostSettings:
    values: dict[str, object] = {
        "kind": "slurm",
        "name": "cluster",
        "address": "login.example",
        "remote_root": "/shared/mqi",
        "moqui_command": "/shared/tps_env",
        "partition": "gpu",
        **kw,
    }
    return SlurmHostSettings.model_validate(values)


def test_service_builds_a_slurm_host(tmp_path: Path) -> None:
    settings = Settings(hosts=[_slurm_settings()], gpu={"allocation": "all_gpus"})  # type: ignore[arg-type]
    hosts = build_hosts(settings, tmp_path)
    host = hosts["cluster"]
    assert isinstance(host, SlurmHost)
    assert (host.kind, host.leases_gpus, host.remote_root) == ("slurm", False, "/shared/mqi")
    assert host.moqui_command == ("/shared/tps_env",)
    argv = host._sbatch_argv(
        JobSpec(job_dir="/shared/mqi/c/beam_1/1-ab", argv=("x",), name="mqi-c-b1")
    )
    assert argv[:2] == ["sbatch", "--parsable"]
    assert {"--job-name=mqi-c-b1", "--time=02:00:00", "--partition=gpu", "--gres=gpu:1",
            "--exclusive", "--no-requeue"} <= set(argv)  # fmt: skip


def test_a_bad_time_limit_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as err:
        SlurmHost.from_settings(_slurm_settings(time_limit="soon"), limiter=ConnectLimiter())
    assert "cluster" in str(err.value) and "soon" in str(err.value)


def test_queue_line_summarises_jobs_and_nodes() -> None:
    from datetime import UTC, datetime

    from mqi_async.domain.slurm import SlurmJob, SlurmNode, SlurmQueue, queue_line

    def job(i: str, state: str, reason: str) -> SlurmJob:
        return SlurmJob(
            job_id=i, state=state, reason=reason, gres="gpu:1", nodes="", elapsed="0:01", name="mqi"
        )

    queue = SlurmQueue(
        host="cluster",
        taken_at=datetime(2026, 11, 29, tzinfo=UTC),
        jobs=(
            job("1", "RUNNING", "None"),
            job("2", "PENDING", "Resources"),
            job("3", "PENDING", "Priority"),
        ),
        nodes=(SlurmNode(name="n1", state="mix", gpus_total=4, gpus_used=1),),
    )
    assert queue_line(queue) == "1 running, 2 pending (Priority, Resources); n1 1/4 GPUs mix"
