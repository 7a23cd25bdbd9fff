"""Serving a local artifact file (or a byte range of it) with few thread hops.

Starlette's FileResponse reads 64 KiB per thread hop; a 200 MB download made ~3,200 hops. Here each hop is one
os.pread of up to 4 MiB, read ahead while the previous chunk is being sent. When the ASGI server offers the `http.response.pathsend` extension (zero-copy sendfile
by the server), a whole-file response is handed over by path instead.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Mapping

import anyio
from anyio import to_thread
from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.core.storage import LOCAL_READ_CHUNK


class LocalFileResponse(Response):
    def __init__(self, path: Path, start: int, end: int, *, status_code: int = 200,
                 headers: Mapping[str, str] | None = None, media_type: str | None = None,
                 chunk_size: int = LOCAL_READ_CHUNK, background: BackgroundTask | None = None):
        super().__init__(content=None, status_code=status_code, headers=headers, media_type=media_type,
                         background=background)
        self.path, self.start, self.end, self.chunk_size = path, start, end, chunk_size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        if scope.get("method") == "HEAD":
            await send({"type": "http.response.body", "body": b""})
            return
        size = self.end - self.start + 1
        whole = self.start == 0 and size == os.stat(self.path).st_size
        if whole and "http.response.pathsend" in scope.get("extensions", {}):
            await send({"type": "http.response.pathsend", "path": str(self.path)})
            return
        fd = await to_thread.run_sync(os.open, self.path, os.O_RDONLY)
        loop = asyncio.get_running_loop()
        reading: asyncio.Future | None = None
        try:
            # The next chunk is read in a thread while the current one is sent: disk (page cache) and socket
            # work overlap instead of taking turns.
            offset, remaining = self.start, size
            reading = loop.run_in_executor(None, os.pread, fd, min(self.chunk_size, remaining), offset)
            while remaining > 0:
                chunk = await reading
                reading = None
                if not chunk:
                    raise OSError(f"{self.path} ended {remaining} bytes early")
                offset += len(chunk)
                remaining -= len(chunk)
                if remaining > 0:
                    reading = loop.run_in_executor(None, os.pread, fd, min(self.chunk_size, remaining), offset)
                await send({"type": "http.response.body", "body": chunk, "more_body": remaining > 0})
        finally:
            if reading is not None:  # the client went away mid-download: let the read finish before closing
                with anyio.CancelScope(shield=True):
                    await asyncio.wait([reading])
            os.close(fd)
        if self.background is not None:
            await self.background()
