//! The escape suite: what a hostile tenant would try, run as root inside a
//! real sandbox through the public API, each attempt asserted to fail with
//! the host unchanged. Runs on the runtime `SANDBOX_TEST_RUNTIME` names.
//!
//! On the namespace runtime the sandbox shares the host kernel, so every
//! kernel-facing attempt matters. On a microVM the guest's root is root of
//! its own kernel (it may mount and mknod inside its VM); there the suite
//! checks what must hold at the VM boundary: the host, its services and its
//! private networks stay out of reach.

use crate::common::{self, sandboxes_supported, Api, Reply, TestServer};
use reqwest::StatusCode;
use serde_json::json;
use std::time::{Duration, Instant};

/// Template definitions for this suite: `base` with a 1 GiB disk, so the
/// quota test fills it in seconds (the rootfs is shared: limits are not
/// part of a template's content hash).
fn small_disk_definitions() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let base = include_str!("../../config/templates/base.toml");
    std::fs::write(
        dir.path().join("base.toml"),
        format!("{base}\ndisk_gib = 1\n"),
    )
    .unwrap();
    dir
}

async fn server(definitions: &tempfile::TempDir) -> TestServer {
    TestServer::start(
        common::production()
            .with_sandboxes(1, 0)
            .with_setting(
                "runtime.template_definitions_dir",
                &definitions.path().display().to_string(),
            )
            // The disk-quota check fills a disk with a volume of zeros,
            // which the default expansion-ratio guard would refuse first.
            .with_setting("volumes.max_expansion_ratio", "0"),
    )
    .await
}

/// Runs `cmd` as `user`; returns (exit code, stdout + stderr).
async fn run_as(server: &TestServer, id: &str, user: &str, cmd: &str) -> (i64, String) {
    let body = server.run_command_as(id, user, cmd).await;
    let output = format!(
        "{}{}",
        body["stdout"].as_str().unwrap_or(""),
        body["stderr"].as_str().unwrap_or("")
    );
    (body["exit_code"].as_i64().unwrap_or(-1), output)
}

async fn root(server: &TestServer, id: &str, cmd: &str) -> (i64, String) {
    run_as(server, id, "root", cmd).await
}

/// Asserts the attempt fails (non-zero exit) and returns its output.
async fn refused(server: &TestServer, id: &str, what: &str, cmd: &str) -> String {
    let (code, output) = root(server, id, cmd).await;
    assert_ne!(code, 0, "{what} succeeded as root in the sandbox: {output}");
    eprintln!(
        "refused: {what}: {}",
        output.trim().lines().next().unwrap_or("")
    );
    output
}

