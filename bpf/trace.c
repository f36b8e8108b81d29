/* trace.c: on-demand copies of one pod's packets, for `podnetmon trace`.
 *
 * Copies: while a trace of the pod is on (its slot's entry in pnm_trace), each
 *         packet crossing its host veth that passes the kernel prefilter (a
 *         conservative superset of the user's pcap filter: protocol, a port,
 *         an address; monitor/pcapfilter.py proves it) goes to the perf buffer
 *         pnm_trace_events: a small header, then up to snaplen bytes of the
 *         frame from its Ethernet header on. The daemon applies the exact
 *         filter and writes pcapng.
 * Hook:   the TC programs (tc_main.c).
 * Kernel: 4.8 (bpf_perf_event_output from SCHED_CLS with packet data).
 * Cost:   with no trace on anywhere, a test of the tracing switch (tc_packet.h), in
 *         the cache line the moving switch was read from; with one on, an inlined array
 *         lookup per packet; tracing, a copy of the captured bytes (~1 us for 96
 *         bytes, kernel-env.md).
 */
struct pnm_trace_cfg {
    __u32 on;        /* 0: no trace of this slot */
    __u32 snaplen;   /* bytes of each frame to copy */
    __u8 protocol;   /* 0: any; IPPROTO_TCP, IPPROTO_UDP, or IPPROTO_ICMP for ICMP and ICMPv6 */
    __u8 family;     /* 0: any address; 4 or 6: addr must be the source or the destination */
    __be16 port;     /* 0: any; else the source or destination port, when the packet has one */
    __u8 addr[16];
};

struct pnm_trace_meta {
    __u64 ts;        /* bpf_ktime_get_ns() */
    __u32 slot;
    __u32 len;       /* the frame's length (skb->len) */
    __u32 caplen;    /* bytes that follow this header */
    __u8 dir;        /* PNM_DIR_* */
    __u8 _pad[3];
};

BPF_ARRAY(pnm_trace, struct pnm_trace_cfg, PNM_SLOTS);
BPF_PERF_OUTPUT(pnm_trace_events);

static __always_inline int trace_prefilter(struct __sk_buff *skb, const struct pnm_pkt *pkt,
                                           const struct pnm_trace_cfg *cfg)
{
    if (cfg->protocol) {
        if (cfg->protocol == IPPROTO_ICMP ? pkt->proto_class != PNM_PROTO_ICMP
                                          : pkt->l4proto != cfg->protocol)
            return 0;
    }
    if (cfg->port && pkt->has_ports && pkt->sport != cfg->port && pkt->dport != cfg->port)
        return 0;
    if (cfg->family) {
        __u64 local[2], remote[2], want[2];
        if (pkt->family != cfg->family ||
            pnm_addrs(skb, pkt, (__u8 *)local, (__u8 *)remote) < 0)
            return 0;
        __builtin_memcpy(want, cfg->addr, sizeof(want));
        /* two 8-byte compares each: fewer branches for the verifier than a byte loop */
        if ((local[0] != want[0] || local[1] != want[1]) &&
            (remote[0] != want[0] || remote[1] != want[1]))
            return 0;
    }
    return 1;
}

static __always_inline void trace_tc(struct __sk_buff *skb, const struct pnm_pkt *pkt)
{
    if (!pnm_switch(PNM_SWITCH_TRACING))
        return; /* no trace anywhere: the slot's settings are not even looked up */
    __u32 slot = pkt->slot;
    struct pnm_trace_cfg *cfg = pnm_trace.lookup(&slot);
    if (!cfg || !cfg->on || !trace_prefilter(skb, pkt, cfg))
        return;
    struct pnm_trace_meta meta = {};
    meta.ts = bpf_ktime_get_ns();
    meta.slot = slot;
    meta.len = skb->len;
    meta.caplen = skb->len < cfg->snaplen ? skb->len : cfg->snaplen;
    meta.dir = pkt->dir;
    pnm_trace_events.perf_submit_skb(skb, meta.caplen, &meta, sizeof(meta));
}
