"""monitor.traces.pcapng, read back by the real tools: tshark, capinfos, Wireshark's pcapng
file dissector, and scapy's reader.

Each field the writer puts in a file is checked in at least one reader that
is not ours; tshark and capinfos must read the files without a word on
stderr (but for the banner Wireshark prints when run as root).
"""

from __future__ import annotations

import io
import shutil
import subprocess
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import BinaryIO, cast

import pytest
from scapy.layers.dns import DNS, DNSQR
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.utils import PcapNgReader

from monitor.traces.pcapng import PcapngWriter

TSHARK, CAPINFOS = shutil.which("tshark"), shutil.which("capinfos")
needs_tshark = pytest.mark.skipif(TSHARK is None, reason="tshark is not installed")
needs_capinfos = pytest.mark.skipif(CAPINFOS is None, reason="capinfos (wireshark tools) is not installed")

# Wireshark's tools print this to stderr whenever they run as root; it says
# nothing about the file.
ROOT_BANNER = 'Running as user "root" and group "root". This could be dangerous.'

SECTION_COMMENTS = ["podnetmon trace of default/web on node n1",
                    "filter: tcp port 80; snaplen 96 — ünïcödé ✓"]
APPLICATION = "podnetmon 0.9.0 (test)"
OS_NAME = "Linux 6.1.0-test"


@dataclass(frozen=True)
class Iface:
    name: str
    description: str
    snaplen: int


@dataclass(frozen=True)
class Pkt:
    interface: int
    ts: int
    whole: bytes
    caplen: int
    direction: str
    comment: str | None
    protocols: str  # what tshark must dissect: frame.protocols

    @property
    def data(self) -> bytes:
        return self.whole[: self.caplen]


IFACES = [
    Iface("default/web", "node=n1 netns=4026532481 host_veth=veth1a2b", 262144),
    Iface("db/pg/veth9", "node=n1 netns=4026532999 host_veth=veth9", 96),
    Iface("kube-system/coredns", "second pod, nothing truncated", 65535),
]

MAC = {"src": "02:00:00:00:00:01", "dst": "02:00:00:00:00:02"}


def _packets() -> list[Pkt]:
    syn = bytes(Ether(**MAC) / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=40000, dport=80, flags="S"))
    synack = bytes(Ether(**MAC) / IP(src="10.0.0.2", dst="10.0.0.1") / TCP(sport=80, dport=40000, flags="SA"))
    data = bytes(Ether(**MAC) / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=40000, dport=80, flags="PA")
                 / (b"GET / HTTP/1.1\r\nHost: web\r\nX-Pad: " + b"a" * 1200 + b"\r\n\r\n"))
    dns6 = bytes(Ether(**MAC) / IPv6(src="2001:db8::1", dst="2001:db8::53") / UDP(sport=33000, dport=53)
                 / DNS(id=7, rd=1, qd=DNSQR(qname=".".join(["a" * 60] * 4) + ".example", qtype="AAAA")))
    ping = bytes(Ether(**MAC) / IP(src="10.0.0.3", dst="10.0.0.1") / ICMP(type=8) / (b"p" * 1000))
    ping6 = bytes(Ether(**MAC) / IPv6(src="fd00::1", dst="fd00::2") / ICMPv6EchoRequest() / b"abc")
    arp = bytes(Ether(src=MAC["src"], dst="ff:ff:ff:ff:ff:ff") / ARP(psrc="10.0.0.1", pdst="10.0.0.53"))
    base = 1_700_000_000_123_456_789
    return [
        # Timestamps one nanosecond apart: a float of seconds cannot tell them apart.
        Pkt(0, base, syn, len(syn), "outbound", "first packet, a SYN", "eth:ethertype:ip:tcp"),
        Pkt(0, base + 1, synack, len(synack), "inbound", None, "eth:ethertype:ip:tcp"),
        Pkt(0, base + 999_999_999, data, len(data), "outbound", None, "eth:ethertype:ip:tcp:http"),
        Pkt(1, base + 1_000_000_000, dns6, 96, "outbound", "truncated: 96 of 331 bytes",
            "eth:ethertype:ipv6:udp:dns"),
        Pkt(1, base + 2_000_000_001, ping, 96, "inbound", None, "eth:ethertype:ip:icmp:data"),
        # Lengths of every residue mod 4, so block padding is exercised.
        Pkt(1, base + 3_000_000_000, ping6, len(ping6), "inbound", "ümlaut, comma, and ✓ in a comment",
            "eth:ethertype:ipv6:icmpv6:data"),
        Pkt(2, 4_294_967_296_000_000_001, arp, len(arp), "inbound", None, "eth:ethertype:arp"),
        Pkt(2, 0, arp, 41, "outbound", None, "eth:ethertype:arp"),
    ]


