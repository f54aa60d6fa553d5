//! Per-sandbox cgroups, v1 (one directory per controller) or v2 (unified).
//!
//! Layout: `sandbox-manager/ID` under each controller (v1) or under
//! `/sys/fs/cgroup` (v2). The host side creates the group and writes the
//! limits before the launcher starts; the launcher joins it before forking so
//! every sandbox process is accounted and can be found again for destroy.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::runtime::Limits;

const CGROUP_MOUNT: &str = "/sys/fs/cgroup";
const PARENT: &str = "sandbox-manager";
/// v1 controllers we set limits in (and therefore must clean up).
const V1_CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];
const CPU_PERIOD_US: u64 = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

impl CgroupVersion {
    pub fn detect() -> io::Result<Self> {
        let root = Path::new(CGROUP_MOUNT);
        if root.join("cgroup.controllers").exists() {
            return Ok(CgroupVersion::V2);
        }
        for controller in V1_CONTROLLERS {
            if !root.join(controller).join("cgroup.procs").exists() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "neither cgroup v2 nor the v1 {controller} controller is mounted under {CGROUP_MOUNT}"
                    ),
                ));
            }
        }
        Ok(CgroupVersion::V1)
    }
}

/// Device cgroup (v1) rules: deny everything, then allow the character
/// devices the sandbox's /dev holds and its own ptys. Block devices (the
/// host's disks), /dev/mem, /dev/kmsg, /dev/kvm and friends stay denied even
/// if a node for them were to appear.
const DEVICE_ALLOW: [&str; 8] = [
    "c 1:3 rwm",   // null
    "c 1:5 rwm",   // zero
    "c 1:7 rwm",   // full
    "c 1:8 rwm",   // random
    "c 1:9 rwm",   // urandom
    "c 5:0 rwm",   // tty
    "c 5:2 rwm",   // ptmx
    "c 136:* rwm", // pts
];

/// The cgroup directories of one sandbox.
#[derive(Debug, Clone)]
pub struct SandboxCgroup {
    version: CgroupVersion,
    /// v1: `[memory, pids, cpu]` dirs; v2: the single unified dir.
    dirs: Vec<PathBuf>,
    /// v1 only, when the devices controller is mounted: joined by the
    /// sandbox's PID 1 after it has mounted its disk.
    devices: Option<PathBuf>,
    /// v1 only, when mounted: the freezer (pause) and CPU accounting
    /// (metrics) hierarchies. v2 has both in the unified dir.
    freezer: Option<PathBuf>,
    cpuacct: Option<PathBuf>,
}

/// What a sandbox's cgroup has counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupUsage {
    /// CPU time of every process, past and present, in microseconds.
    pub cpu_usec: u64,
    pub memory_bytes: u64,
}

/// Whether device access is restricted by a device cgroup on this host.
pub fn device_cgroup_available() -> Result<(), String> {
    match CgroupVersion::detect() {
        Ok(CgroupVersion::V1)
            if Path::new(CGROUP_MOUNT)
                .join("devices/devices.deny")
                .exists() =>
        {
            Ok(())
        }
        Ok(CgroupVersion::V1) => Err("the cgroup v1 devices controller is not mounted".into()),
        Ok(CgroupVersion::V2) => Err(
            "cgroup v2 host: the eBPF device program is not implemented; devices stay \
             unreachable because the user namespace cannot mknod and /dev is a nodev tmpfs \
             holding only null, zero, full, random, urandom, tty and the sandbox's own ptys"
                .into(),
        ),
        Err(e) => Err(e.to_string()),
    }
}

