"""nvidia-smi parsing (domain.md §4.2): odd rows are skipped, nothing ever raises."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqi_async.domain.gpus import (
    GPU_END_MARKER,
    GPU_SPLIT_MARKER,
    ComputeApp,
    build_sample,
    busy_uuids,
    gpu_query_script,
    parse_compute_apps,
    parse_inventory,
    split_gpu_query_output,
)

UUID0 = "GPU-5b3c1f2e-aaaa-bbbb-cccc-000000000000"
UUID1 = "GPU-5b3c1f2e-aaaa-bbbb-cccc-000000000001"


def test_inventory_rows_with_eight_or_nine_fields() -> None:
    text = (
        f"0, {UUID0}, NVIDIA GeForce RTX 3090, 24576, 1024, 23552, 41, 7, 1695\n"
        f"1, {UUID1}, NVIDIA RTX A5000, 24564, 0, 24564, 30, 0\n"
    )
    gpus, skipped = parse_inventory(text)
    assert skipped == ()
    assert [(g.index, g.uuid, g.name) for g in gpus] == [
        (0, UUID0, "GeForce RTX 3090"),
        (1, UUID1, "RTX A5000"),
    ]
    assert (gpus[0].memory_free_mb, gpus[0].clock_mhz, gpus[1].clock_mhz) == (23552, 1695, 0)


@pytest.mark.parametrize("empty", ["N/A", "", "null", "[N/A]", "[Not Supported]"])
def test_missing_numbers_read_as_zero(empty: str) -> None:
    gpus, skipped = parse_inventory(f"0, {UUID0}, Tesla T4, 15360, {empty}, 15360, {empty}, 0, 0")
    assert skipped == () and gpus[0].memory_used_mb == 0 and gpus[0].temperature_c == 0


@pytest.mark.parametrize(
    "row",
    [
        f"0, {UUID0}, A100, 1, 2, 3, 4",  # 7 fields
        f"0, {UUID0}, A100, 1, 2, 3, 4, 5, 6, 7",  # 10 fields
        "0, GPU-short, A100, 1, 2, 3, 4, 5",  # UUID too short
        f"x, {UUID0}, A100, 1, 2, 3, 4, 5",  # index not a number
        f"0, {UUID0}, A100, 1, 2, 3, 250, 5",  # temperature above 200
        f"0, {UUID0}, A100, 1, 2, 3, 40, 101",  # utilization above 100
        f"0, {UUID0}, A100, lots, 2, 3, 40, 1",  # junk number
        "No devices were found",
    ],
)
def test_bad_rows_are_skipped_not_fatal(row: str) -> None:
    good = f"1, {UUID1}, A100, 40960, 0, 40960, 30, 0"
    gpus, skipped = parse_inventory(f"{row}\n{good}\n")
    assert [g.uuid for g in gpus] == [UUID1]
    assert skipped == (row,)


def test_duplicate_uuid_is_skipped() -> None:
    row = f"0, {UUID0}, A100, 1, 0, 1, 30, 0"
    gpus, skipped = parse_inventory(f"{row}\n{row}\n")
    assert len(gpus) == 1 and skipped == (row,)


def test_compute_apps_and_busy_gpus() -> None:
    text = (
        f"4242, {UUID0}, /opt/moqui/tps_env, 2048\n"
        f"77, {UUID0}, python, N/A\n"
        f"99, {UUID1}, /weird, name, with commas, 10\n"
        "garbage\n"
        "\n"
    )
    apps, skipped = parse_compute_apps(text)
    assert apps[0] == ComputeApp(
        pid=4242, gpu_uuid=UUID0, process_name="/opt/moqui/tps_env", used_memory_mb=2048
    )
    assert apps[1].used_memory_mb == 0
    assert apps[2].process_name == "/weird, name, with commas"
    assert skipped == ("garbage",)
    assert busy_uuids(apps) == {UUID0, UUID1}
    assert parse_compute_apps("No running processes found\n") == ((), ())


def test_build_sample_keeps_time_and_skipped_rows() -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    sample = build_sample(
        "gpu1", at, f"0, {UUID0}, H200, 143771, 0, 143771, 30, 0, 345\nbad\n", "junk\n"
    )
    assert (sample.host, sample.taken_at, len(sample.gpus)) == ("gpu1", at, 1)
    assert sample.skipped_rows == ("bad", "junk")


def test_query_script_runs_both_queries_and_marks_statuses(tmp_path: object) -> None:
    script = gpu_query_script(["sh", "-c", 'echo "row $1"; exit 3', "smi"], timeout_s=5)
    out = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True).stdout
    parts = split_gpu_query_output(out)
    assert parts is not None
    assert parts.inventory_rc == parts.apps_rc == 3
    assert (
        parts.inventory_text.strip()
        == "row --query-gpu=index,uuid,name,memory.total,memory.used,memory.free,temperature.gpu,utilization.gpu,clocks.gr"
    )
    assert parts.apps_text.strip().startswith("row --query-compute-apps")


def test_split_needs_both_markers() -> None:
    assert split_gpu_query_output("rows\n") is None
    assert split_gpu_query_output(f"rows\n{GPU_SPLIT_MARKER} 0\napps\n") is None
    parts = split_gpu_query_output(f"r\n{GPU_SPLIT_MARKER} 0\na\n{GPU_END_MARKER} 124\n")
    assert parts is not None and (parts.inventory_rc, parts.apps_rc) == (0, 124)


@given(st.text())
def test_parsers_never_raise(text: str) -> None:
    gpus, skipped = parse_inventory(text)
    apps, bad = parse_compute_apps(text)
    split_gpu_query_output(text)
    assert len(gpus) + len(skipped) <= len(text.splitlines())
    assert len(apps) + len(bad) <= len(text.splitlines())


row_fields = st.lists(
    st.one_of(
        st.sampled_from(["N/A", "", "null", "0", "-1", "1e400", "nan", UUID0, "NVIDIA X"]),
        st.integers(-(10**12), 10**12).map(str),
        st.text(alphabet=st.characters(blacklist_characters=",\n\r"), max_size=12),
    ),
    min_size=0,
    max_size=11,
)


@given(st.lists(row_fields, max_size=6))
def test_csv_like_rows_never_raise(rows: list[list[str]]) -> None:
    text = "\n".join(", ".join(r) for r in rows)
    gpus, _ = parse_inventory(text)
    apps, _ = parse_compute_apps(text)
    for g in gpus:
        assert len(g.uuid) >= 10 and 0 <= g.utilization_pct <= 100 and g.temperature_c <= 200
    for a in apps:
        assert len(a.gpu_uuid) >= 10 and a.pid >= 0
