"""`podnetmon run`: wires settings, the kernel adapter, the reconciler and HTTP together.

Start-up is where failure is fatal (a bad setting or inventory: exit 2; programs
that do not compile or verify: exit 1, with the reason). After that, failures
are contained per pod. SIGTERM/SIGINT detach everything we attached and exit 0,
or, with leave_attached, leave programs and pinned maps counting for the next daemon.
"""

from __future__ import annotations

import functools
import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import Any, Protocol, runtime_checkable

from monitor import instance, log
from monitor.auth import Authenticator, FailureLimiter, NoAuth, authenticator
from monitor.bypass import BypassDetector
from monitor.collector import PodCollector
from monitor.exposition import Registry
from monitor.kernel import kernelinfo
from monitor.kernel.kallsyms import Symbols
from monitor.listener import Limits as HttpLimits
from monitor.listener import TlsError, TlsFiles
from monitor.metadata import MetadataSource
from monitor.metadata.static import InventoryError, NoMetadata, StaticInventory
from monitor.probes import RegistryError, select
from monitor.probes.base import Probe, Start, Sweep
from monitor.reconcile import Discovery, Loop, Reconciler
from monitor.runtime import RuntimeIndex
from monitor.server import Api, Server
from monitor.settings import Settings
from monitor.slots import SlotTable, per_slot_maps, slot_keyed_maps
from monitor.state import MonitorState, check_report
from monitor.traces.alertcaptures import AlertCaptures
from monitor.traces.api import TraceApi
from monitor.traces.capture import CaptureManager, Limits
from monitor.traces.store import CaptureStore
from monitor.unseen import BeforeAttach

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


@runtime_checkable
class KubernetesLike(Protocol):
    """A metadata source with a thread of its own (monitor.metadata.kubernetes)."""

    on_change: Callable[[], None]

    def start(self) -> None: ...
    def stop(self) -> None: ...


class ConfigError(ValueError):
    """The metadata source cannot be set up as configured."""


def metadata_mode(settings: Settings, environ: Mapping[str, str]) -> str:
    """The metadata source `auto` stands for here."""
    if settings.metadata != "auto":
        return settings.metadata
    if settings.inventory:
        return "inventory"
    if settings.kubeconfig or environ.get("KUBERNETES_SERVICE_HOST"):
        return "kubernetes"
    return "none"


def _metadata(settings: Settings) -> MetadataSource:
    mode = metadata_mode(settings, os.environ)
    if mode == "inventory":
        return StaticInventory(settings.inventory)
    if mode == "kubernetes":
        from monitor.metadata import kubernetes

        try:
            api = kubernetes.api_client(settings.kubeconfig)
        except Exception as exc:  # noqa: BLE001 - the client's config errors have no common base
            raise ConfigError(f"cannot configure the Kubernetes client: {exc}") from None
        return kubernetes.KubernetesSource(api, settings.node_name, label_allow=settings.pod_labels)
    return NoMetadata()


def run(settings: Settings, *, check_only: bool = False) -> int:
    logger = log.get("daemon")
    try:
        metadata = _metadata(settings)
        probes = select(settings.probes)
        cluster = _cluster_index(settings, metadata, probes)
        authenticator = _authenticator(settings)
        tls = _tls(settings)
    except (InventoryError, RegistryError, ConfigError) as exc:
        logger.error("bad configuration", error=str(exc))
        return EXIT_USAGE
    lock = instance.InstanceLock(instance.lock_names(settings.bpffs_root, settings.tc_priority,
                                                     settings.tc_handle))
    if check_only:
        # `run --check` takes no lock and binds no port (a daemon may start during a
        # check): it attaches under a tc handle of its own and pins nothing, so it never
        # touches what a daemon, live or gone, left counting.
        holder = lock.holder()
        if holder is not None:
            logger.info("a daemon runs on this node: the check leaves its programs, filters "
                        "and pins alone", daemon=holder.pid, command=holder.command)
        return _run_locked(settings, metadata, probes, authenticator, None, None,
                           check_only=True)
    # One daemon per node (monitor/instance.py), then the port, both before the kernel:
    # a second daemon stops here, naming the one that runs, having touched nothing of it.
    try:
        lock.acquire()
    except instance.Taken as exc:
        logger.error("another podnetmon daemon runs on this node: this one stops before "
                     "touching the kernel", daemon=exc.holder.pid, command=exc.holder.command,
                     holds=exc.holder.what)
        return EXIT_FAILED
    except OSError as exc:  # not a holder: a socket this process cannot make
        logger.error("cannot take the node's instance lock", error=str(exc))
        return EXIT_FAILED
    server = None
    try:
        _raise_fd_limit()
        _raise_memlock_limit()
        try:
            server = Server(settings.listen_host, settings.listen_port, tls=tls,
                            limits=_limits(settings))
        except OSError as exc:
            logger.error("cannot listen", address=settings.listen, error=exc.strerror)
            return EXIT_FAILED
        return _run_locked(settings, metadata, probes, authenticator, server, cluster,
                           check_only=False)
    finally:
        if server is not None:
            server.close()
        lock.release()


