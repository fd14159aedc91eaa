/*
 * forge.h - pull and merge requests from GitHub and GitLab, and the commit
 * statuses kpld sends back for the runs they start. docs/hooks.md ("Pull
 * requests") is the user's side of it.
 *
 * Deliveries arrive at the webhook endpoints (engine/hooks.c verifies them
 * as it does pushes); this file reads them (forge_parse_pr) and keys them
 * (forge_pr_key). A registered pipeline with pull_requests: true then gets
 * a run at the request's head commit, fetched from the base repository
 * (refs/pull/N/head on GitHub, refs/merge-requests/N/head on GitLab, so a
 * fork's commit is found too).
 *
 * Commit statuses (a registration with status_token):
 *   - durable: forge_stage_watch stages a record for the run (store db
 *     forge_status) in the run's first commit; the record says what was sent
 *     last. What to send is read from the run's durable state: pending
 *     first, then success, failure or error/canceled once the run is final.
 *     A restart sends what the records still owe, so a status is sent at
 *     least once (twice if kpld died between the forge's answer and the
 *     record's update; GitLab answers a repeat of the state it has with
 *     400 "Cannot transition status", taken as delivered);
 *   - on the loop, on kpld's own HTTP client; never blocking or failing a
 *     run: a status the forge cannot take is retried after
 *     FORGE_BACKOFF_MS, doubling up to FORGE_MAX_BACKOFF_MS, FORGE_MAX_TRIES
 *     tries in all, then logged and given up; a rejection (401, 403, 404,
 *     422) is given up at once;
 *   - the token is read from kpl's secrets at each send (never stored in
 *     the record, never logged).
 *
 * Threads: loop thread only, all of it.
 */
#ifndef KPL_FORGE_H
#define KPL_FORGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "api/kpl.pb-c.h"
#include "engine/engine.h"
#include "base/kpl.h"
#include "store/store.h"

#define FORGE_MAX_URLS 12
#define FORGE_MAX_TRIES 6
#define FORGE_BACKOFF_MS 1000
#define FORGE_MAX_BACKOFF_MS 60000
#define FORGE_TIMEOUT_MS 15000
/* GitHub refuses a longer description with 422. */
#define FORGE_MAX_DESCRIPTION 140

#define FORGE_DEFAULT_GITHUB_API "https://api.github.com"
#define FORGE_DEFAULT_GITLAB_API "https://gitlab.com/api/v4"

enum forge_kind { FORGE_GITHUB, FORGE_GITLAB, FORGE__LAST };

/* "github", "gitlab". */
const char *forge_kind_name(enum forge_kind k);

/* --- Pure parts (no I/O), for hooks.c and the unit tests. --- */

/* A pull (merge) request event as the payload tells it. Strings are
 * malloc'd (forge_pr_free). */
struct forge_pr {
	char *action;      /* "opened", "synchronize", "open", "update", ... */
	uint64_t number;   /* GitHub's number, GitLab's iid */
	char *head_sha;    /* lowercase hex */
	char *head_branch; /* the source branch (in the fork, for a fork) */
	char *base_branch; /* the branch it is to be merged into */
	char *before;      /* GitHub synchronize's before, GitLab's oldrev, or "" */
	char *updated_at;  /* the request's updated_at as written, or "" */
	bool fork;         /* the head is in another repository than the base */
	/* Where statuses go: GitHub "OWNER/REPO" of the base repository,
	 * GitLab the target project's numeric id. */
	char *status_repo;
	char *ref;         /* "refs/pull/N/head", "refs/merge-requests/N/head" */
	char *urls[FORGE_MAX_URLS]; /* the base repository's URLs */
	size_t n_urls;
};

/*
 * Reads a GitHub pull_request or GitLab Merge Request Hook payload. Returns
 * 0 with out filled for an event that starts runs (GitHub opened,
 * synchronize, reopened; GitLab open, reopen, and update with an oldrev,
 * i.e. new commits); 1 with ignored (isize bytes) saying why for any other
 * action, out then empty; KPL_EINVAL with err naming the field for a
 * malformed payload. out is the caller's on 0 (forge_pr_free).
 */
int forge_parse_pr(enum forge_kind kind, const char *body, size_t len, struct forge_pr *out,
		   char *ignored, size_t isize, struct kpl_err *err);
void forge_pr_free(struct forge_pr *pr);

/*
 * The idempotency key of the run a request event starts of the registered
 * pipeline name (repo: its registered repository): "hook:SOURCE:" and the
 * SHA-256, hex, of what the signed body says: the forge, repository
 * (hooks_repo_key form), "pr", number, action, head sha, before and
 * updated_at, and name. The same body delivered again (GitHub's redelivery,
 * GitLab's retry) gives the same key; a new push to the request or another
 * reopen gives another. size >= FORGE_PR_KEY_LEN + 1; KPL_EINVAL if repo
 * is not a repository URL.
 */
