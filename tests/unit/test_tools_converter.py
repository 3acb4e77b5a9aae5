"""An external raw_to_dicom converter publishes exactly this beam's dose, or a named error."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest

from mqi_async.config import ToolsSettings
from mqi_async.domain.errors import TransientError
from mqi_async.tools import DoseWorker, LocalToolRunner, Tools

# names its own output file, as vendor converters do; writes nothing for an input called "empty"
_CONVERTER = """\
import pathlib, sys
src, out_dir = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
if src.name != "empty.raw":
    (out_dir / "RD_vendor_name.dcm").write_bytes(src.read_bytes())
"""


def _runner(tmp_path: Path) -> LocalToolRunner:
    script = tmp_path / "convert.py"
    script.write_text(_CONVERTER)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    settings = ToolsSettings(raw_to_dicom=[sys.executable, str(script), "{input}", "{output_dir}"])
    return LocalToolRunner(
        Tools(settings), settings, {"OutputFormat": "raw"}, DoseWorker(timeout_s=30)
    )


async def _convert(runner: LocalToolRunner, tmp_path: Path, name: str, target: Path) -> None:
    await runner.make_rt_dose(
        source=tmp_path / name,
        target=target,
        tps_input=tmp_path / "moqui_tps.in",
        plan=tmp_path / "plan.dcm",
        beam_number=1,
        log_path=tmp_path / "convert.log",
    )


async def test_each_beam_gets_its_own_dose(tmp_path: Path) -> None:
    runner = _runner(tmp_path)
    dose_dir = tmp_path / "dose"
    (tmp_path / "beam1.raw").write_bytes(b"dose of beam 1")
    (tmp_path / "beam2.raw").write_bytes(b"dose of beam 2")
    await _convert(runner, tmp_path, "beam1.raw", dose_dir / "b1.dcm")
    await _convert(runner, tmp_path, "beam2.raw", dose_dir / "b2.dcm")
    assert (dose_dir / "b1.dcm").read_bytes() == b"dose of beam 1"
    assert (dose_dir / "b2.dcm").read_bytes() == b"dose of beam 2"
    assert sorted(p.name for p in dose_dir.iterdir()) == ["b1.dcm", "b2.dcm"]


async def test_a_converter_that_writes_nothing_never_takes_another_beams_file(
    tmp_path: Path,
) -> None:
    runner = _runner(tmp_path)
    dose_dir = tmp_path / "dose"
    (tmp_path / "beam1.raw").write_bytes(b"dose of beam 1")
    (tmp_path / "empty.raw").write_bytes(b"")
    await _convert(runner, tmp_path, "beam1.raw", dose_dir / "b1.dcm")
    with pytest.raises(TransientError) as err:
        await _convert(runner, tmp_path, "empty.raw", dose_dir / "b2.dcm")
    assert err.value.code == "converter_output_ambiguous"
    assert (dose_dir / "b1.dcm").read_bytes() == b"dose of beam 1"
    assert not (dose_dir / "b2.dcm").exists()
