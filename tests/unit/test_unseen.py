"""What a veth carried before the attach: the baseline's reads and the way each may err.

The kernel test (tests/kernel/test_churn.py) holds the baseline plus our counts against
the veths' own statistics; here a scripted kernel puts a packet "in flight" between the
reads, to show that each direction's error is one way and the best read is kept.
"""

from __future__ import annotations

from collections.abc import Iterator

from monitor.identity import IdentityIndex
from monitor.kernel.records import VethCounts
from monitor.probes import packets
from monitor.unseen import FORGET_AFTER, READS, Baseline, BeforeAttach, SlotTotals
from tests.unit.conftest import PodFactory
from tests.unit.fakes import DictMaps, u32


def counts(egress: int, ingress: int, size: int = 100) -> bytes:
    """A slot's packet counts: everything as UDP, `size` bytes a packet."""
    c = packets.Counts()
    udp = packets.PROTOCOLS.index("udp")
    for direction, n in (("egress", egress), ("ingress", ingress)):
        d = packets.DIRECTIONS.index(direction)
        c.packets[d][udp] = n
        c.bytes[d][udp] = n * size
    return bytes(c)


class Kernel:
    """Our counts and the veth's statistics, moved by a script at each read."""

    def __init__(self, slot: int, ours: tuple[int, int], veth: tuple[int, int]) -> None:
        self.slot, self.ours, self.veth = slot, list(ours), list(veth)
        self.maps = DictMaps({packets.MAP: {u32(slot): counts(*ours)}})
        self.script: Iterator[None] | None = None
        self.gone = False
        self.tx_dropped = 0  # handed to the veth, not delivered to the pod

    def _tick(self) -> None:
        if self.script is not None:
            next(self.script, None)
        self.maps.maps[packets.MAP][u32(self.slot)] = counts(*self.ours)

    def read_veth(self, ifindex: int) -> VethCounts | None:
        self._tick()
        if self.gone:
            return None
        (rx, tx) = self.veth
        return VethCounts(rx, rx * 100, tx, tx * 100, self.tx_dropped)


