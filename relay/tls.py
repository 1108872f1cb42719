"""TLS: the relay's certificate (reloaded without a restart) and the trust its clients use.

Server side
-----------
:class:`ServerTLS` holds an ``ssl.SSLContext`` built from ``[tls] cert_file``
and ``key_file``. Each accepted connection (WebSocket and HTTP ports alike)
wraps its TCP stream in a ``trio.SSLStream`` with the context current at its
accept, so :meth:`ServerTLS.reload` (on SIGHUP, or when :meth:`ServerTLS.watch`
sees either file change) gives new connections the new certificate while the
connections already open keep the one they shook hands with. A reload that
fails (a half-written file, a key that does not match) keeps the old context,
is logged and counted, and is tried again at the next change: rotating the two
files one after the other works whichever lands first.

Client side
-----------
:func:`client_context` is what every client of a relay verifies it with
(mesh links, health probes, the SDK and CLI, HTTP reads of ``/regionmap``):
the system's trust store (OpenSSL's default paths, so ``SSL_CERT_FILE`` and
``SSL_CERT_DIR`` apply) or, given ``ca_file``, that bundle instead.
"""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import trio

__all__ = ["ServerTLS", "TLSError", "TLSStats", "client_context", "describe_tls_error"]

log = logging.getLogger(__name__)


class TLSError(Exception):
    """A certificate, key or CA file that cannot be used; the message names the file."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSStats:
    #: Successful reloads since start (the first load not counted).
    reloads: int
    #: Reloads that failed and kept the previous certificate.
    reload_failures: int
    #: False while the latest reload has failed (until a later one succeeds).
    last_reload_ok: bool
    #: The serial number of the certificate new connections get (hex).
    serial: str
    #: Its notAfter, seconds since the epoch.
    not_after: float


def client_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """A context that verifies relays: ``ca_file``'s CAs, or the system's if None."""
    try:
        return ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    except FileNotFoundError:
        raise TLSError(f"{ca_file}: cannot read CA file: no such file") from None
    except OSError as exc:
        raise TLSError(f"{ca_file}: cannot use as a CA file: {_ssl_reason(exc)}") from None


def describe_tls_error(exc: BaseException) -> str | None:
    """One line for a TLS failure somewhere in ``exc``'s causes and groups, or None."""
    seen: list[BaseException] = [exc]
    for err in seen:
        if isinstance(err, ssl.SSLCertVerificationError):
            return f"TLS certificate verify failed: {err.verify_message}"
        if isinstance(err, ssl.SSLError):
            return f"TLS failed: {_ssl_reason(err)}"
        if isinstance(err, BaseExceptionGroup):
            seen.extend(err.exceptions)
        for nxt in (err.__cause__, err.__context__):
            if nxt is not None and nxt not in seen:
                seen.append(nxt)
    return None


def _ssl_reason(exc: OSError) -> str:
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str) and reason:
        return reason.lower().replace("_", " ")
    return exc.strerror or str(exc)


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class ServerTLS:
    """The certificate a relay serves, swapped for new connections on reload."""

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self._reloads = 0
        self._failures = 0
        self._last_ok = True
        self._seen = (_signature(cert_file), _signature(key_file))
        #: The context new connections get; replaced whole by reload().
        self.context = self._load()

    def _load(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # Both ports speak HTTP/1.1 (the WebSocket upgrade is an HTTP/1.1 request).
        ctx.set_alpn_protocols(["http/1.1"])
        for path, what in ((self.cert_file, "certificate"), (self.key_file, "key")):
            if not path.is_file():
                raise TLSError(f"{path}: cannot read TLS {what} file: no such file")
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        except ssl.SSLError as exc:
            raise TLSError(
                f"{self.cert_file}, {self.key_file}: not a usable certificate and key:"
                f" {_ssl_reason(exc)}"
            ) from None
        except OSError as exc:
            raise TLSError(
                f"{self.cert_file}, {self.key_file}: cannot read: {exc.strerror or exc}"
            ) from None
        self._cert = _certificate_info(self.cert_file)
        return ctx

    def reload(self) -> bool:
        """Load the files again; True if new connections now get them."""
        self._seen = (_signature(self.cert_file), _signature(self.key_file))
        try:
            self.context = self._load()
        except TLSError as exc:
            self._failures += 1
            self._last_ok = False
            log.error("TLS reload failed, still serving the previous certificate: %s", exc)
            return False
        self._reloads += 1
        self._last_ok = True
        log.info("TLS certificate reloaded: serial %s", self._cert[0])
        return True

    def statistics(self) -> TLSStats:
        return TLSStats(
            reloads=self._reloads,
            reload_failures=self._failures,
            last_reload_ok=self._last_ok,
            serial=self._cert[0],
            not_after=self._cert[1],
        )

    async def watch(
        self, interval_s: float, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Reload whenever either file changes (polled every ``interval_s``) until cancelled."""
        task_status.started()
        while True:
            await trio.sleep(interval_s)
            now = (_signature(self.cert_file), _signature(self.key_file))
            if now != self._seen:
                self.reload()


def _certificate_info(cert_file: Path) -> tuple[str, float]:
    """The serial (hex) and notAfter of the first certificate in ``cert_file``."""
    try:
        pem = cert_file.read_text()
        first = pem[: pem.index("-----END CERTIFICATE-----") + 25]
        der = ssl.PEM_cert_to_DER_cert(first)
    except (OSError, ValueError, UnicodeDecodeError):
        return "", 0.0
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    return format(cert.serial_number, "x"), cert.not_valid_after_utc.timestamp()
