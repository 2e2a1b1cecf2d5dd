//! The job store's promises on both backends: what one batch commits is what the next process
//! loads — records with their inputs, agents, capabilities, the audit outbox — and deletions
//! take the inputs and idempotency keys with them. PostgreSQL runs as a child process
//! (`spine_integration::postgres`); its schema is migrated at open, once, and a database
//! migrated by a newer Spine is refused. A commit outlives a PostgreSQL restart.

use std::time::Duration;

use spine_dispatcher::config::DispatcherConfig;
use spine_dispatcher::jobs::{JobRecord, JobSpec, JobTable};
use spine_dispatcher::store::{Batch, JobStore, OwnedBatch};
use spine_integration::postgres::Postgres;

fn config(dir: &std::path::Path, store: Option<String>) -> DispatcherConfig {
    DispatcherConfig {
        data_dir: dir.to_path_buf(),
        store,
        store_timeout: Duration::from_secs(20),
        ..DispatcherConfig::default()
    }
}

async fn commit(s: &JobStore, b: Batch<'_>) {
    s.commit(OwnedBatch::encode(&b).unwrap())
        .await
        .unwrap()
        .unwrap();
}

fn sorted(mut jobs: Vec<JobRecord>) -> Vec<JobRecord> {
    jobs.sort_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
    jobs
}

/// One scenario, run on a store as `open` opens it (each call a new process's view).
async fn keeps_its_promises(cfg: &DispatcherConfig) {
    let s = JobStore::open(cfg).await.unwrap();
    let held = s.held().await.unwrap();
    assert!(held.jobs.is_empty() && held.agents.is_empty() && held.capabilities.is_empty());

    let mut t = JobTable::new(10);
    let mut spec = JobSpec::new("image.thumbnail".parse().unwrap(), "http:app");
    spec.input = vec![0u8, 1, 2, 255].into();
    spec.idempotency_key = Some("upload-1".into());
    let a = t.submit("job-a".parse().unwrap(), spec, 5).unwrap().clone();
    let b = t
        .submit(
            "job-b".parse().unwrap(),
            JobSpec::new("wordcount.map".parse().unwrap(), "http:app"),
            6,
        )
        .unwrap()
        .clone();
    let line = ("job-b".to_string(), b"{\"job\":\"job-b\"}\n".to_vec());
    let agents = [
        ("agent1@localhost".to_string(), 5),
        ("agent1@localhost".to_string(), 7),
    ];
    let caps = [
        ("image.thumbnail".parse().unwrap(), 5),
        ("image.thumbnail".parse().unwrap(), 6),
    ];
    // A batch may name an agent or a capability twice (seen twice in one turn).
    commit(
        &s,
        Batch {
            jobs: &[&a, &b],
            audit: std::slice::from_ref(&line),
            agents: &agents,
            capabilities: &caps,
            ..Batch::default()
        },
    )
    .await;
    drop(s);

    let s = JobStore::open(cfg).await.unwrap();
    let held = s.held().await.unwrap();
    assert_eq!(
        sorted(held.jobs),
        vec![a.clone(), b.clone()],
        "with a's input"
    );
    assert_eq!(held.agents, vec![("agent1@localhost".to_string(), 7)]);
    assert_eq!(held.capabilities, vec!["image.thumbnail".parse().unwrap()]);
    assert_eq!(s.audit_outbox().await.unwrap(), vec![line]);

    // a changes (written again, its input not); b's line reached the file; b is forgotten.
    let agent1: jid::FullJid = "agent1@localhost/w".parse().unwrap();
    let a2 = t.dispatched(&a.id, &agent1, 9).unwrap().clone();
    assert_ne!(a2, a);
    commit(
        &s,
        Batch {
            jobs: &[&a2],
            audited: &["job-b".to_string()],
            delete: std::slice::from_ref(&b.id),
            ..Batch::default()
        },
    )
    .await;
    drop(s);
    let s = JobStore::open(cfg).await.unwrap();
    assert_eq!(s.held().await.unwrap().jobs, vec![a2.clone()]);
    assert!(s.audit_outbox().await.unwrap().is_empty());
    commit(
        &s,
        Batch {
            delete: std::slice::from_ref(&a2.id),
            ..Batch::default()
        },
    )
    .await;
    assert!(s.held().await.unwrap().jobs.is_empty());

    // Rules made over the API: stored, replaced, deleted.
    let rule = |ty: &str| {
        let v = serde_json::json!({"name": "r1", "on": {"type": ty}, "do": {"capability": "c.x"}});
        serde_json::from_value::<spine_dispatcher::triggers::RuleConfig>(v).unwrap()
    };
    let put = |name: &str, r: Option<&spine_dispatcher::triggers::RuleConfig>| OwnedBatch {
        rules: vec![(name.to_owned(), r.map(|r| serde_json::to_vec(r).unwrap()))],
        ..OwnedBatch::default()
    };
    s.commit(put("r1", Some(&rule("a"))))
        .await
        .unwrap()
        .unwrap();
    s.commit(put("r1", Some(&rule("b"))))
        .await
        .unwrap()
        .unwrap();
    drop(s);
    let s = JobStore::open(cfg).await.unwrap();
    assert_eq!(s.held().await.unwrap().rules, vec![rule("b")]);
    s.commit(put("r1", None)).await.unwrap().unwrap();
    assert!(s.held().await.unwrap().rules.is_empty());
}

