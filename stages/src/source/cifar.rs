//! `cifar10` / `cifar100`: the official binary format.
//!
//! CIFAR-10: `data_batch_{1..5}.bin` (train) and `test_batch.bin`, records of 1 label byte +
//! 3072 bytes (R, G, B planes of 32x32). CIFAR-100: `train.bin` / `test.bin`, records of a
//! coarse and a fine label byte + 3072 bytes. Records are read on demand (`pread`), so memory
//! stays flat. A file whose length is not a whole number of records yields one bad sample
//! (named, handled by `on_error`) for its trailing bytes.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use simclr_core::{
    Context, Image, Payload, PortType, Problem, Role, Sample, SampleCtx, Source, SourceOptions, Stage,
    StageConfig, StageError,
};

use super::check_exists;

const PIXELS: usize = 32 * 32;

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    #[default]
    Train,
    Test,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LabelKind {
    #[default]
    Fine,
    Coarse,
}

macro_rules! cifar_config {
    ($name:ident, $kind:literal, $about:literal, $extra:ident) => {
        #[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            /// The folder holding the `.bin` files, or one `.bin` file.
            pub path: PathBuf,
            /// `train` (default) or `test`.
            #[serde(default)]
            pub split: Split,
            /// CIFAR-100 only: `fine` (100 classes, default) or `coarse` (20).
            #[serde(default)]
            pub $extra: Option<LabelKind>,
        }

        impl StageConfig for $name {
            const KIND: &'static str = $kind;
            const ABOUT: &'static str = $about;
            const ROLE: Role = Role::Source;
            fn ports(&self) -> (PortType, PortType) {
                (PortType::Nothing, PortType::Views)
            }
            fn check(&self, cx: &Context, out: &mut Vec<Problem>) {
                let path = cx.resolve(&self.path);
                if check_exists("path", &path, "the CIFAR data", out) {
                    if let Err(p) = files(&path, $kind, self.split) {
                        out.push(p);
                    }
                }
                if $kind == "cifar10" && self.$extra.is_some() {
                    out.push(Problem::new(stringify!($extra), "`label` is for cifar100 only", "remove it"));
                }
            }
            fn build(&self, cx: &Context) -> Result<Stage, StageError> {
                let path = cx.resolve(&self.path);
                let files = files(&path, $kind, self.split).map_err(|p| StageError::fatal(p.message))?;
                let header = if $kind == "cifar10" { 1 } else { 2 };
                let label_at = match ($kind, self.$extra.unwrap_or_default()) {
                    ("cifar100", LabelKind::Fine) => 1,
                    _ => 0,
                };
                Ok(Stage::Source(Arc::new(Records::open(&files, header, label_at, cx.source)?)))
            }
        }
    };
}

cifar_config!(Cifar10, "cifar10", "source: CIFAR-10 binary files (32x32, 10 classes)", label);
cifar_config!(
    Cifar100,
    "cifar100",
    "source: CIFAR-100 binary files (32x32, 100 fine / 20 coarse classes)",
    label
);

/// The files of a split, in order.
fn files(path: &Path, kind: &str, split: Split) -> Result<Vec<PathBuf>, Problem> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let names: Vec<String> = match (kind, split) {
        ("cifar10", Split::Train) => (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
        ("cifar10", Split::Test) => vec!["test_batch.bin".into()],
        (_, Split::Train) => vec!["train.bin".into()],
        (_, Split::Test) => vec!["test.bin".into()],
    };
    let found: Vec<PathBuf> = names.iter().map(|n| path.join(n)).filter(|p| p.is_file()).collect();
    if found.is_empty() {
        return Err(Problem::new(
            "path",
            format!("no {kind} {split:?} files ({}) in `{}`", names.join(", "), path.display())
                .to_lowercase(),
            "point `path` at the extracted `cifar-10-batches-bin` (or `cifar-100-binary`) folder",
        ));
    }
    Ok(found)
}

/// Fixed-size records spread over files, read by index.
pub struct Records {
    files: Vec<(File, PathBuf, u64, bool)>, // file, path, whole records, has trailing bytes
    header: usize,
    label_at: usize,
    len: u64,
    opts: SourceOptions,
}

impl Records {
    fn open(
        paths: &[PathBuf],
        header: usize,
        label_at: usize,
        opts: SourceOptions,
    ) -> Result<Self, StageError> {
        let rec = (header + 3 * PIXELS) as u64;
        let mut files = Vec::new();
        let mut len = 0;
        for p in paths {
            let f =
                File::open(p).map_err(|e| StageError::fatal(format!("cannot open {}: {e}", p.display())))?;
            let size = f.metadata().map_err(|e| StageError::fatal(format!("{}: {e}", p.display())))?.len();
            let whole = size / rec;
            let partial = size % rec != 0;
            len += whole + u64::from(partial);
            files.push((f, p.clone(), whole, partial));
        }
        Ok(Self { files, header, label_at, len, opts })
    }
}

