"""The SMTP password: the project's credential file, SMTP_PASSWORD_COMMAND, keyring backends.

Real files under tmp_path, real subprocesses; nothing is mocked. Tests that change file owners or
groups need root (as in CI) and are skipped otherwise.
"""

import importlib.metadata
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sendmail_shim import config, credentials, credstore
from sendmail_shim.errors import EX_CONFIG, EX_USAGE, ConfigError, UsageError
from sendmail_shim.secret import Secret
from tests.shim import readable_by_others

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "Tr0ub4dor&3-授权码"
USER = "alice@163.com"
OTHER_GID = 4242  # groups that need not exist: root may chown to any gid
FOREIGN_GID = 4243

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changes file owners and groups: needs root")


def make_config(credentials_file, **values) -> config.Config:
    values = {"SMTP_USER": USER, "SMTP_PROVIDER": "163", "SENDMAIL_SHIM_CREDENTIALS_FILE": str(credentials_file),
              **values}
    return config.build({k: v for k, v in values.items() if v is not None}, os.environ)


def assert_clean(exc: BaseException, secret: str = PASSWORD) -> None:
    """The password appears nowhere in the exception, its hint, or anything chained to it."""
    while exc is not None:
        for value in (str(exc), repr(exc), *vars(exc).values()):
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            assert secret not in text
        exc = exc.__cause__ or exc.__context__


