"""The loopback test relays of packaging/test-deb.sh (run with the project venv's python).

    test-relay.py serve DIR LOGIN PASSWORD   implicit TLS + AUTH + 163's sender rule on 127.0.0.1;
                                             writes DIR/relay-ca.pem (the CA), DIR/port, and one JSON line per
                                             received message to DIR/box.jsonl; runs until SIGTERM
    test-relay.py serve-oauth2 DIR LOGIN CLIENT_ID
                                             the same relay taking only XOAUTH2/OAUTHBEARER with a token of the
                                             test identity provider, started with it (HTTPS, same CA), for the
                                             client CLIENT_ID whose secret is the first line of stdin (never
                                             argv); also writes DIR/token-url, DIR/scope (what the relay wants)
                                             and DIR/access-tokens (every token issued, 0600: for the test to
                                             prove that none leaks)
    test-relay.py wait DIR TEXT [SECONDS]    print the first received message whose bytes contain
                                             TEXT as JSON; exit 1 if none arrives in time

The relay is tests.relay.RelayServer, the one the test suite uses; the identity provider is tests.idp.IdP.
"""

import functools
import json
import os
import secrets
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def serve(directory: Path, login: str, password: str) -> None:
    from tests.relay import Certificates, RelayServer

    run(directory, RelayServer(Certificates(directory), security="tls", users={login: password}))


def serve_oauth2(directory: Path, login: str, client_id: str, client_secret: str) -> None:
    from tests.idp import IDP_SCOPE, IdP
    from tests.relay import Certificates, RelayServer, TokenRelayHandler

    certificates = Certificates(directory)
    idp = IdP(certificates)
    idp.clients = {client_id: client_secret}
    idp.start()
    (directory / "token-url").write_text(f"{idp.token_url}\n")
    (directory / "scope").write_text(f"{IDP_SCOPE}\n")
    # no password mechanism is offered: the users entry only names the login a token may act for
    relay = RelayServer(certificates, security="tls", users={login: secrets.token_urlsafe()}, mechanisms=(),
                        handler_class=functools.partial(TokenRelayHandler, idp=idp))
    try:
        run(directory, relay, idp)
    finally:
        idp.stop()


def run(directory: Path, server, idp=None) -> None:
    """Start `server`, write its port (last: the caller waits for it), then the messages it
    receives (and the tokens `idp` issues) until SIGTERM."""
    server.start()
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    (directory / "port").write_text(f"{server.port}\n")
    written = issued = 0
    try:
        with open(directory / "box.jsonl", "a", encoding="utf-8") as box:
            while not stopping:
                messages = server.messages[written:]
                # the tokens first: whoever sees a message in the box finds the token it was sent with
                if idp is not None and len(idp.access_tokens) != issued:
                    tokens = list(idp.access_tokens)
                    issued = len(tokens)
                    fd = os.open(directory / "access-tokens.new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                    with open(fd, "w", encoding="ascii") as out:
                        out.write("".join(f"{token}\n" for token in tokens))
                    os.replace(directory / "access-tokens.new", directory / "access-tokens")  # never read half-written
                for message in messages:
                    box.write(json.dumps({
                        "mail_from": message.mail_from,
                        "rcpt_tos": message.rcpt_tos,
                        "login": message.login,
                        "tls": message.tls,
                        "data": message.data.decode("utf-8", "replace"),
                    }) + "\n")
                    box.flush()
                    written += 1
                time.sleep(0.05)
    finally:
        server.stop()


def wait(directory: Path, text: str, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    box = directory / "box.jsonl"
    while True:
        lines = box.read_text(encoding="utf-8").splitlines() if box.exists() else []
        for line in lines:
            if text in json.loads(line)["data"]:
                print(line)
                return 0
        if time.monotonic() > deadline:
            return 1
        time.sleep(0.1)


if __name__ == "__main__":
    command, directory = sys.argv[1], Path(sys.argv[2])
    if command == "serve":
        serve(directory, sys.argv[3], sys.argv[4])
    elif command == "serve-oauth2":
        serve_oauth2(directory, sys.argv[3], sys.argv[4], sys.stdin.readline().rstrip("\n"))
    elif command == "wait":
        sys.exit(wait(directory, sys.argv[3], float(sys.argv[4]) if len(sys.argv) > 4 else 20))
    else:
        sys.exit(f"usage: {sys.argv[0]} serve DIR LOGIN PASSWORD | serve-oauth2 DIR LOGIN CLIENT_ID (secret on stdin)"
                 " | wait DIR TEXT [SECONDS]")
