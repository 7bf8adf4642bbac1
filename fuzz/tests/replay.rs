//! Every target's corpus and regressions (inputs of crashes found and fixed) replayed: each
//! must return without a panic. CI runs this on every test run.

use std::panic::catch_unwind;

#[test]
fn every_corpus_and_regression_replays_without_a_panic() {
    let root = mvm_fuzz::root();
    let mut failed = Vec::new();
    for t in mvm_fuzz::TARGETS {
        let mut inputs = Vec::new();
        for dir in ["corpus", "regressions"] {
            let d = root.join(dir).join(t.name);
            inputs.extend(mvm_fuzz::files(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())));
        }
        assert!(
            !inputs.is_empty(),
            "target {} has no corpus in {}",
            t.name,
            root.join("corpus").join(t.name).display()
        );
        for f in inputs {
            let data = std::fs::read(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            if catch_unwind(|| (t.run)(&data)).is_err() {
                failed.push(f.display().to_string());
            }
        }
    }
    assert!(failed.is_empty(), "inputs that panic: {failed:#?}");
}

#[test]
fn seeds_are_accepted_by_their_targets_without_a_panic() {
    let seeds = mvm_fuzz::seeds();
    for t in mvm_fuzz::TARGETS {
        assert!(
            seeds.iter().any(|(n, _)| *n == t.name),
            "no seed for target {}",
            t.name
        );
    }
    for (name, data) in seeds {
        let t = mvm_fuzz::target(name).unwrap_or_else(|| panic!("a seed for no target {name}"));
        (t.run)(&data);
    }
}
