"""Provider-aware delivery through the real console script, against a relay that plays the
provider's limits with its own replies (tests/provider_relay.py), on a clock the test controls
(sendmail_shim/clock.py): budgets kept, a quota pausing the account instead of bouncing, a
connection's share, recipients split over transactions. The relay counts every message it took
and every time a client went beyond a limit."""

import datetime
import email
import re
from collections import Counter

import pytest

from sendmail_shim import clock, config as config_module
from sendmail_shim.envelope import Envelope
from sendmail_shim.queue import Queue
from tests.provider_relay import PROVIDERS, Limits, limited_relay

pytestmark = pytest.mark.e2e


def limited_shim(shim_factory, relay, clock_file, **settings):
    shim = shim_factory(relay, **settings)
    shim.env[clock.TEST_CLOCK] = clock_file
    return shim


def queue_messages(shim, count: int, recipients=("bob@example.test",)) -> list[str]:
    """`count` messages in the shim's queue (as -odq leaves them), each with its own Message-ID."""
    conf = config_module.load({}, explicit=str(shim.config_file))
    queue = Queue(conf.queue_dir)
    queue.ensure()
    ids = []
    for n in range(count):
        message_id = f"<m{n}@limits.test>"
        data = (f"From: {conf.sender}\r\nTo: {', '.join(recipients)}\r\nSubject: n{n}\r\n"
                f"Message-ID: {message_id}\r\n\r\nbody {n}\r\n").encode()
        with queue.spool() as spool:
            spool.file.write(data)
            spool.commit(Envelope(sender=conf.sender, recipients=list(recipients), size=len(data)))
        ids.append(message_id)
    return ids


def received_ids(relay) -> Counter:
    return Counter(email.message_from_bytes(m.data)["Message-ID"] for m in relay.messages)


