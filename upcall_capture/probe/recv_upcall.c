/*
 * recv_upcall.c: copy every upcall ovs-vswitchd receives from the kernel datapath.
 *
 * Attached to the USDT probe dpif_recv:recv_upcall (lib/dpif.c, dpif_recv()):
 *   arg0 const char *dpif full name   arg1 enum dpif_upcall_type (4 bytes)
 *   arg2 void *packet data            arg3 uint32_t packet size
 *   arg4 struct nlattr *flow key      arg5 size_t key length
 *
 * Each hit builds one record in a per-CPU scratch buffer (the BPF stack is only 512
 * bytes) and submits just the bytes it uses: a fixed header, then the key, then the
 * packet. The loader defines KEY_CAP, SNAPLEN and the filter functions, and decodes
 * the header with the same layout (probe/record.py).
 */
#include <uapi/linux/ptrace.h>

#define DPIF_NAME_LEN 64

/* Record flags: what could not be read. The record still goes out, marked. */
#define F_ARG_UNREADABLE  1   /* a bpf_usdt_readarg() failed */
#define F_DPIF_UNREADABLE 2
#define F_KEY_UNREADABLE  4   /* key_len is larger than the memory behind the key */
#define F_PKT_UNREADABLE  8

struct upcall_record {
    u64 ktime_ns;           /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
    u64 key_size;           /* arg5, the key's real length */
    u32 pid;
    u32 tid;
    u32 cpu;
    u32 type;               /* arg1 */
    u32 pkt_size;           /* arg3, the packet's real length */
    u32 pkt_len;            /* packet bytes captured */
    u32 key_len;            /* key bytes captured */
    u32 flags;
    char comm[16];          /* the handler thread's name */
    char dpif[DPIF_NAME_LEN];
    u8 data[KEY_CAP + SNAPLEN];   /* key_len bytes of key, then pkt_len of packet */
};

/* Counters, per CPU so that the probe never contends on them. Userspace sums them:
 * fired = filtered + lost + received, exactly. */
enum counter { C_FIRED, C_FILTERED, C_LOST, C_MAX };

BPF_PERCPU_ARRAY(scratch, struct upcall_record, 1);
BPF_PERCPU_ARRAY(counters, u64, C_MAX);
/* control[0] != 0 stops the probe before it counts anything, so that the loader can
 * drain the rings and read final counters that agree with what it received. */
BPF_ARRAY(control, u32, 1);
BPF_PERF_OUTPUT(events);

/* min(len, cap) in a form the verifier can follow: the clamp is done in 64 bits on one
 * register (the empty asm keeps the compiler from splitting it into a select over a
 * zero-extended copy), so every copy provably stays inside the record. */
#define CLAMP(len, cap) ({ u64 __v = (len); asm volatile("" : "+r"(__v)); \
                           if (__v > (cap)) __v = (cap); __v; })

static __always_inline void count(u32 which)
{
    u64 *value = counters.lookup(&which);
    if (value)
        (*value)++;
}

/* FILTERS: the loader puts meta_match() and packet_match() here. */

int trace_recv_upcall(struct pt_regs *ctx)
{
    u32 zero = 0;
    u32 *stopped = control.lookup(&zero);
    if (!stopped || *stopped)
        return 0;
    count(C_FIRED);

    struct upcall_record *rec = scratch.lookup(&zero);
    if (!rec)
        return 0;

    /* bcc 0.26 writes nothing and returns -1 unless the variable has exactly the
     * argument's size, so each one is read at its real width. */
    u64 dpif = 0, packet = 0, key = 0, key_size = 0;
    u32 type = 0, pkt_size = 0;
    u32 flags = 0;
    if (bpf_usdt_readarg(1, ctx, &dpif) || bpf_usdt_readarg(2, ctx, &type) ||
        bpf_usdt_readarg(3, ctx, &packet) || bpf_usdt_readarg(4, ctx, &pkt_size) ||
        bpf_usdt_readarg(5, ctx, &key) || bpf_usdt_readarg(6, ctx, &key_size))
        flags |= F_ARG_UNREADABLE;

    u64 pid_tgid = bpf_get_current_pid_tgid();
    rec->ktime_ns = bpf_ktime_get_ns();
    rec->pid = pid_tgid >> 32;
    rec->tid = (u32)pid_tgid;
    rec->cpu = bpf_get_smp_processor_id();
    rec->type = type;
    rec->pkt_size = pkt_size;
    rec->key_size = key_size;
    bpf_get_current_comm(rec->comm, sizeof(rec->comm));
    if (bpf_probe_read_user_str(rec->dpif, sizeof(rec->dpif), (void *)dpif) < 0) {
        /* Not resident (a probe cannot fault pages in): hand userspace the address, which
         * reads the name through /proc/PID/mem. The name outlives the upcall. */
        flags |= F_DPIF_UNREADABLE;
        *(u64 *)rec->dpif = dpif;
    }

    if (!meta_match(rec)) {
        count(C_FILTERED);
        return 0;
    }

    u64 key_len = CLAMP(key_size, KEY_CAP);
    if (bpf_probe_read_user(rec->data, key_len, (void *)key) < 0) {
        flags |= F_KEY_UNREADABLE;
        key_len = 0;
    }
    u64 pkt_len = CLAMP(pkt_size, SNAPLEN);
    if (bpf_probe_read_user(rec->data + key_len, pkt_len, (void *)packet) < 0) {
        flags |= F_PKT_UNREADABLE;
        pkt_len = 0;
    }
    rec->key_len = key_len;
    rec->pkt_len = pkt_len;
    rec->flags = flags;

    if (!packet_match(rec)) {
        count(C_FILTERED);
        return 0;
    }

    /* The lengths again, loaded from the record: key_len and pkt_len are then dead during
     * packet_match(), and the verifier walks the filter once rather than once for each way
     * the two copies went (clamped, whole or failed: nine states). */
    u64 size = offsetof(struct upcall_record, data) +
               CLAMP(*(volatile u32 *)&rec->key_len, KEY_CAP) +
               CLAMP(*(volatile u32 *)&rec->pkt_len, SNAPLEN);
    if (events.perf_submit(ctx, rec, size) < 0)
        count(C_LOST);
    return 0;
}