#[tokio::test]
async fn the_embedded_store_keeps_its_promises() {
    let dir = tempfile::tempdir().unwrap();
    keeps_its_promises(&config(dir.path(), None)).await;
}

#[tokio::test]
async fn the_postgres_store_keeps_the_same_promises_and_migrates_once() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), Some(pg.url()));
    keeps_its_promises(&cfg).await;
    // Deleting the jobs took their inputs and idempotency keys; each migration was applied
    // once although the store was opened four times.
    for table in ["spine_jobs", "spine_inputs", "spine_idempotency"] {
        let n = pg
            .psql("spine", &format!("SELECT count(*) FROM {table}"))
            .unwrap();
        assert_eq!(n, "0", "{table}");
    }
    assert_eq!(
        pg.psql(
            "spine",
            "SELECT string_agg(version::text, ',') FROM spine_migrations"
        )
        .unwrap(),
        "1,2,3,4,5,6,7,8,9,10"
    );
    // Version 8: job keys compare byte by byte, and the records' table leaves room for
    // updates in place.
    assert_eq!(
        pg.psql(
            "spine",
            "SELECT string_agg(DISTINCT collation_name, ',') FROM information_schema.columns \
             WHERE (table_name, column_name) IN (('spine_jobs', 'id'), ('spine_inputs', 'id'), \
             ('spine_idempotency', 'job'), ('spine_audit_outbox', 'job'), \
             ('spine_submitted', 'id'), ('spine_cancels', 'job'))"
        )
        .unwrap(),
        "C"
    );
    assert_eq!(
        pg.psql(
            "spine",
            "SELECT array_to_string(reloptions, ',') FROM pg_class WHERE relname = 'spine_jobs'"
        )
        .unwrap(),
        "fillfactor=60"
    );
    // Version 9: a commit's audit lines are one row. A line an earlier version left in the
    // outbox is read first and goes the same way.
    pg.psql(
        "spine",
        "INSERT INTO spine_audit_outbox (job, line) VALUES ('job-old', '\\x6f6c640a')",
    )
    .unwrap();
    let s = JobStore::open(&cfg).await.unwrap();
    let lines: Vec<(String, Vec<u8>)> = ["job-x", "job-y"]
        .map(|j| (j.to_string(), format!("{{\"job\":\"{j}\"}}\n").into_bytes()))
        .into();
    commit(
        &s,
        Batch {
            audit: &lines,
            ..Batch::default()
        },
    )
    .await;
    let rows = pg
        .psql("spine", "SELECT count(*) FROM spine_audit_batches")
        .unwrap();
    assert_eq!(rows, "1");
    let mut expected = vec![("job-old".to_string(), b"old\n".to_vec())];
    expected.extend(lines.iter().cloned());
    assert_eq!(s.audit_outbox().await.unwrap(), expected);
    let all: Vec<String> = expected.iter().map(|(j, _)| j.clone()).collect();
    commit(
        &s,
        Batch {
            audited: &all,
            ..Batch::default()
        },
    )
    .await;
    assert!(s.audit_outbox().await.unwrap().is_empty());
    drop(s);
    // A database a newer Spine migrated is refused, with what to do.
    pg.psql(
        "spine",
        "INSERT INTO spine_migrations (version, name) VALUES (99, 'future')",
    )
    .unwrap();
    let Err(e) = JobStore::open(&cfg).await else {
        panic!("opened a store of schema version 99")
    };
    let e = e.to_string();
    assert!(
        e.contains("schema version 99") && e.contains("newer Spine"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_waits_for_postgres_to_come_back() {
    let Some(mut pg) = Postgres::start_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), Some(pg.url()));
    let s = JobStore::open(&cfg).await.unwrap();
    let mut t = JobTable::new(10);
    let a = t
        .submit(
            "job-a".parse().unwrap(),
            JobSpec::new("c".parse().unwrap(), "http:app"),
            5,
        )
        .unwrap()
        .clone();
    pg.stop();
    let pending = s.commit(
        OwnedBatch::encode(&Batch {
            jobs: &[&a],
            ..Batch::default()
        })
        .unwrap(),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !pending.is_finished(),
        "the commit waits while PostgreSQL is down"
    );
    pg.launch().unwrap();
    tokio::time::timeout(Duration::from_secs(15), pending)
        .await
        .expect("the commit ends once PostgreSQL is back")
        .unwrap()
        .unwrap();
    let again = JobStore::open(&cfg).await.unwrap();
    assert_eq!(again.held().await.unwrap().jobs, vec![a]);
}

