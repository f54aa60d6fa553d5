//! Templates: root filesystems built reproducibly from Debian packages.
//!
//! A template is defined by `DEFINITIONS_DIR/NAME.toml` and built into
//! `TEMPLATES_DIR/NAME/rootfs`. `TEMPLATES_DIR/NAME/stamp` holds a hash of the
//! definition the rootfs was built from, so an unchanged definition is never
//! rebuilt and a changed one is. Builds are serialised across processes with
//! an exclusive `flock` on `TEMPLATES_DIR/NAME.lock`.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::process::Command;
use tracing::{debug, error, info, warn};

use crate::build_ns;
use crate::process::{self, FileLock, ProcessError};
use crate::runtime::Limits;
use crate::safe_remove::{remove_tree, MountPointsLeft};

/// Bump when the build recipe (post-processing below) changes, so existing
/// rootfs directories become stale and are rebuilt.
const RECIPE_VERSION: &str = "1";

/// The unprivileged user every template contains; envd runs requests as it.
pub const SANDBOX_USER: &str = "user";
pub const SANDBOX_UID: u32 = 1000;

/// One template definition (`config/templates/NAME.toml`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateDef {
    /// Taken from the file name, not the file.
    #[serde(skip)]
    pub name: String,
    pub suite: String,
    pub mirror: String,
    #[serde(default)]
    pub packages: Vec<String>,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u64,
    #[serde(default = "default_pids_max")]
    pub pids_max: u64,
    /// Disk quota of each sandbox (namespace runtime: a sparse image).
    #[serde(default = "default_disk_gib")]
    pub disk_gib: u64,
}

fn default_vcpus() -> u32 {
    1
}
fn default_memory_mb() -> u64 {
    512
}
fn default_pids_max() -> u64 {
    512
}
fn default_disk_gib() -> u64 {
    16
}

impl TemplateDef {
    /// Parses a definition; `name` is the template name (file stem).
    pub fn parse(name: &str, text: &str) -> Result<Self, TemplateError> {
        let mut def: TemplateDef = toml::from_str(text).map_err(|e| TemplateError::Definition {
            name: name.to_string(),
            message: e.to_string(),
        })?;
        def.name = name.to_string();
        Ok(def)
    }

    /// Hash of everything that affects the built rootfs (limits do not).
    pub fn content_hash(&self) -> String {
        let mut packages = self.packages.clone();
        packages.sort();
        packages.dedup();
        let canonical = format!(
            "recipe={RECIPE_VERSION}\nsuite={}\nmirror={}\npackages={}\n",
            self.suite,
            self.mirror,
            packages.join(",")
        );
        hex::encode(Sha256::digest(canonical.as_bytes()))
    }

