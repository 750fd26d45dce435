"""A real ``blocksketch serve`` process on a free loopback port, for the tests that talk to it."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx

from tests.redis_server import free_port


@contextlib.contextmanager
def running_service(token_file: str, redis_url: str, *options: str, start_s: float = 30) -> Iterator[str]:
    """Start ``serve`` with ``options``, wait until ``/healthz`` answers, yield its base URL; stop it after."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--bind", f"127.0.0.1:{port}",
                                "--token-file", str(token_file), "--redis", redis_url, *options],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_s
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"service did not start: {process.stderr.read().decode()}")
            time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=20)
        process.stderr.close()
