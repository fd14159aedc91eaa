/*
 * http.c - libcurl multi driven by libuv (see http.h for the contract).
 *
 * Layout: the pure helpers first (redaction, backoff, Retry-After, the retry
 * rule, the line splitter), then the loop glue: curl's socket and timer
 * callbacks, the request state machine, the client's life cycle.
 *
 * The one rule the glue lives by: no curl_multi_* call from inside a libcurl
 * callback (libcurl answers CURLM_RECURSIVE_API_CALL) and no user callback
 * from inside an http_* call. So http_request_start and http_request_cancel
 * only mark the request and arm the client's `defer` timer; its callback,
 * which runs from uv_run and never from libcurl, adds handles to the multi
 * and finishes cancelled requests. User callbacks run from libcurl's write
 * callback (on_data/on_line) or from a uv callback (on_done), and every
 * http_* call they make is deferred the same way.
 */
#include "base/http.h"

#include <ctype.h>
#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#define SUBSYS "http"

/* Bounds on what a server sends in headers (libcurl bounds one header). */
#define HTTP_MAX_HEADER_BYTES (256u * 1024)
#define HTTP_MAX_HEADERS 512

/* ------------------------------------------------------------------ */
/* Pure helpers                                                        */
/* ------------------------------------------------------------------ */

static const char *const secret_params[] = {
	"token", "key", "access_token", "sig", "signature", "password",
	"secret", "client_secret", "api_key", "apikey", "x-amz-signature",
	"x-amz-credential", "x-amz-security-token", "x-goog-signature",
	"x-goog-credential",
};

static int is_secret_param(const char *name, size_t n)
{
	for (size_t i = 0; i < KPL_ARRAY_SIZE(secret_params); i++)
		if (strlen(secret_params[i]) == n && strncasecmp(secret_params[i], name, n) == 0)
			return 1;
	return 0;
}

char *http_redact_url(const char *url)
{
	struct kpl_buf b = { 0 };
	const char *p, *auth, *auth_end, *at = NULL, *q, *frag;

	if (!url)
		return kpl_strdup("");
	kpl_buf_add(&b, "", 0);
	/* The authority starts after "scheme://" and ends at / ? or #. */
	p = strstr(url, "://");
	auth = p ? p + 3 : url;
	auth_end = auth + strcspn(auth, "/?#");
	for (const char *s = auth; s < auth_end; s++)
		if (*s == '@')
			at = s; /* the last '@': a password may hold one */
	if (at) {
		kpl_buf_add(&b, url, (size_t)(auth - url));
		kpl_buf_str(&b, "***");
		p = at;
	} else {
		p = url;
	}
	q = strchr(auth_end, '?');
	frag = strchr(auth_end, '#');
	if (!q || (frag && frag < q)) {
		kpl_buf_str(&b, p);
		return b.s;
	}
	kpl_buf_add(&b, p, (size_t)(q + 1 - p));
	p = q + 1;
	for (;;) {
		/* One parameter: name[=value], ended by & ; # or the end. */
		size_t n = strcspn(p, "&;#");
		const char *eq = memchr(p, '=', n);

		if (eq && is_secret_param(p, (size_t)(eq - p))) {
			kpl_buf_add(&b, p, (size_t)(eq + 1 - p));
			kpl_buf_str(&b, "***");
		} else {
			kpl_buf_add(&b, p, n);
		}
		p += n;
		if (*p == '&' || *p == ';') {
			kpl_buf_add(&b, p, 1);
			p++;
			continue;
		}
		kpl_buf_str(&b, p); /* "#fragment" or "" */
		return b.s;
	}
}

static void policy_defaults(struct http_retry_policy *p)
{
	if (p->max_attempts <= 0)
		p->max_attempts = HTTP_DEFAULT_MAX_ATTEMPTS;
	if (p->base_backoff_ms <= 0)
		p->base_backoff_ms = HTTP_DEFAULT_BASE_BACKOFF_MS;
	if (p->max_backoff_ms <= 0)
		p->max_backoff_ms = HTTP_DEFAULT_MAX_BACKOFF_MS;
	if (p->max_backoff_ms < p->base_backoff_ms)
		p->max_backoff_ms = p->base_backoff_ms;
	if (p->max_retry_after_ms <= 0)
		p->max_retry_after_ms = HTTP_DEFAULT_MAX_RETRY_AFTER_MS;
}

int64_t http_backoff_ms(const struct http_retry_policy *policy, int attempt, uint64_t rnd)
{
	struct http_retry_policy p = *policy;
	int64_t d;

	policy_defaults(&p);
	if (attempt < 1)
		attempt = 1;
	d = p.base_backoff_ms;
	for (int i = 1; i < attempt && d < p.max_backoff_ms; i++)
		d *= 2;
	if (d > p.max_backoff_ms)
		d = p.max_backoff_ms;
	return d / 2 + (int64_t)(rnd % (uint64_t)(d - d / 2 + 1));
}

int64_t http_parse_retry_after(const char *v, int64_t now_ms)
{
	const char *s;
	int64_t secs = 0;
	time_t t;

	if (!v)
		return -1;
	while (*v == ' ' || *v == '\t')
		v++;
	s = v;
	while (isdigit((unsigned char)*s)) {
		if (secs < 100000000) /* beyond ~3 years it is all the same */
			secs = secs * 10 + (*s - '0');
		s++;
	}
	if (s > v) {
		while (*s == ' ' || *s == '\t')
			s++;
		return *s ? -1 : secs * 1000;
	}
	t = curl_getdate(v, NULL);
	if (t == (time_t)-1)
		return -1;
	return (int64_t)t * 1000 > now_ms ? (int64_t)t * 1000 - now_ms : 0;
}

