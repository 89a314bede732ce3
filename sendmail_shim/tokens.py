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

import os
from contextlib import ExitStack, contextmanager, suppress
from typing import Iterator

from . import fsio

DIRECTORY = "tokens"
MAX_FILE = 64 << 10


class Cache:
    """The token cache of `login` in the spool `root` (`fsio.LoginFile`)."""

    def __init__(self, root: str, login: str):
        self.root = root
        self.file = fsio.LoginFile(root, DIRECTORY, login, MAX_FILE)

    def read(self) -> dict:
        """The cached record, {} when there is none (or none this process may read)."""
        return _record(self.file.read())

    @contextmanager
    def locked(self) -> Iterator["Writer | None"]:
        """The login's flock held for the block: yields a `Writer`, or None when this process
        cannot keep the cache (it may then ask the identity provider itself)."""
        with ExitStack() as stack:
            try:
                if not os.path.isdir(self.root):  # the first use of the spool
                    from .queue import Queue

                    with suppress(Exception):  # its CantCreate: no cache, the caller goes on without
                        Queue(self.root).ensure()
                directory = stack.enter_context(self.file.locked())
            except OSError:
                yield None
                return
            yield Writer(self.file, directory)


class Writer:
    """Reads and writes the cache within a `Cache.locked` block."""

    def __init__(self, file: fsio.LoginFile, directory: int):
        self.file, self.directory = file, directory

    def read(self) -> dict:
        return _record(self.file.read(self.directory))

    def write(self, record: dict) -> bool:
        """Replace the record (all or nothing); False when it could not be written."""
        try:
            self.file.write(self.directory, record)
            return True
        except OSError:
            return False


def _record(record) -> dict:
    return record if isinstance(record, dict) else {}
