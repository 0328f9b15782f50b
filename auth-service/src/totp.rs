//! TOTP (RFC 6238: HMAC-SHA-1, 6 digits, 30-second steps) and its enrollment
//! by QR code, compatible with Google Authenticator and its peers.

use std::io::Cursor;

use anyhow::Context as _;
use subtle::ConstantTimeEq as _;
use totp_rs::{Algorithm, TOTP};

pub const SECRET_LEN: usize = 20; // 160 bits, as RFC 4226 recommends
pub const STEP_SECS: u64 = 30;
pub const DIGITS: usize = 6;
/// Codes of the previous and next step are accepted too, for clock drift.
pub const ALLOWED_DRIFT_STEPS: i64 = 1;

pub fn new_secret() -> [u8; SECRET_LEN] {
    crate::crypto::random_bytes()
}

fn totp(secret: &[u8], issuer: &str, account: &str) -> anyhow::Result<TOTP> {
    TOTP::new(
        Algorithm::SHA1,
        DIGITS,
        0,
        STEP_SECS,
        secret.to_vec(),
        Some(issuer.to_owned()),
        account.to_owned(),
    )
    .map_err(|e| anyhow::anyhow!("cannot build TOTP: {e}"))
}

/// The time step that `unix_seconds` falls in.
pub fn step_at(unix_seconds: u64) -> i64 {
    (unix_seconds / STEP_SECS) as i64
}

/// The code for one time step.
pub fn code_at_step(secret: &[u8], step: i64) -> anyhow::Result<String> {
    let t = totp(secret, "storegate", "user")?;
    Ok(t.generate(u64::try_from(step).context("negative TOTP step")? * STEP_SECS))
}

/// The step whose code `code` is, among the steps around `now_step` that are
/// later than `last_used_step`; None if it matches none of them. Malformed
/// codes simply match nothing.
pub fn matching_step(secret: &[u8], code: &str, now_step: i64, last_used_step: Option<i64>) -> Option<i64> {
    if code.len() != DIGITS || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    (now_step - ALLOWED_DRIFT_STEPS..=now_step + ALLOWED_DRIFT_STEPS)
        .filter(|step| last_used_step.is_none_or(|last| *step > last))
        .find(|step| {
            code_at_step(secret, *step)
                .is_ok_and(|expected| bool::from(expected.as_bytes().ct_eq(code.as_bytes())))
        })
}

/// What an authenticator app needs: the otpauth URI, the same URI as a PNG
/// QR code, and the base32 secret for typing in by hand.
pub struct Enrollment {
    pub otpauth_uri: String,
    pub qr_png: Vec<u8>,
    pub secret_base32: String,
}

pub fn enrollment(secret: &[u8], issuer: &str, account: &str) -> anyhow::Result<Enrollment> {
    let t = totp(secret, issuer, account)?;
    let otpauth_uri = t.get_url();
    Ok(Enrollment { qr_png: qr_png(&otpauth_uri)?, otpauth_uri, secret_base32: t.get_secret_base32() })
}

/// A PNG QR code of `text`, large enough for a phone camera to read off a
/// screen.
pub fn qr_png(text: &str) -> anyhow::Result<Vec<u8>> {
    let code = qrcode::QrCode::new(text.as_bytes()).context("text does not fit a QR code")?;
    let image = code.render::<image::Luma<u8>>().min_dimensions(256, 256).build();
    let mut png = Vec::new();
    image::DynamicImage::ImageLuma8(image)
        .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
        .context("cannot encode the QR code as PNG")?;
    Ok(png)
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 6238 Appendix B, SHA-1 seed "12345678901234567890"; 6-digit codes
    // are the last six digits of the 8-digit ones listed there.
    const RFC_SECRET: &[u8] = b"12345678901234567890";

    #[test]
    fn codes_match_the_rfc_6238_test_vectors() {
        for (time, code) in [
            (59u64, "287082"),
            (1_111_111_109, "081804"),
            (1_234_567_890, "005924"),
            (2_000_000_000, "279037"),
        ] {
            assert_eq!(code_at_step(RFC_SECRET, step_at(time)).unwrap(), code, "t={time}");
        }
    }

    #[test]
    fn a_code_matches_its_step_and_one_step_either_side_but_not_two() {
        let now = step_at(1_111_111_109);
        let code = code_at_step(RFC_SECRET, now).unwrap();
        assert_eq!(matching_step(RFC_SECRET, &code, now, None), Some(now));
        assert_eq!(matching_step(RFC_SECRET, &code, now + 1, None), Some(now));
        assert_eq!(matching_step(RFC_SECRET, &code, now - 1, None), Some(now));
        assert_eq!(matching_step(RFC_SECRET, &code, now + 2, None), None);
    }

    #[test]
    fn a_used_step_and_earlier_ones_never_match_again() {
        let now = step_at(1_234_567_890);
        let code = code_at_step(RFC_SECRET, now).unwrap();
        assert_eq!(matching_step(RFC_SECRET, &code, now, Some(now)), None);
        let previous = code_at_step(RFC_SECRET, now - 1).unwrap();
        assert_eq!(matching_step(RFC_SECRET, &previous, now, Some(now)), None);
    }

    #[test]
    fn malformed_codes_match_nothing() {
        let now = step_at(59);
        for code in ["", "28708", "2870822", "abcdef", "28708a", " 287082"] {
            assert_eq!(matching_step(RFC_SECRET, code, now, None), None, "{code:?}");
        }
    }

    #[test]
    fn the_qr_code_decodes_back_to_the_otpauth_uri() {
        let secret = new_secret();
        let e = enrollment(&secret, "storegate", "alice").unwrap();
        assert!(e.otpauth_uri.starts_with("otpauth://totp/storegate:alice?secret="), "{}", e.otpauth_uri);
        assert!(e.otpauth_uri.contains("issuer=storegate"));
        let image = image::load_from_memory(&e.qr_png).unwrap().to_luma8();
        let mut prepared = rqrr::PreparedImage::prepare(image);
        let grids = prepared.detect_grids();
        assert_eq!(grids.len(), 1);
        let (_, content) = grids[0].decode().unwrap();
        assert_eq!(content, e.otpauth_uri);
    }
}
