"""A real SMTP relay on 127.0.0.1 for the tests: aiosmtpd behind pytest-localserver's Server.

It speaks implicit TLS (465), STARTTLS or plaintext, authenticates PLAIN / LOGIN / CRAM-MD5
against a users dict, applies 163's rule (MAIL FROM must equal the login), records every message
byte for byte and every command line (AUTH payloads as ``***``), and has fault knobs:

    relay.refuse["bob@x.test"] = "550 5.1.1 no such user"   # refuse one recipient
    relay.reply_at["mail"] = "451 4.3.0 try later"          # answer a stage with this reply
    relay.hang_at.add("data")                                 # never answer (until the client leaves)
    relay.close_at.add("rcpt")                                # drop the connection
    relay.reject_data["spam@x.test"] = "554 5.7.1 spam"      # refuse a message to him after its data
    relay.late_replies = 2        # the next 2 end-of-data replies wait for the client's next command
    relay.max_sessions = 2        # a third simultaneous session gets 421 at relay.too_many_at

Stages are command names (``ehlo``, ``starttls``, ``auth``, ``mail``, ``rcpt``, ``data``, ``rset``,
``quit``) plus ``greeting`` (instead of the 220 banner), ``dot`` (the end of the message data, before
the message is taken) and ``accepted`` (after the message is stored, in place of the 250: a fault
there is the ambiguous case, the client cannot know the relay has it).
"""

import asyncio
import datetime
import hashlib
import hmac
import secrets
import ssl
import time
from dataclasses import dataclass, field

import aiosmtpd.controller
import pytest
import pytest_localserver.smtp
import trustme
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword

__all__ = [
    "Certificates", "Message", "RelayHandler", "RelayServer", "RELAY_LOGIN", "RELAY_PASSWORD",
    "ca", "relay_password", "relay_factory", "relay", "starttls_relay", "plain_relay",
]

RELAY_LOGIN = "alice@163.test"
RELAY_PASSWORD = "s3cr3t-Auth-Code!"
RELAY_NAMES = ("127.0.0.1", "localhost", "relay.test")
HANG_SECONDS = 60  # longer than any client timeout in the tests; the client leaving ends it
MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")
CERTS = ("trusted", "untrusted", "wrong-name", "self-signed", "expired")
_DSN_PARAMETERS = {"MAIL": ("RET", "ENVID"), "RCPT": ("NOTIFY", "ORCPT")}


