//! The parsers on outputs recorded from the real `xl` of Xen 4.17 (Debian bookworm) under
//! `scripts/xen-suite`, and the command runner on real processes. The driver itself is tested
//! against the real hypervisor by `os-layer/tests/xen.rs`.

use super::*;

const LIST_RUNNING: &str = include_str!("testdata/list-running.txt");
const LIST_RESTORED: &str = include_str!("testdata/list-restored.txt");
const LIST_PAUSED: &str = include_str!("testdata/list-paused.txt");
const LIST_VERBOSE: &str = include_str!("testdata/list-verbose.txt");
const LIST_CPUPOOL: &str = include_str!("testdata/list-cpupool.txt");
const CPUPOOL_LIST: &str = include_str!("testdata/cpupool-list.txt");
const SCHED_CREDIT2: &str = include_str!("testdata/sched-credit2.txt");
const INVALID: &str = include_str!("testdata/invalid-domain.txt");

#[test]
fn xl_list_reads_every_domain_with_state_memory_and_vcpus() {
    let all = parse_list(LIST_RUNNING).unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].name, "Domain-0");
    assert_eq!(all[0].id, Some(0));
    let g = &all[1];
    assert_eq!(
        (g.name.as_str(), g.id, g.memory_mib, g.vcpus, g.state),
        ("g1", Some(1), 128, 1, State::Blocked)
    );
    assert!((g.cpu_seconds - 3.5).abs() < 1e-9);

    let paused = parse_list(LIST_PAUSED).unwrap();
    assert_eq!(paused.len(), 1);
    assert_eq!(paused[0].state, State::Paused);
    assert_eq!(paused[0].memory_mib, 100);

    // After restore the same name has another domid.
    let restored = parse_list(LIST_RESTORED).unwrap();
    assert_eq!(restored[1].name, "g1");
    assert_eq!(restored[1].id, Some(2));
    assert_eq!(restored[1].state, State::Running);

    // Extra columns (-v, -c) do not disturb the fixed ones.
    assert_eq!(parse_list(LIST_VERBOSE).unwrap()[1].state, State::Blocked);
    assert_eq!(parse_pool(LIST_CPUPOOL, "Domain-0").unwrap(), "Pool-0");
    assert!(parse_pool(LIST_CPUPOOL, "g1").is_err());
}

#[test]
fn every_state_flag_reads_and_garbage_is_refused() {
    for (flags, state) in [
        ("r-----", State::Running),
        ("-b----", State::Blocked),
        ("--p---", State::Paused),
        ("---s--", State::Shutdown),
        ("----c-", State::Crashed),
        ("-----d", State::Dying),
        ("------", State::Running),
        ("-bp---", State::Paused),
    ] {
        assert_eq!(parse_state(flags), Some(state), "{flags}");
    }
    for bad in ["", "r----", "r------", "x-----", "rb p--"] {
        assert_eq!(parse_state(bad), None, "{bad:?}");
    }
    assert!(parse_list("Name ID\ng1 x 1 1 r----- 0.1\n").is_err());
    assert!(parse_list("garbage\n").is_err());
    assert!(parse_list("").unwrap().is_empty());
}

#[test]
fn sched_and_cpupool_tables_read() {
    assert_eq!(
        parse_sched(SCHED_CREDIT2, "g1").unwrap(),
        Sched {
            weight: 768,
            cap: 50
        }
    );
    assert!(parse_sched(SCHED_CREDIT2, "g2").is_err());
    assert_eq!(
        parse_cpupools(CPUPOOL_LIST).unwrap(),
        vec![("Pool-0".to_owned(), "credit2".to_owned())]
    );
}

#[test]
fn xl_s_unknown_domain_message_is_not_found() {
    let e = DriverError::Command {
        command: "xl destroy g1".into(),
        status: "exit status: 1".into(),
        stderr: INVALID.trim().into(),
    };
    assert!(not_found(&e));
    let other = DriverError::Command {
        command: "xl create".into(),
        status: "exit status: 3".into(),
        stderr: include_str!("testdata/create-exists.txt").into(),
    };
    assert!(!not_found(&other));
}

