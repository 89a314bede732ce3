"""sendmail_shim.smtp against the real aiosmtpd relay of tests/relay.py (and a few raw sockets)."""

import io
import re
import socket
import threading
import time

import pytest

from sendmail_shim import config as config_module
from sendmail_shim import connection as connection_module
from sendmail_shim.connection import GREETING_PROBE_SECONDS, helo_name, looks_like_tls
from sendmail_shim.envelope import Envelope
from sendmail_shim.errors import (
    EX_CONFIG, EX_DATAERR, EX_NOPERM, EX_NOUSER, EX_PROTOCOL, EX_TEMPFAIL, EX_UNAVAILABLE,
    ConfigError, DataError, ProtocolError, SMTPFailure, TempFail, Unavailable,
)
from sendmail_shim.secret import Secret
from sendmail_shim.smtp import Relay, dot_stuff
from tests.relay import RELAY_LOGIN
from tests.shim import secret_forms

BODY = (
    b"From: alice@163.test\r\nTo: bob@example.test\r\nSubject: test\r\n\r\n"
    b".leading dot\r\n..two dots\r\n.\r\nmiddle\r\n"
    + "8-bit: 中文 ünïcödé\r\n".encode()
    + b"last line\r\n"
)


class Session:
    """A shim `Relay` for a test relay, recording transcript, warnings and password fetches."""

    def __init__(self, server, password: str, **settings):
        self.config = config_module.build(server.config_env(**settings), environ={})
        self.transcript: list[str] = []
        self.warnings: list[str] = []
        self.password_fetches = 0

        def fetch():
            self.password_fetches += 1
            return Secret(password)

        self.relay = Relay(self.config, fetch, transcript=self.transcript.append, warn=self.warnings.append)

    def send(self, data: bytes = BODY, **fields):
        fields.setdefault("sender", self.config.sender)
        fields.setdefault("recipients", ["bob@example.test"])
        fields.setdefault("eight_bit", any(b >= 0x80 for b in data))
        fields.setdefault("size", len(data))
        with self.relay as relay:
            return relay.send(Envelope(**fields), io.BytesIO(data))


@pytest.fixture
def session(relay_password):
    return lambda server, password=relay_password, **settings: Session(server, password, **settings)


def failure(session_, **send_fields):
    """The ShimError that sending raises, checked for leaked secrets."""
    with pytest.raises(Exception) as caught:
        session_.send(**send_fields)
    return caught.value


def auth_commands(server) -> list[str]:
    return [line for line in server.commands if line.upper().startswith("AUTH")]


# -- TLS modes and AUTH ---------------------------------------------------------------------------

@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_implicit_tls_auth_delivers_the_exact_bytes(relay_factory, session, mechanism):
    server = relay_factory(security="tls", mechanisms=(mechanism,))
    shim = session(server)
    result = shim.send()
    [message] = server.messages
    assert message.data == BODY
    assert (message.mail_from, message.rcpt_tos, message.login, message.tls) == (
        RELAY_LOGIN, ["bob@example.test"], RELAY_LOGIN, True)
    assert "BODY=8BITMIME" in message.mail_options and f"SIZE={len(BODY)}" in message.mail_options
    assert result.reply.startswith("250") and result.accepted == ["bob@example.test"] and not result.refused
    assert shim.relay.auth_mechanism == mechanism and len(auth_commands(server)) == 1
    assert shim.relay.verified and shim.relay.tls_version.startswith("TLS")
    assert shim.relay.peer_fingerprint == server.fingerprint
    assert "relay.test" in shim.relay.peer_subject or "trustme" in shim.relay.peer_subject


def test_plain_is_preferred_under_tls(relay, session):
    session(relay).send()
    assert auth_commands(relay) == ["AUTH PLAIN ***"]


def test_starttls_upgrades_before_auth(starttls_relay, session):
    shim = session(starttls_relay)
    shim.send()
    commands = [line.split(" ")[0].upper() for line in starttls_relay.commands]
    assert commands[:4] == ["EHLO", "STARTTLS", "EHLO", "AUTH"]
    assert starttls_relay.messages[0].tls and starttls_relay.messages[0].data == BODY


def test_starttls_not_offered_is_an_error_and_no_password_is_sent(relay_factory, session):
    server = relay_factory(security="starttls", offer_starttls=False)  # AUTH offered in the clear
    shim = session(server)
    error = failure(shim)
    assert isinstance(error, Unavailable) and error.exit_code == EX_UNAVAILABLE
    assert "does not offer STARTTLS" in str(error)
    assert not auth_commands(server) and shim.password_fetches == 0
    assert not any(line.upper().startswith("MAIL") for line in server.commands)


