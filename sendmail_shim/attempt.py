"""One delivery attempt of one queued message, and everything that follows from it: Postfix's
qmgr applying the verdicts its smtp client brings back.

The caller holds the message's lock (`Queue.lock`) and an `Attempt` for it, then calls `begin`
(the envelope goes out), `transfer` (the data) and `collect` (the final reply; returns the
`Outcome`), or `run` for the three in a row. The phases are named after the `smtp.Relay` calls
they make, so that a queue run can overlap neighbours (runner.py).

Each recipient still ``deferred`` gets a verdict (`_verdict`, from `replies.classify`), applied
in one place (`Attempt._apply`):

- accepted → ``sent``;
- refused for good (at RCPT, or the whole message at MAIL/DATA/end of data), or a relay that can
  never take it (DataError) → ``bounced``, and a failure report (`bounce`) goes to the submitting
  account (SENDMAIL_SHIM_BOUNCE_TO, else its alias, else the login; never to an unverified -f) —
  at once, not after the retries;
- anything else → stays ``deferred``: 4xx replies, but also every failure to connect, verify TLS
  or log in (the set-up may be fixed by then). It is tried again after a backoff
  (`next_attempt_after`: 1 min, doubling, at most 1 h) until the message is older than
  SENDMAIL_SHIM_MAX_QUEUE_AGE: then it is ``expired`` and its deferred recipients are bounced.

The message's outcome is recorded in one place (`Attempt._record`): kept in queue/ while a
recipient is deferred; else it leaves queue/ (logged ``removed``, as Postfix's qmgr) — removed
when everything was sent, moved to failed/ when a recipient bounced. `Outcome.status` says which:
sent, deferred, bounced or expired (runner.py adds busy: another process holds the message).

The connection dying after the whole message went out and before the relay's reply is logged
``status=deferred (… -- message may be sent more than once)``, as Postfix does, and retried (the
recipient may get it twice, as with every MTA); so is a crash between the relay's acceptance and
the state update on disk. A state update the disk refuses (full) is not a crash: the recipients
who took the message are marked in a way that needs no new block (`Queue.mark_sent`).

Sending limits (budgets.py, kept in the spool by ledger.py) are kept here too. Before its
envelope goes out, a message reserves its place in the account's budget; when there is none, it
waits (a queue run waits up to `MAX_WAIT` for a per-minute slot) or is held, untried, until the
budget allows it (`Attempt._hold_for_budget`: mailq shows why and until when). A reply that says
the account reached a provider's limit (`replies.PAUSE_ACCOUNT`) pauses the account, not the
message: it stays deferred until the pause ends, and the log says the pause once. A connection
carries at most SMTP_MESSAGES_PER_CONNECTION messages; a message to more recipients than
SMTP_RECIPIENTS_PER_MESSAGE goes in several transactions. Such a message, or one whose
connection reached the relay's own limit (`replies.RECONNECT`), is tried again at once
(`Outcome.again`).

`Password` is a run's password, fetched once on the first AUTH; `RelayConnection` one connection
to the relay, reused for many messages (a run has one per worker).
"""

import threading
import time
from typing import NamedTuple

from . import budgets, clock, replies
from .errors import CantCreate, ConfigError, DataError, ShimError, SMTPFailure, TempFail
from .i18n import _
from . import ledger as ledger_module
from .failover import sending_stream
from .ledger import Ledger
from .log import QMGR, SMTP, Timing, ctime, dsn_for, duration, relay_name
from .queue import Queue, crash_point
from .queued import QueuedMessage

# What a queue file, mailq, a report and a message's log line say of a local configuration error
# (ConfigError: a failing SMTP_PASSWORD_COMMAND, whose stderr may hold a token, a CA file…): the
# log's error line has its message, `--check` (run by the administrator) its details.
LOCAL_ERROR = "local configuration error, see the log"
MIN_BACKOFF, MAX_BACKOFF = 60.0, 3600.0
MAX_WAIT = 90.0  # a run waits for a per-minute slot (a minute + budgets.SLACK) within itself; longer waits are held


