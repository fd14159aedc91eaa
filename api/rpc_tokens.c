/*
 * rpc_tokens.c - API tokens: kpl.v1.Security and the authorize hook
 * (docs/security.md has the scope table and the rules).
 *
 * The hook reads the token's record from the store on every call (an LMDB
 * read, no write), so a revoke takes effect with the commit that records
 * it. It never logs or echoes a token: only ids ("t_0123456789ab").
 */
#include "api/rpc_tokens.h"

#include <errno.h>
#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <openssl/sha.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "api/kpl.pb-c.h"
#include "pipelines/pipeline.h"
#include "stages/stage.h"

#define LOG "tokens"

#define TOKEN_PREFIX "kpl_"
#define TOKEN_RAND_BYTES 32
/* "kpl_" + 43 base64url characters (no padding) + NUL. */
#define TOKEN_LEN (4 + 43)
#define HASH_HEX_LEN 64
#define ID_LEN 14 /* "t_" + 12 hex */
#define MAX_DESCRIPTION 200
#define AUDIT_DEFAULT_PAGE 100
#define AUDIT_MAX_PAGE 1000

/* grpc_status_code values used here. */
enum {
	ST_OK = 0,
	ST_CANCELLED = 1,
	ST_INVALID_ARGUMENT = 3,
	ST_NOT_FOUND = 5,
	ST_PERMISSION_DENIED = 7,
	ST_INTERNAL = 13,
	ST_UNAVAILABLE = 14,
	ST_UNAUTHENTICATED = 16,
};

struct tokens {
	struct engine *eng;
	struct store *store;
	/* The tokens db has a record: calls need a token from then on. Set
	 * when a token's commit has landed (not when it is staged: a commit
	 * that fails must not lock everyone out of a kpld that has no token).
	 * Never goes back to false. */
	bool configured;
	struct api_method methods[5];
};

static const char *const scope_names[] = {
	[API_SCOPE_READ] = "read",
	[API_SCOPE_SUBMIT] = "submit",
	[API_SCOPE_APPROVE] = "approve",
	[API_SCOPE_ADMIN] = "admin",
};

static const char *scope_name(int scope)
{
	return scope >= API_SCOPE_READ && scope <= API_SCOPE_ADMIN ? scope_names[scope]
								 : "none";
}

/* ---------------------------------------------------------------------- */
/* Making and hashing tokens */

static void hex(char *out, const unsigned char *in, size_t n)
{
	static const char digits[] = "0123456789abcdef";

	for (size_t i = 0; i < n; i++) {
		out[2 * i] = digits[in[i] >> 4];
		out[2 * i + 1] = digits[in[i] & 15];
	}
	out[2 * n] = '\0';
}

/* SHA-256 of the whole token text ("kpl_..."), lowercase hex. */
static void token_hash(const char *token, char out[HASH_HEX_LEN + 1])
{
	unsigned char md[SHA256_DIGEST_LENGTH];

	SHA256((const unsigned char *)token, strlen(token), md);
	hex(out, md, sizeof md);
}

/* A new token and id. Returns 0, or KPL_EINTERNAL if the RNG fails. */
static int token_make(char token[TOKEN_LEN + 1], char id[ID_LEN + 1])
{
	static const char b64[] =
		"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
	unsigned char r[TOKEN_RAND_BYTES + 1] = { 0 }, idr[6];
	char *p = token + 4;

	if (RAND_bytes(r, TOKEN_RAND_BYTES) != 1 || RAND_bytes(idr, sizeof idr) != 1)
		return KPL_EINTERNAL;
	memcpy(token, TOKEN_PREFIX, 4);
	/* 32 bytes: ten groups of 3, then 2 bytes as 3 characters. */
	for (size_t i = 0; i < TOKEN_RAND_BYTES; i += 3) {
		unsigned v = (unsigned)r[i] << 16 | (unsigned)r[i + 1] << 8 |
			     (i + 2 < TOKEN_RAND_BYTES ? r[i + 2] : 0);
		*p++ = b64[v >> 18 & 63];
		*p++ = b64[v >> 12 & 63];
		*p++ = b64[v >> 6 & 63];
		if (i + 2 < TOKEN_RAND_BYTES)
			*p++ = b64[v & 63];
	}
	*p = '\0';
	memcpy(id, "t_", 2);
	hex(id + 2, idr, sizeof idr);
	OPENSSL_cleanse(r, sizeof r);
	return 0;
}

