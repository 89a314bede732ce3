"""Reaching a relay: TCP with bounded name resolution, the greeting's first bytes (and the probe for
a relay that speaks implicit TLS), the TLS context and handshake with its certificate checks, the
EHLO name, the clock that bounds every operation, smtplib on that socket (`Wire`, with the redacted
transcript), and what a failed transport means.

`smtp.Relay` holds the connection these build and speaks SMTP over it.
"""

import hashlib
import hmac
import ipaddress
import os
import re
import selectors
import smtplib
import socket
import ssl
import threading
import time
from typing import Callable, NamedTuple

from .errors import ConfigError, ProtocolError, ShimError, TempFail, Unavailable
from .i18n import _

_DOMAIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+")
_UNTRUSTED = {18, 19, 20, 21, 27}  # OpenSSL X509_V_ERR_*: self-signed, unknown issuer, untrusted
_NAME_MISMATCH = {62, 64}  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
_MAYBE_TWICE = _("the relay may have accepted the message anyway; a retry can deliver it twice")
_PORT_25 = _("many providers and cloud hosts block outgoing port 25: use SMTP_SECURITY=tls with port 465, "
             "or starttls with port 587")
# Silence after which a connection that expects an SMTP greeting in the clear is probed for
# implicit TLS (see await_greeting); a relay greets within milliseconds, a greet pause
# (sendmail's greet_pause, Postfix's postscreen) lasts a few seconds.
GREETING_PROBE_SECONDS = 3.0
# Ports whose servers greet in the clear by standard (RFC 5321, RFC 6409) and check for clients
# that talk first: never probed.
PLAINTEXT_PORTS = (25, 587)


def looks_like_tls(head: bytes) -> bool:
    """Whether the first bytes a server sent begin a TLS record (handshake 0x16 or alert 0x15,
    version 3.x) rather than an SMTP reply, which begins with a digit. One byte is enough to tell."""
    return bool(head) and head[0] in (0x15, 0x16) and head[1:2] in (b"", b"\x03")


