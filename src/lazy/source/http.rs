//! An object behind HTTP(S) Range GETs as the source (`image_url: http://...|https://...`);
//! the S3 source is the same reads on presigned URLs.
//!
//! The image must not change under a running disk: stripes fetched before and after a
//! replacement would mix two images. So the size and a validator (the ETag, else
//! Last-Modified) are taken at open, every read is conditional on it (`If-Match`, else
//! `If-Unmodified-Since`), and every response is checked (206, the Content-Range asked for,
//! the same total size, the same ETag). Any difference is [`changed`]: a permanent error, not
//! retried, so fetches fail until the backend is restarted on the new image.

use std::fmt;
use std::io::{self, Read};

use log::{info, warn};

use super::{SourceIdentity, SourceKind, StripeSource};
use crate::remote::http::{header, redact, status_failure, FixedUrl, HttpClient, Locate, Method};
use crate::remote::retry::{Failure, Outage};
use crate::remote::RemoteOptions;

/// What the reads are conditional on.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Validator {
    /// A strong ETag: `If-Match`.
    ETag(String),
    /// `If-Unmodified-Since` (no ETag, or only a weak one, which `If-Match` never matches).
    LastModified(String),
    /// Neither: only the size and Content-Range are checked (warned about at open).
    None,
}

/// The object as one response describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Meta {
    size: u64,
    etag: Option<String>,
    last_modified: Option<String>,
}

/// A remote object read with checked Range GETs.
pub struct RangeSource {
    locate: Box<dyn Locate>,
    client: HttpClient,
    /// The URL without its query (or `s3://bucket/key`): what logs and errors show.
    name: String,
    bytes: u64,
    etag: Option<String>,
    validator: Validator,
}

/// An `http://` or `https://` image.
pub fn open(url: &str, remote: &RemoteOptions) -> io::Result<RangeSource> {
    RangeSource::open(
        Box::new(FixedUrl(url.to_string())),
        redact(url).to_string(),
        remote,
    )
}

impl RangeSource {
    /// Learns the size and validator (HEAD, or a one-byte Range GET where HEAD is not
    /// allowed) and checks that the server honours Range requests.
    pub fn open(locate: Box<dyn Locate>, name: String, remote: &RemoteOptions) -> io::Result<Self> {
        let mut src = RangeSource {
            locate,
            client: HttpClient::new(remote),
            name,
            bytes: 0,
            etag: None,
            validator: Validator::None,
        };
        let head = src.head()?;
        // Always probed, an empty object too: the probe proves Range support and confirms
        // (or, where HEAD gave none, learns) the size. A HEAD saying 0 is believed only when
        // the GET agrees (a 416 with `*/0`), never on its own: a wrong 0 would make the
        // disk all zeros and autofetch "complete" without a single GET.
        let meta = src.probe(head.as_ref())?;
        src.bytes = meta.size;
        src.etag = meta.etag.clone();
        src.validator = match (&meta.etag, &meta.last_modified) {
            (Some(e), _) if !e.starts_with("W/") => Validator::ETag(e.clone()),
            (_, Some(lm)) => Validator::LastModified(lm.clone()),
            _ => {
                warn!(
                    "image {}: the server sends neither ETag nor Last-Modified: a replaced \
                     image of the same size would not be noticed",
                    src.name
                );
                Validator::None
            }
        };
        info!(
            "image {}: {} bytes, validated by {:?}; attempts of at most {:?} retried for {:?}",
            src.name,
            src.bytes,
            src.validator,
            src.client.policy.attempt_timeout,
            src.client.policy.budget
        );
        Ok(src)
    }

    /// HEAD: `None` if the server does not allow it (405, 501) or gives no size.
    fn head(&self) -> io::Result<Option<Meta>> {
        self.client.policy.run(|timeout| {
            let url = self.locate.url(Method::Head);
            let mut resp = self.client.send(Method::Head, &url, &[], None, timeout)?;
            match resp.status().as_u16() {
                200 => {
                    let h = resp.headers();
                    // Without a Content-Length the probe's Content-Range gives the size.
                    let size = header(h, "content-length").and_then(|v| v.trim().parse().ok());
                    Ok(size.map(|size| Meta {
                        size,
                        etag: header(h, "etag").map(str::to_string),
                        last_modified: header(h, "last-modified").map(str::to_string),
                    }))
                }
                405 | 501 => Ok(None),
                _ => Err(status_failure(Method::Head, &url, &mut resp)),
            }
        })
    }

