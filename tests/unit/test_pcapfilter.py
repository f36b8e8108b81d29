"""monitor.traces.pcapfilter against the real tcpdump, on a corpus of frames built with scapy.

The oracle is tcpdump itself (Debian's, on the same libpcap): each corpus
frame gets its index as timestamp, `tcpdump -r corpus.pcap -w - EXPR` says
which frames it keeps, and PacketFilter must keep exactly those. The
prefilter is checked against a model of the kernel's rule (bpf/trace.c,
trace_prefilter, over the fields bpf/tc_packet.h parses), written here from
scapy's parse of each frame, independently of monitor/pcapfilter.py.
"""

from __future__ import annotations

import ipaddress
import shutil
import struct
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    ICMPv6ND_NS,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.layers.sctp import SCTP
from scapy.packet import Packet, Raw

from monitor.traces.pcapfilter import FilterError, PacketFilter, Prefilter, prefilter

TCPDUMP = shutil.which("tcpdump")
needs_tcpdump = pytest.mark.skipif(TCPDUMP is None, reason="tcpdump is not installed")

POD_MAC, PEER_MAC, BCAST = "02:00:00:00:00:01", "02:00:00:00:00:02", "ff:ff:ff:ff:ff:ff"


def eth(dst: str = PEER_MAC) -> Ether:
    return Ether(src=POD_MAC, dst=dst)


@dataclass(frozen=True)
class Frame:
    """A frame as the kernel saw it (whole) and the bytes it copied (caplen of them)."""

    name: str
    whole: bytes
    caplen: int

    @property
    def data(self) -> bytes:
        return self.whole[: self.caplen]

    @property
    def length(self) -> int:
        return len(self.whole)


