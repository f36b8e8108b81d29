/* peers.c: per-pod packets and bytes by peer address, drained exactly by epochs.
 *
 * Counts: every packet crossing a pod's host veth, by (interface, direction, the
 *         far side's address: the destination of what the pod sends, the source
 *         of what it receives), IPv4 and IPv6; frames that are not IP count under
 *         family 0 and a zero address. The daemon turns addresses into peer
 *         identities (pod, service, node, external) and keeps the top peers of
 *         each pod; nothing of it happens here.
 * Hook:   the TC programs of tc_main.c (classic tc or tcx), beside packets.c.
 * Kernel: 4.12 (array of maps); the daemon reads with batch operations (5.6).
 * Cost:   the epoch and this CPU's last peer of the interface and direction (two
 *         inlined array lookups), a 16-byte compare and two adds when the packet's peer
 *         is that last one (a stream's packets, a request's answer); otherwise the last
 *         peer's counts go into the epoch's per-CPU hash (an array of maps lookup and a
 *         hash lookup of a 24-byte key, an insert for a new peer) and the packet's peer
 *         becomes the last one. bench/RESULTS.md has the measured figures.
 *
 * Exact by epochs. Two identical per-CPU hashes hold the counts; pnm_peer_epoch
 * says which one the programs write. The daemon flips it, waits until no program
 * can still be writing the other (a write to an array of maps returns only after
 * an RCU grace period: kernel/bpf/syscall.c, maybe_wait_bpf_programs()), and then
 * reads and empties that one with no writer left: nothing can be counted twice or
 * lost between the read and the delete, which a walk of a live map cannot promise.
 * A packet the hash has no room for (full) counts in the epoch's per-slot rest,
 * so that peers and rest always sum to what packets.c counts. The last-peer
 * entries are per epoch too, and drained with it, CPU by CPU.
 *
 * The keys carry the host veth's ifindex, not its slot: a slot given to another
 * pod before the daemon drained the old one's entries cannot inherit them (the
 * daemon drops entries of interfaces no longer attached). The last peers and the
 * rests are per-slot arrays (one per epoch), zeroed before a slot is handed out,
 * like every per-slot map.
 */
#ifndef PNM_PEER_ENTRIES
#define PNM_PEER_ENTRIES 16384
#endif

struct pnm_peer_key {
    __u32 ifindex;   /* the host veth */
    __u8 dir;        /* PNM_DIR_* */
    __u8 family;     /* 4, 6, or 0: not IP */
    __u8 _pad[2];
    __u8 addr[16];   /* the peer's address; IPv4 in the first four bytes */
};

struct pnm_peer_count {
    __u64 packets;
    __u64 bytes;
};

struct pnm_peer_rest {
    __u64 packets[PNM_NDIR];
    __u64 bytes[PNM_NDIR];
};

/* Which map the programs write (idx), and the epoch's number (seq), which the
 * daemon also records beside each slot's drained totals so that a daemon killed
 * half-way through a drain is neither repeated nor skipped by the next one. */
/* This CPU's last peer of one interface and direction, and what it has counted
 * since it became the last one: u64 words only (a per-CPU map's values). */
struct pnm_peer_one {
    __u64 addr[2];
    __u64 tag;      /* 0: empty; else PNM_PEER_TAG | family */
    __u64 packets;
    __u64 bytes;
};
#define PNM_PEER_TAG 0x100

struct pnm_peer_last {
    struct pnm_peer_one dir[PNM_NDIR];
};

struct pnm_peer_epoch {
    __u32 idx;
    __u32 _pad;
    __u64 seq;
};

/* What the daemon has drained for each slot, by direction, up to epoch seq:
 * written by the daemon only, pinned, so that a restarted daemon's peer series
 * (which start again from zero) still sum to the pod's totals. */
struct pnm_peer_drained {
    __u64 packets[PNM_NDIR];
    __u64 bytes[PNM_NDIR];
    __u64 seq;
};

