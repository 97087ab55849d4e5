//! Layered configuration shared by every binary.
//!
//! Layers, later ones winning: built-in defaults, then an optional YAML file
//! (`--config-file` or `CONFIG_FILE`), then environment variables. The
//! environment accepts the deployment guide's flat names (`PORT`,
//! `WORKER_CONCURRENCY`, `TASK_TIMEOUT`, `LOG_LEVEL`, ...; see [`ENV_ALIASES`])
//! and, for every other setting, `CLAUDECLUSTER_<SECTION>__<KEY>` (for example
//! `CLAUDECLUSTER_NATS__ACK_WAIT_MS=60000`).

use std::path::{Path, PathBuf};

use figment::{
    Figment,
    providers::{Format, Serialized, Yaml},
};
use serde::{Deserialize, Serialize};

use crate::task::TaskLimits;

/// Flat environment variable names (from the deployment guide) and the
/// setting each one sets. Where two names set the same setting, the later
/// one in this list wins.
pub const ENV_ALIASES: &[(&str, &str)] = &[
    ("MCP_SERVER_HOST", "server.host"),
    ("HOST", "server.host"),
    ("MCP_SERVER_PORT", "server.port"),
    ("PORT", "server.port"),
    ("ALLOWED_HOSTS", "server.allowed_hosts"),
    ("MAX_BODY_BYTES", "server.max_body_bytes"),
    ("REQUEST_TIMEOUT_MS", "server.request_timeout_ms"),
    ("MAX_CONCURRENT_REQUESTS", "server.max_concurrent_requests"),
    ("NATS_URL", "nats.url"),
    ("REDIS_URL", "redis.url"),
    ("REDIS_KEY_PREFIX", "redis.key_prefix"),
    ("RESULT_TTL_SECS", "redis.result_ttl_secs"),
    ("PORT", "worker.port"),
    ("WORKER_PORT", "worker.port"),
    ("MAX_MESSAGE_BYTES", "worker.max_message_bytes"),
    ("WORKER_ID", "worker.id"),
    ("MAX_CONCURRENT_TASKS", "worker.concurrency"),
    ("WORKER_CONCURRENCY", "worker.concurrency"),
    ("TASK_TIMEOUT", "worker.task_timeout_ms"),
    ("TASK_EXECUTOR", "worker.executor"),
    ("TASK_COMMAND", "worker.command"),
    ("WORK_DIR", "worker.work_dir"),
    ("KEEP_WORK_DIRS", "worker.keep_work_dirs"),
    ("MAX_MEMORY_MB", "worker.limits.max_memory_mb"),
    ("MAX_CPU_CORES", "worker.limits.max_cpu_cores"),
    ("DISK_QUOTA_MB", "worker.limits.disk_quota_mb"),
    ("HEALTH_CHECK_INTERVAL", "worker.heartbeat_interval_ms"),
    ("SHUTDOWN_GRACE_MS", "worker.shutdown_grace_ms"),
    ("CLAUDE_BIN", "worker.claude.binary"),
    ("CLAUDE_MODEL", "worker.claude.model"),
    ("CLAUDE_MAX_TURNS", "worker.claude.max_turns"),
    ("CLAUDE_ALLOWED_TOOLS", "worker.claude.allowed_tools"),
    ("CLAUDE_PERMISSION_MODE", "worker.claude.permission_mode"),
    ("MAX_PROMPT_CHARS", "tasks.max_prompt_chars"),
    ("MAX_BATCH_SIZE", "tasks.max_batch"),
    ("DATA_DIR", "embedded.data_dir"),
    ("LOG_LEVEL", "log.level"),
    ("LOG_FORMAT", "log.format"),
];

/// Every setting of every ClaudeCluster process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// The HTTP intake.
    pub server: ServerSettings,
    /// NATS JetStream.
    pub nats: NatsSettings,
    /// Redis.
    pub redis: RedisSettings,
    /// The embedded queue and store of `claudecluster serve`.
    pub embedded: EmbeddedSettings,
    /// Limits on submitted tasks.
    pub tasks: TaskLimits,
    /// The worker pool.
    pub worker: WorkerSettings,
    /// Logging.
    pub log: LogSettings,
}

