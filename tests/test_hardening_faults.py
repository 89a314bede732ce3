"""The fault matrix: every stage of the relay dialogue × every kind of fault × every delivery mode,
through the real console script. "Nothing lost, nothing sent twice" is checked per case: after the
fault, the faults are cleared and the queue is run; each message is then at the relay exactly once
(twice only in the documented ambiguous case), in failed/ with the reply, or its caller was told
with a non-zero exit status.
"""

import json
import uuid
from dataclasses import dataclass

import pytest

from sendmail_shim import credstore
from sendmail_shim.errors import (
    EX_NOPERM, EX_NOUSER, EX_OK, EX_PROTOCOL, EX_TEMPFAIL, EX_UNAVAILABLE,
)
from tests.faults import COUNTS, wait_idle

pytestmark = pytest.mark.e2e

MODES = ("interactive", "background", "queue", "direct")
GOOD, BAD = "bob@example.org", "bad@example.org"
REQUESTED = "www@example.org"  # -f: the failure reports go there


@dataclass(frozen=True)
class Fault:
    stage: str
    # refused | unanswered | tls-drop | tls-hang | plaintext | expired | omitted | hang | drop | reply | partial
    kind: str
    reply: str = ""
    exit: int = EX_TEMPFAIL  # direct mode's exit status (and -odi's, for a refused message)
    text: str = ""  # in the stderr line
    outcome: str = "kept"  # in the queue: kept (retried) | bounced (failed/ + report) | partial
    logged: str = "deferred"  # log status of the attempt in the queue modes (ambiguous: deferred, may come twice)
    stored: bool = False  # the relay took the message although the client heard no 250

    @property
    def id(self) -> str:
        return f"{self.stage}-{self.reply[:3] if self.kind == 'reply' else self.kind}"

    @property
    def direct_status(self) -> str:
        """Log status in direct mode: bounced for a 5xx reply, else deferred."""
        return "bounced" if self.reply[:1] == "5" else "deferred"


FAULTS = [
    Fault("connect", "refused", text="connection refused"),
    Fault("connect", "unanswered", text="timed out"),
    Fault("tls", "tls-drop", exit=EX_PROTOCOL, text="TLS with"),
    Fault("tls", "tls-hang", text="(at TLS)"),
    Fault("tls", "plaintext", exit=EX_PROTOCOL, text="WRONG_VERSION_NUMBER"),
    Fault("tls", "expired", exit=EX_UNAVAILABLE, text="certificate has expired"),
    Fault("greeting", "hang", text="(at GREETING)"),
    Fault("greeting", "drop", text="closed the connection (at GREETING)"),
    Fault("greeting", "reply", "421 4.3.2 service not available", text="CONNECT refused: 421"),
    Fault("greeting", "reply", "554 5.7.1 no service for you", exit=EX_UNAVAILABLE, text="CONNECT refused: 554"),
    Fault("ehlo", "hang", text="(at EHLO)"),
    Fault("ehlo", "drop", text="closed the connection (at EHLO)"),
    Fault("ehlo", "reply", "421 4.3.2 shutting down", text="EHLO refused: 421"),
    Fault("ehlo", "reply", "554 5.5.1 not you", exit=EX_UNAVAILABLE, text="EHLO refused: 554"),
    Fault("starttls", "omitted", exit=EX_UNAVAILABLE, text="does not offer STARTTLS"),
    Fault("starttls", "reply", "454 4.7.0 TLS not available", text="STARTTLS refused: 454"),
    Fault("starttls", "hang", text="(at STARTTLS)"),
    Fault("starttls", "drop", text="closed the connection (at STARTTLS)"),
    Fault("auth", "reply", "454 4.7.0 temporary authentication failure", text="AUTH refused: 454"),
    Fault("auth", "reply", "535 5.7.8 authentication failed", exit=EX_NOPERM, text="AUTH refused: 535"),
    Fault("auth", "hang", text="(at AUTH)"),
    Fault("auth", "drop", text="closed the connection (at AUTH)"),
    Fault("mail", "reply", "421 4.4.2 closing", text="MAIL refused: 421"),
    Fault("mail", "reply", "451 4.3.0 try later", text="MAIL refused: 451"),
    Fault("mail", "reply", "550 5.7.1 sender blocked", exit=EX_UNAVAILABLE, text="MAIL refused: 550",
          outcome="bounced", logged="bounced"),
    Fault("mail", "reply", "553 Mail from must equal authorized user", exit=EX_NOPERM, text="MAIL refused: 553",
          outcome="bounced", logged="bounced"),
    Fault("mail", "hang", text="(at MAIL)"),
    Fault("mail", "drop", text="closed the connection (at MAIL)"),
    Fault("rcpt", "reply", "452 4.5.3 too many recipients", text="RCPT refused: 452"),
    Fault("rcpt", "reply", "550 5.1.1 no such user", exit=EX_NOUSER, text="RCPT refused: 550",
          outcome="bounced", logged="bounced"),
    Fault("rcpt", "partial", "550 5.1.1 no such user", exit=EX_NOUSER, text="RCPT refused: 550",
          outcome="partial", logged="bounced"),
    Fault("rcpt", "hang", text="(at RCPT)"),
    Fault("rcpt", "drop", text="closed the connection (at RCPT)"),
    Fault("data", "reply", "451 4.3.0 local error", text="DATA refused: 451"),
    Fault("data", "reply", "554 5.7.1 no data", exit=EX_UNAVAILABLE, text="DATA refused: 554",
          outcome="bounced", logged="bounced"),
    Fault("data", "hang", text="(at DATA)"),
    Fault("data", "drop", text="closed the connection (at DATA)"),
    Fault("dot", "reply", "451 4.7.1 greylisted", text="DOT refused: 451"),
    Fault("dot", "reply", "552 5.3.4 message too big", exit=EX_UNAVAILABLE, text="DOT refused: 552",
          outcome="bounced", logged="bounced"),
    Fault("dot", "reply", "554 5.7.1 spam", exit=EX_UNAVAILABLE, text="DOT refused: 554",
          outcome="bounced", logged="bounced"),
    Fault("dot", "hang", text="twice", logged="ambiguous"),
    Fault("dot", "drop", text="twice", logged="ambiguous"),
    Fault("accepted", "hang", text="twice", logged="ambiguous", stored=True),
    Fault("accepted", "drop", text="twice", logged="ambiguous", stored=True),
]


