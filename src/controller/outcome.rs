//! What a reconcile ended in, for the `outcome` label of
//! `openmeet_reconciles_total`: a reconcile that returns without error but
//! leaves its object refused or waiting is not a success.

use super::Error;
use crate::api::conditions::{self, Condition, Health};
use kube::runtime::controller::Action;
use std::cell::Cell;
use std::future::Future;

/// A reconcile's result, from a closed set of label values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The object is converged.
    Ready,
    /// Still working, or waiting for something that resolves by itself.
    Reconciling,
    /// Refused until its spec changes or an older claimant lets go.
    Stalled,
    /// The reconcile failed (it is retried with backoff).
    Error,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Outcome::Ready,
        Outcome::Reconciling,
        Outcome::Stalled,
        Outcome::Error,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ready => "ready",
            Outcome::Reconciling => "reconciling",
            Outcome::Stalled => "stalled",
            Outcome::Error => "error",
        }
    }

    /// The outcome of a reconcile: its error, else the health of the Ready
    /// condition it wrote, else (nothing to write: converged before, or
    /// waiting) the health of the object's Ready condition as it was.
    pub fn of(
        result: &Result<Action, Error>,
        written: Option<Health>,
        before: Option<&Condition>,
    ) -> Outcome {
        if result.is_err() {
            return Outcome::Error;
        }
        match written.or_else(|| before.map(conditions::health)) {
            Some(Health::Ready) => Outcome::Ready,
            Some(Health::Stalled) => Outcome::Stalled,
            Some(Health::Reconciling) | None => Outcome::Reconciling,
        }
    }
}

tokio::task_local! {
    /// The health of the first Ready condition the running reconcile wrote.
    static WRITTEN: Cell<Option<Health>>;
}

/// Called by the status writers: remembers the health of the Ready condition
/// for the reconcile running on this task. The first one counts: a room
/// writes its own status before its permissions'.
pub fn note(ready: &Condition) {
    let _ = WRITTEN.try_with(|written| {
        if written.get().is_none() {
            written.set(Some(conditions::health(ready)));
        }
    });
}

/// Runs a reconcile and says which Ready health it wrote, if any.
pub async fn noting<T>(work: impl Future<Output = T>) -> (T, Option<Health>) {
    WRITTEN
        .scope(Cell::new(None), async {
            let result = work.await;
            (result, WRITTEN.with(Cell::get))
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::conditions::READY;
    use std::time::Duration;

    fn ok() -> Result<Action, Error> {
        Ok(Action::requeue(Duration::from_secs(1)))
    }

    #[test]
    fn errors_win_then_what_was_written_then_what_was() {
        let failed: Result<Action, Error> = Err(Error::Invalid("x".into()));
        assert_eq!(
            Outcome::of(&failed, Some(Health::Ready), None),
            Outcome::Error
        );
        let converged = Condition::new(READY, true, "Converged", "", Some(1));
        let conflict = Condition::new(READY, false, "AliasConflict", "", Some(1));
        assert_eq!(
            Outcome::of(&ok(), Some(Health::Stalled), Some(&converged)),
            Outcome::Stalled
        );
        assert_eq!(Outcome::of(&ok(), None, Some(&converged)), Outcome::Ready);
        assert_eq!(Outcome::of(&ok(), None, Some(&conflict)), Outcome::Stalled);
        assert_eq!(Outcome::of(&ok(), None, None), Outcome::Reconciling);
    }

    #[tokio::test]
    async fn the_first_written_condition_counts() {
        let (_, written) = noting(async {
            note(&Condition::new(READY, false, "AliasConflict", "", Some(1)));
            tokio::task::yield_now().await;
            note(&Condition::new(READY, false, "RoomNotReady", "", Some(1)));
        })
        .await;
        assert_eq!(written, Some(Health::Stalled));
        let (_, nothing) = noting(async {}).await;
        assert_eq!(nothing, None);
        // Outside a reconcile, noting is harmless.
        note(&Condition::new(READY, true, "Converged", "", Some(1)));
    }
}
