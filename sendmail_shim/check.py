"""`--check`: prove the configuration works, step by step, without sending anything.

Prints the resolved configuration (no secrets), a redacted SMTP transcript, what TLS and AUTH
gave, whether the relay accepts the login as sender (then RSET), and one verdict line. With
``--to ADDR`` it also sends a test message.
"""

import io
import socket

from . import credentials, message
from .errors import EX_OK, ShimError
from .smtp import Relay


def run(config, out, environ, *, to: str | None = None, verbose: int = 0) -> int:
    say = lambda text="": print(text, file=out, flush=True)  # noqa: E731
    say("configuration:")
    for key, value in config.redacted().items():
        say(f"  {key} = {value}")
    say(f"\nconnecting to {config.host}:{config.port} ({config.security}) …")
    relay = Relay(config, lambda: credentials.get_password(config, environ),
                  transcript=lambda line: say(f"  {line}"), warn=lambda text: say(f"warning: {text}"))
    try:
        with relay:
            _describe(relay, say)
            say(f"sender check: {relay.verify_sender()}")
            if to:
                result = relay.send(*_test_message(config, to))
                say(f"test message to {to}: {result.reply}")
    except ShimError as exc:
        say(f"\nverdict: FAILED — {exc}")
        return exc.exit_code
    sent = f", test message sent to {to}" if to else ""
    say(f"\nverdict: OK — {config.host}:{config.port} accepts {config.sender} as sender{sent}")
    return EX_OK


def _describe(relay, say) -> None:
    if relay.tls_version:
        how = "pinned fingerprint" if relay.config.tls_fingerprint else (
            "verified" if relay.verified else "NOT verified (SMTP_TLS_VERIFY=no)")
        say(f"TLS: {relay.tls_version} {relay.cipher}; certificate {relay.peer_subject} — {how}")
        say(f"certificate SHA-256 fingerprint: {relay.peer_fingerprint}")
    else:
        say("TLS: none (SMTP_SECURITY=none)")
    say("EHLO " + relay.helo_name + ": " + ", ".join(
        f"{k.upper()} {v}".strip() for k, v in relay.features.items()))
    say(f"AUTH: {relay.auth_mechanism} accepted" if relay.auth_mechanism else "AUTH: not used (no SMTP_USER)")


def _test_message(config, to: str):
    head = (
        f"From: sendmail-shim <{config.sender}>\r\nTo: {to}\r\n"
        f"Subject: sendmail-shim test from {socket.gethostname()}\r\n\r\n"
    ).encode()
    body = b"This message was sent by sendmail-shim --check.\r\n"
    headers, envelope = message.prepare(
        head, extract_recipients=True, argv_recipients=[], requested_sender=None,
        policy=message.HeaderPolicy(sender=config.sender, aliases=config.aliases),
    )
    data = headers + body
    envelope.size = len(data)
    return envelope, io.BytesIO(data)
