/*
 * http.h - kpl's asynchronous HTTP client: libcurl's multi interface driven
 * by a libuv loop.
 *
 * One struct http_client per loop. It owns a CURLM whose sockets are watched
 * by one uv_poll_t each and whose timeout is one uv_timer_t (curl's
 * multi-uv.c pattern); there is no polling thread and no blocking call on the
 * loop. Name resolution does not block either: Debian's libcurl uses its
 * threaded resolver (http_client_new logs a warning if the libcurl it runs
 * with lacks CURL_VERSION_ASYNCHDNS).
 *
 * The stage clients (jenkins, registry, kube, prom) keep their protocol logic
 * free of I/O (style.md practice 2) and use this layer only to move bytes:
 * describe a request with struct http_request_options, get one on_done with a
 * struct http_response.
 *
 * What the layer does for every request:
 *   - per-request total deadline and connect timeout;
 *   - retries with exponential backoff and jitter (see "Retries" below);
 *   - TLS with a CA bundle (file or PEM in memory), client certificates
 *     (mTLS), or verification off (insecure; tests only);
 *   - basic or bearer auth, sent preemptively, and never to another host,
 *     port or scheme when a redirect is followed (libcurl >= 7.83 strips it,
 *     for both its own auth and an Authorization header in headers[]);
 *   - redirects followed only when asked (Jenkins needs the Location header);
 *   - a bound on the response body (KPL_ETOOBIG names the URL);
 *   - buffered bodies, or streaming ones: raw bytes (on_data) or whole lines
 *     (on_line, split on '\n' with a maximum length);
 *   - proxies from the environment, as libcurl reads them: http_proxy (lower
 *     case only), https_proxy/HTTPS_PROXY, no_proxy/NO_PROXY. The layer never
 *     sets CURLOPT_PROXY, so that stays true;
 *   - error messages that name the method and the URL with secrets masked
 *     (http_redact_url). CURLOPT_VERBOSE is never set: it would print
 *     Authorization headers.
 *
 * Threads: everything here is loop-thread only (the loop given to
 * http_client_new), except the pure helpers at the end, which any thread may
 * call.
 *
 * Callbacks: on_done, on_data and on_line run on the loop. None of them is
 * ever called from inside an http_* call: http_request_start and
 * http_request_cancel only schedule work, so a caller never sees a callback
 * before the call that caused it returns. From any callback it is fine to
 * start requests, cancel requests (including the current one) and close the
 * client.
 */
#ifndef KPL_HTTP_H
#define KPL_HTTP_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "base/kpl.h"

struct http_client;   /* opaque; one per loop */
struct http_request;  /* opaque; one per request, across its retries */

/* --- Defaults (a 0 in an option means "use the default") --- */
#define HTTP_DEFAULT_TIMEOUT_MS 60000
#define HTTP_DEFAULT_CONNECT_TIMEOUT_MS 10000
#define HTTP_DEFAULT_MAX_BODY (16u * 1024 * 1024)
#define HTTP_DEFAULT_MAX_LINE (1024u * 1024)
#define HTTP_DEFAULT_MAX_ATTEMPTS 3
#define HTTP_DEFAULT_BASE_BACKOFF_MS 200
#define HTTP_DEFAULT_MAX_BACKOFF_MS 5000
#define HTTP_DEFAULT_MAX_RETRY_AFTER_MS 30000
#define HTTP_DEFAULT_MAX_REDIRECTS 5
/* A non-2xx body in streaming mode is kept (for the error message a caller
 * builds) up to this size; the rest is dropped. */
#define HTTP_MAX_ERROR_BODY (64u * 1024)
/* timeout_ms for a request without a deadline (a Kubernetes watch). TCP
 * keepalive still notices a peer that went away. */
#define HTTP_TIMEOUT_NONE (-1)

/* --- The client --- */

struct http_client_options {
	/* User-Agent header; NULL: "kpld". Copied. */
	const char *user_agent;
	/* At most this many connections to one host (CURLMOPT_MAX_HOST_
	 * CONNECTIONS); 0: no limit. More requests wait in libcurl's queue
	 * (their deadline runs while they wait). */
	long max_host_connections;
};

/*
 * Creates a client whose transfers run on loop. opts may be NULL. Calls
 * curl_global_init the first time (not thread-safe: create the first client
 * before starting other threads that use libcurl). On success *out is the
 * caller's until http_client_close completes. Returns 0, or KPL_EINTERNAL if
 * libcurl or libuv refuse (err says which).
 */
