/* Tessera's intra-node transport: collectives over one POSIX shared-memory segment.
 *
 * A CPython extension (module _tsr_shm) so that a small collective costs one call with no
 * ctypes marshalling: buffers arrive through the buffer protocol or as raw addresses.
 *
 * Segment layout (all offsets 64-byte aligned):
 *   header | per-rank lines (pid, done) | per-pair p2p lines | slots [rank][NSLOTS] | p2p
 *   buffers [src][dst][NBUF]
 *
 * Protocol. Every collective is a sequence of *steps*, numbered identically on every rank
 * (all ranks run the same collectives in the same order and split them into the same
 * steps). In step s a rank may write its slot s % NSLOTS and post it by storing s + 1 into
 * the slot's header (release); a reader polls that header word (acquire), so the flag and
 * up to 32 bytes of payload arrive in one cache line (the low-latency path for small
 * messages). After reading everything it needs in step s a rank stores done = s + 1; a
 * writer reuses a slot only once every peer's done says the slot's previous step is read.
 * Each header carries the operation's signature and size, checked by every reader, so
 * mismatched collectives are reported instead of producing garbage.
 *
 * Waits spin briefly, then yield, then sleep; they check for an abort flag, dead peers
 * (kill(pid, 0)) and a timeout, and return an error naming the rank they waited for.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <math.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif

#define LINE 64
#define MAGIC 0x5453524d53484d31ull /* "TSRMSHM1" */
#define HDR_BYTES 32                /* slot header; payload follows */
#define ABORT_MSG 448

#include "reduce.h"

enum { K_ALLREDUCE = 1, K_REDUCE, K_BCAST, K_ALLGATHER, K_REDUCE_SCATTER, K_ALLTOALL,
       K_BARRIER, K_ALLTOALLV };
enum { ALGO_AUTO, ALGO_ONESHOT, ALGO_TWOSHOT, ALGO_DIRECT };
enum { E_OK = 0, E_TIMEOUT = -1, E_DEAD = -2, E_ABORTED = -3, E_MISMATCH = -4, E_SYS = -5,
       E_ARG = -6 };

static const char *dtype_name[N_DTYPES] = {"float32", "float16", "bfloat16", "int32",
                                           "int64", "float64", "uint8"};
static const char *op_name[N_OPS] = {"sum", "prod", "max", "min"};
static const char *kind_name[] = {"?", "allreduce", "reduce", "broadcast", "allgather",
                                  "reduce_scatter", "alltoall", "barrier", "alltoallv"};

typedef struct { _Alignas(LINE) volatile uint64_t v; } line_t;

typedef struct {
    uint64_t magic, total_bytes, slot_bytes, nslots, p2p_bytes, nbuf;
    uint32_t size, version;
    _Alignas(LINE) volatile uint64_t abort_flag; /* 0, or 1 + the rank that aborted */
    char abort_msg[ABORT_MSG];
} seg_header;

typedef struct {
    _Alignas(LINE) volatile int64_t pid;
    _Alignas(LINE) volatile uint64_t done;
} rank_lines;

typedef struct {
    volatile uint64_t step1; /* step + 1 once posted */
    uint32_t sig;            /* kind | dtype << 8 | op << 16 | (root + 1) << 24, or tag */
    uint32_t aux;
    uint64_t size;           /* what every rank must agree on (elements or bytes) */
    uint64_t pad;
} slot_header;

typedef struct {
    uint8_t *base;
    size_t map_bytes;
    seg_header *hdr;
    rank_lines *ranks;
    line_t *p2p_recvd;       /* [src * size + dst]: pieces dst has taken from src */
    uint8_t *slots, *p2p;
    size_t slot_stride, p2p_stride;
    int rank, size;
    uint64_t step;           /* the next collective step */
    uint64_t *seen_done;     /* last value read of each peer's done */
    uint64_t *sent, *recvd;  /* p2p pieces sent to / received from each peer */
    int64_t timeout_ns, spin_ns;
    size_t direct_min;       /* bytes from which collectives copy directly between ranks */
    uint8_t *scratch;        /* DIRECT_PIECE bytes for peers' pieces being reduced */
    int busy;                /* a thread is running a collective on this communicator */
} comm;

/* One call into the transport: its error, and the thread state while the GIL is released. */
typedef struct {
    comm *c;
    PyThreadState *ts;
    int err_rank;
    int entered;             /* holds c->busy */
    char err[512];
} call;

/* ------------------------------------------------------------------------------ waiting */

