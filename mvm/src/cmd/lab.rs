//! `mvm lab`: a local lab of separate daemon processes on loopback, and the demo job on it.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mvm_superpeer::client::{Client, read_profile};
use mvm_superpeer::pki::Credentials;
use serde::{Deserialize, Serialize};

use crate::cmd::daemon::LinksArg;
use crate::cmd::job::{self, wire};
use crate::exit::Failure;
use crate::{Output, OutputArg};

/// Arguments of `mvm lab`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(subcommand)]
    command: LabCommand,
}

#[derive(Debug, clap::Subcommand)]
enum LabCommand {
    /// Start super-peers (3: the replicas of the group's job log) and N nodes as background
    /// processes; print the leading super-peer's address.
    Up(UpArgs),
    /// Stop the lab's processes and remove its directory.
    Down(DirArg),
    /// Show the lab's group: nodes, their slots, and whether they answer.
    Status(StatusArgs),
    /// Start a lab, run the FFT example on it, check the results against a direct DFT, stop.
    Demo(DemoArgs),
}

#[derive(Debug, clap::Args)]
struct DirArg {
    /// The lab's directory (default: $XDG_RUNTIME_DIR/mvm-lab or /tmp/mvm-lab-UID).
    #[arg(long, env = "MVM_LAB_DIR")]
    dir: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct UpArgs {
    /// How many nodes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=64))]
    nodes: u32,
    /// How many super-peers: the replicas of the group's job log, one of which leads it and is
    /// the broker (a leader killed is replaced while a majority is left).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=7))]
    superpeers: u32,
    #[command(flatten)]
    net: NetArgs,
    #[command(flatten)]
    dir: DirArg,
    #[command(flatten)]
    out: OutputArg,
}

/// How a lab's daemons talk.
#[derive(Debug, Clone, Copy, clap::Args)]
pub(crate) struct NetArgs {
    /// The transports the daemons listen on.
    #[arg(long, value_enum, default_value_t = Transport::Both)]
    pub(crate) transport: Transport,
    /// How the nodes' remote channels travel (as `mvm node --links`).
    #[arg(long, value_enum, default_value_t = LinksArg::Sealed)]
    pub(crate) links: LinksArg,
    /// Control requests a user may make of a super-peer per second (as `mvm superpeer
    /// --request-rate`; 0: no quota).
    #[arg(long, default_value_t = mvm_superpeer::net::REQUEST_RATE)]
    pub(crate) request_rate: u32,
}

#[derive(Debug, clap::Args)]
struct StatusArgs {
    #[command(flatten)]
    dir: DirArg,
    #[command(flatten)]
    who: crate::cmd::job::IdentityArg,
    #[command(flatten)]
    out: OutputArg,
}

#[derive(Debug, clap::Args)]
struct DemoArgs {
    /// How many nodes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=64))]
    nodes: u32,
    /// How many super-peers (replicas of the group's job log).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=7))]
    superpeers: u32,
    #[command(flatten)]
    net: NetArgs,
    /// The job profile (default: examples/fft8.toml of this checkout).
    #[arg(long)]
    profile: Option<PathBuf>,
    #[command(flatten)]
    out: OutputArg,
}

/// Which libp2p transports the lab's daemons listen on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub(crate) enum Transport {
    /// TCP with noise and yamux.
    Tcp,
    /// QUIC.
    Quic,
    /// Both (peers dial whichever answers first).
    #[default]
    Both,
}

/// What `mvm lab up` leaves for `submit`, `status` and `down`: `lab.json` in the lab directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LabInfo {
    /// The address of the super-peer that led when the lab started.
    pub(crate) broker: String,
    /// The process ids: the super-peers first, then the nodes.
    pub(crate) pids: Vec<u32>,
    /// Every super-peer's address, in the order of `pids`.
    #[serde(default)]
    pub(crate) superpeers: Vec<String>,
    /// Each daemon's name and peer id, in the order of `pids`.
    #[serde(default)]
    pub(crate) daemons: Vec<(String, String)>,
    /// The nodes' addresses (any of them leads to the group's leading super-peer, also after
    /// the leader changed).
    #[serde(default)]
    pub(crate) members: Vec<String>,
    /// Where each daemon serves its Prometheus metrics, by name (`http://…/metrics`).
    #[serde(default)]
    pub(crate) metrics: std::collections::BTreeMap<String, String>,
    /// Where each super-peer serves its web view, by name (`http://…`).
    #[serde(default)]
    pub(crate) http: std::collections::BTreeMap<String, String>,
}

