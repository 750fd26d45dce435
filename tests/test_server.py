"""The HTTP service as a real process on a free loopback port, over a real Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from sketch.sample import write_sample_fleet
from tests.service_process import running_service

TOKEN = "s3cret-token-for-tests"


def run_cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, env=env)


@pytest.fixture
def fleet(tmp_path, redis_url):
    fleet = write_sample_fleet(str(tmp_path / "fleet"), blocks_per_image=512)
    for host, paths in fleet["hosts"].items():
        result = run_cli("index", "--host", host, "--block-size", "4096", "--redis", redis_url,
                         os.path.dirname(paths[0]))
        assert result.returncode == 0, result.stderr
    result = run_cli("index", "--host", "origin", "--block-size", "4096", "--redis", redis_url, fleet["source"])
    assert result.returncode == 0, result.stderr
    return fleet


@pytest.fixture
def service(tmp_path, redis_url):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with running_service(str(token_file), redis_url, "--max-body-mib", "1") as base, \
            httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as client:
        yield client


def test_healthz_needs_no_token_and_reports_redis(service):
    response = httpx.get(f"{service.base_url}/healthz")
    assert response.status_code == 200
    assert response.json()["redis"] is True


@pytest.mark.parametrize("path", ["/v1/hosts", "/metrics", "/openapi.json", "/v1/hosts/x/images"])
@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic abc", "Bearer"])
def test_every_endpoint_but_healthz_needs_the_token(service, path, header):
    headers = {"Authorization": header} if header else {}
    response = httpx.get(f"{service.base_url}{path}", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"] == "unauthorized"


def test_hosts_and_images_equal_the_cli(service, fleet, redis_url):
    hosts = service.get("/v1/hosts").json()
    cli_hosts = json.loads(run_cli("hosts", "--json", "--redis", redis_url).stdout)
    assert hosts == cli_hosts
    assert {h["host"] for h in hosts} == {"ams-1", "fra-2", "lon-3", "origin"}
    images = service.get("/v1/hosts/ams-1/images").json()
    assert images == json.loads(run_cli("images", "--host", "ams-1", "--json", "--redis", redis_url).stdout)


@pytest.mark.parametrize("body, content_type", [
    (b"{not json", "application/json"),
    (b"[1, 2]", "application/json"),
    (b"", "application/json"),
    (b'{"image": 5}', "application/json"),
    (b'{"image": "no-colon"}', "application/json"),
    (b'{"image": "ams-1:/x", "top": "ten"}', "application/json"),
    (b'{"image": "ams-1:/x", "top": -1}', "application/json"),
    (b'{"image": "ams-1:/x", "exclude_hosts": "ams-1"}', "application/json"),
    (b"\xc1\xc1", "application/msgpack"),
])
def test_bad_rank_bodies_get_a_4xx_json_error(service, fleet, body, content_type):
    response = service.post("/v1/rank", content=body, headers={"Content-Type": content_type})
    assert 400 <= response.status_code < 500
    assert set(response.json()) == {"error", "detail"}


def test_unknown_host_or_image_is_404(service, fleet):
    assert service.get("/v1/hosts/nowhere/images").status_code == 404
    response = service.post("/v1/rank", json={"image": "ams-1:/no/such.img"})
    assert response.status_code == 404
    assert "ams-1" in response.json()["detail"] or "/no/such.img" in response.json()["detail"]


def test_oversized_body_is_413(service):
    response = service.post("/v1/rank", content=b"x" * (2 << 20), headers={"Content-Type": "application/json"})
    assert response.status_code == 413


def test_unknown_route_and_method_are_json_errors(service):
    assert service.get("/v2/nothing").status_code == 404
    assert service.get("/v1/rank").status_code == 405


def test_metrics_are_prometheus_text(service, fleet):
    service.get("/v1/hosts")
    text = service.get("/metrics").text
    assert "blocksketch_http_requests_total" in text
    assert "blocksketch_index_hosts 4.0" in text


def test_refuses_a_public_address_without_a_token(tmp_path):
    env = dict(os.environ)
    env.pop("BLOCKSKETCH_TOKEN", None)
    result = run_cli("serve", "--bind", "0.0.0.0:1", env=env)
    assert result.returncode == 2
    assert "without a token" in result.stderr


TIMING_FIELDS = {"seconds", "digests_per_second", "estimate_seconds", "exact_seconds", "milliseconds"}


def without_timings(result):
    """The result with wall-clock measurements left out (they differ between any two runs)."""
    if isinstance(result, dict):
        return {k: without_timings(v) for k, v in result.items() if k not in TIMING_FIELDS and not k.endswith("_ms")}
    if isinstance(result, list):
        return [without_timings(v) for v in result]
    return result


def test_rank_of_an_indexed_image_equals_the_cli(service, fleet, redis_url):
    image = f"origin:{os.path.realpath(fleet['source'])}"
    answer = service.post("/v1/rank", json={"image": image, "top": 5, "exact_top": 2})
    assert answer.status_code == 200, answer.text
    cli = run_cli("rank", image, "--top", "5", "--exact-top", "2", "--json", "--redis", redis_url)
    assert cli.returncode == 0, cli.stderr
    assert without_timings(answer.json()) == without_timings(json.loads(cli.stdout))
    assert answer.json()["winner"] == "ams-1"
    assert "origin" not in [h["host"] for h in answer.json()["hosts"]]


def test_cli_rank_through_the_service_equals_rank_through_redis(service, fleet, redis_url, tmp_path):
    token_file = tmp_path / "client-token"
    token_file.write_text(TOKEN)
    base = str(service.base_url).rstrip("/")
    for image in (fleet["source"], f"origin:{os.path.realpath(fleet['source'])}"):
        direct = run_cli("rank", image, "--json", "--redis", redis_url)
        remote = run_cli("rank", image, "--json", "--server", base, "--token-file", str(token_file))
        assert direct.returncode == 0 and remote.returncode == 0, direct.stderr + remote.stderr
        assert without_timings(json.loads(remote.stdout)) == without_timings(json.loads(direct.stdout))
    refused = run_cli("rank", fleet["source"], "--json", "--server", base, env={**os.environ, "BLOCKSKETCH_TOKEN": "x"})
    assert refused.returncode == 1 and "token" in refused.stderr and "Traceback" not in refused.stderr


def test_manifest_through_the_service_equals_the_cli(service, fleet, redis_url, tmp_path):
    token_file = tmp_path / "client-token"
    token_file.write_text(TOKEN)
    image = f"origin:{os.path.realpath(fleet['source'])}"
    answer = service.post("/v1/manifest", json={"image": image, "to": "fra-2"})
    assert answer.status_code == 200, answer.text
    direct = run_cli("manifest", fleet["source"], "--to", "fra-2", "-o", str(tmp_path / "direct.manifest"),
                     "--json", "--redis", redis_url)
    remote = run_cli("manifest", image, "--to", "fra-2", "-o", str(tmp_path / "remote.manifest"), "--json",
                     "--server", str(service.base_url).rstrip("/"), "--token-file", str(token_file))
    assert direct.returncode == 0 and remote.returncode == 0, direct.stderr + remote.stderr
    direct_summary, remote_summary = json.loads(direct.stdout), json.loads(remote.stdout)
    assert answer.json()["blocks"] == direct_summary["blocks"] == remote_summary["blocks"]
    assert (tmp_path / "direct.manifest").read_bytes() == (tmp_path / "remote.manifest").read_bytes()
    assert sum(answer.json()["blocks"].values()) == 512


def test_rank_of_a_client_query_in_msgpack(service, fleet):
    import msgpack

    from server.handlers import rank_query_to_body
    from sketch.digests import digest_image
    from sketch.rank import RankQuery

    query = RankQuery.from_digests(digest_image(fleet["source"], 4096), "local.img")
    body = msgpack.packb({**rank_query_to_body(query), "top": 3, "exclude_hosts": ["origin"]}, use_bin_type=True)
    answer = service.post("/v1/rank", content=body, headers={"Content-Type": "application/msgpack"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["winner"] == "ams-1"
    broken = msgpack.packb({**rank_query_to_body(query), "digests": b"\x01" * 17}, use_bin_type=True)
    assert service.post("/v1/rank", content=broken, headers={"Content-Type": "application/msgpack"}).status_code == 400


def test_block_size_mismatch_and_unknown_destination_are_4xx(service, fleet):
    image = f"origin:{os.path.realpath(fleet['source'])}"
    assert service.post("/v1/manifest", json={"image": image, "to": "nowhere"}).status_code == 404
    assert service.get("/v1/index").json()["block_size"] == 4096


def test_405_lists_the_allowed_methods_and_exact_top_is_capped(service, fleet):
    response = service.delete("/v1/hosts")
    assert response.status_code == 405 and "GET" in response.headers["allow"]
    image = f"origin:{os.path.realpath(fleet['source'])}"
    assert service.post("/v1/rank", json={"image": image, "exact_top": 65}).status_code == 400
    assert service.post("/v1/rank", json={"image": image, "top": 0}).status_code == 400


def test_a_refresh_reaches_the_next_ranking_within_a_second(service, fleet, redis_url):
    image = f"origin:{os.path.realpath(fleet['source'])}"
    first = service.post("/v1/rank", json={"image": image}).json()
    assert service.post("/v1/rank", json={"image": image}).json() == first  # answered again, unchanged
    os.remove(fleet["hosts"]["ams-1"][0])  # ams-1 keeps its less similar image only
    result = run_cli("index", "--host", "ams-1", "--block-size", "4096", "--redis", redis_url,
                     os.path.dirname(fleet["hosts"]["ams-1"][1]))
    assert result.returncode == 0, result.stderr
    time.sleep(1.2)
    after = service.post("/v1/rank", json={"image": image}).json()
    ams = [h for h in after["hosts"] if h["host"] == "ams-1"][0]
    before = [h for h in first["hosts"] if h["host"] == "ams-1"][0]
    assert ams["images"] == 1 and before["images"] == 2
    assert ams["estimated_shared_ratio"] < before["estimated_shared_ratio"]