static inline uint64_t load_acq(volatile uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void store_rel(volatile uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static int fail(call *k, int code, int rank, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(k->err, sizeof k->err, fmt, ap);
    va_end(ap);
    k->err_rank = rank;
    return code;
}

static int aborted(call *k) {
    int who = (int)k->c->hdr->abort_flag - 1;
    return fail(k, E_ABORTED, who, "rank %d aborted the communicator: %.*s", who, ABORT_MSG,
                k->c->hdr->abort_msg);
}

static void release_gil(call *k) { if (!k->ts) k->ts = PyEval_SaveThread(); }

/* One collective at a time per communicator, whatever the threads: a second caller waits
 * (without the GIL, which the running one may need back). */
static void enter(call *k) {
    if (__atomic_exchange_n(&k->c->busy, 1, __ATOMIC_ACQUIRE)) {
        release_gil(k);
        while (__atomic_exchange_n(&k->c->busy, 1, __ATOMIC_ACQUIRE)) sched_yield();
    }
    k->entered = 1;
}

/* A peer is dead when its pid is gone or a zombie (exited, not yet reaped by its parent). */
static int peer_dead(comm *c, int peer) {
    int64_t pid = c->ranks[peer].pid;
    if (pid <= 0) return 0;
    if (kill((pid_t)pid, 0) != 0) return errno == ESRCH;
    char path[64], stat[512];
    snprintf(path, sizeof path, "/proc/%lld/stat", (long long)pid);
    int fd = open(path, O_RDONLY);
    if (fd < 0) return 0;
    ssize_t n = read(fd, stat, sizeof stat - 1);
    close(fd);
    if (n <= 0) return 0;
    stat[n] = 0;
    const char *end = strrchr(stat, ')');  /* "pid (comm) S ..." */
    return end && end[1] == ' ' && end[2] == 'Z';
}

/* Wait until *p >= want (p belongs to `peer`): spin for spin_ns (a peer a few microseconds
 * behind; none when ranks outnumber cores, as the peer may need this core), then yield,
 * then sleep, checking for an abort, a dead peer and the timeout. */
static int wait_ge(call *k, volatile uint64_t *p, uint64_t want, int peer) {
    comm *c = k->c;
    int64_t t0 = now_ns(), next_check = t0 + 20000000, t = t0;
    do {
        for (int i = 0; i < 64; i++) {
            if (load_acq(p) >= want) return E_OK;
            cpu_relax();
        }
    } while ((t = now_ns()) - t0 < c->spin_ns);
    release_gil(k);
    for (;;) {
        if (c->hdr->abort_flag) return aborted(k);
        if (t >= next_check) {
            if (peer_dead(c, peer))
                return fail(k, E_DEAD, peer, "rank %d (pid %lld) died", peer,
                            (long long)c->ranks[peer].pid);
            next_check = t + 20000000;
        }
        if (t - t0 > c->timeout_ns)
            return fail(k, E_TIMEOUT, peer, "rank %d did not respond within %.1f s", peer,
                        c->timeout_ns / 1e9);
        if (t - t0 < 2000000) sched_yield();
        else { struct timespec ts = {0, 50000}; nanosleep(&ts, NULL); }
        for (int i = 0; i < 64; i++) {
            if (load_acq(p) >= want) return E_OK;
            cpu_relax();
        }
        t = now_ns();
    }
}

/* ------------------------------------------------------------------------ slot protocol */

static inline slot_header *slot(comm *c, int r, uint64_t s) {
    return (slot_header *)(c->slots + ((size_t)r * c->hdr->nslots + s % c->hdr->nslots) * c->slot_stride);
}
static inline uint8_t *payload(slot_header *h) { return (uint8_t *)h + HDR_BYTES; }

/* Before writing my slot for step s: every peer has read that slot's previous step (and
 * nobody has aborted: a rank that gave up must not look like one that took part). */
static int slot_acquire(call *k, uint64_t s) {
    comm *c = k->c;
    if (c->hdr->abort_flag) return aborted(k);
    uint64_t need = s + 1 > c->hdr->nslots ? s + 1 - c->hdr->nslots : 0;
    for (int q = 0; q < c->size; q++) {
        if (q == c->rank || c->seen_done[q] >= need) continue;
        int e = wait_ge(k, &c->ranks[q].done, need, q);
        if (e) return e;
        c->seen_done[q] = load_acq(&c->ranks[q].done);
    }
    return E_OK;
}

static inline void slot_post(comm *c, uint64_t s, uint32_t sig, uint64_t size) {
    slot_header *h = slot(c, c->rank, s);
    h->sig = sig;
    h->size = size;
    store_rel(&h->step1, s + 1);
}

static inline void step_done(comm *c, uint64_t s) { store_rel(&c->ranks[c->rank].done, s + 1); }

static void describe(char *buf, size_t n, uint32_t sig, uint64_t size) {
    unsigned kind = sig & 0xff, dt = (sig >> 8) & 0xff, op = (sig >> 16) & 0xff;
    int root = (int)(sig >> 24) - 1, reducing = kind == K_ALLREDUCE || kind == K_REDUCE ||
                                                 kind == K_REDUCE_SCATTER;
    int w = snprintf(buf, n, "%s(%s, size %llu", kind <= K_ALLTOALLV ? kind_name[kind] : "?",
                     dt < N_DTYPES ? dtype_name[dt] : "?", (unsigned long long)size);
    if (reducing && w < (int)n) w += snprintf(buf + w, n - w, ", op %s", op < N_OPS ? op_name[op] : "?");
    if (root >= 0 && w < (int)n) w += snprintf(buf + w, n - w, ", root %d", root);
    if (w < (int)n) snprintf(buf + w, n - w, ")");
}

static void comm_abort(comm *c, const char *msg) {
    uint64_t expected = 0;
    if (__atomic_compare_exchange_n(&c->hdr->abort_flag, &expected, (uint64_t)c->rank + 1, 0,
                                    __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        snprintf(c->hdr->abort_msg, ABORT_MSG, "%s", msg);
    }
}

/* Wait for peer q's slot of step s and check it belongs to the same collective. */
static int slot_wait(call *k, int q, uint64_t s, uint32_t sig, uint64_t size, const uint8_t **data) {
    comm *c = k->c;
    slot_header *h = slot(c, q, s);
    int e = wait_ge(k, &h->step1, s + 1, q);
    if (e) return e;
    if (h->step1 != s + 1 || h->sig != sig || h->size != size) {
        char mine[160], theirs[160];
        describe(mine, sizeof mine, sig, size);
        describe(theirs, sizeof theirs, h->sig, h->size);
        if (h->step1 != s + 1) snprintf(theirs, sizeof theirs, "a collective out of order");
        fail(k, E_MISMATCH, q, "collective mismatch: this rank (%d) called %s, rank %d called %s",
             c->rank, mine, q, theirs);
        comm_abort(c, k->err);
        return E_MISMATCH;
    }
    *data = payload(h);
    return E_OK;
}

static inline uint32_t signature(int kind, int dtype, int op, int root) {
    return (uint32_t)kind | (uint32_t)dtype << 8 | (uint32_t)op << 16 | (uint32_t)(root + 1) << 24;
}

#define TRY(x) do { int e_ = (x); if (e_) return e_; } while (0)

/* ----------------------------------------------------------------------------- collectives */

/* Each rank posts its whole input; every receiving rank reduces all copies in rank order,
 * so all ranks get the same bits. */
static int allreduce_oneshot(call *k, const void *src, void *dst, size_t n, int dt, int op,
                             int root, uint32_t sig) {
    comm *c = k->c;
    size_t nbytes = n * dtype_size[dt];
    uint64_t s = c->step++;
    TRY(slot_acquire(k, s));
    memcpy(payload(slot(c, c->rank, s)), src, nbytes);
    slot_post(c, s, sig, n);
    if (root < 0 || root == c->rank) {
        const void *srcs[c->size];
        for (int q = 0; q < c->size; q++) {
            const uint8_t *d = payload(slot(c, q, s));
            if (q != c->rank) TRY(slot_wait(k, q, s, sig, n, &d));
            srcs[q] = d;
        }
        reducers[dt][op](dst, NULL, srcs, c->size, n);
    }
    step_done(c, s);
    return E_OK;
}

/* Chunks of one slot: reduce-scatter (each rank reduces its slice of the chunk from the
 * others' posted copies and posts the result), then all-gather (or gather at the root). */
static int allreduce_twoshot(call *k, const uint8_t *src, uint8_t *dst, size_t n, int dt,
                             int op, int root, uint32_t sig) {
    comm *c = k->c;
    int P = c->size, me = c->rank;
    size_t es = dtype_size[dt], per_chunk = c->hdr->slot_bytes / es;
    size_t align = LINE / es;
    for (size_t c0 = 0; c0 < n; c0 += per_chunk) {
        size_t m = n - c0 < per_chunk ? n - c0 : per_chunk;
        size_t slice = (m + P - 1) / P;
        slice = (slice + align - 1) / align * align;
        #define LO(r) ((size_t)(r) * slice < m ? (size_t)(r) * slice : m)
        #define HI(r) ((size_t)((r) + 1) * slice < m ? (size_t)((r) + 1) * slice : m)
        uint64_t sa = c->step++, sb = c->step++;
        const uint8_t *in = src + c0 * es;
        TRY(slot_acquire(k, sa));
        uint8_t *mine_a = payload(slot(c, me, sa));
        for (int q = 0; q < P; q++)
            if (q != me) memcpy(mine_a + LO(q) * es, in + LO(q) * es, (HI(q) - LO(q)) * es);
        slot_post(c, sa, sig, n);
        /* reduce my slice: my own input first, then the others in rank order */
        const void *srcs[P];
        srcs[0] = in + LO(me) * es;
        for (int q = 0, j = 1; q < P; q++) {
            if (q == me) continue;
            const uint8_t *d;
            TRY(slot_wait(k, q, sa, sig, n, &d));
            srcs[j++] = d + LO(me) * es;
        }
        TRY(slot_acquire(k, sb));
        uint8_t *mine_b = payload(slot(c, me, sb));
        int keep = root < 0 || root == me;
        reducers[dt][op](mine_b + LO(me) * es, keep ? dst + (c0 + LO(me)) * es : NULL, srcs, P,
                         HI(me) - LO(me));
        step_done(c, sa);
        slot_post(c, sb, sig, n);
        if (keep) {
            for (int q = 0; q < P; q++) {
                if (q == me) continue;
                const uint8_t *d;
                TRY(slot_wait(k, q, sb, sig, n, &d));
                memcpy(dst + (c0 + LO(q)) * es, d + LO(q) * es, (HI(q) - LO(q)) * es);
            }
        }
        step_done(c, sb);
        #undef LO
        #undef HI
    }
    return E_OK;
}

/* ------------------------------------------------------------------ direct (single copy)
 * Large collectives copy straight from a peer's buffers into this rank's with
 * process_vm_readv (Cross Memory Attach): each byte crosses once, instead of into the
 * segment and out again. Ranks publish their buffers' addresses in a step; a final step
 * keeps every rank in the call until no peer still reads its buffers. */

#define DIRECT_PIECE (256 << 10) /* peers' pieces reduced per pass: stays in L2 */

typedef struct { uint64_t src, dst; } addresses;

/* Copy n bytes between this rank's `mine` and peer q's address `theirs`, one kernel copy;
 * `write` says which way. */
static int peer_copy(call *k, int q, void *mine, uint64_t theirs, size_t n, int write) {
    comm *c = k->c;
    while (n) {
        struct iovec local = {mine, n}, remote = {(void *)(uintptr_t)theirs, n};
        pid_t pid = (pid_t)c->ranks[q].pid;
        ssize_t got = write ? process_vm_writev(pid, &local, 1, &remote, 1, 0)
                            : process_vm_readv(pid, &local, 1, &remote, 1, 0);
        if (got <= 0) {
            if (got < 0 && errno == EINTR) continue;
            int e = got < 0 ? errno : EIO;
            if (peer_dead(c, q))
                return fail(k, E_DEAD, q, "rank %d (pid %lld) died", q, (long long)c->ranks[q].pid);
            fail(k, E_SYS, q, "%s rank %d's buffer failed: %s", write ? "writing" : "reading",
                 q, strerror(e));
            comm_abort(c, k->err);
            return E_SYS;
        }
        mine = (uint8_t *)mine + got;
        theirs += (uint64_t)got;
        n -= (size_t)got;
    }
    return E_OK;
}

static int peer_read(call *k, int q, void *to, uint64_t from, size_t n) {
    return peer_copy(k, q, to, from, n, 0);
}

/* Post this rank's buffer addresses and read everyone's. */
static int share_addresses(call *k, uint32_t sig, uint64_t size, const void *src, void *dst,
                           addresses *all) {
    comm *c = k->c;
    uint64_t s = c->step++;
    TRY(slot_acquire(k, s));
    addresses mine = {(uint64_t)(uintptr_t)src, (uint64_t)(uintptr_t)dst};
    memcpy(payload(slot(c, c->rank, s)), &mine, sizeof mine);
    slot_post(c, s, sig, size);
    for (int q = 0; q < c->size; q++) {
        const uint8_t *d = payload(slot(c, q, s));
        if (q != c->rank) TRY(slot_wait(k, q, s, sig, size, &d));
        memcpy(&all[q], d, sizeof mine);
    }
    step_done(c, s);
    return E_OK;
}

/* Every rank posts, then waits for everyone's post (a barrier inside a collective). */
static int sync_step(call *k, uint32_t sig, uint64_t size) {
    comm *c = k->c;
    uint64_t s = c->step++;
    TRY(slot_acquire(k, s));
    slot_post(c, s, sig, size);
    for (int q = 0; q < c->size; q++) {
        const uint8_t *d;
        if (q != c->rank) TRY(slot_wait(k, q, s, sig, size, &d));
    }
    step_done(c, s);
    return E_OK;
}

static uint8_t *scratch(call *k) {
    if (!k->c->scratch) k->c->scratch = aligned_alloc(LINE, DIRECT_PIECE);
    if (!k->c->scratch) fail(k, E_SYS, k->c->rank, "out of memory for %d bytes", DIRECT_PIECE);
    return k->c->scratch;
}

/* Slice r of the result is reduced by rank r from every rank's input (its own first, then
 * the others' in rank order, read directly), and written straight into every rank's
 * output while it is hot in L2: reduce-scatter and all-gather in one pass. In place is
 * safe: rank r reads and writes only slice r of its peers' buffers, piece by piece. */
static int allreduce_direct(call *k, const uint8_t *src, uint8_t *dst, size_t n, int dt, int op,
                            uint32_t sig) {
    comm *c = k->c;
    int P = c->size, me = c->rank;
    size_t es = dtype_size[dt], align = LINE / es;
    size_t slice = ((n + P - 1) / P + align - 1) / align * align;
    #define LO(r) ((size_t)(r) * slice < n ? (size_t)(r) * slice : n)
    #define HI(r) ((size_t)((r) + 1) * slice < n ? (size_t)((r) + 1) * slice : n)
    addresses all[P];
    uint8_t *tmp = scratch(k);
    if (!tmp) return E_SYS;
    TRY(share_addresses(k, sig, n, src, dst, all));
    size_t piece = DIRECT_PIECE / es / (P - 1) / align * align;
    for (size_t i = LO(me); i < HI(me); i += piece) {
        size_t m = HI(me) - i < piece ? HI(me) - i : piece;
        const void *srcs[P];
        srcs[0] = src + i * es;
        for (int q = 0, j = 1; q < P; q++) {
            if (q == me) continue;
            uint8_t *to = tmp + (size_t)(j - 1) * piece * es;
            TRY(peer_read(k, q, to, all[q].src + i * es, m * es));
            srcs[j++] = to;
        }
        reducers[dt][op](dst + i * es, NULL, srcs, P, m);
        for (int q = 0; q < P; q++)  /* the piece is hot in L2: hand it out now */
            if (q != me) TRY(peer_copy(k, q, dst + i * es, all[q].dst + i * es, m * es, 1));
    }
    #undef LO
    #undef HI
    return sync_step(k, sig, n);                /* every slice everywhere, no reads left */
}

static int do_allreduce(call *k, const void *src, void *dst, size_t n, int dt, int op, int root,
                        int algo, size_t oneshot_max) {
    comm *c = k->c;
    size_t nbytes = n * dtype_size[dt];
    if (c->size == 1) {
        if (dst && dst != src) memcpy(dst, src, nbytes);
        return E_OK;
    }
    uint32_t sig = signature(root < 0 ? K_ALLREDUCE : K_REDUCE, dt, op, root);
    if (root < 0 && c->direct_min && (algo == ALGO_DIRECT || (algo == ALGO_AUTO && nbytes >= c->direct_min)))
        return allreduce_direct(k, src, dst, n, dt, op, sig);
    int oneshot = algo == ALGO_ONESHOT || (algo == ALGO_AUTO && nbytes <= oneshot_max);
    if (oneshot && nbytes <= c->hdr->slot_bytes)
        return allreduce_oneshot(k, src, dst, n, dt, op, root, sig);
    return allreduce_twoshot(k, src, dst, n, dt, op, root, sig);
}

/* Chunks of the root's buffer through its slots. In the first step the other ranks post an
 * empty header that the root checks, so ranks that disagree on the root are caught. */
static int do_broadcast(call *k, uint8_t *buf, size_t nbytes, int root) {
    comm *c = k->c;
    uint32_t sig = signature(K_BCAST, D_U8, 0, root);
    size_t chunk = c->hdr->slot_bytes;
    if (c->direct_min && nbytes >= c->direct_min) {
        addresses all[c->size];
        TRY(share_addresses(k, sig, nbytes, buf, buf, all));
        if (c->rank != root) TRY(peer_read(k, root, buf, all[root].src, nbytes));
        return sync_step(k, sig, nbytes);
    }
    for (size_t off = 0; off < nbytes; off += chunk) {
        size_t m = nbytes - off < chunk ? nbytes - off : chunk;
        uint64_t s = c->step++;
        const uint8_t *d;
        if (c->rank == root || off == 0) TRY(slot_acquire(k, s));
        if (c->rank == root) {
            memcpy(payload(slot(c, root, s)), buf + off, m);
            slot_post(c, s, sig, nbytes);
            for (int q = 0; q < c->size && off == 0; q++)
                if (q != root) TRY(slot_wait(k, q, s, sig, nbytes, &d));
        } else {
            if (off == 0) slot_post(c, s, sig, nbytes);
            TRY(slot_wait(k, root, s, sig, nbytes, &d));
            memcpy(buf + off, d, m);
        }
        step_done(c, s);
    }
    return E_OK;
}

/* Everyone's contribution (bytes[r] from rank r) to everyone, concatenated in rank order. */
static int do_allgatherv(call *k, const uint8_t *src, uint8_t *dst, const size_t *bytes) {
    comm *c = k->c;
    int P = c->size, me = c->rank;
    size_t total = 0, most = 0, chunk = c->hdr->slot_bytes, off[P];
    for (int q = 0; q < P; q++) {
        off[q] = total;
        total += bytes[q];
        if (bytes[q] > most) most = bytes[q];
    }
    uint32_t sig = signature(K_ALLGATHER, D_U8, 0, -1);
    if (dst + off[me] != src) memmove(dst + off[me], src, bytes[me]);
    src = dst + off[me];
    if (c->direct_min && total / P >= c->direct_min) {
        addresses all[P];
        TRY(share_addresses(k, sig, total, src, dst, all));
        for (int q = 0; q < P; q++)
            if (q != me) TRY(peer_read(k, q, dst + off[q], all[q].src, bytes[q]));
        return sync_step(k, sig, total);
    }
    for (size_t lo = 0; lo < most; lo += chunk) {
        uint64_t s = c->step++;
        TRY(slot_acquire(k, s));
        if (lo < bytes[me]) {
            size_t m = bytes[me] - lo < chunk ? bytes[me] - lo : chunk;
            memcpy(payload(slot(c, me, s)), src + lo, m);
        }
        slot_post(c, s, sig, total);
        for (int q = 0; q < P; q++) {
            if (q == me || lo >= bytes[q]) continue;
            size_t m = bytes[q] - lo < chunk ? bytes[q] - lo : chunk;
            const uint8_t *d;
            TRY(slot_wait(k, q, s, sig, total, &d));
            memcpy(dst + off[q] + lo, d, m);
        }
        step_done(c, s);
    }
    return E_OK;
}

/* The slot split in P regions, one per destination rank (reduce-scatter, all-to-all). */
static size_t region_bytes(comm *c) { return c->hdr->slot_bytes / c->size / LINE * LINE; }

/* Rank r receives the reduction of segment r (counts[r] elements, segments in rank order). */
static int do_reduce_scatterv(call *k, const uint8_t *src, uint8_t *dst, const size_t *counts,
                              int dt, int op) {
    comm *c = k->c;
    int P = c->size, me = c->rank;
    size_t es = dtype_size[dt], region = region_bytes(c) / es, total = 0, most = 0, off[P];
    for (int q = 0; q < P; q++) {
        off[q] = total;
        total += counts[q];
        if (counts[q] > most) most = counts[q];
    }
    uint32_t sig = signature(K_REDUCE_SCATTER, dt, op, -1);
    if (P == 1) {
        if (dst != src) memmove(dst, src, total * es);
        return E_OK;
    }
    for (size_t lo = 0; lo < most; lo += region) {
        uint64_t s = c->step++;
        TRY(slot_acquire(k, s));
        uint8_t *mine = payload(slot(c, me, s));
        for (int q = 0; q < P; q++) {
            if (q == me || lo >= counts[q]) continue;
            size_t m = counts[q] - lo < region ? counts[q] - lo : region;
            memcpy(mine + (size_t)q * region * es, src + (off[q] + lo) * es, m * es);
        }
        slot_post(c, s, sig, total);
        if (lo < counts[me]) {
            size_t m = counts[me] - lo < region ? counts[me] - lo : region;
            const void *srcs[P];
            srcs[0] = src + (off[me] + lo) * es;
            for (int q = 0, j = 1; q < P; q++) {
                if (q == me) continue;
                const uint8_t *d;
                TRY(slot_wait(k, q, s, sig, total, &d));
                srcs[j++] = d + (size_t)me * region * es;
            }
            reducers[dt][op](dst + lo * es, NULL, srcs, P, m);
        }
        step_done(c, s);
    }
    return E_OK;
}

/* bytes[i * P + j]: what rank i sends rank j; blocks packed in rank order on both sides. */
static int do_alltoallv(call *k, const uint8_t *src, uint8_t *dst, const size_t *bytes) {
    comm *c = k->c;
    int P = c->size, me = c->rank;
    size_t region = region_bytes(c), most = 0, soff[P], roff[P], so = 0, ro = 0, total = 0;
    for (int q = 0; q < P; q++) {
        soff[q] = so; so += bytes[me * P + q];
        roff[q] = ro; ro += bytes[q * P + me];
    }
    for (int i = 0; i < P * P; i++) {
        total += bytes[i];
        if (i / P != i % P && bytes[i] > most) most = bytes[i];
    }
    uint32_t sig = signature(K_ALLTOALL, D_U8, 0, -1);
    memmove(dst + roff[me], src + soff[me], bytes[me * P + me]);
    if (c->direct_min && total / P >= c->direct_min) {
        addresses all[P];
        TRY(share_addresses(k, sig, total, src, dst, all));
        for (int q = 0; q < P; q++) {
            size_t from = 0;  /* where q's block for me starts in q's input */
            for (int j = 0; j < me; j++) from += bytes[q * P + j];
            if (q != me) TRY(peer_read(k, q, dst + roff[q], all[q].src + from, bytes[q * P + me]));
        }
        return sync_step(k, sig, total);
    }
    for (size_t lo = 0; lo < most; lo += region) {
        uint64_t s = c->step++;
        TRY(slot_acquire(k, s));
        uint8_t *mine = payload(slot(c, me, s));
        for (int q = 0; q < P; q++) {
            size_t b = bytes[me * P + q];
            if (q == me || lo >= b) continue;
            memcpy(mine + (size_t)q * region, src + soff[q] + lo, b - lo < region ? b - lo : region);
        }
        slot_post(c, s, sig, total);
        for (int q = 0; q < P; q++) {
            size_t b = bytes[q * P + me];
            if (q == me || lo >= b) continue;
            const uint8_t *d;
            TRY(slot_wait(k, q, s, sig, total, &d));
            memcpy(dst + roff[q] + lo, d + (size_t)me * region, b - lo < region ? b - lo : region);
        }
        step_done(c, s);
    }
    return E_OK;
}

/* All-to-all when each rank knows only what it sends and receives (no count exchange):
 * ranks publish their input's address and per-destination byte counts, and every rank
 * reads its blocks straight from its peers' inputs, checking each count against its own. */
static int do_alltoallv_pairs(call *k, const uint8_t *src, uint8_t *dst, const size_t *sends,
                              const size_t *recvs) {
    comm *c = k->c;
    int P = c->size, me = c->rank;
    uint32_t sig = signature(K_ALLTOALLV, D_U8, 0, -1);
    /* the slot: [input address, bytes to each rank] then one region per destination, in
     * which blocks below direct_min travel (both sides know a block's size) */
    size_t head = ((size_t)(1 + P) * 8 + LINE - 1) / LINE * LINE;
    size_t region = (c->hdr->slot_bytes - head) / P / LINE * LINE;
    #define INLINE(b) ((b) < c->direct_min && (b) <= region)
    size_t soff = 0, roff = 0;
    uint64_t s = c->step++;
    TRY(slot_acquire(k, s));
    uint8_t *mine = payload(slot(c, me, s));
    uint64_t *words = (uint64_t *)mine;
    words[0] = (uint64_t)(uintptr_t)src;
    size_t off = 0;
    for (int q = 0; q < P; q++) {
        words[1 + q] = sends[q];
        if (q == me) soff = off;
        else if (INLINE(sends[q])) memcpy(mine + head + (size_t)q * region, src + off, sends[q]);
        off += sends[q];
    }
    slot_post(c, s, sig, (uint64_t)P);
    for (int q = 0; q < P; q++) {
        if (q == me) {
            memmove(dst + roff, src + soff, sends[me]);
        } else {
            const uint8_t *d;
            TRY(slot_wait(k, q, s, sig, (uint64_t)P, &d));
            const uint64_t *theirs = (const uint64_t *)d;
            if (theirs[1 + me] != recvs[q]) {
                fail(k, E_MISMATCH, q, "alltoallv mismatch: rank %d sends %llu bytes to rank %d, "
                     "which expects %zu", q, (unsigned long long)theirs[1 + me], me, recvs[q]);
                comm_abort(c, k->err);
                return E_MISMATCH;
            }
            if (INLINE(recvs[q])) {
                memcpy(dst + roff, d + head + (size_t)me * region, recvs[q]);
            } else {
                uint64_t from = theirs[0];
                for (int j = 0; j < me; j++) from += theirs[1 + j];
                TRY(peer_read(k, q, dst + roff, from, recvs[q]));
            }
        }
        roff += recvs[q];
    }
    #undef INLINE
    step_done(c, s);
    return sync_step(k, sig, (uint64_t)P);  /* nobody reads my input any more */
}

static int do_barrier(call *k) { return sync_step(k, signature(K_BARRIER, D_U8, 0, -1), 0); }

/* ------------------------------------------------------------------------ point to point */

static inline slot_header *p2p_buf(comm *c, int src, int dst, uint64_t piece) {
    size_t idx = ((size_t)src * c->size + dst) * c->hdr->nbuf + piece % c->hdr->nbuf;
    return (slot_header *)(c->p2p + idx * c->p2p_stride);
}

/* Messages between a pair arrive in order; the tag and size are checked, not matched. */
static int do_send(call *k, const uint8_t *src, size_t nbytes, int dst, uint32_t tag) {
    comm *c = k->c;
    size_t chunk = c->hdr->p2p_bytes, off = 0;
    do {
        uint64_t piece = c->sent[dst];
        if (piece >= c->hdr->nbuf)
            TRY(wait_ge(k, &c->p2p_recvd[c->rank * c->size + dst].v, piece - c->hdr->nbuf + 1, dst));
        slot_header *h = p2p_buf(c, c->rank, dst, piece);
        size_t m = nbytes - off < chunk ? nbytes - off : chunk;
        memcpy(payload(h), src + off, m);
        h->sig = tag;
        h->size = nbytes;
        store_rel(&h->step1, piece + 1);
        c->sent[dst] = piece + 1;
        off += m;
    } while (off < nbytes);
    return E_OK;
}

static int do_recv(call *k, uint8_t *dst, size_t nbytes, int src, uint32_t tag) {
    comm *c = k->c;
    size_t chunk = c->hdr->p2p_bytes, off = 0;
    do {
        uint64_t piece = c->recvd[src];
        slot_header *h = p2p_buf(c, src, c->rank, piece);
        TRY(wait_ge(k, &h->step1, piece + 1, src));
        if (h->sig != tag || h->size != nbytes) {
            fail(k, E_MISMATCH, src, "recv mismatch: this rank (%d) expects %zu bytes with tag %u "
                 "from rank %d, which sent %llu bytes with tag %u", c->rank, nbytes, tag, src,
                 (unsigned long long)h->size, h->sig);
            comm_abort(c, k->err);
            return E_MISMATCH;
        }
        size_t m = nbytes - off < chunk ? nbytes - off : chunk;
        memcpy(dst + off, payload(h), m);
        c->recvd[src] = piece + 1;
        store_rel(&c->p2p_recvd[src * c->size + c->rank].v, piece + 1);
        off += m;
    } while (off < nbytes);
    return E_OK;
}

/* ------------------------------------------------------------------------------ segments */

static size_t align_up(size_t x) { return (x + 4095) / 4096 * 4096; }

typedef struct { size_t ranks, p2p_lines, slots, p2p, total; } layout;

static layout plan(size_t size, size_t slot_bytes, size_t nslots, size_t p2p_bytes, size_t nbuf) {
    layout l;
    size_t slot_stride = HDR_BYTES + slot_bytes, p2p_stride = HDR_BYTES + p2p_bytes;
    l.ranks = align_up(sizeof(seg_header));
    l.p2p_lines = l.ranks + align_up(size * sizeof(rank_lines));
    l.slots = l.p2p_lines + align_up(size * size * sizeof(line_t));
    l.p2p = l.slots + align_up(size * nslots * slot_stride);
    l.total = l.p2p + align_up(size * size * nbuf * p2p_stride);
    return l;
}

static void comm_free(comm *c) {
    if (c->base) munmap(c->base, c->map_bytes);
    free(c->seen_done);
    free(c->sent);
    free(c->recvd);
    free(c->scratch);
    free(c);
}

static void capsule_free(PyObject *cap) {
    comm *c = PyCapsule_GetPointer(cap, "tessera.shm");
    if (c) comm_free(c);
}

static comm *get_comm(PyObject *cap) { return PyCapsule_GetPointer(cap, "tessera.shm"); }

static PyObject *os_error(const char *what, const char *name) {
    return PyErr_Format(PyExc_OSError, "%s %s: %s", what, name, strerror(errno));
}

/* create(name, size, rank, slot_bytes, nslots, p2p_bytes, nbuf, timeout_s, spin_s): rank 0 creates
 * the segment (mode 0600), the others attach to it; every rank registers its pid. */
static PyObject *py_create(PyObject *self, PyObject *args) {
    const char *name;
    int size, rank;
    Py_ssize_t slot_bytes, nslots, p2p_bytes, nbuf;
    double timeout, spin;
    if (!PyArg_ParseTuple(args, "siinnnndd", &name, &size, &rank, &slot_bytes, &nslots, &p2p_bytes,
                          &nbuf, &timeout, &spin))
        return NULL;
    if (size < 1 || rank < 0 || rank >= size || slot_bytes < 4096 || slot_bytes % LINE || nslots < 2 ||
        p2p_bytes < LINE || p2p_bytes % LINE || nbuf < 1)
        return PyErr_Format(PyExc_ValueError, "bad shared-memory layout");
    layout l = plan(size, slot_bytes, nslots, p2p_bytes, nbuf);
    int fd = rank == 0 ? shm_open(name, O_CREAT | O_EXCL | O_RDWR, 0600) : shm_open(name, O_RDWR, 0);
    if (fd < 0) return os_error(rank == 0 ? "cannot create shared memory" : "cannot open shared memory", name);
    if (rank == 0) {
        int e = ftruncate(fd, (off_t)l.total) ? errno : posix_fallocate(fd, 0, (off_t)l.total);
        if (e) {
            close(fd);
            shm_unlink(name);
            errno = e;
            return PyErr_Format(PyExc_OSError, "cannot reserve %zu bytes of shared memory for %s: %s",
                                l.total, name, strerror(e));
        }
    } else {
        struct stat st;
        if (fstat(fd, &st) || (size_t)st.st_size != l.total) {
            close(fd);
            return PyErr_Format(PyExc_OSError, "shared memory %s has %lld bytes, expected %zu "
                                "(ranks disagree on the layout)", name, (long long)st.st_size, l.total);
        }
    }
    void *base = mmap(NULL, l.total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (base == MAP_FAILED) {
        if (rank == 0) shm_unlink(name);
        return os_error("cannot map shared memory", name);
    }
    comm *c = calloc(1, sizeof *c);
    c->base = base;
    c->map_bytes = l.total;
    c->hdr = base;
    c->ranks = (rank_lines *)((uint8_t *)base + l.ranks);
    c->p2p_recvd = (line_t *)((uint8_t *)base + l.p2p_lines);
    c->slots = (uint8_t *)base + l.slots;
    c->p2p = (uint8_t *)base + l.p2p;
    c->slot_stride = HDR_BYTES + slot_bytes;
    c->p2p_stride = HDR_BYTES + p2p_bytes;
    c->rank = rank;
    c->size = size;
    c->timeout_ns = (int64_t)(timeout * 1e9);
    c->spin_ns = (int64_t)(spin * 1e9);
    c->seen_done = calloc(size, sizeof(uint64_t));
    c->sent = calloc(size, sizeof(uint64_t));
    c->recvd = calloc(size, sizeof(uint64_t));
    seg_header *h = c->hdr;
    if (rank == 0) {
        h->total_bytes = l.total; h->slot_bytes = slot_bytes; h->nslots = nslots;
        h->p2p_bytes = p2p_bytes; h->nbuf = nbuf; h->size = size; h->version = 1;
        __atomic_store_n(&h->magic, MAGIC, __ATOMIC_RELEASE);
    } else if (__atomic_load_n(&h->magic, __ATOMIC_ACQUIRE) != MAGIC || h->size != (uint32_t)size ||
               h->slot_bytes != (uint64_t)slot_bytes || h->nslots != (uint64_t)nslots ||
               h->p2p_bytes != (uint64_t)p2p_bytes || h->nbuf != (uint64_t)nbuf) {
        comm_free(c);
        return PyErr_Format(PyExc_OSError, "shared memory %s was not made by this job's rank 0 "
                            "or with another layout", name);
    }
    c->ranks[rank].pid = getpid();
    return PyCapsule_New(c, "tessera.shm", capsule_free);
}

/* ------------------------------------------------------------------------ Python binding */

static PyObject *CommError, *TimeoutError_, *MismatchError, *AbortedError;

/* A buffer: an object with the buffer protocol, or an address (int). */
typedef struct { Py_buffer view; int has_view; void *ptr; } buf;

static int get_buf(PyObject *o, buf *b, size_t need, int writable, const char *what) {
    b->has_view = 0;
    if (o == Py_None) { b->ptr = NULL; return 0; }
    if (PyLong_Check(o)) {
        b->ptr = PyLong_AsVoidPtr(o);
        return PyErr_Occurred() ? -1 : 0;
    }
    if (PyObject_GetBuffer(o, &b->view, writable ? PyBUF_WRITABLE | PyBUF_ANY_CONTIGUOUS : PyBUF_ANY_CONTIGUOUS))
        return -1;
    b->has_view = 1;
    b->ptr = b->view.buf;
    if ((size_t)b->view.len < need) {
        PyErr_Format(PyExc_ValueError, "%s buffer has %zd bytes, needs %zu", what, b->view.len, need);
        PyBuffer_Release(&b->view);
        b->has_view = 0;
        return -1;
    }
    return 0;
}

static void put_buf(buf *b) { if (b->has_view) PyBuffer_Release(&b->view); }

/* Finish a call: take the GIL back and turn an error code into an exception. */
static PyObject *finish(call *k, int e) {
    if (k->entered) __atomic_store_n(&k->c->busy, 0, __ATOMIC_RELEASE);
    if (k->ts) PyEval_RestoreThread(k->ts);
    if (!e) Py_RETURN_NONE;
    PyObject *type = e == E_TIMEOUT || e == E_DEAD ? TimeoutError_ : e == E_MISMATCH ? MismatchError
                   : e == E_ABORTED ? AbortedError : CommError;
    PyObject *exc = Py_BuildValue("(sii)", k->err, k->err_rank, e);
    if (exc) { PyErr_SetObject(type, exc); Py_DECREF(exc); }
    return NULL;
}

static int parse_sizes(PyObject *seq, size_t *out, Py_ssize_t n, size_t scale) {
    PyObject *fast = PySequence_Fast(seq, "sizes must be a sequence");
    if (!fast) return -1;
    if (PySequence_Fast_GET_SIZE(fast) != n) {
        Py_DECREF(fast);
        PyErr_Format(PyExc_ValueError, "expected %zd sizes", n);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long long v = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(fast, i));
        if (v < 0) {
            Py_DECREF(fast);
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "sizes must be >= 0");
            return -1;
        }
        out[i] = (size_t)v * scale;
    }
    Py_DECREF(fast);
    return 0;
}

#define BIG (256 << 10) /* release the GIL for the whole call from this many bytes */

static int check_types(comm *c, int dt, int op) {
    if (!c) return -1;
    if (dt < 0 || dt >= N_DTYPES || op < 0 || op >= N_OPS) {
        PyErr_SetString(PyExc_ValueError, "bad dtype or op code");
        return -1;
    }
    return 0;
}

/* allreduce(comm, algo, oneshot_max, src, dst, count, dtype, op, root); root -1: all */
static PyObject *py_allreduce(PyObject *self, PyObject *const *a, Py_ssize_t na) {
    if (na != 9) return PyErr_Format(PyExc_TypeError, "allreduce takes 9 arguments");
    comm *c = get_comm(a[0]);
    int algo = PyLong_AsLong(a[1]);
    Py_ssize_t oneshot_max = PyLong_AsSsize_t(a[2]);
    Py_ssize_t n = PyLong_AsSsize_t(a[5]);
    int dt = PyLong_AsLong(a[6]), op = PyLong_AsLong(a[7]), root = PyLong_AsLong(a[8]);
    if (PyErr_Occurred() || check_types(c, dt, op)) return NULL;
    size_t nbytes = (size_t)n * dtype_size[dt];
    buf s, d;
    if (get_buf(a[3], &s, nbytes, 0, "input")) return NULL;
    if (get_buf(a[4], &d, nbytes, 1, "output")) { put_buf(&s); return NULL; }
    call k = {c, NULL, -1, 0, ""};
    enter(&k);
    if (nbytes >= BIG) release_gil(&k);
    int e = do_allreduce(&k, s.ptr, d.ptr, (size_t)n, dt, op, root, algo, (size_t)oneshot_max);
    PyObject *r = finish(&k, e);
    put_buf(&s);
    put_buf(&d);
    return r;
}

/* The transport's dtype of a buffer's struct format (numpy arrays), or -1. */
static int format_dtype(const Py_buffer *v) {
    const char *f = v->format ? v->format : "B";
    if (*f == '@' || *f == '=' || *f == '<') f++;
    if (f[0] && f[1]) return -1;
    switch (f[0]) {
    case 'f': return D_F32;
    case 'e': return D_F16;
    case 'd': return D_F64;
    case 'B': return D_U8;
    case 'i': case 'l': case 'q': return v->itemsize == 4 ? D_I32 : v->itemsize == 8 ? D_I64 : -1;
    }
    return -1;
}

static PyObject *Unsupported;

/* The two buffers of a microsecond path: C-contiguous (numpy arrays), one supported
 * format, one size. Their dtype, or -1 with Unsupported raised: the caller takes the
 * general path, which copies, checks or explains. */
static int array_pair(PyObject *src, PyObject *dst, Py_buffer *s, Py_buffer *d) {
    if (PyObject_GetBuffer(src, s, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT)) {
        PyErr_Clear();
    } else if (PyObject_GetBuffer(dst, d, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE)) {
        PyErr_Clear();
        PyBuffer_Release(s);
    } else {
        int dt = format_dtype(s);
        if (dt >= 0 && dt == format_dtype(d) && s->len == d->len) return dt;
        PyBuffer_Release(s);
        PyBuffer_Release(d);
    }
    PyErr_SetNone(Unsupported);
    return -1;
}

/* allreduce_arrays(comm, algo, oneshot_max, src, dst, op): allreduce of an array pair. */
static PyObject *py_allreduce_arrays(PyObject *self, PyObject *const *a, Py_ssize_t na) {
    if (na != 6) return PyErr_Format(PyExc_TypeError, "allreduce_arrays takes 6 arguments");
    comm *c = get_comm(a[0]);
    int algo = PyLong_AsLong(a[1]), op = PyLong_AsLong(a[5]);
    Py_ssize_t oneshot_max = PyLong_AsSsize_t(a[2]);
    if (!c || PyErr_Occurred()) return NULL;
    if (op < 0 || op >= N_OPS) return PyErr_Format(PyExc_ValueError, "bad op code");
    Py_buffer s, d;
    int dt = array_pair(a[3], a[4], &s, &d);
    if (dt < 0) return NULL;
    call k = {c, NULL, -1, 0, ""};
    enter(&k);
    if (s.len >= BIG) release_gil(&k);
    PyObject *r = finish(&k, do_allreduce(&k, s.buf, d.buf, (size_t)s.len / dtype_size[dt], dt,
                                          op, -1, algo, (size_t)oneshot_max));
    PyBuffer_Release(&s);
    PyBuffer_Release(&d);
    return r;
}

/* alltoall_arrays(comm, src, dst): equal blocks between an array pair that does not
 * overlap (Unsupported otherwise). */
static PyObject *py_alltoall_arrays(PyObject *self, PyObject *const *a, Py_ssize_t na) {
    if (na != 3) return PyErr_Format(PyExc_TypeError, "alltoall_arrays takes 3 arguments");
    comm *c = get_comm(a[0]);
    if (!c) return NULL;
    Py_buffer s, d;
    if (array_pair(a[1], a[2], &s, &d) < 0) return NULL;
    const uint8_t *sb = s.buf, *db = d.buf;
    int P = c->size;
    size_t *bytes = NULL;
    PyObject *r = NULL;
    if (s.len % P || (sb < db + d.len && db < sb + s.len)) {
        PyErr_SetNone(Unsupported);
    } else if (!(bytes = PyMem_Malloc(sizeof(size_t) * P * P))) {
        PyErr_NoMemory();
    } else {
        for (int i = 0; i < P * P; i++) bytes[i] = (size_t)s.len / P;
        call k = {c, NULL, -1, 0, ""};
        enter(&k);
        if ((size_t)s.len >= BIG) release_gil(&k);
        r = finish(&k, do_alltoallv(&k, s.buf, d.buf, bytes));
    }
    PyMem_Free(bytes);
    PyBuffer_Release(&s);
    PyBuffer_Release(&d);
    return r;
}

/* broadcast(comm, buf, nbytes, root) */
static PyObject *py_broadcast(PyObject *self, PyObject *const *a, Py_ssize_t na) {
    if (na != 4) return PyErr_Format(PyExc_TypeError, "broadcast takes 4 arguments");
    comm *c = get_comm(a[0]);
    Py_ssize_t n = PyLong_AsSsize_t(a[2]);
    int root = PyLong_AsLong(a[3]);
    if (!c || PyErr_Occurred()) return NULL;
    buf b;
    if (get_buf(a[1], &b, (size_t)n, 1, "broadcast")) return NULL;
    call k = {c, NULL, -1, 0, ""};
    enter(&k);
    if ((size_t)n >= BIG) release_gil(&k);
    int e = c->size == 1 ? E_OK : do_broadcast(&k, b.ptr, (size_t)n, root);
    PyObject *r = finish(&k, e);
    put_buf(&b);
    return r;
}

/* allgatherv(comm, src, dst, bytes_per_rank) */
static PyObject *py_allgatherv(PyObject *self, PyObject *const *a, Py_ssize_t na) {
    if (na != 4) return PyErr_Format(PyExc_TypeError, "allgatherv takes 4 arguments");
    comm *c = get_comm(a[0]);
    if (!c) return NULL;
    size_t bytes[c->size], total = 0;
    if (parse_sizes(a[3], bytes, c->size, 1)) return NULL;
    for (int q = 0; q < c->size; q++) total += bytes[q];
    buf s, d;
    if (get_buf(a[1], &s, bytes[c->rank], 0, "input")) return NULL;
    if (get_buf(a[2], &d, total, 1, "output")) { put_buf(&s); return NULL; }
    call k = {c, NULL, -1, 0, ""};
    enter(&k);
    if (total >= BIG) release_gil(&k);
    int e = do_allgatherv(&k, s.ptr, d.ptr, bytes);
    PyObject *r = finish(&k, e);
    put_buf(&s);
    put_buf(&d);
    return r;
}

/* reduce_scatterv(comm, src, dst, counts_per_rank, dtype, op) */
static PyObject *py_reduce_scatterv(PyObject *self, PyObject *const *a, Py_ssize_t na) {
    if (na != 6) return PyErr_Format(PyExc_TypeError, "reduce_scatterv takes 6 arguments");
    comm *c = get_comm(a[0]);
    int dt = PyLong_AsLong(a[4]), op = PyLong_AsLong(a[5]);
    if (PyErr_Occurred() || check_types(c, dt, op)) return NULL;
    size_t counts[c->size], total = 0;
    if (parse_sizes(a[3], counts, c->size, 1)) return NULL;
    for (int q = 0; q < c->size; q++) total += counts[q];
    buf s, d;
    if (get_buf(a[1], &s, total * dtype_size[dt], 0, "input")) return NULL;
    if (get_buf(a[2], &d, counts[c->rank] * dtype_size[dt], 1, "output")) { put_buf(&s); return NULL; }
    call k = {c, NULL, -1, 0, ""};
    enter(&k);
    if (total * dtype_size[dt] >= BIG) release_gil(&k);
    int e = do_reduce_scatterv(&k, s.ptr, d.ptr, counts, dt, op);
    PyObject *r = finish(&k, e);
    put_buf(&s);
    put_buf(&d);
    return r;
}

/* alltoallv(comm, src, dst, bytes_matrix (P*P, row = sender)) */
static PyObject *py_alltoallv(PyObject *self, PyObject *const *a, Py_ssize_t na) {
    if (na != 4) return PyErr_Format(PyExc_TypeError, "alltoallv takes 4 arguments");
    comm *c = get_comm(a[0]);
    if (!c) return NULL;
    int P = c->size;
    size_t *bytes = PyMem_Malloc(sizeof(size_t) * P * P), sent = 0, got = 0;
    if (!bytes) return PyErr_NoMemory();
    if (parse_sizes(a[3], bytes, (Py_ssize_t)P * P, 1)) { PyMem_Free(bytes); return NULL; }
    for (int q = 0; q < P; q++) { sent += bytes[c->rank * P + q]; got += bytes[q * P + c->rank]; }
    buf s, d;
    PyObject *r = NULL;
    if (!get_buf(a[1], &s, sent, 0, "input")) {
        if (!get_buf(a[2], &d, got, 1, "output")) {
            call k = {c, NULL, -1, 0, ""};
            enter(&k);
            if (sent + got >= BIG) release_gil(&k);
            r = finish(&k, do_alltoallv(&k, s.ptr, d.ptr, bytes));
            put_buf(&d);
        }
        put_buf(&s);
    }
    PyMem_Free(bytes);
    return r;
}

/* alltoallv_pairs(comm, src, dst, send_bytes_per_rank, recv_bytes_per_rank); needs
 * direct copies (enable_direct returned True). */
static PyObject *py_alltoallv_pairs(PyObject *self, PyObject *const *a, Py_ssize_t na) {
    if (na != 5) return PyErr_Format(PyExc_TypeError, "alltoallv_pairs takes 5 arguments");
    comm *c = get_comm(a[0]);
    if (!c) return NULL;
    if (!c->direct_min && c->size > 1)
        return PyErr_Format(PyExc_ValueError, "alltoallv_pairs needs direct copies");
    size_t sends[c->size], recvs[c->size], sent = 0, got = 0;
    if (parse_sizes(a[3], sends, c->size, 1) || parse_sizes(a[4], recvs, c->size, 1)) return NULL;
    for (int q = 0; q < c->size; q++) { sent += sends[q]; got += recvs[q]; }
    if (sends[c->rank] != recvs[c->rank])
        return PyErr_Format(PyExc_ValueError, "this rank sends itself %zu bytes but expects %zu",
                            sends[c->rank], recvs[c->rank]);
    buf s, d;
    PyObject *r = NULL;
    if (!get_buf(a[1], &s, sent, 0, "input")) {
        if (!get_buf(a[2], &d, got, 1, "output")) {
            call k = {c, NULL, -1, 0, ""};
            enter(&k);
            if (sent + got >= BIG) release_gil(&k);
            r = finish(&k, do_alltoallv_pairs(&k, s.ptr, d.ptr, sends, recvs));
            put_buf(&d);
        }
        put_buf(&s);
    }
    return r;
}

static PyObject *py_barrier(PyObject *self, PyObject *cap) {
    comm *c = get_comm(cap);
    if (!c) return NULL;
    call k = {c, NULL, -1, 0, ""};
    enter(&k);
    return finish(&k, c->size == 1 ? E_OK : do_barrier(&k));
}

/* send(comm, src, nbytes, dst, tag) / recv(comm, dst, nbytes, src, tag) */
static PyObject *p2p(PyObject *const *a, Py_ssize_t na, int sending) {
    if (na != 5) return PyErr_Format(PyExc_TypeError, "send/recv take 5 arguments");
    comm *c = get_comm(a[0]);
    Py_ssize_t n = PyLong_AsSsize_t(a[2]);
    int peer = PyLong_AsLong(a[3]);
    unsigned long tag = PyLong_AsUnsignedLong(a[4]);
    if (!c || PyErr_Occurred()) return NULL;
    if (peer < 0 || peer >= c->size || peer == c->rank)
        return PyErr_Format(PyExc_ValueError, "bad peer rank %d", peer);
    buf b;
    if (get_buf(a[1], &b, (size_t)n, !sending, sending ? "send" : "recv")) return NULL;
    call k = {c, NULL, -1, 0, ""};
    if ((size_t)n >= BIG) release_gil(&k);
    int e = sending ? do_send(&k, b.ptr, (size_t)n, peer, (uint32_t)tag)
                    : do_recv(&k, b.ptr, (size_t)n, peer, (uint32_t)tag);
    PyObject *r = finish(&k, e);
    put_buf(&b);
    return r;
}
static PyObject *py_send(PyObject *self, PyObject *const *a, Py_ssize_t na) { return p2p(a, na, 1); }
static PyObject *py_recv(PyObject *self, PyObject *const *a, Py_ssize_t na) { return p2p(a, na, 0); }

/* enable_direct(comm, min_bytes) -> bool: whether every rank can read every peer's memory
 * (process_vm_readv may be refused: ptrace policy, containers); if so, collectives of at
 * least min_bytes per rank copy directly. Collective. */
static PyObject *py_enable_direct(PyObject *self, PyObject *args) {
    PyObject *cap;
    Py_ssize_t min_bytes;
    if (!PyArg_ParseTuple(args, "On", &cap, &min_bytes)) return NULL;
    comm *c = get_comm(cap);
    if (!c) return NULL;
    call k = {c, NULL, -1, 0, ""};
    enter(&k);
    uint64_t token = 0x746573736572610aull ^ (uint64_t)c->rank;
    addresses all[c->size];
    int64_t mine[2] = {1, (int64_t)min_bytes}, agreed[2] = {1, (int64_t)min_bytes};
    int e = c->size == 1 ? E_OK : share_addresses(&k, signature(K_BARRIER, D_U8, 0, -1), 1, &token, NULL, all);
    for (int q = 0; q < c->size && !e; q++) {
        uint64_t seen = 0;
        struct iovec local = {&seen, sizeof seen}, remote = {(void *)(uintptr_t)all[q].src, sizeof seen};
        if (q != c->rank && (process_vm_readv((pid_t)c->ranks[q].pid, &local, 1, &remote, 1, 0) != sizeof seen ||
                             seen != (0x746573736572610aull ^ (uint64_t)q)))
            mine[0] = 0;
    }
    /* every rank must choose paths alike: the smallest threshold wins */
    if (!e) e = do_allreduce(&k, mine, agreed, 2, D_I64, OP_MIN, -1, ALGO_ONESHOT, 64);
    if (!e) e = sync_step(&k, signature(K_BARRIER, D_U8, 0, -1), 2); /* token read by all */
    PyObject *r = finish(&k, e);
    if (!r) return NULL;
    Py_DECREF(r);
    c->direct_min = agreed[0] && agreed[1] > 0 ? (size_t)agreed[1] : 0;
    return PyBool_FromLong(c->direct_min > 0);
}

/* direct_copies_allowed() -> bool: whether this process may read a child's memory with
 * process_vm_readv (what the kernel's ptrace policy allows between a job's ranks). */
static PyObject *py_direct_copies_allowed(PyObject *self, PyObject *unused) {
    volatile uint64_t token = 0x746573736572610aull;
    int ready[2];
    if (pipe(ready)) return os_error("cannot probe direct copies:", "pipe");
    pid_t child = fork();
    if (child == 0) {  /* the child only waits to be read, then exits */
        char byte;
        close(ready[1]);
        ssize_t got = read(ready[0], &byte, 1);
        _exit(got < 0);
    }
    close(ready[0]);
    if (child < 0) { close(ready[1]); return os_error("cannot probe direct copies:", "fork"); }
    uint64_t seen = 0;
    struct iovec local = {&seen, sizeof seen}, remote = {(void *)&token, sizeof seen};
    ssize_t got = process_vm_readv(child, &local, 1, &remote, 1, 0);
    close(ready[1]);
    waitpid(child, NULL, 0);
    return PyBool_FromLong(got == (ssize_t)sizeof seen && seen == token);
}

static PyObject *py_abort(PyObject *self, PyObject *args) {
    PyObject *cap;
    const char *msg;
    if (!PyArg_ParseTuple(args, "Os", &cap, &msg)) return NULL;
    comm *c = get_comm(cap);
    if (!c) return NULL;
    comm_abort(c, msg);
    Py_RETURN_NONE;
}

static PyObject *py_set_timeout(PyObject *self, PyObject *args) {
    PyObject *cap;
    double t;
    if (!PyArg_ParseTuple(args, "Od", &cap, &t)) return NULL;
    comm *c = get_comm(cap);
    if (!c) return NULL;
    c->timeout_ns = (int64_t)(t * 1e9);
    Py_RETURN_NONE;
}

/* info(comm) -> dict of the layout, for tools and tests. */
static PyObject *py_info(PyObject *self, PyObject *cap) {
    comm *c = get_comm(cap);
    if (!c) return NULL;
    return Py_BuildValue("{s:i,s:i,s:K,s:K,s:K,s:K,s:K,s:K,s:K}", "rank", c->rank, "size", c->size,
                         "bytes", (unsigned long long)c->map_bytes,
                         "slot_bytes", (unsigned long long)c->hdr->slot_bytes,
                         "nslots", (unsigned long long)c->hdr->nslots,
                         "p2p_bytes", (unsigned long long)c->hdr->p2p_bytes,
                         "nbuf", (unsigned long long)c->hdr->nbuf,
                         "step", (unsigned long long)c->step,
                         "aborted", (unsigned long long)c->hdr->abort_flag);
}

/* reduce(dst, srcs, dtype, op): the C reduction on local buffers (tests, hierarchical). */
static PyObject *py_reduce_local(PyObject *self, PyObject *const *a, Py_ssize_t na) {
    if (na != 5) return PyErr_Format(PyExc_TypeError, "reduce_local takes 5 arguments");
    int dt = PyLong_AsLong(a[3]), op = PyLong_AsLong(a[4]);
    Py_ssize_t n = PyLong_AsSsize_t(a[2]);
    if (PyErr_Occurred()) return NULL;
    if (dt < 0 || dt >= N_DTYPES || op < 0 || op >= N_OPS || n < 0)
        return PyErr_Format(PyExc_ValueError, "bad dtype, op or count");
    PyObject *fast = PySequence_Fast(a[1], "sources must be a sequence");
    if (!fast) return NULL;
    Py_ssize_t ns = PySequence_Fast_GET_SIZE(fast);
    if (ns < 2 || ns > 1024) { Py_DECREF(fast); return PyErr_Format(PyExc_ValueError, "2..1024 sources"); }
    size_t nbytes = (size_t)n * dtype_size[dt];
    buf bufs[ns + 1];
    const void *srcs[ns];
    int ok = 0, got = 0;
    if (!get_buf(a[0], &bufs[0], nbytes, 1, "output")) {
        got = 1;
        for (; got <= ns; got++) {
            if (get_buf(PySequence_Fast_GET_ITEM(fast, got - 1), &bufs[got], nbytes, 0, "source")) break;
            srcs[got - 1] = bufs[got].ptr;
        }
        ok = got == ns + 1;
    }
    if (ok) reducers[dt][op](bufs[0].ptr, NULL, srcs, (int)ns, (size_t)n);
    for (int i = 0; i < got; i++) put_buf(&bufs[i]);
    Py_DECREF(fast);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"create", py_create, METH_VARARGS, "create or attach a segment"},
    {"allreduce", (PyCFunction)(void (*)(void))py_allreduce, METH_FASTCALL, "allreduce or reduce"},
    {"allreduce_arrays", (PyCFunction)(void (*)(void))py_allreduce_arrays, METH_FASTCALL, "allreduce of two numpy arrays"},
    {"alltoall_arrays", (PyCFunction)(void (*)(void))py_alltoall_arrays, METH_FASTCALL, "alltoall of two numpy arrays"},
    {"broadcast", (PyCFunction)(void (*)(void))py_broadcast, METH_FASTCALL, "broadcast"},
    {"allgatherv", (PyCFunction)(void (*)(void))py_allgatherv, METH_FASTCALL, "allgatherv"},
    {"reduce_scatterv", (PyCFunction)(void (*)(void))py_reduce_scatterv, METH_FASTCALL, "reduce_scatterv"},
    {"alltoallv", (PyCFunction)(void (*)(void))py_alltoallv, METH_FASTCALL, "alltoallv"},
    {"alltoallv_pairs", (PyCFunction)(void (*)(void))py_alltoallv_pairs, METH_FASTCALL, "alltoallv without the count exchange"},
    {"send", (PyCFunction)(void (*)(void))py_send, METH_FASTCALL, "send"},
    {"recv", (PyCFunction)(void (*)(void))py_recv, METH_FASTCALL, "recv"},
    {"barrier", py_barrier, METH_O, "barrier"},
    {"abort", py_abort, METH_VARARGS, "abort the communicator for every rank"},
    {"enable_direct", py_enable_direct, METH_VARARGS, "probe and enable single-copy collectives"},
    {"direct_copies_allowed", py_direct_copies_allowed, METH_NOARGS, "may ranks read each other's memory"},
    {"set_timeout", py_set_timeout, METH_VARARGS, "set the wait timeout in seconds"},
    {"info", py_info, METH_O, "layout and state"},
    {"reduce_local", (PyCFunction)(void (*)(void))py_reduce_local, METH_FASTCALL, "local reduction"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_tsr_shm", NULL, -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__tsr_shm(void) {
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    CommError = PyErr_NewException("_tsr_shm.CommError", NULL, NULL);
    TimeoutError_ = PyErr_NewException("_tsr_shm.TimeoutError", CommError, NULL);
    MismatchError = PyErr_NewException("_tsr_shm.MismatchError", CommError, NULL);
    PyModule_AddObject(m, "CommError", CommError);
    PyModule_AddObject(m, "TimeoutError", TimeoutError_);
    PyModule_AddObject(m, "MismatchError", MismatchError);
    AbortedError = PyErr_NewException("_tsr_shm.AbortedError", CommError, NULL);
    PyModule_AddObject(m, "AbortedError", AbortedError);
    Unsupported = PyErr_NewException("_tsr_shm.Unsupported", NULL, NULL);
    PyModule_AddObject(m, "Unsupported", Unsupported);
    return m;
}
