/*
 * hooks.c - the HTTP endpoints: webhook deliveries that start runs of
 * registered pipelines, /metrics and /healthz.
 *
 * A delivery goes: verify (every registered secret, constant time) -> parse
 * the push -> pick the registered pipelines it concerns -> for each, one
 * after the other: already submitted under its idempotency key? -> git init
 * (once per repository) -> git fetch --depth 1 REPO SHA (or, if the remote
 * refuses a sha, the whole branch) -> git cat-file blob SHA:PATH -> parse
 * for the declared params -> engine_submit -> the next one; then the
 * answer. git commands run one at a time (a queue), so two deliveries never
 * write the same cache repository at once.
 */
#define _GNU_SOURCE /* memrchr */
#include "engine/hooks.h"

#include <ctype.h>
#include <errno.h>
#include <fnmatch.h>
#include <jansson.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/sha.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "api/web.h"
#include "engine/forge.h"
#include "engine/httpd.h"
#include "engine/metrics.h"
#include "pipelines/pipeline.h"
#include "pipelines/reuse.h"
#include "stages/stage.h"

#define LOG "hooks"
#define DEFAULT_GIT_TIMEOUT_S 120
#define GIT_ERR_TAIL 400

extern char **environ;

/* ---------------------------------------------------------------------- */
/* Pure parts */

static void lower(char *s)
{
	for (; *s; s++)
		*s = (char)tolower((unsigned char)*s);
}

static void strip_tail(char *s)
{
	size_t n = strlen(s);

	while (n > 1 && s[n - 1] == '/')
		s[--n] = '\0';
	if (n > 4 && strcmp(s + n - 4, ".git") == 0) {
		n -= 4;
		s[n] = '\0';
	}
	while (n > 1 && s[n - 1] == '/')
		s[--n] = '\0';
}

int hooks_repo_key(const char *url, char *out, size_t size)
{
	char buf[HOOKS_MAX_URL + 1], host[512];
	const char *path, *scheme_end, *auth, *auth_end, *at, *colon;
	size_t n;

	if (!url || !*url || strlen(url) > HOOKS_MAX_URL || size < 2)
		return KPL_EINVAL;
	for (const char *p = url; *p; p++)
		if ((unsigned char)*p <= ' ' || *p == 0x7f)
			return KPL_EINVAL;
	if (strncmp(url, "file://", 7) == 0 || url[0] == '/') {
		path = url[0] == '/' ? url : url + 7;
		if (path[0] != '/')
			return KPL_EINVAL; /* file://host/path: not a local path */
		snprintf(buf, sizeof buf, "%s", path);
		strip_tail(buf);
		if (strlen(buf) >= size)
			return KPL_EINVAL;
		memcpy(out, buf, strlen(buf) + 1);
		return 0;
	}
	scheme_end = strstr(url, "://");
	if (scheme_end) {
		auth = scheme_end + 3;
		auth_end = strchr(auth, '/');
		if (!auth_end)
			return KPL_EINVAL;
		path = auth_end + 1;
		/* user:password@ goes, and so does :port. */
		at = memrchr(auth, '@', (size_t)(auth_end - auth));
		if (at)
			auth = at + 1;
		n = (size_t)(auth_end - auth);
		if (n == 0 || n >= sizeof host)
			return KPL_EINVAL;
		memcpy(host, auth, n);
		host[n] = '\0';
		if (host[0] == '[') {
			char *close = strchr(host, ']');
			if (!close)
				return KPL_EINVAL;
			close[1] = '\0';
		} else if ((colon = strchr(host, ':'))) {
			host[colon - host] = '\0';
		}
	} else {
		/* scp-like: [user@]host:path, the colon before any slash. */
		colon = strchr(url, ':');
		if (!colon || colon == url || memchr(url, '/', (size_t)(colon - url)))
			return KPL_EINVAL;
		at = memrchr(url, '@', (size_t)(colon - url));
		auth = at ? at + 1 : url;
		n = (size_t)(colon - auth);
		if (n == 0 || n >= sizeof host)
			return KPL_EINVAL;
		memcpy(host, auth, n);
		host[n] = '\0';
		path = colon + 1;
	}
	while (*path == '/')
		path++;
	if (!*path || !host[0])
		return KPL_EINVAL;
	snprintf(buf, sizeof buf, "%s/%s", host, path);
	lower(buf);
	strip_tail(buf);
	if (strlen(buf) >= size)
		return KPL_EINVAL;
	memcpy(out, buf, strlen(buf) + 1);
	return 0;
}

bool hooks_branch_match(const char *pattern, const char *branch)
{
	return pattern && branch && fnmatch(pattern, branch, 0) == 0;
}

bool hooks_github_verify(const char *secret, const char *body, size_t len,
			 const char *header)
{
	unsigned char mac[EVP_MAX_MD_SIZE];
	unsigned int mlen = 0;
	char want[7 + 64 + 1];
	static const char hex[] = "0123456789abcdef";
	bool ok;

	if (!secret || !header || strlen(header) != 7 + 64)
		return false;
	if (!HMAC(EVP_sha256(), secret, (int)strlen(secret), (const unsigned char *)body, len,
		  mac, &mlen) || mlen != 32)
		return false;
	memcpy(want, "sha256=", 7);
	for (unsigned i = 0; i < 32; i++) {
		want[7 + 2 * i] = hex[mac[i] >> 4];
		want[7 + 2 * i + 1] = hex[mac[i] & 15];
	}
	want[71] = '\0';
	ok = CRYPTO_memcmp(want, header, 71) == 0;
	OPENSSL_cleanse(mac, sizeof mac);
	OPENSSL_cleanse(want, sizeof want);
	return ok;
}

bool hooks_gitlab_verify(const char *secret, const char *header)
{
	unsigned char a[SHA256_DIGEST_LENGTH], b[SHA256_DIGEST_LENGTH];
	bool ok;

	if (!secret || !header)
		return false;
	SHA256((const unsigned char *)secret, strlen(secret), a);
	SHA256((const unsigned char *)header, strlen(header), b);
	ok = CRYPTO_memcmp(a, b, sizeof a) == 0;
	OPENSSL_cleanse(a, sizeof a);
	OPENSSL_cleanse(b, sizeof b);
	return ok;
}

void hooks_push_free(struct hooks_push *p)
{
	free(p->ref);
	free(p->branch);
	free(p->sha);
	free(p->before);
	for (size_t i = 0; i < p->n_urls; i++)
		free(p->urls[i]);
	memset(p, 0, sizeof *p);
}

bool hooks_sha_ok(const char *s)
{
	size_t n = s ? strlen(s) : 0;

	if (n != 40 && n != 64)
		return false;
	for (; *s; s++)
		if (!isxdigit((unsigned char)*s))
			return false;
	return true;
}

static void add_url(struct hooks_push *p, json_t *obj, const char *key)
{
	const char *v = json_string_value(json_object_get(obj, key));

	if (v && *v && strlen(v) <= HOOKS_MAX_URL && p->n_urls < HOOKS_MAX_URLS)
		p->urls[p->n_urls++] = kpl_strdup(v);
}

int hooks_parse_push(enum hooks_source src, const char *body, size_t len,
		     struct hooks_push *out, struct kpl_err *err)
{
	json_error_t jerr;
	json_t *root = json_loadb(body, len, 0, &jerr), *repo, *project;
	const char *ref, *after;
	int rc = 0;

	memset(out, 0, sizeof *out);
	if (!root || !json_is_object(root)) {
		rc = kpl_errf(err, KPL_EINVAL, "the body is not a JSON object%s%s",
			      root ? "" : ": ", root ? "" : jerr.text);
		goto out;
	}
	ref = json_string_value(json_object_get(root, "ref"));
	after = json_string_value(json_object_get(root, "after"));
	if (!ref || !*ref || strlen(ref) > 512) {
		rc = kpl_errf(err, KPL_EINVAL, "ref: missing or not a string");
		goto out;
	}
	if (!after || !hooks_sha_ok(after)) {
		rc = kpl_errf(err, KPL_EINVAL, "after: want a commit sha");
		goto out;
	}
	out->ref = kpl_strdup(ref);
	out->sha = kpl_strdup(after);
	lower(out->sha);
	{
		const char *before = json_string_value(json_object_get(root, "before"));
		out->before = kpl_strdup(before && hooks_sha_ok(before) ? before : "");
		lower(out->before);
	}
	if (strncmp(ref, "refs/heads/", 11) == 0 && ref[11])
		out->branch = kpl_strdup(ref + 11);
	out->deleted = strspn(after, "0") == strlen(after) ||
		       json_is_true(json_object_get(root, "deleted"));
	repo = json_object_get(root, "repository");
	if (src == HOOKS_GITHUB) {
		static const char *const keys[] = { "clone_url", "ssh_url", "git_url",
						    "html_url", "url", "svn_url" };
		for (size_t i = 0; i < KPL_ARRAY_SIZE(keys); i++)
			add_url(out, repo, keys[i]);
	} else {
		static const char *const pkeys[] = { "git_http_url", "git_ssh_url", "web_url",
						     "http_url", "ssh_url" };
		static const char *const rkeys[] = { "git_http_url", "git_ssh_url", "url",
						     "homepage" };
		project = json_object_get(root, "project");
		for (size_t i = 0; i < KPL_ARRAY_SIZE(pkeys); i++)
			add_url(out, project, pkeys[i]);
		for (size_t i = 0; i < KPL_ARRAY_SIZE(rkeys); i++)
			add_url(out, repo, rkeys[i]);
	}
	if (out->n_urls == 0)
		rc = kpl_errf(err, KPL_EINVAL, "%s: no repository URL",
			      src == HOOKS_GITHUB ? "repository" : "project");
out:
	if (rc)
		hooks_push_free(out);
	json_decref(root);
	return rc;
}

