"""Shared bits for benchmark scripts: machine description and openssl's reference speed."""

from __future__ import annotations

import os
import platform
import re
import subprocess


def machine() -> str:
    cpu = "unknown cpu"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{platform.node()} | {os.cpu_count()} cores | {cpu} | Python {platform.python_version()}"


def openssl_speed(algorithm: str = "md5", block_bytes: int = 512, seconds: int = 3) -> float:
    """Bytes per second that ``openssl speed -evp ALG -bytes N`` reports on one core."""
    out = subprocess.run(["openssl", "speed", "-evp", algorithm, "-bytes", str(block_bytes), "-seconds", str(seconds)],
                         capture_output=True, text=True, check=True).stdout
    line = [row for row in out.splitlines() if row.lower().startswith(algorithm)][-1]
    kilobytes = float(re.findall(r"([\d.]+)k", line)[-1])
    return kilobytes * 1000
