//! The operator's application-service registration, loaded by Synapse through
//! `app_service_config_files`.

use rand::distr::{Alphanumeric, SampleString};
use serde::Serialize;

/// Settings that shape the registration.
#[derive(Clone, Debug)]
pub struct RegistrationParams {
    pub server_name: String,
    /// The admin account every call masquerades as (non-exclusive namespace).
    pub admin_localpart: String,
    /// The registration's own bot; never the admin (Synapse refuses to modify it).
    pub sender_localpart: String,
    /// Every managed alias starts with this prefix (exclusive namespace).
    pub alias_prefix: String,
    /// Where Synapse pushes transactions, if anywhere yet.
    pub url: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Registration {
    pub id: String,
    pub url: Option<String>,
    pub as_token: String,
    pub hs_token: String,
    pub sender_localpart: String,
    pub rate_limited: bool,
    pub namespaces: Namespaces,
}

#[derive(Debug, Serialize)]
pub struct Namespaces {
    pub users: Vec<NamespaceRule>,
    pub aliases: Vec<NamespaceRule>,
    pub rooms: Vec<NamespaceRule>,
}

#[derive(Debug, Serialize)]
pub struct NamespaceRule {
    pub exclusive: bool,
    pub regex: String,
}

/// Escapes a literal for a Python regular expression (what Synapse uses).
fn regex_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if !c.is_ascii_alphanumeric() && c != '_' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn token() -> String {
    Alphanumeric.sample_string(&mut rand::rng(), 48)
}

impl Registration {
    /// A registration with fresh random tokens.
    pub fn generate(p: &RegistrationParams) -> Self {
        let server = regex_literal(&p.server_name);
        Registration {
            id: "openmeet-matrix-operator".into(),
            url: p.url.clone(),
            as_token: token(),
            hs_token: token(),
            sender_localpart: p.sender_localpart.clone(),
            rate_limited: false,
            namespaces: Namespaces {
                users: vec![NamespaceRule {
                    exclusive: false,
                    regex: format!("^@{}:{}$", regex_literal(&p.admin_localpart), server),
                }],
                aliases: vec![NamespaceRule {
                    exclusive: true,
                    regex: format!("^#{}.*:{}$", regex_literal(&p.alias_prefix), server),
                }],
                rooms: vec![],
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> RegistrationParams {
        RegistrationParams {
            server_name: "chat.example.org".into(),
            admin_localpart: "openmeet-admin".into(),
            sender_localpart: "openmeet-operator".into(),
            alias_prefix: "openmeet-".into(),
            url: None,
        }
    }

    #[test]
    fn namespaces_are_anchored_and_escaped() {
        let r = Registration::generate(&params());
        assert_eq!(
            r.namespaces.users[0].regex,
            r"^@openmeet\-admin:chat\.example\.org$"
        );
        assert!(!r.namespaces.users[0].exclusive);
        assert_eq!(
            r.namespaces.aliases[0].regex,
            r"^#openmeet\-.*:chat\.example\.org$"
        );
        assert!(r.namespaces.aliases[0].exclusive);
        assert!(!r.rate_limited);
        assert_ne!(r.sender_localpart, params().admin_localpart);
    }

    #[test]
    fn tokens_are_fresh_and_distinct() {
        let a = Registration::generate(&params());
        let b = Registration::generate(&params());
        assert_ne!(a.as_token, b.as_token);
        assert_ne!(a.as_token, a.hs_token);
        assert!(a.as_token.len() >= 32);
    }
}
