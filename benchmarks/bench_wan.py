"""End-to-end migration of a disk image over a real, rate-limited link: blocksketch vs rsync and plain copies.

Usage (as root): python benchmarks/bench_wan.py [--rate 100mbit] [--source PATH] [--dest-images PATH...]
                 [--other-host NAME=PATH[,PATH...]]... [--block-size 512] [--only METHOD,...] [--json]

Two network namespaces (``benchmarks/netns.py``) stand for two data centres, joined by a veth pair
with addresses in 10.213.0.0/30 that exist only on that pair, rate-limited with ``tc tbf`` each way.
The source image stays in the source namespace's view; the destination namespace runs the fleet
index (a redis-server bound to its veth address) and holds the destination hosts' images (hard
links in a scratch directory, indexed there as hosts). Every method moves the same image and is
checked with ``cmp``; bytes are what the two ends' qdiscs sent (both ways, IP and TCP headers
included), times are wall clock:

- blocksketch, index at the destination: ``rank`` (digests the image at the source and queries the
  index across the link), ``manifest --to`` the ranked best host, the manifest over TCP, then
  ``pack -o -`` straight into TCP straight into ``apply -`` on the destination, so packing, sending
  and applying overlap (``--no-stream``: pack to a file, send it into a file, then apply), ``cmp``;
  again with ``rank --exact-top 0`` (no block maps fetched by rank);
- blocksketch, index replica at the source: the same, reading a Redis replica in the source
  namespace (its initial sync is background traffic, reported separately); again with
  ``rank --exact-top 0``; and (``ours-srcfile``, not run by default) as before ``pack -o -``
  existed: pack into a file, then send it into ``apply -``;
- plain copy: the raw bytes over TCP; ``zstd -3 | TCP | zstd -d``;
- rsync (daemon in the destination namespace; ``-z`` negotiates zstd): without a basis; with
  ``-yy --copy-dest`` (rsync picks a fuzzy basis among the best host's images); and onto a copy of
  the image rank named best (copied first, on the destination); ``--block-size 4096`` with a basis.

Without arguments it runs three pairs from /work/corpus: bookworm-web to a host holding bookworm-min
(and others); a cross-release pair (trixie-web to a host holding bookworm and bullseye images); and
bookworm-web to a host holding bookworm-min and the same tree on btrfs (the blocks it lacks are
spread over two images, where rsync can use one basis).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import machine  # noqa: E402
from benchmarks.netns import DESTINATION, SOURCE, Link, measure_rtt, remove_stale  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = "/work/corpus"
DEST_HOST = "dest"
REDIS_PORT = 6390
RSYNC_PORT = 8730
PAIRS = [
    {"name": "same release", "source": "bookworm-web.raw",
     "hosts": {DEST_HOST: ["bookworm-min.raw", "bullseye-min.raw", "trixie-min.raw"],
               "dc2-b": ["trixie-web.raw"], "dc2-c": ["bookworm-min-btrfs.raw"]}},
    {"name": "cross release", "source": "trixie-web.raw",
     "hosts": {DEST_HOST: ["bookworm-web.raw", "bullseye-min.raw"], "dc2-b": ["bookworm-min-btrfs.raw"]}},
    # the blocks the source needs are spread over two images there; rsync can use only one as basis
    {"name": "two images", "source": "bookworm-web.raw",
     "hosts": {DEST_HOST: ["bookworm-min.raw", "bookworm-web-btrfs.raw"], "dc2-b": ["trixie-web.raw"]}},
]
METHODS = ["ours-send", "ours-send-dst", "ours-dst", "ours-dst0", "ours-src", "ours-src0", "ours-srcfile", "plain",
           "zstd", "rsync", "rsync-fuzzy", "rsync-basis"]
DEFAULT_METHODS = ["ours-send", "ours-send-dst", "ours-src", "ours-dst", "plain", "zstd", "rsync", "rsync-fuzzy",
                   "rsync-basis"]
LABELS = {
    "ours-send": "blocksketch send | receive, replica at source",
    "ours-send-dst": "blocksketch send | receive, index at dest.",
    "ours-dst": "blocksketch, index at destination",
    "ours-dst0": "blocksketch, index at dest., rank --exact-top 0",
    "ours-src": "blocksketch, index replica at source",
    "ours-src0": "blocksketch, replica at src., rank --exact-top 0",
    "ours-srcfile": "blocksketch, replica at src., pack to a file",
    "plain": "plain copy: raw bytes over TCP",
    "zstd": "zstd -3 | TCP | zstd -d",
    "rsync": "rsync -S -z, no basis",
    "rsync-fuzzy": "rsync -S -z -yy --copy-dest=best host",
    "rsync-basis": "rsync -S -z, basis = rank's best image",
}
MIB = 1 << 20


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Interrupted(Exception):
    """A signal asked us to stop: unwinding through ``finally`` cleans the namespaces up."""


def _on_signal(signum, frame):
    raise Interrupted(f"stopped by signal {signum}")


class Bench:
    """One run: the link, the scratch directory, and helpers that time and count each step."""

    def __init__(self, link: Link, scratch: str, block_size: int, stream: bool = True, rsync_block_size: int = 4096):
        self.link = link
        self.stream = stream
        self.rsync_block_size = rsync_block_size
        self.scratch = scratch
        self.block_size = block_size
        self.blocksketch = [shutil.which("blocksketch") or sys.executable, *([] if shutil.which("blocksketch")
                                                                             else ["-m", "cli"])]
        self.python = sys.executable
        self._port = 9100
        self.send_level = 0
        self.env = {**os.environ, "BLOCKSKETCH_HOME": os.path.join(scratch, "home")}

    @property
    def dst(self) -> str:
        return self.link.addresses[DESTINATION]

    @property
    def src(self) -> str:
        return self.link.addresses[SOURCE]

    def next_port(self) -> int:
        self._port += 1
        return self._port

    def run(self, side: str, argv: list[str]) -> subprocess.CompletedProcess:
        return self.link.run(side, argv, cwd=REPO, env=self.env)

    def cli(self, side: str, *args: str) -> dict:
        return json.loads(self.run(side, [*self.blocksketch, *args, "--json"]).stdout)

    def measured(self, name: str, function) -> tuple[object, dict]:
        """Run ``function()``; return its value and the step's wall seconds and link bytes each way."""
        progress(f"  {name} ...")
        before, start = self.link.counters(), time.perf_counter()
        value = function()
        seconds, after = time.perf_counter() - start, self.link.counters()
        step = {"step": name, "seconds": round(seconds, 3),
                "to_destination": after["to_destination"] - before["to_destination"],
                "to_source": after["to_source"] - before["to_source"]}
        step["link_bytes"] = step["to_destination"] + step["to_source"]
        progress(f"  {name}: {seconds:.2f} s, {step['link_bytes'] / MIB:.2f} MiB over the link")
        return value, step

    def transfer(self, source_path: str, destination_path: str) -> int:
        """Send one file from the source namespace to a file in the destination's; bytes received."""
        address = f"{self.dst}:{self.next_port()}"
        receiver = self.link.popen(DESTINATION, [self.python, "-m", "benchmarks.netns", "recv", address,
                                                 destination_path], cwd=REPO, stderr=subprocess.PIPE, text=True)
        try:
            self.run(SOURCE, [self.python, "-m", "benchmarks.netns", "send", address, source_path])
            _, err = receiver.communicate(timeout=60)
        finally:
            self.link.stop(receiver)
        if receiver.returncode != 0:
            raise RuntimeError(f"receiver failed: {err.strip()}")
        return json.loads(err.strip().splitlines()[-1])["received"]

    def pipe(self, send_script: str, receive_script: str, first: tuple[str, str] | None = None) -> dict:
        """``send_script | send`` in the source namespace, ``recv | receive_script`` in the destination's.

        The relay is ``socat`` (C, as rsync is) when installed, else ``benchmarks.netns`` (Python).
        ``first``: a (source file, destination file) pair sent over a connection of its own while
        ``send_script`` starts; ``receive_script`` starts once that file has arrived. Returns the
        payload bytes of the pipe (counted by the Python relay only; None with socat) and what
        ``receive_script`` printed.
        """
        host, port = self.dst, self.next_port()
        netns = f"{self.python} -m benchmarks.netns"
        before_send = before_receive = ""
        if first is not None:
            first_address = f"{self.dst}:{self.next_port()}"
            before_receive = f"{netns} recv {first_address} {first[1]} 2>/dev/null && "
            before_send = f"{netns} send {first_address} {first[0]} 2>/dev/null & "
        if shutil.which("socat"):
            listen = f"socat -u TCP-LISTEN:{port},bind={host},reuseaddr STDOUT"
            connect = f"socat -u STDIN TCP:{host}:{port},retry=500,interval=0.01"
        else:
            listen, connect = f"{netns} recv {host}:{port} -", f"{netns} send {host}:{port} -"
        receiver = self.link.shell(DESTINATION, f"{before_receive}{listen} | {receive_script}",
                                   cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            sent = self.run(SOURCE, ["sh", "-c", f"{before_send}{send_script} | {connect}; wait"])
            out, err = receiver.communicate(timeout=600)
        finally:
            self.link.stop(receiver)
        if receiver.returncode != 0:
            raise RuntimeError(f"receiving pipeline failed: {err.strip()}")
        lines = sent.stderr.strip().splitlines()
        payload = json.loads(lines[-1])["sent"] if lines and lines[-1].startswith('{"sent"') else None
        return {"payload_bytes": payload, "output": out}


def identical(a: str, b: str) -> bool:
    return subprocess.run(["cmp", "-s", a, b]).returncode == 0


def place(image: str, directory: str) -> str:
    """A hard link to ``image`` in ``directory`` (a sparse copy across file systems); its path."""
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, os.path.basename(image))
    try:
        os.link(image, target)
    except OSError:
        subprocess.run(["cp", "--sparse=always", "--preserve=timestamps", image, target], check=True)
    return target


