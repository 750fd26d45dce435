"""Hostile input: fuzz every file format and index entry blocksketch reads, through the real CLI.

Usage: python benchmarks/fuzz_formats.py [--cases 10000] [--seed 1] [--target manifest,bundle,...]
       [--case ID] [--workers 2] [--json] [--failures DIR] [--subprocess-sample 200]
       [--atheris SECONDS] [--keep]

Builds a small world first (every artefact from the real CLI, nothing hand-made): a private
``redis-server``, the sample fleet (:func:`sketch.sample.write_sample_fleet`, 4 KiB blocks) indexed
as hosts ``ams-1``, ``fra-2``, ``lon-3``; a manifest and bundle of the source image for ``ams-1``; a
``send`` stream; a ranges file left by an apply that failed because a local image changed under
the index; qcow2 files made by ``qemu-img`` (plain v3, v2, zlib- and zstd-compressed, an overlay on a
backing file); and ``blocksketch serve`` on loopback. Then every case mutates one valid artefact
(benchmarks/fuzz_mutators.py: one field changed and re-sealed with valid checksums, truncated,
extended, bit-flipped, spliced, integers at their limits) and runs the commands that read it:

==============  ====================================================================================
target          commands (``H`` = ams-1, ``SRC`` = the source image)
==============  ====================================================================================
manifest        ``pack SRC M' -o B'`` then ``apply M' B'``; ``apply M' B`` (B re-sealed for M')
bundle          ``apply M B' -o OUT --host H``
stream          ``receive S' -o OUT --host H``
ranges          ``pack SRC M --ranges R' -o X`` then ``apply M B X``
qcow2           ``compare Q' SRC --json``; ``send Q' --to H -o S`` then ``receive S``
qcow2-index     ``index --host fq-N DIR`` (DIR holds Q')
redis           one catalogue / config / block map chunk / filter bitmap / host sketch value changed
                in Redis, then ``rank SRC``, ``images``, ``hosts``, ``manifest SRC --to H`` or
                ``apply M B``; the value is restored after the case
http            mutated JSON and msgpack bodies POSTed to /v1/rank and /v1/manifest, with and
                without the token
==============  ====================================================================================

Each CLI step runs in a child forked from this process, which has already imported the CLI (a
fork server: ``python -m cli`` costs ~0.4 s of start-up, the case itself a few ms), with stdout
and stderr on files, ``RLIMIT_AS`` = the child's size at fork + 256 MiB, ``RLIMIT_CPU`` 6 s and a
wall-clock kill at 6 s; it calls the click group in-process and ``os._exit``s with its code, so
exit status and stderr are exactly what a process shows. ``--subprocess-sample N`` re-runs N cases
as real ``python -m cli`` processes and checks that they end the same way.

The oracle, per step: exit 0 with the right result (apply and receive: the output byte-identical
to the expected image; pack: its bundle applies byte-exact; compare and send of a qcow2: what
``qemu-img convert`` reads from the same file), or exit 1/2 with exactly one stderr line starting
``blocksketch: error: ``; never a traceback or an "internal error"; no file left in the case
directory but the named output (and, after a failed verification, the ranges file it names) and
nothing written anywhere else; at most 256 MiB RSS and 5 s. HTTP: 2xx with a valid body or 4xx,
never 5xx, and the service stays up. Failing cases are written to the failures directory with
their inputs and a replay line (``--case ID``, same ``--seed``).

``--atheris SECONDS`` runs the in-process decoders (benchmarks/fuzz_atheris.py) under atheris,
coverage-guided, seeded with the same valid artefacts, instead of the CLI cases.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import random
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import fuzz_mutators as mut  # noqa: E402

LIMIT_S = 5.0
KILL_S = 6.0
LIMIT_RSS_KIB = 256 * 1024
AS_HEADROOM = 256 << 20
HOST = "ams-1"
BLOCK_SIZE = 4096
BLOCKS_PER_IMAGE = 256
TARGETS = {  # target: share of --cases
    "manifest": 18, "bundle": 18, "stream": 13, "ranges": 9, "qcow2": 16, "qcow2-index": 4, "redis": 12, "http": 10,
}
EXCLUSIVE = {"redis", "qcow2-index"}  # they write to the shared index: one case at a time
ERROR_PREFIX = "blocksketch: error: "
# Commands the children run, imported once here so a child starts warm.
COMMAND_MODULES = ["apply", "pack", "receive", "send", "compare", "index", "rank", "manifest", "images", "hosts"]


# -- running one CLI step in a forked child --------------------------------------------------------------


@dataclass
class Step:
    """One CLI invocation and how it ended."""

    args: list[str]
    code: int | None = None  # exit status, None if killed by a signal
    signal: int | None = None
    stdout: bytes = b""
    stderr: str = ""
    rss_kib: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0

    def brief(self) -> dict:
        return {"args": self.args, "code": self.code, "signal": self.signal, "stderr": self.stderr[-2000:],
                "rss_mib": round(self.rss_kib / 1024, 1), "wall_s": round(self.wall_s, 3)}


def _vm_size() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _child(args: list[str], cwd: str, env: dict, stdin_path: str | None, out: str, err: str) -> None:
    code = 70
    try:
        os.setpgid(0, 0)
        os.chdir(cwd)
        for fd, path, flags in ((0, stdin_path or os.devnull, os.O_RDONLY), (1, out, os.O_WRONLY | os.O_CREAT),
                                (2, err, os.O_WRONLY | os.O_CREAT)):
            opened = os.open(path, flags, 0o644)
            os.dup2(opened, fd)
            os.close(opened)
        # One malloc arena: glibc reserves 64 MiB of address space per thread arena, which would
        # make RLIMIT_AS measure threads instead of data.
        ctypes.CDLL(None).mallopt(-8, 1)  # M_ARENA_MAX
        limit = _vm_size() + AS_HEADROOM
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        resource.setrlimit(resource.RLIMIT_CPU, (int(KILL_S), int(KILL_S) + 1))
        os.environ.clear()
        os.environ.update(env)
        # A multiprocessing worker has replaced sys.stdin with /dev/null: bind all three to the new fds.
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", closefd=False, errors="backslashreplace", buffering=1)  # noqa: SIM115
        sys.argv = ["blocksketch", *args]
        from cli.main import main

        main.main(args, prog_name="blocksketch")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - what escapes the CLI is exactly what the oracle looks for
        traceback.print_exc()
        code = 70
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:  # noqa: BLE001
            pass
        os._exit(code)


def run_cli(args: list[str], cwd: str, env: dict, stdin_path: str | None = None) -> Step:
    """Run ``blocksketch ARGS`` in a forked child (see the module docstring) and wait for it."""
    step = Step(list(args))
    out, err = os.path.join(cwd, ".fuzz-stdout"), os.path.join(cwd, ".fuzz-stderr")
    sys.stdout.flush()
    sys.stderr.flush()
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        _child(args, cwd, env, stdin_path, out, err)
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], KILL_S)
        if not ready:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, status, usage = os.wait4(pid, 0)
    finally:
        os.close(pidfd)
    step.wall_s = time.perf_counter() - started
    step.rss_kib = usage.ru_maxrss
    step.cpu_s = usage.ru_utime + usage.ru_stime
    if os.WIFSIGNALED(status):
        step.signal = os.WTERMSIG(status)
    else:
        step.code = os.WEXITSTATUS(status)
    with open(out, "rb") as handle:
        step.stdout = handle.read(1 << 20)
    with open(err, "rb") as handle:
        step.stderr = handle.read(1 << 20).decode("utf-8", "replace")
    os.unlink(out)
    os.unlink(err)
    return step


# What --subprocess-sample runs instead of ``python -m cli``: the same limits as the fork server's
# children, set after the imports (as there), so the two can be compared case by case.
LIMITED_MAIN = f"""
import ctypes, importlib, resource, sys
import cli.main
importlib.import_module("cli." + sys.argv[1].replace("-", "_") + "_cmd")
ctypes.CDLL(None).mallopt(-8, 1)
with open("/proc/self/status") as status:
    size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (size + {AS_HEADROOM},) * 2)
