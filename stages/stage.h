/*
 * stage.h - the interface between the engine and a stage kind.
 *
 * A stage kind is a small vtable (registered once in stages/kinds.c):
 * check_with validates the pipeline's `with` before anything runs; start
 * begins an attempt; cancel asks it to stop; resume re-attaches after a
 * restart. A kind reports back only through the stage_* functions below,
 * and always ends an attempt with exactly one stage_done.
 *
 * Durability contract: before a kind acts on the outside world it records,
 * with stage_record_resume, what it needs to find that work again; the engine
 * has already made the stage's RUNNING state durable before start is called.
 *
 * Threads: loop thread only, all of it.
 */
#ifndef KPL_STAGE_H
#define KPL_STAGE_H

#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "api/kpl.pb-c.h"
#include "api/store/store.pb-c.h"
#include "engine/config.h"
#include "base/kpl.h"
#include "pipelines/pipeline.h"

struct stage; /* engine-owned; see engine/engine.h */
struct http_client; /* base/http.h */

struct stage_kind {
	const char *name;
	/* Reports the first problem in with (may be NULL) as
	 * "file:line:col: path.key: message". */
	int (*check_with)(const struct pl_node *with, const char *file,
			  const char *path, struct kpl_err *err);
	/* Starts an attempt. A non-zero return fails the attempt with err's
	 * message (stage_done need not be called then). */
	int (*start)(struct stage *st, struct kpl_err *err);
	/* Asks the attempt to stop; the kind later calls stage_done with
	 * CANCELLED (or the result it reached first). */
	void (*cancel)(struct stage *st);
	/* After a restart, for a stage that was RUNNING: re-attach (return 0
	 * and carry on as after start); or return KPL_ENOTFOUND when nothing
	 * of the attempt ever ran (the engine starts it afresh, not counted as
	 * a retry); or KPL_ESTATE with err saying why it cannot re-attach (the
	 * engine applies the retry policy). NULL: the kind never re-attaches. */
	int (*resume)(struct stage *st, struct kpl_err *err);
	/* Called when the kpld is stopping: release what the attempt holds
	 * without reporting (the next start resumes it). NULL: cancel. */
	void (*abandon)(struct stage *st);
	/* True: `with.timeout` is the attempt's timeout when the stage has no
	 * `timeout` of its own (the script kind's first format). */
	bool with_timeout;
	/* Expression roots its `with` templates may use beyond the usual ones
	 * (EXPR_ROOT_CANARY): the engine leaves such a ${{ root.NAME }} as
	 * written in what stage_expand returns, for the kind to fill in. */
	unsigned with_roots;
	/* `with` keys whose strings reach a command line (pl_kind's). */
	const char *const *argv_keys;
	/* Every `with` key the kind takes, NULL-terminated (pl_kind's). */
	const char *const *with_keys;
	/* The kind may run as a pod (pl_kind's; `runs_on`). */
	bool runs_on;
	/* pl_kind's pod_capable and check_pod (optional). */
	bool (*pod_capable)(const struct pl_node *with);
	int (*check_pod)(const struct pl_node *with, const struct pl_node *runs_on,
			 const struct pl_node *defaults, const struct pl_node *at,
			 const char *file, const char *path, struct kpl_err *err);
	/*
	 * Optional: the kind's WAITING attempt answers ApproveStage (a canary
	 * frozen on failure: approve promotes, reject aborts). The engine has
	 * set the stage RUNNING again (msg "approved by WHO: COMMENT" or
	 * "rejected by ..." says so in the stage's message) before calling it;
	 * the kind carries on and ends the attempt with stage_done as usual. A
	 * rejected attempt is not retried. NULL: only the approval kind, which
	 * the engine answers itself, waits for approvals.
	 */
	void (*approve)(struct stage *st, bool approve, const char *msg);
	/* Optional: the run reached its final state (durable soon after);
	 * called once for each of its stages of this kind, whatever their
	 * state, to release what the run holds outside kpld (a pod stage's
	 * workspace claim). Must not report through stage_*. */
	void (*run_ended)(struct stage *st);
};

/* Looks a kind up by name; NULL if unknown. */
const struct stage_kind *stage_kind_find(const char *name);
/* The kinds, as the pipeline parser wants them (static storage). */
const struct pl_kind *stage_kinds_for_parser(size_t *n);

/* --- What a kind may ask of its stage. --- */

uv_loop_t *stage_loop(struct stage *st);
const char *stage_name(struct stage *st);
const char *stage_run_id(struct stage *st);
uint32_t stage_attempt(struct stage *st);
/* The stage's spec (borrowed, valid for the run's life). */
const struct pl_stage *stage_spec(struct stage *st);
/* The run's workspace directory, created before start (borrowed). */
const char *stage_workspace(struct stage *st);
/* Resolved run parameters (borrowed arrays of n). */
void stage_params(struct stage *st, const char *const **names,
		  const char *const **values, size_t *n);
/* Pipeline env then stage env, in order (borrowed, templates as written). */
void stage_env(struct stage *st, const struct pl_env **penv, size_t *np,
	       const struct pl_env **senv, size_t *ns);
/* The same env with its templates expanded for this attempt: pipeline env
 * first, then the stage's, later names winning (borrowed until the attempt
 * ends). */
void stage_env_expanded(struct stage *st, const char *const **names,
			const char *const **values, size_t *n);

/* The value of key in the stage's `with` mapping, or NULL (borrowed). */
const struct pl_node *stage_with_get(struct stage *st, const char *key);
/*
 * The text of a scalar from `with` (or NULL for NULL) with its ${{ }}
 * templates expanded for this attempt: the engine expands every template
 * of `with` before start and fails the attempt, naming the key, if one
 * cannot be. Returns a malloc'd string; caller frees.
 */
