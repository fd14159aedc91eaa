/*
 * hooks.h - kpld's HTTP endpoints (--http-listen): push webhooks from
 * GitHub and GitLab that start runs of registered pipelines, Prometheus
 * metrics and a health check. docs/hooks.md is the user's side of it.
 *
 *   POST /hooks/github  X-Hub-Signature-256: sha256=HMAC-SHA256(secret, body)
 *   POST /hooks/gitlab  X-Gitlab-Token: the secret, verbatim
 *   GET  /metrics       Prometheus text format 0.0.4 (engine/metrics.h)
 *   GET  /healthz       200 "ok" while serving
 *   and the routes of hooks_options.extra_routes (chat commands,
 *   engine/chatops.h)
 *
 * A delivery is checked against the webhook secret of every registered
 * pipeline (store db pipelines_registered; the secret is named there and
 * read from the secret store); with none that verifies it is 401, and the
 * body is never parsed. A verified push is matched against the pipelines
 * whose secret verified it: same repository (hooks_repo_key) and a watched
 * branch (hooks_branch_match). For each, kpld fetches the pushed commit
 * into a cache under DATA_DIR/hooks/git (git, spawned on the loop), reads
 * the pipeline file at that commit (at most 1 MiB) and submits it with the
 * params it declares among ref, sha, branch and repo, under the
 * idempotency key "hook:SOURCE:DELIVERY:NAME", so a delivery seen twice
 * starts one run. The answer is 202 with a line "NAME RUN_ID" per run.
 * Pull (merge) request deliveries go the same way for the registrations
 * with pull_requests (engine/forge.h reads them and sends the statuses).
 *
 * Threads: loop thread only, all of it.
 */
#ifndef KPL_HOOKS_H
#define KPL_HOOKS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "api/kpl.pb-c.h"
#include "engine/engine.h"
#include "engine/httpd.h"
#include "engine/forge.h"
#include "base/kpl.h"
#include "engine/secrets.h"
#include "store/store.h"

/* Limits on what a registration and a delivery may hold. */
#define HOOKS_MAX_BRANCHES 32
#define HOOKS_MAX_URL 2048
#define HOOKS_MAX_PATH 1024
#define HOOKS_MAX_DELIVERY_ID 100
#define HOOKS_MAX_URLS 12
/* The pipeline file read from a repository. */
#define HOOKS_MAX_FILE KPL_MAX_PIPELINE_BYTES

struct hooks; /* opaque */

struct hooks_options {
	uv_loop_t *loop;
	struct engine *eng;   /* borrowed; outlives the hooks */
	/* Borrowed, outlives the hooks; NULL: pull requests' runs report no
	 * commit status. */
	struct forge *forge;
	const char *data_dir; /* the git cache goes in DATA_DIR/hooks/git */
	const char *listen;   /* HOST:PORT for the HTTP listener */
	/* Seconds a git command may take; 0 = 120. */
	unsigned git_timeout_s;
	/* httpd_options limits; 0 picks httpd's default. */
	uint64_t request_timeout_ms;
	size_t max_per_address;
	size_t max_connections; /* HTTP connections in all; 0: httpd's default (256) */
	/* PEM files: the listener serves TLS only (httpd_options). */
	const char *tls_cert_file;
	const char *tls_key_file;
	/* More routes to serve on the listener (engine/chatops.h); borrowed,
	 * outlive the hooks; at most HOOKS_MAX_EXTRA_ROUTES. */
	const struct httpd_route *extra_routes;
	size_t n_extra_routes;
};
#define HOOKS_MAX_EXTRA_ROUTES 4

/* Binds the HTTP listener and serves (listen NULL: no listener, only
 * hooks_run_pipeline). *out is the caller's; it ends with hooks_stop.
 * Errors name the address. */
int hooks_start(const struct hooks_options *opt, struct hooks **out,
		struct kpl_err *err);

/* The HTTP port actually bound. */
int hooks_port(struct hooks *h);

/*
 * Stops: no new connection, deliveries waiting for git are answered 503
 * and their git process killed, deliveries waiting for the engine to store
 * their run are let finish (their answer is dropped if the client is gone).
 * Calls done(data) on the loop once everything is closed and h is freed.
 * Call it before engine_stop.
 */
void hooks_stop(struct hooks *h, void (*done)(void *data), void *data);

/*
 * RunPipeline: starts a run of the registered pipeline name with its file
 * read from the repository at ref (a branch or tag, or a full "refs/..."
 * name, resolved with git ls-remote) or sha, through the same steps as a
 * push of that commit (one git queue, the same cache, the same params set
 * when declared and not given). Neither ref nor sha: the registration's
 * first branch that is not a glob. The file's pipeline must be named name
 * (a token limited to name may run it). Strings are borrowed for the call.
 * Errors found at once return KPL_EINVAL or KPL_ENOTFOUND with err; else 0
 * and later cb(data, 0, run_id, NULL) once the run is durable, or cb(data,
 * code, NULL, msg) naming the ref and the repository. cb always runs once,
 * on the loop, also when hooks stop first (KPL_EUNAVAILABLE).
 */
