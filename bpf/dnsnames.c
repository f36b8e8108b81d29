/* dnsnames.c: which DNS names fail, per pod: NXDOMAIN, SERVFAIL, every non-zero RCODE,
 * and (with the daemon's sweep) timeouts, by query name.
 *
 * Counts: for each query the pod sends over UDP to port 53, the first PNM_DNS_NAME
 *         bytes of its question (the name in wire format, then its type and class),
 *         copied as they are: one bounded load, no loop. The query waits, keyed as
 *         dns.c keys it, for its answer; an answer with a non-zero RCODE counts once
 *         under (interface, RCODE, those bytes). The daemon reads the name out of them
 *         (monitor/probes/dnsnames.py: lower-cased, cut at 63 characters, and a label
 *         length over 63 or a compression pointer, which a question never has, ends it),
 *         counts the queries left unanswered past --dns-timeout, and keeps the top
 *         --dns-top names of each pod. Parsing the name here would be a loop whose
 *         every step branches on packet bytes: the verifier refused it, at 64 steps,
 *         as too complex (E2BIG) once beside the other probes.
 * Hook:   the TC programs (tc_main.c), UDP to or from port 53 only.
 * Kernel: 4.10 (LRU hash).
 * Cost:   on DNS packets only: a query's copy (one load) and an LRU insert; an
 *         answer's lookup and delete, and for a failing one a hash add. Nothing on any
 *         other packet but the port test it shares with dns.c.
 */
#ifndef PNM_DNS_NAME
#define PNM_DNS_NAME 64
#endif
#ifndef PNM_DNSN_QUERIES
#define PNM_DNSN_QUERIES 16384
#endif
#ifndef PNM_DNSN_FAILURES
#define PNM_DNSN_FAILURES 8192
#endif
#define PNM_DNSN_HLEN 12

struct pnm_dnsn_key {
    __u32 ifindex;
    __u8 family;
    __u8 _pad;
    __u16 id;
    __be16 lport; /* the pod's port */
    __be16 rport;
    __u8 laddr[16];
    __u8 raddr[16];
};

struct pnm_dnsn_query {
    __u64 ts; /* when it was sent; PNM_TIMED_OUT once the daemon counted it as a timeout */
    char name[PNM_DNS_NAME]; /* the question as it came, in wire format */
};

struct pnm_dnsn_failure {
    __u32 ifindex;
    __u32 rcode;
    char name[PNM_DNS_NAME];
};

/* Failures by interface: a pod's names that did not fit in pnm_dnsn_failures. */
struct pnm_dnsn_rest {
    __u64 rcodes[16];
};

PNM_MAP("lru_hash", struct pnm_dnsn_key, struct pnm_dnsn_query, pnm_dnsn_pending, PNM_DNSN_QUERIES);
PNM_MAP("hash", struct pnm_dnsn_failure, __u64, pnm_dnsn_failures, PNM_DNSN_FAILURES);
PNM_MAP("array", __u32, struct pnm_dnsn_rest, pnm_dnsn_rest, PNM_SLOTS);
/* A query's entry is too big for the stack beside the name buffer: built here. */
PNM_MAP("percpu_array", __u32, struct pnm_dnsn_query, pnm_dnsn_scratch, 1);

/* The first PNM_DNS_NAME bytes of the question at `off` into `raw` (zeroed past the
 * packet's end); 0 when there is no question to read. */
static __always_inline int dnsn_question(struct __sk_buff *skb, __u32 off, char *raw)
{
    __u32 avail = skb->len > off ? skb->len - off : 0;
    if (avail > PNM_DNS_NAME)
        avail = PNM_DNS_NAME;
    if (avail < 2)
        return 0;
    return bpf_skb_load_bytes(skb, off, raw, avail) == 0;
}

static __always_inline void dnsnames_tc(struct __sk_buff *skb, const struct pnm_pkt *pkt)
{
    __u8 hdr[4]; /* id, flags */
    __u32 payload;
    int kind = pnm_dns_message(skb, pkt, hdr, &payload);
    if (!kind)
        return;
    int sent = kind == PNM_DNS_QUERY;
    struct pnm_dnsn_key key = {};
    key.ifindex = skb->ifindex;
    key.family = pkt->family;
    key.id = (hdr[0] << 8) | hdr[1];
    key.lport = sent ? pkt->sport : pkt->dport;
    key.rport = sent ? pkt->dport : pkt->sport;
    if (pnm_addrs(skb, pkt, key.laddr, key.raddr) < 0)
        return;
    if (sent) {
        __u32 zero = 0;
        struct pnm_dnsn_query *q = pnm_dnsn_scratch.lookup(&zero);
        if (!q)
            return;
        __builtin_memset(q->name, 0, sizeof(q->name));
        if (!dnsn_question(skb, payload + PNM_DNSN_HLEN, q->name))
            return;
        q->ts = bpf_ktime_get_ns();
        pnm_dnsn_pending.insert(&key, q); /* a retried query keeps the first */
        return;
    }
    struct pnm_dnsn_query *q = pnm_dnsn_pending.lookup(&key);
    if (!q)
        return;
    __u8 rcode = hdr[3] & 0x0f;
    __u64 ts = q->ts;
    struct pnm_dnsn_failure f = {};
    f.ifindex = key.ifindex;
    f.rcode = rcode;
    __builtin_memcpy(f.name, q->name, sizeof(f.name));
    pnm_dnsn_pending.delete(&key);
    if (rcode == 0 || (ts & PNM_TIMED_OUT))
        return; /* answered fine, or counted as a timeout already */
    __u64 *n = pnm_dnsn_failures.lookup(&f);
    if (!n) {
        __u64 one = 1;
        if (pnm_dnsn_failures.insert(&f, &one) == 0)
            return;
        n = pnm_dnsn_failures.lookup(&f); /* another CPU inserted it first */
    }
    if (n) {
        __sync_fetch_and_add(n, 1);
        return;
    }
    __u32 slot = pkt->slot;
    struct pnm_dnsn_rest *rest = pnm_dnsn_rest.lookup(&slot);
    if (rest)
        __sync_fetch_and_add(&rest->rcodes[rcode & 15], 1);
}
