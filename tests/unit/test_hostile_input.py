"""Hostile and broken input: parsers and names raise only their named errors."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mqi_async.config import load_settings
from mqi_async.domain.errors import ConfigError
from mqi_async.ingest.layout import classify_event_path, safe_name

_KEYS = st.sampled_from(
    ["scan_directory", "database", "hosts", "gpu", "runs", "moqui", "retry", "ui", "logging",
     "ingest", "tools", "kind", "name", "port", "poll_seconds", "allocation", "address", "x"]
)  # fmt: skip
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True),
    st.text(max_size=20),
)
_YAMLISH = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_KEYS, inner, max_size=4)),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=st.dictionaries(_KEYS, _YAMLISH, max_size=5))
def test_any_config_document_loads_or_names_its_problems(doc: dict[str, object]) -> None:
    import yaml

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.yaml"
        path.write_text(yaml.safe_dump(doc))
        try:
            load_settings(path)
        except ConfigError as exc:
            assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=300))
def test_any_config_text_loads_or_names_its_problems(text: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            load_settings(path)
        except ConfigError as exc:
            assert exc.problems


_NAMES = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="/\x00"),
    min_size=1,
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(_NAMES, min_size=1, max_size=5))
def test_event_paths_with_any_names_classify(parts: list[str]) -> None:
    scan = "/data/incoming"
    event = classify_event_path(scan, "/".join([scan, *parts]))
    for candidate in event.case_dir_candidates:
        assert candidate.startswith(scan)


@settings(max_examples=300, deadline=None)
@given(a=_NAMES, b=_NAMES)
def test_safe_names_are_safe_and_distinct(a: str, b: str) -> None:
    sa, sb = safe_name(a), safe_name(b)
    for s in (sa, sb):
        assert (
            s
            and len(s) <= 100
            and s[0] not in "-."
            and all(c.isascii() and (c.isalnum() or c in "._-") for c in s)
        )
    assert (a == b) == (sa == sb)
