//! Guest templates: a guest described in a file (SmartDomains' declarative domains), one
//! template extending another, and pools of warm guests made from them.
//!
//! A template is `environments/NAME.toml`:
//!
//! ```toml
//! extends = "base"          # another template: NAME.toml beside this one, or a path
//! image = "sci:1.0"         # name:version, or name:version@sha256:HEX
//! vcpus = 2
//! memory = "512MiB"
//! disk = "2GiB"             # the guest's disk (the image's size when absent)
//! swap = "256MiB"
//! mode = "pvh"              # Xen's virtualization mode: pv (default), pvh, hvm
//! cmdline = "console=hvc0"  # replaces the image's kernel command line
//! cpu_weight = 512          # 1-65535 (256 when absent)
//! cpu_cap = 50              # percent of one CPU
//! vm_mode = "persistent"    # how jobs that name it use its guests, unless they say
//! [[network]]               # one per interface (Xen); replaces the parent's list
//! bridge = "xenbr0"
//! mac = "00:16:3e:00:00:01"
//! ```
//!
//! A field not written is the parent's. [`load`] reads a template and its parents and checks
//! every value; an error names the file and line. [`Template::key`] is a digest of what the
//! template resolves to: two guests of the same key are interchangeable, which is how a node's
//! warm guests ([`load_pool`]) are matched with the jobs that ask for a template.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::guest::{Mode, Nic};
use crate::provision::VmMode;

/// A template as written (every field optional: the parent's when absent).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Written {
    extends: Option<Spanned<String>>,
    image: Option<Spanned<String>>,
    vcpus: Option<Spanned<u32>>,
    memory: Option<Spanned<String>>,
    disk: Option<Spanned<String>>,
    swap: Option<Spanned<String>>,
    mode: Option<Mode>,
    cmdline: Option<Spanned<String>>,
    cpu_weight: Option<Spanned<u32>>,
    cpu_cap: Option<Spanned<u32>>,
    vm_mode: Option<VmMode>,
    network: Option<Spanned<Vec<Nic>>>,
}

/// The guest a template describes: two guests of one shape are interchangeable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shape {
    /// The image id as written (`name:version` or `name:version@sha256:HEX`).
    pub image: String,
    /// Virtual CPUs (1 when no template of the chain says).
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mib: u32,
    /// The disk's size, MiB (the image's when absent).
    pub disk_mib: Option<u64>,
    /// A swap area's size, MiB.
    pub swap_mib: Option<u64>,
    /// Xen's virtualization mode.
    pub mode: Mode,
    /// A kernel command line replacing the image's.
    pub cmdline: Option<String>,
    /// CPU weight.
    pub weight: Option<u32>,
    /// CPU cap, percent of one CPU.
    pub cap: Option<u32>,
    /// Network interfaces.
    pub network: Vec<Nic>,
}

impl Shape {
    /// A digest of the shape: 12 hex digits.
    pub fn key(&self) -> String {
        use sha2::Digest;
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        hex::encode(&sha2::Sha256::digest(&bytes)[..6])
    }

    /// Checks every value (a shape that came over the network).
    ///
    /// # Errors
    /// The first value out of range, in words.
    pub fn validate(&self) -> Result<(), String> {
        if !valid_image(&self.image) {
            return Err(format!("'{}' is not an image id", self.image));
        }
        if !(1..=512).contains(&self.vcpus) {
            return Err(format!("vcpus must be 1 to 512, not {}", self.vcpus));
        }
        let sizes = [
            ("memory", Some(u64::from(self.memory_mib)), 16),
            ("disk", self.disk_mib, 1),
            ("swap", self.swap_mib, 1),
        ];
        for (what, size, least) in sizes {
            if let Some(s) = size.filter(|s| !(least..=MAX_MIB).contains(s)) {
                return Err(format!("{what} must be {least} MiB to 4 TiB, not {s} MiB"));
            }
        }
        if self.weight.is_some_and(|w| !(1..=65535).contains(&w)) {
            return Err("cpu_weight must be 1 to 65535".into());
        }
        if self.cap.is_some_and(|c| !(1..=6400).contains(&c)) {
            return Err("cpu_cap must be 1 to 6400".into());
        }
        if self
            .cmdline
            .as_ref()
            .is_some_and(|c| c.chars().any(char::is_control))
        {
            return Err("cmdline must be one line".into());
        }
        if self.network.len() > 16 {
            return Err("at most 16 network interfaces".into());
        }
        self.network.iter().try_for_each(Nic::validate)
    }
}

