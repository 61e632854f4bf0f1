/* Local response normalisation across channels (section 3.3 of the paper), float32.
 *
 *   y[c] = x[c] * d[c]^-beta,   d[c] = k + alpha * S(x^2)[c],
 *   S(v)[c] = sum of v[j] for j in [max(0, c-h), min(C-1, c+h)],  h = size / 2,
 *
 * where alpha multiplies the plain sum (the caller turns Caffe's alpha into alpha / size).
 * The gradient, with t = g * x * d^-beta / d (S is symmetric, so it is its own transpose):
 *
 *   dx[c] = g[c] * d[c]^-beta - 2 * alpha * beta * x[c] * S(t)[c].
 *
 * Nothing but x is kept for the backward pass: it recomputes d, which costs a few
 * arithmetic operations per element but saves writing and reading back a tensor the
 * size of the activation.
 *
 * The arithmetic is done on strips of up to STRIP values that are contiguous in memory,
 * for which the window's `size` neighbours are `size` other strips at a fixed stride:
 *   NCHW (contiguous): a strip is pixels of one channel plane, the neighbours are the
 *     planes of the adjacent channels. Work goes by blocks of pixels of one image,
 *     walking the channels, so the planes of one window stay in L1.
 *   NHWC (channels_last): a strip is channels of one pixel, the neighbours are the same
 *     row shifted by one channel; the row is copied between zeros so that every window
 *     has `size` entries.
 * Window sums are recomputed for every channel rather than kept as a running sum (add
 * the entering square, subtract the leaving one): in float32 a running sum forgets small
 * values after a large one has passed through the window.
 *
 * Threads: OpenMP over independent work items, as many as the caller asks for
 * (torch.get_num_threads()).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 1024 /* NCHW pixels per work item: a window's planes, 4 KiB each, stay in L1 */
#define STRIP 64   /* values per strip: 8 AVX registers of sums */

/* Runs STMT for the strips of [0, len), with p the strip's start and w its width. Full
 * strips see w as the constant STRIP, so the compiler unrolls the inlined strip functions
 * and keeps their window sums in registers instead of storing them at every step. */
#define FOR_EACH_STRIP(len, STMT)                                                          \
    do {                                                                                   \
        long p = 0;                                                                        \
        for (; p + STRIP <= (len); p += STRIP) {                                           \
            const long w = STRIP;                                                          \
            STMT;                                                                          \
        }                                                                                  \
        if (p < (len)) {                                                                   \
            const long w = (len) - p;                                                      \
            STMT;                                                                          \
        }                                                                                  \
    } while (0)

/* The strip functions must be inlined at each call for the constant width to count. */
#define STRIP_FN static inline __attribute__((always_inline)) void

typedef struct {
    float alpha, beta, k;
} params;

/* d^-beta for d > 0. The paper's and Caffe's beta = 0.75 takes two square roots and a
 * division, which vectorise and are each correctly rounded; other values take powf, which
 * does not vectorise (about 9x slower, still well ahead of torch.nn.LocalResponseNorm). */
static inline float pow_neg(float d, float beta) {
    if (beta == 0.75f) {
        float r = sqrtf(d);
        return 1.0f / (r * sqrtf(r));
    }
    return powf(d, -beta);
}

static inline long min_l(long a, long b) { return a < b ? a : b; }
static inline long max_l(long a, long b) { return a > b ? a : b; }

/* s[q] = sum over j < count of v[j * stride + q], squared if `square`. */
STRIP_FN window_sum(const float *restrict v, long stride, long count, int square, long width,
                    float *restrict s) {
    for (long q = 0; q < width; q++) s[q] = 0.0f;
    for (long j = 0; j < count; j++) {
        const float *vj = v + j * stride;
        for (long q = 0; q < width; q++) s[q] += square ? vj[q] * vj[q] : vj[q];
    }
}

/* y = x * d^-beta for one strip x, whose window starts at v. */
STRIP_FN forward_strip(const float *restrict x, const float *restrict v, long stride,
                       long count, float *restrict y, long width, params prm) {
    float s[STRIP];
    window_sum(v, stride, count, 1, width, s);
    for (long q = 0; q < width; q++) y[q] = x[q] * pow_neg(prm.k + prm.alpha * s[q], prm.beta);
}

