//! Who a platform identity is in Matrix: tenant → namespaces labelled
//! `matrix.openmeet.net/tenant`, subject → the one `MatrixUser` there whose
//! `spec.subject` matches. Read from watch caches, never a request per call.

use crate::api::{conditions, MatrixUser, TENANT_LABEL};
use crate::controller::index::{keys, Index};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Namespace;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Why an identity maps to no usable account. Each has a stable code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    #[error("no namespace belongs to tenant {0:?}")]
    UnknownTenant(String),
    #[error("no Matrix account is declared for this user in the tenant")]
    UserNotFound,
    #[error("the Matrix account is not ready yet: {0}")]
    NotReady(String),
    #[error("the Matrix account is locked")]
    Locked,
    #[error("the Matrix account is deactivated")]
    Deactivated,
    #[error("the Matrix account is being deleted")]
    Deleted,
    #[error("the account directory is still loading")]
    Loading,
}

/// A usable account: everything the OIDC claims and the credential API need.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Account {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub user_id: String,
    pub localpart: String,
    pub display_name: Option<String>,
    pub email: Option<String>,
    pub subject: String,
    pub tenant: String,
}

impl Account {
    /// The object this account comes from: `namespace/name`.
    pub fn object_key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Whether the object's account may be used right now.
/// The `Ready` reason of an account converged without its email.
const EMAIL_CONFLICT: &str = "EmailConflict";

/// The email an account may be presented with: not one it was refused.
fn presented_email(user: &MatrixUser) -> Option<String> {
    let refused = user
        .status
        .as_ref()
        .and_then(|s| conditions::find(&s.conditions, conditions::READY))
        .is_some_and(|c| c.reason == EMAIL_CONFLICT);
    if refused {
        None
    } else {
        user.spec.email.clone()
    }
}

pub fn usable(user: &MatrixUser) -> Result<(), LookupError> {
    if user.metadata.deletion_timestamp.is_some() {
        return Err(LookupError::Deleted);
    }
    if user.spec.deactivated {
        return Err(LookupError::Deactivated);
    }
    if user.spec.locked {
        return Err(LookupError::Locked);
    }
    let status = user.status.as_ref();
    // A status about an older spec says nothing about this one, refusals
    // included (the change may have lifted them): still converging.
    let generation = user.metadata.generation;
    if generation.is_some()
        && status.is_some_and(|s| !s.conditions.is_empty() && s.observed_generation != generation)
    {
        return Err(LookupError::NotReady("Reconciling".into()));
    }
    let ready = status.and_then(|s| conditions::find(&s.conditions, conditions::READY));
    match ready {
        Some(c) if c.is_true() => {}
        // The account is converged but for an address another account
        // holds: still usable, or one tenant could block another's sign-in
        // by declaring its users' emails first. The address is not claimed.
        Some(c) if c.reason == EMAIL_CONFLICT => {}
        Some(c) => return Err(LookupError::NotReady(c.reason.clone())),
        None => return Err(LookupError::NotReady("NotReconciled".into())),
    }
    // Ready must describe the current spec, not an older one.
    if generation.is_some() && status.and_then(|s| s.observed_generation) != generation {
        return Err(LookupError::NotReady("Reconciling".into()));
    }
    if status.and_then(|s| s.user_id.as_ref()).is_none() {
        return Err(LookupError::NotReady("NoUserId".into()));
    }
    Ok(())
}

/// Whether this version of the object takes the account away from its
/// user: deleted, deactivated, locked, or no longer naming the account.
/// A spec change still converging, or a passing Synapse failure, is not:
/// tokens handed out stay alive through a display-name change.
pub fn withdrawn(user: &MatrixUser) -> bool {
    matches!(
        usable(user),
        Err(LookupError::Deleted | LookupError::Deactivated | LookupError::Locked)
    ) || user
        .status
        .as_ref()
        .is_some_and(|s| conditions::observed(s.observed_generation) && s.user_id.is_none())
}

/// Maps `(tenant, subject)` to exactly one usable account, or says why not.
pub fn resolve<'a>(
    namespaces: impl IntoIterator<Item = &'a Namespace>,
    users: impl IntoIterator<Item = &'a MatrixUser>,
    tenant: &str,
    subject: &str,
) -> Result<Account, LookupError> {
    let tenant_namespaces: Vec<String> = namespaces
        .into_iter()
        .filter(|ns| ns.labels().get(TENANT_LABEL).map(String::as_str) == Some(tenant))
        .map(|ns| ns.name_any())
        .collect();
    if tenant_namespaces.is_empty() {
        return Err(LookupError::UnknownTenant(tenant.to_string()));
    }
    let matches: Vec<&MatrixUser> = users
        .into_iter()
        .filter(|u| {
            u.spec.subject.as_deref() == Some(subject)
                && u.namespace()
                    .is_some_and(|ns| tenant_namespaces.contains(&ns))
        })
        .collect();
    // Two objects of a tenant with one subject: the oldest holds it, as the
    // controller decides (the others are `SubjectConflict` and linked to
    // nothing). Departing objects hold no claim while another remains.
    use crate::controller::claims::{claim_of, holder};
    let staying: Vec<&MatrixUser> = matches
        .iter()
        .copied()
        .filter(|u| u.metadata.deletion_timestamp.is_none())
        .collect();
    let pool = if staying.is_empty() {
        &matches
    } else {
        &staying
    };
    let Some(oldest) = holder(pool.iter().map(|u| claim_of(*u))) else {
        return Err(LookupError::UserNotFound);
    };
    let Some(user) = pool.iter().copied().find(|u| claim_of(*u) == oldest) else {
        return Err(LookupError::UserNotFound);
    };
    usable(user)?;
    Ok(Account {
        namespace: user.namespace().unwrap_or_default(),
        name: user.name_any(),
        uid: user.uid().unwrap_or_default(),
        user_id: user
            .status
            .as_ref()
            .and_then(|s| s.user_id.clone())
            .unwrap_or_default(),
        localpart: user.spec.localpart.clone(),
        display_name: user.spec.display_name.clone(),
        email: presented_email(user),
        subject: subject.to_string(),
        tenant: tenant.to_string(),
    })
}

