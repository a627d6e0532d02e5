// Weights bound as packed words (the portable variant): ELEMENT picks the encoding.
override ELEMENT: u32 = ELEMENT_F32;

@group(0) @binding(0) var<storage, read> w: array<u32>;

fn load_w(i: u32) -> f32 {
    return widen(w[word_of(i, ELEMENT)], i, ELEMENT);
}
