"""Two services with their own databases but one scan folder and one host: each case runs once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from mqi_async.config import load_settings
from tests.e2e import make_rig, running_service, statuses, wait_until
from tests.sshd import SshdServer

pytestmark = [pytest.mark.sshd, pytest.mark.slow]


async def test_a_second_service_never_runs_a_claimed_case(tmp_path: Path, sshd: SshdServer) -> None:
    rig = make_rig(tmp_path / "rig", sshd, gpus=4, run_seconds=0.5)
    config = yaml.safe_load(rig.config_path.read_text())
    # the second installation: same scan folder, same host and remote_root, its own database
    other = tmp_path / "other"
    other.mkdir()
    config.update(
        scan_directory=str(rig.scan),
        work_directory=str(other / "work"),
        database=str(other / "mqi.db"),
        logging={"directory": str(other / "logs"), "level": "INFO"},
    )
    other_config = other / "config.yaml"
    other_config.write_text(yaml.safe_dump(config))
    for i in range(3):
        rig.drop_case(f"TWIN{i}", beams=1, seed=i)
    async with (
        running_service(rig.settings()) as first,
        running_service(load_settings(other_config)) as second,
    ):

        async def settled() -> bool:
            a, b = await asyncio.gather(statuses(first), statuses(second))
            return all(
                a.get(c) in ("completed", "failed") and b.get(c) in ("completed", "failed")
                for c in ("TWIN0", "TWIN1", "TWIN2")
            )

        await wait_until(settled, timeout_s=120, what="both services settled")
        a_cases = {c.case_id: c for c in await first.store.snapshot()}
        b_cases = {c.case_id: c for c in await second.store.snapshot()}
    starts = (rig.state_dir / "starts.log").read_text().splitlines()
    assert len(starts) == 3  # one MOQUI start per case, counted on the host
    for case_id in ("TWIN0", "TWIN1", "TWIN2"):
        pair = sorted([str(a_cases[case_id].status), str(b_cases[case_id].status)])
        assert pair == ["completed", "failed"], case_id
        loser = a_cases[case_id] if a_cases[case_id].status == "failed" else b_cases[case_id]
        assert loser.error and loser.error.startswith("case_claimed_elsewhere")