/// One `MatrixUser` change as the watch delivered it: whether that version
/// of the object is usable. Every version is seen, so even a lock lifted a
/// moment later is noticed.
#[derive(Clone, Debug)]
pub struct UserChange {
    /// `namespace/name`.
    pub key: String,
    pub uid: String,
    pub usable: bool,
}

/// Watch caches of tenant namespaces and `MatrixUser`s.
#[derive(Clone)]
pub struct Directory {
    users: Store<MatrixUser>,
    /// Users by subject and localpart: a lookup reads its candidates only.
    index: Arc<Index<MatrixUser>>,
    namespaces: Store<Namespace>,
    ready: Arc<AtomicBool>,
    changes: tokio::sync::broadcast::Sender<UserChange>,
}

/// Which `MatrixUser`s the sidecar sees (mirrors the controller's scope).
#[derive(Clone, Debug, Default)]
pub struct DirectoryScope {
    pub namespace: Option<String>,
    pub label_selector: Option<String>,
}

impl Directory {
    /// Starts the watches; they run until the returned task is aborted.
    pub fn start(
        client: Client,
        scope: &DirectoryScope,
    ) -> (Directory, tokio::task::JoinHandle<()>) {
        let users_api: Api<MatrixUser> = match &scope.namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        let mut user_watch = watcher::Config::default().streaming_lists();
        if let Some(selector) = &scope.label_selector {
            user_watch = user_watch.labels(selector);
        }
        // Only namespaces that belong to a tenant matter.
        let ns_watch = watcher::Config::default().labels(TENANT_LABEL);
        let (users, users_writer) = reflector::store();
        let index = Index::new(keys::user);
        let indexed = index.clone();
        let (namespaces, ns_writer) = reflector::store();
        let ready = Arc::new(AtomicBool::new(false));
        let (changes, _) = tokio::sync::broadcast::channel(1024);
        let directory = Directory {
            users: users.clone(),
            index,
            namespaces: namespaces.clone(),
            ready: ready.clone(),
            changes: changes.clone(),
        };
        let task = tokio::spawn(async move {
            let user_cache = reflector::reflector(
                users_writer,
                watcher(users_api, user_watch)
                    .default_backoff()
                    .modify(crate::controller::strip_unread::<MatrixUser>)
                    // Indexed before stored: a lookup never misses what the cache has.
                    .map_ok(move |event| {
                        indexed.observe(&event);
                        event
                    }),
            )
            .for_each(move |event| {
                let change = |u: &MatrixUser, usable: bool| UserChange {
                    key: crate::controller::key(u),
                    uid: u.uid().unwrap_or_default(),
                    usable,
                };
                // Nobody listening is fine: the send only fails then.
                match event {
                    Ok(watcher::Event::Apply(u) | watcher::Event::InitApply(u)) => {
                        let _ = changes.send(change(&u, !withdrawn(&u)));
                    }
                    Ok(watcher::Event::Delete(u)) => {
                        let _ = changes.send(change(&u, false));
                    }
                    _ => {}
                }
                futures::future::ready(())
            });
            let ns_cache = reflector::reflector(
                ns_writer,
                watcher(Api::<Namespace>::all(client), ns_watch)
                    .default_backoff()
                    .modify(crate::controller::strip_managed_fields::<Namespace>),
            )
            .for_each(|_| futures::future::ready(()));
            // A store's readiness wakes one waiter only: record it once here.
            let readiness = async move {
                let _ =
                    futures::future::join(users.wait_until_ready(), namespaces.wait_until_ready())
                        .await;
                ready.store(true, Ordering::Release);
                futures::future::pending::<()>().await
            };
            futures::join!(user_cache, ns_cache, readiness);
        });
        (directory, task)
    }

