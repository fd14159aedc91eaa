/*
 * kpl.h - what every kpl subsystem shares: error codes, the error value a
 * person reads, logging, time and allocation helpers.
 *
 * Errors are values: a function returns 0 or a negative KPL_E* code. Where a
 * user must read the reason (which field, which line, which endpoint) it also
 * fills a caller-owned struct kpl_err.
 */
#ifndef KPL_H
#define KPL_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

/* One list of error codes: name, gRPC status code it maps to, text. */
#define KPL_ERR_MAP(X)                                                        \
	X(INVAL, 3, "invalid argument")                                       \
	X(NOTFOUND, 5, "not found")                                           \
	X(EXISTS, 6, "already exists")                                        \
	X(STATE, 9, "not allowed in the current state")                       \
	X(NOMEM, 8, "out of memory")                                          \
	X(TOOBIG, 8, "over a size limit")                                     \
	X(FULL, 8, "the store is full")                                       \
	X(IO, 13, "i/o error")                                                \
	X(STORE, 13, "store error")                                           \
	X(SCHEMA, 9, "store schema is newer than this kpld")                  \
	X(CORRUPT, 13, "stored record is corrupt")                            \
	X(CANCELLED, 1, "cancelled")                                          \
	X(TIMEOUT, 4, "timed out")                                            \
	X(UNAVAILABLE, 14, "unavailable")                                     \
	X(INTERNAL, 13, "internal error")

enum kpl_errno {
	KPL_OK = 0,
#define KPL_ERR_ENUM(name, grpc, text) KPL_E##name,
	KPL_ERR_FIRST_ = -1000,
	KPL_ERR_MAP(KPL_ERR_ENUM)
#undef KPL_ERR_ENUM
	KPL_ERR_LAST_
};

/* Static text for a code ("invalid argument"); never NULL. */
const char *kpl_strerror(int code);
/* The code's name ("KPL_EINVAL"); never NULL. */
const char *kpl_err_name(int code);
/* The gRPC status code (grpc_status_code value) a code maps to. */
int kpl_err_grpc_status(int code);

/*
 * An error a person reads. msg is lowercase, without a full stop, and names
 * what is wrong and where ("pipeline:12:5: stages[1].needs: unknown stage
 * \"biuld\""). Callers own it; it holds no pointers.
 */
struct kpl_err {
	int code;
	char msg[512];
};

/* Sets err (if not NULL) and returns code, for `return kpl_errf(...)`. */
int kpl_errf(struct kpl_err *err, int code, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
void kpl_err_clear(struct kpl_err *err);

/* Logging to stderr: "2026-11-25T00:50:53.123Z INFO  engine: message". */
enum kpl_log_level { KPL_LOG_DEBUG, KPL_LOG_INFO, KPL_LOG_WARN, KPL_LOG_ERROR };
extern enum kpl_log_level kpl_log_threshold;
/* Parses "debug", "info", "warn", "error"; -1 if unknown. */
int kpl_log_level_parse(const char *s);

/* Where the runs' workspaces are (DATA_DIR/work, spelt as the engine
 * spells it); set once at start, before any stage. */
void kpl_set_workspaces_dir(const char *dir);
/*
 * open(2) for a file that a stage's command may have written: below the
 * workspaces' directory no symlink is followed and nothing leads out of it
 * (openat2 RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS; ELOOP or EXDEV; without
 * openat2 the same by a walk of O_NOFOLLOW opens), so a
 * command cannot make kpld read a file of its choice for it (its outputs,
 * its log, an image layout). Other paths: open(2).
 */
int kpl_open_ws(const char *path, int flags);
/* openat(dirfd, rel, flags) the way kpl_open_ws opens below the
 * workspaces: no symlink followed, nothing out of dirfd's tree. */
int kpl_openat_beneath(int dirfd, const char *rel, int flags);

/* What kpl_open_ws does where the kernel has no openat2: opens rel below
 * dirfd walking one component at a time with O_NOFOLLOW; a symlink on the
 * way fails (ELOOP, ENOTDIR), a ".." or empty component fails (EXDEV).
 * Any thread. */
int kpl_open_beneath(int dirfd, const char *rel, int flags);

void kpl_log(enum kpl_log_level level, const char *subsys, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
#define kpl_debug(sub, ...) do { if (kpl_log_threshold <= KPL_LOG_DEBUG) kpl_log(KPL_LOG_DEBUG, sub, __VA_ARGS__); } while (0)
#define kpl_info(sub, ...) kpl_log(KPL_LOG_INFO, sub, __VA_ARGS__)
#define kpl_warn(sub, ...) kpl_log(KPL_LOG_WARN, sub, __VA_ARGS__)
#define kpl_error(sub, ...) kpl_log(KPL_LOG_ERROR, sub, __VA_ARGS__)

/* A broken invariant: logs where and aborts. Never for bad input. */
#define BUG(...) kpl_bug(__FILE__, __LINE__, __VA_ARGS__)
void kpl_bug(const char *file, int line, const char *fmt, ...)
	__attribute__((format(printf, 3, 4), noreturn));

/* Wall clock, unix milliseconds. */
int64_t kpl_now_ms(void);

/* Allocation that aborts on failure (out of memory is not recoverable in
 * the daemon; limits on input keep allocations bounded). */
void *kpl_malloc(size_t n);
void *kpl_calloc(size_t n, size_t size);
void *kpl_realloc(void *p, size_t n);
char *kpl_strdup(const char *s);
char *kpl_strndup(const char *s, size_t n);
/* Returns a malloc'd string; caller frees. */
char *kpl_asprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#define KPL_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* Limits on what comes from outside (gRPC messages, pipeline files). */
#define KPL_MAX_PIPELINE_BYTES (1024 * 1024)
#define KPL_MAX_GRPC_MESSAGE_BYTES (4 * 1024 * 1024)
#define KPL_MAX_STAGES 256
#define KPL_MAX_PARAMS 128
#define KPL_MAX_NAME_LEN 128
#define KPL_MAX_VALUE_LEN (64 * 1024)
/* All of one stage's templates (env and with) expanded, together: a value
 * referenced many times cannot grow one attempt without bound. */
#define KPL_MAX_STAGE_EXPANDED (1024 * 1024)
#define KPL_MAX_DEPTH 32
#define KPL_MAX_LOG_LINE 8192

/* Start time of pid in clock ticks since boot (/proc/PID/stat), 0 if it
 * is not running: with the pid, it names one process across pid reuse. */
uint64_t kpl_pid_start_time(int64_t pid);

/* A string built piece by piece, always NUL-terminated once anything is
 * added. Zero-initialise it; s is the caller's to free. */
struct kpl_buf {
	char *s;
	size_t len, cap;
};

void kpl_buf_add(struct kpl_buf *b, const char *s, size_t n);
void kpl_buf_str(struct kpl_buf *b, const char *s);

#endif
