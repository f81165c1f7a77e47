/*
 * upcall-replay: fire Open vSwitch's USDT probe dpif_recv:recv_upcall from recorded upcalls,
 * for tests, benchmarks and the demo on machines without a kernel datapath.
 *
 * The probe has exactly the argument types of ovs-vswitchd's (lib/dpif.c, dpif_recv()):
 *   arg0 const char *dpif full name     arg3 uint32_t packet size
 *   arg1 enum dpif_upcall_type (4 bytes) arg4 const struct nlattr *key
 *   arg2 void *packet data              arg5 size_t key_len
 * so its stapsdt note reads "8@.. 4@.. 8@.. 4@.. 8@.. 8@..", as in OVS's own -O2 build. It
 * has no semaphore, like OVS's. The binary also carries OVS's argument-free probes
 * main:run_start (fired once at start) and main:poll_block (fired before each wait).
 *
 * Usage: upcall-replay [-n COUNT] [-r RATE] [-u] [-T THREADS] [-S | -w SECONDS] [-k] [-B]
 *                      FILE...
 *   FILE...     record files (see below), replayed in order and cycled
 *   -n COUNT    upcalls to fire in all (default: every record once)
 *   -r RATE     upcalls per second, in all threads together (default 0: as fast as possible).
 *               Fire k (0, 1, ...) is due at start + (k + 1)/RATE on the monotonic clock;
 *               each thread fires whatever is due in one burst, then sleeps until its next
 *               one is due, so the rate does not drift and N fires take N/RATE seconds.
 *   -u          unique keys: before each fire, write htonl(0x0a000000 + k) (k = 0, 1, ...
 *               the fire's number) into the received copy's 4-byte unique field, in the
 *               key and in the packet, so every key differs (the packet's checksums go stale)
 *   -T THREADS  handler threads, named handler1, handler2..., sharing count and rate
 *               (default 1); they are not pinned, so they move between CPUs as OVS's do
 *   -S          wait for SIGUSR1 before firing (a tool attaches first, then starts us)
 *   -w SECONDS  wait that long before firing
 *   -k          keep running after firing, until SIGTERM or SIGINT
 *   -B          fire one hostile upcall after the others: its packet size and key_len
 *               run past readable memory into a PROT_NONE guard page
 *   -O          after each batch of at most 64 upcalls, fire the flow puts and executes
 *               a handler would (dpif_netlink_operate__:op_flow_put, op_flow_execute;
 *               flow-ops.h says which upcalls get which)
 * SIGINT or SIGTERM stops the firing early. At the end one line goes to stdout,
 * "fired N upcalls in S.SSS s (R/s)" (N counts the -B upcall), and the exit status is 0.
 *
 * Record file format (little-endian, no padding; upcalls.py writes it):
 *   header b"UPCREC1\n", then records one after another:
 *   u16 dpif_len, u16 reserved, u32 type, u32 pkt_len, u32 key_len,
 *   i32 key_uniq_off, i32 pkt_uniq_off, dpif bytes (no NUL), packet bytes, key bytes.
 *   The uniq offsets locate the -u field in key and packet, or are -1 when there is none.
 *
 * Every record is loaded before firing starts: nothing allocates in the firing loop. Each
 * fire first "receives" its record: it copies key and packet into the handler thread's own
 * buffer, reused for every upcall, as the kernel's recvmsg() does into ovs-vswitchd's
 * handler buffers, where they lie as in the kernel's upcall message. So the probe reads
 * what it reads in OVS: a just-received upcall, hot in the cache, at a stable address,
 * laid out as OVS has it; and the replay's own cost per upcall includes that copy.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <linux/netlink.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/sdt.h>
#include <time.h>
#include <unistd.h>

#include "flow-ops.h"

/* As in OVS's lib/dpif.h: gcc gives it a 4-byte unsigned type. */
enum dpif_upcall_type {
    DPIF_UC_MISS,
    DPIF_UC_ACTION,
    DPIF_N_UC_TYPES
};

struct record {
    const char *dpif;
    enum dpif_upcall_type type;
    uint8_t *packet;
    uint32_t packet_size;
#ifdef OVS_LAYOUT
    /* The key some 550 bytes past the packet's size, as in OVS's struct dpif_upcall (the
     * size is in its struct dp_packet): gcc then gives the probe two far-apart memory
     * operands on one base, as OVS's -O2 build has ("4@12(%rbx) 8@568(%rbx) 8@576(%rbx)").
     * Built as upcall-replay-ovs-layout, for the benchmark's probe overhead. */
    uint8_t dp_packet_rest[540];
#endif
    struct nlattr *key;
    size_t key_len;
    int32_t key_uniq_off;
    int32_t pkt_uniq_off;
};

