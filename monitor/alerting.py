"""The alert rules, from one source: plain Prometheus rule files and a PrometheusRule.

Each alert has a threshold and a `for` that users set (`podnetmon rules --set
PodNetDropsHigh.threshold=5 --set '*.for=2m'`); the rendered files in deploy/
are the defaults, and a test keeps them equal to what this module renders.
Pod alerts say which pod in their summary, carry `podnet_capture` (so the
Alertmanager webhook starts a capture of that pod, see the README) and link
to their section of docs/runbook.md.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import yaml

RUNBOOK = "https://github.com/podnetmon/podnetmon/blob/main/docs/runbook.md"
POD = 'namespace!~"_node|_overflow"'  # series of pods, not the node's or the folded ones
BY_POD = "namespace, pod"


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str  # {threshold}, {pod} (the pod selector), {job}, {min_rate} are filled in
    threshold: float
    for_: str
    severity: str
    summary: str
    description: str
    pod_fault: bool = True  # a pod's network misbehaves (vs the monitor's own health)
    capture: str = ""  # podnet_capture asked of the webhook: a duration, "" for none
    min_rate: float = 0.0  # traffic needed before a ratio means anything

    def anchor(self) -> str:
        return self.name.lower()


ALERTS: tuple[Alert, ...] = (
    Alert("PodNetDropsHigh",
          f"sum by ({BY_POD}, reason) (rate(podnet_drops_total{{{{{POD}}}}}[5m])) > {{threshold}}",
          1.0, "5m", "warning",
          "{{ $labels.namespace }}/{{ $labels.pod }} drops {{ $value | humanize }} packets/s "
          "({{ $labels.reason }})",
          "The kernel drops this pod's packets, for the reason given (NETFILTER_DROP: a "
          "firewall rule; NO_SOCKET: nothing listens; TC_*: a TC program).", capture="30s"),
    Alert("PodNetTCPRetransmitRatioHigh",
          f"(sum by ({BY_POD}) (rate(podnet_tcp_retransmits_total{{{{{POD}}}}}[5m]))"
          f" / sum by ({BY_POD}) (rate(podnet_tcp_segments_total{{{{{POD},direction=\"egress\"}}}}[5m]))"
          f") > {{threshold}} and sum by ({BY_POD}) (rate(podnet_tcp_segments_total"
          f"{{{{{POD},direction=\"egress\"}}}}[5m])) > {{min_rate}}",
          0.05, "10m", "warning",
          "{{ $labels.namespace }}/{{ $labels.pod }} retransmits "
          "{{ $value | humanizePercentage }} of the TCP segments it sends",
          "Segments are lost between this pod and its peers (or arrive too late).",
          capture="30s", min_rate=10.0),
    Alert("PodNetTCPHandshakeSlow",
          "histogram_quantile(0.9, sum by (" + BY_POD + ", role, le) "
          "(rate(podnet_tcp_handshake_seconds_bucket{{" + POD + "}}[5m]))) > {threshold}",
          0.5, "5m", "warning",
          "{{ $labels.namespace }}/{{ $labels.pod }}: 90% of TCP handshakes ({{ $labels.role }}) "
          "take up to {{ $value | humanizeDuration }}",
          "client: the peer answers SYNs slowly (or the path is slow); server: this pod "
          "accepts slowly (a full backlog?).", capture="30s"),
    Alert("PodNetTCPConnectFailures",
          f"sum by ({BY_POD}, role, reason) (rate(podnet_tcp_connect_failures_total"
          f"{{{{{POD}}}}}[5m])) > {{threshold}}",
          0.1, "5m", "warning",
          "{{ $labels.namespace }}/{{ $labels.pod }}: {{ $value | humanize }}/s TCP connection "
          "attempts fail ({{ $labels.role }}, {{ $labels.reason }})",
          "reset: the peer refused (nothing listens, or a firewall rejects); timeout: no answer "
          "to the SYN at all.", capture="30s"),
    Alert("PodNetDNSServfail",
          f"sum by ({BY_POD}) (rate(podnet_dns_responses_total{{{{{POD},rcode=\"SERVFAIL\"}}}}[5m]))"
          " > {threshold}",
          0.1, "5m", "warning",
          "{{ $labels.namespace }}/{{ $labels.pod }} gets {{ $value | humanize }}/s DNS SERVFAIL "
          "answers",
          "The resolver it asks cannot answer (its upstream is down or misconfigured).",
          capture="30s"),
    Alert("PodNetDNSNXDomainRatioHigh",
          f"(sum by ({BY_POD}) (rate(podnet_dns_responses_total{{{{{POD},rcode=\"NXDOMAIN\"}}}}[5m]))"
          f" / sum by ({BY_POD}) (rate(podnet_dns_responses_total{{{{{POD}}}}}[5m]))) > {{threshold}}"
          f" and sum by ({BY_POD}) (rate(podnet_dns_responses_total{{{{{POD}}}}}[5m])) > {{min_rate}}",
          0.5, "15m", "info",
          "{{ $labels.namespace }}/{{ $labels.pod }}: {{ $value | humanizePercentage }} of its "
          "DNS answers are NXDOMAIN",
          "Often the search-path expansion of short names (ndots): harmless but slow; or a "
          "misspelt service name.", min_rate=0.1),
    Alert("PodNetDNSTimeouts",
          f"sum by ({BY_POD}) (rate(podnet_dns_timeouts_total{{{{{POD}}}}}[5m])) > {{threshold}}",
          0.05, "5m", "warning",
          "{{ $labels.namespace }}/{{ $labels.pod }}: {{ $value | humanize }}/s DNS queries go "
          "unanswered", "Its resolver does not answer (unreachable, overloaded, or dropped).",
          capture="30s"),
    Alert("PodNetDNSLatencyHigh",
          "histogram_quantile(0.9, sum by (" + BY_POD + ", le) "
          "(rate(podnet_dns_latency_seconds_bucket{{" + POD + "}}[5m]))) > {threshold}",
          0.25, "10m", "warning",
          "{{ $labels.namespace }}/{{ $labels.pod }}: 90% of DNS answers take up to "
          "{{ $value | humanizeDuration }}", "Its resolver answers slowly.", capture="30s"),
    Alert("PodNetMonitorDown", 'up{{job="{job}"}} == {threshold:g}', 0, "5m", "critical",
          "podnetmon on {{ $labels.instance }} is down",
          "Nothing is measured on that node: no pod network metric, no trace.",
          pod_fault=False),
    Alert("PodNetMonitorAttachFailing",
          "sum by (instance) (increase(podnet_monitor_attach_errors_total[15m])) > {threshold:g}",
          0, "15m", "warning",
          "podnetmon on {{ $labels.instance }} keeps failing to attach to pod interfaces",
          "Some pods on that node are not measured.", pod_fault=False),
    Alert("PodNetMonitorBypassed",
          "max by (instance, " + BY_POD + ") (podnet_monitor_bypassed) > {threshold:g}",
          0, "10m", "warning",
          "Traffic of {{ $labels.namespace }}/{{ $labels.pod }} bypasses podnetmon",
          "Another TC or tcx program ends the packets' processing before ours: this pod's "
          "numbers are too low.", pod_fault=False),
    Alert("PodNetMonitorLostEvents",
          "sum by (instance, source) (increase(podnet_monitor_lost_events_total[10m])) "
          "> {threshold:g}",
          0, "0m", "info",
          "podnetmon on {{ $labels.instance }} lost {{ $value | humanize }} {{ $labels.source }} "
          "events", "A map was full or a trace's buffer overran: some events were not counted "
          "or not delivered.", pod_fault=False),
)


class RuleError(ValueError):
    """A --set names no alert or field, or gives a bad value."""


def configured(overrides: Sequence[str]) -> list[Alert]:
    """The alerts with `Name.threshold=X` / `Name.for=D` overrides (Name may be a glob)."""
    alerts = list(ALERTS)
    for item in overrides:
        target, sep, value = item.partition("=")
        name, dot, field = target.partition(".")
        if not sep or not dot or field not in ("threshold", "for"):
            raise RuleError(f"{item!r}: expected Alert.threshold=NUMBER or Alert.for=DURATION")
        matched = [i for i, a in enumerate(alerts) if fnmatch.fnmatchcase(a.name, name)]
        if not matched:
            raise RuleError(f"{item!r}: no alert matches {name!r}")
        for i in matched:
            if field == "threshold":
                try:
                    alerts[i] = replace(alerts[i], threshold=float(value))
                except ValueError:
                    raise RuleError(f"{item!r}: {value!r} is not a number") from None
            else:
                if not value or not (value[:-1].isdigit() and value[-1] in "smh"):
                    raise RuleError(f"{item!r}: {value!r} is not a duration like 5m")
                alerts[i] = replace(alerts[i], for_=value)
    return alerts


def rule(alert: Alert, job: str) -> dict[str, Any]:
    expr = alert.expr.format(threshold=alert.threshold, job=job, min_rate=alert.min_rate)
    labels = {"severity": alert.severity}
    if alert.capture:
        labels["podnet_capture"] = alert.capture
    return {"alert": alert.name, "expr": expr, "for": alert.for_, "labels": labels,
            "annotations": {"summary": alert.summary, "description": alert.description,
                            "runbook_url": f"{RUNBOOK}#{alert.anchor()}"}}


def groups(alerts: Sequence[Alert], job: str = "podnetmon") -> list[dict[str, Any]]:
    return [{"name": "podnet-pods", "rules": [rule(a, job) for a in alerts if a.pod_fault]},
            {"name": "podnet-monitor", "rules": [rule(a, job) for a in alerts if not a.pod_fault]}]


def prometheus_file(alerts: Sequence[Alert], job: str = "podnetmon") -> str:
    header = "# Generated by `podnetmon rules` from monitor/alerting.py: edit that, not this.\n"
    return header + yaml.safe_dump({"groups": groups(alerts, job)}, sort_keys=False, width=100)


def operator_resource(alerts: Sequence[Alert], job: str = "podnetmon",
                      namespace: str = "podnetmon") -> str:
    doc: Mapping[str, Any] = {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
        "metadata": {"name": "podnetmon", "namespace": namespace,
                     "labels": {"app.kubernetes.io/name": "podnetmon"}},
        "spec": {"groups": groups(alerts, job)}}
    header = "# Generated by `podnetmon rules --format operator`: edit monitor/alerting.py.\n"
    return header + yaml.safe_dump(dict(doc), sort_keys=False, width=100)
