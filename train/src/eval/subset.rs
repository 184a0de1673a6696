//! The labeled subsets of the semi-supervised protocol (the paper's 1% and 10% of ImageNet):
//! class-balanced and deterministic.
//!
//! Each sample gets a rank from the pipeline seed and its dataset index alone (not from the
//! stage, the thread count or the order samples arrive in), and each class keeps its
//! `round(fraction x n_class)` best-ranked samples (at least one). So every stage that asks for
//! the same fraction of the same dataset under the same seed (fine-tuning, the linear probe,
//! training from scratch) gets the same samples, and a smaller fraction is a subset of a
//! larger one.

use std::collections::{BTreeMap, BTreeSet};

/// A labeled subset: the dataset indices kept, and how many per class.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Subset {
    pub indices: BTreeSet<u64>,
    /// Kept samples per class (class -> count), for every class present in the data.
    pub per_class: BTreeMap<u32, usize>,
}

impl Subset {
    pub fn contains(&self, index: u64) -> bool {
        self.indices.contains(&index)
    }
    pub fn len(&self) -> usize {
        self.indices.len()
    }
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }
}

/// splitmix64's finalizer: a well-mixed 64-bit hash.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The rank of sample `index` under `seed` (lower is kept first).
fn rank(seed: u64, index: u64) -> u64 {
    mix(mix(seed ^ 0x5EED_5AB5_E7C0_FFEE).wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
}

/// The class-balanced subset of `fraction` of `items` (dataset index, label); `fraction` is in
/// (0, 1] (1 keeps everything). Repeated indices count once.
pub fn balanced(items: impl IntoIterator<Item = (u64, u32)>, fraction: f64, seed: u64) -> Subset {
    let mut by_class: BTreeMap<u32, BTreeSet<(u64, u64)>> = BTreeMap::new();
    for (index, label) in items {
        by_class.entry(label).or_default().insert((rank(seed, index), index));
    }
    let mut out = Subset::default();
    for (class, ranked) in by_class {
        let n = ranked.len();
        let keep = if fraction >= 1.0 { n } else { ((fraction * n as f64).round() as usize).clamp(1, n) };
        out.indices.extend(ranked.iter().take(keep).map(|&(_, i)| i));
        out.per_class.insert(class, keep);
    }
    out
}

/// `10` for 0.1, `1` for 0.01, `12.5` for 0.125: the percentage in result keys
/// (`finetune_10pct_top1`).
pub fn pct(fraction: f64) -> String {
    let p = (fraction * 1000.0).round() / 10.0;
    if p.fract() == 0.0 {
        format!("{}", p as u64)
    } else {
        format!("{p}")
    }
}

/// What makes a labeled subset too thin to support a claim, as warnings (empty if none):
/// fewer than two samples per class, or classes (of `classes`) with none at all.
pub fn thin(subset: &Subset, classes: usize) -> Vec<String> {
    let mut out = Vec::new();
    if subset.len() < 2 * classes {
        out.push(format!(
            "{} labeled samples for {classes} classes (fewer than 2 per class): the accuracy says little; raise `label_fraction` or use more data",
            subset.len()
        ));
    }
    let missing: Vec<String> =
        (0..classes as u32).filter(|c| !subset.per_class.contains_key(c)).map(|c| c.to_string()).collect();
    if !missing.is_empty() {
        out.push(format!(
            "class{} {} never appear{} in the labeled data: the classifier cannot predict {}",
            if missing.len() == 1 { "" } else { "es" },
            missing.join(", "),
            if missing.len() == 1 { "s" } else { "" },
            if missing.len() == 1 { "it" } else { "them" }
        ));
    }
    out
}

/// A warning when training accuracy (percent) is near chance for `classes` classes.
pub fn near_chance(train_acc: f64, classes: usize) -> Option<String> {
    let chance = 100.0 / classes.max(1) as f64;
    (train_acc < 1.5 * chance).then(|| {
        format!(
            "training accuracy {train_acc:.1}% is near chance ({chance:.1}%): the model did not fit its training data; train longer or raise the learning rate"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn items(n: u64, classes: u32) -> Vec<(u64, u32)> {
        // Unequal classes: label from a hash, not index % classes.
        (0..n).map(|i| (i, (mix(i) % u64::from(classes)) as u32)).collect()
    }

    #[test]
    fn each_class_keeps_its_share() {
        let data = items(2000, 6);
        let s = balanced(data.clone(), 0.1, 42);
        for c in 0..6u32 {
            let n = data.iter().filter(|(_, l)| *l == c).count();
            let kept = data.iter().filter(|(i, l)| *l == c && s.contains(*i)).count();
            assert_eq!(kept, ((n as f64) * 0.1).round() as usize, "class {c}");
            assert_eq!(s.per_class[&c], kept);
        }
        assert!(s.len() > 190 && s.len() < 210, "{}", s.len());
    }

    #[test]
    fn the_seed_changes_the_draw() {
        let data = items(1000, 4);
        assert_ne!(balanced(data.clone(), 0.1, 1).indices, balanced(data, 0.1, 2).indices);
    }

    #[test]
    fn tiny_classes_keep_one_and_full_keeps_all() {
        let data = vec![(0, 0), (1, 0), (2, 1), (3, 0)];
        let s = balanced(data.clone(), 0.01, 7);
        assert_eq!(s.per_class[&0], 1);
        assert_eq!(s.per_class[&1], 1);
        assert_eq!(balanced(data, 1.0, 7).len(), 4);
    }

    #[test]
    fn thin_subsets_and_chance_are_flagged() {
        let s = balanced(vec![(0, 0), (1, 0), (2, 1)], 1.0, 0);
        let w = thin(&s, 3);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("3 labeled samples for 3 classes"));
        assert!(w[1].contains("class 2 never appears"));
        assert!(thin(&balanced(items(600, 3), 0.1, 0), 3).is_empty());
        assert!(near_chance(20.0, 6).is_some() && near_chance(60.0, 6).is_none());
    }

    #[test]
    fn pct_names() {
        assert_eq!(pct(0.1), "10");
        assert_eq!(pct(0.01), "1");
        assert_eq!(pct(0.125), "12.5");
        assert_eq!(pct(1.0), "100");
    }

    proptest! {
        /// The subset depends on the items, not on their order; a smaller fraction is inside a
        /// larger one; it only holds given indices.
        #[test]
        fn order_free_nested_and_inside(n in 1u64..400, classes in 1u32..8, seed: u64, a in 0.01f64..1.0, b in 0.01f64..1.0) {
            let data = items(n, classes);
            let mut reversed = data.clone();
            reversed.reverse();
            let (lo, hi) = if a < b { (a, b) } else { (b, a) };
            let small = balanced(data.clone(), lo, seed);
            prop_assert_eq!(&small, &balanced(reversed, lo, seed));
            let large = balanced(data, hi, seed);
            prop_assert!(small.indices.is_subset(&large.indices));
            prop_assert!(large.indices.iter().all(|&i| i < n));
        }
    }
}
