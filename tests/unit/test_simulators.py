"""The bundled simulators (tps_env, nvidia-smi, mqi_interpreter), run as real subprocesses."""

from __future__ import annotations

import csv
import importlib.machinery
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import numpy as np
import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian

import mqi_async.demo
from mqi_async.demo.cases import Breakage, CaseSpec, WrittenCase, write_case
from mqi_async.domain.gpus import (
    COMPUTE_APPS_QUERY,
    CSV_FORMAT,
    INVENTORY_QUERY,
    parse_compute_apps,
    parse_inventory,
)
from mqi_async.domain.tps import (
    KNOWN_KEYS,
    TpsComputed,
    TpsParseAbort,
    TpsValue,
    expected_outputs,
    parse_tps_input,
    phantom_grid,
    render_tps_input,
    tps_lookup,
)
from mqi_async.dose import validate_rt_dose

BIN = Path(mqi_async.demo.__file__).parent / "bin"
TPS_ENV = BIN / "tps_env"
NVIDIA_SMI = BIN / "nvidia-smi"
INTERPRETER = BIN / "mqi_interpreter"

INVENTORY_ROW = re.compile(
    r"^(\d+), (GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}), (NVIDIA [^,]+), "
    r"(\d+), (\d+), (\d+), (\d+), (\d+), (\d+)$"
)
BATCH_RE = re.compile(r"Generating particles for \((\d+) of (\d+) batches\)")
STATIC: dict[str, TpsValue] = {
    "RandomSeed": -1932780356,
    "UseAbsolutePath": True,
    "TotalThreads": -1,
    "MaxHistoriesPerBatch": 2000,
    "UsingPhantomGeo": True,
    "TwoCentimeterMode": False,
    "PhantomDimX": 20,
    "PhantomDimY": 20,
    "PhantomDimZ": 10,
    "PhantomUnitX": 1,
    "PhantomUnitY": 1,
    "PhantomUnitZ": 2,
    "PhantomPositionX": -10.0,
    "PhantomPositionY": -10.0,
    "PhantomPositionZ": -20.0,
    "Scorer": "Dose",
    "SupressStd": True,
    "SourceType": "FluenceMap",
    "SimulationType": "perBeam",
    "ParticlesPerHistory": 1,
    "OutputFormat": "raw",
    "OverwriteResults": False,
}
#: the generated case's treatment beams: DICOM BeamNumber -> BeamName (beam 1 is SETUP)
BEAMS = {2: "1G090", 3: "2G180"}


def clean_env(state: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MQI_SIM_") and k != "CUDA_VISIBLE_DEVICES"
    }
    env.update(MQI_SIM_STATE_DIR=str(state), MQI_SIM_RUN_SECONDS="0.2")
    env.update(extra)
    return env


