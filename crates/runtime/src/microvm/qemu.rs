//! The QEMU of one microVM: its files, its command line and its start.
//! Template VMs (snapshotted) and their clones must use identical device
//! lists in the same order, so both come from [`VmLaunch::args`].

use std::ffi::OsString;
use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use super::accel::Accel;
use super::images::GUEST_ENVD;
use super::layers;
use super::MicrovmError;
use crate::process::{self, ProcessInfo};
use crate::runtime::Limits;

/// Files of one running QEMU (a sandbox, or a template VM being snapshotted).
#[derive(Debug, Clone)]
pub struct VmFiles {
    pub dir: PathBuf,
}

impl VmFiles {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }
    /// Volume slot `n`'s image (see [`super::layers`]).
    pub fn slot(&self, n: usize) -> PathBuf {
        self.dir.join(format!("slot{n}.qcow2"))
    }
    /// What a volume built in slot `n` writes to once its layer is frozen.
    pub fn slot_top(&self, n: usize) -> PathBuf {
        self.dir.join(format!("slot{n}-top.qcow2"))
    }
    /// Slot `n` is taken: holds the mount path it serves.
    pub fn slot_claim(&self, n: usize) -> PathBuf {
        self.dir.join(format!("slot{n}.mount"))
    }
    /// Where host clients connect (the relay's session socket).
    pub fn agent_socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }
    /// Where QEMU connects the virtio-serial port to the relay.
    pub fn serial_socket(&self) -> PathBuf {
        self.dir.join("serial.sock")
    }
    /// `PID STARTTIME` of the relay.
    pub fn relay_identity_file(&self) -> PathBuf {
        self.dir.join("relay.pid")
    }
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }
    /// `PID STARTTIME`: the start time guards against pid reuse.
    pub fn identity_file(&self) -> PathBuf {
        self.dir.join("vm.pid")
    }
}

/// Where guest RAM lives.
#[derive(Debug, Clone)]
pub enum Memory {
    /// Plain anonymous memory (cold boot).
    Anonymous,
    /// A file the guest writes through to: the template VM, whose RAM
    /// becomes the snapshot.
    SharedFile(PathBuf),
    /// The snapshot's RAM file mapped copy-on-write: a clone shares every
    /// page it has not written with all other clones.
    PrivateFile(PathBuf),
}

pub struct VmLaunch<'a> {
    pub name: &'a str,
    pub files: &'a VmFiles,
    pub kernel: &'a Path,
    pub limits: Limits,
    pub memory: Memory,
    /// Restore from a snapshot (`-incoming defer`, then QMP).
    pub incoming: bool,
    /// Spare disks for volume layers (`super::layers`).
    pub volume_slots: usize,
    /// `(uid, gid)` QEMU switches to once its files and sockets are open
    /// (a sandbox's own ids; `None`: stays root, for template VMs that
    /// never run tenant code).
    pub run_as: Option<(u32, u32)>,
}

/// Kernel command line; envd is init. The timing flags come from
/// measurements under TCG, where the machine keeps its PIC and PIT (see
/// [`MACHINE`]).
fn kernel_cmdline() -> String {
    // Without a PIT or HPET the guest cannot calibrate its TSC; under TCG
    // the guest TSC ticks at the host's rate, so hand it the host's.
    let khz = host_tsc_khz();
    let timing = [
        format!("tsc_early_khz={khz}"),
        // loops_per_jiffy at the kernel's HZ=100.
        format!("lpj={}", khz * 1000 / 100),
    ];
    [
        timing[0].as_str(),
        timing[1].as_str(),
        "console=ttyS0",
        "8250.nr_uarts=1",
        "root=/dev/vda",
        "rootfstype=ext4",
        "rootflags=noinit_itable",
        "rw",
        "panic=-1",
        "reboot=t",
        "quiet",
        "tsc=reliable",
        "i8042.noaux",
        "i8042.nokbd",
        "cryptomgr.notests",
        "mitigations=off",
        "random.trust_cpu=on",
        &format!("init={GUEST_ENVD}"),
        // Unknown `KEY=value` parameters reach init as its environment.
        // (Not `-- args`: QEMU appends its virtio_mmio.device= entries at
        // the end, which would land in init's argv.)
        "ENVD_LISTEN=virtio-port:envd",
        "ENVD_GUEST_INIT=true",
        "ENVD_AWAIT_INIT=true",
    ]
    .join(" ")
}

