//! Crash safety of the all-in-one command on its embedded queue and store:
//! SIGKILL while tasks are queued and running, start again on the same data
//! directory, and every accepted task still reaches `succeeded` while
//! results finished before the crash are kept unchanged.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn start_node(data_dir: &Path, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_cc-e2e-node"))
        .arg("serve")
        .env_remove("NATS_URL")
        .env_remove("REDIS_URL")
        .env("PORT", port.to_string())
        .env("DATA_DIR", data_dir)
        .env("LOG_LEVEL", "warn")
        .env("WORKER_CONCURRENCY", "2")
        .env("TASK_EXECUTOR", "command")
        // Each task takes a moment, so the kill lands mid-run.
        .env("TASK_COMMAND", "sh -c 'sleep 0.3; cat'")
        // A short lease, so interrupted tasks come back quickly.
        .env("CLAUDECLUSTER_NATS__ACK_WAIT_MS", "1500")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the claudecluster node")
}

async fn wait_ready(http: &reqwest::Client, base: &str) {
    for _ in 0..300 {
        if http
            .get(format!("{base}/health"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the node at {base} did not come up");
}

async fn get(http: &reqwest::Client, base: &str, id: &str) -> Value {
    http.get(format!("{base}/tasks/{id}"))
        .send()
        .await
        .expect("GET task")
        .json()
        .await
        .expect("task JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_run_loses_nothing() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();

    let mut node = start_node(data.path(), port);
    wait_ready(&http, &base).await;
    let tasks: Vec<Value> = (0..12)
        .map(|i| json!({"prompt": format!("crash {i}")}))
        .collect();
    let body: Value = http
        .post(format!("{base}/tasks/batch"))
        .json(&json!({ "tasks": tasks }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<String> = body["tasks"]
        .as_array()
        .expect("batch accepted")
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 12);

    // Kill once some tasks have finished and others are running or queued.
    let mut finished_before: Vec<(String, Value)> = Vec::new();
    for _ in 0..400 {
        finished_before.clear();
        let mut running = 0;
        for id in &ids {
            let r = get(&http, &base, id).await;
            match r["state"].as_str() {
                Some("succeeded") => finished_before.push((id.clone(), r)),
                Some("running") => running += 1,
                _ => {}
            }
        }
        if !finished_before.is_empty() && running > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !finished_before.is_empty(),
        "no task finished before the kill"
    );
    assert!(
        finished_before.len() < ids.len(),
        "everything finished before the kill"
    );
    node.kill().expect("SIGKILL the node");
    node.wait().unwrap();

    let mut node = start_node(data.path(), port);
    wait_ready(&http, &base).await;
    for id in &ids {
        let mut record = get(&http, &base, id).await;
        for _ in 0..600 {
            if record["state"] == "succeeded" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            record = get(&http, &base, id).await;
        }
        assert_eq!(
            record["state"], "succeeded",
            "task lost or stuck after the crash: {record}"
        );
    }
    for (id, before) in &finished_before {
        let after = get(&http, &base, id).await;
        assert_eq!(
            &after["result"], &before["result"],
            "a finished result changed"
        );
        assert_eq!(&after["finished_at"], &before["finished_at"]);
    }
    node.kill().ok();
    node.wait().ok();
}
