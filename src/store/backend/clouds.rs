//! The other clouds' object stores, through `object_store`'s own builders, for the same
//! engine and keys as S3:
//!
//! - Azure Blob: `az://CONTAINER[/PREFIX]?account=NAME[&endpoint=URL]` (or `azure://`);
//!   the key and other settings from the standard variables (`AZURE_STORAGE_ACCOUNT_KEY`,
//!   `AZURE_STORAGE_SAS_KEY`, ...). `&emulator=true` talks to Azurite (its address from
//!   `AZURITE_BLOB_STORAGE_URL`, by default `http://127.0.0.1:10000`, and its well-known
//!   development account unless `account=` says otherwise).
//! - Google Cloud Storage: `gs://BUCKET[/PREFIX]`; credentials from
//!   `GOOGLE_SERVICE_ACCOUNT` / `GOOGLE_APPLICATION_CREDENTIALS` and the other standard
//!   variables.

use std::sync::Arc;

use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::ObjectStore;

use super::BackendError;

/// Where an `az://` or `gs://` URL points.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct CloudUrl {
    pub kind: Cloud,
    pub container: String,
    pub prefix: String,
    pub account: Option<String>,
    pub endpoint: Option<String>,
    pub emulator: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Cloud {
    Azure,
    Gcs,
}

/// Whether `url` names one of these clouds.
pub fn is_cloud_url(url: &str) -> bool {
    ["az://", "azure://", "gs://"]
        .iter()
        .any(|s| url.starts_with(s))
}

pub(super) fn parse(url: &str) -> Result<CloudUrl, BackendError> {
    let bad = |reason: &str| BackendError::Config {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let parsed = reqwest::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    let kind = match parsed.scheme() {
        "az" | "azure" => Cloud::Azure,
        "gs" => Cloud::Gcs,
        other => return Err(bad(&format!("{other}:// is not az://, azure:// or gs://"))),
    };
    let container = parsed
        .host_str()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| {
            bad("no container or bucket name (az://CONTAINER/PREFIX, gs://BUCKET/PREFIX)")
        })?
        .to_string();
    let (mut account, mut endpoint, mut emulator) = (None, None, false);
    for (key, value) in parsed.query_pairs() {
        match (key.as_ref(), &kind) {
            ("account", Cloud::Azure) => account = Some(value.into_owned()),
            ("endpoint", _) => endpoint = Some(value.into_owned()),
            ("emulator", Cloud::Azure) => emulator = value == "true" || value == "1",
            (other, _) => return Err(bad(&format!("unknown parameter {other:?}"))),
        }
    }
    Ok(CloudUrl {
        kind,
        container,
        prefix: parsed.path().trim_matches('/').to_string(),
        account,
        endpoint,
        emulator,
    })
}

/// The object store an `az://` or `gs://` URL names, and its key prefix. Nothing is
/// requested until the first call.
pub(super) fn open(url: &str) -> Result<(Arc<dyn ObjectStore>, String), BackendError> {
    let target = parse(url)?;
    let config = |e: object_store::Error| BackendError::Config {
        url: url.to_string(),
        reason: e.to_string(),
    };
    let store: Arc<dyn ObjectStore> = match target.kind {
        Cloud::Azure => {
            let mut b = MicrosoftAzureBuilder::from_env()
                .with_container_name(&target.container)
                .with_use_emulator(target.emulator);
            if let Some(account) = &target.account {
                b = b.with_account(account);
            }
            if let Some(endpoint) = &target.endpoint {
                b = b
                    .with_endpoint(endpoint.clone())
                    .with_allow_http(endpoint.starts_with("http://"));
            }
            Arc::new(b.build().map_err(config)?)
        }
        Cloud::Gcs => {
            let mut b = GoogleCloudStorageBuilder::from_env().with_bucket_name(&target.container);
            if let Some(endpoint) = &target.endpoint {
                b = b.with_url(endpoint);
            }
            Arc::new(b.build().map_err(config)?)
        }
    };
    Ok((store, target.prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn azure_and_gcs_urls() {
        let az = parse("az://templates/prod/a?account=acme&emulator=true").unwrap();
        assert_eq!(az.kind, Cloud::Azure);
        assert_eq!(
            (az.container.as_str(), az.prefix.as_str()),
            ("templates", "prod/a")
        );
        assert_eq!(az.account.as_deref(), Some("acme"));
        assert!(az.emulator);
        assert_eq!(parse("azure://c").unwrap().kind, Cloud::Azure);
        let gs = parse("gs://bucket/p").unwrap();
        assert_eq!(
            (gs.kind, gs.container.as_str(), gs.prefix.as_str()),
            (Cloud::Gcs, "bucket", "p")
        );
        assert!(
            parse("gs://bucket?account=x").is_err(),
            "account is Azure's"
        );
        assert!(parse("gs://").is_err());
        assert!(parse("ftp://x").is_err());
        assert!(is_cloud_url("az://c") && is_cloud_url("gs://b") && !is_cloud_url("s3://b"));
    }

    #[test]
    fn a_gcs_store_without_credentials_is_a_clear_error() {
        // A service account file that does not exist: the builder says so at start,
        // before any request.
        std::env::set_var("GOOGLE_SERVICE_ACCOUNT", "/nonexistent/lazyblk-test.json");
        let err = open("gs://bucket/prefix")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        std::env::remove_var("GOOGLE_SERVICE_ACCOUNT");
        assert!(err.contains("gs://bucket/prefix"), "{err}");
    }
}
