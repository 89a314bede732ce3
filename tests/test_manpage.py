"""sendmail-shim(8) is the reference: what it says is checked against the program.

Its EXIT STATUS list holds only sysexits constants of sendmail_shim/errors.py, and each code in it
is what a real run of the console script returns (against the test relay and its fault switches);
every option and every file the program knows is on the page, and the page renders.
"""

import importlib.util
import re
import shutil
import socket
import subprocess
import sys

import pytest

from sendmail_shim import config as config_module
from sendmail_shim import errors
from sendmail_shim.options import LONG_OPTIONS
from tests.shim import ROOT

PAGE = ROOT / "packaging" / "man" / "sendmail-shim.8.rst"
RENDER = ROOT / "packaging" / "man" / "render.py"
MESSAGE = b"Subject: exit status\n\nhello\n"
RECIPIENT = "bob@example.org"


def section(text: str, title: str) -> str:
    """The body of one top-level section of the page."""
    body = text.split(f"\n{title}\n{'=' * len(title)}\n", 1)[1]
    return re.split(r"\n[A-Z][A-Z ]+\n=+\n", body, maxsplit=1)[0]


def exit_status_table(text: str) -> list[tuple[int, str]]:
    """(code, sysexits name) of each entry of EXIT STATUS: ``**64** (EX_USAGE)``."""
    return [(int(code), name) for code, name in
            re.findall(r"^\*\*(\d+)\*\* \((EX_[A-Z]+)\)$", section(text, "EXIT STATUS"), re.MULTILINE)]


TABLE = exit_status_table(PAGE.read_text(encoding="utf-8"))


def test_the_exit_status_table_is_there():
    codes = [code for code, _name in TABLE]
    assert len(codes) >= 10 and codes == sorted(set(codes))
    assert codes[0] == 0


@pytest.mark.parametrize("code, name", TABLE)
def test_every_listed_code_is_a_sysexits_constant_of_errors(code, name):
    constants = {key: value for key, value in vars(errors).items() if key.startswith("EX_")}
    assert constants.get(name) == code, f"{name} is not {code} in sendmail_shim/errors.py"


# -- one real run per code ------------------------------------------------------------------------

def _direct(shim_factory, relay, **overrides):
    """No queue: the caller gets every failure's own code."""
    return shim_factory(relay, SENDMAIL_SHIM_DELIVERY="direct", **overrides)


def delivered(shim_factory, relay_factory, tmp_path):
    relay = relay_factory(security="tls")
    result = _direct(shim_factory, relay).run("-i", RECIPIENT, stdin=MESSAGE, expect_exit=None)
    assert [m.rcpt_tos for m in relay.messages] == [[RECIPIENT]]
    return result


def bad_option(shim_factory, relay_factory, tmp_path):
    result = shim_factory(relay_factory(security="tls")).run("-Z", RECIPIENT, stdin=MESSAGE, expect_exit=None)
    assert "unknown option -Z" in result.stderr
    return result


def nul_byte(shim_factory, relay_factory, tmp_path):
    relay = relay_factory(security="tls")
    result = shim_factory(relay).run("-odi", "-i", RECIPIENT, stdin=b"Subject: x\n\nNUL \0 here\n", expect_exit=None)
    assert "NUL byte" in result.stderr and relay.messages == []
    return result


def every_recipient_refused(shim_factory, relay_factory, tmp_path):
    relay = relay_factory(security="tls")
    relay.refuse[RECIPIENT] = "550 5.1.1 no such user"
    result = _direct(shim_factory, relay).run("-i", RECIPIENT, stdin=MESSAGE, expect_exit=None)
    assert "550 5.1.1 no such user" in result.stderr
    return result


def refused_at_mail(shim_factory, relay_factory, tmp_path):
    relay = relay_factory(security="tls")
    relay.reply_at["mail"] = "550 5.7.1 sending from this account is blocked"
    result = _direct(shim_factory, relay).run("-i", RECIPIENT, stdin=MESSAGE, expect_exit=None)
    assert "MAIL refused: 550" in result.stderr
    return result


def queue_unwritable(shim_factory, relay_factory, tmp_path):
    shim = shim_factory(relay_factory(security="tls"))
    shim.run("-odq", "-i", RECIPIENT, stdin=MESSAGE)  # the queue is there and works
    tmp = shim.queue_dir / "tmp"
    tmp.rmdir()
    tmp.write_text("")  # and now its tmp/ cannot take a message (root ignores permission bits)
    result = shim.run("-odq", "-i", RECIPIENT, stdin=MESSAGE, expect_exit=None)
    assert "cannot write to the queue" in result.stderr
    return result


