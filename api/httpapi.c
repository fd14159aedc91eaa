/*
 * httpapi.c - the HTTP/JSON face of the API (httpapi.h): one route table,
 * request -> message -> api_call_start, and the transport ops that turn a
 * call's end and streamed messages into HTTP responses and SSE frames.
 *
 * A struct hcall is one HTTP request driving one call. It lives until the
 * request is answered (or its stream ended), the call has let go of it
 * (ops.released, or our api_call_detach), every stream write is back and
 * the heartbeat timer has closed: then hcall_maybe_free frees it.
 */
#include "api/httpapi.h"

#include <protobuf-c/protobuf-c.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "api/kpl.pb-c.h"
#include "api/pbjson.h"

#define LOG "httpapi"

#define DEFAULT_HEARTBEAT_MS 15000
/* Path segments of a route or request; more is a 404. */
#define MAX_SEGS 8
/* Headers every API response carries: the body is data, never a page. */
#define COMMON_HEADERS "X-Content-Type-Options: nosniff\r\nCache-Control: no-store\r\n"

enum route_body {
	BODY_NONE, /* fields from the path and the query string */
	BODY_ALL,  /* fields from the path and the JSON body ("body": "*") */
};

enum route_out {
	OUT_UNARY,
	OUT_SSE_RUN,    /* server stream; id: is the event's seq */
	OUT_SSE_GLOBAL, /* server stream; id: is the event's global_seq */
};

/*
 * The routes, one per method of the served services (health and
 * reflection excepted; tests/e2e/http_api_test.py checks this against
 * reflection). Patterns as google.api.http: literal segments, {field}
 * variables (one segment, percent-decoded) and an optional :verb.
 */
struct route {
	const char *method;
	const char *pattern;
	const char *rpc;
	enum route_body body;
	enum route_out out;
};

static const struct route routes[] = {
	{ "GET", "/v1/runs", "/kpl.v1.Pipelines/ListRuns", BODY_NONE, OUT_UNARY },
	{ "POST", "/v1/runs", "/kpl.v1.Pipelines/SubmitRun", BODY_ALL, OUT_UNARY },
	{ "GET", "/v1/runs/{id}", "/kpl.v1.Pipelines/GetRun", BODY_NONE, OUT_UNARY },
	{ "POST", "/v1/runs/{id}:cancel", "/kpl.v1.Pipelines/CancelRun", BODY_ALL, OUT_UNARY },
	{ "POST", "/v1/runs/{id}:retry", "/kpl.v1.Pipelines/RetryRun", BODY_ALL, OUT_UNARY },
	{ "POST", "/v1/runs/{run_id}/stages/{stage}:approve", "/kpl.v1.Pipelines/ApproveStage",
	  BODY_ALL, OUT_UNARY },
	{ "GET", "/v1/runs/{id}/pipeline", "/kpl.v1.Pipelines/GetRunPipeline", BODY_NONE,
	  OUT_UNARY },
	{ "GET", "/v1/runs/{id}/events", "/kpl.v1.Pipelines/WatchRun", BODY_NONE, OUT_SSE_RUN },
	{ "GET", "/v1/events", "/kpl.v1.Pipelines/WatchRuns", BODY_NONE, OUT_SSE_GLOBAL },
	{ "POST", "/v1/pipelines:validate", "/kpl.v1.Pipelines/ValidatePipeline", BODY_ALL,
	  OUT_UNARY },
	{ "GET", "/v1/pipelines", "/kpl.v1.Pipelines/ListPipelines", BODY_NONE, OUT_UNARY },
	{ "PUT", "/v1/pipelines/{name}", "/kpl.v1.Pipelines/RegisterPipeline", BODY_ALL,
	  OUT_UNARY },
	{ "DELETE", "/v1/pipelines/{name}", "/kpl.v1.Pipelines/DeletePipeline", BODY_NONE,
	  OUT_UNARY },
	{ "POST", "/v1/pipelines/{name}:run", "/kpl.v1.Pipelines/RunPipeline", BODY_ALL,
	  OUT_UNARY },
	{ "GET", "/v1/releases", "/kpl.v1.Pipelines/ListReleases", BODY_NONE, OUT_UNARY },
	{ "POST", "/v1/releases:rollback", "/kpl.v1.Pipelines/RollbackRelease", BODY_ALL,
	  OUT_UNARY },
	{ "GET", "/v1/secrets", "/kpl.v1.Pipelines/ListSecrets", BODY_NONE, OUT_UNARY },
	{ "PUT", "/v1/secrets/{name}", "/kpl.v1.Pipelines/SetSecret", BODY_ALL, OUT_UNARY },
	{ "DELETE", "/v1/secrets/{name}", "/kpl.v1.Pipelines/DeleteSecret", BODY_NONE,
	  OUT_UNARY },
	{ "GET", "/v1/tokens", "/kpl.v1.Security/ListTokens", BODY_NONE, OUT_UNARY },
	{ "POST", "/v1/tokens", "/kpl.v1.Security/CreateToken", BODY_ALL, OUT_UNARY },
	{ "POST", "/v1/tokens/{id}:revoke", "/kpl.v1.Security/RevokeToken", BODY_ALL, OUT_UNARY },
	{ "GET", "/v1/audit", "/kpl.v1.Security/ListAudit", BODY_NONE, OUT_UNARY },
	{ "GET", "/v1/whoami", "/kpl.v1.Security/WhoAmI", BODY_NONE, OUT_UNARY },
};

