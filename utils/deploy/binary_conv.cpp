// The binary convs of the packed ReActNet-A (utils.export) on the CPU, in plain C++ (no torch
// headers: it compiles in seconds), called through ctypes by utils/deploy/kernel.py.
//
// Activations are packed per pixel, channels last, 32 channels to an int32 word, as two bit-planes:
// m (nonzero) and p (positive), a pixel's m words then its p words, with a zero border: a padded
// tap has m = 0 and contributes nothing. A conv output is
//     s = popcount(m) - 2 popcount(m & (p xor q))   over its taps' words,
// q the weight sign bits, plus the exact correction for the weights that are exactly 0; then
// y = fma(float(s), scale, shift), one rounding, as torch.addcmul on the CPU.
//
// bc_block runs a whole models.reactnet.BasicBlock in one call: sign(x + bias) packed, the 3x3
// conv, the shortcut (x, or its 2x2 average as nn.AvgPool2d computes it), the bias, PReLU and bias
// after it, sign(. + bias) packed in registers for the 1x1 conv(s), and their float parts. Each
// float part is the same float32 operation, in the same order, as PyTorch's (built with
// -ffp-contract=off: no multiply-add is fused that PyTorch rounds twice), so the values are the
// same as BasicBlock.forward's. Images go through a block a few at a time, so that the packed
// planes and the float intermediate stay in the caches. A lone conv is a block without the rest.
//
// Weights come in blocks of B = 32 or 64 output channels, [out / B][taps * words][B]: one word of
// one tap for B consecutive outputs is contiguous, so a vector of outputs is one load and each
// input word is broadcast (no horizontal sums). Each path is register-blocked over R output pixels
// x B outputs (AVX-512: 4 pixels x 64 outputs, 16 accumulators).
//
// Threads: a pool of its own. Each step (packing, each conv) is cut into chunks of pixels that the
// calling thread and the helpers take from one atomic counter; the caller never waits for a helper
// to start, only for a chunk a helper has taken to end, so a helper the OS holds back (another
// process on the core) costs little; and where a step took nearly as long as the caller would have
// alone, it works alone for a while (twice as long each time, half as long after 200 steps that
// paid). Helpers spin briefly between steps, then sleep.
//
// Paths, chosen per call by the caller from bc_supported(): 0 scalar (hardware popcnt where the CPU
// has it), 1 AVX2 (popcount by nibble lookup, Mula et al.), 2 AVX-512 VPOPCNTDQ.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <numeric>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define BC_X86 1
#define BC_TARGET(t) __attribute__((target(t)))
#define BC_SCALAR_CLONES __attribute__((target_clones("popcnt", "default")))
#define BC_PAUSE() _mm_pause()
#else
#define BC_X86 0
#define BC_TARGET(t)
#define BC_SCALAR_CLONES
#define BC_PAUSE() std::this_thread::yield()
#endif
#define BC_INLINE inline __attribute__((always_inline))
#define BC_AVX512 "avx512f,avx512dq,avx512vl,avx512bw,avx512vpopcntdq,fma,popcnt"

extern "C" {
// One binary conv, its weights blocked; _Conv in utils/deploy/kernel.py mirrors it field by field.
struct bc_conv {
    int64_t k, stride, in, out, block;  // block: output channels per weight block, 32 or 64
    const int32_t* weights;             // [out / block][k * k * words][block], words = ceil(in / 32)
    const float* scale;                 // [out rounded up to block] each
    const float* shift;
    const int32_t* zeros;       // [nzeros][3]: (output channel, word of its row: tap * words + word, bit)
    const int64_t* zero_start;  // [blocks + 1]: block b's zeros are [zero_start[b], zero_start[b + 1])
    const int32_t* tap_ones;    // [blocks][k * k][block]: set bits of each tap's weights (bc_tap_ones)
};

// One block (or a lone conv: b.out = 0, no residual, null float parts); _Block in kernel.py.
struct bc_block_args {
    const float* x;  // [n][h][w][x_stride], its first a.in channels
    int64_t n, h, w, x_stride;
    const float* input_bias;  // sign(x + input_bias) is a's input
    bc_conv a;
    int64_t residual;  // add x (stride 1) or its 2x2 average (stride 2) to a's output
    const float *bias1, *slope1, *bias_out1;  // then + bias1, prelu(slope1), + bias_out1
    const float* next_bias;                   // b's input: sign(a's output + next_bias)
    bc_conv b;                                // the 1x1 conv(s); out = 0: none
    const float *bias2, *slope2, *bias_out2;  // b's output + a's output (channel o % a.out), then these
    float* y;  // [n][ho][wo][y_stride]: b's output, else a's
    int64_t y_stride;
};
// Every float vector above (bias1 ... bias_out2) has its conv's out rounded up to its block; null:
// skipped.
}

namespace {

int64_t words_of(int64_t channels) { return (channels + 31) / 32; }

// ---- the pool ----

class Pool {
   public:
    static Pool& get() {
        static Pool* pool = new Pool;  // never destroyed: its threads live as long as the process
        return *pool;
    }

    // body(c) for c in [0, chunks), on up to `threads` threads, the caller one of them.
    template <class F>
    void run(int threads, int64_t chunks, const F& body) {
        if (threads <= 1 || chunks <= 1 || !busy_.try_lock()) {
            for (int64_t c = 0; c < chunks; ++c) body(c);
            return;
        }
        if (Clock::now() < alone_until_) {
            busy_.unlock();
            for (int64_t c = 0; c < chunks; ++c) body(c);
            return;
        }
        for (; helpers_ < threads - 1; ++helpers_) std::thread(&Pool::help, this, helpers_).detach();
        fn_ = [](const void* f, int64_t c) { (*static_cast<const F*>(f))(c); };
        ctx_ = &body;
        finished_.store(0, std::memory_order_relaxed);
        wanted_.store(threads - 1, std::memory_order_relaxed);
        state_.store((uint64_t)chunks << 32, std::memory_order_release);
        generation_.fetch_add(1, std::memory_order_seq_cst);
        generation_.notify_all();
        const auto start = Clock::now();
        const int64_t done = work();
        // Only the chunks helpers took are left; a long wait means the helpers share their cores.
        const auto mine = Clock::now();
        for (int spins = 0; finished_.load(std::memory_order_acquire) != chunks; ++spins)
            spins < 2000 ? BC_PAUSE() : std::this_thread::yield();
        const auto end = Clock::now();
        // Nearly as long as the caller alone would have taken, at its own pace: helpers did not pay.
        if (done && end - mine > std::chrono::microseconds(20) && (end - start) * 10 * done > (mine - start) * 9 * chunks) {
            alone_until_ = end + alone_for_;  // and again twice as long, up to a second, while it lasts
            alone_for_ = std::min<Clock::duration>(2 * alone_for_, std::chrono::seconds(1));
            calm_ = 0;
        } else if (++calm_ % 200 == 0) {
            alone_for_ = std::max<Clock::duration>(alone_for_ / 2, std::chrono::milliseconds(10));
        }
        busy_.unlock();
    }

