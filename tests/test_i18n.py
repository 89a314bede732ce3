"""Messages in English and Simplified Chinese: a complete, current catalog; the language follows
the locale; log lines stay English."""

import ast
import gettext
import shutil
import string
import subprocess
import sys
from pathlib import Path

import pytest

from sendmail_shim.errors import EX_NOPERM, EX_USAGE, ConfigError
from sendmail_shim.i18n import _, describe, language, localize

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "sendmail_shim").glob("*.py"))
PO = ROOT / "po" / "zh_CN.po"
MO = ROOT / "sendmail_shim" / "locale" / "zh_CN" / "LC_MESSAGES" / "sendmail-shim.mo"
ZH = {"LANG": "zh_CN.UTF-8"}


def read_po(path: Path) -> dict[str, tuple[str, set[str]]]:
    """msgid → (msgstr, flags) of a .po file's live entries (obsolete #~ entries are skipped)."""
    entries, flags, field, parts = {}, set(), None, {}

    def flush():
        if "msgid" in parts:
            entries[parts["msgid"]] = (parts.get("msgstr", ""), set(flags))

    for line in path.read_text(encoding="utf-8").splitlines() + [""]:
        if not line.strip():
            flush()
            flags, field, parts = set(), None, {}
        elif line.startswith("#,"):
            flags |= {f.strip() for f in line[2:].split(",")}
        elif line.startswith("#"):
            continue
        elif line.startswith(("msgid ", "msgstr ")):
            field, _sep, rest = line.partition(" ")
            parts[field] = ast.literal_eval(rest)
        elif line.startswith('"'):
            parts[field] += ast.literal_eval(line)
    entries.pop("", None)  # the header
    return entries


def source_msgids() -> set[str]:
    """Every literal passed to ``_()`` in the package (what xgettext --keyword=_ extracts)."""
    found = set()
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "_":
                assert len(node.args) == 1 and isinstance(node.args[0], ast.Constant), \
                    f"{path.name}:{node.lineno}: _() needs one literal string (no f-string)"
                found.add(node.args[0].value)
    return found


def fields(template: str) -> set[str]:
    return {f"{name}!{conv}:{spec}" for _text, name, spec, conv in string.Formatter().parse(template)
            if name is not None}


def test_every_message_has_a_chinese_translation_with_the_same_placeholders():
    catalog = read_po(PO)
    missing = sorted(source_msgids() - catalog.keys())
    assert not missing, f"not in po/zh_CN.po (run make po, then translate): {missing}"
    for msgid, (msgstr, flags) in catalog.items():
        assert msgstr and "fuzzy" not in flags, f"untranslated: {msgid!r}"
        assert fields(msgstr) == fields(msgid), f"placeholders differ: {msgid!r} → {msgstr!r}"
    assert not catalog.keys() - source_msgids(), "po/zh_CN.po has messages the source no longer has"


@pytest.mark.skipif(not shutil.which("xgettext"), reason="xgettext (Debian package gettext) not installed")
def test_xgettext_extracts_the_same_messages(tmp_path):
    pot = tmp_path / "messages.pot"
    subprocess.run(["xgettext", "--language=Python", "--keyword=_", "--from-code=UTF-8", "-o", str(pot),
                    *map(str, SOURCES)], check=True, capture_output=True)
    assert set(read_po(pot)) == source_msgids()


def test_the_compiled_catalog_matches_the_po_file():
    with MO.open("rb") as stream:
        compiled = gettext.GNUTranslations(stream)
    expected = {msgid: msgstr for msgid, (msgstr, _flags) in read_po(PO).items()}
    assert {k: v for k, v in compiled._catalog.items() if k} == expected, "run make po to rebuild the .mo"


@pytest.mark.parametrize("env, expected", [
    ({"LANG": "zh_CN.UTF-8"}, "zh_CN"),
    ({"LANG": "zh_SG.UTF-8"}, "zh_CN"),
    ({"LANG": "zh_Hans_CN.UTF-8"}, "zh_CN"),
    ({"LC_MESSAGES": "zh_CN.GB18030", "LANG": "en_US.UTF-8"}, "zh_CN"),
    ({"LC_ALL": "en_US.UTF-8", "LC_MESSAGES": "zh_CN.UTF-8"}, "en"),
    ({"LANG": "en_US.UTF-8", "LANGUAGE": "zh_CN:en"}, "zh_CN"),
    ({"LANG": "C.UTF-8", "LANGUAGE": "zh_CN"}, "en"),  # gettext ignores LANGUAGE in the C locale
    ({"LANG": "zh_TW.UTF-8"}, "en"),  # no Traditional Chinese catalog
    ({"LANG": "de_DE.UTF-8"}, "en"),
    ({}, "en"),
])
def test_the_language_follows_the_locale(env, expected):
    assert language(env) == expected


