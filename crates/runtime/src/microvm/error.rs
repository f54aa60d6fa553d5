//! What can go wrong in the microVM driver, each with its cause; turned
//! into a [`RuntimeError`] at the [`crate::Runtime`] boundary.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use envd_protocol::client::EnvdError;

use super::accel::KvmUnusable;
use super::qmp::QmpError;
use crate::process::{FileError, ProcessError};
use crate::runtime::RuntimeError;

#[derive(Debug, thiserror::Error)]
pub enum MicrovmError {
    // This host cannot run microVMs as configured.
    #[error("{} cannot run ({source}); install QEMU with scripts/microvm-deps.sh", binary.display())]
    QemuUnusable {
        binary: PathBuf,
        #[source]
        source: ProcessError,
    },
    #[error("envd binary {} not found", .0.display())]
    EnvdMissing(PathBuf),
    #[error("runtime.microvm.accel = kvm but KVM is not usable: {0}")]
    KvmRequired(#[source] KvmUnusable),
    #[error("cannot enforce the VMs' egress policy: {0} (or set runtime.microvm.vm_user = \"\")")]
    EgressGuard(#[source] Box<MicrovmError>),
    #[error(
        "this node runs microVMs without an egress guard (runtime.microvm.vm_user = \"\"); \
         network.allow_out/deny_out cannot be enforced"
    )]
    NoEgressGuard,
    #[error("no egress guard (runtime.microvm.vm_user is empty)")]
    Unguarded,
    #[error(
        "{} is not searchable by other users (mode {mode:o}), so an unprivileged QEMU cannot \
         reach the snapshots in {}; put runtime.microvm.images_dir elsewhere (e.g. under \
         /var/lib) or chmod o+x that directory",
        dir.display(),
        images_dir.display()
    )]
    NotSearchable {
        dir: PathBuf,
        mode: u32,
        images_dir: PathBuf,
    },

    // The boot request itself.
    #[error("agent socket path {} is too long; use a shorter state_dir", .0.display())]
    SocketPathTooLong(PathBuf),
    #[error("sandbox {0} already exists")]
    AlreadyExists(String),
    #[error("rootfs {} is not TEMPLATES_DIR/NAME/rootfs", .0.display())]
    NotATemplate(PathBuf),
    #[error("template {name} is not built (no stamp: {source})")]
    TemplateNotBuilt {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("reading envd {}: {source}", path.display())]
    EnvdUnreadable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// What a boot needs is being built in the background.
    #[error("{what} (building in the background)")]
    Building { what: &'static str },
    #[error("{what}; the last attempt failed: {failure}")]
    BuildFailed {
        what: &'static str,
        #[source]
        failure: Arc<MicrovmError>,
    },

    // Building the kernel, a template's image or its snapshot.
    #[error(
        "kernel source {} not found (install linux-source-6.1, see scripts/microvm-deps.sh)",
        .0.display()
    )]
    KernelSourceMissing(PathBuf),
    #[error("{step}: {source}; log {}", log.display())]
    BuildStep {
        step: &'static str,
        log: PathBuf,
        #[source]
        source: ProcessError,
    },
    #[error("kernel config options did not stick (missing dependencies?): {}", .0.join(" "))]
    KernelConfig(Vec<String>),
    #[error("envd did not land in {} (see {})", image.display(), log.display())]
    EnvdNotInstalled { image: PathBuf, log: PathBuf },
    #[error("{source}; console: {console}")]
    SnapshotFailed {
        console: String,
        #[source]
        source: Box<MicrovmError>,
    },

    // One VM and its processes.
    #[error("creating the overlay {} with qemu-img: {source}", overlay.display())]
    Overlay {
        overlay: PathBuf,
        #[source]
        source: ProcessError,
    },
    #[error("starting the relay: {0}")]
    RelaySpawn(#[source] io::Error),
    #[error("the relay exited at once")]
    RelayExited,
    #[error("the relay did not start (said {0:?})")]
    RelayNotReady(String),
    #[error("QEMU failed to start: {0}")]
    QemuStart(#[source] ProcessError),
    #[error("QEMU wrote no pid file")]
    NoPidFile,
    #[error("QEMU exited right after starting")]
    QemuExitedAtOnce,
    #[error("QEMU exited during boot")]
    QemuExited,
    #[error("no {marker:?} on the console within {timeout:?}")]
    NoReadyMarker {
        marker: &'static str,
        timeout: Duration,
    },
    #[error("envd did not answer within {0:?}")]
    EnvdTimeout(Duration),
    #[error("envd init: {0}")]
    EnvdInit(#[source] EnvdError),
    #[error("claiming a VM gid: {0}")]
    GidSlot(#[source] io::Error),
    #[error("adding the system user {user}: {source}")]
    AddUser {
        user: String,
        #[source]
        source: ProcessError,
    },
    #[error("user {0} missing after useradd")]
    UserMissing(String),
    #[error("applying the egress rules (nftables, see scripts/microvm-deps.sh): {0}")]
    Nft(#[source] ProcessError),
    #[error("{source}; console: {console}")]
    BootFailed {
        id: String,
        console: String,
        #[source]
        source: Box<MicrovmError>,
    },
    #[error("destroying {id}: {source}")]
    Destroy {
        id: String,
        #[source]
        source: Box<MicrovmError>,
    },

    // Volume slots.
    #[error("{step}: {source}")]
    Layer {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("runtime.microvm.volume_slots = {0}: at most 8")]
    TooManySlots(usize),
    #[error("all {0} volume slots of this VM are in use")]
    NoFreeSlot(usize),
    #[error("no volume slot serves {0}")]
    NoSuchSlot(String),
    #[error("no agent connection to {0}")]
    NoAgent(String),

    // Shared by all of the above.
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("a blocking task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl MicrovmError {
    /// `map_err` for a file operation on `path`.
    pub(crate) fn file(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Self {
        let error = FileError::on(action, path);
        move |source| MicrovmError::File(error(source))
    }
}

impl From<MicrovmError> for RuntimeError {
    fn from(error: MicrovmError) -> Self {
        use MicrovmError as E;
        match error {
            E::QemuUnusable { .. }
            | E::EnvdMissing(_)
            | E::KvmRequired(_)
            | E::EgressGuard(_)
            | E::NoEgressGuard
            | E::TooManySlots(_) => RuntimeError::Unsupported(error.to_string()),
            E::SocketPathTooLong(_)
            | E::NotATemplate(_)
            | E::TemplateNotBuilt { .. }
            | E::EnvdUnreadable { .. } => RuntimeError::InvalidSpec(error.to_string()),
            E::AlreadyExists(id) => RuntimeError::AlreadyExists(id),
            E::Building { .. } | E::BuildFailed { .. } => RuntimeError::NotReady(error.to_string()),
            E::BootFailed { ref id, .. } => RuntimeError::BootFailed {
                id: id.clone(),
                message: error.to_string(),
            },
            E::Destroy { id, source } => RuntimeError::Destroy {
                id,
                message: source.to_string(),
            },
            E::File(FileError {
                action,
                path,
                source,
            }) => RuntimeError::Io {
                context: format!("{action} {}", path.display()),
                source,
            },
            // The steps of a boot, a build or a destroy reach the trait
            // boundary wrapped in the variants above (or as a failed
            // `prepare`); anything else keeps its chain as an i/o error.
            step => RuntimeError::io("microVM", io::Error::other(step)),
        }
    }
}
