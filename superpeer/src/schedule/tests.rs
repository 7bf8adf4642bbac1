use super::*;

fn node(name: &str, slots: u32) -> Candidate {
    Candidate {
        name: name.into(),
        cpus: 2,
        memory_bytes: 8 << 30,
        free_memory_bytes: 4 << 30,
        load: 0.5,
        arch: "x86_64".into(),
        images: vec!["debian:12@sha256:00".into()],
        slots,
        free_slots: slots,
        floor: 0,
    }
}

fn ring(n: usize) -> Graph {
    Graph {
        vertices: n,
        edges: (0..n).map(|i| (i, (i + 1) % n, 1)).collect(),
    }
}

#[test]
fn filter_names_why_each_node_is_left_out() {
    let mut small = node("small", 8);
    small.cpus = 1;
    let mut arm = node("arm", 8);
    arm.arch = "aarch64".into();
    let mut full = node("full", 8);
    full.free_slots = 0;
    let nodes = [node("ok", 8), small, arm, full];
    let req = Requirements {
        vcpus: Some(2),
        arch: Some("x86_64".into()),
        image: Some("debian:12@sha256:00".into()),
        ..Requirements::default()
    };
    let (ok, why) = filter(&nodes, &req);
    assert_eq!(ok, vec![0]);
    assert_eq!(why.len(), 3);
    assert!(
        why[0].contains("small") && why[0].contains("1 CPUs"),
        "{why:?}"
    );
    assert!(why[1].contains("aarch64"), "{why:?}");
    assert!(why[2].contains("no free vertex slot"), "{why:?}");
    let (ok, why) = filter(
        &nodes[..1],
        &Requirements {
            image: Some("other:1".into()),
            ..Requirements::default()
        },
    );
    assert!(ok.is_empty());
    assert!(why[0].contains("image 'other:1'"), "{why:?}");
}

#[test]
fn rank_expressions_parse_evaluate_and_order() {
    let mut a = node("a", 4);
    a.load = 1.5;
    let mut b = node("b", 16);
    b.load = 0.1;
    let r = Rank::parse("free_slots * 2 - load").expect("parses");
    assert!((r.eval(&a) - 6.5).abs() < 1e-9);
    assert_eq!(r.order(&[a.clone(), b.clone()], vec![0, 1]), vec![1, 0]);
    let r = Rank::parse("-(cpus + 1) * (load < 1)").expect("parses");
    assert!((r.eval(&b) + 3.0).abs() < 1e-9);
    assert_eq!(r.eval(&a), 0.0);
    assert_eq!(Rank::parse("memory / 0").expect("parses").eval(&a), 0.0);
    let e = Rank::parse("cpus + bogus").expect_err("unknown");
    assert_eq!(
        e,
        ScheduleError::Rank {
            column: 8,
            problem: RankProblem::Property("bogus".into())
        }
    );
    let m = e.to_string();
    assert!(m.contains("column 8") && m.contains("bogus"), "{m}");
    let e = Rank::parse("(cpus").expect_err("unclosed");
    assert_eq!(
        e,
        ScheduleError::Rank {
            column: 6,
            problem: RankProblem::Unclosed
        }
    );
    assert!(e.to_string().contains("')'"), "{e}");
    let e = Rank::parse("cpus cpus").expect_err("trailing");
    assert_eq!(
        e,
        ScheduleError::Rank {
            column: 6,
            problem: RankProblem::Trailing
        }
    );
    let e = Rank::parse("").expect_err("empty");
    assert_eq!(
        e,
        ScheduleError::Rank {
            column: 1,
            problem: RankProblem::End
        }
    );
    let e = Rank::parse("1.2.3 + cpus").expect_err("bad number");
    assert_eq!(
        e,
        ScheduleError::Rank {
            column: 1,
            problem: RankProblem::Number("1.2.3".into())
        }
    );
    let e = Rank::parse("cpus * ?").expect_err("no operand");
    assert_eq!(
        e,
        ScheduleError::Rank {
            column: 8,
            problem: RankProblem::Operand
        }
    );
}

