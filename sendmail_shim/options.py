"""The sendmail command line → `Options` (pure).

Short options follow sendmail/Postfix getopt rules: options cluster (``-ti``), an option's
argument may be glued (``-fbob@x``) or the next word (``-f bob@x``), and the first word that is
not an option ends the options (so ``sendmail-shim root -v`` mails "root" and "-v" is refused as an
address, as with Postfix). Administration uses long options only, so it never collides with a
recipient: ``sendmail-shim root`` always mails root.
"""

from types import SimpleNamespace

from . import envelope as dsn
from .errors import UsageError
from .i18n import _

# Options every sendmail implementation accepts and that change nothing here (Postfix's list plus
# sendmail 8's -d); the value is True when the option takes an argument.
_IGNORED = {
    "A": True, "B": True, "d": True, "e": True, "h": True, "L": True, "O": True, "p": True,
    "c": False, "G": False, "m": False, "n": False, "U": False, "x": False,
}
_WITH_ARGUMENT = {"f", "r", "F", "N", "R", "V", "o", "b", "X", "C"} | {k for k, v in _IGNORED.items() if v}
_NO_ARGUMENT = {"t", "i", "v", "I"} | {k for k, v in _IGNORED.items() if not v}

_DELIVERY_FLAGS = {"b": "background", "i": "interactive", "q": "queue", "d": "queue"}

# Long options: name → takes a value.
LONG_OPTIONS = {
    "check": False, "to": True, "set-password": False, "delete-password": False, "oauth2-login": False,
    "config": True, "show": True, "delete": True, "retry": True, "requeue": True,
    "account": True,  # --set-password, --delete-password, --oauth2-login, --check: of accounts.d/NAME.env
    "version": False, "help": False, "setup": False,
    "due": False,  # -q --due: only messages whose next-attempt time has come (automatic runs)
    # --setup's answers (each also an environment variable of the config key), and its flags
    "provider": True, "user": True, "host": True, "port": True, "security": True, "ca-file": True,
    "from-policy": True, "aliases": True, "password-command": True, "senders": True, "users": True,
    "password-stdin": False, "yes": False, "no-check": False,
}
_ACTIONS = ("check", "set-password", "delete-password", "oauth2-login", "show", "delete", "retry", "requeue",
            "version", "help", "setup")
SETUP_KEYS = {
    "provider": "SMTP_PROVIDER", "user": "SMTP_USER", "host": "SMTP_HOST", "port": "SMTP_PORT",
    "security": "SMTP_SECURITY", "ca-file": "SMTP_CA_FILE", "from-policy": "SMTP_FROM_POLICY",
    "aliases": "SMTP_ALIASES", "password-command": "SMTP_PASSWORD_COMMAND",
    "senders": "SMTP_ACCOUNT_SENDERS", "users": "SMTP_ACCOUNT_USERS",  # --setup --account NAME
}
_SETUP_FLAGS = ("password-stdin", "yes", "no-check")
ACCOUNT_ACTIONS = ("check", "set-password", "delete-password", "oauth2-login", "setup")


class Options(SimpleNamespace):
    """What the command line asks for: `parse` fills it in; keyword arguments change defaults."""

    def __init__(self, **changes):
        super().__init__(
            # send | smtp (-bs) | list (-bp) | run-queue (-q) | daemon (-bd) | newaliases | an admin action
            mode="send",
            extract_recipients=False,  # -t
            dot_ends=True,  # cleared by -i / -oi
            requested_sender=None,  # -f / -r: the sender the caller asked for (the login is sent)
            full_name=None,  # -F
            recipients=[],
            verbose=0,  # -v (repeatable)
            delivery=None,  # -odb / -odi / -odq
            dsn_notify=None,  # -N
            dsn_ret=None,  # -R
            envid=None,  # -V
            queue_filter=None,  # -qR… / -qS… / -qI…: (kind, substring)
            due_only=False,  # -q --due: honour the backoff (the runner service); bare -q tries everything
            config_path=None,  # --config
            account=None,  # --account NAME
            check_to=None,  # --check --to
            setup_answers={},  # --setup --user … → {"SMTP_USER": …}
            setup_flags=set(),  # --password-stdin, --yes, --no-check
            target=None,  # argument of --show/--delete/--retry/--requeue
        )
        self.__dict__.update(changes)


def parse(argv: list[str], program: str = "sendmail-shim") -> Options:
    """Parse argv (without argv[0]); `program` is argv[0]'s base name (mailq, newaliases…)."""
    opts = Options()
    if program == "mailq":
        opts.mode = "list"
    elif program == "newaliases":
        opts.mode = "newaliases"
    words = list(argv)
    while words:
        word = words.pop(0)
        if word == "--":
            opts.recipients.extend(words)
            break
        if word.startswith("--"):
            _long_option(opts, word, words)
        elif word.startswith("-") and len(word) > 1:
            _short_cluster(opts, word, words)
        else:
            opts.recipients.append(word)
            opts.recipients.extend(words)
            break
    _check_combination(opts)
    return opts


