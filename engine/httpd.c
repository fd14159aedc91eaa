/*
 * httpd.c - HTTP/1.1 on the loop: a listener, connections parsed with
 * http_parser, a route table, responses with Content-Length.
 *
 * A connection reads until http_parser completes a message, then pauses the
 * parser, stops reading and hands the request to its route's handler. Bytes
 * that came after the message (pipelining) are kept and parsed once the
 * response is written. A connection is freed only when both of its handles
 * (the socket and the timer) have closed.
 */
#include "engine/httpd.h"

#include <http_parser.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "engine/tlsio.h"

#define LOG "httpd"

#define DEFAULT_MAX_HEADER (16 * 1024)
#define DEFAULT_MAX_BODY (1024 * 1024)
#define DEFAULT_MAX_CONNS 256
#define DEFAULT_READ_TIMEOUT_MS 10000
#define DEFAULT_MAX_PER_ADDRESS 16
#define DEFAULT_REQUEST_TIMEOUT_MS 30000
#define MAX_HEADERS 100
#define DRAIN_TIMEOUT_MS 2000

struct conn;

struct httpd_req {
	struct conn *conn; /* NULL once the connection is gone */
	char *method;
	char *url;
	char *path;
	char *query; /* NULL: none */
	char **hname, **hvalue;
	size_t nh;
	char *body;
	size_t body_len, body_cap;
	bool keep_alive;
	bool head;   /* HEAD on a GET route: answered as GET, without the body */
	char peer[64];
	/* httpd_stream_begin: the client went away (called once). */
	void (*on_gone)(struct httpd_req *req, void *data);
	void *gone_data;
};

struct conn {
	uv_tcp_t tcp;
	uv_timer_t timer;
	struct httpd *h;
	struct conn *prev, *next;
	http_parser parser;
	struct httpd_req *req; /* being read, or held by a handler (busy) */
	bool busy;
	bool closing;
	bool close_after_write;
	bool draining;   /* refused: reading and dropping until EOF, then close */
	int open_handles;
	size_t header_bytes;
	bool in_value;   /* the last header callback was a value */
	int err_status;  /* set by a callback that refused the request */
	uint64_t deadline; /* loop time the request being read must be whole by; 0: none */
	char *pending;   /* bytes after the message a handler holds */
	size_t pending_len;
	char peer[64];
	bool streaming;  /* httpd_stream_begin: the response has no length */
	bool stream_ended; /* httpd_stream_end: close once the writes are out */
	size_t writes_out; /* stream writes not yet completed */
	struct write_req *failed; /* stream writes uv_write refused */
	struct tlsio *tls; /* NULL: plaintext */
};

struct httpd {
	uv_loop_t *loop;
	uv_tcp_t server;
	bool server_open;
	struct httpd_options opt;
	struct conn *conns;
	size_t n_conns;
	int port;
	struct tlsio_ctx *tls; /* NULL: plaintext */
	bool stopping;
	void (*done)(void *);
	void *done_data;
};

struct write_req {
	uv_write_t w;
	struct conn *conn;
	char *buf;
	bool stream; /* a stream write: done (if any) is told, nothing else */
	bool raw;    /* TLS handshake bytes: nothing to tell */
	struct write_req *next_failed; /* conn.failed */
	void (*done)(void *data, int status);
	void *data;
};

static const http_parser_settings parser_settings;
static void conn_close(struct conn *c);
static void arm_timer(struct conn *c);
static void conn_feed(struct conn *c, const char *data, size_t len);
static void on_alloc(uv_handle_t *hd, size_t suggested, uv_buf_t *buf);
static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);

/* ---------------------------------------------------------------------- */
/* Requests */

static void req_free(struct httpd_req *r)
{
	if (!r)
		return;
	free(r->method);
	free(r->url);
	free(r->path);
	free(r->query);
	for (size_t i = 0; i < r->nh; i++) {
		free(r->hname[i]);
		free(r->hvalue[i]);
	}
	free(r->hname);
	free(r->hvalue);
	free(r->body);
	free(r);
}

static void append(char **dst, const char *at, size_t len)
{
	size_t n = *dst ? strlen(*dst) : 0;

	*dst = kpl_realloc(*dst, n + len + 1);
	memcpy(*dst + n, at, len);
	(*dst)[n + len] = '\0';
}

