"""`--setup`: from a bare server to a verified mail path in one command.

On a terminal it asks for the provider, the login, the password (no echo, stored through the
configured credential backend, never in the file), the sender policy and root's address, with
the provider's own instructions at the right moment; re-running it edits the current settings.
Without a terminal (or with ``--yes``) it prompts for nothing: every answer comes from an option
or the environment variable of its key (``SENDMAIL_SHIM_SMTP_USER`` for SMTP_USER, see
`config.env_name`; an application's own SMTP_USER is not an answer). Then it writes the config
file (comments kept, a backup of the previous one), runs ``--check``, and prints the integration
hints it detects (php.ini, /usr/sbin/sendmail, cron's MAILTO) without changing anything.
"""

import io
import os
import re
import time

from . import accounts, credentials, fsio, oauth2, providers
from . import config as config_module
from . import hints as hints_module
from .guidance import GUIDANCE, REGISTRATION
from .errors import EX_OK, CantCreate, ConfigError, ShimError, UsageError
from .i18n import _, describe, localize
from .options import SETUP_KEYS
from .secret import Secret

# The OAuth2 answers come from the terminal or the environment (SENDMAIL_SHIM_SMTP_OAUTH2_CLIENT_ID, …)
_OAUTH2_KEYS = ("SMTP_AUTH", "SMTP_OAUTH2_FLOW", "SMTP_OAUTH2_TENANT", "SMTP_OAUTH2_CLIENT_ID")
ANSWER_KEYS = (*SETUP_KEYS.values(), *(key for key in _OAUTH2_KEYS if key not in SETUP_KEYS.values()))
_YES = ("y", "yes", "是", "好")
_FLOW_WORDS = {"delegated": "refresh_token", "app-only": "client_credentials"}
_RELAY_KEYS = ("SMTP_HOST", "SMTP_PORT", "SMTP_SECURITY", "SMTP_CA_FILE")  # set by a preset

def run(opts, stdin, stdout, stderr, environ) -> int:
    main_path = target_file(opts.config_path, environ)
    path = accounts.file_for(main_path, opts.account) if opts.account else main_path
    if opts.account and not os.path.exists(main_path):
        raise UsageError(_("set up the main configuration first: sendmail-shim --setup"))
    build = _account_builder(opts.account, main_path, environ) if opts.account else _config_for
    current = config_module.read_file(path) if os.path.exists(path) else {}
    given = {key: environ[config_module.env_name(key)] for key in ANSWER_KEYS
             if environ.get(config_module.env_name(key))}
    given.update(opts.setup_answers)
    ui = Dialogue(stdin, stdout, environ)
    interactive = stdin.isatty() and "yes" not in opts.setup_flags
    if interactive:
        values, password = _ask(ui, path, current, given, environ, build, opts.account)
    else:
        values = settle(current, given)
        _require(values)
        password = credentials.read_new_password(stdin, stderr) if "password-stdin" in opts.setup_flags else None
    config = build(values, environ, path)
    if _needs_secret(config) and not config.password_command and password is None and not _stored(config, environ):
        raise UsageError(
            _("no password for {user}: give it on stdin with --password-stdin, "
              "or set SMTP_PASSWORD_COMMAND").format(user=config.user)
        )
    if password is not None:
        where = credentials.set_password(config, password, environ)
        ui.say(_("password for {user} stored in {where}").format(user=config.user, where=where))
    old_text = _read_text(path)
    if opts.account and old_text is None:
        fsio.mkdir(os.path.dirname(path), 0o755, 0, 0) if os.geteuid() == 0 else os.makedirs(os.path.dirname(path),
                                                                                             exist_ok=True)
    text = old_text or (_("# sendmail-shim account {name} (README: Several accounts and failover)\n").format(
        name=opts.account) if opts.account else template())
    backup = write_config(path, render(text, {k: values.get(k) for k in ANSWER_KEYS}))
    ui.say(_("wrote {path}").format(path=path) if not backup else
           _("wrote {path} (previous version: {backup})").format(path=path, backup=backup))
    if config.auth != "password" and config.oauth2_flow == "refresh_token":
        _offer_login(ui, config_module.load(environ, main_path).for_account(opts.account), interactive, environ)
    status = EX_OK
    if "no-check" not in opts.setup_flags:
        # as the shim reads it: each value's origin is file:line
        config = config_module.load(environ, main_path).for_account(opts.account)
        status = _check(ui, config, environ)
    hints = [] if opts.account else hints_module.integration_hints(config, hints_module.program())
    if hints:
        ui.say()
        ui.say(_("Integration (nothing was changed):"))
        for hint in hints:
            ui.say("  - " + localize(hint, environ))
    return status


