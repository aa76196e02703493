//! User accounts: `GET`/`PUT /_synapse/admin/v2/users/<id>` and deactivation.

use super::{RequestKind, SynapseClient, SynapseError};
use ruma::UserId;
use serde::{Deserialize, Deserializer, Serialize};
use synapse_admin_api::users::{create_or_modify, deactivate_account, get_details};

/// An account as Synapse reports it; unknown fields are ignored and absent or
/// null ones default, so newer Synapse versions keep working.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct SynapseUser {
    pub name: String,
    #[serde(default, deserialize_with = "bool_or_int")]
    pub admin: bool,
    #[serde(default, deserialize_with = "bool_or_int")]
    pub deactivated: bool,
    #[serde(default, deserialize_with = "bool_or_int")]
    pub locked: bool,
    #[serde(default, deserialize_with = "bool_or_int")]
    pub erased: bool,
    #[serde(default)]
    pub displayname: Option<String>,
    #[serde(default)]
    pub avatar_url: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub threepids: Vec<Threepid>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub external_ids: Vec<ExternalId>,
    /// When the account was made, in seconds since the epoch.
    #[serde(default)]
    pub creation_ts: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Threepid {
    pub medium: String,
    pub address: String,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ExternalId {
    pub auth_provider: String,
    pub external_id: String,
}

impl SynapseUser {
    /// Email addresses among the account's third-party ids.
    pub fn emails(&self) -> Vec<String> {
        let mut emails: Vec<String> = self
            .threepids
            .iter()
            .filter(|t| t.medium == "email")
            .map(|t| t.address.to_lowercase())
            .collect();
        emails.sort();
        emails
    }
}

/// The fields to change on an account; `None` leaves a field as it is, and
/// absent fields are omitted from the request (Synapse rejects nulls).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserUpsert {
    pub displayname: Option<String>,
    pub avatar_url: Option<String>,
    pub emails: Option<Vec<String>>,
    pub external_ids: Option<Vec<ExternalId>>,
    pub admin: Option<bool>,
    pub locked: Option<bool>,
    pub deactivated: Option<bool>,
}

impl UserUpsert {
    pub fn is_empty(&self) -> bool {
        *self == UserUpsert::default()
    }

    /// Names of the fields this change sets, for audit lines (never values).
    pub fn field_names(&self) -> Vec<&'static str> {
        let mut names = Vec::new();
        let fields: [(&'static str, bool); 7] = [
            ("displayname", self.displayname.is_some()),
            ("avatar_url", self.avatar_url.is_some()),
            ("threepids", self.emails.is_some()),
            ("external_ids", self.external_ids.is_some()),
            ("admin", self.admin.is_some()),
            ("locked", self.locked.is_some()),
            ("deactivated", self.deactivated.is_some()),
        ];
        for (name, set) in fields {
            if set {
                names.push(name);
            }
        }
        names
    }
}

fn bool_or_int<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum BoolOrInt {
        Bool(bool),
        Int(i64),
        Null(()),
    }
    Ok(match BoolOrInt::deserialize(d)? {
        BoolOrInt::Bool(b) => b,
        BoolOrInt::Int(i) => i != 0,
        BoolOrInt::Null(()) => false,
    })
}

fn null_as_default<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(
    d: D,
) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

