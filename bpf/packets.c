/* packets.c: per-pod packets and bytes, by direction and protocol.
 *
 * Counts: every packet crossing a pod's host veth, in both directions, by
 *         protocol class (tcp, udp, icmp incl. ICMPv6, other), and its length
 *         as the interface statistics count it (skb->len, Ethernet header in).
 * Hook:   the TC programs of tc_main.c, TC ingress and egress (classic tc or tcx).
 * Kernel: 4.6 for per-CPU hash maps; tcx attachment needs 6.6.
 * Cost:   one per-CPU array lookup by the interface's slot (inlined by the
 *         verifier) and two plain adds (per-CPU, so no atomics) per packet.
 *
 * The daemon zeroes a slot's counters before it gives the slot to an interface.
 */
struct pnm_counts {
    __u64 packets[PNM_NDIR][PNM_NPROTO];
    __u64 bytes[PNM_NDIR][PNM_NPROTO];
    /* TCP segments: a GSO packet carries gso_segs of them. The denominator of a
     * retransmit ratio, as TcpOutSegs is that of TcpRetransSegs. */
    __u64 tcp_segments[PNM_NDIR];
};

PNM_MAP("percpu_array", __u32, struct pnm_counts, pnm_packets, PNM_SLOTS);

static __always_inline void packets_tc(struct __sk_buff *skb, const struct pnm_pkt *pkt)
{
    __u32 slot = pkt->slot;
    struct pnm_counts *c = pnm_packets.lookup(&slot);
    if (!c)
        return;
    __u32 d = pkt->dir & 1;
    __u32 p = pkt->proto_class & 3;
    c->packets[d][p] += 1;
    c->bytes[d][p] += pkt->len;
    if (p == PNM_PROTO_TCP) {
        __u32 segs = skb->gso_segs;
        c->tcp_segments[d] += segs ? segs : 1;
    }
}
