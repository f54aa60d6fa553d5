//! A PostgreSQL instance of its own (own data dir and port), for tests that
//! stop and restart the database under traffic without disturbing the
//! machine's shared cluster.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct PrivatePostgres {
    dir: PathBuf,
    port: u16,
    bin: PathBuf,
}

fn bin_dir() -> PathBuf {
    let versions = std::fs::read_dir("/usr/lib/postgresql").expect("PostgreSQL is installed");
    let mut dirs: Vec<PathBuf> = versions.flatten().map(|e| e.path().join("bin")).collect();
    dirs.sort();
    dirs.pop().expect("a PostgreSQL version")
}

/// Runs a PostgreSQL tool as the `postgres` user (it refuses root).
fn as_postgres(bin: &Path, tool: &str, args: &[&str]) {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin.join(tool))
        .args(args)
        .output()
        .expect("runuser");
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl PrivatePostgres {
    pub fn start(name: &str, port: u16) -> Self {
        let dir = PathBuf::from(format!("/var/tmp/sandbox-manager-pg-{name}"));
        let pg = PrivatePostgres {
            dir,
            port,
            bin: bin_dir(),
        };
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(pg.bin.join("pg_ctl"))
            .args(["stop", "-m", "immediate", "-D"])
            .arg(pg.data())
            .output();
        let _ = std::fs::remove_dir_all(&pg.dir);
        std::fs::create_dir_all(&pg.dir).unwrap();
        Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&pg.dir)
            .status()
            .unwrap();
        let data = pg.data().display().to_string();
        as_postgres(
            &pg.bin,
            "initdb",
            &["-D", &data, "-A", "trust", "-U", "postgres"],
        );
        pg.resume();
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Fast shutdown: open connections are cut, as in a restart.
    pub fn stop(&self) {
        let data = self.data().display().to_string();
        as_postgres(
            &self.bin,
            "pg_ctl",
            &["stop", "-m", "fast", "-w", "-D", &data],
        );
    }

    pub fn resume(&self) {
        let data = self.data().display().to_string();
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {}",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("log").display().to_string();
        as_postgres(
            &self.bin,
            "pg_ctl",
            &["start", "-w", "-D", &data, "-l", &log, "-o", &options],
        );
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["stop", "-m", "immediate", "-D"])
            .arg(self.data())
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
