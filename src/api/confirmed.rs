//! What an object's last convergence confirmed in Synapse, persisted in its
//! status so that any replica (a restarted one, a new leader) can trust an
//! unchanged object without reading Synapse again.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The desired state Synapse was last confirmed to match, and when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Confirmed {
    /// Digest of everything the convergence answered: the spec, what was
    /// folded into it (permissions, users, the parent space) and the last
    /// drift mark. Any change makes it differ.
    pub digest: String,
    /// When Synapse was last read and found (or made) to match. The sweep
    /// reads the object again once this is a sweep period old.
    #[schemars(with = "String")]
    pub at: Time,
}

impl Confirmed {
    /// Confirmed now.
    pub fn now(digest: impl Into<String>) -> Self {
        Confirmed {
            digest: digest.into(),
            at: Time(k8s_openapi::jiff::Timestamp::now()),
        }
    }
}
