//! Guests a trigger makes ([`BrokerRequest::Grow`](crate::proto::BrokerRequest::Grow)): a
//! guest of the template, and in it a node of the group — this program's `mvm node`, with the
//! identity the super-peer issued for it — which registers with the broker and takes work (the
//! VM manager's new environments that register themselves with the batch system). Torn down on
//! [`BrokerRequest::Shrink`](crate::proto::BrokerRequest::Shrink), and with this node.
//!
//! A process joins a guest of the host driver (control groups); a Xen guest's node would need
//! an image that runs one, and is refused.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::{Node, fail};
use crate::environment::EnvLease;
use crate::proto::{EnvSpec, FailureKind, GrowSpec, JobId, Response, VmMode};

/// How long a guest's node has to stop after SIGTERM before it is killed.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// A guest made for a trigger, and the node running in it.
struct Grown {
    child: tokio::process::Child,
    /// Held until the guest is torn down (dropping it tears it down).
    lease: EnvLease,
    /// The node's identity and state (removed with it).
    dir: tempfile::TempDir,
}

/// The guests made for triggers, by name.
#[derive(Default)]
pub(super) struct GrownGuests(Mutex<HashMap<String, Grown>>);

impl Node {
    /// Makes the guest `spec` asks for and starts a node of the group in it.
    pub(super) async fn grow(self: &Arc<Self>, spec: GrowSpec) -> Response {
        let Some(os) = self.os.clone() else {
            return fail(
                FailureKind::Unavailable,
                format!(
                    "node {} has no OS layer (--os-dir): it makes no guests",
                    self.site.name
                ),
            );
        };
        if self.grown.0.lock().contains_key(&spec.name) {
            return fail(
                FailureKind::Input,
                format!("guest {} is running already", spec.name),
            );
        }
        let program = match os.worker() {
            Some(w) => w.program.clone(),
            None => match std::env::current_exe() {
                Ok(p) => p,
                Err(e) => return fail(FailureKind::Failed, format!("this program's path: {e}")),
            },
        };
        let shape = &spec.template.shape;
        let env = EnvSpec {
            image: shape.image.clone(),
            vcpus: shape.vcpus.max(1),
            memory_mib: shape.memory_mib.max(16),
            mode: VmMode::StopStart,
            weight: shape.weight,
            cap: shape.cap,
            template: Some(spec.template.clone()),
            bid: None,
        };
        let job = JobId::new(&spec.name, 0, 0);
        let o = os.clone();
        let lease = match tokio::task::spawn_blocking(move || o.acquire(&job, &env)).await {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => {
                return fail(FailureKind::Failed, format!("guest {}: {e}", spec.name));
            }
            Err(e) => return fail(FailureKind::Failed, format!("guest {}: {e}", spec.name)),
        };
        let Some(join) = lease.join_files() else {
            return fail(
                FailureKind::Unavailable,
                format!(
                    "guest {}: its driver cannot start a node in it (only the host driver's guests can)",
                    spec.name
                ),
            );
        };
        match self.start_guest_node(&spec, &program, &join) {
            Ok((child, dir)) => {
                tracing::info!(guest = %spec.name, pid = ?child.id(), "a node runs in the guest");
                self.grown
                    .0
                    .lock()
                    .insert(spec.name.clone(), Grown { child, lease, dir });
                Response::Ok
            }
            Err(e) => fail(
                FailureKind::Failed,
                format!("guest {}: its node does not start: {e}", spec.name),
            ),
        }
    }

    /// Writes the guest node's identity and starts it inside the guest (`join`: the guest's
    /// `cgroup.procs` files).
    fn start_guest_node(
        &self,
        spec: &GrowSpec,
        program: &std::path::Path,
        join: &[std::path::PathBuf],
    ) -> std::io::Result<(tokio::process::Child, tempfile::TempDir)> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("mvm-{}-", spec.name))
            .tempdir()?;
        for (file, bytes, mode) in [
            ("key", &spec.key[..], 0o600),
            ("cert.pem", spec.cert.as_bytes(), 0o644),
            ("ca.pem", spec.ca.as_bytes(), 0o644),
        ] {
            crate::pki::write_new(&dir.path().join(file), bytes, mode)
                .map_err(std::io::Error::other)?;
        }
        // The guest shares this host's network: it listens where this node does.
        let ip = self
            .site
            .net
            .dial_addrs()
            .iter()
            .find_map(|a| {
                a.iter().find_map(|p| match p {
                    libp2p::multiaddr::Protocol::Ip4(ip) => Some(ip.to_string()),
                    _ => None,
                })
            })
            .unwrap_or_else(|| "127.0.0.1".into());
        let mut cmd = tokio::process::Command::new(program);
        cmd.arg("node");
        for b in &spec.bootstrap {
            cmd.args(["--bootstrap", b]);
        }
        let state = dir.path().join("state");
        cmd.args(["--slots", &spec.slots.to_string()])
            .args(["--name", &spec.name])
            .args(["--group", &self.site.group])
            .arg("--identity")
            .arg(dir.path())
            .arg("--dir")
            .arg(&state)
            .args([
                "--heartbeat-ms",
                &self.site.heartbeat.as_millis().to_string(),
            ])
            .args([
                "--lost-after-ms",
                &self.site.lost_after.as_millis().to_string(),
            ])
            .args(["--listen", &format!("/ip4/{ip}/tcp/0")])
            .args(["--guest-of", &self.site.peer().to_string()])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        // The node in the guest carries its channels as this one does.
        let links = match &self.links {
            None => "streams",
            Some(l) if l.plain() => "plain",
            Some(_) => "sealed",
        };
        cmd.args(["--links", links]);
        mvm_os::host::join_on_exec(cmd.as_std_mut(), join)?;
        let child = cmd.spawn()?;
        Ok((child, dir))
    }

    /// Stops the node in guest `name` and tears the guest down.
    pub(super) async fn shrink(&self, name: &str) -> Response {
        let Some(g) = self.grown.0.lock().remove(name) else {
            return fail(
                FailureKind::NotFound,
                format!("node {} made no guest {name}", self.site.name),
            );
        };
        stop(name, g).await;
        Response::Ok
    }

    /// Stops every guest's node and tears the guests down (this node is stopping).
    pub(crate) async fn shrink_all(&self) {
        let all: Vec<(String, Grown)> = self.grown.0.lock().drain().collect();
        for (name, g) in all {
            stop(&name, g).await;
        }
    }
}

/// Stops a guest's node (SIGTERM, then SIGKILL after [`STOP_WAIT`]) and tears the guest down.
async fn stop(name: &str, g: Grown) {
    let Grown {
        mut child,
        lease,
        dir,
    } = g;
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: kill(2) with a pid this node started and has not reaped.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    if tokio::time::timeout(STOP_WAIT, child.wait()).await.is_err() {
        tracing::warn!(guest = %name, "the guest's node did not stop in {STOP_WAIT:?}; killing it");
        let _ = child.kill().await;
    }
    let _ = tokio::task::spawn_blocking(move || drop(lease)).await;
    drop(dir);
    tracing::info!(guest = %name, "guest torn down");
}
