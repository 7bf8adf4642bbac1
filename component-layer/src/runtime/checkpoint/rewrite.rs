//! Making a module checkpointable: its mutable globals exported (so that their values can be
//! read and restored), then Binaryen's Asyncify limited to the imports where a vertex may pause
//! (so that its call stack can be unwound into its memory and rewound from it).
//!
//! The job's author submits a plain module; the node rewrites it once, and the cache keeps the
//! compiled result by the source's hash ([`super::super::ModuleCache::load_checkpointable`]).

use std::path::PathBuf;
use std::process::Command;

use wasmparser::{ExternalKind, Parser, Payload, TypeRef};

/// The `mvm` imports at which a checkpointed vertex may pause: the blocking ones, and `yield`
/// for compute loops.
pub const PAUSE_POINTS: [&str; 3] = ["recv", "send", "yield"];

/// The prefix of the export names given to mutable globals (`__mvm_global_<index>`).
pub(crate) const GLOBAL_PREFIX: &str = "__mvm_global_";

/// The functions Asyncify adds, which a checkpointed vertex must export.
pub(crate) const ASYNCIFY: [&str; 5] = [
    "asyncify_start_unwind",
    "asyncify_stop_unwind",
    "asyncify_start_rewind",
    "asyncify_stop_rewind",
    "asyncify_get_state",
];

