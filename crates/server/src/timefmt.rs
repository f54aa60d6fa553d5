use chrono::{DateTime, SecondsFormat, Utc};

/// ISO 8601 UTC with exactly six fractional digits and a `Z`, the form
/// every Declaw SDK parses (checked against the SDKs' parsers).
pub fn iso_utc(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// [`iso_utc`] with `+00:00` for the zone: where an SDK parses with plain
/// `datetime.fromisoformat`, which rejects `Z` before Python 3.11.
pub fn iso_utc_offset(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, false)
}
