"""Get, store and delete the SMTP password (for SMTP_AUTH=xoauth2/oauthbearer: the OAuth2 client
secret, and the refresh token `--oauth2-login` got).

Sources, first match wins:
  1. ``SMTP_PASSWORD_COMMAND``: its first output line (like msmtp's passwordeval);
  2. ``SMTP_KEYRING_BACKEND=module.Class``: that keyring backend, used directly (no detection);
  3. otherwise the project's credential file (`credstore`), without importing keyring.

Every failure is a ConfigError (exit 78) that says how to fix it; none contains the password.
"""

import os
import re

from . import credstore, providers
from .errors import ConfigError, UsageError
from .i18n import _
from .secret import Secret

SERVICE = "sendmail-shim"
REFRESH_SERVICE = "sendmail-shim-oauth2-refresh"  # the OAuth2 refresh token, beside the password
OWN_BACKEND = "sendmail_shim.keyring_backend.ShimFileKeyring"

# Backends that ask for a master password through getpass, which without a tty reads the
# message from stdin (see the shared notes on python-deps): never usable by a sendmail.
_PROMPTING_BACKENDS = {
    "keyrings.alt.file.EncryptedKeyring",
    "keyrings.cryptfile.cryptfile.CryptFileKeyring",
    "keyring.backends.chainer.ChainerBackend",
}

_EXCERPT_CHARS = 160
_SECRET_ASSIGNMENT = re.compile(r"(?i)\b(pass(?:word|wd|phrase)?|secret|token|key|pin)(\s*[:=]\s*)\S+")


def get_password(config, environ=None) -> Secret:
    """What AUTH sends for ``config.user``: the password, or with SMTP_AUTH=xoauth2/oauthbearer an
    OAuth2 access token (`oauth2.access_token`, from its cache or the identity provider);
    ConfigError when it is missing or unreachable."""
    if config.auth != "password":
        from . import oauth2

        return oauth2.access_token(config, environ)
    return get_secret(config, environ)


def get_secret(config, environ=None) -> Secret:
    """The stored password (SMTP_PASSWORD_COMMAND's, else the store's): the SMTP password, or the
    OAuth2 client secret; ConfigError when there is none."""
    user = _user(config)
    if config.password_command:
        return _run_password_command(config.password_command, config.timeout, environ)
    password, where = _lookup(config, SERVICE, user, environ)
    if not password:
        raise ConfigError(_("no password stored for {user} in {where}").format(user=user, where=where),
                          _set_password_hint(config))
    return Secret(password)


def get_refresh_token(config, environ=None) -> Secret:
    """The OAuth2 refresh token `--oauth2-login` stored; ConfigError when there is none."""
    user = _user(config)
    token, where = _lookup(config, REFRESH_SERVICE, user, environ)
    if not token:
        raise ConfigError(_("no OAuth2 login stored for {user} in {where}").format(user=user, where=where),
                          _("run: sendmail-shim --oauth2-login"))
    return Secret(token)


def set_refresh_token(config, token: Secret, environ=None) -> str:
    """Store (or replace, when the identity provider rotated it) the refresh token; where it went."""
    return _store(config, REFRESH_SERVICE, token, environ)


def _lookup(config, service: str, user: str, environ) -> tuple[str | None, str]:
    """The stored value and where it was looked for."""
    if _uses_own_store(config):
        store = credstore.locate(config.credentials_file, environ)
        return store.get(service, user), store.path
    backend = _load_backend(config.keyring_backend)
    return (_call(config.keyring_backend, backend.get_password, service, user),
            _("keyring backend {backend}").format(backend=config.keyring_backend))


def _store(config, service: str, secret: Secret, environ) -> str:
    user = _user(config)
    if _uses_own_store(config):
        store = credstore.locate(config.credentials_file, environ)
        store.set(service, user, secret.reveal())
        return store.path
    backend = _load_backend(config.keyring_backend)
    _call(config.keyring_backend, backend.set_password, service, user, secret.reveal(), secret=secret.reveal())
    return _("keyring backend {backend}").format(backend=config.keyring_backend)


def set_password(config, password: Secret, environ=None) -> str:
    """Store the password (or OAuth2 client secret) for ``config.user``; returns where it went (for
    the CLI message)."""
    _user(config)
    if not password:
        raise UsageError(_("the password is empty; nothing stored"))
    if config.password_command:
        raise ConfigError(
            _("SMTP_PASSWORD_COMMAND is set, so a stored password would never be used"),
            _("change what the command prints, or unset SMTP_PASSWORD_COMMAND"),
        )
    return _store(config, SERVICE, password, environ)


def delete_password(config, environ=None) -> str:
    """Remove the stored password for ``config.user``; returns where it was."""
    user = _user(config)
    if _uses_own_store(config):
        store = credstore.locate(config.credentials_file, environ)
        if not store.delete(SERVICE, user):
            raise ConfigError(_("no password stored for {user} in {where}; nothing to delete").format(
                user=user, where=store.path))
        return store.path
    backend = _load_backend(config.keyring_backend)
    _call(config.keyring_backend, backend.delete_password, SERVICE, user)
    return _("keyring backend {backend}").format(backend=config.keyring_backend)


def readable(config, environ=None) -> bool:
    """Whether this process can fetch the password itself (else the queue runner must).

    False only for the project's file when it is missing or unreadable here, e.g. for a web
    server user outside group sendmail-shim. Nothing is read and keyring is not imported.
    """
    if config.password_command or not _uses_own_store(config):
        return True
    return os.access(credstore.locate(config.credentials_file, environ).path, os.R_OK, effective_ids=True)


