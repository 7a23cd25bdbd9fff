"""Synchronous HTTP client for the service (httpx only: `pip install nba-sanitizer` with no extras is enough).

    from nba_core.client import NBAClient, sanitize
    job = sanitize("http://127.0.0.1:8000", API_KEY, model="model.safetensors", spec="model.json",
                   data="my_images/", out="cleaned.safetensors")      # a folder of class folders is zipped for you

 Uploads are streamed from disk (the multipart body is built as
a generator with an exact Content-Length, so the server can refuse an oversize upload before it is sent), and
downloads are streamed to a temporary file whose SHA-256 is checked before it is renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import httpx

CHUNK = 1024 * 1024
FINISHED = ("succeeded", "failed", "cancelled")


class APIError(Exception):
    """An error answer from the service (`status` 0: the client itself detected the problem)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    try:
        resp.read()
        err = resp.json()["error"]
        code, message = str(err["code"]), str(err["message"])
    except Exception:
        code, message = "http_error", resp.text[:500] if resp.is_stream_consumed else ""
    raise APIError(resp.status_code, code, message)


def _spec_text(spec: str | os.PathLike | dict | Any) -> str:
    if isinstance(spec, dict):
        return json.dumps(spec)
    if hasattr(spec, "model_dump"):  # a nba_core.spec.ModelSpec
        return json.dumps(spec.model_dump(mode="json"))
    text = str(spec)
    if text.lstrip().startswith("{"):
        return text
    return Path(text).read_text(encoding="utf-8")


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\r", " ").replace("\n", " ")


class MultipartStream:
    """multipart/form-data body: small text fields first, then one streamed `file` part; knows its length."""

    def __init__(self, fields: dict[str, str], filename: str, chunks: Iterable[bytes], file_size: int):
        self.boundary = "nba-" + secrets.token_hex(16)
        self._head = b"".join(
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="{_quote(k)}"\r\n\r\n'.encode()
            + v.encode("utf-8") + b"\r\n" for k, v in fields.items()
        ) + (f'--{self.boundary}\r\nContent-Disposition: form-data; name="file"; filename="{_quote(filename)}"\r\n'
             f"Content-Type: application/octet-stream\r\n\r\n").encode()
        self._tail = f"\r\n--{self.boundary}--\r\n".encode()
        self._chunks = chunks
        self.file_size = file_size

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def __len__(self) -> int:
        return len(self._head) + self.file_size + len(self._tail)

    def __iter__(self) -> Iterator[bytes]:
        yield self._head
        sent = 0
        for chunk in self._chunks:
            sent += len(chunk)
            yield chunk
        if sent != self.file_size:
            raise ValueError(f"file produced {sent} bytes, expected {self.file_size}")
        yield self._tail


def _file_chunks(path: str | os.PathLike) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


