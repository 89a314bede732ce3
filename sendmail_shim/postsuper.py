"""Postfix's postsuper and the listing half of postqueue: the administrator's operations on the
queue, as functions of a `queue.Queue` (admin.py and runner.py call them).

The administrator lists the queue (`listing`, ``-bp``/mailq), shows and deletes messages of
queue/ and failed/ and entries of corrupt/ by the id the log printed (`locate`, `show`,
`delete`), or all of it at once (`delete_all`, Postfix's ``postsuper -d ALL``), makes messages
due now (`retry_now`) and moves those of failed/ back (`requeue`). failed/ and corrupt/ are kept for
SENDMAIL_SHIM_FAILED_AGE (`purge_kept`; `purge`, with its log lines, on every queue run).

A message is removed only under its lock, by one rename into tmp/ (a crash leaves only tmp/
garbage); corrupt/ entries are looked at with lstat and opened, if at all, without following a
link or waiting on a FIFO.
"""

import fcntl
import os
import re
import stat
import time
from contextlib import suppress
from typing import Callable, NamedTuple

from . import clock, fsio
from .errors import DataError, TempFail, UsageError
from .i18n import _
from .log import POSTSUPER, ctime, duration, one_line, token
from .pickup import MAX_REASON
from .queue import ID_PATTERN, TMP_GRACE, Queue, checked_id
from .queued import QueuedMessage, Recipient

# a maildrop file's name in corrupt/, renamed by `fsio.free_name` when its own was taken there
CORRUPT_PATTERN = re.compile(r"([0-9A-F]{16})\.[0-9a-f]{16}(?:\.[0-9a-f]{8})?\Z")
MAX_SHOWN = 64 << 10  # bytes of a corrupt/ entry --show prints


class CorruptItem(NamedTuple):
    """An entry of corrupt/, as lstat saw it: a maildrop file the pickup refused, or an odd entry
    (a link, a FIFO, a directory, another name) it quarantined. Never opened to be listed."""

    name: str  # its name in corrupt/
    id: str  # the queue id its name carries (what the log printed), else its name
    kind: str  # file, directory, symbolic link, FIFO, socket, device
    size: int
    mtime: float
    refused: float  # when it was refused: when its reason was recorded, else when it last changed
    reason: str | None  # why the pickup refused it, when recorded

    @property
    def dropped(self) -> bool:
        """A maildrop file (a message as read, with its trailer), not an odd entry."""
        return self.kind == "file" and CORRUPT_PATTERN.match(self.name) is not None


def locate(queue: Queue, ref: str) -> "QueuedMessage | CorruptItem":
    """What --show and --delete name: a message of queue/ or failed/ by its id, or an entry of
    corrupt/ by the id the log printed for it or by its full name (also as corrupt/NAME)."""
    queue.check_access()
    ref = ref or ""
    if ID_PATTERN.match(ref):
        message = queue.load(ref)
        if message is not None:
            return message
    items = corrupt_items(queue)
    name = ref.removeprefix("corrupt/")
    found = [i for i in items if i.name == name] or [i for i in items if i.id == ref]
    if len(found) > 1:
        raise UsageError(_("{id} names {count} entries of {path}; give the full name: {names}").format(
            id=ref, count=len(found), path=queue.corrupt, names=", ".join(i.name for i in found)))
    if found:
        return found[0]
    checked_id(ref)  # a word that is neither an id nor a name in corrupt/
    raise UsageError(_("no message {id} in {path}").format(id=ref, path=queue.root))


def delete(queue: Queue, ref: str) -> "QueuedMessage | CorruptItem":
    """Remove a message from queue/ or failed/, or an entry of corrupt/ (`locate`); refuses
    a message being delivered right now."""
    found = locate(queue, ref)
    if isinstance(found, CorruptItem):
        _discard_corrupt(queue, found.name)
        return found
    if not _discard(queue, os.path.dirname(found.path), found.id) and os.path.lexists(found.path):
        if os.path.dirname(found.path) == queue.failed:
            raise TempFail(_("{id} is in use; try again").format(id=found.id))
        raise TempFail(_("{id} is being delivered; try again when it is done").format(id=found.id))
    return found