int http_client_new(uv_loop_t *loop, const struct http_client_options *opts,
		    struct http_client **out, struct kpl_err *err);

/*
 * Closes the client: every request not yet done is cancelled (its on_done
 * runs with KPL_ECANCELLED), libcurl's connections are closed, and once every
 * uv handle the client opened has been closed, done_cb(data) runs on the loop
 * and the client is freed; c must not be used after this call (other than by
 * callbacks of its requests, which may still run before done_cb). done_cb may
 * be NULL. Calling it twice is a BUG().
 */
typedef void (*http_close_cb)(void *data);
void http_client_close(struct http_client *c, http_close_cb done_cb, void *data);

/* Number of requests started and not yet done (on_done not yet returned). */
size_t http_client_active(const struct http_client *c);

/* --- Requests --- */

struct http_header {
	const char *name;  /* "Content-Type"; no ':', CR or LF */
	const char *value; /* no CR or LF */
};

enum http_auth_kind {
	HTTP_AUTH_NONE = 0,
	HTTP_AUTH_BASIC,  /* Authorization: Basic base64(user ":" password) */
	HTTP_AUTH_BEARER, /* Authorization: Bearer token */
};

struct http_auth {
	enum http_auth_kind kind;
	const char *user;     /* basic */
	const char *password; /* basic */
	const char *token;    /* bearer */
};

struct http_tls {
	/* CA bundle (PEM file) to verify the server against; NULL: the
	 * system's. */
	const char *ca_file;
	/* The same as PEM text in memory (kubeconfig's certificate-authority-
	 * data, decoded); used instead of ca_file when set. */
	const char *ca_data;
	/* Client certificate and key for mTLS, PEM files ... */
	const char *client_cert;
	const char *client_key;
	/* ... or PEM text in memory (used instead of the files when set). */
	const char *client_cert_data;
	const char *client_key_data;
	/* Skip verification of the server's certificate and name. For tests
	 * and explicitly configured endpoints only; logged at warn level. */
	int insecure;
};

/*
 * Retries. An attempt is retried (up to max_attempts in all) when:
 *   - nothing was sent (the connection or TLS handshake failed: CURLE_
 *     COULDNT_CONNECT, or a connect-phase timeout). This is safe for any
 *     method, since the server saw no request;
 *   - the request is idempotent and the connection broke (reset, empty
 *     reply, a reply cut short) with nothing delivered to the caller;
 *   - the request is idempotent and the reply is 502, 503 or 504;
 *   - the reply is 429 (any method: the server refused to take the request
 *     on, so nothing was done).
 *     On those replies a Retry-After header (seconds or an HTTP date) is
 *     honoured, capped at max_retry_after_ms, in place of the backoff.
 * A request that is not idempotent always gets a new connection: libcurl
 * itself re-sends a request on a reused keep-alive connection that died
 * before any response byte, and that must not happen to a POST.
 * Never after streaming data was delivered to on_data/on_line: the caller
 * resumes instead (Jenkins progressive log by offset, a Kubernetes watch by
 * resourceVersion), since only it knows where. Never past the deadline: a
 * retry whose delay would end after it is not made, and the last attempt's
 * result is what on_done gets.
 * NEEDSWORK: with TLS 1.3 a server that refuses the client certificate
 * says so in an alert that arrives after the client's side of the handshake,
 * racing the request. libcurl then reports a send or read error on a sent
 * request, so an idempotent one is retried (uselessly), and the message may
 * be the alert ("tlsv13 alert certificate required") or just "Broken pipe".
 * Backoff before attempt n+1 is d = min(max_backoff, base * 2^(n-1)), then
 * "equal jitter": a uniform pick in [d/2, d].
 */
struct http_retry_policy {
	int max_attempts;       /* 0: HTTP_DEFAULT_MAX_ATTEMPTS; 1: no retry */
	int base_backoff_ms;    /* 0: HTTP_DEFAULT_BASE_BACKOFF_MS */
	int max_backoff_ms;     /* 0: HTTP_DEFAULT_MAX_BACKOFF_MS */
	int max_retry_after_ms; /* 0: HTTP_DEFAULT_MAX_RETRY_AFTER_MS */
};

enum http_idempotent {
	HTTP_IDEMPOTENT_DEFAULT = 0, /* by method: GET HEAD PUT DELETE OPTIONS
					yes; POST, PATCH and others no */
	HTTP_IDEMPOTENT_YES,         /* the caller knows a POST is safe to
					repeat (e.g. it carries its own
					idempotency key) */
	HTTP_IDEMPOTENT_NO,
};

