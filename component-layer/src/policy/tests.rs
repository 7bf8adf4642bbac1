use super::*;

fn shipped() -> Bundle {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    Bundle::read_dir(&dir).expect("the shipped policies read")
}

fn user(name: &str, domain: &str, roles: &[&str]) -> Principal {
    Principal {
        kind: PrincipalKind::User,
        name: name.into(),
        domain: domain.into(),
        roles: roles.iter().map(|r| (*r).to_owned()).collect(),
    }
}

fn node(name: &str, domain: &str, roles: &[&str]) -> Principal {
    Principal {
        kind: PrincipalKind::Node,
        ..user(name, domain, roles)
    }
}

fn job(owner: &Principal, domain: &str, vcpus: i64, vertices: i64) -> Resource {
    Resource::Job(Job {
        name: "ring".into(),
        owner: owner.name.clone(),
        owner_domain: owner.domain.clone(),
        domain: domain.into(),
        vcpus,
        memory_mib: 512,
        vertices,
        image: "host".into(),
        user_vcpus: vcpus,
        user_memory_mib: 512,
        user_vertices: vertices,
    })
}

fn image(domain: &str) -> Resource {
    Resource::Image(Image {
        id: "sha256:00".into(),
        domain: domain.into(),
    })
}

fn a_node(domain: &str) -> Resource {
    Resource::Node(Node {
        name: "n1".into(),
        domain: domain.into(),
        roles: Vec::new(),
        group: "g".into(),
    })
}

fn ask(e: &dyn Engine, actor: &Principal, action: &str, resource: Resource) -> Decision {
    e.decide(&Question {
        actor: actor.clone(),
        action: action.into(),
        resource,
    })
}

#[test]
fn the_shipped_two_domain_lab_decides_its_matrix() {
    let e = OsoEngine::load(&shipped(), 1).expect("loads");
    let alice = user("alice", "physics", &["researcher"]);
    let bob = user("bob", "physics", &["member"]);
    let pat = user("pat", "physics", &["admin"]);
    let carol = user("carol", "biology", &["researcher"]);
    let dave = user("dave", "biology", &["member"]);
    let eve = user("eve", "chemistry", &["researcher"]);
    let sp = node("sp", "physics", &["superpeer"]);
    let plain = node("n2", "physics", &[]);
    // (actor, action, resource, allowed, words the reason must contain)
    let cases: Vec<(&Principal, &str, Resource, bool, &str)> = vec![
        (&alice, "submit", job(&alice, "physics", 2, 4), true, ""),
        (
            &bob,
            "submit",
            job(&bob, "physics", 1, 1),
            false,
            "policy of domain physics",
        ),
        (&bob, "read-results", job(&alice, "physics", 1, 1), true, ""),
        (
            &alice,
            "submit",
            job(&alice, "physics", 20, 4),
            false,
            "limits",
        ),
        (
            &alice,
            "submit",
            job(&alice, "physics", 2, 65),
            false,
            "64 vertices",
        ),
        (&pat, "submit", job(&pat, "physics", 100, 1000), true, ""),
        (
            &pat,
            "administer",
            Resource::Domain(Domain::named("physics")),
            true,
            "",
        ),
        (
            &alice,
            "administer",
            Resource::Domain(Domain::named("physics")),
            false,
            "physics",
        ),
        (
            &pat,
            "administer",
            Resource::Domain(Domain::named("biology")),
            false,
            "inter-domain",
        ),
        (&alice, "submit", job(&alice, "biology", 2, 4), true, ""),
        (
            &alice,
            "submit",
            job(&alice, "biology", 8, 4),
            false,
            "4 vCPUs",
        ),
        (
            &bob,
            "submit",
            job(&bob, "biology", 1, 1),
            false,
            "inter-domain",
        ),
        (
            &carol,
            "submit",
            job(&carol, "physics", 1, 1),
            false,
            "inter-domain",
        ),
        (&carol, "submit", job(&carol, "biology", 30, 100), true, ""),
        (&alice, "use-image", image("biology"), true, ""),
        (&dave, "use-image", image("biology"), false, "biology"),
        (
            &dave,
            "read-results",
            job(&carol, "biology", 1, 1),
            true,
            "",
        ),
        (
            &alice,
            "read-results",
            job(&alice, "biology", 1, 1),
            true,
            "",
        ),
        (
            &alice,
            "read-results",
            job(&carol, "biology", 1, 1),
            false,
            "inter-domain",
        ),
        (
            &eve,
            "submit",
            job(&eve, "chemistry", 1, 1),
            false,
            "no policy",
        ),
        (&alice, "run", a_node("biology"), true, ""),
        (&bob, "run", a_node("biology"), false, "node-level"),
        (&carol, "run", a_node("biology"), true, ""),
        (&sp, "use-image", image("biology"), true, ""),
        (&plain, "use-image", image("biology"), false, "inter-domain"),
        (&plain, "use-image", image("physics"), true, ""),
    ];
    for (actor, action, resource, allowed, why) in cases {
        let what = format!("{actor} {action} {resource}");
        match ask(&e, actor, action, resource) {
            Decision::Allow => assert!(allowed, "{what}: allowed, should be denied"),
            Decision::Deny(reason) => {
                assert!(!allowed, "{what}: denied ({reason}), should be allowed");
                assert!(
                    reason.contains(why),
                    "{what}: reason '{reason}' lacks '{why}'"
                );
            }
        }
    }
    let s = e.node_settings();
    assert_eq!(s.max_queues, Some(256));
    assert!(
        s.queue_kinds
            .as_ref()
            .is_some_and(|k| k.contains("priority"))
    );
    assert!(s.codecs.as_ref().is_some_and(|c| c.contains("zstd+cbor")));
}