/// Why a module cannot be made checkpointable.
#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    /// Not a WebAssembly module (binary or text).
    #[error("not a valid WebAssembly module: {0}")]
    Invalid(String),
    /// The module exports no memory named `memory`: there is nothing to save its state in.
    #[error("it exports no memory named 'memory', so its state cannot be checkpointed")]
    NoMemory,
    /// The module exports neither `_start` nor `run`.
    #[error("it exports neither '_start' nor 'run'")]
    NoEntry,
    /// Binaryen's `wasm-opt` could not be run.
    #[error(
        "cannot run Binaryen's wasm-opt ({path}): {reason}; checkpoints need it (Debian package \
         binaryen, installed by scripts/setup; MVM_WASM_OPT names another)"
    )]
    NoWasmOpt {
        /// The program tried.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// `wasm-opt` refused the module.
    #[error("wasm-opt refused it: {0}")]
    WasmOpt(String),
    /// The rewritten module lacks what Asyncify should have added.
    #[error("the rewritten module does not export '{0}'")]
    Missing(&'static str),
}

/// The `wasm-opt` to run: `MVM_WASM_OPT`, else the one on `PATH`.
fn wasm_opt() -> PathBuf {
    std::env::var_os("MVM_WASM_OPT").map_or_else(|| PathBuf::from("wasm-opt"), PathBuf::from)
}

/// Rewrites `bytes` (a module, binary or text) into a checkpointable module.
///
/// # Errors
/// The module is invalid, has no memory or entry point to checkpoint, or `wasm-opt` is missing
/// or refuses it.
pub fn instrument(bytes: &[u8]) -> Result<Vec<u8>, RewriteError> {
    let wasm = wat::parse_bytes(bytes).map_err(|e| RewriteError::Invalid(e.to_string()))?;
    let exported = export_mutable_globals(&wasm)?;
    let out = asyncify(&exported)?;
    let names = export_names(&out)?;
    for f in ASYNCIFY {
        if !names.iter().any(|n| n == f) {
            return Err(RewriteError::Missing(f));
        }
    }
    Ok(out)
}

/// Checks, without rewriting it, that `bytes` (a module, binary or text) can be made
/// checkpointable: it is valid and exports its memory and an entry point.
///
/// # Errors
/// As [`instrument`], but for `wasm-opt`.
pub fn check(bytes: &[u8]) -> Result<(), RewriteError> {
    let wasm = wat::parse_bytes(bytes).map_err(|e| RewriteError::Invalid(e.to_string()))?;
    export_mutable_globals(&wasm).map(|_| ())
}

/// The names a module exports.
fn export_names(wasm: &[u8]) -> Result<Vec<String>, RewriteError> {
    let invalid = |e: wasmparser::BinaryReaderError| RewriteError::Invalid(e.to_string());
    let mut names = Vec::new();
    for payload in Parser::new(0).parse_all(wasm) {
        if let Payload::ExportSection(s) = payload.map_err(invalid)? {
            for e in s {
                names.push(e.map_err(invalid)?.name.to_owned());
            }
        }
    }
    Ok(names)
}

/// The module with every mutable global it defines also exported as `__mvm_global_<index>`;
/// checks that it exports `memory` and an entry point.
pub(crate) fn export_mutable_globals(wasm: &[u8]) -> Result<Vec<u8>, RewriteError> {
    let invalid = |e: wasmparser::BinaryReaderError| RewriteError::Invalid(e.to_string());
    // First pass: the imported globals (they come first in the index space), the mutable
    // defined ones, and the exports there are.
    let mut imported = 0u32;
    let mut mutable = Vec::new();
    let mut exports: Vec<(String, ExternalKind, u32)> = Vec::new();
    for payload in Parser::new(0).parse_all(wasm) {
        match payload.map_err(invalid)? {
            Payload::ImportSection(s) => {
                for import in s.into_imports() {
                    if matches!(import.map_err(invalid)?.ty, TypeRef::Global(_)) {
                        imported += 1;
                    }
                }
            }
            Payload::GlobalSection(s) => {
                for (i, g) in s.into_iter().enumerate() {
                    if g.map_err(invalid)?.ty.mutable {
                        let i = u32::try_from(i).map_err(|_| invalid_count())?;
                        mutable.push(imported + i);
                    }
                }
            }
            Payload::ExportSection(s) => {
                for e in s {
                    let e = e.map_err(invalid)?;
                    exports.push((e.name.to_owned(), e.kind, e.index));
                }
            }
            _ => {}
        }
    }
    let has =
        |name: &str, kind: ExternalKind| exports.iter().any(|(n, k, _)| n == name && *k == kind);
    if !has("memory", ExternalKind::Memory) {
        return Err(RewriteError::NoMemory);
    }
    if !has("_start", ExternalKind::Func) && !has("run", ExternalKind::Func) {
        return Err(RewriteError::NoEntry);
    }
    let mut section = wasm_encoder::ExportSection::new();
    for (name, kind, index) in &exports {
        let kind = match kind {
            ExternalKind::Func | ExternalKind::FuncExact => wasm_encoder::ExportKind::Func,
            ExternalKind::Table => wasm_encoder::ExportKind::Table,
            ExternalKind::Memory => wasm_encoder::ExportKind::Memory,
            ExternalKind::Global => wasm_encoder::ExportKind::Global,
            ExternalKind::Tag => wasm_encoder::ExportKind::Tag,
        };
        section.export(name, kind, *index);
    }
    for g in &mutable {
        section.export(
            &format!("{GLOBAL_PREFIX}{g}"),
            wasm_encoder::ExportKind::Global,
            *g,
        );
    }
    // Second pass: every section as it was, the export section replaced (it exists: the module
    // exports its memory).
    let mut module = wasm_encoder::Module::new();
    for payload in Parser::new(0).parse_all(wasm) {
        let payload = payload.map_err(invalid)?;
        if let Payload::ExportSection(_) = payload {
            module.section(&section);
        } else if let Some((id, range)) = payload.as_section() {
            let (Ok(start), Ok(end)) = (usize::try_from(range.start), usize::try_from(range.end))
            else {
                return Err(invalid_count());
            };
            let data = wasm.get(start..end).ok_or_else(invalid_count)?;
            module.section(&wasm_encoder::RawSection { id, data });
        }
    }
    Ok(module.finish())
}

fn invalid_count() -> RewriteError {
    RewriteError::Invalid("a section lies outside the module".to_owned())
}

/// Runs Asyncify over `wasm`, limited to the pause points, then Binaryen's `-O2` (Asyncify's
/// output is large until optimized). Indirect calls are instrumented too: a pause reached
/// through a function pointer is as safe as a direct one.
fn asyncify(wasm: &[u8]) -> Result<Vec<u8>, RewriteError> {
    let program = wasm_opt();
    let no_opt = |reason: String| RewriteError::NoWasmOpt {
        path: program.display().to_string(),
        reason,
    };
    let dir = tempfile::Builder::new()
        .prefix("mvm-asyncify-")
        .tempdir()
        .map_err(|e| no_opt(format!("cannot make a work directory: {e}")))?;
    let (input, output) = (dir.path().join("in.wasm"), dir.path().join("out.wasm"));
    std::fs::write(&input, wasm).map_err(|e| no_opt(format!("cannot write its input: {e}")))?;
    let imports = PAUSE_POINTS
        .iter()
        .map(|f| format!("mvm.{f}"))
        .collect::<Vec<_>>()
        .join(",");
    let run = Command::new(&program)
        .arg(&input)
        .args(["--all-features", "--asyncify"])
        .arg(format!("--pass-arg=asyncify-imports@{imports}"))
        .args(["-O2", "-o"])
        .arg(&output)
        .output()
        .map_err(|e| no_opt(e.to_string()))?;
    if !run.status.success() {
        let said = String::from_utf8_lossy(&run.stderr);
        let said = said.lines().take(5).collect::<Vec<_>>().join("; ");
        return Err(RewriteError::WasmOpt(format!("{} ({said})", run.status)));
    }
    std::fs::read(&output).map_err(|e| no_opt(format!("cannot read its output: {e}")))
}
