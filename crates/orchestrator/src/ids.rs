use rand::distr::{Alphanumeric, SampleString};

/// `sbx-` + 8 lowercase alphanumerics (the JS SDK validates `^[A-Za-z0-9_-]+$`).
pub fn new_sandbox_id() -> String {
    let suffix = Alphanumeric
        .sample_string(&mut rand::rng(), 8)
        .to_ascii_lowercase();
    format!("sbx-{suffix}")
}

/// The per-sandbox envd access token; never leaves the control plane.
pub fn new_token() -> String {
    Alphanumeric.sample_string(&mut rand::rng(), 40)
}
