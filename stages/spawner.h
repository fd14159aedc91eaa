/*
 * spawner.h - one long-lived, single-threaded process that starts every
 * script attempt's shim for kpld (issue 12): `kpl-shim __spawner PAD`,
 * started once by kpld (and again when it died), talking over a socketpair
 * on its fd 3.
 *
 * For each attempt kpld sends the shim's arguments; the spawner fork()s (a
 * tiny process: cheap) and the child becomes the shim by calling shim_main
 * directly, without an exec, set up as posix_spawn set up an exec'd shim:
 * its own session, stdin/stdout /dev/null, stderr kpld's, default signal
 * dispositions, an empty mask, the command's environment. It rewrites its
 * /proc cmdline to `kpl-shim __shim DIR GRACE` over PAD (spaces kpld passes
 * for that room), so a restarted kpld recognises it as an exec'd shim. The
 * spawner replies the pid and a pidfd of it (SCM_RIGHTS): kpld follows that
 * shim as it follows one it attached to after a restart (pidfd + DIR/exit);
 * the spawner reaps it. On EOF (kpld gone) the spawner exits; the shims live
 * on in their own sessions.
 *
 * Wire (SOCK_STREAM, host byte order, same machine):
 *   hello  spawner -> kpld once at start: a spawner_reply, seq 0, pid its
 *          own, err 0 if it can serve (pidfd_open works, PAD is there).
 *   request kpld -> spawner: a spawner_req then len bytes: DIR, CWD, the
 *          shim's ARGV (nargv, after "--": bwrap's when sandboxed) and ENV
 *          (nenv), each NUL-terminated.
 *   reply  spawner -> kpld: a spawner_reply with the request's seq; pid > 0
 *          and a pidfd (when pidfd_open gave one) if a shim was forked, else
 *          err (an errno) and step (where), nothing forked.
 * The environment carries secrets: neither side ever logs a request.
 */
#ifndef KPL_SPAWNER_H
#define KPL_SPAWNER_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "base/kpl.h"

/* The argv[1] that makes kpl-shim the spawner. */
#define SPAWNER_ARGV1 "__spawner"
/* The room for the shim's cmdline: a DIR up to PATH_MAX and its arguments. */
#define SPAWNER_PAD 4400
#define SPAWNER_MAGIC 0x6b706c73u
/* Bounds of one request (the kernel's own exec limit is about 2 MiB). */
#define SPAWNER_MAX_REQ (4u << 20)
#define SPAWNER_MAX_STRINGS 65536u

enum {
	SPAWNER_SANDBOXED = 1,
	/* DIR does not exist yet: the spawner makes it (with its parents,
	 * off kpld's loop thread) and checks it as the shim would open it. */
	SPAWNER_MKDIR = 2,
};

/* What a refused request failed at (spawner_reply.step). */
enum spawner_step {
	SPAWNER_STEP_FORK,      /* the fork itself, or nothing (pid > 0) */
	SPAWNER_STEP_MKDIR,     /* making DIR */
	SPAWNER_STEP_DIR,       /* DIR is not a directory below the workspace */
	SPAWNER_STEP_CWD,       /* CWD */
	SPAWNER_STEP_ROOM,      /* DIR does not fit in the shim's cmdline */
};

struct spawner_req {
	uint32_t magic;
	uint32_t seq;
	int32_t grace_ms;
	uint32_t flags;         /* SPAWNER_SANDBOXED */
	uint32_t nargv;
	uint32_t nenv;
	uint32_t len;           /* bytes of strings that follow */
};

struct spawner_reply {
	uint32_t magic;
	uint32_t seq;
	int32_t pid;            /* > 0: forked */
	int32_t err;            /* errno when nothing was forked */
	int32_t step;           /* enum spawner_step: where it failed */
};

/* The spawner's process (kpl-shim __spawner PAD, fd 3 the socket); returns
 * its exit status. */
int spawner_main(int argc, char **argv);

/*
 * kpld's side (spawner_client.c): asynchronous, one reply per request in
 * order. Loop thread only.
 */
struct uv_loop_s;

enum spawner_result {
	SPAWNER_STARTED,        /* pid (and pidfd, or -1) is the shim */
	SPAWNER_SENT,           /* spawner_request: the callback follows */
	SPAWNER_FALLBACK,       /* nothing forked: start the shim another way */
	SPAWNER_FAILED,         /* nothing forked, and it cannot be: err says why */
	SPAWNER_UNKNOWN,        /* the spawner died or hung mid-request: a shim
				 * may have been forked for dir (err says why) */
};

struct spawner_spawn {
	const char *exe;        /* kpl-shim, to start the spawner as */
	const char *dir;
	const char *cwd;
	int grace_ms;
	bool sandboxed;
	bool mkdir;             /* SPAWNER_MKDIR */
	char *const *argv;      /* the command (bwrap's when sandboxed) */
	char *const *env;
};

/* The outcome of a request sent: STARTED (the shim's pid, and its pidfd
 * or -1, now the callee's), FAILED, FALLBACK (nothing forked) or UNKNOWN;
 * err says why for the last three. Called once, from the loop. */
typedef void (*spawner_cb)(void *data, enum spawner_result res, pid_t pid, int pidfd,
			   const struct kpl_err *err);

/* Sends the request to the spawner, starting the spawner first when none
 * runs (again when it died): SPAWNER_SENT, and cb follows; or, with no
 * callback, SPAWNER_FALLBACK when nothing was sent (KPL_NO_SPAWNER in
 * kpld's environment, read once; a spawner that cannot serve; kpld
 * stopping). */
enum spawner_result spawner_request(struct uv_loop_s *loop, const struct spawner_spawn *s,
				    spawner_cb cb, void *data);

/* kpld is stopping: requests still outstanding get SPAWNER_UNKNOWN, the
 * spawner sees EOF and exits, its handles close; no request after. */
void spawner_shutdown(void);

/* The spawner's pid, 0 when none runs. */
pid_t spawner_pid(void);

#endif
