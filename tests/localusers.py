"""Local accounts for the tests that cross a privilege boundary, and a server-like installation
of the shim owned by them (`ServiceSite`): the spool with the package's owners and modes, the
submission service (`sendmail-shim -bd`) running as the service user, callers as other users."""

import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from sendmail_shim.queue import Queue
from tests.shim import OUTPUTS, ROOT

# Other users cannot run the venv's interpreter (it lives under root's private home): the daemon
# and the callers run on Debian's, as the .deb does.
SYSTEM_PYTHON = "/usr/bin/python3"

_serial = itertools.count()

needs_other_users = [
    pytest.mark.skipif(os.geteuid() != 0, reason="creating users and switching to them needs root"),
    pytest.mark.skipif(not shutil.which("setpriv") or not os.path.exists(SYSTEM_PYTHON),
                       reason="needs setpriv and /usr/bin/python3"),
]


@contextmanager
def accounts(*roles: str):
    """Throwaway system users (each with its own group), one per role; removed afterwards.
    Unique names: another test run may be going on."""
    names = [f"shim{role}{os.getpid() % 100000}{next(_serial)}" for role in roles]
    created = []
    try:
        for name in names:
            subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                            "--shell", "/usr/sbin/nologin", name], check=True, capture_output=True)
            created.append(name)
        yield [pwd.getpwnam(name) for name in names]
    finally:
        for name in reversed(created):
            stop_processes_of(pwd.getpwnam(name).pw_uid)  # e.g. a queue run the daemon left going
            subprocess.run(["userdel", "--force", name], capture_output=True)
            subprocess.run(["groupdel", name], capture_output=True)


def as_user(user: str, *command: str, **kwargs) -> subprocess.CompletedProcess:
    """`command` as `user` (its own group only), output captured and kept for the leak scan."""
    proc = subprocess.run(["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *command],
                          capture_output=True, cwd="/", **kwargs)
    OUTPUTS.extend([proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")])
    return proc


def start_as_user(user: str, *command: str, **kwargs) -> subprocess.Popen:
    """`command` as `user` (its own group only) in the background, e.g. a client that holds
    connections open while the test goes on; stop it with `stop_processes_of` or by its pid."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *command],
                            cwd="/", **kwargs)


def processes_of(uid: int) -> list[int]:
    """The pids of the live (not zombie) processes whose real or effective uid is `uid`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as status:
                fields = dict(line.split(":", 1) for line in status if ":" in line)
        except OSError:
            continue  # gone meanwhile
        uids = fields.get("Uid", "").split()[:2]
        if str(uid) in uids and not fields.get("State", "").strip().startswith("Z"):
            pids.append(int(entry))
    return pids


def stop_processes_of(uid: int) -> None:
    """SIGKILL, pid by pid, what a throwaway user still runs (a queue run a test left busy, an
    attacker's client), so that its account can be removed."""
    for _attempt in range(50):
        pids = processes_of(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


class ServiceSite:
    """A server's installation in a directory others can reach: the spool owned by `service`
    (0711, everything in it 0700), a root-owned config file, the password readable by `service`
    only, the submission socket, and the service's log file."""

    def __init__(self, base: Path, service, relay, password: str, **overrides):
        self.base, self.service, self.relay = base, service, relay
        # the program as installed: a copy other users can read, whatever the checkout's mode
        source = base / "src"
        for part in ("sendmail_shim", "bin"):
            shutil.copytree(ROOT / part, source / part, ignore=shutil.ignore_patterns("__pycache__"))
        self.shim = source / "bin" / "sendmail-shim"
        self.spool = base / "spool"
        self.spool.mkdir()
        os.chown(self.spool, service.pw_uid, service.pw_gid)
        self.spool.chmod(0o711)  # as tmpfiles.d makes /var/spool/sendmail-shim
        self.queue = Queue(str(self.spool))
        self.queue.ensure()  # as root: the rest, owned like the spool
        self.socket = base / "run" / "submit.sock"
        self.socket.parent.mkdir(mode=0o755)
        password_file = base / "password"
        password_file.write_text(password + "\n")
        os.chown(password_file, service.pw_uid, service.pw_gid)
        password_file.chmod(0o600)
        self.log_file = base / "mail.log"
        self.log_file.touch()
        os.chown(self.log_file, service.pw_uid, service.pw_gid)
        settings = {
            **relay.config_env(),
            "SMTP_CA_FILE": shutil.copy(relay.ca_file, base / "ca.pem"),  # pytest's tmp_path is root's only
            "SMTP_PASSWORD_COMMAND": f"cat {password_file}",
            "SENDMAIL_SHIM_QUEUE_DIR": str(self.spool),
            "SENDMAIL_SHIM_SUBMIT_SOCKET": str(self.socket),
            "SENDMAIL_SHIM_LOG_FILE": str(self.log_file),
            "SENDMAIL_SHIM_SYSLOG": "no",
            "SMTP_TIMEOUT": "5",
            **overrides,
        }
        self.config_file = base / "sendmail-shim.env"
        self.config_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
        self.config_file.chmod(0o644)
        self.daemon: subprocess.Popen | None = None

    def env(self, **extra) -> dict:
        return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/nonexistent",
                "SENDMAIL_SHIM_CONFIG": str(self.config_file), **extra}

    def start_daemon(self) -> None:
        """``sendmail-shim -bd`` started by root, as an init script would; it becomes the service user."""
        self.daemon = subprocess.Popen([SYSTEM_PYTHON, str(self.shim), "-bd"], env=self.env(), cwd="/",
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                raise AssertionError(f"-bd exited: {self.daemon.stdout.read().decode(errors='replace')}")
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(str(self.socket))
                return
            except OSError:
                time.sleep(0.05)
            finally:
                probe.close()
        raise AssertionError("the submission service did not start")

    def stop_daemon(self) -> str:
        if self.daemon is None:
            return ""
        self.daemon.send_signal(signal.SIGTERM)
        try:
            out, _ = self.daemon.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            out, _ = self.daemon.communicate()
        self.daemon = None
        text = out.decode(errors="replace")
        OUTPUTS.append(text)
        return text

    def send(self, user: str, *args: str, stdin: bytes, timeout: float = 60) -> subprocess.CompletedProcess:
        """The real console script as `user`."""
        command = ["env", "-i", *(f"{k}={v}" for k, v in self.env().items()), SYSTEM_PYTHON, str(self.shim), *args]
        return as_user(user, *command, input=stdin, timeout=timeout)

    def log_text(self) -> str:
        text = self.log_file.read_text()
        OUTPUTS.append(text)
        return text


@contextmanager
def service_site(relay, password: str, roles=("svc", "atk", "vic"), **overrides):
    """Accounts for `roles` (the first is the service user) and a `ServiceSite` with its daemon
    running; everything removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="shim-server-", dir="/tmp"))  # traversable by other users
    base.chmod(0o755)
    try:
        with accounts(*roles) as users:
            site = ServiceSite(base, users[0], relay, password, **overrides)
            try:
                site.start_daemon()
                yield site, users
            finally:
                site.stop_daemon()
                for path in base.rglob("*"):
                    if path.is_file() and path.name != "password" and "src" not in path.relative_to(base).parts[:1]:
                        OUTPUTS.append(path.read_bytes().decode(errors="replace"))
    finally:
        shutil.rmtree(base, ignore_errors=True)


__all__ = ["ROOT", "SYSTEM_PYTHON", "accounts", "as_user", "needs_other_users", "processes_of", "service_site",
           "start_as_user", "stop_processes_of", "ServiceSite"]
