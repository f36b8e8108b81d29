"""The daemon's settings: one frozen dataclass, filled from flags and PODNETMON_* env.

Every field documents why its default is what it is. Every host path is a
setting, so that a DaemonSet can point the daemon at the host's /proc,
cgroup root, netns directories and bpffs mounted somewhere else. The daemon's
own settings are the table below; each registered probe adds the settings it owns
(Probe.settings), so a probe's timeout or limits are declared beside the code that
reads them. What makes a value bad: monitor/settingscheck.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from monitor.probes import REGISTRY
from monitor.probes.base import Probe
from monitor.settingscheck import ATTACH_MODES, problems, prometheus_label

__all__ = ["ATTACH_MODES", "EMPTY_ENV_IS_A_VALUE", "ENV_PREFIX", "CoreSettings", "Settings",
           "SettingsError", "add_arguments", "describe", "env_name", "flag_name", "from_sources",
           "names", "probe_list", "problems", "prometheus_label", "settings_class"]

ENV_PREFIX = "PODNETMON_"


class SettingsError(ValueError):
    """Settings the daemon cannot run with; `problems` lists every one, each naming its
    setting first, so that `run` can report them all at once rather than one per try."""

    def __init__(self, problems: str | Sequence[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


# Settings whose empty environment variable is a value, not "unset": for every other
# setting an empty PODNETMON_X means the default (a manifest's `value: ""`, or a template
# that rendered nothing, should not switch a setting off by accident). bpffs_root is the
# exception because empty is its documented "pin nothing", and an environment variable is
# the only way a DaemonSet can say it (its args are fixed by the image's entrypoint).
EMPTY_ENV_IS_A_VALUE = frozenset({"bpffs_root"})


def _doc(text: str, **kwargs: Any) -> Any:
    return field(metadata={"doc": text}, **kwargs)


@dataclass(frozen=True)
class CoreSettings:
    """What the daemon itself can be told; see each field's doc. Settings adds the probes'."""

    listen: str = _doc(
        "host:port of the one HTTP listener (/metrics, /healthz, /readyz, /api/v1). "
        "Port 9655 is podnetmon's; 0.0.0.0 because Prometheus scrapes the node IP.",
        default="0.0.0.0:9655")
    node_name: str = _doc(
        "This node's name, exported on podnet_pod_info. The DaemonSet sets NODE_NAME "
        "from the downward API; the hostname is the fallback on plain hosts.",
        default="")
    proc_root: str = _doc(
        "Where the host's /proc is mounted (hostPID DaemonSet: /proc). Pause processes and "
        "their cgroup paths (which carry the pod UID) are read there, so no cgroup mount "
        "is needed.", default="/proc")
    netns_dirs: tuple[str, ...] = _doc(
        "Directories where runtimes pin network namespaces (containerd: cni-*, CRI-O: "
        "a UUID). Both usual spellings by default, as /var/run is often a link to /run.",
        default=("/run/netns", "/var/run/netns"))
    bpffs_root: str = _doc(
        "Where bpffs is mounted (mounted there if it is not). Counter maps and links are "
        "pinned under <bpffs_root>/podnetmon, so a restarted daemon continues every counter. "
        "Empty: pin nothing (counters restart with the daemon).", default="/sys/fs/bpf")
    leave_attached: bool = _doc(
        "On stop, leave the programs attached and the maps pinned: they keep counting "
        "until the next daemon adopts them, so an upgrade or restart loses nothing "
        "(the DaemonSet sets this). Off: a stop removes everything the daemon added. "
        "`podnetmon cleanup` removes it all in either case.", default=False)
    tracefs_root: str = _doc("Where tracefs is mounted; BCC reads tracepoint formats there.",
                             default="/sys/kernel/tracing")
    pause_comm: str = _doc("The comm (process name) of the pod infra container. 'pause' "
                           "is what Kubernetes' pause image runs under every runtime.",
                           default="pause")
    metadata: str = _doc(
        "Where pod names come from: kubernetes (a node-scoped list+watch of the API), "
        "inventory (the static file), none (fallback names only), or auto: the inventory if "
        "one is given, else the API when in a cluster (KUBERNETES_SERVICE_HOST) or given a "
        "kubeconfig, else none.", default="auto")
    inventory: str = _doc("A static inventory file (YAML) mapping pod UIDs to names, for "
                          "hosts without a Kubernetes API and for the lab. Empty: none.",
                          default="")
    kubeconfig: str = _doc("A kubeconfig file for the API; empty: the in-cluster service "
                           "account.", default="")
    pod_labels: tuple[str, ...] = _doc(
        "Pod labels exported on podnet_pod_info (as label_<name>): an allow-list, because "
        "every label exported multiplies series. Empty: none.", default=())
    max_pods: int = _doc(
        "A hard cap on pods with series of their own. Pods beyond it are counted under "
        "namespace=pod=_overflow (nothing is lost), podnet_monitor_series_dropped_total "
        "counts them, and the log says so once.", default=1000)
    runtime_dirs: tuple[str, ...] = _doc(
        "Where container runtimes keep OCI bundles (config.json with the pod UID and the "
        "netns path): the UID of a pod with no pause process (CRI-O without an infra "
        "container) is read there, and podman's containers are named from them (the last "
        "is podman's default storage too).",
        default=("/run/containerd/io.containerd.runtime.v2.task/k8s.io",
                 "/run/containers/storage/overlay-containers",
                 "/var/lib/containers/storage/overlay-containers"))
    attach_mode: str = _doc(
        "auto: on a kernel with tcx, a device is attached by classic tc at once (0.04 ms "
        "a link) and moved to tcx once attached for tcx_move_after seconds (each tcx link "
        "holds the rtnl lock for an RCU grace period, ~10 ms, so pods that come and go "
        "never pay it), and at once where it carries tcx programs or another agent's "
        "classic filter runs before ours; classic tc where the kernel has no tcx. tc or "
        "tcx force one. tcx costs less per packet: bench/RESULTS.md.",
        default="auto")
    tcx_move_after: float = _doc(
        "Seconds a device stays on classic tc in attach_mode auto before it moves to tcx "
        "(2 devices a second, each counted once through the move); 0: never move.",
        default=60.0)
    tc_priority: int = _doc(
        "Priority of our classic tc filters. 4096 runs after CNIs that take the first "
        "slots (Cilium uses 1) and before filters added without a priority (the kernel "
        "gives those 49152 and down).", default=4096)
    tc_handle: int = _doc("Handle of our classic tc filters; with the priority and the "
                          "filter name 'podnetmon' it identifies ours, and only ours are "
                          "ever removed.", default=0x504E)
    resync_interval: float = _doc(
        "Seconds between full rescans. Link events (a veth added or removed, a lost-event "
        "overflow), API watch events and inventory edits trigger a pass at once; the "
        "periodic one catches what no event announces (a pause process that appears after "
        "its veth). A pass at 500 pods costs ~35 ms of CPU, so every 30 s.", default=30.0)
    event_debounce: float = _doc(
        "Seconds to wait after a netlink event for more before scanning, so a CNI's burst "
        "of link changes costs one scan. Well under the 1 s new-pod budget.", default=0.05)
    max_interfaces: int = _doc(
        "Interface slots: how many host veths can be watched at once. The per-interface "
        "counter arrays are per-CPU, so memory is slots x ~128 B x CPUs per probe; 1024 "
        "covers Kubernetes' pod limits (110 by default, 250 recommended at most).",
        default=1024)
    btf_path: str = _doc(
        "The running kernel's BTF, where kernel struct offsets come from. Without it, drops "
        "count under the node only and retransmits and RTT are off.",
        default="/sys/kernel/btf/vmlinux")
    sweep_interval: float = _doc(
        "Seconds between sweeps of pending handshakes and DNS queries for timeouts: how "
        "late past its timeout a timeout is counted at most.", default=1.0)
    bypass_check_interval: float = _doc(
        "Seconds between comparisons of each pod veth's own packet counts with ours, which "
        "notice another program ending packets' TC processing ahead of ours "
        "(podnet_monitor_bypassed). Reading every veth's statistics has a cost at hundreds "
        "of pods, hence not every second.", default=10.0)
    bpf_stats: bool = _doc(
        "Ask the kernel to time every BPF program run (podnet_monitor_bpf_run_seconds_total). "
        "Off by default: the timing itself costs ~20-30 ns per packet.", default=False)
    probes: tuple[str, ...] = _doc(
        "The probes to load, comma-separated; empty means every probe. Without `trace` the "
        "trace endpoints (capture, drops, alertmanager, captures) answer 404 'no such "
        "endpoint': they would have no kernel side to switch on.", default=())
    auth: str = _doc(
        "Who may read packets and drop details: token (a bearer token from --auth-token-file), "
        "kubernetes (TokenReview + SubjectAccessReview against the API), none (nobody), or "
        "auto: token if a file is given, else kubernetes in a cluster, else none.",
        default="auto")
    auth_audiences: tuple[str, ...] = _doc(
        "With auth=kubernetes, the audiences a bearer token must be meant for: the "
        "TokenReview names them and the API's answer must grant one, so a token made for "
        "the API server (or any other service) is refused here. Mint one with `kubectl "
        "create token SA --audience podnetmon`.", default=("podnetmon",))
    auth_token_file: str = _doc("A file holding the bearer token for auth=token; re-read when "
                                "it changes, so it can be rotated.", default="")
    tls_cert_file: str = _doc(
        "The listener's serving certificate (PEM, the chain after the leaf). With "
        "--tls-key-file the one listener speaks TLS 1.2+ only; both files are re-read when "
        "they change (a rotated Secret), with no restart. Empty: plain HTTP.", default="")
    tls_key_file: str = _doc("The serving certificate's private key (PEM).", default="")
    tls_client_ca_file: str = _doc(
        "CA bundle for optional client certificates: a client that presents one signed by "
        "it is known by its certificate (CN the user, O the groups, as the API server and "
        "kubelet read them) and needs no bearer token. Empty: client certificates are not "
        "asked for.", default="")
    allow_insecure_auth: bool = _doc(
        "Accept credentials (a bearer token) over plain HTTP from other hosts. Off: such a "
        "request is refused with 403 and the reason, because the token crossed the network "
        "in cleartext; loopback is always allowed. Only for a network you trust end to end.",
        default=False)
    auth_metrics: bool = _doc(
        "Authorize /metrics and /api/v1/pods too, as kube-rbac-proxy does: a SubjectAccess"
        "Review for the non-resource URL (verb get), so Prometheus presents a token granted "
        "`nonResourceURLs: [/metrics]`. The multi-tenant setting; off by default (/healthz "
        "and /readyz never need it).", default=False)
    http_max_connections: int = _doc(
        "Connections held open at most. Idle ones cost a socket, not a thread; when the cap "
        "is reached the connection idle longest (no request in progress) is closed for the "
        "new one, so held-open connections cannot lock scrapes out.", default=512)
    http_workers: int = _doc(
        "Threads serving /api requests (traces, drops, alerts) at once; /metrics, /healthz "
        "and /readyz have two threads of their own, so API work never delays a scrape.",
        default=8)
    http_header_timeout: float = _doc(
        "Seconds a client has to send a request's headers (and finish the TLS handshake) "
        "once it starts; slower ones are closed (408).", default=10.0)
    http_idle_timeout: float = _doc(
        "Seconds a keep-alive connection may wait for its next request (Prometheus keeps "
        "one per target between scrapes).", default=120.0)
    http_body_timeout: float = _doc("Seconds a client has to send a request body.",
                                    default=10.0)
    http_write_timeout: float = _doc(
        "Seconds a response may wait on a client that does not read; a trace streaming to "
        "a stalled client also ends at its own deadline.", default=30.0)
    auth_failures_per_minute: int = _doc(
        "Failed authentications allowed per client address per minute (bursts of a sixth "
        "of it); past it the address gets 429 with no TokenReview sent, so garbage tokens "
        "cannot make the daemon flood the API server.", default=60)
    auth_max_reviews: int = _doc(
        "TokenReviews and SubjectAccessReviews in flight at most; a request that finds no "
        "slot within a second gets 503.", default=4)
    log_level: str = _doc("debug, info, warning or error.", default="info")
    log_format: str = _doc("auto (JSON unless stderr is a terminal), json or console.",
                           default="auto")

    def __post_init__(self) -> None:
        if not self.node_name:
            object.__setattr__(self, "node_name", socket.gethostname())
        _validate(self)

    @property
    def listen_host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]") or "0.0.0.0"

    @property
    def listen_port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])


def _validate(s: CoreSettings) -> None:
    found = problems(s)
    if found:
        raise SettingsError(found)


def settings_class(probes: Iterable[Probe]) -> type[CoreSettings]:
    """The daemon's settings with those the probes own after its own, in registry order:
    a field each, documented, defaulted and checked as the probe declares it."""
    taken = {f.name for f in dataclasses.fields(CoreSettings)}
    added: list[tuple[str, str, Any]] = []
    for probe in probes:
        for setting in probe.settings:
            if setting.name in taken:
                raise ValueError(f"setting {setting.name!r} of probe {probe.name!r} is "
                                 "one the daemon has already")
            taken.add(setting.name)
            added.append((setting.name, setting.type, field(
                default=setting.default, metadata={"doc": setting.doc, "setting": setting})))
    cls = dataclasses.make_dataclass("Settings", added, bases=(CoreSettings,), frozen=True)
    cls.__module__ = __name__
    return cls


if TYPE_CHECKING:
    class Settings(CoreSettings):
        """CoreSettings and every registered probe's settings, which the type checker
        cannot know of: those read as Any (their probes check their values)."""

        def __getattr__(self, name: str) -> Any: ...
else:
    Settings = settings_class(REGISTRY.values())


def _convert(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = f.type
    try:
        if kind == "int":
            return int(raw, 0) if not raw.strip().isdigit() else int(raw, 10)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if kind == "tuple[str, ...]":
            return tuple(p.strip() for p in raw.split(",") if p.strip())
    except ValueError:
        raise SettingsError(f"{f.name}: {raw!r} is not a valid {kind}") from None
    return raw


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field; values stay strings here and are converted in from_sources."""
    for f in dataclasses.fields(Settings):
        default = f.default
        shown = ",".join(default) if isinstance(default, tuple) else default
        doc = f.metadata["doc"]
        if f.name == "probes":
            doc += " " + probe_list()
        parser.add_argument(flag_name(f.name), dest=f.name, default=None, metavar="VALUE",
                            help=f"{doc} [env {env_name(f.name)}; default {shown!r}]")


