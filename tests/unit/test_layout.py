"""Case layout rules: case dirs, identity, rooms, staging paths, event paths and safe names."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from mqi_async.ingest.layout import (
    SAFE_NAME_MAX,
    PathKind,
    case_identity,
    classify_event_path,
    is_case_dir,
    is_delivery_dir,
    is_staging_path,
    room_of,
    safe_name,
)

# Hypothesis writes caches to ./.hypothesis while pytest collects, and with this project's
# norecursedirs pytest then warns (an error under -W error) about that folder on the next run
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "mqi_async-hypothesis")

SCAN = "/data/scan"
STUDY = "1.2.826.0.1.3680043.8.498.1"


@pytest.mark.parametrize(
    ("path", "ignored"),
    [
        (f"{SCAN}/G1/p/s/RP.dcm", False),
        (f"{SCAN}/G1/p.extracting/s/RP.dcm", True),
        (f"{SCAN}/G1/case.zip.tmp", True),
        (f"{SCAN}/G1/p/s.backup.20250101/RP.dcm", True),
        (f"{SCAN}/extract_123.tmp/p/RP.dcm", True),
        (f"{SCAN}/G1/extract_.tmp", True),
        (f"{SCAN}/G1/extract_1.tmpx/RP.dcm", False),
        (f"{SCAN}/G1/p/s/extracting/RP.dcm", False),
        (f"{SCAN}/G1/p/backup/RP.dcm", False),
        (f"{SCAN}/G1/case.zip", False),
    ],
)
def test_staging_paths(path: str, ignored: bool) -> None:
    assert is_staging_path(path) is ignored
    kind = classify_event_path(SCAN, path).kind
    assert (kind == PathKind.IGNORED) is ignored


@pytest.mark.parametrize(
    ("files", "subdirs", "is_case"),
    [
        (["RP.1.dcm"], {"2025010109300000": ["PlanInfo.txt"]}, True),
        (["RP.1.DCM"], {"2025010109300000": ["01_1_001_001_001.ptn"]}, True),
        (["RP.1.dcm"], {"2025010109300000": ["PlanRange.txt"], "x": []}, False),
        ([], {"2025010109300000": ["PlanInfo.txt"]}, False),
        (["PlanInfo.txt"], {"2025010109300000": ["PlanInfo.txt"]}, False),
        (["RP.1.dcm", "_CASE_READY"], {}, False),
        (["notes.txt", "a.dcm"], {"d": ["x.PTN"]}, True),
    ],
)
def test_is_case_dir(files: list[str], subdirs: dict[str, list[str]], is_case: bool) -> None:
    assert is_case_dir(files, subdirs) is is_case


def test_is_delivery_dir() -> None:
    assert is_delivery_dir(["PlanInfo.txt"])
    assert is_delivery_dir(["a.ptn", "b.mgn"])
    assert not is_delivery_dir(["planinfo.txt.bak", "PlanRange.txt"])


@pytest.mark.parametrize(
    ("path", "room"),
    [
        (f"{SCAN}/G1/p/s", "G1"),
        (f"{SCAN}/G2/p/s/2025/x.ptn", "G2"),
        (f"{SCAN}/site/G2/p/s", "G2"),
        (f"{SCAN}/G1/G2/s", "G1"),
        (f"{SCAN}/p/s", ""),
        (f"{SCAN}/g1/p/s", ""),
        (f"{SCAN}/p/G1", ""),
        ("/elsewhere/G2/p", "G2"),
    ],
)
def test_room_of(path: str, room: str) -> None:
    assert room_of(SCAN, path) == room


def test_nested_identity_comes_from_patient_folder() -> None:
    case_dir = f"{SCAN}/G1/00000001/{STUDY}"
    identity = case_identity(SCAN, case_dir, case_has_marker=False, parent_has_marker=True)
    assert identity.case_id == "00000001"
    assert identity.case_path == case_dir
    assert identity.is_nested and identity.is_ready
    assert identity.marker_path == f"{SCAN}/G1/00000001/_CASE_READY"
    assert identity.room == "G1"


@pytest.mark.parametrize("marker", [True, False])
def test_flat_identity_comes_from_case_folder(marker: bool) -> None:
    case_dir = f"{SCAN}/G2/a b;$(rm -rf ~)/"
    identity = case_identity(SCAN, case_dir, case_has_marker=marker, parent_has_marker=False)
    assert identity.case_id == "a b;$(rm -rf ~)"
    assert identity.case_path == f"{SCAN}/G2/a b;$(rm -rf ~)"
    assert not identity.is_nested
    assert identity.is_ready is marker
    assert identity.marker_path == (f"{identity.case_path}/_CASE_READY" if marker else None)


@pytest.mark.parametrize("case_dir", [f"{SCAN}/G1/{STUDY}", f"{SCAN}/{STUDY}"])
def test_marker_in_room_or_scan_dir_is_not_a_patient_folder(case_dir: str) -> None:
    identity = case_identity(SCAN, case_dir, case_has_marker=False, parent_has_marker=True)
    assert (identity.case_id, identity.is_nested, identity.is_ready) == (STUDY, False, False)


def test_custom_marker_name() -> None:
    identity = case_identity(
        SCAN, f"{SCAN}/c", case_has_marker=True, parent_has_marker=False, marker="READY"
    )
    assert identity.marker_path == f"{SCAN}/c/READY"


@pytest.mark.parametrize(
    ("path", "kind", "candidates"),
    [
        (
            f"{SCAN}/G1/p/s/2025010109300000/01_1_001_001_001.ptn",
            PathKind.PTN,
            [
                f"{SCAN}/G1/p/s/2025010109300000/01_1_001_001_001.ptn",
                f"{SCAN}/G1/p/s/2025010109300000",
                f"{SCAN}/G1/p/s",
                f"{SCAN}/G1/p",
            ],
        ),
        (f"{SCAN}/G1/p/_CASE_READY", PathKind.MARKER, [f"{SCAN}/G1/p"]),
        (f"{SCAN}/c/_CASE_READY", PathKind.MARKER, [f"{SCAN}/c"]),
        (f"{SCAN}/_CASE_READY", PathKind.MARKER, []),
        (f"{SCAN}/G1/_CASE_READY", PathKind.MARKER, []),
        (
            f"{SCAN}/c/d/PlanInfo.txt",
            PathKind.PLANINFO,
            [f"{SCAN}/c/d/PlanInfo.txt", f"{SCAN}/c/d", f"{SCAN}/c"],
        ),
        (f"{SCAN}/G2/c/RP.1.dcm", PathKind.DICOM, [f"{SCAN}/G2/c/RP.1.dcm", f"{SCAN}/G2/c"]),
        (f"{SCAN}/G2/c", PathKind.OTHER, [f"{SCAN}/G2/c"]),
        (f"{SCAN}/G2", PathKind.IGNORED, []),
        (SCAN, PathKind.IGNORED, []),
        ("/data/other/c/x.ptn", PathKind.IGNORED, []),
        (f"{SCAN}/../other/x.ptn", PathKind.IGNORED, []),
        (f"{SCAN}/G1/p/s/2025.extracting/x.ptn", PathKind.IGNORED, []),
    ],
)
def test_classify_event_path(path: str, kind: PathKind, candidates: list[str]) -> None:
    event = classify_event_path(SCAN, path)
    assert event.kind == kind
    assert list(event.case_dir_candidates) == candidates


def test_classified_event_carries_the_room() -> None:
    assert classify_event_path(SCAN, f"{SCAN}/G2/p/s/x.ptn").room == "G2"
    assert classify_event_path(SCAN, f"{SCAN}/p/s/x.ptn").room == ""


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("00000001", "00000001"),
        ("1.2.826.0.1", "1.2.826.0.1"),
        ("case_A-2", "case_A-2"),
        ("_x", "_x"),
        ("a" * 100, "a" * 100),
    ],
)
def test_safe_names_are_kept(name: str, expected: str) -> None:
    assert safe_name(name) == expected


_HASHED = re.compile(r"(?P<readable>[A-Za-z0-9_][A-Za-z0-9._-]*)--[0-9a-f]{16}")


@pytest.mark.parametrize(
    ("name", "readable"),
    [
        ("a b;$(rm -rf ~)", "a_b___rm_-rf___"),
        ("..", "x"),
        (".", "x"),
        ("", "x"),
        ("-rf", "rf"),
        (".hidden", "hidden"),
        ("`id`", "_id_"),
        ("line\nbreak", "line_break"),
        ("Hong Gildong 홍길동", "Hong_Gildong____"),
        ("quote'\"", "quote__"),
        ("a" * 101, "a" * (SAFE_NAME_MAX - 18)),
        ("x--0123456789abcdef", "x--0123456789abcdef"),
    ],
)
def test_unsafe_names_keep_readable_part_and_hash(name: str, readable: str) -> None:
    result = safe_name(name)
    match = _HASHED.fullmatch(result)
    assert match is not None, result
    assert match["readable"] == readable
    assert len(result) <= SAFE_NAME_MAX


def test_safe_name_distinguishes_lookalikes() -> None:
    names = ["a b", "a_b", "a\tb", "a/b", "a..b", "..", ".", "", "x", "-x", "x-"]
    results = [safe_name(n) for n in names]
    assert len(set(results)) == len(names)
    hashed = safe_name("a b")
    assert safe_name(hashed) != hashed


_SAFE_OUTPUT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")


@settings(max_examples=300, deadline=None, database=None)
@given(name=st.text(max_size=160))
def test_safe_name_is_always_safe(name: str) -> None:
    result = safe_name(name)
    assert _SAFE_OUTPUT.fullmatch(result), result
    assert result not in (".", "..")
    assert safe_name(result) == result or _HASHED.fullmatch(result)


@settings(max_examples=150, deadline=None, database=None)
@given(names=st.lists(st.text(alphabet=st.sampled_from("ab _.-/\n$ü"), max_size=12), unique=True))
def test_safe_name_is_injective(names: list[str]) -> None:
    results = [safe_name(n) for n in names]
    assert len(set(results)) == len(results)


@settings(max_examples=150, deadline=None, database=None)
@given(name=st.text(max_size=120))
def test_safe_name_of_a_hashed_result_differs(name: str) -> None:
    result = safe_name(name)
    if result != name:
        assert safe_name(result) != result
