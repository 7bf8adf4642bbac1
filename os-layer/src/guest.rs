//! A guest's domain as a typed spec, and its xl.cfg.
//!
//! The Xen driver writes the file this produces and passes it to `xl create`; nothing else in
//! MVM writes xl.cfg syntax. Every value is checked first, and strings are quoted, so a spec
//! cannot inject other xl.cfg keys.

use std::fmt::Write as _;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The virtualization mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Paravirtualized.
    Pv,
    /// PVH: paravirtualized on hardware virtualization.
    Pvh,
    /// Fully virtualized.
    Hvm,
}

/// A disk of the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    /// The file or device behind it.
    pub target: PathBuf,
    /// The guest's device name, e.g. `xvda`.
    pub vdev: String,
    /// `raw` or `qcow2`.
    #[serde(default = "raw")]
    pub format: String,
    /// Read-only.
    #[serde(default)]
    pub read_only: bool,
}

fn raw() -> String {
    "raw".into()
}

impl Nic {
    /// Checks the bridge's name, the MAC address and the script's name.
    ///
    /// # Errors
    /// What is wrong, in words.
    pub fn validate(&self) -> Result<(), String> {
        let name_ok = self.bridge.len() <= 15
            && plain(&self.bridge)
            && self
                .bridge
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !name_ok {
            return Err(format!(
                "bridge name '{}' is not a network interface name",
                self.bridge
            ));
        }
        if let Some(mac) = &self.mac {
            let parts: Vec<&str> = mac.split(':').collect();
            if parts.len() != 6
                || !parts
                    .iter()
                    .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
            {
                return Err(format!("'{mac}' is not a MAC address"));
            }
        }
        if let Some(script) = &self.script
            && !(plain(script)
                && script
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.-/".contains(c)))
        {
            return Err(format!("'{script}' is not a hotplug script's name or path"));
        }
        Ok(())
    }
}

/// A network interface of the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nic {
    /// The bridge it joins.
    pub bridge: String,
    /// Its MAC address (`xx:xx:xx:xx:xx:xx`); Xen picks one when absent.
    #[serde(default)]
    pub mac: Option<String>,
    /// The hotplug script that puts its backend on the bridge (a name in `/etc/xen/scripts`,
    /// or a path); xl's default (`vif-bridge`) when absent.
    #[serde(default)]
    pub script: Option<String>,
}

/// Everything needed to create a guest's domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestSpec {
    /// The domain name (the guest is tracked by it: the domid changes on restore).
    pub name: String,
    /// The virtualization mode.
    pub mode: Mode,
    /// The kernel (required for PV and PVH).
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// The initial ramdisk.
    #[serde(default)]
    pub ramdisk: Option<PathBuf>,
    /// The kernel command line.
    #[serde(default)]
    pub cmdline: Option<String>,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Disks.
    #[serde(default)]
    pub disks: Vec<Disk>,
    /// Network interfaces.
    #[serde(default)]
    pub nics: Vec<Nic>,
    /// Credit scheduler weight (proportional CPU share; Xen's default is 256).
    #[serde(default)]
    pub weight: Option<u32>,
    /// CPU cap in percent of one CPU (0: none).
    #[serde(default)]
    pub cap: Option<u32>,
}

/// A spec that cannot describe a guest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("guest '{guest}': {message}")]
pub struct SpecError {
    /// The guest's name as given.
    pub guest: String,
    /// What is wrong.
    pub message: String,
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn plain(s: &str) -> bool {
    !s.is_empty()
        && !s
            .chars()
            .any(|c| c.is_control() || c == ',' || c == '"' || c == '\\' || c == '=')
}

impl GuestSpec {
    /// Checks the spec.
    ///
    /// # Errors
    /// The first problem found.
    pub fn validate(&self) -> Result<(), SpecError> {
        self.validate_resources()?;
        self.validate_boot()
    }

    /// Checks what every driver uses: the name, vCPUs, memory and weight.
    ///
    /// # Errors
    /// The first problem found.
    pub fn validate_resources(&self) -> Result<(), SpecError> {
        let err = |m: String| {
            Err(SpecError {
                guest: self.name.clone(),
                message: m,
            })
        };
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
            && !self.name.starts_with(['-', '.']);
        if !name_ok {
            return err(
                "a domain name is 1 to 64 of [A-Za-z0-9_.-], not starting with '-' or '.'".into(),
            );
        }
        if !(1..=512).contains(&self.vcpus) {
            return err(format!("vcpus must be 1 to 512, not {}", self.vcpus));
        }
        if self.memory_mib < 16 {
            return err(format!(
                "memory must be at least 16 MiB, not {}",
                self.memory_mib
            ));
        }
        if self.weight.is_some_and(|w| !(1..=65535).contains(&w)) {
            return err("weight must be 1 to 65535".into());
        }
        Ok(())
    }