int http_should_retry(const struct http_attempt *a, int idempotent)
{
	if (a->delivered)
		return 0;
	if (a->curl_code == CURLE_OK)
		/* 429: the server refused to take the request on (rate limit,
		 * Kubernetes priority and fairness) and did nothing, so any
		 * method may be sent again, after its Retry-After. */
		return a->status == 429 ||
		       (idempotent &&
			(a->status == 502 || a->status == 503 || a->status == 504));
	if (!a->sent)
		/* The server saw nothing: safe for any method. */
		return a->curl_code == CURLE_COULDNT_CONNECT ||
		       a->curl_code == CURLE_OPERATION_TIMEDOUT;
	if (!idempotent)
		return 0;
	/* Idempotent, and nothing reached the caller: a reply cut short
	 * (reset mid-body, fewer bytes than Content-Length) is as good as
	 * none. */
	return a->curl_code == CURLE_RECV_ERROR || a->curl_code == CURLE_SEND_ERROR ||
	       a->curl_code == CURLE_GOT_NOTHING || a->curl_code == CURLE_PARTIAL_FILE;
}

void http_lines_init(struct http_lines *ls, size_t max_line, http_line_cb on_line,
		     struct http_request *req, void *data)
{
	memset(ls, 0, sizeof *ls);
	ls->max_line = max_line ? max_line : HTTP_DEFAULT_MAX_LINE;
	ls->on_line = on_line;
	ls->req = req;
	ls->data = data;
}

static int lines_take(struct http_lines *ls, const char *p, size_t n)
{
	if (ls->len + n > ls->max_line)
		return KPL_ETOOBIG;
	if (ls->len + n + 1 > ls->cap) {
		size_t cap = ls->cap ? ls->cap : 256;
		while (cap < ls->len + n + 1)
			cap *= 2;
		ls->buf = kpl_realloc(ls->buf, cap);
		ls->cap = cap;
	}
	memcpy(ls->buf + ls->len, p, n);
	ls->len += n;
	ls->buf[ls->len] = '\0';
	return 0;
}

static int lines_emit(struct http_lines *ls)
{
	size_t n = ls->len;

	if (n && ls->buf[n - 1] == '\r')
		ls->buf[--n] = '\0';
	ls->len = 0;
	return ls->on_line(ls->req, ls->buf ? ls->buf : "", n, ls->data);
}

int http_lines_feed(struct http_lines *ls, const char *p, size_t n)
{
	while (n) {
		const char *nl = memchr(p, '\n', n);
		size_t k = nl ? (size_t)(nl - p) : n;
		int r;

		if ((r = lines_take(ls, p, k)))
			return r;
		if (!nl)
			return 0;
		if ((r = lines_emit(ls)))
			return r;
		p += k + 1;
		n -= k + 1;
	}
	return 0;
}

int http_lines_finish(struct http_lines *ls)
{
	return ls->len ? lines_emit(ls) : 0;
}

void http_lines_release(struct http_lines *ls)
{
	free(ls->buf);
	ls->buf = NULL;
	ls->len = ls->cap = 0;
}

/* ------------------------------------------------------------------ */
/* Types                                                               */
/* ------------------------------------------------------------------ */

struct http_sock {
	uv_poll_t poll;
	curl_socket_t fd;
	struct http_client *c;
	struct http_sock *prev, *next;
};

struct http_client {
	uv_loop_t *loop;
	CURLM *multi;
	uv_timer_t timer; /* libcurl's timeout */
	uv_timer_t defer; /* starts and cancels, outside libcurl calls */
	int defer_armed;
	struct http_request *head, *tail;
	size_t n_reqs;
	struct http_sock *socks;
	size_t open_handles; /* uv handles not yet through their close_cb */
	int closing;
	int multi_gone;
	http_close_cb close_cb;
	void *close_data;
	char *user_agent;
	uint64_t rng;
};

/* A request's states; changed only through set_state(). */
enum req_state {
	REQ_QUEUED,  /* waiting for the defer pass to add it to the multi */
	REQ_RUNNING, /* an attempt is in the multi */
	REQ_BACKOFF, /* waiting on its timer for the next attempt */
	REQ_DONE,    /* on_done called; its timer is closing */
	REQ_STATE_LAST
};

static const char *const req_state_names[REQ_STATE_LAST] = {
	"QUEUED", "RUNNING", "BACKOFF", "DONE",
};

struct hdr {
	char *name;
	char *value;
};

struct http_request {
	struct http_client *c;
	struct http_request *prev, *next;
	enum req_state state;
	int cancelled;
	CURL *easy;
	uv_timer_t timer; /* backoff */

	char *method;
	char *url;
	char *redacted; /* url for messages */
	struct curl_slist *headers;
	char *body;
	int64_t deadline; /* uv_now() ms; 0: none */
	int64_t timeout_ms;
	int64_t connect_timeout_ms;
	int idempotent;
	struct http_retry_policy retry;
	size_t max_body; /* 0: none */
	int streaming;
	http_data_cb on_data;
	http_line_cb on_line;
	struct http_lines lines;
	http_done_cb on_done;
	void *data;

	/* The current attempt. */
	int attempts;
	int sent, got_response, delivered;
	int stream_now; /* this response's body goes to on_data/on_line */
	int mode_known; /* stream_now is decided */
	int in_multi;
	int abort_code; /* why a callback stopped the transfer */
	char abort_why[128]; /* "" if the caller's callback did */
	int caller_code; /* what on_line returned */
	struct hdr *hdrs;
	size_t n_hdrs, cap_hdrs, hdr_bytes;
	char *buf;
	size_t len, cap;
	size_t streamed;
	char errbuf[CURL_ERROR_SIZE];

	struct http_response resp;
};

static void defer_arm(struct http_client *c);
static void handle_closed(struct http_client *c);

/* ------------------------------------------------------------------ */
/* The request state machine                                           */
/* ------------------------------------------------------------------ */

