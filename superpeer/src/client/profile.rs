//! Job profiles read from disk, with their topology and modules, ready to send.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use mvm_component::profile::{Profile, parse_size};

use super::input;
use crate::proto::{
    CheckpointPolicy, Failure, FileSpec, Hash, InputFile, LimitSpec, Requirements, Submission,
    TemplateSpec, VmMode,
};

/// A job profile read from disk, ready to send: the submission, its modules' bytes, and
/// where its input files are.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The submission (without module bytes).
    pub submission: Submission,
    /// Hash → bytes of every module.
    pub modules: BTreeMap<Hash, Bytes>,
    /// Hash → where each input file read from disk is (sent before the submission).
    pub inputs: LocalFiles,
}

/// Input files by hash: where each is on disk, and its size.
pub type LocalFiles = BTreeMap<Hash, (PathBuf, u64)>;

/// The input files of a profile's `[files]`, read: each file (directories walked, symbolic
/// links refused) hashed, at its path in the sandbox; and where each is on disk.
fn read_files(
    path: &Path,
    file: &str,
    src: &str,
    profile: &Profile,
) -> Result<(Option<FileSpec>, LocalFiles), Failure> {
    use mvm_component::files::{MAX_FILES, check_path};
    use mvm_component::profile::InputSpec;
    let Some(f) = profile.files(file, src).map_err(|e| input(e.to_string()))? else {
        return Ok((None, BTreeMap::new()));
    };
    let bad = |m: String| input(format!("{file}: files.inputs: {m}"));
    let mut inputs = Vec::new();
    let mut local = BTreeMap::new();
    let mut add = |inputs: &mut Vec<InputFile>, at: String, on_disk: &Path| {
        check_path(&at).map_err(|e| bad(e.to_string()))?;
        let (hash, size) = crate::files::hash_file(on_disk)
            .map_err(|e| bad(format!("{}: {e}", on_disk.display())))?;
        local.insert(hash, (on_disk.to_owned(), size));
        inputs.push(InputFile {
            path: at,
            hash,
            size,
        });
        Ok::<_, Failure>(())
    };
    for entry in &f.inputs {
        match entry {
            InputSpec::Held {
                path: at,
                hash,
                size,
            } => inputs.push(InputFile {
                path: at.clone(),
                hash: hash.parse().map_err(|e| bad(format!("'{at}': {e}")))?,
                size: *size,
            }),
            InputSpec::Path(p) => {
                let name = p.trim_end_matches('/');
                let on_disk = Profile::resolve(path, Path::new(name));
                let meta = std::fs::symlink_metadata(&on_disk)
                    .map_err(|e| bad(format!("'{p}' ({}): {e}", on_disk.display())))?;
                if meta.is_file() {
                    add(&mut inputs, name.to_owned(), &on_disk)?;
                } else if meta.is_dir() {
                    let walk = walkdir::WalkDir::new(&on_disk)
                        .follow_links(false)
                        .sort_by_file_name()
                        .min_depth(1);
                    for e in walk {
                        let e = e.map_err(|e| bad(format!("'{p}': {e}")))?;
                        let kind = e.file_type();
                        if kind.is_dir() {
                            continue;
                        }
                        let rel = e.path().strip_prefix(&on_disk).ok().and_then(Path::to_str);
                        let Some(rel) = rel.filter(|_| kind.is_file()) else {
                            return Err(bad(format!(
                                "{}: only plain files are sent (not symbolic links, devices, \
                                 or names that are not UTF-8)",
                                e.path().display()
                            )));
                        };
                        add(&mut inputs, format!("{name}/{rel}"), e.path())?;
                    }
                } else {
                    return Err(bad(format!(
                        "'{p}' ({}) is not a plain file or directory (symbolic links are not \
                         followed)",
                        on_disk.display()
                    )));
                }
            }
        }
        if inputs.len() > MAX_FILES {
            return Err(bad(format!("more than {MAX_FILES} files")));
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(twice) = inputs.iter().find(|i| !seen.insert(i.path.as_str())) {
        return Err(bad(format!("'{}' is named twice", twice.path)));
    }
    let spec = FileSpec {
        inputs,
        outputs: f.outputs,
        output_bytes: f.max_output,
    };
    if spec.input_bytes() > f.max_input {
        return Err(bad(format!(
            "{} bytes, over files.max_input ({} bytes)",
            spec.input_bytes(),
            f.max_input
        )));
    }
    Ok((Some(spec), local))
}

/// Reads a profile, its topology and its modules; errors name the file (and line).
///
/// # Errors
/// A file that cannot be read or a profile that is not valid.
pub fn read_profile(path: &Path) -> Result<Prepared, Failure> {
    let file = path.display().to_string();
    let (profile, src) = Profile::load(path).map_err(|e| input(e.to_string()))?;
    let limits = profile
        .limits(&file, &src)
        .map_err(|e| input(e.to_string()))?;
    let checkpoint = profile
        .checkpoints(&file, &src)
        .map_err(|e| input(e.to_string()))?
        .map(|c| CheckpointPolicy {
            interval_ms: u64::try_from(c.interval.as_millis()).unwrap_or(u64::MAX),
            keep: c.keep.min(100),
        });
    // Checked whole here, before anything is sent: the queue defaults, and the topology with
    // them (every channel's codec and settings, each error with its file and line).
    let codecs = mvm_queue::codec::Registry::new();
    let queue_defaults = profile
        .queue_defaults(&file, &src, &codecs)
        .map_err(|e| input(e.to_string()))?;
    let topo_path = Profile::resolve(path, &profile.topology);
    let topology = std::fs::read_to_string(&topo_path)
        .map_err(|e| input(format!("{}: {e}", topo_path.display())))?;
    mvm_component::topology::Topology::parse_named(
        &topo_path.display().to_string(),
        &topology,
        &mvm_component::topology::Options {
            codecs: &codecs,
            queue_defaults,
        },
    )
    .map_err(|e| input(e.to_string()))?;
    let mut components = BTreeMap::new();
    let mut modules = BTreeMap::new();
    for (component, p) in &profile.components {
        let p = Profile::resolve(path, p);
        let bytes = std::fs::read(&p).map_err(|e| {
            input(format!(
                "{}: {e} (module of component '{component}')",
                p.display()
            ))
        })?;
        let hash = Hash::of(&bytes);
        components.insert(component.clone(), hash);
        modules.insert(hash, Bytes::from(bytes));
    }
    let r = &profile.requirements;
    let template = match &r.environment {
        Some(t) => Some(template(path, &file, &src, r, t)?),
        None => None,
    };
    let memory_bytes = match &r.memory {
        Some(m) => Some(parse_size(m).ok_or_else(|| {
            input(format!(
                "{file}: requirements.memory must be a size, not '{m}'"
            ))
        })?),
        None => None,
    };
    if (r.cpu_weight.is_some() || r.cpu_cap.is_some())
        && r.image.as_deref().is_none_or(|i| i == "host")
    {
        return Err(input(format!(
            "{file}: requirements.cpu_weight and cpu_cap set a guest's share: they need \
             requirements.image"
        )));
    }
    let bid = match &r.bid {
        None => None,
        Some(b) => {
            if r.image.as_deref().is_none_or(|i| i == "host") || r.cpu_weight.is_some() {
                return Err(input(format!(
                    "{file}: requirements.bid sets a guest's share by the market: it needs \
                     requirements.image, and no cpu_weight"
                )));
            }
            Some(
                crate::proto::parse_credits(b)
                    .map_err(|e| input(format!("{file}: requirements.bid: {e}")))?,
            )
        }
    };
    let market = match &profile.market {
        None => None,
        Some(m) => Some(market(&file, r, m)?),
    };
    if let Some(w) = r.cpu_weight
        && !(1..=65535).contains(&w)
    {
        return Err(input(format!(
            "{file}: requirements.cpu_weight must be 1 to 65535, not {w}"
        )));
    }
    if let Some(c) = r.cpu_cap
        && c > 6400
    {
        return Err(input(format!(
            "{file}: requirements.cpu_cap is a percent of one CPU (at most 6400), not {c}"
        )));
    }
    if let Some(rank) = &r.rank {
        crate::schedule::Rank::parse(rank).map_err(|e| input(format!("{file}: {e}")))?;
    }
    let (files, inputs) = read_files(path, &file, &src, &profile)?;
    let sweep = profile
        .sweep(&file, &src)
        .map_err(|e| input(e.to_string()))?;
    let ids = |key: &str, v: &[String]| {
        v.iter()
            .map(|s| {
                s.parse::<crate::proto::JobId>()
                    .map_err(|e| input(format!("{file}: {key}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let (after, after_ok) = (
        ids("after", &profile.after)?,
        ids("after_ok", &profile.after_ok)?,
    );
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let estimate_ms = profile
        .estimate(&file, &src)
        .map_err(|e| input(e.to_string()))?
        .map(ms);
    Ok(Prepared {
        submission: Submission {
            name: profile.name.clone(),
            owner: profile.owner.clone(),
            domain: profile.domain.clone(),
            topology_file: topo_path.display().to_string(),
            topology,
            components,
            modules: Vec::new(),
            parameters: profile.parameter_strings(),
            queue: profile.queue.clone(),
            limits: LimitSpec {
                memory_bytes: Some(limits.memory_bytes as u64),
                cpu_ms: limits.cpu.map(ms),
                wall_ms: limits.wall.map(ms),
                log_bytes: Some(limits.log_bytes as u64),
            },
            requirements: Requirements {
                image: r.image.clone(),
                vcpus: r.vcpus,
                memory_bytes,
                arch: r.arch.clone(),
                rank: r.rank.clone(),
                nodes: r.nodes,
                vm_mode: r.vm_mode.map(|m| match m {
                    mvm_component::profile::VmMode::Persistent => VmMode::Persistent,
                    mvm_component::profile::VmMode::SaveRestore => VmMode::SaveRestore,
                    mvm_component::profile::VmMode::StopStart => VmMode::StopStart,
                }),
                cpu_weight: r.cpu_weight,
                bid,
                market,
                cpu_cap: r.cpu_cap,
                template: None,
            }
            .with_template(template),
            on_behalf: None,
            owner_cert: None,
            hops: 0,
            wait: false,
            priority: profile.priority,
            retries: profile
                .retries
                .unwrap_or(mvm_component::profile::DEFAULT_RETRIES),
            checkpoint,
            files,
            sweep,
            after,
            after_ok,
            estimate_ms,
        },
        modules,
        inputs,
    })
}

/// A profile's `[market]`: a budget in credits (a number, or a string of one) over a
/// deadline, for a job in guests that does not set its own bid or weight.
fn market(
    file: &str,
    r: &mvm_component::profile::Requirements,
    m: &mvm_component::profile::MarketBudget,
) -> Result<crate::proto::MarketSpec, Failure> {
    if r.image.as_deref().is_none_or(|i| i == "host") || r.bid.is_some() || r.cpu_weight.is_some() {
        return Err(input(format!(
            "{file}: market lets the broker's agent bid for the job's guests: it needs \
             requirements.image, and no requirements.bid or cpu_weight"
        )));
    }
    let budget = match &m.budget {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        other => other.to_string(),
    };
    let budget = crate::proto::parse_credits(&budget)
        .map_err(|e| input(format!("{file}: market.budget: {e}")))?;
    let deadline = mvm_component::profile::parse_duration(&m.deadline)
        .filter(|d| *d >= Duration::from_secs(1) && *d <= Duration::from_secs(366 * 24 * 3600))
        .ok_or_else(|| {
            input(format!(
                "{file}: market.deadline must be a duration from 1s to a year (e.g. \"10m\"), \
                 not '{}'",
                m.deadline
            ))
        })?;
    Ok(crate::proto::MarketSpec {
        budget,
        deadline_ms: u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX),
    })
}

/// The guest template a profile names (`requirements.environment`), read relative to the
/// profile; the profile may then not give the fields the template gives.
fn template(
    path: &Path,
    file: &str,
    src: &str,
    r: &mvm_component::profile::Requirements,
    named: &str,
) -> Result<(mvm_os::template::Template, Option<VmMode>), Failure> {
    let given = [
        ("image", r.image.is_some()),
        ("vcpus", r.vcpus.is_some()),
        ("memory", r.memory.is_some()),
        ("cpu_weight", r.cpu_weight.is_some()),
        ("cpu_cap", r.cpu_cap.is_some()),
    ];
    if let Some((key, _)) = given.iter().find(|(_, g)| *g) {
        let line = src
            .lines()
            .position(|l| {
                l.trim_start()
                    .strip_prefix(key)
                    .is_some_and(|r| r.trim_start().starts_with('='))
            })
            .map_or(1, |i| i + 1);
        return Err(input(format!(
            "{file}:{line}: requirements.{key} is given by the guest template \
             (requirements.environment = \"{named}\"): write it there"
        )));
    }
    let t = mvm_os::template::load(&Profile::resolve(path, Path::new(named)))
        .map_err(|e| input(format!("{e} (the guest template of {file})")))?;
    let mode = t.vm_mode;
    Ok((t, mode))
}

impl Requirements {
    /// These requirements with the guest template's fields, when one is named: its image,
    /// vCPUs, memory, weight and cap, and its VM mode unless the profile gives one.
    fn with_template(
        mut self,
        template: Option<(mvm_os::template::Template, Option<VmMode>)>,
    ) -> Requirements {
        let Some((t, mode)) = template else {
            return self;
        };
        let s = &t.shape;
        self.image = Some(s.image.clone());
        self.vcpus = Some(s.vcpus);
        self.memory_bytes = Some(u64::from(s.memory_mib) << 20);
        self.cpu_weight = s.weight;
        self.cpu_cap = s.cap;
        self.vm_mode = self.vm_mode.or(mode);
        self.template = Some(TemplateSpec {
            name: t.name.clone(),
            shape: t.shape,
        });
        self
    }
}