const char *httpd_req_method(struct httpd_req *req) { return req->method; }
const char *httpd_req_path(struct httpd_req *req) { return req->path; }
const char *httpd_req_peer(struct httpd_req *req) { return req->peer; }

const char *httpd_req_header(struct httpd_req *req, const char *name)
{
	for (size_t i = 0; i < req->nh; i++)
		if (strcasecmp(req->hname[i], name) == 0)
			return req->hvalue[i] ? req->hvalue[i] : "";
	return NULL;
}

const char *httpd_req_body(struct httpd_req *req, size_t *len)
{
	*len = req->body_len;
	return req->body ? req->body : "";
}

/* ---------------------------------------------------------------------- */
/* Parser callbacks (return non-zero to refuse, with c->err_status set) */

/* -1: an error for every callback (for on_headers_complete, 1 would mean
 * "no body" and 2 "upgrade"). */
static int refuse(struct conn *c, int status)
{
	c->err_status = status;
	return -1;
}

static int count_header(struct conn *c, size_t len)
{
	c->header_bytes += len;
	return c->header_bytes > c->h->opt.max_header_bytes;
}

static int on_message_begin(http_parser *p)
{
	struct conn *c = p->data;

	req_free(c->req);
	c->req = kpl_calloc(1, sizeof *c->req);
	memcpy(c->req->peer, c->peer, sizeof c->peer);
	c->header_bytes = 0;
	c->in_value = false;
	/* From its first byte, the whole request gets request_timeout_ms,
	 * however its bytes trickle in. */
	c->deadline = uv_now(c->h->loop) + c->h->opt.request_timeout_ms;
	arm_timer(c);
	return 0;
}

static int on_url(http_parser *p, const char *at, size_t len)
{
	struct conn *c = p->data;

	if (count_header(c, len))
		return refuse(c, 414);
	append(&c->req->url, at, len);
	return 0;
}

static int on_header_field(http_parser *p, const char *at, size_t len)
{
	struct conn *c = p->data;
	struct httpd_req *r = c->req;

	if (count_header(c, len))
		return refuse(c, 431);
	if (c->in_value || r->nh == 0) {
		if (r->nh == MAX_HEADERS)
			return refuse(c, 431);
		r->hname = kpl_realloc(r->hname, (r->nh + 1) * sizeof *r->hname);
		r->hvalue = kpl_realloc(r->hvalue, (r->nh + 1) * sizeof *r->hvalue);
		r->hname[r->nh] = NULL;
		r->hvalue[r->nh] = NULL;
		r->nh++;
		c->in_value = false;
	}
	append(&r->hname[r->nh - 1], at, len);
	return 0;
}

static int on_header_value(http_parser *p, const char *at, size_t len)
{
	struct conn *c = p->data;
	struct httpd_req *r = c->req;

	if (count_header(c, len))
		return refuse(c, 431);
	if (r->nh == 0)
		return refuse(c, 400);
	c->in_value = true;
	append(&r->hvalue[r->nh - 1], at, len);
	return 0;
}

static int on_headers_complete(http_parser *p)
{
	struct conn *c = p->data;
	struct http_parser_url u;
	struct httpd_req *r = c->req;

	if (!r->url)
		return refuse(c, 400);
	/* The body limit is checked before any of it is read when the length
	 * is declared (and again as it arrives, for chunked bodies). */
	if ((p->flags & F_CONTENTLENGTH) && p->content_length != ULLONG_MAX &&
	    p->content_length > c->h->opt.max_body_bytes)
		return refuse(c, 413);
	r->method = kpl_strdup(http_method_str((enum http_method)p->method));
	http_parser_url_init(&u);
	if (r->url[0] == '*' || http_parser_parse_url(r->url, strlen(r->url), 0, &u))
		return refuse(c, 400);
	if (u.field_set & (1 << UF_PATH))
		r->path = kpl_strndup(r->url + u.field_data[UF_PATH].off,
				      u.field_data[UF_PATH].len);
	else
		r->path = kpl_strdup("/");
	if (u.field_set & (1 << UF_QUERY))
		r->query = kpl_strndup(r->url + u.field_data[UF_QUERY].off,
				       u.field_data[UF_QUERY].len);
	return 0;
}