def target_file(explicit: str | None, environ) -> str:
    """--config / SENDMAIL_SHIM_CONFIG, else the system file for root, else the user's file."""
    if explicit or environ.get("SENDMAIL_SHIM_CONFIG"):
        return explicit or environ["SENDMAIL_SHIM_CONFIG"]
    return config_module.config_files(environ, None)[0 if os.geteuid() == 0 else -1]


def settle(current: dict, given: dict) -> dict:
    """The new settings: given answers over current ones; a preset drops host, port and so on
    unless they are given, so that switching from a custom relay to a preset takes effect."""
    values = {**current, **given}
    if values.get("SMTP_PROVIDER", "custom").lower() in providers.PRESETS:
        for key in _RELAY_KEYS:
            if key not in given:
                values.pop(key, None)
    return {key: value for key, value in values.items() if value != ""}


def _require(values: dict) -> None:
    if not values.get("SMTP_USER") or not (values.get("SMTP_HOST") or values.get("SMTP_PROVIDER")):
        raise UsageError(
            _("without a terminal, --setup needs --provider (or --host) and --user, or SENDMAIL_SHIM_SMTP_PROVIDER "
              "and SENDMAIL_SHIM_SMTP_USER in the environment")
        )


class Dialogue:
    """Questions and answers on the terminal, in the admin's language."""

    def __init__(self, stdin, out, environ):
        self.stdin, self.out, self.environ = stdin, out, environ

    def say(self, text="") -> None:
        print(localize(text, self.environ), file=self.out, flush=True)

    def ask(self, question, default: str | None = None, check=None) -> str:
        """Ask until the answer passes ``check`` (which raises a ShimError to explain why not)."""
        while True:
            prompt = (_("{question} [{default}]: ").format(question=question, default=default) if default
                      else _("{question}: ").format(question=question))
            self.out.write(localize(prompt, self.environ))
            self.out.flush()
            line = self.stdin.readline()
            if not line:
                raise UsageError(_("setup cancelled; nothing was changed"))
            answer = (line.decode("utf-8", "replace") if isinstance(line, bytes) else line).strip() or default
            if not answer:
                self.say(_("an answer is needed"))
                continue
            try:
                if check:
                    check(answer)
                return answer
            except ShimError as exc:
                self.say(describe(exc, self.environ))

    def secret(self, prompt) -> str:
        import getpass

        try:
            return getpass.getpass(localize(prompt, self.environ), stream=self.out)
        except EOFError:
            raise UsageError(_("setup cancelled; nothing was changed")) from None