#[test]
fn a_ring_is_cut_into_arcs_of_even_size() {
    let g = ring(12);
    let p = place(&g, &[100, 100, 100], usize::MAX).expect("placed");
    let mut sizes = [0; 3];
    for &x in &p {
        sizes[x] += 1;
    }
    assert_eq!(sizes, [4, 4, 4]);
    // Three contiguous arcs cut exactly three edges: the minimum for three parts.
    assert_eq!(cut(&g, &p), 3);
}

#[test]
fn capacity_bounds_every_part_and_too_little_is_an_error() {
    let g = ring(10);
    let p = place(&g, &[2, 100], usize::MAX).expect("placed");
    assert_eq!(p.iter().filter(|&&x| x == 0).count(), 2);
    assert_eq!(cut(&g, &p), 2);
    let e = place(&g, &[3, 3], usize::MAX).expect_err("too small");
    assert_eq!(
        e,
        ScheduleError::TooFewSlots {
            vertices: 10,
            slots: 6,
            nodes: 2
        }
    );
    let m = e.to_string();
    assert!(
        m.contains("10 vertices") && m.contains("6 free slots"),
        "{m}"
    );
    // max_parts keeps the job on the best nodes.
    let p = place(&g, &[100, 100, 100], 1).expect("placed");
    assert!(p.iter().all(|&x| x == 0));
    let e = place(&g, &[5, 100], 1).expect_err("best node too small");
    assert_eq!(
        e,
        ScheduleError::TooFewSlotsOnBest {
            vertices: 10,
            slots: 5,
            nodes: 1
        }
    );
    assert!(e.to_string().contains("best nodes"), "{e}");
}

#[test]
fn heavy_edges_stay_on_one_node() {
    // Four pairs joined by heavy edges, chained by light ones: two nodes get two pairs each
    // and only light edges are cut.
    let mut g = Graph {
        vertices: 8,
        edges: Vec::new(),
    };
    for pair in [(0, 5), (1, 4), (2, 7), (3, 6)] {
        g.edges.push((pair.0, pair.1, 100));
    }
    for v in 0..7 {
        g.edges.push((v, v + 1, 1));
    }
    let p = place(&g, &[4, 4], usize::MAX).expect("placed");
    for (a, b, w) in &g.edges {
        if *w == 100 {
            assert_eq!(p[*a], p[*b], "heavy edge {a}-{b} cut: {p:?}");
        }
    }
    assert!(cut(&g, &p) < 100);
}

#[test]
fn an_fft_butterfly_over_three_nodes_uses_all_three() {
    // sources 0..8, three stages of 4 butterflies, sinks: the demo's shape.
    let src = mvm_component::topology::generate::generate("butterfly", "8").expect("gen");
    let reg = mvm_queue::codec::Registry::new();
    let t = mvm_component::topology::Topology::parse(
        &src,
        &mvm_component::topology::Options {
            codecs: &reg,
            queue_defaults: mvm_queue::queue::Config::default(),
        },
    )
    .expect("valid");
    let g = Graph {
        vertices: t.vertices.len(),
        edges: t
            .channels
            .iter()
            .map(|c| (c.from.vertex, c.to.vertex, 1))
            .collect(),
    };
    let p = place(&g, &[64, 64, 64], usize::MAX).expect("placed");
    for part in 0..3 {
        let n = p.iter().filter(|&&x| x == part).count();
        assert!((8..=11).contains(&n), "part {part} has {n}: {p:?}");
    }
    // Better than a round-robin deal of the vertices.
    let dealt: Vec<usize> = (0..g.vertices).map(|v| v % 3).collect();
    assert!(
        cut(&g, &p) < cut(&g, &dealt),
        "{} vs {}",
        cut(&g, &p),
        cut(&g, &dealt)
    );
}

#[test]
fn a_two_vertex_cycle_over_two_nodes_keeps_one_vertex_on_each() {
    let g = ring(2);
    let p = place(&g, &[100, 100], usize::MAX).expect("placed");
    assert_ne!(p[0], p[1], "{p:?}");
}

