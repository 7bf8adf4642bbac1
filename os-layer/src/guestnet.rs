//! A node's network for its guests (Xen): a bridge in dom0 that carries the node's address
//! and nothing else (no physical interface, no route out), an address on it for each guest
//! that runs an MVM agent, and the hotplug script that puts a guest's interface on the bridge
//! (`scripts/xen/vif`, installed in dom0 as `/etc/xen/scripts/mvm-vif`).
//!
//! A guest learns its address from its kernel command line ([`GuestNet::boot_args`]); its
//! init configures its interface from there.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::guest::Nic;

/// The hotplug script's name in `/etc/xen/scripts`.
pub const VIF_SCRIPT: &str = "mvm-vif";

/// The network a node gives its guests.
pub struct GuestNet {
    bridge: String,
    gateway: Ipv4Addr,
    prefix: u8,
    /// Address → the guest that holds it.
    held: Mutex<BTreeMap<Ipv4Addr, String>>,
}

/// The guest network cannot be described or set up.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The configuration is not one.
    #[error("guest network: {0}")]
    Config(String),
    /// A command that sets the bridge up failed.
    #[error("guest network: `{command}`: {message}")]
    Command {
        /// The command.
        command: String,
        /// What it said.
        message: String,
    },
    /// Every address is held.
    #[error("guest network {0}: every address is held")]
    Full(String),
}

