//! Template build commands run in their own mount and PID namespaces.
//!
//! mmdebstrap `--mode=root` (and debootstrap) bind-mount the host's
//! `/dev/pts`, `/dev/shm`, proc and sys into the target. Done in the host's
//! mount namespace, a build killed mid-way left those mounts under
//! `data/templates/`, and a recursive delete of the data dir then deleted
//! the host's `/dev/shm` files. [`isolate`] arranges this instead:
//!
//! ```text
//! server ── keeper (a fork of the server that never execs)
//!             └── build command: PID 1 of a new PID namespace, in a new
//!                 mount namespace with private propagation
//! ```
//!
//! - Private propagation: nothing the build mounts is visible in the host
//!   namespace, and the mounts vanish with the namespace's last process.
//! - PID namespace: when its PID 1 (the build command) dies, the kernel
//!   SIGKILLs every other process in it (apt, dpkg, maintainer scripts).
//! - PID 1 has `PR_SET_PDEATHSIG=SIGKILL` towards the keeper, which is
//!   single-threaded, so it fires exactly when the keeper dies. Dropping the
//!   build future (server shutdown, cancelled request) SIGKILLs the keeper
//!   via `kill_on_drop`.
//! - The keeper polls `getppid()`: that changes only when the whole server
//!   process is gone (kill -9 included), whereas PDEATHSIG on the keeper
//!   would fire when the tokio *thread* that forked it exits, which tokio's
//!   threads do. It then kills PID 1, and with it the namespace.
//!
//! Why the keeper at all: `unshare(CLONE_NEWPID)` moves only the caller's
//! future children into the new namespace, and once its first child (PID 1)
//! exits no further fork is possible there, so the command itself has to be
//! that first child. (util-linux `unshare --fork --kill-child` does the same,
//! but its own parent-death handling would again be tied to a tokio thread.)
//!
//! The process runs in its own process group, so a terminal's Ctrl-C reaches
//! the server only, which then tears the build down itself.

use std::io;
use std::ptr;

use tokio::process::Command;

/// How often the keeper checks that the server is still alive.
const POLL: libc::timespec = libc::timespec {
    tv_sec: 0,
    tv_nsec: 100_000_000,
};

/// Makes `command` run as described in the module docs.
pub(crate) fn isolate(command: &mut Command) {
    let server = std::process::id() as libc::pid_t;
    command.kill_on_drop(true).process_group(0);
    // SAFETY: `enter` makes only async-signal-safe calls (no allocation, no
    // locks), as required between fork and exec in a threaded program.
    unsafe { command.pre_exec(move || enter(server)) };
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Runs in the forked child before exec; returns (to exec) only in PID 1.
fn enter(server: libc::pid_t) -> io::Result<()> {
    // SAFETY: plain syscalls on this single-threaded, freshly forked process.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWPID))?;
        // Recursively private: our mounts never propagate to the host (nor
        // the host's to us).
        check(libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            ptr::null(),
        ))?;
        // Held open by the keeper only: PID 1 sees it hang up if the keeper
        // died before PDEATHSIG was armed (getppid() is 0 from inside a new
        // PID namespace, so it cannot tell that way).
        let mut keeper_alive = [0; 2];
        check(libc::pipe2(keeper_alive.as_mut_ptr(), libc::O_CLOEXEC))?;
        let [alive_read, alive_write] = keeper_alive;
        match check(libc::fork())? {
            0 => {
                libc::close(alive_write);
                check(libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                ))?;
                let mut hangup = libc::pollfd {
                    fd: alive_read,
                    events: 0,
                    revents: 0,
                };
                if libc::poll(&mut hangup, 1, 0) != 0 {
                    libc::_exit(1);
                }
                Ok(()) // exec; `alive_read` is close-on-exec
            }
            pid1 => {
                libc::close(alive_read);
                keep(pid1, server, alive_write)
            }
        }
    }
}

/// The keeper: forwards PID 1's exit status, and kills it if the server dies.
///
/// # Safety
/// Only in the forked child, with `pid1` its child.
unsafe fn keep(pid1: libc::pid_t, server: libc::pid_t, keep_fd: libc::c_int) -> ! {
    // SAFETY: per the function contract; async-signal-safe calls only.
    unsafe {
        // Drop every inherited fd but stdio and `keep_fd`, above all std's
        // exec-status pipe: the server's spawn() waits until every copy of
        // it is closed (i.e. until PID 1 has exec'd).
        close_fds_from(3, keep_fd);
        // Handlers inherited from the server (tokio's signal handling) would
        // write to fds we just closed instead of acting on the signal.
        for signal in 1..=libc::SIGRTMAX() {
            libc::signal(signal, libc::SIG_DFL);
        }
        loop {
            let mut status = 0;
            let ret = libc::waitpid(pid1, &mut status, libc::WNOHANG);
            if ret == pid1 {
                libc::_exit(exit_code(status));
            }
            if ret < 0 && *libc::__errno_location() != libc::EINTR {
                libc::_exit(127);
            }
            if libc::getppid() != server {
                libc::kill(pid1, libc::SIGKILL);
                libc::waitpid(pid1, &mut status, 0);
                libc::_exit(exit_code(status));
            }
            libc::nanosleep(&POLL, ptr::null_mut());
        }
    }
}

