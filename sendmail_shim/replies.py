"""Relay replies, classified in one place (as Postfix keeps its smtp_trouble.c).

A reply of the relay, with the stage (the command) it answered, decides everything that follows
from it: what happens to the message and its recipients (`Verdict.action`), the sysexits code of
a waiting caller, whether it is permanent, the RFC 3463 status of the log line, the fix to
suggest, and the reply that `-bs` hands on. `classify` is pure: callers (smtp.py, errors.py,
runner.py, submit.py's direct mode, bsmtp.py, log.py) ask it and act.
"""

from typing import NamedTuple

from . import providers
from .i18n import _
from .errors import (
    EX_NOPERM, EX_NOUSER, EX_OK, EX_PROTOCOL, EX_TEMPFAIL, EX_UNAVAILABLE,
    ConfigError, DataError, PolicyError, ShimError, SMTPFailure, TempFail, UsageError,
)

# Every stage of a relay dialogue, in order: the greeting after the TCP connect (``connect`` when
# it is a reply, ``greeting`` while it is awaited), the implicit-TLS handshake, EHLO, STARTTLS,
# AUTH, the transaction, and the RSET between two messages on one connection.
STAGES = ("connect", "tls", "greeting", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "dot", "rset")
# the stages of one message's transaction: a refusal there is about the message or a recipient
# and decides by its codes; a failure before (or at RSET) is about the connection or the account
TRANSACTION = ("mail", "rcpt", "data", "dot")

DELIVERED = "delivered"  # the final reply took the message
RETRY_MESSAGE = "retry-message"  # keep it queued; the next attempt may succeed
REFUSE_RECIPIENT = "refuse-recipient"  # this recipient never will: bounce it
REFUSE_MESSAGE = "refuse-message"  # nobody will get this message: bounce it
# Issue 15 (provider-aware delivery) adds PAUSE_ACCOUNT = "pause-account": a reply that says the
# account, not the message, is the trouble (a refused login, Coremail's "421 HL:ICC", a sending
# quota), so every message of that account waits. It is decided here, in `classify`, from a
# per-provider table keyed by the family of `providers.PRESETS`; today such replies are
# RETRY_MESSAGE (before the transaction) or a refusal (within it).
ACTIONS = (DELIVERED, RETRY_MESSAGE, REFUSE_RECIPIENT, REFUSE_MESSAGE)

# the class of the log status an action is logged with (sent, deferred, bounced)
_CLASS = {DELIVERED: "2", RETRY_MESSAGE: "4", REFUSE_RECIPIENT: "5", REFUSE_MESSAGE: "5"}


class Verdict(NamedTuple):
    action: str  # one of ACTIONS
    exit_code: int  # sysexits code for a caller who waits (-odi, direct mode)
    permanent: bool  # a 5xx (or worse) reply: retrying the same thing will not help
    dsn: str  # RFC 3463 status of the log line, its class the action's (a 5xx login refusal defers: 4.7.8)
    hint: str | None  # one line saying how to fix it, from the provider's family when it has one


def classify(stage: str, code: int, enhanced_status: str | None = None, text: str = "",
             provider: str | None = None) -> Verdict:
    """What the relay's reply `code` `text` at `stage` means.

    `enhanced_status` is the RFC 3463 code the reply starts with ("5.1.1"); None reads it from
    `text` (the reply text after the basic code, as smtplib gives it). A 2xx at ``dot`` (the
    final reply) delivers; every other reply classified here failed its command, including a 2xx
    or 3xx where another was due (a protocol error).
    """
    if stage not in STAGES:
        raise ValueError(f"unknown SMTP stage {stage!r}")
    reply = f"{enhanced_status} {text}".rstrip() if enhanced_status and not text.startswith(enhanced_status) else text
    action = _action(stage, code)
    return Verdict(
        action=action,
        exit_code=EX_OK if action == DELIVERED else _exit_code(stage, code),
        permanent=code >= 500,
        dsn=_CLASS[action] + (reply_status(f"{code} {reply}") or "0.0.0")[1:],
        hint=None if action == DELIVERED else _hint(provider, stage, code, reply),
    )


