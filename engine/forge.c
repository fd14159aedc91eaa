/*
 * forge.c - pull request payloads, and commit statuses sent back to GitHub
 * and GitLab (forge.h).
 *
 * An entry's life: forge_watch (or a record left by the last kpld) makes
 * it, subscribed to its run's commits; pump reads the run's durable state
 * and sends what the record owes (pending, then the final state), one
 * request at a time; each delivered state is written to the record; once
 * the final state is delivered (or given up) the record is deleted and the
 * entry freed.
 */
#define _GNU_SOURCE /* strcasestr */
#include "engine/forge.h"

#include <ctype.h>
#include <inttypes.h>
#include <jansson.h>
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "engine/hooks.h"
#include "engine/secrets.h"
#include "base/http.h"

#define LOG "forge"

const char *forge_kind_name(enum forge_kind k)
{
	switch (k) {
	case FORGE_GITHUB: return "github";
	case FORGE_GITLAB: return "gitlab";
	default: return "unknown";
	}
}

static int kind_parse(const char *s)
{
	for (int k = 0; k < FORGE__LAST; k++)
		if (s && strcmp(s, forge_kind_name(k)) == 0)
			return k;
	return -1;
}

/* ---------------------------------------------------------------------- */
/* Payloads */

static void lower(char *s)
{
	for (; *s; s++)
		*s = (char)tolower((unsigned char)*s);
}

/* A branch name as a payload gives it: printable, no space, not empty. */
static bool branch_ok(const char *s)
{
	size_t n = s ? strlen(s) : 0;

	if (n == 0 || n > 255)
		return false;
	for (; *s; s++)
		if ((unsigned char)*s <= ' ' || *s == 0x7f)
			return false;
	return true;
}

void forge_pr_free(struct forge_pr *pr)
{
	free(pr->action);
	free(pr->head_sha);
	free(pr->head_branch);
	free(pr->base_branch);
	free(pr->before);
	free(pr->updated_at);
	free(pr->status_repo);
	free(pr->ref);
	for (size_t i = 0; i < pr->n_urls; i++)
		free(pr->urls[i]);
	memset(pr, 0, sizeof *pr);
}

static void add_url(struct forge_pr *pr, json_t *obj, const char *key)
{
	const char *v = json_string_value(json_object_get(obj, key));

	if (v && *v && strlen(v) <= HOOKS_MAX_URL && pr->n_urls < FORGE_MAX_URLS)
		pr->urls[pr->n_urls++] = kpl_strdup(v);
}

static const char *str_or_empty(json_t *obj, const char *key)
{
	const char *v = json_string_value(json_object_get(obj, key));

	return v && strlen(v) <= 100 ? v : "";
}

/* A positive JSON integer (or a string of digits, as some proxies send). */
static bool positive(json_t *v, uint64_t *out)
{
	if (json_is_integer(v) && json_integer_value(v) > 0) {
		*out = (uint64_t)json_integer_value(v);
		return true;
	}
	return false;
}

static int parse_github(json_t *root, struct forge_pr *pr, char *ignored, size_t isize,
			struct kpl_err *err)
{
	static const char *const keys[] = { "clone_url", "ssh_url", "git_url", "html_url", "url",
					    "svn_url" };
	json_t *p = json_object_get(root, "pull_request"), *head, *base, *repo, *hrepo, *brepo;
	const char *action = json_string_value(json_object_get(root, "action"));
	const char *sha, *href, *bref, *full, *before;