def message(message_id: str) -> bytes:
    return (f"From: Web <{REQUESTED}>\nTo: Bob <{GOOD}>\nSubject: fault matrix\n"
            f"Message-ID: {message_id}\n\nbody line\n.leading dot\n").encode()


def copies(relay, message_id: str) -> int:
    """Messages at the relay with this Message-ID (in their own header, not a report's)."""
    field = f"\r\nMessage-ID: {message_id}\r\n".encode()
    return sum(field in b"\r\n" + m.data.split(b"\r\n\r\n", 1)[0] + b"\r\n" for m in relay.messages)


def queue_ids(shim, state: str) -> list[str]:
    directory = shim.queue_dir / state
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def log_status(shim, msg_id: str, status: str) -> bool:
    """Whether an smtp line of the message has this status; "ambiguous" is Postfix's deferred with
    "-- message may be sent more than once"."""
    wanted = "deferred" if status == "ambiguous" else status
    return any(line.split(": ", 1)[-1].startswith(f"{msg_id}: to=<") and f", status={wanted} (" in line
               and (status != "ambiguous" or line.endswith(" -- message may be sent more than once)"))
               for line in shim.log_lines())


class Setup:
    """The case's relays: `good` (where the knobs are set, and where recovery delivers) and the
    port the shim is pointed at during the fault."""

    def __init__(self, fault: Fault, relay_factory, raw_fault):
        security = "starttls" if fault.stage == "starttls" else "tls"
        self.good = relay_factory(security=security)
        self.port = self.good.port
        if fault.kind in ("refused", "unanswered", "tls-drop", "tls-hang", "plaintext"):
            self.port = raw_fault(fault.kind)
        elif fault.kind == "expired":
            self.port = relay_factory(security=security, cert="expired").port
        elif fault.kind == "omitted":
            self.port = relay_factory(security=security, offer_starttls=False).port
        elif fault.kind == "partial":
            self.good.refuse[BAD] = fault.reply
        elif fault.kind == "hang":
            self.good.hang_at.add(fault.stage)
        elif fault.kind == "drop":
            self.good.close_at.add(fault.stage)
        else:
            self.good.reply_at[fault.stage] = fault.reply

    def heal(self) -> None:
        self.good.refuse.clear()
        self.good.hang_at.clear()
        self.good.close_at.clear()
        self.good.reply_at.clear()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.id)
