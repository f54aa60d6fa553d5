//! Guest images, built once and cached by a hash of their inputs:
//! - the kernel: Debian's `linux-source-6.1` with `make tinyconfig` plus
//!   `config/microvm/kernel.config`, built as an uncompressed `vmlinux`
//!   that QEMU boots directly through PVH (no bootloader, no initramfs);
//! - per template, `base.ext4`: the template's root directory as an ext4
//!   image (`mkfs.ext4 -d`, no mounting) with envd as `/usr/local/sbin/envd`.
//!
//! Layout under `images_dir`:
//! - `kernel/KEY/vmlinux`, `kernel/build.log`, `kernel.lock`;
//! - `templates/NAME/KEY/base.ext4` (+ the template's snapshots beside it).

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use sha2::{Digest, Sha256};
use tracing::info;

use super::MicrovmError;
use crate::process::{self, FileLock};

/// Applied on top of `make tinyconfig`.
pub const KERNEL_FRAGMENT: &str = include_str!("../../../../config/microvm/kernel.config");
/// Bump when the image layout changes, so cached images are rebuilt.
const IMAGE_FORMAT: &str = "envd-init-1";
/// Where envd lives inside the guest; the kernel starts it as init.
pub const GUEST_ENVD: &str = "/usr/local/sbin/envd";

pub struct Images {
    dir: PathBuf,
    kernel_source: PathBuf,
    envd_binary: PathBuf,
    disk_bytes: u64,
    envd_hash: OnceLock<String>,
}

fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hex::encode(&hasher.finalize()[..8])
}

pub fn short_hash(bytes: &[u8]) -> String {
    sha256_hex(&[bytes])
}

impl Images {
    pub fn new(
        dir: PathBuf,
        kernel_source: PathBuf,
        envd_binary: PathBuf,
        disk_bytes: u64,
    ) -> Self {
        Self {
            dir,
            kernel_source,
            envd_binary,
            disk_bytes,
            envd_hash: OnceLock::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn kernel_key(&self) -> String {
        let source = fs::metadata(&self.kernel_source)
            .map(|m| m.len())
            .unwrap_or(0);
        sha256_hex(&[
            KERNEL_FRAGMENT.as_bytes(),
            self.kernel_source.as_os_str().as_encoded_bytes(),
            &source.to_le_bytes(),
        ])
    }

    pub fn kernel_path(&self) -> PathBuf {
        self.dir
            .join("kernel")
            .join(self.kernel_key())
            .join("vmlinux")
    }

    /// Builds the kernel unless it is cached. Blocking (minutes).
    pub fn build_kernel(&self) -> Result<PathBuf, MicrovmError> {
        let out = self.kernel_path();
        if out.is_file() {
            return Ok(out);
        }
        if !self.kernel_source.is_file() {
            return Err(MicrovmError::KernelSourceMissing(
                self.kernel_source.clone(),
            ));
        }
        let kernel_dir = self.dir.join("kernel");
        fs::create_dir_all(&kernel_dir).map_err(MicrovmError::file("creating", &kernel_dir))?;
        let _lock = FileLock::acquire(&self.dir.join("kernel.lock"))?;
        if out.is_file() {
            return Ok(out); // built by whoever held the lock
        }
        let started = std::time::Instant::now();
        info!(source = %self.kernel_source.display(), "building the guest kernel (a few minutes)");
        let work = kernel_dir.join("build");
        let _ = crate::remove_tree(&work);
        fs::create_dir_all(&work).map_err(MicrovmError::file("creating", &work))?;
        let log_path = kernel_dir.join("build.log");
        let log = File::create(&log_path).map_err(MicrovmError::file("creating", &log_path))?;
        let step = |what, command: &mut Command| run_logged(what, command, &log, &log_path);
        step(
            "unpacking the kernel source",
            Command::new("tar")
                .arg("-xf")
                .arg(&self.kernel_source)
                .arg("-C")
                .arg(&work)
                .arg("--strip-components=1"),
        )?;
        let fragment = work.join("sandbox.config");
        fs::write(&fragment, KERNEL_FRAGMENT).map_err(MicrovmError::file("writing", &fragment))?;
        step(
            "make tinyconfig",
            Command::new("make").current_dir(&work).arg("tinyconfig"),
        )?;
        step(
            "merging config/microvm/kernel.config",
            Command::new("scripts/kconfig/merge_config.sh")
                .current_dir(&work)
                .args(["-m", ".config", "sandbox.config"]),
        )?;
        step(
            "make olddefconfig",
            Command::new("make").current_dir(&work).arg("olddefconfig"),
        )?;
        let config_path = work.join(".config");
        let config = fs::read_to_string(&config_path)
            .map_err(MicrovmError::file("reading", &config_path))?;
        let missing: Vec<String> = KERNEL_FRAGMENT
            .lines()
            .map(str::trim)
            .filter(|line| line.starts_with("CONFIG_") && line.ends_with("=y"))
            .filter(|line| !config.lines().any(|have| have.trim() == *line))
            .map(str::to_string)
            .collect();
        if !missing.is_empty() {
            return Err(MicrovmError::KernelConfig(missing));
        }
        let jobs = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        step(
            "make vmlinux",
            Command::new("make")
                .current_dir(&work)
                .arg(format!("-j{jobs}"))
                .arg("vmlinux"),
        )?;
        let out_dir = out.parent().expect("kernel path has a parent");
        fs::create_dir_all(out_dir).map_err(MicrovmError::file("creating", out_dir))?;
        let tmp = out_dir.join("vmlinux.tmp");
        fs::copy(work.join("vmlinux"), &tmp)
            .map_err(MicrovmError::file("copying vmlinux to", &tmp))?;
        fs::rename(&tmp, &out).map_err(MicrovmError::file("installing", &out))?;
        let _ = crate::remove_tree(&work);
        info!(kernel = %out.display(), elapsed = ?started.elapsed(), "guest kernel built");
        Ok(out)
    }

    fn envd_hash(&self) -> Result<String, MicrovmError> {
        if let Some(hash) = self.envd_hash.get() {
            return Ok(hash.clone());
        }
        let unreadable = |source| MicrovmError::EnvdUnreadable {
            path: self.envd_binary.clone(),
            source,
        };
        let mut file = File::open(&self.envd_binary).map_err(unreadable)?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buffer).map_err(unreadable)?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
        }
        let hash = hex::encode(&hasher.finalize()[..8]);
        Ok(self.envd_hash.get_or_init(|| hash).clone())
    }

