"""Issue 12: the queue, the log and local mail behave the way a Postfix/sendmail admin expects.

Every case runs the real console script (tests/shim.py) against the test relay (tests/relay.py).
"""

import fcntl
import os
import re
import stat
import subprocess
import time

import pytest

from sendmail_shim import config as config_module
from sendmail_shim.errors import EX_CONFIG
from sendmail_shim.queue import Queue
from tests.faults import wait_idle
from tests.shim import OUTPUTS, SHIM, SHIM_PYTHON

pytestmark = pytest.mark.e2e

MAIL = b"Subject: for the operator\n\nhello\n"
QUIET_PIPE_EXITS = (0, 141)  # never 70 (internal error)


def queued(shim) -> list[str]:
    directory = shim.queue_dir / "queue"
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def has_dev_log() -> bool:
    try:
        return stat.S_ISSOCK(os.stat("/dev/log").st_mode)
    except OSError:
        return False


# -- 1. -q delivers everything queued, now ----------------------------------------------------


@pytest.mark.parametrize("flag", ["-q", "-q30m", "-qf"])
def test_q_delivers_every_deferred_message_now_whatever_its_backoff(shim, relay, flag):
    relay.reply_at["mail"] = "451 4.3.0 try later"
    for rcpt in ("bob@example.com", "carol@example.com"):
        result = shim.run("-odi", "-i", rcpt, stdin=MAIL)
        assert "queued for retry:" in result.stderr and "451 4.3.0 try later" in result.stderr
    relay.reply_at.pop("mail")
    listing = shim.run("-bp").stdout.decode()  # mailq still shows the next retry time and why
    assert listing.count("(451 4.3.0 try later; next try ") == 2 and "next try now" not in listing

    shim.run("-q", "--due")  # what automatic runs do: the backoff is honoured
    assert relay.messages == [] and len(queued(shim)) == 2

    result = shim.run(flag)  # the administrator's flush: everything, now
    assert (result.exit_code, result.stdout, result.stderr) == (0, b"", "")
    assert sorted(m.rcpt_tos[0] for m in relay.messages) == ["bob@example.com", "carol@example.com"]
    assert queued(shim) == [] and shim.run("-bp").stdout == b"Mail queue is empty\n"


def test_q_due_delivers_what_is_due_and_q_v_sums_up(shim, relay):
    shim.run("-odq", "-i", "bob@example.com", stdin=MAIL)  # a new message is due at once
    shim.run("-q", "--due")
    assert len(relay.messages) == 1 and queued(shim) == []
    shim.run("-odq", "-i", "carol@example.com", stdin=MAIL)
    relay.reply_at["mail"] = "451 4.3.0 try later"
    result = shim.run("-q", "-v")  # exit 0: the run itself worked
    assert result.stderr.rstrip().splitlines()[-1] == (
        "sendmail-shim: 0 sent, 1 deferred, 0 bounced, 0 expired, 0 bounces, 0 picked up, 0 refused at pickup, 0 busy")
    relay.reply_at.pop("mail")
    result = shim.run("-q", "-v")  # deferred a moment ago: -q tries it anyway
    assert result.stderr.rstrip().splitlines()[-1].startswith("sendmail-shim: 1 sent, 0 deferred")
    assert len(relay.messages) == 2


def test_due_goes_only_with_a_plain_q(shim):
    for args in (["--due"], ["-qRexample.com", "--due"], ["--due", "-i", "bob@example.com"]):
        result = shim.run(*args, expect_exit=64)
        assert "--due goes with a plain -q" in result.stderr


# -- 2. variables meant for the application change nothing ------------------------------------


def test_an_applications_smtp_variables_change_nothing(shim, relay):
    app = {"SMTP_PASSWORD": "app-secret", "SMTP_HOST": "192.0.2.1", "SMTP_PORT": "1",
           "SMTP_USER": "app@app.example", "SMTP_SECURITY": "none", "SMTP_ALIASES": "root:app@app.example"}
    result = shim.run("-i", "bob@example.com", stdin=MAIL, env=app)
    assert (result.exit_code, result.stderr) == (0, "")
    [message] = relay.messages
    assert message.mail_from == relay.login and message.rcpt_tos == ["bob@example.com"]
    assert "app-secret" not in shim.run("--check", env=app).stdout.decode()


