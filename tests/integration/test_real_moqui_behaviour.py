"""What a run of the public MOQUI fork showed (issue 23), against the bundled stand-in.

Each test switches on one public-fork behaviour of `tps_env` (MQI_SIM_PUBLIC_FORK,
MQI_SIM_END_MARKER, MQI_SIM_FAIL=nan) and runs the whole service on a `local` host, as the
real fork was run.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import yaml

from mqi_async.config import Settings, default_moqui, load_settings
from mqi_async.domain.model import BeamStatus, CaseStatus
from mqi_async.service import Service
from tests.e2e import BIN, REPO, SMALL_PHANTOM, Rig, running_service, wait_until

pytestmark = [pytest.mark.slow]

TERMINAL = {"completed", "failed", "cancelled"}


def local_rig(
    root: Path,
    *,
    sim: Mapping[str, str] | None = None,
    moqui: Mapping[str, Any] | None = None,
    interpreter_env: Mapping[str, str] | None = None,
) -> Rig:
    """A config with one `local` host whose MOQUI is the stand-in with the given switches."""
    root.mkdir(parents=True, exist_ok=True)
    state = root / "sim-state"
    env = [
        "env",
        f"MQI_SIM_STATE_DIR={state}",
        "MQI_SIM_GPUS=2",
        "MQI_SIM_RUN_SECONDS=0.2",
        *(f"{k}={v}" for k, v in (sim or {}).items()),
    ]
    interpreter = [
        "env",
        *(f"{k}={v}" for k, v in (interpreter_env or {}).items()),
        sys.executable,
        str(BIN / "mqi_interpreter"),
        "--logdir",
        "{case_dir}",
        "--outputdir",
        "{csv_dir}",
    ]
    config: dict[str, Any] = {
        "scan_directory": "incoming",
        "work_directory": "work",
        "database": "mqi.db",
        "ingest": {"rescan_seconds": 5},
        "hosts": [
            {
                "name": "here",
                "kind": "local",
                "remote_root": str(root / "runs"),
                "moqui_command": [*env, sys.executable, str(BIN / "tps_env")],
                "nvidia_smi_command": shlex.join(
                    [
                        "env",
                        f"MQI_SIM_STATE_DIR={state}",
                        "MQI_SIM_GPUS=2",
                        sys.executable,
                        str(BIN / "nvidia-smi"),
                    ]
                ),
            }
        ],
        "tools": {"interpreter": interpreter},
        "gpu": {"poll_seconds": 0.5, "min_free_memory_mb": 1000},
        "runs": {"poll_seconds": 0.2, "timeout_seconds": 120},
        "retry": {"max_attempts": 2, "backoff_initial_seconds": 0.1, "backoff_max_seconds": 0.2},
        "moqui": {**default_moqui(), **SMALL_PHANTOM, **(moqui or {})},
        "logging": {"directory": "logs", "level": "DEBUG"},
        # one MOQUI run per beam: these tests read each run's stand-in output
        "qa": {"reference": "none", "report": False},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return Rig(root=root, config_path=path, state_dir=state)


async def run_case(rig: Rig, case_id: str, *, beams: int = 1) -> tuple[Service, Any]:
    """Drop one case, run the service until it is terminal; its snapshot row."""
    rig.drop_case(case_id, beams=beams)
    settings: Settings = rig.settings()
    async with running_service(settings) as svc:

        async def done() -> Any:
            for case in await svc.store.snapshot():
                if case.case_id == case_id and str(case.status) in TERMINAL:
                    return case
            return None

        case = await wait_until(done, timeout_s=120, what=f"{case_id} terminal")
        runs = {b.beam_id: await svc.store.list_runs(b.beam_id) for b in case.beams}
    return svc, (case, runs)


def _beam(case: Any) -> Any:
    (beam,) = case.beams
    return beam


def check_config(rig: Rig) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mqi_async", "check-config", "-c", str(rig.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )


# 1 ---------------------------------------------------------------------------------------


async def test_1_absolute_paths_abort_the_public_fork_relative_ones_run(tmp_path: Path) -> None:
    public = {"MQI_SIM_PUBLIC_FORK": "abspath"}
    bad = local_rig(tmp_path / "abs", sim=public, moqui={"UseAbsolutePath": True})
    warned = check_config(bad)
    assert warned.returncode == 0
    assert "warning: moqui.UseAbsolutePath: true makes the public MOQUI fork abort" in (
        warned.stderr
    )
    _, (case, runs) = await run_case(bad, "ABS")
    beam = _beam(case)
    assert beam.status == BeamStatus.FAILED
    assert str(beam.error).startswith("moqui_absolute_path_unsupported: ")
    assert "Log Dir is not provided" in str(beam.error)
    assert len(runs[beam.beam_id]) == 1, "a permanent failure is not retried"

    # the shipped default: relative paths under ParentDir, which the public fork reads
    good = local_rig(tmp_path / "rel", sim=public)
    assert load_settings(good.config_path).moqui["UseAbsolutePath"] is False
    assert "UseAbsolutePath" not in check_config(good).stderr
    _, (case, _) = await run_case(good, "REL")
    assert case.status == CaseStatus.COMPLETED
    tps = next((good.root / "work").glob("REL*/runs/beam_1/attempt_1/moqui_tps.in")).read_text()
    assert "\nDicomDir plan\n" in tps and "\nlogFilePath log\n" in tps


def test_shipped_config_uses_relative_paths() -> None:
    shipped = load_settings(REPO / "config.yaml")
    assert shipped.moqui["UseAbsolutePath"] is False


# 2 ---------------------------------------------------------------------------------------


async def test_2_crlf_csvs_are_uploaded_single_line_so_the_public_fork_reads_every_spot(
    tmp_path: Path,
) -> None:
    rig = local_rig(
        tmp_path / "rig",
        sim={"MQI_SIM_PUBLIC_FORK": "csv"},
        interpreter_env={"MQI_SIM_CSV_SINGLE_LINE": "0"},  # the interpreter writes CRLF rows
    )
    _, (case, _) = await run_case(rig, "CRLF")
    assert case.status == CaseStatus.COMPLETED
    csvs = sorted((rig.root / "runs").glob("c*/inputs/log/*/*.csv"))
    assert csvs
    rows = 0
    for path in csvs:
        data = path.read_bytes()
        assert b"\r" not in data and b"\n" not in data
        rows += (data.count(b",") + 1) // 4
    log = next((rig.root / "work").glob("CRLF*/runs/beam_1/attempt_1/moqui.log")).read_text()
    (spots,) = {int(n) for n in _all_after(log, "Total beamlets (Spots) : ")}
    assert spots == rows, "MOQUI read every row the interpreter wrote"


def _all_after(text: str, prefix: str) -> list[str]:
    return [line.split(prefix, 1)[1] for line in text.splitlines() if prefix in line]


def test_2b_the_stand_in_misreads_crlf_rows_as_the_public_fork_does(tmp_path: Path) -> None:
    # without the service's normalising, 80 CRLF rows read as 60 spots, like the real run
    field = tmp_path / "log" / "F1"
    field.mkdir(parents=True)
    rows = "".join(f"{0.06 * i:.2f},{i * 0.5:.1f},{-i * 0.25:.2f},{20 + i}\r\n" for i in range(80))
    (field / "01_150.00MeV.csv").write_text(rows, newline="")
    code = (
        "import importlib.machinery, sys;"
        f"m = importlib.machinery.SourceFileLoader('t', {str(BIN / 'tps_env')!r}).load_module();"
        f"print(m.read_layers({str(field)!r}, 1.0, {{'csv'}})[1],"
        f" m.read_layers({str(field)!r}, 1.0, set())[1])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.split()[-2:] == ["60", "80"]


# 3 ---------------------------------------------------------------------------------------


async def test_3_zero_histories_are_refused_before_launch(tmp_path: Path) -> None:
    # a spot's count is MU / MU per count, at most a few million: 1e-9 histories per count
    # gives every spot 0
    rig = local_rig(
        tmp_path / "rig",
        sim={"MQI_SIM_PUBLIC_FORK": "histories"},
        moqui={"ParticlesPerHistory": 1e-9},
    )
    warned = check_config(rig).stderr
    assert "warning: moqui.ParticlesPerHistory: 1e-09 × a spot's log count below" in warned
    _, (case, runs) = await run_case(rig, "ZERO")
    assert case.status == CaseStatus.FAILED
    assert str(case.error).startswith("zero_histories: ")
    assert all(not r for r in runs.values()), "MOQUI was never launched"


async def test_3b_an_all_zero_dose_is_a_failed_beam(tmp_path: Path) -> None:
    # the clinic build's NormalizeTotalHistories skips the pre-launch check; the public-fork
    # stand-in then exits 0 with an all-zero raw file, which must not complete the beam
    rig = local_rig(
        tmp_path / "rig",
        sim={"MQI_SIM_PUBLIC_FORK": "histories"},
        moqui={"ParticlesPerHistory": 1e-9, "NormalizeTotalHistories": True},
    )
    _, (case, runs) = await run_case(rig, "EMPTY")
    beam = _beam(case)
    assert beam.status == BeamStatus.FAILED
    assert str(beam.error).startswith("empty_dose: ")
    assert not beam.outputs
    raw = next((rig.root / "runs").glob("c*/beam_1/*/dose/*.raw"))
    assert raw.stat().st_size == 20 * 16 * 10 * 8 and not np.fromfile(raw, "<f8").any()


# 4 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("switch", "frames"), [("slab", 1), ("", 3)], ids=["public", "clinic"])
async def test_4_two_centimeter_mode_accepts_one_or_three_slices(
    tmp_path: Path, switch: str, frames: int
) -> None:
    rig = local_rig(
        tmp_path / "rig",
        sim={"MQI_SIM_PUBLIC_FORK": switch},
        moqui={"TwoCentimeterMode": True},
    )
    _, (case, _) = await run_case(rig, "SLAB")
    beam = _beam(case)
    assert beam.status == BeamStatus.COMPLETED, beam.error
    raw = next((rig.root / "work").glob("SLAB*/runs/beam_1/attempt_1/dose/*.raw"))
    assert raw.stat().st_size == 400 * 400 * frames * 8
    ds = pydicom.dcmread(beam.outputs[0])
    assert int(ds.NumberOfFrames) == frames
    assert float(ds.SliceThickness) == pytest.approx(2.0 / frames)
    dose = ds.pixel_array.reshape(frames, 400, 400) * float(ds.DoseGridScaling)
    want = np.fromfile(raw, "<f8").reshape(frames, 400, 400)
    assert np.abs(dose - want).max() <= want.max() / 65535 * 1.01


# 5 ---------------------------------------------------------------------------------------


async def test_5_output_format_dcm_takes_the_raw_the_public_fork_writes(tmp_path: Path) -> None:
    rig = local_rig(
        tmp_path / "rig", sim={"MQI_SIM_PUBLIC_FORK": "dcm"}, moqui={"OutputFormat": "dcm"}
    )
    assert "warning: moqui.OutputFormat: dcm is ignored by the public MOQUI fork" in (
        check_config(rig).stderr
    )
    _, (case, _) = await run_case(rig, "DCM")
    beam = _beam(case)
    assert beam.status == BeamStatus.COMPLETED, beam.error
    dose_dir = next((rig.root / "work").glob("DCM*/runs/beam_1/attempt_1/dose"))
    assert [p.suffix for p in dose_dir.iterdir()] == [".raw"]
    ds = pydicom.dcmread(beam.outputs[0])
    assert ds.Modality == "RTDOSE" and int(ds.NumberOfFrames) == 10


# 6 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("marker", ["engine", "total", "none"])
async def test_6_end_markers_are_hints_only(tmp_path: Path, marker: str) -> None:
    rig = local_rig(tmp_path / "rig", sim={"MQI_SIM_END_MARKER": marker})
    _, (case, _) = await run_case(rig, "MARK")
    assert _beam(case).status == BeamStatus.COMPLETED
    log = next((rig.root / "work").glob("MARK*/runs/beam_1/attempt_1/moqui.log")).read_text()
    assert ("Time taken by MC engine:" in log) == (marker == "engine")
    assert ("Total execution time:" in log) == (marker == "total")


async def test_6b_the_nan_transport_message_is_a_named_failure(tmp_path: Path) -> None:
    rig = local_rig(tmp_path / "rig", sim={"MQI_SIM_FAIL": "nan"})
    _, (case, runs) = await run_case(rig, "NAN")
    beam = _beam(case)
    assert beam.status == BeamStatus.FAILED
    assert str(beam.error).startswith("moqui_transport_nan: ")
    attempts = runs[beam.beam_id]
    assert len(attempts) == 2, "transient: retried up to retry.max_attempts"
    assert all(r.exit_code == 1 for r in attempts)
