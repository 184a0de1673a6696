//! Stage plugins end to end: the example plugins (Rust and C) built by the test and run in
//! their pipelines (same digest for 1 and 2 threads; the Rust one matches its built-in twin),
//! `simclr plugins inspect`, config validation through the plugin's schema, and containment:
//! purpose-built bad plugins (a panic, an error code, the wrong ABI, no entry symbol, an output
//! left unwritten, a text file named `.so`, ...) end the command with exit code 1 or 2 and a
//! message naming the library and the problem, never with a crash.
//!
//! C plugins are compiled with `cc`; these tests are skipped (with a message) where there is
//! none. Rust plugins are built with the cargo running the tests.

use std::path::{Path, PathBuf};
use std::process::{Command as StdCommand, Output};
use std::sync::{Mutex, OnceLock};

use assert_cmd::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn simclr() -> Command {
    Command::cargo_bin("simclr").unwrap()
}

fn cargo() -> StdCommand {
    StdCommand::new(option_env!("CARGO").unwrap_or("cargo"))
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn has_cc() -> bool {
    static CC: OnceLock<bool> = OnceLock::new();
    *CC.get_or_init(|| StdCommand::new("cc").arg("--version").output().is_ok_and(|o| o.status.success()))
}

macro_rules! require_cc {
    () => {
        if !has_cc() {
            eprintln!("skipped: no C compiler (`cc`) on this machine");
            return;
        }
    };
}

/// `lib<name>.so` (or the platform's equivalent).
fn lib_name(name: &str) -> String {
    format!("{}{name}{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX)
}

/// Builds a workspace cdylib once and returns the library's path (from cargo's JSON messages).
fn build_workspace_cdylib(package: &str, target: &str) -> PathBuf {
    // One cargo at a time from this test binary.
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let out = cargo()
        .current_dir(root())
        .args(["build", "--quiet", "--message-format=json", "-p", package])
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo build -p {package} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    find_artifact(&out.stdout, target).unwrap_or_else(|| panic!("no cdylib for {target} in cargo's output"))
}

fn find_artifact(json_lines: &[u8], target: &str) -> Option<PathBuf> {
    String::from_utf8_lossy(json_lines)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|m| {
            if m["reason"] != "compiler-artifact" || m["target"]["name"] != target {
                return None;
            }
            m["filenames"]
                .as_array()?
                .iter()
                .filter_map(|f| f.as_str())
                .find(|f| f.ends_with(std::env::consts::DLL_SUFFIX))
                .map(PathBuf::from)
        })
}

/// The Rust example plugin, built once for the whole test binary.
fn motion_blur_plugin() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| build_workspace_cdylib("motion-blur-plugin", "motion_blur_plugin"))
}

/// Compiles C source into `dir/lib<name>.so` with the SDK header.
fn cc_plugin(dir: &Path, name: &str, source: &str) -> PathBuf {
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, source).unwrap();
    let lib = dir.join(lib_name(name));
    let out = StdCommand::new("cc")
        .args(["-shared", "-fPIC", "-std=c11", "-O1", "-I"])
        .arg(root().join("plugins/sdk/include"))
        .arg(&src)
        .arg("-o")
        .arg(&lib)
        .output()
        .unwrap();
    assert!(out.status.success(), "cc {name}.c failed:\n{}", String::from_utf8_lossy(&out.stderr));
    lib
}

/// The C example plugin (`plugins/examples/posterize`) built into a fresh folder: (folder, library).
fn posterize_plugin() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let source = std::fs::read_to_string(root().join("plugins/examples/posterize/posterize.c")).unwrap();
    let lib = cc_plugin(dir.path(), "posterize", &source);
    (dir, lib)
}