    fn validate_boot(&self) -> Result<(), SpecError> {
        let err = |m: String| {
            Err(SpecError {
                guest: self.name.clone(),
                message: m,
            })
        };
        if self.mode != Mode::Hvm && self.kernel.is_none() {
            return err("a PV or PVH guest needs a kernel".into());
        }
        for p in [&self.kernel, &self.ramdisk].into_iter().flatten() {
            if !p.is_absolute() || p.to_str().is_none_or(|s| !plain(s)) {
                return err(format!(
                    "{} must be an absolute path without commas, quotes or '='",
                    p.display()
                ));
            }
        }
        if let Some(c) = &self.cmdline
            && c.chars().any(char::is_control)
        {
            return err("the kernel command line must be one line".into());
        }
        for d in &self.disks {
            if !d.target.is_absolute() || d.target.to_str().is_none_or(|s| !plain(s)) {
                return err(format!(
                    "disk {} must be an absolute path without commas, quotes or '='",
                    d.target.display()
                ));
            }
            if !plain(&d.vdev) || !d.vdev.chars().all(|c| c.is_ascii_alphanumeric()) {
                return err(format!(
                    "disk device name '{}' must be alphanumeric (e.g. xvda)",
                    d.vdev
                ));
            }
            if !["raw", "qcow2"].contains(&d.format.as_str()) {
                return err(format!("disk format '{}' must be raw or qcow2", d.format));
            }
        }
        for n in &self.nics {
            n.validate().or_else(err)?;
        }
        Ok(())
    }