	if (!action)
		return kpl_errf(err, KPL_EINVAL, "action: missing or not a string");
	if (strcmp(action, "opened") && strcmp(action, "synchronize") &&
	    strcmp(action, "reopened")) {
		snprintf(ignored, isize, "action %.40s starts no run (opened, synchronize and "
			 "reopened do)", action);
		return 1;
	}
	if (!json_is_object(p))
		return kpl_errf(err, KPL_EINVAL, "pull_request: missing or not an object");
	if (!positive(json_object_get(root, "number"), &pr->number) &&
	    !positive(json_object_get(p, "number"), &pr->number))
		return kpl_errf(err, KPL_EINVAL, "number: want a positive integer");
	head = json_object_get(p, "head");
	base = json_object_get(p, "base");
	sha = json_string_value(json_object_get(head, "sha"));
	href = json_string_value(json_object_get(head, "ref"));
	bref = json_string_value(json_object_get(base, "ref"));
	if (!hooks_sha_ok(sha))
		return kpl_errf(err, KPL_EINVAL, "pull_request.head.sha: want a commit sha");
	if (!branch_ok(href))
		return kpl_errf(err, KPL_EINVAL, "pull_request.head.ref: want a branch name");
	if (!branch_ok(bref))
		return kpl_errf(err, KPL_EINVAL, "pull_request.base.ref: want a branch name");
	repo = json_object_get(root, "repository");
	full = json_string_value(json_object_get(repo, "full_name"));
	if (!full || !*full || strlen(full) > 200)
		return kpl_errf(err, KPL_EINVAL, "repository.full_name: missing");
	/* A deleted fork leaves head.repo null: a fork all the same. */
	hrepo = json_object_get(head, "repo");
	brepo = json_object_get(base, "repo");
	if (!json_is_object(brepo))
		brepo = repo;
	if (!json_is_object(hrepo)) {
		pr->fork = true;
	} else {
		json_t *hid = json_object_get(hrepo, "id"), *bid = json_object_get(brepo, "id");
		const char *hn = json_string_value(json_object_get(hrepo, "full_name"));
		const char *bn = json_string_value(json_object_get(brepo, "full_name"));
		if (json_is_integer(hid) && json_is_integer(bid))
			pr->fork = json_integer_value(hid) != json_integer_value(bid);
		else
			pr->fork = !hn || !bn || strcasecmp(hn, bn) != 0;
	}
	pr->action = kpl_strdup(action);
	pr->head_sha = kpl_strdup(sha);
	lower(pr->head_sha);
	pr->head_branch = kpl_strdup(href);
	pr->base_branch = kpl_strdup(bref);
	before = json_string_value(json_object_get(root, "before"));
	pr->before = kpl_strdup(hooks_sha_ok(before) ? before : "");
	lower(pr->before);
	pr->updated_at = kpl_strdup(str_or_empty(p, "updated_at"));
	pr->status_repo = kpl_strdup(full);
	pr->ref = kpl_asprintf("refs/pull/%" PRIu64 "/head", pr->number);
	for (size_t i = 0; i < KPL_ARRAY_SIZE(keys); i++)
		add_url(pr, repo, keys[i]);
	if (pr->n_urls == 0)
		return kpl_errf(err, KPL_EINVAL, "repository: no repository URL");
	return 0;
}

static int parse_gitlab(json_t *root, struct forge_pr *pr, char *ignored, size_t isize,
			struct kpl_err *err)
{
	static const char *const pkeys[] = { "git_http_url", "git_ssh_url", "web_url", "http_url",
					     "ssh_url" };
	static const char *const rkeys[] = { "git_http_url", "git_ssh_url", "url", "homepage" };
	json_t *oa = json_object_get(root, "object_attributes"), *project, *sp, *tp;
	const char *kind = json_string_value(json_object_get(root, "object_kind"));
	const char *action, *sha, *oldrev, *src, *dst;
	uint64_t pid = 0;

	if (kind && strcmp(kind, "merge_request"))
		return kpl_errf(err, KPL_EINVAL, "object_kind: %.40s, want merge_request", kind);
	if (!json_is_object(oa))
		return kpl_errf(err, KPL_EINVAL, "object_attributes: missing or not an object");
	action = json_string_value(json_object_get(oa, "action"));
	if (!action)
		return kpl_errf(err, KPL_EINVAL, "object_attributes.action: missing");
	oldrev = json_string_value(json_object_get(oa, "oldrev"));
	if (strcmp(action, "open") && strcmp(action, "reopen") && strcmp(action, "update")) {
		snprintf(ignored, isize, "action %.40s starts no run (open, reopen and update "
			 "with new commits do)", action);
		return 1;
	}
	if (strcmp(action, "update") == 0 && !(oldrev && *oldrev)) {
		snprintf(ignored, isize, "action update without oldrev (no new commits) "
			 "starts no run");
		return 1;
	}
	if (!positive(json_object_get(oa, "iid"), &pr->number))
		return kpl_errf(err, KPL_EINVAL, "object_attributes.iid: want a positive integer");
	sha = json_string_value(json_object_get(json_object_get(oa, "last_commit"), "id"));
	if (!hooks_sha_ok(sha))
		return kpl_errf(err, KPL_EINVAL, "object_attributes.last_commit.id: want a commit "
				"sha");
	src = json_string_value(json_object_get(oa, "source_branch"));
	dst = json_string_value(json_object_get(oa, "target_branch"));
	if (!branch_ok(src))
		return kpl_errf(err, KPL_EINVAL, "object_attributes.source_branch: want a branch "
				"name");
	if (!branch_ok(dst))
		return kpl_errf(err, KPL_EINVAL, "object_attributes.target_branch: want a branch "
				"name");
	project = json_object_get(root, "project");
	if (!positive(json_object_get(project, "id"), &pid) &&
	    !positive(json_object_get(oa, "target_project_id"), &pid))
		return kpl_errf(err, KPL_EINVAL, "project.id: want a positive integer");
	sp = json_object_get(oa, "source_project_id");
	tp = json_object_get(oa, "target_project_id");
	pr->fork = !(json_is_integer(sp) && json_is_integer(tp) &&
		     json_integer_value(sp) == json_integer_value(tp));
	pr->action = kpl_strdup(action);
	pr->head_sha = kpl_strdup(sha);
	lower(pr->head_sha);
	pr->head_branch = kpl_strdup(src);
	pr->base_branch = kpl_strdup(dst);
	pr->before = kpl_strdup(hooks_sha_ok(oldrev) ? oldrev : "");
	lower(pr->before);
	pr->updated_at = kpl_strdup(str_or_empty(oa, "updated_at"));
	pr->status_repo = kpl_asprintf("%" PRIu64, pid);
	pr->ref = kpl_asprintf("refs/merge-requests/%" PRIu64 "/head", pr->number);
	for (size_t i = 0; i < KPL_ARRAY_SIZE(pkeys); i++)
		add_url(pr, project, pkeys[i]);
	for (size_t i = 0; i < KPL_ARRAY_SIZE(rkeys); i++)
		add_url(pr, json_object_get(root, "repository"), rkeys[i]);
	if (pr->n_urls == 0)
		return kpl_errf(err, KPL_EINVAL, "project: no repository URL");
	return 0;
}