def _corpus() -> list[Frame]:
    frames: list[tuple[str, Packet | bytes, int | None]] = []

    def add(name: str, pkt: Packet | bytes, caplen: int | None = None) -> None:
        frames.append((name, pkt, caplen))

    # IPv4
    add("tcp4 syn 10.0.0.1:40000 > 10.0.0.2:80",
        eth() / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=40000, dport=80, flags="S"))
    add("tcp4 synack 10.0.0.2:80 > 10.0.0.1:40000",
        eth() / IP(src="10.0.0.2", dst="10.0.0.1") / TCP(sport=80, dport=40000, flags="SA"))
    add("tcp4 10.0.0.3:443 > 10.0.0.4:51000 data",
        eth() / IP(src="10.0.0.3", dst="10.0.0.4") / TCP(sport=443, dport=51000, flags="PA") / (b"x" * 200))
    add("tcp4 with IP options, 10.0.0.1:40001 > 10.0.0.9:80",
        eth() / IP(src="10.0.0.1", dst="10.0.0.9", options=b"\x01\x01\x01\x00") / TCP(sport=40001, dport=80))
    add("udp4 dns 10.0.0.1:53000 > 10.96.0.10:53",
        eth() / IP(src="10.0.0.1", dst="10.96.0.10") / UDP(sport=53000, dport=53) / (b"q" * 30))
    add("udp4 10.0.0.5:8080 > 10.0.0.1:80",
        eth() / IP(src="10.0.0.5", dst="10.0.0.1") / UDP(sport=8080, dport=80))
    add("sctp4 10.0.0.7:80 > 10.0.0.8:5000",
        eth() / IP(src="10.0.0.7", dst="10.0.0.8") / SCTP(sport=80, dport=5000))
    add("icmp4 echo 10.0.0.1 > 10.0.0.2",
        eth() / IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(type=8, id=1, seq=1) / (b"p" * 56))
    add("icmp4 unreachable quoting tcp 10.0.0.2:80",
        eth() / IP(src="10.0.0.9", dst="10.0.0.2") / ICMP(type=3, code=3)
        / IP(src="10.0.0.2", dst="10.0.0.4") / TCP(sport=80, dport=51000))
    add("ip4 ihl=4 (malformed), proto tcp",
        eth() / IP(src="10.0.0.1", dst="10.0.0.2", ihl=4, proto=6) / Raw(b"\x00\x50" * 20))
    add("ip4 proto 47 (gre) 10.0.0.1 > 10.0.0.2",
        eth() / IP(src="10.0.0.1", dst="10.0.0.2", proto=47) / Raw(b"\x00\x00\x08\x00" + b"g" * 20))
    # Fragments: the payload is \x00\x50 repeated, so the bytes of a non-first
    # fragment where a port would be read say 80.
    tcp_frags = fragment(IP(src="10.0.0.1", dst="10.0.0.2", id=7) / TCP(sport=40000, dport=80)
                         / (b"\x00\x50" * 300), fragsize=256)
    add("tcp4 first fragment 10.0.0.1:40000 > 10.0.0.2:80", eth() / tcp_frags[0])
    add("tcp4 non-first fragment 10.0.0.1 > 10.0.0.2", eth() / tcp_frags[1])
    udp_frags = fragment(IP(src="10.0.0.1", dst="10.96.0.10", id=8) / UDP(sport=53000, dport=53)
                         / (b"\x00\x35" * 300), fragsize=256)
    add("udp4 non-first fragment 10.0.0.1 > 10.96.0.10", eth() / udp_frags[2])
    # IPv6
    add("tcp6 [2001:db8::1]:40000 > [2001:db8::2]:80",
        eth() / IPv6(src="2001:db8::1", dst="2001:db8::2") / TCP(sport=40000, dport=80, flags="S"))
    add("udp6 [2001:db8::2]:53 > [2001:db8::1]:33000",
        eth() / IPv6(src="2001:db8::2", dst="2001:db8::1") / UDP(sport=53, dport=33000) / (b"a" * 40))
    add("icmp6 echo fd00::1 > fd00::2",
        eth() / IPv6(src="fd00::1", dst="fd00::2") / ICMPv6EchoRequest(id=1, seq=1))
    add("icmp6 neighbour solicitation fd00::1 > ff02::1:ff00:2",
        eth("33:33:ff:00:00:02") / IPv6(src="fd00::1", dst="ff02::1:ff00:2") / ICMPv6ND_NS(tgt="fd00::2"))
    add("tcp6 after hop-by-hop, [2001:db8::1]:40000 > [2001:db8::2]:80",
        eth() / IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrHopByHop()
        / TCP(sport=40000, dport=80))
    add("udp6 after destination options and routing, :53",
        eth() / IPv6(src="2001:db8::2", dst="2001:db8::1") / IPv6ExtHdrDestOpt()
        / IPv6ExtHdrRouting() / UDP(sport=53, dport=33001))
    add("tcp6 first fragment [2001:db8::1]:40000 > [2001:db8::2]:80",
        eth() / IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrFragment(offset=0, m=1, id=9)
        / TCP(sport=40000, dport=80) / (b"\x00\x50" * 20))
    add("udp6 non-first fragment [2001:db8::2] > [2001:db8::1]",
        eth() / IPv6(src="2001:db8::2", dst="2001:db8::1") / IPv6ExtHdrFragment(offset=32, m=0, id=10, nh=17)
        / Raw(b"\x00\x35\x00\x50" * 8))
    add("icmp6 non-first fragment fd00::1 > fd00::2",
        eth() / IPv6(src="fd00::1", dst="fd00::2") / IPv6ExtHdrFragment(offset=8, m=0, id=11, nh=58)
        / Raw(b"\x80\x00" * 8))
    # VLAN-tagged
    add("vlan 10 tcp4 10.0.0.1:40000 > 10.0.0.2:80",
        eth() / Dot1Q(vlan=10) / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=40000, dport=80))
    add("vlan 20 udp6 [2001:db8::2]:53 > [2001:db8::1]:33000",
        eth() / Dot1Q(vlan=20) / IPv6(src="2001:db8::2", dst="2001:db8::1") / UDP(sport=53, dport=33000))
    # ARP and other non-IP
    add("arp who-has 10.0.0.2 tell 10.0.0.1",
        eth(BCAST) / ARP(op=1, hwsrc=POD_MAC, psrc="10.0.0.1", pdst="10.0.0.2"))
    add("arp reply 10.0.0.2 is-at",
        eth() / ARP(op=2, hwsrc=PEER_MAC, psrc="10.0.0.2", hwdst=POD_MAC, pdst="10.0.0.1"))
    add("lldp-like ethertype 0x88cc", eth("01:80:c2:00:00:0e") / Raw(b"\x88\xcc" + b"\x02\x07" + b"l" * 40))
    # Truncated copies (caplen < length): the kernel saw the whole frame.
    add("tcp4 :80 cut inside the tcp header (36 of 54 bytes)",
        eth() / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=40000, dport=80), caplen=36)
    add("tcp4 1400-byte payload, 96 bytes copied",
        eth() / IP(src="10.0.0.2", dst="10.0.0.1") / TCP(sport=80, dport=40000) / (b"d" * 1400), caplen=96)
    add("tcp6 cut inside the source address (30 bytes)",
        eth() / IPv6(src="2001:db8::1", dst="2001:db8::2") / TCP(sport=40000, dport=80), caplen=30)
    add("frame cut at 12 bytes (no ethertype)",
        eth() / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2), caplen=12)
    add("empty copy of a tcp4 frame",
        eth() / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=40000, dport=80), caplen=0)
    out = []
    for name, pkt, caplen in frames:
        whole = pkt if isinstance(pkt, bytes) else bytes(pkt)
        out.append(Frame(name, whole, len(whole) if caplen is None else caplen))
    return out


