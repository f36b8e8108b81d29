"""A small rtnetlink client: link dumps, one link, a netns's nsid, link events, and the
few tc requests the attacher makes (a clsact qdisc; cls_bpf filters added, replaced,
dumped and deleted).

Pure standard library over a raw ``AF_NETLINK``/``NETLINK_ROUTE`` socket. It packs
only the requests we send and reads only the attributes we need, straight out of one
reusable receive buffer, so a reconcile pass stops paying for a general-purpose
netlink library's decoding of every attribute of every link.

Cost, measured on the build VM (kernel 6.18, 2 cores shared with other work, CPython
3.11) with a throwaway script: 40 interleaved rounds, ``time.perf_counter`` (wall) and
``time.thread_time`` (CPU, which includes the kernel's work inside our syscalls) around
each call; best round, median in brackets.

With 1,008 links in the host netns, 1,003 of them veths whose peers each sit in their
own netns (1,004 nsids)::

    links()                     22 ms wall [29], 17.5 ms CPU
    links("veth")               23 ms wall [30], 16.4 ms CPU
      the kernel's part: a bare RTM_GETLINK dump, send + recv, no decoding: 12 ms [16]
    500 netnsid() calls         7.1 ms [9.4]; bare RTM_GETNSID round trips: 5.3 ms
    pyroute2 0.9.7, same host:  IPRoute().get_links() 299 ms [459];
                                500 get_netnsid(fd=...) 66 ms [84]

With half of that (508 links, 503 such veths: the 500 pods of a busy node)::

    links() 9.1 ms, links("veth") 8.8 ms, 500 netnsid() 5.0 ms
    pyroute2: get_links() 126 ms, 500 get_netnsid() 84 ms

The tc requests, on 200 veths with a clsact each, a cls_bpf filter on ingress (20
interleaved rounds, as above; CPU within 0.1 ms of wall)::

    200 replace_bpf_filter()    3.4 ms wall [4.2]   (17 us each, the kernel's swap included)
    200 filters() dumps         5.3 ms [6.8]        (each finding one filter)
    200 delete_filter()         2.5 ms [3.3]
    pyroute2 0.9.7, same calls: tc("replace-filter", "bpf", ...) 96 ms [111],
                                get_filters(index=, parent=) 79 ms [89],
                                tc("del-filter", "bpf", ...) 82 ms [93]

Our Python costs about 6-7 us a link (one pass over its ~42 attributes, read through
a memoryview cast rather than struct calls) and 3.5 us a netnsid(). The rest is the
kernel, and it grows faster than the links: filling IFLA_LINK_NETNSID, like answering
RTM_GETNSID, looks the peer netns up by walking the host's nsid table linearly (~15 ns
an entry here; one RTM_GETLINK takes 8 us for lo, 24 us for a veth with nsid 999), so a
full dump is quadratic in the number of pod netns. Asking the kernel for one kind does
not help on a node whose links are nearly all veths.

Rtnl joins the request families (monitor.kernel.rtnllinks, monitor.kernel.rtnltc) over
one exchange (monitor.kernel.rtnlexchange), the wire format being
monitor.kernel.rtnlwire's; link events are monitor.kernel.linkevents'. Each thread makes
its own ``Rtnl``; one ``Rtnl`` serves any number of requests, of either family.
"""

from __future__ import annotations

from monitor.kernel.rtnllinks import LinkRequests
from monitor.kernel.rtnltc import TcRequests


class Rtnl(LinkRequests, TcRequests):
    """One rtnetlink socket for requests (not for events: see monitor.kernel.linkevents).

    One class over one socket, not a client per family: a thread keeps one Rtnl
    (monitor.kernel.netlink) for its link dumps and its tc requests alike, and each
    family's requests share the exchange's sequence numbers, receive buffer and
    flush of what an abandoned request left behind.
    """