/// A guest template with its parents' fields filled in, checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Template {
    /// Its name: the file's stem.
    pub name: String,
    /// The guest it describes.
    pub shape: Shape,
    /// How jobs naming it use its guests unless they say.
    pub vm_mode: Option<VmMode>,
    /// The files it was read from, itself first, then its parents.
    pub files: Vec<PathBuf>,
}

impl Template {
    /// Its shape's key: a node's warm guests of this key serve it.
    pub fn key(&self) -> String {
        self.shape.key()
    }
}

/// A template or pool file that cannot be used: the file, the line, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct TemplateError {
    /// The file.
    pub file: String,
    /// The line (1 when the problem is with the file as a whole).
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// The most templates in one chain of `extends`.
const MAX_DEPTH: usize = 16;

/// The largest size a template may give, MiB (4 TiB).
const MAX_MIB: u64 = 4 << 20;

/// The largest template or pool file read (a template is a few lines).
const MAX_FILE_BYTES: u64 = 1 << 20;

/// Reads a template or pool file: a plain file of at most [`MAX_FILE_BYTES`] of UTF-8 (not a
/// device or a pipe that an `extends` could name, which would never end).
fn read_text(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let f = std::fs::File::open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a plain file",
        ));
    }
    let mut src = String::new();
    f.take(MAX_FILE_BYTES + 1).read_to_string(&mut src)?;
    if src.len() as u64 > MAX_FILE_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("larger than {} KiB", MAX_FILE_BYTES >> 10),
        ));
    }
    Ok(src)
}

/// Reads the template at `path` and the ones it extends, and checks the result.
///
/// # Errors
/// A file cannot be read or parsed, a parent is missing, the chain loops or is longer than 16,
/// or a value is out of range; the error names the file and line.
pub fn load(path: &Path) -> Result<Template, TemplateError> {
    let mut chain: Vec<(PathBuf, String, Written)> = Vec::new();
    let mut next = Some((path.to_owned(), None::<(String, usize)>));
    while let Some((p, from)) = next.take() {
        let file = p.display().to_string();
        let src = read_text(&p).map_err(|e| match &from {
            // A parent that cannot be read is the child's `extends` line's error.
            Some((child, line)) => TemplateError {
                file: child.clone(),
                line: *line,
                message: format!("cannot read the template it extends, {file}: {e}"),
            },
            None => TemplateError {
                file: file.clone(),
                line: 1,
                message: format!("cannot read: {e}"),
            },
        })?;
        let w: Written = parse(&file, &src)?;
        if let Some(parent) = &w.extends {
            let line = line_of(&src, parent.span().start);
            let at = |message: String| TemplateError {
                file: file.clone(),
                line,
                message,
            };
            let name = parent.get_ref();
            let dir = p.parent().unwrap_or_else(|| Path::new("."));
            let parent_path = if name.contains('/') || name.ends_with(".toml") {
                dir.join(name)
            } else if valid_name(name) {
                dir.join(format!("{name}.toml"))
            } else {
                return Err(at(format!(
                    "extends '{name}': a template's name is 1 to 64 of [a-z0-9_-], or a path"
                )));
            };
            let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
                (Ok(a), Ok(b)) => a == b,
                _ => a == b,
            };
            let looped =
                same(&parent_path, &p) || chain.iter().any(|(q, ..)| same(q, &parent_path));
            if looped {
                let mut names: Vec<String> = chain.iter().map(|(q, ..)| stem(q)).collect();
                names.push(stem(&p));
                names.push(stem(&parent_path));
                return Err(at(format!(
                    "the templates extend each other in a loop: {}",
                    names.join(" -> ")
                )));
            }
            if chain.len() + 1 >= MAX_DEPTH {
                return Err(at(format!(
                    "more than {MAX_DEPTH} templates extend one another"
                )));
            }
            next = Some((parent_path, Some((file.clone(), line))));
        }
        chain.push((p, src, w));
    }
    resolve(path, &chain)
}

