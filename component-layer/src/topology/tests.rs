use std::collections::HashMap;

use super::generate::generate;
use super::*;

fn opts(reg: &Registry) -> Options<'_> {
    Options {
        codecs: reg,
        queue_defaults: Config::default(),
    }
}

fn parse(src: &str) -> Result<Topology, Vec<Diagnostic>> {
    let reg = Registry::new();
    Topology::parse(src, &opts(&reg))
}

fn errors(src: &str) -> Vec<Diagnostic> {
    parse(src).expect_err("should be refused")
}

#[test]
fn reads_vertices_channels_ports_and_queue_settings() {
    let t = parse(
        r#"digraph ring {
            /* defaults */ node [component="token"];
            "first one" [start="true"];
            b; c
            "first one":out -> b:in;
            b:out -> c:in [queue=priority, codec="zstd+cbor", capacity=64, capacity_bytes="1MiB", weight=5];
            c -> "first one"   // default ports
        }"#,
    )
    .expect("valid");
    assert_eq!(t.name.as_deref(), Some("ring"));
    assert_eq!(t.vertices.len(), 3);
    assert_eq!(t.vertices[0].name, "first one");
    assert_eq!(
        t.vertices[0].attributes.get("start").map(String::as_str),
        Some("true")
    );
    assert!(t.vertices.iter().all(|v| v.component == "token"));
    let c = &t.channels[1];
    assert_eq!((c.from.port.as_str(), c.to.port.as_str()), ("out", "in"));
    assert_eq!(c.queue.kind, Kind::Priority);
    assert_eq!(c.queue.codec, "zstd+cbor");
    assert_eq!((c.queue.capacity, c.queue.capacity_bytes), (64, 1 << 20));
    assert_eq!(c.attributes.get("weight").map(String::as_str), Some("5"));
    assert_eq!(c.line, 6);
    assert_eq!(
        (
            t.channels[2].from.port.as_str(),
            t.channels[2].to.port.as_str()
        ),
        ("out", "in")
    );
    assert_eq!(t.graph().edge_count(), 3);
}

#[test]
fn subgraphs_scope_defaults_and_expand_edges() {
    let t = parse(
        "digraph { node [component=w]; subgraph cluster_a { node [component=x]; a1; a2 } hub [component=h]; hub:out -> { a1 a2 } }",
    )
    .expect("valid");
    let comp = |n: &str| {
        t.vertices[t.vertex_index(n).expect("vertex")]
            .component
            .clone()
    };
    assert_eq!(comp("a1"), "x");
    assert_eq!(comp("hub"), "h");
    assert_eq!(
        t.outputs(t.vertex_index("hub").expect("hub"))["out"].len(),
        2,
        "broadcast port"
    );
}

#[test]
fn fan_in_shares_a_queue_when_settings_agree() {
    let t = parse("digraph { node [component=c]; a -> c:in; b -> c:in }").expect("valid");
    assert_eq!(t.inputs(t.vertex_index("c").expect("c"))["in"].len(), 2);
    let e = errors("digraph { node [component=c]; a -> c:in [capacity=3];\n b -> c:in }");
    assert!(e[0].message.contains("share one queue"), "{e:?}");
    assert_eq!(e[0].line, 2);
}

#[test]
fn every_refusal_names_its_line() {
    let cases: &[(&str, u32, &str)] = &[
        ("graph g {\n a -- b }", 1, "undirected"),
        ("digraph g {\n}", 1, "no vertices"),
        (
            "digraph {\n c;\n node [component=x];\n a -> b }",
            2,
            "vertex 'c' has no component",
        ),
        (
            "digraph { node [component=x];\n a -> b [queue=stack] }",
            2,
            "unknown queue kind 'stack'",
        ),
        (
            "digraph { node [component=x];\n\n a -> b [codec=\"zstd+cbr\"] }",
            3,
            "no format named 'cbr'",
        ),
        (
            "digraph { node [component=x];\n a -> b [capacity=0] }",
            2,
            "capacity must be",
        ),
        (
            "digraph { node [component=x];\n a -> b [capacity=\"-4\"] }",
            2,
            "capacity must be",
        ),
        (
            "digraph { node [component=x];\n a -> b [aging=2] }",
            2,
            "aging applies to priority queues only",
        ),
        (
            "digraph { node [component=x];\n a:p -> b;\n c -> a:p }",
            3,
            "port 'a:p' is used as an input here but as an output at line 2",
        ),
        ("digraph {\n a [component=x] \n b [ }", 3, "expected"),
        (
            "digraph { a:p [component=x] }",
            1,
            "port belongs on an edge",
        ),
    ];
    for (src, line, needle) in cases {
        let e = errors(src);
        assert!(
            e.iter()
                .any(|d| d.line == *line && d.message.contains(needle)),
            "{src:?}: wanted line {line} '{needle}', got {e:?}"
        );
    }
}

