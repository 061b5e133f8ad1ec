//! Fuzz target: see tests/invariants/mod.rs, `startup`, for what is checked.
#![no_main]

#[path = "../../tests/invariants/mod.rs"]
mod invariants;

libfuzzer_sys::fuzz_target!(|data: &[u8]| invariants::startup(data));