static void ts_from_ms(Google__Protobuf__Timestamp *t, int64_t ms)
{
	google__protobuf__timestamp__init(t);
	t->seconds = ms / 1000;
	t->nanos = (int32_t)(ms % 1000) * 1000000;
}

/* ---------------------------------------------------------------------- */
/* Reading the tokens db */

static int any_fn(void *data, const char *hash, const Kpl__Store__V1__TokenRecord *rec)
{
	(void)data;
	(void)hash;
	(void)rec;
	return 1; /* one record is enough */
}

bool tokens_exist(struct store *s)
{
	return store_list_tokens(s, any_fn, NULL) != 0;
}

struct find_id {
	const char *id;
	char hash[HASH_HEX_LEN + 1];
	Kpl__Store__V1__TokenRecord *rec; /* a copy, ours */
};

static int find_id_fn(void *data, const char *hash, const Kpl__Store__V1__TokenRecord *rec)
{
	struct find_id *f = data;
	size_t len;
	uint8_t *buf;

	if (strcmp(rec->id, f->id))
		return 0;
	snprintf(f->hash, sizeof f->hash, "%s", hash);
	len = kpl__store__v1__token_record__get_packed_size(rec);
	buf = kpl_malloc(len ? len : 1);
	kpl__store__v1__token_record__pack(rec, buf);
	f->rec = kpl__store__v1__token_record__unpack(NULL, len, buf);
	free(buf);
	return f->rec ? 1 : KPL_ENOMEM;
}

static int active_admin_fn(void *data, const char *hash, const Kpl__Store__V1__TokenRecord *rec)
{
	(void)data;
	(void)hash;
	return rec->scope == API_SCOPE_ADMIN && !rec->revoked_ms;
}

static void info_fill(Kpl__V1__TokenInfo *info, Google__Protobuf__Timestamp *created,
		      Google__Protobuf__Timestamp *revoked, const Kpl__Store__V1__TokenRecord *rec)
{
	kpl__v1__token_info__init(info);
	info->id = rec->id;
	info->scope = (Kpl__V1__TokenScope)rec->scope;
	info->pipeline = rec->pipeline;
	info->description = rec->description;
	info->created_by = rec->created_by;
	ts_from_ms(created, rec->created_ms);
	info->created_at = created;
	if (rec->revoked_ms) {
		ts_from_ms(revoked, rec->revoked_ms);
		info->revoked_at = revoked;
	}
}

/* ---------------------------------------------------------------------- */
/* The authorize hook */

/* A string field of req named name (not repeated), or NULL. */
static const char *str_field(const ProtobufCMessage *req, const char *name)
{
	const ProtobufCFieldDescriptor *f =
		protobuf_c_message_descriptor_get_field_by_name(req->descriptor, name);

	if (!f || f->type != PROTOBUF_C_TYPE_STRING || f->label == PROTOBUF_C_LABEL_REPEATED)
		return NULL;
	return *(const char *const *)(const void *)((const char *)req + f->offset);
}

/*
 * A token limited to one pipeline acts only on that pipeline's runs. What a
 * request is about comes from its method's bind (server.h): the run named
 * by "id"/"run_id" (its stored pipeline), the pipeline text in "pipeline"
 * (its name), or the "pipeline_name" filter (which must be set to the
 * token's pipeline). A method bound to no pipeline (releases, secrets,
 * registrations, tokens) is refused. A run that is not stored (yet) is
 * refused too: the engine may know a run a moment before its first commit,
 * and a limited token must not act on it unchecked. Text that does not
 * parse is left for the handler to refuse (SubmitRun) or explain
 * (ValidatePipeline); it starts nothing.
 */