PACKETS = _packets()
STATS = [  # interface, received, dropped, timestamp, comment
    (0, 3, 0, 1_700_000_010_000_000_000, "ended: duration reached; lost 0"),
    (1, 3, 12_345_678_901, 1_700_000_010_000_000_001, None),
    (2, 2, 7, 18_446_744_073_709_551_615, "lost 7 in the kernel's buffer"),
]


def _write(out: BinaryIO) -> PcapngWriter:
    writer = PcapngWriter(out, comments=SECTION_COMMENTS, application=APPLICATION, os_name=OS_NAME)
    for i, iface in enumerate(IFACES):
        assert writer.add_interface(iface.name, iface.description, snaplen=iface.snaplen) == i
    for p in PACKETS:
        writer.packet(p.interface, p.ts, p.data, len(p.whole), direction=p.direction, comment=p.comment)
    for iface_id, received, dropped, ts, comment in STATS:
        writer.statistics(iface_id, received=received, dropped=dropped, timestamp_ns=ts, comment=comment)
    writer.flush()
    return writer


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pcapng") / "trace.pcapng"
    with path.open("wb") as f:
        writer = _write(f)
        assert writer.bytes_written == f.tell()
    return path


def _run(tool: str | None, *args: str) -> str:
    """Run a Wireshark tool; it must succeed and have nothing to say on stderr."""
    assert tool is not None
    proc = subprocess.run([tool, *args], capture_output=True, text=True, timeout=60, check=False)
    complaints = [line for line in proc.stderr.splitlines() if line.strip() and line != ROOT_BANNER]
    assert proc.returncode == 0 and not complaints, (args, proc.returncode, proc.stderr)
    return proc.stdout


def _fields(path: Path, *fields: str, dissect_file: bool = False) -> list[list[str]]:
    args = ["-r", str(path), "-T", "fields", "-E", "separator=\t", "-E", "occurrence=a",
            "-E", "aggregator=\x1f"]
    if dissect_file:
        # Wireshark's pcapng *file* dissector: the file's blocks and options
        # themselves, as one frame. It reads what tshark -r does not show.
        args = ["-X", "read_format:MIME Files Format", *args]
    for field in fields:
        args += ["-e", field]
    out = _run(TSHARK, *args)
    return [line.split("\t") for line in out.splitlines()]


@needs_tshark
def test_tshark_reads_every_packet_field(trace: Path) -> None:
    rows = _fields(trace, "frame.interface_id", "frame.interface_name", "frame.interface_description",
                   "frame.len", "frame.cap_len", "frame.time_epoch", "frame.packet_flags_direction",
                   "frame.p2p_dir", "frame.comment", "frame.protocols")
    assert len(rows) == len(PACKETS)
    for row, p in zip(rows, PACKETS, strict=True):
        iface = IFACES[p.interface]
        seconds, ns = divmod(p.ts, 10**9)
        assert row == [
            str(p.interface), iface.name, iface.description, str(len(p.whole)), str(p.caplen),
            f"{seconds}.{ns:09d}",
            # epb_flags bits 0-1: 1 inbound, 2 outbound; Wireshark's P2P direction
            # is 1 for received and 0 for sent.
            {"inbound": "0x00000001", "outbound": "0x00000002"}[p.direction],
            {"inbound": "1", "outbound": "0"}[p.direction],
            p.comment or "",
            p.protocols,
        ]


