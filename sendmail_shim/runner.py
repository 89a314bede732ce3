"""Delivery from the queue: the queue run (``-q``), one message now (``-odi``), in the background.

What one attempt does with one message, and the words for its outcome (sent, deferred, bounced,
expired), is attempt.py; this module decides which messages are tried, when, and over which
connection.

A queue run delivers over SENDMAIL_SHIM_QUEUE_CONNECTIONS connections in parallel, one worker
thread each, taking the next due message from a shared list; each connection carries many messages.
When the relay offers PIPELINING, a message's MAIL, RCPT and DATA go out right behind the previous
message's data, before its final reply is read: one round trip per message (see `_Run.work`). The
password is fetched once per run; a connection that cannot be opened retires its worker while
others go on, so a refused login costs at most one AUTH per connection. A message is only touched
under its lock (`Queue.lock`), so workers, concurrent runners and background deliveries never send
it twice. The failure reports an attempt queues go out in the same run. With several accounts
(accounts.py), each account's messages go over that account's own connections, all accounts at
the same time, after the messages that waited too long moved to a fallback (failover.py).
"""

import threading
import time
from collections import deque
from types import SimpleNamespace
from typing import Callable, Iterator, NamedTuple

from . import clock, failover, ledger, pickup, postsuper
from .accounts import DEFAULT
from .attempt import MAX_WAIT, Attempt, Outcome, RelayConnection, login_secret
from .errors import ConfigError, DataError, ShimError
from .log import QMGR
from .queue import Queue, crash_point
from .queued import QueuedMessage


class RunStats(SimpleNamespace):
    """What a queue run did, counted."""

    def __init__(self):
        super().__init__(
            picked_up=0,  # maildrop files accepted into the queue
            refused_drops=0,  # maildrop files refused (moved to corrupt/)
            sent=0,  # messages done: every recipient took it
            deferred=0,  # messages tried and kept for a retry
            bounced=0,  # messages given up after a permanent refusal (moved to failed/)
            expired=0,  # messages given up as too old (moved to failed/)
            bounces=0,  # failure reports queued
            busy=0,  # skipped: another process holds them
        )


class Selector(NamedTuple):
    """``-qI``/``-qR``/``-qS`` substring (case-insensitive) of the id, a recipient or the sender.
    Selected messages are tried now, whatever their next-attempt time (as Postfix's flush)."""

    kind: str  # I, R or S
    text: str

    def matches(self, message: QueuedMessage) -> bool:
        text = self.text.lower()
        if self.kind == "I":
            return text in message.id.lower()
        if self.kind == "R":
            return any(text in r.address.lower() for r in message.deferred)
        env = message.envelope
        return any(text in (a or "").lower() for a in (env.sender, env.requested_sender))


def run_queue(config, queue: Queue, *, log, selector: Selector | None = None,
              progress: Callable[[int, int, str], None] | None = None, password=None,
              transcript: Callable[[str], None] | None = None, due_only: bool = True) -> RunStats:
    """Take in maildrop/, then try the queued messages, over up to SENDMAIL_SHIM_QUEUE_CONNECTIONS
    connections in parallel: with `due_only` (automatic runs: ``-q --due``, the runner service)
    those whose next-attempt time has come; without (the administrator's ``-q``, as sendmail 8's
    ``-q`` and Postfix's ``postqueue -f``) every one, whatever its backoff; with a `selector`
    (``-qR``/``-qS``/``-qI``) the selected ones, whatever their backoff.

    `progress(done, total, line)` is called after each message with its log line (from one thread
    at a time). `password` (a Secret) skips the credential lookup. Raises PolicyError when this
    user may not run the queue and ConfigError when no sender is configured; delivery problems
    are only counted.
    """
    config.require_sender()
    queue.ensure()
    queue.check_access()
    stats = RunStats()
    queue.clean_tmp()
    postsuper.purge(config, queue, log)
    pickup.pick_up(config, queue, log, stats)
    failover.move_waiting(config, queue, log)
    shared = threading.Lock()
    runs = [_Run(account, queue, log, stats, selector, progress, due_only, shared, others=config.accounts)
            for account in (config, *config.accounts.values())]
    jobs = []  # (run, connection): one worker each, every account's at the same time
    for run in runs:
        secret = login_secret(run.config, password if run.config is config else None)
        for n in range(1, run.workers + 1):
            label = f"{run.config.account} {n}" if config.accounts else n
            shown = _numbered(transcript, label) if transcript and (run.workers > 1 or config.accounts) else transcript
            jobs.append((run, RelayConnection(run.config, secret, shown, log)))
    threads = [threading.Thread(target=run.work, args=(connection,), name=f"sendmail-shim queue {n}", daemon=True)
               for n, (run, connection) in enumerate(jobs[1:], 2)]  # daemons: ^C ends the run at once
    for thread in threads:
        thread.start()
    if jobs:
        jobs[0][0].work(jobs[0][1])
    for thread in threads:
        thread.join()
    for run in runs:
        if run.error:
            raise run.error
    return stats