impl SynapseClient {
    /// Reads an account; `None` when it does not exist.
    pub async fn get_user(&self, user_id: &UserId) -> Result<Option<SynapseUser>, SynapseError> {
        let request = get_details::v2::Request::new(user_id.to_owned());
        match self.send(request, RequestKind::GetUser).await {
            Ok((_, body)) => serde_json::from_slice(&body)
                .map(Some)
                .map_err(|e| SynapseError::Decode(e.to_string())),
            Err(SynapseError::Rejected { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates or modifies an account. Never sends a password.
    pub async fn upsert_user(
        &self,
        user_id: &UserId,
        change: &UserUpsert,
    ) -> Result<(), SynapseError> {
        let mut request = create_or_modify::v2::Request::new(user_id.to_owned(), None);
        request.displayname = change.displayname.clone();
        request.avatar_url = change.avatar_url.clone();
        request.admin = change.admin;
        request.locked = change.locked;
        request.deactivated = change.deactivated;
        request.external_ids = change.external_ids.as_ref().map(|ids| {
            ids.iter()
                .map(|id| {
                    synapse_admin_api::users::ExternalId::new(
                        id.auth_provider.clone(),
                        id.external_id.clone(),
                    )
                })
                .collect()
        });
        if let Some(emails) = &change.emails {
            // The crate's third-party id type has no constructor; build it from its wire form.
            let threepids = emails
                .iter()
                .map(|address| {
                    serde_json::from_value(
                        serde_json::json!({"medium": "email", "address": address}),
                    )
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| SynapseError::Request(e.to_string()))?;
            request.threepids = Some(threepids);
        }
        self.send(request, RequestKind::UpsertUser)
            .await
            .map(|_| ())
    }

    /// Deactivates an account, optionally erasing it (GDPR erasure).
    /// The account that holds an email address in Synapse, if any. Synapse
    /// keys a third-party id by address alone: writing it to one account
    /// silently takes it from another, so the holder is read first.
    pub async fn user_by_email(&self, address: &str) -> Result<Option<String>, SynapseError> {
        self.find_user(
            &[
                "_synapse", "admin", "v1", "threepid", "email", "users", address,
            ],
            RequestKind::FindUserByThreepid,
        )
        .await
    }

    /// The account an external id (per auth provider) is linked to, if any:
    /// Synapse keeps each unique, and refuses a write that would repeat one.
    pub async fn user_by_external_id(
        &self,
        auth_provider: &str,
        external_id: &str,
    ) -> Result<Option<String>, SynapseError> {
        self.find_user(
            &[
                "_synapse",
                "admin",
                "v1",
                "auth_providers",
                auth_provider,
                "users",
                external_id,
            ],
            RequestKind::FindUserByExternalId,
        )
        .await
    }

    async fn find_user(
        &self,
        path: &[&str],
        kind: RequestKind,
    ) -> Result<Option<String>, SynapseError> {
        #[derive(Deserialize)]
        struct Found {
            user_id: String,
        }
        match self.send_json(reqwest::Method::GET, path, None, kind).await {
            Ok((_, body)) => serde_json::from_slice::<Found>(&body)
                .map(|f| Some(f.user_id))
                .map_err(|e| SynapseError::Decode(e.to_string())),
            Err(SynapseError::Rejected { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn deactivate_user(&self, user_id: &UserId, erase: bool) -> Result<(), SynapseError> {
        let mut request = deactivate_account::v1::Request::new(user_id.to_owned());
        request.erase = erase;
        self.send(request, RequestKind::DeactivateUser)
            .await
            .map(|_| ())
    }

    /// Mints an access token for the user (login-as-user). The token has no
    /// device and dies at `valid_until_ms`, on deactivation, or on logout.
    pub async fn login_as(
        &self,
        user_id: &UserId,
        valid_until_ms: u64,
    ) -> Result<String, SynapseError> {
        #[derive(Deserialize)]
        struct Minted {
            access_token: String,
        }
        let body = serde_json::json!({ "valid_until_ms": valid_until_ms });
        let (_, bytes) = self
            .send_json(
                reqwest::Method::POST,
                &[
                    "_synapse",
                    "admin",
                    "v1",
                    "users",
                    user_id.as_str(),
                    "login",
                ],
                Some(&body),
                RequestKind::LoginAsUser,
            )
            .await?;
        serde_json::from_slice::<Minted>(&bytes)
            .map(|m| m.access_token)
            .map_err(|e| SynapseError::Decode(e.to_string()))
    }

    /// The ids of the account's devices: one per session a client opened
    /// with `/login` (SSO included). Login-as-user tokens have none.
    pub async fn list_devices(&self, user_id: &UserId) -> Result<Vec<String>, SynapseError> {
        #[derive(Deserialize)]
        struct Device {
            device_id: String,
        }
        #[derive(Deserialize)]
        struct Devices {
            #[serde(default, deserialize_with = "null_as_default")]
            devices: Vec<Device>,
        }
        let (_, body) = self
            .send_json(
                reqwest::Method::GET,
                &[
                    "_synapse",
                    "admin",
                    "v2",
                    "users",
                    user_id.as_str(),
                    "devices",
                ],
                None,
                RequestKind::ListDevices,
            )
            .await?;
        serde_json::from_slice::<Devices>(&body)
            .map(|d| d.devices.into_iter().map(|d| d.device_id).collect())
            .map_err(|e| SynapseError::Decode(e.to_string()))
    }

    /// Deletes devices, which invalidates their access (and refresh) tokens.
    /// Unknown ids are no error.
    pub async fn delete_devices(
        &self,
        user_id: &UserId,
        device_ids: &[String],
    ) -> Result<(), SynapseError> {
        let body = serde_json::json!({ "devices": device_ids });
        self.send_json(
            reqwest::Method::POST,
            &[
                "_synapse",
                "admin",
                "v2",
                "users",
                user_id.as_str(),
                "delete_devices",
            ],
            Some(&body),
            RequestKind::DeleteDevices,
        )
        .await
        .map(|_| ())
    }

    /// Invalidates one access token (as its own holder). Already invalid
    /// counts as done; a locked account cannot log out (`M_USER_LOCKED`),
    /// so that is an error to retry once the lock lifts.
    pub async fn logout_token(&self, access_token: &str) -> Result<(), SynapseError> {
        let request = self
            .http
            .post(format!("{}/_matrix/client/v3/logout", self.base))
            .bearer_auth(access_token)
            .json(&serde_json::json!({}))
            .build()
            .map_err(|e| SynapseError::Request(e.to_string()))?;
        match self.execute(request, RequestKind::Logout).await {
            Ok(_) => Ok(()),
            Err(SynapseError::Rejected {
                status: 401,
                errcode,
                ..
            }) if errcode == "M_UNKNOWN_TOKEN" => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_erased_account_with_nulls_and_ints() {
        let user: SynapseUser = serde_json::from_str(
            r#"{"name":"@a:x","admin":0,"deactivated":1,"erased":true,"displayname":null,
                "avatar_url":null,"threepids":null,"external_ids":[],"locked":false,"future_field":3}"#,
        )
        .unwrap();
        assert!(user.deactivated && user.erased && !user.admin);
        assert_eq!(user.displayname, None);
        assert!(user.threepids.is_empty());
    }

    #[test]
    fn emails_are_lowercased_and_sorted() {
        let user = SynapseUser {
            threepids: vec![
                Threepid {
                    medium: "email".into(),
                    address: "B@x.org".into(),
                },
                Threepid {
                    medium: "msisdn".into(),
                    address: "123".into(),
                },
                Threepid {
                    medium: "email".into(),
                    address: "a@x.org".into(),
                },
            ],
            ..Default::default()
        };
        assert_eq!(user.emails(), ["a@x.org", "b@x.org"]);
    }

    #[test]
    fn field_names_list_only_set_fields() {
        let change = UserUpsert {
            locked: Some(true),
            emails: Some(vec![]),
            ..Default::default()
        };
        assert_eq!(change.field_names(), ["threepids", "locked"]);
        assert!(UserUpsert::default().is_empty());
    }
}
