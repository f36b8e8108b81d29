/* retransmits.c: TCP segments retransmitted, per pod.
 *
 * Counts: segments a pod's TCP retransmitted (tcp_skb_pcount of each
 *         retransmitted skb, read from its control block, so a GSO skb counts
 *         its segments as TcpRetransSegs does), and retransmitted SYN-ACKs;
 *         attributed through the socket's netns, the node's slot for sockets
 *         of no pod. Retransmissions that failed locally (err != 0, on kernels
 *         whose tracepoint says so) are not counted: nothing left the pod.
 * Hook:   tracepoints tcp:tcp_retransmit_skb, tcp:tcp_retransmit_synack.
 * Kernel: 4.16 (tcp_retransmit_synack); the err field since 6.12.
 * Cost:   a few bpf_probe_read_kernel() and one atomic add per retransmission.
 * Needs kernel offsets (BTF); without them this probe is not loaded.
 */
PNM_MAP("array", __u32, __u64, pnm_retrans, PNM_SLOTS);

static __always_inline void pnm_retrans_add(__u64 sk, __u64 segs)
{
    __u32 slot = pnm_netns_slot(pnm_sock_netns(sk));
    __u64 *count = pnm_retrans.lookup(&slot);
    if (count)
        __sync_fetch_and_add(count, segs);
}

TRACEPOINT_PROBE(tcp, tcp_retransmit_skb)
{
    if (!pnm_current())
        return 0;
#ifdef PNM_RETRANS_HAS_ERR
    if (args->err)
        return 0;
#endif
    __u16 segs = 0;
    bpf_probe_read_kernel(&segs, sizeof(segs),
                          (void *)((__u64)args->skbaddr + PNM_OFF_SKB_CB + PNM_OFF_TCB_GSO_SEGS));
    pnm_retrans_add((__u64)args->skaddr, segs ? segs : 1);
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_retransmit_synack)
{
    if (!pnm_current())
        return 0;
    pnm_retrans_add((__u64)args->skaddr, 1);
    return 0;
}
