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
 * Hook:   tracepoint skb:kfree_skb (reason since 5.17, rx_sk since 6.12).
 * Kernel: 5.17.
 * Cost:   a few bpf_probe_read_kernel() and two hash lookups per drop; nothing
 *         on packets that are not dropped.
 * Without kernel offsets (PNM_NO_KSTRUCT) every drop counts under the node.
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
    __u16 reason; /* enum skb_drop_reason, as this kernel numbers it */
    __u8 kind;    /* PNM_DROP_* */
    __u8 _pad;
};

BPF_PERCPU_HASH(pnm_drops, struct pnm_drop_key, __u64, PNM_DROP_KEYS);
BPF_PERCPU_ARRAY(pnm_drops_lost, __u64, 1); /* drops not counted: the map was full */

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

TRACEPOINT_PROBE(skb, kfree_skb)
{
    struct pnm_drop_key key = {};
    key.reason = args->reason;
#ifndef PNM_NO_KSTRUCT
#ifdef PNM_HAVE_RX_SK
    pnm_attribute((__u64)args->skbaddr, (__u64)args->rx_sk, &key);
#else
    pnm_attribute((__u64)args->skbaddr, 0, &key);
#endif
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
