/*
 * flow-ops.c: see flow-ops.h. The requests are built as lib/dpif-netlink.c builds them
 * (dpif_netlink_flow_to_ofpbuf(), dpif_netlink_encode_execute()): a netlink header, a
 * generic netlink header, struct ovs_header, then the attributes in OVS's order. The put's
 * key is the upcall's key as received, as OVS puts it; its mask is exact except for the
 * IP TOS/TTL (traffic class/hop limit), which megaflows usually leave out; the actions
 * output to port 1, or to port 2 for an upcall from port 1.
 */
#define _GNU_SOURCE
#include "flow-ops.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sdt.h>

/* include/linux/openvswitch.h */
#define OVS_FLOW_CMD_NEW 1
#define OVS_FLOW_ATTR_KEY 1
#define OVS_FLOW_ATTR_ACTIONS 2
#define OVS_FLOW_ATTR_MASK 7
#define OVS_FLOW_ATTR_UFID 9
#define OVS_PACKET_CMD_EXECUTE 3
#define OVS_PACKET_ATTR_PACKET 1
#define OVS_PACKET_ATTR_KEY 2
#define OVS_PACKET_ATTR_ACTIONS 3
#define OVS_KEY_ATTR_ENCAP 1
#define OVS_KEY_ATTR_PRIORITY 2
#define OVS_KEY_ATTR_IN_PORT 3
#define OVS_KEY_ATTR_IPV4 7
#define OVS_KEY_ATTR_IPV6 8
#define OVS_KEY_ATTR_SKB_MARK 15
#define OVS_KEY_ATTR_TUNNEL 16
#define OVS_ACTION_ATTR_OUTPUT 1
#define OVS_FLOW_FAMILY 0x1d    /* generic netlink family ids are the kernel's choice */
#define OVS_PACKET_FAMILY 0x1f
#define DP_IFINDEX 7

/* OVS's types (include/openvswitch/ofpbuf.h, lib/dpif.h, lib/dpif-netlink.c). The
 * capture reads only the ofpbuf's head; the rest is here so that the arguments point at
 * what OVS's point at. */
struct ovs_list {
    struct ovs_list *prev, *next;
};
struct ofpbuf {
    void *base;
    void *data;
    uint32_t size;
    uint32_t allocated;
    void *header;
    void *msg;
    struct ovs_list list_node;
    int source;
};
typedef struct {
    uint32_t u32[4];
} ovs_u128;
struct dpif_flow_put {
    int flags;                  /* DPIF_FP_CREATE */
    const struct nlattr *key;
    size_t key_len;
    const struct nlattr *mask;
    size_t mask_len;
    const struct nlattr *actions;
    size_t actions_len;
    const ovs_u128 *ufid;
    unsigned int pmd_id;
    void *stats;
};
struct dpif_netlink_flow {
    uint8_t cmd;
    unsigned int nlmsg_flags;
    int dp_ifindex;
    const struct nlattr *key;
    size_t key_len;
    const struct nlattr *mask;
    size_t mask_len;
    const struct nlattr *actions;
    size_t actions_len;
    ovs_u128 ufid;
    bool ufid_present;
    bool ufid_terse;
};
struct dpif_execute {
    const struct nlattr *actions;
    size_t actions_len;
    bool needs_help;
    bool probe;
    unsigned int mtu;
    uint64_t hash;
    const void *flow;
    void *packet;
};

enum { DO_PUT = 1, DO_EXECUTE = 2 };

struct op_slot {
    int what;                   /* DO_* */
    uint8_t *packet;            /* in execute_buf, where the request has it */
    uint32_t packet_size;
    ovs_u128 ufid;
    struct dpif_flow_put put;
    struct dpif_netlink_flow flow;
    struct dpif_execute execute;
    struct ofpbuf put_request, execute_request;
    uint8_t *put_buf, *execute_buf;
};

/* ovs-vswitchd's struct dpif_netlink, which the probes' first argument points at. */
static char dpif_netlink_stand_in[64];

static void *
checked_malloc(size_t size)
{
    void *p = malloc(size);

    if (!p) {
        fputs("upcall-replay: out of memory\n", stderr);
        exit(1);
    }
    return p;
}

void
ops_batch_init(struct op_batch *batch, size_t max_key_len, size_t max_packet_len)
{
    batch->slots = checked_malloc(OPS_MAX_BATCH * sizeof *batch->slots);
    batch->n = 0;
    for (unsigned int i = 0; i < OPS_MAX_BATCH; i++) {
        batch->slots[i].put_buf = checked_malloc(64 + 2 * NLA_ALIGN(max_key_len) + 64);
        batch->slots[i].execute_buf = checked_malloc(64 + NLA_ALIGN(max_packet_len) + 64);
    }
}

