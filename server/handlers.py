"""The ranking and manifest endpoints: parse the body, call the library, return its result."""

from __future__ import annotations

import base64
import threading
from collections import OrderedDict

import numpy as np

from sketch.blockmap import key_digests
from sketch.blocks import FileIdentity, StaleImage
from sketch.digests import DIGEST_SIZE
from sketch.errors import ImageError, UsageError
from sketch.rank import DEFAULT_EXACT_TOP, DEFAULT_TOP, RankQuery
from store import keys
from store.ranking import current_fleet, rank_image
from store.transfer import host_manifest

from .app import ServiceState, positive_int, string_field


def split_image_name(name: str) -> tuple[str, str]:
    """``HOST:PATH`` -> (host, path); anything else is a 400."""
    host, sep, path = name.partition(":")
    if not sep or not host or not path:
        raise UsageError(f"'image' must be HOST:PATH naming an indexed image, not {name[:200]!r}")
    return keys.check_host(host), path


def manifest(state: ServiceState, params: dict, body: dict) -> dict:
    """Manifest of an indexed image for a destination host; the image must be readable by the service."""
    source_host, path = split_image_name(string_field(body, "image"))
    destination = keys.check_host(string_field(body, "to"))
    include = body.get("include_manifest", False)
    if not isinstance(include, bool):
        raise UsageError("'include_manifest' must be true or false")
    info = state.store.image(source_host, path)
    try:
        built = host_manifest(state.store, info.path, destination, image_format=info.image_format,
                              expected=FileIdentity.of_entry(info))
    except StaleImage:
        raise ImageError(f"image {info.path} changed since it was indexed; refresh the index of "
                         f"{source_host}") from None
    except ImageError as exc:
        raise ImageError(f"image {info.path} of host {source_host} is not readable by this service ({exc}); "
                         f"run `blocksketch manifest` on {source_host}") from None
    data = built.to_bytes()
    result = {"image": f"{source_host}:{info.path}", "to": destination, "manifest_bytes": len(data), **built.summary()}
    if include:
        result["manifest"] = base64.b64encode(data).decode("ascii")
    return result


# Each host in the exact pass costs its block maps from Redis: a request may not ask for the whole fleet.
MAX_EXACT_TOP = 64
# The warm fleet is re-checked against the index at most this often; a refresh shows up within it.
FLEET_MAX_AGE_S = 1.0


def rank_query_from_body(body: dict) -> RankQuery:
    """A query for an image that is not indexed: its counts and distinct digests (msgpack body)."""
    for name in ("block_size", "total_blocks", "zero_blocks"):
        value = body.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UsageError(f"'{name}' must be a non-negative integer")
    digests, counts = body.get("digests"), body.get("counts")
    if not isinstance(digests, bytes) or not isinstance(counts, bytes):
        raise UsageError("'digests' and 'counts' must be binary fields (send the query as application/msgpack)")
    if len(digests) % DIGEST_SIZE or len(counts) % 4 or len(digests) // DIGEST_SIZE != len(counts) // 4:
        raise UsageError("'digests' must be n x 16 bytes and 'counts' n little-endian uint32")
    name = body.get("name", "")
    if not isinstance(name, str):
        raise UsageError("'name' must be a string")
    return RankQuery.from_arrays(body["block_size"], body["total_blocks"], body["zero_blocks"],
                                 np.frombuffer(digests, dtype=np.uint8).reshape(-1, DIGEST_SIZE),
                                 np.frombuffer(counts, dtype="<u4"), name)


def rank_query_to_body(query: RankQuery) -> dict:
    """The msgpack body that :func:`rank_query_from_body` reads (what ``rank IMAGE --server`` sends)."""
    return {"name": query.name, "block_size": query.block_size, "total_blocks": query.total_blocks,
            "zero_blocks": query.zero_blocks, "digests": key_digests(query.keys).tobytes(),
            "counts": query.counts.astype("<u4").tobytes()}


class AnswerCache:
    """Rankings of indexed images, valid while the warm fleet is the same object.

    Orchestrators ask about the same VM again and again; any refresh of any host replaces the warm
    fleet (within ``FLEET_MAX_AGE_S``), so an answer is never older than one computed afresh.
    """

    def __init__(self, capacity: int = 1024):
        self.capacity = capacity
        self._answers: OrderedDict[tuple, tuple[object, dict]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, fleet: object) -> dict | None:
        with self._lock:
            found = self._answers.get(key)
            if found is None or found[0] is not fleet:
                return None
            self._answers.move_to_end(key)
            return found[1]

    def put(self, key: tuple, fleet: object, answer: dict) -> None:
        with self._lock:
            self._answers[key] = (fleet, answer)
            self._answers.move_to_end(key)
            while len(self._answers) > self.capacity:
                self._answers.popitem(last=False)


_answers = AnswerCache()


def rank(state: ServiceState, params: dict, body: dict) -> dict:
    """Rank hosts for an indexed image (``"image": "HOST:PATH"``) or a client's query (digests + counts)."""
    top = positive_int(body, "top", DEFAULT_TOP)
    exact_top = positive_int(body, "exact_top", DEFAULT_EXACT_TOP, maximum=MAX_EXACT_TOP)
    if top < 1:
        raise UsageError("'top' must be at least 1")
    exclude = body.get("exclude_hosts", [])
    if not isinstance(exclude, list) or not all(isinstance(h, str) for h in exclude):
        raise UsageError("'exclude_hosts' must be a list of host names")
    for host in exclude:
        keys.check_host(host)
    if "digests" in body:
        source_host = body.get("source_host")
        if source_host is not None:
            keys.check_host(string_field(body, "source_host"))
        return rank_image(state.store, rank_query_from_body(body), top=top, exact_top=exact_top,
                          exclude_hosts=exclude, fleet_max_age_s=FLEET_MAX_AGE_S, source_host=source_host)
    image = string_field(body, "image")
    split_image_name(image)
    key = (state.store.url, image, top, exact_top, tuple(sorted(set(exclude))))
    fleet = current_fleet(state.store, FLEET_MAX_AGE_S)
    answer = _answers.get(key, fleet)
    if answer is None:
        answer = rank_image(state.store, image, top=top, exact_top=exact_top, exclude_hosts=exclude,
                            fleet_max_age_s=FLEET_MAX_AGE_S)
        _answers.put(key, fleet, answer)
    return answer
