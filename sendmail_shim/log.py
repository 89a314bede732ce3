"""One Postfix-like line per message, to `SENDMAIL_SHIM_LOG_FILE` and/or syslog (facility mail).

Log lines are English and stable for parsing::

    <id>: from=<login> requested=<-f or From:> to=<a@x>,<b@y> relay=host:port size=N delay=S status=sent (250 …)

Logging never fails a delivery: an unwritable log file is skipped.
"""

import os
import time

STATUSES = ("sent", "queued", "deferred", "bounced", "refused", "ambiguous", "expired", "deleted")


def format_line(
    msg_id: str,
    *,
    status: str,
    sender: str | None = None,
    requested: str | None = None,
    recipients=(),
    relay: str | None = None,
    size: int | None = None,
    delay: float | None = None,
    reply: str = "",
) -> str:
    """The message log line without timestamp (pure)."""
    assert status in STATUSES, status
    parts = [f"{msg_id}:"]
    if sender is not None:
        parts.append(f"from=<{sender}>")
    if requested and requested != sender:
        parts.append(f"requested=<{one_line(requested)}>")
    if recipients:
        parts.append("to=" + ",".join(f"<{one_line(r)}>" for r in recipients))
    if relay:
        parts.append(f"relay={relay}")
    if size is not None:
        parts.append(f"size={size}")
    if delay is not None:
        parts.append(f"delay={delay:.2f}")
    parts.append(f"status={status}")
    if reply:
        parts.append(f"({one_line(reply)})")
    return " ".join(parts)


def one_line(text) -> str:
    """Printable, on one line, white space collapsed: a server reply, an address or an error must
    not forge a log line, an SMTP reply or a report's structure."""
    return " ".join("".join(c if c.isprintable() else " " for c in str(text)).split())


class MessageLog:
    def __init__(self, log_file: str | None, use_syslog: bool):
        self.log_file = log_file
        self.use_syslog = use_syslog
        self._syslog_open = False

    @classmethod
    def from_config(cls, config) -> "MessageLog":
        return cls(config.log_file, config.syslog)

    def record(self, msg_id: str, **fields) -> str:
        line = format_line(msg_id, **fields)
        self._emit(line)
        return line

    def warning(self, text: str) -> None:
        """A line that is not about one message (e.g. TLS verification turned off)."""
        self._emit(f"warning: {one_line(text)}")

    def _emit(self, line: str) -> None:
        if self.log_file:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            self._append(f"{stamp} sendmail-shim[{os.getpid()}]: {line}\n")
        if self.use_syslog:
            self._syslog(line)

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

    def _syslog(self, line: str) -> None:
        import syslog

        if not self._syslog_open:
            syslog.openlog("sendmail-shim", syslog.LOG_PID, syslog.LOG_MAIL)
            self._syslog_open = True
        syslog.syslog(syslog.LOG_INFO, line)
