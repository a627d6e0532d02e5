// Merge reductions, element-wise over equally long tensors, a few models per pass (WebGPU
// guarantees only 8 storage bindings per stage). Passes accumulate into f32 state buffers that
// the host allocates per page; the last pass writes the result into the first state buffer.

struct MergeParams {
    // Elements in this page.
    len: u32,
    // Models bound in this pass (1..=4; fisher_pass: 1..=2).
    models: u32,
    // 0: the pass starts the sums; 1: it adds to them.
    accumulate: u32,
    // ties_pass, ties_finish, gram_tiles: see there.
    flags: u32,
    // Per-model coefficients of this pass.
    coef: vec4<f32>,
    // fisher_pass: floor. fisher_finish: 1 / sum w. ties_finish: lambda. fisher_accumulate: scale.
    scalar: f32,
    // gram_tiles: index of the page's first tile among all tiles.
    tile_base: u32,
}

override ELEMENT: u32 = ELEMENT_F32;
override WORKGROUP: u32 = 256u;
// gram_tiles: entries each invocation handles (a tile is WORKGROUP * ITEMS entries).
override ITEMS: u32 = 16u;

// The bits of MergeParams.flags.
const FLAG_ZERO_SUM_ELECTS_POSITIVE: u32 = 1u;
const FLAG_NORMALIZE: u32 = 2u;
const FLAG_CENTER: u32 = 4u;

@group(0) @binding(0) var<storage, read> in0: array<u32>;
@group(0) @binding(1) var<storage, read> in1: array<u32>;
@group(0) @binding(2) var<storage, read> in2: array<u32>;
@group(0) @binding(3) var<storage, read> in3: array<u32>;
@group(0) @binding(4) var<storage, read_write> sum0: array<f32>;
@group(0) @binding(5) var<storage, read_write> sum1: array<f32>;
@group(0) @binding(6) var<storage, read_write> sum2: array<f32>;
@group(0) @binding(7) var<uniform> p: MergeParams;

fn load_model(m: u32, i: u32) -> f32 {
    let at = word_of(i, ELEMENT);
    switch m {
        case 0u: { return widen(in0[at], i, ELEMENT); }
        case 1u: { return widen(in1[at], i, ELEMENT); }
        case 2u: { return widen(in2[at], i, ELEMENT); }
        default: { return widen(in3[at], i, ELEMENT); }
    }
}

// The f32 tensors of fisher_pass (in2, in3 hold the Fisher diagonals of models 0 and 1).
fn load_fisher(m: u32, i: u32) -> f32 {
    return bitcast<f32>(select(in3[i], in2[i], m == 0u));
}

// The sign TIES elects and compares: 1, -1, or 0 for zeros and NaN.
fn ties_sign(v: f32) -> f32 {
    return select(select(0.0, -1.0, v < 0.0), 1.0, v > 0.0);
}

// sum0 = (accumulate ? sum0 : 0) + sum over m of coef[m] * model m.
@compute @workgroup_size(WORKGROUP)
fn linear_pass(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_index(wg, groups, lid, WORKGROUP);
    if i >= p.len {
        return;
    }
    var acc = select(0.0, sum0[i], p.accumulate != 0u);
    for (var m = 0u; m < p.models; m++) {
        acc += p.coef[m] * load_model(m, i);
    }
    sum0[i] = acc;
}

// Fisher merging, two models per pass (theta in in0/in1, Fisher in in2/in3): with
// F' = max(F, floor) (NaN stays NaN), sum0 += w F' theta, sum1 += w F', sum2 += w theta.
// NaN is tested on the bits: WGSL lets a compiler assume floats are never NaN.
@compute @workgroup_size(WORKGROUP)
fn fisher_pass(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_index(wg, groups, lid, WORKGROUP);
    if i >= p.len {
        return;
    }
    var num = 0.0;
    var den = 0.0;
    var plain = 0.0;
    if p.accumulate != 0u {
        num = sum0[i];
        den = sum1[i];
        plain = sum2[i];
    }
    for (var m = 0u; m < p.models; m++) {
        let f = load_fisher(m, i);
        let floored = select(max(f, p.scalar), f, is_nan(f));
        let theta = load_model(m, i);
        let wf = p.coef[m] * floored;
        num += wf * theta;
        den += wf;
        plain += p.coef[m] * theta;
    }
    sum0[i] = num;
    sum1[i] = den;
    sum2[i] = plain;
}

