//! JSON request bodies, read the one way every handler shares.

use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

/// A JSON request body parsed into `T`. Malformed JSON or a wrong shape is
/// a 400 and an oversize body a 413, both with the usual
/// `{"message","code"}` answer (axum's own `Json` answers plain text and
/// 415 without a content type, which the SDKs do not always send). An
/// empty body reads as `{}`, so calls whose fields are all optional may
/// send none.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = read(request, state).await?;
        parse(&bytes).map(JsonBody)
    }
}

/// [`JsonBody`] that also keeps the bytes as sent (an idempotent create
/// compares a retry's body with the first one's).
pub struct JsonWithBytes<T> {
    pub value: T,
    pub bytes: Bytes,
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonWithBytes<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = read(request, state).await?;
        let value = parse(&bytes)?;
        Ok(JsonWithBytes { value, bytes })
    }
}

/// The body, bounded by the router's body limit.
async fn read<S: Send + Sync>(request: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(request, state)
        .await
        .map_err(|rejection| match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::PayloadTooLarge("the JSON body is larger than allowed".into())
            }
            StatusCode::REQUEST_TIMEOUT => {
                ApiError::RequestTimeout("the request body stopped arriving".into())
            }
            _ => ApiError::BadRequest(format!("reading the body: {}", rejection.body_text())),
        })
}

/// The parse behind [`JsonBody`], on its own so it can be tested without
/// a request.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Timeout {
        timeout: u64,
    }

    #[derive(Debug, Deserialize, PartialEq, Default)]
    struct AllOptional {
        #[serde(default)]
        name: Option<String>,
    }

    fn bad_request(result: Result<impl std::fmt::Debug, ApiError>) -> String {
        match result {
            Err(ApiError::BadRequest(message)) => message,
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn well_formed_bodies_parse() {
        assert_eq!(
            parse::<Timeout>(br#"{"timeout": 5}"#).unwrap(),
            Timeout { timeout: 5 }
        );
    }

    #[test]
    fn an_empty_body_is_an_empty_object() {
        assert_eq!(parse::<AllOptional>(b"").unwrap(), AllOptional::default());
        assert_eq!(
            parse::<AllOptional>(b" \n").unwrap(),
            AllOptional::default()
        );
        let missing = bad_request(parse::<Timeout>(b""));
        assert!(missing.contains("missing field `timeout`"), "{missing}");
    }

    #[test]
    fn malformed_or_misshapen_bodies_are_400s_naming_the_problem() {
        let broken = bad_request(parse::<Timeout>(b"{\"timeout\":"));
        assert!(broken.starts_with("invalid JSON body: "), "{broken}");
        let wrong_type = bad_request(parse::<Timeout>(br#"{"timeout": "soon"}"#));
        assert!(wrong_type.contains("invalid type"), "{wrong_type}");
        let not_an_object = bad_request(parse::<Timeout>(b"\"soon\""));
        assert!(not_an_object.contains("invalid type"), "{not_an_object}");
    }
}