#[test]
fn all_problems_are_reported_together() {
    let e = errors("digraph {\n a;\n b;\n a -> b [queue=lifo] }");
    assert_eq!(e.len(), 3, "{e:?}");
    assert_eq!(e.iter().map(|d| d.line).collect::<Vec<_>>(), vec![2, 3, 4]);
}

#[test]
fn binary_garbage_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("junk.dot");
    std::fs::write(
        &p,
        [0x7f, b'E', b'L', b'F', 0xff, 0xfe, 0, 1, 2, b'\n', 0x80],
    )
    .expect("write");
    let reg = Registry::new();
    let e = Topology::load(&p, &opts(&reg)).expect_err("garbage");
    let text = e.to_string();
    assert!(text.starts_with(&format!("{}:1:", p.display())), "{text}");
    assert!(text.contains("not a text file"), "{text}");
    assert!(Topology::load(&dir.path().join("missing.dot"), &opts(&reg)).is_err());
}

proptest::proptest! {
    #[test]
    fn arbitrary_text_never_panics(src in ".{0,300}") {
        let _ = parse(&src);
    }

    #[test]
    fn dot_like_text_never_panics(src in "(digraph|graph|strict|node|edge|subgraph|[a-c]|\"[a-c ]*\"|->|--|[\\[\\]{};,:=]|<[a-c<>]*>|[0-9.-]+| |\n){0,60}") {
        let _ = parse(&src);
    }
}

#[test]
fn generated_shapes_are_valid_with_the_right_counts() {
    let count = |shape: &str, size: &str| {
        let t = parse(&generate(shape, size).expect("generates")).expect("valid");
        (t.vertices.len(), t.channels.len())
    };
    assert_eq!(count("ring", "8"), (8, 8));
    assert_eq!(count("pipeline", "4"), (4, 3));
    assert_eq!(count("star", "8"), (9, 16));
    assert_eq!(count("mesh", "4x4"), (16, 2 * (4 * 3 + 3 * 4)));
    assert_eq!(count("torus", "4x4"), (16, 2 * 2 * 16));
    assert_eq!(count("hypercube", "3"), (8, 24));
    assert_eq!(count("tree", "7"), (7, 6));
    assert_eq!(count("butterfly", "8"), (8 + 12 + 8, 2 * 12 + 8));
    assert!(generate("ring", "0").is_err());
    assert!(generate("butterfly", "12").is_err());
    assert!(generate("mesh", "3y4").is_err());
    assert!(generate("blob", "3").is_err());
}

/// A complex number, enough for a test DFT.
#[derive(Debug, Clone, Copy, PartialEq)]
struct C(f64, f64);

impl C {
    fn add(self, o: C) -> C {
        C(self.0 + o.0, self.1 + o.1)
    }
    fn sub(self, o: C) -> C {
        C(self.0 - o.0, self.1 - o.1)
    }
    fn mul(self, o: C) -> C {
        C(self.0 * o.0 - self.1 * o.1, self.0 * o.1 + self.1 * o.0)
    }
    fn cis(theta: f64) -> C {
        C(theta.cos(), theta.sin())
    }
}

