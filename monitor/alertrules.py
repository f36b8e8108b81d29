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
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

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
    capture_filter: str = ""  # podnet_capture_filter: a pcap filter for that capture
    extra_labels: Mapping[str, str] = field(default_factory=dict)  # the user's own
    enabled: bool = True

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
    Alert("PodNetDNSNameFailing",
          f"sum by ({BY_POD}, qname, rcode) (rate(podnet_dns_name_failures_total"
          f"{{{{{POD},qname!=\"_other\",rcode!=\"NXDOMAIN\"}}}}[5m])) > {{threshold}}",
          0.05, "10m", "warning",
          "{{ $labels.namespace }}/{{ $labels.pod }} fails to resolve {{ $labels.qname }} "
          "({{ $labels.rcode }}, {{ $value | humanize }}/s)",
          "One name keeps failing with SERVFAIL, REFUSED or no answer at all: the zone or the "
          "resolver that serves it is broken (NXDOMAIN is left to PodNetDNSNXDomainRatioHigh: "
          "the search path makes it ordinary).", capture="30s"),
    Alert("PodNetDNSNXDomainRatioHigh",
          f"(sum by ({BY_POD}) (rate(podnet_dns_responses_total{{{{{POD},rcode=\"NXDOMAIN\"}}}}[5m]))"
          f" / sum by ({BY_POD}) (rate(podnet_dns_responses_total{{{{{POD}}}}}[5m]))) > {{threshold}}"
          f" and sum by ({BY_POD}) (rate(podnet_dns_responses_total{{{{{POD}}}}}[5m])) > {{min_rate}}",
          0.5, "15m", "info",
          "{{ $labels.namespace }}/{{ $labels.pod }}: {{ $value | humanizePercentage }} of its "
          "DNS answers are NXDOMAIN",
          "Often the search-path expansion of short names (ndots): harmless but slow; or a "
          "misspelt service name.", capture="30s", min_rate=0.1),
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


# What `--set Alert.FIELD=VALUE` may set, and how each value is read (a RuleError if bad).
DURATION = re.compile(r"\d+(ms|s|m|h)")
LABEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
RESERVED_LABELS = {"alertname", "severity", "podnet_capture", "namespace", "pod"}


