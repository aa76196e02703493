//! The custom resources of `matrix.openmeet.net/v1alpha1`, one file per kind.
//!
//! The CRD YAML in `crds/` is generated from these types (`make crds`), so
//! admission-time validation (patterns, enums, ranges, CEL rules) lives here.

pub mod conditions;
pub mod confirmed;
pub mod grant;
pub mod permission;
pub mod room;
pub mod user;

pub use conditions::Condition;
pub use confirmed::Confirmed;
pub use grant::{MatrixUserGrant, MatrixUserGrantSpec, MatrixUserGrantStatus};
pub use permission::{RoomPermission, RoomPermissionSpec, RoomPermissionStatus};
pub use room::{MatrixRoom, MatrixRoomSpec, MatrixRoomStatus};
pub use user::{MatrixUser, MatrixUserSpec, MatrixUserStatus, UserDeletionPolicy};

use kube::CustomResourceExt;

/// API group of every kind the operator serves.
pub const GROUP: &str = "matrix.openmeet.net";
/// The one field manager the operator uses for server-side apply.
pub const FIELD_MANAGER: &str = "openmeet-matrix-operator";
/// Free text shown to people (display names, room names, topics): no C0 or C1
/// control characters, no DEL, and no bidi overrides or isolates, which can make
/// a name read as someone else's. Written in RE2 syntax (`\x{..}`), which is
/// how kube-apiserver evaluates `pattern`.
pub const PLAIN_TEXT_PATTERN: &str =
    r"^[^\x{0}-\x{1F}\x{7F}-\x{9F}\x{202A}-\x{202E}\x{2066}-\x{2069}]*$";
/// Namespace label that names the tenant a namespace belongs to.
pub const TENANT_LABEL: &str = "matrix.openmeet.net/tenant";

/// The SSO subject as Synapse and Matrix clients see it: the platform's
/// subject qualified by its tenant, so equal subjects in two tenants are two
/// identities. Used both as the account's external id for the SSO provider
/// and as the id_token `sub` the sidecar issues (Synapse's `subject_template`
/// stays `{{ user.sub }}`). Tenant ids are label values and hold no `/`.
pub fn sso_subject(tenant: &str, subject: &str) -> String {
    format!("{tenant}/{subject}")
}

/// What the API server fills in for an object the operator has not written
/// a status for yet: an observedGeneration (0) behind every generation (≥ 1),
/// so kstatus reads a new object as InProgress from its first moment, even
/// while the operator is down, instead of as Current.
pub fn unobserved_status() -> serde_json::Value {
    serde_json::json!({"observedGeneration": 0})
}

/// Every CRD the operator serves, in a stable order.
pub fn crds(
) -> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    let mut crds = vec![
        MatrixUser::crd(),
        MatrixRoom::crd(),
        RoomPermission::crd(),
        MatrixUserGrant::crd(),
    ];
    for crd in &mut crds {
        for version in &mut crd.spec.versions {
            let status = version
                .schema
                .as_mut()
                .and_then(|s| s.open_api_v3_schema.as_mut())
                .and_then(|s| s.properties.as_mut())
                .and_then(|p| p.get_mut("status"));
            if let Some(status) = status {
                status.default = Some(
                    k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSON(
                        unobserved_status(),
                    ),
                );
            }
        }
    }
    crds
}

/// All CRDs as one multi-document YAML stream.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}
