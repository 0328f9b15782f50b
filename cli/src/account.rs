//! `storegate register | login | logout | whoami | change-password | reset-totp`.

use std::io::{BufRead as _, Write as _};

use anyhow::Context as _;
use storegate::pb::auth::v1::{
    BeginLoginRequest, ChangePasswordRequest, CompleteLoginRequest, LogoutRequest, RegisterRequest,
    ResetTotpRequest, RevokeSessionsRequest,
};

use crate::{
    connect::Endpoints,
    output::Output,
    session::{Session, unix_now},
};

#[derive(clap::Args)]
pub struct RegisterArgs {
    username: String,
    /// Read the password from the first line of standard input instead of
    /// prompting (for scripts).
    #[arg(long)]
    password_stdin: bool,
}

#[derive(clap::Args)]
pub struct LoginArgs {
    username: String,
    /// Read the password, then the code, from lines of standard input
    /// instead of prompting (for scripts).
    #[arg(long)]
    password_stdin: bool,
}

#[derive(clap::Args)]
pub struct LogoutArgs {
    /// End every session of this account, on every device, this one included.
    #[arg(long, conflicts_with = "others")]
    everywhere: bool,
    /// End every other session of this account and stay signed in here.
    #[arg(long)]
    others: bool,
}

#[derive(clap::Args)]
pub struct ChangePasswordArgs {
    username: String,
    /// Read the current password, the code and the new password from lines
    /// of standard input instead of prompting (for scripts).
    #[arg(long)]
    password_stdin: bool,
}

#[derive(clap::Args)]
pub struct ResetTotpArgs {
    username: String,
    /// Read the password, then the recovery code, from lines of standard
    /// input instead of prompting (for scripts).
    #[arg(long)]
    password_stdin: bool,
}