static void req_set_state(struct http_request *req, enum req_state to, int line)
{
	static const unsigned char ok[REQ_STATE_LAST][REQ_STATE_LAST] = {
		[REQ_QUEUED] = { [REQ_RUNNING] = 1, [REQ_DONE] = 1 },
		[REQ_RUNNING] = { [REQ_BACKOFF] = 1, [REQ_DONE] = 1 },
		[REQ_BACKOFF] = { [REQ_RUNNING] = 1, [REQ_DONE] = 1 },
	};

	if (to >= REQ_STATE_LAST || !ok[req->state][to])
		BUG("http: request %s -> %s", req_state_names[req->state],
		    to < REQ_STATE_LAST ? req_state_names[to] : "?");
	kpl_debug(SUBSYS, "%s %s -> [%s] (line %d)", req->method, req->redacted,
		  req_state_names[to], line);
	req->state = to;
}
#define set_state(req, to) req_set_state(req, to, __LINE__)

static void hdrs_clear(struct http_request *req)
{
	for (size_t i = 0; i < req->n_hdrs; i++) {
		free(req->hdrs[i].name);
		free(req->hdrs[i].value);
	}
	req->n_hdrs = 0;
	req->hdr_bytes = 0;
}

static const char *hdr_find(const struct http_request *req, const char *name)
{
	for (size_t i = 0; i < req->n_hdrs; i++)
		if (strcasecmp(req->hdrs[i].name, name) == 0)
			return req->hdrs[i].value;
	return NULL;
}

static void req_closed(uv_handle_t *h)
{
	struct http_request *req = h->data;
	struct http_client *c = req->c;

	free(req);
	handle_closed(c);
}

static void req_unlink(struct http_request *req)
{
	struct http_client *c = req->c;

	if (req->prev)
		req->prev->next = req->next;
	else
		c->head = req->next;
	if (req->next)
		req->next->prev = req->prev;
	else
		c->tail = req->prev;
	req->prev = req->next = NULL;
	c->n_reqs--;
}

static int curl_to_kpl(CURLcode rc)
{
	switch (rc) {
	case CURLE_OPERATION_TIMEDOUT:
		return KPL_ETIMEOUT;
	case CURLE_FILESIZE_EXCEEDED:
		return KPL_ETOOBIG;
	case CURLE_URL_MALFORMAT:
	case CURLE_UNSUPPORTED_PROTOCOL:
	case CURLE_BAD_FUNCTION_ARGUMENT:
	case CURLE_SSL_CERTPROBLEM:
	case CURLE_SSL_CACERT_BADFILE:
	case CURLE_NOT_BUILT_IN:
		return KPL_EINVAL;
	case CURLE_COULDNT_RESOLVE_PROXY:
	case CURLE_COULDNT_RESOLVE_HOST:
	case CURLE_COULDNT_CONNECT:
	case CURLE_SSL_CONNECT_ERROR:
	case CURLE_PEER_FAILED_VERIFICATION:
	case CURLE_SEND_ERROR:
	case CURLE_RECV_ERROR:
	case CURLE_GOT_NOTHING:
	case CURLE_PARTIAL_FILE:
	case CURLE_HTTP2:
	case CURLE_HTTP2_STREAM:
	case CURLE_TOO_MANY_REDIRECTS:
	case CURLE_WEIRD_SERVER_REPLY:
	case CURLE_SSL_ENGINE_INITFAILED:
	case CURLE_SSL_SHUTDOWN_FAILED:
	case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
	case CURLE_SSL_INVALIDCERTSTATUS:
	case CURLE_HTTP3:
	case CURLE_QUIC_CONNECT_ERROR:
	case CURLE_PROXY:
		return KPL_EUNAVAILABLE;
	default:
		return KPL_EINTERNAL;
	}
}

/* Calls on_done exactly once, then frees what the request holds; the
 * request itself is freed when its timer has closed. Never called from
 * inside a libcurl callback. */