   private:
    using Clock = std::chrono::steady_clock;

    bool claim(int64_t& chunk) {
        uint64_t s = state_.load(std::memory_order_acquire);
        while ((uint32_t)s < (uint32_t)(s >> 32))
            if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
                chunk = (uint32_t)s;
                return true;
            }
        return false;
    }

    // Chunks of the current step until none is left. fn_ and ctx_ are read only after a claim: the
    // step cannot end before that chunk does, so they are this step's.
    int64_t work() {
        int64_t done = 0;
        for (int64_t c; claim(c); ++done) {
            fn_(ctx_, c);
            finished_.fetch_add(1, std::memory_order_release);
        }
        return done;
    }

    void help(int index) {
        uint32_t seen = generation_.load(std::memory_order_acquire);
        for (;;) {
            const auto start = Clock::now();
            for (int spins = 0; generation_.load(std::memory_order_acquire) == seen; ++spins) {
                BC_PAUSE();
                if (spins % 64 == 63 && Clock::now() - start > std::chrono::microseconds(300))
                    generation_.wait(seen, std::memory_order_acquire);
            }
            seen = generation_.load(std::memory_order_acquire);
            if (index < wanted_.load(std::memory_order_relaxed)) (void)work();
        }
    }

    std::mutex busy_;  // one step at a time; a second caller meanwhile works alone
    int helpers_ = 0;
    Clock::time_point alone_until_{};  // the caller works alone until then: helpers were held back
    Clock::duration alone_for_ = std::chrono::milliseconds(10);
    int64_t calm_ = 0;  // steps in a row that paid
    void (*fn_)(const void*, int64_t) = nullptr;
    const void* ctx_ = nullptr;
    alignas(64) std::atomic<uint64_t> state_{0};  // (chunks << 32) | next chunk
    alignas(64) std::atomic<int64_t> finished_{0};
    alignas(64) std::atomic<uint32_t> generation_{0};
    std::atomic<int> wanted_{0};
};

// body(first, last) over [0, total) in chunks of a multiple of `step` items, each at least
// `min_items` and small enough to share out unevenly.
template <class F>
void parallel(int threads, int64_t total, int64_t min_items, int64_t step, const F& body) {
    int64_t grain = std::max(min_items, total / (8 * std::max(threads, 1)));
    grain = (grain + step - 1) / step * step;
    const int64_t chunks = (total + grain - 1) / grain;
    Pool::get().run(threads, chunks, [&](int64_t c) { body(c * grain, std::min(total, (c + 1) * grain)); });
}

// ---- packing: m = u + bias != 0 (NaN too, as in the pure path), p = u + bias > 0 ----

// One pixel's channels -> its m words then its p words; whether a channel is exactly 0 (m not full).
using PackPixel = bool (*)(const float* u, const float* bias, int64_t channels, int32_t* out);

BC_INLINE uint32_t full_word(int64_t channels, int64_t w) {
    return channels - 32 * w >= 32 ? ~0u : (1u << (channels - 32 * w)) - 1;
}

bool pack_pixel_scalar(const float* u, const float* bias, int64_t channels, int32_t* out) {
    const int64_t words = words_of(channels);
    bool zero = false;
    for (int64_t w = 0; w < words; ++w) {
        uint32_t m = 0, p = 0;
        for (int64_t i = 0; i < std::min<int64_t>(32, channels - 32 * w); ++i) {
            const float v = bias ? u[32 * w + i] + bias[32 * w + i] : u[32 * w + i];
            m |= (uint32_t)(v != 0) << i;
            p |= (uint32_t)(v > 0) << i;
        }
        out[w] = (int32_t)m;
        out[words + w] = (int32_t)p;
        zero |= m != full_word(channels, w);
    }
    return zero;
}

#if BC_X86
BC_TARGET("avx2") bool pack_pixel_avx2(const float* u, const float* bias, int64_t channels, int32_t* out) {
    if (channels % 8) return pack_pixel_scalar(u, bias, channels, out);
    const int64_t words = words_of(channels);
    const __m256 zero = _mm256_setzero_ps();
    bool any = false;
    for (int64_t w = 0; w < words; ++w) {
        uint32_t m = 0, p = 0;
        for (int g = 0; g < 4 && 32 * w + 8 * g < channels; ++g) {
            const int64_t i = 32 * w + 8 * g;
            __m256 v = _mm256_loadu_ps(u + i);
            if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + i));
            m |= (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_NEQ_UQ)) << (8 * g);
            p |= (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_GT_OQ)) << (8 * g);
        }
        out[w] = (int32_t)m;
        out[words + w] = (int32_t)p;
        any |= m != full_word(channels, w);
    }
    return any;
}

