"""Delivery from the queue: the queue run (``-q``), one message now (``-odi``), in the background.

Per attempt, each still-pending recipient gets a verdict:

- accepted → sent;
- refused with 5xx (at RCPT, or the whole message at MAIL/DATA/end of data) → failed, and a
  failure report (`bounce`) goes to the submitting account (SENDMAIL_SHIM_BOUNCE_TO, else its
  alias, else the login; never to an unverified -f) — immediately, not after the retries;
- anything else → stays pending: 4xx replies, but also every failure to connect, verify TLS or
  log in (the set-up may be fixed by then). The message is tried again after a backoff (1 min,
  doubling, at most 1 h) until it is older than SENDMAIL_SHIM_MAX_QUEUE_AGE, then it fails too.

A message whose recipients are all settled leaves queue/ (logged ``removed``, as Postfix's qmgr):
removed when everything was sent, moved to failed/ otherwise. The connection dying after the whole
message went out and before the relay's reply is logged ``status=deferred (… -- message may be
sent more than once)``, as Postfix does, and retried (the recipient may get it twice, as with
every MTA); so is a crash between the relay's acceptance and the state update on disk. A
state update the disk refuses (full) is not a crash: the recipients who took the message are
marked in a way that needs no new block (`Queue.mark_sent`), and the run goes on.

A queue run delivers over SENDMAIL_SHIM_QUEUE_CONNECTIONS connections in parallel, one worker
thread each, taking the next due message from a shared list; each connection carries many messages.
When the relay offers PIPELINING, a message's MAIL, RCPT and DATA go out right behind the previous
message's data, before its final reply is read: one round trip per message. The password is
fetched once per run; a connection that cannot be opened retires its worker while others go on,
so a refused login costs at most one AUTH per connection. A message is only touched under its
lock (`Queue.lock`), so workers, concurrent runners and background deliveries never send it twice.
"""

import threading
import time
from collections import deque
from types import SimpleNamespace
from typing import Callable, Iterator, NamedTuple

from . import pickup, postsuper, replies
from .errors import CantCreate, ConfigError, DataError, ShimError, SMTPFailure
from .i18n import _
from .log import QMGR, SMTP, Timing, dsn_for, relay_name
from .queue import Queue, QueuedMessage, crash_point, next_attempt_after

# What a queue file, mailq, a report and a message's log line say of a local configuration error
# (ConfigError: a failing SMTP_PASSWORD_COMMAND, whose stderr may hold a token, a CA file…): the
# log's error line has its message, `--check` (run by the administrator) its details.
LOCAL_ERROR = "local configuration error, see the log"


class Outcome(NamedTuple):
    """What `deliver_now` did with one message."""

    msg_id: str
    status: str  # sent | deferred | failed | busy (another process is delivering it)
    error: ShimError | None = None  # why it is not (entirely) sent
    kept: bool = False  # still in queue/, to be retried