static int pipeline_check(struct tokens *t, const struct api_method *m,
			  const Kpl__Store__V1__TokenRecord *rec,
			  const ProtobufCMessage *req, char *msg, size_t msg_size)
{
	const char *want = rec->pipeline, *v;
	const char *const run_fields[] = { "run_id", "id" };

	if (!req || m->bind == API_BIND_NONE) {
		snprintf(msg, msg_size,
			 "token %s is limited to pipeline %s; %s is not about one pipeline",
			 rec->id, want, m->path);
		return ST_PERMISSION_DENIED;
	}
	switch (m->bind) {
	case API_BIND_NONE:
		break; /* refused above */
	case API_BIND_SELF:
		return ST_OK;
	case API_BIND_RUN:
		for (size_t i = 0; i < KPL_ARRAY_SIZE(run_fields); i++) {
			Kpl__Store__V1__RunRecord *run = NULL;
			int rc, code = ST_OK;

			if (!(v = str_field(req, run_fields[i])) || !*v)
				continue;
			rc = store_get_run(t->store, v, &run);
			if (rc == KPL_ENOTFOUND || rc == KPL_EINVAL) {
				snprintf(msg, msg_size, "run %.64s not found", v);
				code = ST_NOT_FOUND;
			} else if (rc || !run->run) {
				snprintf(msg, msg_size, "run %.64s: cannot read it: %s", v,
					 kpl_strerror(rc ? rc : KPL_ECORRUPT));
				code = ST_UNAVAILABLE;
			} else if (strcmp(run->run->pipeline_name, want)) {
				snprintf(msg, msg_size,
					 "token %s is limited to pipeline %s; run %.64s is of "
					 "pipeline %.128s",
					 rec->id, want, v, run->run->pipeline_name);
				code = ST_PERMISSION_DENIED;
			}
			if (run)
				kpl__store__v1__run_record__free_unpacked(run, NULL);
			if (code)
				return code;
		}
		return ST_OK;
	case API_BIND_FILTER:
		if (!(v = str_field(req, "pipeline_name")) || strcmp(v, want)) {
			snprintf(msg, msg_size,
				 "token %s is limited to pipeline %s: set pipeline_name to %s",
				 rec->id, want, want);
			return ST_PERMISSION_DENIED;
		}
		return ST_OK;
	case API_BIND_NAME:
		if (!(v = str_field(req, "name")) || strcmp(v, want)) {
			snprintf(msg, msg_size,
				 "token %s is limited to pipeline %s; this is pipeline %.128s",
				 rec->id, want, v ? v : "");
			return ST_PERMISSION_DENIED;
		}
		return ST_OK;
	case API_BIND_TEXT:
		if ((v = str_field(req, "pipeline")) != NULL && *v) {
			struct pipeline *pl = NULL;
			struct kpl_err err = { 0 };
			const struct pl_kind *kinds;
			size_t n_kinds;
			int code = ST_OK;

			/* With the request's template files, as the handler
			 * parses it: else a text that parses only with them
			 * would pass here unchecked. */
			struct pl_file *fv = NULL;
			struct pl_files files = { NULL, 0 };
			if (req->descriptor == &kpl__v1__submit_run_request__descriptor) {
				const Kpl__V1__SubmitRunRequest *r = (const void *)req;
				fv = kpl_calloc(r->n_files + 1, sizeof *fv);
				for (size_t i = 0; i < r->n_files; i++)
					fv[i] = (struct pl_file){ r->files[i]->key, r->files[i]->value,
								  strlen(r->files[i]->value) };
				files.n = r->n_files;
			} else if (req->descriptor == &kpl__v1__validate_pipeline_request__descriptor) {
				const Kpl__V1__ValidatePipelineRequest *r = (const void *)req;
				fv = kpl_calloc(r->n_files + 1, sizeof *fv);
				for (size_t i = 0; i < r->n_files; i++)
					fv[i] = (struct pl_file){ r->files[i]->key, r->files[i]->value,
								  strlen(r->files[i]->value) };
				files.n = r->n_files;
			}
			files.v = fv;
			kinds = stage_kinds_for_parser(&n_kinds);
			int prc = pipeline_parse_files(v, strlen(v), "pipeline", &files, kinds, n_kinds,
						       &pl, &err);
			free(fv);
			if (prc == 0 && strcmp(pl->name, want)) {
				snprintf(msg, msg_size,
					 "token %s is limited to pipeline %s; this is pipeline %.128s",
					 rec->id, want, pl->name);
				code = ST_PERMISSION_DENIED;
			}
			if (pl)
				pipeline_free(pl);
			return code;
		}
		return ST_OK;
	}
	BUG("pipeline_check: %s has bind %d", m->path, (int)m->bind);
}

