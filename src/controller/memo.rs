//! What each object was last converged to. A reconcile whose only cause is
//! the operator's own status write (same resourceVersion, same desired
//! state, recently converged) skips Synapse entirely; the periodic resync is
//! always older than the freshness window, so it still reads.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
pub struct ConvergedMemo {
    entries: Mutex<HashMap<String, Entry>>,
}

#[derive(Debug, Clone)]
struct Entry {
    /// resourceVersions our own writes produced (finalizer, status).
    own_versions: Vec<String>,
    fingerprint: u64,
    /// The out-of-band change (drift mark) the convergence answered: one
    /// marked meanwhile is never taken for our own status write.
    mark: Option<String>,
    at: Instant,
}

/// A stable digest of the desired state.
pub fn fingerprint(desired: &impl std::fmt::Debug) -> u64 {
    let mut h = DefaultHasher::new();
    format!("{desired:?}").hash(&mut h);
    h.finish()
}

impl ConvergedMemo {
    /// Whether nothing can have changed since the last convergence.
    pub fn is_fresh(
        &self,
        key: &str,
        resource_version: Option<&str>,
        fingerprint: u64,
        mark: Option<&str>,
        window: Duration,
    ) -> bool {
        let entries = self.entries.lock().expect("memo lock");
        entries.get(key).is_some_and(|e| {
            resource_version.is_some_and(|v| e.own_versions.iter().any(|o| o == v))
                && e.fingerprint == fingerprint
                && e.mark.as_deref() == mark
                && e.at.elapsed() < window
        })
    }

    /// Whether `fingerprint` is what the object was last converged to
    /// (changes found now were then made out of band).
    pub fn same_desired(&self, key: &str, fingerprint: u64) -> bool {
        self.entries
            .lock()
            .expect("memo lock")
            .get(key)
            .is_some_and(|e| e.fingerprint == fingerprint)
    }

    pub fn record(
        &self,
        key: &str,
        own_versions: impl IntoIterator<Item = Option<String>>,
        fingerprint: u64,
        mark: Option<String>,
    ) {
        let own_versions = own_versions.into_iter().flatten().collect();
        let entry = Entry {
            own_versions,
            fingerprint,
            mark,
            at: Instant::now(),
        };
        self.entries
            .lock()
            .expect("memo lock")
            .insert(key.to_string(), entry);
    }

    pub fn forget(&self, key: &str) {
        self.entries.lock().expect("memo lock").remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_only_for_same_version_and_desired_within_window() {
        let memo = ConvergedMemo::default();
        let window = Duration::from_secs(60);
        assert!(!memo.is_fresh("a", Some("1"), 7, None, window));
        memo.record("a", [Some("0".into()), Some("1".into())], 7, None);
        assert!(
            memo.is_fresh("a", Some("0"), 7, None, window),
            "our finalizer write"
        );
        assert!(memo.is_fresh("a", Some("1"), 7, None, window));
        assert!(
            !memo.is_fresh("a", Some("2"), 7, None, window),
            "someone else wrote the object"
        );
        assert!(
            !memo.is_fresh("a", Some("1"), 8, None, window),
            "desired state moved"
        );
        assert!(
            !memo.is_fresh("a", Some("1"), 7, None, Duration::ZERO),
            "periodic resync reads"
        );
        // Drift marked while the convergence ran: the object the reconcile
        // runs again on carries our status write's version, and the new mark.
        assert!(
            !memo.is_fresh("a", Some("1"), 7, Some("$drift"), window),
            "a drift mark the convergence did not answer"
        );
        memo.record("a", [Some("3".into())], 7, Some("$drift".into()));
        assert!(memo.is_fresh("a", Some("3"), 7, Some("$drift"), window));
        assert!(memo.same_desired("a", 7));
        memo.forget("a");
        assert!(!memo.same_desired("a", 7));
    }
}
