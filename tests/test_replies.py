"""replies.classify: one reading of a relay's reply, for every stage of the dialogue."""

import pytest

from sendmail_shim import replies
from sendmail_shim.errors import (
    EX_NOPERM, EX_NOUSER, EX_OK, EX_PROTOCOL, EX_TEMPFAIL, EX_UNAVAILABLE,
    ConfigError, DataError, PolicyError, ShimError, SMTPFailure, TempFail, Unavailable, UsageError,
)

RETRY, REFUSE_RCPT, REFUSE_MSG = "retry-message", "refuse-recipient", "refuse-message"

# (stage, code, enhanced, text) → (action, exit code, permanent, dsn)
TABLE = [
    # before the transaction: the connection or the account, never the message: it stays queued
    ("connect", 554, "5.7.1", "no service for you", RETRY, EX_UNAVAILABLE, True, "4.7.1"),
    ("connect", 421, "4.3.2", "busy", RETRY, EX_TEMPFAIL, False, "4.3.2"),
    ("greeting", 421, None, "Service not available", RETRY, EX_TEMPFAIL, False, "4.0.0"),
    ("tls", 554, None, "TLS refused", RETRY, EX_UNAVAILABLE, True, "4.0.0"),
    ("ehlo", 502, "5.5.2", "Command not recognized", RETRY, EX_UNAVAILABLE, True, "4.5.2"),
    ("starttls", 454, "4.7.0", "TLS not available", RETRY, EX_TEMPFAIL, False, "4.7.0"),
    ("auth", 535, "5.7.8", "Authentication failed", RETRY, EX_NOPERM, True, "4.7.8"),
    ("auth", 454, "4.7.0", "Temporary authentication failure", RETRY, EX_TEMPFAIL, False, "4.7.0"),
    ("auth", 334, None, "VXNlcm5hbWU6", RETRY, EX_NOPERM, False, "4.0.0"),
    # MAIL
    ("mail", 421, "4.7.0", "Too many connections", RETRY, EX_TEMPFAIL, False, "4.7.0"),
    ("mail", 553, "5.7.1", "Sender address rejected: not owned by user", REFUSE_MSG, EX_NOPERM, True, "5.7.1"),
    ("mail", 530, "5.7.0", "Authentication required", REFUSE_MSG, EX_NOPERM, True, "5.7.0"),
    ("mail", 554, None, "Transaction failed", REFUSE_MSG, EX_NOPERM, True, "5.0.0"),
    ("mail", 550, "5.7.1", "Sending quota exceeded", REFUSE_MSG, EX_UNAVAILABLE, True, "5.7.1"),
    ("mail", 552, "5.3.4", "Message size exceeds fixed limit", REFUSE_MSG, EX_UNAVAILABLE, True, "5.3.4"),
    ("mail", 354, None, "go ahead", RETRY, EX_PROTOCOL, False, "4.0.0"),  # not a reply to MAIL
    # RCPT
    ("rcpt", 550, "5.1.1", "User unknown", REFUSE_RCPT, EX_NOUSER, True, "5.1.1"),
    ("rcpt", 550, None, "5.1.1 User unknown", REFUSE_RCPT, EX_NOUSER, True, "5.1.1"),  # read from the text
    ("rcpt", 550, "4.1.1", "class mismatch", REFUSE_RCPT, EX_NOUSER, True, "5.0.0"),
    ("rcpt", 450, "4.2.0", "Greylisted", RETRY, EX_TEMPFAIL, False, "4.2.0"),
    # DATA and the final reply
    ("data", 552, "5.3.4", "Message too big", REFUSE_MSG, EX_UNAVAILABLE, True, "5.3.4"),
    ("data", 554, "5.5.1", "No valid recipients", REFUSE_MSG, EX_UNAVAILABLE, True, "5.5.1"),
    ("data", 451, None, "Try later", RETRY, EX_TEMPFAIL, False, "4.0.0"),
    ("data", 250, None, "Ok", RETRY, EX_PROTOCOL, False, "4.0.0"),  # 354 was due
    ("dot", 250, "2.0.0", "Ok: queued as 4ABC", "delivered", EX_OK, False, "2.0.0"),
    ("dot", 552, "5.3.4", "Message too big", REFUSE_MSG, EX_UNAVAILABLE, True, "5.3.4"),
    ("dot", 451, "4.3.0", "Error: queue file write error", RETRY, EX_TEMPFAIL, False, "4.3.0"),
    ("dot", 600, None, "what", RETRY, EX_PROTOCOL, True, "4.0.0"),
    # RSET between two messages
    ("rset", 421, None, "closing", RETRY, EX_TEMPFAIL, False, "4.0.0"),
    ("rset", 500, "5.5.1", "RSET?", RETRY, EX_UNAVAILABLE, True, "4.5.1"),
]


