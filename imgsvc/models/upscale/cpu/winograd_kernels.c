/* Winograd F(6x6, 3x3) input and output transforms on NHWC float32 (see winograd.py), and
 * wino_conv: a whole convolution with both transforms and the products fused per thread.
 *
 * Channels are innermost, so every loop over `c` is a plain vector loop over eight input and
 * up to eight output streams. A call covers a band of tile rows [band_begin, band_end) of the
 * image (so that its share of `v` and `m` stays in cache); its tiles are split evenly over
 * `threads`: on OpenMP (built with -fopenmp, it shares the runtime and thread pool torch has
 * loaded), else on POSIX threads started per call. Returns 0, or -1 when scratch memory could
 * not be had. Nothing here checks its arguments: the callers (winograd.py) check every buffer's
 * dtype, layout and shape before calling, and on a non-zero status compute that call with torch.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define TILE 6

/* The channel loops read and write disjoint streams: say so, so they vectorize without
 * run-time overlap checks (which compilers give up on for this many pointer pairs). */
#if defined(__clang__)
#define CHANNELS _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define CHANNELS _Pragma("GCC ivdep")
#else
#define CHANNELS
#endif
#define MAX_THREADS 64

/* BLAS sgemm (Fortran interface: column-major), as MKL exports it from torch's own library,
 * and MKL's per-thread thread count (1 inside our threads: no nested parallelism) */
typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *,
                         const float *, const float *, const int *, const float *, const int *,
                         const float *, float *, const int *);
typedef int (*local_threads_fn)(int);

typedef struct {
    const float *x; float *v; const float *m; const float *bias; const float *slope;
    const float *residual; float scale; float *y;
    long n, h, w, c, c_offset, c_total, tiles_y, tiles_x;
    long band_begin, band_tiles; /* first tile row of the band; tiles in the band (= T) */
    long t_begin, t_end;         /* this job's tiles, as indices into the band */
    int slot;                    /* this job's number, 0 .. threads - 1 */
    int status;
    /* wino_conv only */
    const float *u; long c_out, chunk, scratch_floats; float *scratch;
    sgemm_fn gemm; local_threads_fn set_local_threads;
} job_t;

/* o_k[c] = (Bt . (s_0[c], ..., s_7[c]))_k for c < C; the streams lie `is` / `os` floats apart */
static void bt8(const float *s, long is, float *o, long os, long C)
{
    const float *restrict s0 = s, *restrict s1 = s + is, *restrict s2 = s + 2 * is;
    const float *restrict s3 = s + 3 * is, *restrict s4 = s + 4 * is, *restrict s5 = s + 5 * is;
    const float *restrict s6 = s + 6 * is, *restrict s7 = s + 7 * is;
    float *restrict o0 = o, *restrict o1 = o + os, *restrict o2 = o + 2 * os;
    float *restrict o3 = o + 3 * os, *restrict o4 = o + 4 * os, *restrict o5 = o + 5 * os;
    float *restrict o6 = o + 6 * os, *restrict o7 = o + 7 * os;
    CHANNELS for (long c = 0; c < C; c++) {
        float d0 = s0[c], d1 = s1[c], d2 = s2[c], d3 = s3[c];
        float d4 = s4[c], d5 = s5[c], d6 = s6[c], d7 = s7[c];
        o0[c] = d0 - d6 + (d4 - d2) * 5.25f;
        o7[c] = d7 - d1 + (d3 - d5) * 5.25f;
        float a = d2 + d6 - d4 * 4.25f, b = d1 + d5 - d3 * 4.25f;
        o1[c] = a + b;
        o2[c] = a - b;
        a = d6 + d2 * 0.25f - d4 * 1.25f;
        b = d1 * 0.5f - d3 * 2.5f + d5 * 2.0f;
        o3[c] = a + b;
        o4[c] = a - b;
        a = d6 + (d2 - d4 * 1.25f) * 4.0f;
        b = d1 * 2.0f - d3 * 2.5f + d5 * 0.5f;
        o5[c] = a + b;
        o6[c] = a - b;
    }
}