def delete_all(queue: Queue, removed: Callable[[str], None]) -> list[str]:
    """Postfix's ``postsuper -d ALL``: every message of queue/ and failed/, every entry of
    corrupt/; `removed(id)` after each. Returns the ids left because another process holds
    them (being delivered). maildrop/ is left to the pickup."""
    queue.check_access()
    busy = []
    for directory, ids in ((queue.queue, queue.ids), (queue.failed, queue.failed_ids)):
        for msg_id in ids():
            if _discard(queue, directory, msg_id):
                removed(msg_id)
            elif os.path.lexists(os.path.join(directory, msg_id)):
                busy.append(msg_id)
    for item in corrupt_items(queue):
        if _discard_corrupt(queue, item.name):
            removed(item.id)
    return busy


def purge_kept(queue: Queue, max_age: float, removed: Callable[[str, str, float], None],
                now: float | None = None) -> None:
    """Remove what failed/ and corrupt/ have kept for longer than `max_age` seconds
    (SENDMAIL_SHIM_FAILED_AGE): a failed message counts from when it failed (its
    envelope.json was last written), a corrupt/ entry from its refusal. `removed(where, id,
    age)` after each; one in use is left for the next run."""
    now = time.time() if now is None else now
    for msg_id in queue.failed_ids():
        since = _failed_since(queue, msg_id)
        if since is not None and now - since > max_age and _discard(queue, queue.failed, msg_id):
            removed("failed", msg_id, now - since)
    for item in corrupt_items(queue):
        if now - item.refused > max_age and _discard_corrupt(queue, item.name):
            removed("corrupt", item.id, now - item.refused)
    _forget_stray_reasons(queue)


def purge(config, queue: Queue, log) -> None:
    """The queue run's `purge_kept`: remove what failed/ and corrupt/ have kept for longer than
    SENDMAIL_SHIM_FAILED_AGE, one postsuper line each; a problem is logged and stops no delivery."""
    def removed(where: str, item_id: str, age: float) -> None:
        log.removed(item_id, program=POSTSUPER,
                    why=f"kept in {where}/ for {duration(age)}, longer than SENDMAIL_SHIM_FAILED_AGE")

    try:
        purge_kept(queue, config.failed_age, removed)
    except OSError as exc:
        log.error(POSTSUPER, f"failed/ and corrupt/ not purged: {exc}")


def _failed_since(queue: Queue, msg_id: str) -> float | None:
    """When message `msg_id` went to failed/ (nothing rewrites its envelope.json there)."""
    path = os.path.join(queue.failed, msg_id)
    try:
        with fsio.opened(path) as directory:
            return os.stat("envelope.json", dir_fd=directory, follow_symlinks=False).st_mtime
    except OSError:  # a damaged message, or a link in its place: when the entry last changed
        try:
            st = os.lstat(path)
        except OSError:
            return None
        return max(st.st_mtime, st.st_ctime)


def _discard(queue: Queue, directory: str, msg_id: str) -> bool:
    """Remove message `msg_id` of queue/ or failed/ while holding its lock (as `Queue.remove`);
    False when another process holds it (being delivered, requeued) or it is gone. A damaged
    one (envelope.json unreadable, a link in place of the directory) goes too, never followed."""
    path = os.path.join(directory, msg_id)
    try:
        message = queue.read(path)
    except DataError:
        message = None
    try:
        with fsio.opened(path) as opened:
            fd = os.open("data", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=opened)
    except OSError:  # no data (a writer died), or a link: nothing to lock
        fd = None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
        if message is not None:
            queue.forget_drop(message)
        return _trash(queue, directory, msg_id)
    finally:
        if fd is not None:
            os.close(fd)


def _discard_corrupt(queue: Queue, name: str) -> bool:
    """Remove entry `name` of corrupt/ and its recorded reason; whether it is gone."""
    gone = _trash(queue, queue.corrupt, name)
    if gone:
        with suppress(OSError), fsio.opened(queue.reasons) as reasons:
            fsio.remove_entry(reasons, name)
    return gone


