//! Beyond one server: a two-node ejabberd cluster on loopback (two Erlang nodes, our own epmd,
//! `join_cluster`), the dispatcher connected to one node and the agents to the other. Jobs
//! run across the cluster, and a lost agent's `unavailable` crosses it too. Needs ejabberd;
//! skipped with a reason without it, unless `SPINE_REQUIRE_SERVERS=1` (set by `.ci/run`).

use std::time::{Duration, Instant};

use serde_json::json;
use spine_agent::{Agent, JobContext, JobError, Output};
use spine_integration::ejabberd::{available, start_cluster};
use spine_integration::farm::{agent_config, run_agent, start_http_dispatcher, wait_for_agents};
use spine_integration::servers::required;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_cross_a_two_node_ejabberd_cluster() {
    if !available() {
        if required() {
            panic!("SPINE_REQUIRE_SERVERS=1 but ejabberd is not installed");
        }
        eprintln!("skipping: ejabberd is not installed");
        return;
    }
    let accounts = [("dispatcher", "pw-d"), ("agent1", "pw"), ("agent2", "pw")];
    let cluster = tokio::task::spawn_blocking(move || start_cluster(2, &accounts))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("the ejabberd cluster did not start: {e}"));
    let (node_a, node_b) = (&cluster.nodes[0], &cluster.nodes[1]);
    assert_ne!(node_a.addr, node_b.addr);
    let members = node_b.ctl(&["list_cluster"]).unwrap();
    assert!(
        members.contains(&node_a.node) && members.contains(&node_b.node),
        "{members}"
    );

    // The dispatcher on node A, both agents on node B.
    let dir = tempfile::tempdir().unwrap();
    let (dispatcher, base) = start_http_dispatcher(node_a, dir.path(), "").await;
    let agents: Vec<_> = (1..=2)
        .map(|n| {
            let agent = Agent::builder(agent_config(node_b, n, "slots = 2\n"))
                .capability("t.whoami", None, move |ctx: JobContext| async move {
                    tokio::time::sleep(Duration::from_millis(
                        ctx.args.get("ms").and_then(|v| v.as_u64()).unwrap_or(0),
                    ))
                    .await;
                    Ok::<_, JobError>(Output::bytes(format!("agent{n}")))
                })
                .build()
                .unwrap();
            run_agent(agent)
        })
        .collect();
    wait_for_agents(&base, "t.whoami", 2).await;

    let api = spine_client::Client::new(&base, None).unwrap();
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(
            api.submit(&json!({ "capability": "t.whoami", "args": { "ms": 20 } }))
                .await
                .unwrap(),
        );
    }
    let mut by_agent = [0; 2];
    for id in &ids {
        let j = tokio::time::timeout(Duration::from_secs(30), api.follow(id, |_, _| {}))
            .await
            .expect("the job ends")
            .unwrap();
        let out = spine_client::output(&j).unwrap();
        match out.as_slice() {
            b"agent1" => by_agent[0] += 1,
            b"agent2" => by_agent[1] += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(by_agent[0] + by_agent[1], 20);
    assert!(
        by_agent[0] > 0 && by_agent[1] > 0,
        "both agents ran jobs: {by_agent:?}"
    );

    // An agent lost on node B: node B's `unavailable` reaches the dispatcher on node A and the
    // job runs again on the other agent.
    let id = api
        .submit(&json!({ "capability": "t.whoami", "args": { "ms": 3000 } }))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let first = loop {
        let j = api.job(&id).await.unwrap();
        if let Some(a) = j["agent"].as_str() {
            break a.to_owned();
        }
        assert!(Instant::now() < deadline, "{j}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut agents = agents;
    let lost = if first.starts_with("agent1@") { 0 } else { 1 };
    let started = Instant::now();
    agents.remove(lost).kill();
    let j = tokio::time::timeout(Duration::from_secs(30), api.follow(&id, |_, _| {}))
        .await
        .expect("the job ends")
        .unwrap();
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_ne!(j["agent"].as_str().unwrap(), first);
    assert_eq!(j["attempts"], 2);
    eprintln!(
        "cluster: 20 jobs {by_agent:?}; lost agent's job done elsewhere {:.2} s after the loss",
        started.elapsed().as_secs_f64()
    );
    for a in agents {
        a.stop();
    }
    dispatcher.stop();
}
