// The decode kernel (decode_attention.cpp) as an XLA FFI handler, so that JAX's
// attention under jax.jit on the CPU calls it on the arrays XLA holds (no copy, no
// host callback). Built with jaxlib's FFI headers (jax.ffi.include_dir()) by
// backends/cpu_kernel/__init__.py, registered as "kvquant_decode_attention".
//
// Every array arrives dense and row-major: codes [B, H, T, W], per-token scales
// [B, H, T], a per-tensor scale [], group parameters [B, H, T, groups], per-channel ones
// [B, H, T / G, D], windows [B, H, W, D], the grouped query and output [B, H, R, D], the
// mask [B, H, R, T + W]. A side without quantized tokens has kind NONE and empty arrays.
#include "decode_attention.cpp"

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Row-major strides of a rank-3 or rank-4 parameter array, in elements, for the
// Side's (b, h, t) fields; a 0-d one (per tensor) has none.
void param_strides(const ffi::AnyBuffer& a, int64_t* b, int64_t* h, int64_t* t) {
    auto d = a.dimensions();
    *b = *h = *t = 0;
    if (d.size() == 3) {
        *t = 1, *h = d[2], *b = d[1] * d[2];
    } else if (d.size() == 4) {
        *t = d[3], *h = d[2] * d[3], *b = d[1] * d[2] * d[3];
    }
}

Side side_of(int32_t kind, int32_t bits, int64_t group, const ffi::AnyBuffer& codes, const ffi::AnyBuffer& scales,
             const ffi::AnyBuffer& zeros, const ffi::AnyBuffer& window) {
    Side s{};
    s.kind = kind;
    if (kind != NONE) {
        auto d = codes.dimensions();  // [B, H, T, W]
        s.bits = bits, s.group = group, s.tokens = d[2];
        s.codes = static_cast<const uint8_t*>(codes.untyped_data());
        s.codes_t = d[3], s.codes_h = d[2] * d[3], s.codes_b = d[1] * d[2] * d[3];
        s.scales = static_cast<const float*>(scales.untyped_data());
        param_strides(scales, &s.scales_b, &s.scales_h, &s.scales_t);
        if (kind == PACKED_GROUP || kind == PACKED_CHANNEL) {
            s.zeros = static_cast<const float*>(zeros.untyped_data());
            param_strides(zeros, &s.zeros_b, &s.zeros_h, &s.zeros_t);
        }
    }
    auto w = window.dimensions();  // [B, H, W, D]
    if (w.size() == 4 && w[2] > 0) {
        s.window = w[2];
        s.window_bf16 = window.element_type() == ffi::DataType::BF16;
        s.win = window.untyped_data();
        s.win_t = w[3], s.win_h = w[2] * w[3], s.win_b = w[1] * w[2] * w[3];
    }
    return s;
}

ffi::Error attend(ffi::Buffer<ffi::F32> query, ffi::AnyBuffer k_codes, ffi::AnyBuffer k_scales,
                  ffi::AnyBuffer k_zeros, ffi::AnyBuffer k_window, ffi::AnyBuffer v_codes, ffi::AnyBuffer v_scales,
                  ffi::AnyBuffer v_zeros, ffi::AnyBuffer v_window, ffi::Buffer<ffi::F32> mask,
                  ffi::ResultBuffer<ffi::F32> out, int32_t k_kind, int32_t k_bits, int64_t k_group, int32_t v_kind,
                  int32_t v_bits, int64_t v_group, float scale, int32_t causal, int64_t new_tokens,
                  int32_t has_mask) {
    auto q = query.dimensions();  // [B, H, R, D]
    if (q.size() != 4) return ffi::Error::InvalidArgument("kvquant: the query must be [B, H, R, D]");
    Problem p{};
    p.query = query.typed_data();
    p.batch = q[0], p.heads = q[1], p.rows = q[2], p.dim = q[3];
    p.scale = scale;
    p.keys = side_of(k_kind, k_bits, k_group, k_codes, k_scales, k_zeros, k_window);
    p.values = side_of(v_kind, v_bits, v_group, v_codes, v_scales, v_zeros, v_window);
    p.chunk = 0;  // the kernel's own work split
    p.mask = has_mask ? mask.typed_data() : nullptr;
    p.new_tokens = new_tokens, p.causal = causal;
    p.out = out->typed_data();
    if (kvquant_decode_attention(&p) != 0)
        return ffi::Error::InvalidArgument("kvquant: the keys and values hold different token counts, or none");
    return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kvquant_jax_decode_attention, attend,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("k_kind")
                                  .Attr<int32_t>("k_bits")
                                  .Attr<int64_t>("k_group")
                                  .Attr<int32_t>("v_kind")
                                  .Attr<int32_t>("v_bits")
                                  .Attr<int64_t>("v_group")
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("causal")
                                  .Attr<int64_t>("new_tokens")
                                  .Attr<int32_t>("has_mask"));
