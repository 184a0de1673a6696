//! The C header must describe the same ABI as the Rust definitions: same fields in the same
//! order, same sizes and offsets (checked by the C compiler itself), same constants. Its inline
//! helpers are compiled and run too.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use simclr_plugin::abi;

fn header() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("include/simclr_plugin.h")
}

/// The fields of every `typedef struct NAME { ... } NAME;` in the header, in order.
fn header_structs(text: &str) -> BTreeMap<String, Vec<String>> {
    // Strip comments first.
    let mut clean = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("/*") {
        clean.push_str(&rest[..i]);
        rest = rest[i..].find("*/").map_or("", |j| &rest[i + j + 2..]);
    }
    clean.push_str(rest);
    let mut out = BTreeMap::new();
    let mut rest = clean.as_str();
    while let Some(i) = rest.find("typedef struct ") {
        let after = &rest[i + "typedef struct ".len()..];
        let name: String = after.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        let open = after.find('{').expect("struct body");
        let close = after.find('}').expect("struct end");
        let body = &after[open + 1..close];
        let fields = body
            .split(';')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(|d| {
                if let Some(p) = d.find("(*") {
                    d[p + 2..].split(')').next().unwrap().trim().to_string()
                } else {
                    d.split(|c: char| !(c.is_alphanumeric() || c == '_'))
                        .rfind(|s| !s.is_empty())
                        .unwrap()
                        .to_string()
                }
            })
            .collect();
        out.insert(name, fields);
        rest = &after[close..];
    }
    out
}

#[test]
fn header_struct_fields_match_rust_in_order() {
    let text = std::fs::read_to_string(header()).unwrap();
    let structs = header_structs(&text);
    let mut rust: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (s, f, _) in abi::layout() {
        if s != "sizeof" {
            rust.entry(s.to_string()).or_default().push(f.to_string());
        }
    }
    // `simclr_rng` is a helper of the header only.
    let c: BTreeMap<String, Vec<String>> = structs.into_iter().filter(|(k, _)| k != "simclr_rng").collect();
    assert_eq!(c, rust);
}

#[test]
fn header_constants_match_rust() {
    let text = std::fs::read_to_string(header()).unwrap();
    for (name, value) in abi::constants() {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().take(2).eq(["#define", name]))
            .unwrap_or_else(|| panic!("{name} is not defined in the header"));
        let v = line.split_whitespace().nth(2).unwrap().trim_end_matches('u');
        assert_eq!(v.parse::<i64>().unwrap(), value, "{name}");
    }
    assert!(text.contains(&format!("#define SIMCLR_PLUGIN_ENTRY {}", abi::ENTRY_SYMBOL)));
    assert!(text.contains(&format!("#define SIMCLR_PLUGIN_ENTRY_NAME \"{}\"", abi::ENTRY_SYMBOL)));
    let canary: String = abi::CANARY.iter().map(|b| format!("\\x{b:02X}")).collect();
    assert!(text.contains(&format!("#define SIMCLR_CANARY \"{canary}\"")), "SIMCLR_CANARY");
}

fn has_cc() -> bool {
    Command::new("cc").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// Compiles (C11, warnings as errors) a program that static-asserts every size and offset the
/// Rust side uses, checks the constants, and exercises the inline helpers against the Rust ones.
#[test]
fn c_compiler_agrees_on_layout_and_helpers_work() {
    if !has_cc() {
        eprintln!("skipped: no C compiler (`cc`) on this machine");
        return;
    }
    let dir = std::env::temp_dir().join(format!("simclr-header-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut c = String::from("#include \"simclr_plugin.h\"\n#include <stddef.h>\n#include <math.h>\n");
    for (s, f, n) in abi::layout() {
        if s == "sizeof" {
            c += &format!("_Static_assert(sizeof({f}) == {n}, \"sizeof({f}) is {n} in Rust\");\n");
        } else {
            c += &format!(
                "_Static_assert(offsetof({s}, {f}) == {n}, \"offsetof({s}, {f}) is {n} in Rust\");\n"
            );
        }
    }
    for (name, v) in abi::constants() {
        c += &format!("_Static_assert({name} == {v}, \"{name} is {v} in Rust\");\n");
    }
    let mut rng = simclr_plugin::SeedRng::new(42);
    let (r1, r2) = (rng.next_u64(), rng.next_u64());
    let u = simclr_plugin::SeedRng::new(7).uniform();
    c += &format!(
        r#"
#define CHECK(cond) do {{ if (!(cond)) {{ printf("failed: %s (line %d)\n", #cond, __LINE__); return 1; }} }} while (0)
int main(void) {{
    const char *json = "{{\"angle\":[0,180.5],\"name\":\"a \\\"q\\\"\",\"nested\":{{\"p\":9}},\"on\":true,\"p\":0.25}}";
    double d = -1;
    char buf[16];
    int b = -1;
    char msg[8];
    simclr_error err = {{msg, sizeof msg}};
    simclr_rng r = simclr_rng_new(42);
    CHECK(strcmp(SIMCLR_PLUGIN_ENTRY_NAME, "{entry}") == 0);
    CHECK(simclr_config_number(json, "p", -1, &d) && d == 0.25);
    CHECK(simclr_config_number(json, "angle", 1, &d) && d == 180.5);
    CHECK(simclr_config_number(json, "angle", 0, &d) && d == 0);
    CHECK(!simclr_config_number(json, "angle", 2, &d));
    CHECK(!simclr_config_number(json, "missing", -1, &d));
    CHECK(simclr_config_string(json, "name", buf, sizeof buf) && strcmp(buf, "a \"q\"") == 0);
    CHECK(simclr_config_bool(json, "on", &b) && b == 1);
    CHECK(simclr_set_error(&err, SIMCLR_ERR_INPUT, "%s %d", "too long a message", 5) == SIMCLR_ERR_INPUT);
    CHECK(strcmp(msg, "too lon") == 0);
    CHECK(simclr_rng_next(&r) == {r1}ull && simclr_rng_next(&r) == {r2}ull);
    r = simclr_rng_new(7);
    CHECK(fabs(simclr_rng_uniform(&r) - {u:.17}) < 1e-15);
    printf("ok\n");
    return 0;
}}
"#,
        entry = abi::ENTRY_SYMBOL
    );
    let src = dir.join("layout.c");
    std::fs::write(&src, c).unwrap();
    let exe = dir.join("layout");
    let include = header().parent().unwrap().to_path_buf();
    let out = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", "-I"])
        .arg(&include)
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .arg("-lm")
        .output()
        .unwrap();
    assert!(out.status.success(), "cc failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let run = Command::new(&exe).output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success() && stdout.contains("ok"), "{stdout}");
    // C++ compilers must accept the header too (extern "C", no C-only syntax in it).
    if Command::new("c++").arg("--version").output().is_ok_and(|o| o.status.success()) {
        let cpp = dir.join("include.cpp");
        std::fs::write(&cpp, "#include \"simclr_plugin.h\"\nint main() { return SIMCLR_OK; }\n").unwrap();
        let out = Command::new("c++")
            .args(["-Wall", "-Werror", "-I"])
            .arg(&include)
            .arg(&cpp)
            .arg("-o")
            .arg(dir.join("include_cpp"))
            .output()
            .unwrap();
        assert!(out.status.success(), "c++ failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
