//! Per-attempt working directories:
//! `<WORK_DIR or the temp dir>/claudecluster/<worker_id>/<task_id>-<attempt>`,
//! created empty before the attempt and removed after it unless
//! `KEEP_WORK_DIRS` is set.

use std::path::{Path, PathBuf};

use claudecluster_engine::task::TaskId;

/// The directory that holds this worker's attempt directories.
pub fn worker_root(configured: Option<&Path>, worker_id: &str) -> PathBuf {
    let base = configured.map_or_else(std::env::temp_dir, Path::to_path_buf);
    base.join("claudecluster").join(sanitize(worker_id))
}

/// The directory of one attempt.
pub fn attempt_dir(root: &Path, task: TaskId, attempt: u32) -> PathBuf {
    root.join(format!("{task}-{attempt}"))
}

/// Creates `dir` empty, removing whatever an earlier run left there.
///
/// # Errors
/// When the directory cannot be removed or created.
pub async fn create_fresh(dir: &Path) -> std::io::Result<()> {
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    tokio::fs::create_dir_all(dir).await
}

/// Removes an attempt directory; failures are logged, not fatal.
pub async fn remove(dir: &Path) {
    if let Err(e) = tokio::fs::remove_dir_all(dir).await
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %dir.display(), error = %e, "could not remove a work directory");
    }
}

/// A worker id as one safe path component.
fn sanitize(id: &str) -> String {
    let clean: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() || clean.chars().all(|c| c == '.') {
        "worker".into()
    } else {
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_ids_become_one_component() {
        let root = worker_root(Some(Path::new("/w")), "../a/b c");
        assert_eq!(root, Path::new("/w/claudecluster/.._a_b_c"));
        assert_eq!(
            worker_root(Some(Path::new("/w")), ".."),
            Path::new("/w/claudecluster/worker")
        );
    }

    #[tokio::test]
    async fn fresh_directories_are_empty() {
        let base = tempfile::tempdir().unwrap();
        let dir = attempt_dir(base.path(), uuid::Uuid::nil(), 2);
        assert!(dir.ends_with("00000000-0000-0000-0000-000000000000-2"));
        create_fresh(&dir).await.unwrap();
        std::fs::write(dir.join("left-over"), b"x").unwrap();
        create_fresh(&dir).await.unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        remove(&dir).await;
        assert!(!dir.exists());
    }
}
