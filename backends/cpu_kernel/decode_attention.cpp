// Decode attention over a kvquant history on the CPU: one function, called through
// ctypes with raw pointers (backends/cpu_kernel/__init__.py builds and loads it), so that it
// includes no torch header and builds in a few seconds.
//
// The codes are read once and no full-precision copy of the history is made: tokens
// are dequantized 32 at a time into a buffer that stays in L1, and every query row of
// their KV head reads it there. Work is split flash-decoding style into (batch, head,
// token range) items, on OpenMP threads (in a process that has imported torch, torch's
// own runtime and thread count).
//
// Bits are not promised (docs/attention.md): sums run in the order the vector lanes
// give. Kept: the accuracy contract and the NaN rules. A NaN or +inf score makes its
// row NaN, as softmax does; a token whose weight is exactly zero never touches the
// output, even when its value is NaN; a row that sees no token is NaN (0 / 0).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include <omp.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

enum Kind : int32_t {
    NONE = 0,            // no quantized part (a side that is only its window)
    INT8_TOKEN = 1,      // int8 codes, one scale per token
    FP8_TOKEN = 2,       // e4m3fn codes, one scale per token
    FP8_TENSOR = 3,      // e4m3fn codes, one scale
    PACKED_GROUP = 4,    // 4 or 2-bit codes, a scale and zero per group inside a token
    PACKED_CHANNEL = 5,  // 4 or 2-bit codes, a scale and zero per channel and block of tokens
};

// Mirrored by ctypes Structures in __init__.py.
struct Side {
    int32_t kind;
    int32_t bits;
    int64_t group;
    int64_t tokens;  // quantized tokens; the window's follow them
    const uint8_t* codes;
    int64_t codes_b, codes_h, codes_t;  // strides in bytes
    const float* scales;
    int64_t scales_b, scales_h, scales_t;  // strides in floats (per channel: per block)
    const float* zeros;
    int64_t zeros_b, zeros_h, zeros_t;
    int64_t window;
    int32_t window_bf16;  // 0: float32 rows, 1: bfloat16 rows
    const void* win;
    int64_t win_b, win_h, win_t;  // strides in elements
};

struct Problem {
    const float* query;  // [B, H, R, D], contiguous
    int64_t batch, heads, rows, dim;
    float scale;
    int64_t chunk;       // tokens per work item; 0: the kernel's own split (work_split)
    const float* mask;   // [B, H, R, T] added to the scores, or null
    int64_t new_tokens;  // n: row r is query token r % n (R = query heads per KV head * n)
    int32_t causal;      // query token i sees the history's tokens up to T - n + i
    Side keys, values;
    float* out;  // [B, H, R, D], contiguous
};

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

inline float bits_to_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// e4m3fn code -> float32 by integer operations and selects (a table would be gathers):
// the exponent rebiased for normal codes, m * 2^-9 for subnormal ones, NaN for the NaN
// codes, then the sign.
inline float e4m3(uint8_t code) {
    const uint32_t c = code, mag = c & 0x7Fu;
    const float subnormal = static_cast<float>(static_cast<int32_t>(mag)) * 0x1p-9f;
    uint32_t bits;
    std::memcpy(&bits, &subnormal, 4);
    bits = mag < 8 ? bits : (mag << 20) + (120u << 23);
    bits = mag == 0x7Fu ? 0x7FC00000u : bits;
    return bits_to_float(bits | ((c & 0x80u) << 24));
}

// ---------------------------------------------------------------- 16 lanes at a time
// GCC lowers these to one AVX-512 register, two AVX2 ones, or four NEON ones.
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