def warm_page_cache(paths: list[str]) -> None:
    """Read every data extent of ``paths`` once, so each method finds them in the page cache."""
    from sketch.blocks import open_image

    for path in paths:
        with open(path, "rb") as handle:
            image = open_image(path, "raw")
            try:
                for offset, length in image.data_extents(0, image.size_bytes):
                    handle.seek(offset)
                    while length > 0:
                        chunk = handle.read(min(length, 8 << 20))
                        if not chunk:
                            break
                        length -= len(chunk)
            finally:
                image.close()


def rsync_stats(text: str) -> dict:
    stats = {}
    labels = {"sent": "Total bytes sent:", "received": "Total bytes received:", "literal": "Literal data:",
              "matched": "Matched data:"}
    for line in text.splitlines():
        for key, label in labels.items():
            if line.startswith(label):
                stats[key] = int(line.split(":")[1].split()[0].replace(",", ""))
    return stats


class Pair:
    """One source image and a fleet of hosts in the destination namespace; runs every method."""

    def __init__(self, bench: Bench, number: int, spec: dict):
        self.bench, self.link = bench, bench.link
        self.spec = spec
        self.source = spec["source"]
        self.name = os.path.basename(self.source)
        self.work = os.path.join(bench.scratch, f"pair{number}")
        self.src_dir = os.path.join(self.work, "src")
        self.dst_dir = os.path.join(self.work, "dst")  # the rsync module's root
        for directory in (self.src_dir, self.dst_dir):
            os.makedirs(directory)
        self.port = REDIS_PORT + 2 * number
        self.master_url = f"redis://{bench.dst}:{self.port}/0"
        self.replica_url = f"redis://{bench.src}:{self.port + 1}/0"
        self.host_dirs: dict[str, str] = {}
        self.rank: dict | None = None

    # -- setup ------------------------------------------------------------------------------------
    def start_index(self) -> dict:
        bench = self.bench
        self._redis(DESTINATION, bench.dst, self.port, [])
        indexed = {}
        for host, images in self.spec["hosts"].items():
            directory = os.path.join(self.dst_dir, "hosts", host)
            for image in images:
                place(image, directory)
            self.host_dirs[host] = directory
            result, step = bench.measured(f"index {host} ({len(images)} images)", lambda d=directory, h=host: bench.cli(
                DESTINATION, "index", d, "--host", h, "--redis", self.master_url, "--block-size",
                str(bench.block_size)))
            indexed[host] = {"images": [os.path.basename(i) for i in images], "seconds": step["seconds"]}
        return indexed

    def start_replica(self) -> dict:
        """A read-only replica of the index in the source namespace; the bytes of its initial sync."""
        bench = self.bench

        def sync():
            self._redis(SOURCE, bench.src, self.port + 1, ["--replicaof", bench.dst, str(self.port)])
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                info = self.link.run(SOURCE, ["redis-cli", "-h", bench.src, "-p", str(self.port + 1), "info",
                                              "replication"], check=False).stdout
                if "master_link_status:up" in info and "master_sync_in_progress:0" in info:
                    return
                time.sleep(0.1)
            raise RuntimeError("the index replica in the source namespace did not sync within 120 s")

        _, step = bench.measured("replicate the index to the source (background)", sync)
        return step

    def _redis(self, side: str, address: str, port: int, extra: list[str]) -> None:
        directory = os.path.join(self.work, f"redis-{side}")
        os.makedirs(directory, exist_ok=True)
        self.link.popen(side, ["redis-server", "--bind", address, "--port", str(port), "--save", "",
                               "--appendonly", "no", "--dir", directory, "--protected-mode", "no",
                               "--logfile", os.path.join(directory, "redis.log"), *extra],
                        stdout=subprocess.DEVNULL)
        for _ in range(200):
            if self.link.run(side, ["redis-cli", "-h", address, "-p", str(port), "ping"],
                             check=False).stdout.strip() == "PONG":
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server on {address}:{port} in {side} did not start")

    def start_rsyncd(self) -> None:
        config = os.path.join(self.work, "rsyncd.conf")
        with open(config, "w") as handle:
            handle.write(f"use chroot = no\n[dst]\n  path = {self.dst_dir}\n  read only = no\n"
                         "  uid = root\n  gid = root\n")
        self.link.popen(DESTINATION, ["rsync", "--daemon", "--no-detach", f"--config={config}",
                                      f"--address={self.bench.dst}", f"--port={RSYNC_PORT}",
                                      f"--log-file={os.path.join(self.work, 'rsyncd.log')}"])
        for _ in range(200):
            probe = self.link.run(SOURCE, ["rsync", f"rsync://{self.bench.dst}:{RSYNC_PORT}/"], check=False)
            if probe.returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError("rsync daemon in the destination namespace did not start")

    # -- methods ----------------------------------------------------------------------------------
    def output(self, method: str) -> str:
        if method == "rsync-fuzzy":  # --copy-dest must stay inside the module, so write at its root
            return os.path.join(self.dst_dir, self.name)
        directory = os.path.join(self.dst_dir, f"out-{method}")
        os.makedirs(directory, exist_ok=True)
        return os.path.join(directory, self.name)

    def finish(self, method: str, steps: list[dict], extra: dict) -> dict:
        """Add the steps up, then check the output with cmp (timed apart) and delete it.

        ``seconds`` is the migration itself: blocksketch's apply and rsync check a whole-image
        checksum on their own, so the benchmark's cmp (which needs both files on one machine, as no
        real migration has them) is reported as ``cmp_seconds``, not added in.
        """
        output = self.output(method)
        progress("  cmp with the source ...")
        start = time.perf_counter()
        same = identical(self.source, output)
        cmp_seconds = time.perf_counter() - start
        os.unlink(output)
        return {"method": method, "label": LABELS[method], "identical": same,
                "seconds": round(sum(s["seconds"] for s in steps), 3), "cmp_seconds": round(cmp_seconds, 3),
                "link_bytes": sum(s["link_bytes"] for s in steps),
                "to_destination": sum(s["to_destination"] for s in steps),
                "to_source": sum(s["to_source"] for s in steps), "steps": steps,
                "load_average": round(os.getloadavg()[0], 2), **extra}

    def ours(self, method: str) -> dict:
        """rank, manifest, pack at the source; manifest and bundle over TCP; apply at the destination.

        With ``stream`` (the default) ``pack -o -`` writes into the socket and the socket into
        ``apply -``, as the copies and rsync also stream; otherwise pack, send and apply are steps
        one after another, through files.
        """
        bench = self.bench
        url = self.replica_url if method.startswith("ours-src") else self.master_url
        # --exact-top 0: rank trusts the sketches; manifest's exact pass over the chosen host still runs
        rank_options = ["--exact-top", "0"] if method.endswith("0") else []
        manifest = os.path.join(self.src_dir, f"{self.name}.manifest")
        bundle = os.path.join(self.src_dir, f"{self.name}.bundle")
        incoming = os.path.join(self.dst_dir, "in")
        os.makedirs(incoming, exist_ok=True)
        landed = [os.path.join(incoming, os.path.basename(p)) for p in (manifest, bundle)]
        apply_args = ["apply", landed[0], landed[1] if not bench.stream else "-", "-o", self.output(method),
                      "--redis", self.master_url, "--json"]
        steps = []
        rank, step = bench.measured("rank", lambda: bench.cli(SOURCE, "rank", self.source, *rank_options,
                                                               "--redis", url))
        steps.append(step)
        if not method.endswith("0") or not self.rank:
            self.rank = rank
        host = rank["winner"]
        built, step = bench.measured(f"manifest --to {host}", lambda: bench.cli(
            SOURCE, "manifest", self.source, "--to", host, "-o", manifest, "--redis", url))
        steps.append(step)
        if bench.stream and method == "ours-srcfile":
            # the pipeline before `pack -o -`: pack into a file, then stream the file into apply -
            packed, step = bench.measured("pack", lambda: bench.cli(SOURCE, "pack", self.source, manifest,
                                                                    "-o", bundle))
            steps.append(step)
            _, step = bench.measured("send manifest", lambda: bench.transfer(manifest, landed[0]))
            steps.append(step)
            piped, step = bench.measured("send bundle | apply -", lambda: bench.pipe(
                f"cat {bundle}", " ".join(bench.blocksketch + apply_args)))
            applied = json.loads(piped["output"])
        elif bench.stream:
            # The manifest goes over its own connection while pack starts; pack -o - feeds the second
            # connection as it compresses, and apply - reads it: packing, sending and applying overlap.
            summary = os.path.join(self.src_dir, "pack.json")
            pack = " ".join([*bench.blocksketch, "pack", self.source, manifest, "-o", "-", "--json"])
            piped, step = bench.measured("send manifest, pack | send bundle | apply -", lambda: bench.pipe(
                f"{pack} 2>{summary}", " ".join(bench.blocksketch + apply_args), first=(manifest, landed[0])))
            applied = json.loads(piped["output"])
            with open(summary) as handle:
                packed = json.loads(handle.read().strip().splitlines()[-1])
            os.unlink(summary)
        else:
            packed, step = bench.measured("pack", lambda: bench.cli(SOURCE, "pack", self.source, manifest,
                                                                    "-o", bundle))
            steps.append(step)
            _, step = bench.measured("send manifest + bundle", lambda: [bench.transfer(p, q) for p, q in
                                                                        zip((manifest, bundle), landed)])
            steps.append(step)
            applied, step = bench.measured("apply", lambda: json.loads(self.bench.run(
                DESTINATION, [*bench.blocksketch, *apply_args]).stdout))
        steps.append(step)
        payload = os.path.getsize(manifest) + packed["bundle_bytes"]
        for path in (manifest, bundle, *landed):
            if os.path.exists(path):
                os.unlink(path)
        return self.finish(method, steps, {
            "host": host, "rank_winner_by": rank.get("winner_by"), "payload_bytes": payload,
            "manifest_bytes": built["manifest_bytes"], "bundle_bytes": packed["bundle_bytes"],
            "blocks": built.get("blocks", {}), "apply_status": applied.get("status"),
            "pack_raw_bytes": packed.get("raw_bytes")})

    def send(self, method: str) -> dict:
        """``blocksketch send`` at the source, its stream over TCP into ``blocksketch receive``.

        One process each side: send reads the image once (digests for rank and the manifest, the
        whole-image checksum beside them) and streams the manifest and then the bundle; receive
        copies the local blocks while the bundle arrives. ``ours-send`` ranks from the index
        replica at the source, ``ours-send-dst`` from the index at the destination (across the link).
        """
        bench = self.bench
        url = self.replica_url if method == "ours-send" else self.master_url
        summary = os.path.join(self.src_dir, "send.json")
        level = ["--level", str(bench.send_level)] if bench.send_level else []
        send = " ".join([*bench.blocksketch, "send", self.source, "--redis", url, *level, "--json"])
        receive = " ".join([*bench.blocksketch, "receive", "-", "-o", self.output(method), "--redis",
                            self.master_url, "--json"])
        piped, step = bench.measured("send | TCP | receive", lambda: bench.pipe(f"{send} 2>{summary}", receive))
        received = json.loads(piped["output"])
        with open(summary) as handle:
            sent = json.loads(handle.read().strip().splitlines()[-1])
        os.unlink(summary)
        if sent.get("ranking") and not self.rank:
            self.rank = sent["ranking"]
        return self.finish(method, [step], {
            "host": sent["host"], "rank_winner_by": (sent.get("ranking") or {}).get("winner_by"),
            "payload_bytes": sent["stream_bytes"], "manifest_bytes": sent["manifest_bytes"],
            "bundle_bytes": sent["bundle_bytes"], "blocks": sent["blocks"], "apply_status": received.get("status"),
            "pack_raw_bytes": sent["raw_bytes"], "send_seconds": sent.get("seconds")})

    def plain(self) -> dict:
        output = self.output("plain")
        received, step = self.bench.measured("raw bytes over TCP", lambda: self.bench.transfer(self.source, output))
        return self.finish("plain", [step], {"payload_bytes": received})

    def zstd(self) -> dict:
        output = self.output("zstd")
        sent, step = self.bench.measured("zstd -3 | TCP | zstd -d", lambda: self.bench.pipe(
            f"zstd -3 -q -c {self.source}", f"zstd -d -q -f -o {output}"))
        return self.finish("zstd", [step], sent)

    def rsync(self, method: str) -> dict:
        """rsync to the daemon in the destination namespace; the fuzzy and basis variants use rank's answer.

        Never ``--inplace``: it forbids matches with basis blocks behind the write position, and
        with it rsync found almost none of the shared data of these images (literal 297 MB instead of
        89 MB for bookworm-web onto bookworm-min, at -B 4096, measured locally).
        """
        output = self.output(method)
        module = f"rsync://{self.bench.dst}:{RSYNC_PORT}/dst/{os.path.relpath(os.path.dirname(output), self.dst_dir)}/"
        steps, extra = [], {}
        block = [f"--block-size={self.bench.rsync_block_size}"] if self.bench.rsync_block_size else []
        options = ["-S", "-z", "--no-whole-file"]
        if method == "rsync-fuzzy":
            # relative to the destination directory (the module's root here): the daemon keeps paths
            # inside the module, so the images sit under it
            host = self._best_host()
            options += [*block, "-yy", f"--copy-dest={os.path.relpath(self.host_dirs[host], self.dst_dir)}"]
            extra["host"] = host
        elif method == "rsync-basis":
            basis = self._best_image()
            _, step = self.bench.measured(f"copy basis {os.path.basename(basis)} on the destination", lambda: (
                self.link.run(DESTINATION, ["cp", "--sparse=always", basis, output])))
            steps.append(step)
            options += [*block, "-I"]  # -I: same size, so never skip the file on size and mtime
            extra["basis"] = os.path.basename(basis)
        result, step = self.bench.measured(LABELS[method], lambda: self.link.run(
            SOURCE, ["rsync", *options, "--stats", self.source, module]))
        steps.append(step)
        stats = rsync_stats(result.stdout)
        extra["rsync_options"] = " ".join(options)
        return self.finish(method, steps, {"payload_bytes": stats.get("sent", 0) + stats.get("received", 0),
                                           "rsync": stats, **extra})

    def _best_host(self) -> str:
        return self.rank["winner"] if self.rank else DEST_HOST

    def _best_image(self) -> str:
        """The image rank named best on the best host (rank's own answer; the first image if rank did not run)."""
        best = (self.rank or {}).get("best_image") or {}
        if best.get("path"):
            return best["path"]
        directory = self.host_dirs[self._best_host()]
        return os.path.join(directory, sorted(os.listdir(directory))[0])

    def run(self, methods: list[str]) -> dict:
        src_info = os.stat(self.source)
        result = {"name": self.spec["name"], "source": self.source, "size_bytes": src_info.st_size,
                  "data_bytes": src_info.st_blocks * 512,
                  "hosts": {h: [os.path.basename(i) for i in images] for h, images in self.spec["hosts"].items()}}
        progress(f"pair '{self.spec['name']}': {self.name} -> fleet {result['hosts']}")
        result["index"] = self.start_index()
        if any(m.startswith("ours-src") or m == "ours-send" for m in methods):
            result["replication"] = self.start_replica()
        if any(m.startswith("rsync") for m in methods):
            self.start_rsyncd()
        runs = []
        for method in methods:
            # Every method starts with the source and the fleet's images in the page cache (without
            # this, the first method of a pair read the source from disk: +0.2 s measured).
            warm_page_cache([self.source, *(i for images in self.spec["hosts"].values() for i in images)])
            progress(f"{LABELS[method]}")
            if method.startswith("ours-send"):
                runs.append(self.send(method))
            elif method.startswith("ours"):
                runs.append(self.ours(method))
            elif method == "plain":
                runs.append(self.plain())
            elif method == "zstd":
                runs.append(self.zstd())
            else:
                runs.append(self.rsync(method))
            row = runs[-1]
            progress(f"{LABELS[method]}: {row['seconds']:.2f} s, {row['link_bytes'] / MIB:.2f} MiB, "
                     f"{'identical' if row['identical'] else 'DIFFERENT'}")
        result["methods"] = runs
        if self.rank:
            result["rank"] = {"winner": self.rank["winner"], "winner_by": self.rank.get("winner_by"),
                              "best_image": (self.rank.get("best_image") or {}).get("path"),
                              "hosts": [{k: h.get(k) for k in ("host", "estimated_shared_ratio", "exact_shared_ratio")}
                                        for h in self.rank["hosts"]]}
        result["verdict"] = verdict(runs)
        return result