BC_TARGET(BC_AVX512) bool pack_pixel_avx512(const float* u, const float* bias, int64_t channels, int32_t* out) {
    const int64_t words = words_of(channels);
    const __m512 zero = _mm512_setzero_ps();
    bool any = false;
    for (int64_t w = 0; w < words; ++w) {
        uint32_t m = 0, p = 0;
        for (int g = 0; g < 2; ++g) {
            const int64_t i = 32 * w + 16 * g, n = channels - i;
            if (n <= 0) break;
            const __mmask16 valid = n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1);
            __m512 v = _mm512_maskz_loadu_ps(valid, u + i);
            if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(valid, bias + i));
            m |= (uint32_t)_mm512_mask_cmp_ps_mask(valid, v, zero, _CMP_NEQ_UQ) << (16 * g);
            p |= (uint32_t)_mm512_mask_cmp_ps_mask(valid, v, zero, _CMP_GT_OQ) << (16 * g);
        }
        out[w] = (int32_t)m;
        out[words + w] = (int32_t)p;
        any |= m != full_word(channels, w);
    }
    return any;
}
#endif

// x [images][h][w][x_stride] -> planes [images][h + 2 pad][w + 2 pad][2 words] with a zero border.
struct Pack {
    const float* x;
    const float* bias;
    int64_t h, w, x_stride, channels, pad, words;
    int32_t* planes;
    mutable std::atomic<bool> zero{false};  // an input exactly 0
};

template <PackPixel pack_pixel>
void pack_rows(const Pack& p, int64_t first, int64_t last) {
    bool zero = false;
    const int64_t hp = p.h + 2 * p.pad, wp = p.w + 2 * p.pad, step = 2 * p.words;
    for (int64_t i = first; i < last; ++i) {
        int32_t* dst = p.planes + i * wp * step;
        const int64_t y = i % hp - p.pad, image = i / hp;
        if (y < 0 || y >= p.h) {
            std::fill(dst, dst + wp * step, 0);
            continue;
        }
        std::fill(dst, dst + p.pad * step, 0);
        std::fill(dst + (p.pad + p.w) * step, dst + wp * step, 0);
        const float* src = p.x + (image * p.h + y) * p.w * p.x_stride;
        for (int64_t x = 0; x < p.w; ++x)
            zero |= pack_pixel(src + x * p.x_stride, p.bias, p.channels, dst + (p.pad + x) * step);
    }
    if (zero) p.zero.store(true, std::memory_order_relaxed);
}

// ---- the conv: shared parts ----

// One conv over the pixels of a few images, and the float parts after it.
struct Stage {
    const bc_conv* conv;
    int64_t words, blocks, taps;  // words per tap and pixel; `taps` = k * k
    const int32_t* planes;        // [images][hp][wp][2 words]
    int64_t hp, wp, ho, wo, pixels;
    std::vector<int32_t> offsets;  // per word of a weight row: its m word's offset from the pixel's first
    // Whether the input holds a value exactly 0 (m not full off the border).
    const std::atomic<bool>* zero_in;
    // The float parts: y = fma(s, scale, shift), + residual, + bias, prelu(slope), + bias_out; then
    // sign(y + next_bias) packed into `next` [images][ho + 2 next_pad][wo + 2 next_pad][2 next_words]
    // (its border left as it is), `next_zero` set where one is exactly 0.
    int pool = 0;  // residual: 0 none, 1 `res` at the pixel (channel o % res_channels), 2 the 2x2 average of `res`
    const float* res = nullptr;
    int64_t res_stride = 0, res_channels = 1, h = 0, w = 0, ph = 0, pw = 0;  // pool 2: res's size, pooled size
    const float *bias = nullptr, *slope = nullptr, *bias_out = nullptr, *next_bias = nullptr;
    float* y = nullptr;
    int64_t y_stride = 0;
    int32_t* next = nullptr;
    int64_t next_words = 0, next_pad = 0;
    std::atomic<bool>* next_zero = nullptr;
};

// Stores word w of a pixel's packed outputs (`next`: the pixel's): nonzero bits m, positive bits p;
// marks one exactly 0 (m not full).
BC_INLINE void put_next(const Stage& st, int32_t* next, int64_t w, uint32_t m, uint32_t p) {
    next[w] = (int32_t)m;
    next[st.next_words + w] = (int32_t)p;
    if (m != full_word(st.conv->out, w)) st.next_zero->store(true, std::memory_order_relaxed);
}

// Where one output pixel's inputs and outputs are.
struct Pixel {
    const int32_t* in;  // its packed input at tap (0, 0)
    int32_t ones;       // popcount(m) over its taps
    uint32_t padded;    // bit t: tap t is in the zero border
    bool whole;         // m has every channel of every tap off the border: no input exactly 0
    const float* res[4];
    float* y;
    int32_t* next;
};

// Walks the output pixels (flat over image, row, column) in order, without a division per pixel.
struct Cursor {
    const Stage& st;
    const bool zeros;
    int64_t i, image, row, col;
    Cursor(const Stage& stage, int64_t first)
        : st(stage), zeros(stage.zero_in->load(std::memory_order_relaxed)), i(first),
          image(first / (stage.ho * stage.wo)), row(first / stage.wo % stage.ho), col(first % stage.wo) {}

    Pixel get() const {
        const Stage& s = st;
        const int64_t stride = s.conv->stride;
        Pixel p;
        p.in = s.planes + ((image * s.hp + row * stride) * s.wp + col * stride) * 2 * s.words;
        const int64_t k = s.conv->k, pad = k / 2, y0 = row * stride - pad, x0 = col * stride - pad;
        p.padded = 0;
        if (y0 < 0 || y0 + k > s.hp - 2 * pad || x0 < 0 || x0 + k > s.wp - 2 * pad)
            for (int64_t t = 0; t < s.taps; ++t) {
                const int64_t y = y0 + t / k, x = x0 + t % k;
                if (y < 0 || y >= s.hp - 2 * pad || x < 0 || x >= s.wp - 2 * pad) p.padded |= 1u << t;
            }
        const int32_t whole = s.conv->in * (s.taps - __builtin_popcount(p.padded));
        if (zeros) {
            p.ones = 0;
            for (int64_t t = 0; t < s.taps; ++t)
                for (int64_t w = 0; w < s.words; ++w) p.ones += __builtin_popcount((uint32_t)p.in[s.offsets[t * s.words + w]]);
        } else {
            p.ones = whole;
        }
        p.whole = p.ones == whole;
        if (s.pool == 1) {
            p.res[0] = s.res + i * s.res_stride;
        } else if (s.pool == 2) {  // a pooled size of 1 broadcasts, as PyTorch's addition does
            const int64_t y = 2 * (s.ph == 1 ? 0 : row), x = 2 * (s.pw == 1 ? 0 : col);
            for (int d = 0; d < 4; ++d) p.res[d] = s.res + ((image * s.h + y + d / 2) * s.w + x + d % 2) * s.res_stride;
        }
        p.y = s.y + i * s.y_stride;
        const int64_t np = s.next_pad;
        p.next = s.next ? s.next + ((image * (s.ho + 2 * np) + row + np) * (s.wo + 2 * np) + col + np) * 2 * s.next_words
                        : nullptr;
        return p;
    }
    void next() {
        ++i;
        if (++col < st.wo) return;
        col = 0;
        if (++row < st.ho) return;
        row = 0;
        ++image;
    }
};