    /// `Range: bytes=0-0`, checked against what HEAD said when it said something.
    fn probe(&self, head: Option<&Meta>) -> io::Result<Meta> {
        let what = format!("GET {} (first byte)", self.name);
        self.client.policy.run(|timeout| {
            let url = self.locate.url(Method::Get);
            let mut resp = self.client.send(
                Method::Get,
                &url,
                &[("range", "bytes=0-0"), IDENTITY],
                None,
                timeout,
            )?;
            let status = resp.status().as_u16();
            if status == 200 {
                return Err(Failure::permanent(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "the server does not support Range requests (it answered a Range GET \
                     with the whole object, status 200 instead of 206)",
                )));
            }
            if status == 416 && head.is_none_or(|h| h.size == 0) {
                // An empty object has no first byte.
                let total = header(resp.headers(), "content-range").and_then(unsatisfied_total);
                if total == Some(0) {
                    return Ok(Meta {
                        size: 0,
                        etag: header(resp.headers(), "etag").map(str::to_string),
                        last_modified: header(resp.headers(), "last-modified").map(str::to_string),
                    });
                }
            }
            if status != 206 {
                return Err(status_failure(Method::Get, &url, &mut resp));
            }
            let h = resp.headers();
            identity_encoding(h, &what)?;
            let range = header(h, "content-range").and_then(parse_content_range);
            let Some((0, 0, size)) = range else {
                return Err(Failure::permanent(io::Error::other(format!(
                    "the first byte came with Content-Range {:?}, not bytes 0-0/SIZE",
                    header(h, "content-range").unwrap_or("(none)")
                ))));
            };
            let meta = Meta {
                size,
                etag: header(h, "etag").map(str::to_string),
                last_modified: header(h, "last-modified").map(str::to_string),
            };
            if let Some(head) = head {
                if head.size != meta.size || (head.etag.is_some() && meta.etag != head.etag) {
                    return Err(Failure::permanent(changed(
                        &self.name,
                        "HEAD and GET disagree on its size or ETag",
                    )));
                }
            }
            let mut byte = [0u8; 1];
            resp.body_mut()
                .as_reader()
                .read_exact(&mut byte)
                .map_err(|e| {
                    Failure::transient(io::Error::new(e.kind(), format!("{what}: {e}")))
                })?;
            Ok(Meta {
                etag: meta.etag.or(head.and_then(|h| h.etag.clone())),
                last_modified: meta
                    .last_modified
                    .or(head.and_then(|h| h.last_modified.clone())),
                ..meta
            })
        })
    }

    /// One checked Range GET of `buf.len()` bytes at `offset` (inside the object).
    fn get_range(
        &self,
        offset: u64,
        buf: &mut [u8],
        timeout: std::time::Duration,
    ) -> Result<(), Failure> {
        let last = offset + buf.len() as u64 - 1;
        let range = format!("bytes={offset}-{last}");
        let mut headers = vec![("range", range.as_str()), IDENTITY];
        match &self.validator {
            Validator::ETag(e) => headers.push(("if-match", e)),
            Validator::LastModified(lm) => headers.push(("if-unmodified-since", lm)),
            Validator::None => {}
        }
        let url = self.locate.url(Method::Get);
        let mut resp = self
            .client
            .send(Method::Get, &url, &headers, None, timeout)?;
        let changed_because = |why: String| Failure::permanent(changed(&self.name, &why));
        match resp.status().as_u16() {
            206 => {}
            412 => return Err(changed_because("a conditional GET failed (412)".into())),
            416 => return Err(changed_because("it is shorter now (416)".into())),
            200 => {
                return Err(Failure::permanent(io::Error::other(format!(
                    "GET {}: the server ignored the Range header (200 instead of 206)",
                    self.name
                ))))
            }
            _ => return Err(status_failure(Method::Get, &url, &mut resp)),
        }
        let h = resp.headers();
        identity_encoding(h, &format!("GET {} bytes {offset}-{last}", self.name))?;
        let got = header(h, "content-range");
        if got.and_then(parse_content_range) != Some((offset, last, self.bytes)) {
            return Err(changed_because(format!(
                "asked for bytes {offset}-{last}/{}, got Content-Range {}",
                self.bytes,
                got.unwrap_or("(none)")
            )));
        }
        if let (Some(want), Some(got)) = (&self.etag, header(h, "etag")) {
            if want != got {
                return Err(changed_because(format!("ETag {got} instead of {want}")));
            }
        }
        let mut body = resp.body_mut().as_reader();
        body.read_exact(buf).map_err(|e| {
            Failure::transient(io::Error::new(
                e.kind(),
                format!("GET {} bytes {offset}-{last}: {e}", self.name),
            ))
        })?;
        // More than the range asked for is not the object we know.
        let mut extra = [0u8; 1];
        match body.read(&mut extra) {
            Ok(0) => Ok(()),
            Ok(_) => Err(changed_because(format!(
                "the body of bytes {offset}-{last} is longer than the range"
            ))),
            Err(e) => Err(Failure::transient(e)),
        }
    }
}

