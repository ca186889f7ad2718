//! The HTTP transport of remote sources and stores: a blocking `ureq` agent (a keep-alive
//! pool, TLS by rustls on ring, the system's roots) plus the rules that turn a transport error
//! or a status into a retry decision ([`Failure`]).

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ureq::http::{HeaderMap, Response};
use ureq::tls::{Certificate, RootCerts, TlsConfig};
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{DefaultConnector, NextTimeout};
use ureq::{Agent, Body};

use super::retry::{parse_retry_after, Failure, RetryPolicy};
use crate::remote::RemoteOptions;

/// Error bodies are read (for S3's error code, and so the connection can be reused) up to
/// this size; a larger one is dropped with its connection.
const ERROR_BODY_LIMIT: u64 = 64 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Put,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Put => "PUT",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a request goes, made anew for every attempt: a presigned S3 URL expires, so each
/// attempt signs its own.
pub trait Locate: Send + Sync {
    fn url(&self, method: Method) -> String;
}

/// A fixed URL (plain HTTP(S) images).
pub struct FixedUrl(pub String);

impl Locate for FixedUrl {
    fn url(&self, _: Method) -> String {
        self.0.clone()
    }
}

/// A URL fit for logs and errors: without its query string, which may carry a signature.
pub fn redact(url: &str) -> &str {
    let end = url.find(['?', '#']).unwrap_or(url.len());
    &url[..end]
}

/// One agent and one retry policy, shared by every request of a source or store.
pub struct HttpClient {
    agent: Agent,
    pub policy: RetryPolicy,
}

impl HttpClient {
    pub fn new(remote: &RemoteOptions) -> Self {
        let tls = TlsConfig::builder()
            .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .root_certs(system_roots())
            .build();
        let config = Agent::config_builder()
            // Statuses are ours to judge (a 412 is not an error like a 503).
            .http_status_as_error(false)
            // No redirects: a 3xx is a permanent failure (`status_failure`). Following one
            // could take an https:// image to plain http:// or another host, with the
            // conditional headers (and the image's bytes) in cleartext.
            .max_redirects(0)
            .tls_config(tls)
            .max_idle_connections(remote.connections.max(1))
            .max_idle_connections_per_host(remote.connections.max(1))
            .user_agent(concat!("ubiblk/", env!("CARGO_PKG_VERSION")))
            .build();
        let agent = Agent::with_parts(config, DefaultConnector::new(), CachingResolver::default());
        HttpClient {
            agent,
            policy: RetryPolicy::new(remote.attempt_timeout, remote.retry_budget),
        }
    }

    /// One attempt: sends the request with `timeout` for the whole exchange (connect to the
    /// last byte of the body) and returns the response, whatever its status. Transport errors
    /// come back classified.
    pub fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Response<Body>, Failure> {
        let mut req = ureq::http::Request::builder()
            .method(method.as_str())
            .uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let invalid = |_| {
            Failure::permanent(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{method} {}: not a valid request", redact(url)),
            ))
        };
        let result = match body {
            Some(data) => {
                let req = req.body(data).map_err(invalid)?;
                let req = self.agent.configure_request(req);
                self.agent.run(req.timeout_global(Some(timeout)).build())
            }
            None => {
                let req = req.body(()).map_err(invalid)?;
                let req = self.agent.configure_request(req);
                self.agent.run(req.timeout_global(Some(timeout)).build())
            }
        };
        result.map_err(|e| transport_failure(method, url, e))
    }
}

/// How long a resolved host name is used before it is looked up again.
const RESOLVE_TTL: Duration = Duration::from_secs(30);

/// Name resolution for the agent. ureq resolves the host of every request, pooled connection
/// or not, and its default resolver spawns a thread for each lookup that has a timeout (all of
/// ours): measured, a thread start and exit per stripe fetch, most of a millisecond of a demand
/// fetch's latency on loopback. Here each host is looked up once per [`RESOLVE_TTL`] (with
/// the default resolver, timeout included) and served from the cache in between.
#[derive(Debug, Default)]
struct CachingResolver {
    cache: Mutex<HashMap<String, (Instant, ResolvedSocketAddrs)>>,
}

impl Resolver for CachingResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let key = format!(
            "{}://{}",
            uri.scheme_str().unwrap_or_default(),
            uri.authority().map(|a| a.as_str()).unwrap_or_default()
        );
        let cache = || self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, addrs)) = cache().get(&key) {
            if at.elapsed() < RESOLVE_TTL {
                return Ok(addrs.clone());
            }
        }
        let addrs = DefaultResolver::default().resolve(uri, config, timeout)?;
        cache().insert(key, (Instant::now(), addrs.clone()));
        Ok(addrs)
    }
}

