// GEMV family: dense and gathered row dots over `W` `[out, in]` (`row_dot`), the dense or
// sparse-input (TEAL) sweep over `w_t` `[in, out]` (`column_sweep`, then `sum_splits`), and the
// MLP steps built on them (`cats_up`, `silu_product`).
//
// A matrix larger than one storage binding is split into pages of whole rows, dispatched one
// page at a time; `first_row` is the page's first row in the whole matrix. Sums run in a fixed
// order for a given WORKGROUP and split, so results are deterministic.
//
// A decode batch of BATCH samples (1 to 4) runs in one pass: sample b's input vector starts at
// b * x_stride (x, and the values in `gather`), its outputs at b * out_stride (y, and the
// row dots' partials); a row needed by any sample is read once and used by each sample that
// needs it, with each sample's products in the order a batch of one adds them.

struct GemvParams {
    // Rows of this page.
    rows: u32,
    // Columns of the matrix.
    cols: u32,
    // Elements between consecutive rows.
    row_stride: u32,
    // Index of this page's first row in the whole matrix.
    first_row: u32,
    // row_dot: outputs to compute. sum_splits: partial rows to add up.
    outputs: u32,
    // column_sweep: rows per split.
    split_rows: u32,
    // column_sweep: index of this page's first split in the partials.
    split_base: u32,
    // column_sweep: row i is read iff !(|x_i| <= threshold); -inf reads every row.
    // cats_up: row o is read iff !(|silu(g_o)| <= threshold).
    threshold: f32,
    // Elements between two samples' input vectors, and between their outputs.
    x_stride: u32,
    out_stride: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> partials: array<f32>;
// row_dot: row indices (GATHERED); cats_up: the gate outputs g; column_sweep: the values
// multiplying the active rows (GATED); silu_product: u. Floats are read through bitcast.
@group(0) @binding(3) var<storage, read> gather: array<u32>;
@group(0) @binding(4) var<uniform> p: GemvParams;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;

// Invocations per workgroup; a power of two (row_dot sums by halving).
override WORKGROUP: u32 = 256u;
// row_dot: output o reads row gather[o] instead of row o.
override GATHERED: bool = false;
// column_sweep: an active row i is scaled by gather[i] (as f32) instead of x_i (CATS tests
// a = silu(g) and multiplies by h = a u).
override GATED: bool = false;
// Samples of a decode batch, 1 to 4.
override BATCH: u32 = 1u;

fn silu(g: f32) -> f32 {
    return g / (1.0 + exp(-g));
}

// The value an active row of the sweep is scaled by (`i` counts from the sample's start).
fn sweep_value(i: u32, xi: f32) -> f32 {
    if GATED {
        return bitcast<f32>(gather[i]);
    }
    return xi;
}

// One sum per sample (lanes past BATCH unused): the tree adds each sample's sums in the order a
// batch of one does.
var<workgroup> lane_sums: array<vec4<f32>, WORKGROUP>;

fn workgroup_sums(lid: u32, acc: vec4<f32>) -> vec4<f32> {
    lane_sums[lid] = acc;
    workgroupBarrier();
    for (var half = WORKGROUP / 2u; half > 0u; half >>= 1u) {
        if lid < half {
            lane_sums[lid] += lane_sums[lid + half];
        }
        workgroupBarrier();
    }
    return lane_sums[0];
}

// One workgroup per output: out[o] = W[row, :] . x, written by the page that holds the row.
@compute @workgroup_size(WORKGROUP)
fn row_dot(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let o = wg.x + wg.y * groups.x;
    if o >= p.outputs {
        return;
    }
    var row = o;
    if GATHERED {
        row = gather[o];
    }
    let in_page = row >= p.first_row && row - p.first_row < p.rows;
    var acc = vec4<f32>();
    if in_page {
        let base = (row - p.first_row) * p.row_stride;
        for (var j = lid; j < p.cols; j += WORKGROUP) {
            let w = load_w(base + j);
            for (var b = 0u; b < BATCH; b++) {
                acc[b] += w * x[b * p.x_stride + j];
            }
        }
    }
    let sums = workgroup_sums(lid, acc);
    if lid == 0u && in_page {
        for (var b = 0u; b < BATCH; b++) {
            partials[b * p.out_stride + o] = sums[b];
        }
    }
}

// One invocation per output column and split of rows: partials[split, j] = the sum over the
// split's active rows i of x_i w_t[i, j]. An inactive row is never read: the test is uniform
// across the workgroup, so the loads of a skipped row are not issued.
@compute @workgroup_size(WORKGROUP)
fn column_sweep(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(workgroup_id) wg: vec3<u32>,
) {
    let j = gid.x;
    let split = wg.y;
    let start = split * p.split_rows;
    let end = min(start + p.split_rows, p.rows);
    if j >= p.cols {
        return;
    }
    var acc = vec4<f32>();
    for (var i = start; i < end; i++) {
        accumulate_row(i, j, &acc);
    }
    write_partials(split, j, acc);
}

// Whether row i (of the whole matrix) is active for sample b.
fn is_active(b: u32, i: u32) -> bool {
    return !(abs(x[b * p.x_stride + i]) <= p.threshold);
}

// Adds row i of the page (column j) to each sample it is active for; reads the row only when
// some sample needs it (the test is uniform across the workgroup). Each sample's input is read
// once, for the test and the product.
fn accumulate_row(i: u32, j: u32, acc: ptr<function, vec4<f32>>) {
    let row = p.first_row + i;
    var xs = vec4<f32>();
    var live = vec4<bool>();
    for (var b = 0u; b < BATCH; b++) {
        xs[b] = x[b * p.x_stride + row];
        live[b] = !(abs(xs[b]) <= p.threshold);
    }
    if any(live) {
        let w = load_w(i * p.row_stride + j);
        for (var b = 0u; b < BATCH; b++) {
            if live[b] {
                (*acc)[b] += sweep_value(b * p.x_stride + row, xs[b]) * w;
            }
        }
    }
}

// Split `split`'s partial sums of column j, sample after sample.
fn write_partials(split: u32, j: u32, acc: vec4<f32>) {
    for (var b = 0u; b < BATCH; b++) {
        partials[((p.split_base + split) * BATCH + b) * p.cols + j] = acc[b];
    }
}

// y[b, j] = the sum of sample b's partials[s, b, j] over the `outputs` splits, in split order.
@compute @workgroup_size(WORKGROUP)
fn sum_splits(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    if j >= p.cols {
        return;
    }
    for (var b = 0u; b < BATCH; b++) {
        var acc = 0.0;
        for (var s = 0u; s < p.outputs; s++) {
            acc += partials[(s * BATCH + b) * p.cols + j];
        }
        y[b * p.out_stride + j] = acc;
    }
}

// CATS' up projection, one workgroup per intermediate row o: a = silu(g_o) (g in `gather`);
// y[o] = a, and partials[o] = a * (W_up[o, :] . x) where a is active under the threshold, else 0
// without reading the row. Written by the page that holds the row.
@compute @workgroup_size(WORKGROUP)
fn cats_up(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let o = wg.x + wg.y * groups.x;
    if o >= p.outputs {
        return;
    }
    let in_page = o >= p.first_row && o - p.first_row < p.rows;
    var a = vec4<f32>();
    var kept = vec4<bool>();
    for (var b = 0u; b < BATCH; b++) {
        a[b] = silu(bitcast<f32>(gather[b * p.out_stride + o]));
        kept[b] = in_page && !(abs(a[b]) <= p.threshold);
    }
    var acc = vec4<f32>();
    if any(kept) {
        let base = (o - p.first_row) * p.row_stride;
        for (var j = lid; j < p.cols; j += WORKGROUP) {
            let w = load_w(base + j);
            for (var b = 0u; b < BATCH; b++) {
                if kept[b] {
                    acc[b] += w * x[b * p.x_stride + j];
                }
            }
        }
    }
    let sums = workgroup_sums(lid, acc);
    if lid == 0u && in_page {
        for (var b = 0u; b < BATCH; b++) {
            partials[b * p.out_stride + o] = select(0.0, a[b] * sums[b], kept[b]);
            y[b * p.out_stride + o] = a[b];
        }
    }
}

// TEAL's h = silu(g) * u, element-wise over `cols` entries: g in x, u in `gather`, h to y.
@compute @workgroup_size(WORKGROUP)
fn silu_product(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if i < p.cols {
        y[i] = silu(x[i]) * bitcast<f32>(gather[i]);
    }
}
