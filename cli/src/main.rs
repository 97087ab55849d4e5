//! The `claudecluster` command; see the library for the subcommands.

fn main() -> std::process::ExitCode {
    claudecluster::main()
}
