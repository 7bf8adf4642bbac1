//! Generators of common topologies, written as DOT in the same format users write.
//!
//! | shape | SIZE | vertices (component) | ports |
//! |---|---|---|---|
//! | ring | N ≥ 1 | `v0..` (`token`; `v0` has `start="true"`) | `out` → `in` |
//! | pipeline | N ≥ 2 | `p0` (`source`), `p1..` (`stage`), last (`sink`) | `out` → `in` |
//! | star | N ≥ 1 leaves | `hub` (`hub`), `leaf0..` (`leaf`) | hub `out` (broadcast) → leaf `in`; leaf `out` → hub `in` |
//! | mesh, torus | R×C or N (N×N) | `c_R_C` (`cell`, `row`, `col`) | `to_e`→`from_w`, `to_w`→`from_e`, `to_s`→`from_n`, `to_n`→`from_s` (torus wraps) |
//! | hypercube | D in 1..=20 | `h0..` (`node`, `id`) | `out{k}` → `in{k}` along dimension k |
//! | tree | N ≥ 1 | `t0..` (`reduce`, `value`), binary, heap order: `t{i}` is the parent of `t{2i+1}`, `t{2i+2}` | child `out` → parent `in` (fan-in) |
//! | butterfly | N = 2^m | `src{i}` (`source`, `index`), `bf{s}_{j}` (`butterfly`, `stage`, `k`, `n`), `sink{i}` (`sink`, `index`) | a radix-2 FFT: butterfly inputs `a`, `b`, outputs `x`, `y` |
//!
//! The butterfly is decimation in time: source `src{i}` feeds position `bitrev(i)`; stage `s`
//! pairs positions `top` and `top + 2^s`, computing `x = a + W·b`, `y = a − W·b` with
//! `W = exp(−2πi·k/n)`; sink `sink{i}` receives output `X[i]`.

use std::fmt::Write as _;

/// A shape that cannot be generated at that size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct GenError(String);

/// The shapes `generate` knows.
pub const SHAPES: [&str; 8] = [
    "ring",
    "pipeline",
    "star",
    "mesh",
    "torus",
    "hypercube",
    "tree",
    "butterfly",
];

/// Writes the topology `shape` of `size` as DOT.
///
/// # Errors
/// Unknown shape, or a size the shape does not allow.
pub fn generate(shape: &str, size: &str) -> Result<String, GenError> {
    let n = || {
        size.parse::<usize>().map_err(|_| {
            GenError(format!(
                "{shape}: SIZE must be a whole number, not '{size}'"
            ))
        })
    };
    match shape {
        "ring" => ring(n()?),
        "pipeline" => pipeline(n()?),
        "star" => star(n()?),
        "mesh" => grid(size, false),
        "torus" => grid(size, true),
        "hypercube" => hypercube(n()?),
        "tree" => tree(n()?),
        "butterfly" => butterfly(n()?),
        _ => Err(GenError(format!(
            "unknown shape '{shape}' (known: {})",
            SHAPES.join(", ")
        ))),
    }
}

const MAX_VERTICES: usize = 10_000_000;

fn check(ok: bool, msg: impl Into<String>) -> Result<(), GenError> {
    if ok {
        Ok(())
    } else {
        Err(GenError(msg.into()))
    }
}

fn ring(n: usize) -> Result<String, GenError> {
    check(
        (1..=MAX_VERTICES).contains(&n),
        "ring: SIZE must be from 1 to 10000000",
    )?;
    let mut s = String::with_capacity(n * 40);
    let _ = writeln!(
        s,
        "digraph ring_{n} {{\n  node [component=\"token\"];\n  v0 [start=\"true\"];"
    );
    for i in 0..n {
        let _ = writeln!(s, "  v{i}:out -> v{}:in;", (i + 1) % n);
    }
    s.push_str("}\n");
    Ok(s)
}

fn pipeline(n: usize) -> Result<String, GenError> {
    check(
        (2..=MAX_VERTICES).contains(&n),
        "pipeline: SIZE must be from 2 to 10000000",
    )?;
    let mut s = format!("digraph pipeline_{n} {{\n  p0 [component=\"source\"];\n");
    for i in 1..n - 1 {
        let _ = writeln!(s, "  p{i} [component=\"stage\", stage=\"{i}\"];");
    }
    let _ = writeln!(s, "  p{} [component=\"sink\"];", n - 1);
    for i in 0..n - 1 {
        let _ = writeln!(s, "  p{i}:out -> p{}:in;", i + 1);
    }
    s.push_str("}\n");
    Ok(s)
}

fn star(n: usize) -> Result<String, GenError> {
    check(
        (1..=MAX_VERTICES).contains(&n),
        "star: SIZE (leaves) must be from 1 to 10000000",
    )?;
    let mut s = format!(
        "digraph star_{n} {{\n  hub [component=\"hub\", leaves=\"{n}\"];\n  node [component=\"leaf\"];\n"
    );
    for i in 0..n {
        let _ = writeln!(s, "  hub:out -> leaf{i}:in;\n  leaf{i}:out -> hub:in;");
    }
    s.push_str("}\n");
    Ok(s)
}