resource.setrlimit(resource.RLIMIT_CPU, ({int(KILL_S)}, {int(KILL_S) + 1}))
cli.main.main.main(sys.argv[1:], prog_name="blocksketch")
"""


def run_cli_subprocess(args: list[str], cwd: str, env: dict, stdin_path: str | None = None) -> Step:
    """The same step as a real process (for --subprocess-sample): ``python -c LIMITED_MAIN ARGS``."""
    step = Step(list(args))
    out, err = os.path.join(cwd, ".fuzz-stdout"), os.path.join(cwd, ".fuzz-stderr")
    started = time.perf_counter()
    env = {**env, "PYTHONPATH": str(ROOT)}
    with open(stdin_path or os.devnull, "rb") as stdin, open(out, "wb") as stdout, open(err, "wb") as stderr:
        process = subprocess.Popen([sys.executable, "-c", LIMITED_MAIN, *args], cwd=cwd, env=env, stdin=stdin,
                                   stdout=stdout, stderr=stderr, start_new_session=True)
        pidfd = os.pidfd_open(process.pid)
        ready, _, _ = select.select([pidfd], [], [], KILL_S + 1)  # + python's start-up
        if not ready:
            os.killpg(process.pid, signal.SIGKILL)
        _, status, usage = os.wait4(process.pid, 0)
        os.close(pidfd)
        process.returncode = os.waitstatus_to_exitcode(status)
    step.wall_s = time.perf_counter() - started
    step.rss_kib = usage.ru_maxrss
    step.cpu_s = usage.ru_utime + usage.ru_stime
    step.code = process.returncode if process.returncode >= 0 else None
    step.signal = -process.returncode if process.returncode < 0 else None
    step.stdout = Path(out).read_bytes()[: 1 << 20]
    step.stderr = Path(err).read_bytes()[: 1 << 20].decode("utf-8", "replace")
    os.unlink(out)
    os.unlink(err)
    return step


# -- the world: valid artefacts made by the real CLI ----------------------------------------------------------


@dataclass
class World:
    workdir: str
    redis_url: str
    env: dict
    fleet: dict
    source: str
    expected: bytes  # the source image's bytes
    artefacts: dict = field(default_factory=dict)  # name -> path
    valid: dict = field(default_factory=dict)  # name -> bytes
    bombs: dict = field(default_factory=dict)
    redis_values: dict = field(default_factory=dict)  # key -> original bytes
    redis_kinds: dict = field(default_factory=dict)  # kind -> [keys]
    qcow2: dict = field(default_factory=dict)  # variant -> {"dir", "files"}
    http_base: str = ""
    token: str = ""
    http_bodies: dict = field(default_factory=dict)
    server_pid: int = 0
    baseline_rss_kib: int = 0
    seed: int = 1
    redis_process: object = None

    @property
    def cases_dir(self) -> str:
        return os.path.join(self.workdir, "cases")

    def watched(self) -> list[str]:
        """Directories no case may write to."""
        return [os.path.join(self.workdir, name) for name in ("fleet", "artefacts", "home")]


def _must(step: Step, what: str) -> Step:
    if step.code != 0:
        raise RuntimeError(f"setting up the world: {what} failed: {step.brief()}")
    return step


def _sh(*command: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(command), check=True, capture_output=True, timeout=60, **kwargs)


def build_world(workdir: str) -> World:
    """Every valid artefact the cases start from, made with the CLI in forked children."""
    from sketch.sample import write_sample_fleet
    from tests.redis_server import RedisProcess

    if os.path.exists(workdir):
        shutil.rmtree(workdir)
    os.makedirs(workdir)
    for name in ("artefacts", "home", "cases", "setup"):
        os.makedirs(os.path.join(workdir, name))
    server = RedisProcess(Path(workdir) / "redis").start()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.path.join(workdir, "home"),
           "BLOCKSKETCH_HOME": os.path.join(workdir, "home"), "BLOCKSKETCH_REDIS_URL": server.url,
           "LC_ALL": "C.UTF-8", "TMPDIR": os.path.join(workdir, "setup")}
    fleet = write_sample_fleet(os.path.join(workdir, "fleet"), block_size=BLOCK_SIZE, blocks_per_image=BLOCKS_PER_IMAGE)
    world = World(workdir, server.url, env, fleet, fleet["source"], Path(fleet["source"]).read_bytes())
    world.redis_process = server
    setup = os.path.join(workdir, "setup")
    art = os.path.join(workdir, "artefacts")
    for host, paths in fleet["hosts"].items():
        _must(run_cli(["index", "--host", host, "--block-size", str(BLOCK_SIZE), os.path.dirname(paths[0])], setup,
                      env), f"index {host}")
    names = {"manifest": "valid.manifest", "bundle": "valid.bundle", "stream": "valid.stream", "ranges": "valid.ranges"}
    paths = {k: os.path.join(art, v) for k, v in names.items()}
    _must(run_cli(["manifest", world.source, "--to", HOST, "-o", paths["manifest"]], setup, env), "manifest")
    _must(run_cli(["pack", world.source, paths["manifest"], "-o", paths["bundle"]], setup, env), "pack")
    _must(run_cli(["send", world.source, "--to", HOST, "-o", paths["stream"]], setup, env), "send")
    make_ranges_file(world, paths, setup)
    world.artefacts.update(paths)
    for name, path in paths.items():
        world.valid[name] = Path(path).read_bytes()
    # the same blocks as the valid bundle, but a ranges bundle, for the ranges oracle
    make_qcow2(world, art)
    canary = os.path.join(art, "canary.raw")
    with open(canary, "wb") as handle:
        handle.write(b"CANARY: a file outside every image directory\n" * 20000)
    world.artefacts["canary"] = canary
    world.bombs = make_bombs()
    snapshot_redis(world)
    return world


def make_ranges_file(world: World, paths: dict, setup: str) -> None:
    """The ranges file of an apply that failed because ams-1's images changed under the index."""
    import numpy as np

    saved = {}
    rng = np.random.default_rng(7)
    for path in world.fleet["hosts"][HOST]:
        data = bytearray(Path(path).read_bytes())
        status = os.stat(path)
        saved[path] = (bytes(data), status.st_atime_ns, status.st_mtime_ns)
        for block in rng.choice(len(data) // BLOCK_SIZE, 24, replace=False).tolist():
            data[block * BLOCK_SIZE] ^= 0xFF
        with open(path, "r+b") as handle:  # in place: same inode and size
            handle.write(data)
        os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
    out = os.path.join(setup, "failed.img")
    try:
        step = run_cli(["apply", paths["manifest"], paths["bundle"], "-o", out, "--host", HOST,
                        "--ranges-out", paths["ranges"]], setup, world.env)
    finally:
        for path, (data, atime, mtime) in saved.items():
            with open(path, "r+b") as handle:
                handle.write(data)
            os.utime(path, ns=(atime, mtime))
    if step.code != 1 or not os.path.exists(paths["ranges"]):
        raise RuntimeError(f"setting up the world: the failing apply did not leave a ranges file: {step.brief()}")


def make_qcow2(world: World, art: str) -> None:
    """qcow2 files of the source image (and an overlay on a base), made by qemu-img."""
    source = world.source
    top = os.path.join(art, "qcow2")
    os.makedirs(top)
    variants = {
        "plain": ["convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", source],
        "v2": ["convert", "-f", "raw", "-O", "qcow2", "-o", "compat=0.10,cluster_size=4096", source],
        "zlib": ["convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", source],
        "zstd": ["convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096,compression_type=zstd", source],
    }
    base_raw = world.fleet["hosts"]["fra-2"][0]
    for name, command in variants.items():
        directory = os.path.join(top, name)
        os.makedirs(directory)
        _sh("qemu-img", *command, os.path.join(directory, "disk.qcow2"))
        _sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", base_raw,
            os.path.join(directory, "base.qcow2"))
        world.qcow2[name] = directory
    directory = os.path.join(top, "overlay")
    os.makedirs(directory)
    _sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", base_raw,
        os.path.join(directory, "base.qcow2"))
    _sh("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "-o", "cluster_size=4096",
        "disk.qcow2", cwd=directory)
    _sh("qemu-io", "-c", "write -P 0x5a 64k 128k", "-c", "write -z 300k 8k", "-c", "write -P 0x11 900k 4k",
        "disk.qcow2", cwd=directory)
    world.qcow2["overlay"] = directory
    for name, directory in world.qcow2.items():
        world.valid[f"qcow2-{name}"] = Path(directory, "disk.qcow2").read_bytes()