/// The HTTP intake.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    /// Address to bind (`HOST`).
    pub host: String,
    /// Port to bind (`PORT`, `MCP_SERVER_PORT`); 0 picks a free one.
    pub port: u16,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// Requests taking longer are answered 408.
    pub request_timeout_ms: u64,
    /// Requests in progress beyond this are shed with 503.
    pub max_concurrent_requests: usize,
    /// Host names the MCP endpoint accepts (DNS rebinding protection), in
    /// addition to loopback names. `*` accepts any.
    pub allowed_hosts: Vec<String>,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 3000,
            max_body_bytes: 16 * 1024 * 1024,
            request_timeout_ms: 30_000,
            max_concurrent_requests: 4096,
            allowed_hosts: Vec::new(),
        }
    }
}

/// NATS JetStream. The stream and consumer definitions live in
/// `broker-config/`; these are the names and knobs the processes use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsSettings {
    /// Server URL (`NATS_URL`). When unset, `claudecluster serve` uses the
    /// embedded queue; the producer and consumer default to
    /// `nats://127.0.0.1:4222`.
    pub url: Option<String>,
    /// The task stream.
    pub stream: String,
    /// Subjects are `<subject_prefix>.<band>` (`claudecluster.tasks.high`).
    pub subject_prefix: String,
    /// Durable pull consumers are `<consumer_prefix>-<band>`.
    pub consumer_prefix: String,
    /// The dead-letter stream.
    pub dead_letter_stream: String,
    /// Its subject prefix: `<dead_letter_subject_prefix>.<reason>`.
    pub dead_letter_subject_prefix: String,
    /// How long a worker holds a message before it is redelivered, unless
    /// the worker reports progress.
    pub ack_wait_ms: u64,
    /// Deliveries before JetStream gives up on a message; the worker
    /// quarantines a message to the dead letters before this.
    pub max_deliver: i64,
    /// Unacknowledged messages per band across all workers.
    pub max_ack_pending: i64,
    /// Window in which a re-published task id is dropped as a duplicate.
    pub duplicate_window_ms: u64,
    /// Replicas of the stream (1 for a single server).
    pub replicas: usize,
    /// How long the intake waits for a publish confirmation.
    pub publish_timeout_ms: u64,
}

impl Default for NatsSettings {
    fn default() -> Self {
        Self {
            url: None,
            stream: "CLAUDECLUSTER_TASKS".into(),
            subject_prefix: "claudecluster.tasks".into(),
            consumer_prefix: "claudecluster-workers".into(),
            dead_letter_stream: "CLAUDECLUSTER_DEAD_LETTERS".into(),
            dead_letter_subject_prefix: "claudecluster.dead".into(),
            ack_wait_ms: 30_000,
            max_deliver: 20,
            max_ack_pending: 10_000,
            duplicate_window_ms: 120_000,
            replicas: 1,
            publish_timeout_ms: 5_000,
        }
    }
}

/// Redis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSettings {
    /// Server URL (`REDIS_URL`). When unset, `claudecluster serve` uses the
    /// embedded store; the producer and consumer default to
    /// `redis://127.0.0.1:6379`.
    pub url: Option<String>,
    /// Prefix of every key, so deployments (and tests) can share a server.
    pub key_prefix: String,
    /// How long task records live after their last change (default 24 h).
    pub result_ttl_secs: u64,
    /// Multiplexed connections per process (default 1). Every concurrent
    /// call shares them, so more connections mean fewer calls per read and
    /// write on both ends; see `broker-config/redis/README.md`.
    pub pool_size: usize,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: None,
            key_prefix: "claudecluster:".into(),
            result_ttl_secs: 24 * 60 * 60,
            pool_size: 1,
        }
    }
}

/// The embedded backends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct EmbeddedSettings {
    /// Where the database file lives (`DATA_DIR`, `--data-dir`); default: the
    /// user's data directory.
    pub data_dir: Option<PathBuf>,
}

