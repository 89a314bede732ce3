"""File-system steps shared by the queue, the credential store and the set-up wizard.

One atomic replacement of a file (`write_atomic`: temporary file, fsync, rename, fsync of the
directory), and the pieces the spool needs to work in directories that someone else may write:
directory descriptors opened with O_NOFOLLOW (`opened`), removal through them that never follows
a link (`remove_entry`, `rmtree`), flock probes that never hang on a FIFO (`locked`), and a
login's JSON record in the spool under its flock (`LoginFile`, for the ledger and the token cache).
Only the standard library's os, fcntl, stat and json: every -odb caller imports this.
"""

import fcntl
import json
import os
import stat
from contextlib import contextmanager, suppress
from typing import Callable

MAX_TREE_DEPTH = 8  # levels of directories removed under a leftover (a message directory has one)


def write_atomic(path: str, data: bytes, *, mode: int = 0o600, owner: tuple[int, int] | None = None,
                 temp: str | None = None, dir_fd: int | None = None,
                 before_rename: Callable[[], None] | None = None) -> None:
    """Replace `path` by a file holding `data`, all or nothing: written to `temp` (by default a
    hidden name of its own beside it), given `owner` ((uid, gid), -1 to keep one) and `mode`
    before any byte is written (the umask does not decide), fsynced, renamed over `path`, then
    the directory fsynced (`dir_fd` when the caller holds it open; a relative `path` is then
    taken in that directory, so no link on the way is followed). `before_rename()` runs after
    the fsync. On any failure the temporary file is removed and the error raised (OSError)."""
    within = dir_fd if dir_fd is not None and not os.path.isabs(path) else None
    directory = os.path.dirname(os.path.abspath(path))
    if temp is None:
        temp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.urandom(6).hex()}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=within)
    try:
        with open(fd, "wb") as stream:
            if owner is not None:
                os.fchown(fd, *owner)
            os.fchmod(fd, mode)  # after chown, which may clear the setgid bit
            stream.write(data)
            stream.flush()
            os.fsync(fd)
        if before_rename is not None:
            before_rename()
        os.rename(temp, path, src_dir_fd=within, dst_dir_fd=within)
    except BaseException:
        with suppress(OSError):
            os.unlink(temp, dir_fd=within)  # a full disk: give its blocks back
        raise
    if dir_fd is None:
        fsync_dir(directory)
    else:
        os.fsync(dir_fd)


def create(path: str, mode: int) -> int:
    """A new file (never through a link), of `mode` whatever the umask says; its descriptor."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    os.fchmod(fd, mode)  # the umask must not decide
    return fd


def mkdir(path: str, mode: int, uid: int, gid: int) -> None:
    """Make directory `path` (left alone when it exists), given to (uid, gid) by root (`give`)."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    give(path, (uid, gid))
    os.chmod(path, mode)  # after chown, which may clear the setgid bit


def give(path: str, owner: tuple[int, int]) -> None:
    """Root writing into a spool it does not own gives what it creates to the spool's owner, so
    that the service user's runner can work on it."""
    if os.geteuid() == 0 and owner != (0, 0):
        os.chown(path, *owner, follow_symlinks=False)


def fsync_dir(path: str, may_refuse: bool = False) -> bool:
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


_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@contextmanager
def _descriptor(path: str, flags: int, parent: int | None = None, absent=()):
    """`path` opened with `flags` for the block, closed after it; None when the open raises one
    of `absent` (an exception type or a tuple of them)."""
    try:
        fd = os.open(path, flags, dir_fd=parent)
    except absent:
        yield None
        return
    try:
        yield fd
    finally:
        os.close(fd)


def opened(path: str, parent: int | None = None):
    """A directory's descriptor (`path` relative to `parent` when given); a link in its place is
    refused (ELOOP or ENOTDIR)."""
    return _descriptor(path, _DIRECTORY, parent)


def opened_or_none(path: str):
    """`opened`, or None when there is no such directory (or a link in its place)."""
    return _descriptor(path, _DIRECTORY, absent=OSError)


def rmtree(path: str) -> None:
    """Remove `path` with `remove_entry`; errors are ignored (the queue's clean-up retries)."""
    with suppress(OSError), opened(os.path.dirname(path)) as parent:
        remove_entry(parent, os.path.basename(path))


