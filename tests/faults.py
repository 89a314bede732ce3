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
from collections import Counter

import pytest

from tests.shim import wait_for

__all__ = ["COUNTS", "RAW_FAULTS", "Listeners", "raw_fault", "wait_idle"]

COUNTS: Counter = Counter()
RAW_FAULTS = ("refused", "unanswered", "tls-drop", "tls-hang", "plaintext")


class Listeners:
    """TCP servers on 127.0.0.1 for one test: `listen(handle)` gives the port of a listener whose
    thread hands each accepted connection to `handle`; `close()` stops the threads and closes every
    socket (listeners, accepted connections and any the handlers `keep`)."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.sockets: list[socket.socket] = []
        self.threads: list[threading.Thread] = []

    def keep(self, sock: socket.socket) -> socket.socket:
        self.sockets.append(sock)
        return sock

    def listen(self, handle=None, backlog: int | None = None) -> int:
        """Without `handle`, nothing accepts: connections wait in the backlog."""
        listener = self.keep(socket.create_server(("127.0.0.1", 0), backlog=backlog))
        if handle:
            thread = threading.Thread(target=self._serve, args=(listener, handle), daemon=True)
            self.threads.append(thread)
            thread.start()
        return listener.getsockname()[1]

    def _serve(self, listener: socket.socket, handle) -> None:
        listener.settimeout(0.05)
        while not self.stop.is_set():
            try:
                conn = listener.accept()[0]
            except TimeoutError:
                continue
            handle(self.keep(conn))

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def listeners():
    servers = Listeners()
    yield servers
    servers.close()


def _tls_drop(conn: socket.socket) -> None:
    conn.settimeout(5)
    conn.recv(65536)  # the ClientHello: closing with it unread would be a reset, not an EOF
    conn.close()


@pytest.fixture
def raw_fault(listeners):
    """``raw_fault(kind)`` → a port on 127.0.0.1 that fails in that way (module docstring)."""
    handlers = {
        "tls-drop": _tls_drop,
        "tls-hang": lambda conn: None,
        "plaintext": lambda conn: conn.sendall(b"220 relay.test ESMTP plaintext\r\n"),
    }

    def start(kind: str) -> int:
        assert kind in RAW_FAULTS, kind
        if kind == "refused":
            with socket.create_server(("127.0.0.1", 0)) as probe:
                return probe.getsockname()[1]  # closed again: nothing listens there
        port = listeners.listen(handlers.get(kind), backlog=0)
        if kind == "unanswered":
            listeners.keep(socket.create_connection(("127.0.0.1", port)))  # fills the backlog
        return port

    return start


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