def _number(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise RuleError(f"{value!r} is not a number") from None
    if not math.isfinite(number):
        raise RuleError(f"{value!r} is not a finite number")
    return number


def _duration(value: str) -> str:
    if not DURATION.fullmatch(value):
        raise RuleError(f"{value!r} is not a duration like 5m")
    return value


def _capture(value: str) -> str:
    """A capture duration for the webhook, or none ("" / "none" / "off")."""
    if value in ("", "none", "off"):
        return ""
    return _duration(value)


def _text(value: str) -> str:
    if not value.strip():
        raise RuleError("an empty text")
    if value.count("{{") != value.count("}}"):
        raise RuleError(f"{value!r}: unbalanced {{{{ }}}} template braces")
    return value


def _severity(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", value):
        raise RuleError(f"{value!r} is not a label value like warning or critical")
    return value


def _enabled(value: str) -> bool:
    if value.lower() in ("true", "yes", "on", "1"):
        return True
    if value.lower() in ("false", "no", "off", "0"):
        return False
    raise RuleError(f"{value!r} is not true or false")


FIELDS: dict[str, tuple[str, Callable[[str], Any]]] = {
    # --set name: (Alert attribute, parser)
    "threshold": ("threshold", _number),
    "for": ("for_", _duration),
    "severity": ("severity", _severity),
    "capture": ("capture", _capture),
    "capture_filter": ("capture_filter", str),
    "min_rate": ("min_rate", _number),
    "summary": ("summary", _text),
    "description": ("description", _text),
    "enabled": ("enabled", _enabled),
}


def configured(overrides: Sequence[str]) -> list[Alert]:
    """The alerts with `Name.FIELD=VALUE` overrides, in order (Name may be a glob).

    FIELD is one of FIELDS, or `label.KEY` for a label of one's own (a team to route by);
    the alerts `enabled=false` turns off are left out.
    """
    alerts = list(ALERTS)
    usage = ("expected Alert.FIELD=VALUE, FIELD one of " + ", ".join(FIELDS)
             + " or label.KEY")
    for item in overrides:
        target, sep, value = item.partition("=")
        name, dot, key = target.partition(".")
        label = key.removeprefix("label.") if key.startswith("label.") else None
        if not sep or not dot or (key not in FIELDS and label is None):
            raise RuleError(f"{item!r}: {usage}")
        matched = [i for i, a in enumerate(alerts) if fnmatch.fnmatchcase(a.name, name)]
        if not matched:
            raise RuleError(f"{item!r}: no alert matches {name!r}")
        try:
            if label is not None:
                if not LABEL_NAME.fullmatch(label) or label in RESERVED_LABELS:
                    raise RuleError(f"{label!r} is not a label of one's own (reserved: "
                                    + ", ".join(sorted(RESERVED_LABELS)) + ")")
                for i in matched:
                    extra = {**alerts[i].extra_labels, label: value}
                    alerts[i] = replace(alerts[i], extra_labels=extra)
                continue
            attribute, parse = FIELDS[key]
            parsed = parse(value)
        except RuleError as exc:
            raise RuleError(f"{item!r}: {exc}") from None
        for i in matched:
            alerts[i] = replace(alerts[i], **{attribute: parsed})
    return [a for a in alerts if a.enabled]


def runbook_link(alert: Alert, runbook_url: str) -> str:
    """The alert's section of the runbook where the user hosts docs/runbook.md.

    `{anchor}` in the URL is replaced by the section's anchor; otherwise `#anchor` is
    appended. No URL, no link: a link to a page that does not exist helps nobody at 3 a.m.
    """
    if not runbook_url:
        return ""
    if "{anchor}" in runbook_url:
        return runbook_url.replace("{anchor}", alert.anchor())
    return f"{runbook_url.split('#', 1)[0]}#{alert.anchor()}"


def check_runbook_url(url: str) -> str:
    if url and not re.fullmatch(r"https?://[^\s]+", url):
        raise RuleError(f"--runbook-url {url!r}: expected an http(s) URL")
    return url


def rule(alert: Alert, job: str, runbook_url: str = "") -> dict[str, Any]:
    expr = alert.expr.format(threshold=alert.threshold, job=job, min_rate=alert.min_rate)
    labels = {"severity": alert.severity, **alert.extra_labels}
    if alert.capture:
        labels["podnet_capture"] = alert.capture
    annotations = {"summary": alert.summary, "description": alert.description}
    if alert.capture and alert.capture_filter:
        annotations["podnet_capture_filter"] = alert.capture_filter
    link = runbook_link(alert, runbook_url)
    if link:
        annotations["runbook_url"] = link
    return {"alert": alert.name, "expr": expr, "for": alert.for_, "labels": labels,
            "annotations": annotations}


# Recording rules: workload and namespace rates, so that dashboards and queries over many
# nodes read a series per workload, not one per pod. Workloads come from podnet_pod_info,
# joined per daemon (instance) and pod: the only series that carries them. A pod no
# controller owns is a workload of its own (kind Pod), not lumped with the others.
WORKLOAD = "namespace, workload_kind, workload"
_OWNERS = ('podnet_pod_info{workload!=""} or label_replace(label_replace('
           'podnet_pod_info{workload=""}, "workload", "$1", "pod", "(.*)"), '
           '"workload_kind", "Pod", "workload_kind", ".*")')
_JOIN = ("* on (instance, namespace, pod) group_left (workload_kind, workload) "
         f"max by (instance, namespace, pod, workload_kind, workload) ({_OWNERS})")


@dataclass(frozen=True)
class Recording:
    metric: str  # the counter, without _total
    by: str = ""  # labels kept beside the workload's
    selector: str = ""  # more matchers beside the pod selector
    total: bool = True  # a counter's name ends in _total; a histogram's _bucket does not

    def workload_rule(self) -> dict[str, str]:
        series = f"{self.metric}_total" if self.total else self.metric
        matchers = POD + (f",{self.selector}" if self.selector else "")
        keep = f"{WORKLOAD}, {self.by}" if self.by else WORKLOAD
        return {"record": f"namespace_workload:{self.metric}:rate5m",
                "expr": f"sum by ({keep}) (rate({series}{{{matchers}}}[5m]) {_JOIN})"}

    def namespace_rule(self) -> dict[str, str]:
        keep = f"namespace, {self.by}" if self.by else "namespace"
        return {"record": f"namespace:{self.metric}:rate5m",
                "expr": f"sum by ({keep}) (namespace_workload:{self.metric}:rate5m)"}


RECORDINGS: tuple[Recording, ...] = (
    Recording("podnet_bytes", "direction"),
    Recording("podnet_packets", "direction"),
    # workload to workload: the service map of a whole cluster from one series per pair
    Recording("podnet_peer_bytes", "direction, peer_kind, peer_namespace, peer_workload"),
    Recording("podnet_drops", "reason"),
    Recording("podnet_tcp_retransmits"),
    Recording("podnet_tcp_segments", "direction"),
    Recording("podnet_tcp_connect_failures", "role, reason"),
    Recording("podnet_dns_responses", "rcode"),
    Recording("podnet_dns_timeouts"),
    Recording("podnet_tcp_handshake_seconds_bucket", "role, le", total=False),
    Recording("podnet_tcp_rtt_seconds_bucket", "le", total=False),
    Recording("podnet_dns_latency_seconds_bucket", "le", total=False),
)


def recording_rules() -> list[dict[str, str]]:
    rules = [r.workload_rule() for r in RECORDINGS]
    return rules + [r.namespace_rule() for r in RECORDINGS]


def groups(alerts: Sequence[Alert], job: str = "podnetmon",
           runbook_url: str = "") -> list[dict[str, Any]]:
    return [{"name": "podnet-aggregates", "rules": recording_rules()},
            {"name": "podnet-pods",
             "rules": [rule(a, job, runbook_url) for a in alerts if a.pod_fault]},
            {"name": "podnet-monitor",
             "rules": [rule(a, job, runbook_url) for a in alerts if not a.pod_fault]}]


def prometheus_file(alerts: Sequence[Alert], job: str = "podnetmon",
                    runbook_url: str = "") -> str:
    header = "# Generated by `podnetmon rules` from monitor/alertrules.py: edit that, not this.\n"
    return header + yaml.safe_dump({"groups": groups(alerts, job, runbook_url)},
                                   sort_keys=False, width=100)


def operator_resource(alerts: Sequence[Alert], job: str = "podnetmon",
                      runbook_url: str = "", namespace: str = "podnetmon") -> str:
    doc: Mapping[str, Any] = {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
        "metadata": {"name": "podnetmon", "namespace": namespace,
                     "labels": {"app.kubernetes.io/name": "podnetmon"}},
        "spec": {"groups": groups(alerts, job, runbook_url)}}
    header = "# Generated by `podnetmon rules --format operator`: edit monitor/alertrules.py.\n"
    return header + yaml.safe_dump(dict(doc), sort_keys=False, width=100)