def _trash(queue: Queue, directory: str, name: str) -> bool:
    """Entry `name` of `directory` out of it in one atomic rename into tmp/, then removed
    there (a crash leaves only tmp/ garbage, which `clean_tmp` removes); False when it was
    gone already."""
    trash = f"trash.{os.urandom(8).hex()}"
    with fsio.opened(directory) as source, fsio.opened(queue.tmp) as tmp:
        try:
            os.rename(name, trash, src_dir_fd=source, dst_dir_fd=tmp)
        except FileNotFoundError:
            return False
        os.fsync(source)
        fsio.remove_entry(tmp, trash)
    return True


def find(queue: Queue, msg_id: str) -> QueuedMessage:
    """`Queue.load` for administration: an unknown id is the user's error."""
    queue.check_access()
    message = queue.load(msg_id)
    if message is None:
        raise UsageError(_("no message {id} in {path}").format(id=msg_id, path=queue.root))
    return message


def retry_now(queue: Queue, msg_id: str | None = None) -> list[str]:
    """Make one message (or all) due now; returns the ids changed (busy ones are skipped)."""
    ids = [find(queue, msg_id).id] if msg_id else queue.ids()
    changed = []
    for one in ids:
        with queue.lock(one) as message:
            if message is None:
                continue
            message.next_attempt = time.time()
            queue.save(message)
            changed.append(one)
    return changed


def requeue(queue: Queue, msg_id: str) -> QueuedMessage:
    """failed/<id> → queue/<id>: bounced recipients are deferred again, the clock restarts."""
    queue.check_access()
    path = os.path.join(queue.failed, checked_id(msg_id))
    message = queue.read(path)
    if message is None:
        raise UsageError(_("no message {id} in {path}").format(id=msg_id, path=queue.failed))
    with fsio.locked(message.data_path) as ok:
        if not ok:
            raise TempFail(_("{id} is in use; try again").format(id=msg_id))
        for rcpt in message.recipients:
            if rcpt.state == "bounced":
                rcpt.state, rcpt.attempts = "deferred", 0
        message.failure, message.attempts = None, 0
        message.arrival = message.next_attempt = time.time()
        queue.save(message)
        target = os.path.join(queue.queue, message.id)
        os.rename(path, target)
        fsio.fsync_dir(queue.queue)
        message.path = target
    return message


def listing(queue: Queue, now: float | None = None, notes: list[str] = ()) -> str:
    """`-bp` / mailq text: `notes` (an account's pause), queue/, failed/ and corrupt/, and how
    many wait in maildrop/."""
    queue.check_access()
    messages = [m for m in map(queue.load, queue.ids()) if m is not None]
    failed = [m for m in (queue.read(os.path.join(queue.failed, i)) for i in queue.failed_ids()) if m]
    busy = {m.id for m in messages if fsio.is_locked(m.data_path)}
    return format_listing(messages, failed, busy, clock.now() if now is None else now,
                          corrupt=corrupt_items(queue), waiting=waiting(queue), notes=notes)


def waiting(queue: Queue) -> int:
    """Entries of maildrop/ the next pickup takes (or refuses)."""
    try:
        with fsio.opened(queue.maildrop) as maildrop:
            return len(os.listdir(maildrop))
    except OSError:
        return 0


def show(queue: Queue, ref: str) -> bytes:
    """A description of the message and its state, then the message itself; for an entry of
    corrupt/, what is known of it and its first MAX_SHOWN bytes when it is a plain file."""
    found = locate(queue, ref)
    if isinstance(found, CorruptItem):
        head = _corrupt_head(queue, found.name) if found.kind == "file" else None
        return describe_corrupt(found, head).encode("utf-8", "replace") + b"\n" + (head or b"")
    try:
        with fsio.opened(found.path) as directory:
            fd = os.open("data", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=directory)
    except OSError as exc:
        raise DataError(f"{found.path}/data is unreadable: {exc.strerror}") from None
    with open(fd, "rb") as data:
        return describe(found).encode("utf-8", "replace") + b"\n" + data.read()


