"""Provider presets and hints for the replies that each provider is known to give.

Pure data and lookups; nothing here touches the network.
"""

from typing import NamedTuple

from .i18n import _

DEFAULT_CONNECTIONS = 8  # parallel connections of a queue run


class Preset(NamedTuple):
    host: str
    port: int
    security: str
    family: str  # whose error texts the relay speaks: coremail, qq, gmail, microsoft
    password_name: str  # what the provider calls the SMTP password
    # parallel connections of a queue run: Coremail (163 "421 HL:ICC") and QQ refuse an address
    # that opens too many at once and block it for a while, so their presets use one
    connections: int = DEFAULT_CONNECTIONS


_CODE = _("authorization code (授权码)")
_PASSWORD = _("password")
PRESETS = {
    "163": Preset("smtp.163.com", 465, "tls", "coremail", _CODE, 1),
    "126": Preset("smtp.126.com", 465, "tls", "coremail", _CODE, 1),
    "yeah": Preset("smtp.yeah.net", 465, "tls", "coremail", _CODE, 1),
    "qq": Preset("smtp.qq.com", 465, "tls", "qq", _CODE, 1),
    "exmail": Preset("smtp.exmail.qq.com", 465, "tls", "qq", _("client-specific password"), 1),
    "aliyun": Preset("smtp.aliyun.com", 465, "tls", "aliyun", _PASSWORD),
    "gmail": Preset("smtp.gmail.com", 465, "tls", "gmail", _("app password")),
    "outlook": Preset("smtp.office365.com", 587, "starttls", "microsoft", _PASSWORD),
}

PROVIDERS = (*PRESETS, "custom")

DEFAULT_PORTS = {"tls": 465, "starttls": 587, "none": 25}

_SENDER_HINT = _(
    "the relay accepts only its login as sender; sendmail-shim always sends as SMTP_USER, so "
    "check that SMTP_USER is the full mailbox address"
)


def reply_hint(provider: str | None, stage: str, code: int, reply: str) -> str | None:
    """A one-line fix for a failure reply, or None when there is nothing better to say."""
    text = reply.lower()
    family = PRESETS[provider].family if provider in PRESETS else None
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
