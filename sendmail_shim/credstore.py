"""The project's credential file: service → username → password, readable by its owner only.

Plain file code on purpose: the default delivery path must not import keyring (~45–90 ms).

The file is JSON (``{"sendmail-shim": {"alice@163.com": "…"}}``), replaced atomically on every
change. Like ssh, a reader refuses a file others could read or write. A root-owned file may be
readable by the ``sendmail-shim`` group (the system file, ``0640 root:sendmail-shim``, so that
web servers and cron jobs in that group can send); a per-user file must be ``0600``.
"""

import fcntl
import json
import os
import stat
from contextlib import contextmanager
from typing import NamedTuple

from . import config, fsio
from .errors import CantCreate, ConfigError
from .i18n import _

SERVICE_GROUP = config.SERVICE_USER  # the service user's group may read the system file

_QUEUE_HINT = _(
    "run as root or as a member of group sendmail-shim, or use the queue: with "
    "SENDMAIL_SHIM_DELIVERY=queue the sendmail-shim queue runner sends the message"
)


class Store(NamedTuple):
    """One credential file.

    ``group``: the gid that may read a root-owned file (the sendmail-shim group), None if that
    group does not exist. ``system``: files are created as the system file (directory 0755, file
    0640 root:group, or 0600 without the group); otherwise as a per-user file (0700 / 0600).
    """

    path: str
    group: int | None = None
    system: bool = False

    def get(self, service: str, username: str) -> str | None:
        """The stored password, or None when the file or the entry does not exist.

        Raises ConfigError when the file is unreadable, has loose permissions or is damaged.
        """
        data = self._read()[0]
        return data.get(service, {}).get(username)

    def set(self, service: str, username: str, password: str) -> None:
        """Store a password, creating the directory and file with owner-only modes if needed."""
        self._make_dir()
        with self._locked_dir() as dir_fd:
            data, st = self._read()
            data.setdefault(service, {})[username] = password
            self._write(data, st, dir_fd)

    def delete(self, service: str, username: str) -> bool:
        """Remove an entry; False when there was nothing to remove."""
        if not os.path.isdir(self._directory):
            return False
        with self._locked_dir() as dir_fd:
            data, st = self._read()
            entries = data.get(service, {})
            if username not in entries:
                return False
            del entries[username]
            if not entries:
                del data[service]
            self._write(data, st, dir_fd)
            return True

    @property
    def _directory(self) -> str:
        return os.path.dirname(os.path.abspath(self.path))

    def _read(self) -> tuple[dict, os.stat_result | None]:
        try:
            check_directory(self._directory, os.stat(self._directory))
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return {}, None
        except PermissionError:
            raise ConfigError(
                _("cannot read the credential file {path}: permission denied").format(path=self.path), _QUEUE_HINT
            ) from None
        except OSError as exc:
            raise ConfigError(_("cannot read the credential file {path}: {reason}").format(
                path=self.path, reason=exc.strerror)) from None
        try:
            st = os.fstat(fd)  # checked on the open file: no window for a swap after the check
            check_file(self.path, st, self.group)
            with open(fd, "rb", closefd=False) as stream:
                raw = stream.read()
        except OSError as exc:
            raise ConfigError(_("cannot read the credential file {path}: {reason}").format(
                path=self.path, reason=exc.strerror)) from None
        finally:
            os.close(fd)
        return parse(self.path, raw), st

    def _make_dir(self) -> None:
        directory = self._directory
        if os.path.isdir(directory):
            return
        mode = 0o755 if self.system else 0o700  # /etc/sendmail-shim also holds the config
        try:
            os.makedirs(directory, mode)
            os.chmod(directory, mode)  # the caller's umask must not matter
        except FileExistsError:
            pass
        except OSError as exc:
            raise CantCreate(_("cannot create the directory {path}: {reason}").format(
                path=directory, reason=exc.strerror)) from None

    @contextmanager
    def _locked_dir(self):
        """The directory, opened and locked: serialises writers, and is fsynced after a rename."""
        try:
            dir_fd = os.open(self._directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise CantCreate(_("cannot open the directory {path}: {reason}").format(
                path=self._directory, reason=exc.strerror)) from None
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX)
            yield dir_fd
        finally:
            os.close(dir_fd)

    def _write(self, data: dict, old: os.stat_result | None, dir_fd: int) -> None:
        mode, gid = self._mode_for(old)
        try:  # mode and group before any secret is written; the umask must not matter
            fsio.write_atomic(self.path, serialize(data), mode=mode, owner=None if gid is None else (-1, gid),
                              dir_fd=dir_fd)
        except OSError as exc:
            raise CantCreate(_("cannot write the credential file {path}: {reason}").format(
                path=self.path, reason=exc.strerror)) from None

    def _mode_for(self, old: os.stat_result | None) -> tuple[int, int | None]:
        """(mode, group to set) for a new version of the file: keep a vetted file's choice."""
        if old is not None:
            mode = stat.S_IMODE(old.st_mode) & 0o640
            return mode, old.st_gid if mode & 0o040 else None
        if self.system and self.group is not None:
            return 0o640, self.group
        return 0o600, None


