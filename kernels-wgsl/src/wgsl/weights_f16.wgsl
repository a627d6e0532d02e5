// f16 weights bound as `array<f16>` (the `shader-f16` variant; the module starts `enable f16;`).
@group(0) @binding(0) var<storage, read> w: array<f16>;

fn load_w(i: u32) -> f32 {
    return f32(w[i]);
}
