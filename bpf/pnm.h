/* pnm.h: what every podnetmon program shares.
 *
 * Directions are named from the pod's side: the host veth's TC ingress sees
 * what the pod sends (PNM_DIR_EGRESS), its TC egress what the pod receives
 * (PNM_DIR_INGRESS).
 *
 * The packet is parsed once per run into struct pnm_pkt, and every probe's TC
 * hook reads that instead of parsing again. Fixed headers are copied straight
 * from the linear area when they are there (a few ns); otherwise, and for
 * IPv6 extension headers, through bpf_skb_load_bytes() (~25 ns), which copes
 * with paged data and fails on truncated packets (which then count as "other",
 * or with no L4 header), so no packet can make a probe read out of bounds.
 *
 * This text is concatenated ahead of the probes' C by the kernel adapter
 * (monitor/bpf.py), not #included: BCC rewrites map syntax in the main file only.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>

#define PNM_DIR_INGRESS 0
#define PNM_DIR_EGRESS 1
#define PNM_NDIR 2

#define PNM_PROTO_TCP 0
#define PNM_PROTO_UDP 1
#define PNM_PROTO_ICMP 2
#define PNM_PROTO_OTHER 3
#define PNM_NPROTO 4

#define PNM_NO_L4 0xff

#define PNM_TCP_FIN 0x01
#define PNM_TCP_SYN 0x02
#define PNM_TCP_RST 0x04
#define PNM_TCP_ACK 0x10

/* IPv6 extension headers walked before giving up on finding the L4 header.
 * Real traffic rarely has more than two; the bound keeps the verifier happy. */
#define PNM_IPV6_MAX_EXT 6
/* L4 headers further in than this are read with bpf_skb_load_bytes(): the
 * bound lets the verifier prove a direct read stays inside the packet. */
#define PNM_MAX_DIRECT_L4_OFF 255

#ifndef PNM_MAX_INTERFACES
#define PNM_MAX_INTERFACES 1024
#endif
/* Per-slot arrays have one slot more than there are interfaces: the last is
 * the node's, where tracepoint events that belong to no pod are counted. */
#define PNM_SLOTS (PNM_MAX_INTERFACES + 1)
#define PNM_NODE_SLOT PNM_MAX_INTERFACES
/* Buckets of the ifindex -> slot table; a power of two. */
#ifndef PNM_IFSLOT_BUCKETS
#define PNM_IFSLOT_BUCKETS 65536
#endif

/* Maps that outlive the daemon.
 *
 * With PNM_PIN_DIR set (a directory in bpffs named after the maps' layout), BCC
 * opens each counter map pinned there, or creates and pins it: a restarted
 * daemon's programs count on in the same maps, and the programs left attached
 * by the last daemon keep counting into them until they are replaced. Maps
 * whose contents belong to one daemon's life (trace switches, perf buffers)
 * are plain BPF_TABLEs.
 */