    /// `templates/NAME/KEY/` for a template rootfs (`TEMPLATES_DIR/NAME/rootfs`,
    /// whose `stamp` beside it names the exact build).
    pub fn template_dir(&self, rootfs: &Path) -> Result<PathBuf, MicrovmError> {
        let not_a_template = || MicrovmError::NotATemplate(rootfs.to_path_buf());
        let template = rootfs.parent().ok_or_else(not_a_template)?;
        let name = template
            .file_name()
            .ok_or_else(not_a_template)?
            .to_string_lossy()
            .into_owned();
        let stamp = fs::read_to_string(template.join("stamp")).map_err(|source| {
            MicrovmError::TemplateNotBuilt {
                name: name.clone(),
                source,
            }
        })?;
        let key = sha256_hex(&[
            stamp.trim().as_bytes(),
            self.envd_hash()?.as_bytes(),
            IMAGE_FORMAT.as_bytes(),
            &self.disk_bytes.to_le_bytes(),
        ]);
        Ok(self.dir.join("templates").join(name).join(key))
    }

    /// Builds `base.ext4` for a template unless cached. Blocking (seconds).
    pub fn build_template_image(&self, rootfs: &Path) -> Result<PathBuf, MicrovmError> {
        let dir = self.template_dir(rootfs)?;
        let image = dir.join("base.ext4");
        if image.is_file() {
            return Ok(image);
        }
        fs::create_dir_all(&dir).map_err(MicrovmError::file("creating", &dir))?;
        let _lock = FileLock::acquire(&dir.join("image.lock"))?;
        if image.is_file() {
            return Ok(image);
        }
        let started = std::time::Instant::now();
        let tmp = dir.join("base.ext4.tmp");
        let _ = fs::remove_file(&tmp);
        // Sparse: the image only takes the space its files use; the guest
        // sees the full size for its own writes and hydrated volumes.
        File::create(&tmp)
            .and_then(|f| f.set_len(self.disk_bytes))
            .map_err(MicrovmError::file("creating", &tmp))?;
        let log_path = dir.join("image.log");
        let log = File::create(&log_path).map_err(MicrovmError::file("creating", &log_path))?;
        run_logged(
            "mkfs.ext4 -d",
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-L", "sandbox-root"])
                // No journal: a sandbox disk never outlives its VM, so crash
                // consistency buys nothing and the journal costs writes.
                .args([
                    "-O",
                    "^has_journal",
                    "-E",
                    "lazy_itable_init=1,root_owner=0:0",
                ])
                .arg("-d")
                .arg(rootfs)
                .arg(&tmp),
            &log,
            &log_path,
        )?;
        let script = dir.join("debugfs.cmds");
        fs::write(
            &script,
            format!(
                "mkdir /usr/local\nmkdir /usr/local/sbin\nwrite {envd} {GUEST_ENVD}\n\
                 sif {GUEST_ENVD} mode 0100755\nsif {GUEST_ENVD} uid 0\nsif {GUEST_ENVD} gid 0\n",
                envd = self.envd_binary.display()
            ),
        )
        .map_err(MicrovmError::file("writing", &script))?;
        run_logged(
            "debugfs (installing envd)",
            Command::new("debugfs")
                .arg("-w")
                .arg("-f")
                .arg(&script)
                .arg(&tmp),
            &log,
            &log_path,
        )?;
        let listing = process::output(
            Command::new("debugfs")
                .args(["-R", &format!("stat {GUEST_ENVD}")])
                .arg(&tmp),
        )?;
        if !String::from_utf8_lossy(&listing.stdout).contains("Mode:  0755") {
            return Err(MicrovmError::EnvdNotInstalled {
                image: tmp,
                log: log_path,
            });
        }
        fs::rename(&tmp, &image).map_err(MicrovmError::file("installing", &image))?;
        info!(image = %image.display(), elapsed = ?started.elapsed(), "template image built");
        Ok(image)
    }
}

/// Runs a build step with its output appended to `log`; on failure the
/// error carries the log's last lines.
fn run_logged(
    step: &'static str,
    command: &mut Command,
    log: &File,
    log_path: &Path,
) -> Result<(), MicrovmError> {
    process::run_logged(command, log, log_path).map_err(|source| MicrovmError::BuildStep {
        step,
        log: log_path.to_path_buf(),
        source,
    })
}
