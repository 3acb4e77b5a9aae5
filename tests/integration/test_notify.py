"""Notifications against real receivers on loopback: an SMTP server with STARTTLS and login
(aiosmtpd) and an HTTP receiver (aiohttp.web); a receiver that is dead or never answers.

Delivered, no patient name or id in any message, the rate limit holds, and neither a dead
receiver nor a flood of notices holds up the notifier's callers or the service's engine.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import ipaddress
import json
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import SecretStr

from mqi_async.config import (
    DeliveryCheckSettings,
    EmailSettings,
    NotifyRateLimitSettings,
    NotifySettings,
    QaSettings,
    Settings,
    WebhookSettings,
)
from mqi_async.demo.cases import Breakage, CaseSpec, DeliveryError, DeliveryErrorKind, write_case
from mqi_async.demo.runner import DemoOptions, demo_settings
from mqi_async.domain.errors import DatabaseError
from mqi_async.domain.model import CaseStatus
from mqi_async.domain.notices import Naming, Notice, NoticeCode
from mqi_async.domain.privacy import case_key
from mqi_async.notify import Notifier, RunningMarker
from mqi_async.notify.email import EmailChannel
from mqi_async.notify.notifier import Channel
from mqi_async.notify.webhook import WebhookChannel
from mqi_async.service import open_service, run_until_stopped
from mqi_async.store import CaseSnapshot
from mqi_async.store.hosts import HostRow
from mqi_async.store.secret import load_or_create_secret
from mqi_async.store.snapshot import DashboardCounts
from tests.e2e import running_service, wait_until

pytestmark = pytest.mark.slow

SMTP_USER, SMTP_PASSWORD = "mqi", "s3cret-pass"
#: the webhook's path holds a token, as Slack's and Teams' do
HOOK_PATH = "/hooks/T0KEN-abc"


# --- receivers ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Cert:
    cert: Path
    key: Path


@pytest.fixture
def tls_cert(tmp_path: Path) -> Cert:
    """A self-signed certificate for 127.0.0.1 and localhost, its own CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mqi test smtp")])
    now = datetime.now(UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    out = Cert(cert=tmp_path / "smtp.crt", key=tmp_path / "smtp.key")
    out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return out


@dataclass
class Mailbox:
    """What the SMTP server accepted, and who logged in."""

    port: int
    mails: list[EmailMessage] = field(default_factory=list)
    logins: list[str] = field(default_factory=list)
    tls_on_data: list[bool] = field(default_factory=list)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.content
        raw = content if isinstance(content, bytes) else str(content).encode()
        mail = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(mail, EmailMessage)
        self.tls_on_data.append(session.ssl is not None)
        self.mails.append(mail)
        return "250 OK"

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login == SMTP_USER.encode()
            and auth_data.password == SMTP_PASSWORD.encode()
        )
        if ok:
            self.logins.append(SMTP_USER)
        return AuthResult(success=ok)

    def texts(self) -> list[str]:
        out = []
        for mail in self.mails:
            body = mail.get_body(("plain",))
            assert body is not None
            out.append(f"{mail['Subject']}\n{body.get_content()}")
        return out


@pytest.fixture
def smtp_server(tls_cert: Cert) -> Iterator[Mailbox]:
    """A real SMTP server on loopback that demands STARTTLS before anything, and a login."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls_cert.cert, tls_cert.key)
    box = Mailbox(port=free_port())
    controller = Controller(
        box,
        hostname="127.0.0.1",
        port=box.port,
        tls_context=context,
        require_starttls=True,
        authenticator=box.authenticate,
        auth_required=True,
    )
    controller.start()
    try:
        yield box
    finally:
        controller.stop()


@dataclass
class Hook:
    url: str
    bodies: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
async def webhook() -> AsyncIterator[Hook]:
    """A real HTTP receiver on 127.0.0.1 (random port) that records every JSON body."""
    hook = Hook(url="")

    async def receive(request: web.Request) -> web.Response:
        hook.bodies.append(await request.json())
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post(HOOK_PATH, receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    hook.url = f"http://127.0.0.1:{port}{HOOK_PATH}"
    try:
        yield hook
    finally:
        await runner.cleanup()


@dataclass
class Hanging:
    """A receiver that accepts connections and never answers."""

    url: str
    connections: int = 0


@pytest.fixture
async def hanging_receiver() -> AsyncIterator[Hanging]:
    release = asyncio.Event()
    hanging = Hanging(url="")

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hanging.connections += 1
        await release.wait()
        writer.close()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    hanging.url = f"http://127.0.0.1:{port}{HOOK_PATH}"
    try:
        yield hanging
    finally:
        release.set()
        server.close()
        await server.wait_closed()
        for _ in range(3):
            await asyncio.sleep(0)


# --- a notifier on a scripted store -------------------------------------------------------


class ScriptedStore:
    """The store's read path, answering a script of reads; the last read repeats."""

    def __init__(self, reads: list[tuple[list[CaseSnapshot], list[HostRow]]]) -> None:
        self._reads = reads
        self.count = 0

    async def dashboard(
        self, *, recent: int = 200, text: str = ""
    ) -> tuple[list[CaseSnapshot], DashboardCounts]:
        cases, _ = self._reads[min(self.count, len(self._reads) - 1)]
        return cases, DashboardCounts(cases_by_status={}, beams_by_status={})

    async def list_hosts(self) -> list[HostRow]:
        _, hosts = self._reads[min(self.count, len(self._reads) - 1)]
        self.count += 1
        return hosts


