//! Encoder weights as safetensors with torchvision's tensor names.
//!
//! The module paths of [`crate::model::ResNet`] already are torchvision's names (`conv1.weight`,
//! `bn1.running_mean`, `layer2.0.downsample.0.weight`, ...); each BatchNorm also gets torchvision's
//! `num_batches_tracked` (int64 scalar, the training steps done). The format is written here
//! (8-byte little-endian header length, JSON header padded with spaces to a multiple of 8, then the
//! little-endian data); it needs no dependency.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// The values of one exported tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// One named tensor of a checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Data,
}

struct Collect {
    path: Vec<String>,
    out: Vec<NamedTensor>,
}

impl<B: Backend> ModuleVisitor<B> for Collect {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let t = param.val();
        let shape = t.dims().to_vec();
        let data = t.into_data().convert::<f32>().to_vec::<f32>().expect("f32 data");
        self.out.push(NamedTensor { name: self.path.join("."), shape, data: Data::F32(data) });
    }
}

/// Every float tensor of `module` (parameters and running statistics) under its module path,
/// plus `num_batches_tracked = steps` beside each `running_var`.
pub fn named_tensors<B: Backend, M: Module<B>>(module: &M, steps: u64) -> Vec<NamedTensor> {
    let mut c = Collect { path: Vec::new(), out: Vec::new() };
    module.visit::<Collect>(&mut c);
    let mut out = Vec::with_capacity(c.out.len() * 6 / 5);
    for t in c.out {
        let tracked = t.name.strip_suffix(".running_var").map(|p| format!("{p}.num_batches_tracked"));
        out.push(t);
        if let Some(name) = tracked {
            out.push(NamedTensor { name, shape: Vec::new(), data: Data::I64(vec![steps as i64]) });
        }
    }
    out
}

/// Writes `tensors` as a safetensors file (data laid out in name order, as the reference writer).
pub fn write_safetensors(
    path: &Path,
    tensors: &[NamedTensor],
    metadata: &BTreeMap<String, String>,
) -> std::io::Result<()> {
    let mut sorted: Vec<&NamedTensor> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata).expect("string map"));
    }
    let mut offset = 0usize;
    for t in &sorted {
        let (dtype, bytes) = match &t.data {
            Data::F32(v) => ("F32", v.len() * 4),
            Data::I64(v) => ("I64", v.len() * 8),
        };
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": dtype, "shape": t.shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut json = serde_json::to_string(&header).expect("json header").into_bytes();
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut buf = Vec::with_capacity(8 + json.len() + offset);
    buf.extend_from_slice(&(json.len() as u64).to_le_bytes());
    buf.extend_from_slice(&json);
    for t in &sorted {
        match &t.data {
            Data::F32(v) => v.iter().for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
            Data::I64(v) => v.iter().for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
        }
    }
    simclr_core::run_dir::write_atomic(path, &buf)
}

/// Reads a safetensors file written by [`write_safetensors`] (F32 and I64 only; for tests and tools).
pub fn read_safetensors(path: &Path) -> Result<Vec<NamedTensor>, String> {
    read_safetensors_with_metadata(path).map(|(t, _)| t)
}