def locate(path: str | None, environ=None) -> Store:
    """The store at ``path`` (SENDMAIL_SHIM_CREDENTIALS_FILE), else at the default location."""
    environ = os.environ if environ is None else environ
    return Store(
        path or config.default_credentials_file(environ),
        group=service_gid(),
        system=os.geteuid() == 0,
    )


def service_gid() -> int | None:
    import grp

    try:
        return grp.getgrnam(SERVICE_GROUP).gr_gid
    except KeyError:
        return None


def check_directory(directory: str, st: os.stat_result) -> None:
    """Refuse a directory where anyone could swap the file (world-writable without sticky bit)."""
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise ConfigError(
            _("the directory {path} of the credential file is writable by everyone").format(path=directory),
            _("run: {command}").format(command=f"chmod o-w {directory}"),
        )


def check_file(path: str, st: os.stat_result, group: int | None) -> None:
    """Refuse a file others could read or write (the ssh rule).

    Group read is allowed only on a root-owned file whose group is ``group``.
    """
    mode = stat.S_IMODE(st.st_mode)
    fix = _("run: {command}").format(command=f"chmod 600 {path}")
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(_("the credential file {path} is not a regular file").format(path=path))
    if st.st_uid not in (0, os.geteuid()):
        raise ConfigError(
            _("the credential file {path} belongs to uid {uid}, not to root or to you").format(
                path=path, uid=st.st_uid),
            _("run: {command}").format(command=f"chown {os.geteuid()} {path}"),
        )
    if mode & 0o022:
        raise ConfigError(_("the credential file {path} has mode {mode:04o}: others can change it").format(
            path=path, mode=mode), fix)
    if mode & 0o004:
        raise ConfigError(_("the credential file {path} has mode {mode:04o}: everyone can read it").format(
            path=path, mode=mode), fix)
    shared = st.st_uid == 0 and group is not None and st.st_gid == group
    if mode & 0o070 and not (shared and mode & 0o070 == 0o040):
        if st.st_uid == 0 and group is not None:
            fix = _("run: {command} (or chgrp {group} {path} to share it with that group only)").format(
                command=f"chmod 600 {path}", group=SERVICE_GROUP, path=path)
        raise ConfigError(
            _("the credential file {path} has mode {mode:04o}: group {group} can read it").format(
                path=path, mode=mode, group=_group_name(st.st_gid)),
            fix,
        )


def _group_name(gid: int) -> str:
    import grp

    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def parse(path: str, raw: bytes) -> dict[str, dict[str, str]]:
    """The file's mapping; the text is never quoted in errors (it holds passwords)."""
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError:
        data = None
    if not (
        isinstance(data, dict)
        and all(isinstance(entries, dict) for entries in data.values())
        and all(isinstance(v, str) for entries in data.values() for v in entries.values())
    ):
        raise ConfigError(
            _("the credential file {path} is damaged").format(path=path),
            _("remove it and store the password again with sendmail-shim --set-password"),
        )
    return data


def serialize(data: dict[str, dict[str, str]]) -> bytes:
    return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode("utf-8")
