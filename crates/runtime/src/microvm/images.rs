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

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use sha2::{Digest, Sha256};
use tracing::info;

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
    pub fn build_kernel(&self) -> Result<PathBuf, String> {
        let out = self.kernel_path();
        if out.is_file() {
            return Ok(out);
        }
        if !self.kernel_source.is_file() {
            return Err(format!(
                "kernel source {} not found (install linux-source-6.1, see scripts/microvm-deps.sh)",
                self.kernel_source.display()
            ));
        }
        let kernel_dir = self.dir.join("kernel");
        fs::create_dir_all(&kernel_dir)
            .map_err(|e| format!("creating {}: {e}", kernel_dir.display()))?;
        let _lock = lock_exclusive(&self.dir.join("kernel.lock"))?;
        if out.is_file() {
            return Ok(out); // built by whoever held the lock
        }
        let started = std::time::Instant::now();
        info!(source = %self.kernel_source.display(), "building the guest kernel (a few minutes)");
        let work = kernel_dir.join("build");
        let _ = crate::remove_tree(&work);
        fs::create_dir_all(&work).map_err(|e| format!("creating {}: {e}", work.display()))?;
        let log_path = kernel_dir.join("build.log");
        let log =
            File::create(&log_path).map_err(|e| format!("creating {}: {e}", log_path.display()))?;
        let step = |what: &str, command: &mut Command| run_logged(what, command, &log, &log_path);
        step(
            "unpacking the kernel source",
            Command::new("tar")
                .arg("-xf")
                .arg(&self.kernel_source)
                .arg("-C")
                .arg(&work)
                .arg("--strip-components=1"),
        )?;
        fs::write(work.join("sandbox.config"), KERNEL_FRAGMENT).map_err(|e| e.to_string())?;
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
        let config = fs::read_to_string(work.join(".config")).map_err(|e| e.to_string())?;
        let missing: Vec<&str> = KERNEL_FRAGMENT
            .lines()
            .map(str::trim)
            .filter(|line| line.starts_with("CONFIG_") && line.ends_with("=y"))
            .filter(|line| !config.lines().any(|have| have.trim() == *line))
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "kernel config options did not stick (missing dependencies?): {}",
                missing.join(" ")
            ));
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
        fs::create_dir_all(out_dir).map_err(|e| e.to_string())?;
        let tmp = out_dir.join("vmlinux.tmp");
        fs::copy(work.join("vmlinux"), &tmp).map_err(|e| format!("copying vmlinux: {e}"))?;
        fs::rename(&tmp, &out).map_err(|e| format!("installing vmlinux: {e}"))?;
        let _ = crate::remove_tree(&work);
        info!(kernel = %out.display(), elapsed = ?started.elapsed(), "guest kernel built");
        Ok(out)
    }

    fn envd_hash(&self) -> Result<String, String> {
        if let Some(hash) = self.envd_hash.get() {
            return Ok(hash.clone());
        }
        let mut file = File::open(&self.envd_binary)
            .map_err(|e| format!("reading envd {}: {e}", self.envd_binary.display()))?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buffer).map_err(|e| e.to_string())?;
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
    pub fn template_dir(&self, rootfs: &Path) -> Result<PathBuf, String> {
        let template = rootfs.parent().ok_or("rootfs has no parent")?;
        let name = template
            .file_name()
            .ok_or("rootfs has no template name")?
            .to_string_lossy()
            .into_owned();
        let stamp = fs::read_to_string(template.join("stamp"))
            .map_err(|e| format!("template {name} is not built (no stamp: {e})"))?;
        let key = sha256_hex(&[
            stamp.trim().as_bytes(),
            self.envd_hash()?.as_bytes(),
            IMAGE_FORMAT.as_bytes(),
            &self.disk_bytes.to_le_bytes(),
        ]);
        Ok(self.dir.join("templates").join(name).join(key))
    }

    /// Builds `base.ext4` for a template unless cached. Blocking (seconds).
    pub fn build_template_image(&self, rootfs: &Path) -> Result<PathBuf, String> {
        let dir = self.template_dir(rootfs)?;
        let image = dir.join("base.ext4");
        if image.is_file() {
            return Ok(image);
        }
        fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let _lock = lock_exclusive(&dir.join("image.lock"))?;
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
            .map_err(|e| format!("creating {}: {e}", tmp.display()))?;
        let log_path = dir.join("image.log");
        let log = File::create(&log_path).map_err(|e| e.to_string())?;
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
        .map_err(|e| e.to_string())?;
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
        let listing = Command::new("debugfs")
            .args(["-R", &format!("stat {GUEST_ENVD}")])
            .arg(&tmp)
            .output()
            .map_err(|e| format!("running debugfs: {e}"))?;
        if !String::from_utf8_lossy(&listing.stdout).contains("Mode:  0755") {
            return Err(format!(
                "envd did not land in {} (see {})",
                tmp.display(),
                log_path.display()
            ));
        }
        fs::rename(&tmp, &image).map_err(|e| format!("installing {}: {e}", image.display()))?;
        info!(image = %image.display(), elapsed = ?started.elapsed(), "template image built");
        Ok(image)
    }
}

/// Runs a build step with its output appended to `log`; on failure the
/// error carries the log's last lines.
fn run_logged(
    what: &str,
    command: &mut Command,
    log: &File,
    log_path: &Path,
) -> Result<(), String> {
    let stdout = log.try_clone().map_err(|e| e.to_string())?;
    let stderr = log.try_clone().map_err(|e| e.to_string())?;
    let status = command
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .status()
        .map_err(|e| format!("{what}: cannot run: {e}"))?;
    if status.success() {
        return Ok(());
    }
    let text = fs::read_to_string(log_path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    Err(format!(
        "{what} failed ({status}); {}: {}",
        log_path.display(),
        lines[lines.len().saturating_sub(8)..].join(" | ")
    ))
}

/// Exclusive flock (blocking), released when the file is dropped: builds
/// by other processes sharing the images dir wait instead of colliding.
pub fn lock_exclusive(path: &Path) -> Result<File, String> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| format!("opening {}: {e}", path.display()))?;
    loop {
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(file);
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(format!("locking {}: {error}", path.display()));
        }
    }
}
