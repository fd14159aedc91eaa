/*
 * dirlock.h - one kpld per data directory.
 *
 * Two kpld on one data directory would both resume the same runs, so every
 * command and deploy could run twice. kpld takes an exclusive POSIX record
 * lock on DIR/kpld.lock (which also holds its pid, for a person) before it
 * opens the store, and holds it until it exits. The kernel drops the lock
 * when the process dies, kill -9 included, so a standby kpld waiting for it
 * takes over at once. The fd is O_CLOEXEC and record locks are not
 * inherited across fork: the shims that outlive kpld (stages/proc.c) never
 * hold it.
 */
#ifndef KPL_DIRLOCK_H
#define KPL_DIRLOCK_H

#include <stdbool.h>
#include <sys/types.h>

#include "base/kpl.h"

struct dirlock; /* opaque */

/* Called once, before a wait begins, with the pid holding the lock (0 if
 * it cannot be told). */
typedef void (*dirlock_wait_fn)(void *data, const char *dir, pid_t holder);

/*
 * Takes the lock on dir (created, mode 0700, if missing). With wait false a
 * lock another process holds is KPL_EEXISTS, err naming that process's pid;
 * with wait true it blocks the calling thread until the lock is free,
 * calling on_wait first (may be NULL). Other failures are KPL_EIO. On
 * success *out is the caller's: dirlock_release it (or just exit).
 */
int dirlock_take(const char *dir, bool wait, dirlock_wait_fn on_wait, void *data,
		 struct dirlock **out, struct kpl_err *err);

/* Drops the lock and frees l (NULL is fine). The file stays. */
void dirlock_release(struct dirlock *l);

#endif
