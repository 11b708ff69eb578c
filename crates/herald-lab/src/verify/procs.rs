//! The processes a verify run can break: relays (this same binary, `herald relay`) and, when the
//! user hands over its start command, the broker.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};

/// Sends `signal` (`STOP`, `CONT`) to `pid` with kill(1), keeping the binary free of libc calls.
async fn signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .await;
}

/// How to start one relay process.
pub struct RelaySpec {
    /// Database URL (through the chaos proxy when there is one). Passed by environment, never on
    /// the command line, so a password does not show in `ps`.
    pub database: String,
    /// Broker URL (through the chaos proxy when there is one).
    pub broker: String,
    /// Outbox table.
    pub table: String,
    /// Lease length.
    pub lease: Duration,
    /// Where the relay's log goes.
    pub log: PathBuf,
}

/// A relay child process that can be killed, paused and restarted.
pub struct RelayProc {
    id: String,
    spec: std::sync::Arc<RelaySpec>,
    child: Option<Child>,
    /// Aborts seen at a failpoint (exit by SIGABRT).
    pub aborted: u32,
}

impl RelayProc {
    /// Starts relay `id`.
    pub fn start(id: String, spec: std::sync::Arc<RelaySpec>) -> Result<RelayProc> {
        let mut r = RelayProc {
            id,
            spec,
            child: None,
            aborted: 0,
        };
        r.spawn(None)?;
        Ok(r)
    }

    /// The relay's name.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// (Re)starts the process, aborting at `failpoint` if given.
    ///
    /// Relays wait at most [`publish_timeout`] for a confirmation and retry after an outage
    /// within [`backoff_max`], so they notice a healed fault quickly.
    pub fn spawn(&mut self, failpoint: Option<&str>) -> Result<()> {
        let exe = std::env::current_exe().context("finding the herald binary")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.spec.log)
            .with_context(|| format!("opening {}", self.spec.log.display()))?;
        let lease_ms = self.spec.lease.as_millis();
        let mut cmd = Command::new(exe);
        cmd.arg("relay")
            .args(["--table", &self.spec.table])
            .args(["--relay-id", &self.id])
            .args(["--lease", &format!("{lease_ms}ms")])
            .args([
                "--publish-timeout",
                &format!("{}ms", publish_timeout(self.spec.lease).as_millis()),
            ])
            .args([
                "--backoff-max",
                &format!("{}ms", backoff_max(self.spec.lease).as_millis()),
            ])
            .args([
                "--poll-interval",
                "20ms",
                "--workers",
                "1",
                "--batch-size",
                "64",
            ])
            .env("HERALD_DATABASE_URL", &self.spec.database)
            .env("HERALD_BROKER_URL", &self.spec.broker)
            .env("HERALD_LOG", "warn")
            .env_remove("HERALD_FAILPOINT")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        if let Some(p) = failpoint {
            cmd.args(["--failpoint", p]);
        }
        self.child = Some(cmd.spawn().context("starting a relay process")?);
        Ok(())
    }

    /// SIGKILL, and wait for the process to be gone.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    /// Whether the process is still running; notes an abort at a failpoint.
    pub fn running(&mut self) -> bool {
        let Some(c) = self.child.as_mut() else {
            return false;
        };
        match c.try_wait() {
            Ok(None) => true,
            Ok(Some(status)) => {
                use std::os::unix::process::ExitStatusExt;
                if status.signal() == Some(6) {
                    self.aborted += 1;
                }
                self.child = None;
                false
            }
            Err(_) => false,
        }
    }

    /// SIGSTOP.
    pub async fn pause(&self) {
        if let Some(pid) = self.child.as_ref().and_then(Child::id) {
            signal(pid, "STOP").await;
        }
    }

    /// SIGCONT.
    pub async fn resume(&self) {
        if let Some(pid) = self.child.as_ref().and_then(Child::id) {
            signal(pid, "CONT").await;
        }
    }

    /// SIGTERM and wait up to `grace` for a clean exit, then SIGKILL.
    pub async fn stop(&mut self, grace: Duration) {
        if let Some(mut c) = self.child.take() {
            if let Some(pid) = c.id() {
                signal(pid, "CONT").await;
                signal(pid, "TERM").await;
            }
            if tokio::time::timeout(grace, c.wait()).await.is_err() {
                let _ = c.kill().await;
            }
        }
    }
}

/// A broker the run started itself from the user's command, so it may kill and pause it.
pub struct BrokerProc {
    command: String,
    port: u16,
    child: Option<Child>,
    log: PathBuf,
}

impl BrokerProc {
    /// Starts `command` (through `sh -c 'exec ...'`) and waits until it listens on `port`.
    pub async fn start(command: &str, port: u16, log: PathBuf) -> Result<BrokerProc> {
        let mut b = BrokerProc {
            command: command.to_owned(),
            port,
            child: None,
            log,
        };
        b.spawn().await?;
        Ok(b)
    }

    /// (Re)starts the broker and waits for its port.
    pub async fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!("exec {}", self.command))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting the broker with {:?}", self.command))?;
        self.child = Some(child);
        for _ in 0..300 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                bail!(
                    "the broker command {:?} exited with {status} (log: {})",
                    self.command,
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "the broker command {:?} did not listen on port {} within 30 s",
            self.command,
            self.port
        )
    }

    /// SIGKILL.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    /// SIGSTOP or SIGCONT.
    pub async fn signal(&self, sig: &str) {
        if let Some(pid) = self.child.as_ref().and_then(Child::id) {
            signal(pid, sig).await;
        }
    }

    /// Running?
    pub fn running(&self) -> bool {
        self.child.is_some()
    }
}

/// The publish timeout of verify's relays: two fifths of the lease.
pub fn publish_timeout(lease: Duration) -> Duration {
    lease * 2 / 5
}

/// The longest backoff of verify's relays after an outage: a quarter of the lease.
pub fn backoff_max(lease: Duration) -> Duration {
    (lease / 4).max(Duration::from_millis(100))
}
