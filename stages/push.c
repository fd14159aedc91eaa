/*
 * push.c - the `push` stage kind: puts an image into an OCI registry, or
 * promotes one already there to new tags.
 *
 *   with:
 *     registry: local          # a `registries:` endpoint of the daemon config
 *     repository: team/app     # where the image goes
 *     tags: [v1, latest]       # a list, or one string "v1, latest"; for
 *                              # `from`, default: the run id (16 characters,
 *                              # unique, sorting by time); `image` needs tags
 *     from: oci:out/image      # an OCI image layout directory, relative to
 *                              # the run's workspace (a build's output) ...
 *     image: team/app@sha256:..  # ... or an image in the same registry
 *                              # ("host/repo:tag" too): its manifest is copied
 *                              # to the new tags; blobs are mounted from its
 *                              # repository when that is another one
 *     chunk_size: 8388608      # blobs larger than this go in PATCH chunks of
 *                              # this many bytes (also 512KiB, 8MiB); others
 *                              # in one PUT. Default 8 MiB
 *
 * Outputs: image (host[:port]/repo@sha256:...), digest, tags (comma-separated).
 *
 * The protocol decisions are stages/registry.c's; this file moves bytes: one
 * request in flight at a time, through the daemon's HTTP client
 * (base/http.h); blob files are read in chunks with uv_fs_read, so at most
 * one chunk (or one blob under chunk_size) is in memory; the OCI layout's
 * small JSON files are read on libuv's thread pool. Each blob is hashed while
 * it is read and checked before the closing PUT; the registry's
 * Docker-Content-Digest must equal the digest kpl computed, for blobs and for
 * manifests.
 *
 * Auth: a ping (GET /v2/ without credentials) says what the registry wants.
 * Basic: the endpoint's username and password on every request (checked at
 * once with a second ping). Bearer: a token from the challenge's realm for
 * repository:REPO:pull,push (and repository:SOURCE:pull for a mount), asked
 * with the username and password as basic auth; a 401 later (the token
 * expired) fetches a new one and sends the request again, once. An endpoint
 * `token` is used as the bearer token itself, without a token server. No
 * credential and no token ever reaches a log line, an event or a message.
 *
 * Durability: before the first request the stage records resume data; it is
 * updated as blobs and tags are done ({"blobs_done":N,"manifest":D,
 * "tags_done":M}). A push is idempotent by digest (HEAD skips every blob the
 * registry has, a manifest PUT of the same bytes changes nothing), so after a
 * restart the push simply starts over from the ping and skips what is
 * there: blobs by their HEAD, manifests by a HEAD of each tag (or digest)
 * that already holds the same digest, so no push is repeated at the wire;
 * the resume data only says so in the log.
 *
 * Cancel (and the stage timeout) cancels the request in flight and ends
 * CANCELLED. NEEDSWORK: an upload session left open by a cancel or a failure
 * is not DELETEd; registries expire them (distribution after a week).
 */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/http.h"
#include "stages/kinds.h"
#include "stages/registry.h"

#define LOG "push"
#define PUSH_DEFAULT_CHUNK (8u * 1024 * 1024)
#define PUSH_MIN_CHUNK 1024u
#define PUSH_MAX_CHUNK (256u * 1024 * 1024)
/* Requests with a body may move a whole chunk; others are small. */
#define PUSH_SMALL_TIMEOUT_MS 60000
#define PUSH_BODY_TIMEOUT_MS (10 * 60 * 1000)
/* An upload whose connection broke midway is begun again from its HEAD (a
 * blob is named by its digest: sending it again is safe), this many times. */
#define PUSH_MAX_BLOB_RESTARTS 2
/* A resumed push's HEAD of a manifest answered 5xx is asked again, up to
 * this many HEADs in all, before the PUT is sent anyway. */
#define PUSH_MAX_HEAD_TRIES 5

#define PUSH_PHASE_MAP(X)                                                  \
	X(RECORD, "recording resume data")                                 \
	X(LAYOUT, "reading the OCI layout")                                \
	X(PING, "pinging the registry")                                    \
	X(LOGIN, "authenticating")                                         \
	X(RESOLVE, "reading the source manifest")                          \
	X(BLOBS, "pushing blobs")                                          \
	X(MANIFESTS, "pushing manifests")                                  \
	X(DONE, "done")

enum push_phase {
#define PUSH_PHASE_ENUM(e, s) PUSH_##e,
	PUSH_PHASE_MAP(PUSH_PHASE_ENUM)
#undef PUSH_PHASE_ENUM
	PUSH_PHASE_LAST_
};

static const char *const phase_names[] = {
#define PUSH_PHASE_STR(e, s) #e,
	PUSH_PHASE_MAP(PUSH_PHASE_STR)
#undef PUSH_PHASE_STR
};

struct push;
typedef void (*push_reply_fn)(struct push *p, struct http_response *resp);

/* A request, kept until its reply so it can be sent again with a fresh
 * token. */
struct push_req {
	const char *method; /* static */
	char *url;
	char *hdr_name[3];
	char *hdr_value[3];
	size_t n_hdr;
	const char *body; /* borrowed (p->buf or a plan manifest) */
	size_t len;
	int64_t timeout_ms;
	enum http_idempotent idem;
	bool no_auth;      /* the ping, and the token request (own auth) */
	bool token_req;
	bool auth_retried; /* a 401 already fetched a new token */
	push_reply_fn on_reply;
};

struct push {
	struct stage *st; /* NULL once reported or abandoned */
	uv_loop_t *loop;
	enum push_phase phase;
	bool cancelled;
	bool finished;
	int pending; /* callbacks still to come: request, fs, work, record */

	/* What to do */
	struct stage_endpoint ep;
	char *base; /* the endpoint's URL */
	char *host; /* its host[:port] */
	char *repo;
	char **tags;
	size_t n_tags;
	uint64_t chunk_size;
	char *layout_dir; /* from: oci:... (absolute) */
	bool promote;     /* image: ... */
	struct reg_ref src;
	bool same_repo;

	/* Auth (token is a credential: never logged) */
	enum reg_auth_scheme scheme;
	struct reg_challenge chal; /* the last bearer challenge */
	char *token;
	char *scopes[2];
	size_t n_scopes;

