/*
 * dp_upcall.c: the kernel datapath's side of every upcall (net/openvswitch/datapath.c).
 *
 * ovs_dp_upcall() queues a packet to a handler's netlink socket; a non-zero return is a
 * failed upcall, which the datapath counts in its `lost:` counter and which never reaches
 * ovs-vswitchd. Two hooks see it:
 *   - the tracepoint openvswitch:ovs_dp_upcall, at its start: the datapath, device, key
 *     fields and handler portid. Each hit sends an ENQUEUE event (its time and the
 *     packet's first MATCH_BYTES bytes), which userspace matches to the upcall's
 *     recv_upcall record to tell how long it waited in the socket;
 *   - a kretprobe on ovs_dp_upcall: the result. On a failure it sends a FAILED event
 *     with the tracepoint's fields and the packet's bytes, read from the skb, which the
 *     caller still owns when ovs_dp_upcall returns.
 * The two are paired by pid_tgid, as OVS's upcall_monitor.py does: ovs_dp_upcall does
 * not sleep, so one task is in it at most once (a softirq nesting on the same task would
 * overwrite the entry, and its return then counts as unpaired).
 *
 * The loader defines SNAPLEN and RING_PAGES, and decodes events with the same layout
 * (probe/kernel_record.py).
 */
#include <linux/skbuff.h>

#define MATCH_BYTES 64
#define NAME_LEN 16     /* IFNAMSIZ: datapath and device names are netdev names */

enum event_kind { EV_ENQUEUE = 1, EV_FAILED = 2 };

struct event_head {
    u64 ktime_ns;       /* at the tracepoint: when the upcall was queued (or tried to be) */
    u32 kind;
    s32 result;         /* ovs_dp_upcall()'s return: 0 or -errno (EV_FAILED only) */
    u32 cpu;
    u32 portid;         /* the handler socket's netlink portid (0: none) */
    u32 pkt_size;       /* skb->len */
    u32 pkt_len;        /* packet bytes that follow */
    u32 recirc_id;
    u16 eth_type;       /* the flow key's, network byte order */
    u8 ct_state;
    u8 cmd;             /* OVS_PACKET_CMD_MISS 1, OVS_PACKET_CMD_ACTION 2 */
    u16 mru;
    u16 pad;
    char dp_name[NAME_LEN];
    char dev_name[NAME_LEN];
};

struct dp_upcall_event {
    struct event_head head;
    u8 data[SNAPLEN];   /* pkt_len bytes of the packet, from skb->data */
};

/* What the tracepoint saw, kept for the return. */
struct in_flight {
    struct event_head head;
    u64 skb;
    u32 headlen;                   /* bytes at skb->data */
};

/* fired = C_ENQUEUE hits of the tracepoint; C_FAILED returns != 0, of which C_FAILED_LOST
 * found the ring full; C_UNPAIRED returns with no tracepoint entry (so no event). */
enum counter { C_ENQUEUE, C_ENQUEUE_LOST, C_FAILED, C_FAILED_LOST, C_UNPAIRED, C_MAX };

BPF_PERCPU_ARRAY(counters, u64, C_MAX);
BPF_PERCPU_ARRAY(scratch, struct dp_upcall_event, 1);
BPF_HASH(in_flight, u64, struct in_flight, 4096);
BPF_ARRAY(control, u32, 1);    /* control[0] != 0: stopped (see recv_upcall.c) */
BPF_RINGBUF_OUTPUT(kernel_events, RING_PAGES);

#include "probe_common.h"   /* CLAMP(), count() */

/* Sends `ev` with `len` bytes of the skb's data (fewer if they cannot be read); a ring
 * without room for it adds to the counter `lost`. */
static __always_inline void submit(struct dp_upcall_event *ev, u64 skb, u64 len, u32 lost)
{
    unsigned char *data = NULL;
    bpf_probe_read_kernel(&data, sizeof(data), &((struct sk_buff *)skb)->data);
    len = CLAMP(len, SNAPLEN);
    if (bpf_probe_read_kernel(ev->data, len, data) < 0)
        len = 0;
    ev->head.pkt_len = len;
    if (kernel_events.ringbuf_output(ev, sizeof(struct event_head) + CLAMP(len, SNAPLEN),
                                     BPF_RB_NO_WAKEUP) < 0)
        count(lost);
}

static __always_inline int stopped(void)
{
    u32 zero = 0;
    u32 *flag = control.lookup(&zero);
    return !flag || *flag;
}

TRACEPOINT_PROBE(openvswitch, ovs_dp_upcall)
{
    if (stopped())
        return 0;
    count(C_ENQUEUE);
    u32 zero = 0;
    struct dp_upcall_event *ev = scratch.lookup(&zero);
    if (!ev)
        return 0;
    struct in_flight entry = {};
    entry.head.ktime_ns = bpf_ktime_get_ns();
    entry.head.cpu = bpf_get_smp_processor_id();
    entry.head.portid = args->upcall_port;
    entry.head.pkt_size = args->len;
    entry.head.recirc_id = args->recirc_id;
    entry.head.eth_type = args->key_eth_type;
    entry.head.ct_state = args->key_ct_state;
    entry.head.cmd = args->upcall_cmd;
    entry.head.mru = args->upcall_mru;
    TP_DATA_LOC_READ_CONST(entry.head.dp_name, dp_name, NAME_LEN);
    TP_DATA_LOC_READ_CONST(entry.head.dev_name, dev_name, NAME_LEN);
    entry.skb = (u64)args->skbaddr;
    entry.headlen = args->len - args->data_len;

    ev->head = entry.head;
    ev->head.kind = EV_ENQUEUE;
    submit(ev, entry.skb, entry.headlen < MATCH_BYTES ? entry.headlen : MATCH_BYTES,
           C_ENQUEUE_LOST);

    u64 pid_tgid = bpf_get_current_pid_tgid();
    in_flight.update(&pid_tgid, &entry);
    return 0;
}

int trace_dp_upcall_return(struct pt_regs *ctx)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    struct in_flight *entry = in_flight.lookup(&pid_tgid);
    int result = PT_REGS_RC(ctx);
    if (!entry) {
        if (result && !stopped())
            count(C_UNPAIRED);
        return 0;
    }
    if (result == 0 || stopped()) {
        in_flight.delete(&pid_tgid);
        return 0;
    }
    count(C_FAILED);
    u32 zero = 0;
    struct dp_upcall_event *ev = scratch.lookup(&zero);
    if (!ev) {
        in_flight.delete(&pid_tgid);
        return 0;
    }
    ev->head = entry->head;
    ev->head.kind = EV_FAILED;
    ev->head.result = result;
    u64 skb = entry->skb, headlen = entry->headlen;
    in_flight.delete(&pid_tgid);
    submit(ev, skb, headlen, C_FAILED_LOST);
    return 0;
}
