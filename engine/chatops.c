/*
 * chatops.c - Slack and DingTalk commands on the HTTP listener (chatops.h).
 *
 * A request goes: verify the signature (nothing of the body is read
 * before) -> refuse a replay -> read the command and the chat user -> map
 * the user -> check scope and pipelines -> ops.h call. A `job` lives from
 * the ops call to the engine's answer; the answer goes back as a
 * response_url POST (Slack) or as the held request's response (DingTalk).
 */
#include "engine/chatops.h"

#include <ctype.h>
#include <errno.h>
#include <jansson.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/sha.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/metrics.h"
#include "engine/ops.h"
#include "engine/secrets.h"
#include "pipelines/expr.h"
#include "pipelines/pipeline.h"
#include "pipelines/template.h"
#include "base/http.h"
#include "store/store.h"

#define LOG "chatops"
#define MAX_USERS 10000
#define MAX_TEXT 1500
#define POST_TIMEOUT_MS 15000

/* Ordered like kpl's token scopes: each allows what the ones below allow. */
enum scope { SCOPE_NONE, SCOPE_READ, SCOPE_SUBMIT, SCOPE_APPROVE, SCOPE_ADMIN };
static const char *const scope_names[] = { "none", "read", "submit", "approve", "admin" };

enum svc { SVC_SLACK, SVC_DINGTALK, SVC_LAST };
static const char *const svc_names[SVC_LAST] = { "slack", "dingtalk" };

struct chat_user {
	char *id;       /* Slack user id (U123), DingTalk senderStaffId */
	char *identity; /* the kpl identity: audit entries, approvals' "by" */
	enum scope scope;
	char **pipelines; /* n_pipelines == 0: any pipeline */
	size_t n_pipelines;
};

struct replay_slot {
	int64_t expires_ms; /* 0: free */
	unsigned char key[SHA256_DIGEST_LENGTH];
};

struct service {
	bool on;
	char *secret;     /* config text: a value or ${{ secrets.NAME }} */
	char *url_prefix; /* Slack: response_url must start with it */
	char *team_id;    /* Slack: the one workspace taken; NULL: any */
	struct chat_user *users;
	size_t n_users;
	struct replay_slot *replay; /* CHATOPS_REPLAY_SLOTS, made on first use */
};

struct job;

struct chatops {
	uv_loop_t *loop;
	struct engine *eng;
	struct service svc[SVC_LAST];
	struct httpd_route routes[SVC_LAST];
	size_t n_routes;
	struct http_client *http; /* NULL until the first response_url post */
	struct job *jobs;         /* waiting for the engine */
	bool stopping;
	void (*done)(void *);
	void *done_data;
};

/* One command between its ops call and the engine's answer. */
struct job {
	struct chatops *c;
	struct job *prev, *next;
	enum svc svc;
	struct chatops_cmd cmd;
	struct httpd_req *req; /* DingTalk: answered with the outcome */
	char *response_url;    /* Slack: where the outcome goes; NULL: nowhere */
	bool button;           /* replace the clicked message */
	char identity[200];
};

static void maybe_done(struct chatops *c);

/* ---------------------------------------------------------------------- */
/* Verifying */

static bool all_digits(const char *s, size_t max)
{
	size_t n = 0;

	if (!s || !*s)
		return false;
	for (; s[n]; n++)
		if (!isdigit((unsigned char)s[n]) || n >= max)
			return false;
	return true;
}

enum chatops_verdict chatops_slack_verify(const char *secret, const char *timestamp,
					  const char *signature, const char *body,
					  size_t len, int64_t now_s)
{
	static const char hex[] = "0123456789abcdef";
	unsigned char mac[EVP_MAX_MD_SIZE];
	unsigned int mlen = 0;
	char want[3 + 64 + 1], *msg;
	size_t tl;
	int64_t ts;
	bool ok;

	if (!secret || !*secret || !all_digits(timestamp, 12) || !signature ||
	    strlen(signature) != 3 + 64)
		return CHATOPS_BAD_SIGNATURE;
	ts = strtoll(timestamp, NULL, 10);
	if (ts < now_s - CHATOPS_SLACK_WINDOW_S || ts > now_s + CHATOPS_SLACK_WINDOW_S)
		return CHATOPS_STALE;
	/* "v0:" TS ":" body, signed in one go. */
	tl = strlen(timestamp);
	msg = kpl_malloc(3 + tl + 1 + len + 1);
	memcpy(msg, "v0:", 3);
	memcpy(msg + 3, timestamp, tl);
	msg[3 + tl] = ':';
	memcpy(msg + 4 + tl, body, len);
	ok = HMAC(EVP_sha256(), secret, (int)strlen(secret), (const unsigned char *)msg,
		  4 + tl + len, mac, &mlen) && mlen == 32;
	free(msg);
	if (!ok)
		return CHATOPS_BAD_SIGNATURE;
	memcpy(want, "v0=", 3);
	for (unsigned i = 0; i < 32; i++) {
		want[3 + 2 * i] = hex[mac[i] >> 4];
		want[3 + 2 * i + 1] = hex[mac[i] & 15];
	}
	want[67] = '\0';
	ok = CRYPTO_memcmp(want, signature, 67) == 0;
	OPENSSL_cleanse(mac, sizeof mac);
	OPENSSL_cleanse(want, sizeof want);
	return ok ? CHATOPS_OK : CHATOPS_BAD_SIGNATURE;
}

