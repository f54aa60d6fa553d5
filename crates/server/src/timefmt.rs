use chrono::{DateTime, SecondsFormat, Utc};

/// ISO 8601 UTC with exactly six fractional digits and a `Z`, the form
/// every Declaw SDK parses (contract §6.8).
pub fn iso_utc(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}
