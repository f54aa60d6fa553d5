//! The microVMs' egress policy, enforced in the host's nftables.
//!
//! QEMU's user-mode network turns every guest connection into a socket of
//! the QEMU process, so the host's firewall sees guest traffic as QEMU's.
//! Each sandbox's QEMU runs with a group id of its own (from a configured
//! range; the snapshot-building template VMs use the `vm_user` group), and
//! one table decides by that gid:
//!
//! 1. the host's own addresses (including the gateway 10.0.2.2, which slirp
//!    maps to the host's loopback): rejected, always;
//! 2. DNS to the host's resolvers (`/etc/resolv.conf`), port 53 only:
//!    accepted, so names resolve even when the resolver is private;
//! 3. the VM's own chain (`sbx_GID`, reached through a verdict map):
//!    destinations in the operator's `egress_allow` go straight to the
//!    sandbox's policy; loopback, link-local (the cloud metadata service),
//!    private, shared and reserved ranges are rejected; everything else
//!    goes to the sandbox's policy: its `allow_out` (accept), its
//!    `deny_out` (reject), then accept;
//! 4. a gid without a chain (a template VM): the same ranges rejected.
//!
//! The table is created once and never deleted: a server restart keeps the
//! chains of the VMs it re-adopts, and each VM's chain carries the allow
//! list of the server that booted it.
//!
//! (A gid, not a uid: the template VMs keep root's file access.)

use std::net::IpAddr;
use std::process::Command;

use super::MicrovmError;
use crate::egress::{Cidr, EgressPolicy, BLOCKED_BY_DEFAULT};
use crate::process;

const TABLE: &str = "sandbox_manager_egress";
/// The table of earlier versions (one global rule set), removed at start.
const OLD_TABLE: &str = "sandbox_manager_vm";

/// The gids the guard applies to.
#[derive(Debug, Clone)]
pub struct GuardSettings {
    /// The `vm_user` group (template VMs).
    pub guard_gid: u32,
    /// Per-VM gids: `[first, first + count)`.
    pub first_vm_gid: u32,
    pub vm_gids: u32,
}

/// Creates the system user and group `user` if missing; returns its gid.
pub fn ensure_group(user: &str) -> Result<u32, MicrovmError> {
    if let Some(gid) = gid_of(user) {
        return Ok(gid);
    }
    process::output(Command::new("useradd").args([
        "--system",
        "--no-create-home",
        "--shell",
        "/usr/sbin/nologin",
        user,
    ]))
    .map_err(|source| MicrovmError::AddUser {
        user: user.to_string(),
        source,
    })?;
    gid_of(user).ok_or_else(|| MicrovmError::UserMissing(user.to_string()))
}

/// Creates the table if missing and (re)writes its shared part; the
/// per-VM chains and the map that reaches them are left alone.
pub fn install(settings: &GuardSettings) -> Result<(), MicrovmError> {
    let last = settings.first_vm_gid + settings.vm_gids.saturating_sub(1);
    let (blocked4, blocked6) = split(
        BLOCKED_BY_DEFAULT
            .iter()
            .map(|c| c.parse().expect("built-in ranges parse")),
    );
    let (dns4, dns6) = split(resolvers().into_iter().map(Cidr::host));
    // Earlier versions kept one global rule set under another name.
    let _ = nft(&format!("delete table inet {OLD_TABLE}\n"));
    let mut script = [
        format!("add table inet {TABLE}"),
        format!("add map inet {TABLE} policies {{ type gid : verdict; }}"),
        format!(
            "add chain inet {TABLE} output {{ type filter hook output priority 0; policy accept; }}"
        ),
        format!("flush chain inet {TABLE} output"),
        format!("add chain inet {TABLE} vm_egress"),
        format!("flush chain inet {TABLE} vm_egress"),
    ]
    .join("\n")
        + "\n";
    script += &set(
        "vm_gids",
        "gid",
        &[
            settings.guard_gid.to_string(),
            format!("{}-{last}", settings.first_vm_gid),
        ],
    );
    script += &set("blocked4", "ipv4_addr", &strings(&blocked4));
    script += &set("blocked6", "ipv6_addr", &strings(&blocked6));
    script += &set("dns4", "ipv4_addr", &strings(&dns4));
    script += &set("dns6", "ipv6_addr", &strings(&dns6));
    // A positive match: packets without a socket (the kernel's RSTs and
    // time-wait replies) have no gid and must pass untouched; a negated
    // match would send them on to the rejects below.
    script += &format!("add rule inet {TABLE} output meta skgid @vm_gids goto vm_egress\n");
    for rule in [
        "fib daddr type local reject",
        "ip daddr @dns4 meta l4proto { tcp, udp } th dport 53 accept",
        "ip6 daddr @dns6 meta l4proto { tcp, udp } th dport 53 accept",
        "meta skgid vmap @policies",
        "ip daddr @blocked4 reject",
        "ip6 daddr @blocked6 reject",
    ] {
        script += &format!("add rule inet {TABLE} vm_egress {rule}\n");
    }
    nft(&script)
}