/// The template `chain` (child first) describes, checked.
fn resolve(path: &Path, chain: &[(PathBuf, String, Written)]) -> Result<Template, TemplateError> {
    // The value of a field: the first of the chain that writes it, with its file and line.
    fn find<'a, T>(
        chain: &'a [(PathBuf, String, Written)],
        field: impl Fn(&'a Written) -> Option<&'a Spanned<T>>,
    ) -> Option<(&'a T, String, usize)> {
        chain.iter().find_map(|(p, src, w)| {
            field(w).map(|s| {
                let line = line_of(src, s.span().start);
                (s.get_ref(), p.display().to_string(), line)
            })
        })
    }
    let bad = |file: String, line: usize, message: String| TemplateError {
        file,
        line,
        message,
    };
    let name = stem(path);
    if !valid_name(&name) {
        return Err(bad(
            path.display().to_string(),
            1,
            format!("'{name}' is not a template name (the file's stem: 1 to 64 of [a-z0-9_-])"),
        ));
    }
    let image = match find(chain, |w| w.image.as_ref()) {
        Some((i, file, line)) => {
            if !valid_image(i) {
                return Err(bad(
                    file,
                    line,
                    format!("'{i}' is not an image id (name:version or name:version@sha256:HEX)"),
                ));
            }
            i.clone()
        }
        None => {
            return Err(bad(
                path.display().to_string(),
                1,
                "no template of the chain names an image".into(),
            ));
        }
    };
    // A number in `range`, with what it is for when it is not.
    let ranged = |what: &str,
                  got: Option<(&u32, String, usize)>,
                  range: std::ops::RangeInclusive<u32>| match got {
        Some((&v, file, line)) if !range.contains(&v) => Err(bad(
            file,
            line,
            format!(
                "{what} must be {} to {}, not {v}",
                range.start(),
                range.end()
            ),
        )),
        other => Ok(other.map(|(v, ..)| *v)),
    };
    let vcpus = ranged("vcpus", find(chain, |w| w.vcpus.as_ref()), 1..=512)?.unwrap_or(1);
    // Sizes in whole MiB, from `least` to 4 TiB.
    let mib = |field: &str, got: Option<(&String, String, usize)>, least: u64| {
        let Some((s, file, line)) = got else {
            return Ok(None);
        };
        match parse_mib(s) {
            Some(m) if (least..=MAX_MIB).contains(&m) => Ok(Some(m)),
            _ => Err(bad(
                file,
                line,
                format!(
                    "{field} must be a size from {least} MiB to 4 TiB in whole MiB \
                     (e.g. \"512MiB\", \"2GiB\"), not '{s}'"
                ),
            )),
        }
    };
    let memory = mib("memory", find(chain, |w| w.memory.as_ref()), 16)?.ok_or_else(|| {
        bad(
            path.display().to_string(),
            1,
            "no template of the chain says the guest's memory".into(),
        )
    })?;
    let memory_mib = u32::try_from(memory).unwrap_or(u32::MAX);
    let disk_mib = mib("disk", find(chain, |w| w.disk.as_ref()), 1)?;
    let swap_mib = mib("swap", find(chain, |w| w.swap.as_ref()), 1)?;
    let weight = ranged(
        "cpu_weight",
        find(chain, |w| w.cpu_weight.as_ref()),
        1..=65535,
    )?;
    let cap = ranged(
        "cpu_cap (percent of one CPU)",
        find(chain, |w| w.cpu_cap.as_ref()),
        1..=6400,
    )?;
    let cmdline = match find(chain, |w| w.cmdline.as_ref()) {
        Some((c, file, line)) if c.chars().any(char::is_control) => {
            return Err(bad(file, line, "cmdline must be one line".into()));
        }
        other => other.map(|(c, ..)| c.clone()),
    };
    let network = match find(chain, |w| w.network.as_ref()) {
        Some((nics, file, line)) => {
            if nics.len() > 16 {
                return Err(bad(file, line, "at most 16 network interfaces".into()));
            }
            for n in nics {
                n.validate().map_err(|m| bad(file.clone(), line, m))?;
            }
            nics.clone()
        }
        None => Vec::new(),
    };
    let shape = Shape {
        image,
        vcpus,
        memory_mib,
        disk_mib,
        swap_mib,
        mode: chain.iter().find_map(|(.., w)| w.mode).unwrap_or(Mode::Pv),
        cmdline,
        weight,
        cap,
        network,
    };
    // Everything was checked above, with its line; this is the wire's check, kept in step.
    shape
        .validate()
        .map_err(|m| bad(path.display().to_string(), 1, m))?;
    Ok(Template {
        name,
        shape,
        vm_mode: chain.iter().find_map(|(.., w)| w.vm_mode),
        files: chain.iter().map(|(p, ..)| p.clone()).collect(),
    })
}

