"""Real clients (PHP, PHPMailer, Symfony, SwiftMailer, git, mail, mutt, swaks, cron's call) through
the shim to the test relay.

Each client gets the shim as its sendmail: a wrapper script that records the argv the client
passed and execs the shim from this checkout with the test's configuration, the way a system
install would be found. The clients come from Debian packages (`make test` installs them as
root); on a machine without one, its tests skip and name the package.
"""

import email
import email.policy
import json
import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from sendmail_shim import config
from tests.relay import RelayServer
from tests.shim import OUTPUTS, SHIM, SHIM_PYTHON, Shim

pytestmark = pytest.mark.e2e

CLIENTS = Path(__file__).parent / "clients"
SEP = "\x1f"  # between the recorded arguments of one call


def need(path: str, package: str) -> str:
    """The client's executable or file; else skip naming the Debian package that provides it —
    or fail under CI, where `make test` has installed them all and a skip would hide a gap."""
    found = shutil.which(path) if "/" not in path else (path if os.path.exists(path) else None)
    if not found:
        reason = f"{path} not found: install the Debian package {package} (make test does, as root)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def php(*libraries: tuple[str, str]) -> str:
    """The PHP interpreter, after checking the PHP libraries a script loads."""
    for path, package in libraries:
        need(path, package)
    return need("php", "php-cli")


PHPMAILER = ("/usr/share/php/libphp-phpmailer/autoload.php", "libphp-phpmailer")
SYMFONY = ("/usr/share/php/Symfony/Component/Mailer/autoload.php", "php-symfony-mailer")
SWIFT = ("/usr/share/php/Swift/swift_required.php", "php-swiftmailer")
MBSTRING = ("/usr/share/php8.2-mbstring", "php-mbstring")


def write_wrapper(path: Path, calls: Path, config_file: Path | None) -> Path:
    """A sendmail for clients: records its argv (one line per call), then execs the shim with
    `config_file` (None: the shim finds its configuration itself, as a system install does)."""
    lines = ["#!/bin/sh", f"printf '%s\\037' \"$@\" >> {shlex.quote(str(calls))}; echo >> {shlex.quote(str(calls))}"]
    if config_file is not None:
        lines.append(f"SENDMAIL_SHIM_CONFIG={shlex.quote(str(config_file))}; export SENDMAIL_SHIM_CONFIG")
    lines.append(f"exec {shlex.quote(SHIM_PYTHON)} {shlex.quote(str(SHIM))} \"$@\"")
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)
    return path


@dataclass
class Setup:
    """The shim configured for a relay, its wrapper, and a way to run a client in its home."""

    shim: Shim
    relay: RelayServer
    sendmail: Path
    calls_file: Path

    @property
    def home(self) -> Path:
        return self.shim.home

    def run(self, *argv, stdin: bytes = b"", env: dict | None = None, expect_exit: int | None = 0,
            exact_env: dict | None = None):
        environment = exact_env or {"PATH": "/usr/bin:/bin", "HOME": str(self.home), "LANG": "C.UTF-8", **(env or {})}
        proc = subprocess.run([str(a) for a in argv], input=stdin, capture_output=True, env=environment,
                              cwd=self.home, timeout=60)
        out, err = proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")
        OUTPUTS.extend([out, err])
        if expect_exit is not None:
            assert proc.returncode == expect_exit, f"{argv[0]} exited {proc.returncode}; stdout: {out} stderr: {err}"
        return proc

    def calls(self) -> list[list[str]]:
        """The argv (without argv[0]) of every call of the shim so far."""
        text = self.calls_file.read_text() if self.calls_file.exists() else ""
        return [line[:-1].split(SEP) if line else [] for line in text.split("\n")[:-1]]

    def php_mail(self, *ini: str, expect_exit: int = 0, **arguments):
        """PHP mail() (or mb_send_mail with mb=True) with sendmail_path = the shim -t -i."""
        return self.run(php(), "-d", f"sendmail_path={self.sendmail} -t -i", *[f"-d{s}" for s in ini],
                        CLIENTS / "php_mail.php", json.dumps(arguments), expect_exit=expect_exit)


