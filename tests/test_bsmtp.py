"""`-bs` protocol edge cases: the real console script with an SMTP session on stdin/stdout."""

import email
import email.policy
import os
import select
import subprocess

import pytest

from sendmail_shim.bsmtp import MAX_LINE
from sendmail_shim.errors import EX_CONFIG, EX_DATAERR
from tests.shim import OUTPUTS, SHIM, SHIM_PYTHON

pytestmark = pytest.mark.e2e

MESSAGE = b"From: App <app@example.com>\r\nTo: bob@example.com\r\nSubject: bs\r\n\r\nbody\r\n"


def session(*commands: bytes) -> bytes:
    return b"".join(c if c.endswith(b"\n") else c + b"\r\n" for c in commands)


def transaction(rcpt=b"bob@example.com", data=MESSAGE) -> bytes:
    return session(b"MAIL FROM:<app@example.com>", b"RCPT TO:<" + rcpt + b">", b"DATA", data + b".\r\n")


def replies(result) -> list[str]:
    """Whole replies (a multi-line reply is one item, lines joined by newlines)."""
    out, current = [], []
    for line in result.stdout.decode().split("\r\n")[:-1]:
        current.append(line)
        if line[3:4] != "-":
            out.append("\n".join(current))
            current = []
    assert current == [], "a reply was cut off"
    return out


def codes(result) -> list[str]:
    return [r[:3] for r in replies(result)]


def test_pipelined_session_several_transactions_in_order(shim, relay):
    """Everything written at once, even before the greeting: the replies still come one per
    command, in order, starting with the greeting; two messages from one process."""
    result = shim.run("-bs", stdin=session(
        b"EHLO client.test", transaction(), b"NOOP", b"RSET", transaction(b"carol@example.com"), b"QUIT",
    ))
    assert codes(result) == ["220", "250", "250", "250", "354", "250", "250", "250", "250", "250", "354", "250", "221"]
    assert replies(result)[0].startswith("220 ") and "ESMTP" in replies(result)[0]
    assert [m.rcpt_tos for m in relay.messages] == [["bob@example.com"], ["carol@example.com"]]
    assert all(m.mail_from == relay.login for m in relay.messages)
    assert result.stderr == ""


def test_greeting_comes_before_anything_is_read(shim):
    """Symfony writes nothing until it has read the 220; a server that waits for input first
    would deadlock it. The greeting is read here while the shim's stdin is still silent."""
    proc = subprocess.Popen([SHIM_PYTHON, str(SHIM), "-bs"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=shim.env, cwd=shim.home)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)  # a safety net, not a timing claim
        assert ready, "no greeting while stdin stayed open and empty"
        assert proc.stdout.readline().startswith(b"220 ")
        proc.stdin.write(b"QUIT\r\n")
        proc.stdin.flush()
        assert proc.stdout.readline().startswith(b"221 ")
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()
        OUTPUTS.append(proc.stderr.read().decode("utf-8", "replace"))
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()


def test_ehlo_advertises_8bitmime_size_smtputf8_and_no_auth_starttls_pipelining(shim):
    result = shim.run("-bs", stdin=session(b"EHLO client.test", b"HELO client.test", b"QUIT"))
    ehlo, helo = replies(result)[1:3]
    keywords = [line[4:].split(" ")[0] for line in ehlo.splitlines()[1:]]
    assert {"8BITMIME", "SIZE", "SMTPUTF8"} <= set(keywords)
    assert not {"AUTH", "STARTTLS", "PIPELINING", "DSN", "CHUNKING"} & set(keywords)
    assert all(line.startswith("250-") for line in ehlo.splitlines()[:-1]) and ehlo.splitlines()[-1].startswith("250 ")
    assert helo.startswith("250 ") and "\n" not in helo


def test_mail_parameters(shim, relay):
    result = shim.run("-bs", stdin=session(
        b"EHLO client.test",
        b"MAIL FROM:<app@example.com> BODY=BINARYMIME",  # not offered
        b"MAIL FROM:<app@example.com> SIZE=12k",
        b"MAIL FROM:<app@example.com> XFOO=1",
        b"MAIL FROM:<app@example.com> SIZE=1000 body=8bitmime SMTPUTF8",
        b"RCPT TO:<bob@example.com> NOTIFY=SUCCESS",  # DSN is not offered
        b"RCPT TO:<bob@example.com>",
        b"DATA",
        "Subject: 8-bit ünïcode\r\n\r\n中文\r\n.\r\n".encode(),
        b"QUIT",
    ))
    assert codes(result) == ["220", "250", "501", "501", "555", "250", "555", "250", "354", "250", "221"]
    [msg] = relay.messages
    assert "BODY=8BITMIME" in msg.mail_options  # measured on the message, not taken from the client
    assert msg.data.endswith("\r\n\r\n中文\r\n".encode())