T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
SECRET = bytes(range(32))


def failed_case(case_id: str) -> CaseSnapshot:
    return CaseSnapshot(
        case_id=case_id,
        room="G1",
        status=CaseStatus.FAILED,
        progress=0,
        error=f"patient_id_mismatch: delivery 2026_03_01 of {case_id}",
        case_path=f"/scan/G1/{case_id}",
        beams=(),
        priority=0,
        created_at=T0,
        updated_at=T0,
    )


def host(state: str, error: str | None = None) -> HostRow:
    return HostRow(name="gpu1", state=state, error=error, updated_at=T0)


def notify_settings(**changes: Any) -> NotifySettings:
    base: dict[str, Any] = {
        "enabled": True,
        "poll_seconds": 0.05,
        "host_paused_minutes": 0,
        "retries": 1,
        "retry_backoff_seconds": 0.05,
        "webhook": WebhookSettings(url=SecretStr("http://127.0.0.1:9/none"), timeout_seconds=5),
    }
    return NotifySettings(**(base | changes))


def email_settings(port: int, cert: Cert, **changes: Any) -> EmailSettings:
    base: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "username": SMTP_USER,
        "password": SecretStr(SMTP_PASSWORD),
        "sender": "mqi@clinic.example",
        "recipients": ["it@clinic.example", "physics@clinic.example"],
        "timeout_seconds": 10,
        "ca_file": cert.cert,
    }
    return EmailSettings(**(base | changes))


def channels_for(settings: NotifySettings) -> list[Channel]:
    out: list[Channel] = []
    if settings.webhook is not None:
        out.append(WebhookChannel(settings.webhook))
    if settings.email is not None:
        out.append(EmailChannel(settings.email))
    return out


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_notices_reach_real_smtp_and_http_receivers_without_patient_ids(
    smtp_server: Mailbox, webhook: Hook, tls_cert: Cert
) -> None:
    settings = notify_settings(
        webhook=WebhookSettings(url=SecretStr(webhook.url), timeout_seconds=5),
        email=email_settings(smtp_server.port, tls_cert),
    )
    # baseline: OLD failed before the start; then NEW fails and gpu1 pauses
    store = ScriptedStore(
        [
            ([failed_case("OLD00001")], [host("connected")]),
            (
                [failed_case("OLD00001"), failed_case("NEW00002")],
                [host("paused", "host_unreachable: host gpu1: 10.0.0.5 refused")],
            ),
        ]
    )
    notifier = Notifier(
        store=store,
        channels=channels_for(settings),
        settings=settings,
        naming=Naming(secret=SECRET),
        service_name="mqi-test",
    )
    task = asyncio.create_task(notifier.run())
    try:
        await wait_until(
            lambda: len(webhook.bodies) >= 2 and len(smtp_server.mails) >= 2,
            timeout_s=60,
            what="both notices on both channels",
        )
    finally:
        await stop(task)
        await notifier.aclose()

    assert sorted(b["code"] for b in webhook.bodies) == ["case_failed", "host_paused_long"]
    [failed] = [b for b in webhook.bodies if b["code"] == "case_failed"]
    assert failed["case_key"] == case_key(SECRET, "NEW00002") and "case_id" not in failed
    assert failed["reason"] == "patient_id_mismatch"
    [paused] = [b for b in webhook.bodies if b["code"] == "host_paused_long"]
    assert paused["host"] == "gpu1" and paused["reason"] == "host_unreachable"
    # the mail went over STARTTLS, after a login, to every recipient
    assert smtp_server.logins and all(smtp_server.tls_on_data)
    assert smtp_server.mails[0]["To"] == "it@clinic.example, physics@clinic.example"
    texts = smtp_server.texts()
    assert any(case_key(SECRET, "NEW00002") in t for t in texts)
    # the old failure was not sent again; no id, path or folder anywhere
    everything = json.dumps(webhook.bodies) + "\n".join(texts)
    for secret_text in ("OLD00001", "NEW00002", "/scan", "2026_03_01", "10.0.0.5"):
        assert secret_text not in everything
    assert case_key(SECRET, "OLD00001") not in everything
    assert notifier.stats()["webhook"].sent == 2 and notifier.stats()["email"].sent == 2


