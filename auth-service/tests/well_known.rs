//! OpenID discovery and the JWK Set over plain HTTP GET on auth-service's
//! own port (HTTP/1.1 and HTTP/2, beside gRPC and gRPC-Web), and a real
//! JWT library that knows storegate only by its discovery URL verifying
//! tokens of a real login, a rotated key included. Real servers, SQLite and
//! MySQL.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use storegate::pb::auth::v1::{CompleteLoginRequest, GetJwksRequest};
use storegate_testkit::{Backend, TestStack, backend_tests, http1::get, totp_code};

backend_tests!(
    discovery_and_the_key_set_are_served_over_plain_http,
    a_javascript_verifier_given_only_the_discovery_url_checks_real_tokens,
);

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

async fn discovery_and_the_key_set_are_served_over_plain_http(backend: Backend) {
    let stack = TestStack::start_auth(backend.clone()).await;
    let addr = stack.auth_addr;

    let discovery = get(addr, "/.well-known/openid-configuration", &[]).await;
    assert_eq!(discovery.status, 200);
    assert_eq!(discovery.headers["content-type"], "application/json");
    let document = json(&discovery.body);
    assert_eq!(document["issuer"], storegate::token::DEFAULT_ISSUER);
    assert_eq!(document["jwks_uri"], format!("http://{addr}/.well-known/jwks.json"));
    assert_eq!(document["id_token_signing_alg_values_supported"], serde_json::json!(["EdDSA"]));

    // The same set as GetJwks, cacheable, with an ETag.
    let jwks = get(addr, "/.well-known/jwks.json", &[]).await;
    assert_eq!(jwks.status, 200);
    assert_eq!(jwks.headers["cache-control"], "public, max-age=300");
    let over_grpc = stack.auth().await.get_jwks(GetJwksRequest {}).await.unwrap().into_inner().jwks_json;
    assert_eq!(json(&jwks.body), json(&over_grpc));
    assert_eq!(json(&jwks.body)["keys"][0]["kty"], "OKP");
    let etag = jwks.headers["etag"].clone();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");

    // A conditional GET: 304 without a body while the set is the same.
    let unchanged = get(addr, "/.well-known/jwks.json", &[("if-none-match", &etag)]).await;
    assert_eq!((unchanged.status, unchanged.body.as_str()), (304, ""));
    assert_eq!(unchanged.headers["etag"], etag);
    let other = get(addr, "/.well-known/jwks.json", &[("if-none-match", "\"something-else\"")]).await;
    assert_eq!(other.status, 200);

    // A rotation publishes the new key at once: a new set, a new ETag (once
    // the service's few seconds of cache have passed).
    let new_kid = auth_service::rotate_keys(&TestStack::auth_config(&stack.db), Duration::from_secs(600))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let rotated = loop {
        let jwks = get(addr, "/.well-known/jwks.json", &[("if-none-match", &etag)]).await;
        if jwks.status == 200 || Instant::now() > deadline {
            break jwks;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(rotated.status, 200, "the rotated set is served");
    assert_ne!(rotated.headers["etag"], etag);
    let kids: Vec<String> = json(&rotated.body)["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kids.len(), 2, "{kids:?}");
    assert!(kids.contains(&new_kid));

    assert_eq!(get(addr, "/.well-known/nothing", &[]).await.status, 404);
    stack.stop().await;

    // Behind a gateway the public URL names where clients reach the service.
    let stack = TestStack::start_auth_with(backend, |config| {
        config.public_url = Some("https://auth.example.test/".into());
    })
    .await;
    let document = json(&get(stack.auth_addr, "/.well-known/openid-configuration", &[]).await.body);
    assert_eq!(document["jwks_uri"], "https://auth.example.test/.well-known/jwks.json");
    stack.stop().await;
}

/// `web/remote-jwks.mjs` and the `jose` library it uses (web/node_modules,
/// installed by `npm ci` in web/, as .ci/run does). None outside CI when
/// they are missing: the test is then skipped; under CI it fails.
fn javascript_verifier() -> Option<PathBuf> {
    let web = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../web");
    let ready =
        web.join("node_modules/jose").exists() && Command::new("node").arg("--version").output().is_ok();
    match (ready, std::env::var_os("CI").is_some()) {
        (true, _) => Some(web.join("remote-jwks.mjs")),
        (false, true) => panic!("node and web/node_modules (npm ci in web/) are needed under CI"),
        (false, false) => {
            eprintln!("skipped: run `npm ci` in web/ (and have node) for the JavaScript verifier");
            None
        }
    }
}

/// The verifier as a child: one token a line in, one verdict a line out.
struct Verifier {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Verifier {
    fn start(script: &PathBuf, discovery_url: &str) -> Verifier {
        let mut child = Command::new("node")
            .arg(script)
            .args([discovery_url, storegate::token::DEFAULT_AUDIENCE])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("node runs");
        let (stdin, stdout) = (child.stdin.take().unwrap(), BufReader::new(child.stdout.take().unwrap()));
        Verifier { child, stdin, stdout }
    }

    fn verify(&mut self, token: &str) -> serde_json::Value {
        writeln!(self.stdin, "{token}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        json(&line)
    }
}

impl Drop for Verifier {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn a_javascript_verifier_given_only_the_discovery_url_checks_real_tokens(backend: Backend) {
    let Some(script) = javascript_verifier() else { return };
    let stack = TestStack::start_auth(backend).await;
    let (tokens, secret) = stack.register_and_login("alice", "correct horse battery").await;
    let discovery_url = format!("http://{}/.well-known/openid-configuration", stack.auth_addr);
    let mut verifier = Verifier::start(&script, &discovery_url);
    // The verifier answers on a pipe; the servers run on the other workers.
    let mut verify = |token: String| tokio::task::block_in_place(|| verifier.verify(&token));

    let verdict = verify(tokens.access_token.clone());
    assert_eq!(verdict["ok"], true, "{verdict}");
    assert_eq!(verdict["claims"]["iss"], storegate::token::DEFAULT_ISSUER);
    assert_eq!(verdict["claims"]["roles"], serde_json::json!([]));
    let first_kid = verdict["kid"].as_str().unwrap().to_owned();

    // A token whose payload was changed is refused.
    let mut parts: Vec<String> = tokens.access_token.split('.').map(str::to_owned).collect();
    parts[1] = parts[1].chars().rev().collect();
    assert_eq!(verify(parts.join("."))["ok"], false, "a tampered token");

    // A key rotated in signs the next login (the service looks for a new
    // signer every 2 s); the verifier fetches the set again for the new kid
    // and accepts its token.
    let new_kid =
        auth_service::rotate_keys(&TestStack::auth_config(&stack.db), Duration::ZERO).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let begun = stack.begin_login("alice", "correct horse battery").await;
    let token = stack
        .auth()
        .await
        .complete_login(CompleteLoginRequest {
            login_ticket: begun.login_ticket,
            code: totp_code(&secret, 1),
        })
        .await
        .unwrap()
        .into_inner()
        .access_token;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let verdict = verify(token.clone());
        if verdict["ok"] == true {
            assert_eq!(
                verdict["kid"],
                new_kid.as_str(),
                "signed by the rotated key (the first was {first_kid})"
            );
            break;
        }
        // The service serves its key set from a few seconds of cache.
        assert!(Instant::now() < deadline, "the rotated key's token did not verify within 20 s: {verdict}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stack.stop().await;
}
