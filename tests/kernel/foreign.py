"""Another agent's programs on a pod's veth: loaded with BCC and attached with the
`tc` command or a bare prog_attach, never through podnetmon's own adapter."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from bcc import BPF, libbcc  # type: ignore[import-untyped]

TCX_INGRESS, TCX_EGRESS = 46, 47
BPF_F_BEFORE = 1 << 3

_SOURCE = r"""
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
BPF_ARRAY(seen, u64, 2);
static __always_inline int count(int slot) {
    u64 *v = seen.lookup(&slot);
    if (v) __sync_fetch_and_add(v, 1);
    return VERDICT;
}
int foreign_in(struct __sk_buff *skb) {
#ifdef REDIRECT_PEER
    /* what Cilium's host routing does for traffic to a local pod: straight into the
     * pod's netns, past its host veth */
    if (skb->protocol == bpf_htons(ETH_P_IP)) {
        count(0);
        return bpf_redirect_peer(REDIRECT_PEER, 0);
    }
#endif
    return count(0);
}
int foreign_out(struct __sk_buff *skb) { return count(1); }
"""


class ForeignPrograms:
    """Two counting programs (one per hook) returning a fixed verdict."""

    def __init__(self, verdict: str = "TC_ACT_UNSPEC", redirect_peer: int = 0) -> None:
        """redirect_peer: the ifindex of a host veth whose pod gets every IPv4 packet the
        ingress program sees, by bpf_redirect_peer()."""
        cflags = [f"-DVERDICT={verdict}"]
        if redirect_peer:
            cflags.append(f"-DREDIRECT_PEER={redirect_peer}")
        self.bpf = BPF(text=_SOURCE.encode(), cflags=cflags)
        self.ingress = self.bpf.load_func(b"foreign_in", BPF.SCHED_CLS)
        self.egress = self.bpf.load_func(b"foreign_out", BPF.SCHED_CLS)
        self._pins: list[Path] = []
        self._tc: list[tuple[str, str, int]] = []
        self._tcx: list[tuple[object, int, int]] = []
        self._closed = False

    def counts(self) -> tuple[int, int]:
        """(packets seen at TC ingress, at TC egress)."""
        table = self.bpf[b"seen"]
        return int(table[0].value), int(table[1].value)

    def attach_tc(self, dev: str, prio: int, hooks: tuple[str, ...] = ("ingress", "egress")) -> None:
        """`tc filter add ... bpf object-pinned ... da` at the given priority."""
        subprocess.run(["tc", "qdisc", "add", "dev", dev, "clsact"], capture_output=True,
                       check=False)
        for fn, hook in ((self.ingress, "ingress"), (self.egress, "egress")):
            if hook not in hooks:
                continue
            pin = Path(f"/sys/fs/bpf/pnmtest-{os.getpid()}-{dev}-{hook}")
            assert libbcc.lib.bpf_obj_pin(fn.fd, str(pin).encode()) == 0
            self._pins.append(pin)
            subprocess.run(["tc", "filter", "add", "dev", dev, hook, "prio", str(prio), "handle",
                            "1", "bpf", "object-pinned", str(pin), "da"], check=True)
            self._tc.append((dev, hook, prio))

    def attach_tcx(self, ifindex: int, first: bool = False) -> None:
        """Appended after the device's tcx programs, or with `first` ahead of all of them
        (BPF_F_BEFORE with no anchor), as an agent that insists on running first would."""
        for fn, hook in ((self.ingress, TCX_INGRESS), (self.egress, TCX_EGRESS)):
            if first:
                err = libbcc.lib.bpf_prog_attach(fn.fd, ifindex, hook, BPF_F_BEFORE)
                assert err == 0, f"bpf_prog_attach before all: {os.strerror(-err)}"
            else:
                BPF.attach_func(fn, ifindex, hook)
            self._tcx.append((fn, ifindex, hook))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for dev, hook, prio in self._tc:
            subprocess.run(["tc", "filter", "del", "dev", dev, hook, "prio", str(prio)],
                           capture_output=True, check=False)
        for fn, ifindex, hook in self._tcx:
            try:
                BPF.detach_func(fn, ifindex, hook)
            except Exception:  # noqa: BLE001 - the device may be gone already
                pass
        for pin in self._pins:
            pin.unlink(missing_ok=True)
        self.bpf.cleanup()
