"""`--check`: prove the configuration works, step by step, without sending anything.

Prints the resolved configuration (no secrets), each value with where it came from (file:line,
environment variable, preset, default), a warning when log lines would go nowhere, a redacted
SMTP transcript, what TLS and AUTH gave, whether the relay accepts the login as sender (then
RSET), and one verdict line. With ``--to ADDR`` it also sends a test message.
"""

import io
import os
import socket
import stat

from . import credentials, message
from .errors import EX_OK, ShimError
from .i18n import _, describe, localize
from .smtp import Relay


def run(config, out, environ, *, to: str | None = None, verbose: int = 0) -> int:
    say = lambda text="": print(localize(text, environ), file=out, flush=True)  # noqa: E731
    config.require_sender()  # nothing configured at all: the error says to run --setup
    say(_("configuration:"))
    for key, value in config.redacted().items():
        origin = config.origins.get(key)
        say(f"  {key} = {value}" + (f"  ({localize(origin, environ)})" if origin else ""))
    say(_("files read: {files}").format(files=", ".join(config.sources) or _("none")))
    nowhere = log_warning(config)
    if nowhere:
        say(_("warning: {text}").format(text=nowhere))
    for line in budget_lines(config):
        say(line)
    say()
    say(_("connecting to {host}:{port} ({security}) …").format(
        host=config.host, port=config.port, security=config.security))
    relay = Relay(config, lambda: credentials.get_password(config, environ),
                  transcript=lambda line: say(f"  {line}"),
                  warn=lambda text: say(_("warning: {text}").format(text=text)))
    try:
        with relay:
            _describe(relay, say)
            if config.auth != "password":
                _describe_token(config, environ, say)
            say(_("sender check: {reply}").format(reply=relay.verify_sender()))
            if to:
                result = relay.send(*_test_message(config, to))
                say(_("test message to {to}: {reply}").format(to=to, reply=result.reply))
    except ShimError as exc:
        say()
        say(_("verdict: FAILED — {error}").format(error=describe(exc, environ)))
        return exc.exit_code
    say()
    if to:
        say(_("verdict: OK — {host}:{port} accepts {sender} as sender, test message sent to {to}").format(
            host=config.host, port=config.port, sender=config.sender, to=to))
    else:
        say(_("verdict: OK — {host}:{port} accepts {sender} as sender").format(
            host=config.host, port=config.port, sender=config.sender))
    return EX_OK


def budget_lines(config) -> list[str]:
    """What the account sent within its budget's window, and its pause (ledger.py)."""
    from . import clock
    from . import ledger
    from .log import ctime

    state = ledger.for_account(config).read(clock.now())
    lines = []
    if config.budget.window:
        recipients = sum(s.recipients for s in state.sent)
        lines.append(_("sent within the sending budget's window: {messages} message(s) to {recipients} "
                       "recipient(s)").format(messages=len(state.sent), recipients=recipients))
    if state.pause:
        lines.append(_("account {login} paused until {until}: {reason}").format(
            login=config.sender, until=ctime(state.pause.until), reason=state.pause.reason))
    return lines


def log_warning(config, dev_log: str = "/dev/log"):
    """Why the log lines of deliveries would go nowhere, or None: no log file, and syslog off or
    without its socket (a container, a chroot)."""
    if config.log_file:
        return None
    if not config.syslog:
        return _("log lines go nowhere: SENDMAIL_SHIM_SYSLOG=no and no SENDMAIL_SHIM_LOG_FILE")
    try:
        listening = stat.S_ISSOCK(os.stat(dev_log).st_mode)
    except OSError:
        listening = False
    if not listening:
        return _("log lines go nowhere: syslog has no {socket} socket here and SENDMAIL_SHIM_LOG_FILE "
                 "is not set").format(socket=dev_log)
    return None


def _describe(relay, say) -> None:
    if relay.tls_version:
        how = _("pinned fingerprint") if relay.config.tls_fingerprint else (
            _("verified") if relay.verified else _("NOT verified (SMTP_TLS_VERIFY=no)"))
        say(_("TLS: {version} {cipher}; certificate {subject} — {how}").format(
            version=relay.tls_version, cipher=relay.cipher, subject=relay.peer_subject, how=how))
        say(_("certificate SHA-256 fingerprint: {fingerprint}").format(fingerprint=relay.peer_fingerprint))
    else:
        say(_("TLS: none (SMTP_SECURITY=none)"))
    say("EHLO " + relay.helo_name + ": " + ", ".join(
        f"{k.upper()} {v}".strip() for k, v in relay.features.items()))
    if relay.config.tls_cert_file:
        say(_("TLS client certificate: {path}").format(path=relay.config.tls_cert_file))
    say(_("AUTH: {mechanism} accepted").format(mechanism=relay.auth_mechanism) if relay.auth_mechanism
        else _("AUTH: not used (no SMTP_USER)"))


def _describe_token(config, environ, say) -> None:
    """The OAuth2 login AUTH used: flow, expiry and granted scopes, never the token."""
    import time

    from . import oauth2

    token = oauth2.cached(config, environ)
    say(_("OAuth2: flow {flow}, token endpoint {url}").format(
        flow=config.oauth2_flow, url=oauth2.endpoints(config).token_url))
    if token:
        say(_("OAuth2 access token: expires {when}, scopes granted: {scopes}").format(
            when=time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(token.expires_at)),
            scopes=token.scope or _("(not said)")))


def _test_message(config, to: str):
    head = (
        f"From: sendmail-shim <{config.sender}>\r\nTo: {to}\r\n"
        f"Subject: sendmail-shim test from {socket.gethostname()}\r\n\r\n"
    ).encode()
    body = b"This message was sent by sendmail-shim --check.\r\n"
    headers, envelope = message.prepare(
        head, extract_recipients=True, argv_recipients=[], requested_sender=None,
        policy=message.HeaderPolicy.from_config(config),
    )
    data = headers + body
    return envelope._replace(size=len(data)), io.BytesIO(data)
