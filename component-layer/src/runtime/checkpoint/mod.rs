//! Checkpoints of running vertices.
//!
//! wasmtime cannot save a call stack, but it can read and write an instance's memory and
//! exported globals. A checkpointable module is rewritten once ([`rewrite`]) with Binaryen's
//! Asyncify limited to the pause points (`mvm.recv`, `mvm.send`, `mvm.yield`): there a vertex
//! can unwind its stack into its own memory and later rewind it. Its state is then its memory,
//! its mutable globals and what the host holds for it ([`image`]); a fresh instance given that
//! state and rewound goes on where the old one paused. A part is paused and resumed as a whole
//! through its [`PartControl`] ([`pause`]).
//!
//! What a restored vertex does after its checkpoint is a re-execution: a vertex that used
//! `try_recv`, a clock or randomness may take another path than before. A job restored as a
//! whole from one checkpoint of all its parts is still a run the job could have had (the
//! checkpoint is a consistent cut: every part paused, every link drained), so its output is
//! the undisturbed output whenever the job's output does not depend on timing.

pub mod image;
pub mod pause;
pub mod rewrite;

use bytes::Bytes;
use wasmtime::{Instance, Store, Val};

pub use image::{
    Count, GlobalValue, ImageError, MemoryImage, PartImage, QueueImage, VertexCounts, VertexImage,
    VertexPhase,
};
pub use pause::{PartControl, PauseError, Paused};
pub use rewrite::{PAUSE_POINTS, RewriteError, check as check_checkpointable, instrument};

use super::abi::VertexState;
use pause::Asyncify;

/// Pages of memory set aside for a vertex's unwound call stack.
const DATA_PAGES: u64 = 1;

const PAGE: u64 = 64 << 10;

/// Whether `module` was made checkpointable.
pub(crate) fn is_instrumented(module: &wasmtime::Module) -> bool {
    let names: Vec<&str> = module.exports().map(|e| e.name()).collect();
    rewrite::ASYNCIFY.iter().all(|f| names.contains(f))
}

/// Finds a fresh instance's Asyncify functions and sets aside room in its memory for its
/// unwound stack (at the end, as memory it grew itself). A restored instance then gets its
/// saved memory over this.
pub(crate) fn attach(store: &mut Store<VertexState>, instance: &Instance) -> Result<(), String> {
    let funcs = Asyncify {
        start_unwind: typed(store, instance, "asyncify_start_unwind")?,
        stop_unwind: typed(store, instance, "asyncify_stop_unwind")?,
        start_rewind: typed(store, instance, "asyncify_start_rewind")?,
        stop_rewind: typed(store, instance, "asyncify_stop_rewind")?,
    };
    let memory = instance
        .get_memory(&mut *store, "memory")
        .ok_or("it exports no memory named 'memory'")?;
    let pages = memory
        .grow(&mut *store, DATA_PAGES)
        .map_err(|e| format!("cannot set aside memory for checkpoints: {e:#}"))?;
    let data = u32::try_from(pages * PAGE)
        .map_err(|_| "its memory is past 4 GiB, where checkpoints cannot keep their data")?;
    let end = u32::try_from((pages + DATA_PAGES) * PAGE)
        .map_err(|_| "its memory is past 4 GiB, where checkpoints cannot keep their data")?;
    write_bounds(store, instance, data, data + 8, end)?;
    if let Some(p) = store.data_mut().pausing.as_mut() {
        p.funcs = Some(funcs);
        p.data = data;
    }
    Ok(())
}

fn typed<P: wasmtime::WasmParams, R: wasmtime::WasmResults>(
    store: &mut Store<VertexState>,
    instance: &Instance,
    name: &str,
) -> Result<wasmtime::TypedFunc<P, R>, String> {
    instance
        .get_typed_func::<P, R>(&mut *store, name)
        .map_err(|e| format!("it was not made checkpointable ({name}: {e:#})"))
}

/// Writes Asyncify's data header: where its buffer starts and ends.
fn write_bounds(
    store: &mut Store<VertexState>,
    instance: &Instance,
    at: u32,
    start: u32,
    end: u32,
) -> Result<(), String> {
    let memory = instance
        .get_memory(&mut *store, "memory")
        .ok_or("it exports no memory named 'memory'")?;
    let mut header = [0u8; 8];
    header[..4].copy_from_slice(&start.to_le_bytes());
    header[4..].copy_from_slice(&end.to_le_bytes());
    memory
        .write(&mut *store, at as usize, &header)
        .map_err(|e| format!("cannot write the checkpoint data header: {e}"))
}

