//! Rooms: creation, state, membership, directory and deletion, through the
//! client API as the admin account and Synapse's admin API.

use super::{RequestKind, SynapseClient, SynapseError};
use reqwest::Method;
use ruma::{OwnedRoomOrAliasId, RoomAliasId, RoomId, UserId};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use synapse_admin_api::room_membership::join_room;
use synapse_admin_api::rooms::room_members;

/// One state event as `GET /rooms/<id>/state` returns it.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct StateEvent {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub state_key: String,
    #[serde(default)]
    pub sender: String,
    #[serde(default)]
    pub content: Value,
}

/// The room's current state, keyed by (type, state_key).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RoomState {
    pub events: BTreeMap<(String, String), Value>,
    /// Who created the room: a creator in room version 12 and later.
    pub creator: Option<String>,
}

impl RoomState {
    pub fn from_events(events: Vec<StateEvent>) -> Self {
        let creator = events
            .iter()
            .find(|e| e.kind == "m.room.create")
            .map(|e| e.sender.clone());
        RoomState {
            events: events
                .into_iter()
                .map(|e| ((e.kind, e.state_key), e.content))
                .collect(),
            creator,
        }
    }

    pub fn get(&self, kind: &str, state_key: &str) -> Option<&Value> {
        self.events.get(&(kind.to_string(), state_key.to_string()))
    }

    /// Membership of every user with a member event: join, invite, ban, leave, knock.
    pub fn memberships(&self) -> BTreeMap<String, String> {
        self.events
            .iter()
            .filter(|((kind, _), _)| kind == "m.room.member")
            .filter_map(|((_, user), content)| {
                Some((
                    user.clone(),
                    content.get("membership")?.as_str()?.to_string(),
                ))
            })
            .collect()
    }
}

/// Result of trying to create a room under an alias.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CreateOutcome {
    Created(String),
    /// The alias already points at a room: resolve it, never retry blindly.
    AliasInUse,
}

/// Progress of an asynchronous room deletion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeleteStatus {
    InProgress,
    Complete,
    Failed(String),
}