int forge_parse_pr(enum forge_kind kind, const char *body, size_t len, struct forge_pr *out,
		   char *ignored, size_t isize, struct kpl_err *err)
{
	json_error_t jerr;
	json_t *root = json_loadb(body, len, 0, &jerr);
	int rc;

	memset(out, 0, sizeof *out);
	if (isize)
		ignored[0] = '\0';
	if (!root || !json_is_object(root)) {
		rc = kpl_errf(err, KPL_EINVAL, "the body is not a JSON object%s%s",
			      root ? "" : ": ", root ? "" : jerr.text);
		goto out;
	}
	rc = kind == FORGE_GITHUB ? parse_github(root, out, ignored, isize, err)
				  : parse_gitlab(root, out, ignored, isize, err);
out:
	if (rc)
		forge_pr_free(out);
	json_decref(root);
	return rc;
}

int forge_pr_key(enum forge_kind kind, const char *repo, const struct forge_pr *pr,
		 const char *name, char *out, size_t size)
{
	char key[HOOKS_MAX_URL + 1], num[24];
	const char *parts[10];
	unsigned char md[SHA256_DIGEST_LENGTH];
	EVP_MD_CTX *ctx;
	int n;

	if (hooks_repo_key(repo, key, sizeof key))
		return KPL_EINVAL;
	snprintf(num, sizeof num, "%" PRIu64, pr->number);
	parts[0] = forge_kind_name(kind);
	parts[1] = key;
	parts[2] = "pr";
	parts[3] = num;
	parts[4] = pr->action ? pr->action : "";
	parts[5] = pr->head_sha ? pr->head_sha : "";
	parts[6] = pr->before ? pr->before : "";
	parts[7] = pr->updated_at ? pr->updated_at : "";
	parts[8] = name;
	parts[9] = pr->base_branch ? pr->base_branch : "";
	/* Each part with its NUL, so no two tuples hash the same text. */
	ctx = EVP_MD_CTX_new();
	if (!ctx || EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) != 1)
		BUG("forge_pr_key: no SHA-256");
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
/* Status requests */

const char *forge_final_state(enum forge_kind kind, Kpl__V1__RunState s)
{
	bool gh = kind == FORGE_GITHUB;

	switch (s) {
	case KPL__V1__RUN_STATE__RUN_STATE_SUCCEEDED: return "success";
	case KPL__V1__RUN_STATE__RUN_STATE_FAILED: return gh ? "failure" : "failed";
	/* GitHub has no cancelled state: error is "did not finish". */
	case KPL__V1__RUN_STATE__RUN_STATE_CANCELLED: return gh ? "error" : "canceled";
	default: return NULL;
	}
}

static bool github_repo_ok(const char *s)
{
	const char *slash = s ? strchr(s, '/') : NULL;

	if (!slash || slash == s || !slash[1] || strchr(slash + 1, '/') || strlen(s) > 200)
		return false;
	for (; *s; s++)
		if (!isalnum((unsigned char)*s) && !strchr("._-/", *s))
			return false;
	return strcmp(slash + 1, "..") && strcmp(slash + 1, ".") && strncmp(s, "..", 2);
}

static bool digits(const char *s)
{
	size_t n = s ? strspn(s, "0123456789") : 0;

	return n > 0 && n < 20 && !s[n];
}

static bool api_url_ok(const char *u)
{
	return u && (strncmp(u, "https://", 8) == 0 || strncmp(u, "http://", 7) == 0) &&
	       !strpbrk(u, " \r\n\t?#") && strlen(u) < 1024;
}

/* s cut to at most max bytes, not inside a UTF-8 sequence. */
static char *cut_utf8(const char *s, size_t max)
{
	size_t n = strlen(s);

	if (n > max) {
		n = max;
		while (n && ((unsigned char)s[n] & 0xc0) == 0x80)
			n--;
	}
	return kpl_strndup(s, n);
}

