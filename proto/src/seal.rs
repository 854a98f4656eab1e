//! Secrets at rest: the secret fields of a destination record (verification
//! token, signing secrets, header values) are sealed with AES-256-GCM under
//! an operator key before they are written to the destinations topic.
//!
//! A sealed value is `sealed:v1:<key id>:<base64(nonce ‖ ciphertext)>`. The
//! associated data is the destination id and the field's place, so a sealed
//! value cannot be moved to another destination or field. The first key of
//! a [`Keyring`] seals; every key opens, which is how keys rotate: put the
//! new key first, reseal, then drop the old one.

use aes_gcm::{
    Aes256Gcm, KeyInit, Nonce,
    aead::{Aead, AeadCore, OsRng, Payload},
};
use base64::{Engine as _, engine::general_purpose::STANDARD};
use serde_json::Value;

/// The prefix of a sealed value.
pub const PREFIX: &str = "sealed:v1:";

/// Operator keys: the first seals, all open.
pub struct Keyring {
    keys: Vec<(String, Aes256Gcm)>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<_> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        write!(f, "Keyring({ids:?})")
    }
}

impl Keyring {
    /// A keyring from (id, base64 of 32 bytes) pairs, the sealing key first.
    pub fn new<'a>(keys: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self, String> {
        let mut out: Vec<(String, Aes256Gcm)> = Vec::new();
        for (id, b64) in keys {
            if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                return Err(format!("key id {id:?} must be letters, digits, - or _"));
            }
            if out.iter().any(|(existing, _)| existing == id) {
                return Err(format!("key id {id:?} appears twice"));
            }
            let bytes = STANDARD.decode(b64).map_err(|_| format!("key {id:?} is not base64"))?;
            let cipher = Aes256Gcm::new_from_slice(&bytes)
                .map_err(|_| format!("key {id:?} must be 32 bytes (base64 of 32 random bytes)"))?;
            out.push((id.to_owned(), cipher));
        }
        if out.is_empty() {
            return Err("a keyring needs at least one key".into());
        }
        Ok(Self { keys: out })
    }

    /// The id of the sealing key.
    pub fn current(&self) -> &str {
        &self.keys[0].0
    }

    /// Seals `plaintext` for the place `aad`.
    pub fn seal(&self, plaintext: &str, aad: &str) -> String {
        let (id, cipher) = &self.keys[0];
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        // Encryption with a valid key and nonce does not fail.
        let ct = cipher.encrypt(&nonce, Payload { msg: plaintext.as_bytes(), aad: aad.as_bytes() }).unwrap_or_default();
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&ct);
        format!("{PREFIX}{id}:{}", STANDARD.encode(blob))
    }

    /// Opens a sealed value for the place `aad`. The error names the key,
    /// never the value.
    pub fn open(&self, sealed: &str, aad: &str) -> Result<String, String> {
        let rest = sealed.strip_prefix(PREFIX).ok_or("not a sealed value")?;
        let (id, b64) = rest.split_once(':').ok_or("malformed sealed value")?;
        let (_, cipher) = self
            .keys
            .iter()
            .find(|(k, _)| k == id)
            .ok_or_else(|| format!("sealed with key {id:?}, which is not configured"))?;
        let blob = STANDARD.decode(b64).map_err(|_| "malformed sealed value".to_owned())?;
        if blob.len() < 12 {
            return Err("malformed sealed value".into());
        }
        let (nonce, ct) = blob.split_at(12);
        let plain = cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad: aad.as_bytes() })
            .map_err(|_| format!("a value sealed with key {id:?} does not open (wrong key, or moved)"))?;
        String::from_utf8(plain).map_err(|_| "sealed value is not UTF-8".into())
    }
}

/// The secret fields of a destination record, as JSON pointers (header
/// values are added per header).
fn secret_places(value: &Value) -> Vec<String> {
    let mut places = vec![
        "/verification_token".to_owned(),
        "/signing_secret".to_owned(),
        "/previous_signing_secret/secret".to_owned(),
    ];
    if let Some(headers) = value.get("headers").and_then(Value::as_array) {
        places.extend((0..headers.len()).map(|i| format!("/headers/{i}/value")));
    }
    places
}

