//! `mvm node` and `mvm superpeer`: the daemons.

use std::path::{Path, PathBuf};
use std::time::Duration;

use mvm_superpeer::daemon::{Daemon, DaemonConfig};
use mvm_superpeer::net::NetConfig;
use mvm_superpeer::policy::PolicySource;

use crate::exit::Failure;

/// What both daemons take.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Common {
    /// Its name: its certificate's (given, it must match; it also names the default state
    /// directory, where the default is the host name, or "superpeer").
    #[arg(long)]
    name: Option<String>,
    /// Its group.
    #[arg(long, default_value = "default")]
    group: String,
    /// Its domain (default: its certificate's; another one is an error).
    #[arg(long)]
    domain: Option<String>,
    /// Its identity: a directory with `key`, `cert.pem` and `ca.pem`, as `mvm ca issue
    /// --out` writes it (default: the state directory).
    #[arg(long, value_name = "DIR")]
    identity: Option<PathBuf>,
    /// Another domain's CA certificate to trust (repeatable); its own CA (`ca.pem`) always is.
    #[arg(long = "trust", value_name = "FILE")]
    trust: Vec<PathBuf>,
    /// The policy directory this super-peer holds and serves (`inter-domain.polar`,
    /// `DOMAIN/*.polar`, `node.polar`); re-read when it changes and on `mvm policy reload`.
    #[arg(long, value_name = "DIR", conflicts_with = "policy_from")]
    policies: Option<PathBuf>,
    /// Fetch the policies from this super-peer (`/…/p2p/PEER`), e.g. the domain's top one
    /// (default: a node fetches its own super-peer's; a super-peer without `--policies` uses the
    /// embedded default, where the domain's members may do anything in it).
    #[arg(long, value_name = "MULTIADDR")]
    policy_from: Option<String>,
    /// The domain's revocation list to hold and hand on (its CA directory's `ca.crl`, which
    /// `mvm ca revoke` writes; it need not exist yet), re-read every two heartbeats. Without
    /// it the daemon fetches the lists from its policy source or super-peer. Either way a
    /// peer whose certificate a list revokes is refused, and its connections closed.
    #[arg(long, value_name = "FILE")]
    crl: Option<PathBuf>,
    /// A super-peer's bound, in MiB, on the files each user (or other domain's super-peer) may
    /// hold at it that no job names yet: inputs sent before the job that names them. More is
    /// refused until a job names them, or they go an hour after they came. Every put must
    /// also leave 1 GiB (or a twentieth of the disk, if less) free on the disk.
    #[arg(long, default_value_t = mvm_superpeer::files::DEFAULT_QUOTA >> 20,
          value_parser = clap::value_parser!(u64).range(1..=1 << 30))]
    files_quota_mib: u64,
    /// A multiaddress to listen on (repeatable; default: TCP and QUIC on 127.0.0.1, any port).
    #[arg(long = "listen", value_name = "MULTIADDR")]
    listen: Vec<String>,
    /// State directory: its key, and a super-peer's modules and replica of the group's job log
    /// (default: ~/.local/state/mvm/NAME).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Write the addresses to dial it at (one per line) to this file once it listens.
    #[arg(long, value_name = "FILE")]
    addr_file: Option<PathBuf>,
    /// Heartbeat interval in milliseconds.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    heartbeat_ms: u64,
    /// Silence, in milliseconds, after which a node is lost.
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(50..=600_000))]
    lost_after_ms: u64,
    /// Control requests a peer may make per second (with two seconds' worth at once); more are
    /// answered busy, and a peer over it for 3 seconds within a minute is cut off, as one that
    /// sends bad or endless frames is. 0: no quota.
    #[arg(long, default_value_t = mvm_superpeer::net::REQUEST_RATE)]
    request_rate: u32,
    /// How long a peer cut off for its offences stays blocked, in seconds.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=86_400 * 30))]
    block_secs: u64,
    /// Where compiled modules are cached (default: ~/.cache/mvm/modules).
    #[arg(long, env = "MVM_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (`GET /metrics`, plain HTTP: for a trusted
    /// monitoring network): a super-peer's jobs by state and leadership, a node's queues of
    /// running jobs and warm guests.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<std::net::SocketAddr>,
    /// Another group's super-peer, `/…/p2p/PEER` (repeatable): as super-peer, exchange group
    /// summaries with it and forward it jobs this group cannot place.
    #[arg(long = "peer", value_name = "MULTIADDR")]
    peers: Vec<String>,
    /// The OS layer's directory: its image repository (`images/`, filled by `mvm image
    /// import`), guests' storage and checkpoints. With it the node offers its images, and runs
    /// each job that names one in a guest made from it; without it, only the image `host`.
    #[arg(long, value_name = "DIR")]
    os_dir: Option<PathBuf>,
    /// The guest driver: `host` (control groups of this host) or `xen` (`xl`, in a dom0).
    #[arg(long, value_enum, default_value_t = DriverArg::Host)]
    driver: DriverArg,
    /// The parent control group of the host driver's guests.
    #[arg(long, default_value = "mvm", value_name = "NAME")]
    cgroup: String,
    /// Keep guests of templates warm, as a pool file says (`[[warm]]` tables of `template =
    /// "environments/NAME.toml"` and `guests = N`; check it with `mvm env check --pool`): a
    /// job that names one of the templates takes a warm guest instead of waiting for one to be
    /// made, and the broker sends such jobs to nodes that have one first. Needs `--os-dir`.
    #[arg(long, value_name = "FILE", requires = "os_dir")]
    pool: Option<PathBuf>,
    /// With the Xen driver: the node's address and prefix length on the bridge of its guests
    /// whose image runs an MVM agent (`mvm image import --agent`). The node makes the bridge
    /// when it needs it, gives each such guest an address on it (on the guest's kernel command
    /// line) and an interface through the `mvm-vif` hotplug script (`scripts/xen/vif` in
    /// `/etc/xen/scripts`), and runs the job's parts in workers its agent starts.
    #[arg(long, default_value = "10.213.0.1/24", value_name = "ADDR/LEN")]
    guest_net: String,
    /// The bridge of `--guest-net`.
    #[arg(long, default_value = "mvmbr0", value_name = "NAME")]
    guest_bridge: String,
    /// How remote channels to other nodes travel: over direct links (a TCP connection of
    /// each channel's own that the vertices read and write themselves, agreed over libp2p
    /// with a one-time secret) or over libp2p streams.
    #[arg(long, value_enum, default_value_t = LinksArg::Sealed)]
    links: LinksArg,
}

