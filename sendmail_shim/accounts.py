"""Several accounts: which one carries a message, and which one takes over when it cannot.

The main configuration is the ``default`` account. Each file ``accounts.d/NAME.env`` beside the
configuration file read (``/etc/sendmail-shim/accounts.d/`` for a system install) is another:
its own relay, login, credentials (stored per login), preset and budgets, in the same SMTP_*
keys; the SENDMAIL_SHIM_* keys (queue, log, delivery mode) are the main configuration's.

A message picks its account when it is accepted (`select`): by the sender the caller asked for
(-f, else From:) among the account's SMTP_ACCOUNT_SENDERS, if the submitting user is one of its
SMTP_ACCOUNT_USERS (root always is); anything else goes to the default account. -f and From: are
unverified, so nobody spends the budget of an account they may not use. The envelope sender is
that account's login, as ever.

A message that has waited longer than its account's SMTP_FALLBACK_AFTER (the account paused, or
its relay failing) moves, under its lock, to the first of SMTP_FALLBACK that is not paused
(`fallback_for`, `move`): its From: is rewritten to the new login with the display name kept and
the address it had in Reply-To: (163 and QQ accept no other sender), so it is in exactly one
account's hands at a time.
"""

import os
from types import MappingProxyType

from .errors import ConfigError
from .i18n import _

DIRECTORY = "accounts.d"
DEFAULT = "default"
_NAME = set("abcdefghijklmnopqrstuvwxyz0123456789_-")


def load(config, values: dict[str, str], directory: str, environ):
    """`config` (the default account) with the accounts of `directory`; ConfigError for an
    account file that cannot be used, or a fallback that names no account."""
    from . import config as config_module

    found = {}
    names = sorted(n for n in _listing(directory) if n.endswith(".env"))
    shared = shared_settings(values)
    for file_name in names:
        name, path = file_name[:-4], os.path.join(directory, file_name)
        if not os.access(path, os.R_OK):
            continue  # a caller the administrator keeps out: its mail is handed to the service, which reads it
        if name == DEFAULT or not name or not set(name) <= _NAME:
            raise ConfigError(_("{path}: an account name is lower-case letters, digits, - and _, not default")
                              .format(path=path))
        own = config_module.read_file(path)
        wrong = sorted(k for k in own if not k.startswith("SMTP_"))
        if wrong:
            raise ConfigError(_("{path}: {key} belongs in the main configuration, not an account file").format(
                path=path, key=wrong[0]))
        found[name] = build(config, shared, own, name, path, environ)
    for account in (config, *found.values()):
        # another account of accounts.d, or the default one: never itself
        unknown = [n for n in account.fallback if n == account.account or (n not in found and n != DEFAULT)]
        if unknown:
            raise ConfigError(_("SMTP_FALLBACK of account {name}: no account {other} in {directory}").format(
                name=account.account, other=unknown[0], directory=directory))
    return config._replace(accounts=MappingProxyType(found))


def shared_settings(values: dict[str, str]) -> dict[str, str]:
    """The main configuration's settings every account shares: the SENDMAIL_SHIM_* ones."""
    return {k: v for k, v in values.items() if k.startswith("SENDMAIL_SHIM_")}


def build(config, shared: dict[str, str], own: dict[str, str], name: str, path: str, environ):
    """The Config of account `name` (file `path`): its `own` SMTP_* settings over the `shared` ones."""
    from . import config as config_module

    return config_module.build({**shared, **own}, environ, config.sources + (path,))._replace(account=name)


def file_for(main_path: str, name: str) -> str:
    """Where account `name` of the configuration file `main_path` lives; UsageError for a bad name."""
    if name == DEFAULT or not name or not set(name) <= _NAME:
        from .errors import UsageError

        raise UsageError(_("an account name is lower-case letters, digits, - and _, not default"))
    return os.path.join(os.path.dirname(os.path.abspath(main_path)), DIRECTORY, f"{name}.env")


def _listing(directory: str) -> list[str]:
    try:
        return os.listdir(directory)
    except (FileNotFoundError, PermissionError):  # none, or not for this caller (see `load`)
        return []
    except OSError as exc:
        raise ConfigError(_("cannot read {path}: {reason}").format(path=directory, reason=exc.strerror)) from None


def matches(pattern: str, sender: str) -> bool:
    """An SMTP_ACCOUNT_SENDERS item: an address (any case), or @domain / *@domain for a domain;
    `sender` as the caller wrote it (``Name <address>`` too)."""
    from email.utils import parseaddr  # only where a message picks an account: config.load runs on every call

    address = (parseaddr(sender)[1] or sender).lower()
    if pattern.startswith(("@", "*@")):
        return address.endswith(pattern.lstrip("*"))
    return address == pattern


def select(config, requested_sender: str | None, uid: int):
    """The account a message asked for by `requested_sender` (-f, else From:) carries it, if the
    submitting `uid` may use it; else the default account (`config`)."""
    if not config.accounts or not requested_sender:
        return config
    user = _user_name(uid)
    for name in sorted(config.accounts):
        account = config.accounts[name]
        allowed = uid == 0 or (user is not None and user in account.account_users)
        if allowed and any(matches(p, requested_sender) for p in account.account_senders):
            return account
    return config


def prepare(config, uid: int, header_block: bytes, full_name: str | None, **arguments):
    """`message.prepare` under the header policy of the account the message picks (`select`):
    that account's configuration, the new header block and the envelope (its `account` named)."""
    from . import message

    headers, envelope = message.prepare(header_block, policy=message.HeaderPolicy.from_config(config, full_name),
                                        **arguments)
    account = select(config, envelope.requested_sender, uid)
    if account is config:
        return config, headers, envelope
    headers, envelope = message.prepare(header_block, policy=message.HeaderPolicy.from_config(account, full_name),
                                        **arguments)
    return account, headers, envelope._replace(account=account.account)


def _user_name(uid: int) -> str | None:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name.lower()
    except KeyError:
        return None