def config_error(function, *args, **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        function(*args, **kwargs)
    assert info.value.exit_code == EX_CONFIG
    assert_clean(info.value)
    return info.value


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def cred_file(tmp_path) -> Path:
    return tmp_path / "etc" / "credentials"


@pytest.fixture
def cfg(cred_file) -> config.Config:
    return make_config(cred_file)


def run_python(code: str, env: dict, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT, capture_output=True,
        text=True, timeout=30, **kwargs,
    )


def hermetic_env(tmp_path, **extra) -> dict:
    """No desktop session, no keyring configuration, no user config: a headless server."""
    return {
        "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
        "XDG_DATA_HOME": str(tmp_path / "data"), "PYTHONPATH": str(ROOT), **extra,
    }


# --- the project's credential file -------------------------------------------------------------


def test_set_get_delete_round_trip(cfg, cred_file):
    assert credentials.set_password(cfg, Secret(PASSWORD)) == str(cred_file)
    assert credentials.get_password(cfg).reveal() == PASSWORD
    assert credentials.readable(cfg)
    assert credentials.delete_password(cfg) == str(cred_file)
    error = config_error(credentials.get_password, cfg)
    assert "--set-password" in str(error)


def test_the_oauth2_refresh_token_has_its_own_entry_beside_the_client_secret(cred_file):
    cfg = make_config(cred_file, SMTP_AUTH="xoauth2", SMTP_OAUTH2_FLOW="client_credentials")
    error = config_error(credentials.get_refresh_token, cfg)
    assert "--oauth2-login" in str(error) and str(cred_file) in str(error)
    credentials.set_password(cfg, Secret(PASSWORD))  # --set-password: the client secret
    assert credentials.set_refresh_token(cfg, Secret("refresh-1")) == str(cred_file)
    credentials.set_refresh_token(cfg, Secret("refresh-2"))  # rotated: replaced
    assert credentials.get_refresh_token(cfg).reveal() == "refresh-2"
    assert credentials.get_secret(cfg).reveal() == PASSWORD and mode_of(cred_file) == 0o600


def test_entries_are_per_user_and_survive_other_changes(cred_file):
    alice, bob = make_config(cred_file), make_config(cred_file, SMTP_USER="bob@example.com")
    credentials.set_password(alice, Secret(PASSWORD))
    credentials.set_password(bob, Secret("bob-secret"))
    credentials.set_password(alice, Secret(PASSWORD + "2"))
    credentials.delete_password(bob)
    assert credentials.get_password(alice).reveal() == PASSWORD + "2"
    assert json.loads(cred_file.read_text()) == {"sendmail-shim": {USER: PASSWORD + "2"}}
    assert [p.name for p in cred_file.parent.iterdir()] == ["credentials"]  # no temp file left


def test_missing_file_names_the_file_and_the_fix(cfg, cred_file):
    error = config_error(credentials.get_password, cfg)
    assert str(error).startswith(f"no password stored for {USER} in {cred_file}")
    assert "sendmail-shim --set-password" in str(error)
    assert "authorization code" in str(error)  # SMTP_PROVIDER=163
    assert not credentials.readable(cfg)


def test_missing_entry_for_this_user(cred_file):
    credentials.set_password(make_config(cred_file, SMTP_USER="bob@example.com"), Secret(PASSWORD))
    error = config_error(credentials.get_password, make_config(cred_file, SMTP_PROVIDER="custom"))
    assert str(error) == f"no password stored for {USER} in {cred_file} (run: sendmail-shim --set-password)"


def test_delete_of_nothing_says_so(cfg):
    assert "nothing to delete" in str(config_error(credentials.delete_password, cfg))


def test_no_smtp_user(cred_file):
    cfg = make_config(cred_file, SMTP_USER=None)
    for call in (credentials.get_password, credentials.delete_password):
        assert str(config_error(call, cfg)).startswith("SMTP_USER is not set")
    assert str(config_error(credentials.set_password, cfg, Secret(PASSWORD))).startswith("SMTP_USER is not set")


def test_empty_password_is_not_stored(cfg, cred_file):
    with pytest.raises(UsageError):
        credentials.set_password(cfg, Secret(""))
    assert not cred_file.exists()


def test_damaged_file_is_refused_without_quoting_it(cfg, cred_file):
    credentials.set_password(cfg, Secret(PASSWORD))
    cred_file.write_text(cred_file.read_text()[:-4])  # truncated JSON, the password still inside
    error = config_error(credentials.get_password, cfg)
    assert "is damaged" in str(error)


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_per_user_file_is_0600_in_a_0700_dir_whatever_the_umask(tmp_path, umask):
    path = tmp_path / "xdg" / "sendmail-shim" / "credentials"
    old = os.umask(umask)
    try:
        credstore.Store(str(path), group=None, system=False).set("sendmail-shim", USER, PASSWORD)
    finally:
        os.umask(old)
    assert (mode_of(path.parent), mode_of(path)) == (0o700, 0o600)


def test_system_file_without_the_group_is_0600_in_a_0755_dir(cred_file):
    old = os.umask(0o077)
    try:
        credstore.Store(str(cred_file), group=None, system=True).set("sendmail-shim", USER, PASSWORD)
    finally:
        os.umask(old)
    assert (mode_of(cred_file.parent), mode_of(cred_file)) == (0o755, 0o600)


@pytest.fixture
def service_group():
    """The sendmail-shim group, created for the test (and removed) when it does not exist."""
    if os.geteuid() != 0 or not shutil.which("groupadd"):
        pytest.skip("creating the sendmail-shim group needs root and groupadd")
    gid = credstore.service_gid()
    if gid is not None:
        yield gid
        return
    subprocess.run(["groupadd", "--system", credstore.SERVICE_GROUP], check=True)
    try:
        yield credstore.service_gid()
    finally:
        subprocess.run(["groupdel", credstore.SERVICE_GROUP], check=True)


def test_root_creates_the_system_file_0640_root_sendmail_shim(cfg, cred_file, service_group):
    credentials.set_password(cfg, Secret(PASSWORD))
    st = os.stat(cred_file)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, service_group)
    assert credentials.get_password(cfg).reveal() == PASSWORD  # the group-readable file is accepted


@needs_root
def test_an_update_keeps_the_mode_the_admin_chose(cred_file):
    credstore.Store(str(cred_file), group=None, system=True).set("sendmail-shim", USER, PASSWORD)
    credstore.Store(str(cred_file), group=OTHER_GID, system=True).set("sendmail-shim", "bob@x.org", "pw")
    st = os.stat(cred_file)
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o600, 0)


def stored_file(cred_file, mode: int, uid: int = 0, gid: int = 0) -> credstore.Store:
    credstore.Store(str(cred_file)).set("sendmail-shim", USER, PASSWORD)
    os.chown(cred_file, uid, gid)
    os.chmod(cred_file, mode)
    return credstore.Store(str(cred_file), group=OTHER_GID)