CORPUS = _corpus()

# Valid expressions: PacketFilter must agree with tcpdump on every frame, and the
# prefilter of each must let through every frame tcpdump keeps.
EXPRESSIONS = [
    "", "tcp", "udp", "icmp", "icmp6", "sctp", "ip", "ip6", "arp", "not ip and not ip6",
    "port 80", "tcp port 80", "udp port 80", "src port 80", "dst port 80", "tcp src port 40000",
    "udp port 53", "udp dst port 53", "port 53", "port 0120",  # libpcap: octal, port 80
    "host 10.0.0.1", "src host 10.0.0.1", "dst host 10.0.0.2", "src 10.0.0.1", "dst 10.0.0.2",
    "host 2001:db8::1", "dst host 2001:db8::2", "src fd00::1", "host 10.96.0.10",
    "tcp and host 10.0.0.1", "port 80 and host 10.0.0.2", "tcp and port 80 and host 10.0.0.1",
    "tcp&&port 80", "udp && src host 10.0.0.1", "icmp and host 10.0.0.1", "icmp6 and dst fd00::2",
    "port 80 and dst host 10.0.0.1", "host 10.0.0.1 and host 10.0.0.1", "src port 80 and dst port 80",
    "icmp or icmp6", "not tcp", "tcp or udp", "(tcp port 80)", "! udp", "host 10.0.0.1 or arp",
    "net 10.0.0.0/24", "portrange 50000-60000", "ip proto 132", "ip proto 47", "ip6 protochain 6",
    "ip[6:2] & 0x1fff != 0", "tcp[tcpflags] & tcp-syn != 0", "greater 1000", "less 64",
    "ether broadcast", "ether host 02:00:00:00:00:02", "vlan", "vlan 10", "vlan and tcp",
    "vlan and host 10.0.0.1", "port 80 and 443", "port 80 and port 40000",
    "host 10.0.0.1 and host 10.0.0.2", "icmp6 and ip6[40] == 128",
    "udp port 53 and src host 10.0.0.1",
]

# libpcap's own messages, as tcpdump prints them after "tcpdump: ".
BAD_EXPRESSIONS = {
    "tcp[": "can't parse filter expression: syntax error",
    "TCP": "can't parse filter expression: syntax error",
    "host 10.0.0.1 and": "can't parse filter expression: syntax error",
    "tcp port 80 and (udp": "can't parse filter expression: syntax error",
    "port 70000": "illegal port number 70000 > 65535",
    "ip proto nosuch": "unknown ip proto 'nosuch'",
    "net 10.0.0.0/33": "mask length must be <= 32",
    "port nosuchservice": "unknown port 'nosuchservice'",
    # The optimizer proves these never match, and libpcap refuses them.
    "tcp and udp": "expression rejects all packets",
    "icmp and icmp6": "expression rejects all packets",
    "icmp and port 80": "expression rejects all packets",
}


def _pcap(frames: list[Frame]) -> bytes:
    """Classic pcap, frame i stamped i+1 seconds: the stamp names the frame in tcpdump's output."""
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1)]
    for i, f in enumerate(frames):
        out.append(struct.pack("<IIII", i + 1, 0, f.caplen, f.length) + f.data)
    return b"".join(out)


def _indices(pcap: bytes) -> set[int]:
    magic, = struct.unpack_from("<I", pcap)
    assert magic == 0xA1B2C3D4
    seen, off = set(), 24
    while off < len(pcap):
        sec, _usec, caplen, _length = struct.unpack_from("<IIII", pcap, off)
        seen.add(sec - 1)
        off += 16 + caplen
    return seen


