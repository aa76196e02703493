//! Leader election on a `coordination.k8s.io/v1` Lease, so that exactly one
//! replica acts at a time. The holder renews well within the lease duration,
//! each renewal bounded by the time the lease has left; the moment it can no
//! longer be sure it holds the lease it closes its Synapse write gate (no
//! further write leaves the process, in-flight reconciles stop at their next
//! write) and stops reconciling (the process exits and is restarted). A
//! standby judges expiry by seeing the record unchanged for a whole lease
//! duration on its own clock, never by comparing the holder's `renewTime`
//! with its clock: clocks of two machines may disagree. On shutdown the
//! holder releases the lease so another replica takes over at once.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("Lease API: {0}")]
    Kube(#[from] kube::Error),
    #[error("leadership lost: the lease was not renewed within {0:?}")]
    Lost(Duration),
}

#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// How long a lease holds without renewal.
    pub duration: Duration,
    /// How often the holder renews (well under `duration`).
    pub renew: Duration,
}

/// What to do with the lease as observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nobody holds it, or the holder let it expire: take it.
    Acquire,
    /// We hold it: renew.
    Renew,
    /// Someone else holds it: try again after this long.
    Wait(Duration),
}

/// What identifies one version of the lease record: any write changes it.
pub fn record_of(lease: &Lease) -> Option<String> {
    lease.metadata.resource_version.clone()
}

/// Pure: the lease as read, and how long this replica has seen that same
/// record unchanged on its own clock → what to do.
pub fn decide(spec: Option<&LeaseSpec>, me: &str, unchanged_for: Duration) -> Decision {
    let Some(spec) = spec else {
        return Decision::Acquire;
    };
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder.is_empty() {
        return Decision::Acquire;
    }
    if holder == me {
        return Decision::Renew;
    }
    let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(1) as u64);
    if unchanged_for >= duration {
        Decision::Acquire
    } else {
        Decision::Wait(duration - unchanged_for)
    }
}

/// Tracks since when (local clock) the same lease record has been seen.
#[derive(Debug, Default)]
pub struct Observation {
    seen: Option<(Option<String>, Instant)>,
}

impl Observation {
    /// Notes `record` as seen now; returns how long it has been unchanged.
    pub fn see(&mut self, record: Option<String>, now: Instant) -> Duration {
        match &self.seen {
            Some((same, since)) if *same == record => now.saturating_duration_since(*since),
            _ => {
                self.seen = Some((record, now));
                Duration::ZERO
            }
        }
    }
}

/// The spec we write when acquiring or renewing.
pub fn next_spec(
    current: Option<&LeaseSpec>,
    settings: &LeaseSettings,
    decision: &Decision,
    now: Timestamp,
) -> LeaseSpec {
    let transitions = current.and_then(|s| s.lease_transitions).unwrap_or(0);
    let acquiring = *decision == Decision::Acquire;
    LeaseSpec {
        holder_identity: Some(settings.identity.clone()),
        lease_duration_seconds: Some(settings.duration.as_secs().max(1) as i32),
        acquire_time: if acquiring {
            Some(MicroTime(now))
        } else {
            current.and_then(|s| s.acquire_time.clone())
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if acquiring && current.is_some() {
            transitions + 1
        } else {
            transitions
        }),
        ..Default::default()
    }
}

/// One attempt: read the lease and take or renew it if we may. Returns
/// whether we hold it now, or how long to wait.
async fn try_hold(
    api: &Api<Lease>,
    settings: &LeaseSettings,
    observation: &mut Observation,
) -> Result<Decision, kube::Error> {
    match api.get_opt(&settings.name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(settings.name.clone()),
                    ..Default::default()
                },
                spec: Some(next_spec(
                    None,
                    settings,
                    &Decision::Acquire,
                    Timestamp::now(),
                )),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Decision::Acquire),
                // Another replica created it first.
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Decision::Wait(settings.renew)),
                Err(e) => Err(e),
            }
        }
        Some(mut lease) => {
            let unchanged_for = observation.see(record_of(&lease), Instant::now());
            let decision = decide(lease.spec.as_ref(), &settings.identity, unchanged_for);
            if let Decision::Wait(_) = decision {
                return Ok(decision);
            }
            lease.spec = Some(next_spec(
                lease.spec.as_ref(),
                settings,
                &decision,
                Timestamp::now(),
            ));
            lease.metadata.managed_fields = None;
            // `replace` carries the resourceVersion we read: a concurrent
            // writer makes it fail with 409 instead of both winning.
            match api
                .replace(&settings.name, &PostParams::default(), &lease)
                .await
            {
                Ok(_) => Ok(decision),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Decision::Wait(settings.renew)),
                Err(e) => Err(e),
            }
        }
    }
}

/// Waits until this replica holds the lease. Returns the instant the
/// winning write was sent: the lease holds for a duration from then.
pub async fn acquire(client: &Client, settings: &LeaseSettings) -> Result<Instant, LeaderError> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &settings.namespace);
    let mut announced = false;
    let mut observation = Observation::default();
    loop {
        let sent = Instant::now();
        match try_hold(&api, settings, &mut observation).await {
            Ok(Decision::Acquire | Decision::Renew) => {
                tracing::info!(lease = %settings.name, identity = %settings.identity, "leader election: acquired");
                return Ok(sent);
            }
            Ok(Decision::Wait(left)) => {
                if !announced {
                    tracing::info!(lease = %settings.name, "leader election: another replica leads; standing by");
                    announced = true;
                }
                // Poll at the renew period, sooner if the lease ends sooner.
                tokio::time::sleep(left.min(settings.renew).max(Duration::from_millis(200))).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "leader election: lease not readable; retrying");
                tokio::time::sleep(settings.renew).await;
            }
        }
    }
}