int tokens_authorize(struct api_call *call, const struct api_method *m,
		     enum api_scope scope, const char *authorization,
		     const ProtobufCMessage *req, void *data, char *msg,
		     size_t msg_size)
{
	struct tokens *t = data;
	const char *peer = api_call_peer_subject(call), *tok;
	Kpl__Store__V1__TokenRecord *rec = NULL;
	char hash[HASH_HEX_LEN + 1], who[512];
	int rc, code;

	/* Open mode ends when the first token is staged (tok_op_commit), a
	 * moment before it is durable: nothing passes unauthenticated once a
	 * token may exist. */
	if (!t->configured) {
		snprintf(who, sizeof who, "local%s%.300s%s", peer ? " (cert " : "",
			 peer ? peer : "", peer ? ")" : "");
		api_call_set_who(call, who);
		return ST_OK;
	}
	if (!authorization || !*authorization) {
		snprintf(msg, msg_size,
			 "%s needs a token with scope %s: send \"authorization: Bearer "
			 "kpl_...\" (kplctl --token or KPL_TOKEN)",
			 m->path, scope_name(scope));
		return ST_UNAUTHENTICATED;
	}
	if (strncasecmp(authorization, "Bearer ", 7) != 0) {
		snprintf(msg, msg_size, "authorization: want \"Bearer <token>\"");
		return ST_UNAUTHENTICATED;
	}
	tok = authorization + 7;
	while (*tok == ' ')
		tok++;
	token_hash(tok, hash);
	rc = store_get_token(t->store, hash, &rec);
	if (rc == KPL_ENOTFOUND) {
		snprintf(msg, msg_size, "unknown token");
		return ST_UNAUTHENTICATED;
	}
	if (rc) {
		snprintf(msg, msg_size, "cannot check the token: %s", kpl_strerror(rc));
		return ST_UNAVAILABLE;
	}
	snprintf(who, sizeof who, "token %s%s%.200s%s%s%.200s%s", rec->id,
		 *rec->description ? " (" : "", rec->description, *rec->description ? ")" : "",
		 peer ? " (cert " : "", peer ? peer : "", peer ? ")" : "");
	api_call_set_who(call, who);
	if (rec->revoked_ms) {
		snprintf(msg, msg_size, "token %s was revoked", rec->id);
		code = ST_UNAUTHENTICATED;
	} else if (rec->scope < (int)scope) {
		snprintf(msg, msg_size, "token %s has scope %s; %s needs %s", rec->id,
			 scope_name(rec->scope), m->path, scope_name(scope));
		code = ST_PERMISSION_DENIED;
	} else if (*rec->pipeline && (req || m->bind == API_BIND_NONE)) {
		code = pipeline_check(t, m, rec, req, msg, msg_size);
	} else {
		/* Not limited, or no request yet (the check before it is read):
		 * the binding is checked once it is. */
		code = ST_OK;
	}
	kpl__store__v1__token_record__free_unpacked(rec, NULL);
	return code;
}

/* ---------------------------------------------------------------------- */
/* Calls answered once their change is durable */

struct tok_op {
	struct tokens *t;
	struct api_call *call; /* NULL once the client went away */
	Kpl__Store__V1__TokenRecord *rec; /* ours: answered from it */
	char token[TOKEN_LEN + 1];        /* CreateToken only; wiped */
};

static void tok_op_free(struct tok_op *op)
{
	OPENSSL_cleanse(op->token, sizeof op->token);
	if (op->rec)
		kpl__store__v1__token_record__free_unpacked(op->rec, NULL);
	free(op);
}

static void tok_op_cancelled(struct api_call *call, void *data)
{
	struct tok_op *op = data;

	op->call = NULL;
	api_call_fail(call, ST_CANCELLED, "the call was cancelled; the change may still be made");
}

static void tok_op_committed(void *data, int status)
{
	struct tok_op *op = data;
	Kpl__V1__CreateTokenResponse cresp = KPL__V1__CREATE_TOKEN_RESPONSE__INIT;
	Kpl__V1__TokenInfo info;
	Google__Protobuf__Timestamp created, revoked;

	if (status)
		op->t->configured = tokens_exist(op->t->store); /* back, if none */
	if (op->call) {
		if (status) {
			api_call_fail(op->call, ST_INTERNAL, "the change could not be stored");
		} else {
			info_fill(&info, &created, &revoked, op->rec);
			if (op->token[0]) {
				cresp.info = &info;
				cresp.token = op->token;
				api_call_reply(op->call, &cresp.base);
			} else {
				api_call_reply(op->call, &info.base);
			}
		}
	}
	tok_op_free(op);
}