struct handler {
    pthread_t thread;
    unsigned int index;          /* 0-based; named handler<index + 1> */
    uint8_t *recv_buf;           /* RECV_BUF_SIZE bytes: where each upcall is received */
    struct op_batch ops;         /* -O */
    uint64_t fired;
};

#define FILE_MAGIC "UPCREC1\n"
#define RECORD_HEADER_SIZE 24
#define UNIQ_BASE 0x0a000000u    /* -u values read as 10.0.0.0 + k */
#define MAX_BURST 4096           /* fires between checks of the stop flag */
#define MAX_SLEEP_NS 100000000u  /* handlers look at the stop flag at least this often */
/* The kernel's upcall message (net/openvswitch/datapath.c, queue_userspace_packet()):
 * netlink, generic netlink and ovs_header headers, the key attribute, for a miss a hash
 * attribute (a u64), and last the packet attribute; key and packet at most 64 KiB. */
#define UPCALL_HEADERS (NLMSG_HDRLEN + 4 + 4)
#define HASH_ATTR_SIZE NLA_ALIGN(NLA_HDRLEN + 8)
#define RECV_BUF_SIZE (UPCALL_HEADERS + NLA_HDRLEN + NLA_ALIGN(UINT16_MAX + 1) \
                       + HASH_ATTR_SIZE + NLA_HDRLEN + UINT16_MAX + 1)

static struct record *records;
static size_t n_records;
static uint64_t total_count;
static double rate;
static unsigned int n_threads = 1;
static bool unique_keys;
static bool flow_ops;
static size_t max_key_len, max_packet_len;
static struct timespec start_time;
static volatile sig_atomic_t stop_requested;

static void die(int status, const char *fmt, ...) __attribute__((format(printf, 2, 3),
                                                                noreturn));

static void
die(int status, const char *fmt, ...)
{
    va_list args;

    fputs("upcall-replay: ", stderr);
    va_start(args, fmt);
    vfprintf(stderr, fmt, args);
    va_end(args);
    fputc('\n', stderr);
    exit(status);
}

static void
usage(FILE *stream)
{
    fputs("usage: upcall-replay [-n COUNT] [-r RATE] [-u] [-T THREADS] [-S | -w SECONDS] "
          "[-k] [-B] [-O] FILE...\n"
          "Fire the USDT probe dpif_recv:recv_upcall with the upcalls recorded in FILE...\n"
          "  -n COUNT    upcalls to fire in all (default: every record once; files cycle)\n"
          "  -r RATE     upcalls per second across all threads (default 0: no limit)\n"
          "  -u          unique keys: write a counter into each record's unique field\n"
          "  -T THREADS  handler threads handler1..N sharing count and rate (default 1)\n"
          "  -S          wait for SIGUSR1 before firing\n"
          "  -w SECONDS  wait SECONDS before firing\n"
          "  -k          keep running after firing until SIGTERM or SIGINT\n"
          "  -B          then fire one upcall whose packet and key run into unreadable memory\n"
          "  -O          fire a handler's flow puts and executes after each batch of upcalls\n"
          "Prints \"fired N upcalls in S.SSS s (R/s)\" at the end.\n", stream);
}

static void
on_stop_signal(int signo)
{
    (void) signo;
    stop_requested = 1;
}

static bool
stopping(void)
{
    return __atomic_load_n(&stop_requested, __ATOMIC_RELAXED);
}

static uint32_t
get_u32(const uint8_t *p)
{
    uint32_t v;

    memcpy(&v, p, 4);
    return v;               /* the file is little-endian, like every host this runs on */
}

/* One string per datapath name, as OVS has one dpif->full_name per datapath. */
static const char *
intern_dpif(const char *name, size_t len)
{
    static char **names;
    static size_t n_names;
    char *copy;

    for (size_t i = 0; i < n_names; i++) {
        if (strlen(names[i]) == len && !memcmp(names[i], name, len)) {
            return names[i];
        }
    }
    names = realloc(names, (n_names + 1) * sizeof *names);
    copy = strndup(name, len);
    if (!names || !copy) {
        die(1, "out of memory");
    }
    return names[n_names++] = copy;
}