    /// Every `MatrixUser` change from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<UserChange> {
        self.changes.subscribe()
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The `MatrixUser`s claiming `localpart` (all tenants in scope).
    pub fn claimants(&self, localpart: &str) -> Vec<Arc<MatrixUser>> {
        self.index.get(&self.users, &keys::localpart(localpart))
    }

    /// The usable account for a platform identity.
    pub fn lookup(&self, tenant: &str, subject: &str) -> Result<Account, LookupError> {
        if !self.is_ready() {
            return Err(LookupError::Loading);
        }
        let namespaces = self.namespaces.state();
        let users = self.index.get(&self.users, &keys::subject(subject));
        resolve(
            namespaces.iter().map(|n| n.as_ref()),
            users.iter().map(|u| u.as_ref()),
            tenant,
            subject,
        )
    }

    /// Whether the account an earlier lookup returned has been taken away
    /// from its user since (see [`withdrawn`]). `None` while loading.
    pub fn is_withdrawn(&self, account: &Account) -> Option<bool> {
        if !self.is_ready() {
            return None;
        }
        let reference = ObjectRef::<MatrixUser>::new(&account.name).within(&account.namespace);
        Some(match self.users.get(&reference) {
            None => true,
            Some(user) if user.uid().as_deref() != Some(account.uid.as_str()) => true,
            Some(user) => withdrawn(&user),
        })
    }

