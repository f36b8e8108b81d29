/* packets.c: per-pod packets and bytes, by direction and protocol.
 *
 * Counts: every packet crossing a pod's host veth, in both directions, by
 *         protocol class (tcp, udp, icmp incl. ICMPv6, other), and its length
 *         as the interface statistics count it (skb->len, Ethernet header in).
 * Hook:   the TC programs of tc_main.c, TC ingress and egress (classic tc or tcx).
 * Kernel: 4.6 for per-CPU hash maps; tcx attachment needs 6.6.
 * Cost:   one per-CPU hash lookup keyed by ifindex and two plain (non-atomic,
 *         per-CPU) adds per packet; see bench/RESULTS.md for the measured figure.
 *
 * The entry for an interface is created by the daemon before the programs are
 * attached there and deleted after they are detached, so this program never
 * inserts: a miss means "not ours" and costs nothing more.
 */
struct pnm_counts {
    __u64 packets[PNM_NDIR][PNM_NPROTO];
    __u64 bytes[PNM_NDIR][PNM_NPROTO];
};

BPF_PERCPU_HASH(pnm_packets, __u32, struct pnm_counts, PNM_MAX_INTERFACES);

static __always_inline void packets_tc(struct __sk_buff *skb, const struct pnm_pkt *pkt)
{
    __u32 ifindex = skb->ifindex;
    struct pnm_counts *c = pnm_packets.lookup(&ifindex);
    if (!c)
        return;
    __u32 d = pkt->dir & 1;
    __u32 p = pkt->proto_class & 3;
    c->packets[d][p] += 1;
    c->bytes[d][p] += pkt->len;
}
