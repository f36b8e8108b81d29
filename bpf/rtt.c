/* rtt.c: the kernel's smoothed TCP round-trip time, one sample per connection.
 *
 * Samples: a socket's srtt when it leaves ESTABLISHED (the first close or
 *          shutdown), into a histogram per pod (through the socket's netns;
 *          the node's slot otherwise). One sample per connection, at the end
 *          of it: bench/RESULTS.md compares this hook with tcp:tcp_probe,
 *          which fires on every incoming ACK, and explains the choice.
 * Hook:   tracepoint sock:inet_sock_set_state.
 * Kernel: 4.16.
 * Cost:   a state test per TCP state change; two kernel reads and three atomic
 *         adds when a connection closes.
 * Needs kernel offsets (BTF); without them this probe is not loaded.
 */
#define PNM_TCP_ESTABLISHED 1

struct pnm_hist {
    __u64 buckets[PNM_HIST_BUCKETS];
    __u64 sum_us;
    __u64 count;
};

PNM_MAP("array", __u32, struct pnm_hist, pnm_rtt, PNM_SLOTS);

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (!pnm_current())
        return 0;
    if (args->protocol != IPPROTO_TCP || args->oldstate != PNM_TCP_ESTABLISHED)
        return 0;
    __u64 sk = (__u64)args->skaddr;
    __u32 srtt = 0; /* tcp_sock.srtt_us holds the smoothed RTT in us, times 8 */
    if (!pnm_kptr(sk) ||
        bpf_probe_read_kernel(&srtt, sizeof(srtt), (void *)(sk + PNM_OFF_TCP_SRTT)) < 0)
        return 0;
    __u64 us = srtt >> 3;
    if (!us)
        return 0;
    __u32 slot = pnm_netns_slot(pnm_sock_netns(sk));
    struct pnm_hist *h = pnm_rtt.lookup(&slot);
    if (!h)
        return 0;
    __sync_fetch_and_add(&h->buckets[pnm_hist_bucket(us)], 1);
    __sync_fetch_and_add(&h->sum_us, us);
    __sync_fetch_and_add(&h->count, 1);
    return 0;
}