def make_bombs() -> dict:
    """zstd frames that decompress to far more than they are (to far more than 256 MiB, some)."""
    import msgpack

    head = msgpack.packb({"schema": "blocksketch.manifest", "version": 1}, use_bin_type=True)
    head = b"\x83" + head[1:]  # one more key than packed: the padding below
    bombs = {
        "64MiB-bin": mut.zstd_of_zeros(64 << 20, head + b"\xa3pad" + mut.msgpack_bin_header(64 << 20)),
        "1GiB-bin": mut.zstd_of_zeros(1 << 30, head + b"\xa3pad" + mut.msgpack_bin_header(1 << 30)),
        "1GiB-zeros": mut.zstd_of_zeros(1 << 30),
        "3GiB-claimed": _claimed_size_frame(3 << 30),
    }
    return bombs


def _claimed_size_frame(claimed: int) -> bytes:
    """A small zstd frame whose header claims ``claimed`` bytes of content."""
    import zstandard

    frame = bytearray(zstandard.ZstdCompressor(level=1, write_content_size=True).compress(bytes(70000)))
    # frame header descriptor: content-size field of 4 bytes (flag 2) for this size; patch it
    assert frame[4] >> 6 == 2
    offset = 5 + (0 if frame[4] & 0x20 else 1)
    frame[offset : offset + 4] = struct.pack("<I", min(claimed, (1 << 32) - 1))
    return bytes(frame)


def snapshot_redis(world: World) -> None:
    import redis

    client = redis.Redis.from_url(world.redis_url)
    kinds = defaultdict(list)
    for key in client.scan_iter("blocksketch:*"):
        name = key.decode()
        value = client.get(key) if client.type(key) == b"string" else None
        if value is None:
            continue
        world.redis_values[name] = value
        if name == "blocksketch:config":
            kinds["config"].append(name)
        elif name.endswith(":catalogue"):
            kinds["catalogue"].append(name)
        elif ":map:" in name:
            kinds["chunk"].append(name)
        elif ":filter:" in name:
            kinds["filter"].append(name)
        elif ":sketch:" in name:
            kinds["sketch"].append(name)
    client.close()
    world.redis_kinds = {k: sorted(v) for k, v in kinds.items()}


