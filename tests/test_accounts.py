"""Several accounts (accounts.py) and failover (failover.py) through the real console script, each
account with its own relay on 127.0.0.1 and its own login: routing by sender, who may pick an
account, and a paused account's mail moving to its fallback with the sender rewritten."""

import email
import os
from collections import Counter

import pytest

from sendmail_shim import accounts, clock, config as config_module, credentials
from sendmail_shim.errors import ConfigError
from sendmail_shim.secret import Secret
from tests.provider_relay import PROVIDERS, limited_relay
from tests.localusers import needs_other_users, service_site
from tests.shim import wait_for

QQ_LOGIN = "bob@qq.test"


def add_account(shim, name: str, relay, **settings) -> None:
    """accounts.d/NAME.env beside the shim's config, for `relay`, its password stored."""
    directory = shim.config_file.parent / "accounts.d"
    directory.mkdir(exist_ok=True)
    values = {key: value for key, value in relay.config_env(**settings).items() if key.startswith("SMTP_")}
    (directory / f"{name}.env").write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    account = config_module.load({}, explicit=str(shim.config_file)).for_account(name)
    credentials.set_password(account, Secret(relay.password))


@pytest.fixture
def two_relays(relay_factory, relay_password):
    main = relay_factory(security="tls")
    qq = relay_factory(security="tls", users={QQ_LOGIN: relay_password})
    main.password = qq.password = relay_password
    return main, qq


def test_the_sender_picks_the_account_whose_login_sends_it(two_relays, shim_factory):
    main, qq = two_relays
    shim = shim_factory(main, SENDMAIL_SHIM_DELIVERY="interactive")
    add_account(shim, "qq", qq, SMTP_ACCOUNT_SENDERS="@qq.test,sales@example.test")

    shim.run("-f", "Sales <sales@example.test>", "-t",
             stdin=b"From: Sales Team <sales@example.test>\nTo: carol@example.test\nSubject: a\n\nhi\n")
    shim.run("-t", stdin=b"To: carol@example.test\nSubject: b\n\nhi\n")

    assert [(m.mail_from, m.login) for m in qq.messages] == [(QQ_LOGIN, QQ_LOGIN)]
    sent = email.message_from_bytes(qq.messages[0].data)
    assert (sent["From"], sent["Reply-To"]) == (f"Sales Team <{QQ_LOGIN}>", "Sales Team <sales@example.test>")
    assert [m.mail_from for m in main.messages] == [main.login]


def test_a_user_not_named_by_the_account_gets_the_default_one(tmp_path):
    account = config_module.build({"SMTP_HOST": "qq.test", "SMTP_USER": QQ_LOGIN,
                                   "SMTP_ACCOUNT_SENDERS": "@qq.test", "SMTP_ACCOUNT_USERS": "www-data"},
                                  {})._replace(account="qq")
    default = config_module.build({"SMTP_HOST": "163.test", "SMTP_USER": "alice@163.test"}, {})
    default = default._replace(accounts={"qq": account})
    assert accounts.select(default, "x@qq.test", 0) is account  # root always may
    assert accounts.select(default, "x@qq.test", 33) is (account if _name(33) == "www-data" else default)
    assert accounts.select(default, "x@qq.test", 65534) is default  # nobody: not named
    assert accounts.select(default, "x@elsewhere.test", 0) is default
    assert accounts.matches("*@qq.test", "X@QQ.test") and not accounts.matches("@qq.test", "x@notqq.test")


def _name(uid: int):
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def test_an_account_file_with_a_main_key_or_an_unknown_fallback_is_refused(two_relays, shim_factory):
    main, qq = two_relays
    shim = shim_factory(main)
    add_account(shim, "qq", qq)
    path = shim.config_file.parent / "accounts.d" / "qq.env"
    path.write_text(path.read_text() + "SENDMAIL_SHIM_QUEUE_DIR=/tmp/elsewhere\n")
    result = shim.run("-bp", expect_exit=78)
    assert "SENDMAIL_SHIM_QUEUE_DIR belongs in the main configuration" in result.stderr

    def fallback(value: str) -> None:  # in place of the last line
        kept = path.read_text().splitlines()[:-1]
        path.write_text("".join(line + "\n" for line in kept) + f"SMTP_FALLBACK={value}\n")

    for wrong in ("nowhere", "qq", "default,qq"):  # no such account, or itself
        fallback(wrong)
        with pytest.raises(ConfigError, match="no account"):
            config_module.load({}, explicit=str(shim.config_file))
    fallback("default")
    assert config_module.load({}, explicit=str(shim.config_file)).for_account("qq").fallback == ("default",)


def test_a_paused_account_fails_over_with_the_fallbacks_login_and_never_two_copies(
        relay_factory, relay_password, shim_factory, clock_file):
    main = limited_relay(relay_factory, PROVIDERS["163"]._replace(per_day=1), clock_file)
    qq = relay_factory(security="tls", users={QQ_LOGIN: relay_password})
    qq.password = relay_password
    shim = shim_factory(main, SMTP_PROVIDER="163", SENDMAIL_SHIM_DELIVERY="queue")
    shim.env[clock.TEST_CLOCK] = clock_file
    add_account(shim, "qq", qq)
    shim.write_config({**shim.settings, "SMTP_FALLBACK": "qq", "SMTP_FALLBACK_AFTER": "10m"})
    for n in range(3):
        shim.run("-t", stdin=f"From: Alice <{main.login}>\nTo: carol@example.test\nSubject: {n}\n\nhi\n".encode())

    shim.run("-q")
    assert len(main.messages) == 1 and main.handler.over == Counter(per_day=1)
    assert qq.messages == []  # not yet: the fallback takes over after 10 minutes

    clock.advance(clock_file, by=11 * 60)
    shim.run("-q", "--due")

    subjects = [email.message_from_bytes(m.data)["Subject"] for m in main.messages + qq.messages]
    assert sorted(subjects) == ["0", "1", "2"]  # each exactly once, over both accounts
    for moved in qq.messages:
        sent = email.message_from_bytes(moved.data)
        assert moved.mail_from == QQ_LOGIN and f"SIZE={len(moved.data)}" in moved.mail_options
        assert (sent["From"], sent["Reply-To"]) == (f"Alice <{QQ_LOGIN}>", f"Alice <{main.login}>")
    assert shim.run("-bp").stdout.endswith(b"Mail queue is empty\n")
    lines = shim.log_lines()
    assert sum("moved from account default (alice@163.test, paused until" in line for line in lines) == 2
    assert not any("status=bounced" in line for line in lines)


