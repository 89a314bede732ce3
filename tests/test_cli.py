"""End to end: the real console script, piped a message, talking to the real test relay."""

import grp
import os
import re
import shutil
import socket
import stat
import subprocess

import pytest

from tests.faults import wait_idle
from tests.relay import RELAY_PASSWORD
from tests.shim import OUTPUTS, SHIM, SHIM_PYTHON, wait_for
from sendmail_shim.errors import (
    EX_CONFIG, EX_DATAERR, EX_NOPERM, EX_TEMPFAIL, EX_UNAVAILABLE, EX_USAGE,
)

pytestmark = pytest.mark.e2e

PHP_MAIL = (
    "To: bob@example.com, Two <two@example.com>\r\n"
    "Subject: 欢迎注册 DokuWiki\r\n"
    "From: 网站 <www-data@web1.local>\r\n"
    "Cc: carol@example.com\r\n"
    "Bcc: secret-bcc@example.com\r\n"
    "\r\n"
    "line1\n.\n..dots\n中文正文\nlast line\r\n"
).encode()


def headers_of(data: bytes) -> str:
    return data.split(b"\r\n\r\n", 1)[0].decode().replace("\r\n", "\n")


def test_php_mail_is_delivered_with_sender_equal_to_login(shim, relay):
    result = shim.run("-t", "-i", "-fwww-data@web1.local", stdin=PHP_MAIL)
    assert (result.stdout, result.stderr) == (b"", "")
    [msg] = relay.messages
    assert msg.mail_from == relay.login and msg.login == relay.login and msg.tls
    assert msg.rcpt_tos == ["bob@example.com", "two@example.com", "carol@example.com", "secret-bcc@example.com"]
    assert "BODY=8BITMIME" in msg.mail_options
    head = headers_of(msg.data)
    assert "secret-bcc" not in msg.data.decode()
    assert re.search(r"^From: =\?utf-8\?[bq]\?.*\?= <alice@163\.test>$", head, re.M | re.I)
    assert "Reply-To: =?utf-8?b?572R56uZ?= <www-data@web1.local>" in head
    assert "Subject: 欢迎注册 DokuWiki" in head  # raw UTF-8 header passes byte for byte
    assert re.search(r"^Date: ", head, re.M) and re.search(r"^Message-ID: <.+@163\.test>$", head, re.M)
    assert msg.data.endswith(b"\r\n\r\nline1\r\n.\r\n..dots\r\n" + "中文正文".encode() + b"\r\nlast line\r\n")
    log = [line.split(" ", 2)[2] for line in shim.log_lines()]  # without the time stamp and the host
    msg_id = re.match(r"sendmail-shim/pickup\[\d+\]: ([0-9A-F]{16}): ", log[0]).group(1)
    pid = re.match(r"\S+\[(\d+)\]", log[0]).group(1)  # -odi: one process logs it all
    message_id = re.search(r"^Message-ID: (<.+>)$", head, re.M).group(1)
    recipients = ["bob@example.com", "two@example.com", "carol@example.com", "secret-bcc@example.com"]
    assert log[:3] == [  # the sender asked for (-f), then the one used (the login)
        f"sendmail-shim/pickup[{pid}]: {msg_id}: uid={os.getuid()} from=<www-data@web1.local>",
        f"sendmail-shim/cleanup[{pid}]: {msg_id}: message-id={message_id}",
        f"sendmail-shim/qmgr[{pid}]: {msg_id}: from=<{relay.login}>, size={len(msg.data)}, nrcpt=4 (queue active)",
    ]
    for line, recipient in zip(log[3:7], recipients, strict=True):
        assert re.fullmatch(rf"sendmail-shim/smtp\[{pid}\]: {msg_id}: to=<{recipient}>, "
                            rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{relay.port}, delay=[\d.]+, delays=[\d./]+, "
                            r"dsn=2\.0\.0, status=sent \(250 .*\)", line), line
    assert log[7:] == [f"sendmail-shim/qmgr[{pid}]: {msg_id}: removed"]


def test_default_mode_answers_at_once_and_delivers_in_the_background(shim_factory, relay):
    shim = shim_factory(relay)  # SENDMAIL_SHIM_DELIVERY unset: background
    result = shim.run("-t", "-i", stdin=PHP_MAIL)
    assert (result.stdout, result.stderr) == (b"", "")
    wait_for(lambda: len(relay.messages) == 1)
    wait_for(lambda: any("status=sent" in ln for ln in shim.log_lines()))
    wait_for(lambda: not list((shim.queue_dir / "queue").iterdir()))