static uint8_t *
put_attr(uint8_t *at, uint16_t type, const void *data, size_t len)
{
    struct nlattr nla = { .nla_len = NLA_HDRLEN + len, .nla_type = type };

    memcpy(at, &nla, NLA_HDRLEN);
    memcpy(at + NLA_HDRLEN, data, len);
    memset(at + NLA_HDRLEN + len, 0, NLA_ALIGN(len) - len);
    return at + NLA_HDRLEN + NLA_ALIGN(len);
}

/* nlmsghdr, genlmsghdr and ovs_header. nlmsg_len stays 0, as in OVS's request when the
 * probe fires: lib/netlink-socket.c sets it when it sends the message. */
static uint8_t *
start_message(uint8_t *buf, uint16_t family, uint16_t flags, uint8_t cmd)
{
    struct nlmsghdr header = { .nlmsg_type = family, .nlmsg_flags = NLM_F_REQUEST | flags };
    uint8_t genl[4] = { cmd, 1, 0, 0 };
    int32_t dp_ifindex = DP_IFINDEX;

    memcpy(buf, &header, sizeof header);
    memcpy(buf + NLMSG_HDRLEN, genl, 4);
    memcpy(buf + NLMSG_HDRLEN + 4, &dp_ifindex, 4);
    return buf + NLMSG_HDRLEN + 8;
}

static void
end_message(struct ofpbuf *request, uint8_t *buf, uint8_t *end, size_t allocated)
{
    *request = (struct ofpbuf) { .base = buf, .data = buf, .size = end - buf,
                                 .allocated = allocated };
}

/* The megaflow mask of a key: every field exact but the IP TOS and TTL. */
static void
mask_key(uint8_t *attrs, size_t len)
{
    for (size_t at = 0; at + NLA_HDRLEN <= len;) {
        struct nlattr nla;
        uint8_t *payload = attrs + at + NLA_HDRLEN;

        memcpy(&nla, attrs + at, NLA_HDRLEN);
        if (nla.nla_len < NLA_HDRLEN || at + nla.nla_len > len) {
            return;
        }
        size_t size = nla.nla_len - NLA_HDRLEN;
        int type = nla.nla_type & NLA_TYPE_MASK;
        if (type == OVS_KEY_ATTR_ENCAP || type == OVS_KEY_ATTR_TUNNEL) {
            mask_key(payload, size);
        } else {
            memset(payload, 0xff, size);
            if (type == OVS_KEY_ATTR_IPV4 && size >= 12) {
                payload[9] = payload[10] = 0;       /* tos, ttl */
            } else if (type == OVS_KEY_ATTR_IPV6 && size >= 40) {
                payload[37] = payload[38] = 0;      /* tclass, hlimit */
            }
        }
        at += NLA_ALIGN(nla.nla_len);
    }
}

static uint32_t
in_port_of(const struct nlattr *key, size_t key_len)
{
    const uint8_t *attrs = (const uint8_t *) key;

    for (size_t at = 0; at + NLA_HDRLEN <= key_len;) {
        struct nlattr nla;
        uint32_t port;

        memcpy(&nla, attrs + at, NLA_HDRLEN);
        if (nla.nla_len < NLA_HDRLEN || at + nla.nla_len > key_len) {
            break;
        }
        if ((nla.nla_type & NLA_TYPE_MASK) == OVS_KEY_ATTR_IN_PORT && nla.nla_len >= 8) {
            memcpy(&port, attrs + at + NLA_HDRLEN, 4);
            return port;
        }
        at += NLA_ALIGN(nla.nla_len);
    }
    return 0;
}

/* A ufid from the flow's key, as OVS makes one (odp_flow_key_hash(): a 128-bit hash of
 * the key, here FNV-1a spread by splitmix64, with the bits of a version 4 UUID). So an
 * upcall of a flow seen before gets the same ufid, as in OVS. */
static ovs_u128
ufid_of(const struct nlattr *key, size_t key_len)
{
    const uint8_t *byte = (const uint8_t *) key;
    uint64_t x = 0xcbf29ce484222325ull;
    ovs_u128 ufid;

    for (size_t i = 0; i < key_len; i++) {
        x = (x ^ byte[i]) * 0x100000001b3ull;
    }
    for (int i = 0; i < 4; i++) {
        x ^= x >> 31;
        x *= 0xbf58476d1ce4e5b9ull;
        ufid.u32[i] = (uint32_t) (x >> 17);
    }
    ufid.u32[1] = (ufid.u32[1] & 0xffff0fff) | 0x00004000;
    ufid.u32[2] = (ufid.u32[2] & 0x3fffffff) | 0x80000000;
    return ufid;
}

