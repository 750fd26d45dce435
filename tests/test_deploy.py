"""deploy/: the shipped systemd units, cron line, Redis config and ACL file, checked by systemd and
run as written; and the test-suite rules CI relies on (a skip fails under CI=true, pytest's closing
line is printed).

The units' commands run for real here, against a real Redis: the venv's path
(/opt/blocksketch/bin/blocksketch) is replaced by a wrapper running this worktree's ``python -m cli``,
and /etc/blocksketch by a scratch directory. The Redis config runs on loopback with the test's
certificates and passwords. Everything else is the file as shipped.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from sketch.sample import random_blocks, write_image
from store import open_store
from tests.redis_server import RedisProcess, free_port
from tests.test_store_connect import make_tls_files

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
VENV_COMMAND = "/opt/blocksketch/bin/blocksketch"
UNITS = ["blocksketch-index.service", "blocksketch-index.timer", "blocksketch-serve.service"]
MAX_EXPOSURE = 2.0  # systemd-analyze security: 0 is a sealed box, 10 no hardening; "OK" ends at 3.9


def wrapper(directory: Path) -> Path:
    """An executable standing in for the venv's ``blocksketch``: this worktree's CLI."""
    directory.mkdir(parents=True, exist_ok=True)
    command = directory / "blocksketch"
    python = shlex.quote(sys.executable)
    command.write_text(f'#!/bin/sh\nPYTHONPATH={shlex.quote(str(ROOT))} exec {python} -m cli "$@"\n')
    command.chmod(0o755)
    return command


def unit_value(unit: str, key: str) -> str:
    values = [line.split("=", 1)[1] for line in (DEPLOY / unit).read_text().splitlines() if line.startswith(key + "=")]
    assert len(values) == 1, f"{unit} sets {key}= {len(values)} times"
    return values[0]


def environment_file(path: Path, **values: str) -> dict[str, str]:
    """Write deploy/env.example to ``path`` with ``values`` replacing its own; return what it sets."""
    lines, seen = [], {}
    for line in (DEPLOY / "env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            key = line.split("=", 1)[0]
            if key in values:
                line = f"{key}={shlex.quote(values[key])}"
            seen[key] = shlex.split(line.split("=", 1)[1])[0]
        lines.append(line)
    path.write_text("\n".join(lines) + "\n")
    assert set(values) <= set(seen), "env.example lacks a variable the units use"
    return seen


def exec_start(unit: str, env: dict[str, str], command: Path, credentials: Path | None = None) -> list[str]:
    """The unit's ExecStart as systemd expands it: ``$VAR`` splits into words, ``${VAR}`` stays one word,
    ``%d`` is the credentials directory."""
    words = []
    for word in shlex.split(unit_value(unit, "ExecStart")):
        if word == VENV_COMMAND:
            words.append(str(command))
        elif re.fullmatch(r"\$\w+", word):
            words.extend(env[word[1:]].split())
        else:
            word = re.sub(r"\$\{(\w+)\}", lambda match: env[match.group(1)], word)
            words.append(word.replace("%d", str(credentials)) if credentials else word)
    return words


def small_images(directory: Path, count: int, seed: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = [directory / f"vm{number}.img" for number in range(count)]
    for path in paths:
        write_image(str(path), random_blocks(rng, 64, 512))
    return paths


def service_environment(tmp_path: Path, env: dict[str, str]) -> dict[str, str]:
    """What systemd gives the service: a plain PATH, the user's HOME, the EnvironmentFile's variables."""
    return {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home"), **env}


def indexed_paths(redis_url: str) -> set[str]:
    with open_store(redis_url) as store:
        return {image.path for image in store.images()}


@pytest.mark.tools("systemd-analyze")
def test_the_units_pass_systemd_analyze_verify_without_a_warning(tmp_path):
    command = wrapper(tmp_path / "bin")
    for unit in UNITS:
        (tmp_path / unit).write_text((DEPLOY / unit).read_text().replace(VENV_COMMAND, str(command)))
    done = subprocess.run(["systemd-analyze", "verify", *(str(tmp_path / unit) for unit in UNITS)],
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "", done.stderr


@pytest.mark.tools("systemd-analyze")
@pytest.mark.parametrize("unit", ["blocksketch-index.service", "blocksketch-serve.service"])
def test_the_services_are_hardened(tmp_path, unit):
    (tmp_path / unit).write_text((DEPLOY / unit).read_text())
    done = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(tmp_path / unit)],
                          capture_output=True, text=True)
    level = re.search(r"Overall exposure level for \S+: ([\d.]+)", done.stdout)
    assert level, done.stdout + done.stderr
    assert float(level.group(1)) <= MAX_EXPOSURE, done.stdout
    assert unit_value(unit, "User") == "blocksketch" and unit_value(unit, "ProtectSystem") == "strict"


def test_the_index_unit_command_publishes_every_directory_the_env_file_names(tmp_path, redis_url):
    images = small_images(tmp_path / "images-a", 2, 1) + small_images(tmp_path / "images-b", 1, 2)
    env = environment_file(tmp_path / "env", BLOCKSKETCH_REDIS_URL=redis_url,
                           BLOCKSKETCH_IMAGES=f"{tmp_path / 'images-a'} {tmp_path / 'images-b'}")
    assert unit_value("blocksketch-index.service", "Type") == "oneshot"
    assert unit_value("blocksketch-index.service", "EnvironmentFile") == "/etc/blocksketch/env"
    done = subprocess.run(exec_start("blocksketch-index.service", env, wrapper(tmp_path / "bin")),
                          capture_output=True, text=True, env=service_environment(tmp_path, env), timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["indexed"]) == 3
    assert indexed_paths(redis_url) == {str(path) for path in images}


def test_the_serve_unit_answers_only_with_the_token_of_its_credential(tmp_path, redis_url):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "token").write_text("s3cret-token\n")
    assert unit_value("blocksketch-serve.service", "LoadCredential") == "token:/etc/blocksketch/token"
    bind = f"127.0.0.1:{free_port()}"
    env = environment_file(tmp_path / "env", BLOCKSKETCH_REDIS_URL=redis_url, BLOCKSKETCH_BIND=bind)
    argv = exec_start("blocksketch-serve.service", env, wrapper(tmp_path / "bin"), credentials)
    server = subprocess.Popen(argv, env=service_environment(tmp_path, env), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, server.stderr.read().decode()
            try:
                if httpx.get(f"http://{bind}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "serve did not answer /healthz"
                time.sleep(0.1)
        assert httpx.get(f"http://{bind}/v1/hosts").status_code == 401
        assert httpx.get(f"http://{bind}/v1/hosts", headers={"Authorization": "Bearer wrong"}).status_code == 401
        answer = httpx.get(f"http://{bind}/v1/hosts", headers={"Authorization": "Bearer s3cret-token"})
        assert answer.status_code == 200, answer.text
    finally:
        server.terminate()
        server.wait(timeout=30)
        server.stderr.close()


def cron_job(tmp_path: Path, log_dir: Path) -> tuple[dict[str, str], str]:
    """The cron file's variables and its job's command, with the venv, /etc and /var/log paths moved
    into ``tmp_path``; checks the schedule and the user on the way."""
    variables, jobs = {}, []
    for line in (DEPLOY / "blocksketch-index.cron").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        assignment = re.fullmatch(r"([A-Z_]+)=(.*)", line)
        if assignment:
            variables[assignment.group(1)] = assignment.group(2)
        else:
            jobs.append(line.split(None, 6))
    assert len(jobs) == 1 and jobs[0][:6] == ["*/15", "*", "*", "*", "*", "blocksketch"]
    assert "/opt/blocksketch/bin" in variables["PATH"].split(":")
    moved = {"/opt/blocksketch/bin": str(wrapper(tmp_path / "bin").parent), "/etc/blocksketch/env":
             str(tmp_path / "env"), "/var/log/blocksketch": str(log_dir)}
    for old, new in moved.items():
        variables = {key: value.replace(old, new) for key, value in variables.items()}
        jobs[0][6] = jobs[0][6].replace(old, new)
    return variables, jobs[0][6]


@pytest.mark.tools("flock")
def test_the_cron_line_finds_the_command_and_indexes_with_only_crons_environment(tmp_path, redis_url):
    images = small_images(tmp_path / "images", 2, 3)
    environment_file(tmp_path / "env", BLOCKSKETCH_REDIS_URL=redis_url, BLOCKSKETCH_IMAGES=str(tmp_path / "images"))
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    variables, command = cron_job(tmp_path, log_dir)
    # cron runs the command with SHELL -c, its environment only the file's variables, HOME and LOGNAME
    env = {"HOME": str(tmp_path), "LOGNAME": "blocksketch", **variables}
    done = subprocess.run([variables["SHELL"], "-c", command], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == done.stderr == "", (log_dir / "index.log").read_text()
    assert len(json.loads((log_dir / "index.log").read_text())["indexed"]) == 2
    assert indexed_paths(redis_url) == {str(path) for path in images}


def run_pytest(tmp_path: Path, body: str, *args: str, ci: bool) -> subprocess.CompletedProcess:
    """pytest on one scratch test file, with this project's configuration and tests/conftest.py."""
    test_file = tmp_path / "test_scratch.py"
    test_file.write_text("import pytest\n\n\ndef test_runs():\n    pass\n\n\n" + body)
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", *args, "-c", str(ROOT / "pyproject.toml"),
                           "--rootdir", str(ROOT), "-p", "tests.conftest", "-p", "no:cacheprovider", str(test_file)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