def run(
    script: Path,
    *args: str,
    env: Mapping[str, str],
    direct: bool = False,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run a simulator with this interpreter (as the service may), or through its shebang."""
    argv = [str(script), *args] if direct else [sys.executable, str(script), *args]
    return subprocess.run(
        argv, env=dict(env), capture_output=True, text=True, timeout=timeout, check=False
    )


def in_bash(command: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """As the service launches MOQUI: a shell line, so a signal death reads 128+N."""
    return subprocess.run(
        ["bash", "-c", command],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def load_script(path: Path) -> ModuleType:
    loader = importlib.machinery.SourceFileLoader(path.name.replace("-", "_"), str(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> WrittenCase:
    root = tmp_path_factory.mktemp("incoming")
    return write_case(root, CaseSpec(case_id="00000042", fractions=2, seed=3))


@pytest.fixture(scope="module")
def csv_dir(case: WrittenCase, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("interpreted")
    done = run(
        INTERPRETER,
        "--logdir",
        str(case.case_path),
        "--outputdir",
        str(out),
        env=clean_env(out / "state"),
    )
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def write_tps(
    where: Path,
    csv_root: Path,
    *,
    beam_number: int = 2,
    gpu_id: int = 0,
    make_parent: bool = True,
    **static: TpsValue,
) -> tuple[Path, Path]:
    """A rendered moqui_tps.in and the OutputDir it names (whose parent exists)."""
    where.mkdir(parents=True, exist_ok=True)
    out = where / "attempt" / "dose"
    if make_parent:
        out.parent.mkdir(parents=True, exist_ok=True)
    computed = TpsComputed(
        gpu_id=gpu_id,
        parent_dir=str(csv_root),
        dicom_dir=str(csv_root / "plan"),
        log_dir=str(csv_root / "log"),
        output_dir=str(out),
        beam_number=beam_number,
        gantry=1,
    )
    path = where / "moqui_tps.in"
    path.write_text(render_tps_input({**STATIC, **static}, computed))
    return path, out


def csv_counts(field_dir: Path) -> tuple[int, int]:
    """(rows, summed counts) of a field folder's layer CSVs, either line format."""
    rows = total = 0
    for path in sorted(field_dir.glob("*.csv")):
        tokens = [t for t in re.split(r"[,\r\n]+", path.read_text()) if t]
        assert len(tokens) % 4 == 0
        rows += len(tokens) // 4
        total += sum(int(t) for t in tokens[3::4])
    return rows, total


def procs(state: Path) -> list[Path]:
    return sorted((state / "procs").glob("*.json")) if (state / "procs").exists() else []


# --- mqi_interpreter ------------------------------------------------------------------------


def test_interpreter_writes_the_csv_tree(case: WrittenCase, csv_dir: Path) -> None:
    assert case.rtplan_path is not None
    assert sorted(p.name for p in (csv_dir / "plan").iterdir()) == [case.rtplan_path.name]
    assert (csv_dir / "plan" / case.rtplan_path.name).read_bytes() == case.rtplan_path.read_bytes()
    tree = sorted(str(p.relative_to(csv_dir / "log")) for p in (csv_dir / "log").rglob("*.csv"))
    assert tree == [
        "1G090/01_110.00MeV.csv",
        "1G090/02_108.00MeV.csv",
        "2G180/01_110.00MeV.csv",
        "2G180/02_108.00MeV.csv",
    ]
    text = (csv_dir / "log" / "1G090" / "01_110.00MeV.csv").read_bytes().decode()
    assert text.endswith("\r\n") and "\n" not in text.replace("\r\n", "")
    rows = list(csv.reader(text.splitlines()))
    # one row per beam-on sample of the layer's record
    (ptn,) = sorted(case.delivery_dirs[0].glob("*_001.ptn"))
    data = ptn.read_bytes()
    flags = struct.unpack(f">{len(data) // 2}H", data)[7::8]
    assert len(rows) == sum(1 for f in flags if f == 1) > 0
    for time_ms, x_mm, y_mm, count in rows:
        float(time_ms), float(x_mm), float(y_mm)
        assert int(count) > 0
    # numpy float32 str(): the second sample, at G1's TIMEGAIN (the case is in room G1)
    assert rows[0][0] == "0.0600745"


def test_interpreter_uses_the_earliest_delivery_of_each_beam(
    case: WrittenCase, csv_dir: Path
) -> None:
    # two fractions: every beam was delivered twice; the first delivery is the reference
    by_beam: dict[int, list[Path]] = {}
    for folder in case.delivery_dirs:
        info = dict(
            line.split(",", 1) for line in (folder / "PlanInfo.txt").read_text().splitlines()
        )
        by_beam.setdefault(int(info["DICOM_BEAM_NUMBER"]), []).append(folder)
    for number, name in BEAMS.items():
        folders = sorted(by_beam[number], key=lambda f: f.name)
        assert len(folders) == 2
        first_ptn = sorted(folders[0].glob("*.ptn"))[0]
        samples = struct.unpack(f">{first_ptn.stat().st_size // 2}H", first_ptn.read_bytes())
        row = samples[8:16]  # the second sample is the first with the beam on
        # the case is in room G1: scv_init_G1.txt's calibration
        expected = [
            str(np.float32((row[0] - 16384) * 0.010959)),
            str(np.float32((row[1] - 16384) * 0.0116412)),
        ]
        got = (csv_dir / "log" / name / "01_110.00MeV.csv").read_text().splitlines()[0]
        assert got.split(",")[1:3] == expected


def test_interpreter_stdout_and_single_line_format(case: WrittenCase, tmp_path: Path) -> None:
    done = run(
        INTERPRETER,
        "--logdir",
        str(case.case_path),
        "--outputdir",
        str(tmp_path / "one"),
        env=clean_env(tmp_path, MQI_SIM_CSV_SINGLE_LINE="1"),
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "--- MQI Data Processing Started ---"
    assert lines[-1] == "--- MQI Data Processing Completed Successfully ---"
    for marker in ("Found RTPLAN: ", "RT Plan parsed successfully.", "Copied RTPLAN file to: "):
        assert any(line.startswith(marker) for line in lines), marker
    assert "Found 8 .ptn files." in lines
    single = (tmp_path / "one" / "log" / "2G180" / "02_108.00MeV.csv").read_text()
    assert "\n" not in single and "\r" not in single


def test_interpreter_without_numpy_or_pydicom_gives_the_same_files(
    case: WrittenCase, csv_dir: Path, tmp_path: Path
) -> None:
    done = run(
        INTERPRETER,
        "--logdir",
        str(case.case_path),
        "--outputdir",
        str(tmp_path / "bare"),
        env=clean_env(tmp_path, MQI_SIM_NO_PYDICOM="1"),
    )
    assert done.returncode == 0, done.stderr
    for path in (csv_dir / "log").rglob("*.csv"):
        twin = tmp_path / "bare" / "log" / path.relative_to(csv_dir / "log")
        assert twin.read_bytes() == path.read_bytes()


@pytest.mark.parametrize(("fail", "rc"), [("exit", 1), ("empty", 0)], ids=["exit", "empty"])
def test_interpreter_failure_injection(
    case: WrittenCase, tmp_path: Path, fail: str, rc: int
) -> None:
    done = run(
        INTERPRETER,
        "--logdir",
        str(case.case_path),
        "--outputdir",
        str(tmp_path / "o"),
        env=clean_env(tmp_path, MQI_SIM_INTERPRETER_FAIL=fail),
    )
    assert done.returncode == rc
    assert not (tmp_path / "o" / "log").exists()
    if rc:
        assert done.stderr.splitlines()[-1].startswith("Error: ")


def test_interpreter_hang_is_a_hang(case: WrittenCase, tmp_path: Path) -> None:
    with pytest.raises(subprocess.TimeoutExpired):
        run(
            INTERPRETER,
            "--logdir",
            str(case.case_path),
            "--outputdir",
            str(tmp_path / "o"),
            env=clean_env(tmp_path, MQI_SIM_INTERPRETER_FAIL="hang"),
            timeout=1.5,
        )


def test_interpreter_errors(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    no_logs = write_case(tmp_path / "a", CaseSpec(case_id="1", seed=1))
    for ptn in no_logs.case_path.rglob("*.ptn"):
        ptn.unlink()
    done = run(
        INTERPRETER,
        "--logdir",
        str(no_logs.case_path),
        "--outputdir",
        str(tmp_path / "o1"),
        env=env,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("Error: A required file was not found.")

    mismatch = write_case(
        tmp_path / "b", CaseSpec(case_id="2", seed=2, breakage=Breakage.PATIENT_ID_MISMATCH)
    )  # type: ignore[arg-type]
    done = run(
        INTERPRETER,
        "--logdir",
        str(mismatch.case_path),
        "--outputdir",
        str(tmp_path / "o2"),
        env=env,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("Error: Invalid data or configuration.")

    machine = write_case(
        tmp_path / "c", CaseSpec(case_id="3", seed=3, breakage=Breakage.UNKNOWN_MACHINE)
    )
    done = run(
        INTERPRETER,
        "--logdir",
        str(machine.case_path),
        "--outputdir",
        str(tmp_path / "o3"),
        env=env,
    )
    assert done.returncode == 1 and "G1 or G2" in done.stderr

    broken = tmp_path / "d"
    broken_case = write_case(broken, CaseSpec(case_id="4", seed=4))
    next(broken_case.case_path.rglob("*.ptn")).write_bytes(b"\0" * 17)
    done = run(
        INTERPRETER,
        "--logdir",
        str(broken_case.case_path),
        "--outputdir",
        str(tmp_path / "o4"),
        env=env,
    )
    assert done.returncode == 1 and "multiple of 16" in done.stderr

    done = run(
        INTERPRETER,
        "--logdir",
        str(tmp_path / "nowhere"),
        "--outputdir",
        str(tmp_path / "o5"),
        env=env,
    )
    assert done.returncode == 1 and done.stderr.startswith("Error: ")


def test_interpreter_accepts_room_g2_machine_names(tmp_path: Path) -> None:
    g2 = write_case(tmp_path / "in", CaseSpec(case_id="7", room="G2", seed=7))
    done = run(
        INTERPRETER,
        "--logdir",
        str(g2.case_path),
        "--outputdir",
        str(tmp_path / "o"),
        env=clean_env(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    assert "Selected config file: scv_init_G2.txt" in done.stdout.splitlines()


# --- tps_env ------------------------------------------------------------------------------


def test_tps_env_happy_path(csv_dir: Path, tmp_path: Path, state: Path) -> None:
    tps, out = write_tps(tmp_path / "b2", csv_dir, beam_number=2)
    done = run(TPS_ENV, str(tps), env=clean_env(state))
    assert done.returncode == 0, done.stderr
    grid = phantom_grid(STATIC)
    (want,) = expected_outputs(STATIC, BEAMS[2])
    assert want.name == "1G090_1_Dose.raw"
    assert sorted(p.name for p in out.iterdir()) == [want.name]
    assert (out / want.name).stat().st_size == want.size_bytes == grid.raw_bytes

    lines = done.stdout.splitlines()
    assert lines[1] == "MOQUI SMC Treatment machine model and log-file based MC"
    assert re.fullmatch(r"Time taken by MC engine: \d+ milli-seconds", lines[-1])
    spots, histories = csv_counts(csv_dir / "log" / BEAMS[2])
    assert f"Total beamlets (Spots) : {spots}" in lines
    assert f"Total histories (Particles) : {histories}" in lines
    batches = math.ceil(histories / 2000)
    assert batches > 1
    assert (
        f"Uploading particles with batch.. : Particle count --> 2000 with {batches} batches"
        in lines
    )
    seen = [tuple(map(int, m.groups())) for m in map(BATCH_RE.search, lines) if m]
    assert seen == [(i, batches) for i in range(1, batches + 1)]
    assert "Reading GPU ID.. : Selected GPU ID --> 0" in lines
    assert procs(state) == []

    dose = np.fromfile(out / want.name, dtype="<f8").reshape(grid.shape)
    assert np.isfinite(dose).all() and dose.min() >= 0 and dose.max() > 0
    # smooth: neighbouring voxels differ by a fraction of the peak
    assert np.abs(np.diff(dose, axis=2)).max() < 0.5 * dose.max()


def test_tps_env_dose_is_deterministic_and_beam_dependent(
    csv_dir: Path, tmp_path: Path, state: Path
) -> None:
    results = {}
    for label, beam in (("a", 2), ("b", 2), ("c", 3)):
        tps, out = write_tps(tmp_path / label, csv_dir, beam_number=beam)
        done = run(TPS_ENV, str(tps), env=clean_env(state, MQI_SIM_RUN_SECONDS="0"))
        assert done.returncode == 0, done.stderr
        (path,) = out.iterdir()
        results[label] = (path.name, path.read_bytes())
    assert results["a"] == results["b"]
    assert results["c"][0] == "2G180_1_Dose.raw"
    assert results["c"][1] != results["a"][1]


def test_tps_env_without_numpy_or_pydicom_and_through_its_shebang(
    csv_dir: Path, tmp_path: Path, state: Path
) -> None:
    # without numpy there is no pencil-beam model: a smooth stand-in dose of the right size
    bare, bare_out = write_tps(tmp_path / "bare", csv_dir, beam_number=3)
    done = run(TPS_ENV, str(bare), env=clean_env(state, MQI_SIM_NO_PYDICOM="1"), direct=True)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in bare_out.iterdir()] == ["2G180_1_Dose.raw"]
    dose = np.fromfile(bare_out / "2G180_1_Dose.raw", "<f8")
    assert dose.size == phantom_grid(STATIC).nx * phantom_grid(STATIC).ny * phantom_grid(STATIC).nz
    assert np.isfinite(dose).all() and dose.max() > 0


def test_tps_env_dose_model_stops_at_the_range_and_spreads_with_the_spot() -> None:
    model = load_script(TPS_ENV)
    # one 110 MeV pencil beam from gantry 0 (travelling along +y) in a 1 mm water box
    grid = (41, 200, 41, 1.0, 1.0, 1.0, -20.5, -100.0, -20.5)
    dose = model.physical_dose(grid, [(110.0, [(0.0, 0.0, 1.0e6)])], 0.0)
    assert dose.shape == (41, 200, 41)
    axis = dose[20, :, 20]
    depth = np.arange(200) + 0.5  # the beam enters at y = -100
    peak = depth[int(np.argmax(axis))]
    # the Bragg peak lies just short of the CSDA range (Bragg-Kleeman, 0.0022 E^1.77 cm)
    assert model.proton_range_mm(110.0) - 4 <= peak <= model.proton_range_mm(110.0)
    assert axis[int(np.argmax(axis))] > 2.5 * axis[0]  # peak to entrance
    assert axis[depth > model.proton_range_mm(110.0) + 6].max() < 0.01 * axis.max()
    # at the surface, the lateral profile is the spot's Gaussian (6 mm FWHM)
    row = dose[20, 0, :]
    x = np.arange(41) - 20.0
    sigma = math.sqrt(float(np.sum(row * x**2) / np.sum(row)))
    assert sigma == pytest.approx(6.0 / 2.3548, rel=0.03)
    # twice the histories, twice the dose
    double = model.physical_dose(grid, [(110.0, [(0.0, 0.0, 2.0e6)])], 0.0)
    assert np.allclose(double, 2 * dose)
    # gantry 90 turns the beam to travel along -x
    turned = model.physical_dose((200, 41, 41, 1.0, 1.0, 1.0, -100.0, -20.5, -20.5),
                                 [(110.0, [(0.0, 0.0, 1.0e6)])], 90.0)  # fmt: skip
    along = turned[20, 20, :]
    assert int(np.argmax(along)) == 199 - int(np.argmax(axis))


def test_tps_env_two_centimeter_mode(csv_dir: Path, tmp_path: Path, state: Path) -> None:
    tps, out = write_tps(tmp_path / "w", csv_dir, TwoCentimeterMode=True)
    done = run(TPS_ENV, str(tps), env=clean_env(state, MQI_SIM_RUN_SECONDS="0"))
    assert done.returncode == 0, done.stderr
    (want,) = expected_outputs({**STATIC, "TwoCentimeterMode": True}, BEAMS[2])
    assert want.name == "1G090_2_Dose.raw"
    assert (out / want.name).stat().st_size == want.size_bytes == 3_840_000


def test_tps_env_native_dicom_output_validates(csv_dir: Path, tmp_path: Path, state: Path) -> None:
    tps, out = write_tps(tmp_path / "d", csv_dir, OutputFormat="dcm")
    done = run(TPS_ENV, str(tps), env=clean_env(state, MQI_SIM_RUN_SECONDS="0"))
    assert done.returncode == 0, done.stderr
    (want,) = expected_outputs({**STATIC, "OutputFormat": "dcm"}, BEAMS[2])
    assert [p.name for p in out.iterdir()] == [want.name]
    validate_rt_dose(out / want.name)
    assert f"Successfully saved DICOM RT Dose file: {out / want.name}" in done.stdout


def test_tps_env_reads_single_line_csvs_like_crlf_ones(
    case: WrittenCase, csv_dir: Path, tmp_path: Path, state: Path
) -> None:
    single = tmp_path / "single"
    done = run(
        INTERPRETER,
        "--logdir",
        str(case.case_path),
        "--outputdir",
        str(single),
        env=clean_env(state, MQI_SIM_CSV_SINGLE_LINE="1"),
    )
    assert done.returncode == 0
    counts = []
    for root in (csv_dir, single):
        tps, _ = write_tps(tmp_path / root.name, root)
        done = run(TPS_ENV, str(tps), env=clean_env(state, MQI_SIM_RUN_SECONDS="0"))
        assert done.returncode == 0, done.stderr
        counts.append([ln for ln in done.stdout.splitlines() if ln.startswith("Total ")])
    assert counts[0] == counts[1] and len(counts[0]) == 2


ABORT_LINE = "terminate called after throwing an instance of 'std::runtime_error'"


@pytest.mark.parametrize(
    ("mode", "rc", "stderr", "out_bytes"),
    [
        ("abort", 134, ABORT_LINE, None),
        ("cuda", 255, "CUDA error: ", None),
        ("silent", 0, "", None),
        ("short", 0, "", 8 * 20 * 20 * 10 // 2),
        ("segv", 139, "", None),
    ],
)
def test_tps_env_failure_modes(
    csv_dir: Path,
    tmp_path: Path,
    state: Path,
    mode: str,
    rc: int,
    stderr: str,
    out_bytes: int | None,
) -> None:
    tps, out = write_tps(tmp_path, csv_dir)
    done = in_bash(
        f"env MQI_SIM_FAIL={mode} {sys.executable} {TPS_ENV} {tps} >{tmp_path / 'log'} 2>&1",
        clean_env(state),
    )
    log = (tmp_path / "log").read_text()
    assert done.returncode == rc, log
    if stderr:
        assert stderr in log
    if mode == "abort":
        assert "  what():  Simulated failure" in log
    files = list(out.iterdir()) if out.exists() else []
    if out_bytes is None:
        assert files == []
    else:
        assert [f.stat().st_size for f in files] == [out_bytes]
    if mode == "silent":
        assert f"Cannot write :{out / '1G090_1_Dose.raw'}" in log
        assert "Time taken by MC engine:" in log
    assert procs(state) == []


def test_tps_env_hang_dies_cleanly_on_sigterm(csv_dir: Path, tmp_path: Path, state: Path) -> None:
    tps, _ = write_tps(tmp_path, csv_dir)
    proc = subprocess.Popen(
        [sys.executable, str(TPS_ENV), str(tps)],
        env=clean_env(state, MQI_SIM_FAIL="hang"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not procs(state) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [p.name for p in procs(state)] == [f"{proc.pid}.json"]
        time.sleep(0.5)
        assert proc.poll() is None, "still running"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert procs(state) == []


def test_tps_env_fails_once_then_succeeds(csv_dir: Path, tmp_path: Path, state: Path) -> None:
    env = clean_env(state, MQI_SIM_FAIL="abort", MQI_SIM_FAIL_ONCE_DIR=str(tmp_path / "once"))
    first, _ = write_tps(tmp_path / "1", csv_dir)
    assert run(TPS_ENV, str(first), env=env).returncode == -signal.SIGABRT
    second, out = write_tps(tmp_path / "2", csv_dir)
    assert run(TPS_ENV, str(second), env=env).returncode == 0
    assert [p.name for p in out.iterdir()] == ["1G090_1_Dose.raw"]
    # the other beam has its own first attempt
    third, _ = write_tps(tmp_path / "3", csv_dir, beam_number=3)
    assert run(TPS_ENV, str(third), env=env).returncode == -signal.SIGABRT


def test_tps_env_per_beam_failures(csv_dir: Path, tmp_path: Path, state: Path) -> None:
    env = clean_env(state, MQI_SIM_FAIL_BEAMS="1G090=cuda", MQI_SIM_RUN_SECONDS="0")
    b2, _ = write_tps(tmp_path / "b2", csv_dir, beam_number=2)
    assert run(TPS_ENV, str(b2), env=env).returncode == 255
    b3, out3 = write_tps(tmp_path / "b3", csv_dir, beam_number=3)
    assert run(TPS_ENV, str(b3), env=env).returncode == 0
    # a control file in the state dir steers a running service's next launch of beam 3
    (state / "fail").mkdir(parents=True)
    (state / "fail" / "3").write_text("short\n")
    again, out = write_tps(tmp_path / "again", csv_dir, beam_number=3)
    assert run(TPS_ENV, str(again), env=env).returncode == 0
    assert (out / "2G180_1_Dose.raw").stat().st_size == (
        out3 / "2G180_1_Dose.raw"
    ).stat().st_size // 2


def test_tps_env_input_hazards_and_checks(csv_dir: Path, tmp_path: Path, state: Path) -> None:
    env = clean_env(state, MQI_SIM_RUN_SECONDS="0")

    def abort_of(tps: Path) -> str:
        done = run(TPS_ENV, str(tps), env=env)
        assert done.returncode == -signal.SIGABRT, done.stdout + done.stderr
        assert procs(state) == []
        return done.stderr

    tps, out = write_tps(tmp_path / "blank", csv_dir)
    tps.write_text(tps.read_text().replace("GantryNum 1\n", "GantryNum 1\n \t\n"))
    assert "instance of 'std::out_of_range'" in abort_of(tps)

    tps, out = write_tps(tmp_path / "crlf", csv_dir)
    tps.write_text(tps.read_text().replace("\n", "\r\n", 3).replace("\r\n", "\r\n\r\n", 1))
    assert "std::out_of_range" in abort_of(tps)

    tps, out = write_tps(tmp_path / "comment", csv_dir)
    tps.write_text("ParentDir # forgotten\n" + tps.read_text())
    assert "std::out_of_range" in abort_of(tps)

    tps, out = write_tps(tmp_path / "exists", csv_dir)
    out.mkdir()
    assert "  what():  Output directory exists." in abort_of(tps)
    tps, out = write_tps(tmp_path / "overwrite", csv_dir, OverwriteResults=True)
    out.mkdir()
    assert run(TPS_ENV, str(tps), env=env).returncode == 0

    tps, out = write_tps(tmp_path / "scorer", csv_dir, Scorer="DoseToMedium")
    assert "  what():  Unrecognized scorer name" in abort_of(tps)

    tps, out = write_tps(tmp_path / "noplan", tmp_path / "empty_csv")
    assert "  what():  There is no RTPLAN in the path. Exiting." in abort_of(tps)

    assert "  what():  Cannot open input parameter file." in abort_of(tmp_path / "missing.in")

    # MOQUI's one-level mkdir fails quietly without the parent, and every write then fails
    tps, out = write_tps(tmp_path / "noparent", csv_dir, make_parent=False)
    done = run(TPS_ENV, str(tps), env=env)
    assert done.returncode == 0
    assert f"Cannot write :{out / '1G090_1_Dose.raw'}" in done.stdout
    assert not out.exists()


def test_tps_env_is_a_compute_app_on_its_physical_gpu(
    csv_dir: Path, tmp_path: Path, state: Path
) -> None:
    tps, _ = write_tps(tmp_path, csv_dir, gpu_id=1)
    env = clean_env(state, MQI_SIM_RUN_SECONDS="30", MQI_SIM_PROC_MEMORY_MB="3000")
    env["CUDA_VISIBLE_DEVICES"] = "1,3"  # GPUID 1 within the visible set = physical GPU 3
    proc = subprocess.Popen(
        [sys.executable, str(TPS_ENV), str(tps)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not procs(state) and time.monotonic() < deadline:
            time.sleep(0.05)
        smi_env = clean_env(state)
        inventory = run(NVIDIA_SMI, INVENTORY_QUERY, CSV_FORMAT, env=smi_env)
        apps = run(NVIDIA_SMI, COMPUTE_APPS_QUERY, CSV_FORMAT, env=smi_env)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    gpus, bad = parse_inventory(inventory.stdout)
    assert bad == () and len(gpus) == 4
    (app,), bad_apps = parse_compute_apps(apps.stdout)
    assert bad_apps == ()
    assert app.pid == proc.pid
    assert app.gpu_uuid == gpus[3].uuid
    assert app.used_memory_mb == 3000
    assert app.process_name == str(TPS_ENV)
    assert gpus[3].memory_used_mb == 3000 and gpus[3].utilization_pct > 0
    assert all(g.memory_used_mb == 0 and g.utilization_pct == 0 for g in gpus[:3])
    # gone once it exits
    after = run(NVIDIA_SMI, COMPUTE_APPS_QUERY, CSV_FORMAT, env=clean_env(state))
    assert after.stdout == ""


def test_tps_env_on_a_device_that_is_not_there(csv_dir: Path, tmp_path: Path, state: Path) -> None:
    tps, _ = write_tps(tmp_path, csv_dir)
    env = clean_env(state, MQI_SIM_RUN_SECONDS="0", CUDA_VISIBLE_DEVICES="")
    done = run(TPS_ENV, str(tps), env=env)
    assert done.returncode == 101
    assert "GPUassert: invalid device ordinal" in done.stderr


def test_simulator_parser_agrees_with_the_domain_parser(tmp_path: Path) -> None:
    tps_env = load_script(TPS_ENV)
    texts = [
        "GPUID 3\ngpuid 4\nParentDir /a b # c\n# x\n\nScorer\tDose\nBare\nOutputDir\t /o \n",
        "GPUID 1\r\nScorer Dose\r\n",
        "GPUID 0\n   \nScorer Dose\n",
        "GPUID 0\r\n\r\n",
        "ParentDir #\nGPUID 2\n",
        "Scorer Dose\nScorer #\n",
        "Unknown #\nGPUID 7\n",
        "ParentDir   \nGPUID 8\n",
    ]
    for index, text in enumerate(texts):
        path = tmp_path / f"{index}.in"
        path.write_bytes(text.encode())
        try:
            parsed = parse_tps_input(text)
        except TpsParseAbort:
            parsed = None
        try:
            sim = tps_env.Parser(str(path))
        except tps_env.Abort:
            assert parsed is None, text
            continue
        aborted = False
        # MOQUI looks up only the keys it knows; an unknown key's empty value never matters
        for key in sorted(KNOWN_KEYS):
            try:
                got = sim.get_string(key, None)
            except tps_env.Abort:
                aborted = True
                continue
            if parsed is not None:
                assert got == tps_lookup(parsed, key), (text, key)
        for key, value in (parsed or {}).items():
            assert sim.get_string(key, None) == value, (text, key)
        assert aborted == (parsed is None), text


@pytest.mark.parametrize("implicit_vr", [False, True], ids=["explicit_vr", "implicit_vr"])
@pytest.mark.parametrize("script", [TPS_ENV, INTERPRETER], ids=["tps_env", "mqi_interpreter"])
def test_small_dicom_reader_matches_pydicom(
    case: WrittenCase, tmp_path: Path, script: Path, implicit_vr: bool
) -> None:
    # the fallback for hosts without pydicom must read the plan exactly as pydicom does
    assert case.rtplan_path is not None
    plan = pydicom.dcmread(case.rtplan_path)
    plan.IonBeamSequence[1].NumberOfRangeShifters = 1
    path = tmp_path / "RP.dcm"
    if implicit_vr:
        plan.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    pydicom.dcmwrite(path, plan, enforce_file_format=True)
    module = load_script(script)
    with_pydicom = module.read_plan(str(path))
    module.pydicom = None
    without = module.read_plan(str(path))
    assert without == with_pydicom
    assert [b["name"] for b in without["beams"]] == ["SETUP", "1G090", "2G180"]
    assert [b["number"] for b in without["beams"]] == [1, 2, 3]
    assert without["beams"][1]["beamline_geometries"] == 1
    assert without["beams"][1]["energies"] == [110.0, 110.0, 108.0, 108.0]
    assert module.read_plan(str(case.case_path / "PlanInfo.missing")) is None


# --- nvidia-smi ----------------------------------------------------------------------------


def test_nvidia_smi_inventory_format(tmp_path: Path) -> None:
    env = clean_env(tmp_path, MQI_SIM_GPUS="3", MQI_SIM_GPU_MEMORY_MB="24576")
    done = run(NVIDIA_SMI, INVENTORY_QUERY, CSV_FORMAT, env=env, direct=True)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = done.stdout.splitlines()
    assert len(rows) == 3
    for index, row in enumerate(rows):
        m = INVENTORY_ROW.match(row)
        assert m, row
        assert m.group(1) == str(index)
        assert m.group(3) == "NVIDIA H200"
        assert m.group(4, 5, 6) == ("24576", "0", "24576")
    gpus, bad = parse_inventory(done.stdout)
    assert bad == () and [g.name for g in gpus] == ["H200"] * 3
    # stable per state dir, different across state dirs
    again = run(NVIDIA_SMI, INVENTORY_QUERY, CSV_FORMAT, env=env)
    assert again.stdout == done.stdout
    other = run(
        NVIDIA_SMI,
        INVENTORY_QUERY,
        CSV_FORMAT,
        env={**env, "MQI_SIM_STATE_DIR": str(tmp_path / "x")},
    )
    assert {g.uuid for g in parse_inventory(other.stdout)[0]}.isdisjoint(g.uuid for g in gpus)


def test_nvidia_smi_eight_field_query_headers_and_units(tmp_path: Path) -> None:
    env = clean_env(tmp_path, MQI_SIM_GPUS="1", MQI_SIM_GPU_MEMORY_MB="1000")
    eight = INVENTORY_QUERY.removesuffix(",clocks.gr")
    done = run(NVIDIA_SMI, eight, CSV_FORMAT, env=env)
    assert done.returncode == 0
    assert len(done.stdout.strip().split(", ")) == 8
    done = run(NVIDIA_SMI, INVENTORY_QUERY, "--format=csv", env=env)
    head, row = done.stdout.splitlines()
    assert head == (
        "index, uuid, name, memory.total [MiB], memory.used [MiB], memory.free [MiB], "
        "temperature.gpu, utilization.gpu [%], clocks.gr [MHz]"
    )
    assert row.endswith(", 1000 MiB, 0 MiB, 1000 MiB, 34, 0 %, 345 MHz")
    listing = run(NVIDIA_SMI, "-L", env=env)
    assert re.fullmatch(r"GPU 0: NVIDIA H200 \(UUID: GPU-[0-9a-f-]{36}\)\n", listing.stdout)
    table = run(NVIDIA_SMI, env=env)
    assert table.returncode == 0 and "NVIDIA H200" in table.stdout


def test_nvidia_smi_shows_foreign_processes_and_drops_dead_ones(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "jupyter.json").write_text(
        json.dumps({"gpu_index": 2, "pid": 4242, "used_memory_mb": 5000, "process_name": "python"})
    )
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "procs").mkdir()
    stale = tmp_path / "procs" / f"{dead.pid}.json"
    stale.write_text(json.dumps({"gpu_index": 0, "pid": dead.pid, "used_memory_mb": 99}))
    apps = run(NVIDIA_SMI, COMPUTE_APPS_QUERY, CSV_FORMAT, env=env)
    inventory = run(NVIDIA_SMI, INVENTORY_QUERY, CSV_FORMAT, env=env)
    gpus, _ = parse_inventory(inventory.stdout)
    assert apps.stdout == f"4242, {gpus[2].uuid}, python, 5000\n"
    assert not stale.exists()
    assert [g.memory_used_mb for g in gpus] == [0, 0, 5000, 0]
    assert gpus[2].utilization_pct == 30


@pytest.mark.parametrize(
    ("args", "rc", "text"),
    [
        (["--bogus"], 2, "Invalid combination of input arguments"),
        (["--query-gpu=index,bogus.field", CSV_FORMAT], 2, 'Field "bogus.field" is not a valid'),
        ([INVENTORY_QUERY], 2, "--format"),
        ([INVENTORY_QUERY, "--format=xml"], 2, "not a valid format"),
        (["-i", "9", INVENTORY_QUERY, CSV_FORMAT], 6, "No devices were found"),
    ],
)
def test_nvidia_smi_rejects_bad_arguments(
    tmp_path: Path, args: list[str], rc: int, text: str
) -> None:
    done = run(NVIDIA_SMI, *args, env=clean_env(tmp_path))
    assert done.returncode == rc
    assert text in done.stdout + done.stderr


def test_nvidia_smi_failure_injection(tmp_path: Path) -> None:
    done = run(
        NVIDIA_SMI, INVENTORY_QUERY, CSV_FORMAT, env=clean_env(tmp_path, MQI_SIM_SMI_FAIL="driver")
    )
    assert done.returncode == 9 and "couldn't communicate with the NVIDIA driver" in done.stdout
    (tmp_path / "smi_fail").write_text("lost")
    done = run(NVIDIA_SMI, INVENTORY_QUERY, CSV_FORMAT, env=clean_env(tmp_path))
    assert done.returncode == 15
    with pytest.raises(subprocess.TimeoutExpired):
        run(NVIDIA_SMI, env=clean_env(tmp_path / "other", MQI_SIM_SMI_FAIL="hang"), timeout=1)


# --- tps_env: the public fork's behaviours (MQI_SIM_PUBLIC_FORK, issue 23) ------------------


def test_public_fork_aborts_on_absolute_paths(csv_dir: Path, tmp_path: Path, state: Path) -> None:
    tps, out = write_tps(tmp_path / "a", csv_dir)  # STATIC has UseAbsolutePath true
    public = clean_env(state, MQI_SIM_RUN_SECONDS="0", MQI_SIM_PUBLIC_FORK="abspath")
    done = in_bash(f"{sys.executable} {TPS_ENV} {tps} 2>{tmp_path / 'err'}", public)
    assert done.returncode == 134
    assert "  what():  Log Dir is not provided" in (tmp_path / "err").read_text().splitlines()
    assert not out.exists()
    relative, _ = write_tps(tmp_path / "r", csv_dir, UseAbsolutePath=False)
    assert run(TPS_ENV, str(relative), env=public).returncode == 0


def test_public_fork_misreads_crlf_rows_and_reads_single_lines(
    csv_dir: Path, tmp_path: Path, state: Path
) -> None:
    crlf = csv_dir / "log" / BEAMS[2]
    assert b"\r\n" in next(crlf.glob("*.csv")).read_bytes()
    rows, _ = csv_counts(crlf)
    tps, _ = write_tps(tmp_path / "c", csv_dir)
    public = clean_env(state, MQI_SIM_RUN_SECONDS="0", MQI_SIM_PUBLIC_FORK="csv")
    done = run(TPS_ENV, str(tps), env=public)
    assert done.returncode == 0, done.stderr
    (spots,) = [ln for ln in done.stdout.splitlines() if ln.startswith("Total beamlets")]
    assert int(spots.rsplit(" ", 1)[1]) < rows, "exit 0, silently fewer spots"
    single = tmp_path / "single"
    shutil.copytree(csv_dir, single)
    for path in (single / "log").rglob("*.csv"):
        path.write_bytes(b",".join(path.read_bytes().splitlines()))
    tps, _ = write_tps(tmp_path / "s", single)
    done = run(TPS_ENV, str(tps), env=public)
    assert f"Total beamlets (Spots) : {rows}" in done.stdout.splitlines()


def test_public_fork_zero_histories_exit_0_with_an_all_zero_dose(
    csv_dir: Path, tmp_path: Path, state: Path
) -> None:
    tps, out = write_tps(tmp_path / "z", csv_dir, ParticlesPerHistory=1e-9)
    public = clean_env(state, MQI_SIM_RUN_SECONDS="0", MQI_SIM_PUBLIC_FORK="histories")
    done = run(TPS_ENV, str(tps), env=public)
    assert done.returncode == 0, done.stderr
    assert "Total histories (Particles) : 0" in done.stdout.splitlines()
    (raw,) = out.iterdir()
    assert raw.stat().st_size == phantom_grid(STATIC).raw_bytes
    assert not np.fromfile(raw, "<f8").any()


def test_public_fork_slab_and_dcm(csv_dir: Path, tmp_path: Path, state: Path) -> None:
    public = clean_env(state, MQI_SIM_RUN_SECONDS="0", MQI_SIM_PUBLIC_FORK="slab,dcm")
    tps, out = write_tps(tmp_path / "w", csv_dir, TwoCentimeterMode=True, OutputFormat="dcm")
    done = run(TPS_ENV, str(tps), env=public)
    assert done.returncode == 0, done.stderr
    (want,) = expected_outputs({**STATIC, "TwoCentimeterMode": True, "OutputFormat": "dcm"}, "x")
    (raw,) = out.iterdir()
    assert raw.name == f"{BEAMS[2]}_2_Dose.raw", "dcm is not implemented: raw instead"
    assert raw.stat().st_size == 1_280_000 == 400 * 400 * 1 * 8
    assert want.fallback is not None and want.fallback.size_ok(raw.stat().st_size)


@pytest.mark.parametrize(
    ("marker", "engine", "total"),
    [("engine", True, False), ("total", False, True), ("both", True, True), ("none", False, False)],
)
def test_tps_env_end_markers(
    csv_dir: Path, tmp_path: Path, state: Path, marker: str, engine: bool, total: bool
) -> None:
    tps, _ = write_tps(tmp_path / marker, csv_dir)
    done = run(
        TPS_ENV, str(tps), env=clean_env(state, MQI_SIM_RUN_SECONDS="0", MQI_SIM_END_MARKER=marker)
    )
    assert done.returncode == 0, done.stderr
    assert ("Time taken by MC engine:" in done.stdout) is engine
    assert ("Total execution time:" in done.stdout) is total


def test_tps_env_nan_transport_failure(csv_dir: Path, tmp_path: Path, state: Path) -> None:
    tps, out = write_tps(tmp_path / "n", csv_dir)
    done = run(TPS_ENV, str(tps), env=clean_env(state, MQI_SIM_FAIL="nan"))
    assert done.returncode == 1
    assert "There is nan in track direction" in done.stdout.splitlines()
    assert not any(out.iterdir()) and procs(state) == []
