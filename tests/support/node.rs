//! The `claudecluster` command, built inside the test package so tests can
//! run it as a process (`CARGO_BIN_EXE_cc-e2e-node`) and kill it.

fn main() -> std::process::ExitCode {
    claudecluster::main()
}
