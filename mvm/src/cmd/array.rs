//! `mvm submit` of a profile with a `[sweep]`: an array of jobs, followed until every one has
//! ended with `--wait`.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use mvm_superpeer::client::Prepared;
use mvm_superpeer::proto::JobState;

use crate::Output;
use crate::cmd::job::{BrokerArg, StatusOut, connect, runtime, tally, wire};
use crate::exit::Failure;

/// Submits an array; with `wait`, follows it to its end, prints each job's results in order
/// (and brings its output files back into `output_dir/JOB`), and fails if one did not end
/// well.
pub(crate) fn submit(
    job: &Prepared,
    broker: &BrokerArg,
    wait: bool,
    output_dir: Option<&Path>,
    output: Output,
) -> Result<(), Failure> {
    runtime()?.block_on(async {
        let client = connect(broker).await?;
        let s = client.submit(job).await.map_err(wire)?;
        if !wait {
            return crate::cmd::print(&StatusOut::from(&s), output, |_| {
                format!("{}  {}", s.job, s.waiting.clone().unwrap_or_default())
            });
        }
        let tty = output == Output::Text && std::io::stderr().is_terminal();
        let jobs = loop {
            let v = client.status(Some(&s.job)).await.map_err(wire)?;
            if !v.is_empty() && v.iter().all(|j| j.state.is_final()) {
                break v;
            }
            if tty {
                eprint!("\r{} {}", s.job, tally(&v));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        if tty {
            eprintln!("\r{:70}", "");
        }
        if let Some(dir) = output_dir {
            for j in &jobs {
                crate::cmd::files::fetch_into(&client, j, &dir.join(j.job.as_str())).await?;
            }
        }
        match output {
            Output::Json => {
                let out: Vec<StatusOut> = jobs.iter().map(StatusOut::from).collect();
                crate::cmd::print(&out, Output::Json, |_| String::new())?;
            }
            Output::Text => {
                for j in &jobs {
                    for (_, text) in StatusOut::from(j).outputs {
                        print!("{text}");
                    }
                }
                eprintln!("array {}: {}", s.job, tally(&jobs));
            }
        }
        let bad = jobs.iter().filter(|j| j.state != JobState::Done).count();
        if bad > 0 {
            return Err(Failure::failed(anyhow::anyhow!(
                "array {}: {bad} of {} jobs did not end well",
                s.job,
                jobs.len()
            )));
        }
        Ok(())
    })
}