class TickingMaps:
    """The maps, each batch read first letting the script move the kernel on."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel

    def lookup_slots(self, name: str, slots: list[int]) -> list[bytes | None]:
        self.kernel._tick()
        return self.kernel.maps.lookup_slots(name, slots)

    def items(self, name: str) -> list[tuple[bytes, bytes]]:
        return list(self.kernel.maps.items(name))

    def lookup(self, name: str, key: bytes) -> bytes | None:
        return self.kernel.maps.lookup(name, key)


def totals_of(kernel: Kernel) -> SlotTotals:
    """Our counts as the packets probe reads them, from maps that tick with the kernel."""
    return lambda slots: packets.totals(TickingMaps(kernel), slots)  # type: ignore[arg-type]


def detector(kernel: Kernel, index: IdentityIndex) -> BeforeAttach:
    return BeforeAttach(totals_of(kernel), lambda: index, kernel.read_veth)


def test_a_quiet_veth_gives_its_statistics_less_ours(make_pod: PodFactory) -> None:
    index = IdentityIndex([make_pod(4026532001, [(7, "veth7")], namespace="a", name="p")], {7: 3})
    kernel = Kernel(3, ours=(5, 2), veth=(12, 6))  # 7 sent and 4 received before the attach
    unseen = detector(kernel, index)
    unseen.observe_new()
    assert unseen.by_pod(index) == {("a", "p"): Baseline(7, 700, 4, 400)}


def test_a_packet_in_flight_on_every_read_but_one_does_not_move_the_baseline(
        make_pod: PodFactory) -> None:
    index = IdentityIndex([make_pod(4026532001, [(7, "veth7")], namespace="a", name="p")], {7: 3})
    kernel = Kernel(3, ours=(0, 0), veth=(3, 2))  # 3 sent, 2 received before the attach

    def traffic() -> Iterator[None]:
        # each read is (ours, veth, ours): two rounds with a packet each way caught
        # between the statistics and our program, one round quiet
        for _ in range(READS - 1):
            yield  # ours read
            kernel.veth[0] += 1  # the pod sends: the veth counts it first, and a packet
            kernel.ours[1] += 1  # to the pod is counted by us before the veth counts it
            yield  # veth read
            kernel.ours[0] += 1  # then we count the sent one
            kernel.veth[1] += 1  # and the veth the received one
            yield  # ours read again

    kernel.script = traffic()
    unseen = detector(kernel, index)
    unseen.observe_new()
    assert unseen.by_pod(index) == {("a", "p"): Baseline(3, 300, 2, 200)}


def test_packets_through_every_one_of_three_reads_still_find_the_quiet_fourth(
        make_pod: PodFactory) -> None:
    """A noisy pod at its start (floods from pods being made beside it): three reads with
    a packet each way between the statistics and our second read made the pod's
    received count short by one, in a CI run of test_churn."""
    index = IdentityIndex([make_pod(4026532001, [(7, "veth7")], namespace="a", name="p")], {7: 3})
    kernel = Kernel(3, ours=(0, 0), veth=(3, 2))
    reads = []

    def traffic() -> Iterator[None]:
        for _ in range(3):
            yield  # ours read
            yield  # veth read
            kernel.veth[0] += 1  # a packet each way passes both the veth and our programs
            kernel.ours[0] += 1
            kernel.ours[1] += 1
            kernel.veth[1] += 1
            yield  # ours read again
        while True:
            reads.append(1)
            yield

    kernel.script = traffic()
    unseen = detector(kernel, index)
    unseen.observe_new()
    assert unseen.by_pod(index) == {("a", "p"): Baseline(3, 300, 2, 200)}
    assert len(reads) == 3  # the quiet fourth read (three steps) ended them


def test_an_interface_gone_while_measured_is_measured_at_the_next_pass(
        make_pod: PodFactory) -> None:
    index = IdentityIndex([make_pod(4026532001, [(7, "veth7")], namespace="a", name="p")], {7: 3})
    kernel = Kernel(3, ours=(1, 1), veth=(2, 2))
    kernel.gone = True
    unseen = detector(kernel, index)
    unseen.observe_new()
    assert unseen.by_pod(index) == {("a", "p"): Baseline(0, 0, 0, 0)}
    kernel.gone = False
    unseen.observe_new()
    assert unseen.by_pod(index) == {("a", "p"): Baseline(1, 100, 1, 100)}


def test_a_reused_ifindex_starts_afresh_and_pods_sum_their_veths(make_pod: PodFactory) -> None:
    first = IdentityIndex([make_pod(4026532001, [(7, "veth7")], namespace="a", name="p")], {7: 3})
    kernel = Kernel(3, ours=(0, 0), veth=(4, 0))
    current = [first]
    unseen = BeforeAttach(totals_of(kernel), lambda: current[0],
                          kernel.read_veth)
    unseen.observe_new()
    assert unseen.by_pod(first)[("a", "p")].egress_packets == 4
    # ifindex 7 now belongs to another pod's veth (another netns), with its own history
    second = IdentityIndex([make_pod(4026532002, [(7, "veth7"), (9, "veth9")], namespace="a",
                                     name="q")], {7: 3, 9: 3})
    current[0] = second
    kernel.veth = [1, 0]
    unseen.observe_new()
    # both of q's veths read the same fake statistics: 1 each, summed
    assert unseen.by_pod(second) == {("a", "q"): Baseline(2, 200, 0, 0)}


def test_what_the_veth_could_not_deliver_was_seen_by_us_and_is_not_before_the_attach(
        make_pod: PodFactory) -> None:
    index = IdentityIndex([make_pod(4026532001, [(7, "veth7")], namespace="a", name="p")], {7: 3})
    # 4 received before the attach; since, we counted 3 toward the pod, of which the veth
    # delivered 1 and dropped 2 (the pod's CPU backlog full): tx_packets 5, tx_dropped 2
    kernel = Kernel(3, ours=(0, 3), veth=(0, 5))
    kernel.tx_dropped = 2
    unseen = detector(kernel, index)
    unseen.observe_new()
    assert unseen.by_pod(index)[("a", "p")].ingress_packets == 4


def test_a_scrape_holding_the_snapshot_a_pod_was_in_still_finds_its_baseline(
        make_pod: PodFactory) -> None:
    # A scrape takes the identity snapshot, then the reconciler lets the pod go and the
    # detector runs, then the scrape reads the baselines under its snapshot: a series
    # that dropped to 0 there was a counter going down (test_monotonic, in CI)
    pod = make_pod(4026532001, [(7, "veth7")], namespace="a", name="p")
    with_pod = IdentityIndex([pod], {7: 3})
    kernel = Kernel(3, ours=(5, 2), veth=(12, 6))
    current = [with_pod]
    now = [100.0]
    unseen = BeforeAttach(totals_of(kernel), lambda: current[0], kernel.read_veth,
                          clock=lambda: now[0])
    unseen.observe_new()
    held_by_a_scrape = with_pod
    current[0] = IdentityIndex([], {})  # the pod went
    unseen.observe_new()
    assert unseen.by_pod(held_by_a_scrape) == {("a", "p"): Baseline(7, 700, 4, 400)}
    now[0] += FORGET_AFTER + 1
    unseen.observe_new()  # long gone: forgotten
    assert unseen.by_pod(held_by_a_scrape) == {("a", "p"): Baseline(0, 0, 0, 0)}
