"""Relay replies, classified in one place (as Postfix keeps its smtp_trouble.c).

A reply of the relay, with the stage (the command) it answered, decides everything that follows
from it: what happens to the message, its recipients and its account (`Verdict.action`: a
provider's sending limit pauses the account instead of bouncing the mail, `RULES`), the sysexits code of
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
PAUSE_ACCOUNT = "pause-account"  # the account reached a sending limit: all its mail waits (`Verdict.wait`)
REFUSE_RECIPIENT = "refuse-recipient"  # this recipient never will: bounce it
REFUSE_MESSAGE = "refuse-message"  # nobody will get this message: bounce it
ACTIONS = (DELIVERED, RETRY_MESSAGE, PAUSE_ACCOUNT, REFUSE_RECIPIENT, REFUSE_MESSAGE)
# `Verdict.wait` of a retry that goes at once over a new connection: the relay closes a connection
# after so many messages (Coremail's MI:DMC) or answered 421 at MAIL
RECONNECT = "connection"

# the class of the log status an action is logged with (sent, deferred, bounced)
_CLASS = {DELIVERED: "2", RETRY_MESSAGE: "4", PAUSE_ACCOUNT: "4", REFUSE_RECIPIENT: "5", REFUSE_MESSAGE: "5"}


class Rule(NamedTuple):
    """A provider's reply that means more than its code: `marker` (lower case) in the reply text,
    optionally only with basic `codes`; the action, what the account waits for (budgets.WAITS or
    RECONNECT) and the hint."""

    marker: str
    action: str
    wait: str | None
    hint: str | None = None
    codes: tuple[int, ...] = ()


_LIMIT_HINT = _("the provider limits how much one account sends; the queue keeps the mail and sends it when "
                "the limit resets (mailq shows when)")
_CONNECTION_HINT = _("the relay closes a connection after so many messages; the next ones go over a new connection")
# The replies of each provider family (`providers.Preset.family`) that say a limit was reached, or
# that a refusal is about the content, not the address. Sources:
# - Coremail (163, 126, yeah): NetEase's bounce code table, as reproduced at
#   https://biecuoliao.com/pa/MBRrwEM.html ("退信代码说明": 421 HL:ICC too many concurrent connections
#   from the address, HL:IFC too much mail in a short time, 450/451 MI:DMC too many messages on
#   one connection, RP:DRC too many recipients on one connection, 451 MI:SFQ the sender's count in
#   15 minutes, 451 DT:SPM content looks like spam, try again); 554 DT:SPM, 554 MI:SFQ and
#   550 MI:STC (the sender's count for the day) as 163 answers them (linux-pci list, 12 June 2025;
#   ../shared/notes/providers.md).
# - QQ: https://exmail.qq.com via http://ydadm.com/news_in/335 — "550 Ip/Sender frequency limited":
#   over a per-minute, per-hour or per-day limit that Tencent does not publish; the shim waits an hour.
# - Gmail: https://support.google.com/a/answer/166852 (limits per rolling 24 hours) and
#   https://support.google.com/a/answer/3726730 (550 5.4.5 daily sending limit, 421/454 4.7.0 try
#   again later).
# - Microsoft: https://learn.microsoft.com/en-us/exchange/troubleshoot/send-emails/smtp-submission-improvements
#   (432 4.3.2 concurrent connections; 554 5.2.0 SubmissionQuotaExceededException over the
#   recipient rate limit of 10,000 a day; 30 messages a minute).
RULES = {
    "coremail": (
        Rule("mi:dmc", RETRY_MESSAGE, RECONNECT, _CONNECTION_HINT),
        Rule("rp:drc", RETRY_MESSAGE, RECONNECT, _CONNECTION_HINT),
        Rule("mi:sfq", PAUSE_ACCOUNT, "quarter", _LIMIT_HINT),
        Rule("mi:stc", PAUSE_ACCOUNT, "day", _LIMIT_HINT),
        Rule("hl:icc", PAUSE_ACCOUNT, "quarter", _("163 blocks an address that opens too many connections at once; "
                                                  "keep SENDMAIL_SHIM_QUEUE_CONNECTIONS=1")),
        Rule("hl:ifc", PAUSE_ACCOUNT, "hour", _LIMIT_HINT),
        Rule("dt:spm", REFUSE_MESSAGE, None, _("163 judged the content to be spam: change the subject or body "
                                               "(links, attachments, wording) before sending it again"), (554,)),
    ),
    "qq": (Rule("frequency limited", PAUSE_ACCOUNT, "hour", _LIMIT_HINT),),
    "gmail": (
        Rule("5.4.5", PAUSE_ACCOUNT, "day", _LIMIT_HINT),
        Rule("4.7.0", PAUSE_ACCOUNT, "minute", _LIMIT_HINT, (421, 454)),
    ),
    "microsoft": (
        Rule("submissionquotaexceeded", PAUSE_ACCOUNT, "day", _LIMIT_HINT),
        Rule("4.3.2", PAUSE_ACCOUNT, "minute", _("Exchange Online allows 3 connections per mailbox at once; keep "
                                                  "SENDMAIL_SHIM_QUEUE_CONNECTIONS at 3 or less")),
    ),
}


class Verdict(NamedTuple):
    action: str  # one of ACTIONS
    exit_code: int  # sysexits code for a caller who waits (-odi, direct mode)
    permanent: bool  # retrying the same thing will not help: a 5xx reply that is no sending limit
    dsn: str  # RFC 3463 status of the log line, its class the action's (a 5xx login refusal defers: 4.7.8)
    hint: str | None  # one line saying how to fix it, from the provider's family when it has one
    wait: str | None = None  # PAUSE_ACCOUNT: the limit reached (budgets.WAITS); RECONNECT: retry at once


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
    rule = _rule(provider, stage, code, reply) if action != DELIVERED else None
    if rule:
        action = rule.action
    paused = action == PAUSE_ACCOUNT
    return Verdict(
        action=action,
        exit_code=EX_OK if action == DELIVERED else EX_TEMPFAIL if paused else _exit_code(stage, code),
        permanent=code >= 500 and not (rule and rule.action in (PAUSE_ACCOUNT, RETRY_MESSAGE)),
        dsn=_CLASS[action] + (reply_status(f"{code} {reply}") or "0.0.0")[1:],
        hint=None if action == DELIVERED else rule.hint if rule and rule.hint else _hint(provider, stage, code, reply),
        wait=rule.wait if rule else None,
    )


def _action(stage: str, code: int) -> str:
    if stage == "dot" and 200 <= code < 300:
        return DELIVERED
    if 500 <= code < 600 and stage in TRANSACTION:
        return REFUSE_RECIPIENT if stage == "rcpt" else REFUSE_MESSAGE
    return RETRY_MESSAGE


def _rule(provider: str | None, stage: str, code: int, reply: str) -> Rule | None:
    """The provider's rule for a failure reply; for any relay, a 421 to MAIL closes a connection
    that may have carried its share: the message goes again over a new one."""
    text = reply.lower()
    family = providers.PRESETS[provider].family if provider in providers.PRESETS else None
    for rule in RULES.get(family, ()):
        if rule.marker in text and (not rule.codes or code in rule.codes):
            return rule
    if stage == "mail" and code == 421:
        return Rule("", RETRY_MESSAGE, RECONNECT)
    return None


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
    if family == "microsoft" and code == 535:
        return _("Microsoft is switching password logins off: set SMTP_AUTH=xoauth2 and run sendmail-shim "
                 "--oauth2-login (or SMTP_OAUTH2_FLOW=client_credentials for an app-only login)")
    if family == "gmail" and code == 535:
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