/* The transform of tile (n, row ty, column tx) into column `ti` of v (64, T, CT), channels
 * [c_offset, c_offset + C); scratch: edge and tmp, 64 * C floats each. */
static void input_tile(const job_t *j, long n, long ty, long tx, float *v, long T, long ti,
                       float *edge, float *tmp)
{
    const long H = j->h, W = j->w, C = j->c, CT = j->c_total;
    const long y0 = ty * TILE - 1, x0 = tx * TILE - 1;
    if (y0 >= 0 && x0 >= 0 && y0 + 8 <= H && x0 + 8 <= W) {
        for (long i = 0; i < 8; i++) /* along x: row i of the tile */
            bt8(j->x + ((n * H + y0 + i) * W + x0) * C, C, tmp + i * 8 * C, C, C);
    } else { /* a border tile: copy it with its zero padding first */
        for (long i = 0; i < 8; i++)
            for (long k = 0; k < 8; k++) {
                float *dst = edge + (i * 8 + k) * C;
                const long yy = y0 + i, xx = x0 + k;
                if (yy >= 0 && yy < H && xx >= 0 && xx < W)
                    memcpy(dst, j->x + ((n * H + yy) * W + xx) * C, sizeof(float) * C);
                else
                    memset(dst, 0, sizeof(float) * C);
            }
        for (long i = 0; i < 8; i++)
            bt8(edge + i * 8 * C, C, tmp + i * 8 * C, C, C);
    }
    for (long k = 0; k < 8; k++) /* along y: column k, into v[l * 8 + k][ti] */
        bt8(tmp + k * C, 8 * C, v + (k * T + ti) * CT + j->c_offset, 8 * T * CT, C);
}

static void *input_job(void *arg)
{
    job_t *j = arg;
    float *scratch = malloc(sizeof(float) * 2 * 64 * j->c);
    if (!scratch) { j->status = -1; return NULL; }
    for (long t = j->t_begin; t < j->t_end; t++) {
        const long row = j->band_begin + t / j->tiles_x;
        input_tile(j, row / j->tiles_y, row % j->tiles_y, t % j->tiles_x, j->v, j->band_tiles, t,
                   scratch, scratch + 64 * j->c);
    }
    free(scratch);
    return NULL;
}

/* o_s[c] = (At . (m_0[c], ..., m_7[c]))_s + bias[c] for s < 6; streams `is` / `os` apart */
static void at8(const float *m, long is, float *o, long os, const float *restrict bias, long C)
{
    const float *restrict m0 = m, *restrict m1 = m + is, *restrict m2 = m + 2 * is;
    const float *restrict m3 = m + 3 * is, *restrict m4 = m + 4 * is, *restrict m5 = m + 5 * is;
    const float *restrict m6 = m + 6 * is, *restrict m7 = m + 7 * is;
    float *restrict o0 = o, *restrict o1 = o + os, *restrict o2 = o + 2 * os;
    float *restrict o3 = o + 3 * os, *restrict o4 = o + 4 * os, *restrict o5 = o + 5 * os;
    CHANNELS for (long c = 0; c < C; c++) {
        float a = m1[c] + m2[c], b = m1[c] - m2[c], e = m3[c] + m4[c], f = m3[c] - m4[c];
        float g = m5[c] + m6[c], h = m5[c] - m6[c], bc = bias[c];
        o0[c] = m0[c] + a + e + g + bc;
        o1[c] = b + f * 2.0f + h * 0.5f + bc;
        o2[c] = a + e * 4.0f + g * 0.25f + bc;
        o3[c] = b + f * 8.0f + h * 0.125f + bc;
        o4[c] = a + e * 16.0f + g * 0.0625f + bc;
        o5[c] = m7[c] + b + f * 32.0f + h * 0.03125f + bc;
    }
}

/* Tile (n, row ty, column tx) from column `ti` of m (64, T, C) into y: f(At M A + bias)
 * [* scale + residual]; scratch: 85 * C floats, the last C of them zero. */
