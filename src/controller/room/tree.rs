//! Spaces and their children, resolved from the room cache: I/O-free, so the
//! shell passes in a lookup over what its watch holds.

use super::plan::ChildLink;
use crate::api::MatrixRoom;
use kube::ResourceExt;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// The reason of a room whose parent object does not exist (or is being deleted).
pub const PARENT_NOT_FOUND: &str = "ParentNotFound";

/// What a room's `parentRef` comes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parent {
    /// No parent.
    None,
    /// The parent space's room id.
    Ready(String),
    /// The parent is not there yet (or has no room yet): resolves by itself.
    Waiting {
        reason: &'static str,
        message: String,
    },
    /// The spec cannot be converged until it (or the parent's) changes.
    Refused {
        reason: &'static str,
        message: String,
    },
}

/// Resolves `room`'s parent within its namespace. `lookup` finds a room of
/// the same namespace by name. A parent chain that comes back to `room` is a
/// cycle; chains are walked at most as deep as there are rooms.
pub fn parent(room: &MatrixRoom, lookup: impl Fn(&str) -> Option<Arc<MatrixRoom>>) -> Parent {
    let Some(parent_ref) = &room.spec.parent_ref else {
        return Parent::None;
    };
    let me = room.name_any();
    if parent_ref.name == me {
        return Parent::Refused {
            reason: "ParentCycle",
            message: "a room cannot be its own parent".into(),
        };
    }
    let Some(parent) = lookup(&parent_ref.name).filter(|p| p.metadata.deletion_timestamp.is_none())
    else {
        return Parent::Waiting {
            reason: PARENT_NOT_FOUND,
            message: format!("parent MatrixRoom {} does not exist", parent_ref.name),
        };
    };
    if !parent.spec.is_space() {
        return Parent::Refused {
            reason: "ParentNotSpace",
            message: format!(
                "parent MatrixRoom {} is not a space (type: Space)",
                parent_ref.name
            ),
        };
    }
    // Walk up from the parent: coming back to this room is a cycle.
    let mut seen = BTreeSet::from([me.clone()]);
    let mut next = parent.spec.parent_ref.as_ref().map(|r| r.name.clone());
    while let Some(name) = next {
        if name == me {
            return Parent::Refused {
                reason: "ParentCycle",
                message: format!(
                    "the parent chain through {} comes back to this room",
                    parent_ref.name
                ),
            };
        }
        if !seen.insert(name.clone()) {
            // A cycle above us that does not include us: theirs to report.
            break;
        }
        next = lookup(&name).and_then(|r| r.spec.parent_ref.as_ref().map(|p| p.name.clone()));
    }
    match parent.status.as_ref().and_then(|s| s.room_id.clone()) {
        Some(id) => Parent::Ready(id),
        None => Parent::Waiting {
            reason: "ParentNotReady",
            message: format!("parent space {} has no room yet", parent_ref.name),
        },
    }
}

/// A space's children: the rooms of its namespace that name it as parent,
/// are not being deleted and have a room. `rooms` is the namespace's rooms.
pub fn children<'a>(
    space: &MatrixRoom,
    rooms: impl IntoIterator<Item = &'a Arc<MatrixRoom>>,
) -> BTreeMap<String, ChildLink> {
    let name = space.name_any();
    rooms
        .into_iter()
        .filter(|r| r.metadata.deletion_timestamp.is_none())
        .filter_map(|r| {
            let p = r.spec.parent_ref.as_ref().filter(|p| p.name == name)?;
            let id = r.status.as_ref()?.room_id.clone()?;
            Some((
                id,
                ChildLink {
                    order: p.order.clone(),
                    suggested: p.suggested,
                },
            ))
        })
        .collect()
}

/// Which room names which parent, maintained from watch events, so that a
/// room's change reaches its parent (children come and go) and its children
/// (the parent's room id appears) without scanning every room, and a
/// re-parented room still reaches the parent it left.
#[derive(Debug, Default)]
pub struct SpaceIndex {
    parent_of: HashMap<(String, String), String>,
    children_of: HashMap<(String, String), BTreeSet<String>>,
}

impl SpaceIndex {
    /// Records the room `name` of `ns` as naming `parent` (`None`: none, or
    /// the room is gone) and returns the rooms of `ns` to reconcile: its
    /// parents old and new, and its children.
    pub fn update(&mut self, ns: &str, name: &str, parent: Option<&str>) -> Vec<String> {
        let key = (ns.to_string(), name.to_string());
        let mut out = Vec::new();
        let old = match parent {
            Some(p) => self.parent_of.insert(key.clone(), p.to_string()),
            None => self.parent_of.remove(&key),
        };
        if let Some(old) = old.filter(|o| Some(o.as_str()) != parent) {
            let old_key = (ns.to_string(), old.clone());
            if let Some(set) = self.children_of.get_mut(&old_key) {
                set.remove(name);
                if set.is_empty() {
                    self.children_of.remove(&old_key);
                }
            }
            out.push(old);
        }
        if let Some(p) = parent {
            self.children_of
                .entry((ns.to_string(), p.to_string()))
                .or_default()
                .insert(name.to_string());
            out.push(p.to_string());
        }
        out.extend(self.children_of.get(&key).into_iter().flatten().cloned());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::MatrixRoomStatus;
    use serde_json::json;

    fn room(name: &str, spec: serde_json::Value, room_id: Option<&str>) -> Arc<MatrixRoom> {
        let mut full = json!({"alias": name});
        full.as_object_mut()
            .unwrap()
            .extend(spec.as_object().unwrap().clone());
        let mut r = MatrixRoom::new(name, serde_json::from_value(full).unwrap());
        r.metadata.namespace = Some("t".into());
        r.status = room_id.map(|id| MatrixRoomStatus {
            room_id: Some(id.into()),
            ..Default::default()
        });
        Arc::new(r)
    }

    fn lookup(rooms: &[Arc<MatrixRoom>]) -> impl Fn(&str) -> Option<Arc<MatrixRoom>> + '_ {
        move |n| rooms.iter().find(|r| r.name_any() == n).cloned()
    }

