//! The broker's address: `redis://[user:password@]host:port/db` or `rediss://` (TLS; a
//! private CA's certificate in `$CYCLEQD_BROKER_CA`, else the system's and webpki's roots).
//! The password is never shown: [`BrokerUrl`]'s `Display` masks it, and errors are built from
//! that form only.

use std::time::Duration;

use crate::error::{Error, Result};

/// A parsed broker URL.
#[derive(Clone)]
pub struct BrokerUrl {
    url: String,
    shown: String,
}

impl std::fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl std::fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BrokerUrl({})", self.shown)
    }
}

impl std::str::FromStr for BrokerUrl {
    type Err = String;

    fn from_str(url: &str) -> std::result::Result<Self, String> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err("a broker URL is redis://HOST:PORT/DB or rediss://… (TLS)".into());
        };
        if scheme != "redis" && scheme != "rediss" {
            return Err(format!(
                "unsupported broker scheme `{scheme}` (redis or rediss)"
            ));
        }
        // `user:password@` is masked wherever the URL is shown.
        let shown = match rest.rsplit_once('@') {
            Some((auth, host)) => {
                let user = auth.split_once(':').map_or("", |(u, _)| u);
                format!("{scheme}://{user}:***@{host}")
            }
            None => url.to_string(),
        };
        let parsed: redis::ConnectionInfo = redis::IntoConnectionInfo::into_connection_info(url)
            .map_err(|e| format!("invalid broker URL {shown}: {}", mask(&e.to_string(), url)))?;
        drop(parsed);
        Ok(BrokerUrl {
            url: url.to_string(),
            shown,
        })
    }
}

/// `text` with the URL's password removed, in case an error quoted it.
fn mask(text: &str, url: &str) -> String {
    match url.split_once("://").and_then(|(_, r)| r.rsplit_once('@')) {
        Some((auth, _)) => {
            let pw = auth.split_once(':').map_or(auth, |(_, p)| p);
            if pw.is_empty() {
                text.to_string()
            } else {
                text.replace(pw, "***")
            }
        }
        None => text.to_string(),
    }
}

impl BrokerUrl {
    /// The URL itself, password included: only for handing it to a child process.
    pub fn as_str(&self) -> &str {
        &self.url
    }

    /// A connection (blocking calls; each thread of a process uses its own).
    pub fn connect(&self) -> Result<redis::Connection> {
        static PROVIDER: std::sync::Once = std::sync::Once::new();
        PROVIDER.call_once(|| {
            // rustls needs one process-wide crypto provider; a second install is harmless.
            let _ = rustls::crypto::ring::default_provider().install_default();
        });
        let client = match std::env::var_os("CYCLEQD_BROKER_CA") {
            Some(ca) if self.url.starts_with("rediss://") => {
                let pem = std::fs::read(&ca).map_err(|e| Error::io(&ca, e))?;
                redis::Client::build_with_tls(
                    self.url.as_str(),
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem),
                    },
                )
            }
            _ => redis::Client::open(self.url.as_str()),
        }
        .map_err(|e| self.error(&e))?;
        let conn = client
            .get_connection_with_timeout(Duration::from_secs(10))
            .map_err(|e| self.error(&e))?;
        Ok(conn)
    }

    /// A broker error as one line naming the (masked) URL.
    pub fn error(&self, e: &redis::RedisError) -> Error {
        Error::invalid(format!(
            "broker {}: {}",
            self.shown,
            mask(&e.to_string(), &self.url).replace('\n', " ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_never_shown() {
        let u: BrokerUrl = "redis://worker:s3cret@10.0.0.5:6379/2".parse().unwrap();
        assert_eq!(u.to_string(), "redis://worker:***@10.0.0.5:6379/2");
        assert!(!format!("{u:?}").contains("s3cret"));
        let u: BrokerUrl = "rediss://:pw@host:6380/0".parse().unwrap();
        assert_eq!(u.to_string(), "rediss://:***@host:6380/0");
        assert!("http://x".parse::<BrokerUrl>().is_err());
        assert!("localhost:6379".parse::<BrokerUrl>().is_err());
        assert_eq!(
            mask("auth failed for s3cret", "redis://u:s3cret@h/0"),
            "auth failed for ***"
        );
    }
}