inline f32x16 load16(const float* p) {
    f32x16 v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

inline void store16(float* p, f32x16 v) { std::memcpy(p, &v, sizeof v); }

inline f32x16 sums16(f32x16* v);

// The machine's own vector width, for the two hottest loops (scores, weighted values):
// there GCC's lowering of 16-lane vectors to two AVX2 registers spilled every lane to
// the stack (docs/performance.md).
#if defined(__AVX512F__)
constexpr int kLanes = 16, kRegisters = 32;
#elif defined(__AVX__)
constexpr int kLanes = 8, kRegisters = 16;
#else
constexpr int kLanes = 4, kRegisters = 16;  // SSE, NEON (which has 32; 16 is safe)
#endif
typedef float vf __attribute__((vector_size(4 * kLanes)));

typedef int32_t vi __attribute__((vector_size(4 * kLanes)));

// exp for x <= 0 (a score minus its row's maximum), kLanes at a time: Cody-Waite
// reduction and a degree-6 polynomial, about 1 ulp; -inf and anything below -87.3 give
// exactly 0, NaN stays NaN. Written on vectors: GCC left `omp simd` over a scalar
// version scalar under AVX2. Rounded to nearest by adding and taking away 1.5 * 2^23
// (|n| <= 126), which nearbyint did not vectorise.
inline vf exp_nonpositive_v(vf x) {
    const vf clamped = x < -87.3f ? vf{} - 87.3f : x;
    const vf n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    vf r = clamped - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    vf p = vf{} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    vf y = p * reinterpret_cast<vf>(e);
    y = x < -87.3f ? vf{} : y;
    return x != x ? x : y;
}

inline vf loadv(const float* p) {
    vf v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

inline void storev(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

// kLanes vectors in, their kLanes sums out (lane j: the sum of v[j]), by pairwise
// shuffles, halving the vectors at each level.
inline vf sums_of(vf* v) {
#if defined(__AVX512F__)
    return reinterpret_cast<vf>(sums16(reinterpret_cast<f32x16*>(v)));
#elif defined(__AVX__)
    vf a[4], b[2];
    for (int i = 0; i < 4; ++i)
        a[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 8, 2, 10, 4, 12, 6, 14) +
               __builtin_shufflevector(v[2 * i], v[2 * i + 1], 1, 9, 3, 11, 5, 13, 7, 15);
    for (int i = 0; i < 2; ++i)
        b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
               __builtin_shufflevector(a[2 * i], a[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
    return __builtin_shufflevector(b[0], b[1], 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(b[0], b[1], 4, 5, 6, 7, 12, 13, 14, 15);
#else
    vf a[2];
    for (int i = 0; i < 2; ++i)
        a[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 4, 2, 6) +
               __builtin_shufflevector(v[2 * i], v[2 * i + 1], 1, 5, 3, 7);
    return __builtin_shufflevector(a[0], a[1], 0, 1, 4, 5) + __builtin_shufflevector(a[0], a[1], 2, 3, 6, 7);
#endif
}

inline f32x16 floats(i32x16 v) { return __builtin_convertvector(v, f32x16); }

// 16 bytes, each widened to a 32-bit lane, signed or not. By intrinsics where there are
// some: GCC 12 turns __builtin_convertvector from bytes into one insert per lane.
template <bool Signed>
inline i32x16 widen16(const uint8_t* p) {
#if defined(__AVX512F__)
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return reinterpret_cast<i32x16>(Signed ? _mm512_cvtepi8_epi32(v) : _mm512_cvtepu8_epi32(v));
#elif defined(__AVX2__)
    const __m128i lo = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    const __m128i hi = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8));
    const __m256i a = Signed ? _mm256_cvtepi8_epi32(lo) : _mm256_cvtepu8_epi32(lo);
    const __m256i b = Signed ? _mm256_cvtepi8_epi32(hi) : _mm256_cvtepu8_epi32(hi);
    i32x16 r;
    std::memcpy(&r, &a, 32);
    std::memcpy(reinterpret_cast<char*>(&r) + 32, &b, 32);
    return r;
#else
    i32x16 r;
    for (int i = 0; i < 16; ++i) r[i] = Signed ? static_cast<int8_t>(p[i]) : p[i];
    return r;
#endif
}

// e4m3() sixteen at a time, times 2^-8 (the caller's factor takes the 2^8 back): an
// e4m3 code's bits moved into float16's places are a float16 of 2^-8 times its value,
// subnormal codes included, which the hardware widens to float32 exactly. NaN codes are
// set to float16's NaN first.
inline f32x16 e4m3_16_scaled(const uint8_t* p) {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__F16C__))
    typedef uint16_t u16x16 __attribute__((vector_size(32)));
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const u16x16 c = reinterpret_cast<u16x16>(_mm256_cvtepu8_epi16(bytes));
    u16x16 half = ((c << 8) & 0x8000) | ((c << 7) & 0x3F80);
    half = (c & 0x7F) == 0x7F ? 0x7E00 : half;
    const __m256i h = reinterpret_cast<__m256i>(half);
#if defined(__AVX512F__)
    return reinterpret_cast<f32x16>(_mm512_cvtph_ps(h));
#else
    f32x16 r;
    const __m256 lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h)), hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
    std::memcpy(&r, &lo, 32);
    std::memcpy(reinterpret_cast<char*>(&r) + 32, &hi, 32);
    return r;
#endif
#else
    f32x16 r;
    for (int i = 0; i < 16; ++i) r[i] = e4m3(p[i]) * 0x1p-8f;
    return r;
#endif
}

// 16 int8 codes as floats into out; under AVX2 eight lanes at a time straight to memory
// (through a 16-lane vector GCC moved every lane by the stack).
inline void store_int8_16(float* out, const uint8_t* p) {
#if defined(__AVX2__) && !defined(__AVX512F__)
    for (int h = 0; h < 16; h += 8) {
        const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + h));
        _mm256_storeu_ps(out + h, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)));
    }
#else
    store16(out, floats(widen16<true>(p)));
#endif
}

// e4m3_16_scaled(p) into out, the same way.
inline void store_e4m3_16(float* out, const uint8_t* p) {
#if defined(__AVX2__) && defined(__F16C__) && !defined(__AVX512F__)
    const __m256i c = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i sign = _mm256_and_si256(_mm256_slli_epi16(c, 8), _mm256_set1_epi16(static_cast<short>(0x8000)));
    const __m256i mag = _mm256_and_si256(_mm256_slli_epi16(c, 7), _mm256_set1_epi16(0x3F80));
    const __m256i nan = _mm256_cmpeq_epi16(_mm256_and_si256(c, _mm256_set1_epi16(0x7F)), _mm256_set1_epi16(0x7F));
    const __m256i half = _mm256_blendv_epi8(_mm256_or_si256(sign, mag), _mm256_set1_epi16(0x7E00), nan);
    _mm256_storeu_ps(out, _mm256_cvtph_ps(_mm256_castsi256_si128(half)));
    _mm256_storeu_ps(out + 8, _mm256_cvtph_ps(_mm256_extracti128_si256(half, 1)));
#else
    store16(out, e4m3_16_scaled(p));
#endif
}

