"""What an account sent, and whether it is paused: kept in the spool, so limits hold across runs,
processes and restarts.

One file per account, ``accounts/<login>.json`` in the spool (written by its owner, as the rest
of it): the sends within the longest window of the account's budget (`budgets.Send`) and the
pause a relay's reply imposed (`Pause`). Every change is made under the flock of
``accounts/<login>.lock`` and written whole (fsio.write_atomic): concurrent queue runs,
background deliveries and ``-odi`` callers share one budget and never overspend it. A damaged
or missing file counts as an account that sent nothing and is not paused.

An account whose budget has no limits keeps no file until a reply pauses it.
"""

import fcntl
import json
import os
from contextlib import contextmanager
from typing import Iterator, NamedTuple

from . import budgets, fsio
from .budgets import Budget, Send
from .errors import CantCreate
from .i18n import _

DIRECTORY = "accounts"
MAX_FILE = 4 << 20  # a damaged or planted file is not read whole
_SAFE = set("abcdefghijklmnopqrstuvwxyz0123456789@._+-")


class Pause(NamedTuple):
    """An account that must not send before `until`: `wait` is the limit reached (budgets.WAITS),
    `reason` the relay's reply that said so."""

    until: float
    wait: str
    reason: str
    since: float


class State(NamedTuple):
    sent: tuple[Send, ...] = ()
    pause: Pause | None = None


def file_name(login: str) -> str:
    """The ledger's base name for an account's login (lower case; other characters as _)."""
    return "".join(c if c in _SAFE else "_" for c in login.lower()) or "_"


class Ledger:
    """The ledger of the account `login`, whose limits are `budget`, in the spool `root`.

    Every file is reached through the descriptor of ``accounts/`` opened without following a
    link, and what root creates is given to the spool's owner: a compromised service user cannot
    steer root's queue run elsewhere, nor root's run lock the service out."""

    def __init__(self, root: str, login: str, budget: Budget):
        self.budget = budget
        self.root = root
        self.directory = os.path.join(root, DIRECTORY)
        self.name = file_name(login) + ".json"
        self._lock_name = file_name(login) + ".lock"

    def read(self, now: float) -> State:
        """The sends within the budget's window and the pause in force at `now` (None once it
        ended)."""
        with fsio.opened_or_none(self.directory) as directory:
            return self._read(directory, now) if directory is not None else State()

    def _read(self, directory: int, now: float) -> State:
        state = _parse(directory, self.name)
        pause = state.pause if state.pause and state.pause.until > now else None
        return State(tuple(s for s in state.sent if s.at > now - self.budget.window), pause)

    def reserve(self, recipients: int, now: float) -> float:
        """Count one message to `recipients` recipients as sent at `now`, if the budget and any
        pause allow it: returns `now`. Otherwise records nothing and returns when it may go."""
        if not self.budget.window and not self.read(now).pause:
            return now  # no limits kept, not paused: nothing to write
        with self._locked() as directory:
            state = self._read(directory, now)
            slot = budgets.next_slot(self.budget, state.sent, now, recipients)
            if state.pause:
                slot = max(slot, state.pause.until)
            if slot > now:
                return slot
            if self.budget.window:
                self._write(directory, State((*state.sent, Send(now, recipients)), state.pause))
            return now

    def settle(self, reserved: Send, accepted: float) -> None:
        """The relay took the message reserved as `reserved` at `accepted`: count it from then, as
        the relay does (the connection's set-up and the transfer lie between the two)."""
        if not self.budget.window:
            return
        with self._locked() as directory:
            state = _parse(directory, self.name)
            if reserved in state.sent:
                sent = sorted((*(s for s in state.sent if s != reserved), Send(accepted, reserved.recipients)))
                self._write(directory, State(tuple(sent), state.pause))

    def pause(self, wait: str, reason: str, now: float) -> tuple[Pause, bool]:
        """Pause the account for the limit `wait` a relay's `reason` says was reached: the pause
        in force, and whether it is new — not when the one in force ends at about that time or
        later (other connections hear the same reply: the log says a pause once)."""
        with self._locked() as directory:
            state = self._read(directory, now)
            until = budgets.pause_until(self.budget, wait, state.sent, now)
            if state.pause and state.pause.until >= until - budgets.MINUTE:
                return state.pause, False
            pause = Pause(until, wait, reason, now)
            self._write(directory, State(state.sent, pause))
            return pause, True

    @contextmanager
    def _locked(self) -> Iterator[int]:
        """The directory's descriptor, under the account's flock."""
        try:
            owner = _owner(self.root)
            fsio.mkdir(self.directory, 0o700, *owner)
            with fsio.opened(self.directory) as directory:
                fd = os.open(self._lock_name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                             0o600, dir_fd=directory)
                try:
                    if os.geteuid() == 0:
                        os.fchown(fd, *owner)
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    yield directory
                finally:
                    os.close(fd)
        except OSError as exc:
            raise CantCreate(_("cannot keep the sending budget in {path}: {reason}").format(
                path=self.directory, reason=exc.strerror)) from None

    def _write(self, directory: int, state: State) -> None:
        record = {"sent": [list(s) for s in state.sent], "pause": state.pause._asdict() if state.pause else None}
        fsio.write_atomic(self.name, json.dumps(record, separators=(",", ":")).encode(), dir_fd=directory,
                          owner=_owner(self.root) if os.geteuid() == 0 else None)


def _owner(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_uid, st.st_gid


def _parse(directory: int, name: str) -> State:
    """A ledger file's state; an empty one when it is missing, a link, too large or damaged."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=directory)
    except OSError:
        return State()
    try:
        with open(fd, "rb") as stream:
            record = json.loads(stream.read(MAX_FILE + 1)[:MAX_FILE])
        sent = tuple(sorted(Send(float(at), int(n)) for at, n in record.get("sent") or ()))
        pause = record.get("pause")
        pause = Pause(float(pause["until"]), str(pause["wait"]), str(pause["reason"]),
                      float(pause["since"])) if pause else None
        return State(sent, pause)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return State()
