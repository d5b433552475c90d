//! Shared pieces of the decoders' property tests (the `fuzz` test module next to each decoder).
//!
//! Each decoder of bytes that arrive from elsewhere (handles, wire headers, control messages, the
//! bootstrap protocol) has a `fuzz` module checking three properties: arbitrary bytes never
//! panic and never decode to a value that re-encodes differently; valid encodings round-trip;
//! every single-byte change and every truncation of a valid encoding is rejected or decodes to
//! exactly what the changed bytes say. `cargo test` runs [`CI_CASES`] cases per property;
//! `scripts/fuzz.sh` runs them in an optimised build with `PROPTEST_CASES` cases.

use proptest::test_runner::{Config, TestCaseError};

/// Cases per property when `PROPTEST_CASES` is not set.
pub const CI_CASES: u32 = 4096;

/// The property-test configuration: [`CI_CASES`] cases, or `PROPTEST_CASES` when set.
pub fn config() -> Config {
    let mut c = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = CI_CASES;
    }
    c
}

/// Checks every single-byte change of `valid` (byte `i` XORed with `masks[i % masks.len()]`, a
/// non-zero mask) and, when `truncate` is set, every proper prefix of it. `canon` decodes bytes
/// and encodes the value again (`None`: rejected). A changed input that is accepted must encode
/// back to exactly itself, so it decoded to what its bytes say; a truncated one must be rejected.
pub fn check_mutations(
    valid: &[u8],
    masks: &[u8],
    truncate: bool,
    canon: impl Fn(&[u8]) -> Option<Vec<u8>>,
) -> Result<(), TestCaseError> {
    let back = canon(valid).ok_or_else(|| TestCaseError::fail("the valid encoding was rejected"))?;
    if back != valid {
        return Err(TestCaseError::fail("the valid encoding does not round-trip"));
    }
    let mut b = valid.to_vec();
    for i in 0..b.len() {
        let m = masks[i % masks.len()].max(1);
        b[i] ^= m;
        if let Some(again) = canon(&b) {
            if again != b {
                return Err(TestCaseError::fail(format!(
                    "byte {i} changed (xor {m:#04x}): accepted, but decodes to a value that encodes as {again:02x?}, \
                     not {b:02x?}"
                )));
            }
        }
        b[i] ^= m;
    }
    if truncate {
        for n in 0..valid.len() {
            if canon(&valid[..n]).is_some() {
                return Err(TestCaseError::fail(format!(
                    "truncated to {n} of {} bytes: accepted",
                    valid.len()
                )));
            }
        }
    }
    Ok(())
}