// Sixteen vectors in, their sixteen sums out (lane j: the sum of v[j]), by pairwise
// shuffles: 15 additions where one horizontal sum per vector would take 4 shuffles and
// 4 additions each.
inline f32x16 sums16(f32x16* v) {
    f32x16 a[8], b[4], c[2];
    for (int i = 0; i < 8; ++i) {
        a[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
               __builtin_shufflevector(v[2 * i], v[2 * i + 1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
    }
    for (int i = 0; i < 4; ++i) {
        b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
               __builtin_shufflevector(a[2 * i], a[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
    }
    for (int i = 0; i < 2; ++i) {
        c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
               __builtin_shufflevector(b[2 * i], b[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    }
    return __builtin_shufflevector(c[0], c[1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(c[0], c[1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}

// The largest of x[t0:t1], NaNs passed over; 16 lanes at a time (a float's `>` chain
// does not vectorise, and its latency was half the scores' time).
inline float max_of(const float* x, int64_t t0, int64_t t1) {
    f32x16 lanes = f32x16{} - kInf;
    int64_t t = t0;
    for (; t + 16 <= t1; t += 16) {
        const f32x16 v = load16(x + t);
        lanes = v > lanes ? v : lanes;
    }
    float m = -kInf;
    for (int i = 0; i < 16; ++i) m = lanes[i] > m ? lanes[i] : m;
    for (; t < t1; ++t) m = x[t] > m ? x[t] : m;
    return m;
}

// ---------------------------------------------------------------- reading a side
// A token's row in the side's layout: natural order, except packed codes, whose
// elements go plane by plane (element k*j + i at i * D/k + j) so that unpacking reads
// consecutive bytes; the query and the weighted sums of those rows are permuted the
// same way. The window's rows stay in natural order, read with the query as it is.
inline int layout_k(const Side& s) {
    return s.kind == PACKED_GROUP || s.kind == PACKED_CHANNEL ? 8 / s.bits : 1;
}

inline void permute(const float* v, float* out, int64_t d, int k) {
    const int64_t per_plane = d / k;
    for (int i = 0; i < k; ++i)
        for (int64_t j = 0; j < per_plane; ++j) out[i * per_plane + j] = v[k * j + i];
}

// A packed row whose runs of 16 bytes each lie inside one group, as floats: (code -
// zero) * scale with the run's group's, or (Affine false) the codes alone.
template <int Bits, bool Affine>
inline void unpack_runs(const uint8_t* __restrict c, float* __restrict out, int64_t per_plane, int64_t group_bytes,
                        const float* scales, const float* zeros) {
    constexpr int k = 8 / Bits;
    constexpr int32_t mask = (1 << Bits) - 1;
    for (int64_t g = 0; g * group_bytes < per_plane; ++g) {
        const float gz = Affine ? zeros[g] : 0.0f, gs = Affine ? scales[g] : 1.0f;
        for (int64_t j0 = g * group_bytes; j0 < (g + 1) * group_bytes; j0 += 16) {
#if defined(__AVX2__) && !defined(__AVX512F__)
            // Eight bytes at a time in AVX2's own registers (see store_int8_16).
            for (int h = 0; h < 16; h += 8) {
                const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + j0 + h)));
                for (int i = 0; i < k; ++i) {
                    __m256 code = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(bytes, Bits * i),
                                                                      _mm256_set1_epi32(mask)));
                    if (Affine) code = _mm256_mul_ps(_mm256_sub_ps(code, _mm256_set1_ps(gz)), _mm256_set1_ps(gs));
                    _mm256_storeu_ps(out + i * per_plane + j0 + h, code);
                }
            }
#else
            const i32x16 bytes = widen16<false>(c + j0);
            for (int i = 0; i < k; ++i) {
                const f32x16 code = floats((bytes >> (Bits * i)) & mask);
                store16(out + i * per_plane + j0, Affine ? (code - gz) * gs : code);
            }
#endif
        }
    }
}

// One run of 16 bytes of a packed row into its planes (plane i at out + i *
// per_plane): (code - zero) * scale, with lanes(i, zero, scale) giving each lane's.
template <int Bits, typename Lanes>
inline void unpack_run(const uint8_t* c, float* out, int64_t per_plane, const Lanes& lanes) {
    constexpr int32_t mask = (1 << Bits) - 1;
#if defined(__AVX2__) && !defined(__AVX512F__)
    const __m256i halves[2] = {_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c))),
                               _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + 8)))};
    for (int i = 0; i < 8 / Bits; ++i) {
        f32x16 zero, scale;
        lanes(i, zero, scale);
        float zs[16], ss[16];
        store16(zs, zero);
        store16(ss, scale);
        for (int h = 0; h < 2; ++h) {
            const __m256 code = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(halves[h], Bits * i),
                                                                    _mm256_set1_epi32(mask)));
            _mm256_storeu_ps(out + i * per_plane + 8 * h,
                             _mm256_mul_ps(_mm256_sub_ps(code, _mm256_loadu_ps(zs + 8 * h)), _mm256_loadu_ps(ss + 8 * h)));
        }
    }
