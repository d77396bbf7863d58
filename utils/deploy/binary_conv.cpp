// The binary convolutions of the packed ReActNet-A (utils.export) on the CPU, in plain C++ (no torch
// headers: it compiles in seconds), called through ctypes by utils/deploy/kernel.py.
//
// Activations are packed per pixel, channels last, into two bit-planes per 64 channels:
// m (nonzero) and p (positive), in `planes` [n][h + 2 pad][w + 2 pad][words][2] with a zero border,
// so a padded tap has m = 0 and contributes nothing. A conv output is
//     s = popcount(m) - 2 popcount(m & (p xor q))   over its taps' words,
// q the weight sign bits, plus the exact correction for the weights that are exactly 0; then
// y = fma(float(s), scale, shift), one rounding, as torch.addcmul on the CPU.
//
// A call can also do a block's float parts (models.reactnet.BasicBlock): the bias added before the
// sign, and y = prelu(y + residual + bias, slope) + bias_out, and pack sign(y + next_bias) for the
// next 1x1 conv; each is the same float32 operation, in the same order, as PyTorch's (built with
// -ffp-contract=off: no multiply-add is fused that PyTorch rounds twice), so the values are the same.
//
// Weights come in blocks of OB output channels, [out / OB][taps * words][OB]: one word of one tap
// for OB consecutive outputs is contiguous, so a vector of outputs is one load and each input word
// is broadcast (no horizontal sums). Each path is register-blocked over R output pixels x OB
// outputs and runs in parallel over blocks of pixels with OpenMP (torch's own runtime: libgomp.so.1
// is already loaded by torch).
//
// Paths, chosen per call by the caller from bc_supported(): 0 scalar (hardware popcnt where the CPU
// has it), 1 AVX2 (popcount by nibble lookup, Mula et al.), 2 AVX-512 VPOPCNTDQ.
#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define BC_X86 1
#define BC_TARGET(t) __attribute__((target(t)))
#define BC_SCALAR_CLONES __attribute__((target_clones("popcnt", "default")))
#else
#define BC_X86 0
#define BC_TARGET(t)
#define BC_SCALAR_CLONES
#endif
#define BC_INLINE inline __attribute__((always_inline))
#define BC_AVX512 "avx512f,avx512dq,avx512vl,avx512bw,avx512vpopcntdq,fma,popcnt"

extern "C" {
// One conv call; _ConvArgs in utils/deploy/kernel.py mirrors it field by field. Null pointers skip
// the float parts.
struct bc_conv_args {
    const int64_t* planes;  // [n][hp][wp][words][2]
    int64_t n, hp, wp, words, k, stride, ho, wo;
    const int64_t* weights;  // [out / OB][k * k * words][OB]
    int64_t out;
    const float* scale;   // [out rounded up to OB]
    const float* shift;
    const int64_t* zeros;  // [nzeros][2]: (output channel, bit index in its weight row)
    int64_t nzeros;
    const float* residual;  // [pixels][residual_stride], its first `out` channels
    int64_t residual_stride;
    const float* bias;  // [out] each
    const float* slope;
    const float* bias_out;
    float* y;  // [pixels][y_stride], its first `out` channels
    int64_t y_stride;
    const float* next_bias;  // with next_planes: sign(y + next_bias) packed into
    int64_t* next_planes;    // [pixels][words of out][2]
};
}