def _tcpdump(path: Path, expression: str) -> subprocess.CompletedProcess[bytes]:
    assert TCPDUMP is not None
    return subprocess.run([TCPDUMP, "-r", str(path), "-w", "-", expression],
                          capture_output=True, timeout=30, check=False)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pcapfilter") / "corpus.pcap"
    path.write_bytes(_pcap(CORPUS))
    return path


@pytest.fixture(scope="module")
def tcpdump_keeps(corpus_file: Path) -> dict[str, set[int]]:
    """Which corpus frames tcpdump keeps, per expression: computed once, used by several tests."""
    kept = {}
    for expression in EXPRESSIONS:
        proc = _tcpdump(corpus_file, expression)
        assert proc.returncode == 0, (expression, proc.stderr.decode())
        kept[expression] = _indices(proc.stdout)
    return kept


def test_corpus_is_read_back_whole_by_tcpdump(corpus_file: Path) -> None:
    """The harness itself: with no filter tcpdump returns every frame, so indices mean frames."""
    if TCPDUMP is None:
        pytest.skip("tcpdump is not installed")
    proc = _tcpdump(corpus_file, "")
    assert proc.returncode == 0, proc.stderr.decode()
    assert _indices(proc.stdout) == set(range(len(CORPUS)))


# -- PacketFilter ----------------------------------------------------------------------------


@needs_tcpdump
@pytest.mark.parametrize("expression", EXPRESSIONS)
def test_packet_filter_keeps_what_tcpdump_keeps(expression: str, tcpdump_keeps: dict[str, set[int]]) -> None:
    with PacketFilter(expression) as pf:
        ours = {i for i, f in enumerate(CORPUS) if pf.matches(f.data, f.length)}
    expected = tcpdump_keeps[expression]
    names = {i: CORPUS[i].name for i in ours ^ expected}
    assert ours == expected, f"disagreement with tcpdump on: {names}"


@needs_tcpdump
def test_the_expression_table_discriminates(tcpdump_keeps: dict[str, set[int]]) -> None:
    """Agreement would prove little if most expressions kept all or nothing of the corpus."""
    partial = [e for e, kept in tcpdump_keeps.items() if 0 < len(kept) < len(CORPUS)]
    assert len(partial) >= len(EXPRESSIONS) * 3 // 4
    assert len({frozenset(kept) for kept in tcpdump_keeps.values()}) >= 30


@needs_tcpdump
@pytest.mark.parametrize("expression", sorted(BAD_EXPRESSIONS))
def test_bad_expression_raises_libpcaps_message(expression: str, corpus_file: Path) -> None:
    with pytest.raises(FilterError) as info:
        PacketFilter(expression)
    assert str(info.value) == BAD_EXPRESSIONS[expression]
    assert info.value.expression == expression
    proc = _tcpdump(corpus_file, expression)
    assert proc.returncode != 0
    assert f"tcpdump: {info.value}" in proc.stderr.decode().splitlines()


def test_ip_broadcast_needs_a_netmask() -> None:
    """The one divergence from tcpdump -r, which compiles with netmask 0 (an unknown mask here)."""
    with pytest.raises(FilterError, match=r"^netmask not known, so 'ip broadcast' not supported$"):
        PacketFilter("ip broadcast")


def test_nul_in_expression_is_refused() -> None:
    # libpcap would compile "tcp" alone, silently dropping the rest.
    with pytest.raises(FilterError, match="NUL"):
        PacketFilter("tcp\0 and port 80")


def test_empty_expression_matches_everything() -> None:
    with PacketFilter("") as pf, PacketFilter("   ") as blank:
        for f in CORPUS:
            assert pf.matches(f.data, f.length)
            assert blank.matches(f.data, f.length)


def test_original_length_counts_for_greater_and_less() -> None:
    """`greater`/`less` see the wire length (pcap_pkthdr.len), not the bytes captured."""
    frame = bytes(eth() / IP(src="10.0.0.1", dst="10.0.0.2") / UDP() / (b"z" * 1200))
    with PacketFilter("greater 1000") as greater, PacketFilter("less 100") as less:
        assert greater.matches(frame[:64], len(frame))
        assert not less.matches(frame[:64], len(frame))
        assert not greater.matches(frame[:64], 64)
        assert less.matches(frame[:64], 64)