#else
    const i32x16 bytes = widen16<false>(c);
    for (int i = 0; i < 8 / Bits; ++i) {
        f32x16 zero, scale;
        lanes(i, zero, scale);
        store16(out + i * per_plane, (floats((bytes >> (Bits * i)) & mask) - zero) * scale);
    }
#endif
}

constexpr int64_t kBlock = 32;  // tokens dequantized at a time

// The block of tokens from t in [t0, t1), whose quantized tokens end at split: the
// quantized tokens, then the window's, a block never holding both (their rows come in
// different layouts).
inline int64_t block_length(int64_t t, int64_t split, int64_t t1) {
    return std::min(t < split ? split : t1, t + kBlock) - t;
}

// One (batch, head)'s side, read kBlock tokens at a time into `rows` [kBlock, d].
// Per-token and per-tensor formats give their codes as floats and the scale as
// `factor`, applied by the caller once per token (to a score, to a weight); so do
// packed codes whose one group is the whole row, with its zero in `zero` (the row is
// (codes - zero) * factor). The others give dequantized rows, factor 1 and zero 0.
template <int DC>
struct Reader {
    const Side& s;
    const int64_t d, b, h;
    int k = 1;                                // codes per byte
    int64_t per_plane = 0, group_bytes = 0;  // packed: bytes per token and per group
    bool planes_of_16 = false;  // packed: each plane a whole number of 16-byte runs
    bool runs_of_16 = false;    // per group: and every run inside one group (INT2 g32's groups are 8 bytes)
    bool one_group = false;   // per group, and the group is the whole row
    // What the rows are to be multiplied by, once per sum: FP8 rows are 2^-8 times the
    // codes' values (e4m3_16_scaled), exact as scaling by a power of two is, and
    // applied after the sums so that no product can overflow.
    float row_scale = 1.0f;
    std::vector<float> rows, block_scales, block_zeros;
    std::vector<int32_t> byte_group;  // per group: the group of each byte of a token
    float factor[kBlock], zero[kBlock];

    Reader(const Side& side, int64_t dim, int64_t bb, int64_t hh)
        : s(side), d(DC ? DC : dim), b(bb), h(hh), rows(kBlock * d) {
        k = layout_k(s);
        if (k != 1) {
            per_plane = d / k;
            group_bytes = s.group / k;
        }
        planes_of_16 = k != 1 && per_plane % 16 == 0;
        for (int64_t j = 0; s.kind == PACKED_GROUP && j < per_plane; ++j) byte_group.push_back(j / group_bytes);
        if (s.kind == PACKED_GROUP) {
            // A last group shorter than the rest (head_dim not a multiple of G) is read by lanes.
            runs_of_16 = planes_of_16 && group_bytes % 16 == 0 && per_plane % group_bytes == 0;
            one_group = runs_of_16 && s.group == d;
        }
        if (s.kind == FP8_TOKEN || s.kind == FP8_TENSOR) row_scale = 256.0f;
        if (s.kind == PACKED_CHANNEL) {
            block_scales.resize(d);
            block_zeros.resize(d);
        }
    }

    // Tokens [t, t + n), all quantized or all of the window: the window's rows are in
    // natural order, the codes' in the side's layout.
    void fill(int64_t t, int64_t n) {
        const bool window = t >= s.tokens;
        for (int64_t j = 0; j < n; ++j) {
            factor[j] = window ? 1.0f / row_scale : 1.0f;  // a window row is its values
            zero[j] = 0.0f;
        }
        if (!window) return fill_codes(t, n);
        for (int64_t j = 0; j < n; ++j) fill_window(t + j - s.tokens, &rows[j * d]);
    }

    void fill_window(int64_t w, float* out) {
        if (s.window_bf16) {
            const uint16_t* p = static_cast<const uint16_t*>(s.win) + b * s.win_b + h * s.win_h + w * s.win_t;
            for (int64_t i = 0; i < d; ++i) out[i] = bits_to_float(static_cast<uint32_t>(p[i]) << 16);
        } else {
            std::memcpy(out, static_cast<const float*>(s.win) + b * s.win_b + h * s.win_h + w * s.win_t,
                        d * sizeof(float));
        }
    }