    /// The xl.cfg text of this guest.
    ///
    /// # Errors
    /// The spec is invalid.
    pub fn to_xl_cfg(&self) -> Result<String, SpecError> {
        self.validate()?;
        let mut s = String::new();
        let mode = match self.mode {
            Mode::Pv => "pv",
            Mode::Pvh => "pvh",
            Mode::Hvm => "hvm",
        };
        let _ = writeln!(s, "name = {}", quote(&self.name));
        let _ = writeln!(s, "type = \"{mode}\"");
        if let Some(k) = &self.kernel {
            let _ = writeln!(s, "kernel = {}", quote(&k.display().to_string()));
        }
        if let Some(r) = &self.ramdisk {
            let _ = writeln!(s, "ramdisk = {}", quote(&r.display().to_string()));
        }
        if let Some(c) = &self.cmdline {
            let _ = writeln!(s, "extra = {}", quote(c));
        }
        let _ = writeln!(s, "memory = {}", self.memory_mib);
        let _ = writeln!(s, "vcpus = {}", self.vcpus);
        if !self.disks.is_empty() {
            let disks: Vec<String> = self
                .disks
                .iter()
                .map(|d| {
                    let access = if d.read_only { "ro" } else { "rw" };
                    // A block device is served by blkback directly.
                    let backend = if d.target.starts_with("/dev") {
                        "backendtype=phy, "
                    } else {
                        ""
                    };
                    // `target=` must come last: everything after it is the path.
                    quote(&format!(
                        "format={}, vdev={}, access={access}, {backend}target={}",
                        d.format,
                        d.vdev,
                        d.target.display()
                    ))
                })
                .collect();
            let _ = writeln!(s, "disk = [ {} ]", disks.join(", "));
        }
        if !self.nics.is_empty() {
            let nics: Vec<String> = self
                .nics
                .iter()
                .map(|n| {
                    let mut v = format!("bridge={}", n.bridge);
                    if let Some(mac) = &n.mac {
                        let _ = write!(v, ",mac={mac}");
                    }
                    if let Some(script) = &n.script {
                        let _ = write!(v, ",script={script}");
                    }
                    quote(&v)
                })
                .collect();
            let _ = writeln!(s, "vif = [ {} ]", nics.join(", "));
        }
        if let Some(w) = self.weight {
            let _ = writeln!(s, "cpu_weight = {w}");
        }
        if let Some(c) = self.cap {
            let _ = writeln!(s, "cap = {c}");
        }
        s.push_str("on_poweroff = \"destroy\"\non_reboot = \"destroy\"\non_crash = \"destroy\"\n");
        Ok(s)
    }
}

#[cfg(test)]
impl GuestSpec {
    /// The test-bed's PV guest (1 vCPU, 128 MiB, kernel and ramdisk under `/guest`), named
    /// `name`: the one spec the tests start from.
    pub(crate) fn example(name: &str) -> GuestSpec {
        GuestSpec {
            name: name.into(),
            mode: Mode::Pv,
            kernel: Some("/guest/vmlinuz".into()),
            ramdisk: Some("/guest/domU-initrd.gz".into()),
            cmdline: Some("console=hvc0 quiet".into()),
            vcpus: 1,
            memory_mib: 128,
            disks: vec![],
            nics: vec![],
            weight: None,
            cap: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pv() -> GuestSpec {
        GuestSpec::example("domu1")
    }

    #[test]
    fn a_pv_guest_matches_the_testbed_config() {
        let cfg = pv().to_xl_cfg().expect("valid");
        assert_eq!(
            cfg,
            "name = \"domu1\"\ntype = \"pv\"\nkernel = \"/guest/vmlinuz\"\nramdisk = \"/guest/domU-initrd.gz\"\n\
             extra = \"console=hvc0 quiet\"\nmemory = 128\nvcpus = 1\n\
             on_poweroff = \"destroy\"\non_reboot = \"destroy\"\non_crash = \"destroy\"\n"
        );
    }

    #[test]
    fn disks_nics_weights_and_quoting() {
        let mut g = pv();
        g.mode = Mode::Pvh;
        g.cmdline = Some(r#"root=/dev/xvda say="hi" \o/"#.into());
        g.disks = vec![Disk {
            target: "/var/lib/mvm/g1.qcow2".into(),
            vdev: "xvda".into(),
            format: "qcow2".into(),
            read_only: false,
        }];
        g.nics = vec![Nic {
            bridge: "xenbr0".into(),
            mac: Some("00:16:3e:00:00:01".into()),
            script: Some("mvm-vif".into()),
        }];
        g.weight = Some(512);
        g.cap = Some(50);
        let cfg = g.to_xl_cfg().expect("valid");
        assert!(
            cfg.contains(r#"extra = "root=/dev/xvda say=\"hi\" \\o/""#),
            "{cfg}"
        );
        assert!(
            cfg.contains(
                r#"disk = [ "format=qcow2, vdev=xvda, access=rw, target=/var/lib/mvm/g1.qcow2" ]"#
            ),
            "{cfg}"
        );
        assert!(
            cfg.contains(r#"vif = [ "bridge=xenbr0,mac=00:16:3e:00:00:01,script=mvm-vif" ]"#),
            "{cfg}"
        );
        assert!(cfg.contains("cpu_weight = 512\ncap = 50\n"), "{cfg}");
    }

    #[test]
    fn bad_specs_are_refused_before_anything_is_written() {
        let cases: Vec<(GuestSpec, &str)> = vec![
            (
                GuestSpec {
                    name: "bad name".into(),
                    ..pv()
                },
                "domain name",
            ),
            (GuestSpec { vcpus: 0, ..pv() }, "vcpus"),
            (
                GuestSpec {
                    memory_mib: 8,
                    ..pv()
                },
                "at least 16",
            ),
            (
                GuestSpec {
                    kernel: None,
                    ..pv()
                },
                "needs a kernel",
            ),
            (
                GuestSpec {
                    kernel: Some("vmlinuz".into()),
                    ..pv()
                },
                "absolute path",
            ),
            (
                GuestSpec {
                    cmdline: Some("a\nkernel = \"/evil\"".into()),
                    ..pv()
                },
                "one line",
            ),
            (
                GuestSpec {
                    disks: vec![Disk {
                        target: "/x,target=/etc/shadow".into(),
                        vdev: "xvda".into(),
                        format: "raw".into(),
                        read_only: true,
                    }],
                    ..pv()
                },
                "without commas",
            ),
            (
                GuestSpec {
                    nics: vec![Nic {
                        bridge: "br0".into(),
                        mac: Some("zz".into()),
                        script: None,
                    }],
                    ..pv()
                },
                "MAC",
            ),
            (
                GuestSpec {
                    weight: Some(0),
                    ..pv()
                },
                "weight",
            ),
        ];
        for (g, needle) in cases {
            let e = g.to_xl_cfg().expect_err("invalid");
            assert!(e.to_string().contains(needle), "{e} (wanted {needle})");
        }
        let hvm = GuestSpec {
            mode: Mode::Hvm,
            kernel: None,
            ramdisk: None,
            ..pv()
        };
        assert!(hvm.to_xl_cfg().is_ok(), "HVM boots without a kernel");
    }
}
