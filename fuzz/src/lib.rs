//! MVM's fuzz targets: every parser and wire format that meets input from users or peers,
//! each a function of arbitrary bytes that must return (a panic is a bug). `scripts/fuzz` runs
//! them under AFL++ (`cargo afl`); `tests/replay.rs` replays their corpora and the inputs of
//! crashes found and fixed (`regressions/`) on every test run.

use std::path::{Path, PathBuf};

/// One fuzz target.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// Its name: the directory of its corpus and regressions.
    pub name: &'static str,
    /// What it fuzzes.
    pub about: &'static str,
    /// Runs one input.
    pub run: fn(&[u8]),
}

/// Every target.
pub const TARGETS: &[Target] = &[
    Target {
        name: "topology",
        about: "topology files (DOT)",
        run: mvm_component::fuzz::topology,
    },
    Target {
        name: "profile",
        about: "job profiles (TOML) and their checks",
        run: mvm_component::fuzz::profile,
    },
    Target {
        name: "policy",
        about: "policy bundles (Polar) loaded and asked",
        run: mvm_component::fuzz::policy,
    },
    Target {
        name: "template",
        about: "guest templates, pool files and image ids",
        run: mvm_os::fuzz::template,
    },
    Target {
        name: "triggers",
        about: "trigger files, conditions, rank expressions, credits, accounts, job ids",
        run: mvm_superpeer::fuzz::triggers,
    },
    Target {
        name: "wire",
        about: "control messages and every CBOR frame peers exchange",
        run: mvm_superpeer::fuzz::wire,
    },
    Target {
        name: "certificate",
        about: "peer certificates (DER) against a CA, CA certificates (PEM)",
        run: mvm_superpeer::fuzz::certificate,
    },
    Target {
        name: "queue-frames",
        about: "the queue stream protocol's frames",
        run: mvm_queue::fuzz::queue_frames,
    },
    Target {
        name: "direct-frames",
        about: "direct links' frames",
        run: mvm_queue::fuzz::direct_frames,
    },
    Target {
        name: "sealed-records",
        about: "sealed direct links' records",
        run: mvm_queue::fuzz::sealed_records,
    },
    Target {
        name: "codecs",
        about: "items decoded by every codec, codec names",
        run: mvm_queue::fuzz::codecs,
    },
    Target {
        name: "checkpoint",
        about: "checkpoint blobs, decoded and restored into a running job",
        run: mvm_component::fuzz::checkpoint,
    },
    Target {
        name: "module",
        about: "modules as a broker checks them",
        run: mvm_component::fuzz::module,
    },
    Target {
        name: "host-abi",
        about: "the host ABI, called with a script's pointers, lengths and port names",
        run: mvm_component::fuzz::host_abi,
    },
];

/// The target named `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// This crate's directory (where `corpus/` and `regressions/` are).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The files of `dir`, sorted (none if it does not exist).
///
/// # Errors
/// The directory exists and cannot be read.
pub fn files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for e in entries {
        let e = e?;
        if e.file_type()?.is_file() {
            out.push(e.path());
        }
    }
    out.sort();
    Ok(out)
}

/// Seeds for every target: valid inputs made by the crates' own encoders, and the workspace's
/// own files (topologies, profiles, policies, templates, triggers, modules).
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let ws = root().join("..");
    let mut out = mvm_queue::fuzz::seeds();
    out.extend(mvm_superpeer::fuzz::seeds(&ws.join("examples")));
    let read = |dir: &str, ext: &str| -> Vec<Vec<u8>> {
        let mut v = Vec::new();
        let mut stack = vec![ws.join(dir)];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == ext)
                    && let Ok(b) = std::fs::read(&p)
                {
                    v.push(b);
                }
            }
        }
        v
    };
    let tagged = |tag: u8, b: Vec<u8>| {
        let mut t = vec![tag];
        t.extend(b);
        t
    };
    for b in read("topologies", "dot").into_iter().take(12) {
        out.push(("topology", b));
    }
    for b in read("examples", "toml") {
        out.push(("profile", b));
    }
    let policies = read("policies", "polar");
    if !policies.is_empty() {
        let names = ["inter-domain.polar", "physics/rules.polar", "node.polar"];
        let joined: Vec<String> = policies
            .iter()
            .zip(names.iter().cycle())
            .map(|(b, n)| format!("{n}\n{}", String::from_utf8_lossy(b)))
            .collect();
        out.push(("policy", joined.join("\0").into_bytes()));
    }
    for b in read("environments", "toml") {
        out.push(("template", tagged(0, b)));
    }
    out.push((
        "template",
        tagged(
            2,
            b"sci:1.0@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
                .to_vec(),
        ),
    ));
    for b in read("triggers", "toml") {
        out.push(("triggers", tagged(0, b)));
    }
    for b in read("jobs/build", "wasm").into_iter().take(6) {
        out.push(("module", b));
    }
    // The host ABI: a sender and a receiver, each op with its four numbers.
    let op = |code: u8, args: [i32; 4]| {
        let mut v = vec![code];
        for a in args {
            v.extend_from_slice(&a.to_le_bytes());
        }
        v
    };
    let mut script = Vec::new();
    for _ in 0..6 {
        script.extend(op(7, [0, 0, 100, 64]));
    }
    script.extend(op(3, [512, 256, 0, 0]));
    script.extend(op(4, [16, 1, 600, 64]));
    script.extend(op(5, [2, 0, 3, 0]));
    script.extend(op(6, [0; 4]));
    for _ in 0..6 {
        script.extend(op(8, [0, 0, 2000, 1000]));
    }
    script.extend(op(2, [8, 2, 3000, 100]));
    script.extend(op(9, [1, 0, 0, 0]));
    out.push(("host-abi", script.clone()));
    for blob in mvm_component::fuzz::checkpoint_seeds(&script) {
        out.push(("checkpoint", tagged(0, blob)));
    }
    out
}
