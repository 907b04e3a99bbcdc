"""Prometheus `/metrics` on the API port (text exposition format 0.0.4): request counts by function, version,
protocol and code, latency histograms, queue depth, requests in flight, instances by state, rejections, cold starts
(by runtime and prewarmed or not) and the autoscaler's decisions. The text is parsed here (no prometheus_client
needed) and checked line by line against the format's rules and Prometheus' naming conventions.
"""

from __future__ import annotations

import math
import re
import subprocess
import threading
import time

import pytest

from apus_testlib import EXAMPLES_DIR, FUNCTIONS_DIR, Apusd, copy_function, write_headecho

GONE_STATES = ("stop", "exit", "crash", "dead", "fail", "gone")
NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
SAMPLE_RE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?[ \t]+(?P<value>\S+)(?:[ \t]+-?\d+)?$")
LABEL_RE = re.compile(r'[ \t]*(?P<key>[a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*"(?P<value>(?:[^"\\\n]|\\[\\"n])*)"[ \t]*(?:,|$)')
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}

EXPECTED_FAMILIES = {
    "apus_requests_total": "counter",
    "apus_request_duration_seconds": "histogram",
    "apus_queue_depth": "gauge",
    "apus_requests_in_flight": "gauge",
    "apus_instances": "gauge",
    "apus_cold_starts_total": "counter",
    "apus_cold_start_duration_seconds": "histogram",
    "apus_scaler_desired_instances": "gauge",
    "apus_scaler_panicking": "gauge",
    "apus_scaler_decisions_total": "counter",
}


# ---- a small parser of the text format ------------------------------------------------------------------------


