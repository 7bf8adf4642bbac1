//! `mvm-fuzz TARGET`: one fuzz target under afl-fuzz (built with `--features afl`).
//! `mvm-fuzz TARGET FILE...`: replays files through it, naming any that panics.
//! `mvm-fuzz --list`: the targets. `mvm-fuzz --seed DIR`: writes seeds into `DIR/TARGET/`.

use std::process::ExitCode;

fn usage() -> ExitCode {
    eprintln!("usage: mvm-fuzz TARGET [FILE...] | --list | --seed DIR");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(first) = args.first() else {
        return usage();
    };
    match first.as_str() {
        "--list" => {
            for t in mvm_fuzz::TARGETS {
                println!("{:<16} {}", t.name, t.about);
            }
            ExitCode::SUCCESS
        }
        "--seed" => {
            let Some(dir) = args.get(1) else {
                return usage();
            };
            let dir = std::path::Path::new(dir);
            let mut counts = std::collections::BTreeMap::new();
            for (target, bytes) in mvm_fuzz::seeds() {
                let n = counts.entry(target).or_insert(0u32);
                *n += 1;
                let d = dir.join(target);
                let written = std::fs::create_dir_all(&d)
                    .and_then(|()| std::fs::write(d.join(format!("seed-{n:03}")), &bytes));
                if let Err(e) = written {
                    eprintln!("mvm-fuzz: {}: {e}", d.display());
                    return ExitCode::FAILURE;
                }
            }
            for (t, n) in counts {
                println!("{t}: {n} seeds");
            }
            ExitCode::SUCCESS
        }
        name => {
            let Some(target) = mvm_fuzz::target(name) else {
                eprintln!("mvm-fuzz: no target '{name}' (mvm-fuzz --list)");
                return ExitCode::from(2);
            };
            run(target, &args[1..])
        }
    }
}

#[cfg(feature = "afl")]
fn run(target: &'static mvm_fuzz::Target, files: &[String]) -> ExitCode {
    if files.is_empty() {
        afl::fuzz!(|data: &[u8]| (target.run)(data));
        return ExitCode::SUCCESS;
    }
    replay(target, files)
}

#[cfg(not(feature = "afl"))]
fn run(target: &'static mvm_fuzz::Target, files: &[String]) -> ExitCode {
    if files.is_empty() {
        eprintln!("mvm-fuzz: built without the afl feature: give files to replay");
        return ExitCode::from(2);
    }
    replay(target, files)
}

fn replay(target: &'static mvm_fuzz::Target, files: &[String]) -> ExitCode {
    let mut failed = 0;
    for f in files {
        let data = match std::fs::read(f) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("mvm-fuzz: {f}: {e}");
                return ExitCode::from(2);
            }
        };
        if std::panic::catch_unwind(|| (target.run)(&data)).is_err() {
            eprintln!("mvm-fuzz: {f}: {} panicked", target.name);
            failed += 1;
        }
    }
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
