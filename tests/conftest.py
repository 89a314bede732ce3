import pytest

from tests.relay import *  # noqa: F401,F403
from tests.relay import RELAY_LOGIN, RELAY_PASSWORD
from tests.shim import *  # noqa: F401,F403
from tests.shim import OUTPUTS, assert_no_secret


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: runs the real console script (also run on Debian's python3)")


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_output():
    """After the whole session: the relay password appears in no output, log or queue file."""
    yield
    assert_no_secret(OUTPUTS, RELAY_LOGIN, RELAY_PASSWORD)
