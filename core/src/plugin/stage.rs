//! Plugin kinds as the runtime sees them: factories, configs, and map stages calling the
//! plugin's functions across the C ABI (every output checked).

use std::ffi::{c_char, c_void};
use std::sync::Arc;

use rand::RngCore;
use serde_json::{Map, Value};
use simclr_plugin::abi::{DestroyFn, ErrorBuf, View};

use crate::error::StageError;
use crate::sample::{Image, Sample};
use crate::stage::{
    ConfigError, Configured, Context, Factory, MapStage, PortType, Problem, Role, SampleCtx, Stage, StageRef,
};
use crate::yaml::PathSeg;

use super::isolate::{IsolatedStage, Isolation};
use super::schema::*;
use super::*;

pub(super) struct PluginFactory {
    plugin: Arc<LoadedPlugin>,
    kind: usize,
    about: String,
    isolation: Option<Isolation>,
}

impl PluginFactory {
    pub(super) fn new(plugin: Arc<LoadedPlugin>, kind: usize, isolation: Option<Isolation>) -> Self {
        let about = format!("{} [plugin {} {}]", plugin.kinds[kind].about, plugin.name, plugin.version);
        PluginFactory { plugin, kind, about, isolation }
    }
}

impl Factory for PluginFactory {
    fn schema(&self, _generator: &mut schemars::SchemaGenerator) -> serde_json::Value {
        let mut schema = self.plugin.kinds[self.kind].schema.clone();
        // The host handles `views:` for every plugin kind (see `PluginConfig`).
        if let Some(Value::Object(props)) = schema.get_mut("properties") {
            props.entry("views").or_insert_with(|| {
                serde_json::json!({
                    "type": "array",
                    "items": {"type": "integer", "minimum": 0},
                    "description": "The views this stage changes (default: all); `[0]` changes the first view only."
                })
            });
        }
        schema
    }
    fn kind(&self) -> &str {
        &self.plugin.kinds[self.kind].name
    }
    fn about(&self) -> &str {
        &self.about
    }
    fn role(&self) -> Role {
        Role::Map
    }
    fn parse(&self, config: Value) -> Result<Box<dyn Configured>, ConfigError> {
        let Value::Object(mut fields) = config else {
            return Err(ConfigError { path: Vec::new(), message: "a stage's fields form a mapping".into() });
        };
        let views = match fields.remove("views") {
            None | Some(Value::Null) => None,
            Some(v) => Some(parse_views(&v).ok_or_else(|| ConfigError {
                path: vec![PathSeg::Key("views".into())],
                message: format!("invalid type: {}, expected a list of view numbers", describe(&v)),
            })?),
        };
        let schema = &self.plugin.kinds[self.kind].parsed;
        let fields = Value::Object(fields);
        let mut violations = Vec::new();
        schema.validate(&fields, &mut Vec::new(), &mut violations);
        if let Some(v) = violations.iter().find(|v| v.range_fix.is_none()) {
            return Err(ConfigError { path: v.path.clone(), message: v.message.clone() });
        }
        let Value::Object(mut fields) = fields else { unreachable!("checked above") };
        for (name, sub) in &schema.properties {
            if let (false, Some(d)) = (fields.contains_key(name), &sub.default) {
                fields.insert(name.clone(), d.clone());
            }
        }
        let problems = violations
            .into_iter()
            .map(|v| Problem { field: v.path, message: v.message, fix: v.range_fix.unwrap_or_default() })
            .collect();
        Ok(Box::new(PluginConfig {
            plugin: self.plugin.clone(),
            kind: self.kind,
            fields,
            views,
            problems,
            isolation: self.isolation.clone(),
        }))
    }
}

pub(super) fn parse_views(v: &Value) -> Option<Vec<u32>> {
    v.as_array()?.iter().map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok())).collect()
}

/// A validated config of a plugin kind.
pub(super) struct PluginConfig {
    plugin: Arc<LoadedPlugin>,
    kind: usize,
    /// With defaults filled in, without `views`.
    fields: Map<String, Value>,
    views: Option<Vec<u32>>,
    /// Range violations of the schema, reported by `check`.
    problems: Vec<Problem>,
    isolation: Option<Isolation>,
}

