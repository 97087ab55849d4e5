//! Worker processes: `cc-e2e-node consumer` (the all-in-one command's
//! worker role) started with the environment a deployment would give it,
//! pointed at a test's uniquely named streams and keys, and killed with
//! SIGKILL and restarted the way a crash and an orchestrator would.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use claudecluster_engine::config::Settings;

/// The environment that points a worker process at the same streams,
/// consumers and keys as `settings`, using the configuration names an
/// operator would.
pub fn worker_env(settings: &Settings) -> Vec<(String, String)> {
    let n = &settings.nats;
    let mut env = vec![
        ("NATS_URL", settings.nats_url().to_owned()),
        ("REDIS_URL", settings.redis_url().to_owned()),
        ("REDIS_KEY_PREFIX", settings.redis.key_prefix.clone()),
        ("CLAUDECLUSTER_NATS__STREAM", n.stream.clone()),
        (
            "CLAUDECLUSTER_NATS__SUBJECT_PREFIX",
            n.subject_prefix.clone(),
        ),
        (
            "CLAUDECLUSTER_NATS__CONSUMER_PREFIX",
            n.consumer_prefix.clone(),
        ),
        (
            "CLAUDECLUSTER_NATS__DEAD_LETTER_STREAM",
            n.dead_letter_stream.clone(),
        ),
        (
            "CLAUDECLUSTER_NATS__DEAD_LETTER_SUBJECT_PREFIX",
            n.dead_letter_subject_prefix.clone(),
        ),
        ("CLAUDECLUSTER_NATS__ACK_WAIT_MS", n.ack_wait_ms.to_string()),
        ("CLAUDECLUSTER_NATS__MAX_DELIVER", n.max_deliver.to_string()),
        (
            "CLAUDECLUSTER_NATS__MAX_ACK_PENDING",
            n.max_ack_pending.to_string(),
        ),
        (
            "CLAUDECLUSTER_NATS__DUPLICATE_WINDOW_MS",
            n.duplicate_window_ms.to_string(),
        ),
        ("CLAUDECLUSTER_NATS__REPLICAS", n.replicas.to_string()),
        ("WORKER_PORT", "0".to_owned()),
        ("LOG_LEVEL", "warn".to_owned()),
        (
            "HEALTH_CHECK_INTERVAL",
            settings.worker.heartbeat_interval_ms.to_string(),
        ),
    ];
    if let Some(executor) = settings.worker.executor {
        env.push(("TASK_EXECUTOR", executor.as_str().to_owned()));
    }
    env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// One slot of the fleet: the process now running in it, if any.
struct Slot {
    worker_id: String,
    child: Option<Child>,
    starts: usize,
}

/// A fixed number of worker processes.
pub struct Fleet {
    env: Vec<(String, String)>,
    slots: Vec<Slot>,
    logs: tempfile::TempDir,
    /// Processes killed by [`Fleet::kill`].
    pub kills: usize,
    /// Processes that died on their own and were started again by
    /// [`Fleet::restart_dead`].
    pub deaths: usize,
}

impl Fleet {
    /// A fleet of `size` workers named `<label>-1`…, configured by `env`
    /// (see [`worker_env`]); none is started yet.
    pub fn new(label: &str, size: usize, env: Vec<(String, String)>) -> Self {
        Self {
            env,
            slots: (1..=size)
                .map(|i| Slot {
                    worker_id: format!("{label}-{i}"),
                    child: None,
                    starts: 0,
                })
                .collect(),
            logs: tempfile::tempdir().expect("temporary directory"),
            kills: 0,
            deaths: 0,
        }
    }

    /// Runs tasks without per-task resource limits (a configuration file
    /// sets them to none), so a task is just its program: the tests that
    /// start thousands of tasks measure the worker runtime, not the
    /// launcher and cgroups.
    pub fn without_limits(mut self) -> Self {
        let path = self.logs.path().join("worker.yaml");
        std::fs::write(
            &path,
            "worker:\n  limits:\n    max_memory_mb: null\n    max_cpu_cores: null\n    disk_quota_mb: null\n",
        )
        .expect("write the worker configuration");
        let path = path.to_str().expect("UTF-8 temporary path").to_owned();
        self.env.push(("CONFIG_FILE".into(), path));
        self
    }

    /// Starts every slot that has no process.
    pub fn start_all(&mut self) {
        for i in 0..self.slots.len() {
            if self.slots[i].child.is_none() {
                self.start(i);
            }
        }
    }

    /// Starts a worker process in slot `i`.
    pub fn start(&mut self, i: usize) {
        let log = self.log_path(i);
        let slot = &mut self.slots[i];
        assert!(slot.child.is_none(), "slot {i} is running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("worker log file");
        let child = Command::new(env!("CARGO_BIN_EXE_cc-e2e-node"))
            .arg("consumer")
            .env_remove("PORT")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("WORKER_ID", &slot.worker_id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start a worker process");
        slot.child = Some(child);
        slot.starts += 1;
    }

    /// SIGKILLs the process in slot `i` and waits for it; `false` when the
    /// slot had none.
    pub fn kill(&mut self, i: usize) -> bool {
        let Some(mut child) = self.slots[i].child.take() else {
            return false;
        };
        let _ = child.kill();
        let _ = child.wait();
        self.kills += 1;
        true
    }

    /// Starts again every process that exited on its own (what an
    /// orchestrator does for a crashed pod); returns how many did.
    pub fn restart_dead(&mut self) -> usize {
        let mut dead = Vec::new();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if let Some(child) = slot.child.as_mut()
                && child.try_wait().ok().flatten().is_some()
            {
                slot.child = None;
                dead.push(i);
            }
        }
        for &i in &dead {
            self.start(i);
        }
        self.deaths += dead.len();
        dead.len()
    }

    /// The worker id of slot `i`.
    pub fn worker_id(&self, i: usize) -> &str {
        &self.slots[i].worker_id
    }

    /// The end of every worker's log, for a failure message.
    pub fn log_tails(&self) -> String {
        (0..self.slots.len())
            .map(|i| {
                let text = std::fs::read_to_string(self.log_path(i)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- {} ---\n{}", self.slots[i].worker_id, tail.join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.logs.path().join(format!("worker-{}.log", i + 1))
    }

    /// Stops every process (SIGKILL: the test is over).
    pub fn stop(&mut self) {
        for slot in &mut self.slots {
            if let Some(mut child) = slot.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop();
    }
}
