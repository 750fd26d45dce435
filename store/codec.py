"""msgpack settings for index metadata, in one place, and the schema check every reader runs.

Every msgpack document in the index is a map with ``schema`` (a name such as
``blocksketch.catalogue``) and ``version`` (an integer). Strings are UTF-8 str, byte strings bin
(``use_bin_type=True``); maps are decoded with str keys only.
"""

from __future__ import annotations

from typing import Any

import msgpack

from sketch.errors import FormatError


def pack(document: dict[str, Any]) -> bytes:
    """Serialise a metadata document."""
    return msgpack.packb(document, use_bin_type=True)


def unpack(data: bytes | None, what: str, schema: str, versions: tuple[int, ...]) -> dict[str, Any]:
    """Decode ``data`` as a ``schema`` document of a known version, or raise FormatError naming ``what``."""
    if data is None:
        raise FormatError(f"{what} is missing")
    try:
        document = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated classes for bad input
        raise FormatError(f"{what} is corrupt (not msgpack: {type(exc).__name__})") from None
    if not isinstance(document, dict) or document.get("schema") != schema:
        raise FormatError(f"{what} is corrupt (not a {schema} document)")
    version = document.get("version")
    if version not in versions:
        raise FormatError(f"{what} has unknown schema version {version!r} (this blocksketch reads "
                          f"{', '.join(map(str, versions))}); upgrade blocksketch or re-index")
    return document


def field(document: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    """``document[name]`` if it is of ``kind``, else FormatError: a reader never trusts stored types."""
    value = document.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise FormatError(f"{what} is corrupt (field {name!r} missing or of the wrong type)")
    return value
