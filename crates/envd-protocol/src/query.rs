//! Minimal query-string encoding for the client (percent-encoding of values),
//! so the crate does not need a URL library.

/// Percent-encodes `value` for use in a query string. Unreserved characters
/// and `/` are kept as-is so paths stay readable in logs.
pub fn encode_component(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for &byte in value.as_bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Builds `path?k1=v1&k2=v2` from pairs, skipping `None` values.
pub fn build(path: &str, pairs: &[(&str, Option<String>)]) -> String {
    let mut out = String::from(path);
    let mut first = true;
    for (key, value) in pairs {
        let Some(value) = value else { continue };
        out.push(if first { '?' } else { '&' });
        first = false;
        out.push_str(key);
        out.push('=');
        out.push_str(&encode_component(value));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_reserved_characters() {
        assert_eq!(encode_component("/a b&c#d%"), "/a%20b%26c%23d%25");
        assert_eq!(encode_component("é"), "%C3%A9");
        assert_eq!(
            build(
                "/files",
                &[
                    ("path", Some("/x y".into())),
                    ("depth", None),
                    ("username", Some("user".into()))
                ]
            ),
            "/files?path=/x%20y&username=user"
        );
    }
}
