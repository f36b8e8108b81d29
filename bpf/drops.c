/* drops.c: packets the kernel dropped, with its reason, per pod.
 *
 * Counts: every skb:kfree_skb event (a drop; consumed skbs have their own
 *         tracepoint) by the kernel's drop reason, attributed to a pod by, in
 *         order: the netns of the skb's device, if it is a pod's; the host veth
 *         the skb was on, if the device is in the host netns and is one we
 *         watch (kind IFINDEX); the netns of the skb's socket; that of rx_sk
 *         (6.12+). Anything else counts under the node (kind NODE), so no drop
 *         is lost. The key keeps the raw netns inode or ifindex the kernel
 *         showed, so a test can hold it against `stat` and /sys/class/net.
 *         Frees with a reason that drop no pod traffic (an echo reply a raw
 *         socket received; a capture's own copy) count in pnm_drops_excluded.
 * Hook:   tracepoint skb:kfree_skb (reason since 5.17, rx_sk since 6.12).
 * Kernel: 5.17.
 * Cost:   a few bpf_probe_read_kernel() and two hash lookups per drop; nothing
 *         on packets that are not dropped.
 * Without kernel offsets (PNM_NO_KSTRUCT) every drop counts under the node.
 *
 * Drop events: while a drop trace of a pod is on (pnm_drop_trace, by slot),
 * each of its drops also goes to the perf buffer pnm_drop_events with the
 * dropping function's address and the first bytes from the network header,
 * for `podnetmon drops`. Off, that costs nothing: the check runs on drops only.
 */
#define PNM_DROP_NODE 0
#define PNM_DROP_NETNS 1
#define PNM_DROP_IFINDEX 2

#ifndef PNM_DROP_KEYS
#define PNM_DROP_KEYS 16384
#endif

/* BCC builds the tracepoint's argument struct from its tracefs format, where the
 * reason field has type enum skb_drop_reason; the uapi headers do not define
 * it. Its values are the running kernel's and named from tracefs by the daemon,
 * so here it only needs to be a complete 4-byte type. */
enum skb_drop_reason { PNM_DROP_REASON_PLACEHOLDER = 0 };

struct pnm_drop_key {
    __u32 id;     /* netns inode, host ifindex, or 0 for the node */
    /* enum skb_drop_reason, as this kernel numbers it, all 32 bits: since 6.8 a
     * subsystem's reasons are (subsystem << 16) | n (OpenvSwitch's, on OVN-Kubernetes
     * and Antrea nodes), which 16 bits would name as core reasons */
    __u32 reason;
    __u8 kind;    /* PNM_DROP_* */
    __u8 _pad[3];
};

PNM_MAP("percpu_hash", struct pnm_drop_key, __u64, pnm_drops, PNM_DROP_KEYS);

#define PNM_DROP_HDR 64

struct pnm_drop_event {
    __u64 ts;       /* bpf_ktime_get_ns() */
    __u64 location; /* the address that dropped it (kfree_skb's caller) */
    __u32 slot;
    __u32 ifindex;  /* the skb's device, 0 if none */
    __u32 reason;
    __u16 protocol; /* the ethertype, as the tracepoint gives it */
    __u16 hdr_len;  /* bytes of hdr that are the packet's, from its network header */
    __u8 hdr[PNM_DROP_HDR];
};

/* Frees with a drop reason that are not drops of pod traffic (see pnm_not_a_drop),
 * counted here by why instead of in pnm_drops. */
#define PNM_EXCLUDED_RAW_SOCKET 0    /* an ICMP echo reply a raw socket received */
#define PNM_EXCLUDED_PACKET_COPY 1   /* a packet socket's (a capture's) copy */
#define PNM_EXCLUDED_MULTICAST 2     /* IPv6 multicast to a group nobody joined */
#define PNM_EXCLUDED_WHYS 3
PNM_MAP("percpu_array", __u32, __u64, pnm_drops_excluded, PNM_EXCLUDED_WHYS);

BPF_ARRAY(pnm_drop_trace, __u32, PNM_SLOTS);
BPF_PERF_OUTPUT(pnm_drop_events);
PNM_MAP("percpu_array", __u32, __u64, pnm_drops_lost, 1); /* drops not counted: the map was full */

#ifndef PNM_NO_KSTRUCT
static __always_inline int pnm_pod_netns(__u32 inum)
{
    return inum && pnm_netns.lookup(&inum) != NULL;
}

