//! The shapes of one convolution, shared by the forward pass, its gradients and the
//! operand packing (its own module so that none of them imports another for it).

/// Output columns (images x output positions) per GEMM of the gradients: enough for the GEMM
/// kernels to run at speed on the small late layers (4 x 4 outputs), small enough for the
/// im2col buffer to stay in cache on the early ones.
pub(crate) const GROUP_COLUMNS: usize = 1024;

/// The shapes of one convolution.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub(crate) n: usize,
    pub(crate) ci: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) co: usize,
    pub(crate) kh: usize,
    pub(crate) kw: usize,
    pub(crate) s: usize,
    pub(crate) p: usize,
    pub(crate) ho: usize,
    pub(crate) wo: usize,
}

impl Geometry {
    pub(crate) fn new(x: [usize; 4], w: [usize; 4], s: usize, p: usize) -> Self {
        let [n, ci, h, wd] = x;
        let [co, _, kh, kw] = w;
        let ho = (h + 2 * p).saturating_sub(kh) / s + 1;
        let wo = (wd + 2 * p).saturating_sub(kw) / s + 1;
        Self { n, ci, h, w: wd, co, kh, kw, s, p, ho, wo }
    }
    /// Rows of the im2col matrix (input channels x kernel positions).
    pub(crate) fn k(&self) -> usize {
        self.ci * self.kh * self.kw
    }
    /// Output positions per image.
    pub(crate) fn positions(&self) -> usize {
        self.ho * self.wo
    }
    /// Images per GEMM.
    pub(crate) fn group(&self) -> usize {
        GROUP_COLUMNS.div_ceil(self.positions().max(1)).clamp(1, self.n.max(1))
    }
    /// Image groups.
    pub(crate) fn groups(&self) -> usize {
        self.n.div_ceil(self.group())
    }
}
