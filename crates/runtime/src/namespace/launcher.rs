//! The launcher: a freshly exec'd, single-threaded process (so fork is safe)
//! that turns into one sandbox.
//!
//! ```text
//! server ──spawn──▶ launcher (host pid ns, own session, in the sandbox cgroup)
//!                     │ user namespace (0.. → the sandbox's host id range)
//!                     │ unshare(NEWNS|NEWPID|NEWUTS|NEWIPC|NEWNET); fork
//!                     ▼
//!                   sandbox PID 1, still host root: disk, idmapped template,
//!                   overlay, /proc /sys /dev with masks, hostname, lo up,
//!                   device cgroup, cgroup namespace, pivot_root; then
//!                   enters the user namespace as its root, keeps only the
//!                   OCI default capabilities, no_new_privs, seccomp,
//!                   exec /.envd/envd (envd stays PID 1 and reaps orphans)
//! ```
//!
//! Every namespace but the user namespace is owned by the host's user
//! namespace, so the sandbox's root holds capabilities only over its own
//! files and processes: it cannot mount, unmount, remount, set the hostname
//! or reconfigure the network it was given.
//!
//! The launcher waits for PID 1 and exits with its status. PID 1 has
//! `PR_SET_PDEATHSIG=SIGKILL`, so killing the launcher takes the whole pid
//! namespace down. The launcher runs in its own session and does not die with
//! the server, so sandboxes survive a server restart and can be re-adopted.

use std::ffi::CString;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use super::cgroups::SandboxCgroup;
use super::mounts::{self, RootLayout, AGENT_MOUNT};
use super::userns;
use super::{caps, os_error, seccomp};
use crate::slots::IdRange;

/// Parsed command line of the launcher (see [`LaunchArgs::to_args`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchArgs {
    pub id: String,
    /// `state_dir/ID`: holds upper/, work/, merged/, agent/.
    pub sandbox_dir: PathBuf,
    pub rootfs: PathBuf,
    pub envd_binary: PathBuf,
    pub hostname: String,
    /// Host ids the sandbox's 0..count map to.
    pub ids: IdRange,
}

impl LaunchArgs {
    pub fn to_args(&self) -> Vec<String> {
        vec![
            "--id".into(),
            self.id.clone(),
            "--sandbox-dir".into(),
            self.sandbox_dir.display().to_string(),
            "--rootfs".into(),
            self.rootfs.display().to_string(),
            "--envd".into(),
            self.envd_binary.display().to_string(),
            "--hostname".into(),
            self.hostname.clone(),
            "--uid-base".into(),
            self.ids.base.to_string(),
            "--uid-count".into(),
            self.ids.count.to_string(),
        ]
    }

    pub fn parse(args: &[String]) -> Result<Self, String> {
        let mut id = None;
        let mut sandbox_dir = None;
        let mut rootfs = None;
        let mut envd_binary = None;
        let mut hostname = None;
        let mut uid_base = None;
        let mut uid_count = None;
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let value = it
                .next()
                .ok_or_else(|| format!("missing value for {flag}"))?
                .clone();
            match flag.as_str() {
                "--id" => id = Some(value),
                "--sandbox-dir" => sandbox_dir = Some(PathBuf::from(value)),
                "--rootfs" => rootfs = Some(PathBuf::from(value)),
                "--envd" => envd_binary = Some(PathBuf::from(value)),
                "--hostname" => hostname = Some(value),
                "--uid-base" => uid_base = Some(parse_id(flag, &value)?),
                "--uid-count" => uid_count = Some(parse_id(flag, &value)?),
                other => return Err(format!("unknown launcher flag {other}")),
            }
        }
        Ok(Self {
            id: id.ok_or("--id is required")?,
            sandbox_dir: sandbox_dir.ok_or("--sandbox-dir is required")?,
            rootfs: rootfs.ok_or("--rootfs is required")?,
            envd_binary: envd_binary.ok_or("--envd is required")?,
            hostname: hostname.ok_or("--hostname is required")?,
            ids: IdRange {
                base: uid_base.ok_or("--uid-base is required")?,
                count: uid_count.ok_or("--uid-count is required")?,
            },
        })
    }

    fn layout(&self) -> RootLayout {
        RootLayout {
            template: self.rootfs.clone(),
            lower: self.sandbox_dir.join("lower"),
            disk_image: self.sandbox_dir.join(DISK_IMAGE),
            disk: self.sandbox_dir.join("disk"),
            merged: self.sandbox_dir.join("merged"),
            agent: self.sandbox_dir.join("agent"),
            envd_binary: self.envd_binary.clone(),
            ids: self.ids,
        }
    }
}

/// The sandbox's disk image inside its state dir.
pub const DISK_IMAGE: &str = "disk.img";

fn parse_id(flag: &str, value: &str) -> Result<u32, String> {
    value
        .parse()
        .map_err(|_| format!("{flag} wants a number, got {value:?}"))
}