fn host_read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Kernel-facing escapes; the namespace runtime's whole boundary.
#[tokio::test]
async fn root_in_a_namespace_sandbox_holds_nothing_of_the_host() {
    if !sandboxes_supported("root_in_a_namespace_sandbox_holds_nothing_of_the_host") {
        return;
    }
    // These load the machine on purpose (fork bomb, disk fill) and time
    // what must stay responsive (`/health` within 1 s): one at a time, alone.
    let _alone = common::alone().await;
    if common::is_microvm() {
        eprintln!(
            "SKIP root_in_a_namespace_sandbox_holds_nothing_of_the_host (microvm): the guest's \
             root is root of its own kernel; the VM boundary tests below cover microVMs"
        );
        return;
    }
    let definitions = small_disk_definitions();
    let server = server(&definitions).await;
    let health = server.health().await;
    let isolation = &health["runtime"]["isolation"];
    assert!(isolation["user_namespace"].is_string(), "{health}");
    assert_eq!(isolation["no_new_privs"], true, "{health}");
    let id = server.new_sandbox(json!({ "template": "base" })).await;

    // Identity: uid 0 inside is an unprivileged host id; only the OCI
    // default capabilities.
    let (_, status) = root(&server, &id, "grep -E '^Cap(Eff|Bnd|Prm|Inh|Amb)' /proc/self/status; cat /proc/self/uid_map /proc/self/gid_map; grep NoNewPrivs /proc/self/status; grep Seccomp: /proc/self/status").await;
    assert!(status.contains("CapEff:\t00000000a80425fb"), "{status}");
    assert!(status.contains("CapBnd:\t00000000a80425fb"), "{status}");
    assert!(status.contains("CapAmb:\t0000000000000000"), "{status}");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    assert!(status.contains("Seccomp:\t2"), "{status}");
    let map_line = status
        .lines()
        .find(|l| l.split_whitespace().next() == Some("0"))
        .unwrap_or_else(|| panic!("no uid_map line: {status}"));
    let fields: Vec<u64> = map_line
        .split_whitespace()
        .map(|f| f.parse().unwrap())
        .collect();
    assert!(
        fields[1] >= 100_000,
        "root maps to host id {}: {status}",
        fields[1]
    );
    assert_eq!(fields[2], 65_536, "{status}");

    // The agent binary and every mount the host made are fixed.
    let envd_before = root(&server, &id, "sha256sum /.envd/envd").await.1;
    refused(
        &server,
        &id,
        "remount the agent binary writable",
        "mount -o remount,rw,bind /.envd/envd",
    )
    .await;
    refused(
        &server,
        &id,
        "write the agent binary",
        "echo backdoor >> /.envd/envd",
    )
    .await;
    refused(
        &server,
        &id,
        "replace the agent binary",
        "cp /bin/true /.envd/envd",
    )
    .await;
    refused(
        &server,
        &id,
        "unmount the agent binary",
        "umount -l /.envd/envd",
    )
    .await;
    refused(
        &server,
        &id,
        "remount / writable elsewhere",
        "mount -o remount,rw /proc/sys",
    )
    .await;
    assert_eq!(
        root(&server, &id, "sha256sum /.envd/envd").await.1,
        envd_before
    );

    // Devices: no node for the host's disk can be made or used.
    let host_dev = {
        use std::os::unix::fs::MetadataExt;
        let dev = std::fs::metadata("/").unwrap().dev();
        (libc::major(dev), libc::minor(dev))
    };
    refused(
        &server,
        &id,
        "mknod the host's root disk",
        &format!("mknod /tmp/hostdisk b {} {}", host_dev.0, host_dev.1),
    )
    .await;
    refused(
        &server,
        &id,
        "mount the host's root disk",
        "mkdir -p /mnt/h && mount /dev/vda /mnt/h || mount -t ext4 /tmp/hostdisk /mnt/h",
    )
    .await;
    let (_, devices) = root(&server, &id, "ls -A /dev | sort | tr '\\n' ' '").await;
    assert_eq!(
        devices.trim(),
        "fd full null ptmx pts random shm stderr stdin stdout tty urandom zero",
        "unexpected /dev"
    );

    // New filesystems, procfs and sysfs.
    refused(
        &server,
        &id,
        "mount a new proc",
        "mkdir -p /mnt/p && mount -t proc proc /mnt/p",
    )
    .await;
    refused(
        &server,
        &id,
        "mount sysfs",
        "mkdir -p /mnt/s && mount -t sysfs sys /mnt/s",
    )
    .await;
    refused(&server, &id, "mount a tmpfs", "mount -t tmpfs t /mnt").await;
    refused(
        &server,
        &id,
        "remount /sys writable",
        "mount -o remount,rw /sys",
    )
    .await;

    // Host-global kernel state.
    let core_pattern = host_read("/proc/sys/kernel/core_pattern");
    let burst = host_read("/proc/sys/kernel/printk_ratelimit_burst");
    refused(
        &server,
        &id,
        "write core_pattern",
        "echo '|/tmp/x' > /proc/sys/kernel/core_pattern",
    )
    .await;
    refused(
        &server,
        &id,
        "set a host sysctl",
        "sysctl -w kernel.printk_ratelimit_burst=97",
    )
    .await;
    refused(
        &server,
        &id,
        "write sysrq-trigger",
        "echo h > /proc/sysrq-trigger",
    )
    .await;
    refused(
        &server,
        &id,
        "read kcore",
        "head -c 16 /proc/kcore | od | grep -q '[1-9]'",
    )
    .await;
    refused(&server, &id, "read the kernel log", "dmesg").await;
    assert_eq!(host_read("/proc/sys/kernel/core_pattern"), core_pattern);
    assert_eq!(host_read("/proc/sys/kernel/printk_ratelimit_burst"), burst);

    // Syscalls behind the seccomp filter (numbers: x86_64; pointers NULL:
    // the filter answers before the kernel would look). perl-base is in
    // every Debian root filesystem and can make raw syscalls.
    for (what, nr, args) in [
        ("init_module", 175, "0, 0, 0"),
        ("finit_module", 313, "0, 0, 0"),
        ("kexec_load", 246, "0, 0, 0, 0"),
        ("keyctl", 250, "0, -1, 0"),
        ("add_key", 248, "0, 0, 0, 0, 0"),
        ("bpf", 321, "0, 0, 0"),
        ("perf_event_open", 298, "0, 0, -1, -1, 0"),
        ("userfaultfd", 323, "0"),
        ("open_by_handle_at", 304, "0, 0, 0"),
        ("unshare(CLONE_NEWUSER)", 272, "0x10000000"),
        ("setns", 308, "0, 0"),
        ("swapon", 167, "0, 0"),
        ("reboot", 169, "0xfee1dead, 672274793, 0x4321fedc, 0"),
    ] {
        let (_, output) = root(
            &server,
            &id,
            &format!("perl -e '$r = syscall({nr}, {args}); print \"$r $!\\n\"'"),
        )
        .await;
        assert!(
            output.starts_with("-1 Operation not permitted"),
            "{what} was not refused with EPERM: {output}"
        );
    }

    // New namespaces would re-grant a full capability set.
    refused(
        &server,
        &id,
        "unshare -U (regain capabilities)",
        "unshare -U -r id",
    )
    .await;
    refused(&server, &id, "unshare -m", "unshare -m true").await;

    // Host processes are neither visible nor signalable.
    let mut host_sleeper = std::process::Command::new("sleep")
        .arg("300")
        .spawn()
        .unwrap();
    let server_pid = server.pid().unwrap();
    for pid in [host_sleeper.id(), server_pid] {
        refused(
            &server,
            &id,
            "kill a host process",
            &format!("kill -9 {pid}"),
        )
        .await;
        refused(
            &server,
            &id,
            "ptrace a host process",
            &format!("perl -e '$r = syscall(101, 16, {pid}, 0, 0); exit($r == 0 ? 0 : 1)'"),
        )
        .await;
    }
    assert!(
        host_sleeper.try_wait().unwrap().is_none(),
        "host process died"
    );
    host_sleeper.kill().unwrap();
    let took = server
        .health_within(Duration::from_secs(1), "signals at host processes")
        .await;
    eprintln!("/health answered in {took:?}");

    // set-id bits: a setuid-root copy made by root does not lift `user`.
    root(
        &server,
        &id,
        "cp /bin/cat /home/user/suidcat && chmod 4755 /home/user/suidcat",
    )
    .await;
    let (code, output) = run_as(&server, &id, "user", "/home/user/suidcat /etc/shadow").await;
    assert_ne!(code, 0, "setuid binary read /etc/shadow as user: {output}");

    // A volume carrying a setuid file: the bits never arrive.
    let archive = common::targz(&[("suid-tool", b"#!/bin/sh\nid\n".to_vec())]);
    let archive = set_mode(&archive, "suid-tool", 0o4755);
    let volume = server.new_volume(archive).await;
    let with_volume = server.new_sandbox(json!({ "template": "base", "volumes": [{ "volume_id": volume["volume_id"], "mount_path": "/data" }] }),
    )
    .await;
    let (_, mode) = root(&server, &with_volume, "stat -c %a /data/suid-tool").await;
    assert!(
        !mode.trim().starts_with('4'),
        "setuid bit survived hydration: {mode}"
    );

    // Disk quota: filling the 1 GiB disk ends in ENOSPC, and the host's
    // free space drops by at most the quota.
    let free_before = host_free_bytes();
    let (code, output) = root(
        &server,
        &id,
        "dd if=/dev/zero of=/home/user/fill bs=1M count=1400 2>&1",
    )
    .await;
    assert_ne!(code, 0, "wrote 1.4 GiB into a 1 GiB disk: {output}");
    assert!(output.contains("No space left on device"), "{output}");
    let used = free_before.saturating_sub(host_free_bytes());
    assert!(
        used < (1 << 30) + (128 << 20),
        "host lost {used} bytes to a 1 GiB quota"
    );
    // The sandbox keeps working and its disk can be freed again.
    root(&server, &id, "rm /home/user/fill").await;
    assert_eq!(root(&server, &id, "echo ok > /home/user/after").await.0, 0);

    // A volume larger than the disk: its hydration fails with the reason,
    // and the sandbox (lenient mode) is still usable.
    let volume = server.new_volume(zeros_targz(1200 << 20)).await;
    let (status, sandbox) = server
        .create_sandbox(json!({ "template": "base", "volumes": [{ "volume_id": volume["volume_id"], "mount_path": "/data" }] }))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{sandbox}");
    let attachment = &sandbox["volumes"][0];
    assert_eq!(attachment["status"], "failed", "{sandbox}");
    assert!(
        attachment["error"]
            .as_str()
            .unwrap_or_default()
            .to_lowercase()
            .contains("space"),
        "the reason names the full disk: {sandbox}"
    );
    let full = sandbox["sandbox_id"].as_str().unwrap();
    assert_eq!(root(&server, full, "echo alive").await.1, "alive\n");
}

