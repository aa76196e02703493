//! The controllers' work queues, counted: objects that a change has queued
//! for a reconcile which has not started yet, by kind. kube-runtime keeps
//! its queue to itself, so the triggers note what they queue and a
//! reconcile's start takes it off. A standby's queue holds what it will
//! reconcile when it wins the lease.

use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

/// Whether an object (`namespace/name`) is still in its kind's cache.
type Present = Box<dyn Fn(&str) -> bool + Send + Sync>;

#[derive(Default)]
pub struct Queued {
    pending: Mutex<BTreeMap<&'static str, HashSet<String>>>,
    caches: Mutex<Vec<(&'static str, Present)>>,
}

impl std::fmt::Debug for Queued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Queued")
    }
}

fn ref_key<K: Resource>(r: &ObjectRef<K>) -> String {
    format!("{}/{}", r.namespace.as_deref().unwrap_or_default(), r.name)
}

impl Queued {
    /// Counts `kind`'s queue against `cache`: an object that left it before
    /// its reconcile (kube-runtime drops those) leaves the queue too.
    pub fn watching<K>(&self, kind: &'static str, cache: Store<K>)
    where
        K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
    {
        let present: Present = Box::new(move |key: &str| {
            let (ns, name) = key.split_once('/').unwrap_or(("", key));
            let r = ObjectRef::new(name);
            let r = if ns.is_empty() { r } else { r.within(ns) };
            cache.get(&r).is_some()
        });
        self.lock_caches().push((kind, present));
    }

    /// Notes the objects a trigger queues, and hands them on.
    pub fn note<K: Resource>(
        &self,
        kind: &'static str,
        refs: impl IntoIterator<Item = ObjectRef<K>>,
    ) -> Vec<ObjectRef<K>> {
        let refs: Vec<ObjectRef<K>> = refs.into_iter().collect();
        let mut pending = self.lock_pending();
        let queue = pending.entry(kind).or_default();
        queue.extend(refs.iter().map(ref_key));
        refs
    }

    /// Notes an object whose own change queues it.
    pub fn note_object<K: Resource>(&self, kind: &'static str, object: &K) {
        let key = format!(
            "{}/{}",
            object.namespace().unwrap_or_default(),
            object.name_any()
        );
        self.lock_pending().entry(kind).or_default().insert(key);
    }

    /// A reconcile of `key` (`namespace/name`) starts: off the queue.
    pub fn taken(&self, kind: &'static str, key: &str) {
        if let Some(queue) = self.lock_pending().get_mut(kind) {
            queue.remove(key);
        }
    }

    /// Each watched kind's queue depth, leaving out (and forgetting)
    /// objects no longer in their cache.
    pub fn depths(&self) -> Vec<(&'static str, usize)> {
        let caches = self.lock_caches();
        let mut pending = self.lock_pending();
        caches
            .iter()
            .map(|(kind, present)| {
                let queue = pending.entry(kind).or_default();
                queue.retain(|key| present(key));
                (*kind, queue.len())
            })
            .collect()
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, HashSet<String>>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_caches(&self) -> std::sync::MutexGuard<'_, Vec<(&'static str, Present)>> {
        self.caches.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::MatrixRoom;
    use kube::runtime::{reflector, watcher};

    fn room(name: &str) -> MatrixRoom {
        let mut r = MatrixRoom::new(
            name,
            serde_json::from_value(serde_json::json!({"alias": name})).unwrap(),
        );
        r.metadata.namespace = Some("t".into());
        r
    }

    #[test]
    fn queued_objects_count_until_their_reconcile_starts_or_they_leave() {
        let (store, mut writer) = reflector::store();
        for name in ["a", "b"] {
            writer.apply_watcher_event(&watcher::Event::Apply(room(name)));
        }
        let queued = Queued::default();
        queued.watching("MatrixRoom", store);
        assert_eq!(queued.depths(), [("MatrixRoom", 0)]);

        queued.note_object("MatrixRoom", &room("a"));
        let handed_on = queued.note(
            "MatrixRoom",
            [
                ObjectRef::<MatrixRoom>::new("a").within("t"),
                ObjectRef::new("b").within("t"),
            ],
        );
        assert_eq!(handed_on.len(), 2);
        assert_eq!(queued.depths(), [("MatrixRoom", 2)], "one entry per object");

        queued.taken("MatrixRoom", "t/a");
        assert_eq!(queued.depths(), [("MatrixRoom", 1)]);
        // Gone from the cache before its reconcile: gone from the queue.
        writer.apply_watcher_event(&watcher::Event::Delete(room("b")));
        assert_eq!(queued.depths(), [("MatrixRoom", 0)]);
    }
}