def _ask(ui: Dialogue, path: str, current: dict, given: dict, environ, build, account: str | None):
    """The interactive questions; returns (settings, new password or None)."""
    values = dict(current)
    check = lambda key: lambda answer: config_module.build({key: answer}, environ)  # noqa: E731
    ui.say(_("sendmail-shim setup: the answers go to {path}. Enter keeps the value in [brackets].").format(path=path))
    ui.say()
    provider = given.get("SMTP_PROVIDER") or ui.ask(
        _("Mail provider ({choices})").format(choices=", ".join(providers.PROVIDERS)),
        current.get("SMTP_PROVIDER"), check("SMTP_PROVIDER")).lower()
    values["SMTP_PROVIDER"] = provider
    if provider == "custom":
        values["SMTP_HOST"] = given.get("SMTP_HOST") or ui.ask(_("Relay host name"), current.get("SMTP_HOST"))
        security = given.get("SMTP_SECURITY") or ui.ask(
            _("Security: tls (implicit TLS, port 465), starttls (port 587) or none"),
            current.get("SMTP_SECURITY") or "starttls", check("SMTP_SECURITY")).lower()
        values["SMTP_SECURITY"] = security
        values["SMTP_PORT"] = given.get("SMTP_PORT") or ui.ask(
            _("Port"), current.get("SMTP_PORT") or str(providers.DEFAULT_PORTS[security]), check("SMTP_PORT"))
        ca_file = given.get("SMTP_CA_FILE") or ui.ask(
            _("CA certificate file (PEM) of a corporate relay, or 'system' for the system CAs"),
            current.get("SMTP_CA_FILE") or "system", _readable_file)
        values["SMTP_CA_FILE"] = "" if ca_file == "system" else ca_file
    else:
        if provider in GUIDANCE:
            ui.say(GUIDANCE[provider].format(provider=provider))
        values.update({k: given.get(k, "") for k in _RELAY_KEYS})
    ui.say()
    values["SMTP_USER"] = given.get("SMTP_USER") or ui.ask(
        _("Login (the full mailbox address, also the sender of every message)"),
        current.get("SMTP_USER"), check("SMTP_USER"))
    password = None
    method = _login_method(ui, provider, current, given, check("SMTP_AUTH"))
    if method:
        values["SMTP_AUTH"] = method
    if method and method != "password":
        password = _ask_oauth2(ui, provider, values, current, given, lambda: build(values, environ, path))
    elif "SMTP_PASSWORD_COMMAND" in given:
        values["SMTP_PASSWORD_COMMAND"] = given["SMTP_PASSWORD_COMMAND"]
    elif not current.get("SMTP_PASSWORD_COMMAND"):
        password = _ask_password(ui, provider, build(values, environ, path), environ)
    if account:
        ui.say()
        for key, question in (("SMTP_ACCOUNT_SENDERS", _("Senders (-f or From:) that pick this account: "
                                                         "addresses or @domain, comma-separated")),
                              ("SMTP_ACCOUNT_USERS", _("Local users who may pick it (root always may)"))):
            values[key] = given.get(key) or ui.ask(question, current.get(key) or "")
    ui.say()
    ui.say(_("When a message's From: is not the login, sendmail-shim can rewrite it to the login "
             "(the original goes to Reply-To:) or reject the message."))
    values["SMTP_FROM_POLICY"] = given.get("SMTP_FROM_POLICY") or ui.ask(
        _("Sender policy: rewrite or reject"), current.get("SMTP_FROM_POLICY") or "rewrite",
        check("SMTP_FROM_POLICY")).lower()
    if "SMTP_ALIASES" in given:
        values["SMTP_ALIASES"] = given["SMTP_ALIASES"]
    else:
        aliases = config_module.parse_aliases(current.get("SMTP_ALIASES", ""))
        admin = ui.ask(_("Address for mail to root and other local users (cron, www-data)"),
                       aliases.get("root") or values["SMTP_USER"], check("SMTP_FROM"))
        aliases.update(root=admin, default=aliases.get("default", admin))
        values["SMTP_ALIASES"] = ",".join(f"{name}:{address}" for name, address in aliases.items())
    values = {key: value for key, value in values.items() if value != ""}
    ui.say()
    for key in ANSWER_KEYS:
        if key in values:
            ui.say(f"  {key}={values[key]}")
    answer = ui.ask(_("Write this configuration and test it? (yes/no)"), "yes")
    if answer.lower() not in _YES:
        raise UsageError(_("setup cancelled; nothing was changed"))
    return values, password


def _login_method(ui: Dialogue, provider: str, current: dict, given: dict, check) -> str | None:
    """SMTP_AUTH for a provider whose identity provider the shim knows (the preset's own choice
    first); None for the others, which log in with a password."""
    preset = providers.PRESETS.get(provider)
    if "SMTP_AUTH" in given or not preset or preset.family not in oauth2.IDPS:
        return given.get("SMTP_AUTH")
    choices = ("xoauth2", "password") if preset.auth != "password" else ("password", "xoauth2")
    return ui.ask(_("Login with {first} or {second} (password: the {name}; xoauth2: OAuth2, through an "
                    "application you register)").format(first=choices[0], second=choices[1],
                                                        name=preset.password_name),
                  current.get("SMTP_AUTH") or preset.auth, check).lower()