// The next R pixels from `at` (past `valid` of them, the last valid one again); advances `at`.
template <int R>
BC_INLINE void gather(Cursor& at, int64_t valid, Pixel px[R]) {
    for (int r = 0; r < R; ++r) {
        if (r < valid) {
            px[r] = at.get();
            at.next();
        } else {
            px[r] = px[r - 1];
        }
    }
}

// Weights exactly 0 were packed as -1: add back what they took, sign(input) at their bit, to s of
// the outputs [base, base + count).
BC_INLINE void correct_zero_weights(const Stage& st, const Pixel& px, int64_t block, int64_t base, int64_t count,
                                    int32_t* s) {
    const bc_conv& c = *st.conv;
    for (int64_t z = c.zero_start[block]; z < c.zero_start[block + 1]; ++z) {
        const int64_t o = c.zeros[3 * z] - base;
        if (o < 0 || o >= count) continue;
        const int32_t* a = px.in + st.offsets[c.zeros[3 * z + 1]];
        const int bit = c.zeros[3 * z + 2];
        const int32_t m = ((uint32_t)a[0] >> bit) & 1, p = ((uint32_t)a[st.words] >> bit) & 1;
        s[o] += m * (2 * p - 1);
    }
}

// The float parts of `count` outputs from `base` of one pixel, from their sums s, one at a time.
BC_INLINE void finish_scalar(const Stage& st, const Pixel& px, int64_t base, int64_t count, const int32_t* s) {
    uint32_t m = 0, p = 0;
    for (int64_t j = 0; j < count; ++j) {
        const int64_t o = base + j;
        float v = __builtin_fmaf((float)s[j], st.conv->scale[o], st.conv->shift[o]);
        if (st.pool == 1) {
            v = v + px.res[0][o < st.res_channels ? o : o - st.res_channels];  // out <= 2 res_channels
        } else if (st.pool == 2) {
            float sum = 0;
            for (int d = 0; d < 4; ++d) sum += px.res[d][o];
            v = v + sum * 0.25f;  // = sum / 4 exactly, as nn.AvgPool2d
        }
        if (st.bias) v = v + st.bias[o];
        if (st.slope) v = v > 0 ? v : v * st.slope[o];
        if (st.bias_out) v = v + st.bias_out[o];
        px.y[o] = v;
        if (px.next) {
            const float t = v + st.next_bias[o];
            m |= (uint32_t)(t != 0) << (o % 32);
            p |= (uint32_t)(t > 0) << (o % 32);
            if (o % 32 == 31 || j == count - 1) {
                put_next(st, px.next, o / 32, m, p);
                m = p = 0;
            }
        }
    }
}

// ---- scalar ----

BC_SCALAR_CLONES void conv_scalar(const Stage& st, int64_t first, int64_t last) {
    const bc_conv& c = *st.conv;
    const int64_t B = c.block, K = st.taps * st.words;
    Cursor at(st, first);
    std::vector<int32_t> acc(B);
    for (int64_t i = first; i < last; ++i) {
        Pixel px[1];
        gather<1>(at, 1, px);
        for (int64_t b = 0; b < st.blocks; ++b) {
            std::fill(acc.begin(), acc.end(), 0);
            const int32_t* wq = c.weights + b * K * B;
            for (int64_t kk = 0; kk < K; ++kk, wq += B) {
                const uint32_t m = px[0].in[st.offsets[kk]], p = px[0].in[st.offsets[kk] + st.words];
                for (int64_t o = 0; o < B; ++o) acc[o] += __builtin_popcount((p ^ (uint32_t)wq[o]) & m);
            }
            for (int64_t o = 0; o < B; ++o) acc[o] = px[0].ones - 2 * acc[o];
            const int64_t count = std::min(B, c.out - b * B);
            correct_zero_weights(st, px[0], b, b * B, count, acc.data());
            finish_scalar(st, px[0], b * B, count, acc.data());
        }
    }
}

#if BC_X86

// ---- AVX2: popcount of each byte by two 16-entry lookups, summed in bytes, then in int32 lanes ----

BC_TARGET("avx2,fma,popcnt") BC_INLINE __m256i popcount_bytes(__m256i x) {
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f);
    return _mm256_add_epi8(_mm256_shuffle_epi8(lut, _mm256_and_si256(x, low)),
                           _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(x, 4), low)));
}

