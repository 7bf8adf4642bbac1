//! Hostile peers against a lab's super-peer, through real processes and sockets: `mvm bench
//! hostile` starts a lab and runs each attacker as a process of its own.

use std::process::Command;

/// A peer that sends frames over the limit and one that floods are each cut off, logged by the
/// super-peer, and refused at the connection afterwards; the well-behaved users' jobs all ran
/// meanwhile (the bench fails if one of them does not end done).
#[test]
fn oversized_frames_and_a_flood_get_their_senders_cut_off() {
    let out = Command::new(env!("CARGO_BIN_EXE_mvm"))
        .args([
            "bench",
            "hostile",
            "--secs",
            "1",
            "--attacks",
            "oversized,flood",
            // Only the cut-offs are checked here: the flooder must keep its pace beside the
            // other tests (at nice 19 on a loaded machine it stays under its quota).
            "--attacker-nice",
            "0",
            "-o",
            "json",
        ])
        .output()
        .expect("mvm runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    let attacks = r["attacks"].as_array().expect("attacks");
    assert_eq!(attacks.len(), 2, "{r}");
    for a in attacks {
        let name = &a["attack"];
        assert_eq!(a["cut_off_logged"], true, "{name}: not logged: {a}");
        assert_eq!(a["attacker"]["cut_off"], true, "{name}: still served: {a}");
        assert!(a["cut_off_after_secs"].as_f64().is_some(), "{name}: {a}");
        assert!(
            a["service"]["jobs_per_sec"].as_f64().unwrap_or(0.0) > 0.0,
            "{name}: {a}"
        );
    }
    // Held to its quota before the cut: it was answered, but not at will.
    let flood = &attacks[1];
    assert!(
        flood["attacker"]["answered"].as_u64().unwrap_or(0) > 0,
        "{flood}"
    );
}

/// An unknown attack is a usage error that says which ones there are; so is a niceness out of
/// range.
#[test]
fn an_unknown_attack_is_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_mvm"))
        .args(["bench", "hostile", "--attacks", "flood,ddos"])
        .output()
        .expect("mvm runs");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no attack 'ddos'"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_mvm"))
        .args(["bench", "hostile", "--attacker-nice", "20"])
        .output()
        .expect("mvm runs");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--attacker-nice"), "{err}");
}