def start_service(world: World) -> subprocess.Popen:
    """``blocksketch serve`` on a free loopback port with a token; the bodies the HTTP cases start from."""
    import msgpack  # noqa: F401 - imported for the children too

    from benchmarks.bench_server import TOKEN
    from benchmarks.bench_server import start_service as start

    process, base = start(world.redis_url, os.path.join(world.workdir, "setup"), number=len(world.http_bodies))
    world.http_base, world.token, world.server_pid = base, TOKEN, process.pid
    if not world.http_bodies:
        world.http_bodies = http_bodies(world)
    return process


def http_bodies(world: World) -> dict:
    import numpy as np

    data = np.frombuffer(world.expected, dtype=np.uint8).reshape(-1, BLOCK_SIZE)
    nonzero = data.any(axis=1)
    digests = [hashlib.md5(block.tobytes()).digest() for block in data[nonzero]]
    counts = Counter(digests)
    ordered = sorted(counts)
    ams = world.fleet["hosts"][HOST][0]
    return {
        "rank_json": {"image": f"{HOST}:{ams}", "top": 3, "exact_top": 2, "exclude_hosts": []},
        "rank_msgpack": {"name": "source", "block_size": BLOCK_SIZE, "total_blocks": len(data),
                         "zero_blocks": int((~nonzero).sum()), "digests": b"".join(ordered),
                         "counts": np.array([counts[d] for d in ordered], dtype="<u4").tobytes(), "top": 3,
                         "exact_top": 2},
        "manifest": {"image": f"lon-3:{world.fleet['hosts']['lon-3'][0]}", "to": HOST, "include_manifest": True},
    }


# -- cases ----------------------------------------------------------------------------------------------


@dataclass
class CaseResult:
    case: str
    target: str
    mutation: str
    outcome: str  # "ok", "refused", or "failure"
    kind: str = ""  # failure kind, or a note on an ok / refused case
    detail: str = ""
    steps: list[dict] = field(default_factory=list)
    rss_kib: int = 0
    wall_s: float = 0.0
    http_s: float = 0.0


