"""sendmail-shim's credential file as a keyring backend (entry point ``keyring.backends``).

Registered so that ``PYTHON_KEYRING_BACKEND=sendmail_shim.keyring_backend.ShimFileKeyring keyring
set sendmail-shim alice@163.com`` works. The shim itself never goes through this class for its own
file (`credentials` calls `credstore` directly, without importing keyring).

The backend must not take over other programs in the same environment (pip, twine): its priority
is below 1, it is viable only when a readable credential file exists, and it holds only the
``sendmail-shim`` service.
"""

import os

import keyring.backend
import keyring.errors

from . import credstore
from .credentials import SERVICE
from .errors import ShimError


class _classproperty:
    """Read-only class property; keyring's own helper moved between 23.9 and 25.x."""

    def __init__(self, getter):
        self.getter = getter

    def __get__(self, instance, owner):
        return self.getter(owner)


def _store() -> credstore.Store:
    """The file the shim itself reads: its configuration (files and environment) decides."""
    from . import config

    return credstore.locate(config.load(os.environ).credentials_file)


class ShimFileKeyring(keyring.backend.KeyringBackend):
    """The credential file of sendmail-shim's configuration (SENDMAIL_SHIM_CREDENTIALS_FILE, else
    the system or per-user default, chosen as the shim chooses it)."""

    @_classproperty
    def priority(cls) -> float:
        path = _store().path
        if not os.access(path, os.R_OK, effective_ids=True):
            raise RuntimeError(f"no readable sendmail-shim credential file at {path}")
        return 0.9  # below 1: never preferred over a real keyring

    def get_password(self, service, username):
        if service != SERVICE:
            return None
        try:
            return _store().get(service, username)
        except ShimError as exc:
            raise keyring.errors.KeyringError(str(exc)) from None

    def set_password(self, service, username, password):
        if service != SERVICE:
            raise keyring.errors.PasswordSetError(f"this backend stores only the {SERVICE} service")
        try:
            _store().set(service, username, password)
        except ShimError as exc:
            raise keyring.errors.PasswordSetError(str(exc)) from None

    def delete_password(self, service, username):
        try:
            deleted = service == SERVICE and _store().delete(service, username)
        except ShimError as exc:
            raise keyring.errors.PasswordDeleteError(str(exc)) from None
        if not deleted:
            raise keyring.errors.PasswordDeleteError(f"no password stored for {username}")