int hooks_push_key(enum hooks_source src, const char *repo, const struct hooks_push *p,
		   const char *name, char *out, size_t size)
{
	char key[HOOKS_MAX_URL + 1];
	const char *parts[6];
	unsigned char md[SHA256_DIGEST_LENGTH];
	EVP_MD_CTX *ctx;
	int n;

	if (hooks_repo_key(repo, key, sizeof key))
		return KPL_EINVAL;
	parts[0] = src == HOOKS_GITHUB ? "github" : "gitlab";
	parts[1] = key;
	parts[2] = p->ref ? p->ref : "";
	parts[3] = p->before ? p->before : "";
	parts[4] = p->sha ? p->sha : "";
	parts[5] = name;
	/* Each part with its NUL, so no two tuples hash the same text. */
	ctx = EVP_MD_CTX_new();
	if (!ctx || EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) != 1)
		BUG("hooks_push_key: no SHA-256");
	for (size_t i = 0; i < KPL_ARRAY_SIZE(parts); i++)
		EVP_DigestUpdate(ctx, parts[i], strlen(parts[i]) + 1);
	EVP_DigestFinal_ex(ctx, md, NULL);
	EVP_MD_CTX_free(ctx);
	n = snprintf(out, size, "hook:%s:", parts[0]);
	for (size_t i = 0; i < sizeof md && (size_t)n + 2 < size; i++)
		n += snprintf(out + n, size - (size_t)n, "%02x", md[i]);
	return 0;
}

/* ---------------------------------------------------------------------- */
/* Registration */

static bool name_ok(const char *s)
{
	size_t n = s ? strlen(s) : 0;

	if (n == 0 || n > KPL_MAX_NAME_LEN)
		return false;
	for (; *s; s++)
		if (!(islower((unsigned char)*s) || isdigit((unsigned char)*s) ||
		      strchr("._-", *s)))
			return false;
	return true;
}

static bool printable_no_space(const char *s)
{
	for (; *s; s++)
		if ((unsigned char)*s <= ' ' || *s == 0x7f)
			return false;
	return true;
}

static const char *secret_name_of(const char *s, char *buf, size_t size)
{
	/* "${{ secrets.NAME }}" is the name as pipelines write it. */
	const char *p = s;
	size_t n;

	if (strncmp(p, "${{", 3))
		return s;
	p += 3;
	while (*p == ' ')
		p++;
	if (strncmp(p, "secrets.", 8))
		return s;
	p += 8;
	n = strcspn(p, " }");
	if (n == 0 || n >= size)
		return s;
	memcpy(buf, p, n);
	buf[n] = '\0';
	p += n;
	while (*p == ' ')
		p++;
	return strcmp(p, "}}") == 0 ? buf : s;
}

/* The scheme's length if url is scheme://..., else 0. */
static size_t scheme_len(const char *url)
{
	const char *s = strstr(url, "://");

	return s && s > url && (size_t)(s - url) == strspn(url, "abcdefghijklmnopqrstuvwxyz"
								   "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
								   "0123456789+.-")
		       ? (size_t)(s - url)
		       : 0;
}

