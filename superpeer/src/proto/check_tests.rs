//! Wire messages checked: what passes, and each bound and bad value refused.

use std::collections::BTreeMap;

use mvm_queue::queue::Config as QueueConfig;

use super::*;
use crate::proto::{EnvSpec, JobId, LimitSpec, MAX_SAVE_MS, Member, MoveStep, PartSpec};

/// A request `{role: {kind: {field: value}}}`, as a peer could send it with any text in
/// the field, decoded.
fn request(role: &str, kind: &str, field: &str, value: &str) -> std::io::Result<Request> {
    let msg = BTreeMap::from([(
        role,
        BTreeMap::from([(kind, BTreeMap::from([(field, value)]))]),
    )]);
    let mut buf = Vec::new();
    ciborium::into_writer(&msg, &mut buf).expect("encodes");
    crate::proto::decode::<Request>(&buf)
}

#[test]
fn a_message_with_a_malformed_job_id_or_hash_does_not_decode() {
    let cancel = |job: &str| request("client", "cancel", "job", job);
    for bad in ["a/b", "", "j-1", "ok-1.x_y"] {
        let e = cancel(bad).expect_err(bad);
        assert!(e.to_string().contains("job id"), "{e}");
    }
    let e = cancel("a b-1-1").expect_err("a space");
    assert!(e.to_string().contains("job id `a b-1-1`: expected"), "{e}");
    let ok = cancel("ok.x_y-1-a").expect("a job id");
    assert!(matches!(ok, Request::Client(ClientRequest::Cancel { job }) if job == "ok.x_y-1-a"));
    let fetch = |hash: &str| request("node", "fetch", "hash", hash);
    for bad in ["ab".to_owned(), "A".repeat(64), "a".repeat(63)] {
        let e = fetch(&bad).expect_err(&bad);
        assert!(
            e.to_string()
                .contains(&format!("hash `{bad}`: expected 64")),
            "{e}"
        );
    }
    let h = Hash::of(b"module");
    let ok = fetch(&h.to_string()).expect("a hash");
    assert!(matches!(ok, Request::Node(NodeRequest::Fetch { hash }) if hash == h));
}

