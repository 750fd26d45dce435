"""Connecting to the index store: a URL, a cluster or a single node, and errors a user can act on.

The same URL form reaches a single node or a cluster: after connecting, ``INFO cluster`` tells
which it is, and a cluster gets a :class:`redis.cluster.RedisCluster` client. Clients do not retry
on a lost connection: a refresh must fail rather than carry on against a server that restarted
and may have lost its latest writes (a rerun finishes the job).

Two timeouts: a server must connect and answer PING within ``BLOCKSKETCH_REDIS_TIMEOUT``
seconds (default 10), so one that accepts connections but never answers is reported at once;
once it has answered, each command may take up to ``COMMAND_TIMEOUT_S``, so long legitimate
replies are not cut short. ``socket_timeout`` (and ``socket_connect_timeout``) in the URL's query
override both, as redis-py reads them.
"""

from __future__ import annotations

import contextlib
import os
import re
import urllib.parse
from collections.abc import Iterator

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from sketch.errors import StoreError, UsageError

URL_SCHEMES = ("redis", "rediss", "unix")
TIMEOUT_ENV = "BLOCKSKETCH_REDIS_TIMEOUT"
# A healthy server answers PING within a round trip, and even one busy with another client's slow
# command (a large GET, a big DEL, a fork for a snapshot) within a few seconds: 10 s tells a hung
# server from a busy one. Only the connection and the first PING and INFO wait this long.
DEFAULT_ANSWER_TIMEOUT_S = 10.0
# After that first answer: long enough for the longest single reply (a 64 MiB GET, the publish
# script of a big refresh; a pipeline's replies each arrive as their command ends) on a busy server.
COMMAND_TIMEOUT_S = 120.0


def printable_url(url: str) -> str:
    """``url`` without its password, for messages and listings."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:  # unparsable: drop everything that could be credentials
        return re.sub(r"//[^/@]*@", "//", url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}@{host}" if user else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def check_url(url: str) -> str:
    """Return ``url`` if its scheme is one Redis clients understand, else raise UsageError."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError as exc:
        raise UsageError(f"bad store URL {printable_url(url)!r}: {_one_line(exc)}") from None
    scheme = parts.scheme
    if scheme not in URL_SCHEMES:
        raise UsageError(f"unsupported store URL {printable_url(url)!r}: use redis://, rediss:// or unix://")
    return url


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


@contextlib.contextmanager
def store_errors(url: str, doing: str) -> Iterator[None]:
    """Turn redis-py exceptions raised inside the block into one-line StoreErrors naming ``url``."""
    try:
        yield
    except redis.exceptions.AuthenticationError as exc:
        raise StoreError(f"Redis at {url} refused the credentials while {doing}: {_one_line(exc)}") from None
    except redis.exceptions.OutOfMemoryError:
        raise StoreError(f"Redis at {url} is out of memory (maxmemory reached) while {doing}; "
                         "free memory or raise maxmemory, then rerun") from None
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        if doing == "connecting":
            raise StoreError(f"cannot reach Redis at {url}: {_one_line(exc)}") from None
        raise StoreError(f"lost connection to Redis at {url} while {doing}: {_one_line(exc)}") from None
    except redis.exceptions.ResponseError as exc:
        text = _one_line(exc)
        if text.startswith(("NOAUTH", "WRONGPASS", "NOPERM")):
            raise StoreError(f"Redis at {url} refused the credentials while {doing}: {text}") from None
        raise StoreError(f"Redis at {url} refused a command while {doing}: {text}") from None
    except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as exc:
        raise StoreError(f"Redis at {url} failed while {doing}: {_one_line(exc)}") from None


def answer_timeout() -> float:
    """Seconds a server has to connect and answer its first PING (``BLOCKSKETCH_REDIS_TIMEOUT``)."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_ANSWER_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise UsageError(f"{TIMEOUT_ENV}={text!r} is not a positive number of seconds")
    return seconds


def _options(socket_timeout: float, connect_timeout: float) -> dict:
    return {"retry": Retry(NoBackoff(), 0), "socket_connect_timeout": connect_timeout,
            "socket_timeout": socket_timeout}


def connect(url: str) -> redis.Redis | RedisCluster:
    """A client for the server or cluster at ``url``, after a PING proved it answers.

    The PING and INFO run on a first connection whose every wait is bounded by
    :func:`answer_timeout`; the client returned has the longer per-command timeout.
    """
    check_url(url)
    shown = printable_url(url)
    answer = answer_timeout()
    with store_errors(shown, "connecting"):
        try:
            probe = redis.Redis.from_url(url, **_options(answer, answer))
        except ValueError as exc:
            raise UsageError(f"bad store URL {shown!r}: {_one_line(exc)}") from None
        try:
            probe.ping()
            cluster_enabled = probe.info("cluster").get("cluster_enabled") == 1
        finally:
            probe.close()
        if not cluster_enabled:
            return redis.Redis.from_url(url, **_options(max(answer, COMMAND_TIMEOUT_S), answer))
        if urllib.parse.urlsplit(url).scheme == "unix":
            raise UsageError(f"store URL {shown!r}: a cluster cannot be reached through a unix socket")
        cluster = RedisCluster.from_url(_without_db(url), **_options(max(answer, COMMAND_TIMEOUT_S), answer))
        cluster.ping()
        return cluster


def _without_db(url: str) -> str:
    """A cluster has only database 0; drop a ``/0`` path that RedisCluster would reject."""
    parts = urllib.parse.urlsplit(url)
    path = parts.path.strip("/")
    if path not in ("", "0"):
        raise UsageError(f"store URL {printable_url(url)!r}: a Redis Cluster has only database 0")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, "", parts.query, parts.fragment))