SKIPPING = 'def test_skips():\n    pytest.skip("no frobnicator here")\n'
NEEDS_A_PROGRAM = '@pytest.mark.tools("no-such-program-xyz")\ndef test_needs():\n    pass\n'
EXPECTED_FAILURE = '@pytest.mark.xfail(reason="known", strict=True)\ndef test_xfails():\n    assert False\n'


@pytest.mark.parametrize("body, ci, status, printed", [
    (SKIPPING, False, 0, ["SKIPPED [1]", "no frobnicator here", "1 passed, 1 skipped"]),
    (SKIPPING, True, 1, ["skipped under CI=true, where every test must run", "no frobnicator here", "1 failed"]),
    (NEEDS_A_PROGRAM, False, 0, ["needs no-such-program-xyz on PATH (apt-get install no-such-program-xyz)",
                                 "1 passed, 1 skipped"]),
    (NEEDS_A_PROGRAM, True, 1, ["skipped under CI=true", "needs no-such-program-xyz on PATH", "1 error"]),
    (EXPECTED_FAILURE, True, 0, ["1 passed, 1 xfailed"]),
], ids=["skip", "skip under CI", "missing program", "missing program under CI", "xfail under CI"])
def test_under_ci_every_skip_fails_the_run_with_its_reason(tmp_path, body, ci, status, printed):
    done = run_pytest(tmp_path, body, "-q", "-rs", ci=ci)
    assert done.returncode == status, done.stdout + done.stderr
    for text in printed:
        assert text in done.stdout, done.stdout


