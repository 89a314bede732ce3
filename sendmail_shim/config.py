"""Configuration: dotenv files and environment variables → a frozen `Config`.

Precedence, highest first:
  1. the environment variable ``SENDMAIL_SHIM_<KEY>`` of a key (`env_name`: SENDMAIL_SHIM_SMTP_HOST
     for SMTP_HOST; SENDMAIL_SHIM_QUEUE_DIR for itself). An application's own SMTP_HOST,
     SMTP_PASSWORD… (PHP, Docker images, CI jobs export them for themselves) change nothing;
  2. ``--config FILE`` or ``SENDMAIL_SHIM_CONFIG=FILE`` — when given, the only file read;
  3. otherwise the user file ``${XDG_CONFIG_HOME:-~/.config}/sendmail-shim/sendmail-shim.env``
     over the system file ``/etc/sendmail-shim/sendmail-shim.env``;
  4. provider preset (``SMTP_PROVIDER``), then built-in defaults.
"""

import functools
import os
import sys
from types import MappingProxyType
from typing import NamedTuple

from . import budgets, providers, setting
from .budgets import Budget
from .keys import KEYS, SUBMIT_SOCKET
from .errors import ConfigError
from .i18n import _

SYSTEM_DIR = "/etc/sendmail-shim"
SYSTEM_CONFIG = os.path.join(SYSTEM_DIR, "sendmail-shim.env")
SYSTEM_CREDENTIALS = os.path.join(SYSTEM_DIR, "credentials")
SYSTEM_QUEUE = "/var/spool/sendmail-shim"
SERVICE_USER = "sendmail-shim"

SECURITIES = ("tls", "starttls", "none")
FROM_POLICIES = ("rewrite", "reject")
LOCAL_MAIL = ("login", "refuse")
DELIVERY_MODES = ("background", "interactive", "queue", "direct")
AUTH_METHODS = ("password", "xoauth2", "oauthbearer")  # the first of each is the default
OAUTH2_FLOWS = ("refresh_token", "client_credentials")
MAX_QUEUE_CONNECTIONS = 32

_FORBIDDEN = {
    "SMTP_PASSWORD": _("a password never goes in a config file or the environment; "
                       "store it with sendmail-shim --set-password or set SMTP_PASSWORD_COMMAND"),
}


class Config(NamedTuple):
    host: str | None = None
    port: int = 465
    security: str = "tls"
    provider: str = "custom"
    user: str | None = None
    from_address: str | None = None
    from_policy: str = "rewrite"
    allow_plaintext_auth: bool = False
    ca_file: str | None = None
    tls_fingerprint: str | None = None
    tls_verify: bool = True
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    helo: str | None = None
    timeout: float = 30.0
    connect_timeout: float = 15.0
    deadline: float = 600.0
    aliases: dict[str, str] = MappingProxyType({})
    local_mail: str = "login"
    password_command: str | None = None
    keyring_backend: str | None = None
    auth: str = "password"
    oauth2_flow: str = "refresh_token"
    oauth2_client_id: str | None = None
    oauth2_client_cert_file: str | None = None
    oauth2_tenant: str | None = None
    oauth2_scope: str | None = None
    oauth2_token_url: str | None = None
    oauth2_device_url: str | None = None
    oauth2_ca_file: str | None = None
    credentials_file: str | None = None
    log_file: str | None = None
    syslog: bool = True
    delivery: str = "background"
    queue_dir: str = SYSTEM_QUEUE
    max_queue_age: float = 5 * 86400.0
    failed_age: float = 30 * 86400.0
    queue_connections: int = providers.DEFAULT_CONNECTIONS
    budget: Budget = Budget()  # the account's sending limits (budgets.py)
    account: str = "default"  # this account's name: default, or NAME of accounts.d/NAME.env
    account_senders: tuple[str, ...] = ()  # addresses and @domains that pick this account
    account_users: tuple[str, ...] = ()  # local users who may pick it (root always may)
    fallback: tuple[str, ...] = ()  # accounts that take over, in order
    fallback_after: float = 1800.0
    accounts: dict = MappingProxyType({})  # name → Config of every other account (on the default one only)
    bounce_to: str | None = None
    submit_socket: str = SUBMIT_SOCKET
    user_rate: int = 600
    user_queue_size: int = 1 << 30
    user_message_size: int = 64 << 20
    sources: tuple[str, ...] = ()  # the files read
    searched: tuple[str, ...] = ()  # the files looked for (none of which may exist)
    origins: dict[str, str] = MappingProxyType({})  # key → where its value came from (`build`)

    def for_account(self, name: str | None) -> "Config":
        """The configuration of account `name` (None: the default); ConfigError when there is none."""
        if name in (None, self.account):
            return self
        if name not in self.accounts:
            raise ConfigError(_("account {name} is not configured (no accounts.d/{name}.env)").format(name=name))
        return self.accounts[name]

    @property
    def sender(self) -> str | None:
        """The envelope sender of every message: the login, else SMTP_FROM."""
        return self.user or self.from_address

    def require_sender(self) -> str:
        if not self.sender:
            if not self.sources:  # nothing configured at all: a fresh machine
                raise ConfigError(
                    _("sendmail-shim is not configured: none of {files} exists").format(
                        files=", ".join(self.searched) or "(no file)"),
                    _("run sendmail-shim --setup"))
            raise ConfigError(_("neither SMTP_USER nor SMTP_FROM is set: one of them is the sender of every message"))
        return self.sender

    def redacted(self) -> dict[str, str]:
        """Every key's value in effect, for display (`origins` says where each came from); the
        password command is shown only as set/unset."""
        shown = {}
        for key in KEYS:
            value = getattr(self, field_of(key), None)
            if key == "SMTP_PASSWORD_COMMAND":
                value = "(set)" if value else None
            elif key == "SMTP_ALIASES":
                value = ",".join(f"{k}:{v}" for k, v in value.items()) or None
            elif key in budgets.KEYS:
                value = getattr(self.budget, budgets.KEYS[key]) or _("0 (no limit)")
            elif isinstance(value, tuple):
                value = ",".join(value) or None
            elif isinstance(value, bool):
                value = "yes" if value else "no"
            shown[key] = "(unset)" if value is None else str(value)
        return shown