enum chatops_verdict chatops_dingtalk_verify(const char *secret, const char *timestamp,
					     const char *sign, int64_t now_ms)
{
	unsigned char mac[EVP_MAX_MD_SIZE];
	unsigned int mlen = 0;
	unsigned char want[45];
	char *msg;
	int64_t ts;
	bool ok;

	if (!secret || !*secret || !all_digits(timestamp, 15) || !sign || strlen(sign) != 44)
		return CHATOPS_BAD_SIGNATURE;
	ts = strtoll(timestamp, NULL, 10);
	if (ts < now_ms - CHATOPS_DINGTALK_WINDOW_MS || ts > now_ms + CHATOPS_DINGTALK_WINDOW_MS)
		return CHATOPS_STALE;
	msg = kpl_asprintf("%s\n%s", timestamp, secret);
	ok = HMAC(EVP_sha256(), secret, (int)strlen(secret), (const unsigned char *)msg,
		  strlen(msg), mac, &mlen) && mlen == 32;
	OPENSSL_cleanse(msg, strlen(msg));
	free(msg);
	if (!ok)
		return CHATOPS_BAD_SIGNATURE;
	EVP_EncodeBlock(want, mac, 32);
	ok = CRYPTO_memcmp(want, sign, 44) == 0;
	OPENSSL_cleanse(mac, sizeof mac);
	OPENSSL_cleanse(want, sizeof want);
	return ok ? CHATOPS_OK : CHATOPS_BAD_SIGNATURE;
}

/*
 * Remembers sig until expires_ms. 0 for a new one; KPL_EEXISTS for a
 * replay; KPL_EFULL when every slot holds a live signature (forgetting one
 * would let its replay through).
 */
static int replay_add(struct service *s, const char *sig, int64_t now_ms, int64_t expires_ms)
{
	unsigned char key[SHA256_DIGEST_LENGTH];
	struct replay_slot *free_slot = NULL;

	if (!s->replay)
		s->replay = kpl_calloc(CHATOPS_REPLAY_SLOTS, sizeof *s->replay);
	SHA256((const unsigned char *)sig, strlen(sig), key);
	for (size_t i = 0; i < CHATOPS_REPLAY_SLOTS; i++) {
		struct replay_slot *r = &s->replay[i];
		if (r->expires_ms > now_ms) {
			if (memcmp(r->key, key, sizeof key) == 0)
				return KPL_EEXISTS;
		} else if (!free_slot) {
			free_slot = r;
		}
	}
	if (!free_slot)
		return KPL_EFULL;
	free_slot->expires_ms = expires_ms;
	memcpy(free_slot->key, key, sizeof key);
	return 0;
}

/* ---------------------------------------------------------------------- */
/* Commands */

static const char *const verb_names[] = {
#define CHATOPS_VERB_NAME(id, name) name,
	CHATOPS_VERB_MAP(CHATOPS_VERB_NAME)
#undef CHATOPS_VERB_NAME
};

static const char usage[] =
	"commands: approve RUN STAGE [comment] | reject RUN STAGE [comment] | cancel RUN | "
	"retry RUN | rollback CLUSTER/NAMESPACE/DEPLOYMENT [REVISION] | status RUN | help";

/* The next blank-separated word of *p (cut in place), or NULL. */
static char *word(char **p)
{
	char *s = *p, *w;

	while (*s && isspace((unsigned char)*s))
		s++;
	if (!*s) {
		*p = s;
		return NULL;
	}
	w = s;
	while (*s && !isspace((unsigned char)*s))
		s++;
	if (*s)
		*s++ = '\0';
	*p = s;
	return w;
}

int chatops_parse(const char *text, struct chatops_cmd *cmd, struct kpl_err *err)
{
	char *p = cmd->buf, *v, *rest;
	size_t n;

	memset(cmd, 0, offsetof(struct chatops_cmd, buf));
	if (!text || strlen(text) >= sizeof cmd->buf)
		return kpl_errf(err, KPL_EINVAL, "a command of at most %zu bytes: %s",
				sizeof cmd->buf - 1, usage);
	snprintf(cmd->buf, sizeof cmd->buf, "%s", text);
	if (!(v = word(&p)))
		return kpl_errf(err, KPL_EINVAL, "%s", usage);
	for (cmd->verb = 0; cmd->verb < CHATOPS_VERB_LAST; cmd->verb++)
		if (strcasecmp(verb_names[cmd->verb], v) == 0)
			break;
	switch (cmd->verb) {
	case CHATOPS_HELP:
		return 0;
	case CHATOPS_STATUS:
	case CHATOPS_CANCEL:
	case CHATOPS_RETRY:
		if (!(cmd->run = word(&p)) || word(&p))
			return kpl_errf(err, KPL_EINVAL, "usage: %s RUN", verb_names[cmd->verb]);
		return 0;
	case CHATOPS_APPROVE:
	case CHATOPS_REJECT:
		if (!(cmd->run = word(&p)) || !(cmd->stage = word(&p)))
			return kpl_errf(err, KPL_EINVAL, "usage: %s RUN STAGE [comment]",
					verb_names[cmd->verb]);
		for (rest = p; *rest && isspace((unsigned char)*rest); rest++)
			;
		for (n = strlen(rest); n && isspace((unsigned char)rest[n - 1]); n--)
			rest[n - 1] = '\0';
		cmd->comment = *rest ? rest : NULL;
		return 0;
	case CHATOPS_ROLLBACK:
		if (!(cmd->target = word(&p)) || ((cmd->revision = word(&p)) && word(&p)))
			return kpl_errf(err, KPL_EINVAL,
					"usage: rollback CLUSTER/NAMESPACE/DEPLOYMENT [REVISION]");
		return 0;
	case CHATOPS_VERB_LAST:
		break;
	}
	return kpl_errf(err, KPL_EINVAL, "unknown command %.40s; %s", v, usage);
}

