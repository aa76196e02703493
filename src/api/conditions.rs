//! kstatus-compatible conditions, keyed by `type`.
//!
//! Every status carries three: `Ready` (converged or not, with the reason),
//! and kstatus's abnormal-true pair, `Reconciling` (work in progress, or
//! waiting for something that resolves by itself) and `Stalled` (waiting for
//! a spec change or another object to let go). kstatus then reads an object
//! as Current, InProgress or Failed; Argo CD's Lua checks read the same.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The condition every kind reports; Argo CD and Flux read it for health.
pub const READY: &str = "Ready";
/// kstatus: `True` while the operator is still working towards Ready.
pub const RECONCILING: &str = "Reconciling";
/// kstatus: `True` when the object will not converge without a change.
pub const STALLED: &str = "Stalled";

/// What a Ready reason means for an object's health.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Health {
    /// Converged.
    Ready,
    /// Not converged yet; resolves by itself (retries, referenced objects arriving).
    Reconciling,
    /// Not converged and waits for a spec change or another object to let go.
    Stalled,
}

/// Every Ready reason the operator writes, and its health: the one place a
/// new reason is added. A reason missing here counts as Reconciling (never
/// Failed by mistake) and as `Other` in metrics.
pub const REASONS: &[(&str, Health)] = &[
    ("Converged", Health::Ready),
    // Transient: retried with backoff.
    ("SynapseUnavailable", Health::Reconciling),
    ("KubernetesError", Health::Reconciling),
    // Waiting for a referenced object (a user's account, the room).
    ("Pending", Health::Reconciling),
    ("RoomNotReady", Health::Reconciling),
    // A room whose parent space is not there yet, or has no room yet.
    ("ParentNotFound", Health::Reconciling),
    ("ParentNotReady", Health::Reconciling),
    // A lock that lifts once every token from before it has expired.
    ("UnlockPending", Health::Reconciling),
    // Terminal until the spec changes or an older claimant lets go.
    ("LocalpartConflict", Health::Stalled),
    ("AliasConflict", Health::Stalled),
    ("EmailConflict", Health::Stalled),
    ("SubjectConflict", Health::Stalled),
    ("AccountExists", Health::Stalled),
    ("AccountDeactivated", Health::Stalled),
    ("ReservedLocalpart", Health::Stalled),
    ("AdminNotAllowed", Health::Stalled),
    ("Duplicate", Health::Stalled),
    ("InvalidSpec", Health::Stalled),
    ("SynapseRejected", Health::Stalled),
    // Spaces and direct rooms: the spec (or the room's permissions) must change.
    ("ParentCycle", Health::Stalled),
    ("ParentNotSpace", Health::Stalled),
    ("DirectMemberCount", Health::Stalled),
    ("RoomTypeMismatch", Health::Stalled),
    ("RoomVersionUnsupported", Health::Stalled),
    // A reference across namespaces that the user's namespace does not
    // admit (no grant, or not at that power level): its grants must change.
    ("ReferenceNotPermitted", Health::Stalled),
    ("RoleNotPermitted", Health::Stalled),
];

/// The health a Ready condition stands for. `Ready=True` is Ready whatever
/// its reason; otherwise the reason decides (unknown reasons: Reconciling).
pub fn health(ready: &Condition) -> Health {
    if ready.is_true() {
        return Health::Ready;
    }
    REASONS
        .iter()
        .find(|(reason, _)| *reason == ready.reason)
        .map_or(Health::Reconciling, |(_, health)| match health {
            // A Ready reason on a condition that says False: still working.
            Health::Ready => Health::Reconciling,
            other => *other,
        })
}

/// Whether the operator has written a status: the API server defaults an
/// absent status to `observedGeneration: 0` (see [`crate::api::crds`]), so
/// objects it has not reached yet read as InProgress to kstatus.
pub fn observed(observed_generation: Option<i64>) -> bool {
    observed_generation.is_some_and(|g| g > 0)
}

/// `Ready` and the kstatus pair derived from it, sharing its reason, message
/// and observedGeneration: what every status writer applies.
pub fn with_kstatus(ready: Condition) -> Vec<Condition> {
    let health = health(&ready);
    let derived = |type_: &str, on: bool| Condition {
        type_: type_.to_string(),
        status: if on { "True" } else { "False" }.to_string(),
        ..ready.clone()
    };
    vec![
        derived(RECONCILING, health == Health::Reconciling),
        derived(STALLED, health == Health::Stalled),
        ready,
    ]
}

/// One observation of the object's state, as `metav1.Condition` defines it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Kind of condition, e.g. `Ready`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// CamelCase reason for the last transition, stable for automation.
    pub reason: String,
    /// Human-readable detail.
    #[serde(default)]
    pub message: String,
    /// The `metadata.generation` this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When `status` last changed.
    #[schemars(with = "Option<String>")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
}

impl Condition {
    pub fn new(
        type_: &str,
        ok: bool,
        reason: &str,
        message: impl Into<String>,
        generation: Option<i64>,
    ) -> Self {
        Condition {
            type_: type_.to_string(),
            status: if ok { "True" } else { "False" }.to_string(),
            reason: reason.to_string(),
            message: message.into(),
            observed_generation: generation,
            last_transition_time: None,
        }
    }

    pub fn is_true(&self) -> bool {
        self.status == "True"
    }
}