fn aad(value: &Value, place: &str) -> String {
    format!("{}{place}", value.get("id").and_then(Value::as_str).unwrap_or_default())
}

/// Seals every secret field of a destination record in place.
pub fn seal_destination(value: &mut Value, keyring: &Keyring) {
    for place in secret_places(value) {
        let context = aad(value, &place);
        if let Some(Value::String(s)) = value.pointer_mut(&place)
            && !s.starts_with(PREFIX)
        {
            *s = keyring.seal(s, &context);
        }
    }
}

/// Opens every sealed field of a destination record in place. Plain values
/// are left as they are (records written before keys were configured).
pub fn open_destination(value: &mut Value, keyring: Option<&Keyring>) -> Result<(), String> {
    for place in secret_places(value) {
        let context = aad(value, &place);
        if let Some(Value::String(s)) = value.pointer_mut(&place)
            && s.starts_with(PREFIX)
        {
            let keyring = keyring.ok_or("the record's secrets are sealed, and no secrets.keys are configured")?;
            *s = keyring.open(s, &context).map_err(|e| format!("{place}: {e}"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const K2: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";

    fn record() -> Value {
        serde_json::json!({
            "id": "d-1",
            "verification_token": "0123456789abcdef",
            "signing_secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "headers": [{ "name": "X-A", "value": "header-secret" }],
        })
    }

    #[test]
    fn seals_every_secret_and_opens_them_again() {
        let ring = Keyring::new([("k1", K1)]).unwrap();
        let mut v = record();
        seal_destination(&mut v, &ring);
        let text = v.to_string();
        for secret in ["0123456789abcdef", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "header-secret"] {
            assert!(!text.contains(secret), "{secret} left in the clear");
        }
        assert!(v["verification_token"].as_str().unwrap().starts_with("sealed:v1:k1:"));
        assert_eq!(v["headers"][0]["name"], "X-A", "names are not secret");
        open_destination(&mut v, Some(&ring)).unwrap();
        assert_eq!(v, record());
    }

    #[test]
    fn rotation_and_its_errors() {
        let old = Keyring::new([("k1", K1)]).unwrap();
        let mut v = record();
        seal_destination(&mut v, &old);
        let both = Keyring::new([("k2", K2), ("k1", K1)]).unwrap();
        let mut opened = v.clone();
        open_destination(&mut opened, Some(&both)).expect("old records open during rotation");
        let mut resealed = opened.clone();
        seal_destination(&mut resealed, &both);
        assert!(resealed["signing_secret"].as_str().unwrap().starts_with("sealed:v1:k2:"));
        let new_only = Keyring::new([("k2", K2)]).unwrap();
        let err = open_destination(&mut v.clone(), Some(&new_only)).unwrap_err();
        assert!(err.contains("\"k1\", which is not configured"), "{err}");
        assert!(open_destination(&mut resealed, Some(&new_only)).is_ok());
        assert!(open_destination(&mut v.clone(), None).unwrap_err().contains("no secrets.keys"));
    }

    #[test]
    fn a_sealed_value_cannot_move() {
        let ring = Keyring::new([("k1", K1)]).unwrap();
        let mut v = record();
        seal_destination(&mut v, &ring);
        let mut moved = v.clone();
        moved["signing_secret"] = v["verification_token"].clone();
        assert!(open_destination(&mut moved, Some(&ring)).unwrap_err().contains("/signing_secret"));
        let mut other = v.clone();
        other["id"] = "d-2".into();
        assert!(open_destination(&mut other, Some(&ring)).is_err(), "bound to its destination");
    }

    #[test]
    fn bad_keys_are_named() {
        assert!(Keyring::new([("k1", "short")]).unwrap_err().contains("base64"));
        assert!(Keyring::new([("k1", "c2hvcnQ=")]).unwrap_err().contains("32 bytes"));
        assert!(Keyring::new([("k 1", K1)]).unwrap_err().contains("key id"));
        assert!(Keyring::new([("k1", K1), ("k1", K2)]).unwrap_err().contains("twice"));
        assert!(Keyring::new(Vec::<(&str, &str)>::new()).is_err());
        assert_eq!(format!("{:?}", Keyring::new([("k1", K1)]).unwrap()), "Keyring([\"k1\"])");
    }
}
