//! Bearer tokens: stored as SHA-256 hashes, compared in constant time.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{AuthConfig, Right};

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token, or an unknown one: 401.
    #[error("a valid bearer token is required")]
    Unauthenticated,
    /// A known token without the right: 403.
    #[error("this token may not {0}")]
    Forbidden(&'static str),
}

struct Token {
    name: String,
    hash: [u8; 32],
    rights: Vec<Right>,
    owner_of: Vec<i64>,
    user_id: Option<i64>,
}

/// Who a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token holder's name (never the token).
    pub name: String,
    /// Its rights.
    pub rights: Vec<Right>,
    /// Top-level groups it owns.
    pub owner_of: Vec<i64>,
    /// Its user id, for audit events.
    pub user_id: Option<i64>,
}

impl Principal {
    /// Whether it is an instance admin.
    pub fn is_admin(&self) -> bool {
        self.rights.contains(&Right::InstanceAdmin)
    }

    /// Whether it may manage `group`'s destinations.
    pub fn manages_group(&self, group: i64) -> bool {
        self.is_admin() || self.owner_of.contains(&group)
    }
}

/// What a caller without a token may do, where tokens are not required.
const ANONYMOUS: [Right; 2] = [Right::Publish, Right::Namespaces];

/// The configured tokens.
pub struct Auth {
    required: bool,
    tokens: Vec<Token>,
}

impl Auth {
    /// From configuration (already validated).
    pub fn new(config: &AuthConfig) -> Self {
        let tokens = config
            .tokens
            .iter()
            .map(|t| {
                let mut hash = [0u8; 32];
                for (i, b) in hash.iter_mut().enumerate() {
                    *b = u8::from_str_radix(&t.sha256[2 * i..2 * i + 2], 16).unwrap_or(0);
                }
                Token {
                    name: t.name.clone(),
                    hash,
                    rights: t.rights.clone(),
                    owner_of: t.owner_of.clone(),
                    user_id: t.user_id,
                }
            })
            .collect();
        Self { required: config.required, tokens }
    }

    /// Checks an `Authorization` header value for `right`; returns the
    /// token holder's name. Without a token (when tokens are not required)
    /// the rights are the anonymous ones.
    pub fn check(&self, authorization: Option<&str>, right: Right) -> Result<String, AuthError> {
        let (name, rights) = match self.presented(authorization)? {
            Some(t) => (t.name.as_str(), t.rights.as_slice()),
            None => ("anonymous", &ANONYMOUS[..]),
        };
        if rights.contains(&right) {
            return Ok(name.to_owned());
        }
        Err(AuthError::Forbidden(match right {
            Right::Publish => "publish events",
            Right::Namespaces => "change namespaces",
            Right::InstanceAdmin => "manage instance destinations",
        }))
    }

    /// Identifies the caller. Without a token (when tokens are not
    /// required) the caller may publish and write namespaces, nothing more:
    /// managing destinations always takes a token.
    pub fn principal(&self, authorization: Option<&str>) -> Result<Principal, AuthError> {
        Ok(match self.presented(authorization)? {
            Some(t) => Principal {
                name: t.name.clone(),
                rights: t.rights.clone(),
                owner_of: t.owner_of.clone(),
                user_id: t.user_id,
            },
            None => {
                Principal { name: "anonymous".into(), rights: ANONYMOUS.to_vec(), owner_of: Vec::new(), user_id: None }
            }
        })
    }

    /// The configured token an `Authorization` header value presents;
    /// `None` when it presents none and none is required.
    fn presented(&self, authorization: Option<&str>) -> Result<Option<&Token>, AuthError> {
        let presented = authorization.and_then(|v| v.strip_prefix("Bearer ")).map(str::trim).filter(|p| !p.is_empty());
        let Some(presented) = presented else {
            return if self.required { Err(AuthError::Unauthenticated) } else { Ok(None) };
        };
        let hash: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        // Compare against every token so timing does not tell which matched.
        let mut found: Option<&Token> = None;
        for t in &self.tokens {
            if bool::from(t.hash.ct_eq(&hash)) {
                found = Some(t);
            }
        }
        found.map(Some).ok_or(AuthError::Unauthenticated)
    }
}

/// The hex SHA-256 of a token, as configuration stores it.
pub fn hash_token(token: &str) -> String {
    Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TokenConfig;

    fn auth(required: bool) -> Auth {
        Auth::new(&AuthConfig {
            required,
            tokens: vec![TokenConfig {
                name: "svc".into(),
                sha256: hash_token("s3cret-token"),
                rights: vec![Right::Publish],
                owner_of: vec![7],
                user_id: None,
            }],
        })
    }

    #[test]
    fn token_rules() {
        let a = auth(true);
        assert_eq!(a.check(Some("Bearer s3cret-token"), Right::Publish), Ok("svc".into()));
        assert_eq!(
            a.check(Some("Bearer s3cret-token"), Right::Namespaces),
            Err(AuthError::Forbidden("change namespaces"))
        );
        assert_eq!(a.check(Some("Bearer wrong"), Right::Publish), Err(AuthError::Unauthenticated));
        assert_eq!(a.check(Some("s3cret-token"), Right::Publish), Err(AuthError::Unauthenticated));
        assert_eq!(a.check(None, Right::Publish), Err(AuthError::Unauthenticated));
        let open = auth(false);
        assert_eq!(open.check(None, Right::Namespaces), Ok("anonymous".into()));
        assert_eq!(open.check(Some("Bearer wrong"), Right::Publish), Err(AuthError::Unauthenticated));
        assert_eq!(
            open.check(None, Right::InstanceAdmin),
            Err(AuthError::Forbidden("manage instance destinations")),
            "anonymous callers may publish and write namespaces, nothing more"
        );
    }

    #[test]
    fn principals_carry_roles() {
        let p = auth(true).principal(Some("Bearer s3cret-token")).unwrap();
        assert!(p.manages_group(7) && !p.manages_group(8) && !p.is_admin());
        assert_eq!(auth(true).principal(None), Err(AuthError::Unauthenticated));
        assert_eq!(auth(true).principal(Some("Bearer nope")), Err(AuthError::Unauthenticated));
        let anon = auth(false).principal(None).unwrap();
        assert!(!anon.is_admin() && !anon.manages_group(7), "anonymous never manages destinations");
    }
}