/* The backward pass's first half for one strip: dx = g * d^-beta and t. */
STRIP_FN backward_strip_t(const float *restrict x, const float *restrict v, long stride,
                          long count, const float *restrict g, float *restrict dx,
                          float *restrict t, long width, params prm) {
    float s[STRIP];
    window_sum(v, stride, count, 1, width, s);
    for (long q = 0; q < width; q++) {
        const float d = prm.k + prm.alpha * s[q];
        const float gs = g[q] * pow_neg(d, prm.beta);
        dx[q] = gs;
        t[q] = gs * x[q] / d;
    }
}

/* The second half: dx -= 2 alpha beta x S(t), with the strip's window of t starting at t. */
STRIP_FN backward_strip_dx(const float *restrict x, const float *restrict t, long stride,
                           long count, float *restrict dx, long width, params prm) {
    const float coef = 2.0f * prm.alpha * prm.beta;
    float s[STRIP];
    window_sum(t, stride, count, 0, width, s);
    for (long q = 0; q < width; q++) dx[q] -= coef * x[q] * s[q];
}

void lrn_forward_nchw(const float *x, float *y, long N, long C, long HW, int size,
                      float alpha, float beta, float k, int nthreads) {
    const params prm = {alpha, beta, k};
    const long h = size / 2, nblocks = (HW + BLOCK - 1) / BLOCK;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long item = 0; item < N * nblocks; item++) {
        const long n = item / nblocks, p0 = (item % nblocks) * BLOCK;
        const long len = min_l(BLOCK, HW - p0);
        const float *xb = x + n * C * HW + p0;
        float *yb = y + n * C * HW + p0;
        for (long c = 0; c < C; c++) {
            const long lo = max_l(0, c - h), count = min_l(C - 1, c + h) - lo + 1;
            const float *xc = xb + c * HW, *xw = xb + lo * HW;
            float *yc = yb + c * HW;
            FOR_EACH_STRIP(len, forward_strip(xc + p, xw + p, HW, count, yc + p, w, prm));
        }
    }
}

void lrn_backward_nchw(const float *x, const float *g, float *dx, long N, long C, long HW,
                       int size, float alpha, float beta, float k, int nthreads) {
    const params prm = {alpha, beta, k};
    const long h = size / 2, nblocks = (HW + BLOCK - 1) / BLOCK;
#pragma omp parallel num_threads(nthreads)
    {
        /* t of the last `size` channels, channel j in row j % size; rows of channels
         * outside [0, C) hold zeros, so a window of t is all `size` rows. */
        float *ring = malloc(sizeof(float) * size * BLOCK);
#pragma omp for schedule(static)
        for (long item = 0; item < N * nblocks; item++) {
            const long n = item / nblocks, p0 = (item % nblocks) * BLOCK;
            const long len = min_l(BLOCK, HW - p0);
            const long off = n * C * HW + p0;
            const float *xb = x + off, *gb = g + off;
            float *dxb = dx + off;
            memset(ring, 0, sizeof(float) * size * BLOCK);
            /* Step c computes the first term and t of channel c, then finishes channel
             * c - h, whose window of t is now complete. */
            for (long c = 0; c < C + h; c++) {
                float *tc = ring + (c % size) * BLOCK;
                if (c < C) {
                    const long lo = max_l(0, c - h), count = min_l(C - 1, c + h) - lo + 1;
                    const float *xc = xb + c * HW, *xw = xb + lo * HW, *gc = gb + c * HW;
                    float *dxc = dxb + c * HW;
                    FOR_EACH_STRIP(len, backward_strip_t(xc + p, xw + p, HW, count, gc + p,
                                                         dxc + p, tc + p, w, prm));
                } else {
                    memset(tc, 0, sizeof(float) * len);
                }
                const long i = c - h;
                if (i >= 0) {
                    const float *xi = xb + i * HW;
                    float *dxi = dxb + i * HW;
                    FOR_EACH_STRIP(len, backward_strip_dx(xi + p, ring + p, BLOCK, size,
                                                          dxi + p, w, prm));
                }
            }
        }
        free(ring);
    }
}