#[test]
fn load_errors_name_the_file_and_line() {
    let mut b = shipped();
    b.files.insert(
        "physics/broken.polar".into(),
        "# fine\nallow(u: User, \"x\", r) if\n    u.name = ;\n".into(),
    );
    let e = OsoEngine::load(&b, 1).expect_err("a syntax error");
    match &e {
        BundleError::Polar { at, .. } => {
            assert_eq!(at.file, "physics/broken.polar");
            assert_eq!(at.line, 3, "{e}");
        }
        other => panic!("{other}"),
    }
    let mut b = shipped();
    b.files.insert(
        "biology/x.polar".into(),
        "\n\nallow(u: Usr, _a, _r);\n".into(),
    );
    let e = OsoEngine::load(&b, 1).expect_err("an unknown class");
    assert!(e.to_string().starts_with("biology/x.polar:3"), "{e}");
    let mut b = shipped();
    b.files.insert("a/b/c.polar".into(), String::new());
    let e = OsoEngine::load(&b, 1).expect_err("misplaced");
    assert!(matches!(e, BundleError::Layout { .. }), "{e}");
}

#[test]
fn a_misplaced_file_on_disk_is_refused_and_other_files_are_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("d/deeper")).expect("mkdir");
    std::fs::write(dir.path().join("README.md"), "hi").expect("write");
    std::fs::write(dir.path().join("d/rules.polar"), "allow(_a, _b, _c);").expect("write");
    std::fs::write(dir.path().join("d/ca.pem"), "x").expect("write");
    let b = Bundle::read_dir(dir.path()).expect("reads");
    assert_eq!(b.files.keys().collect::<Vec<_>>(), ["d/rules.polar"]);
    assert_eq!(b.domains(), ["d"]);
    std::fs::write(dir.path().join("stray.polar"), "").expect("write");
    let e = Bundle::read_dir(dir.path()).expect_err("stray");
    assert!(e.to_string().starts_with("stray.polar:"), "{e}");
}

