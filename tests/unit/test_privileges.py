"""Capability names in the daemon's log: the words a securityContext uses."""

from __future__ import annotations

from monitor.kernel import privileges


def test_every_capability_the_daemonset_adds_is_named() -> None:
    # the DaemonSet's add list; SYSLOG (34) was logged as "34" under a real kubelet
    added = ["BPF", "PERFMON", "NET_ADMIN", "SYS_PTRACE", "SYSLOG"]
    bits = privileges.mask([privileges.CAP_BPF, privileges.CAP_PERFMON,
                            privileges.CAP_NET_ADMIN, privileges.CAP_SYS_PTRACE, 34])
    assert sorted(privileges.names(bits)) == sorted(added)


def test_names_follow_linux_numbering() -> None:
    assert privileges.NAMES[privileges.CAP_DAC_OVERRIDE] == "DAC_OVERRIDE"
    assert privileges.NAMES[privileges.CAP_SYS_ADMIN] == "SYS_ADMIN"
    assert privileges.NAMES[24] == "SYS_RESOURCE"
    assert privileges.NAMES[40] == "CHECKPOINT_RESTORE"
    assert privileges.names(1 << 41) == ["41"]  # a newer kernel's: by number, not lost