def test_plaintext_auth_is_refused_before_connecting(plain_relay, session):
    shim = session(plain_relay, SMTP_USER=RELAY_LOGIN)
    error = failure(shim)
    assert isinstance(error, ConfigError) and error.exit_code == EX_CONFIG
    assert "SMTP_ALLOW_PLAINTEXT_AUTH" in str(error)
    assert plain_relay.commands == [] and shim.password_fetches == 0


def test_plaintext_auth_when_allowed_prefers_cram_md5(plain_relay, session):
    shim = session(plain_relay, SMTP_USER=RELAY_LOGIN, SMTP_ALLOW_PLAINTEXT_AUTH="yes")
    shim.send()
    assert plain_relay.messages[0].login == RELAY_LOGIN and not plain_relay.messages[0].tls
    assert auth_commands(plain_relay) == ["AUTH CRAM-MD5"]


def test_unauthenticated_lan_relay(plain_relay, session):
    shim = session(plain_relay)
    shim.send()
    [message] = plain_relay.messages
    assert (message.login, message.mail_from, message.data) == (None, RELAY_LOGIN, BODY)
    assert shim.password_fetches == 0 and shim.relay.tls_version is None


def test_relay_requiring_auth_without_smtp_user_is_a_config_error(relay, session):
    error = failure(session(relay, SMTP_USER=None, SMTP_FROM=RELAY_LOGIN))
    assert isinstance(error, ConfigError) and "requires AUTH" in str(error) and "SMTP_USER" in str(error)


def test_wrong_password_is_tried_once(relay, session, relay_password):
    shim = session(relay, password="not-the-password")
    error = failure(shim)
    assert isinstance(error, SMTPFailure)
    assert (error.code, error.stage, error.exit_code) == (535, "auth", EX_NOPERM)
    assert len(auth_commands(relay)) == 1
    for form in secret_forms(RELAY_LOGIN, "not-the-password"):
        assert form not in str(error) and all(form not in line for line in shim.transcript)


# -- certificates ---------------------------------------------------------------------------------

def test_untrusted_ca_is_refused_with_a_hint(relay_factory, session):
    server = relay_factory(security="tls", cert="untrusted")
    shim = session(server)
    error = failure(shim)
    assert isinstance(error, Unavailable) and error.exit_code == EX_UNAVAILABLE
    assert "not trusted" in str(error) and "SMTP_CA_FILE" in error.hint
    assert server.commands == [] and shim.password_fetches == 0


def test_untrusted_without_ca_file_suggests_one(relay_factory, session):
    error = failure(session(relay_factory(security="starttls"), SMTP_CA_FILE=None))  # system CAs
    assert isinstance(error, Unavailable) and "set SMTP_CA_FILE" in error.hint


def test_wrong_name_is_refused_with_a_hint(relay_factory, session):
    error = failure(session(relay_factory(security="tls", cert="wrong-name")))
    assert isinstance(error, Unavailable) and "127.0.0.1" in str(error)
    assert "not issued for 127.0.0.1" in error.hint


def test_pinned_fingerprint_accepts_a_self_signed_relay(relay_factory, session):
    server = relay_factory(security="tls", cert="self-signed")
    pin = ":".join(re.findall("..", server.fingerprint.upper()))  # as openssl prints it
    shim = session(server, SMTP_TLS_FINGERPRINT=pin)
    shim.send()
    assert server.messages[0].data == BODY and shim.relay.verified and not shim.warnings


def test_fingerprint_mismatch_is_refused_even_for_a_trusted_certificate(relay, session):
    shim = session(relay, SMTP_TLS_FINGERPRINT="ab" * 32)
    error = failure(shim)
    assert isinstance(error, Unavailable) and "SMTP_TLS_FINGERPRINT" in str(error)
    assert "ab" * 32 in error.hint and relay.fingerprint in error.hint
    assert relay.commands == [] and shim.password_fetches == 0


def test_verification_off_delivers_and_warns_every_time(relay_factory, session):
    server = relay_factory(security="tls", cert="untrusted")
    shim = session(server, SMTP_TLS_VERIFY="no")
    shim.send()
    shim.send()
    assert len(server.messages) == 2 and not shim.relay.verified
    assert len(shim.warnings) == 2 and "SMTP_TLS_VERIFY=no" in shim.warnings[0]