static void
load_file(const char *path)
{
    FILE *stream = fopen(path, "rb");
    uint8_t *data;
    long size;
    size_t offset;

    if (!stream || fseek(stream, 0, SEEK_END) || (size = ftell(stream)) < 0
        || fseek(stream, 0, SEEK_SET)) {
        die(1, "%s: %s", path, strerror(errno));
    }
    data = malloc(size ? size : 1);
    if (!data || fread(data, 1, size, stream) != (size_t) size) {
        die(1, "%s: cannot read", path);
    }
    fclose(stream);
    if ((size_t) size < sizeof FILE_MAGIC - 1 || memcmp(data, FILE_MAGIC, sizeof FILE_MAGIC - 1)) {
        die(1, "%s: not an upcall record file (no UPCREC1 header)", path);
    }

    for (offset = sizeof FILE_MAGIC - 1; offset < (size_t) size; n_records++) {
        const uint8_t *h = data + offset;
        uint16_t dpif_len;
        uint32_t pkt_len, key_len;
        int32_t key_uniq, pkt_uniq;
        struct record *r;
        char *body;

        if ((size_t) size - offset < RECORD_HEADER_SIZE) {
            die(1, "%s: record %zu: truncated header", path, n_records);
        }
        memcpy(&dpif_len, h, 2);
        pkt_len = get_u32(h + 8);
        key_len = get_u32(h + 12);
        key_uniq = (int32_t) get_u32(h + 16);
        pkt_uniq = (int32_t) get_u32(h + 20);
        offset += RECORD_HEADER_SIZE;
        if ((size_t) size - offset < (size_t) dpif_len + pkt_len + key_len) {
            die(1, "%s: record %zu: truncated body", path, n_records);
        }
        if (pkt_len > UINT16_MAX + 1 || key_len > UINT16_MAX + 1) {
            die(1, "%s: record %zu: packet or key over 64 KiB", path, n_records);
        }
        if ((key_uniq != -1 && (key_uniq < 0 || key_len < 4 || (uint32_t) key_uniq > key_len - 4))
            || (pkt_uniq != -1
                && (pkt_uniq < 0 || pkt_len < 4 || (uint32_t) pkt_uniq > pkt_len - 4))) {
            die(1, "%s: record %zu: unique field offset out of range", path, n_records);
        }

        records = realloc(records, (n_records + 1) * sizeof *records);
        body = malloc((size_t) pkt_len + key_len);
        if (!records || !body) {
            die(1, "out of memory");
        }
        memcpy(body, data + offset + dpif_len, (size_t) pkt_len + key_len);
        r = &records[n_records];
        r->dpif = intern_dpif((const char *) data + offset, dpif_len);
        r->type = (enum dpif_upcall_type) get_u32(h + 4);
        r->packet = (uint8_t *) body;
        r->packet_size = pkt_len;
        r->key = (struct nlattr *) (r->packet + pkt_len);
        r->key_len = key_len;
        r->key_uniq_off = key_uniq;
        r->pkt_uniq_off = pkt_uniq;
        max_key_len = key_len > max_key_len ? key_len : max_key_len;
        max_packet_len = pkt_len > max_packet_len ? pkt_len : max_packet_len;
        offset += (size_t) dpif_len + pkt_len + key_len;
    }
    free(data);
}

static inline void
fire(const struct record *r)
{
    /* The probe's asm reads these through its operands only: keep earlier stores. */
    __asm__ __volatile__("" ::: "memory");
    DTRACE_PROBE6(dpif_recv, recv_upcall, r->dpif, r->type, r->packet, r->packet_size,
                  r->key, r->key_len);
}

/* The copy the kernel's recvmsg() would have made into the handler's buffer: key and
 * packet where the upcall message has them. The probe reads nothing else, so the headers
 * between are left as they are. */
static inline struct record
receive(const struct record *r, uint8_t *buf)
{
    struct record copy = *r;
    uint8_t *key = buf + UPCALL_HEADERS + NLA_HDRLEN;
    uint8_t *packet = key + NLA_ALIGN(r->key_len) + HASH_ATTR_SIZE + NLA_HDRLEN;

    copy.key = memcpy(key, r->key, r->key_len);
    copy.packet = memcpy(packet, r->packet, r->packet_size);
    return copy;
}

static inline void
set_unique(struct record *r, uint64_t k)
{
    uint32_t value = htonl(UNIQ_BASE + (uint32_t) k);

    if (r->key_uniq_off >= 0) {
        memcpy((uint8_t *) r->key + r->key_uniq_off, &value, 4);
    }
    if (r->pkt_uniq_off >= 0) {
        memcpy(r->packet + r->pkt_uniq_off, &value, 4);
    }
}

static struct timespec
add_ns(struct timespec t, uint64_t ns)
{
    ns += t.tv_nsec;
    t.tv_sec += ns / 1000000000u;
    t.tv_nsec = ns % 1000000000u;
    return t;
}