#[tokio::test]
async fn a_store_url_off_loopback_without_tls_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(
        dir.path(),
        Some("postgres://spine@db.example.com/spine".into()),
    );
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("store") && e.contains("sslmode=require"), "{e}");
    cfg.store = Some("mysql://spine@127.0.0.1/spine".into());
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("store") && e.contains("postgres://"), "{e}");
}

/// Leadership over the lease row (migration 2): one holder at a time, a new epoch at each
/// taking, and a leader whose lease was taken while it was paused stores nothing more.
#[tokio::test]
async fn a_deposed_leader_stores_nothing() {
    use spine_dispatcher::election::{Answer, Ask};
    use spine_dispatcher::store::postgres::Contact;
    use spine_dispatcher::store::Fence;
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), Some(pg.url()));
    let open = || async {
        match JobStore::open(&cfg).await.unwrap() {
            JobStore::Postgres(p) => p,
            JobStore::Redb(_) => panic!("not the PostgreSQL store"),
        }
    };
    let (a, b) = (open().await, open().await);
    let lease = Duration::from_millis(800);
    let contact = Contact {
        url: "http://127.0.0.1:8081".into(),
        jid: "dispatcher@localhost/d1".into(),
    };
    assert_eq!(
        a.lease("d1", Ask::Take, lease, &contact).await,
        Answer::Took { epoch: 1 }
    );
    // Standbys read who leads, and how to reach it.
    let row = b.leader().await.unwrap();
    assert_eq!(
        (
            row.holder.as_str(),
            row.epoch,
            row.url.as_str(),
            row.jid.as_str()
        ),
        ("d1", 1, "http://127.0.0.1:8081", "dispatcher@localhost/d1")
    );
    assert!(
        row.expires_in_ms > 0.0 && row.expires_in_ms <= 800.0,
        "{}",
        row.expires_in_ms
    );
    assert_eq!(
        b.lease("d2", Ask::Take, lease, &Contact::default()).await,
        Answer::HeldByOther
    );
    let mut t = JobTable::new(10);
    let mut job = |id: &str| {
        t.submit(
            id.parse().unwrap(),
            JobSpec::new("c".parse().unwrap(), "http:app"),
            5,
        )
        .unwrap()
        .clone()
    };
    let (x, y) = (job("job-x"), job("job-y"));
    let batch = |j: &JobRecord, holder: &str, epoch: u64| {
        OwnedBatch::encode(&Batch {
            jobs: &[j],
            ..Batch::default()
        })
        .unwrap()
        .fenced(Some(Fence {
            holder: holder.into(),
            epoch,
        }))
    };
    a.commit(&batch(&x, "d1", 1))
        .await
        .expect("the leader stores");
    assert_eq!(
        a.lease("d1", Ask::Renew { epoch: 1 }, lease, &Contact::default())
            .await,
        Answer::Renewed
    );
    // d1 is paused past its lease; d2 takes over with the next epoch.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(
        b.lease("d2", Ask::Take, lease, &Contact::default()).await,
        Answer::Took { epoch: 2 }
    );
    let e = a.commit(&batch(&y, "d1", 1)).await.unwrap_err().to_string();
    assert!(e.contains("deposed") && e.contains("epoch 1"), "{e}");
    let held = b.load().await.unwrap();
    assert_eq!(held, vec![x], "nothing of the deposed leader's commit");
    assert_eq!(
        a.lease("d1", Ask::Renew { epoch: 1 }, lease, &Contact::default())
            .await,
        Answer::Lost
    );
    b.commit(&batch(&y, "d2", 2))
        .await
        .expect("the new leader stores");
    // A clean stop frees the row at once.
    assert_eq!(
        b.lease("d2", Ask::Release { epoch: 2 }, lease, &Contact::default())
            .await,
        Answer::Released
    );
    assert_eq!(
        a.lease("d1", Ask::Take, lease, &Contact::default()).await,
        Answer::Took { epoch: 3 }
    );
    assert_eq!(
        pg.psql("spine", "SELECT holder || ' ' || epoch FROM spine_lease")
            .unwrap(),
        "d1 3"
    );
    // Two dispatchers accept the same submitter's key for two jobs: the first stored keeps
    // it; nothing of the second's commit is stored, not even its other job.
    let z = job("job-z");
    let mut keyed = |id: &str| {
        let mut spec = JobSpec::new("c".parse().unwrap(), "http:app");
        spec.idempotency_key = Some("order-7".into());
        t.submit(id.parse().unwrap(), spec, 5).unwrap().clone()
    };
    let (k1, k2) = (keyed("job-k1"), keyed("job-k2"));
    a.commit(&batch(&k1, "d1", 3))
        .await
        .expect("the key's first job");
    let both = OwnedBatch::encode(&Batch {
        jobs: &[&z, &k2],
        ..Batch::default()
    })
    .unwrap();
    let e = b.commit(&both).await.unwrap_err().to_string();
    assert!(e.contains("idempotency key"), "{e}");
    let ids: Vec<String> = sorted(b.load().await.unwrap())
        .into_iter()
        .map(|j| j.id.as_str().to_owned())
        .collect();
    assert_eq!(ids, ["job-k1", "job-x", "job-y"]);
    assert_eq!(
        pg.psql("spine", "SELECT job FROM spine_idempotency")
            .unwrap(),
        "job-k1"
    );
}

