/* pnm.h: what every podnetmon TC program shares.
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

/* IPv6 extension headers walked before giving up on finding the L4 header.
 * Real traffic rarely has more than two; the bound keeps the verifier happy. */
#define PNM_IPV6_MAX_EXT 6

#ifndef PNM_MAX_INTERFACES
#define PNM_MAX_INTERFACES 1024
#endif
/* Buckets of the ifindex -> slot table; a power of two. */
#ifndef PNM_IFSLOT_BUCKETS
#define PNM_IFSLOT_BUCKETS 65536
#endif

/* Interface slots.
 *
 * Every attached host veth gets a slot, and every per-interface counter lives
 * in a per-CPU ARRAY indexed by it: the verifier inlines array lookups, so a
 * probe's counter costs about a nanosecond, where a hash lookup keyed by
 * ifindex costs ~35 ns (bench/RESULTS.md). The slot is found from the ifindex
 * through a direct-mapped table (bucket = ifindex mod PNM_IFSLOT_BUCKETS, the
 * entry tagged with its ifindex); an ifindex whose bucket another attached
 * interface holds goes to a small hash instead. The daemon writes both
 * tables; the programs only read them.
 */
struct pnm_ifslot {
    __u32 ifindex; /* 0: empty (no interface has index 0) */
    __u32 slot;
};
BPF_ARRAY(pnm_ifslots, struct pnm_ifslot, PNM_IFSLOT_BUCKETS);
BPF_HASH(pnm_ifslot_spill, __u32, __u32, PNM_MAX_INTERFACES);

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

struct pnm_pkt {
    __u32 slot;       /* the interface's slot (see above) */
    __u32 len;        /* skb->len: what the interface statistics count */
    __u16 l4_off;     /* offset of the L4 header from the Ethernet header; 0: none */
    __u8 dir;         /* PNM_DIR_* */
    __u8 family;      /* 4, 6, or 0 for anything that is not IP */
    __u8 l4proto;     /* IPPROTO_*, PNM_NO_L4 when not IP */
    __u8 proto_class; /* PNM_PROTO_* */
    __u8 fragment;    /* 1: a non-first fragment, whose L4 header is elsewhere */
    __u8 _pad;
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

static __always_inline void pnm_parse(struct __sk_buff *skb, struct pnm_pkt *pkt, __u8 dir)
{
    pkt->len = skb->len;
    pkt->dir = dir;
    pkt->l4proto = PNM_NO_L4;
    if (skb->protocol == bpf_htons(ETH_P_IP))
        pnm_parse_ipv4(skb, pkt);
    else if (skb->protocol == bpf_htons(ETH_P_IPV6))
        pnm_parse_ipv6(skb, pkt);
    pkt->proto_class = pnm_classify(pkt->l4proto);
}