// sum0 = sum1 > 0 (or NaN) ? sum0 / sum1 : sum2 * scalar (the plain mean where every Fisher is
// 0; the weights arrive divided by their sum, so scalar is 1).
@compute @workgroup_size(WORKGROUP)
fn fisher_finish(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_index(wg, groups, lid, WORKGROUP);
    if i >= p.len {
        return;
    }
    let den = sum1[i];
    sum0[i] = select(sum2[i] * p.scalar, sum0[i] / den, den > 0.0 || is_nan(den));
}

// TIES disjoint sums against the elected sign s = sign(sum2) (+ for a zero sum under
// FLAG_ZERO_SUM_ELECTS_POSITIVE): for each model that agrees, sum0 += w tau and sum1 += w.
@compute @workgroup_size(WORKGROUP)
fn ties_pass(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_index(wg, groups, lid, WORKGROUP);
    if i >= p.len {
        return;
    }
    let sum = sum2[i];
    let zero_elects_positive = (p.flags & FLAG_ZERO_SUM_ELECTS_POSITIVE) != 0u;
    let elected = select(ties_sign(sum), 1.0, zero_elects_positive && sum == 0.0);
    var num = 0.0;
    var den = 0.0;
    if p.accumulate != 0u {
        num = sum0[i];
        den = sum1[i];
    }
    for (var m = 0u; m < p.models; m++) {
        let v = load_model(m, i);
        if elected != 0.0 && ties_sign(v) == elected {
            num += p.coef[m] * v;
            den += p.coef[m];
        }
    }
    sum0[i] = num;
    sum1[i] = den;
}

// sum0 = base + lambda * (sum1 > 0 ? sum0 / sum1 : 0), base in in0; without FLAG_NORMALIZE,
// sum0 = base + lambda * sum0 (nothing agreeing leaves sum0 at 0).
@compute @workgroup_size(WORKGROUP)
fn ties_finish(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_index(wg, groups, lid, WORKGROUP);
    if i >= p.len {
        return;
    }
    let den = sum1[i];
    var combined = sum0[i];
    if (p.flags & FLAG_NORMALIZE) != 0u {
        combined = select(0.0, combined / den, den > 0.0);
    }
    sum0[i] = load_model(0u, i) + p.scalar * combined;
}

// Diagonal Fisher accumulation: sum0 += scale * g^2, g in in0.
@compute @workgroup_size(WORKGROUP)
fn fisher_accumulate(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_index(wg, groups, lid, WORKGROUP);
    if i >= p.len {
        return;
    }
    let g = load_model(0u, i);
    sum0[i] += p.scalar * g * g;
}

var<workgroup> lane_sums: array<f32, WORKGROUP>;

// Per tile of WORKGROUP * ITEMS entries: sum0[tile_base + tile] = the f32 sum over the tile of
// (a - c)(b - c), a in in0, b in in1, c in in2 under FLAG_CENTER (else 0).
@compute @workgroup_size(WORKGROUP)
fn gram_tiles(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let tile = wg.x + wg.y * groups.x;
    let first = tile * WORKGROUP * ITEMS;
    let centred = (p.flags & FLAG_CENTER) != 0u;
    var acc = 0.0;
    for (var item = 0u; item < ITEMS; item++) {
        let i = first + item * WORKGROUP + lid;
        if i < p.len {
            var c = 0.0;
            if centred {
                c = load_model(2u, i);
            }
            acc += (load_model(0u, i) - c) * (load_model(1u, i) - c);
        }
    }
    lane_sums[lid] = acc;
    workgroupBarrier();
    for (var half = WORKGROUP / 2u; half > 0u; half >>= 1u) {
        if lid < half {
            lane_sums[lid] += lane_sums[lid + half];
        }
        workgroupBarrier();
    }
    if lid == 0u {
        sum0[p.tile_base + tile] = lane_sums[0];
    }
}
