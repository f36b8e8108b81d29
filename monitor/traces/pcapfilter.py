"""tcpdump's filter language for `podnetmon trace`: exact in userspace, a superset in the kernel.

Exact: PacketFilter compiles the expression with libpcap itself (through
ctypes, Debian's libpcap0.8, the library tcpdump uses) and runs the compiled
program on each copied frame with pcap_offline_filter. No reimplementation of
pcap-filter(7) could promise "what tcpdump would capture"; the library can.

Cheap: the kernel cannot run a pcap program before it copies a packet, but it
can check three things it already parsed (bpf/trace.c, trace_prefilter):
a protocol class, a port, an address. prefilter() turns an expression into
such a check only when it can prove that every packet the expression matches
passes it, so the kernel never withholds a packet the exact filter would keep.

The kernel's rule, which the proofs below rely on (bpf/trace.c, bpf/tc_packet.h):
  - protocol 6 or 17: the packet's L4 protocol is that one. For IPv4 it is the
    protocol field, fragments included; for IPv6 the header after the
    extension headers (hop-by-hop, routing, destination options, AH, fragment).
    Protocol 1: the class ICMP, which is ICMP (1) or ICMPv6 (58).
  - port: when the packet has a TCP or UDP header the kernel read (not a
    non-first fragment, not cut short), its source or destination port equals
    it; a packet without ports passes.
  - address: the packet is IPv4 (4-byte address) or IPv6 (16 bytes) and its
    source or destination equals it; anything that is not IP fails.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import ipaddress
import re
import threading
import weakref
from dataclasses import dataclass

PCAP_NETMASK_UNKNOWN = 0xFFFFFFFF
_PCAP_ERROR = -1


class FilterError(ValueError):
    """libpcap refused the expression; the message is libpcap's own, as tcpdump prints it.

    Not only syntax: an expression the optimizer proves never matches ("tcp and
    udp") is refused too, with "expression rejects all packets".
    """

    def __init__(self, expression: str, message: str) -> None:
        super().__init__(message)
        self.expression = expression
        self.message = message


class _BpfProgram(ctypes.Structure):
    """struct bpf_program (pcap/bpf.h): the instructions stay in libpcap's memory."""

    _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.c_void_p)]


class _PcapPkthdr(ctypes.Structure):
    """struct pcap_pkthdr: a struct timeval (two longs on Linux), then caplen and len."""

    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long),
                ("caplen", ctypes.c_uint32), ("len", ctypes.c_uint32)]


@functools.cache
def _libpcap() -> ctypes.CDLL:
    """libpcap with full prototypes: without them ctypes passes pointers as 32-bit ints."""
    name = ctypes.util.find_library("pcap")
    if name is None:
        raise OSError("libpcap not found (Debian: apt-get install libpcap0.8)")
    lib = ctypes.CDLL(name)
    lib.pcap_open_dead.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.pcap_open_dead.restype = ctypes.c_void_p
    lib.pcap_compile.argtypes = [ctypes.c_void_p, ctypes.POINTER(_BpfProgram), ctypes.c_char_p,
                                 ctypes.c_int, ctypes.c_uint32]
    lib.pcap_compile.restype = ctypes.c_int
    lib.pcap_geterr.argtypes = [ctypes.c_void_p]
    lib.pcap_geterr.restype = ctypes.c_char_p
    lib.pcap_offline_filter.argtypes = [ctypes.POINTER(_BpfProgram), ctypes.POINTER(_PcapPkthdr),
                                        ctypes.c_char_p]
    lib.pcap_offline_filter.restype = ctypes.c_int
    lib.pcap_freecode.argtypes = [ctypes.POINTER(_BpfProgram)]
    lib.pcap_freecode.restype = None
    lib.pcap_close.argtypes = [ctypes.c_void_p]
    lib.pcap_close.restype = None
    return lib


# libpcap before 1.8 kept its parser's state in globals; compiling is rare, so
# serialising it costs nothing and keeps older libraries safe too.
_compile_lock = threading.Lock()


def _free(program: _BpfProgram) -> None:
    _libpcap().pcap_freecode(ctypes.byref(program))


