"""Opaque case keys for shared places (remote folders, command lines, job names) and ID redaction."""

from __future__ import annotations

import hashlib
import hmac
import re

#: bytes of the per-database secret that keys the case hash
SECRET_BYTES = 32
#: hex digits of the keyed hash in a case key (80 bits: no collisions among a clinic's cases)
KEY_HEX_DIGITS = 20
_KEY = re.compile(f"c[0-9a-f]{{{KEY_HEX_DIGITS}}}")


def case_key(secret: bytes, case_id: str) -> str:
    """The name a case has on every host: `c` + a keyed hash of its id, never the id itself.

    Only the holder of `secret` (kept beside the local database) can tell which case it is;
    the same id always gives the same key, so a restart finds its remote folders again.
    """
    if len(secret) < 16:
        raise ValueError("the case key secret must hold at least 16 bytes")
    digest = hmac.new(secret, case_id.encode("utf-8", "surrogateescape"), hashlib.sha256)
    return "c" + digest.hexdigest()[:KEY_HEX_DIGITS]


def is_case_key(name: str) -> bool:
    """Whether a remote folder name has the form `case_key` gives."""
    return _KEY.fullmatch(name) is not None


def redact(text: str, secret: bytes, identifiers: tuple[str, ...]) -> str:
    """`text` with every non-empty identifier replaced by its case key (longest first)."""
    for ident in sorted({i for i in identifiers if i}, key=len, reverse=True):
        if ident in text:
            text = text.replace(ident, case_key(secret, ident))
    return text
