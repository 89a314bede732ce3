"""Fault injection below SMTP, and the figures the hardening suites publish.

`raw_fault(kind)` gives the port of a TCP server that misbehaves before any SMTP is spoken:

    refused     nothing listens: the connection is refused
    unanswered  the listen backlog is full: the connection attempt is never answered
    tls-drop    accepts, reads the ClientHello, then closes (EOF in the TLS handshake)
    tls-hang    accepts, then never says a word (the handshake times out)
    plaintext   accepts and greets in plaintext where implicit TLS is expected

`COUNTS` is filled by the hardening tests as they pass (fault cases, crash points, parallel
submissions, fuzz examples); tests/conftest.py adds the leak-scan figures and writes the lot to
tests/.counts.json after a full run, for README's "Reliability and security" section.
"""

import os
import socket
import threading
import time
from collections import Counter

import pytest

__all__ = ["COUNTS", "RAW_FAULTS", "raw_fault", "wait_for", "wait_idle"]

COUNTS: Counter = Counter()
RAW_FAULTS = ("refused", "unanswered", "tls-drop", "tls-hang", "plaintext")


@pytest.fixture
def raw_fault():
    """``raw_fault(kind)`` → a port on 127.0.0.1 that fails in that way (module docstring)."""
    stop = threading.Event()
    sockets: list[socket.socket] = []
    threads: list[threading.Thread] = []

    def serve(listener: socket.socket, kind: str) -> None:
        listener.settimeout(0.05)
        while not stop.is_set():
            try:
                conn = listener.accept()[0]
            except TimeoutError:
                continue
            sockets.append(conn)
            if kind == "tls-drop":
                conn.settimeout(5)
                conn.recv(65536)  # the ClientHello: closing with it unread would be a reset, not an EOF
                conn.close()
            elif kind == "plaintext":
                conn.sendall(b"220 relay.test ESMTP plaintext\r\n")

    def start(kind: str) -> int:
        assert kind in RAW_FAULTS, kind
        if kind == "refused":
            with socket.create_server(("127.0.0.1", 0)) as probe:
                return probe.getsockname()[1]  # closed again: nothing listens there
        listener = socket.create_server(("127.0.0.1", 0), backlog=0)
        sockets.append(listener)
        if kind == "unanswered":
            sockets.append(socket.create_connection(listener.getsockname()))  # fills the backlog
        else:
            thread = threading.Thread(target=serve, args=(listener, kind), daemon=True)
            threads.append(thread)
            thread.start()
        return listener.getsockname()[1]

    yield start
    stop.set()
    for thread in threads:
        thread.join()
    for sock in sockets:
        sock.close()


def wait_for(condition, timeout: float = 20.0, what: str = "the expected event") -> None:
    """Wait for something another process does; fails only if it never happens."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"{what} did not happen within {timeout:g}s")
        time.sleep(0.02)


def wait_idle(config_file, timeout: float = 20.0) -> None:
    """Wait until no process runs with SENDMAIL_SHIM_CONFIG=`config_file` any more: the detached
    background delivery of a test has finished (it is nobody's child, so it cannot be waited for)."""
    marker = f"SENDMAIL_SHIM_CONFIG={config_file}\0".encode()

    def running() -> bool:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            if pid == str(os.getpid()):
                continue
            try:
                with open(f"/proc/{pid}/environ", "rb") as stream:
                    if marker in stream.read():
                        return True
            except OSError:
                continue
        return False

    wait_for(lambda: not running(), timeout, "the end of the background delivery")