/// Saves a vertex whose stack was just unwound (Asyncify's unwind stopped).
pub(crate) fn capture(
    store: &mut Store<VertexState>,
    instance: &Instance,
    stdout: Bytes,
) -> Result<VertexImage, String> {
    let memory = instance
        .get_memory(&mut *store, "memory")
        .ok_or("it exports no memory named 'memory'")?;
    let saved = MemoryImage::save(memory.data(&*store));
    let names: Vec<String> = instance
        .exports(&mut *store)
        .filter(|e| e.clone().into_global().is_some())
        .map(|e| e.name().to_owned())
        .collect();
    let mut globals = Vec::new();
    for name in names {
        let Some(g) = instance.get_global(&mut *store, &name) else {
            continue;
        };
        if g.ty(&*store).mutability() != wasmtime::Mutability::Var {
            continue;
        }
        let value = match g.get(&mut *store) {
            Val::I32(x) => GlobalValue::I32(x),
            Val::I64(x) => GlobalValue::I64(x),
            Val::F32(x) => GlobalValue::F32(x),
            Val::F64(x) => GlobalValue::F64(x),
            other => {
                return Err(format!(
                    "its mutable global '{name}' holds a {:?}, which checkpoints cannot save",
                    other.ty(&*store)
                ));
            }
        };
        globals.push((name, value));
    }
    let state = store.data();
    let io = &state.io;
    let kept = io
        .inputs
        .0
        .iter()
        .filter_map(|(name, port)| port.kept.lock().clone().map(|b| (name.to_string(), b)))
        .collect();
    let Some(p) = state.pausing.as_ref() else {
        return Err("it is not checkpointable".to_owned());
    };
    let sending = p.sending.and_then(|(port, done)| {
        let name = io.outputs.0.get(port)?.0.to_string();
        Some((name, u32::try_from(done).unwrap_or(u32::MAX)))
    });
    Ok(VertexImage {
        vertex: io.vertex.clone(),
        stdout,
        counts: state.traffic(),
        phase: VertexPhase::Paused {
            memory: saved,
            globals,
            data: p.data,
            kept,
            sending,
        },
    })
}

/// Gives a fresh (attached) instance the state of `image` and starts rewinding it: its next
/// call of its entry goes back to where it paused.
pub(crate) async fn restore(
    store: &mut Store<VertexState>,
    instance: &Instance,
    image: &VertexImage,
) -> Result<(), String> {
    let VertexPhase::Paused {
        memory: saved,
        globals,
        data,
        kept,
        sending,
    } = &image.phase
    else {
        return Err("the vertex had ended; there is nothing to restore".to_owned());
    };
    let memory = instance
        .get_memory(&mut *store, "memory")
        .ok_or("it exports no memory named 'memory'")?;
    let have = memory.data_size(&*store) as u64;
    if saved.size < have || saved.size % PAGE != 0 {
        return Err(format!(
            "the checkpoint's memory of {} bytes does not fit this module (at least {have})",
            saved.size
        ));
    }
    memory
        .grow(&mut *store, (saved.size - have) / PAGE)
        .map_err(|e| format!("cannot grow its memory to the checkpoint's: {e:#}"))?;
    let bytes = memory.data_mut(&mut *store);
    bytes.fill(0);
    for (offset, block) in &saved.blocks {
        let at = usize::try_from(*offset).unwrap_or(usize::MAX);
        let Some(to) = at
            .checked_add(block.len())
            .and_then(|end| bytes.get_mut(at..end))
        else {
            return Err(format!(
                "the checkpoint has a block at {offset} outside its memory"
            ));
        };
        to.copy_from_slice(block);
    }
    for (name, value) in globals {
        let g = instance
            .get_global(&mut *store, name)
            .ok_or_else(|| format!("the module has no global '{name}' the checkpoint names"))?;
        let v = match *value {
            GlobalValue::I32(x) => Val::I32(x),
            GlobalValue::I64(x) => Val::I64(x),
            GlobalValue::F32(x) => Val::F32(x),
            GlobalValue::F64(x) => Val::F64(x),
        };
        g.set(&mut *store, v)
            .map_err(|e| format!("cannot restore global '{name}': {e:#}"))?;
    }
    let state = store.data_mut();
    state.stdout_before = image.stdout.clone();
    state.set_traffic(&image.counts)?;
    for (port, item) in kept {
        let Some(p) = state.io.inputs.0.iter().find(|(n, _)| **n == **port) else {
            return Err(format!(
                "the checkpoint keeps an item for no input port '{port}'"
            ));
        };
        *p.1.kept.lock() = Some(item.clone());
    }
    let sending = match sending {
        None => None,
        Some((port, done)) => {
            let Some(i) = state.io.outputs.0.iter().position(|(n, _)| **n == **port) else {
                return Err(format!(
                    "the checkpoint was sending on no output port '{port}'"
                ));
            };
            Some((i, *done as usize))
        }
    };
    let Some(p) = state.pausing.as_mut() else {
        return Err("it is not checkpointable".to_owned());
    };
    p.data = *data;
    p.sending = sending;
    p.rewinding = true;
    let Some(funcs) = p.funcs.clone() else {
        return Err("it was not attached for checkpoints".to_owned());
    };
    let at = i32::from_ne_bytes(data.to_ne_bytes());
    funcs
        .start_rewind
        .call_async(&mut *store, at)
        .await
        .map_err(|e| format!("cannot start rewinding it: {e:#}"))
}

