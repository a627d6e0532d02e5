// DARE: out_i = tau_i * scale where element first + i survives, else 0. Survival is drawn from
// Philox4x32-10 keyed by the seed, element e taking word e % 4 of block e / 4: the same integers
// as kernels_core::CounterRng, so every backend and every chunking drops the same entries.

struct DareParams {
    // Elements in this page.
    len: u32,
    // Flat index of the page's first element, as two words (little end first).
    first_lo: u32,
    first_hi: u32,
    // Element e is dropped iff (word(e) >> 8) < drop_threshold.
    drop_threshold: u32,
    key: vec2<u32>,
    scale: f32,
    // dare_l1_sums: index of the page's first tile among all tiles.
    tile_base: u32,
}

override ELEMENT: u32 = ELEMENT_F32;
override WORKGROUP: u32 = 256u;
override ITEMS: u32 = 16u;

@group(0) @binding(0) var<storage, read> tau: array<u32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<uniform> p: DareParams;

// (high, low) words of the 64-bit product a * b, from 16-bit halves (WGSL has no 64-bit integers).
fn mul_wide(a: u32, b: u32) -> vec2<u32> {
    let a_lo = a & 0xffffu;
    let a_hi = a >> 16u;
    let b_lo = b & 0xffffu;
    let b_hi = b >> 16u;
    let lo_lo = a_lo * b_lo;
    let hi_lo = a_hi * b_lo;
    let lo_hi = a_lo * b_hi;
    let hi_hi = a_hi * b_hi;
    let middle = (lo_lo >> 16u) + (hi_lo & 0xffffu) + (lo_hi & 0xffffu);
    let high = hi_hi + (hi_lo >> 16u) + (lo_hi >> 16u) + (middle >> 16u);
    return vec2<u32>(high, a * b);
}

fn philox4x32_10(counter: vec4<u32>, seed_key: vec2<u32>) -> vec4<u32> {
    var c = counter;
    var key = seed_key;
    for (var round = 0u; round < 10u; round++) {
        if round > 0u {
            key += vec2<u32>(0x9E3779B9u, 0xBB67AE85u);
        }
        let p0 = mul_wide(0xD2511F53u, c.x);
        let p1 = mul_wide(0xCD9E8D57u, c.z);
        c = vec4<u32>(p1.x ^ c.y ^ key.x, p1.y, p0.x ^ c.w ^ key.y, p0.y);
    }
    return c;
}

// Whether element first + i survives.
fn survives(i: u32) -> bool {
    let lo = p.first_lo + i;
    let hi = p.first_hi + select(0u, 1u, lo < i);
    let block = vec2<u32>((lo >> 2u) | (hi << 30u), hi >> 2u);
    let words = philox4x32_10(vec4<u32>(block.x, block.y, 0u, 0u), p.key);
    return (words[lo & 3u] >> 8u) >= p.drop_threshold;
}

var<workgroup> all_sums: array<f32, WORKGROUP>;
var<workgroup> kept_sums: array<f32, WORKGROUP>;

// Per tile of WORKGROUP * ITEMS elements: the sum of |tau| and of the survivors' |tau| (the
// L1-preserving rescale's two norms), at out[2 (tile_base + tile)] and the next word.
@compute @workgroup_size(WORKGROUP)
fn dare_l1_sums(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let tile = wg.x + wg.y * groups.x;
    let base = tile * WORKGROUP * ITEMS;
    var all = 0.0;
    var kept = 0.0;
    for (var item = 0u; item < ITEMS; item++) {
        let i = base + item * WORKGROUP + lid;
        if i < p.len {
            let v = abs(widen(tau[word_of(i, ELEMENT)], i, ELEMENT));
            all += v;
            kept += select(0.0, v, survives(i));
        }
    }
    all_sums[lid] = all;
    kept_sums[lid] = kept;
    workgroupBarrier();
    for (var half = WORKGROUP / 2u; half > 0u; half >>= 1u) {
        if lid < half {
            all_sums[lid] += all_sums[lid + half];
            kept_sums[lid] += kept_sums[lid + half];
        }
        workgroupBarrier();
    }
    if lid == 0u {
        out[2u * (p.tile_base + tile)] = all_sums[0];
        out[2u * (p.tile_base + tile) + 1u] = kept_sums[0];
    }
}

@compute @workgroup_size(WORKGROUP)
fn dare(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_index(wg, groups, lid, WORKGROUP);
    if i >= p.len {
        return;
    }
    let v = widen(tau[word_of(i, ELEMENT)], i, ELEMENT);
    out[i] = select(0.0, v * p.scale, survives(i));
}