/// Evaluates a butterfly topology as a dataflow graph: each vertex computes from its input
/// ports, by its component and attributes only, as the WebAssembly jobs will.
fn run_butterfly(t: &Topology, input: &[C]) -> Vec<C> {
    let n = input.len();
    let mut out: HashMap<(usize, String), C> = HashMap::new();
    let mut done = vec![false; t.vertices.len()];
    let mut result = vec![C(f64::NAN, f64::NAN); n];
    let attr = |v: &Vertex, k: &str| v.attributes[k].parse::<usize>().expect("number");
    while done.iter().any(|d| !d) {
        let mut progressed = false;
        for (i, v) in t.vertices.iter().enumerate() {
            if done[i] {
                continue;
            }
            let ins: Option<HashMap<&str, C>> = t
                .inputs(i)
                .iter()
                .map(|(port, chans)| {
                    let c = chans[0];
                    out.get(&(c.from.vertex, c.from.port.clone()))
                        .map(|x| (*port, *x))
                })
                .collect();
            let Some(ins) = ins else { continue };
            match v.component.as_str() {
                "source" => {
                    out.insert((i, "out".into()), input[attr(v, "index")]);
                }
                "butterfly" => {
                    let w = C::cis(
                        -2.0 * std::f64::consts::PI * attr(v, "k") as f64 / attr(v, "n") as f64,
                    );
                    let wb = w.mul(ins["b"]);
                    out.insert((i, "x".into()), ins["a"].add(wb));
                    out.insert((i, "y".into()), ins["a"].sub(wb));
                }
                "sink" => result[attr(v, "index")] = ins["in"],
                other => panic!("unexpected component {other}"),
            }
            done[i] = true;
            progressed = true;
        }
        assert!(
            progressed,
            "the butterfly graph has a cycle or a missing input"
        );
    }
    result
}

fn dft(x: &[C]) -> Vec<C> {
    let n = x.len();
    (0..n)
        .map(|k| {
            x.iter().enumerate().fold(C(0.0, 0.0), |acc, (j, xj)| {
                acc.add(xj.mul(C::cis(
                    -2.0 * std::f64::consts::PI * (j * k) as f64 / n as f64,
                )))
            })
        })
        .collect()
}

#[test]
fn the_butterfly_topology_computes_the_dft() {
    for n in [2usize, 4, 8, 16, 64] {
        let t = parse(&generate("butterfly", &n.to_string()).expect("generates")).expect("valid");
        let x: Vec<C> = (0..n)
            .map(|i| C((i as f64 * 0.7).sin() + 0.5, (i as f64 * 1.3).cos()))
            .collect();
        let got = run_butterfly(&t, &x);
        for (a, b) in got.iter().zip(dft(&x)) {
            assert!(
                (a.0 - b.0).abs() < 1e-9 && (a.1 - b.1).abs() < 1e-9,
                "n={n}: {a:?} vs {b:?}"
            );
        }
    }
}

#[test]
fn a_200k_ring_checks() {
    let src = generate("ring", "200000").expect("generates");
    let t = parse(&src).expect("valid");
    assert_eq!(t.vertices.len(), 200_000);
}

#[test]
fn render_dot_shows_ports_and_reparses_as_dot() {
    let t = parse(&generate("pipeline", "3").expect("generates")).expect("valid");
    let r = t.to_render_dot();
    assert!(
        r.contains("taillabel=\"out\"") && r.contains("headlabel=\"in\""),
        "{r}"
    );
    // It is DOT our own lexer and parser accept (without components it is not a topology).
    assert!(super::parse::RawGraph::from_src(&r).is_ok());
}

#[test]
fn a_default_codec_nobody_knows_is_refused_on_every_channel_that_takes_it() {
    let reg = Registry::new();
    let options = Options {
        codecs: &reg,
        queue_defaults: Config {
            codec: "snappy".into(),
            ..Config::default()
        },
    };
    let src = "digraph {\n node [component=x];\n a -> b\n b -> c [codec=cbor]\n c -> a\n}\n";
    let e = Topology::parse(src, &options).expect_err("unknown default codec");
    let lines: Vec<u32> = e.iter().map(|d| d.line).collect();
    assert_eq!(lines, [3, 5], "{e:?}");
    assert!(
        e[0].message.contains("default queue settings") && e[0].message.contains("snappy"),
        "{e:?}"
    );
}
