"""Stand-in for sshd where OpenSSH is not installed: the service's own asyncssh server, in a child process."""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

import asyncssh

from mqi_async.hpc.simulated import LocalSshServer


async def serve(port: int, host_key: Path, authorized_keys: Path) -> None:
    server = LocalSshServer(
        root=Path("/"),
        host_key=asyncssh.read_private_key(str(host_key)),
        client_public_key=authorized_keys.read_text(),
        port=port,
    )
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.aclose()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host-key", type=Path, required=True)
    parser.add_argument("--authorized-keys", type=Path, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.host_key, args.authorized_keys))


if __name__ == "__main__":
    main()