/* The scope a verb needs: the gRPC method's (api/rpc_pipelines.c). */
static enum scope verb_scope(enum chatops_verb v)
{
	switch (v) {
	case CHATOPS_HELP: return SCOPE_NONE;
	case CHATOPS_STATUS: return SCOPE_READ;
	case CHATOPS_CANCEL:
	case CHATOPS_RETRY: return SCOPE_SUBMIT;
	default: return SCOPE_APPROVE;
	}
}

/* ---------------------------------------------------------------------- */
/* Config */

static int cfg_err(struct kpl_err *err, const char *file, const struct pl_node *n,
		   const char *path, const char *msg)
{
	return kpl_errf(err, KPL_EINVAL, "%s:%d:%d: %s: %s", file, n->pos.line, n->pos.col,
			path, msg);
}

static int parse_user(struct service *s, const char *file, const char *path,
		      const struct pl_node *k, const struct pl_node *v, struct kpl_err *err)
{
	struct chat_user *u;
	char sub[400];

	snprintf(sub, sizeof sub, "%s.%s", path, k->scalar);
	if (v->type != PL_MAP)
		return cfg_err(err, file, v, sub, "must be a mapping (identity, scope, pipelines)");
	if (s->n_users == MAX_USERS)
		return cfg_err(err, file, k, sub, "too many users");
	s->users = kpl_realloc(s->users, (s->n_users + 1) * sizeof *s->users);
	u = &s->users[s->n_users++];
	memset(u, 0, sizeof *u);
	u->id = kpl_strdup(k->scalar);
	for (size_t i = 0; i < v->n; i++) {
		const char *key = v->keys[i]->scalar;
		const struct pl_node *val = v->items[i];
		char kp[500];

		snprintf(kp, sizeof kp, "%s.%s", sub, key);
		if (strcmp(key, "identity") == 0 && val->type == PL_SCALAR && val->scalar[0] &&
		    strlen(val->scalar) < 100) {
			u->identity = kpl_strdup(val->scalar);
		} else if (strcmp(key, "identity") == 0) {
			return cfg_err(err, file, val, kp, "a name of 1 to 99 characters");
		} else if (strcmp(key, "scope") == 0) {
			enum scope sc;
			for (sc = SCOPE_READ; sc <= SCOPE_ADMIN; sc++)
				if (val->type == PL_SCALAR && strcmp(val->scalar, scope_names[sc]) == 0)
					break;
			if (sc > SCOPE_ADMIN)
				return cfg_err(err, file, val, kp,
					       "one of read, submit, approve, admin");
			u->scope = sc;
		} else if (strcmp(key, "pipelines") == 0) {
			if (val->type != PL_SEQ)
				return cfg_err(err, file, val, kp, "a list of pipeline names");
			u->pipelines = kpl_calloc(val->n + 1, sizeof *u->pipelines);
			for (size_t j = 0; j < val->n; j++) {
				if (val->items[j]->type != PL_SCALAR || !val->items[j]->scalar[0])
					return cfg_err(err, file, val->items[j], kp,
						       "a list of pipeline names");
				u->pipelines[u->n_pipelines++] = kpl_strdup(val->items[j]->scalar);
			}
		} else {
			return cfg_err(err, file, v->keys[i], kp,
				       "unknown key (allowed: identity, scope, pipelines)");
		}
	}
	if (!u->identity || u->scope == SCOPE_NONE)
		return cfg_err(err, file, k, sub, "needs `identity` and `scope`");
	return 0;
}

static int parse_service(struct chatops *c, enum svc which, const char *file,
			 const struct pl_node *v, struct kpl_err *err)
{
	struct service *s = &c->svc[which];
	const char *secret_key = which == SVC_SLACK ? "signing_secret" : "app_secret";
	char path[100];
	int rc;

	snprintf(path, sizeof path, "chatops.%s", svc_names[which]);
	if (v->type != PL_MAP)
		return cfg_err(err, file, v, path, "must be a mapping of settings");
	s->on = true;
	for (size_t i = 0; i < v->n; i++) {
		const char *key = v->keys[i]->scalar;
		const struct pl_node *val = v->items[i];
		char kp[200];

		snprintf(kp, sizeof kp, "%s.%s", path, key);
		if (strcmp(key, secret_key) == 0 ||
		    (which == SVC_SLACK && strcmp(key, "response_url_prefix") == 0) ||
		    (which == SVC_SLACK && strcmp(key, "team_id") == 0)) {
			if (val->type != PL_SCALAR || !val->scalar[0])
				return cfg_err(err, file, val, kp, "must be a single value");
			if (strcmp(key, "team_id") == 0) {
				free(s->team_id);
				s->team_id = kpl_strdup(val->scalar);
			} else if (strcmp(key, secret_key) == 0) {
				free(s->secret);
				s->secret = kpl_strdup(val->scalar);
			} else {
				if (strncmp(val->scalar, "http://", 7) &&
				    strncmp(val->scalar, "https://", 8))
					return cfg_err(err, file, val, kp,
						       "must start with http:// or https://");
				free(s->url_prefix);
				s->url_prefix = kpl_strdup(val->scalar);
			}
		} else if (strcmp(key, "users") == 0) {
			if (val->type == PL_SCALAR && !val->scalar[0])
				continue;
			if (val->type != PL_MAP)
				return cfg_err(err, file, val, kp, "must map chat user ids to "
					       "{identity, scope, pipelines}");
			for (size_t j = 0; j < val->n; j++)
				if ((rc = parse_user(s, file, kp, val->keys[j], val->items[j], err)))
					return rc;
		} else {
			char msg[200];
			snprintf(msg, sizeof msg, "unknown key (allowed: %s, users%s)", secret_key,
				 which == SVC_SLACK ? ", response_url_prefix, team_id" : "");
			return cfg_err(err, file, v->keys[i], kp, msg);
		}
	}
	if (!s->secret)
		return cfg_err(err, file, v, path, which == SVC_SLACK
			       ? "needs `signing_secret` (Slack app > Basic Information)"
			       : "needs `app_secret` (the robot's AppSecret)");
	if (which == SVC_SLACK && !s->url_prefix)
		s->url_prefix = kpl_strdup("https://hooks.slack.com/");
	return 0;
}