int forge_status_request(const Kpl__Store__V1__ForgeStatusRecord *rec, const char *state,
			 const char *token, const char *description, struct forge_request *out,
			 struct kpl_err *err)
{
	int kind = kind_parse(rec->forge);
	char *api = NULL, *desc = NULL;
	json_t *body;
	size_t n;

	memset(out, 0, sizeof *out);
	if (kind < 0)
		return kpl_errf(err, KPL_EINVAL, "forge: unknown (%.20s)", rec->forge);
	if (!api_url_ok(rec->api_url))
		return kpl_errf(err, KPL_EINVAL, "api_url: want http(s)://host[/path]");
	if (kind == FORGE_GITHUB ? !github_repo_ok(rec->repo) : !digits(rec->repo))
		return kpl_errf(err, KPL_EINVAL, "repo: want %s",
				kind == FORGE_GITHUB ? "OWNER/REPO" : "a project id");
	if (!hooks_sha_ok(rec->sha))
		return kpl_errf(err, KPL_EINVAL, "sha: want a commit sha");
	if (!token || !*token || strpbrk(token, "\r\n"))
		return kpl_errf(err, KPL_EINVAL, "the token is empty or holds a line break");
	api = kpl_strdup(rec->api_url);
	n = strlen(api);
	while (n > 0 && api[n - 1] == '/')
		api[--n] = '\0';
	desc = cut_utf8(description ? description : "", FORGE_MAX_DESCRIPTION);
	body = json_object();
	json_object_set_new(body, "state", json_string(state));
	if (rec->target_url && *rec->target_url)
		json_object_set_new(body, "target_url", json_string(rec->target_url));
	json_object_set_new(body, "description", json_string(desc));
	if (kind == FORGE_GITHUB) {
		out->url = kpl_asprintf("%s/repos/%s/statuses/%s", api, rec->repo, rec->sha);
		json_object_set_new(body, "context", json_string(rec->context));
		out->headers[0].name = "Authorization";
		out->headers[0].value = kpl_asprintf("Bearer %s", token);
		out->headers[1].name = "Accept";
		out->headers[1].value = kpl_strdup("application/vnd.github+json");
		out->headers[2].name = "X-GitHub-Api-Version";
		out->headers[2].value = kpl_strdup("2022-11-28");
		out->n_headers = 3;
	} else {
		out->url = kpl_asprintf("%s/projects/%s/statuses/%s", api, rec->repo, rec->sha);
		json_object_set_new(body, "name", json_string(rec->context));
		if (rec->ref && *rec->ref)
			json_object_set_new(body, "ref", json_string(rec->ref));
		out->headers[0].name = "PRIVATE-TOKEN";
		out->headers[0].value = kpl_strdup(token);
		out->n_headers = 1;
	}
	out->headers[out->n_headers].name = "Content-Type";
	out->headers[out->n_headers++].value = kpl_strdup("application/json");
	out->body = json_dumps(body, JSON_COMPACT | JSON_SORT_KEYS);
	json_decref(body);
	free(api);
	free(desc);
	if (!out->body)
		BUG("forge_status_request: json_dumps failed");
	return 0;
}

void forge_request_release(struct forge_request *r)
{
	free(r->url);
	free(r->body);
	for (size_t i = 0; i < r->n_headers; i++) {
		if (r->headers[i].value)
			memset(r->headers[i].value, 0, strlen(r->headers[i].value));
		free(r->headers[i].value);
	}
	memset(r, 0, sizeof *r);
}

enum forge_verdict forge_judge(enum forge_kind kind, int http_status, const char *body,
			       char *why, size_t size)
{
	const char *b = body ? body : "";
	char msg[120];
	size_t n = 0;

	/* The forge's message, on one line, for the log. */
	for (const char *p = b; *p && n + 1 < sizeof msg; p++)
		msg[n++] = (*p == '\n' || *p == '\r' || *p == '\t') ? ' ' : *p;
	msg[n] = '\0';
	snprintf(why, size, "HTTP %d%s%s", http_status, n ? ": " : "", msg);
	if (http_status >= 200 && http_status < 300)
		return FORGE_DELIVERED;
	/* GitLab's statuses are a state machine: the state it already has
	 * cannot be entered again. A resend after a restart lands here. */
	if (kind == FORGE_GITLAB && http_status == 400 && strstr(b, "Cannot transition status"))
		return FORGE_DELIVERED;
	if (http_status == 408 || http_status == 429 || http_status >= 500)
		return FORGE_RETRY;
	/* GitHub's rate limits answer 403 (or 429). */
	if (kind == FORGE_GITHUB && http_status == 403 && strcasestr(b, "rate limit"))
		return FORGE_RETRY;
	return FORGE_REJECTED;
}