class Outcome(NamedTuple):
    """What an attempt (or `runner.deliver_now`) did with one message."""

    msg_id: str
    status: str  # sent | deferred | bounced | expired | busy (another process is delivering it)
    error: ShimError | None = None  # why it is not (entirely) sent
    kept: bool = False  # still in queue/, to be retried
    again: bool = False  # to be tried again at once: recipients left for another transaction, or a new connection


def next_attempt_after(attempts: int, now: float) -> float:
    """Exponential backoff: 1 min after the first failed attempt, doubling, at most 1 h."""
    return now + min(MIN_BACKOFF * 2 ** max(attempts - 1, 0), MAX_BACKOFF)


class Password:
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


def login_secret(config, password=None):
    """What the connections of a run log in with, fetched once and shared: the password, or under
    SMTP_AUTH=xoauth2/oauthbearer an access token renewed before it expires (`oauth2.TokenSource`)."""
    if config.auth != "password":
        from . import oauth2

        return oauth2.TokenSource(config)
    return Password(config, password)


class RelayConnection:
    """One connection to the relay, for many messages: opened on first use, reopened after a
    broken transaction; when opening fails, every later message over it is deferred with the
    same reason."""

    def __init__(self, config, password: Password, transcript, log):
        self.config = config
        self.transcript = transcript
        self.log = log
        self._password = password
        self.relay = None
        self.down: ShimError | None = None
        self.peer: str | None = None  # the relay's address the last connection reached (the log's relay=)
        self.carried = 0  # transactions begun over the open connection

    @property
    def spent(self) -> bool:
        """The open connection carried SMTP_MESSAGES_PER_CONNECTION messages: the next one needs another."""
        limit = self.config.budget.messages_per_connection
        return self.relay is not None and bool(limit) and self.carried >= limit

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
        relay, self.relay, self.carried = self.relay, None, 0
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


