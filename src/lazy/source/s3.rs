//! An S3 object as the source (`image_url: s3://bucket/key`): the HTTP source's checked Range
//! GETs ([`RangeSource`]) on URLs presigned per attempt.

use std::io;
use std::sync::Arc;

use super::http::RangeSource;
use crate::remote::aws::{self, AwsConfig};
use crate::remote::s3::{parse_url, S3Bucket, S3Object};
use crate::remote::RemoteOptions;

/// Opens `url` with the AWS settings of the process's environment and files under the
/// configuration's `s3_*` overrides.
pub fn open(url: &str, remote: &RemoteOptions) -> io::Result<RangeSource> {
    let cfg = aws::resolve(&aws::ProcessEnv, &remote.s3)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    open_with(url, &cfg, remote)
}

pub fn open_with(url: &str, cfg: &AwsConfig, remote: &RemoteOptions) -> io::Result<RangeSource> {
    let (bucket, key) = parse_url(url)
        .filter(|(_, key)| !key.is_empty() && !key.ends_with('/'))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an s3://bucket/key URL"))?;
    let object = S3Object {
        bucket: Arc::new(S3Bucket::new(bucket, cfg, remote)?),
        key: key.to_string(),
    };
    let who = match &cfg.credentials {
        Some(c) => format!("access key {} from {}", c.key_id, c.origin),
        None => "unsigned requests".to_string(),
    };
    RangeSource::open(Box::new(object), format!("s3://{bucket}/{key}"), remote).map_err(|e| {
        if e.kind() == io::ErrorKind::PermissionDenied {
            // A bare 403 (HEAD has no error body) says nothing about why.
            io::Error::new(
                e.kind(),
                format!("{e} (check the credentials, {who}, and the bucket's permissions)"),
            )
        } else {
            e
        }
    })
}
