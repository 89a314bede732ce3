"""The sendmail front end: read one message, then queue or deliver it.

Responsibility is taken at exactly one point: when the queue has the whole message on disk
(`Spool.commit`), or — in direct mode — when the relay has accepted it. Every path before that
ends in a non-zero exit, so a message is never dropped.

In the default background mode (``-odb``) the message goes to maildrop/ as read and the header
policy runs at pickup, in the background (pickup.py): the caller waits for the disk only. The other
modes, and ``-bs`` (`accept`), apply the policy first, so its refusals are the caller's exit
status or SMTP reply. A caller who may not write the queue (``www-data`` on a server) hands the
message as read to the submission service (receiver.py) in every mode but direct.
"""

import contextlib
import os
import time

from .errors import EX_OK, CantCreate, SMTPFailure, ShimError
from .i18n import _
from .reader import MessageReader


def submit(opts, config, stdin, stderr, environ) -> int:
    """sendmail's default mode: the message on `stdin`, recipients per `opts`."""
    stream = MessageReader(stdin, dot_ends=opts.dot_ends)
    if (opts.delivery or config.delivery) == "background":
        _hand_over(stream, opts, config)
    else:
        accept(stream, opts, config, stderr, environ)
    return EX_OK


def _hand_over(stream, opts, config, header_block: bytes | None = None) -> str:
    """The message as read and the request, for the pickup to apply the header policy: into
    maildrop/ when this user may write the queue (then a background process picks it up and
    delivers it), else to the submission service (receiver.py), which does the same for it.
    `header_block` is given when the caller read it already."""
    from . import pickup
    from .queue import Queue

    with _draining(stream):
        config.require_sender()  # a set-up error is the caller's to hear, not the pickup's
        if header_block is None:
            header_block = stream.read_header_block()
        fields = pickup.request(opts, header_block)
    queue = Queue(config.queue_dir)
    if not _writable(queue):
        from . import receiver

        with _draining(stream):
            return receiver.submit(config, fields, header_block, stream)
    with queue.spool(drop=True) as spool:
        with _draining(stream):
            spool.file.write(header_block)
            stream.copy_body(spool.file)
        msg_id = spool.commit_request(fields)
    from . import background

    background.start(config, queue, msg_id)  # its pickup writes the first log line
    return msg_id


def _writable(queue) -> bool:
    """May this process write `queue` itself: root, or the owner of the queue directory? Everyone
    else submits through the service — also when the system queue does not exist yet (the
    service creates it). A queue of our own that is missing is created here."""
    from .config import SYSTEM_QUEUE

    try:
        owner = os.stat(queue.root).st_uid
    except FileNotFoundError:
        owner = os.geteuid() if queue.root != SYSTEM_QUEUE else 0
    except OSError:  # not a directory, not reachable…: `ensure` says why, exit 73
        owner = os.geteuid()
    if os.geteuid() not in (0, owner):
        return False
    queue.ensure()
    return True


def accept(reader, opts, config, stderr, environ) -> str:
    """Take one message from `reader`, queue or deliver it per the delivery mode; return its id.

    Returns only once the message is durably queued or delivered; raises a ShimError otherwise.
    """
    from . import accounts
    from .log import MessageLog
    from .queue import Queue

    started = time.time()
    with _draining(reader):
        header_block = reader.read_header_block()
        config, headers, envelope = accounts.prepare(
            config, os.getuid(), header_block, opts.full_name,
            extract_recipients=opts.extract_recipients,
            argv_recipients=opts.recipients,
            requested_sender=opts.requested_sender,
        )
    envelope = envelope._replace(dsn_notify=opts.dsn_notify, dsn_ret=opts.dsn_ret, envid=opts.envid)
    mode = opts.delivery or config.delivery
    if mode != "direct" and not _writable(Queue(config.queue_dir)):
        return _hand_over(reader, opts, config, header_block)  # the policy runs again at pickup
    log = MessageLog.from_config(config)
    if mode == "direct":
        return _deliver_direct(opts, config, reader, headers, envelope, log, stderr, environ, started)
    return _enqueue(opts, config, mode, reader, headers, envelope, log, stderr, environ)


@contextlib.contextmanager
def _draining(reader):
    """On a refusal, read the rest of the input first: the writer must not die of EPIPE."""
    try:
        yield
    except ShimError:
        reader.drain()
        raise


def _write(out, reader, headers: bytes, envelope):
    """Spool the message to `out`; returns the envelope completed with size and 8-bit flag."""
    from . import message

    with _draining(reader):
        envelope = message.write(out, reader, headers, envelope)
    out.flush()
    return envelope


