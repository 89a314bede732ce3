"""Several accounts (accounts.py) and failover (failover.py) through the real console script, each
account with its own relay on 127.0.0.1 and its own login: routing by sender, who may pick an
account, and a paused account's mail moving to its fallback with the sender rewritten."""

import email
from collections import Counter

import pytest

from sendmail_shim import accounts, clock, config as config_module, credentials
from sendmail_shim.errors import ConfigError
from sendmail_shim.secret import Secret
from tests.provider_relay import PROVIDERS, limited_relay

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
    path.write_text("".join(line + "\n" for line in path.read_text().splitlines()[:-1]) + "SMTP_FALLBACK=nowhere\n")
    with pytest.raises(ConfigError, match="no account nowhere"):
        config_module.load({}, explicit=str(shim.config_file))


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
        assert moved.mail_from == QQ_LOGIN
        assert (sent["From"], sent["Reply-To"]) == (f"Alice <{QQ_LOGIN}>", f"Alice <{main.login}>")
    assert shim.run("-bp").stdout.endswith(b"Mail queue is empty\n")
    lines = shim.log_lines()
    assert sum("moved from account default (alice@163.test, paused until" in line for line in lines) == 2
    assert not any("status=bounced" in line for line in lines)
