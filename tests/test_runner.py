"""Delivery from the queue against a real relay on 127.0.0.1: queue runs, retries, bounces, the
ambiguous case, crashes at every step, concurrency, background delivery and privilege separation.
Everything is counted at the relay, by Message-ID."""

import email
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from sendmail_shim import config as config_module, postsuper
from sendmail_shim.envelope import Envelope
from sendmail_shim.attempt import next_attempt_after
from sendmail_shim.errors import SMTPFailure
from sendmail_shim.log import MessageLog
from sendmail_shim.queue import Queue
from sendmail_shim.runner import Selector, deliver_now, run_queue
from tests.relay import RELAY_LOGIN
from tests.shim import OUTPUTS, wait_for

ROOT = Path(__file__).resolve().parent.parent

# Runs in a subprocess, configured by the environment: submit a message (stdin) or run the queue.
HELPER = r"""
import os, sys, time
from sendmail_shim import background, config, runner
from sendmail_shim.envelope import Envelope
from sendmail_shim.log import MessageLog
from sendmail_shim.queue import Queue
conf = config.load()
queue = Queue(conf.queue_dir)
log = MessageLog.from_config(conf)
action, args = sys.argv[1], sys.argv[2:]
if action == "submit":
    queue.ensure()
    data = sys.stdin.buffer.read()
    with queue.spool() as spool:
        spool.file.write(data)
        msg_id = spool.commit(Envelope(sender=conf.sender, recipients=args, size=len(data)))
    print(msg_id, flush=True)
    if os.environ.get("BACKGROUND"):
        background.start(conf, queue, msg_id)
elif action == "run":
    print(runner.run_queue(conf, queue, log=log))
elif action == "flush-until":  # queue runs until the file args[0] exists, then one more
    while True:
        last = os.path.exists(args[0])
        runner.run_queue(conf, queue, log=log)
        if last:
            break
        time.sleep(0.02)
"""


def message_bytes(to: str = "bob@example.org", subject: str = "hello") -> tuple[bytes, str]:
    message_id = f"<{uuid.uuid4().hex}@163.test>"
    data = (f"From: Alice <{RELAY_LOGIN}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Date: Mon, 25 Nov 2024 13:00:00 +0000\r\nMessage-ID: {message_id}\r\n\r\n"
            f"line one\r\n.a line with a leading dot\r\n").encode()
    return data, message_id


def received(relay) -> Counter:
    return Counter(email.message_from_bytes(m.data)["Message-ID"] for m in relay.messages)


