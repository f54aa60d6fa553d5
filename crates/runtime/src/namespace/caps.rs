//! Capabilities a sandbox's root keeps: the default set container runtimes
//! (Docker, containerd, the OCI runtime-spec example) grant, and only inside
//! the sandbox's own user namespace. Everything else is dropped from every
//! set, including the bounding set, so no exec can get it back.

use std::io;

use super::os_error;

/// The OCI/Docker default capability set, by number (linux/capability.h).
pub const KEPT: [(u32, &str); 14] = [
    (0, "CAP_CHOWN"),
    (1, "CAP_DAC_OVERRIDE"),
    (3, "CAP_FOWNER"),
    (4, "CAP_FSETID"),
    (5, "CAP_KILL"),
    (6, "CAP_SETGID"),
    (7, "CAP_SETUID"),
    (8, "CAP_SETPCAP"),
    (10, "CAP_NET_BIND_SERVICE"),
    (13, "CAP_NET_RAW"),
    (18, "CAP_SYS_CHROOT"),
    (27, "CAP_MKNOD"),
    (29, "CAP_AUDIT_WRITE"),
    (31, "CAP_SETFCAP"),
];

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The kept set as the two 32-bit words capset takes.
fn kept_mask() -> [u32; 2] {
    let mut mask = [0u32; 2];
    for (cap, _) in KEPT {
        mask[(cap / 32) as usize] |= 1 << (cap % 32);
    }
    mask
}

/// Drops every capability outside [`KEPT`] from the bounding, ambient,
/// inheritable, permitted and effective sets of the calling process.
/// Needs `CAP_SETPCAP` (in the caller's user namespace) to start with.
pub fn restrict_to_default() -> io::Result<()> {
    let last = last_cap();
    let mask = kept_mask();
    for cap in 0..=last {
        if mask[(cap / 32) as usize] & (1 << (cap % 32)) == 0 {
            // SAFETY: plain prctl.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
                return Err(os_error(&format!("PR_CAPBSET_DROP {cap}")));
            }
        }
    }
    // SAFETY: plain prctl.
    if unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    } != 0
    {
        return Err(os_error("clearing ambient capabilities"));
    }
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [
        CapData {
            effective: mask[0],
            permitted: mask[0],
            inheritable: 0,
        },
        CapData {
            effective: mask[1],
            permitted: mask[1],
            inheritable: 0,
        },
    ];
    // SAFETY: header and a 2-element data array, as capset(2) v3 requires.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        return Err(os_error("capset"));
    }
    Ok(())
}

/// The highest capability number this kernel knows.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_set_is_the_oci_default_and_nothing_dangerous() {
        let mask = kept_mask();
        let has = |cap: u32| mask[(cap / 32) as usize] & (1 << (cap % 32)) != 0;
        // CAP_SYS_ADMIN, CAP_SYS_MODULE, CAP_SYS_PTRACE, CAP_NET_ADMIN,
        // CAP_SYS_RAWIO, CAP_DAC_READ_SEARCH, CAP_SYS_BOOT, CAP_BPF.
        for dangerous in [21, 16, 19, 12, 17, 2, 22, 39] {
            assert!(!has(dangerous), "capability {dangerous} kept");
        }
        assert_eq!(KEPT.len(), 14);
        assert!(has(0) && has(31));
        // 0xa80425fb is the CapEff a default Docker container shows.
        assert_eq!(mask, [0xa80425fb, 0]);
    }
}
