"""sendmail-shim against msmtp, side by side, on this machine (``make bench``).

Starts the relays (`bench/servers.py`: loopback implicit TLS + AUTH + PIPELINING, and a proxy that
adds 200 ms to every server reply), installs Debian's msmtp when it is missing and we are root,
runs each measurement with shim and msmtp runs alternating, prints a Markdown table and writes it
to bench/results/ (with a PNG chart when matplotlib, the optional ``bench`` extra, is installed).

The shim runs as the Debian package runs it: /usr/bin/python3 (with python3-dotenv) and the
package's code, here from this checkout; ``--python`` picks another interpreter.

    python bench/run.py            # the full run (about 9 minutes)
    python bench/run.py --smoke    # tiny counts: proves the script works (CI)
    python bench/run.py --only backlog --backlog 100 --msmtp-sample 3 --out /tmp/b   # one measurement
    python bench/run.py --only provider --out /tmp/b   # 1,000 through 163's limits: about 4 minutes
"""

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from itertools import repeat
from pathlib import Path
from typing import Iterable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHIM = ROOT / "bin" / "sendmail-shim"
RESULTS = ROOT / "bench" / "results"
GNU_TIME = "/usr/bin/time"
STEPS = ("startup", "background", "service", "interactive", "memory", "backlog", "hostile", "provider", "oauth2",
         "imports")
_LINE = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcd\n"


@dataclass
class Sample:
    """Repeated measurements of one program in one scenario (seconds, or KiB for memory)."""

    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def spread(self, scale: float, unit: str, digits: int = 0) -> str:
        low, high = min(self.values) * scale, max(self.values) * scale
        return f"{self.median * scale:.{digits}f} {unit} ({low:.{digits}f}–{high:.{digits}f})"


@dataclass
class Row:
    name: str
    shim: str
    msmtp: str
    ratio: str
    target: str
    met: bool | None  # None: not measurable here
    chart: tuple[float, float] | None = None  # (shim, msmtp) medians in ms, for the latency chart


# -- the programs under test -------------------------------------------------------------------


class Servers:
    """bench/servers.py in its own process; `count()` is how many messages the relay holds."""

    def __init__(self, workdir: Path, delay: float):
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "servers.py"), str(workdir),
                                      "--delay", str(delay)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.info = json.loads(self.proc.stdout.readline())

    def _ask(self, command: str) -> str:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def count(self) -> int:
        return int(self._ask("count"))

    def clear(self) -> None:
        self._ask("clear")

    def limited(self, **changes) -> int:
        """The port of a new relay playing 163's limits with `changes` (fields of
        tests/provider_relay.py's `Limits`), on the real clock."""
        return int(self._ask("limited " + json.dumps(changes)))

    def stats(self, port: int) -> dict:
        """What the limited relay on `port` took and refused (bench/servers.py's `limited_stats`)."""
        return json.loads(self._ask(f"stats {port}"))

    def oauth2(self) -> dict:
        """A new identity provider and a relay taking only its tokens (bench/servers.py's
        `serve_oauth2`): the relay's port, the token endpoint, the client id and the scope."""
        return json.loads(self._ask("oauth2"))

    def idp_requests(self) -> int:
        """The token requests that identity provider answered so far."""
        return int(self._ask("idp_requests"))

    def wait_for(self, expected: int, timeout: float = 300) -> None:
        """Until the relay holds `expected` messages (a background delivery has finished)."""
        end = time.monotonic() + timeout
        while self.count() < expected:
            if time.monotonic() > end:
                raise SystemExit(f"bench: the relay got {self.count()} of {expected} messages")
            time.sleep(0.02)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


class Shim:
    """One configuration of the shim (one relay port, its own queue, more `settings`)."""

    def __init__(self, python: str, home: Path, servers: Servers, port: int, settings: dict[str, str] | None = None):
        info = servers.info
        home.mkdir(parents=True)
        self.python, self.home = python, home
        self.queue_dir = home / "queue"
        config = home / "sendmail-shim.env"
        config.write_text(
            f"SMTP_HOST=127.0.0.1\nSMTP_PORT={port}\nSMTP_SECURITY=tls\nSMTP_CA_FILE={info['ca_file']}\n"
            f"SMTP_USER={info['login']}\nSENDMAIL_SHIM_QUEUE_DIR={self.queue_dir}\n"
            f"SENDMAIL_SHIM_CREDENTIALS_FILE={home / 'credentials'}\nSENDMAIL_SHIM_LOG_FILE={home / 'mail.log'}\n"
            "SENDMAIL_SHIM_SYSLOG=no\nSMTP_TIMEOUT=60\n"
            + "".join(f"{key}={value}\n" for key, value in (settings or {}).items()))
        self.env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
                    "SENDMAIL_SHIM_CONFIG": str(config)}
        subprocess.run(self.command("--set-password"), input=info["password"].encode() + b"\n",
                       env=self.env, check=True, capture_output=True)

    def command(self, *args) -> list[str]:
        return [self.python, str(SHIM), *args]

    def queue_in_process(self, messages: Iterable[bytes]) -> None:
        """`messages` into the queue through the real front end (``-odq``), in this process: what
        1,000 callers would have left behind while the relay was unreachable."""
        from sendmail_shim import cli

        for message in messages:
            err = io.StringIO()
            if cli.main(["sendmail-shim", "-odq", "-t", "-i"], stdin=io.BytesIO(message), stderr=err,
                        environ=self.env) != 0:
                raise SystemExit(f"bench: queueing failed: {err.getvalue()}")