def _ask_oauth2(ui: Dialogue, provider: str, values: dict, current: dict, given: dict, config) -> Secret | None:
    """The application's registration, step by step, and its ids into `values`; the client
    secret when the flow needs one (app-only, and Google's desktop clients)."""
    family = providers.PRESETS[provider].family
    ask = lambda key, question, default=None, check=None: given.get(key) or ui.ask(  # noqa: E731
        question, current.get(key) or default, check)
    flow = "refresh_token"
    if family == "microsoft":
        known = {v: k for k, v in _FLOW_WORDS.items()}.get(current.get("SMTP_OAUTH2_FLOW"), "delegated")
        word = given.get("SMTP_OAUTH2_FLOW") or ui.ask(
            _("Flow: delegated (the mailbox's user logs in once) or app-only (the application's own permission, "
              "no person needed: for servers)"), known, _flow_word)
        flow = _FLOW_WORDS.get(word.lower(), word.lower())
    values["SMTP_OAUTH2_FLOW"] = flow
    ui.say()
    ui.say(REGISTRATION[family, flow].format(user=values["SMTP_USER"]))
    ui.say()
    if family == "microsoft":
        values["SMTP_OAUTH2_TENANT"] = ask(
            "SMTP_OAUTH2_TENANT", _("Directory (tenant) ID (delegated also: organizations, or consumers for "
                                    "Outlook.com)"), "organizations" if flow == "refresh_token" else None)
    values["SMTP_OAUTH2_CLIENT_ID"] = ask("SMTP_OAUTH2_CLIENT_ID", _("Application (client) ID"))
    if flow == "client_credentials" or family == "gmail":
        return _ask_password(ui, provider, config(), ui.environ, name=_("client secret"))
    return None


def _flow_word(answer: str) -> None:
    if answer.lower() not in (*_FLOW_WORDS, *_FLOW_WORDS.values()):
        raise UsageError(_("expected delegated or app-only"))


def _needs_secret(config) -> bool:
    """Whether AUTH needs a stored secret: a password, or an app-only client's (without a certificate)."""
    if config.auth == "password":
        return True
    return config.oauth2_flow == "client_credentials" and not config.oauth2_client_cert_file


def _offer_login(ui: Dialogue, config, interactive: bool, environ) -> None:
    """A delegated OAuth2 login is made once, by a person: offered on a terminal, else named."""
    if interactive and ui.ask(_("Log in now (sendmail-shim --oauth2-login)? (yes/no)"), "yes").lower() in _YES:
        where = oauth2.login(config, ui.stdin, ui.out, environ)
        ui.say(_("OAuth2 login of {user} stored in {where}").format(user=config.user, where=where))
    else:
        ui.say(_("then log in once: sendmail-shim --oauth2-login"))


def _ask_password(ui: Dialogue, provider: str, config, environ, name=None) -> Secret | None:
    preset = providers.PRESETS.get(provider)
    name = name or (preset.password_name if preset else _("password"))
    stored = _stored(config, environ)
    prompt = (_("{name} for {user} (hidden; Enter keeps the stored one): ") if stored
              else _("{name} for {user} (hidden): ")).format(name=name, user=config.user)
    while True:
        line = ui.secret(prompt)
        if line:
            return Secret(line)
        if stored:
            return None
        ui.say(_("an answer is needed"))


def _readable_file(answer: str) -> None:
    if answer != "system" and not os.path.isfile(answer):
        raise ConfigError(_("{path}: no such file").format(path=answer))


def _account_builder(name: str, main_path: str, environ):
    """`_config_for` for account `name`: its settings over the main configuration's shared ones."""
    main = config_module.load(environ, main_path)
    shared = accounts.shared_settings(config_module.read_file(main_path))
    return lambda values, environ, path: accounts.build(main, shared, values, name, path, environ)


def _config_for(values: dict, environ, path: str):
    """The Config the shim will use with these settings (the environment still overrides)."""
    merged = {**values, **{key: environ[config_module.env_name(key)] for key in config_module.KEYS
                           if config_module.env_name(key) in environ}}
    return config_module.build(merged, environ, (path,))