def env_name(key: str) -> str:
    """The environment variable that overrides `key`: SENDMAIL_SHIM_ + the key, for a key that
    does not already begin with it (an application's SMTP_HOST is its own, not ours)."""
    return key if key.startswith("SENDMAIL_SHIM_") else "SENDMAIL_SHIM_" + key


def field_of(key: str) -> str:
    """The `Config` field of a key: SMTP_CA_FILE → ca_file."""
    if key == "SMTP_FROM":
        return "from_address"
    return key.lower().removeprefix("smtp_").removeprefix("sendmail_shim_")


def config_files(environ, explicit: str | None) -> list[str]:
    """The files to read, lowest precedence first (see the module docstring)."""
    if explicit:
        return [explicit]
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(_home(environ), ".config")
    return [SYSTEM_CONFIG, os.path.join(base, "sendmail-shim", "sendmail-shim.env")]


def load(environ=None, explicit: str | None = None) -> Config:
    environ = os.environ if environ is None else environ
    values: dict[str, str] = {}
    origins: dict[str, str] = {}
    sources = []
    explicit = explicit or environ.get("SENDMAIL_SHIM_CONFIG")
    searched = config_files(environ, explicit)
    for path in searched:
        if not explicit and not os.path.exists(path):
            continue  # the default files are optional; an explicit one must exist
        for key, (value, line) in read_lines(path).items():
            values[key], origins[key] = value, f"{path}:{line}"
        sources.append(path)
    for key, why in _FORBIDDEN.items():
        if env_name(key) in environ:
            raise ConfigError(_("{key} is not accepted: {why}").format(key=env_name(key), why=why))
    for key in KEYS:
        name = env_name(key)
        if name in environ:
            values[key], origins[key] = environ[name], _("environment {name}").format(name=name)
    config = build(values, environ, tuple(sources), origins=origins, searched=tuple(searched))
    if not sources:
        return config
    from . import accounts

    return accounts.load(config, values, os.path.join(os.path.dirname(sources[-1]), accounts.DIRECTORY), environ)


def read_file(path: str) -> dict[str, str]:
    """Parse one dotenv file strictly: an unparsable line or unknown key is an error."""
    return {key: value for key, (value, _line) in read_lines(path).items()}