int64_t forge_retry_after_ms(const char *retry_after, const char *remaining,
			     const char *reset, int64_t now_ms)
{
	int64_t ms = retry_after ? http_parse_retry_after(retry_after, now_ms) : -1;
	char *end;

	if (ms < 0 && remaining && strcmp(remaining, "0") == 0 && reset) {
		long long at = strtoll(reset, &end, 10);
		if (end != reset && !*end && at > 0)
			ms = at * 1000 > now_ms ? at * 1000 - now_ms : 0;
	}
	if (ms > FORGE_MAX_RATE_LIMIT_WAIT_MS)
		ms = FORGE_MAX_RATE_LIMIT_WAIT_MS;
	return ms;
}

/* ---------------------------------------------------------------------- */
/* The daemon side */

struct entry {
	struct forge *f;
	char run_id[STORE_MAX_RUN_ID_LEN + 1];
	Kpl__Store__V1__ForgeStatusRecord *rec; /* owned (unpacked copy) */
	int kind;
	struct engine_sub sub;
	bool subscribed;
	struct http_request *req; /* in flight */
	char *sending;            /* the state in flight */
	uv_timer_t *timer;        /* backoff */
	int tries;
	struct entry *prev, *next;
};

struct forge {
	uv_loop_t *loop;
	struct engine *eng;
	struct store *store;
	struct http_client *http;
	char *console_url;
	char *api_url[FORGE__LAST];
	int64_t backoff_ms;
	struct entry *entries;
	/* Callbacks still to come (requests, commits, timer closes, the HTTP
	 * client's close): f is freed only when none is left after close. */
	size_t busy;
	bool closing, http_closed;
	void (*done)(void *data);
	void *done_data;
};

static void pump(struct entry *e);

static void maybe_done(struct forge *f)
{
	void (*done)(void *);
	void *data;

	if (!f->closing || f->busy || !f->http_closed)
		return;
	while (f->entries) {
		struct entry *e = f->entries;

		f->entries = e->next;
		kpl__store__v1__forge_status_record__free_unpacked(e->rec, NULL);
		free(e->sending);
		free(e);
	}
	for (int k = 0; k < FORGE__LAST; k++)
		free(f->api_url[k]);
	free(f->console_url);
	done = f->done;
	data = f->done_data;
	free(f);
	if (done)
		done(data);
}

static void committed(void *data, int status)
{
	struct forge *f = data;

	(void)status; /* a failed commit stops kpld (engine.c) */
	f->busy--;
	maybe_done(f);
}

static void stage_record(struct entry *e)
{
	store_stage_forge(e->f->store, e->run_id, e->rec);
	e->f->busy++;
	store_commit(e->f->store, committed, e->f);
}

static Kpl__Store__V1__ForgeStatusRecord *rec_copy(const Kpl__Store__V1__ForgeStatusRecord *r)
{
	size_t len = kpl__store__v1__forge_status_record__get_packed_size(r);
	uint8_t *buf = kpl_malloc(len ? len : 1);
	Kpl__Store__V1__ForgeStatusRecord *c;

	kpl__store__v1__forge_status_record__pack(r, buf);
	c = kpl__store__v1__forge_status_record__unpack(NULL, len, buf);
	free(buf);
	if (!c)
		BUG("forge: a record does not decode after packing");
	return c;
}

static void set_sent(struct entry *e, const char *state)
{
	Kpl__Store__V1__ForgeStatusRecord r = *e->rec, *old = e->rec;

	r.sent_state = (char *)state;
	e->rec = rec_copy(&r);
	kpl__store__v1__forge_status_record__free_unpacked(old, NULL);
}

static void on_run_commit(struct engine_sub *sub)
{
	pump(sub->data);
}

/* The entry is done with: out of the list and the outbox. */
static void entry_drop(struct entry *e)
{
	struct forge *f = e->f;

	if (e->prev)
		e->prev->next = e->next;
	else
		f->entries = e->next;
	if (e->next)
		e->next->prev = e->prev;
	if (e->subscribed)
		engine_unsubscribe(f->eng, &e->sub);
	store_stage_forge(f->store, e->run_id, NULL);
	f->busy++;
	store_commit(f->store, committed, f);
	kpl__store__v1__forge_status_record__free_unpacked(e->rec, NULL);
	free(e->sending);
	free(e);
}

static struct entry *entry_add(struct forge *f, const char *run_id,
			       const Kpl__Store__V1__ForgeStatusRecord *rec)
{
	struct entry *e = kpl_calloc(1, sizeof *e);

	e->f = f;
	snprintf(e->run_id, sizeof e->run_id, "%s", run_id);
	e->rec = rec_copy(rec);
	e->kind = kind_parse(rec->forge);
	e->next = f->entries;
	if (f->entries)
		f->entries->prev = e;
	f->entries = e;
	snprintf(e->sub.run_id, sizeof e->sub.run_id, "%s", run_id);
	e->sub.notify = on_run_commit;
	e->sub.data = e;
	engine_subscribe(f->eng, &e->sub);
	e->subscribed = true;
	return e;
}