class CaseFailure(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


def listing(directories: list[str]) -> dict:
    found = {}
    for top in directories:
        for base, dirs, files in os.walk(top):
            for name in dirs + files:
                path = os.path.join(base, name)
                try:
                    status = os.lstat(path)
                except FileNotFoundError:
                    continue
                found[path] = (status.st_size, status.st_mtime_ns)
    return found


class Case:
    """One case: its directory, its steps, and the contract every step must keep."""

    def __init__(self, world: World, case_id: str, runner=run_cli):
        self.world = world
        self.id = case_id
        self.dir = os.path.join(world.cases_dir, case_id)
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        self.steps: list[Step] = []
        self.runner = runner
        self.notes: list[str] = []
        self.before = listing(world.watched())

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def write(self, name: str, data: bytes) -> str:
        path = self.path(name)
        with open(path, "wb") as handle:
            handle.write(data)
        return path

    def run(self, args: list[str], outputs: tuple[str, ...] = (), stdin: str | None = None) -> Step:
        """Run one step and check the contract; ``outputs`` are the files it may create."""
        before = set(os.listdir(self.dir))
        step = self.runner(args, self.dir, self.world.env, stdin)
        self.steps.append(step)
        after = set(os.listdir(self.dir))
        stderr = step.stderr.strip("\n")
        if step.signal is not None:
            raise CaseFailure("timeout" if step.signal in (signal.SIGKILL, signal.SIGXCPU) else "signal",
                              f"killed by signal {step.signal} after {step.wall_s:.1f} s: {args[0]}")
        if "Traceback" in stderr:
            raise CaseFailure("traceback", stderr.splitlines()[-1][:300] if stderr else "")
        if "internal error" in stderr:
            raise CaseFailure("internal-error", stderr[:300])
        if "out of memory" in stderr or "MemoryError" in stderr:
            raise CaseFailure("memory", f"{stderr[:200]} (RLIMIT_AS: the child's size + 256 MiB)")
        if step.rss_kib > LIMIT_RSS_KIB:
            raise CaseFailure("rss", f"{step.rss_kib // 1024} MiB RSS: {args[0]}")
        if step.wall_s > LIMIT_S:
            raise CaseFailure("time", f"{step.wall_s:.1f} s ({step.cpu_s:.1f} s CPU): {args[0]}")
        new = after - before
        allowed = set(outputs) if step.code == 0 else set()
        if step.code != 0 and "Ranges saved to" in stderr:
            allowed |= {name for name in new if name.endswith(".missing-ranges.json")}
        if new - allowed:
            kind = "output-on-failure" if step.code != 0 and new & set(outputs) else "stray-file"
            raise CaseFailure(kind, f"{sorted(new - allowed)} left by {args[0]} (exit {step.code})")
        if step.code == 0:
            return step
        if step.code not in (1, 2):
            raise CaseFailure("exit-code", f"exit {step.code}: {stderr[:300]}")
        lines = stderr.splitlines()
        if len(lines) != 1 or not lines[0].startswith(ERROR_PREFIX):
            raise CaseFailure("not-one-line", f"exit {step.code}, {len(lines)} stderr lines: {stderr[:300]}")
        return step

    def check_outside(self) -> None:
        after = listing(self.world.watched())
        if after != self.before:
            changed = sorted(set(after.items()) ^ set(self.before.items()))
            raise CaseFailure("wrote-outside", f"{[c[0] for c in changed][:5]}")

    def expect_image(self, path: str, expected: bytes, what: str) -> None:
        with open(path, "rb") as handle:
            got = handle.read(len(expected) + 1)
        if got != expected:
            first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            raise CaseFailure("wrong-output", f"{what}: {len(got)} bytes, expected {len(expected)}, first "
                                              f"difference at byte {first}")


def run_case(world: World, case_id: str, runner=run_cli) -> CaseResult:
    target, number = case_id.rsplit("-", 1)
    rng = random.Random(f"{world.seed}/{case_id}")
    started = time.perf_counter()
    if target == "http":
        return run_http_case(world, case_id, rng)
    case = Case(world, case_id, runner)
    mutation = ""
    try:
        mutation, note = CASES[target](world, case, rng)
        case.check_outside()
        outcome = "ok" if all(s.code == 0 for s in case.steps) and note != "refused" else "refused"
        result = CaseResult(case_id, target, mutation, outcome, note if note != "refused" else "")
    except CaseFailure as failure:
        result = CaseResult(case_id, target, mutation or getattr(case, "mutation", ""), "failure", failure.kind,
                            failure.detail)
    except Exception as exc:  # noqa: BLE001 - a harness bug must not stop the run, but it must show
        result = CaseResult(case_id, target, mutation or getattr(case, "mutation", ""), "failure", "harness",
                            f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}")
    finally:
        if target == "qcow2-index":
            forget_host(world, f"fq-{number}")
    result.steps = [s.brief() for s in case.steps]
    result.rss_kib = max((s.rss_kib for s in case.steps), default=0)
    result.wall_s = max((s.wall_s for s in case.steps), default=0.0)
    if result.outcome != "failure":
        shutil.rmtree(case.dir, ignore_errors=True)
    elif not result.mutation:
        result.mutation = getattr(case, "mutation", "")
    _ = started
    return result


def _mutated(case: Case, text: str) -> str:
    case.mutation = text  # type: ignore[attr-defined]
    return text


def case_manifest(world: World, case: Case, rng: random.Random) -> tuple[str, str]:
    paths = {"source": world.source, "other_image": world.fleet["hosts"]["fra-2"][0],
             "outside": world.artefacts["canary"]}
    data, what = mut.mutate_manifest(rng, world.valid["manifest"], paths, world.bombs)
    _mutated(case, what)
    manifest = case.write("m.manifest", data)
    note = ""
    if rng.random() < 0.5:
        pack = case.run(["pack", world.source, manifest, "-o", "b.bundle"], outputs=("b.bundle",))
        if pack.code == 0:
            step = case.run(["apply", manifest, "b.bundle", "-o", "out.img", "--host", HOST], outputs=("out.img",))
            if step.code == 0:
                case.expect_image(case.path("out.img"), world.expected, "apply of pack's bundle")
            else:
                note = "pack ok, its apply refused"
            return what, note
        return what, "refused"
    try:
        bundle = mut.reseal_bundle_for(world.valid["bundle"], data)
    except Exception:  # noqa: BLE001 - the manifest cannot be named: the valid bundle goes as it is
        bundle = world.valid["bundle"]
    case.write("b.bundle", bundle)
    step = case.run(["apply", manifest, "b.bundle", "-o", "out.img", "--host", HOST], outputs=("out.img",))
    if step.code == 0:
        case.expect_image(case.path("out.img"), world.expected, "apply")
    return what, note


def case_bundle(world: World, case: Case, rng: random.Random) -> tuple[str, str]:
    data, what = mut.mutate_bundle(rng, world.valid["bundle"], BLOCK_SIZE, BLOCKS_PER_IMAGE, world.bombs)
    _mutated(case, what)
    bundle = case.write("b.bundle", data)
    step = case.run(["apply", world.artefacts["manifest"], bundle, "-o", "out.img", "--host", HOST],
                    outputs=("out.img",))
    if step.code == 0:
        case.expect_image(case.path("out.img"), world.expected, "apply")
    return what, ""


def case_stream(world: World, case: Case, rng: random.Random) -> tuple[str, str]:
    paths = {"source": world.source, "other_image": world.fleet["hosts"]["fra-2"][0],
             "outside": world.artefacts["canary"]}
    data, what = mut.mutate_stream(rng, world.valid["stream"], paths, BLOCK_SIZE, BLOCKS_PER_IMAGE, world.bombs)
    _mutated(case, what)
    stream = case.write("s.stream", data)
    if rng.random() < 0.3:  # from stdin, as in `send | receive`
        step = case.run(["receive", "-o", "out.img", "--host", HOST], outputs=("out.img",), stdin=stream)
    else:
        step = case.run(["receive", stream, "-o", "out.img", "--host", HOST], outputs=("out.img",))
    if step.code == 0:
        case.expect_image(case.path("out.img"), world.expected, "receive")
    return what, ""


def case_ranges(world: World, case: Case, rng: random.Random) -> tuple[str, str]:
    data, what = mut.mutate_ranges(rng, world.valid["ranges"], BLOCKS_PER_IMAGE)
    _mutated(case, what)
    ranges = case.write("r.json", data)
    pack = case.run(["pack", world.source, world.artefacts["manifest"], "--ranges", ranges, "-o", "x.bundle"],
                    outputs=("x.bundle",))
    if pack.code != 0:
        return what, "refused"
    # Blocks a ranges bundle carries replace the local ones: with every local image intact the
    # rebuilt image must still be exact.
    step = case.run(["apply", world.artefacts["manifest"], world.artefacts["bundle"], "x.bundle", "-o", "out.img",
                     "--host", HOST], outputs=("out.img",))
    if step.code != 0:
        raise CaseFailure("bad-ranges-bundle", f"pack --ranges succeeded but apply with its bundle failed: "
                                               f"{step.stderr.strip()[:300]}")
    case.expect_image(case.path("out.img"), world.expected, "apply with the ranges bundle")
    return what, ""


def _qcow2_case(world: World, case: Case, rng: random.Random) -> tuple[str, str, str | None]:
    """Write a mutated qcow2 (and a base beside it) into the case directory; qemu-img's reading of it."""
    variant = rng.choice(sorted(world.qcow2))
    source_dir = world.qcow2[variant]
    shutil.copy(os.path.join(source_dir, "base.qcow2"), case.path("base.qcow2"))
    outside_rel = os.path.relpath(world.artefacts["canary"], case.dir).encode()
    names = {"outside_abs": world.artefacts["canary"].encode(), "outside_rel": outside_rel, "self": b"disk.qcow2",
             "sibling": b"base.qcow2"}
    data, what = mut.mutate_qcow2(rng, world.valid[f"qcow2-{variant}"], names)
    what = f"{variant}: {what}"
    _mutated(case, what)
    disk = case.write("disk.qcow2", data)
    return what, disk, qemu_reading(case, disk, data)


def qemu_reading(case: Case, disk: str, data: bytes) -> str | None:
    """The raw bytes qemu-img reads from ``disk`` (as a file path), or None if it refuses or is too big."""
    if data[:4] != b"QFI\xfb":
        return disk  # blocksketch reads it as raw, as it should
    try:
        info = subprocess.run(["qemu-img", "info", "--output=json", "-f", "qcow2", "-U", disk], capture_output=True,
                              timeout=10)
    except subprocess.TimeoutExpired:  # qemu-img itself loops on some (a v2 image backed by itself)
        return None
    if info.returncode != 0:
        return None
    try:
        size = json.loads(info.stdout)["virtual-size"]
    except (ValueError, KeyError):
        return None
    if size > 64 << 20:
        return None
    reference = os.path.join(case.dir, "..", f"{case.id}.qemu.raw")
    try:
        done = subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", disk, reference],
                              capture_output=True, timeout=10)
    except subprocess.TimeoutExpired:
        if os.path.exists(reference):
            os.unlink(reference)
        return None
    return reference if done.returncode == 0 else None


