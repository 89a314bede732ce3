"""Entry point: `main()` is the only place that prints an error or chooses an exit status.

Modules are imported per mode so that every call of the sendmail path pays only for what it
uses (PHP and cron start one process per mail).
"""

import gc
import os
import sys

from . import __version__
from .errors import EX_OK, EX_SOFTWARE, EX_TEMPFAIL, ShimError
from .i18n import _, describe, localize

# The exit status of a command whose reader went away (`mailq | head -1`): a C program dies of
# SIGPIPE, which the shell reports as 128 + 13; Python ignores SIGPIPE and gets EPIPE instead.
EX_PIPE = 141

USAGE = _("""\
usage: sendmail-shim [-t] [-i|-oi] [-f sender] [-F name] [-odb|-odi|-odq] [-v] [--] [recipient ...]
       sendmail-shim -bs            SMTP on stdin/stdout (Symfony, Laravel, SwiftMailer)
       sendmail-shim -bp | mailq    list the queue
       sendmail-shim -bd            the submission service (as root or the service user)
       sendmail-shim -q [-v] [--due|-qR…|-qS…|-qI…]   deliver the queue now (--due: only what is due)
       sendmail-shim --check [--to ADDR]          test the configuration (and send a test mail)
       sendmail-shim --setup [--provider P --user ADDR --password-stdin --yes …]   guided setup
       sendmail-shim --set-password | --delete-password [--account NAME]
       sendmail-shim --oauth2-login [--account NAME]   log in once for SMTP_AUTH=xoauth2/oauthbearer
       sendmail-shim --check --account NAME   one account of accounts.d/ (--check alone checks them all)
       sendmail-shim --show ID | --delete ID|ALL | --retry ID|all | --requeue ID
       sendmail-shim --config FILE …   read only FILE (also SENDMAIL_SHIM_CONFIG)
       sendmail-shim --version | --help

Sendmail options that change nothing here are accepted: -bm -B -N -R -V -oX -eX -h -L -A -O -p
-G -U -m -n -x -c -d. -X and -C are refused. Configuration keys: see README.md.
""")


def main(argv=None, *, stdin=None, stdout=None, stderr=None, environ=None) -> int:
    argv = sys.argv if argv is None else argv
    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    environ = os.environ if environ is None else environ
    verbose, mode = False, None
    try:
        from . import options

        opts = options.parse(list(argv[1:]), os.path.basename(argv[0]) if argv else "")
        verbose, mode = opts.verbose > 0, opts.mode
        return run(opts, stdin, stdout, stderr, environ)
    except ShimError as exc:
        print(f"sendmail-shim: {describe(exc, environ)}", file=stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        interrupted = _("interrupted; nothing was accepted")
        print(f"sendmail-shim: {localize(interrupted, environ)}", file=stderr)
        return EX_TEMPFAIL
    except Exception as exc:  # a bug: still one line and a non-zero exit, never a lost message
        if isinstance(exc, BrokenPipeError) and mode not in (None, "send", "smtp"):
            return EX_PIPE  # `sendmail-shim --check | head -1`: the reader has all it wanted
        bug = _("internal error: {error}").format(error=f"{type(exc).__name__}: {exc}")
        print(f"sendmail-shim: {localize(bug, environ)}", file=stderr)
        if verbose:
            import traceback

            traceback.print_exc(file=stderr)
        return EX_SOFTWARE


def console() -> None:
    """The console script: `main`, then an exit without the interpreter's clean-up.

    Tearing down an interpreter that has loaded ssl and the email package takes ~25 ms, which
    every PHP mail() and cron call would wait for, and nothing needs it: when `main` returns, files
    are closed, threads joined and the background child detached. Only stdout and stderr are
    flushed (a reader that went away cannot be told anything more). The cyclic garbage collector
    is off until `run` knows the mode: the imports of a one-message call make no garbage worth
    ~6 ms of collecting.
    """
    gc.disable()
    code = main()
    try:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BrokenPipeError:  # `mailq | head -1`: what is left had no reader
                code = code or EX_PIPE
    finally:
        os._exit(code)


def run(opts, stdin, stdout, stderr, environ) -> int:
    """The program without error handling."""
    if opts.mode != "send":  # queue runs, -bs sessions, setup: long enough to need it
        gc.enable()
    if opts.mode == "help":
        stdout.write(localize(USAGE, environ))
        return EX_OK
    if opts.mode == "version":
        print(f"sendmail-shim {__version__}", file=stdout)
        return EX_OK
    if opts.mode == "newaliases":
        return EX_OK  # aliases live in SMTP_ALIASES; there is no database to rebuild

    if opts.mode == "setup":
        from . import wizard

        return wizard.run(opts, stdin, stdout, stderr, environ)
    from . import config as config_module

    try:
        config = config_module.load(environ, opts.config_path)
    except ShimError as exc:
        if opts.mode == "smtp":  # the application shows the greeting, not our stderr
            from . import bsmtp

            bsmtp.refuse_session(stdout, exc)
        raise
    if opts.mode == "send" and opts.verbose and not opts.delivery and config.delivery == "background":
        opts.delivery = "interactive"  # sendmail's -v: deliver now, in the foreground, and show the dialogue
    if opts.mode == "send":
        from . import submit

        return submit.submit(opts, config, stdin, stderr, environ)
    if opts.mode == "smtp":
        from . import bsmtp

        return bsmtp.serve(opts, config, stdin, stdout, stderr, environ)
    if opts.mode == "check":
        from . import check

        accounts = [config.for_account(opts.account)] if opts.account else [config, *config.accounts.values()]
        worst = EX_OK
        for account in accounts:
            if len(accounts) > 1:
                print(localize(_("account {name}:").format(name=account.account), environ), file=stdout, flush=True)
            to = opts.check_to if opts.account or account is config else None  # one test message
            worst = worst or check.run(account, stdout, environ, to=to, verbose=opts.verbose)
        return worst
    if opts.account:
        config = config.for_account(opts.account)
    if opts.mode == "daemon":
        from . import receiver

        return receiver.run(opts, config)
    if opts.mode in ("set-password", "delete-password"):
        return _password_command(opts.mode, config, stdin, stdout, stderr, environ)
    if opts.mode == "oauth2-login":
        from . import oauth2

        where = oauth2.login(config, stdin, stdout, environ)
        done = _("OAuth2 login of {user} stored in {where}").format(user=config.user, where=where)
        print(f"sendmail-shim: {localize(done, environ)}", file=stdout)
        return EX_OK
    from . import admin

    return admin.run(opts, config, stdout, stderr, environ)


def _password_command(mode, config, stdin, stdout, stderr, environ) -> int:
    from . import credentials

    if mode == "set-password":
        prompt = localize(_("Password for {user}: ").format(user=config.user), environ)
        secret = credentials.read_new_password(stdin, stderr, prompt=prompt)
        where = credentials.set_password(config, secret, environ)
        done = _("password for {user} stored in {where}").format(user=config.user, where=where)
    else:
        where = credentials.delete_password(config, environ)
        done = _("password for {user} removed from {where}").format(user=config.user, where=where)
    print(f"sendmail-shim: {localize(done, environ)}", file=stdout)
    return EX_OK