struct httpapi {
	uv_loop_t *loop;
	struct api_server *server; /* NULL once stopped */
	uint64_t heartbeat_ms;
};

struct hcall {
	uv_loop_t *loop;
	const struct route *rt;
	struct httpd_req *req;  /* NULL once answered or the stream ended */
	struct api_call *call;  /* NULL once freed or detached */
	bool begun;             /* SSE: the response head went out */
	bool ended;             /* the call ended (ops.end) */
	char *buf;              /* SSE frames pushed since the last flush */
	size_t len, cap;
	int writes;             /* stream writes in flight */
	bool flushing;          /* the write of a flush is in flight */
	uv_timer_t hb;          /* SSE heartbeat */
	bool hb_open;
	uint64_t heartbeat_ms;
	bool starting;          /* inside api_call_start: not freed yet */
};

int httpapi_status(int code)
{
	static const int map[] = {
		200, 499, 500, 400, 504, 404, 409, 403, 429, 400, 409, 400, 501, 500, 503, 500, 401,
	};

	return code >= 0 && (size_t)code < KPL_ARRAY_SIZE(map) ? map[code] : 500;
}

/* ---------------------------------------------------------------------- */
/* Answers */

static void respond_json(struct httpd_req *req, int status, const char *body, size_t len,
			 const char *more_headers)
{
	char headers[512];

	snprintf(headers, sizeof headers, "%s%s", COMMON_HEADERS,
		 more_headers ? more_headers : "");
	httpd_respond_headers(req, status, "application/json", headers, body, len);
}

/* {"code":..,"message":".."} as JSON text (malloc'd). */
static char *error_body(int code, const char *msg, size_t *len)
{
	char *m = pbjson_string(msg), *out;

	out = kpl_asprintf("{\"code\":%d,\"message\":%s}", code, m);
	free(m);
	*len = strlen(out);
	return out;
}

static void respond_error(struct httpd_req *req, int code, const char *msg)
{
	size_t len;
	char *body = error_body(code, msg, &len);

	respond_json(req, httpapi_status(code), body, len,
		     code == 16 ? "WWW-Authenticate: Bearer\r\n" : NULL);
	free(body);
}

/* ---------------------------------------------------------------------- */
/* The call's transport */

static void hcall_maybe_free(struct hcall *h)
{
	if (h->starting || h->req || h->call || h->writes || h->hb_open)
		return;
	free(h->buf);
	free(h);
}