    // One loop per format, the switch outside it: the side's fields are read once, not
    // per token (stores into the rows could alias them, so the compiler reloads them).
    void fill_codes(int64_t t, int64_t n) {
        const int64_t stride = s.codes_t, scale_stride = s.scales_t, zero_stride = s.zeros_t;
        const uint8_t* c = s.codes + b * s.codes_b + h * s.codes_h + t * stride;
        const float* sc = s.scales + (s.kind == FP8_TENSOR ? 0 : b * s.scales_b + h * s.scales_h + t * scale_stride);
        const float* z = s.zeros ? s.zeros + b * s.zeros_b + h * s.zeros_h + t * zero_stride : nullptr;
        float* out = rows.data();
        const int64_t dim = d;
        const bool vector = dim % 16 == 0;
        switch (s.kind) {
            case INT8_TOKEN:
                for (int64_t j = 0; j < n; ++j, c += stride, out += dim) {
                    factor[j] = sc[j * scale_stride];
                    if (vector) {
                        for (int64_t i = 0; i < dim; i += 16) store_int8_16(out + i, c + i);
                    } else {
                        for (int64_t i = 0; i < dim; ++i) out[i] = static_cast<float>(static_cast<int8_t>(c[i]));
                    }
                }
                return;
            case FP8_TOKEN:
            case FP8_TENSOR: {
                const bool tensor = s.kind == FP8_TENSOR;
                for (int64_t j = 0; j < n; ++j, c += stride, out += dim) {
                    factor[j] = tensor ? sc[0] : sc[j * scale_stride];
                    if (vector) {
                        for (int64_t i = 0; i < dim; i += 16) store_e4m3_16(out + i, c + i);
                    } else {
                        for (int64_t i = 0; i < dim; ++i) out[i] = e4m3(c[i]) * 0x1p-8f;
                    }
                }
                return;
            }
            case PACKED_GROUP:
                if (one_group && s.bits == 4) return unpack_tokens<4>(c, sc, z, n);
                if (one_group && s.bits == 2) return unpack_tokens<2>(c, sc, z, n);
                for (int64_t j = 0; j < n; ++j, c += stride, out += dim) {
                    packed_group(c, sc + j * scale_stride, z + j * zero_stride, out);
                }
                return;
            case PACKED_CHANNEL:
                for (int64_t j = 0; j < n; ++j, c += stride, out += dim) {
                    packed_channel(c, s.scales + b * s.scales_b + h * s.scales_h, s.zeros + b * s.zeros_b + h * s.zeros_h,
                                   t + j, out);
                }
                return;
            default:
                return;
        }
    }

    // Packed codes whose one group is the whole row: the codes as floats, the group's
    // scale and zero as the token's factor and zero.
    template <int Bits>
    void unpack_tokens(const uint8_t* c, const float* sc, const float* z, int64_t n) {
        const int64_t stride = s.codes_t, scale_stride = s.scales_t, zero_stride = s.zeros_t, dim = d,
                      plane = per_plane;
        float* out = rows.data();
        for (int64_t j = 0; j < n; ++j, c += stride, out += dim) {
            factor[j] = sc[j * scale_stride];
            zero[j] = z[j * zero_stride];
            unpack_runs<Bits, false>(c, out, plane, plane, nullptr, nullptr);
        }
    }

    void packed_group(const uint8_t* c, const float* sc, const float* z, float* out) {
        if (runs_of_16) {
            return s.bits == 4 ? unpack_runs<4, true>(c, out, per_plane, group_bytes, sc, z)
                               : unpack_runs<2, true>(c, out, per_plane, group_bytes, sc, z);
        }
        if (planes_of_16) {  // groups shorter than a run: each lane its group's scale and zero
            float lane_scales[16], lane_zeros[16];
            for (int64_t j0 = 0; j0 < per_plane; j0 += 16) {
                for (int l = 0; l < 16; ++l) {
                    lane_scales[l] = sc[byte_group[j0 + l]];
                    lane_zeros[l] = z[byte_group[j0 + l]];
                }
                const f32x16 zeros = load16(lane_zeros), scales = load16(lane_scales);
                const auto lanes = [&](int, f32x16& zero, f32x16& scale) { zero = zeros, scale = scales; };
                s.bits == 4 ? unpack_run<4>(c + j0, out + j0, per_plane, lanes)
                            : unpack_run<2>(c + j0, out + j0, per_plane, lanes);
            }
            return;
        }
        const int32_t mask = (1 << s.bits) - 1;
        for (int i = 0; i < k; ++i) {
            for (int64_t jj = 0; jj < per_plane; ++jj) {
                const int64_t g = jj / group_bytes;
                out[i * per_plane + jj] = (static_cast<float>((c[jj] >> (s.bits * i)) & mask) - z[g]) * sc[g];
            }
        }
    }

    void packed_channel(const uint8_t* c, const float* sc, const float* z, int64_t token, float* out) {
        const int64_t blk = token / s.group;
        if (loaded_block != blk) {
            loaded_block = blk;
            permute(sc + blk * s.scales_t, block_scales.data(), d, k);
            permute(z + blk * s.zeros_t, block_zeros.data(), d, k);
        }
        const int32_t mask = (1 << s.bits) - 1;
        const float* bs = block_scales.data();
        const float* bz = block_zeros.data();
        if (planes_of_16) {
            for (int64_t j0 = 0; j0 < per_plane; j0 += 16) {
                const int64_t plane = per_plane;
                const auto lanes = [&](int i, f32x16& zero, f32x16& scale) {
                    zero = load16(bz + i * plane + j0), scale = load16(bs + i * plane + j0);
                };
                s.bits == 4 ? unpack_run<4>(c + j0, out + j0, per_plane, lanes)
                            : unpack_run<2>(c + j0, out + j0, per_plane, lanes);
            }
            return;
        }
        for (int i = 0; i < k; ++i) {
            for (int64_t jj = 0; jj < per_plane; ++jj) {
                const int64_t at = i * per_plane + jj;
                out[at] = (static_cast<float>((c[jj] >> (s.bits * i)) & mask) - bz[at]) * bs[at];
            }
        }
    }