impl GuestNet {
    /// The network of bridge `bridge`, with the node's address and prefix `cidr`
    /// (`10.213.0.1/24`); guests get the other addresses of the subnet.
    ///
    /// # Errors
    /// The bridge's name or the address is not one, or the subnet has no room for a guest.
    pub fn new(bridge: &str, cidr: &str) -> Result<GuestNet, NetError> {
        let nic = Nic {
            bridge: bridge.to_owned(),
            mac: None,
            script: None,
        };
        nic.validate().map_err(NetError::Config)?;
        let bad = |m: &str| NetError::Config(format!("'{cidr}': {m}"));
        let (addr, prefix) = cidr
            .split_once('/')
            .ok_or_else(|| bad("an address and a prefix length, as 10.213.0.1/24"))?;
        let gateway: Ipv4Addr = addr.parse().map_err(|_| bad("not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (16..=30).contains(p))
            .ok_or_else(|| bad("the prefix length must be 16 to 30"))?;
        let net = GuestNet {
            bridge: bridge.to_owned(),
            gateway,
            prefix,
            held: Mutex::new(BTreeMap::new()),
        };
        if net.hosts().all(|a| a == gateway) {
            return Err(bad("the node's address is the subnet's only host"));
        }
        if !net.hosts().any(|a| a == gateway) {
            return Err(bad(
                "the node's address is the subnet's own or its broadcast",
            ));
        }
        Ok(net)
    }

    /// The bridge's name.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The node's address on the bridge.
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// The subnet's host addresses, in order.
    fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> {
        let mask = u32::MAX << (32 - u32::from(self.prefix));
        let base = u32::from(self.gateway) & mask;
        let last = base | !mask;
        (base + 1..last).map(Ipv4Addr::from)
    }

    /// Makes the bridge, gives it the node's address and brings it up, where that is not
    /// done yet (the `ip` command of iproute2 or busybox).
    ///
    /// # Errors
    /// A command failed.
    pub fn ensure(&self) -> Result<(), NetError> {
        let br = self.bridge.as_str();
        if !Path::new("/sys/class/net").join(br).exists() {
            // busybox's `ip` may not make bridges; its `brctl` does.
            if let Err(e) = ip(&["link", "add", "name", br, "type", "bridge"]) {
                run("brctl", &["addbr", br]).map_err(|_| e)?;
            }
        }
        let cidr = format!("{}/{}", self.gateway, self.prefix);
        let shown = ip(&["-4", "addr", "show", "dev", br])?;
        if !shown.contains(&format!("inet {cidr} ")) {
            match ip(&["addr", "add", &cidr, "dev", br]) {
                Err(NetError::Command { message, .. }) if message.contains("exists") => {}
                other => {
                    other?;
                }
            }
        }
        ip(&["link", "set", "dev", br, "up"])?;
        Ok(())
    }

    /// The address of guest `guest`: the one it holds, else the lowest free one (an address
    /// whose guest `alive` says is gone is free again).
    ///
    /// # Errors
    /// Every address is held by a live guest.
    pub fn assign(&self, guest: &str, alive: impl Fn(&str) -> bool) -> Result<Ipv4Addr, NetError> {
        let mut held = self.held();
        if let Some((a, _)) = held.iter().find(|(_, g)| g.as_str() == guest) {
            return Ok(*a);
        }
        held.retain(|_, g| alive(g));
        let free = self
            .hosts()
            .find(|a| *a != self.gateway && !held.contains_key(a))
            .ok_or_else(|| NetError::Full(format!("{}/{}", self.gateway, self.prefix)))?;
        held.insert(free, guest.to_owned());
        Ok(free)
    }

    /// Guest `guest` gives its address back (it was torn down).
    pub fn release(&self, guest: &str) {
        self.held().retain(|_, g| g != guest);
    }

    fn held(&self) -> MutexGuard<'_, BTreeMap<Ipv4Addr, String>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The interface of a guest with address `addr`: on the bridge through [`VIF_SCRIPT`],
    /// with a MAC address of Xen's range made from the address (so it is unique on the bridge).
    pub fn nic(&self, addr: Ipv4Addr) -> Nic {
        let o = addr.octets();
        Nic {
            bridge: self.bridge.clone(),
            mac: Some(format!("00:16:3e:{:02x}:{:02x}:{:02x}", o[1], o[2], o[3])),
            script: Some(VIF_SCRIPT.to_owned()),
        }
    }

    /// The kernel command line words that tell a guest its address: `mvm.ip=ADDR/PREFIX
    /// mvm.gw=GATEWAY`.
    pub fn boot_args(&self, addr: Ipv4Addr) -> String {
        format!("mvm.ip={addr}/{} mvm.gw={}", self.prefix, self.gateway)
    }
}

/// Runs `ip ARGS`; its standard output.
fn ip(args: &[&str]) -> Result<String, NetError> {
    run("ip", args)
}

/// Runs `program ARGS`; its standard output.
fn run(program: &str, args: &[&str]) -> Result<String, NetError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| NetError::Command {
            command: command.clone(),
            message: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(NetError::Command {
            command,
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_the_lowest_free_ones_and_come_back_from_gone_guests() {
        let net = GuestNet::new("mvmbr0", "10.213.0.1/29").expect("net");
        let alive = |_: &str| true;
        let a = net.assign("a", alive).expect("a");
        let b = net.assign("b", alive).expect("b");
        assert_eq!(a, Ipv4Addr::new(10, 213, 0, 2));
        assert_eq!(b, Ipv4Addr::new(10, 213, 0, 3));
        assert_eq!(
            net.assign("a", alive).expect("again"),
            a,
            "a guest keeps its address"
        );
        // .1 is the node's; .2 to .6 are the hosts of a /29.
        for g in ["c", "d", "e"] {
            net.assign(g, alive).expect(g);
        }
        assert!(matches!(net.assign("f", alive), Err(NetError::Full(_))));
        // A gone guest's address is free again.
        let f = net.assign("f", |g| g != "b").expect("f");
        assert_eq!(f, b);
        net.release("a");
        assert_eq!(net.assign("g", alive).expect("g"), a);
    }

    #[test]
    fn the_nic_and_boot_args_follow_the_address() {
        let net = GuestNet::new("mvmbr0", "10.213.0.1/24").expect("net");
        let a = net.assign("x", |_| true).expect("x");
        let nic = net.nic(a);
        assert_eq!(nic.mac.as_deref(), Some("00:16:3e:d5:00:02"));
        assert_eq!(nic.script.as_deref(), Some(VIF_SCRIPT));
        nic.validate().expect("a valid nic");
        assert_eq!(net.boot_args(a), "mvm.ip=10.213.0.2/24 mvm.gw=10.213.0.1");
    }

    /// Root makes a real bridge here (and removes it after).
    #[test]
    fn ensure_makes_the_bridge_up_with_the_nodes_address_and_can_be_run_again() {
        // SAFETY: reads this process's effective user id.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: making a bridge needs root");
            return;
        }
        struct Gone(String);
        impl Drop for Gone {
            fn drop(&mut self) {
                let _ = ip(&["link", "del", &self.0]);
            }
        }
        let br = format!("mvmt{}", std::process::id() % 100_000);
        let _gone = Gone(br.clone());
        let net = GuestNet::new(&br, "10.250.7.1/24").expect("net");
        net.ensure().expect("made");
        net.ensure().expect("made again: nothing to do");
        assert!(
            Path::new("/sys/class/net")
                .join(&br)
                .join("bridge")
                .exists()
        );
        let shown = ip(&["-4", "addr", "show", "dev", &br]).expect("shown");
        assert!(shown.contains("inet 10.250.7.1/24 "), "{shown}");
        let link = ip(&["link", "show", "dev", &br]).expect("link");
        assert!(link.contains(",UP") || link.contains("<UP"), "{link}");
    }

    #[test]
    fn bad_networks_are_refused_with_why() {
        for (bridge, cidr, why) in [
            ("mvmbr0", "10.213.0.1", "prefix"),
            ("mvmbr0", "10.213.0.300/24", "IPv4"),
            ("mvmbr0", "10.213.0.1/31", "16 to 30"),
            ("mvmbr0", "10.213.0.0/24", "broadcast"),
            ("a bridge", "10.213.0.1/24", "interface name"),
        ] {
            let e = GuestNet::new(bridge, cidr).err().expect(cidr).to_string();
            assert!(e.contains(why), "{cidr}: {e}");
        }
    }
}