/// Installs (replacing) the chain of the VM running with `gid`: the
/// operator's `allow` ranges, then the blocked ranges, then the sandbox's
/// own `policy`.
pub fn apply(gid: u32, allow: &[Cidr], policy: &EgressPolicy) -> Result<(), MicrovmError> {
    let chain = format!("sbx_{gid}");
    let own = format!("sbx_{gid}_own");
    let mut script = String::new();
    for name in [&chain, &own] {
        script += &format!("add chain inet {TABLE} {name}\nflush chain inet {TABLE} {name}\n");
    }
    let mut rule = |chain: &str, body: String| {
        script += &format!("add rule inet {TABLE} {chain} {body}\n");
    };
    for (family, list) in family_lists(allow) {
        rule(&chain, format!("{family} daddr {{ {list} }} goto {own}"));
    }
    rule(&chain, "ip daddr @blocked4 reject".into());
    rule(&chain, "ip6 daddr @blocked6 reject".into());
    rule(&chain, format!("goto {own}"));
    for (list, verdict) in [(&policy.allow_out, "accept"), (&policy.deny_out, "reject")] {
        for (family, list) in family_lists(list) {
            rule(&own, format!("{family} daddr {{ {list} }} {verdict}"));
        }
    }
    rule(&own, "accept".into());
    script += &format!("add element inet {TABLE} policies {{ {gid} : jump {chain} }}\n");
    nft(&script)
}

/// Removes the VM's chains (nothing to do if it had none).
pub fn clear(gid: u32) {
    let _ = nft(&format!(
        "delete element inet {TABLE} policies {{ {gid} }}\n"
    ));
    let _ = nft(&format!(
        "delete chain inet {TABLE} sbx_{gid}\ndelete chain inet {TABLE} sbx_{gid}_own\n"
    ));
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

fn strings(cidrs: &[Cidr]) -> Vec<String> {
    cidrs.iter().map(Cidr::to_string).collect()
}

/// `("ip", "a, b")` and `("ip6", "c")` for the non-empty families of `cidrs`.
fn family_lists(cidrs: &[Cidr]) -> Vec<(&'static str, String)> {
    let (v4, v6) = split(cidrs.iter().copied());
    [("ip", v4), ("ip6", v6)]
        .into_iter()
        .filter(|(_, list)| !list.is_empty())
        .map(|(family, list)| (family, strings(&list).join(", ")))
        .collect()
}

/// A named interval set holding exactly `elements` (replaced each start).
fn set(name: &str, kind: &str, elements: &[String]) -> String {
    let mut script = format!(
        "add set inet {TABLE} {name} {{ type {kind}; flags interval; auto-merge; }}\n\
         flush set inet {TABLE} {name}\n"
    );
    if !elements.is_empty() {
        script += &format!(
            "add element inet {TABLE} {name} {{ {} }}\n",
            elements.join(", ")
        );
    }
    script
}

fn nft(script: &str) -> Result<(), MicrovmError> {
    process::output_with_input(Command::new("nft").args(["-f", "-"]), script.as_bytes())
        .map(drop)
        .map_err(MicrovmError::Nft)
}

fn gid_of(user: &str) -> Option<u32> {
    let output = process::output(Command::new("id").args(["-g", user])).ok()?;
    String::from_utf8_lossy(&output.stdout).trim().parse().ok()
}