static int on_body(http_parser *p, const char *at, size_t len)
{
	struct conn *c = p->data;
	struct httpd_req *r = c->req;

	if (r->body_len + len > c->h->opt.max_body_bytes)
		return refuse(c, 413);
	if (r->body_len + len + 1 > r->body_cap) {
		r->body_cap = (r->body_len + len + 1) * 2;
		if (r->body_cap > c->h->opt.max_body_bytes + 1)
			r->body_cap = c->h->opt.max_body_bytes + 1;
		r->body = kpl_realloc(r->body, r->body_cap);
	}
	memcpy(r->body + r->body_len, at, len);
	r->body_len += len;
	r->body[r->body_len] = '\0';
	return 0;
}

static int on_message_complete(http_parser *p)
{
	struct conn *c = p->data;

	c->req->keep_alive = http_should_keep_alive(p) && !p->upgrade;
	/* Stop here: the handler answers before the next message is read. */
	http_parser_pause(p, 1);
	return 0;
}

static const http_parser_settings parser_settings = {
	.on_message_begin = on_message_begin,
	.on_url = on_url,
	.on_header_field = on_header_field,
	.on_header_value = on_header_value,
	.on_headers_complete = on_headers_complete,
	.on_body = on_body,
	.on_message_complete = on_message_complete,
};

/* ---------------------------------------------------------------------- */
/* Connections */

static void conn_freed(struct conn *c)
{
	struct httpd *h = c->h;

	if (c->prev)
		c->prev->next = c->next;
	else
		h->conns = c->next;
	if (c->next)
		c->next->prev = c->prev;
	h->n_conns--;
	while (c->failed) {
		struct write_req *wr = c->failed;
		c->failed = wr->next_failed;
		c->writes_out--;
		if (wr->done)
			wr->done(wr->data, UV_ECANCELED);
		free(wr);
	}
	if (c->req) {
		if (c->busy) {
			struct httpd_req *r = c->req;
			r->conn = NULL; /* the handler still holds it */
			if (r->on_gone)
				r->on_gone(r, r->gone_data);
		} else {
			req_free(c->req);
		}
	}
	free(c->pending);
	tlsio_free(c->tls);
	free(c);
	if (h->stopping && !h->conns && !h->server_open) {
		void (*done)(void *) = h->done;
		void *data = h->done_data;
		tlsio_ctx_free(h->tls);
		free(h);
		if (done)
			done(data);
	}
}

static void conn_handle_closed(uv_handle_t *hd)
{
	struct conn *c = hd->data;

	if (--c->open_handles == 0)
		conn_freed(c);
}

static void conn_close(struct conn *c)
{
	if (c->closing)
		return;
	c->closing = true;
	uv_read_stop((uv_stream_t *)&c->tcp);
	uv_timer_stop(&c->timer);
	uv_close((uv_handle_t *)&c->tcp, conn_handle_closed);
	uv_close((uv_handle_t *)&c->timer, conn_handle_closed);
}

static void conn_refuse(struct conn *c, int status, const char *why);

static void on_timeout(uv_timer_t *t)
{
	struct conn *c = t->data;

	if (c->deadline && !c->busy && !c->draining && !c->closing &&
	    uv_now(c->h->loop) >= c->deadline) {
		c->deadline = 0;
		conn_refuse(c, 408, "the request took too long");
		return;
	}
	kpl_debug(LOG, "%s: read timeout", c->peer);
	conn_close(c);
}

/* The idle timeout, or the request's deadline if that comes first. */
static void arm_timer(struct conn *c)
{
	uint64_t now = uv_now(c->h->loop), ms = c->h->opt.read_timeout_ms;

	if (c->deadline)
		ms = c->deadline <= now ? 0 : c->deadline - now < ms ? c->deadline - now : ms;
	uv_timer_start(&c->timer, on_timeout, ms, 0);
}

static const char *status_text(int status)
{
	switch (status) {
	case 200: return "OK";
	case 202: return "Accepted";
	case 204: return "No Content";
	case 400: return "Bad Request";
	case 401: return "Unauthorized";
	case 403: return "Forbidden";
	case 404: return "Not Found";
	case 405: return "Method Not Allowed";
	case 408: return "Request Timeout";
	case 409: return "Conflict";
	case 413: return "Payload Too Large";
	case 414: return "URI Too Long";
	case 415: return "Unsupported Media Type";
	case 422: return "Unprocessable Entity";
	case 431: return "Request Header Fields Too Large";
	case 500: return "Internal Server Error";
	case 502: return "Bad Gateway";
	case 503: return "Service Unavailable";
	case 504: return "Gateway Timeout";
	default: return status < 300 ? "OK" : status < 500 ? "Bad Request" : "Error";
	}
}