#[test]
fn commands_return_stdout_carry_stderr_and_are_killed_at_their_limit() {
    let sh = Path::new("/bin/sh");
    assert_eq!(
        run(
            sh,
            &["-c", "echo out; echo err >&2"],
            Duration::from_secs(10)
        )
        .unwrap(),
        "out\n"
    );
    match run(
        sh,
        &["-c", "echo oops >&2; exit 3"],
        Duration::from_secs(10),
    ) {
        Err(DriverError::Command { stderr, status, .. }) => {
            assert_eq!(stderr, "oops");
            assert!(status.contains('3'), "{status}");
        }
        other => panic!("{other:?}"),
    }
    let t = std::time::Instant::now();
    match run(sh, &["-c", "sleep 30"], Duration::from_millis(200)) {
        Err(DriverError::Timeout { .. }) => {}
        other => panic!("{other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(matches!(
        run(Path::new("/nonexistent/xl"), &[], Duration::from_secs(1)),
        Err(DriverError::Command { .. })
    ));
}

#[test]
fn a_spec_that_cannot_be_served_is_refused_before_xl_runs() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = XenConfig::new(dir.path().join("state"));
    // An xl that fails loudly if it is ever run.
    cfg.xl = dir.path().join("no-xl-here");
    let d = XenDriver::new(cfg).unwrap();
    let mut spec = pv_spec();
    spec.name = "bad name".into();
    assert!(matches!(d.create(&spec), Err(DriverError::Spec(_))));
    spec.name = "ok".into();
    assert!(matches!(
        d.set_sched("ok", Sched { weight: 0, cap: 0 }),
        Err(DriverError::Spec(_))
    ));
    // Restore needs the driver's own record of the guest.
    assert!(matches!(
        d.restore("ok", &dir.path().join("ck")),
        Err(DriverError::NotFound(_))
    ));
}

/// An `xl` stand-in that logs its arguments and answers like the real one did (recorded above).
/// A unit-test seam only: the driver is tested against the real xl by `tests/xen.rs`.
fn fake_xl(dir: &Path, create_stderr: &str, create_rc: i32) -> PathBuf {
    let log = dir.join("calls");
    let err = dir.join("create.err");
    fs::write(&err, create_stderr).unwrap();
    let script = dir.join("xl");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$*\" >> '{log}'\ncase \"$1\" in\n  create) cat '{err}' >&2; exit {create_rc} ;;\n  list) echo 'g1 is an invalid domain identifier (rc=-6)' >&2; exit 1 ;;\nesac\nexit 0\n",
            log = log.display(),
            err = err.display(),
        ),
    )
    .unwrap();
    fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    script
}

fn pv_spec() -> crate::guest::GuestSpec {
    crate::guest::GuestSpec::example("g1")
}

#[test]
fn a_name_taken_by_another_domain_is_exists_and_that_domain_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = XenConfig::new(dir.path().join("state"));
    cfg.xl = fake_xl(dir.path(), include_str!("testdata/create-exists.txt"), 3);
    let d = XenDriver::new(cfg).unwrap();
    assert!(matches!(d.create(&pv_spec()), Err(DriverError::Exists(_))));
    let calls = fs::read_to_string(dir.path().join("calls")).unwrap();
    assert!(calls.lines().any(|l| l.starts_with("create ")), "{calls}");
    assert!(
        !calls.contains("destroy"),
        "the other domain was destroyed: {calls}"
    );
    assert!(
        fs::read_dir(dir.path().join("state"))
            .unwrap()
            .next()
            .is_none()
    );
}

#[test]
fn a_failed_create_destroys_the_half_made_domain_and_keeps_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = XenConfig::new(dir.path().join("state"));
    cfg.xl = fake_xl(dir.path(), "libxl: error: cannot (re-)build domain: -3", 3);
    let d = XenDriver::new(cfg).unwrap();
    match d.create(&pv_spec()) {
        Err(DriverError::Command { stderr, .. }) => assert!(stderr.contains("re-)build")),
        other => panic!("{other:?}"),
    }
    let calls = fs::read_to_string(dir.path().join("calls")).unwrap();
    assert!(calls.lines().any(|l| l == "destroy g1"), "{calls}");
    assert!(
        fs::read_dir(dir.path().join("state"))
            .unwrap()
            .next()
            .is_none()
    );
}