/// Reads a safetensors file written by [`write_safetensors`]: its tensors and its `__metadata__`.
/// Every length and offset is checked, so a truncated or corrupt file is an error, not a panic.
pub fn read_safetensors_with_metadata(
    path: &Path,
) -> Result<(Vec<NamedTensor>, BTreeMap<String, String>), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let head: [u8; 8] = bytes.get(..8).and_then(|b| b.try_into().ok()).ok_or("truncated")?;
    let n = usize::try_from(u64::from_le_bytes(head)).map_err(|_| "header length out of range")?;
    let end = n.checked_add(8).filter(|&e| e <= bytes.len()).ok_or("truncated header")?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..end]).map_err(|e| format!("header: {e}"))?;
    let data = &bytes[end..];
    let mut out = Vec::new();
    let mut metadata = BTreeMap::new();
    for (name, v) in header {
        if name == "__metadata__" {
            metadata = serde_json::from_value(v).map_err(|e| format!("__metadata__: {e}"))?;
            continue;
        }
        let shape: Vec<usize> =
            serde_json::from_value(v["shape"].clone()).map_err(|e| format!("{name}: shape: {e}"))?;
        let [a, b]: [usize; 2] = serde_json::from_value(v["data_offsets"].clone())
            .map_err(|e| format!("{name}: data_offsets: {e}"))?;
        let raw = data.get(a..b).ok_or_else(|| format!("{name}: offsets out of range"))?;
        let data = match v["dtype"].as_str() {
            Some("F32") => {
                Data::F32(raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
            }
            Some("I64") => Data::I64(
                raw.chunks_exact(8)
                    .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .collect(),
            ),
            other => return Err(format!("{name}: unsupported dtype {other:?}")),
        };
        let len = match &data {
            Data::F32(v) => v.len(),
            Data::I64(v) => v.len(),
        };
        if shape.iter().try_fold(1usize, |p, &d| p.checked_mul(d)) != Some(len) || raw.len() % 4 != 0 {
            return Err(format!("{name}: {} bytes do not hold a {shape:?} tensor", raw.len()));
        }
        out.push(NamedTensor { name, shape, data });
    }
    Ok((out, metadata))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Backbone, SimclrTrain, Stem};
    use crate::model::ResNet;
    use burn::backend::Flex;

    fn encoder(backbone: Backbone, stem: Stem, width: f64) -> ResNet<Flex> {
        let cfg = SimclrTrain { backbone, stem, width, ..SimclrTrain::default() };
        ResNet::new(&cfg, &mut crate::model::Init::new(1), &Default::default())
    }

    fn shape_of<'a>(ts: &'a [NamedTensor], name: &str) -> &'a [usize] {
        &ts.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("no tensor {name}")).shape
    }

    #[test]
    fn resnet_names_and_shapes_are_torchvisions() {
        // torchvision resnet18's state_dict has 122 entries, resnet50's 320; both minus fc.weight/bias.
        let r18 = named_tensors(&encoder(Backbone::Resnet18, Stem::Imagenet, 1.0), 7);
        assert_eq!(r18.len(), 120);
        assert_eq!(shape_of(&r18, "conv1.weight"), [64, 3, 7, 7]);
        assert_eq!(shape_of(&r18, "bn1.running_mean"), [64]);
        assert_eq!(shape_of(&r18, "layer1.0.conv1.weight"), [64, 64, 3, 3]);
        assert_eq!(shape_of(&r18, "layer2.0.downsample.0.weight"), [128, 64, 1, 1]);
        assert_eq!(shape_of(&r18, "layer2.0.downsample.1.running_var"), [128]);
        assert_eq!(shape_of(&r18, "layer4.1.bn2.bias"), [512]);
        assert!(r18
            .iter()
            .any(|t| t.name == "layer3.1.bn1.num_batches_tracked" && t.data == Data::I64(vec![7])));
        assert!(!r18.iter().any(|t| t.name.contains("layer1.0.downsample")));
        let r50 = named_tensors(&encoder(Backbone::Resnet50, Stem::Imagenet, 1.0), 0);
        assert_eq!(r50.len(), 318);
        assert_eq!(shape_of(&r50, "layer1.0.downsample.0.weight"), [256, 64, 1, 1]);
        assert_eq!(shape_of(&r50, "layer4.2.conv3.weight"), [2048, 512, 1, 1]);
        let r34 = named_tensors(&encoder(Backbone::Resnet34, Stem::Cifar, 0.5), 0);
        assert_eq!(shape_of(&r34, "conv1.weight"), [32, 3, 3, 3]);
        assert_eq!(shape_of(&r34, "layer3.5.conv2.weight"), [128, 128, 3, 3]);
    }

    #[test]
    fn safetensors_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("enc.safetensors");
        let ts = named_tensors(&encoder(Backbone::Resnet18, Stem::Cifar, 0.125), 3);
        let meta = BTreeMap::from([("arch".to_string(), "resnet18".to_string())]);
        write_safetensors(&path, &ts, &meta).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert!(n.is_multiple_of(8));
        let mut back = read_safetensors(&path).unwrap();
        back.sort_by(|a, b| a.name.cmp(&b.name));
        let mut want = ts.clone();
        want.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(back, want);
    }
}