static void on_shutdown(uv_shutdown_t *sd, int status)
{
	(void)status;
	free(sd);
}

static void on_written(uv_write_t *w, int status)
{
	struct write_req *wr = w->data;
	struct conn *c = wr->conn;
	char *pending;
	size_t n;

	free(wr->buf);
	if (wr->raw) {
		free(wr);
		if (status < 0 && !c->closing)
			conn_close(c);
		return;
	}
	if (wr->stream) {
		void (*done)(void *, int) = wr->done;
		void *data = wr->data;

		free(wr);
		c->writes_out--;
		if (!c->closing && (status < 0 || (c->stream_ended && !c->writes_out)))
			conn_close(c);
		if (done)
			done(data, status);
		return;
	}
	free(wr);
	if (c->closing)
		return;
	if (status >= 0 && c->draining && !c->h->stopping) {
		/* A client still sending a refused body would get a reset, and
		 * maybe lose the answer, if the socket closed now: say we are
		 * done writing, and drop what it sends until EOF (or the
		 * timeout). */
		uv_shutdown_t *sd = kpl_calloc(1, sizeof *sd);
		if (uv_shutdown(sd, (uv_stream_t *)&c->tcp, on_shutdown) < 0) {
			free(sd);
			conn_close(c);
			return;
		}
		uv_timer_start(&c->timer, on_timeout, DRAIN_TIMEOUT_MS, 0);
		uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
		return;
	}
	if (status < 0 || c->close_after_write || c->h->stopping) {
		conn_close(c);
		return;
	}
	/* Ready for the next request: first whatever was pipelined. */
	http_parser_pause(&c->parser, 0);
	arm_timer(c);
	pending = c->pending;
	n = c->pending_len;
	c->pending = NULL;
	c->pending_len = 0;
	if (pending)
		conn_feed(c, pending, n);
	free(pending);
	if (!c->closing && !c->busy)
		uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
}

/* Takes buf. A stream write's done is called exactly once (status < 0:
 * not written), from a libuv callback, never from here. */
static void conn_write_ex(struct conn *c, char *buf, size_t len, bool stream,
			  void (*done)(void *data, int status), void *data)
{
	struct write_req *wr = kpl_calloc(1, sizeof *wr);
	uv_buf_t b = uv_buf_init(buf, (unsigned)len);
	int rc;

	if (c->tls) {
		/* Encrypted in write order: the uv_write queue keeps it. */
		rc = tlsio_write(c->tls, buf, len);
		free(buf);
		buf = tlsio_take_out(c->tls, &len);
		if (rc < 0 || !buf) {
			free(buf);
			buf = kpl_strdup("");
			len = 0;
			kpl_debug(LOG, "%s: TLS write failed", c->peer);
		}
		b = uv_buf_init(buf, (unsigned)len);
	}
	wr->conn = c;
	wr->buf = buf;
	wr->w.data = wr;
	wr->stream = stream;
	wr->done = done;
	wr->data = data;
	if (stream)
		c->writes_out++;
	if ((rc = uv_write(&wr->w, (uv_stream_t *)&c->tcp, &b, 1, on_written)) < 0) {
		kpl_debug(LOG, "%s: write: %s", c->peer, uv_strerror(rc));
		if (stream) {
			/* Told when the connection is freed (conn_freed),
			 * as libuv tells the writes it cancels: never from
			 * inside the caller's write. */
			free(buf);
			wr->w.data = NULL;
			wr->buf = NULL;
			wr->done = done;
			wr->data = data;
			wr->next_failed = c->failed;
			c->failed = wr;
			conn_close(c);
			return;
		}
		free(buf);
		free(wr);
		conn_close(c);
	}
}

static void conn_write(struct conn *c, char *buf, size_t len)
{
	conn_write_ex(c, buf, len, false, NULL, NULL);
}

/* On the answers the listener gives itself (refusals, 405), as every
 * route's answer has them: nothing of kpld's is sniffed or cached. */