/// One line of standard input, without its line ending (and nothing else:
/// spaces in passwords count).
fn read_line() -> anyhow::Result<String> {
    let mut line = String::new();
    let read = std::io::stdin().lock().read_line(&mut line).context("cannot read standard input")?;
    anyhow::ensure!(read > 0, "standard input ended before a line was read");
    Ok(line.strip_suffix('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)).unwrap_or(&line).to_owned())
}

fn read_password(from_stdin: bool, prompt: &str) -> anyhow::Result<String> {
    if from_stdin {
        read_line()
    } else {
        rpassword::prompt_password(prompt).context("cannot read the password")
    }
}

pub async fn register(endpoints: &Endpoints, out: &Output, args: RegisterArgs) -> anyhow::Result<()> {
    let password = if args.password_stdin {
        read_line()?
    } else {
        let password = read_password(false, "Choose a password (8 to 128 characters): ")?;
        anyhow::ensure!(read_password(false, "Repeat it: ")? == password, "the passwords differ");
        password
    };
    let user_id = endpoints
        .auth()
        .await?
        .register(RegisterRequest { username: args.username.clone(), password })
        .await?
        .into_inner()
        .user_id;
    out.print(serde_json::json!({ "user_id": user_id, "username": args.username }), || {
        format!(
            "registered {} (user id {user_id}); now run `storegate login {}`",
            args.username, args.username
        )
    });
    Ok(())
}

/// A QR code drawn with Unicode half blocks, two modules per character cell.
fn terminal_qr(text: &str) -> anyhow::Result<String> {
    use qrcode::render::unicode::Dense1x2;
    let code = qrcode::QrCode::new(text.as_bytes()).context("cannot draw the QR code")?;
    Ok(code
        .render::<Dense1x2>()
        .dark_color(Dense1x2::Light)
        .light_color(Dense1x2::Dark)
        .quiet_zone(true)
        .build())
}

pub async fn login(endpoints: &Endpoints, out: &Output, args: LoginArgs) -> anyhow::Result<()> {
    let password = read_password(args.password_stdin, "Password: ")?;
    let mut auth = endpoints.auth().await?;
    let device_token = Session::device_token(&args.username)?;
    let begun = auth
        .begin_login(BeginLoginRequest { username: args.username.clone(), password, device_token })
        .await?
        .into_inner();

    if let Some(enrollment) = &begun.enrollment {
        if out.json {
            // A script computes the code from this.
            println!(
                "{}",
                serde_json::json!({ "enrollment": { "otpauth_uri": enrollment.otpauth_uri, "secret": enrollment.secret } })
            );
        } else {
            println!(
                "Two-factor setup: scan this with an authenticator app (Google Authenticator, Aegis, 1Password, …)"
            );
            println!("{}", terminal_qr(&enrollment.otpauth_uri)?);
            println!("or enter this secret by hand: {}", enrollment.secret);
        }
    }
    let code = read_code(out, "Code from your authenticator app (or a recovery code): ")?;
    let tokens = auth
        .complete_login(CompleteLoginRequest { login_ticket: begun.login_ticket, code })
        .await?
        .into_inner();
    let session = start_session(
        &args.username,
        tokens.access_token,
        tokens.refresh_token,
        tokens.expires_in,
        tokens.device_token,
    )?;
    let roles = session.claims().map(|c| c.roles).unwrap_or_default();
    out.print(
        serde_json::json!({ "username": session.username, "roles": roles, "recovery_codes": tokens.recovery_codes }),
        || {
            let mut text = format!("signed in as {}", session.username);
            if !tokens.recovery_codes.is_empty() {
                text.push_str(
                    "\n\nRecovery codes: each replaces one code from the app, once. They are shown only now;\n\
                     keep them somewhere safe, away from this computer.\n",
                );
                for code in &tokens.recovery_codes {
                    text.push_str(&format!("\n    {code}"));
                }
            }
            text
        },
    );
    Ok(())
}

pub async fn logout(endpoints: &Endpoints, out: &Output, args: LogoutArgs) -> anyhow::Result<()> {
    let session = Session::load()?;
    if args.everywhere || args.others {
        let session = session.context("not signed in: run `storegate login <username>` first")?;
        let request =
            RevokeSessionsRequest { refresh_token: session.refresh_token, keep_current: args.others };
        let ended = endpoints.auth().await?.revoke_sessions(request).await?.into_inner().revoked_sessions;
        if args.everywhere {
            Session::remove()?;
        }
        out.print(serde_json::json!({ "revoked_sessions": ended, "signed_in": args.others }), || {
            let here = if args.others { "; still signed in here" } else { ", this one included" };
            format!("ended {ended} session(s){here}")
        });
        return Ok(());
    }
    if let Some(session) = session {
        endpoints.auth().await?.logout(LogoutRequest { refresh_token: session.refresh_token }).await?;
    }
    Session::remove()?;
    out.print(serde_json::json!({ "signed_in": false }), || "signed out".to_owned());
    Ok(())
}

/// Stores the tokens of a new session (a login, a password change), and
/// this client's new device token of the account.
fn start_session(
    username: &str,
    access_token: String,
    refresh_token: String,
    expires_in: i64,
    device_token: String,
) -> anyhow::Result<Session> {
    let session =
        Session::start(username, access_token, refresh_token, unix_now() + expires_in, device_token)?;
    session.save()?;
    Ok(session)
}

/// The code prompt of every command that asks for one.
fn read_code(out: &Output, prompt: &str) -> anyhow::Result<String> {
    if !out.json {
        print!("{prompt}");
    }
    std::io::stdout().flush()?;
    Ok(read_line()?.trim().to_owned())
}

pub async fn change_password(
    endpoints: &Endpoints,
    out: &Output,
    args: ChangePasswordArgs,
) -> anyhow::Result<()> {
    let current = read_password(args.password_stdin, "Current password: ")?;
    let mut auth = endpoints.auth().await?;
    let ticket = auth
        .begin_login(BeginLoginRequest {
            username: args.username.clone(),
            password: current,
            device_token: Session::device_token(&args.username)?,
        })
        .await?
        .into_inner()
        .login_ticket;
    let code = read_code(out, "Code from your authenticator app (or a recovery code): ")?;
    let new_password = if args.password_stdin {
        read_line()?
    } else {
        let new_password = read_password(false, "New password (8 to 128 characters): ")?;
        anyhow::ensure!(read_password(false, "Repeat it: ")? == new_password, "the passwords differ");
        new_password
    };
    let tokens = auth
        .change_password(ChangePasswordRequest { login_ticket: ticket, code, new_password })
        .await?
        .into_inner();
    let session = start_session(
        &args.username,
        tokens.access_token,
        tokens.refresh_token,
        tokens.expires_in,
        tokens.device_token,
    )?;
    out.print(serde_json::json!({ "username": session.username, "password_changed": true }), || {
        format!("password changed for {}; every other session has ended", session.username)
    });
    Ok(())
}

pub async fn reset_totp(endpoints: &Endpoints, out: &Output, args: ResetTotpArgs) -> anyhow::Result<()> {
    let password = read_password(args.password_stdin, "Password: ")?;
    let mut auth = endpoints.auth().await?;
    let ticket = auth
        .begin_login(BeginLoginRequest {
            username: args.username.clone(),
            password,
            device_token: Session::device_token(&args.username)?,
        })
        .await?
        .into_inner()
        .login_ticket;
    let recovery_code = read_code(out, "Recovery code: ")?;
    auth.reset_totp(ResetTotpRequest { login_ticket: ticket, recovery_code }).await?;
    Session::remove_with_device(&args.username)?;
    out.print(serde_json::json!({ "username": args.username.to_lowercase(), "totp_reset": true }), || {
        format!(
            "two-factor reset for {}: every session has ended; `storegate login {}` shows a new QR code",
            args.username, args.username
        )
    });
    Ok(())
}

pub async fn whoami(endpoints: &Endpoints, out: &Output) -> anyhow::Result<()> {
    let session = endpoints.session().await?;
    let claims = session.claims()?;
    out.print(
        serde_json::json!({
            "username": session.username,
            "user_id": claims.user_id(),
            "roles": claims.roles,
            "access_token_expires_at": claims.exp,
        }),
        || {
            let roles = if claims.roles.is_empty() { "no roles".to_owned() } else { claims.roles.join(", ") };
            format!("{} (user id {}; {roles})", session.username, claims.sub)
        },
    );
    Ok(())
}
