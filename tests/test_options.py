"""The sendmail command line, as real callers write it (shared/notes/clients.md)."""

import pytest

from sendmail_shim.errors import EX_USAGE, UsageError
from sendmail_shim.options import parse

CALLERS = [
    ("php mail()", "-t -i", dict(extract_recipients=True, dot_ends=False)),
    ("php 5th arg", "-t -i -fenvelope@example.com", dict(requested_sender="envelope@example.com")),
    ("phpmailer", "-t -i -oi -ffrom@example.com -t",
     dict(extract_recipients=True, dot_ends=False, requested_sender="from@example.com")),
    ("symfony -t", "-i -ffrom@example.com -- to@example.com cc@example.com",
     dict(dot_ends=False, recipients=["to@example.com", "cc@example.com"], extract_recipients=False)),
    ("git send-email", "-oem -f bounce@example.com -i to@example.com",
     dict(requested_sender="bounce@example.com", recipients=["to@example.com"], dot_ends=False)),
    ("debian cron", "-FCronDaemon -i -B8BITMIME -oem ops@example.com,second@example.com",
     dict(full_name="CronDaemon", recipients=["ops@example.com,second@example.com"])),
    ("cronie", "-FCronDaemon -i -odi -oem -oi -t -f root",
     dict(delivery="interactive", requested_sender="root", extract_recipients=True)),
    ("anacron", "-FAnacron -odi root",
     dict(full_name="Anacron", delivery="interactive", recipients=["root"], dot_ends=True)),
    ("bsd-mailx", "-i -t -f from@example.com -m -v", dict(verbose=1, requested_sender="from@example.com")),
    ("mailutils", "-oi -f from@example.com -t", dict(extract_recipients=True)),
    ("mutt", "-oem -oi -B8BITMIME -f from@example.com -N failure,delay -R hdrs -- to@example.com",
     dict(dsn_notify="DELAY,FAILURE", dsn_ret="HDRS", recipients=["to@example.com"])),
    ("logwatch", "-t", dict(extract_recipients=True, dot_ends=True)),
    ("clustered", "-ti", dict(extract_recipients=True, dot_ends=False)),
    ("-r", "-r bob@example.com x@y.z", dict(requested_sender="bob@example.com")),
    ("-bm", "-bm root", dict(mode="send", recipients=["root"])),
    ("ignored with args", "-A m -L tag -h 17 -p smtp -O x=y -e m -d0.1 -G -U -n -c -x -Vabc root", dict(envid="abc")),
    ("-odb -odq", "-odb -odq root", dict(delivery="queue")),
    ("-bs", "-bs", dict(mode="smtp")),
    ("laravel", "-bs -i", dict(mode="smtp", dot_ends=False)),
    ("-bp", "-bp", dict(mode="list")),
    ("-bi", "-bi", dict(mode="newaliases")),
    ("-I", "-I", dict(mode="newaliases")),
    ("-q", "-q", dict(mode="run-queue", queue_filter=None, due_only=False)),
    ("-q30m", "-q30m", dict(mode="run-queue", queue_filter=None, due_only=False)),
    ("-qf", "-qf", dict(mode="run-queue", queue_filter=None, due_only=False)),
    ("-q --due", "-q --due", dict(mode="run-queue", due_only=True)),
    ("--due -q -v", "--due -q -v", dict(mode="run-queue", due_only=True, verbose=1)),
    ("-qR", "-qRexample.com", dict(mode="run-queue", queue_filter=("R", "example.com"))),
    ("-q -v", "-q -v", dict(mode="run-queue", verbose=1)),
    ("admin is never a recipient", "root", dict(mode="send", recipients=["root"])),
    ("recipients end options", "root -v", dict(recipients=["root", "-v"], verbose=0)),
    ("check", "--check --to a@b.c", dict(mode="check", check_to="a@b.c")),
    ("config", "--config=/x.env -t", dict(config_path="/x.env", extract_recipients=True)),
    ("show", "--show ABC", dict(mode="show", target="ABC")),
]


@pytest.mark.parametrize("argv, expected", [c[1:] for c in CALLERS], ids=[c[0] for c in CALLERS])
def test_callers(argv, expected):
    opts = parse(argv.split())
    for name, value in expected.items():
        assert getattr(opts, name) == value, name


@pytest.mark.parametrize(
    "argv, fragment",
    [
        ("-X /var/www/shell.php", "refusing -X"),
        ("-X/tmp/log", "refusing -X"),
        ("-C /etc/passwd", "refusing -C"),
        ("-t -i -Z", "unknown option -Z"),
        ("-f", "-f needs an argument"),
        ("-bx", "-bx is not supported"),
        ("-bv root", "-bv is not supported"),
        ("-N sometimes", "-N sometimes"),
        ("-N never,failure", "-N never,failure"),
        ("-R body", "-R body"),
        ("-V a=b", "-V"),
        ("-oda", "delivery mode"),
        ("-qR", "-qR needs"),
        ("--due", "--due goes with a plain -q"),
        ("-t --due root", "--due goes with a plain -q"),
        ("-qRexample.com --due", "--due goes with a plain -q"),
        ("-q --due=yes", "takes no value"),
        ("--frobnicate", "unknown option --frobnicate"),
        ("--check root", "takes no recipients"),
        ("--to a@b.c", "--to goes with --check"),
        ("--check --set-password", "cannot be combined"),
        ("--version=1", "takes no value"),
        ("--show", "--show needs a value"),
    ],
)
def test_refused(argv, fragment):
    with pytest.raises(UsageError) as info:
        parse(argv.split())
    assert fragment in str(info.value)
    assert info.value.exit_code == EX_USAGE


def test_program_name_selects_mode():
    assert parse([], "mailq").mode == "list"
    assert parse([], "newaliases").mode == "newaliases"
    assert parse(["-t"], "sendmail").mode == "send"


def test_oQ_queue_directory_from_caller_is_ignored():
    # CVE-2016-10033 family: -oQ/tmp/ -X/var/www/x.php through PHP's 5th argument.
    opts = parse(["-t", "-i", "-oQ/tmp/", "-fa@b.c"])
    assert opts.requested_sender == "a@b.c" and opts.delivery is None