@pytest.mark.parametrize("args, stdin, code, text", [
    (["-t"], b"Subject: nobody\n\nbody\n", EX_USAGE, "no recipients"),
    (["-i", "a@example.com\tb"], b"Subject: x\n\nbody\n", EX_DATAERR, "control characters"),
    (["-i", "-f" + "f" * 400, "a@example.com"], b"Subject: x\n\nbody\n", EX_DATAERR, "-f is too long"),
    (["-i", "a" * 400 + "@example.com"], b"Subject: x\n\nbody\n", EX_DATAERR, "too long"),
    (["-t", "-i"], b"To: a@example.com\n\nnul\0byte\n", EX_DATAERR, "NUL"),
], ids=["no-recipient-field", "control-character", "long-sender", "too-long", "nul"])
def test_default_mode_still_refuses_what_needs_no_header_parsing(shim_factory, relay, args, stdin, code, text):
    shim = shim_factory(relay)  # background: the caller does not parse addresses
    result = shim.run(*args, stdin=stdin, expect_exit=code)
    assert text in result.stderr and result.stderr.count("\n") == 1
    wait_idle(shim.config_file)
    assert relay.messages == [] and not shim.queue_dir.exists()  # refused before anything was written


def test_default_mode_reports_a_missing_sender_at_once(shim_factory, relay):
    shim = shim_factory(relay, password=None, SMTP_USER=None)
    result = shim.run("-t", "-i", stdin=PHP_MAIL, expect_exit=EX_CONFIG)
    assert "SMTP_USER" in result.stderr and result.stderr.count("\n") == 1
    assert not shim.queue_dir.exists()


