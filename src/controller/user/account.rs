//! Where accounts live: Synapse's admin API (the default), or MAS with
//! Synapse as its mirror (MAS mode). The pure plan sees one shape either
//! way, an account as Synapse reports it ([`SynapseUser`]); this module
//! observes that shape from MAS and turns a planned change into MAS calls.
//!
//! In MAS mode MAS holds the account's existence, lock, deactivation,
//! admin flag, emails and the SSO link (an upstream link on the sidecar's
//! provider). Synapse keeps what MAS has no place for: the owner marker
//! (an external id only a server admin can write, as in the default mode),
//! the display name and the avatar. MAS provisions the Synapse account
//! before its create call answers, so both exist from then on.

use super::super::{Error, OWNER_PROVIDER};
use crate::mas::{MasClient, MasEmail, MasLink, MasUser, SessionKind};
use crate::synapse::users::Threepid;
use crate::synapse::{ExternalId, SynapseClient, SynapseUser, UserUpsert};
use ruma::UserId;

/// The account store of this operator.
#[derive(Clone, Copy)]
pub enum Accounts<'a> {
    Synapse(&'a SynapseClient),
    Mas(&'a MasClient, &'a SynapseClient),
}

impl<'a> Accounts<'a> {
    pub fn of(synapse: &'a SynapseClient) -> Self {
        match synapse.mas() {
            Some(mas) => Accounts::Mas(mas, synapse),
            None => Accounts::Synapse(synapse),
        }
    }

    /// Requests one [`observe`] costs: what the sweep budgets for a user.
    pub fn reads_per_observe(self) -> u32 {
        match self {
            Accounts::Synapse(_) => 1,
            // MAS's user, emails and links, and Synapse's mirror.
            Accounts::Mas(..) => 4,
        }
    }

    /// Whether every session of an account can be found and ended, so a
    /// lock may lift at once. Synapse cannot list login-as tokens (owned by
    /// the operator's account); MAS lists every session, personal ones too.
    pub fn sessions_are_enumerable(self) -> bool {
        matches!(self, Accounts::Mas(..))
    }
}

/// An account as observed, in the plan's shape, with what MAS mode needs
/// to turn a change into calls.
#[derive(Clone, Debug)]
pub struct Observed {
    pub view: SynapseUser,
    pub mas: Option<MasAccount>,
}

/// The MAS side of an account.
#[derive(Clone, Debug)]
pub struct MasAccount {
    pub user: MasUser,
    pub emails: Vec<MasEmail>,
    pub links: Vec<MasLink>,
    /// The owner marker(s) on the Synapse mirror; empty until written.
    pub marker: Vec<ExternalId>,
}

/// Reads an account; `None` when it does not exist.
pub async fn observe(
    accounts: Accounts<'_>,
    user_id: &UserId,
    sso_provider: &str,
) -> Result<Option<Observed>, Error> {
    match accounts {
        Accounts::Synapse(synapse) => Ok(synapse
            .get_user(user_id)
            .await?
            .map(|view| Observed { view, mas: None })),
        Accounts::Mas(mas, synapse) => {
            let Some(user) = mas.user_by_username(user_id.localpart()).await? else {
                return Ok(None);
            };
            let emails = mas.emails_of(&user.id).await?;
            let links = mas.links_of(&user.id).await?;
            let mirror = synapse.get_user(user_id).await?;
            let marker = mirror
                .as_ref()
                .map(|m| owner_ids(&m.external_ids))
                .unwrap_or_default();
            let account = MasAccount {
                user,
                emails,
                links,
                marker,
            };
            Ok(Some(Observed {
                view: account.view(user_id, mirror.as_ref(), sso_provider),
                mas: Some(account),
            }))
        }
    }
}

/// The owner markers among external ids.
fn owner_ids(ids: &[ExternalId]) -> Vec<ExternalId> {
    ids.iter()
        .filter(|id| id.auth_provider == OWNER_PROVIDER)
        .cloned()
        .collect()
}

