"""Layer CSVs in the single-line form MOQUI's public fork reads right, and zero histories."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqi_async.domain.errors import MqiError
from mqi_async.domain.fluence import (
    FluenceFormatError,
    normalise_layer,
    spot_histories,
    yields_no_histories,
)
from mqi_async.domain.moqui_log import END_MARKERS, failure_code_from_log, has_end_marker
from mqi_async.domain.scheduling import RUN_PROGRESS_END, run_progress
from mqi_async.fluence_files import prepare_fluence_tree

ROWS = [("0.06", "0.726", "0.0", "20"), ("0.12", "-3.5", "1.25", "7"), ("0.18", "2", "-1", "311")]


def public_fork_read(text: bytes) -> list[tuple[float, float, int]]:
    """How jokh38/moqui_v2 reads a layer: getline(',') tokens counted 1..4."""
    spots: list[tuple[float, float, int]] = []
    x = y = 0.0
    for index, token in enumerate(text.split(b","), start=1):
        place = (index - 1) % 4 + 1
        if place == 2:
            x = float(token.split()[0] if token.split() else token)
        elif place == 3:
            y = float(token.split()[0])
        elif place == 4:
            spots.append((x, y, int(float(token.split()[0]))))
    return spots


@pytest.mark.parametrize("eol", [b"\r\n", b"\n", b"\r"], ids=["crlf", "lf", "cr"])
@pytest.mark.parametrize("trailing", [True, False])
def test_rows_become_one_line_the_public_fork_reads_right(eol: bytes, trailing: bool) -> None:
    data = eol.join(b",".join(v.encode() for v in row) for row in ROWS) + (eol if trailing else b"")
    assert len(public_fork_read(data)) < len(ROWS), "the fork misreads rows with line breaks"
    layer = normalise_layer(data)
    assert layer.changed and layer.spots == 3 and layer.max_count == 311
    assert b"\r" not in layer.text and b"\n" not in layer.text
    assert public_fork_read(layer.text) == [(0.726, 0.0, 20), (-3.5, 1.25, 7), (2.0, -1.0, 311)]


def test_single_line_is_kept_as_is() -> None:
    data = b",".join(b",".join(v.encode() for v in row) for row in ROWS)
    layer = normalise_layer(data)
    assert not layer.changed and layer.text == data
    assert normalise_layer(data + b"\r\n").text == data


def test_empty_layer_stays_empty() -> None:
    assert normalise_layer(b"") == normalise_layer(b"").__class__(
        text=b"", spots=0, max_count=0, changed=False
    )
    assert normalise_layer(b"\r\n").changed


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"time_ms,x_mm,y_mm,count\r\n0.06,1,2,3\r\n", "line 1"),
        (b"0.06,1,2,3\r\n0.12,1,2\r\n", "line 2"),
        (b"0.06,1,2,3\r\n0.12,1,2,3,4\r\n", "line 2"),
        (b"0.06,1,2,3\r\n\r\n0.12,1,2,3\r\n", "line 2"),
        (b"0.06,1,2,3,0.12,1,2", "7 values"),
        (b"0.06,1,,3", "empty"),
        (b"0.06;1;2;3", "not a number"),
    ],
    ids=[
        "header",
        "short_row",
        "long_row",
        "blank_line",
        "odd_tokens",
        "empty_value",
        "semicolons",
    ],
)
def test_other_shapes_are_refused(data: bytes, words: str) -> None:
    with pytest.raises(FluenceFormatError, match=words):
        normalise_layer(data)


_NUMBER = st.floats(allow_nan=False, allow_infinity=False, width=32).map(lambda f: f"{f:.4g}")


@given(
    rows=st.lists(st.tuples(_NUMBER, _NUMBER, _NUMBER, st.integers(0, 10**6).map(str)), min_size=1),
    eol=st.sampled_from(["\r\n", "\n"]),
)
def test_normalising_keeps_every_value_in_order(
    rows: list[tuple[str, str, str, str]], eol: str
) -> None:
    data = "".join(",".join(r) + eol for r in rows).encode()
    layer = normalise_layer(data)
    assert layer.text.split(b",") == [v.encode() for r in rows for v in r]
    assert layer.max_count == max(int(r[3]) for r in rows)
    assert normalise_layer(layer.text) == type(layer)(
        text=layer.text, spots=len(rows), max_count=layer.max_count, changed=False
    )


def test_a_large_layer_is_fast() -> None:
    data = b"".join(
        b"%.2f,%.4f,%.4f,%d\r\n" % (i * 0.06, i * 0.01, -i * 0.02, i % 500) for i in range(30_000)
    )
    assert len(data) > 800_000
    started = time.perf_counter()
    layer = normalise_layer(data)
    assert time.perf_counter() - started < 1.0  # ~20 ms here; generous for a loaded machine
    assert layer.spots == 30_000


@pytest.mark.parametrize(
    ("count", "pph", "histories"),
    [
        (20, 1.0, 20),
        (20, 0.05, 1),
        (19, 0.05, 0),
        (3, 1 / 3, 1),
        (9999, 0.0001, 0),
        (10**4, 1e-4, 1),
    ],
)
def test_spot_histories_truncate_like_moqui(count: int, pph: float, histories: int) -> None:
    assert spot_histories(count, pph) == histories


def test_zero_histories_only_for_a_positive_factor() -> None:
    assert yields_no_histories(311, 0.001)
    assert not yields_no_histories(1000, 0.001)
    assert not yields_no_histories(5, -1.0), "MOQUI's -1 means one history per beamlet"
    assert not yields_no_histories(5, 0.0)


def _tree(root: Path, layers: dict[str, bytes]) -> Path:
    for rel, data in layers.items():
        path = root / "log" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root / "log"


def test_the_tree_is_rewritten_in_place(tmp_path: Path) -> None:
    log = _tree(
        tmp_path,
        {
            "1G090/01_150.00MeV.csv": b"0.06,1,2,30\r\n0.12,3,4,5\r\n",
            "2G270/01_140.00MeV.csv": b"0,1,2,3",
        },
    )
    report = prepare_fluence_tree(log, {"ParticlesPerHistory": 1})
    assert (report.files, report.rewritten, report.spots) == (2, 1, 3)
    assert (log / "1G090/01_150.00MeV.csv").read_bytes() == b"0.06,1,2,30,0.12,3,4,5"
    assert not list(log.rglob("*.tmp"))
    again = prepare_fluence_tree(log, {"ParticlesPerHistory": 1})
    assert again.rewritten == 0


def test_the_tree_names_a_bad_csv_and_a_field_without_histories(tmp_path: Path) -> None:
    log = _tree(tmp_path / "a", {"F1/01_150.00MeV.csv": b"t,x,y,c\r\n1,2,3,4\r\n"})
    with pytest.raises(MqiError) as bad:
        prepare_fluence_tree(log, {})
    assert bad.value.code == "csv_format_unsupported" and "F1/01_150.00MeV.csv" in bad.value.detail
    assert bad.value.kind == "permanent"
    log = _tree(tmp_path / "b", {"F1/01.csv": b"0,1,2,30", "F2/01.csv": b"0,1,2,3000"})
    with pytest.raises(MqiError) as zero:
        prepare_fluence_tree(log, {"ParticlesPerHistory": 0.001})
    assert zero.value.code == "zero_histories" and "field F1" in zero.value.detail
    # the clinic build normalises histories itself: no verdict then
    prepare_fluence_tree(log, {"ParticlesPerHistory": 0.001, "NormalizeTotalHistories": True})


def test_end_markers_of_both_builds_are_hints() -> None:
    for marker in END_MARKERS:
        assert has_end_marker(f"...\n{marker} 12\n")
        assert run_progress(f"{marker} 12", 20) == RUN_PROGRESS_END
    assert not has_end_marker("Transporting particles...\n")


def test_log_messages_name_failures() -> None:
    assert (
        failure_code_from_log("id: 3\nThere is nan in track direction\n") == "moqui_transport_nan"
    )
    assert failure_code_from_log("There is all-zeros in track direction") == "moqui_transport_nan"
    tail = "terminate called after throwing an instance of 'std::runtime_error'\n  what():  Log Dir is not provided\n"
    assert failure_code_from_log(tail) == "moqui_absolute_path_unsupported"
    assert failure_code_from_log("CUDA error: out of memory") is None