@pytest.fixture
def setup_factory(shim_factory, relay):
    def make(target_relay=None, **overrides) -> Setup:
        overrides.setdefault("SENDMAIL_SHIM_DELIVERY", "interactive")  # the relay has it when the client returns
        overrides.setdefault("SMTP_ALIASES", "root:ops@example.com")
        shim = shim_factory(target_relay or relay, **overrides)
        calls = shim.home / "calls"
        wrapper = write_wrapper(shim.home / "sendmail", calls, shim.config_file)
        return Setup(shim, target_relay or relay, wrapper, calls)

    return make


@pytest.fixture
def setup(setup_factory) -> Setup:
    return setup_factory()


def delivered(setup: Setup, rcpts: list[str], index: int = -1) -> email.message.EmailMessage:
    """The relay's message with the shim's guarantees checked: envelope sender = login, the
    expected recipients, CRLF only, From = login, no Bcc, Date and Message-ID present."""
    msg = setup.relay.messages[index]
    assert msg.mail_from == setup.relay.login == msg.login
    assert msg.rcpt_tos == rcpts
    assert b"\r" not in msg.data.replace(b"\r\n", b"") and b"\n" not in msg.data.replace(b"\r\n", b""), "bare CR or LF"
    parsed = email.message_from_bytes(msg.data, policy=email.policy.default)
    assert [a.addr_spec for a in parsed["From"].addresses] == [setup.relay.login]
    assert "Bcc" not in parsed and b"bcc@" not in msg.data.lower()
    assert parsed["Date"] and parsed["Message-ID"]
    return parsed


def body_of(msg) -> bytes:
    return msg.data.split(b"\r\n\r\n", 1)[1]


def text_of(parsed) -> str:
    """The decoded text, LF line ends, without the trailing line breaks: mail() and the SMTP
    clients (Symfony, Swift) add one after the body, as they would for any MTA."""
    return parsed.get_body(("plain",)).get_content().replace("\r\n", "\n").rstrip("\n")


def sent_lines(setup: Setup) -> list[str]:
    return [line for line in setup.shim.log_lines() if "status=sent" in line]


# --- PHP mail() -------------------------------------------------------------------------------


def test_php_mail_plain(setup):
    setup.php_mail(to="to@example.com, Two <two@example.com>", subject="PHP mail", body="line1\nline2",
                   headers="From: Site <www-data@web1.example>\r\nCc: cc@example.com\r\nBcc: bcc@example.com")
    assert setup.calls() == [["-t", "-i"]]
    parsed = delivered(setup, ["to@example.com", "two@example.com", "cc@example.com", "bcc@example.com"])
    assert parsed["Subject"] == "PHP mail" and parsed["Reply-To"] == "Site <www-data@web1.example>"
    assert body_of(setup.relay.messages[0]) == b"line1\r\nline2\r\n"


def test_php_mail_fifth_argument_is_only_the_requested_sender(setup):
    setup.php_mail(to="to@example.com", subject="with -f", body="x", headers="From: someone@example.com",
                   params="-fsomeone@example.com")
    assert setup.calls() == [["-t", "-i", "-fsomeone@example.com"]]
    delivered(setup, ["to@example.com"])
    [line] = sent_lines(setup)
    msg_id = line.split("]: ", 1)[1].split(":")[0]
    log = setup.shim.log_lines()  # pickup: the sender asked for; qmgr: the one used
    assert any(line.endswith(f"]: {msg_id}: uid={os.getuid()} from=<someone@example.com>") for line in log)
    assert any(f"]: {msg_id}: from=<{setup.relay.login}>, size=" in line for line in log)


def test_php_mb_send_mail_chinese_subject_and_body(setup):
    php(MBSTRING)
    setup.php_mail(mb=True, to="to@example.com", subject="欢迎注册：测试邮件", body="你好，世界！\n第二行\n",
                   headers="From: 网站 <www-data@web1.example>")
    parsed = delivered(setup, ["to@example.com"])
    assert parsed["Subject"] == "欢迎注册：测试邮件"
    assert text_of(parsed) == "你好，世界！\n第二行"
    assert parsed["From"].addresses[0].display_name == "网站"


def test_php_mail_lone_dot_line_is_kept(setup):
    setup.php_mail(to="to@example.com", subject="dots", body="before\n.\n..two\nafter")
    delivered(setup, ["to@example.com"])
    assert body_of(setup.relay.messages[0]) == b"before\r\n.\r\n..two\r\nafter\r\n"