    int64_t loaded_block = -1;
};

// ---------------------------------------------------------------- one work item
// Scores of tokens [t0, t1) of head (b, h) for every query row, into scores (rows of
// `total` floats); each row's maximum over the range into maxima.
template <int DC>
void item_scores(const Problem& p, int64_t b, int64_t h, int64_t t0, int64_t t1, float* scores, int64_t total,
                 float* maxima) {
    const int64_t d = DC ? DC : p.dim, rows = p.rows;
    const int kk = layout_k(p.keys);
    const float* query = p.query + (b * p.heads + h) * rows * d;
    std::vector<float> q(rows * d), query_sums(rows, 0.0f);  // the sums for a zero taken out of the dot
    for (int64_t r = 0; r < rows; ++r) {
        if (kk != 1) {
            permute(query + r * d, &q[r * d], d, kk);
        } else {
            std::memcpy(&q[r * d], query + r * d, d * sizeof(float));
        }
        for (int64_t i = 0; i < d; ++i) query_sums[r] += query[r * d + i];
    }
    const float* mask = p.mask ? p.mask + (b * p.heads + h) * rows * total : nullptr;
    Reader<DC> keys(p.keys, d, b, h);
    const float scale = p.scale * keys.row_scale;
    const int64_t split = std::min(std::max(p.keys.tokens, t0), t1);
    for (int64_t tb = t0, n; tb < t1; tb += n) {
        n = block_length(tb, split, t1);
        const float* layout_q = tb < split ? q.data() : query;
        keys.fill(tb, n);
        for (int64_t r = 0; r < rows; ++r) {
            const float* qr = layout_q + r * d;
            float* out = scores + r * total + tb;
            if constexpr (DC != 0 && DC % 16 == 0) {
                constexpr int V = DC / kLanes;  // vectors per row
                vf qv[V];
                for (int v = 0; v < V; ++v) qv[v] = loadv(qr + kLanes * v);
                for (int64_t j0 = 0; j0 < n; j0 += kLanes) {
                    vf acc[kLanes];
                    for (int j = 0; j < kLanes; ++j) {
                        const float* row = &keys.rows[(j0 + j) * d];
                        acc[j] = qv[0] * loadv(row);
                        for (int v = 1; v < V; ++v) acc[j] += qv[v] * loadv(row + kLanes * v);
                    }
                    const vf s = (sums_of(acc) - loadv(keys.zero + j0) * query_sums[r]) * loadv(keys.factor + j0) * scale;
                    if (j0 + kLanes <= n) {
                        storev(out + j0, s);
                    } else {
                        float lanes[kLanes];
                        storev(lanes, s);
                        for (int64_t j = 0; j0 + j < n; ++j) out[j0 + j] = lanes[j];
                    }
                }
            } else {
                for (int64_t j = 0; j < n; ++j) {
                    const float* row = &keys.rows[j * d];
                    float dot = 0.0f;
                    for (int64_t i = 0; i < d; ++i) dot += qr[i] * row[i];
                    out[j] = (dot - keys.zero[j] * query_sums[r]) * keys.factor[j] * scale;
                }
            }
            const int64_t limit = total - p.new_tokens + r % p.new_tokens;
            if (!mask && !(p.causal && tb + n - 1 > limit)) continue;  // decode: nothing hidden
            for (int64_t j = 0; j < n; ++j) {
                // A hidden token's score is -inf even where its key is NaN.
                if (mask) out[j] = mask[r * total + tb + j] == -kInf ? -kInf : out[j] + mask[r * total + tb + j];
                if (p.causal && tb + j > limit) out[j] = -kInf;
            }
        }
    }
    // A NaN score is passed over here and makes its weight, and so its row, NaN later;
    // a +inf one is the maximum and its weight exp(inf - inf) is NaN: as in softmax.
    for (int64_t r = 0; r < rows; ++r) maxima[r] = max_of(scores + r * total, t0, t1);
}

