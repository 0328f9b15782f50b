//! Migrations run by many processes at once, cut short, or waited for: on
//! SQLite and on MySQL/MariaDB (a fresh database per test).

use std::time::Duration;

use storegate::{
    Db,
    migrate::{self, SchemaState},
    on_db,
};
use storegate_testkit::{Backend, TestDb, backend_tests};
use storegate_topology::{all_applied, migration_versions};

backend_tests!(
    many_migrations_at_once_apply_each_version_once,
    waiting_for_the_schema_ends_when_another_migrates,
    a_changed_migration_is_refused,
);

/// Versions in `_sqlx_migrations`, with their success flag.
async fn recorded(db: &Db) -> Vec<(i64, bool)> {
    on_db!(db, pool => {
        sqlx::query_as("SELECT version, success FROM _sqlx_migrations ORDER BY version").fetch_all(pool).await
    })
    .unwrap()
}

async fn product_count_rows(db: &Db) -> i64 {
    on_db!(db, pool => sqlx::query_scalar("SELECT COUNT(*) FROM product_counts").fetch_one(pool).await)
        .unwrap()
}

async fn many_migrations_at_once_apply_each_version_once(backend: Backend) {
    let test_db = TestDb::new(&backend).await;
    // Separate pools, as separate processes would have.
    let mut dbs = Vec::new();
    for _ in 0..8 {
        dbs.push(Db::connect(&test_db.url).await.unwrap());
    }
    let runs: Vec<_> = dbs
        .iter()
        .cloned()
        .map(|db| tokio::spawn(async move { migrate::run(&db, Duration::from_secs(60)).await }))
        .collect();
    for run in runs {
        run.await.unwrap().expect("every concurrent migration succeeds");
    }
    let db = &dbs[0];
    assert_eq!(migrate::schema_state(db).await.unwrap(), SchemaState::Current);
    let versions = recorded(db).await;
    assert_eq!(versions, all_applied(&backend), "each version recorded once, applied");
    // The seeding statements of 0003 ran exactly once.
    assert_eq!(product_count_rows(db).await, 16);
    for db in dbs {
        db.close().await;
    }
}

