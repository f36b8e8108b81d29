"""The tc requests of our rtnetlink client, the few the attacher makes: a clsact qdisc
added; cls_bpf filters added, replaced, dumped and deleted. Each change is byte for
byte what pyroute2 0.9 sends for the same call (tests/kernel/test_rtnl_tc.py holds
them side by side).
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass

from monitor.kernel.rtnlexchange import RtnlExchange
from monitor.kernel.rtnlwire import (
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
    S32_MAX,
    U32,
    U32_MAX,
    RtnlError,
    attr_spans,
    cstr,
    malformed,
    pack_attr,
    u32_attr,
)

# <linux/rtnetlink.h>
RTM_NEWQDISC, RTM_DELQDISC, RTM_NEWTFILTER, RTM_DELTFILTER, RTM_GETTFILTER = 36, 37, 44, 45, 46
# a filter chain made by a device's first filter at a hook, deleted with its last
RTM_NEWCHAIN, RTM_DELCHAIN = 100, 101
TCA_KIND = 1
TCA_OPTIONS = 2

# <linux/pkt_sched.h>
TC_H_CLSACT = 0xFFFFFFF1         # = TC_H_INGRESS: clsact's parent (the device's ingress slot)
TC_H_CLSACT_HANDLE = 0xFFFF0000  # TC_H_MAKE(TC_H_CLSACT, 0): clsact's own handle, ffff:
TC_H_MIN_INGRESS = 0xFFF2
TC_H_MIN_EGRESS = 0xFFF3
TC_PARENT_INGRESS = 0xFFFF0000 | TC_H_MIN_INGRESS  # ffff:fff2, clsact's ingress hook
TC_PARENT_EGRESS = 0xFFFF0000 | TC_H_MIN_EGRESS    # ffff:fff3, its egress hook

# <linux/pkt_cls.h>
TCA_BPF_CLASSID = 3
TCA_BPF_FD = 6
TCA_BPF_NAME = 7
TCA_BPF_FLAGS = 8
TCA_BPF_ID = 11                  # in a dump: the program's id (kernel 4.13)
TCA_BPF_FLAG_ACT_DIRECT = 1      # "direct-action": the program's return code is the verdict

# <linux/if_ether.h>
ETH_P_ALL = 0x0003               # goes into tcm_info in network order, as tc and pyroute2 send it

_TCMSG = struct.Struct("=BxxxiIII")   # family, 3 pad, ifindex, handle, parent, info (prio << 16 | protocol)


@dataclass(frozen=True, slots=True)
class TcFilter:
    """One classifier on a tc hook, as a filter dump gives it."""

    kind: str              # TCA_KIND: "bpf", "u32", "matchall", ...
    parent: int            # tcm_parent: TC_PARENT_INGRESS or TC_PARENT_EGRESS on clsact
    prio: int              # tc's "pref": the upper half of tcm_info
    handle: int            # tcm_handle
    protocol: int          # the lower half of tcm_info, in host order (ETH_P_ALL is 3)
    name: str = ""         # TCA_BPF_NAME; "" if absent or not a bpf filter
    prog_id: int = 0       # TCA_BPF_ID; 0 if absent or not a bpf filter
    direct_action: bool = False  # TCA_BPF_FLAGS has TCA_BPF_FLAG_ACT_DIRECT


def _parse_filter(buf: bytearray, off: int, end: int, what: str) -> TcFilter | None:
    """One RTM_NEWTFILTER payload of a dump; None for a classifier's own entry.

    The kernel starts each classifier instance (one per chain and prio) of a dump with
    an entry for the instance itself: handle 0, TCA_KIND and TCA_CHAIN, no TCA_OPTIONS
    (tcf_chain_dump); `tc filter show` prints it as the line without a handle,
    "filter protocol all pref 1 bpf chain 0". Those are skipped: no classifier gives
    one of its filters handle 0 (cls_bpf picks a free one when asked for 0).
    """
    if end - off < _TCMSG.size:
        raise malformed(what, "short tcmsg")
    _family, _ifindex, handle, parent, info = _TCMSG.unpack_from(buf, off)
    if not handle:
        return None
    attrs = attr_spans(buf, off + _TCMSG.size, end, what)
    kind_at, kind_end = attrs.get(TCA_KIND, (0, 0))
    if not kind_at:
        raise malformed(what, f"filter {handle:#x} has no TCA_KIND")
    kind = cstr(buf, kind_at, kind_end)
    name, prog_id, flags = "", 0, 0
    opt_at, opt_end = attrs.get(TCA_OPTIONS, (0, 0))
    if kind == "bpf" and opt_at:
        bpf = attr_spans(buf, opt_at, opt_end, what)
        name_at, name_end = bpf.get(TCA_BPF_NAME, (0, 0))
        name = cstr(buf, name_at, name_end) if name_at else ""
        prog_id = u32_attr(buf, bpf, TCA_BPF_ID, what)
        flags = u32_attr(buf, bpf, TCA_BPF_FLAGS, what)
    return TcFilter(kind=kind, parent=parent, prio=info >> 16, handle=handle,
                    protocol=socket.ntohs(info & 0xFFFF), name=name, prog_id=prog_id,
                    direct_action=bool(flags & TCA_BPF_FLAG_ACT_DIRECT))


def _tc_id(handle: int) -> str:
    """A tc handle or parent as tc writes it: ffff:fff2."""
    return f"{handle >> 16:x}:{handle & 0xFFFF:x}"


def _tcmsg(what: str, ifindex: int, *, handle: int, parent: int, prio: int | None) -> bytes:
    """A struct tcmsg; with `prio`, a filter's (tcm_info: prio and ETH_P_ALL). Numbers out
    of range fail here, as the kernel would, rather than in struct or on a wrong filter
    (prio 0 asks the kernel to pick one; with no handle it deletes a whole chain)."""
    if not 0 < ifindex <= S32_MAX:
        raise RtnlError(errno.ENODEV, f"{what}: no such device")
    if not (0 <= handle <= U32_MAX and 0 <= parent <= U32_MAX):
        raise RtnlError(errno.EINVAL, f"{what}: handle or parent out of range")
    info = 0
    if prio is not None:
        if not 0 < prio <= 0xFFFF:
            raise RtnlError(errno.EINVAL, f"{what}: prio out of range (1-65535)")
        info = prio << 16 | socket.htons(ETH_P_ALL)
    return _TCMSG.pack(socket.AF_UNSPEC, ifindex, handle, parent, info)


class TcRequests(RtnlExchange):
    """A clsact qdisc and cls_bpf filters, asked for over one RtnlExchange."""

    # -- tc ------------------------------------------------------------------------------
    #
    # Each change asks for an ACK (NLM_F_ACK), so that success is an answer too, and is
    # sent once: never again after an error, which is the caller's to judge.

    def add_clsact(self, ifindex: int) -> None:
        """Adds a clsact qdisc to a device. One already there (the CNI's, or ours from
        before) fails with errno EEXIST, as does an ingress qdisc (same slot)."""
        what = f"RTM_NEWQDISC clsact ifindex {ifindex}"
        body = _tcmsg(what, ifindex, handle=TC_H_CLSACT_HANDLE, parent=TC_H_CLSACT, prio=None)
        self._change(what, RTM_NEWQDISC, NLM_F_CREATE | NLM_F_EXCL,
                     body + pack_attr(TCA_KIND, b"clsact\0"))

    def add_bpf_filter(self, ifindex: int, *, parent: int, prio: int, handle: int, fd: int,
                       name: str, direct_action: bool = True, classid: int = 1) -> None:
        """Adds a cls_bpf filter running program `fd`; EEXIST if this prio and handle
        hold one (of any kind) already."""
        self._bpf_filter("add", NLM_F_CREATE | NLM_F_EXCL, ifindex, parent=parent, prio=prio,
                         handle=handle, fd=fd, name=name, direct_action=direct_action, classid=classid)

    def replace_bpf_filter(self, ifindex: int, *, parent: int, prio: int, handle: int, fd: int,
                           name: str, direct_action: bool = True, classid: int = 1) -> None:
        """Puts a cls_bpf filter running program `fd` at this prio and handle: a new one,
        or the one there swapped in place (atomically: no packet sees neither program).
        A filter of another kind there fails (EINVAL)."""
        self._bpf_filter("replace", NLM_F_CREATE | NLM_F_REPLACE, ifindex, parent=parent, prio=prio,
                         handle=handle, fd=fd, name=name, direct_action=direct_action, classid=classid)

    def _bpf_filter(self, op: str, flags: int, ifindex: int, *, parent: int, prio: int, handle: int,
                    fd: int, name: str, direct_action: bool, classid: int) -> None:
        # Byte for byte what pyroute2 0.9's tc("replace-filter"/"add-filter", "bpf", ...)
        # sends, attributes in its order: TCA_KIND "bpf", then TCA_OPTIONS (not marked
        # nested) { CLASSID, FD, NAME, FLAGS }, FLAGS always there.
        what = (f"RTM_NEWTFILTER {op} bpf {name!r} ifindex {ifindex} parent {_tc_id(parent)} "
                f"prio {prio} handle {handle:#x}")
        body = _tcmsg(what, ifindex, handle=handle, parent=parent, prio=prio)
        if not 0 <= fd <= S32_MAX:
            raise RtnlError(errno.EBADF, f"{what}: not a file descriptor")
        if not 0 <= classid <= U32_MAX:
            raise RtnlError(errno.EINVAL, f"{what}: classid out of range")
        options = (pack_attr(TCA_BPF_CLASSID, U32.pack(classid)) + pack_attr(TCA_BPF_FD, U32.pack(fd))
                   + pack_attr(TCA_BPF_NAME, name.encode("utf-8", "surrogateescape") + b"\0")
                   + pack_attr(TCA_BPF_FLAGS, U32.pack(TCA_BPF_FLAG_ACT_DIRECT if direct_action else 0)))
        self._change(what, RTM_NEWTFILTER, flags,
                     body + pack_attr(TCA_KIND, b"bpf\0") + pack_attr(TCA_OPTIONS, options))

    def delete_filter(self, ifindex: int, *, parent: int, prio: int, handle: int | None = None,
                      kind: str | None = "bpf") -> None:
        """Deletes the filter at this prio and handle, or with no handle every filter at
        this prio. The kernel says ENOENT if there is none, EINVAL if the prio holds
        another kind (or protocol: ours is ETH_P_ALL), ENODEV without the device;
        `kind` None sends no kind and deletes whatever kind is there."""
        what = (f"RTM_DELTFILTER {kind or ''} ifindex {ifindex} parent {_tc_id(parent)} prio {prio}"
                + (f" handle {handle:#x}" if handle is not None else ""))
        body = _tcmsg(what, ifindex, handle=handle or 0, parent=parent, prio=prio)
        if kind is not None:
            body += pack_attr(TCA_KIND, kind.encode("utf-8", "surrogateescape") + b"\0")
        self._change(what, RTM_DELTFILTER, 0, body)

    def filters(self, ifindex: int, parent: int) -> list[TcFilter]:
        """The filters on one hook of a device (RTM_GETTFILTER dump), in the kernel's
        order (by chain, then prio). Empty if the device has no such hook, or no device
        by that index: the kernel answers those dumps with nothing, not an error."""
        what = f"RTM_GETTFILTER dump ifindex {ifindex} parent {_tc_id(parent)}"
        body = _tcmsg(what, ifindex, handle=0, parent=parent, prio=None)

        def parse(off: int, end: int) -> TcFilter | None:
            return _parse_filter(self._buf, off, end, what)

        return self._call(what, RTM_GETTFILTER, NLM_F_REQUEST | NLM_F_DUMP, body,
                          reply_type=RTM_NEWTFILTER, parse=parse)
