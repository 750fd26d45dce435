"""Every Redis key of the sketch index, built in one place.

Index-level keys (one slot, never used together with host keys in one command):

- ``blocksketch:config``: the index configuration (msgpack, see :mod:`store.config`).
- ``blocksketch:hosts``: a set of host names that have (or had) a catalogue.

Per-host keys all carry the hash tag ``{host}``, so they live in one cluster slot and a host's
catalogue switch, lock check and garbage bookkeeping run in one atomic script even on a cluster:

- ``blocksketch:{host}:catalogue``: the host's current catalogue (msgpack): images, their entry
  generations, the host sketches. Readers start here.
- ``blocksketch:{host}:lock``: the refresh lock (token string with an expiry).
- ``blocksketch:{host}:gen``: a counter handing out fresh generation numbers.
- ``blocksketch:{host}:pending``: a set naming every entry key written by a refresh that has not
  published yet; a later refresh deletes what a killed one left here.
- ``blocksketch:{host}:garbage``: a set naming entry keys that the published catalogue no longer
  references; deleted right after publishing (or by the next refresh if that was interrupted).
- ``blocksketch:{host}:map:<gen>:<image_id>:<chunk>``: one chunk of an image's block map.
- ``blocksketch:{host}:filter:<gen>:<image_id>``: an image's Bloom filter bitmap.
- ``blocksketch:{host}:sketch:<name>:<gen>``: a per-host sketch (``filter`` is the host's Bloom
  filter bitmap; more may be added by :data:`store.sketches.HOST_SKETCHES`).

Entry keys embed the generation that wrote them, so a refresh never overwrites a key a reader may
be reading: it writes new keys, switches the catalogue, then deletes the old ones.
"""

from __future__ import annotations

import hashlib
import re

from sketch.errors import UsageError

PREFIX = "blocksketch"
CONFIG = f"{PREFIX}:config"
HOSTS = f"{PREFIX}:hosts"

# Braces would break the hash tag; whitespace and ':' would make keys ambiguous to read. Matched
# with fullmatch: a pattern's "$" also matches before a final newline, which let "nl2\n" in.
_HOST_NAME = re.compile(r"[A-Za-z0-9._@+=-][A-Za-z0-9._@+=/-]{0,254}")


def check_host(host: str) -> str:
    """Return ``host`` if it can name a host in the index, else raise UsageError."""
    if not isinstance(host, str) or not _HOST_NAME.fullmatch(host):
        shown = repr(host) if len(repr(host)) <= 66 else repr(host)[:66] + "..."
        raise UsageError(f"invalid host name {shown}: use 1-255 letters, digits and . _ - @ + = /")
    return host


def image_id(path: str) -> str:
    """A short stable id of an image path, used inside key names (paths may hold any byte)."""
    return hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:20]


def _host(host: str) -> str:
    return f"{PREFIX}:{{{host}}}"


def catalogue(host: str) -> str:
    return f"{_host(host)}:catalogue"


def lock(host: str) -> str:
    return f"{_host(host)}:lock"


def generation_counter(host: str) -> str:
    return f"{_host(host)}:gen"


def pending(host: str) -> str:
    return f"{_host(host)}:pending"


def garbage(host: str) -> str:
    return f"{_host(host)}:garbage"


def map_chunk(host: str, generation: int, image: str, chunk: int) -> str:
    return f"{_host(host)}:map:{generation}:{image}:{chunk}"


def map_chunks(host: str, generation: int, image: str, chunks: int) -> list[str]:
    return [map_chunk(host, generation, image, c) for c in range(chunks)]


def image_filter(host: str, generation: int, image: str) -> str:
    return f"{_host(host)}:filter:{generation}:{image}"


def host_sketch(host: str, name: str, generation: int) -> str:
    return f"{_host(host)}:sketch:{name}:{generation}"


def host_pattern(host: str) -> str:
    """A SCAN pattern matching every key of ``host`` (glob-escaped)."""
    escaped = re.sub(r"([*?\[\]\\])", r"\\\1", host)
    return f"{PREFIX}:{{{escaped}}}:*"
