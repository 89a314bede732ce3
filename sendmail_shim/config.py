"""Configuration: dotenv files and environment variables → a frozen `Config`.

Precedence, highest first:
  1. environment variables with the documented names;
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

from . import providers
from .errors import ConfigError
from .i18n import _

SYSTEM_DIR = "/etc/sendmail-shim"
SYSTEM_CONFIG = os.path.join(SYSTEM_DIR, "sendmail-shim.env")
SYSTEM_CREDENTIALS = os.path.join(SYSTEM_DIR, "credentials")
SYSTEM_QUEUE = "/var/spool/sendmail-shim"
SERVICE_USER = "sendmail-shim"

SECURITIES = ("tls", "starttls", "none")
FROM_POLICIES = ("rewrite", "reject")
DELIVERY_MODES = ("background", "interactive", "queue", "direct")
MAX_QUEUE_CONNECTIONS = 32

# Every key a config file or the environment may set, with its documentation line (README).
KEYS = {
    "SMTP_PROVIDER": "preset: " + ", ".join(providers.PROVIDERS),
    "SMTP_HOST": "relay host name or address",
    "SMTP_PORT": "relay port (default from SMTP_SECURITY: tls 465, starttls 587, none 25)",
    "SMTP_SECURITY": "tls (implicit TLS), starttls (mandatory STARTTLS) or none",
    "SMTP_USER": "login; also the envelope sender and the From: address",
    "SMTP_FROM": "envelope sender for a relay without AUTH (when SMTP_USER is empty)",
    "SMTP_FROM_POLICY": "rewrite (default) or reject a From: that differs from the login",
    "SMTP_ALLOW_PLAINTEXT_AUTH": "yes to allow AUTH over an unencrypted connection",
    "SMTP_CA_FILE": "PEM file of CA certificates to trust instead of the system CAs",
    "SMTP_TLS_FINGERPRINT": "SHA-256 fingerprint the relay certificate must have",
    "SMTP_TLS_VERIFY": "no to skip certificate verification (warns on every use)",
    "SMTP_HELO": "EHLO name (default: host name if it has a dot, else the address literal)",
    "SMTP_TIMEOUT": "seconds per SMTP operation (default 30)",
    "SMTP_CONNECT_TIMEOUT": "seconds to resolve and connect (default 15)",
    "SMTP_DEADLINE": "seconds for a whole delivery attempt (default 600)",
    "SMTP_ALIASES": "local name → address, e.g. root:admin@example.com,default:admin@example.com",
    "SMTP_PASSWORD_COMMAND": "command whose first output line is the password",
    "SMTP_KEYRING_BACKEND": "keyring backend class path (default: sendmail-shim's file backend)",
    "SENDMAIL_SHIM_CREDENTIALS_FILE": "credential file of the built-in keyring backend",
    "SENDMAIL_SHIM_LOG_FILE": "file that gets one line per message",
    "SENDMAIL_SHIM_SYSLOG": "yes (default) to log to syslog facility mail",
    "SENDMAIL_SHIM_DELIVERY": "background (default), interactive, queue or direct",
    "SENDMAIL_SHIM_QUEUE_DIR": "queue directory",
    "SENDMAIL_SHIM_MAX_QUEUE_AGE": "give up on a message after this long (default 5d)",
    "SENDMAIL_SHIM_QUEUE_CONNECTIONS": "connections a queue run delivers over in parallel (default 8; 1 with "
                                       "the 163, 126, yeah, qq and exmail presets, whose servers block an "
                                       "address that opens too many)",
    "SENDMAIL_SHIM_BOUNCE_TO": "address that receives failure reports (default: the sender)",
}

_FORBIDDEN = {
    "SMTP_PASSWORD": _("a password never goes in a config file or the environment; "
                       "store it with sendmail-shim --set-password or set SMTP_PASSWORD_COMMAND"),
}

_TRUE = {"yes", "true", "on", "1"}
_FALSE = {"no", "false", "off", "0", ""}


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
    helo: str | None = None
    timeout: float = 30.0
    connect_timeout: float = 15.0
    deadline: float = 600.0
    aliases: dict[str, str] = MappingProxyType({})
    password_command: str | None = None
    keyring_backend: str | None = None
    credentials_file: str | None = None
    log_file: str | None = None
    syslog: bool = True
    delivery: str = "background"
    queue_dir: str = SYSTEM_QUEUE
    max_queue_age: float = 5 * 86400.0
    queue_connections: int = providers.DEFAULT_CONNECTIONS
    bounce_to: str | None = None
    sources: tuple[str, ...] = ()

    @property
    def sender(self) -> str | None:
        """The envelope sender of every message: the login, else SMTP_FROM."""
        return self.user or self.from_address

    def require_sender(self) -> str:
        if not self.sender:
            raise ConfigError(_("neither SMTP_USER nor SMTP_FROM is set: one of them is the sender of every message"))
        return self.sender

    def redacted(self) -> dict[str, str]:
        """Settings for display; the password command is shown only as set/unset."""
        shown = {}
        for name in (
            "provider", "host", "port", "security", "user", "from_address", "from_policy",
            "allow_plaintext_auth", "ca_file", "tls_fingerprint", "tls_verify", "helo",
            "timeout", "connect_timeout", "deadline", "keyring_backend", "credentials_file",
            "log_file", "syslog", "delivery", "queue_dir", "max_queue_age", "queue_connections",
            "bounce_to",
        ):
            shown[name] = str(getattr(self, name))
        shown["aliases"] = ",".join(f"{k}:{v}" for k, v in self.aliases.items())
        shown["password_command"] = "(set)" if self.password_command else "(unset)"
        shown["sources"] = ", ".join(self.sources) or "(no file)"
        return shown


def config_files(environ, explicit: str | None) -> list[str]:
    """The files to read, lowest precedence first (see the module docstring)."""
    if explicit:
        return [explicit]
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(_home(environ), ".config")
    return [SYSTEM_CONFIG, os.path.join(base, "sendmail-shim", "sendmail-shim.env")]


def load(environ=None, explicit: str | None = None) -> Config:
    environ = os.environ if environ is None else environ
    values: dict[str, str] = {}
    sources = []
    explicit = explicit or environ.get("SENDMAIL_SHIM_CONFIG")
    for path in config_files(environ, explicit):
        if not explicit and not os.path.exists(path):
            continue  # the default files are optional; an explicit one must exist
        values.update(read_file(path))
        sources.append(path)
    for key in (*KEYS, *_FORBIDDEN):
        if key in environ:
            values[key] = environ[key]
    for key, why in _FORBIDDEN.items():
        if key in values:
            raise ConfigError(_("{key} is not accepted: {why}").format(key=key, why=why))
    return build(values, environ, tuple(sources))


def read_file(path: str) -> dict[str, str]:
    """Parse one dotenv file strictly: an unparsable line or unknown key is an error."""
    parse_stream = _dotenv_parser().parse_stream  # dotenv_values() would drop bad lines silently
    try:
        with open(path, encoding="utf-8-sig") as stream:
            _check_trusted(path, os.fstat(stream.fileno()))
            bindings = list(parse_stream(stream))
    except OSError as exc:
        raise ConfigError(_("cannot read config file {path}: {reason}").format(path=path, reason=exc.strerror)) from None
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
        values[binding.key] = binding.value
    return values


@functools.cache
def _dotenv_parser():
    """python-dotenv's parser module, loaded on its own: ``import dotenv.parser`` would first run
    dotenv/__init__.py, whose dotenv.main imports logging and tempfile (~10 ms of every sendmail
    call, python-deps.md §3)."""
    if "dotenv.parser" in sys.modules:
        return sys.modules["dotenv.parser"]
    from importlib.machinery import PathFinder
    from importlib.util import module_from_spec

    package = PathFinder.find_spec("dotenv")
    spec = package and PathFinder.find_spec("dotenv.parser", package.submodule_search_locations)
    if spec is None:  # not a plain directory on sys.path: the ordinary import finds it (or fails)
        from dotenv import parser

        return parser
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
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


def build(values: dict[str, str], environ, sources: tuple[str, ...] = ()) -> Config:
    """Validate merged key/value strings into a Config (pure apart from the home lookup)."""
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
        port = int(_number("SMTP_PORT", get("SMTP_PORT")))
    elif preset and security == preset.security:
        port = preset.port
    else:
        port = providers.DEFAULT_PORTS[security]
    if not 0 < port < 65536:
        raise ConfigError(_("SMTP_PORT={value}: not a port number").format(value=port))
    from_policy = (get("SMTP_FROM_POLICY") or "rewrite").lower()
    if from_policy not in FROM_POLICIES:
        raise ConfigError(_("SMTP_FROM_POLICY={value}: expected rewrite or reject").format(value=from_policy))
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
            raise ConfigError(_("{key}={value}: expected a plain address such as alice@163.com").format(key=key, value=address))
    return Config(
        host=get("SMTP_HOST") or (preset.host if preset else None),
        port=port,
        security=security,
        provider=provider,
        user=user,
        from_address=from_address,
        from_policy=from_policy,
        allow_plaintext_auth=_flag(values, "SMTP_ALLOW_PLAINTEXT_AUTH", False),
        ca_file=get("SMTP_CA_FILE"),
        tls_fingerprint=fingerprint,
        tls_verify=_flag(values, "SMTP_TLS_VERIFY", True),
        helo=get("SMTP_HELO"),
        timeout=_seconds(values, "SMTP_TIMEOUT", 30.0),
        connect_timeout=_seconds(values, "SMTP_CONNECT_TIMEOUT", 15.0),
        deadline=_seconds(values, "SMTP_DEADLINE", 600.0),
        aliases=parse_aliases(get("SMTP_ALIASES") or ""),
        password_command=get("SMTP_PASSWORD_COMMAND"),
        keyring_backend=get("SMTP_KEYRING_BACKEND"),
        credentials_file=get("SENDMAIL_SHIM_CREDENTIALS_FILE") or default_credentials_file(environ, sources),
        log_file=get("SENDMAIL_SHIM_LOG_FILE"),
        syslog=_flag(values, "SENDMAIL_SHIM_SYSLOG", True),
        delivery=delivery,
        queue_dir=get("SENDMAIL_SHIM_QUEUE_DIR") or default_queue_dir(environ, sources),
        max_queue_age=_seconds(values, "SENDMAIL_SHIM_MAX_QUEUE_AGE", 5 * 86400.0),
        queue_connections=_whole(values, "SENDMAIL_SHIM_QUEUE_CONNECTIONS",
                                 preset.connections if preset else providers.DEFAULT_CONNECTIONS,
                                 most=MAX_QUEUE_CONNECTIONS),
        bounce_to=get("SENDMAIL_SHIM_BOUNCE_TO"),
        sources=sources,
    )


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


def _flag(values, key: str, default: bool) -> bool:
    raw = values.get(key)
    if raw is None:
        return default
    word = raw.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False if word else default
    raise ConfigError(_("{key}={value}: expected yes or no").format(key=key, value=raw))


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _seconds(values, key: str, default: float) -> float:
    raw = (values.get(key) or "").strip().lower()
    if not raw:
        return default
    unit = _UNITS.get(raw[-1])
    number = _number(key, raw[:-1] if unit else raw)
    if number <= 0:
        raise ConfigError(_("{key}={value}: must be positive").format(key=key, value=raw))
    return number * (unit or 1)


def _whole(values, key: str, default: int, most: int) -> int:
    raw = (values.get(key) or "").strip()
    if not raw:
        return default
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= most:
        raise ConfigError(_("{key}={value}: expected a whole number from 1 to {most}").format(
            key=key, value=raw, most=most))
    return int(raw)


def _number(key: str, raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(_("{key}={value}: not a number").format(key=key, value=raw)) from None