/// The default lab directory.
pub(crate) fn default_dir() -> PathBuf {
    match std::env::var_os("MVM_LAB_DIR") {
        Some(d) => PathBuf::from(d),
        None => match std::env::var_os("XDG_RUNTIME_DIR") {
            Some(r) => PathBuf::from(r).join("mvm-lab"),
            // SAFETY: getuid has no preconditions and cannot fail.
            None => std::env::temp_dir().join(format!("mvm-lab-{}", unsafe { libc::getuid() })),
        },
    }
}

/// Reads `lab.json` of a lab directory.
pub(crate) fn read_info(dir: &Path) -> anyhow::Result<LabInfo> {
    use anyhow::Context;
    let p = dir.join("lab.json");
    let text = std::fs::read_to_string(&p).with_context(|| p.display().to_string())?;
    serde_json::from_str(&text).with_context(|| p.display().to_string())
}

/// Whether `pid` is a live `mvm` process.
fn is_mvm(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let exe = c.split(|b| *b == 0).next().unwrap_or_default();
            exe.ends_with(b"mvm")
        })
        .unwrap_or(false)
}

/// Whether `pid` runs (a zombie, exited but not yet waited for, has an empty command line).
fn running(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
}

fn signal(pid: u32, sig: i32) {
    if let Ok(p) = i32::try_from(pid) {
        // SAFETY: kill has no memory-safety preconditions; a stale pid at worst gets ESRCH.
        unsafe {
            libc::kill(p, sig);
        }
    }
}

