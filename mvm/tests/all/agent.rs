//! `mvm agent` as a real process on loopback, as a Xen guest's image starts it: a hello without
//! the guest's key is refused; with it, the agent starts `mvm worker` with the connection as
//! its standard input and output, and a part handed over that connection runs and reports.
//! (The node's side through a real Xen guest is in `scripts/xen/node-checks`.)

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mvm_component::policy::{Principal, PrincipalKind};
use mvm_component::runtime::{Runtime, RuntimeConfig};
use mvm_superpeer::proto::LimitSpec;
use mvm_superpeer::worker::agent::{AgentAddr, hello};
use mvm_superpeer::worker::{WorkerEnd, WorkerJob, job_frames, read_end};

/// Writes its greeting to stdout.
const GREET: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "hello from the guest")
  (func (export "_start")
    (i32.store (i32.const 16) (i32.const 64))
    (i32.store (i32.const 20) (i32.const 20))
    (drop (call $write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 32)))))"#;

const KEY: &str = "00112233445566778899aabbccddeeff";

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn job() -> WorkerJob {
    let node = Runtime::new(&RuntimeConfig {
        max_instances: 4,
        ..RuntimeConfig::default()
    })
    .expect("runtime");
    let (m, _, _) = node
        .cache()
        .load("greet", GREET.as_bytes())
        .expect("compiles");
    WorkerJob {
        space: "j-agent-1".into(),
        topology_file: "greet.dot".into(),
        topology: "digraph { v [component=greet]; }".into(),
        queue: Default::default(),
        modules: vec![("greet".into(), m.serialize().expect("serializes").into())],
        parameters: BTreeMap::new(),
        limits: LimitSpec::default(),
        placement: vec![0],
        here: 0,
        owner: Principal {
            kind: PrincipalKind::User,
            name: "alice".into(),
            domain: "default".into(),
            roles: Vec::new(),
        },
        max_memory_bytes: node.max_memory_bytes() as u64,
        restore: None,
        sandboxes: Default::default(),
        guest_files: None,
    }
}

#[test]
fn an_agent_refuses_a_stranger_and_runs_its_nodes_part_in_a_worker_on_the_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, format!("{KEY}\n")).expect("key");
    let addr: SocketAddr = {
        let l = TcpListener::bind("127.0.0.1:0").expect("a free port");
        l.local_addr().expect("addr")
    };
    let log = dir.path().join("agent.log");
    let agent = Agent(
        Command::new(env!("CARGO_BIN_EXE_mvm"))
            .args(["agent", "--listen", &addr.to_string(), "--key-file"])
            .arg(&key_file)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("mvm agent"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "the agent never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let at = |key: &str| AgentAddr {
        addr,
        key: key.into(),
    };

    // A stranger (another guest on the bridge) does not know this guest's key.
    let refused = rt
        .block_on(hello(&at("ffeeddccbbaa99887766554433221100"), true))
        .expect_err("refused");
    assert_eq!(
        refused.kind(),
        std::io::ErrorKind::PermissionDenied,
        "{refused}"
    );
    assert!(refused.to_string().contains("key"), "{refused}");

    // A probe: the agent is there, and starts nothing.
    let (_, none) = rt.block_on(hello(&at(KEY), false)).expect("probe");
    assert_eq!(none, None);

    // A worker on the connection: the part's job in, its end out.
    let (conn, pid) = rt.block_on(hello(&at(KEY), true)).expect("a worker");
    let pid = pid.expect("the worker's pid");
    let mut conn = conn.into_std().expect("std");
    conn.set_nonblocking(false).expect("blocking");
    conn.write_all(&job_frames(&job()).expect("frames"))
        .expect("the job");
    let end = read_end(&mut conn).expect("the end");
    let WorkerEnd::Done(report) = end else {
        panic!("the part failed: {end:?}");
    };
    assert_eq!(
        report.pid, pid,
        "the part ran in the worker the agent started"
    );
    assert_ne!(pid, agent.0.id(), "a worker of its own, not the agent");
    assert_eq!(report.vertices.len(), 1);
    assert_eq!(&report.vertices[0].stdout[..], b"hello from the guest");
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").expect("boot id");
    assert_eq!(report.boot_id.as_deref(), Some(boot.trim()));
    drop(conn);

    // The agent says so on its console (a Xen guest's is in dom0's xenconsoled logs).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(&format!("MVM_AGENT worker pid={pid} ended")) {
            assert!(
                text.contains(&format!("MVM_AGENT worker pid={pid} started")),
                "{text}"
            );
            assert!(text.contains("without this guest's key"), "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "no end of the worker in: {text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_agent_without_an_address_or_key_says_what_is_missing() {
    let out = Command::new(env!("CARGO_BIN_EXE_mvm"))
        .args(["agent", "--listen", "127.0.0.1:0"])
        .output()
        .expect("mvm agent");
    assert_eq!(out.status.code(), Some(2), "an input error");
    let err = String::from_utf8_lossy(&out.stderr);
    // This host's kernel command line has no mvm.key.
    assert!(err.contains("mvm.key=KEY"), "{err}");
    let dir = tempfile::tempdir().expect("tempdir");
    let short = dir.path().join("key");
    std::fs::write(&short, "abc").expect("key");
    let out = Command::new(env!("CARGO_BIN_EXE_mvm"))
        .args(["agent", "--listen", "127.0.0.1:0", "--key-file"])
        .arg(&short)
        .output()
        .expect("mvm agent");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 16"));
}
