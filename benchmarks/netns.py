"""Two network namespaces joined by a rate-limited veth pair, and a tiny TCP file mover.

Used by ``benchmarks/bench_wan.py``; needs root. The pair stands for a WAN link between a source
and a destination data centre: each end lives in its own namespace, with an address in a private
/30 that exists only on that veth, and a ``tbf`` rate limit on each end's egress (so each way).
Nothing here ever talks to an address it did not create.

As a script it moves one byte stream over TCP (run it inside a namespace with ``ip netns exec``)::

    python -m benchmarks.netns recv 10.213.0.2:9000 OUT|-      # one connection, to a file or stdout
    python -m benchmarks.netns send 10.213.0.2:9000 FILE|-     # retries until the receiver listens
    python -m benchmarks.netns echo 10.213.0.2:9001            # answers one byte per byte (RTT)
    python -m benchmarks.netns rtt 10.213.0.2:9001 [COUNT]     # prints round-trip times in ms, JSON
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

CHUNK = 1 << 20
PREFIX = "bskwan"  # namespace names: bskwan-src-PID, bskwan-dst-PID
SOURCE, DESTINATION = "src", "dst"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Delete namespaces left by a run of this module that died (its pid is gone), with their processes.

    Only names this module makes (``bskwan-src-PID``/``bskwan-dst-PID``) are touched, and only when
    the PID in the name is no longer alive: a concurrent run keeps its namespaces.
    """
    removed = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        match = re.match(rf"^({PREFIX}-(?:{SOURCE}|{DESTINATION})-(\d+))\b", line)
        if not match or _alive(int(match.group(2))):
            continue
        _delete_namespace(match.group(1))
        removed.append(match.group(1))
    return removed


def _delete_namespace(name: str) -> None:
    """Kill what still runs inside ``name`` (a grandchild that left its group would keep sockets
    open), then delete it."""
    for pid in _ip("netns", "pids", name, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    _ip("netns", "del", name, check=False)


class Link:
    """A veth pair between two fresh namespaces, rate-limited each way; a context manager.

    ``rate`` is a tc rate (``100mbit``). ``down()`` (also on exit of the ``with`` block) ends every
    process started through ``popen`` (by process group), then deletes both namespaces, which
    removes the veth pair.
    """

    def __init__(self, rate: str, source_address: str = "10.213.0.1", destination_address: str = "10.213.0.2",
                 prefix_length: int = 30):
        pid = os.getpid()
        self.rate = rate
        self.namespaces = {SOURCE: f"{PREFIX}-{SOURCE}-{pid}", DESTINATION: f"{PREFIX}-{DESTINATION}-{pid}"}
        self.devices = {SOURCE: f"bskw{pid}s"[-15:], DESTINATION: f"bskw{pid}d"[-15:]}
        self.addresses = {SOURCE: source_address, DESTINATION: destination_address}
        self.prefix_length = prefix_length
        self._processes: list[subprocess.Popen] = []
        self._created: list[str] = []
        self.netem: tuple[bool, str] = (False, "not probed")

    def _probe_netem(self, dev: str) -> tuple[bool, str]:
        """Whether this kernel can emulate delay: add a netem qdisc to ``dev`` and take it off again."""
        result = self.run(SOURCE, ["tc", "qdisc", "add", "dev", dev, "root", "netem", "delay", "15ms"], check=False)
        if result.returncode == 0:
            self.run(SOURCE, ["tc", "qdisc", "del", "dev", dev, "root"])
            return True, "netem available"
        message = (result.stderr or result.stdout).strip().splitlines()
        return False, (message[-1] if message else f"tc exited {result.returncode}")

    def up(self) -> Link:
        for side in (SOURCE, DESTINATION):
            _ip("netns", "add", self.namespaces[side])
            self._created.append(self.namespaces[side])
        _ip("link", "add", self.devices[SOURCE], "netns", self.namespaces[SOURCE], "type", "veth",
            "peer", "name", self.devices[DESTINATION], "netns", self.namespaces[DESTINATION])
        for side in (SOURCE, DESTINATION):
            ns, dev = self.namespaces[side], self.devices[side]
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{self.addresses[side]}/{self.prefix_length}", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            if side == SOURCE:
                self.netem = self._probe_netem(dev)
            # burst: enough for a 64 KiB GSO segment plus slack; tbf splits bigger ones itself
            self.run(side, ["tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", self.rate,
                            "burst", "128kb", "latency", "100ms"])
        return self

    def command(self, side: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[side], *argv]

    def run(self, side: str, argv: list[str], check: bool = True, **options) -> subprocess.CompletedProcess:
        """Run ``argv`` inside ``side``'s namespace to completion, capturing text output."""
        options.setdefault("capture_output", True)
        options.setdefault("text", True)
        result = subprocess.run(self.command(side, argv), **options)
        if check and result.returncode != 0:
            error = (result.stderr or "").strip().splitlines()
            raise RuntimeError(f"{' '.join(argv[:3])} in {side} failed ({result.returncode}): "
                               f"{error[-1] if error else 'no message'}")
        return result

    def popen(self, side: str, argv: list[str], **options) -> subprocess.Popen:
        """Start ``argv`` inside ``side``'s namespace in its own process group; ``down()`` ends it."""
        process = subprocess.Popen(self.command(side, argv), start_new_session=True, **options)
        self._processes.append(process)
        return process

    def shell(self, side: str, script: str, **options) -> subprocess.Popen:
        return self.popen(side, ["sh", "-c", script], **options)

    def counters(self) -> dict[str, int]:
        """Bytes sent each way so far, as each end's egress qdisc counts them.

        The qdisc counts every segment with its IP/TCP headers (what tbf meters), where the veth's own
        counters see a GSO super-packet once and under-count headers by ~4%.
        """
        sent = {}
        for side in (SOURCE, DESTINATION):
            out = self.run(side, ["tc", "-s", "-j", "qdisc", "show", "dev", self.devices[side]]).stdout
            sent[side] = sum(entry.get("bytes", 0) for entry in json.loads(out) if entry.get("root"))
        return {"to_destination": sent[SOURCE], "to_source": sent[DESTINATION]}

    def qdisc_stats(self, side: str) -> str:
        return self.run(side, ["tc", "-s", "qdisc", "show", "dev", self.devices[side]]).stdout.strip()

    def stop(self, process: subprocess.Popen, timeout: float = 5.0) -> None:
        """End one process started by ``popen``: SIGTERM to its group, SIGKILL if it lingers."""
        if process.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(timeout)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if process in self._processes:
            self._processes.remove(process)

    def stop_all(self) -> None:
        """End every process started by ``popen`` that is still tracked."""
        for process in list(self._processes):
            self.stop(process)

    def down(self) -> None:
        self.stop_all()
        for name in reversed(self._created):
            _delete_namespace(name)
        self._created.clear()

    def __enter__(self) -> Link:
        try:
            return self.up()
        except BaseException:
            self.down()
            raise

    def __exit__(self, *exc_info) -> None:
        self.down()


def measure_rtt(link: Link, port: int = 9001, count: int = 50) -> dict:
    """Round-trip times over the link: ICMP (``ping``) if installed, and 1-byte TCP ping-pong."""
    result: dict = {}
    destination = link.addresses[DESTINATION]
    if shutil.which("ping"):
        out = link.run(SOURCE, ["ping", "-c", "10", "-i", "0.2", "-q", destination], check=False).stdout
        match = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)", out)
        if match:
            result["icmp_ms"] = {"min": float(match.group(1)), "avg": float(match.group(2)),
                                 "max": float(match.group(3))}
    server = link.popen(DESTINATION, [sys.executable, "-m", "benchmarks.netns", "echo", f"{destination}:{port}"],
                        cwd=_repo(), stdout=subprocess.DEVNULL)
    try:
        out = link.run(SOURCE, [sys.executable, "-m", "benchmarks.netns", "rtt", f"{destination}:{port}",
                                str(count)], cwd=_repo()).stdout
        result["tcp_ms"] = json.loads(out)
    finally:
        link.stop(server)
    return result


