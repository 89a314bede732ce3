"""The SMTP envelope of one message, as the front end decided it and the queue stores it."""

from dataclasses import asdict, dataclass


@dataclass
class Envelope:
    sender: str  # MAIL FROM: always the login (or SMTP_FROM for a relay without AUTH)
    recipients: list[str]  # RCPT TO, de-duplicated, aliases resolved
    requested_sender: str | None = None  # what -f/-r or From: asked for; logged, never used
    eight_bit: bool = False  # a byte >= 0x80 anywhere in the message → BODY=8BITMIME
    smtputf8: bool = False  # a non-ASCII address → SMTPUTF8
    message_id: str | None = None
    dsn_notify: str | None = None  # -N never,failure,delay,success
    dsn_ret: str | None = None  # -R hdrs|full
    envid: str | None = None  # -V
    size: int = 0  # bytes of the CRLF-normalised message

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Envelope":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)
