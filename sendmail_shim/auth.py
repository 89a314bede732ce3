"""SMTP AUTH on an open relay connection: the mechanism for SMTP_AUTH and what the relay
offers, the client's answers (PLAIN, LOGIN, CRAM-MD5 with the password; XOAUTH2 and OAUTHBEARER,
RFC 7628, with an OAuth2 access token, only over TLS), and what a refusal means.

A bearer token is as good as the password while it lives, so it travels only over TLS, whatever
SMTP_ALLOW_PLAINTEXT_AUTH says, and the transcript shows every line of the exchange as ``***``.
"""

import hmac
import json
from typing import Callable

from .errors import ConfigError, Unavailable
from .i18n import _
from .secret import Secret

TOKEN_MECHANISMS = ("XOAUTH2", "OAUTHBEARER")

# Password mechanisms by preference. Under TLS the password is protected anyway and PLAIN is one
# round trip; on a plaintext connection (SMTP_ALLOW_PLAINTEXT_AUTH=yes) CRAM-MD5 at least hides it.
_PASSWORD_TLS = ("PLAIN", "LOGIN", "CRAM-MD5")
_PASSWORD_PLAIN = ("CRAM-MD5", "PLAIN", "LOGIN")

# Exchange Online's answer when SMTP AUTH is off for the tenant or the mailbox, or when a password
# login meets Security Defaults ("basic authentication is disabled").
_EXCHANGE_DISABLED = "5.7.139"


def check_transport(config, where: str) -> None:
    """Before connecting: a login over a connection that will not be encrypted needs
    SMTP_ALLOW_PLAINTEXT_AUTH=yes (a token never goes there, see `choose`)."""
    if config.user and config.security == "none" and not config.allow_plaintext_auth:
        raise ConfigError(
            _("refusing to send the password for {user} unencrypted to {where}").format(user=config.user, where=where),
            hint=_("set SMTP_SECURITY=tls or starttls, or SMTP_ALLOW_PLAINTEXT_AUTH=yes on a trusted network"),
        )


def choose(method: str, offered: str, *, tls: bool, where: str) -> str:
    """The mechanism to use: for SMTP_AUTH=password the best password mechanism the relay
    offers, else exactly the token mechanism SMTP_AUTH names (never a password fallback)."""
    names = offered.upper().split()
    if method == "password":
        preference = _PASSWORD_TLS if tls else _PASSWORD_PLAIN
    else:
        if not tls:
            raise ConfigError(
                _("SMTP_AUTH={method} sends a bearer token, which goes only over TLS, and {where} is not "
                  "encrypted").format(method=method, where=where),
                _("set SMTP_SECURITY=tls or starttls"))
        preference = (method.upper(),)
    mechanism = next((m for m in preference if m in names), None)
    if mechanism is None:
        supported = _PASSWORD_TLS if method == "password" else preference
        raise Unavailable(_("{where} offers AUTH {offered}; sendmail-shim speaks {supported}").format(
            where=where, offered=" ".join(names), supported=", ".join(supported)),
            _("set SMTP_AUTH to a method the relay offers") if method != "password" else None)
    return mechanism


class Exchange:
    """The client side of one AUTH exchange, as smtplib's ``authobject``: the secret stays
    inside the Secret until smtplib encodes the answer; a token mechanism's error challenge (the
    relay's JSON in its 334, RFC 7628 §3.2.2) is kept, read, in ``problem``."""

    def __init__(self, mechanism: str, user: str, secret: Secret):
        self.mechanism = mechanism
        self.problem: str | None = None
        self._answer = _answers(mechanism, user, secret)

    @property
    def initial_response(self) -> bool:
        """Whether the first answer goes with the AUTH command (one round trip)."""
        return self.mechanism in ("PLAIN", *TOKEN_MECHANISMS)

    def __call__(self, challenge: bytes | None = None) -> str:
        if challenge is not None and self.mechanism in TOKEN_MECHANISMS:
            self.problem = describe_challenge(challenge)
            # the client ends a failed exchange: XOAUTH2 with an empty line, OAUTHBEARER with ^A
            return "" if self.mechanism == "XOAUTH2" else "\x01"
        return self._answer(challenge)


def _answers(mechanism: str, user: str, secret: Secret) -> Callable[[bytes | None], str]:
    if mechanism == "PLAIN":
        return lambda challenge: f"\0{user}\0{secret.reveal()}"
    if mechanism == "CRAM-MD5":
        return lambda challenge: user + " " + hmac.new(secret.reveal().encode("utf-8"), challenge, "md5").hexdigest()
    if mechanism in TOKEN_MECHANISMS:
        return lambda challenge: sasl_token_response(mechanism, user, secret.reveal())
    answers = iter((lambda: user, secret.reveal))  # LOGIN: first the user, then the password
    return lambda challenge: next(answers, lambda: "")()


def sasl_token_response(mechanism: str, user: str, token: str) -> str:
    """The initial client response of XOAUTH2 (Google's and Microsoft's form) or OAUTHBEARER
    (RFC 7628 §3.1: a GS2 header with the login, ',' and '=' escaped as =2C and =3D)."""
    if mechanism == "XOAUTH2":
        return f"user={user}\x01auth=Bearer {token}\x01\x01"
    login = user.replace("=", "=3D").replace(",", "=2C")
    return f"n,a={login},\x01auth=Bearer {token}\x01\x01"


def describe_challenge(challenge: bytes) -> str:
    """The relay's error JSON (``{"status":"401","schemes":"bearer","scope":"https://…"}``) as one line."""
    try:
        fields = json.loads(challenge.decode("utf-8"))
    except ValueError:
        fields = None
    if not isinstance(fields, dict):
        text = "".join(c if c.isprintable() else "?" for c in challenge.decode("utf-8", "replace"))
        return text[:200]
    words = [f"status {fields['status']}"] if "status" in fields else []
    if fields.get("scope"):
        words.append(_("scope needed: {scope}").format(scope=fields["scope"]))
    return ", ".join(str(word) for word in words) or json.dumps(fields)[:200]


def refusal_hint(method: str, reply: str, problem: str | None, user: str | None) -> str | None:
    """A one-line fix for a refused AUTH, beyond what `replies.classify` knows of passwords; None
    when there is nothing better to say."""
    if _EXCHANGE_DISABLED in reply:
        if method == "password":
            return _("Microsoft has switched off password logins (basic authentication) here: set "
                     "SMTP_AUTH=xoauth2 and log in with sendmail-shim --oauth2-login (see README, OAuth2)")
        return _("SMTP AUTH is switched off for this mailbox or tenant; an Exchange administrator runs: "
                 "Set-CASMailbox -Identity {user} -SmtpClientAuthenticationDisabled $false — or use the "
                 "app-only login (SMTP_OAUTH2_FLOW=client_credentials, permission SMTP.SendAsApp)").format(
                     user=user or "<mailbox>")
    if method == "password":
        return None
    if problem and "scope" in problem:
        return _("the token does not carry the scope the relay wants ({problem}): set SMTP_OAUTH2_SCOPE "
                 "and log in again with sendmail-shim --oauth2-login").format(problem=problem)
    return _("the relay refused the access token{detail}; check SMTP_USER, the application's SMTP "
             "permission and SMTP_OAUTH2_SCOPE with sendmail-shim --check").format(
                 detail=f" ({problem})" if problem else "")
