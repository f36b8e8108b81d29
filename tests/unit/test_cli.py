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