def test_missing_ca_file_is_a_config_error(relay, session, tmp_path):
    error = failure(session(relay, SMTP_CA_FILE=str(tmp_path / "missing.pem")))
    assert isinstance(error, ConfigError) and "SMTP_CA_FILE" in str(error)


def test_implicit_tls_against_a_plaintext_relay(plain_relay, session):
    error = failure(session(plain_relay, SMTP_SECURITY="tls"))
    assert isinstance(error, ProtocolError) and error.exit_code == EX_PROTOCOL
    assert "SMTP_SECURITY=starttls" in error.hint


# The reverse mistake: a greeting in the clear expected from a relay that speaks implicit TLS. It
# says nothing until a ClientHello, so only the probe on a second connection tells it apart from a
# slow relay (see connection.await_greeting). The relay's port is a random one, never 465.

@pytest.mark.parametrize("security", ["starttls", "none"])
def test_greeting_expected_from_an_implicit_tls_relay_fails_fast_naming_the_fix(relay, session, security):
    assert relay.port != 465
    shim = session(relay, SMTP_SECURITY=security, SMTP_ALLOW_PLAINTEXT_AUTH="yes", SMTP_TIMEOUT="30")
    started = time.monotonic()
    error = failure(shim)
    elapsed = time.monotonic() - started
    assert isinstance(error, ProtocolError) and error.exit_code == EX_PROTOCOL
    assert str(error) == (f"127.0.0.1:{relay.port} speaks implicit TLS (TLS from the first byte), not "
                          f"SMTP_SECURITY={security} (set SMTP_SECURITY=tls for port {relay.port})")
    assert GREETING_PROBE_SECONDS - 0.1 < elapsed < 30 - 5  # the probe's wait, not SMTP_TIMEOUT's
    assert relay.commands == [] and shim.password_fetches == 0  # not a word of SMTP, no password
    assert f"* no greeting within {GREETING_PROBE_SECONDS:g}s; asking 127.0.0.1:{relay.port} for TLS " \
           "on a second connection" in shim.transcript


@pytest.mark.e2e
def test_starttls_against_implicit_tls_through_the_console_script(relay, shim_factory):
    shim = shim_factory(relay, SMTP_SECURITY="starttls", SMTP_TIMEOUT="30", SENDMAIL_SHIM_DELIVERY="direct")
    started = time.monotonic()
    result = shim.run("-i", "bob@example.test", stdin=b"Subject: hi\n\nhello\n", expect_exit=EX_PROTOCOL)
    assert time.monotonic() - started < 30 - 5
    [line] = result.stderr.splitlines()
    assert line.startswith("sendmail-shim: ") and "speaks implicit TLS" in line and "SMTP_SECURITY=tls" in line
    assert relay.messages == []


@pytest.fixture
def slow_greeter(listeners):
    """``slow_greeter(port, delay)`` → the port of a TCP proxy to 127.0.0.1:``port`` that holds
    back everything the server says for ``delay`` seconds after each connection (a greet pause)."""

    def pump(source, target, delay):
        time.sleep(delay)
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def start(port: int, delay: float) -> int:
        def proxy(client):
            server = listeners.keep(socket.create_connection(("127.0.0.1", port)))
            for source, target, wait in ((server, client, delay), (client, server, 0)):
                threading.Thread(target=pump, args=(source, target, wait), daemon=True).start()

        return listeners.listen(proxy)

    return start


@pytest.mark.parametrize("security", ["starttls", "none"])
def test_relay_greeting_after_the_probe_is_used_without_delay(relay_factory, session, slow_greeter, security):
    server = relay_factory(security=security)
    delay = GREETING_PROBE_SECONDS + 1.5  # the probe goes out, and waits for a greeting too
    shim = session(server, SMTP_PORT=str(slow_greeter(server.port, delay)), SMTP_TIMEOUT="10")
    started = time.monotonic()
    result = shim.send()
    elapsed = time.monotonic() - started
    assert result.reply.startswith("250") and server.messages[0].data == BODY
    assert delay <= elapsed < delay + 1.5  # not delayed until the probe gave up
    assert any(line.startswith("* no greeting within") for line in shim.transcript)