const char *hooks_repo_url_problem(const char *url)
{
	size_t sl = scheme_len(url), n;
	const char *auth, *end, *at;
	bool ssh;

	/* transport::address runs git-remote-transport: ext:: runs any
	 * command, fd:: reads kpld's descriptors. */
	n = strspn(url, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+.-");
	if (n && strncmp(url + n, "::", 2) == 0)
		return "a remote helper (ext::, fd::, ...) is not allowed: give a URL or a path";
	if (!sl)
		return NULL; /* a path, or scp-like user@host:path (an ssh user) */
	auth = url + sl + 3;
	end = auth + strcspn(auth, "/?#");
	at = memrchr(auth, '@', (size_t)(end - auth));
	if (!at)
		return NULL;
	ssh = (sl == 3 && strncasecmp(url, "ssh", 3) == 0) ||
	      (sl == 7 && (strncasecmp(url, "git+ssh", 7) == 0 ||
			   strncasecmp(url, "ssh+git", 7) == 0));
	/* ssh://git@host/... names an ssh user, not a secret; in any other
	 * scheme a user@ is a credential (https://TOKEN@host/...). */
	if (ssh && !memchr(auth, ':', (size_t)(at - auth)))
		return NULL;
	return "no credentials in the URL (user@ or user:password@; it would be stored, "
	       "listed and logged): give kpld's user a git credential helper or an ssh key";
}

void hooks_url_for_display(const char *url, char *out, size_t size)
{
	size_t sl = scheme_len(url);
	const char *auth, *end, *at;

	if (sl && hooks_repo_url_problem(url)) {
		auth = url + sl + 3;
		end = auth + strcspn(auth, "/?#");
		at = memrchr(auth, '@', (size_t)(end - auth));
		if (at) {
			snprintf(out, size, "%.*s***@%s", (int)(auth - url), url, at + 1);
			return;
		}
	}
	snprintf(out, size, "%s", url);
}

int hooks_check_registration(const Kpl__V1__RegisterPipelineRequest *req,
			     struct secrets *sec, Kpl__V1__RegisteredPipeline *rec,
			     char **branches_buf, struct kpl_err *err)
{
	static char default_branch[] = "main", default_path[] = ".kpl.yaml";
	static char secret_buf[80], token_buf[80];
	char key[HOOKS_MAX_URL + 1];
	const char *secret, *token, *why;
	int rc;

	if (!name_ok(req->name))
		return kpl_errf(err, KPL_EINVAL, "name: want 1 to %d of a-z, 0-9, '.', '_', '-'",
				KPL_MAX_NAME_LEN);
	if (req->repo && (why = hooks_repo_url_problem(req->repo)) != NULL)
		return kpl_errf(err, KPL_EINVAL, "repo: %s", why);
	if (!req->repo || !*req->repo || req->repo[0] == '-' ||
	    hooks_repo_key(req->repo, key, sizeof key))
		return kpl_errf(err, KPL_EINVAL,
				"repo: want https://host/path, ssh://host/path, "
				"user@host:path, file:///path or /path");
	if (req->n_branches > HOOKS_MAX_BRANCHES)
		return kpl_errf(err, KPL_EINVAL, "branches: at most %d", HOOKS_MAX_BRANCHES);
	for (size_t i = 0; i < req->n_branches; i++) {
		const char *b = req->branches[i];
		if (!b || !*b || strlen(b) > 255 || !printable_no_space(b) || b[0] == '-')
			return kpl_errf(err, KPL_EINVAL,
					"branches[%zu]: want a branch name or glob", i);
		branches_buf[i] = req->branches[i];
	}
	if (req->path && *req->path) {
		const char *p = req->path;
		if (strlen(p) > HOOKS_MAX_PATH || p[0] == '/' || !printable_no_space(p) ||
		    strcmp(p, "..") == 0 || strncmp(p, "../", 3) == 0 || strstr(p, "/../") ||
		    (strlen(p) >= 3 && strcmp(p + strlen(p) - 3, "/..") == 0))
			return kpl_errf(err, KPL_EINVAL,
					"path: want a file's path inside the repository");
	}
	secret = secret_name_of(req->secret ? req->secret : "", secret_buf, sizeof secret_buf);
	if (!*secret)
		return kpl_errf(err, KPL_EINVAL,
				"secret: required (the name of the secret holding the "
				"webhook key; SetSecret makes it)");
	if ((rc = secrets_check_name(secret, err)) != 0)
		return rc;
	if (!secrets_get(sec, secret))
		return kpl_errf(err, KPL_EINVAL, "secret: no secret %s (SetSecret makes it)",
				secret);
	token = secret_name_of(req->status_token ? req->status_token : "", token_buf,
			       sizeof token_buf);
	if (*token && (rc = secrets_check_name(token, NULL)) != 0)
		return kpl_errf(err, rc, "status_token: want a secret's name");
	if (*token && !secrets_get(sec, token))
		return kpl_errf(err, KPL_EINVAL, "status_token: no secret %s (SetSecret makes "
				"it: the forge API token commit statuses are sent with)", token);
	if (req->fork_secrets && !req->pull_requests)
		return kpl_errf(err, KPL_EINVAL, "fork_secrets: only with pull_requests");
	if (*token && !req->pull_requests)
		return kpl_errf(err, KPL_EINVAL, "status_token: only with pull_requests (statuses "
				"are sent for pull requests' runs)");
	kpl__v1__registered_pipeline__init(rec);
	rec->name = req->name;
	rec->repo = req->repo;
	if (req->n_branches) {
		rec->branches = branches_buf;
		rec->n_branches = req->n_branches;
	} else {
		branches_buf[0] = default_branch;
		rec->branches = branches_buf;
		rec->n_branches = 1;
	}
	rec->path = req->path && *req->path ? req->path : default_path;
	rec->secret = (char *)secret;
	rec->pull_requests = req->pull_requests;
	rec->fork_secrets = req->fork_secrets;
	rec->status_token = (char *)token;
	return 0;
}

/* ---------------------------------------------------------------------- */
/* The daemon side */

struct gitjob;

/* One registered pipeline a delivery starts a run of. */
struct target {
	char *name, *repo, *path;
	/* The run's idempotency key (hooks_push_key), and the key runs had
	 * before (hook:SOURCE:DELIVERY:NAME), still looked for. */
	char idem[STORE_MAX_IDEM_KEY_LEN + 1];
	char idem_delivery[STORE_MAX_IDEM_KEY_LEN + 1];
	char *cache;      /* the cache repository */
	int step;         /* enum step */
	int status;       /* 0 until done: 202, or the http status of the error */
	bool duplicate;
	char run_id[STORE_MAX_RUN_ID_LEN + 1];
	char *msg;        /* the error, for the answer and the log */
	char *text;       /* the pipeline file */
	size_t text_len;
	/* Pull requests: a fork's run gets no secrets (engine_source); the
	 * secret of the statuses' token, or NULL for none. */
	bool withhold;
	char *status_token;
	/* The stage templates its `uses:` name (reuse.h), read at the same
	 * commit one by one (STEP_READ_TPL reads tpl[n_read]); path and text
	 * owned. One that is not there is left out: the parser then says
	 * which line names it. */
	struct pl_file *tpl;
	size_t n_tpl, n_read;
};

/* STEP_RESOLVE (RunPipeline with a ref) comes before the others: git
 * ls-remote, then INIT or FETCH as for a push. */
enum step { STEP_INIT, STEP_FETCH, STEP_FETCH_BRANCH, STEP_READ, STEP_RESOLVE, STEP_READ_TPL,
	    STEP__LAST };

struct delivery {
	struct hooks *h;
	struct delivery *prev, *next;
	struct httpd_req *req;
	enum hooks_source src;
	char *id;
	struct hooks_push push;
	struct target *t;
	size_t n, cur;
	struct gitjob *job;    /* queued or running for t[cur] */
	bool in_engine;        /* engine_submit's callback is due */
	/* RunPipeline (src HOOKS_API): answered through cb, never req. */
	hooks_run_cb cb;
	void *cb_data;
	char *want_ref;        /* to resolve with ls-remote; NULL: sha given */
	char *fetch_spec;      /* fetched if the remote refuses a sha */
	char *idem;            /* the caller's idempotency key, or NULL */
	char **pnames, **pvalues; /* the caller's params, np of them */
	size_t np;
	/* A pull request (push then holds its ref, head sha and URLs). */
	enum forge_kind pr_kind;
	struct forge_pr *pr;
};

struct gitjob {
	struct hooks *h;
	struct delivery *d;   /* NULL once the delivery gave up on it */
	struct gitjob *next;  /* queue */
	char **argv;
	uv_process_t proc;
	uv_pipe_t out, err;
	uv_timer_t timer;
	int open_handles;
	bool started, exited, timed_out, over;
	bool closing; /* the process and timer handles are closing */
	int64_t exit_status;
	int term_signal;
	char *obuf;
	size_t olen;
	char etail[GIT_ERR_TAIL + 1];
	size_t elen;
};

struct hooks {
	uv_loop_t *loop;
	struct engine *eng;
	char *git_dir;      /* DATA_DIR/hooks/git */
	unsigned git_timeout_s;
	struct forge *forge;  /* commit statuses of pull requests' runs */
	struct httpd *httpd;
	/* + the console (api/web.h) + chat commands (engine/chatops.h) */
	struct httpd_route routes[4 + WEB_N_ROUTES + HOOKS_MAX_EXTRA_ROUTES];
	struct delivery *deliveries;
	struct gitjob *queue, *queue_tail, *running;
	char **env;
	bool stopping;
	bool httpd_open;
	int depth; /* inside job_finished */
	void (*done)(void *);
	void *done_data;
};

static const char *source_name(enum hooks_source s)
{
	return s == HOOKS_GITHUB ? "github" : s == HOOKS_GITLAB ? "gitlab" : "api";
}

static void delivery_step(struct delivery *d);
static void job_run_next(struct hooks *h);
static void hooks_maybe_done(struct hooks *h);

/* --- Answers --- */

static void delivery_free(struct delivery *d)
{
	struct hooks *h = d->h;

	if (d->prev)
		d->prev->next = d->next;
	else
		h->deliveries = d->next;
	if (d->next)
		d->next->prev = d->prev;
	for (size_t i = 0; i < d->n; i++) {
		free(d->t[i].name);
		free(d->t[i].repo);
		free(d->t[i].path);
		free(d->t[i].cache);
		free(d->t[i].msg);
		free(d->t[i].text);
		free(d->t[i].status_token);
		for (size_t k = 0; k < d->t[i].n_tpl; k++) {
			free((char *)d->t[i].tpl[k].path);
			free((char *)d->t[i].tpl[k].text);
		}
		free(d->t[i].tpl);
	}
	if (d->pr) {
		forge_pr_free(d->pr);
		free(d->pr);
	}
	free(d->t);
	free(d->id);
	free(d->want_ref);
	free(d->fetch_spec);
	free(d->idem);
	for (size_t i = 0; i < d->np; i++) {
		free(d->pnames[i]);
		free(d->pvalues[i]);
	}
	free(d->pnames);
	free(d->pvalues);
	hooks_push_free(&d->push);
	free(d);
	hooks_maybe_done(h);
}

static void answer(struct delivery *d, int status, const char *result, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
static void answer(struct delivery *d, int status, const char *result, const char *fmt, ...)
{
	char body[900];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(body, sizeof body, fmt, ap);
	va_end(ap);
	metrics_webhook(source_name(d->src), result);
	kpl_info(LOG, "%s delivery %s from %s: %d %s", source_name(d->src),
		 d->id ? d->id : "-", httpd_req_peer(d->req), status, body);
	httpd_respondf(d->req, status, "%s", body);
	d->req = NULL;
	delivery_free(d);
}

/* The KPL_E* code an RPC caller gets for a target's http status. */
static int code_of_status(int status)
{
	switch (status) {
	case 202: return 0;
	case 400: case 422: return KPL_EINVAL;
	case 404: return KPL_ENOTFOUND;
	case 502: case 503: return KPL_EUNAVAILABLE;
	default: return KPL_EINTERNAL;
	}
}

/* Every target is done: one line per target. */
static void delivery_finish(struct delivery *d)
{
	size_t cap = 256, len = 0;
	char *body;
	int status = 0, first_err = 0;
	bool fresh = false;
	const char *result;

	if (d->cb) {
		/* RunPipeline has one target. */
		struct target *t = &d->t[0];
		int code = code_of_status(t->status);

		d->cb(d->cb_data, code, code ? NULL : t->run_id,
		      code ? (t->msg ? t->msg : "failed") : NULL);
		delivery_free(d);
		return;
	}
	body = kpl_malloc(cap);
	body[0] = '\0';
	for (size_t i = 0; i < d->n; i++) {
		struct target *t = &d->t[i];
		char *line = t->status == 202 ?
			kpl_asprintf("%s %s%s\n", t->name, t->run_id,
				     t->duplicate ? " (delivery seen before)" : "") :
			kpl_asprintf("%s error: %s\n", t->name, t->msg ? t->msg : "failed");
		size_t n = strlen(line);

		if (len + n + 1 > cap) {
			cap = (len + n + 1) * 2;
			body = kpl_realloc(body, cap);
		}
		memcpy(body + len, line, n + 1);
		len += n;
		free(line);
		if (t->status == 202) {
			status = 202;
			fresh |= !t->duplicate;
		} else if (!first_err) {
			first_err = t->status;
		}
	}
	if (!status)
		status = first_err ? first_err : 500;
	result = status != 202 ? (status == 503 ? "unavailable" : "error") :
		 fresh ? "accepted" : "duplicate";
	metrics_webhook(source_name(d->src), result);
	kpl_info(LOG, "%s delivery %s (%s at %.12s): %d, %zu pipeline(s)", source_name(d->src),
		 d->id, d->push.ref, d->push.sha, status, d->n);
	httpd_respond(d->req, status, "text/plain; charset=utf-8", body, len);
	d->req = NULL;
	free(body);
	delivery_free(d);
}

static void target_fail(struct delivery *d, int status, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static void target_fail(struct delivery *d, int status, const char *fmt, ...)
{
	struct target *t = &d->t[d->cur];
	char msg[600];
	size_t n;
	char *red;
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	/* git's messages can quote a URL or a config value: no secret goes out. */
	red = secrets_redact(engine_secrets(d->h->eng), msg, strlen(msg), &n);
	t->status = status;
	t->msg = red ? red : kpl_strdup(msg);
	kpl_warn(LOG, "%s delivery %s: pipeline %s: %s", source_name(d->src), d->id, t->name,
		 t->msg);
	d->cur++;
	delivery_step(d);
}

/* --- git, one command at a time --- */

static void job_free(struct gitjob *j)
{
	for (size_t i = 0; j->argv && j->argv[i]; i++)
		free(j->argv[i]);
	free(j->argv);
	free(j->obuf);
	free(j);
}

static void job_finished(struct gitjob *j);

static void job_maybe_close(struct gitjob *j);

static void job_handle_closed(uv_handle_t *hd)
{
	struct gitjob *j = hd->data;

	if (--j->open_handles == 0)
		job_finished(j);
	else
		job_maybe_close(j);
}

static void job_maybe_close(struct gitjob *j)
{
	/* Both pipes at EOF (closed) and the process reaped: close the rest. */
	if (j->open_handles == 2 && j->exited && !j->closing) {
		j->closing = true;
		uv_timer_stop(&j->timer);
		uv_close((uv_handle_t *)&j->proc, job_handle_closed);
		uv_close((uv_handle_t *)&j->timer, job_handle_closed);
	}
}

static void job_alloc(uv_handle_t *hd, size_t suggested, uv_buf_t *buf)
{
	(void)hd;
	(void)suggested;
	buf->base = kpl_malloc(64 * 1024);
	buf->len = 64 * 1024;
}

static void job_kill(struct gitjob *j)
{
	if (j->started && !j->exited)
		uv_process_kill(&j->proc, SIGKILL);
}

static void job_read_out(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
	struct gitjob *j = s->data;

	if (nread > 0) {
		if (j->olen + (size_t)nread > HOOKS_MAX_FILE) {
			/* Over the limit: stop reading, stop git. */
			j->over = true;
			job_kill(j);
		} else {
			j->obuf = kpl_realloc(j->obuf, j->olen + (size_t)nread + 1);
			memcpy(j->obuf + j->olen, buf->base, (size_t)nread);
			j->olen += (size_t)nread;
			j->obuf[j->olen] = '\0';
		}
	}
	free(buf->base);
	if (nread < 0 || j->over) {
		uv_read_stop(s);
		if (!uv_is_closing((uv_handle_t *)s))
			uv_close((uv_handle_t *)s, job_handle_closed);
	}
}

static void job_read_err(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
	struct gitjob *j = s->data;

	if (nread > 0) {
		/* Keep the last bytes: git's last line says what went wrong. */
		for (ssize_t i = 0; i < nread; i++) {
			if (j->elen == GIT_ERR_TAIL) {
				memmove(j->etail, j->etail + 1, GIT_ERR_TAIL - 1);
				j->elen--;
			}
			j->etail[j->elen++] = buf->base[i];
		}
		j->etail[j->elen] = '\0';
	}
	free(buf->base);
	if (nread < 0) {
		uv_read_stop(s);
		if (!uv_is_closing((uv_handle_t *)s))
			uv_close((uv_handle_t *)s, job_handle_closed);
	}
}

static void job_exited(uv_process_t *p, int64_t status, int sig)
{
	struct gitjob *j = p->data;

	j->exited = true;
	j->exit_status = status;
	j->term_signal = sig;
	job_maybe_close(j);
}

static void job_timeout(uv_timer_t *t)
{
	struct gitjob *j = t->data;

	j->timed_out = true;
	job_kill(j);
}

static void job_start(struct hooks *h, struct gitjob *j)
{
	uv_process_options_t po;
	uv_stdio_container_t stdio[3];
	int rc;

	h->running = j;
	memset(&po, 0, sizeof po);
	uv_pipe_init(h->loop, &j->out, 0);
	uv_pipe_init(h->loop, &j->err, 0);
	uv_timer_init(h->loop, &j->timer);
	j->out.data = j->err.data = j->timer.data = j->proc.data = j;
	stdio[0].flags = UV_IGNORE;
	stdio[1].flags = UV_CREATE_PIPE | UV_WRITABLE_PIPE;
	stdio[1].data.stream = (uv_stream_t *)&j->out;
	stdio[2].flags = UV_CREATE_PIPE | UV_WRITABLE_PIPE;
	stdio[2].data.stream = (uv_stream_t *)&j->err;
	po.file = "git";
	po.args = j->argv;
	po.env = h->env;
	po.stdio = stdio;
	po.stdio_count = 3;
	po.exit_cb = job_exited;
	j->open_handles = 4; /* out, err, proc, timer */
	rc = uv_spawn(h->loop, &j->proc, &po);
	if (rc < 0) {
		snprintf(j->etail, sizeof j->etail, "cannot run git: %s", uv_strerror(rc));
		j->elen = strlen(j->etail);
		j->exited = true;
		j->exit_status = 127;
		j->closing = true;
		/* uv_spawn failed: the process handle still needs closing. */
		uv_close((uv_handle_t *)&j->out, job_handle_closed);
		uv_close((uv_handle_t *)&j->err, job_handle_closed);
		uv_close((uv_handle_t *)&j->proc, job_handle_closed);
		uv_close((uv_handle_t *)&j->timer, job_handle_closed);
		return;
	}
	j->started = true;
	uv_read_start((uv_stream_t *)&j->out, job_alloc, job_read_out);
	uv_read_start((uv_stream_t *)&j->err, job_alloc, job_read_err);
	uv_timer_start(&j->timer, job_timeout, (uint64_t)h->git_timeout_s * 1000, 0);
}

static void job_run_next(struct hooks *h)
{
	struct gitjob *j;

	while (!h->running && (j = h->queue)) {
		h->queue = j->next;
		if (!h->queue)
			h->queue_tail = NULL;
		if (!j->d) { /* given up while queued */
			job_free(j);
			continue;
		}
		job_start(h, j);
	}
}

static void job_queue(struct hooks *h, struct delivery *d, char **argv)
{
	struct gitjob *j = kpl_calloc(1, sizeof *j);

	j->h = h;
	j->d = d;
	j->argv = argv;
	d->job = j;
	if (h->queue_tail)
		h->queue_tail->next = j;
	else
		h->queue = j;
	h->queue_tail = j;
	job_run_next(h);
}

static char **git_argv(const char *first, ...)
{
	char **v = kpl_calloc(24, sizeof *v);
	size_t n = 0;
	const char *a;
	va_list ap;

	/* No prompt, no ext:: transport, whatever the user's config says. */
	v[n++] = kpl_strdup("git");
	v[n++] = kpl_strdup("-c");
	v[n++] = kpl_strdup("protocol.ext.allow=never");
	v[n++] = kpl_strdup("-c");
	v[n++] = kpl_strdup("core.askPass=");
	va_start(ap, first);
	for (a = first; a && n < 23; a = va_arg(ap, const char *))
		v[n++] = kpl_strdup(a);
	va_end(ap);
	return v;
}

static void target_job_done(struct delivery *d, struct gitjob *j);

static void job_finished(struct gitjob *j)
{
	struct hooks *h = j->h;
	struct delivery *d = j->d;

	if (h->running == j)
		h->running = NULL;
	/* Nothing below may free h: hooks_maybe_done waits for depth 0. */
	h->depth++;
	if (d) {
		d->job = NULL;
		target_job_done(d, j);
	}
	job_free(j);
	job_run_next(h);
	h->depth--;
	hooks_maybe_done(h);
}

/* --- One target's steps --- */

static void target_step(struct delivery *d);

/* What the forge needs to report target t's run of pull request d. */
static void watch_of(const struct delivery *d, const struct target *t, struct forge_watch *w)
{
	w->kind = d->pr_kind;
	w->status_repo = d->pr->status_repo;
	w->sha = d->pr->head_sha;
	w->ref = d->pr->head_branch;
	w->token_secret = t->status_token;
	w->pipeline = t->name;
}

/* engine_source.stage_with: the status record goes into the run's first
 * commit, so no crash leaves a stored run without it. */
static void stage_watch(void *data, const char *run_id)
{
	struct delivery *d = data;
	struct forge_watch w;

	watch_of(d, &d->t[d->cur], &w);
	forge_stage_watch(d->h->forge, run_id, &w);
}

static void target_submitted(void *data, int status, const char *run_id)
{
	struct delivery *d = data;
	struct target *t = &d->t[d->cur];

	d->in_engine = false;
	if (status) {
		t->status = 500;
		t->msg = kpl_asprintf("the run could not be stored: %s", kpl_strerror(status));
		kpl_error(LOG, "%s delivery %s: pipeline %s: %s", source_name(d->src), d->id,
			  t->name, t->msg);
	} else {
		t->status = 202;
		snprintf(t->run_id, sizeof t->run_id, "%s", run_id);
		kpl_info(LOG, "%s delivery %s: pipeline %s: run %s (%s at %s)",
			 source_name(d->src), d->id, t->name, run_id, d->push.ref, d->push.sha);
		if (d->pr && t->status_token && d->h->forge) {
			struct forge_watch w;
			watch_of(d, t, &w);
			forge_watch(d->h->forge, run_id, &w);
		}
	}
	d->cur++;
	delivery_step(d);
}

static void target_submit(struct delivery *d)
{
	struct target *t = &d->t[d->cur];
	struct kpl_err err = { 0 };
	struct pipeline *pl = NULL;
	const struct pl_kind *kinds;
	size_t n_kinds, np = 0;
	const char **names, **values;
	char pr_no[24];
	const char *push_have[][2] = {
		{ "ref", d->push.ref },
		{ "sha", d->push.sha },
		{ "branch", d->push.branch ? d->push.branch : "" },
		{ "repo", t->repo },
	};
	const char *pr_have[][2] = {
		{ "pr", pr_no },
		{ "head_sha", d->push.sha },
		{ "base_branch", d->pr ? d->pr->base_branch : "" },
		{ "head_branch", d->pr ? d->pr->head_branch : "" },
		{ "ref", d->push.ref },
		{ "sha", d->push.sha },
		{ "repo", t->repo },
	};
	const char *(*have)[2] = d->pr ? pr_have : push_have;
	size_t n_have = d->pr ? KPL_ARRAY_SIZE(pr_have) : KPL_ARRAY_SIZE(push_have);
	char shown[HOOKS_MAX_URL + 8];
	struct engine_source src = { 0 };
	int rc;

	/* The templates that were there (a missing one is left out). */
	struct pl_file *tpls = kpl_calloc(t->n_tpl + 1, sizeof *tpls);
	struct pl_files files = { tpls, 0 };
	for (size_t i = 0; i < t->n_tpl; i++)
		if (t->tpl[i].text)
			tpls[files.n++] = t->tpl[i];
	kinds = stage_kinds_for_parser(&n_kinds);
	if (pipeline_parse_files(t->text, t->text_len, t->path, &files, kinds, n_kinds, &pl,
				 &err)) {
		free(tpls);
		target_fail(d, 422, "%s", err.msg);
		return;
	}
	/* A token limited to pipeline P may RunPipeline P: the run must be
	 * P's, whatever the file at that commit says. */
	if (d->cb && strcmp(pl->name, t->name)) {
		target_fail(d, 422, "%s at %.12s is pipeline %s, registered as %s: RunPipeline "
			    "runs only a file of the registered name", t->path, d->push.sha,
			    pl->name, t->name);
		pipeline_free(pl);
		free(tpls);
		return;
	}
	snprintf(pr_no, sizeof pr_no, "%llu", d->pr ? (unsigned long long)d->pr->number : 0ULL);
	names = kpl_calloc(d->np + n_have, sizeof *names);
	values = kpl_calloc(d->np + n_have, sizeof *values);
	for (size_t i = 0; i < d->np; i++) {
		names[np] = d->pnames[i];
		values[np++] = d->pvalues[i];
	}
	/* Only params the pipeline declares (an undeclared one fails it), and
	 * not those the caller gave. */
	for (size_t i = 0; i < n_have; i++) {
		bool given = false;
		for (size_t k = 0; k < d->np; k++)
			given |= strcmp(d->pnames[k], have[i][0]) == 0;
		for (size_t k = 0; k < pl->n_params && !given; k++)
			if (strcmp(pl->params[k].name, have[i][0]) == 0) {
				names[np] = have[i][0];
				values[np++] = have[i][1];
			}
	}
	pipeline_free(pl);
	hooks_url_for_display(t->repo, shown, sizeof shown);
	src.repo = shown;
	src.commit = d->push.sha;
	src.path = t->path;
	src.ref = d->push.ref;
	src.secrets_withheld = t->withhold;
	src.files = &files;
	if (d->pr && t->status_token && d->h->forge) {
		src.stage_with = stage_watch;
		src.stage_with_data = d;
	}
	d->in_engine = true;
	rc = engine_submit_from(d->h->eng, t->text, t->text_len, names, values, np,
				d->cb ? d->idem : t->idem, &src, target_submitted, d, &err);
	free(names);
	free(values);
	free(tpls);
	if (rc) {
		d->in_engine = false;
		target_fail(d, err.code == KPL_EINVAL || err.code == KPL_ETOOBIG ? 422 : 500,
			    "%s", err.msg);
	}
}

/*
 * Picks d->want_ref's commit from git ls-remote's output ("SHA\tREF" lines):
 * a branch before a tag, an annotated tag's peeled commit ("REF^{}") before
 * the tag object. Sets push.sha, push.ref, push.branch (branches only) and
 * fetch_spec. KPL_ENOTFOUND if no line names it.
 */
static int resolve_ref(struct delivery *d, const char *out)
{
	char want[3][600];
	char best_sha[65] = "", best_ref[600] = "";
	int best = 99;

	if (strncmp(d->want_ref, "refs/", 5) == 0) {
		snprintf(want[0], sizeof want[0], "%s", d->want_ref);
		snprintf(want[1], sizeof want[1], "%s^{}", d->want_ref);
		want[2][0] = '\0';
	} else {
		snprintf(want[0], sizeof want[0], "refs/heads/%s", d->want_ref);
		snprintf(want[1], sizeof want[1], "refs/tags/%s^{}", d->want_ref);
		snprintf(want[2], sizeof want[2], "refs/tags/%s", d->want_ref);
	}
	for (const char *p = out; *p;) {
		size_t n = strcspn(p, "\n");
		const char *tab = memchr(p, '\t', n);

		if (tab && tab - p <= 64) {
			size_t rl = n - (size_t)(tab - p) - 1;
			for (int i = 0; i < 3; i++) {
				if (!want[i][0] || strlen(want[i]) != rl ||
				    memcmp(want[i], tab + 1, rl) || i >= best)
					continue;
				best = i;
				snprintf(best_sha, sizeof best_sha, "%.*s", (int)(tab - p), p);
				snprintf(best_ref, sizeof best_ref, "%s", want[i]);
			}
		}
		p += n + (p[n] ? 1 : 0);
	}
	if (best == 99 || !hooks_sha_ok(best_sha))
		return KPL_ENOTFOUND;
	/* The peeled line names the tag, not "^{}". */
	if (strlen(best_ref) > 3 && strcmp(best_ref + strlen(best_ref) - 3, "^{}") == 0)
		best_ref[strlen(best_ref) - 3] = '\0';
	free(d->push.sha);
	free(d->push.ref);
	free(d->push.branch);
	d->push.sha = kpl_strdup(best_sha);
	lower(d->push.sha);
	d->push.ref = kpl_strdup(best_ref);
	d->push.branch = strncmp(best_ref, "refs/heads/", 11) == 0 ? kpl_strdup(best_ref + 11)
								    : NULL;
	free(d->fetch_spec);
	d->fetch_spec = kpl_strdup(best_ref);
	return 0;
}

static void target_job_done(struct delivery *d, struct gitjob *j)
{
	struct target *t = &d->t[d->cur];
	bool ok = j->exited && j->exit_status == 0 && !j->term_signal && !j->timed_out &&
		  !j->over;
	char why[GIT_ERR_TAIL + 100];
	size_t n = j->elen;

	if (d->h->stopping) {
		target_fail(d, 503, "kpld is stopping");
		return;
	}
	while (n && (j->etail[n - 1] == '\n' || j->etail[n - 1] == '\r'))
		n--;
	/* The last line is git's reason ("fatal: ..."). */
	{
		size_t s = n;
		while (s && j->etail[s - 1] != '\n')
			s--;
		snprintf(why, sizeof why, "%.*s", (int)(n - s), j->etail + s);
	}
	if (j->timed_out)
		snprintf(why, sizeof why, "git took over %u s", d->h->git_timeout_s);
	switch (t->step) {
	case STEP_INIT:
		if (!ok) {
			target_fail(d, 500, "git init: %s", why);
			return;
		}
		t->step = STEP_FETCH;
		break;
	case STEP_FETCH:
		/* A remote that refuses a sha (no allowReachableSHA1InWant) is
		 * asked for the whole branch instead. */
		t->step = ok ? STEP_READ : STEP_FETCH_BRANCH;
		if (!ok)
			kpl_info(LOG, "pipeline %s: shallow fetch of %.12s failed (%s); "
				 "fetching %s", t->name, d->push.sha, why,
				 d->fetch_spec ? d->fetch_spec : d->push.branch);
		break;
	case STEP_RESOLVE:
		if (!ok) {
			char u[300];
			hooks_url_for_display(t->repo, u, sizeof u);
			target_fail(d, 502, "ref %s: git ls-remote %s: %s", d->want_ref, u, why);
			return;
		}
		if (resolve_ref(d, j->obuf ? j->obuf : "")) {
			char u[300];
			hooks_url_for_display(t->repo, u, sizeof u);
			target_fail(d, 404, "ref %s: no branch or tag of that name in %s",
				    d->want_ref, u);
			return;
		}
		{
			struct stat st;
			t->step = stat(t->cache, &st) == 0 ? STEP_FETCH : STEP_INIT;
		}
		break;
	case STEP_FETCH_BRANCH:
		if (!ok) {
			char u[300];
			hooks_url_for_display(t->repo, u, sizeof u);
			target_fail(d, 502, "git fetch %s: %s", u, why);
			return;
		}
		t->step = STEP_READ;
		break;
	case STEP_READ:
		if (j->over) {
			target_fail(d, 422, "%s at %.12s is over %d bytes", t->path, d->push.sha,
				    HOOKS_MAX_FILE);
			return;
		}
		if (!ok) {
			target_fail(d, 422, "no %s at %.12s: %s", t->path, d->push.sha, why);
			return;
		}
		t->text = j->obuf ? j->obuf : kpl_strdup("");
		t->text_len = j->olen;
		j->obuf = NULL;
		{
			char **paths = NULL;
			reuse_list_paths(t->text, t->text_len, &paths, &t->n_tpl);
			t->tpl = kpl_calloc(t->n_tpl + 1, sizeof *t->tpl);
			for (size_t i = 0; i < t->n_tpl; i++)
				t->tpl[i].path = paths[i];
			free(paths);
		}
		if (!t->n_tpl) {
			target_submit(d);
			return;
		}
		t->step = STEP_READ_TPL;
		break;
	case STEP_READ_TPL:
		if (j->over || (ok && j->olen > REUSE_MAX_FILE_BYTES)) {
			target_fail(d, 422, "template %s at %.12s is over %d bytes",
				    t->tpl[t->n_read].path, d->push.sha, REUSE_MAX_FILE_BYTES);
			return;
		}
		if (ok) {
			t->tpl[t->n_read].text = j->obuf ? j->obuf : kpl_strdup("");
			t->tpl[t->n_read].len = j->olen;
			j->obuf = NULL;
		}
		if (++t->n_read == t->n_tpl) {
			target_submit(d);
			return;
		}
		break;
	}
	target_step(d);
}

static void target_step(struct delivery *d)
{
	struct target *t = &d->t[d->cur];
	char *spec;
	char **argv;

	switch (t->step) {
	case STEP_INIT:
		job_queue(d->h, d, git_argv("init", "-q", "--bare", t->cache, NULL));
		return;
	case STEP_FETCH:
		job_queue(d->h, d, git_argv("-C", t->cache, "fetch", "-q", "--no-tags",
					    "--depth", "1", "--end-of-options", t->repo,
					    d->push.sha, NULL));
		return;
	case STEP_RESOLVE:
		if (strncmp(d->want_ref, "refs/", 5) == 0) {
			char *peeled = kpl_asprintf("%s^{}", d->want_ref);
			argv = git_argv("ls-remote", "--end-of-options", t->repo, d->want_ref,
					peeled, NULL);
			free(peeled);
		} else {
			char *h = kpl_asprintf("refs/heads/%s", d->want_ref);
			char *tg = kpl_asprintf("refs/tags/%s", d->want_ref);
			char *peeled = kpl_asprintf("refs/tags/%s^{}", d->want_ref);
			argv = git_argv("ls-remote", "--end-of-options", t->repo, h, tg, peeled,
					NULL);
			free(h);
			free(tg);
			free(peeled);
		}
		job_queue(d->h, d, argv);
		return;
	case STEP_FETCH_BRANCH:
		spec = d->fetch_spec ? kpl_strdup(d->fetch_spec)
				     : kpl_asprintf("refs/heads/%s", d->push.branch);
		job_queue(d->h, d, git_argv("-C", t->cache, "fetch", "-q", "--no-tags",
					    "--end-of-options", t->repo, spec, NULL));
		free(spec);
		return;
	case STEP_READ:
		spec = kpl_asprintf("%s:%s", d->push.sha, t->path);
		argv = git_argv("-C", t->cache, "cat-file", "blob", spec, NULL);
		free(spec);
		job_queue(d->h, d, argv);
		return;
	case STEP_READ_TPL: {
		/* Beside the pipeline file: its directory, then the path. */
		const char *slash = strrchr(t->path, '/');
		spec = kpl_asprintf("%s:%.*s%s", d->push.sha,
				    slash ? (int)(slash - t->path) + 1 : 0, t->path,
				    t->tpl[t->n_read].path);
		argv = git_argv("-C", t->cache, "cat-file", "blob", spec, NULL);
		free(spec);
		job_queue(d->h, d, argv);
		return;
	}
	}
	BUG("target_step: step %d", t->step);
}

static void cache_dir(struct hooks *h, const char *repo, char **out)
{
	unsigned char md[SHA256_DIGEST_LENGTH];
	char hex[17];

	SHA256((const unsigned char *)repo, strlen(repo), md);
	for (int i = 0; i < 8; i++)
		snprintf(hex + 2 * i, 3, "%02x", md[i]);
	*out = kpl_asprintf("%s/%s.git", h->git_dir, hex);
}

/* True if key is in the idem db, per pipeline or as before (store.h). */
static bool idem_seen(struct hooks *h, const char *key, char **run_id)
{
	struct store *s = engine_store(h->eng);

	return store_find_idem_any(s, key, run_id) == 0 || store_find_idem(s, key, run_id) == 0;
}

/* Starts the next target, or answers once every target is done. */
static void delivery_step(struct delivery *d)
{
	struct target *t;
	char *run_id = NULL;
	struct stat st;

	if (d->cur == d->n) {
		delivery_finish(d);
		return;
	}
	t = &d->t[d->cur];
	if (d->h->stopping) {
		target_fail(d, 503, "kpld is stopping");
		return;
	}
	/* Seen before (this push, whatever its delivery id; or this delivery
	 * under the key of before): no fetch, the same run. The engine keeps
	 * keys per pipeline, and the file's pipeline name is known only once
	 * fetched; but "hook:" keys are kpld's own (SubmitRun refuses them),
	 * so any pipeline's entry is this push's. */
	if (!d->cb &&
	    (idem_seen(d->h, t->idem, &run_id) || idem_seen(d->h, t->idem_delivery, &run_id))) {
		t->status = 202;
		t->duplicate = true;
		snprintf(t->run_id, sizeof t->run_id, "%s", run_id);
		free(run_id);
		d->cur++;
		delivery_step(d);
		return;
	}
	cache_dir(d->h, t->repo, &t->cache);
	t->step = d->want_ref ? STEP_RESOLVE : stat(t->cache, &st) == 0 ? STEP_FETCH : STEP_INIT;
	target_step(d);
}

/* --- The webhook handler --- */

struct reg {
	Kpl__V1__RegisteredPipeline **v;
	size_t n, cap;
};

static int collect_reg(void *data, const Kpl__V1__RegisteredPipeline *rec)
{
	struct reg *r = data;
	size_t len = kpl__v1__registered_pipeline__get_packed_size(rec);
	uint8_t *buf = kpl_malloc(len ? len : 1);

	if (r->n == r->cap) {
		r->cap = r->cap ? r->cap * 2 : 8;
		r->v = kpl_realloc(r->v, r->cap * sizeof *r->v);
	}
	kpl__v1__registered_pipeline__pack(rec, buf);
	r->v[r->n] = kpl__v1__registered_pipeline__unpack(NULL, len, buf);
	free(buf);
	if (!r->v[r->n])
		return KPL_ECORRUPT;
	r->n++;
	return 0;
}

static void reg_free(struct reg *r)
{
	for (size_t i = 0; i < r->n; i++)
		kpl__v1__registered_pipeline__free_unpacked(r->v[i], NULL);
	free(r->v);
}

static bool id_ok(const char *s)
{
	size_t n = strlen(s);

	if (n == 0 || n > HOOKS_MAX_DELIVERY_ID)
		return false;
	for (; *s; s++)
		if ((unsigned char)*s <= ' ' || *s == 0x7f)
			return false;
	return true;
}

static bool repo_matches(const char *registered, const struct hooks_push *p)
{
	char a[HOOKS_MAX_URL + 1], b[HOOKS_MAX_URL + 1];

	if (hooks_repo_key(registered, a, sizeof a))
		return false;
	for (size_t i = 0; i < p->n_urls; i++)
		if (hooks_repo_key(p->urls[i], b, sizeof b) == 0 && strcmp(a, b) == 0)
			return true;
	return false;
}

/*
 * A verified pull (merge) request delivery: a run for each registration
 * verified[i] with pull_requests of its repository that watches its base
 * branch, at its head commit, fetched from the base repository (the
 * request's ref there has a fork's commits too).
 */
static void on_pull_request(struct delivery *d, const char *body, size_t len,
			    const struct reg *reg, const bool *verified)
{
	struct forge_pr *pr = kpl_calloc(1, sizeof *pr);
	struct kpl_err err = { 0 };
	char ignored[200];
	int rc;

	d->pr_kind = d->src == HOOKS_GITHUB ? FORGE_GITHUB : FORGE_GITLAB;
	rc = forge_parse_pr(d->pr_kind, body, len, pr, ignored, sizeof ignored, &err);
	if (rc) {
		free(pr);
		if (rc > 0)
			answer(d, 200, "ignored", "%s", ignored);
		else
			answer(d, 400, "bad_request", "%s", err.msg);
		return;
	}
	d->pr = pr;
	d->push.ref = kpl_strdup(pr->ref);
	d->push.sha = kpl_strdup(pr->head_sha);
	d->push.before = kpl_strdup("");
	for (size_t i = 0; i < pr->n_urls; i++)
		d->push.urls[d->push.n_urls++] = kpl_strdup(pr->urls[i]);
	/* A remote that refuses a sha: the request's ref holds it. */
	d->fetch_spec = kpl_strdup(pr->ref);
	if (!d->id)
		d->id = kpl_asprintf("%s@%s", pr->head_sha, pr->ref);
	for (size_t i = 0; i < reg->n; i++) {
		Kpl__V1__RegisteredPipeline *r = reg->v[i];
		bool branch = false;
		struct target *t;

		if (!verified[i] || !r->pull_requests || !repo_matches(r->repo, &d->push))
			continue;
		for (size_t b = 0; b < r->n_branches && !branch; b++)
			branch = hooks_branch_match(r->branches[b], pr->base_branch);
		if (!branch)
			continue;
		d->t = kpl_realloc(d->t, (d->n + 1) * sizeof *d->t);
		t = &d->t[d->n++];
		memset(t, 0, sizeof *t);
		t->name = kpl_strdup(r->name);
		t->repo = kpl_strdup(r->repo);
		t->path = kpl_strdup(r->path && *r->path ? r->path : ".kpl.yaml");
		t->withhold = pr->fork && !r->fork_secrets;
		if (r->status_token && *r->status_token)
			t->status_token = kpl_strdup(r->status_token);
		snprintf(t->idem_delivery, sizeof t->idem_delivery, "hook:%s:%s:%s",
			 source_name(d->src), d->id, r->name);
		if (forge_pr_key(d->pr_kind, r->repo, pr, r->name, t->idem, sizeof t->idem))
			BUG("forge_pr_key: registered repo %s is not a URL", r->name);
	}
	if (d->n == 0) {
		answer(d, 200, "ignored", "no registered pipeline takes pull requests into %s of "
		       "this repository (pull_requests: true, a branch matching it)",
		       pr->base_branch);
		return;
	}
	kpl_info(LOG, "%s delivery %s: pull request %llu (%s, %s into %s%s) at %.12s",
		 source_name(d->src), d->id, (unsigned long long)pr->number, pr->action,
		 pr->head_branch, pr->base_branch, pr->fork ? ", from a fork" : "", pr->head_sha);
	delivery_step(d);
}

static void on_hook(struct httpd_req *req, enum hooks_source src, struct hooks *h)
{
	struct delivery *d = kpl_calloc(1, sizeof *d);
	struct secrets *sec = engine_secrets(h->eng);
	struct reg reg = { 0 };
	bool *verified = NULL, any = false;
	const char *body, *event, *id, *sig;
	size_t len;
	struct kpl_err err = { 0 };
	int rc;

	d->h = h;
	d->req = req;
	d->src = src;
	d->next = h->deliveries;
	if (h->deliveries)
		h->deliveries->prev = d;
	h->deliveries = d;
	body = httpd_req_body(req, &len);
	if (src == HOOKS_GITHUB) {
		event = httpd_req_header(req, "X-GitHub-Event");
		id = httpd_req_header(req, "X-GitHub-Delivery");
		sig = httpd_req_header(req, "X-Hub-Signature-256");
	} else {
		event = httpd_req_header(req, "X-Gitlab-Event");
		/* Idempotency-Key is stable across GitLab's retries of one
		 * event; X-Gitlab-Webhook-UUID (one per request) is the
		 * fallback for older GitLab. Not X-Gitlab-Event-UUID: GitLab
		 * reuses it along a chain of hook-triggered events. */
		id = httpd_req_header(req, "Idempotency-Key");
		if (!id)
			id = httpd_req_header(req, "X-Gitlab-Webhook-UUID");
		sig = httpd_req_header(req, "X-Gitlab-Token");
	}
	if (id && id_ok(id))
		d->id = kpl_strdup(id);
	if (h->stopping) {
		answer(d, 503, "unavailable", "kpld is stopping");
		return;
	}
	if (!sig) {
		answer(d, 401, "unauthorized", "unauthorized: no %s",
		       src == HOOKS_GITHUB ? "X-Hub-Signature-256" : "X-Gitlab-Token");
		return;
	}
	if ((rc = store_list_registered(engine_store(h->eng), collect_reg, &reg)) != 0) {
		reg_free(&reg);
		answer(d, 500, "error", "cannot read the registered pipelines: %s",
		       kpl_strerror(rc));
		return;
	}
	verified = kpl_calloc(reg.n ? reg.n : 1, sizeof *verified);
	for (size_t i = 0; i < reg.n; i++) {
		const char *key = secrets_get(sec, reg.v[i]->secret);
		verified[i] = key && (src == HOOKS_GITHUB ? hooks_github_verify(key, body, len, sig)
							  : hooks_gitlab_verify(key, sig));
		any |= verified[i];
	}
	if (!any) {
		answer(d, 401, "unauthorized", "unauthorized");
		goto out;
	}
	if (!d->id) {
		if (id) {
			answer(d, 400, "bad_request", "the delivery id is over %d characters or "
			       "not printable", HOOKS_MAX_DELIVERY_ID);
			goto out;
		}
		/* No delivery id: the push itself is the event. */
	}
	if (src == HOOKS_GITHUB && event && strcmp(event, "ping") == 0) {
		answer(d, 200, "ping", "pong");
		goto out;
	}
	if (event &&
	    strcmp(event, src == HOOKS_GITHUB ? "pull_request" : "Merge Request Hook") == 0) {
		on_pull_request(d, body, len, &reg, verified);
		goto out;
	}
	if (!event || strcmp(event, src == HOOKS_GITHUB ? "push" : "Push Hook") != 0) {
		answer(d, 204, "ignored", "event %s ignored", event ? event : "(none)");
		goto out;
	}
	if (hooks_parse_push(src, body, len, &d->push, &err)) {
		answer(d, 400, "bad_request", "%s", err.msg);
		goto out;
	}
	if (!d->id)
		d->id = kpl_asprintf("%s@%s", d->push.sha, d->push.ref);
	if (d->push.deleted || !d->push.branch) {
		answer(d, 204, "ignored", "%s %s: nothing to run",
		       d->push.deleted ? "deleted" : "not a branch:", d->push.ref);
		goto out;
	}
	for (size_t i = 0; i < reg.n; i++) {
		Kpl__V1__RegisteredPipeline *r = reg.v[i];
		bool branch = false;
		struct target *t;

		if (!verified[i] || !repo_matches(r->repo, &d->push))
			continue;
		for (size_t b = 0; b < r->n_branches && !branch; b++)
			branch = hooks_branch_match(r->branches[b], d->push.branch);
		if (!branch)
			continue;
		d->t = kpl_realloc(d->t, (d->n + 1) * sizeof *d->t);
		t = &d->t[d->n++];
		memset(t, 0, sizeof *t);
		t->name = kpl_strdup(r->name);
		t->repo = kpl_strdup(r->repo);
		t->path = kpl_strdup(r->path && *r->path ? r->path : ".kpl.yaml");
		snprintf(t->idem_delivery, sizeof t->idem_delivery, "hook:%s:%s:%s",
			 source_name(src), d->id, r->name);
		/* repo_matches took r->repo as a repository URL. */
		if (hooks_push_key(src, r->repo, &d->push, r->name, t->idem, sizeof t->idem))
			BUG("hooks_push_key: registered repo %s is not a URL", r->name);
	}
	if (d->n == 0) {
		answer(d, 204, "ignored", "no registered pipeline watches %s of this repository",
		       d->push.ref);
		goto out;
	}
	delivery_step(d);
out:
	free(verified);
	reg_free(&reg);
}

static void on_github(struct httpd_req *req, void *data)
{
	on_hook(req, HOOKS_GITHUB, data);
}

static void on_gitlab(struct httpd_req *req, void *data)
{
	on_hook(req, HOOKS_GITLAB, data);
}

static void on_metrics(struct httpd_req *req, void *data)
{
	struct hooks *h = data;
	size_t len;
	char *text = metrics_render(engine_active_runs(h->eng), &len);

	httpd_respond(req, 200, "text/plain; version=0.0.4; charset=utf-8", text, len);
	free(text);
}

static void on_healthz(struct httpd_req *req, void *data)
{
	struct hooks *h = data;

	if (h->stopping)
		httpd_respondf(req, 503, "stopping");
	else
		httpd_respondf(req, 200, "ok");
}


/* --- RunPipeline --- */

/* The registration's first branch that is not a glob, or NULL. */
static const char *plain_branch(const Kpl__V1__RegisteredPipeline *r)
{
	for (size_t i = 0; i < r->n_branches; i++)
		if (r->branches[i] && *r->branches[i] && !strpbrk(r->branches[i], "*?["))
			return r->branches[i];
	return NULL;
}

int hooks_run_pipeline(struct hooks *h, const struct hooks_run *rq, hooks_run_cb cb,
		       void *data, struct kpl_err *err)
{
	Kpl__V1__RegisteredPipeline *r = NULL;
	struct delivery *d;
	struct target *t;
	const char *ref = rq->ref && *rq->ref ? rq->ref : NULL;
	const char *sha = rq->sha && *rq->sha ? rq->sha : NULL;
	int rc;

	if (h->stopping)
		return kpl_errf(err, KPL_EUNAVAILABLE, "kpld is stopping");
	if (!name_ok(rq->name))
		return kpl_errf(err, KPL_EINVAL, "name: want 1 to %d of a-z, 0-9, '.', '_', '-'",
				KPL_MAX_NAME_LEN);
	if (ref && sha)
		return kpl_errf(err, KPL_EINVAL, "ref and sha: give one of them, not both");
	if (sha && !hooks_sha_ok(sha))
		return kpl_errf(err, KPL_EINVAL, "sha: want a commit's 40 (or 64) hex digits");
	if (ref && (strlen(ref) > 255 || !printable_no_space(ref) || ref[0] == '-' ||
		    strstr(ref, "..") || strpbrk(ref, "*?[\\^~:")))
		return kpl_errf(err, KPL_EINVAL, "ref: want a branch or tag name, like main "
				"or v1.2 (or refs/heads/main)");
	if (rq->idem_key && strncmp(rq->idem_key, "hook:", 5) == 0)
		return kpl_errf(err, KPL_EINVAL, "idempotency_key: keys starting with \"hook:\" "
				"are kpld's own (webhook deliveries)");
	rc = store_get_registered(engine_store(h->eng), rq->name, &r);
	if (rc == KPL_ENOTFOUND)
		return kpl_errf(err, KPL_ENOTFOUND, "no registered pipeline %s "
				"(kplctl pipeline register makes one)", rq->name);
	if (rc)
		return kpl_errf(err, rc, "cannot read registered pipeline %s: %s", rq->name,
				kpl_strerror(rc));
	if (!ref && !sha && !(ref = plain_branch(r))) {
		kpl__v1__registered_pipeline__free_unpacked(r, NULL);
		return kpl_errf(err, KPL_EINVAL, "ref or sha: required (pipeline %s watches "
				"only branch patterns)", rq->name);
	}
	d = kpl_calloc(1, sizeof *d);
	d->h = h;
	d->src = HOOKS_API;
	d->cb = cb;
	d->cb_data = data;
	d->id = kpl_asprintf("RunPipeline %s@%s", rq->name, ref ? ref : sha);
	if (ref) {
		d->want_ref = kpl_strdup(ref);
	} else {
		d->push.sha = kpl_strdup(sha);
		lower(d->push.sha);
		d->push.ref = kpl_strdup("");
		/* A remote that refuses a sha: every branch, one may hold it. */
		d->fetch_spec = kpl_strdup("+refs/heads/*:refs/kpl/heads/*");
	}
	if (rq->idem_key && *rq->idem_key)
		d->idem = kpl_strdup(rq->idem_key);
	d->np = rq->n_params;
	d->pnames = kpl_calloc(d->np ? d->np : 1, sizeof *d->pnames);
	d->pvalues = kpl_calloc(d->np ? d->np : 1, sizeof *d->pvalues);
	for (size_t i = 0; i < d->np; i++) {
		d->pnames[i] = kpl_strdup(rq->param_names[i] ? rq->param_names[i] : "");
		d->pvalues[i] = kpl_strdup(rq->param_values[i] ? rq->param_values[i] : "");
	}
	d->t = kpl_calloc(1, sizeof *d->t);
	d->n = 1;
	t = &d->t[0];
	t->name = kpl_strdup(r->name);
	t->repo = kpl_strdup(r->repo);
	t->path = kpl_strdup(r->path && *r->path ? r->path : ".kpl.yaml");
	kpl__v1__registered_pipeline__free_unpacked(r, NULL);
	d->next = h->deliveries;
	if (h->deliveries)
		h->deliveries->prev = d;
	h->deliveries = d;
	kpl_info(LOG, "%s: starting", d->id);
	delivery_step(d);
	return 0;
}

/* ---------------------------------------------------------------------- */
/* Life cycle */

static int mkdir_p(const char *dir, struct kpl_err *err)
{
	char *p = kpl_strdup(dir);

	for (char *s = p + 1; *s; s++) {
		if (*s != '/')
			continue;
		*s = '\0';
		if (mkdir(p, 0700) && errno != EEXIST) {
			kpl_errf(err, KPL_EIO, "mkdir %s: %s", p, strerror(errno));
			free(p);
			return KPL_EIO;
		}
		*s = '/';
	}
	if (mkdir(p, 0700) && errno != EEXIST) {
		kpl_errf(err, KPL_EIO, "mkdir %s: %s", p, strerror(errno));
		free(p);
		return KPL_EIO;
	}
	free(p);
	return 0;
}

static char **make_env(void)
{
	size_t n = 0, k = 0;
	char **env;

	while (environ[n])
		n++;
	env = kpl_calloc(n + 4, sizeof *env);
	for (size_t i = 0; i < n; i++)
		if (strncmp(environ[i], "GIT_TERMINAL_PROMPT=", 20) &&
		    strncmp(environ[i], "LC_ALL=", 7) && strncmp(environ[i], "GIT_DIR=", 8))
			env[k++] = kpl_strdup(environ[i]);
	env[k++] = kpl_strdup("GIT_TERMINAL_PROMPT=0");
	env[k++] = kpl_strdup("LC_ALL=C");
	return env;
}

int hooks_start(const struct hooks_options *opt, struct hooks **out, struct kpl_err *err)
{
	struct hooks *h = kpl_calloc(1, sizeof *h);
	struct httpd_options ho = { 0 };
	int rc;

	*out = NULL;
	h->loop = opt->loop;
	h->eng = opt->eng;
	h->forge = opt->forge;
	h->git_timeout_s = opt->git_timeout_s ? opt->git_timeout_s : DEFAULT_GIT_TIMEOUT_S;
	h->git_dir = kpl_asprintf("%s/hooks/git", opt->data_dir);
	if ((rc = mkdir_p(h->git_dir, err)) != 0)
		goto fail;
	h->env = make_env();
	if (!opt->listen) {
		*out = h;
		return 0;
	}
	h->routes[0] = (struct httpd_route){ "POST", "/hooks/github", on_github, h };
	h->routes[1] = (struct httpd_route){ "POST", "/hooks/gitlab", on_gitlab, h };
	h->routes[2] = (struct httpd_route){ "GET", "/metrics", on_metrics, h };
	h->routes[3] = (struct httpd_route){ "GET", "/healthz", on_healthz, h };
	web_routes(&h->routes[4]);
	ho.listen = opt->listen;
	ho.request_timeout_ms = opt->request_timeout_ms;
	ho.max_per_address = opt->max_per_address;
	ho.max_connections = opt->max_connections;
	ho.tls_cert_file = opt->tls_cert_file;
	ho.tls_key_file = opt->tls_key_file;
	if (opt->n_extra_routes > HOOKS_MAX_EXTRA_ROUTES)
		BUG("%zu extra routes", opt->n_extra_routes);
	for (size_t i = 0; i < opt->n_extra_routes; i++)
		h->routes[4 + WEB_N_ROUTES + i] = opt->extra_routes[i];
	ho.routes = h->routes;
	ho.n_routes = 4 + WEB_N_ROUTES + opt->n_extra_routes;
	if ((rc = httpd_start(h->loop, &ho, &h->httpd, err)) != 0)
		goto fail;
	h->httpd_open = true;
	*out = h;
	return 0;
fail:
	for (size_t i = 0; h->env && h->env[i]; i++)
		free(h->env[i]);
	free(h->env);
	free(h->git_dir);
	free(h);
	return rc;
}

int hooks_port(struct hooks *h)
{
	return h->httpd ? httpd_port(h->httpd) : 0;
}

static void hooks_maybe_done(struct hooks *h)
{
	void (*done)(void *);
	void *data;

	if (!h->stopping || h->depth || h->httpd_open || h->deliveries || h->running ||
	    h->queue)
		return;
	done = h->done;
	data = h->done_data;
	for (size_t i = 0; h->env && h->env[i]; i++)
		free(h->env[i]);
	free(h->env);
	free(h->git_dir);
	free(h);
	if (done)
		done(data);
}

static void httpd_stopped(void *data)
{
	struct hooks *h = data;

	h->httpd_open = false;
	hooks_maybe_done(h);
}

void hooks_stop(struct hooks *h, void (*done)(void *data), void *data)
{
	struct gitjob *j, *next;

	h->stopping = true;
	h->done = done;
	h->done_data = data;
	/* Queued git commands never start; their deliveries are answered 503
	 * as they come to them. The running one is killed, its delivery
	 * carries on (to 503s) when its handles have closed. */
	for (j = h->queue; j; j = next) {
		struct delivery *d = j->d;
		next = j->next;
		j->d = NULL;
		if (d) {
			d->job = NULL;
			target_fail(d, 503, "kpld is stopping");
		}
	}
	for (j = h->queue; j; j = next) {
		next = j->next;
		job_free(j);
	}
	h->queue = h->queue_tail = NULL;
	if (h->running)
		job_kill(h->running);
	if (h->httpd)
		httpd_stop(h->httpd, httpd_stopped, h);
	else
		hooks_maybe_done(h);
}

/* ---------------------------------------------------------------------- */

static int seed_one(void *data, const Kpl__Store__V1__RunRecord *rec)
{
	(void)data;
	if (rec->run)
		metrics_seed_run(rec->run->state);
	return 0;
}

void hooks_seed_metrics(struct store *s)
{
	int rc = store_list_active(s, seed_one, NULL);

	if (rc)
		kpl_warn(LOG, "metrics: cannot read the active runs: %s", kpl_strerror(rc));
}
