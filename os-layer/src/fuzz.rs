//! Entry points of the fuzz targets in `fuzz/` (`scripts/fuzz`): each takes arbitrary bytes and
//! drives one of this crate's parsers with them. Not an API: hidden, and changed at will. A
//! target returns normally on every input; a panic is a bug.

use std::path::PathBuf;
use std::sync::OnceLock;

/// A directory of this process's own for files the targets write.
fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("mvm-fuzz-os-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("the fuzz target's directory {}: {e}", dir.display()));
        // A parent for templates to extend.
        let base = "name = \"base\"\nvcpus = 1\nmemory = \"256MiB\"\n";
        let _ = std::fs::write(dir.join("base.toml"), base);
        dir
    })
}

/// Guest templates and pool files (TOML), and image ids: the first byte says which, the rest
/// is the text.
pub fn template(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    match first % 3 {
        0 | 1 => {
            let name = if first % 3 == 0 {
                "t.toml"
            } else {
                "pool.toml"
            };
            let path = scratch().join(name);
            if std::fs::write(&path, rest).is_err() {
                return;
            }
            if first % 3 == 0 {
                if let Ok(t) = crate::template::load(&path) {
                    std::hint::black_box(t.key());
                }
            } else {
                let _ = std::hint::black_box(crate::template::load_pool(&path));
            }
        }
        _ => {
            if let Ok(s) = std::str::from_utf8(rest)
                && let Ok(id) = s.parse::<crate::image::ImageId>()
            {
                // What parses prints as something that parses to the same id.
                let again: crate::image::ImageId = id
                    .to_string()
                    .parse()
                    .unwrap_or_else(|e| panic!("'{id}' does not parse again: {e}"));
                assert_eq!(again, id, "an image id changed when printed and parsed");
            }
        }
    }
}