/// Makes an instance of kind `kind` from its config (JSON), by the plugin's `create`.
pub(super) fn create_instance(plugin: &LoadedPlugin, kind: usize, json: &str) -> Result<Instance, String> {
    let cjson = std::ffi::CString::new(json).map_err(|_| "the config contains a NUL".to_string())?;
    let mut err = ErrorMessage::new();
    let mut ptr: *mut c_void = std::ptr::null_mut();
    // SAFETY: `create` is the plugin's (checked non-NULL at load); every pointer passed
    // lives across the call: the NUL-terminated config and its length, the out-pointer
    // and the error buffer with its capacity.
    let rc = unsafe { (plugin.create)(kind as u32, cjson.as_ptr(), json.len(), &mut ptr, &mut err.buf()) };
    if rc != abi::OK {
        // A config the plugin refuses: its message is the point.
        return Err(if rc == abi::ERR_CONFIG {
            err.message()
        } else {
            format!("create {}", err.describe(rc))
        });
    }
    Ok(Instance { ptr, destroy: plugin.destroy })
}

impl PluginConfig {
    pub(super) fn kind_name(&self) -> &str {
        &self.plugin.kinds[self.kind].name
    }

    fn json(&self) -> Result<String, String> {
        serde_json::to_string(&self.fields).map_err(|e| e.to_string())
    }

    pub(super) fn instantiate(&self) -> Result<Instance, String> {
        create_instance(&self.plugin, self.kind, &self.json()?)
    }
}

impl Configured for PluginConfig {
    fn ports(&self) -> (PortType, PortType) {
        (PortType::Views, PortType::Views)
    }

    fn check(&self, _cx: &Context, out: &mut Vec<Problem>) {
        let before = out.len();
        if let Some(v) = &self.views {
            if v.is_empty() || v.iter().any(|&x| x > 15) {
                out.push(Problem::new(
                    "views",
                    "`views` must list view numbers from 0 to 15",
                    "write e.g. `views: [0]` for the first branch only",
                ));
            }
        }
        out.extend(self.problems.iter().cloned());
        if out.len() > before {
            return;
        }
        // Let the plugin reject what its schema cannot express (e.g. min > max); nothing runs.
        // An isolated plugin's `create` runs only in its helpers (the run's start says).
        if self.isolation.is_some() {
            return;
        }
        if let Err(e) = self.instantiate() {
            out.push(Problem {
                field: Vec::new(),
                message: format!("plugin '{}' rejected the config: {e}", self.plugin.file_name),
                fix: format!(
                    "see `simclr plugins inspect {}` for the config of `{}`",
                    self.plugin.path.display(),
                    self.kind_name()
                ),
            });
        }
    }

    fn refs(&self) -> Vec<StageRef> {
        Vec::new()
    }

    fn build(&self, _cx: &Context) -> Result<Stage, StageError> {
        if let Some(isolation) = &self.isolation {
            let config = self.json().map_err(StageError::fatal)?;
            let stage = IsolatedStage::new(
                self.plugin.clone(),
                self.kind_name().to_string(),
                config,
                self.views.clone(),
                isolation.clone(),
            )
            .map_err(|e| {
                StageError::fatal(format!(
                    "plugin '{}' (kind `{}`, isolated): {e}",
                    self.plugin.file_name,
                    self.kind_name()
                ))
            })?;
            return Ok(Stage::Map(Arc::new(stage)));
        }
        let instance = self.instantiate().map_err(|e| {
            StageError::fatal(format!(
                "plugin '{}' could not make a `{}`: {e}",
                self.plugin.file_name,
                self.kind_name()
            ))
        })?;
        Ok(Stage::Map(Arc::new(PluginStage {
            plugin: self.plugin.clone(),
            kind: self.kind,
            in_place: self.plugin.kinds[self.kind].in_place,
            instance,
            views: self.views.clone(),
        })))
    }
}