#[test]
fn the_digest_changes_with_any_byte_and_the_cache_answers_like_the_engine() {
    let b = shipped();
    let mut c = b.clone();
    let first = c.files.keys().next().cloned().expect("a file");
    c.files.entry(first).and_modify(|t| t.push(' '));
    assert_ne!(b.digest(), c.digest());
    let engine = Cached::new(OsoEngine::load(&b, 7).expect("loads"), 4);
    assert_eq!(engine.version(), 7);
    let alice = user("alice", "physics", &["researcher"]);
    for round in 0..3 {
        for vcpus in 1..=10 {
            let d = ask(
                &engine,
                &alice,
                "submit",
                job(&alice, "physics", vcpus * 2, 1),
            );
            assert_eq!(d.allowed(), vcpus * 2 <= 16, "round {round}, {vcpus}");
        }
    }
    // It counted every answer: 8 of 10 allowed each round, each from the cache or not.
    let s = engine.stats().expect("a cached engine counts");
    assert_eq!((s.allowed, s.denied), (24, 6), "{s:?}");
    assert_eq!(s.cache_hits + s.cache_misses, 30, "{s:?}");
    assert!(s.cache_misses >= 10, "{s:?}");
    // The same question again is a hit.
    let before = engine.stats().expect("counts");
    ask(&engine, &alice, "submit", job(&alice, "physics", 2, 1));
    ask(&engine, &alice, "submit", job(&alice, "physics", 2, 1));
    let after = engine.stats().expect("counts");
    assert!(after.cache_hits > before.cache_hits, "{before:?} {after:?}");
}

#[test]
fn no_node_policy_and_no_domain_policy_deny() {
    let e = OsoEngine::load(&Bundle::default(), 1).expect("empty loads");
    let alice = user("alice", "physics", &["admin"]);
    assert!(!ask(&e, &alice, "run", a_node("physics")).allowed());
    assert!(!ask(&e, &alice, "submit", job(&alice, "physics", 1, 1)).allowed());
    assert_eq!(e.node_settings(), &NodeSettings::default());
}

#[test]
fn settings_and_limits_a_policy_does_not_state_do_not_restrict() {
    let mut b = Bundle::default();
    b.files.insert(
        "node.polar".into(),
        "allow(u: User, \"run\", n: Node) if u.domain = n.domain;".into(),
    );
    b.files.insert(
        "lab/rules.polar".into(),
        "allow(_u: User, _a: String, _r);".into(),
    );
    let e = OsoEngine::load(&b, 1).expect("loads");
    assert_eq!(e.node_settings(), &NodeSettings::default());
    let u = user("u", "lab", &[]);
    assert!(ask(&e, &u, "submit", job(&u, "lab", 1000, 1000)).allowed());
    assert!(ask(&e, &u, "run", a_node("lab")).allowed());
}

#[test]
fn a_domain_s_job_rules_give_the_shortest_default_and_the_longest_bound() {
    let files = [(
        "physics/checkpoints.polar",
        "checkpoint_interval(user: User, 60000) if \"researcher\" in user.roles;\n\
         checkpoint_interval(_user: User, 300000);\n\
         min_checkpoint_interval(_user: User, 1000);\n\
         min_checkpoint_interval(user: User, 5000) if \"student\" in user.roles;\n\
         max_array(_user: User, 1000);\n\
         max_array(user: User, 10) if \"student\" in user.roles;\n\
         revoked_jobs(_user: User, \"finish\");\n\
         revoked_jobs(user: User, \"cancel\") if \"student\" in user.roles;\n",
    )];
    let bundle = Bundle {
        files: files
            .iter()
            .map(|(p, t)| ((*p).to_owned(), (*t).to_owned()))
            .collect(),
    };
    let engine = OsoEngine::load(&bundle, 1).expect("loads");
    let who = |roles: &[&str]| Principal {
        kind: PrincipalKind::User,
        name: "ann".into(),
        domain: "physics".into(),
        roles: roles.iter().map(|r| (*r).to_owned()).collect(),
    };
    let rules =
        |roles: &[&str], domain: &str| engine.job_rules(&who(roles), domain).expect("evaluated");
    assert_eq!(
        rules(&["researcher"], "physics"),
        JobRules {
            default_ms: Some(60_000),
            min_interval_ms: Some(1000),
            max_array: Some(1000),
            on_revoked: Some(RevokedJobs::Finish),
        }
    );
    assert_eq!(
        rules(&["student"], "physics"),
        JobRules {
            default_ms: Some(300_000),
            min_interval_ms: Some(5000),
            max_array: Some(10),
            on_revoked: Some(RevokedJobs::Cancel),
        }
    );
    // A domain whose policy says nothing of checkpoints.
    assert_eq!(rules(&["researcher"], "biology"), JobRules::default());
    // The cache remembers them per actor and domain, and gives the same answers.
    let cached = Cached::new(OsoEngine::load(&bundle, 1).expect("loads"), 8);
    for _ in 0..2 {
        for (roles, domain) in [(["researcher"], "physics"), (["student"], "physics")] {
            let got = cached.job_rules(&who(&roles), domain);
            assert_eq!(got, Ok(rules(&roles, domain)), "{roles:?}");
        }
    }
    // A rule with a number that is no interval is an error, not a silent default.
    let bad = Bundle {
        files: [(
            "physics/bad.polar".to_owned(),
            "checkpoint_interval(_user: User, -5);\n".to_owned(),
        )]
        .into_iter()
        .collect(),
    };
    let engine = OsoEngine::load(&bad, 1).expect("loads");
    let e = engine
        .job_rules(&who(&[]), "physics")
        .expect_err("a negative interval");
    assert!(e.contains("-5"), "{e}");
}