/// Which executor runs tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ExecutorKind {
    /// The Claude Code CLI in headless mode.
    Claude,
    /// A configured program.
    Command,
    /// Answers with the prompt; for tests and benchmarks.
    #[default]
    Echo,
}

impl ExecutorKind {
    /// The configuration name.
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutorKind::Claude => "claude",
            ExecutorKind::Command => "command",
            ExecutorKind::Echo => "echo",
        }
    }
}

/// The worker pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerSettings {
    /// `WORKER_ID`; default `worker-<hostname>-<pid>`.
    pub id: Option<String>,
    /// Tasks run at once (`WORKER_CONCURRENCY`).
    pub concurrency: usize,
    /// Hard limit for one attempt in milliseconds (`TASK_TIMEOUT`).
    pub task_timeout_ms: u64,
    /// `TASK_EXECUTOR`: `claude`, `command` or `echo`. `None` lets
    /// `claudecluster serve` pick `claude` when the CLI is on PATH.
    pub executor: Option<ExecutorKind>,
    /// For the `command` executor: the program and its arguments
    /// (`TASK_COMMAND`, whitespace-separated or a YAML list).
    pub command: Vec<String>,
    /// Root of the per-task working directories; default: the system
    /// temporary directory.
    pub work_dir: Option<PathBuf>,
    /// Keep each task's working directory after it finishes.
    pub keep_work_dirs: bool,
    /// Cap on captured stdout and stderr, in bytes each.
    pub max_output_bytes: usize,
    /// Largest task message a worker accepts, in bytes; larger ones are
    /// dead-lettered as `too_large` (`MAX_MESSAGE_BYTES`).
    pub max_message_bytes: usize,
    /// Port of the worker's health and metrics server (`WORKER_PORT`, else
    /// `PORT`); 0 picks a free one. It binds `server.host`.
    pub port: u16,
    /// Grace period for running tasks at SIGTERM.
    pub shutdown_grace_ms: u64,
    /// Heartbeat period; a worker silent for three periods drops off the
    /// list.
    pub heartbeat_interval_ms: u64,
    /// How often a running task's record is read to notice that a client
    /// cancelled it; the task's processes are stopped within about this
    /// long of the cancel. One small store read per running task per
    /// period.
    pub cancel_check_ms: u64,
    /// A first attempt that ends within this long is recorded by one store
    /// write when it ends, instead of one before it runs (`running`) and one
    /// after: the store's cost per task drops by about a third. An attempt
    /// still running after this long is recorded as `running` then, so a
    /// task only skips the `running` state when it lasts less than this.
    /// Redeliveries and retries are always recorded before they run (a task
    /// that crashes its worker must leave a trace). 0 records every attempt
    /// before it runs.
    pub record_start_after_ms: u64,
    /// First retry delay; doubles each attempt, with jitter.
    pub retry_base_delay_ms: u64,
    /// Longest retry delay.
    pub retry_max_delay_ms: u64,
    /// Whether a timed-out attempt is retried.
    pub retry_timeouts: bool,
    /// Resource limits applied to each task's process.
    pub limits: ResourceLimits,
    /// The `claude` executor.
    pub claude: ClaudeSettings,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            id: None,
            concurrency: 5,
            task_timeout_ms: 300_000,
            executor: None,
            command: Vec::new(),
            work_dir: None,
            keep_work_dirs: false,
            max_output_bytes: 1024 * 1024,
            max_message_bytes: 2 * 1024 * 1024,
            port: 3001,
            shutdown_grace_ms: 30_000,
            heartbeat_interval_ms: 10_000,
            cancel_check_ms: 500,
            record_start_after_ms: 50,
            retry_base_delay_ms: 1_000,
            retry_max_delay_ms: 60_000,
            retry_timeouts: false,
            limits: ResourceLimits::default(),
            claude: ClaudeSettings::default(),
        }
    }
}

