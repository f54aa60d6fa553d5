//! What the namespace driver enforces on this host, checked once at start.
//!
//! Required (the driver refuses to run without them, so it is never weaker
//! than it says): root, overlayfs, cgroups, user namespaces with idmapped
//! mounts, seccomp filters, loop devices and mkfs.ext4 for the disk quota.
//! Optional and reported: the device cgroup (cgroup v1 only; on a v2 host
//! devices stay unreachable through the user namespace and the nodev /dev).

use std::fs;
use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

use super::cgroups::{self, CgroupVersion};
use super::{caps, disk, seccomp, NamespaceConfig};
use crate::process::{self, ProcessError};
use crate::runtime::RuntimeError;

/// The launcher flag that only tests idmapped mounts on a path.
pub const PROBE_IDMAP_FLAG: &str = "--probe-idmap";

#[derive(Debug, Clone)]
pub struct Protections {
    pub cgroup_version: CgroupVersion,
    /// `Err(why)` where the host has no device cgroup we can use.
    pub device_cgroup: Result<(), String>,
    pub uid_base: u32,
    pub uid_slots: u32,
}

impl Protections {
    pub fn to_json(&self) -> Value {
        let capabilities: Vec<&str> = caps::KEPT.iter().map(|(_, name)| *name).collect();
        let devices = match &self.device_cgroup {
            Ok(()) => json!(
                "cgroup v1 device allow-list (null, zero, full, random, urandom, tty, ptmx, pts)"
            ),
            Err(why) => json!({ "missing": why }),
        };
        json!({
            "user_namespace": format!(
                "a host id range of 65536 per sandbox from {} ({} slots); root inside is an unprivileged id outside",
                self.uid_base, self.uid_slots
            ),
            "template_ownership": "idmapped read-only mount of the template (no copy, no chown)",
            "capabilities": capabilities,
            "no_new_privs": true,
            "seccomp": format!(
                "{} syscalls denied (EPERM), clone with namespace flags denied, clone3 ENOSYS",
                seccomp::DENIED.len()
            ),
            "mounts": "owned by the host user namespace: the sandbox cannot mount, unmount or remount; agent binary a read-only private copy",
            "proc_sys": "/proc/sys, sysrq-trigger, irq, bus, fs read-only; kcore, keys, timer_list, sched_debug masked; /sys read-only",
            "devices": devices,
            "disk_quota": "per-sandbox ext4 image of the template's disk_gib (ENOSPC past it)",
            "pids_limit": true,
            "cgroup": match self.cgroup_version { CgroupVersion::V1 => "v1", CgroupVersion::V2 => "v2" },
            "network": "loopback only: namespace sandboxes have no outbound network",
        })
    }
}

/// Checks every required protection; the first missing one is the error.
pub fn probe(config: &NamespaceConfig) -> Result<Protections, RuntimeError> {
    let unsupported = |why: String| RuntimeError::Unsupported(why);
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        return Err(unsupported(
            "the namespace runtime needs root (it mounts overlayfs, creates cgroups and \
             namespaces, and maps each sandbox's root to an unprivileged host id)"
                .into(),
        ));
    }
    let filesystems = fs::read_to_string("/proc/filesystems")
        .map_err(|e| RuntimeError::io("reading /proc/filesystems", e))?;
    if !filesystems.lines().any(|l| l.ends_with("\toverlay")) {
        return Err(unsupported(
            "the kernel has no overlayfs (try `modprobe overlay`)".into(),
        ));
    }
    let cgroup_version = CgroupVersion::detect().map_err(|e| unsupported(e.to_string()))?;
    let max_userns: u64 = fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if max_userns == 0 {
        return Err(unsupported(
            "user namespaces are disabled (user.max_user_namespaces = 0 or no CONFIG_USER_NS): \
             without them a sandbox's root would be host root"
                .into(),
        ));
    }
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    if !status.lines().any(|l| l.starts_with("Seccomp:")) {
        return Err(unsupported(
            "the kernel has no seccomp (CONFIG_SECCOMP_FILTER)".into(),
        ));
    }
    seccomp::programs().map_err(|e| unsupported(e.to_string()))?;
    if !Path::new("/dev/loop-control").exists() {
        return Err(unsupported(
            "no /dev/loop-control (loop devices hold each sandbox's disk quota; try `modprobe loop`)"
                .into(),
        ));
    }
    if !disk::mkfs_ext4().is_file() {
        return Err(unsupported(
            "mkfs.ext4 not found (install e2fsprogs; it formats each sandbox's disk)".into(),
        ));
    }
    fs::create_dir_all(&config.state_dir)
        .map_err(|e| RuntimeError::io(format!("creating {}", config.state_dir.display()), e))?;
    probe_idmap(config, &config.state_dir)?;
    Ok(Protections {
        cgroup_version,
        device_cgroup: cgroups::device_cgroup_available(),
        uid_base: config.uid_base,
        uid_slots: config.uid_slots,
    })
}

/// Runs the launcher in its idmap-only mode on `dir` (an existing
/// directory): a real user namespace and a real idmapped mount, or the
/// kernel's refusal.
pub(crate) fn probe_idmap(config: &NamespaceConfig, dir: &Path) -> Result<(), RuntimeError> {
    let probe = process::output(
        Command::new(&config.launcher.program)
            .args(&config.launcher.args_prefix)
            .arg(PROBE_IDMAP_FLAG)
            .arg(dir)
            .arg(config.uid_base.to_string()),
    );
    match probe {
        Ok(_) => Ok(()),
        Err(ProcessError::Failed { output, .. }) => Err(RuntimeError::Unsupported(format!(
            "user namespaces with idmapped mounts do not work here (Linux 5.12+ and a filesystem \
             that supports them are needed): {output}"
        ))),
        Err(e) => Err(RuntimeError::io(
            "running the launcher's idmap probe",
            e.into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_device_cgroup_is_reported_not_hidden() {
        let protections = Protections {
            cgroup_version: CgroupVersion::V2,
            device_cgroup: Err("cgroup v2 host: not implemented".into()),
            uid_base: 1_000_000_000,
            uid_slots: 8,
        };
        let json = protections.to_json();
        assert_eq!(
            json["devices"]["missing"],
            "cgroup v2 host: not implemented"
        );
        assert_eq!(json["cgroup"], "v2");
        assert_eq!(json["no_new_privs"], true);
        assert_eq!(
            json["capabilities"].as_array().unwrap().len(),
            caps::KEPT.len()
        );
    }
}