/// A gzip tarball holding one file of `size` zero bytes (compresses ~1000:1).
fn zeros_targz(size: u64) -> Vec<u8> {
    let encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut builder = tar::Builder::new(encoder);
    let mut header = tar::Header::new_gnu();
    header.set_size(size);
    header.set_mode(0o644);
    builder
        .append_data(
            &mut header,
            "zeros.bin",
            std::io::Read::take(std::io::repeat(0), size),
        )
        .unwrap();
    builder.into_inner().unwrap().finish().unwrap()
}

/// The fork bomb stops at the pids limit; the host keeps answering and the
/// sandbox stays killable. Both runtimes.
#[tokio::test]
async fn a_fork_bomb_stays_inside() {
    if !sandboxes_supported("a_fork_bomb_stays_inside") {
        return;
    }
    let _alone = common::alone().await;
    let definitions = small_disk_definitions();
    let server = server(&definitions).await;
    let id = server.new_sandbox(json!({ "template": "base" })).await;
    let (status, _) = server
        .command(
            &id,
            json!({ "cmd": "bomb() { bomb | bomb & }; bomb", "user": "user", "background": true }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    tokio::time::sleep(Duration::from_secs(3)).await;
    for _ in 0..3 {
        let took = server
            .health_within(Duration::from_secs(1), "a fork bomb")
            .await;
        eprintln!("/health answered in {took:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let started = Instant::now();
    let (status, _) = server.delete(&format!("/sandboxes/{id}")).reply().await;
    assert!(status.is_success(), "{status}");
    eprintln!("fork-bombed sandbox killed in {:?}", started.elapsed());
    let (_, state) = server.get(&format!("/sandboxes/{id}")).reply().await;
    assert_ne!(state["state"], "running", "{state}");
}

/// A peer that closed its end answers further data with a RST the kernel
/// sends on its own; the writer must see it within seconds.
fn loopback_resets_arrive() {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (mut writer, _) = listener.accept().unwrap();
    drop(client);
    let deadline = Instant::now() + Duration::from_secs(5);
    while writer.write_all(b"x").is_ok() {
        assert!(
            Instant::now() < deadline,
            "the closed peer's RST never arrived: the host firewall ate it"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn host_free_bytes() -> u64 {
    let path = std::ffi::CString::new("/var/tmp").unwrap();
    // SAFETY: statvfs into a zeroed struct.
    unsafe {
        let mut stat: libc::statvfs = std::mem::zeroed();
        assert_eq!(libc::statvfs(path.as_ptr(), &mut stat), 0);
        stat.f_bavail * stat.f_frsize
    }
}

/// Rewrites the mode of `name` in a gzip tarball.
fn set_mode(archive: &[u8], name: &str, mode: u32) -> Vec<u8> {
    use std::io::Read;
    let mut tar_bytes = Vec::new();
    flate2::read::GzDecoder::new(archive)
        .read_to_end(&mut tar_bytes)
        .unwrap();
    let mut out = tar::Builder::new(Vec::new());
    for entry in tar::Archive::new(&tar_bytes[..]).entries().unwrap() {
        let mut entry = entry.unwrap();
        let mut header = entry.header().clone();
        if entry.path().unwrap().to_str() == Some(name) {
            header.set_mode(mode);
            header.set_cksum();
        }
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        out.append(&header, &data[..]).unwrap();
    }
    common::gzip(&out.into_inner().unwrap())
}

/// A host on a private network, in a network namespace of its own: a veth
/// pair, several addresses on the far side (one of them the cloud metadata
/// address) and an HTTP listener answering on all of them.
struct PrivateHost {
    netns: String,
    host_if: String,
    listener: std::process::Child,
    port: u16,
}

const NET: &str = "10.231.7";

impl PrivateHost {
    fn start() -> Option<PrivateHost> {
        let tag = std::process::id() % 100_000;
        let netns = format!("smesc{tag}");
        let host_if = format!("smesc{tag}h");
        let peer_if = format!("smesc{tag}n");
        let port = 18_000 + (tag % 1000) as u16;
        let ip = |args: &str| {
            std::process::Command::new("ip")
                .args(args.split_whitespace())
                .status()
                .is_ok_and(|s| s.success())
        };
        let setup = [
            format!("netns add {netns}"),
            format!("link add {host_if} type veth peer name {peer_if}"),
            format!("link set {peer_if} netns {netns}"),
            format!("addr add {NET}.1/24 dev {host_if}"),
            format!("link set {host_if} up"),
            format!("-n {netns} addr add {NET}.2/24 dev {peer_if}"),
            format!("-n {netns} addr add {NET}.3/24 dev {peer_if}"),
            format!("-n {netns} addr add {NET}.5/24 dev {peer_if}"),
            format!("-n {netns} addr add 169.254.169.254/32 dev {peer_if}"),
            format!("-n {netns} link set {peer_if} up"),
            format!("-n {netns} link set lo up"),
            format!("-n {netns} route add default dev {peer_if}"),
            format!("route replace 169.254.169.254/32 via {NET}.2"),
        ];
        for step in &setup {
            if !ip(step) {
                eprintln!(
                    "SKIP microVM egress test: `ip {step}` failed (iproute2 and netns needed)"
                );
                let _ = ip(&format!("netns del {netns}"));
                return None;
            }
        }
        let listener = std::process::Command::new("ip")
            .args(["netns", "exec", &netns, "python3", "-c"])
            .arg(format!(
                "import http.server as h\n\
                 class H(h.BaseHTTPRequestHandler):\n\
                 \x20   def do_GET(s):\n\
                 \x20       s.send_response(200); s.end_headers(); s.wfile.write(b'reached')\n\
                 \x20   def log_message(s, *a): pass\n\
                 h.ThreadingHTTPServer(('0.0.0.0', {port}), H).serve_forever()\n"
            ))
            .spawn()
            .unwrap();
        let host = PrivateHost {
            netns,
            host_if,
            listener,
            port,
        };
        // The destinations are live: the host itself reaches each of them.
        for addr in [
            format!("{NET}.2"),
            format!("{NET}.5"),
            "169.254.169.254".into(),
        ] {
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect_timeout(
                &format!("{addr}:{}", host.port).parse().unwrap(),
                Duration::from_millis(500),
            )
            .is_err()
            {
                assert!(Instant::now() < deadline, "test host {addr} never listened");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Some(host)
    }
}

impl Drop for PrivateHost {
    fn drop(&mut self) {
        let _ = self.listener.kill();
        let _ = self.listener.wait();
        let _ = std::process::Command::new("ip")
            .args([
                "route",
                "del",
                "169.254.169.254/32",
                "via",
                &format!("{NET}.2"),
            ])
            .status();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
    }
}

/// What an HTTP GET from inside the sandbox got: the body, or "blocked".
async fn probe(server: &TestServer, id: &str, port: u16, addr: impl std::fmt::Display) -> String {
    let cmd = format!("curl -s -m 10 http://{addr}:{port}/ || echo blocked");
    root(server, id, &cmd).await.1.trim().to_string()
}

/// A guest reaches the public internet and nothing else: not the metadata
/// service, not private ranges, not the host; a sandbox's deny_out closes
/// more and its allow_out reopens within what the operator allows.
#[tokio::test]
async fn microvm_egress_policy_is_enforced() {
    if !sandboxes_supported("microvm_egress_policy_is_enforced") {
        return;
    }
    let _alone = common::alone().await;
    if !common::is_microvm() {
        eprintln!(
            "SKIP microvm_egress_policy_is_enforced (namespace): namespace sandboxes have no \
             outbound network at all (sandboxes::sandboxes_are_isolated checks it)"
        );
        return;
    }
    let Some(host) = PrivateHost::start() else {
        return;
    };
    let definitions = small_disk_definitions();
    // The operator opens two private addresses (think: a package mirror).
    let server = TestServer::start(
        common::production()
            .with_sandboxes(2, 0)
            .with_setting(
                "runtime.template_definitions_dir",
                &definitions.path().display().to_string(),
            )
            .with_setting(
                "runtime.microvm.egress_allow",
                &format!("[\"{NET}.2/32\", \"{NET}.3/32\"]"),
            ),
    )
    .await;
    let port = host.port;
    let open = server.new_sandbox(json!({ "template": "base" })).await;
    assert_eq!(
        probe(&server, &open, port, format!("{NET}.2")).await,
        "reached",
        "operator-allowed address"
    );
    for (what, addr) in [
        ("the cloud metadata service", "169.254.169.254".to_string()),
        ("a private address", format!("{NET}.5")),
        ("the host's own address", format!("{NET}.1")),
        (
            "the host's loopback via the gateway",
            "10.0.2.2".to_string(),
        ),
    ] {
        assert_eq!(
            probe(&server, &open, port, addr).await,
            "blocked",
            "{what} reached"
        );
    }

    let denied = server
        .new_sandbox(
            json!({ "template": "base", "network": { "deny_out": [format!("{NET}.2/32")] } }),
        )
        .await;
    assert_eq!(
        probe(&server, &denied, port, format!("{NET}.2")).await,
        "blocked",
        "deny_out ignored"
    );
    assert_eq!(
        probe(&server, &denied, port, format!("{NET}.3")).await,
        "reached"
    );

    let only = server
        .new_sandbox(json!({ "template": "base", "network": {
            "deny_out": [format!("{NET}.0/24")], "allow_out": [format!("{NET}.3")] } }))
        .await;
    assert_eq!(
        probe(&server, &only, port, format!("{NET}.3")).await,
        "reached",
        "allow_out ignored"
    );
    assert_eq!(
        probe(&server, &only, port, format!("{NET}.2")).await,
        "blocked"
    );

    // A sandbox cannot open what the operator keeps closed.
    let greedy = server.new_sandbox(json!({ "template": "base", "network": { "allow_out": ["169.254.169.254", format!("{NET}.5")] } }),
    )
    .await;
    assert_eq!(
        probe(&server, &greedy, port, "169.254.169.254").await,
        "blocked"
    );
    assert_eq!(
        probe(&server, &greedy, port, format!("{NET}.5")).await,
        "blocked"
    );

    // Bad entries are the client's error.
    let (status, _) = server
        .create_sandbox(json!({ "template": "base", "network": { "deny_out": ["10.0.0.0/99"] } }))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    drop(host);
}

/// A sandbox's QEMU and relay run as its own unprivileged uid, without
/// capabilities; QEMU under its seccomp filter.
#[tokio::test]
async fn microvm_qemu_runs_unprivileged() {
    if !sandboxes_supported("microvm_qemu_runs_unprivileged") {
        return;
    }
    let _alone = common::alone().await;
    if !common::is_microvm() {
        eprintln!("SKIP microvm_qemu_runs_unprivileged (namespace): no QEMU");
        return;
    }
    let definitions = small_disk_definitions();
    let server = server(&definitions).await;
    let id = server.new_sandbox(json!({ "template": "base" })).await;
    for (process, pid_file) in [("QEMU", "vm.pid"), ("the relay", "relay.pid")] {
        let pid =
            std::fs::read_to_string(server.sandbox_state_dir().join(&id).join(pid_file)).unwrap();
        let pid = pid.split_whitespace().next().unwrap().to_string();
        let status = host_read(&format!("/proc/{pid}/status"));
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_default()
                .to_string()
        };
        let uid: u64 = field("Uid:")
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        assert!(uid >= 1_000_000, "{process} runs as uid {uid}");
        assert_eq!(field("CapEff:"), "CapEff:\t0000000000000000", "{process}");
        assert_eq!(field("CapPrm:"), "CapPrm:\t0000000000000000", "{process}");
        assert_eq!(field("NoNewPrivs:"), "NoNewPrivs:\t1", "{process}");
        if process == "QEMU" {
            assert_eq!(field("Seccomp:"), "Seccomp:\t2");
        }
    }
    // The host's own traffic is untouched by the egress table: a reset the
    // kernel sends for a closed loopback socket (no socket, so no gid)
    // still arrives.
    loopback_resets_arrive();
    // The sandbox still works after a restore under that uid.
    assert_eq!(root(&server, &id, "echo ok").await, (0, "ok\n".into()));
}
