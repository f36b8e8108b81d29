"""The daemon's wiring: probe_states, which metadata source the settings stand for, the
wait for the API's first list."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from monitor import daemon, daemonconfig, monitormetrics
from monitor.kernel import source
from monitor.metadata.kubernetes import KubernetesSource
from monitor.metadata.static import NoMetadata, StaticInventory
from monitor.probes import select
from monitor.settings import Settings
from tests.fakeapi import FakeApiServer
from tests.unit.fakes import no_offsets_kernel
from tests.unit.test_bpf import ALL_TRACEPOINTS


def test_probe_states() -> None:
    wanted = select(["packets", "drops", "retransmits", "rtt"])
    notes = {"drops": "degraded: without kernel struct offsets ...",
             "retransmits": "not loaded: no kernel struct offsets (x)",
             "rtt": "not loaded: this kernel has no tracepoint sock:inet_sock_set_state"}
    assert monitormetrics.probe_states(wanted, notes) == {"packets": "loaded", "drops": "degraded",
                                                  "retransmits": "off", "rtt": "off"}


def test_probe_states_from_loadable() -> None:
    wanted = select([])
    _, notes = source.loadable(wanted, no_offsets_kernel(tracepoints=ALL_TRACEPOINTS))
    assert monitormetrics.probe_states(wanted, notes) == {
        "packets": "loaded", "peers": "loaded", "tcpflags": "loaded", "handshake": "loaded",
        "dns": "loaded", "dnsnames": "loaded",
        "drops": "degraded", "retransmits": "off", "rtt": "off", "trace": "loaded"}


def test_probe_states_ignore_notes_of_probes_not_wanted() -> None:
    assert monitormetrics.probe_states(select(["packets"]), {"rtt": "not loaded: x"}) == {"packets": "loaded"}


# -- which metadata source `auto` stands for, and how it is built ---------------------------------

@pytest.mark.parametrize(("settings", "environ", "mode"), [
    pytest.param({}, {}, "none", id="nothing"),
    pytest.param({"inventory": "/etc/inv.yaml"}, {}, "inventory", id="inventory"),
    pytest.param({"kubeconfig": "/etc/kube/config"}, {}, "kubernetes", id="kubeconfig"),
    pytest.param({}, {"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, "kubernetes", id="in-cluster"),
    pytest.param({}, {"KUBERNETES_SERVICE_HOST": ""}, "none", id="empty-service-host"),
    pytest.param({"inventory": "/etc/inv.yaml", "kubeconfig": "/etc/kube/config"},
                 {"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, "inventory", id="inventory-first"),
    pytest.param({"metadata": "none", "kubeconfig": "/etc/kube/config"},
                 {"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, "none", id="explicit-none"),
    pytest.param({"metadata": "kubernetes"}, {}, "kubernetes", id="explicit-kubernetes"),
    pytest.param({"metadata": "kubernetes", "inventory": "/etc/inv.yaml"}, {}, "kubernetes",
                 id="explicit-over-inventory"),
    pytest.param({"metadata": "inventory", "inventory": "/etc/inv.yaml"},
                 {"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, "inventory", id="explicit-inventory"),
])
def test_metadata_mode(settings: dict[str, str], environ: dict[str, str], mode: str) -> None:
    assert daemonconfig.metadata_mode(Settings(node_name="node-a", **settings), environ) == mode


def test_kubernetes_source_from_settings(tmp_path: Path) -> None:
    server = FakeApiServer(node="node-a").start()
    try:
        kubeconfig = server.write_kubeconfig(str(tmp_path / "kubeconfig"))
        source = daemonconfig.metadata_source(Settings(node_name="node-a", kubeconfig=kubeconfig,
                                                          pod_labels=("app",)))
        assert isinstance(source, KubernetesSource)
        assert isinstance(source, daemonconfig.KubernetesLike)
        assert source.cache._allow == ("app",)
        assert source._node == "node-a"
        assert server.requests == []  # built, not started: the daemon starts it later
    finally:
        server.stop()


def test_bad_kubeconfig_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(daemonconfig.ConfigError, match=r"^cannot configure the Kubernetes client: "):
        daemonconfig.metadata_source(Settings(node_name="node-a", metadata="kubernetes",
                                              kubeconfig=str(tmp_path / "missing")))


def test_other_sources_from_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text("pods: []\n")
    source = daemonconfig.metadata_source(Settings(node_name="node-a", inventory=str(inventory)))
    assert isinstance(source, StaticInventory)
    assert not isinstance(source, daemonconfig.KubernetesLike)
    assert isinstance(daemonconfig.metadata_source(Settings(node_name="node-a")), NoMetadata)


class _Listing:
    def __init__(self) -> None:
        self.synced = threading.Event()


def test_first_pass_waits_for_the_first_list_but_not_forever(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon, "FIRST_LIST_WAIT", 0.2)
    never = _Listing()
    started = time.monotonic()
    daemon._await_first_list(never)  # an API that does not answer: counting starts anyway
    assert 0.2 <= time.monotonic() - started < 1.0
    answered = _Listing()
    threading.Timer(0.05, answered.synced.set).start()
    started = time.monotonic()
    daemon._await_first_list(answered)
    assert time.monotonic() - started < 0.2  # no longer than the list takes
    started = time.monotonic()
    daemon._await_first_list(NoMetadata())  # a source without a list: no wait
    assert time.monotonic() - started < 0.05