class PacketFilter:
    """A compiled tcpdump expression, evaluated on captured frames.

    One capture thread calls matches(); a lock makes close() from another
    thread wait for a running match instead of freeing the program under it.
    """

    def __init__(self, expression: str, *, snaplen: int = 262144, linktype: int = 1) -> None:
        """Compile `expression` as tcpdump would for frames of `linktype`; FilterError if libpcap refuses.

        linktype is a libpcap DLT_ value, which pcap_open_dead takes: the same
        number as the pcapng LINKTYPE_ for Ethernet (1), not for all (raw IP
        is DLT_RAW 12 here, LINKTYPE_RAW 101 in a file).
        """
        if "\0" in expression:
            # libpcap would stop reading at the NUL and compile a different filter.
            raise FilterError(expression, "filter expression contains a NUL character")
        self.expression = expression
        lib = _libpcap()
        self._program = _BpfProgram()
        self._header = _PcapPkthdr()
        self._lock = threading.Lock()
        with _compile_lock:
            pcap = lib.pcap_open_dead(linktype, snaplen)
            if not pcap:
                raise MemoryError("pcap_open_dead failed")
            try:
                # optimize=1 as tcpdump does. The netmask is unknown: only "ip broadcast"
                # needs one, and libpcap then says so (tcpdump -r uses 0 instead).
                rc = lib.pcap_compile(pcap, ctypes.byref(self._program), expression.encode("utf-8"),
                                      1, PCAP_NETMASK_UNKNOWN)
                if rc == _PCAP_ERROR:
                    message = lib.pcap_geterr(pcap) or b"pcap_compile failed"
                    raise FilterError(expression, message.decode("utf-8", "replace"))
            finally:
                # The program does not refer to the pcap_t; only compiling needed it.
                lib.pcap_close(pcap)
        self._finalizer = weakref.finalize(self, _free, self._program)

    def matches(self, data: bytes, original_length: int) -> bool:
        """Would tcpdump keep this frame? `data` as captured, `original_length` as on the wire.

        As for tcpdump -r, a filter that reads past the captured bytes rejects
        the frame: copy enough of each frame for the headers the filter tests.
        """
        if not len(data) <= original_length <= 0xFFFFFFFF:
            raise ValueError(f"original length {original_length} is not between the captured "
                             f"length {len(data)} and 2^32-1")
        with self._lock:
            if not self._finalizer.alive:
                raise ValueError("filter is closed")
            self._header.caplen = len(data)
            self._header.len = original_length
            return bool(_libpcap().pcap_offline_filter(ctypes.byref(self._program),
                                                       ctypes.byref(self._header), data))

    def close(self) -> None:
        """Free the compiled program; idempotent."""
        with self._lock:
            self._finalizer()

    def __enter__(self) -> PacketFilter:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Prefilter:
    """What the kernel checks before copying a packet (struct pnm_trace_cfg); zero means any.

    protocol: 0, 6 (TCP), 17 (UDP) or 1 (ICMP or ICMPv6). port: the source or
    destination port. address: 4 or 16 bytes, the source or destination.
    """

    protocol: int = 0
    port: int = 0
    address: bytes = b""

    def __post_init__(self) -> None:
        if self.protocol not in (0, 1, 6, 17):
            raise ValueError(f"protocol {self.protocol} is not 0, 1, 6 or 17")
        if not 0 <= self.port <= 0xFFFF:
            raise ValueError(f"port {self.port} is not 0-65535")
        if len(self.address) not in (0, 4, 16):
            raise ValueError(f"address of {len(self.address)} bytes is not IPv4 or IPv6")

    @property
    def family(self) -> int:
        """0, 4 or 6: the kernel's address family field."""
        return {0: 0, 4: 4, 16: 6}[len(self.address)]


# Bare protocol primitives and the kernel class each is a subset of.
#   tcp, udp: libpcap tests the IPv4 protocol field (any fragment) or the IPv6
#     next header, directly or after one fragment header; the kernel reaches
#     the same byte (it walks that fragment header too), so its l4proto agrees.
#   icmp (IPv4 protocol 1) and icmp6 (IPv6 next header 58, directly or after a
#     fragment header) are both in the kernel's ICMP class, protocol 1.
_PROTOCOLS = {"tcp": 6, "udp": 17, "icmp": 1, "icmp6": 1}
# tcp/udp as a qualifier of port: the same check, plus the port's.
_PORT_PROTOCOLS = {"tcp": 6, "udp": 17}
_DIRECTIONS = ("src", "dst")

# Decimal only: libpcap reads "0120" as octal (port 80) and "0x50" as hex.
_PORT = re.compile(r"[1-9][0-9]{0,4}")
# What an expression of accepted primitives can contain; anything else
# (parentheses, !, ||, brackets, comparisons, %zone) is not ours to prove.
_CHARSET = re.compile(r"[A-Za-z0-9.:&\s-]*")


