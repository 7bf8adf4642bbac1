//! `mvm`: the command-line front of the Multi-layered Virtual Machine.
//!
//! Thin by design: it parses arguments, calls the layer crates, and prints. Exit status: 0 on
//! success, 1 when a job ran and failed, 2 for bad input or usage, 3 when refused by policy;
//! errors are one line on stderr that names the file or peer concerned.

mod cmd;
mod exit;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use exit::Failure;

/// jemalloc: a node allocates small objects on one thread and frees them on another (an item
/// sent by one vertex is dropped by the next; a part is wired on one thread and its vertices
/// run on others). Its thread caches take such frees without the lock and consolidation of
/// glibc's arenas. Measured: trivial jobs per second through the broker and 8 B latency
/// between vertices both improve with it; mimalloc was faster to instantiate but slower per
/// item, as it hands every cross-thread free back to the allocating thread's page.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// MVM: turns machines spread over research domains into on-demand virtual laboratories.
#[derive(Debug, Parser)]
#[command(name = "mvm", version, about, propagate_version = true)]
struct Cli {
    /// Log filter, as for tracing's EnvFilter (e.g. `info`, `mvm_queue=debug`); MVM_LOG works too.
    #[arg(long, global = true, env = "MVM_LOG", default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

/// How data is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    /// For people.
    Text,
    /// One JSON document, for programs.
    Json,
}