def _enqueue(opts, config, mode, reader, headers, envelope, log, stderr, environ) -> str:
    from . import credentials
    from .queue import Queue

    queue = Queue(config.queue_dir)
    queue.ensure()
    with queue.spool() as spool:
        envelope = _write(spool.file, reader, headers, envelope)
        msg_id = spool.commit(envelope)
    log.received(msg_id, uid=os.getuid(), sender=envelope.requested_sender or envelope.sender,
                 message_id=envelope.message_id, local_names=envelope.local_names)
    if mode == "queue" or not credentials.readable(config, environ):  # the queue runner sends it
        return msg_id
    if mode == "background":  # -bs
        from . import background

        background.start(config, queue, msg_id)
        return msg_id
    from . import runner

    outcome = runner.deliver_now(config, queue, msg_id, log=log, transcript=_transcript(opts, stderr))
    if outcome.error is not None and not outcome.kept:
        raise outcome.error
    if outcome.error is not None:  # temporary failure: it stays queued and will be retried
        from .i18n import describe, localize

        notice = _("{id} queued for retry: {error}").format(id=msg_id, error=describe(outcome.error, environ))
        print(f"sendmail-shim: {localize(notice, environ)}", file=stderr)
    return msg_id


def _deliver_direct(opts, config, reader, headers, envelope, log, stderr, environ, started) -> str:
    """No queue (read-only systems): deliver from a temporary file or fail with the exit code."""
    import tempfile

    from . import credentials
    from .log import SMTP, Timing
    from .queue import new_id
    from .smtp import Relay

    msg_id = new_id()
    try:
        # unbuffered: nothing is left to flush when it is closed on a full disk (which would
        # raise again, or at garbage collection)
        spool = tempfile.TemporaryFile(buffering=0)
        with contextlib.ExitStack() as closing:
            closing.callback(spool.close)
            envelope = _write(spool, reader, headers, envelope)
            closing.pop_all()
    except OSError as exc:  # a full or read-only TMPDIR: nothing was accepted
        reader.drain()
        raise CantCreate(_("cannot write the message to a temporary file: {reason}").format(
            reason=exc.strerror)) from None
    with spool:
        spool.seek(0)
        # the lines a queued message gets, without a queue: Postfix's tools count it all the same
        log.received(msg_id, uid=os.getuid(), sender=envelope.requested_sender or envelope.sender,
                     message_id=envelope.message_id, local_names=envelope.local_names)
        log.active(msg_id, sender=envelope.sender, size=envelope.size, nrcpt=len(envelope.recipients))
        relay = Relay(config, lambda: credentials.get_password(config, environ), transcript=_transcript(opts, stderr),
                      warn=lambda text: log.warning(SMTP, text))
        active, connected = time.time(), None
        try:
            with relay:
                connected = time.time()
                result = relay.send(envelope, spool, all_or_nothing=True)
        except ShimError as exc:
            # nothing is kept: a permanent reply (even a refused login) is the caller's bounce
            verdict = exc.verdict if isinstance(exc, SMTPFailure) else None
            status = "bounced" if verdict and verdict.permanent else "deferred"
            refused = getattr(exc, "refused", None) or {}
            replies = {r: f"{refused[r][0]} {refused[r][1]}" if r in refused else str(exc) for r in envelope.recipients}
            fallback = verdict.dsn if verdict else exc.dsn
            _log_direct(log, msg_id, envelope, config, relay, status, replies, fallback,
                        Timing(started, active, active, connected, time.time()))
            raise
    _log_direct(log, msg_id, envelope, config, relay, "sent", dict.fromkeys(envelope.recipients, result.reply), "",
                Timing(started, active, active, connected, time.time()))
    return msg_id


def _log_direct(log, msg_id, envelope, config, relay, status: str, replies: dict, fallback: str, timing) -> None:
    """Direct mode's smtp lines, one per recipient, and the end of the message (nothing is kept)."""
    from .log import dsn_for, relay_name

    where = relay_name(config.host, relay.peer_address, config.port)
    for rcpt, reply in replies.items():
        log.delivery(msg_id, rcpt, status=status, relay=where, timing=timing, dsn=dsn_for(reply, status, fallback),
                     reply=reply, orig_to=(envelope.orig_to or {}).get(rcpt))
    log.removed(msg_id)


def _transcript(opts, stderr):
    if not opts.verbose:
        return None
    return lambda line: print(line, file=stderr)
