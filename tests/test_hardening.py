"""Hardening: crashes at every step, parallel submissions racing queue runners and background
deliveries, a full or read-only disk, hostile command lines and messages (header injection, the
CVE-2016-10033 family, SMTP smuggling), `-bs` abuse, password commands that misbehave, loose
file modes and hostile maildrop files. Everything is counted at the real relay, by Message-ID."""

import hashlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import time
import uuid

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from sendmail_shim import cli, credstore
from sendmail_shim import config as config_module
from sendmail_shim.envelope import Envelope
from sendmail_shim.errors import (
    EX_CANTCREAT, EX_CONFIG, EX_DATAERR, EX_NOUSER, EX_OK, EX_TEMPFAIL, EX_USAGE,
)
from sendmail_shim.queue import Queue
from sendmail_shim.pickup import accept as accept_drop, empty_maildrop
from sendmail_shim.secret import Secret
from sendmail_shim.smtp import Relay
from tests.faults import COUNTS, wait_idle
from tests.relay import RELAY_LOGIN
from tests.shim import OUTPUTS, SHIM, SHIM_PYTHON

SYSEXITS = {0, *range(64, 79)}
LOGIN = RELAY_LOGIN


def mail(message_id: str | None = None, to: str = "bob@example.org", body: bytes = b"hello\n") -> bytes:
    message_id = message_id or f"<{uuid.uuid4().hex}@hardening.test>"
    return f"To: {to}\nSubject: hardening\nMessage-ID: {message_id}\n\n".encode() + body


def copies(relay, message_id: str) -> int:
    field = f"\r\nMessage-ID: {message_id}\r\n".encode()
    return sum(field in b"\r\n" + m.data.split(b"\r\n\r\n", 1)[0] + b"\r\n" for m in relay.messages)


def queue_ids(shim, state: str = "queue") -> list[str]:
    directory = shim.queue_dir / state
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


@pytest.fixture
def fast_shim(shim_factory, relay, relay_password):
    """`shim_factory` with the password stored directly (one subprocess less per shim)."""
    def make(target=relay, **overrides):
        shim = shim_factory(target, password=None, **overrides)
        credstore.Store(str(shim.credentials_file)).set("sendmail-shim", target.login, relay_password)
        return shim
    return make


class InProcess:
    """`cli.main` in this process, for the property tests (the console script costs ~0.1 s a run)."""

    def __init__(self, shim, **env):
        self.shim = shim
        self.environ = {**shim.env, **env}

    def run(self, *argv: str, stdin: bytes = b"", env: dict | None = None) -> tuple[int, bytes, str]:
        stdout, stderr = io.TextIOWrapper(io.BytesIO(), encoding="utf-8"), io.StringIO()
        code = cli.main(["sendmail-shim", *argv], stdin=io.BufferedReader(io.BytesIO(stdin)), stdout=stdout,
                        stderr=stderr, environ={**self.environ, **(env or {})})
        stdout.flush()
        OUTPUTS.append(stderr.getvalue())
        return code, stdout.buffer.getvalue(), stderr.getvalue()


# -- crashes ---------------------------------------------------------------------------------------

CRASHES = [  # (step, mode, delivered copies after the restart)
    ("spool-written", "-odq", 0),  # the caller got no 0: nothing may be queued
    ("spool-synced", "-odq", 0),
    ("spool-committed", "-odq", 1),  # durable before the caller could hear of it: delivered once
    ("deliver-locked", "-odi", 1),
    ("deliver-sent", "-odi", 2),  # the relay said 250, the state was not written: the documented duplicate
    ("deliver-recorded", "-odi", 1),
    ("deliver-locked", "-odb", 1),  # the caller got 0 and the background child died
    ("deliver-sent", "-odb", 2),
    ("deliver-recorded", "-odb", 1),
]