def test_a_filter_reading_past_the_capture_rejects_the_frame() -> None:
    """As with tcpdump -r: the kernel must copy enough of a frame for the headers tested."""
    frame = bytes(eth() / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=40000, dport=80))
    with PacketFilter("tcp dst port 80") as pf:
        assert pf.matches(frame, len(frame))
        assert pf.matches(frame[:38], len(frame))  # the destination port ends at byte 38
        assert not pf.matches(frame[:37], len(frame))


def test_linktype_is_a_libpcap_dlt() -> None:
    """pcap_open_dead takes a DLT_ value: raw IP is DLT_RAW 12 there, not LINKTYPE_RAW 101."""
    with pytest.raises(FilterError, match="unknown data link type 101"):
        PacketFilter("tcp", linktype=101)
    # Raw IP has no Ethernet header: "tcp" reads the protocol at offset 9.
    packet = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / TCP(dport=80))
    with PacketFilter("tcp port 80", linktype=12, snaplen=128) as raw, PacketFilter("tcp port 80") as ether:
        assert raw.matches(packet, len(packet))
        assert not ether.matches(packet, len(packet))


def test_bad_lengths_and_closed_filters() -> None:
    pf = PacketFilter("tcp")
    with pytest.raises(ValueError, match="original length"):
        pf.matches(b"x" * 60, 59)
    with pytest.raises(ValueError, match="original length"):
        pf.matches(b"", 1 << 32)
    pf.close()
    pf.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        pf.matches(b"x" * 60, 60)


def test_close_waits_for_a_match_in_another_thread() -> None:
    """Matches from a capture thread while another thread closes: never a crash, only 'closed'."""
    frame = bytes(eth() / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=40000, dport=80))
    pf = PacketFilter("tcp port 80 and host 10.0.0.1")
    results: list[bool] = []
    errors: list[BaseException] = []

    def capture() -> None:
        try:
            while True:
                results.append(pf.matches(frame, len(frame)))
        except ValueError:
            return
        except BaseException as exc:  # noqa: BLE001 - any other error fails the test below
            errors.append(exc)

    thread = threading.Thread(target=capture)
    thread.start()
    while len(results) < 1000 and thread.is_alive():
        pass
    pf.close()
    thread.join(timeout=10)
    assert not thread.is_alive() and not errors
    assert all(results)


# -- Prefilter: a model of the kernel's rule -------------------------------------------------

ICMP_CLASS = {1, 58}
NO_L4 = 255  # not IP, as PNM_NO_L4: never equal to 6 or 17


@dataclass(frozen=True)
class KernelView:
    """The fields bpf/tc_packet.h's parser gives trace_prefilter, for one whole frame."""

    family: int = 0
    l4proto: int = NO_L4
    ports: tuple[int, int] | None = None
    addresses: tuple[bytes, bytes] = (b"", b"")


def kernel_view(frame: bytes) -> KernelView:
    """What bpf/tc_packet.h reads of a frame, from scapy's parse of it.

    The kernel dispatches on skb->protocol: a VLAN tag still in the data makes
    the frame not IP. IPv4: the protocol field, no ports for a non-first
    fragment or ihl < 5. IPv6: up to 6 extension headers walked (hop-by-hop,
    routing, destination options, fragment); a non-first fragment has no ports.
    """
    pkt = Ether(frame)
    layer = pkt.payload
    if isinstance(layer, IP):
        addresses = (ipaddress.IPv4Address(layer.src).packed, ipaddress.IPv4Address(layer.dst).packed)
        if layer.frag != 0 or layer.ihl < 5:
            return KernelView(4, layer.proto, None, addresses)
        return KernelView(4, layer.proto, _ports(layer.payload), addresses)
    if isinstance(layer, IPv6):
        addresses = (ipaddress.IPv6Address(layer.src).packed, ipaddress.IPv6Address(layer.dst).packed)
        nh, inner = layer.nh, layer.payload
        for _ in range(6):
            if isinstance(inner, IPv6ExtHdrFragment):
                if inner.offset != 0:
                    return KernelView(6, inner.nh, None, addresses)
            elif not isinstance(inner, (IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, IPv6ExtHdrDestOpt)):
                return KernelView(6, nh, _ports(inner), addresses)
            nh, inner = inner.nh, inner.payload
        return KernelView(6, 59, None, addresses)  # too many extension headers: IPPROTO_NONE
    return KernelView()