impl SynapseClient {
    /// `POST /createRoom` with the alias as the lock and the full initial state.
    pub async fn create_room(&self, body: &Value) -> Result<CreateOutcome, SynapseError> {
        match self
            .send_json(
                Method::POST,
                &["_matrix", "client", "v3", "createRoom"],
                Some(body),
                RequestKind::CreateRoom,
            )
            .await
        {
            Ok((_, bytes)) => {
                let v: Value = decode(&bytes)?;
                let id = v
                    .get("room_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| SynapseError::Decode("createRoom: no room_id".into()))?;
                Ok(CreateOutcome::Created(id.to_string()))
            }
            Err(e) if e.errcode() == Some("M_ROOM_IN_USE") => Ok(CreateOutcome::AliasInUse),
            Err(e) => Err(e),
        }
    }

    /// Resolves an alias to a room id; `None` when the alias is free.
    pub async fn resolve_alias(&self, alias: &RoomAliasId) -> Result<Option<String>, SynapseError> {
        match self
            .send_json(
                Method::GET,
                &[
                    "_matrix",
                    "client",
                    "v3",
                    "directory",
                    "room",
                    alias.as_str(),
                ],
                None,
                RequestKind::ResolveAlias,
            )
            .await
        {
            Ok((_, bytes)) => {
                let v: Value = decode(&bytes)?;
                Ok(v.get("room_id").and_then(Value::as_str).map(str::to_string))
            }
            Err(SynapseError::Rejected { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reads all current state (including every member event) in one call.
    /// `None` when the room is unknown or the admin account cannot see it.
    pub async fn room_state(&self, room_id: &str) -> Result<Option<RoomState>, SynapseError> {
        match self
            .send_json(
                Method::GET,
                &["_matrix", "client", "v3", "rooms", room_id, "state"],
                None,
                RequestKind::GetRoomState,
            )
            .await
        {
            Ok((_, bytes)) => {
                let events: Vec<StateEvent> = decode(&bytes)?;
                Ok(Some(RoomState::from_events(events)))
            }
            Err(SynapseError::Rejected {
                status: 403 | 404, ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The room's joined members, through the admin API: the member list
    /// alone (not the whole state), and whether or not the admin account is
    /// in the room. `None` when Synapse does not know the room.
    pub async fn joined_members(
        &self,
        room_id: &RoomId,
    ) -> Result<Option<std::collections::BTreeSet<String>>, SynapseError> {
        let request = room_members::v1::Request::new(room_id.to_owned());
        match self.send(request, RequestKind::GetRoomMembers).await {
            Ok((_, bytes)) => {
                #[derive(Deserialize)]
                struct Members {
                    members: Vec<String>,
                }
                let members: Members = decode(&bytes)?;
                Ok(Some(members.members.into_iter().collect()))
            }
            Err(SynapseError::Rejected { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reads a room's current state through the admin API, which answers
    /// whether or not the admin account is in the room (the client API does
    /// not). Only used when the client API refuses.
    pub async fn admin_room_state(&self, room_id: &str) -> Result<Option<RoomState>, SynapseError> {
        #[derive(Deserialize)]
        struct AdminState {
            state: Vec<StateEvent>,
        }
        match self
            .send_json(
                Method::GET,
                &["_synapse", "admin", "v1", "rooms", room_id, "state"],
                None,
                RequestKind::GetRoomState,
            )
            .await
        {
            Ok((_, bytes)) => {
                let answer: AdminState = decode(&bytes)?;
                Ok(Some(RoomState::from_events(answer.state)))
            }
            Err(SynapseError::Rejected {
                status: 400 | 403 | 404,
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Joins the admin account itself to a room (as its creator it may join
    /// a room that has nothing but its create event).
    pub async fn join_self(&self, room_id: &str) -> Result<(), SynapseError> {
        self.send_json(
            Method::POST,
            &["_matrix", "client", "v3", "rooms", room_id, "join"],
            Some(&json!({})),
            RequestKind::AdminJoin,
        )
        .await
        .map(|_| ())
    }

    /// Sends one state event as the admin account.
    pub async fn put_state(
        &self,
        room_id: &str,
        kind: &str,
        state_key: &str,
        content: &Value,
    ) -> Result<(), SynapseError> {
        let request_kind = if kind == "m.room.power_levels" {
            RequestKind::PutPowerLevels
        } else {
            RequestKind::PutState
        };
        self.send_json(
            Method::PUT,
            &[
                "_matrix", "client", "v3", "rooms", room_id, "state", kind, state_key,
            ],
            Some(content),
            request_kind,
        )
        .await
        .map(|_| ())
    }

    /// Joins a local user through the admin API (Synapse invites first when
    /// the room is not public).
    pub async fn admin_join(&self, room_id: &RoomId, user_id: &UserId) -> Result<(), SynapseError> {
        let target: OwnedRoomOrAliasId = room_id.to_owned().into();
        let request = join_room::v1::Request::new(target, user_id.to_owned());
        self.send(request, RequestKind::AdminJoin).await.map(|_| ())
    }

    /// Invites a user to a direct conversation: the member event carries
    /// `is_direct`, which the invite endpoint cannot send.
    pub async fn invite_direct(&self, room_id: &str, user_id: &UserId) -> Result<(), SynapseError> {
        let content = json!({"membership": "invite", "is_direct": true});
        self.send_json(
            Method::PUT,
            &[
                "_matrix",
                "client",
                "v3",
                "rooms",
                room_id,
                "state",
                "m.room.member",
                user_id.as_str(),
            ],
            Some(&content),
            RequestKind::Invite,
        )
        .await
        .map(|_| ())
    }

    /// Joins an invited user as themselves, so that the invite they joined
    /// from stays the last one they received (see [`super::as_member`]).
    pub async fn join_as_member(
        &self,
        room_id: &str,
        user_id: &UserId,
    ) -> Result<(), SynapseError> {
        self.send_as_member(
            user_id,
            "join",
            Method::POST,
            &["_matrix", "client", "v3", "rooms", room_id, "join"],
            &json!({}),
            RequestKind::JoinAsMember,
        )
        .await
        .map(|_| ())
    }

    /// invite / kick / ban / unban as the admin account.
    pub async fn membership(
        &self,
        room_id: &str,
        action: MembershipAction,
        user_id: &str,
        reason: &str,
    ) -> Result<(), SynapseError> {
        let (verb, kind) = match action {
            MembershipAction::Invite => ("invite", RequestKind::Invite),
            MembershipAction::Kick => ("kick", RequestKind::Kick),
            MembershipAction::Ban => ("ban", RequestKind::Ban),
            MembershipAction::Unban => ("unban", RequestKind::Unban),
        };
        let body = json!({"user_id": user_id, "reason": reason});
        self.send_json(
            Method::POST,
            &["_matrix", "client", "v3", "rooms", room_id, verb],
            Some(&body),
            kind,
        )
        .await
        .map(|_| ())
    }

    /// The admin account leaves the room.
    pub async fn leave(&self, room_id: &str) -> Result<(), SynapseError> {
        self.send_json(
            Method::POST,
            &["_matrix", "client", "v3", "rooms", room_id, "leave"],
            Some(&json!({})),
            RequestKind::Leave,
        )
        .await
        .map(|_| ())
    }

    /// Drops an alias; already gone is success.
    pub async fn delete_alias(&self, alias: &RoomAliasId) -> Result<(), SynapseError> {
        match self
            .send_json(
                Method::DELETE,
                &[
                    "_matrix",
                    "client",
                    "v3",
                    "directory",
                    "room",
                    alias.as_str(),
                ],
                None,
                RequestKind::DeleteAlias,
            )
            .await
        {
            Ok(_) | Err(SynapseError::Rejected { status: 404, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Whether the room is published in the directory.
    pub async fn directory_visibility(&self, room_id: &str) -> Result<bool, SynapseError> {
        let (_, bytes) = self
            .send_json(
                Method::GET,
                &[
                    "_matrix",
                    "client",
                    "v3",
                    "directory",
                    "list",
                    "room",
                    room_id,
                ],
                None,
                RequestKind::GetDirectory,
            )
            .await?;
        let v: Value = decode(&bytes)?;
        Ok(v.get("visibility").and_then(Value::as_str) == Some("public"))
    }

    /// Publishes or unpublishes the room.
    pub async fn set_directory_visibility(
        &self,
        room_id: &str,
        public: bool,
    ) -> Result<(), SynapseError> {
        let body = json!({"visibility": if public { "public" } else { "private" }});
        self.send_json(
            Method::PUT,
            &[
                "_matrix",
                "client",
                "v3",
                "directory",
                "list",
                "room",
                room_id,
            ],
            Some(&body),
            RequestKind::SetDirectory,
        )
        .await
        .map(|_| ())
    }

    /// Starts `DELETE /_synapse/admin/v2/rooms/<id>` with purge; returns the delete id.
    pub async fn delete_room(&self, room_id: &str, purge: bool) -> Result<String, SynapseError> {
        let body = json!({"purge": purge, "block": false});
        let (_, bytes) = self
            .send_json(
                Method::DELETE,
                &["_synapse", "admin", "v2", "rooms", room_id],
                Some(&body),
                RequestKind::DeleteRoom,
            )
            .await?;
        let v: Value = decode(&bytes)?;
        v.get("delete_id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| SynapseError::Decode("no delete_id".into()))
    }

    /// The newest deletion of a room Synapse knows of, if any: lets a
    /// cleanup pick up a deletion an earlier reconcile (or replica) started.
    pub async fn room_delete_status(
        &self,
        room_id: &str,
    ) -> Result<Option<DeleteStatus>, SynapseError> {
        let answer = self
            .send_json(
                Method::GET,
                &["_synapse", "admin", "v2", "rooms", room_id, "delete_status"],
                None,
                RequestKind::DeleteStatus,
            )
            .await;
        let bytes = match answer {
            Ok((_, bytes)) => bytes,
            Err(SynapseError::Rejected { status: 404, .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let v: Value = decode(&bytes)?;
        let results = v.get("results").and_then(Value::as_array);
        // Any deletion still running wins; else the last one listed.
        let statuses: Vec<DeleteStatus> = results
            .into_iter()
            .flatten()
            .map(delete_status_of)
            .collect();
        if statuses.contains(&DeleteStatus::InProgress) {
            return Ok(Some(DeleteStatus::InProgress));
        }
        if statuses.contains(&DeleteStatus::Complete) {
            return Ok(Some(DeleteStatus::Complete));
        }
        Ok(statuses.into_iter().last())
    }

    /// Polls a room deletion.
    pub async fn delete_status(&self, delete_id: &str) -> Result<DeleteStatus, SynapseError> {
        let (_, bytes) = self
            .send_json(
                Method::GET,
                &[
                    "_synapse",
                    "admin",
                    "v2",
                    "rooms",
                    "delete_status",
                    delete_id,
                ],
                None,
                RequestKind::DeleteStatus,
            )
            .await?;
        let v: Value = decode(&bytes)?;
        Ok(delete_status_of(&v))
    }
}

/// One deletion's status as Synapse reports it.
fn delete_status_of(v: &Value) -> DeleteStatus {
    match v.get("status").and_then(Value::as_str) {
        Some("complete") => DeleteStatus::Complete,
        Some("failed") => DeleteStatus::Failed(
            v.get("error")
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .to_string(),
        ),
        _ => DeleteStatus::InProgress,
    }
}

impl SynapseClient {
    /// Restores the admin account's top power level in an adopted room.
    pub async fn make_room_admin(&self, room_id: &str) -> Result<(), SynapseError> {
        let body = json!({"user_id": self.admin.as_str()});
        self.send_json(
            Method::POST,
            &[
                "_synapse",
                "admin",
                "v1",
                "rooms",
                room_id,
                "make_room_admin",
            ],
            Some(&body),
            RequestKind::MakeRoomAdmin,
        )
        .await
        .map(|_| ())
    }
}

/// Reads a JSON answer.
fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, SynapseError> {
    serde_json::from_slice(bytes).map_err(|e| SynapseError::Decode(e.to_string()))
}

/// Membership changes made through the client API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MembershipAction {
    Invite,
    Kick,
    Ban,
    Unban,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memberships_come_from_member_events() {
        let events: Vec<StateEvent> = serde_json::from_value(json!([
            {"type": "m.room.member", "state_key": "@a:x", "sender": "@a:x", "content": {"membership": "join"}},
            {"type": "m.room.member", "state_key": "@b:x", "sender": "@o:x", "content": {"membership": "ban"}},
            {"type": "m.room.name", "state_key": "", "sender": "@o:x", "content": {"name": "N"}},
        ]))
        .unwrap();
        let state = RoomState::from_events(events);
        assert_eq!(
            state.memberships().get("@a:x").map(String::as_str),
            Some("join")
        );
        assert_eq!(
            state.memberships().get("@b:x").map(String::as_str),
            Some("ban")
        );
        assert_eq!(state.get("m.room.name", "").unwrap()["name"], "N");
    }
}
