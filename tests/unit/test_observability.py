"""The shipped rules and dashboards: one source, promtool's own checks, and podnetmon top."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from monitor import alertrules, dashboards, top

ROOT = Path(__file__).resolve().parents[2]
PROMTOOL = shutil.which("promtool")


def test_committed_rule_files_are_what_the_source_renders() -> None:
    assert (ROOT / "prometheus" / "podnet-rules.yaml").read_text() == \
        alertrules.prometheus_file(alertrules.ALERTS)
    assert (ROOT / "deploy" / "prometheus-operator" / "prometheusrule.yaml").read_text() == \
        alertrules.operator_resource(alertrules.ALERTS)


def test_committed_dashboards_are_what_the_source_renders() -> None:
    rendered = dict(dashboards.rendered())
    assert sorted(p.name for p in (ROOT / "grafana").glob("*.json")) == sorted(rendered)
    for name, text in rendered.items():
        assert (ROOT / "grafana" / name).read_text() == text, name


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (make setup installs it)")
def test_promtool_checks_and_tests_the_rules() -> None:
    check = subprocess.run([PROMTOOL, "check", "rules", "prometheus/podnet-rules.yaml"], cwd=ROOT,
                           capture_output=True, text=True, check=False)
    assert check.returncode == 0 and "SUCCESS: 37 rules found" in check.stdout, check.stdout
    tested = subprocess.run([PROMTOOL, "test", "rules", "podnet-rules.test.yaml"],
                            cwd=ROOT / "tests" / "promtool", capture_output=True, text=True,
                            check=False)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_has_a_runbook_section_and_pod_alerts_name_the_pod() -> None:
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    for alert in alertrules.ALERTS:
        assert f"## {alert.anchor()}\n" in runbook, alert.name
        assert f"**{alert.name}**" in runbook
        if alert.pod_fault:
            assert "{{ $labels.namespace }}/{{ $labels.pod }}" in alert.summary, alert.name


def test_every_pod_alert_asks_for_a_capture_as_the_readme_says() -> None:
    # README and runbook: every pod alert carries podnet_capture, so that the Alertmanager
    # webhook starts a capture of the pod it names; the rendered rule is what Prometheus sees
    readme = (ROOT / "README.md").read_text()
    assert "podnet_capture" in readme
    for alert in alertrules.ALERTS:
        labels = alertrules.rule(alert, "podnetmon")["labels"]
        assert ("podnet_capture" in labels) == alert.pod_fault, alert.name


def test_overrides_set_thresholds_and_for() -> None:
    alerts = {a.name: a for a in alertrules.configured(
        ["PodNetDropsHigh.threshold=5", "PodNetDNS*.for=1m", "*.for=30s"])}
    assert alerts["PodNetDropsHigh"].threshold == 5.0
    assert {a.for_ for a in alerts.values()} == {"30s"}  # the last --set wins, in order
    rule = alertrules.rule(alerts["PodNetDropsHigh"], "podnetmon")
    assert rule["expr"].endswith("> 5.0") and rule["for"] == "30s"
    assert rule["labels"] == {"severity": "warning", "podnet_capture": "30s"}
    monitor_down = alertrules.rule(alerts["PodNetMonitorDown"], "kube-system/podnetmon")
    assert monitor_down["expr"] == 'up{job="kube-system/podnetmon"} == 0'


def test_every_field_of_an_alert_can_be_set() -> None:
    alerts = {a.name: a for a in alertrules.configured([
        "PodNetDropsHigh.severity=page", "PodNetDropsHigh.capture=2m",
        "PodNetDropsHigh.capture_filter=udp", "PodNetDropsHigh.summary={{ $labels.pod }} drops",
        "PodNetDropsHigh.description=Look at the firewall.", "PodNetDNS*.label.team=dns",
        "PodNetTCPRetransmitRatioHigh.min_rate=100", "PodNetTCPHandshakeSlow.capture=none",
        "PodNetDNSNXDomainRatioHigh.enabled=false", "PodNetMonitor*.label.team=platform"])}
    drops = alertrules.rule(alerts["PodNetDropsHigh"], "podnetmon")
    assert drops["labels"] == {"severity": "page", "podnet_capture": "2m"}
    assert drops["annotations"] == {"summary": "{{ $labels.pod }} drops",
                                    "description": "Look at the firewall.",
                                    "podnet_capture_filter": "udp"}
    assert "> 100.0" in alertrules.rule(alerts["PodNetTCPRetransmitRatioHigh"], "j")["expr"]
    assert "podnet_capture" not in alertrules.rule(alerts["PodNetTCPHandshakeSlow"], "j")["labels"]
    assert "PodNetDNSNXDomainRatioHigh" not in alerts  # off: left out of the file
    assert alertrules.rule(alerts["PodNetDNSTimeouts"], "j")["labels"]["team"] == "dns"
    assert alertrules.rule(alerts["PodNetMonitorDown"], "j")["labels"] == {
        "severity": "critical", "team": "platform"}
    assert len(alerts) == len(alertrules.ALERTS) - 1


def test_runbook_links_only_where_the_user_hosts_the_runbook() -> None:
    # no URL given: no link (the project hosts no runbook page of its own to point at)
    default = yaml.safe_load(alertrules.prometheus_file(alertrules.ALERTS))
    assert not [r for g in default["groups"] for r in g["rules"]
                if "runbook_url" in r.get("annotations", {})]
    drops = next(a for a in alertrules.ALERTS if a.name == "PodNetDropsHigh")
    base = "https://wiki.example.com/podnetmon/runbook.html"
    assert alertrules.rule(drops, "j", base)["annotations"]["runbook_url"] == \
        base + "#podnetdropshigh"
    assert alertrules.rule(drops, "j", base + "#old")["annotations"]["runbook_url"] == \
        base + "#podnetdropshigh"
    assert alertrules.rule(drops, "j", "https://w.example/{anchor}/")["annotations"][
        "runbook_url"] == "https://w.example/podnetdropshigh/"
    for bad in ("wiki/runbook", "ftp://x/runbook", "https://a b"):
        with pytest.raises(alertrules.RuleError):
            alertrules.check_runbook_url(bad)


def test_rules_command_takes_a_runbook_url_and_refuses_bad_input(
        capsys: pytest.CaptureFixture[str]) -> None:
    from monitor import cli

    assert cli.main(["rules", "--runbook-url", "https://wiki.example.com/rb",
                     "--set", "PodNetDropsHigh.enabled=false", "--format", "operator"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    alerts = [r for g in doc["spec"]["groups"] for r in g["rules"] if "alert" in r]
    assert "PodNetDropsHigh" not in {r["alert"] for r in alerts}
    assert {r["annotations"]["runbook_url"] for r in alerts} == {
        f"https://wiki.example.com/rb#{r['alert'].lower()}" for r in alerts}
    assert cli.main(["rules", "--runbook-url", "runbook.md"]) == 2
    assert "--runbook-url" in capsys.readouterr().err
    assert cli.main(["rules", "--set", "PodNetDropsHigh.label.severity=x"]) == 2
    assert "reserved" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["PodNetDropsHigh=3", "Nope.threshold=1", "PodNetDropsHigh.color=red",
                                 "PodNetDropsHigh.threshold=lots", "PodNetDropsHigh.for=5 minutes",
                                 "PodNetDropsHigh.for=", "PodNetDropsHigh.threshold=nan",
                                 "PodNetDropsHigh.capture=soon", "PodNetDropsHigh.severity=very bad",
                                 "PodNetDropsHigh.summary=", "PodNetDropsHigh.summary={{ $value",
                                 "PodNetDropsHigh.enabled=maybe", "PodNetDropsHigh.label.1x=y",
                                 "PodNetDropsHigh.label.pod=y"])
def test_bad_overrides_are_refused(bad: str) -> None:
    with pytest.raises(alertrules.RuleError):
        alertrules.configured([bad])


def test_recording_rules_keep_every_label_the_dashboards_and_alerts_group_by() -> None:
    doc = yaml.safe_load(alertrules.prometheus_file(alertrules.ALERTS))
    [aggregates] = [g for g in doc["groups"] if g["name"] == "podnet-aggregates"]
    records = {r["record"]: r["expr"] for r in aggregates["rules"]}
    for recording in alertrules.RECORDINGS:
        workload = records[f"namespace_workload:{recording.metric}:rate5m"]
        assert workload.startswith(f"sum by ({alertrules.WORKLOAD}")
        assert 'namespace!~"_node|_overflow"' in workload  # pods only
        namespace = records[f"namespace:{recording.metric}:rate5m"]
        assert f"namespace_workload:{recording.metric}:rate5m" in namespace
    # every counter family the pod dashboard shows has a workload rate
    shown = {m.removesuffix("_total") for p in dashboards.POD.panels for expr, _ in p.exprs
             for m in re.findall(r"podnet_[a-z_]+", expr)}
    recorded = {r.metric for r in alertrules.RECORDINGS}
    assert shown - recorded == {"podnet_tcp_flags"}, \
        shown - recorded


def test_dashboards_use_the_datasource_variable_only() -> None:
    for dashboard in dashboards.DASHBOARDS:
        doc = dashboards.render(dashboard)
        text = json.dumps(doc)
        uids = set(_values(doc, "uid"))
        assert uids <= {dashboard.uid, "${datasource}"}, uids
        ids = [p["id"] for p in doc["panels"]]
        assert len(ids) == len(set(ids)) == len(dashboard.panels)
        names = [v["name"] for v in doc["templating"]["list"]]
        assert names[:2] == ["datasource", "instance"]
        if dashboard.pod_variables:
            assert names[2:] == ["namespace", "workload", "pod"]
        for panel in doc["panels"]:
            assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
            assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert "podnet_" in text


def _values(node: object, key: str) -> list[str]:
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key and isinstance(v, str):
                out.append(v)
            out += _values(v, key)
    elif isinstance(node, list):
        for v in node:
            out += _values(v, key)
    return out


def test_overview_panels_cover_what_the_issue_lists() -> None:
    titles = [p.title for p in dashboards.NODE.panels]
    for wanted in ("Top pods by traffic", "Drops by reason", "Top pods by TCP retransmits",
                   "TCP handshake time, 90th percentile", "DNS latency, 90th percentile",
                   "Pods failing to connect"):
        assert wanted in titles
    kinds = {p.kind for p in dashboards.POD.panels}
    assert kinds == {"timeseries", "heatmap"}


SCRAPE_1 = """
podnet_bytes_total{namespace="shop",pod="web",direction="ingress",protocol="tcp"} 1000
podnet_bytes_total{namespace="shop",pod="web",direction="egress",protocol="tcp"} 500
podnet_packets_total{namespace="shop",pod="web",direction="ingress",protocol="tcp"} 10
podnet_packets_total{namespace="shop",pod="web",direction="egress",protocol="tcp"} 5
podnet_drops_total{namespace="shop",pod="web",reason="NO_SOCKET"} 1
podnet_tcp_retransmits_total{namespace="shop",pod="web"} 0
podnet_tcp_handshake_seconds_bucket{namespace="shop",pod="web",role="client",le="0.001"} 0
podnet_tcp_handshake_seconds_bucket{namespace="shop",pod="web",role="client",le="0.002"} 0
podnet_tcp_handshake_seconds_bucket{namespace="shop",pod="web",role="client",le="+Inf"} 0
podnet_bytes_total{namespace="shop",pod="db",direction="ingress",protocol="tcp"} 0
"""
SCRAPE_2 = """
podnet_bytes_total{namespace="shop",pod="web",direction="ingress",protocol="tcp"} 3000
podnet_bytes_total{namespace="shop",pod="web",direction="egress",protocol="tcp"} 900
podnet_packets_total{namespace="shop",pod="web",direction="ingress",protocol="tcp"} 30
podnet_packets_total{namespace="shop",pod="web",direction="egress",protocol="tcp"} 9
podnet_drops_total{namespace="shop",pod="web",reason="NO_SOCKET"} 5
podnet_tcp_retransmits_total{namespace="shop",pod="web"} 2
podnet_tcp_handshake_seconds_bucket{namespace="shop",pod="web",role="client",le="0.001"} 0
podnet_tcp_handshake_seconds_bucket{namespace="shop",pod="web",role="client",le="0.002"} 10
podnet_tcp_handshake_seconds_bucket{namespace="shop",pod="web",role="client",le="+Inf"} 10
podnet_bytes_total{namespace="shop",pod="db",direction="ingress",protocol="tcp"} 10000
"""


def test_top_rates_and_percentiles_from_two_scrapes() -> None:
    rows = {r.pod: r for r in top.rows(top.parse(SCRAPE_1), top.parse(SCRAPE_2), 2.0)}
    web = rows["shop/web"]
    assert (web.rx_bps, web.tx_bps) == (2000 * 8 / 2, 400 * 8 / 2)
    assert (web.rx_pps, web.tx_pps) == (10.0, 2.0)
    assert (web.drops, web.top_reason, web.retrans) == (2.0, "NO_SOCKET", 1.0)
    assert web.hs_p50 == pytest.approx(0.0015)  # halfway through (0.001, 0.002]
    assert web.hs_p90 == pytest.approx(0.0019)
    assert web.dns_p50 is None
    text = top.table(list(rows.values()), "bytes", 10)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["POD", "RX", "TX"]
    assert lines[1].startswith("shop/db") and lines[2].startswith("shop/web")  # db moved more
    assert top.table(list(rows.values()), "drops", 10).splitlines()[1].startswith("shop/web")


def test_quantile_matches_prometheus_interpolation() -> None:
    before = {0.1: 0.0, 0.2: 0.0, float("inf"): 0.0}
    after = {0.1: 50.0, 0.2: 100.0, float("inf"): 100.0}
    assert top.quantile(0.5, before, after) == pytest.approx(0.1)
    assert top.quantile(0.75, before, after) == pytest.approx(0.15)
    assert top.quantile(0.9, before, {0.1: 0.0, float("inf"): 10.0}) == pytest.approx(0.1)
    assert top.quantile(0.5, before, before) is None


def test_rule_file_groups_split_pods_from_the_monitor() -> None:
    doc = yaml.safe_load(alertrules.prometheus_file(alertrules.ALERTS))
    groups = {g["name"]: [r.get("alert") for r in g["rules"]] for g in doc["groups"]}
    assert groups["podnet-monitor"] == ["PodNetMonitorDown", "PodNetMonitorAttachFailing",
                                        "PodNetMonitorBypassed", "PodNetMonitorLostEvents"]
    assert len(groups["podnet-pods"]) == 9


def _peer(metric: str, pod: str, direction: str, peer: tuple[str, str, str], value: int) -> str:
    kind, namespace, workload = peer
    return (f'podnet_peer_{metric}_total{{namespace="shop",pod="{pod}",direction="{direction}",'
            f'peer_kind="{kind}",peer_namespace="{namespace}",peer_workload="{workload}"}} '
            f"{value}\n")


def _peers_scrape(db_bytes: int, db_packets: int, ingress: bool) -> str:
    return ("# TYPE podnet_peer_bytes counter\n"
            + _peer("bytes", "web", "egress", ("service", "shop", "db"), db_bytes)
            + _peer("bytes", "web", "egress", ("_other", "", ""), 10 if not ingress else 30)
            + _peer("bytes", "other", "egress", ("external", "", ""), 5)
            + (_peer("bytes", "web", "ingress", ("pod", "shop", "db"), 500) if ingress else "")
            + "# TYPE podnet_peer_packets counter\n"
            + _peer("packets", "web", "egress", ("service", "shop", "db"), db_packets))


PEERS_1 = _peers_scrape(1000, 10, ingress=False)
PEERS_2 = _peers_scrape(3000, 30, ingress=True)


def test_top_peers_shows_one_pods_peers_by_rate() -> None:
    before = top.parse_peers(PEERS_1, "shop", "web")
    after = top.parse_peers(PEERS_2, "shop", "web")
    assert set(after) == {("egress", "service", "shop", "db"), ("egress", "_other", "", ""),
                          ("ingress", "pod", "shop", "db")}  # another pod's are not shown
    lines = top.peer_table(before, after, 2.0, 10).splitlines()
    assert lines[0].split() == ["DIRECTION", "PEER", "KIND", "PEER", "NAMESPACE", "PEER",
                                "WORKLOAD", "RATE", "PKT/S"]
    # (3000 - 1000) bytes in 2 s = 8 kb/s; 20 packets in 2 s; a series new since: from 0
    assert lines[1].split() == ["egress", "service", "shop", "db", "8.0kb/s", "10.0"]
    assert lines[2].split() == ["ingress", "pod", "shop", "db", "2.0kb/s", "0.0"]
    assert lines[3].split() == ["egress", "_other", "-", "-", "80b/s", "0.0"]