/// Stops the processes of `pids` that `live` says are (still) the ones meant: SIGTERM, up to
/// 5 s to exit, then SIGKILL.
fn stop_pids(pids: &[u32], live: impl Fn(u32) -> bool) {
    let alive: Vec<u32> = pids.iter().copied().filter(|&p| live(p)).collect();
    for &p in &alive {
        signal(p, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && alive.iter().any(|&p| live(p)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    for &p in alive.iter().filter(|&&p| live(p)) {
        signal(p, libc::SIGKILL);
    }
}

/// The lab's domain.
pub(crate) const LAB_DOMAIN: &str = "lab";

/// The lab's PKI, made once in its directory: a CA of domain `lab` (`ca/`), a node identity
/// in each daemon's state directory (the super-peer's with role `superpeer`), and a user
/// (`user/`, role `admin`). What exists already is kept.
fn ensure_pki(dir: &Path, nodes: u32, superpeers: u32) -> Result<(), Failure> {
    use mvm_component::policy::PrincipalKind;
    use mvm_superpeer::pki::{Ca, Subject};
    let pki = |e: mvm_superpeer::pki::PkiError| Failure::failed(anyhow::anyhow!(e));
    let ca_dir = dir.join("ca");
    let ca = if ca_dir.join("ca.crt").exists() {
        Ca::load(&ca_dir).map_err(pki)?
    } else {
        Ca::init(&ca_dir, LAB_DOMAIN, 3650).map_err(pki)?
    };
    let mut who: Vec<(String, PrincipalKind, Vec<String>)> = (0..superpeers)
        .map(|i| {
            (
                superpeer_name(i),
                PrincipalKind::Node,
                vec!["superpeer".to_owned()],
            )
        })
        .collect();
    who.push((
        "user".to_owned(),
        PrincipalKind::User,
        vec!["admin".to_owned()],
    ));
    who.extend((0..nodes).map(|i| (format!("node{i}"), PrincipalKind::Node, Vec::new())));
    for (name, kind, roles) in who {
        let out = dir.join(&name);
        if out.join("cert.pem").exists() {
            continue;
        }
        let key = out.join("key");
        let existing = key.exists().then_some(key.as_path());
        let subject = Subject {
            kind,
            name: if kind == PrincipalKind::User {
                "lab".into()
            } else {
                name.clone()
            },
            roles,
        };
        ca.issue(&subject, &out, existing, 3650).map_err(pki)?;
    }
    Ok(())
}

/// The name of the lab's `i`-th super-peer.
fn superpeer_name(i: u32) -> String {
    if i == 0 {
        "superpeer".to_owned()
    } else {
        format!("superpeer{i}")
    }
}

/// A free port on loopback for `transport` (TCP, or UDP for QUIC), for a daemon to bind in a
/// moment. Taken at random below the kernel's ephemeral range (`ip_local_port_range`), and
/// tried by binding it: a port the kernel picks for port 0 comes from that range, which every
/// outgoing connection on the machine draws from too, so one could take it before the daemon
/// binds it (CI saw a lab's web view fail so, with address in use). Never a port it gave
/// before in this process: the daemons of a lab bind theirs only once they run, so a port
/// given to one and still unbound would pass the test again (a bench saw two daemons get
/// the same one). Falls back to the kernel's pick if nothing below the range is free.
fn free_port(quic: bool) -> Result<u16, Failure> {
    use std::hash::{BuildHasher, Hasher};
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let bind = |port: u16| {
        if quic {
            std::net::UdpSocket::bind(("127.0.0.1", port)).and_then(|s| s.local_addr())
        } else {
            std::net::TcpListener::bind(("127.0.0.1", port)).and_then(|s| s.local_addr())
        }
    };
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const FROM: u16 = 10_000;
    if let Some(span) = low.checked_sub(FROM).filter(|s| *s >= 1000) {
        for _ in 0..200 {
            // A fresh random key per call (std's RandomState).
            let r = std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish();
            let port = FROM + u16::try_from(r % u64::from(span)).unwrap_or(0);
            if given.contains(&port) {
                continue;
            }
            if let Ok(a) = bind(port) {
                given.push(port);
                return Ok(a.port());
            }
        }
    }
    for _ in 0..100 {
        let port = bind(0).map(|a| a.port()).map_err(Failure::failed)?;
        if !given.contains(&port) {
            given.push(port);
            return Ok(port);
        }
    }
    Err(Failure::failed(anyhow::anyhow!(
        "no free loopback port that this lab has not given already"
    )))
}

/// The lab user's credentials.
fn lab_user(dir: &Path) -> Result<Credentials, Failure> {
    Credentials::load(&dir.join("user"), &[]).map_err(|e| Failure::failed(anyhow::anyhow!(e)))
}

/// A running lab: its child processes are stopped when it is dropped (unless detached).
pub(crate) struct Lab {
    dir: PathBuf,
    children: Vec<Child>,
    /// Each child's name (its log is `NAME.log`).
    names: Vec<String>,
    /// Each child's arguments, to start it again.
    launches: Vec<Vec<String>>,
    /// The address of the super-peer that led when the lab started.
    pub(crate) broker: String,
    /// Every super-peer's address.
    pub(crate) superpeers: Vec<String>,
    detached: bool,
}

impl Lab {
    /// Starts the super-peer and `nodes` nodes, and waits until every node has registered.
    pub(crate) fn start(
        dir: &Path,
        nodes: u32,
        superpeers: u32,
        detached: bool,
        net: NetArgs,
    ) -> Result<Lab, Failure> {
        let io = |e: std::io::Error| Failure::failed(anyhow::anyhow!("{}: {e}", dir.display()));
        std::fs::create_dir_all(dir).map_err(io)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        }
        ensure_pki(dir, nodes, superpeers)?;
        let exe = std::env::current_exe().map_err(Failure::failed)?;
        let mut lab = Lab {
            dir: dir.to_owned(),
            children: Vec::new(),
            names: Vec::new(),
            launches: Vec::new(),
            broker: String::new(),
            superpeers: Vec::new(),
            detached: false,
        };
        let mut timing = vec!["--heartbeat-ms", "200", "--lost-after-ms", "1500"];
        match net.transport {
            Transport::Tcp => timing.extend(["--listen", "/ip4/127.0.0.1/tcp/0"]),
            Transport::Quic => timing.extend(["--listen", "/ip4/127.0.0.1/udp/0/quic-v1"]),
            Transport::Both => {}
        }
        // The super-peers listen at ports chosen now, so that each can be told the others'
        // addresses (the replicas of the job log) before any starts.
        let quic = net.transport == Transport::Quic;
        let mut replicas = Vec::new();
        let mut daemons = Vec::new();
        // Every daemon serves its metrics on a port of its own.
        let mut metrics = std::collections::BTreeMap::new();
        let mut metrics_at = |name: &str| -> Result<String, Failure> {
            let at = format!("127.0.0.1:{}", free_port(false)?);
            metrics.insert(name.to_owned(), format!("http://{at}/metrics"));
            Ok(at)
        };
        for i in 0..superpeers {
            let name = superpeer_name(i);
            let creds = Credentials::load(&dir.join(&name), &[])
                .map_err(|e| Failure::failed(anyhow::anyhow!(e)))?;
            let port = free_port(quic)?;
            let listen = if quic {
                format!("/ip4/127.0.0.1/udp/{port}/quic-v1")
            } else {
                format!("/ip4/127.0.0.1/tcp/{port}")
            };
            replicas.push((name.clone(), listen.clone(), creds.peer()));
            daemons.push((name, creds.peer().to_string()));
        }
        let mut http = std::collections::BTreeMap::new();
        for (name, listen, _) in &replicas {
            let _ = std::fs::remove_file(dir.join(format!("{name}.addr")));
            let at = metrics_at(name)?;
            // Every super-peer serves the web view (the one that leads shows the group).
            let web = format!("127.0.0.1:{}", free_port(false)?);
            http.insert(name.clone(), format!("http://{web}"));
            // The super-peers hold the lab CA's revocation list (`mvm ca revoke --ca DIR/ca`).
            let crl = dir
                .join("ca")
                .join(mvm_superpeer::pki::CRL_FILE)
                .display()
                .to_string();
            let mut args = vec![
                "superpeer",
                "--crl",
                crl.as_str(),
                "--name",
                name,
                "--listen",
                listen,
                "--metrics",
                at.as_str(),
                "--http",
                web.as_str(),
            ];
            if net.transport == Transport::Both {
                args.extend(["--listen", "/ip4/127.0.0.1/udp/0/quic-v1"]);
            }
            let rate = net.request_rate.to_string();
            args.extend(["--request-rate", rate.as_str()]);
            let others: Vec<String> = replicas
                .iter()
                .filter(|(n, _, _)| n != name)
                .map(|(_, l, p)| format!("{l}/p2p/{p}"))
                .collect();
            for o in &others {
                args.extend(["--replica", o.as_str()]);
            }
            let timing: Vec<&str> = timing
                .iter()
                .copied()
                .filter(|a| !a.starts_with('/') && *a != "--listen")
                .collect();
            lab.spawn(&exe, name, &args, &timing, detached)?;
        }
        let mut sp_addrs = Vec::new();
        for (name, _, _) in &replicas {
            let addrs = lab.wait_file(&dir.join(format!("{name}.addr")))?;
            sp_addrs.push(
                addrs
                    .lines()
                    .find(|l| l.contains("/tcp/"))
                    .or_else(|| addrs.lines().next())
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
        timing.extend(["--links", net.links.arg()]);
        for i in 0..nodes {
            let name = format!("node{i}");
            let _ = std::fs::remove_file(dir.join(format!("{name}.addr")));
            let at = metrics_at(&name)?;
            let mut args = vec!["node", "--name", name.as_str(), "--metrics", at.as_str()];
            for a in &sp_addrs {
                args.extend(["--bootstrap", a.as_str()]);
            }
            lab.spawn(&exe, &name, &args, &timing, detached)?;
            let creds = Credentials::load(&dir.join(&name), &[])
                .map_err(|e| Failure::failed(anyhow::anyhow!(e)))?;
            daemons.push((name, creds.peer().to_string()));
        }
        let mut members = Vec::new();
        for i in 0..nodes {
            let text = lab.wait_file(&dir.join(format!("node{i}.addr")))?;
            members.extend(
                text.lines()
                    .find(|l| l.contains("/tcp/"))
                    .map(str::to_owned),
            );
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(Failure::failed)?;
        let want = nodes as usize;
        let registered = rt.block_on(async {
            let deadline = Instant::now() + Duration::from_secs(60);
            // The super-peers elect a leader of the job log; the client finds it.
            let client = loop {
                match Client::find(&lab_user(dir)?, &sp_addrs).await {
                    Ok(c) => break c,
                    Err(e) if Instant::now() > deadline => return Err(wire(e)),
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            };
            let leader = client.broker().to_string();
            lab.broker = sp_addrs
                .iter()
                .find(|a| a.ends_with(&leader))
                .cloned()
                .unwrap_or_default();
            loop {
                let g = client.group().await.map_err(wire)?;
                let live = g.nodes.iter().filter(|n| !n.lost).count();
                if live >= want {
                    // One more heartbeat round, so every node has heard the list of the job
                    // log's replicas (where it looks for a new leader).
                    tokio::time::sleep(Duration::from_millis(450)).await;
                    return Ok::<_, Failure>(live);
                }
                if Instant::now() > deadline {
                    return Err(Failure::failed(anyhow::anyhow!(
                        "only {live} of {want} nodes registered within 60 s (logs in {})",
                        dir.display()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        if let Err(e) = registered {
            lab.check_children()?;
            return Err(e);
        }
        lab.superpeers.clone_from(&sp_addrs);
        let info = LabInfo {
            broker: lab.broker.clone(),
            pids: lab.children.iter().map(Child::id).collect(),
            superpeers: sp_addrs,
            daemons,
            members,
            metrics,
            http,
        };
        let text = serde_json::to_string_pretty(&info).map_err(Failure::failed)?;
        crate::cmd::daemon::write_atomic(&dir.join("lab.json"), &text)?;
        lab.detached = detached;
        Ok(lab)
    }

    /// The lab's user (domain `lab`, role `admin`).
    pub(crate) fn user(&self) -> Result<Credentials, Failure> {
        lab_user(&self.dir)
    }

    fn spawn(
        &mut self,
        exe: &Path,
        name: &str,
        args: &[&str],
        timing: &[&str],
        detached: bool,
    ) -> Result<(), Failure> {
        let args: Vec<String> = args.iter().chain(timing).map(|a| (*a).to_owned()).collect();
        let child = self.start_child(exe, name, &args, detached, false)?;
        self.children.push(child);
        self.names.push(name.to_owned());
        self.launches.push(args);
        Ok(())
    }

    /// Starts the daemon `name` killed before ([`Lab::kill_daemon`]) again, as it was started
    /// (its identity and state directory kept); whether there is one.
    pub(crate) fn restart_daemon(&mut self, name: &str) -> Result<bool, Failure> {
        let Some(i) = self.names.iter().position(|n| n == name) else {
            return Ok(false);
        };
        let exe = std::env::current_exe().map_err(Failure::failed)?;
        let args = self.launches.get(i).cloned().unwrap_or_default();
        let _ = std::fs::remove_file(self.dir.join(format!("{name}.addr")));
        let child = self.start_child(&exe, name, &args, self.detached, true)?;
        if let Some(old) = self.children.get_mut(i) {
            let _ = old.kill();
            let _ = old.wait();
            *old = child;
        }
        Ok(true)
    }

    /// Starts one daemon with `args`; its log `NAME.log` is begun anew, or (`again`) added
    /// to.
    fn start_child(
        &self,
        exe: &Path,
        name: &str,
        args: &[String],
        detached: bool,
        again: bool,
    ) -> Result<Child, Failure> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(again)
            .truncate(!again)
            .open(self.dir.join(format!("{name}.log")))
            .map_err(|e| Failure::failed(anyhow::anyhow!("{}: {e}", self.dir.display())))?;
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .arg("--dir")
            .arg(self.dir.join(name))
            .arg("--addr-file")
            .arg(self.dir.join(format!("{name}.addr")))
            .env(
                "MVM_LOG",
                std::env::var("MVM_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if detached {
            // Its own process group: a Ctrl-C in this terminal does not reach it.
            cmd.process_group(0);
        } else {
            // SAFETY: prctl is async-signal-safe; the closure only calls it.
            unsafe {
                cmd.pre_exec(|| {
                    // Dies with the `mvm` that started it, even if that one is killed.
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
        }
        cmd.spawn()
            .map_err(|e| Failure::failed(anyhow::anyhow!("cannot start {}: {e}", exe.display())))
    }

    /// Fails if a child has exited, naming its log.
    fn check_children(&mut self) -> Result<(), Failure> {
        for (c, name) in self.children.iter_mut().zip(&self.names) {
            if let Ok(Some(status)) = c.try_wait() {
                let mut log = String::new();
                let _ = std::fs::File::open(self.dir.join(format!("{name}.log")))
                    .and_then(|mut f| f.read_to_string(&mut log));
                let last = log.lines().last().unwrap_or("").to_owned();
                return Err(Failure::failed(anyhow::anyhow!(
                    "{name} exited ({status}): {last}"
                )));
            }
        }
        Ok(())
    }

    fn wait_file(&mut self, path: &Path) -> Result<String, Failure> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(path)
                && !text.trim().is_empty()
            {
                return Ok(text);
            }
            self.check_children()?;
            if Instant::now() > deadline {
                return Err(Failure::failed(anyhow::anyhow!(
                    "{} did not appear within 30 s",
                    path.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills (SIGKILL) the super-peer listening at `addr`, one of [`Lab::superpeers`].
    pub(crate) fn kill_superpeer(&mut self, addr: &str) {
        let Some(i) = self.superpeers.iter().position(|a| a == addr) else {
            return;
        };
        // The super-peers were started first, in the order of their addresses.
        if let Some(c) = self.children.get_mut(i) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The pid and log file of the daemon named `name`, if there is one.
    pub(crate) fn daemon(&self, name: &str) -> Option<(u32, PathBuf)> {
        let i = self.names.iter().position(|n| n == name)?;
        let pid = self.children.get(i)?.id();
        Some((pid, self.dir.join(format!("{name}.log"))))
    }

    /// The lab's directory (its CA is `ca/`).
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Kills (SIGKILL) the daemon named `name`; whether there is one.
    pub(crate) fn kill_daemon(&mut self, name: &str) -> bool {
        let Some(i) = self.names.iter().position(|n| n == name) else {
            return false;
        };
        if let Some(c) = self.children.get_mut(i) {
            let _ = c.kill();
            let _ = c.wait();
        }
        true
    }

    /// Stops the lab's daemons: SIGTERM, and SIGKILL for those still running after 5 s. Our
    /// own children are known by pid whatever the binary is called (a pid is ours until it is
    /// waited for), so only whether each still runs is asked, not its name.
    pub(crate) fn stop(&mut self) {
        let pids: Vec<u32> = self.children.iter().map(Child::id).collect();
        stop_pids(&pids, running);
        for c in &mut self.children {
            let _ = c.wait();
        }
        self.children.clear();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.detached {
            self.stop();
        }
    }
}

pub(crate) fn run(args: Args) -> Result<(), Failure> {
    match args.command {
        LabCommand::Up(a) => up(a),
        LabCommand::Down(a) => down(&a),
        LabCommand::Status(a) => status(a),
        LabCommand::Demo(a) => demo(a),
    }
}

fn dir_of(a: &DirArg) -> PathBuf {
    a.dir.clone().unwrap_or_else(default_dir)
}

fn up(a: UpArgs) -> Result<(), Failure> {
    let dir = dir_of(&a.dir);
    if let Ok(info) = read_info(&dir) {
        if info.pids.iter().any(|&p| is_mvm(p)) {
            return Err(Failure::input(anyhow::anyhow!(
                "a lab is already running in {} (super-peer {}); `mvm lab down` first",
                dir.display(),
                info.broker
            )));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    let lab = match Lab::start(&dir, a.nodes, a.superpeers, true, a.net) {
        Ok(l) => l,
        Err(e) => {
            // A half-started lab is stopped and removed.
            down(&DirArg { dir: Some(dir) }).ok();
            return Err(e);
        }
    };
    let info = serde_json::json!({
        "broker": lab.broker,
        "dir": lab.dir,
        "nodes": a.nodes,
        "superpeers": a.superpeers,
        "pids": lab.children.iter().map(Child::id).collect::<Vec<_>>(),
    });
    crate::cmd::print(&info, a.out.output, |_| lab.broker.clone())
}

fn down(a: &DirArg) -> Result<(), Failure> {
    let dir = dir_of(a);
    let info = read_info(&dir);
    let mut pids: Vec<u32> = info.as_ref().map(|i| i.pids.clone()).unwrap_or_default();
    // Also any daemon whose log is in the directory but that never made it into lab.json.
    if let Ok(entries) = std::fs::read_dir("/proc") {
        let needle = dir.as_os_str().as_encoded_bytes().to_vec();
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline"))
                && cmd.windows(needle.len()).any(|w| w == needle.as_slice())
                && is_mvm(pid)
                && pid != std::process::id()
            {
                pids.push(pid);
            }
        }
    }
    if info.is_err() && pids.is_empty() && !dir.exists() {
        return Err(Failure::input(anyhow::anyhow!(
            "no lab in {}",
            dir.display()
        )));
    }
    stop_pids(&pids, is_mvm);
    std::fs::remove_dir_all(&dir)
        .or_else(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Ok(())
            } else {
                Err(e)
            }
        })
        .map_err(|e| Failure::failed(anyhow::anyhow!("{}: {e}", dir.display())))?;
    Ok(())
}

fn status(a: StatusArgs) -> Result<(), Failure> {
    let dir = dir_of(&a.dir);
    let info = read_info(&dir).map_err(|e| Failure::input(e.context("no lab")))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Failure::failed)?;
    let addrs: Vec<String> = std::iter::once(info.broker.clone())
        .chain(info.superpeers.clone())
        .chain(info.members.clone())
        .collect();
    let g = rt.block_on(async {
        let c = Client::find(&a.who.credentials_in(&dir)?, &addrs)
            .await
            .map_err(wire)?;
        c.group().await.map_err(wire)
    })?;
    // Each daemon of the lab with its role: the super-peer that leads the job log (the
    // broker), the other replicas, and the nodes.
    let daemons: Vec<serde_json::Value> = info
        .daemons
        .iter()
        .zip(&info.pids)
        .map(|((name, peer), pid)| {
            let role = if g.broker.is_some_and(|b| b.to_string() == *peer) {
                "leader"
            } else if name.starts_with("superpeer") {
                "replica"
            } else {
                "node"
            };
            let metrics = info.metrics.get(name).cloned();
            let http = info.http.get(name).cloned();
            serde_json::json!({"name": name, "peer": peer, "pid": pid, "role": role, "metrics": metrics, "http": http})
        })
        .collect();
    let mut v = serde_json::to_value(&g).map_err(Failure::failed)?;
    // The web view of the super-peer that leads.
    v["http"] = daemons
        .iter()
        .find(|d| d["role"] == "leader")
        .map_or(serde_json::Value::Null, |d| d["http"].clone());
    v["daemons"] = serde_json::Value::Array(daemons);
    crate::cmd::print(&v, a.out.output, |_| {
        let mut s = format!(
            "super-peer {} leads\n",
            g.broker_addrs
                .first()
                .map_or_else(|| "?".to_owned(), ToString::to_string)
        );
        for d in v["daemons"].as_array().into_iter().flatten() {
            s.push_str(&format!(
                "  {} {} pid {} ({})\n",
                d["name"].as_str().unwrap_or("?"),
                d["peer"].as_str().unwrap_or("?"),
                d["pid"],
                d["role"].as_str().unwrap_or("?")
            ));
        }
        for n in &g.nodes {
            s.push_str(&format!(
                "  {} {} {}/{} slots used, {} vertices running{}\n",
                n.name,
                n.peer,
                n.vertices,
                n.slots,
                n.running,
                if n.lost { "  LOST" } else { "" }
            ));
        }
        if let Some(sc) = &g.scheduling {
            s.push_str(&format!("  scheduling: {} ({})\n", sc.policy, sc.by));
        }
        for o in &g.groups {
            s.push_str(&format!(
                "  group {} (domain {}): {} nodes, {} free slots, super-peer {}\n",
                o.group, o.domain, o.nodes, o.free_slots, o.broker
            ));
        }
        s.trim_end().to_owned()
    })
}

/// The default demo profile: `examples/fft8.toml` here, or beside the binary's checkout.
fn demo_profile() -> PathBuf {
    let here = PathBuf::from("examples/fft8.toml");
    if here.exists() {
        return here;
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| {
            e.ancestors()
                .map(|a| a.join("examples/fft8.toml"))
                .find(|p| p.exists())
        })
        .unwrap_or(here)
}

/// The direct DFT of `x`: X[k] = Σ x[n]·e^(−2πikn/N).
pub(crate) fn dft(re: &[f64], im: &[f64]) -> Vec<(f64, f64)> {
    let n = re.len();
    (0..n)
        .map(|k| {
            let mut acc = (0.0, 0.0);
            for (j, &xr) in re.iter().enumerate() {
                let a = -2.0 * std::f64::consts::PI * ((k * j) % n) as f64 / n as f64;
                let (s, c) = a.sin_cos();
                let xi = im.get(j).copied().unwrap_or(0.0);
                acc.0 += xr * c - xi * s;
                acc.1 += xr * s + xi * c;
            }
            acc
        })
        .collect()
}

/// Checks sink lines `index re im` against the direct DFT; the problems found.
pub(crate) fn check_fft(lines: &str, re: &[f64], im: &[f64]) -> Vec<String> {
    let want = dft(re, im);
    let mut got = vec![None; want.len()];
    let mut problems = Vec::new();
    for l in lines.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = l.split_whitespace().collect();
        let parsed = match f.as_slice() {
            [k, r, i] => k
                .parse::<usize>()
                .ok()
                .zip(r.parse::<f64>().ok().zip(i.parse::<f64>().ok())),
            _ => None,
        };
        match parsed {
            Some((k, v)) if k < got.len() => got[k] = Some(v),
            _ => problems.push(format!("unexpected output line '{l}'")),
        }
    }
    for (k, (w, g)) in want.iter().zip(&got).enumerate() {
        match g {
            None => problems.push(format!("X[{k}] missing")),
            Some(g) => {
                let err = ((g.0 - w.0).powi(2) + (g.1 - w.1).powi(2)).sqrt();
                if err > 1e-9 * (1.0 + w.0.hypot(w.1)) {
                    problems.push(format!(
                        "X[{k}] = {} {} but the direct DFT gives {} {}",
                        g.0, g.1, w.0, w.1
                    ));
                }
            }
        }
    }
    problems
}

fn floats(v: Option<&String>) -> Vec<f64> {
    v.map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_default()
}

#[derive(Serialize)]
struct DemoOut {
    status: job::StatusOut,
    expected: Vec<(f64, f64)>,
    problems: Vec<String>,
    verified: bool,
}

fn demo(a: DemoArgs) -> Result<(), Failure> {
    let profile = a.profile.unwrap_or_else(demo_profile);
    let job = read_profile(&profile).map_err(wire)?;
    let re = floats(job.submission.parameters.get("input"));
    let im = floats(job.submission.parameters.get("input_im"));
    if re.is_empty() {
        return Err(Failure::input(anyhow::anyhow!(
            "{}: the demo needs an FFT profile with parameter 'input'",
            profile.display()
        )));
    }
    let tmp = tempfile::Builder::new()
        .prefix("mvm-demo-")
        .tempdir()
        .map_err(Failure::failed)?;
    let text = a.out.output == Output::Text;
    if text {
        eprintln!(
            "starting a lab: {} super-peer(s) and {} nodes on loopback ({})",
            a.superpeers,
            a.nodes,
            tmp.path().display()
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(Failure::failed)?;
    // Ctrl-C from here on: stop the lab and remove its files, then exit 130. (Caught now, acted
    // on once the lab has started or failed to.)
    let mut signals = {
        let _in_runtime = rt.enter();
        crate::cmd::daemon::Signals::new()
    };
    let mut lab = Lab::start(&tmp.path().join("lab"), a.nodes, a.superpeers, false, a.net)?;
    let broker = lab.broker.clone();
    let result = rt.block_on(async {
        tokio::select! {
            r = async {
                let client = Client::new(&lab.user()?, &broker).await.map_err(wire)?;
                let s = client.submit(&job).await.map_err(wire)?;
                if text {
                    eprintln!("submitted {} ({}) to {}", s.job, profile.display(), client.broker());
                }
                job::wait(&client, s, text).await
            } => r.map(Some),
            () = signals.recv() => Ok(None),
        }
    });
    lab.stop();
    drop(lab);
    drop(tmp);
    let Some(s) = result? else {
        eprintln!("mvm: interrupted; the lab is stopped and its files removed");
        return Err(Failure::quiet(130));
    };
    let out = job::StatusOut::from(&s);
    let lines: String = out.outputs.iter().map(|(_, t)| t.as_str()).collect();
    let problems = if s.state == mvm_superpeer::proto::JobState::Done {
        check_fft(&lines, &re, &im)
    } else {
        Vec::new()
    };
    let verified = s.state == mvm_superpeer::proto::JobState::Done && problems.is_empty();
    match a.out.output {
        Output::Json => crate::cmd::print(
            &DemoOut {
                status: out,
                expected: dft(&re, &im),
                problems: problems.clone(),
                verified,
            },
            Output::Json,
            |_| String::new(),
        )?,
        Output::Text => {
            println!("{}-point FFT by WebAssembly jobs (index re im):", re.len());
            print!("{lines}");
            eprint!("{}", job::summary(&s));
            for p in &problems {
                eprintln!("  mismatch: {p}");
            }
            if verified {
                println!(
                    "verified: all {} values match a direct DFT computed in Rust",
                    re.len()
                );
            }
        }
    }
    job::outcome(&s)?;
    if !verified {
        return Err(Failure::failed(anyhow::anyhow!(
            "the results do not match the direct DFT ({} problems)",
            problems.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dft_check_accepts_the_right_answer_and_names_wrong_or_missing_values() {
        let re = [1.0, 2.0, 0.5, -1.0];
        let im = [0.0, -0.5, 1.0, 0.0];
        let x = dft(&re, &im);
        // X[0] is the plain sum.
        assert!((x[0].0 - 2.5).abs() < 1e-12 && (x[0].1 - 0.5).abs() < 1e-12);
        let good: String = x
            .iter()
            .enumerate()
            .map(|(k, v)| format!("{k} {:.17e} {:.17e}\n", v.0, v.1))
            .collect();
        assert!(check_fft(&good, &re, &im).is_empty());
        let bad = good.replacen("0 2.5", "0 2.6", 1);
        assert_ne!(bad, good);
        let p = check_fft(&bad, &re, &im);
        assert_eq!(p.len(), 1);
        assert!(p[0].starts_with("X[0]"), "{p:?}");
        let p = check_fft(
            &good.lines().skip(1).collect::<Vec<_>>().join("\n"),
            &re,
            &im,
        );
        assert_eq!(p, vec!["X[0] missing".to_owned()]);
        let p = check_fft(&format!("{good}junk\n"), &re, &im);
        assert!(p[0].contains("junk"), "{p:?}");
    }
}