namespace {

constexpr int OB = 32;  // output channels per weight block; utils/deploy/kernel.py pads to it

struct Conv : bc_conv_args {
    std::vector<int64_t> taps;  // offset of each tap (dy, dx) from a pixel's first word, in words
    int64_t blocks, pixels, next_words;
};

// ---- packing: m = u + bias != 0 (NaN too, as in the pure path), p = u + bias > 0 ----

// One pixel's channels -> its words (m, p); not inlined across targets, so callable from any path.
using PackPixel = void (*)(const float* u, const float* bias, int64_t channels, int64_t* out);

void pack_pixel_scalar(const float* u, const float* bias, int64_t channels, int64_t* out) {
    for (int64_t w = 0; w < (channels + 63) / 64; ++w) {
        uint64_t m = 0, p = 0;
        const int64_t n = std::min<int64_t>(64, channels - 64 * w);
        for (int64_t i = 0; i < n; ++i) {
            const float v = bias ? u[64 * w + i] + bias[64 * w + i] : u[64 * w + i];
            m |= (uint64_t)(v != 0) << i;
            p |= (uint64_t)(v > 0) << i;
        }
        out[2 * w] = (int64_t)m;
        out[2 * w + 1] = (int64_t)p;
    }
}

#if BC_X86
BC_TARGET("avx2") void pack_pixel_avx2(const float* u, const float* bias, int64_t channels, int64_t* out) {
    if (channels % 8) return pack_pixel_scalar(u, bias, channels, out);
    const __m256 zero = _mm256_setzero_ps();
    for (int64_t w = 0; w < (channels + 63) / 64; ++w) {
        uint64_t m = 0, p = 0;
        for (int g = 0; g < 8 && 64 * w + 8 * g < channels; ++g) {
            const int64_t i = 64 * w + 8 * g;
            __m256 v = _mm256_loadu_ps(u + i);
            if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + i));
            m |= (uint64_t)(uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_NEQ_UQ)) << (8 * g);
            p |= (uint64_t)(uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_GT_OQ)) << (8 * g);
        }
        out[2 * w] = (int64_t)m;
        out[2 * w + 1] = (int64_t)p;
    }
}

BC_TARGET(BC_AVX512) void pack_pixel_avx512(const float* u, const float* bias, int64_t channels, int64_t* out) {
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t w = 0; w < (channels + 63) / 64; ++w) {
        uint64_t m = 0, p = 0;
        for (int g = 0; g < 4; ++g) {
            const int64_t i = 64 * w + 16 * g, n = channels - i;
            if (n <= 0) break;
            const __mmask16 valid = n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1);
            __m512 v = _mm512_maskz_loadu_ps(valid, u + i);
            if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(valid, bias + i));
            m |= (uint64_t)_mm512_mask_cmp_ps_mask(valid, v, zero, _CMP_NEQ_UQ) << (16 * g);
            p |= (uint64_t)_mm512_mask_cmp_ps_mask(valid, v, zero, _CMP_GT_OQ) << (16 * g);
        }
        out[2 * w] = (int64_t)m;
        out[2 * w + 1] = (int64_t)p;
    }
}
#endif

// ---- the conv: shared parts ----

BC_INLINE int64_t popcount_m(const Conv& c, const int64_t* px) {
    int64_t n = 0;
    for (int64_t off : c.taps)
        for (int64_t w = 0; w < c.words; ++w) n += __builtin_popcountll((uint64_t)px[off + 2 * w]);
    return n;
}

// Weights exactly 0 were packed as -1: add back what they took, sign(input) at their bit.
BC_INLINE void correct_zero_weights(const Conv& c, const int64_t* px, int64_t block, int64_t* s) {
    for (int64_t z = 0; z < c.nzeros; ++z) {
        const int64_t o = c.zeros[2 * z] - block * OB, bit = c.zeros[2 * z + 1];
        if (o < 0 || o >= OB) continue;
        const int64_t tap = bit / (c.words * 64), word = bit / 64 % c.words, shift = bit % 64;
        const int64_t* a = px + c.taps[tap] + 2 * word;
        const int64_t m = (a[0] >> shift) & 1, p = (a[1] >> shift) & 1;
        s[o] += m * (2 * p - 1);
    }
}

