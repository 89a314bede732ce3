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

from contextlib import contextmanager
from typing import Iterator, NamedTuple

from . import budgets, fsio
from .budgets import Budget, Send
from .errors import CantCreate
from .i18n import _

DIRECTORY = "accounts"
MAX_FILE = 4 << 20  # a damaged or planted file is not read whole


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


class Ledger:
    """The ledger of the account `login`, whose limits are `budget`, in the spool `root`
    (`fsio.LoginFile`: no link followed, root's writes given to the spool's owner)."""

    def __init__(self, root: str, login: str, budget: Budget):
        self.budget = budget
        self.file = fsio.LoginFile(root, DIRECTORY, login, MAX_FILE)

    def read(self, now: float, directory: int | None = None) -> State:
        """The sends within the budget's window and the pause in force at `now` (None once it
        ended)."""
        state = _state(self.file.read(directory))
        pause = state.pause if state.pause and state.pause.until > now else None
        return State(tuple(s for s in state.sent if s.at > now - self.budget.window), pause)

    def reserve(self, recipients: int, now: float) -> float:
        """Count one message to `recipients` recipients as sent at `now`, if the budget and any
        pause allow it: returns `now`. Otherwise records nothing and returns when it may go."""
        if not self.budget.window and not self.read(now).pause:
            return now  # no limits kept, not paused: nothing to write
        with self._locked() as directory:
            state = self.read(now, directory)
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
            state = _state(self.file.read(directory))
            if reserved in state.sent:
                sent = sorted((*(s for s in state.sent if s != reserved), Send(accepted, reserved.recipients)))
                self._write(directory, State(tuple(sent), state.pause))

    def pause(self, wait: str, reason: str, now: float) -> tuple[Pause, bool]:
        """Pause the account for the limit `wait` a relay's `reason` says was reached: the pause
        in force, and whether it is new — not when the one in force ends at about that time or
        later (other connections hear the same reply: the log says a pause once)."""
        with self._locked() as directory:
            state = self.read(now, directory)
            until = budgets.pause_until(self.budget, wait, state.sent, now)
            if state.pause and state.pause.until >= until - budgets.MINUTE:
                return state.pause, False
            pause = Pause(until, wait, reason, now)
            self._write(directory, State(state.sent, pause))
            return pause, True

    @contextmanager
    def _locked(self) -> Iterator[int]:
        """The directory's descriptor, under the account's flock; CantCreate when the spool cannot
        keep the ledger (nor write it within the block)."""
        try:
            with self.file.locked() as directory:
                yield directory
        except OSError as exc:
            raise CantCreate(_("cannot keep the sending budget in {path}: {reason}").format(
                path=self.file.directory, reason=exc.strerror)) from None

    def _write(self, directory: int, state: State) -> None:
        self.file.write(directory, {"sent": [list(s) for s in state.sent],
                                    "pause": state.pause._asdict() if state.pause else None})


def for_account(config) -> Ledger:
    """The ledger of an account's budget and pauses (its login's, in the spool)."""
    return Ledger(config.queue_dir, config.sender, config.budget)


def _state(record) -> State:
    """A ledger record's state; an empty one when there is none or it is damaged."""
    try:
        sent = tuple(sorted(Send(float(at), int(n)) for at, n in record.get("sent") or ()))
        pause = record.get("pause")
        pause = Pause(float(pause["until"]), str(pause["wait"]), str(pause["reason"]),
                      float(pause["since"])) if pause else None
        return State(sent, pause)
    except (ValueError, TypeError, KeyError, AttributeError):
        return State()
