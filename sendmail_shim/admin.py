"""Queue commands: -bp/mailq, -q, --show, --delete (also ALL), --retry, --requeue."""

from . import clock, ledger, postsuper, runner
from .errors import EX_OK, EX_TEMPFAIL
from .i18n import _, localize
from .log import POSTSUPER, MessageLog, ctime
from .queue import Queue


def run(opts, config, stdout, stderr, environ) -> int:
    queue = Queue(config.queue_dir)
    if opts.mode == "list":
        stdout.write(postsuper.listing(queue, notes=_account_notes(config)))
        return EX_OK
    if opts.mode == "run-queue":
        return _run_queue(opts, config, queue, stderr, environ)
    if opts.mode == "show":
        stdout.flush()
        getattr(stdout, "buffer", stdout).write(postsuper.show(queue, opts.target))
        return EX_OK
    if opts.mode == "delete" and opts.target in ("ALL", "all"):
        return _delete_all(config, queue, stdout, stderr, environ)
    if opts.mode == "delete":
        found = postsuper.delete(queue, opts.target)  # a message, or an entry of corrupt/
        MessageLog.from_config(config).removed(found.id, program=POSTSUPER)  # as Postfix's postsuper -d
        done = _("{id} deleted").format(id=found.id)
    elif opts.mode == "retry":
        changed = postsuper.retry_now(queue, None if opts.target == "all" else opts.target)
        done = _("{count} message(s) due now; run sendmail-shim -q to deliver").format(count=len(changed))
    else:
        message = postsuper.requeue(queue, opts.target)
        done = _("{id} moved back to the queue").format(id=message.id)
    print(f"sendmail-shim: {localize(done, environ)}", file=stdout)
    return EX_OK


def _account_notes(config) -> list[str]:
    """mailq's first lines: each account's pause in force (its messages wait for it, or for a
    fallback account)."""
    notes, now = [], clock.now()
    for account in (config, *config.accounts.values()):
        pause = ledger.for_account(account).read(now).pause if account.sender else None
        if pause is not None:
            name = f" {account.account}" if config.accounts else ""
            notes.append(f"Account{name} {account.sender} paused until {ctime(pause.until)} ({pause.reason})")
    return notes


def _delete_all(config, queue, stdout, stderr, environ) -> int:
    """--delete ALL (Postfix's postsuper -d ALL): queue/, failed/ and corrupt/ emptied, one
    postsuper line per message; a message being delivered is left, named, and the exit status
    says to try again."""
    log = MessageLog.from_config(config)
    removed = []

    def logged(item_id: str) -> None:
        removed.append(item_id)
        log.removed(item_id, program=POSTSUPER)

    busy = postsuper.delete_all(queue, logged)
    done = _("{count} message(s) deleted").format(count=len(removed))
    print(f"sendmail-shim: {localize(done, environ)}", file=stdout)
    if busy:
        left = _("not deleted, being delivered: {ids}; try again when it is done").format(ids=", ".join(busy))
        print(f"sendmail-shim: {localize(left, environ)}", file=stderr)
        return EX_TEMPFAIL
    return EX_OK


def _run_queue(opts, config, queue, stderr, environ) -> int:
    """-q: every queued message now (as sendmail 8's -q and Postfix's postqueue -f); -q --due:
    only those whose next-attempt time has come (the runner service, cron)."""
    selector = runner.Selector(*opts.queue_filter) if opts.queue_filter else None
    progress = None
    if opts.verbose and stderr.isatty():
        progress = lambda done, total, line: _bar(stderr, done, total)  # noqa: E731
    elif opts.verbose:
        progress = lambda done, total, line: print(f"[{done}/{total}] {line}", file=stderr)  # noqa: E731
    transcript = (lambda line: print(line, file=stderr)) if opts.verbose > 1 else None
    stats = runner.run_queue(config, queue, log=MessageLog.from_config(config), selector=selector,
                             progress=progress, transcript=transcript, due_only=opts.due_only)
    if opts.verbose:
        summary = _("{sent} sent, {deferred} deferred, {bounced} bounced, {expired} expired, {bounces} bounces, "
                    "{picked_up} picked up, {refused} refused at pickup, {busy} busy").format(
            sent=stats.sent, deferred=stats.deferred, bounced=stats.bounced, expired=stats.expired,
            bounces=stats.bounces, picked_up=stats.picked_up, refused=stats.refused_drops, busy=stats.busy)
        print(f"\nsendmail-shim: {localize(summary, environ)}", file=stderr)
    return EX_OK


def _bar(stream, done: int, total: int, width: int = 40) -> None:
    filled = width * done // max(total, 1)
    stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    stream.flush()