def verdict(runs: list[dict]) -> list[str]:
    """Which peers beat blocksketch's best run on bytes or on time, and why, from the measured steps."""
    ours = [r for r in runs if r["method"].startswith("ours")]
    peers = [r for r in runs if not r["method"].startswith("ours")]
    if not ours or not peers:
        return []
    notes = []
    for key, what in (("link_bytes", "bytes over the link"), ("seconds", "wall time")):
        best = min(ours, key=lambda r: r[key])
        beaten = [p for p in peers if p[key] < best[key]]
        if not beaten:
            runner_up = min(peers, key=lambda r: r[key])
            notes.append(f"{what}: blocksketch ({best['label']}) beats every peer; the best peer, "
                         f"{runner_up['label']}, needs {runner_up[key] / best[key]:.3f}x")
            continue
        names = "; ".join(f"{p['label']} ({p[key] / best[key]:.3f}x)" for p in beaten)
        notes.append(f"{what}: NOT best: {names} beat blocksketch ({best['label']})")
        if key == "seconds" and best.get("send_seconds"):
            timing = best["send_seconds"]
            saved = min(p["link_bytes"] for p in beaten) - best["link_bytes"]
            notes.append(
                f"  why: send prepared its stream for {timing['before_stream']:.2f} s after its own start "
                f"(digest {timing.get('digest', 0):.2f}, rank {timing.get('rank', 0):.2f}, manifest "
                f"{timing.get('manifest', 0):.2f}; Python's start and imports come before that) and then streamed "
                f"for {timing['stream']:.2f} s; the peer starts sending at once, and the {saved / MIB:.1f} MiB "
                "blocksketch saves on the link are worth less than that start")
        elif key == "seconds":
            before = [s for s in best["steps"] if "send" not in s["step"]]
            link = [s for s in best["steps"] if "send" in s["step"]]
            notes.append(
                "  why: blocksketch reads the image at the source once per step before the bundle "
                f"streams ({', '.join(s['step'] for s in before)}: {sum(s['seconds'] for s in before):.1f} s of "
                f"CPU-bound work before the first bundle byte leaves), then {sum(s['seconds'] for s in link):.1f} s "
                f"for {sum(s['link_bytes'] for s in link) / MIB:.1f} MiB ({', '.join(s['step'] for s in link)}); "
                "rsync checksums, searches and sends in one pipelined pass, so at this rate the link time "
                "blocksketch saves is smaller than its serial CPU steps")
        else:
            fetched = sum(s["link_bytes"] for s in best["steps"] if "send" not in s["step"])
            if fetched:
                notes.append(f"  why: rank and manifest fetched {fetched / MIB:.1f} MiB of the index (block maps) "
                             "across the link")
    return notes