class Exposition:
    def __init__(self, text: str):
        self.text = text
        self.types: dict[str, str] = {}
        self.helps: dict[str, str] = {}
        self.samples: dict[tuple, float] = {}  # (name, ((key, value), ...) sorted) -> value
        self.order: list[tuple[str, str]] = []  # (family, sample name) in text order
        problems = []
        for number, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            if line.startswith("#"):
                parts = line.split(None, 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    name = parts[2]
                    if not NAME_RE.match(name):
                        problems.append(f"line {number}: bad metric name in {line!r}")
                    if parts[1] == "TYPE":
                        kind = parts[3].strip() if len(parts) > 3 else ""
                        if kind not in TYPES:
                            problems.append(f"line {number}: unknown type in {line!r}")
                        if name in self.types:
                            problems.append(f"line {number}: second TYPE line for {name}")
                        if any(family == name for family, _ in self.order):
                            problems.append(f"line {number}: TYPE of {name} after its samples")
                        self.types[name] = kind
                    else:
                        if name in self.helps:
                            problems.append(f"line {number}: second HELP line for {name}")
                        self.helps[name] = parts[3] if len(parts) > 3 else ""
                continue
            m = SAMPLE_RE.match(line)
            if not m:
                problems.append(f"line {number}: unparsable sample {line!r}")
                continue
            labels, rest = [], m.group("labels") or ""
            while rest:
                lm = LABEL_RE.match(rest)
                if not lm:
                    problems.append(f"line {number}: unparsable labels in {line!r}")
                    break
                labels.append((lm.group("key"), lm.group("value").replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")))
                rest = rest[lm.end():]
            keys = [k for k, _ in labels]
            if len(set(keys)) != len(keys):
                problems.append(f"line {number}: repeated label in {line!r}")
            try:
                value = float(m.group("value"))
            except ValueError:
                problems.append(f"line {number}: value is not a float in {line!r}")
                continue
            key = (m.group("name"), tuple(sorted(labels)))
            if key in self.samples:
                problems.append(f"line {number}: duplicate series {line!r}")
            self.samples[key] = value
            self.order.append((self.family_of(m.group("name")), m.group("name")))
        self.problems = problems

    def family_of(self, sample_name: str) -> str:
        if sample_name in self.types:
            return sample_name
        for suffix in ("_bucket", "_sum", "_count"):
            base = sample_name[: -len(suffix)]
            if sample_name.endswith(suffix) and self.types.get(base) in ("histogram", "summary"):
                return base
        return sample_name

    def series(self, name: str, **labels) -> dict[tuple, float]:
        """Samples of `name` whose labels include `labels` (a subset match)."""
        want = {k: str(v) for k, v in labels.items()}
        return {key: value for key, value in self.samples.items()
                if key[0] == name and all(dict(key[1]).get(k) == v for k, v in want.items())}

    def value(self, name: str, **labels) -> float | None:
        """The one sample with exactly these labels (None: absent)."""
        return self.samples.get((name, tuple(sorted((k, str(v)) for k, v in labels.items()))))

    def total(self, name: str, **labels) -> float:
        return sum(self.series(name, **labels).values())


def scrape(apusd) -> Exposition:
    r = apusd.api_call("GET", "/metrics")
    assert r.status == 200, r
    ctype = r.header("Content-Type", "")
    assert ctype.startswith("text/plain") and "version=0.0.4" in ctype, f"not the 0.0.4 text format: {ctype!r}"
    return Exposition(r.text)


def wait_for_value(apusd, name, expected, timeout=5.0, **labels) -> Exposition:
    """Scrape until the sample with exactly these labels equals expected (a request is counted as it completes,
    which may be a moment after the client has read the response); fails with the last value seen."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(apusd)
        if m.value(name, **labels) == expected:
            return m
        if time.monotonic() >= deadline:
            raise AssertionError(f"{name}{labels} is {m.value(name, **labels)}, expected {expected}; series: "
                                 f"{m.series(name, function=labels.get('function', ''))}")
        time.sleep(0.1)


def live_instances(apusd, name):
    doc = apusd.api_json("GET", f"/v1/functions/{name}/instances")
    return [i for i in doc["instances"] if not any(s in str(i.get("state", "")).lower() for s in GONE_STATES)]


def ready_log_flags(apusd, name) -> list[str]:
    """prewarmed=true/false of each `instance ready` line apusd logged for this function."""
    lines = [line for line in apusd.log_path.read_text(errors="replace").splitlines()
             if "instance ready" in line and f"function={name} " in line]
    return [re.search(r"\bprewarmed=(\w+)", line).group(1) for line in lines]


@pytest.fixture(scope="module")
def metered(tmp_path_factory):
    """A daemon with a queue of 1 per version (so overload is easy to cause) and one prewarmed Python process."""
    daemon = Apusd(tmp_path_factory.mktemp("apusd-metrics"), extra_args=("--queue-length", "1", "--prewarm", "python3=1"))
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.teardown()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("metrics-functions")


@pytest.fixture(scope="module")
def hello(metered):
    metered.deploy(EXAMPLES_DIR / "hello-python")
    return "hello-python"


# ---- format and conventions ------------------------------------------------------------------------------------


def test_exposition_parses_and_follows_prometheus_conventions(metered, hello):
    for _ in range(2):
        assert metered.get(f"/{hello}/").status == 200
    m = wait_for_value(metered, "apus_requests_total", 2, function=hello, version=1, protocol="http", code=200)
    assert not m.problems, "\n".join(m.problems)
    assert m.samples, "no sample at all"

    # The families the daemon documents, with their types.
    for name, kind in EXPECTED_FAMILIES.items():
        assert m.types.get(name) == kind, f"{name}: TYPE {m.types.get(name)!r}, expected {kind} (types: {m.types})"
    for family, sample in m.order:
        assert family in m.types, f"sample {sample} has no TYPE line for its family {family}"
    # All lines of a family are together.
    seen, previous = set(), None
    for family, _ in m.order:
        if family != previous:
            assert family not in seen, f"the samples of {family} are not grouped together"
            seen.add(family)
            previous = family

    for name, kind in m.types.items():
        assert name.startswith("apus_"), name
        if kind == "counter":
            assert name.endswith("_total"), f"counter {name} does not end in _total"
        else:
            assert not name.endswith("_total"), f"{kind} {name} ends in _total (reserved for counters)"
        if "duration" in name or "latency" in name or "time" in name:
            assert name.endswith("_seconds"), f"{name}: durations are in seconds, named *_seconds"
    for (name, labels), value in m.samples.items():
        family = m.family_of(name)
        assert value >= 0 and not math.isnan(value), (name, labels, value)
        if m.types[family] == "counter" or name.endswith(("_bucket", "_count")):
            assert value == int(value), f"{name}{labels} counts {value}"

    # Histograms: increasing le bounds ending in +Inf, cumulative counts, +Inf bucket == _count, a _sum each.
    for family in (f for f, kind in m.types.items() if kind == "histogram"):
        groups: dict[tuple, list] = {}
        for (name, labels), value in m.samples.items():
            if name == family + "_bucket":
                le = dict(labels)["le"]
                rest = tuple(kv for kv in labels if kv[0] != "le")
                groups.setdefault(rest, []).append((float(le), value))
        assert groups, f"histogram {family} has no buckets"
        for rest, buckets in groups.items():
            buckets.sort()
            assert buckets[-1][0] == math.inf, f"{family}{rest}: no le=\"+Inf\" bucket"
            counts = [count for _, count in buckets]
            assert counts == sorted(counts), f"{family}{rest}: buckets are not cumulative: {buckets}"
            assert m.samples.get((family + "_count", rest)) == counts[-1], f"{family}{rest}: _count != +Inf bucket"
            assert (family + "_sum", rest) in m.samples, f"{family}{rest}: no _sum"


def test_every_family_has_a_help_line(metered, hello):
    """# HELP is what Prometheus and Grafana show for a metric: each family should have one."""
    assert metered.get(f"/{hello}/").status == 200
    m = scrape(metered)
    missing = sorted(set(m.types) - set(m.helps))
    assert not missing, f"families without a # HELP line: {missing}"
    assert all(m.helps[name].strip() for name in m.helps), m.helps


# ---- requests ---------------------------------------------------------------------------------------------------


def test_http_requests_are_counted_exactly_by_version_and_code(metered, scratch):
    """200, 204 and 500 (a raising handler) per version; the latency histogram counts every request; a 404 for an
    unknown function is counted under no function."""
    v1 = copy_function(FUNCTIONS_DIR / "shapes", scratch / "tally-v1", name="tally")
    v2 = copy_function(v1, scratch / "tally-v2", subs=[(r"^concurrency:.*$", "concurrency: 3")])
    metered.deploy(v1)
    metered.deploy(v2)  # released at 100%; version 1 stays reachable with X-Apus-Version
    plan = [("/tally/dict", {}, 200)] * 5 + [("/tally/raise", {}, 500)] * 2 + [("/tally/none", {}, 204)] \
        + [("/tally/dict", {"X-Apus-Version": "1"}, 200)] * 3
    for path, headers, status in plan:
        r = metered.get(path, headers=headers)
        assert r.status == status, (path, headers, r)
        assert r.header("X-Apus-Version") == headers.get("X-Apus-Version", "2"), r

    m = wait_for_value(metered, "apus_requests_total", 5, function="tally", version=2, protocol="http", code=200)
    assert m.value("apus_requests_total", function="tally", version=2, protocol="http", code=500) == 2
    assert m.value("apus_requests_total", function="tally", version=2, protocol="http", code=204) == 1
    assert m.value("apus_requests_total", function="tally", version=1, protocol="http", code=200) == 3
    assert m.total("apus_requests_total", function="tally") == len(plan), m.series("apus_requests_total", function="tally")
    assert m.value("apus_request_duration_seconds_count", function="tally", version=2) == 8
    assert m.value("apus_request_duration_seconds_count", function="tally", version=1) == 3
    assert 0 < m.value("apus_request_duration_seconds_sum", function="tally", version=2) < 8 * 30

    before = m.total("apus_requests_total")
    for _ in range(3):
        assert metered.get("/no-such-function-here/").status == 404
    time.sleep(0.3)
    after = scrape(metered)
    assert "no-such-function-here" not in after.text, "an unknown function got series of its own"
    assert after.total("apus_requests_total") == before, "a 404 for an unknown function was counted"


def test_http2_requests_to_http_functions_count_as_http(metered, hello, tmp_path):
    assert metered.get(f"/{hello}/").status == 200
    labels = dict(function=hello, version=1, protocol="http", code=200)
    time.sleep(0.2)
    before = scrape(metered).value("apus_requests_total", **labels)
    p = subprocess.run(["curl", "-sS", "--max-time", "20", "--http2-prior-knowledge", "-o", str(tmp_path / "body"),
                        "-w", "%{http_code} %{http_version}", f"{metered.gateway}/{hello}/?name=h2"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and p.stdout.strip() == "200 2", (p.stdout, p.stderr)
    m = wait_for_value(metered, "apus_requests_total", before + 1, **labels)
    protocols = {dict(labels)["protocol"] for _, labels in m.series("apus_requests_total", function=hello)}
    assert protocols == {"http"}, protocols


def test_grpc_calls_are_counted_by_grpc_status(metered):
    grpc = pytest.importorskip("grpc")
    from grpc_support import CALL_TIMEOUT, ECHO_FUNCTION, echo_stub, insecure_channel, req

    metered.deploy(EXAMPLES_DIR / ECHO_FUNCTION)
    channel = insecure_channel(metered)
    try:
        stub = echo_stub(channel)
        for i in range(3):
            assert stub.Get(req(text=f"ok{i}"), timeout=CALL_TIMEOUT).text == f"ok{i}"
        for code, count in ((grpc.StatusCode.INVALID_ARGUMENT, 2), (grpc.StatusCode.FAILED_PRECONDITION, 1)):
            for _ in range(count):
                with pytest.raises(grpc.RpcError) as err:
                    stub.Get(req(text="x", fail_code=code.value[0], fail_message="on purpose"), timeout=CALL_TIMEOUT)
                assert err.value.code() == code
        m = wait_for_value(metered, "apus_requests_total", 3, function=ECHO_FUNCTION, version=1, protocol="grpc", code="0")
        assert m.value("apus_requests_total", function=ECHO_FUNCTION, version=1, protocol="grpc", code="3") == 2
        assert m.value("apus_requests_total", function=ECHO_FUNCTION, version=1, protocol="grpc", code="9") == 1
        assert m.total("apus_requests_total", function=ECHO_FUNCTION) == 6, m.series("apus_requests_total", function=ECHO_FUNCTION)
        assert m.value("apus_request_duration_seconds_count", function=ECHO_FUNCTION, version=1) == 6

        # A call to a service no function owns is answered UNIMPLEMENTED by the gateway and counted nowhere.
        before = m.total("apus_requests_total")
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary("/no.such.Service/Call")(b"", timeout=CALL_TIMEOUT)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        time.sleep(0.3)
        after = scrape(metered)
        assert after.total("apus_requests_total") == before, "a call to an unknown service was counted"
        assert "no.such.Service" not in after.text
    finally:
        channel.close()


# ---- instances and cold starts ---------------------------------------------------------------------------------


def test_cold_starts_by_runtime_and_prewarmed_match_the_log(metered, hello, scratch):
    metered.deploy(write_headecho(scratch / "plain-command", name="plain-command"))
    assert metered.get("/plain-command/").status == 200
    assert metered.get(f"/{hello}/").status == 200
    m = wait_for_value(metered, "apus_cold_starts_total", 1, function="plain-command", runtime="command", prewarmed="false")
    assert not m.series("apus_cold_starts_total", function="plain-command", prewarmed="true")

    # Per function, the counter agrees with apusd's `instance ready ... prewarmed=` lines, label by label.
    functions = {dict(labels)["function"] for _, labels in m.series("apus_cold_starts_total")}
    assert {"plain-command", hello} <= functions, functions
    for function in functions:
        flags = ready_log_flags(metered, function)
        for prewarmed in ("true", "false"):
            counted = m.total("apus_cold_starts_total", function=function, prewarmed=prewarmed)
            assert counted == flags.count(prewarmed), (function, prewarmed, counted, flags)
    # With --prewarm python3=1 some Python instance came from the pool.
    assert m.total("apus_cold_starts_total", runtime="python3", prewarmed="true") >= 1, m.series("apus_cold_starts_total")
    # Each cold start is timed once, with a positive duration.
    for (name, labels), count in m.series("apus_cold_starts_total").items():
        labels = dict(labels)
        assert m.value("apus_cold_start_duration_seconds_count", **labels) == count, labels
        assert m.value("apus_cold_start_duration_seconds_sum", **labels) > 0, labels


@pytest.mark.timeout(60)
def test_instances_gauge_follows_the_pool(metered, scratch):
    fn = copy_function(FUNCTIONS_DIR / "warm", scratch / "gauged", name="gauged", subs=[(r"^scale:.*$", "scale: {min: 0, max: 2}")])
    metered.deploy(fn)
    assert metered.get("/gauged/").status == 200
    ready = [i for i in live_instances(metered, "gauged") if i["state"] == "ready"]
    assert len(ready) == 1, ready
    m = wait_for_value(metered, "apus_instances", 1, function="gauged", version=1, state="ready")
    assert m.value("apus_instances", function="gauged", version=1, state="starting") == 0
    assert m.value("apus_instances", function="gauged", version=1, state="draining") == 0
    assert m.value("apus_requests_in_flight", function="gauged", version=1) == 0
    assert m.value("apus_queue_depth", function="gauged", version=1) == 0
    # Idle (3 s) and no minimum: the instance goes, and the gauge with it.
    deadline = time.monotonic() + 30
    while live_instances(metered, "gauged"):
        assert time.monotonic() < deadline, "the idle instance was never stopped"
        time.sleep(0.3)
    wait_for_value(metered, "apus_instances", 0, function="gauged", version=1, state="ready")


# ---- load: queue, in flight, rejections, autoscaler ------------------------------------------------------------


@pytest.mark.timeout(60)
def test_full_queue_rejections_queue_depth_and_scaler_metrics(metered, scratch):
    """One slot and a queue of 1: of 6 simultaneous 1 s requests, 2 are served and the rest are refused 429; each
    refusal is counted as `overloaded`, and while the burst lasts the gauges show 1 in flight and 1 queued."""
    fn = copy_function(FUNCTIONS_DIR / "sleeper", scratch / "narrow", name="narrow",
                       subs=[(r"^timeout:.*$", "timeout: 10s\nconcurrency: 1\nscale: {min: 0, max: 1}")])
    metered.deploy(fn)
    assert metered.get("/narrow/?sleep=0").status == 200  # instance up
    statuses = []
    lock = threading.Lock()
    barrier = threading.Barrier(6)

    def call():
        barrier.wait(10)
        r = metered.get("/narrow/?sleep=1", timeout=30)
        with lock:
            statuses.append(r.status)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    seen_busy = False
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline and not seen_busy:
        m = scrape(metered)
        seen_busy = (m.value("apus_requests_in_flight", function="narrow", version=1) == 1
                     and m.value("apus_queue_depth", function="narrow", version=1) == 1)
        time.sleep(0.05)
    for t in threads:
        t.join(30)
    assert sorted(set(statuses)) == [200, 429] and len(statuses) == 6, statuses
    refused, served = statuses.count(429), statuses.count(200)
    assert seen_busy, "never saw apus_requests_in_flight 1 and apus_queue_depth 1 during the burst"

    m = wait_for_value(metered, "apus_requests_total", 1 + served, function="narrow", version=1, protocol="http", code=200)
    assert m.value("apus_requests_total", function="narrow", version=1, protocol="http", code=429) == refused
    assert m.value("apus_requests_rejected_total", function="narrow", version=1, reason="overloaded") == refused
    assert m.total("apus_requests_rejected_total", function="narrow") == refused, m.series("apus_requests_rejected_total")
    assert m.value("apus_request_duration_seconds_count", function="narrow", version=1) == 7
    m = wait_for_value(metered, "apus_queue_depth", 0, function="narrow", version=1)
    assert m.value("apus_requests_in_flight", function="narrow", version=1) == 0

    # The autoscaler has decided for this version: it wanted an instance, and said whether it panicked.
    deadline = time.monotonic() + 5
    while m.total("apus_scaler_decisions_total", function="narrow") < 1:
        assert time.monotonic() < deadline, m.series("apus_scaler_decisions_total", function="narrow")
        time.sleep(0.2)
        m = scrape(metered)
    directions = {dict(labels)["direction"] for _, labels in m.series("apus_scaler_decisions_total", function="narrow")}
    assert directions == {"up", "down", "hold"}, directions
    assert m.value("apus_scaler_decisions_total", function="narrow", version=1, direction="up") >= 1
    assert m.value("apus_scaler_desired_instances", function="narrow", version=1) >= 1
    assert m.value("apus_scaler_panicking", function="narrow", version=1) in (0, 1)
