"""Provider presets are data; the hints for the classic failure replies say what to do."""

import pytest

from sendmail_shim import config, providers, replies


@pytest.mark.parametrize("name", sorted(providers.PRESETS))
def test_preset_resolves_to_a_verified_tls_relay(name):
    cfg = config.build({"SMTP_PROVIDER": name, "SMTP_USER": "a@example.com"}, {})
    preset = providers.PRESETS[name]
    assert (cfg.host, cfg.port, cfg.security) == (preset.host, preset.port, preset.security)
    assert cfg.security in ("tls", "starttls") and cfg.tls_verify
    assert cfg.host.startswith("smtp.") and cfg.host.count(".") >= 2


def test_preset_values_can_be_overridden():
    cfg = config.build({"SMTP_PROVIDER": "163", "SMTP_SECURITY": "starttls"}, {})
    assert (cfg.host, cfg.port, cfg.security) == ("smtp.163.com", 587, "starttls")
    cfg = config.build({"SMTP_PROVIDER": "gmail", "SMTP_PORT": "2525", "SMTP_HOST": "127.0.0.1"}, {})
    assert (cfg.host, cfg.port) == ("127.0.0.1", 2525)


@pytest.mark.parametrize("settings, connections", [
    ({}, 8),
    ({"SMTP_PROVIDER": "gmail"}, 8),
    ({"SMTP_PROVIDER": "163"}, 1),  # Coremail blocks an address that opens too many at once
    ({"SMTP_PROVIDER": "qq"}, 1),
    ({"SMTP_PROVIDER": "163", "SENDMAIL_SHIM_QUEUE_CONNECTIONS": "3"}, 3),
])
def test_queue_connections_default_follows_the_preset(settings, connections):
    assert config.build(settings, {}).queue_connections == connections


@pytest.mark.parametrize("provider, stage, code, reply, expected", [
    ("163", "mail", 553, "Mail from must equal authorized user", "SMTP_USER"),
    ("qq", "mail", 501, "mail from address must be same as authorization user", "SMTP_USER"),
    ("163", "auth", 535, "Error: authentication failed", "授权码"),
    ("126", "mail", 550, "User has no permission", "POP3/SMTP"),
    ("qq", "auth", 535, "Login fail", "授权码"),
    ("gmail", "auth", 535, "5.7.8 Username and Password not accepted", "app password"),
    ("outlook", "auth", 535, "5.7.139 Authentication unsuccessful", "--oauth2-login"),
    ("gmail", "auth", 535, "5.7.8 Username and Password not accepted", "--set-password"),
    ("custom", "auth", 535, "authentication failed", "wrong login or password"),
    ("custom", "auth", 538, "Encryption required", "SMTP_SECURITY"),
    ("custom", "mail", 530, "Authentication required", "SMTP_USER"),
    ("custom", "data", 552, "too big", "larger"),
], ids=lambda v: str(v))
def test_reply_hints(provider, stage, code, reply, expected):
    assert expected in replies.classify(stage, code, None, reply, provider).hint


def test_no_hint_for_an_ordinary_refusal():
    assert replies.classify("rcpt", 550, None, "Mailbox not found", "163").hint is None