@pytest.mark.e2e
@pytest.mark.parametrize("step, mode, expected", CRASHES, ids=[f"{s}{m}" for s, m, _ in CRASHES])
def test_sigkill_at_every_step_then_restart(fast_shim, relay, step, mode, expected):
    shim = fast_shim()
    message_id = f"<{uuid.uuid4().hex}@crash.test>"
    result = shim.run(mode, "-i", "bob@example.org", stdin=mail(message_id), expect_exit=None,
                      env={"SENDMAIL_SHIM_TEST_CRASH": step})
    if mode == "-odb":
        assert result.exit_code == 0  # the caller is told only once the message is on disk
        wait_idle(shim.config_file)
    else:
        assert result.exit_code == -signal.SIGKILL
    shim.run("--retry", "all")
    shim.run("-q")  # the restart
    assert copies(relay, message_id) == expected
    assert queue_ids(shim) == [] and queue_ids(shim, "failed") == []
    queue = Queue(str(shim.queue_dir))
    queue.clean_tmp(grace=0)  # what a later run does to a dead writer's leftovers
    assert queue_ids(shim, "tmp") == []  # nothing half-written survives
    if step == "deliver-sent":
        assert any("status=sent" in line for line in shim.log_lines())
    COUNTS["crash points"] += 1


# -- concurrency -----------------------------------------------------------------------------------


