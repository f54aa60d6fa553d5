//! Process API through the real binary and the envd-protocol client.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{is_root, Envd};
use envd_protocol::{ProcessEvent, ProcessRequest};
use futures::StreamExt;

fn request(cmd: &str) -> ProcessRequest {
    ProcessRequest::new(cmd)
}

#[tokio::test]
async fn foreground_output_exit_code_env_and_cwd() {
    let envd = Envd::start().await;
    let client = &envd.client;

    let result = client
        .run(&request("echo out; echo err >&2; exit 3"))
        .await
        .unwrap();
    assert_eq!(
        (
            result.stdout.as_str(),
            result.stderr.as_str(),
            result.exit_code
        ),
        ("out\n", "err\n", 3)
    );
    assert!(!result.timed_out);

    // Default cwd is the user's home, mapped under the root.
    let pwd = client.run(&request("pwd")).await.unwrap();
    let home = envd.host("/home/user").canonicalize().unwrap();
    assert_eq!(pwd.stdout.trim_end(), home.to_str().unwrap());
    let mut in_tmp = request("pwd");
    in_tmp.cwd = Some("/tmp".into());
    assert_eq!(
        client.run(&in_tmp).await.unwrap().stdout.trim_end(),
        envd.host("/tmp").canonicalize().unwrap().to_str().unwrap()
    );
    let mut bad_cwd = request("pwd");
    bad_cwd.cwd = Some("/does/not/exist".into());
    assert_eq!(client.run(&bad_cwd).await.unwrap_err().status(), Some(400));

    // Request envs are merged over the sandbox env.
    client
        .set_env(BTreeMap::from([
            ("A".to_string(), "1".to_string()),
            ("B".to_string(), "2".to_string()),
        ]))
        .await
        .unwrap();
    let mut with_env = request("echo $A $B $USER; env | grep -c ENVD_ACCESS_TOKEN || true");
    with_env.envs.insert("B".into(), "3".into());
    assert_eq!(client.run(&with_env).await.unwrap().stdout, "1 3 user\n0\n");

    let unknown = client
        .run(&ProcessRequest {
            user: "nobody".into(),
            ..request("true")
        })
        .await
        .unwrap_err();
    assert_eq!(
        (unknown.status(), unknown.code()),
        (Some(400), Some("unknown_user"))
    );

    // Invalid UTF-8 comes back lossily.
    let bytes = client.run(&request("printf 'a\\377b'")).await.unwrap();
    assert_eq!(bytes.stdout, "a\u{fffd}b");
}

#[tokio::test]
async fn user_switching() {
    if !is_root() {
        println!("SKIP user_switching: needs root to switch users");
        return;
    }
    let envd = Envd::start().await;
    let as_user = envd
        .client
        .run(&request("id -u; id -g; id -G"))
        .await
        .unwrap();
    assert_eq!(as_user.stdout, "1000\n1000\n1000 100\n");
    let as_root = envd
        .client
        .run(&ProcessRequest {
            user: "root".into(),
            ..request("id -u")
        })
        .await
        .unwrap();
    assert_eq!(as_root.stdout, "0\n");
    // The user can write in its home but not in root's.
    let touch = envd
        .client
        .run(&request("touch mine && touch ../../root/theirs"))
        .await
        .unwrap();
    assert_ne!(touch.exit_code, 0);
    assert!(envd.host("/home/user/mine").exists());
    assert!(!envd.host("/root/theirs").exists());
}

#[tokio::test]
async fn timeout_kills_the_process_group() {
    let envd = Envd::start().await;
    let started = Instant::now();
    let mut slow = request("sleep 30 & echo $!; sleep 30");
    slow.timeout = Some(1);
    let result = envd.client.run(&slow).await.unwrap();
    assert!(result.timed_out);
    assert_eq!(result.exit_code, envd_protocol::TIMEOUT_EXIT_CODE);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    let grandchild: i32 = result.stdout.trim().parse().unwrap();
    assert_gone(grandchild).await;
}