def test_bad_sequence_unknown_commands_and_syntax(shim, relay):
    result = shim.run("-bs", stdin=session(
        b"RCPT TO:<bob@example.com>",  # before MAIL
        b"DATA",  # before MAIL
        b"MAIL FROM:<app@example.com>",
        b"MAIL FROM:<app@example.com>",  # nested
        b"DATA",  # without RCPT
        b"RCPT TO:<>",
        b"RCPT bob@example.com",
        b"MAIL FROM app@example.com",
        b"STARTTLS", b"AUTH PLAIN AGFsaWNlAHg=", b"EXPN staff", b"X-UNKNOWN", b"",
        b"HELO",
        b"VRFY bob", b"HELP", b"NOOP", b"RSET",
        b"DATA",  # RSET ended the transaction
        b"QUIT",
        b"NOOP",  # after QUIT: never read
    ))
    assert codes(result) == [
        "220", "503", "503", "250", "503", "503", "501", "501", "503",
        "502", "502", "502", "502", "502", "501", "252", "214", "250", "250", "503", "221",
    ]
    assert relay.messages == []


def test_a_too_long_command_is_refused_and_the_session_goes_on(shim, relay):
    result = shim.run("-bs", stdin=session(b"NOOP " + b"x" * 5000, transaction(), b"QUIT"))
    assert codes(result) == ["220", "500", "250", "250", "354", "250", "221"]
    assert len(relay.messages) == 1


def test_dots_and_line_endings_in_data(shim, relay):
    """Leading dots un-stuffed once, LF-only lines accepted as lines; only CRLF . CRLF ends DATA
    (a bare-LF "." line is an un-stuffed, empty content line: no smuggling)."""
    data = (b"Subject: dots\n\n..\n...two\n.x\n\x2e.\r\nend\n.\nmore\r\n.")
    result = shim.run("-bs", stdin=session(b"HELO x", b"MAIL FROM:<a@example.com>", b"RCPT TO:<bob@example.com>",
                                           b"DATA", data, b"QUIT"))
    assert codes(result)[-2:] == ["250", "221"]
    [msg] = relay.messages
    assert msg.data.endswith(b"\r\n\r\n.\r\n..two\r\nx\r\n.\r\nend\r\n\r\nmore\r\n")


def test_a_data_line_longer_than_the_read_buffer_keeps_its_dots(shim, relay):
    """A line that arrives in pieces: a piece starting with '.' is not the end of the message
    and is not un-stuffed."""
    long_line = b"x" * MAX_LINE + b".\r\n"  # the second piece is exactly ".\r\n"
    other = b"y" * MAX_LINE + b"..z\r\n"
    data = b"Subject: long\r\n\r\n" + long_line + other + b"after\r\n"
    result = shim.run("-bs", stdin=session(b"HELO x", transaction(data=data), b"QUIT"))
    assert codes(result) == ["220", "250", "250", "250", "354", "250", "221"]
    [msg] = relay.messages
    lines = msg.data.split(b"\r\n\r\n", 1)[1].replace(b"\r\n ", b"").split(b"\r\n")  # unfold the 998 breaks
    assert lines == [b"x" * MAX_LINE + b".", b"y" * MAX_LINE + b"..z", b"after", b""]


def test_eof_inside_data_accepts_nothing(shim, relay):
    result = shim.run("-bs", stdin=session(b"HELO x", b"MAIL FROM:<a@example.com>", b"RCPT TO:<bob@example.com>",
                                           b"DATA", MESSAGE + b"no final dot\r\n"), expect_exit=EX_DATAERR)
    assert codes(result) == ["220", "250", "250", "250", "354"]
    assert "not accepted" in result.stderr
    assert relay.messages == [] and not list(shim.queue_dir.rglob("*.msg"))
    assert not any("status=sent" in line or "/pickup[" in line for line in shim.log_lines())


def test_eof_without_quit_ends_the_session_cleanly(shim, relay):
    result = shim.run("-bs", stdin=session(b"HELO x", transaction()))
    assert codes(result) == ["220", "250", "250", "250", "354", "250"] and result.stderr == ""
    assert len(relay.messages) == 1


