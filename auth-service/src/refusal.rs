//! Why a login step was refused, as the service decides it. A refusal is
//! counted in metrics, settles the throttle's attempt and is audited by its
//! kind; only at the edge is it said to the caller, as an [`ApiError`] with
//! a message that tells nothing more than it should (a wrong password and
//! an unknown name read the same).

use std::time::Duration;

use storegate::ApiError;

const BAD_CREDENTIALS: &str = "invalid username or password";
const BAD_TICKET: &str = "login ticket is invalid or expired; start the login again";
const BAD_CODE: &str = "invalid code";
const ENROLLMENT_TAKEN: &str = "another login confirmed a second factor first; start the login again";
const ACCOUNT_DISABLED: &str = "this account is disabled; an administrator can enable it";
const THROTTLED: &str = "too many failed attempts; try again later";

/// A login step refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A wrong password, or a name that is not an account's.
    BadCredentials,
    /// The ticket is unknown, used, expired or out of attempts.
    BadTicket,
    /// A wrong code, a TOTP step already used, or a spent recovery code.
    BadCode,
    /// Another login confirmed an enrollment first: this ticket's secret is
    /// not the account's.
    EnrollmentTaken,
    Disabled,
    /// Too many failed attempts (of this name from this client, of this
    /// account from unrecognised clients, or from this address): try again
    /// after this long. One answer for all, whatever the password.
    Throttled {
        retry_after: Duration,
    },
}

impl Refusal {
    /// Whether a credential (a password or a code) was judged wrong: such
    /// an attempt stays counted against the name.
    pub fn is_wrong_credential(self) -> bool {
        matches!(self, Refusal::BadCredentials | Refusal::BadCode)
    }

    /// Its `outcome` label on `storegate_login_attempts_total`: a
    /// refusal of what the caller sent is "rejected", whatever it was.
    pub fn outcome_label(self) -> &'static str {
        match self {
            Refusal::BadCredentials | Refusal::BadTicket | Refusal::BadCode | Refusal::EnrollmentTaken => {
                "rejected"
            }
            Refusal::Disabled => "disabled",
            Refusal::Throttled { .. } => "throttled",
        }
    }
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> ApiError {
        match refusal {
            Refusal::BadCredentials => ApiError::Unauthenticated(BAD_CREDENTIALS),
            Refusal::BadTicket => ApiError::Unauthenticated(BAD_TICKET),
            Refusal::BadCode => ApiError::Unauthenticated(BAD_CODE),
            Refusal::EnrollmentTaken => ApiError::Unauthenticated(ENROLLMENT_TAKEN),
            Refusal::Disabled => ApiError::PermissionDenied(ACCOUNT_DISABLED),
            Refusal::Throttled { retry_after } => {
                ApiError::ResourceExhausted { message: THROTTLED, retry_after: Some(retry_after) }
            }
        }
    }
}

/// How a login step failed: refused, or it could not be done (the
/// database, a busy hasher, bad input).
#[derive(Debug)]
pub enum LoginError {
    Refused(Refusal),
    Failed(ApiError),
}

impl LoginError {
    /// Its `outcome` label on `storegate_login_attempts_total`.
    pub fn outcome_label(&self) -> &'static str {
        match self {
            LoginError::Refused(refusal) => refusal.outcome_label(),
            LoginError::Failed(ApiError::ResourceExhausted { .. }) => "busy",
            LoginError::Failed(_) => "error",
        }
    }
}

impl From<Refusal> for LoginError {
    fn from(refusal: Refusal) -> LoginError {
        LoginError::Refused(refusal)
    }
}

impl From<ApiError> for LoginError {
    fn from(error: ApiError) -> LoginError {
        LoginError::Failed(error)
    }
}

impl From<anyhow::Error> for LoginError {
    fn from(error: anyhow::Error) -> LoginError {
        LoginError::Failed(error.into())
    }
}

impl From<LoginError> for ApiError {
    fn from(error: LoginError) -> ApiError {
        match error {
            LoginError::Refused(refusal) => refusal.into(),
            LoginError::Failed(error) => error,
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn refusals_are_said_with_their_codes() {
        let status = |refusal: Refusal| tonic::Status::from(ApiError::from(refusal));
        for refusal in
            [Refusal::BadCredentials, Refusal::BadTicket, Refusal::BadCode, Refusal::EnrollmentTaken]
        {
            assert_eq!(status(refusal).code(), Code::Unauthenticated, "{refusal:?}");
        }
        assert_eq!(status(Refusal::Disabled).code(), Code::PermissionDenied);
        let throttled = status(Refusal::Throttled { retry_after: Duration::from_secs(30) });
        assert_eq!(throttled.code(), Code::ResourceExhausted);
        assert_eq!(status(Refusal::BadCredentials).message(), BAD_CREDENTIALS);
    }

    #[test]
    fn only_a_wrong_password_or_code_stays_counted() {
        let counted: Vec<Refusal> = [
            Refusal::BadCredentials,
            Refusal::BadTicket,
            Refusal::BadCode,
            Refusal::EnrollmentTaken,
            Refusal::Disabled,
            Refusal::Throttled { retry_after: Duration::from_secs(1) },
        ]
        .into_iter()
        .filter(|refusal| refusal.is_wrong_credential())
        .collect();
        assert_eq!(counted, [Refusal::BadCredentials, Refusal::BadCode]);
    }
}
