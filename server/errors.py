"""HTTP status codes for library errors, and the JSON error body ``{"error", "detail"}``."""

from __future__ import annotations

import json

from starlette.responses import Response

from sketch.errors import (
    BlockSizeMismatch,
    BlocksketchError,
    FormatError,
    ImageError,
    NotFound,
    StoreError,
    UsageError,
    VerificationError,
)


class HTTPError(Exception):
    """An error raised by the HTTP layer itself (auth, body, routing)."""

    def __init__(self, status: int, error: str, detail: str, headers: dict | None = None):
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers


_STATUS = [
    (NotFound, 404, "not_found"),
    (BlockSizeMismatch, 409, "block_size_mismatch"),
    (UsageError, 400, "bad_request"),
    (FormatError, 400, "bad_request"),
    (ImageError, 422, "image_unavailable"),
    (VerificationError, 409, "verification_failed"),
    (StoreError, 503, "store_unavailable"),
]


def error_response(status: int, error: str, detail: str, headers: dict | None = None) -> Response:
    """The one-line JSON error body; ASCII-escaped, so any detail (a lone surrogate, a newline) renders."""
    body = json.dumps({"error": error, "detail": detail}, ensure_ascii=True)
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def library_error_response(exc: BlocksketchError) -> Response:
    for kind, status, name in _STATUS:
        if isinstance(exc, kind):
            return error_response(status, name, str(exc))
    return error_response(400, "bad_request", str(exc))


class ListenError(BlocksketchError):
    """The service cannot listen on the address it was given (in use, not local, not permitted)."""
