//! Values stages hand to later stages of the same run: a trained encoder, a data source that
//! an evaluation reads, the run's final metrics.
//!
//! Artifacts live in memory for the run (one process). They are keyed by the producing
//! stage's id, which is what a config's reference field (`encoder: train`) names.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Map, Value};

type Store = HashMap<String, Arc<dyn Any + Send + Sync>>;

/// The artifacts of one run; cheap to clone (shared).
#[derive(Clone, Default)]
pub struct Artifacts {
    store: Arc<Mutex<Store>>,
    results: Arc<Mutex<Map<String, Value>>>,
}

impl fmt::Debug for Artifacts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut keys: Vec<String> = lock(&self.store).keys().cloned().collect();
        keys.sort();
        f.debug_struct("Artifacts").field("ids", &keys).finish()
    }
}

/// A poisoned lock only means another stage panicked; the map itself is still consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Artifacts {
    /// Stores `value` as the artifact of stage `id` (replacing an earlier one).
    pub fn put<T: Any + Send + Sync>(&self, id: &str, value: T) {
        lock(&self.store).insert(id.to_string(), Arc::new(value));
    }

    /// The artifact of stage `id`, if it has one of type `T`.
    pub fn get<T: Any + Send + Sync>(&self, id: &str) -> Option<Arc<T>> {
        let any = lock(&self.store).get(id).cloned()?;
        any.downcast::<T>().ok()
    }

    /// Whether stage `id` has produced an artifact (of any type).
    pub fn contains(&self, id: &str) -> bool {
        lock(&self.store).contains_key(id)
    }

    /// Records final metrics under `group` (a method such as `simclr`), merging with what is
    /// there: `results.json` holds `{group: {metric: value}}`.
    pub fn record(&self, group: &str, metrics: Map<String, Value>) {
        let mut r = lock(&self.results);
        let entry = r.entry(group.to_string()).or_insert_with(|| Value::Object(Map::new()));
        if !entry.is_object() {
            *entry = Value::Object(Map::new());
        }
        if let Value::Object(m) = entry {
            m.extend(metrics);
        }
    }

    /// Records metrics under `outer.inner` (e.g. `encoders.train`), merging.
    pub fn record_in(&self, outer: &str, inner: &str, metrics: Map<String, Value>) {
        let mut r = lock(&self.results);
        let o = r.entry(outer.to_string()).or_insert_with(|| Value::Object(Map::new()));
        if !o.is_object() {
            *o = Value::Object(Map::new());
        }
        if let Value::Object(o) = o {
            let e = o.entry(inner.to_string()).or_insert_with(|| Value::Object(Map::new()));
            if !e.is_object() {
                *e = Value::Object(Map::new());
            }
            if let Value::Object(m) = e {
                m.extend(metrics);
            }
        }
    }

    /// Appends `item` to the list under `key` (e.g. one entry per evaluation).
    pub fn push(&self, key: &str, item: Value) {
        let mut r = lock(&self.results);
        let entry = r.entry(key.to_string()).or_insert_with(|| Value::Array(Vec::new()));
        if !entry.is_array() {
            *entry = Value::Array(Vec::new());
        }
        if let Value::Array(a) = entry {
            a.push(item);
        }
    }

    /// Everything recorded so far.
    pub fn results(&self) -> Map<String, Value> {
        lock(&self.results).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_get_and_merged_results() {
        let a = Artifacts::default();
        a.put("train", 7u32);
        assert_eq!(a.get::<u32>("train").as_deref(), Some(&7));
        assert!(a.get::<String>("train").is_none(), "wrong type is None, not a panic");
        assert!(a.get::<u32>("other").is_none());
        let b = a.clone();
        b.record("simclr", serde_json::json!({"linear_top1": 50.0}).as_object().cloned().unwrap_or_default());
        a.record("simclr", serde_json::json!({"knn_top1": 40.0}).as_object().cloned().unwrap_or_default());
        a.push("evals", serde_json::json!({"stage": "linear"}));
        let r = b.results();
        assert_eq!(r["simclr"]["linear_top1"], 50.0);
        assert_eq!(r["simclr"]["knn_top1"], 40.0);
        assert_eq!(r["evals"][0]["stage"], "linear");
    }
}
