//! The microVMs' egress policy, enforced in the host's nftables.
//!
//! QEMU's user-mode network turns every guest connection into a socket of
//! the QEMU process, so the host's firewall sees guest traffic as QEMU's.
//! Each VM's QEMU runs with a group id of its own (from a configured range;
//! the snapshot-building template VM uses the `vm_user` group), and one
//! table decides by that gid:
//!
//! 1. the host's own addresses (including the gateway 10.0.2.2, which slirp
//!    maps to the host's loopback): rejected, always;
//! 2. DNS to the host's resolvers (`/etc/resolv.conf`), port 53 only:
//!    accepted, so names resolve even when the resolver is private;
//! 3. the operator's `egress_allow` ranges: on to the sandbox's own policy;
//! 4. loopback, link-local (the cloud metadata service), private, shared
//!    and reserved ranges: rejected;
//! 5. the sandbox's own `allow_out` (accept) and `deny_out` (reject), in a
//!    chain per gid reached through a verdict map; then accept.
//!
//! (A gid, not a uid: QEMU reopens its disks after a snapshot restore, so it
//! keeps root's file access.)

use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use crate::egress::{Cidr, EgressPolicy, BLOCKED_BY_DEFAULT};

const TABLE: &str = "sandbox_manager_vm";

/// The gids the guard applies to and the operator's exceptions.
#[derive(Debug, Clone)]
pub struct GuardSettings {
    /// The `vm_user` group (template VMs).
    pub guard_gid: u32,
    /// Per-VM gids: `[first, first + count)`.
    pub first_vm_gid: u32,
    pub vm_gids: u32,
    /// Private destinations the operator opens to every guest.
    pub allow: Vec<Cidr>,
}

/// Creates the system user and group `user` if missing; returns its gid.
pub fn ensure_group(user: &str) -> Result<u32, String> {
    if let Some(gid) = gid_of(user) {
        return Ok(gid);
    }
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
    gid_of(user).ok_or_else(|| format!("user {user} missing after useradd"))
}

/// (Re)creates the whole table; per-VM chains of running VMs are re-applied
/// by the caller.
pub fn install(settings: &GuardSettings) -> Result<(), String> {
    let last = settings.first_vm_gid + settings.vm_gids.saturating_sub(1);
    let (blocked4, blocked6) = split(
        BLOCKED_BY_DEFAULT
            .iter()
            .map(|c| c.parse().expect("built-in ranges parse")),
    );
    let (allow4, allow6) = split(settings.allow.iter().copied());
    let (dns4, dns6) = split(resolvers().into_iter().map(|addr| Cidr {
        addr,
        prefix: if addr.is_ipv4() { 32 } else { 128 },
    }));
    let mut script = format!(
        "add table inet {TABLE}\ndelete table inet {TABLE}\n\
         table inet {TABLE} {{\n\
         \x20 set vm_gids {{ type gid; flags interval; elements = {{ {guard}, {first}-{last} }} }}\n\
         \x20 map policies {{ type gid : verdict; }}\n",
        guard = settings.guard_gid,
        first = settings.first_vm_gid,
    );
    script += &ip_set("blocked4", "ipv4_addr", &blocked4);
    script += &ip_set("blocked6", "ipv6_addr", &blocked6);
    script += &ip_set("allow4", "ipv4_addr", &allow4);
    script += &ip_set("allow6", "ipv6_addr", &allow6);
    script += &ip_set("dns4", "ipv4_addr", &dns4);
    script += &ip_set("dns6", "ipv6_addr", &dns6);
    script += "  chain output {\n    type filter hook output priority 0; policy accept;\n\
               \x20   meta skgid != @vm_gids accept\n\
               \x20   fib daddr type local reject\n\
               \x20   ip daddr @dns4 meta l4proto { tcp, udp } th dport 53 accept\n\
               \x20   ip6 daddr @dns6 meta l4proto { tcp, udp } th dport 53 accept\n\
               \x20   ip daddr @allow4 goto sandbox\n\
               \x20   ip6 daddr @allow6 goto sandbox\n\
               \x20   ip daddr @blocked4 reject\n\
               \x20   ip6 daddr @blocked6 reject\n\
               \x20   goto sandbox\n  }\n\
               \x20 chain sandbox {\n    meta skgid vmap @policies\n  }\n}\n";
    nft(&script)
}

/// Installs (replacing) the policy of the VM running with `gid`.
pub fn apply(gid: u32, policy: &EgressPolicy) -> Result<(), String> {
    let chain = format!("sbx_{gid}");
    let mut script = format!("add chain inet {TABLE} {chain}\nflush chain inet {TABLE} {chain}\n");
    for (list, verdict) in [(&policy.allow_out, "accept"), (&policy.deny_out, "reject")] {
        let (v4, v6) = split(list.iter().copied());
        if !v4.is_empty() {
            script += &format!(
                "add rule inet {TABLE} {chain} ip daddr {{ {} }} {verdict}\n",
                join(&v4)
            );
        }
        if !v6.is_empty() {
            script += &format!(
                "add rule inet {TABLE} {chain} ip6 daddr {{ {} }} {verdict}\n",
                join(&v6)
            );
        }
    }
    script += &format!("add element inet {TABLE} policies {{ {gid} : jump {chain} }}\n");
    nft(&script)
}

/// Removes the VM's policy (nothing to do if it had none).
pub fn clear(gid: u32) {
    let chain = format!("sbx_{gid}");
    let _ = nft(&format!(
        "delete element inet {TABLE} policies {{ {gid} }}\n"
    ));
    let _ = nft(&format!("delete chain inet {TABLE} {chain}\n"));
}

/// The nameservers the host (and so slirp's DNS forwarder) uses.
fn resolvers() -> Vec<IpAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().split('%').next()?.parse().ok())
        .collect()
}

fn split(cidrs: impl Iterator<Item = Cidr>) -> (Vec<Cidr>, Vec<Cidr>) {
    cidrs.partition(Cidr::is_ipv4)
}

fn join(cidrs: &[Cidr]) -> String {
    cidrs
        .iter()
        .map(Cidr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn ip_set(name: &str, kind: &str, cidrs: &[Cidr]) -> String {
    if cidrs.is_empty() {
        format!("  set {name} {{ type {kind}; flags interval; }}\n")
    } else {
        format!(
            "  set {name} {{ type {kind}; flags interval; auto-merge; elements = {{ {} }} }}\n",
            join(cidrs)
        )
    }
}

fn nft(script: &str) -> Result<(), String> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running nft (install nftables: scripts/microvm-deps.sh): {e}"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())
        .map_err(|e| e.to_string())?;
    let output = child.wait_with_output().map_err(|e| e.to_string())?;
    if !output.status.success() {
        return Err(format!(
            "nft refused the egress rules: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(())
}

fn gid_of(user: &str) -> Option<u32> {
    let output = Command::new("id").args(["-g", user]).output().ok()?;
    if !output.status.success() {
        return None;
    }
    String::from_utf8_lossy(&output.stdout).trim().parse().ok()
}
