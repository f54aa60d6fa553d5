//! Repeated boot/destroy cycles leave nothing behind. Root only.

mod common;

use std::time::{Duration, Instant};

use envd_protocol::client::EnvdClient;
use envd_protocol::types::ProcessRequest;
use sandbox_runtime::Runtime;

const CYCLES: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_destroy_cycles_leave_nothing_behind() {
    common::init_tracing();
    if common::should_skip("boot_destroy_cycles_leave_nothing_behind") {
        return;
    }
    let rootfs = common::base_rootfs().await;
    let state = common::state_dir();
    let runtime = common::runtime(state.path());

    let mut boots = Vec::new();
    let mut destroys = Vec::new();
    for cycle in 0..CYCLES {
        let id = common::unique_id(&format!("leak{cycle}"));
        let mut cleanup = common::Cleanup::new(state.path());
        cleanup.track(&id);
        let spec = common::spec(&id, &rootfs);
        let t = Instant::now();
        let booted = runtime.boot(spec.clone()).await.expect("boot");
        boots.push(t.elapsed());

        // Leave some state behind to clean up: a file, a background process.
        let client = EnvdClient::unix(&booted.envd_socket, spec.token.clone());
        let result = client
            .run(&ProcessRequest::new(
                "echo data > ~/f && (sleep 300 >/dev/null 2>&1 &) && cat ~/f",
            ))
            .await
            .expect("run");
        assert_eq!(result.stdout.trim(), "data");

        let t = Instant::now();
        runtime.destroy(&id).await.expect("destroy");
        destroys.push(t.elapsed());
        let left = common::leftovers(state.path(), &id);
        assert!(left.is_empty(), "cycle {cycle}: {left:#?}");
    }
    assert!(runtime.list().await.unwrap().is_empty());
    // Only the runtime's bookkeeping stays: the envd copy, and no id claim.
    let remaining: Vec<String> = std::fs::read_dir(state.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(remaining, [".envd"]);
    let state_dir = state.path().display().to_string();
    let claims: Vec<_> = std::fs::read_dir("/run/sandbox-manager/uid-slots")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path()).is_ok_and(|holder| holder.starts_with(&state_dir))
        })
        .collect();
    assert!(claims.is_empty(), "id slots still claimed: {claims:?}");
    println!("boot    {}", summary(&boots));
    println!("destroy {}", summary(&destroys));
}

fn summary(samples: &[Duration]) -> String {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let total: Duration = sorted.iter().sum();
    format!(
        "n={} min={:?} median={:?} mean={:?} max={:?}",
        sorted.len(),
        sorted[0],
        sorted[sorted.len() / 2],
        total / sorted.len() as u32,
        sorted[sorted.len() - 1]
    )
}
