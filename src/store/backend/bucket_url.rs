//! The `--backend` URL of the object storage engine
//! (`s3://BUCKET[/PREFIX][?endpoint=URL][&region=REGION]`) and its credentials.

use super::BackendError;

/// The region when the URL names none: Garage's default `s3_region`.
const DEFAULT_REGION: &str = "garage";

/// Where `--backend` points: bucket, prefix and the server's address.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct BucketUrl {
    pub bucket: String,
    /// Without leading or trailing slashes; empty for the bucket's root.
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: String,
}

/// Parses `s3://BUCKET[/PREFIX][?endpoint=URL][&region=REGION]`.
pub(super) fn parse_url(url: &str) -> Result<BucketUrl, BackendError> {
    let bad = |reason: &str| BackendError::Config {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let parsed = reqwest::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    if parsed.scheme() != "s3" {
        return Err(bad("only s3:// URLs are supported"));
    }
    let bucket = parsed
        .host_str()
        .filter(|b| !b.is_empty())
        .ok_or_else(|| bad("no bucket name (s3://BUCKET/PREFIX)"))?
        .to_string();
    let mut endpoint = None;
    let mut region = DEFAULT_REGION.to_string();
    for (key, value) in parsed.query_pairs() {
        match key.as_ref() {
            "endpoint" => endpoint = Some(value.into_owned()),
            "region" => region = value.into_owned(),
            other => return Err(bad(&format!("unknown parameter {other:?}"))),
        }
    }
    let prefix = parsed.path().trim_matches('/').to_string();
    Ok(BucketUrl {
        bucket,
        prefix,
        endpoint,
        region,
    })
}

/// The credentials from `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`. Both are
/// required: without them the S3 client would ask a cloud metadata service, which a
/// self-hosted store has no business reaching.
pub(super) fn credentials(url: &str) -> Result<(String, String), BackendError> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
        (Some(id), Some(secret)) => Ok((id, secret)),
        _ => Err(BackendError::Config {
            url: url.to_string(),
            reason: "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY".to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_bucket_prefix_endpoint_and_region() {
        let url = parse_url("s3://lazyblk/test/a?endpoint=http://127.0.0.1:3900").unwrap();
        assert_eq!(
            url,
            BucketUrl {
                bucket: "lazyblk".into(),
                prefix: "test/a".into(),
                endpoint: Some("http://127.0.0.1:3900".into()),
                region: "garage".into(),
            }
        );
        let url = parse_url("s3://b?region=eu-west-1").unwrap();
        assert_eq!(
            (url.prefix.as_str(), url.region.as_str()),
            ("", "eu-west-1")
        );
        assert!(parse_url("http://b/p").is_err());
        assert!(parse_url("s3://b/p?endpoit=x").is_err());
    }
}