/// Asked of every Range GET: the bytes as they are, never compressed.
const IDENTITY: (&str, &str) = ("accept-encoding", "identity");

/// Refuses a response whose body is encoded (`Content-Encoding: gzip`, ...): its bytes are
/// not the image's. A failed attempt (retried like a short body), never disk data.
fn identity_encoding(h: &ureq::http::HeaderMap, what: &str) -> Result<(), Failure> {
    let encodings = h.get_all("content-encoding").iter();
    let coded = encodings
        .map(|v| v.to_str().unwrap_or("?"))
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find(|e| !e.is_empty() && !e.eq_ignore_ascii_case("identity"));
    match coded {
        None => Ok(()),
        Some(e) => Err(Failure::transient(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what}: the body came with Content-Encoding {e:?}, not the bytes as they are"),
        ))),
    }
}

/// The error of an image replaced or altered under a running backend.
fn changed(name: &str, why: &str) -> io::Error {
    io::Error::other(format!(
        "the image at {name} changed since the backend started ({why}); refusing to mix two \
         images: restart the backend on a new disk to use the new image"
    ))
}

/// `bytes START-END/TOTAL` -> (START, END, TOTAL).
fn parse_content_range(v: &str) -> Option<(u64, u64, u64)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let (start, end, total) = (
        start.trim().parse().ok()?,
        end.trim().parse().ok()?,
        total.trim().parse().ok()?,
    );
    (start <= end && end < total).then_some((start, end, total))
}

/// `bytes */TOTAL` (a 416's Content-Range) -> TOTAL.
fn unsatisfied_total(v: &str) -> Option<u64> {
    v.trim().strip_prefix("bytes */")?.trim().parse().ok()
}

impl fmt::Display for RangeSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl StripeSource for RangeSource {
    fn bytes(&self) -> u64 {
        self.bytes
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let avail = self.bytes.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (data, past_end) = buf.split_at_mut(avail);
        if !data.is_empty() {
            self.client
                .policy
                .run(|timeout| self.get_range(offset, data, timeout))?;
        }
        past_end.fill(0);
        Ok(())
    }

    fn retries(&self) -> u64 {
        self.client.policy.retries()
    }

    /// The ETag when the server sends one (weak ones included: they change with the
    /// content too), else Last-Modified, with the size; the size alone from a server that
    /// sends neither (warned about at open).
    fn identity(&self) -> SourceIdentity {
        let kind = if self.name.starts_with("s3://") {
            SourceKind::S3
        } else {
            SourceKind::Http
        };
        let id = SourceIdentity::new(kind, self.name.clone(), self.bytes);
        match (&self.etag, &self.validator) {
            (Some(etag), _) => id.with("etag", etag.clone()),
            (None, Validator::LastModified(lm)) => id.with("last_modified", lm.clone()),
            (None, _) => id,
        }
    }