def test_fault(fault, mode, relay_factory, raw_fault, shim_factory, relay_password):
    setup = Setup(fault, relay_factory, raw_fault)
    relay = setup.good
    shim = shim_factory(relay, password=None, SMTP_PORT=str(setup.port), SMTP_TIMEOUT="0.5",
                        SMTP_CONNECT_TIMEOUT="0.5",
                        SENDMAIL_SHIM_DELIVERY="direct" if mode == "direct" else "interactive")
    credstore.Store(str(shim.credentials_file)).set("sendmail-shim", relay.login, relay_password)
    message_id = f"<{uuid.uuid4().hex}@fault.test>"
    recipients = [BAD, GOOD] if fault.kind == "partial" else [GOOD]
    flag = {"interactive": "-odi", "background": "-odb", "queue": "-odq", "direct": "-oi"}[mode]
    result = shim.run(flag, "-i", f"-f{REQUESTED}", *recipients, stdin=message(message_id), expect_exit=None)
    lines = result.stderr.splitlines()

    if mode == "direct":
        assert result.exit_code == fault.exit, result.stderr
        assert any(fault.text in line for line in lines) and all(ln.startswith("sendmail-shim: ") for ln in lines)
        assert queue_ids(shim, "queue") == [] and queue_ids(shim, "failed") == []
        assert any(f", status={fault.direct_status} (" in line for line in shim.log_lines())
        expected_copies = 1 if fault.stored else 0  # direct mode: all recipients or nobody
        assert copies(relay, message_id) == expected_copies
        COUNTS["fault cases"] += 1
        return

    if mode == "background":
        wait_idle(shim.config_file)  # the background pickup writes the first log line
    picked_up = [line for line in shim.log_lines() if "/pickup[" in line]  # a report may follow
    msg_id = picked_up[0].split("]: ", 1)[1].split(":")[0]
    if mode == "interactive" and fault.kind != "partial":  # a partial refusal is reported by mail
        refused = fault.outcome != "kept"
        assert result.exit_code == (fault.exit if refused else EX_OK)
        assert len(lines) == 1 and lines[0].startswith("sendmail-shim: ")
        if not refused:
            assert lines[0].startswith(f"sendmail-shim: {msg_id} queued for retry: ") and fault.text in lines[0]
            assert queue_ids(shim, "queue") == [msg_id]
        else:
            assert f"refused: {fault.reply}" in lines[0]
            assert queue_ids(shim, "queue") == [] and queue_ids(shim, "failed") == []  # the caller was told
            assert log_status(shim, msg_id, "bounced")
    else:
        assert (result.exit_code, result.stderr) == (EX_OK, "")
        if mode == "queue":
            assert queue_ids(shim, "queue") == [msg_id] and copies(relay, message_id) == 0
            shim.run("-q")
        assert log_status(shim, msg_id, fault.logged)
        if fault.outcome == "kept":
            assert queue_ids(shim, "queue") == [msg_id] and queue_ids(shim, "failed") == []
        else:
            failed = json.loads((shim.queue_dir / "failed" / msg_id / "envelope.json").read_text())
            assert msg_id not in queue_ids(shim, "queue")
            assert fault.reply in failed["failure"] + str(failed["recipients"])
            assert any(f"]: {msg_id}: sender non-delivery notification: " in line for line in shim.log_lines())

    if fault.stage in ("tls", "greeting", "ehlo", "starttls"):
        assert not any(command.upper().startswith("AUTH") for command in relay.commands)
    # the relay is healthy again: a queue run for this message (due or not) delivers it, once
    setup.heal()
    if queue_ids(shim, "queue"):
        shim.write_config({**shim.settings, "SMTP_PORT": str(relay.port)})
        shim.run(f"-qI{msg_id}")
        assert queue_ids(shim, "queue") == []
    expected_copies = {"kept": 1 + fault.stored, "bounced": 0, "partial": 1}[fault.outcome]
    assert copies(relay, message_id) == expected_copies
    if fault.stored:
        assert log_status(shim, msg_id, "ambiguous") and log_status(shim, msg_id, "sent")
    COUNTS["fault cases"] += 1