static __always_inline void pnm_attribute(__u64 skb, __u64 rx_sk, struct pnm_drop_key *key)
{
    __u64 dev = pnm_read_ptr(skb, PNM_OFF_SKB_DEV);
    if (dev) {
        __u32 inum = pnm_net_inum(pnm_read_ptr(dev, PNM_OFF_DEV_NET));
        if (pnm_pod_netns(inum)) {
            key->kind = PNM_DROP_NETNS;
            key->id = inum;
            return;
        }
        if (inum == PNM_HOST_NETNS) {
            __u32 ifindex = 0, slot;
            bpf_probe_read_kernel(&ifindex, sizeof(ifindex), (void *)(dev + PNM_OFF_DEV_IFINDEX));
            if (ifindex && pnm_slot_of(ifindex, &slot)) {
                key->kind = PNM_DROP_IFINDEX;
                key->id = ifindex;
                return;
            }
        }
    }
    __u32 inum = pnm_sock_netns(pnm_read_ptr(skb, PNM_OFF_SKB_SK));
    if (!pnm_pod_netns(inum))
        inum = pnm_sock_netns(rx_sk);
    if (pnm_pod_netns(inum)) {
        key->kind = PNM_DROP_NETNS;
        key->id = inum;
    }
}
#endif

#ifndef PNM_NO_KSTRUCT
/* An echo reply (ICMP type 0, ICMPv6 129) whose data another skb still shares. ping_rcv()
 * frees every echo reply that no ping (datagram ICMP) socket claims with NO_SOCKET, even
 * when a raw ICMP socket, such as root's or a container's ping, took its copy just before
 * (raw_local_deliver() clones, then icmp_rcv() runs). That copy waits in the raw socket's
 * queue, holding a second reference to the data (skb_shared_info.dataref) until the
 * reader copies it out, which a woken process does microseconds after this softirq has
 * freed the original: a live reference here is a delivered copy. A reply that no socket
 * at all took has dataref 1 and stays a NO_SOCKET drop. */
static __always_inline int pnm_echo_reply_delivered(__u64 skb, __u16 protocol)
{
    __u64 head = pnm_read_ptr(skb, PNM_OFF_SKB_HEAD);
    __u16 network = 0xffff;
    __u32 end = 0;
    __u8 ip[41] = {};
    if (!head ||
        bpf_probe_read_kernel(&network, sizeof(network), (void *)(skb + PNM_OFF_SKB_NETWORK_HEADER)) ||
        network == 0xffff ||
        bpf_probe_read_kernel(ip, sizeof(ip), (void *)(head + network)))
        return 0;
    if (protocol == 0x0800) { /* the tracepoint gives the ethertype in host order */
        __u32 ihl = (ip[0] & 0xf) * 4;
        __u8 type = 0xff;
        if (ip[9] != 1 /* ICMP */ || ihl < 20 || ihl > 60 ||
            bpf_probe_read_kernel(&type, 1, (void *)(head + network + ihl)) || type != 0)
            return 0;
    } else if (protocol == 0x86DD) {
        if (ip[6] != 58 /* ICMPv6, no extension header */ || ip[40] != 129)
            return 0;
    } else {
        return 0;
    }
    __u32 dataref = 0;
    bpf_probe_read_kernel(&end, sizeof(end), (void *)(skb + PNM_OFF_SKB_END));
    bpf_probe_read_kernel(&dataref, sizeof(dataref), (void *)(head + end + PNM_OFF_SHINFO_DATAREF));
    return (dataref & 0xffff) > 1; /* SKB_DATAREF_MASK: the references to the whole data */
}
#endif

/* Which of the excluded kinds a free is, or -1 for a drop. The reasons' values are the
 * running kernel's (-D from its tracefs names): a kernel without the reason has neither. */
