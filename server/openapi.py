"""The service's OpenAPI 3.0 document, served at ``/openapi.json``."""

from __future__ import annotations

ERROR = {
    "type": "object",
    "required": ["error", "detail"],
    "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
}

INDEX = {
    "type": "object",
    "properties": {
        "block_size": {"type": "integer"},
        "algorithm": {"type": "string"},
        "fp_rate": {"type": "number"},
        "k": {"type": "integer"},
        "hosts": {"type": "integer"},
    },
}

HOST = {
    "type": "object",
    "properties": {
        "host": {"type": "string"},
        "images": {"type": "integer"},
        "size_bytes": {"type": "integer"},
        "distinct_blocks": {"type": "integer"},
        "sketch_bytes": {"type": "integer"},
        "refreshed_at": {"type": "string"},
    },
}

IMAGE = {
    "type": "object",
    "properties": {
        "host": {"type": "string"},
        "path": {"type": "string"},
        "size_bytes": {"type": "integer"},
        "total_blocks": {"type": "integer"},
        "unique_blocks": {"type": "integer"},
        "zero_blocks": {"type": "integer"},
        "indexed_at": {"type": "string"},
    },
}

RANK_REQUEST = {
    "type": "object",
    "required": ["image"],
    "properties": {
        "image": {"type": "string", "description": "HOST:PATH of an indexed image", "minLength": 1},
        "top": {"type": "integer", "minimum": 1, "maximum": 100000, "default": 10},
        "exact_top": {"type": "integer", "minimum": 0, "maximum": 64, "default": 3},
        "exclude_hosts": {"type": "array", "items": {"type": "string"}},
    },
}

RANK_QUERY_MSGPACK = {
    "type": "object",
    "description": "An image that is not indexed: its block counts and distinct digests with their counts "
                   "(msgpack, as `blocksketch rank IMAGE --server URL` sends it).",
    "required": ["block_size", "total_blocks", "zero_blocks", "digests", "counts"],
    "properties": {
        "name": {"type": "string"},
        "block_size": {"type": "integer", "minimum": 0},
        "total_blocks": {"type": "integer", "minimum": 0},
        "zero_blocks": {"type": "integer", "minimum": 0},
        "digests": {"type": "string", "format": "binary", "description": "n x 16 bytes, sorted"},
        "counts": {"type": "string", "format": "binary", "description": "n little-endian uint32"},
        "top": {"type": "integer", "minimum": 1, "maximum": 100000},
        "exact_top": {"type": "integer", "minimum": 0, "maximum": 64},
        "exclude_hosts": {"type": "array", "items": {"type": "string"}},
        "source_host": {"type": "string", "description": "the host the image lives on: left out when indexed "
                                                          "(no error when it is not)"},
    },
}

RANK_HOST = {
    "type": "object",
    "properties": {
        "host": {"type": "string"},
        "estimated_shared_ratio": {"type": "number"},
        "estimated_shared_unique_ratio": {"type": "number"},
        "exact_shared_ratio": {"type": "number", "nullable": True},
        "exact_shared_unique_ratio": {"type": "number", "nullable": True},
    },
}

RANK_RESULT = {
    "type": "object",
    "properties": {
        "image": {"type": "string"},
        "block_size": {"type": "integer"},
        "winner": {"type": "string", "nullable": True},
        "hosts": {"type": "array", "items": RANK_HOST},
    },
}

MANIFEST_REQUEST = {
    "type": "object",
    "required": ["image", "to"],
    "properties": {
        "image": {"type": "string", "description": "HOST:PATH of an indexed image", "minLength": 1},
        "to": {"type": "string", "description": "destination host", "minLength": 1},
        "include_manifest": {"type": "boolean", "default": False,
                             "description": "also return the binary manifest, base64-encoded"},
    },
}

MANIFEST_RESULT = {
    "type": "object",
    "properties": {
        "blocks": {"type": "object"},
        "bytes": {"type": "object"},
        "manifest_bytes": {"type": "integer"},
        "manifest": {"type": "string", "description": "base64 of the binary manifest, when asked for"},
    },
}


def _json(schema: dict) -> dict:
    return {"content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict:
    return {str(code): {"description": "error", **_json(ERROR)} for code in codes}


def openapi_document() -> dict:
    secured = [{"bearer": []}]
    return {
        "openapi": "3.0.3",
        "info": {"title": "blocksketch", "version": "1",
                 "description": "Where should this VM disk image go? Ranking and transfer manifests."},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": {
            "/healthz": {"get": {"summary": "Liveness, and whether Redis answers", "security": [],
                                 "responses": {"200": {"description": "alive", **_json({"type": "object"})},
                                               **_errors(503)}}},
            "/v1/index": {"get": {"summary": "The index's block size, digest algorithm and filter settings",
                                  "security": secured,
                                  "responses": {"200": {"description": "index settings", **_json(INDEX)},
                                                **_errors(401, 404, 503)}}},
            "/v1/hosts": {"get": {"summary": "Indexed hosts", "security": secured,
                                  "responses": {"200": {"description": "hosts",
                                                        **_json({"type": "array", "items": HOST})},
                                                **_errors(401, 503)}}},
            "/v1/hosts/{host}/images": {"get": {
                "summary": "A host's indexed images", "security": secured,
                "parameters": [{"name": "host", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "images", **_json({"type": "array", "items": IMAGE})},
                              **_errors(400, 401, 404, 503)}}},
            "/v1/rank": {"post": {
                "summary": "Rank hosts by how much of an image they already hold", "security": secured,
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": RANK_REQUEST},
                    "application/msgpack": {"schema": RANK_QUERY_MSGPACK}}},
                "responses": {"200": {"description": "ranking", **_json(RANK_RESULT)},
                              **_errors(400, 401, 404, 408, 409, 413, 422, 503)}}},
            "/v1/manifest": {"post": {
                "summary": "Transfer manifest summary (and manifest) for an indexed image to a host",
                "security": secured,
                "requestBody": {"required": True, **_json(MANIFEST_REQUEST)},
                "responses": {"200": {"description": "manifest summary", **_json(MANIFEST_RESULT)},
                              **_errors(400, 401, 404, 408, 409, 413, 422, 503)}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "security": secured,
                                 "responses": {"200": {"description": "text exposition format",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}},
                                               **_errors(401, 503)}}},
        },
    }