char *stage_expand(struct stage *st, const struct pl_node *scalar);
/*
 * A `with` scalar that is run by /bin/sh -c (a script's shell), expanded
 * so that no value becomes shell text (tpl_expand_shell): *text for sh -c
 * and *values (*n), the values of KPL_T_1.., for the command's environment.
 * Returns 0, or a negative code with err naming the key.
 */
int stage_expand_shell(struct stage *st, const struct pl_node *scalar, char **text,
		       char ***values, size_t *n, struct kpl_err *err);
/* Absolute deadline of this attempt (unix ms) or 0; kinds enforce it. */
int64_t stage_deadline_ms(struct stage *st);

/* Kind-private state for the attempt (the engine never looks inside). */
void *stage_impl(struct stage *st);
void stage_set_impl(struct stage *st, void *impl);

/*
 * An endpoint of the daemon's config, named by the stage's `with.KEY`
 * (e.g. with_key "jenkins" reads `with: { jenkins: ci-main }`), with its
 * credentials' ${{ secrets.X }} resolved. Strings are owned copies; ep is
 * borrowed (valid while kpld runs). Errors name the key and list what the
 * config declares.
 */
struct stage_endpoint {
	const struct cfg_endpoint *ep;
	char *url;
	char *username;
	char *password;
	char *token;
};
int stage_endpoint(struct stage *st, enum cfg_kind kind, const char *with_key,
		   struct stage_endpoint *out, struct kpl_err *err);
/* The same for an endpoint named name (expanded already); key names where
 * the name came from in messages ("runs_on.cluster"). */
int stage_endpoint_named(struct stage *st, enum cfg_kind kind, const char *name,
			 const char *key, struct stage_endpoint *out, struct kpl_err *err);
void stage_endpoint_release(struct stage_endpoint *e);

/*
 * Release history: a deploy, canary or rollback stage records what it
 * changed (rec->target, revision, image, and what it replaced, including the
 * old pod template). The engine fills in seq, run id, stage and time; the
 * record is staged and becomes durable with the stage's next commit (its
 * stage_done at the latest). stage_releases lists a target's records newest
 * first (*out new; store_free_releases it).
 */
void stage_record_release(struct stage *st, Kpl__Store__V1__ReleaseRecord *rec);
int stage_releases(struct stage *st, const char *target,
		   Kpl__Store__V1__ReleaseRecord ***out, size_t *n);

/* The daemon's HTTP client (base/http.h), shared by every kind. */
struct http_client *stage_http(struct stage *st);

/* Removes every secret value from text: a malloc'd copy with "***" in
 * their place (for messages a kind builds from remote replies). */
char *stage_redact(struct stage *st, const char *text);

/*
 * A line of output (len bytes, no newline) becomes a log event, durable
 * soon after: secrets redacted, made valid UTF-8 (a bad byte becomes
 * U+FFFD), and in events of at most KPL_MAX_LOG_LINE bytes cut between
 * characters (after redaction, so a cut never splits a secret). Past the
 * stage's log cap (16 MiB by default) lines are dropped and one note says
 * where the log was cut.
 */
void stage_log(struct stage *st, Kpl__V1__LogStream stream, const char *line,
	       size_t len);
/* The same, but only staged: it becomes durable with the next commit of the
 * run (use with stage_save_resume to keep lines and a read offset in one
 * commit). */
void stage_log_staged(struct stage *st, Kpl__V1__LogStream stream,
		      const char *line, size_t len);
/* A piece of a line the shim cut (KPL_MAX_LOG_LINE): cut says which ends
 * of it are cuts, so a secret split there is still redacted. Staged. */
#define STAGE_LOG_CUT_START 1u /* it continues an earlier piece */
#define STAGE_LOG_CUT_END 2u   /* it continues in a later piece */
void stage_log_piece_staged(struct stage *st, Kpl__V1__LogStream stream,
			    const char *line, size_t len, unsigned cut);
/* The same, committed now when commit is true (like stage_log). */
void stage_log_piece(struct stage *st, Kpl__V1__LogStream stream, const char *line,
		     size_t len, unsigned cut, bool commit);
/* Records new resume data (copied) and commits it with everything staged. */
void stage_save_resume(struct stage *st, const char *resume);
void stage_logf(struct stage *st, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

/* Publishes an output KEY=VALUE (copied); stored with the stage. */
int stage_set_output(struct stage *st, const char *key, const char *value);

/*
 * Records what the kind needs to find its work again (pid and its start
 * time for a process; free-form JSON for others), durably, then calls
 * done(st, status, data) on the loop.
 */
void stage_record_resume(struct stage *st, int64_t pid, uint64_t pid_start,
			 const char *resume, void (*done)(struct stage *, int, void *),
			 void *data);
/* What stage_record_resume last recorded (borrowed). */
void stage_resume_info(struct stage *st, int64_t *pid, uint64_t *pid_start,
		       const char **resume);

/* The attempt now waits for someone (an approval): RUNNING -> WAITING with
 * msg saying for what. It stays live; it still ends with stage_done. */
void stage_wait(struct stage *st, const char *msg);

/*
 * Ends the attempt: state is SUCCEEDED, FAILED or CANCELLED; msg (copied)
 * says why for a person. The kind must have released its resources or be
 * about to (its impl is the kind's to free). A FAILED attempt is retried if
 * the stage's retry policy allows it.
 */
void stage_done(struct stage *st, Kpl__V1__StageState state, const char *msg);

#endif
