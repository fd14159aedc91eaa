/*
 * engine.h - runs and their stages: the state machines, the scheduler, the
 * durable event log and recovery after a restart.
 *
 * The engine lives on one libuv loop. Every state change goes through
 * run_set_state()/stage_set_state() (engine.c), which check the transition,
 * stage the new records and an event in the store, and ask for a commit;
 * subscribers hear of a change only once its commit is durable.
 *
 * Failure policy: when a stage fails (and has no continue_on_error), no new
 * stage starts; stages already running are left to finish (cancelling a
 * half-done deploy is worse than letting it end); stages that did not start
 * become SKIPPED; then the `finally` stages run; the run ends FAILED.
 *
 * Threads: loop thread only, all of it.
 */
#ifndef KPL_ENGINE_H
#define KPL_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "engine/config.h"
#include "base/kpl.h"
#include "engine/secrets.h"
#include "pipelines/pipeline.h"
#include "store/store.h"

/* Run ids: 16 lowercase Crockford base32 characters, time-sortable. */
#define KPL_RUN_ID_LEN 16

/* Writes a new run id (NUL-terminated) into out; monotonic in-process. */
void engine_new_run_id(char out[KPL_RUN_ID_LEN + 1]);

struct engine; /* opaque */

struct engine_options {
	uv_loop_t *loop;
	struct store *store; /* borrowed; outlives the engine */
	const char *data_dir; /* run workspaces go under DATA_DIR/work */
	/* Store bytes of log events kept per stage attempt (store_event_cost:
	 * an empty line costs its record too); 0 = 16 MiB. */
	uint64_t log_cap_bytes;
	/* Store bytes of all of a run's events (every stage and attempt) past
	 * which the run is stopped and FAILED; 0 = 256 MiB. */
	uint64_t run_budget_bytes;
	const struct cfg *cfg;      /* borrowed; the daemon's endpoints */
	struct secrets *secrets;    /* borrowed; values redacted everywhere */
};

/*
 * Creates the engine and recovers every run the store lists as active: a
 * stage that was RUNNING is re-attached if its kind can, else failed with
 * "interrupted by restart"; then each run carries on. *out is the caller's.
 */
int engine_start(const struct engine_options *opt, struct engine **out,
		 struct kpl_err *err);

/*
 * Stops the engine for a daemon shutdown: running attempts are abandoned
 * (their processes stopped, nothing recorded, so a restart treats them as
 * interrupted), pending commits are waited for, then done(data) runs and
 * the engine is freed.
 */
void engine_stop(struct engine *e, void (*done)(void *data), void *data);

struct store *engine_store(struct engine *e);
uv_loop_t *engine_loop(struct engine *e);
struct secrets *engine_secrets(struct engine *e);
/* The daemon config (borrowed, for the engine's lifetime). */
const struct cfg *engine_config(const struct engine *e);

/*
 * Submits a run of the pipeline text (len bytes) with the given params.
 * Bad input returns KPL_EINVAL/KPL_ETOOBIG at once with err naming the line
 * and field; a store past its reserve (store_has_room) KPL_EFULL. Otherwise returns 0 and later calls cb(data, status, run_id)
 * once the run is durable (status 0) or could not be stored. A non-empty
 * idem_key seen before with a pipeline of the same name gives the earlier
 * run's id (even while that run's first commit is in flight); keys and
 * concurrency groups are per pipeline name (docs/security.md).
 */
typedef void (*engine_submit_cb)(void *data, int status, const char *run_id);
int engine_submit(struct engine *e, const char *text, size_t len,
		  const char *const *param_names, const char *const *param_values,
		  size_t n_params, const char *idem_key, engine_submit_cb cb,
		  void *data, struct kpl_err *err);

/*
 * Where a submitted text came from (kpl.v1.PipelineSource): strings
 * borrowed for the call, NULL or "" for unknown. The engine adds the text's
 * SHA-256 itself, to every run.
 */
struct engine_source {
	const char *repo;   /* as shown: no credentials */
	const char *commit;
	const char *path;
	const char *ref;
	/* A pull request from a fork: the run's ${{ secrets.X }} all fail
	 * (kept in the run's PipelineSource, so a restart keeps it too). */
	bool secrets_withheld;
	/* The stage templates the text's `uses:` may name (NULL: none). The
	 * run keeps those it uses (their text, for a restart; path and
	 * SHA-256 in its source). */
	const struct pl_files *files;
	/* NULL, or called once the run has its id and before any of it is
	 * committed: what it stages in the store is made durable with the
	 * run's first commit (forge.c: the run's commit status record). */
	void (*stage_with)(void *data, const char *run_id);
	void *stage_with_data;
};

