//! Secondary indexes over a watch cache: which objects carry a key (the
//! permissions of a room, the users claiming a localpart…), so lookups cost
//! what they return instead of a scan of every object. I/O-free: fed the
//! watch's events before the reflector stores them, so an index is never
//! behind the cache a reconcile reads (a reconcile triggered by an event
//! finds that event's object in both).

use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

/// `(namespace, name)` of an indexed object.
type ObjectKey = (String, String);

/// The keys an object is found under. Must depend only on the object.
pub type KeysOf<K> = fn(&K) -> Vec<String>;

/// One secondary index of a kind.
pub struct Index<K> {
    keys_of: KeysOf<K>,
    state: RwLock<State>,
}

/// Keys holding at most this many objects keep them in a sorted vector.
const FEW: usize = 8;

/// The objects under one key, in order. Most keys hold one object (a
/// localpart, an email, a user's permissions): a sorted vector costs what it
/// holds, where a B-tree allocates a node of eleven for the first. A key
/// that grows past `FEW` (a room's permissions) moves to a B-tree, so an
/// insert stays logarithmic.
enum Members {
    Few(Vec<ObjectKey>),
    Many(BTreeSet<ObjectKey>),
}

impl Default for Members {
    fn default() -> Self {
        Members::Few(Vec::new())
    }
}

impl Members {
    fn insert(&mut self, object: ObjectKey) {
        match self {
            Members::Few(few) => match few.binary_search(&object) {
                Ok(_) => {}
                Err(at) if few.len() < FEW => {
                    few.reserve_exact(1);
                    few.insert(at, object);
                }
                Err(_) => {
                    let mut many: BTreeSet<ObjectKey> = std::mem::take(few).into_iter().collect();
                    many.insert(object);
                    *self = Members::Many(many);
                }
            },
            Members::Many(many) => {
                many.insert(object);
            }
        }
    }

    fn remove(&mut self, object: &ObjectKey) {
        match self {
            Members::Few(few) => {
                if let Ok(at) = few.binary_search(object) {
                    few.remove(at);
                }
            }
            Members::Many(many) => {
                many.remove(object);
            }
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Members::Few(few) => few.is_empty(),
            Members::Many(many) => many.is_empty(),
        }
    }

    fn iter(&self) -> impl Iterator<Item = &ObjectKey> {
        let (few, many) = match self {
            Members::Few(few) => (Some(few.iter()), None),
            Members::Many(many) => (None, Some(many.iter())),
        };
        few.into_iter().flatten().chain(many.into_iter().flatten())
    }
}

#[derive(Default)]
struct State {
    objects: HashMap<String, Members>,
    keys: HashMap<ObjectKey, Vec<String>>,
    /// A relist in progress: the objects it has delivered so far. The
    /// current entries stay readable until it is done, as the store's do.
    relist: Option<Vec<(ObjectKey, Vec<String>)>>,
}

impl State {
    fn insert(&mut self, object: ObjectKey, keys: Vec<String>) {
        self.remove(&object);
        for k in &keys {
            self.objects
                .entry(k.clone())
                .or_default()
                .insert(object.clone());
        }
        self.keys.insert(object, keys);
    }

    fn remove(&mut self, object: &ObjectKey) {
        let Some(keys) = self.keys.remove(object) else {
            return;
        };
        for k in keys {
            if let Some(set) = self.objects.get_mut(&k) {
                set.remove(object);
                if set.is_empty() {
                    self.objects.remove(&k);
                }
            }
        }
    }
}

fn object_key<K: Resource>(k: &K) -> ObjectKey {
    (k.namespace().unwrap_or_default(), k.name_any())
}

