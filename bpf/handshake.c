/* handshake.c: TCP handshake latency and failed connection attempts, per pod and role.
 *
 * Measures: client role (the pod connects out): from the pod's SYN to the
 *           peer's SYN-ACK; server role (the pod accepts): from the peer's SYN
 *           to the pod's SYN-ACK; both as seen on the pod's host veth. A
 *           retransmitted SYN keeps the first one's time. An RST answering a
 *           pending SYN is a failed attempt ("reset"); a SYN with no answer
 *           before the daemon's timeout is one too ("timeout": the daemon
 *           sweeps pnm_hs_pending and counts those in pnm_hs_timeouts, which
 *           no program writes). A timed-out attempt stays in the map marked
 *           PNM_TIMED_OUT, so that its further SYN retransmits neither count
 *           again nor, if a SYN-ACK finally comes, give a latency sample.
 * Hook:   the TC programs (tc_main.c).
 * Kernel: 4.10 (LRU hash).
 * Cost:   a flags test on every TCP segment; on SYN, SYN-ACK and RST only: the
 *         addresses read again and one LRU hash operation.
 */
#define PNM_ROLE_CLIENT 0
#define PNM_ROLE_SERVER 1

#ifndef PNM_HS_FLOWS
#define PNM_HS_FLOWS 65536
#endif

struct pnm_flow {
    __u32 slot;
    __u8 family;
    __u8 role;
    __be16 lport; /* the pod's port */
    __be16 rport;
    __u16 _pad;
    __u8 laddr[16]; /* the pod's address */
    __u8 raddr[16];
};

struct pnm_handshake {
    __u64 buckets[2][PNM_HIST_BUCKETS]; /* [role] */
    __u64 sum_us[2];
    __u64 count[2];
    __u64 resets[2];
};

PNM_MAP("lru_hash", struct pnm_flow, __u64, pnm_hs_pending, PNM_HS_FLOWS);
PNM_MAP("array", __u32, struct pnm_handshake, pnm_handshake, PNM_SLOTS);
struct pnm_hs_timeouts {
    __u64 count[2]; /* [role] */
};
PNM_MAP("array", __u32, struct pnm_hs_timeouts, pnm_hs_timeouts, PNM_SLOTS); /* the daemon's sweep writes it */

static __always_inline void handshake_tc(struct __sk_buff *skb, const struct pnm_pkt *pkt)
{
    __u8 f = pkt->tcp_flags;
    if (pkt->l4proto != IPPROTO_TCP || !pkt->has_ports || !(f & (PNM_TCP_SYN | PNM_TCP_RST)))
        return;
    struct pnm_flow key = {};
    key.slot = pkt->slot;
    key.family = pkt->family;
    if (pnm_addrs(skb, pkt, key.laddr, key.raddr) < 0)
        return;
    int sent = pkt->dir == PNM_DIR_EGRESS;
    key.lport = sent ? pkt->sport : pkt->dport;
    key.rport = sent ? pkt->dport : pkt->sport;
    __u64 now = bpf_ktime_get_ns();
    if ((f & PNM_TCP_SYN) && !(f & (PNM_TCP_ACK | PNM_TCP_RST))) {
        /* a SYN the pod sends opens a client attempt; one it receives, a server one */
        key.role = sent ? PNM_ROLE_CLIENT : PNM_ROLE_SERVER;
        pnm_hs_pending.insert(&key, &now); /* no-op if there: a SYN retransmit */
        return;
    }
    /* SYN-ACK or RST: answers the attempt of the side that did not send it */
    key.role = sent ? PNM_ROLE_SERVER : PNM_ROLE_CLIENT;
    __u64 *start = pnm_hs_pending.lookup(&key);
    if (!start)
        return;
    __u64 began = *start;
    pnm_hs_pending.delete(&key);
    if (began & PNM_TIMED_OUT)
        return; /* already counted as a timeout */
    __u32 slot = pkt->slot;
    struct pnm_handshake *h = pnm_handshake.lookup(&slot);
    if (!h)
        return;
    __u32 role = key.role & 1;
    if (f & PNM_TCP_RST) {
        __sync_fetch_and_add(&h->resets[role], 1);
        return;
    }
    if (!(f & PNM_TCP_SYN) || now < began)
        return;
    __u64 us = (now - began) / 1000;
    __sync_fetch_and_add(&h->buckets[role][pnm_hist_bucket(us)], 1);
    __sync_fetch_and_add(&h->sum_us[role], us);
    __sync_fetch_and_add(&h->count[role], 1);
}