@pytest.mark.slow
def test_default_mode_refuses_a_message_the_maildrop_cannot_take(shim_factory, relay):
    shim = shim_factory(relay)
    big = b"Subject: big\n\n" + (b"x" * 76 + b"\n") * (65 * 1024 * 1024 // 77)  # 65 MiB, 66 with CRLF
    result = shim.run("-i", "bob@example.org", stdin=big, expect_exit=EX_DATAERR)
    assert "larger than 64 MiB" in result.stderr and result.stderr.count("\n") == 1
    wait_idle(shim.config_file)
    assert relay.messages == [] and not any(p.is_file() for p in shim.queue_dir.rglob("*"))


@pytest.mark.parametrize("args, stdin, settings, reason", [
    (["-i", "bad@@example.com"], b"Subject: x\n\nbody\n", {}, "cannot parse recipient"),
    (["-t", "-i"], b"To: ,\nSubject: x\n\nbody\n", {}, "no recipients"),
    (["-i", "www-data"], b"Subject: x\n\nbody\n", {"SMTP_LOCAL_MAIL": "refuse"}, "has no alias"),
    (["-t", "-i"], PHP_MAIL, {"SMTP_FROM_POLICY": "reject"}, "differs from the login"),
], ids=["bad-address", "empty-to", "no-alias", "from-reject"])
def test_default_mode_reports_a_header_policy_refusal_by_mail(shim_factory, relay, args, stdin, settings, reason):
    """-odb leaves the header policy to the background pickup: the caller hears 0, the message is
    kept in corrupt/ and the login gets a notice with the reason and the original headers."""
    shim = shim_factory(relay, **settings)
    result = shim.run(*args, stdin=stdin)
    assert (result.exit_code, result.stderr) == (0, "")
    wait_idle(shim.config_file)
    [notice] = relay.messages
    assert notice.rcpt_tos == [relay.login] and notice.mail_from == relay.login
    text = notice.data.decode()
    assert "Content-Type: multipart/mixed" in text and "not accepted for delivery" in text and reason in text
    assert "Subject: x" in text or "Subject: 欢迎注册" in text  # the original headers
    [kept] = list((shim.queue_dir / "corrupt").iterdir())
    assert kept.read_bytes().split(b"\r\n")[0] == stdin.split(b"\n")[0].rstrip(b"\r")  # as the caller wrote it
    log = shim.log_lines()  # Postfix's pickup line with the submitter, then cleanup's reject
    [picked] = [line for line in log if "/pickup[" in line]
    msg_id = re.search(rf"\]: ([0-9A-F]{{16}}): uid={os.getuid()} from=<", picked).group(1)
    assert any("/cleanup[" in line and f"]: {msg_id}: reject: header " in line and reason in line
               and line.endswith(f"; from=<{relay.login}>: 5.7.1 message content rejected") for line in log)
    assert any(f"]: {msg_id}: sender non-delivery notification: " in line for line in log)
    assert not list((shim.queue_dir / "queue").iterdir()) and not list((shim.queue_dir / "maildrop").iterdir())


def test_relay_down_queues_then_q_delivers(shim_factory, relay):
    shim = shim_factory(relay, SENDMAIL_SHIM_DELIVERY="interactive", SMTP_PORT="1")
    result = shim.run("-t", "-i", stdin=PHP_MAIL)
    assert "queued for retry" in result.stderr and result.stderr.count("\n") == 1
    assert relay.messages == []
    listing = shim.run("-bp").stdout.decode()
    assert "bob@example.com" in listing
    shim.write_config({**shim.settings, "SMTP_PORT": str(relay.port)})
    shim.run("--retry", "all")
    shim.run("-q")
    assert len(relay.messages) == 1
    assert not list((shim.queue_dir / "queue").iterdir())
    assert any("status=sent" in ln for ln in shim.log_lines())


def test_direct_mode_relay_down_exits_75(shim_factory, relay):
    shim = shim_factory(relay, SENDMAIL_SHIM_DELIVERY="direct", SMTP_PORT="1")
    result = shim.run("-t", "-i", stdin=PHP_MAIL, expect_exit=EX_TEMPFAIL)
    assert result.stderr.startswith("sendmail-shim: ") and "connect" in result.stderr
    assert result.stderr.count("\n") == 1


def test_direct_mode_delivers(shim_factory, relay):
    shim = shim_factory(relay, SENDMAIL_SHIM_DELIVERY="direct")
    shim.run("-i", "bob@example.com", stdin=b"Subject: direct\n\nhello\n")
    assert relay.messages[0].rcpt_tos == ["bob@example.com"]


def test_reject_policy_refuses_before_connecting(shim_factory, relay):
    shim = shim_factory(relay, SENDMAIL_SHIM_DELIVERY="interactive", SMTP_FROM_POLICY="reject")
    result = shim.run("-t", "-i", stdin=PHP_MAIL, expect_exit=EX_NOPERM)
    assert "www-data@web1.local" in result.stderr and relay.login in result.stderr
    assert relay.commands == [] and relay.messages == []
    assert not (shim.queue_dir / "queue").exists() or not list((shim.queue_dir / "queue").iterdir())


@pytest.mark.parametrize("args, stdin, code, text", [
    (["-t"], b"Subject: nobody\n\nbody\n", EX_USAGE, "no recipients"),
    (["-i", "bad@@example.com"], b"Subject: x\n\nbody\n", EX_DATAERR, "bad@@example.com"),
    (["-t", "-i"], b"To: a@example.com\n\nnul\0byte\n", EX_DATAERR, "NUL"),
    (["-Z"], b"", EX_USAGE, "unknown option -Z"),
    (["-t", "-i", "-X", "/var/www/x.php"], b"To: a@example.com\n\nx\n", EX_USAGE, "refusing -X"),
], ids=["no-recipient", "bad-address", "nul", "unknown-flag", "cve-2016-10033"])
def test_refusals_exit_with_sysexits_and_one_line(shim, relay, args, stdin, code, text):
    result = shim.run(*args, stdin=stdin, expect_exit=code)
    assert text in result.stderr and result.stderr.count("\n") == 1 and result.stdout == b""
    assert relay.messages == []


def test_local_names_go_through_aliases_like_cron(shim_factory, relay):
    shim = shim_factory(relay, SENDMAIL_SHIM_DELIVERY="interactive", SMTP_ALIASES="root:admin@example.com")
    cron = b"From: root (Cron Daemon)\nTo: root\nSubject: Cron <root@host> ls\n\n.\nafter\n"
    shim.run("-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root", stdin=cron, env={"PATH": "/usr/bin:/bin"})
    [msg] = relay.messages
    assert msg.rcpt_tos == ["admin@example.com"]
    assert "From: Cron Daemon <alice@163.test>" in headers_of(msg.data)
    assert msg.data.endswith(b"\r\n\r\n.\r\nafter\r\n")


def test_missing_alias_is_refused_with_smtp_local_mail_refuse(shim_factory, relay):
    shim = shim_factory(relay, SENDMAIL_SHIM_DELIVERY="interactive", SMTP_LOCAL_MAIL="refuse")
    result = shim.run("-i", "www-data", stdin=b"x\n", expect_exit=EX_DATAERR)
    assert "has no alias" in result.stderr and "SMTP_ALIASES" in result.stderr and relay.messages == []


def test_a_local_name_without_alias_reaches_the_login_by_default(shim, relay):
    shim.run("-i", "www-data", stdin=b"x\n")
    [msg] = relay.messages
    assert msg.rcpt_tos == [relay.login] and msg.data.startswith(b"X-Original-To: www-data\r\n")
    assert any(": info: local recipient <www-data> delivered to " in line for line in shim.log_lines())


def test_dot_ends_the_message_without_dash_i(shim, relay):
    shim.run("bob@example.com", stdin=b"Subject: dots\n\n..leading\n.\nnot sent\n")
    assert relay.messages[0].data.endswith(b"\r\n\r\n.leading\r\n")


def test_verbose_transcript_is_redacted(shim, relay):
    result = shim.run("-v", "-i", "bob@example.com", stdin=b"Subject: v\n\nx\n")
    assert "C: AUTH" in result.stderr and "***" in result.stderr
    assert "S: 235" in result.stderr


def test_wrong_password_keeps_the_message_and_says_why(shim_factory, relay):
    shim = shim_factory(relay, password="not-the-code", SENDMAIL_SHIM_DELIVERY="interactive")
    result = shim.run("-i", "bob@example.com", stdin=b"Subject: x\n\nx\n")
    assert "queued for retry" in result.stderr and "535" in result.stderr
    assert sum(c.startswith("AUTH") for c in relay.commands) == 1


def test_wrong_password_direct_exits_77(shim_factory, relay):
    shim = shim_factory(relay, password="not-the-code", SENDMAIL_SHIM_DELIVERY="direct")
    result = shim.run("-i", "bob@example.com", stdin=b"Subject: x\n\nx\n", expect_exit=EX_NOPERM)
    assert "535" in result.stderr and "--set-password" in result.stderr


def test_untrusted_certificate_direct_exits_69(shim_factory, relay_factory):
    relay = relay_factory(cert="untrusted")
    shim = shim_factory(relay, SENDMAIL_SHIM_DELIVERY="direct")
    result = shim.run("-i", "bob@example.com", stdin=b"x\n", expect_exit=EX_UNAVAILABLE)
    assert "SMTP_CA_FILE" in result.stderr
    assert not any(c.startswith("AUTH") for c in relay.commands)


def test_missing_password_exits_78_with_the_fix(shim_factory, relay):
    shim = shim_factory(relay, password=None, SENDMAIL_SHIM_DELIVERY="direct")
    result = shim.run("-i", "bob@example.com", stdin=b"x\n", expect_exit=EX_CONFIG)
    assert "--set-password" in result.stderr


def test_set_password_makes_an_owner_only_file(shim):
    st = os.stat(shim.credentials_file)
    try:
        service_gid = grp.getgrnam("sendmail-shim").gr_gid
    except KeyError:
        service_gid = None
    if os.geteuid() == 0 and service_gid is not None:  # root writes the system-style file
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o640, service_gid)
    else:
        assert stat.S_IMODE(st.st_mode) == 0o600
    assert RELAY_PASSWORD.encode() not in shim.run("--delete-password").stdout
    result = shim.run("-i", "x@example.com", stdin=b"x\n", env={"SENDMAIL_SHIM_DELIVERY": "direct"},
                      expect_exit=EX_CONFIG)
    assert "no password stored" in result.stderr