@needs_tshark
def test_tshark_dissects_the_frames(trace: Path) -> None:
    rows = _fields(trace, "ip.src", "ipv6.dst", "tcp.dstport", "udp.dstport", "arp.dst.proto_ipv4")
    assert rows[0] == ["10.0.0.1", "", "80", "", ""]
    assert rows[3] == ["", "2001:db8::53", "", "53", ""]
    assert rows[6] == ["", "", "", "", "10.0.0.53"]


@needs_tshark
def test_truncated_frames_are_cut_short_not_malformed(trace: Path) -> None:
    """Dissectors that run past the captured bytes of a cut frame say "packet size limited
    during capture" (_ws.short), which they only do when the wire length says there was more."""
    rows = _fields(trace, "_ws.short", "_ws.malformed")
    short = [i for i, (cut, _bad) in enumerate(rows) if cut]
    assert short == [3, 7]  # the DNS query and the ARP request, cut inside their headers
    assert all(PACKETS[i].caplen < len(PACKETS[i].whole) for i in short)
    assert [i for i, (_cut, bad) in enumerate(rows) if bad] == []


@needs_tshark
def test_file_dissector_sees_sound_blocks_and_every_option(trace: Path) -> None:
    fields = ["pcapng.block.type", "pcapng.block.length", "pcapng.block.length_trailer",
              "pcapng.section_header.byte_order_magic", "pcapng.section_header.section_length",
              "pcapng.options.option.data.comment", "pcapng.options.option.data.os",
              "pcapng.options.option.data.user_application",
              "pcapng.options.option.data.interface.name", "pcapng.options.option.data.interface.description",
              "pcapng.interface_description.snap_length", "pcapng.interface_description.link_type",
              "pcapng.options.option.data.interface.timestamp_resolution",
              "pcapng.packet.captured_length", "pcapng.packet.packet_length",
              "pcapng.options.option.data.packet.flags.direction",
              "pcapng.interface_id", "pcapng.timestamp_high", "pcapng.timestamp_low",
              "pcapng.options.option.data.interface.received", "pcapng.options.option.data.interface.dropped",
              "_ws.expert.message"]
    rows = _fields(trace, *fields, dissect_file=True)
    assert len(rows) == 1  # the whole file is one "frame" to this dissector
    got = {name: value.split("\x1f") if value else [] for name, value in zip(fields, rows[0], strict=True)}

    types = ["0x0a0d0d0a"] + ["0x00000001"] * 3 + ["0x00000006"] * len(PACKETS) + ["0x00000005"] * 3
    assert got["pcapng.block.type"] == types
    assert got["pcapng.block.length"] == got["pcapng.block.length_trailer"]
    assert all(int(n) % 4 == 0 for n in got["pcapng.block.length"])
    assert sum(int(n) for n in got["pcapng.block.length"]) == trace.stat().st_size
    assert got["pcapng.section_header.byte_order_magic"] == ["4d3c2b1a"]  # as bytes: little-endian
    assert got["pcapng.section_header.section_length"] == ["-1"]
    comments = [*SECTION_COMMENTS, *(p.comment for p in PACKETS if p.comment),
                *(c for *_, c in STATS if c)]
    assert got["pcapng.options.option.data.comment"] == comments
    assert got["pcapng.options.option.data.os"] == [OS_NAME]
    assert got["pcapng.options.option.data.user_application"] == [APPLICATION]
    assert got["pcapng.options.option.data.interface.name"] == [i.name for i in IFACES]
    assert got["pcapng.options.option.data.interface.description"] == [i.description for i in IFACES]
    assert got["pcapng.interface_description.snap_length"] == [str(i.snaplen) for i in IFACES]
    assert got["pcapng.interface_description.link_type"] == ["1"] * 3
    assert got["pcapng.options.option.data.interface.timestamp_resolution"] == ["0x09"] * 3
    assert got["pcapng.packet.captured_length"] == [str(p.caplen) for p in PACKETS]
    assert got["pcapng.packet.packet_length"] == [str(len(p.whole)) for p in PACKETS]
    assert got["pcapng.options.option.data.packet.flags.direction"] == [
        {"inbound": "0x0001", "outbound": "0x0002"}[p.direction] for p in PACKETS]
    # Timestamps and interface ids of the EPBs, then of the ISBs.
    stamps = [p.ts for p in PACKETS] + [s[3] for s in STATS]
    assert [(int(h) << 32) | int(lo) for h, lo in zip(got["pcapng.timestamp_high"],
                                                       got["pcapng.timestamp_low"], strict=True)] == stamps
    assert got["pcapng.interface_id"] == [str(p.interface) for p in PACKETS] + [str(s[0]) for s in STATS]
    assert got["pcapng.options.option.data.interface.received"] == [str(s[1]) for s in STATS]
    assert got["pcapng.options.option.data.interface.dropped"] == [str(s[2]) for s in STATS]
    assert got["_ws.expert.message"] == []  # no bad length, padding or option anywhere


