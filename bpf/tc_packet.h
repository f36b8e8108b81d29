/* tc_packet.h: what the TC programs share about the packet in hand.
 *
 * The packet is parsed once per run into struct pnm_pkt, and every probe's TC
 * hook reads that instead of parsing again. Each header field is loaded on its
 * own from the linear area when the header is there (a few instructions: a copy
 * of a whole header out of the packet, whose alignment the compiler cannot know,
 * became a byte load, a shift and an or per byte, ~60 instructions for IPv4 and
 * ~150 for IPv6, on every packet: bench/RESULTS.md); otherwise, and for IPv6
 * extension headers, through bpf_skb_load_bytes() (~25 ns), which copes with
 * paged data and fails on truncated packets (which then count as "other", or
 * with no L4 header), so no packet can make a probe read out of bounds.
 *
 * Kept apart from pnm.h, whose structs, map declarations and #defines version the
 * core's pinned maps (monitor/kernel/pins.py, layout_version): this file declares no
 * pinned map, and a change to it must not start every counter afresh at an upgrade.
 */

/* Switches the daemon sets for its own life (not pinned), read on every packet:
 * [PNM_SWITCH_MOVING] is nonzero while a device moves between tc and tcx (tc_main.c),
 * [PNM_SWITCH_TRACING] while any trace of a pod is on (trace.c): with none on, no
 * packet looks up its slot's trace settings. Entry 0 is left unused so that both share
 * one cache line: an array's values start 312 bytes into the map on 6.18 x86-64 (the
 * `r1 += 312` of every inlined lookup in the xlated code), 8 bytes short of a line, and
 * each u32 entry takes 8. Another kernel's header may split them: a line more, no more. */
#define PNM_SWITCH_MOVING 1
#define PNM_SWITCH_TRACING 2
BPF_ARRAY(pnm_switches, __u32, 3);

static __always_inline int pnm_switch(__u32 which)
{
    __u32 *on = pnm_switches.lookup(&which);
    return on && *on;
}

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

/* The fields of an IPv4 header the probes use, read one by one from wherever the header
 * is (the packet's linear area, or a copy on the stack): loads of just these few words,
 * where a copy of the whole header out of the packet (whose alignment the compiler cannot
 * know) became a byte load, a shift and an or for each of its bytes (bench/RESULTS.md). */
static __always_inline void pnm_ipv4_fields(const struct iphdr *ip, struct pnm_pkt *pkt)
{
    pkt->family = 4;
    pkt->l4proto = ip->protocol;
#ifdef PNM_WANT_PEER
    __be32 far = pkt->dir == PNM_DIR_EGRESS ? ip->daddr : ip->saddr;
    __builtin_memcpy(pkt->peer, &far, 4); /* IPv4 in the first four bytes, the rest zero */
#endif
    /* Fragment offset != 0: the L4 header is in the first fragment only. The
     * fragment still carries the protocol's bytes, so it is classified by it. */
    if (ip->frag_off & bpf_htons(0x1fff)) {
        pkt->fragment = 1;
        return;
    }
    __u8 ihl = ip->ihl;
    if (ihl >= 5) /* ihl < 5 is malformed: no L4 offset is trusted */
        pkt->l4_off = ETH_HLEN + ihl * 4;
}

static __always_inline void pnm_parse_ipv4(struct __sk_buff *skb, struct pnm_pkt *pkt)
{
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    const struct iphdr *ip = data + ETH_HLEN;
    if ((void *)(ip + 1) <= end) {
        pnm_ipv4_fields(ip, pkt);
        return;
    }
    struct iphdr copy;
    if (bpf_skb_load_bytes(skb, ETH_HLEN, &copy, sizeof(copy)) < 0)
        return; /* truncated: counted as other */
    pnm_ipv4_fields(&copy, pkt);
}

static __always_inline void pnm_ipv6_fields(const struct ipv6hdr *ip6, struct pnm_pkt *pkt)
{
    pkt->family = 6;
#ifdef PNM_WANT_PEER
    /* word loads, unaligned in the packet: x86-64 and arm64 load them whole, and the
     * verifier allows it (programs are not loaded with BPF_F_STRICT_ALIGNMENT) */
    const __u32 *far = (const __u32 *)(pkt->dir == PNM_DIR_EGRESS ? &ip6->daddr : &ip6->saddr);
    __builtin_memcpy(pkt->peer, far, 16);
#endif
}

static __always_inline void pnm_parse_ipv6(struct __sk_buff *skb, struct pnm_pkt *pkt)
{
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    const struct ipv6hdr *direct = data + ETH_HLEN;
    __u8 next;
    if ((void *)(direct + 1) <= end) {
        pnm_ipv6_fields(direct, pkt);
        next = direct->nexthdr;
    } else {
        struct ipv6hdr copy;
        if (bpf_skb_load_bytes(skb, ETH_HLEN, &copy, sizeof(copy)) < 0)
            return;
        pnm_ipv6_fields(&copy, pkt);
        next = copy.nexthdr;
    }
    __u32 off = ETH_HLEN + sizeof(struct ipv6hdr);
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
 * 8 of a UDP header. A packet too short for them gets no ports. Both ports are one
 * 4-byte load (kept in network order, as the packet has them), the flags one byte. */
static __always_inline void pnm_parse_l4(struct __sk_buff *skb, struct pnm_pkt *pkt)
{
    __u32 off = pkt->l4_off;
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    __u32 ports;
    if (!off)
        return;
    if (pkt->l4proto == IPPROTO_TCP) {
        if (off <= PNM_MAX_DIRECT_L4_OFF && data + off + 14 <= end) {
            ports = *(__u32 *)(data + off);
            pkt->tcp_flags = *(__u8 *)(data + off + 13);
        } else {
            __u8 tcp[14];
            if (bpf_skb_load_bytes(skb, off, tcp, sizeof(tcp)) < 0)
                return;
            __builtin_memcpy(&ports, tcp, 4);
            pkt->tcp_flags = tcp[13];
        }
    } else if (pkt->l4proto == IPPROTO_UDP) {
        if (off <= PNM_MAX_DIRECT_L4_OFF && data + off + 8 <= end) {
            ports = *(__u32 *)(data + off);
        } else {
            __u8 udp[8];
            if (bpf_skb_load_bytes(skb, off, udp, sizeof(udp)) < 0)
                return;
            __builtin_memcpy(&ports, udp, 4);
        }
    } else {
        return;
    }
    __builtin_memcpy(&pkt->sport, &ports, 2); /* byte for byte, in network order */
    __builtin_memcpy(&pkt->dport, (__u8 *)&ports + 2, 2);
    pkt->has_ports = 1;
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

/* DNS over UDP port 53 as the pod's resolver sees it (dns.c, dnsnames.c): PNM_DNS_QUERY
 * or PNM_DNS_ANSWER (pnm.h), with the first four bytes of its header (id, flags) and
 * where the DNS message starts; 0 for anything else, a pod serving DNS included. */
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