def _stored(config, environ) -> bool:
    try:
        credentials.get_secret(config, environ)
    except ConfigError:
        return False
    return True


def _check(ui: Dialogue, config, environ) -> int:
    """Run --check; on success only its verdict line, on failure all it printed."""
    from . import check

    ui.say()
    ui.say(_("testing the configuration (sendmail-shim --check) …"))
    out = io.StringIO()
    status = check.run(config, out, environ)
    lines = out.getvalue().rstrip("\n").splitlines()
    print("\n".join(lines if status != EX_OK else lines[-1:]), file=ui.out, flush=True)
    return status


# -- the config file --------------------------------------------------------------------------

_LINE = re.compile(r"^(#?)\s*(?:export\s+)?([A-Z][A-Z0-9_]*)\s*=")
_BARE = re.compile(r"[\w@.:,/+%-]*")


def template() -> str:
    """A new config file: every key commented out, with its documentation line."""
    head = (
        "# sendmail-shim configuration, written by sendmail-shim --setup.\n"
        "# KEY=value lines; # starts a comment. The environment variable SENDMAIL_SHIM_<KEY> overrides\n"
        "# KEY here (SENDMAIL_SHIM_SMTP_HOST for SMTP_HOST; SENDMAIL_SHIM_QUEUE_DIR for itself); an\n"
        "# application's own SMTP_HOST, SMTP_PASSWORD… change nothing. The password never goes here:\n"
        "# sendmail-shim --setup or --set-password stores it.\n"
        "# Test with: sendmail-shim --check --to you@example.com\n"
    )
    return head + "".join(f"\n# {doc}\n#{key}=\n" for key, doc in config_module.KEYS.items())


def render(text: str, updates: dict) -> str:
    """``text`` with each key of ``updates`` set (value) or commented out (None); the other lines,
    comments included, are kept as they are. A new key takes the place of its commented-out
    template line, else goes at the end."""
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    placed = set()
    for index, line in enumerate(lines):
        match = _LINE.match(line)
        if match and not match.group(1) and match.group(2) in updates:
            key = match.group(2)
            value = updates[key]
            lines[index] = f"#{line}" if value is None else f"{key}={quote(value)}\n"
            placed.add(key)
    for key, value in updates.items():
        if value is None or key in placed:
            continue
        slot = next((i for i, line in enumerate(lines)
                     if (m := _LINE.match(line)) and m.group(1) and m.group(2) == key), None)
        if slot is None:
            lines.append(f"{key}={quote(value)}\n")
        else:
            lines[slot] = f"{key}={quote(value)}\n"
    return "".join(lines)


def quote(value: str) -> str:
    """A dotenv value that python-dotenv (0.21 and later) reads back as ``value``."""
    if _BARE.fullmatch(value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8-sig") as stream:
            return stream.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(_("cannot read {path}: {reason}").format(path=path, reason=exc.strerror)) from None


def write_config(path: str, text: str) -> str | None:
    """Replace ``path`` atomically, keeping its mode and owner (new: 0644, no secrets in it);
    the previous version stays as ``path.bak-<timestamp>``, whose name is returned."""
    directory = os.path.dirname(os.path.abspath(path))
    backup = None

    def keep_old() -> None:  # the old file itself, mode and owner included
        nonlocal backup
        stamp = time.strftime("%Y%m%d-%H%M%S")
        backup, n = f"{path}.bak-{stamp}", 1
        while os.path.lexists(backup):
            backup, n = f"{path}.bak-{stamp}-{n}", n + 1
        os.link(path, backup)

    try:
        os.makedirs(directory, 0o755, exist_ok=True)
        try:
            old = os.stat(path)
        except FileNotFoundError:
            old = None
        fsio.write_atomic(path, text.encode("utf-8"), mode=old.st_mode & 0o7777 if old else 0o644,
                          owner=(old.st_uid, old.st_gid) if old and os.geteuid() == 0 else None,
                          temp=f"{path}.tmp-{os.getpid()}", before_rename=keep_old if old else None)
    except OSError as exc:
        raise CantCreate(_("cannot write {path}: {reason}").format(path=path, reason=exc.strerror)) from None
    return backup
