// Magnitude selection by radix select on the order-preserving image of |x| (the low 31 bits of
// its f32 bits). Infinities and NaN (images from infinity's up) have no place in a selection:
// `histogram` records the first one's index, and the host reports it. The host runs `histogram` once per digit,
// from the top, each time counting only the keys whose higher digits match the bin chosen so
// far, until the k-th largest key is known; `count_equal` and `apply_cuts` then keep exactly the
// first `ties` keys equal to it in flat order (ties go to the lower index).
//
// Work is tiled: a workgroup owns TILE = WORKGROUP * ITEMS consecutive elements of a page.

struct SelectParams {
    // Elements in this page.
    len: u32,
    // histogram: digit = (key >> shift) & digit_mask, counted iff key & prefix_mask == prefix.
    shift: u32,
    digit_mask: u32,
    prefix_mask: u32,
    prefix: u32,
    // histogram: the slot (after the bins) that receives the page's first non-finite index.
    nan_slot: u32,
    // count_equal, apply_cuts: index of the page's first tile among all tiles counted.
    tile_base: u32,
    // apply_cuts: 1 when cut b (outliers dropped) is in force.
    has_b: u32,
    // Cut a keeps key > key_a, and key == key_a where the rank among equals is below ties_a;
    // cut b likewise; an element is kept iff a keeps it and b does not.
    key_a: u32,
    ties_a: u32,
    key_b: u32,
    ties_b: u32,
    // apply_cuts: 1 writes the kept entries' sign codes, 2 bits each, to `packed` (ComPEFT's
    // dense layout) instead of the kept values to `out`; needs ITEMS = 16.
    pack: u32,
}

override ELEMENT: u32 = ELEMENT_F32;
override WORKGROUP: u32 = 256u;
override ITEMS: u32 = 16u;
// Bins of the widest digit (11 bits).
const MAX_BINS: u32 = 2048u;

@group(0) @binding(0) var<storage, read> x: array<u32>;
// histogram: bins then NaN slots; count_equal: two counts per tile; apply_cuts: two exclusive
// offsets per tile.
@group(0) @binding(1) var<storage, read_write> counts: array<atomic<u32>>;
@group(0) @binding(2) var<uniform> p: SelectParams;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read_write> packed: array<u32>;

var<workgroup> local_bins: array<atomic<u32>, MAX_BINS>;
var<workgroup> scan_a: array<u32, WORKGROUP>;
var<workgroup> scan_b: array<u32, WORKGROUP>;

fn value(i: u32) -> f32 {
    return widen(x[word_of(i, ELEMENT)], i, ELEMENT);
}

fn magnitude_key(v: f32) -> u32 {
    return bitcast<u32>(v) & 0x7fffffffu;
}

fn tile(wg: vec3<u32>, groups: vec3<u32>) -> u32 {
    return wg.x + wg.y * groups.x;
}

@compute @workgroup_size(WORKGROUP)
fn histogram(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let bins = p.digit_mask + 1u;
    for (var b = lid; b < bins; b += WORKGROUP) {
        atomicStore(&local_bins[b], 0u);
    }
    workgroupBarrier();
    let base = tile(wg, groups) * WORKGROUP * ITEMS;
    for (var item = 0u; item < ITEMS; item++) {
        // Strided within the tile, so that neighbouring invocations read neighbouring words.
        let i = base + item * WORKGROUP + lid;
        if i < p.len {
            let key = magnitude_key(value(i));
            if key >= 0x7f800000u {
                atomicMin(&counts[bins + p.nan_slot], i);
            } else if (key & p.prefix_mask) == p.prefix {
                atomicAdd(&local_bins[(key >> p.shift) & p.digit_mask], 1u);
            }
        }
    }
    workgroupBarrier();
    for (var b = lid; b < bins; b += WORKGROUP) {
        let c = atomicLoad(&local_bins[b]);
        if c > 0u {
            atomicAdd(&counts[b], c);
        }
    }
}

// This invocation's ITEMS consecutive elements, in flat order (ranks need the order).
fn first_item(wg: vec3<u32>, groups: vec3<u32>, lid: u32) -> u32 {
    return tile(wg, groups) * WORKGROUP * ITEMS + lid * ITEMS;
}

// Exclusive prefix sums of scan_a and scan_b over the workgroup (Hillis-Steele).
fn exclusive_scan(lid: u32, a: u32, b: u32) -> vec2<u32> {
    scan_a[lid] = a;
    scan_b[lid] = b;
    workgroupBarrier();
    for (var offset = 1u; offset < WORKGROUP; offset <<= 1u) {
        var add_a = 0u;
        var add_b = 0u;
        if lid >= offset {
            add_a = scan_a[lid - offset];
            add_b = scan_b[lid - offset];
        }
        workgroupBarrier();
        scan_a[lid] += add_a;
        scan_b[lid] += add_b;
        workgroupBarrier();
    }
    return vec2<u32>(scan_a[lid] - a, scan_b[lid] - b);
}

@compute @workgroup_size(WORKGROUP)
fn count_equal(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let first = first_item(wg, groups, lid);
    var equal_a = 0u;
    var equal_b = 0u;
    for (var i = first; i < min(first + ITEMS, p.len); i++) {
        let key = magnitude_key(value(i));
        equal_a += select(0u, 1u, key == p.key_a);
        equal_b += select(0u, 1u, key == p.key_b);
    }
    let before = exclusive_scan(lid, equal_a, equal_b);
    if lid == WORKGROUP - 1u {
        let t = p.tile_base + tile(wg, groups);
        atomicStore(&counts[2u * t], before.x + equal_a);
        atomicStore(&counts[2u * t + 1u], before.y + equal_b);
    }
}

@compute @workgroup_size(WORKGROUP)
fn apply_cuts(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let first = first_item(wg, groups, lid);
    let end = min(first + ITEMS, p.len);
    var equal_a = 0u;
    var equal_b = 0u;
    for (var i = first; i < end; i++) {
        let key = magnitude_key(value(i));
        equal_a += select(0u, 1u, key == p.key_a);
        equal_b += select(0u, 1u, key == p.key_b);
    }
    let before = exclusive_scan(lid, equal_a, equal_b);
    let t = p.tile_base + tile(wg, groups);
    var rank_a = atomicLoad(&counts[2u * t]) + before.x;
    var rank_b = atomicLoad(&counts[2u * t + 1u]) + before.y;
    var word = 0u;
    for (var i = first; i < end; i++) {
        let v = value(i);
        let key = magnitude_key(v);
        var keep = key > p.key_a || (key == p.key_a && rank_a < p.ties_a);
        if p.has_b != 0u {
            keep = keep && !(key > p.key_b || (key == p.key_b && rank_b < p.ties_b));
        }
        rank_a += select(0u, 1u, key == p.key_a);
        rank_b += select(0u, 1u, key == p.key_b);
        if p.pack != 0u {
            // sign(v) as a code, with sign(+-0) = 0: a kept zero stays zero.
            let code = select(select(0u, 2u, v < 0.0), 1u, v > 0.0);
            word |= select(0u, code, keep) << (2u * (i - first));
        } else {
            out[i] = select(0.0, v, keep);
        }
    }
    if p.pack != 0u && first < p.len {
        packed[first / 16u] = word;
    }
}