fn bundle_of(files: &[(&str, &str)]) -> Bundle {
    Bundle {
        files: files
            .iter()
            .map(|(p, t)| ((*p).to_owned(), (*t).to_owned()))
            .collect(),
    }
}

#[test]
fn a_node_runs_the_probes_of_node_polar_as_its_domain_overrides_them() {
    let engine = OsoEngine::load(
        &bundle_of(&[
            (
                "node.polar",
                "probe(\"load\", 2000);\nprobe(\"free_memory\", 5000);\nprobe(\"free_disk\", 60000);\n",
            ),
            (
                "physics/monitoring.polar",
                "probe(_node: Node, \"load\", 500);\n\
                 probe(node: Node, \"queue_depth\", 1000) if node.group = \"g1\";\n\
                 probe(node: Node, \"queue_depth\", 800) if node.group = \"g1\" and node.name = \"n1\";\n\
                 probe(_node: Node, \"free_disk\", 0);\n",
            ),
        ]),
        1,
    )
    .expect("loads");
    let plan = |n: &Node| -> Vec<(String, u64)> {
        engine
            .probes(n)
            .expect("evaluated")
            .into_iter()
            .collect::<Vec<_>>()
    };
    let s = |v: &[(&str, u64)]| -> Vec<(String, u64)> {
        v.iter().map(|(n, ms)| ((*n).to_owned(), *ms)).collect()
    };
    // Physics: its own interval for load, queue depth in group g1 (the shortest that holds
    // for n1), and free disk turned off.
    assert_eq!(
        plan(&node_in("n1", "physics", "g1")),
        s(&[("free_memory", 5000), ("load", 500), ("queue_depth", 800)])
    );
    assert_eq!(
        plan(&node_in("n2", "physics", "g2")),
        s(&[("free_memory", 5000), ("load", 500)])
    );
    // A domain without monitoring rules: the node defaults.
    assert_eq!(
        plan(&node_in("n3", "biology", "g1")),
        s(&[("free_disk", 60000), ("free_memory", 5000), ("load", 2000)])
    );
    // No rules at all: no probes.
    let none =
        OsoEngine::load(&bundle_of(&[("node.polar", "max_queues(4);\n")]), 1).expect("loads");
    assert!(
        none.probes(&node_in("n1", "physics", "g1"))
            .expect("evaluated")
            .is_empty()
    );
    // An interval that is no number of milliseconds is an error that names the probe.
    let bad =
        OsoEngine::load(&bundle_of(&[("node.polar", "probe(\"load\", -5);\n")]), 1).expect("loads");
    let e = bad
        .probes(&node_in("n1", "physics", "g1"))
        .expect_err("negative interval");
    assert!(e.contains("node.polar") && e.contains("load"), "{e}");
}