@needs_capinfos
def test_capinfos_reads_the_section_and_interfaces(trace: Path) -> None:
    out = _run(CAPINFOS, "-M", str(trace))
    lines = [line.strip() for line in out.splitlines()]
    assert [line.split(":", 1)[1].strip() for line in lines if line.startswith("Capture comment:")] \
        == SECTION_COMMENTS
    assert f"Capture application: {APPLICATION}" in [" ".join(line.split()) for line in lines]
    assert f"Capture oper-sys: {OS_NAME}" in [" ".join(line.split()) for line in lines]
    assert "File timestamp precision: nanoseconds (9)" in [" ".join(line.split()) for line in lines]
    assert f"Number of packets: {len(PACKETS)}" in [" ".join(line.split()) for line in lines]
    assert [line.split("=", 1)[1].strip() for line in lines if line.startswith("Name =")] \
        == [i.name for i in IFACES]
    assert [line.split("=", 1)[1].strip() for line in lines if line.startswith("Description =")] \
        == [i.description for i in IFACES]
    assert [line.split("=", 1)[1].strip() for line in lines if line.startswith("Capture length =")] \
        == [str(i.snaplen) for i in IFACES]
    # One ISB per interface, and the packets of each.
    assert [line for line in lines if line.startswith("Number of stat entries")] == \
        ["Number of stat entries = 1"] * 3
    per_iface = [sum(p.interface == i for p in PACKETS) for i in range(len(IFACES))]
    assert [line for line in lines if line.startswith("Number of packets =")] == \
        [f"Number of packets = {n}" for n in per_iface]


def test_scapy_reads_the_same_packets(trace: Path) -> None:
    with PcapNgReader(str(trace)) as reader:
        read = list(reader)
    assert len(read) == len(PACKETS)
    for pkt, p in zip(read, PACKETS, strict=True):
        assert bytes(pkt) == p.data
        assert pkt.wirelen == len(p.whole)
        assert pkt.time == Decimal(p.ts) / 10**9  # exact: scapy keeps a Decimal
        assert pkt.direction == {"inbound": 1, "outbound": 2}[p.direction]
        assert pkt.comments == ([p.comment.encode()] if p.comment else None)
        assert pkt.sniffed_on == IFACES[p.interface].name


@needs_tshark
def test_a_flushed_stream_is_readable_before_it_ends(tmp_path: Path) -> None:
    """Streaming: what was flushed is a valid file, before any statistics block."""
    path = tmp_path / "live.pcapng"
    with path.open("wb") as f:
        writer = PcapngWriter(f)
        iface = writer.add_interface("default/web", "live", snaplen=262144)
        p = PACKETS[0]
        writer.packet(iface, p.ts, p.data, len(p.whole), direction="inbound")
        writer.flush()  # no close: the file is still open for writing
        rows = _fields(path, "frame.interface_name", "frame.len")
        assert rows == [["default/web", str(len(p.whole))]]
        assert writer.bytes_written == path.stat().st_size


