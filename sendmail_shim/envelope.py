"""The SMTP envelope of one message, as the front end decided it and the queue stores it."""

from typing import NamedTuple

from .i18n import _

NO_RECIPIENTS = _("no recipients: give them as arguments or use -t with To/Cc/Bcc headers")


class Envelope(NamedTuple):
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
    # recipient → the local name the caller gave for it (root, www-data@localhost), for those the
    # alias map or SMTP_LOCAL_MAIL=login resolved (the smtp log line's orig_to=, as Postfix's);
    # filled by message.prepare, None when there is none
    orig_to: dict[str, str] | None = None
    # [local name, recipient, rule] for each local name resolved, the rule in the words of the
    # cleanup log line (log.local_line): "alias root", "alias default", "no alias; SMTP_LOCAL_MAIL=login"
    local_names: list[list[str]] | None = None
    account: str | None = None  # the account that carries it (accounts.py); None: the default one
    moved_from: str | None = None  # the account its From: was written for, when a fallback took it over

    def to_dict(self) -> dict:
        return self._asdict()

    @classmethod
    def from_dict(cls, data: dict) -> "Envelope":
        return cls(**{k: data[k] for k in cls._fields if k in data})


# DSN parameters (RFC 3461), validated the same way for -N/-R/-V and for a maildrop trailer.
_NOTIFY = {"never", "success", "failure", "delay"}


def dsn_notify(value: str) -> str | None:
    """``failure,delay`` → ``DELAY,FAILURE``; None when it is not a valid NOTIFY list."""
    words = {w.strip().lower() for w in value.split(",")}
    if not words <= _NOTIFY or ("never" in words and len(words) > 1):
        return None
    return ",".join(sorted(words)).upper()


def dsn_ret(value: str) -> str | None:
    return value.upper() if value.lower() in ("hdrs", "full") else None


def envid(value: str) -> str | None:
    """Printable ASCII without space, '+' or '=' (xtext-safe), at most 100 characters."""
    ok = value and value.isascii() and value.isprintable() and len(value) <= 100
    return value if ok and not any(c in value for c in " +=") else None
