/*
 * flow-ops: after each batch of upcalls, the flow puts and executes an OVS handler asks of
 * the kernel datapath, fired as ovs-vswitchd's USDT probes (lib/dpif-netlink.c,
 * dpif_netlink_operate__()):
 *   op_flow_put(dpif, struct dpif_flow_put *, struct dpif_netlink_flow *, struct ofpbuf *)
 *   op_flow_execute(dpif, struct dpif_execute *, void *packet, uint32_t size, struct ofpbuf *)
 * with OVS's types and layouts, the ofpbuf holding the netlink request OVS would send.
 */
#ifndef FLOW_OPS_H
#define FLOW_OPS_H 1

#include <stddef.h>
#include <stdint.h>
#include <linux/netlink.h>

/* OVS's UPCALL_MAX_BATCH: the upcalls a handler receives before its flow operations. */
#define OPS_MAX_BATCH 64

struct op_slot;

/* A handler's flow operations for one batch. */
struct op_batch {
    struct op_slot *slots;      /* OPS_MAX_BATCH of them */
    unsigned int n;
};

/* Buffers for the largest key and packet any record has. */
void ops_batch_init(struct op_batch *, size_t max_key_len, size_t max_packet_len);

/* Add what a handler decides for fire k, a just-received upcall (type 0: miss), to the
 * batch: for a miss, as a rule a put and an execute; every 16th (k % 16 == 7) an execute
 * alone, as when another handler installed the flow first; every 16th (k % 16 == 15)
 * nothing. An action upcall gets nothing. */
void ops_add(struct op_batch *, uint64_t k, unsigned int type, const struct nlattr *key,
             size_t key_len, const uint8_t *packet, uint32_t packet_size);

/* Fire the batch's operations in order, as dpif_operate() would, and empty it. */
void ops_fire(struct op_batch *);

#endif
