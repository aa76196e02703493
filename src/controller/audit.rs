//! The record every controller leaves of what it did: a `target=audit` log
//! line per Synapse mutation, and Kubernetes Events on the object.

use super::events::Recorder;
use super::key;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};

/// What a Synapse mutation touched, with the log fields each kind has
/// always carried (names of changed fields, never their values).
pub enum Subject<'a> {
    /// A room, by id.
    Room { room_id: &'a str },
    /// An account, with the names of the fields written.
    Account {
        user_id: &'a str,
        fields: &'a [&'static str],
    },
    /// An account whose sessions were ended.
    Sessions { user_id: &'a str, count: usize },
}

/// Logs one Synapse mutation on the `audit` target, naming the object behind it.
pub fn mutation<K: Resource<DynamicType = ()>>(obj: &K, action: &str, subject: Subject<'_>) {
    let kind = K::kind(&());
    let namespace = obj.namespace().unwrap_or_default();
    let name = obj.name_any();
    match subject {
        Subject::Room { room_id } => tracing::info!(
            target: "audit", %kind, %namespace, %name, room_id, action, "synapse mutation"
        ),
        Subject::Account { user_id, fields } => tracing::info!(
            target: "audit", %kind, %namespace, %name, action, matrix_user = user_id,
            fields = ?fields, "synapse mutation"
        ),
        Subject::Sessions { user_id, count } => tracing::info!(
            target: "audit", %kind, %namespace, %name, action, matrix_user = user_id,
            sessions = count, "synapse mutation"
        ),
    }
}

/// Publishes an Event about `obj` off the reconcile's path: an Event is a
/// record, not a step the next Synapse call should wait for.
pub fn publish<K: Resource<DynamicType = ()>>(
    recorder: &Recorder,
    obj: &K,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(truncate(note)),
        action: action.into(),
        secondary: None,
    };
    let kind = K::kind(&());
    let object = key(obj);
    let (recorder, reference) = (recorder.clone(), obj.object_ref(&()));
    tokio::spawn(async move {
        if let Err(e) = recorder.publish(&event, &reference).await {
            tracing::warn!(%kind, %object, error = %e, "could not publish event");
        }
    });
}

/// Cuts a note to what the Events API accepts (1 kB), on a character boundary.
pub fn truncate(mut s: String) -> String {
    if s.len() > 900 {
        let mut cut = 900;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_notes_are_cut_on_a_character_boundary() {
        assert_eq!(truncate("short".into()), "short");
        let long = "é".repeat(600);
        let cut = truncate(long);
        assert!(cut.len() <= 903);
        assert!(cut.ends_with('…'));
    }
}