/// How long before the lease could expire the holder gives up: a margin for
/// the time between sending a renewal and the API server recording it.
const SAFETY_MARGIN: Duration = Duration::from_millis(500);

/// Until when a lease won (or renewed) by a write sent at `sent` is surely ours.
pub fn held_until(sent: Instant, settings: &LeaseSettings) -> Instant {
    sent + settings.duration.saturating_sub(SAFETY_MARGIN)
}

/// Renews until it can no longer be sure it holds the lease, then closes
/// `gate` (no Synapse write leaves the process after that) and returns the
/// error: the caller must stop reconciling. `held_since` is when the write
/// that won the lease was sent. Each renewal is bounded by the time the
/// lease has left, so a hung API server cannot stretch leadership.
pub async fn keep(
    client: &Client,
    settings: &LeaseSettings,
    held_since: Instant,
    gate: &crate::synapse::WriteGate,
) -> LeaderError {
    let api: Api<Lease> = Api::namespaced(client.clone(), &settings.namespace);
    let lost = |why: &str| {
        gate.close();
        tracing::error!(
            why,
            "leader election: leadership lost; Synapse writes stopped"
        );
        LeaderError::Lost(settings.duration)
    };
    // The lease is ours until `expires` (counted from a renewal's sending);
    // the gate shuts by itself then, whatever this task is doing.
    let mut expires = held_until(held_since, settings);
    gate.open_until(expires);
    let mut observation = Observation::default();
    loop {
        let wake = (Instant::now() + settings.renew).min(expires);
        tokio::time::sleep_until(wake.into()).await;
        let sent = Instant::now();
        if sent >= expires {
            return lost("not renewed in time");
        }
        let left = expires - sent;
        match tokio::time::timeout(left, try_hold(&api, settings, &mut observation)).await {
            Ok(Ok(Decision::Acquire | Decision::Renew)) => {
                expires = held_until(sent, settings);
                gate.open_until(expires);
            }
            Ok(Ok(Decision::Wait(_))) => return lost("another replica took the lease"),
            Ok(Err(e)) => tracing::warn!(error = %e, "leader election: renewal failed; retrying"),
            Err(_) => return lost("renewal did not answer before the lease ran out"),
        }
    }
}

/// Gives the lease up (on shutdown) so another replica takes over at once.
pub async fn release(client: &Client, settings: &LeaseSettings) {
    let api: Api<Lease> = Api::namespaced(client.clone(), &settings.namespace);
    let Ok(Some(mut lease)) = api.get_opt(&settings.name).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(settings.identity.as_str()) {
        return;
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    lease.metadata.managed_fields = None;
    match api
        .replace(&settings.name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => tracing::info!(lease = %settings.name, "leader election: released"),
        Err(e) => {
            tracing::warn!(error = %e, "leader election: release failed; the lease expires on its own")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn held_by(who: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(who.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(at(renewed))),
            acquire_time: Some(MicroTime(at(0))),
            lease_transitions: Some(2),
            ..Default::default()
        }
    }

    #[test]
    fn an_absent_or_released_lease_is_taken() {
        assert_eq!(decide(None, "a", Duration::ZERO), Decision::Acquire);
        let mut released = held_by("b", 0);
        released.holder_identity = None;
        assert_eq!(
            decide(Some(&released), "a", Duration::ZERO),
            Decision::Acquire
        );
    }

    #[test]
    fn the_holder_renews_and_others_wait_a_full_duration_on_their_own_clock() {
        let lease = held_by("b", 10);
        assert_eq!(decide(Some(&lease), "b", Duration::ZERO), Decision::Renew);
        assert_eq!(
            decide(Some(&lease), "a", Duration::from_secs(2)),
            Decision::Wait(Duration::from_secs(13))
        );
        assert_eq!(
            decide(Some(&lease), "a", Duration::from_secs(15)),
            Decision::Acquire
        );
        // A renewTime far in the past (a skewed clock) is no reason to take
        // over: only the local observation counts.
        let stale_looking = held_by("b", -100_000);
        assert_eq!(
            decide(Some(&stale_looking), "a", Duration::ZERO),
            Decision::Wait(Duration::from_secs(15))
        );
    }

    #[test]
    fn an_observation_restarts_whenever_the_record_changes() {
        let start = Instant::now();
        let mut o = Observation::default();
        assert_eq!(o.see(Some("1".into()), start), Duration::ZERO);
        assert_eq!(
            o.see(Some("1".into()), start + Duration::from_secs(7)),
            Duration::from_secs(7)
        );
        // The holder renewed: the clock starts again.
        assert_eq!(
            o.see(Some("2".into()), start + Duration::from_secs(8)),
            Duration::ZERO
        );
        assert_eq!(
            o.see(Some("2".into()), start + Duration::from_secs(9)),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn taking_over_counts_a_transition_and_renewing_does_not() {
        let settings = LeaseSettings {
            name: "l".into(),
            namespace: "ns".into(),
            identity: "a".into(),
            duration: Duration::from_secs(15),
            renew: Duration::from_secs(5),
        };
        let lease = held_by("b", 0);
        let taken = next_spec(Some(&lease), &settings, &Decision::Acquire, at(20));
        assert_eq!(taken.holder_identity.as_deref(), Some("a"));
        assert_eq!(taken.lease_transitions, Some(3));
        assert_eq!(taken.acquire_time, Some(MicroTime(at(20))));
        let renewed = next_spec(Some(&taken), &settings, &Decision::Renew, at(25));
        assert_eq!(renewed.lease_transitions, Some(3));
        assert_eq!(renewed.acquire_time, Some(MicroTime(at(20))));
        assert_eq!(renewed.renew_time, Some(MicroTime(at(25))));
    }
}