static void backoff_closed(uv_handle_t *h)
{
	struct forge *f = h->data;

	free(h);
	f->busy--;
	maybe_done(f);
}

static void backoff_fired(uv_timer_t *t)
{
	struct entry *e = t->data;

	t->data = e->f;
	e->f->busy++;
	uv_close((uv_handle_t *)t, backoff_closed);
	e->timer = NULL;
	pump(e);
}

static void give_up(struct entry *e, const char *state, const char *why)
{
	kpl_error(LOG, "run %s: giving up on the %s status %s of %s@%.12s: %s", e->run_id,
		  e->rec->forge, state, e->rec->repo, e->rec->sha, why);
	entry_drop(e);
}

/* retry_after_ms: what the forge asked for (forge_retry_after_ms), or -1. */
static void retry_later(struct entry *e, const char *state, const char *why,
			int64_t retry_after_ms)
{
	int64_t delay = e->f->backoff_ms;

	e->tries++;
	if (e->tries >= FORGE_MAX_TRIES) {
		char msg[400];
		snprintf(msg, sizeof msg, "%d tries: %s", e->tries, why);
		give_up(e, state, msg);
		return;
	}
	for (int i = 1; i < e->tries && delay < FORGE_MAX_BACKOFF_MS; i++)
		delay *= 2;
	if (delay > FORGE_MAX_BACKOFF_MS)
		delay = FORGE_MAX_BACKOFF_MS;
	/* A rate limit says when: sooner is refused again. */
	if (retry_after_ms > delay)
		delay = retry_after_ms;
	kpl_warn(LOG, "run %s: %s status %s: try %d of %d failed: %s; again in %lld ms",
		 e->run_id, e->rec->forge, state, e->tries, FORGE_MAX_TRIES, why,
		 (long long)delay);
	e->timer = kpl_malloc(sizeof *e->timer);
	uv_timer_init(e->f->loop, e->timer);
	e->timer->data = e;
	uv_timer_start(e->timer, backoff_fired, (uint64_t)delay, 0);
}

static void on_sent(struct http_response *resp, int status, void *data)
{
	struct entry *e = data;
	struct forge *f = e->f;
	char why[300], *state = e->sending;

	f->busy--;
	e->req = NULL;
	e->sending = NULL;
	if (f->closing) {
		/* Cancelled by forge_close: the record keeps it. */
		free(state);
		maybe_done(f);
		return;
	}
	if (status) {
		snprintf(why, sizeof why, "%s after %d attempt%s", kpl_strerror(status),
			 resp->attempts, resp->attempts == 1 ? "" : "s");
		retry_later(e, state, why, -1);
		free(state);
		return;
	}
	switch (forge_judge(e->kind, (int)resp->status, resp->body, why, sizeof why)) {
	case FORGE_DELIVERED:
		kpl_info(LOG, "run %s: %s took status %s for %s@%.12s", e->run_id, e->rec->forge,
			 state, e->rec->repo, e->rec->sha);
		e->tries = 0;
		set_sent(e, state);
		stage_record(e);
		free(state);
		pump(e);
		return;
	case FORGE_REJECTED:
		give_up(e, state, why);
		free(state);
		return;
	case FORGE_RETRY:
		retry_later(e, state, why,
			    forge_retry_after_ms(http_response_header(resp, "Retry-After"),
						 http_response_header(resp, "x-ratelimit-remaining"),
						 http_response_header(resp, "x-ratelimit-reset"),
						 kpl_now_ms()));
		free(state);
		return;
	}
}

static const char *description_of(Kpl__V1__RunState s)
{
	switch (s) {
	case KPL__V1__RUN_STATE__RUN_STATE_SUCCEEDED: return "succeeded";
	case KPL__V1__RUN_STATE__RUN_STATE_FAILED: return "failed";
	case KPL__V1__RUN_STATE__RUN_STATE_CANCELLED: return "cancelled";
	case KPL__V1__RUN_STATE__RUN_STATE_RUNNING: return "running";
	default: return "queued";
	}
}

