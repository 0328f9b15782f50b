//! Validated inputs of the auth API.

use storegate::error::FieldViolation;

pub const USERNAME_MIN: usize = 3;
pub const USERNAME_MAX: usize = 64;
pub const PASSWORD_MIN: usize = 8;
pub const PASSWORD_MAX: usize = 128;
/// How much of a password the guessability check reads.
const GUESSABILITY_MAX_CHARS: usize = 64;

/// A username in its one stored spelling: lower-cased, 3 to 64 characters of
/// `a-z 0-9 . _ -`. Two spellings that lower-case alike are one account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Username(String);

impl Username {
    pub fn parse(raw: &str) -> Result<Self, FieldViolation> {
        let invalid = |why: &str| FieldViolation::new("username", why);
        let length = || invalid(&format!("must be {USERNAME_MIN} to {USERNAME_MAX} characters"));
        // Cheap bound first, so huge inputs are not lower-cased.
        if raw.len() > USERNAME_MAX * 4 {
            return Err(length());
        }
        let normalised = raw.to_lowercase();
        let len = normalised.chars().count();
        if !(USERNAME_MIN..=USERNAME_MAX).contains(&len) {
            return Err(length());
        }
        if !normalised.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c)) {
            return Err(invalid("may contain only letters a-z, digits, '.', '_' and '-'"));
        }
        Ok(Username(normalised))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Checks a new password: 8 to 128 characters (Unicode code points), taken
/// exactly as given: no trimming, no truncation, no composition rules; and
/// not one that attackers try first. zxcvbn knows the tens of thousands of
/// most common passwords of public breaches, with their l33t and keyboard
/// variants; a score below 2 means under 10^6 guesses.
pub fn check_new_password(password: &str, username: &str) -> Result<(), FieldViolation> {
    if !password_length_ok(password) {
        return Err(FieldViolation::new(
            "password",
            format!("must be {PASSWORD_MIN} to {PASSWORD_MAX} characters"),
        ));
    }
    // zxcvbn's matching grows fast with length; a prefix this long already
    // tells a common password, and bounds the cost of crafted input.
    let scored: String = password.chars().take(GUESSABILITY_MAX_CHARS).collect();
    let guessability = zxcvbn::zxcvbn(&scored, &[username, "storegate"]);
    if guessability.score() < zxcvbn::Score::Two {
        return Err(FieldViolation::new(
            "password",
            "is too common or too easy to guess; a few unrelated words make a strong one",
        ));
    }
    Ok(())
}

/// Length bounds in code points; byte length is checked first so that an
/// oversized input costs nothing.
pub fn password_length_ok(password: &str) -> bool {
    password.len() <= PASSWORD_MAX * 4 && (PASSWORD_MIN..=PASSWORD_MAX).contains(&password.chars().count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_are_lower_cased_and_limited_to_a_safe_alphabet() {
        assert_eq!(Username::parse("Alice.Smith_1-x").unwrap().as_str(), "alice.smith_1-x");
        assert_eq!(Username::parse("BOB").unwrap(), Username::parse("bob").unwrap());
        for bad in ["ab", "", "has space", "semi;colon", "a'b", "zoë", &"a".repeat(65)] {
            assert!(Username::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Username::parse(&"a".repeat(64)).is_ok());
    }

    #[test]
    fn passwords_count_code_points_and_are_not_trimmed() {
        assert!(check_new_password("Qv7#mZ1", "u").is_err());
        assert!(check_new_password("Qv7#mZ1x", "u").is_ok());
        // 8 code points, 4 bytes each.
        assert!(check_new_password("🔑🦀🌋🎻🧭🪁🛶🧩", "u").is_ok());
        let long: String = "plum tiger orbit ".repeat(8).chars().take(128).collect();
        assert!(check_new_password(&long, "u").is_ok());
        assert!(check_new_password(&format!("{long}x"), "u").is_err());
        assert!(check_new_password(&"x".repeat(1 << 20), "u").is_err());
        // Spaces count: seven characters and a space is eight.
        assert!(check_new_password(" Qv7#mZ1", "u").is_ok());
    }

    #[test]
    fn common_and_guessable_passwords_are_refused_without_composition_rules() {
        for common in
            ["password", "12345678", "qwertyuiop", "iloveyou", "P@ssw0rd1", "sunshine1", "alicealice"]
        {
            assert!(check_new_password(common, "alice").is_err(), "{common} accepted");
        }
        // No digits, symbols or capitals needed.
        assert!(check_new_password("correct horse battery staple", "alice").is_ok());
    }
}