/// How a node's remote channels travel (`--links`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LinksArg {
    /// Direct links in authenticated, encrypted records (AES-256-GCM, a key per link): what
    /// is forged, replayed, reordered or cut on the way fails the link.
    Sealed,
    /// Direct links as plain TCP with nodes that take plain ones too (sealed with the others):
    /// the lowest latency, for networks trusted not to read or change the items.
    Plain,
    /// libp2p streams (noise, yamux) beside the control traffic.
    Streams,
}

impl LinksArg {
    /// The daemon's setting.
    pub(crate) fn links(self) -> mvm_superpeer::Links {
        match self {
            LinksArg::Sealed => mvm_superpeer::Links::Sealed,
            LinksArg::Plain => mvm_superpeer::Links::Plain,
            LinksArg::Streams => mvm_superpeer::Links::Streams,
        }
    }

    /// The value of `--links` that says it.
    pub(crate) fn arg(self) -> &'static str {
        match self {
            LinksArg::Sealed => "sealed",
            LinksArg::Plain => "plain",
            LinksArg::Streams => "streams",
        }
    }
}

/// The guest drivers a node can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DriverArg {
    /// Control groups of this host (the embedded default).
    Host,
    /// Xen guests through the `xl` toolstack.
    Xen,
}

/// Arguments of `mvm node`.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub(crate) struct NodeArgs {
    #[command(subcommand)]
    action: Option<NodeAction>,
    /// The group's super-peer, as `/ip4/…/tcp/…/p2p/PEER` (repeatable: tried in order).
    #[arg(long, required = true, value_name = "MULTIADDR")]
    bootstrap: Vec<String>,
    /// How many vertices it runs at once.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    slots: u32,
    /// The node whose guest this node runs in (given by that node when a trigger made the
    /// guest; the broker asks it to tear the guest down).
    #[arg(long, value_name = "PEER", hide = true)]
    guest_of: Option<String>,
    #[command(flatten)]
    common: Common,
}