// Walks the output pixels (flat over n, ho, wo) in order, without a division per pixel.
struct Cursor {
    const Conv& c;
    int64_t b, y, x;
    Cursor(const Conv& conv, int64_t i)
        : c(conv), b(i / (conv.ho * conv.wo)), y(i / conv.wo % conv.ho), x(i % conv.wo) {}
    // The packed input under the current pixel at tap (0, 0).
    const int64_t* input() const { return c.planes + ((b * c.hp + y * c.stride) * c.wp + x * c.stride) * c.words * 2; }
    void next() {
        if (++x < c.wo) return;
        x = 0;
        if (++y < c.ho) return;
        y = 0;
        ++b;
    }
};

// The inputs of the next R pixels from `at` (past `valid` of them, the last valid one again), and
// their popcount(m); advances `at`.
template <int R>
BC_INLINE void gather(const Conv& c, Cursor& at, int64_t valid, const int64_t* px[R], int64_t pm[R]) {
    for (int r = 0; r < R; ++r) {
        if (r < valid) {
            px[r] = at.input();
            pm[r] = popcount_m(c, px[r]);
            at.next();
        } else {
            px[r] = px[r - 1];
            pm[r] = pm[r - 1];
        }
    }
}

// The outputs of one pixel and block from s: y = fma(s, scale, shift), then the float parts.
BC_INLINE void finish_scalar(const Conv& c, int64_t pixel, int64_t block, const int64_t* s) {
    const int64_t base = block * OB, n = std::min<int64_t>(OB, c.out - base);
    const float* res = c.residual ? c.residual + pixel * c.residual_stride + base : nullptr;
    float* y = c.y + pixel * c.y_stride + base;
    for (int64_t o = 0; o < n; ++o) {
        float v = __builtin_fmaf((float)s[o], c.scale[base + o], c.shift[base + o]);
        if (res) v = v + res[o];
        if (c.bias) v = v + c.bias[base + o];
        if (c.slope) v = v > 0 ? v : v * c.slope[base + o];
        if (c.bias_out) v = v + c.bias_out[base + o];
        y[o] = v;
    }
}

// Packs sign(y + next_bias) of `count` pixels from `first` (their outputs all written).
template <PackPixel pack_pixel>
void pack_next(const Conv& c, int64_t first, int64_t count) {
    for (int64_t i = first; c.next_planes && i < first + count; ++i)
        pack_pixel(c.y + i * c.y_stride, c.next_bias, c.out, c.next_planes + i * c.next_words * 2);
}

// ---- scalar ----

BC_SCALAR_CLONES void conv_rows_scalar(const Conv& c, int64_t first, int64_t last) {
    const int64_t K = (int64_t)c.taps.size() * c.words;
    Cursor at(c, first);
    for (int64_t i = first; i < last; ++i) {
        const int64_t* px[1];
        int64_t pm[1];
        gather<1>(c, at, 1, px, pm);
        for (int64_t b = 0; b < c.blocks; ++b) {
            int64_t acc[OB] = {0};
            const int64_t* wq = c.weights + b * K * OB;
            for (int64_t off : c.taps)
                for (int64_t w = 0; w < c.words; ++w, wq += OB) {
                    const uint64_t m = px[0][off + 2 * w], p = px[0][off + 2 * w + 1];
                    for (int o = 0; o < OB; ++o) acc[o] += __builtin_popcountll((p ^ (uint64_t)wq[o]) & m);
                }
            for (int o = 0; o < OB; ++o) acc[o] = pm[0] - 2 * acc[o];
            correct_zero_weights(c, px[0], b, acc);
            finish_scalar(c, i, b, acc);
        }
        pack_next<pack_pixel_scalar>(c, i, 1);
    }
}

#if BC_X86

// ---- AVX2: popcount of each byte by two 16-entry lookups, summed into 64-bit lanes ----

BC_TARGET("avx2,fma,popcnt") BC_INLINE __m256i popcount256(__m256i x) {
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f);
    const __m256i bytes = _mm256_add_epi8(_mm256_shuffle_epi8(lut, _mm256_and_si256(x, low)),
                                          _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(x, 4), low)));
    return _mm256_sad_epu8(bytes, _mm256_setzero_si256());
}

