//! The values a room's reconcile hands from one step to the next: what is
//! wanted (fold), where the room is (observe), why it cannot fully
//! converge (held or blocked), and what Synapse refused (apply). Every
//! step imports them from here, so no step imports another's types.

use super::plan::{DesiredRoom, RoomAction};
use crate::api::MatrixRoom;
use crate::controller::memo::fingerprint;
use crate::controller::room::fold::PermissionOutcome;
use crate::controller::Error;
use crate::synapse::rooms::RoomState;
use ruma::OwnedRoomAliasId;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// What the room should be, with what its permissions came to.
pub(super) struct Wanted {
    pub desired: DesiredRoom,
    /// Each permission's outcome, by name: written to its status.
    pub outcomes: BTreeMap<String, PermissionOutcome>,
    pub alias: OwnedRoomAliasId,
    /// Members whose `m.direct` cannot be written now (see [`direct`]).
    pub unlistable: BTreeSet<String>,
    /// Why the room cannot fully converge now, if it cannot: a room that
    /// exists still enforces what it can (see [`Enforce`]).
    pub held: Option<Held>,
}

impl Wanted {
    /// Everything a convergence depends on. Permission outcomes are part of
    /// it: a new Pending or Duplicate permission changes no member, but its
    /// status must still be written.
    pub fn fingerprint(&self, room: &MatrixRoom) -> u64 {
        fingerprint(&(
            &self.desired,
            &self.outcomes,
            room.spec.publish_to_directory,
            room.metadata.generation,
            &self.unlistable,
            &self.held,
        ))
    }

    /// Whether only removals may be applied.
    pub fn removals_only(&self) -> bool {
        self.held
            .as_ref()
            .is_some_and(|h| h.enforce == Enforce::RemovalsOnly)
    }
}

/// Why the room cannot be converged yet, found before any Synapse read.
#[derive(Clone, Debug)]
pub(super) struct Held {
    pub blocked: Blocked,
    /// Resolves by itself: look again after this long instead of at the resync.
    pub retry: Option<Duration>,
    /// What a room that exists still does meanwhile.
    pub enforce: Enforce,
}

/// How a held room that exists keeps converging: enforcement never pauses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Enforce {
    /// Kicks and bans only: nothing is added, no setting changes.
    RemovalsOnly,
    /// Its parent space is gone: everything converges, as a standalone room
    /// (no `m.space.parent`, a restricted join rule falls back to invite).
    Standalone,
}

/// The Ready reason of a room whose alias another object (or a foreign room) holds.
pub(super) const ALIAS_CONFLICT: &str = "AliasConflict";

/// Why a room cannot converge: written as Ready=False, nothing written to Synapse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Blocked {
    pub reason: &'static str,
    pub message: String,
}

impl Blocked {
    pub fn new(reason: &'static str, message: String) -> Self {
        Blocked { reason, message }
    }

    pub fn alias_conflict(message: String) -> Self {
        Blocked::new(ALIAS_CONFLICT, message)
    }

    /// An alias conflict means the room is not (or no longer) this
    /// object's: its status must not name it. Any other block keeps it.
    pub fn keeps_room(&self) -> bool {
        self.reason != ALIAS_CONFLICT
    }
}

/// The room this object converges, as read before any write.
pub(super) struct Found {
    pub room_id: String,
    pub state: RoomState,
    /// Made by this reconcile (its creation is not drift).
    pub created: bool,
}

/// Where the room is, if it exists and is this object's.
pub(super) enum Located {
    Ours(String, RoomState),
    Absent,
    Foreign(String),
}

/// The writes Synapse refused for good (4xx), by whom they concern: a
/// member's own membership change, the power levels (every member with a
/// level), or the room's settings. Every other write was still made.
#[derive(Debug, Default)]
pub(super) struct Refusals {
    /// User id → what was refused and why.
    pub members: BTreeMap<String, String>,
    pub power_levels: Option<String>,
    pub settings: Vec<String>,
}

impl Refusals {
    pub fn record(&mut self, action: &RoomAction, error: &Error) {
        let what = format!("{}: {error}", action.describe());
        match action {
            RoomAction::Join(u)
            | RoomAction::JoinAsMember(u)
            | RoomAction::Invite(u)
            | RoomAction::InviteDirect(u)
            | RoomAction::Kick(u)
            | RoomAction::Ban(u)
            | RoomAction::Unban(u) => {
                self.members.insert(u.clone(), what);
            }
            RoomAction::SetPowerLevels(_) => self.power_levels = Some(what),
            _ => self.settings.push(what),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty() && self.power_levels.is_none() && self.settings.is_empty()
    }

    /// What a member's permission reports: its own refusal, or the power
    /// levels' when it has a level there.
    pub fn of_member(&self, user_id: &str, power_level: i64) -> Option<&str> {
        self.members
            .get(user_id)
            .or(self.power_levels.as_ref().filter(|_| power_level != 0))
            .map(String::as_str)
    }

    pub fn summary(&self) -> String {
        let all: Vec<&str> = self
            .settings
            .iter()
            .chain(&self.power_levels)
            .chain(self.members.values())
            .map(String::as_str)
            .collect();
        format!(
            "Synapse refused {} of the writes: {}",
            all.len(),
            all.join("; ")
        )
    }
}