/* Sends what the entry owes, if anything and if it may go now. */
static void pump(struct entry *e)
{
	struct forge *f = e->f;
	Kpl__Store__V1__RunRecord *run = NULL;
	Kpl__V1__RunState rs;
	struct http_request_options o = { 0 };
	struct http_header hdr[6];
	struct forge_request fr;
	struct kpl_err err = { 0 };
	const char *want, *final, *token, *sent = e->rec->sent_state ? e->rec->sent_state : "";
	char desc[200], shown[300];
	int rc;

	if (f->closing || e->req || e->timer)
		return;
	rc = store_get_run(f->store, e->run_id, &run);
	if (rc == KPL_ENOTFOUND) {
		give_up(e, "-", "the run is gone");
		return;
	}
	if (rc) {
		give_up(e, "-", kpl_strerror(rc));
		return;
	}
	rs = run->run ? run->run->state : KPL__V1__RUN_STATE__RUN_STATE_UNSPECIFIED;
	kpl__store__v1__run_record__free_unpacked(run, NULL);
	final = forge_final_state(e->kind, rs);
	/* pending first, always: the forge shows the run began. */
	if (!*sent)
		want = "pending";
	else if (final && strcmp(sent, final))
		want = final;
	else if (final) {
		kpl_info(LOG, "run %s: every status sent", e->run_id);
		entry_drop(e);
		return;
	} else
		return; /* pending sent; the final state is to come */
	token = secrets_get(engine_secrets(f->eng), e->rec->token_secret);
	if (!token) {
		char why[200];
		snprintf(why, sizeof why, "no secret %s (kplctl secret set %s)",
			 e->rec->token_secret, e->rec->token_secret);
		give_up(e, want, why);
		return;
	}
	snprintf(desc, sizeof desc, "kpl run %s %s", e->run_id,
		 strcmp(want, "pending") ? description_of(rs) : "started");
	if (forge_status_request(e->rec, want, token, desc, &fr, &err)) {
		give_up(e, want, err.msg);
		return;
	}
	for (size_t i = 0; i < fr.n_headers; i++) {
		hdr[i].name = fr.headers[i].name;
		hdr[i].value = fr.headers[i].value;
	}
	snprintf(shown, sizeof shown, "(%s statuses of %s)", e->rec->forge, e->rec->repo);
	o.method = "POST";
	o.url = fr.url;
	o.log_url = shown;
	o.headers = hdr;
	o.n_headers = fr.n_headers;
	o.body = fr.body;
	o.body_len = strlen(fr.body);
	o.timeout_ms = FORGE_TIMEOUT_MS;
	/* A repeat is harmless (the same state again), but the backoff here
	 * does it, in order. */
	o.idempotent = HTTP_IDEMPOTENT_NO;
	o.max_body = 64 * 1024;
	o.on_done = on_sent;
	o.data = e;
	rc = http_request_start(f->http, &o, &e->req, &err);
	forge_request_release(&fr);
	if (rc) {
		e->req = NULL;
		give_up(e, want, kpl_err_name(err.code));
		return;
	}
	e->sending = kpl_strdup(want);
	f->busy++;
}

static int load_one(void *data, const char *run_id, const Kpl__Store__V1__ForgeStatusRecord *rec)
{
	struct forge *f = data;

	if (kind_parse(rec->forge) < 0) {
		kpl_error(LOG, "record forge_status/%s names no forge (%.20s); dropped", run_id,
			  rec->forge);
		store_stage_forge(f->store, run_id, NULL);
		return 0;
	}
	entry_add(f, run_id, rec);
	return 0;
}

static void pump_all(uv_timer_t *t)
{
	struct forge *f = t->data;
	struct entry *e, *next;

	uv_close((uv_handle_t *)t, backoff_closed);
	for (e = f->entries; e; e = next) {
		next = e->next; /* pump may drop e */
		pump(e);
	}
}

int forge_new(const struct forge_options *opt, struct forge **out, struct kpl_err *err)
{
	static const char *const flag[FORGE__LAST] = { "--github-api-url", "--gitlab-api-url" };
	static const char *const def[FORGE__LAST] = { FORGE_DEFAULT_GITHUB_API,
						      FORGE_DEFAULT_GITLAB_API };
	struct http_client_options ho = { .user_agent = "kpld" };
	struct forge *f;
	uv_timer_t *t;
	size_t n = 0;
	int rc;

	*out = NULL;
	for (int k = 0; k < FORGE__LAST; k++)
		if (opt->api_url[k] && !api_url_ok(opt->api_url[k]))
			return kpl_errf(err, KPL_EINVAL, "%s: want http(s)://host[/path]", flag[k]);
	if (opt->console_url && *opt->console_url && !api_url_ok(opt->console_url))
		return kpl_errf(err, KPL_EINVAL, "--console-url: want http(s)://host[/path]");
	f = kpl_calloc(1, sizeof *f);
	f->loop = opt->loop;
	f->eng = opt->eng;
	f->store = engine_store(opt->eng);
	f->backoff_ms = opt->backoff_ms > 0 ? opt->backoff_ms : FORGE_BACKOFF_MS;
	for (int k = 0; k < FORGE__LAST; k++) {
		f->api_url[k] = kpl_strdup(opt->api_url[k] ? opt->api_url[k] : def[k]);
		n = strlen(f->api_url[k]);
		while (n > 0 && f->api_url[k][n - 1] == '/')
			f->api_url[k][--n] = '\0';
	}
	if (opt->console_url && *opt->console_url) {
		f->console_url = kpl_strdup(opt->console_url);
		n = strlen(f->console_url);
		while (n > 0 && f->console_url[n - 1] == '/')
			f->console_url[--n] = '\0';
	}
	if ((rc = http_client_new(f->loop, &ho, &f->http, err)) != 0)
		goto fail;
	if ((rc = store_list_forge(f->store, load_one, f)) != 0) {
		kpl_errf(err, rc, "cannot read the commit status outbox: %s", kpl_strerror(rc));
		f->closing = true;
		f->http_closed = true; /* maybe_done below waits for nothing else */
		while (f->entries) {
			struct entry *e = f->entries;
			f->entries = e->next;
			engine_unsubscribe(f->eng, &e->sub);
			kpl__store__v1__forge_status_record__free_unpacked(e->rec, NULL);
			free(e);
		}
		http_client_close(f->http, NULL, NULL);
		f->http = NULL;
		goto fail;
	}
	n = 0;
	for (struct entry *e = f->entries; e; e = e->next)
		n++;
	if (n)
		kpl_info(LOG, "%zu run%s still owe%s commit statuses: sending", n,
			 n == 1 ? "" : "s", n == 1 ? "s" : "");
	/* Not from inside forge_new: the caller has not got f yet. */
	t = kpl_malloc(sizeof *t);
	uv_timer_init(f->loop, t);
	t->data = f;
	f->busy++;
	uv_timer_start(t, pump_all, 0, 0);
	*out = f;
	return 0;
fail:
	for (int k = 0; k < FORGE__LAST; k++)
		free(f->api_url[k]);
	free(f->console_url);
	free(f);
	return rc;
}