static void hb_closed(uv_handle_t *t)
{
	struct hcall *h = t->data;

	h->hb_open = false;
	hcall_maybe_free(h);
}

static void stream_stop(struct hcall *h)
{
	if (h->hb_open && !uv_is_closing((uv_handle_t *)&h->hb))
		uv_close((uv_handle_t *)&h->hb, hb_closed);
}

static void stream_gone(struct httpd_req *req, void *data);

static void stream_written(void *data, int status)
{
	struct hcall *h = data;

	h->writes--;
	if (h->flushing && h->writes == 0) {
		h->flushing = false;
		if (h->call)
			api_call_sent(h->call, status == 0);
	}
	hcall_maybe_free(h);
}

static int stream_write(struct hcall *h, const char *buf, size_t len)
{
	if (!h->req || httpd_stream_write(h->req, buf, len, stream_written, h) < 0)
		return -1;
	h->writes++;
	return 0;
}

static void on_heartbeat(uv_timer_t *t)
{
	struct hcall *h = t->data;

	/* Only when nothing else is on its way: a stalled reader gets no
	 * pile of heartbeats either. */
	if (h->begun && h->req && !h->writes)
		stream_write(h, ": heartbeat\n\n", 13);
}

/* The SSE response head, once. -1 if the client is gone. */
static int stream_begin(struct hcall *h)
{
	if (h->begun)
		return 0;
	if (!h->req)
		return -1;
	if (httpd_stream_begin(h->req, 200, "text/event-stream; charset=utf-8",
			       COMMON_HEADERS "X-Accel-Buffering: no\r\n", stream_gone, h) < 0) {
		/* The client is already gone: an answer into the void frees
		 * the request, which no stream_gone would. */
		struct httpd_req *req = h->req;
		h->req = NULL;
		respond_error(req, 1, "the client went away");
		return -1;
	}
	h->begun = true;
	uv_timer_init(h->loop, &h->hb);
	h->hb.data = h;
	h->hb_open = true;
	uv_timer_start(&h->hb, on_heartbeat, h->heartbeat_ms, h->heartbeat_ms);
	/* Tell a client it is connected even before the first event. */
	stream_write(h, ": ok\n\n", 6);
	return 0;
}

/* The client went away (or the server stops). */
static void stream_gone(struct httpd_req *req, void *data)
{
	struct hcall *h = data;

	if (h->call) {
		api_call_detach(h->call);
		h->call = NULL;
	}
	stream_stop(h);
	h->req = NULL;
	httpd_stream_end(req);
	hcall_maybe_free(h);
}

static void op_end(void *t, const ProtobufCMessage *resp, int code, const char *msg)
{
	struct hcall *h = t;
	struct httpd_req *req = h->req;
	char *body;
	size_t len;

	h->ended = true;
	if (!req)
		return;
	if (h->rt->out == OUT_UNARY || !h->begun) {
		h->req = NULL;
		if (code != 0) {
			respond_error(req, code, msg);
		} else if (resp) {
			body = pbjson_encode(resp, &len);
			respond_json(req, 200, body, len, NULL);
			free(body);
		} else {
			/* A stream with nothing (more) to send: 204 tells an
			 * EventSource not to reconnect. */
			respond_json(req, 204, "", 0, NULL);
		}
		return;
	}
	/* The stream's end as a last event, so a client can tell a finished
	 * run from a cut connection. */
	body = error_body(code, msg, &len);
	{
		char *frame = kpl_asprintf("event: end\ndata: %s\n\n", body);
		stream_write(h, frame, strlen(frame));
		free(frame);
	}
	free(body);
	stream_stop(h);
	h->req = NULL;
	httpd_stream_end(req);
}