// finish_scalar for 32 outputs in vectors of 8 (the same operations: the same values).
BC_TARGET("avx2,fma") BC_INLINE void finish_avx2(const Stage& st, const Pixel& px, int64_t base, int64_t count,
                                                 const int32_t* s) {
    const __m256 zero = _mm256_setzero_ps();
    uint32_t m = 0, p = 0;
    for (int v = 0; v < 4 && 8 * v < count; ++v) {
        const int64_t o = base + 8 * v;
        const __m256i lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)std::min<int64_t>(8, count - 8 * v)),
                                                 _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        __m256 out = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i*)(s + 8 * v))),
                                     _mm256_loadu_ps(st.conv->scale + o), _mm256_loadu_ps(st.conv->shift + o));
        if (st.pool == 1) {
            out = _mm256_add_ps(out, _mm256_maskload_ps(px.res[0] + (o < st.res_channels ? o : o - st.res_channels), lanes));
        } else if (st.pool == 2) {
            __m256 sum = zero;
            for (int d = 0; d < 4; ++d) sum = _mm256_add_ps(sum, _mm256_maskload_ps(px.res[d] + o, lanes));
            out = _mm256_add_ps(out, _mm256_mul_ps(sum, _mm256_set1_ps(0.25f)));
        }
        if (st.bias) out = _mm256_add_ps(out, _mm256_loadu_ps(st.bias + o));
        if (st.slope)
            out = _mm256_blendv_ps(_mm256_mul_ps(out, _mm256_loadu_ps(st.slope + o)), out,
                                   _mm256_cmp_ps(out, zero, _CMP_GT_OQ));
        if (st.bias_out) out = _mm256_add_ps(out, _mm256_loadu_ps(st.bias_out + o));
        _mm256_maskstore_ps(px.y + o, lanes, out);
        if (px.next) {
            const __m256 t = _mm256_add_ps(out, _mm256_loadu_ps(st.next_bias + o));
            const uint32_t valid = (1u << std::min<int64_t>(8, count - 8 * v)) - 1;
            m |= ((uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(t, zero, _CMP_NEQ_UQ)) & valid) << (8 * v);
            p |= ((uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(t, zero, _CMP_GT_OQ)) & valid) << (8 * v);
        }
    }
    if (px.next) {
        put_next(st, px.next, base / 32, m, p);
    }
}

// 2 pixels x 32 outputs at a time (a 64-output block in two halves).
BC_TARGET("avx2,fma,popcnt") void conv_avx2(const Stage& st, int64_t first, int64_t last) {
    constexpr int R = 2, V = 4;
    const bc_conv& c = *st.conv;
    const int64_t B = c.block, K = st.taps * st.words, W = st.words;
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    Cursor at(st, first);
    for (int64_t i0 = first; i0 < last; i0 += R) {
        Pixel px[R];
        const int64_t valid = std::min<int64_t>(R, last - i0);
        gather<R>(at, valid, px);
        for (int64_t base = 0; base < c.out; base += 32) {
            const int64_t block = base / B;
            alignas(32) int32_t s[R][32] = {};
            __m256i acc[R][V];
            for (int r = 0; r < R; ++r)
                for (int v = 0; v < V; ++v) acc[r][v] = _mm256_setzero_si256();
            const int32_t* wq = c.weights + block * K * B + base % B;
            for (int64_t kk = 0; kk < K; ++kk, wq += B) {
                const int64_t off = st.offsets[kk];
                __m256i q[V];
                for (int v = 0; v < V; ++v) q[v] = _mm256_loadu_si256((const __m256i*)(wq + 8 * v));
                for (int r = 0; r < R; ++r) {
                    const __m256i m = _mm256_set1_epi32(px[r].in[off]), p = _mm256_set1_epi32(px[r].in[off + W]);
                    for (int v = 0; v < V; ++v)
                        acc[r][v] = _mm256_add_epi8(
                            acc[r][v], popcount_bytes(_mm256_and_si256(_mm256_xor_si256(p, q[v]), m)));
                }
                if (kk % 31 == 30 || kk == K - 1)  // a byte holds at most 31 words' 8
                    for (int r = 0; r < R; ++r)
                        for (int v = 0; v < V; ++v) {
                            const __m256i sum = _mm256_madd_epi16(_mm256_maddubs_epi16(acc[r][v], ones8), ones16);
                            __m256i* dst = (__m256i*)(s[r] + 8 * v);
                            _mm256_store_si256(dst, _mm256_add_epi32(_mm256_load_si256(dst), sum));
                            acc[r][v] = _mm256_setzero_si256();
                        }
            }
            const int64_t count = std::min<int64_t>(32, c.out - base);
            for (int r = 0; r < valid; ++r) {
                for (int o = 0; o < 32; ++o) s[r][o] = px[r].ones - 2 * s[r][o];
                correct_zero_weights(st, px[r], block, base, count, s[r]);
                finish_avx2(st, px[r], base, count, s[r]);
            }
        }
    }
}

// ---- AVX-512 VPOPCNTDQ: (p xor q) and m in one vpternlogd, then vpopcntd ----