def remove_entry(parent: int, name: str, depth: int = 0) -> bool:
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
        with suppress(OSError), opened(name, parent) as directory:
            for entry in os.listdir(directory):
                remove_entry(directory, entry, depth + 1)
    try:
        os.rmdir(name, dir_fd=parent)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


def unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, PermissionError):
        return []


def same_file(fd: int, path: str) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def owner_of(parent: int, name: str) -> int:
    """The uid owning entry `name` of directory `parent`, -1 when it is gone."""
    try:
        return os.stat(name, dir_fd=parent, follow_symlinks=False).st_uid
    except OSError:
        return -1


def free_name(directory: int, name: str) -> str:
    """`name`, or a variant of it when `directory` has an entry of that name already."""
    try:
        os.stat(name, dir_fd=directory, follow_symlinks=False)
    except FileNotFoundError:
        return name
    return f"{name}.{os.urandom(4).hex()}"


@contextmanager
def locked(path: str):
    """Hold the flock of `path` if it is free: yields True, else False."""
    # O_NONBLOCK: a FIFO in place of a data file must not hang the runner's open
    with _descriptor(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW,
                     absent=FileNotFoundError) as fd:
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fd = None
        yield fd is not None


def is_locked(path: str) -> bool:
    with locked(path) as free:
        return not free and os.path.exists(path)


def held(parent: int, name: str, lock_name: str | None) -> bool:
    """Whether a writer holds the flock of entry `name` (of `lock_name` inside it, when given)."""
    probe = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO must not hang us
    try:
        if lock_name:
            with opened(name, parent) as directory:
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


def may(path: str, mode: int) -> bool:
    return os.access(path, mode, effective_ids=os.access in os.supports_effective_ids)


_LOGIN_CHARACTERS = set("abcdefghijklmnopqrstuvwxyz0123456789@._+-")


class LoginFile:
    """One JSON record per login in a directory of the spool, ``<root>/<directory>/<login>.json``,
    and the flock that orders its changes, ``<login>.lock``: the sending ledger (ledger.py) and the
    token cache (tokens.py). Reached through the directory's descriptor opened without following a
    link; what root creates is given to the spool's owner, so root's queue run neither follows a
    link a compromised owner planted nor locks the owner out. A missing, damaged or planted file
    (a link, a FIFO, more than `max_size` bytes) reads as None."""

    def __init__(self, root: str, directory: str, login: str, max_size: int):
        stem = "".join(c if c in _LOGIN_CHARACTERS else "_" for c in login.lower()) or "_"
        self.root, self.directory, self.max_size = root, os.path.join(root, directory), max_size
        self.name, self._lock_name = stem + ".json", stem + ".lock"

    def read(self, directory: int | None = None):
        """The record (`directory`: the descriptor `locked` gave, when held)."""
        if directory is not None:
            return self._parse(directory)
        with opened_or_none(self.directory) as directory:
            return self._parse(directory) if directory is not None else None

    @contextmanager
    def locked(self):
        """The directory's descriptor (made, the spool's owner's, when missing), under the login's
        flock; OSError when it cannot be had."""
        st = os.stat(self.root)
        mkdir(self.directory, 0o700, st.st_uid, st.st_gid)
        with opened(self.directory) as directory:
            fd = os.open(self._lock_name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         0o600, dir_fd=directory)
            try:
                if os.geteuid() == 0:
                    os.fchown(fd, st.st_uid, st.st_gid)
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield directory
            finally:
                os.close(fd)

    def write(self, directory: int, record) -> None:
        """Replace the record, all or nothing (`directory`: the descriptor `locked` gave); OSError."""
        st = os.stat(self.root)
        write_atomic(self.name, json.dumps(record, separators=(",", ":"), sort_keys=True).encode(),
                     dir_fd=directory, owner=(st.st_uid, st.st_gid) if os.geteuid() == 0 else None)

    def _parse(self, directory: int):
        try:
            fd = os.open(self.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=directory)
        except OSError:
            return None
        try:
            with open(fd, "rb") as stream:
                if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or a device planted there
                    return None
                return json.loads(stream.read(self.max_size + 1)[:self.max_size])
        except (OSError, ValueError):
            return None