@pytest.mark.parametrize("stage, code, enhanced, text, action, exit_code, permanent, dsn", TABLE, ids=lambda v: str(v))
def test_classify(stage, code, enhanced, text, action, exit_code, permanent, dsn):
    verdict = replies.classify(stage, code, enhanced, text)
    assert (verdict.action, verdict.exit_code, verdict.permanent, verdict.dsn) == (action, exit_code, permanent, dsn)
    assert verdict.action in replies.ACTIONS


def test_the_table_covers_every_stage_and_class():
    assert {row[0] for row in TABLE} == set(replies.STAGES)
    assert {row[1] // 100 for row in TABLE} >= {2, 3, 4, 5}
    assert set(replies.TRANSACTION) < set(replies.STAGES)


@pytest.mark.parametrize("stage, code, enhanced, text", [row[:4] for row in TABLE if row[4] != "delivered"],
                         ids=lambda v: str(v))
def test_an_smtp_failure_exits_as_classified(stage, code, enhanced, text):
    reply = f"{enhanced} {text}" if enhanced else text
    failure = SMTPFailure(code, reply, stage)
    verdict = replies.classify(stage, code, enhanced, text)
    assert (failure.exit_code, failure.permanent, failure.verdict) == (verdict.exit_code, verdict.permanent, verdict)


@pytest.mark.parametrize("provider, stage, code, text, expected", [
    ("163", "auth", 535, "Error: authentication failed", "授权码"),
    ("gmail", "auth", 535, "5.7.8 Username and Password not accepted", "app password"),
    (None, "auth", 535, "authentication failed", "wrong login or password"),
    (None, "mail", 553, "Mail from must equal authorized user", "SMTP_USER"),
    (None, "data", 552, "too big", "larger"),
    (None, "rcpt", 550, "User unknown", None),
    ("163", "dot", 250, "Mail OK", None),
])
def test_hint(provider, stage, code, text, expected):
    hint = replies.classify(stage, code, None, text, provider).hint
    assert hint is None if expected is None else expected in hint


def test_an_unknown_stage_is_a_bug():
    with pytest.raises(ValueError):
        replies.classify("quit", 221)


@pytest.mark.parametrize("stage, code, text, authenticated, expected", [
    ("mail", 530, "5.7.0 Must issue a STARTTLS command first", False, "tls"),
    ("mail", 530, "5.7.0 Authentication required", False, "auth"),
    ("mail", 530, "5.7.0 Authentication required", True, None),
    ("rcpt", 530, "5.7.0 Authentication required", False, None),
    ("mail", 550, "no", False, None),
])
def test_missing_setup(stage, code, text, authenticated, expected):
    assert replies.missing_setup(stage, code, text, authenticated) == expected


@pytest.mark.parametrize("error, expected", [
    (SMTPFailure(550, "5.1.1 User unknown\r\nbad", "rcpt"), "550 5.1.1 User unknown bad"),
    (SMTPFailure(421, "4.7.0 Too many connections", "mail"), "421 4.7.0 Too many connections"),
    (SMTPFailure(354, "go ahead", "mail"), "451 4.3.0 MAIL refused: 354 go ahead"),
    (TempFail("queue busy"), "451 4.3.0 queue busy"),
    (ConfigError("no host"), "451 4.3.0 no host"),
    (PolicyError("not yours"), "550 5.7.1 not yours"),
    (DataError("no recipients"), "554 5.6.0 no recipients"),
    (UsageError("bad option"), "554 5.6.0 bad option"),
    (Unavailable("never"), "451 4.3.0 never"),
    (ShimError("odd"), "451 4.3.0 odd"),
], ids=lambda v: str(v))
def test_smtp_reply_for_bs(error, expected):
    assert replies.smtp_reply(error) == expected