@pytest.mark.parametrize("mixed", ["On", "Off"])
def test_php_mail_mixed_lf_and_crlf(setup, mixed):
    """PHP 8 writes its own separators as CRLF (Off) or LF (On); user headers and body keep theirs.
    Either way the relay gets CRLF lines and no CR CR LF."""
    setup.php_mail(f"mail.mixed_lf_and_crlf={mixed}", to="to@example.com", subject="endings",
                   body="lf\ncrlf\r\nlast", headers="From: a@example.com\r\nX-Test: yes")
    parsed = delivered(setup, ["to@example.com"])
    assert parsed["X-Test"] == "yes" and parsed["Subject"] == "endings"
    assert body_of(setup.relay.messages[0]) == b"lf\r\ncrlf\r\nlast\r\n"


def test_php_mail_in_background_mode(setup_factory):
    """The default delivery mode: mail() returns at once, the message reaches the relay after."""
    setup = setup_factory(SENDMAIL_SHIM_DELIVERY="background")
    setup.php_mail(to="to@example.com", subject="background", body="x")
    deadline = time.monotonic() + 30
    while not setup.relay.messages and time.monotonic() < deadline:
        time.sleep(0.05)
    delivered(setup, ["to@example.com"])


def test_php_mail_returns_false_when_the_shim_refuses(setup):
    setup.relay.refuse["gone@example.com"] = "550 5.1.1 no such user"
    setup.php_mail(to="gone@example.com", subject="refused", body="x", expect_exit=1)
    assert setup.relay.messages == []


# --- PHPMailer --------------------------------------------------------------------------------


def test_phpmailer_is_sendmail(setup):
    setup.run(php(PHPMAILER), "-d", f"sendmail_path={setup.sendmail} -t -i", CLIENTS / "phpmailer.php", "sendmail")
    assert setup.calls() == [["-t", "-i", "-oi", "-fwebmaster@example.com", "-t"]]
    parsed = delivered(setup, ["to@example.com", "cc@example.com", "bcc@example.com"])
    assert parsed["Subject"] == "PHPMailer 测试" and parsed["Reply-To"] == "Web Master <webmaster@example.com>"
    assert text_of(parsed) == "line1\n.\n..two dots\nünïcode"


def test_phpmailer_is_mail(setup):
    setup.run(php(PHPMAILER), "-d", f"sendmail_path={setup.sendmail} -t -i", CLIENTS / "phpmailer.php", "mail")
    assert setup.calls() == [["-t", "-i", "-fwebmaster@example.com"]]
    parsed = delivered(setup, ["to@example.com", "cc@example.com", "bcc@example.com"])
    assert parsed["Subject"] == "PHPMailer 测试"
    assert text_of(parsed) == "line1\n.\n..two dots\nünïcode"


# --- Symfony Mailer and SwiftMailer -----------------------------------------------------------


def sendmail_dsn(setup: Setup, flags: str) -> str:
    """The DSN an application configures (MAILER_DSN), with the shim as the command."""
    return f"sendmail://default?command={quote(f'{setup.sendmail} {flags}')}"


@pytest.mark.parametrize("flags", ["-bs", "-bs -i"])  # Symfony's default; Laravel's MAIL_SENDMAIL_PATH default
def test_symfony_bs_several_messages_on_one_transport(setup, flags):
    """The default transport (-bs): HELO, one transaction per message, QUIT — one process."""
    setup.run(php(SYMFONY), CLIENTS / "symfony.php", sendmail_dsn(setup, flags), 2)
    assert setup.calls() == [flags.split()]
    for n in (1, 2):
        parsed = delivered(setup, ["to@example.com", "cc@example.com", "bcc@example.com"], index=n - 1)
        assert parsed["Subject"] == f"Symfony {n} 测试" and parsed["Reply-To"] == "App <app@example.com>"
        assert text_of(parsed) == f"line1\n.\n..two dots\nünïcode {n}"
    assert setup.relay.messages[0].helo != ""


def test_symfony_bs_refusal_raises_in_the_application(setup):
    for rcpt in ("to@example.com", "cc@example.com", "bcc@example.com"):
        setup.relay.refuse[rcpt] = "550 5.1.1 mailbox unavailable"
    out = setup.run(php(SYMFONY), CLIENTS / "symfony.php", sendmail_dsn(setup, "-bs"), expect_exit=3).stdout.decode()
    assert "550" in out and "mailbox unavailable" in out
    assert setup.relay.messages == []


