"""The mail log in Postfix's formats, to `SENDMAIL_SHIM_LOG_FILE` and/or syslog (facility mail).

Tools written for Postfix's log (pflogsumm ``--syslog-name=sendmail-shim``, …) read it: one line
per event, logged under the syslog name ``sendmail-shim/<program>`` of the Postfix program that
logs that event, in that program's format (src/global/log_adhoc.c, src/pickup/pickup.c,
src/cleanup/cleanup_message.c, src/qmgr/qmgr_active.c)::

    pickup     ID: uid=33 from=<www-data@web1>              a local user's message entered the queue
    postdrop   ID: uid=33, size=1234 (queue maildrop)        … handed to the submission service
    cleanup    ID: message-id=<…@web1>                      its Message-ID (after the header policy)
    cleanup    ID: info: local recipient <root> delivered to <alice@163.com> (no alias; SMTP_LOCAL_MAIL=login)
                                                            which rule resolved a local name (one per name)
    cleanup    ID: reject: header <reason> from local; from=<…>: 5.7.1 message content rejected
    qmgr       ID: from=<alice@163.com>, size=1234, nrcpt=2 (queue active)   an attempt begins
    smtp       ID: to=<bob@x>, orig_to=<root>, relay=smtp.163.com[1.2.3.4]:465, conn_use=2, delay=0.42,
               delays=0.01/0/0.3/0.11, dsn=2.0.0, status=sent (250 …)       one per recipient
    qmgr       ID: from=<…>, status=expired, returned to sender
    bounce     ID: sender non-delivery notification: REPORT-ID
    qmgr       ID: removed                                   it left the queue (postsuper: --delete)
    postsuper  ID: removed (failed/ for 30d, …)            a queue run purged an old failed/ or corrupt/ item
    any        warning: [ID: ]…  /  error: [ID: ]…           syslog priority warning / err

Lines are English and every value is printable on one line: an address, a reply or a file name
must not forge a line or a field. Logging never fails a delivery: an unwritable log file is skipped.
"""

import os
import time
import _thread
from typing import NamedTuple

from .replies import reply_status  # the status a reply carries; re-exported for bounce.py

SYSLOG_NAME = "sendmail-shim"  # pflogsumm --syslog-name
# The Postfix programs whose events the shim logs, each under sendmail-shim/<program>.
PICKUP, POSTDROP, CLEANUP, QMGR, SMTP, BOUNCE, POSTSUPER, SENDMAIL = (
    "pickup", "postdrop", "cleanup", "qmgr", "smtp", "bounce", "postsuper", "sendmail")
PROGRAMS = (PICKUP, POSTDROP, CLEANUP, QMGR, SMTP, BOUNCE, POSTSUPER, SENDMAIL)
DELIVERY_STATUSES = ("sent", "deferred", "bounced")
_STATUS_CLASS = {"sent": "2", "deferred": "4", "bounced": "5"}
MAYBE_TWICE = "message may be sent more than once"  # Postfix's words for the ambiguous case
INFO, WARNING, ERROR = 6, 4, 3  # syslog priorities (LOG_INFO, LOG_WARNING, LOG_ERR)


# -- pure formatting ---------------------------------------------------------------------------


class Timing(NamedTuple):
    """When (``time.time()``) a message reached each step of a delivery attempt, for ``delay=``
    and ``delays=a/b/c/d`` (Postfix's: before the queue manager / in it / connection set-up /
    transmission)."""

    arrival: float  # it entered the queue (a maildrop file: when it was dropped)
    active: float  # the queue manager took it: the queue run listed it, or the attempt began
    handoff: float  # the attempt on it began
    connected: float | None  # the connection was ready; None when none could be set up
    done: float  # the attempt ended


def one_line(text) -> str:
    """Printable, on one line, white space collapsed: a server reply, an address or an error must
    not forge a log line, an SMTP reply or a report's structure."""
    return " ".join("".join(c if c.isprintable() else " " for c in str(text)).split())


