//! The embedded backends of the all-in-one `claudecluster serve`: a durable
//! task queue and a result store in one local database file (redb), with the
//! semantics of NATS JetStream and Redis, for a laptop, a CI job or a small
//! server where running a broker is not worth it.
//!
//! [`open_embedded`] opens (or creates) `claudecluster.redb` in the data
//! directory and returns the same [`Backends`] the networked backends give,
//! so the intake and the workers cannot tell the difference. The queue lives
//! in [`crate::broker::embedded`], the store in [`crate::results::embedded`];
//! both write through the one [`Db`] handle defined here.
//!
//! Only one process can have the file open for writing; a second
//! `claudecluster serve` on the same data directory fails with
//! [`EmbeddedError::InUse`].

mod db;
pub(crate) mod lanes;
pub(crate) mod records;
pub(crate) mod tables;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use db::{Db, DbError};

use crate::backend::Backends;
use crate::broker::embedded::EmbeddedQueue;
use crate::config::Settings;
use crate::results::embedded::EmbeddedStore;

/// The database file's name inside the data directory.
pub const DATABASE_FILE: &str = "claudecluster.redb";

/// Errors opening the embedded backends.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    /// No data directory is configured and neither `XDG_DATA_HOME` nor
    /// `HOME` is set.
    #[error("no data directory: set DATA_DIR (or --data-dir), XDG_DATA_HOME or HOME")]
    NoDataDir,
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another process has the database open.
    #[error("database {path} is in use by another process")]
    InUse {
        /// The database file.
        path: PathBuf,
    },
    /// The database file could not be opened or created.
    #[error("cannot open database {path}: {source}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// What redb reported.
        source: redb::DatabaseError,
    },
    /// The database opened but its contents could not be loaded.
    #[error("cannot load database {path}: {source}")]
    Load {
        /// The database file.
        path: PathBuf,
        /// What went wrong.
        source: DbError,
    },
}

/// The default data directory: `$XDG_DATA_HOME/claudecluster`, else
/// `~/.local/share/claudecluster`; `None` when neither variable is set.
pub fn default_data_dir() -> Option<PathBuf> {
    let non_empty = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    non_empty("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| non_empty("HOME").map(|home| PathBuf::from(home).join(".local/share")))
        .map(|base| base.join("claudecluster"))
}

/// Opens (or creates) the database in `settings.embedded.data_dir`, or the
/// [`default_data_dir`] when that is unset, creating the directory, and
/// returns the embedded queue and store as [`Backends`].
///
/// Messages that were in flight when the previous process stopped (even by
/// SIGKILL) are deliverable again.
///
/// # Errors
/// An [`EmbeddedError`] saying which step failed.
pub fn open_embedded(settings: &Settings) -> Result<Backends, EmbeddedError> {
    let dir = match &settings.embedded.data_dir {
        Some(dir) => dir.clone(),
        None => default_data_dir().ok_or(EmbeddedError::NoDataDir)?,
    };
    std::fs::create_dir_all(&dir).map_err(|source| EmbeddedError::CreateDir {
        path: dir.clone(),
        source,
    })?;
    open_embedded_at(dir.join(DATABASE_FILE), settings)
}

/// [`open_embedded`] with an explicit database file; its directory must
/// exist. `settings` supplies the lease time, the duplicate window
/// (`nats.ack_wait_ms`, `nats.duplicate_window_ms`) and the record lifetime
/// (`redis.result_ttl_secs`).
///
/// # Errors
/// An [`EmbeddedError`] saying which step failed.
pub fn open_embedded_at(
    path: impl AsRef<Path>,
    settings: &Settings,
) -> Result<Backends, EmbeddedError> {
    let path = path.as_ref();
    let db = open_db(path)?;
    let queue = EmbeddedQueue::open(&db, &settings.nats).map_err(|source| EmbeddedError::Load {
        path: path.to_path_buf(),
        source,
    })?;
    let store = Arc::new(EmbeddedStore::new(&db, &settings.redis));
    let queue = Arc::new(queue);
    tracing::info!(path = %path.display(), depth = queue.depth(), "embedded queue and store opened");
    Ok(Backends {
        publisher: queue.clone(),
        consumer: queue.clone(),
        dead_letters: queue,
        store,
        description: path.display().to_string(),
    })
}

/// Opens the database file and starts its writer.
///
/// # Errors
/// [`EmbeddedError::InUse`] when another process holds it, otherwise
/// [`EmbeddedError::Open`] or [`EmbeddedError::Load`].
pub fn open_db(path: &Path) -> Result<Db, EmbeddedError> {
    let database = redb::Database::create(path).map_err(|source| match source {
        redb::DatabaseError::DatabaseAlreadyOpen => EmbeddedError::InUse {
            path: path.to_path_buf(),
        },
        source => EmbeddedError::Open {
            path: path.to_path_buf(),
            source,
        },
    })?;
    Db::start(database, path).map_err(|source| EmbeddedError::Load {
        path: path.to_path_buf(),
        source,
    })
}
