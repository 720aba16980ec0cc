"""A TCP relay in front of the S3 server that sees what crosses the wire: bytes each way
and connections opened, and that can behave the way networks and stores do: answer 503
SlowDown (throttling), cut a connection in the middle of a response (a reset), or cap
each connection's bandwidth (as an object store caps each request's)."""

from __future__ import annotations

import asyncio
import threading
import time

_SLOW_DOWN = (
    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
)
_SLOW_DOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class TcpProxy:
    def __init__(self, target_port: int, connection_bytes_per_s: float | None = None):
        self.target_port = target_port
        self.rate = connection_bytes_per_s
        self.bytes_down = 0  # server -> client
        self.bytes_up = 0  # client -> server
        self.connections = 0
        self.throttle = 0  # answer this many more connections with 503 SlowDown
        self.cut = 0  # cut this many more connections after cut_after bytes of response
        self.cut_after = 1 << 20
        self.cut_uploads = False  # cut every connection that sends more than cut_after bytes
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self._thread.start()
        ready.wait()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def reset_counters(self) -> None:
        self.bytes_down = self.bytes_up = self.connections = 0

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        ready.set()
        self._loop.run_forever()

    def close(self) -> None:
        async def shutdown():
            self._server.close()
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    async def _handle(self, client_reader, client_writer) -> None:
        self.connections += 1
        if self.throttle > 0:
            self.throttle -= 1
            await client_reader.readuntil(b"\r\n\r\n")
            client_writer.write(_SLOW_DOWN % (len(_SLOW_DOWN_BODY), _SLOW_DOWN_BODY))
            await client_writer.drain()
            client_writer.close()
            return
        cut_after = None
        if self.cut > 0:
            self.cut -= 1
            cut_after = self.cut_after
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(
            self._pump(client_reader, server_writer, client_writer, True, self.cut_after if self.cut_uploads else None),
            self._pump(server_reader, client_writer, server_writer, False, cut_after),
            return_exceptions=True,
        )
        for writer in (client_writer, server_writer):
            writer.close()

    async def _pump(self, reader, writer, other, up: bool, cut_after: int | None = None) -> None:
        sent = 0
        paced_until = 0.0  # when the bytes relayed so far may have left, at the capped rate
        try:
            while data := await reader.read(1 << 16):
                if self.rate:
                    paced_until = max(paced_until, time.monotonic()) + len(data) / self.rate
                    await asyncio.sleep(paced_until - time.monotonic())
                if cut_after is not None and sent + len(data) > cut_after:
                    writer.transport.abort()  # RST in the middle of the transfer
                    other.transport.abort()
                    return
                sent += len(data)
                if up:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
                writer.write(data)
                await writer.drain()
        finally:
            if not writer.is_closing():
                writer.close()
