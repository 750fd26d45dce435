"""Bounds on what a client without a token can hold: connections, and the time to send a request head.

uvicorn bounds neither. Its keep-alive timer starts only after a response and any byte received
cancels it, so a socket that never sends a byte, or a client sending one header byte every few
seconds (slowloris), is held forever; ``limit_concurrency`` answers 503 only once a request head
has arrived, and counts the idle sockets too, so it turns a flood of idle sockets into 503s for
everyone. With a few hundred such sockets the process runs out of file descriptors, ``accept``
fails with EMFILE and ``/healthz`` stops answering.

:class:`GuardedH11Protocol` is uvicorn's h11 protocol with two rules on top:

- **Head deadline.** From the moment a connection opens, or its last response was sent, the client
  has ``head_timeout_s`` to deliver a whole request head (the rest of an unread body included);
  then the connection is closed. Bytes trickling in do not extend it.
- **Connection cap.** At most ``max_connections`` connections are open. When a new one would pass
  the cap, the connection that has waited longest for a request head is closed to make room (as
  nginx reuses idle keep-alive connections); a connection with a request in flight is never closed
  this way. If every connection has a request in flight, the new one gets a 503 and is closed.

The cap is derived from the file-descriptor limit (:func:`limits_for`), leaving room for the
descriptors the service needs itself (Redis connections, image files, the event loop) and for
connections between ``accept`` and the cap: asyncio accepts up to ``accept_burst`` sockets per loop
iteration (the ``backlog`` it is given), builds their transports in the next one, calls
``connection_made`` (where the cap evicts) in the one after, and closes an evicted socket one
later, so under a flood ``4 * accept_burst`` descriptors are in that pipeline. With less room,
``accept`` hit EMFILE (measured: fd limit 1024, burst 256, 2,000 idle sockets) and asyncio stops
accepting for a second. The kernel's queue of connections not yet accepted costs
no descriptor, so it is made long (:data:`LISTEN_QUEUE`) once serving starts: a flood of connects
then waits there instead of getting its SYNs dropped, which would cost a client arriving behind it
a one-second retransmission.
"""

from __future__ import annotations

import asyncio
import functools
import json
import resource
from dataclasses import dataclass

from uvicorn.protocols.http.h11_impl import H11Protocol

# Descriptors the service holds besides client connections: the listening socket, epoll, stdio,
# a Redis connection per worker thread, image files opened by /v1/manifest, the embedded store's locks.
FD_RESERVE = 32
DEFAULT_MAX_CONNECTIONS = 1024
MAX_ACCEPT_BURST = 128
PIPELINE_BURSTS = 4  # accept, transport, connection_made, close: see the module docstring
LISTEN_QUEUE = 4096  # the kernel caps it at net.core.somaxconn
# A request head is a few hundred bytes (h11 refuses one still incomplete past 16 KiB): any client
# able to use the service at all sends it well within this.
DEFAULT_HEAD_TIMEOUT_S = 10.0
KEEP_ALIVE_S = 5.0

_REFUSED_BODY = b'{"error": "too_many_connections", "detail": "every connection has a request in flight"}'
_REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(_REFUSED_BODY), _REFUSED_BODY))


@dataclass(frozen=True)
class ConnectionLimits:
    """The bounds one service applies (module docstring)."""

    max_connections: int
    accept_burst: int
    head_timeout_s: float = DEFAULT_HEAD_TIMEOUT_S
    keep_alive_s: float = KEEP_ALIVE_S


def fd_limit() -> int:
    """This process's soft limit on open file descriptors (``ulimit -n``)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def limits_for(fds: int, max_connections: int | None = None,
               head_timeout_s: float = DEFAULT_HEAD_TIMEOUT_S) -> ConnectionLimits:
    """Limits that keep the service within ``fds`` descriptors; ValueError if ``max_connections`` cannot fit."""
    burst = max(4, min(MAX_ACCEPT_BURST, fds // 16))
    headroom = PIPELINE_BURSTS * burst + FD_RESERVE
    room = fds - headroom
    if room < 1:
        raise ValueError(f"the file-descriptor limit {fds} (ulimit -n) leaves no room for connections")
    if max_connections is None:
        max_connections = min(DEFAULT_MAX_CONNECTIONS, room)
    if max_connections < 1 or max_connections > room:
        raise ValueError(f"{max_connections} connections need {max_connections + headroom} file "
                         f"descriptors, but the limit is {fds} (ulimit -n); at most {max(room, 0)} fit")
    return ConnectionLimits(max_connections, burst, head_timeout_s)


class ConnectionGuard:
    """The connections of one server waiting for a request head, oldest first, and the cap on all of them."""

    def __init__(self, limits: ConnectionLimits):
        self.limits = limits
        self.open = 0
        self.waiting: dict[GuardedH11Protocol, None] = {}  # insertion order: longest waiting first

    def admit(self, newcomer: GuardedH11Protocol) -> bool:
        """Count a new connection; make room by closing the longest-waiting one. False: refuse it."""
        if self.open >= self.limits.max_connections:
            victim = next(iter(self.waiting), None)
            if victim is None:
                return False
            victim.close_waiting()
        self.open += 1
        return True


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-head deadline and a connection cap (module docstring)."""

    def __init__(self, *args, guard: ConnectionGuard, **kwargs):
        super().__init__(*args, **kwargs)
        self.guard = guard
        self._counted = False
        self._deadline: asyncio.TimerHandle | None = None
        self._served_cycle = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if not self.guard.admit(self):
            transport.write(_REFUSED)
            transport.close()
            self.transport = transport
            return
        self._counted = True
        super().connection_made(transport)
        self._wait_for_head()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._counted:
            return
        self._counted = False
        self.guard.open -= 1
        self._stop_waiting()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        cycle = self.cycle
        if cycle is not None and cycle is not self._served_cycle and not cycle.response_complete:
            self._served_cycle = cycle  # a new request head arrived: its handling has its own bounds
            self._stop_waiting()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        cycle = self.cycle
        if self.transport.is_closing():
            return
        if cycle is None or cycle.response_complete:
            self._wait_for_head()
        elif cycle is not self._served_cycle:  # a pipelined request started right away
            self._served_cycle = cycle
            self._stop_waiting()

    def send_400_response(self, msg: str) -> None:
        # A request h11 cannot parse (a head over 16 KiB, a bad Content-Length) gets the service's
        # JSON error like any other bad request, not uvicorn's plain text.
        body = json.dumps({"error": "bad_request", "detail": f"malformed HTTP request: {msg}"}).encode()
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(body), body))
        self.transport.close()

    def close_waiting(self) -> None:
        """Close this connection, which has no request in flight."""
        self._stop_waiting()
        if not self.transport.is_closing():
            self.transport.close()

    def _wait_for_head(self) -> None:
        self._stop_waiting()
        self.guard.waiting[self] = None
        self._deadline = self.loop.call_later(self.guard.limits.head_timeout_s, self._head_timed_out)

    def _stop_waiting(self) -> None:
        self.guard.waiting.pop(self, None)
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_timed_out(self) -> None:
        self._deadline = None
        self.close_waiting()


def guarded_protocol(limits: ConnectionLimits) -> tuple[functools.partial, ConnectionGuard]:
    """The ``http`` protocol factory to give uvicorn, and the guard it shares across connections."""
    guard = ConnectionGuard(limits)
    return functools.partial(GuardedH11Protocol, guard=guard), guard
