//! The sandbox's seccomp filter, built with `seccompiler`.
//!
//! A deny list in the spirit of the Docker/OCI default profile: every
//! syscall that reaches kernel state shared with the host (modules, kexec,
//! keyrings, BPF, perf, mounts, namespaces, clocks, swap, reboot, quotas,
//! file handles) fails with `EPERM`; everything else is allowed. The user
//! namespace and the dropped capabilities already refuse most of these;
//! the filter removes the kernel code behind them from the attack surface
//! (a bug in, say, the keyring or io_uring cannot be reached at all).
//!
//! `clone3` answers `ENOSYS`, so libc falls back to `clone`, whose flags a
//! classic BPF filter can inspect (clone3 passes them in memory).

use std::collections::BTreeMap;
use std::io;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// x32 ABI syscalls arrive with the x86_64 audit arch and this bit set.
const X32_SYSCALL_BIT: i64 = 0x4000_0000;

/// Syscalls the sandbox may never make, with why.
#[cfg(target_arch = "x86_64")]
pub const DENIED: &[(i64, &str)] = &[
    (libc::SYS_acct, "process accounting is host-wide"),
    (libc::SYS_add_key, "kernel keyrings are not namespaced"),
    (libc::SYS_request_key, "kernel keyrings are not namespaced"),
    (libc::SYS_keyctl, "kernel keyrings are not namespaced"),
    (libc::SYS_bpf, "BPF programs run in the host kernel"),
    (libc::SYS_perf_event_open, "perf exposes host-wide events"),
    (libc::SYS_userfaultfd, "a common exploit primitive"),
    (libc::SYS_io_uring_setup, "io_uring: large attack surface"),
    (libc::SYS_io_uring_enter, "io_uring: large attack surface"),
    (
        libc::SYS_io_uring_register,
        "io_uring: large attack surface",
    ),
    (libc::SYS_init_module, "kernel modules"),
    (libc::SYS_finit_module, "kernel modules"),
    (libc::SYS_delete_module, "kernel modules"),
    (libc::SYS_kexec_load, "replacing the host kernel"),
    (libc::SYS_kexec_file_load, "replacing the host kernel"),
    (libc::SYS_reboot, "rebooting the host"),
    (libc::SYS_swapon, "host swap"),
    (libc::SYS_swapoff, "host swap"),
    (libc::SYS_mount, "mounts are fixed by the launcher"),
    (libc::SYS_umount2, "mounts are fixed by the launcher"),
    (libc::SYS_pivot_root, "mounts are fixed by the launcher"),
    (libc::SYS_open_tree, "mounts are fixed by the launcher"),
    (libc::SYS_move_mount, "mounts are fixed by the launcher"),
    (libc::SYS_fsopen, "mounts are fixed by the launcher"),
    (libc::SYS_fsconfig, "mounts are fixed by the launcher"),
    (libc::SYS_fsmount, "mounts are fixed by the launcher"),
    (libc::SYS_fspick, "mounts are fixed by the launcher"),
    (libc::SYS_mount_setattr, "mounts are fixed by the launcher"),
    (
        libc::SYS_unshare,
        "no new namespaces (user namespaces re-grant capabilities)",
    ),
    (libc::SYS_setns, "no joining other namespaces"),
    (
        libc::SYS_name_to_handle_at,
        "file handles bypass path checks",
    ),
    (
        libc::SYS_open_by_handle_at,
        "file handles bypass path checks (shocker)",
    ),
    (libc::SYS_quotactl, "host quotas"),
    (libc::SYS_quotactl_fd, "host quotas"),
    (libc::SYS_settimeofday, "the host clock"),
    (libc::SYS_clock_settime, "the host clock"),
    (libc::SYS_clock_adjtime, "the host clock"),
    (libc::SYS_iopl, "raw I/O ports"),
    (libc::SYS_ioperm, "raw I/O ports"),
    (libc::SYS_syslog, "the host kernel log"),
    (libc::SYS_lookup_dcookie, "host profiling"),
    (libc::SYS_nfsservctl, "the host NFS server"),
    (libc::SYS__sysctl, "host sysctls"),
    (libc::SYS_sysfs, "obsolete; not namespaced"),
    (libc::SYS_uselib, "obsolete"),
    (libc::SYS_ustat, "obsolete"),
    (libc::SYS_vhangup, "terminal hangup"),
    (libc::SYS_process_vm_readv, "cross-process memory access"),
    (libc::SYS_process_vm_writev, "cross-process memory access"),
    (libc::SYS_kcmp, "kernel pointer comparisons"),
    (libc::SYS_mbind, "NUMA policy of host memory"),
    (libc::SYS_set_mempolicy, "NUMA policy of host memory"),
    (libc::SYS_migrate_pages, "NUMA policy of host memory"),
    (libc::SYS_move_pages, "NUMA policy of host memory"),
    (libc::SYS_fanotify_init, "filesystem-wide event monitoring"),
];

