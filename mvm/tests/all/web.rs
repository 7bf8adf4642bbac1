//! The super-peer's live web view in headless Chromium (Debian's `chromium`): a running FFT
//! job's page — its nodes, the job, its topology drawn with live channel figures — as its
//! owner sees it (a screenshot is kept in `target/web-fft.png`), and nothing of it for a user
//! of another domain, or for someone without a session.

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::groups::Groups;
use crate::netns::{wait_for, write_lab};
use crate::run::{build_jobs, json, root};

/// A free TCP port on loopback.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a port")
        .port()
}

/// `GET path` on `addr` with `token` as a bearer token (if any): the status line and body.
fn get(addr: &str, path: &str, token: Option<&str>) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .expect("send");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        head.lines().next().unwrap_or_default().to_owned(),
        body.to_owned(),
    )
}

/// Chromium, headless, on `url`: with `--dump-dom` the page as its script left it, or a
/// screenshot written to `png`.
fn chromium(url: &str, png: Option<&Path>) -> String {
    let profile = tempfile::tempdir().expect("a profile directory");
    let mut cmd = Command::new("chromium");
    cmd.args([
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--window-size=1100,1150",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()));
    match png {
        Some(p) => cmd.arg(format!("--screenshot={}", p.display())),
        None => cmd.arg("--dump-dom"),
    };
    let out = cmd
        .arg(url)
        .output()
        .expect("chromium runs (scripts/setup installs it)");
    assert!(out.status.success(), "chromium: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_running_fft_job_s_page_shows_its_topology_to_its_owner_and_nothing_to_another_domain() {
    build_jobs();
    let mut g = Groups::new();
    let d = g.dir.path().to_owned();
    // A user of another domain, whose CA the super-peer trusts (so that it can connect and
    // ask): the embedded default policy lets it read nothing of domain lab.
    let ca = |args: &[&str]| assert!(g.run(args).status.success(), "{args:?}");
    let other = d.join("otherca");
    let other_s = other.to_str().expect("utf-8");
    ca(&["ca", "init", "--domain", "other", "--dir", other_s]);
    let eve = d.join("eve");
    ca(&[
        "ca",
        "issue",
        "--ca",
        other_s,
        "--out",
        eve.to_str().expect("utf-8"),
        "--roles",
        "admin",
        "user",
        "eve",
    ]);
    let http = format!("127.0.0.1:{}", free_port());
    let other_crt = other.join("ca.crt");
    let sp = g.daemon(
        "sp",
        &[
            "superpeer",
            "--http",
            &http,
            "--trust",
            other_crt.to_str().expect("utf-8"),
        ],
    );
    for n in ["n1", "n2"] {
        g.daemon(n, &["node", "--bootstrap", &sp]);
    }
    write_lab(&d, &sp);
    wait_for(Duration::from_secs(20), || {
        let v = json(&g.run(&["lab", "status", "-o", "json"]));
        (v["nodes"].as_array()?.len() == 2).then_some(())
    });

    // An 8-point FFT streaming frames until cancelled, over both nodes.
    let profile = d.join("fft-live.toml");
    let text = std::fs::read_to_string(root().join("examples/fft8.toml"))
        .expect("the example")
        .replace("name = \"fft8\"", "name = \"fft-live\"")
        .replace("[parameters]\n", "[parameters]\nframes = 2000000000\n")
        .replace("wall = \"60s\"", "wall = \"600s\"")
        .replace("../", &format!("{}/", root().display()));
    std::fs::write(&profile, text).expect("profile");
    let v = json(&g.run(&["submit", profile.to_str().expect("utf-8"), "-o", "json"]));
    let job = v["job"].as_str().expect("a job id").to_owned();
    wait_for(Duration::from_secs(60), || {
        let s = json(&g.run(&["status", &job, "-o", "json"]))[0].clone();
        (s["state"] == "running" && s["parts"].as_array()?.len() == 2).then_some(())
    });

    // The owner's link; the view it opens (once, so that rates are known by the page's).
    let link = json(&g.run(&["web", "-o", "json"]));
    let url = link["url"].as_str().expect("a link").to_owned();
    let token = url.rsplit_once("token=").expect("a token").1.to_owned();
    let (status, body) = get(&http, &format!("/api/view?job={job}"), Some(&token));
    assert!(status.contains("200"), "{status}: {body}");
    let view: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(view["jobs"][0]["job"], job.as_str(), "{view}");
    let channels = view["topology"]["channels"].as_array().expect("channels");
    assert_eq!(channels.len(), 32, "the butterfly's channels: {view}");
    std::thread::sleep(Duration::from_millis(1200));

    let dom = chromium(&format!("{url}&job={job}"), None);
    for want in [
        "Topology of fft-live",
        job.as_str(),
        "n1",
        "n2",
        "running",
        "src0",
        "sink7",
        "<svg",
        "Deepest channels",
        "bf0_0:a",
    ] {
        assert!(
            dom.contains(want),
            "the owner's page has no {want:?}: {dom}"
        );
    }
    // Figures move: some channel carries items per second.
    let (_, body) = get(&http, &format!("/api/view?job={job}"), Some(&token));
    let view: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert!(
        view["topology"]["channels"]
            .as_array()
            .expect("channels")
            .iter()
            .any(|c| c["rate"].as_f64() > Some(0.0) && c["items"].as_u64() > Some(0)),
        "{view}"
    );
    let png = root().join("target/web-fft.png");
    chromium(&format!("{url}&job={job}"), Some(&png));
    let bytes = std::fs::read(&png).expect("a screenshot");
    assert!(
        bytes.starts_with(b"\x89PNG") && bytes.len() > 20_000,
        "{} bytes",
        bytes.len()
    );

    // A user of another domain gets a session, and sees the nodes but nothing of the job.
    let ca_crt = d.join("ca/ca.crt");
    let theirs = json(&g.run(&[
        "web",
        "--identity",
        eve.to_str().expect("utf-8"),
        "--trust",
        ca_crt.to_str().expect("utf-8"),
        "-o",
        "json",
    ]));
    let eve_url = theirs["url"].as_str().expect("a link").to_owned();
    let eve_dom = chromium(&format!("{eve_url}&job={job}"), None);
    assert!(eve_dom.contains("eve@other"), "{eve_dom}");
    for never in [job.as_str(), "fft-live", "src0"] {
        assert!(
            !eve_dom.contains(never),
            "another domain's user sees {never:?}: {eve_dom}"
        );
    }
    assert!(
        eve_dom.contains("<div id=\"topo\"></div>"),
        "nothing drawn: {eve_dom}"
    );
    assert!(
        !dom.contains("<div id=\"topo\"></div>"),
        "the owner's drawing: {dom}"
    );
    let eve_token = eve_url.rsplit_once("token=").expect("a token").1;
    let (_, body) = get(&http, &format!("/api/view?job={job}"), Some(eve_token));
    let view: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(view["jobs"], serde_json::json!([]), "{view}");
    assert!(view.get("topology").is_none(), "{view}");

    // Without a session, or with a made-up one: nothing.
    for (path, token) in [
        ("/api/view", None),
        ("/", None),
        ("/api/events", Some("0123456789abcdef")),
        ("/login?token=0123456789abcdef", None),
    ] {
        let (status, body) = get(&http, path, token);
        assert!(status.contains("401"), "{path}: {status}");
        assert!(!body.contains(&job), "{path}: {body}");
    }
    assert!(g.run(&["cancel", &job]).status.success());
}
