//! Standalone launcher used by this crate's tests. The server embeds the same
//! entry point behind its hidden `__sandbox-launcher` subcommand.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    sandbox_runtime::launcher_main(&args)
}