def read_new_password(stdin, stderr, *, prompt: str = "Password: ") -> Secret:
    """Prompt without echo on a terminal; otherwise read one line from stdin (scripts)."""
    if stdin.isatty():
        import getpass

        try:
            line = getpass.getpass(prompt, stream=stderr)
        except EOFError:
            line = ""
    else:
        line = stdin.readline()
        if isinstance(line, bytes):
            line = line.decode("utf-8")
        line = line.removesuffix("\n").removesuffix("\r")
    if not line:
        raise UsageError(_("the password is empty; nothing stored"))
    return Secret(line)


def _user(config) -> str:
    if not config.user:
        raise ConfigError(
            _("SMTP_USER is not set"),
            _("set SMTP_USER to the login (the full mailbox address) in the config file"),
        )
    return config.user


def _uses_own_store(config) -> bool:
    return config.keyring_backend in (None, OWN_BACKEND)


def _set_password_hint(config) -> str:
    preset = providers.PRESETS.get(config.provider)
    if preset and preset.password_name != "password":
        return _("run: sendmail-shim --set-password and enter the {provider} {name}, "
                 "not the web login password").format(provider=config.provider, name=preset.password_name)
    return _("run: sendmail-shim --set-password")


def _run_password_command(command: str, timeout: float, environ) -> Secret:
    """First stdout line of ``sh -c command``; stdin is /dev/null, stdout is never shown."""
    import subprocess  # ~9 ms, not needed on the default path

    try:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", command],
            stdin=subprocess.DEVNULL,  # it must never see the message
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environ,
            start_new_session=True,  # its own process group, killed as a whole on timeout
        )
    except OSError as exc:
        raise ConfigError(_("cannot run SMTP_PASSWORD_COMMAND: {reason}").format(reason=exc.strerror)) from None
    with proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out = None  # the exception holds partial output: raise outside this block
    if out is None:
        raise ConfigError(
            _("SMTP_PASSWORD_COMMAND did not finish within {timeout:g} s").format(timeout=timeout),
            _("it must print the password without waiting for input (its stdin is /dev/null)"),
        )
    lines = out.splitlines()
    if proc.returncode != 0:
        status = (
            _("SMTP_PASSWORD_COMMAND was killed by signal {signal}").format(signal=-proc.returncode)
            if proc.returncode < 0
            else _("SMTP_PASSWORD_COMMAND failed with exit status {status}").format(status=proc.returncode)
        )
        raise ConfigError(status, _stderr_excerpt(err, lines) or None)
    first = lines[0] if lines else b""
    try:
        password = first.decode("utf-8")
    except UnicodeDecodeError:
        password = None  # the exception holds the bytes: raise outside this block
    if password is None:
        raise ConfigError(_("SMTP_PASSWORD_COMMAND printed a password that is not UTF-8"))
    if not password:
        raise ConfigError(
            _("SMTP_PASSWORD_COMMAND printed nothing on its first line"),
            _("it must print the password on the first line of its standard output"),
        )
    return Secret(password)


def _kill_group(proc) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.kill()  # in case the shell left its group; the wait on exit must not block


def _stderr_excerpt(err: bytes, secrets: list[bytes]) -> str:
    """The last stderr line, short and printable, with anything password-like masked."""
    for secret in filter(None, (s.strip() for s in secrets)):
        err = err.replace(secret, b"***")
    text = _SECRET_ASSIGNMENT.sub(r"\1\2***", err.decode("utf-8", "replace"))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return _shorten("".join(c if c.isprintable() else "?" for c in (lines[-1] if lines else "")))


def _shorten(line: str) -> str:
    return line if len(line) <= _EXCERPT_CHARS else line[: _EXCERPT_CHARS - 1] + "…"


def _load_backend(path: str):
    """An instance of the keyring backend class ``path``, refusing the ones that prompt."""
    import importlib

    import keyring.backend

    module_name, _dot, class_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(
            _("SMTP_KEYRING_BACKEND={path}: cannot import it ({error})").format(path=path, error=type(exc).__name__),
            _("give a backend class path such as keyring.backends.SecretService.Keyring, "
              "or unset it to use sendmail-shim's credential file"),
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, keyring.backend.KeyringBackend)):
        raise ConfigError(_("SMTP_KEYRING_BACKEND={path}: not a keyring backend class").format(path=path))
    names = {f"{c.__module__}.{c.__qualname__}" for c in cls.__mro__}
    if names & _PROMPTING_BACKENDS:
        raise ConfigError(
            _("SMTP_KEYRING_BACKEND={path}: refused, it may ask for a master password on stdin "
              "(where sendmail reads the message)").format(path=path),
            _("unset SMTP_KEYRING_BACKEND to use sendmail-shim's credential file"),
        )

    def instantiate():
        _priority = cls.priority  # raises when the backend cannot work here, as in keyring's load_keyring
        return cls()

    return _call(path, instantiate)


def _call(path: str, function, *args, secret: str | None = None):
    """Call into a keyring backend; any failure becomes a one-line ConfigError.

    During the call fd 0 is /dev/null: a third-party backend that prompts must never read the
    message (or the -bs session) from our stdin.
    """
    saved = os.dup(0)
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(null, 0)
        return function(*args)
    except Exception as exc:  # third-party plugins raise anything; the shim exits 78, not 70
        text = next(iter(str(exc).splitlines()), "")
        failure = f"{type(exc).__name__}: {_shorten(text.replace(secret, '***') if secret else text)}".rstrip(": ")
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        os.close(null)
    # raised outside the except block: the original exception may hold the password
    raise ConfigError(
        _("keyring backend {path} failed: {failure}").format(path=path, failure=failure),
        _("fix that backend, or unset SMTP_KEYRING_BACKEND to use sendmail-shim's credential file"),
    )
