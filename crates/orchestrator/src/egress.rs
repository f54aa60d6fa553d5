//! A create request's `network` object, parsed into the sandbox's own
//! egress policy before anything is claimed.

use sandbox_runtime::{Cidr, EgressPolicy};
use serde_json::{Map, Value};

use crate::error::OrchestratorError;

/// Entries per list: a policy is for a handful of destinations, and each
/// entry becomes a firewall element.
const MAX_ENTRIES: usize = 256;

/// `network.allow_out` / `network.deny_out`: IPs, CIDRs or domain names
/// (optionally `*.`-prefixed). Names are resolved now, once: the policy
/// holds the addresses they had at create time (`*.example.com` covers
/// `example.com`'s addresses; subdomains cannot be enumerated).
pub async fn policy(extra: &Map<String, Value>) -> Result<EgressPolicy, OrchestratorError> {
    let Some(network) = extra.get("network").filter(|n| !n.is_null()) else {
        return Ok(EgressPolicy::default());
    };
    let network = network
        .as_object()
        .ok_or_else(|| invalid("network must be an object".into()))?;
    Ok(EgressPolicy {
        allow_out: entries(network, "allow_out").await?,
        deny_out: entries(network, "deny_out").await?,
    })
}

async fn entries(network: &Map<String, Value>, key: &str) -> Result<Vec<Cidr>, OrchestratorError> {
    let Some(list) = network.get(key).filter(|v| !v.is_null()) else {
        return Ok(Vec::new());
    };
    let list = list
        .as_array()
        .ok_or_else(|| invalid(format!("network.{key} must be a list")))?;
    if list.len() > MAX_ENTRIES {
        return Err(invalid(format!(
            "network.{key} has {} entries; at most {MAX_ENTRIES} are allowed",
            list.len()
        )));
    }
    let mut cidrs = Vec::new();
    for entry in list {
        let text = entry
            .as_str()
            .ok_or_else(|| invalid(format!("network.{key} entries must be strings")))?;
        match text.parse::<Cidr>() {
            Ok(cidr) => cidrs.push(cidr),
            Err(_) if is_domain(text) => cidrs.extend(resolve(key, text).await?),
            Err(why) => return Err(invalid(format!("network.{key}: {why}"))),
        }
    }
    Ok(cidrs)
}

fn is_domain(text: &str) -> bool {
    let name = text.strip_prefix("*.").unwrap_or(text);
    !name.is_empty()
        && name.len() <= 253
        && name.contains('.')
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

async fn resolve(key: &str, text: &str) -> Result<Vec<Cidr>, OrchestratorError> {
    let name = text.strip_prefix("*.").unwrap_or(text);
    let addresses = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::net::lookup_host((name, 0)),
    )
    .await
    .map_err(|_| invalid(format!("network.{key}: resolving {name} timed out")))?
    .map_err(|e| invalid(format!("network.{key}: cannot resolve {name}: {e}")))?;
    Ok(addresses.map(|a| Cidr::host(a.ip())).collect())
}

fn invalid(message: String) -> OrchestratorError {
    OrchestratorError::InvalidRequest(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn extra(network: Value) -> Map<String, Value> {
        json!({ "network": network }).as_object().unwrap().clone()
    }

    #[tokio::test]
    async fn parses_the_sdks_shapes() {
        let none = policy(&Map::new()).await.unwrap();
        assert!(none.is_empty());
        let cut = policy(&extra(json!({ "deny_out": ["0.0.0.0/0"] })))
            .await
            .unwrap();
        assert_eq!(cut.deny_out, vec!["0.0.0.0/0".parse().unwrap()]);
        let both = policy(&extra(json!({ "allow_out": ["1.1.1.1", "localhost.localdomain"], "deny_out": ["10.0.0.0/8"], "allow_public_traffic": true })))
            .await;
        // localhost.localdomain may or may not resolve here; a bad entry must not.
        assert!(both.is_ok() || matches!(both, Err(OrchestratorError::InvalidRequest(_))));
        for bad in [
            json!({ "allow_out": "1.1.1.1" }),
            json!({ "deny_out": [1] }),
            json!({ "deny_out": ["300.1.1.1/8"] }),
            json!("x"),
        ] {
            assert!(matches!(
                policy(&extra(bad)).await,
                Err(OrchestratorError::InvalidRequest(_))
            ));
        }
        assert!(is_domain("*.example.com") && !is_domain("no_dots") && !is_domain("a..b"));
    }
}