def _run_locked(settings: Settings, metadata: MetadataSource, probes: Sequence[Probe],  # noqa: PLR0917
                authenticator: Authenticator, server: Server | None, cluster: Any, *,
                check_only: bool) -> int:
    logger = log.get("daemon")

    # the kernel side (bcc, pyroute2): imported once the configuration is known to be good
    from monitor.kernel import source
    from monitor.kernel.attach import Attacher, check_handle
    from monitor.kernel.errors import KernelError
    from monitor.kernel.netlink import Netlink, link_events
    from monitor.kernel.programs import Programs

    # `run --check` pins nothing: it must never adopt, or remove, a running daemon's maps
    pin = None if check_only else _pins(settings)
    try:
        kernel = kernelinfo.probe(proc_root=settings.proc_root, tracefs_root=settings.tracefs_root,
                                  btf_path=settings.btf_path)
        programs = Programs(probes, kernel, max_interfaces=settings.max_interfaces,
                            bpf_stats=settings.bpf_stats, pin=pin, tracefs=settings.tracefs_root)
    except (KernelError, OSError) as exc:
        from monitor.check import missing_headers

        missing = missing_headers()  # the likeliest cause, with its remedy
        logger.error("cannot load the BPF programs", error=str(exc),
                     **({"cause": missing.sentence, "remedy": missing.remedy} if missing else {}))
        return EXIT_FAILED
    netlink = Netlink()
    try:
        attacher = Attacher(programs, netlink, mode=settings.attach_mode,
                                tc_priority=settings.tc_priority,
                                tc_handle=(check_handle(settings.tc_handle) if check_only
                                           else settings.tc_handle),
                                pin=pin)
    except KernelError as exc:
        logger.error("cannot attach", error=str(exc))
        programs.abort()  # what the last daemon left stays as it was
        return EXIT_FAILED
    state = MonitorState()
    state.maps_states = dict(programs.maps_states)
    maps = programs.maps
    slots = SlotTable(ifslots=maps.handle(source.IFSLOTS_MAP), spill=maps.handle(source.IFSLOT_SPILL_MAP),
                      netns=maps.handle(source.NETNS_MAP), owners=maps.handle(source.SLOT_OWNER_MAP),
                      per_slot=per_slot_maps(programs.probes, maps.handle,
                                             settings.max_interfaces),
                      slot_keyed=slot_keyed_maps(programs.probes, maps.handle),
                      capacity=settings.max_interfaces, buckets=source.IFSLOT_BUCKETS)
    if programs.adopted:
        logger.info("adopted the pinned maps of the last daemon: counters continue",
                    slots=slots.adopt(), maps=str(programs.pin_dir))
    programs.probes[:] = _start_probes(programs.probes, settings, maps,
                                       adopted=programs.adopted_probe, slots=slots.assigned,
                                       snapshot=lambda: state.snapshot.index, cluster=cluster)
    forget = [functools.partial(p.forget, maps) for p in programs.probes if p.forget]
    runtime = RuntimeIndex(settings.runtime_dirs)

    def after_first_pass(attached: set[int], live_netns: set[int]) -> None:
        """What the last daemon left for pods that went while none ran, and maps of
        another layout, go once this daemon holds everything it needs."""
        removed = attacher.remove_stale(attached)
        for probe in programs.probes:
            if probe.prune is not None and programs.adopted_probe(probe.name):
                probe.prune(maps, live_netns, attached)
        if pin is not None:
            removed += programs.remove_unloaded()  # other layouts' maps, unloaded probes'

        if removed:
            logger.info("removed what an earlier daemon left", count=len(removed),
                        items=removed[:20])

    reconciler = Reconciler(
        discovery=Discovery(settings.proc_root, settings.pause_comm, settings.netns_dirs),
        links=netlink, attacher=attacher, slots=slots, metadata=metadata, state=state,
        forget=forget, node=settings.node_name, max_pods=settings.max_pods,
        runtime_uids=runtime.uids, runtime_names=runtime.podman_containers,
        after_first_pass=None if check_only else after_first_pass)
    if check_only:
        return _check_once(reconciler, state, netlink, programs,
                           handle=check_handle(settings.tc_handle))
    try:
        programs.attach_tracepoints()
    except KernelError as exc:
        logger.error("cannot attach the tracepoint programs", error=str(exc))
        programs.abort()  # what the last daemon left stays as it was
        return EXIT_FAILED

    bypass = (BypassDetector(maps, lambda: state.snapshot.index, netlink.link_stats,
                             netlink.peer_stats, attacher.explain)
              if any(p.name == "packets" for p in programs.probes) else None)
    unseen = (BeforeAttach(maps, lambda: state.snapshot.index, netlink.veth_counts)
              if bypass is not None else None)
    registry = Registry()
    registry.register(PodCollector(
        probes=programs.probes, maps=maps, state=state, node=settings.node_name,
        kernel=kernel, node_slot=settings.max_interfaces,
        probe_states=probe_states(probes, programs.notes),
        program_stats=programs.program_stats if programs.stats_enabled() else None,
        bcc_version=programs.bcc_version, pod_labels=settings.pod_labels,
        api_stats=getattr(metadata, "stats", None),
        bypassed=(lambda: bypass.bypassed) if bypass is not None else None,
        redirected=(lambda: bypass.redirected) if bypass is not None else None,
        before_attach=unseen.by_pod if unseen is not None else None,
        scrape_stats=registry.scrape_stats))
    stop = threading.Event()
    sweeps = [p.sweep for p in programs.probes if p.sweep]
    timeouts = {"tcp_connect": settings.tcp_connect_timeout, "dns": settings.dns_timeout}
    next_bypass_check = [0.0]

    inventory_changed = getattr(metadata, "changed", None)

    def sweep() -> None:
        ctx = Sweep(maps, time.monotonic_ns(), timeouts)
        for fn in sweeps:
            fn(ctx)
        if inventory_changed is not None and inventory_changed():
            loop.wake()  # an edited inventory names pods now, not at the next rescan
        if bypass is not None and time.monotonic() >= next_bypass_check[0]:
            next_bypass_check[0] = time.monotonic() + settings.bypass_check_interval
            bypass.check()
            state.bypassed = dict(bypass.bypassed)
        elif bypass is not None:
            bypass.observe_new()

    def first_looks() -> None:
        """After every pass: new interfaces' first statistics, as soon after the attach
        as can be (what passed before it, and a start for the bypass check)."""
        if unseen is not None:
            unseen.observe_new()
        if bypass is not None:
            bypass.observe_new()

    loop = Loop(reconciler, resync_interval=settings.resync_interval,
                debounce=settings.event_debounce, events_factory=link_events, state=state,
                on_exit=netlink.close, sweep=sweep,
                sweep_interval=settings.sweep_interval,
                detach_on_exit=not settings.leave_attached,
                after_pass=first_looks)
    worker = threading.Thread(target=loop.run, args=(stop,), name="reconcile")
    traces = _traces(settings, programs, maps, state, kernel)
    if server is None:  # only `run --check` has none, and it returned above
        raise RuntimeError("the daemon runs with a listener")
    api = Api(registry, state, settings.node_name, alive=worker.is_alive, auth=authenticator,
              extensions=traces, auth_metrics=settings.auth_metrics,
              allow_insecure_auth=settings.allow_insecure_auth,
              failures=FailureLimiter(settings.auth_failures_per_minute))

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("stopping", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    _drop_privileges()  # the last step of start-up, before the first thread starts
    server.start(api)
    if isinstance(metadata, KubernetesLike):
        metadata.on_change = loop.wake  # a pod's object arrived or changed: label it now
        metadata.start()
        _await_first_list(metadata)
    if cluster is not None:
        cluster.start()  # peers' names: until its first lists, other pods' are `unknown`
    worker.start()
    frozen = False
    while worker.is_alive():
        worker.join(timeout=1.0)
        if state.ready and not frozen:
            frozen = _freeze_heap()
    if traces is not None:
        traces.captures.stop()
    server.stop()  # run() closes it again, which is harmless
    if isinstance(metadata, KubernetesLike):
        metadata.stop()
    if cluster is not None:
        cluster.stop()
    programs.close(leave_attached=settings.leave_attached)
    logger.info("stopped", left_attached=settings.leave_attached)
    return EXIT_OK


FIRST_LIST_WAIT = 3.0  # seconds the first pass waits for the API's first list, at most


def _await_first_list(metadata: object) -> None:
    """Give the API's first list a moment before the first pass, so a restart does not
    publish every pod under its fallback name for the instant until the list is in (a
    series that appears and vanishes). Bounded: an unreachable API must not hold up
    counting; its pods are renamed when it answers."""
    synced = getattr(metadata, "synced", None)
    if isinstance(synced, threading.Event) and not synced.wait(FIRST_LIST_WAIT):
        log.get("daemon").warning("the kubernetes api has not answered yet: pods get "
                                  "fallback names until it does", waited=FIRST_LIST_WAIT)


def _freeze_heap() -> bool:
    """Once start-up is done, move what it allocated (modules, programs, the first
    snapshot) out of the garbage collector's sight. A scrape at 500 pods makes ~200,000
    short-lived objects; each collection they trigger walked that whole heap again, a
    third of a scrape's time (73 ms a scrape before, ~50 ms after). Frozen objects are
    still freed when their references go; only cycles among them would stay."""
    gc.collect()
    gc.freeze()
    log.get("daemon").debug("heap frozen", objects=gc.get_freeze_count())
    return True


def _drop_privileges() -> None:
    """Keep only the capabilities needed after start-up (monitor/privileges.py); in the
    main thread, before any other thread exists, so that every thread inherits it."""
    from monitor.kernel import privileges

    logger = log.get("daemon")
    try:
        dropped = privileges.drop_to()
    except OSError as exc:
        logger.warning("could not drop capabilities", error=str(exc))
        return
    effective, _ = privileges.current()
    if dropped:
        logger.info("dropped capabilities not needed after start-up", dropped=dropped,
                    kept=privileges.names(effective))


def _pins(settings: Settings) -> Any:
    """Where maps and links are pinned, or None (said in the log) if they cannot be."""
    from monitor.kernel import pins

    logger = log.get("daemon")
    if not settings.bpffs_root:
        logger.info("pinning is off (bpffs_root is empty): counters restart with the daemon")
        return None
    pin = pins.Pins(settings.bpffs_root)
    try:
        pin.prepare()
    except OSError as exc:
        logger.warning("maps are not pinned: counters restart with the daemon",
                       error=str(exc))
        return None
    return pin


def _traces(settings: Settings, programs: Any, maps: Any, state: MonitorState,
            kernel: kernelinfo.KernelInfo) -> TraceApi | None:
    """The capture machinery, if the trace probe is loaded."""
    if not any(p.name == "trace" for p in programs.probes):
        return None
    limits = Limits(max_duration=settings.trace_max_duration,
                    default_duration=min(10.0, settings.trace_max_duration),
                    max_packets=settings.trace_max_packets, max_bytes=settings.trace_max_bytes,
                    max_snaplen=settings.trace_max_snaplen, default_snaplen=settings.trace_snaplen,
                    per_node=settings.traces_per_node, per_pod=settings.traces_per_pod)
    symbols = Symbols()
    symbols.open()  # now, while the process may still hold CAP_SYSLOG (monitor/kallsyms.py)
    captures = CaptureManager(programs, maps, limits, lambda: state.snapshot.index,
                              settings.node_name, drop_reason=kernel.drop_reason,
                              symbol=symbols.resolve, on_lost=state.count_lost)
    store = CaptureStore(settings.capture_dir, max_files=settings.capture_max_files,
                         max_bytes=settings.capture_max_bytes)
    return TraceApi(captures, store, AlertCaptures(captures, store, settings.node_name),
                    settings.node_name)


def _cluster_index(settings: Settings, metadata: MetadataSource, probes: Sequence[Probe]) -> Any:
    """The cluster-wide peer index (not started), or None: see --peer-index."""
    mode = settings.peer_index
    if mode == "auto":
        mode = "cluster" if isinstance(metadata, KubernetesLike) else "none"
    if mode == "none" or not any(p.name == "peers" for p in probes):
        return None
    from monitor.metadata import kubernetes
    from monitor.peers.cluster import ClusterIndex

    api = getattr(metadata, "api", None)
    if api is None:
        try:
            api = kubernetes.api_client(settings.kubeconfig)
        except Exception as exc:  # noqa: BLE001 - the client's config errors have no common base
            raise ConfigError(f"--peer-index cluster: cannot configure the Kubernetes client: "
                              f"{exc}") from None
    return ClusterIndex(api)


def _start_probes(probes: Sequence[Probe], settings: Settings, maps: Any, *,
                  adopted: Callable[[str], bool],
                  slots: Any, snapshot: Any, cluster: Any = None) -> list[Probe]:
    """Probes with state of their own (peers) are bound to it here, before any attach."""
    if not any(p.start for p in probes):
        return list(probes)
    from monitor.peers.identity import PeerResolver
    from monitor.probes.dnsnames import NameOptions
    from monitor.probes.peers import PeerOptions

    resolver = PeerResolver(cluster_cidrs=settings.cluster_cidrs,
                            service_cidrs=settings.service_cidrs, index=cluster)
    options = {"peers": PeerOptions(settings.peer_top, settings.peer_ttl, settings.peer_interval),
               "dnsnames": NameOptions(settings.dns_top, settings.peer_ttl, settings.dns_timeout)}
    services = {"peer_resolver": resolver, "snapshot": snapshot, "node": settings.node_name}
    return [p.start(p, Start(maps=maps, adopted=adopted(p.name), slots=slots, options=options,
                             services=services)) if p.start else p for p in probes]


def _raise_fd_limit() -> None:
    """Every held connection is a descriptor, beside a few hundred BPF ones: the soft limit
    (often 1,024) goes up towards the hard one, as Go's runtime does for every Go daemon;
    65,536 is plenty past the connection cap's maximum."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (OSError, ValueError) as exc:
            log.get("daemon").warning("could not raise the open-file limit", soft=soft,
                                      error=str(exc))


def _raise_memlock_limit() -> None:
    """Trace buffers (perf rings) are charged to RLIMIT_MEMLOCK past the kernel's small
    per-user allowance unless the daemon holds CAP_IPC_LOCK, which the DaemonSet does not
    grant: the soft limit goes up to the hard one (no capability needed for that)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))
        except (OSError, ValueError) as exc:
            log.get("daemon").warning("could not raise the memlock limit", soft=soft,
                                      error=str(exc))


