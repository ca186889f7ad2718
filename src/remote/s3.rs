//! S3 over the HTTP transport: presigned URLs (rusty-s3, sans-IO SigV4) made per attempt, and
//! the [`S3Store`] object store (`s3://bucket/prefix`).

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use log::info;
use rusty_s3::actions::{GetObject, HeadObject, PutObject, S3Action};
use rusty_s3::{Bucket, UrlStyle};

use super::aws::AwsConfig;
use super::http::{status_failure, HttpClient, Locate, Method};
use super::retry::Failure;
use super::{check_key, ObjectStore};
use crate::remote::RemoteOptions;

/// Lifetime of a presigned URL. Each attempt signs anew, so this only has to outlast one
/// attempt (and a client clock a little off).
const PRESIGN_EXPIRY: Duration = Duration::from_secs(300);

/// Splits `s3://bucket/rest` into the bucket and the rest (possibly empty).
pub fn parse_url(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("s3://")?;
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    let ok = !bucket.is_empty()
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".-_".contains(&b));
    ok.then_some((bucket, key))
}

/// One bucket and the credentials to sign requests to it.
pub struct S3Bucket {
    bucket: Bucket,
    credentials: Option<rusty_s3::Credentials>,
    expiry: Duration,
}

impl fmt::Debug for S3Bucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // rusty-s3's Debug leaves the secret out; ours says only whether there is one.
        f.debug_struct("S3Bucket")
            .field("url", &self.bucket.base_url().as_str())
            .field("signed", &self.credentials.is_some())
            .finish()
    }
}

impl S3Bucket {
    /// Addresses `name` as `cfg` says: path-style under a custom endpoint (self-hosted stores
    /// rarely have wildcard DNS), virtual-host style on AWS.
    pub fn new(name: &str, cfg: &AwsConfig, remote: &RemoteOptions) -> io::Result<Self> {
        let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
        let (endpoint, style) = match &cfg.endpoint {
            Some(e) => (e.clone(), UrlStyle::Path),
            None => (
                format!("https://s3.{}.amazonaws.com", cfg.region),
                UrlStyle::VirtualHost,
            ),
        };
        let endpoint = url::Url::parse(&endpoint)
            .map_err(|e| invalid(format!("S3 endpoint {endpoint}: {e}")))?;
        let bucket = Bucket::new(endpoint, style, name.to_string(), cfg.region.clone())
            .map_err(|e| invalid(format!("S3 bucket {name}: {e}")))?;
        let credentials = cfg.credentials.as_ref().map(|c| match &c.token {
            Some(t) => rusty_s3::Credentials::new_with_token(
                c.key_id.clone(),
                c.secret.expose(),
                t.expose(),
            ),
            None => rusty_s3::Credentials::new(c.key_id.clone(), c.secret.expose()),
        });
        match &cfg.credentials {
            Some(c) => info!(
                "S3 bucket {name} at {}, region {}: access key {} from {}",
                bucket.base_url(),
                cfg.region,
                c.key_id,
                c.origin
            ),
            None => info!(
                "S3 bucket {name} at {}, region {}: no AWS credentials found, sending unsigned \
                 requests (public buckets only)",
                bucket.base_url(),
                cfg.region
            ),
        }
        Ok(S3Bucket {
            bucket,
            credentials,
            expiry: PRESIGN_EXPIRY.max(remote.attempt_timeout + Duration::from_secs(60)),
        })
    }

    pub fn name(&self) -> &str {
        self.bucket.name()
    }

    /// A URL for `method` on `key`, signed now.
    pub fn presign(&self, method: Method, key: &str) -> String {
        let creds = self.credentials.as_ref();
        let url = match method {
            Method::Get => GetObject::new(&self.bucket, creds, key).sign(self.expiry),
            Method::Head => HeadObject::new(&self.bucket, creds, key).sign(self.expiry),
            Method::Put => PutObject::new(&self.bucket, creds, key).sign(self.expiry),
        };
        let mut url: String = url.into();
        // Unsigned URLs come with an empty query.
        if url.ends_with('?') {
            url.pop();
        }
        url
    }
}

/// One object, signed per attempt (the S3 image source's [`Locate`]).
pub struct S3Object {
    pub bucket: Arc<S3Bucket>,
    pub key: String,
}

impl Locate for S3Object {
    fn url(&self, method: Method) -> String {
        self.bucket.presign(method, &self.key)
    }
}

/// `s3://bucket/prefix` as an [`ObjectStore`]: whole-object GET, PUT, HEAD, each retried
/// under the remote options' policy.
pub struct S3Store {
    bucket: S3Bucket,
    /// Empty, or ending in `/`.
    prefix: String,
    client: HttpClient,
}