static void output_tile(const job_t *j, long n, long ty, long tx, const float *m, long T,
                        long ti, float *scratch)
{
    const long H = j->h, W = j->w, C = j->c;
    /* tmp[p][s][:] (8x6), out[r][s][:] (6x6), zero[:] */
    float *tmp = scratch, *out = scratch + 48 * C, *zero = scratch + 84 * C;
    const long oy = ty * TILE, ox = tx * TILE;
    for (long p = 0; p < 8; p++) /* along k: M[p][0..7] -> tmp[p][0..5] */
        at8(m + (p * 8 * T + ti) * C, T * C, tmp + p * 6 * C, C, zero, C);
    for (long s = 0; s < 6; s++) /* along p: tmp[0..7][s] -> out[0..5][s] */
        at8(tmp + s * C, 6 * C, out + s * C, 6 * C, j->bias, C);
    const long rows = H - oy < TILE ? H - oy : TILE, cols = W - ox < TILE ? W - ox : TILE;
    for (long r = 0; r < rows; r++)
        for (long s = 0; s < cols; s++) {
            const float *restrict src = out + (r * 6 + s) * C;
            const float *restrict slope = j->slope;
            const long at = ((n * H + oy + r) * W + ox + s) * C;
            float *restrict dst = j->y + at;
            if (j->residual) {
                const float *restrict res = j->residual + at;
                const float scale = j->scale;
                CHANNELS for (long c = 0; c < C; c++) {
                    float value = src[c], scaled = value * slope[c];
                    dst[c] = (value > 0.0f ? value : scaled) * scale + res[c];
                }
            } else {
                CHANNELS for (long c = 0; c < C; c++) {
                    float value = src[c], scaled = value * slope[c];
                    dst[c] = value > 0.0f ? value : scaled;
                }
            }
        }
}

static void *output_job(void *arg)
{
    job_t *j = arg;
    float *scratch = calloc((48 + 36 + 1) * j->c, sizeof(float));
    if (!scratch) { j->status = -1; return NULL; }
    for (long t = j->t_begin; t < j->t_end; t++) {
        const long row = j->band_begin + t / j->tiles_x;
        output_tile(j, row / j->tiles_y, row % j->tiles_y, t % j->tiles_x, j->m, j->band_tiles,
                    t, scratch);
    }
    free(scratch);
    return NULL;
}

static int run(void *(*fn)(void *), job_t base, int threads)
{
    job_t jobs[MAX_THREADS];
    const long total = base.band_tiles;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > total) threads = (int)total;
    if (threads < 1) threads = 1;
    for (int i = 0; i < threads; i++) {
        jobs[i] = base;
        jobs[i].t_begin = total * i / threads;
        jobs[i].t_end = total * (i + 1) / threads;
        jobs[i].slot = i;
        jobs[i].status = 0;
    }
#ifdef _OPENMP
    /* torch's own OpenMP runtime (same SONAME, already loaded): its thread pool, no contention */
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int i = 0; i < threads; i++) fn(&jobs[i]);
#else
    pthread_t ids[MAX_THREADS];
    int started = 0;
    for (int i = 1; i < threads; i++) {
        if (pthread_create(&ids[i], NULL, fn, &jobs[i]) != 0) break;
        started = i;
    }
    for (int i = started + 1; i < threads; i++) fn(&jobs[i]); /* threads that did not start */
    fn(&jobs[0]);
    for (int i = 1; i <= started; i++) pthread_join(ids[i], NULL);
#endif
    int status = 0;
    for (int i = 0; i < threads; i++) status |= jobs[i].status;
    return status;
}

static void band(job_t *base, long band_begin, long band_end)
{
    base->tiles_y = (base->h + TILE - 1) / TILE;
    base->tiles_x = (base->w + TILE - 1) / TILE;
    base->band_begin = band_begin;
    base->band_tiles = (band_end - band_begin) * base->tiles_x;
}

/* Tile rows [band_begin, band_end) (of n * ceil(h / 6)) of x (n, h, w, c) -> channels
 * [c_offset, c_offset + c) of v (64, band tiles, c_total) */
int wino_input(const float *x, float *v, long n, long h, long w, long c, long c_offset,
               long c_total, long band_begin, long band_end, int threads)
{
    job_t base = {0};
    base.x = x; base.v = v; base.n = n; base.h = h; base.w = w; base.c = c;
    base.c_offset = c_offset; base.c_total = c_total;
    band(&base, band_begin, band_end);
    return run(input_job, base, threads);
}