#define HTTPD_OWN_HEADERS "X-Content-Type-Options: nosniff\r\nCache-Control: no-store\r\n"

static char *format_response(int status, const char *content_type, const char *body,
			     size_t len, bool keep_alive, const char *extra, size_t *out_len)
{
	char head[2560];
	int n;
	char *out;

	if (status == 204 || status == 304)
		n = snprintf(head, sizeof head, "HTTP/1.1 %d %s\r\n%sConnection: %s\r\n\r\n",
			     status, status_text(status), extra ? extra : "",
			     keep_alive ? "keep-alive" : "close");
	else
		n = snprintf(head, sizeof head,
			     "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
			     "%sConnection: %s\r\n\r\n",
			     status, status_text(status), content_type, len, extra ? extra : "",
			     keep_alive ? "keep-alive" : "close");
	if (n < 0 || (size_t)n >= sizeof head)
		BUG("httpd: response head too long");
	if (status == 204 || status == 304)
		len = 0;
	out = kpl_malloc((size_t)n + len);
	memcpy(out, head, (size_t)n);
	if (len)
		memcpy(out + n, body, len);
	*out_len = (size_t)n + len;
	return out;
}

/* Answers a request the parser refused, then closes: the stream cannot be
 * trusted to be at a message boundary any more. */
static void conn_refuse(struct conn *c, int status, const char *why)
{
	size_t len;
	char body[128];
	int n = snprintf(body, sizeof body, "%s\n", why);
	char *buf = format_response(status, "text/plain; charset=utf-8", body, (size_t)n,
				    false, HTTPD_OWN_HEADERS, &len);

	kpl_debug(LOG, "%s: refused with %d: %s", c->peer, status, why);
	c->close_after_write = true;
	c->draining = true;
	uv_read_stop((uv_stream_t *)&c->tcp);
	conn_write(c, buf, len);
}

static void dispatch(struct conn *c)
{
	struct httpd *h = c->h;
	struct httpd_req *r = c->req;
	char allow[128] = "";
	size_t len;

	r->conn = c;
	c->busy = true;
	c->deadline = 0;
	uv_read_stop((uv_stream_t *)&c->tcp);
	uv_timer_stop(&c->timer);
	for (size_t i = 0; i < h->opt.n_routes; i++) {
		const struct httpd_route *rt = &h->opt.routes[i];
		size_t pl = strlen(rt->path);
		if (pl && rt->path[pl - 1] == '*' ? strncmp(rt->path, r->path, pl - 1)
						   : strcmp(rt->path, r->path))
			continue;
		/* Method "*": a route that answers every method itself. */
		if (strcmp(rt->method, r->method) == 0 || strcmp(rt->method, "*") == 0) {
			rt->handler(r, rt->data);
			return;
		}
		/* HEAD is GET without the body (RFC 9110 9.3.2: every server
		 * supports both); the handler sees GET. */
		if (strcmp(r->method, "HEAD") == 0 && strcmp(rt->method, "GET") == 0) {
			free(r->method);
			r->method = kpl_strdup("GET");
			r->head = true;
			rt->handler(r, rt->data);
			return;
		}
		snprintf(allow + strlen(allow), sizeof allow - strlen(allow), "%s%s",
			 allow[0] ? ", " : "", rt->method);
	}
	if (allow[0]) {
		char extra[256];
		char *buf;
		snprintf(extra, sizeof extra, "Allow: %s\r\n" HTTPD_OWN_HEADERS, allow);
		buf = format_response(405, "text/plain; charset=utf-8",
				      "method not allowed\n", 19, r->keep_alive, extra, &len);
		c->busy = false;
		c->req = NULL;
		c->close_after_write = !r->keep_alive;
		req_free(r);
		conn_write(c, buf, len);
		return;
	}
	httpd_respondf(r, 404, "not found");
}

/* Parses data; on a complete message dispatches it and keeps the rest. */
static void conn_feed(struct conn *c, const char *data, size_t len)
{
	size_t n = http_parser_execute(&c->parser, &parser_settings, data, len);
	enum http_errno e = HTTP_PARSER_ERRNO(&c->parser);

	if (e == HPE_PAUSED) {
		if (n < len) {
			c->pending = kpl_malloc(len - n);
			memcpy(c->pending, data + n, len - n);
			c->pending_len = len - n;
		}
		dispatch(c);
		return;
	}
	if (e != HPE_OK) {
		int status = c->err_status ? c->err_status : 400;
		const char *why = status == 413 ? "body too large" :
				  status == 431 ? "headers too large" :
				  status == 414 ? "url too long" : http_errno_description(e);
		conn_refuse(c, status, why);
	}
}