@pytest.mark.parametrize("args", [[], ["-q"], ["-q", "-rs"]], ids=["README command", "-q", "-q -rs"])
def test_pytest_prints_its_closing_line_with_the_project_configuration(tmp_path, args):
    done = run_pytest(tmp_path, SKIPPING, *args, ci=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^=*\s*1 passed, 1 skipped in [\d.]+s", done.stdout, re.MULTILINE), done.stdout
    assert "no frobnicator here" in done.stdout  # every skip's reason is listed


def redis_config_args(**replace: str) -> list[str]:
    """deploy/redis-blocksketch.conf as redis-server command-line options, with ``replace`` (option ->
    value; None drops it) applied."""
    args = []
    for line in (DEPLOY / "redis-blocksketch.conf").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            option, value = line.split(None, 1)
            value = replace.get(option, value)
            if value is not None:
                args += [f"--{option}", *value.split()]
    return args


def cli(url: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "BLOCKSKETCH_REDIS_URL": url, "BLOCKSKETCH_HOME": str(tmp_path / "home")}
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.tools("openssl", "redis-server")
def test_the_shipped_redis_config_and_acls_let_a_node_index_only_itself_and_readers_rank_from_a_tls_replica(
        tmp_path):
    tls = make_tls_files(tmp_path)
    passwords = {name: f"pw-{name}" for name in ("admin", "replicator", "reader", "node-7")}
    acl = (DEPLOY / "redis-users.acl").read_text()
    for name, password in passwords.items():
        acl = acl.replace(f">CHANGE-ME-{name}", f">{password}")
    assert "CHANGE-ME" not in acl and "user default off\n" in acl
    # the test launcher checks readiness with a plain PING as the default user on a plain loopback port
    (tmp_path / "users.acl").write_text(acl.replace("user default off\n", "user default on nopass ~* &* +@all\n"))
    ports = {"primary": free_port(), "replica": free_port()}
    servers = {}
    for role in ("primary", "replica"):
        args = redis_config_args(bind="127.0.0.1", port=None, **{
            "tls-port": str(ports[role]), "tls-cert-file": str(tls["cert"]), "tls-key-file": str(tls["key"]),
            "tls-ca-cert-file": str(tls["ca"]), "aclfile": str(tmp_path / "users.acl"), "maxmemory": "256mb"})
        if role == "replica":
            args += ["--replicaof", "127.0.0.1", str(ports["primary"]), "--masteruser", "replicator",
                     "--masterauth", passwords["replicator"]]
        servers[role] = RedisProcess(tmp_path / role, extra=args).start()
    try:
        def url(user: str, role: str) -> str:
            return f"rediss://{user}:{passwords[user.removeprefix('index-')]}@127.0.0.1:{ports[role]}/0" \
                   f"?ssl_ca_certs={tls['ca']}"

        images = small_images(tmp_path / "images", 2, 4)
        done = cli(url("index-node-7", "primary"), "index", "--host", "node-7", str(tmp_path / "images"),
                   tmp_path=tmp_path)
        assert done.returncode == 0, done.stderr
        other = cli(url("index-node-7", "primary"), "index", "--host", "node-8", str(tmp_path / "images"),
                    tmp_path=tmp_path)
        assert other.returncode == 1 and "no permissions" in other.stderr, other.stderr

        replica = redis.Redis.from_url(servers["replica"].url)
        deadline = time.monotonic() + 30
        while not replica.exists("blocksketch:{node-7}:catalogue"):
            assert time.monotonic() < deadline, replica.info("replication")
            time.sleep(0.1)
        assert replica.info("replication")["master_link_status"] == "up"
        replica.close()
        ranked = cli(url("reader", "replica"), "rank", str(images[0]), "--json", tmp_path=tmp_path)
        assert ranked.returncode == 0, ranked.stderr
        assert json.loads(ranked.stdout)["winner"] == "node-7"
        refused = cli(url("reader", "replica"), "index", "--host", "node-7", str(tmp_path / "images"),
                      tmp_path=tmp_path)
        assert refused.returncode == 1, refused.stderr
    finally:
        for server in servers.values():
            server.stop()
