/*
 * sched.h - schedules of registered pipelines: cron fire times that start
 * runs through RunPipeline's path (engine/hooks.h), on the loop, no thread.
 *
 * Each schedule's state (store db schedules: next fire, a claimed fire not
 * yet submitted, the last fire and its run) is in LMDB:
 *  - a fire is first claimed: the next fire time moves on and the fire
 *    time is stored as pending, durably; then the run is submitted under
 *    the idempotency key "sched:NAME:INDEX:UNIX_SECONDS"; then the pending
 *    fire is cleared and the run id recorded. A crash after the claim
 *    submits it again on restart under the same key: one run. A restart
 *    after the clear has nothing to redo: no second run.
 *  - after downtime (next fire in the past) only the latest missed fire
 *    time is considered, and it starts only if it is no more than
 *    starting_deadline_seconds late (0: no limit); else it is skipped, and
 *    the log and the schedule's last_message say so. (Kubernetes CronJob.)
 *  - overlap is the pipeline's concurrency group's business: a fire always
 *    submits, and the engine queues (or cancels the older run).
 *  - a schedule first takes its next fire time after its registration's
 *    created_at, so one registered a moment before a fire time still fires.
 *    Registering again (or changing cron or timezone) starts afresh from the
 *    new registration's time.
 *
 * Threads: loop thread only.
 */
#ifndef KPL_SCHED_H
#define KPL_SCHED_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "api/kpl.pb-c.h"
#include "engine/engine.h"
#include "engine/hooks.h"
#include "base/kpl.h"

/* At most this many schedules per registered pipeline. */
#define SCHED_MAX 16

struct sched; /* opaque */

struct sched_options {
	uv_loop_t *loop;
	struct engine *eng;   /* borrowed; outlives the scheduler */
	struct hooks *hooks;  /* borrowed; valid until sched_stop */
	/* Tests only (kpld reads KPL_TEST_SCHEDULE_CLOCK): a file holding the
	 * scheduler's "now" in ms since the epoch, read every 50 ms. NULL: the
	 * real clock. */
	const char *clock_file;
	/* NULL: TZ_ZONEINFO. */
	const char *zoneinfo;
};

/* Starts: a first look at once, then a timer to the earliest fire (at most
 * a minute, so registrations made meanwhile are seen). *out is the
 * caller's; it ends with sched_stop then sched_free. */
int sched_start(const struct sched_options *opt, struct sched **out);

/* Looks at every schedule again soon (a registration changed). void *
 * for rpc_hooks_on_change. */
void sched_kick(void *s);

/* Stops firing; done(data) runs once the timer is closed and no commit or
 * submission of the scheduler is in flight (call hooks_stop after this:
 * it answers submissions still waiting for git). */
void sched_stop(struct sched *s, void (*done)(void *data), void *data);
void sched_free(struct sched *s);

/*
 * RegisterPipeline's schedules: checks req->schedules (cron, zone, branch,
 * params) against rec (what hooks_check_registration made of req) and
 * points rec->schedules at copies in buf/ptrs (SCHED_MAX entries each)
 * without the answer-only fields. KPL_EINVAL with err naming the schedule
 * and field ("schedules[0].cron: field 2 (hour), column 3: ...").
 */
int sched_check_registration(const Kpl__V1__RegisterPipelineRequest *req,
			     Kpl__V1__RegisteredPipeline *rec, Kpl__V1__Schedule *buf,
			     Kpl__V1__Schedule **ptrs, const char *zoneinfo,
			     struct kpl_err *err);

/*
 * For ListPipelines: fills the answer-only fields of rec's schedules (next
 * fire, last fire and run, last message) from the store. rec must be an
 * unpacked message (fields are malloc'd, freed with it).
 */
void sched_annotate(struct store *st, Kpl__V1__RegisteredPipeline *rec, const char *zoneinfo);

#endif
