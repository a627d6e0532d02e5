// Element encodings of a tensor bound as `array<u32>`, so that one shader reads f32, f16 and bf16
// without the `shader-f16` feature: f32 is one element per word; f16 and bf16 are two per word,
// the lower index in the low half (as little-endian memory holds them). Tensors are padded to
// whole words on upload.
//
// f16 is widened with integer operations, not `unpack2x16float`: that built-in needs a capability
// GL ES lacks and may flush subnormals, while this is exact everywhere (selection keys depend on
// every bit).

const ELEMENT_F32: u32 = 0u;
const ELEMENT_F16: u32 = 1u;
const ELEMENT_BF16: u32 = 2u;

// The word that holds element `i`.
fn word_of(i: u32, element: u32) -> u32 {
    return select(i >> 1u, i, element == ELEMENT_F32);
}

// Element `i` (held in `word`) widened to f32; exact for every encoding.
fn widen(word: u32, i: u32, element: u32) -> f32 {
    if element == ELEMENT_F32 {
        return bitcast<f32>(word);
    }
    let odd = (i & 1u) == 1u;
    if element == ELEMENT_F16 {
        return f16_bits_to_f32(select(word & 0xffffu, word >> 16u, odd));
    }
    return bitcast<f32>(select(word << 16u, word & 0xffff0000u, odd));
}

// The f32 of IEEE binary16 bits `h` (low 16 bits), exactly: subnormals, infinities, NaN payloads.
fn f16_bits_to_f32(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let exponent = (h >> 10u) & 0x1fu;
    let mantissa = h & 0x3ffu;
    if exponent == 0x1fu {
        return bitcast<f32>(sign | 0x7f800000u | (mantissa << 13u));
    }
    if exponent != 0u {
        return bitcast<f32>(sign | ((exponent + 112u) << 23u) | (mantissa << 13u));
    }
    // mantissa * 2^-24 is a normal f32 (or zero), computed exactly.
    let magnitude = f32(mantissa) * 5.9604644775390625e-8;
    return select(magnitude, -magnitude, sign != 0u);
}

// The index of this invocation in a 1-D range dispatched as a 2-D grid of `workgroup`-wide
// workgroups (a grid dimension is limited to 65535 workgroups).
fn linear_index(wg: vec3<u32>, groups: vec3<u32>, lid: u32, workgroup: u32) -> u32 {
    return (wg.x + wg.y * groups.x) * workgroup + lid;
}

// Whether `x` is NaN, from its bits: WGSL lets a compiler assume a float comparison never sees
// NaN, so `x != x` may fold to false.
fn is_nan(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u;
}
