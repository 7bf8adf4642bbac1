//! `mvm bench --compare FILE`: each figure of a run beside the same figure of an earlier run
//! (its JSON, `-o json`, or a `scripts/bench-all` document that holds it under the bench's
//! name), with its change, and a mark where it moved the wrong way by more than 10 %.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::Output;
use crate::exit::Failure;

/// A change past this (either way) is marked.
const NOTABLE: f64 = 0.10;

/// Where a bench's figures are compared.
#[derive(Debug)]
pub(super) struct Compare {
    /// The bench's name (`pingpong`, `broker`, …): its key in a `bench-all` document.
    pub(super) bench: &'static str,
    /// The earlier run, if any.
    pub(super) file: Option<PathBuf>,
}

/// One figure beside its earlier value.
#[derive(Debug, Serialize)]
pub(crate) struct Row {
    /// Where it is in the report (`sizes[0].mvm_one_way_us`).
    pub(crate) figure: String,
    /// This run's value.
    pub(crate) now: f64,
    /// The earlier run's, if it had the figure.
    pub(crate) before: Option<f64>,
    /// now / before.
    pub(crate) ratio: Option<f64>,
    /// `worse` or `better` past 10 %, for figures whose good direction the name tells
    /// (times lower, rates higher); none otherwise.
    pub(crate) verdict: Option<&'static str>,
}

impl Compare {
    /// Prints `report` (as [`super::super::print`]) and, with an earlier run, each figure
    /// beside it: after the text, or as `{"report": …, "compare": [rows]}` in JSON.
    pub(super) fn print<T: Serialize>(
        &self,
        report: &T,
        output: Output,
        text: impl Fn(&T) -> String,
    ) -> Result<(), Failure> {
        let Some(file) = &self.file else {
            return super::super::print(report, output, text);
        };
        let now = serde_json::to_value(report).map_err(Failure::failed)?;
        let before = self.earlier(file)?;
        let rows = rows(&now, &before);
        match output {
            Output::Json => {
                let doc = serde_json::json!({ "report": now, "compare": rows });
                let s = serde_json::to_string_pretty(&doc).map_err(Failure::failed)?;
                println!("{s}");
            }
            Output::Text => {
                println!("{}", text(report));
                println!("{}", table(&rows, file));
            }
        }
        Ok(())
    }

    /// The earlier run's report of this bench, from `file`.
    fn earlier(&self, file: &Path) -> Result<Value, Failure> {
        let bad = |m: String| Failure::input(anyhow::anyhow!("--compare {}: {m}", file.display()));
        let text = std::fs::read_to_string(file).map_err(|e| bad(e.to_string()))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| {
            bad(format!(
                "not JSON at line {}, column {}: {e}",
                e.line(),
                e.column()
            ))
        })?;
        // A bench-all document holds each bench under its name.
        let v = match v.get(self.bench) {
            Some(inner) if inner.is_object() => inner.clone(),
            _ => v,
        };
        // A run saved with --compare holds its report under "report".
        let v = match v.get("report") {
            Some(inner) if inner.is_object() => inner.clone(),
            _ => v,
        };
        if !v.is_object() {
            return Err(bad(format!(
                "holds no report of `mvm bench {}` (a JSON object)",
                self.bench
            )));
        }
        Ok(v)
    }
}

/// Every number of `v`, with where it is, in order.
fn numbers(v: &Value, at: &str, out: &mut Vec<(String, f64)>) {
    match v {
        Value::Number(n) => {
            if let Some(x) = n.as_f64() {
                out.push((at.to_owned(), x));
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                numbers(item, &format!("{at}[{i}]"), out);
            }
        }
        Value::Object(fields) => {
            for (k, item) in fields {
                let path = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                numbers(item, &path, out);
            }
        }
        _ => {}
    }
}

/// Whether a larger value of the figure is better (`Some(true)`), worse, or not known by name.
fn higher_is_better(figure: &str) -> Option<bool> {
    let name = figure.rsplit('.').next().unwrap_or(figure);
    if name.contains("per_sec") || name.contains("efficiency") {
        Some(true)
    } else if ["_us", "_ms", "_s", "_seconds", "_per_vertex", "_per_hop"]
        .iter()
        .any(|s| name.ends_with(s))
    {
        Some(false)
    } else {
        None
    }
}

