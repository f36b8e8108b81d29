"""monitor.exposition against prometheus_client, the oracle: the same data, the same bytes.

Every family here is rendered twice: by our renderer, and by prometheus_client from
prometheus_client families built from the same data (fakes.to_prometheus), in the text
format and in OpenMetrics, under every name-escaping scheme a scraper can ask for.
"""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Callable, Iterator, Sequence

import pytest
from prometheus_client import generate_latest
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.utils import floatToGoString

from monitor.exposition import (
    CounterFamily,
    DuplicateSeriesError,
    Family,
    GaugeFamily,
    HistogramFamily,
    Registry,
    RenderCache,
    render,
)
from monitor.identity import HostVeth, IdentityIndex, PodMeta, PodNetwork, fold, identify
from monitor.kernel.records import ProgramStats
from monitor.probes import REGISTRY, dns, drops, handshake, packets, retransmits, rtt, tcpflags
from monitor.probes.base import LE
from monitor.promtext import ALLOW_UTF8, DOTS, UNDERSCORES, VALUES, go_float, sample_value
from monitor.scrapeformat import (
    CONTENT_TYPE_TEXT,
    CONTENT_TYPE_TEXT_1,
    OPENMETRICS,
    OPENMETRICS_VERSIONS,
    TEXT,
    Format,
    negotiate,
)
from monitor.state import InterfaceStatus, MonitorState, PodStatus, Snapshot
from tests.unit.fakes import DictMaps, kernel, registry_of, u32, u64
from tests.unit.test_collector import DaemonCollectors

ESCAPINGS = (UNDERSCORES, ALLOW_UTF8, DOTS, VALUES)
# Every format the negotiation can end in, with prometheus_client's encoder for it
FORMATS = [(Format(False, e, ""), lambda r, e=e: generate_latest(r, escaping=e)) for e in ESCAPINGS] + [
    (Format(True, e, ""), lambda r, e=e: openmetrics_latest(r, escaping=e)) for e in ESCAPINGS]


def same_bytes(families: Callable[[], Sequence[Family]]) -> None:
    """Ours and prometheus_client's exposition of the same families, in every format."""
    registry = registry_of(families)
    for fmt, encoder in FORMATS:
        assert render(families(), fmt) == encoder(registry), fmt


# -- numbers ------------------------------------------------------------------------------------

SPECIAL = [0, 0.0, -0.0, 1, -1, 0.5, 1e-7, 1.5e-5, 123.456, 999_999, 1_000_000, 1_000_001,
           999_999.5, 1_234_567, 12_345_678.9, 10**15 - 1, 10**15, 10**16, 2**53 + 1, 2**63,
           2**64 - 1, 1e16, 1.5e16, 1e21, 1e300, -1_234_567, -(10**15), -(10**17), 67.108864,
           2.5e-324, math.inf, -math.inf, math.nan, True, False]


@pytest.mark.parametrize("value", SPECIAL)
def test_numbers_as_prometheus_client_writes_them(value: float) -> None:
    assert go_float(value) == floatToGoString(value)
    assert sample_value(value) == floatToGoString(value)


def test_random_numbers_as_prometheus_client_writes_them() -> None:
    rnd = random.Random(7)
    ints = [rnd.randrange(10 ** rnd.randrange(1, 21)) for _ in range(3000)]
    floats = [rnd.uniform(0, 10 ** rnd.randrange(-8, 25)) for _ in range(3000)]
    floats += [struct.unpack("d", rnd.randbytes(8))[0] for _ in range(3000)]  # any bit pattern
    for value in ints + [-n for n in ints] + floats:
        assert sample_value(value) == floatToGoString(value), value
        assert go_float(value) == floatToGoString(value), value


# -- families -----------------------------------------------------------------------------------

