//! `mvm bench xen`: a guest's create-to-running time through MVM's Xen driver beside plain
//! `xl create` of the same xl.cfg, alternating in one run.
//!
//! Create-to-running is from the start of the create until `xl list` shows the domain running
//! or blocked (alive). Through MVM that is [`Driver::create`], which writes the xl.cfg, runs
//! `xl create` and reads the domain back; plain is `xl create FILE` then `xl list NAME`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::driver::{Driver, DriverError};
use crate::guest::{GuestSpec, Mode};
use crate::xen::{XenConfig, XenDriver, parse_list, run};

/// What to boot and how often.
#[derive(Debug, Clone)]
pub struct Params {
    /// The guest kernel.
    pub kernel: PathBuf,
    /// Its ramdisk.
    pub ramdisk: Option<PathBuf>,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Creates of each kind.
    pub runs: u32,
    /// Where the driver and the plain run keep their files.
    pub state_dir: PathBuf,
}

/// The figures.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Creates of each kind.
    pub runs: u32,
    /// Every create-to-running time through MVM, in seconds, in order.
    pub mvm_secs: Vec<f64>,
    /// Every one through plain `xl create`.
    pub xl_secs: Vec<f64>,
    /// Median through MVM.
    pub mvm_median_secs: f64,
    /// Median through `xl`.
    pub xl_median_secs: f64,
    /// mvm / xl medians (goal: at most 1.05).
    pub ratio: f64,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Runs the benchmark against this dom0's `xl`.
///
/// # Errors
/// A create failed or the guest never came alive.
pub fn xen(p: &Params) -> Result<Report, DriverError> {
    let driver = XenDriver::new(XenConfig::new(p.state_dir.join("driver")))?;
    let plain_dir = p.state_dir.join("plain");
    std::fs::create_dir_all(&plain_dir).map_err(DriverError::io(&plain_dir))?;
    let xl = PathBuf::from("xl");
    let spec = |name: &str| GuestSpec {
        name: name.into(),
        mode: Mode::Pv,
        kernel: Some(p.kernel.clone()),
        ramdisk: p.ramdisk.clone(),
        cmdline: Some("console=hvc0 quiet".into()),
        vcpus: 1,
        memory_mib: p.memory_mib,
        disks: vec![],
        nics: vec![],
        weight: None,
        cap: None,
    };
    let slow = Duration::from_secs(600);
    let (mut mvm, mut plain) = (Vec::new(), Vec::new());
    for i in 0..p.runs {
        // Alternate which goes first, so drift on a loaded host falls on both.
        for first_mvm in [i % 2 == 0, i % 2 != 0] {
            if first_mvm {
                let name = format!("bench-mvm-{i}");
                let t = Instant::now();
                let g = driver.create(&spec(&name))?;
                let took = t.elapsed().as_secs_f64();
                if !g.state.is_alive() {
                    return Err(DriverError::Parse {
                        command: format!("xl list {name}"),
                        message: format!("created guest is {}", g.state),
                    });
                }
                mvm.push(took);
                driver.destroy(&name)?;
            } else {
                let name = format!("bench-xl-{i}");
                let cfg = plain_dir.join(format!("{name}.cfg"));
                let text = spec(&name).to_xl_cfg()?;
                std::fs::write(&cfg, text).map_err(DriverError::io(&cfg))?;
                let t = Instant::now();
                run(&xl, &["create", &cfg.display().to_string()], slow)?;
                let listed = run(&xl, &["list", &name], slow)?;
                let took = t.elapsed().as_secs_f64();
                let alive = parse_list(&listed)
                    .ok()
                    .and_then(|g| g.into_iter().next())
                    .is_some_and(|g| g.state.is_alive());
                if !alive {
                    return Err(DriverError::Parse {
                        command: format!("xl list {name}"),
                        message: "the guest is not alive after xl create".into(),
                    });
                }
                plain.push(took);
                run(&xl, &["destroy", &name], slow)?;
            }
        }
    }
    let (m, x) = (median(&mvm), median(&plain));
    Ok(Report {
        runs: p.runs,
        mvm_secs: mvm,
        xl_secs: plain,
        mvm_median_secs: m,
        xl_median_secs: x,
        ratio: if x > 0.0 { m / x } else { 0.0 },
    })
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }
}