@needs_root
@pytest.mark.parametrize(
    "mode, gid, complaint",
    [
        (0o644, 0, "everyone can read it"),
        (0o604, OTHER_GID, "everyone can read it"),
        (0o666, 0, "others can change it"),
        (0o620, OTHER_GID, "others can change it"),
        (0o660, FOREIGN_GID, "others can change it"),
        (0o640, FOREIGN_GID, f"group {FOREIGN_GID} can read it"),
    ],
)
def test_loose_modes_are_refused(cred_file, mode, gid, complaint):
    store = stored_file(cred_file, mode, gid=gid)
    error = config_error(store.get, "sendmail-shim", USER)
    assert str(error).startswith(f"the credential file {cred_file} has mode {mode:04o}: {complaint}")
    assert f"chmod 600 {cred_file}" in str(error)


@needs_root
@pytest.mark.parametrize("mode", [0o600, 0o400, 0o640])
def test_owner_only_and_root_service_group_modes_are_accepted(cred_file, mode):
    assert stored_file(cred_file, mode, gid=OTHER_GID).get("sendmail-shim", USER) == PASSWORD


@needs_root
def test_group_read_needs_the_service_group_to_exist(cred_file):
    stored_file(cred_file, 0o640, gid=OTHER_GID)
    error = config_error(credstore.Store(str(cred_file), group=None).get, "sendmail-shim", USER)
    assert "can read it" in str(error)


@needs_root
def test_a_file_owned_by_someone_else_is_refused(cred_file):
    store = stored_file(cred_file, 0o600, uid=54321)
    assert "belongs to uid 54321" in str(config_error(store.get, "sendmail-shim", USER))


def test_a_world_writable_directory_is_refused_unless_sticky(cred_file):
    store = credstore.Store(str(cred_file))
    store.set("sendmail-shim", USER, PASSWORD)
    os.chmod(cred_file.parent, 0o777)
    error = config_error(store.get, "sendmail-shim", USER)
    assert f"chmod o-w {cred_file.parent}" in str(error)
    os.chmod(cred_file.parent, 0o1777)
    assert store.get("sendmail-shim", USER) == PASSWORD


def test_a_directory_in_place_of_the_file_is_refused(cred_file):
    cred_file.mkdir(parents=True)
    assert "not a regular file" in str(config_error(credstore.Store(str(cred_file)).get, "sendmail-shim", USER))


NOBODY = 65534


@pytest.fixture
def nobody_dir():
    """A directory user nobody owns and can reach (pytest's tmp_path is private to root)."""
    if os.geteuid() != 0 or not os.path.exists("/usr/bin/python3") or not readable_by_others():
        pytest.skip("needs root, /usr/bin/python3 and a world-readable source tree")
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="shim-cred-test-"))
    os.chown(path, NOBODY, NOBODY)
    yield path
    shutil.rmtree(path)


def run_as_nobody(code: str, home: Path) -> subprocess.CompletedProcess:
    """Debian's python3 as user nobody: the venv interpreter lives under root's private home."""
    return subprocess.run(
        ["/usr/bin/python3", "-c", textwrap.dedent(code)], user=NOBODY, group=NOBODY, extra_groups=[],
        env={"PATH": "/usr/bin:/bin", "HOME": str(home), "PYTHONPATH": str(ROOT)}, cwd="/",
        capture_output=True, text=True, timeout=30,
    )


def test_a_non_root_user_gets_a_private_file_in_the_xdg_config_dir(nobody_dir):
    result = run_as_nobody(
        f"""
        import os, sys
        from sendmail_shim import config, credentials
        from sendmail_shim.secret import Secret
        cfg = config.build({{"SMTP_USER": "{USER}"}}, os.environ)
        print(credentials.set_password(cfg, Secret("pw-of-nobody")))
        assert credentials.get_password(cfg).reveal() == "pw-of-nobody"
        assert "keyring" not in sys.modules
        os.chmod(credentials.credstore.locate(None).path, 0o640)
        try:
            credentials.get_password(cfg)
        except credentials.ConfigError as exc:
            print(exc)
        """,
        nobody_dir,
    )
    path = nobody_dir / ".config" / "sendmail-shim" / "credentials"
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == str(path)
    assert "has mode 0640: group nogroup can read it" in result.stdout.splitlines()[1]
    st = os.stat(path)
    assert (st.st_uid, mode_of(path.parent)) == (NOBODY, 0o700)


