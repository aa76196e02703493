//! Calls made as a local member instead of the operator's account: a user's
//! own account data, a member's own join. Synapse has no admin write for
//! either (its admin join invites first, without `is_direct`), and the
//! application service may masquerade only as users of its own namespace
//! (the admin account alone). So each call goes out as the member with a
//! token minted for a minute, used once, ended at once and never stored: a
//! login-as-user token (`valid_until_ms`), or in MAS mode (where Synapse has
//! no login-as) a MAS personal session.

use super::{RequestKind, SynapseClient, SynapseError};
use ruma::UserId;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long a token minted for one call may live.
const TOKEN_LIFETIME: Duration = Duration::from_secs(60);

impl SynapseClient {
    /// Sends one client-API request as `user_id`; `purpose` names the token
    /// (a MAS session's name, where an admin sees it).
    pub(super) async fn send_as_member(
        &self,
        user_id: &UserId,
        purpose: &str,
        method: reqwest::Method,
        path_segments: &[&str],
        body: &serde_json::Value,
        kind: RequestKind,
    ) -> Result<(u16, bytes::Bytes), SynapseError> {
        let (token, session) = self.one_call_token(user_id, purpose).await?;
        let mut url =
            url::Url::parse(&self.base).map_err(|e| SynapseError::Request(e.to_string()))?;
        url.path_segments_mut()
            .map_err(|_| SynapseError::Request("Synapse URL cannot be a base".into()))?
            .pop_if_empty()
            .extend(path_segments);
        let request = self
            .http
            .request(method, url)
            .bearer_auth(&token)
            .json(body)
            .build()
            .map_err(|e| SynapseError::Request(e.to_string()));
        let answer = match request {
            Ok(request) => self.execute(request, kind).await,
            Err(e) => Err(e),
        };
        // Ended whatever the call did: the token is never kept.
        let ended = match (&self.mas, session) {
            (Some(mas), Some(session)) => mas
                .end_session(crate::mas::SessionKind::Personal, &session)
                .await
                .map_err(|e| SynapseError::Mas(e.to_string())),
            _ => self.logout_token(&token).await,
        };
        let answer = answer?;
        ended.map(|()| answer)
    }

    /// A token of the user's for one call, and in MAS mode its session.
    async fn one_call_token(
        &self,
        user_id: &UserId,
        purpose: &str,
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
                &format!("openmeet-matrix-operator: {purpose}"),
                TOKEN_LIFETIME,
            )
            .await
            .map_err(mas_error)?;
        Ok((minted.access_token, Some(minted.session_id)))
    }
}