def case_qcow2(world: World, case: Case, rng: random.Random) -> tuple[str, str]:
    from tests.reference import reference_metrics

    what, disk, reference = _qcow2_case(world, case, rng)
    escape = "outside" in what
    try:
        if rng.random() < 0.5:
            step = case.run(["compare", disk, world.source, "--block-size", str(BLOCK_SIZE), "--json"])
            if step.code != 0:
                return what, "refused"
            if reference is None:
                return what, "read what qemu-img refuses" + ("; backing outside its directory" if escape else "")
            got = json.loads(step.stdout.decode().splitlines()[0])
            expected = reference_metrics(Path(reference).read_bytes(), [world.expected], BLOCK_SIZE)
            differs = {k: (got.get(k), v) for k, v in expected.items() if got.get(k) != v}
            if differs:
                raise CaseFailure("wrong-output", f"compare differs from qemu-img's reading: {differs}")
            return what, "backing outside its directory read" if escape else ""
        step = case.run(["send", disk, "--to", HOST, "-o", "s.stream", "--json"], outputs=("s.stream",))
        if step.code != 0:
            return what, "refused"
        received = case.run(["receive", "s.stream", "-o", "out.img", "--host", HOST], outputs=("out.img",))
        if received.code != 0:
            raise CaseFailure("bad-stream", f"send succeeded but receive failed: {received.stderr.strip()[:300]}")
        if reference is None:
            return what, "read what qemu-img refuses" + ("; backing outside its directory" if escape else "")
        case.expect_image(case.path("out.img"), Path(reference).read_bytes(), "send | receive vs qemu-img convert")
        return what, "backing outside its directory read" if escape else ""
    finally:
        if reference is not None and reference != disk:
            os.unlink(reference)


def case_qcow2_index(world: World, case: Case, rng: random.Random) -> tuple[str, str]:
    what, disk, reference = _qcow2_case(world, case, rng)
    if reference is not None and reference != disk:
        os.unlink(reference)
    host = f"fq-{case.id.rsplit('-', 1)[1]}"
    step = case.run(["index", "--host", host, case.dir, "--json"])
    if step.code == 0 and "outside" in what:
        raise CaseFailure("backing-escape", "index read a backing file outside the image's directory")
    if step.code == 0 and reference is None:
        return what, "indexed what qemu-img refuses"
    return what, "" if step.code == 0 else "refused"


def forget_host(world: World, host: str) -> None:
    import redis

    from store import keys

    client = redis.Redis.from_url(world.redis_url)
    try:
        for key in client.scan_iter(keys.host_pattern(host)):
            client.delete(key)
        client.srem(keys.HOSTS, host)
    finally:
        client.close()


def case_redis(world: World, case: Case, rng: random.Random) -> tuple[str, str]:
    import redis

    kind = rng.choices(["catalogue", "chunk", "filter", "sketch", "config"], weights=[35, 25, 15, 15, 10])[0]
    key = rng.choice(world.redis_kinds[kind])
    original = world.redis_values[key]
    if kind in ("catalogue", "config"):
        value, what = mut.mutate_msgpack_doc(rng, original)
    elif kind == "chunk":
        value, what = mut.mutate_chunk(rng, original)
    else:
        value, what = mut.mutate_bitmap(rng, original)
    what = f"{key.split(':', 2)[-1] if kind != 'config' else 'config'}: {what}"
    if rng.random() < 0.05:
        value, what = None, f"{key} deleted"
    _mutated(case, what)
    command = rng.choice(["rank", "rank", "images", "hosts", "manifest", "manifest", "apply"])
    client = redis.Redis.from_url(world.redis_url)
    try:
        if value is None:
            client.delete(key)
        else:
            client.set(key, value)
        if command == "rank":
            step = case.run(["rank", world.source, "--json"])
        elif command == "images":
            step = case.run(["images", "--json"])
        elif command == "hosts":
            step = case.run(["hosts", "--json"])
        elif command == "manifest":
            step = case.run(["manifest", world.source, "--to", HOST, "-o", "m.manifest", "--json"],
                            outputs=("m.manifest",))
        else:
            step = case.run(["apply", world.artefacts["manifest"], world.artefacts["bundle"], "-o", "out.img",
                             "--host", HOST], outputs=("out.img",))
            if step.code == 0:
                case.expect_image(case.path("out.img"), world.expected, "apply")
    finally:
        client.set(key, original)
        client.close()
    return f"{what} -> {command}", ""


CASES = {"manifest": case_manifest, "bundle": case_bundle, "stream": case_stream, "ranges": case_ranges,
         "qcow2": case_qcow2, "qcow2-index": case_qcow2_index, "redis": case_redis}