def read_lines(path: str) -> dict[str, tuple[str, int]]:
    """`read_file`, with the line number of each key's (last) setting."""
    parse_stream = _dotenv_parser().parse_stream  # dotenv_values() would drop bad lines silently
    try:
        with open(path, encoding="utf-8-sig") as stream:
            _check_trusted(path, os.fstat(stream.fileno()))
            bindings = list(parse_stream(stream))
    except OSError as exc:
        raise ConfigError(
            _("cannot read config file {path}: {reason}").format(path=path, reason=exc.strerror)) from None
    except UnicodeDecodeError:
        raise ConfigError(_("{path}: not UTF-8 text").format(path=path)) from None
    values = {}
    for binding in bindings:
        line = binding.original.line
        if binding.error:
            raise ConfigError(_("{path}:{line}: cannot parse this line").format(path=path, line=line))
        if binding.key is None:
            continue
        if binding.key in _FORBIDDEN:
            raise ConfigError(_("{path}:{line}: {key} is not accepted: {why}").format(
                path=path, line=line, key=binding.key, why=_FORBIDDEN[binding.key]))
        if binding.key not in KEYS:
            raise ConfigError(_("{path}:{line}: unknown key {key}").format(path=path, line=line, key=binding.key))
        if binding.value is None:
            raise ConfigError(_("{path}:{line}: {key} has no value (write {key}=…)").format(
                path=path, line=line, key=binding.key))
        values[binding.key] = (binding.value, line)
    return values


@functools.cache
def _dotenv_parser():
    """python-dotenv's parser module, loaded on its own: ``import dotenv.parser`` would first run
    dotenv/__init__.py, whose dotenv.main imports logging and tempfile (~10 ms of every sendmail
    call, measured: see the project's shared notes on python-deps). The module is internal to
    python-dotenv, so it is checked for what `read_lines` uses: a release that changes it is an
    error naming the tested range (setup.cfg, debian/control), never a misread file."""
    module = sys.modules.get("dotenv.parser")
    if module is None:
        from importlib.machinery import PathFinder
        from importlib.util import module_from_spec

        package = PathFinder.find_spec("dotenv")
        spec = package and PathFinder.find_spec("dotenv.parser", package.submodule_search_locations)
        if spec is None:  # not a plain directory on sys.path: the ordinary import finds it (or fails)
            try:
                from dotenv import parser as module
            except ImportError:
                module = None
        else:
            module = module_from_spec(spec)
            spec.loader.exec_module(module)
    binding = getattr(getattr(module, "Binding", None), "_fields", ())
    original = getattr(getattr(module, "Original", None), "_fields", ())
    if not (callable(getattr(module, "parse_stream", None)) and {"key", "value", "original", "error"} <= set(binding)
            and "line" in original):
        where = getattr(module, "__file__", None) or _("not installed")
        raise ConfigError(_("python-dotenv's parser ({where}) is not the one sendmail-shim was tested with: "
                            "install python-dotenv >= 0.21, < 2").format(where=where))
    return module


def _check_trusted(path: str, st: os.stat_result) -> None:
    """Like ssh's StrictModes: whoever can change the config can redirect mail and the password
    (SMTP_HOST, SMTP_TLS_VERIFY=no, SMTP_PASSWORD_COMMAND), so only root or the caller may."""
    directory = os.stat(os.path.dirname(os.path.abspath(path)))
    loose_dir = directory.st_mode & 0o002 and not directory.st_mode & 0o1000
    if st.st_mode & 0o022 or st.st_uid not in (0, os.geteuid()) or loose_dir:
        raise ConfigError(
            _("refusing config file {path}: others can change it (mode {mode}, owner uid {uid})").format(
                path=path, mode=f"{st.st_mode & 0o7777:04o}", uid=st.st_uid),
            _("make it belong to root or to you, writable only by its owner: chmod go-w {path}").format(path=path),
        )


