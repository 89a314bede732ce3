"""Background delivery: a detached process picks up maildrop/ and delivers what the caller just
dropped (``-odb``) or queued (``-bs`` in background mode).

The caller pays for a fork and nothing else: the runner (smtplib, ssl, the email parser, the
header policy) is imported in the child.
"""

import os


def start(config, queue, msg_id: str) -> None:
    """Pick up maildrop/ and deliver `msg_id` in a detached process; return at once.

    Double fork and a new session: the caller (PHP, cron) is not the parent and never waits; the
    child has /dev/null as stdin/stdout/stderr and no other inherited descriptor, so nothing the
    caller reads from stays open. When no process can be started the message stays in
    maildrop/ for the next queue run.
    """
    try:
        child = os.fork()
    except OSError as exc:
        from .log import SENDMAIL

        _log(config).warning(SENDMAIL, f"cannot start the background delivery: {exc.strerror}; the queue runner "
                                       "will deliver it", msg_id=msg_id)
        return
    if child:
        try:
            os.waitpid(child, 0)  # the middle process exits at once
        except ChildProcessError:  # the caller ignores SIGCHLD: the child is reaped already
            pass
        return
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        _detach()
        from . import runner

        log = _log(config)
        try:
            runner.pick_up_and_deliver(config, queue, msg_id, log=log)
        except Exception as exc:  # nobody else would ever see it; the queue runner will retry
            from .log import QMGR

            log.error(QMGR, f"background delivery: {type(exc).__name__}: {exc}; the queue runner will retry",
                      msg_id=msg_id)
    finally:
        os._exit(0)


def _log(config):
    from .log import MessageLog

    return MessageLog.from_config(config)


def _detach() -> None:
    import syslog

    syslog.closelog()  # before its descriptor goes: a stale one could later name another file
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
