// Dense linear algebra: a tiled GEMM `C = alpha op(A) op(B) + beta D` (D is C itself or a separate
// operand), its split-K reduction, and unblocked Householder QR of the rows of a matrix.
//
// GEMM operands are strided: element (i, k) of op(A) is at `a_offset + i a_rs + k a_cs`, so one
// kernel serves `A B`, `A^T B` and `A B^T` with the transposes as strides. A is bound through the
// weights part (f32, f16 or bf16; `array<f16>` in the shader-f16 variant), B and D as packed words
// whose encodings are `B_ELEMENT` and `D_ELEMENT`; C is f32. Every product accumulates in f32.

override WORKGROUP: u32 = 256u;
// gemm_tile runs SIDE x SIDE invocations, each a MICRO x MICRO block of outputs, over K in steps
// of TILE_K staged through workgroup memory (2 SIDE MICRO TILE_K floats).
override SIDE: u32 = 16u;
override TILE_K: u32 = 16u;
override B_ELEMENT: u32 = ELEMENT_F32;
override D_ELEMENT: u32 = ELEMENT_F32;
const MICRO: u32 = 4u;

struct LinalgParams {
    m: u32,
    n: u32,
    k: u32,
    // Row tiles of the grid's y dimension; y / row_tiles is the K split.
    row_tiles: u32,
    a_offset: u32,
    a_rs: u32,
    a_cs: u32,
    b_offset: u32,
    b_rs: u32,
    b_cs: u32,
    c_offset: u32,
    c_rs: u32,
    d_offset: u32,
    d_rs: u32,
    // Elements of K per split, and floats between two splits' partial products.
    k_split: u32,
    split_stride: u32,
    splits: u32,
    // 1: beta scales D, 0: beta scales C's old value.
    use_d: u32,
    alpha: f32,
    beta: f32,
}

@group(0) @binding(1) var<storage, read> b: array<u32>;
@group(0) @binding(2) var<uniform> p: LinalgParams;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;
@group(0) @binding(4) var<storage, read> d: array<u32>;
// Householder reflectors: row j holds v_j (zero before j, v_j[j] = 1); beta_j at b_offset + j.
@group(0) @binding(5) var<storage, read_write> reflectors: array<f32>;

var<workgroup> a_tile: array<f32, SIDE * MICRO * TILE_K>;
var<workgroup> b_tile: array<f32, SIDE * MICRO * TILE_K>;
var<workgroup> lane_sums: array<f32, WORKGROUP>;

fn load_b(i: u32) -> f32 {
    return widen(b[word_of(i, B_ELEMENT)], i, B_ELEMENT);
}

// C(i, j) = alpha sum + beta (D or C)(i, j); with beta = 0 the old value is not read, as in BLAS.
fn finish(i: u32, j: u32, sum: f32) {
    let at = p.c_offset + i * p.c_rs + j;
    var value = p.alpha * sum;
    if p.beta != 0.0 {
        var old: f32;
        if p.use_d != 0u {
            let e = p.d_offset + i * p.d_rs + j;
            old = widen(d[word_of(e, D_ELEMENT)], e, D_ELEMENT);
        } else {
            old = c[at];
        }
        value = value + p.beta * old;
    }
    c[at] = value;
}

@compute @workgroup_size(SIDE, SIDE)
fn gemm_tile(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) flat: u32,
) {
    let tile = SIDE * MICRO;
    let split = wg.y / p.row_tiles;
    let row0 = (wg.y % p.row_tiles) * tile;
    let col0 = wg.x * tile;
    let k_begin = split * p.k_split;
    let k_end = min(p.k, k_begin + p.k_split);
    var acc: array<f32, 16>;
    for (var k0 = k_begin; k0 < k_end; k0 += TILE_K) {
        // Consecutive invocations load along whichever index is contiguous in memory.
        for (var e = flat; e < tile * TILE_K; e += SIDE * SIDE) {
            var r = e / TILE_K;
            var kk = e % TILE_K;
            if p.a_cs != 1u {
                kk = e / tile;
                r = e % tile;
            }
            let i = row0 + r;
            let k = k0 + kk;
            var v = 0.0;
            if i < p.m && k < k_end {
                v = load_w(p.a_offset + i * p.a_rs + k * p.a_cs);
            }
            a_tile[kk * tile + r] = v;
        }
        for (var e = flat; e < tile * TILE_K; e += SIDE * SIDE) {
            var kk = e / tile;
            var j = e % tile;
            if p.b_cs != 1u {
                j = e / TILE_K;
                kk = e % TILE_K;
            }
            let col = col0 + j;
            let k = k0 + kk;
            var v = 0.0;
            if col < p.n && k < k_end {
                v = load_b(p.b_offset + k * p.b_rs + col * p.b_cs);
            }
            b_tile[kk * tile + j] = v;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TILE_K; kk++) {
            // Rows lid.y + r SIDE and columns lid.x + q SIDE: neighbours read neighbouring words.
            var av: array<f32, 4>;
            var bv: array<f32, 4>;
            for (var r = 0u; r < MICRO; r++) {
                av[r] = a_tile[kk * tile + lid.y + r * SIDE];
                bv[r] = b_tile[kk * tile + lid.x + r * SIDE];
            }
            for (var r = 0u; r < MICRO; r++) {
                for (var q = 0u; q < MICRO; q++) {
                    acc[r * MICRO + q] = fma(av[r], bv[q], acc[r * MICRO + q]);
                }
            }
        }
        workgroupBarrier();
    }
    for (var r = 0u; r < MICRO; r++) {
        let i = row0 + lid.y + r * SIDE;
        for (var q = 0u; q < MICRO; q++) {
            let j = col0 + lid.x + q * SIDE;
            if i < p.m && j < p.n {
                if p.splits > 1u {
                    c[split * p.split_stride + i * p.n + j] = acc[r * MICRO + q];
                } else {
                    finish(i, j, acc[r * MICRO + q]);
                }
            }
        }
    }
}

