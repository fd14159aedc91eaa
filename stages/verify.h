/*
 * verify.h - metric analysis: PromQL checks (and an optional HTTP check)
 * measured every interval for a number of rounds, with failure and
 * "no data" budgets. The `verify` stage kind is a thin shell around it; a
 * canary stage runs the same analysis between its steps (`verify: {...}`).
 *
 *   with:
 *     prometheus: main            # endpoint in the daemon config
 *     canary_version: v2          # fills ${{ canary.version }} (verify kind)
 *     interval: 30s               # between rounds; the first comes after one
 *     count: 10                   # rounds
 *     failure_limit: 2            # failed rounds allowed; one more fails
 *     inconclusive_limit: 2       # rounds without data allowed (default:
 *                                 # failure_limit)
 *     queries:
 *       - name: request-success-rate
 *         query: sum(rate(...{destination_version="${{ canary.version }}"...
 *         min: 99                 # fail below; max: fail above
 *     http: { url: ..., expect_status: 200, body_contains: "ok" }
 *
 * A round runs every query and the HTTP check at once and logs one SYSTEM
 * line per measurement, in the order written:
 *   "request-success-rate = 99.2 (min 99) pass, round 2/10"
 *   "request-success-rate = no data (empty result): inconclusive, round 3/10"
 * A round fails if any measurement fails; else it is inconclusive if any has
 * no data (an empty result, NaN, or a Prometheus that could not answer:
 * 5xx, timeout, unreachable); else it passes. More failed rounds than
 * failure_limit fail the analysis at once, naming the check and the value:
 *   "verify failed: request-success-rate = 69.8, below min 99 (3 failed
 *    rounds, limit 2)"
 * and more inconclusive rounds than inconclusive_limit fail it with
 *   "inconclusive: no data from request-success-rate (empty result; 3
 *    inconclusive rounds, limit 2)".
 * A query Prometheus refuses (bad PromQL: 400 bad_data, 422 execution) or
 * whose result is not one number fails it at once with Prometheus's message.
 * After count rounds within the limits it succeeds.
 *
 * Templates: the engine expands params, stages, env, run and secrets in
 * `with` before the analysis starts; ${{ canary.version }} (the only canary
 * name) is filled in here, in queries[].query, http.url and
 * http.body_contains, from the version the caller gives (the verify kind:
 * with.canary_version). It must be written alone, as ${{ canary.version }}.
 * Thresholds, interval, count and the limits may be templates too (checked
 * when the analysis starts).
 *
 * The analysis holds no external state: after a restart it carries on from
 * the progress last recorded (round, counts, last values).
 *
 * Threads: loop thread only.
 */
#ifndef KPL_VERIFY_H
#define KPL_VERIFY_H

#include <stdbool.h>
#include <stdint.h>

#include "stages/stage.h"

#define VERIFY_MAX_CHECKS 32
#define VERIFY_MAX_COUNT 100000

struct verify_query {
	char *name;  /* [A-Za-z0-9_.-]+, unique; also the output key */
	char *query; /* PromQL; ${{ canary.version }} not yet filled in */
	bool has_min, has_max;
	double min, max;
};

struct verify_http_check {
	char *url;
	long expect_status;  /* default 200 */
	char *body_contains; /* NULL: the body is not looked at */
};

/* An analysis, as loaded from a `with` (all strings owned). */
struct verify_config {
	struct verify_query *queries;
	size_t n_queries;
	struct verify_http_check *http; /* NULL if none */
	int64_t interval_ms;
	uint32_t count;
	uint32_t failure_limit;
	uint32_t inconclusive_limit;
	char *canary_version; /* NULL: ${{ canary.version }} cannot be used */
};

/*
 * Checks the shape of an analysis mapping (a verify stage's `with`, or a
 * canary step's `verify:`), for a kind's check_with: "file:line:col:
 * path.key: message". allow_canary_version: the mapping may carry
 * canary_version (the verify kind); otherwise the caller supplies the
 * version and must not ask the mapping for it, and the mapping may leave
 * out prometheus (a canary names one endpoint in its own `with`).
 * Templates are checked against the roots the expression language allows
 * plus canary.
 */
