"""The durable queue: a message is either entirely on disk or not there at all.

Layout under the queue directory (one directory per state, as in Postfix)::

    tmp/<id>/             embryonic messages and messages being removed (locked while in use)
    queue/<id>/data       the message: CRLF line ends, not dot-stuffed, never modified
    queue/<id>/envelope.json   envelope + per-recipient state; replaced atomically
    failed/<id>/          given up (permanent refusal or too old); same shape, reason included
    maildrop-tmp/         submissions being written (as read, header policy not applied yet)
    maildrop/             finished submissions for the runner to pick up
    corrupt/              maildrop files the runner refused, kept for inspection
    corrupt-reasons/<name>     why corrupt/<name> was refused (one line; its mtime: when)

failed/ and corrupt/ are kept for SENDMAIL_SHIM_FAILED_AGE (`Queue.expire_kept`, on every queue
run); the administrator lists them (`listing`), shows and deletes them by the id the log printed
(`locate`), or all of it at once (`delete_all`, Postfix's ``postsuper -d ALL``).

Committing a message is one rename of its whole directory from tmp/ into queue/ followed by an
fsync of queue/; `Spool.commit` returns only after that, and only then may the caller exit 0.

Every directory is 0700 and only the spool's owner (the service user on a server) and root write
here: a user who may not write the queue hands its message to the submission service
(receiver.py), which writes it into maildrop/ with the submitter's uid in its trailer. A dropped
file is written in maildrop-tmp/ and renamed into maildrop/ when complete, so maildrop/ holds only finished files and the runner empties it on every
run (a systemd ``DirectoryNotEmpty=`` trigger never spins on a file still being written). A dropped
file is the message followed by one JSON trailer line; the runner validates it and rewrites it
into queue/ (`pickup`) — nothing in it is trusted beyond what the front end would accept from any
caller.

Locks are ``flock`` on ``data`` (an inode that never changes, moving with its directory): whoever
holds it owns the message. After taking it, the holder checks the message is still where it was.

Nothing in the spool stops a run, and nothing in it is followed: every entry of maildrop/ is
looked at with lstat and handled in its own error boundary, and removal and clean-up go through
directory descriptors opened with O_NOFOLLOW, since root may run the queue of a spool whose owner
could plant links to root's files.
"""

import fcntl
import io
import json
import os
import re
import stat
import time
from contextlib import contextmanager, suppress
from types import SimpleNamespace
from typing import BinaryIO, Callable, NamedTuple

from .config import SERVICE_USER, SYSTEM_QUEUE
from .envelope import Envelope
from .errors import CantCreate, DataError, PolicyError, Rejected, ShimError, TempFail, UsageError
from .i18n import _
from .log import one_line, token

ID_PATTERN = re.compile(r"[0-9A-F]{16}\Z")
DROP_PATTERN = re.compile(r"([0-9A-F]{16})\.[0-9a-f]{16}\Z")  # <id>.<64 random bits>
# a maildrop file's name in corrupt/, renamed by `_free_name` when its own was taken there
CORRUPT_PATTERN = re.compile(r"([0-9A-F]{16})\.[0-9a-f]{16}(?:\.[0-9a-f]{8})?\Z")
MAX_SHOWN = 64 << 10  # bytes of a corrupt/ entry --show prints
MAX_REASON = 1000  # characters of a refusal's reason kept for mailq and --show
MAX_DROP_SIZE = 64 << 20  # larger than any provider accepts
MAX_TRAILER = 64 << 10
MAX_TREE_DEPTH = 8  # levels of directories removed under a leftover (a message directory has one)
SENT_MARK = re.compile(r"sent\.(\d{1,6})\Z")  # see `Queue.mark_sent`
# one JSON token: a string, a bracket, or a run of anything else (read by `_flat`, never searched)
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[][{}]|[^][{}"]+', re.S)
_DEPTH = {b"[": 1, b"{": 1, b"]": -1, b"}": -1}
TMP_GRACE = 60.0  # seconds an unlocked temporary entry is left alone (its writer may be starting)
MIN_BACKOFF, MAX_BACKOFF = 60.0, 3600.0


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


def next_attempt_after(attempts: int, now: float) -> float:
    """Exponential backoff: 1 min after the first failed attempt, doubling, at most 1 h."""
    return now + min(MIN_BACKOFF * 2 ** max(attempts - 1, 0), MAX_BACKOFF)


class Recipient(SimpleNamespace):
    """One recipient's delivery state: ``state`` is pending, sent or failed; ``reply`` the last
    reply (or reason) for it."""

    def __init__(self, address: str, state: str = "pending", attempts: int = 0, reply: str = ""):
        super().__init__(address=address, state=state, attempts=attempts, reply=reply)


class QueuedMessage(SimpleNamespace):
    """A message in queue/ or failed/: where it is (``path``, the message directory) and what its
    envelope.json holds (`STORED`)."""

    STORED = ("id", "envelope", "recipients", "arrival", "attempts", "next_attempt", "last_reply", "bounce",
              "uid", "drop", "failure")
    data_file = None  # not stored: the open, locked data file while `Queue.lock` holds it

    def __init__(self, id: str, path: str, envelope: Envelope, recipients: list[Recipient], arrival: float,
                 attempts: int = 0, next_attempt: float = 0.0, last_reply: str = "", bounce: bool = False,
                 uid: int | None = None, drop: str | None = None, failure: str | None = None):
        # bounce: a failure report, never bounced itself; uid: the submitting user; drop: the
        # maildrop file it came from (removed when the message is done); failure: why it is in failed/
        super().__init__(id=id, path=path, envelope=envelope, recipients=recipients, arrival=arrival,
                         attempts=attempts, next_attempt=next_attempt, last_reply=last_reply, bounce=bounce,
                         uid=uid, drop=drop, failure=failure)

    @property
    def data_path(self) -> str:
        return os.path.join(self.path, "data")

    @property
    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state == "pending"]

    @property
    def size(self) -> int:
        return self.envelope.size

    def to_dict(self) -> dict:
        data = {k: getattr(self, k) for k in self.STORED}
        data["envelope"] = self.envelope.to_dict()
        data["recipients"] = [dict(vars(r)) for r in self.recipients]
        return data

    @classmethod
    def from_dict(cls, data: dict, path: str) -> "QueuedMessage":
        fields = {k: data[k] for k in cls.STORED if k in data}
        fields["envelope"] = Envelope.from_dict(data["envelope"])
        fields["recipients"] = [Recipient(**r) for r in data["recipients"]]
        return cls(path=path, **fields)