def test_account_option_stores_its_password_and_check_covers_every_account(two_relays, shim_factory):
    main, qq = two_relays
    shim = shim_factory(main)
    directory = shim.config_file.parent / "accounts.d"
    directory.mkdir()
    values = {k: v for k, v in qq.config_env().items() if k.startswith("SMTP_")}
    (directory / "qq.env").write_text("".join(f"{k}={v}\n" for k, v in values.items()))

    failed = shim.run("--check", "--account", "qq", expect_exit=78)  # nothing stored for its login yet
    assert f"no password stored for {QQ_LOGIN}" in failed.stderr + failed.stdout.decode()
    stored = shim.run("--set-password", "--account", "qq", stdin=qq.password.encode() + b"\n")
    assert f"password for {QQ_LOGIN} stored" in stored.stdout.decode()

    report = shim.run("--check").stdout.decode()
    assert report.count("verdict: OK") == 2
    assert report.index("account default:") < report.index(f"accepts {main.login}") < report.index(
        "account qq:") < report.index(f"accepts {QQ_LOGIN}")
    assert "--account goes with" in shim.run("-q", "--account", "qq", expect_exit=64).stderr
    assert "account nowhere is not configured" in shim.run("--check", "--account", "nowhere", expect_exit=78).stderr


@pytest.mark.e2e
@needs_other_users[0]
@needs_other_users[1]
def test_only_the_users_an_account_names_can_spend_it(two_relays, relay_password):
    """Through the submission service: a compromised web application (another uid) claims the
    sender of an account it may not use; its mail goes out through the default account, and the
    other account's relay never sees it. The user the account names gets it."""
    main, qq = two_relays
    with service_site(main, relay_password) as (site, (service, attacker, victim)):
        (site.base / "qq").mkdir(mode=0o755)
        qq_password = site.base / "qq" / "password"  # a name the leak scan knows holds it on purpose
        qq_password.write_text(relay_password + "\n")
        os.chown(qq_password, service.pw_uid, service.pw_gid)
        qq_password.chmod(0o600)
        (site.base / "accounts.d").mkdir(mode=0o755)
        settings = {**{k: v for k, v in qq.config_env().items() if k.startswith("SMTP_")},
                    "SMTP_CA_FILE": str(site.base / "ca.pem"), "SMTP_PASSWORD_COMMAND": f"cat {qq_password}",
                    "SMTP_ACCOUNT_SENDERS": "@qq.test", "SMTP_ACCOUNT_USERS": victim.pw_name}
        account_file = site.base / "accounts.d" / "qq.env"
        account_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
        account_file.chmod(0o644)

        for user, subject in ((attacker, "stolen"), (victim, "own")):
            proc = site.send(user.pw_name, "-f", "boss@qq.test", "-t",
                             stdin=f"To: carol@example.test\nSubject: {subject}\n\nhi\n".encode())
            assert proc.returncode == 0, proc.stderr.decode()
        wait_for(lambda: len(main.messages) + len(qq.messages) == 2)

    assert [(m.mail_from, b"Subject: own" in m.data) for m in qq.messages] == [(QQ_LOGIN, True)]
    assert [(m.mail_from, b"Subject: stolen" in m.data) for m in main.messages] == [(main.login, True)]


def test_setup_adds_an_account_beside_the_configuration(two_relays, shim_factory):
    main, qq = two_relays
    shim = shim_factory(main, SENDMAIL_SHIM_DELIVERY="interactive")
    result = shim.run("--setup", "--account", "qq", "--host", qq.host, "--port", str(qq.port), "--security", "tls",
                      "--ca-file", qq.ca_file, "--user", QQ_LOGIN, "--senders", "@qq.test",
                      "--password-stdin", "--yes", stdin=qq.password.encode() + b"\n")

    account_file = shim.config_file.parent / "accounts.d" / "qq.env"
    assert f"wrote {account_file}" in result.stdout.decode() and "verdict: OK" in result.stdout.decode()
    written = config_module.read_file(str(account_file))
    assert (written["SMTP_USER"], written["SMTP_ACCOUNT_SENDERS"]) == (QQ_LOGIN, "@qq.test")
    assert not any(key.startswith("SENDMAIL_SHIM_") for key in written)
    assert "SMTP_USER" in config_module.read_file(str(shim.config_file))  # the main file is left as it was
    shim.run("-f", "me@qq.test", "carol@example.test", stdin=b"Subject: via qq\n\nhi\n")
    assert [m.mail_from for m in qq.messages] == [QQ_LOGIN] and main.messages == []
    assert "set up the main configuration first" in shim.run(
        "--setup", "--account", "x", "--config", str(shim.home / "none.env"), "--yes", expect_exit=64).stderr
