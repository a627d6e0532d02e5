// Ternary compression: the moments ComPEFT's scale needs, and the kernels that use packed codes
// straight from their 2-bit layout (code i in bits 2 (i % 16) of word i / 16; 00 = 0, 01 = +1,
// 10 = -1), bound whole; and decompress-add into f16 or bf16 parameters, rounded on the device.

struct TernaryParams {
    // Entries in this page (codes, or tensor entries for the moments).
    len: u32,
    // ternary_gemv: rows and entries per row.
    rows: u32,
    cols: u32,
    // ternary_decode, ternary_add: the flat index (in the codes) of this page's first entry.
    first_code: u32,
    // ternary_gemv, ternary_decode: the scale; ternary_add: lambda * scale; tile_moments: the
    // shift subtracted before squaring.
    scale: f32,
    // tile_moments: index of the page's first tile among all tiles.
    tile_base: u32,
}

override ELEMENT: u32 = ELEMENT_F32;
override WORKGROUP: u32 = 256u;
override ITEMS: u32 = 16u;

@group(0) @binding(0) var<storage, read> codes: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<uniform> p: TernaryParams;
// ternary_add_packed: f16 or bf16 parameters, two per word (ELEMENT says which).
@group(0) @binding(4) var<storage, read_write> theta: array<u32>;

var<workgroup> lane_sums: array<f32, WORKGROUP>;
var<workgroup> lane_squares: array<f32, WORKGROUP>;
var<workgroup> lane_max: array<f32, WORKGROUP>;

// The 2-bit code of entry i (0b11 never reaches the device: uploads are validated).
fn code_bits(i: u32) -> u32 {
    return (codes[i >> 4u] >> (2u * (i & 15u))) & 3u;
}

// `scale` times a code, with +0.0 for a zero code whatever the scale's sign.
fn scaled(bits: u32, scale: f32) -> f32 {
    return select(select(0.0, -scale, bits == 2u), scale, bits == 1u);
}

fn tree_sum(lid: u32) {
    workgroupBarrier();
    for (var half = WORKGROUP / 2u; half > 0u; half >>= 1u) {
        if lid < half {
            lane_sums[lid] += lane_sums[lid + half];
            lane_squares[lid] += lane_squares[lid + half];
        }
        workgroupBarrier();
    }
}

// One workgroup per row: out[r] = scale * (sum of x over +1 codes - over -1 codes).
// Each invocation walks whole words of the row, so a word is read once.
@compute @workgroup_size(WORKGROUP)
fn ternary_gemv(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let r = wg.x + wg.y * groups.x;
    if r >= p.rows {
        return;
    }
    let start = r * p.cols;
    let end = start + p.cols;
    var acc = 0.0;
    for (var w = (start >> 4u) + lid; w <= ((end - 1u) >> 4u) && end > start; w += WORKGROUP) {
        var bits = codes[w];
        let first = w << 4u;
        // Drop the codes of other rows sharing this word.
        if first < start {
            bits &= ~((1u << (2u * (start - first))) - 1u);
        }
        if end - first < 16u {
            bits &= (1u << (2u * (end - first))) - 1u;
        }
        while bits != 0u {
            let slot = firstTrailingBit(bits) >> 1u;
            let value = bitcast<f32>(x[first + slot - start]);
            acc += select(value, -value, ((bits >> (2u * slot)) & 2u) != 0u);
            bits &= ~(3u << (2u * slot));
        }
    }
    lane_sums[lid] = acc;
    lane_squares[lid] = 0.0;
    tree_sum(lid);
    if lid == 0u {
        out[r] = p.scale * lane_sums[0];
    }
}

// out[i] = scale * code(i), +0.0 for a zero code.
@compute @workgroup_size(WORKGROUP)
fn ternary_decode(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_index(wg, groups, lid, WORKGROUP);
    if i < p.len {
        out[i] = scaled(code_bits(p.first_code + i), p.scale);
    }
}

// out[i] += (lambda * scale) * code(i), where the code is not zero.
@compute @workgroup_size(WORKGROUP)
fn ternary_add(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_index(wg, groups, lid, WORKGROUP);
    if i < p.len {
        let bits = code_bits(p.first_code + i);
        if bits != 0u {
            out[i] += scaled(bits, p.scale);
        }
    }
}