static uint64_t
ns_since(const struct timespec *t0)
{
    struct timespec now;

    clock_gettime(CLOCK_MONOTONIC, &now);
    return (uint64_t) (now.tv_sec - t0->tv_sec) * 1000000000u + now.tv_nsec - t0->tv_nsec;
}

/* Handler n fires upcalls n, n + T, n + 2T... of the whole run (T threads), fire k being
 * record k mod n_records, due at start_time + (k + 1) / rate. */
static void *
handler_main(void *arg)
{
    struct handler *h = arg;
    const uint64_t step = n_threads;
    uint64_t k = h->index;
    size_t index = h->index % n_records;
    char name[16];

    snprintf(name, sizeof name, "handler%u", h->index + 1);
    pthread_setname_np(pthread_self(), name);

    while (k < total_count && !stopping()) {
        uint64_t limit = total_count;      /* fire while k < limit in this burst */
        uint64_t burst = 0;

        if (rate > 0) {
            uint64_t due = (uint64_t) (ns_since(&start_time) * rate / 1e9);

            if (k >= due) {
                /* + 1 ns: rounding down would wake just before k is due. */
                struct timespec wake = add_ns(start_time,
                                              (uint64_t) ((k + 1) * 1e9 / rate) + 1);
                struct timespec now, latest;

                clock_gettime(CLOCK_MONOTONIC, &now);
                latest = add_ns(now, MAX_SLEEP_NS);
                if (wake.tv_sec > latest.tv_sec
                    || (wake.tv_sec == latest.tv_sec && wake.tv_nsec > latest.tv_nsec)) {
                    wake = latest;
                }
                clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &wake, NULL);
                continue;
            }
            limit = due < total_count ? due : total_count;
        }
        for (; k < limit && burst < (flow_ops ? OPS_MAX_BATCH : MAX_BURST); k += step, burst++) {
            struct record upcall = receive(&records[index], h->recv_buf);

            if (unique_keys) {
                set_unique(&upcall, k);
            }
            fire(&upcall);
            if (flow_ops) {
                ops_add(&h->ops, k, upcall.type, upcall.key, upcall.key_len, upcall.packet,
                        upcall.packet_size);
            }
            index += step;
            while (index >= n_records) {
                index -= n_records;
            }
        }
        if (flow_ops) {
            ops_fire(&h->ops);
        }
        h->fired += burst;
    }
    return NULL;
}

/* Pointers a few bytes before PROT_NONE guard pages, with lengths that run past them. */
static void
fire_hostile(void)
{
    const long page = sysconf(_SC_PAGESIZE);
    uint8_t *area = mmap(NULL, 4 * page, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    const struct record *model = &records[0];
    struct record r = *model;
    size_t pkt_readable = 60, key_readable = 40;

    if (area == MAP_FAILED || mprotect(area + page, page, PROT_NONE)
        || mprotect(area + 3 * page, page, PROT_NONE)) {
        die(1, "cannot map guard pages: %s", strerror(errno));
    }
    r.packet = area + page - pkt_readable;
    r.packet_size = 1514;
    r.key = (struct nlattr *) (area + 3 * page - key_readable);
    r.key_len = 640;
    memcpy(r.packet, model->packet,
           model->packet_size < pkt_readable ? model->packet_size : pkt_readable);
    memcpy(r.key, model->key, model->key_len < key_readable ? model->key_len : key_readable);
    fire(&r);
}

static double
parse_number(const char *text, const char *what, double max)
{
    char *end;
    double value;

    errno = 0;
    value = strtod(text, &end);
    if (errno || end == text || *end || !(value >= 0) || value > max) {
        die(2, "bad %s '%s' (try -h)", what, text);
    }
    return value;
}

static uint64_t
parse_integer(const char *text, const char *what, uint64_t min, uint64_t max)
{
    char *end;
    unsigned long long value;

    errno = 0;
    value = strtoull(text, &end, 10);
    if (errno || end == text || *end || text[0] == '-' || value < min || value > max) {
        die(2, "bad %s '%s' (try -h)", what, text);
    }
    return value;
}

/* Blocks until SIGUSR1 (returns) or SIGINT/SIGTERM (sets stop_requested). */
static void
wait_for_start_signal(void)
{
    sigset_t set;
    int signo;

    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    fprintf(stderr, "upcall-replay: pid %d waiting for SIGUSR1\n", (int) getpid());
    DTRACE_PROBE(main, poll_block);
    if (sigwait(&set, &signo) == 0 && signo != SIGUSR1) {
        stop_requested = 1;
    }
    sigdelset(&set, SIGUSR1);       /* keep a stray SIGUSR1 from killing us later */
    pthread_sigmask(SIG_UNBLOCK, &set, NULL);
}

static void
sleep_seconds(double seconds)
{
    struct timespec wake;

    clock_gettime(CLOCK_MONOTONIC, &wake);
    wake = add_ns(wake, (uint64_t) (seconds * 1e9));
    DTRACE_PROBE(main, poll_block);
    while (!stopping()
           && clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &wake, NULL) == EINTR) {
        continue;
    }
}

