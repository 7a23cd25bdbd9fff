"""One exception type with a machine-readable code, shared by the library, the CLI and the service.

Codes are stable strings (used in REST error bodies and CLI exit messages); `http_status` is the status the
API answers with when such an error reaches a request.
"""

from __future__ import annotations


class NBAError(Exception):
    """An error a user can act on: `code` is machine-readable, `message` says what to fix."""

    def __init__(self, code: str, message: str, *, http_status: int = 422):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.http_status = http_status

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message}


class Cancelled(NBAError):
    """Raised inside a long run when the caller's cancellation check returns True."""

    def __init__(self, message: str = "the run was cancelled"):
        super().__init__("cancelled", message, http_status=409)


# Codes used across modules (kept here so the API, the CLI and tests agree on spelling).
SPEC_INVALID = "spec_invalid"
UNKNOWN_ARCHITECTURE = "unknown_architecture"
CHECKPOINT_UNREADABLE = "checkpoint_unreadable"
CHECKPOINT_TRUNCATED = "checkpoint_truncated"
CHECKPOINT_UNSAFE = "checkpoint_unsafe"
CHECKPOINT_MISSING_KEYS = "checkpoint_missing_keys"
CHECKPOINT_UNEXPECTED_KEYS = "checkpoint_unexpected_keys"
CHECKPOINT_SHAPE_MISMATCH = "checkpoint_shape_mismatch"
CHECKPOINT_DTYPE_MISMATCH = "checkpoint_dtype_mismatch"
CHECKPOINT_NONFINITE = "checkpoint_nonfinite"
CHECKPOINT_TOO_LARGE = "checkpoint_too_large"  # inflated or declared size beyond what the spec allows
DATA_UNREADABLE = "data_unreadable"
DATA_INVALID = "data_invalid"
DATA_TOO_LARGE = "data_too_large"
DATA_UNSAFE_ARCHIVE = "data_unsafe_archive"
DATA_LABEL_OUT_OF_RANGE = "data_label_out_of_range"
DATA_SHAPE_MISMATCH = "data_shape_mismatch"
INVALID_PARAMS = "invalid_params"
UNKNOWN_METHOD = "unknown_method"
UNKNOWN_DATASET = "unknown_dataset"
UNKNOWN_ATTACK = "unknown_attack"
TOO_MANY_ATTEMPTS = "too_many_attempts"  # service: a job's worker died max_attempts times
INTERNAL_ERROR = "internal_error"  # service: an unexpected exception (details only in the worker log)
TIME_LIMIT_EXCEEDED = "time_limit_exceeded"  # service: a job ran past JOB_SOFT_TIME_LIMIT
ATTACK_NOT_PREPARED = "attack_not_prepared"
