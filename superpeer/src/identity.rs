//! A daemon's libp2p key on disk.

use std::io::Write;
use std::path::Path;

pub use libp2p::identity::Keypair;

/// The key in `path`, or a new ed25519 key written there (mode 0600, never overwriting).
///
/// # Errors
/// The file cannot be read, is not a key, or cannot be written.
pub fn load_or_create(path: &Path) -> Result<Keypair, String> {
    match std::fs::read(path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes)
            .map_err(|e| format!("{}: not a libp2p key: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key
                .to_protobuf_encoding()
                .map_err(|e| format!("cannot encode a key: {e}"))?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            }
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            f.write_all(&bytes)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(key)
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_created_once_then_read_back_and_garbage_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("sub/key");
        let a = load_or_create(&p).expect("created");
        let b = load_or_create(&p).expect("read");
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&p, b"garbage").expect("write");
        let e = load_or_create(&p).expect_err("garbage");
        assert!(e.contains("not a libp2p key"), "{e}");
    }
}