def test_silent_server_is_not_taken_for_implicit_tls(plain_relay, session, raw_server):
    port = raw_server()  # accepts, the probe too, and never says a thing
    shim = session(plain_relay, SMTP_PORT=str(port), SMTP_TIMEOUT=str(GREETING_PROBE_SECONDS + 1))
    started = time.monotonic()
    error = failure(shim)
    assert isinstance(error, TempFail) and "no answer" in str(error) and "(at GREETING)" in str(error)
    assert "SMTP_SECURITY=tls" in error.hint and f"port {port}" in error.hint
    assert time.monotonic() - started >= GREETING_PROBE_SECONDS + 1 - 0.1
    assert any(line.startswith("* no greeting within") for line in shim.transcript)  # probed, in vain


def test_no_probe_where_servers_greet_in_the_clear(relay, session, monkeypatch):
    """25 and 587: a client that talks before the greeting is what pregreet checks punish."""
    monkeypatch.setattr(connection_module, "PLAINTEXT_PORTS", (relay.port,))  # the test relay's port is one
    shim = session(relay, SMTP_SECURITY="starttls", SMTP_TIMEOUT=str(GREETING_PROBE_SECONDS + 1))
    error = failure(shim)
    assert isinstance(error, TempFail) and "(at GREETING)" in str(error)  # after the whole timeout
    assert "SMTP_SECURITY=tls" in error.hint
    assert not any(line.startswith("* no greeting within") for line in shim.transcript)


def test_tls_bytes_instead_of_a_greeting_fail_at_once(plain_relay, session, raw_server):
    port = raw_server(b"\x16\x03\x03\x00\x02\x02\x28")  # a TLS record, from the first byte
    started = time.monotonic()
    error = failure(session(plain_relay, SMTP_PORT=str(port), SMTP_TIMEOUT="30"))
    assert isinstance(error, ProtocolError) and "speaks implicit TLS" in str(error)
    assert error.hint == f"set SMTP_SECURITY=tls for port {port}"
    assert time.monotonic() - started < 1


@pytest.mark.parametrize("head, tls", [
    (b"\x16\x03\x01", True), (b"\x15\x03\x03", True), (b"\x16", True),
    (b"220 relay.test ESMTP", False), (b"2", False), (b"", False), (b"\x16\x01", False),
])
def test_looks_like_tls(head, tls):
    assert looks_like_tls(head) is tls


# -- envelope and data ----------------------------------------------------------------------------

def test_sender_other_than_the_login_meets_the_163_rule(relay, session):
    error = failure(session(relay), sender="bob@163.test")
    assert isinstance(error, SMTPFailure)
    assert (error.code, error.stage, error.exit_code) == (553, "mail", EX_NOPERM)
    assert "SMTP_USER" in error.hint and not relay.messages


def test_smtputf8_addresses(relay, session):
    session(relay).send(recipients=["用户@例子.test"], smtputf8=True)
    [message] = relay.messages
    assert message.rcpt_tos == ["用户@例子.test"] and "SMTPUTF8" in message.mail_options


def test_smtputf8_not_offered_is_a_data_error(relay_factory, session):
    server = relay_factory(security="tls", smtputf8=False)
    error = failure(session(server), recipients=["用户@例子.test"], smtputf8=True)
    assert isinstance(error, DataError) and error.exit_code == EX_DATAERR
    assert "用户@例子.test needs SMTPUTF8" in str(error)
    assert not any(line.upper().startswith("MAIL") for line in server.commands)


def test_8bit_without_8bitmime_is_sent_with_a_warning(relay_factory, session):
    server = relay_factory(security="tls", eightbitmime=False)
    shim = session(server)
    shim.send()
    assert server.messages[0].data == BODY and "BODY=8BITMIME" not in server.messages[0].mail_options
    assert any("8BITMIME" in warning for warning in shim.warnings)


def test_7bit_message_has_no_body_parameter(relay, session):
    session(relay).send(b"Subject: plain\r\n\r\nascii only\r\n")
    assert not any(option.startswith("BODY=") for option in relay.messages[0].mail_options)


@pytest.mark.parametrize("data", [b"", b"no final newline", b".\r\n", b"a\r\n.\r\n..\r\n.x"])
def test_message_edge_cases_arrive_intact(relay, session, data):
    session(relay).send(data)
    expected = data if data.endswith(b"\r\n") or not data else data + b"\r\n"
    assert relay.messages[0].data == expected


def test_dot_stuffing_across_chunk_boundaries(relay, session):
    data = b"".join(b"." * (n % 4) + b"x" * (n % 3) + b"\r\n" for n in range(40))
    shim = session(relay)
    shim.relay.chunk_size = 3  # lines start, and dots fall, at every offset of a chunk
    shim.send(data)
    assert relay.messages[0].data == data


