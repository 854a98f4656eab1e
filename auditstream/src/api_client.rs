//! The HTTP client the admin commands use to talk to the producer API.

/// A client with rustls and no proxies.
pub fn client() -> reqwest::Client {
    deliverer::http::install_crypto_provider();
    reqwest::Client::builder().no_proxy().build().unwrap_or_else(|_| reqwest::Client::new())
}
