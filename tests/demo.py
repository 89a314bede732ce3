"""`make demo`: the origin story, solved, on loopback.

A relay that behaves like smtp.163.com (implicit TLS with a CA made on the spot, AUTH, and
"553 Mail from must equal authorized user" when MAIL FROM is not the login) starts on 127.0.0.1.
sendmail-shim is configured through a temporary config file and its own credential store, and a
DokuWiki-style registration mail — Chinese subject, From: the web server's address — is piped
through ``sendmail-shim -t -i`` in the default (background) mode. The demo prints the exit status
and how long the caller waited, what the relay received, and the log line.
"""

import logging
import tempfile
import time
from pathlib import Path

from tests.relay import RELAY_LOGIN, RELAY_PASSWORD, Certificates, RelayServer
from tests.shim import Shim

MESSAGE = (
    "From: DokuWiki <www-data@wiki.local>\n"
    "To: new.user@example.com\n"
    "Subject: [DokuWiki] 注册成功 — 您的密码\n"
    "Content-Type: text/plain; charset=UTF-8\n"
    "Content-Transfer-Encoding: 8bit\n"
    "\n"
    "您好，欢迎注册！\n"
    ".\n"
    "(the line above is a lone dot; -i keeps it)\n"
).encode()


def main() -> int:
    logging.getLogger("mail.log").setLevel(logging.ERROR)  # aiosmtpd's own deprecation chatter
    with tempfile.TemporaryDirectory(prefix="sendmail-shim-demo-") as tmp:
        tmp = Path(tmp)
        relay = RelayServer(Certificates(tmp), security="tls", users={RELAY_LOGIN: RELAY_PASSWORD})
        relay.start()
        try:
            return demo(tmp, relay)
        finally:
            relay.stop()


def demo(tmp: Path, relay: RelayServer) -> int:
    home = tmp / "home"
    home.mkdir()
    print(f"relay: 127.0.0.1:{relay.port}, implicit TLS, AUTH required, 163's rule: MAIL FROM must be {relay.login}")
    shim = Shim(home, relay, RELAY_PASSWORD)  # writes the config, then runs --set-password
    print(f"config: {shim.config_file}")
    print("".join(f"    {line}\n" for line in shim.config_file.read_text().splitlines()), end="")
    print("password: stored with `sendmail-shim --set-password` (never in the config file)\n")
    print("$ printf '…' | sendmail-shim -t -i")
    started = time.monotonic()
    result = shim.run("-t", "-i", stdin=MESSAGE, expect_exit=None)
    waited = time.monotonic() - started
    print(f"exit status: {result.exit_code} after {waited * 1000:.0f} ms (stdout {len(result.stdout)} bytes, "
          f"stderr {result.stderr!r})")
    deadline = time.monotonic() + 15
    while not relay.messages and time.monotonic() < deadline:
        time.sleep(0.05)
    if not relay.messages:
        print("the relay received nothing within 15 s")
        return 1
    msg = relay.messages[0]
    print("\nthe relay received (delivered in the background):")
    print(f"    TLS: {msg.tls}   AUTH login: {msg.login}   EHLO: {msg.helo}")
    print(f"    MAIL FROM:<{msg.mail_from}> {' '.join(msg.mail_options)}")
    print(f"    RCPT TO: {', '.join(f'<{r}>' for r in msg.rcpt_tos)}")
    head, _, body = msg.data.partition(b"\r\n\r\n")
    for line in head.decode().split("\r\n"):
        print(f"    | {line}")
    print(f"    | ({len(body)} bytes of body)")
    time.sleep(0.2)  # the background child writes its log line right after the relay's reply
    print("\nlog:")
    for line in shim.log_lines():
        print(f"    {line}")
    return 0 if result.exit_code == 0 and msg.mail_from == relay.login else 1


if __name__ == "__main__":
    raise SystemExit(main())