void lrn_forward_nhwc(const float *x, float *y, long N, long C, long HW, int size,
                      float alpha, float beta, float k, int nthreads) {
    const params prm = {alpha, beta, k};
    const long h = size / 2;
#pragma omp parallel num_threads(nthreads)
    {
        float *xpad = calloc(C + 2 * h, sizeof(float)); /* a pixel's row, h zeros each side */
#pragma omp for schedule(static)
        for (long pix = 0; pix < N * HW; pix++) {
            const float *xp = x + pix * C;
            float *yp = y + pix * C;
            memcpy(xpad + h, xp, sizeof(float) * C);
            /* channel c's window starts at xpad[c] */
            FOR_EACH_STRIP(C, forward_strip(xp + p, xpad + p, 1, size, yp + p, w, prm));
        }
        free(xpad);
    }
}

void lrn_backward_nhwc(const float *x, const float *g, float *dx, long N, long C, long HW,
                       int size, float alpha, float beta, float k, int nthreads) {
    const params prm = {alpha, beta, k};
    const long h = size / 2;
#pragma omp parallel num_threads(nthreads)
    {
        float *xpad = calloc(C + 2 * h, sizeof(float)); /* rows of x and t between h zeros */
        float *tpad = calloc(C + 2 * h, sizeof(float));
#pragma omp for schedule(static)
        for (long pix = 0; pix < N * HW; pix++) {
            const float *xp = x + pix * C, *gp = g + pix * C;
            float *dxp = dx + pix * C;
            memcpy(xpad + h, xp, sizeof(float) * C);
            FOR_EACH_STRIP(C, backward_strip_t(xp + p, xpad + p, 1, size, gp + p, dxp + p,
                                               tpad + h + p, w, prm));
            FOR_EACH_STRIP(C, backward_strip_dx(xp + p, tpad + p, 1, size, dxp + p, w, prm));
        }
        free(xpad);
        free(tpad);
    }
}

/* ---------------------------------------------------------------------------------------
 * The block after conv1, conv2 and conv5, fused: ReLU, then LRN (when `size` > 0), then
 * max-pooling over z x z windows at stride s (the paper's z = 3, s = 2, no padding), on
 * channels_last (NHWC) float32 tensors, or bfloat16 ones (computed in float32, below).
 *
 *   forward:  x (N, H, W, C) conv output -> y (N, OH, OW, C) pooled, and for the backward
 *             pass idx (N, OH, OW, C) bytes: the winner's offset in its window (dy * z + dx).
 *   backward: x, idx, gy -> gx.
 *
 * One image is one work item. Its normalised maps r (H * W * C floats, about 1.2 MB for
 * conv1) live in a per-thread scratch buffer, so the full-size intermediates of the
 * unfused chain (the LRN output, a zero-filled gradient, the ReLU mask) never reach
 * memory. Ties go to the first maximum in row-major window order and NaN wins, as in
 * torch's max_pool2d. */

static inline float relu_f(float v) { return v < 0.0f ? 0.0f : v; } /* NaN stays NaN */

/* r = LRN(relu(x)) (or relu(x) when size == 0) for the H * W pixels of one image. */
static void block_normalise(const float *restrict x, float *restrict r, float *restrict xpad,
                            long HW, long C, int size, params prm) {
    const long h = size / 2;
    for (long pix = 0; pix < HW; pix++) {
        const float *xp = x + pix * C;
        float *rp = r + pix * C;
        if (size == 0) {
            for (long c = 0; c < C; c++) rp[c] = relu_f(xp[c]);
            continue;
        }
        for (long c = 0; c < C; c++) xpad[h + c] = relu_f(xp[c]);
        FOR_EACH_STRIP(C, forward_strip(xpad + h + p, xpad + p, 1, size, rp + p, w, prm));
    }
}