def test_client_closing_its_end_early_is_not_an_error(shim):
    """A client that writes its commands and goes away without reading the replies: the shim
    ends the session as at EOF, without a traceback, exit 0."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([SHIM_PYTHON, str(SHIM), "-bs"], input=b"NOOP\r\nNOOP\r\nQUIT\r\n", stdout=write_end,
                              stderr=subprocess.PIPE, env=shim.env, cwd=shim.home, timeout=60)
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (0, b"")


def test_refusal_becomes_the_reply_then_rset_and_the_next_message_goes(shim, relay):
    relay.refuse["gone@example.com"] = "550 5.1.1 gone@example.com: no such user"
    result = shim.run("-bs", stdin=session(b"HELO x", transaction(b"gone@example.com"), b"RSET", transaction(),
                                           b"QUIT"))
    assert codes(result) == ["220", "250", "250", "250", "354", "550", "250", "250", "250", "354", "250", "221"]
    assert replies(result)[5] == "550 5.1.1 gone@example.com: no such user"
    [msg] = relay.messages
    assert msg.rcpt_tos == ["bob@example.com"]


def test_sender_policy_refusal_is_a_5xx(shim_factory, relay):
    shim = shim_factory(relay, SENDMAIL_SHIM_DELIVERY="interactive", SMTP_FROM_POLICY="reject")
    result = shim.run("-bs", stdin=session(b"HELO x", transaction(), b"QUIT"))
    assert codes(result) == ["220", "250", "250", "250", "354", "550", "221"]
    assert replies(result)[5].startswith("550 5.7.1 ")
    assert relay.messages == []


def test_temporary_relay_failure_is_250_because_the_message_is_queued(shim, relay):
    relay.reply_at["mail"] = "451 4.3.0 try again later"
    result = shim.run("-bs", stdin=session(b"HELO x", transaction(), b"QUIT"))
    assert codes(result) == ["220", "250", "250", "250", "354", "250", "221"]
    assert relay.messages == [] and "451" in result.stderr  # said on stderr, never on stdout
    assert any("status=deferred" in line for line in shim.log_lines())


def test_local_recipients_resolve_through_aliases(shim_factory, relay):
    shim = shim_factory(relay, SENDMAIL_SHIM_DELIVERY="interactive", SMTP_ALIASES="root:ops@example.com",
                        SMTP_LOCAL_MAIL="refuse")
    result = shim.run("-bs", stdin=session(b"HELO x", b"MAIL FROM:<>", b"RCPT TO:<www-data>", b"RCPT TO:<root>",
                                           b"DATA", MESSAGE + b".\r\n", b"QUIT"))
    assert codes(result) == ["220", "250", "250", "550", "250", "354", "250", "221"]
    assert "www-data" in replies(result)[3]
    [msg] = relay.messages
    assert msg.rcpt_tos == ["ops@example.com"] and msg.mail_from == relay.login
    head = email.message_from_bytes(msg.data, policy=email.policy.default)
    assert head["From"].addresses[0].addr_spec == relay.login and "Date" in head and "Message-ID" in head


def test_local_recipients_without_an_alias_reach_the_login_by_default(shim_factory, relay):
    shim = shim_factory(relay, SENDMAIL_SHIM_DELIVERY="interactive", SMTP_ALIASES="root:ops@example.com")
    result = shim.run("-bs", stdin=session(b"HELO x", b"MAIL FROM:<>", b"RCPT TO:<www-data>", b"RCPT TO:<root>",
                                           b"DATA", MESSAGE + b".\r\n", b"QUIT"))
    assert codes(result) == ["220", "250", "250", "250", "250", "354", "250", "221"]
    [msg] = relay.messages
    assert msg.rcpt_tos == [relay.login, "ops@example.com"]
    head = email.message_from_bytes(msg.data, policy=email.policy.default)
    assert head.get_all("X-Original-To") == ["www-data", "root"]


def test_a_configuration_error_is_the_greeting(shim):
    """Symfony shows only what it reads on stdout: the reason must be there, not just on stderr."""
    shim.config_file.write_text("SMTP_HOSTT=typo\n")
    result = shim.run("-bs", stdin=b"HELO x\r\nQUIT\r\n", expect_exit=EX_CONFIG)
    [greeting] = result.stdout.decode().splitlines()
    assert greeting.startswith("421 4.3.0 sendmail-shim: ") and "unknown key SMTP_HOSTT" in greeting
    assert "unknown key SMTP_HOSTT" in result.stderr