/// The roots the system trusts (`SSL_CERT_FILE` and `SSL_CERT_DIR` honoured), loaded once.
fn system_roots() -> RootCerts {
    static ROOTS: OnceLock<Vec<Certificate<'static>>> = OnceLock::new();
    let certs = ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in found.errors.iter().take(3) {
            log::warn!("loading the system's trusted certificates: {e}");
        }
        found
            .certs
            .iter()
            .map(|c| Certificate::from_der(c.as_ref()).to_owned())
            .collect()
    });
    RootCerts::new_with_certs(certs)
}

/// A transport error: connection problems and timeouts are worth another attempt; a bad
/// certificate or URL is not. The message names the request, never its query string.
fn transport_failure(method: Method, url: &str, e: ureq::Error) -> Failure {
    let transient = match &e {
        // rustls reports a refused certificate as an I/O error of the handshake.
        ureq::Error::Io(io) => !is_tls_error(io),
        e => matches!(
            e,
            ureq::Error::Timeout(_)
                | ureq::Error::HostNotFound
                | ureq::Error::ConnectionFailed
                | ureq::Error::Protocol(_)
                | ureq::Error::BodyStalled
        ),
    };
    let kind = match &e {
        ureq::Error::Timeout(_) => io::ErrorKind::TimedOut,
        ureq::Error::Io(io) => io.kind(),
        _ => io::ErrorKind::Other,
    };
    // A bad URI's message repeats the URI (and its signature): leave it out.
    let detail = match &e {
        ureq::Error::BadUri(_) => "invalid URL".to_string(),
        e => e.to_string(),
    };
    let error = io::Error::new(kind, format!("{method} {}: {detail}", redact(url)));
    if transient {
        Failure::transient(error)
    } else {
        Failure::permanent(error)
    }
}

/// Whether an I/O error is TLS refusing the peer (a certificate, a protocol version): the
/// same again on every attempt.
fn is_tls_error(e: &io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
}

/// A response whose status is not the expected one: retried for 5xx, 408 and 429 (S3's
/// `SlowDown` is a 503), permanent otherwise. The error carries S3's error code and message
/// when the body has them (never the rest of the body: S3 echoes the string to sign).
pub fn status_failure(method: Method, url: &str, resp: &mut Response<Body>) -> Failure {
    let status = resp.status().as_u16();
    let retry_after = header(resp.headers(), "retry-after").and_then(parse_retry_after);
    let mut detail = String::new();
    if method != Method::Head {
        let mut body = Vec::new();
        let _ = resp
            .body_mut()
            .as_reader()
            .take(ERROR_BODY_LIMIT)
            .read_to_end(&mut body);
        let text = String::from_utf8_lossy(&body);
        if let Some(code) = xml_field(&text, "Code") {
            detail = format!(" ({code}");
            if let Some(msg) = xml_field(&text, "Message") {
                detail.push_str(": ");
                detail.push_str(msg);
            }
            detail.push(')');
        }
    }
    if (300..400).contains(&status) {
        detail.push_str(": redirects are not followed, configure the final URL");
    }
    let reason = resp.status().canonical_reason().unwrap_or("");
    let error = io::Error::new(
        match status {
            404 => io::ErrorKind::NotFound,
            401 | 403 => io::ErrorKind::PermissionDenied,
            _ => io::ErrorKind::Other,
        },
        format!("{method} {}: HTTP {status} {reason}{detail}", redact(url)),
    );
    let transient = status >= 500 || status == 408 || status == 429;
    Failure {
        error,
        transient,
        retry_after,
    }
}

/// A header's value as text.
pub fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The text of `<name>...</name>` in an S3 error document (enough of XML for that).
fn xml_field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let start = text.find(&open)? + open.len();
    let len = text[start..].find(&format!("</{name}>"))?;
    let v = text[start..start + len].trim();
    // A message is one short line; anything else is not shown.
    (v.len() <= 200 && !v.contains(['<', '\n'])).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_drops_query_and_fragment() {
        assert_eq!(
            redact("https://h/a/b.raw?X-Amz-Signature=abc&X-Amz-Credential=k"),
            "https://h/a/b.raw"
        );
        assert_eq!(redact("http://h:8080/x#frag"), "http://h:8080/x");
        assert_eq!(redact("http://h/x"), "http://h/x");
    }

    #[test]
    fn s3_error_fields() {
        let body = "<?xml version=\"1.0\"?><Error><Code>SlowDown</Code>\
                    <Message>Please reduce your request rate.</Message>\
                    <StringToSign>AWS4-HMAC-SHA256\nsecret-ish</StringToSign></Error>";
        assert_eq!(xml_field(body, "Code"), Some("SlowDown"));
        assert_eq!(
            xml_field(body, "Message"),
            Some("Please reduce your request rate.")
        );
        assert_eq!(xml_field(body, "StringToSign"), None);
        assert_eq!(xml_field("no xml", "Code"), None);
    }
}
