"""The benchmark's relays, in a process of their own so that they never compete with the timed
programs for the bench process's interpreter.

A loopback implicit-TLS relay with AUTH and PIPELINING (the test relay, `tests.relay`), and a delay
proxy in front of it that holds every server→client chunk for `--delay` seconds, as an internet
relay's round trip would. Prints one JSON line (ports, CA file, login, password), then answers
commands on stdin: ``count`` → messages received so far, ``clear`` → forget them (a 50 MB message
is not kept longer than needed). EOF stops everything.

    python bench/servers.py WORKDIR [--delay 0.2]
"""

import argparse
import asyncio
import json
import os
import pathlib
import sys
import logging
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))

from tests.relay import RELAY_LOGIN, RELAY_PASSWORD, Certificates, RelayServer


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir", type=pathlib.Path)
    parser.add_argument("--delay", type=float, default=0.2)
    args = parser.parse_args()
    # aiosmtpd's AUTH code logs a warning about its own deprecated login_data on every login
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    args.workdir.mkdir(parents=True, exist_ok=True)
    relay = RelayServer(Certificates(args.workdir), security="tls", pipelining=True,
                        users={RELAY_LOGIN: RELAY_PASSWORD})
    relay.SMTP_kwargs["data_size_limit"] = None  # the 50 MB message must get through
    relay.start()
    ports: list = []
    threading.Thread(target=asyncio.run, args=(_proxy(relay.port, args.delay, ports),), daemon=True).start()
    while not ports:
        threading.Event().wait(0.01)
    print(json.dumps({"port": relay.port, "delayed_port": ports[0], "ca_file": relay.ca_file,
                      "login": RELAY_LOGIN, "password": RELAY_PASSWORD}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "count":
            print(len(relay.messages), flush=True)
        elif command == "clear":
            relay.messages.clear()
            print("ok", flush=True)
    relay.stop()


if __name__ == "__main__":
    main()
