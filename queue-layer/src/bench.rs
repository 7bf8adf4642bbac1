//! Benchmarks of the queue layer (filled in below).