#[test]
fn a_domain_chooses_its_scheduling_policy_from_its_group_s_metrics() {
    let engine = Cached::new(
        OsoEngine::load(
            &bundle_of(&[(
                "physics/scheduling.polar",
                "# Pack while the group is idle, with some hysteresis; spread otherwise.\n\
                 scheduling(m: Metrics, \"pack\") if m.mean_load < 0.2;\n\
                 scheduling(m: Metrics, \"pack\") if m.scheduling = \"pack\" and m.mean_load < 0.3;\n\
                 scheduling(m: Metrics, \"least-loaded\") if m.max.queue_depth > 1000;\n\
                 scheduling(_m: Metrics, \"spread\");\n",
            )]),
            1,
        )
        .expect("loads"),
        16,
    );
    let mut m = Metrics {
        group: "g1".into(),
        domain: "physics".into(),
        scheduling: "rank".into(),
        nodes: 2,
        mean_load: 0.1,
        ..Metrics::default()
    };
    let choose = |m: &Metrics| engine.scheduling(m).expect("evaluated");
    assert_eq!(choose(&m).as_deref(), Some("pack"));
    m.mean_load = 0.25;
    assert_eq!(choose(&m).as_deref(), Some("spread"));
    m.scheduling = "pack".into();
    assert_eq!(choose(&m).as_deref(), Some("pack"), "hysteresis");
    m.mean_load = 0.5;
    assert_eq!(choose(&m).as_deref(), Some("spread"));
    // A probe's aggregate: absent (no node publishes it) the rule does not hold.
    m.max.insert("queue_depth".into(), 5000.0);
    assert_eq!(choose(&m).as_deref(), Some("least-loaded"));
    // Another domain's policy says nothing: no choice.
    m.domain = "biology".into();
    assert_eq!(choose(&m), None);
}

/// Node `name` of `domain`, in `group`, without roles, as a resource.
fn node_in(name: &str, domain: &str, group: &str) -> Node {
    Node {
        name: name.into(),
        domain: domain.into(),
        roles: Vec::new(),
        group: group.into(),
    }
}

#[test]
fn a_domain_s_floor_prices_are_given_to_its_nodes() {
    let engine = OsoEngine::load(
        &bundle_of(&[
            ("node.polar", "max_queues(4);\n"),
            (
                "physics/market.polar",
                "floor_price(node: Node, \"0.5\") if node.group = \"fast\";\n\
                 floor_price(node: Node, \"2\") if node.name = \"n9\";\n",
            ),
        ]),
        1,
    )
    .expect("loads");
    let floors = |n: &Node| engine.floor_prices(n).expect("evaluated");
    assert_eq!(floors(&node_in("n1", "physics", "fast")), vec!["0.5"]);
    assert_eq!(floors(&node_in("n9", "physics", "fast")), vec!["0.5", "2"]);
    assert!(floors(&node_in("n1", "physics", "slow")).is_empty());
    assert!(
        floors(&node_in("n1", "biology", "fast")).is_empty(),
        "another domain's"
    );
}

#[test]
fn a_domain_without_floor_prices_gives_none() {
    let engine = OsoEngine::load(
        &bundle_of(&[
            ("node.polar", "max_queues(4);\n"),
            (
                "physics/rbac.polar",
                "allow(_actor, \"submit\", _job: Job);\n",
            ),
        ]),
        1,
    )
    .expect("loads");
    assert_eq!(
        engine.floor_prices(&node_in("n1", "physics", "g")),
        Ok(Vec::new())
    );
}

#[test]
fn a_revoked_jobs_rule_that_is_neither_cancel_nor_finish_is_an_error_naming_it() {
    let bundle = Bundle {
        files: [(
            "physics/revoked.polar".to_owned(),
            "revoked_jobs(_user: User, \"maybe\");\n".to_owned(),
        )]
        .into(),
    };
    let engine = OsoEngine::load(&bundle, 1).expect("loads");
    let ann = Principal {
        kind: PrincipalKind::User,
        name: "ann".into(),
        domain: "physics".into(),
        roles: Vec::new(),
    };
    let e = engine.job_rules(&ann, "physics").expect_err("a bad action");
    assert!(e.contains("revoked_jobs") && e.contains("maybe"), "{e}");
}
