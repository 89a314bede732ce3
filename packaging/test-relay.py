"""The loopback test relay of packaging/test-deb.sh (run with the project venv's python).

    test-relay.py serve DIR LOGIN PASSWORD   implicit TLS + AUTH + 163's sender rule on 127.0.0.1;
                                             writes DIR/relay-ca.pem (the CA), DIR/port, and one JSON line per
                                             received message to DIR/box.jsonl; runs until SIGTERM
    test-relay.py wait DIR TEXT [SECONDS]    print the first received message whose bytes contain
                                             TEXT as JSON; exit 1 if none arrives in time

The relay is tests.relay.RelayServer, the one the test suite uses.
"""

import json
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def serve(directory: Path, login: str, password: str) -> None:
    from tests.relay import Certificates, RelayServer

    certificates = Certificates(directory)
    server = RelayServer(certificates, security="tls", users={login: password})
    server.start()
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    (directory / "port").write_text(f"{server.port}\n")
    written = 0
    try:
        with open(directory / "box.jsonl", "a", encoding="utf-8") as box:
            while not stopping:
                for message in server.messages[written:]:
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
    elif command == "wait":
        sys.exit(wait(directory, sys.argv[3], float(sys.argv[4]) if len(sys.argv) > 4 else 20))
    else:
        sys.exit(f"usage: {sys.argv[0]} serve DIR LOGIN PASSWORD | wait DIR TEXT [SECONDS]")
