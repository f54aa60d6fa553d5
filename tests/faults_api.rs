//! Faults: crashes and outages.
mod common;
