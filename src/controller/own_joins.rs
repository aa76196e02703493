//! Joins the room controller is making right now, so the application-service
//! endpoint of the same process can tell them from a member's own doing.
//!
//! Synapse's admin join is sent as the joining user, so the membership event
//! it pushes looks like anyone's. Marking it as drift costs an annotation
//! write and a reconcile that reads the room's whole state to find nothing
//! to do: once for every member the operator adds. A join recorded here is
//! recognised once, for a while; anything else (another replica's joins, a
//! join after the entry expired, a full map) is marked as before, which is
//! only the old cost, never a missed drift.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a recorded join waits for its event. Synapse pushes within
/// seconds; a feed held up longer is followed by a resync anyway.
const TTL: Duration = Duration::from_secs(600);

/// Entries kept at most: past this, joins are not recorded (and so marked).
const CAPACITY: usize = 100_000;

/// How often expired entries are dropped (entries of joins whose event
/// went to another replica's endpoint are never taken).
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Room id and user id of the joins the operator made. The default records
/// nothing: a process that serves no endpoint has no one to tell.
#[derive(Debug, Default)]
pub struct OwnJoins {
    recording: bool,
    pending: Mutex<Pending>,
}

#[derive(Debug, Default)]
struct Pending {
    joins: HashMap<(String, String), Instant>,
    pruned: Option<Instant>,
}

impl OwnJoins {
    /// A record for an endpoint served in this process.
    pub fn recording() -> Self {
        OwnJoins {
            recording: true,
            pending: Mutex::default(),
        }
    }

    /// Records a join about to be made.
    pub fn expect(&self, room_id: &str, user_id: &str) {
        self.expect_at(room_id, user_id, Instant::now());
    }

    /// True once for a join recorded less than [`TTL`] ago; forgets it.
    pub fn take(&self, room_id: &str, user_id: &str) -> bool {
        self.take_at(room_id, user_id, Instant::now())
    }

    fn expect_at(&self, room_id: &str, user_id: &str, now: Instant) {
        if !self.recording {
            return;
        }
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let due = pending
            .pruned
            .is_none_or(|at| now.duration_since(at) >= PRUNE_EVERY);
        if due || pending.joins.len() >= CAPACITY {
            pending.joins.retain(|_, at| now.duration_since(*at) < TTL);
            pending.pruned = Some(now);
        }
        if pending.joins.len() < CAPACITY {
            pending
                .joins
                .insert((room_id.to_string(), user_id.to_string()), now);
        }
    }

    fn take_at(&self, room_id: &str, user_id: &str, now: Instant) -> bool {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending
            .joins
            .remove(&(room_id.to_string(), user_id.to_string()))
            .is_some_and(|at| now.duration_since(at) < TTL)
    }

    pub fn len(&self) -> usize {
        let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.joins.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_join_is_recognised_once() {
        let joins = OwnJoins::recording();
        joins.expect("!r:x", "@a:x");
        assert!(!joins.take("!r:x", "@b:x"));
        assert!(!joins.take("!other:x", "@a:x"));
        assert!(joins.take("!r:x", "@a:x"));
        // A second join of the same user (they left and came back) is theirs.
        assert!(!joins.take("!r:x", "@a:x"));
        assert!(joins.is_empty());
    }

    #[test]
    fn without_an_endpoint_nothing_is_recorded() {
        let joins = OwnJoins::default();
        joins.expect("!r:x", "@a:x");
        assert!(joins.is_empty());
        assert!(!joins.take("!r:x", "@a:x"));
    }

    #[test]
    fn entries_whose_event_never_came_are_dropped_within_a_minute_of_expiring() {
        let joins = OwnJoins::recording();
        let then = Instant::now();
        joins.expect_at("!r:x", "@a:x", then);
        joins.expect_at("!r:x", "@b:x", then + TTL);
        assert_eq!(joins.len(), 1, "@a's expired entry is gone");
        // Not pruned again within the minute: @b stays until then.
        joins.expect_at("!r:x", "@c:x", then + TTL + TTL);
        assert_eq!(joins.len(), 1, "only @c is left");
    }

    #[test]
    fn an_old_entry_is_not_recognised() {
        let joins = OwnJoins::recording();
        let then = Instant::now();
        joins.expect_at("!r:x", "@a:x", then);
        assert!(!joins.take_at("!r:x", "@a:x", then + TTL));
    }

    #[test]
    fn a_full_map_drops_expired_entries_then_stops_recording() {
        let joins = OwnJoins::recording();
        let then = Instant::now();
        for i in 0..CAPACITY {
            joins.expect_at("!r:x", &format!("@{i}:x"), then);
        }
        // All still fresh: the newcomer is not recorded (and will be marked).
        joins.expect_at("!r:x", "@new:x", then + Duration::from_secs(1));
        assert_eq!(joins.len(), CAPACITY);
        assert!(!joins.take_at("!r:x", "@new:x", then + Duration::from_secs(2)));
        // Once they have expired, they make room.
        joins.expect_at("!r:x", "@new:x", then + TTL);
        assert_eq!(joins.len(), 1);
        assert!(joins.take_at("!r:x", "@new:x", then + TTL));
    }
}