	/* The work */
	struct reg_plan plan;
	struct reg_manifest top; /* promote: the source manifest, parsed */
	size_t child_i;
	size_t blob_i, man_i, tag_i;
	size_t n_exists, n_sent, n_mounted;
	uint64_t bytes_sent;
	int blob_restarts; /* uploads of the current blob cut off and begun again */
	/* Resumed after a restart: each manifest PUT is preceded by a HEAD of
	 * its target, and skipped when the registry already has those bytes
	 * there (the PUT went out before the restart; sending it again would
	 * repeat the push, e.g. registry notifications). */
	bool resumed;
	bool head_done; /* the HEAD for the current manifest PUT was made */
	int head_tries;  /* HEADs of it answered with an error */

	/* The blob being uploaded */
	struct reg_upload up;
	struct reg_step step;
	struct reg_hash hash;
	uint64_t hashed; /* bytes hashed, from 0, in order */
	bool hash_ok;
	uv_file fd;
	uv_fs_t fsreq;
	char *buf;
	size_t buf_cap;
	uint64_t buf_len; /* bytes of the step read so far */

	/* Layout loading on the thread pool */
	uv_work_t work;
	struct kpl_err work_err;
	int work_rc;

	/* The request in flight */
	struct push_req r;  /* the current protocol request */
	struct push_req tr; /* a token request */
	struct push_req *cur;
	struct http_request *req;
	void (*after_token)(struct push *p);
};

/* ---------------------------------------------------------------------- */
/* with: */

static int with_err(struct kpl_err *err, const char *file, const struct pl_node *n,
		    const char *path, const char *key, const char *msg)
{
	return kpl_errf(err, KPL_EINVAL, "%s:%d:%d: %s%s%s: %s", file, n->pos.line,
			n->pos.col, path, key ? "." : "", key ? key : "", msg);
}

static const char *const push_keys[] = {
	"registry", "repository", "tags", "from", "image", "chunk_size",
};

/* Bytes from "8388608", "512KiB", "8MiB" (or K, M, KB, MB); 0 if bad. */
static uint64_t parse_size(const char *s)
{
	char *end;
	unsigned long long v;

	if (!s || !isdigit((unsigned char)*s))
		return 0;
	v = strtoull(s, &end, 10);
	if (!*end)
		return v;
	if (!strcmp(end, "K") || !strcmp(end, "KiB") || !strcmp(end, "KB"))
		return v * 1024;
	if (!strcmp(end, "M") || !strcmp(end, "MiB") || !strcmp(end, "MB"))
		return v * 1024 * 1024;
	return 0;
}

static int has_template(const char *s)
{
	return s && strstr(s, "${{") != NULL;
}

static int push_check_with(const struct pl_node *with, const char *file, const char *path,
			   struct kpl_err *err)
{
	const struct pl_node *n, *from, *image;

	if (!with)
		return kpl_errf(err, KPL_EINVAL, "%s: %s: a push stage needs `with` with "
				"`registry`, `repository`, and `from` or `image`", file, path);
	if (with->type != PL_MAP)
		return with_err(err, file, with, path, NULL, "must be a mapping");
	for (size_t i = 0; i < with->n; i++) {
		const char *k = with->keys[i]->scalar;
		size_t j;
		for (j = 0; j < KPL_ARRAY_SIZE(push_keys); j++)
			if (!strcmp(k, push_keys[j]))
				break;
		if (j == KPL_ARRAY_SIZE(push_keys))
			return with_err(err, file, with->keys[i], path, k, "unknown key (allowed: "
					"registry, repository, tags, from, image, chunk_size)");
		if (strcmp(k, "tags") != 0 && with->items[i]->type != PL_SCALAR)
			return with_err(err, file, with->items[i], path, k, "must be a string");
	}
	for (size_t j = 0; j < 2; j++) {
		const char *k = j ? "repository" : "registry";
		n = pl_map_get(with, k);
		if (!n || !n->scalar[0])
			return with_err(err, file, with, path, k, "required");
	}
	n = pl_map_get(with, "repository");
	if (!has_template(n->scalar) && !reg_repo_valid(n->scalar))
		return with_err(err, file, n, path, "repository", "not a repository name "
				"(lowercase letters, digits, separators . _ __ -, and /)");
	from = pl_map_get(with, "from");
	image = pl_map_get(with, "image");
	if (!!from == !!image)
		return with_err(err, file, with, path, NULL,
				"give either `from` (oci:DIR) or `image` (to promote)");
	if (from && !has_template(from->scalar) && strncmp(from->scalar, "oci:", 4) != 0)
		return with_err(err, file, from, path, "from", "must be oci:DIR (an OCI image "
				"layout, relative to the run's workspace)");
	if ((n = pl_map_get(with, "tags")) != NULL) {
		if (n->type == PL_SEQ) {
			if (n->n == 0)
				return with_err(err, file, n, path, "tags", "must not be empty");
			for (size_t i = 0; i < n->n; i++) {
				const struct pl_node *t = n->items[i];
				if (t->type != PL_SCALAR)
					return with_err(err, file, t, path, "tags",
							"must be a list of strings");
				if (!has_template(t->scalar) && !reg_tag_valid(t->scalar))
					return with_err(err, file, t, path, "tags", "not a tag "
							"([A-Za-z0-9_][A-Za-z0-9._-]{0,127})");
			}
		} else if (n->type != PL_SCALAR) {
			return with_err(err, file, n, path, "tags",
					"must be a list of strings or one string");
		}
	} else if (image) {
		return with_err(err, file, with, path, "tags", "required with `image` (the "
				"tags to promote the image to)");
	}
	n = pl_map_get(with, "chunk_size");
	if (n && !has_template(n->scalar)) {
		uint64_t v = parse_size(n->scalar);
		if (v < PUSH_MIN_CHUNK || v > PUSH_MAX_CHUNK)
			return with_err(err, file, n, path, "chunk_size", "must be a size from "
					"1KiB to 256MiB (bytes, or with KiB or MiB)");
	}
	return 0;
}

/* ---------------------------------------------------------------------- */
/* Lifetime */

static void req_release(struct push_req *r)
{
	free(r->url);
	for (size_t i = 0; i < r->n_hdr; i++) {
		free(r->hdr_name[i]);
		free(r->hdr_value[i]);
	}
	memset(r, 0, sizeof *r);
}