/* Takes rec. Stages it under hash, an audit entry, and commits. */
static void tok_op_commit(struct tokens *t, struct api_call *call, const char *hash,
			  Kpl__Store__V1__TokenRecord *rec, const char *token,
			  const char *what)
{
	struct tok_op *op = kpl_calloc(1, sizeof *op);
	struct kpl_err err = { 0 };
	char msg[800];

	op->t = t;
	op->call = call;
	op->rec = rec;
	if (token)
		snprintf(op->token, sizeof op->token, "%s", token);
	store_stage_token(t->store, hash, rec);
	t->configured = true; /* fail closed from now on: see tokens_authorize */
	snprintf(msg, sizeof msg, "%s %s", api_call_who(call), what);
	engine_audit(t->eng, NULL, NULL, msg, &err);
	api_call_on_cancel(call, tok_op_cancelled, op);
	store_commit(t->store, tok_op_committed, op);
}

/* Pipeline names as pipelines/ allows them: checked loosely here (length,
 * printable, no spaces), since a token for a pipeline that never runs is
 * harmless. */
static bool printable(const char *s, size_t max, bool spaces)
{
	size_t n = strlen(s);

	if (n > max)
		return false;
	for (size_t i = 0; i < n; i++)
		if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f || (!spaces && s[i] == ' '))
			return false;
	return true;
}

static void h_create(struct api_call *call, const ProtobufCMessage *m, void *data)
{
	const Kpl__V1__CreateTokenRequest *req = (const void *)m;
	struct tokens *t = data;
	Kpl__Store__V1__TokenRecord *rec;
	char token[TOKEN_LEN + 1], id[ID_LEN + 1], hash[HASH_HEX_LEN + 1], what[600];
	const char *pipeline = req->pipeline ? req->pipeline : "";
	const char *desc = req->description ? req->description : "";

	if (req->scope < KPL__V1__TOKEN_SCOPE__TOKEN_SCOPE_READ ||
	    req->scope > KPL__V1__TOKEN_SCOPE__TOKEN_SCOPE_ADMIN) {
		api_call_fail(call, ST_INVALID_ARGUMENT,
			      "scope: required: read, submit, approve or admin");
		return;
	}
	if (*pipeline && req->scope == KPL__V1__TOKEN_SCOPE__TOKEN_SCOPE_ADMIN) {
		api_call_fail(call, ST_INVALID_ARGUMENT,
			      "pipeline: an admin token cannot be limited to a pipeline");
		return;
	}
	if (!printable(pipeline, KPL_MAX_NAME_LEN, false)) {
		api_call_fail(call, ST_INVALID_ARGUMENT,
			      "pipeline: at most 128 printable characters, no spaces");
		return;
	}
	if (!printable(desc, MAX_DESCRIPTION, true)) {
		api_call_fail(call, ST_INVALID_ARGUMENT,
			      "description: at most 200 printable characters");
		return;
	}
	if (token_make(token, id)) {
		api_call_fail(call, ST_INTERNAL, "cannot make a token: the random generator failed");
		return;
	}
	token_hash(token, hash);
	rec = kpl_calloc(1, sizeof *rec);
	kpl__store__v1__token_record__init(rec);
	rec->id = kpl_strdup(id);
	rec->scope = req->scope;
	rec->pipeline = kpl_strdup(pipeline);
	rec->description = kpl_strdup(desc);
	rec->created_ms = kpl_now_ms();
	rec->created_by = kpl_strdup(api_call_who(call));
	snprintf(what, sizeof what, "created token %s (scope %s%s%s%s%.200s%s)", id,
		 scope_name(req->scope), *pipeline ? ", pipeline " : "", pipeline,
		 *desc ? ", \"" : "", desc, *desc ? "\"" : "");
	kpl_info(LOG, "%s %s", api_call_who(call), what);
	/* rec was built with kpl_calloc/kpl_strdup: freeing it with
	 * free_unpacked (default allocator, free()) matches. */
	tok_op_commit(t, call, hash, rec, token, what);
	OPENSSL_cleanse(token, sizeof token);
}

struct list_ctx {
	Kpl__V1__TokenInfo *infos;
	Google__Protobuf__Timestamp *ts; /* 2 per info */
	Kpl__Store__V1__TokenRecord **recs;
	size_t n, cap;
};