    fn outage(&self) -> Option<Outage> {
        self.client.policy.outage()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range() {
        assert_eq!(parse_content_range("bytes 0-0/10"), Some((0, 0, 10)));
        assert_eq!(
            parse_content_range("bytes 65536-131071/1000000"),
            Some((65536, 131071, 1_000_000))
        );
        for bad in [
            "bytes 0-0/*",
            "bytes */10",
            "bytes 5-4/10",
            "bytes 0-10/10",
            "items 0-0/10",
            "bytes 0-0",
            "",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad}");
        }
        assert_eq!(unsatisfied_total("bytes */0"), Some(0));
        assert_eq!(unsatisfied_total("bytes 0-0/1"), None);
    }

    #[test]
    fn display_drops_the_query() {
        assert_eq!(
            redact("https://h/img.raw?X-Amz-Signature=abc"),
            "https://h/img.raw"
        );
        let e = changed("https://h/img.raw", "412");
        assert!(e.to_string().contains("changed since the backend started"));
    }

    use std::io::Write;
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::Arc;
    use std::time::Duration;

    const SIZE: usize = 1000;
    const ETAG: &str = "\"v1\"";

    fn content(range: std::ops::RangeInclusive<usize>) -> Vec<u8> {
        range.map(|i| (i % 251) as u8).collect()
    }

    /// One parsed request: method and lower-case header lines.
    struct Req {
        method: String,
        headers: String,
    }

