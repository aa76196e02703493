//! Users' `m.direct` account data, for direct conversations.
//!
//! Synapse lets an admin read any user's account data
//! (`GET /_synapse/admin/v1/users/<id>/accountdata`) but offers no admin
//! write: a write goes out as the user ([`super::as_member`]). The admin
//! read comes first, so a list that already names the room costs no token.
//! Matrix account data has no compare-and-swap: the read-modify-write keeps
//! every other entry, and the window between the two is one request.

use super::{RequestKind, SynapseClient, SynapseError};
use ruma::UserId;
use serde_json::{json, Value};

impl SynapseClient {
    /// The user's `m.direct` content (`{}` when never set).
    pub async fn direct_rooms(&self, user_id: &UserId) -> Result<Value, SynapseError> {
        let (_, bytes) = self
            .send_json(
                reqwest::Method::GET,
                &[
                    "_synapse",
                    "admin",
                    "v1",
                    "users",
                    user_id.as_str(),
                    "accountdata",
                ],
                None,
                RequestKind::GetAccountData,
            )
            .await?;
        let v: Value =
            serde_json::from_slice(&bytes).map_err(|e| SynapseError::Decode(e.to_string()))?;
        Ok(v.pointer("/account_data/global/m.direct")
            .cloned()
            .unwrap_or_else(|| json!({})))
    }

    /// Writes the user's `m.direct` as the user (see [`super::as_member`]).
    pub async fn set_direct_rooms(
        &self,
        user_id: &UserId,
        content: &Value,
    ) -> Result<(), SynapseError> {
        self.send_as_member(
            user_id,
            "m.direct",
            reqwest::Method::PUT,
            &[
                "_matrix",
                "client",
                "v3",
                "user",
                user_id.as_str(),
                "account_data",
                "m.direct",
            ],
            content,
            RequestKind::PutAccountData,
        )
        .await
        .map(|_| ())
    }
}

/// `m.direct` with `room_id` listed under `other`, every other entry kept;
/// `None` when it is listed already.
pub fn with_direct_room(current: &Value, other: &str, room_id: &str) -> Option<Value> {
    let mut content = current.as_object().cloned().unwrap_or_default();
    let rooms = content
        .entry(other.to_string())
        .or_insert_with(|| json!([]));
    if !rooms.is_array() {
        *rooms = json!([]);
    }
    let list = rooms.as_array_mut()?;
    if list.iter().any(|r| r.as_str() == Some(room_id)) {
        return None;
    }
    list.push(json!(room_id));
    Some(Value::Object(content))
}

/// `m.direct` without `room_id` under any user (an entry it leaves empty is
/// dropped), every other entry kept; `None` when no entry lists it.
pub fn without_direct_room(current: &Value, room_id: &str) -> Option<Value> {
    let content = current.as_object()?;
    let listed = |rooms: &Value| {
        rooms
            .as_array()
            .is_some_and(|l| l.iter().any(|r| r.as_str() == Some(room_id)))
    };
    if !content.values().any(listed) {
        return None;
    }
    let kept = content
        .iter()
        .filter_map(|(user, rooms)| {
            if !listed(rooms) {
                return Some((user.clone(), rooms.clone()));
            }
            let rest: Vec<Value> = rooms
                .as_array()?
                .iter()
                .filter(|r| r.as_str() != Some(room_id))
                .cloned()
                .collect();
            (!rest.is_empty()).then(|| (user.clone(), Value::Array(rest)))
        })
        .collect();
    Some(Value::Object(kept))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_room_is_added_and_other_entries_kept() {
        let current = json!({"@carol:x": ["!old:x"], "@bob:x": ["!a:x"]});
        let next = with_direct_room(&current, "@bob:x", "!dm:x").unwrap();
        assert_eq!(
            next,
            json!({"@carol:x": ["!old:x"], "@bob:x": ["!a:x", "!dm:x"]})
        );
        assert_eq!(with_direct_room(&next, "@bob:x", "!dm:x"), None);
        assert_eq!(
            with_direct_room(&json!({}), "@bob:x", "!dm:x"),
            Some(json!({"@bob:x": ["!dm:x"]}))
        );
    }

    #[test]
    fn the_room_is_removed_and_other_entries_kept() {
        let current = json!({"@carol:x": [], "@bob:x": ["!a:x", "!dm:x"], "@dan:x": ["!dm:x"]});
        assert_eq!(
            without_direct_room(&current, "!dm:x"),
            Some(json!({"@carol:x": [], "@bob:x": ["!a:x"]}))
        );
        assert_eq!(
            without_direct_room(&json!({"@bob:x": ["!a:x"]}), "!dm:x"),
            None
        );
        assert_eq!(without_direct_room(&json!({}), "!dm:x"), None);
    }
}