impl SandboxCgroup {
    pub fn for_sandbox(id: &str) -> io::Result<Self> {
        let version = CgroupVersion::detect()?;
        let root = Path::new(CGROUP_MOUNT);
        let dirs = match version {
            CgroupVersion::V2 => vec![root.join(PARENT).join(id)],
            CgroupVersion::V1 => V1_CONTROLLERS
                .iter()
                .map(|c| root.join(c).join(PARENT).join(id))
                .collect(),
        };
        let devices = (version == CgroupVersion::V1 && device_cgroup_available().is_ok())
            .then(|| root.join("devices").join(PARENT).join(id));
        let optional_v1 = |controller: &str| {
            (version == CgroupVersion::V1 && root.join(controller).join("tasks").exists())
                .then(|| root.join(controller).join(PARENT).join(id))
                // Co-mounted with `cpu` (`cpu,cpuacct`): already in `dirs`.
                .filter(|dir| !dirs.iter().any(|d| same_hierarchy(d, dir)))
        };
        let (freezer, cpuacct) = (optional_v1("freezer"), optional_v1("cpuacct"));
        Ok(Self {
            version,
            dirs,
            devices,
            freezer,
            cpuacct,
        })
    }

    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Creates the group(s) and writes the limits.
    pub fn create(&self, limits: &Limits) -> io::Result<()> {
        let memory_bytes = limits.memory_mb.saturating_mul(1024 * 1024).to_string();
        let cpu_quota = u64::from(limits.vcpus.max(1)) * CPU_PERIOD_US;
        match self.version {
            CgroupVersion::V2 => {
                let dir = &self.dirs[0];
                let parent = dir.parent().expect("cgroup dir has a parent");
                fs::create_dir_all(parent)?;
                // Controllers must be enabled in every ancestor's
                // subtree_control for the leaf to get the interface files.
                enable_v2_controllers(Path::new(CGROUP_MOUNT))?;
                enable_v2_controllers(parent)?;
                create_fresh_dir(dir)?;
                write(dir, "memory.max", &memory_bytes)?;
                // Without this, swap would let the sandbox exceed memory.max.
                write_optional(dir, "memory.swap.max", "0");
                write(dir, "pids.max", &limits.pids_max.to_string())?;
                write(dir, "cpu.max", &format!("{cpu_quota} {CPU_PERIOD_US}"))?;
            }
            CgroupVersion::V1 => {
                for dir in &self.dirs {
                    create_fresh_dir(dir)?;
                }
                let [memory, pids, cpu] = [&self.dirs[0], &self.dirs[1], &self.dirs[2]];
                write(memory, "memory.limit_in_bytes", &memory_bytes)?;
                // memsw must be >= the memory limit, hence after it.
                write_optional(memory, "memory.memsw.limit_in_bytes", &memory_bytes);
                write(pids, "pids.max", &limits.pids_max.to_string())?;
                write(cpu, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
                write(cpu, "cpu.cfs_quota_us", &cpu_quota.to_string())?;
                for extra in self.freezer.iter().chain(&self.cpuacct) {
                    create_fresh_dir(extra)?;
                }
                if let Some(devices) = &self.devices {
                    create_fresh_dir(devices)?;
                    write(devices, "devices.deny", "a")?;
                    for rule in DEVICE_ALLOW {
                        write(devices, "devices.allow", rule)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Moves `pid` (0 = the caller) into the device cgroup, where there is one.
    pub fn join_devices(&self, pid: u32) -> io::Result<()> {
        match &self.devices {
            Some(dir) => write(dir, "cgroup.procs", &pid.to_string()),
            None => Ok(()),
        }
    }

    fn all_dirs(&self) -> impl Iterator<Item = &PathBuf> {
        self.joined_dirs().chain(self.devices.iter())
    }

    fn joined_dirs(&self) -> impl Iterator<Item = &PathBuf> {
        self.dirs.iter().chain(&self.freezer).chain(&self.cpuacct)
    }

    /// Moves `pid` (0 = the calling process) into the group(s).
    pub fn join(&self, pid: u32) -> io::Result<()> {
        for dir in self.joined_dirs() {
            write(dir, "cgroup.procs", &pid.to_string())?;
        }
        Ok(())
    }

    /// Host pids of every process in the group(s).
    pub fn pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .all_dirs()
            .filter_map(|dir| fs::read_to_string(dir.join("cgroup.procs")).ok())
            .flat_map(|text| {
                text.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    pub fn exists(&self) -> bool {
        self.all_dirs().any(|d| d.exists())
    }

    /// Freezes (or thaws) every process of the group where it stands and
    /// waits until the kernel says it is done.
    pub fn set_frozen(&self, frozen: bool, timeout: Duration) -> io::Result<()> {
        let (dir, file, value, done) = match (self.version, &self.freezer) {
            (CgroupVersion::V2, _) => {
                let done = if frozen { "frozen 1" } else { "frozen 0" };
                (
                    &self.dirs[0],
                    "cgroup.freeze",
                    if frozen { "1" } else { "0" },
                    done,
                )
            }
            (CgroupVersion::V1, Some(dir)) => {
                let state = if frozen { "FROZEN" } else { "THAWED" };
                (dir, "freezer.state", state, state)
            }
            (CgroupVersion::V1, None) => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "the cgroup v1 freezer controller is not mounted on this host",
                ))
            }
        };
        write(dir, file, value)?;
        let progress = if self.version == CgroupVersion::V2 {
            "cgroup.events"
        } else {
            file
        };
        let deadline = Instant::now() + timeout;
        loop {
            let now = fs::read_to_string(dir.join(progress))?;
            if now.lines().any(|line| line.trim() == done) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{} did not reach {done:?}", dir.display()),
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// CPU time and memory the group's processes have used, where counted.
    pub fn usage(&self) -> Option<CgroupUsage> {
        let read = |dir: &Path, file: &str| fs::read_to_string(dir.join(file)).ok();
        match self.version {
            CgroupVersion::V2 => {
                let stat = read(&self.dirs[0], "cpu.stat")?;
                let cpu_usec = stat
                    .lines()
                    .find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse().ok())?;
                let memory_bytes = read(&self.dirs[0], "memory.current")?.trim().parse().ok()?;
                Some(CgroupUsage {
                    cpu_usec,
                    memory_bytes,
                })
            }
            CgroupVersion::V1 => {
                // cpuacct lives with cpu (`cpu,cpuacct`) or in its own hierarchy.
                let cpu_dir = self.cpuacct.as_ref().unwrap_or(&self.dirs[2]);
                let nanos: u64 = read(cpu_dir, "cpuacct.usage")?.trim().parse().ok()?;
                let memory_bytes = read(&self.dirs[0], "memory.usage_in_bytes")?
                    .trim()
                    .parse()
                    .ok()?;
                Some(CgroupUsage {
                    cpu_usec: nanos / 1000,
                    memory_bytes,
                })
            }
        }
    }

    /// SIGKILLs every member until the group is empty, then removes it.
    /// Succeeds if the group does not exist.
    pub fn kill_all_and_remove(&self, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        // A frozen v1 task does not die until thawed (v2 kills it anyway).
        if let Some(freezer) = &self.freezer {
            write_optional(freezer, "freezer.state", "THAWED");
        }
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            // cgroup.kill (v2, Linux 5.14+) also catches processes forked
            // while we iterate; the per-pid loop is the portable fallback.
            if self.version == CgroupVersion::V2 {
                write_optional(&self.dirs[0], "cgroup.kill", "1");
            }
            for pid in &pids {
                // SAFETY: plain kill(2); the pid came from our own cgroup.
                unsafe { libc::kill(*pid, libc::SIGKILL) };
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("processes {pids:?} survived SIGKILL"),
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        for dir in self.all_dirs() {
            // An emptied cgroup can be briefly busy while exiting tasks are
            // released; retry rmdir until the deadline.
            loop {
                match fs::remove_dir(dir) {
                    Ok(()) => {
                        debug!(cgroup = %dir.display(), "removed cgroup");
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if Instant::now() < deadline => {
                        debug!(cgroup = %dir.display(), error = %e, "cgroup busy; retrying");
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }
}

/// Whether two v1 controller paths are one hierarchy (co-mounted
/// controllers appear under several names, linked to one mount).
fn same_hierarchy(a: &Path, b: &Path) -> bool {
    let mount = |p: &Path| p.ancestors().nth(2).and_then(|m| fs::canonicalize(m).ok());
    mount(a).is_some() && mount(a) == mount(b)
}

/// A leftover group with the same id (crashed earlier run) would carry stale
/// members and limits; refuse rather than merge.
fn create_fresh_dir(dir: &Path) -> io::Result<()> {
    if let Some(parent) = dir.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::create_dir(dir)
}

fn enable_v2_controllers(dir: &Path) -> io::Result<()> {
    let wanted = ["memory", "pids", "cpu"];
    let enabled = fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    for controller in wanted {
        if enabled.split_whitespace().any(|c| c == controller) {
            continue;
        }
        write(dir, "cgroup.subtree_control", &format!("+{controller}"))?;
    }
    Ok(())
}

fn write(dir: &Path, file: &str, value: &str) -> io::Result<()> {
    let path = dir.join(file);
    fs::write(&path, value).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("writing {value:?} to {}: {e}", path.display()),
        )
    })
}

fn write_optional(dir: &Path, file: &str, value: &str) {
    let path = dir.join(file);
    if path.exists() {
        if let Err(e) = fs::write(&path, value) {
            warn!(path = %path.display(), error = %e, "optional cgroup setting failed");
        }
    }
}