def credential_file_unwritable(shim_factory, relay_factory, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    shim = shim_factory(relay_factory(security="tls"), password=None,
                        SENDMAIL_SHIM_CREDENTIALS_FILE=str(blocker / "credentials"))
    return shim.run("--set-password", stdin=b"an-authorization-code\n", expect_exit=None)


def relay_down(shim_factory, relay_factory, tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # closed again: nothing listens there
    shim = _direct(shim_factory, relay_factory(security="tls"), SMTP_PORT=str(port))
    result = shim.run("-i", RECIPIENT, stdin=MESSAGE, expect_exit=None)
    assert "connection refused" in result.stderr
    return result


def security_does_not_fit_the_port(shim_factory, relay_factory, tmp_path):
    plain = relay_factory(security="none")  # greets in plain text; the shim expects implicit TLS
    shim = _direct(shim_factory, plain, password=None, SMTP_SECURITY="tls")
    result = shim.run("-i", RECIPIENT, stdin=MESSAGE, expect_exit=None)
    assert "SMTP_SECURITY=starttls" in result.stderr
    return result


def starttls_against_implicit_tls(shim_factory, relay_factory, tmp_path):
    relay = relay_factory(security="tls")  # on a random port, not 465
    direct = _direct(shim_factory, relay, SMTP_SECURITY="starttls")
    result = direct.run("-i", RECIPIENT, stdin=MESSAGE, expect_exit=None)
    assert "speaks implicit TLS" in result.stderr and "SMTP_SECURITY=tls" in result.stderr
    return result


def wrong_password(shim_factory, relay_factory, tmp_path):
    relay = relay_factory(security="tls")
    result = _direct(shim_factory, relay, password="not-the-password").run(
        "-i", RECIPIENT, stdin=MESSAGE, expect_exit=None)
    assert "AUTH refused: 535" in result.stderr
    return result


def no_sender(shim_factory, relay_factory, tmp_path):
    shim = _direct(shim_factory, relay_factory(security="tls"), password=None, SMTP_USER=None)
    result = shim.run("-i", RECIPIENT, stdin=MESSAGE, expect_exit=None)
    assert "SMTP_USER" in result.stderr
    return result


RUNS = {  # each code the page may list → the runs that return it
    errors.EX_OK: [delivered],
    errors.EX_USAGE: [bad_option],
    errors.EX_DATAERR: [nul_byte],
    errors.EX_NOUSER: [every_recipient_refused],
    errors.EX_UNAVAILABLE: [refused_at_mail],
    errors.EX_CANTCREAT: [queue_unwritable, credential_file_unwritable],
    errors.EX_TEMPFAIL: [relay_down],
    errors.EX_PROTOCOL: [security_does_not_fit_the_port, starttls_against_implicit_tls],
    errors.EX_NOPERM: [wrong_password],
    errors.EX_CONFIG: [no_sender],
}
CASES = [pytest.param(code, run, id=f"{code}-{run.__name__}")
         for code, _name in TABLE for run in RUNS.get(code, [None])]


@pytest.mark.e2e
@pytest.mark.parametrize("code, run", CASES)
def test_every_listed_code_is_what_a_real_run_returns(code, run, shim_factory, relay_factory, tmp_path):
    if run is None:
        pytest.fail(f"the page lists exit {code}, and no run here proves the program returns it")
    result = run(shim_factory, relay_factory, tmp_path)
    assert result.exit_code == code, result.stderr
    if code:
        [line] = result.stderr.splitlines()  # one line, as the page says
        assert line.startswith("sendmail-shim: ")
    else:
        assert result.stderr == "" and result.stdout == b""


# -- options, files, environment ------------------------------------------------------------------

TEXT = PAGE.read_text(encoding="utf-8")


@pytest.mark.parametrize("name", sorted(LONG_OPTIONS))
def test_every_long_option_is_documented(name):
    assert f"**--{name}**" in TEXT


@pytest.mark.parametrize("option", [
    "-t", "-i", "-oi", "-f", "-r", "-F", "-odb", "-odi", "-odq", "-N", "-R", "-V", "-v", "-bm", "-bs",
    "-bp", "-bd", "-bi", "-I", "-q", "-qf", "-qR", "-qS", "-qI", "-X", "-C", "--",
    "-B", "-o", "-e", "-h", "-L", "-A", "-O", "-p", "-G", "-U", "-m", "-n", "-x", "-c", "-d",
])
def test_every_sendmail_option_is_documented(option):
    assert re.search(rf"\*\*{re.escape(option)}\*\*", TEXT), option


@pytest.mark.parametrize("path", [
    config_module.SYSTEM_CONFIG, config_module.SYSTEM_CREDENTIALS, config_module.SYSTEM_QUEUE + "/",
    config_module.SUBMIT_SOCKET, "~/.config/sendmail-shim/sendmail-shim.env",
    "~/.config/sendmail-shim/credentials", "~/.local/state/sendmail-shim/",
    "tmp/", "failed/", "maildrop/", "maildrop-tmp/", "corrupt/",
])
def test_files_lists_every_path(path):
    assert f"*{path}*" in section(TEXT, "FILES")


def test_environment_names_the_override_and_the_variables_read():
    environment = section(TEXT, "ENVIRONMENT")
    assert f"**{config_module.env_name('SMTP_HOST')}** for\n    **SMTP_HOST**" in environment
    for name in ("SENDMAIL_SHIM_CONFIG", "LANG", "LC_ALL", "LANGUAGE", "XDG_CONFIG_HOME", "XDG_STATE_HOME"):
        assert f"**{name}**" in environment


def test_every_configuration_key_is_rendered_into_the_page():
    spec = importlib.util.spec_from_file_location("render", RENDER)
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    page = render.render(TEXT)
    assert "@VERSION@" not in page and render.PLACEHOLDER not in page
    for key in config_module.KEYS:
        assert f"``{key}``\n" in page


@pytest.mark.skipif(not shutil.which("rst2man"), reason="rst2man (python3-docutils) is not installed")
def test_the_page_renders_without_a_warning(tmp_path):
    rendered = subprocess.run([sys.executable, str(RENDER), str(PAGE)], capture_output=True, check=True).stdout
    result = subprocess.run(["rst2man", "--strict", "-", str(tmp_path / "sendmail-shim.8")],
                            input=rendered, capture_output=True, check=False)
    assert result.returncode == 0 and result.stderr == b"", result.stderr.decode()
