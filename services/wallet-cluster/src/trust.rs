//! Trust between members: HMAC-SHA256 under the cluster's shared secret. The secret
//! never travels; a signature proves that whoever wrote a request or a member entry
//! holds it.
//!
//! Rotation: a node signs with its current secret and accepts signatures under the
//! current or the previous one, so nodes that have and have not switched yet keep
//! trusting each other during a rolling restart (README, "Rotating the internal secret").

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The secrets a node signs and verifies with. `Debug` shows only how many there are.
#[derive(Clone)]
pub struct SigningKeys {
    /// Signs and verifies.
    current: SecretString,
    /// Verify only: the secret being rotated in or out.
    previous: Option<SecretString>,
}

impl std::fmt::Debug for SigningKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKeys")
            .field("previous", &self.previous.is_some())
            .finish_non_exhaustive()
    }
}

impl SigningKeys {
    pub fn new(current: SecretString, previous: Option<SecretString>) -> Self {
        Self { current, previous }
    }

    /// The signature of `fields` under the current secret, URL-safe base64.
    ///
    /// `purpose` separates the kinds of signed things, so a signature made for one kind
    /// (a member entry) never verifies as another (a request). Each field is written
    /// with its length first, so no two different field lists give the same input.
    pub fn sign(&self, purpose: &str, fields: &[&[u8]]) -> String {
        URL_SAFE_NO_PAD.encode(mac(&self.current, purpose, fields).finalize().into_bytes())
    }

    /// Whether `signature` is the signature of `fields` under the current or the
    /// previous secret; compared in constant time (`Mac::verify_slice`).
    pub fn verify(&self, purpose: &str, fields: &[&[u8]], signature: &str) -> bool {
        let Ok(tag) = URL_SAFE_NO_PAD.decode(signature) else {
            return false;
        };
        std::iter::once(&self.current)
            .chain(self.previous.as_ref())
            .any(|secret| mac(secret, purpose, fields).verify_slice(&tag).is_ok())
    }
}

fn mac(secret: &SecretString, purpose: &str, fields: &[&[u8]]) -> HmacSha256 {
    // HMAC takes keys of any length; this cannot fail.
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(secret.expose_secret().as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    for field in std::iter::once(purpose.as_bytes()).chain(fields.iter().copied()) {
        mac.update(&(field.len() as u64).to_be_bytes());
        mac.update(field);
    }
    mac
}

/// A secret that could not be read from the environment.
#[derive(Debug, thiserror::Error)]
pub enum SecretSourceError {
    #[error("set either {name} or {name}_FILE, not both")]
    Both { name: String },
    #[error("{name}_FILE names {path}, which cannot be read: {source}")]
    Unreadable {
        name: String,
        path: String,
        source: std::io::Error,
    },
    #[error("{name}_FILE names {path}, which is empty")]
    Empty { name: String, path: String },
}

/// The secret `name` from the variable itself or from the file `<name>_FILE` names
/// (a mounted Kubernetes Secret), with trailing line breaks removed; `None` when
/// neither is set. Setting both is an error: one of them would be ignored silently.
pub fn secret_from_env(
    lookup: impl Fn(&str) -> Option<String>,
    name: &str,
) -> Result<Option<SecretString>, SecretSourceError> {
    let set = |name: &str| lookup(name).filter(|value| !value.trim().is_empty());
    let file_var = format!("{name}_FILE");
    match (set(name), set(&file_var)) {
        (Some(_), Some(_)) => Err(SecretSourceError::Both {
            name: name.to_owned(),
        }),
        (Some(value), None) => Ok(Some(SecretString::from(value))),
        (None, Some(path)) => {
            let path = path.trim().to_owned();
            let text =
                std::fs::read_to_string(&path).map_err(|source| SecretSourceError::Unreadable {
                    name: name.to_owned(),
                    path: path.clone(),
                    source,
                })?;
            let value = text.trim_end_matches(['\n', '\r']);
            if value.trim().is_empty() {
                return Err(SecretSourceError::Empty {
                    name: name.to_owned(),
                    path,
                });
            }
            Ok(Some(SecretString::from(value.to_owned())))
        }
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn keys(current: &str, previous: Option<&str>) -> SigningKeys {
        SigningKeys::new(current.into(), previous.map(SecretString::from))
    }

    #[test]
    fn a_signature_verifies_under_either_secret_and_nothing_else() {
        let old = keys("old-secret", None);
        let signature = old.sign("test", &[b"a", b"b"]);
        assert!(old.verify("test", &[b"a", b"b"], &signature));
        // Rotating in: the new secret signs, the old one still verifies.
        let rotated = keys("new-secret", Some("old-secret"));
        assert!(rotated.verify("test", &[b"a", b"b"], &signature));
        assert!(old.verify(
            "test",
            &[b"a", b"b"],
            &keys("old-secret", Some("new-secret")).sign("test", &[b"a", b"b"])
        ));
        // After the old secret is dropped, its signatures are refused.
        assert!(!keys("new-secret", None).verify("test", &[b"a", b"b"], &signature));
        // Another purpose, other fields, field boundaries moved, garbage.
        assert!(!old.verify("other", &[b"a", b"b"], &signature));
        assert!(!old.verify("test", &[b"a", b"c"], &signature));
        assert!(!old.verify("test", &[b"ab", b""], &signature));
        assert!(!old.verify("test", &[b"a", b"b"], "not base64!"));
        assert!(!old.verify("test", &[b"a", b"b"], ""));
    }

    #[test]
    fn debug_never_shows_a_secret() {
        let debug = format!("{:?}", keys("current-secret", Some("previous-secret")));
        assert!(
            !debug.contains("current-secret") && !debug.contains("previous-secret"),
            "{debug}"
        );
    }

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn a_secret_comes_from_the_variable_or_its_file_but_not_both() {
        let dir = std::env::temp_dir().join(format!("wallet-secret-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("secret");
        std::fs::write(&file, "from-the-file\r\n\n").expect("write");
        let path = file.to_str().expect("utf-8 path");

        let read = |pairs: &[(&str, &str)]| secret_from_env(lookup(pairs), "S");
        let value = |pairs: &[(&str, &str)]| {
            read(pairs)
                .expect("readable")
                .map(|s| s.expose_secret().to_owned())
        };
        assert_eq!(value(&[("S", "plain")]).as_deref(), Some("plain"));
        assert_eq!(value(&[("S_FILE", path)]).as_deref(), Some("from-the-file"));
        assert_eq!(value(&[]), None);
        assert!(matches!(
            read(&[("S", "plain"), ("S_FILE", path)]),
            Err(SecretSourceError::Both { .. })
        ));
        let missing = dir.join("missing");
        let error = read(&[("S_FILE", missing.to_str().expect("path"))]).expect_err("missing file");
        assert!(error.to_string().starts_with("S_FILE names "), "{error}");
        std::fs::write(&file, "\n").expect("write");
        assert!(matches!(
            read(&[("S_FILE", path)]),
            Err(SecretSourceError::Empty { .. })
        ));
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
