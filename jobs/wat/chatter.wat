;; Writes `lines` lines (parameter or vertex attribute), one every `ms` milliseconds: "out N" on
;; stdout, "err N" on stderr and "note N" through mvm.log (info); then, with `fail` given,
;; traps. For `mvm logs`. Memory: 64..: parameter text; 128..: the clock subscription; 256..:
;; its event; 512..: the iovec and byte count; 600.., 700.., 800..: the three lines; 900..:
;; digits.
(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (import "mvm" "param" (func $param (param i32 i32 i32 i32) (result i32)))
  (import "mvm" "log" (func $log (param i32 i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "ms")
  (data (i32.const 4) "lines")
  (data (i32.const 12) "fail")
  (data (i32.const 600) "out ")
  (data (i32.const 700) "err ")
  (data (i32.const 800) "note ")
  ;; The decimal parameter named by memory[name .. name+len] (0 when missing).
  (func $num (param $name i32) (param $len i32) (result i64) (local $n i32) (local $i i32) (local $v i64)
    (local.set $n (call $param (local.get $name) (local.get $len) (i32.const 64) (i32.const 32)))
    (block $end (loop $digit
      (br_if $end (i32.ge_s (local.get $i) (local.get $n)))
      (local.set $v (i64.add (i64.mul (local.get $v) (i64.const 10))
        (i64.extend_i32_u (i32.sub (i32.load8_u (i32.add (i32.const 64) (local.get $i))) (i32.const 48)))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $digit)))
    (local.get $v))
  ;; Writes $v in decimal at $at and a newline after it; the digits' count.
  (func $itoa (param $at i32) (param $v i64) (result i32) (local $n i32) (local $i i32)
    (loop $d
      (i32.store8 (i32.add (i32.const 900) (local.get $n))
        (i32.add (i32.const 48) (i32.wrap_i64 (i64.rem_u (local.get $v) (i64.const 10)))))
      (local.set $n (i32.add (local.get $n) (i32.const 1)))
      (local.set $v (i64.div_u (local.get $v) (i64.const 10)))
      (br_if $d (i64.ne (local.get $v) (i64.const 0))))
    (block $e (loop $c
      (br_if $e (i32.ge_s (local.get $i) (local.get $n)))
      (i32.store8 (i32.add (local.get $at) (local.get $i))
        (i32.load8_u (i32.add (i32.const 900) (i32.sub (i32.sub (local.get $n) (local.get $i)) (i32.const 1)))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $c)))
    (i32.store8 (i32.add (local.get $at) (local.get $n)) (i32.const 10))
    (local.get $n))
  (func $emit (param $fd i32) (param $buf i32) (param $len i32)
    (i32.store (i32.const 512) (local.get $buf))
    (i32.store (i32.const 516) (local.get $len))
    (drop (call $write (local.get $fd) (i32.const 512) (i32.const 1) (i32.const 520))))
  (func $sleep (param $ms i64)
    ;; subscription: userdata 0, tag 0 (clock), clock id 1 (monotonic), relative timeout
    (i32.store (i32.const 144) (i32.const 1))
    (i64.store (i32.const 152) (i64.mul (local.get $ms) (i64.const 1000000)))
    (drop (call $poll (i32.const 128) (i32.const 256) (i32.const 1) (i32.const 512))))
  (func (export "_start") (local $n i64) (local $i i64) (local $ms i64) (local $k i32)
    (local.set $n (call $num (i32.const 4) (i32.const 5)))
    (local.set $ms (call $num (i32.const 0) (i32.const 2)))
    (block $done (loop $line
      (br_if $done (i64.ge_u (local.get $i) (local.get $n)))
      (local.set $k (call $itoa (i32.const 604) (local.get $i)))
      (call $emit (i32.const 1) (i32.const 600) (i32.add (local.get $k) (i32.const 5)))
      (local.set $k (call $itoa (i32.const 704) (local.get $i)))
      (call $emit (i32.const 2) (i32.const 700) (i32.add (local.get $k) (i32.const 5)))
      (local.set $k (call $itoa (i32.const 805) (local.get $i)))
      (call $log (i32.const 2) (i32.const 800) (i32.add (local.get $k) (i32.const 5)))
      (if (i64.gt_u (local.get $ms) (i64.const 0)) (then (call $sleep (local.get $ms))))
      (local.set $i (i64.add (local.get $i) (i64.const 1)))
      (br $line)))
    (if (i32.ge_s (call $param (i32.const 12) (i32.const 4) (i32.const 64) (i32.const 32)) (i32.const 0))
      (then unreachable))))
