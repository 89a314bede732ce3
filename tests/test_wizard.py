"""`sendmail-shim --setup`: on a pseudo-terminal and without one, against the test relay."""

import os
import pty
import re
import select
import signal
import stat
import time
from pathlib import Path

import pytest

from sendmail_shim import config, credentials, credstore, hints, wizard
from sendmail_shim.errors import EX_OK, EX_USAGE
from tests.idp import CLIENT_ID, IDP_SCOPE, idp_server  # noqa: F401 (a fixture)
from tests.relay import RELAY_LOGIN, RELAY_PASSWORD
from tests.shim import OUTPUTS, SHIM, SHIM_PYTHON, assert_no_secret

pytestmark = pytest.mark.e2e

MAIL = b"To: root\r\nSubject: after setup\r\n\r\nhello\r\n"


class Terminal:
    """The console script on a pseudo-terminal: ``expect`` what it shows, ``line`` what to type."""

    def __init__(self, argv, env):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: its controlling terminal is the pty (getpass opens /dev/tty)
            try:
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        self.seen = ""

    def expect(self, text: str, within: float = 20.0) -> None:
        end = time.monotonic() + within
        while text not in self.seen:
            if time.monotonic() > end or not self._read(end - time.monotonic()):
                raise AssertionError(f"{text!r} never shown; the terminal shows:\n{self.seen}")

    def line(self, answer: str = "") -> None:
        os.write(self.fd, answer.encode() + b"\r")

    def finish(self, within: float = 30.0) -> int:
        end = time.monotonic() + within
        while self._read(end - time.monotonic()):
            pass
        os.close(self.fd)
        _, status = os.waitpid(self.pid, 0)
        OUTPUTS.append(self.seen)
        return os.waitstatus_to_exitcode(status)

    def _read(self, timeout: float) -> bool:
        if timeout <= 0 or not select.select([self.fd], [], [], timeout)[0]:
            if timeout <= 0:
                os.kill(self.pid, signal.SIGKILL)
            return False
        try:
            chunk = os.read(self.fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            return False
        self.seen += chunk.decode("utf-8", "replace").replace("\r\n", "\n")
        return bool(chunk)


@pytest.fixture
def home(shim_factory):
    """A home whose config file has only keys the wizard does not ask about (queue, log,
    credential file), as an admin's or the Debian package's file would."""
    return shim_factory(None, password=None)


def setup_terminal(home, *args, lang="C.UTF-8") -> Terminal:
    return Terminal([SHIM_PYTHON, str(SHIM), "--setup", *args], {**home.env, "LANG": lang, "TERM": "dumb"})


def stored_password(home) -> str | None:
    return credstore.locate(str(home.credentials_file), home.env).get(credentials.SERVICE, RELAY_LOGIN)


def answer_custom_relay(term: Terminal, relay, *, password: str) -> None:
    term.expect("Mail provider")
    term.line("custom")
    term.expect("Relay host name")
    term.line(relay.host)
    term.expect("Security")
    term.line("tls")
    term.expect("Port [465]")
    term.line(str(relay.port))
    term.expect("CA certificate file")
    term.line(relay.ca_file)
    term.expect("Login")
    term.line(RELAY_LOGIN)
    term.expect("(hidden)")
    term.line(password)


def test_interactive_setup_writes_the_config_stores_the_password_and_passes_the_check(home, relay):
    term = setup_terminal(home)
    answer_custom_relay(term, relay, password=RELAY_PASSWORD)
    term.expect("Sender policy: rewrite or reject [rewrite]")
    term.line()
    term.expect(f"Address for mail to root and other local users (cron, www-data) [{RELAY_LOGIN}]")  # the login
    term.line("ops@example.com")
    term.expect("(yes/no) [yes]")
    term.line()
    term.expect("verdict: OK")
    assert term.finish() == EX_OK

    settings = config.read_file(str(home.config_file))
    assert settings["SMTP_HOST"] == relay.host and settings["SMTP_PORT"] == str(relay.port)
    assert settings["SMTP_USER"] == RELAY_LOGIN and settings["SMTP_FROM_POLICY"] == "rewrite"
    assert settings["SMTP_ALIASES"] == "root:ops@example.com,default:ops@example.com"
    assert settings["SENDMAIL_SHIM_QUEUE_DIR"] == str(home.queue_dir)  # a key the wizard does not own
    assert stat.S_IMODE(home.config_file.stat().st_mode) == 0o644
    assert stored_password(home) == RELAY_PASSWORD
    files = [p.read_text(errors="replace") for p in home.home.rglob("*") if p.is_file() and p != home.credentials_file]
    assert_no_secret([term.seen, *files], RELAY_LOGIN, RELAY_PASSWORD)  # no echo, not in any file
    assert list(home.home.glob("sendmail-shim.env.bak-*")), "the previous file is kept"

    home.run("-t", "-i", stdin=MAIL, env={"SENDMAIL_SHIM_DELIVERY": "interactive"})  # and for mail
    assert relay.messages[-1].rcpt_tos == ["ops@example.com"]


def test_rerunning_it_offers_the_current_values_and_keeps_the_stored_password(home, relay):
    first = setup_terminal(home)
    answer_custom_relay(first, relay, password=RELAY_PASSWORD)
    for prompt, answer in (("Sender policy", "reject"), ("Address for mail to root", "ops@example.com"),
                           ("(yes/no)", "yes")):
        first.expect(prompt)
        first.line(answer)
    assert first.finish() == EX_OK
    before = home.config_file.read_text()

    again = setup_terminal(home)
    for prompt in ("Mail provider ", f"Relay host name [{relay.host}]", "[tls]", f"Port [{relay.port}]",
                   f"[{relay.ca_file}]", f"[{RELAY_LOGIN}]", "Enter keeps the stored one", "[reject]",
                   "[ops@example.com]", "(yes/no) [yes]"):
        again.expect(prompt)
        again.line()
    again.expect("verdict: OK")
    assert again.finish() == EX_OK
    assert home.config_file.read_text() == before
    assert stored_password(home) == RELAY_PASSWORD


def test_provider_guidance_in_chinese_and_nothing_written_when_declined(home):
    before = home.config_file.read_text()
    term = setup_terminal(home, lang="zh_CN.UTF-8")
    term.expect("邮件服务商")
    term.line("163")
    term.expect("开启 SMTP 服务并新增一个授权码")
    term.expect("登录账号")
    term.line("alice@163.com")
    term.expect("alice@163.com 的授权码（输入不显示）")
    term.line("abcdefghijklmnop")
    term.expect("发件人策略")
    term.line()
    term.expect("转发到哪个地址")
    term.line()
    term.expect("写入这份配置并测试吗")
    term.line("no")
    term.expect("已取消配置")
    assert term.finish() == EX_USAGE
    assert home.config_file.read_text() == before
    assert not home.credentials_file.exists()
    assert "abcdefghijklmnop" not in term.seen


def test_without_a_terminal_every_answer_is_an_option_and_the_exit_status_is_the_checks(home, relay):
    result = home.run(
        "--setup", "--host", relay.host, "--port", str(relay.port), "--security", "tls",
        "--ca-file", relay.ca_file, "--user", RELAY_LOGIN, "--aliases", "root:ops@example.com",
        "--password-stdin", stdin=RELAY_PASSWORD.encode() + b"\n",
    )
    out = result.stdout.decode()
    assert "verdict: OK" in out and "Mail provider" not in out  # no question was asked
    assert "Integration (nothing was changed):" in out
    settings = config.read_file(str(home.config_file))
    assert settings["SMTP_HOST"] == relay.host and settings["SMTP_ALIASES"] == "root:ops@example.com"
    assert stored_password(home) == RELAY_PASSWORD
    assert RELAY_PASSWORD not in home.config_file.read_text()

    relay.reply_at["mail"] = "553 Mail from must equal authorized user"  # the check now fails
    result = home.run("--setup", "--user", RELAY_LOGIN, expect_exit=None)
    assert result.exit_code != EX_OK and "verdict: FAILED" in result.stdout.decode()
    assert stored_password(home) == RELAY_PASSWORD  # kept: no --password-stdin this time


def test_answers_from_the_environment_and_a_preset_replacing_a_custom_relay(home, relay):
    env = {"SENDMAIL_SHIM_SMTP_HOST": relay.host, "SENDMAIL_SHIM_SMTP_PORT": str(relay.port),
           "SENDMAIL_SHIM_SMTP_SECURITY": "tls", "SENDMAIL_SHIM_SMTP_CA_FILE": relay.ca_file,
           "SENDMAIL_SHIM_SMTP_USER": RELAY_LOGIN, "SENDMAIL_SHIM_SMTP_FROM_POLICY": "reject",
           # an application's own variables are no answers
           "SMTP_HOST": "mail.app.example", "SMTP_PORT": "2525", "SMTP_USER": "app@app.example",
           "SMTP_PROVIDER": "gmail", "SMTP_PASSWORD": "app-secret"}
    home.run("--setup", "--password-stdin", stdin=RELAY_PASSWORD.encode(), env=env)
    settings = config.read_file(str(home.config_file))
    assert settings["SMTP_FROM_POLICY"] == "reject" and settings["SMTP_USER"] == RELAY_LOGIN
    assert (settings["SMTP_HOST"], settings["SMTP_PORT"]) == (relay.host, str(relay.port))
    assert "SMTP_PROVIDER" not in settings and "app-secret" not in home.config_file.read_text()

    # switching to a preset drops the custom host, port, security and CA file
    home.run("--setup", "--provider", "qq", "--no-check")
    settings = config.read_file(str(home.config_file))
    assert settings["SMTP_PROVIDER"] == "qq" and settings["SMTP_USER"] == RELAY_LOGIN
    assert not {"SMTP_HOST", "SMTP_PORT", "SMTP_SECURITY", "SMTP_CA_FILE"} & set(settings)
    assert config.load({}, str(home.config_file)).host == "smtp.qq.com"


def test_without_a_terminal_nothing_prompts_and_missing_answers_are_errors(home):
    result = home.run("--setup", expect_exit=EX_USAGE, env={"SMTP_PROVIDER": "163", "SMTP_USER": "app@163.com"})
    assert "needs --provider (or --host) and --user" in result.stderr
    assert "SENDMAIL_SHIM_SMTP_PROVIDER and SENDMAIL_SHIM_SMTP_USER" in result.stderr
    result = home.run("--setup", "--provider", "163", "--user", "alice@163.com", expect_exit=EX_USAGE)
    assert "--password-stdin" in result.stderr and "SMTP_PASSWORD_COMMAND" in result.stderr
    assert "SMTP_USER" not in home.config_file.read_text()  # nothing written on failure
    result = home.run("--provider", "163", expect_exit=EX_USAGE)
    assert "only with --setup" in result.stderr


def test_a_password_command_goes_into_the_config_and_nothing_is_stored(home, relay, tmp_path):
    secret = tmp_path / "password"  # outside the home, whose files the session scans for the password
    secret.write_text(RELAY_PASSWORD + "\n")
    command = f"cat '{secret}'"
    home.run("--setup", "--host", relay.host, "--port", str(relay.port), "--security", "tls",
             "--ca-file", relay.ca_file, "--user", RELAY_LOGIN, "--password-command", command)
    assert config.load({}, str(home.config_file)).password_command == command
    assert not home.credentials_file.exists()


# -- the pieces ---------------------------------------------------------------------------------

def test_render_keeps_comments_and_unknown_keys_and_reads_back(tmp_path):
    text = "# my comment\n#SMTP_HOST=\nSMTP_USER=old@x.test\nSENDMAIL_SHIM_QUEUE_DIR=/q\nSMTP_PORT=25\n"
    tricky = "pass -p 'it''s' \\ # not a comment"
    out = wizard.render(text, {"SMTP_HOST": "relay.test", "SMTP_USER": "new@x.test", "SMTP_PORT": None,
                               "SMTP_PASSWORD_COMMAND": tricky})
    assert out.startswith("# my comment\nSMTP_HOST=relay.test\nSMTP_USER=new@x.test\nSENDMAIL_SHIM_QUEUE_DIR=/q\n"
                          "#SMTP_PORT=25\n")
    path = tmp_path / "f.env"
    path.write_text(out)
    assert config.read_file(str(path)) == {"SMTP_HOST": "relay.test", "SMTP_USER": "new@x.test",
                                           "SENDMAIL_SHIM_QUEUE_DIR": "/q", "SMTP_PASSWORD_COMMAND": tricky}


def test_template_documents_every_key_and_is_a_valid_empty_config(tmp_path):
    path = tmp_path / "f.env"
    path.write_text(wizard.template())
    assert config.read_file(str(path)) == {}
    assert all(f"\n#{key}=\n" in wizard.template() for key in config.KEYS)


def test_write_config_keeps_mode_and_a_backup(tmp_path):
    path = tmp_path / "etc" / "sendmail-shim.env"
    assert wizard.write_config(str(path), "A=1\n") is None
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    path.chmod(0o640)
    backup = wizard.write_config(str(path), "A=2\n")
    assert path.read_text() == "A=2\n" and Path(backup).read_text() == "A=1\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and re.search(r"\.bak-\d{8}-\d{6}$", backup)
    assert wizard.write_config(str(path), "A=3\n") != backup  # two runs in one second: two backups


def test_integration_hints_name_the_files_and_the_lines_to_add(tmp_path):
    program = tmp_path / "usr/bin/sendmail-shim"
    for name, text in {
        "usr/bin/sendmail-shim": "#!/usr/bin/python3\nfrom sendmail_shim.cli import console\n",
        "usr/sbin/sendmail": "\x7fELF postfix",
        "etc/php/8.2/fpm/php.ini": "[mail function]\n;sendmail_path =\n",
        "etc/php/8.2/cli/php.ini": "sendmail_path = /usr/bin/sendmail-shim -t -i\n",
        "etc/php/8.2/apache2/php.ini": "sendmail_path = /usr/sbin/sendmail -t -i\n",
        "etc/php/8.2/apache2/conf.d/90-mail.ini": f'sendmail_path = "{program} -t -i"\n',
        "etc/cron.d/backup": "MAILTO=backup,ops@example.com\n0 1 * * * root true\n",
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    settings = config.build({"SMTP_USER": "a@x.test", "SMTP_ALIASES": "root:a@x.test"}, {})
    found = hints.integration_hints(settings, str(program), root=str(tmp_path))
    text = "\n".join(found)
    assert f"/usr/sbin/sendmail belongs to another MTA ({tmp_path}/usr/sbin/sendmail)" in text
    assert ('/etc/php/8.2/fpm/php.ini: sendmail_path = (default) /usr/sbin/sendmail -t -i — '
            f'add this line: sendmail_path = "{program} -t -i"') in text
    assert f"/etc/php/8.2/apache2/conf.d/90-mail.ini: sendmail_path = {program} -t -i — sendmail-shim" in text
    assert "/etc/cron.d/backup: cron mails job output to MAILTO=backup,ops@example.com" in text
    assert "no alias for the local names backup: their mail goes to the login a@x.test" in text
    refusing = config.build({"SMTP_USER": "a@x.test", "SMTP_ALIASES": "root:a@x.test", "SMTP_LOCAL_MAIL": "refuse"}, {})
    assert any("backup: their mail is refused" in h for h in hints.integration_hints(refusing, str(program),
                                                                                      root=str(tmp_path)))
    (tmp_path / "usr/sbin/sendmail").unlink()
    os.symlink(program, tmp_path / "usr/sbin/sendmail")
    found = hints.integration_hints(settings, str(program), root=str(tmp_path))
    assert "/usr/sbin/sendmail is sendmail-shim: cron, mail and PHP's default use it" in found
    assert any("fpm/php.ini" in h and h.endswith("— sendmail-shim") for h in found)


def test_outlook_setup_walks_through_the_registration_then_the_device_login(home, idp_server, ca):  # noqa: F811
    """OAuth2 is the outlook preset's default: the wizard shows how to register the application,
    asks for its ids, writes them, and the delegated login follows on the same terminal (against
    the test IdP, which the environment points the preset at)."""
    idp_server.clients[CLIENT_ID] = None  # a public client, as step 2 makes it
    env = {**home.env, "TERM": "dumb", "SENDMAIL_SHIM_SMTP_OAUTH2_TOKEN_URL": idp_server.token_url,
           "SENDMAIL_SHIM_SMTP_OAUTH2_DEVICE_URL": idp_server.device_url, "SENDMAIL_SHIM_SMTP_OAUTH2_SCOPE": IDP_SCOPE,
           "SENDMAIL_SHIM_SMTP_OAUTH2_CA_FILE": ca.ca_file}
    term = Terminal([SHIM_PYTHON, str(SHIM), "--setup", "--no-check"], env)
    for prompt, answer in (("Mail provider", "outlook"), ("Login (the full mailbox address", RELAY_LOGIN),
                           ("Login with xoauth2 or password", ""), ("Flow: delegated", ""),
                           ("Allow public client flows: Yes", None), ("Directory (tenant) ID", ""),
                           ("Application (client) ID", CLIENT_ID), ("Sender policy", ""),
                           ("Address for mail to root", ""), ("(yes/no) [yes]", ""),
                           ("Log in now (sendmail-shim --oauth2-login)? (yes/no) [yes]", "")):
        term.expect(prompt)
        if answer is not None:
            term.line(answer)
    term.expect(f"sign in as {RELAY_LOGIN} and enter the code ")
    term.expect("\n")
    idp_server.approve(re.search(r"enter the code (\w+)", term.seen).group(1), RELAY_LOGIN)
    term.expect(f"OAuth2 login of {RELAY_LOGIN} stored in {home.credentials_file}")
    assert term.finish() == EX_OK
    settings = config.read_file(str(home.config_file))
    assert {k: settings.get(k) for k in ("SMTP_PROVIDER", "SMTP_AUTH", "SMTP_OAUTH2_FLOW", "SMTP_OAUTH2_TENANT",
                                         "SMTP_OAUTH2_CLIENT_ID")} == {
        "SMTP_PROVIDER": "outlook", "SMTP_AUTH": "xoauth2", "SMTP_OAUTH2_FLOW": "refresh_token",
        "SMTP_OAUTH2_TENANT": "organizations", "SMTP_OAUTH2_CLIENT_ID": CLIENT_ID}
    refresh = credstore.locate(str(home.credentials_file), home.env).get(credentials.REFRESH_SERVICE, RELAY_LOGIN)
    assert refresh in idp_server.refresh_tokens  # no repr in a failure: it is a secret
    assert stored_password(home) is None  # a delegated public client has no secret


def test_gmail_oauth2_without_a_terminal_stores_the_client_secret_and_names_the_login(home):
    result = home.run("--setup", "--provider", "gmail", "--user", RELAY_LOGIN, "--password-stdin", "--no-check",
                      stdin=b"client-secret-of-the-desktop-app\n",
                      env={"SENDMAIL_SHIM_SMTP_AUTH": "xoauth2",
                           "SENDMAIL_SHIM_SMTP_OAUTH2_CLIENT_ID": "123-abc.apps.googleusercontent.com"})
    assert "then log in once: sendmail-shim --oauth2-login" in result.stdout.decode()
    settings = config.read_file(str(home.config_file))
    assert settings["SMTP_AUTH"] == "xoauth2"
    assert settings["SMTP_OAUTH2_CLIENT_ID"] == "123-abc.apps.googleusercontent.com"
    assert stored_password(home) == "client-secret-of-the-desktop-app"


def test_an_app_only_setup_without_a_terminal_needs_the_client_secret(home):
    result = home.run("--setup", "--provider", "outlook", "--user", RELAY_LOGIN, "--no-check", expect_exit=EX_USAGE,
                      env={"SENDMAIL_SHIM_SMTP_OAUTH2_FLOW": "client_credentials",
                           "SENDMAIL_SHIM_SMTP_OAUTH2_TENANT": "contoso.onmicrosoft.com",
                           "SENDMAIL_SHIM_SMTP_OAUTH2_CLIENT_ID": CLIENT_ID})
    assert "--password-stdin" in result.stderr
