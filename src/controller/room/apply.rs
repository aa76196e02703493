//! The writes: creating the room, applying its plan, then what follows a
//! converged room (its `m.direct` listing, its directory publication). The
//! only place an [`Applied`] is made.

use super::model::{Blocked, Found, Refusals, Wanted};
use super::observe::{joined_count, locate_by_alias};
use super::plan::{create_body, RoomAction, RoomPlan};
use super::{audit, direct, publish, record, RoomContext};
use crate::api::conditions::Condition;
use crate::api::MatrixRoom;
use crate::controller::{self, key, Error};
use crate::synapse::rooms::{CreateOutcome, MembershipAction};
use crate::synapse::SynapseError;
use kube::runtime::events::EventType;
use ruma::{RoomId, UserId};

/// A room this reconcile found (or made), planned and applied. Its fields
/// are private to this module: holding one proves the apply step ran.
pub(super) struct Applied {
    room_id: String,
    canonical_alias: String,
    joined_members: u64,
    published: Option<Condition>,
    refused: Refusals,
    /// The desired state this convergence answered.
    fingerprint: u64,
}

impl Applied {
    pub fn room_id(&self) -> &str {
        &self.room_id
    }

    pub fn canonical_alias(&self) -> &str {
        &self.canonical_alias
    }

    /// Joined members, as Synapse counts them.
    pub fn joined_members(&self) -> u64 {
        self.joined_members
    }

    /// The Published condition, when publication is the operator's to report.
    pub fn published(&self) -> Option<&Condition> {
        self.published.as_ref()
    }

    /// What Synapse refused for good (the rest was applied).
    pub fn refused(&self) -> &Refusals {
        &self.refused
    }

    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }
}

/// Creates the room under its alias, the alias being the lock: when it is
/// taken (maybe by our own earlier, interrupted call), the room under it is
/// adopted if it carries our marker, never created again.
pub(super) async fn create(
    room: &MatrixRoom,
    ctx: &RoomContext,
    wanted: &Wanted,
) -> Result<Result<Found, Blocked>, Error> {
    let alias = &wanted.alias;
    match ctx
        .synapse
        .create_room(&create_body(&wanted.desired))
        .await?
    {
        CreateOutcome::Created(room_id) => {
            record(
                room,
                ctx,
                EventType::Normal,
                "RoomCreated",
                &format!("created {room_id} as {alias}"),
            );
            controller::failpoint("after-room-create");
            // Read what createRoom made: the plan then only adds members.
            let state = ctx.synapse.room_state(&room_id).await?.ok_or_else(|| {
                Error::Synapse(SynapseError::Decode(format!(
                    "created room {room_id} is not readable"
                )))
            })?;
            Ok(Ok(Found {
                room_id,
                state,
                created: true,
            }))
        }
        CreateOutcome::AliasInUse => match locate_by_alias(room, alias, ctx).await? {
            Some((room_id, state)) => Ok(Ok(Found {
                room_id,
                state,
                created: false,
            })),
            None => Ok(Err(Blocked::alias_conflict(format!(
                "alias {alias} is in use by a room that is not this object's"
            )))),
        },
    }
}

