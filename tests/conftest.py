import json
from pathlib import Path

import pytest

from sendmail_shim.errors import ShimError
from tests.faults import COUNTS, listeners, raw_fault
from tests.relay import *
from tests.relay import RELAY_LOGIN, RELAY_PASSWORD
from tests.provider_relay import clock_file  # noqa: F401 (a fixture)
from tests.shim import *
from tests.shim import OUTPUTS, assert_no_secret, holds_tokens, secret_forms

COUNTS_FILE = Path(__file__).with_name(".counts.json")  # gitignored; README's figures come from it
# Files that hold the password on purpose: the credential stores and SMTP_PASSWORD_COMMAND's source
# (and the OAuth2 token caches, tokens/ in a spool: `holds_tokens`).
SECRET_HOLDERS = {"credentials", "password"}


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: runs the real console script (also run on Debian's python3)")
    config.addinivalue_line("markers", "slow: the 100 MB message (run by make test, once)")


def pytest_runtest_logreport(report):
    """What each test printed, logged or failed with is scanned too (the failure's message, not
    its traceback, which shows the fixtures' values: relay_password among them)."""
    crash = getattr(report.longrepr, "reprcrash", None)
    OUTPUTS.append(crash.message if crash else str(report.longrepr or ""))
    OUTPUTS.extend(text for _, text in report.sections)


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_output(request, tmp_path_factory):
    """After the whole session: the relay password (and its AUTH base64 forms) appears in no
    output, log, queue file, temporary file or exception message of any test."""
    messages = []
    original = ShimError.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        messages.append(str(self))

    ShimError.__init__ = recording
    yield
    ShimError.__init__ = original
    files = []
    for path in tmp_path_factory.getbasetemp().rglob("*"):
        if path.name not in SECRET_HOLDERS and not holds_tokens(path) and not path.is_symlink() and path.is_file():
            try:
                files.append(path.read_bytes().decode("utf-8", "replace"))
            except OSError:  # gone meanwhile, or another test user's private file
                continue
    texts = OUTPUTS + messages + files
    assert_no_secret(texts, RELAY_LOGIN, RELAY_PASSWORD)
    COUNTS.update({
        "leak scan: texts": len(texts),
        "leak scan: outputs and logs": len(OUTPUTS),
        "leak scan: exception messages": len(messages),
        "leak scan: files": len(files),
        "leak scan: megabytes": round(sum(map(len, texts)) / 1e6, 1),
        "leak scan: password forms": len(secret_forms(RELAY_LOGIN, RELAY_PASSWORD)),
        "leak scan: hits": 0,
    })
    config = request.config
    if not config.option.markexpr and not config.option.keyword and not config.args[1:] \
            and (config.rootpath / config.args[0]).resolve() == Path(__file__).parent and COUNTS["fault cases"]:
        COUNTS_FILE.write_text(json.dumps(dict(sorted(COUNTS.items())), indent=1) + "\n")


def pytest_terminal_summary(terminalreporter):
    if COUNTS:
        terminalreporter.write_line("hardening: " + ", ".join(f"{k}={v}" for k, v in sorted(COUNTS.items())))
