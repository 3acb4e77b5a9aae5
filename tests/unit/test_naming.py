"""Plan values that become file names: the rule, the quoting, and hostile BeamNames at parse time."""

from __future__ import annotations

import io
import warnings

import pydicom
import pytest

from mqi_async.demo.cases import CaseSpec, build_ion_plan
from mqi_async.domain.errors import IngestError
from mqi_async.domain.naming import MAX_NAME_CHARS, file_name_problem, quote_value
from mqi_async.domain.plan import parse_rtplan

HOSTILE = [
    pytest.param("../../../../tmp/evil", id="dot-dot-slash"),
    pytest.param("a/b", id="slash"),
    pytest.param("/abs", id="absolute"),
    pytest.param("back\\slash", id="backslash"),
    pytest.param("bell\x07", id="control-bel"),
    pytest.param("esc\x1b[31mred", id="control-escape"),
    pytest.param("tab\tname", id="control-tab"),
    pytest.param("x" * 300, id="300-chars"),
    pytest.param("Strahl-ä", id="non-ascii"),
    pytest.param("光束1", id="cjk"),
    pytest.param("..", id="dot-dot"),
    pytest.param(".hidden", id="leading-dot"),
    pytest.param("a*b", id="wildcard"),
]


@pytest.mark.parametrize("name", ["1G090", "Beam 1", "RPO_2", "B-3 (boost)", "x" * MAX_NAME_CHARS])
def test_ordinary_beam_names_are_accepted(name: str) -> None:
    assert file_name_problem(name) is None


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_are_refused(name: str) -> None:
    assert file_name_problem(name) is not None


def test_quote_value_is_ascii_one_line_and_short() -> None:
    quoted = quote_value("\x1b[2J" + "y" * 500 + "\n")
    assert quoted.isascii() and "\n" not in quoted and "\x1b" not in quoted
    assert len(quoted) < 100 and "(505 characters)" in quoted
    assert quote_value("ok") == "'ok'"


def _plan_with_beam_name(name: str) -> bytes:
    ds = build_ion_plan(CaseSpec(beams=2), study_uid="1.2.826.0.1.3680043.8.498.1")
    if not name.isascii():
        ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8, so the name survives the round trip
    treatment = [b for b in ds.IonBeamSequence if b.BeamName != "SETUP"]
    treatment[1].BeamName = name
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_beam_name_fails_the_plan_with_a_named_code(name: str) -> None:
    with pytest.raises(IngestError) as caught, warnings.catch_warnings():
        # pydicom warns about an escape byte in a text value (then decodes it as it is)
        warnings.simplefilter("ignore", UserWarning)
        parse_rtplan(_plan_with_beam_name(name), source="RP.test.dcm")
    err = caught.value
    assert err.code == "invalid_beam_name"
    text = str(err)
    assert text.isascii() and all(ch.isprintable() for ch in text)
    assert "BeamName" in text and "beam 3" in text


def test_a_good_beam_name_still_parses() -> None:
    plan = parse_rtplan(_plan_with_beam_name("Boost 2"), source="RP.test.dcm")
    assert [b.beam_name for b in plan.beams][1] == "Boost 2"
