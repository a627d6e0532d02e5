// The subgroup variant of `column_sweep`: each subgroup tests `subgroup_size` inputs at once and
// walks only the ones active in some sample, found by a ballot, instead of every invocation
// testing every input.
// It adds the same products in the same order as `column_sweep`, so the results are the same bits.
@compute @workgroup_size(WORKGROUP)
fn column_sweep_ballot(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_size) lanes: u32,
) {
    let j = gid.x;
    let split = wg.y;
    let start = split * p.split_rows;
    let end = min(start + p.split_rows, p.rows);
    let column = min(j, p.cols - 1u);
    var acc = vec4<f32>();
    for (var base = start; base < end; base += lanes) {
        var live = false;
        if base + lane < end {
            for (var b = 0u; b < BATCH; b++) {
                live = live || is_active(b, p.first_row + base + lane);
            }
        }
        let ballot = subgroupBallot(live);
        for (var word = 0u; word < 4u; word++) {
            var bits = ballot[word];
            while bits != 0u {
                let i = base + word * 32u + firstTrailingBit(bits);
                bits &= bits - 1u;
                accumulate_row(i, column, &acc);
            }
        }
    }
    // Invocations past the last column computed a copy of the last one (they took part in the
    // ballots) and write nothing.
    if j < p.cols {
        write_partials(split, j, acc);
    }
}
