"""Constant-memory uploads: a 200 MB safetensors streamed (generated on the fly) into a server whose cap is 1 GiB
must keep the server's peak RSS (VmHWM) far below 300 MB, and be hashed correctly on the way."""

from __future__ import annotations

import hashlib
import json
import socket
import time

from app.client import NBAClient

# A spec whose parameter budget admits a 200 MB checkpoint (uploads are bounded by the spec since issue 10).
WIDE_SPEC = {"arch": "mobilenetv2", "num_classes": 10, "in_channels": 3, "input_size": [32, 32],
             "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "arch_params": {"width_mult": 4.0}}

SIZE = 200 * 1024 * 1024
CHUNK = 1024 * 1024


def _big_safetensors() -> tuple[bytes, int]:
    """Header for one F32 tensor that fills SIZE bytes in total."""
    for pad in range(64):
        n_bytes = SIZE - 8 - 64 - pad
        if n_bytes % 4:
            continue
        header = json.dumps({"w": {"dtype": "F32", "shape": [n_bytes // 4], "data_offsets": [0, n_bytes]}},
                            separators=(",", ":")).encode()
        header += b" " * (64 + pad - len(header))
        if len(header) % 8 == 0 and 8 + len(header) + n_bytes == SIZE:
            return len(header).to_bytes(8, "little") + header, n_bytes
    raise AssertionError("no layout found")


def test_200mb_upload_keeps_server_rss_low(server_factory, make_key, store) -> None:
    server = server_factory(max_model_bytes=1024**3)
    baseline_kb = server.memory_kb("VmHWM")
    head, n_bytes = _big_safetensors()
    digest = hashlib.sha256(head)
    zeros = bytes(CHUNK)

    def chunks():
        yield head
        left = n_bytes
        while left:
            piece = zeros[:min(CHUNK, left)]
            digest.update(piece)
            left -= len(piece)
            yield piece

    started = time.monotonic()
    with NBAClient(server.url, make_key(), timeout=300) as client:
        out = client.upload_stream("/v1/models", chunks(), SIZE, filename="big.safetensors",
                                   fields={"spec": json.dumps(WIDE_SPEC)})
    elapsed = time.monotonic() - started
    peak_kb = server.memory_kb("VmHWM")
    key = f"sha256/{out['sha256'][:2]}/{out['sha256']}"
    try:
        assert out["size_bytes"] == SIZE and out["sha256"] == digest.hexdigest()
        assert out["details"]["parameters"] == n_bytes // 4
        print(f"\n200 MB upload: {elapsed:.1f} s, server RSS peak {peak_kb / 1024:.0f} MB "
              f"(baseline {baseline_kb / 1024:.0f} MB)")
        assert peak_kb < 300 * 1024, f"server peak RSS {peak_kb / 1024:.0f} MB"
        assert peak_kb - baseline_kb < 100 * 1024  # the upload itself must not grow the process much
    finally:
        store.delete(key)  # 200 MB of zeros: no need to keep them for the rest of the session


def test_oversize_content_length_is_refused_before_reading_the_body(api_server, api_key) -> None:
    # Announce 10 GiB and send nothing: the server answers 413 from the header alone.
    with socket.create_connection(("127.0.0.1", int(api_server.url.rsplit(":", 1)[1])), timeout=10) as s:
        s.sendall(b"POST /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + api_key.encode() +
                  b"\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 10737418240\r\n\r\n")
        reply = b""
        while b"payload_too_large" not in reply and (chunk := s.recv(65536)):
            reply += chunk
        reply = reply.decode("latin-1")
    assert reply.startswith("HTTP/1.1 413")
    assert '"payload_too_large"' in reply