def build(values: dict[str, str], environ, sources: tuple[str, ...] = (), *,
          origins: dict[str, str] | None = None, searched: tuple[str, ...] = ()) -> Config:
    """Validate merged key/value strings into a Config (pure apart from the home lookup).

    `origins` says where each of `values` came from (``file:line``, ``environment NAME``); a
    value without one is labelled ``set``. Keys without a value get ``preset <name>`` or
    ``default``."""
    get = lambda key: (values.get(key) or "").strip() or None  # noqa: E731
    provider = (get("SMTP_PROVIDER") or "custom").lower()
    if provider not in providers.PROVIDERS:
        raise ConfigError(_("SMTP_PROVIDER={value}: expected one of {choices}").format(
            value=provider, choices=", ".join(providers.PROVIDERS)))
    preset = providers.PRESETS.get(provider)
    security = (get("SMTP_SECURITY") or (preset.security if preset else "starttls")).lower()
    if security not in SECURITIES:
        raise ConfigError(_("SMTP_SECURITY={value}: expected tls, starttls or none").format(value=security))
    if get("SMTP_PORT"):
        port = int(setting.number("SMTP_PORT", get("SMTP_PORT")))
    elif preset and security == preset.security:
        port = preset.port
    else:
        port = providers.DEFAULT_PORTS[security]
    if not 0 < port < 65536:
        raise ConfigError(_("SMTP_PORT={value}: not a port number").format(value=port))
    from_policy = (get("SMTP_FROM_POLICY") or "rewrite").lower()
    if from_policy not in FROM_POLICIES:
        raise ConfigError(_("SMTP_FROM_POLICY={value}: expected rewrite or reject").format(value=from_policy))
    local_mail = (get("SMTP_LOCAL_MAIL") or "login").lower()
    if local_mail not in LOCAL_MAIL:
        raise ConfigError(_("SMTP_LOCAL_MAIL={value}: expected login or refuse").format(value=local_mail))
    delivery = (get("SENDMAIL_SHIM_DELIVERY") or "background").lower()
    if delivery not in DELIVERY_MODES:
        raise ConfigError(_("SENDMAIL_SHIM_DELIVERY={value}: expected {choices}").format(
            value=delivery, choices=", ".join(DELIVERY_MODES)))
    fingerprint = get("SMTP_TLS_FINGERPRINT")
    if fingerprint:
        fingerprint = fingerprint.replace(":", "").lower()
        if len(fingerprint) != 64 or any(c not in "0123456789abcdef" for c in fingerprint):
            raise ConfigError(_("SMTP_TLS_FINGERPRINT: expected a SHA-256 fingerprint (64 hex digits)"))
    user, from_address = get("SMTP_USER"), get("SMTP_FROM")
    for key, address in (("SMTP_USER", user), ("SMTP_FROM", from_address)):
        if address and ("@" not in address or any(c in address for c in " \t\r\n<>,;")):
            raise ConfigError(
                _("{key}={value}: expected a plain address such as alice@163.com").format(key=key, value=address))
    return Config(
        host=get("SMTP_HOST") or (preset.host if preset else None),
        port=port,
        security=security,
        provider=provider,
        user=user,
        from_address=from_address,
        from_policy=from_policy,
        allow_plaintext_auth=setting.flag(values, "SMTP_ALLOW_PLAINTEXT_AUTH", False),
        ca_file=get("SMTP_CA_FILE"),
        tls_fingerprint=fingerprint,
        tls_verify=setting.flag(values, "SMTP_TLS_VERIFY", True),
        tls_cert_file=get("SMTP_TLS_CERT_FILE"),
        tls_key_file=get("SMTP_TLS_KEY_FILE"),
        helo=get("SMTP_HELO"),
        timeout=setting.seconds(values, "SMTP_TIMEOUT", 30.0),
        connect_timeout=setting.seconds(values, "SMTP_CONNECT_TIMEOUT", 15.0),
        deadline=setting.seconds(values, "SMTP_DEADLINE", 600.0),
        aliases=parse_aliases(get("SMTP_ALIASES") or ""),
        local_mail=local_mail,
        password_command=get("SMTP_PASSWORD_COMMAND"),
        keyring_backend=get("SMTP_KEYRING_BACKEND"),
        auth=setting.choice(get, "SMTP_AUTH", AUTH_METHODS, preset.auth if preset else None),
        oauth2_flow=setting.choice(get, "SMTP_OAUTH2_FLOW", OAUTH2_FLOWS),
        oauth2_client_id=get("SMTP_OAUTH2_CLIENT_ID"),
        oauth2_client_cert_file=get("SMTP_OAUTH2_CLIENT_CERT_FILE"),
        oauth2_tenant=get("SMTP_OAUTH2_TENANT"),
        oauth2_scope=get("SMTP_OAUTH2_SCOPE"),
        oauth2_token_url=get("SMTP_OAUTH2_TOKEN_URL"),
        oauth2_device_url=get("SMTP_OAUTH2_DEVICE_URL"),
        oauth2_ca_file=get("SMTP_OAUTH2_CA_FILE"),
        credentials_file=get("SENDMAIL_SHIM_CREDENTIALS_FILE") or default_credentials_file(environ, sources),
        log_file=get("SENDMAIL_SHIM_LOG_FILE"),
        syslog=setting.flag(values, "SENDMAIL_SHIM_SYSLOG", True),
        delivery=delivery,
        queue_dir=get("SENDMAIL_SHIM_QUEUE_DIR") or default_queue_dir(environ, sources),
        max_queue_age=setting.seconds(values, "SENDMAIL_SHIM_MAX_QUEUE_AGE", 5 * 86400.0),
        failed_age=setting.seconds(values, "SENDMAIL_SHIM_FAILED_AGE", 30 * 86400.0),
        queue_connections=setting.whole(values, "SENDMAIL_SHIM_QUEUE_CONNECTIONS",
                                 preset.connections if preset else providers.DEFAULT_CONNECTIONS,
                                 most=MAX_QUEUE_CONNECTIONS),
        budget=_budget(values, preset.budget if preset else Budget()),
        account_senders=setting.words(get("SMTP_ACCOUNT_SENDERS")),
        account_users=setting.words(get("SMTP_ACCOUNT_USERS")),
        fallback=setting.words(get("SMTP_FALLBACK")),
        fallback_after=setting.seconds(values, "SMTP_FALLBACK_AFTER", 1800.0),
        bounce_to=get("SENDMAIL_SHIM_BOUNCE_TO"),
        submit_socket=get("SENDMAIL_SHIM_SUBMIT_SOCKET") or SUBMIT_SOCKET,
        user_rate=setting.whole(values, "SENDMAIL_SHIM_USER_RATE", 600, most=1 << 30),
        user_queue_size=setting.size(values, "SENDMAIL_SHIM_USER_QUEUE_SIZE", 1 << 30),
        user_message_size=min(setting.size(values, "SENDMAIL_SHIM_USER_MESSAGE_SIZE", 64 << 20), 64 << 20),
        sources=sources,
        searched=searched,
        origins=_origins(values, origins or {}, provider if preset else None,
                         preset is not None and security == preset.security),
    )