def test_unknown_config_key_names_file_and_line(shim):
    shim.config_file.write_text("SMTP_HOST=127.0.0.1\nSMTP_HOSTT=typo\n")
    result = shim.run("-i", "x@example.com", stdin=b"x\n", expect_exit=EX_CONFIG)
    assert f"{shim.config_file}:2: unknown key SMTP_HOSTT" in result.stderr


def test_check_reports_every_step_and_a_verdict(shim, relay):
    out = shim.run("--check").stdout.decode()
    assert "TLS: TLS" in out and "verified" in out
    assert "AUTH: PLAIN accepted" in out
    assert "sender check: 250" in out
    assert out.rstrip().splitlines()[-1].startswith("verdict: OK")
    assert relay.messages == []
    shim.run("--check", "--to", "bob@example.com")
    assert relay.messages[0].rcpt_tos == ["bob@example.com"]


def test_check_with_wrong_password_gives_the_hint(shim_factory, relay):
    shim = shim_factory(relay, password="wrong", SMTP_PROVIDER="163", SMTP_HOST="127.0.0.1",
                        SMTP_PORT=str(relay.port))
    result = shim.run("--check", expect_exit=EX_NOPERM)
    verdict = result.stdout.decode().rstrip().splitlines()[-1]
    assert verdict.startswith("verdict: FAILED") and "535" in verdict and "授权码" in verdict