/// Closes every fd >= `first` except `keep`.
///
/// # Safety
/// Closes fds owned by other code; only for a process about to exit.
unsafe fn close_fds_from(first: libc::c_int, keep: libc::c_int) {
    // SAFETY: per the function contract.
    unsafe {
        let ranges = [(first, keep - 1), (keep + 1, libc::c_int::MAX)];
        for (low, high) in ranges {
            if low > high {
                continue;
            }
            if libc::syscall(libc::SYS_close_range, low as u32, high as u32, 0) != 0 {
                // Kernels before 5.9: one by one, up to the fd limit.
                let mut limit = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
                let end = limit.rlim_cur.min(1 << 20) as libc::c_int;
                for fd in low..end.min(high.saturating_add(1)) {
                    libc::close(fd);
                }
            }
        }
    }
}

fn exit_code(status: libc::c_int) -> libc::c_int {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        127
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};

    fn is_root() -> bool {
        // SAFETY: no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    fn host_mountinfo_mentions(dir: &Path) -> bool {
        let needle = dir.to_str().unwrap();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .any(|line| line.contains(needle))
    }

    /// Every descendant of `pid`, via /proc/PID/task/TID/children.
    fn descendants(pid: u32) -> Vec<u32> {
        let mut found = Vec::new();
        let mut queue = vec![pid];
        while let Some(pid) = queue.pop() {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
            };
            for task in tasks.flatten() {
                let children =
                    std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
                for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                    found.push(child);
                    queue.push(child);
                }
            }
        }
        found
    }

    /// Gone, or a zombie waiting for whoever inherited it.
    fn is_gone(pid: u32) -> bool {
        crate::process::ProcessInfo::read(pid as i32).is_none_or(|p| p.is_zombie())
    }

    fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A build stand-in: mounts a tmpfs, reports, then idles with children.
    fn fake_build(dir: &Path) -> Command {
        let mut command = Command::new("sh");
        command.arg("-c").arg(
            r#"mount -t tmpfs none "$1/mnt" || exit 9
               grep -c " $1/mnt " /proc/self/mountinfo > "$1/seen-inside"
               sleep 1000 & sleep 1000 &
               echo $$ > "$1/pid"
               wait"#,
        );
        command.arg("fake-build").arg(dir);
        isolate(&mut command);
        command
    }

    #[tokio::test]
    async fn mounts_stay_private_and_dropping_the_command_kills_the_namespace() {
        if !is_root() {
            println!("SKIP: namespaces need root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        std::fs::create_dir(dir.join("mnt")).unwrap();
        let mut child = fake_build(&dir).spawn().unwrap();
        let keeper = child.id().unwrap();
        wait_for("the fake build", Duration::from_secs(10), || {
            dir.join("pid").exists()
        });
        let inside = std::fs::read_to_string(dir.join("seen-inside")).unwrap();
        assert_eq!(inside.trim(), "1", "the build sees its own mount");
        assert_eq!(
            std::fs::read_to_string(dir.join("pid")).unwrap().trim(),
            "1"
        );
        assert!(!host_mountinfo_mentions(&dir), "mount leaked to the host");
        let tree = descendants(keeper);
        assert_eq!(tree.len(), 3, "sh and two sleeps: {tree:?}");

        child.start_kill().unwrap();
        let _ = child.wait().await;
        wait_for("the namespace to die", Duration::from_secs(2), || {
            tree.iter().all(|&pid| is_gone(pid))
        });
        assert!(!host_mountinfo_mentions(&dir));
        assert!(std::fs::read_dir(dir.join("mnt")).unwrap().next().is_none());
    }

    #[tokio::test]
    async fn exit_status_is_forwarded() {
        if !is_root() {
            println!("SKIP: namespaces need root");
            return;
        }
        let mut command = Command::new("sh");
        command.args(["-c", "echo out; exit 3"]);
        isolate(&mut command);
        let output = command.output().await.unwrap();
        assert_eq!(output.status.code(), Some(3));
        assert_eq!(output.stdout, b"out\n");

        let mut missing = Command::new("/nonexistent/program");
        isolate(&mut missing);
        let err = missing.spawn().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    const HELPER_ENV: &str = "SANDBOX_RUNTIME_BUILD_NS_HELPER";

    /// Not a test: the "server" that `the_build_dies_with_the_server` runs
    /// (as a copy of this test binary) and then kill -9s.
    #[tokio::test]
    #[ignore]
    async fn helper_server_for_kill_test() {
        let Some(dir) = std::env::var_os(HELPER_ENV) else {
            return;
        };
        let _child = fake_build(&PathBuf::from(dir)).spawn().unwrap();
        std::future::pending::<()>().await;
    }

    #[test]
    fn the_build_dies_with_the_server() {
        if !is_root() {
            println!("SKIP: namespaces need root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        std::fs::create_dir(dir.join("mnt")).unwrap();
        let mut server = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "build_ns::tests::helper_server_for_kill_test",
                "--ignored",
                "--nocapture",
            ])
            .env(HELPER_ENV, &dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let server_pid = server.id();
        let found = std::panic::catch_unwind(|| {
            wait_for("the fake build", Duration::from_secs(20), || {
                dir.join("pid").exists()
            });
            assert!(!host_mountinfo_mentions(&dir), "mount leaked to the host");
            // keeper, sh, two sleeps
            let tree = descendants(server_pid);
            assert_eq!(tree.len(), 4, "{tree:?}");
            tree
        });
        server.kill().unwrap(); // SIGKILL
        server.wait().unwrap();
        let tree = found.unwrap_or_else(|e| std::panic::resume_unwind(e));
        wait_for("the build to die", Duration::from_secs(2), || {
            tree.iter().all(|&pid| is_gone(pid))
        });
        assert!(!host_mountinfo_mentions(&dir));
    }
}