/* One image forward: xn (H, W, C) -> yn (OH, OW, C) and, unless NULL, in (OH, OW, C). */
static void block_forward_image(const float *restrict xn, float *restrict yn,
                                unsigned char *restrict in, float *restrict r,
                                float *restrict xpad, long H, long W, long C, int size,
                                params prm, int z, int s) {
    const long OH = (H - z) / s + 1, OW = (W - z) / s + 1;
    block_normalise(xn, r, xpad, H * W, C, size, prm);
    for (long oh = 0; oh < OH; oh++) {
        for (long ow = 0; ow < OW; ow++) {
            float *yo = yn + (oh * OW + ow) * C;
            unsigned char *io = in ? in + (oh * OW + ow) * C : NULL;
            const float *r0 = r + (oh * s * W + ow * s) * C;
            for (long c = 0; c < C; c++) yo[c] = r0[c];
            if (io) memset(io, 0, C);
            for (int dy = 0; dy < z; dy++) {
                for (int dx = 0; dx < z; dx++) {
                    if (dy == 0 && dx == 0) continue;
                    const float *rw = r0 + (dy * W + dx) * C;
                    const unsigned char pos = (unsigned char)(dy * z + dx);
                    if (io) {
                        for (long c = 0; c < C; c++) {
                            const int win = rw[c] > yo[c] || isnan(rw[c]);
                            yo[c] = win ? rw[c] : yo[c];
                            io[c] = win ? pos : io[c];
                        }
                    } else {
                        for (long c = 0; c < C; c++)
                            yo[c] = (rw[c] > yo[c] || isnan(rw[c])) ? rw[c] : yo[c];
                    }
                }
            }
        }
    }
}

/* One image backward: xn, in, gyn -> gxn, through the scratch gr (H * W * C). */
static void block_backward_image(const float *restrict xn, const unsigned char *restrict in,
                                 const float *restrict gyn, float *restrict gxn,
                                 float *restrict gr, float *restrict xpad, float *restrict tpad,
                                 long H, long W, long C, int size, params prm, int z, int s) {
    const long OH = (H - z) / s + 1, OW = (W - z) / s + 1, HW = H * W, h = size / 2;
    memset(gr, 0, sizeof(float) * HW * C);
    for (long o = 0; o < OH * OW; o++) {
        const long oh = o / OW, ow = o % OW;
        float *g0 = gr + (oh * s * W + ow * s) * C;
        const float *go = gyn + o * C;
        const unsigned char *io = in + o * C;
        for (long c = 0; c < C; c++) {
            const int pos = io[c];
            g0[((pos / z) * W + pos % z) * C + c] += go[c];
        }
    }
    for (long pix = 0; pix < HW; pix++) {
        const float *xp = xn + pix * C, *gp = gr + pix * C;
        float *gxp = gxn + pix * C;
        if (size == 0) {
            for (long c = 0; c < C; c++) gxp[c] = xp[c] <= 0.0f ? 0.0f : gp[c];
            continue;
        }
        for (long c = 0; c < C; c++) xpad[h + c] = relu_f(xp[c]);
        const float *rp = xpad + h;
        FOR_EACH_STRIP(C, backward_strip_t(rp + p, xpad + p, 1, size, gp + p, gxp + p,
                                           tpad + h + p, w, prm));
        FOR_EACH_STRIP(C, backward_strip_dx(rp + p, tpad + p, 1, size, gxp + p, w, prm));
        for (long c = 0; c < C; c++) gxp[c] = xp[c] <= 0.0f ? 0.0f : gxp[c];
    }
}

/* bfloat16 (the upper half of a float32) to float32 and back, rounding to nearest even as
 * torch does; NaN stays NaN. */
