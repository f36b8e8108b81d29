/* dns.c: DNS over UDP port 53, as the pod's resolver sees it.
 *
 * Measures: the time from a query the pod sends (UDP to port 53, QR=0) to the
 *           answer it receives (from port 53, QR=1, same id, addresses and
 *           ports), in a histogram, and the answers by RCODE. Queries are
 *           matched to answers by (id, the pod's address and port, the server's
 *           address); an unmatched answer counts nothing. Queries left
 *           unanswered past the daemon's timeout are swept by the daemon and
 *           counted in pnm_dns_timeouts (which no program writes), and stay
 *           marked PNM_TIMED_OUT so a retry or a late answer is not counted
 *           again. Only the
 *           12-byte header is read: names, and any compression loops or bogus
 *           counts in them, are never parsed. IPv4 and IPv6.
 * Hook:   the TC programs (tc_main.c).
 * Kernel: 4.10 (LRU hash).
 * Cost:   a port test on every UDP datagram; on port 53 only: one header read,
 *         the addresses, one LRU hash operation.
 */
#ifndef PNM_DNS_QUERIES
#define PNM_DNS_QUERIES 16384
#endif

struct pnm_dns_key {
    __u32 slot;
    __u8 family;
    __u8 _pad;
    __u16 id;
    __be16 lport; /* the pod's port */
    __be16 rport;
    __u8 laddr[16];
    __u8 raddr[16];
};

struct pnm_dns {
    __u64 buckets[PNM_HIST_BUCKETS];
    __u64 sum_us;
    __u64 count;
    __u64 queries;
    __u64 rcodes[16];
};

PNM_MAP("lru_hash", struct pnm_dns_key, __u64, pnm_dns_pending, PNM_DNS_QUERIES);
PNM_MAP("array", __u32, struct pnm_dns, pnm_dns, PNM_SLOTS);
PNM_MAP("array", __u32, __u64, pnm_dns_timeouts, PNM_SLOTS); /* written by the daemon's sweep only */

static __always_inline void dns_tc(struct __sk_buff *skb, const struct pnm_pkt *pkt)
{
    __u8 hdr[4]; /* id, flags */
    __u32 payload;
    int kind = pnm_dns_message(skb, pkt, hdr, &payload);
    if (!kind)
        return;
    int sent = kind == PNM_DNS_QUERY;
    struct pnm_dns_key key = {};
    key.slot = pkt->slot;
    key.family = pkt->family;
    key.id = (hdr[0] << 8) | hdr[1];
    key.lport = sent ? pkt->sport : pkt->dport;
    key.rport = sent ? pkt->dport : pkt->sport;
    if (pnm_addrs(skb, pkt, key.laddr, key.raddr) < 0)
        return;
    __u32 slot = pkt->slot;
    struct pnm_dns *d = pnm_dns.lookup(&slot);
    if (!d)
        return;
    __u64 now = bpf_ktime_get_ns();
    if (sent) {
        __sync_fetch_and_add(&d->queries, 1);
        pnm_dns_pending.insert(&key, &now); /* a retried query keeps the first time */
        return;
    }
    __u64 *start = pnm_dns_pending.lookup(&key);
    if (!start)
        return;
    __u64 began = *start;
    pnm_dns_pending.delete(&key);
    if ((began & PNM_TIMED_OUT) || now < began)
        return; /* counted as a timeout already */
    __u64 us = (now - began) / 1000;
    __sync_fetch_and_add(&d->buckets[pnm_hist_bucket(us)], 1);
    __sync_fetch_and_add(&d->sum_us, us);
    __sync_fetch_and_add(&d->count, 1);
    __sync_fetch_and_add(&d->rcodes[hdr[3] & 0x0f], 1);
}
