//! Destination configuration (`proto::destination`): the JSON an owner
//! sends, and each validated value on its own.
//!
//! Invariants:
//! - deserializing and `Destination::validate` never panic;
//! - an accepted destination's header values hold no control characters and
//!   at most 255 bytes, its header names are RFC 9110 tokens, its URL is
//!   `http` or `https`, at most 255 characters, with a host and no
//!   credentials, and its token is 16 to 24 visible characters;
//! - what validates at most 20 headers and 5 namespace filters;
//! - an accepted destination survives a serde round trip unchanged.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use proto::{
    Registry,
    destination::{Destination, DestinationUrl, HeaderName, HeaderValue, SigningSecret, VerificationToken},
};

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::embedded)
}

fn check_url(url: &DestinationUrl) {
    let text = url.expose();
    let length = text.chars().count();
    assert!(length <= 255, "URL of {length} characters accepted");
    let parsed = url::Url::parse(text).expect("accepted URL does not parse");
    assert!(matches!(parsed.scheme(), "http" | "https"), "scheme {} accepted", parsed.scheme());
    assert!(parsed.host_str().is_some_and(|h| !h.is_empty()), "URL without host accepted");
    assert!(parsed.username().is_empty() && parsed.password().is_none(), "URL with credentials accepted");
    // The deliverer sends to the parsed form: it must hold no raw control
    // characters, whatever the stored text holds.
    assert!(!parsed.as_str().chars().any(char::is_control), "request target with control characters");
}

fn check_header_value(v: &HeaderValue) {
    let text = v.expose();
    let length = text.chars().count();
    assert!(length <= 255, "header value of {length} characters accepted");
    assert!(!text.chars().any(char::is_control), "header value with a control character accepted: {text:?}");
}

fn check_header_name(n: &HeaderName) {
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    assert!(!n.expose().is_empty() && n.expose().bytes().all(tchar), "header name {:?} accepted", n.expose());
}

fn check_token(t: &VerificationToken) {
    let t = t.expose();
    assert!((16..=24).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_graphic()), "token {t:?} accepted");
}

fn whole(data: &[u8]) {
    let Ok(d) = serde_json::from_slice::<Destination>(data) else { return };
    check_url(&d.url);
    check_token(&d.verification_token);
    for h in &d.headers {
        check_header_name(&h.name);
        check_header_value(&h.value);
    }
    if d.validate(registry()).is_ok() {
        assert!(d.headers.len() <= 20, "{} headers validated", d.headers.len());
        assert!(d.namespace_filters.len() <= 5, "{} namespace filters validated", d.namespace_filters.len());
    }
    let json = serde_json::to_vec(&d).expect("an accepted destination serializes");
    let back: Destination = serde_json::from_slice(&json).expect("an accepted destination reads back");
    assert_eq!(back, d, "serde round trip changed the destination");
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks a value type to feed the rest to directly (far
    // quicker to explore than through the JSON); otherwise, the whole
    // destination as JSON.
    let Some((&selector, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return whole(data) };
    match selector {
        b'U' => {
            if let Ok(u) = DestinationUrl::new(text) {
                check_url(&u)
            }
        }
        b'V' => {
            if let Ok(v) = HeaderValue::new(text) {
                check_header_value(&v)
            }
        }
        b'N' => {
            if let Ok(n) = HeaderName::new(text) {
                check_header_name(&n)
            }
        }
        b'T' => {
            if let Ok(t) = VerificationToken::new(text) {
                check_token(&t)
            }
        }
        b'S' => {
            if let Ok(s) = SigningSecret::new(text) {
                assert!((24..=64).contains(&s.key().len()), "signing key of {} bytes accepted", s.key().len());
            }
        }
        _ => whole(data),
    }
});