class Refusal(NamedTuple):
    """A well-formed request the header policy refused at pickup, with what its notice needs, read
    through the descriptor the pickup held: the file kept in corrupt/ is its writer's to change."""

    id: str
    reason: str
    headers: bytes  # the original header block (`bounce.header_block`)
    requested_sender: str | None
    arrival: float
    uid: int  # the submitter


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


class PickupResult(SimpleNamespace):
    """What `Queue.pickup` did: ``accepted`` messages; ``rejected`` entries as (name, uid, reason);
    ``refusals`` (`Refusal`), those of them that were well-formed requests the header policy
    refused and that are kept in corrupt/; ``left`` entries as (name, reason), left in maildrop/
    for the next run because our own disk failed."""

    def __init__(self):
        super().__init__(accepted=[], rejected=[], refusals=[], left=[])


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
                    _mkdir(path, 0o700, st.st_uid, st.st_gid)
        except OSError as exc:
            raise CantCreate(_("cannot create the queue in {path}: {reason}").format(path=self.root, reason=exc.strerror)) from None

    def _make_root(self) -> None:
        os.makedirs(os.path.dirname(self.root), exist_ok=True)
        owner = _service_owner() if os.geteuid() == 0 and self.root == SYSTEM_QUEUE else None
        uid, gid = owner or (os.geteuid(), os.getegid())
        _mkdir(self.root, 0o711 if owner else 0o700, uid, gid)

    def can_write(self) -> bool:
        """May this process put messages into queue/ itself (else it must use maildrop/)?"""
        return all(_may(path, os.W_OK | os.X_OK) for path in (self.tmp, self.queue))

    def check_access(self) -> None:
        """Listing, running and administering the queue need its owner (or root)."""
        everything = os.R_OK | os.W_OK | os.X_OK
        if os.path.isdir(self.root) and not all(_may(p, everything) for p in (self.tmp, self.queue, self.failed)):
            raise PolicyError(
                _("cannot read the queue in {path}").format(path=self.root),
                hint=_("run this as root or as the owner of the queue directory"),
            )

    def _owner(self) -> tuple[int, int]:
        st = os.stat(self.root)
        return st.st_uid, st.st_gid

    # -- writing -----------------------------------------------------------------------------

    def spool(self, *, drop: bool = False) -> "Spool":
        """A new message: write it to ``.file``, then ``.commit(envelope)``. Use as a context
        manager: leaving it without a commit removes every trace of the message. `drop` writes
        to maildrop/ for the runner to pick up (when `can_write` is False)."""
        return Spool(self, drop)

    def save(self, message: QueuedMessage) -> None:
        """Replace envelope.json atomically (the caller holds the message's lock)."""
        _write_json(message.path, "envelope.json", message.to_dict(), self._owner())

    # -- reading -----------------------------------------------------------------------------

    def ids(self) -> list[str]:
        """Ids in queue/, oldest first."""
        return _ids_in(self.queue)

    def failed_ids(self) -> list[str]:
        return _ids_in(self.failed)

    def load(self, msg_id: str) -> QueuedMessage | None:
        """The message in queue/ (or failed/), or None when it is not there (any more)."""
        for directory in (self.queue, self.failed):
            message = self._read(os.path.join(directory, _checked_id(msg_id)))
            if message is not None:
                return message
        return None

    def find(self, msg_id: str) -> QueuedMessage:
        """`load` for administration: an unknown id is the user's error."""
        self.check_access()
        message = self.load(msg_id)
        if message is None:
            raise UsageError(_("no message {id} in {path}").format(id=msg_id, path=self.root))
        return message

    def _read(self, path: str) -> QueuedMessage | None:
        """The message in directory `path`, with the recipients `mark_sent` recorded; a link in
        place of the directory or of envelope.json is damage, not a message."""
        try:
            with _opened(path) as directory:
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
        path = os.path.join(self.queue, _checked_id(msg_id))
        try:
            with _opened(path) as directory:
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
            message = self._read(path) if _same_file(data.fileno(), os.path.join(path, "data")) else None
            if message is not None:
                message.data_file = data
            yield message

    # -- state changes (the caller holds the lock) -------------------------------------------

    def finish(self, message: QueuedMessage) -> None:
        """Remove a message that needs nothing more (delivered, or deleted by the admin)."""
        self._forget_drop(message)
        trash = f"{message.id}.done.{os.urandom(4).hex()}"
        with _opened(os.path.dirname(message.path)) as source, _opened(self.tmp) as tmp:
            # one atomic step; a crash leaves only tmp/ garbage
            os.rename(os.path.basename(message.path), trash, src_dir_fd=source, dst_dir_fd=tmp)
            os.fsync(source)
            _remove_entry(tmp, trash)

    def fail(self, message: QueuedMessage, reason: str) -> None:
        """Move a message to failed/ with the reason (no more attempts)."""
        message.failure = reason
        self.save(message)
        self._forget_drop(message)
        target = os.path.join(self.failed, message.id)
        os.rename(message.path, target)
        _fsync_dir(self.failed)
        _fsync_dir(self.queue)
        message.path = target

    def _forget_drop(self, message: QueuedMessage) -> None:
        """A picked-up message's maildrop file must be gone before the message is: otherwise a
        runner that crashed between commit and unlink would have it picked up again."""
        if not message.drop or not DROP_PATTERN.match(message.drop):
            return
        try:
            with self._pickup_lock() as maildrop:
                os.unlink(message.drop, dir_fd=maildrop)
        except (FileNotFoundError, NotADirectoryError):
            pass  # gone already, or no maildrop/ to pick it up from again

    def mark_sent(self, message: QueuedMessage) -> None:
        """Record the recipients who took the message without writing a block: one empty file
        ``sent.<index>`` each (an inode and a directory entry), for when envelope.json cannot be
        replaced (a full disk). `_read` applies them: no later attempt sends them a second copy."""
        with _opened(message.path) as directory:
            for index, rcpt in enumerate(message.recipients):
                if rcpt.state == "sent":
                    with suppress(FileExistsError):
                        os.close(os.open(f"sent.{index}", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                         | os.O_CLOEXEC, 0o600, dir_fd=directory))
            os.fsync(directory)

    # -- administration ----------------------------------------------------------------------

    def locate(self, ref: str) -> "QueuedMessage | CorruptItem":
        """What --show and --delete name: a message of queue/ or failed/ by its id, or an entry of
        corrupt/ by the id the log printed for it or by its full name (also as corrupt/NAME)."""
        self.check_access()
        ref = ref or ""
        if ID_PATTERN.match(ref):
            message = self.load(ref)
            if message is not None:
                return message
        items = self.corrupt_items()
        name = ref.removeprefix("corrupt/")
        found = [i for i in items if i.name == name] or [i for i in items if i.id == ref]
        if len(found) > 1:
            raise UsageError(_("{id} names {count} entries of {path}; give the full name: {names}").format(
                id=ref, count=len(found), path=self.corrupt, names=", ".join(i.name for i in found)))
        if found:
            return found[0]
        _checked_id(ref)  # a word that is neither an id nor a name in corrupt/
        raise UsageError(_("no message {id} in {path}").format(id=ref, path=self.root))

    def delete(self, ref: str) -> "QueuedMessage | CorruptItem":
        """Remove a message from queue/ or failed/, or an entry of corrupt/ (`locate`); refuses
        a message being delivered right now."""
        found = self.locate(ref)
        if isinstance(found, CorruptItem):
            self._discard_corrupt(found.name)
            return found
        if not self._discard(os.path.dirname(found.path), found.id) and os.path.lexists(found.path):
            if os.path.dirname(found.path) == self.failed:
                raise TempFail(_("{id} is in use; try again").format(id=found.id))
            raise TempFail(_("{id} is being delivered; try again when it is done").format(id=found.id))
        return found

    def delete_all(self, removed: Callable[[str], None]) -> list[str]:
        """Postfix's ``postsuper -d ALL``: every message of queue/ and failed/, every entry of
        corrupt/; `removed(id)` after each. Returns the ids left because another process holds
        them (being delivered). maildrop/ is left to the pickup."""
        self.check_access()
        busy = []
        for directory in (self.queue, self.failed):
            for msg_id in _ids_in(directory):
                if self._discard(directory, msg_id):
                    removed(msg_id)
                elif os.path.lexists(os.path.join(directory, msg_id)):
                    busy.append(msg_id)
        for item in self.corrupt_items():
            if self._discard_corrupt(item.name):
                removed(item.id)
        return busy

    def expire_kept(self, max_age: float, removed: Callable[[str, str, float], None],
                    now: float | None = None) -> None:
        """Remove what failed/ and corrupt/ have kept for longer than `max_age` seconds
        (SENDMAIL_SHIM_FAILED_AGE): a failed message counts from when it failed (its
        envelope.json was last written), a corrupt/ entry from its refusal. `removed(where, id,
        age)` after each; one in use is left for the next run."""
        now = time.time() if now is None else now
        for msg_id in self.failed_ids():
            since = self._failed_since(msg_id)
            if since is not None and now - since > max_age and self._discard(self.failed, msg_id):
                removed("failed", msg_id, now - since)
        for item in self.corrupt_items():
            if now - item.refused > max_age and self._discard_corrupt(item.name):
                removed("corrupt", item.id, now - item.refused)
        self._forget_stray_reasons()

    def _failed_since(self, msg_id: str) -> float | None:
        """When message `msg_id` went to failed/ (nothing rewrites its envelope.json there)."""
        path = os.path.join(self.failed, msg_id)
        try:
            with _opened(path) as directory:
                return os.stat("envelope.json", dir_fd=directory, follow_symlinks=False).st_mtime
        except OSError:  # a damaged message, or a link in its place: when the entry last changed
            try:
                st = os.lstat(path)
            except OSError:
                return None
            return max(st.st_mtime, st.st_ctime)

    def _discard(self, directory: str, msg_id: str) -> bool:
        """Remove message `msg_id` of queue/ or failed/ while holding its lock (as `finish`);
        False when another process holds it (being delivered, requeued) or it is gone. A damaged
        one (envelope.json unreadable, a link in place of the directory) goes too, never followed."""
        path = os.path.join(directory, msg_id)
        try:
            message = self._read(path)
        except DataError:
            message = None
        try:
            with _opened(path) as opened:
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
                self._forget_drop(message)
            return self._trash(directory, msg_id)
        finally:
            if fd is not None:
                os.close(fd)

    def _discard_corrupt(self, name: str) -> bool:
        """Remove entry `name` of corrupt/ and its recorded reason; whether it is gone."""
        gone = self._trash(self.corrupt, name)
        if gone:
            with suppress(OSError), _opened(self.reasons) as reasons:
                _remove_entry(reasons, name)
        return gone

    def _trash(self, directory: str, name: str) -> bool:
        """Entry `name` of `directory` out of it in one atomic rename into tmp/, then removed
        there (a crash leaves only tmp/ garbage, which `clean_tmp` removes); False when it was
        gone already."""
        trash = f"trash.{os.urandom(8).hex()}"
        with _opened(directory) as source, _opened(self.tmp) as tmp:
            try:
                os.rename(name, trash, src_dir_fd=source, dst_dir_fd=tmp)
            except FileNotFoundError:
                return False
            os.fsync(source)
            _remove_entry(tmp, trash)
        return True

    def retry_now(self, msg_id: str | None = None) -> list[str]:
        """Make one message (or all) due now; returns the ids changed (busy ones are skipped)."""
        ids = [self.find(msg_id).id] if msg_id else self.ids()
        changed = []
        for one in ids:
            with self.lock(one) as message:
                if message is None:
                    continue
                message.next_attempt = time.time()
                self.save(message)
                changed.append(one)
        return changed

    def requeue(self, msg_id: str) -> QueuedMessage:
        """failed/<id> → queue/<id>: failed recipients become pending, the clock restarts."""
        self.check_access()
        path = os.path.join(self.failed, _checked_id(msg_id))
        message = self._read(path)
        if message is None:
            raise UsageError(_("no message {id} in {path}").format(id=msg_id, path=self.failed))
        with _locked(message.data_path) as ok:
            if not ok:
                raise TempFail(_("{id} is in use; try again").format(id=msg_id))
            for rcpt in message.recipients:
                if rcpt.state == "failed":
                    rcpt.state, rcpt.attempts = "pending", 0
            message.failure, message.attempts = None, 0
            message.arrival = message.next_attempt = time.time()
            self.save(message)
            target = os.path.join(self.queue, message.id)
            os.rename(path, target)
            _fsync_dir(self.queue)
            message.path = target
        return message

    def listing(self, now: float | None = None) -> str:
        """`-bp` / mailq text: queue/, failed/ and corrupt/, and how many wait in maildrop/."""
        self.check_access()
        messages = [m for m in map(self.load, self.ids()) if m is not None]
        failed = [m for m in (self._read(os.path.join(self.failed, i)) for i in self.failed_ids()) if m]
        busy = {m.id for m in messages if _is_locked(m.data_path)}
        return format_listing(messages, failed, busy, time.time() if now is None else now,
                              corrupt=self.corrupt_items(), waiting=self.waiting())

    def waiting(self) -> int:
        """Entries of maildrop/ the next pickup takes (or refuses)."""
        try:
            with _opened(self.maildrop) as maildrop:
                return len(os.listdir(maildrop))
        except OSError:
            return 0

    def show(self, ref: str) -> bytes:
        """A description of the message and its state, then the message itself; for an entry of
        corrupt/, what is known of it and its first MAX_SHOWN bytes when it is a plain file."""
        found = self.locate(ref)
        if isinstance(found, CorruptItem):
            head = self._corrupt_head(found.name) if found.kind == "file" else None
            return describe_corrupt(found, head).encode("utf-8", "replace") + b"\n" + (head or b"")
        try:
            with _opened(found.path) as directory:
                fd = os.open("data", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=directory)
        except OSError as exc:
            raise DataError(f"{found.path}/data is unreadable: {exc.strerror}") from None
        with open(fd, "rb") as data:
            return describe(found).encode("utf-8", "replace") + b"\n" + data.read()

    # -- corrupt/ ------------------------------------------------------------------------------

    def corrupt_items(self) -> list[CorruptItem]:
        """The entries of corrupt/ (lstat only), by name."""
        try:
            with _opened(self.corrupt) as corrupt:
                names = sorted(os.listdir(corrupt))
                with self._reasons_dir() as reasons:
                    return [item for name in names if (item := _corrupt_item(corrupt, reasons, name))]
        except OSError:  # no corrupt/, or a link in its place
            return []

    @contextmanager
    def _reasons_dir(self):
        """corrupt-reasons/ opened, or None when there is none (yet)."""
        try:
            fd = os.open(self.reasons, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            yield None
            return
        try:
            yield fd
        finally:
            os.close(fd)

    def _note_refusal(self, name: str, reason: str) -> None:
        """Record why entry `name` of corrupt/ was refused, for mailq and --show. Best effort: a
        refusal stands without it (mailq then says the reason is unknown)."""
        with suppress(OSError):
            owner = self._owner()
            _mkdir(self.reasons, 0o700, *owner)
            with _opened(self.reasons) as reasons:
                _remove_entry(reasons, name)  # an earlier entry's, or anything planted there
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                             dir_fd=reasons)
                try:
                    if os.geteuid() == 0 and owner != (0, 0):
                        os.fchown(fd, *owner)
                    os.write(fd, one_line(reason)[:MAX_REASON].encode("utf-8", "replace"))
                finally:
                    os.close(fd)

    def _forget_stray_reasons(self, grace: float = TMP_GRACE) -> None:
        """Remove recorded reasons whose entry of corrupt/ is gone (removed by hand), once older
        than `grace` seconds: a pickup records the reason just after moving the entry."""
        cutoff = time.time() - grace
        with suppress(OSError), self._reasons_dir() as reasons:
            if reasons is None:
                return
            present = set(_listdir(self.corrupt))
            for name in set(os.listdir(reasons)) - present:
                with suppress(OSError):
                    if os.stat(name, dir_fd=reasons, follow_symlinks=False).st_mtime < cutoff:
                        _remove_entry(reasons, name)

    def _corrupt_head(self, name: str) -> bytes | None:
        """The first MAX_SHOWN bytes of entry `name` of corrupt/ when it is a plain file: opened
        without following a link and without waiting on a FIFO swapped in, and checked again."""
        try:
            with _opened(self.corrupt) as corrupt:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
                             dir_fd=corrupt)
        except OSError:
            return None
        with open(fd, "rb") as stream:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            return stream.read(MAX_SHOWN)

    # -- maildrop (runner side) --------------------------------------------------------------

    def pickup(self, accept: Callable[[dict, BinaryIO, BinaryIO], Envelope]) -> PickupResult:
        """Move valid maildrop files into queue/, refused ones into corrupt/.

        ``accept(fields, data, out)`` gets the dropped trailer's fields and the dropped message
        (a stream of exactly the declared size); it writes the message to trust to `out` and
        returns its envelope, or raises ShimError to refuse it.
        """
        result = PickupResult()
        try:
            with self._pickup_lock() as maildrop:
                for name in sorted(os.listdir(maildrop)):  # all of them: maildrop/ must end up empty
                    self._pickup_one(maildrop, name, accept, result)
        except (FileNotFoundError, PermissionError):
            pass  # no maildrop/ here, or not ours to read
        return result

    def _pickup_one(self, maildrop: int, name: str, accept, result: PickupResult) -> None:
        """One entry, in its own error boundary: it is queued, or quarantined in corrupt/, or
        (when our own disk fails) left for the next run; either way the pickup goes on."""
        try:
            self._take(maildrop, name, accept, result)
        except CantCreate as exc:  # our disk, not their file
            result.left.append((name, str(exc)))
        except Exception as exc:  # an entry nobody foresaw must not stop every later run
            self._refuse(maildrop, name, _owner_of(maildrop, name), f"cannot pick it up: {type(exc).__name__}", result)

    def _take(self, maildrop: int, name: str, accept, result: PickupResult) -> None:
        """Look at the entry with lstat before opening it (a directory, FIFO, socket or link is
        never opened), then check the file actually opened, which may have been swapped."""
        try:
            problem = _odd_drop(os.stat(name, dir_fd=maildrop, follow_symlinks=False), name)
        except FileNotFoundError:
            return
        if problem:
            self._refuse(maildrop, name, _owner_of(maildrop, name), problem, result)
            return
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=maildrop)
        except FileNotFoundError:
            return
        except OSError as exc:
            self._refuse(maildrop, name, _owner_of(maildrop, name), f"cannot open: {exc.strerror}", result)
            return
        st = os.fstat(fd)
        problem = _odd_drop(st, name)
        if problem:
            os.close(fd)
            self._refuse(maildrop, name, st.st_uid, problem, result)
            return
        msg_id = DROP_PATTERN.match(name).group(1)
        with open(fd, "rb") as source:
            if self._exists(msg_id):
                os.unlink(name, dir_fd=maildrop)  # already picked up by a runner that died before removing it
                os.fsync(maildrop)
                return
            message = self._queue_drop(maildrop, name, msg_id, source, st, accept, result)
        if message is None:
            return
        crash_point("pickup-committed")
        os.unlink(name, dir_fd=maildrop)
        os.fsync(maildrop)
        result.accepted.append(message)

    def _queue_drop(self, maildrop: int, name: str, msg_id: str, source: BinaryIO, st: os.stat_result, accept,
                    result: PickupResult) -> QueuedMessage | None:
        """The drop checked, accepted and committed to queue/; None when it is refused."""
        uid = st.st_uid
        try:
            fields, size = _check_drop(source, st)
            uid = self._submitter(fields, st)
            # a pickup that died half-way (we hold the pickup lock: nobody else writes it)
            _rmtree(os.path.join(self.tmp, msg_id))
            with Spool(self, False, msg_id) as spool:
                envelope = accept(fields, _Bounded(source, size), spool.file)
                spool.commit(envelope, uid=uid, arrival=_arrival(st), drop=name)
            return spool.message
        except CantCreate:
            raise  # our disk, not their file: `_pickup_one` leaves it for the next run
        except Rejected as exc:
            refusal = Refusal(msg_id, str(exc), _original_headers(source, size), fields.get("requested_sender"),
                              _arrival(st), uid)
            if self._refuse(maildrop, name, uid, str(exc), result):
                result.refusals.append(refusal)
        except ShimError as exc:
            self._refuse(maildrop, name, uid, str(exc), result)
        return None

    def _submitter(self, fields: dict, st: os.stat_result) -> int:
        """Whom the message is from: the trailer's "uid" in a file of the spool's owner (the
        submission service, which has it from SO_PEERCRED) or of root; else the file's owner,
        whatever its trailer claims."""
        if st.st_uid not in (0, self._owner()[0]):
            return st.st_uid
        uid = fields.get("uid", st.st_uid)
        if isinstance(uid, bool) or not isinstance(uid, int) or not 0 <= uid < 1 << 32:
            raise DataError("the trailer's uid is not a uid")
        return uid

    def _exists(self, msg_id: str) -> bool:
        return any(os.path.lexists(os.path.join(d, msg_id)) for d in (self.queue, self.failed))

    def _refuse(self, maildrop: int, name: str, uid: int, reason: str, result: PickupResult) -> bool:
        """Move a refused entry to corrupt/ (under a new name when its own is taken there);
        whether it is there now. When it cannot be moved it is logged, and the next run refuses
        it again (its notice waits for that: nobody is told twice)."""
        try:
            with _opened(self.corrupt) as corrupt:
                kept = _free_name(corrupt, name)
                os.rename(name, kept, src_dir_fd=maildrop, dst_dir_fd=corrupt)
            moved = True
            self._note_refusal(kept, reason)
        except OSError as exc:  # e.g. a directory some user made there, which we may not move
            if _owner_of(maildrop, name) < 0:
                return False  # gone meanwhile
            reason += f"; cannot move it to {self.corrupt}: {exc.strerror}"
            moved = False
        result.rejected.append((name, uid, reason))
        return moved

    @contextmanager
    def _pickup_lock(self):
        """maildrop/, opened (never through a link) and locked: serialises pickups with the
        removal of picked-up messages (see `_forget_drop`)."""
        with _opened(self.maildrop) as fd:
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
                with _opened(directory) as fd:
                    removed += [name for name in os.listdir(fd)
                                if _stale(fd, name, lock_name, cutoff) and _remove_entry(fd, name)]
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
                fd = _create(self.path, 0o640)
            else:
                self.path = os.path.join(queue.tmp, self.id)
                os.mkdir(self.path, 0o700)
                fd = _create(os.path.join(self.path, "data"), 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # "being written": clean_tmp keeps out
        except OSError as exc:
            with suppress(OSError):  # on a read-only file system even the clean-up fails
                self._remove()
            where = queue.droptmp if drop else queue.tmp
            raise CantCreate(_("cannot write to the queue ({path}): {reason}").format(path=where, reason=exc.strerror)) from None
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
        """Make the message durable; returns its id. Only after this may the caller exit 0.

        `bounce` marks a failure report (never bounced itself); `uid`, `arrival` and `drop` are
        for `Queue.pickup` (default: this process's user, now, not from maildrop/).
        """
        if self.drop:
            return self.commit_request(envelope.to_dict())
        return self._durable(lambda: self._commit_queue(envelope, bounce, uid, arrival or time.time(), drop))

    def commit_request(self, fields: dict) -> str:
        """Make a maildrop file durable whose trailer is `fields` (drop.py): the header policy
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
        try:
            self.file.write(trailer)
            self.file.flush()
            os.fsync(self.file.fileno())
            crash_point("spool-synced")
            commit()
        except OSError as exc:
            raise CantCreate(_("cannot write to the queue: {reason}").format(reason=exc.strerror)) from None
        self.committed = True
        crash_point("spool-committed")
        return self.id

    def _commit_queue(self, envelope: Envelope, bounce: bool, uid, arrival: float, drop) -> None:
        queue = self.queue
        owner = queue._owner()
        message = QueuedMessage(
            id=self.id, path=self.path, envelope=envelope,
            recipients=[Recipient(a) for a in envelope.recipients], arrival=arrival,
            next_attempt=arrival, uid=os.getuid() if uid is None else uid, drop=drop, bounce=bounce,
        )
        self.message = message
        for path in (self.path, os.path.join(self.path, "data")):
            _give(path, owner)
        _write_json(self.path, "envelope.json", message.to_dict(), owner)
        target = os.path.join(queue.queue, self.id)
        os.rename(self.path, target)  # fails rather than replaces when the id exists
        _fsync_dir(queue.queue)
        self.path = message.path = target

    def _publish_drop(self) -> None:
        target = os.path.join(self.queue.maildrop, self._name)
        os.rename(self.path, target)
        self.path = target
        # maildrop/ is not readable by droppers, so it cannot be opened to fsync it; a second
        # fsync of the renamed file commits the rename on ext4, xfs and btrfs (journalled inode)
        if not _fsync_dir(self.queue.maildrop, may_refuse=True):
            os.fsync(self.file.fileno())

    def _remove(self) -> None:
        if self.path is None:
            return
        if self.drop:
            _unlink(self.path)
        else:
            _rmtree(self.path)


class _SpoolFile(io.BufferedWriter):
    """The spool's file: a failing write (disk full, quota) is the queue's error, which the CLI
    reports with exit 73, not a crash."""

    def write(self, data) -> int:
        try:
            return super().write(data)
        except OSError as exc:
            raise CantCreate(_("cannot write to the queue: {reason}").format(reason=exc.strerror)) from None

    def flush(self) -> None:
        try:
            super().flush()
        except OSError as exc:
            raise CantCreate(_("cannot write to the queue: {reason}").format(reason=exc.strerror)) from None


# -- formatting (pure) -------------------------------------------------------------------------


def format_listing(messages: list[QueuedMessage], failed: list[QueuedMessage], busy: set[str],
                   now: float, corrupt: list[CorruptItem] = (), waiting: int = 0) -> str:
    """Postfix's mailq layout; ``*`` marks a message being delivered, ``!`` one in failed/, ``#``
    an entry of corrupt/ (never delivered); the last line also counts the entries of maildrop/
    waiting for the pickup.

    Under each message: its undelivered recipients, grouped under the last reply for them in
    parentheses (with the next try), as Postfix shows the deferral reason. Under an entry of
    corrupt/: why the pickup refused it, as far as it is known.
    """
    if not messages and not failed and not corrupt and not waiting:
        return "Mail queue is empty\n"
    indent = " " * 48  # where the sender column starts
    lines = [f"{'-Queue ID-':17} --Size-- ----Arrival Time---- -Sender/Recipient-------"]
    entries = [(m, "*" if m.id in busy else " ") for m in messages] + [(m, "!") for m in failed]
    for message, mark in entries:
        lines.append(f"{message.id}{mark} {message.size:8d} {_ctime(message.arrival)}  {message.envelope.sender}")
        undelivered = [r for r in message.recipients if r.state != "sent"]
        for reply, group in _by_reply(undelivered):
            if mark == "!":
                lines.append(f"(failed: {reply or message.failure})")
            elif reply:
                due = "now" if message.next_attempt <= now else _ctime(message.next_attempt)
                lines.append(f"({reply}; next try {due})")
            lines.extend(indent + r.address for r in group)
        lines.append("")
    for item in corrupt:
        label = token(item.id)
        lines.append(f"{label:16}# {item.size:8d} {_ctime(item.mtime)}  corrupt/{token(item.name)}")
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
        f"Modified: {_ctime(item.mtime)}",
        f"Refused: {_ctime(item.refused)}",
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
        f"Arrival: {_ctime(message.arrival)}",
        f"Sender: {env.sender}" + (f" (requested {env.requested_sender})" if env.requested_sender else ""),
        f"Message-ID: {env.message_id or '-'}",
        f"Size: {env.size}",
        f"Attempts: {message.attempts}",
    ]
    if where == "queue":
        lines.append(f"Next-Attempt: {_ctime(message.next_attempt)}")
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


def _ctime(when: float) -> str:
    return time.strftime("%a %b %d %H:%M:%S", time.localtime(when))


# -- maildrop validation -----------------------------------------------------------------------


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
    """(reason, when) that `Queue._note_refusal` recorded for entry `name`, None when there is none."""
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


def _odd_drop(st: os.stat_result, name: str) -> str | None:
    """What makes entry `name` of maildrop/ no maildrop file, or None."""
    if not DROP_PATTERN.match(name):
        return "not a maildrop file name"
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        return "not a plain file"
    if st.st_size > MAX_DROP_SIZE + MAX_TRAILER:
        return f"larger than {MAX_DROP_SIZE} bytes"
    return None


def _check_drop(source: BinaryIO, st: os.stat_result) -> tuple[dict, int]:
    """The trailer of a dropped file that `_odd_drop` let through: (fields, message size) or
    DataError."""
    tail_size = min(st.st_size, MAX_TRAILER)
    source.seek(st.st_size - tail_size)
    tail = source.read(tail_size)
    start = tail.rfind(b"\n", 0, len(tail) - 1) + 1
    if not tail.endswith(b"\n") or (start == 0 and tail_size == MAX_TRAILER):
        raise DataError("no trailer")
    fields = _trailer(tail[start:])
    if fields.get("version") != 1:
        raise DataError("unknown trailer version")
    size = fields.get("size")
    if not isinstance(size, int) or size != st.st_size - (len(tail) - start) or size > MAX_DROP_SIZE:
        raise DataError("trailer size does not match the file")
    source.seek(0)
    return fields, size


def _trailer(line: bytes) -> dict:
    """A trailer's fields: a flat JSON object whose values are strings, integers, booleans, null
    or lists of strings. Its depth is checked first, without recursion: json.loads recurses once
    per level, and ten thousand ``[`` would end in a RecursionError on every run."""
    if not _flat(line):
        raise DataError("not a flat trailer")
    try:
        fields = json.loads(line)
    except ValueError:
        raise DataError("unreadable trailer") from None
    if not isinstance(fields, dict) or not all(map(_plain_value, fields.values())):
        raise DataError("not a flat trailer")
    return fields


def _flat(line: bytes) -> bool:
    """No more than two levels of brackets outside strings (an object, a list in it), token by
    token from the start: a string that does not end stops the scan instead of being searched
    for again from each of its quotes."""
    depth = pos = 0
    while pos < len(line):
        token = _TOKEN.match(line, pos)
        if token is None:
            return False
        pos = token.end()
        depth += _DEPTH.get(token.group(), 0)
        if depth > 2:
            return False
    return True


def _plain_value(value) -> bool:
    return (value is None or isinstance(value, (str, int))  # bool is an int
            or isinstance(value, list) and all(isinstance(item, str) for item in value))


def _arrival(st: os.stat_result) -> float:
    """A dropped message's arrival: when its file was renamed into maildrop/ (not in the future)."""
    return min(st.st_ctime, time.time())


def _original_headers(source: BinaryIO, size: int) -> bytes:
    """The header block of a dropped message, for the notice of its refusal."""
    from .bounce import MAX_ORIGINAL_HEADERS, header_block

    source.seek(0)
    return header_block(source.read(min(size, MAX_ORIGINAL_HEADERS + 4)))


def _apply_marks(message: QueuedMessage, names: list[str]) -> None:
    """Recipients `Queue.mark_sent` recorded as sent in the message directory's `names`."""
    for name in names:
        match = SENT_MARK.match(name)
        if match and int(match.group(1)) < len(message.recipients):
            message.recipients[int(match.group(1))].state = "sent"


class _Bounded:
    """A read-only view of the first `size` bytes of a file (the dropper may still append)."""

    def __init__(self, stream: BinaryIO, size: int):
        self._stream = stream
        self._left = size

    def read(self, n: int = -1) -> bytes:
        n = self._left if n is None or n < 0 else min(n, self._left)
        data = self._stream.read(n) if n else b""
        self._left -= len(data)
        return data

    def isatty(self) -> bool:
        return False


# -- file-system helpers -----------------------------------------------------------------------


def _create(path: str, mode: int) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    os.fchmod(fd, mode)  # the umask must not decide
    return fd


def _mkdir(path: str, mode: int, uid: int, gid: int) -> None:
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    _give(path, (uid, gid))
    os.chmod(path, mode)  # after chown, which may clear the setgid bit


def _give(path: str, owner: tuple[int, int]) -> None:
    """Root writing into a spool it does not own gives what it creates to the spool's owner, so
    that the service user's runner can work on it."""
    if os.geteuid() == 0 and owner != (0, 0):
        os.chown(path, *owner, follow_symlinks=False)


def _may(path: str, mode: int) -> bool:
    return os.access(path, mode, effective_ids=os.access in os.supports_effective_ids)


def _service_owner() -> tuple[int, int] | None:
    import pwd

    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def _write_json(directory: str, name: str, data: dict, owner: tuple[int, int]) -> None:
    temp = os.path.join(directory, name + ".tmp")
    _unlink(temp)  # a crash's leftover
    fd = _create(temp, 0o600)
    try:
        with open(fd, "wb") as stream:
            stream.write(json.dumps(data, ensure_ascii=False, indent=1).encode("utf-8"))
            stream.flush()
            os.fsync(fd)
    except OSError:
        _unlink(temp)  # a full disk: give its blocks back
        raise
    _give(temp, owner)
    os.rename(temp, os.path.join(directory, name))
    _fsync_dir(directory)


def _fsync_dir(path: str, may_refuse: bool = False) -> bool:
    """fsync a directory; False when `may_refuse` and we may not open it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except PermissionError:
        if may_refuse:
            return False
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _rmtree(path: str) -> None:
    """Remove `path` with `_remove_entry`; errors are ignored (`clean_tmp` retries)."""
    with suppress(OSError), _opened(os.path.dirname(path)) as parent:
        _remove_entry(parent, os.path.basename(path))


def _remove_entry(parent: int, name: str, depth: int = 0) -> bool:
    """Remove entry `name` of directory `parent`, a directory with what is in it (down to
    MAX_TREE_DEPTH); whether it is gone. Only through descriptors opened with O_NOFOLLOW: a link
    (or a FIFO, a socket) is removed itself, never opened — not even one swapped in meanwhile.
    shutil, with bz2, lzma and fnmatch, would cost every -odi call ~3 ms."""
    try:
        os.unlink(name, dir_fd=parent)
        return True
    except FileNotFoundError:
        return True
    except (IsADirectoryError, PermissionError):  # Linux says EISDIR for a directory, POSIX EPERM
        pass
    except OSError:
        return False
    if depth < MAX_TREE_DEPTH:
        with suppress(OSError), _opened(name, parent) as directory:
            for entry in os.listdir(directory):
                _remove_entry(directory, entry, depth + 1)
    try:
        os.rmdir(name, dir_fd=parent)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


@contextmanager
def _opened(path: str, parent: int | None = None):
    """A directory's descriptor (`path` relative to `parent` when given); a link in its place is
    refused (ELOOP or ENOTDIR)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    try:
        yield fd
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, PermissionError):
        return []


def _ids_in(directory: str) -> list[str]:
    return sorted(n for n in _listdir(directory) if ID_PATTERN.match(n))


def _checked_id(msg_id: str) -> str:
    if not ID_PATTERN.match(msg_id or ""):
        raise UsageError(_("{id!r} is not a queue id (16 hex digits, as shown by mailq)").format(id=msg_id))
    return msg_id


def _same_file(fd: int, path: str) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _owner_of(parent: int, name: str) -> int:
    """The uid owning entry `name` of directory `parent`, -1 when it is gone."""
    try:
        return os.stat(name, dir_fd=parent, follow_symlinks=False).st_uid
    except OSError:
        return -1


def _free_name(directory: int, name: str) -> str:
    """`name`, or a variant of it when `directory` has an entry of that name already."""
    try:
        os.stat(name, dir_fd=directory, follow_symlinks=False)
    except FileNotFoundError:
        return name
    return f"{name}.{os.urandom(4).hex()}"


@contextmanager
def _locked(path: str):
    """Hold the flock of `path` if it is free: yields True, else False."""
    try:
        # O_NONBLOCK: a FIFO in place of a data file must not hang the runner's open
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        yield False
        return
    try:
        yield True
    finally:
        os.close(fd)


def _is_locked(path: str) -> bool:
    with _locked(path) as free:
        return not free and os.path.exists(path)


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
    return not made or not _held(parent, name, lock_name)


def _held(parent: int, name: str, lock_name: str | None) -> bool:
    """Whether a writer holds the flock of entry `name` (of `lock_name` inside it, when given)."""
    probe = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO must not hang us
    try:
        if lock_name:
            with _opened(name, parent) as directory:
                fd = os.open(lock_name, probe, dir_fd=directory)
        else:
            fd = os.open(name, probe, dir_fd=parent)
    except OSError:
        return False  # no data yet (its writer died before creating it), or nothing we may open
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:  # BlockingIOError: held; anything else: left alone too
        return True
    finally:
        os.close(fd)
