"""The benchmark's relays, in a process of their own so that they never compete with the timed
programs for the bench process's interpreter.

A loopback implicit-TLS relay with AUTH and PIPELINING (the test relay, `tests.relay`), and a delay
proxy in front of it that holds every server→client chunk for `--delay` seconds, as an internet
relay's round trip would. Prints one JSON line (ports, CA file, login, password), then answers
commands on stdin: ``count`` → messages received so far, ``clear`` → forget them (a 50 MB message
is not kept longer than needed), ``limited {"per_minute": 600}`` → the port of a new relay playing
163's limits (tests/provider_relay.py) with those fields of `Limits` changed, on the real clock,
``stats PORT`` → what that relay took and refused, as JSON (`limited_stats`), ``oauth2`` → an
OAuth2 identity provider and a relay that takes only its tokens (`serve_oauth2`), as JSON,
``idp_requests`` → the token requests that provider answered so far. EOF stops everything.

    python bench/servers.py WORKDIR [--delay 0.2]
"""

import argparse
import asyncio
import email.parser
import functools
import json
import os
import pathlib
import sys
import logging
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))

from tests.provider_relay import PROVIDERS, limited_relay
from tests.relay import RELAY_LOGIN, RELAY_PASSWORD, Certificates, RelayServer

_USERS = {RELAY_LOGIN: RELAY_PASSWORD}


async def _pipe(reader, writer, delay: float) -> None:
    """Copy until EOF; each chunk is written `delay` seconds after it arrived, in order."""
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue = asyncio.Queue()

    async def later():
        while True:
            due, data = await chunks.get()
            await asyncio.sleep(max(due - loop.time(), 0))
            if not data:
                break
            writer.write(data)
            await writer.drain()
        writer.close()

    sender = asyncio.ensure_future(later())
    try:
        while True:
            data = await reader.read(65536)
            await chunks.put((loop.time() + delay, data))
            if not data:
                break
    except OSError:
        await chunks.put((loop.time(), b""))
    await sender


async def _proxy(upstream_port: int, delay: float, ready: list) -> None:
    async def connection(client_reader, client_writer):
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        except OSError:
            client_writer.close()
            return
        try:
            await asyncio.gather(_pipe(client_reader, server_writer, 0.0),
                                 _pipe(server_reader, client_writer, delay))
        except OSError:
            pass
        finally:
            client_writer.close()
            server_writer.close()

    server = await asyncio.start_server(connection, "127.0.0.1", 0)
    ready.append(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


def _started(certificates: Certificates, **options) -> RelayServer:
    server = RelayServer(certificates, **options)
    server.start()
    return server


def serve_limited(certificates: Certificates, changes: dict) -> RelayServer:
    """A started relay (implicit TLS, AUTH, PIPELINING) playing 163's limits with `changes`; no
    clock file: the relay counts on the real time."""
    return limited_relay(functools.partial(_started, certificates), PROVIDERS["163"]._replace(**changes), "",
                         security="tls", pipelining=True, users=_USERS)


def serve_oauth2(certificates: Certificates):
    """The test identity provider (tests/idp.py, HTTPS on loopback; its client's secret is the
    relay password, which the bench's shims store with --set-password) and a relay (implicit TLS,
    PIPELINING) that takes only XOAUTH2/OAUTHBEARER with its live tokens."""
    from tests.idp import CLIENT_ID, IdP
    from tests.relay import TokenRelayHandler

    idp = IdP(certificates)
    idp.clients[CLIENT_ID] = RELAY_PASSWORD
    idp.start()
    relay = _started(certificates, security="tls", pipelining=True, users=_USERS, mechanisms=(),
                     handler_class=functools.partial(TokenRelayHandler, idp=idp))
    return idp, relay


def limited_stats(relay: RelayServer) -> dict:
    """Messages received, distinct Message-IDs among them, how often a client went beyond each
    limit, the most connections open at once."""
    parser = email.parser.BytesHeaderParser()
    ids = {parser.parsebytes(m.data)["Message-ID"] for m in relay.messages}
    return {"received": len(relay.messages), "distinct": len(ids), "over": dict(relay.handler.over),
            "most_sessions": relay.handler.most_sessions}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir", type=pathlib.Path)
    parser.add_argument("--delay", type=float, default=0.2)
    args = parser.parse_args()
    # aiosmtpd's AUTH code logs a warning about its own deprecated login_data on every login
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    args.workdir.mkdir(parents=True, exist_ok=True)
    certificates = Certificates(args.workdir)
    relay = RelayServer(certificates, security="tls", pipelining=True, users=_USERS)
    relay.SMTP_kwargs["data_size_limit"] = None  # the 50 MB message must get through
    relay.start()
    ports: list = []
    threading.Thread(target=asyncio.run, args=(_proxy(relay.port, args.delay, ports),), daemon=True).start()
    while not ports:
        threading.Event().wait(0.01)
    print(json.dumps({"port": relay.port, "delayed_port": ports[0], "ca_file": relay.ca_file,
                      "login": RELAY_LOGIN, "password": RELAY_PASSWORD}), flush=True)
    limited: dict[int, RelayServer] = {}
    idp = None
    for line in sys.stdin:
        command = line.strip()
        if command == "count":
            print(len(relay.messages), flush=True)
        elif command == "clear":
            relay.messages.clear()
            print("ok", flush=True)
        elif command.startswith("limited "):
            server = serve_limited(certificates, json.loads(command.split(" ", 1)[1]))
            limited[server.port] = server
            print(server.port, flush=True)
        elif command.startswith("stats "):
            print(json.dumps(limited_stats(limited[int(command.split()[1])])), flush=True)
        elif command == "oauth2":
            from tests.idp import CLIENT_ID, IDP_SCOPE

            idp, token_relay = serve_oauth2(certificates)
            limited[token_relay.port] = token_relay
            print(json.dumps({"port": token_relay.port, "token_url": idp.token_url, "client_id": CLIENT_ID,
                              "scope": IDP_SCOPE}), flush=True)
        elif command == "idp_requests":
            print(len(idp.requests) if idp else 0, flush=True)
    for server in (relay, *limited.values(), *([idp] if idp else [])):
        server.stop()


if __name__ == "__main__":
    main()
