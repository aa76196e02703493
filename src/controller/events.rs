//! Kubernetes Events, one per distinct message.
//!
//! kube's `Recorder` folds every Event with the same type, reason and action
//! about an object into one series, keeping the first note: a later
//! `LocalpartConflict` after the spec changed, or a second `RoomUpdated` with
//! other changes, would show the earlier text with a higher count. Here the
//! note is part of the series key, so a repeat of the same message counts up
//! and a different message is its own Event. Same publishing interface.

use crate::api::conditions::{self, Condition, Health};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Reporter};
use kube::{Api, Client};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// How long a published Event can still be counted up, as kube's recorder.
const SERIES_TTL: SignedDuration = SignedDuration::from_mins(6);

/// What makes two publications the same Event.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SeriesKey {
    regarding: (
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
    ),
    type_: &'static str,
    reason: String,
    action: String,
    note: Option<String>,
}

fn type_name(type_: EventType) -> &'static str {
    match type_ {
        EventType::Normal => "Normal",
        EventType::Warning => "Warning",
    }
}

fn series_key(ev: &Event, reference: &ObjectReference) -> SeriesKey {
    SeriesKey {
        regarding: (
            reference.uid.clone(),
            reference.namespace.clone(),
            reference.name.clone(),
            reference.kind.clone(),
        ),
        type_: type_name(ev.type_),
        reason: ev.reason.clone(),
        action: ev.action.clone(),
        note: ev.note.clone(),
    }
}

/// The Event to write: the previous one of its series counted up, or a new one.
fn next_event(
    previous: Option<&K8sEvent>,
    ev: &Event,
    reference: &ObjectReference,
    reporter: &Reporter,
    now: Timestamp,
) -> K8sEvent {
    if let Some(previous) = previous {
        let count = previous.series.as_ref().map_or(2, |s| s.count + 1);
        return K8sEvent {
            series: Some(EventSeries {
                count,
                last_observed_time: MicroTime(now),
            }),
            ..previous.clone()
        };
    }
    K8sEvent {
        action: Some(ev.action.clone()),
        reason: Some(ev.reason.clone()),
        note: ev.note.clone(),
        event_time: Some(MicroTime(now)),
        regarding: Some(reference.clone()),
        related: ev.secondary.clone(),
        metadata: ObjectMeta {
            namespace: reference.namespace.clone(),
            name: Some(format!(
                "{}.{:x}",
                reference.name.as_ref().unwrap_or(&reporter.controller),
                now.as_nanosecond()
            )),
            ..Default::default()
        },
        reporting_controller: Some(reporter.controller.clone()),
        reporting_instance: Some(
            reporter
                .instance
                .clone()
                .unwrap_or_else(|| reporter.controller.clone()),
        ),
        type_: Some(type_name(ev.type_).into()),
        ..Default::default()
    }
}

/// The Event a change of an object's Ready condition calls for, if any: a
/// Warning when the new state waits for a change (Stalled), else Normal.
pub fn on_transition(previous: Option<&Condition>, next: &Condition) -> Option<EventType> {
    let same = previous.is_some_and(|p| p.status == next.status && p.reason == next.reason);
    (!same).then_some(match conditions::health(next) {
        Health::Stalled => EventType::Warning,
        Health::Ready | Health::Reconciling => EventType::Normal,
    })
}

/// When an Event was last seen.
fn last_seen(event: &K8sEvent) -> Option<Timestamp> {
    event
        .series
        .as_ref()
        .map(|s| s.last_observed_time.0)
        .or_else(|| event.event_time.as_ref().map(|t| t.0))
}

/// Publishes Events; cheap to clone (one series cache per process).
#[derive(Clone)]
pub struct Recorder {
    client: Client,
    reporter: Reporter,
    series: Arc<Mutex<HashMap<SeriesKey, K8sEvent>>>,
}

impl Recorder {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Recorder {
            client,
            reporter,
            series: Arc::default(),
        }
    }

    /// Writes the Event, or counts up the same message's earlier one.
    pub async fn publish(
        &self,
        ev: &Event,
        reference: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let key = series_key(ev, reference);
        let event = {
            let mut series = self.series.lock().unwrap_or_else(|e| e.into_inner());
            series.retain(|_, e| last_seen(e).is_some_and(|t| t + SERIES_TTL > now));
            next_event(series.get(&key), ev, reference, &self.reporter, now)
        };
        let namespace = reference.namespace.as_deref().unwrap_or("default");
        let events: Api<K8sEvent> = Api::namespaced(self.client.clone(), namespace);
        if event.series.is_some() {
            let name = event.metadata.name.clone().unwrap_or_default();
            events
                .patch(&name, &PatchParams::default(), &Patch::Merge(&event))
                .await?;
        } else {
            events.create(&PostParams::default(), &event).await?;
        }
        self.series
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, event);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reporter() -> Reporter {
        Reporter {
            controller: "c".into(),
            instance: None,
        }
    }

    fn reference() -> ObjectReference {
        ObjectReference {
            kind: Some("MatrixUser".into()),
            namespace: Some("t".into()),
            name: Some("alice".into()),
            uid: Some("u1".into()),
            ..Default::default()
        }
    }

    fn event(note: &str) -> Event {
        Event {
            type_: EventType::Warning,
            reason: "LocalpartConflict".into(),
            note: Some(note.into()),
            action: "Reconcile".into(),
            secondary: None,
        }
    }

    #[test]
    fn ready_changes_are_events_repeats_are_not() {
        use crate::api::conditions::READY;
        let pending = Condition::new(READY, false, "Pending", "no room", Some(1));
        let duplicate = Condition::new(READY, false, "Duplicate", "older one", Some(1));
        let ready = Condition::new(READY, true, "Converged", "level 50", Some(1));
        assert!(matches!(
            on_transition(None, &pending),
            Some(EventType::Normal)
        ));
        assert!(on_transition(Some(&pending), &pending).is_none());
        assert!(matches!(
            on_transition(Some(&pending), &duplicate),
            Some(EventType::Warning)
        ));
        assert!(matches!(
            on_transition(Some(&duplicate), &ready),
            Some(EventType::Normal)
        ));
        // A new message with the same state is no new transition.
        let reworded = Condition::new(READY, true, "Converged", "level 100", Some(2));
        assert!(on_transition(Some(&ready), &reworded).is_none());
    }

    #[test]
    fn a_different_note_is_a_different_event() {
        let (a, b) = (event("first"), event("second"));
        assert_ne!(series_key(&a, &reference()), series_key(&b, &reference()));
        assert_eq!(
            series_key(&a, &reference()),
            series_key(&event("first"), &reference())
        );
    }

    #[test]
    fn the_same_note_counts_up_one_event() {
        let t0 = Timestamp::from_second(100).unwrap();
        let first = next_event(None, &event("x"), &reference(), &reporter(), t0);
        assert!(first.series.is_none());
        assert_eq!(first.note.as_deref(), Some("x"));
        assert_eq!(first.type_.as_deref(), Some("Warning"));
        let t1 = Timestamp::from_second(160).unwrap();
        let second = next_event(Some(&first), &event("x"), &reference(), &reporter(), t1);
        assert_eq!(second.metadata.name, first.metadata.name);
        assert_eq!(second.series.as_ref().map(|s| s.count), Some(2));
        let third = next_event(Some(&second), &event("x"), &reference(), &reporter(), t1);
        assert_eq!(third.series.as_ref().map(|s| s.count), Some(3));
        assert_eq!(last_seen(&third), Some(t1));
    }
}
