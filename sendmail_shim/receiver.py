"""The submission service (``sendmail-shim -bd``): how a user who may not write the queue hands a
message to it, and the daemon that takes it — Postfix's postdrop without a setgid binary.

A caller that cannot write the spool (``www-data``, users' cron jobs) connects to a Unix socket
(`SENDMAIL_SHIM_SUBMIT_SOCKET`) served by this daemon, which runs as the service user. The
kernel tells the daemon who is calling (``SO_PEERCRED``), so the submitter's uid is known for
certain and its limits are enforced before anything is written; nobody but the service user (and
root) can write anywhere in the spool. The dialogue, one line each way and then the message::

    client: {"recipients": [...], "extract": true, ...}\\n     the request (pickup.py's fields)
    daemon: GO\\n  |  ERR <exit code> <reason>\\n                 admitted, or refused (rate, quota)
    client: <the message as read, CRLF>, then shuts down its writing side
    daemon: OK <queue id>\\n  |  ERR <exit code> <reason>\\n      durably in maildrop/, or refused

The daemon writes the message as a maildrop file whose trailer adds ``uid`` (pickup.py); the pickup
of the next queue run trusts that field because only the spool's owner can write maildrop/. After
each burst of submissions, and every minute for retries, the daemon starts a queue run
(``sendmail-shim -q --due``) as a child process, one at a time.

Bounded for every caller but root: concurrent connections per user and in all, the time a
connection may take (no slowloris), the request's size and shape, messages per minute, the bytes a
user may have waiting in the queue, a message's size.
"""

import json
import os
import socket
import struct
import threading
import time
from collections import deque
from typing import NamedTuple

from . import fsio
from .errors import EX_TEMPFAIL, CantCreate, DataError, ShimError, TempFail
from .i18n import _

MAX_REQUEST = 16 << 10  # the request line: recipients (1000 × 320 would not fit; -t is the way)
MAX_CONNECTIONS = 128  # in all
MAX_USER_CONNECTIONS = 8  # per user: one user cannot take every slot
IDLE_TIMEOUT = 10.0  # seconds a connection may stay silent
DEADLINE = 120.0  # seconds one submission may take in all (64 MiB at 1 MB/s fits)
CLIENT_TIMEOUT = 60.0
RUN_INTERVAL = 60.0  # retries: a queue run at least this often
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


class Limits(NamedTuple):
    """Per local user (root is exempt): messages per minute, bytes waiting in the queue, size of
    one message (`config.load` fills them from SENDMAIL_SHIM_USER_*)."""

    rate: int
    queue_size: int
    message_size: int


# -- the client: a sendmail call that cannot write the queue ----------------------------------


def submit(config, fields: dict, header_block: bytes, reader) -> str:
    """Hand the message (`header_block`, then the rest of `reader`) and its request `fields` to
    the submission service; returns the queue id once the message is durably in the spool."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(CLIENT_TIMEOUT)
    with sock:
        try:
            _connect(sock, config.submit_socket, time.monotonic() + CLIENT_TIMEOUT)
        except OSError as exc:
            raise TempFail(
                _("the submission service is not running ({path}: {reason})").format(
                    path=config.submit_socket, reason=exc.strerror),
                hint=_("start it with systemctl start sendmail-shim.socket, or run sendmail-shim -bd as root"),
            ) from None
        replies = sock.makefile("rb")
        try:
            sock.sendall(json.dumps(fields, ensure_ascii=True).encode() + b"\n")
            _expect(replies, "GO")
            with sock.makefile("wb") as out:
                out.write(header_block)
                reader.copy_body(out)
            sock.shutdown(socket.SHUT_WR)
            return _expect(replies, "OK")
        except OSError as exc:  # the daemon went away, or took too long
            raise TempFail(_("the submission service failed: {reason}").format(
                reason=exc.strerror or type(exc).__name__)) from None


def _connect(sock: socket.socket, path: str, deadline: float) -> None:
    """Connect, waiting while the service's backlog is full (a Unix socket then answers EAGAIN at
    once, where TCP would wait): a burst of other users' connections only delays us."""
    while True:
        try:
            return sock.connect(path)
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _expect(replies, word: str) -> str:
    """The daemon's next line: its argument when it is `word`, else the refusal it carries."""
    from .errors import for_exit_code

    line = replies.readline(1024).decode("utf-8", "replace").strip()
    answer, _sp, rest = line.partition(" ")
    if answer == word:
        return rest
    code, _sp, reason = rest.partition(" ")
    if answer != "ERR" or not code.isdigit():
        raise TempFail(_("the submission service gave no answer"))
    raise for_exit_code(int(code), reason)