def test_sendmail_shim_variables_override_the_file_but_never_give_the_password(shim, relay):
    shim.run("-i", "root", stdin=MAIL, env={"SENDMAIL_SHIM_SMTP_ALIASES": "root:ops@example.com"})
    assert relay.messages[0].rcpt_tos == ["ops@example.com"]
    result = shim.run("-odi", "-i", "bob@example.com", stdin=MAIL, env={"SENDMAIL_SHIM_SMTP_PORT": "1"})
    assert "queued for retry" in result.stderr and len(relay.messages) == 1  # port 1 was used
    result = shim.run("-i", "bob@example.com", stdin=MAIL, env={"SENDMAIL_SHIM_SMTP_PASSWORD": "x"},
                      expect_exit=EX_CONFIG)
    assert "SENDMAIL_SHIM_SMTP_PASSWORD is not accepted: a password never goes in" in result.stderr


def test_check_says_where_every_setting_comes_from(shim_factory, relay):
    shim = shim_factory(relay, SMTP_PROVIDER="163", SENDMAIL_SHIM_DELIVERY="interactive")
    lines = shim.config_file.read_text().splitlines()
    line_of = {line.partition("=")[0]: n for n, line in enumerate(lines, 1)}
    out = shim.run("--check", env={"SENDMAIL_SHIM_SMTP_TIMEOUT": "7", "SMTP_TIMEOUT": "1"}).stdout.decode()
    assert f"  SMTP_HOST = {relay.host}  ({shim.config_file}:{line_of['SMTP_HOST']})" in out
    assert f"  SMTP_PROVIDER = 163  ({shim.config_file}:{line_of['SMTP_PROVIDER']})" in out
    assert "  SMTP_TIMEOUT = 7.0  (environment SENDMAIL_SHIM_SMTP_TIMEOUT)" in out
    assert "  SENDMAIL_SHIM_QUEUE_CONNECTIONS = 1  (preset 163)" in out
    assert "  SMTP_HELO = (unset)  (default)" in out and "  SMTP_TLS_VERIFY = yes  (default)" in out
    for key in config_module.KEYS:  # every setting, each with its origin
        [line] = [line for line in out.splitlines() if line.startswith(f"  {key} = ")]
        assert line.endswith(")")
    assert out.rstrip().splitlines()[-1].startswith("verdict: OK")


# -- 3. feedback where the admin looks --------------------------------------------------------


def test_v_in_the_default_mode_delivers_in_the_foreground_and_shows_the_dialogue(shim_factory, relay,
                                                                                 relay_password):
    shim = shim_factory(relay)  # SENDMAIL_SHIM_DELIVERY unset: background
    result = shim.run("-v", "-i", "bob@example.com", stdin=MAIL)
    assert len(relay.messages) == 1  # delivered before the caller got its answer
    assert "C: AUTH" in result.stderr and "***" in result.stderr and "S: 250" in result.stderr
    assert relay_password not in result.stderr
    assert queued(shim) == []

    result = shim.run("-v", "-odq", "-i", "carol@example.com", stdin=MAIL)  # explicit: queue only
    assert result.stderr == "" and len(relay.messages) == 1 and len(queued(shim)) == 1


@pytest.mark.parametrize("settings, warned", [
    ({"SENDMAIL_SHIM_SYSLOG": "no", "SENDMAIL_SHIM_LOG_FILE": None}, True),
    ({"SENDMAIL_SHIM_SYSLOG": "yes", "SENDMAIL_SHIM_LOG_FILE": None}, not has_dev_log()),
    ({"SENDMAIL_SHIM_SYSLOG": "yes"}, False),  # a log file
], ids=["no-syslog-no-file", "syslog-no-file", "file"])
def test_check_warns_when_log_lines_go_nowhere(shim_factory, relay, settings, warned):
    shim = shim_factory(relay, **settings)
    out = shim.run("--check").stdout.decode()
    assert ("warning: log lines go nowhere" in out) == warned
    assert out.rstrip().splitlines()[-1].startswith("verdict: OK")


@pytest.mark.skipif(os.path.exists(config_module.SYSTEM_CONFIG), reason="this machine has a system configuration")
@pytest.mark.parametrize("args", [["-t", "-i"], ["-odi", "-i", "bob@example.com"], ["-q"], ["--check"]],
                         ids=["odb", "odi", "q", "check"])