def _action(stage: str, code: int) -> str:
    if stage == "dot" and 200 <= code < 300:
        return DELIVERED
    if 500 <= code < 600 and stage in TRANSACTION:
        return REFUSE_RECIPIENT if stage == "rcpt" else REFUSE_MESSAGE
    return RETRY_MESSAGE


def _exit_code(stage: str, code: int) -> int:
    """sendmail/msmtp practice for a failure reply."""
    if 400 <= code < 500:
        return EX_TEMPFAIL
    if stage == "auth" or (stage == "mail" and code in (530, 553, 554)):
        return EX_NOPERM
    if stage == "rcpt":
        return EX_NOUSER
    if code < 400 or code >= 600:
        return EX_PROTOCOL
    return EX_UNAVAILABLE


_SENDER_HINT = _(
    "the relay accepts only its login as sender; sendmail-shim always sends as SMTP_USER, so "
    "check that SMTP_USER is the full mailbox address"
)


def _hint(provider: str | None, stage: str, code: int, reply: str) -> str | None:
    """A one-line fix for a failure reply, or None when there is nothing better to say: what
    the provider's family (`providers.PRESETS`) is known to mean by it, else the classic replies."""
    text = reply.lower()
    family = providers.PRESETS[provider].family if provider in providers.PRESETS else None
    if stage == "mail" and code == 553 and "authorized user" in text:
        return _SENDER_HINT
    if stage == "mail" and code == 501 and "authorization user" in text:
        return _SENDER_HINT
    if family == "coremail" and (code == 535 or (code == 550 and "no permission" in text)):
        return _(
            "use the authorization code (授权码), not the web password, and enable "
            "POP3/SMTP in the mailbox's web settings; store it with sendmail-shim --set-password"
        )
    if family == "qq" and code in (535, 550):
        return _(
            "enable SMTP in the QQ mail settings and use the authorization code (授权码) it "
            "generates; store it with sendmail-shim --set-password"
        )
    if family in ("gmail", "microsoft") and code == 535:
        return _("use an app password (2-step verification must be on); store it with sendmail-shim --set-password")
    if stage == "auth" and code == 535:
        return _("wrong login or password; store the right one with sendmail-shim --set-password")
    if stage == "auth" and code == 538:
        return _("the relay wants AUTH only over TLS; set SMTP_SECURITY=tls or starttls")
    if code == 530:
        return _("the relay requires AUTH or TLS first; set SMTP_USER and SMTP_SECURITY")
    if code == 552 and stage in ("mail", "data", "dot"):
        return _("the message is larger than the relay accepts")
    return None


def missing_setup(stage: str, code: int, text: str, authenticated: bool) -> str | None:
    """What a 530 to MAIL without AUTH says the configuration lacks, "tls" or "auth" (a
    ConfigError for smtp.py, not a refusal of the message); None for any other reply."""
    if stage == "mail" and code == 530 and not authenticated:
        return "tls" if "tls" in text.lower() else "auth"
    return None


def reply_status(reply) -> str:
    """The RFC 3463 status an SMTP reply text carries: its enhanced code when it has one of its
    class, else the class of its basic code; "" when the text is no SMTP reply."""
    text = str(reply)
    basic, rest = text[:3], text[3:]
    if not (basic.isascii() and basic.isdigit() and basic[0] in "245" and rest[:1] in ("", " ", "-")):
        return ""
    word = rest.lstrip(" -").split(" ", 1)[0]
    parts = word.split(".")
    if len(parts) == 3 and parts[0] == basic[0] and all(p.isascii() and p.isdigit() and len(p) <= 3 for p in parts[1:]):
        return word
    return f"{basic[0]}.0.0"


def smtp_reply(exc: ShimError) -> str:
    """The SMTP reply `-bs` gives for an error: one that makes the application raise the same
    failure the exit code would (the relay's own reply when it refused)."""
    from .log import one_line

    text = one_line(exc)
    if isinstance(exc, SMTPFailure) and exc.code >= 400:
        return f"{exc.code} {one_line(exc.reply)}"
    if isinstance(exc, (TempFail, ConfigError)):
        return f"451 4.3.0 {text}"
    if isinstance(exc, PolicyError):
        return f"550 5.7.1 {text}"
    if isinstance(exc, (DataError, UsageError)):
        return f"554 5.6.0 {text}"
    return f"451 4.3.0 {text}"
