use super::*;

fn values(group: &[(&str, f64)], nodes: &[(&str, &str, f64)]) -> Values {
    Values {
        group: group.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
        nodes: nodes
            .iter()
            .map(|(m, n, v)| (((*m).to_owned(), (*n).to_owned()), *v))
            .collect(),
    }
}

#[test]
fn conditions_parse_compare_and_name_the_column_of_a_mistake() {
    let c =
        Condition::parse("pending_vertices > 64 and node_load{node=\"n1\"} <= 3").expect("parses");
    let v = |p: f64, l: f64| values(&[("pending_vertices", p)], &[("node_load", "n1", l)]);
    assert!(c.holds(&v(65.0, 3.0)));
    assert!(!c.holds(&v(64.0, 3.0)));
    assert!(!c.holds(&v(65.0, 3.5)));
    // A metric with no value now: the condition does not hold.
    assert!(!c.holds(&values(&[("pending_vertices", 100.0)], &[])));
    let c = Condition::parse("idle_guests=0 and mean.queue_depth != 1.5").expect("parses");
    assert!(c.holds(&values(
        &[("idle_guests", 0.0), ("mean.queue_depth", 2.0)],
        &[]
    )));
    let c = Condition::parse("free_disk{ node = \"a\" } < 1e9").expect("a node's probe");
    assert!(c.holds(&values(&[], &[("free_disk", "a", 5e8)])));
    for (bad, says) in [
        ("", "column 1: expected a metric"),
        ("pending > 3", "column 1: no group metric 'pending'"),
        ("mean.temperature > 3", "column 1: no group metric"),
        ("node_load > 3", "no group metric 'node_load'"),
        (
            "node_load{host=\"x\"} > 3",
            "column 10: expected {node=\"NAME\"}",
        ),
        ("node_load{node=\"x\" > 3", "'{' is not closed"),
        ("nodes >> 3", "column 8: expected a number"),
        ("nodes ~ 3", "column 7: expected one of"),
        (
            "nodes > 3 or nodes < 1",
            "column 11: expected 'and' or the end",
        ),
        ("nodes > 3 andnodes < 1", "expected 'and'"),
    ] {
        let e = Condition::parse(bad).expect_err(bad);
        assert!(e.contains(says), "{bad}: {e}");
    }
}

fn trigger(when: &str, hold: u64, cooldown: u64) -> Trigger {
    Trigger {
        name: "t".into(),
        file: "t.toml".into(),
        when: Condition::parse(when).expect("parses"),
        hold: Duration::from_secs(hold),
        cooldown: Duration::from_secs(cooldown),
        action: Action::Drain("n1".into()),
    }
}

#[test]
fn a_trigger_fires_once_its_condition_has_held_for_its_time_then_cools_down() {
    let t0 = Instant::now();
    let s = |n: u64| t0 + Duration::from_secs(n);
    let mut ts = Triggers::new(vec![trigger("pending_vertices > 0", 10, 30)]);
    let busy = values(&[("pending_vertices", 8.0)], &[]);
    let idle = values(&[("pending_vertices", 0.0)], &[]);
    assert!(ts.on(s(0), &busy).is_empty());
    assert!(ts.on(s(9), &busy).is_empty());
    // Broken before its time: starts over.
    assert!(ts.on(s(10), &idle).is_empty());
    assert!(ts.on(s(11), &busy).is_empty());
    assert!(ts.on(s(20), &busy).is_empty());
    assert_eq!(ts.on(s(21), &busy).len(), 1);
    // Held again for 10 s, but within its cool-down: not yet.
    assert!(ts.on(s(31), &busy).is_empty());
    assert!(ts.on(s(50), &busy).is_empty());
    assert_eq!(ts.on(s(51), &busy).len(), 1);
    // `for` 0: at once.
    let mut now = Triggers::new(vec![trigger("nodes >= 1", 0, 0)]);
    assert_eq!(now.on(s(0), &values(&[("nodes", 1.0)], &[])).len(), 1);
    assert_eq!(now.on(s(0), &values(&[("nodes", 1.0)], &[])).len(), 1);
}

#[test]
fn trigger_files_load_and_their_mistakes_name_the_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::write(
        d.join("base.toml"),
        "image = \"env:1\"\nmemory = \"64MiB\"\n",
    )
    .expect("template");
    let write = |name: &str, text: &str| {
        let p = d.join("triggers").join(name);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, text).expect("write");
        p
    };
    let grow = write(
        "grow.toml",
        "# Grow under a backlog.\nwhen = \"pending_vertices > 64\"\nfor = \"10s\"\n\
         cooldown = \"2m\"\n[action]\ncreate-guests = { template = \"../base.toml\", count = 2, slots = 4 }\n",
    );
    let t = load(&grow).expect("loads");
    assert_eq!(t.name, "grow");
    assert_eq!(
        (t.hold, t.cooldown),
        (Duration::from_secs(10), Duration::from_secs(120))
    );
    let Action::CreateGuests {
        template,
        count,
        slots,
    } = &t.action
    else {
        panic!("{t:?}");
    };
    assert_eq!(
        (template.shape.image.as_str(), template.shape.memory_mib),
        ("env:1", 64)
    );
    assert_eq!((*count, *slots), (2, 4));
    write(
        "notify.toml",
        "when = \"idle_guests > 2 for 1m\"\naction = { command = [\"/bin/true\", \"x\"] }\n",
    );
    let all = load_dir(&d.join("triggers")).expect("loads");
    assert_eq!(
        all.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        ["grow", "notify"]
    );
    assert_eq!(all[1].cooldown, DEFAULT_COOLDOWN);
    assert_eq!(
        all[1].hold,
        Duration::from_secs(60),
        "`for` in the condition"
    );
    for (text, line, says) in [
        (
            "when = \"nodes > 1\"\n\nfor = \"soon\"\naction = { drain = \"n1\" }\n",
            3,
            "for: 'soon' is not a duration",
        ),
        (
            "when = \"nodes > \"\naction = { drain = \"n1\" }\n",
            1,
            "when: column 9: expected a number",
        ),
        (
            "when = \"nodes > 1 for 2s\"\nfor = \"3s\"\naction = { drain = \"n1\" }\n",
            1,
            "keep one",
        ),
        (
            "when = \"nodes > 1\"\naction = { explode = 1 }\n",
            2,
            "unknown variant `explode`",
        ),
        (
            "when = \"nodes > 1\"\nsize = 3\naction = { drain = \"n1\" }\n",
            2,
            "unknown field `size`",
        ),
        (
            "when = \"nodes > 1\"\n[action]\ndestroy-idle-guests = { count = 0 }\n",
            2,
            "count must be 1 to 64",
        ),
        (
            "when = \"nodes > 1\"\n[action]\ncommand = []\n",
            2,
            "command names no program",
        ),
        (
            "when = \"nodes > 1\"\n[action]\ncreate-guests = { template = \"nope.toml\" }\n",
            2,
            "the guest template",
        ),
    ] {
        let p = write("bad.toml", text);
        let e = load(&p).expect_err(text);
        assert_eq!(
            (e.file.as_str(), e.line),
            (p.to_str().expect("utf-8"), line),
            "{e}"
        );
        assert!(e.message.contains(says), "{e}");
        assert!(
            e.to_string()
                .starts_with(&format!("{}:{line}: ", p.display())),
            "{e}"
        );
    }
}