void
ops_add(struct op_batch *batch, uint64_t k, unsigned int type, const struct nlattr *key,
        size_t key_len, const uint8_t *packet, uint32_t packet_size)
{
    struct op_slot *slot = &batch->slots[batch->n++];
    uint32_t in_port = in_port_of(key, key_len);
    struct {
        struct nlattr nla;
        uint32_t port;
    } output = { { NLA_HDRLEN + 4, OVS_ACTION_ATTR_OUTPUT }, in_port == 1 ? 2 : 1 };
    uint8_t *at;

    slot->what = type != 0 || k % 16 == 15 ? 0 : k % 16 == 7 ? DO_EXECUTE
                 : DO_PUT | DO_EXECUTE;
    if (slot->what & DO_PUT) {
        uint8_t *mask;

        slot->ufid = ufid_of(key, key_len);
        at = start_message(slot->put_buf, OVS_FLOW_FAMILY, NLM_F_CREATE, OVS_FLOW_CMD_NEW);
        at = put_attr(at, OVS_FLOW_ATTR_UFID, &slot->ufid, sizeof slot->ufid);
        const struct nlattr *put_key = (const struct nlattr *) (at + NLA_HDRLEN);
        at = put_attr(at, OVS_FLOW_ATTR_KEY, key, key_len);
        mask = at + NLA_HDRLEN;
        at = put_attr(at, OVS_FLOW_ATTR_MASK, key, key_len);
        mask_key(mask, key_len);
        const struct nlattr *actions = (const struct nlattr *) (at + NLA_HDRLEN);
        at = put_attr(at, OVS_FLOW_ATTR_ACTIONS, &output, sizeof output);
        end_message(&slot->put_request, slot->put_buf, at, 0);
        slot->put = (struct dpif_flow_put) {
            .flags = 1, .key = put_key, .key_len = key_len,
            .mask = (const struct nlattr *) mask, .mask_len = key_len,
            .actions = actions, .actions_len = sizeof output, .ufid = &slot->ufid,
        };
        slot->flow = (struct dpif_netlink_flow) {
            .cmd = OVS_FLOW_CMD_NEW, .nlmsg_flags = NLM_F_CREATE, .dp_ifindex = DP_IFINDEX,
            .key = put_key, .key_len = key_len, .mask = (const struct nlattr *) mask,
            .mask_len = key_len, .actions = actions, .actions_len = sizeof output,
            .ufid = slot->ufid, .ufid_present = true,
        };
    }
    if (slot->what & DO_EXECUTE) {
        struct {
            struct nlattr nla;
            uint32_t value;
        } metadata[3] = {
            { { NLA_HDRLEN + 4, OVS_KEY_ATTR_PRIORITY }, 0 },
            { { NLA_HDRLEN + 4, OVS_KEY_ATTR_SKB_MARK }, 0 },
            { { NLA_HDRLEN + 4, OVS_KEY_ATTR_IN_PORT }, in_port },
        };

        at = start_message(slot->execute_buf, OVS_PACKET_FAMILY, NLM_F_ACK,
                           OVS_PACKET_CMD_EXECUTE);
        slot->packet = at + NLA_HDRLEN;
        slot->packet_size = packet_size;
        at = put_attr(at, OVS_PACKET_ATTR_PACKET, packet, packet_size);
        at = put_attr(at, OVS_PACKET_ATTR_KEY, metadata, sizeof metadata);
        const struct nlattr *actions = (const struct nlattr *) (at + NLA_HDRLEN);
        at = put_attr(at, OVS_PACKET_ATTR_ACTIONS, &output, sizeof output);
        end_message(&slot->execute_request, slot->execute_buf, at, 0);
        slot->execute = (struct dpif_execute) {
            .actions = actions, .actions_len = sizeof output, .packet = slot->packet,
        };
    }
}

void
ops_fire(struct op_batch *batch)
{
    for (unsigned int i = 0; i < batch->n; i++) {
        struct op_slot *slot = &batch->slots[i];

        __asm__ __volatile__("" ::: "memory");
        if (slot->what & DO_PUT) {
            DTRACE_PROBE4(dpif_netlink_operate__, op_flow_put, dpif_netlink_stand_in,
                          &slot->put, &slot->flow, &slot->put_request);
        }
        if (slot->what & DO_EXECUTE) {
            DTRACE_PROBE5(dpif_netlink_operate__, op_flow_execute, dpif_netlink_stand_in,
                          &slot->execute, slot->packet, slot->packet_size,
                          &slot->execute_request);
        }
    }
    batch->n = 0;
}