class Certificates:
    """A test CA (its PEM file is what SMTP_CA_FILE points at) and the relay's certificates."""

    def __init__(self, directory):
        self.ca = trustme.CA()
        self.ca_file = str(directory / "relay-ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)
        self._stranger = trustme.CA()  # trusted by nobody

    def server_context(self, cert: str = "trusted") -> tuple[ssl.SSLContext, str]:
        """A server context and the SHA-256 fingerprint of its certificate.

        cert: ``trusted`` (our CA, names 127.0.0.1/localhost/relay.test), ``untrusted`` (same
        names, unknown CA), ``wrong-name`` (our CA, only "other.test"), ``self-signed``,
        ``expired`` (our CA, the right names, valid only until yesterday).
        """
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        if cert == "self-signed":
            own = trustme.CA()  # a CA certificate served as the leaf is self-signed
            pem = own.cert_pem.bytes()
            with own.cert_pem.tempfile() as chain, own.private_key_pem.tempfile() as key:
                context.load_cert_chain(chain, key)
        else:
            issuer, names = {
                "trusted": (self.ca, RELAY_NAMES),
                "untrusted": (self._stranger, RELAY_NAMES),
                "wrong-name": (self.ca, ("other.test",)),
                "expired": (self.ca, RELAY_NAMES),
            }[cert]
            validity = {}
            if cert == "expired":
                now = datetime.datetime.now(datetime.timezone.utc)
                validity = dict(not_before=now - datetime.timedelta(days=30),
                                not_after=now - datetime.timedelta(days=1))
            leaf = issuer.issue_cert(*names, **validity)
            leaf.configure_cert(context)
            pem = leaf.cert_chain_pems[0].bytes()
        der = ssl.PEM_cert_to_DER_cert(pem.decode("ascii"))
        return context, hashlib.sha256(der).hexdigest()


@dataclass
class Message:
    """One message as the relay received it."""

    mail_from: str
    mail_options: list[str]
    rcpt_tos: list[str]
    rcpt_options: list[str]
    data: bytes  # dot-unstuffed DATA bytes, CRLF line ends, without the final "."
    login: str | None  # the AUTH login of the session, None when unauthenticated
    tls: bool
    helo: str


@dataclass
class RelayHandler(pytest_localserver.smtp.Handler):
    """aiosmtpd hooks: auth, sender rule, capture, faults. Shared by all connections."""

    users: dict[str, str]
    require_auth: bool = True  # not auth_*: aiosmtpd takes handler auth_* members for mechanisms
    sender_rule: bool = True
    withhold: set[str] = field(default_factory=set)  # EHLO keywords not to offer
    offer: list[str] = field(default_factory=list)  # extra EHLO keywords, e.g. PIPELINING
    messages: list[Message] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    open_connections: int = 0  # the server stops only after clients have gone (no leaked transports)
    refuse: dict[str, str] = field(default_factory=dict)
    reply_at: dict[str, str] = field(default_factory=dict)
    hang_at: set[str] = field(default_factory=set)
    close_at: set[str] = field(default_factory=set)
    reject_data: dict[str, str] = field(default_factory=dict)
    late_replies: int = 0  # only a client pipelining across messages (RFC 2920 §3.1) goes on
    max_sessions: int | None = None
    too_many_at: str = "greeting"  # or "auth", as some providers answer
    refused_sessions: int = 0

    def __post_init__(self):
        super().__init__()  # the stock .outbox keeps working

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname  # a handle_EHLO hook must record it itself
        kept = [line for line in responses[:-1] if line[4:].split(" ")[0].upper() not in self.withhold]
        return kept + [f"250-{keyword}" for keyword in self.offer] + responses[-1:]

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        login = _login(session)
        if self.require_auth and login is None:
            return "530 5.7.0 Authentication required"
        if self.sender_rule and login is not None and address.lower() != login.lower():
            return "553 Mail from must equal authorized user"
        envelope.mail_from = address  # a hook that answers does aiosmtpd's bookkeeping itself
        envelope.mail_options.extend(mail_options + server.dsn_options)
        return "250 Mail OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options + server.dsn_options)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if await server.fault("dot", push=False):
            return self.reply_at.get("dot", "421 4.4.2 closing connection")  # closed: never sent
        rejection = next((self.reject_data[r] for r in envelope.rcpt_tos if r in self.reject_data), None)
        if rejection:
            return rejection
        self.messages.append(Message(
            mail_from=envelope.mail_from,
            mail_options=list(envelope.mail_options),
            rcpt_tos=list(envelope.rcpt_tos),
            rcpt_options=list(envelope.rcpt_options),
            data=bytes(envelope.original_content),
            login=_login(session),
            tls=server.transport.get_extra_info("ssl_object") is not None,
            helo=session.host_name,
        ))
        if self.late_replies > 0:
            self.late_replies -= 1
            await server._reader.prefetch()
        if await server.fault("accepted", push=False):
            return self.reply_at.get("accepted", "421 4.4.2 closing connection")
        return await super().handle_DATA(server, session, envelope)

    def authenticate(self, server, session, envelope, mechanism, auth_data):
        """aiosmtpd ``authenticator`` for PLAIN and LOGIN."""
        login, password = auth_data.login.decode(errors="replace"), auth_data.password.decode(errors="replace")
        return _auth_result(self.users.get(login) == password, auth_data)

    async def auth_CRAM__MD5(self, server, args):
        """CRAM-MD5 (RFC 2195); aiosmtpd picks up ``auth_*`` methods of the handler."""
        challenge = f"<{secrets.token_hex(8)}@relay.test>".encode()
        response = await server.challenge_auth(challenge)
        if response is MISSING:
            return AuthResult(success=False)
        login, _, digest = response.partition(b" ")
        password = self.users.get(login.decode(errors="replace"))
        expected = hmac.new(password.encode(), challenge, "md5").hexdigest().encode() if password else b""
        return _auth_result(bool(expected) and hmac.compare_digest(expected, digest), LoginPassword(login, b""))


def _auth_result(ok: bool, auth_data) -> AuthResult:
    if ok:
        return AuthResult(success=True, auth_data=auth_data)
    return AuthResult(success=False, handled=False, message="535 Error: authentication failed")


def _login(session) -> str | None:
    return session.auth_data.login.decode() if session.authenticated else None


class _TappedReader:
    """The connection's StreamReader, reporting each command line it hands out (DATA lines not)."""

    def __init__(self, reader, record):
        self.__dict__.update(_reader=reader, _record=record)

    def __getattr__(self, name):
        return getattr(self._reader, name)

    def __setattr__(self, name, value):  # aiosmtpd swaps the transport on STARTTLS
        setattr(self._reader, name, value)

    async def prefetch(self) -> None:
        """Wait for the next command line; `readuntil` hands it out next."""
        try:
            self.__dict__["_early"] = await self._reader.readuntil(b"\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client left instead

    async def readuntil(self, separator=b"\n"):
        line = self.__dict__.pop("_early", None) if separator == b"\n" else None
        if line is None:
            line = await self._reader.readuntil(separator)
        if separator == b"\n":  # commands; DATA reads up to b"\r\n"
            self._record(line)
        return line

    async def readline(self):  # only AUTH continuation lines are read this way
        line = await self._reader.readline()
        self._record(None)
        return line


class RelaySMTP(SMTP):
    """One connection: records commands, applies faults, passes DSN parameters by aiosmtpd."""

    def __init__(self, handler, *, dsn: bool = False, **kwargs):
        super().__init__(handler, **kwargs)
        self.dsn = dsn
        self.dsn_options: list[str] = []
        self._greeted = False
        self.too_many = False  # beyond handler.max_sessions
        for command in ("EHLO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", "RSET", "QUIT"):
            self._smtp_methods[command] = self._faulty(command.lower(), self._smtp_methods[command])
        for command in _DSN_PARAMETERS:
            self._smtp_methods[command] = self._dsn_aware(command, self._smtp_methods[command])

    def connection_made(self, transport):
        if self._original_transport is None:  # after STARTTLS it is called again for the TLS layer
            handler = self.event_handler
            handler.open_connections += 1
            self.too_many = handler.max_sessions is not None and handler.open_connections > handler.max_sessions
        super().connection_made(transport)

    def connection_lost(self, exc):
        super().connection_lost(exc)
        self.event_handler.open_connections -= 1

    def _cb_client_connected(self, reader, writer):
        super()._cb_client_connected(_TappedReader(reader, self._record), writer)

    def _record(self, line: bytes | None) -> None:
        if line is None:
            self.event_handler.commands.append("***")
            return
        text = line.decode("utf-8", errors="replace").rstrip("\r\n")
        verb, _, rest = text.partition(" ")
        if verb.upper() == "AUTH":
            mechanism, _, initial = rest.partition(" ")
            text = f"{verb} {mechanism}" + (" ***" if initial else "")
        self.event_handler.commands.append(text)

    async def push(self, status):
        if not self._greeted and status.startswith("220 "):  # the banner: the greeting stage
            self._greeted = True
            if await self.fault("greeting"):
                return
        await super().push(status)

    async def fault(self, stage: str, push: bool = True) -> bool:
        """Apply the handler's fault for this stage; True when it answered or closed instead.
        With ``push=False`` a configured reply is left to the caller to send."""
        handler = self.event_handler
        if self.too_many and stage == handler.too_many_at:
            handler.refused_sessions += 1
            await super().push("421 4.7.0 too many connections from your IP")
            self.transport.close()
            return True
        if stage in handler.hang_at:
            await asyncio.sleep(HANG_SECONDS)
        if stage in handler.close_at:
            self.transport.close()
            return True
        if stage in handler.reply_at:
            if push:
                await self.push(handler.reply_at[stage])
            return True
        return False

    def _faulty(self, stage, method):
        async def command(arg):
            if not await self.fault(stage):
                await method(arg)
        return command

    def _dsn_aware(self, command, method):
        """aiosmtpd answers 555 to parameters it does not know; take the DSN ones out first."""
        async def with_dsn(arg):
            self.dsn_options = []
            if self.dsn and arg:
                words = arg.split(" ")
                self.dsn_options = [w for w in words if w.split("=")[0].upper() in _DSN_PARAMETERS[command]]
                arg = " ".join(w for w in words if w not in self.dsn_options)
            await method(arg)
        return with_dsn


class RelayServer(pytest_localserver.smtp.Server):
    """The relay: ``security`` is tls (implicit, 465-style), starttls or none.

    Options: ``cert`` (see `Certificates.server_context`), ``users``, ``auth_required``
    (otherwise MAIL gets 530), ``mechanisms`` offered, ``sender_rule`` (163's 553),
    ``offer_starttls=False`` (a starttls relay that hides STARTTLS and offers AUTH in the clear,
    as a downgrading attacker would), ``pipelining``, ``dsn``, ``smtputf8``, ``eightbitmime``,
    ``handler_class`` (a `RelayHandler` subclass: tests/provider_relay.py's plays a provider's limits).
    """

    host = "127.0.0.1"

    def __init__(self, certificates: Certificates, *, security: str = "tls", cert: str = "trusted",
                 users: dict[str, str], auth_required: bool | None = None,
                 mechanisms=MECHANISMS, sender_rule: bool = True, offer_starttls: bool = True,
                 pipelining: bool = False, dsn: bool = False, smtputf8: bool = True,
                 eightbitmime: bool = True, handler_class: type = None):
        assert security in ("tls", "starttls", "none") and cert in CERTS
        self.security = security
        self.ca_file = certificates.ca_file
        self.users = users
        self.auth_required = security != "none" if auth_required is None else auth_required
        withhold = set() if eightbitmime else {"8BITMIME"}
        offer = (["PIPELINING"] if pipelining else []) + (["DSN"] if dsn else [])
        if not offer_starttls:
            withhold.add("STARTTLS")
        handler = (handler_class or RelayHandler)(users, require_auth=self.auth_required, sender_rule=sender_rule,
                                                  withhold=withhold, offer=offer)
        context, self.fingerprint = certificates.server_context(cert) if security != "none" else (None, None)
        aiosmtpd.controller.Controller.__init__(  # Server.__init__ takes only host and port
            self, handler, hostname=self.host, port=0,
            server_hostname="relay.test",  # never socket.getfqdn() per connection
            ssl_context=context if security == "tls" else None,
            tls_context=context if security == "starttls" and offer_starttls else None,
            require_starttls=security == "starttls" and offer_starttls,
            # aiosmtpd does not count implicit TLS as TLS (aiosmtpd#274): AUTH would never be offered
            auth_require_tls=security == "starttls" and offer_starttls,
            authenticator=handler.authenticate,
            auth_exclude_mechanism=[m for m in MECHANISMS if m not in mechanisms],
            enable_SMTPUTF8=smtputf8,
            dsn=dsn,
        )

    def factory(self):
        return RelaySMTP(self.handler, **self.SMTP_kwargs)

    def stop(self, timeout=None):
        """Let the server side of finished sessions close first: stopping the loop under an open
        connection leaks its transport (a ResourceWarning in a later test)."""
        deadline = time.monotonic() + 2
        while self.handler.open_connections > 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        for _ in range(3):  # a closing socket transport needs a few more loop turns to let go
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0.01), self.loop).result(1)
        super().stop(timeout)

    # What the tests look at and turn.
    messages = property(lambda self: self.handler.messages)
    commands = property(lambda self: self.handler.commands)
    refuse = property(lambda self: self.handler.refuse)
    reply_at = property(lambda self: self.handler.reply_at)
    hang_at = property(lambda self: self.handler.hang_at)
    close_at = property(lambda self: self.handler.close_at)
    reject_data = property(lambda self: self.handler.reject_data)
    refused_sessions = property(lambda self: self.handler.refused_sessions)
    late_replies = property(lambda self: self.handler.late_replies,
                            lambda self, value: setattr(self.handler, "late_replies", value))
    max_sessions = property(lambda self: self.handler.max_sessions,
                            lambda self, value: setattr(self.handler, "max_sessions", value))
    too_many_at = property(lambda self: self.handler.too_many_at,
                           lambda self, value: setattr(self.handler, "too_many_at", value))

    @property
    def login(self) -> str:
        return next(iter(self.users))

    def verbs(self, timeout: float = 5.0) -> list[str]:
        """The command verbs received so far, once every session has ended (the client does not
        wait for the reply to QUIT, so the relay may still be reading it)."""
        deadline = time.monotonic() + timeout
        while self.handler.open_connections > 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        return [line.split(" ")[0].upper() for line in self.commands]

    def config_env(self, **overrides: str | None) -> dict[str, str]:
        """SMTP_* settings pointing the shim at this relay; an override of None drops a key."""
        env = {
            "SMTP_HOST": self.host,
            "SMTP_PORT": str(self.port),
            "SMTP_SECURITY": self.security,
            "SMTP_CA_FILE": self.ca_file,
            "SMTP_TIMEOUT": "5",
            "SMTP_CONNECT_TIMEOUT": "5",
            "SMTP_USER" if self.auth_required else "SMTP_FROM": self.login,
        }
        env.update(overrides)
        return {key: value for key, value in env.items() if value is not None}