/// Merges `next` into `existing` by type, keeping `lastTransitionTime` when
/// the status did not change so that a no-op status write stays a no-op.
pub fn merge(existing: &[Condition], next: Vec<Condition>, now: Time) -> Vec<Condition> {
    let mut merged: Vec<Condition> = existing
        .iter()
        .filter(|c| !next.iter().any(|n| n.type_ == c.type_))
        .cloned()
        .collect();
    for mut condition in next {
        let previous = existing.iter().find(|c| c.type_ == condition.type_);
        condition.last_transition_time = match previous {
            Some(p) if p.status == condition.status && p.last_transition_time.is_some() => {
                p.last_transition_time.clone()
            }
            _ => Some(now.clone()),
        };
        merged.push(condition);
    }
    merged.sort_by(|a, b| a.type_.cmp(&b.type_));
    merged
}

/// Whether `Ready` is True for `generation`: the object converged for its
/// current spec.
pub fn current_and_true(conditions: Option<&[Condition]>, generation: Option<i64>) -> bool {
    conditions
        .and_then(|c| find(c, READY))
        .is_some_and(|r| r.is_true() && r.observed_generation == generation)
}

/// Finds a condition by type.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    #[test]
    fn converged_means_ready_for_the_current_generation() {
        let ready = |status: bool, generation: i64| {
            vec![Condition::new(READY, status, "R", "", Some(generation))]
        };
        assert!(current_and_true(Some(&ready(true, 2)), Some(2)));
        assert!(
            !current_and_true(Some(&ready(true, 1)), Some(2)),
            "a newer spec waits"
        );
        assert!(!current_and_true(Some(&ready(false, 2)), Some(2)));
        assert!(!current_and_true(None, Some(2)));
    }

    use super::*;

    fn types(conditions: &[Condition]) -> Vec<(&str, &str)> {
        conditions
            .iter()
            .map(|c| (c.type_.as_str(), c.status.as_str()))
            .collect()
    }

    #[test]
    fn ready_sets_neither_reconciling_nor_stalled() {
        let all = with_kstatus(Condition::new(READY, true, "Converged", "ok", Some(3)));
        assert_eq!(
            types(&all),
            [(RECONCILING, "False"), (STALLED, "False"), (READY, "True")]
        );
        assert!(all.iter().all(|c| c.observed_generation == Some(3)));
    }

    #[test]
    fn conflicts_and_refusals_stall() {
        for reason in [
            "LocalpartConflict",
            "AliasConflict",
            "AccountExists",
            "AccountDeactivated",
            "ReservedLocalpart",
            "AdminNotAllowed",
            "SubjectConflict",
            "EmailConflict",
            "Duplicate",
            "InvalidSpec",
        ] {
            let all = with_kstatus(Condition::new(READY, false, reason, "no", Some(1)));
            assert_eq!(
                types(&all),
                [(RECONCILING, "False"), (STALLED, "True"), (READY, "False")],
                "{reason}"
            );
            assert!(all.iter().all(|c| c.reason == reason), "{reason}");
        }
    }

    #[test]
    fn transient_failures_and_waits_reconcile() {
        for reason in [
            "SynapseUnavailable",
            "KubernetesError",
            "Pending",
            "RoomNotReady",
            "SomethingNew",
            // Converged, yet False: not a state the operator writes, never Failed.
            "Converged",
        ] {
            let ready = Condition::new(READY, false, reason, "wait", Some(1));
            assert_eq!(health(&ready), Health::Reconciling, "{reason}");
            assert_eq!(
                types(&with_kstatus(ready)),
                [(RECONCILING, "True"), (STALLED, "False"), (READY, "False")]
            );
        }
    }

    #[test]
    fn every_reason_is_listed_once() {
        let mut names: Vec<&str> = REASONS.iter().map(|(r, _)| *r).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), REASONS.len());
    }

    #[test]
    fn merging_the_kstatus_set_twice_is_a_no_op() {
        let first = merge(
            &[],
            with_kstatus(Condition::new(READY, false, "Pending", "w", Some(1))),
            at(10),
        );
        let second = merge(
            &first,
            with_kstatus(Condition::new(READY, false, "Pending", "w", Some(1))),
            at(20),
        );
        assert_eq!(first, second);
    }

    fn at(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn keeps_transition_time_when_status_unchanged() {
        let first = merge(
            &[],
            vec![Condition::new(READY, true, "Converged", "ok", Some(1))],
            at(10),
        );
        let second = merge(
            &first,
            vec![Condition::new(READY, true, "Converged", "ok", Some(2))],
            at(20),
        );
        assert_eq!(second[0].last_transition_time, Some(at(10)));
        assert_eq!(second[0].observed_generation, Some(2));
    }

    #[test]
    fn moves_transition_time_when_status_flips() {
        let first = merge(
            &[],
            vec![Condition::new(READY, true, "Converged", "ok", Some(1))],
            at(10),
        );
        let second = merge(
            &first,
            vec![Condition::new(
                READY,
                false,
                "SynapseUnavailable",
                "down",
                Some(1),
            )],
            at(20),
        );
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].last_transition_time, Some(at(20)));
        assert_eq!(second[0].reason, "SynapseUnavailable");
    }

    #[test]
    fn keeps_other_types() {
        let first = merge(
            &[],
            vec![Condition::new("Other", true, "X", "", None)],
            at(10),
        );
        let second = merge(
            &first,
            vec![Condition::new(READY, true, "Converged", "", None)],
            at(20),
        );
        assert_eq!(
            second.iter().map(|c| c.type_.as_str()).collect::<Vec<_>>(),
            ["Other", "Ready"]
        );
    }
}
