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
use std::hash::{DefaultHasher, Hash, Hasher};
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

/// What is kept of a published Event to count it up later: where it is,
/// its count and when it was last seen, not the Event itself (a tenant's
/// worth of Events in six minutes is thousands of them).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Published {
    namespace: String,
    name: String,
    count: i32,
    last_seen: Timestamp,
}

/// The write an Event publication makes.
#[derive(Debug)]
enum Write {
    /// A new Event.
    Create(Box<K8sEvent>),
    /// One more of an Event's series: only the series changes.
    CountUp { series: EventSeries },
}

/// The write for this publication (counting up the previous Event of its
/// series, or a new one), and what to remember of it.
fn next_event(
    previous: Option<&Published>,
    ev: &Event,
    reference: &ObjectReference,
    reporter: &Reporter,
    now: Timestamp,
) -> (Write, Published) {
    if let Some(previous) = previous {
        let count = previous.count + 1;
        let series = EventSeries {
            count,
            last_observed_time: MicroTime(now),
        };
        let published = Published {
            count,
            last_seen: now,
            ..previous.clone()
        };
        return (Write::CountUp { series }, published);
    }
    let namespace = reference
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = format!(
        "{}.{:x}",
        reference.name.as_ref().unwrap_or(&reporter.controller),
        now.as_nanosecond()
    );
    let event = K8sEvent {
        action: Some(ev.action.clone()),
        reason: Some(ev.reason.clone()),
        note: ev.note.clone(),
        event_time: Some(MicroTime(now)),
        regarding: Some(reference.clone()),
        related: ev.secondary.clone(),
        metadata: ObjectMeta {
            namespace: Some(namespace.clone()),
            name: Some(name.clone()),
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
    };
    let published = Published {
        namespace,
        name,
        // The first repeat makes a series of two.
        count: 1,
        last_seen: now,
    };
    (Write::Create(Box::new(event)), published)
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

/// Published Events by a digest of their series key. Expired entries are
/// dropped at most once a minute, not scanned for on every publication (a
/// scan per Event is quadratic in a tenant's first convergence).
#[derive(Default)]
struct SeriesCache {
    by_key: HashMap<u64, Published>,
    pruned: Option<Timestamp>,
}

const PRUNE_EVERY: SignedDuration = SignedDuration::from_mins(1);

impl SeriesCache {
    fn digest(key: &SeriesKey) -> u64 {
        let mut h = DefaultHasher::new();
        key.hash(&mut h);
        h.finish()
    }

    /// The series' last Event, if it can still be counted up.
    fn live(&mut self, key: &SeriesKey, now: Timestamp) -> Option<&Published> {
        if self.pruned.is_none_or(|t| t + PRUNE_EVERY <= now) {
            self.by_key.retain(|_, p| p.last_seen + SERIES_TTL > now);
            self.pruned = Some(now);
        }
        self.by_key
            .get(&Self::digest(key))
            .filter(|p| p.last_seen + SERIES_TTL > now)
    }

    fn remember(&mut self, key: &SeriesKey, published: Published) {
        self.by_key.insert(Self::digest(key), published);
    }
}

/// Publishes Events; cheap to clone (one series cache per process).
#[derive(Clone)]
pub struct Recorder {
    client: Client,
    reporter: Reporter,
    series: Arc<Mutex<SeriesCache>>,
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
        let (write, published) = {
            let mut series = self.series.lock().unwrap_or_else(|e| e.into_inner());
            let previous = series.live(&key, now);
            next_event(previous, ev, reference, &self.reporter, now)
        };
        let events: Api<K8sEvent> = Api::namespaced(self.client.clone(), &published.namespace);
        match write {
            Write::CountUp { series } => {
                let patch = serde_json::json!({ "series": series });
                events
                    .patch(
                        &published.name,
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await?;
            }
            Write::Create(event) => {
                events.create(&PostParams::default(), &event).await?;
            }
        }
        self.series
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remember(&key, published);
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
        let (write, first) = next_event(None, &event("x"), &reference(), &reporter(), t0);
        let Write::Create(created) = write else {
            panic!("a first publication creates: {write:?}")
        };
        assert_eq!(created.note.as_deref(), Some("x"));
        assert_eq!(created.type_.as_deref(), Some("Warning"));
        assert_eq!(created.metadata.name.as_deref(), Some(first.name.as_str()));
        assert_eq!(created.metadata.namespace.as_deref(), Some("t"));
        let t1 = Timestamp::from_second(160).unwrap();
        let (write, second) = next_event(Some(&first), &event("x"), &reference(), &reporter(), t1);
        assert!(matches!(write, Write::CountUp { series } if series.count == 2));
        assert_eq!(second.name, first.name);
        let (write, third) = next_event(Some(&second), &event("x"), &reference(), &reporter(), t1);
        assert!(matches!(write, Write::CountUp { series } if series.count == 3));
        assert_eq!(third.last_seen, t1);
    }

    #[test]
    fn the_series_cache_forgets_what_can_no_longer_be_counted_up() {
        let mut cache = SeriesCache::default();
        let (a, b) = (
            series_key(&event("a"), &reference()),
            series_key(&event("b"), &reference()),
        );
        let t0 = Timestamp::from_second(1_000).unwrap();
        let seen = |at: Timestamp| Published {
            namespace: "t".into(),
            name: "e".into(),
            count: 1,
            last_seen: at,
        };
        assert!(cache.live(&a, t0).is_none());
        cache.remember(&a, seen(t0));
        let t1 = t0 + SignedDuration::from_mins(5);
        cache.remember(&b, seen(t1));
        assert!(cache.live(&a, t1).is_some(), "within six minutes");
        let t2 = t0 + SERIES_TTL;
        assert!(cache.live(&a, t2).is_none(), "expired after six minutes");
        assert!(cache.live(&b, t2).is_some());
        let t3 = t1 + SERIES_TTL;
        assert!(cache.live(&b, t3).is_none());
        assert!(cache.by_key.is_empty(), "pruned");
    }
}
