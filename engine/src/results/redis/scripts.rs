//! The Lua scripts that apply each transition atomically in one round trip
//! (`EVALSHA`, loaded on first use). Their sources live next to this file in
//! `scripts/`, each with a header describing its keys, arguments and reply.

use std::sync::LazyLock;

use redis::Script;

/// What every transition script starts with (helpers such as `rows`).
pub(super) const PRELUDE: &str = include_str!("scripts/prelude.lua");

/// One compiled copy of every script, shared by a store's calls.
pub(super) struct Scripts {
    pub create: Script,
    pub start_attempt: Script,
    pub end_attempt: Script,
    pub record_unstarted_attempt: Script,
    pub cancel: Script,
    pub reopen: Script,
    pub remove: Script,
    pub list: Script,
    pub heartbeat: Script,
    pub workers: Script,
}

/// The scripts, compiled once per process: calls borrow them for as long
/// as they queue ([`super::coalesce`]).
pub(super) fn scripts() -> &'static Scripts {
    static SCRIPTS: LazyLock<Scripts> = LazyLock::new(Scripts::new);
    &SCRIPTS
}

impl Scripts {
    fn new() -> Self {
        let with_prelude = |body: &str| Script::new(&format!("{PRELUDE}\n{body}"));
        Self {
            create: with_prelude(include_str!("scripts/create.lua")),
            start_attempt: with_prelude(include_str!("scripts/start_attempt.lua")),
            end_attempt: with_prelude(include_str!("scripts/end_attempt.lua")),
            record_unstarted_attempt: with_prelude(include_str!(
                "scripts/record_unstarted_attempt.lua"
            )),
            cancel: with_prelude(include_str!("scripts/cancel.lua")),
            reopen: with_prelude(include_str!("scripts/reopen.lua")),
            remove: Script::new(include_str!("scripts/remove.lua")),
            list: Script::new(include_str!("scripts/list.lua")),
            heartbeat: Script::new(include_str!("scripts/heartbeat.lua")),
            workers: Script::new(include_str!("scripts/workers.lua")),
        }
    }
}