@pytest.mark.parametrize("flags", ["-t -i", "-t"])
def test_symfony_t_mode(setup, flags):
    """-t mode: Symfony drops -t and passes -i -f… -- rcpts; without -i it dot-stuffs, and the
    shim un-stuffs as sendmail does."""
    setup.run(php(SYMFONY), CLIENTS / "symfony.php", sendmail_dsn(setup, flags))
    expected = ["-i"] if "-i" in flags else []
    assert setup.calls() == [
        expected + ["-fapp@example.com", "--", "to@example.com", "cc@example.com", "bcc@example.com"]]
    parsed = delivered(setup, ["to@example.com", "cc@example.com", "bcc@example.com"])
    assert text_of(parsed) == "line1\n.\n..two dots\nünïcode 1"


def test_swiftmailer_bs_default(setup):
    setup.run(php(SWIFT), CLIENTS / "swiftmailer.php", f"{setup.sendmail} -bs")
    assert setup.calls() == [["-bs"]]
    parsed = delivered(setup, ["to@example.com", "bcc@example.com"])
    assert parsed["Subject"] == "Swift 测试"
    assert text_of(parsed) == "line1\n.\n..two dots\nünïcode"


def test_swaks_pipe_bs(setup):
    """swaks is an independent SMTP client: EHLO, its own checks of every reply."""
    setup.run(need("swaks", "swaks"), "--pipe", f"{setup.sendmail} -bs", "--from", "app@example.com",
              "--to", "to@example.com,root", "--header", "Subject: swaks", "--body", "hello\n.\nbye", "--silent", "2")
    assert setup.calls() == [["-bs"]]
    parsed = delivered(setup, ["to@example.com", "ops@example.com"])
    assert parsed["Subject"] == "swaks" and b"hello\r\n.\r\nbye" in body_of(setup.relay.messages[0])


# --- git send-email, mail, mutt ---------------------------------------------------------------


def test_git_send_email_patch_with_a_lone_dot_line(setup):
    git = need("git", "git")
    need("/usr/lib/git-core/git-send-email", "git-email")
    need("/usr/share/perl5/Mail/Address.pm", "libmailtools-perl")  # a Recommends that send-email needs
    repo = setup.home / "repo"
    env = {"GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "Dev",
           "GIT_AUTHOR_EMAIL": "dev@example.com", "GIT_COMMITTER_NAME": "Dev", "GIT_COMMITTER_EMAIL": "dev@example.com"}
    setup.run(git, "init", "-q", repo, env=env)
    (repo / "file").write_text("one\n")
    setup.run(git, "-C", repo, "add", "file", env=env)
    setup.run(git, "-C", repo, "commit", "-qm",
              "Fix the thing\n\nThe old code stopped at a line with one dot:\n.\nNow it does not.", env=env)
    setup.run(git, "-C", repo, "format-patch", "-q", "--root", "-o", setup.home / "patches", env=env)
    [patch] = (setup.home / "patches").iterdir()
    setup.run(git, "-C", repo, "send-email", f"--sendmail-cmd={setup.sendmail}", "--from=Dev <dev@example.com>",
              "--to=to@example.com", "--cc=cc@example.com", "--bcc=bcc@example.com", "--confirm=never",
              "--suppress-cc=all", "--quiet", patch, env=env)
    assert setup.calls() == [["-i", "to@example.com", "cc@example.com", "bcc@example.com"]]
    parsed = delivered(setup, ["to@example.com", "cc@example.com", "bcc@example.com"])
    assert parsed["Subject"] == "[PATCH] Fix the thing" and parsed["Reply-To"] == "Dev <dev@example.com>"
    body = body_of(setup.relay.messages[0])
    assert body.startswith(b"The old code stopped at a line with one dot:\r\n.\r\nNow it does not.\r\n---\r\n")
    assert b"\r\n+one\r\n-- \r\n" in body


def test_mailutils_mail_with_a_chinese_subject(setup):
    """GNU mailutils' mail: -oi -f <addr> -t; `root` arrives as root@<this host> and resolves
    through SMTP_ALIASES. (mail itself ends the text at a lone '.', so none is sent here.)"""
    mail = need("mail.mailutils", "mailutils")
    setup.run(mail, "-n", "-E", f"set sendmail=sendmail://{setup.sendmail}", "-s", "服务器报告：磁盘已满",
              "-r", "reporter@example.com", "-a", "Bcc: bcc@example.com", "to@example.com", "root",
              stdin="磁盘使用率 97%\n请尽快处理。\n".encode())
    assert setup.calls() == [["-oi", "-f", "reporter@example.com", "-t"]]
    parsed = delivered(setup, ["bcc@example.com", "to@example.com", "ops@example.com"])  # header order
    assert parsed["Subject"] == "服务器报告：磁盘已满"
    # mail sends the UTF-8 text without MIME headers: the bytes must arrive untouched
    assert body_of(setup.relay.messages[0]) == "磁盘使用率 97%\r\n请尽快处理。\r\n".encode()