def test_an_unreadable_system_file_points_to_the_group_and_the_queue(nobody_dir):
    path = nobody_dir / "credentials"
    credstore.Store(str(path)).set("sendmail-shim", USER, PASSWORD)  # root-owned, 0600
    result = run_as_nobody(
        f"""
        import os
        from sendmail_shim import config, credentials
        cfg = config.build({{"SMTP_USER": "{USER}", "SENDMAIL_SHIM_CREDENTIALS_FILE": "{path}"}}, os.environ)
        print(credentials.readable(cfg))
        try:
            credentials.get_password(cfg)
        except credentials.ConfigError as exc:
            print(exc.exit_code, exc)
        """,
        nobody_dir,
    )
    assert result.returncode == 0, result.stderr
    readable, error = result.stdout.splitlines()
    assert readable == "False"
    assert error.startswith(f"78 cannot read the credential file {path}: permission denied")
    assert "member of group sendmail-shim" in error and "SENDMAIL_SHIM_DELIVERY=queue" in error
    assert PASSWORD not in result.stdout + result.stderr


# --- SMTP_PASSWORD_COMMAND ---------------------------------------------------------------------


def command_config(tmp_path, command: str, timeout: str = "5") -> config.Config:
    return make_config(tmp_path / "unused", SMTP_PASSWORD_COMMAND=command, SMTP_TIMEOUT=timeout)


def test_password_command_first_line(tmp_path):
    cfg = command_config(tmp_path, f"printf '%s\\nsecond line\\n' '{PASSWORD}'; echo noise >&2")
    assert credentials.get_password(cfg).reveal() == PASSWORD


def test_password_command_wins_over_the_store_and_storing_is_refused(tmp_path):
    cfg = command_config(tmp_path, "echo from-command")
    assert credentials.get_password(cfg).reveal() == "from-command"
    assert "SMTP_PASSWORD_COMMAND is set" in str(config_error(credentials.set_password, cfg, Secret(PASSWORD)))


