/*
 * ovs-format: the oracle for the actions and megaflow text. Built by build-guest.sh
 * against the same Open vSwitch 3.1 tree as the guest's ovs-vswitchd, it prints what
 * OVS's own library prints, one line per line read:
 *   A <hex>                 format_odp_actions() of the netlink actions
 *   K <key hex> <mask hex>  odp_flow_format() of a key with its mask (a megaflow)
 *   V <key hex> <mask hex>  the same, verbose (as the dpif log prints flow puts)
 *   k <key hex>             odp_flow_format() of a key alone
 * Port names are not given (portno_names = NULL), as in OVS's dpif log.
 */
#include <config.h>
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "odp-util.h"
#include "openvswitch/dynamic-string.h"

/* The bytes of a hex word at *text, in a buffer of their own (aligned for nlattr); the
 * word and the spaces after it are consumed. */
static uint8_t *
read_hex(char **text, size_t *len)
{
    char *start = *text, *end = start;
    while (isxdigit((unsigned char) *end)) {
        end++;
    }
    *len = (end - start) / 2;
    uint8_t *bytes = malloc(*len + 8);
    for (size_t i = 0; i < *len; i++) {
        char pair[3] = { start[2 * i], start[2 * i + 1], 0 };
        bytes[i] = strtoul(pair, NULL, 16);
    }
    while (*end == ' ') {
        end++;
    }
    *text = end;
    return bytes;
}

int
main(void)
{
    char *line = NULL;
    size_t capacity = 0;
    while (getline(&line, &capacity, stdin) != -1) {
        line[strcspn(line, "\r\n")] = '\0';
        char kind = line[0];
        char *rest = line + (kind ? 1 : 0);
        while (*rest == ' ') {
            rest++;
        }
        struct ds text = DS_EMPTY_INITIALIZER;
        size_t len, mask_len = 0;
        uint8_t *data = read_hex(&rest, &len), *mask = NULL;
        if (kind == 'A') {
            format_odp_actions(&text, (const struct nlattr *) data, len, NULL);
        } else if (kind == 'K' || kind == 'V' || kind == 'k') {
            if (kind != 'k') {
                mask = read_hex(&rest, &mask_len);
            }
            odp_flow_format((const struct nlattr *) data, len,
                            (const struct nlattr *) mask, mask_len, NULL, &text,
                            kind == 'V');
        } else {
            ds_put_cstr(&text, "ovs-format: lines start with A, K, V or k");
        }
        puts(ds_cstr(&text));
        fflush(stdout);
        ds_destroy(&text);
        free(data);
        free(mask);
    }
    free(line);
    return 0;
}
