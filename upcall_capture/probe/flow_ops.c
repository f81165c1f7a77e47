/*
 * flow_ops.c: what ovs-vswitchd's handlers ask of the datapath after an upcall.
 *
 * Attached to the USDT probes of lib/dpif-netlink.c, dpif_netlink_operate__():
 *   op_flow_put(dpif, struct dpif_flow_put *, struct dpif_netlink_flow *, struct ofpbuf *)
 *   op_flow_execute(dpif, struct dpif_execute *, void *packet, uint32_t size, struct ofpbuf *)
 * Each copies the netlink request the handler is about to send (the ofpbuf, last
 * argument): the kernel's wire format, stable across OVS versions where the structs in
 * the other arguments are not. Only the ofpbuf's head is relied on:
 * {void *base; void *data; uint32_t size}. The loader defines OPS_CAP and RING_PAGES;
 * the layout is decoded in probe/ops_record.py.
 *
 * The request's top-level attributes are found here, one walk in the kernel, rather than
 * by the capture: it ties every op to its upcall in one Python thread, where that walk
 * cost it more than the rest of the tie.
 */
#include <uapi/linux/ptrace.h>

#define OP_PUT 1
#define OP_EXECUTE 2

#define F_REQUEST_UNREADABLE 1  /* the ofpbuf or its data could not be read */

/* nlmsghdr (16), genlmsghdr (4) and struct ovs_header (4): the attributes follow. */
#define MESSAGE_SIZE 24
#define ATTR_TYPES 10           /* OVS_FLOW_ATTR_UFID (9) is the highest one wanted */
#define MAX_ATTRS 16            /* a put has 4 to 6, an execute 3 to 7 */
#define NLA_TYPE_MASK 0x3FFF

/* Where a top-level attribute's payload is in data: its offset (0: absent, or cut off by
 * OPS_CAP) and its length. */
struct attr_span {
    u16 at;
    u16 len;
};

struct op_event {
    u64 ktime_ns;           /* bpf_ktime_get_ns(), the clock of recv_upcall's records */
    u32 pid;
    u32 tid;
    u32 kind;               /* OP_* */
    u32 size;               /* the request's real length */
    u32 len;                /* bytes of it copied into data */
    u32 flags;
    struct attr_span attrs[ATTR_TYPES];  /* by attribute type */
    u8 data[OPS_CAP];
};

/* ofpbuf's first fields (include/openvswitch/ofpbuf.h). */
struct ofpbuf_head {
    u64 base;
    u64 data;
    u32 size;
};

enum counter { C_PUT, C_EXECUTE, C_LOST, C_SHED, C_MAX };

BPF_PERCPU_ARRAY(scratch, struct op_event, 1);
BPF_PERCPU_ARRAY(counters, u64, C_MAX);
/* control[0]: 0 runs; 1 stopped (see recv_upcall.c); SHEDDING while the capture is
 * overloaded: ops are counted (C_SHED) but not copied, and their upcalls' outcomes are
 * unknown. */
BPF_ARRAY(control, u32, 1);
#define SHEDDING 2
BPF_RINGBUF_OUTPUT(op_events, RING_PAGES);

#include "probe_common.h"   /* CLAMP(), count() */

/* The top-level attributes of the `len` bytes of the message copied into ev->data; the
 * walk stops at the first one that is malformed or cut off, as the capture's did. */
static __always_inline void find_attributes(struct op_event *ev, u32 len)
{
    u32 at = MESSAGE_SIZE;
    for (int i = 0; i < MAX_ATTRS; i++) {
        if (at + 4 > len)
            break;
        /* As len <= OPS_CAP, the clamp changes nothing: it is for the verifier. */
        u64 off = CLAMP(at, OPS_CAP - 4);
        u16 nla_len = *(u16 *)&ev->data[off];
        u16 type = *(u16 *)&ev->data[off + 2] & NLA_TYPE_MASK;
        if (nla_len < 4 || at + nla_len > len)
            break;
        if (type < ATTR_TYPES) {
            ev->attrs[type].at = at + 4;
            ev->attrs[type].len = nla_len - 4;
        }
        at += (nla_len + 3) & ~3;
    }
}

static __always_inline int submit(u64 request, u32 kind)
{
    u32 zero = 0;
    u32 *state = control.lookup(&zero);
    if (!state || (*state && *state != SHEDDING))
        return 0;
    count(kind == OP_PUT ? C_PUT : C_EXECUTE);
    if (*state == SHEDDING) {
        count(C_SHED);
        return 0;
    }
    struct op_event *ev = scratch.lookup(&zero);
    if (!ev)
        return 0;
    u64 pid_tgid = bpf_get_current_pid_tgid();
    ev->ktime_ns = bpf_ktime_get_ns();
    ev->pid = pid_tgid >> 32;
    ev->tid = (u32)pid_tgid;
    ev->kind = kind;
    ev->flags = 0;
    ev->size = 0;
    ev->len = 0;
    __builtin_memset(ev->attrs, 0, sizeof(ev->attrs));
    struct ofpbuf_head head = {};
    if (!request || bpf_probe_read_user(&head, sizeof(head), (void *)request) < 0) {
        ev->flags = F_REQUEST_UNREADABLE;
    } else {
        ev->size = head.size;
        u64 len = CLAMP(head.size, OPS_CAP);
        if (bpf_probe_read_user(ev->data, len, (void *)head.data) < 0) {
            ev->flags = F_REQUEST_UNREADABLE;
        } else {
            ev->len = len;
            find_attributes(ev, len);
        }
    }
    u64 size = offsetof(struct op_event, data) + CLAMP(*(volatile u32 *)&ev->len, OPS_CAP);
    if (op_events.ringbuf_output(ev, size, BPF_RB_NO_WAKEUP) < 0)
        count(C_LOST);
    return 0;
}

int trace_op_flow_put(struct pt_regs *ctx)
{
    u64 request = 0;
    bpf_usdt_readarg(4, ctx, &request);  /* arg3; 1-based here */
    return submit(request, OP_PUT);
}

int trace_op_flow_execute(struct pt_regs *ctx)
{
    u64 request = 0;
    bpf_usdt_readarg(5, ctx, &request);  /* arg4 */
    return submit(request, OP_EXECUTE);
}
