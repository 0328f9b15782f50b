//! When the database goes, calls answer UNAVAILABLE within about a second
//! (not after the pool's acquire timeout) and health turns NOT_SERVING as
//! fast; when it comes back, the same processes serve again by themselves.
//! MySQL/MariaDB behind a proxy the test cuts: refused (the server is gone)
//! and black-holed (the network drops everything).

use std::time::{Duration, Instant};

use storegate::pb::product::v1::{CreateProductRequest, GetProductRequest, Product};
use storegate_testkit::{
    Backend, TestDb, bearer, health_serving,
    proxy::{CuttableProxy, Link},
};
use storegate_topology::{Placement, Replicas, Scratch};
use tonic::Code;

fn teapot(name: &str) -> CreateProductRequest {
    CreateProductRequest {
        product: Some(Product { name: name.into(), price: "9.99".into(), stock: 5, ..Default::default() }),
        request_id: String::new(),
    }
}

async fn outage(link: Link) {
    let Some(backend) = Backend::mysql_from_env() else { return };
    let db = TestDb::new(&backend).await;
    let upstream = {
        let authority = db.url.split("://").nth(1).unwrap().split(['/', '?']).next().unwrap();
        let host_port = authority.rsplit('@').next().unwrap();
        tokio::net::lookup_host(host_port).await.unwrap().next().unwrap()
    };
    let proxy = CuttableProxy::start(upstream).await.unwrap();
    let url = proxy.url_through(&db.url);
    let scratch = Scratch::new("outage");
    let mut replicas = Replicas::spawn(&Placement::all_on(&url, 1, 1), true, &[], &scratch.path).unwrap();
    replicas.wait_serving().await.unwrap();
    let token = replicas.login(&url, "operator", true).await.access_token;
    let mut products = replicas.product_client(0).await;
    let before = products.create_product(bearer(teapot("Before"), &token)).await.unwrap().into_inner();

    proxy.set(link);
    let cut = Instant::now();
    let err = products.create_product(bearer(teapot("During"), &token)).await.unwrap_err();
    let answered_in = cut.elapsed();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(answered_in < Duration::from_millis(1500), "a write took {answered_in:?} to fail");
    for replica in &replicas.auth.iter().chain(&replicas.product).collect::<Vec<_>>() {
        while health_serving(replica.addr).await {
            assert!(cut.elapsed() < Duration::from_millis(1500), "{} still SERVING", replica.name);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Fast again while it stays down: the gate answers without waiting.
    let again = Instant::now();
    let err = products.get_product(bearer(GetProductRequest { id: before.id }, &token)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(again.elapsed() < Duration::from_millis(200), "took {:?}", again.elapsed());

    proxy.set(Link::Up);
    let restored = Instant::now();
    replicas.wait_serving().await.expect("SERVING again without a restart");
    assert!(restored.elapsed() < Duration::from_secs(5), "took {:?}", restored.elapsed());
    let after = products.create_product(bearer(teapot("After"), &token)).await.expect("writes work again");
    assert!(after.into_inner().id > before.id);
    let read = products.get_product(bearer(GetProductRequest { id: before.id }, &token)).await.unwrap();
    assert_eq!(read.into_inner().name, "Before");
    for replica in replicas.all() {
        assert!(replica.exited().is_none(), "{} exited:\n{}", replica.name, replica.log_tail(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_database_fails_calls_fast_and_comes_back() {
    outage(Link::Refused).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_black_holed_database_fails_calls_fast_and_comes_back() {
    outage(Link::BlackHole).await;
}