static int list_fn(void *data, const char *hash, const Kpl__Store__V1__TokenRecord *rec)
{
	struct list_ctx *c = data;
	struct find_id f = { .id = rec->id };

	if (c->n == c->cap) {
		c->cap = c->cap ? 2 * c->cap : 16;
		c->recs = kpl_realloc(c->recs, c->cap * sizeof *c->recs);
	}
	/* rec is borrowed for this call only: keep a copy. */
	if (find_id_fn(&f, hash, rec) != 1)
		return KPL_ENOMEM;
	c->recs[c->n++] = f.rec;
	return 0;
}

static int created_cmp(const void *a, const void *b)
{
	const Kpl__Store__V1__TokenRecord *x = *(Kpl__Store__V1__TokenRecord *const *)a;
	const Kpl__Store__V1__TokenRecord *y = *(Kpl__Store__V1__TokenRecord *const *)b;

	if (x->created_ms != y->created_ms)
		return x->created_ms < y->created_ms ? -1 : 1;
	return strcmp(x->id, y->id);
}

static void h_list(struct api_call *call, const ProtobufCMessage *m, void *data)
{
	struct tokens *t = data;
	Kpl__V1__ListTokensResponse resp = KPL__V1__LIST_TOKENS_RESPONSE__INIT;
	struct list_ctx c = { 0 };
	Kpl__V1__TokenInfo **ptrs;
	int rc;

	(void)m;
	rc = store_list_tokens(t->store, list_fn, &c);
	if (rc < 0) {
		char msg[200];
		snprintf(msg, sizeof msg, "cannot list tokens: %s", kpl_strerror(rc));
		api_call_fail(call, ST_INTERNAL, msg);
		goto out;
	}
	/* Keyed by hash, which is random order: list oldest first. */
	if (c.n)
		qsort(c.recs, c.n, sizeof *c.recs, created_cmp);
	c.infos = kpl_calloc(c.n, sizeof *c.infos);
	c.ts = kpl_calloc(2 * c.n, sizeof *c.ts);
	ptrs = kpl_calloc(c.n, sizeof *ptrs);
	for (size_t i = 0; i < c.n; i++) {
		info_fill(&c.infos[i], &c.ts[2 * i], &c.ts[2 * i + 1], c.recs[i]);
		ptrs[i] = &c.infos[i];
	}
	resp.tokens = ptrs;
	resp.n_tokens = c.n;
	api_call_reply(call, &resp.base);
	free(ptrs);
out:
	for (size_t i = 0; i < c.n; i++)
		kpl__store__v1__token_record__free_unpacked(c.recs[i], NULL);
	free(c.recs);
	free(c.infos);
	free(c.ts);
}

static void h_revoke(struct api_call *call, const ProtobufCMessage *m, void *data)
{
	const Kpl__V1__RevokeTokenRequest *req = (const void *)m;
	struct tokens *t = data;
	struct find_id f = { .id = req->id ? req->id : "" };
	char what[100];
	int rc;

	if (!*f.id || strlen(f.id) > ID_LEN) {
		api_call_fail(call, ST_INVALID_ARGUMENT, "id: required (t_ and 12 hex digits)");
		return;
	}
	rc = store_list_tokens(t->store, find_id_fn, &f);
	if (rc < 0) {
		char msg[200];
		snprintf(msg, sizeof msg, "cannot read tokens: %s", kpl_strerror(rc));
		api_call_fail(call, ST_INTERNAL, msg);
		return;
	}
	if (!f.rec) {
		snprintf(what, sizeof what, "no token %s", f.id);
		api_call_fail(call, ST_NOT_FOUND, what);
		return;
	}
	if (f.rec->revoked_ms) {
		/* Already revoked: nothing changes, nothing to audit. */
		Kpl__V1__TokenInfo info;
		Google__Protobuf__Timestamp created, revoked;

		info_fill(&info, &created, &revoked, f.rec);
		api_call_reply(call, &info.base);
		kpl__store__v1__token_record__free_unpacked(f.rec, NULL);
		return;
	}
	f.rec->revoked_ms = kpl_now_ms();
	snprintf(what, sizeof what, "revoked token %s", f.rec->id);
	kpl_info(LOG, "%s %s", api_call_who(call), what);
	tok_op_commit(t, call, f.hash, f.rec, NULL, what);
}

struct audit_ctx {
	Kpl__V1__RunEvent **evs; /* copies, ours */
	size_t n;
	uint64_t next;
};

