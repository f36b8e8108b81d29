"""daemon.probe_states: what podnet_monitor_probe_state reports for each wanted probe."""

from __future__ import annotations

from monitor import bpf, daemon
from monitor.probes import select
from tests.unit.fakes import no_offsets_kernel
from tests.unit.test_bpf import ALL_TRACEPOINTS


def test_probe_states() -> None:
    wanted = select(["packets", "drops", "retransmits", "rtt"])
    notes = {"drops": "degraded: without kernel struct offsets ...",
             "retransmits": "not loaded: no kernel struct offsets (x)",
             "rtt": "not loaded: this kernel has no tracepoint sock:inet_sock_set_state"}
    assert daemon.probe_states(wanted, notes) == {"packets": "loaded", "drops": "degraded",
                                                  "retransmits": "off", "rtt": "off"}


def test_probe_states_from_loadable() -> None:
    wanted = select([])
    _, notes = bpf.loadable(wanted, no_offsets_kernel(tracepoints=ALL_TRACEPOINTS))
    assert daemon.probe_states(wanted, notes) == {
        "packets": "loaded", "tcpflags": "loaded", "handshake": "loaded", "dns": "loaded",
        "drops": "degraded", "retransmits": "off", "rtt": "off"}


def test_probe_states_ignore_notes_of_probes_not_wanted() -> None:
    assert daemon.probe_states(select(["packets"]), {"rtt": "not loaded: x"}) == {"packets": "loaded"}