/* m (64, band tiles, c) -> the band's pixels of y (n, h, w, c) = f(At M A + bias), where
 * f(x) = x if x > 0 else slope[c] * x; with a residual (n, h, w, c): f(...) * scale + residual */
int wino_output(const float *m, const float *bias, const float *slope, const float *residual,
                float scale, float *y, long n, long h, long w, long c, long band_begin,
                long band_end, int threads)
{
    job_t base = {0};
    base.m = m; base.bias = bias; base.slope = slope; base.residual = residual;
    base.scale = scale; base.y = y;
    base.n = n; base.h = h; base.w = w; base.c = c;
    band(&base, band_begin, band_end);
    return run(output_job, base, threads);
}

/* The products M (T x N) = V (T x K) @ U (K x N), row-major and contiguous, N a multiple of
 * VW: register blocks of RB rows by QB vectors of VW floats, accumulated over K with FMAs,
 * with U's block (K x QB * VW) in L1. Written with the compilers' vector extensions, which
 * map onto AVX-512, AVX2 or NEON registers. */
#if defined(__AVX512F__)
#define VW 16
#define RB 4
#define QB 4
#else
#define VW 8
#define RB 6
#define QB 2
#endif
typedef float vec_t __attribute__((vector_size(VW * sizeof(float))));
typedef float uvec_t __attribute__((vector_size(VW * sizeof(float)), aligned(4), may_alias));

static inline __attribute__((always_inline)) void micro(const float *restrict v,
                                                        const float *restrict u,
                                                        float *restrict m, long K, long N,
                                                        const int R, const int Q)
{
    vec_t acc[RB][4]; /* R <= RB rows by Q <= QB <= 4 vectors; the rest is never touched */
    for (int r = 0; r < R; r++)
        for (int q = 0; q < Q; q++) acc[r][q] = (vec_t){0};
    for (long k = 0; k < K; k++) {
        vec_t w[4];
        for (int q = 0; q < Q; q++) w[q] = *(const uvec_t *)(u + k * N + q * VW);
        for (int r = 0; r < R; r++) {
            const vec_t b = (vec_t){0} + v[r * K + k];
            for (int q = 0; q < Q; q++) acc[r][q] += b * w[q];
        }
    }
    for (int r = 0; r < R; r++)
        for (int q = 0; q < Q; q++) *(uvec_t *)(m + r * N + q * VW) = acc[r][q];
}

/* R rows of M at row t, columns [n0, n0 + q * VW): the block sizes as constants */
#define MICRO(R, Q) micro(v + t * K, u + n0, m + t * N + n0, K, N, R, Q)
#define BY_VECTORS(R)                                                                      \
    switch (q) {                                                                           \
    case 1: MICRO(R, 1); break;                                                            \
    case 2: MICRO(R, 2); break;                                                            \
    case 3: MICRO(R, 3); break;                                                            \
    default: MICRO(R, 4); break;                                                           \
    }

static void products(const float *v, const float *u, float *m, long T, long K, long N)
{
    for (long n0 = 0; n0 < N; n0 += QB * VW) {
        const int q = (int)((N - n0 < QB * VW ? N - n0 : QB * VW) / VW);
        long t = 0;
        for (; t + RB <= T; t += RB) { BY_VECTORS(RB) }
        for (; t < T; t++) { BY_VECTORS(1) }
    }
}

