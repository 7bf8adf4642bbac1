//! Templates read, extended and checked, with the file and line of every error.

use std::path::{Path, PathBuf};

use super::*;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).expect("dir");
    }
    std::fs::write(&p, text).expect("write");
    p
}

#[test]
fn a_template_takes_what_it_does_not_say_from_the_one_it_extends() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        dir.path(),
        "base.toml",
        "image = \"sci:1.0\"\nvcpus = 2\nmemory = \"1GiB\"\ncpu_weight = 256\n[[network]]\nbridge = \"xenbr0\"\n",
    );
    let p = write(
        dir.path(),
        "compute.toml",
        "extends = \"base\"\nmemory = \"512MiB\"\nswap = \"64MiB\"\ncpu_cap = 150\nvm_mode = \"persistent\"\n",
    );
    let t = load(&p).expect("valid");
    assert_eq!(t.name, "compute");
    assert_eq!(t.shape.image, "sci:1.0");
    assert_eq!((t.shape.vcpus, t.shape.memory_mib), (2, 512));
    assert_eq!((t.shape.disk_mib, t.shape.swap_mib), (None, Some(64)));
    assert_eq!((t.shape.weight, t.shape.cap), (Some(256), Some(150)));
    assert_eq!(t.vm_mode, Some(VmMode::Persistent));
    assert_eq!(t.shape.network.len(), 1);
    assert_eq!(t.files, vec![p.clone(), dir.path().join("base.toml")]);
    // The key is the guest's, not the name's: the same guest written out whole has it; any
    // difference changes it.
    let whole = write(
        dir.path(),
        "whole.toml",
        "image = \"sci:1.0\"\nvcpus = 2\nmemory = \"512MiB\"\nswap = \"64MiB\"\ncpu_weight = 256\ncpu_cap = 150\n[[network]]\nbridge = \"xenbr0\"\n",
    );
    assert_eq!(load(&whole).expect("valid").key(), t.key());
    let other = write(
        dir.path(),
        "other.toml",
        "extends = \"compute.toml\"\nvcpus = 1\n",
    );
    let o = load(&other).expect("valid");
    assert_eq!(o.shape.memory_mib, 512);
    assert_ne!(o.key(), t.key());
    assert_eq!(o.files.len(), 3);
    // A parent in another directory, by path.
    write(
        dir.path(),
        "shared/net.toml",
        "image = \"sci:2.0\"\nmemory = \"64MiB\"\n",
    );
    let by_path = write(
        dir.path(),
        "lab/x.toml",
        "extends = \"../shared/net.toml\"\n",
    );
    assert_eq!(load(&by_path).expect("valid").shape.image, "sci:2.0");
}

