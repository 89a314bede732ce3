"""Configuration: precedence, strict parsing, presets, and where the queue and password live."""

import os

import pytest

from sendmail_shim import config
from sendmail_shim.errors import ConfigError


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def test_environment_overrides_the_file(tmp_path):
    path = write(tmp_path / "a.env", "SMTP_PROVIDER=163\nSMTP_USER=alice@163.com\nSMTP_PORT=994\n")
    cfg = config.load({"SENDMAIL_SHIM_CONFIG": path, "SMTP_PORT": "465"})
    assert (cfg.host, cfg.port, cfg.security, cfg.user) == ("smtp.163.com", 465, "tls", "alice@163.com")
    assert cfg.sources == (path,)


def test_user_file_over_system_file(tmp_path, monkeypatch):
    system = write(tmp_path / "etc" / "sendmail-shim.env", "SMTP_HOST=relay.corp\nSMTP_USER=a@corp.example\n")
    monkeypatch.setattr(config, "SYSTEM_CONFIG", system)
    user = write(tmp_path / "xdg" / "sendmail-shim" / "sendmail-shim.env", "SMTP_USER=b@corp.example\n")
    cfg = config.load({"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path)})
    assert (cfg.host, cfg.user, cfg.sources) == ("relay.corp", "b@corp.example", (system, user))


def test_explicit_file_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        config.load({}, str(tmp_path / "missing.env"))


@pytest.mark.parametrize("text, message", [
    ("SMTP_HOSTT=x\n", ":1: unknown key SMTP_HOSTT"),
    ("SMTP_HOST=x\nSMTP_PORT='465\n", ":2: cannot parse"),
    ("SMTP_HOST\n", ":1: SMTP_HOST has no value"),
    ("SMTP_PASSWORD=hunter2\n", ":1: SMTP_PASSWORD is not accepted"),
    ("SMTP_SECURITY=ssl\n", "SMTP_SECURITY=ssl"),
    ("SMTP_TLS_FINGERPRINT=abc\n", "64 hex digits"),
    ("SMTP_USER=alice\n", "plain address"),
    ("SMTP_ALIASES=root\n", "SMTP_ALIASES"),
    ("SMTP_TIMEOUT=-1\n", "must be positive"),
    ("SMTP_TLS_VERIFY=maybe\n", "expected yes or no"),
], ids=["unknown", "unparsable", "no-value", "password", "security", "fingerprint", "user", "aliases", "timeout", "flag"])
def test_strict_errors_name_file_and_line(tmp_path, text, message):
    path = write(tmp_path / "c.env", text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as info:
        config.load({}, path)
    assert "hunter2" not in str(info.value)


def test_interpolation_is_off(tmp_path):
    path = write(tmp_path / "c.env", "SMTP_HELO='host${x}.example'\n")
    assert config.load({"x": "EVIL"}, path).helo == "host${x}.example"


def test_password_in_environment_refused(tmp_path):
    path = write(tmp_path / "c.env", "SMTP_HOST=x\n")
    with pytest.raises(ConfigError, match="SMTP_PASSWORD"):
        config.load({"SMTP_PASSWORD": "x"}, path)


def test_durations_and_fingerprint(tmp_path):
    fp = ":".join(["AB"] * 32)
    path = write(tmp_path / "c.env", f"SENDMAIL_SHIM_MAX_QUEUE_AGE=2d\nSMTP_TIMEOUT=90s\nSMTP_TLS_FINGERPRINT={fp}\n")
    cfg = config.load({}, path)
    assert (cfg.max_queue_age, cfg.timeout, cfg.tls_fingerprint) == (172800, 90, "ab" * 32)


@pytest.mark.skipif(os.geteuid() == 0, reason="root always uses the system paths")
def test_per_user_paths_without_system_install(tmp_path):
    cfg = config.load({"HOME": str(tmp_path)}, None)
    assert cfg.queue_dir == str(tmp_path / ".local" / "state" / "sendmail-shim")


def test_system_install_gives_every_user_the_system_paths(tmp_path, monkeypatch):
    system = write(tmp_path / "etc.env", "SMTP_HOST=x\n")
    monkeypatch.setattr(config, "SYSTEM_CONFIG", system)
    monkeypatch.setattr(config, "_is_system_user", lambda: False)  # as www-data would be
    env = {"HOME": str(tmp_path / "www")}
    cfg = config.load(env)
    assert (cfg.queue_dir, cfg.credentials_file) == (config.SYSTEM_QUEUE, config.SYSTEM_CREDENTIALS)
    write(tmp_path / "www" / ".config" / "sendmail-shim" / "sendmail-shim.env", "SMTP_USER=me@x.example\n")
    cfg = config.load(env)
    assert cfg.queue_dir == str(tmp_path / "www" / ".local" / "state" / "sendmail-shim")
    assert cfg.credentials_file == str(tmp_path / "www" / ".config" / "sendmail-shim" / "credentials")


def test_redacted_shows_no_password_command(tmp_path):
    path = write(tmp_path / "c.env", "SMTP_PASSWORD_COMMAND=pass show smtp-secret-entry\n")
    shown = config.load({}, path).redacted()
    assert shown["password_command"] == "(set)" and "smtp-secret-entry" not in str(shown)