impl<K> Index<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    pub fn new(keys_of: KeysOf<K>) -> Arc<Self> {
        Arc::new(Index {
            keys_of,
            state: RwLock::default(),
        })
    }

    /// Folds one watch event in.
    pub fn observe(&self, event: &watcher::Event<K>) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        match event {
            watcher::Event::Apply(k) => state.insert(object_key(k), (self.keys_of)(k)),
            watcher::Event::Delete(k) => state.remove(&object_key(k)),
            watcher::Event::Init => state.relist = Some(Vec::new()),
            watcher::Event::InitApply(k) => {
                let entry = (object_key(k), (self.keys_of)(k));
                match state.relist.as_mut() {
                    Some(relist) => relist.push(entry),
                    None => state.insert(entry.0, entry.1),
                }
            }
            watcher::Event::InitDone => {
                let relist = state.relist.take().unwrap_or_default();
                let mut fresh = State::default();
                for (object, keys) in relist {
                    fresh.insert(object, keys);
                }
                *state = fresh;
            }
        }
    }

    /// The objects found under `key`, as references.
    pub fn refs(&self, key: &str) -> Vec<ObjectRef<K>> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state
            .objects
            .get(key)
            .into_iter()
            .flat_map(Members::iter)
            .map(|(ns, name)| {
                let r = ObjectRef::new(name);
                if ns.is_empty() {
                    r
                } else {
                    r.within(ns)
                }
            })
            .collect()
    }

    /// The objects found under `key`, read from `store` (an object the
    /// store has not received yet is left out: its own event follows).
    pub fn get(&self, store: &Store<K>, key: &str) -> Vec<Arc<K>> {
        self.refs(key).iter().filter_map(|r| store.get(r)).collect()
    }

    /// How many keys the index holds (for tests and metrics).
    pub fn len(&self) -> usize {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .objects
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The keys each kind is indexed under, in one place so that writers and
/// readers agree.
pub mod keys {
    use crate::api::{MatrixRoom, MatrixUser, MatrixUserGrant, RoomPermission};
    use kube::ResourceExt;

    pub fn permission(p: &RoomPermission) -> Vec<String> {
        let ns = p.namespace().unwrap_or_default();
        let mut keys = vec![
            permissions_of_room(&ns, &p.spec.room_ref.name),
            permissions_of_user(p.user_namespace(), &p.spec.user_ref.name),
        ];
        if p.crosses_namespaces() {
            keys.push(permissions_into(p.user_namespace()));
        }
        keys
    }

    /// Permissions naming a user of `namespace` from another namespace:
    /// the ones its grants decide.
    pub fn permissions_into(namespace: &str) -> String {
        format!("into/{namespace}")
    }

    pub fn grant(g: &MatrixUserGrant) -> Vec<String> {
        vec![grants_in(&g.namespace().unwrap_or_default())]
    }

    pub fn grants_in(namespace: &str) -> String {
        format!("grants/{namespace}")
    }

    pub fn permissions_of_room(namespace: &str, room: &str) -> String {
        format!("room/{namespace}/{room}")
    }

    pub fn permissions_of_user(namespace: &str, user: &str) -> String {
        format!("user/{namespace}/{user}")
    }

    /// The `Ready` reason of an object refused its email or subject: such
    /// objects decide again whenever a claimant changes.
    fn refused(u: &MatrixUser) -> Option<&str> {
        let status = u.status.as_ref()?;
        let ready =
            crate::api::conditions::find(&status.conditions, crate::api::conditions::READY)?;
        Some(ready.reason.as_str())
    }

    pub fn user(u: &MatrixUser) -> Vec<String> {
        let mut keys = vec![localpart(&u.spec.localpart)];
        if let Some(e) = &u.spec.email {
            keys.push(email(e));
        }
        if let Some(s) = &u.spec.subject {
            keys.push(subject(s));
        }
        match refused(u) {
            Some("EmailConflict") => keys.extend(u.spec.email.as_deref().map(refused_email)),
            Some("SubjectConflict") => keys.push(refused_subject(u.spec.subject.as_deref())),
            _ => {}
        }
        keys
    }

    pub fn localpart(localpart: &str) -> String {
        format!("localpart/{localpart}")
    }

    /// Emails compare without case.
    pub fn email(email: &str) -> String {
        format!("email/{}", email.to_lowercase())
    }

    /// Subjects are per tenant; the tenant is a namespace label, so readers
    /// filter the candidates by it.
    pub fn subject(subject: &str) -> String {
        format!("subject/{subject}")
    }

    /// Objects refused `email`: a change to a claimant of that address
    /// wakes them, and no one else.
    pub fn refused_email(email: &str) -> String {
        format!("refused/EmailConflict/{}", email.to_lowercase())
    }

    pub fn refused_subject(subject: Option<&str>) -> String {
        format!("refused/SubjectConflict/{}", subject.unwrap_or_default())
    }

    pub fn room(r: &MatrixRoom) -> Vec<String> {
        let ns = r.namespace().unwrap_or_default();
        let mut keys = vec![alias(&r.spec.alias)];
        if let Some(parent) = &r.spec.parent_ref {
            keys.push(children_of(&ns, &parent.name));
        }
        keys
    }

    /// The feed's key: the Matrix room id a room's status names.
    pub fn room_by_id(r: &MatrixRoom) -> Vec<String> {
        r.status
            .as_ref()
            .and_then(|s| s.room_id.as_deref())
            .map(room_id)
            .into_iter()
            .collect()
    }

    /// The feed's keys: the room id, and the parent whose departures
    /// concern the room.
    pub fn room_feed(r: &MatrixRoom) -> Vec<String> {
        let mut keys = room_by_id(r);
        if let Some(parent) = &r.spec.parent_ref {
            keys.push(children_of(
                &r.namespace().unwrap_or_default(),
                &parent.name,
            ));
        }
        keys
    }

    pub fn room_id(room_id: &str) -> String {
        format!("roomid/{room_id}")
    }

    pub fn alias(alias: &str) -> String {
        format!("alias/{alias}")
    }

    pub fn children_of(namespace: &str, parent: &str) -> String {
        format!("parent/{namespace}/{parent}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::RoomPermission;

    fn perm(name: &str, room: &str) -> RoomPermission {
        let mut p = RoomPermission::new(
            name,
            serde_json::from_value(serde_json::json!({
                "roomRef": {"name": room}, "userRef": {"name": "u"}
            }))
            .unwrap(),
        );
        p.metadata.namespace = Some("t".into());
        p
    }

    fn by_room(p: &RoomPermission) -> Vec<String> {
        vec![format!("room/{}", p.spec.room_ref.name)]
    }

    fn names(index: &Index<RoomPermission>, key: &str) -> Vec<String> {
        index.refs(key).into_iter().map(|r| r.name).collect()
    }

    #[test]
    fn a_key_keeps_its_objects_in_order_as_it_grows_past_a_few_and_shrinks() {
        let index = Index::new(by_room);
        let many: Vec<String> = (0..3 * FEW).rev().map(|i| format!("p{i:02}")).collect();
        for name in &many {
            index.observe(&watcher::Event::Apply(perm(name, "r")));
            // Applied again: still once.
            index.observe(&watcher::Event::Apply(perm(name, "r")));
        }
        let mut sorted = many.clone();
        sorted.sort();
        assert_eq!(names(&index, "room/r"), sorted);
        for name in &many {
            index.observe(&watcher::Event::Delete(perm(name, "r")));
        }
        assert!(names(&index, "room/r").is_empty());
        assert!(index.is_empty());

        index.observe(&watcher::Event::Apply(perm("b", "r")));
        index.observe(&watcher::Event::Apply(perm("a", "r")));
        index.observe(&watcher::Event::Delete(perm("b", "r")));
        assert_eq!(names(&index, "room/r"), ["a"]);
    }

    #[test]
    fn an_object_moves_between_keys_and_leaves_on_delete() {
        let index = Index::new(by_room);
        index.observe(&watcher::Event::Apply(perm("a", "r1")));
        index.observe(&watcher::Event::Apply(perm("b", "r1")));
        assert_eq!(names(&index, "room/r1"), ["a", "b"]);
        index.observe(&watcher::Event::Apply(perm("a", "r2")));
        assert_eq!(names(&index, "room/r1"), ["b"]);
        assert_eq!(names(&index, "room/r2"), ["a"]);
        index.observe(&watcher::Event::Delete(perm("b", "r1")));
        assert!(names(&index, "room/r1").is_empty());
        assert_eq!(index.len(), 1, "empty keys are dropped");
        assert_eq!(index.refs("room/r2")[0].namespace.as_deref(), Some("t"));
    }

    #[test]
    fn a_relist_replaces_everything_only_when_done() {
        let index = Index::new(by_room);
        index.observe(&watcher::Event::Apply(perm("gone", "r1")));
        index.observe(&watcher::Event::Init);
        index.observe(&watcher::Event::InitApply(perm("new", "r1")));
        // Mid-relist the old entries still answer, as the store's do.
        assert_eq!(names(&index, "room/r1"), ["gone"]);
        index.observe(&watcher::Event::InitDone);
        assert_eq!(names(&index, "room/r1"), ["new"]);
    }

    #[test]
    fn lookups_read_the_store_and_skip_what_it_lacks() {
        let index = Index::new(by_room);
        let (store, mut writer) = kube::runtime::reflector::store::<RoomPermission>();
        let stored = watcher::Event::Apply(perm("a", "r1"));
        index.observe(&stored);
        writer.apply_watcher_event(&stored);
        // Indexed before the store has it: left out until it arrives.
        index.observe(&watcher::Event::Apply(perm("b", "r1")));
        let found: Vec<String> = index
            .get(&store, "room/r1")
            .iter()
            .map(|p| p.name_any())
            .collect();
        assert_eq!(found, ["a"]);
    }
}