def test_bs_mode_speaks_smtp_on_stdin_stdout(shim, relay):
    session = (
        b"HELO [127.0.0.1]\r\nMAIL FROM:<app@example.com>\r\nRCPT TO:<bob@example.com>\r\n"
        b"RCPT TO:<bcc@example.com>\r\nDATA\r\nFrom: App <app@example.com>\r\nSubject: bs\r\n\r\n"
        b"..leading dot\r\nbody\r\n.\r\nNOOP\r\nQUIT\r\n"
    )
    replies = shim.run("-bs", stdin=session).stdout.decode().splitlines()
    codes = [r[:3] for r in replies]
    assert codes == ["220", "250", "250", "250", "250", "354", "250", "250", "221"]
    [msg] = relay.messages
    assert msg.rcpt_tos == ["bob@example.com", "bcc@example.com"] and msg.mail_from == relay.login
    assert msg.data.endswith(b"\r\n\r\n.leading dot\r\nbody\r\n")


def test_version_and_help_and_newaliases(shim):
    assert shim.run("--version").stdout.startswith(b"sendmail-shim ")
    assert b"usage:" in shim.run("--help").stdout
    assert shim.run("-bi").stdout == b""


def test_a_caller_that_ignores_sigchld_still_gets_0_once(shim_factory, relay):
    """Linux keeps SIG_IGN for SIGCHLD across exec: waiting for the middle child then fails,
    after the message is queued — the caller must still hear 0, or its retry sends a copy."""
    import signal
    import subprocess

    from tests.shim import SHIM, SHIM_PYTHON

    shim = shim_factory(relay)  # background mode
    proc = subprocess.run([SHIM_PYTHON, str(SHIM), "-t", "-i"], input=PHP_MAIL, capture_output=True,
                          env=shim.env, preexec_fn=lambda: signal.signal(signal.SIGCHLD, signal.SIG_IGN))
    assert (proc.returncode, proc.stderr) == (0, b"")
    wait_for(lambda: len(relay.messages) == 1)


def test_interactive_partial_refusal_is_reported_by_mail_not_by_exit_status(shim_factory, relay):
    relay.refuse["gone@example.com"] = "550 5.1.1 no such user"
    relay.refuse["later@example.com"] = "451 4.3.0 try again"
    shim = shim_factory(relay, SENDMAIL_SHIM_DELIVERY="interactive")
    result = shim.run("-i", "gone@example.com", "later@example.com", stdin=b"Subject: partial\n\nx\n")
    assert "queued for retry" in result.stderr  # later@ is kept; gone@ gets a failure report
    reports = [m for m in relay.messages if m.rcpt_tos == [relay.login]]
    assert len(reports) == 1 and b"gone@example.com" in reports[0].data
    assert any("status=bounced" in line and "gone@example.com" in line for line in shim.log_lines())


def test_8bit_message_to_a_relay_without_8bitmime_is_sent_and_logged(shim_factory, relay_factory):
    relay = relay_factory(eightbitmime=False)
    shim = shim_factory(relay)
    shim.run("-odq", "-t", "-i", stdin=PHP_MAIL)  # a UTF-8 subject and body
    shim.run("-q")
    assert len(relay.messages) == 1 and "BODY=8BITMIME" not in relay.messages[0].mail_options
    assert any("warning:" in line and "does not offer 8BITMIME" in line for line in shim.log_lines())