impl MasAccount {
    /// The account in the plan's shape: MAS's flags, emails and SSO link,
    /// Synapse's marker, name and avatar.
    pub fn view(
        &self,
        user_id: &UserId,
        mirror: Option<&SynapseUser>,
        sso_provider: &str,
    ) -> SynapseUser {
        let mut external_ids = self.marker.clone();
        external_ids.extend(self.links.iter().map(|link| ExternalId {
            auth_provider: sso_provider.to_string(),
            external_id: link.subject.clone(),
        }));
        SynapseUser {
            name: user_id.to_string(),
            admin: self.user.admin,
            deactivated: self.user.deactivated,
            locked: self.user.locked,
            erased: mirror.is_some_and(|m| m.erased),
            displayname: mirror.and_then(|m| m.displayname.clone()),
            avatar_url: mirror.and_then(|m| m.avatar_url.clone()),
            threepids: self
                .emails
                .iter()
                .map(|e| Threepid {
                    medium: "email".into(),
                    address: e.email.clone(),
                })
                .collect(),
            external_ids,
            creation_ts: mirror.and_then(|m| m.creation_ts),
        }
    }
}

/// One call that carries part of a planned change to MAS mode's stores.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MasCall {
    /// What Synapse keeps: display name, avatar, the owner marker.
    Mirror(UserUpsert),
    AddLink(String),
    DeleteLink(String),
    AddEmail(String),
    DeleteEmail(String),
    SetAdmin(bool),
    SetLocked(bool),
    Deactivate,
}

/// The calls that apply `change` to an existing MAS account, in order: the
/// marker first (what makes the account the operator's), then links and
/// emails (removals before additions), then flags, deactivation last.
pub fn mas_calls(change: &UserUpsert, account: &MasAccount, sso_provider: &str) -> Vec<MasCall> {
    let mut calls = Vec::new();
    // Synapse's external ids hold only the marker in this mode.
    let marker = change.external_ids.as_ref().and_then(|ids| {
        let marker: Vec<ExternalId> = ids
            .iter()
            .filter(|id| id.auth_provider == OWNER_PROVIDER)
            .cloned()
            .collect();
        (marker != account.marker).then_some(marker)
    });
    let mirror = UserUpsert {
        displayname: change.displayname.clone(),
        avatar_url: change.avatar_url.clone(),
        external_ids: marker,
        ..Default::default()
    };
    if !mirror.is_empty() {
        calls.push(MasCall::Mirror(mirror));
    }
    if let Some(ids) = &change.external_ids {
        let wanted: Vec<&str> = ids
            .iter()
            .filter(|id| id.auth_provider == sso_provider)
            .map(|id| id.external_id.as_str())
            .collect();
        for link in &account.links {
            if !wanted.contains(&link.subject.as_str()) {
                calls.push(MasCall::DeleteLink(link.id.clone()));
            }
        }
        for subject in wanted {
            if !account.links.iter().any(|l| l.subject == subject) {
                calls.push(MasCall::AddLink(subject.to_string()));
            }
        }
    }
    if let Some(emails) = &change.emails {
        for held in &account.emails {
            if !emails.contains(&held.email.to_lowercase()) {
                calls.push(MasCall::DeleteEmail(held.id.clone()));
            }
        }
        for email in emails {
            if !account
                .emails
                .iter()
                .any(|e| e.email.to_lowercase() == *email)
            {
                calls.push(MasCall::AddEmail(email.clone()));
            }
        }
    }
    if let Some(admin) = change.admin {
        calls.push(MasCall::SetAdmin(admin));
    }
    if let Some(locked) = change.locked {
        calls.push(MasCall::SetLocked(locked));
    }
    if change.deactivated == Some(true) {
        calls.push(MasCall::Deactivate);
    }
    calls
}

/// The account an SSO subject is linked to, as a Matrix user id; `None`
/// when it is linked to none.
pub async fn subject_holder(
    accounts: Accounts<'_>,
    observed: Option<&Observed>,
    provider: &str,
    subject: &str,
) -> Result<Option<String>, Error> {
    match accounts {
        Accounts::Synapse(synapse) => Ok(synapse.user_by_external_id(provider, subject).await?),
        Accounts::Mas(mas, synapse) => {
            let Some(holder) = mas.link_by_subject(subject).await?.and_then(|l| l.user_id) else {
                return Ok(None);
            };
            matrix_id_of(mas, synapse, observed, &holder).await
        }
    }
}