def _numbered(transcript: Callable[[str], None], n) -> Callable[[str], None]:
    return lambda line: transcript(f"[{n}] {line}")


class _Run:
    """What the workers of one account in a queue run share: the account's due messages not taken
    yet and the counts, behind the lock of the whole run. The default account's run also takes
    the messages of an account no longer configured (`others`: the other accounts)."""

    def __init__(self, config, queue: Queue, log, stats: RunStats, selector, progress, due_only: bool = True,
                 lock=None, others=()):
        self.config, self.queue, self.log, self.stats = config, queue, log, stats
        self.selector, self.progress, self.due_only = selector, progress, due_only
        self.lock = lock or threading.Lock()
        self.others = others
        listed = time.time()
        self.todo = deque(msg_id for msg_id in queue.ids() if self._wanted(msg_id))
        self.active = dict.fromkeys(self.todo, listed)  # id → when the run took it on (the log's delays=)
        self.done, self.total = 0, len(self.todo)
        self.workers = min(config.queue_connections, len(self.todo))  # still taking messages
        self.ledger = ledger.for_account(config)
        self.error: Exception | None = None

    def _wanted(self, msg_id: str) -> bool:
        try:
            message = self.queue.load(msg_id)
        except DataError as exc:  # a damaged envelope.json: kept for the administrator
            self.log.warning(QMGR, f"{exc}; left in the queue", msg_id=msg_id)
            return False
        return message is not None and self._ours(message) and self.due(message)

    def _ours(self, message: QueuedMessage) -> bool:
        account = message.envelope.account or DEFAULT
        return account == self.config.account or (self.config.account == DEFAULT and account not in self.others)

    def due(self, message: QueuedMessage) -> bool:
        """Selected messages are tried whatever their next-attempt time (as Postfix's flush); the
        others only once it has come, unless the run is not `due_only` (the administrator's -q)."""
        if self.selector:
            return self.selector.matches(message)
        return not self.due_only or message.next_attempt <= clock.now()

    def work(self, connection: RelayConnection) -> None:
        """One worker: messages over its own connection until none is left.

        Each message's envelope goes out before the previous message's final reply is read: with
        PIPELINING right behind that message's data, so that a message costs one round trip. The
        previous message is settled before this one's data goes out; a worker holds two locks.
        The steps of messages A, B, C on one connection (each `Attempt` phase is named after the
        `smtp.Relay` call it makes)::

            A.begin   MAIL/RCPT/DATA of A
            A.transfer                        A's data and its dot
            B.begin                                     MAIL/RCPT/DATA of B, pipelined behind A's dot
            A.collect                                   A's final reply read, A recorded and unlocked
            B.transfer                                  B's data and its dot
            C.begin …   B.collect …   C.transfer …      and so on; the last one is collected alone
        """
        flight = steps = None  # the previous message's last step (its final reply), this one's
        try:
            while (msg_id := self._take(flight)) is not None and self._usable(connection, msg_id):
                steps = self._deliver(msg_id, connection, flight)
                next(steps, None)  # locked, its envelope on its way
                _drain(flight)  # the previous message: final reply read, outcome recorded, unlocked
                next(steps, None)  # its data
                flight = steps
            _drain(flight)
        except Exception as exc:  # the run stops; run_queue raises it
            with self.lock:
                self.error = self.error or exc
                self.todo.clear()
        finally:
            for unfinished in (flight, steps):
                if unfinished is not None:
                    unfinished.close()  # after an error: its lock is released
            connection.close()

    def _usable(self, connection: RelayConnection, msg_id: str) -> bool:
        """Whether to go on over this connection. When it cannot be opened and other workers are
        still going, the message goes back to them untouched and this worker stops; the last
        worker goes on, and defers what is left with the reason."""
        try:
            connection.connect()
            return True
        except ShimError:
            with self.lock:
                if self.workers == 1:
                    return True
                self.workers -= 1
                self.todo.appendleft(msg_id)
                return False

    def _take(self, flight: Iterator[None] | None) -> str | None:
        """The next message; when none is left, the one in flight is finished first, for its
        failure report is one more."""
        with self.lock:
            if self.todo:
                return self.todo.popleft()
        _drain(flight)
        with self.lock:
            if self.todo:
                return self.todo.popleft()
            self.workers -= 1
            return None

    def _deliver(self, msg_id: str, connection: RelayConnection, flight: Iterator[None] | None) -> Iterator[None]:
        """One message in the steps `work` interleaves with its neighbours': locked and its
        envelope sent; its data sent; its final reply read and the outcome recorded. Before its
        envelope goes out it may have to settle the message in `flight` (a new connection, a
        wait for the budget). A message tried again at once (`Outcome.again`) goes to the front
        of the list."""
        attempt = Attempt(self.config, self.queue, connection, self.log, interactive=False,
                          active=self.active.get(msg_id), ledger=self.ledger, max_wait=MAX_WAIT,
                          settle_previous=lambda: _drain(flight))
        outcome, busy = None, False
        try:
            with self.queue.lock(msg_id) as message:
                busy = message is None
                if message is not None and self.due(message):  # still: another process may have tried it
                    crash_point("deliver-locked")
                    attempt.begin(message)
                    yield
                    attempt.transfer()
                    yield
                    outcome = attempt.collect()
        except DataError as exc:  # a damaged envelope.json: kept for the administrator
            self.log.warning(QMGR, f"{exc}; left in the queue", msg_id=msg_id)
        with self.lock:
            self.done += 1
            self.stats.busy += busy
            if outcome is None:
                return
            if outcome.again:
                self.todo.appendleft(msg_id)
                self.total += 1
                return
            _count(self.stats, outcome)
            self.stats.bounces += len(attempt.bounces)
            self.todo.extend(attempt.bounces)  # reports go out in the same run
            self.active.update(dict.fromkeys(attempt.bounces, time.time()))
            self.total += len(attempt.bounces)
            if self.progress:
                self.progress(self.done, self.total, attempt.last_line)


