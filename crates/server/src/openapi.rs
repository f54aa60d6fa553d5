//! The API's machine-readable contract, generated from the handlers'
//! annotations and the typed request and response structs, served at
//! `GET /openapi.json` (the router registers the paths, see
//! `app::api_router`). The test suites check real answers against it.

use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "sandbox-manager",
        description = "Disposable, isolated Linux sandboxes and the volumes they attach, \
            driven over HTTP. Compatible with the Declaw SDKs. Every error answers \
            `{\"message\", \"code\"}`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    components(schemas(crate::views::AttachmentView, crate::views::StartedView)),
    modifiers(&ApiKeyAuth),
    security(("bearer" = []), ("api_key" = [])),
    tags(
        (name = "volumes", description = "Upload a tar.gz once; attach it to any number of sandboxes"),
        (name = "sandboxes", description = "Create (from a warm pool), inspect, extend, kill"),
        (name = "commands", description = "Run commands through the sandbox's agent"),
        (name = "files", description = "Read and write files inside a sandbox"),
        (name = "templates", description = "Custom templates: build your own image, then create sandboxes from its alias"),
        (name = "service", description = "Health"),
    )
)]
pub struct ApiDoc;

/// Either header carries the key: `Authorization: Bearer KEY` or `X-API-Key: KEY`.
struct ApiKeyAuth;

impl Modify for ApiKeyAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))),
        );
    }
}

/// Every command and file call answers 409 while its sandbox is paused
/// (the agent is frozen), next to the 410 it answers once it is killed.
/// Applied to the finished document (the router adds the paths after the
/// `#[openapi]` modifiers have run).
pub fn document_paused_answers(openapi: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::RefOr;
    for item in openapi.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for operation in operations.into_iter().flatten() {
            let through_agent = operation
                .tags
                .iter()
                .flatten()
                .any(|tag| tag == "commands" || tag == "files");
            let responses = &mut operation.responses.responses;
            if through_agent && responses.contains_key("410") && !responses.contains_key("409") {
                let error = responses["410"].clone();
                let paused = match error {
                    RefOr::T(mut response) => {
                        response.description = "The sandbox is paused".into();
                        RefOr::T(response)
                    }
                    other => other,
                };
                responses.insert("409".into(), paused);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// The paths come from the router (`app::api_router`); the document
    /// alone has none. A minimal state is not needed: the test builds the
    /// document the same way without serving.
    fn document() -> serde_json::Value {
        serde_json::to_value(crate::app::openapi_document()).unwrap()
    }

    #[test]
    fn the_document_is_openapi_3_1_with_every_route() {
        let doc = document();
        assert_eq!(doc["openapi"], "3.1.0");
        let paths = doc["paths"].as_object().unwrap();
        for path in [
            "/volumes",
            "/volumes/{id}",
            "/sandboxes",
            "/sandboxes/{id}/commands/stream",
            "/sandboxes/{id}/files/raw",
            "/health",
        ] {
            assert!(paths.contains_key(path), "{path} missing");
        }
        assert_eq!(
            paths["/sandboxes"].as_object().unwrap().len(),
            2,
            "get and post"
        );
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for schema in [
            "SandboxView",
            "VolumeView",
            "RunResultView",
            "ErrorView",
            "CreateBody",
        ] {
            assert!(schemas.contains_key(schema), "{schema} missing");
        }
    }

    #[test]
    fn every_error_answer_is_the_error_schema() {
        let doc = document();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                for (status, response) in operation["responses"].as_object().unwrap() {
                    // /health's 503 is its own report, not an error answer.
                    let error = status.starts_with('4') || status.starts_with('5');
                    if error && path != "/health" {
                        let schema = &response["content"]["application/json"]["schema"]["$ref"];
                        assert_eq!(
                            schema, "#/components/schemas/ErrorView",
                            "{method} {path} {status}"
                        );
                    }
                }
            }
        }
    }
}