    impl Req {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                .map(str::trim)
        }
        fn range(&self) -> Option<(usize, usize)> {
            let r = self.header("range")?.strip_prefix("bytes=")?;
            let (a, b) = r.split_once('-')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        }
    }

    fn reply(status: &str, headers: &[(&str, String)], body: &[u8]) -> Vec<u8> {
        let mut out = format!("HTTP/1.1 {status}\r\nconnection: close\r\n");
        for (k, v) in headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
        let mut out = out.into_bytes();
        out.extend_from_slice(body);
        out
    }

    /// A well-behaved 206 for `req`'s range, with `etag`.
    fn partial(req: &Req, etag: &str) -> Vec<u8> {
        let (a, b) = req.range().expect("a range");
        reply(
            "206 Partial Content",
            &[
                ("content-range", format!("bytes {a}-{b}/{SIZE}")),
                ("etag", etag.to_string()),
            ],
            &content(a..=b),
        )
    }

    /// A server answering every request (one per connection) with `respond`; the number of
    /// requests seen so far comes back with its URL.
    fn serve(
        respond: impl Fn(&Req, usize) -> Vec<u8> + Send + 'static,
    ) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!(
            "http://{}/img.raw?sig=secret",
            listener.local_addr().unwrap()
        );
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).is_ok_and(|n| n == 1) {
                    head.push(byte[0]);
                }
                let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let (line, headers) = text.split_once("\r\n").unwrap_or((&text, ""));
                let req = Req {
                    method: line.split(' ').next().unwrap_or("").to_uppercase(),
                    headers: headers.replace("\r\n", "\n"),
                };
                let n = seen.fetch_add(1, SeqCst);
                let _ = conn.write_all(&respond(&req, n));
            }
        });
        (url, count)
    }

    fn opts() -> RemoteOptions {
        RemoteOptions {
            connections: 2,
            attempt_timeout: Duration::from_secs(2),
            retry_budget: Duration::from_secs(5),
            ..RemoteOptions::default()
        }
    }

    fn head_ok() -> Vec<u8> {
        reply(
            "200 OK",
            &[("etag", ETAG.into()), ("accept-ranges", "bytes".into())],
            &[],
        )
    }

    /// A HEAD that carries a content-length but no body (ureq must not wait for one).
    fn head_reply() -> Vec<u8> {
        let mut r = String::from_utf8(head_ok()).unwrap();
        r = r.replace("content-length: 0", &format!("content-length: {SIZE}"));
        r.into_bytes()
    }

    #[test]
    fn reads_are_conditional_checked_and_zero_filled() {
        let (url, _) = serve(|req, _| match req.method.as_str() {
            "HEAD" => head_reply(),
            _ if req.header("if-match") == Some(ETAG) || req.range() == Some((0, 0)) => {
                partial(req, ETAG)
            }
            _ => reply("412 Precondition Failed", &[], b""),
        });
        let src = open(&url, &opts()).unwrap();
        assert_eq!(src.bytes(), SIZE as u64);
        assert_eq!(src.to_string(), redact(&url));
        assert!(!src.to_string().contains("secret"));
        let mut buf = vec![0xffu8; 512];
        src.read_at(900, &mut buf).unwrap();
        assert_eq!(&buf[..100], &content(900..=999)[..]);
        assert!(buf[100..].iter().all(|b| *b == 0));
    }

    #[test]
    fn head_refused_falls_back_to_a_range_get() {
        let (url, _) = serve(|req, _| match req.method.as_str() {
            "HEAD" => reply("405 Method Not Allowed", &[], b""),
            _ => partial(req, ETAG),
        });
        let src = open(&url, &opts()).unwrap();
        assert_eq!(src.bytes(), SIZE as u64);
        assert_eq!(src.validator, Validator::ETag(ETAG.into()));
    }

    #[test]
    fn a_server_without_range_support_is_refused() {
        let (url, _) = serve(|req, _| match req.method.as_str() {
            "HEAD" => head_reply(),
            _ => reply("200 OK", &[("etag", ETAG.into())], &content(0..=SIZE - 1)),
        });
        let e = open(&url, &opts()).err().unwrap().to_string();
        assert!(e.contains("does not support Range"), "{e}");
    }

    /// Another ETag, a 412, a wrong Content-Range: "changed", at once, never retried.
    #[test]
    fn a_changed_image_is_a_permanent_error() {
        type Bad = fn(&Req) -> Vec<u8>;
        let cases: [Bad; 4] = [
            |req| partial(req, "\"v2\""),
            |_| reply("412 Precondition Failed", &[], b""),
            |req| {
                let (a, b) = req.range().unwrap();
                reply(
                    "206 Partial Content",
                    &[("content-range", format!("bytes {a}-{b}/{}", SIZE + 1))],
                    &content(a..=b),
                )
            },
            |_| reply("416 Range Not Satisfiable", &[], b""),
        ];
        for bad in cases {
            let (url, count) = serve(move |req, _| match req.method.as_str() {
                "HEAD" => head_reply(),
                _ if req.range() == Some((0, 0)) => partial(req, ETAG),
                _ => bad(req),
            });
            let src = open(&url, &opts()).unwrap();
            let before = count.load(SeqCst);
            let e = src.read_at(0, &mut [0u8; 100]).unwrap_err().to_string();
            assert!(e.contains("changed since the backend started"), "{e}");
            assert_eq!(count.load(SeqCst), before + 1, "retried: {e}");
            assert_eq!(src.retries(), 0);
        }
    }

    #[test]
    fn overload_is_retried_and_counted() {
        let (url, _) = serve(|req, n| match req.method.as_str() {
            "HEAD" => head_reply(),
            _ if req.range() == Some((0, 0)) => partial(req, ETAG),
            // The first read attempts: S3's SlowDown, then a 429 with Retry-After.
            _ if n == 2 => reply(
                "503 Service Unavailable",
                &[],
                b"<Error><Code>SlowDown</Code><Message>Reduce your rate.</Message></Error>",
            ),
            _ if n == 3 => reply("429 Too Many Requests", &[("retry-after", "0".into())], b""),
            _ => partial(req, ETAG),
        });
        let src = open(&url, &opts()).unwrap();
        let mut buf = [0u8; 10];
        src.read_at(10, &mut buf).unwrap();
        assert_eq!(&buf[..], &content(10..=19)[..]);
        assert_eq!(src.retries(), 2);
    }

    /// A server that stops answering: each attempt times out, and the read fails after
    /// about the retry budget (not never, not at the first timeout).
    #[test]
    fn a_silent_server_fails_reads_after_the_budget() {
        let (url, _) = serve(|req, n| match req.method.as_str() {
            "HEAD" => head_reply(),
            _ if n < 2 => partial(req, ETAG),
            _ => {
                std::thread::sleep(Duration::from_millis(1500));
                partial(req, ETAG)
            }
        });
        let opts = RemoteOptions {
            attempt_timeout: Duration::from_secs(1),
            retry_budget: Duration::from_secs(2),
            ..opts()
        };
        let src = open(&url, &opts).unwrap();
        let t0 = std::time::Instant::now();
        let e = src.read_at(0, &mut [0u8; 10]).unwrap_err();
        let took = t0.elapsed();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(
            took >= Duration::from_millis(1900) && took < Duration::from_millis(3000),
            "{took:?}"
        );
        assert!(src.retries() >= 1);
    }

    /// A HEAD saying `Content-Length: 0` is not believed on its own: the probe must agree
    /// (a 416 with `*/0`), or opening fails (it used to make the disk all zeros).
    #[test]
    fn a_head_saying_empty_is_confirmed_by_the_probe() {
        // The object is really 1000 bytes.
        let (url, count) = serve(|req, _| match req.method.as_str() {
            "HEAD" => head_ok(),
            _ => partial(req, ETAG),
        });
        let e = open(&url, &opts())
            .err()
            .expect("opened as empty")
            .to_string();
        assert!(e.contains("HEAD and GET disagree on its size"), "{e}");
        assert_eq!(count.load(SeqCst), 2, "HEAD and the probe");
        // A 416 without the total proves nothing.
        let (url, _) = serve(|req, _| match req.method.as_str() {
            "HEAD" => head_ok(),
            _ => reply("416 Range Not Satisfiable", &[], b""),
        });
        let e = open(&url, &opts())
            .err()
            .expect("opened as empty")
            .to_string();
        assert!(e.contains("416"), "{e}");
        // A truly empty object: HEAD and the probe's `*/0` agree.
        let (url, _) = serve(|req, _| match req.method.as_str() {
            "HEAD" => head_ok(),
            _ => reply(
                "416 Range Not Satisfiable",
                &[("content-range", "bytes */0".into())],
                b"",
            ),
        });
        assert_eq!(open(&url, &opts()).unwrap().bytes(), 0);
    }

    /// No redirect is followed, to another host or not: a 3xx fails at once (an https://
    /// image must never be read from a plain http:// one it redirects to).
    #[test]
    fn redirects_are_not_followed() {
        let (target, target_count) = serve(|req, _| match req.method.as_str() {
            "HEAD" => head_reply(),
            _ => partial(req, ETAG),
        });
        for status in [
            "301 Moved Permanently",
            "302 Found",
            "307 Temporary Redirect",
        ] {
            let location = target.clone();
            let (url, count) =
                serve(move |_, _| reply(status, &[("location", location.clone())], b""));
            let e = open(&url, &opts())
                .err()
                .expect("redirect followed")
                .to_string();
            assert!(e.contains("redirects are not followed"), "{e}");
            assert!(!e.contains("secret"), "{e}");
            assert_eq!(count.load(SeqCst), 1, "retried: {e}");
        }
        assert_eq!(target_count.load(SeqCst), 0);
    }

    /// A range whose body is compressed is not disk data: the attempt fails (and is retried),
    /// and every GET asks for the bytes as they are.
    #[test]
    fn an_encoded_body_is_refused() {
        let gzip = |req: &Req| {
            let mut r = String::from_utf8(partial(req, ETAG)).unwrap();
            r = r.replacen("\r\n", "\r\ncontent-encoding: gzip\r\n", 1);
            r.into_bytes()
        };
        let (url, _) = serve(move |req, n| match req.method.as_str() {
            "HEAD" => head_reply(),
            _ if req.header("accept-encoding") != Some("identity") => {
                reply("400 Bad Request", &[], b"")
            }
            _ if n < 2 => partial(req, ETAG),
            _ => gzip(req),
        });
        let opts = RemoteOptions {
            retry_budget: Duration::from_millis(300),
            ..opts()
        };
        let src = open(&url, &opts).unwrap();
        let e = src.read_at(0, &mut [0u8; 100]).unwrap_err().to_string();
        assert!(e.contains("Content-Encoding \"gzip\""), "{e}");
        assert!(src.retries() >= 1, "not retried: {e}");
        // The probe at start-up is checked the same way.
        let (url, _) = serve(move |req, _| match req.method.as_str() {
            "HEAD" => head_reply(),
            _ => gzip(req),
        });
        let e = open(&url, &opts).err().expect("opened").to_string();
        assert!(e.contains("Content-Encoding"), "{e}");
    }

    #[test]
    fn client_errors_are_permanent_and_name_the_status() {
        let (url, count) = serve(|_, _| reply("404 Not Found", &[], b""));
        let e = open(&url, &opts()).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("404"), "{e}");
        assert!(!e.to_string().contains("secret"), "{e}");
        assert_eq!(count.load(SeqCst), 1);
    }
}