// finish_scalar in vectors of 8 outputs (the same operations: the same values).
BC_TARGET("avx2,fma") BC_INLINE void finish_avx2(const Conv& c, int64_t pixel, int64_t block, const int64_t* s) {
    const int64_t base = block * OB, outputs = std::min<int64_t>(OB, c.out - base);
    const float* res = c.residual ? c.residual + pixel * c.residual_stride + base : nullptr;
    float* y = c.y + pixel * c.y_stride + base;
    const __m256 zero = _mm256_setzero_ps();
    for (int v = 0; v < OB / 8 && 8 * v < outputs; ++v) {
        const int64_t o = base + 8 * v;
        const __m256i lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)std::min<int64_t>(8, outputs - 8 * v)),
                                                 _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        alignas(32) int32_t s32[8];  // |s| <= taps * 64 * words < 2^31; AVX2 converts int32, not int64
        for (int i = 0; i < 8; ++i) s32[i] = (int32_t)s[8 * v + i];
        __m256 out = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_load_si256((const __m256i*)s32)),
                                     _mm256_loadu_ps(c.scale + o), _mm256_loadu_ps(c.shift + o));
        if (res) out = _mm256_add_ps(out, _mm256_maskload_ps(res + 8 * v, lanes));
        if (c.bias) out = _mm256_add_ps(out, _mm256_maskload_ps(c.bias + o, lanes));
        if (c.slope)
            out = _mm256_blendv_ps(_mm256_mul_ps(out, _mm256_maskload_ps(c.slope + o, lanes)), out,
                                   _mm256_cmp_ps(out, zero, _CMP_GT_OQ));
        if (c.bias_out) out = _mm256_add_ps(out, _mm256_maskload_ps(c.bias_out + o, lanes));
        _mm256_maskstore_ps(y + 8 * v, lanes, out);
    }
}

BC_TARGET("avx2,fma,popcnt") void conv_rows_avx2(const Conv& c, int64_t first, int64_t last) {
    constexpr int R = 2, V = OB / 4;  // 2 pixels x 8 vectors of 4 outputs
    const int64_t K = (int64_t)c.taps.size() * c.words;
    Cursor at(c, first);
    for (int64_t i0 = first; i0 < last; i0 += R) {
        const int64_t* px[R];
        int64_t pm[R];
        const int64_t valid = std::min<int64_t>(R, last - i0);
        gather<R>(c, at, valid, px, pm);
        for (int64_t b = 0; b < c.blocks; ++b) {
            __m256i acc[R][V];
            for (int r = 0; r < R; ++r)
                for (int v = 0; v < V; ++v) acc[r][v] = _mm256_setzero_si256();
            const int64_t* wq = c.weights + b * K * OB;
            for (int64_t off : c.taps)
                for (int64_t w = 0; w < c.words; ++w, wq += OB)
                    for (int r = 0; r < R; ++r) {
                        const __m256i m = _mm256_set1_epi64x(px[r][off + 2 * w]);
                        const __m256i p = _mm256_set1_epi64x(px[r][off + 2 * w + 1]);
                        for (int v = 0; v < V; ++v) {
                            const __m256i q = _mm256_loadu_si256((const __m256i*)(wq + 4 * v));
                            acc[r][v] = _mm256_add_epi64(
                                acc[r][v], popcount256(_mm256_and_si256(_mm256_xor_si256(p, q), m)));
                        }
                    }
            for (int r = 0; r < valid; ++r) {
                alignas(32) int64_t s[OB];
                const __m256i count = _mm256_set1_epi64x(pm[r]);
                for (int v = 0; v < V; ++v)
                    _mm256_store_si256((__m256i*)(s + 4 * v),
                                       _mm256_sub_epi64(count, _mm256_add_epi64(acc[r][v], acc[r][v])));
                correct_zero_weights(c, px[r], b, s);
                finish_avx2(c, i0 + r, b, s);
            }
        }
        pack_next<pack_pixel_avx2>(c, i0, valid);
    }
}

