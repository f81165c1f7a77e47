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
 * packet (perhaps with the bytes that lay between them). The loader defines KEY_CAP,
 * SNAPLEN, PKT_GAP_MAX, ARG_SPAN_MAX, RING_PAGES, the argument reader and the filter
 * functions, and decodes the header with the same layout (probe/record.py).
 */
#include <uapi/linux/ptrace.h>

#define DPIF_NAME_LEN 64

/* Record flags: what could not be read. The record still goes out, marked. */
#define F_ARG_UNREADABLE  1   /* an argument in memory could not be read */
#define F_DPIF_UNREADABLE 2
#define F_KEY_UNREADABLE  4   /* key_len is larger than the memory behind the key */
#define F_PKT_UNREADABLE  8
/* Not a failure: while control[1] != 0 the capture sheds outcomes (outcomes.py), and the
 * record says so at no cost to the capture. */
#define F_OUTCOME_SHED    128

struct upcall_record {
    u64 ktime_ns;           /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
    u64 key_size;           /* arg5, the key's real length */
    u32 pid;
    u32 tid;
    u32 cpu;
    u32 type;               /* arg1 */
    u32 pkt_size;           /* arg3, the packet's real length */
    u32 pkt_len;            /* packet bytes captured */
    u32 key_len;            /* key bytes captured, from data[0] */
    u32 pkt_offset;         /* where in data the packet bytes start: key_len or more */
    u32 flags;
    char comm[16];          /* the handler thread's name */
    char dpif[DPIF_NAME_LEN];
    u8 data[KEY_CAP + PKT_GAP_MAX + SNAPLEN];
};

/* Counters, per CPU so that the probe never contends on them. Userspace sums them:
 * fired = filtered + lost + received, exactly. */
enum counter { C_FIRED, C_FILTERED, C_LOST, C_MAX };

/* What a CPU keeps between hits: the record it builds, and names it has read. A handler
 * thread's name and a datapath's name live as long as they do, so each is read again only
 * for another thread or dpif pointer, or after NAMES_TTL_NS in case a new thread or
 * datapath took the old one's tid or memory. That saves the traced program some 80 ns a
 * hit. A host has one kernel datapath or a few: a few slots hold them, any name in any
 * slot. Slots picked by address put two names in one slot whenever their addresses
 * collided (the replay's two did), and then each upcall of the other datapath than the
 * last read its name again, some 130 ns. */
#define NAMES_TTL_NS 100000000ULL
#define DPIF_SLOTS 4
struct dpif_name {
    u64 address;            /* 0: nothing read */
    u64 read_ns;
    char name[DPIF_NAME_LEN];
};
struct cpu_state {
    struct upcall_record rec;
    u64 comm_tid;           /* rec->comm is this thread's */
    u64 comm_read_ns;
    struct dpif_name dpifs[DPIF_SLOTS];
    u32 next_dpif;          /* the slot a name read next goes into, in turn */
    u8 arg_bytes[ARG_SPAN_MAX];  /* read_upcall_args() reads memory operands here */
};

BPF_PERCPU_ARRAY(scratch, struct cpu_state, 1);
BPF_PERCPU_ARRAY(counters, u64, C_MAX);
/* control[0] != 0 stops the probe before it counts anything, so that the loader can
 * drain the ring and read final counters that agree with what it received. control[1]
 * != 0 marks records F_OUTCOME_SHED. */
BPF_ARRAY(control, u32, 2);
/* One ring for all CPUs, which never wakes the reader: it polls (probe/ring_buffer.py). */
BPF_RINGBUF_OUTPUT(events, RING_PAGES);

#include "probe_common.h"   /* CLAMP(), count() */

/* ARGS: the loader puts read_upcall_args() here, or defines BCC_READARG. */

/* FILTERS: the loader puts meta_match() and packet_match() here. */