class Attempt:
    """One delivery attempt of one locked message, and everything that follows from it (see the
    module's docstring). `bounces`: the failure reports it queued; `last_line`: its last log line."""

    def __init__(self, config, queue: Queue, connection: RelayConnection, log, *, interactive: bool,
                 active: float | None = None, ledger: Ledger | None = None, max_wait: float = 0.0,
                 settle_previous=lambda: None):
        self.config, self.queue, self.connection, self.log = config, queue, connection, log
        self.interactive = interactive
        self.active = active  # when the queue run took the message on (default: the attempt's start)
        self.ledger = ledger or ledger_module.for_account(config)
        self.max_wait = max_wait  # how long `begin` may wait for the budget
        self.settle_previous = settle_previous  # finishes the message in flight on this connection
        self.bounces: list[str] = []
        self.last_line = ""
        self.held: float | None = None  # untried: the budget allows it only then
        self.held_why: str | None = None  # why, when it is not the budget (the spool cannot keep the count)
        self.again = False  # see Outcome.again
        self.wait: str | None = None  # what a reply said the account must wait for (Verdict.wait)
        self.paused_until: float | None = None  # the pause such a reply imposed
        self._transaction = None  # smtp.Transaction under way
        self._result: tuple[dict, ShimError | None, bool] | None = None  # see _failure, once known

    def run(self, message: QueuedMessage) -> Outcome:
        self.begin(message)
        self.transfer()
        return self.collect()

    def begin(self, message: QueuedMessage) -> None:
        self.message, self.now = message, clock.now()
        limit = self.config.budget.recipients_per_message
        self.recipients = message.deferred[:limit] if limit else message.deferred  # the ones this attempt tries
        self.more = len(message.deferred) > len(self.recipients)  # for another transaction
        self.relay = self.connected = None
        nothing_to_send = self.now - message.arrival > self.config.max_queue_age or not self.recipients
        if not nothing_to_send and not self._reserve():
            return  # held, untried (and not logged: a backlog waits for its budget): `collect` records until when
        env = message.envelope
        self.log.active(message.id, sender=env.sender, size=env.size, nrcpt=len(self.recipients))
        if nothing_to_send:
            return  # `collect` settles it
        stream, size = sending_stream(self.config, message)
        self.data = _Tracked(stream)
        if self.connection.spent:
            self.settle_previous()  # its final reply comes over this connection
            self.connection.close()
        try:
            self.relay = self.connection.connect()
            self.connected = time.time()  # at once over a connection already open
            self._transaction = self.relay.begin(
                message.envelope._replace(recipients=[r.address for r in self.recipients], size=size))
            self.connection.carried = self._transaction.number
        except ShimError as exc:
            self._result = self._failure(exc)

    def _reserve(self) -> bool:
        """The message's place in the account's budget, waited for up to `max_wait` (after the
        message in flight is settled); False when it must wait longer (`held`), or when the spool
        cannot keep the count (a full disk: sending uncounted could overspend the account)."""
        while (slot := self._slot()) > self.now:
            if slot - self.now > self.max_wait or self.held_why:
                self.held = slot
                return False
            self.settle_previous()
            clock.wait_until(slot)
            self.now = clock.now()
        self.reserved = budgets.Send(self.now, len(self.recipients))
        return True

    def _slot(self) -> float:
        try:
            return self.ledger.reserve(len(self.recipients), self.now)
        except CantCreate as exc:
            self.held_why = str(exc)
            self.log.error(QMGR, self.held_why, msg_id=self.message.id)
            return self.now + MIN_BACKOFF  # held, tried again after the shortest backoff

    def transfer(self) -> None:
        if self._transaction is not None and self._result is None:
            try:
                self.relay.transfer(self._transaction, self.data)
            except ShimError as exc:
                self._result = self._failure(exc)

    def collect(self) -> Outcome:
        message, now = self.message, self.now
        if now - message.arrival > self.config.max_queue_age:
            return self._expire(message, now)
        if not self.recipients:
            return self._settle(message, [], None, now)
        if self.held is not None:
            return self._hold_for_budget(message)
        verdicts, error, ambiguous = self._result or self._collect()
        if any(state == "sent" for state, _reply in verdicts.values()):
            self.ledger.settle(self.reserved, clock.now())
        self._apply(verdicts)
        message.attempts += 1
        message.last_reply = _reply_text(error) if error else next(iter(verdicts.values()))[1]
        message.next_attempt = next_attempt_after(message.attempts, now)
        reconnect = self.wait == replies.RECONNECT and self._transaction is not None and self._transaction.number > 1
        settled = not any(r.state == "deferred" for r in self.recipients)
        self.again = reconnect or (self.more and settled)
        if self.again:
            message.next_attempt = now
        elif self.paused_until:
            message.next_attempt = self.paused_until
        self._log(message, error, ambiguous)
        return self._settle(message, [r for r in self.recipients if r.state == "bounced"], error, now)

    def _heed(self, verdict: replies.Verdict, reply: str) -> None:
        """A reply about the account's limits: one that pauses the account does so at once, before
        the next message on this connection or another reserves its place (the log says a pause
        once); `collect` sets the message's next attempt from `wait` and `paused_until`."""
        self.wait = self.wait or verdict.wait
        if verdict.wait in budgets.WAITS and not self.paused_until:
            try:
                pause, new = self.ledger.pause(verdict.wait, reply, self.now)
            except CantCreate as exc:  # a full disk: this message waits as long, the others find out themselves
                self.log.error(QMGR, str(exc), msg_id=self.message.id)
                self.paused_until = budgets.pause_until(self.config.budget, verdict.wait, (), self.now)
                return
            if new:
                self.log.warning(QMGR, f"account {self.config.sender} paused until {ctime(pause.until)}: {reply}")
            self.paused_until = pause.until

    def _hold_for_budget(self, message: QueuedMessage) -> Outcome:
        """Keep the message, untried, until the budget allows it: its recipients say why (mailq),
        the waiting -odi caller hears it (exit 75)."""
        pause = self.ledger.read(self.now).pause
        why = self.held_why or (_("account {login} paused until {until}: {reason}") if pause else
                                _("account {login} reached its sending budget until {until}")).format(
            login=self.config.sender, until=ctime(self.held), reason=pause.reason if pause else "")
        for rcpt in message.deferred:
            rcpt.reply = why
        message.next_attempt = self.held
        self.last_line = f"{message.id}: held: {why}"  # no log line (a backlog waits): what -q -v shows
        try:
            self.queue.save(message)
        except (CantCreate, OSError) as exc:
            return self._hold(message, exc)
        return Outcome(message.id, "deferred", TempFail(why), kept=True)

    def _apply(self, verdicts: dict[str, tuple[str, str]], *, tried: bool = True) -> None:
        """The one place a verdict reaches the recipients tried: {address: (state, reply)}."""
        for rcpt in self.recipients:
            rcpt.attempts += tried
            rcpt.state, rcpt.reply = verdicts[rcpt.address]

    def _collect(self) -> tuple[dict, ShimError | None, bool]:
        """The relay's final reply: {address: (state, reply)}, the error of the attempt, ambiguity."""
        try:
            result = self.relay.collect(self._transaction)
        except ShimError as exc:
            return self._failure(exc)
        crash_point("deliver-sent")
        verdicts = {a: ("sent", result.reply) for a in result.accepted}
        verdicts.update({a: self._verdict("rcpt", code, text) for a, (code, text) in result.refused.items()})
        # what the -odi caller hears about: a permanent refusal first, else a temporary one
        refusals = sorted(result.refused.items(), key=lambda item: not 500 <= item[1][0] < 600)
        error = next((SMTPFailure(code, f"{text} <{a}>", "rcpt", provider=self.config.provider)
                      for a, (code, text) in refusals), None)
        return verdicts, error, False

    def _failure(self, exc: ShimError) -> tuple[dict, ShimError, bool]:
        """Verdicts after an error. A refusal of MAIL, RCPT, DATA or the data decides by its codes;
        a relay that can never take the message (DataError) bounces it; anything else (connection,
        TLS, login, a lost connection) defers it: ambiguous when all of the data had been handed
        over. A broken connection is replaced on the next `RelayConnection.connect`; one whose
        relay said it carried its share is closed at once, so the next message takes a new one."""
        addresses = [r.address for r in self.recipients]
        if isinstance(exc, SMTPFailure):
            self._heed(exc.verdict, _reply_text(exc))
            if exc.verdict.wait == replies.RECONNECT:
                self.connection.close()
        if isinstance(exc, SMTPFailure) and exc.stage in replies.TRANSACTION:
            refused = getattr(exc, "refused", None) or {a: (exc.code, exc.reply) for a in addresses}
            return {a: self._verdict(exc.stage, *refused[a]) for a in addresses}, exc, False
        if isinstance(exc, DataError):  # e.g. SMTPUTF8 not offered
            return {a: ("bounced", str(exc)) for a in addresses}, exc, False
        return {a: ("deferred", _reply_text(exc)) for a in addresses}, exc, self.data.exhausted

    def _verdict(self, stage: str, code: int, text: str) -> tuple[str, str]:
        """A refused recipient's state and reply: bounced when `replies.classify` refuses it, else
        deferred; a reply about the account's limits is remembered for `collect` (`wait`)."""
        verdict = replies.classify(stage, code, None, text, self.config.provider)
        self._heed(verdict, f"{code} {text}")
        bounced = verdict.action in (replies.REFUSE_RECIPIENT, replies.REFUSE_MESSAGE)
        return ("bounced" if bounced else "deferred"), f"{code} {text}"

    def _expire(self, message: QueuedMessage, now: float) -> Outcome:
        self._apply({r.address: ("bounced", r.reply or "never tried") for r in self.recipients}, tried=False)
        self.last_line = self.log.expired(message.id, sender=message.envelope.sender)
        return self._settle(message, self.recipients, None, now, expired=True)

    def _caller_reports(self, message: QueuedMessage) -> bool:
        """-odi: the waiting caller's exit status reports a refusal only when the whole message
        was refused (nobody took it, nobody may still)."""
        return self.interactive and not message.deferred and not any(r.state == "sent" for r in message.recipients)

    def _settle(self, message: QueuedMessage, bounced, error, now: float, expired: bool = False) -> Outcome:
        """Persist the attempt (`_record`); when the disk cannot take it, `_hold` the message.

        The waiting -odi caller hears a refusal through its exit status only when the whole
        message was refused; once any recipient took it or still may, the bounced ones get a
        report like in a queue run, so none is forgotten and a retry by the caller sends nobody
        a second copy."""
        try:
            return self._record(message, bounced, error, now, expired)
        except (CantCreate, OSError) as exc:  # a full disk: the relay's verdicts are known, the disk cannot say so
            return self._hold(message, exc)

    def _record(self, message: QueuedMessage, bounced, error, now: float, expired: bool) -> Outcome:
        """The one place a message's outcome is recorded: the report first (a crash then repeats
        a report, never loses one), then queue/ (kept), failed/ or removed, and the log."""
        caller_reports = bool(bounced) and self._caller_reports(message)
        if bounced and not caller_reports and not message.bounce:
            self.bounces.append(self._bounce(message, bounced, now, expired))
        given_up = "expired" if expired else "bounced"
        if message.deferred:
            self.queue.save(message)
            status, kept = "deferred", True
        elif any(r.state == "bounced" for r in message.recipients) and not caller_reports:
            reason = f"expired after {duration(now - message.arrival)}" if expired else message.last_reply
            self.queue.fail(message, reason)
            self.log.removed(message.id)  # from queue/: kept in failed/
            status, kept = given_up, False
        else:
            self.queue.remove(message)
            self.log.removed(message.id)
            status, kept = (given_up if bounced else "sent"), False
        crash_point("deliver-recorded")
        return Outcome(message.id, status, error if caller_reports or kept else None, kept, kept and self.again)

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

    def _bounce(self, message: QueuedMessage, bounced, now: float, expired: bool) -> str:
        from . import bounce

        message.data_file.seek(0)
        original = bounce.header_block(message.data_file.read(bounce.MAX_ORIGINAL_HEADERS + 4))
        return bounce.queue_report(self.config, self.queue, self.log, about=message.id, original=original,
                                   arrival=message.arrival, requested_sender=message.envelope.requested_sender,
                                   uid=message.uid, now=now,
                                   failures=[bounce.Failure(r.address, r.reply, expired) for r in bounced])

    def _log(self, message: QueuedMessage, error: ShimError | None, ambiguous: bool) -> None:
        """One smtp line per recipient tried, as Postfix's: its verdict, the relay, the delays
        (`log.Timing`: before the run took it on, in the run, connection set-up, transmission)."""
        timing = Timing(message.arrival, self.active or self.now, self.now, self.connected, time.time())
        relay = relay_name(self.config.host, self.connection.peer, self.config.port)
        conn_use = self._transaction.number if self._transaction is not None else 1
        orig_to = message.envelope.orig_to or {}
        fallback = error.dsn if error is not None else ""
        for rcpt in self.recipients:
            self.last_line = self.log.delivery(
                message.id, rcpt.address, status=rcpt.state, relay=relay, timing=timing,
                dsn=dsn_for(rcpt.reply, rcpt.state, fallback), reply=rcpt.reply, orig_to=orig_to.get(rcpt.address),
                conn_use=conn_use, ambiguous=ambiguous and rcpt.state == "deferred")




def _reply_text(error: ShimError) -> str:
    if isinstance(error, SMTPFailure):
        return f"{error.code} {error.reply}"
    if isinstance(error, ConfigError):
        return LOCAL_ERROR
    return str(error)
