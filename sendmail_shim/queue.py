"""The durable queue: a message is either entirely on disk or not there at all.

Layout under the queue directory (one directory per state, as in Postfix)::

    tmp/<id>/             embryonic messages and messages being removed (locked while in use)
    queue/<id>/data       the message: CRLF line ends, not dot-stuffed, never modified
    queue/<id>/envelope.json   envelope + per-recipient state; replaced atomically
    failed/<id>/          given up (permanent refusal or too old); same shape, reason included
    maildrop-tmp/         submissions being written (as read, header policy not applied yet)
    maildrop/             finished submissions for the pickup (pickup.py)
    corrupt/              maildrop files the pickup refused, kept for inspection
    corrupt-reasons/<name>     why corrupt/<name> was refused (one line; its mtime: when)

This module is the storage: making the spool (`Queue.ensure`), writing a message (`Queue.spool`,
`Spool.commit` into queue/, `Spool.commit_request` into maildrop/), reading and locking it
(`Queue.load`, `Queue.lock`), and its state changes (`Queue.save`, `Queue.remove`, `Queue.fail`,
`Queue.mark_sent`, `Queue.clean_tmp`). The pickup of maildrop/ is pickup.py; the administrator's
operations (listing, show, delete, requeue, expiry of failed/ and corrupt/) are postsuper.py.

Committing a message is one rename of its whole directory from tmp/ into queue/ followed by an
fsync of queue/; `Spool.commit` returns only after that, and only then may the caller exit 0.

Every directory is 0700 and only the spool's owner (the service user on a server) and root write
here: a user who may not write the queue hands its message to the submission service
(receiver.py), which writes it into maildrop/ with the submitter's uid in its trailer. A dropped
file is written in maildrop-tmp/ and renamed into maildrop/ when complete, so maildrop/ holds
only finished files and the runner empties it on every run (a systemd ``DirectoryNotEmpty=``
trigger never spins on a file still being written). A dropped file is the message followed by one
JSON trailer line; nothing in it is trusted beyond what the front end would accept from any caller.

Locks are ``flock`` on ``data`` (an inode that never changes, moving with its directory): whoever
holds it owns the message. After taking it, the holder checks the message is still where it was.

Nothing in the spool is followed: removal and clean-up go through directory descriptors opened
with O_NOFOLLOW (fsio.py), since root may run the queue of a spool whose owner could plant links
to root's files.
"""

import fcntl
import io
import json
import os
import re
import stat
import time
from contextlib import contextmanager, suppress
from typing import Callable

from . import fsio
from .config import SERVICE_USER, SYSTEM_QUEUE
from .envelope import Envelope
from .queued import QueuedMessage, Recipient
from .errors import CantCreate, DataError, PolicyError, UsageError
from .i18n import _

ID_PATTERN = re.compile(r"[0-9A-F]{16}\Z")
DROP_PATTERN = re.compile(r"([0-9A-F]{16})\.[0-9a-f]{16}\Z")  # <id>.<64 random bits>
MAX_DROP_SIZE = 64 << 20  # larger than any provider accepts
MAX_TRAILER = 64 << 10
SENT_MARK = re.compile(r"sent\.(\d{1,6})\Z")  # see `Queue.mark_sent`
TMP_GRACE = 60.0  # seconds an unlocked temporary entry is left alone (its writer may be starting)