async fn waiting_for_the_schema_ends_when_another_migrates(backend: Backend) {
    let test_db = TestDb::new(&backend).await;
    let waiter_db = Db::connect(&test_db.url).await.unwrap();
    assert!(
        matches!(migrate::schema_state(&waiter_db).await.unwrap(), SchemaState::Behind(v) if v == migration_versions(&backend))
    );
    let waiter = tokio::spawn({
        let db = waiter_db.clone();
        async move { migrate::wait_for_schema(&db, Duration::from_millis(50)).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "nothing migrated yet, so the waiter still waits");
    let migrator = Db::connect(&test_db.url).await.unwrap();
    migrate::run(&migrator, Duration::from_secs(10)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), waiter).await.expect("the waiter ends").unwrap().unwrap();
    migrator.close().await;
    waiter_db.close().await;
}

async fn a_changed_migration_is_refused(backend: Backend) {
    let test_db = TestDb::new(&backend).await;
    let db = Db::connect(&test_db.url).await.unwrap();
    migrate::run(&db, Duration::from_secs(10)).await.unwrap();
    on_db!(&db, pool => {
        sqlx::query("UPDATE _sqlx_migrations SET checksum = ? WHERE version = 2")
            .bind(vec![0u8; 48])
            .execute(pool)
            .await
            .map(drop)
    })
    .unwrap();
    let err = migrate::run(&db, Duration::from_secs(10)).await.unwrap_err();
    assert!(format!("{err:#}").contains("migration 2 in the database differs"), "{err:#}");
    assert!(migrate::schema_state(&db).await.is_err());
    db.close().await;
}

mod mysql_only {
    //! The lease and the repair of half-applied migrations exist on MySQL
    //! only (SQLite migrations are transactions under a file lock).
    use super::*;

    async fn fresh() -> Option<(TestDb, Db)> {
        let backend = Backend::mysql_from_env()?;
        let test_db = TestDb::new(&backend).await;
        let db = Db::connect(&test_db.url).await.unwrap();
        Some((test_db, db))
    }

    async fn exec(db: &Db, sql: &str) {
        on_db!(db, pool => sqlx::query(sql).execute(pool).await.map(drop)).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_half_applied_migration_is_finished_by_the_next_run() {
        let Some((_test_db, db)) = fresh().await else { return };
        migrate::run(&db, Duration::from_secs(10)).await.unwrap();
        // As a process killed in the middle of 0003 leaves it: the row says
        // not done, the table exists, half of its seed rows are there.
        exec(&db, "UPDATE _sqlx_migrations SET success = FALSE WHERE version = 3").await;
        exec(&db, "DELETE FROM product_counts WHERE shard >= 8").await;
        assert_eq!(migrate::schema_state(&db).await.unwrap(), SchemaState::Behind(vec![3]));

        migrate::run(&db, Duration::from_secs(10)).await.expect("the next run finishes it");
        assert_eq!(recorded(&db).await, all_applied(&Backend::MySql(String::new())));
        assert_eq!(product_count_rows(&db).await, 16);
        db.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_migration_killed_after_its_bookkeeping_row_reruns_whole() {
        let Some((_test_db, db)) = fresh().await else { return };
        migrate::run(&db, Duration::from_secs(10)).await.unwrap();
        // Killed right after recording "started" and the first statement.
        exec(&db, "DROP TABLE recovery_codes").await;
        exec(&db, "UPDATE _sqlx_migrations SET success = FALSE WHERE version = 2").await;
        exec(&db, "DELETE FROM _sqlx_migrations WHERE version = 3").await;
        migrate::run(&db, Duration::from_secs(10)).await.unwrap();
        assert_eq!(recorded(&db).await, all_applied(&Backend::MySql(String::new())));
        on_db!(&db, pool => sqlx::query("SELECT COUNT(*) FROM recovery_codes").execute(pool).await.map(drop))
            .expect("the dropped table is back");
        db.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_held_lease_makes_others_wait_then_fail_clearly() {
        let Some((_test_db, db)) = fresh().await else { return };
        migrate::run(&db, Duration::from_secs(10)).await.unwrap();
        exec(&db, "UPDATE _sqlx_migrations SET success = FALSE WHERE version = 3").await;
        // Another process holds the lease and is alive (not expired).
        exec(
            &db,
            "UPDATE storegate_migration_lock SET holder = 'someone-else', \
             expires_at = NOW(6) + INTERVAL 1 HOUR WHERE id = 1",
        )
        .await;
        let started = std::time::Instant::now();
        let err = migrate::run(&db, Duration::from_secs(1)).await.unwrap_err();
        assert!(started.elapsed() >= Duration::from_secs(1));
        assert!(format!("{err:#}").contains("held the migration lock"), "{err:#}");
        assert_eq!(migrate::schema_state(&db).await.unwrap(), SchemaState::Behind(vec![3]), "nothing ran");

        // Its holder died: the lease expires and the next run takes it.
        exec(&db, "UPDATE storegate_migration_lock SET expires_at = NOW(6) - INTERVAL 1 SECOND WHERE id = 1")
            .await;
        migrate::run(&db, Duration::from_secs(5)).await.unwrap();
        assert_eq!(migrate::schema_state(&db).await.unwrap(), SchemaState::Current);
        let holder: Option<String> = on_db!(&db, pool => {
            sqlx::query_scalar("SELECT holder FROM storegate_migration_lock WHERE id = 1").fetch_one(pool).await
        })
        .unwrap();
        assert_eq!(holder, None, "released after the run");
        db.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn an_up_to_date_schema_takes_no_lease() {
        let Some((_test_db, db)) = fresh().await else { return };
        migrate::run(&db, Duration::from_secs(10)).await.unwrap();
        exec(
            &db,
            "UPDATE storegate_migration_lock SET holder = 'someone-else', \
             expires_at = NOW(6) + INTERVAL 1 HOUR WHERE id = 1",
        )
        .await;
        // A replica restarting while another process migrates something
        // this build does not know about still starts at once.
        migrate::run(&db, Duration::from_millis(100)).await.expect("nothing to do, no wait");
        db.close().await;
    }
}