def print_pair(pair: dict) -> None:
    print(f"\npair '{pair['name']}': {os.path.basename(pair['source'])} ({pair['size_bytes'] / MIB:.0f} MiB, "
          f"{pair['data_bytes'] / MIB:.1f} MiB allocated)")
    for host, images in pair["hosts"].items():
        print(f"  host {host}: {', '.join(images)} (indexed in {pair['index'][host]['seconds']:.1f} s)")
    if "rank" in pair:
        rank = pair["rank"]
        shares = ", ".join(f"{h['host']} {100 * (h['exact_shared_ratio'] or h['estimated_shared_ratio'] or 0):.1f}%"
                           for h in rank["hosts"])
        print(f"  rank: winner {rank['winner']} (by {rank['winner_by']}), best image "
              f"{os.path.basename(rank['best_image'] or '-')}; shared: {shares}")
    if "replication" in pair:
        r = pair["replication"]
        print(f"  index replica's initial sync (background, not in the table): {r['link_bytes']:,} bytes, "
              f"{r['seconds']:.1f} s")
    runs = pair["methods"]
    plain = next((r for r in runs if r["method"] == "plain"), None)
    ours = min((r for r in runs if r["method"].startswith("ours")), key=lambda r: r["link_bytes"], default=None)
    print(f"  {'method':48s} {'bytes over link':>15s} {'MiB':>8s} {'wall s':>7s} {'vs plain':>9s} "
          f"{'bytes x':>8s}  cmp (s)")
    for r in runs:
        speed = f"{plain['seconds'] / r['seconds']:8.2f}x" if plain else f"{'-':>9s}"
        ratio = f"{r['link_bytes'] / ours['link_bytes']:8.2f}" if ours else f"{'-':>8s}"
        print(f"  {r['label']:48s} {r['link_bytes']:15,d} {r['link_bytes'] / MIB:8.2f} {r['seconds']:7.2f} "
              f"{speed} {ratio}  {'identical' if r['identical'] else 'DIFFERENT'} ({r['cmp_seconds']:.1f})")
    print("  (wall s: the migration, without the benchmark's cmp; vs plain: plain copy's wall s / this row's;"
          " bytes x: / blocksketch's fewest; bytes: both ways, IP+TCP headers included)")
    rank_step = next((s for r in runs if r["method"] in ("ours-dst", "ours-src") for s in r["steps"]
                      if s["step"] == "rank"), None)
    if rank_step and any(r["method"] in ("rsync-fuzzy", "rsync-basis") for r in runs):
        print(f"  (rsync's basis rows use rank's answer: which host, which image; rank's own time, "
              f"{rank_step['seconds']:.1f} s, is not in them)")
    for r in runs:
        steps = " | ".join(f"{s['step']} {s['seconds']:.2f} s {s['link_bytes'] / MIB:.2f} MiB" for s in r["steps"])
        print(f"    {r['method']}: {steps}")
        if r["method"].startswith("ours"):
            print(f"      -> host {r['host']}; manifest {r['manifest_bytes']:,} + bundle {r['bundle_bytes']:,} bytes; "
                  f"blocks {r['blocks']}")
            if r.get("send_seconds"):
                print(f"      send's own steps (s, from its --json): {r['send_seconds']}")
        elif "rsync" in r:
            print(f"      rsync {r['rsync_options']} --stats: {r['rsync']}"
                  f"{'; basis ' + r['basis'] if 'basis' in r else ''}")
        elif r.get("payload_bytes") is not None:
            print(f"      payload {r['payload_bytes']:,} bytes")
        print(f"      load average (1 min) after: {r['load_average']}")
    for note in pair["verdict"]:
        print(f"  {note}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", default="100mbit", help="tc rate of the link, each way [default: 100mbit]")
    parser.add_argument("--source", help="source image (default: the three built-in pairs from /work/corpus)")
    parser.add_argument("--dest-images", nargs="+", default=[], metavar="PATH",
                        help="the destination host's images (with --source)")
    parser.add_argument("--other-host", action="append", default=[], metavar="NAME=PATH[,PATH...]",
                        help="another host of the fleet, in the destination namespace (repeatable)")
    parser.add_argument("--block-size", type=int, default=512, help="index block size [default: 512]")
    parser.add_argument("--rsync-block-size", type=int, default=4096,
                        help="rsync --block-size for the runs with a basis (0: rsync's own) [default: 4096]")
    parser.add_argument("--send-level", type=int, default=0,
                        help="zstd level for `blocksketch send` (0: send's default) [default: 0]")
    parser.add_argument("--no-stream", action="store_true",
                        help="land the bundle in a file, then apply (default: the socket feeds apply -)")
    parser.add_argument("--only", default=",".join(DEFAULT_METHODS),
                        help=f"methods to run, of {','.join(METHODS)} [default: {','.join(DEFAULT_METHODS)}]")
    parser.add_argument("--scratch", default=os.environ.get("BENCH_DIR"), help="directory for scratch files")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args(argv)
    args.methods = [m for m in args.only.split(",") if m]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method {unknown[0]}; choose from {', '.join(METHODS)}")
    if args.source:
        if not args.dest_images:
            parser.error("--source needs --dest-images")
        hosts = {DEST_HOST: [os.path.abspath(p) for p in args.dest_images]}
        for item in args.other_host:
            name, _, paths = item.partition("=")
            if not name or not paths:
                parser.error(f"--other-host {item!r}: use NAME=PATH[,PATH...]")
            hosts[name] = [os.path.abspath(p) for p in paths.split(",")]
        args.pairs = [{"name": "custom", "source": os.path.abspath(args.source), "hosts": hosts}]
    else:
        args.pairs = [{"name": p["name"], "source": os.path.join(CORPUS, p["source"]),
                       "hosts": {h: [os.path.join(CORPUS, i) for i in images] for h, images in p["hosts"].items()}}
                      for p in PAIRS]
    for pair in args.pairs:
        for path in [pair["source"], *(i for images in pair["hosts"].values() for i in images)]:
            if not os.path.isfile(path):
                parser.error(f"no such image: {path}")
    return args