def test_dot_stuff_is_independent_of_chunking():
    data = b".a\r\n..b\r\nc.\r\n.\r\n\r\n.d"
    reference = re.sub(rb"(?m)^\.", b"..", data) + b"\r\n.\r\n"
    for size in range(1, len(data) + 1):
        chunks = [data[i:i + size] for i in range(0, len(data), size)]
        assert b"".join(dot_stuff(chunks)) == reference


def test_dsn_parameters_when_offered(relay_factory, session):
    server = relay_factory(security="tls", dsn=True)
    session(server).send(dsn_ret="hdrs", envid="id+1 x", dsn_notify="failure,delay")
    mail = next(line for line in server.commands if line.startswith("MAIL"))
    rcpt = next(line for line in server.commands if line.startswith("RCPT"))
    assert "RET=HDRS" in mail and "ENVID=id+2B1+20x" in mail and rcpt.endswith("NOTIFY=FAILURE,DELAY")


def test_dsn_parameters_are_dropped_when_not_offered(relay, session):
    session(relay).send(dsn_ret="hdrs", envid="x", dsn_notify="never")
    assert relay.messages and not any("RET=" in line or "NOTIFY=" in line for line in relay.commands)


# -- recipients, replies, pipelining --------------------------------------------------------------

@pytest.mark.parametrize("pipelining", [False, True])
def test_partial_refusal_delivers_to_the_others(relay_factory, session, pipelining):
    server = relay_factory(security="tls", pipelining=pipelining)
    server.refuse["carol@example.test"] = "550 5.1.1 <carol@example.test>: no such user"
    result = session(server).send(recipients=["bob@example.test", "carol@example.test"])
    assert result.accepted == ["bob@example.test"]
    assert result.refused == {"carol@example.test": (550, "5.1.1 <carol@example.test>: no such user")}
    assert server.messages[0].rcpt_tos == ["bob@example.test"] and server.messages[0].data == BODY


@pytest.mark.parametrize("pipelining", [False, True])
@pytest.mark.parametrize("reply, exit_code", [("550 5.1.1 no such user", EX_NOUSER),
                                               ("450 4.2.0 mailbox busy", EX_TEMPFAIL)])
def test_all_recipients_refused(relay_factory, session, pipelining, reply, exit_code):
    server = relay_factory(security="tls", pipelining=pipelining)
    server.refuse["bob@example.test"] = reply
    error = failure(session(server))
    assert isinstance(error, SMTPFailure) and (error.stage, error.exit_code) == ("rcpt", exit_code)
    assert error.refused == {"bob@example.test": (int(reply[:3]), reply[4:])} and not server.messages


def test_pipelining_sends_the_envelope_in_one_go(relay_factory, session):
    shim = session(relay_factory(security="tls", pipelining=True))
    shim.send(recipients=["a@example.test", "b@example.test"])
    start = next(i for i, line in enumerate(shim.transcript) if line.startswith("C: MAIL"))
    assert [line.split(" ")[1] for line in shim.transcript[start:start + 4]] == ["MAIL", "RCPT", "RCPT", "DATA"]


@pytest.mark.parametrize("stage", ["mail", "data", "dot"])
def test_temporary_failure_reply(relay, session, stage):
    relay.reply_at[stage] = "451 4.3.0 try again later"
    error = failure(session(relay))
    assert isinstance(error, SMTPFailure) and (error.stage, error.exit_code) == (stage, EX_TEMPFAIL)
    assert "451 4.3.0 try again later" in str(error)


def test_closed_connection_is_a_temporary_failure(relay, session):
    relay.close_at.add("rcpt")
    with session(relay).relay as connection:
        envelope = Envelope(sender=RELAY_LOGIN, recipients=["bob@example.test"])
        with pytest.raises(TempFail, match="closed the connection"):
            connection.send(envelope, io.BytesIO(BODY))
        with pytest.raises(TempFail, match="no longer usable"):
            connection.send(envelope, io.BytesIO(BODY))


def test_relay_requiring_starttls_when_configured_without_tls(starttls_relay, session):
    error = failure(session(starttls_relay, SMTP_SECURITY="none", SMTP_USER=None, SMTP_FROM=RELAY_LOGIN))
    assert isinstance(error, ConfigError) and "requires TLS" in str(error)


