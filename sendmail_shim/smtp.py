"""One relay connection: verified TLS, an EHLO name without DNS, one AUTH attempt, streamed DATA,
a redacted transcript, and every failure mapped to a `sendmail_shim.errors` exception.

Built on `smtplib.SMTP` for reply parsing, EHLO features and the AUTH exchange; this module owns
the socket (bounded name resolution, TCP_NODELAY, certificate checks) and the timeouts: each
operation gets ``min(SMTP_TIMEOUT, time left before SMTP_DEADLINE)``.
"""

import hashlib
import hmac
import ipaddress
import re
import selectors
import smtplib
import socket
import ssl
import threading
import time
from contextlib import contextmanager
from types import SimpleNamespace
from typing import BinaryIO, Callable, Iterable, Iterator, NamedTuple

from .replies import STAGES, classify, missing_setup
from .errors import (
    ConfigError, DataError, ProtocolError, ShimError, SMTPFailure, TempFail, Unavailable,
)
from .i18n import _
from .secret import Secret

CHUNK_SIZE = 64 * 1024

# Preferred AUTH mechanisms. Under TLS the password is protected anyway and PLAIN is one round
# trip; on a plaintext connection (SMTP_ALLOW_PLAINTEXT_AUTH=yes) CRAM-MD5 at least hides it.
_MECHANISMS_TLS = ("PLAIN", "LOGIN", "CRAM-MD5")
_MECHANISMS_PLAIN = ("CRAM-MD5", "PLAIN", "LOGIN")

_DOMAIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+")
_UNTRUSTED = {18, 19, 20, 21, 27}  # OpenSSL X509_V_ERR_*: self-signed, unknown issuer, untrusted
_NAME_MISMATCH = {62, 64}  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
_MAYBE_TWICE = _("the relay may have accepted the message anyway; a retry can deliver it twice")
_PORT_25 = _("many providers and cloud hosts block outgoing port 25: use SMTP_SECURITY=tls with port 465, "
             "or starttls with port 587")
# Silence after which a connection that expects an SMTP greeting in the clear is probed for
# implicit TLS (see Relay._await_greeting); a relay greets within milliseconds, a greet pause
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


class SendResult(NamedTuple):
    reply: str  # final reply to the end of data, e.g. "250 Mail OK queued as X"
    accepted: list[str]
    refused: dict[str, tuple[int, str]]  # recipients the relay refused while accepting others


class Transaction(SimpleNamespace):
    """One message on a connection, from `Relay.begin` to `Relay.collect`."""

    def __init__(self, mail: str, rcpts: list[str], smtputf8: bool, recipients: list[str], clock: "_Clock",
                 number: int = 1):
        super().__init__(
            mail=mail, rcpts=rcpts, smtputf8=smtputf8,  # the command lines
            recipients=recipients,
            clock=clock,  # its own SMTP_DEADLINE, also while the next message's envelope is on its way
            number=number,  # the how-manieth transaction on its connection (the log's conn_use)
            pipelined=False,  # MAIL, RCPT… and DATA went out in `begin`, their replies unread
            reset=False,  # … behind an RSET
            accepted=[], refused={},  # by `transfer`
        )


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


