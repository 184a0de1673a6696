//! `stl10`: the official binary format (`{train,test,unlabeled}_X.bin`, `{train,test}_y.bin`).
//!
//! Images are 3x96x96 bytes, each channel stored column-major (the MATLAB layout); labels are
//! bytes 1..10 (mapped to 0..9). The 100,000-image `unlabeled` split is read on demand, never
//! loaded whole.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;
use simclr_core::{
    Context, Image, Payload, PortType, Problem, Role, Sample, SampleCtx, Source, SourceOptions, Stage,
    StageConfig, StageError,
};

use super::check_exists;

const SIDE: usize = 96;
const REC: usize = 3 * SIDE * SIDE;

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StlSplit {
    Train,
    Test,
    /// The 100,000 unlabeled images (SimCLR pre-training).
    #[default]
    Unlabeled,
    /// `train` then `unlabeled` (the usual pre-training set).
    TrainUnlabeled,
}

#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Stl10 {
    /// The extracted `stl10_binary` folder.
    pub path: PathBuf,
    /// `unlabeled` (default), `train`, `test` or `train_unlabeled`.
    #[serde(default)]
    pub split: StlSplit,
}

impl Stl10 {
    fn parts(&self) -> Vec<(&'static str, Option<&'static str>)> {
        match self.split {
            StlSplit::Train => vec![("train_X.bin", Some("train_y.bin"))],
            StlSplit::Test => vec![("test_X.bin", Some("test_y.bin"))],
            StlSplit::Unlabeled => vec![("unlabeled_X.bin", None)],
            StlSplit::TrainUnlabeled => vec![("train_X.bin", Some("train_y.bin")), ("unlabeled_X.bin", None)],
        }
    }
}

impl StageConfig for Stl10 {
    const KIND: &'static str = "stl10";
    const ABOUT: &'static str = "source: STL-10 binary files (96x96, 10 classes + 100k unlabeled)";
    const ROLE: Role = Role::Source;
    fn ports(&self) -> (PortType, PortType) {
        (PortType::Nothing, PortType::Views)
    }
    fn check(&self, cx: &Context, out: &mut Vec<Problem>) {
        let dir = cx.resolve(&self.path);
        if check_exists("path", &dir, "the STL-10 folder", out) {
            for (x, y) in self.parts() {
                for f in std::iter::once(x).chain(y) {
                    check_exists("path", &dir.join(f), "the STL-10 file", out);
                }
            }
        }
    }
    fn build(&self, cx: &Context) -> Result<Stage, StageError> {
        let dir = cx.resolve(&self.path);
        let mut parts = Vec::new();
        let mut len = 0;
        for (x, y) in self.parts() {
            let xp = dir.join(x);
            let f = File::open(&xp)
                .map_err(|e| StageError::fatal(format!("cannot open {}: {e}", xp.display())))?;
            let size = f.metadata().map_err(|e| StageError::fatal(format!("{}: {e}", xp.display())))?.len();
            let n = size.div_ceil(REC as u64);
            let labels = match y {
                Some(y) => {
                    let yp = dir.join(y);
                    let l = std::fs::read(&yp)
                        .map_err(|e| StageError::fatal(format!("cannot read {}: {e}", yp.display())))?;
                    Some(l)
                }
                None => None,
            };
            len += n;
            parts.push(Part { file: f, path: xp, images: n, complete: size % REC as u64 == 0, labels });
        }
        Ok(Stage::Source(Arc::new(StlSource { parts, len, opts: cx.source })))
    }
}

struct Part {
    file: File,
    path: PathBuf,
    images: u64,
    complete: bool,
    labels: Option<Vec<u8>>,
}

struct StlSource {
    parts: Vec<Part>,
    len: u64,
    opts: SourceOptions,
}

impl Source for StlSource {
    fn len(&self) -> u64 {
        self.len
    }
    fn options(&self) -> SourceOptions {
        self.opts
    }
    fn read(&self, index: u64, _ctx: &SampleCtx) -> Result<Sample, StageError> {
        let mut i = index;
        for part in &self.parts {
            if i >= part.images {
                i -= part.images;
                continue;
            }
            let at = |m: String| StageError::data(format!("{}: image {i}: {m}", part.path.display()));
            if i + 1 == part.images && !part.complete {
                return Err(at(format!("the file's length is not a whole number of {REC}-byte images")));
            }
            let mut buf = vec![0u8; REC];
            part.file.read_exact_at(&mut buf, i * REC as u64).map_err(|e| at(e.to_string()))?;
            let mut data = vec![0u8; REC];
            for c in 0..3 {
                let plane = &buf[c * SIDE * SIDE..(c + 1) * SIDE * SIDE];
                for x in 0..SIDE {
                    for y in 0..SIDE {
                        data[(y * SIDE + x) * 3 + c] = plane[x * SIDE + y];
                    }
                }
            }
            let label = match &part.labels {
                Some(l) => match l.get(i as usize) {
                    Some(&b) if (1..=10).contains(&b) => Some(u32::from(b - 1)),
                    Some(&b) => return Err(at(format!("label {b} is not in 1..10"))),
                    None => return Err(at("no label for this image (labels file too short)".into())),
                },
                None => None,
            };
            return Ok(Sample {
                index,
                label,
                name: Some(Arc::from(format!("{}#{i}", part.path.display()))),
                payload: Payload::Views(vec![Image { width: SIDE as u32, height: SIDE as u32, data }]),
                ..Sample::default()
            });
        }
        Err(StageError::fatal(format!("index {index} is past the end of the data")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_column_major_planes_and_one_based_labels() {
        let dir = tempfile::tempdir().unwrap();
        let mut x = vec![0u8; 2 * REC];
        // Image 1, red plane, column 2, row 5 (column-major: x * 96 + y).
        x[REC + 2 * SIDE + 5] = 200;
        std::fs::write(dir.path().join("train_X.bin"), &x).unwrap();
        std::fs::write(dir.path().join("train_y.bin"), [1u8, 10]).unwrap();
        let cfg: Stl10 =
            serde_json::from_value(serde_json::json!({"path": dir.path(), "split": "train"})).unwrap();
        let cx = Context { stage_id: "data".into(), ..Context::default() };
        let Stage::Source(src) = StageConfig::build(&cfg, &cx).unwrap() else { panic!("not a source") };
        assert_eq!(src.len(), 2);
        let ctx = SampleCtx { seed: 0, stage_key: 0, epoch: 0, index: 1 };
        let s = src.read(1, &ctx).unwrap();
        assert_eq!(s.label, Some(9));
        let Payload::Views(v) = &s.payload else { panic!("no image") };
        assert_eq!(v[0].data[(5 * SIDE + 2) * 3], 200);
        assert_eq!(v[0].data.iter().filter(|&&b| b != 0).count(), 1);
    }
}
