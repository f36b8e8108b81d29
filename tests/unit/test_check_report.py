"""`run --check`'s summary for a person (monitor.state.check_report)."""

from __future__ import annotations

from monitor.identity import HostVeth, PodMeta, PodNetwork, identify
from monitor.state import InterfaceStatus, PodStatus, check_report


def status(name: str, *interfaces: InterfaceStatus) -> PodStatus:
    pod = identify(PodNetwork(4026532000, "/proc/1/ns/net"), [i.veth for i in interfaces],
                   PodMeta("lab", name))
    return PodStatus(pod, interfaces)


def iface(name: str, ifindex: int, mode: str, since: float | None, error: str) -> InterfaceStatus:
    return InterfaceStatus(HostVeth(ifindex, name), mode, since, error)


def test_every_interface_attached_is_ok() -> None:
    pods = [status("pod-0", iface("pnml0-h", 10, "tc", 1.0, "")),
            status("pod-1", iface("pnml1-h", 11, "tcx", 1.0, ""))]
    assert check_report(pods, 0, 0x504F).splitlines() == [
        "podnetmon run --check: 2 pods found, 2 attached (this check's own programs, tc handle "
        "0x504f, detached again)",
        "  attached (tc)   lab/pod-0  pnml0-h",
        "  attached (tcx)  lab/pod-1  pnml1-h",
        "result: ok",
    ]


def test_what_failed_says_why_and_the_verdict_is_the_exit_status() -> None:
    pods = [status("pod-0", iface("pnml0-h", 10, "tc", 1.0, "")),
            status("web-1", iface("pnml1-h", 11, "", None, "EPERM: not allowed")),
            status("lonely")]
    assert check_report(pods, 3, 0x504F).splitlines() == [
        "podnetmon run --check: 3 pods found, 1 attached (this check's own programs, tc handle "
        "0x504f, detached again)",
        "  attached (tc)  lab/pod-0   pnml0-h",
        "  NOT ATTACHED   lab/web-1   pnml1-h  EPERM: not allowed",
        "  NOT ATTACHED   lab/lonely  -        no host veth",
        "  3 attach attempts failed: the log on stderr says why",
        "result: FAILED (exit 1)",
    ]


def test_no_pods_is_said_plainly() -> None:
    assert check_report([], 0, 0x504F).splitlines() == [
        "podnetmon run --check: 0 pods found, 0 attached (this check's own programs, tc handle "
        "0x504f, detached again)",
        "result: ok",
    ]
