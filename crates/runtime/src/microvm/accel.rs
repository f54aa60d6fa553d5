//! Which accelerator QEMU can use here. `/dev/kvm` alone proves nothing: a
//! nested or paravirtual host (e.g. PVM) offers a `/dev/kvm` that ordinary
//! guest kernels cannot boot under. Hardware KVM needs the CPU's
//! virtualisation flag and a working `/dev/kvm`; anything else gets TCG.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

use super::MicrovmError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// `-accel` and `-cpu` arguments.
    pub fn qemu_args(self) -> [&'static str; 4] {
        match self {
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
            Accel::Tcg => ["-accel", "tcg,thread=multi", "-cpu", "max"],
        }
    }
}

/// The accelerator picked for `choice`, and why (for `/health` and the log).
#[derive(Debug, Clone)]
pub struct AccelDecision {
    pub accel: Accel,
    pub reason: String,
}

/// Why hardware KVM is not usable here.
#[derive(Debug, thiserror::Error)]
pub enum KvmUnusable {
    #[error("/dev/kvm is PVM (kvm_pvm loaded), not hardware KVM")]
    Pvm,
    #[error("the CPU shows no vmx/svm flag (no hardware virtualisation)")]
    NoCpuFlag,
    #[error("/dev/kvm cannot be opened: {0}")]
    Open(#[source] std::io::Error),
    #[error("/dev/kvm reports API version {0}, expected 12")]
    ApiVersion(i32),
    #[error("/dev/kvm refuses to create a VM: {0}")]
    CreateVm(#[source] std::io::Error),
}

/// Whether hardware KVM is usable, with the reason when it is not.
pub fn hardware_kvm() -> Result<(), KvmUnusable> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has_flag = cpuinfo
        .lines()
        .filter(|line| line.starts_with("flags"))
        .any(|line| line.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        return Err(KvmUnusable::Pvm);
    }
    if !has_flag {
        return Err(KvmUnusable::NoCpuFlag);
    }
    let kvm = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(KvmUnusable::Open)?;
    const KVM_GET_API_VERSION: libc::Ioctl = 0xAE00;
    const KVM_CREATE_VM: libc::Ioctl = 0xAE01;
    // SAFETY: ioctls without arguments on a /dev/kvm fd we own.
    let version = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if version != 12 {
        return Err(KvmUnusable::ApiVersion(version));
    }
    // SAFETY: as above; the returned fd is closed right away.
    let vm = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM, 0) };
    if vm < 0 {
        return Err(KvmUnusable::CreateVm(std::io::Error::last_os_error()));
    }
    unsafe { libc::close(vm) };
    Ok(())
}

pub fn decide(choice: AccelChoice) -> Result<AccelDecision, MicrovmError> {
    match (choice, hardware_kvm()) {
        (AccelChoice::Tcg, _) => Ok(AccelDecision {
            accel: Accel::Tcg,
            reason: "runtime.microvm.accel = tcg".into(),
        }),
        (_, Ok(())) => Ok(AccelDecision {
            accel: Accel::Kvm,
            reason: "hardware KVM is usable".into(),
        }),
        (AccelChoice::Kvm, Err(why)) => Err(MicrovmError::KvmRequired(why)),
        (AccelChoice::Auto, Err(why)) => Ok(AccelDecision {
            accel: Accel::Tcg,
            reason: format!("software emulation (TCG, much slower): {why}"),
        }),
    }
}