class Msmtp:
    """msmtp with an rc file for one relay port: implicit TLS, our CA, AUTH, from = login."""

    def __init__(self, binary: str, home: Path, servers: Servers, port: int):
        info = servers.info
        home.mkdir(parents=True)
        self.rc = home / "msmtprc"
        self.rc.write_text(
            f"account default\nhost 127.0.0.1\nport {port}\ntls on\ntls_starttls off\n"
            f"tls_trust_file {info['ca_file']}\nauth on\nuser {info['login']}\n"
            f"password {info['password']}\nfrom {info['login']}\nsyslog off\n")
        self.rc.chmod(0o600)
        self.binary = binary
        self.env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}

    def command(self, *args) -> list[str]:
        return [self.binary, "-C", str(self.rc), *args]


def ensure_tools() -> tuple[str | None, str]:
    """msmtp and GNU time, installed from Debian when missing and root; the msmtp binary (or None)
    and its version (or why it is missing)."""
    found = shutil.which("msmtp")
    missing = [package for package, there in (("msmtp", found), ("time", os.path.exists(GNU_TIME))) if not there]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"bench: installing {' '.join(missing)} from Debian", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
            subprocess.run(install, env=env, capture_output=True)
        found = shutil.which("msmtp")
    if not found:
        return None, "msmtp is not installed (run as root, or apt-get install msmtp)"
    version = subprocess.run([found, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    return found, version


# -- one timed run -----------------------------------------------------------------------------


def timed_popen(command: list[str], env: dict, message: bytes) -> float:
    """Seconds until a popen caller (PHP mail(), cron) is done: input written, both output pipes
    at EOF, exit status collected. Fails on a non-zero exit."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)
    out, err = proc.communicate(message)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(command)} exited {proc.returncode}: {err.decode(errors='replace')}")
    return elapsed


def peak_rss(command: list[str], env: dict, message_file: Path) -> tuple[float, float]:
    """(peak RSS in KiB, seconds) of one run, measured by GNU time: wait4() in this process would
    report at least this process's own size (a child's maximum includes the memory it was forked
    or vforked from)."""
    with open(message_file, "rb") as stdin, tempfile.NamedTemporaryFile("r") as report:
        start = time.perf_counter()
        proc = subprocess.run([GNU_TIME, "-f", "%M", "-o", report.name, *command], stdin=stdin,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"bench: {' '.join(command)} exited {proc.returncode}: "
                             f"{proc.stderr.decode(errors='replace')}")
        return float(report.read().split()[-1]), elapsed


def make_message(login: str, size: int, message_id: str | None = None) -> bytes:
    """A plain-text message of about `size` bytes: 76-character lines, as base64 bodies have."""
    header = (f"From: {login}\nTo: bob@example.org\nSubject: sendmail-shim benchmark\n"
              + (f"Message-ID: {message_id}\n" if message_id else "") + "\n").encode()
    return header + _LINE * max(1, (size - len(header)) // len(_LINE))


def write_big_message(path: Path, login: str, size: int) -> None:
    """The big message, written in pieces: this process stays small (see `peak_rss`)."""
    with path.open("wb") as out:
        out.write(make_message(login, 0))
        for _ in range(size // (len(_LINE) * 1024)):
            out.write(_LINE * 1024)


# -- the measurements --------------------------------------------------------------------------


def alternate(runs: int, first, second) -> tuple[Sample, Sample]:
    """`first()` and `second()` in turns (ABAB…), each returning seconds; second may be None."""
    a, b = Sample(), Sample()
    for _ in range(runs):
        a.values.append(first())
        if second:
            b.values.append(second())
    return a, b


def ratio_row(name: str, shim: Sample, msmtp: Sample | None, target: str, limit: float, *,
              scale: float = 1000, unit: str = "ms", digits: int = 0) -> Row:
    """Times in seconds, shown in `unit`; met when shim/msmtp ≤ `limit`."""
    if not msmtp or not msmtp.values:
        return Row(name, shim.spread(scale, unit, digits), "n/a", "n/a", target, None)
    ratio = shim.median / msmtp.median
    return Row(name, shim.spread(scale, unit, digits), msmtp.spread(scale, unit, digits), f"{ratio:.2f}×",
               target, ratio <= limit, (shim.median * 1000, msmtp.median * 1000))


def caller_latency(args, servers, shim, msmtp, message) -> tuple[Sample, Sample]:
    """The seconds a caller waits for `shim -odb` (`shim` has `command` and `env`: a Shim, or a
    ServiceSite's unprivileged caller) and for msmtp, alternating; each shim run then waits for its
    background delivery, which must not overlap the next run."""
    delivered = servers.count()

    def shim_run():
        nonlocal delivered
        elapsed = timed_popen(shim.command("-odb", "-t", "-i"), shim.env, message)
        delivered += 1
        servers.wait_for(delivered)
        return elapsed

    def msmtp_run():
        nonlocal delivered
        elapsed = timed_popen(msmtp.command("-t", "-i"), msmtp.env, message)
        delivered += 1
        return elapsed

    return alternate(args.short_runs, shim_run, msmtp_run if msmtp else None)


def bench_background(args, servers, shim, msmtp, message) -> Row:
    """(1) What a caller waits for with -odb through a relay 200 ms away."""
    a, b = caller_latency(args, servers, shim, msmtp, message)
    return ratio_row("1. caller latency, 2 KB, relay +200 ms: shim `-odb` vs msmtp", a, b,
                     "shim ≤ 1/20 of msmtp", 1 / 20)


class ServiceSite:
    """A server's layout for the shim: a service user owning the spool, the submission service
    (`sendmail-shim -bd`) running as it, and an unprivileged caller (throwaway accounts; root
    only). Everything lives in a directory other users can reach."""

    def __init__(self, python: str, servers: Servers, port: int):
        import pwd

        tag = os.getpid() % 100000
        self.users = [f"benchsvc{tag}", f"benchwww{tag}"]
        for name in self.users:
            subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--shell",
                            "/usr/sbin/nologin", name], check=True, capture_output=True)
        service = pwd.getpwnam(self.users[0])
        self.base = Path(tempfile.mkdtemp(prefix="sendmail-shim-bench-service-", dir="/tmp"))
        self.base.chmod(0o755)
        spool = self.base / "spool"
        spool.mkdir(mode=0o711)
        os.chown(spool, service.pw_uid, service.pw_gid)
        password = self.base / "password"
        password.write_text(servers.info["password"] + "\n")
        os.chown(password, service.pw_uid, service.pw_gid)
        password.chmod(0o600)
        ca_file = shutil.copy(servers.info["ca_file"], self.base / "ca.pem")
        config = self.base / "sendmail-shim.env"
        config.write_text(
            f"SMTP_HOST=127.0.0.1\nSMTP_PORT={port}\nSMTP_SECURITY=tls\nSMTP_CA_FILE={ca_file}\n"
            f"SMTP_USER={servers.info['login']}\nSMTP_PASSWORD_COMMAND=cat {password}\n"
            f"SENDMAIL_SHIM_QUEUE_DIR={spool}\nSENDMAIL_SHIM_SUBMIT_SOCKET={self.base / 'submit.sock'}\n"
            "SENDMAIL_SHIM_SYSLOG=no\nSMTP_TIMEOUT=60\n")
        config.chmod(0o644)
        self.env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "LANG": "C.UTF-8",
                    "SENDMAIL_SHIM_CONFIG": str(config)}
        self.python = python
        self.daemon = subprocess.Popen([python, str(SHIM), "-bd"], env=self.env, cwd="/")
        for _ in range(300):
            if (self.base / "submit.sock").exists():
                break
            time.sleep(0.02)

    def command(self, *args) -> list[str]:
        """The shim as the unprivileged caller."""
        return ["setpriv", f"--reuid={self.users[1]}", f"--regid={self.users[1]}", "--clear-groups",
                self.python, str(SHIM), *args]

    def close(self) -> None:
        self.daemon.terminate()
        self.daemon.wait(30)
        for name in reversed(self.users):
            subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True)
            subprocess.run(["userdel", "--force", name], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)


def _readable_by_others(path: Path) -> bool:
    """Whether another user can read `path` and pass through every directory above it."""
    return bool(path.stat().st_mode & 0o004) and all(p.stat().st_mode & 0o001 for p in (path, *path.parents))


def bench_service(args, servers, python, msmtp, message) -> Row:
    """(1b) What an unprivileged caller (www-data) waits for with -odb through a relay 200 ms
    away: its message goes through the submission service's socket."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        return Row("1b. caller latency via the submission service", "n/a (needs root and setpriv)", "n/a", "n/a",
                   "shim ≤ 1/20 of msmtp", None)
    if not _readable_by_others(ROOT):  # e.g. a clone in a `mktemp -d` directory: the caller cannot run it
        return Row("1b. caller latency via the submission service", "n/a (other users cannot read the checkout)",
                   "n/a", "n/a",
                   "shim ≤ 1/20 of msmtp", None)
    site = ServiceSite(python, servers, servers.info["delayed_port"])
    try:
        a, b = caller_latency(args, servers, site, msmtp, message)
    finally:
        site.close()
    return ratio_row("1b. caller latency, 2 KB, relay +200 ms: an unprivileged caller's `-odb` (through the "
                     "submission service) vs msmtp", a, b, "shim ≤ 1/20 of msmtp", 1 / 20)


def bench_interactive(args, servers, shim, msmtp, message) -> Row:
    """(2) -odi on loopback TLS: the whole delivery inside the caller's wait."""
    a, b = alternate(args.short_runs, lambda: timed_popen(shim.command("-odi", "-t", "-i"), shim.env, message),
                     (lambda: timed_popen(msmtp.command("-t", "-i"), msmtp.env, message)) if msmtp else None)
    return ratio_row("2. interactive send, 2 KB, loopback TLS: shim `-odi` vs msmtp", a, b,
                     "shim ≤ 1.0× msmtp", 1.0)


def bench_memory(args, servers, shim, msmtp, workdir: Path) -> list[Row]:
    """(3) Peak RSS for a big message: the -odb caller, a -q run delivering it (the work of the
    detached background child, which cannot be waited for), and -odi."""
    big = workdir / "big.eml"
    write_big_message(big, servers.info["login"], args.big_mb << 20)
    samples = {k: Sample() for k in ("odb", "q", "odi", "msmtp")}
    seconds = {k: Sample() for k in samples}
    delivered = servers.count()

    def record(key, result):
        samples[key].values.append(result[0])
        seconds[key].values.append(result[1])

    for _ in range(args.runs):
        record("odb", peak_rss(shim.command("-odb", "-t", "-i"), shim.env, big))
        servers.wait_for(delivered + 1)  # the background child, before anything else runs
        with big.open("rb") as stdin:
            subprocess.run(shim.command("-odq", "-t", "-i"), stdin=stdin, env=shim.env, check=True)
        record("q", peak_rss(shim.command("-q"), shim.env, Path(os.devnull)))
        record("odi", peak_rss(shim.command("-odi", "-t", "-i"), shim.env, big))
        delivered += 3
        if msmtp:
            record("msmtp", peak_rss(msmtp.command("-t", "-i"), msmtp.env, big))
            delivered += 1
        servers.wait_for(delivered)
        servers.clear()
        delivered = 0
    rows = []
    msmtp_text = samples["msmtp"].spread(1 / 1024, "MB", 1) if samples["msmtp"].values else "n/a"
    for key, label in (("odb", "`-odb` caller (spools, forks)"),
                       ("q", "`-q` delivering it (the background child's work)"),
                       ("odi", "`-odi`")):
        sample = samples[key]
        mb = sample.median / 1024
        ratio = f"{mb / (samples['msmtp'].median / 1024):.1f}×" if samples["msmtp"].values else "n/a"
        rows.append(Row(f"3. peak RSS, {args.big_mb} MB message: shim {label}", sample.spread(1 / 1024, "MB", 1),
                        msmtp_text, ratio, "≤ 40 MB", mb <= 40))
    return rows


def bench_backlog(args, servers, delayed_shim, delayed_msmtp, message) -> Row:
    """(4) N queued messages flushed by one -q through the 200 ms relay, against N msmtp calls
    (msmtp measured on a sample of calls and extrapolated linearly to N)."""
    delayed_shim.queue_in_process(repeat(message, args.backlog))
    before = servers.count()
    start = time.perf_counter()
    subprocess.run(delayed_shim.command("-q"), env=delayed_shim.env, check=True, capture_output=True)
    shim_total = time.perf_counter() - start
    servers.wait_for(before + args.backlog, timeout=5)
    shim = Sample([shim_total])
    name = f"4. backlog of {args.backlog} × 2 KB, relay +200 ms: one shim `-q` vs {args.backlog} msmtp calls"
    if not delayed_msmtp:
        return Row(name, f"{shim_total:.1f} s", "n/a", "n/a", "≥ 50× faster", None)
    calls = Sample([timed_popen(delayed_msmtp.command("-t", "-i"), delayed_msmtp.env, message)
                    for _ in range(args.msmtp_sample)])
    extrapolated = Sample([v * args.backlog for v in calls.values])
    speedup = extrapolated.median / shim_total
    msmtp_text = (f"{extrapolated.median:.0f} s (extrapolated: {args.msmtp_sample} calls, median "
                  f"{calls.median * 1000:.0f} ms, {min(calls.values) * 1000:.0f}–{max(calls.values) * 1000:.0f})")
    return Row(name, f"{shim.median:.1f} s ({shim_total / args.backlog * 1000:.0f} ms/message)", msmtp_text,
               f"{speedup:.1f}× faster", "≥ 50× faster", speedup >= 50,
               (shim_total * 1000, extrapolated.median * 1000))


def msmtp_each(msmtp: Msmtp, messages: list[bytes]) -> tuple[float, int]:
    """msmtp called once per message, one after the other: the seconds it all took and how many
    calls failed (msmtp does not retry: those messages are lost)."""
    start, failed = time.perf_counter(), 0
    for message in messages:
        failed += subprocess.run(msmtp.command("-t", "-i"), input=message, env=msmtp.env,
                                 capture_output=True).returncode != 0
    return time.perf_counter() - start, failed


def _over(stats: dict) -> str:
    """How often a client went beyond each limit of the relay (bench/servers.py's `limited_stats`)."""
    return ", ".join(f"{limit} {times}×" for limit, times in stats["over"].items()) or "none"


def bench_provider(args, servers, python, msmtp_binary, work: Path) -> Row:
    """(7) A backlog drained in real time through a relay playing 163's limits scaled to about a
    minute (tests/provider_relay.py: `--provider-per-minute` a minute over a sliding window, 10 a
    connection, 1 connection): one shim `-q` with the 163 preset and that per-minute budget, against
    the least time the limits allow, and msmtp called once per message, which does not retry: a
    message the relay refuses is lost.

    The least time: message k + P (P a minute) may go a minute after message k. As long as P
    messages take less than a minute, the backlog of N goes in (N - 1) // P full minutes plus the
    time the remaining N - (N - 1) // P * P take at the unthrottled pace — measured: one `-q`
    draining that many through the same relay without the per-minute limit (start-up included)."""
    count, per_minute = args.provider_backlog, args.provider_per_minute
    settings = {"SMTP_PROVIDER": "163", "SMTP_MESSAGES_PER_MINUTE": str(per_minute)}
    messages = [make_message(servers.info["login"], 2048, f"<bench{n}@163.test>") for n in range(count)]
    minutes = (count - 1) // per_minute
    rest = count - minutes * per_minute

    def drain(name: str, port: int, backlog: list[bytes]) -> float:
        shim = Shim(python, work / name, servers, port, settings)
        shim.queue_in_process(backlog)
        return timed_popen(shim.command("-q"), shim.env, b"")

    pace = drain("shim-163-pace", servers.limited(per_minute=None), messages[:rest])
    minimum = max(minutes * 60 + pace, pace * count / rest)  # the second: should P take over a minute
    port = servers.limited(per_minute=per_minute)
    elapsed = drain("shim-163", port, messages)
    got = servers.stats(port)
    limits = f"10/connection, {per_minute}/minute, 1 connection"
    name = (f"7. backlog of {count} × 2 KB through a relay with 163's limits scaled ({limits}), real time: "
            f"one shim `-q` (163 preset) vs {count} msmtp calls")
    shim_text = (f"{elapsed:.1f} s; least the limits allow {minimum:.1f} s ({minutes} × 60 s + {pace:.1f} s for "
                 f"{rest} unthrottled); relay: {got['received']} received ({got['distinct']} distinct), over a "
                 f"limit: {_over(got)}, {got['most_sessions']} connection at most; "
                 f"{count - got['received']} left in the queue")
    target = "≤ 1.10× the least time; 0 over a limit; each message once"
    ratio = elapsed / minimum
    met = ratio <= 1.10 and not got["over"] and got["received"] == got["distinct"] == count
    if not msmtp_binary:
        return Row(name, shim_text, "n/a", f"{ratio:.2f}× the least time", target, None if args.smoke else met)
    port = servers.limited(per_minute=per_minute)
    msmtp_elapsed, lost = msmtp_each(Msmtp(msmtp_binary, work / "msmtp-163", servers, port), messages)
    msmtp_got = servers.stats(port)
    msmtp_text = (f"{msmtp_elapsed:.1f} s; {lost} of {count} lost (refused by the relay: {_over(msmtp_got)}); "
                  f"relay: {msmtp_got['received']} received")
    return Row(name, shim_text, msmtp_text, f"{ratio:.2f}× the least time", target, None if args.smoke else met,
               (elapsed * 1000, msmtp_elapsed * 1000))


def bench_oauth2(args, servers, python, shim, work: Path, message: bytes) -> list[Row]:
    """(8) `-odi` logging in with an OAuth2 token (SMTP_AUTH=xoauth2, client credentials, the
    test identity provider on loopback HTTPS): with the token cached, against `shim`'s password
    send on the same kind of relay, alternating; then the first send with a cold cache (the
    spool's tokens/ removed before each), alternating with a cached one, counting the identity
    provider's token requests."""
    idp = servers.oauth2()
    oauth = Shim(python, work / "shim-oauth2", servers, idp["port"], {
        "SMTP_AUTH": "xoauth2", "SMTP_OAUTH2_FLOW": "client_credentials", "SMTP_OAUTH2_CLIENT_ID": idp["client_id"],
        "SMTP_OAUTH2_TOKEN_URL": idp["token_url"], "SMTP_OAUTH2_SCOPE": idp["scope"],
        "SMTP_OAUTH2_CA_FILE": servers.info["ca_file"]})
    send = lambda who: timed_popen(who.command("-odi", "-t", "-i"), who.env, message)  # noqa: E731

    def cold() -> float:
        shutil.rmtree(oauth.queue_dir / "tokens", ignore_errors=True)
        return send(oauth)

    send(oauth)  # the token cached
    cached, password = alternate(args.short_runs, lambda: send(oauth), lambda: send(shim))
    before = servers.idp_requests()
    first, warm = alternate(args.short_runs, cold, lambda: send(oauth))
    per_send = (servers.idp_requests() - before) / args.short_runs
    cached_row = ratio_row("8. interactive send, 2 KB, loopback TLS, OAuth2 token cached: shim `-odi` (xoauth2) "
                           "vs shim `-odi` (password) in the msmtp column", cached, password,
                           "≤ 1.1× the password send", 1.1)
    extra = (first.median - warm.median) * 1000
    cold_row = Row("8. the same, first send with a cold token cache (the identity provider asked)",
                   first.spread(1000, "ms"), "n/a", f"+{extra:.0f} ms; {per_send:g} token request(s) a send",
                   "one identity provider round trip more: 1 token request a send", per_send == 1)
    return [replace(cached_row, chart=None), cold_row]


# What `bench_hostile` times, in the shim's interpreter: the header policy as the pickup runs it
# (reader, `message.prepare`, body copy) for each message given on stdin as JSON (name → latin-1
# text, -t), `runs` times; prints {name: [[seconds, CPU seconds], ...]}. A refusal is a result too.
HOSTILE_WORKER = r"""
import io, json, sys, time
sys.path.insert(0, sys.argv[1])
from sendmail_shim import message
from sendmail_shim.errors import ShimError
from sendmail_shim.reader import MessageReader
policy = message.HeaderPolicy(sender="alice@163.test", aliases={"root": "admin@example.com"}, local_hostname="web1")

def pickup(text, extract):
    start, cpu = time.perf_counter(), time.thread_time()
    reader = MessageReader(io.BytesIO(text.encode("latin-1")), dot_ends=False, mbox_from=False)
    try:
        headers, envelope = message.prepare(reader.read_header_block(), extract_recipients=extract,
                                            argv_recipients=[] if extract else ["bob@example.org"],
                                            requested_sender=None, policy=policy)
        message.write(io.BytesIO(), reader, headers, envelope)
    except ShimError:
        pass
    return [time.perf_counter() - start, time.thread_time() - cpu]

cases = json.load(sys.stdin)
pickup(*next(iter(cases.values())))  # warm-up
print(json.dumps({name: [pickup(*case) for _ in range(int(sys.argv[2]))] for name, case in cases.items()}))
"""

# The costliest shapes of each kind at the header policy's caps (addresses.py), as (prefix, unit,
# tail): an address of about 1 KiB, in four 64 KiB To fields folded after each address (split,
# each address parsed), or in 255 To fields of 1 KiB (each parsed whole); every field differs
# (a field is parsed once).
HOSTILE_KINDS = {
    "quotes": ("", '""', " <u@x.test>"), "backslashes": ("", "\\\\", ""), "dots": ("", "a.", " <u@x.test>"),
    "spaces": ("", "a ", "<u@x.test>"), "commas": ("", "a@b.test,", "a@b.test"), "comments": ("", "(a)", "u@x.test"),
    "angle brackets": ("", "<(", ""), "groups": ("", "a ", ":;"), "encoded words": ("", "=?utf-8?q?a?= ", "<u@x.test>"),
    "obsolete routes": ("<", "@a,", "@a:u@x.test>"),
}


def hostile_messages(login: str) -> dict[str, tuple[bytes, str]]:
    """name → (message, kind): each kind in its two forms, with a 2 KB body."""
    body = b"\n" + _LINE * 26
    messages = {}
    for kind, (prefix, unit, tail) in HOSTILE_KINDS.items():
        element = prefix + unit * ((1010 - len(prefix) - len(tail)) // len(unit)) + tail
        count = 64 * 1024 // (len(element) + 3) - 1
        folded = ",\n ".join([element] * count)
        long_fields = "".join(f"To: {folded},\n u{f}@x.test\n" for f in range(4))
        short_fields = "".join(f"To: {element} ({i:04d})\n" for i in range(255))
        for form, fields in (("4 × 64 KiB To", long_fields), ("255 × 1 KiB To", short_fields)):
            messages[f"{kind}, {form}"] = (f"From: {login}\nSubject: hostile\n{fields}".encode() + body, kind)
    return messages


def bench_hostile(args, shim, message: bytes) -> list[Row]:
    """(6) The largest delay one user's hostile message adds to another's: the pickup handles one
    message at a time, so a message's header policy delays every message behind it. Each kind of
    hostile shape at the caps (its costliest form, with -t or without) against an ordinary 2 KB
    message, in the shim's interpreter."""
    login = "alice@163.test"
    many = ",\n ".join(f'"User {i}, Dept" <user{i}@example.org>' for i in range(1000))
    cases = {"ordinary 2 KB": (message.decode("latin-1"), True),
             "1000 recipients": (message.decode("latin-1").replace("To: bob@example.org", f"To: {many}"), True)}
    kinds = {}
    for name, (data, kind) in hostile_messages(login).items():
        for extract in (True, False):
            cases[f"{name}{'' if extract else ', no -t'}"] = (data.decode("latin-1"), extract)
            kinds[f"{name}{'' if extract else ', no -t'}"] = kind
    proc = subprocess.run([shim.python, "-c", HOSTILE_WORKER, str(ROOT), str(args.hostile_runs)],
                          input=json.dumps(cases), capture_output=True, text=True, check=True)
    results = json.loads(proc.stdout)
    samples = {name: Sample([wall for wall, _cpu in values]) for name, values in results.items()}
    cpu = {name: Sample([cpu for _wall, cpu in values]) for name, values in results.items()}
    ordinary, many = samples.pop("ordinary 2 KB"), samples.pop("1000 recipients")
    rows = [Row("6. header policy at pickup: ordinary 2 KB message (reference)", ordinary.spread(1000, "ms", 1),
                "n/a", "n/a", "—", None),
            Row("6. header policy at pickup: 1,000 ordinary recipients in To (reference)", many.spread(1000, "ms"),
                "n/a", f"{many.median / ordinary.median:.0f}× the 2 KB message", "—", None)]
    for kind in HOSTILE_KINDS:
        name, worst = max(((n, s) for n, s in samples.items() if kinds[n] == kind), key=lambda item: item[1].median)
        rows.append(Row(f"6. delay a hostile message adds to others: {kind} ({name.split(', ', 1)[1]})",
                        f"{worst.spread(1000, 'ms')}, CPU {cpu[name].median * 1000:.0f} ms", "n/a",
                        f"{worst.median / ordinary.median:.0f}× the 2 KB message", "≤ 1 s", worst.median <= 1.0))
    return rows


def bench_startup(args, shim, msmtp) -> Row:
    """For reference: `--version`, the interpreter's and msmtp's start-up alone."""
    a, b = alternate(args.short_runs, lambda: timed_popen(shim.command("--version"), shim.env, b""),
                     (lambda: timed_popen(msmtp.command("--version"), msmtp.env, b"")) if msmtp else None)
    row = ratio_row("start-up: `--version` (reference)", a, b, "—", float("inf"), digits=1)
    row.met = None
    return row


def import_profile(servers, shim, message: bytes, runs: int, top: int) -> tuple[list[tuple[str, float, float]], float]:
    """(5) `python -X importtime` of the -odb caller (its background child's imports go to
    /dev/null), `runs` times: the `top` slowest top-level imports as (module, self ms, cumulative
    ms), medians over the runs, and the median sum of all imports in ms."""
    per_module: dict[str, list[tuple[int, int]]] = {}
    totals = []
    delivered = servers.count()
    for _ in range(runs):
        proc = subprocess.run([shim.python, "-X", "importtime", str(SHIM), "-odb", "-t", "-i"], input=message,
                              env=shim.env, capture_output=True, check=True)
        delivered += 1
        servers.wait_for(delivered)  # the background delivery must not overlap the next run
        total = 0
        for line in proc.stderr.decode().splitlines():
            if not line.startswith("import time:") or "self [us]" in line:
                continue
            own, cumulative, name = line[len("import time:"):].split("|")
            total += int(own)
            if not name.startswith("  "):  # top level: what the program itself imported
                per_module.setdefault(name.strip(), []).append((int(own), int(cumulative)))
        totals.append(total)
    rows = [(name, statistics.median(o for o, _ in v) / 1000, statistics.median(c for _, c in v) / 1000)
            for name, v in per_module.items()]
    return sorted(rows, key=lambda r: -r[2])[:top], statistics.median(totals) / 1000


# -- report ------------------------------------------------------------------------------------


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    os_name = "Linux"
    if Path("/etc/os-release").exists():
        fields = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line)
        os_name = fields.get("PRETTY_NAME", os_name).strip('"')
    return (f"{cpu}, {os.cpu_count()} CPUs, {int(memory) // 1024 // 1024} GiB RAM, {os_name}, "
            f"kernel {platform.release()}")


def markdown(rows: list[Row], imports, import_total: float | None, context: dict) -> str:
    mark = {True: "✅ met", False: "❌ missed", None: "—"}
    lines = [
        f"Run {context['date']} on {context['machine']}; load average {context['load_before']} before, "
        f"{context['load_after']} after. Shim: `{context['python']}` (Python {context['python_version']}), "
        f"baseline: {context['msmtp']}. Medians over {context['short_runs']} runs (latency, alternating "
        f"shim/msmtp) and {context['runs']} runs (memory), min–max in parentheses.",
        "",
        "| measurement | shim | msmtp | shim vs msmtp | target | |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r.name} | {r.shim} | {r.msmtp} | {r.ratio} | {r.target} | {mark[r.met]} |" for r in rows]
    if import_total is None:
        return "\n".join(lines) + "\n"
    lines += ["", f"5. Imports of the `-odb` caller (`python -X importtime`, median of {context['short_runs']} runs): "
              f"{import_total:.1f} ms in all (importtime's own overhead included); the slowest top-level imports:",
              "", "| module | cumulative | self |", "|---|---|---|"]
    lines += [f"| `{name}` | {cumulative:.1f} ms | {own:.1f} ms |" for name, own, cumulative in imports]
    return "\n".join(lines) + "\n"


def chart(samples: dict[str, tuple[float, float]], path: Path) -> str:
    """Shim and msmtp medians (ms) side by side, log scale."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no chart: matplotlib is not installed (pip install -e '.[bench]')"
    labels = list(samples)
    fig, ax = plt.subplots(figsize=(9, 4))
    positions = range(len(labels))
    ax.barh([p - 0.2 for p in positions], [samples[k][0] for k in labels], height=0.4, label="sendmail-shim")
    ax.barh([p + 0.2 for p in positions], [samples[k][1] for k in labels], height=0.4, label="msmtp")
    ax.set_yticks(list(positions), labels)
    ax.set_xscale("log")
    ax.set_xlabel("median, log scale (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"chart: {path.relative_to(ROOT)}"


def default_python() -> str:
    """Debian's interpreter when it has python3-dotenv (what the .deb runs on), else this one."""
    debian = "/usr/bin/python3"
    if os.path.exists(debian) and subprocess.run([debian, "-c", "import dotenv.parser"],
                                                 capture_output=True).returncode == 0:
        return debian
    return sys.executable


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny counts, to prove the script works")
    parser.add_argument("--python", default=None, help="interpreter that runs the shim")
    parser.add_argument("--runs", type=int, default=7, help="runs of the long measurements")
    parser.add_argument("--short-runs", type=int, default=15, help="runs of the short measurements")
    parser.add_argument("--backlog", type=int, default=1000, help="queued messages for the -q measurement")
    parser.add_argument("--msmtp-sample", type=int, default=15, help="msmtp calls measured for the backlog")
    parser.add_argument("--provider-backlog", type=int, default=1000,
                        help="queued messages for the 163-limits measurement")
    parser.add_argument("--provider-per-minute", type=int, default=600,
                        help="messages a minute the 163-like relay allows (and the shim is told)")
    parser.add_argument("--big-mb", type=int, default=50, help="size of the big message")
    parser.add_argument("--hostile-runs", type=int, default=3, help="runs of each hostile-header shape")
    parser.add_argument("--delay", type=float, default=0.2, help="seconds added to every relay reply")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the table and chart go")
    parser.add_argument("--queue-connections", type=int, default=None,
                        help="SENDMAIL_SHIM_QUEUE_CONNECTIONS for the backlog (default: the shim's default)")
    parser.add_argument("--only", action="append", choices=STEPS,
                        help="run only this measurement (repeatable); default: all")
    args = parser.parse_args()
    if args.smoke:
        args.runs, args.short_runs, args.backlog, args.msmtp_sample, args.big_mb = 2, 3, 5, 2, 2
        args.provider_backlog, args.provider_per_minute = 30, 100  # never waits a minute
        args.hostile_runs = 1
        if args.out == RESULTS:
            args.out = Path(tempfile.gettempdir()) / "sendmail-shim-bench-smoke"
    selected = set(args.only or STEPS)
    python = args.python or default_python()
    msmtp_binary, msmtp_version = ensure_tools()
    if not os.path.exists(GNU_TIME):
        raise SystemExit(f"bench: {GNU_TIME} (Debian package time) is needed for the memory measurement")
    if not msmtp_binary:
        print(f"bench: {msmtp_version}; measuring the shim alone", flush=True)
    context = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine(), "python": python,
               "python_version": subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                                                capture_output=True, text=True).stdout.strip(),
               "msmtp": msmtp_version, "runs": args.runs, "short_runs": args.short_runs,
               "load_before": f"{os.getloadavg()[0]:.2f}"}
    message = make_message("alice@163.test", 2048)
    with tempfile.TemporaryDirectory(prefix="sendmail-shim-bench-") as tmp:
        work = Path(tmp)
        servers = Servers(work / "servers", args.delay)
        try:
            info = servers.info
            near, far = info["port"], info["delayed_port"]
            shim_near = Shim(python, work / "shim-near", servers, near)
            shim_far = Shim(python, work / "shim-far", servers, far, {"SENDMAIL_SHIM_QUEUE_CONNECTIONS": str(
                args.queue_connections)} if args.queue_connections else None)
            msmtp_near = Msmtp(msmtp_binary, work / "msmtp-near", servers, near) if msmtp_binary else None
            msmtp_far = Msmtp(msmtp_binary, work / "msmtp-far", servers, far) if msmtp_binary else None
            rows = []
            for key, title, step in (
                ("startup", "start-up", lambda: [bench_startup(args, shim_near, msmtp_near)]),
                ("background", "1. -odb through the 200 ms relay",
                 lambda: [bench_background(args, servers, shim_far, msmtp_far, message)]),
                ("service", "1b. -odb of an unprivileged caller, through the submission service",
                 lambda: [bench_service(args, servers, python, msmtp_far, message)]),
                ("interactive", "2. -odi on loopback",
                 lambda: [bench_interactive(args, servers, shim_near, msmtp_near, message)]),
                ("memory", f"3. peak RSS, {args.big_mb} MB",
                 lambda: bench_memory(args, servers, shim_near, msmtp_near, work)),
                ("backlog", f"4. backlog of {args.backlog}",
                 lambda: [bench_backlog(args, servers, shim_far, msmtp_far, message)]),
                ("hostile", "6. header policy, hostile shapes at the caps",
                 lambda: bench_hostile(args, shim_near, message)),
                ("provider", f"7. backlog of {args.provider_backlog} through 163's limits, real time",
                 lambda: [bench_provider(args, servers, python, msmtp_binary, work)]),
                ("oauth2", "8. -odi with an OAuth2 token, cached and cold",
                 lambda: bench_oauth2(args, servers, python, shim_near, work, message)),
            ):
                if key in selected:
                    print(f"bench: {title} …", flush=True)
                    rows += step()
            imports, import_total = [], None
            if "imports" in selected:
                imports, import_total = import_profile(servers, shim_near, message, args.short_runs, top=12)
        finally:
            servers.close()
    context["load_after"] = f"{os.getloadavg()[0]:.2f}"
    table = markdown(rows, imports, import_total, context)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.md").write_text(table)
    print()
    print(table)
    print(chart({r.name.split(":")[0]: r.chart for r in rows if r.chart}, args.out / "latest.png"))
    print(f"bench: results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
