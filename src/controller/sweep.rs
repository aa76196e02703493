//! The sweep: how long a converged object is trusted without reading
//! Synapse, and the pace of the reads that confirm it again.
//!
//! Room drift reaches the operator through the event feed, and every change
//! to the desired state changes the object's digest; what neither shows is
//! an account or room changed out of band where no event reaches the feed
//! (an admin's edit of an account, a feed outage). So an object whose status
//! confirms its current digest is trusted until the confirmation is a sweep
//! period old; then it is read again, at a pace that never spends more than
//! the sweep budget (Synapse requests per second), spread evenly: each read
//! reserves the next free slot, and idle time earns no burst.

use crate::api::Confirmed;
use k8s_openapi::jiff::Timestamp;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What a reconcile may take as known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trust {
    /// Confirmed for this digest within the period: no Synapse read, until
    /// the confirmation comes due after this long.
    Trusted { due_in: Duration },
    /// Confirmed for this digest, a period ago or more: the sweep reads it.
    Due,
    /// Nothing confirmed for this digest: converge now.
    Unconfirmed,
}

/// Pure: the status's confirmation, the digest of what is desired now, the
/// time now, and the sweep period → what the reconcile may trust.
pub fn judge(
    confirmed: Option<&Confirmed>,
    digest: &str,
    now: Timestamp,
    period: Duration,
) -> Trust {
    let Some(confirmed) = confirmed.filter(|c| c.digest == digest) else {
        return Trust::Unconfirmed;
    };
    // A confirmation from the future (another replica's clock ahead of
    // ours) counts as made now.
    let age = now
        .duration_since(confirmed.at.0)
        .try_into()
        .unwrap_or(Duration::ZERO);
    match period.checked_sub(age) {
        Some(left) if !left.is_zero() => Trust::Trusted { due_in: left },
        _ => Trust::Due,
    }
}

