//! Entry points of the fuzz targets in `fuzz/` (`scripts/fuzz`): each takes arbitrary bytes and
//! drives one of this crate's parsers with them. Not an API: hidden, and changed at will. A
//! target returns normally on every input; a panic is a bug.

use std::path::PathBuf;
use std::sync::OnceLock;

use futures::FutureExt;
use mvm_component::policy::PrincipalKind;
use serde::de::DeserializeOwned;

use crate::joblog::TypeConfig;
use crate::pki::{Ca, Credentials, Subject, Trust};
use crate::proto::{
    FileAnswer, FileRequest, GroupSummary, Hello, ImageHeader, ImageRequest, JobId, Member,
    Request, Response, StreamHeader, Verdict, decode, read_frame,
};

/// A runtime with a clock, for the readers that give a frame a deadline.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap_or_else(|e| panic!("the fuzz target's runtime: {e}"))
    })
}

/// A directory of this process's own for files the targets write.
fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("mvm-fuzz-sp-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("the fuzz target's directory {}: {e}", dir.display()));
        dir
    })
}

fn msg<T: DeserializeOwned>(body: &[u8]) -> Option<T> {
    decode::<T>(body).ok()
}

/// The control protocol's messages and the other CBOR frames peers send (hello and verdict,
/// stream, image and file headers, group gossip, job-log RPCs): the first byte picks the
/// message, the rest is its CBOR; what decodes is checked as a daemon checks it. The last
/// choice reads the rest as length-prefixed frames: the second byte odd, a control stream's
/// (requests, or answers with its bit 1 set), even, the other streams'.
pub fn wire(data: &[u8]) {
    let Some((&first, body)) = data.split_first() else {
        return;
    };
    match first % 16 {
        0 => {
            if let Some(r) = msg::<Request>(body) {
                let _ = std::hint::black_box(r.validate());
            }
        }
        1 => {
            if let Some(r) = msg::<Response>(body) {
                let _ = std::hint::black_box(r.validate());
            }
        }
        2 => {
            if let Some(h) = msg::<Hello>(body) {
                let _ = std::hint::black_box(h.validate());
            }
        }
        3 => {
            if let Some(v) = msg::<Verdict>(body) {
                let _ = std::hint::black_box(v.validate());
            }
        }
        4 => drop(std::hint::black_box(msg::<StreamHeader>(body))),
        5 => drop(std::hint::black_box(msg::<ImageRequest>(body))),
        6 => drop(std::hint::black_box(msg::<ImageHeader>(body))),
        7 => drop(std::hint::black_box(msg::<FileRequest>(body))),
        8 => drop(std::hint::black_box(msg::<FileAnswer>(body))),
        9 => drop(std::hint::black_box(msg::<Member>(body))),
        10 => drop(std::hint::black_box(msg::<GroupSummary>(body))),
        11 => drop(std::hint::black_box(msg::<
            openraft::raft::AppendEntriesRequest<TypeConfig>,
        >(body))),
        12 => drop(std::hint::black_box(msg::<
            openraft::raft::VoteRequest<crate::joblog::NodeId>,
        >(body))),
        13 => drop(std::hint::black_box(msg::<
            openraft::raft::InstallSnapshotRequest<TypeConfig>,
        >(body))),
        14 => drop(std::hint::black_box(
            msg::<crate::worker::agent::AgentReply>(body),
        )),
        _ => {
            let Some((&mode, mut stream)) = body.split_first() else {
                return;
            };
            if mode & 1 == 1 {
                // A control stream's frames (length, id, CBOR), as a daemon reads a peer's.
                crate::rpc::fuzz_frames(stream, mode & 2 == 2, runtime());
                return;
            }
            for _ in 0..64 {
                match read_frame::<Request, _>(&mut stream, 1 << 16).now_or_never() {
                    Some(Ok(r)) => {
                        let _ = std::hint::black_box(r.validate());
                    }
                    _ => return,
                }
            }
        }
    }
}

/// What the certificate target keeps across runs: a domain's trust and a peer's credentials.
struct Pki {
    trust: Trust,
    creds: Credentials,
}

fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let dir = scratch().join("ca");
        let _ = std::fs::remove_dir_all(&dir);
        let ca =
            Ca::init(&dir, "physics", 30).unwrap_or_else(|e| panic!("the fuzz target's CA: {e}"));
        let creds = Credentials::ephemeral(
            &ca,
            &Subject {
                kind: PrincipalKind::User,
                name: "alice".into(),
                roles: vec!["researcher".into()],
            },
        )
        .unwrap_or_else(|e| panic!("the fuzz target's credentials: {e}"));
        Pki {
            trust: creds.trust.clone(),
            creds,
        }
    })
}

/// A peer's certificate (DER) as the hello exchange checks it against a domain's CA, for the
/// peer that offers it (first byte even); or a CA certificate (PEM) to trust (odd).
pub fn certificate(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let pki = pki();
    if first & 1 == 0 {
        let _ = std::hint::black_box(pki.trust.verify(rest, &pki.creds.peer()));
    } else if let Ok(text) = std::str::from_utf8(rest) {
        let mut t = Trust::default();
        let _ = std::hint::black_box(t.add_pem(text));
    }
}

