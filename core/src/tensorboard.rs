//! TensorBoard event files (`RUN_DIR/tb/events.out.tfevents.*`), written without TensorFlow.
//!
//! The format is TFRecord framing around protobuf `Event` messages:
//! `u64 length | u32 masked_crc32c(length) | data | u32 masked_crc32c(data)`, little-endian,
//! with `masked(c) = ((c >> 15) | (c << 17)) + 0xa282ead8`. The three messages used are encoded
//! by hand (field numbers from tensorflow/core/util/event.proto and summary.proto):
//! - `Event { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }`
//! - `Summary { repeated Value value = 1; }`
//! - `Summary.Value { string tag = 1; float simple_value = 2; }`
//!
//! The first record of a file carries `file_version: "brain.Event:2"`, as TensorBoard expects.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// The folder of a run directory that holds the event files.
pub const DIR: &str = crate::run_dir::TB_DIR;

/// Appends scalar events to one event file.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Creates a new event file in `run_dir/tb/` (one per writer: TensorBoard reads every file
    /// of the folder, so a resumed run adds a file rather than rewriting one).
    pub fn create(run_dir: &Path) -> std::io::Result<Self> {
        let dir = run_dir.join(DIR);
        std::fs::create_dir_all(&dir)?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        // Names sort by time (TensorBoard reads files in name order); the pid and a counter keep
        // two writers of one run apart.
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!(
            "events.out.tfevents.{:010}.{:09}.simclr.{}.{seq}",
            now.as_secs(),
            now.subsec_nanos(),
            std::process::id()
        ));
        let out = BufWriter::new(File::create_new(&path)?);
        let mut w = Self { path, out };
        let mut event = Vec::new();
        encode_header(&mut event, wall_time(), 0);
        put_bytes(&mut event, 3, b"brain.Event:2");
        w.record(&event)?;
        w.out.flush()?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one scalar (not flushed: call [`EventWriter::flush`]).
    pub fn scalar(&mut self, tag: &str, step: u64, value: f64) -> std::io::Result<()> {
        self.record(&scalar_event(tag, step, value, wall_time()))
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    fn record(&mut self, data: &[u8]) -> std::io::Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        self.out.write_all(&len)?;
        self.out.write_all(&masked_crc(&len).to_le_bytes())?;
        self.out.write_all(data)?;
        self.out.write_all(&masked_crc(data).to_le_bytes())
    }
}

/// Writes every numeric field of the results of a run (`{"simclr": {"linear_top1": ..}}`) as a
/// scalar `results/<method>/<metric>` at `step`, in a new event file of `run_dir/tb/`.
pub fn write_results(
    run_dir: &Path,
    results: &serde_json::Map<String, serde_json::Value>,
    step: u64,
) -> std::io::Result<()> {
    let mut w = EventWriter::create(run_dir)?;
    for (method, v) in results {
        let Some(metrics) = v.as_object() else { continue };
        for (metric, x) in metrics {
            if let Some(x) = x.as_f64() {
                w.scalar(&format!("results/{method}/{metric}"), step, x)?;
            }
        }
    }
    w.flush()
}

fn wall_time() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// An `Event` holding one `simple_value` summary.
fn scalar_event(tag: &str, step: u64, value: f64, wall: f64) -> Vec<u8> {
    let mut v = Vec::with_capacity(tag.len() + 8);
    put_bytes(&mut v, 1, tag.as_bytes());
    v.push(0x15); // field 2, fixed32
    v.extend_from_slice(&(value as f32).to_le_bytes());
    let mut summary = Vec::with_capacity(v.len() + 4);
    put_bytes(&mut summary, 1, &v);
    let mut event = Vec::with_capacity(summary.len() + 24);
    encode_header(&mut event, wall, step);
    put_bytes(&mut event, 5, &summary);
    event
}

fn encode_header(out: &mut Vec<u8>, wall: f64, step: u64) {
    out.push(0x09); // field 1, fixed64
    out.extend_from_slice(&wall.to_le_bytes());
    if step > 0 {
        out.push(0x10); // field 2, varint
        put_varint(out, step);
    }
}

/// A length-delimited field.
fn put_bytes(out: &mut Vec<u8>, field: u8, bytes: &[u8]) {
    out.push(field << 3 | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_varint(out: &mut Vec<u8>, mut x: u64) {
    while x >= 0x80 {
        out.push((x as u8 & 0x7f) | 0x80);
        x >>= 7;
    }
    out.push(x as u8);
}

fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c::crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal reader: the records of a file, with both CRCs checked.
    fn records(bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let len_bytes = &bytes[at..at + 8];
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            assert_eq!(u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()), masked_crc(len_bytes));
            let data = &bytes[at + 12..at + 12 + len];
            let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
            assert_eq!(crc, masked_crc(data));
            out.push(data.to_vec());
            at += 16 + len;
        }
        out
    }

    #[test]
    fn crc32c_and_its_mask_match_the_reference() {
        // CRC-32C check value (RFC 3720), and TensorFlow's mask of it.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(masked_crc(b"123456789"), 0xE306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8));
    }

    #[test]
    fn varints_encode_as_protobuf_does() {
        for (x, want) in [(0u64, vec![0u8]), (1, vec![1]), (127, vec![127]), (300, vec![0xac, 0x02])] {
            let mut v = Vec::new();
            put_varint(&mut v, x);
            assert_eq!(v, want, "{x}");
        }
    }

    #[test]
    fn a_scalar_event_has_the_protobuf_layout() {
        let e = scalar_event("loss", 300, 0.5, 2.0);
        let mut want = vec![0x09];
        want.extend_from_slice(&2.0f64.to_le_bytes());
        want.extend_from_slice(&[0x10, 0xac, 0x02]); // step 300
                                                     // summary (field 5) { value (field 1) { tag (1): "loss", simple_value (2): 0.5 } }
        let mut value = vec![0x0a, 4];
        value.extend_from_slice(b"loss");
        value.push(0x15);
        value.extend_from_slice(&0.5f32.to_le_bytes());
        want.extend_from_slice(&[0x2a, value.len() as u8 + 2, 0x0a, value.len() as u8]);
        want.extend_from_slice(&value);
        assert_eq!(e, want);
    }

    #[test]
    fn files_hold_a_version_record_then_the_scalars() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.scalar("train/loss", 1, 4.5).unwrap();
        w.scalar("train/loss", 2, 4.25).unwrap();
        w.flush().unwrap();
        let path = w.path().to_path_buf();
        assert!(path.starts_with(dir.path().join(DIR)));
        assert!(path.file_name().unwrap().to_string_lossy().starts_with("events.out.tfevents."));
        let recs = records(&std::fs::read(&path).unwrap());
        assert_eq!(recs.len(), 3);
        assert!(recs[0].ends_with(b"brain.Event:2"));
        assert_eq!(recs[2][recs[2].len() - 4..], 4.25f32.to_le_bytes());
        // A second writer adds a file.
        let w2 = EventWriter::create(dir.path()).unwrap();
        assert_ne!(w2.path(), path);
    }
}