#ifdef PNM_PIN_DIR
#define PNM_MAP(_type, _key, _leaf, _name, _max) \
    BPF_TABLE_PINNED(_type, _key, _leaf, _name, _max, PNM_PIN_DIR "/" #_name)
#else
#define PNM_MAP(_type, _key, _leaf, _name, _max) BPF_TABLE(_type, _key, _leaf, _name, _max)
#endif

/* Hand-over between daemons for tracepoint programs. Tracepoints cannot swap
 * a link's program in place, so a restarted daemon attaches its own next to
 * the old one's; pnm_generation says which of them counts. The daemon writes
 * its PNM_GENERATION there once its programs are attached: from that one
 * write on, the old programs count nothing and the new ones everything. */
#ifndef PNM_GENERATION
#define PNM_GENERATION 0
#endif
PNM_MAP("array", __u32, __u32, pnm_generation, 1);

static __always_inline int pnm_current(void)
{
    __u32 zero = 0;
    __u32 *generation = pnm_generation.lookup(&zero);
    return generation && *generation == PNM_GENERATION;
}

/* Latency histograms: bucket i counts values v (in microseconds) with
 * 2^(i-1) < v <= 2^i, i.e. Prometheus' le=2^i us, from 1 us to 2^26 us (67 s);
 * the last bucket holds what is larger and shows only in +Inf. */
#define PNM_HIST_BUCKETS 28

/* Set by the daemon's sweep in the timestamp of a pending handshake or DNS
 * query that timed out: the entry stays, so the attempt counts once. */
#define PNM_TIMED_OUT (1ULL << 63)

/* Interface slots.
 *
 * Every attached host veth gets a slot, and every per-interface counter lives
 * in an ARRAY indexed by it: the verifier inlines array lookups, so a probe's
 * counter costs about a nanosecond, where a hash lookup keyed by ifindex costs
 * ~35 ns (bench/RESULTS.md). The slot is found from the ifindex through a
 * direct-mapped table (bucket = ifindex mod PNM_IFSLOT_BUCKETS, the entry
 * tagged with its ifindex); an ifindex whose bucket another attached interface
 * holds goes to a small hash instead. A pod's netns maps to the slot of its
 * first interface, for events seen by tracepoints. The daemon writes these
 * tables; the programs only read them.
 */
struct pnm_ifslot {
    __u32 ifindex; /* 0: empty (no interface has index 0) */
    __u32 slot;
};
PNM_MAP("array", __u32, struct pnm_ifslot, pnm_ifslots, PNM_IFSLOT_BUCKETS);
PNM_MAP("hash", __u32, __u32, pnm_ifslot_spill, PNM_MAX_INTERFACES);
PNM_MAP("hash", __u32, __u32, pnm_netns, PNM_MAX_INTERFACES);
/* Who holds each slot: written by the daemon only, read back by the next daemon
 * when it adopts the pinned maps (an ifindex alone could have been reused). */
struct pnm_slot_owner {
    __u32 ifindex;
    __u32 netns;
};
PNM_MAP("array", __u32, struct pnm_slot_owner, pnm_slot_owner, PNM_SLOTS);

static __always_inline int pnm_slot_of(__u32 ifindex, __u32 *slot)
{
    __u32 bucket = ifindex & (PNM_IFSLOT_BUCKETS - 1);
    struct pnm_ifslot *e = pnm_ifslots.lookup(&bucket);
    if (e && e->ifindex == ifindex) {
        *slot = e->slot;
        return 1;
    }
    __u32 *spilled = pnm_ifslot_spill.lookup(&ifindex);
    if (spilled) {
        *slot = *spilled;
        return 1;
    }
    return 0;
}

/* The slot of a pod's netns, or the node's slot for any other netns. */
static __always_inline __u32 pnm_netns_slot(__u32 inum)
{
    __u32 *slot = pnm_netns.lookup(&inum);
    return slot ? *slot : PNM_NODE_SLOT;
}

static __always_inline __u32 pnm_hist_bucket(__u64 us)
{
    if (us <= 1)
        return 0;
    __u32 b = bpf_log2l(us - 1); /* floor(log2(us - 1)) + 1 == ceil(log2(us)) */
    return b < PNM_HIST_BUCKETS ? b : PNM_HIST_BUCKETS - 1;
}

struct pnm_pkt {
    __u32 slot;       /* the interface's slot (see above) */
    __u32 len;        /* skb->len: what the interface statistics count */
    __u16 l4_off;     /* offset of the L4 header from the Ethernet header; 0: none */
    __be16 sport;     /* TCP/UDP ports in network order, when has_ports */
    __be16 dport;
    __u8 dir;         /* PNM_DIR_* */
    __u8 family;      /* 4, 6, or 0 for anything that is not IP */
    __u8 l4proto;     /* IPPROTO_*, PNM_NO_L4 when not IP */
    __u8 proto_class; /* PNM_PROTO_* */
    __u8 fragment;    /* 1: a non-first fragment, whose L4 header is elsewhere */
    __u8 has_ports;   /* 1: sport/dport (and tcp_flags for TCP) were read */
    __u8 tcp_flags;
    __u8 _pad[3];
#ifdef PNM_WANT_PEER
    /* The far side's address (IPv4 in the first four bytes), copied while the IP
     * header is at hand, for the probes that count by peer (peers.c). */
    __u8 peer[16];
#endif
};

static __always_inline __u8 pnm_classify(__u8 l4proto)
{
    switch (l4proto) {
    case IPPROTO_TCP:
        return PNM_PROTO_TCP;
    case IPPROTO_UDP:
        return PNM_PROTO_UDP;
    case IPPROTO_ICMP:
    case IPPROTO_ICMPV6:
        return PNM_PROTO_ICMP;
    default:
        return PNM_PROTO_OTHER;
    }
}

static __always_inline void pnm_parse_ipv4(struct __sk_buff *skb, struct pnm_pkt *pkt)
{
    struct iphdr ip;
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    if (data + ETH_HLEN + sizeof(ip) <= end)
        __builtin_memcpy(&ip, data + ETH_HLEN, sizeof(ip));
    else if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
        return; /* truncated: counted as other */
    pkt->family = 4;
    pkt->l4proto = ip.protocol;
#ifdef PNM_WANT_PEER
    if (pkt->dir == PNM_DIR_EGRESS)
        __builtin_memcpy(pkt->peer, &ip.daddr, 4);
    else
        __builtin_memcpy(pkt->peer, &ip.saddr, 4);
#endif
    /* Fragment offset != 0: the L4 header is in the first fragment only. The
     * fragment still carries the protocol's bytes, so it is classified by it. */
    if (ip.frag_off & bpf_htons(0x1fff)) {
        pkt->fragment = 1;
        return;
    }
    if (ip.ihl >= 5) /* ihl < 5 is malformed: no L4 offset is trusted */
        pkt->l4_off = ETH_HLEN + ip.ihl * 4;
}

static __always_inline void pnm_parse_ipv6(struct __sk_buff *skb, struct pnm_pkt *pkt)
{
    struct ipv6hdr ip6;
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    if (data + ETH_HLEN + sizeof(ip6) <= end)
        __builtin_memcpy(&ip6, data + ETH_HLEN, sizeof(ip6));
    else if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) < 0)
        return;
    pkt->family = 6;
