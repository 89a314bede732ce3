"""Configuration: precedence, strict parsing, presets, and where the queue and password live."""

import os

import pytest

from sendmail_shim import config
from sendmail_shim.errors import ConfigError


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def test_prefixed_environment_overrides_the_file(tmp_path):
    path = write(tmp_path / "a.env", "SMTP_PROVIDER=163\nSMTP_USER=alice@163.com\nSMTP_PORT=994\n")
    cfg = config.load({"SENDMAIL_SHIM_CONFIG": path, "SENDMAIL_SHIM_SMTP_PORT": "465"})
    assert (cfg.host, cfg.port, cfg.security, cfg.user) == ("smtp.163.com", 465, "tls", "alice@163.com")
    assert cfg.sources == (path,)


def test_an_applications_smtp_variables_change_nothing(tmp_path):
    """PHP apps, Docker images and CI jobs export SMTP_* for themselves: not ours."""
    path = write(tmp_path / "a.env", "SMTP_PROVIDER=163\nSMTP_USER=alice@163.com\n")
    app = {"SMTP_PASSWORD": "app-secret", "SMTP_HOST": "mail.app.example", "SMTP_PORT": "2525",
           "SMTP_USER": "app@app.example", "SMTP_SECURITY": "none"}
    cfg = config.load({"SENDMAIL_SHIM_CONFIG": path, **app})
    assert (cfg.host, cfg.port, cfg.security, cfg.user) == ("smtp.163.com", 465, "tls", "alice@163.com")


def test_keys_that_begin_with_sendmail_shim_keep_their_names(tmp_path):
    path = write(tmp_path / "a.env", "SMTP_USER=alice@163.com\nSENDMAIL_SHIM_QUEUE_DIR=/from/file\n")
    cfg = config.load({"SENDMAIL_SHIM_CONFIG": path, "SENDMAIL_SHIM_QUEUE_DIR": "/from/env",
                       "SENDMAIL_SHIM_SENDMAIL_SHIM_QUEUE_DIR": "/doubled"})
    assert cfg.queue_dir == "/from/env"
    assert config.env_name("SMTP_HOST") == "SENDMAIL_SHIM_SMTP_HOST"
    assert config.env_name("SENDMAIL_SHIM_QUEUE_DIR") == "SENDMAIL_SHIM_QUEUE_DIR"


def test_origins_name_the_file_and_line_the_variable_the_preset_or_the_default(tmp_path):
    path = write(tmp_path / "a.env", "# comment\nSMTP_PROVIDER=163\nSMTP_USER=alice@163.com\nSMTP_HELO=\n")
    cfg = config.load({"SENDMAIL_SHIM_CONFIG": path, "SENDMAIL_SHIM_SMTP_TIMEOUT": "7", "SMTP_TIMEOUT": "9"})
    assert cfg.origins["SMTP_PROVIDER"] == f"{path}:2" and cfg.origins["SMTP_USER"] == f"{path}:3"
    assert cfg.origins["SMTP_TIMEOUT"] == "environment SENDMAIL_SHIM_SMTP_TIMEOUT" and cfg.timeout == 7
    assert cfg.origins["SMTP_HOST"] == cfg.origins["SMTP_PORT"] == "preset 163"
    assert cfg.origins["SENDMAIL_SHIM_QUEUE_CONNECTIONS"] == "preset 163"
    assert cfg.origins["SMTP_HELO"] == cfg.origins["SMTP_FROM"] == "default"  # an empty value is no value
    assert set(cfg.origins) == set(config.KEYS) == set(cfg.redacted())
    with pytest.raises(TypeError):
        cfg.origins["SMTP_HOST"] = "changed"  # the record stays immutable
    # a port given for another security than the preset's is the default of that security
    cfg = config.load({"SENDMAIL_SHIM_CONFIG": path, "SENDMAIL_SHIM_SMTP_SECURITY": "starttls"})
    assert (cfg.port, cfg.origins["SMTP_PORT"]) == (587, "default")


def test_nothing_configured_names_the_files_searched_and_says_to_run_setup(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "SYSTEM_CONFIG", str(tmp_path / "etc" / "sendmail-shim.env"))
    cfg = config.load({"HOME": str(tmp_path / "home")})
    with pytest.raises(ConfigError) as info:
        cfg.require_sender()
    assert str(tmp_path / "etc" / "sendmail-shim.env") in str(info.value)
    assert str(tmp_path / "home" / ".config" / "sendmail-shim" / "sendmail-shim.env") in str(info.value)
    assert "sendmail-shim --setup" in str(info.value) and info.value.exit_code == 78


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
], ids=["unknown", "unparsable", "no-value", "password", "security", "fingerprint", "user", "aliases", "timeout",
        "flag"])
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
    with pytest.raises(ConfigError, match="SENDMAIL_SHIM_SMTP_PASSWORD is not accepted: a password never goes"):
        config.load({"SENDMAIL_SHIM_SMTP_PASSWORD": "x"}, path)
    assert config.load({"SMTP_PASSWORD": "x"}, path).host == "x"  # the application's, not ours


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
    assert shown["SMTP_PASSWORD_COMMAND"] == "(set)" and "smtp-secret-entry" not in str(shown)