static size_t op_push(void *t, const ProtobufCMessage *msg)
{
	struct hcall *h = t;
	const Kpl__V1__RunEvent *ev = (const void *)msg;
	uint64_t id = 0;
	char head[40], *json;
	size_t len, hl;

	if (msg->descriptor == &kpl__v1__run_event__descriptor)
		id = h->rt->out == OUT_SSE_GLOBAL ? ev->global_seq : ev->seq;
	json = pbjson_encode(msg, &len);
	hl = (size_t)snprintf(head, sizeof head, "id: %llu\ndata: ", (unsigned long long)id);
	if (h->len + hl + len + 2 > h->cap) {
		h->cap = (h->len + hl + len + 2) * 2;
		h->buf = kpl_realloc(h->buf, h->cap);
	}
	memcpy(h->buf + h->len, head, hl);
	memcpy(h->buf + h->len + hl, json, len);
	memcpy(h->buf + h->len + hl + len, "\n\n", 2);
	h->len += hl + len + 2;
	free(json);
	return h->len;
}

static void op_flush(void *t)
{
	struct hcall *h = t;
	size_t n = h->len;

	h->len = 0;
	if (stream_begin(h) < 0 || stream_write(h, h->buf, n) < 0) {
		/* Gone: the server fails the flush (later, not from here). */
		if (h->call) {
			api_call_detach(h->call);
			h->call = NULL;
		}
		return;
	}
	h->flushing = true;
}

static const char *op_metadata(void *t, const char *key)
{
	struct hcall *h = t;

	if (!h->req)
		return NULL;
	/* gRPC metadata keys are HTTP header names. */
	return httpd_req_header(h->req, key);
}

static void op_released(void *t)
{
	hcall_maybe_free(t);
}

static const struct api_call_ops hcall_ops = {
	.end = op_end,
	.push = op_push,
	.flush = op_flush,
	.metadata = op_metadata,
	.released = op_released,
};

/* ---------------------------------------------------------------------- */
/* Requests */