/// Warm guests a node keeps, from a pool file:
///
/// ```toml
/// [[warm]]
/// template = "environments/compute.toml"   # relative to the pool file
/// guests = 2                                # 1 to 64
/// ```
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolFile {
    warm: Vec<Spanned<Warm>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Warm {
    template: Spanned<String>,
    guests: Spanned<u32>,
}

/// How many warm guests of a template a node keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    /// The template.
    pub template: Template,
    /// How many guests of it are kept ready.
    pub guests: u32,
}

/// Reads a pool file and the templates it names.
///
/// # Errors
/// The file or a template cannot be read or is invalid, a count is not 1 to 64, or a template
/// is named twice; the error names the file and line.
pub fn load_pool(path: &Path) -> Result<Vec<Pool>, TemplateError> {
    let file = path.display().to_string();
    let src = read_text(path).map_err(|e| TemplateError {
        file: file.clone(),
        line: 1,
        message: format!("cannot read: {e}"),
    })?;
    let pf: PoolFile = parse(&file, &src)?;
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let mut out: Vec<Pool> = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for w in &pf.warm {
        let w = w.get_ref();
        let at = |s: std::ops::Range<usize>, message: String| TemplateError {
            file: file.clone(),
            line: line_of(&src, s.start),
            message,
        };
        let guests = *w.guests.get_ref();
        if !(1..=64).contains(&guests) {
            return Err(at(
                w.guests.span(),
                format!("guests must be 1 to 64, not {guests}"),
            ));
        }
        let template = load(&dir.join(w.template.get_ref()))?;
        let key = template.key();
        if let Some(line) = seen.get(&key) {
            return Err(at(
                w.template.span(),
                format!(
                    "template '{}' describes the same guest as the one on line {line}",
                    template.name
                ),
            ));
        }
        seen.insert(key, line_of(&src, w.template.span().start));
        out.push(Pool { template, guests });
    }
    Ok(out)
}

/// Parses `src`, the text of `file`; an error names the line.
fn parse<T: serde::de::DeserializeOwned>(file: &str, src: &str) -> Result<T, TemplateError> {
    toml::from_str(src).map_err(|e| TemplateError {
        file: file.to_owned(),
        line: e.span().map_or(1, |s| line_of(src, s.start)),
        message: e.message().to_owned(),
    })
}

/// The line of byte `offset` in `src`.
fn line_of(src: &str, offset: usize) -> usize {
    1 + src.as_bytes()[..offset.min(src.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
}

/// A file's stem, as a template's name.
fn stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// 1 to 64 of `[a-z0-9_-]`, not starting with `-`.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('-')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-".contains(c))
}

/// `name:version` or a full image id.
fn valid_image(s: &str) -> bool {
    if s.contains("@sha256:") {
        return s.parse::<crate::image::ImageId>().is_ok();
    }
    // A full id with a dummy digest checks the name and version the same way.
    format!("{s}@sha256:{}", "0".repeat(64))
        .parse::<crate::image::ImageId>()
        .is_ok()
}

/// `"512MiB"`, `"2GiB"`, `"1TiB"` or a plain number of MiB, in whole MiB.
fn parse_mib(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, per_mib) = [("TiB", 1u64 << 20), ("GiB", 1 << 10), ("MiB", 1)]
        .iter()
        .find_map(|(suf, m)| s.strip_suffix(suf).map(|n| (n, *m)))
        .unwrap_or((s, 1));
    num.trim().parse::<u64>().ok()?.checked_mul(per_mib)
}

#[cfg(test)]
mod tests;
