//! kstatus-compatible conditions, keyed by `type`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The condition every kind reports; Argo CD and Flux read it for health.
pub const READY: &str = "Ready";

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

/// Finds a condition by type.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

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
