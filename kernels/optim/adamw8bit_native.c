/* One AdamW step on 8-bit blockwise state in one pass a block: the CPU twin of adamw_math.py's torch reference
 * (adamw8bit_update_reference) and of adam8bit_triton.py's kernel, bit for bit.
 *
 * Each block of `blocksize` elements: m and v dequantized (code[q] * absmax), the AdamW update in fp32 with every
 * op one IEEE rounding, in the reference's order (the library is built with -ffp-contract=off, so no multiply-add
 * becomes an FMA; sqrtf and '/' are the correctly rounded ones, vectorized where the CPU has the instructions:
 * -fno-math-errno and -fno-trapping-math change no value), the parameter written, and m and v requantized
 * by bnb's CPU rule: absmax ignoring NaN, y = x * (1 / absmax), bin = trunc((clamp(y) + 1) * 0.5 * 65535 + 0.5),
 * code = lut[bin]; a NaN y or an all-zero block gets code 0. The torch reference makes about two dozen passes over
 * whole laid-out copies of the state; here each block stays in cache. fp32 parameters and gradients only (the LoRA
 * masters); anything else takes the reference. Built and checked per machine by stages/contract/cpu_kernels.py;
 * called through ctypes by kernels/optim/adamw8bit_cpu.py.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_BLOCK 4096

typedef struct {
    float beta1, one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, eps, decay, neg_step_size;
    int32_t apply_decay;
} Scalars;

/* bnb's CPU requantization of one block. absmax from the bits: for values >= 0 (|x|, a NaN made 0) the order of
 * the IEEE bit patterns as unsigned integers is the order of the numbers, so the max is an integer max, which the
 * compiler vectorizes; the bins are computed in one vectorizable loop and looked up in a second. */
static void requantize(const float *restrict x, int64_t n, const uint8_t *restrict lut, uint8_t *restrict q,
                       float *absmax) {
    uint32_t max_bits = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t b;
        memcpy(&b, &x[i], sizeof b);
        b &= 0x7FFFFFFFu;
        b = b > 0x7F800000u ? 0u : b; /* NaN: ignored */
        max_bits = b > max_bits ? b : max_bits;
    }
    float amax;
    memcpy(&amax, &max_bits, sizeof amax);
    *absmax = amax;
    if (amax == 0.0f) {
        memset(q, 0, (size_t)n);
        return;
    }
    float inv = 1.0f / amax;
    int32_t bins[MAX_BLOCK];
    for (int64_t i = 0; i < n; i++) {
        float y = x[i] * inv;
        int bad = y != y;
        y = bad ? 0.0f : y;
        y = y < -1.0f ? -1.0f : y;
        y = y > 1.0f ? 1.0f : y;
        float half = (y + 1.0f) * 0.5f;
        int32_t bin = (int32_t)(half * 65535.0f + 0.5f);
        bins[i] = bad ? -1 : bin;
    }
    for (int64_t i = 0; i < n; i++) q[i] = bins[i] < 0 ? 0 : lut[bins[i]];
}

static void update_block(float *p, const float *g, uint8_t *q1, uint8_t *q2, float *absmax1, float *absmax2,
                         const float *code1, const float *code2, const uint8_t *lut1, const uint8_t *lut2, int64_t n,
                         int64_t blocksize, const Scalars *s, int64_t b) {
    float m[MAX_BLOCK], v[MAX_BLOCK];
    int64_t k0 = b * blocksize, len = k0 + blocksize < n ? blocksize : n - k0;
    float a1 = absmax1[b], a2 = absmax2[b];
    for (int64_t i = 0; i < len; i++) {
        m[i] = code1[q1[k0 + i]] * a1;
        v[i] = code2[q2[k0 + i]] * a2;
    }
    float *restrict pb = p + k0;
    const float *restrict gb = g + k0;
    const float beta1 = s->beta1, omb1 = s->one_minus_beta1, beta2 = s->beta2, omb2 = s->one_minus_beta2;
    const float bc2 = s->bias_correction2_sqrt, eps = s->eps, decay = s->decay, step = s->neg_step_size;
    const int apply_decay = s->apply_decay;
    for (int64_t i = 0; i < len; i++) {
        float gk = gb[i];
        float mk = m[i] * beta1 + gk * omb1;
        float vk = v[i] * beta2 + (gk * gk) * omb2;
        float denom = sqrtf(vk) / bc2 + eps;
        float pk = apply_decay ? pb[i] * decay : pb[i];
        pb[i] = pk + (mk * step) / denom;
        m[i] = mk;
        v[i] = vk;
    }
    requantize(m, len, lut1, q1 + k0, absmax1 + b);
    requantize(v, len, lut2, q2 + k0, absmax2 + b);
}

/* `count` tensors, each its own flat param, gradient, codes and absmax (n[t] elements), one step with the same
 * scalars: tensors are shared among OpenMP threads, or a lone tensor's blocks are. Returns 0, or -1 (nothing
 * written) for a block size this kernel does not take. */
int qlora_adamw8bit_many_f32(int64_t count, float *const *p, float *const *g, uint8_t *const *q1,
                             uint8_t *const *q2, float *const *absmax1, float *const *absmax2, const int64_t *n,
                             const float *code1, const float *code2, const uint8_t *lut1, const uint8_t *lut2,
                             int64_t blocksize, float beta1, float one_minus_beta1, float beta2,
                             float one_minus_beta2, float bias_correction2_sqrt, float eps, float decay,
                             int32_t apply_decay, float neg_step_size) {
    if (blocksize < 1 || blocksize > MAX_BLOCK) return -1;
    Scalars s = {beta1, one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, eps, decay, neg_step_size,
                 apply_decay};
    if (count == 1) {
        int64_t blocks = (n[0] + blocksize - 1) / blocksize;
#pragma omp parallel for schedule(static) if (blocks >= 64)
        for (int64_t b = 0; b < blocks; b++)
            update_block(p[0], g[0], q1[0], q2[0], absmax1[0], absmax2[0], code1, code2, lut1, lut2, n[0],
                         blocksize, &s, b);
        return 0;
    }
#pragma omp parallel for schedule(dynamic, 4)
    for (int64_t t = 0; t < count; t++) {
        int64_t blocks = (n[t] + blocksize - 1) / blocksize;
        for (int64_t b = 0; b < blocks; b++)
            update_block(p[t], g[t], q1[t], q2[t], absmax1[t], absmax2[t], code1, code2, lut1, lut2, n[t],
                         blocksize, &s, b);
    }
    return 0;
}