/// The account an email address belongs to, as a Matrix user id.
pub async fn email_holder(
    accounts: Accounts<'_>,
    observed: Option<&Observed>,
    email: &str,
) -> Result<Option<String>, Error> {
    match accounts {
        Accounts::Synapse(synapse) => Ok(synapse.user_by_email(email).await?),
        Accounts::Mas(mas, synapse) => {
            let Some(holder) = mas.email_holder(email).await? else {
                return Ok(None);
            };
            matrix_id_of(mas, synapse, observed, &holder.user_id).await
        }
    }
}

/// The Matrix user id of a MAS user: the observed account's own without a
/// call, another's through MAS.
async fn matrix_id_of(
    mas: &MasClient,
    synapse: &SynapseClient,
    observed: Option<&Observed>,
    mas_id: &str,
) -> Result<Option<String>, Error> {
    if let Some(own) = observed.filter(|o| o.mas.as_ref().is_some_and(|m| m.user.id == mas_id)) {
        return Ok(Some(own.view.name.clone()));
    }
    match mas.user(mas_id).await? {
        Some(user) => Ok(Some(synapse.user_id(&user.username)?.to_string())),
        // Deleted meanwhile: still nobody's to take, to be safe.
        None => Ok(Some(format!("mas:{mas_id}"))),
    }
}

/// Creates an account in MAS with the create's name and avatar; the rest of
/// the create is applied as an update of the account it returns.
///
/// MAS provisions the Synapse account before it commits its own user, and
/// drops the request when its caller goes away: a create cut short (the
/// operator killed, a timeout) can leave a Synapse account with no MAS
/// user, and MAS then refuses the name ("reserved by the homeserver", 409).
/// On that refusal the Synapse account is read: when this object recorded
/// a create (`create_pending`) and the account is exactly what such a
/// create leaves ([`left_by_own_create`]), the create resumes over it; any
/// other account of that name is `OnlyInSynapse`, never taken. Checking on
/// the refusal, not before every create, keeps a create at three requests.
pub async fn create_in_mas(
    mas: &MasClient,
    synapse: &SynapseClient,
    user_id: &UserId,
    create: &UserUpsert,
    create_pending: bool,
    object_created: Option<i64>,
) -> Result<Result<MasAccount, super::plan::Blocked>, Error> {
    let (name, avatar) = (create.displayname.as_deref(), create.avatar_url.as_deref());
    let user = match mas
        .create_user(user_id.localpart(), name, avatar, false)
        .await
    {
        Ok(user) => user,
        Err(crate::mas::MasError::Rejected { status: 409, .. }) => {
            match synapse.get_user(user_id).await? {
                Some(mirror) if create_pending && left_by_own_create(&mirror, object_created) => {
                    tracing::info!(user = %user_id, "resuming a MAS create cut short after Synapse had the account");
                    mas.create_user(user_id.localpart(), name, avatar, true)
                        .await?
                }
                Some(_) => return Ok(Err(super::plan::Blocked::OnlyInSynapse)),
                // Made in MAS meanwhile: the next look sees it.
                None => {
                    return Err(crate::mas::MasError::Server {
                        status: 409,
                        message: "the account appeared in MAS while being created".into(),
                    }
                    .into())
                }
            }
        }
        Err(e) => return Err(e.into()),
    };
    Ok(Ok(MasAccount {
        user,
        emails: Vec::new(),
        links: Vec::new(),
        marker: Vec::new(),
    }))
}

/// Whether a Synapse account with no MAS user is what a create of this
/// object's leaves when cut short: active, with no external id (no owner
/// marker: nobody's yet), and made after the object was (`object_created`,
/// seconds): an account from before the object is someone else's.
pub fn left_by_own_create(mirror: &SynapseUser, object_created: Option<i64>) -> bool {
    let after_object = match (mirror.creation_ts, object_created) {
        (Some(made), Some(object)) => made >= object,
        _ => false,
    };
    mirror.external_ids.is_empty() && !mirror.deactivated && after_object
}

