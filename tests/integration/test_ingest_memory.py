"""Reading a case never loads its image series: 40 large .dcm files, peak RSS bounded."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from mqi_async.demo.cases import write_case
from tests.integration.test_ingest_watcher import spec

pytestmark = pytest.mark.slow

IMAGES = 40
#: 2048 x 2048 x 16 bit: 8 MiB of pixels per file, 320 MiB in all
SIDE = 2048
#: how much more the reader may hold at its peak with the images than without them
BOUND_MIB = 24


def _image(path: Path) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.PatientID = "MEM1"
    ds.Rows = ds.Columns = SIDE
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.SamplesPerPixel = 1
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(SIDE * SIDE * 2)
    ds.save_as(path, enforce_file_format=True)


_PROBE = textwrap.dedent(
    """
    import resource, sys
    from datetime import datetime, timedelta
    from pathlib import Path
    from mqi_async.ingest.reader import CaseReader
    reader = CaseReader(scan_directory=Path(sys.argv[1]), fraction_window=timedelta(minutes=60))
    result = reader._resolve_sync(sys.argv[2], datetime.now())
    assert type(result).__name__ == "ResolvedCase", result
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
    """
)


def _peak_mib(scan: Path, case_dir: Path) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(scan), str(case_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return int(out.stdout.strip())


def test_forty_large_images_beside_the_plan_cost_no_memory(tmp_path: Path) -> None:
    scan = tmp_path / "incoming"
    case = write_case(scan / "G1", spec("MEM1", room=""))
    baseline = _peak_mib(scan, case.case_dir)
    first = case.case_dir / "CT.0000.dcm"
    _image(first)
    for i in range(1, IMAGES):
        # hard links: 320 MiB to read, no disk to spare for it
        os.link(first, case.case_dir / f"CT.{i:04d}.dcm")
    assert pydicom.dcmread(first, stop_before_pixels=True).Modality == "CT"
    total_mib = IMAGES * first.stat().st_size // 2**20
    with_images = _peak_mib(scan, case.case_dir)
    print(f"peak RSS {baseline} MiB without, {with_images} MiB with {total_mib} MiB of images")
    assert with_images - baseline < BOUND_MIB


def test_a_plan_above_the_cap_is_a_named_failure(tmp_path: Path) -> None:
    from datetime import datetime, timedelta

    from mqi_async.domain.errors import IngestError
    from mqi_async.ingest.reader import CaseReader

    scan = tmp_path / "incoming"
    case = write_case(scan / "G1", spec("BIG1", room=""))
    assert case.rtplan_path is not None
    size = case.rtplan_path.stat().st_size
    reader = CaseReader(
        scan_directory=scan, fraction_window=timedelta(minutes=60), max_plan_bytes=size - 1
    )
    with pytest.raises(IngestError) as caught:
        reader._resolve_sync(str(case.case_dir), datetime.now())
    assert caught.value.code == "rtplan_too_large"
    assert "ingest.max_rtplan_mb" in str(caught.value)
    # at the cap it is read
    reader = CaseReader(
        scan_directory=scan, fraction_window=timedelta(minutes=60), max_plan_bytes=size
    )
    assert type(reader._resolve_sync(str(case.case_dir), datetime.now())).__name__ == "ResolvedCase"
