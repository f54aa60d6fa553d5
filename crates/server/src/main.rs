use clap::{Parser, Subcommand};
use sandbox_manager::config::Config;
use sandbox_manager::{app, auth, node, telemetry};
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
    /// Build and list sandbox templates (root filesystems).
    Templates {
        #[command(subcommand)]
        command: TemplatesCommand,
    },
    /// Build what the configured runtime boots from: for microVMs the guest
    /// kernel, each template's ext4 image and its snapshot (cached; rebuilt
    /// only when an input changes).
    Images {
        #[command(subcommand)]
        command: ImagesCommand,
    },
}

#[derive(Subcommand)]
enum ImagesCommand {
    /// Build everything the named templates (default: all) need.
    Build { templates: Vec<String> },
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

#[derive(Subcommand)]
enum TemplatesCommand {
    /// Build a template (a no-op when its definition is unchanged).
    Build {
        name: String,
        /// Rebuild even if it is up to date.
        #[arg(long)]
        force: bool,
    },
    /// List templates and whether they are built.
    List,
}

fn main() -> anyhow::Result<()> {
    // The sandbox launcher must run before any thread exists (it forks), so
    // it is dispatched ahead of argument parsing and the async runtime.
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(node::LAUNCHER_SUBCOMMAND) {
        sandbox_runtime::launcher_main(&args[2..]);
    }
    if args.get(1).map(String::as_str) == Some(node::RELAY_SUBCOMMAND) {
        sandbox_runtime::microvm::relay::relay_main(&args[2..]);
    }
    let cli = Cli::parse();
    let config = Config::load(cli.config.as_deref())?;
    telemetry::init(config.log.format);
    tokio::runtime::Runtime::new()?.block_on(run(cli.command, config))
}

async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
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
        Command::Images {
            command: ImagesCommand::Build { templates },
        } => {
            let catalog = node::template_catalog(&config)?;
            let runtime = node::runtime(&config).map_err(anyhow::Error::msg)?;
            println!("runtime: {}", runtime.describe());
            let names = if templates.is_empty() {
                catalog.names()
            } else {
                templates
            };
            for name in names {
                let started = std::time::Instant::now();
                node::prepare_template(&catalog, runtime.as_ref(), &name).await?;
                println!("{name}: ready ({:.1} s)", started.elapsed().as_secs_f64());
            }
            Ok(())
        }
        Command::Templates { command } => {
            let catalog = node::template_catalog(&config)?;
            match command {
                TemplatesCommand::Build { name, force } => {
                    let rootfs = catalog.build(&name, force).await?;
                    println!("{name}: {}", rootfs.display());
                }
                TemplatesCommand::List => {
                    for name in catalog.names() {
                        println!(
                            "{name}\t{:?}\t{}",
                            catalog.status(&name)?,
                            catalog.rootfs_path(&name).display()
                        );
                    }
                }
            }
            Ok(())
        }
    }
}
