//! Sandbox runtimes and the template root filesystems they boot from.
//!
//! - [`Runtime`]: the driver-independent trait the server uses (boot, destroy,
//!   list, liveness, envd endpoint).
//! - [`namespace`]: the namespace driver (overlayfs + Linux namespaces +
//!   cgroups, envd bind-mounted in and reached over a unix socket).
//! - [`templates`]: root filesystems built from Debian packages, cached by a
//!   hash of their definition.

pub mod namespace;
pub mod runtime;
pub mod templates;

pub use namespace::launcher::launcher_main;
pub use namespace::{LauncherCommand, NamespaceConfig, NamespaceRuntime};
pub use runtime::{BootSpec, Booted, Limits, Runtime, RuntimeError};
pub use templates::{TemplateCatalog, TemplateDef, TemplateError, TemplateStatus};