def test_password_command_never_reads_the_message(tmp_path):
    """Its stdin is /dev/null: the message sendmail reads from stdin stays whole."""
    message = "From: a@example.com\nTo: b@example.com\nSubject: hi\n\nbody\n"
    result = run_python(
        f"""
        import os, sys
        from sendmail_shim import config, credentials
        cfg = config.build({{"SMTP_USER": "{USER}", "SMTP_PASSWORD_COMMAND": "read line; echo got:$line"}}, os.environ)
        print(credentials.get_password(cfg).reveal())
        print(repr(sys.stdin.read()))
        """,
        hermetic_env(tmp_path), input=message,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["got:", repr(message)]


def test_password_command_failure_shows_status_and_stderr_excerpt(tmp_path):
    cfg = command_config(tmp_path, "echo 'gpg: decryption failed: No secret key' >&2; exit 2")
    error = config_error(credentials.get_password, cfg)
    assert str(error) == "SMTP_PASSWORD_COMMAND failed with exit status 2 (gpg: decryption failed: No secret key)"


@pytest.mark.parametrize(
    "stderr",
    [
        f"error: {PASSWORD}",  # the password it printed on stdout, repeated on stderr
        f"password={PASSWORD}",
        f"Token: {PASSWORD}",
    ],
)
def test_password_command_stderr_does_not_leak_secrets(tmp_path, stderr):
    cfg = command_config(tmp_path, f"echo '{PASSWORD}'; echo '{stderr}' >&2; exit 1")
    error = config_error(credentials.get_password, cfg)
    assert str(error).startswith("SMTP_PASSWORD_COMMAND failed with exit status 1 (")
    assert "***" in str(error)


def test_password_command_stderr_excerpt_is_one_short_line(tmp_path):
    cfg = command_config(tmp_path, "printf 'first\\n\\033[31m%0300d\\n' 0 >&2; exit 3")
    hint = config_error(credentials.get_password, cfg).hint
    assert len(hint) == 160 and hint.startswith("?[31m000") and hint.endswith("…")


def test_password_command_timeout_kills_its_process_group(tmp_path):
    pid_file = tmp_path / "pid"
    command = f"echo '{PASSWORD}'; sleep 30 & echo $! > {pid_file}; wait"
    cfg = command_config(tmp_path, command, timeout="0.5")
    error = config_error(credentials.get_password, cfg)
    assert str(error).startswith("SMTP_PASSWORD_COMMAND did not finish within 0.5 s")
    wait_until_dead(int(pid_file.read_text()))  # the grandchild, not only sh


def wait_until_dead(pid: int) -> None:
    """SIGKILL is delivered asynchronously: poll (bounded) until the process is gone or a zombie."""
    stat_file = Path(f"/proc/{pid}/stat")
    for _ in range(1000):
        try:
            if stat_file.read_text().rpartition(") ")[2][0] in "ZX":
                return
        except FileNotFoundError:
            return
        time.sleep(0.01)
    pytest.fail(f"process {pid} is still running")


@pytest.mark.parametrize("command", ["true", "printf '\\nsecond\\n'"])
def test_password_command_with_empty_first_line(tmp_path, command):
    assert "printed nothing" in str(config_error(credentials.get_password, command_config(tmp_path, command)))


def test_password_command_output_must_be_utf8(tmp_path):
    error = config_error(credentials.get_password, command_config(tmp_path, f"printf '\\377{PASSWORD}\\n'"))
    assert str(error) == "SMTP_PASSWORD_COMMAND printed a password that is not UTF-8"


def test_password_command_killed_by_a_signal(tmp_path):
    error = config_error(credentials.get_password, command_config(tmp_path, "kill -TERM $$"))
    assert str(error) == "SMTP_PASSWORD_COMMAND was killed by signal 15"


# --- SMTP_KEYRING_BACKEND ----------------------------------------------------------------------


def test_null_keyring_means_no_password(cred_file):
    cfg = make_config(cred_file, SMTP_KEYRING_BACKEND="keyring.backends.null.Keyring")
    error = config_error(credentials.get_password, cfg)
    assert str(error).startswith(f"no password stored for {USER} in keyring backend keyring.backends.null.Keyring")
    assert "--set-password" in str(error)


def test_fail_keyring_is_a_config_error_in_one_line(cred_file):
    cfg = make_config(cred_file, SMTP_KEYRING_BACKEND="keyring.backends.fail.Keyring")
    error = config_error(credentials.get_password, cfg)
    assert str(error).startswith("keyring backend keyring.backends.fail.Keyring failed: NoKeyringError: ")
    assert "\n" not in str(error)


@pytest.mark.parametrize("path", ["no.such.Backend", "keyring.backends.null.NoSuchClass", "os.path.join", "Keyring"])
def test_bogus_backend_path(cred_file, path):
    error = config_error(credentials.get_password, make_config(cred_file, SMTP_KEYRING_BACKEND=path))
    assert str(error).startswith(f"SMTP_KEYRING_BACKEND={path}: ")


def test_prompting_backends_are_refused(cred_file):
    cfg = make_config(cred_file, SMTP_KEYRING_BACKEND="keyring.backends.chainer.ChainerBackend")
    for call in (credentials.get_password, credentials.delete_password):
        assert "refused, it may ask for a master password on stdin" in str(config_error(call, cfg))


LEAKY_BACKEND = """
import keyring.backend, keyring.errors

class Leaky(keyring.backend.KeyringBackend):
    priority = 1

    def get_password(self, service, username):
        raise OSError("permission denied on /var/www/.local/share/python_keyring")

    def set_password(self, service, username, password):
        raise keyring.errors.PasswordSetError(f"cannot store {password!r}\\nsecond line")
"""


def test_a_failing_backend_never_shows_the_password(tmp_path, monkeypatch, cred_file):
    (tmp_path / "leaky_backend.py").write_text(LEAKY_BACKEND)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = make_config(cred_file, SMTP_KEYRING_BACKEND="leaky_backend.Leaky")
    error = config_error(credentials.set_password, cfg, Secret(PASSWORD))
    assert str(error).startswith("keyring backend leaky_backend.Leaky failed: PasswordSetError: cannot store '***'")
    error = config_error(credentials.get_password, cfg)
    assert "OSError: permission denied on /var/www" in str(error)


def test_own_backend_path_uses_the_credential_file(cred_file):
    cfg = make_config(cred_file, SMTP_KEYRING_BACKEND=credentials.OWN_BACKEND)
    credentials.set_password(cfg, Secret(PASSWORD))
    assert credentials.get_password(make_config(cred_file)).reveal() == PASSWORD


@pytest.mark.parametrize("backend", [None, credentials.OWN_BACKEND])
def test_the_default_path_never_imports_keyring(tmp_path, backend):
    env = hermetic_env(tmp_path, SENDMAIL_SHIM_SMTP_USER=USER,
                       SENDMAIL_SHIM_CREDENTIALS_FILE=str(tmp_path / "credentials"))
    if backend:
        env["SENDMAIL_SHIM_SMTP_KEYRING_BACKEND"] = backend
    result = run_python(
        """
        import os, sys
        from sendmail_shim import config, credentials
        from sendmail_shim.secret import Secret
        cfg = config.load(os.environ)
        credentials.set_password(cfg, Secret("pw"))
        assert credentials.get_password(cfg).reveal() == "pw"
        print(sorted(name for name in sys.modules if name.split(".")[0] in ("keyring", "jaraco")))
        """,
        env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- the keyring entry point -------------------------------------------------------------------


def test_the_backend_is_registered_through_the_entry_point():
    entry_points = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="keyring.backends")}
    assert entry_points.get("sendmail_shim") == "sendmail_shim.keyring_backend"


