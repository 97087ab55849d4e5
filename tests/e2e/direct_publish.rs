//! Publishing straight onto the queue from another system: the official
//! NATS client for Node.js (`tests/clients/direct-publish.mjs`) publishes
//! task messages following `schemas/` onto the task subject with JetStream
//! acknowledgements and a `Nats-Msg-Id` header, bypassing the intake.
//!
//! A valid message is processed like a submitted one (the worker creates
//! its record); a message that is not JSON, breaks the schema or is too
//! large is dead-lettered with a reason naming the problem, and the worker
//! carries on.

use std::process::Command;
use std::time::{Duration, Instant};

use chrono::Utc;
use claudecluster_tests::{BackendKind, TestCluster, workspace_root};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

/// Publishes `payloads` with the Node script; the parsed output lines.
fn node_publish(url: &str, subject: &str, payloads: &[String]) -> Vec<Value> {
    let clients = workspace_root().join("tests/clients");
    assert!(
        clients.join("node_modules/nats").is_dir(),
        "the nats npm package is not installed in {}: run scripts/install-test-clients",
        clients.display()
    );
    let out = Command::new("node")
        .arg(clients.join("direct-publish.mjs"))
        .arg(url)
        .arg(subject)
        .args(payloads)
        .output()
        .expect("run node (Node.js must be installed)");
    assert!(
        out.status.success(),
        "direct-publish.mjs failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("UTF-8 output")
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line per message"))
        .collect()
}

fn task(prompt: &str, extra: Value) -> (String, Value) {
    let id = uuid::Uuid::now_v7().to_string();
    let mut doc = json!({
        "schema_version": 1,
        "id": id,
        "prompt": prompt,
        "created_at": Utc::now().to_rfc3339(),
    });
    if let (Some(doc), Some(extra)) = (doc.as_object_mut(), extra.as_object()) {
        doc.extend(extra.clone());
    }
    (id, doc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_published_by_another_system_are_run_or_dead_lettered() {
    let cluster = TestCluster::start(BackendKind::Networked, |s| {
        s.worker.max_message_bytes = 4096;
    })
    .await;
    let settings = &cluster.settings;
    let subject = format!("{}.normal", settings.nats.subject_prefix);

    let (valid_id, valid) = task("hello from node", json!({"metadata": {"from": "node"}}));
    let (_, bad_field) = task("wrong priority", json!({"priority": "urgent"}));
    let (big_id, big) = task(&"x".repeat(10_000), json!({}));
    let dir = tempfile::tempdir().unwrap();
    let big_file = dir.path().join("big.json");
    std::fs::write(&big_file, big.to_string()).unwrap();
    let payloads = vec![
        valid.to_string(),
        "this is not JSON {".to_owned(),
        bad_field.to_string(),
        format!("@{}", big_file.display()),
    ];
    let acks = node_publish(settings.nats_url(), &subject, &payloads);
    assert_eq!(acks.len(), 4, "{acks:?}");
    assert_eq!(acks[0]["id"], valid_id.as_str());
    assert!(acks.iter().all(|a| a["duplicate"] == false), "{acks:?}");

    // The valid message runs; its record was created by the worker.
    let done = cluster.wait_final(&valid_id, WAIT).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["result"]["output"], "hello from node");
    assert_eq!(done["metadata"], json!({"from": "node"}));
    assert_eq!(done["attempts"], 1);

    // Publishing the same message again within the duplicate window is
    // dropped by JetStream: the task does not run twice.
    let again = node_publish(settings.nats_url(), &subject, &payloads[..1]);
    assert_eq!(again[0]["duplicate"], true, "{again:?}");

    // The three others are dead letters whose reasons name the problem.
    let letters = wait_dead_letters(&cluster, 3).await;
    let reason_of = |pred: &dyn Fn(&Value) -> bool| -> String {
        letters
            .iter()
            .find(|l| pred(l))
            .map(|l| l["reason"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_else(|| panic!("no such dead letter among {letters:?}"))
    };
    let not_json = reason_of(&|l| {
        l["reason"]
            .as_str()
            .unwrap_or("")
            .starts_with("invalid_json")
    });
    assert!(not_json.starts_with("invalid_json: "), "{not_json}");
    let schema = reason_of(&|l| l["payload"]["prompt"] == "wrong priority");
    assert!(
        schema.starts_with("invalid_task: priority: "),
        "the reason names the field: {schema}"
    );
    let too_large = reason_of(&|l| l["task_id"] == big_id.as_str());
    assert!(
        too_large.starts_with("too_large: ") && too_large.contains("4096"),
        "{too_large}"
    );

    println!("dead-letter reasons:\n  {not_json}\n  {schema}\n  {too_large}");

    // The worker is still healthy: a task through the intake runs.
    let after = cluster.submit_prompt("still working").await;
    let after = cluster
        .wait_final(after["id"].as_str().unwrap(), WAIT)
        .await;
    assert_eq!(after["state"], "succeeded", "{after}");
    cluster.stop().await;
}

async fn wait_dead_letters(cluster: &TestCluster, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = cluster.get_path("/dead-letters").await;
        assert_eq!(status, 200, "{body}");
        let letters = body["dead_letters"].as_array().cloned().unwrap_or_default();
        if letters.len() >= count {
            return letters;
        }
        assert!(
            Instant::now() < deadline,
            "{} dead letters after {WAIT:?}: {body}",
            letters.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