    #[test]
    fn parents_resolve_wait_or_are_refused() {
        let rooms = vec![
            room("group", json!({"type": "Space"}), Some("!g:x")),
            room("new-group", json!({"type": "Space"}), None),
            room("plain", json!({}), Some("!p:x")),
        ];
        let child = |parent: &str| room("c", json!({"parentRef": {"name": parent}}), None);
        assert_eq!(
            parent(&room("c", json!({}), None), lookup(&rooms)),
            Parent::None
        );
        assert_eq!(
            parent(&child("group"), lookup(&rooms)),
            Parent::Ready("!g:x".into())
        );
        assert!(matches!(
            parent(&child("new-group"), lookup(&rooms)),
            Parent::Waiting {
                reason: "ParentNotReady",
                ..
            }
        ));
        assert!(matches!(
            parent(&child("gone"), lookup(&rooms)),
            Parent::Waiting {
                reason: "ParentNotFound",
                ..
            }
        ));
        assert!(matches!(
            parent(&child("plain"), lookup(&rooms)),
            Parent::Refused {
                reason: "ParentNotSpace",
                ..
            }
        ));
        assert!(matches!(
            parent(&child("c"), lookup(&rooms)),
            Parent::Refused {
                reason: "ParentCycle",
                ..
            }
        ));
    }

    #[test]
    fn cycles_are_refused_for_every_member_and_only_them() {
        let rooms = vec![
            room(
                "a",
                json!({"type": "Space", "parentRef": {"name": "c"}}),
                Some("!a:x"),
            ),
            room(
                "b",
                json!({"type": "Space", "parentRef": {"name": "a"}}),
                Some("!b:x"),
            ),
            room(
                "c",
                json!({"type": "Space", "parentRef": {"name": "b"}}),
                Some("!c:x"),
            ),
            room("d", json!({"parentRef": {"name": "a"}}), None),
        ];
        for r in &rooms[..3] {
            assert!(
                matches!(
                    parent(r, lookup(&rooms)),
                    Parent::Refused {
                        reason: "ParentCycle",
                        ..
                    }
                ),
                "{}",
                r.name_any()
            );
        }
        // Below a cycle, but not part of it: converges under its parent.
        assert_eq!(
            parent(&rooms[3], lookup(&rooms)),
            Parent::Ready("!a:x".into())
        );
    }

    #[test]
    fn children_are_the_rooms_naming_the_space_that_have_a_room() {
        let space = room("group", json!({"type": "Space"}), Some("!g:x"));
        let mut leaving = (*room(
            "leaving",
            json!({"parentRef": {"name": "group"}}),
            Some("!l:x"),
        ))
        .clone();
        leaving.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        let rooms = vec![
            space.clone(),
            room(
                "e1",
                json!({"parentRef": {"name": "group", "order": "01", "suggested": true}}),
                Some("!e1:x"),
            ),
            room("e2", json!({"parentRef": {"name": "group"}}), None),
            room("e3", json!({"parentRef": {"name": "other"}}), Some("!e3:x")),
            Arc::new(leaving),
        ];
        assert_eq!(
            children(&space, &rooms),
            BTreeMap::from([(
                "!e1:x".to_string(),
                ChildLink {
                    order: Some("01".into()),
                    suggested: true
                }
            )])
        );
    }

    #[test]
    fn the_index_reaches_old_and_new_parents_and_children() {
        let mut index = SpaceIndex::default();
        assert_eq!(index.update("t", "group", None), Vec::<String>::new());
        assert_eq!(index.update("t", "e1", Some("group")), vec!["group"]);
        assert_eq!(index.update("t", "e2", Some("group")), vec!["group"]);
        // The space changed (its room id appeared): both children.
        assert_eq!(index.update("t", "group", None), vec!["e1", "e2"]);
        // Re-parented: the old parent drops it, the new one lists it.
        assert_eq!(
            index.update("t", "e1", Some("other")),
            vec!["group", "other"]
        );
        assert_eq!(index.update("t", "group", None), vec!["e2"]);
        // Gone: its parent hears of it; same names elsewhere are others.
        assert_eq!(index.update("t", "e2", None), vec!["group"]);
        assert_eq!(index.update("u", "group", None), Vec::<String>::new());
        assert_eq!(index.update("t", "group", None), Vec::<String>::new());
    }
}