/// Trigger files (TOML) and the small languages of profiles and commands: the first byte says
/// which, the rest is the text.
pub fn triggers(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    if first % 6 == 0 {
        let path = scratch().join("t.toml");
        if std::fs::write(&path, rest).is_ok() {
            let _ = std::hint::black_box(crate::trigger::load(&path));
        }
        return;
    }
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match first % 6 {
        1 => drop(std::hint::black_box(crate::trigger::Condition::parse(text))),
        2 => drop(std::hint::black_box(crate::schedule::Rank::parse(text))),
        3 => drop(std::hint::black_box(crate::proto::parse_credits(text))),
        4 => drop(std::hint::black_box(crate::proto::parse_account(text))),
        _ => {
            if let Ok(id) = text.parse::<JobId>() {
                let again: JobId = id
                    .to_string()
                    .parse()
                    .unwrap_or_else(|e| panic!("job id '{id}' does not parse again: {e}"));
                assert_eq!(again, id, "a job id changed when printed and parsed");
            }
        }
    }
}

fn cbor<T: serde::Serialize>(tag: u8, msg: &T) -> Vec<u8> {
    let mut out = vec![tag];
    // Writing into a Vec fails only for a value serde cannot write: no seed then.
    if ciborium::into_writer(msg, &mut out).is_err() {
        out.clear();
    }
    out
}

/// Seeds for the targets: valid inputs of each, by target name. `examples` is the workspace's
/// `examples/` directory: its first profile becomes a submission.
pub fn seeds(examples: &std::path::Path) -> Vec<(&'static str, Vec<u8>)> {
    use crate::proto::{ClientRequest, Hash};
    let mut wire = vec![
        cbor(0, &Request::Group),
        cbor(0, &Request::Leader),
        cbor(0, &Request::Client(ClientRequest::Status { job: None })),
        cbor(
            0,
            &Request::Client(ClientRequest::Missing {
                hashes: vec![Hash::of(b"module")],
            }),
        ),
    ];
    if let Ok(p) = crate::client::read_profile(&examples.join("fft8.toml")) {
        let submit = Request::Client(ClientRequest::Submit(Box::new(p.submission)));
        wire.push(cbor(0, &submit));
        // The same as a frame on a stream, and on a control stream.
        let body = cbor(0, &submit);
        let mut framed = vec![15, 0];
        let len = u32::try_from(body.len() - 1).unwrap_or(u32::MAX);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&body[1..]);
        wire.push(framed);
        if let Ok(f) = crate::rpc::encode(7, &submit, crate::proto::MAX_FRAME) {
            wire.push([&[15, 1][..], &f].concat());
        }
    }
    // A control stream's requests, and its answers.
    let mut requests = vec![15, 1];
    let mut answers = vec![15, 3];
    for (id, (q, a)) in [
        (Request::Group, Response::Ok),
        (Request::Leader, Response::Error(crate::net::busy())),
    ]
    .into_iter()
    .enumerate()
    {
        let id = id as u64;
        if let (Ok(q), Ok(a)) = (
            crate::rpc::encode(id, &q, 1 << 16),
            crate::rpc::encode(id, &a, 1 << 16),
        ) {
            requests.extend(q);
            answers.extend(a);
        }
    }
    wire.push(requests);
    wire.push(answers);
    wire.push(cbor(
        1,
        &Response::Missing {
            hashes: vec![Hash::of(b"x")],
        },
    ));
    let pki = pki();
    wire.push(cbor(
        2,
        &Hello {
            cert: pki.creds.cert.clone().into(),
        },
    ));
    wire.push(cbor(3, &Verdict::Refused("not trusted".into())));
    wire.push(cbor(3, &Verdict::Passed));
    wire.push(cbor(
        4,
        &StreamHeader {
            job: JobId::new("fft8", 3, 12),
            vertex: "sink0".into(),
            port: "in".into(),
            direct: true,
            plain: false,
            attempt: 1,
        },
    ));
    if let Ok(id) =
        "sci:1.0@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".parse()
    {
        wire.push(cbor(5, &ImageRequest { id }));
    }
    wire.push(cbor(
        7,
        &FileRequest::Put {
            hash: Hash::of(b"data"),
            size: 4,
        },
    ));
    wire.push(cbor(8, &FileAnswer::Size(4)));
    wire.push(cbor(
        9,
        &Member {
            peer: pki.creds.peer(),
            addrs: vec![
                "/ip4/127.0.0.1/udp/4001/quic-v1"
                    .parse()
                    .unwrap_or_else(|e| panic!("a multiaddr: {e}")),
            ],
            eligible: true,
        },
    ));
    let mut out: Vec<(&'static str, Vec<u8>)> = wire
        .into_iter()
        .filter(|w| !w.is_empty())
        .map(|w| ("wire", w))
        .collect();
    let mut c = vec![0];
    c.extend_from_slice(&pki.creds.cert);
    out.push(("certificate", c));
    for t in [
        "\x01load.avg1 > 1.5 and free_memory <= 100",
        "\x02(free_slots * 2) - load",
        "\x0312.5",
        "\x04alice@physics",
        "\x05fft8-3-12",
    ] {
        out.push(("triggers", t.as_bytes().to_vec()));
    }
    out
}