# -- the daemon --------------------------------------------------------------------------------


class Receiver:
    """Accepts submissions on `sock` and writes them to `queue`'s maildrop/ (module docstring)."""

    def __init__(self, config, queue, log, limits: Limits, run_command: list[str] | None):
        self.config, self.queue, self.log, self.limits = config, queue, log, limits
        self.run_command = run_command  # None: no queue runs (tests of the limits alone)
        self._lock = threading.Lock()
        self._open: dict[int, int] = {}  # uid → connections in progress
        self._recent: dict[int, deque] = {}  # uid → monotonic times of its last submissions
        self._accepted: dict[str, tuple[int, int]] = {}  # id → (uid, size), written to maildrop/ here
        self._known: dict[str, tuple[int | None, int]] = {}  # id in queue/ → (uid, size)
        self._wake = threading.Event()
        self._stopping = False

    def serve(self, sock: socket.socket) -> None:
        """Serve until `stop`; start queue runs after submissions and every RUN_INTERVAL."""
        sock.settimeout(1.0)
        runs = threading.Thread(target=self._run_queue_when_woken, name="queue runs", daemon=True)
        runs.start()
        while not self._stopping:
            try:
                conn, _addr = sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:  # EMFILE and the like: wait, do not spin
                self._warn(f"submission socket: {exc.strerror}")
                time.sleep(0.1)
                continue
            threading.Thread(target=self._serve_one, args=(conn,), name="submission", daemon=True).start()
        self._wake.set()  # a queue run under way goes on by itself

    def stop(self) -> None:
        self._stopping = True

    def _warn(self, text: str) -> None:
        from .log import POSTDROP  # here: the -odb client imports this module too

        self.log.warning(POSTDROP, text)

    def _error(self, text: str) -> None:
        from .log import POSTDROP

        self.log.error(POSTDROP, text)

    def _serve_one(self, conn: socket.socket) -> None:
        with conn:
            _pid, uid, _gid = _CREDENTIALS.unpack(
                conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size))
            if not self._enter(uid):
                _reply(conn, f"ERR {EX_TEMPFAIL} too many submissions in progress; try again")
                return
            stream = _Deadline(conn, time.monotonic() + DEADLINE)
            try:
                msg_id, size = self._receive(conn, stream, uid)
            except ShimError as exc:
                _reply(conn, f"ERR {exc.exit_code} {_one_line(exc)}")
                self._warn(f"submission of uid {uid} refused: {exc}")
                stream.discard()  # closing with unread data would reset the connection before the client reads why
            except (OSError, ValueError):  # the client went away or took too long: nothing was written
                pass
            else:
                _reply(conn, f"OK {msg_id}")  # first: the message is the spool's now, whatever happens next
                self.log.submitted(msg_id, uid=uid, size=size)
                self._wake.set()
            finally:
                self._leave(uid)

    def _enter(self, uid: int) -> bool:
        """Take a connection slot; root is never turned away."""
        with self._lock:
            if uid and (sum(self._open.values()) >= MAX_CONNECTIONS or self._open.get(uid, 0) >= MAX_USER_CONNECTIONS):
                return False
            self._open[uid] = self._open.get(uid, 0) + 1
            return True

    def _leave(self, uid: int) -> None:
        with self._lock:
            self._open[uid] -= 1

    def _receive(self, conn: socket.socket, stream: "_Deadline", uid: int) -> tuple[str, int]:
        """One submission: the request, the limits, the message into maildrop/; its id and size."""
        from . import pickup

        fields = pickup.parse_request(stream.readline(MAX_REQUEST))
        self._admit(uid)
        with self.queue.spool(drop=True) as spool:
            allowed = self._allowance(uid)
            _reply(conn, "GO")
            while chunk := stream.read(65536):
                if spool.file.tell() + len(chunk) > allowed:
                    raise self._too_much(uid, spool.file.tell() + len(chunk))
                spool.file.write(chunk)
            size = spool.file.tell()
            msg_id = spool.commit_request(dict(fields, uid=uid))
        with self._lock:
            self._accepted[msg_id] = (uid, size)
        return msg_id, size

    def _admit(self, uid: int) -> None:
        """Refuse a user over its rate (messages per minute) or with a full share of the queue."""
        if not uid:
            return
        now = time.monotonic()
        with self._lock:
            recent = self._recent.setdefault(uid, deque())
            while recent and recent[0] <= now - 60:
                recent.popleft()
            if len(recent) >= self.limits.rate:
                raise TempFail(_("more than {rate} messages in a minute from this user; try again later").format(
                    rate=self.limits.rate))
            recent.append(now)
        if self._queued_bytes(uid) >= self.limits.queue_size:
            raise TempFail(_("this user's mail waiting in the queue has reached {size} bytes; try again later").format(
                size=self.limits.queue_size))

    def _allowance(self, uid: int) -> int:
        """Bytes this user's message may have: the size limit, and its share of the queue."""
        if not uid:
            return self.limits.message_size
        return min(self.limits.message_size, self.limits.queue_size - self._queued_bytes(uid))

    def _too_much(self, uid: int, size: int) -> ShimError:
        if size > self.limits.message_size:
            return DataError(_("the message is larger than {size} bytes, the most a local user may send").format(
                size=self.limits.message_size))
        return TempFail(_("this user's mail waiting in the queue has reached {size} bytes; try again later").format(
            size=self.limits.queue_size))

    def _queued_bytes(self, uid: int) -> int:
        """What `uid` has waiting: in queue/ (each message's envelope read once, when first
        seen) and in maildrop/ (as accepted here, until the pickup moves it on)."""
        with self._lock:
            # maildrop/ first: a message moving on meanwhile is then seen in both, not in neither
            waiting = {name.partition(".")[0] for name in fsio.listdir(self.queue.maildrop)}
            ids = set(self.queue.ids())
            self._known = {i: v for i, v in self._known.items() if i in ids}
            for msg_id in ids - self._known.keys():
                self._known[msg_id] = self._owner_and_size(msg_id)
            self._accepted = {i: v for i, v in self._accepted.items() if i in waiting and i not in ids}
            return sum(size for owner, size in (*self._known.values(), *self._accepted.values()) if owner == uid)

    def _owner_and_size(self, msg_id: str) -> tuple[int | None, int]:
        try:
            message = self.queue.load(msg_id)
        except ShimError:  # a damaged entry is the runner's to report
            return None, 0
        return (message.uid, message.size) if message is not None else (None, 0)

    def _run_queue_when_woken(self) -> None:
        """One queue run at a time: after submissions (coalesced) and every RUN_INTERVAL."""
        import subprocess

        while not self._stopping:
            self._wake.wait(RUN_INTERVAL)
            self._wake.clear()
            if self._stopping or self.run_command is None:
                continue
            try:
                status = subprocess.run(self.run_command, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL).returncode
            except OSError as exc:
                self._error(f"cannot start the queue runner: {exc.strerror}")
                continue
            if status:
                self._error(f"the queue run exited with status {status}")