def test_a_backlog_of_1000_drains_within_163s_limits_each_message_once(relay_factory, shim_factory, clock_file):
    limits = PROVIDERS["163"]._replace(per_minute=600)
    relay = limited_relay(relay_factory, limits, clock_file, pipelining=True)
    shim = limited_shim(shim_factory, relay, clock_file, SMTP_PROVIDER="163", SMTP_MESSAGES_PER_MINUTE="600")
    ids = queue_messages(shim, 1000)

    started = clock.now()
    result = shim.run("-q", "-v")

    assert received_ids(relay) == Counter(ids)  # every message exactly once
    assert relay.handler.over == Counter()  # no limit ever exceeded, as the relay counts
    assert relay.handler.most_sessions == 1
    minute_counts = Counter(int((at - started) // 60) for at, _n in relay.handler.accepted)
    assert max(minute_counts.values()) <= 600
    assert clock.now() - started >= 60  # it waited for the next minute (on the test clock)
    assert "1000 sent" in result.stderr and "0 bounces" in result.stderr
    assert shim.run("-bp").stdout == b"Mail queue is empty\n"
    assert not any("bounced" in line for line in shim.log_lines())


def test_a_daily_quota_pauses_the_account_until_the_providers_midnight(relay_factory, shim_factory, clock_file):
    relay = limited_relay(relay_factory, PROVIDERS["163"]._replace(per_day=5), clock_file)
    shim = limited_shim(shim_factory, relay, clock_file, SMTP_PROVIDER="163")
    ids = queue_messages(shim, 8)

    assert shim.run("-q").exit_code == 0
    assert len(relay.messages) == 5 and relay.handler.over == Counter(per_day=1)
    listing = shim.run("-bp").stdout.decode()
    now = datetime.datetime.fromtimestamp(clock.now(), datetime.timezone(datetime.timedelta(hours=8)))
    midnight = (now + datetime.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    until = midnight.astimezone().strftime("%a %b %d %H:%M:%S")
    assert f"paused until {until} (550 MI:STC" in listing.splitlines()[0]
    assert listing.count(f"paused until {until}") == 1 + 2  # the account, and each message held for it
    assert f"(550 MI:STC 4 smtp.163.test,sender daily count over quota; next try {until})" in listing
    assert "3 Requests" in listing
    paused = [line for line in shim.log_lines() if "paused until" in line]
    assert len(paused) == 1 and "status=bounced" not in "".join(shim.log_lines())

    assert shim.run("-q").exit_code == 0  # the administrator's flush: still paused, nothing tried
    assert len(relay.messages) == 5 and relay.handler.over == Counter(per_day=1)

    check = shim.run("--check", expect_exit=None).stdout.decode()  # the relay refuses its MAIL too
    assert f"account {relay.login} paused until {until}: 550 MI:STC" in check
    clock.advance(clock_file, to=midnight.timestamp() + 1)
    assert shim.run("-q", "--due").exit_code == 0
    assert received_ids(relay) == Counter(ids)
    assert shim.run("-bp").stdout == b"Mail queue is empty\n"
    assert len([line for line in shim.log_lines() if "paused until" in line]) == 1


def test_250_recipients_through_a_100_recipient_limit_each_get_one_copy(relay_factory, shim_factory, clock_file):
    relay = limited_relay(relay_factory, PROVIDERS["gmail"], clock_file)
    shim = limited_shim(shim_factory, relay, clock_file, SMTP_PROVIDER="gmail")
    recipients = [f"r{n}@example.test" for n in range(250)]
    message = (f"To: {', '.join(recipients[:200])}\nBcc: {', '.join(recipients[200:])}\n"
               "Subject: many\n\nhello\n").encode()

    shim.run("-t", "-odi", stdin=message)

    assert [len(m.rcpt_tos) for m in relay.messages] == [100, 100, 50]
    assert Counter(r for m in relay.messages for r in m.rcpt_tos) == Counter(recipients)
    assert all(b"Bcc" not in m.data for m in relay.messages)
    assert relay.handler.over == Counter()
    assert shim.run("-bp").stdout == b"Mail queue is empty\n"


@pytest.mark.parametrize("provider, told", [("163", True), ("custom", False)])
def test_a_connection_carries_its_share_then_a_new_one_opens(relay_factory, shim_factory, clock_file,
                                                            provider, told):
    """163's budget is known (10 a connection): never exceeded. A relay whose limit is not known
    answers 421 to MAIL: the message goes again at once over a new connection."""
    limits = Limits(PROVIDERS["163"].replies._replace(per_connection="421 4.7.0 too many messages, closing"),
                    per_connection=10 if told else 4)
    relay = limited_relay(relay_factory, limits, clock_file)
    shim = limited_shim(shim_factory, relay, clock_file, SMTP_PROVIDER=provider,
                        SENDMAIL_SHIM_QUEUE_CONNECTIONS="1")
    ids = queue_messages(shim, 25)

    shim.run("-q")

    assert received_ids(relay) == Counter(ids)
    assert relay.handler.over == (Counter() if told else Counter(per_connection=6))
    assert not any("status=deferred" in line for line in shim.log_lines()) or not told
    assert shim.run("-bp").stdout == b"Mail queue is empty\n"


def test_a_throttled_account_pauses_and_odi_says_until_when(relay_factory, shim_factory, clock_file):
    relay = limited_relay(relay_factory, PROVIDERS["gmail"]._replace(per_minute=2), clock_file)
    shim = limited_shim(shim_factory, relay, clock_file, SMTP_PROVIDER="gmail")
    for n in range(2):
        shim.run("-odi", "bob@example.test", stdin=f"Subject: {n}\n\nhi\n".encode())

    third = shim.run("-odi", "bob@example.test", stdin=b"Subject: 2\n\nhi\n")  # queued: exit 0, as sendmail

    assert "queued for retry: MAIL refused: 421 4.7.0" in third.stderr
    fourth = shim.run("-odi", "bob@example.test", stdin=b"Subject: 3\n\nhi\n")
    assert re.search(r"queued for retry: account alice@163.test paused until \w{3} \w{3} [ \d]\d [\d:]{8}: 421",
                     fourth.stderr)
    assert relay.handler.over == Counter(per_minute=1)  # the second refusal never happened: paused
    clock.advance(clock_file, by=61)
    shim.run("-q", "--due")
    assert len(relay.messages) == 4 and relay.handler.over == Counter(per_minute=1)
    check = shim.run("--check", expect_exit=None).stdout.decode()  # a refused try counts too: 3 + 2
    assert "sent within the sending budget's window: 5 message(s) to 5 recipient(s)" in check


def test_a_spool_that_cannot_keep_the_count_holds_the_mail_and_says_why(relay_factory, shim_factory, clock_file):
    """accounts/ cannot be made (a file in its place, as a full or broken disk would refuse it):
    nothing is sent uncounted, nothing is lost, the run goes on, the log and mailq say why."""
    relay = limited_relay(relay_factory, PROVIDERS["gmail"], clock_file)
    shim = limited_shim(shim_factory, relay, clock_file, SMTP_PROVIDER="gmail")
    queue_messages(shim, 2)
    (shim.queue_dir / "accounts").write_text("not a directory")

    assert shim.run("-q").exit_code == 0
    assert relay.messages == []
    listing = shim.run("-bp").stdout.decode()
    assert listing.count("cannot keep the sending budget in") == 2 and "2 Requests" in listing
    assert sum(": error: " in line and "cannot keep the sending budget" in line for line in shim.log_lines()) == 2

    (shim.queue_dir / "accounts").unlink()
    shim.run("-q")
    assert len(relay.messages) == 2 and shim.run("-bp").stdout == b"Mail queue is empty\n"