static void finish(struct http_request *req, int code, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static void finish(struct http_request *req, int code, const char *fmt, ...)
{
	struct http_client *c = req->c;
	struct http_response *resp = &req->resp;
	char *eff = NULL;

	if (req->in_multi) {
		curl_multi_remove_handle(c->multi, req->easy);
		req->in_multi = 0;
	}
	if (req->state == REQ_BACKOFF)
		uv_timer_stop(&req->timer);
	set_state(req, REQ_DONE);
	req_unlink(req);

	memset(resp, 0, sizeof *resp);
	resp->req = req;
	if (req->attempts)
		curl_easy_getinfo(req->easy, CURLINFO_RESPONSE_CODE, &resp->status);
	resp->body = req->buf ? req->buf : "";
	resp->body_len = req->len;
	if (req->attempts)
		curl_easy_getinfo(req->easy, CURLINFO_EFFECTIVE_URL, &eff);
	resp->effective_url = eff ? eff : req->url;
	resp->attempts = req->attempts;
	resp->err.code = code;
	if (code) {
		char detail[384];
		va_list ap;

		va_start(ap, fmt);
		vsnprintf(detail, sizeof detail, fmt, ap);
		va_end(ap);
		kpl_errf(&resp->err, code, "%s %s: %s", req->method, req->redacted, detail);
		kpl_debug(SUBSYS, "%s", resp->err.msg);
	} else {
		kpl_debug(SUBSYS, "%s %s: %ld after %d attempt(s)", req->method,
			  req->redacted, resp->status, req->attempts);
	}

	req->on_done(resp, code, req->data);

	curl_easy_cleanup(req->easy);
	curl_slist_free_all(req->headers);
	hdrs_clear(req);
	free(req->hdrs);
	free(req->buf);
	http_lines_release(&req->lines);
	free(req->method);
	free(req->url);
	free(req->redacted);
	free(req->body);
	uv_close((uv_handle_t *)&req->timer, req_closed);
}

static void attempt_start(struct http_request *req)
{
	struct http_client *c = req->c;
	int64_t left = 0;
	CURLMcode mc;

	req->sent = req->got_response = 0;
	req->stream_now = req->mode_known = 0;
	req->abort_code = req->caller_code = 0;
	req->abort_why[0] = '\0';
	hdrs_clear(req);
	req->len = 0;
	if (req->buf)
		req->buf[0] = '\0';
	req->errbuf[0] = '\0';
	req->lines.len = 0;
	req->attempts++;

	if (req->deadline) {
		left = req->deadline - (int64_t)uv_now(c->loop);
		if (left <= 0) {
			finish(req, KPL_ETIMEOUT, "timed out after %lld ms (%d attempts)",
			       (long long)req->timeout_ms, req->attempts - 1);
			return;
		}
	}
	curl_easy_setopt(req->easy, CURLOPT_TIMEOUT_MS, (long)left);
	curl_easy_setopt(req->easy, CURLOPT_CONNECTTIMEOUT_MS,
			 (long)(left && left < req->connect_timeout_ms ? left : req->connect_timeout_ms));
	mc = curl_multi_add_handle(c->multi, req->easy);
	if (mc != CURLM_OK) {
		finish(req, KPL_EINTERNAL, "curl_multi_add_handle: %s", curl_multi_strerror(mc));
		return;
	}
	req->in_multi = 1;
	set_state(req, REQ_RUNNING);
}

static void on_backoff(uv_timer_t *t)
{
	struct http_request *req = t->data;

	if (req->cancelled)
		finish(req, KPL_ECANCELLED, "cancelled");
	else
		attempt_start(req);
}

static uint64_t next_rand(struct http_client *c)
{
	/* xorshift64: jitter needs spread, not secrecy. */
	uint64_t x = c->rng;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return c->rng = x;
}

/* One attempt ended with rc (libcurl has let go of the easy handle). */
static void attempt_done(struct http_request *req, CURLcode rc)
{
	struct http_client *c = req->c;
	struct http_attempt a = { 0 };
	long status = 0;
	int code;

	if (req->cancelled) {
		finish(req, KPL_ECANCELLED, "cancelled");
		return;
	}
	if (req->abort_code) {
		if (req->abort_why[0])
			finish(req, req->abort_code, "%s", req->abort_why);
		else
			finish(req, req->abort_code, "stopped by the caller: %s",
			       kpl_strerror(req->abort_code));
		return;
	}
	curl_easy_getinfo(req->easy, CURLINFO_RESPONSE_CODE, &status);
	if (rc == CURLE_OK && req->stream_now && req->on_line) {
		int r = http_lines_finish(&req->lines);
		if (r) {
			finish(req, r, "stopped by the caller: %s", kpl_strerror(r));
			return;
		}
	}

	a.curl_code = rc;
	a.status = status;
	a.sent = req->sent;
	a.got_response = req->got_response;
	a.delivered = req->delivered;
	if (!c->closing && req->attempts < req->retry.max_attempts &&
	    http_should_retry(&a, req->idempotent)) {
		int64_t delay = -1;
		const char *ra = rc == CURLE_OK ? hdr_find(req, "Retry-After") : NULL;

		if (ra && (delay = http_parse_retry_after(ra, kpl_now_ms())) > req->retry.max_retry_after_ms)
			delay = req->retry.max_retry_after_ms;
		if (delay < 0)
			delay = http_backoff_ms(&req->retry, req->attempts, next_rand(c));
		if (!req->deadline || (int64_t)uv_now(c->loop) + delay < req->deadline) {
			kpl_debug(SUBSYS, "%s %s: attempt %d: %s %ld; again in %lld ms",
				  req->method, req->redacted, req->attempts,
				  rc == CURLE_OK ? "HTTP" : curl_easy_strerror(rc), status,
				  (long long)delay);
			set_state(req, REQ_BACKOFF);
			uv_timer_start(&req->timer, on_backoff, (uint64_t)delay, 0);
			return;
		}
	}
	if (rc == CURLE_OK) {
		finish(req, 0, NULL);
		return;
	}
	code = curl_to_kpl(rc);
	if (rc == CURLE_FILESIZE_EXCEEDED) {
		finish(req, code, "response body over %zu bytes", req->max_body);
		return;
	}
	finish(req, code, "%s (%d attempt%s)",
	       req->errbuf[0] ? req->errbuf : curl_easy_strerror(rc), req->attempts,
	       req->attempts == 1 ? "" : "s");
}

/* ------------------------------------------------------------------ */
/* libcurl callbacks (no curl_multi_* and no finish() in here)         */
/* ------------------------------------------------------------------ */

static int on_prereq(void *ud, char *ip, char *local_ip, int port, int local_port)
{
	struct http_request *req = ud;

	req->sent = 1;
	return CURL_PREREQFUNC_OK;
}

static size_t on_header(char *p, size_t size, size_t nmemb, void *ud)
{
	struct http_request *req = ud;
	size_t n = size * nmemb, k;
	const char *colon, *v;
	struct hdr *h;

	if (req->cancelled)
		return 0;
	req->got_response = 1;
	if (n >= 5 && memcmp(p, "HTTP/", 5) == 0) {
		/* A new response (after a redirect or a 100 Continue). */
		hdrs_clear(req);
		req->mode_known = 0;
		return n;
	}
	while (n && (p[n - 1] == '\n' || p[n - 1] == '\r'))
		n--;
	colon = memchr(p, ':', n);
	if (!colon)
		return size * nmemb; /* the blank line, or a folded one */
	req->hdr_bytes += n;
	if (req->hdr_bytes > HTTP_MAX_HEADER_BYTES || req->n_hdrs >= HTTP_MAX_HEADERS) {
		req->abort_code = KPL_ETOOBIG;
		snprintf(req->abort_why, sizeof req->abort_why,
			 "response headers over %u bytes", HTTP_MAX_HEADER_BYTES);
		return 0;
	}
	if (req->n_hdrs == req->cap_hdrs) {
		req->cap_hdrs = req->cap_hdrs ? req->cap_hdrs * 2 : 16;
		req->hdrs = kpl_realloc(req->hdrs, req->cap_hdrs * sizeof *req->hdrs);
	}
	h = &req->hdrs[req->n_hdrs++];
	k = (size_t)(colon - p);
	while (k && (p[k - 1] == ' ' || p[k - 1] == '\t'))
		k--;
	h->name = kpl_strndup(p, k);
	v = colon + 1;
	while (v < p + n && (*v == ' ' || *v == '\t'))
		v++;
	k = (size_t)(p + n - v);
	while (k && (v[k - 1] == ' ' || v[k - 1] == '\t'))
		k--;
	h->value = kpl_strndup(v, k);
	return size * nmemb;
}

static int req_on_line(struct http_request *req, const char *line, size_t n, void *data)
{
	int r;

	if (req->cancelled)
		return KPL_ECANCELLED;
	r = req->on_line(req, line, n, data);
	if (r)
		req->caller_code = r;
	return r;
}

static size_t on_write(char *p, size_t size, size_t nmemb, void *ud)
{
	struct http_request *req = ud;
	size_t n = size * nmemb, limit;

	if (req->cancelled)
		return 0;
	req->got_response = 1;
	if (!req->mode_known) {
		long status = 0;

		curl_easy_getinfo(req->easy, CURLINFO_RESPONSE_CODE, &status);
		req->stream_now = req->streaming && status >= 200 && status < 300;
		req->mode_known = 1;
	}
	if (req->stream_now) {
		int r;

		if (req->max_body && req->streamed + n > req->max_body) {
			req->abort_code = KPL_ETOOBIG;
			snprintf(req->abort_why, sizeof req->abort_why,
				 "response body over %zu bytes", req->max_body);
			return 0;
		}
		req->streamed += n;
		req->delivered = 1;
		if (req->on_line)
			r = http_lines_feed(&req->lines, p, n);
		else
			r = req->on_data(req, p, n, req->data);
		if (req->cancelled)
			return 0;
		if (r) {
			req->abort_code = r;
			if (req->on_line && !req->caller_code)
				snprintf(req->abort_why, sizeof req->abort_why,
					 "line over %zu bytes", req->lines.max_line);
			return 0;
		}
		return n;
	}
	limit = req->streaming ? HTTP_MAX_ERROR_BODY : req->max_body;
	if (req->len + n > limit) {
		if (req->streaming) {
			n = limit - req->len; /* keep the start of an error body */
			if (!n)
				return size * nmemb;
		} else {
			req->abort_code = KPL_ETOOBIG;
			snprintf(req->abort_why, sizeof req->abort_why,
				 "response body over %zu bytes", req->max_body);
			return 0;
		}
	}
	if (req->len + n + 1 > req->cap) {
		size_t cap = req->cap ? req->cap : 1024;
		while (cap < req->len + n + 1)
			cap *= 2;
		req->buf = kpl_realloc(req->buf, cap);
		req->cap = cap;
	}
	memcpy(req->buf + req->len, p, n);
	req->len += n;
	req->buf[req->len] = '\0';
	return size * nmemb;
}

/* ------------------------------------------------------------------ */
/* The multi on the loop                                               */
/* ------------------------------------------------------------------ */

static void drain(struct http_client *c)
{
	CURLMsg *m;
	int left;

	while ((m = curl_multi_info_read(c->multi, &left))) {
		struct http_request *req = NULL;
		CURL *e = m->easy_handle;
		CURLcode rc = m->data.result;

		if (m->msg != CURLMSG_DONE)
			continue;
		curl_easy_getinfo(e, CURLINFO_PRIVATE, (char **)&req);
		curl_multi_remove_handle(c->multi, e); /* m is gone now */
		req->in_multi = 0;
		attempt_done(req, rc);
	}
}

static void on_poll(uv_poll_t *h, int status, int events)
{
	struct http_sock *s = h->data;
	struct http_client *c = s->c;
	int flags = 0, running;

	if (status < 0)
		flags = CURL_CSELECT_ERR;
	if (events & UV_READABLE)
		flags |= CURL_CSELECT_IN;
	if (events & UV_WRITABLE)
		flags |= CURL_CSELECT_OUT;
	curl_multi_socket_action(c->multi, s->fd, flags, &running);
	drain(c);
}

static void on_curl_timer(uv_timer_t *t)
{
	struct http_client *c = t->data;
	int running;

	curl_multi_socket_action(c->multi, CURL_SOCKET_TIMEOUT, 0, &running);
	drain(c);
}

static void sock_closed(uv_handle_t *h)
{
	struct http_sock *s = h->data;
	struct http_client *c = s->c;

	free(s);
	handle_closed(c);
}

static void sock_close(struct http_sock *s)
{
	struct http_client *c = s->c;

	if (s->prev)
		s->prev->next = s->next;
	else
		c->socks = s->next;
	if (s->next)
		s->next->prev = s->prev;
	/* uv_close stops the poll now (the fd may be reused at once by a new
	 * socket, which gets its own handle); the memory goes in sock_closed. */
	uv_close((uv_handle_t *)&s->poll, sock_closed);
}

static int on_socket(CURL *e, curl_socket_t fd, int what, void *userp, void *socketp)
{
	struct http_client *c = userp;
	struct http_sock *s = socketp;
	int events = 0, r;

	if (what == CURL_POLL_REMOVE) {
		if (s)
			sock_close(s);
		return 0;
	}
	if (!s) {
		s = kpl_calloc(1, sizeof *s);
		s->c = c;
		s->fd = fd;
		if ((r = uv_poll_init_socket(c->loop, &s->poll, fd))) {
			kpl_error(SUBSYS, "uv_poll_init_socket(%d): %s", (int)fd, uv_strerror(r));
			free(s);
			return -1;
		}
		s->poll.data = s;
		c->open_handles++;
		s->next = c->socks;
		if (c->socks)
			c->socks->prev = s;
		c->socks = s;
		curl_multi_assign(c->multi, fd, s);
	}
	if (what & CURL_POLL_IN)
		events |= UV_READABLE;
	if (what & CURL_POLL_OUT)
		events |= UV_WRITABLE;
	if ((r = uv_poll_start(&s->poll, events, on_poll))) {
		kpl_error(SUBSYS, "uv_poll_start(%d): %s", (int)fd, uv_strerror(r));
		return -1;
	}
	return 0;
}

static int on_timer_func(CURLM *m, long timeout_ms, void *userp)
{
	struct http_client *c = userp;

	if (timeout_ms < 0)
		uv_timer_stop(&c->timer);
	else /* 0 means soon, but not from inside this call: 1 ms */
		uv_timer_start(&c->timer, on_curl_timer, timeout_ms ? (uint64_t)timeout_ms : 1, 0);
	return 0;
}

/* ------------------------------------------------------------------ */
/* The client                                                          */
/* ------------------------------------------------------------------ */

static void handle_closed(struct http_client *c)
{
	http_close_cb cb;
	void *data;

	if (--c->open_handles || !c->multi_gone)
		return;
	cb = c->close_cb;
	data = c->close_data;
	free(c->user_agent);
	free(c);
	if (cb)
		cb(data);
}

static void client_handle_closed(uv_handle_t *h)
{
	handle_closed(h->data);
}

static void shutdown_if_idle(struct http_client *c)
{
	if (!c->closing || c->multi_gone || c->n_reqs)
		return;
	/* curl_multi_cleanup may still call on_socket (REMOVE) and
	 * on_timer_func; both handles are open until after it. */
	curl_multi_cleanup(c->multi);
	c->multi = NULL;
	c->multi_gone = 1;
	while (c->socks)
		sock_close(c->socks);
	uv_close((uv_handle_t *)&c->timer, client_handle_closed);
	uv_close((uv_handle_t *)&c->defer, client_handle_closed);
}

static void on_defer(uv_timer_t *t)
{
	struct http_client *c = t->data;
	struct http_request *req, *next;

	c->defer_armed = 0;
	/* finish() runs on_done, which may start (appended, deferred) or
	 * cancel (flagged, deferred) requests but never frees another one, so
	 * next stays valid. */
	for (req = c->head; req; req = next) {
		next = req->next;
		if (req->cancelled)
			finish(req, KPL_ECANCELLED, "cancelled");
		else if (req->state == REQ_QUEUED)
			attempt_start(req);
	}
	shutdown_if_idle(c);
}

static void defer_arm(struct http_client *c)
{
	if (!c->defer_armed) {
		c->defer_armed = 1;
		uv_timer_start(&c->defer, on_defer, 0, 0);
	}
}

int http_client_new(uv_loop_t *loop, const struct http_client_options *opts,
		    struct http_client **out, struct kpl_err *err)
{
	static int global_done;
	struct http_client *c;

	if (!global_done) {
		const curl_version_info_data *v;

		if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
			return kpl_errf(err, KPL_EINTERNAL, "http: curl_global_init failed");
		global_done = 1;
		v = curl_version_info(CURLVERSION_NOW);
		if (!(v->features & CURL_VERSION_ASYNCHDNS))
			kpl_warn(SUBSYS, "libcurl %s resolves names synchronously: DNS "
				 "lookups will block the loop", v->version);
	}
	c = kpl_calloc(1, sizeof *c);
	c->loop = loop;
	c->multi = curl_multi_init();
	if (!c->multi) {
		free(c);
		return kpl_errf(err, KPL_EINTERNAL, "http: curl_multi_init failed");
	}
	uv_timer_init(loop, &c->timer);
	uv_timer_init(loop, &c->defer);
	c->timer.data = c;
	c->defer.data = c;
	c->open_handles = 2;
	curl_multi_setopt(c->multi, CURLMOPT_SOCKETFUNCTION, on_socket);
	curl_multi_setopt(c->multi, CURLMOPT_SOCKETDATA, c);
	curl_multi_setopt(c->multi, CURLMOPT_TIMERFUNCTION, on_timer_func);
	curl_multi_setopt(c->multi, CURLMOPT_TIMERDATA, c);
	if (opts && opts->max_host_connections > 0)
		curl_multi_setopt(c->multi, CURLMOPT_MAX_HOST_CONNECTIONS,
				  opts->max_host_connections);
	c->user_agent = kpl_strdup(opts && opts->user_agent ? opts->user_agent : "kpld");
	c->rng = uv_hrtime() ^ ((uint64_t)getpid() << 32) ^ (uintptr_t)c;
	if (!c->rng)
		c->rng = 0x9e3779b97f4a7c15ull;
	*out = c;
	return 0;
}

void http_client_close(struct http_client *c, http_close_cb done_cb, void *data)
{
	if (c->closing)
		BUG("http: http_client_close called twice");
	c->closing = 1;
	c->close_cb = done_cb;
	c->close_data = data;
	for (struct http_request *req = c->head; req; req = req->next)
		req->cancelled = 1;
	defer_arm(c);
}

size_t http_client_active(const struct http_client *c)
{
	return c->n_reqs;
}

/* ------------------------------------------------------------------ */
/* Requests                                                            */
/* ------------------------------------------------------------------ */

static int has_crlf(const char *s)
{
	return s && strpbrk(s, "\r\n") != NULL;
}

static int method_ok(const char *m)
{
	if (!*m)
		return 0;
	for (; *m; m++)
		if (!isalnum((unsigned char)*m) && !strchr("!#$%&'*+-.^_`|~", *m))
			return 0;
	return 1;
}

static int default_idempotent(const char *m)
{
	static const char *const yes[] = { "GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE" };

	for (size_t i = 0; i < KPL_ARRAY_SIZE(yes); i++)
		if (strcmp(m, yes[i]) == 0)
			return 1;
	return 0;
}

static int validate(const struct http_request_options *o, const char *method,
		    const char *redacted, struct kpl_err *err)
{
	if (!o->url)
		return kpl_errf(err, KPL_EINVAL, "http: no url");
	if (strncasecmp(o->url, "http://", 7) != 0 && strncasecmp(o->url, "https://", 8) != 0)
		return kpl_errf(err, KPL_EINVAL, "%s %s: not an http or https url", method, redacted);
	if (has_crlf(o->url) || strchr(o->url, ' '))
		return kpl_errf(err, KPL_EINVAL, "%s %s: blank or line break in the url", method, redacted);
	if (!method_ok(method))
		return kpl_errf(err, KPL_EINVAL, "%s %s: bad method", method, redacted);
	if (!o->on_done)
		return kpl_errf(err, KPL_EINVAL, "%s %s: no on_done", method, redacted);
	if (o->on_data && o->on_line)
		return kpl_errf(err, KPL_EINVAL, "%s %s: both on_data and on_line", method, redacted);
	if (o->n_headers && !o->headers)
		return kpl_errf(err, KPL_EINVAL, "%s %s: n_headers without headers", method, redacted);
	for (size_t i = 0; i < o->n_headers; i++) {
		const struct http_header *h = &o->headers[i];

		if (!h->name || !*h->name || strpbrk(h->name, ":\r\n \t") || !h->value ||
		    has_crlf(h->value))
			return kpl_errf(err, KPL_EINVAL, "%s %s: bad header %zu (%s)", method,
					redacted, i, h->name ? h->name : "no name");
	}
	switch (o->auth.kind) {
	case HTTP_AUTH_NONE:
		break;
	case HTTP_AUTH_BASIC:
		if (!o->auth.user || strchr(o->auth.user, ':') || has_crlf(o->auth.user) ||
		    has_crlf(o->auth.password))
			return kpl_errf(err, KPL_EINVAL, "%s %s: bad basic auth user or password",
					method, redacted);
		break;
	case HTTP_AUTH_BEARER:
		if (!o->auth.token || !*o->auth.token || has_crlf(o->auth.token))
			return kpl_errf(err, KPL_EINVAL, "%s %s: bad bearer token", method, redacted);
		break;
	default:
		return kpl_errf(err, KPL_EINVAL, "%s %s: unknown auth kind %d", method, redacted,
				(int)o->auth.kind);
	}
	return 0;
}

static CURLcode set_blob(CURL *e, CURLoption opt, const char *pem)
{
	struct curl_blob b = { (void *)pem, strlen(pem), CURL_BLOB_COPY };

	return curl_easy_setopt(e, opt, &b);
}

/* Sets every option that stays the same across attempts. */
static int easy_setup(struct http_request *req, const struct http_request_options *o,
		      const char *user_agent, struct kpl_err *err)
{
	CURL *e = req->easy;
	const struct http_tls *t = &o->tls;
	int has_body = o->body != NULL || o->body_len > 0;
	CURLcode rc = CURLE_OK;

#define SET(opt, val) do { if (rc == CURLE_OK) rc = curl_easy_setopt(e, opt, val); } while (0)
	SET(CURLOPT_URL, req->url);
	SET(CURLOPT_PRIVATE, (char *)req);
	SET(CURLOPT_ERRORBUFFER, req->errbuf);
	SET(CURLOPT_NOSIGNAL, 1L);
	SET(CURLOPT_PROTOCOLS_STR, "http,https");
	SET(CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
	SET(CURLOPT_USERAGENT, user_agent);
	SET(CURLOPT_WRITEFUNCTION, on_write);
	SET(CURLOPT_WRITEDATA, req);
	SET(CURLOPT_HEADERFUNCTION, on_header);
	SET(CURLOPT_HEADERDATA, req);
	SET(CURLOPT_PREREQFUNCTION, on_prereq);
	SET(CURLOPT_PREREQDATA, req);
	SET(CURLOPT_SUPPRESS_CONNECT_HEADERS, 1L);
	SET(CURLOPT_TCP_KEEPALIVE, 1L);
	SET(CURLOPT_TCP_KEEPIDLE, 30L);
	SET(CURLOPT_TCP_KEEPINTVL, 10L);
	/* No CURLOPT_PROXY: libcurl takes http_proxy, https_proxy and
	 * no_proxy from the environment. */

	/* libcurl re-sends a request, any method, on its own when a reused
	 * connection dies before any response byte (a stale keep-alive). For
	 * a request that is not safe to repeat, a new connection each time
	 * is the only way to rule that out. */
	if (!req->idempotent)
		SET(CURLOPT_FRESH_CONNECT, 1L);

	if (strcmp(req->method, "HEAD") == 0) {
		SET(CURLOPT_NOBODY, 1L);
	} else if (strcmp(req->method, "GET") == 0 && !has_body) {
		SET(CURLOPT_HTTPGET, 1L);
	} else if (has_body || strcmp(req->method, "POST") == 0 ||
		   strcmp(req->method, "PUT") == 0 || strcmp(req->method, "PATCH") == 0) {
		/* POSTFIELDS sends the body with a Content-Length (0 for an
		 * empty one); the method name comes from CUSTOMREQUEST. */
		SET(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)o->body_len);
		SET(CURLOPT_POSTFIELDS, req->body ? req->body : "");
		if (strcmp(req->method, "POST") != 0)
			SET(CURLOPT_CUSTOMREQUEST, req->method);
	} else {
		SET(CURLOPT_CUSTOMREQUEST, req->method);
	}

	for (size_t i = 0; i < o->n_headers; i++) {
		char *line = kpl_asprintf("%s: %s", o->headers[i].name, o->headers[i].value);
		req->headers = curl_slist_append(req->headers, line);
		free(line);
	}
	req->headers = curl_slist_append(req->headers, "Expect:");
	SET(CURLOPT_HTTPHEADER, req->headers);

	switch (o->auth.kind) {
	case HTTP_AUTH_BASIC:
		SET(CURLOPT_HTTPAUTH, (long)CURLAUTH_BASIC);
		SET(CURLOPT_USERNAME, o->auth.user);
		SET(CURLOPT_PASSWORD, o->auth.password ? o->auth.password : "");
		break;
	case HTTP_AUTH_BEARER:
		SET(CURLOPT_HTTPAUTH, (long)CURLAUTH_BEARER);
		SET(CURLOPT_XOAUTH2_BEARER, o->auth.token);
		break;
	default:
		break;
	}

	if (o->follow_redirects) {
		SET(CURLOPT_FOLLOWLOCATION, 1L);
		SET(CURLOPT_MAXREDIRS, (long)(o->max_redirects > 0 ? o->max_redirects
								 : HTTP_DEFAULT_MAX_REDIRECTS));
		/* Credentials stay with the first host (the default; said out
		 * loud because the OCI spec requires it). */
		SET(CURLOPT_UNRESTRICTED_AUTH, 0L);
	}

	if (t->ca_data) {
		if (rc == CURLE_OK)
			rc = set_blob(e, CURLOPT_CAINFO_BLOB, t->ca_data);
	} else if (t->ca_file) {
		SET(CURLOPT_CAINFO, t->ca_file);
	}
	if (t->client_cert_data) {
		if (rc == CURLE_OK)
			rc = set_blob(e, CURLOPT_SSLCERT_BLOB, t->client_cert_data);
		SET(CURLOPT_SSLCERTTYPE, "PEM");
	} else if (t->client_cert) {
		SET(CURLOPT_SSLCERT, t->client_cert);
		SET(CURLOPT_SSLCERTTYPE, "PEM");
	}
	if (t->client_key_data) {
		if (rc == CURLE_OK)
			rc = set_blob(e, CURLOPT_SSLKEY_BLOB, t->client_key_data);
		SET(CURLOPT_SSLKEYTYPE, "PEM");
	} else if (t->client_key) {
		SET(CURLOPT_SSLKEY, t->client_key);
		SET(CURLOPT_SSLKEYTYPE, "PEM");
	}
	if (t->insecure) {
		kpl_warn(SUBSYS, "%s %s: TLS verification is off", req->method, req->redacted);
		SET(CURLOPT_SSL_VERIFYPEER, 0L);
		SET(CURLOPT_SSL_VERIFYHOST, 0L);
	}

	if (req->max_body)
		SET(CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)req->max_body);
#undef SET
	if (rc != CURLE_OK)
		return kpl_errf(err, KPL_EINVAL, "%s %s: %s", req->method, req->redacted,
				curl_easy_strerror(rc));
	return 0;
}