static void on_alloc(uv_handle_t *hd, size_t suggested, uv_buf_t *buf)
{
	(void)hd;
	(void)suggested;
	buf->base = kpl_malloc(16 * 1024);
	buf->len = 16 * 1024;
}

/* Sends what TLS has for the peer (handshake, alerts, tickets). */
static void tls_send_out(struct conn *c)
{
	struct write_req *wr;
	uv_buf_t b;
	size_t len;
	char *buf = tlsio_take_out(c->tls, &len);

	if (!buf)
		return;
	wr = kpl_calloc(1, sizeof *wr);
	wr->conn = c;
	wr->buf = buf;
	wr->raw = true;
	wr->w.data = wr;
	b = uv_buf_init(buf, (unsigned)len);
	if (uv_write(&wr->w, (uv_stream_t *)&c->tcp, &b, 1, on_written) < 0) {
		free(buf);
		free(wr);
		conn_close(c);
	}
}

static void on_read_plain(struct conn *c, ssize_t nread, const uv_buf_t *buf);

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
	struct conn *c = s->data;
	uv_buf_t plain;
	size_t n;
	int rc;

	if (!c->tls || nread <= 0 || c->closing) {
		on_read_plain(c, nread, buf);
		return;
	}
	rc = tlsio_feed(c->tls, buf->base, (size_t)nread, &plain.base, &n);
	free(buf->base);
	tls_send_out(c);
	if (rc < 0) {
		kpl_debug(LOG, "%s: TLS error: closed", c->peer);
		free(plain.base);
		conn_close(c);
		return;
	}
	plain.len = n;
	if (n)
		on_read_plain(c, (ssize_t)n, &plain);
	else
		free(plain.base);
	if (rc == 1 && !c->closing)
		on_read_plain(c, UV_EOF, &(uv_buf_t){ NULL, 0 });
}

static void on_read_plain(struct conn *c, ssize_t nread, const uv_buf_t *buf)
{
	if (nread > 0 && (c->draining || c->streaming)) {
		/* Dropped: see on_written; a stream's client has nothing
		 * more to say (we read only to see it go). */
	} else if (nread > 0 && !c->closing && !c->busy) {
		arm_timer(c);
		conn_feed(c, buf->base, (size_t)nread);
	} else if (nread < 0) {
		if (nread != UV_EOF)
			kpl_debug(LOG, "%s: read: %s", c->peer, uv_strerror((int)nread));
		conn_close(c);
	}
	free(buf->base);
}

void httpd_respond(struct httpd_req *req, int status, const char *content_type,
		   const char *body, size_t len)
{
	httpd_respond_headers(req, status, content_type, HTTPD_OWN_HEADERS, body, len);
}

void httpd_respond_headers(struct httpd_req *req, int status, const char *content_type,
			   const char *extra, const char *body, size_t len)
{
	struct conn *c = req->conn;
	char *buf;
	size_t n;

	if (!c || c->closing) {
		req_free(req);
		return;
	}
	if (c->req != req || !c->busy || c->streaming)
		BUG("httpd_respond: the request is not the connection's");
	c->close_after_write = !req->keep_alive;
	buf = format_response(status, content_type, body, len, req->keep_alive, extra, &n);
	if (req->head && status != 204 && status != 304)
		n -= len; /* Content-Length stays that of the GET */
	c->busy = false;
	c->req = NULL;
	req_free(req);
	conn_write(c, buf, n);
}