static void push_free(struct push *p)
{
	if (p->fd >= 0) {
		uv_fs_t req;
		/* close(2) of a read-only regular file does not wait on the disk */
		uv_fs_close(NULL, &req, p->fd, NULL);
		uv_fs_req_cleanup(&req);
	}
	req_release(&p->r);
	req_release(&p->tr);
	reg_step_release(&p->step);
	reg_upload_release(&p->up);
	reg_hash_release(&p->hash);
	reg_plan_release(&p->plan);
	reg_manifest_release(&p->top);
	reg_ref_release(&p->src);
	reg_challenge_release(&p->chal);
	stage_endpoint_release(&p->ep);
	free(p->base);
	free(p->host);
	free(p->repo);
	for (size_t i = 0; i < p->n_tags; i++)
		free(p->tags[i]);
	free(p->tags);
	free(p->layout_dir);
	if (p->token)
		memset(p->token, 0, strlen(p->token));
	free(p->token);
	for (size_t i = 0; i < p->n_scopes; i++)
		free(p->scopes[i]);
	free(p->buf);
	free(p);
}

static void push_maybe_free(struct push *p)
{
	if (p->finished && p->pending == 0)
		push_free(p);
}

/* Reports once (if the stage is still ours), then frees when idle. */
static void push_finish(struct push *p, Kpl__V1__StageState state, const char *msg)
{
	struct stage *st = p->st;

	p->st = NULL;
	p->finished = true;
	if (st)
		stage_done(st, state, msg);
	push_maybe_free(p);
}