/// Entry point of the launcher process. Call it from `main` before any
/// threads (tokio) exist, with the arguments after the subcommand name.
/// Its stderr is the sandbox's `launcher.log`.
pub fn launcher_main(args: &[String]) -> ! {
    if args.first().map(String::as_str) == Some(super::layers::LAYER_FLAG) {
        match super::layers::layer_main(&args[1..]) {
            Ok(()) => std::process::exit(0),
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        }
    }
    if args.first().map(String::as_str) == Some(super::protections::PROBE_IDMAP_FLAG) {
        match probe_idmap(&args[1..]) {
            Ok(()) => std::process::exit(0),
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        }
    }
    let args = match LaunchArgs::parse(args) {
        Ok(args) => args,
        Err(message) => {
            eprintln!("sandbox-launcher: {message}");
            std::process::exit(2);
        }
    };
    match run_launcher(&args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("sandbox-launcher[{}]: {e}", args.id);
            std::process::exit(1);
        }
    }
}

fn run_launcher(args: &LaunchArgs) -> io::Result<i32> {
    // Own session: no controlling terminal, and signals sent to the server's
    // process group (e.g. Ctrl-C) do not reach the sandbox.
    // SAFETY: plain syscall; failure (already a group leader) is harmless.
    unsafe { libc::setsid() };

    let cgroup = SandboxCgroup::for_sandbox(&args.id)?;
    cgroup
        .join(0)
        .map_err(|e| io::Error::new(e.kind(), format!("joining the sandbox cgroup: {e}")))?;
    let userns = userns::create(args.ids)?;

    let namespaces = libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWNET;
    // SAFETY: plain syscall.
    if unsafe { libc::unshare(namespaces) } != 0 {
        return Err(os_error("unshare"));
    }

    // The launcher keeps the write end of this pipe open for its whole life;
    // the child sees POLLHUP on the read end once the launcher is gone.
    let mut liveness = [0; 2];
    // SAFETY: pipe2 into a 2-element array.
    if unsafe { libc::pipe2(liveness.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(os_error("pipe2"));
    }
    let [liveness_read, liveness_write] = liveness;

    // SAFETY: this process is single-threaded (fresh exec, no runtime), so
    // the child may do anything after fork.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(os_error("fork"));
    }
    if child == 0 {
        // SAFETY: closing our copy of the write end.
        unsafe { libc::close(liveness_write) };
        let err = sandbox_init(args, liveness_read, &userns, &cgroup);
        eprintln!("sandbox-init[{}]: {err}", args.id);
        // SAFETY: exit without running the parent's atexit handlers.
        unsafe { libc::_exit(127) };
    }
    // SAFETY: the read end belongs to the child.
    unsafe { libc::close(liveness_read) };
    wait_for(child)
}

/// `--probe-idmap PATH UID_BASE`: a user namespace and an idmapped (never
/// attached) mount of PATH, as a boot would make them.
fn probe_idmap(args: &[String]) -> io::Result<()> {
    let (Some(path), Some(base)) = (args.first(), args.get(1)) else {
        return Err(io::Error::other("usage: --probe-idmap PATH UID_BASE"));
    };
    let base = parse_id("UID_BASE", base).map_err(io::Error::other)?;
    let userns = userns::create(IdRange {
        base,
        count: userns::IDS_PER_SANDBOX,
    })?;
    mounts::idmapped_tree(std::path::Path::new(path), &userns, true).map(drop)
}