#[test]
fn each_scheduling_policy_orders_the_nodes_and_bounds_how_many_a_job_uses() {
    // a: 8 free of 8, idle; b: 3 free of 8, loaded; c: 5 free of 8, half loaded.
    let mut all = vec![node("a", 8), node("b", 8), node("c", 8)];
    all[1].free_slots = 3;
    all[1].load = 2.0;
    all[2].free_slots = 5;
    all[2].load = 0.5;
    all[0].load = 0.1;
    let rank = Rank::parse("-cpus").expect("parses"); // all equal: keeps the given order
    let arrange = |p: Policy, vertices: usize, max: usize| {
        let (order, k) = p.arrange(&rank, &all, vec![0, 1, 2], vertices, max);
        let names: Vec<&str> = order.iter().map(|&i| all[i].name.as_str()).collect();
        (names, k)
    };
    assert_eq!(
        arrange(Policy::Rank, 2, usize::MAX),
        (vec!["a", "b", "c"], usize::MAX)
    );
    assert_eq!(
        arrange(Policy::Spread, 2, usize::MAX),
        (vec!["a", "c", "b"], usize::MAX)
    );
    assert_eq!(arrange(Policy::LeastLoaded, 2, 2), (vec!["a", "c", "b"], 2));
    // Pack: the fullest node that holds the job, alone.
    assert_eq!(
        arrange(Policy::Pack, 2, usize::MAX),
        (vec!["b", "a", "c"], 1)
    );
    assert_eq!(
        arrange(Policy::Pack, 4, usize::MAX),
        (vec!["c", "a", "b"], 1)
    );
    // Too big for one node: the roomiest takes what it can, the best fit the rest.
    assert_eq!(
        arrange(Policy::Pack, 11, usize::MAX),
        (vec!["a", "b", "c"], 2)
    );
    // Too big for the nodes it may use: left to `place` to refuse, as under the others.
    let (_, k) = arrange(Policy::Pack, 11, 1);
    assert_eq!(k, 1);
    // And through `place`: two vertices joined by a channel go to one node under pack,
    // to two under spread.
    let g = Graph {
        vertices: 2,
        edges: vec![(0, 1, 1)],
    };
    let nodes_used = |p: Policy| {
        let (order, k) = p.arrange(&rank, &all, vec![0, 1, 2], 2, usize::MAX);
        let caps: Vec<u32> = order.iter().map(|&i| all[i].free_slots).collect();
        let mut used = place(&g, &caps, k).expect("fits");
        used.sort_unstable();
        used.dedup();
        used.into_iter()
            .map(|r| all[order[r]].name.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(nodes_used(Policy::Pack), ["b"]);
    assert_eq!(nodes_used(Policy::Spread), ["a", "c"]);
    assert_eq!(nodes_used(Policy::LeastLoaded), ["a", "c"]);
    // Names round-trip; an unknown one says which there are.
    for p in [
        Policy::Rank,
        Policy::Spread,
        Policy::Pack,
        Policy::LeastLoaded,
    ] {
        assert_eq!(p.name().parse::<Policy>(), Ok(p));
    }
    let e = "fastest".parse::<Policy>().expect_err("unknown");
    assert!(e.contains("fastest") && e.contains(POLICIES), "{e}");
}

#[test]
fn a_node_takes_no_bid_under_its_floor_price() {
    let mut n = node("n1", 4);
    n.floor = 500_000;
    let req = |bid: u64| Requirements {
        bid: Some(bid),
        ..Requirements::default()
    };
    let (ok, why) = filter(std::slice::from_ref(&n), &req(100_000));
    assert!(ok.is_empty());
    assert!(
        why[0].contains("at least 0.5") && why[0].contains("bids 0.1"),
        "{why:?}"
    );
    let (ok, _) = filter(std::slice::from_ref(&n), &req(500_000));
    assert_eq!(ok, vec![0]);
    let (ok, _) = filter(&[n], &Requirements::default());
    assert_eq!(ok, vec![0], "a job that does not bid is not kept off");
}