def _client_hello(host: str) -> bytes:
    """The bytes of a TLS ClientHello for ``host`` (nothing is verified: it is only a question)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=host)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


class _ImplicitTLS(OSError):
    """The relay speaks TLS from the first byte, but SMTP_SECURITY expects a greeting in the clear."""


class OutOfTime(TempFail):
    """SMTP_DEADLINE is over before an operation: what the relay says next is never read, so the
    connection is not reused."""


class Clock:
    """SMTP_TIMEOUT per operation, capped by what is left of SMTP_DEADLINE."""

    def __init__(self, timeout: float, deadline: float):
        self.timeout, self.deadline = timeout, deadline
        self._end = time.monotonic() + deadline
        self.cut_by_deadline = False  # whether the last budget was the deadline's, not the timeout

    def budget(self, limit: float | None = None) -> float:
        limit = self.timeout if limit is None else limit
        left = self._end - time.monotonic()
        if left <= 0:
            raise OutOfTime(_("gave up after SMTP_DEADLINE={deadline:g}s").format(deadline=self.deadline))
        self.cut_by_deadline = left < limit
        return min(limit, left)


class Wire(smtplib.SMTP):
    """smtplib on our socket: each read and write is bounded by the clock, and written to the
    transcript, with every client line of an AUTH exchange shown as ``***``."""

    ehlo_msg = "EHLO"

    def __init__(self, sock: socket.socket, clock: Clock, transcript: Callable[[str], None] | None):
        super().__init__(local_hostname="localhost")  # anything but None: None means getfqdn()
        self.sock, self.file = sock, None
        self.clock, self.transcript = clock, transcript
        self.redact = False

    def send(self, s):
        if self.sock:
            self.sock.settimeout(self.clock.budget())
        super().send(s)

    def putcmd(self, cmd, args=""):
        self._note("C: " + self._shown(f"{cmd} {args}".rstrip()))
        super().putcmd(cmd, args)

    def putcmds(self, lines: list[str]) -> None:
        """Several commands in one write (PIPELINING)."""
        for line in lines:
            self._note("C: " + line)
        self.send("".join(line + "\r\n" for line in lines))

    def getreply(self):
        if self.sock:
            self.sock.settimeout(self.clock.budget())
        code, text = super().getreply()
        if code == -1:  # smtplib has already cut the line; there is nothing useful to show
            self._note("S: <not an SMTP reply>")
            raise smtplib.SMTPResponseException(-1, text)
        lines = text.decode("utf-8", "replace").split("\n")
        for number, line in enumerate(lines, 1):
            self._note(f"S: {code}{' ' if number == len(lines) else '-'}{line}".rstrip())
        return code, text

    def _shown(self, line: str) -> str:
        if not self.redact:
            return line
        words = line.split(" ")
        if words[0].upper() != "AUTH":
            return "***"
        return " ".join(words[:2]) + (" ***" if len(words) > 2 else "")

    def _note(self, line: str) -> None:
        if self.transcript:
            self.transcript(line)


def helo_name(config, sock: socket.socket) -> str:
    """SMTP_HELO, else the host name if it is a dotted domain, else the local address literal.

    Never socket.getfqdn(): with a broken resolver it blocks for 10–20 s.
    """
    if config.helo:
        return config.helo
    name = socket.gethostname()
    if _DOMAIN.fullmatch(name):
        return name
    address = ipaddress.ip_address(sock.getsockname()[0].split("%")[0])
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    return f"[IPv6:{address}]" if address.version == 6 else f"[{address}]"


def connect(config, clock: Clock) -> socket.socket:
    """TCP to the relay; name resolution and connecting share SMTP_CONNECT_TIMEOUT."""
    budget = clock.budget(config.connect_timeout)
    end = time.monotonic() + budget
    error: OSError | None = None
    for family, kind, proto, _name, address in _resolve(config.host, config.port, budget):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(max(end - time.monotonic(), 0.001))
            sock.connect(address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle stall on the dot
        return sock
    raise error or OSError(f"no address for {config.host}")


def _resolve(host: str, port: int, budget: float) -> list:
    """getaddrinfo in a daemon thread, so a dead resolver costs at most the budget."""
    outcome: dict = {}

    def lookup():
        try:
            outcome["addresses"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=lookup, name="sendmail-shim resolver", daemon=True)
    worker.start()
    worker.join(budget)
    if worker.is_alive():
        raise _dsn(TempFail(_("cannot resolve {host}: no answer within {budget:g}s").format(
            host=host, budget=budget), hint=_("check the DNS resolver")), "4.4.3")
    if "error" in outcome:
        reason = outcome["error"].strerror or str(outcome["error"])
        raise _dsn(TempFail(_("cannot resolve {host}: {reason}").format(host=host, reason=reason.lower()),
                            hint=_("check SMTP_HOST and the DNS resolver")), "4.4.3")
    return outcome["addresses"]


def await_greeting(sock: socket.socket, config, clock: Clock, where: str, note: Callable[[str], None]) -> None:
    """Wait up to SMTP_TIMEOUT for the first bytes of a greeting in the clear (starttls, none),
    and recognise a relay that speaks implicit TLS instead.

    An implicit-TLS server says nothing until the client's ClientHello, so SMTP_SECURITY=starttls
    against one (a relay with TLS on 465, 2465…) used to end as a bare greeting timeout after
    the whole SMTP_TIMEOUT. Now:

    - first bytes that begin a TLS record (`looks_like_tls`) fail at once;
    - after GREETING_PROBE_SECONDS (3 s) of silence, a *second* connection to the same address
      sends a TLS ClientHello, and nothing else: a TLS record in answer (a ServerHello or an
      alert) means implicit TLS, and the attempt fails with `_ImplicitTLS` (SMTP_SECURITY=tls is
      the fix). The probe verifies nothing and sends no secret; it is closed at once.
      Meanwhile the first connection keeps waiting: a slow relay that greets in the clear is
      used as before, at no extra delay (its probe answers with a greeting, or not in time);
    - with no answer on either, the greeting times out after SMTP_TIMEOUT, as before, with
      the implicit-TLS hint for every port (`transport_error`).

    Why not simpler: waiting for the whole timeout is the slowness this fixes (30 s by default,
    measured 30.0 s; with the probe 3.0 s on loopback; a relay that greets at once costs one
    poll more, not measurable). Sending the ClientHello on the first connection would spoil
    it for a slow server that greets in the clear.

    Why a second connection only after 3 s, and never on 25 or 587 (PLAINTEXT_PORTS): bytes
    sent before the greeting are what pregreet checks punish (sendmail's greet_pause,
    Postfix's postscreen "PREGREET", Exim's "synchronization error"; fail2ban filters can ban
    on them), and those run where servers greet in the clear by standard. No relay speaks
    implicit TLS there; a silent one gets the hint after SMTP_TIMEOUT. On 465, 2465 or any
    other port, a server that greets after 3 s receives one ClientHello per attempt on the
    probe connection."""
    end = time.monotonic() + clock.budget()
    probe_at = end if config.port in PLAINTEXT_PORTS else time.monotonic() + GREETING_PROBE_SECONDS
    probe: socket.socket | None = None
    hello = b""
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ, "greeting")

    def drop_probe() -> None:
        nonlocal probe
        if probe is not None:
            selector.unregister(probe)
            probe.close()
            probe = None

    try:
        while True:
            now = time.monotonic()
            if now >= end:
                raise TimeoutError("no greeting")
            if now >= probe_at:
                probe_at = end  # one probe per connection
                try:
                    hello = _client_hello(config.host)
                    probe = socket.socket(sock.family, socket.SOCK_STREAM)
                    probe.setblocking(False)
                    probe.connect_ex(sock.getpeername())
                    selector.register(probe, selectors.EVENT_WRITE, "connected")
                    note(f"* no greeting within {GREETING_PROBE_SECONDS:g}s; asking {where} "
                     "for TLS on a second connection")
                except (OSError, ValueError):
                    if probe is not None:
                        probe.close()
                    probe = None
            for key, _events in selector.select(max(min(end, probe_at) - now, 0)):
                if key.data == "greeting":
                    sock.settimeout(0.001)
                    if looks_like_tls(sock.recv(2, socket.MSG_PEEK)):
                        raise _ImplicitTLS("a TLS record instead of a greeting")
                    return
                try:
                    if key.data == "connected":
                        error = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if error or probe.send(hello) != len(hello):
                            raise OSError(error, "probe failed")
                        selector.modify(probe, selectors.EVENT_READ, "answer")
                        continue
                    answer = probe.recv(2)
                except OSError:
                    answer = b""
                drop_probe()  # answered, refused or failed: the first connection decides
                if looks_like_tls(answer):
                    note(f"* {where} answered the ClientHello with TLS")
                    raise _ImplicitTLS("the relay answered a TLS ClientHello")
    finally:
        drop_probe()
        selector.close()


def tls_context(config) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=config.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(_("SMTP_CA_FILE={path}: cannot load it: {reason}").format(
            path=config.ca_file, reason=exc.strerror or exc)) from None
    if config.tls_fingerprint or not config.tls_verify:
        context.check_hostname = False  # the pin alone decides, or the user opted out
        context.verify_mode = ssl.CERT_NONE
    if config.tls_cert_file or config.tls_key_file:
        _client_certificate(context, config)
    return context


def _client_certificate(context: ssl.SSLContext, config) -> None:
    """The client certificate (SMTP_TLS_CERT_FILE, its key in SMTP_TLS_KEY_FILE or in the same
    file), the other password-free login; the key is refused when others may read it, as the
    credential file is."""
    from . import credstore

    if not config.tls_cert_file:
        raise ConfigError(_("SMTP_TLS_KEY_FILE is set without SMTP_TLS_CERT_FILE"))
    key = config.tls_key_file or config.tls_cert_file
    try:
        credstore.check_file(key, os.stat(key), credstore.service_gid())
        context.load_cert_chain(config.tls_cert_file, key)
    except OSError as exc:
        raise ConfigError(_("cannot load the client certificate {path}: {reason}").format(
            path=config.tls_cert_file, reason=exc.strerror or exc)) from None


class TLSPeer(NamedTuple):
    """What a handshake learnt about the relay (`Relay` keeps it as its attributes)."""
    version: str
    cipher: str
    fingerprint: str | None  # SHA-256 hex of the certificate
    subject: str | None  # when verified against CAs
    verified: bool


def handshake(sock: socket.socket, context: ssl.SSLContext, config, clock: Clock, where: str,
              warn: Callable[[str], None], note: Callable[[str], None]) -> tuple[ssl.SSLSocket, TLSPeer]:
    """TLS on ``sock`` (closed on failure), then SMTP_TLS_FINGERPRINT or the CA verification's verdict."""
    try:
        sock.settimeout(clock.budget())
        tls = context.wrap_socket(sock, server_hostname=config.host)
    except BaseException:
        sock.close()
        raise
    der = tls.getpeercert(binary_form=True)
    version, cipher = tls.version(), tls.cipher()[0]
    fingerprint = hashlib.sha256(der).hexdigest() if der else None
    subject, verified = None, False
    if config.tls_fingerprint:
        if not hmac.compare_digest(fingerprint or "", config.tls_fingerprint):
            tls.close()
            raise Unavailable(
                _("the TLS certificate of {where} does not match SMTP_TLS_FINGERPRINT").format(where=where),
                hint=_("SMTP_TLS_FINGERPRINT is {expected}, the relay presented {actual}").format(
                    expected=config.tls_fingerprint, actual=fingerprint),
            )
        verified, how = True, "matches SMTP_TLS_FINGERPRINT"
    elif config.tls_verify:
        rdns = tls.getpeercert().get("subject", ())
        subject = ", ".join(f"{key}={value}" for rdn in rdns for key, value in rdn)
        verified = True
        how = f"verified against {'SMTP_CA_FILE' if config.ca_file else 'the system CAs'}"
    else:
        how = "NOT verified"
        warn(f"TLS certificate of {where} not verified (SMTP_TLS_VERIFY=no): "
             "anyone on the path can read the password and the mail")
    note(f"* {version} {cipher}, certificate {how}")
    return tls, TLSPeer(version, cipher, fingerprint, subject, verified)


