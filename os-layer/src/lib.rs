//! MVM OS layer: guest drivers (Xen through `xl`, and the host), image repository, liveness and probes. Not built yet; it depends on no other layer.
