"""Files a case's page offers: only paths the store names for that case, inside the work folder,
served as they are (reports) or streamed as one zip (RT Dose files), never blocking the loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import threading
import zipfile
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from aiohttp import web

log = logging.getLogger(__name__)

#: a zip stream hands the response this much at a time
CHUNK_BYTES = 256 * 1024


def allowed_file(path: str | None, root: Path) -> Path | None:
    """`path` as a regular file under `root` (symlinks resolved), or None.

    The store is the only source of `path`; this also refuses a row that points outside the
    work folder, so a damaged or forged row cannot serve /etc/passwd.
    """
    if not path:
        return None
    try:
        real = Path(path).resolve(strict=True)
        base = root.resolve()
    except (OSError, RuntimeError):
        return None
    if not real.is_relative_to(base) or not real.is_file():
        return None
    return real


def disposition(kind: str, filename: str) -> str:
    """A Content-Disposition with an ASCII fallback name and the exact UTF-8 one."""
    fallback = re.sub(r"[^A-Za-z0-9._-]", "_", filename) or "download"
    return f"{kind}; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


class _Pipe:
    """A write-only file object for zipfile that hands chunks to the event loop, with
    back-pressure (at most a few chunks in flight)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[bytes | None]) -> None:
        self._loop = loop
        self._queue = queue
        self._buffer = bytearray()
        self.stopped = threading.Event()
        self._written = 0

    def write(self, data: bytes) -> int:
        if self.stopped.is_set():
            raise OSError("the download was abandoned")
        self._buffer += data
        self._written += len(data)
        if len(self._buffer) >= CHUNK_BYTES:
            self._hand_over()
        return len(data)

    def tell(self) -> int:
        return self._written

    def flush(self) -> None:
        if self._buffer:
            self._hand_over()

    def _hand_over(self) -> None:
        chunk, self._buffer = bytes(self._buffer), bytearray()
        future = asyncio.run_coroutine_threadsafe(self._queue.put(chunk), self._loop)
        while not self.stopped.is_set():
            try:
                future.result(timeout=1.0)
                return
            except TimeoutError:
                continue
        future.cancel()
        raise OSError("the download was abandoned")

    def close(self) -> None:
        self.flush()


def _write_zip(files: Sequence[Path], pipe: _Pipe) -> None:
    names: set[str] = set()
    with zipfile.ZipFile(pipe, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for path in files:
            name = path.name
            stem, suffix = os.path.splitext(name)
            n = 1
            while name in names:
                n += 1
                name = f"{stem}_{n}{suffix}"
            names.add(name)
            zf.write(path, arcname=name)
    pipe.flush()


async def stream_zip(
    request: web.Request, files: Sequence[Path], filename: str
) -> web.StreamResponse:
    """`files` as one zip, compressed in a thread and sent while it is made."""
    response = web.StreamResponse(
        headers={
            "Content-Type": "application/zip",
            "Content-Disposition": disposition("attachment", filename),
            "Cache-Control": "no-store",
        }
    )
    await response.prepare(request)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=4)
    pipe = _Pipe(loop, queue)

    def produce() -> None:
        try:
            _write_zip(files, pipe)
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                asyncio.run_coroutine_threadsafe(queue.put(None), loop)

    worker = asyncio.ensure_future(asyncio.to_thread(produce))
    try:
        while True:
            chunk = await queue.get()
            if chunk is None:
                break
            await response.write(chunk)
        await worker
    except BaseException as exc:
        pipe.stopped.set()
        # drain so the thread's last put completes, then let it end
        while not worker.done():
            with contextlib.suppress(asyncio.QueueEmpty):
                queue.get_nowait()
            await asyncio.sleep(0.05)
        with contextlib.suppress(Exception):
            worker.result()
        if isinstance(exc, ConnectionError):
            # the browser went away (closed the tab, cancelled the download)
            log.debug("zip download %s abandoned by the client", filename)
            return response
        raise
    await response.write_eof()
    return response