def dot_stuff(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The DATA wire form of CRLF-normalised message bytes: dot-stuffed, ended by CRLF "." CRLF.

    Works chunk by chunk (constant memory); a line may start in one chunk and its dot be the
    first byte of the next.
    """
    at_line_start = True
    for chunk in chunks:
        if not chunk:
            continue
        stuffed = chunk.replace(b"\n.", b"\n..")
        yield b"." + stuffed if at_line_start and chunk[:1] == b"." else stuffed
        at_line_start = chunk[-1:] == b"\n"
    yield b".\r\n" if at_line_start else b"\r\n.\r\n"


def xtext(text: str) -> str:
    """RFC 3461 xtext, for ENVID."""
    return "".join(c if 33 <= ord(c) <= 126 and c not in "+=" else f"+{ord(c):02X}" for c in text)


class _OutOfTime(TempFail):
    """SMTP_DEADLINE is over before an operation: what the relay says next is never read, so the
    connection is not reused."""


class _Clock:
    """SMTP_TIMEOUT per operation, capped by what is left of SMTP_DEADLINE."""

    def __init__(self, timeout: float, deadline: float):
        self.timeout, self.deadline = timeout, deadline
        self._end = time.monotonic() + deadline
        self.cut_by_deadline = False  # whether the last budget was the deadline's, not the timeout

    def budget(self, limit: float | None = None) -> float:
        limit = self.timeout if limit is None else limit
        left = self._end - time.monotonic()
        if left <= 0:
            raise _OutOfTime(_("gave up after SMTP_DEADLINE={deadline:g}s").format(deadline=self.deadline))
        self.cut_by_deadline = left < limit
        return min(limit, left)


class _Wire(smtplib.SMTP):
    """smtplib on our socket: each read and write is bounded by the clock, and written to the
    transcript, with every client line of an AUTH exchange shown as ``***``."""

    ehlo_msg = "EHLO"

    def __init__(self, sock: socket.socket, clock: _Clock, transcript: Callable[[str], None] | None):
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


class Relay:
    """One connection to the configured relay; `open()` (or ``with``) before `send()`.

    After `open()`: ``peer_address`` (the relay's IP address, kept after `close`), ``tls_version``,
    ``cipher``, ``peer_subject`` (when verified against CAs), ``peer_fingerprint`` (SHA-256 hex),
    ``verified``, ``features`` (EHLO keywords → parameters), ``auth_mechanism``,
    ``helo_name``.
    """

    chunk_size = CHUNK_SIZE

    def __init__(self, config, password: Callable[[], Secret] | None = None, *,
                 transcript: Callable[[str], None] | None = None, warn: Callable[[str], None] | None = None):
        self.config = config
        self._password = password
        self._transcript = transcript
        self._warn = warn or (lambda text: None)
        self._wire: _Wire | None = None
        self._clock: _Clock | None = None
        self._broken = False  # not reused, no QUIT on close
        self._lost: Exception | None = None  # the transport failure, non-SMTP reply or deadline that broke it
        self._dirty = False  # MAIL went out, and neither the end of its data nor an RSET ended it
        self._transactions = 0  # begin() calls on this connection
        self.peer_address = self.tls_version = self.cipher = self.peer_subject = self.peer_fingerprint = None
        self.verified = False
        self.features: dict[str, str] = {}
        self.auth_mechanism = self.helo_name = None

    @property
    def where(self) -> str:
        host = self.config.host or ""
        return f"[{host}]:{self.config.port}" if ":" in host else f"{host}:{self.config.port}"

    # -- connection ---------------------------------------------------------------------------

    def open(self) -> None:
        """Connect, TLS, EHLO and AUTH (when SMTP_USER is set)."""
        config = self.config
        if not config.host:
            raise ConfigError(_("SMTP_HOST is not set"))
        if config.user and config.security == "none" and not config.allow_plaintext_auth:
            raise ConfigError(
                _("refusing to send the password for {user} unencrypted to {where}").format(
                    user=config.user, where=self.where),
                hint=_("set SMTP_SECURITY=tls or starttls, or SMTP_ALLOW_PLAINTEXT_AUTH=yes on a trusted network"),
            )
        context = self._tls_context() if config.security != "none" else None
        self._clock = _Clock(config.timeout, config.deadline)
        self._broken = self._dirty = False
        self._lost = None
        self._transactions = 0
        self.peer_address = None
        try:
            with self._at("connect"):
                sock = self._connect()
                self.peer_address = sock.getpeername()[0]
            self._note(f"* connected to {self.where}")
            if config.security == "tls":
                with self._at("tls"):
                    sock = self._handshake(sock, context)
            self._wire = _Wire(sock, self._clock, self._transcript)
            with self._at("greeting"):
                if config.security != "tls":
                    self._await_greeting(sock)
                code, text = self._wire.getreply()
                if code != 220:
                    raise self._failure(code, text, "connect")
            self.helo_name = self._wire.local_hostname = helo_name(config, sock)
            self._ehlo()
            if config.security == "starttls":
                self._starttls(context)
            if config.user:
                self._authenticate()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """QUIT when the connection is still sound, without waiting for the reply (as Postfix's
        smtp_skip_quit_response): every message is settled by then, and a distant relay would
        cost one more round trip. Never raises."""
        wire, self._wire = self._wire, None
        if wire is None:
            return
        try:
            if not self._broken and wire.sock:
                wire.putcmd("QUIT")
        except (ShimError, OSError):
            pass
        finally:
            wire.close()

    def __enter__(self) -> "Relay":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _connect(self) -> socket.socket:
        """TCP to the relay; name resolution and connecting share SMTP_CONNECT_TIMEOUT."""
        budget = self._clock.budget(self.config.connect_timeout)
        end = time.monotonic() + budget
        error: OSError | None = None
        for family, kind, proto, _name, address in self._resolve(budget):
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
        raise error or OSError(f"no address for {self.config.host}")

    def _await_greeting(self, sock: socket.socket) -> None:
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
          the implicit-TLS hint for every port (`_transport_error`).

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
        end = time.monotonic() + self._clock.budget()
        probe_at = end if self.config.port in PLAINTEXT_PORTS else time.monotonic() + GREETING_PROBE_SECONDS
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
                        hello = _client_hello(self.config.host)
                        probe = socket.socket(sock.family, socket.SOCK_STREAM)
                        probe.setblocking(False)
                        probe.connect_ex(sock.getpeername())
                        selector.register(probe, selectors.EVENT_WRITE, "connected")
                        self._note(f"* no greeting within {GREETING_PROBE_SECONDS:g}s; asking {self.where} "
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
                        self._note(f"* {self.where} answered the ClientHello with TLS")
                        raise _ImplicitTLS("the relay answered a TLS ClientHello")
        finally:
            drop_probe()
            selector.close()

    def _resolve(self, budget: float) -> list:
        """getaddrinfo in a daemon thread, so a dead resolver costs at most the budget."""
        host, port = self.config.host, self.config.port
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

    def _tls_context(self) -> ssl.SSLContext:
        config = self.config
        try:
            context = ssl.create_default_context(cafile=config.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(_("SMTP_CA_FILE={path}: cannot load it: {reason}").format(
                path=config.ca_file, reason=exc.strerror or exc)) from None
        if config.tls_fingerprint or not config.tls_verify:
            context.check_hostname = False  # the pin alone decides, or the user opted out
            context.verify_mode = ssl.CERT_NONE
        return context

    def _handshake(self, sock: socket.socket, context: ssl.SSLContext) -> ssl.SSLSocket:
        config = self.config
        try:
            sock.settimeout(self._clock.budget())
            tls = context.wrap_socket(sock, server_hostname=config.host)
        except BaseException:
            sock.close()
            raise
        der = tls.getpeercert(binary_form=True)
        self.tls_version, self.cipher = tls.version(), tls.cipher()[0]
        self.peer_fingerprint = hashlib.sha256(der).hexdigest() if der else None
        if config.tls_fingerprint:
            if not hmac.compare_digest(self.peer_fingerprint or "", config.tls_fingerprint):
                tls.close()
                raise Unavailable(
                    _("the TLS certificate of {where} does not match SMTP_TLS_FINGERPRINT").format(where=self.where),
                    hint=_("SMTP_TLS_FINGERPRINT is {expected}, the relay presented {actual}").format(
                        expected=config.tls_fingerprint, actual=self.peer_fingerprint),
                )
            self.verified, how = True, "matches SMTP_TLS_FINGERPRINT"
        elif config.tls_verify:
            subject = tls.getpeercert().get("subject", ())
            self.peer_subject = ", ".join(f"{key}={value}" for rdn in subject for key, value in rdn)
            self.verified = True
            how = f"verified against {'SMTP_CA_FILE' if config.ca_file else 'the system CAs'}"
        else:
            how = "NOT verified"
            self._warn(f"TLS certificate of {self.where} not verified (SMTP_TLS_VERIFY=no): "
                       "anyone on the path can read the password and the mail")
        self._note(f"* {self.tls_version} {self.cipher}, certificate {how}")
        return tls

    def _ehlo(self) -> None:
        with self._at("ehlo"):
            code, text = self._wire.ehlo(self.helo_name)
            if code != 250:
                raise self._failure(code, text, "ehlo")
        self.features = {keyword: value.strip() for keyword, value in self._wire.esmtp_features.items()}

    def _starttls(self, context: ssl.SSLContext) -> None:
        if "starttls" not in self.features:
            raise Unavailable(
                _("{where} does not offer STARTTLS").format(where=self.where),
                hint=_("SMTP_SECURITY=starttls never falls back to plaintext; the relay (or something "
                       "between you and it) removed STARTTLS — for port 465 set SMTP_SECURITY=tls"),
            )
        with self._at("starttls"):
            code, text = self._wire.docmd("STARTTLS")
            if code != 220:
                raise self._failure(code, text, "starttls")
            # RFC 3207: forget everything learnt before TLS, including unread bytes
            self._wire.sock, self._wire.file = self._handshake(self._wire.sock, context), None
        self._ehlo()

    def _authenticate(self) -> None:
        offered = self.features.get("auth", "").upper().split()
        if not offered:
            raise ConfigError(_("{where} does not offer AUTH, but SMTP_USER is set").format(where=self.where),
                              hint=_("for a relay without login, unset SMTP_USER and set SMTP_FROM"))
        preference = _MECHANISMS_TLS if self.tls_version else _MECHANISMS_PLAIN
        mechanism = next((m for m in preference if m in offered), None)
        if mechanism is None:
            raise Unavailable(_("{where} offers AUTH {offered}; sendmail-shim speaks {supported}").format(
                where=self.where, offered=" ".join(offered), supported=", ".join(_MECHANISMS_TLS)))
        if self._password is None:
            raise ConfigError(_("SMTP_USER is set but there is no password to log in with"))
        secret = self._password()  # only now: TLS is up and AUTH is certain
        responder = _responder(mechanism, self.config.user, secret)
        with self._at("auth"):
            self._wire.redact = True
            try:
                self._wire.auth(mechanism, responder, initial_response_ok=mechanism == "PLAIN")
            except UnicodeEncodeError:
                raise ConfigError(_("the login or password has non-ASCII characters, which SMTP AUTH "
                                    "through smtplib cannot send")) from None
            finally:
                self._wire.redact = False
        self.auth_mechanism = mechanism

    # -- mail transactions --------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """Open, and not left in an unknown state by a failed transaction."""
        return bool(self._wire) and not self._broken

    def send(self, envelope, data: BinaryIO, *, all_or_nothing: bool = False) -> SendResult:
        """Deliver one message (``data`` positioned at its start, CRLF, not dot-stuffed):
        `begin`, `transfer` and `collect` in a row."""
        transaction = self.begin(envelope)
        self.transfer(transaction, data, all_or_nothing=all_or_nothing)
        return self.collect(transaction)

    def begin(self, envelope) -> Transaction:
        """Start a message. With PIPELINING its [RSET,] MAIL, every RCPT and DATA go out now in
        one write: right behind the previous message's data, before that message's final reply is
        read (RFC 2920 §3.1), so that a run of messages costs one round trip each.

        Raises DataError (nothing sent) when this relay can never take the envelope. Then call
        `collect` for the previous message, if any, and `transfer` for this one: replies are read
        in the order the commands went out."""
        if not self.usable:
            raise TempFail(_("the connection to {where} is no longer usable; open a new one").format(where=self.where))
        mail, rcpts, smtputf8 = self._commands(envelope)
        # the first transaction shares its deadline with open(); each other one gets its own
        clock = _Clock(self.config.timeout, self.config.deadline) if self._transactions else self._clock
        self._transactions += 1
        transaction = Transaction(mail, rcpts, smtputf8, list(envelope.recipients), clock, self._transactions)
        if "pipelining" in self.features:
            self._use(transaction, "mail")
            with self._at("mail"):
                transaction.pipelined, transaction.reset, self._dirty = True, self._dirty, True
                self._wire.command_encoding = "utf-8" if smtputf8 else "ascii"
                self._wire.putcmds(["RSET"] * transaction.reset + [mail, *rcpts, "DATA"])
        return transaction

    def transfer(self, transaction: Transaction, data: BinaryIO, *, all_or_nothing: bool = False) -> None:
        """Read the envelope's replies, then send the data and its final dot; the relay's verdict
        on the message is `collect`'s. Raises the refusal of MAIL, of every recipient (``refused``
        maps them to the replies) or of DATA.

        ``all_or_nothing`` (direct mode, which has no queue to retry or bounce from): when any
        recipient is refused, nobody gets the message and the refusal is raised."""
        self._use(transaction, "mail")
        mail, rcpts, pipelined = transaction.mail, transaction.rcpts, transaction.pipelined
        with self._at("mail"):
            if pipelined:  # the replies to what `begin` sent, in order
                if transaction.reset:
                    self._check_reset(*self._wire.getreply())
                replies = [self._wire.getreply() for _ in range(len(rcpts) + 2)]
            else:
                self._reset()
                self._dirty = True
                self._wire.command_encoding = "utf-8" if transaction.smtputf8 else "ascii"
                replies = [self._wire.docmd(mail)]
        mail_reply, data_reply = replies[0], replies[-1] if pipelined else None
        if not 200 <= mail_reply[0] < 300:
            self._abandon(data_reply)
            raise self._failure(*mail_reply, "mail")
        with self._at("rcpt"):
            rcpt_replies = replies[1:-1] if pipelined else [self._wire.docmd(line) for line in rcpts]
        refused = {
            rcpt: (code, _text(text))
            for rcpt, (code, text) in zip(transaction.recipients, rcpt_replies, strict=True) if not 200 <= code < 300
        }
        accepted = [rcpt for rcpt in transaction.recipients if rcpt not in refused]
        if refused and accepted and all_or_nothing:
            if data_reply and data_reply[0] == 354:  # a dot now would deliver: drop the connection
                self._broken = True
                self._wire.close()
            else:
                self._abandon()
            accepted = []
        if not accepted:
            if not self._broken:
                self._abandon(data_reply)
            code, text = min(refused.values())  # a 4xx, if any, for it may go away
            error = self._failure(code, text, "rcpt")
            error.refused = refused
            raise error
        with self._at("data"):
            code, text = data_reply if pipelined else self._wire.docmd("DATA")
        if code != 354:
            self._abandon()
            raise self._failure(code, text, "data")
        with self._at("dot"):
            self._stream(data)
        self._dirty = False  # the final reply ends the transaction, whatever it says (RFC 5321 §4.1.1.4)
        transaction.accepted, transaction.refused = accepted, refused

    def collect(self, transaction: Transaction) -> SendResult:
        """The relay's final reply to the message `transfer` sent; raises a refusal. The
        connection lost before it: the relay may have taken the message."""
        self._use(transaction, "dot")
        with self._at("dot"):
            code, text = self._wire.getreply()
        if not 200 <= code < 300:
            raise self._failure(code, text, "dot")
        return SendResult(f"{code} {_text(text)}", transaction.accepted, transaction.refused)

    def verify_sender(self) -> str:
        """MAIL FROM:<sender> then RSET: does the relay accept our sender? (for --check)"""
        if not self.config.sender:
            raise ConfigError(_("no sender: set SMTP_USER (or SMTP_FROM for a relay without login)"))
        with self._at("mail"):
            self._reset()
            self._dirty = True
            code, text = self._wire.docmd(f"MAIL FROM:<{self.config.sender}>")
            self._reset()
        if not 200 <= code < 300:
            raise self._failure(code, text, "mail")
        return f"{code} {_text(text)}"

    def _commands(self, envelope) -> tuple[str, list[str], bool]:
        """The MAIL and RCPT command lines for this relay's extensions, and whether SMTPUTF8."""
        addresses = [envelope.sender, *envelope.recipients]
        if not envelope.recipients:
            raise DataError(_("the message has no recipients"))
        if any(c in "<>" or not c.isprintable() for address in addresses for c in address):
            raise DataError(_("an envelope address contains a line break or angle bracket"))
        features = self.features
        params = []
        if envelope.eight_bit:
            if "8bitmime" in features:
                params.append("BODY=8BITMIME")
            else:
                self._warn(f"{self.where} does not offer 8BITMIME; an 8-bit message was sent anyway")
        wide = next((address for address in addresses if not address.isascii()), None)
        smtputf8 = bool(envelope.smtputf8 or wide)
        if smtputf8:
            if "smtputf8" not in features:
                raise DataError(_("address {address} needs SMTPUTF8, which the relay does not offer").format(
                    address=wide or envelope.sender))
            params.append("SMTPUTF8")
        if "size" in features and envelope.size:
            params.append(f"SIZE={envelope.size}")
        rcpt_params = []
        if "dsn" in features:  # DSN requests are wishes: without the extension they are dropped
            if envelope.dsn_ret:
                params.append(f"RET={envelope.dsn_ret.upper()}")
            if envelope.envid:
                params.append(f"ENVID={xtext(envelope.envid)}")
            if envelope.dsn_notify:
                rcpt_params.append(f"NOTIFY={envelope.dsn_notify.upper()}")
        mail = " ".join([f"MAIL FROM:<{envelope.sender}>", *params])
        return mail, [" ".join([f"RCPT TO:<{rcpt}>", *rcpt_params]) for rcpt in envelope.recipients], smtputf8

    def _stream(self, data: BinaryIO) -> None:
        size = 0
        for piece in dot_stuff(iter(lambda: data.read(self.chunk_size), b"")):
            self._wire.send(piece)
            size += len(piece)
        self._note(f"C: <message, {size} bytes on the wire, ending with .>")

    def _reset(self) -> None:
        """RSET between transactions, so one connection can carry many messages."""
        if self._dirty:
            self._check_reset(*self._wire.docmd("RSET"))
            self._wire.command_encoding = "ascii"
            self._dirty = False

    def _check_reset(self, code: int, text) -> None:
        """A refused RSET leaves the session in an unknown state (and, pipelined, replies unread):
        the connection is not reused."""
        if code != 250:
            self._broken = True
            raise self._failure(code, text, "rset")

    def _abandon(self, data_reply: tuple[int, bytes] | None = None) -> None:
        """After a failed MAIL, RCPT or DATA: end a DATA that a broken pipelining server accepted.
        The RSET goes out before the next MAIL (with PIPELINING, in its group); when there is no
        next one, QUIT ends the session anyway. Failing that, the connection is not reused; the
        first error is what counts."""
        try:
            with self._at("rset"):
                if data_reply and data_reply[0] == 354:
                    self._wire.send(b".\r\n")
                    self._wire.getreply()
        except ShimError:
            self._broken = True

    def _use(self, transaction: Transaction, stage: str) -> None:
        """Go on with `transaction` at ``stage``, timed by its own clock. When the connection
        was lost meanwhile (say, while the previous message's final reply was read), that loss is
        the error, as seen at this stage."""
        if not self.usable:
            if self._lost is None:
                raise TempFail(
                    _("the connection to {where} is no longer usable; open a new one").format(where=self.where))
            raise self._lost_at(stage)
        self._clock = self._wire.clock = transaction.clock

    # -- errors -------------------------------------------------------------------------------

    @contextmanager
    def _at(self, stage: str):
        """Translate whatever smtplib, ssl or socket raise during ``stage`` (one of
        `replies.STAGES`) into a ShimError."""
        assert stage in STAGES, stage
        try:
            yield
        except _OutOfTime as exc:
            self._broken, self._lost = True, exc
            raise
        except ShimError:
            raise
        except smtplib.SMTPResponseException as exc:
            if exc.smtp_code != -1:
                raise self._failure(exc.smtp_code, exc.smtp_error, stage) from None
            self._broken, self._lost = True, exc
            raise self._lost_at(stage) from None
        except (OSError, ValueError) as exc:  # every smtplib and ssl error is one of these
            self._broken, self._lost = True, exc
            raise self._lost_at(stage) from None

    def _lost_at(self, stage: str) -> ShimError:
        """The error for the transport failure, non-SMTP reply or deadline that broke the connection."""
        if isinstance(self._lost, ShimError):
            return self._lost
        if isinstance(self._lost, smtplib.SMTPResponseException):
            return ProtocolError(_("{where} answered with something that is not SMTP (at {stage})").format(
                where=self.where, stage=stage.upper()))
        return self._transport_error(self._lost, stage)

    def _transport_error(self, exc: Exception, stage: str) -> ShimError:
        where, config = self.where, self.config
        if isinstance(exc, ssl.SSLCertVerificationError):
            return self._untrusted(exc)
        # SMTP_SECURITY against what the port speaks, both ways (the other one is
        # WRONG_VERSION_NUMBER below): a ProtocolError naming the fix
        if isinstance(exc, _ImplicitTLS):
            return ProtocolError(
                _("{where} speaks implicit TLS (TLS from the first byte), not SMTP_SECURITY={security}").format(
                    where=where, security=config.security),
                hint=_("set SMTP_SECURITY=tls for port {port}").format(port=config.port))
        if isinstance(exc, TimeoutError) or isinstance(exc.__context__, TimeoutError):
            if self._clock.cut_by_deadline:
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

    def _untrusted(self, exc: ssl.SSLCertVerificationError) -> Unavailable:
        config = self.config
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
            where=self.where, reason=exc.verify_message), hint=hint)

    def _failure(self, code: int, text, stage: str) -> ShimError:
        reply = _text(text)
        missing = missing_setup(stage, code, reply, authenticated=bool(self.auth_mechanism))
        if missing:
            if missing == "tls":
                return ConfigError(
                    _("{where} requires TLS: {code} {reply}").format(where=self.where, code=code, reply=reply),
                    hint=_("set SMTP_SECURITY=starttls (or tls for port 465)"))
            return ConfigError(
                _("{where} requires AUTH: {code} {reply}").format(where=self.where, code=code, reply=reply),
                hint=_("set SMTP_USER and store the password with sendmail-shim --set-password"))
        return SMTPFailure(code, reply, stage, hint=classify(stage, code, None, reply, self.config.provider).hint)

    def _note(self, line: str) -> None:
        if self._transcript:
            self._transcript(line)


def _responder(mechanism: str, user: str, secret: Secret) -> Callable[..., str | None]:
    """smtplib's ``authobject`` for one mechanism; the password stays inside the Secret."""
    if mechanism == "PLAIN":
        return lambda challenge=None: f"\0{user}\0{secret.reveal()}"
    if mechanism == "CRAM-MD5":
        return lambda challenge=None: None if challenge is None else (
            user + " " + hmac.new(secret.reveal().encode("utf-8"), challenge, "md5").hexdigest())
    answers = iter((lambda: user, secret.reveal))  # LOGIN: first the user, then the password
    return lambda challenge=None: next(answers, lambda: "")()


def _dsn(error: ShimError, status: str) -> ShimError:
    """`error` with the RFC 3463 status the log gives it (4.4.1: no answer from the host, 4.4.3:
    name service failure) instead of its class's."""
    error.dsn = status
    return error


def _text(text) -> str:
    return text.decode("utf-8", "replace").replace("\n", " ") if isinstance(text, bytes) else str(text)