async def test_the_rate_limit_holds_on_each_channel(
    smtp_server: Mailbox, webhook: Hook, tls_cert: Cert
) -> None:
    settings = notify_settings(
        webhook=WebhookSettings(url=SecretStr(webhook.url), timeout_seconds=5),
        email=email_settings(smtp_server.port, tls_cert),
        rate_limit=NotifyRateLimitSettings(max_messages=3, per_minutes=1),
    )
    clock = FakeClock()
    notifier = Notifier(
        store=ScriptedStore([([], [])]),
        channels=channels_for(settings),
        settings=settings,
        naming=Naming(secret=SECRET),
        service_name="mqi-test",
        monotonic=clock,
    )
    task = asyncio.create_task(notifier.run())
    try:
        for i in range(10):
            notifier.publish(
                Notice(code=NoticeCode.CASE_FAILED, at=T0, case_id=f"P{i:07d}", reason="run_lost")
            )

        def settled() -> bool:
            return all(
                s.queued == 0 and s.sent == 3 and s.folded == 7 for s in notifier.stats().values()
            )

        await wait_until(settled, timeout_s=60, what="3 sent and 7 folded per channel")
        # the window is still full on the (stopped) clock: nothing more goes out
        await asyncio.sleep(0.3)
        assert len(webhook.bodies) == 3 and len(smtp_server.mails) == 3
        # a minute later, the next notice finds the digest of the 7 going first
        clock.t += 60
        notifier.publish(Notice(code=NoticeCode.SERVICE_UNEXPECTED_STOP, at=T0))
        await wait_until(
            lambda: len(webhook.bodies) == 5 and len(smtp_server.mails) == 5,
            timeout_s=60,
            what="the digest and the new notice",
        )
    finally:
        await stop(task)
        await notifier.aclose()
    assert [b["code"] for b in webhook.bodies] == ["case_failed"] * 3 + [
        "notices_folded",
        "service_unexpected_stop",
    ]
    digest = webhook.bodies[3]
    assert digest["count"] == 7 and "and 7 more" in digest["text"]
    assert "and 7 more" in smtp_server.mails[3]["Subject"]
    assert all(f"P{i:07d}" not in json.dumps(webhook.bodies) for i in range(10))


async def test_dead_receivers_never_hold_up_the_caller(
    hanging_receiver: Hanging, tls_cert: Cert
) -> None:
    """A closed SMTP port and an HTTP receiver that never answers: `publish` returns at once
    and the queue stays bounded; only the delivery tasks wait, each try under its timeout."""
    settings = notify_settings(
        webhook=WebhookSettings(url=SecretStr(hanging_receiver.url), timeout_seconds=30),
        email=email_settings(free_port(), tls_cert),
        queue_size=20,
        retries=5,
        retry_backoff_seconds=0.05,
    )
    notifier = Notifier(
        store=ScriptedStore([([], [])]),
        channels=channels_for(settings),
        settings=settings,
        naming=Naming(secret=SECRET),
        service_name="mqi-test",
    )
    task = asyncio.create_task(notifier.run())
    try:
        notifier.publish(Notice(code=NoticeCode.SERVICE_UNEXPECTED_STOP, at=T0))
        await wait_until(
            lambda: hanging_receiver.connections >= 1, what="the webhook stuck in a request"
        )
        # publish is synchronous: a flood cannot wait on a receiver; the queue stays bounded
        for i in range(1000):
            notifier.publish(Notice(code=NoticeCode.CASE_FAILED, at=T0, case_id=f"c{i}"))
        stats = notifier.stats()
        assert stats["webhook"].queued <= 20 and stats["email"].queued <= 20
        assert stats["webhook"].dropped >= 1000 - 20
        assert stats["webhook"].sent == 0
        # the event loop is free: other work runs while the webhook hangs
        ticks = 0
        for _ in range(20):
            await asyncio.sleep(0)
            ticks += 1
        assert ticks == 20 and not task.done()
        await wait_until(lambda: notifier.stats()["email"].failed >= 1, what="the mail given up on")
    finally:
        await stop(task)
        await notifier.aclose()
    # what could not go is not lost: queued or folded for a digest
    assert notifier.has_pending()


