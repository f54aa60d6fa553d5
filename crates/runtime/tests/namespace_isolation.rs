//! Two sandboxes side by side: users, hostname, filesystem, process and
//! network isolation, cgroup limits, and a clean destroy. Root only.

mod common;

use std::time::Instant;

use envd_protocol::client::EnvdClient;
use envd_protocol::types::ProcessRequest;
use sandbox_runtime::namespace::cgroups::{CgroupVersion, SandboxCgroup};
use sandbox_runtime::{Runtime, RuntimeError};

async fn sh(client: &EnvdClient, user: &str, cmd: &str) -> (i32, String, String) {
    let mut request = ProcessRequest::new(cmd);
    request.user = user.to_string();
    request.timeout = Some(20);
    let result = client.run(&request).await.expect("envd run");
    (
        result.exit_code,
        result.stdout.trim().to_string(),
        result.stderr,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sandboxes_are_isolated_and_destroyed_cleanly() {
    common::init_tracing();
    if common::should_skip("two_sandboxes_are_isolated_and_destroyed_cleanly") {
        return;
    }
    let rootfs = common::base_rootfs().await;
    let state = common::state_dir();
    let runtime = common::runtime(state.path());
    assert_eq!(runtime.kind(), "namespace");

    let id_a = common::unique_id("iso-a");
    let id_b = common::unique_id("iso-b");
    let mut cleanup = common::Cleanup::new(state.path());
    cleanup.track(&id_a);
    cleanup.track(&id_b);
    let spec_a = common::spec(&id_a, &rootfs);
    let spec_b = common::spec(&id_b, &rootfs);

    let t = Instant::now();
    let booted_a = runtime.boot(spec_a.clone()).await.expect("boot A");
    println!("boot A: {:?}", t.elapsed());
    let t = Instant::now();
    let booted_b = runtime.boot(spec_b.clone()).await.expect("boot B");
    println!("boot B: {:?}", t.elapsed());
    assert_eq!(booted_a.envd_socket, runtime.envd_socket(&id_a));

    // Booting an existing id is refused and leaves the running one intact.
    assert!(matches!(
        runtime.boot(spec_a.clone()).await,
        Err(RuntimeError::AlreadyExists(_))
    ));

    let a = EnvdClient::unix(&booted_a.envd_socket, spec_a.token.clone());
    let b = EnvdClient::unix(&booted_b.envd_socket, spec_b.token.clone());

    // Users: envd runs commands as `user` by default and as root on request.
    assert_eq!(sh(&a, "user", "id -un").await.1, "user");
    assert_eq!(
        sh(&a, "user", "id -u; echo $HOME").await.1,
        "1000\n/home/user"
    );
    assert_eq!(sh(&a, "root", "id -un").await.1, "root");
    // The token file was consumed by envd; `volumes` (the volume layers'
    // private dirs) is a host-root mount point root inside cannot enter.
    assert_eq!(
        sh(&a, "root", "ls /.envd").await.1,
        "envd\nenvd.sock\nvolumes"
    );
    assert!(sh(&a, "root", "ls /.envd/volumes 2>&1")
        .await
        .1
        .contains("Permission denied"));

    // Hostname is the sandbox id.
    assert_eq!(sh(&a, "user", "hostname").await.1, id_a);
    assert_eq!(sh(&b, "user", "hostname").await.1, id_b);

    // Filesystem: a file written in A is absent in B (and /tmp too).
    let (code, _, _) = sh(&a, "user", "echo hi > ~/only-in-a && echo x > /tmp/a-tmp").await;
    assert_eq!(code, 0);
    assert_eq!(sh(&a, "user", "cat ~/only-in-a").await.1, "hi");
    assert_ne!(sh(&b, "user", "test -e ~/only-in-a").await.0, 0);
    assert_ne!(sh(&b, "user", "test -e /tmp/a-tmp").await.0, 0);
    // The template itself is untouched.
    assert!(!rootfs.join("home/user/only-in-a").exists());
    // The host's root filesystem is not reachable (pivot_root + detach).
    assert_ne!(sh(&a, "root", "test -e /.oldroot/proc/1").await.0, 0);

    // Processes: B's processes are invisible from A.
    let sleeper = b
        .start(&ProcessRequest::new("sleep 4242"))
        .await
        .expect("start in B");
    assert!(sleeper > 0);
    let (_, ps_b, _) = sh(&b, "root", "ps -eo args").await;
    assert!(
        ps_b.contains("sleep 4242"),
        "sanity: B sees its own sleep: {ps_b}"
    );
    let (_, ps_a, _) = sh(&a, "root", "ps -eo pid,args").await;
    assert!(!ps_a.contains("sleep 4242"), "A sees B's process: {ps_a}");
    let (_, pid1, _) = sh(&a, "root", "cat /proc/1/cmdline | tr '\\0' ' '").await;
    assert!(
        pid1.starts_with("/.envd/envd"),
        "PID 1 in A is envd: {pid1}"
    );
    let (_, proc_count, _) = sh(&a, "root", "ls /proc | grep -c '^[0-9]'").await;
    let proc_count: u32 = proc_count.parse().unwrap();
    assert!(proc_count < 10, "A's /proc shows {proc_count} processes");

    // Network: only lo; no path to the host's loopback services or outside.
    let host_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    host_listener.set_nonblocking(true).unwrap();
    let port = host_listener.local_addr().unwrap().port();
    let (code, _, _) = sh(
        &a,
        "user",
        &format!("curl -sS --max-time 3 http://127.0.0.1:{port}/"),
    )
    .await;
    assert_ne!(code, 0, "A reached the host's 127.0.0.1:{port}");
    assert!(
        host_listener.accept().is_err(),
        "host listener got a connection"
    );
    let (_, interfaces, _) = sh(&a, "user", "tail -n +3 /proc/net/dev | cut -d: -f1").await;
    assert_eq!(interfaces.trim(), "lo", "A has only lo");
    let (code, _, _) = sh(&a, "user", "curl -sS --max-time 3 http://1.1.1.1/").await;
    assert_ne!(code, 0, "A reached the outside network");
    // lo works inside the sandbox (it was brought up).
    let (code, _, stderr) = sh(&a, "user", "curl -sS --max-time 3 http://127.0.0.1:1/").await;
    assert_ne!(code, 0);
    assert!(
        stderr.contains("refused") || stderr.contains("Couldn't connect"),
        "{stderr}"
    );
    // B's agent socket is not visible from A.
    assert_ne!(
        sh(&a, "root", &format!("ls / /.envd | grep -F {id_b}"))
            .await
            .0,
        0
    );

    // Limits are in the cgroup, and every sandbox process is in it.
    let cgroup = SandboxCgroup::for_sandbox(&id_a).unwrap();
    let read = |file: &str| -> String {
        cgroup
            .dirs()
            .iter()
            .map(|d| d.join(file))
            .find(|p| p.exists())
            .map(|p| std::fs::read_to_string(p).unwrap().trim().to_string())
            .unwrap_or_else(|| panic!("{file} not found"))
    };
    match cgroup.version() {
        CgroupVersion::V1 => {
            assert_eq!(read("memory.limit_in_bytes"), (256u64 << 20).to_string());
            assert_eq!(read("cpu.cfs_quota_us"), "100000");
        }
        CgroupVersion::V2 => {
            assert_eq!(read("memory.max"), (256u64 << 20).to_string());
            assert_eq!(read("cpu.max"), "100000 100000");
        }
    }
    assert_eq!(read("pids.max"), "100");
    // The memory limit is enforced: one 400 MB line held by `tail` in a
    // 256 MB sandbox gets OOM-killed (swap is capped too).
    let (code, _, _) = sh(
        &a,
        "user",
        "head -c 400000000 /dev/zero | tail -n 1 >/dev/null",
    )
    .await;
    assert_ne!(code, 0, "400 MB fit into a 256 MB sandbox");
    assert_eq!(
        sh(&a, "user", "echo alive").await.1,
        "alive",
        "envd survived the OOM"
    );
    let pids = cgroup.pids();
    assert!(pids.len() >= 2, "launcher + envd in the cgroup: {pids:?}");

    // Liveness and listing (used for restart reconciliation).
    assert!(runtime.is_alive(&id_a).await);
    let mut listed = runtime.list().await.unwrap();
    listed.sort();
    let mut expected = vec![id_a.clone(), id_b.clone()];
    expected.sort();
    assert_eq!(listed, expected);

    for id in [&id_a, &id_b] {
        let t = Instant::now();
        runtime.destroy(id).await.expect("destroy");
        println!("destroy {id}: {:?}", t.elapsed());
        let left = common::leftovers(state.path(), id);
        assert!(
            left.is_empty(),
            "leftovers after destroying {id}: {left:#?}"
        );
        assert!(!runtime.is_alive(id).await);
    }
    // Idempotent.
    runtime
        .destroy(&id_a)
        .await
        .expect("second destroy is a no-op");
    assert!(runtime.list().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_survive_a_new_runtime_instance_and_are_readopted() {
    common::init_tracing();
    if common::should_skip("sandboxes_survive_a_new_runtime_instance_and_are_readopted") {
        return;
    }
    let rootfs = common::base_rootfs().await;
    let state = common::state_dir();
    let id = common::unique_id("adopt");
    let mut cleanup = common::Cleanup::new(state.path());
    cleanup.track(&id);
    let spec = common::spec(&id, &rootfs);
    {
        let first = common::runtime(state.path());
        first.boot(spec.clone()).await.expect("boot");
    } // the "server" goes away; the launcher keeps running

    let second = common::runtime(state.path());
    assert_eq!(second.list().await.unwrap(), vec![id.clone()]);
    assert!(second.is_alive(&id).await);
    let client = EnvdClient::unix(second.envd_socket(&id), spec.token.clone());
    assert_eq!(sh(&client, "user", "echo still-here").await.1, "still-here");

    second.destroy(&id).await.unwrap();
    let left = common::leftovers(state.path(), &id);
    assert!(left.is_empty(), "{left:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_launcher_takes_the_sandbox_down() {
    common::init_tracing();
    if common::should_skip("killing_the_launcher_takes_the_sandbox_down") {
        return;
    }
    let rootfs = common::base_rootfs().await;
    let state = common::state_dir();
    let runtime = common::runtime(state.path());
    let id = common::unique_id("crash");
    let mut cleanup = common::Cleanup::new(state.path());
    cleanup.track(&id);
    runtime
        .boot(common::spec(&id, &rootfs))
        .await
        .expect("boot");

    // Kill the launcher from outside: PDEATHSIG takes the sandbox down.
    let pid: i32 = std::fs::read_to_string(state.path().join(&id).join("launcher.pid"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // SAFETY: plain kill(2) of the launcher we just booted.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    while runtime.is_alive(&id).await {
        assert!(
            Instant::now() < deadline,
            "sandbox still alive after its launcher died"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Still listed until destroyed (the server reconciles it away).
    assert_eq!(runtime.list().await.unwrap(), vec![id.clone()]);
    runtime.destroy(&id).await.unwrap();
    let left = common::leftovers(state.path(), &id);
    assert!(left.is_empty(), "{left:#?}");
}

#[tokio::test]
async fn invalid_specs_are_rejected_without_side_effects() {
    if common::should_skip("invalid_specs_are_rejected_without_side_effects") {
        return;
    }
    let state = common::state_dir();
    let runtime = common::runtime(state.path());
    let mut bad_id = common::spec("../escape", std::path::Path::new("/"));
    assert!(matches!(
        runtime.boot(bad_id.clone()).await,
        Err(RuntimeError::InvalidSpec(_))
    ));
    bad_id.id = "ok-id".into();
    bad_id.rootfs = state.path().join("no-such-rootfs");
    assert!(matches!(
        runtime.boot(bad_id).await,
        Err(RuntimeError::InvalidSpec(_))
    ));
    assert!(runtime.list().await.unwrap().is_empty());
    runtime
        .destroy("never-existed")
        .await
        .expect("destroying nothing is fine");
}
