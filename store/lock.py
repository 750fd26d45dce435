"""The per-host refresh lock: two refreshes of one host run one after the other.

``SET blocksketch:{host}:lock TOKEN NX PX ttl``, renewed by a background thread while the refresh
works, released with a compare-and-delete script so a refresh never frees a lock it lost. The
token names its owner (``machine|pid|process start time|random``): a refresh that finds the lock
held by a dead process of its own machine (killed with ``kill -9``, or whose Redis restarted and
kept the lock) takes it over at once instead of waiting for the expiry.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid

from sketch.errors import StoreError

from . import keys
from .connect import store_errors

DEFAULT_TTL_MS = 30_000
DEFAULT_WAIT_S = 600.0
POLL_S = 0.05

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _machine() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            boot = handle.read().strip()
    except OSError:
        boot = "?"
    return f"{socket.gethostname()}/{boot}"


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot): tells a live owner from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def owner_token() -> str:
    """A lock token naming this process."""
    pid = os.getpid()
    return f"{_machine()}|{pid}|{_start_time(pid)}|{uuid.uuid4().hex}"


def holder_is_dead(token: str) -> bool:
    """True if ``token`` names a process of this machine that no longer runs."""
    parts = token.split("|")
    if len(parts) != 4 or parts[0] != _machine() or not (parts[1].isascii() and parts[1].isdigit()):
        return False
    return _start_time(int(parts[1])) != parts[2]


class HostLock:
    """The refresh lock of one host; use as a context manager."""

    def __init__(self, client, url: str, host: str, ttl_ms: int = DEFAULT_TTL_MS, wait_s: float = DEFAULT_WAIT_S):
        self.client = client
        self.url = url
        self.host = host
        self.key = keys.lock(host)
        self.ttl_ms = ttl_ms
        self.wait_s = wait_s
        self.token = owner_token()
        self.waited_s = 0.0
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None

    def acquire(self) -> HostLock:
        started = time.monotonic()
        with store_errors(self.url, f"locking host {self.host}"):
            while not self.client.set(self.key, self.token, nx=True, px=self.ttl_ms):
                holder = self.client.get(self.key)
                if holder is not None and holder_is_dead(holder.decode(errors="replace")):
                    self._release(keys=[self.key], args=[holder])
                    continue
                if time.monotonic() - started > self.wait_s:
                    owner = holder.decode(errors="replace").split("|")[:2] if holder else ["?"]
                    raise StoreError(f"another refresh of host {self.host} holds its lock (process "
                                     f"{'/'.join(owner)}) for more than {self.wait_s:.0f} s; try again later")
                time.sleep(POLL_S)
        self.waited_s = time.monotonic() - started
        self._thread = threading.Thread(target=self._keep_alive, name=f"lock-{self.host}", daemon=True)
        self._thread.start()
        return self

    def _keep_alive(self) -> None:
        while not self._stop.wait(self.ttl_ms / 3000):
            try:
                if not self._renew(keys=[self.key], args=[self.token, self.ttl_ms]):
                    self._lost = "it expired and was taken or removed"
                    return
            except Exception as exc:  # reported by check(), from the refresh's own thread
                self._lost = f"renewing it failed: {' '.join(str(exc).split())}"
                return

    def check(self) -> None:
        """Raise StoreError if the lock was lost while working."""
        if self._lost:
            raise StoreError(f"lost the refresh lock of host {self.host} at {self.url}: {self._lost}; rerun")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with store_errors(self.url, f"unlocking host {self.host}"):
            self._release(keys=[self.key], args=[self.token])

    def __enter__(self) -> HostLock:
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.release()
        except StoreError:
            if exc_type is None:
                raise
            # The original failure says more; the lock expires on its own.
