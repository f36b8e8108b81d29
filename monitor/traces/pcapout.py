"""A packet session written out as pcapng, in time order, until it ends or a limit ends
it: the consumer's side of a trace (an HTTP response, a stored capture), run in the
consumer's thread.
"""

from __future__ import annotations

import io
import queue
import time
from collections.abc import Callable
from typing import BinaryIO, cast

from monitor.traces.pcapng import PcapngWriter
from monitor.traces.reorder import MAX_HOLD_NS, Released, ReorderWindow
from monitor.traces.session import Session

# Frames waiting in a trace's reorder window (monitor/reorder.py), at most: a poll's worth
# at any rate a trace keeps up with; their bytes count in QUEUE_BYTES until written.
REORDER_FRAMES = 10_000


def write_pcapng(session: Session, out: BinaryIO | io.BufferedIOBase, node: str, flush_each: bool = True,
                 progress: Callable[[Session], None] | None = None) -> None:
    """Write a packet session as pcapng until it ends; ends it on a limit.

    Runs in the consumer's thread. Raises nothing for a client that goes away:
    the session ends with that reason.
    """
    pod, req = session.pod, session.request
    comments = [f"podnetmon trace of {pod.namespace}/{pod.name} on node {node}",
                f"filter: {req.filter or '(none)'}; snaplen {req.snaplen}; limits: "
                f"{req.duration:g} s, {req.packets} packets, {req.bytes} bytes"]
    try:
        writer = PcapngWriter(cast(BinaryIO, out), comments=comments)
        interface_of: dict[int, int] = {}  # slot -> pcapng interface id
        for _ifindex, veth, slot in session.interfaces:
            name = f"{pod.namespace}/{pod.name}"
            if len(session.interfaces) > 1:
                name += f"/{veth}"
            interface_of[slot] = writer.add_interface(
                name, f"node={node} netns={pod.netns_inode} host_veth={veth}",
                snaplen=req.snaplen)
        out.flush()
        # Frames wait here until none stamped earlier can still come (monitor/reorder.py);
        # their bytes stay counted in the session's budget until they are written.
        window: ReorderWindow[Frame] = ReorderWindow(max_frames=REORDER_FRAMES)
        full = False
        while not full:
            # the watermark first, then the queue: every frame stamped up to it was
            # queued before the reader set it, so it is in the window below
            mark = max(session.watermark,
                       time.monotonic_ns() + session.wall_offset - MAX_HOLD_NS)
            over = _take(session, window)
            frames = window.flush() if over else window.release(mark)
            for frame in frames:
                session.release(len(frame.item[3]))
                if not _write_frame(session, writer, interface_of, frame,
                                    out if flush_each else None):
                    full = True  # the byte limit: never more than asked for
                    break
                if progress is not None:
                    progress(session)
                if session.packets >= req.packets:
                    session.end("packet limit reached")
                    full = True
                    break  # not one more, even if more are waiting
            if over:
                break
        for frame in window.flush():  # a limit ended it: these are not written
            session.release(len(frame.item[3]))
        lost = session.lost_kernel + session.lost_queue
        for slot, iface in interface_of.items():
            # lost packets cannot be told apart by interface: each block carries them all
            writer.statistics(iface, received=session.packets_by_slot.get(slot, 0), dropped=lost,
                              timestamp_ns=time.time_ns(),
                              comment=f"ended: {session.ended}; lost {session.lost_kernel} in "
                                      f"the kernel's buffer, {session.lost_queue} waiting for "
                                      f"the writer; {session.late} written out of time order "
                                      "(they came after the reorder window)")
        out.flush()
    except TimeoutError:  # the output bounds its writes (traceapi: the trace's deadline)
        session.end("the client stopped reading")
    except (BrokenPipeError, ConnectionError):
        session.end("the client went away")
    except OSError as exc:  # a full disk under a stored capture, say: keep what was written
        session.end(f"write failed: {exc.strerror or exc}")


Frame = tuple[int, int, str, bytes, int]  # ts (wall ns), slot, direction, data, length


def _take(session: Session, window: ReorderWindow[Frame]) -> bool:
    """Move what the reader queued into the window (waiting a little for the first), one
    past its bound at most, so that its oldest leaves early rather than the window grow
    (the queue behind it is bounded too); True once the session is over and nothing more
    will come."""
    try:
        item = session.queue.get(timeout=0.1)
    except queue.Empty:
        return session.done.is_set()
    window.push(item[0], item)
    while len(window) <= window.max_frames:
        try:
            item = session.queue.get_nowait()
        except queue.Empty:
            break
        window.push(item[0], item)
    return False


def _write_frame(session: Session, writer: PcapngWriter, interface_of: dict[int, int],
                 frame: Released[Frame], out: BinaryIO | io.BufferedIOBase | None) -> bool:
    """Write one frame; False, the frame not written, when it would pass the byte limit
    (which ends the session)."""
    ts, slot, direction, data, length = frame.item
    req = session.request
    data = data[: req.snaplen]
    if session.bytes + len(data) > req.bytes:
        session.end("byte limit reached")
        return False
    if slot in interface_of:
        comment = None
        if frame.late_ns:
            session.late += 1
            comment = (f"out of time order: stamped {frame.late_ns / 1000:.0f} us before the "
                       "frame written before it, it came after the reorder window")
        writer.packet(interface_of[slot], ts, data, length, direction=direction, comment=comment)
        session.packets += 1
        session.bytes += len(data)
        session.packets_by_slot[slot] = session.packets_by_slot.get(slot, 0) + 1
        if out is not None:
            out.flush()
    return True