/// Blobs in PostgreSQL (migration 4): a leader's copies reach a dispatcher on another machine
/// (another blob directory), checked; a blob copied twice is stored once; one never copied is
/// reported missing; a deleted one is gone.
#[tokio::test]
async fn blobs_go_through_postgres_to_another_machine() {
    use spine_dispatcher::blobs::BlobStore;
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), Some(pg.url()));
    let JobStore::Postgres(store) = JobStore::open(&cfg).await.unwrap() else {
        panic!("not the PostgreSQL store")
    };
    let (here, _) = BlobStore::open(&dir.path().join("here"), None).unwrap();
    let (there, _) = BlobStore::open(&dir.path().join("there"), None).unwrap();
    // 2.5 MiB: three chunks, the last one short; and an empty blob.
    let big: Vec<u8> = (0..5 * 512 * 1024).map(|i| (i % 251) as u8).collect();
    let a = here.put(&big).unwrap();
    let e = here.put(b"").unwrap();
    let lost = here.put(b"never copied").unwrap();
    let files = vec![(a, here.path(&a.sha256)), (e, here.path(&e.sha256))];
    assert_eq!(store.put_blobs(&files).await.unwrap(), a.size);
    assert_eq!(store.put_blobs(&files).await.unwrap(), 0, "each blob once");
    assert_eq!(
        pg.psql("spine", "SELECT count(*) FROM spine_blob_chunks")
            .unwrap(),
        "4"
    );
    let (bytes, missing) = store.fetch_blobs(&[a, e, lost], &there).await.unwrap();
    assert_eq!((bytes, missing), (a.size, vec![lost]));
    // The leader's sweep reads the blobs copied before a time, with their sizes.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut old = store.stale_blobs(now + 1_000, 100).await.unwrap();
    old.sort_by_key(|b| b.size);
    assert_eq!(old, vec![e, a]);
    assert_eq!(store.stale_blobs(now + 1_000, 1).await.unwrap().len(), 1);
    assert!(store
        .stale_blobs(now - 60_000, 100)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(there.read_at(&a.sha256, 0, big.len()).unwrap(), big);
    assert!(there.contains(&e.sha256));
    // Deleted with a commit.
    let batch = OwnedBatch {
        blob_deletes: vec![a.sha256],
        ..OwnedBatch::default()
    };
    store.commit(&batch).await.unwrap();
    assert_eq!(
        pg.psql(
            "spine",
            "SELECT count(*) FROM spine_blobs UNION ALL SELECT count(*) FROM spine_blob_chunks"
        )
        .unwrap(),
        "1\n1"
    );
}