@dataclass
class _Conjunct:
    protocol: int = 0
    port: int = 0
    address: bytes = b""


def _port(token: str) -> int | None:
    if not _PORT.fullmatch(token):
        return None
    port = int(token)
    return port if port <= 0xFFFF else None


def _address(token: str) -> bytes | None:
    """A numeric IPv4 or IPv6 literal; anything else (a name needs DNS) is None.

    Python refuses what libpcap would read differently: "010.0.0.1" (leading
    zeros), "10.1" (inet_aton's short forms), zones.
    """
    try:
        return ipaddress.ip_address(token).packed
    except ValueError:
        return None


def _primitive(tokens: list[str]) -> _Conjunct | None:
    """One primitive of the accepted forms, or None.

    [tcp|udp] [src|dst] port N: libpcap matches TCP, UDP or SCTP over IPv4
      (first fragments only) or IPv6 (next header directly TCP/UDP/SCTP) whose
      source or destination port (just the one asked for, with src/dst) is N.
      The kernel reads the same ports of TCP and UDP; SCTP and every packet it
      finds no ports in pass. So "either port is N" holds for all of them.
    [src|dst] host A, src A, dst A: libpcap matches the IP packets with A as
      source or destination (just the one asked for, with src/dst), and for an
      IPv4 A also ARP and RARP frames naming A. The kernel rejects those (not
      IP): see prefilter() for when an IPv4 address may be used.
    """
    match tokens:
        case [proto] if proto in _PROTOCOLS:
            return _Conjunct(protocol=_PROTOCOLS[proto])
        case [*quals, "port", number] if (port := _port(number)) is not None:
            match quals:
                case [] | [("src" | "dst")]:
                    return _Conjunct(port=port)
                case [proto] | [proto, ("src" | "dst")] if proto in _PORT_PROTOCOLS:
                    return _Conjunct(protocol=_PORT_PROTOCOLS[proto], port=port)
            return None
        case ["host", literal] | [("src" | "dst"), "host", literal] | [("src" | "dst"), literal]:
            address = _address(literal)
            return None if address is None else _Conjunct(address=address)
    return None


def _tokens(expression: str) -> list[str] | None:
    if not _CHARSET.fullmatch(expression):
        return None
    tokens = expression.replace("&&", " && ").split()
    if any("&" in t and t != "&&" for t in tokens):
        return None
    return ["and" if t == "&&" else t for t in tokens]


def prefilter(expression: str) -> Prefilter:
    """The tightest kernel check this module can prove lets through all `expression` matches.

    Only conjunctions ("and", "&&") of the primitives _primitive() accepts are
    understood; for anything else the answer is Prefilter(), copy everything:
    or, not, parentheses, net, portrange, proto, vlan, byte offsets, host and
    service names, and qualifier inheritance ("port 80 and 443"). A
    conjunction matches only packets every primitive matches, so the kernel
    may check all of their constraints at once, as long as there is one value
    of each kind: two different ports, addresses or protocol classes give
    Prefilter() too (such a filter matches little or nothing; keeping it
    simple is worth more than tightening that).

    An IPv4 address is kept only when a protocol or port primitive is in the
    conjunction: those match IP packets only, which shuts out the ARP and RARP
    frames "host A" also matches and the kernel's address check rejects.
    """
    tokens = _tokens(expression)
    if not tokens:
        return Prefilter()
    terms: list[list[str]] = [[]]
    for word in tokens:
        if word == "and":
            terms.append([])
        else:
            terms[-1].append(word)
    found: list[_Conjunct] = []
    for term in terms:
        conjunct = _primitive(term)
        if conjunct is None:  # also an empty term: "tcp and", "and and"
            return Prefilter()
        found.append(conjunct)
    protocols = {c.protocol for c in found if c.protocol}
    ports = {c.port for c in found if c.port}
    addresses = {c.address for c in found if c.address}
    if len(protocols) > 1 or len(ports) > 1 or len(addresses) > 1:
        return Prefilter()
    protocol = protocols.pop() if protocols else 0
    port = ports.pop() if ports else 0
    address = addresses.pop() if addresses else b""
    if len(address) == 4 and not (protocol or port):
        address = b""
    return Prefilter(protocol=protocol, port=port, address=address)
