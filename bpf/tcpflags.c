/* tcpflags.c: TCP SYN, SYN-ACK, RST and FIN segments per pod and direction.
 *
 * Counts: every TCP segment crossing a pod's host veth that carries SYN (split
 *         into syn and synack by ACK), RST or FIN; a segment with several of
 *         these flags counts once for each.
 * Hook:   the TC programs (tc_main.c), from the ports/flags pnm_parse read.
 * Kernel: 4.6.
 * Cost:   a test of the flags byte on every TCP segment; an array lookup and
 *         an atomic add only on segments that carry one of the flags.
 */
#define PNM_FLAG_SYN 0
#define PNM_FLAG_SYNACK 1
#define PNM_FLAG_RST 2
#define PNM_FLAG_FIN 3

struct pnm_tcpflags {
    __u64 count[PNM_NDIR][4];
};

PNM_MAP("array", __u32, struct pnm_tcpflags, pnm_tcpflags, PNM_SLOTS);

static __always_inline void tcpflags_tc(struct __sk_buff *skb, const struct pnm_pkt *pkt)
{
    __u8 f = pkt->tcp_flags;
    if (pkt->l4proto != IPPROTO_TCP || !pkt->has_ports ||
        !(f & (PNM_TCP_SYN | PNM_TCP_RST | PNM_TCP_FIN)))
        return;
    __u32 slot = pkt->slot;
    struct pnm_tcpflags *c = pnm_tcpflags.lookup(&slot);
    if (!c)
        return;
    __u32 d = pkt->dir & 1;
    if (f & PNM_TCP_SYN)
        __sync_fetch_and_add(&c->count[d][(f & PNM_TCP_ACK) ? PNM_FLAG_SYNACK : PNM_FLAG_SYN], 1);
    if (f & PNM_TCP_RST)
        __sync_fetch_and_add(&c->count[d][PNM_FLAG_RST], 1);
    if (f & PNM_TCP_FIN)
        __sync_fetch_and_add(&c->count[d][PNM_FLAG_FIN], 1);
}
