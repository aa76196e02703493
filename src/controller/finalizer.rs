//! The operator's finalizer, kept with server-side apply under its one field
//! manager: adding it is idempotent (no lost races on a stale cache), and
//! the reconcile that adds it goes on to converge in the same pass instead
//! of waiting for the next watch event.

use super::{Error, FINALIZER};
use crate::api::FIELD_MANAGER;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;
use std::fmt::Debug;
use std::future::Future;

/// Which way a reconcile goes: the only top-level branch.
pub enum Phase {
    /// Converge; carries the resourceVersion our finalizer write produced, if any.
    Apply(Option<String>),
    /// The object is being deleted and still carries our finalizer.
    Cleanup,
    /// Being deleted, and not ours to clean up (anymore).
    Done,
}

fn has_finalizer<K: Resource>(obj: &K) -> bool {
    obj.meta()
        .finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|x| x == FINALIZER))
}

/// Decides the phase, adding the finalizer first when it is missing.
pub async fn phase<K>(api: &Api<K>, obj: &K) -> Result<Phase, Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    if obj.meta().deletion_timestamp.is_some() {
        return Ok(if has_finalizer(obj) {
            Phase::Cleanup
        } else {
            Phase::Done
        });
    }
    if has_finalizer(obj) {
        return Ok(Phase::Apply(None));
    }
    let patch = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": {"name": obj.name_any(), "finalizers": [FINALIZER]},
    });
    let written = api
        .patch(
            &obj.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    Ok(Phase::Apply(written.resource_version()))
}

/// Removes our finalizer once cleanup is done; an object already gone is fine.
pub async fn release<K>(api: &Api<K>, obj: &K) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let Some(index) = obj
        .meta()
        .finalizers
        .as_ref()
        .and_then(|f| f.iter().position(|x| x == FINALIZER))
    else {
        return Ok(());
    };
    // A JSON patch guarded by a test: whoever else edits the list meanwhile
    // makes this fail and the reconcile retry, never remove the wrong entry.
    let patch: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": format!("/metadata/finalizers/{index}"), "value": FINALIZER},
        {"op": "remove", "path": format!("/metadata/finalizers/{index}")},
    ]))
    .map_err(|e| Error::Invalid(e.to_string()))?;
    match api
        .patch(
            &obj.name_any(),
            &PatchParams::default(),
            &Patch::<()>::Json(patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Runs one reconcile: cleanup (then release) or apply, by phase.
pub async fn reconcile<K, A, C, FA, FC>(
    api: &Api<K>,
    obj: &K,
    apply: A,
    cleanup: C,
) -> Result<Action, Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    A: FnOnce(Option<String>) -> FA,
    C: FnOnce() -> FC,
    FA: Future<Output = Result<Action, Error>>,
    FC: Future<Output = Result<Cleanup, Error>>,
{
    match phase(api, obj).await? {
        Phase::Apply(version) => apply(version).await,
        Phase::Cleanup => match cleanup().await? {
            Cleanup::Done => {
                release(api, obj).await?;
                Ok(Action::await_change())
            }
            // Still running in Synapse: look again, finalizer kept.
            Cleanup::Pending(after) => Ok(Action::requeue(after)),
        },
        Phase::Done => Ok(Action::await_change()),
    }
}

/// Where a cleanup stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cleanup {
    /// Nothing left to do in Synapse: the finalizer may go.
    Done,
    /// Work Synapse is still doing (a room purge): check again after this long.
    Pending(std::time::Duration),
}