def crash_point(step: str) -> None:
    """TEST ONLY: die by SIGKILL at `step` when SENDMAIL_SHIM_TEST_CRASH names it.

    The crash-safety tests use this to stop the process at each step of queueing and delivery.
    """
    if os.environ.get("SENDMAIL_SHIM_TEST_CRASH") == step:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def new_id(now: float | None = None) -> str:
    """16 hex digits: milliseconds since the epoch (so ids sort by arrival) + 20 random bits."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"{ms:011X}{int.from_bytes(os.urandom(3), 'big') >> 4:05X}"


class Queue:
    def __init__(self, root: str):
        self.root = root = os.path.abspath(root)
        self.tmp = os.path.join(root, "tmp")
        self.queue = os.path.join(root, "queue")
        self.failed = os.path.join(root, "failed")
        self.maildrop = os.path.join(root, "maildrop")
        self.droptmp = os.path.join(root, "maildrop-tmp")
        self.corrupt = os.path.join(root, "corrupt")
        self.reasons = os.path.join(root, "corrupt-reasons")  # made when the first entry is refused

    # -- set-up ------------------------------------------------------------------------------

    def ensure(self) -> None:
        """Create what is missing: the root (0700; the system spool 0711 owned by the service
        user when root creates it and that user exists, as tmpfiles.d would), its
        sub-directories 0700 owned like the root: only the owner (and root) writes here; other
        users submit through the submission service (receiver.py). Existing directories are left
        alone."""
        try:
            if not os.path.isdir(self.root):
                self._make_root()
            st = os.stat(self.root)
            if os.geteuid() not in (0, st.st_uid):
                return  # someone else's spool: we only ever drop into its maildrop/
            for path in (self.tmp, self.queue, self.failed, self.corrupt, self.droptmp, self.maildrop):
                if not os.path.isdir(path):
                    fsio.mkdir(path, 0o700, st.st_uid, st.st_gid)
        except OSError as exc:
            raise CantCreate(_("cannot create the queue in {path}: {reason}").format(
                path=self.root, reason=exc.strerror)) from None

    def _make_root(self) -> None:
        os.makedirs(os.path.dirname(self.root), exist_ok=True)
        owner = _service_owner() if os.geteuid() == 0 and self.root == SYSTEM_QUEUE else None
        uid, gid = owner or (os.geteuid(), os.getegid())
        fsio.mkdir(self.root, 0o711 if owner else 0o700, uid, gid)

    def check_access(self) -> None:
        """Listing, running and administering the queue need its owner (or root)."""
        everything = os.R_OK | os.W_OK | os.X_OK
        if os.path.isdir(self.root) and not all(fsio.may(p, everything) for p in (self.tmp, self.queue, self.failed)):
            raise PolicyError(
                _("cannot read the queue in {path}").format(path=self.root),
                hint=_("run this as root or as the owner of the queue directory"),
            )

    def owner(self) -> tuple[int, int]:
        st = os.stat(self.root)
        return st.st_uid, st.st_gid

    # -- writing -----------------------------------------------------------------------------

    def spool(self, *, drop: bool = False) -> "Spool":
        """A new message: write it to ``.file``, then ``.commit(envelope)``. Use as a context
        manager: leaving it without a commit removes every trace of the message. `drop` writes
        to maildrop/ for the pickup (then commit with ``.commit_request(fields)``)."""
        return Spool(self, drop)

    def save(self, message: QueuedMessage) -> None:
        """Replace envelope.json atomically (the caller holds the message's lock)."""
        _write_json(message.path, "envelope.json", message.to_dict(), self.owner())

    # -- reading -----------------------------------------------------------------------------

    def ids(self) -> list[str]:
        """Ids in queue/, oldest first."""
        return ids_in(self.queue)

    def failed_ids(self) -> list[str]:
        return ids_in(self.failed)

    def load(self, msg_id: str) -> QueuedMessage | None:
        """The message in queue/ (or failed/), or None when it is not there (any more)."""
        for directory in (self.queue, self.failed):
            message = self.read(os.path.join(directory, checked_id(msg_id)))
            if message is not None:
                return message
        return None

    def read(self, path: str) -> QueuedMessage | None:
        """The message in directory `path`, with the recipients `mark_sent` recorded; a link in
        place of the directory or of envelope.json is damage, not a message."""
        try:
            with fsio.opened(path) as directory:
                fd = os.open("envelope.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
                with open(fd, encoding="utf-8") as stream:
                    message = QueuedMessage.from_dict(json.load(stream), path)
                _apply_marks(message, os.listdir(directory))
                return message
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path}/envelope.json is unreadable: {exc}") from None

    @contextmanager
    def lock(self, msg_id: str):
        """Yield the message with its data file open and locked, or None when another process
        holds it or it is gone. The data file is positioned at its start."""
        path = os.path.join(self.queue, checked_id(msg_id))
        try:
            with fsio.opened(path) as directory:
                fd = os.open("data", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
        except FileNotFoundError:
            yield None
            return
        except OSError as exc:  # a link where the message was: root must not read what it names
            raise DataError(f"{path}/data is unreadable: {exc.strerror}") from None
        with open(fd, "rb") as data:
            try:
                fcntl.flock(data.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield None
                return
            # it may have been delivered or moved between open() and flock()
            message = self.read(path) if fsio.same_file(data.fileno(), os.path.join(path, "data")) else None
            if message is not None:
                message.data_file = data
            yield message

    # -- state changes (the caller holds the lock) -------------------------------------------

    def remove(self, message: QueuedMessage) -> None:
        """Remove a message that needs nothing more (delivered, or deleted by the admin)."""
        self.forget_drop(message)
        trash = f"{message.id}.done.{os.urandom(4).hex()}"
        with fsio.opened(os.path.dirname(message.path)) as source, fsio.opened(self.tmp) as tmp:
            # one atomic step; a crash leaves only tmp/ garbage
            os.rename(os.path.basename(message.path), trash, src_dir_fd=source, dst_dir_fd=tmp)
            os.fsync(source)
            fsio.remove_entry(tmp, trash)

    def fail(self, message: QueuedMessage, reason: str) -> None:
        """Move a message to failed/ with the reason (no more attempts)."""
        message.failure = reason
        self.save(message)
        self.forget_drop(message)
        target = os.path.join(self.failed, message.id)
        os.rename(message.path, target)
        fsio.fsync_dir(self.failed)
        fsio.fsync_dir(self.queue)
        message.path = target

    def forget_drop(self, message: QueuedMessage) -> None:
        """A picked-up message's maildrop file must be gone before the message is: otherwise a
        runner that crashed between commit and unlink would have it picked up again."""
        if not message.drop or not DROP_PATTERN.match(message.drop):
            return
        try:
            with self.maildrop_lock() as maildrop:
                os.unlink(message.drop, dir_fd=maildrop)
        except (FileNotFoundError, NotADirectoryError):
            pass  # gone already, or no maildrop/ to pick it up from again

    def mark_sent(self, message: QueuedMessage) -> None:
        """Record the recipients who took the message without writing a block: one empty file
        ``sent.<index>`` each (an inode and a directory entry), for when envelope.json cannot be
        replaced (a full disk). `read` applies them: no later attempt sends them a second copy."""
        with fsio.opened(message.path) as directory:
            for index, rcpt in enumerate(message.recipients):
                if rcpt.state == "sent":
                    with suppress(FileExistsError):
                        os.close(os.open(f"sent.{index}", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                         | os.O_CLOEXEC, 0o600, dir_fd=directory))
            os.fsync(directory)

    @contextmanager
    def maildrop_lock(self):
        """maildrop/, opened (never through a link) and locked: serialises pickups with the
        removal of picked-up messages (see `forget_drop`)."""
        with fsio.opened(self.maildrop) as fd:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd

    # -- crash leftovers ---------------------------------------------------------------------

    def clean_tmp(self, grace: float = TMP_GRACE) -> list[str]:
        """Remove what crashed writers left in tmp/ (and, when readable, maildrop-tmp/): entries
        older than `grace` seconds that no writer holds, and anything else old there (a
        directory, FIFO or link someone planted), never following a link. Returns the names
        removed; what cannot be removed is left for the next run."""
        removed = []
        cutoff = time.time() - grace
        for directory, lock_name in ((self.tmp, "data"), (self.droptmp, None)):
            try:
                with fsio.opened(directory) as fd:
                    removed += [name for name in os.listdir(fd)
                                if _stale(fd, name, lock_name, cutoff) and fsio.remove_entry(fd, name)]
            except OSError:
                continue  # missing, a dropper's maildrop-tmp/ it may not list, or a link
        return removed


class Spool:
    """One message being written; see `Queue.spool`."""

    def __init__(self, queue: Queue, drop: bool, msg_id: str | None = None):
        self.queue = queue
        self.drop = drop
        self.id = msg_id or new_id()
        self.committed = False
        self.path = None
        self.message: QueuedMessage | None = None  # after a commit to queue/
        try:
            if drop:
                self._name = f"{self.id}.{os.urandom(8).hex()}"
                self.path = os.path.join(queue.droptmp, self._name)
                # the runner reads it through the directory's group, whatever our umask says
                fd = fsio.create(self.path, 0o640)
            else:
                self.path = os.path.join(queue.tmp, self.id)
                os.mkdir(self.path, 0o700)
                fd = fsio.create(os.path.join(self.path, "data"), 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # "being written": clean_tmp keeps out
        except OSError as exc:
            with suppress(OSError):  # on a read-only file system even the clean-up fails
                self._remove()
            where = queue.droptmp if drop else queue.tmp
            raise CantCreate(_("cannot write to the queue ({path}): {reason}").format(
                path=where, reason=exc.strerror)) from None
        self.file = _SpoolFile(io.FileIO(fd, "wb"))

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc_info) -> None:
        if self.committed:
            self.file.close()
            return
        try:
            self.file.close()  # may fail again on a full disk: the first error is the one to report
        except CantCreate:
            pass
        finally:
            self._remove()

    def commit(self, envelope: Envelope, *, bounce: bool = False, uid: int | None = None,
               arrival: float | None = None, drop: str | None = None) -> str:
        """Make the message durable in queue/; returns its id. Only after this may the caller
        exit 0. (A spool for maildrop/ commits with `commit_request`.)

        `bounce` marks a failure report (never bounced itself); `uid`, `arrival` and `drop` are
        for the pickup (pickup.py; default: this process's user, now, not from maildrop/).
        """
        if self.drop:
            raise TypeError("a maildrop file is committed with commit_request")
        return self._durable(lambda: self._commit_queue(envelope, bounce, uid, arrival or time.time(), drop))

    def commit_request(self, fields: dict) -> str:
        """Make a maildrop file durable whose trailer is `fields` (`pickup.request`): the header policy
        runs at pickup. Returns its id. A message the pickup would refuse for its size is
        refused here, where the caller still hears of it."""
        size = self.file.tell()
        if size > MAX_DROP_SIZE:
            raise DataError(_("the message is larger than {limit} MiB, the most the queue's maildrop takes; "
                              "-odq or -odi take it when you may read the password").format(limit=MAX_DROP_SIZE >> 20))
        trailer = json.dumps(dict(fields, version=1, size=size), ensure_ascii=True).encode() + b"\n"
        if len(trailer) >= MAX_TRAILER:  # the pickup would not find it: refused here, where the caller hears of it
            raise DataError(_("the recipients take more than {limit} KiB, the most the queue's maildrop takes; "
                              "-odq or -odi take them when you may read the password").format(limit=MAX_TRAILER >> 10))
        return self._durable(self._publish_drop, trailer)

    def _durable(self, commit: Callable[[], None], trailer: bytes = b"") -> str:
        """Write `trailer`, fsync the file, then `commit` (rename it into place)."""
        crash_point("spool-written")
        with _write_errors():
            self.file.write(trailer)
            self.file.flush()
            os.fsync(self.file.fileno())
            crash_point("spool-synced")
            commit()
        self.committed = True
        crash_point("spool-committed")
        return self.id

    def _commit_queue(self, envelope: Envelope, bounce: bool, uid, arrival: float, drop) -> None:
        queue = self.queue
        owner = queue.owner()
        message = QueuedMessage(
            id=self.id, path=self.path, envelope=envelope,
            recipients=[Recipient(a) for a in envelope.recipients], arrival=arrival,
            next_attempt=arrival, uid=os.getuid() if uid is None else uid, drop=drop, bounce=bounce,
        )
        self.message = message
        for path in (self.path, os.path.join(self.path, "data")):
            fsio.give(path, owner)
        _write_json(self.path, "envelope.json", message.to_dict(), owner)
        target = os.path.join(queue.queue, self.id)
        os.rename(self.path, target)  # fails rather than replaces when the id exists
        fsio.fsync_dir(queue.queue)
        self.path = message.path = target

    def _publish_drop(self) -> None:
        target = os.path.join(self.queue.maildrop, self._name)
        os.rename(self.path, target)
        self.path = target
        # maildrop/ is not readable by droppers, so it cannot be opened to fsync it; a second
        # fsync of the renamed file commits the rename on ext4, xfs and btrfs (journalled inode)
        if not fsio.fsync_dir(self.queue.maildrop, may_refuse=True):
            os.fsync(self.file.fileno())

    def _remove(self) -> None:
        if self.path is None:
            return
        if self.drop:
            fsio.unlink(self.path)
        else:
            fsio.rmtree(self.path)


class _SpoolFile(io.BufferedWriter):
    """The spool's file: a failing write (disk full, quota) is the queue's error, which the CLI
    reports with exit 73, not a crash."""

    def write(self, data) -> int:
        with _write_errors():
            return super().write(data)

    def flush(self) -> None:
        with _write_errors():
            super().flush()


@contextmanager
def _write_errors():
    """An OSError while writing the spool is the queue's CantCreate (exit 73)."""
    try:
        yield
    except OSError as exc:
        raise CantCreate(_("cannot write to the queue: {reason}").format(reason=exc.strerror)) from None


def _apply_marks(message: QueuedMessage, names: list[str]) -> None:
    """Recipients `Queue.mark_sent` recorded as sent in the message directory's `names`."""
    for name in names:
        match = SENT_MARK.match(name)
        if match and int(match.group(1)) < len(message.recipients):
            message.recipients[int(match.group(1))].state = "sent"


# -- helpers -----------------------------------------------------------------------------------


def _service_owner() -> tuple[int, int] | None:
    import pwd

    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def _write_json(directory: str, name: str, data: dict, owner: tuple[int, int]) -> None:
    temp = os.path.join(directory, name + ".tmp")
    fsio.unlink(temp)  # a crash's leftover
    fsio.write_atomic(os.path.join(directory, name), json.dumps(data, ensure_ascii=False, indent=1).encode("utf-8"),
                      owner=owner if os.geteuid() == 0 and owner != (0, 0) else None, temp=temp)


def ids_in(directory: str) -> list[str]:
    return sorted(n for n in fsio.listdir(directory) if ID_PATTERN.match(n))


def checked_id(msg_id: str) -> str:
    if not ID_PATTERN.match(msg_id or ""):
        raise UsageError(_("{id!r} is not a queue id (16 hex digits, as shown by mailq)").format(id=msg_id))
    return msg_id


def _stale(parent: int, name: str, lock_name: str | None, cutoff: float) -> bool:
    """Entry `name` of `parent` is a leftover: older than `cutoff` and either not what a writer
    makes there (in tmp/ a directory locked through its `lock_name`, in maildrop-tmp/ a locked
    file) or not held by one (a crashed writer's lock died with it)."""
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except OSError:
        return False
    if st.st_mtime > cutoff:
        return False
    made = stat.S_ISDIR(st.st_mode) if lock_name else stat.S_ISREG(st.st_mode)
    return not made or not fsio.held(parent, name, lock_name)
