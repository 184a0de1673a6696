//! The parser and validator never panic, whatever the bytes. The default case count keeps CI
//! fast; a long fuzzing session is `PROPTEST_CASES=2000000 cargo test --release --test fuzz_parser`.

use std::path::Path;

use proptest::prelude::*;

fn check(src: &str) {
    let registry = simclr_stages::registry();
    if let Ok(spec) = simclr_core::spec::parse(Path::new("fuzz.yaml"), src, &[]) {
        let _ = simclr_core::validate(spec, &registry);
    }
}

/// Pieces of plausible pipeline files, so mutations reach the validator, not just the lexer.
fn fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("name: x\n".to_string()),
        Just("seed: 3\n".to_string()),
        Just("stages:\n".to_string()),
        Just("  - { id: data, kind: counter, count: 10 }\n".to_string()),
        Just("  - { id: v, kind: views, count: 2 }\n".to_string()),
        Just("  - id: c\n    kind: random_resized_crop\n    size: 32\n".to_string()),
        Just("  - { id: s, kind: null, input: data }\n".to_string()),
        Just("  - { id: x, kind: identity, inputs: [a, b] }\n".to_string()),
        Just("sweep: {a: [1, 2]}\n".to_string()),
        Just("plugins: [lib.so]\n".to_string()),
        "[a-z_]{1,8}: [a-z0-9\\[\\]{}:, -]{0,16}\n",
        "[ -~\\n]{0,12}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        check(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn plausible_documents(parts in proptest::collection::vec(fragment(), 0..12)) {
        check(&parts.concat());
    }

    #[test]
    fn overrides(o in "[a-z.]{0,12}=[ -~]{0,12}") {
        let src = "name: x\nstages:\n  - { id: data, kind: counter, count: 10 }\n";
        if let Ok(spec) = simclr_core::spec::parse(Path::new("x.yaml"), src, &[o]) {
            let _ = simclr_core::validate(spec, &simclr_stages::registry());
        }
    }
}

/// Time-boxed fuzzing: `SIMCLR_FUZZ_SECS=600 cargo test --release --test fuzz_parser -- --ignored --nocapture`.
/// Mixes random bytes, random fragment sequences and byte mutations of the shipped pipelines.
#[test]
#[ignore]
fn fuzz_for_a_while() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let secs: u64 = std::env::var("SIMCLR_FUZZ_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let mut seeds: Vec<Vec<u8>> = Vec::new();
    for dir in ["pipelines", "pipelines/bench", "pipelines/ablations"] {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                if let Ok(b) = std::fs::read(e.path()) {
                    seeds.push(b);
                }
            }
        }
    }
    let mut runner = TestRunner::deterministic();
    let bytes = proptest::collection::vec(any::<u8>(), 0..512);
    let docs = proptest::collection::vec(fragment(), 0..16);
    let mutation = (any::<usize>(), any::<u8>(), 0usize..4);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let mut cases = 0u64;
    while std::time::Instant::now() < deadline {
        for _ in 0..100 {
            let b = bytes.new_tree(&mut runner).map(|t| t.current()).unwrap_or_default();
            check(&String::from_utf8_lossy(&b));
            let d = docs.new_tree(&mut runner).map(|t| t.current()).unwrap_or_default();
            check(&d.concat());
            if !seeds.is_empty() {
                let mut s = seeds[cases as usize % seeds.len()].clone();
                for _ in 0..8 {
                    if let Ok(t) = mutation.new_tree(&mut runner) {
                        let (at, byte, op) = t.current();
                        if s.is_empty() {
                            break;
                        }
                        let at = at % s.len();
                        match op {
                            0 => s[at] = byte,
                            1 => s.insert(at, byte),
                            2 => {
                                s.remove(at);
                            }
                            _ => s.truncate(at),
                        }
                    }
                }
                check(&String::from_utf8_lossy(&s));
            }
            cases += 3;
        }
    }
    eprintln!("fuzzed {cases} inputs in {secs} s without a panic");
}