int trace_recv_upcall(struct pt_regs *ctx)
{
    u32 zero = 0;
    u32 *stopped = control.lookup(&zero);
    if (!stopped || *stopped)
        return 0;
    count(C_FIRED);

    struct cpu_state *state = scratch.lookup(&zero);
    if (!state)
        return 0;
    struct upcall_record *rec = &state->rec;

    u64 arg[6] = {};
    u32 flags = 0;
#ifdef BCC_READARG
    /* bcc rewrites these calls for the function they are written in, so they are here.
     * bcc 0.26 writes nothing and returns -1 unless the variable has exactly the
     * argument's size: OVS's type (arg1) and packet size (arg3) are 4 bytes. */
    u32 type32 = 0, pkt_size32 = 0;
    if (bpf_usdt_readarg(1, ctx, &arg[0]) || bpf_usdt_readarg(2, ctx, &type32) ||
        bpf_usdt_readarg(3, ctx, &arg[2]) || bpf_usdt_readarg(4, ctx, &pkt_size32) ||
        bpf_usdt_readarg(5, ctx, &arg[4]) || bpf_usdt_readarg(6, ctx, &arg[5]))
        flags |= F_ARG_UNREADABLE;
    arg[1] = type32;
    arg[3] = pkt_size32;
#else
    /* The loader's reader for this probe site (usdt_args.py). */
    if (read_upcall_args(ctx, arg, state->arg_bytes))
        flags |= F_ARG_UNREADABLE;
#endif
    u64 dpif = arg[0], packet = arg[2], key = arg[4], key_size = arg[5];
    u32 type = arg[1], pkt_size = arg[3];

    u64 pid_tgid = bpf_get_current_pid_tgid();
    u64 now = bpf_ktime_get_ns();
    rec->ktime_ns = now;
    rec->pid = pid_tgid >> 32;
    rec->tid = (u32)pid_tgid;
    rec->cpu = bpf_get_smp_processor_id();
    rec->type = type;
    rec->pkt_size = pkt_size;
    rec->key_size = key_size;
    if (pid_tgid != state->comm_tid || now - state->comm_read_ns > NAMES_TTL_NS) {
        bpf_get_current_comm(rec->comm, sizeof(rec->comm));
        state->comm_tid = pid_tgid;
        state->comm_read_ns = now;
    }
    struct dpif_name *known = &state->dpifs[state->next_dpif & (DPIF_SLOTS - 1)];
#pragma unroll
    for (int i = 0; i < DPIF_SLOTS; i++)
        if (state->dpifs[i].address == dpif)
            known = &state->dpifs[i];
    if (dpif != known->address || now - known->read_ns > NAMES_TTL_NS) {
        if (dpif != known->address)
            state->next_dpif++;
        known->address = 0;
        if (bpf_probe_read_user_str(known->name, sizeof(known->name), (void *)dpif) >= 0) {
            known->address = dpif;
            known->read_ns = now;
        }
    }
    if (dpif && dpif == known->address) {
        __builtin_memcpy(rec->dpif, known->name, sizeof(rec->dpif));
    } else {
        /* Not resident (a probe cannot fault pages in): hand userspace the address, which
         * reads the name through /proc/PID/mem. The name outlives the upcall. */
        flags |= F_DPIF_UNREADABLE;
        *(u64 *)rec->dpif = dpif;
    }

    if (!meta_match(rec)) {
        count(C_FILTERED);
        return 0;
    }

    /* In OVS, key and packet are attributes of the one netlink message the kernel sent:
     * the key first, the packet last, a few attribute headers (hash, MRU, userdata) in
     * between. One read then takes the key, those bytes and the packet, which costs the
     * traced program about 90 ns less than two reads. Anything else takes two. */
    u64 key_len = key_size, pkt_offset = packet - key, pkt_len = CLAMP(pkt_size, SNAPLEN);
    if (key_size > KEY_CAP || pkt_offset < key_size || pkt_offset - key_size > PKT_GAP_MAX ||
        bpf_probe_read_user(rec->data, CLAMP(pkt_offset + pkt_len, KEY_CAP + PKT_GAP_MAX +
                                             SNAPLEN), (void *)key) < 0) {
        /* key_size loaded again: Linux 6.1's verifier would follow the clamp below into
         * a branch that the test above rules out, and reject the program there. */
        key_len = CLAMP(*(volatile u64 *)&rec->key_size, KEY_CAP);
        if (bpf_probe_read_user(rec->data, key_len, (void *)key) < 0) {
            flags |= F_KEY_UNREADABLE;
            key_len = 0;
        }
        pkt_offset = key_len;
        if (bpf_probe_read_user(rec->data + key_len, pkt_len, (void *)packet) < 0) {
            flags |= F_PKT_UNREADABLE;
            pkt_len = 0;
        }
    }
    rec->key_len = key_len;
    rec->pkt_offset = pkt_offset;
    rec->pkt_len = pkt_len;
    u32 one = 1;
    u32 *shedding = control.lookup(&one);
    if (shedding && *shedding)
        flags |= F_OUTCOME_SHED;
    rec->flags = flags;

    if (!packet_match(rec)) {
        count(C_FILTERED);
        return 0;
    }

    /* The lengths again, loaded from the record: key_len and pkt_len are then dead during
     * packet_match(), and the verifier walks the filter once rather than once for each way
     * the two copies went (clamped, whole or failed: nine states). */
    u64 size = offsetof(struct upcall_record, data) +
               CLAMP(*(volatile u32 *)&rec->pkt_offset, KEY_CAP + PKT_GAP_MAX) +
               CLAMP(*(volatile u32 *)&rec->pkt_len, SNAPLEN);
    if (events.ringbuf_output(rec, size, BPF_RB_NO_WAKEUP) < 0)
        count(C_LOST);
    return 0;
}