struct http_response;

/* Streaming callbacks. Return 0 to go on, or a negative KPL_E* code to stop
 * the request: on_done then gets that code. Called only for a 2xx response
 * (a non-2xx body is buffered into resp->body, up to HTTP_MAX_ERROR_BODY). */
typedef int (*http_data_cb)(struct http_request *req, const char *p, size_t n,
			    void *data);
/* line is one line without its '\n' (and without a '\r' right before it),
 * NUL-terminated, borrowed for the call. The last line of the body is
 * delivered even without a final '\n'. */
typedef int (*http_line_cb)(struct http_request *req, const char *line,
			    size_t n, void *data);

/*
 * The request's end. status is 0 when a response arrived, whatever its HTTP
 * code (resp->status: 404 and 500 are for the protocol layer to judge; a
 * 502/503/504 that retries did not cure arrives here too), or a negative
 * KPL_E* code:
 *   KPL_ECANCELLED   http_request_cancel or http_client_close
 *   KPL_ETIMEOUT     the deadline or the connect timeout passed
 *   KPL_ETOOBIG      the body passed max_body, or a line max_line
 *   KPL_EUNAVAILABLE could not connect, TLS failed, the connection broke
 *   KPL_EINVAL       libcurl refused the URL or an option
 *   KPL_EINTERNAL    anything else from libcurl
 *   or the code an on_data/on_line callback returned.
 * resp and everything it points to is borrowed until on_done returns (except
 * a body taken with http_response_take_body); so is the request.
 */
typedef void (*http_done_cb)(struct http_response *resp, int status, void *data);

struct http_request_options {
	const char *method; /* NULL: "GET" */
	const char *url;    /* http:// or https:// only */
	const struct http_header *headers;
	size_t n_headers;
	/* Request body, copied. Sent with every method that has one (curl
	 * POSTFIELDS with the method as a custom request). No Expect:
	 * 100-continue. */
	const void *body;
	size_t body_len;

	/* Deadline for the whole request, retries and backoff included. 0:
	 * HTTP_DEFAULT_TIMEOUT_MS; HTTP_TIMEOUT_NONE: none. */
	int64_t timeout_ms;
	/* Per attempt, until the connection (and TLS) is up. 0: default. */
	int64_t connect_timeout_ms;

	enum http_idempotent idempotent;
	struct http_retry_policy retry;
	struct http_auth auth;
	struct http_tls tls;

	/* Follow 3xx Location (off by default). Auth is never sent to
	 * another host, port or scheme. */
	int follow_redirects;
	int max_redirects; /* 0: HTTP_DEFAULT_MAX_REDIRECTS */

	/* Bound on the body: buffered mode 0 means HTTP_DEFAULT_MAX_BODY;
	 * streaming mode 0 means no bound (a watch runs for hours). */
	size_t max_body;

	/* Response mode: buffered (both NULL; resp->body holds the body),
	 * raw streaming (on_data) or line streaming (on_line). Not both. */
	http_data_cb on_data;
	http_line_cb on_line;
	size_t max_line; /* 0: HTTP_DEFAULT_MAX_LINE; longer is KPL_ETOOBIG */

	/* What log lines and error messages show in place of the URL; NULL:
	 * http_redact_url(url). For URLs whose secret no redaction finds, such
	 * as a chat webhook's (Slack's is in the path): "notifier team-chat". */
	const char *log_url;

	http_done_cb on_done; /* required */
	void *data;           /* passed to every callback */
};

/*
 * Starts a request. Everything opts points to is copied: the caller may free
 * it once this returns. The request begins on a later loop iteration (never
 * inside this call). On success on_done will run exactly once, and *out (if
 * out is not NULL) is a handle valid until on_done returns: use it only to
 * cancel. On failure (KPL_EINVAL: no URL, not http(s), bad header, both
 * on_data and on_line, no on_done; KPL_ESTATE: the client is closing) err
 * says why, on_done never runs and *out is untouched.
 */
int http_request_start(struct http_client *c, const struct http_request_options *opts,
		       struct http_request **out, struct kpl_err *err);

/*
 * Cancels a request not yet done: no on_data/on_line after this call, and
 * on_done runs once, later on the loop, with KPL_ECANCELLED (even if the
 * transfer happened to finish in between). Calling it again, or from the
 * request's own callbacks, is fine; calling it after on_done has returned is
 * a use after free.
 */
void http_request_cancel(struct http_request *req);

/* --- The response, as on_done sees it (borrowed, see http_done_cb) --- */

