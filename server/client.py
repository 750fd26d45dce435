"""A client of the query service, for the CLI's ``--server URL``: same results as asking Redis directly."""

from __future__ import annotations

import os

import httpx
import msgpack

from sketch.errors import BlockSizeMismatch, BlocksketchError, FormatError, NotFound, StoreError, UsageError

TOKEN_ENV = "BLOCKSKETCH_TOKEN"

_ERRORS = {"not_found": NotFound, "bad_request": UsageError, "block_size_mismatch": FormatError}


class ServiceError(BlocksketchError):
    """The service answered with an error."""


class ServiceClient:
    """Talks to ``blocksketch serve`` at ``url`` with a bearer token."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 300.0):
        self.url = url.rstrip("/")
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def _call(self, method: str, path: str, **kwargs) -> dict | list:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise StoreError(f"cannot reach the blocksketch service at {self.url}: {exc}") from None
        try:
            body = response.json()
        except ValueError:
            raise ServiceError(f"the service at {self.url} answered {response.status_code} without JSON") from None
        if response.status_code >= 400:
            if not isinstance(body, dict):
                raise ServiceError(f"the service at {self.url} answered {response.status_code}")
            kind = _ERRORS.get(body.get("error"), ServiceError)
            if response.status_code == 401:
                raise ServiceError(f"the service at {self.url} refused the token: {body.get('detail')}")
            raise kind(str(body.get("detail") or body.get("error")))
        return body

    def index_config(self) -> dict:
        return self._call("GET", "/v1/index")

    def check_block_size(self, block_size: int | None) -> int:
        index_block_size = self.index_config()["block_size"]
        if block_size is not None and block_size != index_block_size:
            raise BlockSizeMismatch("the index", index_block_size, block_size)
        return index_block_size

    def rank(self, body: dict) -> dict:
        """``body``: {"image": "HOST:PATH", ...} as JSON, or a query with binary digests, sent as msgpack."""
        if "digests" in body:
            return self._call("POST", "/v1/rank", content=msgpack.packb(body, use_bin_type=True),
                              headers={"Content-Type": "application/msgpack"})
        return self._call("POST", "/v1/rank", json=body)

    def manifest(self, image: str, to: str, include_manifest: bool = True) -> dict:
        return self._call("POST", "/v1/manifest", json={"image": image, "to": to,
                                                          "include_manifest": include_manifest})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