    pub fn limits(&self) -> Limits {
        Limits {
            vcpus: self.vcpus,
            memory_mb: self.memory_mb,
            pids_max: self.pids_max,
            disk_mib: self.disk_gib.saturating_mul(1024),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateStatus {
    /// Never built.
    Missing,
    /// Some process holds the build lock right now.
    Building,
    /// Built from the current definition.
    Ready,
    /// Built, but from a different definition (or recipe).
    Stale,
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("unknown template {0:?}")]
    Unknown(String),
    #[error("invalid template definition {name:?}: {message}")]
    Definition { name: String, message: String },
    #[error("neither mmdebstrap nor debootstrap is installed")]
    NoBootstrapTool,
    #[error("building template {name:?} failed: {source}")]
    Build {
        name: String,
        #[source]
        source: ProcessError,
    },
    #[error(transparent)]
    Lock(ProcessError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> TemplateError {
    let context = context.into();
    move |source| TemplateError::Io { context, source }
}

/// All known template definitions plus where their builds live.
#[derive(Debug, Clone)]
pub struct TemplateCatalog {
    definitions: BTreeMap<String, TemplateDef>,
    templates_dir: PathBuf,
}

impl TemplateCatalog {
    /// Reads every `*.toml` in `definitions_dir`.
    pub fn load(
        definitions_dir: impl AsRef<Path>,
        templates_dir: impl Into<PathBuf>,
    ) -> Result<Self, TemplateError> {
        let definitions_dir = definitions_dir.as_ref();
        let mut definitions = BTreeMap::new();
        let entries = fs::read_dir(definitions_dir)
            .map_err(io_err(format!("reading {}", definitions_dir.display())))?;
        for entry in entries {
            let path = entry
                .map_err(io_err(format!("reading {}", definitions_dir.display())))?
                .path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            if !is_valid_name(name) {
                warn!(path = %path.display(), "skipping template with an invalid name");
                continue;
            }
            let text =
                fs::read_to_string(&path).map_err(io_err(format!("reading {}", path.display())))?;
            definitions.insert(name.to_string(), TemplateDef::parse(name, &text)?);
        }
        Ok(Self::from_definitions(
            definitions.into_values(),
            templates_dir,
        ))
    }

    /// A catalog from in-memory definitions (tests, embedding).
    pub fn from_definitions(
        definitions: impl IntoIterator<Item = TemplateDef>,
        templates_dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            definitions: definitions
                .into_iter()
                .map(|d| (d.name.clone(), d))
                .collect(),
            templates_dir: templates_dir.into(),
        }
    }

    pub fn names(&self) -> Vec<String> {
        self.definitions.keys().cloned().collect()
    }

    pub fn get(&self, name: &str) -> Option<&TemplateDef> {
        self.definitions.get(name)
    }

    pub fn templates_dir(&self) -> &Path {
        &self.templates_dir
    }

    /// Where the template's root filesystem is (or will be) built.
    pub fn rootfs_path(&self, name: &str) -> PathBuf {
        self.templates_dir.join(name).join("rootfs")
    }

    fn stamp_path(&self, name: &str) -> PathBuf {
        self.templates_dir.join(name).join("stamp")
    }

    fn lock_path(&self, name: &str) -> PathBuf {
        self.templates_dir.join(format!("{name}.lock"))
    }

    pub fn status(&self, name: &str) -> Result<TemplateStatus, TemplateError> {
        let def = self.known(name)?;
        let built = self.built_status(def);
        // Ready is trustworthy even while someone holds the lock (a build
        // removes the stamp before touching the rootfs); the lock is also
        // held briefly by no-op builds, which must not read as Building.
        if built == TemplateStatus::Ready {
            return Ok(built);
        }
        if let Ok(None) = FileLock::try_acquire(&self.lock_path(name)) {
            return Ok(TemplateStatus::Building);
        }
        Ok(built)
    }

    fn built_status(&self, def: &TemplateDef) -> TemplateStatus {
        if !self.rootfs_path(&def.name).is_dir() {
            return TemplateStatus::Missing;
        }
        match fs::read_to_string(self.stamp_path(&def.name)) {
            Ok(stamp) if stamp.trim() == def.content_hash() => TemplateStatus::Ready,
            _ => TemplateStatus::Stale,
        }
    }

    fn known(&self, name: &str) -> Result<&TemplateDef, TemplateError> {
        self.get(name)
            .ok_or_else(|| TemplateError::Unknown(name.to_string()))
    }

    /// Builds the template if it is missing or stale.
    pub async fn ensure_built(&self, name: &str) -> Result<PathBuf, TemplateError> {
        self.build(name, false).await
    }

    /// Builds the template's rootfs (a no-op if it is already built from the
    /// current definition, unless `force`). Returns the rootfs path.
    pub async fn build(&self, name: &str, force: bool) -> Result<PathBuf, TemplateError> {
        let def = self.known(name)?.clone();
        let template_dir = self.templates_dir.join(name);
        fs::create_dir_all(&template_dir)
            .map_err(io_err(format!("creating {}", template_dir.display())))?;

        // Held until the end of this function; concurrent builders (other
        // processes included) wait here, then usually find the result cached.
        let _lock = acquire_lock(self.lock_path(name)).await?;

        let rootfs = self.rootfs_path(name);
        if !force && self.built_status(&def) == TemplateStatus::Ready {
            debug!(template = name, "template is up to date");
            return Ok(rootfs);
        }
        remove_leftovers(&template_dir)?;

        let started = std::time::Instant::now();
        let staging = template_dir.join(format!("rootfs.tmp-{}", std::process::id()));
        info!(template = name, suite = %def.suite, packages = ?def.packages, "building template");
        bootstrap(&def, &staging).await?;
        customize_rootfs(&def, &staging).await?;

        // Swap into place: stamp removed first so a crash mid-swap reads as
        // Missing/Stale, never as Ready with the wrong contents.
        let stamp = self.stamp_path(name);
        let _ = fs::remove_file(&stamp);
        let retired = template_dir.join(format!("rootfs.old-{}", std::process::id()));
        if rootfs.exists() {
            fs::rename(&rootfs, &retired).map_err(io_err("retiring the old rootfs"))?;
        }
        fs::rename(&staging, &rootfs).map_err(io_err("moving the new rootfs into place"))?;
        let stamp_tmp = template_dir.join("stamp.tmp");
        fs::write(&stamp_tmp, def.content_hash()).map_err(io_err("writing the stamp"))?;
        fs::rename(&stamp_tmp, &stamp).map_err(io_err("writing the stamp"))?;
        if retired.exists() {
            remove_tree_in_background(&retired).await?;
        }
        info!(template = name, elapsed = ?started.elapsed(), rootfs = %rootfs.display(), "template built");
        Ok(rootfs)
    }
}

fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Exclusive flock, taken on a blocking thread (it may wait minutes for
/// another process's build). Released when the returned lock is dropped.
async fn acquire_lock(path: PathBuf) -> Result<FileLock, TemplateError> {
    tokio::task::spawn_blocking(move || match FileLock::try_acquire(&path)? {
        Some(lock) => Ok(lock),
        None => {
            info!(lock = %path.display(), "template is being built elsewhere; waiting");
            FileLock::acquire(&path)
        }
    })
    .await
    .expect("lock task panicked")
    .map_err(TemplateError::Lock)
}

/// Staging/retired trees left by a build that crashed (we hold the lock, so
/// nobody else is using them). A mount point found in one (a build by an
/// older version, which mounted in the host namespace) is left alone and
/// logged: deleting through it would delete the host's files.
fn remove_leftovers(template_dir: &Path) -> Result<(), TemplateError> {
    let entries = fs::read_dir(template_dir)
        .map_err(io_err(format!("reading {}", template_dir.display())))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("rootfs.tmp-") || name.starts_with("rootfs.old-") {
            let path = entry.path();
            warn!(path = %path.display(), "removing leftover from an interrupted build");
            match remove_tree(&path) {
                Ok(()) => {}
                Err(e) if MountPointsLeft::in_error(&e).is_some() => {
                    // The new build uses a fresh staging dir, so go on.
                    error!(path = %path.display(), error = %e, "leftover build dir still has mounts; left in place");
                }
                Err(e) => return Err(io_err(format!("removing {}", path.display()))(e)),
            }
        }
    }
    Ok(())
}

async fn remove_tree_in_background(path: &Path) -> Result<(), TemplateError> {
    let owned = path.to_path_buf();
    tokio::task::spawn_blocking(move || remove_tree(&owned))
        .await
        .expect("remove task panicked")
        .map_err(io_err(format!("removing {}", path.display())))
}

pub(crate) fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// Runs mmdebstrap (preferred: fast, no leftover state) or debootstrap.
async fn bootstrap(def: &TemplateDef, target: &Path) -> Result<(), TemplateError> {
    let include = def.packages.join(",");
    let mut command = if let Some(mmdebstrap) = find_in_path("mmdebstrap") {
        let mut c = Command::new(mmdebstrap);
        c.args(["--variant=minbase", "--mode=root", "--quiet"]);
        if !include.is_empty() {
            c.arg(format!("--include={include}"));
        }
        c
    } else if let Some(debootstrap) = find_in_path("debootstrap") {
        let mut c = Command::new(debootstrap);
        c.arg("--variant=minbase");
        if !include.is_empty() {
            c.arg(format!("--include={include}"));
        }
        c
    } else {
        return Err(TemplateError::NoBootstrapTool);
    };
    command
        .arg(&def.suite)
        .arg(target)
        .arg(&def.mirror)
        .stdin(std::process::Stdio::null());
    run_checked(&def.name, command).await
}

/// Post-processing every template gets: the sandbox user and the mount
/// points the namespace driver needs.
async fn customize_rootfs(def: &TemplateDef, rootfs: &Path) -> Result<(), TemplateError> {
    let uid = SANDBOX_UID.to_string();
    let mut groupadd = Command::new("chroot");
    groupadd
        .arg(rootfs)
        .args(["groupadd", "-g", &uid, SANDBOX_USER]);
    run_checked(&def.name, groupadd).await?;
    let mut useradd = Command::new("chroot");
    useradd.arg(rootfs).args([
        "useradd",
        "-m",
        "-u",
        &uid,
        "-g",
        &uid,
        "-s",
        "/bin/bash",
        SANDBOX_USER,
    ]);
    run_checked(&def.name, useradd).await?;

    for dir in [".envd", ".oldroot"] {
        let path = rootfs.join(dir);
        fs::create_dir_all(&path).map_err(io_err(format!("creating {}", path.display())))?;
    }
    // Present in the image so the sandbox has a sane hostname file; the real
    // hostname is set per sandbox via the UTS namespace.
    fs::write(rootfs.join("etc/hostname"), "sandbox\n").map_err(io_err("writing /etc/hostname"))?;
    Ok(())
}

/// Installs Debian `packages` into `rootfs` (a private copy of a template)
/// with the copy's own apt, chrooted, in private mount and PID namespaces
/// (`build_ns`): for custom template builds on runtimes whose sandboxes
/// have no network. Package names must already be validated; apt fetches
/// them from the template's mirror and runs their maintainer scripts. The
/// chroot gets a fresh proc (of its own PID namespace) and a minimal /dev,
/// never the host's. Returns apt's output.
pub async fn install_packages(rootfs: &Path, packages: &[String]) -> Result<String, TemplateError> {
    const SCRIPT: &str = r#"set -eu
root=$1; shift
mount -t proc proc "$root/proc"
mount -t tmpfs -o mode=0755,nosuid tmpfs "$root/dev"
for node in null:1:3 zero:1:5 full:1:7 random:1:8 urandom:1:9 tty:5:0; do
  name=${node%%:*}; numbers=${node#*:}
  mknod -m 0666 "$root/dev/$name" c "${numbers%%:*}" "${numbers#*:}"
done
resolv="$root/etc/resolv.conf"
[ -e "$resolv" ] || [ -L "$resolv" ] && mv "$resolv" "$resolv.build-saved"
cp /etc/resolv.conf "$resolv"
status=0
chroot "$root" /bin/sh -c 'apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" && apt-get clean && rm -rf /var/lib/apt/lists/*' apt "$@" 2>&1 || status=$?
rm -f "$resolv"
[ -e "$resolv.build-saved" ] || [ -L "$resolv.build-saved" ] && mv "$resolv.build-saved" "$resolv"
exit $status
"#;
    let mut command = Command::new("/bin/bash");
    command
        .arg("-c")
        .arg(SCRIPT)
        .arg("install-packages")
        .arg(rootfs)
        .args(packages)
        .stdin(std::process::Stdio::null());
    build_ns::isolate(&mut command);
    let output = process::output_async(&mut command)
        .await
        .map_err(|source| TemplateError::Build {
            name: rootfs.display().to_string(),
            source,
        })?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Copies a built template's root filesystem to `dest` (which must not
/// exist), keeping owners, modes and links (`cp -a`, reflinked where the
/// filesystem can).
pub async fn copy_rootfs(source: &Path, dest: &Path) -> Result<(), TemplateError> {
    let mut command = Command::new("cp");
    command
        .args(["-a", "--reflink=auto"])
        .arg(source)
        .arg(dest)
        .stdin(std::process::Stdio::null());
    process::output_async(&mut command)
        .await
        .map(drop)
        .map_err(|source| TemplateError::Build {
            name: dest.display().to_string(),
            source,
        })
}

/// Runs a build step in its own mount and PID namespaces (see `build_ns`:
/// its mounts never reach the host, and it dies with the server).
async fn run_checked(template: &str, mut command: Command) -> Result<(), TemplateError> {
    build_ns::isolate(&mut command);
    debug!(template, command = ?command.as_std(), "running");
    process::output_async(&mut command)
        .await
        .map(drop)
        .map_err(|source| TemplateError::Build {
            name: template.to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(packages: &[&str]) -> TemplateDef {
        TemplateDef {
            name: "t".into(),
            suite: "bookworm".into(),
            mirror: "http://deb.debian.org/debian".into(),
            packages: packages.iter().map(|s| s.to_string()).collect(),
            vcpus: 1,
            memory_mb: 256,
            pids_max: 128,
            disk_gib: 1,
        }
    }

    #[test]
    fn hash_ignores_package_order_and_limits_but_not_contents() {
        let a = def(&["bash", "curl"]);
        let mut b = def(&["curl", "bash"]);
        b.memory_mb = 4096;
        assert_eq!(a.content_hash(), b.content_hash());
        assert_ne!(a.content_hash(), def(&["bash"]).content_hash());
    }

    #[test]
    fn loads_the_shipped_definitions() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/templates");
        let catalog = TemplateCatalog::load(&dir, "/nonexistent").unwrap();
        assert_eq!(
            catalog.names(),
            vec!["base".to_string(), "python".to_string()]
        );
        let python = catalog.get("python").unwrap();
        assert!(python.packages.iter().any(|p| p == "python3"));
        for name in catalog.names() {
            let packages = &catalog.get(&name).unwrap().packages;
            for needed in [
                "bash",
                "coreutils",
                "curl",
                "tar",
                "gzip",
                "ca-certificates",
            ] {
                assert!(
                    packages.iter().any(|p| p == needed),
                    "{name} lacks {needed}"
                );
            }
        }
    }

    #[test]
    fn status_reflects_stamp_and_unknown_is_typed() {
        let tmp = tempfile::tempdir().unwrap();
        let catalog = TemplateCatalog::from_definitions([def(&["bash"])], tmp.path());
        assert_eq!(catalog.status("t").unwrap(), TemplateStatus::Missing);

        // Another open file description holding the lock reads as Building
        // unless the template is already Ready.
        let held = FileLock::acquire(&catalog.lock_path("t")).unwrap();
        assert_eq!(catalog.status("t").unwrap(), TemplateStatus::Building);
        drop(held);

        fs::create_dir_all(catalog.rootfs_path("t")).unwrap();
        assert_eq!(catalog.status("t").unwrap(), TemplateStatus::Stale);
        fs::write(catalog.stamp_path("t"), def(&["bash"]).content_hash()).unwrap();
        assert_eq!(catalog.status("t").unwrap(), TemplateStatus::Ready);
        let held = FileLock::acquire(&catalog.lock_path("t")).unwrap();
        assert_eq!(catalog.status("t").unwrap(), TemplateStatus::Ready);
        drop(held);

        assert!(matches!(
            catalog.status("nope"),
            Err(TemplateError::Unknown(n)) if n == "nope"
        ));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert!(matches!(
            rt.block_on(catalog.build("nope", false)),
            Err(TemplateError::Unknown(_))
        ));
        // Cached: Ready means build does not run any tool.
        assert_eq!(
            rt.block_on(catalog.build("t", false)).unwrap(),
            catalog.rootfs_path("t")
        );
    }
}