class Trickle(io.RawIOBase):
    """A stream that takes at most 7 bytes a write, as an unbuffered pipe may."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.calls = 0

    def writable(self) -> bool:
        return True

    def write(self, b: object) -> int:
        chunk = bytes(cast(bytes, b))[:7]
        self.data += chunk
        self.calls += 1
        return len(chunk)


@needs_tshark
def test_short_writes_still_make_whole_blocks(tmp_path: Path, trace: Path) -> None:
    out = Trickle()
    writer = _write(cast(BinaryIO, out))
    assert out.calls > writer.bytes_written // 7
    assert bytes(out.data) == trace.read_bytes()
    assert writer.bytes_written == len(out.data)


def test_bytes_written_counts_every_block() -> None:
    out = io.BytesIO()
    writer = PcapngWriter(out)
    sizes = [writer.bytes_written]
    writer.add_interface("a", "b", snaplen=64)
    sizes.append(writer.bytes_written)
    writer.packet(0, 1, b"x" * 61, 100, direction="inbound")
    sizes.append(writer.bytes_written)
    writer.statistics(0, received=1, dropped=0, timestamp_ns=2)
    sizes.append(writer.bytes_written)
    assert sizes[-1] == len(out.getvalue())
    assert all(s % 4 == 0 for s in sizes)
    # The EPB: 28 bytes of header and trailer, 64 of padded data, 12 of epb_flags, 4 of end of options.
    assert sizes[2] - sizes[1] == 28 + 64 + 12 + 4


def _writer() -> tuple[PcapngWriter, io.BytesIO]:
    out = io.BytesIO()
    writer = PcapngWriter(out)
    writer.add_interface("default/web", "", snaplen=64)
    return writer, out


@pytest.mark.parametrize(("call", "message"), [
    (lambda w: w.packet(1, 0, b"x", 1, direction="inbound"), "unknown interface id 1"),
    (lambda w: w.packet(-1, 0, b"x", 1, direction="inbound"), "unknown interface id -1"),
    (lambda w: w.statistics(1, received=0, dropped=0, timestamp_ns=0), "unknown interface id 1"),
    (lambda w: w.packet(0, 0, b"x", 1, direction="ingress"), "direction 'ingress'"),
    (lambda w: w.packet(0, 0, b"x", 1, direction=""), "direction ''"),
    (lambda w: w.packet(0, 0, b"x" * 65, 65, direction="inbound"), "exceed interface 0's snaplen 64"),
    (lambda w: w.packet(0, 0, b"x" * 10, 9, direction="inbound"), "original length 9"),
    (lambda w: w.packet(0, 0, b"x", 1 << 32, direction="inbound"), "original length"),
    (lambda w: w.packet(0, -1, b"x", 1, direction="inbound"), "timestamp -1"),
    (lambda w: w.packet(0, 1 << 64, b"x", 1, direction="inbound"), "does not fit 64 bits"),
    (lambda w: w.packet(0, 0, b"x", 1, direction="inbound", comment="c" * 65536), "at most 65535"),
    (lambda w: w.statistics(0, received=-1, dropped=0, timestamp_ns=0), "received -1"),
    (lambda w: w.statistics(0, received=0, dropped=1 << 64, timestamp_ns=0), "dropped"),
    (lambda w: w.add_interface("x", "y", snaplen=-1), "snaplen -1"),
    (lambda w: w.add_interface("x", "y", snaplen=64, linktype=70000), "linktype 70000"),
])
def test_bad_arguments_raise_and_write_nothing(call: object, message: str) -> None:
    writer, out = _writer()
    before = out.getvalue()
    with pytest.raises(ValueError, match=message):
        call(writer)  # type: ignore[operator]
    assert out.getvalue() == before
    assert writer.bytes_written == len(before)


def test_snaplen_zero_means_no_limit() -> None:
    out = io.BytesIO()
    writer = PcapngWriter(out)
    iface = writer.add_interface("a", "b", snaplen=0)
    writer.packet(iface, 0, b"x" * 70000, 70000, direction="outbound")
    assert writer.bytes_written == len(out.getvalue())


def test_the_writer_leaves_the_stream_open() -> None:
    out = io.BytesIO()
    _write(cast(BinaryIO, out))
    assert not out.closed