@pytest.mark.e2e
def test_hundred_parallel_submissions_three_runners_and_background_deliveries(fast_shim, relay, tmp_path):
    shim = fast_shim()
    stop = tmp_path / "stop"
    command = [SHIM_PYTHON, str(SHIM)]
    loop = f'while [ ! -e "{stop}" ]; do "$@" -q || exit 1; done; "$@" -q'
    runners = [subprocess.Popen(["/bin/sh", "-c", loop, "runner", *command], env=shim.env, cwd=shim.home,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(3)]
    ids = [f"<{uuid.uuid4().hex}@parallel.test>" for _ in range(100)]
    submitters = [subprocess.Popen([*command, "-odb" if n % 2 else "-odq", "-i", f"r{n}@example.org"],
                                   env=shim.env, cwd=shim.home, stdin=subprocess.PIPE,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                  for n in range(100)]
    for proc, message_id in zip(submitters, ids, strict=True):
        proc.stdin.write(mail(message_id))
        proc.stdin.close()
    for proc in submitters:
        assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()
        OUTPUTS.append(proc.stderr.read().decode())
        proc.stderr.close()
    stop.touch()
    for proc in runners:
        assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()
        OUTPUTS.append(proc.stderr.read().decode())
        proc.stderr.close()
    wait_idle(shim.config_file, timeout=60)
    shim.run("-q")  # whatever a runner skipped while a background delivery held it
    assert {message_id: copies(relay, message_id) for message_id in ids} == {message_id: 1 for message_id in ids}
    assert len(relay.messages) == 100 and queue_ids(shim) == [] and queue_ids(shim, "tmp") == []
    assert sum("status=sent" in line for line in shim.log_lines()) == 100
    COUNTS["parallel submissions"] += 100
    COUNTS["parallel queue runners"] += 3


def test_smtp_deadline_is_per_message_not_per_connection(relay, relay_password):
    """A queue run sends many messages over one connection: each gets the whole SMTP_DEADLINE."""
    settings = relay.config_env(SMTP_DEADLINE="0.5")
    relay_ = Relay(config_module.build(settings, {}), lambda: Secret(relay_password))
    data = mail().replace(b"\n", b"\r\n")  # as spooled: CRLF
    envelope = Envelope(sender=LOGIN, recipients=["bob@example.org"], size=len(data))
    with relay_:
        relay_.send(envelope, io.BytesIO(data))
        time.sleep(0.6)  # longer than the deadline, between two messages
        relay_.send(envelope, io.BytesIO(data))
    assert len(relay.messages) == 2


# -- a full or read-only disk ----------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs; `remount(ro=True)` makes it read-only."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mount_point)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")

    def remount(ro: bool):
        subprocess.run(["mount", "-o", f"remount,{'ro' if ro else 'rw'}", str(mount_point)], check=True)

    yield mount_point, remount
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


@pytest.mark.e2e
def test_disk_full_and_read_only_queue(fast_shim, relay, small_disk):
    small_disk, remount = small_disk
    shim = fast_shim(SENDMAIL_SHIM_QUEUE_DIR=str(small_disk / "spool"))
    shim.run("-odq", "-i", "bob@example.org", stdin=mail())  # a small one fits
    big = mail(body=os.urandom(400_000).hex().encode() + b"\n")
    result = shim.run("-odq", "-i", "bob@example.org", stdin=big, expect_exit=EX_CANTCREAT)
    assert result.stderr == "sendmail-shim: cannot write to the queue: No space left on device\n"
    spool = small_disk / "spool"
    assert len(os.listdir(spool / "queue")) == 1 and os.listdir(spool / "tmp") == []  # nothing half-written

    remount(ro=True)
    try:
        result = shim.run("-odq", "-i", "bob@example.org", stdin=mail(), expect_exit=EX_CANTCREAT)
        assert result.stderr.startswith("sendmail-shim: cannot write to the queue")
        assert "Read-only file system" in result.stderr
        assert result.stderr.count("\n") == 1
    finally:
        remount(ro=False)
    assert len(os.listdir(spool / "queue")) == 1 and os.listdir(spool / "maildrop-tmp") == []
    shim.run("-q")
    assert len(relay.messages) == 1
    COUNTS["disk faults"] += 2


@pytest.mark.e2e
def test_direct_mode_with_a_full_tmpdir_exits_73(fast_shim, relay, small_disk):
    small_disk, _ = small_disk
    shim = fast_shim(SENDMAIL_SHIM_DELIVERY="direct")
    big = mail(body=os.urandom(400_000).hex().encode() + b"\n")
    result = shim.run("-i", "bob@example.org", stdin=big, expect_exit=EX_CANTCREAT,
                      env={"TMPDIR": str(small_disk)})
    assert result.stderr == "sendmail-shim: cannot write the message to a temporary file: No space left on device\n"
    assert relay.messages == [] and os.listdir(small_disk) == []
    COUNTS["disk faults"] += 1


# -- hostile command lines and headers ---------------------------------------------------------------

INJECTIONS = [
    ["-fevil@x.test\r\nBcc: victim@evil.test", "bob@example.org"],
    ["-fevil@x.test\nX-Injected: yes", "bob@example.org"],
    ["-FName\r\nBcc: victim@evil.test", "bob@example.org"],
    ["-FName\nX-Injected: yes\n\nbody", "bob@example.org"],
    ["-FName\0X-Injected: yes", "bob@example.org"],
    ["-F" + "N" * 5000, "bob@example.org"],
    ["-f" + "a" * 5000 + "@x.test", "bob@example.org"],
    ["bob@example.org\r\nRCPT TO:<victim@evil.test>"],
    ["bob@example.org\nX-Injected: yes"],
    ["bob@example.org\0victim@evil.test"],
    ["<bob@example.org>\r\nDATA"],
    ["a" * 2000 + "@example.org"],
]


def assert_not_injected(relay) -> None:
    assert not any("victim" in command or "X-Injected" in command or command.startswith("DATA ")
                   for command in relay.commands)
    for received in relay.messages:
        assert received.mail_from == LOGIN and all("victim" not in r for r in received.rcpt_tos)
        head = received.data.split(b"\r\n\r\n", 1)[0]
        lines = head.split(b"\r\n")
        assert not any(line.lower().startswith((b"bcc:", b"x-injected:")) for line in lines)
        assert all(len(line) <= 998 for line in received.data.split(b"\r\n"))
        assert sum(line.lower().startswith(b"from:") for line in lines) == 1


@pytest.fixture
def direct(fast_shim, relay):
    return InProcess(fast_shim(SENDMAIL_SHIM_DELIVERY="direct"))


@pytest.mark.parametrize("argv", INJECTIONS, ids=range(len(INJECTIONS)))
def test_header_and_command_injection_through_argv(direct, relay, argv):
    code, stdout, stderr = direct.run("-i", *argv, stdin=mail())
    assert code in (EX_OK, EX_DATAERR, EX_USAGE, EX_NOUSER) and stdout == b""  # 67: the relay refused it
    assert code != EX_OK or len(relay.messages) == 1
    assert "Traceback" not in stderr and stderr.count("\n") <= 1
    assert_not_injected(relay)
    COUNTS["hostile inputs"] += 1


@pytest.mark.parametrize("alias", [
    "root:admin@example.org\r\nRCPT TO:<victim@evil.test>", "root:admin@example.org\nX-Injected: yes",
    "root:admin@example.org\0victim@evil.test", "root:" + "a" * 3000 + "@example.org",
])
def test_alias_values_cannot_inject(direct, relay, alias):
    code, _, stderr = direct.run("-i", "root", stdin=mail(to="root"), env={"SENDMAIL_SHIM_SMTP_ALIASES": alias})
    assert code in (EX_OK, EX_DATAERR, EX_CONFIG, EX_NOUSER) and "Traceback" not in stderr
    assert_not_injected(relay)
    COUNTS["hostile inputs"] += 1


@pytest.mark.e2e
@pytest.mark.parametrize("argv, exit_code", [
    (["-X{dir}/x.php", "-t", "-i"], EX_USAGE),
    (["-t", "-i", "-X", "{dir}/x.php"], EX_USAGE),
    (["-C{dir}/x.cf", "-t"], EX_USAGE),
    (["-t", "-i", "-oQ{dir}", "-OQueueDirectory={dir}"], EX_OK),
    # PHP mail()'s 5th argument after escapeshellcmd, the CVE-2016-10033 exploit
    (['-fattacker\\', "-oQ{dir}/", "-X{dir}/x.php", 'some"@email.com', "-t", "-i"], EX_USAGE),
    # the same exploit arriving as one word (escapeshellarg, then escapeshellcmd)
    (['-f\'attacker\\" -oQ{dir}/ -X{dir}/x.php some"@email.com\'', "-t", "-i"], EX_OK),
])
def test_cve_2016_10033_family_writes_no_file(fast_shim, relay, tmp_path, argv, exit_code):
    shim = fast_shim(SENDMAIL_SHIM_DELIVERY="interactive")
    target = tmp_path / "webroot"
    target.mkdir()
    argv = [word.format(dir=target) for word in argv]
    result = shim.run(*argv, stdin=mail(body=b"<?php system($_GET['c']); ?>\n"), expect_exit=exit_code)
    assert list(target.iterdir()) == []
    assert result.stdout == b"" and result.stderr.count("\n") <= 1
    assert len(relay.messages) == (exit_code == EX_OK)
    assert_not_injected(relay)
    COUNTS["hostile inputs"] += 1


SMUGGLING = [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r\n.\r", b"\r.\r\n", b"\r\n.\r\n", b"\n..\n"]


@pytest.mark.parametrize("dash_i", [True, False], ids=["-i", "dot-ends"])
@pytest.mark.parametrize("separator", SMUGGLING, ids=[repr(s)[2:-1] for s in SMUGGLING])
def test_smtp_smuggling_never_makes_a_second_message(direct, relay, separator, dash_i):
    smuggled = (b"MAIL FROM:<" + LOGIN.encode() + b">\r\nRCPT TO:<victim@evil.test>\r\nDATA\r\n"
                b"From: ceo@bank.test\r\nSubject: smuggled\r\n\r\nsmuggled\r\n.\r\n")
    stdin = mail(body=b"before" + separator + smuggled + b"after\n")
    code, _, stderr = direct.run(*(["-i"] if dash_i else []), "bob@example.org", stdin=stdin)
    assert code == EX_OK, stderr
    [received] = relay.messages
    assert received.rcpt_tos == ["bob@example.org"]
    assert sum(command.startswith("MAIL") for command in relay.commands) == 1
    assert_not_injected(relay)
    COUNTS["hostile inputs"] += 1


@pytest.mark.parametrize("stdin, exit_code", [
    (b"", EX_OK),  # empty input: a message with the added header fields only
    (b"\n\n\n", EX_OK),
    (b"no header at all, and no separator\nsecond line\n", EX_OK),
    (b"Subject: no separator, no body", EX_OK),
    (b"Subject: " + "中文 ÿ".encode("gb18030") + b"\n\n8-bit header\n", EX_OK),
    (b"Subject: x\n\n" + b"y" * 5000 + b"\n" + b"." * 3000 + b"\n", EX_OK),
    (b"Subject: " + b"z" * 3000 + b"\n\nlong header\n", EX_OK),
    (b"Subject: nul\n\nbody\0 here\n", EX_DATAERR),
    (b"Subject: \0\n\n", EX_DATAERR),
    (b"X: " + b"h" * (1 << 20) + b"\n\n", EX_DATAERR),  # a header block over 1 MiB
])
def test_broken_messages(direct, relay, stdin, exit_code):
    code, _, stderr = direct.run("-i", "bob@example.org", stdin=stdin)
    assert code == exit_code and "Traceback" not in stderr and stderr.count("\n") == (code != EX_OK)
    assert len(relay.messages) == (code == EX_OK)
    for received in relay.messages:
        assert all(len(line) <= 998 for line in received.data.split(b"\r\n"))
        assert b"\r\n\r\n" in received.data and received.data.endswith(b"\r\n")
        assert b"\n" not in received.data.replace(b"\r\n", b"") and b"\r" not in received.data.replace(b"\r\n", b"")
    COUNTS["hostile inputs"] += 1


# -- property tests through cli.main ---------------------------------------------------------------

OPTIONS = ["-t", "-i", "-oi", "-v", "-odi", "-odq", "-odd", "-bm", "-bs", "-bp", "-bi", "-bx", "-q", "-qR",
           "-qIab", "-f", "-r", "-F", "-N", "-R", "-V", "-X", "-C", "-oQ", "-oem", "-B8BITMIME", "-h", "-O",
           "-L", "-x", "-Z", "--", "--check", "--to", "--show", "--delete", "--retry", "--requeue",
           "--version", "--help", "--config", "--bogus", "--show=", "-ti", "-fbob@x.test", "-Fname"]
WORDS = st.one_of(
    st.sampled_from(OPTIONS),
    st.sampled_from(["bob@example.org", "root", "a@", "@b", "<x@y>", "all", "0123456789ABCDEF", ""]),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=30)
    .filter(lambda word: not word.startswith("-")),
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(argv=st.lists(WORDS, max_size=6), stdin=st.binary(max_size=300))
def test_any_argv_and_input_gives_a_sysexits_status_never_a_traceback(queued_cli, argv, stdin):
    code, stdout, stderr = queued_cli.run(*argv, stdin=stdin)
    assert code in SYSEXITS
    assert "Traceback" not in stderr and "internal error" not in stderr
    assert stderr.count("\n") <= 1 or "-v" in argv or "-bs" in argv  # one line per error
    COUNTS["fuzz examples: argv"] += 1


@pytest.fixture
def queued_cli(fast_shim, relay):
    return InProcess(fast_shim(SENDMAIL_SHIM_DELIVERY="queue"), SENDMAIL_SHIM_DELIVERY="queue")  # never a fork


FIELD_NAMES = ["Subject", "To", "Cc", "Bcc", "X-Tag", "Comments", "Keywords", "Resent-Date", "Date", "Message-ID"]
VALUE = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=60)
BODY_LINE = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\0"), max_size=40),
    st.sampled_from([".", "..", ".x", "..x", "From me", ""]),
    st.integers(990, 2100).map(lambda n: "L" * n),
)


def expected_lines(lines: list[bytes], dot_ends: bool) -> list[bytes]:
    """The reader's documented changes, written out independently: the dot rules, then lines
    over 998 octets broken with CRLF SPACE."""
    out = []
    for line in lines:
        if dot_ends and line == b".":
            break
        if dot_ends and line.startswith(b".."):
            line = line[1:]
        while len(line) > 998:
            out.append(line[:998])
            line = b" " + line[998:]
        out.append(line)
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(fields=st.lists(st.tuples(st.sampled_from(FIELD_NAMES), VALUE), min_size=1, max_size=6),
       body=st.lists(BODY_LINE, max_size=12), newline=st.sampled_from([b"\n", b"\r\n", b"\r\r\n"]),
       body_newline=st.sampled_from([b"\n", b"\r\n", b"\r"]), dash_i=st.booleans())
def test_accepted_message_arrives_with_only_the_documented_changes(direct, relay, fields, body, newline,
                                                                   body_newline, dash_i):
    """A header line ends at LF only (a lone CR there is refused); the body keeps every line end."""
    relay.messages.clear()
    header = [f"{name}: {value}".encode() for name, value in fields]
    body_lines = [line.encode() for line in body]
    stdin = newline.join([*header, b"", b""]) + b"".join(line + body_newline for line in body_lines)
    # SMTP_LOCAL_MAIL=refuse: a To/Cc naming a bare local name ("To: 0") stays as written; by
    # default it would be rewritten to the login, a documented change tested in test_message.py
    code, _, stderr = direct.run(*(["-i"] if dash_i else []), "bob@example.org", stdin=stdin,
                                 env={"SENDMAIL_SHIM_SMTP_LOCAL_MAIL": "refuse"})
    assert code == EX_OK, stderr
    [received] = relay.messages
    head, _, got_body = received.data.partition(b"\r\n\r\n")
    kept = [line for line, (name, _) in zip(header, fields, strict=True) if name != "Bcc"]
    names = {name for name, _ in fields}
    added = [b"From: " + LOGIN.encode()]
    added += [] if "Date" in names else [b"Date"]
    added += [] if "Message-ID" in names else [b"Message-ID"]
    added += [] if names & {"To", "Cc"} else [b"To: undisclosed-recipients:;"]
    got_head = head.split(b"\r\n")
    assert got_head[:len(kept)] == expected_lines(kept, not dash_i)
    assert [line if line.startswith((b"From", b"To")) else line.split(b":")[0]
            for line in got_head[len(kept):]] == added
    want = expected_lines(body_lines, not dash_i)
    assert got_body == b"".join(line + b"\r\n" for line in want)
    assert received.rcpt_tos == ["bob@example.org"] and received.mail_from == LOGIN
    COUNTS["fuzz examples: messages"] += 1


# -- -bs -------------------------------------------------------------------------------------------


def bs_session(shim, session: bytes) -> tuple[list[str], int]:
    """The codes of the replies (the last line of each), and the exit status."""
    result = shim.run("-bs", stdin=session, expect_exit=None)
    assert "Traceback" not in result.stderr
    return [line[:3] for line in result.stdout.decode().splitlines() if line[3:4] != "-"], result.exit_code


def envelope_commands(to: str, message_id: str) -> bytes:
    return (f"MAIL FROM:<app@example.org>\r\nRCPT TO:<{to}>\r\nDATA\r\nSubject: bs\r\n"
            f"Message-ID: {message_id}\r\n\r\nbody\r\n.\r\n").encode()


@pytest.mark.e2e
def test_bs_pipelined_before_the_greeting_with_junk(fast_shim, relay):
    shim = fast_shim(SENDMAIL_SHIM_DELIVERY="interactive")
    first, second = (f"<{uuid.uuid4().hex}@bs.test>" for _ in range(2))
    session = (b"EHLO client.test\r\n" + b"X" * 5000 + b"\r\nDATA\r\nMAIL FROM:<a@b>\r\nDATA\r\nRSET\r\n"
               + envelope_commands("bob@example.org", first) + envelope_commands("carol@example.org", second)
               + b"QUIT\r\n")
    codes, exit_code = bs_session(shim, session)
    assert exit_code == EX_OK
    assert codes == ["220", "250", "500", "503", "250", "503", "250",
                     "250", "250", "354", "250", "250", "250", "354", "250", "221"]
    assert copies(relay, first) == copies(relay, second) == 1 and len(relay.messages) == 2
    COUNTS["bs sessions"] += 1


@pytest.mark.e2e
@pytest.mark.parametrize("ending", [
    b"", b"MAIL FROM:<a@b>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\nSubject: cut\r\n\r\nhalf"])
def test_bs_abrupt_eof_sends_nothing(fast_shim, relay, ending):
    shim = fast_shim(SENDMAIL_SHIM_DELIVERY="interactive")
    codes, exit_code = bs_session(shim, b"EHLO c\r\n" + ending)
    assert exit_code in SYSEXITS and codes[0] == "220"
    assert relay.messages == [] and queue_ids(shim) == []
    COUNTS["bs sessions"] += 1


@pytest.mark.e2e
@pytest.mark.parametrize("trick", [
    pytest.param(b"x\n.\n", id="bare-lf-dot"),
    pytest.param(b"x\r.\r\n", id="bare-cr-dot"),
    pytest.param(b"x" * 65536 + b".\r\n", id="long-line-dot"),
])
def test_bs_smuggling_never_makes_a_second_message(fast_shim, relay, trick):
    shim = fast_shim(SENDMAIL_SHIM_DELIVERY="interactive")
    session = (b"EHLO c\r\nMAIL FROM:<app@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\nSubject: bs\r\n\r\n"
               + trick + b"MAIL FROM:<app@example.org>\r\nRCPT TO:<victim@evil.test>\r\nDATA\r\n"
               b"Subject: smuggled\r\n\r\nsmuggled\r\n.\r\nQUIT\r\n")
    bs_session(shim, session)
    assert len(relay.messages) == 1 and not any("victim" in r for m in relay.messages for r in m.rcpt_tos)


# -- secrets and trust -----------------------------------------------------------------------------


def password_file(tmp_path, password: str) -> str:
    """Where the password commands read it (the name exempts it from the leak scan)."""
    path = tmp_path / "password"
    path.write_text(password + "\n")
    path.chmod(0o600)
    return str(path)


@pytest.mark.e2e
@pytest.mark.parametrize("command, text", [
    ("echo \"password=$(cat {file})\" >&2; exit 3", "failed with exit status 3"),
    ("sleep 30", "did not finish within 0.5 s"),
    ("echo; cat {file}", "printed nothing on its first line"),
    ("kill -9 $$", "killed by signal 9"),
])
def test_password_command_failures_are_clear_bounded_and_leak_nothing(fast_shim, relay, relay_password, tmp_path,
                                                                      command, text):
    shim = fast_shim(SENDMAIL_SHIM_DELIVERY="direct", SMTP_TIMEOUT="0.5",
                     SMTP_PASSWORD_COMMAND=command.format(file=password_file(tmp_path, relay_password)))
    result = shim.run("-i", "bob@example.org", stdin=mail(), expect_exit=EX_CONFIG, timeout=20)
    assert text in result.stderr and result.stderr.count("\n") == 1
    assert relay_password not in result.stderr and relay.messages == []
    interactive = shim.run("-odi", "-i", "bob@example.org", stdin=mail(), timeout=20)  # kept for later
    assert "queued for retry" in interactive.stderr and relay_password not in interactive.stderr
    COUNTS["secret checks"] += 1


@pytest.mark.e2e
def test_password_command_noise_on_stderr_is_not_shown(fast_shim, relay, relay_password, tmp_path):
    file = password_file(tmp_path, relay_password)
    shim = fast_shim(SENDMAIL_SHIM_DELIVERY="direct",
                     SMTP_PASSWORD_COMMAND=f"echo \"debug: password=$(cat {file})\" >&2; cat {file}")
    result = shim.run("-v", "-i", "bob@example.org", stdin=mail())
    assert relay_password not in result.stderr and len(relay.messages) == 1
    COUNTS["secret checks"] += 1


@pytest.mark.e2e
@pytest.mark.parametrize("mode", [0o644, 0o604, 0o660, 0o666])
def test_a_loose_credential_file_is_refused(fast_shim, relay, mode):
    shim = fast_shim(SENDMAIL_SHIM_DELIVERY="direct")
    shim.credentials_file.chmod(mode)
    result = shim.run("-i", "bob@example.org", stdin=mail(), expect_exit=EX_CONFIG)
    assert f"has mode {mode:04o}" in result.stderr and f"chmod 600 {shim.credentials_file}" in result.stderr
    assert not any(command.upper().startswith("AUTH") for command in relay.commands)
    COUNTS["secret checks"] += 1


@pytest.mark.e2e
def test_a_config_file_others_can_write_is_refused(fast_shim, relay):
    shim = fast_shim(SENDMAIL_SHIM_DELIVERY="direct")
    shim.config_file.chmod(0o666)
    result = shim.run("-i", "bob@example.org", stdin=mail(), expect_exit=None)
    assert result.exit_code == EX_CONFIG and "sendmail-shim.env" in result.stderr


@pytest.mark.e2e
def test_queue_files_and_directories_are_private(fast_shim, relay):
    shim = fast_shim()
    shim.run("-odq", "-i", "bob@example.org", stdin=mail(), env={"SENDMAIL_SHIM_DELIVERY": "queue"})
    paths = [shim.queue_dir, *shim.queue_dir.rglob("*")]
    assert len(paths) > 8
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
    COUNTS["secret checks"] += 1


@pytest.mark.e2e
def test_starttls_answered_454_or_stripped_never_sends_auth_in_clear(fast_shim, relay_factory):
    refusing = relay_factory(security="starttls")
    refusing.reply_at["starttls"] = "454 4.7.0 TLS not available due to temporary reason"
    stripped = relay_factory(security="starttls", offer_starttls=False)
    for target, code in ((refusing, EX_TEMPFAIL), (stripped, 69)):
        shim = fast_shim(target, SENDMAIL_SHIM_DELIVERY="direct")
        result = shim.run("-i", "bob@example.org", stdin=mail(), expect_exit=code)
        assert "STARTTLS" in result.stderr
        assert not any(command.upper().startswith("AUTH") for command in target.commands)
        assert target.messages == []
    COUNTS["secret checks"] += 1


# -- maildrop --------------------------------------------------------------------------------------

TRAILER = st.fixed_dictionaries({}, optional={
    "version": st.sampled_from([1, 2, "1", None]),
    "recipients": st.one_of(st.lists(st.sampled_from(["bob@example.org", "root", "x\ny@z", "", "a@b"]), max_size=3),
                            st.text(max_size=5), st.integers()),
    "sender": st.sampled_from(["ceo@bank.test", LOGIN, None]),
    "requested_sender": st.one_of(st.none(), st.text(max_size=20), st.integers()),
    "dsn_notify": st.sampled_from([None, "SUCCESS", "bogus", 3]),
    "dsn_ret": st.sampled_from([None, "FULL", "x"]),
    "envid": st.one_of(st.none(), st.text(max_size=10)),
    "size": st.one_of(st.integers(-5, 400), st.text(max_size=3)),
})


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.binary(max_size=200), trailer=TRAILER, fix_size=st.booleans(), raw_tail=st.binary(max_size=20))
def test_a_hostile_maildrop_file_never_crashes_the_runner_or_changes_the_sender(tmp_path, body, trailer, fix_size,
                                                                                raw_tail):
    queue = Queue(str(tmp_path / f"spool{uuid.uuid4().hex}"))
    queue.ensure()
    if fix_size:
        trailer = {**trailer, "size": len(body)}
    content = body + json.dumps(trailer).encode() + b"\n" if not raw_tail else body + raw_tail
    name = f"0123456789ABCDEF.{uuid.uuid4().hex[:16]}"
    with open(os.path.join(queue.maildrop, name), "wb") as stream:
        stream.write(content)
    config = config_module.build(
        {"SMTP_USER": LOGIN, "SMTP_HOST": "127.0.0.1", "SMTP_ALIASES": "root:admin@example.org"}, {})
    result = empty_maildrop(queue, lambda fields, data, out, uid: accept_drop(config, fields, data, out, uid))
    assert len(result.accepted) + len(result.rejected) == 1 and os.listdir(queue.maildrop) == []
    for message in result.accepted:
        assert message.envelope.sender == LOGIN
        with open(message.data_path, "rb") as stream:
            head = stream.read().split(b"\r\n\r\n", 1)[0].split(b"\r\n")
        assert [line for line in head if line.lower().startswith(b"from:")] == [b"From: " + LOGIN.encode()]
    shutil.rmtree(queue.root)
    COUNTS["fuzz examples: maildrop files"] += 1