def remove_stale_scratch(parent: str) -> None:
    """Delete ``bench-wan-PID-*`` scratch directories under ``parent`` whose run died (SIGKILL skips cleanup)."""
    for name in os.listdir(parent):
        parts = name.split("-")
        if name.startswith("bench-wan-") and len(parts) >= 4 and parts[2].isdigit():
            pid = int(parts[2])
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                progress(f"removing the scratch directory of dead run {pid}: {name}")
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            except PermissionError:
                pass


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench_wan.py needs root (network namespaces, tc)", file=sys.stderr)
        return 2
    missing = [t for t in ("ip", "tc", "rsync", "zstd", "redis-server", "redis-cli", "cmp") if not shutil.which(t)]
    if missing:
        print(f"missing tools: {', '.join(missing)}", file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _on_signal)
    stale = remove_stale()
    if stale:
        progress(f"removed namespaces of dead runs: {', '.join(stale)}")
    remove_stale_scratch(args.scratch or tempfile.gettempdir())
    scratch = tempfile.mkdtemp(prefix=f"bench-wan-{os.getpid()}-", dir=args.scratch)
    report = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "rate": args.rate,
              "block_size": args.block_size, "load_average_start": [round(x, 2) for x in os.getloadavg()]}
    link = Link(args.rate)
    try:
        progress(f"link: two namespaces, veth {link.addresses[SOURCE]} <-> {link.addresses[DESTINATION]}, "
                 f"tbf {args.rate} each way")
        link.up()
        report["netem"] = {"available": link.netem[0], "message": link.netem[1]}
        report["rtt"] = measure_rtt(link)
        progress(f"netem: {link.netem[1]}; RTT {report['rtt']}")
        bench = Bench(link, scratch, args.block_size, not args.no_stream, args.rsync_block_size)
        bench.send_level = args.send_level
        report["send_level"] = args.send_level
        report["pairs"] = []
        for number, spec in enumerate(args.pairs):
            pair = Pair(bench, number, spec)
            try:
                report["pairs"].append(pair.run(args.methods))
            finally:
                link.stop_all()  # this pair's redis servers and rsync daemon
                shutil.rmtree(pair.work, ignore_errors=True)
            if not args.json:
                if number == 0:
                    print_header(report)
                print_pair(report["pairs"][-1])
                sys.stdout.flush()
        report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    except Interrupted as exc:
        progress(f"{exc}; cleaning up")
        return 130
    finally:
        link.down()
        shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"\nload average at start {report['load_average_start']}, at end {report['load_average_end']}")
    return 0


def print_header(report: dict) -> None:
    rtt = report["rtt"]
    icmp = rtt.get("icmp_ms")
    print(f"machine: {report['machine']}; {report['date']}")
    print(f"link: veth between two network namespaces, tc tbf {report['rate']} each way; "
          f"index block size {report['block_size']} B")
    ping = f"ping avg {icmp['avg']:.3f} ms (min {icmp['min']:.3f}, max {icmp['max']:.3f}); " if icmp else ""
    print(f"RTT: {ping}TCP 1-byte ping-pong median {rtt['tcp_ms']['median']:.3f} ms")
    if report["netem"]["available"]:
        print("netem: available, but no delay was added (rate limit only)")
    else:
        print(f"netem: NOT available on this kernel ({report['netem']['message']}): no WAN delay is emulated, "
              "so every method runs at LAN round-trip times; only the rate is a WAN's")


if __name__ == "__main__":
    sys.exit(main())
