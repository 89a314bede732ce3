"""Failure reports (bounces): an RFC 3464 multipart/report, built as CRLF bytes (`build`, pure),
and queued (`queue_report`, for attempt.py and for pickup.py's notices).

The report has the three parts RFC 3464 §2 and RFC 6522 describe: a human-readable notice, a
``message/delivery-status`` part with one block per failed recipient, and the headers of the
original message (``text/rfc822-headers``). A message refused before it had recipients (a
maildrop request the header policy refused, see pickup.py) gets a ``multipart/mixed`` notice with
the reason and the headers instead: delivery-status needs at least one recipient. Its envelope
sender is the login (the relay accepts no other), so it is marked as a bounce in the queue instead
of with ``MAIL FROM:<>``; a bounce is never bounced.
"""

import re
import socket
import time
from typing import NamedTuple
from email.utils import formatdate

from .envelope import Envelope
from .errors import DataError
from .log import one_line, reply_status
from .queue import Queue

MAX_ORIGINAL_HEADERS = 64 << 10
_REPLY = re.compile(r"([245])\d\d(?:[ -]+([245]\.\d{1,3}\.\d{1,3}))?")


class Failure(NamedTuple):
    recipient: str
    reply: str  # the relay's reply ("550 5.1.1 no such user") or why we gave up
    expired: bool = False  # given up after SENDMAIL_SHIM_MAX_QUEUE_AGE rather than refused


def recipient_for(bounce_to: str | None, account: str | None, login: str,
                  aliases: dict[str, str], local_hostname: str) -> str:
    """SENDMAIL_SHIM_BOUNCE_TO, else the alias of the submitting `account` (its local user name
    through the alias map), else the login. Never the sender the caller asked for (-f): nobody
    verified it, and a report quotes the message's headers to whomever it names."""
    if bounce_to:
        return bounce_to
    if account:
        from .message import resolve_local

        try:
            return resolve_local(account, aliases, local_hostname)
        except DataError:
            pass  # a local name without an alias
    return login


def status_code(failure: Failure) -> str:
    """RFC 3463 status: the enhanced code of the reply, else the class of its basic code;
    4.4.7 (delivery time expired) when we gave up on a temporary failure."""
    status = reply_status(failure.reply)
    if failure.expired and not status.startswith("5"):
        return "4.4.7"
    return status or "5.0.0"


def header_block(message: bytes) -> bytes:
    """The header block of a stored (CRLF) message, at most MAX_ORIGINAL_HEADERS, whole lines."""
    end = message.find(b"\r\n\r\n")
    block = message[: end + 2] if end >= 0 else message
    if len(block) > MAX_ORIGINAL_HEADERS:
        block = block[: block.rfind(b"\r\n", 0, MAX_ORIGINAL_HEADERS) + 2]
    return block


def build(
    *,
    failures: list[Failure],
    original_headers: bytes,
    queue_id: str,
    arrival: float,
    sender: str,
    to: str,
    reporting_mta: str,
    remote_mta: str | None,
    message_id: str,
    boundary: str,
    now: float,
    refusal: str | None = None,
    requested_sender: str | None = None,
) -> bytes:
    """The report as CRLF bytes. `sender` is the login (From: and the envelope sender).
    `refusal` (with no `failures`): why the message was not accepted at all. `requested_sender`
    (-f) is shown, never written to: the report goes to `to`, the submitting account's."""
    content_type = ("multipart/mixed" if refusal is not None
                    else "multipart/report; report-type=delivery-status")
    lines = [
        f"From: Mail Delivery System <{sender}>",
        f"To: <{to}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {formatdate(now, localtime=True)}",
        f"Message-ID: {message_id}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: {content_type}; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        f"This is the mail system (sendmail-shim) at {reporting_mta}.",
        "",
    ]
    if requested_sender:
        lines += [f"The sender it asked for (not used): {_clean(requested_sender)}", ""]
    if refusal is not None:
        lines += [f"Your message (queue ID {queue_id}) was not accepted for delivery:", "", _clean(refusal), "",
                  "It is attached below (headers only)."]
    else:
        lines += ["Your message could not be delivered to one or more recipients.",
                  "It is attached below (headers only).", ""]
    for failure in failures:
        how = "gave up after retrying" if failure.expired else "refused"
        lines.append(f"<{failure.recipient}>: {how}: {_clean(failure.reply)}")
    if refusal is None:
        lines += _status_part(failures, boundary, queue_id, arrival, reporting_mta, remote_mta, now)
    lines += [
        "",
        f"--{boundary}",
        "Content-Description: Undelivered Message Headers",
        "Content-Type: text/rfc822-headers",
        "",
    ]
    head = ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace")  # a -f with a lone surrogate
    headers = original_headers.rstrip(b"\r\n")
    return head + headers + (b"\r\n" if headers else b"") + f"\r\n--{boundary}--\r\n".encode()