static int hexval(char c)
{
	return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 :
	       c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

/* Percent-decodes n bytes of s (and '+' as space if plus); malloc'd, or
 * NULL if malformed or holding a NUL. */
static char *pct_decode(const char *s, size_t n, bool plus)
{
	char *out = kpl_malloc(n + 1), *o = out;

	for (size_t i = 0; i < n; i++) {
		if (s[i] == '%') {
			int hi = -1, lo = -1;
			if (n - i >= 3) {
				hi = hexval(s[i + 1]);
				lo = hexval(s[i + 2]);
			}
			if (hi < 0 || lo < 0 || (hi == 0 && lo == 0)) {
				free(out);
				return NULL;
			}
			*o++ = (char)(hi << 4 | lo);
			i += 2;
		} else {
			*o++ = plus && s[i] == '+' ? ' ' : s[i];
		}
	}
	*o = '\0';
	return out;
}

/*
 * Splits path (modified in place) into its segments and the verb after
 * the last segment's last ':' (or NULL). -1 if it has more than MAX_SEGS
 * segments or does not start with '/'.
 */
static int split_path(char *path, char **segs, size_t *n, char **verb)
{
	char *p = path, *colon;

	*n = 0;
	*verb = NULL;
	if (*p != '/')
		return -1;
	while (p) {
		if (*n == MAX_SEGS)
			return -1;
		*p++ = '\0';
		segs[(*n)++] = p;
		p = strchr(p, '/');
	}
	if ((colon = strrchr(segs[*n - 1], ':')) != NULL) {
		*colon = '\0';
		*verb = colon + 1;
	}
	return 0;
}

/* Variables of a matched route: field name and raw (encoded) value. */
struct binding {
	char name[64];
	const char *value;
};

/*
 * Does the route's pattern match these segments and verb? Fills vars
 * (at most MAX_SEGS) with its variables.
 */
static bool route_match(const struct route *rt, char **segs, size_t n, const char *verb,
			struct binding *vars, size_t *n_vars)
{
	char pat[128], *psegs[MAX_SEGS], *pverb;
	size_t pn;

	snprintf(pat, sizeof pat, "%s", rt->pattern);
	if (split_path(pat, psegs, &pn, &pverb) || pn != n)
		return false;
	if ((pverb == NULL) != (verb == NULL) || (pverb && strcmp(pverb, verb)))
		return false;
	*n_vars = 0;
	for (size_t i = 0; i < n; i++) {
		size_t pl = strlen(psegs[i]);
		if (psegs[i][0] == '{' && pl > 2 && psegs[i][pl - 1] == '}') {
			if (!*segs[i])
				return false;
			snprintf(vars[*n_vars].name, sizeof vars[*n_vars].name, "%.*s",
				 (int)(pl - 2), psegs[i] + 1);
			vars[(*n_vars)++].value = segs[i];
		} else if (strcmp(psegs[i], segs[i])) {
			return false;
		}
	}
	return true;
}

/* Sets the query string's parameters as fields of m. */
static int set_query(ProtobufCMessage *m, const char *q, struct kpl_err *err)
{
	while (*q) {
		const char *amp = strchr(q, '&'), *eq;
		size_t len = amp ? (size_t)(amp - q) : strlen(q);
		char *name, *value;
		int rc;

		eq = memchr(q, '=', len);
		if (len == 0) {
			q += amp ? 1 : 0;
			continue;
		}
		name = pct_decode(q, eq ? (size_t)(eq - q) : len, true);
		value = eq ? pct_decode(eq + 1, len - (size_t)(eq - q) - 1, true) : kpl_strdup("");
		if (!name || !value) {
			free(name);
			free(value);
			return kpl_errf(err, KPL_EINVAL, "query: bad percent-encoding");
		}
		/* An access token never travels in the URL (logs keep URLs). */
		rc = pbjson_set_field(m, name, value, err);
		free(name);
		free(value);
		if (rc)
			return rc;
		q += len + (amp ? 1 : 0);
	}
	return 0;
}

/* Last-Event-ID: resume right after that event, exactly as from_seq. */
static int set_resume(ProtobufCMessage *m, const struct route *rt, const char *last_id,
		      struct kpl_err *err)
{
	char *end, buf[32];
	unsigned long long v;

	if (!last_id)
		return 0;
	v = strtoull(last_id, &end, 10);
	if (!*last_id || *end || *last_id == '-' || v == ~0ULL)
		return kpl_errf(err, KPL_EINVAL, "Last-Event-ID: want an event id (a number)");
	snprintf(buf, sizeof buf, "%llu", v + 1);
	return pbjson_set_field(m, rt->out == OUT_SSE_GLOBAL ? "from_global_seq" : "from_seq",
				buf, err);
}

static void handle(struct httpd_req *req, void *data)
{
	struct httpapi *a = data;
	const char *method = httpd_req_method(req);
	char *path = kpl_strdup(httpd_req_path(req)), *segs[MAX_SEGS], *verb;
	struct binding vars[MAX_SEGS];
	const struct route *rt = NULL;
	const struct api_method *m;
	ProtobufCMessage *msg = NULL;
	struct kpl_err err = { 0 };
	char allow[128] = "", peer[96];
	size_t n, n_vars = 0;
	struct hcall *h;

	if (split_path(path, segs, &n, &verb) == 0) {
		for (size_t i = 0; i < KPL_ARRAY_SIZE(routes); i++) {
			if (!route_match(&routes[i], segs, n, verb, vars, &n_vars))
				continue;
			if (strcmp(routes[i].method, method) == 0) {
				rt = &routes[i];
				break;
			}
			snprintf(allow + strlen(allow), sizeof allow - strlen(allow), "%s%s",
				 allow[0] ? ", " : "", routes[i].method);
		}
	}
	if (!rt) {
		free(path);
		if (allow[0]) {
			char hdr[160], *body;
			size_t len;
			snprintf(hdr, sizeof hdr, "Allow: %s\r\n", allow);
			body = error_body(12, "method not allowed here", &len);
			respond_json(req, 405, body, len, hdr);
			free(body);
		} else {
			respond_error(req, 5, "no such API route (docs/http.md)");
		}
		return;
	}
	if (!a->server || !(m = api_server_method(a->server, rt->rpc))) {
		free(path);
		respond_error(req, 14, a->server ? "this method is not served" : "kpld is stopping");
		return;
	}
	if (rt->body == BODY_ALL) {
		size_t len;
		const char *body = httpd_req_body(req, &len);
		const char *ct = httpd_req_header(req, "Content-Type");
		/* Always, even with no body: a page of another site can
		 * POST a form (no preflight) but not application/json, and
		 * in open mode (no token yet) nothing else would stop it. */
		if (!ct || strncasecmp(ct, "application/json", 16) != 0 ||
		    (ct[16] && ct[16] != ';' && ct[16] != ' ')) {
			free(path);
			respond_error(req, 3, "Content-Type: want application/json");
			return;
		}
		if (pbjson_decode(m->request, body, len, &msg, &err))
			goto bad;
	} else {
		msg = kpl_malloc(m->request->sizeof_message);
		protobuf_c_message_init(m->request, msg);
		if (set_query(msg, httpd_req_query(req), &err))
			goto bad;
	}
	for (size_t i = 0; i < n_vars; i++) {
		char *v = pct_decode(vars[i].value, strlen(vars[i].value), false);
		int rc;
		if (!v) {
			kpl_errf(&err, KPL_EINVAL, "%s: bad percent-encoding in the path",
				 vars[i].name);
			goto bad;
		}
		rc = pbjson_set_field(msg, vars[i].name, v, &err);
		free(v);
		if (rc)
			goto bad;
	}
	if (rt->out != OUT_UNARY &&
	    set_resume(msg, rt, httpd_req_header(req, "Last-Event-ID"), &err))
		goto bad;
	free(path);
	h = kpl_calloc(1, sizeof *h);
	h->loop = a->loop;
	h->rt = rt;
	h->req = req;
	h->heartbeat_ms = a->heartbeat_ms;
	/* The stream caps count HTTP streams per client address. */
	snprintf(peer, sizeof peer, "http:%s", httpd_req_peer(req));
	h->starting = true;
	api_call_start(a->server, m, msg, peer, &hcall_ops, h, &h->call);
	h->starting = false;
	/* A stream whose call goes on gets its head now, so the client sees
	 * it connected even if no event comes for a while. */
	if (rt->out != OUT_UNARY && !h->ended && h->req && stream_begin(h) < 0 && h->call) {
		api_call_detach(h->call);
		h->call = NULL;
	}
	hcall_maybe_free(h);
	return;
bad:
	free(path);
	if (msg)
		protobuf_c_message_free_unpacked(msg, NULL);
	respond_error(req, 3, err.msg);
}

/* ---------------------------------------------------------------------- */

struct httpapi *httpapi_new(uv_loop_t *loop, struct api_server *s,
			    const struct httpapi_options *opt)
{
	struct httpapi *a = kpl_calloc(1, sizeof *a);

	a->loop = loop;
	a->server = s;
	a->heartbeat_ms = opt && opt->heartbeat_ms ? opt->heartbeat_ms : DEFAULT_HEARTBEAT_MS;
	return a;
}

struct httpd_route httpapi_route(struct httpapi *a)
{
	return (struct httpd_route){ "*", "/v1/*", handle, a };
}

void httpapi_stop(struct httpapi *a)
{
	a->server = NULL;
}

void httpapi_free(struct httpapi *a)
{
	free(a);
}

void httpapi_print_routes(FILE *f)
{
	for (size_t i = 0; i < KPL_ARRAY_SIZE(routes); i++)
		fprintf(f, "%s %s %s\n", routes[i].method, routes[i].pattern, routes[i].rpc);
}
