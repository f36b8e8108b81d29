"""Everything that talks to the kernel: BPF syscalls, bcc, links, pins, rings, rtnetlink, BTF.

No module outside this package imports bcc (or pyroute2), opens a netlink socket or
makes a raw syscall (tests/unit/test_layout.py holds the tree to that).
"""