class Site:
    """A queue, a log and a config pointing at one relay; the password comes from a command."""

    def __init__(self, base: Path, relay, password: str, **overrides):
        self.base = base
        self.password_file = base / "password"
        self.password_file.write_text(password + "\n")
        self.password_file.chmod(0o600)
        self.log_file = base / "mail.log"
        self.settings = {
            **relay.config_env(),
            "SENDMAIL_SHIM_QUEUE_DIR": str(base / "spool"),
            "SENDMAIL_SHIM_LOG_FILE": str(self.log_file),
            "SENDMAIL_SHIM_SYSLOG": "no",
            "SMTP_PASSWORD_COMMAND": f"cat {self.password_file}",
            **overrides,
        }
        self.config = config_module.build(self.settings, {})
        self.queue = Queue(self.config.queue_dir)
        self.queue.ensure()
        self.log = MessageLog.from_config(self.config)

    def submit(self, *recipients, requested: str | None = None, **commit) -> tuple[str, str]:
        data, message_id = message_bytes(recipients[0] if recipients else "bob@example.org")
        env = Envelope(sender=self.config.sender, recipients=list(recipients or ["bob@example.org"]),
                       requested_sender=requested, message_id=message_id, size=len(data))
        with self.queue.spool() as spool:
            spool.file.write(data)
            return spool.commit(env, **commit), message_id

    def run(self, **options):
        return run_queue(self.config, self.queue, log=self.log, **options)

    def log_text(self) -> str:
        text = self.log_file.read_text() if self.log_file.exists() else ""
        OUTPUTS.append(text)
        return text

    def environ(self, **extra) -> dict:
        return {"PATH": "/usr/bin:/bin", "HOME": str(self.base), "LANG": "C.UTF-8", "PYTHONPATH": str(ROOT),
                **{config_module.env_name(key): value for key, value in self.settings.items()}, **extra}

    def helper(self, *args, stdin: bytes = b"", python: str = sys.executable, user: str | None = None,
               timeout: float = 30, **extra) -> subprocess.CompletedProcess:
        command = [python, "-c", HELPER, *args]
        if user:
            command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *command]
        proc = subprocess.run(command, input=stdin, capture_output=True, timeout=timeout,
                              env=self.environ(**extra), cwd="/")
        OUTPUTS.extend([proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")])
        return proc

    def files_text(self) -> list[str]:
        return [p.read_bytes().decode(errors="replace") for p in Path(self.queue.root).rglob("*") if p.is_file()]


@pytest.fixture
def site_factory(tmp_path, relay_password):
    made = []

    def make(relay, password: str = relay_password, **overrides) -> Site:
        base = tmp_path / f"site{len(made)}"
        base.mkdir()
        made.append(Site(base, relay, password, **overrides))
        return made[-1]

    yield make
    for site in made:  # the password must be in no log line and no queue file
        site.log_text()
        OUTPUTS.extend(site.files_text())


@pytest.fixture
def site(site_factory, relay) -> Site:
    return site_factory(relay)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- the basic cycle ---------------------------------------------------------------------------


def test_relay_down_then_up(relay, site_factory):
    down = site_factory(relay, SMTP_PORT=str(free_port()))
    msg_id, message_id = down.submit()
    stats = down.run()
    assert stats.deferred == 1 and down.queue.ids() == [msg_id]
    [line] = delivery_lines(down, msg_id)
    assert ", relay=none, " in line and ", dsn=4.4.1, status=deferred (cannot connect" in line
    queued = down.queue.load(msg_id)
    assert queued.attempts == 1 and queued.next_attempt > time.time()
    assert down.run().deferred == 0  # not due yet: no second attempt

    up = down.config._replace(port=relay.port)  # the relay is back
    postsuper.retry_now(down.queue)
    stats = run_queue(up, down.queue, log=down.log)
    assert stats.sent == 1 and down.queue.ids() == [] and received(relay) == {message_id: 1}
    assert relay.messages[0].mail_from == RELAY_LOGIN and relay.messages[0].rcpt_tos == ["bob@example.org"]
    assert relay.messages[0].data.endswith(b"line one\r\n.a line with a leading dot\r\n")
    sent = delivery_lines(down, msg_id)[-1]
    assert (f" sendmail-shim/smtp[{os.getpid()}]: {msg_id}: to=<bob@example.org>, "
            f"relay=127.0.0.1[127.0.0.1]:{relay.port}, ") in sent
    assert ", dsn=2.0.0, status=sent (250 " in sent
    assert down.log_text().splitlines()[-1].endswith(f" sendmail-shim/qmgr[{os.getpid()}]: {msg_id}: removed")
    assert os.listdir(down.queue.tmp) == []


@pytest.mark.parametrize("pipelining", [False, True], ids=["plain", "pipelining"])
def test_one_connection_serves_the_whole_run(relay_factory, site_factory, pipelining):
    relay = relay_factory(security="tls", pipelining=pipelining)
    if pipelining:  # the relay answers a message's data only once the next envelope has arrived
        relay.late_replies = 2
    site = site_factory(relay, SENDMAIL_SHIM_QUEUE_CONNECTIONS="1")
    ids = [site.submit(f"r{i}@example.org")[1] for i in range(3)]
    lines = []
    assert site.run(transcript=lines.append).sent == 3
    assert received(relay) == dict.fromkeys(ids, 1)
    commands = relay.verbs()
    assert commands.count("EHLO") == 1 and commands.count("AUTH") == 1
    assert commands[commands.index("MAIL"):] == ["MAIL", "RCPT", "DATA"] * 3 + ["QUIT"]  # no RSET
    after_data = [lines[i + 1:i + 4] for i, line in enumerate(lines) if line.startswith("C: <message")]
    heads = [[line.split(" ")[1] for line in flight] for flight in after_data]
    if pipelining:  # the next envelope goes out right behind the data, before any reply is read
        assert heads[:2] == [["MAIL", "RCPT", "DATA"]] * 2
    else:
        assert [head[0] for head in heads] == ["250"] * 3


def counting_password(site: Site) -> Path:
    """Make the password command note each run in a file; returns that file."""
    runs = site.base / "password-runs"
    site.config = site.config._replace(password_command=f"echo x >> {runs}; cat {site.password_file}")
    return runs


def test_parallel_connections_deliver_each_message_once(relay_factory, site_factory):
    relay = relay_factory(security="tls", pipelining=True)
    site = site_factory(relay, SENDMAIL_SHIM_QUEUE_CONNECTIONS="3")
    runs = counting_password(site)
    ids = [site.submit(f"r{i}@example.org")[1] for i in range(30)]
    calls = []
    stats = site.run(progress=lambda done, total, line: calls.append((done, total, line)))
    assert (stats.sent, stats.deferred, stats.bounced, stats.busy) == (30, 0, 0, 0)
    assert received(relay) == dict.fromkeys(ids, 1) and site.queue.ids() == []
    assert relay.verbs().count("EHLO") >= 2  # one per connection (implicit TLS: no second EHLO)
    assert relay.verbs().count("EHLO") == relay.verbs().count("AUTH") <= 3
    assert runs.read_text() == "x\n"  # the password was fetched once for all connections
    assert sorted(done for done, _, _ in calls) == list(range(1, 31)) and {t for _, t, _ in calls} == {30}
    assert site.log_text().count("status=sent") == 30


def test_parallel_run_settles_each_failure_like_a_serial_one(relay_factory, site_factory):
    relay = relay_factory(security="tls", pipelining=True)
    relay.refuse["bad@example.org"] = "550 5.1.1 no such user"
    relay.refuse["later@example.org"] = "451 4.3.0 try again later"
    site = site_factory(relay, SENDMAIL_SHIM_QUEUE_CONNECTIONS="3")
    good = [site.submit(f"r{i}@example.org") for i in range(6)]
    bad, _ = site.submit("bad@example.org")
    later, _ = site.submit("later@example.org")
    stats = site.run()
    assert (stats.sent, stats.bounced, stats.deferred, stats.bounces) == (7, 1, 1, 1)  # 6 + the report
    assert site.queue.failed_ids() == [bad] and site.queue.ids() == [later]
    assert len(relay.messages) == 7 and all(received(relay)[message_id] == 1 for _, message_id in good)
    (report,) = [m for m in relay.messages if m.rcpt_tos == [RELAY_LOGIN]]
    assert "bad@example.org" in report.data.decode() and "later@example.org" not in report.data.decode()


def submit_in_order(site: Site, *recipients: str) -> list[tuple[str, str]]:
    """One message per recipient, queued in this order (ids sort by the millisecond)."""
    submitted = []
    for recipient in recipients:
        submitted.append(site.submit(recipient))
        time.sleep(0.002)
    return submitted


def log_lines_of(site: Site, msg_id: str) -> list[str]:
    return [line for line in site.log_text().splitlines() if f" {msg_id}: " in f" {line}"]


def delivery_lines(site: Site, msg_id: str) -> list[str]:
    """The smtp lines (one per recipient and attempt) of a message."""
    return [line for line in site.log_text().splitlines() if f"]: {msg_id}: to=<" in line and "/smtp[" in line]


def test_logged_delay_runs_to_the_end_of_the_attempt(relay_factory, site_factory):
    """delay= is Postfix's: from the arrival to the verdict, the time spent talking included."""
    relay = relay_factory(security="tls")
    relay.hang_at.add("data")  # no answer to DATA: the attempt ends with SMTP_TIMEOUT
    site = site_factory(relay, SMTP_TIMEOUT="0.6")
    msg_id, _ = site.submit("bob@example.org")
    site.run()
    [line] = [line for line in delivery_lines(site, msg_id) if "status=deferred" in line]
    fields = re.search(r", delay=([\d.]+), delays=([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+),", line)
    delay, a, b, c, d = map(float, fields.groups())
    assert delay >= 0.6 and d >= 0.6  # the time spent talking is the transmission's (d)
    assert abs(delay - (a + b + c + d)) <= 0.05


def test_refused_data_fails_only_that_message(relay_factory, site_factory):
    relay = relay_factory(security="tls", pipelining=True)
    relay.reject_data["spam@example.org"] = "554 5.7.1 looks like spam"
    site = site_factory(relay, SENDMAIL_SHIM_QUEUE_CONNECTIONS="1")
    (before, before_mid), (spam, _), (after, after_mid) = submit_in_order(
        site, "a@example.org", "spam@example.org", "c@example.org")
    stats = site.run()
    assert (stats.sent, stats.bounced, stats.bounces, stats.deferred) == (3, 1, 1, 0)  # 2 + the report
    assert received(relay)[before_mid] == 1 and received(relay)[after_mid] == 1 and len(relay.messages) == 3
    assert site.queue.ids() == [] and site.queue.failed_ids() == [spam]
    assert ", dsn=5.7.1, status=bounced (554 5.7.1 looks like spam)" in delivery_lines(site, spam)[0]
    assert all("status=sent" in delivery_lines(site, msg_id)[0] for msg_id in (before, after))
    assert ", conn_use=2, " in delivery_lines(site, spam)[0]  # the second message over the connection
    assert "RSET" not in relay.verbs()  # the refusal of the data ended that transaction


def test_refused_recipient_of_the_next_message_leaves_the_previous_one_sent(relay_factory, site_factory):
    relay = relay_factory(security="tls", pipelining=True)
    relay.refuse["bad@example.org"] = "550 5.1.1 no such user"
    site = site_factory(relay, SENDMAIL_SHIM_QUEUE_CONNECTIONS="1")
    (good, good_mid), (bad, _) = submit_in_order(site, "a@example.org", "bad@example.org")
    stats = site.run()
    assert (stats.sent, stats.bounced, stats.bounces) == (2, 1, 1)  # the good one and the report
    assert received(relay)[good_mid] == 1 and site.queue.failed_ids() == [bad]
    assert "status=sent" in delivery_lines(site, good)[0] and "status=bounced (550" in delivery_lines(site, bad)[0]
    commands = relay.verbs()  # RSET only after the aborted transaction, in the report's group
    assert commands[commands.index("MAIL"):] == ["MAIL", "RCPT", "DATA"] * 2 + ["RSET", "MAIL", "RCPT", "DATA", "QUIT"]


def test_connection_lost_after_the_data_leaves_the_next_message_untouched(relay_factory, site_factory):
    relay = relay_factory(security="tls", pipelining=True)
    relay.close_at.add("accepted")  # the relay takes the message, then the connection is gone
    site = site_factory(relay, SENDMAIL_SHIM_QUEUE_CONNECTIONS="1")
    (first, first_mid), (second, second_mid) = submit_in_order(site, "a@example.org", "b@example.org")
    lines = []
    stats = site.run(transcript=lines.append)
    assert stats.deferred == 2 and site.queue.ids() == [first, second]
    assert sum(line.startswith("C: MAIL") for line in lines) == 2  # the second one was on its way
    assert received(relay) == {first_mid: 1}
    [ambiguous] = delivery_lines(site, first)
    assert ", dsn=4.4.2, status=deferred (" in ambiguous
    assert ambiguous.endswith(" -- message may be sent more than once)")
    [untouched] = delivery_lines(site, second)
    assert "status=deferred" in untouched and "more than once" not in untouched and "twice" not in untouched
    assert [r.state for r in site.queue.load(second).recipients] == ["deferred"]
    relay.close_at.clear()
    postsuper.retry_now(site.queue)
    assert site.run().sent == 2
    assert received(relay) == {first_mid: 2, second_mid: 1}  # the ambiguous one, as documented


@pytest.mark.parametrize("stage", ["greeting", "auth"])
def test_connections_beyond_the_relay_limit_cost_nothing(relay_factory, site_factory, stage):
    relay = relay_factory(security="tls", pipelining=True)
    relay.max_sessions, relay.too_many_at = 2, stage  # "421 too many connections" for the others
    site = site_factory(relay, SENDMAIL_SHIM_QUEUE_CONNECTIONS="6")
    ids = [site.submit(f"r{i}@example.org")[1] for i in range(30)]
    stats = site.run()
    assert relay.refused_sessions >= 1
    assert (stats.sent, stats.deferred, stats.bounced) == (30, 0, 0)
    assert received(relay) == dict.fromkeys(ids, 1) and site.queue.ids() == []
    log = site.log_text().splitlines()  # no line for a refused connection, no message deferred
    deliveries = [line for line in log if "/smtp[" in line]
    assert len(deliveries) == 30 and all("status=sent" in line for line in deliveries)
    assert not any(" warning: " in line or " error: " in line for line in log)


def test_refused_login_costs_one_auth_per_connection_at_most(relay_factory, site_factory):
    relay = relay_factory(security="tls", pipelining=True)
    site = site_factory(relay, password="wrong", SENDMAIL_SHIM_QUEUE_CONNECTIONS="3")
    runs = counting_password(site)
    ids = sorted(site.submit(f"r{i}@example.org")[0] for i in range(12))
    stats = site.run()
    assert (stats.deferred, stats.sent) == (12, 0) and site.queue.ids() == ids
    assert 1 <= relay.verbs().count("AUTH") <= 3 and relay.messages == []
    assert runs.read_text() == "x\n"
    assert site.log_text().count(", dsn=4.0.0, status=deferred (535") == 12  # a 5xx that only defers: 4.x.x


def test_temporary_failure_then_success(site, relay):
    relay.reply_at["mail"] = "451 4.3.0 try again later"
    msg_id, message_id = site.submit()
    assert site.run().deferred == 1
    queued = site.queue.load(msg_id)
    assert queued.last_reply == "451 4.3.0 try again later"
    assert [(r.state, r.attempts) for r in queued.recipients] == [("deferred", 1)]
    assert "(451 4.3.0 try again later; next try " in postsuper.listing(site.queue)
    del relay.reply_at["mail"]
    postsuper.retry_now(site.queue, msg_id)
    assert site.run().sent == 1
    assert received(relay) == {message_id: 1} and site.queue.ids() == []
    statuses = [line.split("status=")[1].split()[0] for line in delivery_lines(site, msg_id)]
    assert statuses == ["deferred", "sent"]


def test_permanent_refusal_fails_and_bounces_to_the_sender(site, relay):
    relay.refuse["bob@example.org"] = "550 5.1.1 <bob@example.org>: no such user"
    msg_id, message_id = site.submit("bob@example.org", requested="webmaster@example.org")
    stats = site.run()
    assert (stats.bounced, stats.bounces, stats.sent) == (1, 1, 1)  # the report went out in the same run
    assert site.queue.ids() == [] and site.queue.failed_ids() == [msg_id]
    failed = site.queue.load(msg_id)
    assert failed.failure == "550 5.1.1 <bob@example.org>: no such user"
    (report,) = relay.messages  # to the submitting account (no alias here: the login), not to -f
    assert report.mail_from == RELAY_LOGIN and report.rcpt_tos == [RELAY_LOGIN]
    parsed = email.message_from_bytes(report.data)
    assert "The sender it asked for (not used): webmaster@example.org" in parsed.get_payload()[0].get_payload()
    assert parsed.get_content_type() == "multipart/report"
    status = parsed.get_payload()[1].get_payload()[1]
    assert status["Final-Recipient"] == "rfc822; bob@example.org" and status["Status"] == "5.1.1"
    assert status["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@example.org>: no such user"
    assert message_id in parsed.get_payload()[2].get_payload()
    assert "status=bounced (550 5.1.1" in site.log_text()


def test_partial_refusal_is_handled_per_recipient(site, relay):
    relay.refuse["bob@example.org"] = "550 5.1.1 no such user"
    relay.refuse["carol@example.org"] = "452 4.2.2 mailbox full"
    msg_id, message_id = site.submit("dave@example.org", "bob@example.org", "carol@example.org")
    site.run()
    original, report = relay.messages
    assert original.rcpt_tos == ["dave@example.org"]
    assert report.rcpt_tos == [RELAY_LOGIN]  # no requested sender: the login gets the report
    assert "bob@example.org" in report.data.decode() and "carol@example.org" not in report.data.decode()
    queued = site.queue.load(msg_id)
    assert {r.address: r.state for r in queued.recipients} == {
        "dave@example.org": "sent", "bob@example.org": "bounced", "carol@example.org": "deferred"}
    listing = postsuper.listing(site.queue)
    assert "carol@example.org" in listing and "dave@example.org" not in listing

    del relay.refuse["carol@example.org"]
    postsuper.retry_now(site.queue)
    site.run()
    assert relay.messages[2].rcpt_tos == ["carol@example.org"]  # only the one still deferred
    assert received(relay)[message_id] == 2 and len(relay.messages) == 3  # no second report
    assert site.queue.ids() == [] and site.queue.failed_ids() == [msg_id]


def test_whole_message_refusal_fails_and_a_failing_bounce_is_never_bounced(site, relay):
    relay.reply_at["data"] = "554 5.7.1 rejected as spam"
    msg_id, _ = site.submit()
    stats = site.run()
    assert stats.bounced == 2 and stats.bounces == 1  # the message, then its report (same 554)
    assert relay.messages == [] and site.queue.ids() == []
    original, report = (site.queue.load(i) for i in site.queue.failed_ids())
    assert original.id == msg_id and original.failure == "554 5.7.1 rejected as spam"
    assert report.bounce and report.envelope.recipients == [RELAY_LOGIN]
    assert site.run().bounces == 0 and len(site.queue.failed_ids()) == 2


@pytest.mark.parametrize("attempts, delay", [(1, 60), (2, 120), (3, 240), (6, 1920), (7, 3600), (30, 3600)])
def test_backoff_doubles_from_one_minute_to_one_hour(attempts, delay):
    assert next_attempt_after(attempts, 1000.0) == 1000.0 + delay


def test_too_old_goes_to_failed_with_a_report(site, relay):
    msg_id, message_id = site.submit(arrival=time.time() - 6 * 86400)
    stats = site.run()
    assert (stats.expired, stats.bounced) == (1, 0) and site.queue.failed_ids() == [msg_id]
    assert site.queue.load(msg_id).failure.startswith("expired after 6.0d")
    (report,) = relay.messages  # the message itself was not tried any more
    status = email.message_from_bytes(report.data).get_payload()[1].get_payload()[1]
    assert status["Status"] == "4.4.7" and status["Action"] == "failed"
    log = [line.split("]: ", 1)[1] for line in log_lines_of(site, msg_id)]  # Postfix's order of events
    assert log == [f"{msg_id}: from=<{RELAY_LOGIN}>, size={site.queue.load(msg_id).size}, nrcpt=1 (queue active)",
                   f"{msg_id}: from=<{RELAY_LOGIN}>, status=expired, returned to sender",
                   f"{msg_id}: sender non-delivery notification: {log[2].rsplit(' ', 1)[1]}",
                   f"{msg_id}: removed"]
    assert not delivery_lines(site, msg_id)


def test_the_ambiguous_case_is_logged_and_retried(site, relay):
    relay.close_at.add("dot")  # the connection dies after the final dot, before the reply
    msg_id, message_id = site.submit()
    assert site.run().deferred == 1
    assert "status=deferred" in site.log_text() and site.queue.ids() == [msg_id]
    assert delivery_lines(site, msg_id)[0].endswith(" -- message may be sent more than once)")
    relay.close_at.clear()
    postsuper.retry_now(site.queue)
    assert site.run().sent == 1 and received(relay) == {message_id: 1}


def test_a_recipient_the_alias_map_changed_is_logged_with_orig_to(site, relay):
    """Postfix's orig_to=: the address as the caller gave it, kept in envelope.json."""
    data, message_id = message_bytes("admin@example.org")
    env = Envelope(sender=site.config.sender, recipients=["admin@example.org", "bob@example.org"],
                   message_id=message_id, size=len(data), orig_to={"admin@example.org": "root"})
    with site.queue.spool() as spool:
        spool.file.write(data)
        msg_id = spool.commit(env)
    assert site.run().sent == 1 and received(relay) == {message_id: 1}
    admin, bob = delivery_lines(site, msg_id)
    assert f"]: {msg_id}: to=<admin@example.org>, orig_to=<root>, relay=127.0.0.1[127.0.0.1]:{relay.port}, " in admin
    assert f"]: {msg_id}: to=<bob@example.org>, relay=" in bob


def test_selector_delivers_only_matching_messages_now(site, relay):
    relay.reply_at["mail"] = "451 4.3.0 later"
    first, first_mid = site.submit("bob@example.org")
    second, _ = site.submit("carol@example.org")
    site.run()
    del relay.reply_at["mail"]
    assert site.run(selector=Selector("R", "BOB@")).sent == 1  # though not due yet
    assert received(relay) == {first_mid: 1} and site.queue.ids() == [second]
    assert site.run(selector=Selector("I", second[-6:].lower())).sent == 1
    assert site.queue.ids() == []


# -- -odi --------------------------------------------------------------------------------------


def test_interactive_outcomes(site, relay):
    msg_id, message_id = site.submit()
    outcome = deliver_now(site.config, site.queue, msg_id, log=site.log)
    assert (outcome.status, outcome.error, outcome.kept) == ("sent", None, False)
    assert received(relay) == {message_id: 1} and site.queue.ids() == []

    relay.reply_at["dot"] = "554 5.7.1 rejected as spam"
    msg_id, _ = site.submit()
    outcome = deliver_now(site.config, site.queue, msg_id, log=site.log)
    assert outcome.status == "bounced" and not outcome.kept
    assert isinstance(outcome.error, SMTPFailure) and outcome.error.exit_code == 69
    assert site.queue.ids() == [] and site.queue.failed_ids() == []  # not kept, no report
    assert len(relay.messages) == 1

    relay.reply_at["dot"] = "451 4.3.0 greylisted"
    msg_id, _ = site.submit()
    outcome = deliver_now(site.config, site.queue, msg_id, log=site.log)
    assert outcome.status == "deferred" and outcome.kept and outcome.error.exit_code == 75
    assert site.queue.ids() == [msg_id]


def test_wrong_password_keeps_the_message(site_factory, relay):
    site = site_factory(relay, password="wrong")
    msg_id, _ = site.submit()
    outcome = deliver_now(site.config, site.queue, msg_id, log=site.log)
    assert outcome.kept and "535" in str(outcome.error) and site.queue.ids() == [msg_id]


def test_a_locked_message_is_left_to_its_holder(site, relay):
    msg_id, _ = site.submit()
    with site.queue.lock(msg_id):
        assert deliver_now(site.config, site.queue, msg_id, log=site.log).status == "busy"
        assert site.run().busy == 1
    assert relay.messages == []


# -- crashes, concurrency, background ----------------------------------------------------------


@pytest.mark.parametrize("step, copies", [
    ("deliver-locked", 1),
    ("deliver-sent", 2),  # the relay said 250, we died before writing it down: the documented case
    ("deliver-recorded", 1),
    ("pickup-committed", 1),
])
def test_sigkill_during_delivery(site, relay, step, copies):
    data, message_id = message_bytes()
    if step == "pickup-committed":
        with site.queue.spool(drop=True) as spool:
            spool.file.write(data)
            spool.commit_request({"recipients": ["bob@example.org"]})
    else:
        site.submit()
        message_id = next(iter(Counter(m.envelope.message_id for m in map(site.queue.load, site.queue.ids()))))
    proc = site.helper("run", SENDMAIL_SHIM_TEST_CRASH=step)
    assert proc.returncode == -signal.SIGKILL
    postsuper.retry_now(site.queue)
    site.run()
    site.run()
    assert received(relay) == {message_id: copies}
    assert site.queue.ids() == [] and site.queue.failed_ids() == [] and os.listdir(site.queue.maildrop) == []


def test_fifty_concurrent_submissions_two_runners_each_delivered_once(site, relay, tmp_path):
    stop = tmp_path / "stop"
    runners = [subprocess.Popen([sys.executable, "-c", HELPER, "flush-until", str(stop)],
                                env=site.environ(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
               for _ in range(2)]
    messages = [message_bytes(f"r{i}@example.org") for i in range(50)]
    submitters = [subprocess.Popen([sys.executable, "-c", HELPER, "submit", f"r{i}@example.org"],
                                   env=site.environ(), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                  for i in range(50)]
    for proc, (data, _) in zip(submitters, messages, strict=True):
        proc.stdin.write(data)
        proc.stdin.close()
    assert [proc.wait(timeout=60) for proc in submitters] == [0] * 50
    stop.touch()
    for proc in runners:
        assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()
        proc.stderr.close()
    for proc in submitters:
        proc.stdout.close()
    site.run()  # what the runners skipped while a submitter still held it
    assert received(relay) == {message_id: 1 for _, message_id in messages}
    assert site.queue.ids() == [] and os.listdir(site.queue.tmp) == []
    assert site.log_text().count("status=sent") == 50


def test_background_delivery_detaches_from_the_caller(site, relay):
    data, message_id = message_bytes()
    proc = site.helper("submit", "bob@example.org", stdin=data, BACKGROUND="1")
    assert proc.returncode == 0
    msg_id = proc.stdout.decode().strip()
    wait_for(lambda: received(relay) == {message_id: 1} and site.queue.ids() == [])
    wait_for(lambda: f"{msg_id}: " in site.log_text() and "status=sent" in site.log_text())
    wait_for(lambda: "QUIT" in relay.commands)


def test_background_child_also_delivers_the_drops_it_picked_up(site, relay):
    """The background pickup empties maildrop/ before the queue runner's path unit could see a
    waiting drop: what it picked up it delivers too, at once."""
    other, other_id = message_bytes(subject="dropped by another caller")
    with site.queue.spool(drop=True) as spool:
        spool.file.write(other)
        spool.commit_request({"recipients": ["carol@example.org"]})
    data, message_id = message_bytes()
    proc = site.helper("submit", "bob@example.org", stdin=data, BACKGROUND="1")
    assert proc.returncode == 0
    wait_for(lambda: received(relay) == {message_id: 1, other_id: 1})
    wait_for(lambda: site.queue.ids() == [] and os.listdir(site.queue.maildrop) == [])


def test_background_child_holds_no_descriptor_of_the_caller(site_factory, relay):
    with socket.socket() as silent:  # accepts connections, never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        site = site_factory(relay, SMTP_PORT=str(silent.getsockname()[1]), SMTP_TIMEOUT="50")
        data, _ = message_bytes()
        # capture_output waits for EOF on stdout/stderr: it returns while the child still waits
        # for a greeting only if the child holds neither of them
        proc = site.helper("submit", "bob@example.org", stdin=data, BACKGROUND="1", timeout=20)
        assert proc.returncode == 0 and proc.stderr == b""
        silent.settimeout(20)
        connection, _ = silent.accept()  # the child is there, after the caller has exited
        connection.close()  # it gives up and leaves the message queued
    msg_id = proc.stdout.decode().strip()
    wait_for(lambda: f"{msg_id}: " in site.log_text() and "status=deferred" in site.log_text())
    assert site.queue.ids() == [msg_id]