class _Deadline:
    """Reads from a connection within an overall deadline and an idle timeout."""

    def __init__(self, conn: socket.socket, deadline: float):
        self._conn, self._deadline = conn, deadline
        self._buffer = b""

    def _recv(self, size: int) -> bytes:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline")
        self._conn.settimeout(min(IDLE_TIMEOUT, left))
        return self._conn.recv(size)

    def readline(self, limit: int) -> bytes:
        while b"\n" not in self._buffer:
            if len(self._buffer) > limit:
                raise DataError(_("the submission request is too long"))
            chunk = self._recv(4096)
            if not chunk:
                raise ValueError("no request")
            self._buffer += chunk
        line, _nl, self._buffer = self._buffer.partition(b"\n")
        if len(line) > limit:
            raise DataError(_("the submission request is too long"))
        return line

    def discard(self) -> None:
        """Read and drop the rest, until the client's end of data or the deadline."""
        try:
            while self.read(65536):
                pass
        except (OSError, ValueError):
            pass

    def read(self, size: int) -> bytes:
        if self._buffer:
            data, self._buffer = self._buffer[:size], self._buffer[size:]
            return data
        return self._recv(size)


def _reply(conn: socket.socket, line: str) -> None:
    try:
        conn.sendall(line.encode("utf-8", "replace") + b"\n")
    except OSError:
        pass