/* engine_submit with the text's source (NULL: a text given as is). */
int engine_submit_from(struct engine *e, const char *text, size_t len,
		       const char *const *param_names, const char *const *param_values,
		       size_t n_params, const char *idem_key,
		       const struct engine_source *src, engine_submit_cb cb, void *data,
		       struct kpl_err *err);

/*
 * Cancels a run: stages not started become CANCELLED, running ones are
 * stopped (a script's whole process group is killed). cb(data, status,
 * run_id) runs once the run has reached its final state durably.
 * KPL_ENOTFOUND for an unknown run, KPL_ESTATE for one already final (err
 * says which state).
 */
int engine_cancel(struct engine *e, const char *run_id, engine_submit_cb cb,
		  void *data, struct kpl_err *err);

/*
 * Answers an `approval` stage that is WAITING: approve makes it SUCCEED,
 * otherwise it FAILS (never retried); the stage message records by and
 * comment. A WAITING stage of a kind with an approve hook (stage.h: a frozen
 * canary) is set RUNNING with that message and handed the answer instead;
 * it ends itself (a rejected one is never retried). cb runs once that is
 * durable. KPL_ENOTFOUND for an unknown run or stage, KPL_ESTATE if the
 * stage is not waiting for approval.
 */
int engine_approve(struct engine *e, const char *run_id, const char *stage,
		   bool approve, const char *comment, const char *by,
		   engine_submit_cb cb, void *data, struct kpl_err *err);

/*
 * Starts a new attempt of a FAILED or CANCELLED run: its stages that
 * SUCCEEDED keep their result and outputs, every other stage (and every
 * `finally` stage) goes back to PENDING, the run to QUEUED, attempt + 1.
 * cb runs once that is durable. KPL_ENOTFOUND, or KPL_ESTATE for a run that
 * is not FAILED or CANCELLED.
 */
int engine_retry(struct engine *e, const char *run_id, engine_submit_cb cb,
		 void *data, struct kpl_err *err);

/*
 * Subscription to a run's committed events: notify(sub) runs on the loop
 * after each commit that added events to run_id. The subscriber reads the
 * events from the store. The caller owns sub and must unsubscribe before
 * freeing it; notify may unsubscribe (only) itself.
 */
struct engine_sub {
	/* The run to hear about; "" for every run. Not changed while
	 * subscribed (it says which of the engine's lists holds sub). */
	char run_id[KPL_RUN_ID_LEN + 1];
	void (*notify)(struct engine_sub *sub);
	void *data;
	struct engine_sub *prev, *next; /* engine's list */
};
void engine_subscribe(struct engine *e, struct engine_sub *sub);
void engine_unsubscribe(struct engine *e, struct engine_sub *sub);

/*
 * True while the run may still produce events (it is in memory and its
 * final event is not yet durable). A run that is not active has every event
 * it will ever have in the store.
 */
bool engine_run_active(struct engine *e, const char *run_id);

/* Number of runs in memory (not yet final and durable). */
size_t engine_active_runs(struct engine *e);

/*
 * Records an audit entry (docs/security.md): msg ("token t_... (alice)
 * cancelled the run") goes to the audit log (store_stage_audit), and, when
 * run_id is given, also to that run's event log as an EVENT_KIND_AUDIT
 * event, which needs the run to be active: call it before the change it
 * records, so the entry comes before the events the change causes. With
 * stage set (approvals), that stage must be WAITING for an answer (an
 * approval, or a kind with an approve hook), as engine_approve requires.
 * KPL_ENOTFOUND / KPL_ESTATE otherwise, and nothing is recorded. Commits what it stages. msg is redacted of
 * every secret like every event.
 */
int engine_audit(struct engine *e, const char *run_id, const char *stage,
		 const char *msg, struct kpl_err *err);

/*
 * The names in pl that only the daemon config resolves: each notify[].notifier,
 * and each stage's with.cluster, with.registry, with.jenkins and
 * with.prometheus written as a plain name (a ${{ }} is known only at run
 * time). Calls fn once per name the config does not declare, with its
 * position, key path and a message naming the config file and the declared
 * names; returns how many. For ValidatePipeline: the parser has no config,
 * so an offline `kplctl lint` cannot check these. Loop thread only.
 */
size_t engine_check_config_names(const struct engine *e, const struct pipeline *pl,
				 void (*fn)(void *data, struct pl_pos pos, const char *path,
					    const char *msg),
				 void *data);

#endif