/// Applies the plan to the found room, records what changed (drift, or an
/// update), then lists a direct room and converges its publication.
pub(super) async fn apply(
    room: &MatrixRoom,
    ctx: &RoomContext,
    wanted: &Wanted,
    found: Found,
    room_plan: RoomPlan,
    fingerprint: u64,
) -> Result<Applied, Error> {
    let Found {
        room_id,
        state,
        created,
    } = found;
    tracing::debug!(room = %key(room), room_id = %room_id, actions = ?room_plan.actions.iter().map(RoomAction::describe).collect::<Vec<_>>(), "planned");
    // The same desired state converged before, yet something must be
    // written: someone changed the room behind the operator's back.
    let drift =
        !created && !room_plan.actions.is_empty() && super::converged_to(room, ctx, fingerprint);
    let room_id_parsed =
        RoomId::parse(&room_id).map_err(|e| Error::Invalid(format!("room id {room_id:?}: {e}")))?;
    // Every action is tried: one refused write (a power-levels event an
    // adopted room will not take) never keeps a kick or a ban from Synapse.
    let mut confirmed = Vec::with_capacity(room_plan.actions.len());
    let mut first_transient = None;
    let mut refused = Refusals::default();
    for action in &room_plan.actions {
        match apply_action(&room_id, &room_id_parsed, action, ctx).await {
            Ok(()) => {
                audit(room, &room_id, &action.describe());
                confirmed.push(action);
            }
            Err(error) => {
                tracing::warn!(room = %key(room), room_id = %room_id, action = %action.describe(), %error, "action failed");
                if error.is_transient() {
                    first_transient.get_or_insert(error);
                } else {
                    refused.record(action, &error);
                }
            }
        }
    }
    let joined_members = joined_count(&state, &confirmed);
    if !confirmed.is_empty() && !created {
        let summary: Vec<String> = confirmed.iter().map(|a| a.describe()).collect();
        let reason = if drift {
            "DriftCorrected"
        } else {
            "RoomUpdated"
        };
        record(room, ctx, EventType::Normal, reason, &summary.join("; "));
    }
    if let Some(error) = first_transient {
        // Tried again as a whole, with backoff.
        return Err(error);
    }
    if wanted.removals_only() {
        // Held back: listing and publication wait with every other addition.
        return Ok(Applied {
            room_id,
            canonical_alias: wanted.alias.to_string(),
            joined_members,
            published: None,
            refused,
            fingerprint,
        });
    }
    if wanted.desired.direct && (created || !super::converged_to(room, ctx, fingerprint)) {
        // Checked when the room or its members change, not on every
        // resync: a user's own later edits to their DM list are theirs.
        direct::list_as_direct(room, &room_id, &wanted.desired, &wanted.unlistable, ctx).await?;
    }
    let published = publish::publication(room, &room_id, ctx).await?;
    Ok(Applied {
        room_id,
        canonical_alias: wanted.alias.to_string(),
        joined_members,
        published,
        refused,
        fingerprint,
    })
}

pub(super) async fn apply_action(
    room_id: &str,
    parsed: &RoomId,
    action: &RoomAction,
    ctx: &RoomContext,
) -> Result<(), Error> {
    let s = &ctx.synapse;
    let user =
        |u: &str| UserId::parse(u).map_err(|e| Error::Invalid(format!("user id {u:?}: {e}")));
    match action {
        RoomAction::MakeRoomAdmin => s.make_room_admin(room_id).await?,
        RoomAction::SetState { kind, content } => s.put_state(room_id, kind, "", content).await?,
        RoomAction::SetPowerLevels(content) => {
            s.put_state(room_id, "m.room.power_levels", "", content)
                .await?
        }
        RoomAction::SetRelation {
            kind,
            state_key,
            content,
        } => s.put_state(room_id, kind, state_key, content).await?,
        RoomAction::Join(u) => {
            let user_id = user(u)?;
            // Its membership event comes back through the feed: not drift.
            ctx.own_joins.expect(room_id, user_id.as_str());
            s.admin_join(parsed, &user_id).await?
        }
        RoomAction::InviteDirect(u) => s.invite_direct(room_id, &user(u)?).await?,
        RoomAction::JoinAsMember(u) => {
            let user_id = user(u)?;
            ctx.own_joins.expect(room_id, user_id.as_str());
            s.join_as_member(room_id, &user_id).await?
        }
        RoomAction::Invite(u) => {
            s.membership(
                room_id,
                MembershipAction::Invite,
                u,
                "declared by RoomPermission",
            )
            .await?
        }
        RoomAction::Kick(u) => {
            s.membership(
                room_id,
                MembershipAction::Kick,
                u,
                "not declared for this room",
            )
            .await?
        }
        RoomAction::Ban(u) => {
            s.membership(
                room_id,
                MembershipAction::Ban,
                u,
                "banned by RoomPermission",
            )
            .await?
        }
        RoomAction::Unban(u) => {
            s.membership(room_id, MembershipAction::Unban, u, "no longer banned")
                .await?
        }
    }
    Ok(())
}