void httpd_respondf(struct httpd_req *req, int status, const char *fmt, ...)
{
	char body[1024];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(body, sizeof body - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	if ((size_t)n > sizeof body - 2)
		n = sizeof body - 2;
	body[n++] = '\n';
	httpd_respond(req, status, "text/plain; charset=utf-8", body, (size_t)n);
}

const char *httpd_req_query(struct httpd_req *req)
{
	return req->query ? req->query : "";
}

int httpd_stream_begin(struct httpd_req *req, int status, const char *content_type,
		       const char *headers,
		       void (*on_gone)(struct httpd_req *req, void *data), void *data)
{
	struct conn *c = req->conn;
	char head[2048];
	int n;

	if (!c || c->closing)
		return -1;
	if (c->req != req || !c->busy || c->streaming)
		BUG("httpd_stream_begin: the request is not the connection's");
	n = snprintf(head, sizeof head,
		     "HTTP/1.1 %d %s\r\nContent-Type: %s\r\n%sConnection: close\r\n\r\n",
		     status, status_text(status), content_type, headers ? headers : "");
	if (n < 0 || (size_t)n >= sizeof head)
		BUG("httpd: response head too long");
	c->streaming = true;
	req->on_gone = on_gone;
	req->gone_data = data;
	conn_write_ex(c, kpl_strndup(head, (size_t)n), (size_t)n, true, NULL, NULL);
	if (!c->closing)
		uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
	return c->closing ? -1 : 0;
}

int httpd_stream_write(struct httpd_req *req, const char *buf, size_t len,
		       void (*done)(void *data, int status), void *data)
{
	struct conn *c = req->conn;

	if (!c || c->closing)
		return -1;
	if (!c->streaming || c->stream_ended)
		BUG("httpd_stream_write: not an open stream");
	conn_write_ex(c, kpl_strndup(buf, len), len, true, done, data);
	return 0;
}

void httpd_stream_end(struct httpd_req *req)
{
	struct conn *c = req->conn;

	if (c) {
		if (c->req != req || !c->streaming)
			BUG("httpd_stream_end: not the connection's stream");
		c->req = NULL;
		c->busy = false;
		c->stream_ended = true;
		if (!c->closing && !c->writes_out)
			conn_close(c);
	}
	req_free(req);
}

/* ---------------------------------------------------------------------- */
/* The listener */

/* Open connections from peer, c not counted. */
static size_t conns_from(struct httpd *h, const struct conn *c, const char *peer)
{
	size_t n = 0;

	for (const struct conn *o = h->conns; o; o = o->next)
		if (o != c && !o->closing && strcmp(o->peer, peer) == 0)
			n++;
	return n;
}

static void on_connection(uv_stream_t *server, int status)
{
	struct httpd *h = server->data;
	struct conn *c;
	struct sockaddr_storage ss;
	int sl = sizeof ss;

	if (status < 0) {
		kpl_warn(LOG, "accept: %s", uv_strerror(status));
		return;
	}
	c = kpl_calloc(1, sizeof *c);
	c->h = h;
	uv_tcp_init(h->loop, &c->tcp);
	uv_timer_init(h->loop, &c->timer);
	c->tcp.data = c->timer.data = c;
	c->open_handles = 2;
	c->next = h->conns;
	if (h->conns)
		h->conns->prev = c;
	h->conns = c;
	h->n_conns++;
	if (uv_accept(server, (uv_stream_t *)&c->tcp) < 0) {
		conn_close(c);
		return;
	}
	if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&ss, &sl) == 0) {
		if (ss.ss_family == AF_INET6)
			uv_ip6_name((struct sockaddr_in6 *)&ss, c->peer, sizeof c->peer);
		else
			uv_ip4_name((struct sockaddr_in *)&ss, c->peer, sizeof c->peer);
	}
	if (h->n_conns > h->opt.max_connections) {
		kpl_warn(LOG, "%s: over %zu connections: closed", c->peer,
			 h->opt.max_connections);
		conn_close(c);
		return;
	}
	if (conns_from(h, c, c->peer) >= h->opt.max_per_address) {
		/* Debug only: a flood of these is what the cap is for. */
		kpl_debug(LOG, "%s: over %zu connections from one address: closed", c->peer,
			  h->opt.max_per_address);
		conn_close(c);
		return;
	}
	if (h->tls)
		c->tls = tlsio_new(h->tls);
	http_parser_init(&c->parser, HTTP_REQUEST);
	c->parser.data = c;
	arm_timer(c);
	uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
}

static int parse_listen(const char *listen, struct sockaddr_storage *ss,
			struct kpl_err *err)
{
	const char *colon = strrchr(listen, ':');
	char host[256];
	char *end;
	long port;

