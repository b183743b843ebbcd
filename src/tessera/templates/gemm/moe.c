/* MoE decode: a few tokens through their experts' SwiGLU MLPs in one launch.
 *
 * Appended to sgemm.c (one build per format of x and of the expert weights): it reuses
 * the skinny products' dot products (skinny_block), so each picked expert's weights are
 * streamed once, unpacked, at memory bandwidth. One launch does what fused_moe's grouped
 * path does in six: a counting sort of the choices by expert, the gather of x's rows,
 * silu(x @ gate) * (x @ up) for every picked expert, then @ down and the weighted combine
 * of each token's choices. Threads split the columns of each product (the intermediate
 * columns, then the hidden ones) over all the picked experts, so every thread streams an
 * share of the weights however the tokens are spread; a barrier separates the two
 * products, nothing else does. The down product runs in the build of down's format (its
 * tsr_moe_down, called through a pointer inside the same parallel region).
 */

#define MOE_GRAIN 65536  /* weight elements below which one thread does everything */
#define MOE_STRIP 256  /* columns per step of a row-major float B (whole cache lines) */

/* The launch's slots (each 8 bytes, see tsr_call): x [T, H] in this build's A format,
   the choices ids/weights [T, topk] (int64, float32), gate_up [E, H, 2I] = [gate | up]
   in this build's B format, down [E, I, H] in the format of the build whose tsr_moe_down
   is down_phase, out [T, H] in the C format of both builds. B's columns are contiguous
   (rs = 1, or quantized) or its rows are (cs = 1). flags [T] (int32, or NULL): a token
   whose flag is set refuses the whole launch (its routing is broken). *status: 0, -1 out
   of memory, -2 an id outside [0, E), -3 a flag set. */
typedef struct moe_plan moe_plan;
typedef struct {
    int64_t tokens, topk, experts, hidden, inter;
    const a_t *x;
    int64_t rsx, csx;
    const int64_t *ids;
    int64_t rsi, csi;
    const float *weights;
    int64_t rsw, csw;
    const int32_t *flags;
    tsr_b gate_up, down;
    c_t *out;
    int64_t rso, cso;
    int64_t (*down_phase)(const moe_plan *, int64_t, int);
    int64_t *status;
} tsr_moe;

/* What both products share: the choices sorted by expert (stable: token order within an
   expert) and the float32 buffers. */
struct moe_plan {
    const tsr_moe *s;
    int64_t hit;  /* experts some token picked */
    int64_t *expert, *first, *count;  /* per picked expert: id, first sorted row, rows */
    int64_t *row_of;  /* choice t * topk + j -> its sorted row */
    float *a;  /* x's rows in sorted order [T * topk, H] */
    float *act;  /* silu(gate) * up [T * topk, I] */
    float *scratch;  /* per thread: 2 * T * topk * MOE_STRIP floats */
};

/* Columns per step of a product with B: a block of whole dot products, or a strip. */
static int64_t moe_width(const tsr_b *b) {
    return !QUANTIZED && b->cs == 1 ? MOE_STRIP : COLS(1);
}

/* out[i][c] = A[i, :] . B[:, j0 + c] for m rows of A (float32, k columns, contiguous) and
   c < nj, rows of out ldo apart: skinny_block in steps of the columns its m rows take. */
static void moe_block(int64_t m, int64_t k, const float *a, const tsr_b *b, int64_t j0,
                      int64_t nj, float *out, int64_t ldo) {
    const int64_t step = !QUANTIZED && b->cs == 1 ? nj : COLS(m < 4 ? m : 4);
    for (int64_t j = 0; j < nj; j += step)
        skinny_block(m, k, a, k, b, j0 + j, nj - j < step ? nj - j : step, out + j, ldo);
}

/* Blocks of columns of a product with n columns. */
static int64_t moe_blocks(int64_t n, const tsr_b *b) {
    return (n + moe_width(b) - 1) / moe_width(b);
}

/* act = silu(a @ gate) * (a @ up) for every picked expert, block `blk` of the columns of
   act, with thread `thread`'s scratch. */
static void moe_gate_up(const moe_plan *p, int64_t blk, int thread) {
    const tsr_moe *s = p->s;
    const int64_t h = s->hidden, n = s->inter, rows = s->tokens * s->topk;
    const int64_t width = moe_width(&s->gate_up);
    const int64_t j0 = blk * width, nj = n - j0 < width ? n - j0 : width;
    float *gate = p->scratch + thread * 2 * rows * MOE_STRIP, *up = gate + rows * width;
    for (int64_t e = 0; e < p->hit; e++) {
        const tsr_b b = b_problem(&s->gate_up, p->expert[e]);
        const int64_t m = p->count[e], r0 = p->first[e];
        moe_block(m, h, p->a + r0 * h, &b, j0, nj, gate, width);
        moe_block(m, h, p->a + r0 * h, &b, n + j0, nj, up, width);
        for (int64_t i = 0; i < m; i++) {
            float *dst = p->act + (r0 + i) * n + j0;
            for (int64_t c = 0; c < nj; c++)
                dst[c] = tsr_silu(gate[i * width + c]) * up[i * width + c];
        }
    }
}