# -- corrupt/ ------------------------------------------------------------------------------


def corrupt_items(queue: Queue) -> list[CorruptItem]:
    """The entries of corrupt/ (lstat only), by name."""
    try:
        with fsio.opened(queue.corrupt) as corrupt:
            names = sorted(os.listdir(corrupt))
            with fsio.opened_or_none(queue.reasons) as reasons:
                return [item for name in names if (item := _corrupt_item(corrupt, reasons, name))]
    except OSError:  # no corrupt/, or a link in its place
        return []


def _forget_stray_reasons(queue: Queue, grace: float = TMP_GRACE) -> None:
    """Remove recorded reasons whose entry of corrupt/ is gone (removed by hand), once older
    than `grace` seconds: a pickup records the reason just after moving the entry."""
    cutoff = time.time() - grace
    with suppress(OSError), fsio.opened_or_none(queue.reasons) as reasons:
        if reasons is None:
            return
        present = set(fsio.listdir(queue.corrupt))
        for name in set(os.listdir(reasons)) - present:
            with suppress(OSError):
                if os.stat(name, dir_fd=reasons, follow_symlinks=False).st_mtime < cutoff:
                    fsio.remove_entry(reasons, name)


def _corrupt_head(queue: Queue, name: str) -> bytes | None:
    """The first MAX_SHOWN bytes of entry `name` of corrupt/ when it is a plain file: opened
    without following a link and without waiting on a FIFO swapped in, and checked again."""
    try:
        with fsio.opened(queue.corrupt) as corrupt:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
                         dir_fd=corrupt)
    except OSError:
        return None
    with open(fd, "rb") as stream:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return stream.read(MAX_SHOWN)


# -- formatting (pure) -------------------------------------------------------------------------


def format_listing(messages: list[QueuedMessage], failed: list[QueuedMessage], busy: set[str],
                   now: float, corrupt: list[CorruptItem] = (), waiting: int = 0, notes: list[str] = ()) -> str:
    """Postfix's mailq layout; ``*`` marks a message being delivered, ``!`` one in failed/, ``#``
    an entry of corrupt/ (never delivered); the last line also counts the entries of maildrop/
    waiting for the pickup.

    Under each message: its undelivered recipients, grouped under the last reply for them in
    parentheses (with the next try), as Postfix shows the deferral reason. Under an entry of
    corrupt/: why the pickup refused it, as far as it is known.
    """
    if not messages and not failed and not corrupt and not waiting:
        return "".join(f"{note}\n" for note in notes) + "Mail queue is empty\n"
    indent = " " * 48  # where the sender column starts
    lines = [*notes, f"{'-Queue ID-':17} --Size-- ----Arrival Time---- -Sender/Recipient-------"]
    entries = [(m, "*" if m.id in busy else " ") for m in messages] + [(m, "!") for m in failed]
    for message, mark in entries:
        lines.append(f"{message.id}{mark} {message.size:8d} {ctime(message.arrival)}  {message.envelope.sender}")
        undelivered = [r for r in message.recipients if r.state != "sent"]
        for reply, group in _by_reply(undelivered):
            if mark == "!":
                lines.append(f"(failed: {reply or message.failure})")
            elif reply:
                due = "now" if message.next_attempt <= now else ctime(message.next_attempt)
                lines.append(f"({reply}; next try {due})")
            lines.extend(indent + r.address for r in group)
        lines.append("")
    for item in corrupt:
        label = token(item.id)
        lines.append(f"{label:16}# {item.size:8d} {ctime(item.mtime)}  corrupt/{token(item.name)}")
        lines.append(f"({_refusal_note(item)})")
        lines.append("")
    total = sum(m.size for m in messages)
    count = len(messages)
    summary = f"-- {(total + 1023) // 1024} Kbytes in {count} Request{'s' if count != 1 else ''}."
    if failed:
        summary += f" {len(failed)} failed (marked !, not retried)."
    if corrupt:
        summary += f" {len(corrupt)} corrupt (marked #, never delivered)."
    if waiting:
        summary += f" {waiting} in maildrop/, waiting for pickup."
    return "\n".join(lines + [summary]) + "\n"