// ---- AVX-512 VPOPCNTDQ: (p xor q) and m in one vpternlogq, then vpopcntq ----

BC_TARGET(BC_AVX512) void conv_rows_avx512(const Conv& c, int64_t first, int64_t last) {
    constexpr int R = 4, V = OB / 8;  // 4 pixels x 4 vectors of 8 outputs: 16 accumulators
    const int64_t K = (int64_t)c.taps.size() * c.words;
    const __m256 zero = _mm256_setzero_ps();
    Cursor at(c, first);
    for (int64_t i0 = first; i0 < last; i0 += R) {
        const int64_t* px[R];
        int64_t pm[R];
        const int64_t valid = std::min<int64_t>(R, last - i0);
        gather<R>(c, at, valid, px, pm);
        for (int64_t b = 0; b < c.blocks; ++b) {
            __m512i acc[R][V];
            for (int r = 0; r < R; ++r)
                for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_si512();
            const int64_t* wq = c.weights + b * K * OB;
            for (int64_t off : c.taps)
                for (int64_t w = 0; w < c.words; ++w, wq += OB) {
                    __m512i q[V];
                    for (int v = 0; v < V; ++v) q[v] = _mm512_loadu_si512(wq + 8 * v);
                    for (int r = 0; r < R; ++r) {
                        const __m512i m = _mm512_set1_epi64(px[r][off + 2 * w]);
                        const __m512i p = _mm512_set1_epi64(px[r][off + 2 * w + 1]);
                        for (int v = 0; v < V; ++v)  // 0x28: (p ^ q) & m
                            acc[r][v] = _mm512_add_epi64(
                                acc[r][v], _mm512_popcnt_epi64(_mm512_ternarylogic_epi64(p, q[v], m, 0x28)));
                    }
                }
            const int64_t base = b * OB, outputs = std::min<int64_t>(OB, c.out - base);
            for (int r = 0; r < valid; ++r) {
                alignas(64) int64_t s[OB];
                const __m512i count = _mm512_set1_epi64(pm[r]);
                for (int v = 0; v < V; ++v)
                    _mm512_store_si512(s + 8 * v, _mm512_sub_epi64(count, _mm512_add_epi64(acc[r][v], acc[r][v])));
                correct_zero_weights(c, px[r], b, s);
                const int64_t pixel = i0 + r;
                const float* res = c.residual ? c.residual + pixel * c.residual_stride + base : nullptr;
                float* y = c.y + pixel * c.y_stride + base;
                for (int v = 0; v < V && 8 * v < outputs; ++v) {
                    const int64_t o = base + 8 * v;
                    const __mmask8 lanes = (__mmask8)((1u << std::min<int64_t>(8, outputs - 8 * v)) - 1);
                    __m256 out = _mm256_fmadd_ps(_mm512_cvtepi64_ps(_mm512_load_si512(s + 8 * v)),
                                                 _mm256_loadu_ps(c.scale + o), _mm256_loadu_ps(c.shift + o));
                    if (res) out = _mm256_add_ps(out, _mm256_maskz_loadu_ps(lanes, res + 8 * v));
                    if (c.bias) out = _mm256_add_ps(out, _mm256_maskz_loadu_ps(lanes, c.bias + o));
                    if (c.slope)
                        out = _mm256_mask_blend_ps(_mm256_cmp_ps_mask(out, zero, _CMP_GT_OQ),
                                                   _mm256_mul_ps(out, _mm256_maskz_loadu_ps(lanes, c.slope + o)), out);
                    if (c.bias_out) out = _mm256_add_ps(out, _mm256_maskz_loadu_ps(lanes, c.bias_out + o));
                    _mm256_mask_storeu_ps(y + 8 * v, lanes, out);
                }
            }
        }
        pack_next<pack_pixel_avx512>(c, i0, valid);
    }
}

#endif  // BC_X86

// ---- packing a tensor ----

struct Pack {
    const float* u;
    const float* bias;
    int64_t h, w, channels, pad, words;
    int64_t* planes;

