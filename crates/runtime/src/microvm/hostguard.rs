//! Keeps microVMs off the host's own services.
//!
//! QEMU's user-mode network maps the guest's gateway (10.0.2.2) to the
//! host's loopback, and a guest can equally dial any address the host owns,
//! so every service listening on the host (the database, the object store,
//! this API) would be one hop from untrusted code. QEMU therefore runs with
//! a dedicated group as its effective gid, and one nftables rule rejects
//! sockets of that group connecting to any local address. Outbound traffic
//! to other hosts is untouched. (A gid, not a uid: QEMU reopens its disks
//! after a snapshot restore, so it keeps root's file access.)

use std::io::Write;
use std::process::{Command, Stdio};

const TABLE: &str = "sandbox_manager_vm";

/// Creates the system user and group `user` if missing and installs the
/// rule; returns the group's gid.
pub fn install(user: &str) -> Result<u32, String> {
    let gid = match gid_of(user) {
        Some(gid) => gid,
        None => {
            let status = Command::new("useradd")
                .args([
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    user,
                ])
                .status()
                .map_err(|e| format!("running useradd: {e}"))?;
            if !status.success() {
                return Err(format!("useradd {user} failed ({status})"));
            }
            gid_of(user).ok_or_else(|| format!("user {user} missing after useradd"))?
        }
    };
    // Recreated whole each start, so a changed gid never leaves a stale rule.
    let script = format!(
        "add table inet {TABLE}\ndelete table inet {TABLE}\n\
         table inet {TABLE} {{\n  chain output {{\n    type filter hook output priority 0; policy accept;\n    \
         meta skgid {gid} fib daddr type local reject\n  }}\n}}\n"
    );
    let mut nft = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running nft (install nftables): {e}"))?;
    nft.stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())
        .map_err(|e| e.to_string())?;
    let output = nft.wait_with_output().map_err(|e| e.to_string())?;
    if !output.status.success() {
        return Err(format!(
            "nft refused the host guard rule: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(gid)
}

fn gid_of(user: &str) -> Option<u32> {
    let output = Command::new("id").args(["-g", user]).output().ok()?;
    if !output.status.success() {
        return None;
    }
    String::from_utf8_lossy(&output.stdout).trim().parse().ok()
}
