//! `GET /usage`: CPU, memory and disk figures from the kernel envd runs on.
//! In a VM that kernel is the sandbox's own, so the figures are the
//! sandbox's; a container's host reads CPU and memory from its cgroup.

use std::io;

use axum::Json;
use envd_protocol::Usage;
use tokio::task::spawn_blocking;

use crate::error::{ApiError, ApiResult};

pub async fn usage() -> ApiResult<Json<Usage>> {
    let usage = spawn_blocking(read_usage)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(format!("reading usage: {e}")))?;
    Ok(Json(usage))
}

fn read_usage() -> io::Result<Usage> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    let (cpu_busy_usec, cpu_count) = cpu_busy(&stat);
    let (memory_total_bytes, memory_used_bytes) = memory(&meminfo);
    let mut fs: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a zeroed out-parameter.
    if unsafe { libc::statvfs(c"/".as_ptr(), &mut fs) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let block = fs.f_frsize;
    Ok(Usage {
        cpu_busy_usec,
        cpu_count,
        memory_used_bytes,
        memory_total_bytes,
        disk_used_bytes: (fs.f_blocks - fs.f_bfree) * block,
        disk_total_bytes: fs.f_blocks * block,
    })
}

/// Busy time (everything but idle and iowait) summed over CPUs, from the
/// `cpu` line of `/proc/stat` (in USER_HZ = 100 ticks per second on Linux).
fn cpu_busy(stat: &str) -> (u64, u32) {
    const USEC_PER_TICK: u64 = 10_000;
    let mut busy = 0;
    let mut count = 0;
    for line in stat.lines() {
        let mut fields = line.split_ascii_whitespace();
        match fields.next() {
            Some("cpu") => {
                let ticks: Vec<u64> = fields.filter_map(|f| f.parse().ok()).collect();
                let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
                // guest and guest_nice (8, 9) are already in user and nice.
                let total: u64 = ticks.iter().take(8).sum();
                busy = total.saturating_sub(idle) * USEC_PER_TICK;
            }
            Some(name) if name.starts_with("cpu") => count += 1,
            _ => {}
        }
    }
    (busy, count)
}

/// (total, used) bytes, used being what is not available for new work.
fn memory(meminfo: &str) -> (u64, u64) {
    let field = |name: &str| {
        meminfo
            .lines()
            .find_map(|l| {
                l.strip_prefix(name)?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
            * 1024
    };
    let total = field("MemTotal:");
    (total, total.saturating_sub(field("MemAvailable:")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_and_memory_lines_parse() {
        let stat = "cpu  100 5 50 1000 20 1 2 3 0 0\ncpu0 50 2 25 500 10 0 1 1 0 0\ncpu1 50 3 25 500 10 1 1 2 0 0\nintr 1\n";
        assert_eq!(cpu_busy(stat), ((100 + 5 + 50 + 1 + 2 + 3) * 10_000, 2));
        let meminfo =
            "MemTotal:        2048 kB\nMemFree:          100 kB\nMemAvailable:     512 kB\n";
        assert_eq!(memory(meminfo), (2048 * 1024, 1536 * 1024));
    }
}
