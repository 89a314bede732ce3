"""The sendmail front end: read one message, then queue or deliver it.

Responsibility is taken at exactly one point: when the queue has the whole message on disk
(`Spool.commit`), or — in direct mode — when the relay has accepted it. Every path before that
ends in a non-zero exit, so a message is never dropped.

In the default background mode (``-odb``) the message goes to maildrop/ as read and the header
policy runs at pickup, in the background (drop.py): the caller waits for the disk only. The other
modes, and ``-bs`` (`accept`), apply the policy first, so its refusals are the caller's exit
status or SMTP reply.
"""

import contextlib
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


def _hand_over(stream, opts, config) -> str:
    """-odb: the message and the request into maildrop/, then a background process (when this
    user may run the queue; else the queue runner) picks it up and delivers it."""
    from . import background, drop
    from .queue import Queue

    with _draining(stream):
        config.require_sender()  # a set-up error is the caller's to hear, not the pickup's
        header_block = stream.read_header_block()
        fields = drop.request(opts, header_block)
    queue = Queue(config.queue_dir)
    queue.ensure()
    with queue.spool(drop=True) as spool:
        with _draining(stream):
            spool.file.write(header_block)
            stream.copy_body(spool.file)
        size = spool.file.tell()
        msg_id = spool.commit_request(fields)
    if queue.can_write():
        background.start(config, queue, msg_id)  # its pickup writes the first log line
    else:
        from .log import MessageLog

        MessageLog.from_config(config).record(msg_id, status="queued", size=size,
                                              reply="in maildrop, waiting for the queue runner")
    return msg_id


def accept(reader, opts, config, stderr, environ) -> str:
    """Take one message from `reader`, queue or deliver it per the delivery mode; return its id.

    Returns only once the message is durably queued or delivered; raises a ShimError otherwise.
    """
    from . import message
    from .log import MessageLog

    started = time.time()
    policy = message.HeaderPolicy.from_config(config, opts.full_name)
    with _draining(reader):
        header_block = reader.read_header_block()
        headers, envelope = message.prepare(
            header_block,
            extract_recipients=opts.extract_recipients,
            argv_recipients=opts.recipients,
            requested_sender=opts.sender,
            policy=policy,
        )
    envelope = envelope._replace(dsn_notify=opts.dsn_notify, dsn_ret=opts.dsn_ret, envid=opts.envid)
    log = MessageLog.from_config(config)
    mode = opts.delivery or config.delivery
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
    direct_access = queue.can_write() and credentials.readable(config, environ)
    with queue.spool(drop=not direct_access) as spool:
        envelope = _write(spool.file, reader, headers, envelope)
        msg_id = spool.commit(envelope)
    log.record(
        msg_id, status="queued", sender=envelope.sender, requested=envelope.requested_sender,
        recipients=envelope.recipients, size=envelope.size,
        reply="in maildrop, waiting for the queue runner" if not direct_access else "",
    )
    if not direct_access or mode == "queue":
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
        print(f"sendmail-shim: {msg_id} queued for retry: {outcome.error}", file=stderr)
    return msg_id


def _deliver_direct(opts, config, reader, headers, envelope, log, stderr, environ, started) -> str:
    """No queue (read-only systems): deliver from a temporary file or fail with the exit code."""
    import tempfile

    from . import credentials
    from .queue import new_id
    from .smtp import Relay

    msg_id = new_id()
    try:
        spool = tempfile.TemporaryFile()
        envelope = _write(spool, reader, headers, envelope)
    except OSError as exc:  # a full or read-only TMPDIR: nothing was accepted
        reader.drain()
        raise CantCreate(_("cannot write the message to a temporary file: {reason}").format(
            reason=exc.strerror)) from None
    with spool:
        spool.seek(0)
        fields = dict(sender=envelope.sender, requested=envelope.requested_sender,
                      recipients=envelope.recipients, relay=f"{config.host}:{config.port}", size=envelope.size)
        try:
            with Relay(config, lambda: credentials.get_password(config, environ), transcript=_transcript(opts, stderr),
                       warn=log.warning) as relay:
                result = relay.send(envelope, spool, all_or_nothing=True)
        except ShimError as exc:
            status = "refused" if isinstance(exc, SMTPFailure) and exc.permanent else "deferred"
            log.record(msg_id, status=status, delay=time.time() - started, reply=str(exc), **fields)
            raise
    log.record(msg_id, status="sent", delay=time.time() - started, reply=result.reply, **fields)
    return msg_id


def _transcript(opts, stderr):
    if not opts.verbose:
        return None
    return lambda line: print(line, file=stderr)