#ifdef PNM_WANT_PEER
    if (pkt->dir == PNM_DIR_EGRESS)
        __builtin_memcpy(pkt->peer, &ip6.daddr, 16);
    else
        __builtin_memcpy(pkt->peer, &ip6.saddr, 16);
#endif
    __u8 next = ip6.nexthdr;
    __u32 off = ETH_HLEN + sizeof(ip6);
#pragma unroll
    for (int i = 0; i < PNM_IPV6_MAX_EXT; i++) {
        __u8 ext[2];
        switch (next) {
        case IPPROTO_HOPOPTS:
        case IPPROTO_ROUTING:
        case IPPROTO_DSTOPTS:
            if (bpf_skb_load_bytes(skb, off, ext, 2) < 0)
                goto unknown;
            next = ext[0];
            off += (ext[1] + 1) * 8;
            break;
        case IPPROTO_AH: /* length in 4-octet units, minus 2 */
            if (bpf_skb_load_bytes(skb, off, ext, 2) < 0)
                goto unknown;
            next = ext[0];
            off += (ext[1] + 2) * 4;
            break;
        case IPPROTO_FRAGMENT: {
            __u8 frag[4];
            if (bpf_skb_load_bytes(skb, off, frag, 4) < 0)
                goto unknown;
            next = frag[0];
            off += 8;
            if (((frag[2] << 8) | frag[3]) & 0xfff8) { /* offset != 0 */
                pkt->l4proto = next;
                pkt->fragment = 1;
                return;
            }
            break;
        }
        default:
            pkt->l4proto = next;
            if (off <= 0xffff)
                pkt->l4_off = off;
            return;
        }
    }
unknown:
    /* Too many extension headers, or cut short: an IPv6 packet of unknown kind. */
    pkt->l4proto = IPPROTO_NONE;
}

/* Ports, and for TCP the flags byte: the first 14 bytes of a TCP header, the
 * 8 of a UDP header. A packet too short for them gets no ports. */
static __always_inline void pnm_parse_l4(struct __sk_buff *skb, struct pnm_pkt *pkt)
{
    __u32 off = pkt->l4_off;
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    if (!off)
        return;
    if (pkt->l4proto == IPPROTO_TCP) {
        __u8 tcp[14];
        if (off <= PNM_MAX_DIRECT_L4_OFF && data + off + sizeof(tcp) <= end)
            __builtin_memcpy(tcp, data + off, sizeof(tcp));
        else if (bpf_skb_load_bytes(skb, off, tcp, sizeof(tcp)) < 0)
            return;
        __builtin_memcpy(&pkt->sport, tcp, 2);
        __builtin_memcpy(&pkt->dport, tcp + 2, 2);
        pkt->tcp_flags = tcp[13];
        pkt->has_ports = 1;
    } else if (pkt->l4proto == IPPROTO_UDP) {
        __u8 udp[8];
        if (off <= PNM_MAX_DIRECT_L4_OFF && data + off + sizeof(udp) <= end)
            __builtin_memcpy(udp, data + off, sizeof(udp));
        else if (bpf_skb_load_bytes(skb, off, udp, sizeof(udp)) < 0)
            return;
        __builtin_memcpy(&pkt->sport, udp, 2);
        __builtin_memcpy(&pkt->dport, udp + 2, 2);
        pkt->has_ports = 1;
    }
}