static void req_free_unstarted(struct http_request *req)
{
	if (req->easy)
		curl_easy_cleanup(req->easy);
	curl_slist_free_all(req->headers);
	free(req->method);
	free(req->url);
	free(req->redacted);
	free(req->body);
	free(req);
}

int http_request_start(struct http_client *c, const struct http_request_options *o,
		       struct http_request **out, struct kpl_err *err)
{
	struct http_request *req;
	const char *method = o->method ? o->method : "GET";
	int r;

	req = kpl_calloc(1, sizeof *req);
	req->c = c;
	req->method = kpl_strdup(method);
	req->redacted = o->log_url ? kpl_strdup(o->log_url) : http_redact_url(o->url);
	if ((r = validate(o, method, req->redacted, err)))
		goto fail;
	if (c->closing) {
		r = kpl_errf(err, KPL_ESTATE, "%s %s: the http client is closing", method,
			     req->redacted);
		goto fail;
	}
	req->url = kpl_strdup(o->url);
	if (o->body || o->body_len) {
		req->body = kpl_malloc(o->body_len + 1);
		if (o->body_len)
			memcpy(req->body, o->body, o->body_len);
	}
	req->timeout_ms = o->timeout_ms ? o->timeout_ms : HTTP_DEFAULT_TIMEOUT_MS;
	req->connect_timeout_ms = o->connect_timeout_ms > 0 ? o->connect_timeout_ms
							    : HTTP_DEFAULT_CONNECT_TIMEOUT_MS;
	req->idempotent = o->idempotent == HTTP_IDEMPOTENT_YES ||
			  (o->idempotent == HTTP_IDEMPOTENT_DEFAULT && default_idempotent(method));
	req->retry = o->retry;
	policy_defaults(&req->retry);
	req->streaming = o->on_data || o->on_line;
	req->max_body = o->max_body ? o->max_body : req->streaming ? 0 : HTTP_DEFAULT_MAX_BODY;
	req->on_data = o->on_data;
	req->on_line = o->on_line;
	if (o->on_line)
		http_lines_init(&req->lines, o->max_line, req_on_line, req, o->data);
	req->on_done = o->on_done;
	req->data = o->data;
	req->easy = curl_easy_init();
	if (!req->easy) {
		r = kpl_errf(err, KPL_EINTERNAL, "%s %s: curl_easy_init failed", method,
			     req->redacted);
		goto fail;
	}
	if ((r = easy_setup(req, o, c->user_agent, err)))
		goto fail;