impl WorkerSettings {
    /// The configured id, or `worker-<hostname>-<pid>`.
    pub fn resolved_id(&self) -> String {
        self.id.clone().unwrap_or_else(|| {
            let host = hostname::get()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "unknown".into());
            format!("worker-{host}-{}", std::process::id())
        })
    }
}

/// Per-task resource limits (the deployment guide's names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResourceLimits {
    /// Address space of the task's process, in MiB (`MAX_MEMORY_MB`).
    pub max_memory_mb: Option<u64>,
    /// CPU cores the task may use (`MAX_CPU_CORES`).
    pub max_cpu_cores: Option<f64>,
    /// Size of the task's working directory, in MiB (`DISK_QUOTA_MB`).
    pub disk_quota_mb: Option<u64>,
}

impl Default for ResourceLimits {
    fn default() -> Self {
        Self {
            max_memory_mb: Some(2048),
            max_cpu_cores: Some(2.0),
            disk_quota_mb: Some(1024),
        }
    }
}

/// The `claude` executor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClaudeSettings {
    /// Path or name of the CLI (`CLAUDE_BIN`).
    pub binary: String,
    /// `--model`.
    pub model: Option<String>,
    /// `--max-turns`.
    pub max_turns: Option<u32>,
    /// `--allowedTools`.
    pub allowed_tools: Vec<String>,
    /// `--permission-mode`.
    pub permission_mode: Option<String>,
    /// Environment variables passed through to the CLI from the worker's
    /// own environment; nothing else is.
    pub env_allowlist: Vec<String>,
    /// Variables set for the CLI with fixed values (for example
    /// `ANTHROPIC_BASE_URL` for a gateway); they win over passed-through ones.
    pub env: std::collections::BTreeMap<String, String>,
    /// Treat `is_error: true` as permanent (no retry).
    pub errors_are_permanent: bool,
}

impl Default for ClaudeSettings {
    fn default() -> Self {
        Self {
            binary: "claude".into(),
            model: None,
            max_turns: None,
            allowed_tools: Vec::new(),
            permission_mode: None,
            env_allowlist: [
                "ANTHROPIC_API_KEY",
                "ANTHROPIC_AUTH_TOKEN",
                "ANTHROPIC_BASE_URL",
                "ANTHROPIC_MODEL",
                "CLAUDE_CODE_USE_BEDROCK",
                "CLAUDE_CODE_USE_VERTEX",
                "DISABLE_TELEMETRY",
                "DISABLE_AUTOUPDATER",
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC",
                "PATH",
                "LANG",
                "HTTPS_PROXY",
                "HTTP_PROXY",
                "NO_PROXY",
            ]
            .map(String::from)
            .to_vec(),
            env: std::collections::BTreeMap::new(),
            errors_are_permanent: true,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Pretty,
    /// One JSON object per line.
    Json,
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// `LOG_LEVEL`: a level or a tracing filter directive.
    pub level: String,
    /// `LOG_FORMAT`: `pretty` or `json`.
    pub format: LogFormat,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Pretty,
        }
    }
}

/// A configuration that could not be loaded, naming the setting at fault.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(#[from] Box<figment::Error>);

/// Settings keys whose values are lists; a flat environment variable gives
/// them as a comma- or whitespace-separated string.
const LIST_KEYS: &[&str] = &["server.allowed_hosts", "worker.claude.allowed_tools"];

impl Settings {
    /// Loads settings from the defaults, the YAML file (the argument, or
    /// `CONFIG_FILE`), and the process environment.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the setting whose value is wrong.
    pub fn load(config_file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(config_file, std::env::vars())
    }