def probe_list() -> str:
    """Every probe of the registry with what it counts, for --probes' help."""
    return "The probes: " + "; ".join(f"{name}: {p.summary}" for name, p in REGISTRY.items()) + "."


def from_sources(flags: Mapping[str, Any] | argparse.Namespace,
                 environ: Mapping[str, str] | None = None,
                 overrides: Mapping[str, Any] | None = None) -> Settings:
    """Flags win over env, env over defaults. Raises SettingsError on bad values."""
    if isinstance(flags, argparse.Namespace):
        flags = vars(flags)
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    unreadable: dict[str, str] = {}  # setting -> why its value could not be converted
    for f in dataclasses.fields(Settings):
        raw = flags.get(f.name)
        if raw is None:
            raw = environ.get(env_name(f.name))
            if not raw and f.name not in EMPTY_ENV_IS_A_VALUE:
                raw = None  # an empty variable means unset (see EMPTY_ENV_IS_A_VALUE)
        if raw is None:
            continue
        try:
            values[f.name] = _convert(f, raw) if isinstance(raw, str) else raw
        except SettingsError as exc:
            unreadable[f.name] = str(exc)
    if "node_name" not in values and environ.get("NODE_NAME"):
        values["node_name"] = environ["NODE_NAME"]  # the downward API's usual name
    values.update(overrides or {})
    for name in overrides or {}:
        unreadable.pop(name, None)
    if not unreadable:
        return Settings(**values)
    # Some values could not even be read: check the rest all the same, so that every
    # problem is reported at once. A problem of the rest that names an unreadable
    # setting (two settings checked together, one of them now at its default) is left
    # out: it would be about a value nobody gave.
    try:
        Settings(**values)
        rest: list[str] = []
    except SettingsError as exc:
        rest = [p for p in exc.problems if not _names_any(p, unreadable)]
    raise SettingsError([*unreadable.values(), *rest])


def _names_any(problem: str, names: Mapping[str, str]) -> bool:
    """Whether a problem ("a and b: why") is about one of these settings."""
    subject = problem.split(":", 1)[0]
    return any(word in names for word in subject.replace(",", " ").split())


def describe(settings: Settings) -> dict[str, Any]:
    return dataclasses.asdict(settings)


def names() -> Sequence[str]:
    return [f.name for f in dataclasses.fields(Settings)]