fn bench_digest(file: &Path, plugin_path: &Path, extra: &[&str]) -> serde_json::Value {
    let out = simclr()
        .env("SIMCLR_PLUGIN_PATH", plugin_path)
        .arg("bench")
        .arg(file)
        .args(["--json", "--digest"])
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn rust_example_same_digest_for_1_and_2_threads_and_same_as_its_builtin_twin() {
    let lib = motion_blur_plugin();
    let file = root().join("pipelines/plugin-motion-blur.yaml");
    let dir = lib.parent().unwrap();
    let one = bench_digest(&file, dir, &["--threads", "1", "--samples", "400"]);
    let two = bench_digest(&file, dir, &["--threads", "2", "--samples", "400"]);
    assert_eq!(one["samples"], 400);
    assert_eq!(one["digest"], two["digest"]);
    assert!(one["stages"].as_array().unwrap().iter().any(|s| s["kind"] == "motion_blur"));
    // The same code compiled in, with the same per-view seeds: the same output.
    let builtin = bench_digest(
        &file,
        dir,
        &["--threads", "2", "--samples", "400", "--set", "blur.kind=motion_blur_builtin"],
    );
    assert_eq!(one["digest"], builtin["digest"]);
    // And the plugin does something.
    let off = bench_digest(&file, dir, &["--threads", "1", "--samples", "400", "--set", "blur=off"]);
    assert_ne!(one["digest"], off["digest"]);
    // `views:` is honoured: blurring one view differs from blurring both.
    let first = bench_digest(&file, dir, &["--threads", "1", "--samples", "400", "--set", "blur.views=[0]"]);
    assert_ne!(one["digest"], first["digest"]);
    assert_ne!(off["digest"], first["digest"]);
}

/// The shipped plugin pipelines pass `simclr schema --plugin LIB` (tests/schema.rs checks the
/// others against the built-in schema), and the plugin's own schema catches a misspelt field.
#[test]
fn plugin_pipelines_pass_the_schema_with_their_plugins() {
    require_cc!();
    let (_dir, posterize) = posterize_plugin();
    for (lib, file) in [
        (motion_blur_plugin().to_path_buf(), "pipelines/plugin-motion-blur.yaml"),
        (posterize.clone(), "pipelines/plugin-posterize.yaml"),
        (posterize, "pipelines/plugin-posterize-isolated.yaml"),
    ] {
        let out = simclr().arg("schema").arg("--plugin").arg(&lib).output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let schema: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let validator = jsonschema::draft202012::new(&schema).unwrap();
        let src = std::fs::read_to_string(root().join(file)).unwrap();
        let doc = simclr_core::yaml::parse(&src).unwrap().value.to_json();
        let errs: Vec<String> = validator.iter_errors(&doc).map(|e| e.to_string()).collect();
        assert!(errs.is_empty(), "{file}: {errs:#?}");
        let bad = simclr_core::yaml::parse(&src.replace("p: ", "pp: ")).unwrap().value.to_json();
        assert!(!validator.is_valid(&bad), "{file} with a misspelt `p` passed");
    }
}

#[test]
fn c_example_same_digest_for_1_and_2_threads() {
    require_cc!();
    let (dir, _) = posterize_plugin();
    let file = root().join("pipelines/plugin-posterize.yaml");
    let one = bench_digest(&file, dir.path(), &["--threads", "1", "--samples", "500"]);
    let two = bench_digest(&file, dir.path(), &["--threads", "2", "--samples", "500"]);
    assert_eq!(one["samples"], 500);
    assert_eq!(one["digest"], two["digest"]);
    let off = bench_digest(&file, dir.path(), &["--threads", "2", "--samples", "500", "--set", "post=off"]);
    assert_ne!(one["digest"], off["digest"]);
    let reseeded = bench_digest(&file, dir.path(), &["--threads", "2", "--samples", "500", "--seed", "3"]);
    assert_ne!(one["digest"], reseeded["digest"]);
}

#[test]
fn posterize_is_the_identity_at_8_bits_or_p_0_and_honours_views() {
    require_cc!();
    let (dir, _) = posterize_plugin();
    // With bits: 8 it is the identity; with p: 0 too.
    let file = root().join("pipelines/plugin-posterize.yaml");
    let off = bench_digest(&file, dir.path(), &["--samples", "100", "--set", "post=off"]);
    for set in ["post.bits=8", "post.p=0"] {
        let same = bench_digest(&file, dir.path(), &["--samples", "100", "--set", set]);
        assert_eq!(off["digest"], same["digest"], "{set}");
    }
    let both = bench_digest(&file, dir.path(), &["--samples", "100", "--set", "post.views=[0, 1]"]);
    let one = bench_digest(&file, dir.path(), &["--samples", "100"]);
    assert_ne!(both["digest"], one["digest"]);
}

#[test]
fn kinds_lists_a_plugins_kinds_marked_with_their_library() {
    let lib = motion_blur_plugin();
    let out = simclr().arg("kinds").output().unwrap();
    assert!(out.status.success());
    assert!(!text(&out).lines().any(|l| l.starts_with("motion_blur ")), "{}", text(&out));
    let out = simclr().args(["kinds", "--plugin"]).arg(lib).output().unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    let line = t.lines().find(|l| l.starts_with("motion_blur ")).unwrap_or_else(|| panic!("{t}"));
    let file = lib.file_name().unwrap().to_string_lossy();
    assert!(line.contains(&format!("[plugin: {file}]")), "{line}");
    // The built-in kinds are still there, unmarked.
    let crop = t.lines().find(|l| l.starts_with("random_resized_crop ")).unwrap();
    assert!(!crop.contains("[plugin"), "{crop}");
    // A library that cannot load: exit 2, naming it.
    let out = simclr().args(["kinds", "--plugin", "/nonexistent/libnope.so"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("libnope.so"), "{}", text(&out));
}

#[test]
fn inspect_prints_name_version_abi_kinds_and_schema() {
    let lib = motion_blur_plugin();
    let out = simclr().args(["plugins", "inspect"]).arg(lib).output().unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    for want in [
        "motion-blur 0.1.0",
        "abi:     1.0",
        "simclr_stage_plugin_v1",
        "motion_blur",
        "out of place",
        "\"length\"",
    ] {
        assert!(t.contains(want), "missing {want:?} in:\n{t}");
    }
    let out = simclr().args(["plugins", "inspect", "--json"]).arg(lib).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["name"], "motion-blur");
    assert_eq!(v["abi"]["major"], 1);
    assert_eq!(v["kinds"][0]["name"], "motion_blur");
    assert_eq!(v["kinds"][0]["config_schema"]["properties"]["p"]["maximum"], 1);
    // A bare name is looked up in SIMCLR_PLUGIN_PATH.
    let out = simclr()
        .env("SIMCLR_PLUGIN_PATH", lib.parent().unwrap())
        .args(["plugins", "inspect", "motion_blur_plugin"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    // Not a library: exit 2, naming it.
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("libbogus.so");
    std::fs::write(&bogus, "not a library\n").unwrap();
    let out = simclr().args(["plugins", "inspect"]).arg(&bogus).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("libbogus.so") && text(&out).contains("not a loadable shared library"),
        "{}",
        text(&out)
    );
}

fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

#[test]
fn plugin_configs_are_validated_against_the_schema_with_positions() {
    let lib = motion_blur_plugin();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(lib, dir.path().join(lib_name("motion_blur_plugin"))).unwrap();
    let file = write(
        dir.path(),
        "p.yaml",
        &format!(
            "name: p\nplugins: [./{}]\nstages:\n  - {{ id: data, kind: synthetic_shapes, count: 10, size: 16 }}\n  - {{ id: views, kind: views }}\n  - {{ id: a, kind: motion_blur, lenght: [3, 5] }}\n  - {{ id: b, kind: motion_blur, p: 1.5 }}\n  - {{ id: c, kind: motion_blur, length: [9, 3] }}\n  - {{ id: d, kind: motion_blur, angle: x }}\n",
            lib_name("motion_blur_plugin")
        ),
    );
    let out = simclr().arg("validate").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let f = file.display();
    for want in [
        format!("{f}:6:33: stage 'a': unknown field `lenght` (did you mean `length`?"),
        format!("{f}:7:33: stage 'b': `p` = 1.5 is out of range (use a value from 0 to 1)"),
        format!("{f}:8:5: stage 'c': plugin '{}' rejected the config", lib_name("motion_blur_plugin")),
        "minimum above its maximum".to_string(),
        format!("{f}:9:33: stage 'd': invalid type: string \"x\", expected a list"),
        "4 errors found".to_string(),
    ] {
        assert!(err.contains(&want), "missing {want:?} in:\n{err}");
    }
    // Nothing ran: validation only loads the library and checks configs.
    let ok = write(
        dir.path(),
        "ok.yaml",
        &format!(
            "name: ok\nplugins: [{}]\nstages:\n  - {{ id: data, kind: synthetic_shapes, count: 10, size: 16 }}\n  - {{ id: views, kind: views }}\n  - {{ id: a, kind: motion_blur, views: [1] }}\n",
            lib_name("motion_blur_plugin")
        ),
    );
    let out = simclr().arg("validate").arg(&ok).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn a_missing_plugin_is_a_diagnostic_at_its_entry() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "p.yaml",
        "name: p\nplugins:\n  - ./nowhere/libx.so\n  - no_such_plugin\nstages:\n  - { id: data, kind: counter, count: 3 }\n",
    );
    let out = simclr().env("SIMCLR_PLUGIN_PATH", dir.path()).arg("validate").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let f = file.display();
    assert!(err.contains(&format!("{f}:3:5: plugin './nowhere/libx.so': no such file")), "{err}");
    assert!(err.contains(&format!("{f}:4:5: plugin 'no_such_plugin': not found")), "{err}");
    assert!(err.contains("SIMCLR_PLUGIN_PATH"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Containment.

/// A C plugin with one kind, with the given pieces.
struct CPlugin {
    entry: &'static str,
    struct_size: &'static str,
    minor: &'static str,
    kind: &'static str,
    flags: &'static str,
    output_size: &'static str,
    process: &'static str,
}

impl Default for CPlugin {
    fn default() -> Self {
        CPlugin {
            entry: "SIMCLR_PLUGIN_ENTRY",
            struct_size: "sizeof(simclr_plugin)",
            minor: "SIMCLR_PLUGIN_ABI_MINOR",
            kind: "bad_kind",
            flags: "0",
            output_size: "*ow = w; *oh = h; return SIMCLR_OK;",
            process: "memcpy(out->data, in->data, out->len); out->filled = out->len; return SIMCLR_OK;",
        }
    }
}

impl CPlugin {
    fn source(&self) -> String {
        format!(
            r#"#include "simclr_plugin.h"
static int32_t create(uint32_t kind, const char *json, size_t len, void **inst, simclr_error *err) {{
    (void)kind; (void)json; (void)len; (void)err; *inst = NULL; return SIMCLR_OK;
}}
static int32_t output_size(void *inst, uint32_t w, uint32_t h, uint32_t *ow, uint32_t *oh, simclr_error *err) {{
    (void)inst; (void)err; {output_size}
}}
static int32_t process(void *inst, uint64_t seed, const simclr_view *in, simclr_view *out, simclr_error *err) {{
    (void)inst; (void)seed; (void)in; (void)err; {process}
}}
static void destroy(void *inst) {{ (void)inst; }}
static const simclr_kind kinds[] = {{{{"{kind}", "a purpose-built bad plugin",
    "{{\"type\": \"object\", \"properties\": {{}}, \"additionalProperties\": false}}", {flags}, 0}}}};
static const simclr_plugin table = {{{struct_size}, {minor}, "bad", "0.0.1", kinds, 1, 0,
    create, output_size, process, destroy}};
SIMCLR_EXPORT const simclr_plugin *{entry}(void) {{ return &table; }}
"#,
            output_size = self.output_size,
            process = self.process,
            kind = self.kind,
            flags = self.flags,
            struct_size = self.struct_size,
            minor = self.minor,
            entry = self.entry,
        )
    }
}

/// A pipeline in `dir` using `./lib<name>.so` with its kind as stage `bad`.
fn pipeline_with(dir: &Path, lib: &str, kind: &str) -> PathBuf {
    write(
        dir,
        "bad.yaml",
        &format!(
            "name: bad\nplugins: [./{lib}]\nstages:\n  - {{ id: data, kind: synthetic_shapes, count: 50, size: 16 }}\n  - {{ id: views, kind: views }}\n  - {{ id: bad, kind: {kind} }}\n"
        ),
    )
}

/// Runs `bench` on the pipeline; returns (exit code, all output). A signal (abort, segfault)
/// fails the test.
fn bench_outcome(file: &Path) -> (i32, String) {
    let out = simclr().arg("bench").arg(file).args(["--threads", "1", "--json"]).output().unwrap();
    let t = text(&out);
    let code =
        out.status.code().unwrap_or_else(|| panic!("simclr died from a signal ({:?}):\n{t}", out.status));
    (code, t)
}

fn expect_failure(plugin: CPlugin, name: &str, code: i32, wants: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    cc_plugin(dir.path(), name, &plugin.source());
    let file = pipeline_with(dir.path(), &lib_name(name), plugin.kind);
    let (got, t) = bench_outcome(&file);
    assert_eq!(got, code, "{t}");
    assert!(t.contains(&lib_name(name)), "the library is not named:\n{t}");
    for w in wants {
        assert!(t.contains(w), "missing {w:?} in:\n{t}");
    }
}

#[test]
fn a_plugin_returning_an_error_code_stops_the_run_naming_library_kind_and_sample() {
    require_cc!();
    let plugin = CPlugin {
        process: "if (seed % 7 == 0) return simclr_set_error(err, SIMCLR_ERR_FAILED, \"cannot blur a %ux%u view\", out->width, out->height);\n    memcpy(out->data, in->data, out->len); out->filled = out->len; return SIMCLR_OK;",
        ..CPlugin::default()
    };
    expect_failure(
        plugin,
        "bad_error",
        1,
        &[
            "stage 'bad' (bad_kind) failed on sample",
            "kind 'bad_kind'",
            "SIMCLR_ERR_FAILED",
            "cannot blur a 16x16 view",
        ],
    );
}

#[test]
fn an_output_left_unwritten_is_caught_by_the_canary() {
    require_cc!();
    // Claims to have filled the buffer but writes only half of it.
    let plugin = CPlugin {
        process: "memcpy(out->data, in->data, out->len / 2); out->filled = out->len; return SIMCLR_OK;",
        ..CPlugin::default()
    };
    expect_failure(plugin, "bad_canary", 1, &["failed on sample 0", "unwritten", "canary", "16x16 output"]);
}

#[test]
fn an_output_under_reported_or_of_an_absurd_size_is_refused() {
    require_cc!();
    let plugin = CPlugin {
        process: "memcpy(out->data, in->data, out->len); out->filled = out->len - 3; return SIMCLR_OK;",
        ..CPlugin::default()
    };
    expect_failure(plugin, "bad_filled", 1, &["reported writing 765 of the 768 bytes"]);
    let plugin = CPlugin { output_size: "*ow = 0; *oh = h; return SIMCLR_OK;", ..CPlugin::default() };
    expect_failure(plugin, "bad_size", 1, &["declared an output of 0x16 for a 16x16 input"]);
    // In place, `filled` must be set too.
    let plugin =
        CPlugin { flags: "SIMCLR_KIND_IN_PLACE", process: "return SIMCLR_OK;", ..CPlugin::default() };
    expect_failure(plugin, "bad_in_place", 1, &["reported writing 0 of the 768 bytes of the view"]);
}

#[test]
fn load_time_problems_exit_2_at_the_plugins_entry() {
    require_cc!();
    let cases: Vec<(CPlugin, &str, &str)> = vec![
        (
            CPlugin { entry: "simclr_stage_plugin_v2", ..CPlugin::default() },
            "bad_major",
            "built for plugin ABI 2",
        ),
        (
            CPlugin { entry: "some_other_symbol", ..CPlugin::default() },
            "bad_symbol",
            "exports no `simclr_stage_plugin_v1`",
        ),
        (
            CPlugin { minor: "SIMCLR_PLUGIN_ABI_MINOR + 1", ..CPlugin::default() },
            "bad_minor",
            "newer than this simclr's 1.0",
        ),
        (CPlugin { struct_size: "16", ..CPlugin::default() }, "bad_struct", "its table is 16 bytes"),
        (
            CPlugin { kind: "horizontal_flip", ..CPlugin::default() },
            "bad_clash",
            "kind `horizontal_flip` is already defined",
        ),
        (CPlugin { kind: "Bad-Name", ..CPlugin::default() }, "bad_name", "invalid name `Bad-Name`"),
        (CPlugin { flags: "8", ..CPlugin::default() }, "bad_flags", "unknown flags 0x8"),
    ];
    for (plugin, name, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        cc_plugin(dir.path(), name, &plugin.source());
        let file = pipeline_with(dir.path(), &lib_name(name), "bad_kind");
        let (code, t) = bench_outcome(&file);
        assert_eq!(code, 2, "{name}: {t}");
        let at = format!("{}:2:11: plugin './{}': ", file.display(), lib_name(name));
        assert!(t.contains(&at), "{name}: missing {at:?} in:\n{t}");
        assert!(t.contains(want), "{name}: missing {want:?} in:\n{t}");
    }
}

#[test]
fn a_text_file_named_so_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), &lib_name("text"), "this is not a shared library\n");
    let file = pipeline_with(dir.path(), &lib_name("text"), "anything");
    let (code, t) = bench_outcome(&file);
    assert_eq!(code, 2, "{t}");
    assert!(t.contains(&format!("plugin './{}': not a loadable shared library", lib_name("text"))), "{t}");
}

/// A Rust plugin crate outside the workspace, as an author would write it, that panics in
/// `process` (or `create`, as its config says). Built once, into target/plugin-tests.
fn panicking_rust_plugin() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let base = root().join("target/plugin-tests");
        let krate = base.join("panicky");
        std::fs::create_dir_all(krate.join("src")).unwrap();
        let manifest = format!(
            "[package]\nname = \"panicky-plugin\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[lib]\ncrate-type = [\"cdylib\"]\n\n[dependencies]\nsimclr-plugin = {{ path = {:?} }}\n\n[workspace]\n",
            root().join("plugins/sdk")
        );
        std::fs::write(krate.join("Cargo.toml"), manifest).unwrap();
        std::fs::write(
            krate.join("src/lib.rs"),
            r##"
use simclr_plugin::{export_plugin, serde_json::Value, ViewMut, ViewPlugin};

struct Panicky {
    at: u64,
}

impl ViewPlugin for Panicky {
    const KIND: &'static str = "panicky";
    const ABOUT: &'static str = "panics on purpose";
    const SCHEMA: &'static str = r#"{"type": "object", "additionalProperties": false,
        "properties": {"in_create": {"type": "boolean", "default": false}}}"#;
    const IN_PLACE: bool = true;
    fn create(config: &Value) -> Result<Self, String> {
        if config["in_create"] == true {
            panic!("panic in create, as asked");
        }
        Ok(Panicky { at: 3 })
    }
    fn process(&self, view: &mut ViewMut<'_>, seed: u64) -> Result<(), String> {
        let v: Vec<u8> = Vec::new();
        if seed % self.at == 0 {
            // An out-of-bounds index: a real bug, not a deliberate `panic!`.
            let _ = v[view.data.len()];
        }
        Ok(())
    }
}

export_plugin!(name: "panicky", version: "0.1.0", kinds: [Panicky]);
"##,
        )
        .unwrap();
        // The workspace's lock keeps the dependency versions the ones already downloaded.
        std::fs::copy(root().join("Cargo.lock"), krate.join("Cargo.lock")).unwrap();
        let out = cargo()
            .current_dir(&krate)
            .env("CARGO_TARGET_DIR", base.join("target"))
            .args(["build", "--quiet", "--offline", "--message-format=json"])
            .output()
            .expect("cargo runs");
        assert!(out.status.success(), "building the panicking plugin failed:\n{}", String::from_utf8_lossy(&out.stderr));
        find_artifact(&out.stdout, "panicky_plugin").expect("the panicking plugin's library")
    })
}