/// The host CPU's clock in kHz, from `/proc/cpuinfo`.
fn host_tsc_khz() -> u64 {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    cpuinfo
        .lines()
        .find(|line| line.starts_with("cpu MHz"))
        .and_then(|line| line.split(':').nth(1))
        .and_then(|mhz| mhz.trim().parse::<f64>().ok())
        .map(|mhz| (mhz * 1000.0) as u64)
        .unwrap_or(2_000_000)
}

/// Machine type and options; part of [`fingerprint`].
const MACHINE: &str = "microvm,acpi=off";

/// What a snapshot depends on besides the kernel and image: a clone must be
/// launched exactly like the VM that was snapshotted.
pub fn fingerprint(volume_slots: usize) -> String {
    // Bump SNAPSHOT_FORMAT when how snapshots are saved changes.
    // 3: the volume slots.
    const SNAPSHOT_FORMAT: u32 = 3;
    format!(
        "{SNAPSHOT_FORMAT} {MACHINE} slots={volume_slots} {}",
        kernel_cmdline()
    )
}

/// The first fd a sandbox's QEMU inherits: each of its images comes as a
/// read-write and a read-only fd (QEMU picks from an fd set by access
/// mode; a restored VM's disk is first opened read-only, then reopened
/// read-write on `cont`). The root disk is fd set 1 on fds 3 and 4, volume
/// slot `n` is set `2 + n` on the next two.
const FIRST_INHERITED_FD: i32 = 3;