// The float parts of a conv, known when it is compiled: POOL 0, a lone conv (y = fma(s, scale,
// shift) only); 1, + the residual at the pixel; 2, + the 2x2 average of the residual; then with
// POOL > 0 + bias, prelu, + bias_out; with NEXT, sign(y + next_bias) packed too. For `valid` pixels
// at once, so that each vector of per-channel values is loaded once for all of them.
// `sums`: the mismatches, popcount((p xor q) and m), or with `masked` false popcount(p xor q), which
// counts each border tap's weight bits too: taken off here (an input exactly 0 takes the masked way).
template <int R, int V, int POOL, bool NEXT>
BC_TARGET(BC_AVX512) BC_INLINE void finish_avx512(const Stage& st, const Pixel* px, int64_t valid, int64_t block,
                                                  int32_t (*sums)[16 * V], bool masked) {
    constexpr int B = 16 * V;
    const bc_conv& c = *st.conv;
    const int64_t base = block * B, count = std::min<int64_t>(B, c.out - base);
    const __m512 zero = _mm512_setzero_ps();
    uint32_t mended = 0;  // bit r: sums[r] holds s
    const bool zeros = c.zero_start[block] != c.zero_start[block + 1];
    for (int64_t r = 0; r < valid; ++r) {  // the sums s = ones - 2 mismatches where they need mending
        if (!(masked ? zeros : zeros || px[r].padded)) continue;
        __m512i s[V];
        for (int v = 0; v < V; ++v) s[v] = _mm512_load_si512(sums[r] + 16 * v);
        if (!masked)
            for (uint32_t taps = px[r].padded; taps; taps &= taps - 1) {
                const int32_t* ones = c.tap_ones + (block * st.taps + __builtin_ctz(taps)) * B;
                for (int v = 0; v < V; ++v) s[v] = _mm512_sub_epi32(s[v], _mm512_loadu_si512(ones + 16 * v));
            }
        for (int v = 0; v < V; ++v)
            _mm512_store_si512(sums[r] + 16 * v, _mm512_sub_epi32(_mm512_set1_epi32(px[r].ones), _mm512_add_epi32(s[v], s[v])));
        if (zeros) correct_zero_weights(st, px[r], block, base, count, sums[r]);
        mended |= 1u << r;
    }
    uint32_t m[R][(V + 1) / 2] = {}, p[R][(V + 1) / 2] = {};
    for (int v = 0; v < V; ++v) {
        const int64_t o = base + 16 * v;
        const __mmask16 lanes = count - 16 * v >= 16 ? (__mmask16)0xffff
                                : count > 16 * v     ? (__mmask16)((1u << (count - 16 * v)) - 1)
                                                     : (__mmask16)0;
        const int64_t ro = o < st.res_channels ? o : o - st.res_channels;  // out <= 2 res_channels
        const __m512 scale = _mm512_loadu_ps(c.scale + o), shift = _mm512_loadu_ps(c.shift + o);
        __m512 bias = zero, slope = zero, bias_out = zero, next_bias = zero;
        if (POOL) {
            bias = _mm512_loadu_ps(st.bias + o), slope = _mm512_loadu_ps(st.slope + o);
            bias_out = _mm512_loadu_ps(st.bias_out + o);
        }
        if (NEXT) next_bias = _mm512_loadu_ps(st.next_bias + o);
        for (int64_t r = 0; r < valid; ++r) {
            __m512i sum = _mm512_load_si512(sums[r] + 16 * v);
            if (!(mended >> r & 1)) sum = _mm512_sub_epi32(_mm512_set1_epi32(px[r].ones), _mm512_add_epi32(sum, sum));
            __m512 out = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, shift);
            if (POOL == 1) {
                out = _mm512_add_ps(out, _mm512_maskz_loadu_ps(lanes, px[r].res[0] + ro));
            } else if (POOL == 2) {
                __m512 sum = zero;
                for (int d = 0; d < 4; ++d) sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(lanes, px[r].res[d] + o));
                out = _mm512_add_ps(out, _mm512_mul_ps(sum, _mm512_set1_ps(0.25f)));
            }
            if (POOL) {
                out = _mm512_add_ps(out, bias);
                out = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(out, zero, _CMP_GT_OQ), _mm512_mul_ps(out, slope), out);
                out = _mm512_add_ps(out, bias_out);
            }
            _mm512_mask_storeu_ps(px[r].y + o, lanes, out);
            if (NEXT) {
                const __m512 t = _mm512_add_ps(out, next_bias);
                m[r][v / 2] |= (uint32_t)_mm512_mask_cmp_ps_mask(lanes, t, zero, _CMP_NEQ_UQ) << (16 * (v % 2));
                p[r][v / 2] |= (uint32_t)_mm512_mask_cmp_ps_mask(lanes, t, zero, _CMP_GT_OQ) << (16 * (v % 2));
            }
        }
    }
    if (NEXT)
        for (int64_t r = 0; r < valid; ++r)
            for (int64_t j = 0; j < (V + 1) / 2 && base / 32 + j < st.next_words; ++j)
                put_next(st, px[r].next, base / 32 + j, m[r][j], p[r][j]);
}

// Adds the mismatches of R pixels x V vectors of 16 outputs over a weight row to acc: with `masked`,
// popcount((p xor q) and m) (0x28 in one vpternlogd), else popcount(p xor q), a third fewer
// instructions (the caller mends the border taps).
template <int R, int V, bool masked>
BC_TARGET(BC_AVX512) BC_INLINE void mismatches(const Stage& st, const int32_t* const in[R], const int32_t* wq,
                                               __m512i acc[R][V]) {
    constexpr int B = 16 * V;
    const int64_t K = st.taps * st.words, W = st.words;
    const int32_t* offsets = st.offsets.data();
    for (int64_t kk = 0; kk < K; ++kk, wq += B) {
        const int64_t off = offsets[kk];
        __m512i q[V];
        for (int v = 0; v < V; ++v) q[v] = _mm512_loadu_si512(wq + 16 * v);
        for (int r = 0; r < R; ++r) {
            const __m512i p = _mm512_set1_epi32(in[r][off + W]);
            if (masked) {
                const __m512i m = _mm512_set1_epi32(in[r][off]);
                for (int v = 0; v < V; ++v)
                    acc[r][v] = _mm512_add_epi32(acc[r][v],
                                                 _mm512_popcnt_epi32(_mm512_ternarylogic_epi32(p, q[v], m, 0x28)));
            } else {
                for (int v = 0; v < V; ++v)
                    acc[r][v] = _mm512_add_epi32(acc[r][v], _mm512_popcnt_epi32(_mm512_xor_si512(p, q[v])));
            }
        }
    }
}

// R pixels x V vectors of 16 outputs: R * V accumulators, V weight vectors and the broadcasts in
// the 32 registers.
template <int R, int V, int POOL, bool NEXT>
BC_TARGET(BC_AVX512) void conv_avx512(const Stage& st, int64_t first, int64_t last) {
    constexpr int B = 16 * V;
    const int64_t K = st.taps * st.words;
    Cursor at(st, first);
    for (int64_t i0 = first; i0 < last; i0 += R) {
        Pixel px[R];
        const int64_t valid = std::min<int64_t>(R, last - i0);
        gather<R>(at, valid, px);
        const int32_t* in[R];
        bool masked = false;
        for (int r = 0; r < R; ++r) in[r] = px[r].in, masked |= !px[r].whole;
        for (int64_t b = 0; b < st.blocks; ++b) {
            __m512i acc[R][V];
            for (int r = 0; r < R; ++r)
                for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_si512();
            const int32_t* wq = st.conv->weights + b * K * B;
            if (masked)
                mismatches<R, V, true>(st, in, wq, acc);
            else
                mismatches<R, V, false>(st, in, wq, acc);
            alignas(64) int32_t sums[R][B];  // through memory: the accumulators stay in registers
            for (int r = 0; r < R; ++r)
                for (int v = 0; v < V; ++v) _mm512_store_si512(sums[r] + 16 * v, acc[r][v]);
            finish_avx512<R, V, POOL, NEXT>(st, px, valid, b, sums, masked);
        }
    }
}