static void push_fail(struct push *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void push_fail(struct push *p, const char *fmt, ...)
{
	char buf[700], *red;
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	/* Messages quote the registry: keep any secret value out of them. */
	red = p->st ? stage_redact(p->st, buf) : kpl_strdup(buf);
	if (p->st)
		kpl_info(LOG, "run %s stage %s: %s", stage_run_id(p->st), stage_name(p->st), red);
	push_finish(p, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, red);
	free(red);
}

/*
 * Called first by every completion: true if the push is over (abandoned,
 * reported, or cancelled, which it then reports), so the caller returns.
 */
static bool push_gone(struct push *p)
{
	p->pending--;
	if (p->st && p->cancelled) {
		push_finish(p, KPL__V1__STAGE_STATE__STAGE_STATE_CANCELLED, "cancelled");
		return true;
	}
	if (!p->st) {
		push_maybe_free(p);
		return true;
	}
	return false;
}

static void push_set_phase(struct push *p, enum push_phase ph)
{
	kpl_debug(LOG, "run %s stage %s: -> [%s]", stage_run_id(p->st), stage_name(p->st),
		  phase_names[ph]);
	p->phase = ph;
}

/* "sha256:0123456789ab…" for logs. */
static const char *short_digest(const char *d, char out[32])
{
	snprintf(out, 32, "%.19s\u2026", d);
	return out;
}

static void save_progress(struct push *p)
{
	const char *md = p->plan.n_manifests ? p->plan.manifests[p->plan.n_manifests - 1].digest
					     : "";
	char *j = kpl_asprintf("{\"blobs_done\":%zu,\"manifest\":\"%s\",\"tags_done\":%zu}",
			       p->blob_i, md, p->tag_i);

	stage_save_resume(p->st, j);
	free(j);
}

/* ---------------------------------------------------------------------- */
/* Requests */

static void on_http_done(struct http_response *resp, int status, void *data);

static void req_header(struct push_req *r, const char *name, const char *value)
{
	if (r->n_hdr >= KPL_ARRAY_SIZE(r->hdr_name))
		BUG("push: too many headers");
	r->hdr_name[r->n_hdr] = kpl_strdup(name);
	r->hdr_value[r->n_hdr] = kpl_strdup(value);
	r->n_hdr++;
}

/* Sends *r (p->r or p->tr) with the credentials the registry asked for. */
static void push_issue(struct push *p, struct push_req *r)
{
	struct http_request_options o = { 0 };
	struct http_header h[KPL_ARRAY_SIZE(r->hdr_name)];
	struct kpl_err err = { 0 };
	const struct cfg_endpoint *ep = p->ep.ep;

	for (size_t i = 0; i < r->n_hdr; i++) {
		h[i].name = r->hdr_name[i];
		h[i].value = r->hdr_value[i];
	}
	o.method = r->method;
	o.url = r->url;
	o.headers = h;
	o.n_headers = r->n_hdr;
	o.body = r->body;
	o.body_len = r->len;
	o.timeout_ms = r->timeout_ms ? r->timeout_ms : PUSH_SMALL_TIMEOUT_MS;
	o.idempotent = r->idem;
	if (r->token_req) {
		if (p->ep.username) {
			o.auth.kind = HTTP_AUTH_BASIC;
			o.auth.user = p->ep.username;
			o.auth.password = p->ep.password ? p->ep.password : "";
		}
	} else if (!r->no_auth && p->scheme == REG_AUTH_BASIC) {
		o.auth.kind = HTTP_AUTH_BASIC;
		o.auth.user = p->ep.username;
		o.auth.password = p->ep.password ? p->ep.password : "";
	} else if (!r->no_auth && p->scheme == REG_AUTH_BEARER && p->token) {
		o.auth.kind = HTTP_AUTH_BEARER;
		o.auth.token = p->token;
	}
	o.tls.ca_file = ep->ca_file;
	o.tls.client_cert = ep->client_cert;
	o.tls.client_key = ep->client_key;
	o.tls.insecure = ep->insecure;
	/* A blob GET may go to object storage; nothing here needs that, and
	 * a redirect on a PUT or PATCH would lose the body. */
	o.follow_redirects = 0;
	o.on_done = on_http_done;
	o.data = p;
	p->cur = r;
	if (http_request_start(stage_http(p->st), &o, &p->req, &err)) {
		push_fail(p, "push: %s", err.msg);
		return;
	}
	p->pending++;
}

/* Sets up p->r for a new request (the previous one is released). */
static struct push_req *new_req(struct push *p, const char *method, char *url,
				push_reply_fn on_reply)
{
	req_release(&p->r);
	p->r.method = method;
	p->r.url = url;
	p->r.on_reply = on_reply;
	return &p->r;
}

static void fetch_token(struct push *p, void (*then)(struct push *p));

static void retry_after_token(struct push *p)
{
	p->r.auth_retried = true;
	push_issue(p, &p->r);
}

static void reply_view(struct http_response *resp, struct reg_reply *rr)
{
	memset(rr, 0, sizeof *rr);
	rr->status = resp->status;
	rr->location = http_response_header(resp, "Location");
	rr->range = http_response_header(resp, "Range");
	rr->digest = http_response_header(resp, "Docker-Content-Digest");
	rr->content_type = http_response_header(resp, "Content-Type");
	rr->www_authenticate = http_response_header(resp, "WWW-Authenticate");
	rr->body = resp->body;
	rr->body_len = resp->body_len;
}

static void on_upload_reply(struct push *p, struct http_response *resp);
static void restart_blob(struct push *p, const char *why);

static void on_http_done(struct http_response *resp, int status, void *data)
{
	struct push *p = data;
	struct push_req *r = p->cur;

	p->req = NULL;
	if (push_gone(p))
		return;
	if (status == KPL_EUNAVAILABLE && r == &p->r && r->on_reply == on_upload_reply &&
	    !p->promote && p->blob_restarts < PUSH_MAX_BLOB_RESTARTS) {
		restart_blob(p, resp->err.msg);
		return;
	}
	if (status) {
		push_fail(p, "push: %s", resp->err.msg);
		return;
	}
	/* A bearer token expired (or lacks a scope): a fresh one, once. */
	if (resp->status == 401 && r == &p->r && p->scheme == REG_AUTH_BEARER &&
	    !r->auth_retried && !r->no_auth && !p->ep.token) {
		struct reg_challenge c;
		const char *h = http_response_header(resp, "WWW-Authenticate");
		if (reg_challenge_parse(h, &c) == 0 && c.scheme == REG_AUTH_BEARER &&
		    c.realm) {
			reg_challenge_release(&p->chal);
			p->chal = c;
		} else {
			reg_challenge_release(&c);
		}
		fetch_token(p, retry_after_token);
		return;
	}
	r->on_reply(p, resp);
}

/* ---------------------------------------------------------------------- */
/* Auth */

static void after_login(struct push *p);

static void on_token(struct push *p, struct http_response *resp)
{
	struct reg_reply rr;
	struct kpl_err err = { 0 };
	long expires;
	char *tok;

	reply_view(resp, &rr);
	if (resp->status != 200) {
		reg_reply_error(&err, "GET", p->tr.url, &rr);
		push_fail(p, "push: token server: %s", err.msg);
		return;
	}
	if (reg_token_parse(rr.body, rr.body_len, &tok, &expires, &err)) {
		char *red = http_redact_url(p->tr.url);
		push_fail(p, "push: GET %s: %s", red, err.msg);
		free(red);
		return;
	}
	if (p->token)
		memset(p->token, 0, strlen(p->token));
	free(p->token);
	p->token = tok;
	kpl_debug(LOG, "token for %s, valid %ld s", p->repo, expires);
	p->after_token(p);
}

/* Asks the realm of p->chal for a token with p's scopes, then calls then. */
static void fetch_token(struct push *p, void (*then)(struct push *p))
{
	char *url = reg_token_url(&p->chal, (const char *const *)p->scopes, p->n_scopes);

	if (!url) {
		push_fail(p, "push: the registry's bearer challenge has no http(s) realm");
		return;
	}
	req_release(&p->tr);
	p->tr.method = "GET";
	p->tr.url = url;
	p->tr.token_req = true;
	p->tr.on_reply = on_token;
	p->after_token = then;
	push_issue(p, &p->tr);
}

static void on_login(struct push *p, struct http_response *resp)
{
	struct reg_reply rr;
	struct kpl_err err = { 0 };

	reply_view(resp, &rr);
	if (resp->status != 200) {
		reg_reply_error(&err, "GET", p->r.url, &rr);
		push_fail(p, "push: %s", err.msg);
		return;
	}
	after_login(p);
}

static void on_ping(struct push *p, struct http_response *resp)
{
	struct reg_reply rr;
	struct reg_challenge c;
	struct kpl_err err = { 0 };

	reply_view(resp, &rr);
	if (reg_ping_reply(p->r.url, &rr, &c, &err)) {
		push_fail(p, "push: %s", err.msg);
		return;
	}
	p->scheme = c.scheme;
	push_set_phase(p, PUSH_LOGIN);
	switch (c.scheme) {
	case REG_AUTH_NONE:
		stage_logf(p->st, "registry %s: no authentication asked", p->ep.ep->name);
		after_login(p);
		break;
	case REG_AUTH_BASIC:
		if (!p->ep.username) {
			push_fail(p, "push: registry %s asks for basic auth; config registries.%s "
				  "has no username and password", p->ep.ep->name, p->ep.ep->name);
			break;
		}
		stage_logf(p->st, "registry %s: basic auth as %s", p->ep.ep->name, p->ep.username);
		new_req(p, "GET", reg_api_url(p->base, "", ""), on_login);
		/* reg_api_url(base, "", "") is base/v2/ */
		push_issue(p, &p->r);
		break;
	default:
		if (p->ep.token) {
			free(p->token);
			p->token = kpl_strdup(p->ep.token);
			stage_logf(p->st, "registry %s: bearer token from the config",
				   p->ep.ep->name);
			after_login(p);
			break;
		}
		stage_logf(p->st, "registry %s: token auth (service %s)", p->ep.ep->name,
			   c.service ? c.service : "-");
		reg_challenge_release(&p->chal);
		p->chal = c;
		memset(&c, 0, sizeof c);
		fetch_token(p, after_login);
		break;
	}
	reg_challenge_release(&c);
}

/* ---------------------------------------------------------------------- */
/* Manifests */

static void push_done(struct push *p);
static void next_manifest(struct push *p);

static void on_manifest_put(struct push *p, struct http_response *resp)
{
	struct reg_mfile *m = &p->plan.manifests[p->man_i];
	bool top = p->man_i == p->plan.n_manifests - 1;
	struct reg_reply rr;
	struct kpl_err err = { 0 };
	char sd[32];

	reply_view(resp, &rr);
	if (resp->status != 201) {
		reg_reply_error(&err, "PUT", p->r.url, &rr);
		push_fail(p, "push: %s", err.msg);
		return;
	}
	if (rr.digest && strcmp(rr.digest, m->digest) != 0) {
		char *red = http_redact_url(p->r.url);
		push_fail(p, "push: PUT %s: Docker-Content-Digest %.80s, but the manifest sent "
			  "is %s", red, rr.digest, m->digest);
		free(red);
		return;
	}
	if (top) {
		stage_logf(p->st, "manifest pushed: tag %s (%s)", p->tags[p->tag_i],
			   short_digest(m->digest, sd));
		p->tag_i++;
	} else {
		stage_logf(p->st, "manifest %s pushed (%s)", short_digest(m->digest, sd),
			   reg_media_name(m->media));
		p->man_i++;
	}
	p->head_done = false;
	save_progress(p);
	next_manifest(p);
}

static void on_manifest_head(struct push *p, struct http_response *resp)
{
	struct reg_mfile *m = &p->plan.manifests[p->man_i];
	bool top = p->man_i == p->plan.n_manifests - 1;
	const char *dcd = http_response_header(resp, "Docker-Content-Digest");
	char sd[32];

	if (resp->status >= 500 && ++p->head_tries < PUSH_MAX_HEAD_TRIES) {
		/* docker-registry (filesystem storage) rewrites a manifest's
		 * revision link in place, so a HEAD racing another push of the
		 * same manifest gets 500 "invalid checksum digest format":
		 * ask again rather than PUT what may be there. */
		p->head_done = false;
		next_manifest(p);
		return;
	}
	p->head_done = true;
	p->head_tries = 0;
	if (resp->status != 200 || !dcd || strcmp(dcd, m->digest) != 0) {
		next_manifest(p); /* not there (or other bytes): the PUT */
		return;
	}
	if (top) {
		stage_logf(p->st, "tag %s already points at %s (pushed before the restart)",
			   p->tags[p->tag_i], short_digest(m->digest, sd));
		p->tag_i++;
	} else {
		stage_logf(p->st, "manifest %s already there (pushed before the restart)",
			   short_digest(m->digest, sd));
		p->man_i++;
	}
	p->head_done = false;
	save_progress(p);
	next_manifest(p);
}

static void next_manifest(struct push *p)
{
	struct reg_mfile *m;
	char *rest;
	struct push_req *r;

	if (p->man_i == p->plan.n_manifests - 1 && p->tag_i == p->n_tags) {
		push_done(p);
		return;
	}
	m = &p->plan.manifests[p->man_i];
	rest = kpl_asprintf("/manifests/%s", p->man_i == p->plan.n_manifests - 1
						   ? p->tags[p->tag_i] : m->digest);
	if (p->resumed && !p->head_done) {
		r = new_req(p, "HEAD", reg_api_url(p->base, p->repo, rest), on_manifest_head);
		free(rest);
		req_header(r, "Accept", reg_media_name(m->media));
		push_issue(p, r);
		return;
	}
	r = new_req(p, "PUT", reg_api_url(p->base, p->repo, rest), on_manifest_put);
	free(rest);
	req_header(r, "Content-Type", reg_media_name(m->media));
	r->body = m->bytes;
	r->len = m->len;
	push_issue(p, r);
}

static void start_manifests(struct push *p)
{
	push_set_phase(p, PUSH_MANIFESTS);
	if (p->same_repo)
		p->man_i = p->plan.n_manifests - 1; /* the children are there */
	next_manifest(p);
}

static void push_done(struct push *p)
{
	const char *digest = p->plan.manifests[p->plan.n_manifests - 1].digest;
	char *image = kpl_asprintf("%s/%s@%s", p->host, p->repo, digest);
	char *tags = NULL, hs[32];
	size_t len = 0;

	for (size_t i = 0; i < p->n_tags; i++)
		len += strlen(p->tags[i]) + 1;
	tags = kpl_calloc(1, len + 1);
	for (size_t i = 0; i < p->n_tags; i++) {
		if (i)
			strcat(tags, ",");
		strcat(tags, p->tags[i]);
	}
	push_set_phase(p, PUSH_DONE);
	stage_set_output(p->st, "image", image);
	stage_set_output(p->st, "digest", digest);
	stage_set_output(p->st, "tags", tags);
	reg_human_size(p->bytes_sent, hs, sizeof hs);
	stage_logf(p->st, "pushed %s: %zu blobs uploaded (%s), %zu mounted, %zu already there",
		   image, p->n_sent, hs, p->n_mounted, p->n_exists);
	{
		char *msg = kpl_asprintf("pushed %s as %s", image, tags);
		push_finish(p, KPL__V1__STAGE_STATE__STAGE_STATE_SUCCEEDED, msg);
		free(msg);
	}
	free(image);
	free(tags);
}

/* ---------------------------------------------------------------------- */
/* Blobs */

static void next_blob(struct push *p);
static void upload_step(struct push *p);

static void blob_close(struct push *p)
{
	if (p->fd >= 0) {
		uv_fs_t req;
		uv_fs_close(NULL, &req, p->fd, NULL);
		uv_fs_req_cleanup(&req);
		p->fd = -1;
	}
	reg_upload_release(&p->up);
	reg_hash_release(&p->hash);
}

static void blob_finished(struct push *p)
{
	blob_close(p);
	p->blob_i++;
	p->blob_restarts = 0;
	save_progress(p);
	next_blob(p);
}

/* The connection broke during an upload (the registry may hold part of it
 * in its session): the blob starts over with a HEAD and, if the registry
 * still lacks it, a new session. The old session is left to expire. */
static void restart_blob(struct push *p, const char *why)
{
	char sd[32];

	p->blob_restarts++;
	stage_logf(p->st, "blob %s: upload interrupted (%s); starting it again (%d of %d)",
		   short_digest(p->plan.blobs[p->blob_i].digest, sd), why, p->blob_restarts,
		   PUSH_MAX_BLOB_RESTARTS);
	blob_close(p);
	next_blob(p);
}

static void on_upload_reply(struct push *p, struct http_response *resp)
{
	struct reg_blob *b = &p->plan.blobs[p->blob_i];
	struct reg_reply rr;
	struct kpl_err err = { 0 };
	char sd[32], hs[32];

	reply_view(resp, &rr);
	if (reg_upload_reply(&p->up, &p->step, &rr, &err)) {
		push_fail(p, "push: %s", err.msg);
		return;
	}
	if (p->step.len) {
		p->bytes_sent += p->step.len;
	}
	if (p->up.state != REG_UP_DONE) {
		if (p->promote) {
			push_fail(p, "push: the registry did not mount blob %s from %s into %s "
				  "(kpl copies blobs between repositories only by mounting)",
				  b->digest, p->src.repo, p->repo);
			return;
		}
		upload_step(p);
		return;
	}
	reg_human_size(b->size, hs, sizeof hs);
	if (p->up.mounted) {
		p->n_mounted++;
		stage_logf(p->st, "blob %s mounted from %s", short_digest(b->digest, sd),
			   p->src.repo);
	} else {
		p->n_sent++;
		if (p->up.chunked)
			stage_logf(p->st, "blob %s: uploaded %s in %u chunks",
				   short_digest(b->digest, sd), hs, p->up.chunks);
		else
			stage_logf(p->st, "blob %s: uploaded %s", short_digest(b->digest, sd), hs);
	}
	blob_finished(p);
}

static void send_step(struct push *p)
{
	struct push_req *r = new_req(p, p->step.method, kpl_strdup(p->step.url),
				     on_upload_reply);

	if (p->step.content_range[0])
		req_header(r, "Content-Range", p->step.content_range);
	if (p->step.octet_stream)
		req_header(r, "Content-Type", "application/octet-stream");
	r->body = p->step.len ? p->buf : NULL;
	r->len = (size_t)p->step.len;
	if (p->step.len)
		r->timeout_ms = PUSH_BODY_TIMEOUT_MS;
	/* The closing PUT ends the session: sent twice, the second gets
	 * BLOB_UPLOAD_UNKNOWN. Only the status GET repeats safely. */
	r->idem = strcmp(p->step.method, "GET") == 0 ? HTTP_IDEMPOTENT_DEFAULT
						      : HTTP_IDEMPOTENT_NO;
	push_issue(p, r);
}

/* The step's bytes are in p->buf: hash them, check, send. */
static void step_ready(struct push *p)
{
	struct reg_blob *b = &p->plan.blobs[p->blob_i];
	char got[REG_DIGEST_MAX];

	if (p->step.len) {
		if (p->hash_ok && p->step.off == p->hashed) {
			reg_hash_update(&p->hash, p->buf, (size_t)p->step.len);
			p->hashed += p->step.len;
		} else if (p->step.off < p->hashed) {
			/* After a 416 the registry wants bytes again: they were
			 * hashed already. */
		} else {
			p->hash_ok = false;
		}
	}
	if (strcmp(p->step.method, "PUT") == 0 && p->hash_ok && p->hashed == b->size) {
		reg_hash_final(&p->hash, got);
		p->hash_ok = false; /* finalized */
		if (strcmp(got, b->digest) != 0) {
			push_fail(p, "push: %s hashes to %s, not %s (changed while pushing?)",
				  b->path, got, b->digest);
			return;
		}
	}
	send_step(p);
}

static void read_more(struct push *p);

static void on_read(uv_fs_t *req)
{
	struct push *p = req->data;
	ssize_t n = req->result;

	uv_fs_req_cleanup(req);
	if (push_gone(p))
		return;
	if (n < 0) {
		push_fail(p, "push: reading %s: %s", p->plan.blobs[p->blob_i].path,
			  uv_strerror((int)n));
		return;
	}
	if (n == 0) {
		push_fail(p, "push: %s ended early (it shrank while pushing?)",
			  p->plan.blobs[p->blob_i].path);
		return;
	}
	p->buf_len += (uint64_t)n;
	read_more(p);
}

static void read_more(struct push *p)
{
	uv_buf_t b;

	if (p->buf_len == p->step.len) {
		step_ready(p);
		return;
	}
	b = uv_buf_init(p->buf + p->buf_len, (unsigned)(p->step.len - p->buf_len));
	p->fsreq.data = p;
	p->pending++;
	uv_fs_read(p->loop, &p->fsreq, p->fd, &b, 1, (int64_t)(p->step.off + p->buf_len),
		   on_read);
}

static void upload_step(struct push *p)
{
	reg_step_release(&p->step);
	reg_upload_next(&p->up, &p->step);
	kpl_debug(LOG, "blob %s: [%s] %s", p->up.digest, reg_up_state_name(p->up.state),
		  p->step.method);
	if (!p->step.len) {
		step_ready(p);
		return;
	}
	if (p->step.len > p->buf_cap) {
		free(p->buf);
		p->buf_cap = (size_t)p->step.len;
		p->buf = kpl_malloc(p->buf_cap);
	}
	p->buf_len = 0;
	read_more(p);
}

static void start_upload(struct push *p)
{
	struct reg_blob *b = &p->plan.blobs[p->blob_i];

	reg_upload_init(&p->up, p->base, p->repo, b->digest, b->size,
			p->promote ? 0 : p->chunk_size, p->promote ? p->src.repo : NULL);
	reg_hash_init(&p->hash);
	p->hashed = 0;
	p->hash_ok = true;
	if (p->promote) {
		upload_step(p); /* a mount: no data */
		return;
	}
	/* A blob of a layout in the workspace (a stage's command wrote it):
	 * opened without following a symlink out of it; a small sync call. */
	if ((p->fd = kpl_open_ws(b->path, O_RDONLY | O_CLOEXEC)) < 0) {
		p->fd = -1;
		push_fail(p, "push: %s: %s", b->path, strerror(errno));
		return;
	}
	upload_step(p);
}

static void on_blob_head(struct push *p, struct http_response *resp)
{
	struct reg_blob *b = &p->plan.blobs[p->blob_i];
	struct reg_reply rr;
	struct kpl_err err = { 0 };
	char sd[32];

	reply_view(resp, &rr);
	if (resp->status == 200) {
		if (rr.digest && strcmp(rr.digest, b->digest) != 0) {
			char *red = http_redact_url(p->r.url);
			push_fail(p, "push: HEAD %s: Docker-Content-Digest %.80s", red, rr.digest);
			free(red);
			return;
		}
		stage_logf(p->st, "blob %s exists", short_digest(b->digest, sd));
		p->n_exists++;
		p->blob_i++;
		save_progress(p);
		next_blob(p);
		return;
	}
	if (resp->status != 404) {
		reg_reply_error(&err, "HEAD", p->r.url, &rr);
		push_fail(p, "push: %s", err.msg);
		return;
	}
	start_upload(p);
}

static void next_blob(struct push *p)
{
	char *rest;

	if (p->blob_i >= p->plan.n_blobs) {
		start_manifests(p);
		return;
	}
	rest = kpl_asprintf("/blobs/%s", p->plan.blobs[p->blob_i].digest);
	new_req(p, "HEAD", reg_api_url(p->base, p->repo, rest), on_blob_head);
	free(rest);
	push_issue(p, &p->r);
}

static void start_blobs(struct push *p)
{
	push_set_phase(p, PUSH_BLOBS);
	if (p->same_repo) {
		stage_logf(p->st, "promoting within %s: no blob to copy", p->repo);
		p->blob_i = p->plan.n_blobs;
	}
	next_blob(p);
}

/* ---------------------------------------------------------------------- */
/* Promote: the source manifest(s) */

static void fetch_manifest(struct push *p, const char *ref);

static void on_source_manifest(struct push *p, struct http_response *resp)
{
	struct reg_reply rr;
	struct kpl_err err = { 0 };
	bool is_top = p->plan.n_manifests == 0;
	const char *want = is_top ? p->src.digest : p->top.children[p->child_i].digest;
	struct reg_manifest child, *parsed = is_top ? &p->top : &child;
	char sd[32], *red;

	reply_view(resp, &rr);
	if (resp->status != 200) {
		reg_reply_error(&err, "GET", p->r.url, &rr);
		push_fail(p, "push: %s", err.msg);
		return;
	}
	if (reg_plan_add_manifest(&p->plan, rr.body, rr.body_len, rr.content_type, want,
				  parsed, &err)) {
		red = http_redact_url(p->r.url);
		push_fail(p, "push: GET %s: %s", red, err.msg);
		free(red);
		return;
	}
	if (rr.digest && strcmp(rr.digest, p->plan.manifests[p->plan.n_manifests - 1].digest)) {
		red = http_redact_url(p->r.url);
		push_fail(p, "push: GET %s: Docker-Content-Digest %.80s, but the bytes hash to %s",
			  red, rr.digest, p->plan.manifests[p->plan.n_manifests - 1].digest);
		free(red);
		return;
	}
	if (is_top) {
		stage_logf(p->st, "source %s/%s%s%s is %s (%s)", p->host, p->src.repo,
			   p->src.digest ? "@" : ":", p->src.digest ? p->src.digest : p->src.tag,
			   short_digest(p->plan.manifests[0].digest, sd),
			   reg_media_name(p->top.media));
	} else {
		bool nested = reg_media_is_index(child.media);
		reg_manifest_release(&child);
		if (nested) {
			push_fail(p, "push: index %s names another index (%s); kpl copies one "
				  "level", p->plan.manifests[0].digest,
				  p->top.children[p->child_i].digest);
			return;
		}
		p->child_i++;
	}
	if (reg_media_is_index(p->top.media) && !p->same_repo &&
	    p->child_i < p->top.n_children) {
		fetch_manifest(p, p->top.children[p->child_i].digest);
		return;
	}
	if (p->plan.n_manifests > 1)
		reg_plan_move_to_end(&p->plan, 0); /* children first */
	start_blobs(p);
}

static void fetch_manifest(struct push *p, const char *ref)
{
	char *rest = kpl_asprintf("/manifests/%s", ref);
	struct push_req *r = new_req(p, "GET", reg_api_url(p->base, p->src.repo, rest),
				     on_source_manifest);

	free(rest);
	req_header(r, "Accept", reg_manifest_accept());
	push_issue(p, r);
}

static void after_login(struct push *p)
{
	if (p->promote) {
		push_set_phase(p, PUSH_RESOLVE);
		fetch_manifest(p, p->src.digest ? p->src.digest : p->src.tag);
	} else {
		start_blobs(p);
	}
}

/* ---------------------------------------------------------------------- */
/* Start */

static void ping(struct push *p)
{
	struct push_req *r;

	push_set_phase(p, PUSH_PING);
	r = new_req(p, "GET", reg_api_url(p->base, "", ""), on_ping);
	r->no_auth = true;
	push_issue(p, r);
}

static void layout_work(uv_work_t *w)
{
	struct push *p = w->data;

	p->work_rc = reg_layout_load(p->layout_dir, &p->plan, &p->work_err);
}

static void layout_done(uv_work_t *w, int status)
{
	struct push *p = w->data;
	uint64_t total = 0;
	char hs[32], sd[32];

	if (push_gone(p))
		return;
	if (status || p->work_rc) {
		push_fail(p, "push: %s", status ? uv_strerror(status) : p->work_err.msg);
		return;
	}
	for (size_t i = 0; i < p->plan.n_blobs; i++)
		total += p->plan.blobs[i].size;
	reg_human_size(total, hs, sizeof hs);
	stage_logf(p->st, "layout %s: manifest %s (%s), %zu blobs, %s",
		   p->layout_dir + strlen(stage_workspace(p->st)) + 1,
		   short_digest(p->plan.manifests[p->plan.n_manifests - 1].digest, sd),
		   reg_media_name(p->plan.manifests[p->plan.n_manifests - 1].media),
		   p->plan.n_blobs, hs);
	ping(p);
}

static void on_recorded(struct stage *st, int status, void *data)
{
	struct push *p = data;

	(void)st;
	if (push_gone(p))
		return;
	if (status) {
		push_fail(p, "push: cannot record resume data: %s", kpl_strerror(status));
		return;
	}
	if (p->layout_dir) {
		push_set_phase(p, PUSH_LAYOUT);
		p->work.data = p;
		p->pending++;
		uv_queue_work(p->loop, &p->work, layout_work, layout_done);
	} else {
		ping(p);
	}
}

static void add_tag(struct push *p, const char *t)
{
	p->tags = kpl_realloc(p->tags, (p->n_tags + 1) * sizeof *p->tags);
	p->tags[p->n_tags++] = kpl_strdup(t);
}

/* Reads and checks `with` (templates expanded) into p. */
static int push_setup(struct push *p, struct kpl_err *err)
{
	struct stage *st = p->st;
	const struct pl_node *tags = stage_with_get(st, "tags");
	char *from = stage_expand(st, stage_with_get(st, "from"));
	char *image = stage_expand(st, stage_with_get(st, "image"));
	char *chunk = stage_expand(st, stage_with_get(st, "chunk_size"));
	int rc = 0;

	p->repo = stage_expand(st, stage_with_get(st, "repository"));
	if (!p->repo || !reg_repo_valid(p->repo)) {
		rc = kpl_errf(err, KPL_EINVAL, "push: repository \"%s\" is not a repository name",
			      p->repo ? p->repo : "");
		goto out;
	}
	if ((rc = stage_endpoint(st, CFG_REGISTRY, "registry", &p->ep, err)))
		goto out;
	p->base = kpl_strdup(p->ep.url);
	p->host = reg_url_host(p->base);
	if (!p->host) {
		rc = kpl_errf(err, KPL_EINVAL, "push: registry %s: url has no host",
			      p->ep.ep->name);
		goto out;
	}
	if (tags && tags->type == PL_SEQ) {
		for (size_t i = 0; i < tags->n; i++) {
			char *t = stage_expand(st, tags->items[i]);
			add_tag(p, t ? t : "");
			free(t);
		}
	} else if (tags) {
		char *t = stage_expand(st, tags), *save = NULL;
		for (char *tok = strtok_r(t, ", \t", &save); tok; tok = strtok_r(NULL, ", \t", &save))
			add_tag(p, tok);
		free(t);
	} else {
		add_tag(p, stage_run_id(st));
	}
	if (!p->n_tags) {
		rc = kpl_errf(err, KPL_EINVAL, "push: tags: empty");
		goto out;
	}
	for (size_t i = 0; i < p->n_tags; i++)
		if (!reg_tag_valid(p->tags[i])) {
			rc = kpl_errf(err, KPL_EINVAL, "push: tags: \"%s\" is not a tag "
				      "([A-Za-z0-9_][A-Za-z0-9._-]{0,127})", p->tags[i]);
			goto out;
		}
	p->chunk_size = PUSH_DEFAULT_CHUNK;
	if (chunk) {
		p->chunk_size = parse_size(chunk);
		if (p->chunk_size < PUSH_MIN_CHUNK || p->chunk_size > PUSH_MAX_CHUNK) {
			rc = kpl_errf(err, KPL_EINVAL, "push: chunk_size \"%s\": must be 1KiB to "
				      "256MiB", chunk);
			goto out;
		}
	}
	if (from) {
		const char *dir = from + 4;
		if (strncmp(from, "oci:", 4) != 0 || !*dir || dir[0] == '/' ||
		    !strcmp(dir, "..") || !strncmp(dir, "../", 3) || strstr(dir, "/../") ||
		    (strlen(dir) >= 3 && !strcmp(dir + strlen(dir) - 3, "/.."))) {
			rc = kpl_errf(err, KPL_EINVAL, "push: from \"%s\": must be oci:DIR with DIR "
				      "inside the run's workspace", from);
			goto out;
		}
		p->layout_dir = kpl_asprintf("%s/%s", stage_workspace(st), dir);
	} else {
		if ((rc = reg_ref_parse(image, &p->src, err))) {
			char tmp[sizeof err->msg];
			snprintf(tmp, sizeof tmp, "%s", err->msg);
			kpl_errf(err, rc, "push: %s", tmp);
			goto out;
		}
		if (p->src.host && strcmp(p->src.host, p->host) != 0) {
			rc = kpl_errf(err, KPL_EINVAL, "push: image %s is on %s, not on registry "
				      "%s (%s); kpl promotes within one registry", image,
				      p->src.host, p->ep.ep->name, p->host);
			goto out;
		}
		p->promote = true;
		p->same_repo = strcmp(p->src.repo, p->repo) == 0;
	}
	p->scopes[p->n_scopes++] = reg_scope(p->repo, "pull,push");
	if (p->promote && !p->same_repo)
		p->scopes[p->n_scopes++] = reg_scope(p->src.repo, "pull");
out:
	free(from);
	free(image);
	free(chunk);
	return rc;
}

static struct push *push_new(struct stage *st)
{
	struct push *p = kpl_calloc(1, sizeof *p);

	p->st = st;
	p->loop = stage_loop(st);
	p->fd = -1;
	return p;
}

static int push_begin(struct stage *st, const char *resume, struct kpl_err *err)
{
	struct push *p = push_new(st);
	int rc;

	if ((rc = push_setup(p, err))) {
		p->st = NULL;
		push_free(p);
		return rc;
	}
	stage_set_impl(st, p);
	push_set_phase(p, PUSH_RECORD);
	if (resume && *resume) {
		stage_logf(st, "resuming after a restart (had %s); pushes are idempotent by "
			   "digest: starting over, skipping what the registry has", resume);
		p->resumed = true;
	}
	p->pending++;
	stage_record_resume(st, 0, 0, resume && *resume ? resume : "{\"blobs_done\":0}",
			    on_recorded, p);
	return 0;
}

static int push_start(struct stage *st, struct kpl_err *err)
{
	return push_begin(st, NULL, err);
}

static int push_resume(struct stage *st, struct kpl_err *err)
{
	int64_t pid;
	uint64_t pid_start;
	const char *resume;
	char *copy;
	int rc;

	stage_resume_info(st, &pid, &pid_start, &resume);
	if (!resume || !*resume)
		return kpl_errf(err, KPL_ENOTFOUND, "the push had not begun");
	copy = kpl_strdup(resume);
	rc = push_begin(st, copy, err);
	free(copy);
	if (rc)
		return err->code = KPL_ESTATE;
	return 0;
}

static void push_cancel(struct stage *st)
{
	struct push *p = stage_impl(st);

	if (!p || p->finished)
		return;
	p->cancelled = true;
	if (p->req)
		http_request_cancel(p->req);
	/* Whatever else is pending (a file read, the layout, a commit)
	 * reports CANCELLED when it completes. */
}

static void push_abandon(struct stage *st)
{
	struct push *p = stage_impl(st);

	if (!p)
		return;
	p->st = NULL;
	p->finished = true;
	if (p->req)
		http_request_cancel(p->req);
	push_maybe_free(p);
}

/* Every key `with` may hold (the parser checks them, docs_test reads them). */
static const char *const push_with_keys[] = {
	"registry", "repository", "tags", "from", "image", "chunk_size", NULL
};

const struct stage_kind push_kind = {
	.name = "push",
	.with_keys = push_with_keys,
	.check_with = push_check_with,
	.start = push_start,
	.cancel = push_cancel,
	.resume = push_resume,
	.abandon = push_abandon,
};
