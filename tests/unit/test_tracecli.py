"""monitor.traces.cli: the progress counter of `podnetmon trace` over a pcapng stream."""

from __future__ import annotations

import io
import itertools

import pytest

from monitor.traces.cli import BlockCounter
from monitor.traces.pcapng import PcapngWriter


def stream() -> tuple[bytes, list[int]]:
    """A pcapng stream and, for each of its EPBs, the offset at which the block ends."""
    out = io.BytesIO()
    writer = PcapngWriter(out, comments=["a trace"])
    a = writer.add_interface("shop/web/veth7", "node=n1", snaplen=1500)
    b = writer.add_interface("shop/web/veth9", "node=n1", snaplen=96)
    ends = []
    for i in range(7):
        size = 60 + 37 * i  # odd lengths: every block has padding
        writer.packet(a if i % 2 else b, 1_700_000_000_000_000_000 + i, bytes([i]) * min(size, 96),
                      size, direction="inbound" if i % 3 else "outbound", comment="x" * i or None)
        ends.append(out.tell())
    writer.statistics(a, received=7, dropped=1, timestamp_ns=1_700_000_001_000_000_000, comment="end")
    return out.getvalue(), ends


@pytest.mark.parametrize("sizes", [[1], [3], [7, 1, 13], [4096], [11, 64, 2, 29]])
def test_epbs_are_counted_exactly_whatever_the_chunks(sizes: list[int]) -> None:
    data, ends = stream()
    counter = BlockCounter()
    fed = 0
    for size in itertools.cycle(sizes):
        if fed >= len(data):
            break
        chunk = data[fed: fed + size]
        counter.feed(chunk)
        fed += len(chunk)
        # never a block before all of it has come, and every one that has
        assert counter.packets == sum(1 for end in ends if end <= fed), fed
    assert (counter.packets, counter.bytes) == (7, len(data))


def test_a_stream_cut_inside_a_packet_does_not_count_it() -> None:
    data, ends = stream()
    counter = BlockCounter()
    counter.feed(data[: ends[3] - 1])
    assert counter.packets == 3
    counter.feed(data[ends[3] - 1: ends[3]])
    assert counter.packets == 4


def test_nothing_but_headers_counts_nothing() -> None:
    out = io.BytesIO()
    writer = PcapngWriter(out)
    writer.add_interface("x", "y", snaplen=0)
    counter = BlockCounter()
    counter.feed(out.getvalue())
    counter.feed(b"")
    assert (counter.packets, counter.bytes) == (0, len(out.getvalue()))
