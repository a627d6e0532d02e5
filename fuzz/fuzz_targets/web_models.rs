//! The demo page's model reader (`kernels_web::models::Model::parse`) on arbitrary bytes: it
//! never panics, what it accepts holds no more values than the file has bytes for, every tensor's
//! values fill its shape, and writing an accepted model back reads back the same values.
#![no_main]

use kernels_web::models::{Model, write};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(model) = Model::parse(data, "the fuzzed file") else {
        return;
    };
    assert!(
        model.parameters() * 2 <= data.len(),
        "more values than bytes"
    );
    for t in &model.tensors {
        let elements: usize = t.shape.iter().product();
        assert_eq!(elements, t.values.len(), "{}", t.name);
    }
    model
        .check_same_layout(&model, "itself")
        .expect("a model matches itself");
    let entries: Vec<(&str, &[usize], _, &[f32])> = model
        .tensors
        .iter()
        .map(|t| (&t.name[..], &t.shape[..], t.stored, &t.values[..]))
        .collect();
    let written = write(&entries).expect("an accepted model writes");
    let again = Model::parse(&written, "the written file").expect("what we write reads back");
    for (a, b) in model.tensors.iter().zip(&again.tensors) {
        assert_eq!(a.name, b.name);
        let same = a
            .values
            .iter()
            .zip(&b.values)
            .all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()));
        assert!(same, "{}: values changed on the round trip", a.name);
    }
});