    /// [`Self::load`] with an explicit environment, for tests.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the setting whose value is wrong.
    pub fn load_from(
        config_file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let env: Vec<(String, String)> = env.into_iter().collect();
        let file = config_file.map(Path::to_path_buf).or_else(|| {
            env.iter()
                .find(|(k, _)| k == "CONFIG_FILE")
                .map(|(_, v)| PathBuf::from(v))
        });

        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(file) = file {
            figment = figment.merge(Yaml::file_exact(file));
        }
        // Flat names from the deployment guide, in ENV_ALIASES order.
        for (name, key) in ENV_ALIASES {
            if let Some((_, value)) = env.iter().find(|(k, _)| k == name) {
                figment = figment.merge(Self::env_value(key, value));
            }
        }
        // Everything else: CLAUDECLUSTER_SECTION__KEY.
        let prefixed = env.iter().filter_map(|(k, v)| {
            k.strip_prefix("CLAUDECLUSTER_")
                .map(|rest| (rest.to_ascii_lowercase().replace("__", "."), v.clone()))
        });
        for (key, value) in prefixed {
            figment = figment.merge(Self::env_value(&key, &value));
        }
        figment.extract().map_err(|e| ConfigError(Box::new(e)))
    }

    /// One environment value as a figment layer, parsed like figment's own
    /// environment provider (numbers, booleans) and split into a list for
    /// list settings.
    fn env_value(key: &str, value: &str) -> Figment {
        let value: figment::value::Value = if key == "worker.command" {
            // A command line: split like a POSIX shell would, so quoted
            // arguments survive ("sh -c 'sleep 1; cat'"). An unbalanced quote
            // stays a string and fails extraction with the setting's name.
            match shell_words::split(value) {
                Ok(words) => words.into(),
                Err(_) => value.into(),
            }
        } else if LIST_KEYS.contains(&key) {
            value
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect::<Vec<_>>()
                .into()
        } else {
            value.parse().unwrap_or_else(|never| match never {})
        };
        Figment::from(Serialized::default(key, value))
    }

    /// The Redis URL, or the local default.
    pub fn redis_url(&self) -> &str {
        self.redis
            .url
            .as_deref()
            .unwrap_or("redis://127.0.0.1:6379")
    }

    /// The NATS URL, or the local default.
    pub fn nats_url(&self) -> &str {
        self.nats.url.as_deref().unwrap_or("nats://127.0.0.1:4222")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_load() {
        let s = Settings::load_from(None, env(&[])).unwrap();
        assert_eq!(s, Settings::default());
    }

    #[test]
    fn guide_names_set_nested_settings() {
        let s = Settings::load_from(
            None,
            env(&[
                ("PORT", "8080"),
                ("WORKER_CONCURRENCY", "7"),
                ("TASK_TIMEOUT", "1000"),
                ("LOG_FORMAT", "json"),
                ("TASK_EXECUTOR", "command"),
                ("TASK_COMMAND", "sh -c 'sleep 1; cat'"),
                ("NATS_URL", "nats://example:4222"),
                ("CLAUDECLUSTER_NATS__ACK_WAIT_MS", "1234"),
            ]),
        )
        .unwrap();
        assert_eq!(s.server.port, 8080);
        assert_eq!(s.worker.concurrency, 7);
        assert_eq!(s.worker.task_timeout_ms, 1000);
        assert_eq!(s.log.format, LogFormat::Json);
        assert_eq!(s.worker.executor, Some(ExecutorKind::Command));
        assert_eq!(s.worker.command, vec!["sh", "-c", "sleep 1; cat"]);
        assert_eq!(s.nats.url.as_deref(), Some("nats://example:4222"));
        assert_eq!(s.nats.ack_wait_ms, 1234);
    }

    #[test]
    fn yaml_file_is_overridden_by_env() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, "server:\n  port: 9000\nworker:\n  concurrency: 3\n").unwrap();
        let s = Settings::load_from(Some(&path), env(&[("PORT", "9001")])).unwrap();
        assert_eq!(s.server.port, 9001);
        assert_eq!(s.worker.concurrency, 3);
    }

    #[test]
    fn bad_values_name_the_setting() {
        let err = Settings::load_from(None, env(&[("WORKER_CONCURRENCY", "lots")])).unwrap_err();
        assert!(err.to_string().contains("concurrency"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, "server:\n  prot: 9000\n").unwrap();
        let err = Settings::load_from(Some(&path), env(&[])).unwrap_err();
        assert!(err.to_string().contains("prot"), "{err}");
    }
}