impl S3Store {
    pub fn open(url: &str, cfg: &AwsConfig, remote: &RemoteOptions) -> io::Result<Self> {
        let (name, prefix) = parse_url(url).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "not an s3://bucket/prefix URL")
        })?;
        let prefix = prefix.trim_end_matches('/');
        if !prefix.is_empty() {
            check_key(prefix)?;
        }
        Ok(S3Store {
            bucket: S3Bucket::new(name, cfg, remote)?,
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            client: HttpClient::new(remote),
        })
    }

    fn full_key(&self, key: &str) -> io::Result<String> {
        check_key(key)?;
        Ok(format!("{}{key}", self.prefix))
    }

    /// Runs `method` on `key` under the retry policy; `done` judges a response, `None` when
    /// its status is not one it expects.
    fn call<T>(
        &self,
        method: Method,
        key: &str,
        body: Option<&[u8]>,
        mut done: impl FnMut(u16, &mut ureq::http::Response<ureq::Body>) -> Option<io::Result<T>>,
    ) -> io::Result<T> {
        let key = self.full_key(key)?;
        self.client.policy.run(|timeout| {
            let url = self.bucket.presign(method, &key);
            let mut resp = self.client.send(method, &url, &[], body, timeout)?;
            let status = resp.status().as_u16();
            match done(status, &mut resp) {
                // Reading a body that breaks off is a transport failure like any other; an
                // object over the caller's bound will be as big on the next attempt.
                Some(r) => r.map_err(|e| match e.kind() {
                    io::ErrorKind::InvalidData => Failure::permanent(e),
                    _ => Failure::transient(e),
                }),
                None => Err(status_failure(method, &url, &mut resp)),
            }
        })
    }
}

impl fmt::Display for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/{}", self.bucket.name(), self.prefix)
    }
}

impl ObjectStore for S3Store {
    fn get(&self, key: &str, max: usize) -> io::Result<Vec<u8>> {
        self.call(Method::Get, key, None, |status, resp| {
            (status == 200).then(|| {
                // A length over the bound is refused before the body is read.
                let len = super::http::header(resp.headers(), "content-length")
                    .and_then(|v| v.trim().parse::<u64>().ok());
                if len.is_some_and(|len| len > max as u64) {
                    return Err(crate::remote::too_large(key, max));
                }
                crate::remote::read_bounded(resp.body_mut().as_reader(), max, key)
            })
        })
    }

    fn put(&self, key: &str, data: &[u8]) -> io::Result<()> {
        self.call(Method::Put, key, Some(data), |status, _| {
            (status == 200).then_some(Ok(()))
        })
    }

    fn exists(&self, key: &str) -> io::Result<bool> {
        self.call(Method::Head, key, None, |status, _| match status {
            200 => Some(Ok(true)),
            404 => Some(Ok(false)),
            _ => None,
        })
    }

    fn outage(&self) -> Option<super::retry::Outage> {
        self.client.policy.outage()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::aws::{Credentials, Secret};
    use crate::remote::http::redact;

    fn cfg(endpoint: Option<&str>, creds: bool) -> AwsConfig {
        AwsConfig {
            region: "garage".into(),
            endpoint: endpoint.map(str::to_string),
            credentials: creds.then(|| Credentials {
                key_id: "GKexample".into(),
                secret: Secret::new("very-secret-key".into()),
                token: None,
                origin: "test".into(),
            }),
        }
    }

    #[test]
    fn s3_urls() {
        assert_eq!(parse_url("s3://b/k/x.raw"), Some(("b", "k/x.raw")));
        assert_eq!(parse_url("s3://b"), Some(("b", "")));
        assert_eq!(parse_url("s3:///k"), None);
        assert_eq!(parse_url("s3://B/k"), None);
        assert_eq!(parse_url("http://b/k"), None);
    }

    #[test]
    fn addressing_and_signing() {
        let remote = RemoteOptions::default();
        let b = S3Bucket::new("bkt", &cfg(Some("http://127.0.0.1:3900"), true), &remote).unwrap();
        let url = b.presign(Method::Get, "dir/img.raw");
        assert_eq!(redact(&url), "http://127.0.0.1:3900/bkt/dir/img.raw");
        assert!(url.contains("X-Amz-Signature="), "{url}");
        assert!(url.contains("GKexample"), "{url}");
        assert!(!url.contains("very-secret-key"));
        assert!(!format!("{b:?}").contains("very-secret-key"));

        let b = S3Bucket::new("bkt", &cfg(None, false), &remote).unwrap();
        let url = b.presign(Method::Head, "img.raw");
        assert_eq!(url, "https://bkt.s3.garage.amazonaws.com/img.raw");
    }

    /// An object whose Content-Length is over the caller's bound is refused before its body
    /// is read (a hostile store's huge manifest is never downloaded), at once, not retried.
    #[test]
    fn an_object_over_the_bound_is_refused_by_its_length() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = count.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).is_ok_and(|n| n == 1) {
                    head.push(byte[0]);
                }
                // 2 GB announced, a few bytes sent, then silence.
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2000000000\r\n\r\n{}");
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_secs(10));
                    drop(conn);
                });
            }
        });
        let remote = RemoteOptions {
            attempt_timeout: Duration::from_secs(2),
            retry_budget: Duration::from_secs(4),
            ..RemoteOptions::default()
        };
        let store = S3Store::open("s3://bkt/pre", &cfg(Some(&endpoint), false), &remote).unwrap();
        let t0 = std::time::Instant::now();
        let e = store.get("manifest.json", 1000).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        assert!(e.to_string().contains("larger than"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
