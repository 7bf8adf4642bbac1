//! Loop devices: a guest's disk file seen as a block device, so Xen's block back-end can serve
//! it from any dom0, with no hotplug script that knows about files.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_SET_FD: libc::c_ulong = 0x4C00;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;

fn control() -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
}

/// Attaches `file` to a free loop device and returns the device's path.
///
/// # Errors
/// No loop support (the `loop` module is not loaded), or the file cannot be opened.
pub fn attach(file: &Path, read_only: bool) -> io::Result<PathBuf> {
    let backing = OpenOptions::new().read(true).write(!read_only).open(file)?;
    let ctl = control()?;
    // Another process may take the device between GET_FREE and SET_FD: try again then.
    for _ in 0..16 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number or -1.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let dev = PathBuf::from(format!("/dev/loop{n}"));
        let loopf = OpenOptions::new().read(true).write(!read_only).open(&dev)?;
        // SAFETY: LOOP_SET_FD takes the backing file's descriptor, which is open and outlives the
        // call; the kernel takes its own reference.
        let rc = unsafe {
            libc::ioctl(
                loopf.as_raw_fd(),
                LOOP_SET_FD as _,
                backing.as_raw_fd() as libc::c_ulong,
            )
        };
        if rc == 0 {
            return Ok(dev);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(e);
        }
    }
    Err(io::Error::other("no free loop device after 16 tries"))
}

/// Detaches loop device `dev`. The kernel defers it while the device is still open (by Xen's
/// block back-end, say) and completes it at the last close.
///
/// # Errors
/// The device cannot be opened or is not attached.
pub fn detach(dev: &Path) -> io::Result<()> {
    let f = File::open(dev)?;
    // SAFETY: LOOP_CLR_FD takes no argument.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), LOOP_CLR_FD as _, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The loop devices whose backing file is `file` (read from sysfs).
pub fn attached_to(file: &Path) -> Vec<PathBuf> {
    let Ok(file) = fs::canonicalize(file) else {
        return Vec::new();
    };
    let Ok(dir) = fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(b) = fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        if Path::new(b.trim_end()) == file {
            out.push(PathBuf::from("/dev").join(name));
        }
    }
    out
}

/// Detaches every loop device backed by `file`; returns how many there were.
pub fn detach_all(file: &Path) -> usize {
    let devs = attached_to(file);
    for d in &devs {
        if let Err(e) = detach(d) {
            tracing::warn!(device = %d.display(), file = %file.display(), "cannot detach: {e}");
        }
    }
    devs.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_attaches_shows_its_size_and_detaches() {
        if control().is_err() {
            // Loop devices need root and the loop module; the Xen suite runs this as root.
            eprintln!("skipped: no /dev/loop-control here");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("disk.raw");
        File::create(&f).unwrap().set_len(4 << 20).unwrap();
        let dev = attach(&f, false).unwrap();
        assert_eq!(attached_to(&f), vec![dev.clone()]);
        let name = dev.file_name().unwrap().to_str().unwrap().to_owned();
        let sectors: u64 = fs::read_to_string(format!("/sys/block/{name}/size"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(sectors * 512, 4 << 20);
        assert_eq!(detach_all(&f), 1);
        assert!(attached_to(&f).is_empty());
    }
}