/// What `mvm node` does to a node of a group, instead of running one.
#[derive(Debug, clap::Subcommand)]
enum NodeAction {
    /// Move every part off a node (of jobs that asked for checkpoints; others run to their end
    /// there) and place nothing more on it. For who may administer the domain.
    Drain(crate::cmd::job::DrainArgs),
    /// Place parts on a drained node again.
    Undrain(crate::cmd::job::DrainArgs),
}

/// Arguments of `mvm superpeer`.
#[derive(Debug, clap::Args)]
pub(crate) struct SuperpeerArgs {
    /// Vertices it runs itself (0: a pure broker).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=65_536))]
    slots: u32,
    /// Another super-peer candidate of the group, `/…/p2p/PEER` (repeatable): the candidates
    /// keep the group's job log together (Raft), and the one that leads it is the broker. Give
    /// each candidate the same others, at addresses that stay the same across restarts. None:
    /// a group of one super-peer.
    #[arg(long = "replica", value_name = "MULTIADDR")]
    replicas: Vec<String>,
    /// A directory of trigger files (`*.toml`; check them with `mvm trigger check`): each a
    /// condition over the group's metrics, held for a while, and an action — make guests that
    /// run nodes of the group, tear idle ones down, drain or undrain a node, or run a command
    /// here — asked at every heartbeat while this super-peer leads.
    #[arg(long, value_name = "DIR")]
    triggers: Option<PathBuf>,
    /// The domain's CA directory (`mvm ca init`), for triggers that make guests: this
    /// super-peer issues the certificates of the nodes in them.
    #[arg(long, value_name = "DIR")]
    issuer: Option<PathBuf>,
    /// Serve a live web view on this address (plain HTTP; read-only): the group's nodes, the
    /// jobs, a running job's topology, updated by server-sent events. Users log in with the
    /// link `mvm web` gives them, and see what `mvm status` shows them.
    #[arg(long, value_name = "ADDR:PORT")]
    http: Option<std::net::SocketAddr>,
    #[command(flatten)]
    common: Common,
}

fn state_dir(name: &str) -> Option<PathBuf> {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))?;
    Some(base.join("mvm").join(name))
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "node".into())
}

/// Writes `text` to `path` atomically.
pub(crate) fn write_atomic(path: &Path, text: &str) -> Result<(), Failure> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| Failure::input(anyhow::anyhow!("{}: {e}", path.display())))
}