def _ports(layer: Packet) -> tuple[int, int] | None:
    if isinstance(layer, (TCP, UDP)):
        return layer.sport, layer.dport
    return None


def passes(pre: Prefilter, view: KernelView) -> bool:
    """trace_prefilter: protocol (ICMP meaning ICMP or ICMPv6), then port, then address."""
    if pre.protocol == 1 and view.l4proto not in ICMP_CLASS:
        return False
    if pre.protocol not in (0, 1) and view.l4proto != pre.protocol:
        return False
    if pre.port and view.ports is not None and pre.port not in view.ports:
        return False
    if pre.address:
        family = 4 if len(pre.address) == 4 else 6
        if view.family != family or pre.address not in view.addresses:
            return False
    return True


KERNEL_VIEWS = [kernel_view(f.whole) for f in CORPUS]


def test_kernel_model_reads_the_corpus_as_the_kernel_would() -> None:
    """Spot checks of the model itself, so that the property below rests on something."""
    by_name = {f.name: v for f, v in zip(CORPUS, KERNEL_VIEWS, strict=True)}
    assert by_name["tcp4 syn 10.0.0.1:40000 > 10.0.0.2:80"].ports == (40000, 80)
    assert by_name["tcp4 non-first fragment 10.0.0.1 > 10.0.0.2"] == KernelView(
        4, 6, None, (bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])))
    assert by_name["tcp6 after hop-by-hop, [2001:db8::1]:40000 > [2001:db8::2]:80"].ports == (40000, 80)
    assert by_name["udp6 after destination options and routing, :53"].l4proto == 17
    assert by_name["udp6 non-first fragment [2001:db8::2] > [2001:db8::1]"].ports is None
    assert by_name["icmp6 non-first fragment fd00::1 > fd00::2"].l4proto == 58
    assert by_name["sctp4 10.0.0.7:80 > 10.0.0.8:5000"].ports is None
    assert by_name["ip4 ihl=4 (malformed), proto tcp"].ports is None
    assert by_name["arp who-has 10.0.0.2 tell 10.0.0.1"] == KernelView()
    assert by_name["vlan 10 tcp4 10.0.0.1:40000 > 10.0.0.2:80"] == KernelView()
    # The kernel saw the whole frame even where it copied 30 bytes.
    assert by_name["tcp6 cut inside the source address (30 bytes)"].ports == (40000, 80)


@needs_tcpdump
@pytest.mark.parametrize("expression", EXPRESSIONS)
def test_prefilter_passes_every_frame_tcpdump_keeps(expression: str,
                                                    tcpdump_keeps: dict[str, set[int]]) -> None:
    pre = prefilter(expression)
    withheld = [CORPUS[i].name for i in sorted(tcpdump_keeps[expression])
                if not passes(pre, KERNEL_VIEWS[i])]
    assert not withheld, f"{pre} withholds frames tcpdump keeps: {withheld}"


@needs_tcpdump
def test_the_property_catches_a_prefilter_that_is_too_tight(tcpdump_keeps: dict[str, set[int]]) -> None:
    """The check above has teeth: the naive readings of two expressions fail it.

    "host 10.0.0.1" also keeps ARP naming 10.0.0.1, which an address check
    withholds; "port 80" also keeps SCTP, which "tcp or udp" would withhold.
    """
    naive = {"host 10.0.0.1": Prefilter(address=bytes([10, 0, 0, 1])),
             "port 80": Prefilter(protocol=6, port=80)}
    for expression, pre in naive.items():
        withheld = [CORPUS[i].name for i in tcpdump_keeps[expression] if not passes(pre, KERNEL_VIEWS[i])]
        assert withheld, expression


@needs_tcpdump
def test_prefilters_do_cut_copies(tcpdump_keeps: dict[str, set[int]]) -> None:
    """The accepted forms are worth having: each withholds most of the frames tcpdump drops."""
    for expression in ("tcp port 80", "udp port 53", "tcp and host 10.0.0.1", "icmp6 and dst fd00::2",
                       "host 2001:db8::1", "tcp src port 40000"):
        pre = prefilter(expression)
        assert pre != Prefilter(), expression
        copied = {i for i, view in enumerate(KERNEL_VIEWS) if passes(pre, view)}
        assert len(copied) < len(CORPUS) // 2, (expression, pre)
        assert tcpdump_keeps[expression] <= copied