fn grid(size: &str, wrap: bool) -> Result<String, GenError> {
    let shape = if wrap { "torus" } else { "mesh" };
    let (r, c) = match size.split_once(['x', 'X']) {
        Some((a, b)) => (a.parse::<usize>().ok(), b.parse::<usize>().ok()),
        None => {
            let n = size.parse::<usize>().ok();
            (n, n)
        }
    };
    let (Some(r), Some(c)) = (r, c) else {
        return Err(GenError(format!(
            "{shape}: SIZE must be ROWSxCOLS or N, not '{size}'"
        )));
    };
    check(
        r >= 1 && c >= 1 && r.saturating_mul(c) <= MAX_VERTICES,
        format!("{shape}: {r}x{c} is out of range"),
    )?;
    let mut s = format!("digraph {shape}_{r}x{c} {{\n  node [component=\"cell\"];\n");
    for i in 0..r {
        for j in 0..c {
            let _ = writeln!(s, "  c_{i}_{j} [row=\"{i}\", col=\"{j}\"];");
        }
    }
    let link = |s: &mut String, a: (usize, usize), b: (usize, usize), out: &str, inn: &str| {
        let _ = writeln!(s, "  c_{}_{}:{out} -> c_{}_{}:{inn};", a.0, a.1, b.0, b.1);
    };
    for i in 0..r {
        for j in 0..c {
            // East-west neighbours (with wrap on a torus, when there are more than two columns
            // or the wrap link is not the same pair again).
            if j + 1 < c || (wrap && c > 2) {
                let e = (i, (j + 1) % c);
                link(&mut s, (i, j), e, "to_e", "from_w");
                link(&mut s, e, (i, j), "to_w", "from_e");
            }
            if i + 1 < r || (wrap && r > 2) {
                let so = ((i + 1) % r, j);
                link(&mut s, (i, j), so, "to_s", "from_n");
                link(&mut s, so, (i, j), "to_n", "from_s");
            }
        }
    }
    s.push_str("}\n");
    Ok(s)
}

fn hypercube(d: usize) -> Result<String, GenError> {
    check(
        (1..=20).contains(&d),
        "hypercube: SIZE (dimension) must be from 1 to 20",
    )?;
    let n = 1usize << d;
    let mut s =
        format!("digraph hypercube_{d} {{\n  node [component=\"node\", dimensions=\"{d}\"];\n");
    for v in 0..n {
        let _ = writeln!(s, "  h{v} [id=\"{v}\"];");
    }
    for v in 0..n {
        for k in 0..d {
            let _ = writeln!(s, "  h{v}:out{k} -> h{}:in{k};", v ^ (1 << k));
        }
    }
    s.push_str("}\n");
    Ok(s)
}

fn tree(n: usize) -> Result<String, GenError> {
    check(
        (1..=MAX_VERTICES).contains(&n),
        "tree: SIZE must be from 1 to 10000000",
    )?;
    let mut s =
        format!("digraph tree_{n} {{\n  node [component=\"reduce\", value=\"1\"];\n  t0;\n");
    for i in 1..n {
        let _ = writeln!(s, "  t{i}:out -> t{}:in;", (i - 1) / 2);
    }
    s.push_str("}\n");
    Ok(s)
}

fn bitrev(i: usize, bits: u32) -> usize {
    if bits == 0 {
        0
    } else {
        i.reverse_bits() >> (usize::BITS - bits)
    }
}

fn butterfly(n: usize) -> Result<String, GenError> {
    check(
        n >= 2 && n.is_power_of_two() && n <= 1 << 16,
        "butterfly: SIZE must be a power of two from 2 to 65536",
    )?;
    let m = n.trailing_zeros();
    let mut s = format!("digraph fft{n}_butterfly {{\n  graph [points=\"{n}\"];\n");
    s.push_str("  node [component=\"source\"];\n");
    for i in 0..n {
        let _ = writeln!(s, "  src{i} [index=\"{i}\"];");
    }
    s.push_str("  node [component=\"butterfly\"];\n");
    // producer[p] = the (vertex, port) holding position p before the current stage.
    let mut producer: Vec<(String, &str)> = (0..n)
        .map(|p| (format!("src{}", bitrev(p, m)), "out"))
        .collect();
    let mut edges = String::new();
    for st in 0..m {
        let span = 1usize << st;
        let mut b = 0;
        let mut next = producer.clone();
        for group in (0..n).step_by(2 * span) {
            for j in 0..span {
                let (top, bot) = (group + j, group + j + span);
                let k = j * (n / (2 * span));
                let name = format!("bf{st}_{b}");
                let _ = writeln!(s, "  {name} [stage=\"{st}\", k=\"{k}\", n=\"{n}\"];");
                let _ = writeln!(
                    edges,
                    "  {}:{} -> {name}:a;",
                    producer[top].0, producer[top].1
                );
                let _ = writeln!(
                    edges,
                    "  {}:{} -> {name}:b;",
                    producer[bot].0, producer[bot].1
                );
                next[top] = (name.clone(), "x");
                next[bot] = (name, "y");
                b += 1;
            }
        }
        producer = next;
    }
    s.push_str("  node [component=\"sink\"];\n");
    for (i, (vertex, port)) in producer.iter().enumerate() {
        let _ = writeln!(s, "  sink{i} [index=\"{i}\"];");
        let _ = writeln!(edges, "  {vertex}:{port} -> sink{i}:in;");
    }
    s.push_str(&edges);
    s.push_str("}\n");
    Ok(s)
}