static void *conv_job(void *arg)
{
    job_t *j = arg;
    const long cin = j->c, cout = j->c_out, B = j->chunk;
    float *v = j->scratch + j->slot * j->scratch_floats, *m = v + 64 * B * cin;
    float *in_scratch = m + 64 * B * cout, *out_scratch = in_scratch + 128 * cin;
    memset(out_scratch + 84 * cout, 0, sizeof(float) * cout); /* output_tile's zero row */
    job_t jout = *j;
    jout.c = cout;
    const int previous = j->set_local_threads ? j->set_local_threads(1) : 0;
    const float one = 1.0f, nothing = 0.0f;
    for (long t0 = j->t_begin; t0 < j->t_end; t0 += B) {
        const long T = (j->t_end - t0 < B ? j->t_end - t0 : B);
        for (long t = t0; t < t0 + T; t++) {
            const long row = t / j->tiles_x;
            input_tile(j, row / j->tiles_y, row % j->tiles_y, t % j->tiles_x, v, T, t - t0,
                       in_scratch, in_scratch + 64 * cin);
        }
        /* M_p (T x cout) = V_p (T x cin) @ U_p (cin x cout), row-major; in BLAS's column-major
         * terms M_p' = U_p' V_p' */
        for (long p = 0; p < 64; p++) {
            const float *vp = v + p * T * cin, *up = j->u + p * cin * cout;
            float *mp = m + p * T * cout;
            if (cout % VW == 0) {
                products(vp, up, mp, T, cin, cout);
            } else {
                const int rows = (int)cout, cols = (int)T, inner = (int)cin;
                j->gemm("N", "N", &rows, &cols, &inner, &one, up, &rows, vp, &inner, &nothing,
                        mp, &rows);
            }
        }
        for (long t = t0; t < t0 + T; t++) {
            const long row = t / j->tiles_x;
            output_tile(&jout, row / j->tiles_y, row % j->tiles_y, t % j->tiles_x, m, T, t - t0,
                        out_scratch);
        }
    }
    if (j->set_local_threads) j->set_local_threads(previous);
    return NULL;
}

/* Output channels that wino_conv multiplies itself must be a multiple of this (else sgemm) */
int wino_vector_width(void) { return VW; }

/* Floats of scratch that wino_conv needs per thread */
long wino_conv_scratch(long cin, long cout, long chunk)
{
    return 64 * chunk * (cin + cout) + 128 * cin + 85 * cout;
}

/* One whole convolution x (n, h, w, cin) -> y (n, h, w, cout) = f(conv + bias) [* scale +
 * residual], each thread taking its share of the tiles `chunk` at a time through all three
 * steps while they are in its own cache: input transform into its V (64, chunk, cin), 64
 * single-threaded sgemm with u (64, cin, cout) into its M, output transform into y. scratch:
 * threads * wino_conv_scratch(cin, cout, chunk) floats. */
int wino_conv(const float *x, const float *u, const float *bias, const float *slope,
              const float *residual, float scale, float *y, long n, long h, long w, long cin,
              long cout, long chunk, float *scratch, void *sgemm, void *local_threads,
              int threads)
{
    job_t base = {0};
    base.x = x; base.u = u; base.bias = bias; base.slope = slope; base.residual = residual;
    base.scale = scale; base.y = y;
    base.n = n; base.h = h; base.w = w; base.c = cin; base.c_offset = 0; base.c_total = cin;
    base.c_out = cout; base.chunk = chunk; base.scratch = scratch;
    base.scratch_floats = wino_conv_scratch(cin, cout, chunk);
    base.gemm = (sgemm_fn)sgemm;
    base.set_local_threads = (local_threads_fn)local_threads;
    band(&base, 0, n * ((h + TILE - 1) / TILE));
    return run(conv_job, base, threads);
}

/* SRVGGNetCompact's tail: pixel_shuffle(r) of y (n, h, w, k * r * r) plus the nearest-neighbour
 * upscaled input x (n, h, w, k), into out (n, h * r, w * r, k), all NHWC. One pass instead of
 * a shuffle copy, an upsampled copy and an addition. */
int shuffle_add(const float *y, const float *x, float *out, long n, long h, long w, long k,
                long r, int threads)
{
    const long rows = n * h;
    (void)threads;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
    for (long row = 0; row < rows; row++) {
        const long b = row / h, yy = row % h;
        for (long xx = 0; xx < w; xx++) {
            const float *src = y + (row * w + xx) * k * r * r, *base = x + (row * w + xx) * k;
            for (long dy = 0; dy < r; dy++) {
                float *dst = out + (((b * h + yy) * r + dy) * w * r + xx * r) * k;
                for (long dx = 0; dx < r; dx++)
                    for (long c = 0; c < k; c++)
                        dst[dx * k + c] = src[(c * r + dy) * r + dx] + base[c];
            }
        }
    }
    return 0;
}
