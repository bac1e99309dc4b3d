//! A throwaway PostgreSQL cluster from the machine's binaries, for
//! `serve --dev` without DATABASE_URL and for the test harness.
//!
//! initdb into a fresh temp dir, pg_ctl on a free loopback port. As root
//! (CI), the server runs as the `postgres` OS user, since initdb and postgres
//! refuse to run as root. A watchdog shell outlives nothing: it stops the
//! cluster and removes its directory as soon as the owning process is gone,
//! even if that process was killed and never ran its destructors.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("no PostgreSQL binaries found under /usr/lib/postgresql/*/bin (install the postgresql package, or set POSTLINE_PG_BIN)")]
    NoBinaries,
    #[error("{step} failed: {detail}")]
    Step { step: &'static str, detail: String },
}

#[derive(Debug, Clone, Copy)]
pub struct ClusterOptions {
    /// Keep fsync on (benchmarks that claim durability); off makes tests faster.
    pub fsync: bool,
    pub max_connections: u32,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            fsync: false,
            max_connections: 400,
        }
    }
}

/// A running throwaway cluster; dropping it stops the server and deletes its files.
#[derive(Debug)]
pub struct Cluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    as_postgres_user: bool,
    opts: ClusterOptions,
}

/// The highest-versioned PostgreSQL bin directory on this machine.
pub fn find_bin_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("POSTLINE_PG_BIN") {
        return Some(PathBuf::from(p));
    }
    let mut best: Option<(u32, PathBuf)> = None;
    for entry in std::fs::read_dir("/usr/lib/postgresql").ok()?.flatten() {
        let version: Option<u32> = entry.file_name().to_str().and_then(|s| s.parse().ok());
        let bin = entry.path().join("bin");
        if let Some(v) = version {
            if bin.join("initdb").exists() && best.as_ref().is_none_or(|(b, _)| v > *b) {
                best = Some((v, bin));
            }
        }
    }
    best.map(|(_, p)| p)
}

fn running_as_root() -> bool {
    // /proc/self is owned by the process's effective uid.
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn free_port() -> Result<u16, ClusterError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| ClusterError::Step {
        step: "finding a free port",
        detail: e.to_string(),
    })?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| ClusterError::Step {
            step: "finding a free port",
            detail: e.to_string(),
        })
}

impl Cluster {
    pub fn start(opts: ClusterOptions) -> Result<Cluster, ClusterError> {
        let bin = find_bin_dir().ok_or(ClusterError::NoBinaries)?;
        let as_postgres_user = running_as_root();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("postline-pg-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| ClusterError::Step {
            step: "creating the cluster directory",
            detail: e.to_string(),
        })?;
        let mut cluster = Cluster {
            dir,
            bin,
            port: 0,
            as_postgres_user,
            opts,
        };
        if as_postgres_user {
            cluster.run(
                "chown",
                Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(&cluster.dir),
            )?;
        }
        cluster.spawn_watchdog();
        let data = cluster.data_dir();
        let mut initdb = cluster.pg_command("initdb");
        initdb.arg("-D").arg(&data).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        cluster.run("initdb", &mut initdb)?;
        // A port found free can be taken before postgres binds it: try a few.
        let mut last = None;
        for _ in 0..5 {
            cluster.port = free_port()?;
            match cluster.start_server() {
                Ok(()) => return Ok(cluster),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(ClusterError::NoBinaries))
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Start (or restart after `stop_server`) the server on the same port and data.
    pub fn start_server(&self) -> Result<(), ClusterError> {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync={} -c max_connections={} -c synchronous_commit=on",
            self.port,
            self.dir.display(),
            if self.opts.fsync { "on" } else { "off" },
            self.opts.max_connections,
        );
        let mut ctl = self.pg_command("pg_ctl");
        ctl.arg("-D")
            .arg(self.data_dir())
            .arg("-o")
            .arg(opts)
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(["-w", "-t", "60", "start"]);
        self.run("pg_ctl start", &mut ctl)
    }

    /// Stop the server abruptly (like a crash), keeping the data.
    pub fn stop_server(&self) -> Result<(), ClusterError> {
        let mut ctl = self.pg_command("pg_ctl");
        ctl.arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "-w", "stop"]);
        self.run("pg_ctl stop", &mut ctl)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connection URL for database `db` (trust auth on loopback).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    fn pg_command(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        if self.as_postgres_user {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn run(&self, step: &'static str, cmd: &mut Command) -> Result<(), ClusterError> {
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .map_err(|e| ClusterError::Step {
                step,
                detail: e.to_string(),
            })?;
        if out.status.success() {
            Ok(())
        } else {
            let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
            Err(ClusterError::Step {
                step,
                detail: format!(
                    "{}{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                    log.lines().rev().take(20).collect::<Vec<_>>().join("\n")
                ),
            })
        }
    }

    /// A detached shell that waits for this process to exit, then stops the
    /// cluster and deletes it.
    fn spawn_watchdog(&self) {
        let stop = format!(
            "{}{} -D {} -m immediate stop",
            if self.as_postgres_user {
                "runuser -u postgres -- "
            } else {
                ""
            },
            shell_quote(&self.bin.join("pg_ctl")),
            shell_quote(&self.data_dir()),
        );
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop} >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id(),
            dir = shell_quote(&self.dir),
        );
        let spawned = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn();
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not start the cluster watchdog; the cluster is removed on drop only");
        }
    }
}

fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.stop_server();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