struct http_response {
	struct http_request *req;
	/* HTTP status of the last response (after redirects), 0 if none. */
	long status;
	/* Buffered mode: the body; streaming mode: a non-2xx body (at most
	 * HTTP_MAX_ERROR_BODY). NUL-terminated, never NULL ("" if none). */
	const char *body;
	size_t body_len;
	/* The URL of the last response (after redirects), as given: NOT
	 * redacted. Run it through http_redact_url before logging it. */
	const char *effective_url;
	/* Attempts made (1 if there was no retry). */
	int attempts;
	/* err.code == on_done's status; when nonzero, err.msg is for a person:
	 * "GET https://ci/job/x/api/json?token=***: ..." (method and redacted
	 * URL first). */
	struct kpl_err err;
};

/* The value of the first response header named name (case-insensitive),
 * without surrounding blanks; NULL if absent. Borrowed like resp. Only the
 * last response's headers are kept (not a redirect's or a 100 Continue's). */
const char *http_response_header(const struct http_response *resp, const char *name);
/* All headers in arrival order (for repeated ones, e.g. Set-Cookie). */
size_t http_response_header_count(const struct http_response *resp);
void http_response_header_at(const struct http_response *resp, size_t i,
			     const char **name, const char **value);
/* Takes the body out of resp: returns a malloc'd, NUL-terminated buffer the
 * caller frees, *len its length; resp->body becomes "". Avoids a copy of a
 * large body. */
char *http_response_take_body(struct http_response *resp, size_t *len);

/* --- Pure helpers: no I/O, any thread. Exposed for the stage clients and
 * for tests. --- */

/*
 * A copy of url fit for logs: the userinfo ("user:pass@") becomes "***@",
 * and the value of every query parameter whose name (case-insensitive) is one
 * of token, key, access_token, sig, signature, password, secret,
 * client_secret, api_key, apikey, x-amz-signature, x-amz-credential,
 * x-amz-security-token, x-goog-signature, x-goog-credential becomes "***".
 * Everything else is kept as is. Returns a malloc'd string the caller frees;
 * NULL gives "".
 * NEEDSWORK: secrets in the path (Slack's hooks.slack.com/services/T/B/X)
 * are not masked; their clients must not log the URL at all.
 */
char *http_redact_url(const char *url);

/* Backoff before attempt `attempt`+1, after `attempt` (>= 1) failed ones,
 * with rnd a random 64-bit value (the jitter). Defaults applied to p. */
int64_t http_backoff_ms(const struct http_retry_policy *p, int attempt, uint64_t rnd);

/* A Retry-After value in milliseconds from now_ms (unix ms): delta-seconds
 * or an HTTP date (a past date gives 0). -1 if it is neither. */
int64_t http_parse_retry_after(const char *value, int64_t now_ms);

/* What happened in one attempt, for the retry decision. */
struct http_attempt {
	int curl_code;    /* CURLcode of the transfer */
	long status;      /* HTTP status, 0 if none */
	int sent;         /* the request went out (connection and TLS up) */
	int got_response; /* at least one byte of a response arrived */
	int delivered;    /* streaming data went to on_data/on_line */
};
/* 1 if the attempt is worth another one under the rules in "Retries"
 * (attempt counts, deadline and Retry-After are the caller's business). */
int http_should_retry(const struct http_attempt *a, int idempotent);

/*
 * Splits a byte stream into lines (what on_line uses; usable on its own,
 * e.g. for a Jenkins progressive log). Lines are delivered without the '\n'
 * and a '\r' right before it, NUL-terminated, borrowed for the call.
 */
struct http_lines {
	size_t max_line;
	http_line_cb on_line;
	struct http_request *req; /* passed to on_line; may be NULL */
	void *data;
	char *buf; /* the partial line so far */
	size_t len, cap;
};
/* max_line 0: HTTP_DEFAULT_MAX_LINE. */
void http_lines_init(struct http_lines *ls, size_t max_line, http_line_cb on_line,
		     struct http_request *req, void *data);
/* Feeds bytes; returns 0, KPL_ETOOBIG if a line is longer than max_line
 * bytes (counting a '\r' before its '\n'; nothing of it is delivered), or the first nonzero on_line return. After a
 * nonzero return, feed no more. */
int http_lines_feed(struct http_lines *ls, const char *p, size_t n);
/* The end of the stream: delivers a last line that had no '\n'. */
int http_lines_finish(struct http_lines *ls);
/* Frees the buffer; ls may be initialized again. */
void http_lines_release(struct http_lines *ls);

#endif