// Per tile of WORKGROUP * ITEMS entries of x: the sum of (v - shift), of (v - shift)^2 and the
// largest |v - shift|, at out[3 (tile_base + tile)] and the next two words. The largest tells
// the host whether a tile's f32 sum of squares lost entries to underflow.
@compute @workgroup_size(WORKGROUP)
fn tile_moments(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let tile = wg.x + wg.y * groups.x;
    let base = tile * WORKGROUP * ITEMS;
    var sum = 0.0;
    var squares = 0.0;
    var largest = 0.0;
    for (var item = 0u; item < ITEMS; item++) {
        let i = base + item * WORKGROUP + lid;
        if i < p.len {
            let d = widen(x[word_of(i, ELEMENT)], i, ELEMENT) - p.scale;
            sum += d;
            squares += d * d;
            largest = max(largest, abs(d));
        }
    }
    lane_sums[lid] = sum;
    lane_squares[lid] = squares;
    lane_max[lid] = largest;
    tree_sum(lid);
    for (var half = WORKGROUP / 2u; half > 0u; half >>= 1u) {
        if lid < half {
            lane_max[lid] = max(lane_max[lid], lane_max[lid + half]);
        }
        workgroupBarrier();
    }
    if lid == 0u {
        let at = 3u * (p.tile_base + tile);
        out[at] = lane_sums[0];
        out[at + 1u] = lane_squares[0];
        out[at + 2u] = lane_max[0];
    }
}

// IEEE binary16 bits of v, rounded to nearest even (overflow to infinity, subnormals, NaN kept
// quiet), with integer operations so that every device rounds alike.
fn f32_to_f16_bits(v: f32) -> u32 {
    let x = bitcast<u32>(v);
    let sign = (x >> 16u) & 0x8000u;
    let exponent = (x >> 23u) & 0xffu;
    let mantissa = x & 0x7fffffu;
    if exponent == 0xffu {
        return sign | 0x7c00u | select(0u, 0x200u | (mantissa >> 13u), mantissa != 0u);
    }
    let e = i32(exponent) - 112;
    if e >= 31 {
        return sign | 0x7c00u;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        let m = mantissa | 0x800000u;
        let shift = u32(14 - e);
        let kept = m >> shift;
        let rest = m & ((1u << shift) - 1u);
        let halfway = 1u << (shift - 1u);
        let up = rest > halfway || (rest == halfway && (kept & 1u) == 1u);
        return sign | (kept + select(0u, 1u, up));
    }
    let h = (u32(e) << 10u) | (mantissa >> 13u);
    let rest = mantissa & 0x1fffu;
    let up = rest > 0x1000u || (rest == 0x1000u && (h & 1u) == 1u);
    // A carry out of the mantissa steps the exponent, to infinity at the top: still correct.
    return sign | (h + select(0u, 1u, up));
}

// bfloat16 bits of v, rounded to nearest even (NaN kept quiet).
fn f32_to_bf16_bits(v: f32) -> u32 {
    let x = bitcast<u32>(v);
    if (x & 0x7fffffffu) > 0x7f800000u {
        return (x >> 16u) | 0x40u;
    }
    return (x + 0x7fffu + ((x >> 16u) & 1u)) >> 16u;
}

// theta += (lambda * scale) * code for f16 or bf16 parameters, one word (two entries) per
// invocation, each sum rounded once from f32 to the parameters' type.
@compute @workgroup_size(WORKGROUP)
fn ternary_add_packed(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = linear_index(wg, groups, lid, WORKGROUP);
    if 2u * w >= p.len {
        return;
    }
    var word = theta[w];
    for (var half = 0u; half < 2u; half++) {
        let i = 2u * w + half;
        let c = p.first_code + i;
        let bits = code_bits(c);
        if i < p.len && bits != 0u {
            let sum = widen(word, i, ELEMENT) + scaled(bits, p.scale);
            var rounded = f32_to_bf16_bits(sum);
            if ELEMENT == ELEMENT_F16 {
                rounded = f32_to_f16_bits(sum);
            }
            let shift = 16u * half;
            word = (word & ~(0xffffu << shift)) | (rounded << shift);
        }
    }
    theta[w] = word;
}