impl VmLaunch<'_> {
    /// The images QEMU opens, in fd set order: the root disk, then the
    /// volume slots.
    fn images(&self) -> Vec<PathBuf> {
        std::iter::once(self.files.disk())
            .chain((0..self.volume_slots).map(|n| self.files.slot(n)))
            .collect()
    }

    /// A QEMU that drops root reopens its disks when the restored VM is
    /// continued; by path that would need every directory above the state
    /// dir to be searchable by the sandbox's uid. It gets them as inherited
    /// fds instead (`-add-fd` + `/dev/fdset/N`), which reopen without any
    /// path access. `index` is the image's place in [`Self::images`].
    fn image_path(&self, index: usize) -> String {
        if self.run_as.is_some() {
            format!("/dev/fdset/{}", index + 1)
        } else {
            self.images()[index].display().to_string()
        }
    }

    pub fn args(&self, accel: Accel) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
        let memory_mb = self.limits.memory_mb.max(128);
        push(&["-name", self.name]);
        push(&["-machine", MACHINE]);
        push(&accel.qemu_args());
        push(&["-smp", &self.limits.vcpus.max(1).to_string()]);
        push(&["-m", &format!("{memory_mb}M")]);
        let backend = |path: &Path, share: &str| {
            format!(
                "memory-backend-file,id=ram,size={memory_mb}M,mem-path={},share={share}",
                path.display()
            )
        };
        match &self.memory {
            Memory::Anonymous => {}
            Memory::SharedFile(path) => push(&[
                "-object",
                &backend(path, "on"),
                "-machine",
                "memory-backend=ram",
            ]),
            Memory::PrivateFile(path) => push(&[
                "-object",
                &backend(path, "off"),
                "-machine",
                "memory-backend=ram",
            ]),
        }
        push(&[
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]);
        push(&[
            "-serial",
            &format!("file:{}", self.files.console_log().display()),
        ]);
        push(&["-kernel", &self.kernel.display().to_string()]);
        push(&["-append", &kernel_cmdline()]);
        push(&[
            "-drive",
            &format!(
                "id=root,file={},format=qcow2,if=none,cache=unsafe,discard=unmap",
                self.image_path(0)
            ),
            "-device",
            "virtio-blk-device,drive=root",
        ]);
        // Empty volume slots, named so the layer code can reopen them with
        // a backing layer (see `super::layers`).
        for n in 0..self.volume_slots {
            push(&[
                "-blockdev",
                &format!(
                    "driver=file,node-name={},filename={}",
                    layers::slot_file_node(n),
                    self.image_path(1 + n)
                ),
                "-blockdev",
                &format!(
                    "driver=qcow2,node-name={},file={}",
                    layers::slot_node(n),
                    layers::slot_file_node(n)
                ),
                "-device",
                &format!(
                    "virtio-blk-device,drive={},serial={}",
                    layers::slot_node(n),
                    layers::slot_serial(n)
                ),
            ]);
        }
        // User-mode networking; the link is cut over QMP for a sandbox
        // created without internet access.
        push(&[
            "-netdev",
            "user,id=net0",
            "-device",
            "virtio-net-device,netdev=net0",
        ]);
        push(&[
            "-device",
            "virtio-serial-device",
            "-chardev",
            // QEMU is the client: the relay is listening before QEMU starts,
            // so the port's host side is connected before the guest opens it.
            &format!(
                "socket,id=agent,path={}",
                self.files.serial_socket().display()
            ),
            "-device",
            "virtserialport,chardev=agent,name=envd",
        ]);
        push(&[
            "-qmp",
            &format!(
                "unix:{},server=on,wait=off",
                self.files.qmp_socket().display()
            ),
        ]);
        // QEMU's own seccomp filter. spawn=deny and elevateprivileges=deny
        // would also stop -daemonize's fork and setsid; once QEMU runs as
        // an unprivileged uid with no capabilities and no_new_privs (which
        // -run-with sets), privileges cannot be raised again anyway.
        push(&["-sandbox", "on,obsolete=deny,resourcecontrol=deny"]);
        if let Some((uid, gid)) = self.run_as {
            push(&["-run-with", &format!("user={uid}:{gid}")]);
            for index in 0..self.images().len() {
                let set = index + 1;
                let first = FIRST_INHERITED_FD + 2 * index as i32;
                for fd in [first, first + 1] {
                    push(&["-add-fd", &format!("fd={fd},set={set}")]);
                }
            }
        }
        push(&[
            "-daemonize",
            "-pidfile",
            &self.files.pid_file().display().to_string(),
        ]);
        if self.incoming {
            push(&["-incoming", "defer"]);
        }
        args
    }

    /// Runs QEMU, which daemonizes once the VM is set up (so it outlives a
    /// server restart and is never our zombie); records `PID STARTTIME`.
    /// With `gid`, QEMU runs with that group only (see `hostguard`).
    pub async fn spawn(
        &self,
        qemu: &Path,
        accel: Accel,
        gid: Option<u32>,
    ) -> Result<i32, MicrovmError> {
        let mut command = tokio::process::Command::new(qemu);
        if let Some(gid) = gid {
            command.gid(gid);
            // SAFETY: setgroups is async-signal-safe; drops root's
            // supplementary groups so the guard's gid is the only one.
            unsafe {
                command.pre_exec(|| {
                    if libc::setgroups(0, std::ptr::null()) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        // The images on inherited fds, read-write then read-only, from fd 3
        // on (see `VmLaunch::image_path`); QEMU keeps them, ours close on
        // return.
        let mut disk_fds = Vec::new();
        if self.run_as.is_some() {
            for image in self.images() {
                for write in [true, false] {
                    let file = fs::OpenOptions::new()
                        .read(true)
                        .write(write)
                        .open(&image)
                        .map_err(MicrovmError::file("opening", &image))?;
                    disk_fds.push(file);
                }
            }
        }
        if !disk_fds.is_empty() {
            let sources: Vec<i32> = disk_fds.iter().map(AsRawFd::as_raw_fd).collect();
            // SAFETY: only dup/dup2/fcntl (async-signal-safe) between fork
            // and exec. Sources are first moved above the targets so that
            // placing one cannot overwrite another.
            unsafe {
                command.pre_exec(move || {
                    let mut high = Vec::with_capacity(sources.len());
                    for fd in &sources {
                        let moved = libc::fcntl(*fd, libc::F_DUPFD, 64);
                        if moved < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        high.push(moved);
                    }
                    for (fd, target) in high.iter().zip(FIRST_INHERITED_FD..) {
                        if libc::dup2(*fd, target) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        libc::close(*fd);
                    }
                    Ok(())
                });
            }
        }
        command.args(self.args(accel)).stdin(Stdio::null());
        process::output_async(&mut command)
            .await
            .map_err(MicrovmError::QemuStart)?;
        let pid = process::read_pid_file(&self.files.pid_file()).ok_or(MicrovmError::NoPidFile)?;
        let start_time = ProcessInfo::read(pid)
            .map(|p| p.start_time)
            .ok_or(MicrovmError::QemuExitedAtOnce)?;
        process::record_as(&self.files.identity_file(), pid, start_time)?;
        Ok(pid)
    }
}