def test_counters_and_gauges() -> None:
    def families() -> list[Family]:
        plain = CounterFamily("unit_events_total", "Events, as a plain counter.")
        plain.add((), 3)
        labelled = CounterFamily("unit_bytes", "Bytes by pod and direction.",
                                 ["pod", "namespace", "direction"])  # written sorted: d, n, p
        for i, value in enumerate([0, 7, 999_999, 1_000_000, 2**64 - 1, 0.25, 1e21]):
            labelled.add((f"web-{i}", "shop", "egress" if i % 2 else "ingress"), value)
        gauge = GaugeFamily("unit_up", "1 while up.", ["zone"])
        gauge.add(("a",), 1)
        gauge.add(("b",), 0.5)
        gauge.add(("c",), -3)
        empty = GaugeFamily("unit_nothing", "A family with no series has its header only.",
                            ["pod"])
        return [plain, labelled, gauge, empty]

    same_bytes(families)


def test_escaping_of_values_and_help() -> None:
    def families() -> list[Family]:
        tricky = ['back\\slash', 'a "quoted" word', "two\nlines", "all \\ \" \n three",
                  "ünïcode ✓", "", "%s %d %%", "trailing\\"]
        counter = CounterFamily("unit_odd", 'HELP with \\ and "quotes"\nand a newline.',
                                ["value", "pod"])
        for i, value in enumerate(tricky):
            counter.add((value, f"p{i}"), i)
        hist = HistogramFamily("unit_odd_seconds", "HELP: 100% \\ \"x\"", ["pod"], LE)
        for i, value in enumerate(tricky):
            hist.add((value,), [i] * len(LE), i / 3)
        return [counter, hist]

    same_bytes(families)


@pytest.mark.parametrize("labels", [
    [], ["pod"], ["namespace", "pod"], ["namespace", "pod", "role"], ["app"], ["a", "zone"],
    ["zone", "a", "kind"], ["label_app_kubernetes_io_name", "lf", "lz"],
])
def test_histograms_with_le_anywhere_among_the_labels(labels: list[str]) -> None:
    rnd = random.Random(len(labels))
    data = [(tuple(f"{name}-{i}" for name in labels),
             [rnd.randrange(3) * rnd.randrange(10 ** rnd.randrange(1, 8)) for _ in LE],
             rnd.uniform(0, 1e7)) for i in range(4 if labels else 1)]

    def families() -> list[Family]:
        hist = HistogramFamily("unit_latency_seconds", "Latency.", labels, LE)
        for values, counts, sum_value in data:
            hist.add(values, counts, sum_value)
        return [hist]

    same_bytes(families)


def test_histogram_with_other_bounds() -> None:
    def families() -> list[Family]:
        hist = HistogramFamily("unit_size_bytes", "Sizes.", ["pod"], ["0", "0.5", "1e+06", "+Inf"])
        hist.add(("a",), [1, 0, 2, 3], 7)
        hist.add(("b",), [0, 0, 0, 0], 0)
        return [hist]

    same_bytes(families)


def test_names_with_colons_under_every_escaping() -> None:
    # legacy metric names may hold ':'; prometheus_client's OpenMetrics writer escapes it
    # in sample names (not on HELP/TYPE lines): we do as it does
    def families() -> list[Family]:
        counter = CounterFamily("unit:requests", "Recorded-rule style name.", ["code"])
        counter.add(("200",), 5)
        hist = HistogramFamily("unit:latency_seconds", "Also with a colon.", ["code"], LE)
        hist.add(("200",), list(range(len(LE))), 1.5)
        return [counter, hist]

    same_bytes(families)


def test_text_and_openmetrics_headers() -> None:
    counter = CounterFamily("unit_events", "Events.", ["pod"])
    counter.add(("web",), 2)
    assert render([counter], TEXT) == (b"# HELP unit_events_total Events.\n"
                                       b"# TYPE unit_events_total counter\n"
                                       b'unit_events_total{pod="web"} 2.0\n')
    assert render([counter], OPENMETRICS) == (b"# HELP unit_events Events.\n"
                                              b"# TYPE unit_events counter\n"
                                              b'unit_events_total{pod="web"} 2.0\n# EOF\n')
    assert render([], OPENMETRICS) == b"# EOF\n"
    assert render([], TEXT) == b""


