"""The Grafana dashboards, as code: `podnetmon dashboards --out grafana/` writes them.

Three dashboards: the node overview, one pod in detail, and the monitor's own
health. They use a datasource variable (no one's datasource UID is written
in) and namespace/workload/pod variables from podnet_pod_info. The JSON in
grafana/ is what this module renders; a test keeps the two equal and runs
every panel's expression against a real Prometheus.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

DS = {"type": "prometheus", "uid": "${datasource}"}
POD_SEL = 'namespace=~"$namespace", pod=~"$pod"'
NS_SEL = 'namespace=~"$namespace"'
RATE = "$__rate_interval"


@dataclass
class Panel:
    title: str
    exprs: list[tuple[str, str]]  # (expression, legend)
    unit: str = "short"
    kind: str = "timeseries"  # or "heatmap", "stat", "nodeGraph"
    width: int = 12
    height: int = 8
    description: str = ""
    table: bool = False  # instant queries as tables (a node graph's nodes and edges)
    transformations: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Dashboard:
    uid: str
    title: str
    description: str
    panels: list[Panel] = field(default_factory=list)
    pod_variables: bool = True


def _variables(pod_variables: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0},
        _query_var("instance", "label_values(podnet_monitor_build_info, instance)"),
    ]
    if pod_variables:
        out += [
            _query_var("namespace", "label_values(podnet_pod_info, namespace)"),
            _query_var("workload", f"label_values(podnet_pod_info{{{NS_SEL}}}, workload)"),
            _query_var("pod", f'label_values(podnet_pod_info{{{NS_SEL}, workload=~"$workload"}}, pod)'),
        ]
    return out


def _query_var(name: str, query: str) -> dict[str, Any]:
    return {"name": name, "label": name, "type": "query", "datasource": DS,
            "query": {"query": query, "refId": f"{name}-var"}, "definition": query,
            "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
            "current": {"text": "All", "value": "$__all"}, "sort": 1, "hide": 0}


def _panel(panel: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    targets = []
    for i, (expr, legend) in enumerate(panel.exprs):
        target: dict[str, Any] = {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr,
                                  "legendFormat": legend}
        if panel.kind == "heatmap":
            target["format"] = "heatmap"
        if panel.table:
            target.update(format="table", instant=True, range=False)
        targets.append(target)
    out: dict[str, Any] = {
        "id": pid, "type": panel.kind, "title": panel.title, "description": panel.description,
        "datasource": DS, "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "right",
                               "calcs": ["mean", "max"]}},
    }
    if panel.kind == "heatmap":
        out["options"] = {"calculate": False, "yAxis": {"unit": panel.unit},
                          "cellGap": 1, "color": {"scheme": "Spectral", "mode": "scheme"}}
    if panel.kind == "nodeGraph":
        out["options"] = {"nodes": {"mainStatUnit": panel.unit},
                          "edges": {"mainStatUnit": panel.unit}}
    if panel.transformations:
        out["transformations"] = panel.transformations
    return out


def render(dashboard: Dashboard) -> dict[str, Any]:
    panels, x, y, row_height = [], 0, 0, 0
    for pid, panel in enumerate(dashboard.panels, start=1):
        if x + panel.width > 24:
            x, y = 0, y + row_height
            row_height = 0
        panels.append(_panel(panel, pid, x, y))
        x += panel.width
        row_height = max(row_height, panel.height)
    return {
        "uid": dashboard.uid, "title": dashboard.title, "description": dashboard.description,
        "tags": ["podnetmon", "network"], "editable": True, "schemaVersion": 39, "version": 1,
        "refresh": "30s", "time": {"from": "now-1h", "to": "now"}, "timezone": "browser",
        "templating": {"list": _variables(dashboard.pod_variables)},
        "annotations": {"list": []}, "panels": panels,
    }


def _q(quantile: float, metric: str, by: str, selector: str) -> str:
    return (f"histogram_quantile({quantile}, sum by (le{', ' + by if by else ''}) "
            f"(rate({metric}_bucket{{{selector}}}[{RATE}])))")


# Who talks to whom, for the service map: each pod's workload (from podnet_pod_info) as
# "pod/<namespace>/<workload>", each peer as "<kind>/<namespace>/<workload>" (a pod peer
# gets the same id as its workload's node), the edge's id "source->target".
_BY_WORKLOAD = ("* on (instance, namespace, pod) group_left (workload) "
                "max by (instance, namespace, pod, workload) (podnet_pod_info)")
_SOURCE = ('label_join(label_replace({expr}, "source_kind", "pod", "", ""), "source", "/", '
           '"source_kind", "namespace", "workload")')
_TARGET = 'label_join({expr}, "target", "/", "peer_kind", "peer_namespace", "peer_workload")'
SERVICE_MAP_EDGES = (
    'label_join(' + _TARGET.format(expr=_SOURCE.format(expr=(
        "sum by (namespace, workload, peer_kind, peer_namespace, peer_workload) ("
        f'rate(podnet_peer_bytes_total{{{NS_SEL}, direction="egress", peer_kind!="_other"}}'
        f"[{RATE}]) {_BY_WORKLOAD}) * 8"))) + ', "id", "->", "source", "target")')
SERVICE_MAP_NODES = (
    'label_join(label_replace(sum by (namespace, workload) ('
    f'rate(podnet_bytes_total{{{NS_SEL}, direction="egress"}}[{RATE}]) {_BY_WORKLOAD}) * 8, '
    '"kind", "pod", "", ""), "id", "/", "kind", "namespace", "workload") '
    'or label_join(sum by (peer_kind, peer_namespace, peer_workload) ('
    f'rate(podnet_peer_bytes_total{{{NS_SEL}, direction="ingress", peer_kind!="_other"}}'
    f'[{RATE}])) * 8, "id", "/", "peer_kind", "peer_namespace", "peer_workload")')
SERVICE_MAP = Panel(
    "Service map: who sends to whom (bytes/s)",
    [(SERVICE_MAP_NODES, "nodes"), (SERVICE_MAP_EDGES, "edges")], "bps", kind="nodeGraph",
    width=24, height=12, table=True,
    description="Workloads of this node's pods and the peers they send to (other workloads, "
                "services, nodes, external); edges are bytes/s from podnet_peer_bytes_total. "
                "A node's main figure is what it sends (pods) or receives (peers).",
    transformations=[{"id": "organize", "options": {
        "excludeByName": {"Time": True},
        "renameByName": {"Value #A": "mainstat", "Value #B": "mainstat"}}}])

NODE = Dashboard("podnet-node", "podnetmon / node overview",
                 "Which pods of the node move the most, drop, retransmit, wait or fail.", [
    Panel("Top pods by traffic", [(
        f"topk(10, sum by (namespace, pod) (rate(podnet_bytes_total{{{NS_SEL}}}[{RATE}])) * 8)",
        "{{namespace}}/{{pod}}")], "bps"),
    Panel("Drops by reason", [(
        f"sum by (reason) (rate(podnet_drops_total{{{NS_SEL}}}[{RATE}]))", "{{reason}}")], "pps"),
    Panel("Top pods by drops", [(
        f'topk(10, sum by (namespace, pod) (rate(podnet_drops_total{{{NS_SEL}, namespace!="_node"}}'
        f"[{RATE}])))", "{{namespace}}/{{pod}}")], "pps"),
    Panel("Top pods by TCP retransmits", [(
        f"topk(10, sum by (namespace, pod) (rate(podnet_tcp_retransmits_total{{{NS_SEL}}}[{RATE}])))",
        "{{namespace}}/{{pod}}")], "short"),
    Panel("TCP handshake time, 90th percentile", [(
        _q(0.9, "podnet_tcp_handshake_seconds", "role", NS_SEL), "{{role}}")], "s"),
    Panel("DNS latency, 90th percentile", [(
        _q(0.9, "podnet_dns_latency_seconds", "", NS_SEL), "p90")], "s"),
    Panel("Pods failing to connect", [(
        f"topk(10, sum by (namespace, pod, reason) "
        f"(rate(podnet_tcp_connect_failures_total{{{NS_SEL}}}[{RATE}])))",
        "{{namespace}}/{{pod}} {{reason}}")], "short"),
    Panel("DNS answers by RCODE", [(
        f"sum by (rcode) (rate(podnet_dns_responses_total{{{NS_SEL}}}[{RATE}]))", "{{rcode}}")],
          "short"),
    SERVICE_MAP,
])

POD = Dashboard("podnet-pod", "podnetmon / pod",
                "One pod's network: throughput, drops, latency, TCP health, DNS.", [
    Panel("Throughput by direction and protocol", [(
        f"sum by (direction, protocol) (rate(podnet_bytes_total{{{POD_SEL}}}[{RATE}])) * 8",
        "{{direction}} {{protocol}}")], "bps"),
    Panel("Packets by direction", [(
        f"sum by (direction) (rate(podnet_packets_total{{{POD_SEL}}}[{RATE}]))", "{{direction}}")],
          "pps"),
    Panel("Drops by reason", [(
        f"sum by (reason) (rate(podnet_drops_total{{{POD_SEL}}}[{RATE}]))", "{{reason}}")], "pps"),
    Panel("TCP retransmit ratio", [(
        f"sum(rate(podnet_tcp_retransmits_total{{{POD_SEL}}}[{RATE}])) / "
        f'sum(rate(podnet_tcp_segments_total{{{POD_SEL}, direction="egress"}}[{RATE}]))',
        "retransmitted / sent")], "percentunit"),
    Panel("TCP handshake time", [
        (_q(q, "podnet_tcp_handshake_seconds", "role", POD_SEL), f"p{int(q * 100)} {{{{role}}}}")
        for q in (0.5, 0.9, 0.99)], "s"),
    Panel("TCP handshake time heatmap", [(
        f"sum by (le) (increase(podnet_tcp_handshake_seconds_bucket{{{POD_SEL}}}[{RATE}]))",
        "{{le}}")], "s", kind="heatmap"),
    Panel("TCP RTT", [(_q(q, "podnet_tcp_rtt_seconds", "", POD_SEL), f"p{int(q * 100)}")
                      for q in (0.5, 0.9, 0.99)], "s"),
    Panel("DNS latency", [(_q(q, "podnet_dns_latency_seconds", "", POD_SEL), f"p{int(q * 100)}")
                          for q in (0.5, 0.9, 0.99)], "s"),
    Panel("DNS latency heatmap", [(
        f"sum by (le) (increase(podnet_dns_latency_seconds_bucket{{{POD_SEL}}}[{RATE}]))",
        "{{le}}")], "s", kind="heatmap"),
    Panel("DNS answers by RCODE, and timeouts", [
        (f"sum by (rcode) (rate(podnet_dns_responses_total{{{POD_SEL}}}[{RATE}]))", "{{rcode}}"),
        (f"sum(rate(podnet_dns_timeouts_total{{{POD_SEL}}}[{RATE}]))", "timeout")], "short"),
    Panel("TCP connection failures", [(
        f"sum by (role, reason) (rate(podnet_tcp_connect_failures_total{{{POD_SEL}}}[{RATE}]))",
        "{{role}} {{reason}}")], "short"),
    Panel("TCP flags", [(
        f"sum by (direction, flag) (rate(podnet_tcp_flags_total{{{POD_SEL}}}[{RATE}]))",
        "{{direction}} {{flag}}")], "short"),
    Panel("Peers: sent to", [(
        f"sum by (peer_kind, peer_namespace, peer_workload) (rate(podnet_peer_bytes_total"
        f'{{{POD_SEL}, direction="egress"}}[{RATE}])) * 8',
        "{{peer_kind}} {{peer_namespace}}/{{peer_workload}}")], "bps",
          description="The pod's top peers by what it sends them (--peer-top), the rest as "
                      "_other; they add up to the pod's egress throughput."),
    Panel("Peers: received from", [(
        f"sum by (peer_kind, peer_namespace, peer_workload) (rate(podnet_peer_bytes_total"
        f'{{{POD_SEL}, direction="ingress"}}[{RATE}])) * 8',
        "{{peer_kind}} {{peer_namespace}}/{{peer_workload}}")], "bps"),
])

MONITOR = Dashboard("podnet-monitor", "podnetmon / monitor health",
                    "The monitor itself: what it watches, what it costs, what it misses.", [
    Panel("Attached pods", [("sum by (instance) (podnet_monitor_attached_pods)", "{{instance}}")]),
    Panel("Attach errors", [(
        f"sum by (instance) (rate(podnet_monitor_attach_errors_total[{RATE}]))", "{{instance}}")]),
    Panel("BPF time per run (needs --bpf-stats)", [(
        f"sum by (program) (rate(podnet_monitor_bpf_run_seconds_total[{RATE}])) / "
        f"sum by (program) (rate(podnet_monitor_bpf_runs_total[{RATE}]))", "{{program}}")], "s"),
    Panel("Lost events", [(
        f"sum by (source) (rate(podnet_monitor_lost_events_total[{RATE}]))", "{{source}}")]),
    Panel("Pods over the series cap", [(
        "sum by (instance) (podnet_monitor_series_dropped_total)", "{{instance}}")]),
    Panel("Pods whose traffic bypasses podnetmon", [(
        "sum by (instance) (podnet_monitor_bypassed)", "{{instance}}")]),
    Panel("Time per discovery pass", [(
        f"rate(podnet_monitor_reconcile_seconds_total[{RATE}]) / "
        f"rate(podnet_monitor_reconciles_total[{RATE}])", "{{instance}}")], "s"),
    Panel("Probes by state (degraded or off: see the log)", [(
        "count by (state) (podnet_monitor_probe_state)", "{{state}}")]),
], pod_variables=False)

DASHBOARDS = (NODE, POD, MONITOR)


def rendered() -> Iterator[tuple[str, str]]:
    """(file name, JSON text) of every dashboard."""
    for dashboard in DASHBOARDS:
        yield f"{dashboard.uid}.json", json.dumps(render(dashboard), indent=2) + "\n"


def expressions(dashboard: Dashboard) -> Iterator[tuple[str, str]]:
    """(panel title, expression) of every target."""
    for panel in dashboard.panels:
        for expr, _legend in panel.exprs:
            yield panel.title, expr