#[test]
fn validation_refuses_parts_that_do_not_exist() {
    let part = PartSpec {
        job: "j-1-1".parse().expect("a job id"),
        topology_file: "t.dot".into(),
        topology: String::new(),
        queue: QueueConfig::default(),
        components: BTreeMap::new(),
        parameters: BTreeMap::new(),
        limits: LimitSpec::default(),
        placement: vec![0, 2],
        parts: vec![
            Member {
                peer: libp2p::PeerId::random(),
                addrs: vec![],
                eligible: true
            };
            2
        ],
        here: 1,
        start: false,
        environment: None,
        owner: mvm_component::policy::Principal {
            kind: mvm_component::policy::PrincipalKind::User,
            name: "alice".into(),
            domain: "lab".into(),
            roles: Vec::new(),
        },
        policy_digest: Hash::of(b""),
        attempt: 0,
        checkpoint: false,
        restore: None,
        restore_files: None,
        streams: false,
        files: None,
        image_from: Vec::new(),
        files_from: Vec::new(),
    };
    let e = BrokerRequest::Prepare(Box::new(part.clone()))
        .validate()
        .expect_err("part 2 of 2");
    assert_eq!(e, CheckError::PlacementPart { part: 2, parts: 2 });
    assert!(e.to_string().contains("part 2"), "{e}");
    let e = BrokerRequest::Prepare(Box::new(PartSpec {
        here: 2,
        placement: vec![0],
        ..part.clone()
    }))
    .validate()
    .expect_err("here out of range");
    assert_eq!(e, CheckError::NoSuchPart { here: 2, parts: 2 });
    assert!(e.to_string().contains("does not exist"), "{e}");
    // A prepare is awaited as long as fetching its files may take (30 s, then 1 MiB/s): the
    // inputs, or a restored part's saved files; one without files, the usual timeout.
    let within =
        |p: &PartSpec| Request::Broker(BrokerRequest::Prepare(Box::new(p.clone()))).answer_within();
    assert_eq!(within(&part), None);
    let input = crate::proto::InputFile {
        path: "in.bin".into(),
        hash: Hash::of(b"in"),
        size: 600 << 20,
    };
    let with_inputs = PartSpec {
        files: Some(crate::proto::FileSpec {
            inputs: vec![input],
            ..Default::default()
        }),
        ..part.clone()
    };
    assert_eq!(
        within(&with_inputs),
        Some(std::time::Duration::from_secs(630))
    );
    let saved = crate::proto::OutputFile {
        vertex: "v".into(),
        path: "out.bin".into(),
        hash: Hash::of(b"out"),
        size: 900 << 20,
    };
    let restored = PartSpec {
        restore: Some(Hash::of(b"blob")),
        restore_files: Some(vec![saved.clone(), saved]),
        ..with_inputs
    };
    assert_eq!(
        within(&restored),
        Some(std::time::Duration::from_secs(1830))
    );
    // A VM mode is one of three, or the message does not parse.
    let env =
        |mode: &str| format!(r#"{{"image":"env:1","vcpus":1,"memory_mib":64,"mode":"{mode}"}}"#);
    let e = serde_json::from_str::<EnvSpec>(&env("forever")).expect_err("bad VM mode");
    assert!(e.to_string().contains("forever"), "{e}");
    let ok: EnvSpec = serde_json::from_str(&env("save-restore")).expect("a VM mode");
    assert_eq!(ok.mode, crate::proto::VmMode::SaveRestore);
}

#[test]
fn a_check_error_names_the_field_and_the_value() {
    let e = NodeRequest::Register(Box::new(crate::proto::NodeInfo {
        name: "n1".into(),
        group: "g\n".into(),
        domain: "lab".into(),
        addrs: Vec::new(),
        cpus: 1,
        memory_bytes: 1 << 30,
        arch: "x86_64".into(),
        images: Vec::new(),
        slots: 1,
        eligible: false,
        load: crate::proto::NodeLoad::default(),
        guest_of: None,
        fetches_images: false,
    }))
    .validate()
    .expect_err("a control character");
    assert_eq!(e, CheckError::Name { field: "the group" });
    assert!(e.to_string().starts_with("the group must be"), "{e}");
    let e = check_len("hashes", MAX_ENTRIES + 1).expect_err("too many");
    assert_eq!(
        e.to_string(),
        format!("too many hashes ({})", MAX_ENTRIES + 1)
    );
    let e = Hello {
        cert: bytes::Bytes::new(),
    }
    .validate()
    .expect_err("empty");
    assert_eq!(e, CheckError::CertSize(0));
    let e = Verdict::Refused("x".repeat(MAX_REASON + 1))
        .validate()
        .expect_err("too long");
    assert_eq!(e, CheckError::ReasonSize(MAX_REASON + 1));
}

#[test]
fn a_check_error_is_a_failure_of_bad_input() {
    let f = crate::proto::Failure::from(CheckError::Name {
        field: "the job name",
    });
    assert_eq!(f.kind, crate::proto::FailureKind::Input);
    assert_eq!(
        f.message,
        "the job name must be 1 to 256 printable characters"
    );
}

/// A checkpoint or a move that gives a part's saved files longer than two days is refused; one
/// that gives nothing goes without the field, and decodes.
#[test]
fn a_save_given_more_than_two_days_is_refused_and_one_given_nothing_decodes() {
    let job: JobId = "j-1-1".parse().expect("a job id");
    let checkpoint = |within_ms| BrokerRequest::Checkpoint {
        job: job.clone(),
        attempt: 0,
        cut: 1,
        within_ms,
    };
    let leave = |within_ms| BrokerRequest::Move {
        job: job.clone(),
        attempt: 0,
        step: MoveStep::Leave { cut: 1, within_ms },
    };
    for r in [
        checkpoint(Some(MAX_SAVE_MS + 1)),
        leave(Some(MAX_SAVE_MS + 1)),
    ] {
        let e = Request::Broker(r).validate().expect_err("too long");
        assert_eq!(e, CheckError::SaveWait(MAX_SAVE_MS + 1));
    }
    for r in [checkpoint(Some(MAX_SAVE_MS)), leave(None), checkpoint(None)] {
        Request::Broker(r).validate().expect("within bounds");
    }
    // Without the field on the wire (`skip_serializing_if`), it decodes as none.
    let mut buf = Vec::new();
    ciborium::into_writer(&Request::Broker(checkpoint(None)), &mut buf).expect("encodes");
    let back = crate::proto::decode::<Request>(&buf).expect("decodes");
    assert!(matches!(
        back,
        Request::Broker(BrokerRequest::Checkpoint {
            within_ms: None,
            ..
        })
    ));
}