// Weights exp(score - max) of tokens [t0, t1) in place, their sums per row into sums
// and the weighted values (the values' layout) into acc [rows, d]. A token whose
// weight is exactly zero is not read.
template <int DC>
void item_values(const Problem& p, int64_t b, int64_t h, int64_t t0, int64_t t1, float* scores, int64_t total,
                 const float* maxima, float* sums, float* acc) {
    const int64_t d = DC ? DC : p.dim, rows = p.rows;
    for (int64_t r = 0; r < rows; ++r) {
        float* s = scores + r * total;
        const float m = maxima[r];
        vf lanes_sum = vf{};
        int64_t t = t0;
        for (; t + kLanes <= t1; t += kLanes) {
            const vf w = exp_nonpositive_v(loadv(s + t) - m);
            storev(s + t, w);
            lanes_sum += w;
        }
        if (t < t1) {  // the tail, padded with -inf (weight exactly 0)
            float tail[kLanes];
            for (int i = 0; i < kLanes; ++i) tail[i] = t + i < t1 ? s[t + i] - m : -kInf;
            const vf w = exp_nonpositive_v(loadv(tail));
            for (int i = 0; t + i < t1; ++i) s[t + i] = w[i];
            lanes_sum += w;
        }
        float sum = 0.0f;
        for (int i = 0; i < kLanes; ++i) sum += lanes_sum[i];
        sums[r] = sum;
    }
    Reader<DC> values(p.values, d, b, h);
    std::vector<float> offsets(rows, 0.0f);  // the sums of weight * zero, taken out at the end
    // The window's rows are in natural order: where the codes' layout is another, their
    // weighted sums go apart and join the codes' at the end.
    const int kv = layout_k(p.values);
    std::vector<float> window_acc(kv != 1 ? rows * d : 0, 0.0f);
    std::memset(acc, 0, rows * d * sizeof(float));
    const int64_t split = std::min(std::max(p.values.tokens, t0), t1);
    for (int64_t block = t0, n; block < t1; block += n) {
        n = block_length(block, split, t1);
        float* sums_here = block >= split && kv != 1 ? window_acc.data() : acc;
        // A block that no row sees (masked, causally hidden) is not read at all; inside
        // a block, each row passes over its zero weights below.
        int any = 0;
        for (int64_t r = 0; r < rows; ++r) {
            const float* w = scores + r * total + block;
#pragma omp simd reduction(| : any)
            for (int64_t j = 0; j < n; ++j) any |= w[j] != 0.0f;
        }
        if (!any) continue;
        values.fill(block, n);
        for (int64_t r = 0; r < rows; ++r) {
            const float* w = scores + r * total + block;
            float* a = sums_here + r * d;
            float offset = 0.0f;
            // A zero weight is passed over, not multiplied: its row may be NaN.
            if constexpr (DC != 0 && DC % 16 == 0) {
                // Two sets of sums, even and odd tokens, where the registers hold them:
                // with one, each token's adds waited for the previous token's (4 cycles
                // a vector) when a row is only a few vectors.
                constexpr int V = DC / kLanes;
                constexpr bool two = 2 * V + 4 <= kRegisters;
                vf even[V], odd[V];
                for (int v = 0; v < V; ++v) {
                    even[v] = loadv(a + kLanes * v);
                    odd[v] = vf{};
                }
                for (int64_t j = 0; j + 1 < n; j += 2) {
                    const float* row0 = &values.rows[j * d];
                    if (w[j] != 0.0f) {
                        const float wf = w[j] * values.factor[j];
                        offset += wf * values.zero[j];
                        for (int v = 0; v < V; ++v) even[v] += wf * loadv(row0 + kLanes * v);
                    }
                    if (w[j + 1] != 0.0f) {
                        const float wf = w[j + 1] * values.factor[j + 1];
                        offset += wf * values.zero[j + 1];
                        vf* sums = two ? odd : even;
                        for (int v = 0; v < V; ++v) sums[v] += wf * loadv(row0 + d + kLanes * v);
                    }
                }
                if (n % 2 && w[n - 1] != 0.0f) {
                    const float wf = w[n - 1] * values.factor[n - 1];
                    offset += wf * values.zero[n - 1];
                    for (int v = 0; v < V; ++v) even[v] += wf * loadv(&values.rows[(n - 1) * d] + kLanes * v);
                }
                for (int v = 0; v < V; ++v) storev(a + kLanes * v, two ? even[v] + odd[v] : even[v]);
            } else {
                for (int64_t j = 0; j < n; ++j) {
                    if (w[j] == 0.0f) continue;
                    const float wf = w[j] * values.factor[j];
                    offset += wf * values.zero[j];
                    const float* row = &values.rows[j * d];
                    for (int64_t i = 0; i < d; ++i) a[i] += wf * row[i];
                }
            }
            offsets[r] += offset;
        }
    }
    std::vector<float> permuted(d);
    for (int64_t r = 0; r < rows; ++r) {
        float* a = acc + r * d;
        if (kv != 1) {
            permute(&window_acc[r * d], permuted.data(), d, kv);
            for (int64_t i = 0; i < d; ++i) a[i] += permuted[i];
        }
        for (int64_t i = 0; i < d; ++i) a[i] = (a[i] - offsets[r]) * values.row_scale;
    }
}

// f(head_dim as a constant): the head_dims that models use are compiled for their size
// (loops unrolled, sums in registers); any other runs the same code with a runtime size.
template <typename F>
void with_head_dim(int64_t dim, const F& f) {
    switch (dim) {
        case 64: return f(std::integral_constant<int, 64>{});
        case 96: return f(std::integral_constant<int, 96>{});
        case 128: return f(std::integral_constant<int, 128>{});
        case 256: return f(std::integral_constant<int, 256>{});
        default: return f(std::integral_constant<int, 0>{});
    }
}

