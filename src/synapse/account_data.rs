//! Users' `m.direct` account data, for direct conversations.
//!
//! Synapse lets an admin read any user's account data
//! (`GET /_synapse/admin/v1/users/<id>/accountdata`) but offers no admin
//! write, and the application service may masquerade only as users of its
//! own namespace (the admin account alone). So a write goes out as the user
//! with a token minted for a minute, used for the one `PUT`, ended at once
//! and never stored: a login-as-user token (`valid_until_ms`), or in MAS
//! mode (where Synapse has no login-as) a MAS personal session. The admin read
//! comes first, so a list that already names the room costs no token.
//! Matrix account data has no compare-and-swap: the read-modify-write keeps
//! every other entry, and the window between the two is one request.

use super::{RequestKind, SynapseClient, SynapseError};
use ruma::UserId;
use serde_json::{json, Value};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long a token minted for one account-data write may live.
const TOKEN_LIFETIME: Duration = Duration::from_secs(60);

impl SynapseClient {
    /// The user's `m.direct` content (`{}` when never set).
    pub async fn direct_rooms(&self, user_id: &UserId) -> Result<Value, SynapseError> {
        let (_, bytes) = self
            .send_json(
                reqwest::Method::GET,
                &[
                    "_synapse",
                    "admin",
                    "v1",
                    "users",
                    user_id.as_str(),
                    "accountdata",
                ],
                None,
                RequestKind::GetAccountData,
            )
            .await?;
        let v: Value =
            serde_json::from_slice(&bytes).map_err(|e| SynapseError::Decode(e.to_string()))?;
        Ok(v.pointer("/account_data/global/m.direct")
            .cloned()
            .unwrap_or_else(|| json!({})))
    }

    /// Writes the user's `m.direct` as the user, with a token that lives for
    /// this one call.
    pub async fn set_direct_rooms(
        &self,
        user_id: &UserId,
        content: &Value,
    ) -> Result<(), SynapseError> {
        let (token, session) = self.one_call_token(user_id).await?;
        let mut url =
            url::Url::parse(&self.base).map_err(|e| SynapseError::Request(e.to_string()))?;
        url.path_segments_mut()
            .map_err(|_| SynapseError::Request("Synapse URL cannot be a base".into()))?
            .pop_if_empty()
            .extend([
                "_matrix",
                "client",
                "v3",
                "user",
                user_id.as_str(),
                "account_data",
                "m.direct",
            ]);
        let request = self
            .http
            .put(url)
            .bearer_auth(&token)
            .json(content)
            .build()
            .map_err(|e| SynapseError::Request(e.to_string()));
        let written = match request {
            Ok(request) => self
                .execute(request, RequestKind::PutAccountData)
                .await
                .map(|_| ()),
            Err(e) => Err(e),
        };
        // Ended whatever the write did: the token is never kept.
        let ended = match (&self.mas, session) {
            (Some(mas), Some(session)) => mas
                .end_session(crate::mas::SessionKind::Personal, &session)
                .await
                .map_err(|e| SynapseError::Mas(e.to_string())),
            _ => self.logout_token(&token).await,
        };
        written.and(ended)
    }

    /// A token of the user's for one call, and in MAS mode its session.
    async fn one_call_token(
        &self,
        user_id: &UserId,
    ) -> Result<(String, Option<String>), SynapseError> {
        let Some(mas) = &self.mas else {
            let until_ms = (SystemTime::now() + TOKEN_LIFETIME)
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or_default();
            return Ok((self.login_as(user_id, until_ms).await?, None));
        };
        let mas_error = |e: crate::mas::MasError| SynapseError::Mas(e.to_string());
        let user = mas
            .user_by_username(user_id.localpart())
            .await
            .map_err(mas_error)?
            .ok_or_else(|| SynapseError::Mas(format!("{user_id} is not in MAS")))?;
        let minted = mas
            .short_session(
                &user.id,
                "openmeet-matrix-operator: m.direct",
                TOKEN_LIFETIME,
            )
            .await
            .map_err(mas_error)?;
        Ok((minted.access_token, Some(minted.session_id)))
    }
}

/// `m.direct` with `room_id` listed under `other`, every other entry kept;
/// `None` when it is listed already.
pub fn with_direct_room(current: &Value, other: &str, room_id: &str) -> Option<Value> {
    let mut content = current.as_object().cloned().unwrap_or_default();
    let rooms = content
        .entry(other.to_string())
        .or_insert_with(|| json!([]));
    if !rooms.is_array() {
        *rooms = json!([]);
    }
    let list = rooms.as_array_mut()?;
    if list.iter().any(|r| r.as_str() == Some(room_id)) {
        return None;
    }
    list.push(json!(room_id));
    Some(Value::Object(content))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_room_is_added_and_other_entries_kept() {
        let current = json!({"@carol:x": ["!old:x"], "@bob:x": ["!a:x"]});
        let next = with_direct_room(&current, "@bob:x", "!dm:x").unwrap();
        assert_eq!(
            next,
            json!({"@carol:x": ["!old:x"], "@bob:x": ["!a:x", "!dm:x"]})
        );
        assert_eq!(with_direct_room(&next, "@bob:x", "!dm:x"), None);
        assert_eq!(
            with_direct_room(&json!({}), "@bob:x", "!dm:x"),
            Some(json!({"@bob:x": ["!dm:x"]}))
        );
    }
}
