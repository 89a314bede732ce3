"""Sending budgets: how much one provider account may send, and when the next message may go.

A `Budget` holds the limits a provider puts on one account (messages per connection, per minute,
hour and day, recipients per message and per day, parallel connections) and how its day is
counted: a rolling 24 hours (Gmail, Exchange Online) or the provider's calendar day, which ends
at its local midnight (163, QQ: Asia/Shanghai, UTC+8 all year). The presets' budgets are in
`providers.PRESETS` with their sources; `SMTP_*_PER_*` settings override them (config.py).

Pure: `next_slot` and `pause_until` read a record of what the account sent (`ledger.py` keeps
it in the spool) and a time; nothing here reads a clock or a file.
"""

import math
from typing import NamedTuple, Sequence

MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0
# A send is counted from when its envelope goes out; the relay counts it when it took the data,
# by its own clock: a rolling window is left this much later than ours would allow.
SLACK = 2.0


class Budget(NamedTuple):
    """None: no limit. `day_offset`: hours east of UTC where the provider's day ends at
    midnight; None for a rolling 24 hours."""

    messages_per_connection: int | None = None
    messages_per_minute: int | None = None
    messages_per_hour: int | None = None
    messages_per_day: int | None = None
    recipients_per_message: int | None = None
    recipients_per_day: int | None = None
    day_offset: float | None = None

    @property
    def window(self) -> float:
        """How far back the ledger must remember sends to decide the next slot."""
        if self.messages_per_day or self.recipients_per_day:
            return DAY
        if self.messages_per_hour:
            return HOUR
        return MINUTE if self.messages_per_minute else 0.0


# The settings that override a preset's budget: key → Budget field (config.KEYS documents them).
KEYS = {
    "SMTP_MESSAGES_PER_CONNECTION": "messages_per_connection",
    "SMTP_MESSAGES_PER_MINUTE": "messages_per_minute",
    "SMTP_MESSAGES_PER_HOUR": "messages_per_hour",
    "SMTP_MESSAGES_PER_DAY": "messages_per_day",
    "SMTP_RECIPIENTS_PER_MESSAGE": "recipients_per_message",
    "SMTP_RECIPIENTS_PER_DAY": "recipients_per_day",
}

# Why an account waits (`pause_until`): the limit a relay's reply says was reached (replies.py
# names them), or a budget the shim keeps itself.
WAITS = ("minute", "quarter", "hour", "day")
_WAIT_SECONDS = {"minute": MINUTE, "quarter": 15 * MINUTE, "hour": HOUR}


class Send(NamedTuple):
    """One message handed to the relay: when, and to how many recipients."""

    at: float
    recipients: int


def day_start(budget: Budget, now: float) -> float:
    """When the provider's current day began: its last local midnight, or 24 hours ago."""
    if budget.day_offset is None:
        return now - DAY
    offset = budget.day_offset * HOUR
    return math.floor((now + offset) / DAY) * DAY - offset


def next_slot(budget: Budget, sent: Sequence[Send], now: float, recipients: int = 1) -> float:
    """The earliest time, `now` or later, at which one more message to `recipients` recipients
    keeps the account within every limit of `budget`, given what it `sent` (oldest first)."""
    slot = now
    for limit, window in ((budget.messages_per_minute, MINUTE), (budget.messages_per_hour, HOUR)):
        if limit:
            recent = [s.at for s in sent if s.at > now - window]
            if len(recent) >= limit:
                slot = max(slot, recent[-limit] + window + SLACK)
    today = [s for s in sent if s.at > day_start(budget, now)]
    if budget.messages_per_day and len(today) >= budget.messages_per_day:
        slot = max(slot, _day_frees(budget, today, len(today) - budget.messages_per_day, now))
    if budget.recipients_per_day:
        over = sum(s.recipients for s in today) + min(recipients, budget.recipients_per_day) - budget.recipients_per_day
        if over > 0:
            counted = 0
            for index, send in enumerate(today):  # the oldest sends whose expiry makes room
                counted += send.recipients
                if counted >= over:
                    slot = max(slot, _day_frees(budget, today, index, now))
                    break
    return slot


def _day_frees(budget: Budget, today: Sequence[Send], index: int, now: float) -> float:
    """When today's send number `index` (0: the oldest) no longer counts: 24 hours after it,
    or at the provider's next midnight."""
    if budget.day_offset is None:
        return today[index].at + DAY + SLACK
    return day_start(budget, now) + DAY


def pause_until(budget: Budget, wait: str, sent: Sequence[Send], now: float) -> float:
    """When an account that reached the limit `wait` (one of WAITS) may send again: after a
    minute, a quarter of an hour (Coremail's sender-frequency window), an hour; a daily limit
    at the provider's next midnight, or 24 hours after the oldest send of the last 24 hours
    (24 hours from now when the ledger knows of none)."""
    if wait != "day":
        return now + _WAIT_SECONDS[wait]
    if budget.day_offset is not None:
        return day_start(budget, now) + DAY
    today = [s.at for s in sent if s.at > now - DAY]
    return (today[0] if today else now) + DAY
