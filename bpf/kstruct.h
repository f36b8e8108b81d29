/* kstruct.h: reading kernel structs from tracepoint programs, at offsets from BTF.
 *
 * The offsets arrive as -D cflags (PNM_OFF_*), computed by monitor/btf.py from
 * the running kernel's /sys/kernel/btf/vmlinux: headers on a node need not be
 * the running kernel's, and offsets taken from the wrong headers read garbage
 * without any error. Without them (no BTF) PNM_NO_KSTRUCT is defined and
 * nothing here reads a kernel struct.
 *
 * Every pointer is checked to lie in the kernel's half of the address space
 * before it is followed: sk_buff.dev shares its bytes with dev_scratch, which
 * UDP fills with small numbers, and bpf_probe_read_kernel() of a bogus address
 * fails but a plausible user-space one would not tell us it is wrong.
 */
#ifndef PNM_NO_KSTRUCT

static __always_inline int pnm_kptr(__u64 p)
{
    return (__s64)p < 0; /* x86-64 and arm64 kernel addresses have the top bit set */
}

static __always_inline __u64 pnm_read_ptr(__u64 base, __u32 off)
{
    __u64 p = 0;
    if (!pnm_kptr(base) || bpf_probe_read_kernel(&p, sizeof(p), (void *)(base + off)) < 0)
        return 0;
    return pnm_kptr(p) ? p : 0;
}

/* The inode number of a struct net, as `stat /proc/PID/ns/net` shows it. */
static __always_inline __u32 pnm_net_inum(__u64 net)
{
    __u32 inum = 0;
    if (net)
        bpf_probe_read_kernel(&inum, sizeof(inum), (void *)(net + PNM_OFF_NET_INUM));
    return inum;
}

static __always_inline __u32 pnm_sock_netns(__u64 sk)
{
    return pnm_net_inum(pnm_read_ptr(sk, PNM_OFF_SK_NET));
}

#endif /* PNM_NO_KSTRUCT */