/// Namespace flags `clone` may not carry.
const CLONE_NAMESPACE_FLAGS: [libc::c_int; 7] = [
    libc::CLONE_NEWNS,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWCGROUP,
];

fn target_arch() -> io::Result<TargetArch> {
    std::env::consts::ARCH
        .try_into()
        .map_err(|e| io::Error::other(format!("seccomp: unsupported architecture: {e:?}")))
}

/// The two filters: the deny list (`EPERM`) and `clone3` (`ENOSYS`).
pub fn programs() -> io::Result<Vec<BpfProgram>> {
    let arch = target_arch()?;
    let mut denied: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (nr, _) in DENIED {
        denied.insert(*nr, vec![]);
        denied.insert(*nr | X32_SYSCALL_BIT, vec![]);
    }
    let clone_rules = CLONE_NAMESPACE_FLAGS
        .iter()
        .map(|flag| {
            let flag = *flag as u64;
            SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )
            .and_then(|condition| SeccompRule::new(vec![condition]))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(seccomp_error)?;
    denied.insert(libc::SYS_clone, clone_rules.clone());
    denied.insert(libc::SYS_clone | X32_SYSCALL_BIT, clone_rules);
    let deny = SeccompFilter::new(
        denied,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(seccomp_error)?;

    let mut clone3 = BTreeMap::new();
    clone3.insert(libc::SYS_clone3, vec![]);
    clone3.insert(libc::SYS_clone3 | X32_SYSCALL_BIT, vec![]);
    let clone3 = SeccompFilter::new(
        clone3,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(seccomp_error)?;

    Ok(vec![
        deny.try_into().map_err(seccomp_error)?,
        clone3.try_into().map_err(seccomp_error)?,
    ])
}

/// Sets `no_new_privs` and installs the filters on the calling thread; they
/// are inherited by everything it execs and forks.
pub fn install() -> io::Result<()> {
    for program in programs()? {
        seccompiler::apply_filter(&program).map_err(seccomp_error)?;
    }
    Ok(())
}

fn seccomp_error(e: impl std::fmt::Debug) -> io::Error {
    io::Error::other(format!("seccomp: {e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile() {
        let programs = programs().unwrap();
        assert_eq!(programs.len(), 2);
        assert!(
            programs[0].len() > DENIED.len(),
            "one jump per syscall at least"
        );
    }

    #[test]
    fn the_escape_primitives_are_listed() {
        for nr in [
            libc::SYS_mount,
            libc::SYS_unshare,
            libc::SYS_keyctl,
            libc::SYS_bpf,
            libc::SYS_init_module,
            libc::SYS_kexec_load,
            libc::SYS_open_by_handle_at,
            libc::SYS_userfaultfd,
            libc::SYS_perf_event_open,
        ] {
            assert!(DENIED.iter().any(|(n, _)| *n == nr), "{nr} not denied");
        }
    }
}