// Sums the splits' partial products (bound as B, f32, `m x n` each) in split order into C.
@compute @workgroup_size(WORKGROUP)
fn gemm_reduce(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let e = linear_index(wg, groups, lid, WORKGROUP);
    if e >= p.m * p.n {
        return;
    }
    var sum = 0.0;
    for (var s = 0u; s < p.splits; s++) {
        sum += load_b(s * p.split_stride + e);
    }
    finish(e / p.n, e % p.n, sum);
}

// Zeroes the diagonal and the leading `k x k` block of C (`m x n`, row stride c_rs): OPCM's mask.
@compute @workgroup_size(WORKGROUP)
fn mask_block(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let e = linear_index(wg, groups, lid, WORKGROUP);
    if e >= p.m * p.n {
        return;
    }
    let i = e / p.n;
    let j = e % p.n;
    if i == j || (i < p.k && j < p.k) {
        c[p.c_offset + i * p.c_rs + j] = 0.0;
    }
}

// C (`m x n`) = the first m rows of the n x n identity.
@compute @workgroup_size(WORKGROUP)
fn identity_rows(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let e = linear_index(wg, groups, lid, WORKGROUP);
    if e < p.m * p.n {
        c[e] = select(0.0, 1.0, e / p.n == e % p.n);
    }
}

// Transposes one page of B (`m x n`, from b_offset) into C: B(i, j) goes to
// c[c_offset + j c_rs + i], widened to f32.
@compute @workgroup_size(WORKGROUP)
fn transpose(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let e = linear_index(wg, groups, lid, WORKGROUP);
    if e < p.m * p.n {
        c[p.c_offset + (e % p.n) * p.c_rs + e / p.n] = load_b(p.b_offset + e);
    }
}

// The workgroup's sum of `value`, or its largest with `take_max` (every invocation gets it); a
// tree in a fixed order.
fn workgroup_reduce(lid: u32, value: f32, take_max: bool) -> f32 {
    lane_sums[lid] = value;
    workgroupBarrier();
    for (var half = WORKGROUP / 2u; half > 0u; half >>= 1u) {
        if lid < half {
            let mine = lane_sums[lid];
            let other = lane_sums[lid + half];
            lane_sums[lid] = select(mine + other, max(mine, other), take_max);
        }
        workgroupBarrier();
    }
    let result = lane_sums[0];
    workgroupBarrier();
    return result;
}

// Step j of Householder QR on the rows of C (`n` rows of length `m`; row j is column j of the
// matrix factored): the reflector H = I - beta v v^T with v[j] = 1 that maps x = C[j, j..] to
// (norm, 0, ...), norm >= 0 (Golub and Van Loan, Alg. 5.1.1), written to reflector row j; C[j, j]
// becomes the norm. One workgroup; p.k = j, p.m the row length.
@compute @workgroup_size(WORKGROUP)
fn house_vector(@builtin(local_invocation_index) lid: u32) {
    let j = p.k;
    let row = j * p.m;
    // Read before any barrier: invocation 0 overwrites it at the end.
    let x0_unscaled = c[row + j];
    // Scaled by the largest magnitude, so the sum of squares neither overflows nor underflows.
    var largest = 0.0;
    for (var i = j + lid; i < p.m; i += WORKGROUP) {
        largest = max(largest, abs(c[row + i]));
    }
    largest = workgroup_reduce(lid, largest, true);
    let scale = select(1.0 / largest, 1.0, largest == 0.0);
    var squares = 0.0;
    for (var i = j + 1u + lid; i < p.m; i += WORKGROUP) {
        let x = c[row + i] * scale;
        squares = fma(x, x, squares);
    }
    let sigma = workgroup_reduce(lid, squares, false);
    let x0 = x0_unscaled * scale;
    let norm = sqrt(fma(x0, x0, sigma));
    var v0 = 1.0;
    var beta = 0.0;
    if sigma == 0.0 {
        // Already (x0, 0, ...): no reflection, or a sign flip when x0 < 0.
        beta = select(0.0, 2.0, x0 < 0.0);
    } else {
        // x0 - norm without cancellation when x0 > 0.
        v0 = select(x0 - norm, -sigma / (x0 + norm), x0 > 0.0);
        beta = 2.0 * v0 * v0 / (sigma + v0 * v0);
    }
    let out = j * p.m;
    for (var i = lid; i < p.m; i += WORKGROUP) {
        var v = 0.0;
        if i == j {
            v = 1.0;
        } else if i > j {
            v = c[row + i] * scale / v0;
        }
        reflectors[out + i] = v;
    }
    if lid == 0u {
        reflectors[p.b_offset + j] = beta;
        c[row + j] = norm * largest;
    }
}

// Applies reflector p.k to rows [p.a_offset, p.n) of C (rows of length m): one workgroup per row,
// x -= beta (v . x) v over the entries from p.k on.
@compute @workgroup_size(WORKGROUP)
fn house_apply(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let target_row = p.a_offset + wg.x + wg.y * groups.x;
    if target_row >= p.n {
        return;
    }
    let j = p.k;
    let row = target_row * p.m;
    let v = j * p.m;
    var dot = 0.0;
    for (var i = j + lid; i < p.m; i += WORKGROUP) {
        dot = fma(reflectors[v + i], c[row + i], dot);
    }
    let s = reflectors[p.b_offset + j] * workgroup_reduce(lid, dot, false);
    for (var i = j + lid; i < p.m; i += WORKGROUP) {
        c[row + i] = fma(-s, reflectors[v + i], c[row + i]);
    }
}