def transport_error(exc: Exception, stage: str, config, where: str, cut_by_deadline: bool) -> ShimError:
    """The error for a transport failure (socket, TLS, smtplib, deadline) at ``stage`` (one of
    `replies.STAGES`), with the hint that names the likely fix."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _untrusted(exc, config, where)
    # SMTP_SECURITY against what the port speaks, both ways (the other one is
    # WRONG_VERSION_NUMBER below): a ProtocolError naming the fix
    if isinstance(exc, _ImplicitTLS):
        return ProtocolError(
            _("{where} speaks implicit TLS (TLS from the first byte), not SMTP_SECURITY={security}").format(
                where=where, security=config.security),
            hint=_("set SMTP_SECURITY=tls for port {port}").format(port=config.port))
    if isinstance(exc, TimeoutError) or isinstance(exc.__context__, TimeoutError):
        if cut_by_deadline:
            return TempFail(_("gave up on {where} at {stage} after SMTP_DEADLINE={deadline:g}s").format(
                where=where, stage=stage.upper(), deadline=config.deadline))
        hint = None
        if stage == "dot":
            hint = _MAYBE_TWICE
        elif stage == "greeting" and config.security != "tls":
            hint = _("a relay with implicit TLS says nothing until the TLS handshake: if port {port} "
                     "expects it (as 465 does), set SMTP_SECURITY=tls").format(port=config.port)
        if stage == "connect":
            hint = _PORT_25 if config.port == 25 else _(
                "a firewall may drop the connection: check SMTP_HOST and SMTP_PORT, "
                "and that outgoing port {port} is open").format(port=config.port)
            return _dsn(TempFail(_("cannot connect to {where}: timed out after {timeout:g}s").format(
                where=where, timeout=config.connect_timeout), hint=hint), "4.4.1")
        return TempFail(_("no answer from {where} within {timeout:g}s (at {stage})").format(
            where=where, timeout=config.timeout, stage=stage.upper()), hint=hint)
    if isinstance(exc, ssl.SSLError):
        hint = None
        if exc.reason == "WRONG_VERSION_NUMBER" and config.security == "tls":
            hint = _("the relay does not speak implicit TLS on this port; for 587 or 25 set SMTP_SECURITY=starttls")
        return ProtocolError(_("TLS with {where} failed: {reason}").format(where=where, reason=exc.reason or exc),
                             hint=hint)
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        hint = _MAYBE_TWICE if stage == "dot" else None
        return TempFail(_("{where} closed the connection (at {stage})").format(where=where, stage=stage.upper()),
                        hint=hint)
    if isinstance(exc, smtplib.SMTPException) or not isinstance(exc, OSError):
        return ProtocolError(_("{where} broke the SMTP protocol at {stage}: {error}").format(
            where=where, stage=stage.upper(), error=exc))
    reason = (exc.strerror or str(exc) or type(exc).__name__).lower()
    if stage == "connect":
        refused = isinstance(exc, ConnectionRefusedError) and config.port == 25
        return _dsn(TempFail(_("cannot connect to {where}: {reason}").format(where=where, reason=reason),
                             hint=_PORT_25 if refused else None), "4.4.1")
    return TempFail(_("connection to {where} failed (at {stage}): {reason}").format(
        where=where, stage=stage.upper(), reason=reason))

def _untrusted(exc: ssl.SSLCertVerificationError, config, where: str) -> Unavailable:
    hint = None
    if exc.verify_code in _NAME_MISMATCH:
        hint = _("the certificate is not issued for {host}; set SMTP_HOST to a name it carries").format(
            host=config.host)
    elif exc.verify_code in _UNTRUSTED and config.ca_file:
        hint = _("SMTP_CA_FILE={path} does not hold the CA that issued the relay's certificate").format(
            path=config.ca_file)
    elif exc.verify_code in _UNTRUSTED:
        hint = _("a corporate relay's certificate comes from its own CA: set SMTP_CA_FILE to that CA certificate "
                 "(PEM), or pin the certificate with SMTP_TLS_FINGERPRINT")
    return Unavailable(_("the TLS certificate of {where} is not trusted: {reason}").format(
        where=where, reason=exc.verify_message), hint=hint)


def _dsn(error: ShimError, status: str) -> ShimError:
    """`error` with the RFC 3463 status the log gives it (4.4.1: no answer from the host, 4.4.3:
    name service failure) instead of its class's."""
    error.dsn = status
    return error