@pytest.fixture(scope="session")
def ca(tmp_path_factory) -> Certificates:
    return Certificates(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def relay_password() -> str:
    return RELAY_PASSWORD


@pytest.fixture
def relay_factory(ca, relay_password):
    """``relay_factory(**options)`` → a started `RelayServer`; all are stopped after the test."""
    started = []

    def make(**options) -> RelayServer:
        options.setdefault("users", {RELAY_LOGIN: relay_password})
        server = RelayServer(ca, **options)
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def relay(relay_factory) -> RelayServer:
    """Implicit TLS, AUTH required, 163's sender rule."""
    return relay_factory(security="tls")


@pytest.fixture
def starttls_relay(relay_factory) -> RelayServer:
    return relay_factory(security="starttls")


@pytest.fixture
def plain_relay(relay_factory) -> RelayServer:
    """A LAN relay: no TLS, no AUTH required (AUTH offered in the clear)."""
    return relay_factory(security="none")


@dataclass
class TokenRelayHandler(RelayHandler):
    """A relay that takes only XOAUTH2 and OAUTHBEARER (RFC 7628), as Microsoft 365 and Gmail do
    once passwords are off: the bearer token must be live at ``idp`` (tests/idp.py), carry
    ``scope``, and be the login's own or app-only. A refused token gets the error JSON in a 334
    challenge, then 535 after the client's empty (XOAUTH2) or ^A (OAUTHBEARER) answer.
    Use ``relay_factory(handler_class=functools.partial(TokenRelayHandler, idp=idp), mechanisms=())``."""

    idp: object = None
    scope: str = "https://mail.test/smtp"
    tokens: list[str] = field(default_factory=list)  # every token presented
    refused: int = 0  # tokens refused
    session_limit: int | None = None  # messages per session; then MAIL gets 421 and the session ends
    data_seconds: float = 0.0  # how long each message's final reply takes (a slow relay: a run's lower bound)

    async def handle_DATA(self, server, session, envelope):
        await asyncio.sleep(self.data_seconds)
        return await super().handle_DATA(server, session, envelope)

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.session_limit is not None and getattr(session, "messages", 0) >= self.session_limit:
            server.transport.close()
            return "421 4.7.0 too many messages in this session"
        session.messages = getattr(session, "messages", 0) + 1
        return await super().handle_MAIL(server, session, envelope, address, mail_options)

    async def auth_XOAUTH2(self, server, args):
        return await self._bearer(server, args, "user=")

    async def auth_OAUTHBEARER(self, server, args):
        return await self._bearer(server, args, "n,a=")

    async def _bearer(self, server, args, login_prefix: str):
        import base64
        import json

        response = base64.b64decode(args[1]) if len(args) > 1 else await server.challenge_auth("")
        if response is MISSING:
            return AuthResult(success=False, handled=True)
        fields = response.decode(errors="replace").split("\x01")
        login = fields[0].removeprefix(login_prefix).rstrip(",").replace("=2C", ",").replace("=3D", "=")
        token = next((f.removeprefix("auth=Bearer ") for f in fields if f.startswith("auth=Bearer ")), "")
        self.tokens.append(token)
        grant = self.idp.check(token)
        if grant and self.scope in grant.scopes and grant.user in (None, login) and login in self.users:
            return AuthResult(success=True, auth_data=LoginPassword(login.encode(), b""))
        self.refused += 1
        status = "invalid_token" if grant is None else "insufficient_scope"
        await server.challenge_auth(json.dumps({"status": status, "schemes": "bearer", "scope": self.scope}))
        return AuthResult(success=False, handled=False, message="535 5.7.8 Username and Password not accepted")