def test_one_connection_carries_several_messages(relay, session):
    shim = session(relay)
    with shim.relay as connection:
        envelope = Envelope(sender=RELAY_LOGIN, recipients=["bob@example.test"], size=len(BODY))
        connection.send(envelope, io.BytesIO(BODY))
        relay.refuse["nobody@example.test"] = "550 no such user"
        with pytest.raises(SMTPFailure):
            connection.send(Envelope(sender=RELAY_LOGIN, recipients=["nobody@example.test"]), io.BytesIO(BODY))
        connection.send(envelope, io.BytesIO(b"second\r\n"))
    assert [m.data for m in relay.messages] == [BODY, b"second\r\n"]
    verbs = relay.verbs()
    assert verbs.count("EHLO") == 1 and verbs.count("AUTH") == 1
    # no RSET after a message the relay answered: the reply to its data ended the transaction
    assert verbs[verbs.index("DATA"):] == ["DATA", "MAIL", "RCPT", "RSET", "MAIL", "RCPT", "DATA", "QUIT"]


def test_rset_only_after_an_aborted_transaction_and_in_the_next_group(relay_factory, session):
    server = relay_factory(security="tls", pipelining=True)
    server.refuse["nobody@example.test"] = "550 no such user"
    shim = session(server)
    envelope = Envelope(sender=RELAY_LOGIN, recipients=["bob@example.test"], size=len(BODY))
    with shim.relay as connection:
        connection.send(envelope, io.BytesIO(BODY))
        with pytest.raises(SMTPFailure):
            connection.send(Envelope(sender=RELAY_LOGIN, recipients=["nobody@example.test"]), io.BytesIO(BODY))
        connection.send(envelope, io.BytesIO(b"second\r\n"))
    assert [m.data for m in server.messages] == [BODY, b"second\r\n"]
    start = shim.transcript.index("C: RSET")  # one write: no reply read before DATA is sent
    assert [line.split(" ")[1] for line in shim.transcript[start:start + 4]] == ["RSET", "MAIL", "RCPT", "DATA"]
    verbs = server.verbs()
    assert verbs[verbs.index("DATA"):] == ["DATA", "MAIL", "RCPT", "DATA", "RSET", "MAIL", "RCPT", "DATA", "QUIT"]


def test_refused_pipelined_rset_retires_the_connection(relay_factory, session):
    server = relay_factory(security="tls", pipelining=True)
    server.reply_at["rset"] = "421 4.3.2 shutting down"
    server.refuse["nobody@example.test"] = "550 no such user"
    envelope = Envelope(sender=RELAY_LOGIN, recipients=["bob@example.test"], size=len(BODY))
    with session(server).relay as connection:
        with pytest.raises(SMTPFailure):
            connection.send(Envelope(sender=RELAY_LOGIN, recipients=["nobody@example.test"]), io.BytesIO(BODY))
        with pytest.raises(SMTPFailure) as caught:
            connection.send(envelope, io.BytesIO(b"second\r\n"))
        assert (caught.value.stage, caught.value.code) == ("rset", 421)
        with pytest.raises(TempFail, match="no longer usable"):
            connection.send(envelope, io.BytesIO(b"third\r\n"))
    assert server.messages == []


def envelope_to(recipient: str) -> Envelope:
    return Envelope(sender=RELAY_LOGIN, recipients=[recipient], size=len(BODY))


@pytest.mark.parametrize("pipelining", [False, True], ids=["plain", "pipelining"])
def test_next_envelope_goes_out_before_the_final_reply(relay_factory, session, pipelining):
    server = relay_factory(security="tls", pipelining=pipelining)
    if pipelining:  # the relay answers the first data only once the next envelope is there
        server.late_replies = 1
    shim = session(server)
    with shim.relay as connection:
        first = connection.begin(envelope_to("a@example.test"))
        connection.transfer(first, io.BytesIO(BODY))
        second = connection.begin(envelope_to("b@example.test"))
        assert connection.collect(first).reply.startswith("250")
        connection.transfer(second, io.BytesIO(b"second\r\n"))
        assert connection.collect(second).accepted == ["b@example.test"]
    assert [(m.rcpt_tos, m.data) for m in server.messages] == [(["a@example.test"], BODY),
                                                                (["b@example.test"], b"second\r\n")]
    verbs = server.verbs()
    assert verbs[verbs.index("MAIL"):] == ["MAIL", "RCPT", "DATA"] * 2 + ["QUIT"]
    body = next(i for i, line in enumerate(shim.transcript) if line.startswith("C: <message"))
    following = [line.split(" ")[:2] for line in shim.transcript[body + 1:body + 5]]
    if pipelining:  # one flight: data, dot and the next envelope, then the replies in order
        assert following == [["C:", "MAIL"], ["C:", "RCPT"], ["C:", "DATA"], ["S:", "250"]]
    else:
        assert following[:2] == [["S:", "250"], ["C:", "MAIL"]]


