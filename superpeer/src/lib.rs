//! MVM super-peer overlay: libp2p groups, broker, scheduling and the node daemon. Not built yet; it sits above the three layers.