# The shim's own mount namespace, where /dev is a small tmpfs with the device nodes Python needs and
# /dev/log is the test's datagram socket: syslog output is read without touching the machine's.
PRIVATE_DEV_LOG = r'''
set -e
mkdir -p "$0.dev"
mount --bind /dev "$0.dev"
mount -t tmpfs -o size=64k,mode=755 tmpfs /dev
for node in null zero random urandom; do touch /dev/$node; mount --bind "$0.dev/$node" /dev/$node; done
touch /dev/log
mount --bind "$0" /dev/log
exec "$@"
'''


def syslog_datagrams(shim, tmp_path, count: int, *args: str, stdin: bytes) -> list[str]:
    """The first `count` datagrams the real console script sends to /dev/log (a private one)."""
    dev_log = tmp_path / "log"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(dev_log))
        server.settimeout(15)
        proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", PRIVATE_DEV_LOG,
                               str(dev_log), SHIM_PYTHON, str(SHIM), *args],
                              input=stdin, capture_output=True, env=shim.env, timeout=60)
        assert (proc.returncode, proc.stderr) == (0, b"")
        lines = [server.recv(4096).decode() for _ in range(count)]
    OUTPUTS.extend(lines)  # the session's leak scan reads them too
    return lines


SYSLOG_LINE = re.compile(r"<(\d+)>\w{3} [ \d]\d \d\d:\d\d:\d\d sendmail-shim/(\w+)\[\d+\]: ")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="a private /dev/log needs root")
def test_syslog_gets_one_mail_facility_line_per_event(shim_factory, relay, tmp_path, relay_password):
    """Each event under the syslog name of the Postfix program that logs it (pflogsumm
    --syslog-name=sendmail-shim), from the detached -odb child too."""
    shim = shim_factory(relay, SENDMAIL_SHIM_SYSLOG="yes", SENDMAIL_SHIM_LOG_FILE=None)
    lines = syslog_datagrams(shim, tmp_path, 8, "-t", "-i", stdin=PHP_MAIL)
    assert len(relay.messages) == 1
    heads = [SYSLOG_LINE.match(line) for line in lines]
    assert all(heads), lines
    # <22>: facility mail (2), severity info (6)
    assert [(h.group(1), h.group(2)) for h in heads] == [
        ("22", "pickup"), ("22", "cleanup"), ("22", "qmgr"), *[("22", "smtp")] * 4, ("22", "qmgr")]
    assert all(re.match(r"[0-9A-F]{16}: ", line[h.end():]) for line, h in zip(lines, heads, strict=True))
    assert f"from=<{relay.login}>, size=" in lines[2] and ", nrcpt=4 (queue active)" in lines[2]
    assert all(", status=sent (250 " in line for line in lines[3:7]) and lines[7].endswith(": removed")
    assert not any(relay_password in line for line in lines)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="a private /dev/log needs root")
def test_syslog_gets_warnings_at_priority_warning(shim_factory, relay_factory, tmp_path):
    relay = relay_factory(cert="untrusted")
    shim = shim_factory(relay, SENDMAIL_SHIM_SYSLOG="yes", SENDMAIL_SHIM_LOG_FILE=None, SMTP_TLS_VERIFY="no",
                        SMTP_CA_FILE=None, SENDMAIL_SHIM_DELIVERY="interactive")
    lines = syslog_datagrams(shim, tmp_path, 4, "-i", "bob@example.com", stdin=b"Subject: unverified\n\nx\n")
    [warning] = [line for line in lines if " warning: " in line]
    assert SYSLOG_LINE.match(warning).groups() == ("20", "smtp")  # mail (2) × 8 + warning (4)
    assert ": warning: TLS certificate of " in warning and "SMTP_TLS_VERIFY=no" in warning


def test_tls_verification_off_warns_in_the_log_of_a_queue_run(shim_factory, relay_factory):
    relay = relay_factory(cert="untrusted")
    shim = shim_factory(relay, SMTP_TLS_VERIFY="no", SMTP_CA_FILE=None)
    shim.run("-odq", "-i", "bob@example.com", stdin=b"Subject: unverified\n\nx\n")
    shim.run("-q")
    assert len(relay.messages) == 1
    assert any("warning:" in line and "SMTP_TLS_VERIFY" in line for line in shim.log_lines())
