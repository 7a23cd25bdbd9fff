"""Streaming multipart uploads: the request body is parsed as it arrives (streaming_form_data) and the file part
goes straight into the artifact store's streaming writer, hashed on the way, so memory stays constant whatever
the upload size and the size cap is enforced while streaming (not after buffering).

The first bytes of the file are sniffed before anything big is written, so a wrong format is rejected early.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable

import anyio
from anyio import to_thread
from starlette.requests import ClientDisconnect, Request
from streaming_form_data import StreamingFormDataParser
from streaming_form_data.parser import ParseFailedException
from streaming_form_data.targets import BaseTarget, ValueTarget
from streaming_form_data.validators import MaxSizeValidator, ValidationError

from app.core.storage import ArtifactStore, PayloadTooLarge, StoredObject, StreamWriter
from nba_core.errors import NBAError

from .errors import VALIDATION_ERROR

SNIFF_BYTES = 16  # default; datasets need more (a tar header is 512 bytes)
# Room for the non-file parts (spec JSON, small fields) and multipart framing on top of the file cap.
FORM_OVERHEAD = 1024 * 1024
# After rejecting an upload we read (and discard) up to this much of the remaining body, so the client gets to
# read our error response instead of a connection reset; beyond it we just close the connection.
DRAIN_LIMIT = 64 * 1024 * 1024
SMALL_FIELD_BYTES = 64 * 1024
# File bytes are collected to this size before one thread hop writes (and hashes) them: a hop per 64 KiB
# network chunk cost more than the disk write itself. Two such buffers per upload.
WRITE_BATCH = 4 * 1024 * 1024


class StoreTarget(BaseTarget):
    """A multipart target that writes the part into an ArtifactStore writer, sniffing its first bytes."""

    def __init__(self, store: ArtifactStore, max_bytes: int, sniff: Callable[[bytes], str],
                 sniff_bytes: int = SNIFF_BYTES, before_start: Callable[[], None] | None = None):
        super().__init__()
        self.sniff_bytes = sniff_bytes
        # Runs when the file part begins: fields sent before it (the spec) are checked before any file byte.
        self.before_start = before_start
        self.store = store
        self.max_bytes = max_bytes
        self.sniff = sniff
        self.writer: StreamWriter | None = None
        # Two batch buffers: the event loop copies network chunks into one while a thread hashes and writes the
        # other. One big hash/write call per batch matters: a thread that re-takes the GIL per 64 KiB chunk waits
        # for the busy event loop each time (up to the 5 ms switch interval), which stalled the whole upload.
        self.buffers = (bytearray(WRITE_BATCH), bytearray(WRITE_BATCH))
        self.current = 0
        self.filled = 0
        self.inflight: asyncio.Future | None = None
        self.head = bytearray()
        self.format: str | None = None
        self.parts = 0
        self.stored: StoredObject | None = None
        self.complete = False  # the part's closing delimiter was seen

    async def on_start_async(self) -> None:
        self.parts += 1
        if self.parts > 1:
            raise NBAError(VALIDATION_ERROR, "exactly one `file` part is allowed")
        if self.before_start is not None:
            self.before_start()
        self.writer = await to_thread.run_sync(lambda: self.store.open_writer(max_bytes=self.max_bytes))

    async def on_data_received_async(self, chunk: bytes) -> None:
        assert self.writer is not None
        if self.format is None:
            self.head += chunk[: self.sniff_bytes - len(self.head)]
            if len(self.head) >= self.sniff_bytes:
                self.format = self.sniff(bytes(self.head))  # raises NBAError for unsupported formats
        view = memoryview(chunk)
        while view:
            buf = self.buffers[self.current]
            n = min(len(view), WRITE_BATCH - self.filled)
            buf[self.filled:self.filled + n] = view[:n]
            self.filled += n
            view = view[n:]
            if self.filled == WRITE_BATCH:
                await self._flush()

    async def _flush(self) -> None:
        """Hand the filled buffer to a thread that hashes and writes it (releasing the GIL for the whole batch), and
        go on filling the other one: one batch in flight at a time keeps the writes in order."""
        assert self.writer is not None
        if not self.filled:
            return
        batch = memoryview(self.buffers[self.current])[:self.filled]
        await self.wait_written()  # the other buffer's write is done: it can be filled again
        self.inflight = asyncio.get_running_loop().run_in_executor(None, self.writer.write, batch)
        self.current, self.filled = 1 - self.current, 0

    async def wait_written(self) -> None:
        """Wait for the batch in flight (its error, e.g. the size cap or a full disk, is raised here)."""
        inflight, self.inflight = self.inflight, None
        if inflight is not None:
            await inflight

    async def aabort(self) -> None:
        """Abort once no thread is still writing (shielded: also runs when the request was cancelled)."""
        with anyio.CancelScope(shield=True):
            try:
                await self.wait_written()
            except Exception:  # noqa: BLE001 - the upload is being thrown away anyway
                pass
        self.abort()

    async def on_finish_async(self) -> None:
        if self.format is None:
            self.format = self.sniff(bytes(self.head))
        await self._flush()
        await self.wait_written()
        self.complete = True

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()

    def commit(self) -> StoredObject:
        assert self.writer is not None
        self.stored = self.writer.commit()
        return self.stored

    @property
    def received(self) -> bool:
        return self.writer is not None


class FieldTarget(ValueTarget):
    """A small in-memory form field that knows when it is complete (its closing delimiter was seen)."""

    def __init__(self, max_bytes: int = SMALL_FIELD_BYTES):
        super().__init__(validator=MaxSizeValidator(max_bytes))
        self.done = False

    async def on_finish_async(self) -> None:
        self.done = True

    def on_finish(self) -> None:
        self.done = True


@dataclass
class Upload:
    stored: StoredObject
    format: str
    filename: str | None
    fields: dict[str, bytes] = field(default_factory=dict)


def content_length(request: Request) -> int | None:
    try:
        return int(request.headers["content-length"])
    except (KeyError, ValueError):
        return None


async def drain(request: Request, limit: int = DRAIN_LIMIT) -> None:
    """Discard what is left of the body (bounded), so the error response reaches the client."""
    length = content_length(request)
    if length is not None and length > limit:
        return
    seen = 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                return
    except (ClientDisconnect, RuntimeError):
        return


async def receive_upload(request: Request, store: ArtifactStore, *, max_bytes: int, sniff: Callable[[bytes], str],
                         sniff_bytes: int = SNIFF_BYTES, fields: tuple[str, ...] = (),
                         on_field: Callable[[str, bytes], None] | None = None) -> Upload:
    """Stream a multipart body with one `file` part into `store`. Small text `fields` are collected (at most
    64 KiB each); `on_field(name, value)` runs as soon as a field is complete, i.e. before the rest of the upload
    is read when the client sends it first, so a bad spec is rejected without receiving the file."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise NBAError("unsupported_media_type", "send the upload as multipart/form-data", http_status=415)
    length = content_length(request)
    if length is not None and length > max_bytes + FORM_OVERHEAD:
        raise PayloadTooLarge(max_bytes)
    try:
        parser = StreamingFormDataParser(headers=request.headers)
    except ParseFailedException as e:
        raise NBAError(VALIDATION_ERROR, f"malformed multipart request: {e}") from e

    values = {name: FieldTarget() for name in fields}
    seen_fields: set[str] = set()
    target = StoreTarget(store, max_bytes, sniff, sniff_bytes,
                         before_start=lambda: _report_fields(values, seen_fields, on_field))
    parser.register("file", target)
    for name, value_target in values.items():
        parser.register(name, value_target)

    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes + FORM_OVERHEAD:
                raise PayloadTooLarge(max_bytes)
            try:
                await parser.adata_received(chunk)
            except ValidationError as e:
                raise NBAError(VALIDATION_ERROR, f"a form field is larger than {SMALL_FIELD_BYTES} bytes") from e
            except ParseFailedException as e:
                raise NBAError(VALIDATION_ERROR, f"malformed multipart request: {e}") from e
            _report_fields(values, seen_fields, on_field)
        if not target.received:
            raise NBAError(VALIDATION_ERROR, "the multipart body has no `file` part")
        if not target.complete:
            raise NBAError(VALIDATION_ERROR, "the multipart body ended inside the `file` part")
        _report_fields(values, seen_fields, on_field)
        stored = await to_thread.run_sync(target.commit)
    except ClientDisconnect:
        await target.aabort()
        raise NBAError(VALIDATION_ERROR, "the client disconnected during the upload", http_status=400) from None
    except BaseException:
        await target.aabort()
        raise
    return Upload(stored=stored, format=str(target.format), filename=target.multipart_filename,
                  fields={name: v.value for name, v in values.items() if v.done})


def _report_fields(values: dict[str, FieldTarget], seen: set[str],
                   on_field: Callable[[str, bytes], None] | None) -> None:
    """Hand each newly completed field to on_field once."""
    if on_field is None:
        return
    for name, value_target in values.items():
        if name not in seen and value_target.done:
            seen.add(name)
            on_field(name, value_target.value)