# --- the whole service ----------------------------------------------------------------------


def service_settings(root: Path, notify: NotifySettings) -> Settings:
    options = DemoOptions(
        workdir=root, cases=0, beams=1, gpus=2, headless=True, exit_when_done=False,
        run_seconds=1.0,
    )  # fmt: skip
    settings = demo_settings(root, options)
    qa = QaSettings(reference="none", delivery=DeliveryCheckSettings(enabled=False), report=False)
    return settings.model_copy(update={"notify": notify, "qa": qa})


def drop_case(settings: Settings, case_id: str, breakage: Breakage = Breakage.NONE) -> None:
    first = (datetime.now() - timedelta(hours=2)).replace(microsecond=0)
    spec = CaseSpec(
        case_id=case_id,
        beams=1,
        layers_per_beam=1,
        samples_per_layer=8,
        first_delivery_at=first,
        breakage=breakage,
    )
    write_case(settings.scan_directory, spec, marker_last=True)


async def status_of(settings_or_service: Any, case_id: str) -> CaseStatus | None:
    return (await settings_or_service.store.case_statuses()).get(case_id)


async def test_the_service_tells_a_failed_case_once_and_an_unexpected_stop(
    tmp_path: Path, smtp_server: Mailbox, webhook: Hook, tls_cert: Cert
) -> None:
    notify = notify_settings(
        poll_seconds=0.2,
        webhook=WebhookSettings(url=SecretStr(webhook.url), timeout_seconds=5),
        email=email_settings(smtp_server.port, tls_cert),
    )
    settings = service_settings(tmp_path / "svc", notify)
    marker = RunningMarker(settings.database)

    # first run: a case fails, and is told
    async with running_service(settings) as service:
        assert marker.was_left() and service.notifier is not None
        await asyncio.wait_for(service.notifier.watching.wait(), 30)
        drop_case(settings, "PAT00001", Breakage.PATIENT_ID_MISMATCH)
        await wait_until(
            lambda: len(webhook.bodies) == 1 and len(smtp_server.mails) == 1,
            what="the first failure told",
        )
    assert not marker.was_left()  # a clean stop removes it
    secret = load_or_create_secret(settings.database)
    assert webhook.bodies[0]["code"] == "case_failed"
    assert webhook.bodies[0]["case_key"] == case_key(secret, "PAT00001")
    assert webhook.bodies[0]["reason"] == "patient_id_mismatch"

    # as if killed: the marker stays; the second run says so, and does not repeat PAT00001
    marker.write()
    async with running_service(settings) as service:
        assert service.notifier is not None
        await asyncio.wait_for(service.notifier.watching.wait(), 30)
        drop_case(settings, "PAT00002", Breakage.MISSING_RTPLAN)
        drop_case(settings, "PAT00003")
        await wait_until(
            lambda: len(webhook.bodies) >= 3 and len(smtp_server.mails) >= 3,
            timeout_s=60,
            what="the unexpected stop and the second failure",
        )
        await wait_until(
            lambda: _is(service, "PAT00003", CaseStatus.COMPLETED), timeout_s=120, what="done"
        )
    codes = [(b["code"], b.get("case_key")) for b in webhook.bodies]
    assert sorted(codes, key=str) == sorted(
        [
            ("case_failed", case_key(secret, "PAT00001")),
            ("service_unexpected_stop", None),
            ("case_failed", case_key(secret, "PAT00002")),
        ],
        key=str,
    )
    # the patients' names (Synthetic^<id> in the RTPLAN) and ids are in no message
    everything = json.dumps(webhook.bodies) + "\n".join(smtp_server.texts())
    for text in ("Synthetic", "PAT00001", "PAT00002", "PAT00003", str(settings.scan_directory)):
        assert text not in everything


async def _is(service: Any, case_id: str, *wanted: CaseStatus) -> bool:
    return await status_of(service, case_id) in wanted


