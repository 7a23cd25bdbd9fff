"""HTTP Range (RFC 9110 §14) for downloads: one `bytes=` range → 206, unsatisfiable → 416, else 200."""

from __future__ import annotations

from nba_core.errors import NBAError

RANGE_NOT_SATISFIABLE = "range_not_satisfiable"


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end inclusive) for a single satisfiable byte range; None to serve the whole object (no header,
    a non-bytes unit, several ranges, or syntax we ignore per the RFC). Raises NBAError 416 when unsatisfiable."""
    if not header:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    first, last = first.strip(), last.strip()
    try:
        if not first:  # suffix range: the last N bytes
            n = int(last)
            if n < 0:
                return None
            if n == 0 or size == 0:
                raise _unsatisfiable(size)
            return max(0, size - n), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start < 0 or end < start and last:
        return None  # syntactically invalid (e.g. 10-5): ignore the header
    if start >= size:
        raise _unsatisfiable(size)
    return start, min(end, size - 1)


def _unsatisfiable(size: int) -> NBAError:
    err = NBAError(RANGE_NOT_SATISFIABLE, f"the requested range is outside the object's {size} bytes",
                   http_status=416)
    err.headers = {"Content-Range": f"bytes */{size}"}  # type: ignore[attr-defined]
    return err
