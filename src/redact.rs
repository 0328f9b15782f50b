//! Debug output for the messages that carry passwords, codes, tickets or
//! tokens. build.rs turns prost's derived Debug off for them; these print the
//! shape of the message with every secret replaced.

use std::fmt;

use crate::pb::auth::v1::{
    BeginLoginRequest, BeginLoginResponse, ChangePasswordRequest, ChangePasswordResponse,
    CompleteLoginRequest, CompleteLoginResponse, LogoutRequest, RefreshTokenRequest, RefreshTokenResponse,
    RegisterRequest, ResetTotpRequest, RevokeSessionsRequest, TotpEnrollment,
};

const HIDDEN: &str = "<redacted>";

impl fmt::Debug for RegisterRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegisterRequest")
            .field("username", &self.username)
            .field("password", &HIDDEN)
            .finish()
    }
}

impl fmt::Debug for BeginLoginRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BeginLoginRequest")
            .field("username", &self.username)
            .field("password", &HIDDEN)
            .field("device_token", &HIDDEN)
            .finish()
    }
}

impl fmt::Debug for BeginLoginResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BeginLoginResponse")
            .field("login_ticket", &HIDDEN)
            .field("ticket_expire_time", &self.ticket_expire_time)
            .field("enrollment", &self.enrollment)
            .finish()
    }
}

impl fmt::Debug for TotpEnrollment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TotpEnrollment")
            .field("otpauth_uri", &HIDDEN)
            .field("qr_png", &format_args!("<{} bytes>", self.qr_png.len()))
            .field("secret", &HIDDEN)
            .finish()
    }
}

impl fmt::Debug for CompleteLoginRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompleteLoginRequest").field("login_ticket", &HIDDEN).field("code", &HIDDEN).finish()
    }
}

impl fmt::Debug for CompleteLoginResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompleteLoginResponse")
            .field("access_token", &HIDDEN)
            .field("refresh_token", &HIDDEN)
            .field("token_type", &self.token_type)
            .field("expires_in", &self.expires_in)
            .field("recovery_codes", &format_args!("<{} redacted>", self.recovery_codes.len()))
            .field("device_token", &HIDDEN)
            .finish()
    }
}

impl fmt::Debug for RefreshTokenRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshTokenRequest").field("refresh_token", &HIDDEN).finish()
    }
}

impl fmt::Debug for RefreshTokenResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshTokenResponse")
            .field("access_token", &HIDDEN)
            .field("refresh_token", &HIDDEN)
            .field("token_type", &self.token_type)
            .field("expires_in", &self.expires_in)
            .finish()
    }
}

impl fmt::Debug for LogoutRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogoutRequest").field("refresh_token", &HIDDEN).finish()
    }
}

impl fmt::Debug for RevokeSessionsRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RevokeSessionsRequest")
            .field("refresh_token", &HIDDEN)
            .field("keep_current", &self.keep_current)
            .finish()
    }
}

impl fmt::Debug for ChangePasswordRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChangePasswordRequest")
            .field("login_ticket", &HIDDEN)
            .field("code", &HIDDEN)
            .field("new_password", &HIDDEN)
            .finish()
    }
}

impl fmt::Debug for ChangePasswordResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChangePasswordResponse")
            .field("access_token", &HIDDEN)
            .field("refresh_token", &HIDDEN)
            .field("token_type", &self.token_type)
            .field("expires_in", &self.expires_in)
            .field("device_token", &HIDDEN)
            .finish()
    }
}

impl fmt::Debug for ResetTotpRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResetTotpRequest")
            .field("login_ticket", &HIDDEN)
            .field("recovery_code", &HIDDEN)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_passwords_codes_and_tokens() {
        let printed = format!(
            "{:?} {:?} {:?} {:?} {:?} {:?}",
            RegisterRequest { username: "alice".into(), password: "hunter2-secret".into() },
            CompleteLoginRequest { login_ticket: "ticket-xyz".into(), code: "123456".into() },
            CompleteLoginResponse {
                access_token: "eyJ.access".into(),
                refresh_token: "refresh-abc".into(),
                token_type: "Bearer".into(),
                expires_in: 900,
                recovery_codes: vec!["ABCD-EFGH-JKLM".into()],
                device_token: "device-def".into(),
            },
            TotpEnrollment {
                otpauth_uri: "otpauth://totp/x?secret=JBSWY3DP".into(),
                qr_png: vec![1, 2, 3],
                secret: "JBSWY3DP".into(),
            },
            ChangePasswordRequest {
                login_ticket: "ticket-xyz".into(),
                code: "123456".into(),
                new_password: "new-secret-pw".into(),
            },
            ResetTotpRequest { login_ticket: "ticket-xyz".into(), recovery_code: "ABCD-EFGH-JKLM".into() },
        );
        assert!(printed.contains("alice"));
        for secret in [
            "hunter2-secret",
            "ticket-xyz",
            "123456",
            "eyJ.access",
            "refresh-abc",
            "device-def",
            "JBSWY3DP",
            "new-secret-pw",
            "ABCD-EFGH-JKLM",
        ] {
            assert!(!printed.contains(secret), "{secret} leaked into {printed}");
        }
    }
}