/// The later of two confirmations of `digest`.
fn latest<'a>(
    a: Option<&'a Confirmed>,
    b: Option<&'a Confirmed>,
    digest: &str,
) -> Option<&'a Confirmed> {
    let of_digest = |c: Option<&'a Confirmed>| c.filter(|c| c.digest == digest);
    match (of_digest(a), of_digest(b)) {
        (Some(a), Some(b)) => Some(if b.at.0 > a.at.0 { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// The sweep's period and the pacer of its reads, shared by every
/// controller of the process.
#[derive(Debug)]
pub struct Sweep {
    period: Duration,
    /// One Synapse request's share of a second at the budget.
    spacing: Duration,
    pacer: Mutex<Pacer>,
}

#[derive(Debug, Default)]
struct Pacer {
    next_free: Option<Instant>,
    /// Each waiting object's slot.
    reserved: HashMap<String, Instant>,
}

/// Reservations never taken (the object went away) are dropped this late.
const STALE_RESERVATION: Duration = Duration::from_secs(3600);

impl Sweep {
    /// `budget`: Synapse requests per second the sweep may spend.
    pub fn new(period: Duration, budget: f64) -> Self {
        Sweep {
            period,
            spacing: Duration::from_secs_f64(1.0 / budget.max(0.001)),
            pacer: Mutex::default(),
        }
    }

    /// What may be trusted, from the status's confirmation and the one
    /// this process wrote last (the status read may predate it).
    pub fn judge(
        &self,
        in_status: Option<&Confirmed>,
        here: Option<&Confirmed>,
        digest: &str,
    ) -> Trust {
        judge(
            latest(in_status, here, digest),
            digest,
            Timestamp::now(),
            self.period,
        )
    }

    /// A due object's turn to read `cost` requests' worth: `None` to go
    /// now, else how long to wait for the slot reserved for it.
    pub fn reserve(&self, key: &str, cost: u32) -> Option<Duration> {
        self.reserve_at(key, cost, Instant::now())
    }

    fn reserve_at(&self, key: &str, cost: u32, now: Instant) -> Option<Duration> {
        let mut pacer = self.pacer.lock().expect("sweep lock");
        if let Some(slot) = pacer.reserved.get(key).copied() {
            if slot <= now {
                pacer.reserved.remove(key);
                return None;
            }
            return Some(slot - now);
        }
        let slot = pacer.next_free.map_or(now, |free| free.max(now));
        pacer.next_free = Some(slot + self.spacing * cost.max(1));
        if slot <= now {
            return None;
        }
        if pacer.reserved.len() % 1024 == 1023 {
            pacer
                .reserved
                .retain(|_, s| now.saturating_duration_since(*s) < STALE_RESERVATION);
        }
        pacer.reserved.insert(key.to_string(), slot);
        Some(slot - now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    fn confirmed(digest: &str, secs: i64) -> Confirmed {
        Confirmed {
            digest: digest.into(),
            at: Time(at(secs)),
        }
    }

    #[test]
    fn an_unchanged_object_is_trusted_for_a_period_then_due() {
        let period = Duration::from_secs(600);
        let c = confirmed("d1", 1_000);
        assert_eq!(
            judge(Some(&c), "d1", at(1_100), period),
            Trust::Trusted {
                due_in: Duration::from_secs(500)
            }
        );
        assert_eq!(judge(Some(&c), "d1", at(1_600), period), Trust::Due);
        assert_eq!(judge(Some(&c), "d1", at(9_000), period), Trust::Due);
        // A clock behind the confirming replica's.
        assert_eq!(
            judge(Some(&c), "d1", at(900), period),
            Trust::Trusted { due_in: period }
        );
    }

    #[test]
    fn the_later_confirmation_of_the_digest_counts() {
        let (old, new, other) = (
            confirmed("d1", 1_000),
            confirmed("d1", 2_000),
            confirmed("d2", 3_000),
        );
        assert_eq!(latest(Some(&old), Some(&new), "d1"), Some(&new));
        assert_eq!(latest(Some(&new), Some(&old), "d1"), Some(&new));
        assert_eq!(
            latest(Some(&other), Some(&old), "d1"),
            Some(&old),
            "a status read before our write"
        );
        assert_eq!(latest(Some(&other), None, "d1"), None);
    }

    #[test]
    fn a_changed_or_unconfirmed_object_is_converged_now() {
        let period = Duration::from_secs(600);
        let c = confirmed("d1", 1_000);
        assert_eq!(judge(Some(&c), "d2", at(1_001), period), Trust::Unconfirmed);
        assert_eq!(judge(None, "d1", at(1_001), period), Trust::Unconfirmed);
    }

    #[test]
    fn due_reads_are_spread_at_the_budget_and_idle_time_earns_no_burst() {
        // Two requests a second: a slot every 500 ms per request.
        let sweep = Sweep::new(Duration::from_secs(3600), 2.0);
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(sweep.reserve_at("a", 1, t0), None, "the first goes now");
        assert_eq!(sweep.reserve_at("b", 1, t0), Some(ms(500)));
        assert_eq!(sweep.reserve_at("c", 2, t0), Some(ms(1000)));
        assert_eq!(sweep.reserve_at("d", 1, t0), Some(ms(2000)), "c cost two");
        // Asking again keeps the slot; at the slot it is taken.
        assert_eq!(sweep.reserve_at("b", 1, t0 + ms(100)), Some(ms(400)));
        assert_eq!(sweep.reserve_at("b", 1, t0 + ms(500)), None);
        assert_eq!(sweep.reserve_at("b", 1, t0 + ms(600)), Some(ms(1900)));
        // After an idle minute: one now, the next a spacing later.
        let later = t0 + Duration::from_secs(60);
        assert_eq!(sweep.reserve_at("e", 1, later), None);
        assert_eq!(sweep.reserve_at("f", 1, later), Some(ms(500)));
    }
}
