"""The command line: the pods table and the exit codes of bad settings."""

from __future__ import annotations

import pytest

from monitor.cli import EXIT_USAGE, format_pods, main

POD_WEB = {"namespace": "shop", "pod": "web-7c9f-abcde", "interface": "veth7", "ifindex": 7,
           "attach_mode": "tc", "netns": 4026532001, "uid": "1b4e28ba", "last_error": "",
           "has_metadata": True}
POD_DNS = {"namespace": "kube-system", "pod": "dns", "interface": "vethlonger12", "ifindex": 12,
           "attach_mode": "", "netns": 4026532002, "uid": None, "last_error": "boom"}


def test_format_pods() -> None:
    assert format_pods([POD_WEB, POD_DNS]).splitlines() == [
        "NAMESPACE    POD             INTERFACE     IFINDEX  ATTACH MODE  NETNS       UID       LAST ERROR",
        "shop         web-7c9f-abcde  veth7         7        tc           4026532001  1b4e28ba",
        "kube-system  dns             vethlonger12  12                    4026532002            boom",
    ]


def test_format_pods_missing_fields_are_blank() -> None:
    assert format_pods([{"namespace": "a", "pod": "b"}]).splitlines() == [
        "NAMESPACE  POD  INTERFACE  IFINDEX  ATTACH MODE  NETNS  UID  LAST ERROR",
        "a          b",
    ]


def test_format_pods_none() -> None:
    assert format_pods([]) == "NAMESPACE  POD  INTERFACE  IFINDEX  ATTACH MODE  NETNS  UID  LAST ERROR"


@pytest.mark.usefixtures("clean_env")
def test_run_with_a_bad_attach_mode(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--attach-mode", "bogus"]) == EXIT_USAGE == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "podnetmon: bad setting: attach_mode: 'bogus' is not one of auto, tc, tcx\n"


@pytest.mark.usefixtures("clean_env")
def test_run_with_a_bad_listen(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--listen", "nope"]) == 2
    assert capsys.readouterr().err.startswith("podnetmon: bad setting: listen: 'nope'")


@pytest.mark.usefixtures("clean_env")
def test_run_with_a_bad_env_value(capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PODNETMON_MAX_INTERFACES", "many")
    assert main(["run"]) == 2
    assert "max_interfaces: 'many' is not a valid int" in capsys.readouterr().err


def test_unknown_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


@pytest.mark.usefixtures("clean_env")
def test_run_lists_every_bad_setting_at_once(capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # the README: `run` exits 2 "with every problem listed", not the first one it met
    monkeypatch.setenv("PODNETMON_MAX_INTERFACES", "many")
    assert main(["run", "--attach-mode", "bogus", "--listen", "nope", "--tc-priority", "0",
                 "--probes", "packets,nosuch", "--resync-interval", "soon"]) == EXIT_USAGE
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "podnetmon: bad setting: resync_interval: 'soon' is not a valid float",
        "podnetmon: bad setting: max_interfaces: 'many' is not a valid int",
        "podnetmon: bad setting: listen: 'nope' is not host:port (e.g. 0.0.0.0:9655)",
        "podnetmon: bad setting: attach_mode: 'bogus' is not one of auto, tc, tcx",
        "podnetmon: bad setting: tc_priority: 0 is outside 1..65535",
        "podnetmon: bad setting: probes: nosuch is not a probe; known: packets, peers, "
        "tcpflags, handshake, dns, dnsnames, drops, retransmits, rtt, trace",
    ]


def test_dashboards_help_shows_where_they_go_without_out(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["dashboards", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "default: ./grafana" in help_text