def _one_line(exc: Exception) -> str:
    from .log import one_line

    return one_line(exc)


# -- starting the daemon -----------------------------------------------------------------------


def listening_socket(config) -> socket.socket:
    """The socket systemd passed (socket activation), else `config.submit_socket` bound here:
    mode 0666 (anyone may submit), and a stale socket file replaced."""
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and os.environ.get("LISTEN_FDS") == "1":
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)  # not for the queue runs we start
        return socket.socket(fileno=3)
    path = config.submit_socket
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        _remove_stale(path)
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        sock.bind(path)
        os.chmod(path, 0o666)
        sock.listen(MAX_CONNECTIONS)
    except OSError as exc:
        sock.close()
        raise CantCreate(_("cannot listen on {path}: {reason}").format(path=path, reason=exc.strerror)) from None
    return sock


def _remove_stale(path: str) -> None:
    """A socket file nobody listens on (a daemon that died) is removed; a live one is an error."""
    import stat

    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return  # bind fails with EADDRINUSE: not ours to remove
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
            return
        except OSError:
            return
    raise CantCreate(_("another submission service is running on {path}").format(path=path))


def run(opts, config) -> int:
    """``-bd``: serve submissions until SIGTERM/SIGINT. Started as root, it binds the socket,
    then becomes the spool's owner (the service user) for good."""
    import signal

    from .log import MessageLog
    from .queue import Queue

    sock = listening_socket(config)  # no sender configured yet: submissions wait for one
    queue = Queue(config.queue_dir)
    queue.ensure()
    if os.geteuid() == 0:
        _become_owner(queue.root, config.submit_socket)
    queue.check_access()
    limits = Limits(config.user_rate, config.user_queue_size, config.user_message_size)
    receiver = Receiver(config, queue, MessageLog.from_config(config), limits, _queue_run_command(opts))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_args: receiver.stop())
    with sock:
        receiver.serve(sock)
    return 0


def _queue_run_command(opts) -> list[str]:
    """``sendmail-shim -q --due`` on this interpreter and this copy of the package, installed or not."""
    import sys

    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    start = f"import sys; sys.path.insert(0, {package_parent!r}); from sendmail_shim.cli import console; console()"
    config = ["--config", opts.config_path] if opts.config_path else []
    return [sys.executable, "-c", start, *config, "-q", "--due"]


def _become_owner(spool: str, socket_path: str) -> None:
    """Drop root for the spool owner's uid and gid (no supplementary groups)."""
    st = os.stat(spool)
    if st.st_uid == 0:
        return  # a root-owned spool (no service user): root's own daemon
    if os.path.exists(socket_path):  # ours to replace after a restart as that user
        os.chown(socket_path, st.st_uid, st.st_gid)
    os.setgroups([])
    os.setgid(st.st_gid)
    os.setuid(st.st_uid)