	uv_timer_init(c->loop, &req->timer);
	req->timer.data = req;
	c->open_handles++;
	if (req->timeout_ms > 0)
		req->deadline = (int64_t)uv_now(c->loop) + req->timeout_ms;
	req->state = REQ_QUEUED;
	req->prev = c->tail;
	if (c->tail)
		c->tail->next = req;
	else
		c->head = req;
	c->tail = req;
	c->n_reqs++;
	defer_arm(c);
	if (out)
		*out = req;
	return 0;
fail:
	http_lines_release(&req->lines);
	req_free_unstarted(req);
	return r;
}

void http_request_cancel(struct http_request *req)
{
	if (req->state == REQ_DONE || req->cancelled)
		return;
	req->cancelled = 1;
	defer_arm(req->c);
}

/* ------------------------------------------------------------------ */
/* Responses                                                           */
/* ------------------------------------------------------------------ */

const char *http_response_header(const struct http_response *resp, const char *name)
{
	return hdr_find(resp->req, name);
}

size_t http_response_header_count(const struct http_response *resp)
{
	return resp->req->n_hdrs;
}

void http_response_header_at(const struct http_response *resp, size_t i,
			     const char **name, const char **value)
{
	if (i >= resp->req->n_hdrs)
		BUG("http: header %zu of %zu", i, resp->req->n_hdrs);
	*name = resp->req->hdrs[i].name;
	*value = resp->req->hdrs[i].value;
}

char *http_response_take_body(struct http_response *resp, size_t *len)
{
	struct http_request *req = resp->req;
	char *b = req->buf ? req->buf : kpl_strdup("");

	*len = req->len;
	req->buf = NULL;
	req->len = req->cap = 0;
	resp->body = "";
	resp->body_len = 0;
	return b;
}