async def test_a_hanging_receiver_does_not_slow_the_pipeline(
    tmp_path: Path, hanging_receiver: Hanging, tls_cert: Cert
) -> None:
    notify = notify_settings(
        poll_seconds=0.2,
        # longer than the whole test: the delivery task is stuck in one request throughout
        webhook=WebhookSettings(url=SecretStr(hanging_receiver.url), timeout_seconds=300),
        email=email_settings(free_port(), tls_cert),
        retries=10,
        retry_backoff_seconds=1,
    )
    settings = service_settings(tmp_path / "svc", notify)
    async with running_service(settings) as service:
        assert service.notifier is not None
        await asyncio.wait_for(service.notifier.watching.wait(), 30)
        drop_case(settings, "FAIL0001", Breakage.MISSING_RTPLAN)
        await wait_until(
            lambda: hanging_receiver.connections >= 1, what="the webhook stuck on the failure"
        )
        drop_case(settings, "OK000001")
        await wait_until(
            lambda: _is(service, "OK000001", CaseStatus.COMPLETED),
            timeout_s=120,
            what="the next case completed while the receiver hangs",
        )
        stats = service.notifier.stats()
        assert stats["webhook"].sent == 0 and not service.stopping.is_set()
    # the stop went on (its last try bounded by NOTIFY_FLUSH_S) and was a clean one
    assert not RunningMarker(settings.database).was_left()


def test_notify_is_off_by_default_and_needs_a_channel() -> None:
    assert NotifySettings().enabled is False
    with pytest.raises(ValueError, match="webhook or an email"):
        NotifySettings(enabled=True)


def test_marker_lives_next_to_the_database(tmp_path: Path) -> None:
    marker = RunningMarker(tmp_path / "mqi.db")
    assert marker.path == tmp_path / "mqi.db.running" and not marker.was_left()
    marker.write()
    assert marker.was_left() and marker.path.stat().st_mode & 0o077 == 0
    marker.remove()
    marker.remove()
    assert not marker.was_left()


async def test_the_service_tells_a_failed_delivery_check(tmp_path: Path, webhook: Hook) -> None:
    notify = notify_settings(
        poll_seconds=0.2, webhook=WebhookSettings(url=SecretStr(webhook.url), timeout_seconds=5)
    )
    settings = service_settings(tmp_path / "svc", notify).model_copy(
        update={"qa": QaSettings(reference="none", report=False)}  # delivery checks, no dose check
    )
    spec = CaseSpec(
        case_id="PAT00009",
        beams=1,
        layers_per_beam=3,
        first_delivery_at=(datetime.now() - timedelta(hours=2)).replace(microsecond=0),
        delivery_errors=(
            DeliveryError(kind=DeliveryErrorKind.MISSING_LAYER, layer=2, fraction=1, beam=1),
        ),
    )
    async with running_service(settings) as service:
        assert service.notifier is not None
        await asyncio.wait_for(service.notifier.watching.wait(), 30)
        write_case(settings.scan_directory, spec, marker_last=True)
        await wait_until(
            lambda: any(
                b["code"] == "check_failed" and b.get("verdict") == "failed" for b in webhook.bodies
            ),
            timeout_s=120,
            what="the failed check told",
        )
    secret = load_or_create_secret(settings.database)
    checks = [b for b in webhook.bodies if b["code"].startswith("check_")]
    assert {b["case_key"] for b in checks} == {case_key(secret, "PAT00009")}
    # first the delivery's own verdict (the beam is BeamNumber 2: the plan has a setup beam)
    assert checks[0]["parts"] == ["delivery 1 (fraction 1, beam 2): failed"]
    assert checks[-1]["verdict"] == "failed"
    everything = json.dumps(webhook.bodies)
    assert "PAT00009" not in everything and "Synthetic" not in everything


async def test_a_fatal_error_is_told_before_the_service_goes_down(
    tmp_path: Path, webhook: Hook, monkeypatch: pytest.MonkeyPatch
) -> None:
    notify = notify_settings(
        poll_seconds=0.2, webhook=WebhookSettings(url=SecretStr(webhook.url), timeout_seconds=5)
    )
    settings = service_settings(tmp_path / "svc", notify)
    async with open_service(settings) as service:

        async def engine_dies() -> None:
            raise DatabaseError("database_damaged", f"{settings.database}: PAT00001 row")

        monkeypatch.setattr(service.engine, "run", engine_dies)
        with pytest.raises(ExceptionGroup) as raised:
            await run_until_stopped(service, None)
    assert raised.group_contains(DatabaseError)
    [told] = webhook.bodies
    assert (told["code"], told["reason"]) == ("service_fatal_error", "database_damaged")
    assert "PAT00001" not in json.dumps(told) and str(settings.database) not in json.dumps(told)
    # it was told, so the next start need not tell an unexpected stop
    assert not RunningMarker(settings.database).was_left()