/// Applies one planned create or update in MAS mode. A create makes the
/// MAS account first (with the name and avatar), then the rest goes the
/// update's way; `account` holds the MAS account from then on.
pub async fn apply_in_mas(
    (mas, synapse): (&MasClient, &SynapseClient),
    user_id: &UserId,
    action: &super::plan::UserAction,
    desired: &super::plan::Desired<'_>,
    object_created: Option<i64>,
    account: &mut Option<MasAccount>,
) -> Result<Result<(), super::plan::Blocked>, Error> {
    use super::plan::UserAction;
    let change = match action {
        UserAction::Create(create) => {
            let made = create_in_mas(
                mas,
                synapse,
                user_id,
                create,
                desired.create_pending,
                object_created,
            )
            .await?;
            match made {
                Ok(made) => *account = Some(made),
                Err(blocked) => return Ok(Err(blocked)),
            }
            UserUpsert {
                displayname: None,
                avatar_url: None,
                ..create.clone()
            }
        }
        UserAction::Update(change) => change.clone(),
        UserAction::EndSessions => return Ok(Ok(())),
    };
    let Some(held) = account.as_ref() else {
        return Err(Error::Invalid("no MAS account to update".into()));
    };
    let calls = mas_calls(&change, held, desired.sso_provider);
    apply_mas(mas, synapse, user_id, held, &calls).await?;
    Ok(Ok(()))
}

/// Applies the calls of one change.
pub async fn apply_mas(
    mas: &MasClient,
    synapse: &SynapseClient,
    user_id: &UserId,
    account: &MasAccount,
    calls: &[MasCall],
) -> Result<(), Error> {
    let id = account.user.id.as_str();
    for call in calls {
        match call {
            MasCall::Mirror(change) => synapse.upsert_user(user_id, change).await?,
            MasCall::AddLink(subject) => mas.add_link(id, subject).await?,
            MasCall::DeleteLink(link) => mas.delete_link(link).await?,
            MasCall::AddEmail(email) => mas.add_email(id, email).await?,
            MasCall::DeleteEmail(email) => mas.delete_email(email).await?,
            MasCall::SetAdmin(admin) => mas.set_admin(id, *admin).await?,
            MasCall::SetLocked(locked) => mas.set_locked(id, *locked).await?,
            // Deactivation in the spec keeps the account's data (erasure is
            // for deletion with `deletionPolicy: Erase`).
            MasCall::Deactivate => mas.deactivate(id, false).await?,
        }
    }
    Ok(())
}

