"""Versions and releases: deploy --no-release, weighted traffic split, pinning with X-Apus-Version."""

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from apus_testlib import FUNCTIONS_DIR, KeepAliveClient, assert_error, copy_function

MARKER_V2 = [(r"^(\s*MARKER:\s*['\"]?)v1", r"\g<1>v2")]


def make_versions(tmp_path):
    v1 = copy_function(FUNCTIONS_DIR / "versioned", tmp_path / "versioned-v1")
    v2 = copy_function(FUNCTIONS_DIR / "versioned", tmp_path / "versioned-v2", subs=MARKER_V2)
    return v1, v2


def weights(release):
    """Release weights as {version: weight}, versions at weight 0 left out."""
    return {w["version"]: w["weight"] for w in release["weights"] if w["weight"]}


def split_calls(base_url, total=2000, threads=16, headers=None):
    """`total` GETs spread over `threads` keep-alive connections; returns the decoded responses."""
    per_thread = total // threads

    def run(_):
        client = KeepAliveClient(base_url)
        out = []
        try:
            for _ in range(per_thread):
                r = client.request("GET", "/versioned/", headers=headers)
                out.append(r)
        finally:
            client.close()
        return out, client.connections_opened

    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(run, range(threads)))
    responses = [r for rs, _ in results for r in rs]
    connections = sum(c for _, c in results)
    return responses, connections


@pytest.mark.timeout(150)
def test_weighted_release_and_pinning(apusd, tmp_path):
    v1, v2 = make_versions(tmp_path)
    apusd.deploy(v1)
    r = apusd.get("/versioned/")
    assert r.status == 200 and r.json() == {"version": "1", "marker": "v1"}, r

    apusd.deploy(v2, release=False)
    doc = apusd.api_json("GET", "/v1/functions/versioned")
    assert doc["latestVersion"] == 2
    assert [v["number"] for v in doc["versions"]] == [1, 2]
    assert doc["versions"][1]["manifest"]["env"] == {"MARKER": "v2"}
    assert weights(doc["release"]) == {1: 100}, "--no-release must keep traffic on version 1"
    for _ in range(10):
        r = apusd.get("/versioned/")
        assert r.status == 200 and r.json()["version"] == "1", r

    apusd.cli_ok("release", "versioned", "1=90", "2=10")
    release = apusd.api_json("GET", "/v1/functions/versioned")["release"]
    assert weights(release) == {1: 90, 2: 10}

    responses, connections = split_calls(apusd.gateway, total=2000, threads=16)
    assert len(responses) == 2000
    bad = [r for r in responses if r.status != 200]
    assert not bad, f"{len(bad)} failed calls, e.g. {bad[:3]!r}"
    counts = Counter()
    for r in responses:
        doc = r.json()
        assert doc["marker"] == "v" + doc["version"], doc
        assert r.header("X-Apus-Version") == doc["version"], (r.header("X-Apus-Version"), doc)
        counts[doc["version"]] += 1
    share = counts["2"] / len(responses)
    assert 0.05 <= share <= 0.15, f"version 2 got {share:.1%} of the calls (release says 10%): {dict(counts)}"
    assert set(counts) == {"1", "2"}
    assert connections < 200, f"{connections} connections for 2000 keep-alive calls: keep-alive is not honoured"

    # Pinning a version with the request header overrides the release.
    for _ in range(20):
        r = apusd.get("/versioned/", headers={"X-Apus-Version": "2"})
        assert r.status == 200 and r.json() == {"version": "2", "marker": "v2"}, r
        assert r.header("X-Apus-Version") == "2"
    r = apusd.get("/versioned/", headers={"X-Apus-Version": "1"})
    assert r.status == 200 and r.json() == {"version": "1", "marker": "v1"}, r
    assert_error(apusd.get("/versioned/", headers={"X-Apus-Version": "99"}), 404, "not_found")

    # `apus release NAME 2` moves all traffic.
    apusd.cli_ok("release", "versioned", "2")
    assert weights(apusd.api_json("GET", "/v1/functions/versioned")["release"]) == {2: 100}
    for _ in range(20):
        r = apusd.get("/versioned/")
        assert r.status == 200 and r.json() == {"version": "2", "marker": "v2"}, r
