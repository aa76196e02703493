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

#[cfg(test)]
mod tests {
    //! The finalizer's exchange with the API server, request by request.
    use super::*;
    use crate::api::MatrixRoom;
    use crate::controller::scripted::{self, not_found, refuse, stored};
    use http::Method;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    fn room(extra_meta: &str) -> MatrixRoom {
        serde_yaml::from_str(&format!(
            r#"
apiVersion: matrix.openmeet.net/v1alpha1
kind: MatrixRoom
metadata: {{name: r, namespace: t, generation: 1, resourceVersion: "7"{extra_meta}}}
spec: {{name: R, alias: r}}
"#
        ))
        .unwrap()
    }

    /// Runs one reconcile; says what it returned and which branch ran.
    async fn run(
        api: &Api<MatrixRoom>,
        obj: &MatrixRoom,
        cleanup: Result<Cleanup, Error>,
    ) -> (Result<Action, Error>, Option<Option<String>>, bool) {
        let applied = std::sync::Mutex::new(None);
        let cleaned = AtomicBool::new(false);
        let result = reconcile(
            api,
            obj,
            |version| {
                *applied.lock().unwrap() = Some(version);
                async { Ok(Action::requeue(Duration::from_secs(300))) }
            },
            || {
                cleaned.store(true, Ordering::SeqCst);
                async { cleanup }
            },
        )
        .await;
        (result, applied.into_inner().unwrap(), cleaned.into_inner())
    }

    #[tokio::test]
    async fn a_new_object_gets_the_finalizer_by_forced_apply_and_converges_in_the_same_pass() {
        let obj = room("");
        let answer = obj.clone();
        let (client, recorded) = scripted::client(move |_| stored(&answer, "8"));
        let api = Api::namespaced(client, "t");
        let (result, applied, cleaned) = run(&api, &obj, Ok(Cleanup::Done)).await;
        assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(300)));
        // The apply goes on with the version our own write produced.
        assert_eq!(applied, Some(Some("8".into())));
        assert!(!cleaned);
        let sent = recorded.expect(1).await;
        sent[0].assert_forced_apply();
        assert_eq!(
            sent[0].path,
            "/apis/matrix.openmeet.net/v1alpha1/namespaces/t/matrixrooms/r"
        );
        // Only the finalizer: an apply of more would take ownership of the spec.
        assert_eq!(
            sent[0].body,
            json!({"apiVersion": "matrix.openmeet.net/v1alpha1", "kind": "MatrixRoom",
                   "metadata": {"name": "r", "finalizers": [FINALIZER]}})
        );
    }

    #[tokio::test]
    async fn an_object_carrying_the_finalizer_costs_no_request() {
        let (client, recorded) = scripted::client(refuse);
        let api = Api::namespaced(client, "t");
        let obj = room(&format!(", finalizers: [{FINALIZER}]"));
        let (result, applied, _) = run(&api, &obj, Ok(Cleanup::Done)).await;
        assert!(result.is_ok());
        assert_eq!(applied, Some(None));
        recorded.expect(0).await;
    }

    #[tokio::test]
    async fn a_finished_cleanup_removes_only_our_entry_guarded_by_a_test() {
        let obj = room(&format!(
            ", deletionTimestamp: '2026-11-27T00:00:00Z', finalizers: [example.com/other, {FINALIZER}]"
        ));
        let answer = obj.clone();
        let (client, recorded) = scripted::client(move |_| stored(&answer, "9"));
        let api = Api::namespaced(client, "t");
        let (result, applied, cleaned) = run(&api, &obj, Ok(Cleanup::Done)).await;
        assert_eq!(result.unwrap(), Action::await_change());
        assert!(cleaned);
        assert_eq!(applied, None);
        let sent = recorded.expect(1).await;
        assert_eq!(sent[0].method, Method::PATCH);
        assert_eq!(
            sent[0].content_type.as_deref(),
            Some("application/json-patch+json")
        );
        assert_eq!(
            sent[0].body,
            json!([
                {"op": "test", "path": "/metadata/finalizers/1", "value": FINALIZER},
                {"op": "remove", "path": "/metadata/finalizers/1"},
            ])
        );
    }

    #[tokio::test]
    async fn an_object_gone_before_its_finalizer_is_released_is_done() {
        let (client, recorded) = scripted::client(|_| not_found());
        let api = Api::namespaced(client, "t");
        let obj = room(&format!(
            ", deletionTimestamp: '2026-11-27T00:00:00Z', finalizers: [{FINALIZER}]"
        ));
        let (result, _, _) = run(&api, &obj, Ok(Cleanup::Done)).await;
        assert_eq!(result.unwrap(), Action::await_change());
        recorded.expect(1).await;
    }

    #[tokio::test]
    async fn work_still_running_in_synapse_keeps_the_finalizer() {
        let (client, recorded) = scripted::client(refuse);
        let api = Api::namespaced(client, "t");
        let obj = room(&format!(
            ", deletionTimestamp: '2026-11-27T00:00:00Z', finalizers: [{FINALIZER}]"
        ));
        let wait = Duration::from_secs(2);
        let (result, _, cleaned) = run(&api, &obj, Ok(Cleanup::Pending(wait))).await;
        assert_eq!(result.unwrap(), Action::requeue(wait));
        assert!(cleaned);
        recorded.expect(0).await;
    }

    #[tokio::test]
    async fn a_failed_cleanup_keeps_the_finalizer_and_reports_the_error() {
        let (client, recorded) = scripted::client(refuse);
        let api = Api::namespaced(client, "t");
        let obj = room(&format!(
            ", deletionTimestamp: '2026-11-27T00:00:00Z', finalizers: [{FINALIZER}]"
        ));
        let failure = Err(Error::Invalid("synapse said no".into()));
        let (result, _, _) = run(&api, &obj, failure).await;
        assert!(matches!(result, Err(Error::Invalid(_))));
        recorded.expect(0).await;
    }

    #[tokio::test]
    async fn an_object_deleted_without_our_finalizer_is_left_alone() {
        let (client, recorded) = scripted::client(refuse);
        let api = Api::namespaced(client, "t");
        let obj =
            room(", deletionTimestamp: '2026-11-27T00:00:00Z', finalizers: [example.com/other]");
        let (result, applied, cleaned) = run(&api, &obj, Ok(Cleanup::Done)).await;
        assert_eq!(result.unwrap(), Action::await_change());
        assert_eq!(applied, None);
        assert!(!cleaned);
        recorded.expect(0).await;
    }
}