/// Ends every MAS session of the account (so none comes back when a lock
/// lifts), then deletes its Synapse devices, which kills their tokens at
/// once: Synapse caches MAS's answer about a token for minutes, but checks
/// the device on every request. Returns how many sessions were ended.
pub async fn end_mas_sessions(
    mas: &MasClient,
    synapse: &SynapseClient,
    user_id: &UserId,
    account: &MasAccount,
) -> Result<usize, Error> {
    let mut ended = 0;
    for kind in SessionKind::ALL {
        for session in mas.active_sessions(&account.user.id, kind).await? {
            mas.end_session(kind, &session).await?;
            ended += 1;
        }
    }
    let devices = synapse.list_devices(user_id).await?;
    if !devices.is_empty() {
        synapse.delete_devices(user_id, &devices).await?;
    }
    Ok(ended.max(devices.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SSO: &str = "oidc-openmeet";

    fn account() -> MasAccount {
        MasAccount {
            user: MasUser {
                id: "U1".into(),
                username: "alice".into(),
                ..Default::default()
            },
            emails: vec![MasEmail {
                id: "E1".into(),
                user_id: "U1".into(),
                email: "Old@x.org".into(),
            }],
            links: vec![MasLink {
                id: "L1".into(),
                provider_id: "P".into(),
                subject: "t/old".into(),
                user_id: Some("U1".into()),
            }],
            marker: vec![],
        }
    }

    fn marker() -> ExternalId {
        ExternalId {
            auth_provider: OWNER_PROVIDER.into(),
            external_id: "ns/alice/uid".into(),
        }
    }

    fn sso(subject: &str) -> ExternalId {
        ExternalId {
            auth_provider: SSO.into(),
            external_id: subject.into(),
        }
    }

    #[test]
    fn the_view_takes_flags_emails_and_links_from_mas_and_the_rest_from_synapse() {
        let mut acc = account();
        acc.user.locked = true;
        acc.user.admin = true;
        let mirror = SynapseUser {
            displayname: Some("Alice".into()),
            // Synapse's own copy of the emails and any stray external id
            // are not what the account holds.
            threepids: vec![Threepid {
                medium: "email".into(),
                address: "stale@x.org".into(),
            }],
            external_ids: vec![marker(), sso("t/stale")],
            ..Default::default()
        };
        acc.marker = owner_ids(&mirror.external_ids);
        let user_id = UserId::parse("@alice:x").unwrap();
        let view = acc.view(&user_id, Some(&mirror), SSO);
        assert!(view.locked && view.admin && !view.deactivated);
        assert_eq!(view.displayname.as_deref(), Some("Alice"));
        assert_eq!(view.emails(), ["old@x.org"]);
        assert_eq!(view.external_ids, [marker(), sso("t/old")]);
        // Before the marker is written: not yet ours.
        acc.marker.clear();
        assert_eq!(acc.view(&user_id, None, SSO).external_ids, [sso("t/old")]);
    }

    #[test]
    fn a_change_becomes_marker_first_then_links_emails_flags_and_deactivation_last() {
        let change = UserUpsert {
            displayname: Some("Alice".into()),
            emails: Some(vec!["new@x.org".into()]),
            external_ids: Some(vec![marker(), sso("t/new")]),
            admin: Some(true),
            locked: Some(true),
            deactivated: Some(true),
            ..Default::default()
        };
        assert_eq!(
            mas_calls(&change, &account(), SSO),
            [
                MasCall::Mirror(UserUpsert {
                    displayname: Some("Alice".into()),
                    external_ids: Some(vec![marker()]),
                    ..Default::default()
                }),
                MasCall::DeleteLink("L1".into()),
                MasCall::AddLink("t/new".into()),
                MasCall::DeleteEmail("E1".into()),
                MasCall::AddEmail("new@x.org".into()),
                MasCall::SetAdmin(true),
                MasCall::SetLocked(true),
                MasCall::Deactivate,
            ]
        );
    }

    #[test]
    fn only_an_unmarked_active_account_is_taken_for_a_cut_short_create() {
        let object = Some(1_000);
        let bare = SynapseUser {
            creation_ts: Some(1_000),
            ..Default::default()
        };
        assert!(left_by_own_create(&bare, object));
        let older = SynapseUser {
            creation_ts: Some(999),
            ..Default::default()
        };
        assert!(
            !left_by_own_create(&older, object),
            "made before the object"
        );
        let marked = SynapseUser {
            external_ids: vec![marker()],
            ..bare.clone()
        };
        assert!(!left_by_own_create(&marked, object), "someone's account");
        let deactivated = SynapseUser {
            deactivated: true,
            ..bare.clone()
        };
        assert!(!left_by_own_create(&deactivated, object), "never revived");
        assert!(
            !left_by_own_create(&SynapseUser::default(), object),
            "no age"
        );
    }

    #[test]
    fn nothing_held_is_written_again() {
        // The same email in another case, the marker and the link already there.
        let mut held = account();
        held.marker = vec![marker()];
        let change = UserUpsert {
            emails: Some(vec!["old@x.org".into()]),
            external_ids: Some(vec![marker(), sso("t/new")]),
            ..Default::default()
        };
        assert_eq!(
            mas_calls(&change, &held, SSO),
            [
                MasCall::DeleteLink("L1".into()),
                MasCall::AddLink("t/new".into())
            ]
        );
        assert!(mas_calls(&UserUpsert::default(), &account(), SSO).is_empty());
    }
}