/// Waits for the sandbox's PID 1; returns a shell-style exit code.
fn wait_for(child: libc::pid_t) -> io::Result<i32> {
    loop {
        let mut status = 0;
        // SAFETY: waiting for our own child.
        let rc = unsafe { libc::waitpid(child, &mut status, 0) };
        if rc == child {
            if libc::WIFEXITED(status) {
                return Ok(libc::WEXITSTATUS(status));
            }
            if libc::WIFSIGNALED(status) {
                return Ok(128 + libc::WTERMSIG(status));
            }
            continue;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Runs as PID 1 of the new pid namespace; only returns on failure.
/// `launcher_liveness` is the read end of a pipe only the launcher writes.
fn sandbox_init(
    args: &LaunchArgs,
    launcher_liveness: libc::c_int,
    userns: &OwnedFd,
    cgroup: &SandboxCgroup,
) -> io::Error {
    // SAFETY: plain prctl.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) } != 0 {
        return os_error("PR_SET_PDEATHSIG");
    }
    // The launcher may have died between fork and prctl, in which case the
    // death signal never comes. getppid() cannot tell (the parent is outside
    // our pid ns, so it reads 0); the pipe can: a closed write end is POLLHUP.
    let mut poll = libc::pollfd {
        fd: launcher_liveness,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    if unsafe { libc::poll(&mut poll, 1, 0) } > 0 && poll.revents & libc::POLLHUP != 0 {
        // SAFETY: exiting the child.
        unsafe { libc::_exit(1) };
    }
    match confine(args, userns, cgroup) {
        Ok(()) => exec_envd(),
        Err(e) => e,
    }
}

/// Everything between a fresh PID 1 (host root) and a confined one that
/// may exec the agent. Order matters: mounts and network need host root;
/// the device cgroup is joined after the loop disk is mounted (it denies
/// block devices); seccomp comes last so the steps before may use what it
/// forbids.
fn confine(args: &LaunchArgs, userns: &OwnedFd, cgroup: &SandboxCgroup) -> io::Result<()> {
    mounts::assemble(&args.layout(), userns)?;
    set_hostname(&args.hostname)?;
    bring_loopback_up()?;
    set_network_sysctls()?;
    cgroup
        .join_devices(0)
        .map_err(|e| io::Error::new(e.kind(), format!("joining the device cgroup: {e}")))?;
    // SAFETY: plain syscall; the sandbox sees its own cgroup as the root.
    if unsafe { libc::unshare(libc::CLONE_NEWCGROUP) } != 0 {
        return Err(os_error("unshare(CLONE_NEWCGROUP)"));
    }
    mounts::pivot_into(&args.layout().merged)?;
    userns::enter_as_root(userns)?;
    caps::restrict_to_default()?;
    seccomp::install()
}

/// Per-network-namespace sysctls (this process is in the sandbox's netns,
/// so these touch only it): root in the sandbox has no capability over the
/// netns, so let it bind low ports and ping the unprivileged way.
fn set_network_sysctls() -> io::Result<()> {
    for (path, value) in [
        ("/proc/sys/net/ipv4/ip_unprivileged_port_start", "0"),
        ("/proc/sys/net/ipv4/ping_group_range", "0 2147483647"),
    ] {
        std::fs::write(path, value)
            .map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?;
    }
    Ok(())
}

fn set_hostname(hostname: &str) -> io::Result<()> {
    // SAFETY: pointer/len of a live byte slice.
    if unsafe { libc::sethostname(hostname.as_ptr().cast(), hostname.len()) } != 0 {
        return Err(os_error("sethostname"));
    }
    Ok(())
}

/// The new net namespace has only `lo`, and it starts down.
fn bring_loopback_up() -> io::Result<()> {
    // SAFETY: socket/ioctl on a zeroed ifreq naming "lo"; fd closed below.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(os_error("socket"));
        }
        let mut request: libc::ifreq = std::mem::zeroed();
        for (dst, src) in request.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        let result = if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut request) != 0 {
            Err(os_error("SIOCGIFFLAGS lo"))
        } else {
            request.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            if libc::ioctl(fd, libc::SIOCSIFFLAGS, &request) != 0 {
                Err(os_error("SIOCSIFFLAGS lo"))
            } else {
                Ok(())
            }
        };
        libc::close(fd);
        result
    }
}

fn exec_envd() -> io::Error {
    let program = format!("{AGENT_MOUNT}/envd");
    let argv: Vec<CString> = [
        program.as_str(),
        "--listen",
        &format!("unix:{AGENT_MOUNT}/envd.sock"),
        "--root",
        "/",
        "--token-file",
        &format!("{AGENT_MOUNT}/token"),
        "--delete-token-file",
    ]
    .iter()
    .map(|s| CString::new(*s).expect("no NUL"))
    .collect();
    // A clean environment: nothing of the host's leaks into the sandbox.
    let mut envp: Vec<CString> = vec![
        CString::new("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .expect("no NUL"),
        CString::new("HOME=/root").expect("no NUL"),
        CString::new("LANG=C.UTF-8").expect("no NUL"),
    ];
    if let Some(filter) = std::env::var_os("RUST_LOG") {
        let mut entry = b"RUST_LOG=".to_vec();
        entry.extend_from_slice(filter.as_bytes());
        if let Ok(entry) = CString::new(entry) {
            envp.push(entry);
        }
    }
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|s| s.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|s| s.as_ptr()).collect();
    envp_ptrs.push(std::ptr::null());
    // SAFETY: NULL-terminated arrays of valid C strings that outlive the call.
    unsafe { libc::execve(argv[0].as_ptr(), argv_ptrs.as_ptr(), envp_ptrs.as_ptr()) };
    os_error(&format!("exec {program}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_round_trip() {
        let args = LaunchArgs {
            id: "sbx-1".into(),
            sandbox_dir: "/var/lib/sm/sbx-1".into(),
            rootfs: "/t/base/rootfs".into(),
            envd_binary: "/usr/bin/envd".into(),
            hostname: "sbx-1".into(),
            ids: IdRange {
                base: 1_000_000_000,
                count: 65_536,
            },
        };
        assert_eq!(LaunchArgs::parse(&args.to_args()).unwrap(), args);
        assert!(LaunchArgs::parse(&["--id".into()]).is_err());
        assert!(LaunchArgs::parse(&["--bogus".into(), "x".into()]).is_err());
    }
}
