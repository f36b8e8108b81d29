"""`podnetmon run`: the order in which the daemon starts and stops.

Start-up is where failure is fatal (a bad setting or inventory: exit 2; programs
that do not compile or verify: exit 1, with the reason). After that, failures
are contained per pod. SIGTERM/SIGINT detach everything we attached and exit 0,
or, with leave_attached, leave programs and pinned maps counting for the next daemon.

The parts are built elsewhere: daemonconfig (what the settings stand for),
kernelside (programs, attacher, slot table, probes), reconcileside (the pass and
its loop), httpside (metrics, traces, the API).
"""

from __future__ import annotations

import gc
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

from monitor import daemonconfig, httpside, instance, log
from monitor.auth import Authenticator
from monitor.daemonconfig import ConfigError, KubernetesLike
from monitor.metadata import MetadataSource
from monitor.metadata.static import InventoryError
from monitor.probes import RegistryError, select
from monitor.probes.base import Probe
from monitor.reconcile import Reconciler
from monitor.reconcileloop import Loop
from monitor.server import Server
from monitor.settings import Settings
from monitor.state import MonitorState, check_report

if TYPE_CHECKING:  # the kernel side is imported once the configuration is known to be good
    from monitor.kernelside import KernelSide

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def run(settings: Settings, *, check_only: bool = False) -> int:
    logger = log.get("daemon")
    try:
        metadata = daemonconfig.metadata_source(settings)
        probes = select(settings.probes)
        cluster = daemonconfig.cluster_index(settings, metadata, probes)
        authenticator = daemonconfig.chosen_authenticator(settings)
        tls = daemonconfig.tls_files(settings)
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
            server = Server(settings.listen_host, settings.listen_port,
                            tls=tls, limits=daemonconfig.http_limits(settings))
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
    # the kernel side (bcc, pyroute2): imported once the configuration is known to be good
    from monitor import kernelside, reconcileside
    from monitor.kernel.attach import check_handle

    state = MonitorState()
    kernel = kernelside.build(settings, probes, state, cluster, check_only=check_only)
    if kernel is None:
        return EXIT_FAILED
    reconciler = reconcileside.reconciler(settings, kernel, metadata, state,
                                          check_only=check_only)
    if check_only:
        return _check_once(reconciler, state, kernel.netlink, kernel.programs,
                           handle=check_handle(settings.tc_handle))
    if not kernel.attach_tracepoints():
        return EXIT_FAILED
    if server is None:  # only `run --check` has none, and it returned above
        raise RuntimeError("the daemon runs with a listener")
    watch = reconcileside.VethWatch.of(kernel, state)
    loop = reconcileside.loop(settings, reconciler, kernel, metadata, state, watch)
    stop = threading.Event()
    worker = threading.Thread(target=loop.run, args=(stop,), name="reconcile")
    http = httpside.build(settings, kernel, state, metadata, probes, watch, authenticator,
                          alive=worker.is_alive)
    _start(server, http, metadata, cluster, loop, worker, stop)
    _wait(worker, state)
    _stop(settings, server, http, metadata, cluster, kernel)
    return EXIT_OK


def _start(server: Server, http: httpside.HttpSide, metadata: MetadataSource,  # noqa: PLR0917
           cluster: Any, loop: Loop, worker: threading.Thread, stop: threading.Event) -> None:
    """Signals, capabilities dropped, then every thread: HTTP, the API's watch, the peer
    index, the reconciler."""
    logger = log.get("daemon")

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("stopping", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    _drop_privileges()  # the last step of start-up, before the first thread starts
    server.start(http.api)
    if isinstance(metadata, KubernetesLike):
        metadata.on_change = loop.wake  # a pod's object arrived or changed: label it now
        metadata.start()
        _await_first_list(metadata)
    if cluster is not None:
        cluster.start()  # peers' names: until its first lists, other pods' are `unknown`
    worker.start()


def _wait(worker: threading.Thread, state: MonitorState) -> None:
    """Until the reconcile thread ends (a signal stopped it); the heap frozen once ready."""
    frozen = False
    while worker.is_alive():
        worker.join(timeout=1.0)
        if state.ready and not frozen:
            frozen = _freeze_heap()


def _stop(settings: Settings, server: Server, http: httpside.HttpSide,  # noqa: PLR0917
          metadata: MetadataSource, cluster: Any, kernel: KernelSide) -> None:
    if http.traces is not None:
        http.traces.captures.stop()
    server.stop()  # run() closes it again, which is harmless
    if isinstance(metadata, KubernetesLike):
        metadata.stop()
    if cluster is not None:
        cluster.stop()
    kernel.programs.close(leave_attached=settings.leave_attached)
    log.get("daemon").info("stopped", left_attached=settings.leave_attached)


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