def deliver_now(config, queue: Queue, msg_id: str, *, log, password=None,
                transcript: Callable[[str], None] | None = None, interactive: bool = True) -> Outcome:
    """Try one queued message now (``-odi``, and the background child).

    Interactive (the caller waits): permanent refusals are the caller's to report — the message is
    not kept and no bounce is sent; `Outcome.error` carries the SMTPFailure (its exit_code is the
    caller's exit status). Temporary failures keep it queued (``kept``). Not interactive: as a
    queue run would (bounce, failed/).
    """
    config.require_sender()
    connection = None
    try:
        with queue.lock(msg_id) as message:
            if message is None:
                return Outcome(msg_id, "busy", kept=True)
            crash_point("deliver-locked")
            config = _account_of(config, message)
            connection = RelayConnection(config, login_secret(config, password), transcript, log)
            reports, again = [], True
            while again:  # more recipients than one transaction takes, or a new connection
                attempt = Attempt(config, queue, connection, log, interactive=interactive)
                outcome = attempt.run(message)
                reports, again = reports + attempt.bounces, outcome.again
        for report in reports:
            with queue.lock(report) as message:
                if message is not None:
                    Attempt(config, queue, connection, log, interactive=False).run(message)
        return outcome
    finally:
        if connection is not None:
            connection.close()


def _account_of(config, message: QueuedMessage):
    """The configuration of the account that carries `message` (the default one for an account
    no longer configured)."""
    try:
        return config.for_account(message.envelope.account)
    except ConfigError:
        return config


def pick_up_and_deliver(config, queue: Queue, msg_id: str, *, log) -> None:
    """The background process (background.py): take in maildrop/ (where an ``-odb`` caller left
    `msg_id`), then deliver, as a queue run would, `msg_id` and whatever the pickup queued —
    other callers' drops too, which the pickup took from the queue runner's trigger."""
    config.require_sender()
    for queued in dict.fromkeys([msg_id, *pickup.pick_up(config, queue, log, RunStats())]):
        deliver_now(config, queue, queued, log=log, interactive=False)


def _drain(steps: Iterator[None] | None) -> None:
    """Run what is left of a message's steps (nothing, once they are done)."""
    for _step in steps or ():
        pass


def _count(stats: RunStats, outcome: Outcome) -> None:
    if outcome.status in ("sent", "deferred", "bounced", "expired"):
        setattr(stats, outcome.status, getattr(stats, outcome.status) + 1)