#define FORGE_PR_KEY_LEN (5 + 6 + 1 + 64)
int forge_pr_key(enum forge_kind kind, const char *repo, const struct forge_pr *pr,
		 const char *name, char *out, size_t size);

/*
 * The state to report for a run in state s: NULL while it is not final
 * (then "pending" is what is owed), else GitHub success/failure/error
 * (cancelled: GitHub has no such state) or GitLab success/failed/canceled.
 */
const char *forge_final_state(enum forge_kind kind, Kpl__V1__RunState s);

/* One status request, built from a record: method POST, url, headers and a
 * JSON body. Owned by the struct (forge_request_release). */
struct forge_request {
	char *url;
	char *body;
	struct {
		const char *name;
		char *value;
	} headers[6];
	size_t n_headers;
};

/*
 * Builds the request that sets state on rec's commit: GitHub
 * POST API/repos/OWNER/REPO/statuses/SHA {state, target_url, description,
 * context} with Authorization: Bearer TOKEN, Accept:
 * application/vnd.github+json, X-GitHub-Api-Version: 2022-11-28; GitLab
 * POST API/projects/ID/statuses/SHA {state, name, ref, target_url,
 * description} with PRIVATE-TOKEN. description is cut to
 * FORGE_MAX_DESCRIPTION characters (at a UTF-8 boundary). KPL_EINVAL with
 * err if rec is not one kpld could have written (unknown forge, a repo or
 * sha that would change the URL's path).
 */
int forge_status_request(const Kpl__Store__V1__ForgeStatusRecord *rec, const char *state,
			 const char *token, const char *description, struct forge_request *out,
			 struct kpl_err *err);
void forge_request_release(struct forge_request *r);

/* What a reply means: taken, worth another try, or never to be taken. */
enum forge_verdict { FORGE_DELIVERED, FORGE_RETRY, FORGE_REJECTED };

/* Judges an HTTP reply to a status request; why says what was wrong
 * (status and the start of the forge's message). */
enum forge_verdict forge_judge(enum forge_kind kind, int http_status, const char *body,
			       char *why, size_t size);

/*
 * How long to wait before trying again after a reply judged FORGE_RETRY, in
 * ms, from its headers (NULL when absent): Retry-After (seconds or an HTTP
 * date), else, when x-ratelimit-remaining is 0, until x-ratelimit-reset
 * (unix seconds: GitHub's primary rate limit), at most
 * FORGE_MAX_RATE_LIMIT_WAIT_MS; -1 for neither (the backoff decides).
 */
#define FORGE_MAX_RATE_LIMIT_WAIT_MS (3600 * 1000)
int64_t forge_retry_after_ms(const char *retry_after, const char *remaining,
			     const char *reset, int64_t now_ms);

/* --- The daemon side --- */

struct forge; /* opaque */

struct forge_options {
	uv_loop_t *loop;
	struct engine *eng;       /* borrowed; outlives the forge (close it first) */
	const char *console_url;  /* NULL or "": statuses carry no target_url */
	const char *api_url[FORGE__LAST]; /* NULL: FORGE_DEFAULT_*_API */
	/* For tests: the first retry's delay; 0: FORGE_BACKOFF_MS. */
	int64_t backoff_ms;
};

/*
 * Creates the sender and queues what the store's forge_status records
 * still owe (sending starts on a later loop iteration). *out is the
 * caller's until forge_close completes. Errors: the URLs (err names which),
 * or the records cannot be read.
 */
int forge_new(const struct forge_options *opt, struct forge **out, struct kpl_err *err);

/* What forge_watch needs of the request; strings borrowed for the call. */
struct forge_watch {
	enum forge_kind kind;
	const char *status_repo;  /* forge_pr.status_repo */
	const char *sha;          /* the head commit */
	const char *ref;          /* the head branch (GitLab's ref) */
	const char *token_secret; /* the secret holding the API token */
	const char *pipeline;     /* context "kpl/PIPELINE" */
};

/*
 * Stages run_id's status record (nothing is sent yet): call it from the
 * run's engine_source.stage_with, so the record is durable exactly when the
 * run is, and a kpld that dies before forge_watch still owes the statuses.
 */
void forge_stage_watch(struct forge *f, const char *run_id, const struct forge_watch *w);

/*
 * Starts reporting the stored run run_id's statuses (its record staged by
 * forge_stage_watch, or staged here if it was not): pending, and the final
 * state once the run has one. A run already watched is left as it is.
 */
void forge_watch(struct forge *f, const char *run_id, const struct forge_watch *w);

/*
 * Stops: requests in flight are cancelled (their records stay for the next
 * kpld), timers closed, the engine subscriptions dropped; once the last
 * callback has run, done(data) runs on the loop and f is freed. Call it
 * before engine_stop.
 */
void forge_close(struct forge *f, void (*done)(void *data), void *data);

#endif
