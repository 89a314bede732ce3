"""Provider presets: the relay, its security, whose error texts it speaks (``family``, which
`replies.classify` reads for its hints) and what it calls the password.

Pure data; nothing here touches the network.
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
