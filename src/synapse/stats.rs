//! Request accounting: how many reads and writes the operator sent to Synapse.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::metrics::{latency_family, status_class, HistogramFamily, Labels};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// What a request does to Synapse, for counting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RequestKind {
    GetUser,
    UpsertUser,
    DeactivateUser,
    CreateRoom,
    ResolveAlias,
    GetRoomState,
    GetRoomMembers,
    PutState,
    PutPowerLevels,
    AdminJoin,
    /// A member joining as themselves (a direct room's members).
    JoinAsMember,
    Invite,
    Kick,
    Ban,
    Unban,
    Leave,
    DeleteAlias,
    GetDirectory,
    SetDirectory,
    DeleteRoom,
    DeleteStatus,
    MakeRoomAdmin,
    LoginAsUser,
    Logout,
    FindUserByThreepid,
    FindUserByExternalId,
    ListDevices,
    DeleteDevices,
    GetAccountData,
    PutAccountData,
    /// MAS (in MAS mode): the admin client's token.
    MasToken,
    MasGetUser,
    MasCreateUser,
    /// Lock, unlock, set-admin, deactivate.
    MasSetUser,
    MasListEmails,
    MasAddEmail,
    MasDeleteEmail,
    MasListLinks,
    MasAddLink,
    MasDeleteLink,
    MasListSessions,
    MasEndSession,
    MasAddPersonalSession,
    /// The operator's own Synapse admin token (a personal session).
    MasAdminToken,
}

impl RequestKind {
    pub fn is_write(self) -> bool {
        !matches!(
            self,
            RequestKind::GetUser
                | RequestKind::ResolveAlias
                | RequestKind::GetRoomState
                | RequestKind::GetRoomMembers
                | RequestKind::GetDirectory
                | RequestKind::DeleteStatus
                | RequestKind::FindUserByThreepid
                | RequestKind::FindUserByExternalId
                | RequestKind::ListDevices
                | RequestKind::GetAccountData
                // The operator's own credentials (MAS's client-credentials
                // token, its Synapse admin token) change nobody's account.
                | RequestKind::MasToken
                | RequestKind::MasAdminToken
                | RequestKind::MasGetUser
                | RequestKind::MasListEmails
                | RequestKind::MasListLinks
                | RequestKind::MasListSessions
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::GetUser => "get_user",
            RequestKind::UpsertUser => "upsert_user",
            RequestKind::DeactivateUser => "deactivate_user",
            RequestKind::CreateRoom => "create_room",
            RequestKind::ResolveAlias => "resolve_alias",
            RequestKind::GetRoomState => "get_room_state",
            RequestKind::GetRoomMembers => "get_room_members",
            RequestKind::PutState => "put_state",
            RequestKind::PutPowerLevels => "put_power_levels",
            RequestKind::AdminJoin => "admin_join",
            RequestKind::JoinAsMember => "join_as_member",
            RequestKind::Invite => "invite",
            RequestKind::Kick => "kick",
            RequestKind::Ban => "ban",
            RequestKind::Unban => "unban",
            RequestKind::Leave => "leave",
            RequestKind::DeleteAlias => "delete_alias",
            RequestKind::GetDirectory => "get_directory",
            RequestKind::SetDirectory => "set_directory",
            RequestKind::DeleteRoom => "delete_room",
            RequestKind::DeleteStatus => "delete_status",
            RequestKind::MakeRoomAdmin => "make_room_admin",
            RequestKind::LoginAsUser => "login_as_user",
            RequestKind::Logout => "logout",
            RequestKind::FindUserByThreepid => "find_user_by_threepid",
            RequestKind::FindUserByExternalId => "find_user_by_external_id",
            RequestKind::ListDevices => "list_devices",
            RequestKind::DeleteDevices => "delete_devices",
            RequestKind::GetAccountData => "get_account_data",
            RequestKind::PutAccountData => "put_account_data",
            RequestKind::MasToken => "mas_token",
            RequestKind::MasGetUser => "mas_get_user",
            RequestKind::MasCreateUser => "mas_create_user",
            RequestKind::MasSetUser => "mas_set_user",
            RequestKind::MasListEmails => "mas_list_emails",
            RequestKind::MasAddEmail => "mas_add_email",
            RequestKind::MasDeleteEmail => "mas_delete_email",
            RequestKind::MasListLinks => "mas_list_links",
            RequestKind::MasAddLink => "mas_add_link",
            RequestKind::MasDeleteLink => "mas_delete_link",
            RequestKind::MasListSessions => "mas_list_sessions",
            RequestKind::MasEndSession => "mas_end_session",
            RequestKind::MasAddPersonalSession => "mas_add_personal_session",
            RequestKind::MasAdminToken => "mas_admin_token",
        }
    }
}

/// Counters shared by every clone of a client.
#[derive(Debug)]
pub struct RequestStats {
    reads: AtomicU64,
    writes: AtomicU64,
    failures: AtomicU64,
    by_kind: Mutex<BTreeMap<RequestKind, u64>>,
    requests: Family<Labels, Counter>,
    latency: HistogramFamily,
    /// Requests held back by the client's request limit.
    waiting: Gauge,
}

impl Default for RequestStats {
    fn default() -> Self {
        RequestStats {
            reads: Default::default(),
            writes: Default::default(),
            failures: Default::default(),
            by_kind: Default::default(),
            requests: Default::default(),
            latency: latency_family(),
            waiting: Gauge::default(),
        }
    }
}

impl RequestStats {
    pub fn record(&self, kind: RequestKind, status: Option<u16>, elapsed: Duration) {
        self.requests
            .get_or_create(&vec![
                ("endpoint", kind.as_str().to_string()),
                ("status", status_class(status)),
                ("write", kind.is_write().to_string()),
            ])
            .inc();
        self.latency
            .get_or_create(&vec![("endpoint", kind.as_str().to_string())])
            .observe(elapsed.as_secs_f64());
        if kind.is_write() {
            self.writes.fetch_add(1, Ordering::Relaxed);
        } else {
            self.reads.fetch_add(1, Ordering::Relaxed);
        }
        if status.is_none_or(|s| s >= 400) {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        *self
            .by_kind
            .lock()
            .expect("stats lock")
            .entry(kind)
            .or_default() += 1;
    }

    /// Counts a request from when it starts waiting for a slot until it has one.
    pub fn waiting(&self) -> WaitingGuard<'_> {
        self.waiting.inc();
        WaitingGuard(&self.waiting)
    }

    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Adds the Prometheus families to a registry.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "openmeet_synapse_requests",
            "Requests sent to Synapse, by endpoint and status class",
            self.requests.clone(),
        );
        registry.register(
            "openmeet_synapse_request_duration_seconds",
            "Latency of requests to Synapse, by endpoint",
            self.latency.clone(),
        );
        registry.register(
            "openmeet_synapse_requests_waiting",
            "Requests waiting for a slot under the limit on requests in flight (--synapse-concurrency)",
            self.waiting.clone(),
        );
    }

    /// Requests issued so far, by kind.
    pub fn by_kind(&self) -> BTreeMap<RequestKind, u64> {
        self.by_kind.lock().expect("stats lock").clone()
    }
}

/// Leaves the waiting count when dropped (a slot was found, or the request was cancelled).
pub struct WaitingGuard<'a>(&'a Gauge);

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}
