/* pnm.h: what every podnetmon program shares.
 *
 * Directions are named from the pod's side: the host veth's TC ingress sees
 * what the pod sends (PNM_DIR_EGRESS), its TC egress what the pod receives
 * (PNM_DIR_INGRESS).
 *
 * The packet in hand and its parse are tc_packet.h's, which follows this text.
 *
 * This text is concatenated ahead of the probes' C by the kernel adapter
 * (monitor/kernel/source.py), not #included: BCC rewrites map syntax in the main
 * file only. Its text versions the core's pinned maps (maps_layout_versions).
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

/* The packet in hand, parsed once per run by tc_packet.h. No map holds it; it stays in
 * this text, which versions the core's pinned maps, because taking it out would change
 * that version and start every counter afresh at an upgrade. */
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

/* What pnm_dns_message() (tc_packet.h) finds: a query the pod sends, an answer it
 * receives. */
#define PNM_DNS_QUERY 1
#define PNM_DNS_ANSWER 2
