"""Exception hierarchy; each class carries the sysexits code the CLI exits with.

Raise where the fact is known; `cli.main` is the one place that prints the error and picks the
exit status (``exc.exit_code``).
"""

from .i18n import _

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOUSER = 67
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_PROTOCOL = 76
EX_NOPERM = 77
EX_CONFIG = 78


class ShimError(Exception):
    """An error the user should see as one line; ``hint`` says how to fix it."""

    exit_code = EX_SOFTWARE
    # RFC 3463 status of a delivery that failed this way without an SMTP reply, for the log's
    # dsn= (its class follows the log status: see log.dsn_for)
    dsn = "4.0.0"

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text} ({self.hint})" if self.hint else text


class UsageError(ShimError):
    exit_code = EX_USAGE


class DataError(ShimError):
    exit_code = EX_DATAERR
    dsn = "5.6.0"


class Rejected(DataError):
    """A well-formed maildrop request that the header policy refuses at pickup (see pickup.py)."""


class CantCreate(ShimError):
    """The queue or a temporary file cannot be written."""

    exit_code = EX_CANTCREAT
    dsn = "4.3.0"


class ConfigError(ShimError):
    exit_code = EX_CONFIG
    dsn = "4.3.5"


class PolicyError(ShimError):
    """Sender policy or authentication refused the message."""

    exit_code = EX_NOPERM
    dsn = "5.7.0"


class Unavailable(ShimError):
    """Permanent failure: retrying will not help."""

    exit_code = EX_UNAVAILABLE
    dsn = "5.7.0"


class TempFail(ShimError):
    """Temporary failure: the same message may succeed later."""

    exit_code = EX_TEMPFAIL
    dsn = "4.4.2"


class ProtocolError(ShimError):
    """The server broke the protocol (unexpected reply, TLS failure mid-dialogue)."""

    exit_code = EX_PROTOCOL
    dsn = "4.5.0"


class SMTPFailure(ShimError):
    """The relay answered a command with a failure reply.

    ``stage`` is the command that failed (one of `replies.STAGES`); ``verdict`` is
    `replies.classify`'s reading of the reply (with the rules of the relay's `provider`), and the
    exit code is the verdict's.
    """

    def __init__(self, code: int, reply: str, stage: str, hint: str | None = None, provider: str | None = None):
        from .replies import classify

        super().__init__(
            _("{stage} refused: {reply}").format(stage=stage.upper(), reply=f"{code} {reply}".rstrip()), hint)
        self.code = code
        self.reply = reply
        self.stage = stage
        self.verdict = classify(stage, code, None, reply, provider)
        self.exit_code = self.verdict.exit_code

    @property
    def permanent(self) -> bool:
        return self.verdict.permanent


def for_exit_code(code: int, message: str) -> ShimError:
    """The error a sysexits `code` stands for (a refusal reported by the submission service)."""
    for kind in (UsageError, DataError, CantCreate, ConfigError, PolicyError, Unavailable, TempFail, ProtocolError):
        if kind.exit_code == code:
            return kind(message)
    return TempFail(message)