def _long_option(opts: Options, word: str, words: list[str]) -> None:
    name, eq, value = word[2:].partition("=")
    if name not in LONG_OPTIONS:
        raise UsageError(_("unknown option --{name} (see sendmail-shim --help)").format(name=name))
    if LONG_OPTIONS[name]:
        if not eq:
            if not words:
                raise UsageError(_("--{name} needs a value").format(name=name))
            value = words.pop(0)
    elif eq:
        raise UsageError(_("--{name} takes no value").format(name=name))
    if name == "config":
        opts.config_path = value
    elif name == "account":
        opts.account = value
    elif name == "to":
        opts.check_to = value
    elif name in SETUP_KEYS:
        opts.setup_answers[SETUP_KEYS[name]] = value
    elif name in _SETUP_FLAGS:
        opts.setup_flags.add(name)
    elif name == "due":
        opts.due_only = True
    else:
        if opts.mode not in ("send",):
            raise UsageError(_("--{name} cannot be combined with another action").format(name=name))
        opts.mode = name
        if LONG_OPTIONS[name]:
            opts.target = value


def _short_cluster(opts: Options, word: str, words: list[str]) -> None:
    pos = 1
    while pos < len(word):
        letter, rest = word[pos], word[pos + 1:]
        if letter == "q":  # -q takes only a glued argument: a bare -q must not eat a recipient
            _queue_run(opts, rest)
            return
        if letter in _NO_ARGUMENT:
            _flag(opts, letter)
            pos += 1
            continue
        if letter not in _WITH_ARGUMENT:
            raise UsageError(_("unknown option -{letter}").format(letter=letter))
        if rest:
            value = rest
        elif words:
            value = words.pop(0)
        else:
            raise UsageError(_("option -{letter} needs an argument").format(letter=letter))
        _with_argument(opts, letter, value)
        return


def _flag(opts: Options, letter: str) -> None:
    if letter == "t":
        opts.extract_recipients = True
    elif letter == "i":
        opts.dot_ends = False
    elif letter == "v":
        opts.verbose += 1
    elif letter == "I":
        opts.mode = "newaliases"


def _with_argument(opts: Options, letter: str, value: str) -> None:
    if letter in ("X", "C"):
        # PHP mail()'s 5th argument reaches argv: -X/-C would write or read files (CVE-2016-10033).
        raise UsageError(_("refusing -{letter} {value}: sendmail-shim never writes log files or reads configuration "
                           "named on its command line").format(letter=letter, value=value))
    if letter in ("f", "r"):
        opts.requested_sender = value.strip()
    elif letter == "F":
        opts.full_name = value
    elif letter == "o":
        _o_option(opts, value)
    elif letter == "b":
        _b_option(opts, value)
    elif letter == "N":
        opts.dsn_notify = dsn.dsn_notify(value)
        if not opts.dsn_notify:
            raise UsageError(_("-N {value}: expected never, or a list of success, failure, delay").format(value=value))
    elif letter == "R":
        opts.dsn_ret = dsn.dsn_ret(value)
        if not opts.dsn_ret:
            raise UsageError(_("-R {value}: expected hdrs or full").format(value=value))
    elif letter == "V":
        opts.envid = dsn.envid(value)
        if not opts.envid:
            raise UsageError(_("-V: the envelope id must be printable ASCII without space, '+' or '='"))


def _o_option(opts: Options, value: str) -> None:
    if value == "i":
        opts.dot_ends = False
    elif value.startswith("d") and len(value) == 2:
        if value[1] not in _DELIVERY_FLAGS:
            raise UsageError(_("-o{value}: delivery mode must be b, i, q or d").format(value=value))
        opts.delivery = _DELIVERY_FLAGS[value[1]]
    # Every other -oX (error mode -oem, -oQ queue dir, …) is accepted and ignored: the queue,
    # error handling and configuration are ours to decide, never the caller's.


def _b_option(opts: Options, value: str) -> None:
    modes = {"m": "send", "s": "smtp", "p": "list", "i": "newaliases", "d": "daemon"}
    if value not in modes:
        raise UsageError(_("-b{value} is not supported (supported: -bm, -bs, -bp, -bi, -bd)").format(value=value))
    opts.mode = modes[value]


def _queue_run(opts: Options, rest: str) -> None:
    opts.mode = "run-queue"
    if rest[:1] in ("R", "S", "I"):
        if len(rest) < 2:
            raise UsageError(_("-q{letter} needs a substring to match").format(letter=rest[:1]))
        opts.queue_filter = (rest[0], rest[1:])
    # -q with an interval (-q30m) or -qf: one queue run now, of every queued message whatever its
    # backoff (sendmail 8's -q, Postfix's postqueue -f); sendmail-shim -q is no daemon.


def _check_combination(opts: Options) -> None:
    if opts.check_to and opts.mode != "check":
        raise UsageError(_("--to goes with --check"))
    if opts.account and opts.mode not in ACCOUNT_ACTIONS:
        raise UsageError(_("--account goes with --check, --setup, --set-password, --delete-password or "
                           "--oauth2-login"))
    if opts.due_only and (opts.mode != "run-queue" or opts.queue_filter):
        raise UsageError(_("--due goes with a plain -q (-qR, -qS and -qI try what they select at once)"))
    if (opts.setup_answers or opts.setup_flags) and opts.mode != "setup":
        raise UsageError(_("--provider, --user, --yes and the other answers of --setup go only with --setup"))
    if opts.mode in _ACTIONS and opts.recipients:
        raise UsageError(_("--{name} takes no recipients (got {recipient!r})").format(
            name=opts.mode, recipient=opts.recipients[0]))