def _tls(settings: Settings) -> TlsFiles | None:
    if not settings.tls_cert_file:
        return None
    try:
        return TlsFiles(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
    except TlsError as exc:
        raise ConfigError(str(exc)) from None


def _limits(settings: Settings) -> HttpLimits:
    return HttpLimits(max_connections=settings.http_max_connections, workers=settings.http_workers,
                  header_timeout=settings.http_header_timeout,
                  idle_timeout=settings.http_idle_timeout,
                  body_timeout=settings.http_body_timeout,
                  write_timeout=settings.http_write_timeout)


def _authenticator(settings: Settings) -> Authenticator:
    def api_client() -> Any:
        from monitor.metadata import kubernetes

        return kubernetes.api_client(settings.kubeconfig).api_client

    try:
        chosen = authenticator(settings.auth, token_file=settings.auth_token_file,
                               api_client_factory=api_client, audiences=settings.auth_audiences,
                               max_reviews=settings.auth_max_reviews)
    except Exception as exc:  # noqa: BLE001 - the client's config errors have no common base
        raise ConfigError(f"cannot set up authentication: {exc}") from None
    if settings.auth_metrics and isinstance(chosen, NoAuth):
        raise ConfigError("auth_metrics needs an authenticator (--auth token or kubernetes): "
                          "with none, nobody could scrape")
    return chosen


def probe_states(wanted: Sequence[Probe], notes: Mapping[str, str]) -> dict[str, str]:
    """loaded, degraded or off, for podnet_monitor_probe_state."""
    states = {}
    for probe in wanted:
        note = notes.get(probe.name, "")
        states[probe.name] = ("off" if note.startswith("not loaded") else
                              "degraded" if note else "loaded")
    return states


def _check_once(reconciler: Reconciler, state: MonitorState, netlink: object,
                programs: object, *, handle: int) -> int:
    """Load, attach to every pod found, report, detach: `podnetmon run --check`. Its
    maps are its own (unpinned), its classic filters carry `handle` (not the daemon's),
    its tcx links are its own: a daemon beside it, or one's programs left attached,
    keep counting every packet, and nothing of theirs is replaced or removed."""
    logger = log.get("daemon")
    try:
        reconciler.reconcile()
        pods = state.snapshot.pods
        failed = [p for p in pods for i in p.interfaces if i.last_error]
        logger.info("check done", pods=len(pods), attached=state.attached_pods(),
                    failed=len(failed), tc_handle=f"{handle:#x}")
        if not sys.stderr.isatty():  # the log is JSON lines then: this is for a person
            print(check_report(pods, state.attach_errors, handle), flush=True)
    finally:
        reconciler.detach_all()
        netlink.close()  # type: ignore[attr-defined]
        programs.close()  # type: ignore[attr-defined]
    return EXIT_FAILED if failed or state.attach_errors else EXIT_OK