def test_no_configuration_at_all_names_the_files_searched_and_says_to_run_setup(tmp_path, args):
    home = tmp_path / "bare"
    home.mkdir()
    proc = subprocess.run([SHIM_PYTHON, str(SHIM), *args], input=b"To: bob@example.com\n\nx\n",
                          capture_output=True, env={"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"},
                          cwd=home, timeout=60)
    stderr = proc.stderr.decode()
    OUTPUTS.append(stderr)
    assert proc.returncode == EX_CONFIG and stderr.count("\n") == 1
    assert config_module.SYSTEM_CONFIG in stderr
    assert str(home / ".config" / "sendmail-shim" / "sendmail-shim.env") in stderr
    assert "run sendmail-shim --setup" in stderr


def run_into_a_closed_pipe(shim, *args) -> tuple[int, str]:
    """As `sendmail-shim … | head -1` once head has gone: every write to stdout fails (EPIPE)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([SHIM_PYTHON, str(SHIM), *args], stdin=subprocess.DEVNULL, stdout=write_end,
                              stderr=subprocess.PIPE, env=shim.env, cwd=shim.home, timeout=60)
    finally:
        os.close(write_end)
    OUTPUTS.append(proc.stderr.decode())
    return proc.returncode, proc.stderr.decode()


def through_head(shim, *args) -> tuple[int, str, str]:
    """``sendmail-shim … | head -1``: the shim's exit status, what head printed, the shim's stderr."""
    proc = subprocess.run(["bash", "-c", '"$@" | head -1; exit "${PIPESTATUS[0]}"', "head",
                           SHIM_PYTHON, str(SHIM), *args],
                          capture_output=True, env=shim.env, cwd=shim.home, timeout=60)
    OUTPUTS.extend([proc.stdout.decode(), proc.stderr.decode()])
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


@pytest.mark.parametrize("args", [["--check"], ["-bp"], ["--help"], ["--version"]])
def test_a_reader_that_went_away_ends_the_command_quietly(shim, relay, args):
    shim.run("-odq", "-i", "bob@example.com", stdin=MAIL)
    code, stderr = run_into_a_closed_pipe(shim, *args)
    assert code in QUIET_PIPE_EXITS and stderr == ""


def test_check_and_a_long_mailq_through_head(shim, relay):
    recipients = [f"r{n:04d}@example.com" for n in range(1500)]  # one line each: ~100 KB of listing
    shim.run("-odq", "-i", *recipients, stdin=MAIL)
    code, out, stderr = through_head(shim, "-bp")
    assert code in QUIET_PIPE_EXITS and stderr == "" and out.startswith("-Queue ID-")
    code, out, stderr = through_head(shim, "--check")
    assert code in QUIET_PIPE_EXITS and stderr == "" and out.startswith("configuration")


# -- 5. admin commands cover every queue state -------------------------------------------------

FORGED = b"From: boss@bank.test\nTo: bob@example.com\nSubject: forged\n\n" + b"x" * 99 + b"\n"


def log_id(shim, pattern: str) -> str:
    """The queue id of the one log line that matches `pattern` (a regular expression with a group)."""
    [found] = [m.group(1) for line in shim.log_lines() if (m := re.search(pattern, line))]
    return found


def removed_by_postsuper(shim) -> list[str]:
    return [m.group(1) for line in shim.log_lines()
            if (m := re.search(r"/postsuper\[\d+\]: (\S+): removed$", line))]


def entries(shim, state: str) -> list[str]:
    directory = shim.queue_dir / state
    return sorted(os.listdir(directory)) if directory.exists() else []


def every_state(shim, relay) -> dict[str, str]:
    """One message in failed/ (a 550 recipient), one in corrupt/ (refused by the header policy
    at pickup, -odb), one in queue/ (-odq); their ids as the log printed them."""
    before = len(relay.messages)
    relay.refuse["nobody@example.com"] = "550 5.1.1 no such user"
    shim.run("-odq", "-i", "nobody@example.com", stdin=MAIL)
    shim.run("-q")  # into failed/; the failure report goes to the login
    failed = log_id(shim, r"\]: ([0-9A-F]{16}): to=<nobody@example.com>.*status=bounced")
    shim.run("-odb", "-t", "-i", stdin=FORGED * 1000)  # ~100 KB, refused in the background
    wait_idle(shim.config_file)
    corrupt = log_id(shim, r"/cleanup\[\d+\]: ([0-9A-F]{16}): reject: header ")
    shim.run("-odq", "-i", "bob@example.com", stdin=MAIL)
    [queued_id] = queued(shim)
    assert entries(shim, "failed") == [failed] and len(relay.messages) == before + 2  # the report, the notice
    [kept] = entries(shim, "corrupt")
    assert kept.startswith(corrupt + ".")
    return {"queue": queued_id, "failed": failed, "corrupt": corrupt, "corrupt-name": kept}


@pytest.fixture
def policy_shim(shim_factory, relay):
    return shim_factory(relay, SMTP_FROM_POLICY="reject")  # the default mode: background


def test_mailq_lists_every_state_and_what_waits_in_maildrop(policy_shim, relay):
    shim = policy_shim
    drop_one(shim)  # what an -odb caller leaves for the pickup: mailq is not empty
    listing = shim.run("-bp").stdout.decode()
    assert "Mail queue is empty" not in listing and listing.startswith("-Queue ID-")
    assert listing.rstrip().endswith("-- 0 Kbytes in 0 Requests. 1 in maildrop/, waiting for pickup.")
    shim.run("-q")  # picked up and delivered
    assert shim.run("-bp").stdout == b"Mail queue is empty\n"

    ids = every_state(shim, relay)
    lines = shim.run("-bp").stdout.decode().splitlines()
    assert any(line.startswith(ids["queue"] + " ") for line in lines)
    assert any(line.startswith(ids["failed"] + "!") for line in lines)
    [row] = [n for n, line in enumerate(lines) if line.startswith(ids["corrupt"] + "#")]
    assert lines[row].endswith(f"  corrupt/{ids['corrupt-name']}")
    assert lines[row + 1].startswith("(refused at pickup: ") and "differs from the login" in lines[row + 1]
    assert lines[-1] == ("-- 1 Kbytes in 1 Request. 1 failed (marked !, not retried). "
                         "1 corrupt (marked #, never delivered).")


def test_show_and_delete_failed_and_corrupt_items_by_the_logged_id(policy_shim, relay):
    shim = policy_shim
    ids = every_state(shim, relay)
    shown = shim.run("--show", ids["failed"]).stdout
    assert shown.startswith(f"Queue-ID: {ids['failed']} (failed)\n".encode())
    assert b"Failure: 550 5.1.1 no such user" in shown and shown.endswith(b"\r\n\r\nhello\r\n")

    for ref in (ids["corrupt"], ids["corrupt-name"], f"corrupt/{ids['corrupt-name']}"):
        shown = shim.run("--show", ref).stdout
        head, _, content = shown.partition(b"\n\n")
        text = head.decode()
        assert text.startswith(f"Queue-ID: {ids['corrupt']} (corrupt)\nName: corrupt/{ids['corrupt-name']}\n")
        assert "Type: file" in text and "Reason: refused at pickup: " in text and "differs from the login" in text
        size = (shim.queue_dir / "corrupt" / ids["corrupt-name"]).stat().st_size
        assert f"Content: the first 65536 of {size} bytes" in text  # bounded
        assert content.startswith(b"From: boss@bank.test\r\n") and len(content) == 65536

    for state in ("failed", "corrupt"):
        result = shim.run("--delete", ids[state])
        assert result.stdout.decode() == f"sendmail-shim: {ids[state]} deleted\n"
        assert entries(shim, state) == []
        assert shim.run("--show", ids[state], expect_exit=64).stderr.startswith("sendmail-shim: no message ")
    assert removed_by_postsuper(shim) == [ids["failed"], ids["corrupt"]]
    assert queued(shim) == [ids["queue"]] and entries(shim, "corrupt-reasons") == []


def test_odd_corrupt_entries_are_shown_and_deleted_without_being_followed_or_opened(policy_shim, relay, tmp_path):
    shim = policy_shim
    shim.run("-odq", "-i", "bob@example.com", stdin=MAIL)  # makes the spool
    secret = tmp_path / "secret"
    secret.write_text("root's secret")
    os.mkfifo(shim.queue_dir / "maildrop" / "a-fifo")
    os.symlink(secret, shim.queue_dir / "maildrop" / "a-link")
    shim.run("-q")  # the pickup quarantines both in corrupt/
    assert entries(shim, "corrupt") == ["a-fifo", "a-link"]
    listing = shim.run("-bp").stdout.decode()
    assert "a-fifo          #        0 " in listing and "(not a message: not a maildrop file name)" in listing
    for name, kind in (("a-fifo", "FIFO"), ("a-link", "symbolic link")):
        shown = shim.run("--show", name, timeout=10).stdout.decode()
        assert shown.startswith("Queue-ID: - (corrupt)\n") and f"Type: {kind}\n" in shown
        assert "Content: not shown (not a plain file)" in shown and "secret" not in shown
    shim.run("--delete", "a-link")
    shim.run("--delete", "corrupt/a-fifo")
    assert entries(shim, "corrupt") == [] and secret.read_text() == "root's secret"
    assert removed_by_postsuper(shim) == ["a-link", "a-fifo"]


def test_delete_all_empties_every_state_but_what_is_being_delivered(policy_shim, relay):
    shim = policy_shim
    ids = every_state(shim, relay)
    shim.run("-odq", "-i", "carol@example.com", stdin=MAIL)
    busy = next(i for i in queued(shim) if i != ids["queue"])
    with open(shim.queue_dir / "queue" / busy / "data", "rb") as data:
        fcntl.flock(data, fcntl.LOCK_EX)  # as a delivery holds it
        result = shim.run("--delete", "ALL", expect_exit=75)
        assert result.stdout.decode() == "sendmail-shim: 3 message(s) deleted\n"
        assert result.stderr == f"sendmail-shim: not deleted, being delivered: {busy}; try again when it is done\n"
    assert queued(shim) == [busy] and entries(shim, "failed") == [] and entries(shim, "corrupt") == []
    assert removed_by_postsuper(shim) == [ids["queue"], ids["failed"], ids["corrupt"]]
    assert shim.run("--delete", "ALL").stdout.decode() == "sendmail-shim: 1 message(s) deleted\n"
    assert removed_by_postsuper(shim)[-1] == busy
    assert shim.run("-bp").stdout == b"Mail queue is empty\n"
    assert shim.run("--delete", "ALL").stdout.decode() == "sendmail-shim: 0 message(s) deleted\n"


def test_failed_and_corrupt_items_expire_after_failed_age(shim_factory, relay):
    shim = shim_factory(relay, SMTP_FROM_POLICY="reject", SENDMAIL_SHIM_FAILED_AGE="2d")
    ids = every_state(shim, relay)
    young = time.time() - 86400  # a day: kept
    os.utime(shim.queue_dir / "failed" / ids["failed"] / "envelope.json", (young, young))
    os.utime(shim.queue_dir / "corrupt-reasons" / ids["corrupt-name"], (young, young))
    shim.run("-q")
    assert entries(shim, "failed") == [ids["failed"]] and entries(shim, "corrupt") == [ids["corrupt-name"]]

    old = time.time() - 3 * 86400  # three days: removed by the next queue run
    os.utime(shim.queue_dir / "failed" / ids["failed"] / "envelope.json", (old, old))
    os.utime(shim.queue_dir / "corrupt-reasons" / ids["corrupt-name"], (old, old))
    shim.run("-q", "--due")
    assert entries(shim, "failed") == [] and entries(shim, "corrupt") == []
    assert entries(shim, "corrupt-reasons") == [] and queued(shim) == []  # -q delivered bob's
    lines = shim.log_lines()
    for where in ("failed", "corrupt"):
        assert any(re.search(rf"/postsuper\[\d+\]: {ids[where]}: removed \(kept in {where}/ for 3\.0d, "
                             r"longer than SENDMAIL_SHIM_FAILED_AGE\)$", line) for line in lines)


def test_retry_and_requeue_still_work_next_to_the_new_forms(policy_shim, relay):
    shim = policy_shim
    ids = every_state(shim, relay)
    relay.refuse.clear()
    requeued = shim.run("--requeue", ids["failed"]).stdout.decode()
    assert requeued == f"sendmail-shim: {ids['failed']} moved back to the queue\n"
    assert shim.run("--retry", "all").stdout.decode().startswith("sendmail-shim: 2 message(s) due now")
    shim.run("-q", "--due")
    assert queued(shim) == [] and entries(shim, "corrupt") == [ids["corrupt-name"]]
    assert sorted(m.rcpt_tos[0] for m in relay.messages[2:]) == ["bob@example.com", "nobody@example.com"]
    shim.run("--requeue", ids["corrupt"], expect_exit=64)  # corrupt/ holds no message to retry


def drop_one(shim) -> str:
    """A request in maildrop/ as an -odb caller leaves it, before any pickup."""
    queue = Queue(str(shim.queue_dir))
    queue.ensure()
    with queue.spool(drop=True) as spool:
        spool.file.write(MAIL.replace(b"\n", b"\r\n"))
        return spool.commit_request({"recipients": ["bob@example.com"]})