static void
wait_for_stop_signal(void)
{
    sigset_t block, during;

    sigemptyset(&block);
    sigaddset(&block, SIGINT);
    sigaddset(&block, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &block, &during);
    sigdelset(&during, SIGINT);
    sigdelset(&during, SIGTERM);
    DTRACE_PROBE(main, poll_block);
    while (!stop_requested) {
        sigsuspend(&during);
    }
}

int
main(int argc, char *argv[])
{
    struct sigaction stop_action = { .sa_handler = on_stop_signal };
    bool count_given = false, wait_signal = false, keep = false, hostile = false;
    double wait_time = 0;
    struct handler *handlers;
    sigset_t handler_mask, main_mask;
    uint64_t fired = 0, elapsed_ns;
    unsigned int n_started = 0;
    double seconds;
    int opt;

    opterr = 0;                     /* our own one-line messages */
    while ((opt = getopt(argc, argv, "n:r:uT:Sw:kBOh")) != -1) {
        switch (opt) {
        case 'n':
            total_count = parse_integer(optarg, "count", 0, UINT64_MAX / 2);
            count_given = true;
            break;
        case 'r':
            rate = parse_number(optarg, "rate", 1e9);
            break;
        case 'u':
            unique_keys = true;
            break;
        case 'T':
            n_threads = parse_integer(optarg, "thread count", 1, 1024);
            break;
        case 'S':
            wait_signal = true;
            break;
        case 'w':
            wait_time = parse_number(optarg, "wait", 1e6);
            break;
        case 'k':
            keep = true;
            break;
        case 'B':
            hostile = true;
            break;
        case 'O':
            flow_ops = true;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            if (strchr("nrTw", optopt)) {
                die(2, "option -%c needs a value (try -h)", optopt);
            }
            die(2, "unknown option -%c (try -h)", optopt);
        }
    }
    if (optind == argc) {
        die(2, "no record file given (try -h)");
    }
    for (int i = optind; i < argc; i++) {
        load_file(argv[i]);
    }
    if (!n_records) {
        die(1, "the record files hold no records");
    }
    if (!count_given) {
        total_count = n_records;
    }

    handlers = calloc(n_threads, sizeof *handlers);
    if (!handlers) {
        die(1, "out of memory");
    }
    for (unsigned int i = 0; i < n_threads; i++) {
        handlers[i].index = i;
        handlers[i].recv_buf = malloc(RECV_BUF_SIZE);
        if (!handlers[i].recv_buf) {
            die(1, "out of memory");
        }
        if (flow_ops) {
            ops_batch_init(&handlers[i].ops, max_key_len, max_packet_len);
        }
    }

    sigaction(SIGINT, &stop_action, NULL);
    sigaction(SIGTERM, &stop_action, NULL);
    DTRACE_PROBE(main, run_start);
    if (wait_signal) {
        wait_for_start_signal();
    } else if (wait_time > 0) {
        sleep_seconds(wait_time);
    }

    /* Signals go to the main thread, which only waits for the handlers. */
    sigemptyset(&handler_mask);
    sigaddset(&handler_mask, SIGINT);
    sigaddset(&handler_mask, SIGTERM);
    sigaddset(&handler_mask, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &handler_mask, &main_mask);
    clock_gettime(CLOCK_MONOTONIC, &start_time);
    for (; n_started < n_threads && !stopping(); n_started++) {
        if (pthread_create(&handlers[n_started].thread, NULL, handler_main,
                           &handlers[n_started])) {
            die(1, "cannot start handler thread %u", n_started + 1);
        }
    }
    pthread_sigmask(SIG_SETMASK, &main_mask, NULL);
    for (unsigned int i = 0; i < n_started; i++) {
        pthread_join(handlers[i].thread, NULL);
        fired += handlers[i].fired;
    }
    if (hostile && !stopping()) {
        fire_hostile();
        fired++;
    }
    elapsed_ns = ns_since(&start_time);

    seconds = elapsed_ns / 1e9;
    printf("fired %" PRIu64 " upcalls in %.3f s (%.0f/s)\n", fired, seconds,
           seconds > 0 ? fired / seconds : 0.0);
    fflush(stdout);
    if (keep) {
        wait_for_stop_signal();
    }
    return 0;
}