static __always_inline int pnm_not_a_drop(__u32 reason, __u64 skb, __u16 protocol,
                                          __u64 location)
{
#if defined(PNM_IP6_MC_INPUT) && defined(PNM_REASON_NOT_SPECIFIED)
    /* ip6_mc_input() frees, with no reason, multicast to a group no socket on the device
     * joined: a bridge floods every pod's MLD reports (to ff02::16, which hosts do not
     * join) to every other pod, and a NIC's multicast filter would have kept them out.
     * Its only other free is for a VRF device gone meanwhile. */
    if (reason == PNM_REASON_NOT_SPECIFIED && location >= PNM_IP6_MC_INPUT &&
        location < PNM_IP6_MC_INPUT_END)
        return PNM_EXCLUDED_MULTICAST;
#endif
#ifdef PNM_REASON_PACKET_SOCK_ERROR
    /* af_packet frees its own copy with this when its socket or ring is full: a capture
     * (tcpdump) fell behind; the packet itself went on */
    if (reason == PNM_REASON_PACKET_SOCK_ERROR)
        return PNM_EXCLUDED_PACKET_COPY;
#endif
#ifndef PNM_NO_KSTRUCT
    /* ... and copies a packet socket had queued, purged when it closes (QUEUE_PURGE) */
    __u64 sk = pnm_read_ptr(skb, PNM_OFF_SKB_SK);
    __u16 family = 0;
    if (sk && bpf_probe_read_kernel(&family, sizeof(family), (void *)(sk + PNM_OFF_SK_FAMILY)) == 0 &&
        family == 17 /* AF_PACKET */)
        return PNM_EXCLUDED_PACKET_COPY;
#endif
#if defined(PNM_REASON_NO_SOCKET) && !defined(PNM_NO_KSTRUCT)
    if (reason == PNM_REASON_NO_SOCKET && pnm_echo_reply_delivered(skb, protocol))
        return PNM_EXCLUDED_RAW_SOCKET;
#endif
    return -1;
}

#ifndef PNM_NO_KSTRUCT
static __always_inline void pnm_drop_event(void *ctx, __u64 skb, const struct pnm_drop_key *key,
                                           __u64 location, __u16 protocol)
{
    __u32 slot = PNM_NODE_SLOT;
    if (key->kind == PNM_DROP_NETNS)
        slot = pnm_netns_slot(key->id);
    else if (key->kind != PNM_DROP_IFINDEX || !pnm_slot_of(key->id, &slot))
        return;
    __u32 *on = pnm_drop_trace.lookup(&slot);
    if (!on || !*on)
        return;
    struct pnm_drop_event ev = {};
    ev.ts = bpf_ktime_get_ns();
    ev.location = location;
    ev.slot = slot;
    ev.reason = key->reason;
    ev.protocol = protocol;
    __u64 dev = pnm_read_ptr(skb, PNM_OFF_SKB_DEV);
    if (dev)
        bpf_probe_read_kernel(&ev.ifindex, sizeof(ev.ifindex), (void *)(dev + PNM_OFF_DEV_IFINDEX));
    __u64 head = pnm_read_ptr(skb, PNM_OFF_SKB_HEAD);
    __u16 network = 0xffff;
    bpf_probe_read_kernel(&network, sizeof(network), (void *)(skb + PNM_OFF_SKB_NETWORK_HEADER));
    if (head && network != 0xffff &&
        bpf_probe_read_kernel(ev.hdr, sizeof(ev.hdr), (void *)(head + network)) == 0)
        ev.hdr_len = sizeof(ev.hdr);
    pnm_drop_events.perf_submit(ctx, &ev, sizeof(ev));
}
#endif

TRACEPOINT_PROBE(skb, kfree_skb)
{
    if (!pnm_current())
        return 0; /* a restarted daemon's programs count now (pnm.h) */
    int why = pnm_not_a_drop(args->reason, (__u64)args->skbaddr, args->protocol,
                             (__u64)args->location);
    if (why >= 0) {
        __u32 idx = why;
        __u64 *excluded = pnm_drops_excluded.lookup(&idx);
        if (excluded)
            *excluded += 1;
        return 0;
    }
    struct pnm_drop_key key = {};
    key.reason = args->reason;
#ifndef PNM_NO_KSTRUCT
#ifdef PNM_HAVE_RX_SK
    pnm_attribute((__u64)args->skbaddr, (__u64)args->rx_sk, &key);
#else
    pnm_attribute((__u64)args->skbaddr, 0, &key);
#endif
#endif
#ifndef PNM_NO_KSTRUCT
    pnm_drop_event(args, (__u64)args->skbaddr, &key, (__u64)args->location, args->protocol);
#endif
    __u64 zero = 0;
    __u64 *count = pnm_drops.lookup_or_try_init(&key, &zero);
    if (count) {
        *count += 1;
    } else {
        __u32 idx = 0;
        __u64 *lost = pnm_drops_lost.lookup(&idx);
        if (lost)
            *lost += 1;
    }
    return 0;
}
