"""The e-mail channel: SMTP with STARTTLS (verified certificate), with aiosmtplib."""

from __future__ import annotations

import socket
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

import aiosmtplib

from mqi_async.config import EmailSettings
from mqi_async.domain.errors import PermanentError, TransientError
from mqi_async.domain.notices import Message


class EmailChannel:
    """One plain-text mail per message to every recipient."""

    name = "email"

    def __init__(self, settings: EmailSettings) -> None:
        self._s = settings
        self.timeout_s = settings.timeout_seconds
        self._tls: ssl.SSLContext | None = None
        if settings.starttls:
            cafile = str(settings.ca_file) if settings.ca_file is not None else None
            self._tls = ssl.create_default_context(cafile=cafile)
            if cafile is not None:
                self._tls.load_default_certs()
        # the EHLO name: aiosmtplib's default looks up the FQDN, a DNS query that can hang
        self._local_hostname = socket.gethostname() or "localhost"
        self._domain = settings.sender.rsplit("@", 1)[-1]

    def _mail(self, message: Message) -> EmailMessage:
        mail = EmailMessage()
        mail["Subject"] = message.subject
        mail["From"] = self._s.sender
        mail["To"] = ", ".join(self._s.recipients)
        mail["Date"] = formatdate(localtime=True)
        mail["Message-ID"] = make_msgid(domain=self._domain)
        mail.set_content(message.text)
        return mail

    async def send(self, message: Message) -> None:
        """Raises:
        TransientError: `notify_delivery_failed` when the server cannot be reached, times
            out or answers 4xx.
        PermanentError: `notify_delivery_failed` on a 5xx answer (login refused,
            recipients refused, no STARTTLS).
        """
        s = self._s
        try:
            await aiosmtplib.send(
                self._mail(message),
                hostname=s.host,
                port=s.port,
                username=s.username,
                password=s.password.get_secret_value() if s.password is not None else None,
                start_tls=s.starttls,
                tls_context=self._tls,
                local_hostname=self._local_hostname,
                timeout=self.timeout_s,
            )
        except aiosmtplib.SMTPResponseException as exc:
            detail = f"SMTP {s.host}:{s.port} answered {exc.code} {exc.message}"
            if exc.code >= 500:
                raise PermanentError("notify_delivery_failed", detail) from None
            raise TransientError("notify_delivery_failed", detail) from None
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = sorted({r.code for r in exc.recipients})
            detail = f"SMTP {s.host}:{s.port} refused every recipient ({codes})"
            if all(code >= 500 for code in codes):
                raise PermanentError("notify_delivery_failed", detail) from None
            raise TransientError("notify_delivery_failed", detail) from None
        except aiosmtplib.SMTPNotSupported as exc:
            raise PermanentError(
                "notify_delivery_failed", f"SMTP {s.host}:{s.port}: {exc}"
            ) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise TransientError(
                "notify_delivery_failed", f"SMTP {s.host}:{s.port}: {type(exc).__name__}: {exc}"
            ) from None

    async def aclose(self) -> None:
        """Nothing held: each message is one SMTP session."""
