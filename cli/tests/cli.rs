//! The `storegate` command driven as a user would: a real binary against
//! real servers, passwords and codes on standard input.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use storegate_testkit::{Backend, TestStack, backend_tests, totp_code};

backend_tests!(
    the_cli_registers_logs_in_and_runs_the_catalogue,
    the_first_login_draws_the_qr_code_in_the_terminal,
    the_cli_changes_the_password_ends_sessions_and_resets_two_factor,
    the_cli_acts_as_a_service_account_with_its_secret_from_the_environment_or_a_file
);

struct Cli {
    config_dir: PathBuf,
    auth_url: String,
    product_url: String,
}

struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn json(&self) -> serde_json::Value {
        assert_eq!(self.code, 0, "stderr: {} stdout: {}", self.stderr, self.stdout);
        serde_json::from_str(self.stdout.lines().last().unwrap_or_default()).expect("JSON output")
    }
}

impl Cli {
    fn new(stack: &TestStack) -> Cli {
        // Tests of this binary run at once: each needs a folder of its own.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let config_dir = std::env::temp_dir().join(format!(
            "storegate-cli-{}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        ));
        Cli {
            config_dir,
            auth_url: format!("http://{}", stack.auth_addr),
            product_url: format!("http://{}", stack.product_addr.unwrap()),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_storegate"));
        command
            .args(args)
            .env("STOREGATE_CONFIG_DIR", &self.config_dir)
            .env("AUTH_SERVICE_URL", &self.auth_url)
            .env("PRODUCT_SERVICE_URL", &self.product_url)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }

    /// Runs to completion with `input` on standard input.
    async fn run(&self, args: &[&str], input: &str) -> Ran {
        let mut command = self.command(args);
        let input = input.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut child = command.spawn().expect("spawn storegate");
            child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
            let output = child.wait_with_output().unwrap();
            Ran {
                code: output.status.code().unwrap_or(-1),
                stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            }
        })
        .await
        .unwrap()
    }

    /// `storegate login`, answering the code prompt like a person with an
    /// authenticator app: the secret is read off what the command printed.
    async fn login(&self, args: &[&str], password: &str, find_secret: fn(&str) -> Option<String>) -> Ran {
        let mut command = self.command(args);
        let password = password.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut child = command.spawn().expect("spawn storegate");
            let mut stdin = child.stdin.take().unwrap();
            writeln!(stdin, "{password}").unwrap();
            let mut stdout = BufReader::new(child.stdout.take().unwrap());
            let mut printed = String::new();
            let secret = loop {
                let mut line = String::new();
                assert!(
                    stdout.read_line(&mut line).unwrap() > 0,
                    "login ended before showing a secret: {printed}"
                );
                printed.push_str(&line);
                if let Some(secret) = find_secret(&line) {
                    break secret;
                }
            };
            writeln!(stdin, "{}", totp_code(&secret, 0)).unwrap();
            drop(stdin);
            let mut rest = String::new();
            std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
            printed.push_str(&rest);
            let output = child.wait_with_output().unwrap();
            Ran {
                code: output.status.code().unwrap_or(-1),
                stdout: printed,
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            }
        })
        .await
        .unwrap()
    }

    fn session_file(&self) -> PathBuf {
        self.config_dir.join("session.json")
    }
}

impl Drop for Cli {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.config_dir);
    }
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