#endif  // BC_X86

using ConvRows = void (*)(const Stage&, int64_t, int64_t);
using PackRows = void (*)(const Pack&, int64_t, int64_t);

// The path's conv for `conv` and the pixels it takes at a time.
#if BC_X86
template <int R, int V>
ConvRows conv_avx512_of(int pool, bool next) {
    if (pool == 0) return conv_avx512<R, V, 0, false>;
    if (next) return pool == 1 ? conv_avx512<R, V, 1, true> : conv_avx512<R, V, 2, true>;
    return pool == 1 ? conv_avx512<R, V, 1, false> : conv_avx512<R, V, 2, false>;
}
#endif

ConvRows conv_rows(int path, const bc_conv& conv, int pool, bool next, int64_t* step) {
    *step = 1;
#if BC_X86
    if (path == 2) {
        *step = conv.block == 64 ? 4 : 8;
        return conv.block == 64 ? conv_avx512_of<4, 4>(pool, next) : conv_avx512_of<8, 2>(pool, next);
    }
    if (path == 1) {
        *step = 2;
        return conv_avx2;
    }
#endif
    return conv_scalar;
}

PackRows pack_rows_of(int path) {
#if BC_X86
    if (path == 2) return pack_rows<pack_pixel_avx512>;
    if (path == 1) return pack_rows<pack_pixel_avx2>;
#endif
    return pack_rows<pack_pixel_scalar>;
}

// A conv of `st` made ready: its rows function, the pixels it takes at a time, its work per pixel in
// (word, output) pairs, the float parts counted as 8 words.
struct Ready {
    ConvRows rows;
    int64_t step, work;
};

Ready ready(Stage& st, int path) {
    const bc_conv& c = *st.conv;
    st.words = words_of(c.in);
    st.blocks = (c.out + c.block - 1) / c.block;
    st.taps = c.k * c.k;
    st.offsets.clear();
    for (int64_t dy = 0; dy < c.k; ++dy)
        for (int64_t dx = 0; dx < c.k; ++dx)
            for (int64_t w = 0; w < st.words; ++w) st.offsets.push_back((int32_t)((dy * st.wp + dx) * 2 * st.words + w));
    Ready r;
    r.rows = conv_rows(path, c, st.pool, st.next != nullptr, &r.step);
    r.work = (st.taps * st.words + 8) * st.blocks * c.block;
    return r;
}

// The conv `s`, then where `t` is not null the 1x1 conv `t` on its output (the same pixels): chunk by
// chunk, so that a chunk of s's output is still in the caches when t reads it.
void run_convs(Stage& s, Stage* t, int path, int threads) {
    const Ready a = ready(s, path), b = t ? ready(*t, path) : Ready{nullptr, 1, 0};
    const int64_t step = std::lcm(a.step, b.step);
    parallel(threads, s.pixels, (1 << 17) / (a.work + b.work) + 1, step, [&](int64_t first, int64_t last) {
        a.rows(s, first, last);
        if (t) b.rows(*t, first, last);
    });
}

// Bytes of the caches the images of one pass through a block may fill.
constexpr int64_t GROUP_BYTES = 1 << 20;

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

// tap_ones of `conv` (its other fields set): the set bits of each tap's weights, per output.
void bc_tap_ones(const bc_conv* conv, int32_t* tap_ones) {
    const int64_t words = words_of(conv->in), taps = conv->k * conv->k, B = conv->block;
    for (int64_t b = 0; b < (conv->out + B - 1) / B; ++b)
        for (int64_t t = 0; t < taps; ++t)
            for (int64_t o = 0; o < B; ++o) {
                int32_t n = 0;
                for (int64_t w = 0; w < words; ++w)
                    n += __builtin_popcount((uint32_t)conv->weights[((b * taps + t) * words + w) * B + o]);
                tap_ones[(b * taps + t) * B + o] = n;
            }
}

// Packed planes of the images of a call, with a zero border of `pad` pixels, and whether a value packed
// in them was exactly 0.
struct Packed {
    int32_t* planes;
    int64_t pad;
    std::atomic<bool> zero{false};
};

// An image's hp x wp plane of `step` words per pixel, zero on a border of `pad` pixels.
void zero_border(int32_t* planes, int64_t hp, int64_t wp, int64_t pad, int64_t step) {
    for (int64_t y = 0; y < hp; ++y) {
        int32_t* row = planes + y * wp * step;
        if (y < pad || y >= hp - pad) {
            std::fill(row, row + wp * step, 0);
        } else {
            std::fill(row, row + pad * step, 0);
            std::fill(row + (wp - pad) * step, row + wp * step, 0);
        }
    }
}

