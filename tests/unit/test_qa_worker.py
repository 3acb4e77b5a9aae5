"""The gamma off the event loop: the dose worker's `gamma` request and its async client."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import numpy as np
import pytest

from mqi_async.domain.errors import PermanentError
from mqi_async.domain.tps import PhantomGrid
from mqi_async.dose import serve
from mqi_async.qa.gamma import GammaOptions
from mqi_async.qa.synthetic import noise
from mqi_async.qa.worker import gamma_in_worker, gamma_request
from mqi_async.tools import DoseWorker
from tests.unit.test_qa_rtdose import grid_centres, sample_dose, write_dose

OPTIONS = GammaOptions(dose_percent=2, distance_mm=2)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    dose = sample_dose()
    return (
        write_dose(tmp_path / "ref.dcm", dose),
        write_dose(tmp_path / "eval.dcm", dose * 1.01),
    )


def answers(*requests: dict[str, object]) -> list[dict[str, object]]:
    out = io.StringIO()
    serve([json.dumps(r) + "\n" for r in requests], out)
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_serve_answers_gamma_and_still_conversions(pair: tuple[Path, Path], tmp_path: Path) -> None:
    gamma_out = tmp_path / "maps" / "gamma.npy"
    ok, bad, convert = answers(
        gamma_request(pair[0], pair[1], OPTIONS, gamma_output=gamma_out),
        gamma_request(tmp_path / "missing.dcm", pair[1], OPTIONS),
        {
            "op": "convert",
            "input": str(tmp_path / "no.raw"),
            "output": str(tmp_path / "o.dcm"),
            "tps": str(tmp_path / "no.in"),
            "plan": str(tmp_path / "no.dcm"),
            "beam_number": 1,
        },
    )
    assert ok["ok"] is True
    result = ok["result"]
    assert isinstance(result, dict)
    assert result["pass_rate_percent"] == 100.0 and result["evaluated_points"] > 0
    assert result["gamma_output"] == str(gamma_out)
    g = np.load(gamma_out)
    assert g.shape == sample_dose().shape and np.nanmax(g) <= 1
    assert not list(gamma_out.parent.glob("*.part"))
    assert bad == {"ok": False, "code": "dose_unreadable", "detail": bad["detail"]}
    assert convert["ok"] is False and convert["code"] == "dose_conversion_failed"


def test_serve_rejects_a_bad_gamma_request(pair: tuple[Path, Path]) -> None:
    request = gamma_request(pair[0], pair[1], OPTIONS)
    request["dose_percent"] = "lots"
    (answer,) = answers(request)
    assert answer["ok"] is False and answer["code"] == "internal_error"


async def test_gamma_in_the_warm_worker(pair: tuple[Path, Path], tmp_path: Path) -> None:
    worker = DoseWorker(timeout_s=120)
    try:
        result = await gamma_in_worker(worker, pair[0], pair[1], OPTIONS)
        assert result["pass_rate_percent"] == 100.0
        other = write_dose(tmp_path / "other.dcm", sample_dose(), frame_of_reference="1.2.3")
        with pytest.raises(PermanentError) as info:
            await gamma_in_worker(worker, pair[0], other, OPTIONS)
        assert info.value.code == "frame_of_reference_mismatch"
        # the same warm process answered both
        assert worker._proc is not None and worker._proc.returncode is None
    finally:
        await worker.aclose()


async def test_cancelling_stops_the_gamma(tmp_path: Path) -> None:
    grid = PhantomGrid(nx=160, ny=160, nz=120, dx=2.0, dy=2.0, dz=2.0, x0=-160, y0=-160, z0=-120)
    z, y, x = grid_centres(grid)
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    ref = (
        2.0
        / (1 + np.exp((np.abs(xx) - 90) / 2))
        / (1 + np.exp((np.abs(yy) - 90) / 2))
        / (1 + np.exp((np.abs(zz) - 70) / 2))
    )
    ev = np.clip(ref * 1.03 + noise(ref.shape, 0.02, seed=3, scale=2.0), 0, None)
    a = write_dose(tmp_path / "a.dcm", ref, grid)
    b = write_dose(tmp_path / "b.dcm", ev, grid)
    slow = GammaOptions(
        dose_percent=0.5, distance_mm=3, local=True, max_gamma=2.5, cutoff_percent=1
    )
    worker = DoseWorker(timeout_s=300)
    try:
        task = asyncio.create_task(gamma_in_worker(worker, a, b, slow))
        await asyncio.sleep(1.0)
        assert not task.done()
        proc = worker._proc
        assert proc is not None
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert proc.returncode is not None  # killed, not left computing
        # the next request gets a fresh worker
        small = write_dose(tmp_path / "s.dcm", sample_dose())
        result = await gamma_in_worker(worker, small, small, OPTIONS)
        assert result["gamma_max"] == 0.0
    finally:
        await worker.aclose()
