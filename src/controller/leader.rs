//! Leader election on a `coordination.k8s.io/v1` Lease, so that exactly one
//! replica reconciles at a time. The holder renews well within the lease
//! duration; a replica that cannot renew in time stops reconciling (the
//! process exits and is restarted); on shutdown the holder releases the
//! lease so another replica takes over at once instead of after expiry.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use std::time::Duration;

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

fn micro(t: &Option<MicroTime>) -> Option<Timestamp> {
    t.as_ref().map(|m| m.0)
}

/// Pure: the lease as read, and the time now → what to do.
pub fn decide(spec: Option<&LeaseSpec>, me: &str, now: Timestamp) -> Decision {
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
    let duration = SignedDuration::from_secs(spec.lease_duration_seconds.unwrap_or(15).into());
    let last = micro(&spec.renew_time).or(micro(&spec.acquire_time));
    match last {
        Some(last) => {
            let expires = last.saturating_add(duration).unwrap_or(last);
            if expires <= now {
                Decision::Acquire
            } else {
                let left = now.duration_until(expires);
                Decision::Wait(Duration::try_from(left).unwrap_or(Duration::from_secs(1)))
            }
        }
        // A holder that never renewed: treat as expired.
        None => Decision::Acquire,
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
async fn try_hold(api: &Api<Lease>, settings: &LeaseSettings) -> Result<Decision, kube::Error> {
    let now = Timestamp::now();
    match api.get_opt(&settings.name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(settings.name.clone()),
                    ..Default::default()
                },
                spec: Some(next_spec(None, settings, &Decision::Acquire, now)),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Decision::Acquire),
                // Another replica created it first.
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Decision::Wait(settings.renew)),
                Err(e) => Err(e),
            }
        }
        Some(mut lease) => {
            let decision = decide(lease.spec.as_ref(), &settings.identity, now);
            if let Decision::Wait(_) = decision {
                return Ok(decision);
            }
            lease.spec = Some(next_spec(lease.spec.as_ref(), settings, &decision, now));
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

/// Waits until this replica holds the lease.
pub async fn acquire(client: &Client, settings: &LeaseSettings) -> Result<(), LeaderError> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &settings.namespace);
    let mut announced = false;
    loop {
        match try_hold(&api, settings).await {
            Ok(Decision::Acquire | Decision::Renew) => {
                tracing::info!(lease = %settings.name, identity = %settings.identity, "leader election: acquired");
                return Ok(());
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

/// Renews until a renewal fails for longer than the lease lasts (then
/// returns the error: the caller must stop reconciling).
pub async fn keep(client: &Client, settings: &LeaseSettings) -> LeaderError {
    let api: Api<Lease> = Api::namespaced(client.clone(), &settings.namespace);
    let mut last_renewal = std::time::Instant::now();
    loop {
        tokio::time::sleep(settings.renew).await;
        match try_hold(&api, settings).await {
            Ok(Decision::Acquire | Decision::Renew) => last_renewal = std::time::Instant::now(),
            Ok(Decision::Wait(_)) => {
                tracing::error!("leader election: another replica took the lease");
                return LeaderError::Lost(settings.duration);
            }
            Err(e) => tracing::warn!(error = %e, "leader election: renewal failed; retrying"),
        }
        // Stop before the lease can expire under us: another replica may
        // take it then, and two leaders must never reconcile at once.
        if last_renewal.elapsed() + settings.renew >= settings.duration {
            return LeaderError::Lost(settings.duration);
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
        assert_eq!(decide(None, "a", at(0)), Decision::Acquire);
        let mut released = held_by("b", 0);
        released.holder_identity = None;
        assert_eq!(decide(Some(&released), "a", at(1)), Decision::Acquire);
    }

    #[test]
    fn the_holder_renews_and_others_wait_until_expiry() {
        let lease = held_by("b", 10);
        assert_eq!(decide(Some(&lease), "b", at(12)), Decision::Renew);
        assert_eq!(
            decide(Some(&lease), "a", at(12)),
            Decision::Wait(Duration::from_secs(13))
        );
        assert_eq!(decide(Some(&lease), "a", at(25)), Decision::Acquire);
        assert_eq!(decide(Some(&lease), "a", at(40)), Decision::Acquire);
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
