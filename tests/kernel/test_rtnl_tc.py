"""monitor.kernel.rtnl's tc requests on the real kernel, beside pyroute2's.

A veth pair pnmrtc0/pnmrtc1 in the host netns: Rtnl makes its clsact and filters on
pnmrtc0, pyroute2 makes the same on pnmrtc1 with the calls the attacher makes today,
and `tc filter show` and `bpftool net` must see the two devices alike. The programs
are the smallest SCHED_CLS program (syscalls.load_unspec_program). Deleting the pair
takes its qdiscs and filters with it; the programs go when their fds close.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyroute2 import IPRoute  # type: ignore[import-untyped]

from monitor.kernel import syscalls
from monitor.kernel.rtnl import Rtnl
from monitor.kernel.rtnltc import TC_PARENT_EGRESS, TC_PARENT_INGRESS, TcFilter
from monitor.kernel.rtnlwire import RtnlError
from tests.kernel.support import bpftool_json, tc_filters

pytestmark = [pytest.mark.kernel,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("tc") is None
                                 or shutil.which("bpftool") is None,
                                 reason="needs root, iproute2, bpftool and the real kernel")]

OURS, THEIRS = "pnmrtc0", "pnmrtc1"   # Rtnl's device, pyroute2's
PRIO, HANDLE, NAME = 7, 0x2A, "pnm_rtnl_tc"
HOOKS = {"ingress": TC_PARENT_INGRESS, "egress": TC_PARENT_EGRESS}


def ip(*args: str, check: bool = True) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=30)
    if check and done.returncode:
        raise AssertionError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class Setup:
    ours: int       # ifindexes
    theirs: int
    progs: list[int]  # program fds
    ids: list[int]    # their ids, in the same order


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    ip("link", "del", OURS, check=False)  # whatever a crashed run left
    progs: list[int] = []
    try:
        ip("link", "add", OURS, "type", "veth", "peer", "name", THEIRS)
        progs = [syscalls.load_unspec_program() for _ in range(2)]
        yield Setup(ours=int(Path(f"/sys/class/net/{OURS}/ifindex").read_text()),
                    theirs=int(Path(f"/sys/class/net/{THEIRS}/ifindex").read_text()),
                    progs=progs, ids=[syscalls.prog_info(fd).prog_id for fd in progs])
    finally:
        ip("link", "del", OURS, check=False)
        for fd in progs:
            os.close(fd)


def net_tc(dev: str) -> list[dict[str, object]]:
    """`bpftool net show dev X`'s tc entries, without the device's name and index."""
    shown = bpftool_json("net", "show", "dev", dev)
    assert isinstance(shown, list)
    return [{k: v for k, v in entry.items() if k not in ("devname", "ifindex")}
            for part in shown for entry in part.get("tc", [])]


def test_filters_made_by_rtnl_look_like_pyroute2s(setup: Setup) -> None:
    with Rtnl() as rt, IPRoute() as ipr:
        # Nothing to dump yet: no clsact on either, and no device by an unused index.
        assert rt.filters(setup.ours, TC_PARENT_INGRESS) == []
        assert rt.filters(2**31 - 1, TC_PARENT_INGRESS) == []
        rt.add_clsact(setup.ours)
        ipr.tc("add", "clsact", setup.theirs)
        for parent in HOOKS.values():
            rt.replace_bpf_filter(setup.ours, parent=parent, prio=PRIO, handle=HANDLE,
                                  fd=setup.progs[0], name=NAME)
            ipr.tc("replace-filter", "bpf", setup.theirs, HANDLE, fd=setup.progs[0], name=NAME,
                   parent=parent, classid=1, direct_action=True, prio=PRIO)

        for hook, parent in HOOKS.items():
            shown = tc_filters(OURS, hook)
            assert f"pref {PRIO} bpf chain 0 handle {HANDLE:#x} flowid :1 {NAME} direct-action" in shown
            assert f" id {setup.ids[0]} " in shown
            assert shown == tc_filters(THEIRS, hook)  # the same program: identical, line for line
            want = [TcFilter(kind="bpf", parent=parent, prio=PRIO, handle=HANDLE, protocol=3,
                             name=NAME, prog_id=setup.ids[0], direct_action=True)]
            assert rt.filters(setup.ours, parent) == want
            assert rt.filters(setup.theirs, parent) == want
        assert net_tc(OURS) == net_tc(THEIRS)
        assert sorted((str(e["kind"]), e["name"], e["id"]) for e in net_tc(OURS)) == [
            ("clsact/egress", NAME, setup.ids[0]), ("clsact/ingress", NAME, setup.ids[0])]

        # An existing clsact, for Rtnl as for pyroute2 (which the attacher ignores today).
        with pytest.raises(RtnlError) as caught:
            rt.add_clsact(setup.ours)
        assert caught.value.errno == errno.EEXIST
        with pytest.raises(RtnlError) as caught:
            rt.add_clsact(setup.theirs)
        assert caught.value.errno == errno.EEXIST


def test_replace_in_place_add_and_delete(setup: Setup) -> None:
    ingress = TC_PARENT_INGRESS
    with Rtnl() as rt:
        try:
            rt.add_clsact(setup.ours)
        except RtnlError as exc:
            if exc.errno != errno.EEXIST:  # the first test's
                raise
        rt.replace_bpf_filter(setup.ours, parent=ingress, prio=PRIO, handle=HANDLE,
                              fd=setup.progs[0], name=NAME)
        # Again with the other program: the same filter, now running it.
        rt.replace_bpf_filter(setup.ours, parent=ingress, prio=PRIO, handle=HANDLE,
                              fd=setup.progs[1], name=NAME)
        (swapped,) = rt.filters(setup.ours, ingress)
        assert (swapped.prio, swapped.handle, swapped.name, swapped.prog_id) == (PRIO, HANDLE, NAME,
                                                                                 setup.ids[1])
        shown = tc_filters(OURS, "ingress")
        assert f" id {setup.ids[1]} " in shown and f" id {setup.ids[0]} " not in shown

        with pytest.raises(RtnlError) as caught:
            rt.add_bpf_filter(setup.ours, parent=ingress, prio=PRIO, handle=HANDLE,
                              fd=setup.progs[0], name=NAME)
        assert caught.value.errno == errno.EEXIST
        rt.add_bpf_filter(setup.ours, parent=ingress, prio=PRIO, handle=HANDLE + 1,
                          fd=setup.progs[0], name="pnm_second", direct_action=False)
        # cls_bpf lists its newest filter first
        assert [(f.handle, f.name, f.prog_id, f.direct_action) for f in rt.filters(setup.ours, ingress)] == [
            (HANDLE + 1, "pnm_second", setup.ids[0], False), (HANDLE, NAME, setup.ids[1], True)]

        rt.delete_filter(setup.ours, parent=ingress, prio=PRIO, handle=HANDLE)
        assert [f.handle for f in rt.filters(setup.ours, ingress)] == [HANDLE + 1]
        with pytest.raises(RtnlError) as caught:
            rt.delete_filter(setup.ours, parent=ingress, prio=PRIO, handle=HANDLE)
        assert caught.value.errno == errno.ENOENT
        with pytest.raises(RtnlError) as caught:  # the kind must match
            rt.delete_filter(setup.ours, parent=ingress, prio=PRIO, handle=HANDLE + 1, kind="u32")
        assert caught.value.errno == errno.EINVAL

        # No handle: everything at that prio.
        rt.delete_filter(setup.ours, parent=ingress, prio=PRIO)
        assert rt.filters(setup.ours, ingress) == []
        assert tc_filters(OURS, "ingress") == ""
        assert [e for e in net_tc(OURS) if e["kind"] == "clsact/ingress"] == []
        with pytest.raises(RtnlError) as caught:
            rt.delete_filter(setup.ours, parent=ingress, prio=PRIO)
        assert caught.value.errno == errno.ENOENT
