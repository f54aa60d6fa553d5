//! Sandbox runtimes and the template root filesystems they boot from.
//!
//! - [`Runtime`]: the driver-independent trait the server uses (boot, destroy,
//!   list, liveness, envd endpoint).
//! - [`namespace`]: the namespace driver (overlayfs + Linux namespaces +
//!   cgroups, envd bind-mounted in and reached over a unix socket).
//! - [`templates`]: root filesystems built from Debian packages, cached by a
//!   hash of their definition.
//! - [`process`]: what both drivers share about the host processes they
//!   start (PID records, liveness, log tails, locks, external commands);
//!   [`slots`]: the host id ranges they hand out per sandbox.
//! - [`remove_tree`]: the recursive delete used for everything under our data
//!   and state dirs; it never crosses a mount point.
//!
//! # Wiring the namespace driver into a binary
//!
//! The launcher must be a fresh, single-threaded exec, so the binary calls
//! [`launcher_main`] from a hidden subcommand before starting tokio:
//!
//! ```no_run
//! // In the binary's `main`:
//! fn entry_point() {
//!     let args: Vec<String> = std::env::args().collect();
//!     if args.get(1).map(String::as_str) == Some("__sandbox-launcher") {
//!         sandbox_runtime::launcher_main(&args[2..]);
//!     }
//!     // ... build the tokio runtime, then:
//!     let runtime = sandbox_runtime::NamespaceRuntime::new(sandbox_runtime::NamespaceConfig {
//!         state_dir: "/var/lib/sandbox-manager/sandboxes".into(),
//!         envd_binary: "/usr/lib/sandbox-manager/envd".into(),
//!         launcher: sandbox_runtime::LauncherCommand {
//!             program: std::env::current_exe().unwrap(),
//!             args_prefix: vec!["__sandbox-launcher".into()],
//!         },
//!         uid_base: sandbox_runtime::NamespaceConfig::DEFAULT_UID_BASE,
//!         uid_slots: sandbox_runtime::NamespaceConfig::DEFAULT_UID_SLOTS,
//!     });
//! #   let _ = runtime;
//! }
//! # entry_point();
//! ```
//!
//! Call [`NamespaceRuntime::probe`] at startup for a clear error on hosts
//! that cannot run it with every protection (not root, no overlayfs, no
//! cgroups, no user namespaces or idmapped mounts, no seccomp, no loop
//! devices). On restart,
//! [`Runtime::list`] + [`Runtime::is_alive`] re-adopt running sandboxes;
//! destroy the ones that are not alive.

mod build_ns;
pub mod egress;
pub mod ext4;
pub mod microvm;
pub mod namespace;
pub mod process;
pub mod rootfs_unpack;
pub mod runtime;
pub mod safe_remove;
pub mod slots;
pub mod templates;

pub use egress::{Cidr, EgressPolicy};
pub use microvm::{Accel, AccelChoice, MicrovmConfig, MicrovmRuntime};
pub use namespace::launcher::launcher_main;
pub use namespace::{NamespaceConfig, NamespaceRuntime};
pub use process::LauncherCommand;
pub use runtime::{BootSpec, Booted, HostUsage, Limits, Runtime, RuntimeError};
pub use safe_remove::{remove_tree, MountPointsLeft};
pub use templates::{TemplateCatalog, TemplateDef, TemplateError, TemplateStatus};
