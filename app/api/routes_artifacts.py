"""Uploads: POST /v1/models, /v1/datasets, /v1/probes (streamed), and their GETs."""

from __future__ import annotations

import json
from typing import Any, Callable

from anyio import to_thread
from fastapi import APIRouter, Depends, Request
from sqlalchemy import func, select

from app.core.models import Artifact, Owner, utcnow
from app.core.storage import StoredObject
from nba_core.errors import NBAError, SPEC_INVALID
from nba_core.spec import ModelSpec, parse_spec

from . import checks
from app.core.storage import InsufficientStorage

from .deps import ServiceState, authenticate, current_owner, get_state
from .errors import VALIDATION_ERROR, not_found
from .schemas import ArtifactOut, ErrorResponse
from .uploads import Upload, content_length, drain, receive_upload

router = APIRouter(prefix="/v1", tags=["artifacts"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse} for s in (401, 404, 413, 415, 422)
}


def _multipart_doc(extra: dict[str, Any], required: list[str]) -> dict[str, Any]:
    """OpenAPI for a body we parse ourselves (FastAPI cannot infer it: the route reads request.stream())."""
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file", *required],
        "properties": {"file": {"type": "string", "format": "binary"}, **extra}}}}}}


def _forget_stored(state: ServiceState, stored: StoredObject) -> None:
    """Delete a rejected upload's object unless an artifact row uses the same bytes. (Identical bytes fail the
    same checks, so a concurrent accepted upload of them can only happen across kinds, e.g. a zip sent both as a
    .pt model and as a dataset at the same moment: a window we accept.)"""
    with state.sessions() as session:
        used = session.execute(select(func.count()).select_from(Artifact)
                               .where(Artifact.storage_key == stored.key)).scalar_one()
    if not used:
        state.store.delete(stored.key)


async def _upload(request: Request, state: ServiceState, *, max_bytes: int, sniff: Callable[[bytes], str],
                  sniff_bytes: int, fields: tuple[str, ...], on_field: Callable[[str, bytes], None] | None,
                  check: Callable[[Upload], dict[str, Any]], build: Callable[[Owner, Upload], Artifact]
                  ) -> ArtifactOut:
    try:
        owner = await to_thread.run_sync(authenticate, state, request)
        await to_thread.run_sync(_admit_upload, state, owner, content_length(request) or 0)
        upload = await receive_upload(request, state.store, max_bytes=max_bytes, sniff=sniff,
                                      sniff_bytes=sniff_bytes, fields=fields, on_field=on_field)
    except NBAError:
        await drain(request)
        raise
    try:
        await to_thread.run_sync(_admit_upload, state, owner, upload.stored.size, True)
        details = await to_thread.run_sync(check, upload)
        artifact = build(owner, upload)
        artifact.info = _jsonable(details)

        def insert() -> Artifact:
            with state.sessions() as session:
                session.add(artifact)
                session.commit()
                return artifact

        artifact = await to_thread.run_sync(insert)
    except BaseException:
        await to_thread.run_sync(_forget_stored, state, upload.stored)
        raise
    return ArtifactOut.of(artifact, _jsonable(details))


def _admit_upload(state: ServiceState, owner: Owner, incoming: int, stored: bool = False) -> None:
    """Storage quota (429) and free space (507), before the body is read (with its declared length) and again
    once it is stored (its real size; the first check cannot see a chunked body's)."""
    if state.quotas is not None:
        with state.sessions() as session:
            state.quotas.check_storage(session, owner.id, incoming)
    if not stored:
        free = state.store.free_bytes()
        if free is not None and free - incoming < state.settings.min_free_bytes:
            raise InsufficientStorage(f"the artifact store has {free} bytes free; this upload would leave less "
                                      f"than the {state.settings.min_free_bytes}-byte reserve")


def _jsonable(details: Any) -> dict[str, Any] | None:
    if not isinstance(details, dict) or not details:
        return None
    try:
        json.dumps(details)
        return details
    except (TypeError, ValueError):
        return None


def _filename(upload: Upload) -> str | None:
    return (upload.filename or "")[-300:] or None


@router.post("/models", status_code=201, response_model=ArtifactOut, responses=_ERRORS,
             openapi_extra=_multipart_doc({"spec": {"type": "string", "description": "model-spec JSON (a form "
                                                    "field or a file part)"}}, ["spec"]),
             summary="Upload a model (safetensors or a zip-format .pt state_dict) with its spec")