static int audit_fn(void *data, uint64_t seq, const Kpl__V1__RunEvent *ev)
{
	struct audit_ctx *c = data;
	size_t len = kpl__v1__run_event__get_packed_size(ev);
	uint8_t *buf = kpl_malloc(len ? len : 1);

	kpl__v1__run_event__pack(ev, buf);
	c->evs = kpl_realloc(c->evs, (c->n + 1) * sizeof *c->evs);
	c->evs[c->n] = kpl__v1__run_event__unpack(NULL, len, buf);
	free(buf);
	if (!c->evs[c->n])
		return KPL_ENOMEM;
	c->n++;
	c->next = seq + 1;
	return 0;
}

static void h_audit(struct api_call *call, const ProtobufCMessage *m, void *data)
{
	const Kpl__V1__ListAuditRequest *req = (const void *)m;
	struct tokens *t = data;
	Kpl__V1__ListAuditResponse resp = KPL__V1__LIST_AUDIT_RESPONSE__INIT;
	struct audit_ctx c = { 0 };
	uint64_t from = req->from_seq ? req->from_seq : 1;
	size_t limit;
	int rc;

	if (req->limit < 0) {
		api_call_fail(call, ST_INVALID_ARGUMENT, "limit: must not be negative");
		return;
	}
	limit = req->limit ? (size_t)req->limit : AUDIT_DEFAULT_PAGE;
	if (limit > AUDIT_MAX_PAGE)
		limit = AUDIT_MAX_PAGE;
	c.next = from;
	rc = store_read_audit(t->store, from, limit, audit_fn, &c);
	if (rc < 0) {
		char msg[200];
		snprintf(msg, sizeof msg, "cannot read the audit log: %s", kpl_strerror(rc));
		api_call_fail(call, ST_INTERNAL, msg);
	} else {
		resp.events = c.evs;
		resp.n_events = c.n;
		resp.next_seq = c.next;
		api_call_reply(call, &resp.base);
	}
	for (size_t i = 0; i < c.n; i++)
		kpl__v1__run_event__free_unpacked(c.evs[i], NULL);
	free(c.evs);
}

/* The authorize hook let the call through: read its token again (the
 * hook keeps nothing on the call but its who). */
static void h_whoami(struct api_call *call, const ProtobufCMessage *m, void *data)
{
	struct tokens *t = data;
	const char *auth = api_call_metadata(call, "authorization"), *tok;
	Kpl__V1__WhoAmIResponse resp = KPL__V1__WHO_AM_IRESPONSE__INIT;
	Kpl__Store__V1__TokenRecord *rec = NULL;
	char hash[HASH_HEX_LEN + 1];
	int rc;

	(void)m;
	resp.who = (char *)api_call_who(call);
	if (!t->configured) {
		resp.scope = KPL__V1__TOKEN_SCOPE__TOKEN_SCOPE_ADMIN;
		api_call_reply(call, &resp.base);
		return;
	}
	if (!auth || strncasecmp(auth, "Bearer ", 7) != 0) {
		api_call_fail(call, ST_UNAUTHENTICATED, "no token");
		return;
	}
	for (tok = auth + 7; *tok == ' '; tok++)
		;
	token_hash(tok, hash);
	if ((rc = store_get_token(t->store, hash, &rec)) != 0) {
		char msg[200];
		snprintf(msg, sizeof msg, "cannot read the token: %s", kpl_strerror(rc));
		api_call_fail(call, rc == KPL_ENOTFOUND ? ST_UNAUTHENTICATED : ST_UNAVAILABLE,
			      msg);
		return;
	}
	resp.token_id = rec->id;
	resp.scope = (Kpl__V1__TokenScope)rec->scope;
	resp.pipeline = rec->pipeline;
	api_call_reply(call, &resp.base);
	kpl__store__v1__token_record__free_unpacked(rec, NULL);
}

/* ---------------------------------------------------------------------- */

struct tokens *tokens_new(struct engine *e)
{
	struct tokens *t = kpl_calloc(1, sizeof *t);
	const struct api_method methods[] = {
		{ "/kpl.v1.Security/CreateToken", API_UNARY,
		  &kpl__v1__create_token_request__descriptor, h_create, t, API_SCOPE_ADMIN },
		{ "/kpl.v1.Security/ListTokens", API_UNARY,
		  &kpl__v1__list_tokens_request__descriptor, h_list, t, API_SCOPE_ADMIN },
		{ "/kpl.v1.Security/RevokeToken", API_UNARY,
		  &kpl__v1__revoke_token_request__descriptor, h_revoke, t, API_SCOPE_ADMIN },
		{ "/kpl.v1.Security/ListAudit", API_UNARY,
		  &kpl__v1__list_audit_request__descriptor, h_audit, t, API_SCOPE_ADMIN },
		{ "/kpl.v1.Security/WhoAmI", API_UNARY,
		  &kpl__v1__who_am_irequest__descriptor, h_whoami, t, API_SCOPE_READ,
		  API_BIND_SELF },
	};

