"""The daemon's HTTP side: what /metrics renders, the trace API with its alert captures,
and the Api the server answers with (the server itself is bound earlier, by run())."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from monitor.auth import Authenticator
from monitor.collector import PodCollector, ProbeReadings
from monitor.exposition import Registry
from monitor.failurelimit import FailureLimiter
from monitor.kernel.kallsyms import Symbols
from monitor.metadata import MetadataSource
from monitor.monitormetrics import MonitorCollector, probe_states
from monitor.probes import providing
from monitor.probes.base import CAPTURES, Probe
from monitor.server import Api
from monitor.settings import Settings
from monitor.state import MonitorState
from monitor.traces.alertcaptures import AlertCaptures
from monitor.traces.api import TraceApi
from monitor.traces.capture import CaptureManager
from monitor.traces.session import Limits
from monitor.traces.store import CaptureStore

if TYPE_CHECKING:  # the kernel side is imported once the configuration is known to be good
    from monitor.kernelside import KernelSide
    from monitor.reconcileside import VethWatch


@dataclass(frozen=True)
class HttpSide:
    api: Api
    traces: TraceApi | None  # with the trace probe only


def build(settings: Settings, kernel: KernelSide, state: MonitorState,  # noqa: PLR0917
          metadata: MetadataSource, probes: Sequence[Probe], watch: VethWatch,
          authenticator: Authenticator, *, alive: Callable[[], bool]) -> HttpSide:
    """`probes`: those the settings asked for (the kernel's may be fewer); `alive`: whether
    the reconcile thread runs (/healthz)."""
    registry = metrics(settings, kernel, state, metadata, probes, watch)
    traces = _traces(settings, kernel, state)
    api = Api(registry, state, settings.node_name, alive=alive, auth=authenticator, extensions=traces,
              auth_metrics=settings.auth_metrics,
              allow_insecure_auth=settings.allow_insecure_auth,
              failures=FailureLimiter(settings.auth_failures_per_minute))
    return HttpSide(api, traces)


def metrics(settings: Settings, kernel: KernelSide, state: MonitorState,  # noqa: PLR0917
            metadata: MetadataSource, probes: Sequence[Probe], watch: VethWatch) -> Registry:
    """The registry /metrics renders, with every collector registered."""
    programs, bypass, unseen = kernel.programs, watch.bypass, watch.unseen
    registry, readings = Registry(), ProbeReadings()
    registry.register(PodCollector(
        probes=programs.probes, maps=kernel.maps, state=state, node=settings.node_name,
        kernel=kernel.kernel, node_slot=settings.max_interfaces, pod_labels=settings.pod_labels,
        redirected=(lambda: bypass.redirected) if bypass is not None else None,
        before_attach=unseen.by_pod if unseen is not None else None, readings=readings))
    registry.register(MonitorCollector(  # after the pod collector: it reads `readings`
        state=state, kernel=kernel.kernel, readings=readings,
        probe_states=probe_states(probes, programs.notes),
        program_stats=programs.program_stats if programs.stats_enabled() else None,
        bcc_version=programs.bcc_version, api_stats=getattr(metadata, "stats", None),
        bypassed=(lambda: bypass.bypassed) if bypass is not None else None,
        scrape_stats=registry.scrape_stats))
    return registry


def _traces(settings: Settings, kernel: KernelSide, state: MonitorState) -> TraceApi | None:
    """The capture machinery, if a probe for it (trace) is loaded."""
    if not providing(kernel.probes, CAPTURES):
        return None
    limits = Limits(max_duration=settings.trace_max_duration,
                    default_duration=min(10.0, settings.trace_max_duration),
                    max_packets=settings.trace_max_packets, max_bytes=settings.trace_max_bytes,
                    max_snaplen=settings.trace_max_snaplen, default_snaplen=settings.trace_snaplen,
                    per_node=settings.traces_per_node, per_pod=settings.traces_per_pod)
    symbols = Symbols()
    symbols.open()  # now, while the process may still hold CAP_SYSLOG (monitor/kallsyms.py)
    captures = CaptureManager(kernel.programs, kernel.maps, limits, lambda: state.snapshot.index,
                              settings.node_name, drop_reason=kernel.kernel.drop_reason,
                              symbol=symbols.resolve, on_lost=state.count_lost)
    store = CaptureStore(settings.capture_dir, max_files=settings.capture_max_files,
                         max_bytes=settings.capture_max_bytes)
    return TraceApi(captures, store, AlertCaptures(captures, store, settings.node_name),
                    settings.node_name)
