//! SIGTERM on `storegate up`: health turns NOT_SERVING first, calls in
//! flight complete, then the process exits cleanly.

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use storegate::pb::auth::v1::{BeginLoginRequest, auth_service_client::AuthServiceClient};
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// One `storegate up` at a time: a port picked free for one test's metrics
/// must not be handed to the other test's servers in between.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `storegate up` as a child process on ports 0, with a database of its own.
struct Up {
    child: Option<Child>,
    dir: PathBuf,
    auth_url: String,
    product_url: String,
}

impl Up {
    fn start(name: &str, args: &[&str], envs: &[(&str, &str)]) -> Up {
        let dir = std::env::temp_dir().join(format!("storegate-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // The child's log, shown when an assertion about the process fails.
        let log = std::fs::File::create(dir.join("stderr.log")).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_storegate"))
            .args(["up", "--auth-listen-addr", "127.0.0.1:0", "--product-listen-addr", "127.0.0.1:0"])
            .args(args)
            .env("DATABASE_URL", format!("sqlite://{}/storegate.db", dir.display()))
            .env("RUST_LOG", "info")
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        // "  auth-service     http://127.0.0.1:PORT   (…)", then the same for product-service.
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut url_of = |service: &str| loop {
            let mut line = String::new();
            assert!(stdout.read_line(&mut line).unwrap() > 0, "storegate up ended early:\n{}", log_of(&dir));
            if line.contains(service)
                && let Some(url) = line.split_whitespace().find(|w| w.starts_with("http://"))
            {
                return url.to_owned();
            }
        };
        let (auth_url, product_url) = (url_of("auth-service"), url_of("product-service"));
        // The pipe closes here: the process must keep serving all the same
        // (nothing it writes later may go to stdout and fail).
        Up { child: Some(child), dir, auth_url, product_url }
    }

    fn log(&self) -> String {
        log_of(&self.dir)
    }

    fn terminate(&self) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    }

    async fn wait_for_clean_exit(&mut self) {
        let mut child = self.child.take().unwrap();
        let exit = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
        assert!(exit.success(), "{exit:?}; its log:\n{}", self.log());
    }
}

fn log_of(dir: &std::path::Path) -> String {
    std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default()
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn connect(url: &str) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(url.to_owned()).unwrap().connect().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_reports_not_serving_then_drains_calls_in_flight() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let no_metrics = ["--metrics-listen-addr", "", "--product-metrics-listen-addr", ""];
    let mut up = Up::start("shutdown", &no_metrics, &[("SHUTDOWN_GRACE_SECS", "1")]);
    let channel = connect(&up.auth_url).await;
    // A running server: its listener is bound before it serves.
    let mut health = HealthClient::new(channel.clone());
    for _ in 0..100 {
        let status =
            health.check(HealthCheckRequest { service: String::new() }).await.map(|r| r.into_inner().status);
        if status.is_ok_and(|s| s == ServingStatus::Serving as i32) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Calls that each take an argon2 verification, all in flight at once.
    let calls: Vec<_> = (0..12)
        .map(|i| {
            let mut auth = AuthServiceClient::new(channel.clone());
            tokio::spawn(async move {
                auth.begin_login(BeginLoginRequest {
                    username: format!("nobody-{i}"),
                    password: "whatever it is".into(),
                    ..Default::default()
                })
                .await
                .map(drop)
                .map_err(|e| e.code())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    up.terminate();

    // During the grace period the server still answers, and says it is going.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = match health.check(HealthCheckRequest { service: String::new() }).await {
        Ok(response) => response.into_inner().status,
        Err(e) => panic!("not answering during the grace period: {e}; its log:\n{}", up.log()),
    };
    assert_eq!(status, ServingStatus::NotServing as i32, "its log:\n{}", up.log());

    for call in calls {
        assert_eq!(
            call.await.unwrap(),
            Err(Code::Unauthenticated),
            "every call in flight got its real answer"
        );
    }
    up.wait_for_clean_exit().await;
}

/// `storegate up` with both metrics endpoints on free ports (returned).
fn up_with_metrics(name: &str) -> (Up, u16, u16) {
    let (auth_metrics, product_metrics) = (free_port(), free_port());
    let up = Up::start(
        name,
        &[
            "--metrics-listen-addr",
            &format!("127.0.0.1:{auth_metrics}"),
            "--product-metrics-listen-addr",
            &format!("127.0.0.1:{product_metrics}"),
        ],
        &[],
    );
    (up, auth_metrics, product_metrics)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn scrape(port: u16) -> String {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_count_calls_by_method_and_status_and_login_outcomes() {
    use storegate::pb::product::v1::{GetProductRequest, product_service_client::ProductServiceClient};
    let _alone = ONE_AT_A_TIME.lock().await;
    let (up, auth_metrics, product_metrics) = up_with_metrics("metrics");
    let mut auth = AuthServiceClient::new(connect(&up.auth_url).await);
    for _ in 0..2 {
        let err = auth
            .begin_login(BeginLoginRequest {
                username: "nobody".into(),
                password: "wrong password!".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    let mut products = ProductServiceClient::new(connect(&up.product_url).await);
    assert_eq!(
        products.get_product(GetProductRequest { id: 1 }).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    let auth_text = scrape(auth_metrics);
    for expected in [
        r#"storegate_grpc_calls_total{method="/storegate.auth.v1.AuthService/BeginLogin",code="Unauthenticated"} 2"#,
        r#"storegate_login_attempts_total{step="begin",outcome="rejected"} 2"#,
        r#"storegate_grpc_call_duration_seconds_count{method="/storegate.auth.v1.AuthService/BeginLogin"} 2"#,
        "storegate_db_pool_connections ",
    ] {
        assert!(auth_text.contains(expected), "missing {expected} in:\n{auth_text}");
    }
    let product_text = scrape(product_metrics);
    let expected = r#"storegate_grpc_calls_total{method="/storegate.product.v1.ProductService/GetProduct",code="Unauthenticated"} 1"#;
    assert!(product_text.contains(expected), "missing {expected} in:\n{product_text}");

    // How the process exits is the other test's subject; this one is about
    // the metrics (Drop stops the process).
}

/// Every `storegate_*` metric the Grafana dashboard and the Prometheus alert
/// rules in deploy/ query is one the services export, with the labels their
/// selectors match on (and, for `label="value"`, a series with that value),
/// so that a renamed metric or label cannot leave a panel or an alert
/// silently empty. promtool checks the expressions themselves (.ci/run).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dashboard_and_alerts_query_only_metrics_the_services_export() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let (up, auth_metrics, product_metrics) = up_with_metrics("dashboard");
    // One call, so that the per-method families have a series.
    let mut auth = AuthServiceClient::new(connect(&up.auth_url).await);
    let login = BeginLoginRequest {
        username: "nobody".into(),
        password: "wrong password!".into(),
        ..Default::default()
    };
    assert_eq!(auth.begin_login(login).await.unwrap_err().code(), Code::Unauthenticated);
    let pages = [scrape(auth_metrics), scrape(product_metrics)];
    let samples: Vec<&str> = pages.iter().flat_map(|p| p.lines()).filter(|l| !l.starts_with('#')).collect();

    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut queried = 0;
    for file in ["grafana/storegate-dashboard.json", "prometheus/storegate-alerts.yml"] {
        let text = std::fs::read_to_string(deploy.join(file)).unwrap();
        for (name, matchers) in selectors(&text) {
            queried += 1;
            let series: Vec<&str> = samples
                .iter()
                .filter(|line| {
                    line.strip_prefix(name.as_str()).is_some_and(|rest| rest.starts_with(['{', ' ']))
                })
                .copied()
                .collect();
            assert!(!series.is_empty(), "{file} queries {name}, which no service exports");
            for (label, value) in matchers {
                // Prometheus adds these at scrape time.
                if label == "job" || label == "instance" {
                    continue;
                }
                let wanted = match &value {
                    Some(value) => format!("{label}=\"{value}\""),
                    None => format!("{label}=\""),
                };
                assert!(
                    series.iter().any(|line| line.contains(&wanted)),
                    "{file} selects {name} by {wanted}, which no series has:\n{}",
                    series.join("\n")
                );
            }
        }
    }
    assert!(queried >= 10, "the files query the metrics ({queried} selectors found)");
}

/// A label matcher of a selector: the value for `label="value"`, None for
/// the other operators.
type Matcher = (String, Option<String>);

/// The `storegate_…` metrics a text's queries select, each with its label
/// matchers.
fn selectors(text: &str) -> Vec<(String, Vec<Matcher>)> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("storegate_") {
        let tail = &rest[start..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        let name = tail[..end].to_owned();
        let mut matchers = Vec::new();
        if let Some(inside) = tail[end..].strip_prefix('{').and_then(|t| t.split_once('}')).map(|(m, _)| m) {
            for matcher in inside.split(',') {
                let Some(op_at) = matcher.find(['=', '!']) else { continue };
                let label = matcher[..op_at].trim().to_owned();
                let operator_and_value = &matcher[op_at..];
                let exact = operator_and_value.starts_with("=\"") || operator_and_value.starts_with("=\\\"");
                let value = exact.then(|| {
                    operator_and_value
                        .trim_start_matches(['=', '\\', '"'])
                        .trim_end_matches(['\\', '"'])
                        .to_owned()
                });
                matchers.push((label, value));
            }
        }
        found.push((name, matchers));
        rest = &tail[end..];
    }
    found
}
