/* The MVM host ABI for jobs written in C (clang --target=wasm32-wasi).
 *
 * A job talks only to its own named ports; the topology outside the job decides where they
 * lead. Results: see component-layer/src/runtime/abi.rs. */
#ifndef MVM_H
#define MVM_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MVM_IMPORT(name) __attribute__((import_module("mvm"), import_name(name)))

MVM_IMPORT("send") int32_t mvm_send(const char *port, int32_t port_len, const void *data, int32_t len);
MVM_IMPORT("recv") int64_t mvm_recv(const char *port, int32_t port_len, void *buf, int32_t cap);
MVM_IMPORT("try_recv") int64_t mvm_try_recv(const char *port, int32_t port_len, void *buf, int32_t cap);
MVM_IMPORT("ports") int32_t mvm_ports(char *buf, int32_t cap);
MVM_IMPORT("param") int32_t mvm_param(const char *name, int32_t name_len, char *buf, int32_t cap);
MVM_IMPORT("log") void mvm_log(int32_t level, const char *msg, int32_t len);
/* Nothing, unless the job asked for checkpoints: then a compute loop that calls it can be
 * paused there (recv and send are such points already). */
MVM_IMPORT("yield") void mvm_yield(void);

enum { MVM_NO_PORT = -1, MVM_END = -2, MVM_EMPTY = -3, MVM_BAD_ITEM = -4, MVM_FULL = -5 };

/* Sends `len` bytes on `port`. */
static inline int32_t mvm_send_to(const char *port, const void *data, int32_t len) {
    return mvm_send(port, (int32_t)strlen(port), data, len);
}

/* Receives one item from `port` into `buf` (waits); its length, or a negative MVM_ code. */
static inline int64_t mvm_recv_from(const char *port, void *buf, int32_t cap) {
    return mvm_recv(port, (int32_t)strlen(port), buf, cap);
}

/* Receives exactly `len` bytes from `port`; 0, or a negative MVM_ code (or -100: wrong size). */
static inline int mvm_recv_exact(const char *port, void *buf, int32_t len) {
    int64_t n = mvm_recv_from(port, buf, len);
    if (n < 0) return (int)n;
    return n == len ? 0 : -100;
}

/* A parameter as a NUL-terminated string in `buf`; its length, or -1 when absent or too long. */
static inline int mvm_param_str(const char *name, char *buf, int cap) {
    int32_t n = mvm_param(name, (int32_t)strlen(name), buf, cap - 1);
    if (n < 0 || n >= cap) return -1;
    buf[n] = 0;
    return n;
}

static inline long mvm_param_long(const char *name, long fallback) {
    char b[64];
    return mvm_param_str(name, b, sizeof b) < 0 ? fallback : strtol(b, 0, 10);
}

static inline void mvm_logs(int32_t level, const char *msg) { mvm_log(level, msg, (int32_t)strlen(msg)); }

#endif