class RunStats(SimpleNamespace):
    """What a queue run did, counted."""

    def __init__(self):
        super().__init__(
            picked_up=0,  # maildrop files accepted into the queue
            refused_drops=0,  # maildrop files refused (moved to corrupt/)
            sent=0,  # messages done: every recipient accepted
            deferred=0,  # messages tried and kept for a retry
            failed=0,  # messages moved to failed/
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
            return any(text in r.address.lower() for r in message.pending)
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
    postsuper.expire(config, queue, log)
    pickup.pick_up(config, queue, log, stats)
    run = _Run(config, queue, log, stats, selector, progress, due_only)
    password = _Password(config, password)
    sessions = [_Session(config, password, _numbered(transcript, n) if transcript and run.workers > 1 else transcript,
                         log)
                for n in range(1, run.workers + 1)]
    threads = [threading.Thread(target=run.work, args=(session,), name=f"sendmail-shim queue {n}", daemon=True)
               for n, session in enumerate(sessions[1:], 2)]  # daemons: ^C ends the run at once
    for thread in threads:
        thread.start()
    if sessions:
        run.work(sessions[0])
    for thread in threads:
        thread.join()
    if run.error:
        raise run.error
    return stats


def _numbered(transcript: Callable[[str], None], n: int) -> Callable[[str], None]:
    return lambda line: transcript(f"[{n}] {line}")


class _Run:
    """What the workers of a queue run share: the due messages not taken yet and the counts,
    behind one lock."""

    def __init__(self, config, queue: Queue, log, stats: RunStats, selector, progress, due_only: bool = True):
        self.config, self.queue, self.log, self.stats = config, queue, log, stats
        self.selector, self.progress, self.due_only = selector, progress, due_only
        self.lock = threading.Lock()
        listed = time.time()
        self.todo = deque(msg_id for msg_id in queue.ids() if self._wanted(msg_id))
        self.active = dict.fromkeys(self.todo, listed)  # id → when the run took it on (the log's delays=)
        self.done, self.total = 0, len(self.todo)
        self.workers = min(config.queue_connections, len(self.todo))  # still taking messages
        self.error: Exception | None = None

    def _wanted(self, msg_id: str) -> bool:
        try:
            message = self.queue.load(msg_id)
        except DataError as exc:  # a damaged envelope.json: kept for the administrator
            self.log.warning(QMGR, f"{exc}; left in the queue", msg_id=msg_id)
            return False
        return message is not None and self.due(message)

    def due(self, message: QueuedMessage) -> bool:
        """Selected messages are tried whatever their next-attempt time (as Postfix's flush); the
        others only once it has come, unless the run is not `due_only` (the administrator's -q)."""
        if self.selector:
            return self.selector.matches(message)
        return not self.due_only or message.next_attempt <= time.time()

    def work(self, session: "_Session") -> None:
        """One worker: messages over its own connection until none is left.

        Each message's envelope goes out before the previous message's final reply is read: with
        PIPELINING right behind that message's data, so that a message costs one round trip. The
        previous message is settled before this one's data goes out; a worker holds two locks.
        The steps of messages A, B, C on one connection (each `_Attempt` phase is named after the
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
            while (msg_id := self._take(flight)) is not None and self._usable(session, msg_id):
                steps = self._deliver(msg_id, session)
                next(steps, None)  # locked, its envelope on its way
                _finish(flight)  # the previous message: final reply read, outcome recorded, unlocked
                next(steps, None)  # its data
                flight = steps
            _finish(flight)
        except Exception as exc:  # the run stops; run_queue raises it
            with self.lock:
                self.error = self.error or exc
                self.todo.clear()
        finally:
            for unfinished in (flight, steps):
                if unfinished is not None:
                    unfinished.close()  # after an error: its lock is released
            session.close()

    def _usable(self, session: "_Session", msg_id: str) -> bool:
        """Whether to go on over this connection. When it cannot be opened and other workers are
        still going, the message goes back to them untouched and this worker stops; the last
        worker goes on, and defers what is left with the reason."""
        try:
            session.connect()
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
        _finish(flight)
        with self.lock:
            if self.todo:
                return self.todo.popleft()
            self.workers -= 1
            return None

    def _deliver(self, msg_id: str, session: "_Session") -> Iterator[None]:
        """One message in the steps `work` interleaves with its neighbours': locked and its
        envelope sent; its data sent; its final reply read and the outcome recorded."""
        attempt = _Attempt(self.config, self.queue, session, self.log, interactive=False,
                           active=self.active.get(msg_id))
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
    session = _Session(config, _Password(config, password), transcript, log)
    try:
        with queue.lock(msg_id) as message:
            if message is None:
                return Outcome(msg_id, "busy", kept=True)
            crash_point("deliver-locked")
            attempt = _Attempt(config, queue, session, log, interactive=interactive)
            outcome = attempt.run(message)
        for report in attempt.bounces:
            with queue.lock(report) as message:
                if message is not None:
                    _Attempt(config, queue, session, log, interactive=False).run(message)
        return outcome
    finally:
        session.close()


def pick_up_and_deliver(config, queue: Queue, msg_id: str, *, log) -> None:
    """The background process (background.py): take in maildrop/ (where an ``-odb`` caller left
    `msg_id`), then deliver, as a queue run would, `msg_id` and whatever the pickup queued —
    other callers' drops too, which the pickup took from the queue runner's trigger."""
    config.require_sender()
    for queued in dict.fromkeys([msg_id, *pickup.pick_up(config, queue, log, RunStats())]):
        deliver_now(config, queue, queued, log=log, interactive=False)


def _finish(steps: Iterator[None] | None) -> None:
    """Run what is left of a message's steps (nothing, once they are done)."""
    for _step in steps or ():
        pass


def _count(stats: RunStats, outcome: Outcome) -> None:
    if outcome.status == "sent":
        stats.sent += 1
    elif outcome.status == "failed":
        stats.failed += 1
    elif outcome.status == "deferred":
        stats.deferred += 1


# -- one attempt -------------------------------------------------------------------------------


class _Password:
    """The password of a run, for all its connections: fetched once, on the first AUTH (after
    TLS is up); a failure to get it is remembered too."""

    def __init__(self, config, secret=None):
        self.config = config
        self._secret, self._error = secret, None
        self._lock = threading.Lock()

    def __call__(self):
        with self._lock:
            if self._secret is None and self._error is None:
                from . import credentials

                try:
                    self._secret = credentials.get_password(self.config)
                except ShimError as exc:
                    self._error = exc
            if self._error:
                raise self._error
            return self._secret


class _Session:
    """One relay connection of a run: opened on first use, reopened after a broken transaction;
    when opening fails, every later message over it is deferred with the same reason."""

    def __init__(self, config, password: _Password, transcript, log):
        self.config = config
        self.transcript = transcript
        self.log = log
        self._password = password
        self.relay = None
        self.down: ShimError | None = None
        self.peer: str | None = None  # the relay's address the last connection reached (the log's relay=)

    def connect(self):
        from .smtp import Relay

        if self.down:
            raise self.down
        if self.relay is not None and not self.relay.usable:  # a failed RSET after a refusal
            self.close()
        if self.relay is None:
            relay = Relay(self.config, self._password, transcript=self.transcript, warn=self.warn)
            try:
                relay.open()
            except ShimError as exc:
                self.down, self.peer = exc, relay.peer_address
                if isinstance(exc, ConfigError):  # the messages say only LOCAL_ERROR
                    self.log.error(SMTP, f"local configuration error: {exc.args[0]} (details: sendmail-shim --check)")
                raise
            self.relay, self.peer = relay, relay.peer_address
        return self.relay

    def warn(self, text: str) -> None:
        """SMTP_TLS_VERIFY=no warns on every use, in the log at least; so does a relay without
        8BITMIME."""
        self.log.warning(SMTP, text)

    def close(self) -> None:
        relay, self.relay = self.relay, None
        if relay is not None:
            relay.close()


class _Tracked:
    """The message data as the relay reads it; `exhausted` once all of it was handed over, after
    which a lost connection leaves it unknown whether the relay took the message."""

    def __init__(self, stream):
        self._stream = stream
        self.exhausted = False

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self.exhausted = self.exhausted or not data
        return data


class _Attempt:
    """One delivery attempt of one locked message, and everything that follows from it.

    In three steps named after the `smtp.Relay` calls they make, so that a queue run can overlap
    neighbours (`_Run.work`): `begin` (the envelope goes out), `transfer` (the data), `collect`
    (the final reply, the outcome); `run` takes them in a row."""

    def __init__(self, config, queue: Queue, session: _Session, log, *, interactive: bool,
                 active: float | None = None):
        self.config, self.queue, self.session, self.log = config, queue, session, log
        self.interactive = interactive
        self.active = active  # when the queue run took the message on (default: the attempt's start)
        self.bounces: list[str] = []
        self.last_line = ""
        self._transaction = None  # smtp.Transaction under way
        self._result: tuple[dict, ShimError | None, bool] | None = None  # see _failure, once known

    def run(self, message: QueuedMessage) -> Outcome:
        self.begin(message)
        self.transfer()
        return self.collect()

    def begin(self, message: QueuedMessage) -> None:
        self.message, self.now = message, time.time()
        self.pending = message.pending
        self.relay = self.connected = None
        env = message.envelope
        self.log.active(message.id, sender=env.sender, size=env.size, nrcpt=len(self.pending))
        if self.now - message.arrival > self.config.max_queue_age or not self.pending:
            return  # nothing to send: `collect` settles it
        self.data = _Tracked(message.data_file)
        message.data_file.seek(0)
        try:
            self.relay = self.session.connect()
            self.connected = time.time()  # at once over a connection already open
            self._transaction = self.relay.begin(
                message.envelope._replace(recipients=[r.address for r in self.pending]))
        except ShimError as exc:
            self._result = self._failure(exc)

    def transfer(self) -> None:
        if self._transaction is not None and self._result is None:
            try:
                self.relay.transfer(self._transaction, self.data)
            except ShimError as exc:
                self._result = self._failure(exc)

    def collect(self) -> Outcome:
        message, now, pending = self.message, self.now, self.pending
        if now - message.arrival > self.config.max_queue_age:
            return self._expire(message, now)
        if not pending:
            return self._settle(message, [], None, now)
        verdicts, error, ambiguous = self._result or self._collect()
        for rcpt in pending:
            rcpt.attempts += 1
            rcpt.state, rcpt.reply = verdicts[rcpt.address]
        message.attempts += 1
        message.last_reply = _reply_text(error) if error else next(iter(verdicts.values()))[1]
        message.next_attempt = next_attempt_after(message.attempts, now)
        self._log(message, pending, error, ambiguous)
        return self._settle(message, [r for r in pending if r.state == "failed"], error, now)

    def _collect(self) -> tuple[dict, ShimError | None, bool]:
        """The relay's final reply: {address: (state, reply)}, the error of the attempt, ambiguity."""
        try:
            result = self.relay.collect(self._transaction)
        except ShimError as exc:
            return self._failure(exc)
        crash_point("deliver-sent")
        verdicts = {a: ("sent", result.reply) for a in result.accepted}
        verdicts.update({a: _verdict("rcpt", code, text) for a, (code, text) in result.refused.items()})
        # what the -odi caller hears about: a permanent refusal first, else a temporary one
        refusals = sorted(result.refused.items(), key=lambda item: not 500 <= item[1][0] < 600)
        error = next((SMTPFailure(code, f"{text} <{a}>", "rcpt") for a, (code, text) in refusals), None)
        return verdicts, error, False

    def _failure(self, exc: ShimError) -> tuple[dict, ShimError, bool]:
        """Verdicts after an error. A refusal of MAIL, RCPT, DATA or the data decides by its codes;
        a relay that can never take the message (DataError) fails it; anything else (connection,
        TLS, login, a lost connection) leaves it pending: ambiguous when all of the data had been
        handed over. A broken connection is replaced on the next `_Session.connect`."""
        addresses = [r.address for r in self.pending]
        if isinstance(exc, SMTPFailure) and exc.stage in replies.TRANSACTION:
            refused = getattr(exc, "refused", None) or {a: (exc.code, exc.reply) for a in addresses}
            return {a: _verdict(exc.stage, *refused[a]) for a in addresses}, exc, False
        if isinstance(exc, DataError):  # e.g. SMTPUTF8 not offered
            return {a: ("failed", str(exc)) for a in addresses}, exc, False
        return {a: ("pending", _reply_text(exc)) for a in addresses}, exc, self.data.exhausted

    def _expire(self, message: QueuedMessage, now: float) -> Outcome:
        failed = message.pending
        for rcpt in failed:
            rcpt.state = "failed"
            rcpt.reply = rcpt.reply or "never tried"
        self.last_line = self.log.expired(message.id, sender=message.envelope.sender)
        return self._settle(message, failed, None, now, expired=True)

    def _caller_reports(self, message: QueuedMessage) -> bool:
        """-odi: the waiting caller's exit status reports a refusal only when the whole message
        was refused (nobody took it, nobody may still)."""
        return self.interactive and not message.pending and not any(r.state == "sent" for r in message.recipients)

    def _settle(self, message: QueuedMessage, failed, error, now: float, expired: bool = False) -> Outcome:
        """Persist the attempt: bounce first (a crash then repeats a report, never loses one);
        when the disk cannot take it, `_hold` the message.

        The waiting -odi caller hears a refusal through its exit status only when the whole
        message was refused; once any recipient took it or still may, the refused ones get a
        report like in a queue run, so none is forgotten and a retry by the caller sends nobody
        a second copy."""
        try:
            return self._record_outcome(message, failed, error, now, expired)
        except (CantCreate, OSError) as exc:  # a full disk: the relay's verdicts are known, the disk cannot say so
            return self._hold(message, exc)

    def _record_outcome(self, message: QueuedMessage, failed, error, now: float, expired: bool) -> Outcome:
        caller_reports = bool(failed) and self._caller_reports(message)
        if failed and not caller_reports and not message.bounce:
            self.bounces.append(self._bounce(message, failed, now, expired))
        if message.pending:
            self.queue.save(message)
            status, kept = "deferred", True
        elif any(r.state == "failed" for r in message.recipients) and not caller_reports:
            reason = f"expired after {postsuper.duration(now - message.arrival)}" if expired else message.last_reply
            self.queue.fail(message, reason)
            self.log.removed(message.id)  # from queue/: kept in failed/
            status, kept = "failed", False
        else:
            self.queue.remove(message)
            self.log.removed(message.id)
            status, kept = ("failed" if failed else "sent"), False
        crash_point("deliver-recorded")
        return Outcome(message.id, status, error if caller_reports or kept else None, kept)

    def _hold(self, message: QueuedMessage, exc: Exception) -> Outcome:
        """The attempt could not be recorded. The recipients who took the message are marked in
        a way that needs no new block (`Queue.mark_sent`), so that no later attempt sends them a
        second copy; the others stay as envelope.json has them, to be tried again (a refusal
        then comes again, and its report with it)."""
        reason = getattr(exc, "strerror", None) or str(exc)  # CantCreate has its strerror in its text
        note = f"cannot record the attempt: {reason}"
        if any(r.state == "sent" for r in message.recipients):
            try:
                self.queue.mark_sent(message)
                note += "; the recipients who took it are marked as sent"
            except OSError as again:  # no inode left, a read-only or failing disk
                note += f"; nor can the recipients who took it be marked ({again.strerror}): they may get it twice"
        if any(r.state != "sent" for r in message.recipients):  # whatever their smtp lines said
            note += "; the others are tried again"
        self.last_line = self.log.error(QMGR, note, msg_id=message.id)
        error = CantCreate(_("cannot record the attempt in the queue: {reason}").format(reason=reason))
        return Outcome(message.id, "deferred", error, kept=True)

    def _bounce(self, message: QueuedMessage, failed, now: float, expired: bool) -> str:
        from . import bounce

        message.data_file.seek(0)
        original = bounce.header_block(message.data_file.read(bounce.MAX_ORIGINAL_HEADERS + 4))
        return bounce.queue_report(self.config, self.queue, self.log, about=message.id, original=original,
                                   arrival=message.arrival, requested_sender=message.envelope.requested_sender,
                                   uid=message.uid, now=now,
                                   failures=[bounce.Failure(r.address, r.reply, expired) for r in failed])

    def _log(self, message: QueuedMessage, pending, error: ShimError | None, ambiguous: bool) -> None:
        """One smtp line per recipient tried, as Postfix's: its verdict, the relay, the delays
        (`log.Timing`: before the run took it on, in the run, connection set-up, transmission)."""
        timing = Timing(message.arrival, self.active or self.now, self.now, self.connected, time.time())
        relay = relay_name(self.config.host, self.session.peer, self.config.port)
        conn_use = self._transaction.number if self._transaction is not None else 1
        orig_to = message.envelope.orig_to or {}
        fallback = error.dsn if error is not None else ""
        for rcpt in pending:
            status = {"sent": "sent", "failed": "bounced", "pending": "deferred"}[rcpt.state]
            self.last_line = self.log.delivery(
                message.id, rcpt.address, status=status, relay=relay, timing=timing,
                dsn=dsn_for(rcpt.reply, status, fallback), reply=rcpt.reply, orig_to=orig_to.get(rcpt.address),
                conn_use=conn_use, ambiguous=ambiguous and status == "deferred")


def _verdict(stage: str, code: int, text: str) -> tuple[str, str]:
    """A refused recipient's state and reply: failed when `replies.classify` refuses it, else pending."""
    action = replies.classify(stage, code, None, text).action
    return ("failed" if action in (replies.REFUSE_RECIPIENT, replies.REFUSE_MESSAGE) else "pending"), f"{code} {text}"


def _reply_text(error: ShimError) -> str:
    if isinstance(error, SMTPFailure):
        return f"{error.code} {error.reply}"
    if isinstance(error, ConfigError):
        return LOCAL_ERROR
    return str(error)