    /// Whether the account an earlier lookup returned is still usable (same
    /// object, same uid). `None` while the caches are loading.
    pub fn still_usable(&self, account: &Account) -> Option<Result<(), LookupError>> {
        if !self.is_ready() {
            return None;
        }
        let reference = ObjectRef::<MatrixUser>::new(&account.name).within(&account.namespace);
        Some(match self.users.get(&reference) {
            None => Err(LookupError::Deleted),
            Some(user) if user.uid().as_deref() != Some(account.uid.as_str()) => {
                Err(LookupError::Deleted)
            }
            Some(user) => usable(&user),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Condition, MatrixUserSpec, MatrixUserStatus};
    use std::collections::BTreeMap;

    fn namespace(name: &str, tenant: Option<&str>) -> Namespace {
        let mut ns = Namespace::default();
        ns.metadata.name = Some(name.into());
        if let Some(t) = tenant {
            ns.metadata.labels = Some(BTreeMap::from([(TENANT_LABEL.to_string(), t.to_string())]));
        }
        ns
    }

    fn user(ns: &str, name: &str, subject: &str) -> MatrixUser {
        let mut u = MatrixUser::new(
            name,
            MatrixUserSpec {
                localpart: name.into(),
                display_name: Some(format!("{name} display")),
                avatar_url: None,
                email: Some(format!("{name}@example.test")),
                subject: Some(subject.into()),
                admin: false,
                locked: false,
                deactivated: false,
                deletion_policy: Default::default(),
            },
        );
        u.metadata.namespace = Some(ns.into());
        u.metadata.uid = Some(format!("uid-{name}"));
        u.metadata.generation = Some(1);
        u.status = Some(MatrixUserStatus {
            user_id: Some(format!("@{name}:example.test")),
            conditions: vec![Condition::new("Ready", true, "Converged", "", Some(1))],
            observed_generation: Some(1),
            ..Default::default()
        });
        u
    }

    fn fixture() -> (Vec<Namespace>, Vec<MatrixUser>) {
        (
            vec![
                namespace("acme", Some("t-acme")),
                namespace("acme-events", Some("t-acme")),
                namespace("globex", Some("t-globex")),
                namespace("unlabelled", None),
            ],
            vec![
                user("acme", "alice", "sub-alice"),
                user("acme-events", "bob", "sub-bob"),
                user("globex", "alice2", "sub-alice"),
                user("unlabelled", "carol", "sub-carol"),
            ],
        )
    }

    #[test]
    fn maps_tenant_and_subject_to_one_account() {
        let (ns, users) = fixture();
        let a = resolve(&ns, &users, "t-acme", "sub-alice").unwrap();
        assert_eq!((a.namespace.as_str(), a.name.as_str()), ("acme", "alice"));
        assert_eq!(a.user_id, "@alice:example.test");
        // Any namespace of the tenant counts.
        let b = resolve(&ns, &users, "t-acme", "sub-bob").unwrap();
        assert_eq!(b.name, "bob");
        // The same subject in another tenant is another account.
        let other = resolve(&ns, &users, "t-globex", "sub-alice").unwrap();
        assert_eq!(other.name, "alice2");
    }

    #[test]
    fn never_crosses_tenants() {
        let (ns, users) = fixture();
        assert_eq!(
            resolve(&ns, &users, "t-globex", "sub-bob"),
            Err(LookupError::UserNotFound)
        );
        assert_eq!(
            resolve(&ns, &users, "t-nobody", "sub-alice"),
            Err(LookupError::UnknownTenant("t-nobody".into()))
        );
        // An unlabelled namespace belongs to no tenant.
        assert_eq!(
            resolve(&ns, &users, "", "sub-carol"),
            Err(LookupError::UnknownTenant("".into()))
        );
    }

    #[test]
    fn only_a_withdrawn_account_loses_its_tokens() {
        let (_, users) = fixture();
        let mut u = users[0].clone();
        assert!(!withdrawn(&u));
        // A display-name change still converging: not withdrawn.
        u.metadata.generation = Some(2);
        assert!(usable(&u).is_err());
        assert!(!withdrawn(&u));
        let mut locked = u.clone();
        locked.spec.locked = true;
        assert!(withdrawn(&locked));
        let mut gone = u.clone();
        gone.status.as_mut().unwrap().user_id = None;
        assert!(withdrawn(&gone));
    }

    #[test]
    fn an_account_refused_only_its_email_signs_in_without_it() {
        let (ns, mut users) = fixture();
        users[0].status.as_mut().unwrap().conditions =
            vec![Condition::new("Ready", false, "EmailConflict", "", Some(1))];
        let found = resolve(&ns, &users, "t-acme", "sub-alice").unwrap();
        assert_eq!(found.email, None, "never presented with an address it lost");
        users[0].status.as_mut().unwrap().conditions = vec![Condition::new(
            "Ready",
            false,
            "SynapseRejected",
            "",
            Some(1),
        )];
        assert!(matches!(
            resolve(&ns, &users, "t-acme", "sub-alice"),
            Err(LookupError::NotReady(_))
        ));
    }

    #[test]
    fn two_accounts_for_one_subject_map_to_the_oldest() {
        let (ns, mut users) = fixture();
        let at = |secs| {
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::from_second(secs).unwrap(),
            ))
        };
        users[0].metadata.creation_timestamp = at(200);
        let mut older = user("acme-events", "alice-again", "sub-alice");
        older.metadata.creation_timestamp = at(100);
        users.push(older);
        let found = resolve(&ns, &users, "t-acme", "sub-alice").unwrap();
        assert_eq!(found.name, "alice-again");
        // The older one departing: the claim passes on.
        users[4].metadata.deletion_timestamp = at(300);
        let found = resolve(&ns, &users, "t-acme", "sub-alice").unwrap();
        assert_eq!(found.name, "alice");
    }

    #[test]
    fn refuses_accounts_that_are_not_usable() {
        let (ns, users) = fixture();
        let check = |f: &dyn Fn(&mut MatrixUser)| {
            let mut users = users.clone();
            f(&mut users[0]);
            resolve(&ns, &users, "t-acme", "sub-alice")
        };
        assert_eq!(check(&|u| u.spec.locked = true), Err(LookupError::Locked));
        assert_eq!(
            check(&|u| u.spec.deactivated = true),
            Err(LookupError::Deactivated)
        );
        assert_eq!(
            check(&|u| u.metadata.deletion_timestamp = Some(conditions_time())),
            Err(LookupError::Deleted)
        );
        assert_eq!(
            check(&|u| u.status = None),
            Err(LookupError::NotReady("NotReconciled".into()))
        );
        assert_eq!(
            check(&|u| {
                u.status.as_mut().unwrap().conditions = vec![Condition::new(
                    "Ready",
                    false,
                    "LocalpartConflict",
                    "",
                    Some(1),
                )]
            }),
            Err(LookupError::NotReady("LocalpartConflict".into()))
        );
        assert_eq!(
            check(&|u| u.metadata.generation = Some(2)),
            Err(LookupError::NotReady("Reconciling".into()))
        );
        // A refusal of an older spec: the change may have lifted it.
        assert_eq!(
            check(&|u| {
                u.metadata.generation = Some(2);
                u.status.as_mut().unwrap().conditions = vec![Condition::new(
                    "Ready",
                    false,
                    "AdminNotAllowed",
                    "",
                    Some(1),
                )]
            }),
            Err(LookupError::NotReady("Reconciling".into()))
        );
    }

    fn conditions_time() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_second(1_700_000_000).unwrap(),
        )
    }
}
