"""One demo case through a real MOQUI `tps_env` (`make real-moqui`): a `local` host, as the clinic runs.

Usage: python deploy/real_moqui_case.py --tps-env BUILD/tps_env --workdir DIR

Writes a 2-beam synthetic case (no setup beam, so BeamNumbers run 1..N as the public fork's
by-position lookups need), a config whose one host is `kind: local` with the given binary
and the bundled nvidia-smi simulator (a CPU build needs no GPU), runs the service until the
case is terminal, checks each RT Dose against its raw file and prints one JSON summary.
Exit 0 when every beam completed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import yaml

import mqi_async.demo
from mqi_async.config import default_moqui, load_settings
from mqi_async.demo.cases import CaseSpec, write_case
from mqi_async.service import open_service, run_until_stopped

BIN = Path(mqi_async.demo.__file__).parent / "bin"
CASE_ID = "REAL0001"


def write_config(work: Path, tps_env: Path) -> Path:
    state = work / "sim-state"
    smi = [sys.executable, str(BIN / "nvidia-smi")]
    config: dict[str, Any] = {
        "scan_directory": "incoming",
        "work_directory": "work",
        "database": "mqi.db",
        "hosts": [
            {
                "name": "real",
                "kind": "local",
                "remote_root": str(work / "runs"),
                "moqui_command": [str(tps_env)],
                "nvidia_smi_command": shlex.join(
                    ["env", f"MQI_SIM_STATE_DIR={state}", "MQI_SIM_GPUS=1", *smi]
                ),
            }
        ],
        "gpu": {"poll_seconds": 1},
        "runs": {"poll_seconds": 1, "timeout_seconds": 3600},
        "retry": {"max_attempts": 1},
        # the shipped keys: relative paths; the 2 cm slab keeps the raw file small
        "moqui": {**default_moqui(), "TwoCentimeterMode": True, "MaxHistoriesPerBatch": 0},
        "logging": {"directory": "logs"},
    }
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def compare(work: Path, outputs: list[str]) -> list[dict[str, Any]]:
    """Each RT Dose against the raw file it came from."""
    checks = []
    for dcm in outputs:
        ds = pydicom.dcmread(dcm)
        frames = int(ds.get("NumberOfFrames") or 1)
        dose = ds.pixel_array.reshape(frames, ds.Rows, ds.Columns) * float(ds.DoseGridScaling)
        stem = Path(dcm).stem.split("_", 2)[-1]  # beam_<k>_<name>
        raw_path = next((work / "work").glob(f"{CASE_ID}*/runs/*/attempt_*/dose/{stem}.raw"))
        raw = np.fromfile(raw_path, "<f8").reshape(dose.shape)
        checks.append(
            {
                "rt_dose": dcm,
                "shape": list(dose.shape),
                "max_gy": float(raw.max()),
                "max_abs_diff": float(np.abs(dose - raw).max()),
            }
        )
    return checks


async def run_case(config: Path, timeout_s: float) -> Any:
    settings = load_settings(config)
    async with open_service(settings) as service:
        task = asyncio.create_task(run_until_stopped(service, None))
        try:
            await asyncio.wait_for(service.engine.ready.wait(), 60)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                for case in await service.store.snapshot():
                    if case.case_id == CASE_ID and str(case.status) in (
                        "completed",
                        "failed",
                        "cancelled",
                    ):
                        return case
                await asyncio.sleep(1)
            raise TimeoutError(f"{CASE_ID} not finished after {timeout_s:.0f} s")
        finally:
            service.request_stop()
            await asyncio.wait_for(task, 60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tps-env", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    config = write_config(work, args.tps_env.resolve())
    write_case(
        work / "incoming",
        CaseSpec(
            case_id=CASE_ID,
            beams=2,
            layers_per_beam=1,
            setup_beam=False,
            first_delivery_at=(datetime.now() - timedelta(hours=3)).replace(microsecond=0),
        ),
        marker_last=True,
    )
    case = asyncio.run(run_case(config, args.timeout))
    beams = [
        {"beam": b.beam_id, "status": str(b.status), "error": b.error, "outputs": list(b.outputs)}
        for b in case.beams
    ]
    ok = str(case.status) == "completed"
    summary = {"case": CASE_ID, "status": str(case.status), "error": case.error, "beams": beams}
    if ok:
        summary["checks"] = compare(work, [o for b in case.beams for o in b.outputs])
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
