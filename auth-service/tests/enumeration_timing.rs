//! Enumeration safety by timing: an unknown username and a wrong password
//! take the same time. A test binary of its own, and one backend at a time,
//! so that no other test shares the machine's cores while it measures.

use std::time::{Duration, Instant};

use storegate::pb::auth::v1::BeginLoginRequest;
use storegate_testkit::{Backend, TestStack, backend_tests};

const PASSWORD: &str = "correct horse battery";

backend_tests!(unknown_users_and_wrong_passwords_take_the_same_time);

/// The two variants must not measure at the same time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn begin(stack: &TestStack, username: &str) -> Duration {
    let mut auth = stack.auth().await;
    let started = Instant::now();
    let err = auth
        .begin_login(BeginLoginRequest {
            username: username.into(),
            password: "wrong password!".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    started.elapsed()
}

async fn unknown_users_and_wrong_passwords_take_the_same_time(backend: Backend) {
    let _alone = ONE_AT_A_TIME.lock().await;
    let stack = TestStack::start_auth(backend).await;
    const ROUNDS: usize = 31;
    // A leak (say, no hash for unknown names) shows in every trial; a burst
    // of load from elsewhere on a shared machine rarely five times. So: up
    // to five trials, and one within 20% passes. (On MariaDB, under a full
    // suite, whole trials have measured unknown names ~40% slower; not
    // explained yet, and the SQLite variant has never shown it.)
    const TRIALS: usize = 5;
    for i in 0..ROUNDS * TRIALS {
        stack.register(&format!("timing-{i}"), PASSWORD).await;
    }
    // Warm up connections and caches first.
    for i in 0..3 {
        begin(&stack, &format!("warm-up-{i}")).await;
    }
    let mut trials = Vec::new();
    for trial in 0..TRIALS {
        let (mut known, mut unknown) = (Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            let i = trial * ROUNDS + round;
            // Interleaved, in alternating order, so that load on the machine
            // and any warm-up of one call for the next hit both alike.
            if i.is_multiple_of(2) {
                known.push(begin(&stack, &format!("timing-{i}")).await);
                unknown.push(begin(&stack, &format!("nobody-{i}")).await);
            } else {
                unknown.push(begin(&stack, &format!("nobody-{i}")).await);
                known.push(begin(&stack, &format!("timing-{i}")).await);
            }
        }
        known.sort();
        unknown.sort();
        let (k, u) = (known[ROUNDS / 2].as_secs_f64(), unknown[ROUNDS / 2].as_secs_f64());
        let ratio = k.max(u) / k.min(u);
        println!(
            "trial {trial}: medians over {ROUNDS} rounds: known {k:.4}s, unknown {u:.4}s, ratio {ratio:.3}"
        );
        trials.push(format!("known {k:.4}s / unknown {u:.4}s"));
        if ratio < 1.2 {
            return;
        }
    }
    panic!("medians differ by more than 20% in every trial: {}", trials.join("; "));
}
