//! A job's files through real daemons in one process ([`super::harness`]): inputs sent by the
//! submitter, fetched by each node and laid out in its vertices' sandboxes; outputs taken
//! back, also from a job that failed, and read by the owner.

use std::path::{Path, PathBuf};

use super::harness::{Lab, finished};
use crate::client::{Prepared, read_profile};
use crate::proto::{FailureKind, JobState};

/// The word-count example (`examples/wordcount`), as `mvm submit` reads it.
fn wordcount() -> Prepared {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/wordcount/wordcount.toml");
    read_profile(&p).expect("the example reads")
}

/// The output files of a job, `VERTEX/PATH`.
fn names(s: &crate::proto::JobStatus) -> Vec<String> {
    let f = s.files.iter();
    f.map(|f| format!("{}/{}", f.vertex, f.path)).collect()
}

/// The files under `dir`, relative, in order.
fn tree(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = walkdir::WalkDir::new(dir)
        .min_depth(1)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| {
            e.path()
                .strip_prefix(dir)
                .ok()
                .map(|p| p.display().to_string())
        })
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_reach_every_vertex_on_every_node_and_outputs_come_back() {
    let lab = Lab::start(1, &[2, 2]).await;
    let c = lab.client().await;
    let job = wordcount();
    let files = job.submission.files.as_ref().expect("files");
    assert_eq!(files.inputs.len(), 5, "{files:?}");
    assert!(files.inputs.iter().all(|i| i.path.starts_with("input/0")));
    let s = finished(&c, &job).await;
    assert_eq!(s.state, JobState::Done, "{s:?}");
    let nodes: std::collections::BTreeSet<_> = s.parts.iter().map(|p| p.node).collect();
    assert_eq!(nodes.len(), 2, "the job spans both nodes: {s:?}");
    let sum = s.outputs.iter().find(|(v, _)| v == "sum").expect("sum");
    assert_eq!(&sum.1[..], b"words 80\n", "every input was read once");
    let names = names(&s);
    assert_eq!(
        names,
        [
            "m0/out/counts.txt",
            "m1/out/counts.txt",
            "m2/out/counts.txt",
            "sum/out/total.txt"
        ]
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let got = c.fetch_outputs(&s, dir.path()).await.expect("fetched");
    assert_eq!(got.len(), 4);
    assert_eq!(tree(dir.path()), names);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("sum/out/total.txt")).expect("total"),
        "80\n"
    );
    // The mappers counted each input once between them, as the inputs were written.
    let mut counted: Vec<(String, u64)> = ["m0", "m1", "m2"]
        .iter()
        .flat_map(|m| {
            let text =
                std::fs::read_to_string(dir.path().join(m).join("out/counts.txt")).expect("counts");
            text.lines()
                .map(|l| {
                    let (p, n) = l.rsplit_once(' ').expect("PATH N");
                    (p.to_owned(), n.parse().expect("a count"))
                })
                .collect::<Vec<_>>()
        })
        .collect();
    counted.sort();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/wordcount");
    let want: Vec<(String, u64)> = files
        .inputs
        .iter()
        .map(|i| {
            let text = std::fs::read_to_string(example.join(&i.path)).expect("input");
            (i.path.clone(), text.split_whitespace().count() as u64)
        })
        .collect();
    assert_eq!(counted, want);
    // Fetched again: nothing changes, nothing is sent twice.
    assert_eq!(c.fetch_outputs(&s, dir.path()).await.expect("again"), got);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_job_keeps_what_its_vertices_wrote() {
    let lab = Lab::start(1, &[4]).await;
    let c = lab.client().await;
    let mut job = wordcount();
    job.submission
        .parameters
        .insert("fail".to_owned(), "1".to_owned());
    let s = finished(&c, &job).await;
    assert_eq!(s.state, JobState::Failed, "{s:?}");
    assert!(
        s.error.as_deref().is_some_and(|e| e.contains("status 2")),
        "{s:?}"
    );
    let names = names(&s);
    assert!(
        names.contains(&"sum/out/partial.txt".to_owned()),
        "{names:?}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    c.fetch_outputs(&s, dir.path()).await.expect("fetched");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("sum/out/partial.txt")).expect("partial"),
        "partial 80\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_over_their_bound_fail_the_job_and_name_what_was_left_out() {
    let lab = Lab::start(1, &[4]).await;
    let c = lab.client().await;
    let mut job = wordcount();
    if let Some(f) = job.submission.files.as_mut() {
        f.output_bytes = 3; // "80\n" fits, no counts.txt does
    }
    let s = finished(&c, &job).await;
    assert_eq!(s.state, JobState::Failed, "{s:?}");
    assert_eq!(s.error_kind, Some(crate::proto::ErrorKind::Files), "{s:?}");
    let e = s.error.clone().unwrap_or_default();
    assert!(
        e.contains("over the bound of 3") && e.contains("out/counts.txt"),
        "{e}"
    );
    let names = names(&s);
    assert!(
        names.contains(&"sum/out/total.txt".to_owned()),
        "what fits is kept: {names:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_not_sent_are_refused_and_a_file_is_got_only_with_its_job() {
    let lab = Lab::start(1, &[4]).await;
    let c = lab.client().await;
    // A submission naming inputs the super-peer never got.
    let mut job = wordcount();
    job.inputs.clear();
    let e = c.submit(&job).await.expect_err("inputs not sent");
    assert_eq!(e.kind, FailureKind::Input, "{e}");
    assert!(
        e.message.contains("input/01-mvm.txt") && e.message.contains("not held"),
        "{e}"
    );
    // Sent and run; a file is got only as a file of the job it is asked with.
    let s = finished(&c, &wordcount()).await;
    assert_eq!(s.state, JobState::Done, "{s:?}");
    let other = finished(&c, &super::harness::sleeping("nap", 0)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let forged = crate::proto::JobStatus {
        job: other.job.clone(),
        ..s.clone()
    };
    let e = c
        .fetch_outputs(&forged, dir.path())
        .await
        .expect_err("not its file");
    assert_eq!(e.kind, FailureKind::NotFound, "{e}");
    assert!(
        tree(dir.path()).is_empty(),
        "nothing written: {:?}",
        tree(dir.path())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_files_are_read_under_the_policy_that_guards_results() {
    // Members read their own jobs' results only (and so their files).
    let rbac = r#"
permission("member", "read-results");
permission("researcher", "read-results");
permission("researcher", "submit");
allow(user: User, action: String, job: Job) if
    user.domain = job.domain and job.owner = user.name and job.owner_domain = user.domain and
    role in user.roles and permission(role, action);
"#;
    let nodes = "allow(user: User, \"run\", node: Node) if user.domain = node.domain;\n";
    let files = [("default/rbac.polar", rbac), ("node.polar", nodes)];
    let lab = super::harness::Setup::new(1, &[4])
        .policies(&files)
        .start()
        .await;
    let c = lab.client().await;
    let s = finished(&c, &wordcount()).await;
    assert_eq!(s.state, JobState::Done, "{s:?}");
    let mallory = lab.client_as(&lab.user_as("mallory", &["member"])).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let e = mallory
        .fetch_outputs(&s, dir.path())
        .await
        .expect_err("not hers");
    assert_eq!(e.kind, FailureKind::Refused, "{e}");
    assert!(
        tree(dir.path()).is_empty(),
        "nothing written: {:?}",
        tree(dir.path())
    );
    c.fetch_outputs(&s, dir.path()).await.expect("the owner's");
    assert_eq!(tree(dir.path()).len(), 4);
}

#[test]
fn inputs_that_leave_the_profile_s_tree_or_are_links_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::create_dir_all(d.join("data")).expect("mkdir");
    std::fs::write(d.join("data/a.txt"), "a").expect("write");
    std::os::unix::fs::symlink("/etc/hostname", d.join("data/link")).expect("symlink");
    std::fs::write(d.join("t.dot"), "digraph { v [component=c] }").expect("write");
    std::fs::write(d.join("c.wat"), "(module)").expect("write");
    let profile = |name: &str, files: &str| -> PathBuf {
        let p = d.join(name);
        let text = format!(
            "name = \"x\"\ntopology = \"t.dot\"\n[components]\nc = \"c.wat\"\n[files]\n{files}\n"
        );
        std::fs::write(&p, text).expect("write");
        p
    };
    for (name, files, says) in [
        ("up.toml", "inputs = [\"../secret\"]", "climbs"),
        ("abs.toml", "inputs = [\"/etc/passwd\"]", "absolute"),
        ("link.toml", "inputs = [\"data/\"]", "symbolic links"),
        ("missing.toml", "inputs = [\"nothere.txt\"]", "nothere.txt"),
        (
            "big.toml",
            "inputs = [\"data/a.txt\"]\nmax_input = \"0\"",
            "max_input",
        ),
    ] {
        let e = read_profile(&profile(name, files)).expect_err(name);
        assert_eq!(e.kind, FailureKind::Input, "{e}");
        assert!(e.message.contains(name), "names the file: {e}");
        assert!(e.message.contains(says), "{name}: {e}");
    }
    std::fs::remove_file(d.join("data/link")).expect("rm");
    let ok = read_profile(&profile("ok.toml", "inputs = [\"data/\"]")).expect("valid");
    let f = ok.submission.files.expect("files");
    assert_eq!(f.inputs.len(), 1);
    assert_eq!(f.inputs[0].path, "data/a.txt");
    assert_eq!(f.output_bytes, mvm_component::files::DEFAULT_OUTPUT_BYTES);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_job_takes_its_input_files_to_the_group_that_runs_it() {
    let (_small, _big, c) = super::harness::small_and_big(2, 8, 4).await;
    let s = c.submit(&wordcount()).await.expect("forwarded");
    assert!(!s.broker_addrs.is_empty(), "held by the big group: {s:?}");
    let there = c.follow(&s).expect("follow");
    let end = super::harness::until(&there, &s.job, JobState::is_final).await;
    assert_eq!(end.state, JobState::Done, "{end:?}");
    let dir = tempfile::tempdir().expect("tempdir");
    there
        .fetch_outputs(&end, dir.path())
        .await
        .expect("fetched");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("sum/out/total.txt")).expect("total"),
        "80\n"
    );
}

/// Writes `note.txt` in its sandbox, sleeps `SLEEP` ms, then exits with status `EXIT`.
fn scribe(sleep_ms: u64, exit: u32) -> String {
    format!(
        r#"(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_close" (func $close (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "note.txt")
  (data (i32.const 16) "written\n")
  (func (export "_start")
    (drop (call $open (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 8) (i32.const 9)
      (i64.const 0x1fffffff) (i64.const 0x1fffffff) (i32.const 0) (i32.const 100)))
    (i32.store (i32.const 108) (i32.const 16))
    (i32.store (i32.const 112) (i32.const 8))
    (drop (call $write (i32.load (i32.const 100)) (i32.const 108) (i32.const 1) (i32.const 104)))
    (drop (call $close (i32.load (i32.const 100))))
    (i32.store (i32.const 144) (i32.const 1))
    (i64.store (i32.const 152) (i64.const {ns}))
    (drop (call $poll (i32.const 128) (i32.const 256) (i32.const 1) (i32.const 512)))
    (call $exit (i32.const {exit}))))"#,
        ns = sleep_ms * 1_000_000
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_stopped_because_another_failed_keeps_what_it_wrote() {
    use bytes::Bytes;
    use std::collections::BTreeMap;
    let lab = Lab::start(1, &[1, 1]).await;
    let c = lab.client().await;
    let keep = Bytes::from(scribe(60_000, 0));
    let fail = Bytes::from(scribe(300, 3));
    let (hk, hf) = (crate::proto::Hash::of(&keep), crate::proto::Hash::of(&fail));
    let job = Prepared {
        submission: crate::proto::Submission {
            name: "scribes".into(),
            topology_file: "two.dot".into(),
            topology: "digraph two { a [component=\"keep\"]; b [component=\"fail\"]; }\n".into(),
            components: BTreeMap::from([("keep".to_owned(), hk), ("fail".to_owned(), hf)]),
            limits: crate::proto::LimitSpec {
                wall_ms: Some(120_000),
                ..Default::default()
            },
            files: Some(crate::proto::FileSpec {
                inputs: Vec::new(),
                outputs: vec!["*.txt".into()],
                output_bytes: 1 << 20,
            }),
            ..Default::default()
        },
        modules: BTreeMap::from([(hk, keep), (hf, fail)]),
        inputs: BTreeMap::new(),
    };
    let s = finished(&c, &job).await;
    assert_eq!(s.state, JobState::Failed, "{s:?}");
    assert_eq!(s.parts.len(), 2, "a part on each node: {s:?}");
    // The stopped part's files come once its node has taken them.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let all = loop {
        let now = c.status(Some(&s.job)).await.expect("status").remove(0);
        if names(&now).len() == 2 {
            break now;
        }
        assert!(std::time::Instant::now() < deadline, "{now:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(names(&all), ["a/note.txt", "b/note.txt"]);
}

/// A one-vertex job that does nothing with the input file `file` (its bytes `seed`, repeated
/// to `size`), in `dir`.
fn with_input(dir: &Path, file: &str, seed: u8, size: usize) -> Prepared {
    std::fs::write(dir.join(file), vec![seed; size]).expect("write");
    std::fs::write(
        dir.join("noop.wat"),
        r#"(module (memory (export "memory") 1) (func (export "_start")))"#,
    )
    .expect("write");
    std::fs::write(
        dir.join("one.dot"),
        "digraph one { v [component=\"noop\"]; }\n",
    )
    .expect("write");
    let profile = dir.join(format!("{file}.toml"));
    std::fs::write(
        &profile,
        format!(
            "name = \"in\"\ntopology = \"one.dot\"\n[components]\nnoop = \"noop.wat\"\n\
             [files]\ninputs = [\"{file}\"]\n"
        ),
    )
    .expect("write");
    read_profile(&profile).expect("the profile reads")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_holds_at_most_the_quota_of_files_no_job_names() {
    // 1 MiB each: one 700 KiB file no job names fits, two do not.
    let lab = super::harness::Setup::new(1, &[2])
        .files_quota(1 << 20)
        .start()
        .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let [a, b, c] = [1u8, 2, 3].map(|i| with_input(dir.path(), &format!("{i}.bin"), i, 700 << 10));
    let alice = lab.client().await;
    alice.upload(&a).await.expect("within the quota");
    let e = alice.upload(&b).await.expect_err("over the quota");
    assert_eq!(e.kind, FailureKind::Refused, "{e}");
    assert!(
        e.message.contains("alice@default holds 716800 bytes")
            && e.message.contains("no job names yet"),
        "{e}"
    );
    // Bob's quota is his own.
    let bob = lab.client_as(&lab.user_as("bob", &["researcher"])).await;
    bob.upload(&b).await.expect("his own quota");
    // Once a job names alice's file, it no longer counts.
    let s = finished(&alice, &a).await;
    assert_eq!(s.state, JobState::Done, "{s:?}");
    alice.upload(&c).await.expect("a is named");
}