fn serve(c: Common, mut config: DaemonConfig, default_name: String) -> Result<(), Failure> {
    let named = c.name.clone();
    let name = c.name.unwrap_or(default_name);
    let dir = c
        .dir
        .or_else(|| state_dir(&name))
        .ok_or_else(|| Failure::input(anyhow::anyhow!("no --dir and no HOME to put state in")))?;
    let listen = if c.listen.is_empty() {
        vec![
            "/ip4/127.0.0.1/tcp/0".to_owned(),
            "/ip4/127.0.0.1/udp/0/quic-v1".to_owned(),
        ]
    } else {
        c.listen
    };
    let listen = listen
        .iter()
        .map(|a| {
            a.parse()
                .map_err(|e| Failure::input(anyhow::anyhow!("--listen '{a}': {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // The files it is given are checked before anything is started.
    let pools = match &c.pool {
        Some(f) => mvm_os::template::load_pool(f).map_err(Failure::input)?,
        None => Vec::new(),
    };
    let identity = c.identity.clone().unwrap_or_else(|| dir.clone());
    let creds = mvm_superpeer::pki::Credentials::load(&identity, &c.trust)
        .map_err(|e| Failure::input(anyhow::anyhow!(e)))?;
    // The daemon is who its certificate says: its name and domain come from there.
    if let Some(n) = &named
        && *n != creds.principal.name
    {
        return Err(Failure::input(anyhow::anyhow!(
            "--name {n}: the certificate in {} names {}",
            identity.display(),
            creds.principal.name
        )));
    }
    if let Some(d) = &c.domain
        && *d != creds.principal.domain
    {
        return Err(Failure::input(anyhow::anyhow!(
            "--domain {d}: the certificate in {} is of domain {}",
            identity.display(),
            creds.principal.domain
        )));
    }
    config.policies = match (c.policies, c.policy_from) {
        (Some(d), _) => PolicySource::Dir(d),
        (None, Some(a)) => {
            mvm_superpeer::net::split_peer(&a)
                .map_err(|e| Failure::input(anyhow::anyhow!("--policy-from: {e}")))?;
            PolicySource::Fetch(Some(a))
        }
        (None, None) if config.broker => PolicySource::Default,
        (None, None) => PolicySource::Fetch(None),
    };
    for p in &c.peers {
        mvm_superpeer::net::split_peer(p)
            .map_err(|e| Failure::input(anyhow::anyhow!("--peer: {e}")))?;
    }
    if !c
        .cgroup
        .chars()
        .all(|ch| ch.is_ascii_alphanumeric() || "._-".contains(ch))
        || c.cgroup.is_empty()
        || c.cgroup.starts_with('.')
    {
        return Err(Failure::input(anyhow::anyhow!(
            "--cgroup '{}': a group name is [A-Za-z0-9._-], not starting with '.'",
            c.cgroup
        )));
    }
    // A part in a guest of the host driver runs in a worker: this program, `mvm worker`.
    let worker = worker_command()?;
    config.os = c.os_dir.map(|dir| mvm_superpeer::environment::OsConfig {
        pools,
        worker: Some(worker),
        guest_net: Some((c.guest_bridge, c.guest_net)),
        node: creds.principal.name.clone(),
        driver: match c.driver {
            DriverArg::Host => mvm_superpeer::environment::DriverKind::Host { cgroup: c.cgroup },
            DriverArg::Xen => mvm_superpeer::environment::DriverKind::Xen,
        },
        dir,
    });
    config.peers = c.peers;
    config.crl = c.crl;
    config.files_quota = c.files_quota_mib << 20;
    config.links = c.links.links();
    config.name = creds.principal.name.clone();
    config.group = c.group;
    config.domain = creds.principal.domain.clone();
    config.heartbeat = Duration::from_millis(c.heartbeat_ms);
    config.lost_after = Duration::from_millis(c.lost_after_ms);
    config.cache_dir = c.cache_dir.or_else(crate::cmd::run::default_cache_dir);
    config.module_dir = Some(dir.join("modules"));
    config.state_dir = Some(dir.clone());
    config.metrics = c.metrics;
    config.net = NetConfig {
        listen,
        request_rate: c.request_rate,
        block_for: Duration::from_secs(c.block_secs),
        ..NetConfig::default()
    };
    // Every connection is a descriptor: as many as this process may have, not the soft
    // default (often 1,024, which a few hundred strangers' connections would use up).
    if let Err(e) = raise_fd_limit() {
        tracing::warn!(error = %e.error, "cannot raise the limit of open files");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(Failure::failed)?;
    rt.block_on(async move {
        let daemon = Daemon::start(&creds, config)
            .await
            .map_err(|e| Failure::input(anyhow::anyhow!(e)))?;
        let addrs: Vec<String> = daemon
            .dial_addrs()
            .iter()
            .map(ToString::to_string)
            .collect();
        let addrs = addrs.join("\n");
        println!("{addrs}");
        if let Some(m) = daemon.metrics_addr() {
            tracing::info!("metrics on http://{m}/metrics");
        }
        if let Some(h) = daemon.http_addr() {
            tracing::info!("web view on http://{h}/ (log in with `mvm web`)");
        }
        if let Some(f) = &c.addr_file {
            write_atomic(f, &format!("{addrs}\n"))?;
        }
        daemon.run(shutdown_signal()).await;
        Ok(())
    })
}

/// How this program starts a worker: itself, `mvm worker`.
fn worker_command() -> Result<mvm_superpeer::worker::WorkerCommand, Failure> {
    std::env::current_exe()
        .map(|program| mvm_superpeer::worker::WorkerCommand {
            program,
            args: vec!["worker".into()],
        })
        .map_err(|e| Failure::failed(anyhow::anyhow!("cannot find this program for workers: {e}")))
}

/// Arguments of `mvm agent`.
#[derive(Debug, clap::Args)]
pub(crate) struct AgentArgs {
    /// Where to listen; default: the address the kernel command line gives (`mvm.ip=ADDR/LEN`),
    /// port 7047.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<std::net::SocketAddr>,
    /// A file holding the guest's key; default: the kernel command line's `mvm.key=KEY`.
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
}

/// `mvm agent`: the MVM agent of a guest that is a domain of its own, started by its image's
/// init; starts a worker for each part its node sends (see `mvm_superpeer::worker::agent`).
pub(crate) fn agent(args: AgentArgs) -> Result<(), Failure> {
    use mvm_superpeer::worker::agent::{AGENT_PORT, serve_agent};

    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let word = |name: &str| {
        cmdline
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .map(str::to_owned)
    };
    let listen = match args.listen {
        Some(a) => a,
        None => {
            let ip = word("mvm.ip=").ok_or_else(|| {
                Failure::input(anyhow::anyhow!(
                    "no --listen, and the kernel command line has no mvm.ip=ADDR/LEN"
                ))
            })?;
            let addr = ip.split('/').next().unwrap_or_default();
            let addr: std::net::IpAddr = addr.parse().map_err(|_| {
                Failure::input(anyhow::anyhow!(
                    "the kernel command line's mvm.ip={ip}: not an address"
                ))
            })?;
            std::net::SocketAddr::new(addr, AGENT_PORT)
        }
    };
    let key = match &args.key_file {
        Some(f) => std::fs::read_to_string(f)
            .map_err(|e| Failure::input(anyhow::anyhow!("{}: {e}", f.display())))?
            .trim()
            .to_owned(),
        None => word("mvm.key=").ok_or_else(|| {
            Failure::input(anyhow::anyhow!(
                "no --key-file, and the kernel command line has no mvm.key=KEY"
            ))
        })?,
    };
    if key.len() < 16 {
        return Err(Failure::input(anyhow::anyhow!(
            "the guest's key is {} characters: at least 16",
            key.len()
        )));
    }
    let worker = worker_command()?;
    let listener = std::net::TcpListener::bind(listen)
        .map_err(|e| Failure::failed(anyhow::anyhow!("cannot listen on {listen}: {e}")))?;
    serve_agent(listener, &key, &worker)
        .map_err(|e| Failure::failed(anyhow::anyhow!("the agent on {listen}: {e}")))
}

/// `mvm worker`: runs one part of a job for the node that started this process, inside the
/// part's guest (see `mvm_superpeer::worker`): its job on stdin, its end on stdout.
pub(crate) fn worker() -> Result<(), Failure> {
    use std::io::IsTerminal;
    use std::os::fd::FromRawFd;

    if std::io::stdin().is_terminal() {
        return Err(Failure::input(anyhow::anyhow!(
            "`mvm worker` is started by a node, which hands it a job on its stdin"
        )));
    }

    // The end goes to the node on the stdout it gave; anything else this process prints goes
    // to stderr, so that nothing can be mistaken for the end.
    // SAFETY: duplicates this process's own standard descriptors before any thread starts.
    let out = unsafe { libc::dup(1) };
    // SAFETY: as above.
    if out < 0 || unsafe { libc::dup2(2, 1) } < 0 {
        return Err(Failure::failed(anyhow::anyhow!(
            "the worker's standard output: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: `out` is a fresh descriptor that nothing else owns.
    let out = unsafe { std::fs::File::from_raw_fd(out) };
    match mvm_superpeer::worker::serve(std::io::stdin(), out, true) {
        0 => Ok(()),
        _ => Err(Failure::failed(anyhow::anyhow!(
            "the worker could not give its end to its node"
        ))),
    }
}

/// SIGINT and SIGTERM, caught from the moment this is created (inside a tokio runtime).
pub(crate) struct Signals(Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>);

impl Signals {
    /// Starts catching the signals.
    pub(crate) fn new() -> Signals {
        use tokio::signal::unix::{SignalKind, signal};
        Signals(
            signal(SignalKind::interrupt())
                .and_then(|i| Ok((i, signal(SignalKind::terminate())?)))
                .ok(),
        )
    }

    /// Completes once either signal has arrived (also one that arrived before this call).
    pub(crate) async fn recv(&mut self) {
        match &mut self.0 {
            Some((i, t)) => {
                tokio::select! {
                    _ = i.recv() => {}
                    _ = t.recv() => {}
                }
            }
            None => std::future::pending().await,
        }
    }
}

/// Completes on SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() {
    Signals::new().recv().await;
}

pub(crate) fn node(args: NodeArgs) -> Result<(), Failure> {
    match args.action {
        Some(NodeAction::Drain(a)) => return crate::cmd::job::drain(a, true),
        Some(NodeAction::Undrain(a)) => return crate::cmd::job::drain(a, false),
        None => {}
    }
    let guest_of = match &args.guest_of {
        Some(p) => Some(p.parse::<libp2p::PeerId>().map_err(|e| {
            Failure::input(anyhow::anyhow!("--guest-of '{p}': not a peer id: {e}"))
        })?),
        None => None,
    };
    let config = DaemonConfig {
        broker: false,
        bootstrap: args.bootstrap,
        slots: args.slots,
        guest_of,
        ..DaemonConfig::default()
    };
    serve(args.common, config, host_name())
}

pub(crate) fn superpeer(args: SuperpeerArgs) -> Result<(), Failure> {
    for r in &args.replicas {
        mvm_superpeer::net::split_peer(r)
            .map_err(|e| Failure::input(anyhow::anyhow!("--replica: {e}")))?;
    }
    let triggers = match &args.triggers {
        Some(d) => mvm_superpeer::trigger::load_dir(d).map_err(Failure::input)?,
        None => Vec::new(),
    };
    let issuer = match &args.issuer {
        Some(d) => Some(std::sync::Arc::new(
            mvm_superpeer::pki::Ca::load(d)
                .map_err(|e| Failure::input(anyhow::anyhow!("--issuer {}: {e}", d.display())))?,
        )),
        None => None,
    };
    let config = DaemonConfig {
        broker: true,
        slots: args.slots,
        replicas: args.replicas,
        triggers,
        issuer,
        http: args.http,
        ..DaemonConfig::default()
    };
    serve(args.common, config, "superpeer".into())
}

/// Raises the soft limit of open files to the hard one; gives the limit now.
pub(crate) fn raise_fd_limit() -> Result<u64, Failure> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given, which outlives the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(Failure::failed(std::io::Error::last_os_error()));
    }
    if r.rlim_cur < r.rlim_max {
        r.rlim_cur = r.rlim_max;
        // SAFETY: setrlimit only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
            return Err(Failure::failed(std::io::Error::last_os_error()));
        }
    }
    Ok(r.rlim_cur)
}