def test_mutt_dsn_and_8bitmime_options(setup_factory, relay_factory):
    """mutt: -oem -oi -B8BITMIME -N failure,delay -R hdrs -- rcpts; the DSN requests reach a
    relay that offers DSN."""
    mutt = need("mutt", "mutt")
    setup = setup_factory(relay_factory(security="tls", dsn=True))
    settings = (f'set sendmail="{setup.sendmail} -oem -oi"; set use_8bitmime=yes; set dsn_notify="failure,delay"; '
                'set dsn_return=hdrs; set from="Dev <dev@example.com>"; set record=""; set send_charset="utf-8"; '
                f'set tmpdir="{setup.home}"')
    setup.run(mutt, "-n", "-F", "/dev/null", "-e", settings, "-s", "mutt 测试", "-b", "bcc@example.com",
              "--", "to@example.com", stdin="line1\n.\nünïcode\n".encode())
    assert setup.calls() == [["-oem", "-oi", "-B8BITMIME", "-N", "failure,delay", "-R", "hdrs", "--",
                              "to@example.com", "bcc@example.com"]]
    parsed = delivered(setup, ["to@example.com", "bcc@example.com"])
    assert parsed["Subject"] == "mutt 测试" and text_of(parsed) == "line1\n.\nünïcode"
    msg = setup.relay.messages[0]
    assert "RET=HDRS" in msg.mail_options and "BODY=8BITMIME" in msg.mail_options
    assert msg.rcpt_options == ["NOTIFY=DELAY,FAILURE"] * 2


# --- cron -------------------------------------------------------------------------------------


@pytest.fixture
def system_config(setup):
    """This test's configuration as the system file /etc/sendmail-shim/sendmail-shim.env, removed
    afterwards; only on a machine that has none (CI), never touching an existing install."""
    path = Path(config.SYSTEM_CONFIG)
    if os.geteuid() != 0:
        pytest.skip(f"writing {path} needs root (CI runs as root)")
    if path.parent.exists():
        pytest.skip(f"{path.parent} exists: this test only writes a system configuration where there is none")
    path.parent.mkdir()
    try:
        path.write_text(setup.shim.config_file.read_text())
        yield path
    finally:
        shutil.rmtree(path.parent)


def test_cron_exact_call(setup, system_config):
    """Debian cron 3.0pl1: execvp of `sendmail -FCronDaemon -i -B8BITMIME -oem <MAILTO>` with the
    job's reduced environment, so the configuration comes from the system file; the message as
    cron writes it (LF, no Date or Message-ID); MAILTO's default `root` resolved by SMTP_ALIASES."""
    sendmail = write_wrapper(setup.home / "system-sendmail", setup.calls_file, config_file=None)
    cron_env = {"PATH": "/usr/bin:/bin", "HOME": str(setup.home), "SHELL": "/bin/sh", "LOGNAME": "root"}
    message = (
        "From: root (Cron Daemon)\n"
        "To: root\n"
        "Subject: Cron <root@web1> /usr/local/bin/backup --verbose\n"
        "MIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=UTF-8\n"
        "Content-Transfer-Encoding: 8bit\n"
        + "".join(f"X-Cron-Env: <{k}={v}>\n" for k, v in cron_env.items())
        + "\n"
        "backup: 3 files\n.\n备份完成\n"
    ).encode()
    proc = setup.run(sendmail, "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root", stdin=message, exact_env=cron_env)
    assert (proc.stdout, proc.stderr) == (b"", b"")
    assert setup.calls() == [["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"]]
    parsed = delivered(setup, ["ops@example.com"])
    assert parsed["From"].addresses[0].display_name == "Cron Daemon"
    assert parsed["Subject"] == "Cron <root@web1> /usr/local/bin/backup --verbose"
    assert body_of(setup.relay.messages[0]) == "backup: 3 files\r\n.\r\n备份完成\r\n".encode()
    assert len(sent_lines(setup)) == 1  # the log named in the system file


CRON_ARGV = ("-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root")


