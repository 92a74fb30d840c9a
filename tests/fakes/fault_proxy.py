"""A TCP fault proxy for tests: put it between the service and Postgres, Redis or the LLM server, then cut,
delay or reset connections through it, without touching the real (shared) server.

    with FaultProxy("127.0.0.1", 5432) as proxy:       # listens on 127.0.0.1:proxy.port
        url = f"postgresql+asyncpg://postgres@127.0.0.1:{proxy.port}/mydb"
        proxy.cut()          # every open connection reset, new ones reset at once
        proxy.restore()
        proxy.reset_rate = 0.1   # each chunk sent to the server resets its connection with this probability
        proxy.delay_s = 0.05     # added before each forwarded chunk

It runs its own event loop in a background thread, so it keeps working while the test's loop is busy or blocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), as a crashed peer or a middlebox would, not with a polite FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    def __init__(self, target_host: str, target_port: int, *, seed: int = 0) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.down = False
        self.reset_rate = 0.0
        self.delay_s = 0.0
        self.connections_total = 0
        self.resets = 0
        self._random = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._live: set[asyncio.StreamWriter] = set()

    # -- control (from any thread) ---------------------------------------------------------------------

    def cut(self) -> None:
        """Reset every open connection and refuse new ones (accepted, then reset) until `restore`."""
        self.down = True
        asyncio.run_coroutine_threadsafe(self._reset_all(), self._loop).result(10)

    def restore(self) -> None:
        self.down = False

    def reset_all(self) -> None:
        """Reset every open connection once (a server restart), new ones pass."""
        asyncio.run_coroutine_threadsafe(self._reset_all(), self._loop).result(10)

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inside the proxy's loop -------------------------------------------------------------------------

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._reset_all()

    async def _reset_all(self) -> None:
        for writer in list(self._live):
            _reset(writer)
        self._live.clear()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections_total += 1
        if self.down:
            _reset(client_writer)
            return
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(client_writer)
            return
        self._live.update((client_writer, server_writer))
        pair = (client_writer, server_writer)
        try:
            await asyncio.gather(
                self._pipe(client_reader, server_writer, pair, upstream=True),
                self._pipe(server_reader, client_writer, pair, upstream=False),
            )
        finally:
            for writer in pair:
                self._live.discard(writer)
                if not writer.transport.is_closing():
                    writer.transport.abort()

    async def _pipe(self, reader, writer, pair, *, upstream: bool) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if self.down:
                    raise ConnectionResetError
                if upstream and self.reset_rate and self._random.random() < self.reset_rate:
                    self.resets += 1
                    raise ConnectionResetError
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                writer.write(data)
                await writer.drain()
            with contextlib.suppress(OSError):
                writer.write_eof()
        except (ConnectionError, OSError):
            for w in pair:
                _reset(w)
