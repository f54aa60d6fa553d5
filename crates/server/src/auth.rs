//! API keys: `sm_` + 32 random base62 characters, shown once, stored only as
//! a SHA-256 hex digest. Requests present them as `Authorization: Bearer`
//! or `X-API-Key` (the Python SDK's streaming calls use the latter).

use crate::app::AppState;
use crate::error::ApiError;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use rand::distr::{Alphanumeric, SampleString};
use sandbox_store::{Owner, Store};
use sha2::{Digest, Sha256};

pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Creates a key for `owner_name` (creating the owner if needed) and
/// returns the plaintext key; only its hash is stored.
pub async fn create_key(store: &dyn Store, owner_name: &str) -> anyhow::Result<(Owner, String)> {
    let owner = store.ensure_owner(owner_name).await?;
    let key = format!("sm_{}", Alphanumeric.sample_string(&mut rand::rng(), 32));
    store
        .insert_api_key(&owner.id, &hash_key(&key), &key[..7])
        .await?;
    Ok((owner, key))
}

fn presented_key(parts: &Parts) -> Option<&str> {
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let bearer = header("authorization")
        .and_then(|value| value.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim());
    bearer.or_else(|| header("x-api-key").map(str::trim))
}

/// The authenticated caller. Every handler that touches owned data takes it.
pub struct Caller(pub Owner);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let key = presented_key(parts)
            .filter(|k| !k.is_empty())
            .ok_or(ApiError::Unauthorized)?;
        let owner = state.store.owner_by_key_hash(&hash_key(key)).await?;
        owner.map(Caller).ok_or(ApiError::Unauthorized)
    }
}
