//! Validated inputs of the auth API.

use storegate::error::FieldViolation;

pub const USERNAME_MIN: usize = 3;
pub const USERNAME_MAX: usize = 64;
pub const PASSWORD_MIN: usize = 8;
pub const PASSWORD_MAX: usize = 128;

/// A username in its one stored spelling: lower-cased, 3 to 64 characters of
/// `a-z 0-9 . _ -`. Two spellings that lower-case alike are one account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Username(String);

impl Username {
    pub fn parse(raw: &str) -> Result<Self, FieldViolation> {
        let invalid = |why: &str| FieldViolation::new("username", why);
        // Cheap bound first, so huge inputs are not lower-cased.
        if raw.len() > USERNAME_MAX * 4 {
            return Err(invalid("must be 3 to 64 characters"));
        }
        let normalised = raw.to_lowercase();
        let len = normalised.chars().count();
        if !(USERNAME_MIN..=USERNAME_MAX).contains(&len) {
            return Err(invalid("must be 3 to 64 characters"));
        }
        if !normalised
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
        {
            return Err(invalid(
                "may contain only letters a-z, digits, '.', '_' and '-'",
            ));
        }
        Ok(Username(normalised))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Checks a new password: 8 to 128 characters (Unicode code points), taken
/// exactly as given: no trimming, no truncation, no composition rules.
pub fn check_new_password(password: &str) -> Result<(), FieldViolation> {
    if !password_length_ok(password) {
        return Err(FieldViolation::new(
            "password",
            "must be 8 to 128 characters",
        ));
    }
    Ok(())
}

/// Length bounds in code points; byte length is checked first so that an
/// oversized input costs nothing.
pub fn password_length_ok(password: &str) -> bool {
    password.len() <= PASSWORD_MAX * 4
        && (PASSWORD_MIN..=PASSWORD_MAX).contains(&password.chars().count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_are_lower_cased_and_limited_to_a_safe_alphabet() {
        assert_eq!(
            Username::parse("Alice.Smith_1-x").unwrap().as_str(),
            "alice.smith_1-x"
        );
        assert_eq!(
            Username::parse("BOB").unwrap(),
            Username::parse("bob").unwrap()
        );
        for bad in [
            "ab",
            "",
            "has space",
            "semi;colon",
            "a'b",
            "zoë",
            &"a".repeat(65),
        ] {
            assert!(Username::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Username::parse(&"a".repeat(64)).is_ok());
    }

    #[test]
    fn passwords_count_code_points_and_are_not_trimmed() {
        assert!(check_new_password("1234567").is_err());
        assert!(check_new_password("12345678").is_ok());
        // 8 code points, 4 bytes each.
        assert!(check_new_password(&"🔑".repeat(8)).is_ok());
        assert!(check_new_password(&"x".repeat(128)).is_ok());
        assert!(check_new_password(&"x".repeat(129)).is_err());
        assert!(check_new_password(&"x".repeat(1 << 20)).is_err());
        // Spaces count: seven letters and a space is eight characters.
        assert!(check_new_password(" abcdefg").is_ok());
    }
}
