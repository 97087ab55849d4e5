//! Memory of the processes under test, from `/proc/<pid>/status`: `VmRSS`
//! (resident now) and `VmHWM` (the most it was ever resident, so read at the
//! end of a run it is the peak under load without any sampling).

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Errors reading a process's memory.
#[derive(Debug, thiserror::Error)]
pub enum RssError {
    /// The status file could not be read (no such process, or not Linux).
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The status file lacks the memory lines.
    #[error("{path} has no {field} line")]
    Missing {
        /// The file.
        path: String,
        /// The line looked for.
        field: &'static str,
    },
    /// A `--pid` argument is not `name=pid`.
    #[error("expected NAME=PID, got {0:?}")]
    BadSpec(String),
}

/// One process's memory at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessMemory {
    /// What the process is (`producer`, `consumer`).
    pub name: String,
    /// Its process id.
    pub pid: u32,
    /// Resident set size now, in KiB.
    pub vm_rss_kib: u64,
    /// Peak resident set size so far, in KiB.
    pub vm_hwm_kib: u64,
}

impl ProcessMemory {
    /// Reads `/proc/<pid>/status`.
    ///
    /// # Errors
    /// [`RssError`] when the file cannot be read or lacks the lines.
    pub fn read(name: &str, pid: u32) -> Result<Self, RssError> {
        let path = format!("/proc/{pid}/status");
        let text = std::fs::read_to_string(Path::new(&path)).map_err(|source| RssError::Read {
            path: path.clone(),
            source,
        })?;
        let (vm_rss_kib, vm_hwm_kib) = parse_status(&text, &path)?;
        Ok(Self {
            name: name.to_owned(),
            pid,
            vm_rss_kib,
            vm_hwm_kib,
        })
    }

    /// `VmRSS` in MiB.
    pub fn rss_mib(&self) -> f64 {
        self.vm_rss_kib as f64 / 1024.0
    }

    /// `VmHWM` in MiB.
    pub fn hwm_mib(&self) -> f64 {
        self.vm_hwm_kib as f64 / 1024.0
    }
}

/// Parses `NAME=PID`.
///
/// # Errors
/// [`RssError::BadSpec`] when it is not of that form.
pub fn parse_spec(spec: &str) -> Result<(String, u32), RssError> {
    let (name, pid) = spec
        .split_once('=')
        .ok_or_else(|| RssError::BadSpec(spec.to_owned()))?;
    let pid = pid
        .trim()
        .parse()
        .map_err(|_| RssError::BadSpec(spec.to_owned()))?;
    Ok((name.trim().to_owned(), pid))
}

fn parse_status(text: &str, path: &str) -> Result<(u64, u64), RssError> {
    let field = |name: &'static str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .ok_or(RssError::Missing {
                path: path.to_owned(),
                field: name,
            })
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = ProcessMemory::read("self", std::process::id()).unwrap();
        assert!(me.vm_rss_kib > 0);
        assert!(me.vm_hwm_kib >= me.vm_rss_kib);
    }

    #[test]
    fn parses_status_lines() {
        let text = "Name:\tx\nVmHWM:\t    2048 kB\nVmRSS:\t    1024 kB\n";
        assert_eq!(parse_status(text, "p").unwrap(), (1024, 2048));
        assert!(matches!(
            parse_status("Name:\tx\n", "p"),
            Err(RssError::Missing { .. })
        ));
    }

    #[test]
    fn specs_name_a_pid() {
        assert_eq!(parse_spec("producer=42").unwrap(), ("producer".into(), 42));
        assert!(parse_spec("producer").is_err());
        assert!(parse_spec("producer=x").is_err());
    }
}