/// `-o text|json`, on every command that prints data. (Not global: `mvm topology render` uses
/// `-o` for the file it writes.)
#[derive(Debug, Clone, Copy, clap::Args)]
pub(crate) struct OutputArg {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
    pub(crate) output: Output,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// A local lab on loopback: `up`, `down`, `status`, and `demo` (the main job, verified).
    Lab(cmd::lab::Args),
    /// Run a node daemon: register with a super-peer and run the parts of jobs it is given;
    /// or `drain`/`undrain` a node of a group.
    Node(cmd::daemon::NodeArgs),
    /// Run a super-peer: its group's broker (takes jobs, places them, collects results).
    Superpeer(cmd::daemon::SuperpeerArgs),
    /// Submit a job profile to a super-peer (`--wait` to follow it and print the results).
    Submit(cmd::job::SubmitArgs),
    /// Show jobs on a super-peer (pending ones with why they wait).
    Status(cmd::job::StatusArgs),
    /// Cancel a job.
    Cancel(cmd::job::CancelArgs),
    /// Ask for offers to run a job by a promised finish (`--deadline`): the super-peer plans
    /// it in time (from its profile's `estimate`) and holds each offer a minute.
    Offer(cmd::agree::OfferArgs),
    /// Accept an offer: the agreement reserves its nodes from its start, and its job runs then.
    Accept(cmd::agree::AcceptArgs),
    /// Offers and agreements, and their states (offered, accepted, running, met, violated,
    /// expired, cancelled).
    Agreements(cmd::agree::AgreementsArgs),
    /// The bank of the domain's market: `balance`, `history`, `mint` (administrators),
    /// `transfer`; credits to six decimals, kept in the group's replicated job log.
    Bank(cmd::bank::Args),
    /// Bring back the output files of an ended job (its profile's `[files] outputs`), also of
    /// one that failed, each at DIR/VERTEX/PATH.
    Fetch(cmd::files::FetchArgs),
    /// A live terminal view of the group: its nodes, its jobs and their items per second, and
    /// the deepest queues (`q` quits).
    Top(cmd::top::TopArgs),
    /// What a job's vertices wrote (stdout, stderr, `mvm.log`), kept also when it failed;
    /// `--follow` prints lines as they are written.
    Logs(cmd::logs::LogsArgs),
    /// A link to the super-peer's live web view (`mvm superpeer --http`), logging this user
    /// in: the group's nodes, the jobs this user may read, a running job's topology drawn.
    Web(cmd::job::WebArgs),
    /// Take a checkpoint of a running job now (its profile must ask for checkpoints).
    Checkpoint(cmd::job::CancelArgs),
    /// Move a part of a running job to another node while it runs (live migration; its
    /// profile must ask for checkpoints).
    Migrate(cmd::job::MigrateArgs),
    /// Change a running job's bid for its nodes' CPU (credits per CPU-second): its guests'
    /// shares follow at once.
    Bid(cmd::market::BidArgs),
    /// The CPU market: `hosts`, ranked by price (the top one gives the most CPU for the least
    /// bid).
    Market(cmd::market::MarketArgs),
    /// Hold a pending job back from placement.
    Hold(cmd::job::CancelArgs),
    /// Release a held job: it is placed when there is room.
    Release(cmd::job::CancelArgs),
    /// Run a whole job on this node: check the profile, topology and modules, then run.
    Run(cmd::run::Args),
    /// Check, generate and draw topology graph files (DOT).
    Topology(cmd::topology::Args),
    /// A node's image repository of execution environments: import, list, verify.
    Image(cmd::image::Args),
    /// Guest templates (`environments/*.toml`) and warm pool files: check them.
    Env(cmd::env::Args),
    /// A domain's certificate authority: create it, issue node and user identities.
    Ca(cmd::ca::Args),
    /// Policies: check a directory, ask it a question, reload a super-peer's.
    Policy(cmd::policy::Args),
    /// Trigger files (`mvm superpeer --triggers DIR`): check them.
    Trigger(cmd::trigger::Args),
    /// Measure MVM against its references (crossbeam, raw TCP, MPICH) in the same run.
    Bench(cmd::bench::Args),
    /// Run one part of a job inside its guest, for the node that started this process (its
    /// job on stdin, its end on stdout); not for people.
    #[command(hide = true)]
    Worker,
    /// The MVM agent of a guest that is a domain of its own (Xen), started by its image's
    /// init: runs the parts its node sends in workers inside the guest.
    Agent(cmd::daemon::AgentArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap prints help and version to stdout (exit 0) and usage errors to stderr (exit 2).
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(exit::USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if !matches!(
        cli.command,
        Command::Lab(_)
            | Command::Node(_)
            | Command::Superpeer(_)
            | Command::Worker
            | Command::Agent(_)
    ) {
        // A command whose output is piped into one that stops reading (`mvm status -o json |
        // head`) ends quietly, as Unix tools do, instead of panicking on the closed pipe. Not
        // for daemons and the lab, which outlive their readers; sockets are not affected
        // (their writes do not raise the signal).
        // SAFETY: sets a signal's disposition before any thread of this program starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let result = match cli.command {
        Command::Lab(args) => cmd::lab::run(args),
        Command::Node(args) => cmd::daemon::node(args),
        Command::Image(args) => cmd::image::run(args),
        Command::Env(args) => cmd::env::run(args),
        Command::Web(args) => cmd::job::web(args),
        Command::Trigger(args) => cmd::trigger::run(args),
        Command::Ca(args) => cmd::ca::run(args),
        Command::Policy(args) => cmd::policy::run(args),
        Command::Superpeer(args) => cmd::daemon::superpeer(args),
        Command::Submit(args) => cmd::job::submit(args),
        Command::Status(args) => cmd::job::status(args),
        Command::Fetch(args) => cmd::files::fetch(args),
        Command::Offer(args) => cmd::agree::offer(args),
        Command::Bank(args) => cmd::bank::run(args),
        Command::Accept(args) => cmd::agree::accept(args),
        Command::Agreements(args) => cmd::agree::agreements(args),
        Command::Cancel(args) => cmd::job::cancel(args),
        Command::Logs(args) => cmd::logs::logs(args),
        Command::Top(args) => cmd::top::top(args),
        Command::Checkpoint(args) => cmd::job::checkpoint(args),
        Command::Migrate(args) => cmd::job::migrate(args),
        Command::Bid(args) => cmd::market::bid(args),
        Command::Market(args) => cmd::market::market(args),
        Command::Hold(args) => cmd::job::hold(args, true),
        Command::Release(args) => cmd::job::hold(args, false),
        Command::Run(args) => cmd::run::run(args),
        Command::Topology(args) => cmd::topology::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Worker => cmd::daemon::worker(),
        Command::Agent(args) => cmd::daemon::agent(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { code, error }) => {
            let message = format!("{error:#}");
            if !message.is_empty() {
                eprintln!("mvm: {message}");
            }
            ExitCode::from(code)
        }
    }
}
