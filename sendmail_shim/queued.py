"""A queued message as its envelope.json stores it: the envelope, each recipient's state (one of
`STATES`: Postfix's words, HACKING.md "Words"), arrival, attempts, next attempt. queue.py stores
and locks it; attempt.py and postsuper.py change it."""

import os
from types import SimpleNamespace

from .envelope import Envelope

STATES = ("deferred", "sent", "bounced")  # a recipient's (HACKING.md, "Words")
OLD_STATES = {"pending": "deferred", "failed": "bounced"}  # as older versions wrote envelope.json


class Recipient(SimpleNamespace):
    """One recipient's delivery state: ``state`` is one of `STATES` (deferred until it is tried:
    ``attempts`` tells a never-tried one); ``reply`` the last reply (or reason) for it."""

    def __init__(self, address: str, state: str = "deferred", attempts: int = 0, reply: str = ""):
        super().__init__(address=address, state=OLD_STATES.get(state, state), attempts=attempts, reply=reply)


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
    def deferred(self) -> list[Recipient]:
        """The recipients still to be tried."""
        return [r for r in self.recipients if r.state == "deferred"]

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