#[test]
fn a_rust_panic_is_caught_at_the_boundary_and_stops_the_run_with_exit_1() {
    let lib = panicking_rust_plugin();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(lib, dir.path().join(lib_name("panicky_plugin"))).unwrap();
    let file = pipeline_with(dir.path(), &lib_name("panicky_plugin"), "panicky");
    let (code, t) = bench_outcome(&file);
    assert_eq!(code, 1, "{t}");
    for want in [
        "stage 'bad' (panicky) failed on sample",
        &format!("plugin '{}' (kind 'panicky')", lib_name("panicky_plugin")),
        "SIMCLR_ERR_PANIC",
        "the plugin panicked: index out of bounds",
    ] {
        assert!(t.contains(want), "missing {want:?} in:\n{t}");
    }
    // A panic in `create` (called by validation) is a config problem: exit 2.
    let file = write(
        dir.path(),
        "create.yaml",
        &format!(
            "name: c\nplugins: [./{}]\nstages:\n  - {{ id: data, kind: synthetic_shapes, count: 5, size: 8 }}\n  - {{ id: views, kind: views }}\n  - {{ id: bad, kind: panicky, in_create: true }}\n",
            lib_name("panicky_plugin")
        ),
    );
    let out = simclr().arg("validate").arg(&file).output().unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(t.contains("rejected the config") && t.contains("panic in create, as asked"), "{t}");
}

