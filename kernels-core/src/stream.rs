//! The one protocol of every streaming computation of the family.

use crate::Result;

/// A computation over data too large to hold, fed chunk by chunk in one or more passes: exact
/// top-k selection over a whole model, ComPEFT, threshold calibration, the streaming SVD.
///
/// Every implementor follows the same protocol:
///
/// 1. feed every chunk, in order, to the type's own `feed` method (its arguments differ: the
///    chunk's element type, a layer and site for calibration);
/// 2. call [`MultiPass::next_pass`]; `true` means feed the same chunks again, in the same order
///    (any chunking), and call it again;
/// 3. once it returns `false`, [`MultiPass::finish`] gives the result.
///
/// A call out of order (a `feed` after the last pass, `finish` before it, a later pass that
/// sees other entries than the first) is [`crate::Error::PassOrder`]; the state is unchanged.
/// [`MultiPass::run`] drives the whole protocol over a source that can be read again.
///
/// ```
/// use kernels_core::{MultiPass, ops::select::{KeepRule, StreamingTopK}};
/// let tensors: [&[f32]; 2] = [&[0.5, -3.0, 1.0], &[2.0, -0.25]];
/// let cut = StreamingTopK::new(KeepRule::Count(2))?
///     .run(|| tensors, |topk, t| topk.feed(t))?;
/// assert_eq!((cut.magnitude, cut.ties), (2.0, 1));
/// # Ok::<(), kernels_core::Error>(())
/// ```
pub trait MultiPass {
    /// What the computation produces.
    type Output;

    /// Ends the current pass. `true`: feed every chunk again, in the same order.
    fn next_pass(&mut self) -> Result<bool>;

    /// The result, once [`MultiPass::next_pass`] has returned `false`.
    fn finish(&self) -> Result<Self::Output>;

    /// Runs every pass: `feed(self, chunk)` for each chunk `chunks()` yields, pass after pass,
    /// then [`MultiPass::finish`].
    fn run<I: IntoIterator>(
        mut self,
        mut chunks: impl FnMut() -> I,
        mut feed: impl FnMut(&mut Self, I::Item) -> Result<()>,
    ) -> Result<Self::Output>
    where
        Self: Sized,
    {
        loop {
            for chunk in chunks() {
                feed(&mut self, chunk)?;
            }
            if !self.next_pass()? {
                return self.finish();
            }
        }
    }
}
