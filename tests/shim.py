"""Run the real `sendmail-shim` console script as a subprocess, configured for a test relay.

`SHIM_PYTHON` picks the interpreter (default: this one). `make test-debian` sets it to
/usr/bin/python3 so the end-to-end tests also prove Debian's python3-keyring/python3-dotenv work.
Every output of every run is kept and scanned for the password at the end of the session.
"""

import base64
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHIM = ROOT / "bin" / "sendmail-shim"
SHIM_PYTHON = os.environ.get("SHIM_PYTHON") or sys.executable

__all__ = ["Result", "Shim", "shim", "shim_factory", "secret_forms", "assert_no_secret", "holds_tokens", "wait_for",
           "OUTPUTS", "TOKENS"]


def readable_by_others(path: Path = ROOT) -> bool:
    """Whether another user can read `path` (the source tree, for tests that switch users): it
    lets others read, and it and every directory above it let others through (`mktemp -d` does not)."""
    return bool(path.stat().st_mode & 0o004) and all(p.stat().st_mode & 0o001 for p in (path, *path.parents))

OUTPUTS: list[str] = []  # everything any shim run printed or logged, for the session-wide scan
# OAuth2 secrets the test IdP (tests/idp.py) knows of: client secrets, access and refresh tokens
TOKENS: set[str] = set()


@dataclass
class Result:
    exit_code: int
    stdout: bytes
    stderr: str


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def secret_forms(user: str, password: str) -> list[str]:
    """The password as it could leak: plain, AUTH PLAIN's base64 (with the login), AUTH LOGIN's
    base64 of the password and of the login (the transcript hides both of AUTH LOGIN's lines);
    and every OAuth2 secret in `TOKENS`, plain, base64, and as XOAUTH2's and OAUTHBEARER's SASL
    strings (base64, with the login)."""
    forms = [password, _b64(f"\0{user}\0{password}"), _b64(password), _b64(user)]
    for token in sorted(TOKENS):
        forms += [token, _b64(token), _b64(f"user={user}\x01auth=Bearer {token}\x01\x01"),
                  _b64(f"n,a={user},\x01auth=Bearer {token}\x01\x01")]
    return forms


def holds_tokens(path: Path) -> bool:
    """An OAuth2 token cache (``tokens/<login>.json`` in a spool): it holds tokens on purpose."""
    return path.parent.name == "tokens"


def wait_for(condition, timeout: float = 30.0, what: str = "the expected event") -> None:
    """Wait for something another process does; fails only if it never happens (so `timeout` is a
    bound, never a speed claim)."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"{what} did not happen within {timeout:g}s")
        time.sleep(0.02)


def assert_no_secret(texts, user: str, password: str) -> None:
    for form in secret_forms(user, password):
        for text in texts:
            assert form not in text, "the password leaked"


class Shim:
    """A home directory with a config file for one relay, and a way to run the shim in it."""

    def __init__(self, home: Path, relay, password: str | None, **overrides):
        self.home = home
        self.relay = relay
        self.queue_dir = home / "queue"
        self.log_file = home / "mail.log"
        self.config_file = home / "sendmail-shim.env"
        self.credentials_file = home / "credentials"
        settings = dict(relay.config_env()) if relay else {}
        settings.update(
            SENDMAIL_SHIM_QUEUE_DIR=str(self.queue_dir),
            SENDMAIL_SHIM_LOG_FILE=str(self.log_file),
            SENDMAIL_SHIM_CREDENTIALS_FILE=str(self.credentials_file),
            SENDMAIL_SHIM_SYSLOG="no",
            SMTP_TIMEOUT="5",
        )
        settings.update(overrides)
        self.write_config(settings)
        self.env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(home),
            "LANG": "C.UTF-8",
            "SENDMAIL_SHIM_CONFIG": str(self.config_file),
        }
        if password is not None:
            self.run("--set-password", stdin=password.encode() + b"\n")

    def write_config(self, settings: dict) -> None:
        self.settings = settings
        self.config_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items() if v is not None))

    def run(self, *args, stdin: bytes = b"", expect_exit: int | None = 0, env: dict | None = None,
            timeout: float = 60, argv0: str | None = None) -> Result:
        command = [SHIM_PYTHON, str(SHIM), *args]
        proc = subprocess.run(command, input=stdin, capture_output=True, timeout=timeout,
                              env={**self.env, **(env or {})}, cwd=self.home)
        result = Result(proc.returncode, proc.stdout, proc.stderr.decode("utf-8", "replace"))
        OUTPUTS.extend([result.stderr, proc.stdout.decode("utf-8", "replace")])
        if expect_exit is not None and result.exit_code != expect_exit:
            raise AssertionError(f"exit {result.exit_code} (expected {expect_exit}); stderr: {result.stderr}")
        return result

    def log_lines(self) -> list[str]:
        text = self.log_file.read_text() if self.log_file.exists() else ""
        OUTPUTS.append(text)
        return text.splitlines()


@pytest.fixture
def shim_factory(tmp_path, relay_password):
    made = []

    def make(relay, password: str | None = relay_password, **overrides) -> Shim:
        home = tmp_path / f"home{len(made)}"
        home.mkdir()
        made.append(Shim(home, relay, password, **overrides))
        return made[-1]

    yield make
    for shim_home in made:
        shim_home.log_lines()
        for path in shim_home.home.rglob("*"):
            if path.is_file() and path != shim_home.credentials_file and not holds_tokens(path):
                OUTPUTS.append(path.read_bytes().decode("utf-8", "replace"))


@pytest.fixture
def shim(shim_factory, relay):
    """The shim configured for the default relay (implicit TLS, AUTH, 163's sender rule)."""
    return shim_factory(relay, SENDMAIL_SHIM_DELIVERY="interactive")