def two_in_flight(connection, first_to: str):
    """The first message's data sent and the second's envelope (to b@example.test) right behind it,
    before the first's final reply is read (PIPELINING)."""
    first = connection.begin(envelope_to(first_to))
    connection.transfer(first, io.BytesIO(BODY))
    return first, connection.begin(envelope_to("b@example.test"))


def test_refused_data_does_not_touch_the_next_message(relay_factory, session):
    server = relay_factory(security="tls", pipelining=True)
    server.reject_data["spam@example.test"] = "554 5.7.1 looks like spam"
    with session(server).relay as connection:
        first, second = two_in_flight(connection, "spam@example.test")
        with pytest.raises(SMTPFailure) as caught:
            connection.collect(first)
        assert (caught.value.code, caught.value.stage) == (554, "dot")
        connection.transfer(second, io.BytesIO(b"second\r\n"))
        assert connection.collect(second).reply.startswith("250")
    assert [m.data for m in server.messages] == [b"second\r\n"]
    assert "RSET" not in server.commands  # the refusal of the data ended that transaction


def test_connection_lost_before_the_final_reply(relay_factory, session):
    server = relay_factory(security="tls", pipelining=True)
    server.close_at.add("accepted")  # the relay takes the first message and drops the connection
    with session(server).relay as connection:
        first, second = two_in_flight(connection, "a@example.test")
        with pytest.raises(TempFail) as lost:
            connection.collect(first)
        assert "(at DOT)" in str(lost.value) and "twice" in lost.value.hint
        with pytest.raises(TempFail) as untouched:
            connection.transfer(second, io.BytesIO(b"second\r\n"))
        assert "(at MAIL)" in str(untouched.value) and not untouched.value.hint
        assert not connection.usable
    assert [m.rcpt_tos for m in server.messages] == [["a@example.test"]]


def test_each_transaction_has_its_own_deadline(relay_factory, session):
    server = relay_factory(security="tls", pipelining=True)
    shim = session(server, SMTP_TIMEOUT="30", SMTP_DEADLINE="0.5")
    with shim.relay as connection:
        first = connection.begin(envelope_to("a@example.test"))
        connection.transfer(first, io.BytesIO(BODY))
        time.sleep(0.6)  # the first one's deadline is over; the second one starts afresh
        second = connection.begin(envelope_to("b@example.test"))
        with pytest.raises(TempFail, match="SMTP_DEADLINE=0.5s"):
            connection.collect(first)
        assert not connection.usable  # its reply may still come: the connection is out of step
    assert [m.rcpt_tos for m in server.messages] == [["a@example.test"]] and second.pipelined


def test_verify_sender(relay, session):
    shim = session(relay)
    with shim.relay as connection:
        assert connection.verify_sender().startswith("250")
    assert relay.verbs()[-3:] == ["MAIL", "RSET", "QUIT"]


# -- timeouts and unreachable relays --------------------------------------------------------------

@pytest.fixture
def raw_server(listeners):
    """``raw_server(greeting)`` → the port of a TCP server that sends ``greeting`` (if any) to
    each connection and then says nothing more."""
    def start(greeting: bytes | None = None) -> int:
        def greet(sock):
            if greeting:
                sock.sendall(greeting)

        return listeners.listen(greet)

    return start


def test_connect_timeout(plain_relay, session, raw_fault):
    unanswered_port = raw_fault("unanswered")  # its backlog is full: no answer at all
    error = failure(session(plain_relay, SMTP_PORT=str(unanswered_port), SMTP_CONNECT_TIMEOUT="0.5"))
    assert isinstance(error, TempFail) and error.exit_code == EX_TEMPFAIL
    assert f"cannot connect to 127.0.0.1:{unanswered_port}: timed out" in str(error)


def test_relay_that_never_greets(plain_relay, session, raw_server):
    port = raw_server()
    error = failure(session(plain_relay, SMTP_PORT=str(port), SMTP_TIMEOUT="0.5"))
    assert isinstance(error, TempFail) and "no answer" in str(error) and "GREETING" in str(error)
    # too short for the probe: the hint, for any port (not only 465)
    assert "SMTP_SECURITY=tls" in error.hint and f"port {port}" in error.hint