static __always_inline void pnm_parse(struct __sk_buff *skb, struct pnm_pkt *pkt, __u8 dir)
{
    pkt->len = skb->len;
    /* A VLAN tag the pod sent in the frame is moved out of the data (into
     * vlan_tci) before TC ingress sees it, but the veth counted it in rx_bytes.
     * Going to the pod the tag is never in the data, nor in tx_bytes. */
    if (dir == PNM_DIR_EGRESS && skb->vlan_present)
        pkt->len += 4;
    pkt->dir = dir;
    pkt->l4proto = PNM_NO_L4;
    if (skb->protocol == bpf_htons(ETH_P_IP))
        pnm_parse_ipv4(skb, pkt);
    else if (skb->protocol == bpf_htons(ETH_P_IPV6))
        pnm_parse_ipv6(skb, pkt);
    pkt->proto_class = pnm_classify(pkt->l4proto);
#ifdef PNM_WANT_PORTS
    pnm_parse_l4(skb, pkt);
#endif
}

/* The pod-side (local) and far-side (remote) addresses of a packet, IPv4 in
 * the first four bytes. Read again from the packet: only the few probes that
 * need them (handshakes, DNS) pay for it, and only on the packets they track. */
static __always_inline int pnm_addrs(struct __sk_buff *skb, const struct pnm_pkt *pkt,
                                     __u8 *local, __u8 *remote)
{
    __u8 a[32] = {};
    if (pkt->family == 4) {
        if (bpf_skb_load_bytes(skb, ETH_HLEN + 12, a, 8) < 0)
            return -1;
        __builtin_memcpy(a + 16, a + 4, 4); /* daddr to the second half */
        __builtin_memset(a + 4, 0, 4);
    } else if (pkt->family == 6) {
        if (bpf_skb_load_bytes(skb, ETH_HLEN + 8, a, 32) < 0)
            return -1;
    } else {
        return -1;
    }
    /* a[0..16) is the source, a[16..32) the destination */
    if (pkt->dir == PNM_DIR_EGRESS) {
        __builtin_memcpy(local, a, 16);
        __builtin_memcpy(remote, a + 16, 16);
    } else {
        __builtin_memcpy(local, a + 16, 16);
        __builtin_memcpy(remote, a, 16);
    }
    return 0;
}

/* DNS over UDP port 53 as the pod's resolver sees it (dns.c, dnsnames.c): a query the
 * pod sends (PNM_DNS_QUERY) or an answer it receives (PNM_DNS_ANSWER), with the first
 * four bytes of its header (id, flags) and where the DNS message starts; 0 for anything
 * else, a pod serving DNS included. */
#define PNM_DNS_QUERY 1
#define PNM_DNS_ANSWER 2
static __always_inline int pnm_dns_message(struct __sk_buff *skb, const struct pnm_pkt *pkt,
                                           __u8 hdr[4], __u32 *payload)
{
    if (pkt->l4proto != IPPROTO_UDP || !pkt->has_ports)
        return 0;
    int sent = pkt->dir == PNM_DIR_EGRESS;
    if (sent ? pkt->dport != bpf_htons(53) : pkt->sport != bpf_htons(53))
        return 0;
    *payload = (__u32)pkt->l4_off + 8;
    if (skb->len < *payload + 12)
        return 0; /* too short for a DNS header */
    if (bpf_skb_load_bytes(skb, *payload, hdr, 4) < 0)
        return 0;
    int is_answer = (hdr[2] & 0x80) != 0; /* the QR bit */
    if (is_answer == sent)
        return 0; /* a query coming in or an answer going out: the pod is a server here */
    return sent ? PNM_DNS_QUERY : PNM_DNS_ANSWER;
}