# Keys whose value, when not set, comes from the provider preset.
_PRESET_KEYS = ("SMTP_HOST", "SMTP_SECURITY", "SMTP_AUTH", "SENDMAIL_SHIM_QUEUE_CONNECTIONS", *budgets.KEYS)


def _budget(values, preset: Budget) -> Budget:
    """The preset's budget with the SMTP_*_PER_* settings over it (0: no limit)."""
    changes = {}
    for key, field in budgets.KEYS.items():
        raw = (values.get(key) or "").strip()
        if raw:
            changes[field] = setting.whole(values, key, 0, most=1 << 30) if raw != "0" else None
    return preset._replace(**changes)


def _origins(values: dict[str, str], given: dict[str, str], preset: str | None, preset_port: bool):
    """Where every key's value in effect comes from (see `build`)."""
    result = {}
    for key in KEYS:
        if (values.get(key) or "").strip():
            result[key] = given.get(key) or _("set")
        elif preset and (key in _PRESET_KEYS or (key == "SMTP_PORT" and preset_port)):
            result[key] = _("preset {name}").format(name=preset)
        else:
            result[key] = _("default")
    return MappingProxyType(result)


def parse_aliases(text: str) -> dict[str, str]:
    """``root:admin@example.com,default:ops@example.com`` → {"root": "admin@example.com", …}."""
    aliases = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, address = item.partition(":")
        name, address = name.strip().lower(), address.strip()
        if not sep or not name or "@" not in address or any(c in address for c in " \t\r\n<>;:"):
            raise ConfigError(_("SMTP_ALIASES: cannot read {item!r} (expected name:address)").format(item=item))
        aliases[name] = address
    return aliases


def default_queue_dir(environ, sources: tuple[str, ...] = ()) -> str:
    """The system spool or the per-user state directory, see `uses_system_paths`."""
    if uses_system_paths(environ, sources):
        return SYSTEM_QUEUE
    base = environ.get("XDG_STATE_HOME") or os.path.join(_home(environ), ".local", "state")
    return os.path.join(base, "sendmail-shim")


def default_credentials_file(environ, sources: tuple[str, ...] = ()) -> str:
    """The system credential file or the per-user one, see `uses_system_paths`."""
    if uses_system_paths(environ, sources):
        return SYSTEM_CREDENTIALS
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(_home(environ), ".config")
    return os.path.join(base, "sendmail-shim", "credentials")


def uses_system_paths(environ, sources: tuple[str, ...] = ()) -> bool:
    """System queue and credentials for root and the service user, and for every other user of
    a system install (www-data must reach the system maildrop) unless that user has a config
    file of their own; per-user paths otherwise."""
    if _is_system_user():
        return True
    own = config_files(environ, None)[-1]
    if own in sources:
        return False
    return SYSTEM_CONFIG in sources


@functools.cache  # asked for the queue and the credential file: one NSS lookup, not two
def _is_system_user() -> bool:
    if os.geteuid() == 0:
        return True
    import grp
    import pwd

    try:
        if pwd.getpwuid(os.geteuid()).pw_name == SERVICE_USER:
            return True
        return os.getegid() == grp.getgrnam(SERVICE_USER).gr_gid
    except KeyError:
        return False


def _home(environ) -> str:
    home = environ.get("HOME")
    if home:
        return home
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_dir
    except KeyError:
        return "/"