/* out[t] = sum over j of weights[t, j] * (act @ down)[row_of(t, j)], in float32 as
   combine_kernel sums, for block `blk` of the columns of out (blk < 0: the number of
   blocks). */
int64_t tsr_moe_down(const moe_plan *p, int64_t blk, int thread) {
    const tsr_moe *s = p->s;
    const int64_t h = s->hidden, n = s->inter, rows = s->tokens * s->topk;
    if (blk < 0) return moe_blocks(h, &s->down);
    const int64_t width = moe_width(&s->down);
    const int64_t j0 = blk * width, nj = h - j0 < width ? h - j0 : width;
    float *y = p->scratch + thread * 2 * rows * MOE_STRIP;
    for (int64_t e = 0; e < p->hit; e++) {
        const tsr_b b = b_problem(&s->down, p->expert[e]);
        moe_block(p->count[e], n, p->act + p->first[e] * n, &b, j0, nj,
                  y + p->first[e] * width, width);
    }
    for (int64_t t = 0; t < s->tokens; t++) {
        c_t *dst = s->out + t * s->rso + j0 * s->cso;
        for (int64_t c = 0; c < nj; c++) {
            float acc = 0.0f;
            for (int64_t j = 0; j < s->topk; j++)
                acc += s->weights[t * s->rsw + j * s->csw] *
                       y[p->row_of[t * s->topk + j] * width + c];
            dst[c * s->cso] = C_OUT(acc);
        }
    }
    return 0;
}

/* Sort the choices by expert (counting sort) and gather x's rows in that order, with
   buffers for `threads` threads. Returns 0 or the status of an error. */
static int moe_prepare(const tsr_moe *s, moe_plan *p, int threads) {
    const int64_t t = s->tokens, k = s->topk, e = s->experts, rows = t * k;
    memset(p, 0, sizeof *p);
    p->s = s;
    for (int64_t i = 0; s->flags && i < t; i++)
        if (s->flags[i]) return -3;
    int64_t *ints = malloc((size_t)(e + 4 * rows) * sizeof(int64_t));
    float *floats = malloc((size_t)(rows * (s->hidden + s->inter)
                                    + threads * 2 * rows * MOE_STRIP) * sizeof(float));
    p->row_of = ints;
    p->a = floats;
    if (!ints || !floats) return -1;
    int64_t *start = ints + rows;  /* per expert: its rows, then its next free row */
    p->expert = start + e;
    p->first = p->expert + rows;
    p->count = p->first + rows;
    p->act = floats + rows * s->hidden;
    p->scratch = p->act + rows * s->inter;
    memset(start, 0, (size_t)e * sizeof(int64_t));
    for (int64_t i = 0; i < t; i++)
        for (int64_t j = 0; j < k; j++) {
            const int64_t id = s->ids[i * s->rsi + j * s->csi];
            if (id < 0 || id >= e) return -2;
            start[id]++;
        }
    for (int64_t x = 0, run = 0; x < e; x++) {
        const int64_t n = start[x];
        if (n) {
            p->expert[p->hit] = x;
            p->first[p->hit] = run;
            p->count[p->hit++] = n;
        }
        start[x] = run;
        run += n;
    }
    for (int64_t i = 0; i < t; i++)
        for (int64_t j = 0; j < k; j++) {
            const int64_t r = start[s->ids[i * s->rsi + j * s->csi]]++;
            p->row_of[i * k + j] = r;
            for (int64_t c = 0; c < s->hidden; c++)
                p->a[r * s->hidden + c] = A_IN(s->x[i * s->rsx + c * s->csx]);
        }
    return 0;
}

void tsr_moe_launch(int64_t grid0, int64_t grid1, int64_t grid2, const char *slots) {
    (void)grid0, (void)grid1, (void)grid2;
    tsr_moe s;
    memcpy(&s, slots, sizeof s);
    const int most = omp_get_max_threads();
    moe_plan p;
    int rc = moe_prepare(&s, &p, most);
    if (rc == 0) {
        /* threads take blocks of columns as they free up: one that starts late (a busy
           machine) leaves its share to the others instead of holding up the barrier */
        const int64_t up_blocks = moe_blocks(s.inter, &s.gate_up);
        const int64_t down_blocks = s.down_phase(&p, -1, 0);
        const int64_t work = p.hit * 3 * s.inter * s.hidden;
        #pragma omp parallel num_threads(most) if(work > MOE_GRAIN && most > 1)
        {
            const int me = omp_get_thread_num();
            #pragma omp for schedule(dynamic, 1)
            for (int64_t blk = 0; blk < up_blocks; blk++) moe_gate_up(&p, blk, me);
            #pragma omp for schedule(dynamic, 1)
            for (int64_t blk = 0; blk < down_blocks; blk++) s.down_phase(&p, blk, me);
        }
    }
    free(p.row_of);
    free(p.a);
    *s.status = rc;
}
