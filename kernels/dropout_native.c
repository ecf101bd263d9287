/* The CPU's dropout masks in one pass: the compiled twin of kernels/dropout.py's torch reference.
 *
 * For each block of BLOCK mask elements: the block's splitmix64 words (seed + i * golden through the finalizer, as
 * kernels/dropout.py's splitmix64) are made in a buffer that stays in cache; lane k is the k % 4-th little-endian
 * signed 16-bit piece of word k / 4, as the reference's int16 view. (t - 1 - lane) >> 31 is all ones where
 * lane >= t (kept) and 0 where the element is dropped: ANDed with 1.0's bit pattern it is the 0/1 mask, ANDed with
 * a tensor's bits it is the tensor with its dropped elements zeroed, and no mask is ever written. Blocks are shared
 * among OpenMP threads (torch's own libgomp when torch is loaded first). Built and checked per machine by
 * stages/contract/cpu_kernels.py; called through ctypes by kernels/dropout_cpu.py.
 */
#include <stdint.h>
#include <string.h>

#define BLOCK 8192

static void block_lanes(uint64_t seed, int64_t k0, int64_t k1, int16_t *lanes) {
    uint64_t words[BLOCK / 4];
    int64_t w0 = k0 / 4, nw = (k1 - k0 + 3) / 4;
    for (int64_t i = 0; i < nw; i++) {
        uint64_t z = seed + (uint64_t)(w0 + i) * 0x9E3779B97F4A7C15ULL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        words[i] = z ^ (z >> 31);
    }
    memcpy(lanes, words, (size_t)(k1 - k0) * sizeof(int16_t));
}

#define KEEP(lane) ((int32_t)(lo_minus_1 - (int32_t)(lane)) >> 31)

/* One function per (what, element width): out = one/0; dst = src where kept; xk = x and g kept. */
#define DEFINE(T, SUFFIX)                                                                                          \
    void qlora_keep_bits_##SUFFIX(uint64_t seed, int32_t lo_minus_1, T one, T *out, int64_t n) {                    \
        int64_t blocks = (n + BLOCK - 1) / BLOCK;                                                                   \
        _Pragma("omp parallel for schedule(static)") for (int64_t b = 0; b < blocks; b++) {                         \
            int16_t lanes[BLOCK];                                                                                   \
            int64_t k0 = b * BLOCK, k1 = k0 + BLOCK < n ? k0 + BLOCK : n;                                           \
            block_lanes(seed, k0, k1, lanes);                                                                       \
            for (int64_t k = 0; k < k1 - k0; k++) out[k0 + k] = (T)(one & KEEP(lanes[k]));                          \
        }                                                                                                           \
    }                                                                                                               \
    void qlora_masked_bits_##SUFFIX(uint64_t seed, int32_t lo_minus_1, const T *src, T *dst, int64_t n) {          \
        int64_t blocks = (n + BLOCK - 1) / BLOCK;                                                                   \
        _Pragma("omp parallel for schedule(static)") for (int64_t b = 0; b < blocks; b++) {                         \
            int16_t lanes[BLOCK];                                                                                   \
            int64_t k0 = b * BLOCK, k1 = k0 + BLOCK < n ? k0 + BLOCK : n;                                           \
            block_lanes(seed, k0, k1, lanes);                                                                       \
            for (int64_t k = 0; k < k1 - k0; k++) dst[k0 + k] = (T)(src[k0 + k] & KEEP(lanes[k]));                  \
        }                                                                                                           \
    }                                                                                                               \
    void qlora_masked_pair_bits_##SUFFIX(uint64_t seed, int32_t lo_minus_1, const T *x, T *xk, T *g, int64_t n) {  \
        int64_t blocks = (n + BLOCK - 1) / BLOCK;                                                                   \
        _Pragma("omp parallel for schedule(static)") for (int64_t b = 0; b < blocks; b++) {                         \
            int16_t lanes[BLOCK];                                                                                   \
            int64_t k0 = b * BLOCK, k1 = k0 + BLOCK < n ? k0 + BLOCK : n;                                           \
            block_lanes(seed, k0, k1, lanes);                                                                       \
            for (int64_t k = 0; k < k1 - k0; k++) {                                                                 \
                T m = (T)KEEP(lanes[k]);                                                                            \
                xk[k0 + k] = (T)(x[k0 + k] & m);                                                                    \
                g[k0 + k] = (T)(g[k0 + k] & m);                                                                     \
            }                                                                                                       \
        }                                                                                                           \
    }

DEFINE(int32_t, 32)
DEFINE(int16_t, 16)
