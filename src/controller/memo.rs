//! What each object was last converged to in this process: tells drift
//! (the same desired state, yet Synapse needs writes) from a spec change;
//! confirms a convergence even to a reconcile that runs on an object read
//! before its own status write came back through the watch; and remembers a
//! failure so that the status's confirmation, written before it, is not
//! trusted until a convergence succeeds again.

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct ConvergedMemo {
    entries: Mutex<HashMap<String, Entry>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Converged {
        fingerprint: u64,
        confirmed: crate::api::Confirmed,
    },
    Failed,
}

/// A digest of the desired state, stable across processes and releases of
/// the compiler (it is persisted in status): SHA-256 of its `Debug` form,
/// whose maps are all ordered.
pub fn fingerprint(desired: &impl std::fmt::Debug) -> u64 {
    let hash = Sha256::digest(format!("{desired:?}").as_bytes());
    u64::from_be_bytes(hash[..8].try_into().expect("8 bytes"))
}

/// What a status confirmation records: the desired state's fingerprint and
/// the drift mark the convergence answered (a newer mark makes it differ).
pub fn digest(fingerprint: u64, mark: Option<&str>) -> String {
    match mark {
        None => format!("{fingerprint:016x}"),
        Some(mark) => format!("{fingerprint:016x}-{:016x}", self::fingerprint(&mark)),
    }
}

/// Whether a recorded digest was made for this fingerprint (whatever mark).
pub fn digest_answers(digest: &str, fingerprint: u64) -> bool {
    digest.get(..16) == Some(format!("{fingerprint:016x}").as_str())
}

impl ConvergedMemo {
    /// Whether `fingerprint` is what the object was last converged to
    /// (changes found now were then made out of band).
    pub fn same_desired(&self, key: &str, fingerprint: u64) -> bool {
        matches!(self.get(key), Some(Entry::Converged { fingerprint: f, .. }) if f == fingerprint)
    }

    /// The confirmation this process wrote last for the object.
    pub fn confirmed(&self, key: &str) -> Option<crate::api::Confirmed> {
        match self.get(key)? {
            Entry::Converged { confirmed, .. } => Some(confirmed),
            Entry::Failed => None,
        }
    }

    /// Whether the last convergence in this process failed: the status may
    /// still hold the confirmation of an earlier one.
    pub fn failed_last(&self, key: &str) -> bool {
        self.get(key) == Some(Entry::Failed)
    }

    pub fn record(&self, key: &str, fingerprint: u64, confirmed: crate::api::Confirmed) {
        self.set(
            key,
            Entry::Converged {
                fingerprint,
                confirmed,
            },
        );
    }

    pub fn record_failure(&self, key: &str) {
        self.set(key, Entry::Failed);
    }

    /// Forgets an object that is gone.
    pub fn forget(&self, key: &str) {
        self.entries.lock().expect("memo lock").remove(key);
    }

    fn get(&self, key: &str) -> Option<Entry> {
        self.entries.lock().expect("memo lock").get(key).cloned()
    }

    fn set(&self, key: &str, entry: Entry) {
        self.entries
            .lock()
            .expect("memo lock")
            .insert(key.to_string(), entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_the_last_convergence_or_failure() {
        let memo = ConvergedMemo::default();
        assert!(!memo.same_desired("a", 7) && !memo.failed_last("a"));
        let confirmed = crate::api::Confirmed::now(digest(7, None));
        memo.record("a", 7, confirmed.clone());
        assert!(memo.same_desired("a", 7) && !memo.same_desired("a", 8));
        assert_eq!(memo.confirmed("a"), Some(confirmed.clone()));
        memo.record_failure("a");
        assert!(memo.failed_last("a") && !memo.same_desired("a", 7));
        assert_eq!(memo.confirmed("a"), None);
        memo.record("a", 7, confirmed);
        assert!(!memo.failed_last("a"));
        memo.forget("a");
        assert!(!memo.same_desired("a", 7));
    }

    #[test]
    fn fingerprints_and_digests_are_stable_and_follow_the_mark() {
        // Persisted in status: the same value in every process and release
        // (SHA-256 of `("room", 1)`, its first eight bytes).
        assert_eq!(fingerprint(&("room", 1)), 0x279c_5ec2_8543_08da);
        assert_eq!(digest(0xab, None), "00000000000000ab");
        assert_ne!(digest(0xab, Some("$e1")), digest(0xab, Some("$e2")));
        assert!(digest_answers(&digest(0xab, Some("$e1")), 0xab));
        assert!(digest_answers(&digest(0xab, None), 0xab));
        assert!(!digest_answers(&digest(0xac, None), 0xab));
    }
}