def _address(address) -> str:
    """For ``<…>``: one line, and no angle bracket that would end the field early."""
    return one_line(address or "").replace("<", "?").replace(">", "?")


def token(name) -> str:
    """A queue id or file name as the first word of a line: no space, colon or bracket."""
    text = "".join(c if c.isprintable() and not c.isspace() and c not in ":[]<>" else "?" for c in str(name))
    return text[:100] or "?"


def seconds(value: float) -> str:
    """Postfix's format_tv(…, 2, 2): two significant digits, at most two decimals, whole seconds
    from 10 s on, trailing zeros dropped (0.42, 1.2, 12, 0)."""
    value = max(value, 0.0)
    sec = int(value)
    usec = min(int(round((value - sec) * 1_000_000)), 999_999)
    ures, wid = 10_000, 100  # resolution 10 ms; 2 significant digits
    if sec > 0:
        n = 1
        while sec >= n and n <= wid // 10:
            n *= 10
        ures = (1_000_000 // wid) * n
    else:
        while usec >= wid * ures:
            ures *= 10
    usec += ures // 2
    if usec >= 1_000_000:
        sec, usec = sec + 1, usec - 1_000_000
    text = str(sec)
    if usec >= ures:
        text += "."
        n = 100_000
        while usec >= ures and n > 0:
            text += str(usec // n)
            usec %= n
            n //= 10
    return text


def ctime(when: float) -> str:
    """A time as mailq shows it (local time, as Postfix's)."""
    return time.strftime("%a %b %d %H:%M:%S", time.localtime(when))


def duration(seconds: float) -> str:
    """`seconds` as the log says an age: 1.5d, 2.0h, 3.0m, 42s."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def delay_fields(timing: Timing) -> str:
    """``delay=S, delays=a/b/c/d``. Without a connection, c is 0 and d runs from the hand-off (as
    Postfix's "no network client")."""
    t = timing
    c, d = (t.connected - t.handoff, t.done - t.connected) if t.connected else (0.0, t.done - t.handoff)
    parts = (t.active - t.arrival, t.handoff - t.active, c, d)
    return f"delay={seconds(t.done - t.arrival)}, delays={'/'.join(seconds(p) for p in parts)}"


def dsn_for(reply, status: str, fallback: str = "") -> str:
    """The RFC 3463 status of a delivery line: the reply's enhanced code ("550 5.1.1 …" → 5.1.1),
    else the class of its basic code (5.0.0), else `fallback`; its class is the status's (a 5xx
    reply that only defers, such as a refused login, is 4.x.x, as Postfix's soft bounce; for a
    relay's reply this is `replies.Verdict.dsn`)."""
    code = reply_status(reply) or fallback or "0.0.0"
    return _STATUS_CLASS[status] + code[1:]


def relay_name(host: str | None, address: str | None, port: int) -> str:
    """``host[address]:port``, or ``none`` when no connection was made (Postfix's)."""
    if not host or not address:
        return "none"
    return f"{one_line(host)}[{address}]:{port}"


def pickup_line(msg_id: str, uid: int, sender: str | None) -> str:
    return f"{token(msg_id)}: uid={uid} from=<{_address(sender)}>"


def postdrop_line(msg_id: str, uid: int, size: int) -> str:
    return f"{token(msg_id)}: uid={uid}, size={size} (queue maildrop)"


def message_id_line(msg_id: str, message_id: str | None) -> str:
    inner = one_line(message_id or "").strip().removeprefix("<").removesuffix(">")
    return f"{token(msg_id)}: message-id=<{_address(inner)}>"


def local_line(msg_id: str, name: str, recipient: str, rule: str) -> str:
    """Cleanup's ``info:`` line (as Postfix's header_checks INFO) for a local name the header
    policy resolved: the name, its recipient and the rule (``alias root``, ``alias default``,
    ``no alias; SMTP_LOCAL_MAIL=login``)."""
    return (f"{token(msg_id)}: info: local recipient <{_address(name)}> delivered to <{_address(recipient)}> "
            f"({one_line(rule).replace('(', '?').replace(')', '?')})")


def reject_line(msg_id: str, reason: str, sender: str | None) -> str:
    """Cleanup's ``reject: header …`` (the header policy refused it at pickup); the reason takes
    the place of the header Postfix quotes."""
    return (f"{token(msg_id)}: reject: header {one_line(reason)[:200]} from local; "
            f"from=<{_address(sender)}>: 5.7.1 message content rejected")


def active_line(msg_id: str, sender: str, size: int, nrcpt: int) -> str:
    return f"{token(msg_id)}: from=<{_address(sender)}>, size={size}, nrcpt={nrcpt} (queue active)"


def delivery_line(msg_id: str, recipient: str, *, status: str, relay: str, timing: Timing, dsn: str,
                  reply: str = "", orig_to: str | None = None, conn_use: int = 1, ambiguous: bool = False) -> str:
    """The smtp line of one recipient (log_adhoc.c). `ambiguous`: the connection was lost after
    the end of the data, so the relay may have the message."""
    assert status in DELIVERY_STATUSES, status
    parts = [f"{token(msg_id)}: to=<{_address(recipient)}>"]
    if orig_to and orig_to.lower() != recipient.lower():
        parts.append(f"orig_to=<{_address(orig_to)}>")
    parts.append(f"relay={relay}")
    if conn_use > 1:
        parts.append(f"conn_use={conn_use}")
    parts += [delay_fields(timing), f"dsn={dsn}"]
    text = one_line(reply)
    if ambiguous:
        text = f"{text} -- {MAYBE_TWICE}" if text else MAYBE_TWICE
    parts.append(f"status={status} ({text})" if text else f"status={status}")
    return ", ".join(parts)


def expired_line(msg_id: str, sender: str) -> str:
    return f"{token(msg_id)}: from=<{_address(sender)}>, status=expired, returned to sender"


def notification_line(msg_id: str, report_id: str) -> str:
    return f"{token(msg_id)}: sender non-delivery notification: {token(report_id)}"


def removed_line(msg_id: str, why: str | None = None) -> str:
    """``ID: removed``; `why` only for what a queue run removes on its own (an old failed/ or
    corrupt/ item, `postsuper.purge`): Postfix's postsuper -d line has none."""
    return f"{token(msg_id)}: removed ({one_line(why)})" if why else f"{token(msg_id)}: removed"


def problem_line(severity: str, text: str, msg_id: str | None = None) -> str:
    """``warning: …`` / ``error: …``, about one message when `msg_id` is given."""
    about = f"{token(msg_id)}: " if msg_id else ""
    return f"{severity}: {about}{one_line(text)}"


def file_line(line: str, program: str, *, now: float, hostname: str, pid: int) -> str:
    """A log file line as rsyslog writes one (RFC 3339 time stamp, host, program[pid]), which
    pflogsumm reads."""
    local = time.localtime(now)
    offset = local.tm_gmtoff or 0
    sign, offset = ("-", -offset) if offset < 0 else ("+", offset)
    stamp = (f"{time.strftime('%Y-%m-%dT%H:%M:%S', local)}.{int(now % 1 * 1_000_000):06d}"
             f"{sign}{offset // 3600:02d}:{offset % 3600 // 60:02d}")
    return f"{stamp} {hostname} {SYSLOG_NAME}/{program}[{pid}]: {line}\n"


# -- the log -----------------------------------------------------------------------------------

_SYSLOG = _thread.allocate_lock()  # openlog is process-wide: the ident and the line go together


class MessageLog:
    """Writes each event's line (formatted above) to the file and/or syslog. Every method returns
    the line it logged."""

    def __init__(self, log_file: str | None, use_syslog: bool):
        self.log_file = log_file
        self.use_syslog = use_syslog
        self._hostname = (os.uname().nodename.split(".")[0] or "localhost") if log_file else ""

    @classmethod
    def from_config(cls, config) -> "MessageLog":
        return cls(config.log_file, config.syslog)

    # -- events of one message ---------------------------------------------------------------

    def received(self, msg_id: str, *, uid: int, sender: str | None, message_id: str | None,
                 local_names=None) -> str:
        """A local user's message entered the queue (pickup), with its Message-ID and the rule
        that resolved each local name (cleanup; `local_names` is `Envelope.local_names`)."""
        self.picked_up(msg_id, uid=uid, sender=sender)
        line = self.message_id(msg_id, message_id)
        for name, recipient, rule in local_names or ():
            line = self._emit(CLEANUP, local_line(msg_id, name, recipient, rule))
        return line

    def picked_up(self, msg_id: str, *, uid: int, sender: str | None) -> str:
        return self._emit(PICKUP, pickup_line(msg_id, uid, sender))

    def submitted(self, msg_id: str, *, uid: int, size: int) -> str:
        return self._emit(POSTDROP, postdrop_line(msg_id, uid, size))

    def message_id(self, msg_id: str, message_id: str | None) -> str:
        return self._emit(CLEANUP, message_id_line(msg_id, message_id))

    def rejected(self, msg_id: str, *, reason: str, sender: str | None) -> str:
        return self._emit(CLEANUP, reject_line(msg_id, reason, sender))

    def active(self, msg_id: str, *, sender: str, size: int, nrcpt: int) -> str:
        return self._emit(QMGR, active_line(msg_id, sender, size, nrcpt))

    def delivery(self, msg_id: str, recipient: str, **fields) -> str:
        return self._emit(SMTP, delivery_line(msg_id, recipient, **fields))

    def expired(self, msg_id: str, *, sender: str) -> str:
        return self._emit(QMGR, expired_line(msg_id, sender))

    def notified(self, msg_id: str, report_id: str) -> str:
        return self._emit(BOUNCE, notification_line(msg_id, report_id))

    def removed(self, msg_id: str, *, program: str = QMGR, why: str | None = None) -> str:
        return self._emit(program, removed_line(msg_id, why))

    def moved(self, msg_id: str, text: str) -> str:
        """A message handed to a fallback account (failover.py), as ``ID: moved from …``."""
        return self._emit(QMGR, f"{msg_id}: {one_line(text)}")

    # -- problems ----------------------------------------------------------------------------

    def warning(self, program: str, text: str, *, msg_id: str | None = None) -> str:
        """Something an administrator should know (TLS verification off, a file refused…)."""
        return self._emit(program, problem_line("warning", text, msg_id), WARNING)

    def error(self, program: str, text: str, *, msg_id: str | None = None) -> str:
        """Something failed that mail depends on, until an administrator acts."""
        return self._emit(program, problem_line("error", text, msg_id), ERROR)

    # -- output ------------------------------------------------------------------------------

    def _emit(self, program: str, line: str, priority: int = INFO) -> str:
        assert program in PROGRAMS, program
        if self.log_file:
            self._append(file_line(line, program, now=time.time(), hostname=self._hostname, pid=os.getpid()))
        if self.use_syslog:
            self._syslog(program, priority, line)
        return line

    def _append(self, text: str) -> None:
        try:
            fd = os.open(self.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError:
            return
        try:
            os.write(fd, text.encode("utf-8", "replace"))  # one write: lines never interleave
        except OSError:
            pass
        finally:
            os.close(fd)

    @staticmethod
    def _syslog(program: str, priority: int, line: str) -> None:
        import syslog

        with _SYSLOG:  # opened each time: another thread's program, or a closelog, came between
            syslog.openlog(f"{SYSLOG_NAME}/{program}", syslog.LOG_PID, syslog.LOG_MAIL)
            syslog.syslog(priority, line)