DETECT = "import keyring; print(type(keyring.get_keyring()).__name__)"


def test_auto_detection_ignores_the_backend_without_a_credential_file(tmp_path):
    result = run_python(DETECT, hermetic_env(tmp_path, SENDMAIL_SHIM_CREDENTIALS_FILE=str(tmp_path / "none")))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() not in ("", "ShimFileKeyring")


def test_auto_detection_sees_the_backend_when_the_file_exists(tmp_path):
    """The counterpart of the test above: the entry point does load the backend."""
    credstore.Store(str(tmp_path / "credentials")).set("sendmail-shim", USER, PASSWORD)
    result = run_python(DETECT, hermetic_env(tmp_path, SENDMAIL_SHIM_CREDENTIALS_FILE=str(tmp_path / "credentials")))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ShimFileKeyring"


def test_the_backend_uses_the_file_the_shim_configuration_names(tmp_path):
    """Not only the environment: a key in the config file (or the system/per-user choice that
    the config files make) moves the backend's file as it moves the shim's."""
    config_file = tmp_path / "sendmail-shim.env"
    config_file.write_text(f"SMTP_USER={USER}\nSENDMAIL_SHIM_CREDENTIALS_FILE={tmp_path / 'from-config'}\n")
    env = hermetic_env(tmp_path, SENDMAIL_SHIM_CONFIG=str(config_file))
    result = run_python(
        f"""
        import sys
        from sendmail_shim.keyring_backend import ShimFileKeyring
        ShimFileKeyring().set_password("sendmail-shim", "{USER}", sys.stdin.read())
        """,
        env, input=PASSWORD,  # not in argv
    )
    assert result.returncode == 0, result.stderr
    assert credstore.Store(str(tmp_path / "from-config")).get("sendmail-shim", USER) == PASSWORD


def test_keyring_api_on_the_backend_holds_only_sendmail_shim(tmp_path, monkeypatch):
    import keyring.errors

    from sendmail_shim.keyring_backend import ShimFileKeyring

    monkeypatch.setenv("SENDMAIL_SHIM_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    ring = ShimFileKeyring()
    ring.set_password("sendmail-shim", USER, PASSWORD)
    assert ring.get_password("sendmail-shim", USER) == PASSWORD
    assert ring.get_password("pypi", USER) is None
    with pytest.raises(keyring.errors.PasswordSetError):
        ring.set_password("pypi", USER, "token")
    ring.delete_password("sendmail-shim", USER)
    with pytest.raises(keyring.errors.PasswordDeleteError):
        ring.delete_password("sendmail-shim", USER)
    assert json.loads((tmp_path / "credentials").read_text()) == {}


# --- reading a new password --------------------------------------------------------------------


def pipe_with(data: bytes):
    read_fd, write_fd = os.pipe()
    os.write(write_fd, data)
    os.close(write_fd)
    return open(read_fd, encoding="utf-8")


@pytest.mark.parametrize("data", [b"pw with spaces\nnext line\n", b"pw with spaces\r\n", b"pw with spaces"])
def test_read_new_password_from_a_pipe(data, capsys):
    with pipe_with(data) as stdin:
        assert credentials.read_new_password(stdin, sys.stderr).reveal() == "pw with spaces"
    assert capsys.readouterr().err == ""  # no prompt when nobody is typing


@pytest.mark.parametrize("data", [b"", b"\n"])
def test_read_new_password_refuses_empty(data):
    with pipe_with(data) as stdin, pytest.raises(UsageError) as info:
        credentials.read_new_password(stdin, sys.stderr)
    assert info.value.exit_code == EX_USAGE