def run_http_case(world: World, case_id: str, rng: random.Random) -> CaseResult:
    import http.client
    from urllib.parse import urlsplit

    path, content_type, body, what = mut.mutate_http(rng, world.http_bodies)
    auth = rng.choices(["token", "none", "wrong"], weights=[85, 8, 7])[0]
    headers = {"Content-Type": content_type} if content_type else {}
    if auth == "token":
        headers["Authorization"] = f"Bearer {world.token}"
    elif auth == "wrong":
        headers["Authorization"] = "Bearer not-the-token"
    what = f"{path} {content_type or '(no type)'} {auth}: {what}"
    where = urlsplit(world.http_base)
    started = time.perf_counter()
    result = CaseResult(case_id, "http", what, "ok")
    try:
        connection = http.client.HTTPConnection(where.hostname, where.port, timeout=KILL_S)
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        status, answer = response.status, response.read()
        connection.close()
    except (OSError, http.client.HTTPException) as exc:
        result.outcome, result.kind, result.detail = "failure", "http-no-answer", f"{type(exc).__name__}: {exc}"
        status, answer = 0, b""
    result.http_s = result.wall_s = time.perf_counter() - started
    if result.outcome == "failure":
        pass
    elif status >= 500:
        text = answer[:300].decode("utf-8", "replace")
        result.outcome, result.kind, result.detail = "failure", f"http-{status}", text
    elif auth != "token" and status != 401:
        result.outcome, result.kind, result.detail = "failure", "http-auth", f"{status} without a valid token"
    elif status >= 400:
        result.outcome = "refused"
        try:
            if "error" not in json.loads(answer):
                raise ValueError("no 'error' field")
        except ValueError as exc:
            result.outcome, result.kind, result.detail = "failure", "http-bad-error-body", f"{status}: {exc}"
    elif 200 <= status < 300:
        try:
            document = json.loads(answer)
            if path == "/v1/manifest" and "manifest" in document:
                import base64

                from sketch.manifest import Manifest

                Manifest.from_bytes(base64.b64decode(document["manifest"]))
        except Exception as exc:  # noqa: BLE001
            result.outcome, result.kind, result.detail = "failure", "http-bad-body", f"{status}: {exc}"
    else:
        result.outcome, result.kind, result.detail = "failure", f"http-{status}", "unexpected status"
    if result.wall_s > LIMIT_S and result.outcome != "failure":
        result.outcome, result.kind, result.detail = "failure", "time", f"{result.wall_s:.1f} s"
    try:
        os.kill(world.server_pid, 0)
    except ProcessLookupError:
        result.outcome, result.kind, result.detail = "failure", "server-died", result.detail
    return result


# -- the run ---------------------------------------------------------------------------------------------