int verify_check_node(const struct pl_node *node, const char *file, const char *path,
		      bool allow_canary_version, struct kpl_err *err);

/*
 * Loads an analysis mapping of st's `with` (node: the with itself, or a
 * mapping inside it) with its templates expanded (stage_expand) and its
 * numbers parsed. path names node in messages ("stages.check.with").
 * canary_version (copied; may be NULL) is used when the node has none.
 * Returns 0, or KPL_EINVAL with err naming the key.
 */
int verify_config_load(struct stage *st, const struct pl_node *node, const char *path,
		       const char *canary_version, struct verify_config *cfg,
		       struct kpl_err *err);
void verify_config_release(struct verify_config *cfg);

/* Where an analysis is: what a restart needs to carry on. */
struct verify_progress {
	uint32_t round;        /* rounds done */
	uint32_t failures;     /* failed rounds */
	uint32_t inconclusive; /* inconclusive rounds */
	int64_t last_round_ms; /* when the last round ended (unix ms), 0 */
	/* The last measurement per query (then "http"): "99.2", "no data",
	 * "error", or the HTTP status; NULL before the first round. Owned. */
	char **last;
	size_t n_last;
};
/* As JSON text (malloc'd), for stage_save_resume or a caller's own. */
char *verify_progress_format(const struct verify_progress *p,
			     const struct verify_config *cfg);
/* From that text; KPL_EINVAL if it is not. *p is new (release it). */
int verify_progress_parse(const char *text, const struct verify_config *cfg,
			  struct verify_progress *p);
void verify_progress_release(struct verify_progress *p);

struct verify_run; /* opaque */

struct verify_result {
	/* SUCCEEDED, FAILED or CANCELLED. */
	Kpl__V1__StageState state;
	const char *msg; /* for a person; borrowed for the callback */
	/* The progress at the end (last values for outputs); borrowed. */
	const struct verify_progress *progress;
	/* progress->n_last names: each query's, then "http"; borrowed. */
	const char *const *names;
};

struct verify_run_options {
	struct stage *st; /* logs and HTTP client; must outlive the run */
	/* Taken over by verify_run_start whether it succeeds or not (the
	 * caller's copies are zeroed). */
	struct verify_config *cfg;
	struct stage_endpoint *prom; /* NULL if cfg has no queries */
	/* Carry on from here (a restart); NULL: from the start. Copied. */
	const struct verify_progress *from;
	/*
	 * After every round, with the new progress (borrowed for the call).
	 * The round's measurement lines are staged (stage_log_staged): the
	 * callback must commit them, normally with stage_save_resume of
	 * verify_progress_format(p). Runs before on_done when a round ends
	 * the analysis. May be NULL (then nothing commits them until
	 * stage_done).
	 */
	void (*on_round)(struct verify_run *run, const struct verify_progress *p, void *data);
	/* Exactly once, on the loop, never inside a verify_run_* call; the
	 * run is freed after it returns (do not use it then). */
	void (*on_done)(struct verify_run *run, const struct verify_result *res, void *data);
	void *data;
};

/*
 * Starts (or resumes) an analysis: the next round comes one interval after
 * the last one (after the start for a fresh one). Returns 0, or KPL_EINVAL
 * with err saying why (a ${{ canary.version }} without a version, a query
 * too long); on_done never runs then. *out is valid until on_done returns.
 */
int verify_run_start(const struct verify_run_options *o, struct verify_run **out,
		     struct kpl_err *err);
/* Stops it: requests in flight are cancelled and on_done runs later with
 * CANCELLED ("cancelled"). Calling it after on_done has run is a BUG. */
void verify_run_cancel(struct verify_run *run);
/* kpld is stopping: stops it without on_done (the next kpld resumes from
 * the progress recorded); frees it once its handles have closed. */
void verify_run_abandon(struct verify_run *run);

extern const struct stage_kind verify_kind;

#endif
