"""The SMTP dialogue on one relay connection: greeting, EHLO, STARTTLS, one AUTH attempt,
(pipelined) MAIL/RCPT, streamed DATA, a redacted transcript, and every failure mapped to a
`sendmail_shim.errors` exception.

Built on `smtplib.SMTP` for reply parsing, EHLO features and the AUTH exchange; `auth` chooses
the mechanism and answers the relay (password or OAuth2 token); `connection` owns the socket
(bounded name resolution, TCP_NODELAY, certificate checks, `Wire`) and the clock: each operation
gets ``min(SMTP_TIMEOUT, time left before SMTP_DEADLINE)``.
"""

import smtplib
import socket
import ssl
from contextlib import contextmanager
from types import SimpleNamespace
from typing import BinaryIO, Callable, Iterable, Iterator, NamedTuple

from . import auth
from .connection import (
    Clock, OutOfTime, Wire, await_greeting, connect, handshake, helo_name, tls_context, transport_error,
)
from .replies import STAGES, classify, missing_setup
from .errors import ConfigError, DataError, ProtocolError, ShimError, SMTPFailure, TempFail, Unavailable
from .i18n import _
from .secret import Secret

CHUNK_SIZE = 64 * 1024


class SendResult(NamedTuple):
    reply: str  # final reply to the end of data, e.g. "250 Mail OK queued as X"
    accepted: list[str]
    refused: dict[str, tuple[int, str]]  # recipients the relay refused while accepting others


class Transaction(SimpleNamespace):
    """One message on a connection, from `Relay.begin` to `Relay.collect`."""

    def __init__(self, mail: str, rcpts: list[str], smtputf8: bool, recipients: list[str], clock: Clock,
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
        self._wire: Wire | None = None
        self._clock: Clock | None = None
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
        auth.check_transport(config, self.where)
        context = tls_context(config) if config.security != "none" else None
        self._clock = Clock(config.timeout, config.deadline)
        self._broken = self._dirty = False
        self._lost = None
        self._transactions = 0
        self.peer_address = None
        try:
            with self._at("connect"):
                sock = connect(config, self._clock)
                self.peer_address = sock.getpeername()[0]
            self._note(f"* connected to {self.where}")
            if config.security == "tls":
                with self._at("tls"):
                    sock = self._handshake(sock, context)
            self._wire = Wire(sock, self._clock, self._transcript)
            with self._at("greeting"):
                if config.security != "tls":
                    await_greeting(sock, config, self._clock, self.where, self._note)
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

    def _handshake(self, sock: socket.socket, context: ssl.SSLContext) -> ssl.SSLSocket:
        tls, peer = handshake(sock, context, self.config, self._clock, self.where, self._warn, self._note)
        self.tls_version, self.cipher, self.peer_fingerprint = peer.version, peer.cipher, peer.fingerprint
        self.peer_subject, self.verified = peer.subject, peer.verified
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
        """One AUTH exchange (`auth`); the password or token is fetched only now, with TLS up and
        AUTH certain."""
        offered = self.features.get("auth", "")
        if not offered:
            raise ConfigError(_("{where} does not offer AUTH, but SMTP_USER is set").format(where=self.where),
                              hint=_("for a relay without login, unset SMTP_USER and set SMTP_FROM"))
        mechanism = auth.choose(self.config.auth, offered, tls=bool(self.tls_version), where=self.where)
        if self._password is None:
            raise ConfigError(_("SMTP_USER is set but there is no password to log in with"))
        exchange = auth.Exchange(mechanism, self.config.user, self._password())
        with self._at("auth"):
            self._wire.redact = True
            try:
                self._wire.auth(mechanism, exchange, initial_response_ok=exchange.initial_response)
            except UnicodeEncodeError:
                raise ConfigError(_("the login or password has non-ASCII characters, which SMTP AUTH "
                                    "through smtplib cannot send")) from None
            except smtplib.SMTPResponseException as exc:
                if exc.smtp_code == -1:
                    raise
                reply = _text(exc.smtp_error)
                hint = auth.refusal_hint(self.config.auth, reply, exchange.problem, self.config.user)
                raise self._failure(exc.smtp_code, reply, "auth", hint) from None
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
        clock = Clock(self.config.timeout, self.config.deadline) if self._transactions else self._clock
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
        except OutOfTime as exc:
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
        return transport_error(self._lost, stage, self.config, self.where, self._clock.cut_by_deadline)

    def _failure(self, code: int, text, stage: str, hint: str | None = None) -> ShimError:
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
        return SMTPFailure(code, reply, stage, provider=self.config.provider,
                           hint=hint or classify(stage, code, None, reply, self.config.provider).hint)

    def _note(self, line: str) -> None:
        if self._transcript:
            self._transcript(line)


def _text(text) -> str:
    return text.decode("utf-8", "replace").replace("\n", " ") if isinstance(text, bytes) else str(text)
