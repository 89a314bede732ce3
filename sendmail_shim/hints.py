"""The integration hints `--setup` ends with: what /usr/sbin/sendmail, PHP and cron will do with
mail, and the lines to add to their files. Reads those files; edits nothing."""

import glob
import os
import sys

from .i18n import _

_PHP_DEFAULT = "/usr/sbin/sendmail -t -i"


def program() -> str:
    """This program's path, as the lines to add should name it."""
    return os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else "/usr/bin/sendmail-shim"


def integration_hints(config, program: str, root: str = "/") -> list:
    """What /usr/sbin/sendmail, PHP and cron will do with mail, and the lines to add (no edits)."""
    return [*_sendmail_hints(program, root), *_php_hints(program, root), *_cron_hints(config, root)]


def _is_us(path: str, program: str) -> bool:
    if os.path.realpath(path) == os.path.realpath(program):
        return True
    try:
        with open(path, "rb") as stream:
            return b"sendmail_shim" in stream.read(4096)  # a console-script wrapper
    except OSError:
        return False


def _sendmail_hints(program: str, root: str) -> list:
    sendmail = os.path.join(root, "usr/sbin/sendmail")
    if not os.path.lexists(sendmail):
        return [_("/usr/sbin/sendmail is missing, so cron, mail and PHP's default cannot send: install "
                  "the sendmail-shim-mta package, or run: ln -s {program} /usr/sbin/sendmail").format(program=program)]
    if _is_us(sendmail, program):
        return [_("/usr/sbin/sendmail is sendmail-shim: cron, mail and PHP's default use it")]
    return [_("/usr/sbin/sendmail belongs to another MTA ({target}): install sendmail-shim-mta to "
              "replace it, or point each program at {program}").format(
                  target=os.path.realpath(sendmail), program=program)]


def _php_hints(program: str, root: str) -> list:
    hints = []
    sendmail_is_us = _is_us(os.path.join(root, "usr/sbin/sendmail"), program)
    inis = sorted(glob.glob(os.path.join(root, "etc/php/*/*/php.ini")))
    inis += [p for p in (os.path.join(root, "etc/php.ini"), os.path.join(root, "usr/local/etc/php/php.ini"))
             if os.path.isfile(p)]
    for ini in inis:
        sources = [ini, *sorted(glob.glob(os.path.join(os.path.dirname(ini), "conf.d", "*.ini")))]
        found = [(p, v) for p in sources for v in _php_settings(p)]
        where, value = found[-1] if found else (ini, None)  # the last one read wins
        shown = "/" + os.path.relpath(where, root)
        command = (value or _PHP_DEFAULT).split()
        ours = command and (_is_us(command[0], program) or (command[0] == "/usr/sbin/sendmail" and sendmail_is_us))
        if ours:
            hints.append(_("{file}: sendmail_path = {value} — sendmail-shim").format(
                file=shown, value=value or _("(default) {value}").format(value=_PHP_DEFAULT)))
        else:
            hints.append(_("{file}: sendmail_path = {value} — add this line: "
                           "sendmail_path = \"{program} -t -i\"").format(
                file=shown, value=value or _("(default) {value}").format(value=_PHP_DEFAULT), program=program))
    return hints


def _php_settings(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as stream:
            lines = stream.read().splitlines()
    except OSError:
        return []
    values = []
    for line in lines:
        name, sep, value = line.strip().partition("=")
        if sep and name.strip() == "sendmail_path":
            values.append(value.strip().strip('"\''))
    return values


def _cron_hints(config, root: str) -> list:
    files = [os.path.join(root, "etc/crontab"), *sorted(glob.glob(os.path.join(root, "etc/cron.d/*"))),
             *sorted(glob.glob(os.path.join(root, "var/spool/cron/crontabs/*")))]
    names, hints = set(), []
    for path in filter(os.path.isfile, files):
        mailto = [line.partition("=")[2].strip().strip('"\'') for line in _lines(path)
                  if line.replace(" ", "").startswith("MAILTO=")]
        shown = "/" + os.path.relpath(path, root)
        for value in mailto:
            hints.append(_("{file}: cron mails job output to MAILTO={value}").format(file=shown, value=value or '""'))
            names.update(w.strip() for w in value.split(",") if w.strip() and "@" not in w)
        if not mailto and path.startswith(os.path.join(root, "var/spool/cron/crontabs")):
            names.add(os.path.basename(path))  # without MAILTO, cron mails the crontab's owner
    names.add("root")  # /etc/crontab and /etc/cron.d jobs run as root by default
    missing = sorted(n for n in names if n.lower() not in config.aliases)
    if missing and "default" not in config.aliases and config.local_mail == "refuse":
        hints.append(_("no alias for the local names {names}: their mail is refused (SMTP_LOCAL_MAIL=refuse); "
                       "add them to SMTP_ALIASES, e.g. SMTP_ALIASES={example}").format(
                           names=", ".join(missing), example=f"{missing[0]}:you@example.com,default:you@example.com"))
    elif missing and "default" not in config.aliases:
        hints.append(_("no alias for the local names {names}: their mail goes to the login {login} "
                       "(SMTP_LOCAL_MAIL=login); SMTP_ALIASES sends it elsewhere, e.g. SMTP_ALIASES={example}").format(
                           names=", ".join(missing), login=config.sender,
                           example=f"{missing[0]}:you@example.com,default:you@example.com"))
    return hints


def _lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as stream:
            return [line.strip() for line in stream]
    except OSError:
        return []