static int parse_config(struct chatops *c, const char *file, struct kpl_err *err)
{
	struct pl_node *root = NULL;
	const struct pl_node *sec;
	char *text;
	size_t len;
	FILE *f;
	int rc = 0;

	if (!(f = fopen(file, "r")))
		return kpl_errf(err, KPL_EIO, "config %s: %s", file, strerror(errno));
	text = kpl_malloc(KPL_MAX_PIPELINE_BYTES + 1);
	len = fread(text, 1, KPL_MAX_PIPELINE_BYTES + 1, f);
	fclose(f);
	/* cfg_load has read the same file already: sizes and syntax are fine. */
	rc = pl_doc_parse(text, len > KPL_MAX_PIPELINE_BYTES ? 0 : len, file, &root, err);
	free(text);
	if (rc)
		return rc;
	if (root->type != PL_MAP || !(sec = pl_map_get(root, "chatops")) ||
	    (sec->type == PL_SCALAR && !sec->scalar[0]))
		goto out;
	if (sec->type != PL_MAP) {
		rc = cfg_err(err, file, sec, "chatops", "must map slack and dingtalk to settings");
		goto out;
	}
	for (size_t i = 0; i < sec->n; i++) {
		enum svc w;
		for (w = 0; w < SVC_LAST; w++)
			if (strcmp(sec->keys[i]->scalar, svc_names[w]) == 0)
				break;
		if (w == SVC_LAST) {
			char kp[200];
			snprintf(kp, sizeof kp, "chatops.%s", sec->keys[i]->scalar);
			rc = cfg_err(err, file, sec->keys[i], kp,
				     "unknown chat (allowed: slack, dingtalk)");
			goto out;
		}
		if ((rc = parse_service(c, w, file, sec->items[i], err)) != 0)
			goto out;
	}
out:
	pl_doc_free(root);
	return rc;
}

static void service_release(struct service *s)
{
	for (size_t i = 0; i < s->n_users; i++) {
		free(s->users[i].id);
		free(s->users[i].identity);
		for (size_t j = 0; j < s->users[i].n_pipelines; j++)
			free(s->users[i].pipelines[j]);
		free(s->users[i].pipelines);
	}
	free(s->users);
	if (s->secret)
		OPENSSL_cleanse(s->secret, strlen(s->secret));
	free(s->secret);
	free(s->url_prefix);
	free(s->team_id);
	free(s->replay);
}

static int secret_lookup(void *data, const struct expr *ref, const char **value)
{
	struct secrets *sec = data;

	if (strcmp(ref->part[0], "secrets") == 0 && ref->n_part == 2 && sec &&
	    (*value = secrets_get(sec, ref->part[1])) != NULL)
		return 0;
	return KPL_ENOTFOUND;
}

/* The service's secret, resolved now (so `kplctl secret set` rotates it);
 * the caller wipes and frees *out. err never holds the value. */
static int service_secret(struct chatops *c, struct service *s, char **out,
			  struct kpl_err *err)
{
	struct kpl_err e2 = { 0 };

	*out = NULL;
	if (!tpl_has_template(s->secret)) {
		*out = kpl_strdup(s->secret);
		return 0;
	}
	if (tpl_expand_str(s->secret, EXPR_ROOT_SECRETS, secret_lookup, engine_secrets(c->eng),
			   out, &e2))
		return kpl_errf(err, KPL_EUNAVAILABLE, "%s (set it with: kplctl secret set NAME)",
				e2.msg);
	return 0;
}

static void wipe_free(char *s)
{
	if (s)
		OPENSSL_cleanse(s, strlen(s));
	free(s);
}

/* ---------------------------------------------------------------------- */
/* Answers */

/* Drops a UTF-8 sequence that snprintf cut at the end of s. */
static void utf8_tail(char *s)
{
	size_t n = strlen(s), i = n, need;

	while (i > 0 && n - i < 4 && ((unsigned char)s[i - 1] & 0xC0) == 0x80)
		i--;
	if (i == 0 || ((unsigned char)s[i - 1] & 0x80) == 0)
		return;
	need = ((unsigned char)s[i - 1] & 0xE0) == 0xC0 ? 2
	     : ((unsigned char)s[i - 1] & 0xF0) == 0xE0 ? 3
	     : ((unsigned char)s[i - 1] & 0xF8) == 0xF0 ? 4 : 1;
	if (n - (i - 1) < need)
		s[i - 1] = '\0';
}

/* Answers req with a chat message: Slack's {"response_type", "text"},
 * DingTalk's {"msgtype":"text"}. */