PNM_MAP("array", __u32, struct pnm_peer_epoch, pnm_peer_epoch, 1);
PNM_MAP("percpu_hash", struct pnm_peer_key, struct pnm_peer_count, pnm_peers_0, PNM_PEER_ENTRIES);
PNM_MAP("percpu_hash", struct pnm_peer_key, struct pnm_peer_count, pnm_peers_1, PNM_PEER_ENTRIES);
/* Per epoch and slot: entry idx * PNM_SLOTS + slot. One map for both epochs, not
 * two: a lookup whose map depends on the epoch would merge two map pointers into one
 * call, which the verifier cannot inline (measured: +35 ns a packet). */
PNM_MAP("percpu_array", __u32, struct pnm_peer_last, pnm_peer_last, 2 * PNM_SLOTS);
PNM_MAP("percpu_array", __u32, struct pnm_peer_rest, pnm_peer_rest, 2 * PNM_SLOTS);
PNM_MAP("array", __u32, struct pnm_peer_drained, pnm_peer_drained, PNM_SLOTS);
/* The daemon sets [0] to pnm_peers_0 and [1] to pnm_peers_1; not pinned: its
 * entries are file descriptors, set again by every daemon, and an old daemon's
 * programs keep their own outer map, pointing at the same (pinned) inner ones. */
BPF_ARRAY_OF_MAPS(pnm_peer_maps, "pnm_peers_0", 2);

/* The counts of a peer that stops being the last one go into the epoch's hash, or,
 * with no room there, into the slot's rest. */
static __always_inline void peers_flush(struct __sk_buff *skb, const struct pnm_pkt *pkt,
                                        __u32 idx, const struct pnm_peer_one *one)
{
    struct pnm_peer_key key = {};
    key.ifindex = skb->ifindex;
    key.dir = pkt->dir;
    key.family = one->tag & 0xff;
    __builtin_memcpy(key.addr, one->addr, sizeof(key.addr));
    void *peers = pnm_peer_maps.lookup(&idx);
    if (peers) {
        struct pnm_peer_count *c = bpf_map_lookup_elem(peers, &key);
        if (!c) {
            struct pnm_peer_count fresh = {};
            bpf_map_update_elem(peers, &key, &fresh, BPF_NOEXIST);
            c = bpf_map_lookup_elem(peers, &key);
        }
        if (c) {
            c->packets += one->packets;
            c->bytes += one->bytes;
            return;
        }
    }
    __u32 at = idx * PNM_SLOTS + pkt->slot;
    struct pnm_peer_rest *rest = pnm_peer_rest.lookup(&at);
    if (rest) {
        __u32 d = pkt->dir & 1;
        rest->packets[d] += one->packets;
        rest->bytes[d] += one->bytes;
    }
}

static __always_inline void peers_tc(struct __sk_buff *skb, const struct pnm_pkt *pkt)
{
    __u32 zero = 0;
    struct pnm_peer_epoch *epoch = pnm_peer_epoch.lookup(&zero);
    if (!epoch)
        return;
    __u32 idx = epoch->idx & 1;
    __u32 at = idx * PNM_SLOTS + pkt->slot;
    struct pnm_peer_last *last = pnm_peer_last.lookup(&at);
    if (!last)
        return;
    struct pnm_peer_one *one = &last->dir[pkt->dir & 1];
    __u64 a[2];
    __builtin_memcpy(a, pkt->peer, sizeof(a));
    __u64 tag = PNM_PEER_TAG | pkt->family;
    if (one->tag == tag && one->addr[0] == a[0] && one->addr[1] == a[1]) {
        one->packets += 1;
        one->bytes += pkt->len;
        return;
    }
    if (one->tag)
        peers_flush(skb, pkt, idx, one);
    one->addr[0] = a[0];
    one->addr[1] = a[1];
    one->tag = tag;
    one->packets = 1;
    one->bytes = pkt->len;
}