impl Source for Records {
    fn len(&self) -> u64 {
        self.len
    }
    fn options(&self) -> SourceOptions {
        self.opts
    }
    fn read(&self, index: u64, _ctx: &SampleCtx) -> Result<Sample, StageError> {
        let rec = self.header + 3 * PIXELS;
        let mut i = index;
        for (file, path, whole, partial) in &self.files {
            let n = whole + u64::from(*partial);
            if i >= n {
                i -= n;
                continue;
            }
            let name: Arc<str> = Arc::from(format!("{}#{i}", path.display()));
            if i == *whole {
                return Err(StageError::data(format!(
                    "{}: the file's length is not a whole number of {rec}-byte records (truncated or not CIFAR?)",
                    path.display()
                )));
            }
            let mut buf = vec![0u8; rec];
            file.read_exact_at(&mut buf, i * rec as u64)
                .map_err(|e| StageError::data(format!("{}: cannot read record {i}: {e}", path.display())))?;
            let planes = &buf[self.header..];
            let mut data = vec![0u8; 3 * PIXELS];
            for (p, px) in data.chunks_exact_mut(3).enumerate() {
                px[0] = planes[p];
                px[1] = planes[PIXELS + p];
                px[2] = planes[2 * PIXELS + p];
            }
            return Ok(Sample {
                index,
                label: Some(u32::from(buf[self.label_at])),
                name: Some(name),
                payload: Payload::Views(vec![Image { width: 32, height: 32, data }]),
                ..Sample::default()
            });
        }
        Err(StageError::fatal(format!("index {index} is past the end of the data")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(label: u8, seed: u8) -> Vec<u8> {
        let mut r = vec![label];
        r.extend((0..3 * PIXELS).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
        r
    }

    #[test]
    fn reads_planes_into_interleaved_pixels_with_labels() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = record(3, 1);
        bytes.extend(record(9, 2));
        std::fs::write(dir.path().join("test_batch.bin"), &bytes).unwrap();
        let cfg: Cifar10 =
            serde_json::from_value(serde_json::json!({"path": dir.path(), "split": "test"})).unwrap();
        let cx = Context { stage_id: "data".into(), ..Context::default() };
        let Stage::Source(src) = StageConfig::build(&cfg, &cx).unwrap() else { panic!("not a source") };
        assert_eq!(src.len(), 2);
        let ctx = SampleCtx { seed: 0, stage_key: 0, epoch: 0, index: 1 };
        let s = src.read(1, &ctx).unwrap();
        assert_eq!(s.label, Some(9));
        let Payload::Views(v) = &s.payload else { panic!("no image") };
        let planes = &record(9, 2)[1..];
        // Pixel 5: R from plane 0, G from plane 1, B from plane 2.
        assert_eq!(&v[0].data[15..18], &[planes[5], planes[PIXELS + 5], planes[2 * PIXELS + 5]]);
    }

    #[test]
    fn a_truncated_file_yields_one_named_bad_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = record(1, 0);
        bytes.extend(&record(2, 0)[..100]);
        let path = dir.path().join("data_batch_1.bin");
        std::fs::write(&path, &bytes).unwrap();
        let cfg: Cifar10 = serde_json::from_value(serde_json::json!({"path": dir.path()})).unwrap();
        let cx = Context { stage_id: "data".into(), ..Context::default() };
        let Stage::Source(src) = StageConfig::build(&cfg, &cx).unwrap() else { panic!("not a source") };
        assert_eq!(src.len(), 2);
        let ctx = SampleCtx { seed: 0, stage_key: 0, epoch: 0, index: 0 };
        assert!(src.read(0, &ctx).is_ok());
        match src.read(1, &ctx) {
            Err(StageError::Data(m)) => assert!(m.contains("data_batch_1.bin"), "{m}"),
            other => panic!("expected a data error, got {:?}", other.map(|s| s.index)),
        }
    }

    #[test]
    fn cifar100_picks_fine_or_coarse_labels() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = vec![4u8, 77];
        r.extend(vec![0u8; 3 * PIXELS]);
        std::fs::write(dir.path().join("train.bin"), &r).unwrap();
        let cx = Context { stage_id: "data".into(), ..Context::default() };
        let ctx = SampleCtx { seed: 0, stage_key: 0, epoch: 0, index: 0 };
        for (label, want) in [("fine", 77), ("coarse", 4)] {
            let cfg: Cifar100 =
                serde_json::from_value(serde_json::json!({"path": dir.path(), "label": label})).unwrap();
            let Stage::Source(src) = StageConfig::build(&cfg, &cx).unwrap() else { panic!("not a source") };
            assert_eq!(src.read(0, &ctx).unwrap().label, Some(want));
        }
    }
}