static void reply(struct httpd_req *req, enum svc svc, bool in_channel, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
static void reply(struct httpd_req *req, enum svc svc, bool in_channel, const char *fmt, ...)
{
	char text[MAX_TEXT];
	json_t *j;
	char *body;
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(text, sizeof text, fmt, ap);
	va_end(ap);
	utf8_tail(text);
	if (svc == SVC_SLACK)
		j = json_pack("{s:s, s:s}", "response_type", in_channel ? "in_channel" : "ephemeral",
			      "text", text);
	else
		j = json_pack("{s:s, s:{s:s}}", "msgtype", "text", "text", "content", text);
	body = j ? json_dumps(j, JSON_COMPACT) : NULL;
	json_decref(j);
	if (body)
		httpd_respond(req, 200, "application/json", body, strlen(body));
	else
		httpd_respondf(req, 200, "%s", text);
	free(body);
}

static void post_done(struct http_response *resp, int status, void *data)
{
	(void)data;
	if (status)
		kpl_warn(LOG, "slack response_url: %s", resp->err.msg);
	else if (resp->status < 200 || resp->status > 299)
		kpl_warn(LOG, "slack response_url: HTTP %ld", resp->status);
}

/* POSTs text to a Slack response_url (already checked against the prefix). */
static void post_slack(struct chatops *c, const char *url, bool replace, const char *text)
{
	static const struct http_header hdr[] = { { "Content-Type", "application/json" } };
	struct http_request_options o = { 0 };
	struct kpl_err err = { 0 };
	json_t *j;
	char *body;

	if (!c->http && http_client_new(c->loop, NULL, &c->http, &err)) {
		kpl_warn(LOG, "slack response_url: %s", err.msg);
		return;
	}
	j = json_pack("{s:s, s:s, s:b}", "response_type", "in_channel", "text", text,
		      "replace_original", replace);
	body = j ? json_dumps(j, JSON_COMPACT) : NULL;
	json_decref(j);
	if (!body)
		return;
	o.method = "POST";
	o.url = url;
	o.headers = hdr;
	o.n_headers = 1;
	o.body = body;
	o.body_len = strlen(body);
	o.timeout_ms = POST_TIMEOUT_MS;
	/* The URL is a credential of sorts: it lets anyone post as the app. */
	o.log_url = "slack response_url";
	o.on_done = post_done;
	if (http_request_start(c->http, &o, NULL, &err))
		kpl_warn(LOG, "slack response_url: %s", err.msg);
	free(body);
}

/* What a job did, as a person reads it ("alice approved stage deploy of run r-1"). */
static void job_outcome(const struct job *j, int status, const char *run_id, char *out,
			size_t size)
{
	const struct chatops_cmd *m = &j->cmd;
	const char *verb = verb_names[m->verb];

	if (status) {
		if (m->verb == CHATOPS_ROLLBACK)
			snprintf(out, size, "%s's rollback of %s failed: %s", j->identity, m->target,
				 kpl_strerror(status));
		else
			snprintf(out, size, "%s's %s of run %s failed: %s", j->identity, verb,
				 m->run, kpl_strerror(status));
		return;
	}
	switch (m->verb) {
	case CHATOPS_APPROVE:
	case CHATOPS_REJECT:
		snprintf(out, size, "%s %s stage %s of run %s%s%s", j->identity,
			 m->verb == CHATOPS_APPROVE ? "approved" : "rejected", m->stage, m->run,
			 m->comment ? ": " : "", m->comment ? m->comment : "");
		break;
	case CHATOPS_CANCEL:
		snprintf(out, size, "%s cancelled run %s", j->identity, m->run);
		break;
	case CHATOPS_RETRY:
		snprintf(out, size, "%s retried run %s", j->identity, m->run);
		break;
	case CHATOPS_ROLLBACK:
		snprintf(out, size, "%s started a rollback of %s%s%s: run %s", j->identity,
			 m->target, m->revision ? " to revision " : "",
			 m->revision ? m->revision : "", run_id ? run_id : "?");
		break;
	default:
		snprintf(out, size, "%s: done", verb);
	}
}

static void job_link(struct job *j)
{
	struct chatops *c = j->c;

	j->prev = NULL;
	j->next = c->jobs;
	if (c->jobs)
		c->jobs->prev = j;
	c->jobs = j;
}

static void job_unlink(struct job *j)
{
	struct chatops *c = j->c;

	if (j->prev)
		j->prev->next = j->next;
	else
		c->jobs = j->next;
	if (j->next)
		j->next->prev = j->prev;
	j->prev = j->next = NULL;
}

static void job_free(struct job *j)
{
	struct chatops *c = j->c;

	job_unlink(j);
	free(j->response_url);
	free(j);
	maybe_done(c);
}

/* The engine's answer (engine_submit_cb). */
static void job_done(void *data, int status, const char *run_id)
{
	struct job *j = data;
	char text[MAX_TEXT];

	job_outcome(j, status, run_id, text, sizeof text);
	kpl_info(LOG, "%s", text);
	if (j->req)
		reply(j->req, j->svc, true, "%s", text);
	else if (j->response_url && !j->c->stopping)
		post_slack(j->c, j->response_url, j->button, text);
	job_free(j);
}

/* ---------------------------------------------------------------------- */
/* Running a command */

static const struct chat_user *find_user(const struct service *s, const char *id)
{
	for (size_t i = 0; id && i < s->n_users; i++)
		if (strcmp(s->users[i].id, id) == 0)
			return &s->users[i];
	return NULL;
}

static bool user_has_pipeline(const struct chat_user *u, const char *name)
{
	for (size_t i = 0; i < u->n_pipelines; i++)
		if (strcmp(u->pipelines[i], name) == 0)
			return true;
	return false;
}

static const char *run_state_name(int s)
{
	static const char *const n[] = { "unspecified", "queued", "running", "succeeded",
					 "failed", "cancelled" };
	return s >= 0 && s < (int)KPL_ARRAY_SIZE(n) ? n[s] : "?";
}

static const char *stage_state_name(int s)
{
	static const char *const n[] = { "unspecified", "pending", "running", "succeeded",
					 "failed", "skipped", "cancelled", "waiting" };
	return s >= 0 && s < (int)KPL_ARRAY_SIZE(n) ? n[s] : "?";
}

/* "run r-1 (pipeline shop): running; build succeeded, deploy waiting". */
static void status_text(struct store *st, const Kpl__Store__V1__RunRecord *rec, char *out,
			size_t size)
{
	Kpl__Store__V1__StageRecord **stages = NULL;
	size_t n = 0, used;

	used = (size_t)snprintf(out, size, "run %s (pipeline %s): %s", rec->run->id,
				rec->run->pipeline_name, run_state_name(rec->run->state));
	if (rec->run->message && rec->run->message[0] && used < size)
		used += (size_t)snprintf(out + used, size - used, " (%s)", rec->run->message);
	if (store_get_stages(st, rec->run->id, &stages, &n) == 0) {
		for (size_t i = 0; i < n && used < size; i++) {
			const Kpl__V1__StageStatus *s = stages[i]->status;
			if (!s)
				continue;
			used += (size_t)snprintf(out + used, size - used, "%s%s %s",
						 i ? ", " : "; ", s->name, stage_state_name(s->state));
		}
		store_free_stages(stages, n);
	}
	utf8_tail(out);
}

static void run_command(struct chatops *c, enum svc svc, struct httpd_req *req,
			const char *team, const char *uid, const char *text,
			const char *response_url, bool button)
{
	struct service *s = &c->svc[svc];
	const struct chat_user *u = find_user(s, uid);
	Kpl__Store__V1__RunRecord *rec = NULL;
	struct kpl_err err = { 0 };
	struct job *j = NULL;
	const char *result;
	enum chatops_verb verb;
	char who[400], ack[MAX_TEXT];
	int rc;

	if (s->team_id && (!team || strcmp(team, s->team_id))) {
		/* Another workspace of an app installed in several. */
		kpl_info(LOG, "slack workspace %.100s is not chatops.slack.team_id: refused",
			 team ? team : "(none)");
		reply(req, svc, false, "kpl takes commands from one Slack workspace only "
		      "(chatops.slack.team_id), and this is not it, so kpl does nothing");
		metrics_webhook(svc_names[svc], "forbidden");
		return;
	}
	if (!u) {
		kpl_info(LOG, "%s user %.100s is not mapped to a kpl identity: refused",
			 svc_names[svc], uid ? uid : "(none)");
		reply(req, svc, false, "you (%s user %.100s) are not mapped to a kpl identity, so "
		      "kpl does nothing: ask kpld's admin to add chatops.%s.users.%.100s to its "
		      "config", svc_names[svc], uid ? uid : "?", svc_names[svc], uid ? uid : "?");
		metrics_webhook(svc_names[svc], "unmapped");
		return;
	}
	j = kpl_calloc(1, sizeof *j);
	j->c = c;
	j->svc = svc;
	j->button = button;
	snprintf(j->identity, sizeof j->identity, "%s", u->identity);
	result = "bad_request";
	if (chatops_parse(text, &j->cmd, &err)) {
		reply(req, svc, false, "%s", err.msg);
		goto out;
	}
	result = "forbidden";
	if (j->cmd.verb == CHATOPS_HELP) {
		result = "accepted";
		reply(req, svc, false, "%s", usage);
		goto out;
	}
	if (u->scope < verb_scope(j->cmd.verb)) {
		kpl_info(LOG, "%s:%s (%s): %s refused: scope %s", svc_names[svc], u->id,
			 u->identity, verb_names[j->cmd.verb], scope_names[u->scope]);
		reply(req, svc, false, "%s may not %s: the chat mapping's scope is %s, and %s "
		      "needs %s", u->identity, verb_names[j->cmd.verb], scope_names[u->scope],
		      verb_names[j->cmd.verb], scope_names[verb_scope(j->cmd.verb)]);
		goto out;
	}
	if (j->cmd.run) {
		if (ops_check_run_id("RUN", j->cmd.run, &err)) {
			result = "bad_request";
			reply(req, svc, false, "%s", err.msg);
			goto out;
		}
		rc = store_get_run(engine_store(c->eng), j->cmd.run, &rec);
		if (rc || !rec->run) {
			result = "bad_request";
			reply(req, svc, false, "run %s: %s", j->cmd.run,
			      rc == KPL_ENOTFOUND ? "not found" : kpl_strerror(rc ? rc : KPL_ECORRUPT));
			goto out;
		}
		if (u->n_pipelines && !user_has_pipeline(u, rec->run->pipeline_name)) {
			reply(req, svc, false, "%s may not act on run %s: it is of pipeline %s, and "
			      "the chat mapping is limited to other pipelines", u->identity,
			      j->cmd.run, rec->run->pipeline_name);
			goto out;
		}
	} else if (u->n_pipelines) {
		/* A rollback names a deployment, not a pipeline: closed to a
		 * limited mapping, as RollbackRelease is to a limited token. */
		reply(req, svc, false, "%s may not roll back: the chat mapping is limited to "
		      "pipelines, and a rollback is about a deployment", u->identity);
		goto out;
	}
	result = "accepted";
	if (j->cmd.verb == CHATOPS_STATUS) {
		char st[MAX_TEXT];
		status_text(engine_store(c->eng), rec, st, sizeof st);
		reply(req, svc, false, "%s", st);
		goto out;
	}
	snprintf(who, sizeof who, "%s:%s (%s)", svc_names[svc], u->id, u->identity);
	/* The job is whole and listed before the ops call: its callback is
	 * the engine's from then on, whenever it runs. */
	if (svc == SVC_DINGTALK) {
		j->req = req; /* answered with the outcome */
	} else if (response_url &&
		   strncmp(response_url, s->url_prefix, strlen(s->url_prefix)) == 0) {
		j->response_url = kpl_strdup(response_url);
	} else if (response_url) {
		kpl_warn(LOG, "slack response_url does not start with "
			 "chatops.slack.response_url_prefix: no outcome posted");
	}
	if (j->cmd.stage)
		snprintf(ack, sizeof ack, "%s asked to %s stage %s of run %s; the outcome follows",
			 u->identity, verb_names[j->cmd.verb], j->cmd.stage, j->cmd.run);
	else
		snprintf(ack, sizeof ack, "%s asked to %s %s%s; the outcome follows", u->identity,
			 verb_names[j->cmd.verb], j->cmd.run ? "run " : "",
			 j->cmd.run ? j->cmd.run : j->cmd.target);
	job_link(j);
	verb = j->cmd.verb;
	switch (verb) {
	case CHATOPS_APPROVE:
	case CHATOPS_REJECT:
		rc = ops_approve(c->eng, who, j->cmd.run, j->cmd.stage,
				 j->cmd.verb == CHATOPS_APPROVE, j->cmd.comment, u->identity,
				 job_done, j, &err);
		break;
	case CHATOPS_CANCEL:
		rc = ops_cancel(c->eng, who, j->cmd.run, job_done, j, &err);
		break;
	case CHATOPS_RETRY:
		rc = ops_retry(c->eng, who, j->cmd.run, job_done, j, &err);
		break;
	default:
		rc = ops_rollback(c->eng, who, j->cmd.target, j->cmd.revision, job_done, j, &err);
		break;
	}
	if (rc) {
		job_unlink(j);
		free(j->response_url);
		result = "bad_request";
		kpl_info(LOG, "%s %s: %s", who, verb_names[j->cmd.verb], err.msg);
		reply(req, svc, false, "%s: %s", verb_names[j->cmd.verb], err.msg);
		goto out;
	}
	kpl_info(LOG, "%s asked: %s", who, verb_names[verb]);
	if (svc == SVC_SLACK && button)
		httpd_respond(req, 200, "text/plain", "", 0);
	else if (svc == SVC_SLACK)
		reply(req, svc, true, "%s", ack);
	j = NULL; /* the engine's now */
out:
	metrics_webhook(svc_names[svc], result);
	if (rec)
		kpl__store__v1__run_record__free_unpacked(rec, NULL);
	free(j);
}

/* ---------------------------------------------------------------------- */
/* Endpoints */

static int unhex(int ch)
{
	if (ch >= '0' && ch <= '9')
		return ch - '0';
	ch = tolower(ch);
	return ch >= 'a' && ch <= 'f' ? ch - 'a' + 10 : -1;
}

/* The form field name's value, URL-decoded (malloc'd), or NULL. */
static char *form_get(const char *body, size_t len, const char *name)
{
	size_t nl = strlen(name);
	const char *p = body, *end = body + len;

	while (p < end) {
		const char *amp = memchr(p, '&', (size_t)(end - p)), *e = amp ? amp : end;
		if ((size_t)(e - p) > nl && memcmp(p, name, nl) == 0 && p[nl] == '=') {
			char *out = kpl_malloc((size_t)(e - p)), *o = out;
			for (const char *q = p + nl + 1; q < e; q++) {
				int hi, lo;
				if (*q == '+')
					*o++ = ' ';
				else if (*q == '%' && q + 2 < e &&
					 (hi = unhex((unsigned char)q[1])) >= 0 &&
					 (lo = unhex((unsigned char)q[2])) >= 0) {
					*o++ = (char)(hi << 4 | lo);
					q += 2;
				} else
					*o++ = *q;
			}
			*o = '\0';
			if (strlen(out) != (size_t)(o - out)) { /* a NUL inside */
				free(out);
				return NULL;
			}
			return out;
		}
		p = e + 1;
	}
	return NULL;
}

/*
 * The checks every request passes before its body is read: the secret is
 * set, the signature verifies, it is no replay. Answers req and returns
 * false otherwise.
 */
static bool admit(struct chatops *c, enum svc svc, struct httpd_req *req)
{
	struct service *s = &c->svc[svc];
	struct kpl_err err = { 0 };
	const char *ts, *sig;
	enum chatops_verdict v;
	int64_t now = kpl_now_ms(), expires;
	size_t len;
	const char *body = httpd_req_body(req, &len);
	char *secret;
	int rc;

	if (service_secret(c, s, &secret, &err)) {
		kpl_error(LOG, "chatops.%s: the %s: %s", svc_names[svc],
			  svc == SVC_SLACK ? "signing_secret" : "app_secret", err.msg);
		httpd_respondf(req, 503, "chatops.%s is not ready: its secret is not set",
			       svc_names[svc]);
		metrics_webhook(svc_names[svc], "error");
		return false;
	}
	if (svc == SVC_SLACK) {
		ts = httpd_req_header(req, "X-Slack-Request-Timestamp");
		sig = httpd_req_header(req, "X-Slack-Signature");
		v = chatops_slack_verify(secret, ts, sig, body, len, now / 1000);
		expires = v == CHATOPS_OK
			? (strtoll(ts, NULL, 10) + CHATOPS_SLACK_WINDOW_S + 1) * 1000 : 0;
	} else {
		ts = httpd_req_header(req, "timestamp");
		sig = httpd_req_header(req, "sign");
		v = chatops_dingtalk_verify(secret, ts, sig, now);
		expires = v == CHATOPS_OK
			? strtoll(ts, NULL, 10) + CHATOPS_DINGTALK_WINDOW_MS + 1000 : 0;
	}
	wipe_free(secret);
	if (v != CHATOPS_OK) {
		kpl_warn(LOG, "%s request from %s refused: %s", svc_names[svc],
			 httpd_req_peer(req),
			 v == CHATOPS_STALE ? "timestamp outside the window" : "bad signature");
		httpd_respondf(req, 401, "unauthorized: %s",
			       v == CHATOPS_STALE ? "timestamp outside the window" : "bad signature");
		metrics_webhook(svc_names[svc], "unauthorized");
		return false;
	}
	/* DingTalk's sign covers the timestamp only, not the body: a (timestamp,
	 * sign) pair is taken once, so neither a replay nor the headers with
	 * another body get through. */
	if ((rc = replay_add(s, sig, now, expires)) != 0) {
		kpl_warn(LOG, "%s request from %s refused: %s", svc_names[svc], httpd_req_peer(req),
			 rc == KPL_EEXISTS ? "replayed signature" : "replay memory full");
		if (rc == KPL_EEXISTS)
			httpd_respondf(req, 401, "unauthorized: replayed request");
		else
			httpd_respondf(req, 429, "too many chat requests; try again in a minute");
		metrics_webhook(svc_names[svc], rc == KPL_EEXISTS ? "replayed" : "busy");
		return false;
	}
	return true;
}

static void on_slack(struct httpd_req *req, void *data)
{
	struct chatops *c = data;
	size_t len;
	const char *body;
	char *payload, *text = NULL, *uid = NULL, *url = NULL, *team;

	if (!admit(c, SVC_SLACK, req))
		return;
	body = httpd_req_body(req, &len);
	if ((payload = form_get(body, len, "payload")) != NULL) {
		/* A button: block_actions with our action_id kpl_VERB. */
		json_error_t jerr;
		json_t *root = json_loads(payload, 0, &jerr), *a;
		const char *aid, *val, *type;

		type = json_string_value(json_object_get(root, "type"));
		a = json_array_get(json_object_get(root, "actions"), 0);
		aid = json_string_value(json_object_get(a, "action_id"));
		val = json_string_value(json_object_get(a, "value"));
		if (!type || strcmp(type, "block_actions") || !aid || strncmp(aid, "kpl_", 4) ||
		    !val) {
			httpd_respondf(req, 400, "want a block_actions payload with a kpl_ action");
			metrics_webhook("slack", "bad_request");
		} else {
			text = kpl_asprintf("%.40s %.1900s", aid + 4, val);
			run_command(c, SVC_SLACK, req,
				    json_string_value(json_object_get(json_object_get(root, "team"),
								      "id")),
				    json_string_value(json_object_get(json_object_get(root, "user"),
								      "id")),
				    text, json_string_value(json_object_get(root, "response_url")),
				    true);
		}
		json_decref(root);
		free(payload);
		free(text);
		return;
	}
	if ((text = form_get(body, len, "ssl_check")) != NULL) {
		/* Slack checking the certificate of a slash command's URL. */
		httpd_respond(req, 200, "text/plain", "", 0);
		free(text);
		return;
	}
	text = form_get(body, len, "text");
	uid = form_get(body, len, "user_id");
	url = form_get(body, len, "response_url");
	team = form_get(body, len, "team_id");
	run_command(c, SVC_SLACK, req, team, uid, text ? text : "", url, false);
	free(team);
	free(text);
	free(uid);
	free(url);
}

static void on_dingtalk(struct httpd_req *req, void *data)
{
	struct chatops *c = data;
	json_error_t jerr;
	json_t *root;
	const char *body, *content, *uid;
	size_t len;

	if (!admit(c, SVC_DINGTALK, req))
		return;
	body = httpd_req_body(req, &len);
	root = json_loadb(body, len, 0, &jerr);
	content = json_string_value(json_object_get(json_object_get(root, "text"), "content"));
	uid = json_string_value(json_object_get(root, "senderStaffId"));
	if (!content) {
		reply(req, SVC_DINGTALK, false, "kpl reads text messages only; %s", usage);
	} else {
		char *text = kpl_strdup(content);
		run_command(c, SVC_DINGTALK, req, NULL, uid, text, NULL, false);
		free(text);
	}
	json_decref(root);
}

/* ---------------------------------------------------------------------- */
/* Lifecycle */

int chatops_new(uv_loop_t *loop, const char *config_path, struct chatops **out,
		struct kpl_err *err)
{
	struct chatops *c = kpl_calloc(1, sizeof *c);
	int rc;

	*out = NULL;
	c->loop = loop;
	if (config_path && (rc = parse_config(c, config_path, err)) != 0) {
		for (int i = 0; i < SVC_LAST; i++)
			service_release(&c->svc[i]);
		free(c);
		return rc;
	}
	if (c->svc[SVC_SLACK].on)
		c->routes[c->n_routes++] = (struct httpd_route){ "POST", "/chatops/slack",
								 on_slack, c };
	if (c->svc[SVC_DINGTALK].on)
		c->routes[c->n_routes++] = (struct httpd_route){ "POST", "/chatops/dingtalk",
								 on_dingtalk, c };
	*out = c;
	return 0;
}

void chatops_set_engine(struct chatops *c, struct engine *eng)
{
	c->eng = eng;
}

const struct httpd_route *chatops_routes(struct chatops *c, size_t *n)
{
	*n = c->n_routes;
	return c->routes;
}

static void http_closed(void *data)
{
	struct chatops *c = data;
	void (*done)(void *) = c->done;
	void *done_data = c->done_data;

	for (int i = 0; i < SVC_LAST; i++)
		service_release(&c->svc[i]);
	free(c);
	if (done)
		done(done_data);
}

static void maybe_done(struct chatops *c)
{
	struct http_client *h;

	if (!c->stopping || c->jobs)
		return;
	if (c->http) {
		h = c->http;
		c->http = NULL;
		http_client_close(h, http_closed, c);
		return;
	}
	http_closed(c);
}

void chatops_stop(struct chatops *c, void (*done)(void *data), void *data)
{
	c->stopping = true;
	c->done = done;
	c->done_data = data;
	maybe_done(c);
}