/// A plugin's instance, destroyed with the stage.
pub(super) struct Instance {
    ptr: *mut c_void,
    destroy: DestroyFn,
}

// SAFETY: the ABI requires instances to be usable from several threads at once (read-only
// after `create`); the host never touches what the pointer points to.
unsafe impl Send for Instance {}
// SAFETY: as for Send: concurrent `process` calls on one instance are allowed by the ABI.
unsafe impl Sync for Instance {}

impl Drop for Instance {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from this plugin's `create` and is destroyed exactly once, here,
        // when no stage can call `process` on it any more.
        unsafe { (self.destroy)(self.ptr) };
    }
}

/// A host buffer for a plugin's error message (on the stack: one per call).
pub(super) struct ErrorMessage {
    bytes: [u8; ERROR_CAPACITY],
}

impl ErrorMessage {
    pub(super) fn new() -> Self {
        ErrorMessage { bytes: [0; ERROR_CAPACITY] }
    }

    /// The `simclr_error` to pass: valid while `self` is not moved.
    pub(super) fn buf(&mut self) -> ErrorBuf {
        ErrorBuf { message: self.bytes.as_mut_ptr() as *mut c_char, capacity: ERROR_CAPACITY }
    }

    /// The plugin's message.
    pub(super) fn message(&self) -> String {
        let end = self.bytes.iter().position(|&b| b == 0).unwrap_or(ERROR_CAPACITY);
        let msg = String::from_utf8_lossy(&self.bytes[..end]);
        if msg.trim().is_empty() {
            "(no message)".into()
        } else {
            msg.into_owned()
        }
    }

    /// "returned error code N (NAME): message".
    pub(super) fn describe(&self, rc: i32) -> String {
        format!("returned error code {rc} ({}): {}", abi::code_name(rc), self.message())
    }
}

/// A plugin kind in a running pipeline.
pub(super) struct PluginStage {
    plugin: Arc<LoadedPlugin>,
    kind: usize,
    in_place: bool,
    instance: Instance,
    views: Option<Vec<u32>>,
}

/// A fresh out-of-place output buffer: the canary pattern, repeated.
pub(super) fn canary(len: usize) -> Vec<u8> {
    let mut v = abi::CANARY.repeat(len / abi::CANARY.len() + 1);
    v.truncate(len);
    v
}

/// The offset of the first block of `out` still equal to the canary: every whole
/// `CANARY_BLOCK`-byte block, and a final partial block of half that or more.
pub(super) fn unwritten_block(out: &[u8]) -> Option<usize> {
    let pattern = canary(abi::CANARY_BLOCK);
    let mut blocks = out.chunks_exact(abi::CANARY_BLOCK);
    if let Some(i) = blocks.by_ref().position(|b| b == pattern.as_slice()) {
        return Some(i * abi::CANARY_BLOCK);
    }
    let tail = blocks.remainder();
    (tail.len() >= abi::CANARY_BLOCK / 2 && tail == &pattern[..tail.len()]).then(|| out.len() - tail.len())
}

impl PluginStage {
    /// Kind `kind` of `plugin` with its instance, on every view (the helper of an isolated
    /// plugin calls [`PluginStage::process`] directly).
    pub(super) fn new(plugin: Arc<LoadedPlugin>, kind: usize, instance: Instance) -> Self {
        let in_place = plugin.kinds[kind].in_place;
        PluginStage { plugin, kind, in_place, instance, views: None }
    }

