"""Run the service: bind first, report "listening" only once it is, stop cleanly on SIGTERM.

The socket is bound before anything else starts, so an address in use is one clear error
(:class:`server.errors.ListenError`) instead of a started store and a uvicorn log line. uvicorn
re-raises the signal that stopped it once it has shut down; for SIGTERM (``systemctl stop``) that
would kill the process before the store is released, so SIGTERM here just ends :func:`serve`
normally and the caller's ``with`` blocks run. SIGINT keeps uvicorn's behaviour (KeyboardInterrupt).
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
from collections.abc import Callable

import uvicorn

from .connections import LISTEN_QUEUE, ConnectionLimits, guarded_protocol
from .errors import ListenError

# Requests still running when SIGTERM arrives get this long to finish; then they are cancelled.
GRACEFUL_SHUTDOWN_S = 10
LOGGER = "blocksketch.server"


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; ListenError (one line) if that is not possible."""
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {shown}: {exc.strerror.lower()}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(LISTEN_QUEUE)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {shown}: {(exc.strerror or str(exc)).lower()}") from None
    sock.set_inheritable(False)
    return sock


def configure_logging() -> None:
    """Service errors (every 5xx, with its traceback) go to stderr, like uvicorn's own."""
    logger = logging.getLogger(LOGGER)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s blocksketch %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_listening: Callable[[], None]):
        super().__init__(config)
        self.on_listening = on_listening

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        for sock in sockets or ():
            sock.listen(LISTEN_QUEUE)  # asyncio set it to the accept burst (connections module docstring)
        if self.started and not self.should_exit:
            self.on_listening()

    def handle_exit(self, sig: int, frame) -> None:
        if sig == signal.SIGTERM:
            self.should_exit = True  # not recorded: uvicorn would re-raise it and kill the process
            return
        super().handle_exit(sig, frame)


def serve(app, sock: socket.socket, limits: ConnectionLimits, on_listening: Callable[[], None]) -> None:
    """Serve ``app`` on the listening ``sock`` until SIGTERM or SIGINT; calls ``on_listening`` once it accepts."""
    configure_logging()
    protocol, _ = guarded_protocol(limits)
    config = uvicorn.Config(app, http=protocol, log_level="warning", access_log=False, backlog=limits.accept_burst,
                            timeout_keep_alive=limits.keep_alive_s, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                            lifespan="on")
    _Server(config, on_listening).run(sockets=[sock])