/// Whether a pause point has something to do: a rewind ends here, or a pause is wanted. The
/// cheap test made on every `recv`, `send` and `yield`.
#[inline]
pub(crate) fn at_pause_point(state: &VertexState) -> bool {
    state
        .pausing
        .as_ref()
        .is_some_and(|p| p.rewinding || wanted(state, p.seen))
}

/// Whether the vertex's part asked for a pause after `seen`.
fn wanted(state: &VertexState, seen: u64) -> bool {
    state.io.pause.as_ref().is_some_and(|c| c.wanted(seen))
}

/// At a pause point: ends a rewind that arrived here, or begins an unwind when a pause is
/// wanted. `Ok(true)`: the call must return at once (its stack is unwinding; the value it
/// returns is never seen).
pub(crate) async fn pause_point(
    caller: &mut wasmtime::Caller<'_, VertexState>,
) -> wasmtime::Result<bool> {
    let state = caller.data_mut();
    let wanted = state
        .pausing
        .as_ref()
        .is_some_and(|p| wanted(state, p.seen));
    let Some(p) = state.pausing.as_mut() else {
        return Ok(false);
    };
    if p.rewinding {
        p.rewinding = false;
        if let Some(f) = p.funcs.as_ref().map(|f| f.stop_rewind.clone()) {
            f.call_async(&mut *caller, ()).await?;
        }
        return Ok(false);
    }
    if wanted {
        begin_unwind(caller).await?;
        return Ok(true);
    }
    Ok(false)
}

/// Begins unwinding the vertex's stack from the pause point it is in.
pub(crate) async fn begin_unwind(
    caller: &mut wasmtime::Caller<'_, VertexState>,
) -> wasmtime::Result<()> {
    let Some(p) = caller.data_mut().pausing.as_mut() else {
        return Ok(());
    };
    p.unwinding = true;
    let at = i32::from_ne_bytes(p.data.to_ne_bytes());
    let Some(f) = p.funcs.as_ref().map(|f| f.start_unwind.clone()) else {
        wasmtime::bail!("the vertex was not attached for checkpoints");
    };
    f.call_async(&mut *caller, at).await
}

/// A vertex's stack was unwound to its entry: saves it, reports it to its part's control,
/// waits until the part resumes, and starts rewinding. The caller then calls the entry again.
pub(crate) async fn pause_here(
    store: &mut Store<VertexState>,
    instance: &Instance,
    stdout: Bytes,
) -> wasmtime::Result<()> {
    let state = store.data_mut();
    let Some(ctl) = state.io.pause.clone() else {
        wasmtime::bail!("the vertex is not checkpointable");
    };
    let Some(p) = state.pausing.as_mut() else {
        wasmtime::bail!("the vertex is not checkpointable");
    };
    p.unwinding = false;
    let slot = p.slot;
    let Some(funcs) = p.funcs.clone() else {
        wasmtime::bail!("the vertex was not attached for checkpoints");
    };
    funcs.stop_unwind.call_async(&mut *store, ()).await?;
    let n = ctl.current();
    let image = capture(store, instance, stdout).map_err(|e| wasmtime::format_err!("{e}"))?;
    ctl.paused(slot, n, image);
    ctl.resumed(n).await;
    let Some(p) = store.data_mut().pausing.as_mut() else {
        wasmtime::bail!("the vertex is not checkpointable");
    };
    p.seen = n;
    p.rewinding = true;
    let at = i32::from_ne_bytes(p.data.to_ne_bytes());
    funcs.start_rewind.call_async(&mut *store, at).await
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_cut;