def test_texts_are_english_strings_translated_only_when_shown():
    error = ConfigError(_("SMTP_PORT={value}: not a port number").format(value=99999),
                        _("run: {command}").format(command="ls"))
    assert str(error) == "SMTP_PORT=99999: not a port number (run: ls)"  # logs, SMTP replies, bounces
    assert describe(error, ZH) == "SMTP_PORT=99999：不是有效的端口号（请运行：ls）"
    assert describe(error, {"LANG": "C"}) == str(error)
    assert localize("plain text", ZH) == "plain text"


def test_importing_the_package_does_not_load_gettext():
    code = ("import sys; from sendmail_shim import cli, config, smtp, submit, message, queue, i18n; "
            "str(i18n._('{x}').format(x=1)); print('gettext' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


# -- the real console script ----------------------------------------------------------------------

@pytest.mark.e2e
def test_a_wrong_authorization_code_is_explained_in_chinese_and_logged_in_english(shim_factory, relay):
    shim = shim_factory(relay, password="the-web-password", SMTP_PROVIDER="163", SENDMAIL_SHIM_DELIVERY="direct")
    message = b"To: bob@example.com\r\nSubject: hi\r\n\r\nbody\r\n"
    chinese = shim.run("-t", "-i", stdin=message, env=ZH, expect_exit=EX_NOPERM).stderr
    assert chinese.startswith("sendmail-shim: AUTH 被拒绝：535")
    assert "请使用授权码而不是网页登录密码" in chinese and "sendmail-shim --set-password" in chinese
    english = shim.run("-t", "-i", stdin=message, expect_exit=EX_NOPERM).stderr
    assert "use the authorization code (授权码), not the web password" in english
    lines = [line for line in shim.log_lines() if "status=" in line]  # one smtp line per attempt
    assert len(lines) == 2 and all(", dsn=5.0.0, status=bounced (AUTH refused: 535" in line for line in lines)
    assert all("use the authorization code" in line for line in lines)
    assert not any("请使用" in line for line in shim.log_lines())


@pytest.mark.e2e
def test_check_in_chinese_and_the_sender_hint(shim_factory, relay):
    shim = shim_factory(relay, SMTP_PROVIDER="163")
    out = shim.run("--check", env=ZH).stdout.decode()
    assert "当前配置：" in out and out.rstrip().splitlines()[-1].startswith("结论：正常")
    relay.reply_at["mail"] = "553 Mail from must equal authorized user"
    out = shim.run("--check", env=ZH, expect_exit=None).stdout.decode()
    assert "结论：失败" in out and "发件人必须与登录账号一致" in out


@pytest.mark.e2e
def test_untrusted_certificate_and_blocked_port_25_hints_in_chinese(shim_factory, relay_factory, relay):
    stranger = relay_factory(cert="untrusted")
    shim = shim_factory(stranger, SMTP_CA_FILE=None, SENDMAIL_SHIM_DELIVERY="direct")
    out = shim.run("--check", env=ZH, expect_exit=None).stdout.decode()
    assert "TLS 证书不受信任" in out and "请把 SMTP_CA_FILE 设为该 CA 证书" in out

    import socket

    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 25)) == 0:
            pytest.skip("something listens on port 25 here")
    shim = shim_factory(relay, SMTP_PORT="25", SMTP_SECURITY="starttls")
    out = shim.run("--check", env=ZH, expect_exit=None).stdout.decode()
    assert "无法连接 127.0.0.1:25" in out and "封禁出站 25 端口" in out and "587" in out


@pytest.mark.e2e
def test_usage_errors_and_help_in_chinese(shim_factory):
    shim = shim_factory(None, password=None)
    assert shim.run("--bogus", env=ZH, expect_exit=EX_USAGE).stderr == \
        "sendmail-shim: 未知选项 --bogus（参见 sendmail-shim --help）\n"
    assert shim.run("--help", env=ZH).stdout.decode().startswith("用法：sendmail-shim")
    assert shim.run("--bogus", env={"LANG": "zh_CN.UTF-8", "LC_ALL": "C"}, expect_exit=EX_USAGE).stderr == \
        "sendmail-shim: unknown option --bogus (see sendmail-shim --help)\n"
