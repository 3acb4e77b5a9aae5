"""Who may act in the web view: scrypt hashes of tokens and passwords, signed session cookies
and the CSRF token of a session's forms."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: scrypt's cost as 2**LOG2_N, with r and p: about 50 ms and 16 MiB per check (interactive login)
LOG2_N = 14
R = 8
P = 1
_SALT_BYTES = 16
_KEY_BYTES = 32
_MAXMEM = 64 * 1024 * 1024
#: the name of the session cookie
COOKIE = "mqi_session"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_hash(secret: str, *, log2_n: int = LOG2_N, r: int = R, p: int = P) -> str:
    """`scrypt$<log2 n>$<r>$<p>$<salt>$<hash>` of a token or password, for config.yaml."""
    if not secret:
        raise ValueError("an empty token or password cannot be hashed")
    salt = secrets.token_bytes(_SALT_BYTES)
    key = hashlib.scrypt(
        secret.encode(), salt=salt, n=2**log2_n, r=r, p=p, maxmem=_MAXMEM, dklen=_KEY_BYTES
    )
    return f"scrypt${log2_n}${r}${p}${_b64(salt)}${_b64(key)}"


def verify_hash(secret: str, stored: str) -> bool:
    """True when `secret` hashes to `stored` (constant time; False for a malformed hash)."""
    try:
        scheme, log2_n, r, p, salt, key = stored.split("$")
        if scheme != "scrypt" or not 1 <= int(log2_n) <= 20:
            return False
        expected = _unb64(key)
        got = hashlib.scrypt(
            secret.encode(),
            salt=_unb64(salt),
            n=2 ** int(log2_n),
            r=int(r),
            p=int(p),
            maxmem=_MAXMEM,
            dklen=len(expected),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


@dataclass(frozen=True, slots=True)
class Credential:
    """One configured token or user: the name that acts, and the hash it is checked against."""

    name: str
    hash: str
    is_token: bool


class Authenticator:
    """Checks tokens and passwords against the configured hashes, off the event loop.

    A token once verified is remembered by a keyed digest (never the token itself), so an API
    client pays the scrypt cost once, not per request. At most two checks run at a time.
    """

    def __init__(self, credentials: Sequence[Credential], *, key: bytes) -> None:
        self._credentials = tuple(credentials)
        self._key = key
        self._known: dict[bytes, str] = {}
        self._gate = asyncio.Semaphore(2)

    @property
    def is_enabled(self) -> bool:
        """False when no token or user is configured: the view is read-only."""
        return bool(self._credentials)

    def names(self) -> frozenset[str]:
        return frozenset(c.name for c in self._credentials)

    async def token(self, token: str) -> str | None:
        """The name of the configured token `token` is, or None."""
        if not token or len(token) > 512:
            return None
        digest = hmac.new(self._key, b"token\0" + token.encode(), hashlib.sha256).digest()
        if digest in self._known:
            return self._known[digest]
        candidates = [c for c in self._credentials if c.is_token]
        name = await self._check(token, candidates)
        if name is not None:
            if len(self._known) > 1000:
                self._known.clear()
            self._known[digest] = name
        return name

    async def password(self, user: str, password: str) -> str | None:
        """The user's name when the password is theirs, or None."""
        if not password or len(password) > 512:
            return None
        candidates = [c for c in self._credentials if not c.is_token and c.name == user]
        return await self._check(password, candidates)

    async def _check(self, secret: str, candidates: Sequence[Credential]) -> str | None:
        async with self._gate:
            return await asyncio.to_thread(_first_match, secret, candidates)


def _first_match(secret: str, candidates: Sequence[Credential]) -> str | None:
    for c in candidates:
        if verify_hash(secret, c.hash):
            return c.name
    return None


@dataclass(frozen=True, slots=True)
class Session:
    """A logged-in browser: who, until when, and the id its CSRF token is made from."""

    name: str
    expires_at: float
    session_id: str


class SessionSigner:
    """Session cookies as `<payload>.<HMAC-SHA256>`; the key never leaves the service."""

    def __init__(self, key: bytes, *, lifetime_s: float) -> None:
        self._key = key
        self._lifetime_s = lifetime_s

    @property
    def lifetime_s(self) -> float:
        return self._lifetime_s

    def issue(self, name: str, *, now: float | None = None) -> tuple[str, Session]:
        session = Session(
            name=name,
            expires_at=(time.time() if now is None else now) + self._lifetime_s,
            session_id=secrets.token_urlsafe(18),
        )
        payload = _b64(
            json.dumps(
                {"n": session.name, "e": int(session.expires_at), "s": session.session_id},
                separators=(",", ":"),
            ).encode()
        )
        return f"{payload}.{self._sign(payload)}", session

    def read(self, cookie: str | None, *, now: float | None = None) -> Session | None:
        """The session of a cookie whose signature holds and which has not expired."""
        if not cookie or len(cookie) > 1024 or cookie.count(".") != 1:
            return None
        payload, signature = cookie.split(".")
        if not hmac.compare_digest(signature, self._sign(payload)):
            return None
        try:
            data = json.loads(_unb64(payload))
            session = Session(
                name=str(data["n"]), expires_at=float(data["e"]), session_id=data["s"]
            )
        except (ValueError, KeyError, TypeError):
            return None
        if session.expires_at < (time.time() if now is None else now):
            return None
        return session

    def csrf_token(self, session: Session) -> str:
        """The token every form of this session carries (the synchronizer-token pattern)."""
        return self._sign("csrf\0" + session.session_id)

    def check_csrf(self, session: Session, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(str(token), self.csrf_token(session))

    def _sign(self, text: str) -> str:
        return _b64(hmac.new(self._key, text.encode(), hashlib.sha256).digest())


def derive_key(secret: bytes, purpose: str) -> bytes:
    """A key of its own for one purpose, from the service's secret (`<database>.key`)."""
    return hmac.new(secret, f"mqi-async web {purpose} v1".encode(), hashlib.sha256).digest()