// ---------------------------------------------------------------------------------------------
// Process isolation (`plugins: [{ path, isolate: process, timeout_s }]`).

/// A pipeline in `dir` running `./lib<name>.so`'s kind isolated, on `count` shapes.
fn isolated_pipeline(
    dir: &Path,
    lib: &str,
    kind: &str,
    timeout_s: f64,
    on_error: &str,
    count: u32,
) -> PathBuf {
    write(
        dir,
        "isolated.yaml",
        &format!(
            "name: isolated\nplugins:\n  - {{ path: ./{lib}, isolate: process, timeout_s: {timeout_s} }}\nstages:\n  - {{ id: data, kind: synthetic_shapes, count: {count}, size: 16, on_error: {on_error} }}\n  - {{ id: views, kind: views }}\n  - {{ id: bad, kind: {kind} }}\n  - {{ id: sink, kind: null }}\n"
        ),
    )
}

/// A C plugin that copies its input, except on views whose seed is a multiple of 5, where it
/// does `crash`.
fn crashing(crash: &'static str) -> CPlugin {
    CPlugin { process: crash, ..CPlugin::default() }
}

#[test]
fn an_isolated_plugin_that_segfaults_aborts_or_hangs_fails_the_run_naming_kind_sample_and_cause() {
    require_cc!();
    let cases: [(&str, &str, &str); 3] = [
        ("segv", "if (seed % 5 == 0) { volatile int *p = NULL; *p = 1; }\n    memcpy(out->data, in->data, out->len); out->filled = out->len; return SIMCLR_OK;", "crashed with SIGSEGV"),
        ("abort", "if (seed % 5 == 0) abort();\n    memcpy(out->data, in->data, out->len); out->filled = out->len; return SIMCLR_OK;", "crashed with SIGABRT"),
        ("hang", "if (seed % 5 == 0) for (;;) {}\n    memcpy(out->data, in->data, out->len); out->filled = out->len; return SIMCLR_OK;", "did not return within timeout_s = 2 s"),
    ];
    for (name, process, cause) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut source = crashing(process).source();
        source = source
            .replace("#include \"simclr_plugin.h\"", "#include \"simclr_plugin.h\"\n#include <stdlib.h>");
        cc_plugin(dir.path(), name, &source);
        let file = isolated_pipeline(dir.path(), &lib_name(name), "bad_kind", 2.0, "fail", 200);
        let t = std::time::Instant::now();
        let out = simclr()
            .current_dir(dir.path())
            .arg("bench")
            .arg(&file)
            .args(["--threads", "2"])
            .output()
            .unwrap();
        let secs = t.elapsed().as_secs_f64();
        let all = text(&out);
        // The host is not the one that died: an exit code, not a signal.
        assert_eq!(out.status.code(), Some(1), "{name}: {:?}\n{all}", out.status);
        assert!(secs < 2.0 + 15.0, "{name}: took {secs:.1} s");
        for want in [&lib_name(name), "kind 'bad_kind'", "isolated", "stage 'bad'", cause] {
            assert!(all.contains(want), "{name}: missing {want:?} in:\n{all}");
        }
        assert!(all.contains("on sample "), "{name}: the sample is not named:\n{all}");
        let cores: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("core"))
            .collect();
        assert!(cores.is_empty(), "{name}: a core file was written: {cores:?}");
    }
}

