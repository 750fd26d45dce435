"""Connecting to the index store: a URL, a cluster or a single node, and errors a user can act on.

The same URL form reaches a single node or a cluster: after connecting, ``INFO cluster`` tells
which it is, and a cluster gets a :class:`redis.cluster.RedisCluster` client. Clients do not retry
on a lost connection: a refresh must fail rather than carry on against a server that restarted
and may have lost its latest writes (a rerun finishes the job).
"""

from __future__ import annotations

import contextlib
import urllib.parse
from collections.abc import Iterator

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from sketch.errors import StoreError, UsageError

URL_SCHEMES = ("redis", "rediss", "unix")
CONNECT_TIMEOUT_S = 5.0
# Long enough for a 64 MiB GET on a busy server, short enough that a hung server is reported.
COMMAND_TIMEOUT_S = 120.0


def printable_url(url: str) -> str:
    """``url`` without its password, for messages and listings."""
    parts = urllib.parse.urlsplit(url)
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
    scheme = urllib.parse.urlsplit(url).scheme
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


def _options() -> dict:
    return {"retry": Retry(NoBackoff(), 0), "socket_connect_timeout": CONNECT_TIMEOUT_S,
            "socket_timeout": COMMAND_TIMEOUT_S}


def connect(url: str) -> redis.Redis | RedisCluster:
    """A client for the server or cluster at ``url``, after a PING proved it answers."""
    check_url(url)
    shown = printable_url(url)
    with store_errors(shown, "connecting"):
        try:
            client = redis.Redis.from_url(url, **_options())
        except ValueError as exc:
            raise UsageError(f"bad store URL {shown!r}: {_one_line(exc)}") from None
        try:
            client.ping()
            cluster_enabled = client.info("cluster").get("cluster_enabled") == 1
        except BaseException:
            client.close()
            raise
        if not cluster_enabled:
            return client
        client.close()
        if urllib.parse.urlsplit(url).scheme == "unix":
            raise UsageError(f"store URL {shown!r}: a cluster cannot be reached through a unix socket")
        cluster = RedisCluster.from_url(_without_db(url), **_options())
        cluster.ping()
        return cluster


def _without_db(url: str) -> str:
    """A cluster has only database 0; drop a ``/0`` path that RedisCluster would reject."""
    parts = urllib.parse.urlsplit(url)
    path = parts.path.strip("/")
    if path not in ("", "0"):
        raise UsageError(f"store URL {printable_url(url)!r}: a Redis Cluster has only database 0")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, "", parts.query, parts.fragment))
