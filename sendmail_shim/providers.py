"""Provider presets: the relay, its security, whose error texts it speaks (``family``, which
`replies.classify` reads), what it calls the password, and the sending budget of one account.

Pure data; nothing here touches the network.
"""

from typing import NamedTuple

from .budgets import Budget
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
    budget: Budget = Budget()
    # how the account logs in by default (SMTP_AUTH): Microsoft switches password SMTP AUTH off for
    # existing Exchange Online tenants at the end of December 2026 (message center MC786329) and
    # ended it for Outlook.com in September 2024, so its preset uses OAuth2
    auth: str = "password"


# Budgets, where a limit depends on the kind of account, the lower one (settings raise it):
# - Coremail (163, 126, yeah): a connection carries at most 10 messages (git send-email through
#   smtp.163.com stopped after 10 with MI:DMC, linux-pci list, 12 June 2025); the day ends at
#   midnight in Beijing (UTC+8). Other limits are not published: the replies pause the account.
# - QQ, exmail: limits "保密数据，恕不公开" (not published, https://exmail.qq.com via
#   http://ydadm.com/news_in/335); the day ends at midnight in Beijing.
# - Gmail: https://support.google.com/a/answer/166852 — 2,000 messages a day (500 for trial
#   accounts), 100 recipients per message over SMTP, 10,000 recipients a day, over a rolling 24 hours.
# - Microsoft: https://learn.microsoft.com/en-us/exchange/troubleshoot/send-emails/smtp-submission-improvements
#   — 3 connections at once, 30 messages a minute, 10,000 recipients a day (rolling).
_BEIJING = Budget(day_offset=8.0)
_COREMAIL = _BEIJING._replace(messages_per_connection=10)
_GMAIL = Budget(messages_per_day=500, recipients_per_message=100, recipients_per_day=10_000)
_MICROSOFT = Budget(messages_per_minute=30, recipients_per_day=10_000)
_CODE = _("authorization code (授权码)")
_PASSWORD = _("password")
PRESETS = {
    "163": Preset("smtp.163.com", 465, "tls", "coremail", _CODE, 1, _COREMAIL),
    "126": Preset("smtp.126.com", 465, "tls", "coremail", _CODE, 1, _COREMAIL),
    "yeah": Preset("smtp.yeah.net", 465, "tls", "coremail", _CODE, 1, _COREMAIL),
    "qq": Preset("smtp.qq.com", 465, "tls", "qq", _CODE, 1, _BEIJING),
    "exmail": Preset("smtp.exmail.qq.com", 465, "tls", "qq", _("client-specific password"), 1, _BEIJING),
    "aliyun": Preset("smtp.aliyun.com", 465, "tls", "aliyun", _PASSWORD),
    "gmail": Preset("smtp.gmail.com", 465, "tls", "gmail", _("app password"), budget=_GMAIL),
    "outlook": Preset("smtp.office365.com", 587, "starttls", "microsoft", _PASSWORD, 3, _MICROSOFT, "xoauth2"),
}

PROVIDERS = (*PRESETS, "custom")

DEFAULT_PORTS = {"tls": 465, "starttls": 587, "none": 25}