def _repo() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _listen(address: str) -> socket.socket:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(_address(address))
    server.listen(1)
    return server


def _connect(address: str, timeout: float = 30.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection(_address(address), timeout=timeout)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _receive(address: str, output: str) -> int:
    with _listen(address) as server:
        connection, _ = server.accept()
    total = 0
    with connection:
        out = sys.stdout.buffer if output == "-" else open(output, "wb")
        try:
            while data := connection.recv(CHUNK):
                out.write(data)
                total += len(data)
            out.flush()
        finally:
            if out is not sys.stdout.buffer:
                out.close()
    return total


def _send(address: str, source: str) -> int:
    total = 0
    with _connect(address) as connection:
        connection.settimeout(None)
        if source == "-":
            stream = sys.stdin.buffer
            while data := stream.read1(CHUNK) if hasattr(stream, "read1") else stream.read(CHUNK):
                connection.sendall(data)
                total += len(data)
        else:
            with open(source, "rb") as handle:
                total = connection.sendfile(handle)
        connection.shutdown(socket.SHUT_WR)
        connection.recv(1)  # wait for the receiver to close: everything has arrived
    return total


def _echo(address: str) -> None:
    with _listen(address) as server:
        connection, _ = server.accept()
    with connection:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := connection.recv(1):
            connection.sendall(data)


def _rtt(address: str, count: int) -> dict:
    samples = []
    with _connect(address) as connection:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            start = time.perf_counter()
            connection.sendall(b"x")
            connection.recv(1)
            samples.append((time.perf_counter() - start) * 1000)
    return {"count": count, "min": round(min(samples), 3), "median": round(statistics.median(samples), 3),
            "max": round(max(samples), 3)}


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("recv", "send", "echo", "rtt"):
        print(__doc__, file=sys.stderr)
        return 2
    verb, address = argv[0], argv[1]
    if verb == "recv":
        print(json.dumps({"received": _receive(address, argv[2])}), file=sys.stderr)
    elif verb == "send":
        print(json.dumps({"sent": _send(address, argv[2])}), file=sys.stderr)
    elif verb == "echo":
        _echo(address)
    else:
        print(json.dumps(_rtt(address, int(argv[2]) if len(argv) > 2 else 50)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
