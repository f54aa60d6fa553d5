//! Create latency over HTTP: warm pool (sequential and a burst the size of
//! the pool), cold (no pool), and the `commands.run("true")` round trip.

use crate::stats::summarize;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};
use testkit::{ServerOptions, TestServer};

async fn create(server: &TestServer) -> (Duration, String) {
    let started = Instant::now();
    let response = server
        .post("/sandboxes")
        .json(&json!({ "template": "base" }))
        .send()
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(
        response.status().as_u16(),
        201,
        "create failed: {}",
        response.text().await.unwrap()
    );
    let body: Value = response.json().await.unwrap();
    (elapsed, body["sandbox_id"].as_str().unwrap().to_string())
}

async fn kill(server: &TestServer, id: &str) {
    server
        .delete(&format!("/sandboxes/{id}"))
        .send()
        .await
        .unwrap();
}

/// One binary's figures.
struct Figures {
    warm: Vec<Duration>,
    burst: Vec<Duration>,
    round_trips: Vec<Duration>,
    cold: Vec<Duration>,
    hits: f64,
}

/// Which samples of a [`Figures`] a printed row shows.
type Pick = fn(&Figures) -> &Vec<Duration>;

const POOL: usize = 8;
const WARM_CREATES: usize = 200;

/// Measures `binary`; with `baseline`, measures that one too, in the same
/// run, and prints each figure as a ratio against it (e.g. the cost of a
/// change: `--baseline-server` = the binary built before it).
pub async fn run(binary: &Path, baseline: Option<&Path>) -> anyhow::Result<()> {
    let current = measure(binary).await?;
    let before = match baseline {
        Some(baseline) => Some(measure(baseline).await?),
        None => None,
    };
    println!("sandbox create (namespace runtime, HTTP)");
    let rows: [(&str, Pick); 4] = [
        ("warm, concurrency 1", |f| &f.warm),
        ("warm, burst of 8", |f| &f.burst),
        ("commands.run(\"true\")", |f| &f.round_trips),
        ("cold (pool size 0)", |f| &f.cold),
    ];
    for (name, pick) in rows {
        let now = summarize(pick(&current));
        println!("  {name:<24} : {now}");
        if let Some(before) = &before {
            let then = summarize(pick(before));
            println!(
                "  {:<24} : {then}   → p50 {:.2}x, p99 {:.2}x",
                "  baseline",
                now.p50 / then.p50,
                now.p99 / then.p99
            );
        }
    }
    let warm_p50 = summarize(&current.warm).p50;
    println!(
        "  cold p50 / warm p50      : {:.1}x",
        summarize(&current.cold).p50 / warm_p50
    );
    println!(
        "  pool hits (sequential)   : {:.0} of {WARM_CREATES}",
        current.hits
    );
    println!("  targets: warm p50 <= 30 ms, p99 <= 100 ms");
    Ok(())
}

async fn measure(binary: &Path) -> anyhow::Result<Figures> {
    eprintln!("measuring {}", binary.display());
    let server = TestServer::start(ServerOptions::production(binary).with_sandboxes(POOL, 0)).await;
    server.wait_for_pool(POOL).await;

    // Sequential warm creates; the pool refills between them as it would
    // under a steady request rate (each create is followed by a kill).
    let mut warm = Vec::new();
    for _ in 0..WARM_CREATES {
        let (elapsed, id) = create(&server).await;
        warm.push(elapsed);
        kill(&server, &id).await;
        server.wait_for_pool(POOL).await;
    }
    let hits = server
        .metric_where("pool_claims_total", "result=\"hit\"")
        .await;

    // A burst the size of the pool, all at once.
    server.wait_for_pool(POOL).await;
    let burst = futures::future::join_all((0..POOL).map(|_| create(&server))).await;
    let burst_latencies: Vec<Duration> = burst.iter().map(|(d, _)| *d).collect();

    // commands.run("true") round trip.
    let target = &burst[0].1;
    let mut round_trips = Vec::new();
    for _ in 0..200 {
        let started = Instant::now();
        let response = server
            .post(&format!("/sandboxes/{target}/commands"))
            .json(&json!({ "cmd": "true", "background": false, "user": "user", "timeout": 60 }))
            .send()
            .await?;
        anyhow::ensure!(response.status().is_success());
        response.bytes().await?;
        round_trips.push(started.elapsed());
    }
    for (_, id) in &burst {
        kill(&server, id).await;
    }
    drop(server);

    // Cold: no pool, every create boots on the request path.
    let cold_server =
        TestServer::start(ServerOptions::production(binary).with_sandboxes(0, 0)).await;
    let mut cold = Vec::new();
    for _ in 0..30 {
        let (elapsed, id) = create(&cold_server).await;
        cold.push(elapsed);
        kill(&cold_server, &id).await;
    }
    Ok(Figures {
        warm,
        burst: burst_latencies,
        round_trips,
        cold,
        hits,
    })
}