V4 = bytes([10, 0, 0, 1])
V6 = ipaddress.IPv6Address("2001:db8::1").packed


@pytest.mark.parametrize(("expression", "expected"), [
    ("tcp", Prefilter(protocol=6)),
    ("udp", Prefilter(protocol=17)),
    ("icmp", Prefilter(protocol=1)),
    ("icmp6", Prefilter(protocol=1)),
    ("port 80", Prefilter(port=80)),
    ("tcp port 80", Prefilter(protocol=6, port=80)),
    ("udp port 53", Prefilter(protocol=17, port=53)),
    ("src port 80", Prefilter(port=80)),
    ("dst port 65535", Prefilter(port=65535)),
    ("tcp dst port 443", Prefilter(protocol=6, port=443)),
    ("host 2001:db8::1", Prefilter(address=V6)),
    ("src host 2001:db8::1", Prefilter(address=V6)),
    ("dst 2001:db8::1", Prefilter(address=V6)),
    ("src 2001:DB8:0::1", Prefilter(address=V6)),
    ("tcp and host 10.0.0.1", Prefilter(protocol=6, address=V4)),
    ("icmp && dst host 10.0.0.1", Prefilter(protocol=1, address=V4)),
    ("port 80 and src 10.0.0.1", Prefilter(port=80, address=V4)),
    ("tcp&&port 80&&host 2001:db8::1", Prefilter(protocol=6, port=80, address=V6)),
    ("  tcp   and  port 80 ", Prefilter(protocol=6, port=80)),
    ("tcp and tcp port 80 and port 80", Prefilter(protocol=6, port=80)),
    ("src host 10.0.0.1 and dst host 10.0.0.1 and udp", Prefilter(protocol=17, address=V4)),
    ("icmp and icmp6", Prefilter(protocol=1)),  # both the kernel's ICMP class
    # An IPv4 host also matches ARP and RARP, which the address check rejects:
    # without a protocol or port to exclude those, the address cannot be used.
    ("host 10.0.0.1", Prefilter()),
    ("src 10.0.0.1", Prefilter()),
    ("dst host 10.0.0.1", Prefilter()),
])
def test_prefilter_of_accepted_forms(expression: str, expected: Prefilter) -> None:
    assert prefilter(expression) == expected


@pytest.mark.parametrize("expression", [
    "", "tcp or udp", "not tcp", "! tcp", "(tcp)", "tcp and (port 80)", "tcp || udp",
    "net 10.0.0.0/8", "portrange 80-90", "port 80-90", "ip proto 6", "ip6 proto 6", "vlan and tcp",
    "ip", "ip6", "sctp", "arp", "tcp[13] & 2 != 0", "greater 100", "ether host 02:00:00:00:00:01",
    "host example.com", "port http", "tcp port domain", "host localhost",
    "port 80 and 443", "port 80 and port 443", "host 10.0.0.1 and host 10.0.0.2",
    "tcp and udp", "tcp port 80 and udp", "icmp port 80", "tcp and", "and tcp", "tcp and and port 80",
    "port 0", "port 0120", "port 0x50", "port 70000", "host 010.0.0.1", "host 10.1", "host fe80::1%eth0",
    "host 10.0.0.1/32", "tcp & port 80", "src or dst port 80", "src and dst host 10.0.0.1",
    "ip host 10.0.0.1", "10.0.0.1", "tcp and 2001:db8::1", "TCP", "tcp PORT 80", "port 80 tcp",
    "host", "port", "src", "tcp port",
    "tcp\0port 80",
])
def test_prefilter_of_anything_else_copies_everything(expression: str) -> None:
    assert prefilter(expression) == Prefilter()


def test_prefilter_values_are_checked() -> None:
    assert Prefilter(address=V6).family == 6
    assert Prefilter(address=V4).family == 4
    assert Prefilter().family == 0
    with pytest.raises(ValueError, match="protocol"):
        Prefilter(protocol=58)
    with pytest.raises(ValueError, match="port"):
        Prefilter(port=65536)
    with pytest.raises(ValueError, match="address"):
        Prefilter(address=b"\x01\x02\x03")