async def upload_model(request: Request, state: ServiceState = Depends(get_state)) -> ArtifactOut:
    parsed: dict[str, ModelSpec] = {}

    def on_field(name: str, value: bytes) -> None:
        if name == "spec":
            parsed["spec"] = parse_spec(value)  # raises spec_invalid / unknown_architecture early

    def check(upload: Upload) -> dict[str, Any]:
        if "spec" not in parsed:
            raise NBAError(SPEC_INVALID, "the `spec` part (model-spec JSON) is missing")
        return checks.check_model_object(state.store, upload.stored.key, upload.format, upload.stored.size,
                                         parsed["spec"])

    def build(owner: Owner, upload: Upload) -> Artifact:
        return Artifact(owner_id=owner.id, kind="model", sha256=upload.stored.sha256, size_bytes=upload.stored.size,
                        storage_key=upload.stored.key, filename=_filename(upload), format=upload.format,
                        spec=parsed["spec"].model_dump(mode="json"), created_at=utcnow())

    return await _upload(request, state, max_bytes=state.settings.max_model_bytes, sniff=checks.sniff_model,
                         sniff_bytes=checks.MODEL_SNIFF_BYTES,
                         fields=("spec",), on_field=on_field, check=check, build=build)


async def _dataset(request: Request, state: ServiceState, forced_kind: str | None) -> ArtifactOut:
    kinds: dict[str, str] = {}

    def on_field(name: str, value: bytes) -> None:
        if name == "kind" and forced_kind is None:
            kind = value.decode("utf-8", "replace").strip() or "clean"
            if kind not in ("clean", "probe"):
                raise NBAError(VALIDATION_ERROR, "kind must be 'clean' or 'probe'")
            kinds["kind"] = kind

    def check(upload: Upload) -> dict[str, Any]:
        return checks.check_dataset_object(state.store, upload.stored.key)

    def build(owner: Owner, upload: Upload) -> Artifact:
        kind = forced_kind or kinds.get("kind", "clean")
        return Artifact(owner_id=owner.id, kind="probe" if kind == "probe" else "dataset",
                        sha256=upload.stored.sha256, size_bytes=upload.stored.size, storage_key=upload.stored.key,
                        filename=_filename(upload), format=upload.format, spec=None, created_at=utcnow())

    return await _upload(request, state, max_bytes=state.settings.max_dataset_bytes, sniff=checks.sniff_dataset,
                         sniff_bytes=checks.DATASET_SNIFF_BYTES,
                         fields=("kind",), on_field=on_field, check=check, build=build)


@router.post("/datasets", status_code=201, response_model=ArtifactOut, responses=_ERRORS,
             openapi_extra=_multipart_doc({"kind": {"type": "string", "enum": ["clean", "probe"],
                                                    "default": "clean"}}, []),
             summary="Upload a dataset (.npz, or a zip/tar of class folders); kind=probe for a triggered probe set")
async def upload_dataset(request: Request, state: ServiceState = Depends(get_state)) -> ArtifactOut:
    return await _dataset(request, state, None)


@router.post("/probes", status_code=201, response_model=ArtifactOut, responses=_ERRORS,
             openapi_extra=_multipart_doc({}, []),
             summary="Upload a triggered probe set (same as POST /v1/datasets with kind=probe)")
async def upload_probe(request: Request, state: ServiceState = Depends(get_state)) -> ArtifactOut:
    return await _dataset(request, state, "probe")


def _get_artifact(state: ServiceState, owner: Owner, artifact_id: str, kinds: tuple[str, ...], what: str
                  ) -> ArtifactOut:
    with state.sessions() as session:
        artifact = session.get(Artifact, artifact_id) if len(artifact_id) <= 36 else None
        # Another owner's artifact answers exactly like a missing one (no existence oracle).
        if artifact is None or artifact.owner_id != owner.id or artifact.kind not in kinds:
            raise not_found(what, artifact_id)
        return ArtifactOut.of(artifact)


@router.get("/models/{model_id}", response_model=ArtifactOut, responses=_ERRORS, summary="An uploaded model")
def get_model(model_id: str, state: ServiceState = Depends(get_state),
              owner: Owner = Depends(current_owner)) -> ArtifactOut:
    return _get_artifact(state, owner, model_id, ("model",), "model")


@router.get("/datasets/{dataset_id}", response_model=ArtifactOut, responses=_ERRORS,
            summary="An uploaded dataset or probe set")
def get_dataset(dataset_id: str, state: ServiceState = Depends(get_state),
                owner: Owner = Depends(current_owner)) -> ArtifactOut:
    return _get_artifact(state, owner, dataset_id, ("dataset", "probe"), "dataset")


@router.get("/probes/{probe_id}", response_model=ArtifactOut, responses=_ERRORS, summary="An uploaded probe set")
def get_probe(probe_id: str, state: ServiceState = Depends(get_state),
              owner: Owner = Depends(current_owner)) -> ArtifactOut:
    return _get_artifact(state, owner, probe_id, ("probe",), "probe")