class NBAClient:
    def __init__(self, base_url: str, api_key: str, timeout: float = 60.0):
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout,
                                  headers={"Authorization": f"Bearer {api_key}"})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "NBAClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing
    def _json(self, method: str, url: str, **kw: Any) -> Any:
        resp = self._http.request(method, url, **kw)
        _raise_for(resp)
        return resp.json()

    def upload_stream(self, url: str, chunks: Iterable[bytes], size: int, *, filename: str,
                      fields: dict[str, str] | None = None) -> dict:
        """POST a multipart upload whose file part is produced by `chunks` (exactly `size` bytes)."""
        body = MultipartStream(fields or {}, filename, chunks, size)
        headers = {"Content-Type": body.content_type, "Content-Length": str(len(body))}
        try:
            resp = self._http.post(url, content=iter(body), headers=headers)
        except (httpx.WriteError, httpx.RemoteProtocolError) as e:
            # The server refused the upload and closed the connection before we finished sending it.
            raise APIError(0, "upload_interrupted", f"the server closed the connection during the upload: {e}") from e
        _raise_for(resp)
        return resp.json()

    # ------------------------------------------------------------------ uploads
    def upload_model(self, path: str | os.PathLike, spec: str | os.PathLike | dict | Any = None) -> dict:
        """Upload a safetensors / zip-format .pt state_dict with its model spec (path, JSON text, dict; None: the
        spec a .safetensors written by nba carries), or a zip of a Hugging Face model folder (config.json +
        model.safetensors) with no spec."""
        if spec is None and str(path).endswith(".safetensors"):
            from .safetensors_header import embedded_spec

            spec = embedded_spec(path)
            if not spec:
                raise APIError(0, "spec_missing", f"{path} carries no model spec: pass spec= (a model.json)")
        fields = {"spec": _spec_text(spec)} if spec is not None else {}
        return self.upload_stream("/v1/models", _file_chunks(path), os.path.getsize(path),
                                  filename=Path(path).name, fields=fields)

    def upload_dataset(self, path: str | os.PathLike, kind: str = "clean") -> dict:
        """Upload a .npz, a zip/tar of class folders, or a plain folder of class folders (zipped on the fly into
        a temporary file); kind="probe" for a triggered probe set."""
        if os.path.isdir(path):
            from .data.classes import pack_folder

            with tempfile.TemporaryDirectory(prefix="nba-upload-") as tmp:
                packed = Path(tmp) / (Path(path).resolve().name + ".zip")
                pack_folder(path, packed)
                return self.upload_dataset(packed, kind=kind)
        return self.upload_stream("/v1/datasets", _file_chunks(path), os.path.getsize(path),
                                  filename=Path(path).name, fields={"kind": kind})

    def get_model(self, model_id: str) -> dict:
        return self._json("GET", f"/v1/models/{model_id}")

    def get_dataset(self, dataset_id: str) -> dict:
        return self._json("GET", f"/v1/datasets/{dataset_id}")

    # ------------------------------------------------------------------ jobs
    def create_job(self, model_id: str, dataset_id: str, method: str, params: dict | None = None, *,
                   probe_id: str | None = None, probe_target: int | None = None,
                   idempotency_key: str | None = None, class_names: list[str] | None = None,
                   allow_low_accuracy: bool = False) -> dict:
        """Start a job. `class_names`: the model's classes in label order (maps folder names to labels; stored in
        the job and its report). `allow_low_accuracy`: run even if the model scores near chance on the clean data
        before cleaning (normally a label-order or normalisation mistake, refused with `accuracy_near_chance`)."""
        body: dict[str, Any] = {"model_id": model_id, "dataset_id": dataset_id, "method": method,
                                "params": params or {}}
        if class_names is not None:
            body["class_names"] = list(class_names)
        if allow_low_accuracy:
            body["allow_low_accuracy"] = True
        if probe_id is not None:
            body["probe_id"] = probe_id
        if probe_target is not None:
            body["probe_target"] = probe_target
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._json("POST", "/v1/jobs", json=body, headers=headers)

    def get_job(self, job_id: str) -> dict:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def list_jobs(self, *, status: str | None = None, limit: int = 20, cursor: str | None = None) -> dict:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        if cursor:
            params["cursor"] = cursor
        return self._json("GET", "/v1/jobs", params=params)

    def cancel_job(self, job_id: str) -> dict:
        return self._json("POST", f"/v1/jobs/{job_id}/cancel")

    def wait(self, job_id: str, poll: float = 1.0, on_progress: Callable[[dict], None] | None = None,
             timeout: float | None = None) -> dict:
        """Poll until the job is finished; returns the final job. Raises TimeoutError after `timeout` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last: tuple | None = None
        while True:
            job = self.get_job(job_id)
            state = (job["status"], job.get("stage"), job.get("progress"))
            if on_progress is not None and state != last:
                on_progress(job)
            last = state
            if job["status"] in FINISHED:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(poll)

    def download_model(self, job_id: str, dest: str | os.PathLike) -> dict:
        """Stream the cleaned model to `dest` (via dest.part, renamed only if the SHA-256 matches)."""
        dest = Path(dest)
        part = dest.with_name(dest.name + ".part")
        digest = hashlib.sha256()
        size = 0
        with self._http.stream("GET", f"/v1/jobs/{job_id}/model") as resp:
            _raise_for(resp)
            expected = resp.headers.get("x-content-sha256")
            with open(part, "wb") as f:
                for chunk in resp.iter_bytes(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
        if expected and digest.hexdigest() != expected:
            part.unlink(missing_ok=True)
            raise APIError(0, "checksum_mismatch", f"downloaded bytes hash to {digest.hexdigest()}, "
                           f"the server announced {expected}")
        os.replace(part, dest)
        return {"path": str(dest), "sha256": digest.hexdigest(), "size_bytes": size}

    def get_report(self, job_id: str, html: bool = False) -> dict | str:
        if html:
            resp = self._http.get(f"/v1/jobs/{job_id}/report", params={"format": "html"})
            _raise_for(resp)
            return resp.text
        return self._json("GET", f"/v1/jobs/{job_id}/report")

    def report_link(self, job_id: str, ttl: int = 900) -> dict:
        """{"url", "expires_at"}: a signed URL to the job's HTML report that opens in a browser without the key."""
        return self._json("GET", f"/v1/jobs/{job_id}/report-link", params={"ttl": ttl})

    def health(self) -> dict:
        return self._json("GET", "/healthz")

    def ready(self) -> dict:
        resp = self._http.get("/readyz")
        return resp.json()


def sanitize(url: str, api_key: str, *, model: str | os.PathLike, data: str | os.PathLike,
             spec: str | os.PathLike | dict | Any = None, method: str = "nba", params: dict | None = None,
             out: str | os.PathLike | None = None, probe: str | os.PathLike | None = None,
             probe_target: int | None = None, class_names: list[str] | None = None,
             allow_low_accuracy: bool = False, on_progress: Callable[[dict], None] | None = None,
             timeout: float | None = None) -> dict:
    """Upload, run one job, wait for it and (with `out`) download the verified cleaned model, in one call.

    Returns the finished job with its "report" added (None if it failed). Raises APIError on a refused request;
    a job that ends failed/cancelled is returned, not raised: look at job["status"] and job["error"]."""
    with NBAClient(url, api_key) as client:
        model_art = client.upload_model(model, spec=spec)
        data_art = client.upload_dataset(data)
        probe_art = client.upload_dataset(probe, kind="probe") if probe is not None else None
        job = client.create_job(model_art["id"], data_art["id"], method, params,
                                probe_id=probe_art["id"] if probe_art else None, probe_target=probe_target,
                                class_names=class_names, allow_low_accuracy=allow_low_accuracy)
        job = client.wait(job["id"], on_progress=on_progress, timeout=timeout)
        job["report"] = client.get_report(job["id"]) if job["status"] == "succeeded" else None
        if out is not None and job["status"] == "succeeded":
            job["download"] = client.download_model(job["id"], out)
        return job