	t->eng = e;
	t->store = engine_store(e);
	t->configured = tokens_exist(t->store);
	_Static_assert(sizeof methods == sizeof t->methods, "tokens: methods[] size");
	memcpy(t->methods, methods, sizeof methods);
	return t;
}

const struct api_method *tokens_methods(struct tokens *t, size_t *n)
{
	*n = KPL_ARRAY_SIZE(t->methods);
	return t->methods;
}

void tokens_free(struct tokens *t)
{
	free(t);
}

/* ---------------------------------------------------------------------- */
/* kpld --bootstrap-token-file */

int tokens_bootstrap(struct store *s, const char *path, bool *made, struct kpl_err *err)
{
	Kpl__Store__V1__TokenRecord rec = KPL__STORE__V1__TOKEN_RECORD__INIT;
	Kpl__V1__RunEvent ev = KPL__V1__RUN_EVENT__INIT;
	Google__Protobuf__Timestamp ts;
	char token[TOKEN_LEN + 1], id[ID_LEN + 1], hash[HASH_HEX_LEN + 1], tmp[4096];
	char msg[300];
	int rc, fd;
	bool ok;
	size_t len;

	*made = false;
	rc = store_list_tokens(s, active_admin_fn, NULL);
	if (rc < 0)
		return kpl_errf(err, rc, "--bootstrap-token-file: cannot read tokens: %s",
				kpl_strerror(rc));
	if (rc == 1)
		return 0;
	if (token_make(token, id))
		return kpl_errf(err, KPL_EINTERNAL,
				"--bootstrap-token-file: the random generator failed");
	/* Written whole to a private file, then renamed, so the token is never
	 * readable by anyone else, not even half of it. */
	snprintf(tmp, sizeof tmp, "%s.tmp", path);
	unlink(tmp);
	fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (fd < 0) {
		rc = kpl_errf(err, KPL_EIO, "--bootstrap-token-file %s: %s", tmp, strerror(errno));
		goto out;
	}
	len = strlen(token);
	token[len] = '\n';
	ok = write(fd, token, len + 1) == (ssize_t)len + 1 && fsync(fd) == 0;
	token[len] = '\0';
	if (close(fd))
		ok = false;
	if (!ok) {
		unlink(tmp);
		rc = kpl_errf(err, KPL_EIO, "--bootstrap-token-file %s: cannot write it", tmp);
		goto out;
	}
	if (rename(tmp, path)) {
		rc = kpl_errf(err, KPL_EIO, "--bootstrap-token-file %s: %s", path, strerror(errno));
		unlink(tmp);
		goto out;
	}
	token_hash(token, hash);
	rec.id = id;
	rec.scope = API_SCOPE_ADMIN;
	rec.pipeline = "";
	rec.description = "bootstrap";
	rec.created_ms = kpl_now_ms();
	rec.created_by = "kpld --bootstrap-token-file";
	store_stage_token(s, hash, &rec);
	snprintf(msg, sizeof msg, "kpld --bootstrap-token-file created token %s (scope admin)",
		 id);
	ev.run_id = ev.stage = ev.pipeline_name = "";
	ev.message = msg;
	ev.kind = KPL__V1__EVENT_KIND__EVENT_KIND_AUDIT;
	ev.stream = KPL__V1__LOG_STREAM__LOG_STREAM_SYSTEM;
	ts_from_ms(&ts, rec.created_ms);
	ev.time = &ts;
	store_stage_audit(s, &ev);
	if ((rc = store_commit_sync(s)) != 0) {
		unlink(path);
		rc = kpl_errf(err, rc, "--bootstrap-token-file: cannot store the token: %s",
			      kpl_strerror(rc));
		goto out;
	}
	kpl_info(LOG, "%s; written to %s", msg, path);
	*made = true;
	rc = 0;
out:
	OPENSSL_cleanse(token, sizeof token);
	return rc;
}
