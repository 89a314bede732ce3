"""Failover: a message that waited too long for its account moves to a fallback account.

At the start of a queue run (`move_waiting`), each deferred message whose account has
SMTP_FALLBACK and which has waited longer than that account's SMTP_FALLBACK_AFTER since it
arrived — its account paused, or its last attempt failed for a reason that may pass (the relay
unreachable, a 4xx) — is handed, under its lock, to the first fallback account that is not
paused: its envelope names the new account (`Envelope.account`) and that account's login as
sender, and remembers the account its From: was written for (`moved_from`). The data stay as they
are on disk (their file is the message's lock); `sending_stream` gives the relay the header
block with From: rewritten to the new login (`message.rewrite_sender`). A message is in one
account's hands at a time, so it is never sent twice.
"""

import io
from typing import BinaryIO

from . import clock, ledger
from .errors import ConfigError, DataError
from .log import ctime
from .queue import Queue
from .queued import QueuedMessage

MAX_HEADER_BLOCK = 512 << 10  # a queued message's header block is bounded well below this (addresses.py)


def move_waiting(config, queue: Queue, log) -> list[str]:
    """Hand every message that waited too long to a fallback account; the ids moved."""
    if not config.accounts:
        return []
    now, moved = clock.now(), []
    for msg_id in queue.ids():
        message = _load(queue, msg_id)
        if message is None or _target(config, message, now) is None:
            continue
        with queue.lock(msg_id) as locked:  # None: another process is delivering it
            target = _target(config, locked, now) if locked is not None else None
            if target is not None:
                _move(config, queue, locked, target, log, now)
                moved.append(msg_id)
    return moved


def _load(queue: Queue, msg_id: str) -> QueuedMessage | None:
    try:
        return queue.load(msg_id)
    except DataError:  # a damaged envelope: the queue run says so
        return None


def _target(config, message: QueuedMessage, now: float):
    """The fallback account that takes `message` now, or None."""
    try:
        account = config.for_account(message.envelope.account)
    except ConfigError:
        return None
    if not account.fallback or now - message.arrival < account.fallback_after or not message.deferred:
        return None
    paused = ledger.for_account(account).read(now).pause
    if paused is None and message.attempts == 0:
        return None  # never tried, not paused: its turn has not come yet
    for name in account.fallback:
        candidate = config.for_account(name)
        if ledger.for_account(candidate).read(now).pause is None:
            return candidate
    return None


def _move(config, queue: Queue, message: QueuedMessage, target, log, now: float) -> None:
    env = message.envelope
    origin = config.for_account(env.account)
    pause = ledger.for_account(origin).read(now).pause
    why = f"paused until {ctime(pause.until)}" if pause else f"waiting since {ctime(message.arrival)}"
    message.envelope = env._replace(account=None if target is config else target.account, sender=target.sender,
                                    moved_from=env.moved_from or origin.account)
    message.next_attempt = now
    queue.save(message)
    log.moved(message.id, f"moved from account {origin.account} ({origin.sender}, {why}) to account "
                          f"{target.account} ({target.sender})")


def sending_stream(config, message: QueuedMessage) -> tuple[BinaryIO, int]:
    """The data as the relay gets them, and their size (MAIL's SIZE=): as queued, or for a message
    a fallback account took over, with From: rewritten to this account's login."""
    data, size = message.data_file, message.envelope.size
    data.seek(0)
    if not message.envelope.moved_from:
        return data, size
    from . import message as message_module

    head = data.read(MAX_HEADER_BLOCK)
    end = head.find(b"\r\n\r\n")
    if end < 0:
        data.seek(0)
        return data, size
    headers = message_module.rewrite_sender(head[:end + 4], message_module.HeaderPolicy.from_config(config))
    data.seek(end + 4)
    return _Joined(headers, data), size + len(headers) - (end + 4)


class _Joined:
    """`head`, then the rest of `tail` from where it stands."""

    def __init__(self, head: bytes, tail: BinaryIO):
        self._head, self._tail = io.BytesIO(head), tail

    def read(self, size: int = -1) -> bytes:
        chunk = self._head.read(size)
        if size < 0:
            return chunk + self._tail.read()
        return chunk if chunk else self._tail.read(size)