// Block `a`; its input packed in `in` (null: packed here; else with the border of a's padding), its
// output packed with `out_bias` into `out` (null: not).
void run_block(const bc_block_args& a, int path, int threads, const Packed* in, Packed* out, const float* out_bias) {
    const int64_t k = a.a.k, stride = a.a.stride, pad = k / 2, hp = a.h + 2 * pad, wp = a.w + 2 * pad;
    const int64_t ho = (hp - k) / stride + 1, wo = (wp - k) / stride + 1;
    const int64_t words_a = words_of(a.a.in), words_b = words_of(a.a.out), two = a.b.out > 0;
    // Per image: the packed input, a's output and its packing (with b), and the image in and out.
    const int64_t planes_a = hp * wp * 2 * words_a, middle = two ? ho * wo * a.a.out : 0,
                  planes_b = two ? ho * wo * 2 * words_b : 0;
    const int64_t bytes = 4 * (planes_a + middle + planes_b + a.h * a.w * a.x_stride + ho * wo * a.y_stride);
    const int64_t group = std::max<int64_t>(1, std::min(a.n, GROUP_BYTES / bytes));
    const int64_t per_image = (planes_a + middle + planes_b + 15) / 16 * 16;  // 64-byte aligned parts
    thread_local std::vector<int32_t> space;
    if ((int64_t)space.size() < group * per_image + 16) space.resize(group * per_image + 16);
    int32_t* base = space.data() + (16 - ((uintptr_t)space.data() / 4) % 16) % 16;
    float* mid = reinterpret_cast<float*>(base + (group * planes_a + 15) / 16 * 16);
    int32_t* mid_planes = reinterpret_cast<int32_t*>(mid) + (group * middle + 15) / 16 * 16;
    const PackRows pack = pack_rows_of(path);
    for (int64_t first = 0; first < a.n; first += group) {
        const int64_t images = std::min(group, a.n - first);
        const float* x = a.x + first * a.h * a.w * a.x_stride;
        float* y = a.y + first * ho * wo * a.y_stride;
        const Pack p{x, a.input_bias, a.h, a.w, a.x_stride, a.a.in, pad, words_a, base};
        if (!in)
            parallel(threads, images * hp, (1 << 16) / (wp * a.a.in) + 1, 1,
                     [&](int64_t f, int64_t l) { pack(p, f, l); });
        Stage s;
        s.conv = &a.a;
        s.planes = in ? in->planes + first * planes_a : base;
        s.zero_in = in ? &in->zero : &p.zero;
        s.hp = hp, s.wp = wp, s.ho = ho, s.wo = wo, s.pixels = images * ho * wo;
        if (a.residual) {
            s.pool = stride == 2 ? 2 : 1;
            s.res = x, s.res_stride = a.x_stride, s.res_channels = a.a.out;
            s.h = a.h, s.w = a.w, s.ph = a.h / 2, s.pw = a.w / 2;
        }
        s.bias = a.bias1, s.slope = a.slope1, s.bias_out = a.bias_out1;
        s.y = two ? mid : y, s.y_stride = two ? a.a.out : a.y_stride;
        std::atomic<bool> mid_zero{false};
        if (two) s.next_bias = a.next_bias, s.next = mid_planes, s.next_words = words_b, s.next_zero = &mid_zero;
        Stage t;
        t.conv = &a.b;
        t.planes = mid_planes;
        t.zero_in = &mid_zero;
        t.hp = ho, t.wp = wo, t.ho = ho, t.wo = wo, t.pixels = images * ho * wo;
        t.pool = 1, t.res = mid, t.res_stride = a.a.out, t.res_channels = a.a.out;
        t.bias = a.bias2, t.slope = a.slope2, t.bias_out = a.bias_out2;
        t.y = y, t.y_stride = a.y_stride;
        Stage& last = two ? t : s;
        if (out) {
            const int64_t np = out->pad;
            last.next_bias = out_bias, last.next_words = words_of(last.conv->out), last.next_pad = np;
            last.next = out->planes + first * (ho + 2 * np) * (wo + 2 * np) * 2 * last.next_words;
            last.next_zero = &out->zero;
        }
        run_convs(s, two ? &t : nullptr, path, threads);
    }
}

void bc_block(const bc_block_args* args, int path, int threads) { run_block(*args, path, threads, nullptr, nullptr, nullptr); }

// Blocks 0 .. count - 1 in turn, each on the previous one's output, from x [n][h][w][x_stride]; their
// parameters are in `blocks` (x, n, h, w, x_stride, y and y_stride ignored), each with two convs.
// An image's outputs between blocks go to two buffers of the thread that takes the image, in turn
// (each [ho][wo][out] of the largest such output, kept from call to call), each packed for the next
// block as it is made; the last block's to y [n][ho][wo][its out]. An image at a time, so that its
// outputs between blocks stay in the caches; with threads, one image on each at a time, and the
// images left over (fewer than the threads) each on all of them.
void bc_blocks(const bc_block_args* blocks, int64_t count, const float* x, int64_t n, int64_t h, int64_t w,
               int64_t x_stride, float* y, int path, int threads) {
    int64_t most = 0, packed_most = 0;  // per image: the largest output between blocks, and packed, in words
    int64_t ho = h, wo = w;
    for (int64_t i = 0; i < count; ++i) {
        ho = (ho - 1) / blocks[i].a.stride + 1, wo = (wo - 1) / blocks[i].a.stride + 1;
        if (i + 1 == count) break;
        const int64_t pad = blocks[i + 1].a.k / 2;
        most = std::max(most, ho * wo * blocks[i].b.out);
        packed_most = std::max(packed_most, (ho + 2 * pad) * (wo + 2 * pad) * 2 * words_of(blocks[i].b.out));
    }
    const auto image = [&](int64_t i, int threads) {
        thread_local std::vector<int32_t> planes;
        thread_local std::vector<float> between;
        if ((int64_t)planes.size() < 2 * packed_most) planes.resize(2 * packed_most);
        if ((int64_t)between.size() < 2 * most) between.resize(2 * most);
        Packed packed[2];
        const float* in = x + i * h * w * x_stride;
        int64_t hi = h, wi = w, stride = x_stride;
        for (int64_t b = 0; b < count; ++b) {
            bc_block_args a = blocks[b];
            a.x = in, a.n = 1, a.h = hi, a.w = wi, a.x_stride = stride;
            a.y_stride = a.b.out;
            a.y = b + 1 == count ? y + i * ho * wo * a.b.out : between.data() + (b % 2) * most;
            const int64_t hb = (hi - 1) / a.a.stride + 1, wb = (wi - 1) / a.a.stride + 1;
            Packed* out = b + 1 == count ? nullptr : &packed[b % 2];
            if (out) {
                out->planes = planes.data() + (b % 2) * packed_most;
                out->pad = blocks[b + 1].a.k / 2;
                out->zero.store(false, std::memory_order_relaxed);
                zero_border(out->planes, hb + 2 * out->pad, wb + 2 * out->pad, out->pad, 2 * words_of(a.b.out));
            }
            run_block(a, path, threads, b ? &packed[(b - 1) % 2] : nullptr, out, out ? blocks[b + 1].input_bias : nullptr);
            in = a.y, stride = a.y_stride, hi = hb, wi = wb;
        }
    };
    const int64_t shared = threads > 1 ? n / threads * threads : n;
    Pool::get().run(threads, shared, [&](int64_t i) { image(i, 1); });
    for (int64_t i = shared; i < n; ++i) image(i, threads);
}

}  // extern "C"