async fn assert_gone(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
        // Gone, or a zombie waiting for its (host) parent to reap it.
        let alive = state.is_some_and(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        });
        if !alive {
            return;
        }
        assert!(Instant::now() < deadline, "process {pid} survived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn background_kill_takes_the_whole_tree() {
    let envd = Envd::start().await;
    let pid = envd
        .client
        .start(&request(
            "sleep 300 & echo $! > /proc/$$/cwd/child.pid; sleep 300",
        ))
        .await
        .unwrap();
    let pid_file = envd.host("/home/user/child.pid");
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(&pid_file)
        .map(|s| s.trim().is_empty())
        .unwrap_or(true)
    {
        assert!(Instant::now() < deadline, "child pid never written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let grandchild: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    let listed = envd.client.list_processes().await.unwrap();
    assert!(
        listed
            .iter()
            .any(|p| p.pid == pid && p.running && p.cmd.contains("sleep 300")),
        "{listed:?}"
    );
    assert!(envd.client.kill(pid).await.unwrap());
    assert!(!envd.client.kill(pid).await.unwrap(), "no longer tracked");
    assert_gone(pid as i32).await;
    assert_gone(grandchild).await;
    assert!(envd
        .client
        .list_processes()
        .await
        .unwrap()
        .iter()
        .all(|p| p.pid != pid));
    assert_eq!(envd.client.wait(pid).await.unwrap_err().status(), Some(404));
}

#[tokio::test]
async fn background_stdin_and_wait() {
    let envd = Envd::start().await;
    let pid = envd
        .client
        .start(&ProcessRequest {
            stdin: true,
            ..request("cat; echo done >&2; exit 5")
        })
        .await
        .unwrap();
    envd.client.write_stdin(pid, "hello ").await.unwrap();
    envd.client.write_stdin(pid, "world\n").await.unwrap();
    envd.client.close_stdin(pid).await.unwrap();
    let result = envd.client.wait(pid).await.unwrap();
    assert_eq!(
        (
            result.stdout.as_str(),
            result.stderr.as_str(),
            result.exit_code
        ),
        ("hello world\n", "done\n", 5)
    );
    // Without a stdin pipe, writing is a conflict.
    let other = envd.client.start(&request("sleep 5")).await.unwrap();
    assert_eq!(
        envd.client
            .write_stdin(other, "x")
            .await
            .unwrap_err()
            .status(),
        Some(409)
    );
    assert!(envd.client.kill(other).await.unwrap());
}

#[tokio::test]
async fn streamed_output_keeps_order_and_ends_with_exit() {
    let envd = Envd::start().await;
    let cmd = "for i in 1 2 3; do echo out$i; sleep 0.1; echo err$i >&2; sleep 0.1; done; exit 7";
    let mut events = envd.client.stream(&request(cmd)).await.unwrap();
    let mut seen = Vec::new();
    while let Some(event) = events.next().await {
        seen.push(event.unwrap());
    }
    assert!(
        matches!(seen.first(), Some(ProcessEvent::Start { .. })),
        "{seen:?}"
    );
    assert_eq!(
        seen.last(),
        Some(&ProcessEvent::Exit {
            exit_code: 7,
            timed_out: false
        })
    );
    let output: Vec<String> = seen
        .iter()
        .filter_map(|event| match event {
            ProcessEvent::Stdout { data } | ProcessEvent::Stderr { data } => Some(data.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(output.concat(), "out1\nerr1\nout2\nerr2\nout3\nerr3\n");
}

#[tokio::test]
async fn output_is_bounded_and_truncation_reported() {
    let envd = Envd::start_with(&["--max-output-bytes", "1000"]).await;
    let result = envd
        .client
        .run(&request(
            "head -c 100000 /dev/zero | tr '\\0' a; echo small >&2",
        ))
        .await
        .unwrap();
    assert_eq!(result.stdout.len(), 1000);
    assert!(result.stdout_truncated);
    assert_eq!(result.stderr, "small\n");
    assert!(!result.stderr_truncated);
}

#[tokio::test]
async fn concurrent_requests() {
    let envd = Envd::start().await;
    let started = Instant::now();
    let runs = (0..16).map(|i| {
        let client = envd.client.clone();
        async move {
            client
                .run(&request(&format!("sleep 0.5; echo {i}")))
                .await
                .unwrap()
                .stdout
        }
    });
    let writes = (0..16).map(|i| {
        let client = envd.client.clone();
        async move {
            client
                .write_bytes(&format!("/tmp/c{i}"), "user", format!("content {i}"))
                .await
                .unwrap();
            client
                .read_to_bytes(&format!("/tmp/c{i}"), "user")
                .await
                .unwrap()
        }
    });
    let (outputs, contents) = tokio::join!(
        futures::future::join_all(runs),
        futures::future::join_all(writes)
    );
    for (i, output) in outputs.iter().enumerate() {
        assert_eq!(output, &format!("{i}\n"));
    }
    for (i, content) in contents.iter().enumerate() {
        assert_eq!(content, format!("content {i}").as_bytes());
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "not concurrent: {:?}",
        started.elapsed()
    );
}