def _status_part(failures, boundary, queue_id, arrival, reporting_mta, remote_mta, now) -> list[str]:
    """The message/delivery-status part: one block per failed recipient."""
    global_ = not all(f.recipient.isascii() for f in failures)
    lines = [
        "",
        f"--{boundary}",
        "Content-Description: Delivery report",
        f"Content-Type: message/{'global-' if global_ else ''}delivery-status",
        "",
        f"Reporting-MTA: dns; {reporting_mta}",
        f"X-Sendmail-Shim-Queue-ID: {queue_id}",
        f"Arrival-Date: {formatdate(arrival, localtime=True)}",
    ]
    for failure in failures:
        address_type = "rfc822" if failure.recipient.isascii() else "utf-8"
        lines += ["", f"Final-Recipient: {address_type}; {failure.recipient}", "Action: failed",
                  f"Status: {status_code(failure)}"]
        if remote_mta:
            lines.append(f"Remote-MTA: dns; {remote_mta}")
        if _REPLY.match(failure.reply):
            lines.append(f"Diagnostic-Code: smtp; {_clean(failure.reply)}")
        lines.append(f"Last-Attempt-Date: {formatdate(now, localtime=True)}")
    return lines


def _clean(text: str) -> str:
    """One line, at most 900 characters: a reply must not break the report's structure."""
    return one_line(text)[:900]


def queue_report(config, queue: Queue, log, *, about: str, original: bytes, arrival: float,
                 requested_sender: str | None, uid: int | None, failures=(), refusal: str | None = None,
                 now: float | None = None) -> str:
    """Queue a failure report (`build`) about message `about`, submitted by `uid`; returns its id."""
    import secrets  # here, not at the top: only a failure needs it
    from email.utils import make_msgid

    now = time.time() if now is None else now
    hostname = socket.gethostname()
    to = recipient_for(config.bounce_to, _account(uid), config.sender, config.aliases, hostname)
    message_id = make_msgid("bounce", domain=config.sender.rpartition("@")[2] or "localhost")
    data = build(
        failures=list(failures), original_headers=original, queue_id=about, arrival=arrival,
        sender=config.sender, to=to, reporting_mta=config.helo or hostname, remote_mta=config.host,
        message_id=message_id,
        boundary=f"={secrets.token_hex(12)}", now=now, refusal=refusal, requested_sender=requested_sender,
    )
    report = Envelope(sender=config.sender, account=None if config.account == "default" else config.account,
                      recipients=[to], eight_bit=not data.isascii(),
                      smtputf8=not to.isascii(), size=len(data), message_id=message_id)
    with queue.spool() as spool:
        spool.file.write(data)
        report_id = spool.commit(report, bounce=True)
    log.message_id(report_id, report.message_id)
    log.notified(about, report_id)
    return report_id


def _account(uid: int | None) -> str | None:
    """The local user name of `uid`, None when it has none."""
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name if uid is not None else None
    except KeyError:
        return None