typedef void (*hooks_run_cb)(void *data, int code, const char *run_id, const char *msg);
struct hooks_run {
	const char *name, *ref, *sha;
	const char *const *param_names, *const *param_values;
	size_t n_params;
	const char *idem_key; /* NULL or "": every call a new run */
};
int hooks_run_pipeline(struct hooks *h, const struct hooks_run *rq, hooks_run_cb cb,
		       void *data, struct kpl_err *err);

/*
 * Counts the runs of the store's active index in the metrics
 * (kpl_runs{state}); call once, before engine_start changes any of them.
 */
void hooks_seed_metrics(struct store *s);

/*
 * Checks a RegisterPipeline request and fills rec (pointers into req, or
 * static defaults: rec borrows; the caller sets created_at and created_by).
 * The secret must exist in sec. KPL_EINVAL with err naming the field.
 * rec->branches points to branches_buf (HOOKS_MAX_BRANCHES entries).
 */
int hooks_check_registration(const Kpl__V1__RegisterPipelineRequest *req,
			     struct secrets *sec, Kpl__V1__RegisteredPipeline *rec,
			     char **branches_buf, struct kpl_err *err);

/* --- Pure parts (no I/O), for the handlers and their tests. --- */

/*
 * The form of a repository URL two URLs of the same repository share:
 * "host/path" for https://, http://, ssh://, git:// (user, password and
 * port dropped) and scp-like "user@host:path"; "/path" for file:// and
 * local paths. The host is lowercased; for URLs with a host the path is
 * too (GitHub and GitLab names are case-insensitive); a trailing "/" and
 * ".git" go. Writes at most size bytes (NUL-terminated); returns 0, or
 * KPL_EINVAL if url is empty, too long or not one of these forms.
 */
int hooks_repo_key(const char *url, char *out, size_t size);

/*
 * NULL if url may be a repository kpld fetches (and stores, lists, logs),
 * else why not (static text): a remote helper (ext::, fd::, any
 * "transport::"), or credentials in it, i.e. user@ in any scheme but ssh
 * (https://TOKEN@host/...) and user:password@ in ssh. scp-like
 * user@host:path and ssh://git@host/... name an ssh user and are fine.
 */
const char *hooks_repo_url_problem(const char *url);

/* url for answers, logs and listings: a credential hooks_repo_url_problem
 * refuses shows as "***@" (registrations stored before it did). */
void hooks_url_for_display(const char *url, char *out, size_t size);

/* True if s is a commit id as forges send it: 40 (SHA-1) or 64 (SHA-256)
 * hex digits; false for NULL. */
bool hooks_sha_ok(const char *s);

/* True if branch (without refs/heads/) matches pattern: an exact name, or a
 * glob where * and ? also match '/' (fnmatch without flags). */
bool hooks_branch_match(const char *pattern, const char *branch);

/*
 * GitHub: header is X-Hub-Signature-256 ("sha256=" and 64 lowercase hex
 * digits); true if it is HMAC-SHA256(key = secret, body). Constant time in
 * the signature's bytes. NULL header: false.
 */
bool hooks_github_verify(const char *secret, const char *body, size_t len,
			 const char *header);

/* GitLab: true if the X-Gitlab-Token header equals secret (compared as
 * SHA-256 digests with CRYPTO_memcmp, so neither length nor content
 * leaks). NULL header: false. */
bool hooks_gitlab_verify(const char *secret, const char *header);

/* HOOKS_API: RunPipeline (hooks_run_pipeline), never a delivery's. */
enum hooks_source { HOOKS_GITHUB, HOOKS_GITLAB, HOOKS_API };

/* A push as the payload tells it. Strings are malloc'd (hooks_push_free). */
struct hooks_push {
	char *ref;    /* "refs/heads/main" */
	char *branch; /* "main"; NULL for a ref that is not a branch */
	char *sha;    /* 40 (or 64) lowercase hex digits */
	char *before; /* the branch's sha before the push (lowercase hex), or "" */
	bool deleted; /* a branch deletion: nothing to run */
	char *urls[HOOKS_MAX_URLS]; /* the repository's URLs in the payload */
	size_t n_urls;
};

/*
 * Reads a push payload (JSON). KPL_EINVAL with err saying which field is
 * missing or malformed. On success out is the caller's (hooks_push_free).
 */
int hooks_parse_push(enum hooks_source src, const char *body, size_t len,
		     struct hooks_push *out, struct kpl_err *err);
void hooks_push_free(struct hooks_push *p);

/*
 * The idempotency key of the run a push starts of the registered pipeline
 * name (repo its registered repository): "hook:SOURCE:" and the SHA-256, in
 * hex, of what the delivery's signature covers and says which run it asks
 * for: the source, the repository (hooks_repo_key form), ref, before,
 * after (sha) and name. A delivery re-sent with another delivery id, by
 * GitHub or by anyone holding an old signed body, gives the same key, so it
 * starts no second run; a new push (another sha, or the same sha pushed
 * again on top of another) gives another. Writes at most size bytes
 * (HOOKS_PUSH_KEY_LEN + 1 suffice); returns 0, or KPL_EINVAL if repo is
 * not a repository URL.
 */
#define HOOKS_PUSH_KEY_LEN (5 + 6 + 1 + 64)
int hooks_push_key(enum hooks_source src, const char *repo, const struct hooks_push *p,
		   const char *name, char *out, size_t size);

#endif
