//! Private NATS and Redis servers a test can kill and restart: each on a
//! free loopback port with its data in a temporary directory that outlives
//! restarts, persisting the way production must (JetStream file storage;
//! Redis append-only file, fsynced on every write).
//!
//! The binaries come from `CC_NATS_SERVER_BIN` / `CC_REDIS_SERVER_BIN`
//! (exported by `scripts/test`), else from `PATH` and the usual system
//! directories.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long a server may take to listen after it was started.
const START_PATIENCE: Duration = Duration::from_secs(20);

/// A free loopback TCP port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn find_binary(env: &str, name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    path_dirs
        .into_iter()
        .chain(["/usr/sbin", "/usr/bin", "/usr/local/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} not found: set {env} or install it (scripts/test does)"))
}

/// Waits until something accepts connections on `port`.
async fn wait_listening(port: u16, what: &str) {
    let deadline = tokio::time::Instant::now() + START_PATIENCE;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not listen on 127.0.0.1:{port}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A server process restarted on the same port and data directory.
struct Server {
    what: &'static str,
    binary: PathBuf,
    args: Vec<String>,
    port: u16,
    child: Option<Child>,
    log: PathBuf,
}

impl Server {
    async fn start(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.what);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("server log file");
        let child = Command::new(&self.binary)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("server log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.binary.display()));
        self.child = Some(child);
        wait_listening(self.port, self.what).await;
    }

    /// SIGKILL: the harshest stop, with no chance to flush anything that
    /// was not already durable.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A private `nats-server -js` with file storage.
pub struct NatsServer {
    server: Server,
    _dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts it and waits until it listens.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let port = free_port();
        let store = dir.path().join("jetstream");
        let mut server = Server {
            what: "nats-server",
            binary: find_binary("CC_NATS_SERVER_BIN", "nats-server"),
            args: vec![
                "-js".into(),
                "-a".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port.to_string(),
                "-sd".into(),
                path_arg(&store),
            ],
            port,
            child: None,
            log: dir.path().join("nats.log"),
        };
        server.start().await;
        Self { server, _dir: dir }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.server.port)
    }

    /// SIGKILLs the server.
    pub fn kill(&mut self) {
        self.server.kill();
    }

    /// Starts it again on the same port and storage.
    pub async fn restart(&mut self) {
        self.server.start().await;
    }
}

/// A private `redis-server` that persists every write before answering.
pub struct RedisServer {
    server: Server,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts it and waits until it listens.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let port = free_port();
        let mut server = Server {
            what: "redis-server",
            binary: find_binary("CC_REDIS_SERVER_BIN", "redis-server"),
            args: vec![
                "--bind".into(),
                "127.0.0.1".into(),
                "--port".into(),
                port.to_string(),
                "--save".into(),
                String::new(),
                "--appendonly".into(),
                "yes".into(),
                "--appendfsync".into(),
                "always".into(),
                "--dir".into(),
                path_arg(dir.path()),
            ],
            port,
            child: None,
            log: dir.path().join("redis.log"),
        };
        server.start().await;
        Self { server, _dir: dir }
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.server.port)
    }

    /// SIGKILLs the server.
    pub fn kill(&mut self) {
        self.server.kill();
    }

    /// Starts it again on the same port and data directory.
    pub async fn restart(&mut self) {
        self.server.start().await;
    }
}

fn path_arg(path: &Path) -> String {
    path.to_str()
        .expect("temporary directories have UTF-8 paths")
        .to_owned()
}
