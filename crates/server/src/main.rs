use clap::{Parser, Subcommand};
use sandbox_manager::config::Config;
use sandbox_manager::{app, auth, telemetry};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "sandbox-manager",
    version,
    about = "Disposable, isolated Linux sandboxes over HTTP"
)]
struct Cli {
    /// Configuration file layered over the built-in defaults.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP API.
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create an API key (and the owner, if new). The key is printed once,
    /// alone on the last line; only its hash is stored.
    Create {
        #[arg(long)]
        owner: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::load(cli.config.as_deref())?;
    telemetry::init(config.log.format);
    match cli.command {
        Command::Serve => app::serve(config).await,
        Command::Migrate => {
            let store = app::open_store(&config).await?;
            println!("migrations applied ({})", store.backend());
            Ok(())
        }
        Command::Keys {
            command: KeysCommand::Create { owner },
        } => {
            let store = app::open_store(&config).await?;
            let (owner, key) = auth::create_key(store.as_ref(), &owner).await?;
            println!("owner {} ({})", owner.name, owner.id);
            println!("{key}");
            Ok(())
        }
    }
}