def test_garbled_greeting_is_a_protocol_error(plain_relay, session, raw_server):
    error = failure(session(plain_relay, SMTP_PORT=str(raw_server(b"hello there\r\n"))))
    assert isinstance(error, ProtocolError) and error.exit_code == EX_PROTOCOL
    assert "not SMTP (at GREETING)" in str(error)


def test_refusing_greeting(plain_relay, session, raw_server):
    port = raw_server(b"554 5.7.1 go away\r\n")  # and then no answer to QUIT either
    error = failure(session(plain_relay, SMTP_PORT=str(port), SMTP_TIMEOUT="0.5"))
    assert isinstance(error, SMTPFailure)
    assert (error.code, error.stage, error.exit_code) == (554, "connect", EX_UNAVAILABLE)


def test_connection_refused(plain_relay, session):
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # closed again: nothing listens there
    error = failure(session(plain_relay, SMTP_PORT=str(port)))
    assert isinstance(error, TempFail)
    assert str(error) == f"cannot connect to 127.0.0.1:{port}: connection refused"


def test_name_resolution_is_bounded(plain_relay, session, monkeypatch):
    release = threading.Event()
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: release.wait(10) and [])
    try:
        error = failure(session(plain_relay, SMTP_HOST="relay.test", SMTP_CONNECT_TIMEOUT="0.5"))
    finally:
        release.set()
    assert isinstance(error, TempFail) and "cannot resolve relay.test" in str(error)


@pytest.mark.parametrize("stage", ["mail", "data"])
def test_relay_hanging_mid_dialogue(relay, session, stage):
    relay.hang_at.add(stage)
    error = failure(session(relay, SMTP_TIMEOUT="0.5"))
    assert isinstance(error, TempFail) and f"(at {stage.upper()})" in str(error)


def test_hang_after_the_dot_warns_of_duplicates(relay, session):
    relay.hang_at.add("dot")
    error = failure(session(relay, SMTP_TIMEOUT="0.5"))
    assert isinstance(error, TempFail) and "twice" in error.hint


def test_deadline_caps_the_whole_attempt(relay, session):
    relay.hang_at.add("rcpt")
    error = failure(session(relay, SMTP_TIMEOUT="30", SMTP_DEADLINE="0.5"))
    assert isinstance(error, TempFail) and "SMTP_DEADLINE=0.5s" in str(error)


# -- EHLO name ------------------------------------------------------------------------------------

@pytest.fixture
def no_dns(monkeypatch):
    def forbidden(*args):
        raise AssertionError("DNS lookup")

    for name in ("getfqdn", "gethostbyaddr", "gethostbyname", "gethostbyname_ex"):
        monkeypatch.setattr(socket, name, forbidden)
    return monkeypatch


@pytest.mark.parametrize("hostname, expected", [("web1", "[127.0.0.1]"), ("web1.example.net", "web1.example.net")])
def test_ehlo_name_needs_no_dns(relay, session, no_dns, hostname, expected):
    no_dns.setattr(socket, "gethostname", lambda: hostname)
    session(relay).send()
    assert relay.messages[0].helo == expected


def test_ehlo_name_from_config(relay, session, no_dns):
    session(relay, SMTP_HELO="mail.example.org").send()
    assert relay.messages[0].helo == "mail.example.org"


def test_ehlo_address_literal_for_ipv6(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "web1")
    config = config_module.build({"SMTP_HOST": "::1"}, environ={})
    with socket.create_server(("::1", 0), family=socket.AF_INET6) as listener:
        with socket.create_connection(listener.getsockname()[:2]) as sock:
            assert helo_name(config, sock) == "[IPv6:::1]"


# -- transcript -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_transcript_hides_every_form_of_the_password(relay_factory, session, relay_password, mechanism):
    server = relay_factory(security="starttls", mechanisms=(mechanism,))
    shim = session(server)
    shim.send()
    text = "\n".join(shim.transcript)
    for form in secret_forms(RELAY_LOGIN, relay_password):
        assert form not in text
    auth = {"PLAIN": ["C: AUTH PLAIN ***"], "LOGIN": ["C: AUTH LOGIN", "C: ***", "C: ***"]}[mechanism]
    start = shim.transcript.index(auth[0])
    assert [line for line in shim.transcript[start:] if line.startswith("C:")][:len(auth)] == auth
    assert any(line.startswith("S: 235") for line in shim.transcript)
    assert "C: EHLO" in text and "C: STARTTLS" in text and "C: QUIT" in text