    // Zeroes padded row i (flat over n, h + 2 pad) and its border; returns its first input
    // pixel and, in `out`, where that pixel's words go, or nullptr for a row of padding.
    const float* row(int64_t i, int64_t** out) const {
        const int64_t hp = h + 2 * pad, wp = w + 2 * pad, step = words * 2, y = i % hp - pad, b = i / hp;
        int64_t* dst = planes + i * wp * step;
        if (y < 0 || y >= h) {
            std::fill(dst, dst + wp * step, 0);
            return nullptr;
        }
        std::fill(dst, dst + pad * step, 0);
        std::fill(dst + (pad + w) * step, dst + wp * step, 0);
        *out = dst + pad * step;
        return u + (b * h + y) * w * channels;
    }
};

template <PackPixel pack_pixel>
void pack_rows(const Pack& p, int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
        int64_t* dst;
        const float* src = p.row(i, &dst);
        for (int64_t x = 0; src && x < p.w; ++x)
            pack_pixel(src + x * p.channels, p.bias, p.channels, dst + x * p.words * 2);
    }
}

// Splits [0, total) over the threads in chunks of a multiple of 4 items (every path's R), each of at
// least `min_items` (a few tens of microseconds of work: a thread costs more for less) and enough
// of them to balance the load; handed out as the threads come (a thread the OS holds back leaves its
// share to the others).
template <class F>
void parallel(int64_t total, int64_t min_items, int threads, F body) {
    const int64_t grain = (std::max(min_items, total / (8 * std::max(threads, 1))) + 3) / 4 * 4;
    const int64_t chunks = (total + grain - 1) / grain;
#pragma omp parallel for schedule(dynamic) num_threads(threads) if (threads > 1 && chunks > 1)
    for (int64_t i = 0; i < chunks; ++i) body(i * grain, std::min(total, (i + 1) * grain));
}

}  // namespace

extern "C" {

// Bit i set: path i runs on this CPU.
int bc_supported() {
    int paths = 1;
#if BC_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) paths |= 2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("fma"))
        paths |= 4;
#endif
    return paths;
}

// u: float [n][h][w][channels], bias: [channels] or null -> planes: int64 [n][h + 2 pad][w + 2 pad][words][2].
void bc_pack(const float* u, const float* bias, int64_t n, int64_t h, int64_t w, int64_t channels, int64_t pad,
             int64_t* planes, int path, int threads) {
    const Pack p{u, bias, h, w, channels, pad, (channels + 63) / 64, planes};
    auto rows = pack_rows<pack_pixel_scalar>;
#if BC_X86
    if (path == 2) rows = pack_rows<pack_pixel_avx512>;
    else if (path == 1) rows = pack_rows<pack_pixel_avx2>;
#endif
    const int64_t row = (w + 2 * pad) * channels;
    parallel(n * (h + 2 * pad), (1 << 16) / row + 1, threads,
             [&](int64_t first, int64_t last) { rows(p, first, last); });
}

void bc_conv(const bc_conv_args* args, int path, int threads) {
    Conv c{*args, {}, (args->out + OB - 1) / OB, args->n * args->ho * args->wo, (args->out + 63) / 64};
    for (int64_t dy = 0; dy < c.k; ++dy)
        for (int64_t dx = 0; dx < c.k; ++dx) c.taps.push_back((dy * c.wp + dx) * c.words * 2);
    auto rows = conv_rows_scalar;
#if BC_X86
    if (path == 2) rows = conv_rows_avx512;
    else if (path == 1) rows = conv_rows_avx2;
#endif
    // Work per pixel in (word, output) pairs, the epilogue counted as 4 words.
    const int64_t work = ((int64_t)c.taps.size() * c.words + 4) * c.blocks * OB;
    parallel(c.pixels, (1 << 18) / work + 1, threads, [&](int64_t first, int64_t last) { rows(c, first, last); });
}

}  // extern "C"
