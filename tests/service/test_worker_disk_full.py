"""A full disk on the worker fails the job with `insufficient_storage` (the operator's condition), not
`internal_error`: whatever writer hit it. /dev/full answers every write with ENOSPC, as a full disk does."""

from __future__ import annotations

import pytest
from safetensors import SafetensorError

from worker.runner import disk_failure


def _raised_by(write) -> BaseException:
    with pytest.raises(Exception) as e:
        write()
    return e.value


def _plain_write():
    with open("/dev/full", "wb") as f:
        f.write(b"x" * 1_000_000)


def _safetensors_on_a_full_disk():
    # What save_file raised on a full 64 KiB tmpfs (the writer the worker uses for every output); /dev/full does
    # not make it fail, so the observed error is raised here.
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("write", [_plain_write, _safetensors_on_a_full_disk], ids=["os-write", "safetensors"])
def test_disk_full_errors_are_insufficient_storage(write) -> None:
    code, message = disk_failure(_raised_by(write))
    assert code == "insufficient_storage" and "disk space" in message


def test_other_errors_stay_internal() -> None:
    assert disk_failure(_raised_by(lambda: open("/nonexistent/x", "rb"))) is None
    assert disk_failure(ValueError("bad value")) is None