    pub(super) fn process(&self, img: &mut Image, seed: u64) -> Result<(), String> {
        let (w, h) = (img.width, img.height);
        let len = img.pixels() * 3;
        if img.data.len() != len {
            return Err(format!("the input view is malformed ({w}x{h} with {} bytes)", img.data.len()));
        }
        if len == 0 {
            return Ok(()); // Plugins are never called with an empty view.
        }
        let mut err = ErrorMessage::new();
        let view = |data: *mut u8, len: usize, w: u32, h: u32| View {
            data,
            len,
            width: w,
            height: h,
            stride: w * 3,
            channels: 3,
            filled: 0,
        };
        if self.in_place {
            let mut out = view(img.data.as_mut_ptr(), len, w, h);
            // SAFETY: in place: `out` describes the view's own buffer (`len` bytes, w x h x 3,
            // alive and exclusively borrowed across the call); no input view (NULL) as the ABI
            // specifies for in-place kinds; the error buffer lives across the call.
            let rc = unsafe {
                (self.plugin.process)(self.instance.ptr, seed, std::ptr::null(), &mut out, &mut err.buf())
            };
            if rc != abi::OK {
                return Err(format!("process {}", err.describe(rc)));
            }
            if out.filled != len {
                return Err(format!(
                    "process reported writing {} of the {len} bytes of the view",
                    out.filled
                ));
            }
            return Ok(());
        }
        let output_size = self.plugin.output_size.ok_or("output_size is NULL")?;
        let (mut ow, mut oh) = (0u32, 0u32);
        // SAFETY: the instance is this plugin's; the out-parameters and error buffer live across
        // the call. What it declares is bounds-checked below before any allocation.
        let rc = unsafe { output_size(self.instance.ptr, w, h, &mut ow, &mut oh, &mut err.buf()) };
        if rc != abi::OK {
            return Err(format!("output_size {}", err.describe(rc)));
        }
        if ow == 0
            || oh == 0
            || ow > MAX_SIDE
            || oh > MAX_SIDE
            || u64::from(ow) * u64::from(oh) > MAX_OUTPUT_PIXELS
        {
            return Err(format!(
                "output_size declared an output of {ow}x{oh} for a {w}x{h} input (out of bounds)"
            ));
        }
        let out_len = ow as usize * oh as usize * 3;
        let mut data = canary(out_len);
        let input = view(img.data.as_ptr() as *mut u8, len, w, h);
        let mut out = view(data.as_mut_ptr(), out_len, ow, oh);
        // SAFETY: `input` describes the view's buffer (read only by the ABI's contract for
        // out-of-place kinds), `out` a fresh buffer of exactly the declared size; both outlive
        // the call, and the output is checked (`filled`, canary) afterwards.
        let rc = unsafe { (self.plugin.process)(self.instance.ptr, seed, &input, &mut out, &mut err.buf()) };
        if rc != abi::OK {
            return Err(format!("process {}", err.describe(rc)));
        }
        if out.filled != out_len {
            return Err(format!(
                "process reported writing {} of the {out_len} bytes of its {ow}x{oh} output",
                out.filled
            ));
        }
        if let Some(at) = unwritten_block(&data) {
            return Err(format!(
                "process left bytes {at}.. of its {out_len}-byte {ow}x{oh} output unwritten (still the host's canary pattern)"
            ));
        }
        *img = Image { width: ow, height: oh, data };
        Ok(())
    }
}

/// Calls `f(view, image, seed)` on each view of the sample that `views` selects (all when
/// None), with one u64 of the view's own random stream: the same seed whatever the scheduling,
/// in-process or isolated.
pub(super) fn each_view(
    sample: &mut Sample,
    views: Option<&[u32]>,
    ctx: &SampleCtx,
    mut f: impl FnMut(u32, &mut Image, u64) -> Result<(), StageError>,
) -> Result<(), StageError> {
    crate::stage::for_each_view(sample, views, ctx, |v, img, rng| f(v, img, rng.next_u64()))
}

/// The error of a plugin refusing a view (its own error code or a failed output check).
pub(super) fn view_failed(file_name: &str, kind: &str, sample: u64, view: u32, e: &str) -> StageError {
    StageError::fatal(format!(
        "plugin '{file_name}' (kind '{kind}') failed on sample {sample}, view {view}: {e}"
    ))
}

impl MapStage for PluginStage {
    fn apply(&self, sample: &mut Sample, ctx: &SampleCtx) -> Result<(), StageError> {
        let kind = &self.plugin.kinds[self.kind].name;
        each_view(sample, self.views.as_deref(), ctx, |v, img, seed| {
            self.process(img, seed).map_err(|e| view_failed(&self.plugin.file_name, kind, ctx.index, v, &e))
        })
    }
}