/// Each figure of `now` beside the same one of `before`.
pub(crate) fn rows(now: &Value, before: &Value) -> Vec<Row> {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    numbers(now, "", &mut a);
    numbers(before, "", &mut b);
    a.into_iter()
        .map(|(figure, now)| {
            let before = b.iter().find(|(f, _)| *f == figure).map(|(_, v)| *v);
            let ratio = before.filter(|b| *b != 0.0).map(|b| now / b);
            let verdict = match (ratio, higher_is_better(&figure)) {
                (Some(r), Some(up)) if (r - 1.0).abs() > NOTABLE => {
                    Some(if (r > 1.0) == up { "better" } else { "worse" })
                }
                _ => None,
            };
            Row {
                figure,
                now,
                before,
                ratio,
                verdict,
            }
        })
        .collect()
}

/// The rows as text.
fn table(rows: &[Row], file: &Path) -> String {
    let width = rows
        .iter()
        .map(|r| r.figure.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let num = |v: f64| {
        if v != 0.0 && (v.abs() >= 1e6 || v.abs() < 1e-3) {
            format!("{v:.3e}")
        } else {
            format!("{v:.3}")
        }
    };
    let mut s = format!(
        "beside {}\n  {:<width$}  {:>12}  {:>12}  {:>7}\n",
        file.display(),
        "figure",
        "now",
        "before",
        "now/bef"
    );
    for r in rows {
        s.push_str(&format!(
            "  {:<width$}  {:>12}  {:>12}  {:>7}{}\n",
            r.figure,
            num(r.now),
            r.before.map_or("-".to_owned(), num),
            r.ratio.map_or("-".to_owned(), |x| format!("{x:.2}")),
            r.verdict.map_or(String::new(), |v| format!("  {v}"))
        ));
    }
    s.trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_paired_by_place_and_judged_by_name() {
        let now = serde_json::json!({
            "cross_node_8b_us": 6.0,
            "trivial_jobs_per_sec": 9000.0,
            "sizes": [{"size": 8, "mvm_one_way_us": 0.40}],
            "ratio": 1.3,
            "mpich": "measured",
            "new_figure": 1.0
        });
        let before = serde_json::json!({
            "cross_node_8b_us": 5.0,
            "trivial_jobs_per_sec": 6000.0,
            "sizes": [{"size": 8, "mvm_one_way_us": 0.41}],
            "ratio": 2.0
        });
        let rows = rows(&now, &before);
        let get = |f: &str| rows.iter().find(|r| r.figure == f).expect(f);
        assert_eq!(get("cross_node_8b_us").verdict, Some("worse"));
        assert_eq!(get("trivial_jobs_per_sec").verdict, Some("better"));
        // Within 10 %: no mark.
        assert_eq!(get("sizes[0].mvm_one_way_us").verdict, None);
        assert!((get("sizes[0].mvm_one_way_us").ratio.expect("r") - 0.40 / 0.41).abs() < 1e-9);
        // A ratio's good direction is not told by its name.
        assert_eq!(get("ratio").verdict, None);
        assert_eq!(get("new_figure").before, None);
        assert!(
            rows.iter().all(|r| r.figure != "mpich"),
            "text is not a figure"
        );
        let t = table(&rows, Path::new("old.json"));
        assert!(t.contains("cross_node_8b_us") && t.contains("worse"), "{t}");
    }

    #[test]
    fn an_earlier_run_is_found_in_a_bench_all_document_or_alone_and_bad_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let all = dir.path().join("all.json");
        std::fs::write(&all, r#"{"ring": {"mvm_per_hop_us": 1.0}, "rev": "abc"}"#).expect("w");
        let c = Compare {
            bench: "ring",
            file: Some(all.clone()),
        };
        assert_eq!(c.earlier(&all).expect("found")["mvm_per_hop_us"], 1.0);
        let alone = dir.path().join("ring.json");
        std::fs::write(
            &alone,
            r#"{"report": {"mvm_per_hop_us": 2.0}, "compare": []}"#,
        )
        .expect("w");
        assert_eq!(c.earlier(&alone).expect("found")["mvm_per_hop_us"], 2.0);
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{\n  \"x\": ,\n}").expect("w");
        let e = c.earlier(&bad).expect_err("not JSON").error.to_string();
        assert!(e.contains("bad.json") && e.contains("line 2"), "{e}");
        let e = c
            .earlier(&dir.path().join("none.json"))
            .expect_err("missing")
            .error
            .to_string();
        assert!(e.contains("none.json"), "{e}");
        std::fs::write(&bad, "[1, 2]").expect("w");
        let e = c.earlier(&bad).expect_err("no report").error.to_string();
        assert!(e.contains("holds no report of `mvm bench ring`"), "{e}");
    }
}