	if (!colon || colon == listen || (size_t)(colon - listen) >= sizeof host)
		return kpl_errf(err, KPL_EINVAL, "http listen %s: want HOST:PORT", listen);
	port = strtol(colon + 1, &end, 10);
	if (*end || !colon[1] || port < 0 || port > 65535)
		return kpl_errf(err, KPL_EINVAL, "http listen %s: bad port", listen);
	snprintf(host, sizeof host, "%.*s", (int)(colon - listen), listen);
	if (host[0] == '[' && host[strlen(host) - 1] == ']') {
		memmove(host, host + 1, strlen(host));
		host[strlen(host) - 1] = '\0';
		if (uv_ip6_addr(host, (int)port, (struct sockaddr_in6 *)ss) == 0)
			return 0;
	} else {
		if (strcmp(host, "localhost") == 0)
			snprintf(host, sizeof host, "127.0.0.1");
		if (uv_ip4_addr(host, (int)port, (struct sockaddr_in *)ss) == 0)
			return 0;
	}
	return kpl_errf(err, KPL_EINVAL, "http listen %s: want a numeric address", listen);
}

static void server_closed(uv_handle_t *hd)
{
	struct httpd *h = hd->data;

	h->server_open = false;
	if (!h->conns) {
		void (*done)(void *) = h->done;
		void *data = h->done_data;
		tlsio_ctx_free(h->tls);
		free(h);
		if (done)
			done(data);
	}
}

int httpd_start(uv_loop_t *loop, const struct httpd_options *opt, struct httpd **out,
		struct kpl_err *err)
{
	struct httpd *h;
	struct sockaddr_storage ss;
	int sl = sizeof ss, rc;

	*out = NULL;
	memset(&ss, 0, sizeof ss);
	if ((rc = parse_listen(opt->listen, &ss, err)) != 0)
		return rc;
	if (!opt->tls_cert_file != !opt->tls_key_file)
		return kpl_errf(err, KPL_EINVAL, "http TLS needs both a certificate and a key");
	h = kpl_calloc(1, sizeof *h);
	h->loop = loop;
	h->opt = *opt;
	if (opt->tls_cert_file &&
	    (rc = tlsio_ctx_new(opt->tls_cert_file, opt->tls_key_file, &h->tls, err)) != 0) {
		free(h);
		return rc;
	}
	if (!h->opt.max_header_bytes)
		h->opt.max_header_bytes = DEFAULT_MAX_HEADER;
	if (!h->opt.max_body_bytes)
		h->opt.max_body_bytes = DEFAULT_MAX_BODY;
	if (!h->opt.max_connections)
		h->opt.max_connections = DEFAULT_MAX_CONNS;
	if (!h->opt.read_timeout_ms)
		h->opt.read_timeout_ms = DEFAULT_READ_TIMEOUT_MS;
	if (!h->opt.max_per_address)
		h->opt.max_per_address = DEFAULT_MAX_PER_ADDRESS;
	if (!h->opt.request_timeout_ms)
		h->opt.request_timeout_ms = DEFAULT_REQUEST_TIMEOUT_MS;
	uv_tcp_init(loop, &h->server);
	h->server.data = h;
	h->server_open = true;
	if ((rc = uv_tcp_bind(&h->server, (struct sockaddr *)&ss, 0)) < 0 ||
	    (rc = uv_listen((uv_stream_t *)&h->server, 128, on_connection)) < 0 ||
	    (rc = uv_tcp_getsockname(&h->server, (struct sockaddr *)&ss, &sl)) < 0) {
		kpl_errf(err, KPL_EIO, "http listen %s: %s", opt->listen, uv_strerror(rc));
		/* Freed in server_closed (no connection can exist yet). */
		h->stopping = true;
		uv_close((uv_handle_t *)&h->server, server_closed);
		return KPL_EIO;
	}
	h->port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
						: ((struct sockaddr_in *)&ss)->sin_port);
	*out = h;
	return 0;
}

int httpd_port(struct httpd *h)
{
	return h->port;
}

void httpd_stop(struct httpd *h, void (*done)(void *data), void *data)
{
	struct conn *c, *next;

	h->stopping = true;
	h->done = done;
	h->done_data = data;
	for (c = h->conns; c; c = next) {
		next = c->next;
		conn_close(c);
	}
	uv_close((uv_handle_t *)&h->server, server_closed);
}