def cron_message(setup: Setup) -> bytes:
    """A job's output as Debian cron writes it (LF, no Date or Message-ID), to MAILTO's default root."""
    return ("From: root (Cron Daemon)\nTo: root\nSubject: Cron <root@web1> /usr/local/bin/backup\n"
            "MIME-Version: 1.0\nContent-Type: text/plain; charset=UTF-8\nContent-Transfer-Encoding: 8bit\n"
            f"X-Cron-Env: <HOME={setup.home}>\n\nbackup: 3 files\n备份完成\n").encode()


def cron_run(setup: Setup, expect_exit: int = 0):
    """cron's exact call (execvp with the job's reduced environment); the wrapper names the config."""
    cron_env = {"PATH": "/usr/bin:/bin", "HOME": str(setup.home), "SHELL": "/bin/sh", "LOGNAME": "root"}
    proc = setup.run(setup.sendmail, *CRON_ARGV, stdin=cron_message(setup), exact_env=cron_env,
                     expect_exit=expect_exit)
    assert setup.calls() == [list(CRON_ARGV)]
    if setup.shim.settings.get("SENDMAIL_SHIM_DELIVERY") == "background":
        from tests.faults import wait_idle

        wait_idle(setup.shim.config_file)
    return proc


LOCAL_INFO = "info: local recipient <root> delivered to <{login}> (no alias; SMTP_LOCAL_MAIL=login)"


@pytest.mark.parametrize("mode", ["background", "interactive"])
def test_cron_mail_to_root_without_aliases_reaches_the_login(setup_factory, mode):
    """No SMTP_ALIASES (SMTP_LOCAL_MAIL=login, the default): cron's mail to root goes to the login's
    mailbox, RCPT TO the login, root kept visible (X-Original-To: root, To: root <login>) and in
    the smtp log line (orig_to=<root>), as Postfix's local delivery shows it."""
    setup = setup_factory(SMTP_ALIASES=None, SENDMAIL_SHIM_DELIVERY=mode)
    proc = cron_run(setup)
    assert (proc.stdout, proc.stderr) == (b"", b"")
    login = setup.relay.login
    parsed = delivered(setup, [login])
    assert parsed["X-Original-To"] == "root"
    [to] = parsed["To"].addresses
    assert (to.display_name, to.addr_spec) == ("root", login)
    assert parsed["From"].addresses[0].display_name == "Cron Daemon"
    assert body_of(setup.relay.messages[0]) == "backup: 3 files\r\n备份完成\r\n".encode()
    [sent] = sent_lines(setup)
    assert "/smtp[" in sent and f": to=<{login}>, orig_to=<root>, relay=" in sent
    if mode == "interactive":  # the -odb pickup's line: test_cron_pickup_logs_the_local_rule
        [info] = [line for line in setup.shim.log_lines() if ": info: " in line]
        assert "sendmail-shim/cleanup[" in info and info.endswith(LOCAL_INFO.format(login=login))


def test_cron_pickup_logs_the_local_rule(setup_factory):
    setup = setup_factory(SMTP_ALIASES=None, SENDMAIL_SHIM_DELIVERY="background")
    cron_run(setup)
    assert any(line.endswith(LOCAL_INFO.format(login=setup.relay.login)) for line in setup.shim.log_lines())


def test_cron_mail_to_root_with_an_alias_names_the_rule(setup):
    cron_run(setup)  # SMTP_ALIASES=root:ops@example.com
    parsed = delivered(setup, ["ops@example.com"])
    assert parsed["X-Original-To"] == "root" and str(parsed["To"]) == "root <ops@example.com>"
    log = setup.shim.log_lines()
    assert any(line.endswith("info: local recipient <root> delivered to <ops@example.com> (alias root)")
               for line in log)
    assert any(": to=<ops@example.com>, orig_to=<root>, relay=" in line for line in log)


def test_cron_mail_to_root_is_refused_with_smtp_local_mail_refuse(setup_factory):
    """SMTP_LOCAL_MAIL=refuse keeps the old behaviour: no alias, no delivery (with -odi the exit
    status says it; with -odb a notice, see test_cli)."""
    setup = setup_factory(SMTP_ALIASES=None, SMTP_LOCAL_MAIL="refuse")
    proc = cron_run(setup, expect_exit=65)
    assert b"local recipient 'root' has no alias" in proc.stderr
    assert setup.relay.messages == [] and sent_lines(setup) == []