// Tokens per work item for `total` tokens of `heads` (batch x KV heads) heads: enough
// items for every thread, none shorter than item_tokens. Each item pays for its own
// set-up (the query's layout, the readers' buffers, its partial sums), which decides
// short histories: in a model's decode step (a 13 MB weight sweep between layers' calls,
// 2 threads, SmolLM2's 3 heads) a 640-token history took 53 us as one item per head
// against 67 as three; from about 1,000 tokens on, 2 to 4 items per head ran alike and
// past 2,000 one item per head was slowest (docs/performance.md). With more threads
// items shrink towards 256 tokens, the split measured before on long histories.
inline int64_t work_split(int64_t total, int64_t heads) {
    const int64_t threads = std::max(1, omp_get_max_threads());
    const int64_t item_tokens = std::max<int64_t>(256, 1280 / threads);
    const int64_t per_head = std::max<int64_t>(
        1, std::min<int64_t>((total + item_tokens - 1) / item_tokens, (8 * threads + heads - 1) / heads));
    return std::max<int64_t>(1, (total + per_head - 1) / per_head);
}

}  // namespace

// What __init__.py checks before its first call: the version of the Side and Problem
// layout and of these exports, here and in __init__.py (raise both together on any
// change), and Problem's size.
extern "C" int64_t kvquant_decode_attention_abi() { return 3; }
extern "C" int64_t kvquant_decode_attention_problem_size() { return sizeof(Problem); }
// Which vector code this build runs (the benchmarks print it beside their numbers).
extern "C" const char* kvquant_decode_attention_isa() {
#if defined(__AVX512F__)
    return "avx512f";
#elif defined(__AVX2__) && defined(__F16C__)
    return "avx2+f16c";
#elif defined(__AVX2__)
    return "avx2";
#else
    return "scalar";
#endif
}

extern "C" int kvquant_decode_attention(const Problem* problem) {
    const Problem& p = *problem;
    const int64_t total = p.keys.tokens + p.keys.window;
    if (total != p.values.tokens + p.values.window || p.chunk < 0 || total == 0) return 1;
    const int64_t d = p.dim, rows = p.rows, heads = p.batch * p.heads;
    const int64_t chunk = p.chunk ? p.chunk : work_split(total, heads);
    const int64_t chunks = (total + chunk - 1) / chunk, items = heads * chunks;
    // One buffer per calling thread, kept between calls: allocated afresh, a 16k-token
    // history's scores were pages mapped and zeroed on every call. Nothing in it is read
    // before this call writes it.
    static thread_local std::vector<float> workspace;
    const size_t need = heads * rows * total + items * rows * 2 + heads * rows + items * rows * d;
    if (workspace.size() < need) workspace.resize(need);
    float* scores = workspace.data();
    float* item_maxima = scores + heads * rows * total;
    float* maxima = item_maxima + items * rows;
    float* sums = maxima + heads * rows;
    float* acc = sums + items * rows;
    // Every score first, so that each weight is exp(score - the row's maximum over the
    // whole history), as softmax has it: a weight that is zero there is zero here. One
    // parallel region for both passes: in a model's decode step the threads sleep
    // between layers, and each region wakes them.
#pragma omp parallel if (items > 1)
    {
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; ++it) {
            const int64_t bh = it / chunks, t0 = it % chunks * chunk;
            with_head_dim(d, [&](auto dc) {
                item_scores<dc.value>(p, bh / p.heads, bh % p.heads, t0, std::min(t0 + chunk, total),
                                      scores + bh * rows * total, total, item_maxima + it * rows);
            });
        }
#pragma omp single
        for (int64_t bh = 0; bh < heads; ++bh) {
            for (int64_t r = 0; r < rows; ++r) {
                float m = -kInf;
                for (int64_t c = 0; c < chunks; ++c) m = std::max(m, item_maxima[(bh * chunks + c) * rows + r]);
                maxima[bh * rows + r] = m;
            }
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; ++it) {
            const int64_t bh = it / chunks, t0 = it % chunks * chunk;
            with_head_dim(d, [&](auto dc) {
                item_values<dc.value>(p, bh / p.heads, bh % p.heads, t0, std::min(t0 + chunk, total),
                                      scores + bh * rows * total, total, maxima + bh * rows, sums + it * rows,
                                      acc + it * rows * d);
            });
        }
    }
    const int kv = layout_k(p.values);
    const int64_t per_plane = d / kv;
    std::vector<float> row_acc(d);
    for (int64_t bh = 0; bh < heads; ++bh) {
        for (int64_t r = 0; r < rows; ++r) {
            float* o = p.out + (bh * rows + r) * d;
            const float m = maxima[bh * rows + r];
            if (m == -kInf) {  // nothing visible: 0 / 0
                for (int64_t i = 0; i < d; ++i) o[i] = kNaN;
                continue;
            }
            float sum = 0.0f;
            std::fill(row_acc.begin(), row_acc.end(), 0.0f);
            for (int64_t c = 0; c < chunks; ++c) {
                const int64_t it = bh * chunks + c;
                sum += sums[it * rows + r];
                const float* a = &acc[(it * rows + r) * d];
                for (int64_t i = 0; i < d; ++i) row_acc[i] += a[i];
            }
            for (int i = 0; i < kv; ++i)
                for (int64_t j = 0; j < per_plane; ++j) o[kv * j + i] = row_acc[i * per_plane + j] / sum;
        }
    }
    return 0;
}