static inline float bf16_load(uint16_t v) {
    const uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t bf16_store(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static void bf16_to_f32(const uint16_t *restrict a, float *restrict b, long n) {
    for (long i = 0; i < n; i++) b[i] = bf16_load(a[i]);
}

static void f32_to_bf16(const float *restrict a, uint16_t *restrict b, long n) {
    for (long i = 0; i < n; i++) b[i] = bf16_store(a[i]);
}

void block_forward_nhwc(const float *x, float *y, unsigned char *idx, long N, long H, long W,
                        long C, int size, float alpha, float beta, float k, int z, int s,
                        int nthreads) {
    const params prm = {alpha, beta, k};
    const long OH = (H - z) / s + 1, OW = (W - z) / s + 1, HW = H * W, h = size / 2;
#pragma omp parallel num_threads(nthreads)
    {
        float *r = malloc(sizeof(float) * HW * C);
        float *xpad = calloc(C + 2 * h, sizeof(float));
#pragma omp for schedule(static)
        for (long n = 0; n < N; n++)
            block_forward_image(x + n * HW * C, y + n * OH * OW * C, idx ? idx + n * OH * OW * C : NULL,
                                r, xpad, H, W, C, size, prm, z, s);
        free(r);
        free(xpad);
    }
}

void block_backward_nhwc(const float *x, const unsigned char *idx, const float *gy, float *gx,
                         long N, long H, long W, long C, int size, float alpha, float beta,
                         float k, int z, int s, int nthreads) {
    const params prm = {alpha, beta, k};
    const long OH = (H - z) / s + 1, OW = (W - z) / s + 1, HW = H * W, h = size / 2;
#pragma omp parallel num_threads(nthreads)
    {
        float *gr = malloc(sizeof(float) * HW * C); /* gradient at the pool's input */
        float *xpad = calloc(C + 2 * h, sizeof(float));
        float *tpad = calloc(C + 2 * h, sizeof(float));
#pragma omp for schedule(static)
        for (long n = 0; n < N; n++)
            block_backward_image(x + n * HW * C, idx + n * OH * OW * C, gy + n * OH * OW * C,
                                 gx + n * HW * C, gr, xpad, tpad, H, W, C, size, prm, z, s);
        free(gr);
        free(xpad);
        free(tpad);
    }
}

/* The same for bfloat16 tensors (bf16 autocast): each image is widened to float32 in a
 * per-thread buffer, computed as above, and its result rounded back to bfloat16, so only
 * bfloat16 tensors are read and written. */
void block_forward_nhwc_bf16(const uint16_t *x, uint16_t *y, unsigned char *idx, long N,
                             long H, long W, long C, int size, float alpha, float beta, float k,
                             int z, int s, int nthreads) {
    const params prm = {alpha, beta, k};
    const long OH = (H - z) / s + 1, OW = (W - z) / s + 1, HW = H * W, h = size / 2;
#pragma omp parallel num_threads(nthreads)
    {
        float *xf = malloc(sizeof(float) * HW * C);
        float *yf = malloc(sizeof(float) * OH * OW * C);
        float *r = malloc(sizeof(float) * HW * C);
        float *xpad = calloc(C + 2 * h, sizeof(float));
#pragma omp for schedule(static)
        for (long n = 0; n < N; n++) {
            bf16_to_f32(x + n * HW * C, xf, HW * C);
            block_forward_image(xf, yf, idx ? idx + n * OH * OW * C : NULL, r, xpad, H, W, C, size,
                                prm, z, s);
            f32_to_bf16(yf, y + n * OH * OW * C, OH * OW * C);
        }
        free(xf);
        free(yf);
        free(r);
        free(xpad);
    }
}

void block_backward_nhwc_bf16(const uint16_t *x, const unsigned char *idx, const uint16_t *gy,
                              uint16_t *gx, long N, long H, long W, long C, int size, float alpha,
                              float beta, float k, int z, int s, int nthreads) {
    const params prm = {alpha, beta, k};
    const long OH = (H - z) / s + 1, OW = (W - z) / s + 1, HW = H * W, h = size / 2;
#pragma omp parallel num_threads(nthreads)
    {
        float *xf = malloc(sizeof(float) * HW * C);
        float *gyf = malloc(sizeof(float) * OH * OW * C);
        float *gxf = malloc(sizeof(float) * HW * C);
        float *gr = malloc(sizeof(float) * HW * C);
        float *xpad = calloc(C + 2 * h, sizeof(float));
        float *tpad = calloc(C + 2 * h, sizeof(float));
#pragma omp for schedule(static)
        for (long n = 0; n < N; n++) {
            bf16_to_f32(x + n * HW * C, xf, HW * C);
            bf16_to_f32(gy + n * OH * OW * C, gyf, OH * OW * C);
            block_backward_image(xf, idx + n * OH * OW * C, gyf, gxf, gr, xpad, tpad, H, W, C, size,
                                 prm, z, s);
            f32_to_bf16(gxf, gx + n * HW * C, HW * C);
        }
        free(xf);
        free(gyf);
        free(gxf);
        free(gr);
        free(xpad);
        free(tpad);
    }
}
