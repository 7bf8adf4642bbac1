//! MVM component layer: WebAssembly jobs bound to queues by topology graphs, under policy and limits. Not built yet; it depends only on `mvm-queue` among the layers.