#[test]
fn an_isolated_plugin_crashing_on_some_samples_is_skipped_with_on_error_skip() {
    require_cc!();
    let dir = tempfile::tempdir().unwrap();
    let process = "if (seed % 5 == 0) { volatile int *p = NULL; *p = 1; }\n    memcpy(out->data, in->data, out->len); out->filled = out->len; return SIMCLR_OK;";
    cc_plugin(dir.path(), "segv", &crashing(process).source());
    let file = isolated_pipeline(dir.path(), &lib_name("segv"), "bad_kind", 5.0, "skip", 60);
    let out = simclr()
        .arg("bench")
        .arg(&file)
        .args(["--threads", "2", "--json", "--samples", "60"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let skipped = v["skipped"].as_u64().unwrap();
    let samples = v["samples"].as_u64().unwrap();
    // Each sample has two views; one in 5 seeds crashes: most samples pass, some are skipped,
    // and the helper was replaced after each crash.
    assert!(
        skipped > 0 && samples > 0 && samples + skipped == 60,
        "samples {samples}, skipped {skipped}\n{v}"
    );
}

#[test]
fn isolated_and_in_process_plugins_give_the_same_bits() {
    require_cc!();
    let (dir, _) = posterize_plugin();
    let plain = root().join("pipelines/plugin-posterize.yaml");
    let isolated = root().join("pipelines/plugin-posterize-isolated.yaml");
    let a = bench_digest(&plain, dir.path(), &["--threads", "2", "--samples", "300"]);
    let b = bench_digest(&isolated, dir.path(), &["--threads", "2", "--samples", "300"]);
    assert_eq!(a["samples"], 300);
    assert_eq!(a["digest"], b["digest"], "isolated and in-process digests differ");
}