async fn the_cli_registers_logs_in_and_runs_the_catalogue(backend: Backend) {
    let stack = TestStack::start(backend).await;
    let cli = Cli::new(&stack);

    let registered =
        cli.run(&["register", "Alice", "--password-stdin", "--json"], "correct horse battery\n").await;
    assert!(registered.json()["user_id"].as_i64().unwrap() > 0);
    auth_service::grant_role(&TestStack::auth_config(&stack.db), "alice", "admin").await.unwrap();

    let login = cli
        .login(&["login", "alice", "--password-stdin", "--json"], "correct horse battery", |line| {
            let value: serde_json::Value = serde_json::from_str(line).ok()?;
            Some(value["enrollment"]["secret"].as_str()?.to_owned())
        })
        .await;
    let signed_in = login.json();
    assert_eq!(signed_in["roles"], serde_json::json!(["admin"]));
    assert_eq!(signed_in["recovery_codes"].as_array().unwrap().len(), 10, "shown once, on enrollment");
    assert_eq!(mode(&cli.session_file()), 0o600);
    assert_eq!(mode(&cli.config_dir), 0o700);

    let me = cli.run(&["whoami", "--json"], "").await.json();
    assert_eq!((me["username"].as_str(), me["roles"].clone()), (Some("alice"), serde_json::json!(["admin"])));

    let created = cli
        .run(&["products", "create", "--name", "Teapot", "--price", "24.50", "--stock", "10", "--json"], "")
        .await
        .json();
    let id = created["id"].as_i64().unwrap().to_string();
    assert_eq!(created["price"], "24.50");
    let listed = cli.run(&["products", "list", "--all", "--json"], "").await.json();
    assert_eq!(listed["total_size"], 1);
    let updated = cli.run(&["products", "update", &id, "--price", "19.99", "--json"], "").await.json();
    assert_eq!((updated["price"].as_str(), updated["name"].as_str()), (Some("19.99"), Some("Teapot")));
    let adjusted = cli.run(&["products", "adjust-stock", &id, "-3", "--json"], "").await.json();
    assert_eq!(adjusted["stock"], 7);
    let text = cli.run(&["products", "get", &id], "").await;
    assert!(text.stdout.contains("Teapot") && text.stdout.contains("19.99"), "{}", text.stdout);

    // Refusals: one line on stderr, an exit code per status.
    let missing = cli.run(&["products", "get", "424242"], "").await;
    assert_eq!(missing.code, 10 + tonic::Code::NotFound as i32);
    assert_eq!(missing.stderr.lines().count(), 1);
    assert!(missing.stderr.starts_with("error: not found:"), "{}", missing.stderr);
    let too_far = cli.run(&["products", "adjust-stock", &id, "-100"], "").await;
    assert_eq!(too_far.code, 10 + tonic::Code::FailedPrecondition as i32, "{}", too_far.stderr);
    let bad = cli.run(&["products", "create", "--name", "", "--price", "1.234"], "").await;
    assert_eq!(bad.code, 10 + tonic::Code::InvalidArgument as i32);
    assert_eq!(bad.stderr.lines().count(), 1, "{}", bad.stderr);

    // An access token about to expire is refreshed (and the rotated refresh token saved).
    let mut session: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cli.session_file()).unwrap()).unwrap();
    let old_refresh = session["refresh_token"].clone();
    session["expires_at"] = 0.into();
    std::fs::write(cli.session_file(), session.to_string()).unwrap();
    cli.run(&["products", "list", "--json"], "").await.json();
    let session: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cli.session_file()).unwrap()).unwrap();
    assert_ne!(session["refresh_token"], old_refresh);
    assert_eq!(mode(&cli.session_file()), 0o600);

    assert_eq!(
        cli.run(&["products", "delete", &id, "--json"], "").await.json()["deleted"],
        id.parse::<i64>().unwrap()
    );
    // The login's device token is kept beside the session, and outlives a
    // logout: the next login of alice from here is a known device's.
    let device = session["devices"]["alice"].as_str().expect("a device token").to_owned();
    assert!(!device.is_empty());
    cli.run(&["logout", "--json"], "").await.json();
    let after = cli.run(&["whoami"], "").await;
    assert_ne!(after.code, 0);
    assert!(after.stderr.contains("not signed in"), "{}", after.stderr);
    let kept: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cli.session_file()).unwrap()).unwrap();
    assert_eq!(kept["devices"]["alice"], device.as_str());
    assert_eq!(kept["refresh_token"], "", "no session is kept");
    assert_eq!(mode(&cli.session_file()), 0o600);
    let secret = login.stdout.lines().find_map(|line| {
        let value: serde_json::Value = serde_json::from_str(line).ok()?;
        Some(value["enrollment"]["secret"].as_str()?.to_owned())
    });
    let again = cli
        .run(
            &["login", "alice", "--password-stdin", "--json"],
            &format!("correct horse battery\n{}\n", totp_code(&secret.unwrap(), 1)),
        )
        .await;
    again.json();
    let renewed: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cli.session_file()).unwrap()).unwrap();
    assert_ne!(renewed["devices"]["alice"], device.as_str(), "the known device's token was replaced");
    let db = stack.db.open().await;
    let known: i64 = storegate::on_db!(&db, pool => {
        sqlx::query_scalar("SELECT COUNT(*) FROM login_devices").fetch_one(pool).await
    })
    .unwrap();
    assert_eq!(known, 1, "replaced, not added: the CLI sent its device token");
    cli.run(&["logout", "--json"], "").await.json();

    // Servers that are down: a clear line, not a stack trace.
    let mut offline = cli.command(&["register", "bob", "--password-stdin"]);
    offline.env("AUTH_SERVICE_URL", "http://127.0.0.1:9");
    let output = tokio::task::spawn_blocking(move || {
        let mut child = offline.spawn().unwrap();
        child.stdin.take().unwrap().write_all(b"correct horse battery\n").unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(output.status.code(), Some(10 + tonic::Code::Unavailable as i32));
    assert!(String::from_utf8_lossy(&output.stderr).starts_with("error: unavailable:"));
}

async fn the_first_login_draws_the_qr_code_in_the_terminal(backend: Backend) {
    let stack = TestStack::start(backend).await;
    let cli = Cli::new(&stack);
    cli.run(&["register", "bob", "--password-stdin"], "correct horse battery\n").await;
    let login = cli
        .login(&["login", "bob", "--password-stdin"], "correct horse battery", |line| {
            line.split_once("enter this secret by hand: ").map(|(_, secret)| secret.trim().to_owned())
        })
        .await;
    assert_eq!(login.code, 0, "{}", login.stderr);
    let qr_rows =
        login.stdout.lines().filter(|l| l.contains('█') || l.contains('▀') || l.contains('▄')).count();
    assert!(qr_rows >= 15, "a QR code of Unicode blocks:\n{}", login.stdout);
    assert!(login.stdout.contains("signed in as bob"));
    assert!(login.stdout.contains("Recovery codes"));
}

async fn the_cli_changes_the_password_ends_sessions_and_resets_two_factor(backend: Backend) {
    let stack = TestStack::start(backend).await;
    let (cli, elsewhere) = (Cli::new(&stack), Cli::new(&stack));
    cli.run(&["register", "carol", "--password-stdin"], "correct horse battery\n").await;
    let first = cli
        .login(&["login", "carol", "--password-stdin", "--json"], "correct horse battery", |line| {
            let value: serde_json::Value = serde_json::from_str(line).ok()?;
            value["enrollment"]["secret"].as_str().map(str::to_owned)
        })
        .await
        .json();
    let codes: Vec<String> =
        first["recovery_codes"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_owned()).collect();
    // A second device, signed in with a recovery code.
    let input = format!("correct horse battery\n{}\n", codes[0]);
    elsewhere.run(&["login", "carol", "--password-stdin", "--json"], &input).await.json();

    // "Sign out everywhere else": the other device's session ends, this one stays.
    let ended = cli.run(&["logout", "--others", "--json"], "").await.json();
    assert_eq!(ended["revoked_sessions"], 1);
    cli.run(&["whoami", "--json"], "").await.json();
    // (Its access token lives out its 15 minutes; its refresh token is dead.)
    let stale = elsewhere.run(&["logout", "--others"], "").await;
    assert_ne!(stale.code, 0, "the other device's session ended: {}", stale.stdout);
    assert!(stale.stderr.contains("refresh token"), "{}", stale.stderr);

    // A new password, proven with the current one and a code.
    let input = format!("correct horse battery\n{}\nplum tiger orbit lantern\n", codes[1]);
    let changed = cli.run(&["change-password", "carol", "--password-stdin", "--json"], &input).await.json();
    assert_eq!(changed["password_changed"], true);
    cli.run(&["whoami", "--json"], "").await.json();
    let old = cli.run(&["login", "carol", "--password-stdin"], "correct horse battery\n000000\n").await;
    assert_ne!(old.code, 0, "the old password is gone");

    // The authenticator is lost: a recovery code resets two-factor.
    let input = format!("plum tiger orbit lantern\n{}\n", codes[2]);
    let reset = cli.run(&["reset-totp", "carol", "--password-stdin", "--json"], &input).await.json();
    assert_eq!(reset["totp_reset"], true);
    assert!(!cli.session_file().exists(), "every session ended, this one too");
    let again = cli
        .login(&["login", "carol", "--password-stdin", "--json"], "plum tiger orbit lantern", |line| {
            let value: serde_json::Value = serde_json::from_str(line).ok()?;
            value["enrollment"]["secret"].as_str().map(str::to_owned)
        })
        .await
        .json();
    assert_eq!(again["recovery_codes"].as_array().unwrap().len(), 10, "enrolled afresh");
}

/// `--client-id` with the secret from STOREGATE_CLIENT_SECRET or a file:
/// the token endpoint's token, never a stored session; the account's roles
/// hold (a stock-keeper adjusts stock, cannot create).
async fn the_cli_acts_as_a_service_account_with_its_secret_from_the_environment_or_a_file(backend: Backend) {
    use auth_service::service_accounts::{Output, commands};
    let stack = TestStack::start(backend).await;
    let config = TestStack::auth_config(&stack.db);
    let svc =
        commands::create(&config, "warehouse", &["stock-keeper".to_owned()], Output::Json).await.unwrap();
    let admin = stack.admin_token("root").await;
    let created = stack.create_product(&admin, "Crate", "3.00", 5).await;
    let cli = Cli::new(&stack);
    let id = created.id.to_string();

    let mut command =
        cli.command(&["--json", "--client-id", &svc.client_id, "products", "adjust-stock", &id, "-2"]);
    command.env("STOREGATE_CLIENT_SECRET", &svc.client_secret);
    let output = tokio::task::spawn_blocking(move || command.output().unwrap()).await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout} {}", String::from_utf8_lossy(&output.stderr));
    let adjusted: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(adjusted["stock"], 3);
    assert!(!cli.session_file().exists(), "a service account's token is never stored");

    let secret_file = cli.config_dir.with_extension("secret");
    std::fs::write(&secret_file, format!("{}\n", svc.client_secret)).unwrap();
    let file = secret_file.to_str().unwrap();
    let denied = cli
        .run(&["--client-id", &svc.client_id, "--client-secret-file", file, "products", "delete", &id], "")
        .await;
    assert_ne!(denied.code, 0);
    assert!(denied.stderr.contains("deleting a product needs the admin role"), "{}", denied.stderr);
    let wrong = cli.run(&["--client-id", &svc.client_id, "products", "get", &id], "").await;
    assert_ne!(wrong.code, 0, "no secret given");
    assert!(wrong.stderr.contains("STOREGATE_CLIENT_SECRET"), "{}", wrong.stderr);
    let _ = std::fs::remove_file(&secret_file);
}
