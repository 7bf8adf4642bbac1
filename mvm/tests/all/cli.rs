//! The `mvm` command as a user runs it: help, exit statuses, JSON output.

use std::process::{Command, Output};

fn mvm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mvm"))
        .args(args)
        .output()
        .expect("mvm runs")
}

#[test]
fn help_is_printed_for_every_subcommand() {
    for args in [
        &["--help"][..],
        &["bench", "--help"],
        &["bench", "queue", "--help"],
    ] {
        let out = mvm(args);
        assert!(out.status.success(), "{args:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Usage:"), "{args:?}: {text}");
    }
}

#[test]
fn usage_errors_exit_2_with_one_line() {
    let out = mvm(&["bench", "nosuch"]);
    assert_eq!(out.status.code(), Some(2));
    let out = mvm(&["bench", "queue", "--items", "0"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("mvm: bench queue:"), "{err}");
}

#[test]
fn bench_queue_prints_one_json_object() {
    let out = mvm(&[
        "bench",
        "queue",
        "--items",
        "20000",
        "--tcp-mib",
        "4",
        "--runs",
        "1",
        "-o",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stdout is one JSON document");
    for key in [
        "fifo_items_per_sec",
        "priority_items_per_sec",
        "crossbeam_items_per_sec",
        "remote_mb_per_sec",
        "raw_tcp_mb_per_sec",
    ] {
        let x = v[key].as_f64().unwrap_or(0.0);
        assert!(x > 0.0, "{key} = {x}");
    }
}
