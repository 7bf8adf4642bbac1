//! `mvm top` in a real terminal (tmux): a lab's nodes, a running job with its items per second
//! and its queues, and `q` quits.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::lab::{Lab, status};
use crate::run::json;

/// A tmux session running a command, killed on drop.
struct Tmux(String);

impl Tmux {
    fn start(command: &str) -> Tmux {
        let name = format!("mvm-top-{}", std::process::id());
        let ok = Command::new("tmux")
            .args([
                "new-session",
                "-d",
                "-s",
                &name,
                "-x",
                "160",
                "-y",
                "48",
                command,
            ])
            .status()
            .expect("tmux runs (scripts/setup installs it)");
        assert!(ok.success(), "tmux new-session");
        Tmux(name)
    }

    fn screen(&self) -> String {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &self.0])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn alive(&self) -> bool {
        Command::new("tmux")
            .args(["has-session", "-t", &self.0])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// The screen once `pred` holds of it (within 30 s).
    fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.screen();
            if pred(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "no {what} on the screen:\n{s}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .output();
    }
}

/// The items per second `top` shows for `job` (its row: job, name, owner, state, vertices,
/// items/s, wall).
fn rate(screen: &str, job: &str) -> Option<f64> {
    let row = screen
        .lines()
        .find(|l| l.contains(job) && l.contains("running"))?;
    let cols: Vec<&str> = row
        .split(|c: char| c.is_whitespace() || c == '│')
        .filter(|c| !c.is_empty())
        .collect();
    let at = cols.iter().position(|c| *c == "running")?;
    cols.get(at + 2)?.parse().ok()
}

#[test]
fn top_shows_the_nodes_a_running_jobs_rate_and_queues_and_q_quits() {
    let lab = Lab::up(2);
    let p = lab.pipeline("busy", 50_000_000, 2, "");
    let v = json(&lab.mvm(&["submit", p.to_str().expect("utf-8"), "-o", "json"]));
    let job = v["job"].as_str().expect("job id").to_owned();
    let top = Tmux::start(&format!(
        "MVM_LAB_DIR={} {} top --interval 300ms",
        lab.dir.path().join("lab").display(),
        env!("CARGO_BIN_EXE_mvm")
    ));
    let s = top.wait_for("nodes and the running job", |s| {
        s.contains("node0") && s.contains("node1") && s.contains(&job) && s.contains("running")
    });
    assert!(s.contains("mvm top — group"), "{s}");
    assert!(s.contains("deepest queues"), "{s}");
    // Items move: the job's rate, from the nodes' heartbeats, is above zero.
    let s = top.wait_for("a rate for the job", |s| {
        rate(s, &job).is_some_and(|r| r > 0.0)
    });
    // Its queues are listed by node (the pipeline's stages' inputs).
    let queues = s
        .lines()
        .skip_while(|l| !l.contains("deepest queues"))
        .filter(|l| l.contains(&job))
        .count();
    assert!(queues >= 1, "{s}");
    assert_eq!(status(&lab, &job)["state"], "running");
    // `q` quits, and the terminal is given back (the session ends with the command).
    let ok = Command::new("tmux")
        .args(["send-keys", "-t", &top.0, "q"])
        .status()
        .expect("tmux send-keys");
    assert!(ok.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while top.alive() {
        assert!(Instant::now() < deadline, "mvm top did not quit on q");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = lab.mvm(&["cancel", &job]);
}
