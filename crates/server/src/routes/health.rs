use crate::app::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

/// Unauthenticated liveness and dependency check: 200 when the store and
/// the blob store both answer, 503 otherwise, naming what failed.
#[utoipa::path(
    get, path = "/health", tag = "service", security(()),
    responses(
        (status = 200, description = "The store and the blob store answer; `runtime` says what runs sandboxes (or why nothing does)", body = Object),
        (status = 503, description = "A dependency is down; its entry says which", body = Object),
    )
)]
pub async fn health(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let (store, blobs) = tokio::join!(state.store.ping(), state.blobs.check());
    let status_of = |ok: bool| if ok { "ok" } else { "unavailable" };
    let healthy = store.is_ok() && blobs.is_ok();
    let mut body = json!({
        "status": status_of(healthy),
        "version": env!("CARGO_PKG_VERSION"),
        "store": { "backend": state.store.backend(), "status": status_of(store.is_ok()) },
        "blobs": { "backend": state.blobs.describe(), "status": status_of(blobs.is_ok()) },
    });
    // Sandboxes are optional (volumes work without them): report, don't fail.
    body["runtime"] = match state.orchestrator.runtime_description() {
        Ok(mut description) => {
            description["status"] = json!("ok");
            description
        }
        Err(reason) => json!({ "status": "unavailable", "reason": reason }),
    };
    // How volumes reach sandboxes here, and what the layer store holds.
    let (mode, layers) = state.orchestrator.hydrate_mode();
    body["hydrate"] = json!({ "mode": mode, "strict": state.config.hydrate.strict });
    if let Some(layers) = layers {
        body["hydrate"]["layers"] = json!(layers);
    }
    if let Err(e) = &store {
        body["store"]["error"] = json!(e.to_string());
    }
    if let Err(e) = &blobs {
        body["blobs"]["error"] = json!(e.to_string());
    }
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}
