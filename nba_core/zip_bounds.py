"""Bounds on a zip file's central directory, read by hand BEFORE `zipfile.ZipFile()` parses it.

zipfile builds one ZipInfo per directory entry with no limit (1M entries in a 45 MiB file cost ~350 MiB and
seconds of CPU) and trusts neither the declared count nor anything else we could check afterwards. So we read the
End-Of-Central-Directory record (zip64 aware) ourselves, bound the directory's byte size and declared entry count,
and count the entries actually present with a walk over their fixed 46-byte headers that stops at the limit.
Standard library only (the API runs it on uploads: datasets and zip-format .pt checkpoints).
"""

from __future__ import annotations

import os
import struct
from typing import BinaryIO

from .errors import NBAError

_EOCD = struct.Struct("<4s4H2LH")  # signature, disk, cd disk, entries here, entries total, cd size, cd offset, comment
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_CD_ENTRY = struct.Struct("<4s6H3L5H2L")  # the fixed 46 bytes of a central-directory file header
CD_ENTRY_BYTES = _CD_ENTRY.size


def central_directory(f: BinaryIO, size: int, unreadable: str) -> tuple[int, int, int]:
    """(declared entries, directory size, directory start), found the way zipfile finds them (the start is
    counted back from the end record, so archives with a prefix work)."""
    tail_len = min(size, _EOCD.size + 65535)
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    pos = tail.rfind(b"PK\x05\x06")
    if pos < 0 or len(tail) - pos < _EOCD.size:
        raise NBAError(unreadable, "corrupt zip archive: no end-of-central-directory record")
    _sig, _d, _cd, _here, entries, cd_size, _cd_offset, _comment = _EOCD.unpack_from(tail, pos)
    eocd_at = size - tail_len + pos
    record_at = eocd_at
    loc_at = pos - _ZIP64_LOCATOR.size
    if loc_at >= 0 and tail[loc_at:loc_at + 4] == b"PK\x06\x07":
        # zip64: the real counts live in the zip64 end record just before the locator.
        rec_at = eocd_at - _ZIP64_LOCATOR.size - _ZIP64_EOCD.size
        rec = b""
        if rec_at >= 0:
            f.seek(rec_at)
            rec = f.read(_ZIP64_EOCD.size)
        if len(rec) != _ZIP64_EOCD.size or rec[:4] != b"PK\x06\x06":
            raise NBAError(unreadable, "corrupt zip archive: bad zip64 end record")
        fields = _ZIP64_EOCD.unpack(rec)
        entries, cd_size = fields[7], fields[8]
        record_at = rec_at
    start = record_at - cd_size
    if start < 0:
        raise NBAError(unreadable, "corrupt zip archive: the central directory lies outside the file")
    return entries, cd_size, start


def check_zip_directory(path: str | os.PathLike, size: int, *, max_members: int, max_directory_bytes: int,
                        too_large: str, unreadable: str) -> int:
    """Raise NBAError(too_large) if the zip at `path` declares or holds more than `max_members` entries or a
    directory above `max_directory_bytes`; returns the number of entries counted."""
    with open(path, "rb") as f:
        declared, cd_size, start = central_directory(f, size, unreadable)
        if declared > max_members:
            raise NBAError(too_large, f"archive declares {declared} members (limit {max_members})")
        if cd_size > max_directory_bytes:
            raise NBAError(too_large, f"archive directory is {cd_size} bytes (limit {max_directory_bytes})")
        f.seek(start)
        directory = f.read(cd_size)
    pos = count = 0
    while pos + _CD_ENTRY.size <= len(directory) and directory[pos:pos + 4] == b"PK\x01\x02":
        count += 1
        if count > max_members:
            raise NBAError(too_large, f"archive has more than {max_members} members")
        fields = _CD_ENTRY.unpack_from(directory, pos)
        pos += _CD_ENTRY.size + fields[10] + fields[11] + fields[12]  # name, extra and comment lengths
    return count