def plan(total: int, targets: list[str]) -> list[str]:
    weights = {t: TARGETS[t] for t in targets}
    share = sum(weights.values())
    counts = {t: total * w // share for t, w in weights.items()}
    for t in list(weights)[: total - sum(counts.values())]:
        counts[t] += 1
    return [f"{t}-{n}" for t in targets for n in range(counts[t])]


_WORLD: World | None = None


def _pool_case(case_id: str) -> dict:
    assert _WORLD is not None
    return asdict(run_case(_WORLD, case_id))


def run_all(world: World, case_ids: list[str], workers: int, progress) -> list[CaseResult]:
    """Shared-index-free cases in ``workers`` forked workers, then the exclusive ones one at a time."""
    import multiprocessing

    global _WORLD
    _WORLD = world
    parallel = [c for c in case_ids if c.rsplit("-", 1)[0] not in EXCLUSIVE]
    exclusive = [c for c in case_ids if c.rsplit("-", 1)[0] in EXCLUSIVE]
    results = []
    if parallel:
        context = multiprocessing.get_context("fork")
        with context.Pool(workers) as pool:
            for done in pool.imap_unordered(_pool_case, parallel, chunksize=4):
                results.append(CaseResult(**done))
                progress(results[-1], len(results), len(case_ids))
    for case_id in exclusive:
        results.append(run_case(world, case_id))
        progress(results[-1], len(results), len(case_ids))
    return results


def summarize(results: list[CaseResult]) -> dict:
    table = {}
    for target in TARGETS:
        mine = [r for r in results if r.target == target]
        if not mine:
            continue
        failures = Counter(r.kind for r in mine if r.outcome == "failure")
        notes = Counter(r.kind for r in mine if r.outcome != "failure" and r.kind)
        table[target] = {"cases": len(mine), "ok": sum(r.outcome == "ok" for r in mine),
                         "refused": sum(r.outcome == "refused" for r in mine),
                         "failures": sum(failures.values()), "failure_kinds": dict(failures), "notes": dict(notes),
                         "max_rss_mib": round(max(r.rss_kib for r in mine) / 1024, 1),
                         "max_s": round(max(r.wall_s for r in mine), 3)}
    return table


def print_summary(table: dict, seconds: float, world: World) -> None:
    print(f"\n{'target':<12} {'cases':>6} {'ok':>6} {'refused':>8} {'fail':>5} {'max RSS':>9} {'max s':>7}  failures")
    for target, row in table.items():
        kinds = ", ".join(f"{k} x{n}" for k, n in sorted(row["failure_kinds"].items())) or "-"
        print(f"{target:<12} {row['cases']:>6} {row['ok']:>6} {row['refused']:>8} {row['failures']:>5} "
              f"{row['max_rss_mib']:>7} M {row['max_s']:>7.2f}  {kinds}")
        if row["notes"]:
            print(f"{'':<12} notes: " + ", ".join(f"{k} x{n}" for k, n in sorted(row["notes"].items())))
    total = sum(r["cases"] for r in table.values())
    print(f"{total} cases in {seconds:.0f} s; a forked child's RSS at start: {world.baseline_rss_kib // 1024} MiB "
          f"(RSS limit 256 MiB, time limit {LIMIT_S:.0f} s)")


def write_failures(results: list[CaseResult], world: World, directory: str, seed: int) -> None:
    os.makedirs(directory, exist_ok=True)
    for result in results:
        if result.outcome != "failure":
            continue
        target = os.path.join(directory, result.case)
        shutil.rmtree(target, ignore_errors=True)
        source = os.path.join(world.cases_dir, result.case)
        if os.path.isdir(source):
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.img", ".*"))
        else:
            os.makedirs(target)
        with open(os.path.join(target, "case.json"), "w") as handle:
            replay = f"python benchmarks/fuzz_formats.py --seed {seed} --case {result.case}"
            json.dump({**asdict(result), "replay": replay}, handle, indent=1)


def baseline_rss(world: World) -> int:
    """ru_maxrss of a forked child that does nothing: the part of every RSS the fork server shares."""
    step = run_cli(["--version"], os.path.join(world.workdir, "setup"), world.env)
    return step.rss_kib


def warm_imports() -> None:
    import importlib

    import cli.main  # noqa: F401

    for name in COMMAND_MODULES:
        importlib.import_module(f"cli.{name}_cmd")
    import server.app  # noqa: F401 - rank --server and the service's imports
    import store  # noqa: F401


def subprocess_sample(world: World, results: list[CaseResult], count: int, seed: int) -> dict:
    """Re-run ``count`` cases (not HTTP ones) as real processes: do they end the same way?"""
    rng = random.Random(seed)
    pool = [r for r in results if r.target != "http"]
    chosen = rng.sample(pool, min(count, len(pool)))
    agree, disagree = 0, []
    for before in chosen:
        after = run_case(world, before.case, runner=run_cli_subprocess)
        same = (before.outcome, before.kind) == (after.outcome, after.kind)
        if not same and {before.kind, after.kind} <= {"time", ""} and "time" in (before.kind, after.kind):
            same = True  # python start-up (~0.4 s) can tip a slow case over the line
        agree += same
        if not same:
            disagree.append({"case": before.case, "fork": [before.outcome, before.kind],
                             "process": [after.outcome, after.kind], "detail": after.detail[:200]})
    return {"sampled": len(chosen), "agree": agree, "disagree": disagree}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--target", default=",".join(TARGETS), help="comma-separated targets")
    parser.add_argument("--case", default=None, help="replay one case by id (e.g. bundle-17)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--failures", default="fuzz-failures", help="directory for failing cases")
    parser.add_argument("--subprocess-sample", type=int, default=0)
    parser.add_argument("--atheris", type=float, default=0.0, help="seconds of atheris per decoder instead")
    parser.add_argument("--workdir", default=None, help="default: /tmp/bsfuzz-SEED (deleted at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--log", default=None, help="write every case's result here, one JSON line each")
    args = parser.parse_args()
    targets = [t for t in args.target.split(",") if t]
    unknown = set(targets) - set(TARGETS) - ({"catalogue", "chunk", "config"} if args.atheris else set())
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; known: {', '.join(TARGETS)}")
    from benchmarks.common import machine

    workdir = args.workdir or f"/tmp/bsfuzz-{args.seed}"
    warm_imports()
    started = time.perf_counter()
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f}", flush=True)
    world = build_world(workdir)
    world.seed = args.seed
    if args.atheris:
        from benchmarks.fuzz_atheris import DECODERS, run_atheris

        decoders = [t for t in args.target.split(",") if t in DECODERS] if args.target != ",".join(TARGETS) else None
        report = run_atheris(world, args.atheris, decoders)
        for decoder, row in report["decoders"].items():
            for number, info in enumerate(row["crashes"].values()):
                os.makedirs(os.path.join(args.failures, "atheris"), exist_ok=True)
                kept = os.path.join(args.failures, "atheris", f"{decoder}-{number}")
                shutil.copy(info["input"], kept)
                info["input"] = kept
        print(json.dumps(report, indent=1) if args.json else "\n".join(report["lines"]))
        world.redis_process.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        return
    service = start_service(world) if "http" in targets or args.case and args.case.startswith("http") else None
    world.baseline_rss_kib = baseline_rss(world)
    print(f"world ready in {time.perf_counter() - started:.1f} s ({workdir})", flush=True)
    case_ids = [args.case] if args.case else plan(args.cases, targets)
    last = [time.perf_counter()]

    def progress(result: CaseResult, done: int, total: int) -> None:
        if result.outcome == "failure" and (args.case or not args.json):
            print(f"FAIL {result.case} [{result.kind}] {result.mutation}: {result.detail[:200]}", flush=True)
        if time.perf_counter() - last[0] > 30 and not args.json:
            last[0] = time.perf_counter()
            print(f"... {done}/{total} cases, {time.perf_counter() - started:.0f} s", flush=True)

    run_started = time.perf_counter()
    try:
        results = run_all(world, case_ids, args.workers, progress)
        seconds = time.perf_counter() - run_started
        table = summarize(results)
        sample = None
        if args.subprocess_sample:
            sample = subprocess_sample(world, results, args.subprocess_sample, args.seed)
        server_hwm = None
        if service is not None:
            with open(f"/proc/{service.pid}/status") as handle:
                server_hwm = next((int(line.split()[1]) for line in handle if line.startswith("VmHWM")), None)
        failures = [r for r in results if r.outcome == "failure"]
        if args.log:
            with open(args.log, "w") as handle:
                for result in sorted(results, key=lambda r: r.case):
                    handle.write(json.dumps(asdict(result)) + "\n")
        if failures:
            write_failures(results, world, args.failures, args.seed)
        if args.case:
            print(json.dumps(asdict(results[0]), indent=1))
        if args.json:
            print(json.dumps({"seconds": round(seconds, 1), "workers": args.workers, "seed": args.seed,
                              "baseline_rss_mib": round(world.baseline_rss_kib / 1024, 1), "targets": table,
                              "server_hwm_mib": server_hwm and round(server_hwm / 1024, 1), "subprocess_sample": sample,
                              "failures": [{"case": r.case, "kind": r.kind, "mutation": r.mutation,
                                            "detail": r.detail[:300]} for r in failures]}, indent=1))
        elif not args.case:
            print_summary(table, seconds, world)
            if server_hwm:
                print(f"service peak RSS (VmHWM) after the HTTP cases: {server_hwm // 1024} MiB")
            if sample:
                print(f"subprocess sample: {sample['agree']}/{sample['sampled']} cases end the same as real "
                      f"`python -m cli` processes; disagreeing: {sample['disagree']}")
            if failures:
                print(f"{len(failures)} failing cases written to {args.failures}/")
    finally:
        if service is not None:
            from benchmarks.bench_server import stop

            stop(service)
        world.redis_process.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    sys.exit(1 if any(r.outcome == "failure" for r in results) else 0)


if __name__ == "__main__":
    main()