#[test]
fn bad_templates_are_refused_naming_the_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let case = |name: &str, text: &str| load(&write(d, name, text)).expect_err(name);
    let e = case(
        "a.toml",
        "image = \"sci:1.0\"\nmemory = \"1GiB\"\nvcpus = 0\n",
    );
    assert_eq!((e.line, e.file.ends_with("a.toml")), (3, true), "{e}");
    assert!(e.message.contains("vcpus must be 1 to 512"), "{e}");
    let e = case("b.toml", "image = \"sci:1.0\"\nmemory = \"lots\"\n");
    assert_eq!(e.line, 2, "{e}");
    let e = case("c.toml", "image = \"Sci 1\"\nmemory = \"1GiB\"\n");
    assert_eq!(e.line, 1, "{e}");
    assert!(e.message.contains("not an image id"), "{e}");
    let e = case("d.toml", "memory = \"1GiB\"\n");
    assert!(e.message.contains("names an image"), "{e}");
    let e = case(
        "e.toml",
        "image = \"sci:1.0\"\nmemory = \"1GiB\"\ncolour = \"red\"\n",
    );
    assert_eq!(e.line, 3, "{e}");
    assert!(e.message.contains("colour"), "{e}");
    let e = case(
        "f.toml",
        "image = \"sci:1.0\"\nmemory = \"1GiB\"\n\n[[network]]\nbridge = \"no,such\"\n",
    );
    assert_eq!(e.line, 4, "{e}");
    let e = case(
        "g.toml",
        "image = \"sci:1.0\"\nmemory = \"1GiB\"\ncpu_weight = 70000\n",
    );
    assert_eq!(e.line, 3, "{e}");
    let e = case(
        "h.toml",
        "image = \"sci:1.0\"\nmemory = \"1GiB\"\ncpu_cap = 0\n",
    );
    assert_eq!(e.line, 3, "{e}");
    // A missing parent is the child's `extends` line.
    let e = case("i.toml", "# a comment\nextends = \"nowhere\"\n");
    assert_eq!((e.line, e.file.ends_with("i.toml")), (2, true), "{e}");
    assert!(e.message.contains("nowhere.toml"), "{e}");
    // A value that is wrong in the parent is the parent's line.
    write(d, "p.toml", "image = \"sci:1.0\"\n\nmemory = \"8MiB\"\n");
    let e = case("j.toml", "extends = \"p\"\nvcpus = 2\n");
    assert_eq!((e.line, e.file.ends_with("p.toml")), (3, true), "{e}");
    // Loops, of one and of three.
    let e = case("self.toml", "extends = \"self\"\n");
    assert!(e.message.contains("loop"), "{e}");
    write(d, "l1.toml", "extends = \"l2\"\n");
    write(d, "l2.toml", "image = \"sci:1.0\"\nextends = \"l3\"\n");
    write(d, "l3.toml", "memory = \"1GiB\"\n\nextends = \"l1\"\n");
    let e = load(&d.join("l1.toml")).expect_err("a loop");
    assert_eq!((e.line, e.file.ends_with("l3.toml")), (3, true), "{e}");
    assert!(e.message.contains("l1 -> l2 -> l3 -> l1"), "{e}");
    let e = case("Bad Name.toml", "image = \"sci:1.0\"\nmemory = \"1GiB\"\n");
    assert!(e.message.contains("template name"), "{e}");
    let e = case("k.toml", "extends = \"UP\"\n");
    assert!(e.message.contains("extends 'UP'"), "{e}");
}

#[test]
fn a_pool_file_names_templates_and_counts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write(
        d,
        "environments/small.toml",
        "image = \"sci:1.0\"\nmemory = \"64MiB\"\n",
    );
    write(
        d,
        "environments/big.toml",
        "extends = \"small\"\nmemory = \"256MiB\"\n",
    );
    let p = write(
        d,
        "pool.toml",
        "[[warm]]\ntemplate = \"environments/small.toml\"\nguests = 2\n\n[[warm]]\ntemplate = \"environments/big.toml\"\nguests = 1\n",
    );
    let pools = load_pool(&p).expect("valid");
    assert_eq!(pools.len(), 2);
    assert_eq!(
        (pools[0].template.name.as_str(), pools[0].guests),
        ("small", 2)
    );
    assert_eq!(
        (pools[1].template.shape.memory_mib, pools[1].guests),
        (256, 1)
    );
    let e = load_pool(&write(
        d,
        "p2.toml",
        "[[warm]]\ntemplate = \"environments/small.toml\"\nguests = 0\n",
    ))
    .expect_err("zero");
    assert_eq!(e.line, 3, "{e}");
    let e = load_pool(&write(
        d,
        "p3.toml",
        "[[warm]]\ntemplate = \"environments/small.toml\"\nguests = 1\n[[warm]]\ntemplate = \"environments/small.toml\"\nguests = 1\n",
    ))
    .expect_err("twice");
    assert_eq!(e.line, 5, "{e}");
    assert!(e.message.contains("line 2"), "{e}");
    let e = load_pool(&write(
        d,
        "p4.toml",
        "[[warm]]\ntemplate = \"environments/none.toml\"\nguests = 1\n",
    ))
    .expect_err("missing");
    assert!(e.file.ends_with("none.toml"), "{e}");
}

#[test]
fn a_parent_that_is_no_plain_file_or_too_large_is_refused_on_the_extends_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A device that never ends: refused, not read forever.
    let p = write(
        dir.path(),
        "dev.toml",
        "vcpus = 1\nextends = \"/dev/zero\"\n",
    );
    let e = load(&p).expect_err("a device");
    assert_eq!(e.line, 2, "{e}");
    assert!(e.message.contains("not a plain file"), "{e}");
    let big = format!("vcpus = 1\n#{}\n", "x".repeat(1 << 20));
    write(dir.path(), "big.toml", &big);
    let p = write(dir.path(), "child.toml", "extends = \"big\"\n");
    let e = load(&p).expect_err("too large");
    assert!(e.message.contains("larger than 1024 KiB"), "{e}");
}