/* The record of a new watch; release with watch_rec_release. */
static void watch_rec(struct forge *f, const char *run_id, const struct forge_watch *w,
		      Kpl__Store__V1__ForgeStatusRecord *rec)
{
	kpl__store__v1__forge_status_record__init(rec);
	rec->forge = (char *)forge_kind_name(w->kind);
	rec->api_url = f->api_url[w->kind];
	rec->repo = (char *)w->status_repo;
	rec->sha = (char *)w->sha;
	rec->token_secret = (char *)w->token_secret;
	rec->context = kpl_asprintf("kpl/%s", w->pipeline);
	rec->target_url = f->console_url ? kpl_asprintf("%s/#/runs/%s", f->console_url, run_id)
					 : kpl_strdup("");
	rec->sent_state = "";
	rec->ref = (char *)(w->ref ? w->ref : "");
}

static void watch_rec_release(Kpl__Store__V1__ForgeStatusRecord *rec)
{
	free(rec->context);
	free(rec->target_url);
}

void forge_stage_watch(struct forge *f, const char *run_id, const struct forge_watch *w)
{
	Kpl__Store__V1__ForgeStatusRecord rec;

	watch_rec(f, run_id, w, &rec);
	store_stage_forge(f->store, run_id, &rec);
	watch_rec_release(&rec);
}

void forge_watch(struct forge *f, const char *run_id, const struct forge_watch *w)
{
	Kpl__Store__V1__ForgeStatusRecord rec, *have = NULL;
	struct entry *e;

	for (e = f->entries; e; e = e->next)
		if (strcmp(e->run_id, run_id) == 0)
			return;
	watch_rec(f, run_id, w, &rec);
	if (f->closing) {
		/* Committed by whoever commits next: the next kpld sends it. */
		store_stage_forge(f->store, run_id, &rec);
		watch_rec_release(&rec);
		return;
	}
	/* forge_stage_watch made it durable with the run; a run found by its
	 * idempotency key instead has none yet. */
	if (store_get_forge(f->store, run_id, &have) != 0) {
		store_stage_forge(f->store, run_id, &rec);
		f->busy++;
		store_commit(f->store, committed, f);
	}
	e = entry_add(f, run_id, have ? have : &rec);
	if (have)
		kpl__store__v1__forge_status_record__free_unpacked(have, NULL);
	kpl_info(LOG, "run %s: reporting statuses to %s %s@%.12s", run_id, rec.forge, rec.repo,
		 rec.sha);
	watch_rec_release(&rec);
	pump(e);
}

static void http_closed(void *data)
{
	struct forge *f = data;

	f->http_closed = true;
	maybe_done(f);
}

void forge_close(struct forge *f, void (*done)(void *data), void *data)
{
	if (f->closing)
		BUG("forge_close called twice");
	f->closing = true;
	f->done = done;
	f->done_data = data;
	for (struct entry *e = f->entries; e; e = e->next) {
		if (e->subscribed) {
			engine_unsubscribe(f->eng, &e->sub);
			e->subscribed = false;
		}
		if (e->req)
			http_request_cancel(e->req); /* on_sent comes, with closing set */
		if (e->timer) {
			e->timer->data = f;
			f->busy++;
			uv_close((uv_handle_t *)e->timer, backoff_closed);
			e->timer = NULL;
		}
	}
	http_client_close(f->http, http_closed, f);
}
