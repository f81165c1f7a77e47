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
 */
#include <uapi/linux/ptrace.h>

#define OP_PUT 1
#define OP_EXECUTE 2

#define F_REQUEST_UNREADABLE 1  /* the ofpbuf or its data could not be read */

struct op_event {
    u64 ktime_ns;           /* bpf_ktime_get_ns(), the clock of recv_upcall's records */
    u32 pid;
    u32 tid;
    u32 kind;               /* OP_* */
    u32 size;               /* the request's real length */
    u32 len;                /* bytes of it copied into data */
    u32 flags;
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
    struct ofpbuf_head head = {};
    if (!request || bpf_probe_read_user(&head, sizeof(head), (void *)request) < 0) {
        ev->flags = F_REQUEST_UNREADABLE;
    } else {
        ev->size = head.size;
        u64 len = CLAMP(head.size, OPS_CAP);
        if (bpf_probe_read_user(ev->data, len, (void *)head.data) < 0)
            ev->flags = F_REQUEST_UNREADABLE;
        else
            ev->len = len;
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
