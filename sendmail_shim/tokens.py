"""The OAuth2 token cache of a login, in the spool: written by whoever runs the queue, also where
the credential file is root's and read-only to the service user (a system install).

One file per login, ``tokens/<login>.json`` (directory 0700, file 0600, the spool owner's, as the
rest of the spool: whoever may not run the queue may not read it either). `oauth2` keeps there the
access token with its expiry and the refresh token the identity provider rotated. A refresh is
made under the flock of ``tokens/<login>.lock`` (`Cache.locked`): processes refreshing at once ask
the identity provider once, the others read its answer. Every file is reached through the
descriptor of ``tokens/`` opened without following a link, and what root writes is given to the
spool's owner, as in ledger.py. A damaged, planted or missing file is an empty cache.
"""

import fcntl
import json
import os
import stat
from contextlib import contextmanager, suppress
from typing import Iterator

from . import fsio
from .ledger import file_name

DIRECTORY = "tokens"
MAX_FILE = 64 << 10


class Cache:
    """The token cache of `login` in the spool `root`."""

    def __init__(self, root: str, login: str):
        self.root = root
        self.directory = os.path.join(root, DIRECTORY)
        self.name = file_name(login) + ".json"
        self._lock_name = file_name(login) + ".lock"

    def read(self) -> dict:
        """The cached record, {} when there is none (or none this process may read)."""
        with fsio.opened_or_none(self.directory) as directory:
            return _parse(directory, self.name) if directory is not None else {}

    @contextmanager
    def locked(self) -> Iterator["Writer | None"]:
        """The login's flock held for the block: yields a `Writer`, or None when this process
        cannot keep the cache (it may then ask the identity provider itself)."""
        try:
            owner = self._prepare()
            with fsio.opened(self.directory) as directory:
                fd = os.open(self._lock_name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                             0o600, dir_fd=directory)
        except OSError:
            yield None
            return
        try:
            if os.geteuid() == 0:
                os.fchown(fd, *owner)
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield Writer(self, owner)
        finally:
            os.close(fd)

    def _prepare(self) -> tuple[int, int]:
        """The spool's owner, with ``tokens/`` made (and the spool, the first time)."""
        if not os.path.isdir(self.root):
            from .queue import Queue

            with suppress(Exception):  # its CantCreate: no cache, the caller goes on without
                Queue(self.root).ensure()
        st = os.stat(self.root)
        fsio.mkdir(self.directory, 0o700, st.st_uid, st.st_gid)
        return st.st_uid, st.st_gid


class Writer:
    """Writes the cache of a `Cache.locked` block."""

    def __init__(self, cache: Cache, owner: tuple[int, int]):
        self.cache, self.owner = cache, owner

    def read(self) -> dict:
        return self.cache.read()

    def write(self, record: dict) -> bool:
        """Replace the record (all or nothing); False when it could not be written."""
        try:
            with fsio.opened(self.cache.directory) as directory:
                fsio.write_atomic(self.cache.name, json.dumps(record, sort_keys=True).encode(), dir_fd=directory,
                                  owner=self.owner if os.geteuid() == 0 else None)
            return True
        except OSError:
            return False


def _parse(directory: int, name: str) -> dict:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=directory)
    except OSError:
        return {}
    try:
        with open(fd, "rb") as stream:
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or device planted there
                return {}
            record = json.loads(stream.read(MAX_FILE + 1)[:MAX_FILE])
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}