def _refusal_note(item: CorruptItem) -> str:
    """Why an entry of corrupt/ is there, for mailq: a maildrop file refused at pickup, or an
    entry that is no message at all; with the reason when it was recorded."""
    what = "refused at pickup" if item.dropped else "not a message"
    return f"{what}: {one_line(item.reason)}" if item.reason else what


def describe_corrupt(item: CorruptItem, head: bytes | None) -> str:
    """What is known of an entry of corrupt/, for ``--show``; `head`: the bytes shown after it."""
    lines = [
        f"Queue-ID: {token(item.id) if CORRUPT_PATTERN.match(item.name) else '-'} (corrupt)",
        f"Name: corrupt/{token(item.name)}",
        f"Type: {item.kind}",
        f"Size: {item.size}",
        f"Modified: {ctime(item.mtime)}",
        f"Refused: {ctime(item.refused)}",
        f"Reason: {_refusal_note(item)}",
    ]
    if head is None:
        lines.append("Content: not shown (not a plain file)")
    elif len(head) < item.size:
        lines.append(f"Content: the first {len(head)} of {item.size} bytes")
    return "\n".join(lines) + "\n"


def describe(message: QueuedMessage) -> str:
    """The envelope and state of one message, for ``--show``."""
    env = message.envelope
    where = os.path.basename(os.path.dirname(message.path))
    lines = [
        f"Queue-ID: {message.id} ({where})",
        f"Arrival: {ctime(message.arrival)}",
        f"Sender: {env.sender}" + (f" (requested {env.requested_sender})" if env.requested_sender else ""),
        f"Message-ID: {env.message_id or '-'}",
        f"Size: {env.size}",
        f"Attempts: {message.attempts}",
    ]
    if where == "queue":
        lines.append(f"Next-Attempt: {ctime(message.next_attempt)}")
    if message.failure:
        lines.append(f"Failure: {message.failure}")
    if message.bounce:
        lines.append("Bounce: yes (never bounced itself)")
    for rcpt in message.recipients:
        lines.append(f"Recipient: {rcpt.address} {rcpt.state} attempts={rcpt.attempts}"
                     + (f" ({rcpt.reply})" if rcpt.reply else ""))
    return "\n".join(lines) + "\n"


def _by_reply(recipients: list[Recipient]) -> list[tuple[str, list[Recipient]]]:
    groups: dict[str, list[Recipient]] = {}
    for rcpt in recipients:
        groups.setdefault(rcpt.reply, []).append(rcpt)
    return list(groups.items())


# -- corrupt/ entries ---------------------------------------------------------------------------


def _corrupt_item(corrupt: int, reasons: int | None, name: str) -> CorruptItem | None:
    """Entry `name` of corrupt/ as lstat sees it, with its recorded reason; None when it is gone."""
    try:
        st = os.stat(name, dir_fd=corrupt, follow_symlinks=False)
    except OSError:
        return None
    match = CORRUPT_PATTERN.match(name)
    reason, refused = _recorded_reason(reasons, name), max(st.st_mtime, st.st_ctime)
    if reason is not None:
        reason, refused = reason
    return CorruptItem(name, match.group(1) if match else name, _kind(st.st_mode), st.st_size, st.st_mtime,
                       refused, reason)


def _recorded_reason(reasons: int | None, name: str) -> tuple[str, float] | None:
    """(reason, when) that `pickup.note_refusal` recorded for entry `name`, None when there is none."""
    if reasons is None:
        return None
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=reasons)
    except OSError:
        return None
    with open(fd, "rb") as stream:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        text = stream.read(MAX_REASON * 4).decode("utf-8", "replace")
    return one_line(text)[:MAX_REASON], st.st_mtime


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "device"
