"""The test relay playing a provider's sending limits, with the provider's own replies.

    relay = limited_relay(PROVIDERS["163"]._replace(per_minute=600), clock_file)

`Limits` says what the relay allows one account (messages per connection, per minute, per day,
recipients per message, connections at once) and what it answers when a client goes beyond
(`Replies`: 163's ``MI:DMC``/``MI:SFQ``/``MI:STC``, Gmail's ``5.4.5``/``4.5.3``, Exchange's
``432 4.3.2``). Time is the shim's test clock (sendmail_shim/clock.py: the real time plus the
offset in `clock_file`), so a test lets a day pass without waiting for it.

The relay counts what it accepted (`LimitedHandler.accepted`, with the time of each) and every
time a client went beyond a limit (`LimitedHandler.over`, by limit): a client that keeps its
budget leaves `over` empty.
"""

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import pytest

from sendmail_shim import clock

from .relay import RelayHandler

DAY = 86400.0


class Replies(NamedTuple):
    per_connection: str
    per_minute: str
    per_day: str
    recipients: str
    connections: str


class Limits(NamedTuple):
    """None: no limit. `day_offset`: hours east of UTC of the provider's midnight, None for a
    rolling 24 hours (as budgets.Budget)."""

    replies: Replies
    per_connection: int | None = None
    per_minute: int | None = None
    per_day: int | None = None
    recipients: int | None = None
    connections: int | None = None
    day_offset: float | None = None


_COREMAIL = Replies(
    per_connection="451 MI:DMC 4 smtp.163.test,too many mails in this connection",
    per_minute="554 MI:SFQ 4 smtp.163.test,sender frequency over quota",
    per_day="550 MI:STC 4 smtp.163.test,sender daily count over quota",
    recipients="450 RP:DRC 4 smtp.163.test,too many recipients in this connection",
    connections="421 HL:ICC 4 smtp.163.test,too many connections from your IP",
)
_GMAIL = Replies(
    per_connection="421 4.7.0 Try again later, closing connection.",
    per_minute="421 4.7.0 Try again later, closing connection.",
    per_day="550 5.4.5 Daily user sending limit exceeded.",
    recipients="452 4.5.3 Your message has too many recipients.",
    connections="421 4.7.0 Try again later, closing connection.",
)
_EXCHANGE = Replies(
    per_connection="421 4.3.2 Service not available, closing transmission channel",
    per_minute="421 4.3.2 Service not available, closing transmission channel",
    per_day="554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException",
    recipients="452 4.5.3 Too many recipients",
    connections="432 4.3.2 Concurrent connections limit exceeded",
)
PROVIDERS = {
    "163": Limits(_COREMAIL, per_connection=10, connections=1, day_offset=8.0),
    "gmail": Limits(_GMAIL, per_day=500, recipients=100),
    "outlook": Limits(_EXCHANGE, per_minute=30, connections=3),
}


@dataclass
class LimitedHandler(RelayHandler):
    """`RelayHandler` with a provider's limits (`limits`, on the clock in `clock_file`)."""

    limits: Limits = None
    clock_file: str = ""
    accepted: list = field(default_factory=list)  # (time, number of recipients) of each message taken
    over: Counter = field(default_factory=Counter)  # limit → how often a client went beyond it
    most_sessions: int = 0  # the most connections open at once

    def now(self) -> float:
        return time.time() + clock.offset(self.clock_file)

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        limits, now = self.limits, self.now()
        self.most_sessions = max(self.most_sessions, self.open_connections)
        taken = getattr(session, "messages_taken", 0)
        for name, beyond in (
            ("connections", limits.connections and self.open_connections > limits.connections),
            ("per_connection", limits.per_connection and taken >= limits.per_connection),
            ("per_minute", limits.per_minute and sum(at > now - 60 for at, _n in self.accepted) >= limits.per_minute),
            ("per_day", limits.per_day and len(self._today(now)) >= limits.per_day),
        ):
            if beyond:
                self.over[name] += 1
                return getattr(limits.replies, name)
        return await super().handle_MAIL(server, session, envelope, address, mail_options)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.limits.recipients and len(envelope.rcpt_tos) >= self.limits.recipients:
            self.over["recipients"] += 1
            return self.limits.replies.recipients
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)

    async def handle_DATA(self, server, session, envelope):
        count = len(self.messages)
        reply = await super().handle_DATA(server, session, envelope)
        if len(self.messages) > count:
            session.messages_taken = getattr(session, "messages_taken", 0) + 1
            self.accepted.append((self.now(), len(envelope.rcpt_tos)))
        return reply

    def _today(self, now: float) -> list:
        offset = self.limits.day_offset
        if offset is None:
            start = now - DAY
        else:
            start = (now + offset * 3600) // DAY * DAY - offset * 3600
        return [at for at, _n in self.accepted if at > start]


@pytest.fixture
def clock_file(tmp_path, monkeypatch) -> str:
    """The test clock (sendmail_shim/clock.py), shared by the relay, this test's `clock.now()`
    and the shim runs that get it in their environment."""
    path = tmp_path / "clock"
    path.write_text("0")
    monkeypatch.setenv(clock.TEST_CLOCK, str(path))
    return str(path)


def limited_relay(relay_factory, limits: Limits, clock_file: str, **options):
    """A started relay (see tests/relay.py's `relay_factory`) enforcing `limits`."""
    server = relay_factory(handler_class=LimitedHandler, **options)
    server.handler.limits, server.handler.clock_file = limits, clock_file
    return server