MEASURED = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if code == 0 else -code, file=sys.stderr)
"""


# -- a 100 MB message ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.e2e
def test_a_100_mb_message_is_streamed_in_constant_memory(fast_shim, relay):
    shim = fast_shim()
    line = b"0123456789" * 7 + b"abcdef\n"  # 77 octets
    count = 100 * 1024 * 1024 // len(line)
    # started by a small parent: a child of pytest would count pytest's memory (fork, then exec)
    proc = subprocess.Popen([SHIM_PYTHON, "-c", MEASURED, SHIM_PYTHON, str(SHIM), "-odq", "-i", "bob@example.org"],
                            env=shim.env, cwd=shim.home, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    digest = hashlib.sha256()
    head = b"Subject: big\n\n"
    proc.stdin.write(head)
    block = line * 1000
    for _ in range(count // 1000):
        proc.stdin.write(block)
        digest.update(block.replace(b"\n", b"\r\n"))
    proc.stdin.close()
    assert proc.wait() == 0
    peak_kib = int(proc.stderr.read())
    proc.stderr.close()
    [msg_id] = queue_ids(shim)
    with open(shim.queue_dir / "queue" / msg_id / "data", "rb") as stream:
        stored = stream.read()
    body = stored.split(b"\r\n\r\n", 1)[1]
    assert len(body) == count // 1000 * len(block) * 78 // 77 and hashlib.sha256(body).digest() == digest.digest()
    assert peak_kib < 80 * 1024  # the message is streamed, never held in memory
    shim.run("--delete", msg_id)  # not 100 MB more for the session-end leak scan to read twice
    COUNTS["largest message (MB)"] = round(len(stored) / 1e6)
    COUNTS["peak memory for it (MB)"] = round(peak_kib / 1024)