@pytest.mark.parametrize(("build", "error"), [
    (lambda: CounterFamily("bad name", "x"), "invalid metric name"),
    (lambda: CounterFamily("unit", "x", ["bad-label"]), "invalid label name"),
    (lambda: CounterFamily("unit", "x", ["__reserved"]), "invalid label name"),
    (lambda: GaugeFamily("unit", "x", ["pod", "pod"]), "twice"),
    (lambda: HistogramFamily("unit", "x", ["le"], LE), "le is the bucket label"),
    (lambda: HistogramFamily("unit", "x", [], ["1", "2"]), "must be \\+Inf"),
    (lambda: HistogramFamily("unit", "x", [], ["-1", "+Inf"]), "negative"),
])
def test_invalid_families_are_refused(build: Callable[[], Family], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        build()


def test_series_must_match_the_labels() -> None:
    with pytest.raises(ValueError, match="values"):
        CounterFamily("unit", "x", ["pod"]).add(("a", "b"), 1)
    with pytest.raises(ValueError, match="buckets"):
        HistogramFamily("unit", "x", ["pod"], LE).add(("a",), [1, 2], 0.0)


# -- negotiation --------------------------------------------------------------------------------

ACCEPTS = [
    "", "*/*", "text/plain", "text/plain;version=0.0.4", "application/json",
    # Prometheus 2.x, and 3.x (which asks for UTF-8 names)
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,application/"
    "openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,"
    "text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
    "application/openmetrics-text", "application/openmetrics-text; version=1.0.0",
    "application/openmetrics-text;version=0.0.1", "application/openmetrics-text;version=0.0.1,text/plain",
    "application/openmetrics-text;version=2.0.0;escaping=values",
    "application/openmetrics-text; version=1.0.0; escaping=dots",
    "application/openmetrics-text;version=1.0.0;escaping=bogus",
    "application/openmetrics-text;escaping=allow-utf-8", "text/plain;version=1.0.0",
    "text/plain;version=1.0.0;escaping=underscores", "text/plain;escaping=dots",
    "text/plain;version=0.0.4,application/openmetrics-text;version=1.0.0",
    " application/openmetrics-text ; version=1.0.0",
    "application/openmetrics-text;version=1.0.0 ;escaping=dots ",
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8\r\n X-Injected: yes",
]


def test_cached_histograms_are_what_prometheus_client_writes() -> None:
    """Scrape after scrape through one cache, series unchanged, moved, gone and new: each
    body is prometheus_client's for the same data, in every format."""
    rnd = random.Random(7)
    pods = {f"pod-{i}": ([0] * len(LE), 0.0) for i in range(8)}
    cache = RenderCache()
    for scrape in range(12):
        for name in rnd.sample(sorted(pods), 3):  # a few series move
            counts, total = pods[name]
            bucket = rnd.randrange(len(LE))
            pods[name] = ([c + (i == bucket) for i, c in enumerate(counts)], total + rnd.random())
        if scrape % 4 == 3:  # one goes and another comes
            del pods[sorted(pods)[0]]
            pods[f"pod-new-{scrape}"] = ([rnd.randrange(3) for _ in LE], 1.5)

        def families() -> list[Family]:
            fam = HistogramFamily("unit_seconds", "Doc.", ["pod", "zone"], LE)
            for name, (counts, total) in sorted(pods.items()):
                fam.add((name, "z"), list(counts), total)
            return [fam]

        oracle = registry_of(families)
        for fmt, encoder in FORMATS:
            assert render(families(), fmt, cache) == encoder(oracle), (scrape, fmt)


def test_render_cache_reuses_unchanged_series_only() -> None:
    fam = HistogramFamily("unit_seconds", "Doc.", ["pod"], ("1.0", "+Inf"))
    fam.add(("a",), [1, 0], 0.5)
    cache = RenderCache()
    render([fam], TEXT, cache)
    old, _ = cache.take(fam, TEXT)
    assert set(old) == {("a",)}
    # a series whose numbers match is written from the cache: a stale entry would show
    old[("a",)] = ([1, 0], 0.5, "CACHED\n")
    cache._families[("unit_seconds", ("pod",), ("1.0", "+Inf"), TEXT)] = old
    assert render([fam], TEXT, cache).endswith(b"CACHED\n")
    moved = HistogramFamily("unit_seconds", "Doc.", ["pod"], ("1.0", "+Inf"))
    moved.add(("a",), [1, 1], 0.5)
    assert b"CACHED" not in render([moved], TEXT, cache)


@pytest.fixture(scope="module")
def pod_families() -> Callable[[], list[Family]]:
    """Every family podnetmon writes, over a few pods (see collector_over below)."""
    collector = collector_over(npods=6, seed=3)
    snapshot = list(collector.collect())
    return lambda: snapshot


@pytest.mark.parametrize("accept", ACCEPTS)
def test_negotiation_is_choose_encoders(accept: str, pod_families: Callable[[], list[Family]]) -> None:
    encoder, content_type = choose_encoder(accept)
    fmt = negotiate(accept)
    assert fmt.content_type == content_type
    assert render(pod_families(), fmt) == encoder(registry_of(pod_families))


OM_1 = "application/openmetrics-text; version=1.0.0; charset=utf-8; escaping="


# What choose_encoder echoes into Content-Type as the client wrote it, whatever it is, as
# long as it compares >= (1, 0, 0); only the versions it writes are answered here, and the
# rest of the header decides (an OpenMetrics entry of another version is passed over).
@pytest.mark.parametrize(("accept", "content_type"), [
    ("application/openmetrics-text;version=1.0.0.\r\n X-Injected: yes", CONTENT_TYPE_TEXT),
    ("application/openmetrics-text;version=1.5.<script>alert(1)</script>", CONTENT_TYPE_TEXT),
    ("application/openmetrics-text;version=2.evil;escaping=dots", CONTENT_TYPE_TEXT),
    ("application/openmetrics-text;version=9", CONTENT_TYPE_TEXT),
    ("application/openmetrics-text;version=1.1.0", CONTENT_TYPE_TEXT),
    ("application/openmetrics-text;version=1.0.0.0", CONTENT_TYPE_TEXT),
    ("application/openmetrics-text;version=1.0.0\rX-Injected: yes", CONTENT_TYPE_TEXT),
    ('application/openmetrics-text;version="1.0.0"', CONTENT_TYPE_TEXT),
    ("application/openmetrics-text;version=1.5.x,text/plain;version=1.0.0;escaping=values",
     CONTENT_TYPE_TEXT_1 + "; escaping=values"),
    ("application/openmetrics-text;version=7.0.0,application/openmetrics-text;version=1.0.0",
     OM_1 + "underscores"),
    ("application/openmetrics-text;version= 1.0.0", OM_1 + "underscores"),  # as 1.0.0, spaces aside
    ("application/openmetrics-text;version=1.0.0;escaping=dots\r\n X-Injected: yes",
     OM_1 + "underscores"),
])
def test_only_known_versions_and_escapings_reach_the_content_type(
        accept: str, content_type: str, pod_families: Callable[[], list[Family]]) -> None:
    fmt = negotiate(accept)
    assert fmt.content_type == content_type
    assert "\r" not in fmt.content_type and "\n" not in fmt.content_type
    # the body is what prometheus_client writes for the format answered
    _encoder, theirs = choose_encoder(content_type.replace("; charset=utf-8", ""))
    assert theirs == content_type
    assert render(pod_families(), fmt) == _encoder(registry_of(pod_families))


def test_every_content_type_is_a_known_one() -> None:
    """Whatever the Accept header, Content-Type is one of a short list: nothing of the
    client's reaches it but a choice among known values."""
    known = {CONTENT_TYPE_TEXT, OPENMETRICS.content_type} | {
        f"application/openmetrics-text; version={v}; charset=utf-8; escaping={e}"
        for v in OPENMETRICS_VERSIONS for e in ("allow-utf-8", "underscores", "dots", "values")} | {
        f"{CONTENT_TYPE_TEXT_1}; escaping={e}" for e in ("allow-utf-8", "underscores", "dots", "values")}
    rnd = random.Random(12)
    pieces = ["application/openmetrics-text", "text/plain", "*/*", "version=1.0.0", "version=2.0.0",
              "version=0.0.4", "version=1.", "version=1.0.0.\r\n X: y", "escaping=dots",
              "escaping=allow-utf-8", "escaping=\r\nX: y", "q=0.5", "version= 2.0.0 ", " ", "=",
              "version=1.0.0;version=3", "charset=utf-8", "version=10.0.0"]
    for _ in range(3000):
        entries = [";".join(rnd.choice(pieces) for _ in range(rnd.randrange(1, 4)))
                   for _ in range(rnd.randrange(1, 4))]
        accept = ",".join(entries)
        assert negotiate(accept).content_type in known, accept


@pytest.mark.parametrize("accept", ["application/openmetrics-text;version=1.0.x",
                                    "text/plain;version=one"])
def test_a_version_that_is_not_a_number_gets_the_text_format(accept: str) -> None:
    # prometheus_client compares (1, 0, 'x') with (1, 0, 0) and raises TypeError (the
    # scrape would fail); that entry of the header is passed over instead
    with pytest.raises(TypeError):
        choose_encoder(accept)
    assert negotiate(accept) == TEXT


# -- the whole collector ------------------------------------------------------------------------

def collector_over(npods: int, seed: int, **kwargs: object) -> DaemonCollectors:
    """The daemon's collectors with every probe over fake maps: npods pods, some with two
    interfaces, one folded into _overflow, random counters and histograms."""
    rnd = random.Random(seed)
    maps: dict[str, dict[bytes, bytes]] = {}
    pods, slots = [], {}

    def put(name: str, key: bytes, value: bytes) -> None:
        maps.setdefault(name, {})[key] = value

    def words(kind: type, **arrays: list[int]) -> bytes:
        """A struct value with the given u64 arrays filled in (the rest: rnd's)."""
        value = kind()
        for field, numbers in arrays.items():
            getattr(value, field)[:] = numbers
        value.sum_us = rnd.randrange(10**9)
        return bytes(value)

    for i in range(npods):
        netns, ifindexes = 4026532000 + i, [10 + 2 * i] + ([11 + 2 * i] if i % 3 == 0 else [])
        meta = PodMeta(f"ns-{i % 2}", f"pod-{i}", uid=f"uid-{i}", labels=(("app", f'a"{i}'),),
                       workload="w", workload_kind="Deployment")
        pod = identify(PodNetwork(netns, f"/proc/{i}/ns/net"),
                       [HostVeth(x, f"veth{x}") for x in ifindexes], meta)
        pods.append(fold(pod) if i == npods - 1 else pod)
        for x in ifindexes:
            slot = rnd.randrange(1000)
            while slot in slots.values():
                slot = rnd.randrange(1000)
            slots[x] = slot
            key = u32(slot)
            c = packets.Counts()
            for d in range(2):
                c.tcp_segments[d] = rnd.randrange(10**7)
                for p in range(4):
                    c.packets[d][p], c.bytes[d][p] = rnd.randrange(10**7), rnd.randrange(10**13)
            put(packets.MAP, key, bytes(c))
            put(tcpflags.MAP, key, struct.pack("=8Q", *(rnd.randrange(99) for _ in range(8))))
            h = handshake.Handshake()
            for r in range(2):
                for b in range(28):
                    h.buckets[r][b] = rnd.randrange(4) * rnd.randrange(10**rnd.randrange(1, 7))
                h.sum_us[r], h.resets[r] = rnd.randrange(10**10), rnd.randrange(9)
            put(handshake.MAP, key, bytes(h))
            put(handshake.TIMEOUTS, key, struct.pack("=2Q", rnd.randrange(5), rnd.randrange(5)))
            put(dns.MAP, key, words(dns.Dns, buckets=[rnd.randrange(50) for _ in range(28)],
                                    rcodes=[rnd.randrange(3) for _ in range(16)]))
            put(dns.TIMEOUTS, key, u64(rnd.randrange(9)))
            put(retransmits.MAP, key, u64(rnd.randrange(10**6)))
            put(rtt.MAP, key, words(rtt.Hist, buckets=[rnd.randrange(50) for _ in range(28)]))
        put(drops.MAP, bytes(drops.DropKey(id=netns, reason=3, kind=1)), u64(rnd.randrange(99)))
    put(drops.MAP, bytes(drops.DropKey(id=0, reason=2, kind=0)), u64(5))
    put(drops.LOST, u32(0), u64(1))
    put(retransmits.MAP, u32(1024), u64(3))
    state = MonitorState()
    state.publish(Snapshot(IdentityIndex(pods, slots), tuple(
        PodStatus(p, tuple(InterfaceStatus(v, "tc", 1.0, "") for v in p.interfaces))
        for p in pods)))
    state.count_reconcile(0.1)
    state.count_lost("capture", 2)
    return DaemonCollectors(
        probes=list(REGISTRY.values()), maps=DictMaps(maps), state=state, node="node-1",
        kernel=kernel(drop_reasons={2: "NOT_SPECIFIED", 3: "NO_SOCKET"}), node_slot=1024,
        program_stats=lambda: [ProgramStats("pnm_tc_ingress", 1, 1_234_567_891, 42)],
        bcc_version="0.26.0", pod_labels=["app"],
        api_stats=lambda: {"synced": 1.0, "list": 1, "watch": 3},
        bypassed=lambda: {("ns-0", "pod-0"): "tc_filter_first"},
        redirected=lambda: {("ns-0", "pod-0"): [3, 252]}, **kwargs)


@pytest.mark.parametrize("seed", [1, 2])
def test_every_family_of_a_scrape_is_prometheus_clients(seed: int) -> None:
    collector = collector_over(npods=12, seed=seed)
    families = list(collector.collect())
    assert {f.name for f in families} >= {"podnet_packets", "podnet_tcp_handshake_seconds",
                                         "podnet_dns_latency_seconds", "podnet_tcp_rtt_seconds",
                                         "podnet_drops", "podnet_pod_info"}
    same_bytes(lambda: families)


# -- the registry -------------------------------------------------------------------------------

class Fixed:
    def __init__(self, *names: str) -> None:
        self.names, self.collected = names, 0

    def describe(self) -> Iterator[Family]:
        yield from (CounterFamily(n, "Doc.") for n in self.names)

    def collect(self) -> Iterator[Family]:
        self.collected += 1
        for name in self.names:
            family = CounterFamily(name, "Doc.")
            family.add((), self.collected)
            yield family


def test_registry_renders_collectors_in_order() -> None:
    registry = Registry()
    registry.register(Fixed("unit_a"))
    registry.register(Fixed("unit_b", "unit_c"))
    text = registry.render(TEXT).decode()
    assert [line.split()[0] for line in text.splitlines() if not line.startswith("#")] == [
        "unit_a_total", "unit_b_total", "unit_c_total"]


@pytest.mark.parametrize(("first", "second"), [
    ("unit_a", "unit_a"), ("unit_a", "unit_a_total"), ("unit_a_total", "unit_a")])
def test_registry_refuses_series_names_twice(first: str, second: str) -> None:
    registry = Registry()
    registry.register(Fixed(first))
    with pytest.raises(DuplicateSeriesError):
        registry.register(Fixed(second))
    registry.register(Fixed("unit_b"))  # nothing of the refused one stayed


def test_scrape_counters_count_finished_scrapes() -> None:
    registry = Registry()
    collector = collector_over(npods=2, seed=5, scrape_stats=registry.scrape_stats)
    registry.register(collector)
    assert registry.scrape_stats() == (0, 0.0)

    def scrape() -> dict[str, float]:
        text = registry.render(OPENMETRICS).decode()
        return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                if line.startswith("podnet_monitor_scrape")}

    first = scrape()
    assert first == {"podnet_monitor_scrapes_total": 0, "podnet_monitor_scrape_seconds_total": 0}
    second = scrape()
    assert second["podnet_monitor_scrapes_total"] == 1  # the first scrape, done
    assert second["podnet_monitor_scrape_seconds_total"] > 0
    count, seconds = registry.scrape_stats()
    assert count == 2
    assert seconds > second["podnet_monitor_scrape_seconds_total"]
