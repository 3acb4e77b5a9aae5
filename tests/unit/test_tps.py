"""moqui_tps.in: rendering, MOQUI's parser semantics and crash hazards, grid and output names."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from mqi_async.config import COMPUTED_TPS_KEYS, Settings
from mqi_async.domain.tps import (
    COMPUTED_KEY_ORDER,
    KNOWN_KEYS,
    TWO_CM_SLAB,
    TWO_CM_SLAB_ONE_SLICE,
    PhantomGrid,
    TpsComputed,
    TpsParseAbort,
    TpsValue,
    check_outputs,
    compatibility_warnings,
    expected_outputs,
    grid_for_size,
    moqui_bool,
    moqui_float,
    moqui_int,
    parse_tps_input,
    phantom_grid,
    phantom_grids,
    render_tps_input,
    tps_lookup,
    unread_keys,
)

# Hypothesis caches into ./.hypothesis, which the repo's pytest config does not skip when
# collecting; keep its files in the temp dir (as the other property tests here do)
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "mqi_async-hypothesis")

COMPUTED = TpsComputed(
    gpu_id=0,
    parent_dir="/runs/case 1/csv",
    dicom_dir="/runs/case 1/csv/plan",
    log_dir="/runs/case 1/csv/log",
    output_dir="/runs/case 1/beam_1/attempt_1/dose",
    beam_number=2,
    gantry=1,
)

STATIC: dict[str, TpsValue] = {
    "RandomSeed": -1932780356,
    "UseAbsolutePath": True,
    "TotalThreads": -1,
    "MaxHistoriesPerBatch": 10000000,
    "UsingPhantomGeo": True,
    "TwoCentimeterMode": False,
    "PhantomDimX": 400,
    "PhantomDimY": 400,
    "PhantomDimZ": 400,
    "PhantomUnitX": 1,
    "PhantomUnitY": 1,
    "PhantomUnitZ": 1,
    "PhantomPositionX": -200.0,
    "PhantomPositionY": -200.0,
    "PhantomPositionZ": -380.0,
    "Scorer": "Dose",
    "SupressStd": True,
    "BodyContourName": "External",
    "SourceType": "FluenceMap",
    "SimulationType": "perBeam",
    "ParticlesPerHistory": 0.1,
    "OutputFormat": "raw",
    "OverwriteResults": False,
}


def _expected(static: dict[str, TpsValue], computed: TpsComputed) -> dict[str, str]:
    want = {
        "GPUID": str(computed.gpu_id),
        "ParentDir": computed.parent_dir,
        "DicomDir": computed.dicom_dir,
        "DicomPath": computed.dicom_dir,
        "logFilePath": computed.log_dir,
        "OutputDir": computed.output_dir,
        "BeamNumbers": str(computed.beam_number),
        "GantryNum": str(computed.gantry),
    }
    for key, value in static.items():
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        # MOQUI trims ASCII whitespace only (mqi::trim_copy), not e.g. a no-break space
        text = text.strip(" \f\n\r\t\v")
        if text:
            want[key] = text
    return want


# --- rendering -------------------------------------------------------------------------


def test_rendered_file_parses_back_identically() -> None:
    text = render_tps_input(STATIC, COMPUTED)
    assert parse_tps_input(text) == _expected(STATIC, COMPUTED)


def test_rendered_file_shape_is_safe_for_moqui() -> None:
    text = render_tps_input({**STATIC, "Verbosity": "", "BeamPrefix": "  "}, COMPUTED)
    assert "\r" not in text
    assert text.endswith("\n") and not text.endswith("\n\n")
    lines = text[:-1].split("\n")
    for line in lines:
        assert line.strip(), "no whitespace-only (or empty) line"
        assert line == line.strip(), "no leading or trailing whitespace"
        key, sep, value = line.partition(" ")
        assert sep and key and value.strip(), f"no empty value: {line!r}"
        assert "#" not in line
    # computed keys first, in their fixed order
    assert [ln.split(" ", 1)[0] for ln in lines[: len(COMPUTED_KEY_ORDER)]] == list(
        COMPUTED_KEY_ORDER
    )
    # empty static values are left out, so MOQUI uses its default instead of aborting
    assert "Verbosity" not in text and "BeamPrefix" not in text


def test_values_are_formatted_like_the_communicator() -> None:
    parsed = parse_tps_input(render_tps_input(STATIC, COMPUTED))
    assert parsed["UseAbsolutePath"] == "true"
    assert parsed["OverwriteResults"] == "false"
    assert parsed["PhantomPositionX"] == "-200.0"
    assert parsed["MaxHistoriesPerBatch"] == "10000000"
    assert parsed["ParticlesPerHistory"] == "0.1"
    # a path with a space survives: the value is the rest of the line
    assert parsed["ParentDir"] == "/runs/case 1/csv"


@pytest.mark.parametrize("key", sorted(COMPUTED_TPS_KEYS) + ["GpuId", "DICOMPATH", "OutputDir"])
def test_computed_keys_cannot_come_from_static(key: str) -> None:
    with pytest.raises(ValueError, match="computed"):
        render_tps_input({**STATIC, key: "1"}, COMPUTED)


def test_computed_key_names_match_the_config_contract() -> None:
    assert {k.lower() for k in COMPUTED_KEY_ORDER} == COMPUTED_TPS_KEYS


def test_static_keys_differing_only_in_case_are_refused() -> None:
    with pytest.raises(ValueError, match="twice"):
        render_tps_input({"Scorer": "Dose", "scorer": "LETd"}, COMPUTED)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("Scorer", "Dose # comment"),
        ("BodyContourName", "Ext\nParentDir /evil"),
        ("BodyContourName", "Ext\r"),
        ("BodyContourName", "a\x00b"),
        ("Body Contour", "x"),
        ("Body#Contour", "x"),
        ("", "x"),
        ("Tab\tKey", "x"),
    ],
)
def test_unsafe_keys_and_values_are_refused(key: str, value: str) -> None:
    with pytest.raises(ValueError):
        render_tps_input({key: value}, COMPUTED)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_numbers_are_refused(value: float) -> None:
    with pytest.raises(ValueError):
        render_tps_input({"ParticlesPerHistory": value}, COMPUTED)


def test_computed_paths_with_hash_are_refused() -> None:
    bad = TpsComputed(
        gpu_id=0,
        parent_dir="/runs/case#1",
        dicom_dir="/runs/case#1/plan",
        log_dir="/runs/case#1/log",
        output_dir="/runs/case#1/out",
        beam_number=1,
        gantry=2,
    )
    with pytest.raises(ValueError, match="#"):
        render_tps_input(STATIC, bad)


@pytest.mark.parametrize(
    "changes",
    [
        {"gantry": 3},
        {"gantry": 0},
        {"beam_number": 0},
        {"gpu_id": -1},
        {"dicom_dir": "relative/plan"},
        {"output_dir": "/runs/out "},
    ],
)
def test_computed_values_are_checked(changes: dict[str, object]) -> None:
    fields = {
        "gpu_id": 0,
        "parent_dir": "/p",
        "dicom_dir": "/p/plan",
        "log_dir": "/p/log",
        "output_dir": "/p/out",
        "beam_number": 1,
        "gantry": 1,
    }
    with pytest.raises(ValueError):
        TpsComputed(**{**fields, **changes})  # type: ignore[arg-type]


def test_relative_mode_writes_paths_below_parent_dir() -> None:
    parsed = parse_tps_input(render_tps_input({**STATIC, "UseAbsolutePath": False}, COMPUTED))
    assert parsed["DicomDir"] == "plan"
    assert parsed["logFilePath"] == "log"
    # MOQUI joins ParentDir + "/" + value in relative mode
    assert parsed["ParentDir"] + "/" + parsed["DicomDir"] == COMPUTED.dicom_dir


def test_relative_mode_refuses_dirs_outside_parent_dir() -> None:
    outside = TpsComputed(
        gpu_id=0,
        parent_dir="/p/csv",
        dicom_dir="/elsewhere/plan",
        log_dir="/p/csv/log",
        output_dir="/p/out",
        beam_number=1,
        gantry=1,
    )
    with pytest.raises(ValueError, match="below ParentDir"):
        render_tps_input({"UseAbsolutePath": "0"}, outside)


def test_settings_defaults_render_and_parse_back() -> None:
    static = Settings().moqui
    # relative paths: UseAbsolutePath true aborts the public MOQUI fork
    assert static["UseAbsolutePath"] is False
    text = render_tps_input(static, COMPUTED)
    want = _expected(dict(static), COMPUTED)
    want.update(DicomDir="plan", logFilePath="log")
    assert parse_tps_input(text) == want


_KEY = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,20}", fullmatch=True).filter(
    lambda k: k.lower() not in COMPUTED_TPS_KEYS and k.lower() != "useabsolutepath"
)
_TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="#\r\n\x0b\x0c\x7f"),
    max_size=30,
).filter(lambda s: not any(ord(c) < 32 and c != "\t" for c in s))
_VALUE = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=False, allow_infinity=False),
    _TEXT,
)


@settings(database=None, deadline=None)
@given(st.dictionaries(_KEY, _VALUE, max_size=12))
def test_any_safe_static_mapping_round_trips(static: dict[str, TpsValue]) -> None:
    folded = [k.lower() for k in static]
    if len(set(folded)) != len(folded):
        with pytest.raises(ValueError):
            render_tps_input(static, COMPUTED)
        return
    static = {"UseAbsolutePath": True, **static}
    text = render_tps_input(static, COMPUTED)
    assert parse_tps_input(text) == _expected(static, COMPUTED)
    assert all(line.strip() for line in text[:-1].split("\n"))


# --- MOQUI's parser ----------------------------------------------------------------------


def test_parser_semantics() -> None:
    text = (
        "# a comment line\n"
        "   # an indented comment\n"
        "\n"
        "GPUID 3\n"
        "gpuid 5\n"  # later duplicates are ignored, case-insensitively
        "ParentDir /a b/c   # trailing comment\n"
        "BareKey\n"  # no space: matches nothing
        "Scorer\tDose extra\n"  # the key ends at the first *space*
        "OutputDir\t /out \t\n"  # the key part is trimmed too: "OutputDir\t" is OutputDir
    )
    parsed = parse_tps_input(text)
    assert parsed["GPUID"] == "3"
    assert parsed["ParentDir"] == "/a b/c"
    assert "BareKey" not in parsed
    assert parsed["Scorer\tDose"] == "extra"
    assert tps_lookup(parsed, "scorer") is None
    assert tps_lookup(parsed, "gpuid") == "3"
    assert parsed["OutputDir"] == "/out"
    assert tps_lookup(parsed, "OUTPUTDIR") == "/out"


def test_crlf_lines_are_fine_but_a_crlf_blank_line_aborts() -> None:
    assert parse_tps_input("GPUID 1\r\nScorer Dose\r\n") == {"GPUID": "1", "Scorer": "Dose"}
    with pytest.raises(TpsParseAbort) as info:
        parse_tps_input("GPUID 1\r\n\r\nScorer Dose\r\n")
    assert info.value.exception_type == "std::out_of_range"
    assert info.value.stderr.startswith(
        "terminate called after throwing an instance of 'std::out_of_range'\n  what():  "
    )


@pytest.mark.parametrize("line", [" ", "\t", "   \t ", "\r", "\f"])
def test_whitespace_only_line_aborts(line: str) -> None:
    with pytest.raises(TpsParseAbort):
        parse_tps_input(f"GPUID 0\n{line}\nScorer Dose\n")


def test_a_trailing_space_is_trimmed_at_read_time_so_the_key_is_absent() -> None:
    # read_input_parameters trims each line: "ParentDir " becomes "ParentDir", which has no
    # space and so matches nothing; MOQUI then uses the default instead of aborting
    assert parse_tps_input("GPUID 0\nParentDir   \n") == {"GPUID": "0"}


@pytest.mark.parametrize(
    "line", ["ParentDir # no value", "Scorer #", "ParentDir \t# x", "OutputDir  #x y"]
)
def test_known_key_with_empty_value_aborts(line: str) -> None:
    # the comment is cut after the line was trimmed, leaving "Key " with an empty value
    with pytest.raises(TpsParseAbort):
        parse_tps_input(f"GPUID 0\n{line}\n")


def test_empty_value_aborts_only_on_the_first_line_of_a_key() -> None:
    # the first line wins: a later empty duplicate is never looked at
    assert parse_tps_input("Scorer Dose\nScorer #\n") == {"Scorer": "Dose"}
    with pytest.raises(TpsParseAbort):
        parse_tps_input("Scorer #\nScorer Dose\n")


def test_unknown_key_with_empty_value_is_harmless() -> None:
    # an unknown key is never looked up, so its empty value never reaches trim
    assert parse_tps_input("SomethingElse #\nGPUID 0\n") == {"GPUID": "0"}
    with pytest.raises(TpsParseAbort):
        parse_tps_input("BeamLayerMultiGpuAllowedGpuIds # the communicator's empty list\n")


def test_known_keys_cover_the_static_defaults() -> None:
    assert {k.lower() for k in Settings().moqui} <= KNOWN_KEYS


@pytest.mark.parametrize(
    ("text", "value"),
    [("12", 12), ("-200.0", -200), ("  7abc", 7), ("abc", 0), ("", 0), ("+3", 3), ("1:0,2:1", 1)],
)
def test_atoi(text: str, value: int) -> None:
    assert moqui_int(text) == value


@pytest.mark.parametrize(
    ("text", "value"), [("1.5", 1.5), ("-2e3", -2000.0), (".5", 0.5), ("x", 0.0), ("3abc", 3.0)]
)
def test_atof(text: str, value: float) -> None:
    assert moqui_float(text) == value


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("TRUE", True), ("1", True), ("2", True), ("false", False), ("0", False)]
    + [("False", False), ("yes", False), ("", False)],
)
def test_bool(text: str, value: bool) -> None:
    assert moqui_bool(text) is value


# --- geometry and outputs ---------------------------------------------------------------


def test_phantom_grid_from_static_keys() -> None:
    grid = phantom_grid(STATIC)
    assert grid == PhantomGrid(
        nx=400, ny=400, nz=400, dx=1.0, dy=1.0, dz=1.0, x0=-200.0, y0=-200.0, z0=-380.0
    )
    assert grid.shape == (400, 400, 400)
    assert grid.raw_bytes == 8 * 400**3
    assert grid.first_voxel_centre == (-199.5, -199.5, -379.5)


def test_phantom_grid_uses_atoi_and_moqui_defaults() -> None:
    grid = phantom_grid(
        {
            "UsingPhantomGeo": "1",
            "PhantomDimX": "20",
            "PhantomUnitX": 1.9,
            "PhantomPositionX": -10.7,
        }
    )
    assert (grid.nx, grid.dx, grid.x0) == (20, 1.0, -10.0)
    assert (grid.ny, grid.nz, grid.dy, grid.y0) == (200, 200, 1.0, 1.0)


def test_phantom_grid_of_a_parsed_file_equals_the_static_one() -> None:
    parsed = parse_tps_input(render_tps_input(STATIC, COMPUTED))
    assert phantom_grid(parsed) == phantom_grid(STATIC)


def test_two_centimeter_mode_overrides_the_phantom() -> None:
    keys = {**STATIC, "twoCENTIMETERmode": "true"}
    keys.pop("TwoCentimeterMode")
    grid = phantom_grid(keys)
    assert grid == TWO_CM_SLAB
    assert grid.raw_bytes == 3_840_000
    assert grid.frame_offsets == (0.0, 2 / 3, 4 / 3)


def test_ct_mode_has_no_phantom_grid() -> None:
    with pytest.raises(ValueError, match="CT"):
        phantom_grid({**STATIC, "UsingPhantomGeo": False})


@pytest.mark.parametrize("bad", [{"PhantomDimX": 0}, {"PhantomUnitZ": "0.5"}])
def test_empty_grids_are_refused(bad: dict[str, TpsValue]) -> None:
    with pytest.raises(ValueError):
        phantom_grid({**STATIC, **bad})


def test_expected_raw_output() -> None:
    (out,) = expected_outputs(STATIC, "1G090")
    assert out.name == "1G090_1_Dose.raw"
    assert out.size_bytes == 8 * 400**3
    assert out.is_raw and not out.is_dicom


def test_expected_output_in_two_centimeter_mode_and_with_a_range_shifter() -> None:
    keys = {**STATIC, "TwoCentimeterMode": True}
    assert expected_outputs(keys, "B1")[0].name == "B1_2_Dose.raw"
    assert expected_outputs(keys, "B1")[0].size_bytes == 3_840_000
    assert expected_outputs(STATIC, "B1", beamline_geometries=1)[0].name == "B1_2_Dose.raw"
    assert expected_outputs({**STATIC, "UsingPhantomGeo": False}, "B1")[0].name == "B1_0_Dose.raw"
    assert expected_outputs({**STATIC, "UsingPhantomGeo": False}, "B1")[0].size_bytes is None


@pytest.mark.parametrize(
    ("fmt", "names"),
    [
        ("dcm", ["B_1_Dose.dcm"]),
        ("DCM", ["B_1_Dose.raw"]),  # compared case-sensitively: falls back to raw
        ("NPZ", ["B_1_Dose.npz"]),  # npz alone is case-insensitive
        ("mhd", ["B_1_Dose.mhd", "B_1_Dose.raw"]),
        ("mha", ["B_1_Dose.mha"]),
        ("whatever", ["B_1_Dose.raw"]),
    ],
)
def test_expected_output_formats(fmt: str, names: list[str]) -> None:
    assert [o.name for o in expected_outputs({**STATIC, "OutputFormat": fmt}, "B")] == names


def test_scorer_goes_into_the_name_as_typed_and_is_checked() -> None:
    assert expected_outputs({**STATIC, "Scorer": "letd"}, "B")[0].name == "B_1_letd.raw"
    assert expected_outputs({k: v for k, v in STATIC.items() if k != "Scorer"}, "B")[0].name == (
        "B_1_EnergyDeposition.raw"
    )
    with pytest.raises(ValueError, match="Unrecognized scorer name"):
        expected_outputs({**STATIC, "Scorer": "DoseToMedium"}, "B")


def test_unread_keys_are_reported() -> None:
    warnings = unread_keys({**STATIC, "VERBOSITY": 0, "ROIName": "External", "PhantomDimW": 3})
    assert warnings == [
        "VERBOSITY: MOQUI never reads this key",
        "ROIName: MOQUI never reads this key; use BodyContourName",
        "PhantomDimW: not a MOQUI input key; MOQUI ignores it",
    ]
    assert unread_keys(STATIC) == []
    assert unread_keys({"NormalizeTotalHistories": 500000000, "twocentimetermode": True}) == []


# --- what the public MOQUI fork does differently (issue 23) ---------------------------------


def test_two_centimeter_mode_accepts_the_three_and_the_one_slice_slab() -> None:
    keys = {**STATIC, "TwoCentimeterMode": True}
    assert phantom_grids(keys) == (TWO_CM_SLAB, TWO_CM_SLAB_ONE_SLICE)
    assert TWO_CM_SLAB_ONE_SLICE.raw_bytes == 1_280_000  # what the public fork wrote
    assert TWO_CM_SLAB_ONE_SLICE.first_voxel_centre == (-199.5, -199.5, 0.0)
    (out,) = expected_outputs(keys, "B1")
    assert out.size_ok(3_840_000) and out.size_ok(1_280_000)
    assert not out.size_ok(1_920_000)
    assert grid_for_size(keys, 1_280_000) == TWO_CM_SLAB_ONE_SLICE
    assert grid_for_size(keys, 3_840_000) == TWO_CM_SLAB
    assert grid_for_size(keys, 7) == TWO_CM_SLAB, "the default, so its size check fails"
    # outside the slab mode there is one grid and one size
    assert phantom_grids(STATIC) == (phantom_grid(STATIC),)
    (plain,) = expected_outputs(STATIC, "B1")
    assert plain.other_sizes == () and not plain.size_ok(1_280_000)


def test_check_outputs_takes_the_raw_when_no_dcm_appears() -> None:
    (want,) = expected_outputs({**STATIC, "OutputFormat": "dcm"}, "B")
    assert want.fallback is not None and want.fallback.name == "B_1_Dose.raw"
    size = phantom_grid(STATIC).raw_bytes
    dcm = check_outputs([want], {"B_1_Dose.dcm": 1234, "B_1_Dose.raw": size})
    assert dcm.ok and [o.name for o in dcm.found] == ["B_1_Dose.dcm"]
    raw = check_outputs([want], {"B_1_Dose.raw": size})
    assert raw.ok and [o.name for o in raw.found] == ["B_1_Dose.raw"]
    short = check_outputs([want], {"B_1_Dose.raw": size - 8})
    assert short.wrong_size == ("B_1_Dose.raw",) and not short.ok
    none = check_outputs([want], {"other.raw": size})
    assert none.missing == ("B_1_Dose.dcm",) and none.found == ()


def test_check_outputs_of_a_raw_run() -> None:
    expected = expected_outputs({**STATIC, "OutputFormat": "mhd"}, "B")
    size = phantom_grid(STATIC).raw_bytes
    assert check_outputs(expected, {"B_1_Dose.mhd": 300, "B_1_Dose.raw": size}).ok
    partial = check_outputs(expected, {"B_1_Dose.raw": 16})
    assert partial.missing == ("B_1_Dose.mhd",) and partial.wrong_size == ("B_1_Dose.raw",)


def test_compatibility_warnings() -> None:
    quiet = {**STATIC, "UseAbsolutePath": False, "ParticlesPerHistory": 1}
    assert compatibility_warnings(quiet) == []
    assert compatibility_warnings(Settings().moqui) == [], "the shipped defaults are quiet"
    loud = compatibility_warnings(
        {**quiet, "UseAbsolutePath": "1", "OutputFormat": "dcm", "ParticlesPerHistory": 0.001}
    )
    assert [w.split(":")[0] for w in loud] == [
        "UseAbsolutePath",
        "OutputFormat",
        "ParticlesPerHistory",
    ]
    assert "'Log Dir is not provided'" in loud[0]
    assert "writes .raw" in loud[1]
    assert "below 1000 gives 0" in loud[2]
    assert compatibility_warnings({**quiet, "OutputFormat": "DCM"}) == [], "DCM is just raw"
    (zero,) = compatibility_warnings({**quiet, "ParticlesPerHistory": 0})
    assert "every spot 0 or fewer histories" in zero
    assert compatibility_warnings({**quiet, "ParticlesPerHistory": -1}) == []
