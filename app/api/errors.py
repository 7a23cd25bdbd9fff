"""Every error leaves the API as `{"error": {"code": ..., "message": ...}}` with a stable code."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from nba_core.errors import NBAError

log = logging.getLogger("nba.api")

NOT_FOUND = "not_found"
VALIDATION_ERROR = "validation_error"
INTERNAL_ERROR = "internal_error"
SERVICE_UNAVAILABLE = "service_unavailable"

# Codes for plain HTTP errors raised by the framework (unknown route, wrong method, ...).
_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: NOT_FOUND,
               405: "method_not_allowed", 406: "not_acceptable", 408: "request_timeout", 409: "conflict",
               413: "payload_too_large",
               415: "unsupported_media_type", 416: "range_not_satisfiable", 422: VALIDATION_ERROR}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def not_found(what: str, ident: str) -> NBAError:
    return NBAError(NOT_FOUND, f"{what} {ident} not found", http_status=404)


def _format_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "request"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(NBAError)
    async def _nba_error(_: Request, exc: NBAError) -> JSONResponse:
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.http_status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return error_response(exc.http_status, exc.code, exc.message, headers or None)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, VALIDATION_ERROR, _format_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(OperationalError)
    async def _db_down(_: Request, exc: OperationalError) -> JSONResponse:
        if type(exc.orig).__name__ == "DiskFull":  # psycopg.errors.DiskFull: Postgres is out of disk
            log.warning("database out of disk: %s", exc.orig)
            return error_response(507, "insufficient_storage", "the database is out of disk space; retry later",
                                  {"Retry-After": "60"})
        # Connection-level database failures are an outage, not a bug: 503 tells clients to retry later.
        log.warning("database unavailable: %s", exc.orig if exc.orig is not None else exc)
        return error_response(503, SERVICE_UNAVAILABLE, "the database is unavailable; retry later",
                              {"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, INTERNAL_ERROR, "internal server error")
