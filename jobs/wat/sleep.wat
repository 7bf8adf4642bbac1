;; Sleeps `ms` milliseconds (parameter; WASI poll_oneoff on the monotonic clock, so the vertex
;; holds no CPU meanwhile), then prints "slept" on stdout and ends. Memory: 64..: parameter
;; text; 128..: the clock subscription; 256..: its event; 512..: the iovec and byte count.
(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (import "mvm" "param" (func $param (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "ms")
  (data (i32.const 16) "slept\n")
  (func $ms (result i64) (local $n i32) (local $i i32) (local $v i64)
    (local.set $n (call $param (i32.const 0) (i32.const 2) (i32.const 64) (i32.const 32)))
    (block $end (loop $digit
      (br_if $end (i32.ge_s (local.get $i) (local.get $n)))
      (local.set $v (i64.add (i64.mul (local.get $v) (i64.const 10))
        (i64.extend_i32_u (i32.sub (i32.load8_u (i32.add (i32.const 64) (local.get $i))) (i32.const 48)))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $digit)))
    (local.get $v))
  (func (export "_start")
    ;; subscription: userdata 0, tag 0 (clock), clock id 1 (monotonic), timeout in ns,
    ;; precision 0, flags 0 (relative)
    (i32.store (i32.const 144) (i32.const 1))
    (i64.store (i32.const 152) (i64.mul (call $ms) (i64.const 1000000)))
    (drop (call $poll (i32.const 128) (i32.const 256) (i32.const 1) (i32.const 512)))
    (i32.store (i32.const 520) (i32.const 16))
    (i32.store (i32.const 524) (i32.const 6))
    (drop (call $write (i32.const 1) (i32.const 520) (i32.const 1) (i32.const 528)))))
