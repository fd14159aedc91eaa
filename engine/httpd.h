/*
 * httpd.h - a small HTTP/1.1 server on the daemon's libuv loop, for the
 * webhook, metrics and health endpoints (engine/hooks.c).
 *
 * One uv_tcp_t listener; each connection has its own http_parser (Debian's
 * libhttp-parser) and handles one request at a time: while a handler holds
 * a request the connection reads nothing more (pipelined bytes wait), so
 * responses go out in order. Keep-alive as the client asks. Limits: header
 * bytes (request line and headers), body bytes, open connections in all and
 * from one address, an idle/read timeout, and a deadline for a whole request
 * from its first byte (so a client sending a byte now and then cannot keep
 * a connection forever); a request over a limit is answered 431/413/408 (or
 * the connection is cut) and the connection closed. Every response carries
 * Content-Length (none for 204). With a certificate and key the listener
 * speaks TLS only, through engine/tlsio.h on the same loop.
 *
 * Routes are data: a table of method + exact path, or a prefix ending in
 * '*' (the query string is not part of the match); method "*" takes every
 * method (its handler answers the ones it does not serve). A path with no
 * route for the method gets 405 with Allow, an unknown path 404.
 *
 * Streams (Server-Sent Events): a handler may answer with
 * httpd_stream_begin instead, then write pieces as it likes, and end with
 * httpd_stream_end; the response has no length and the connection closes
 * at its end.
 *
 * Threads: loop thread only, all of it.
 */
#ifndef KPL_HTTPD_H
#define KPL_HTTPD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "base/kpl.h"

struct httpd;     /* opaque */
struct httpd_req; /* one request a handler holds; opaque */

/*
 * A handler gets a complete request (body read whole) and must answer it
 * exactly once, now or later, with httpd_respond, which frees it. Until
 * then req stays valid even if the client goes away or the server stops
 * (the answer is then dropped).
 */
typedef void (*httpd_handler_fn)(struct httpd_req *req, void *data);

struct httpd_route {
	const char *method; /* "GET", "POST"; "*": any */
	const char *path;   /* "/hooks/github"; a last character * makes it a prefix */
	httpd_handler_fn handler;
	void *data;
};

struct httpd_options {
	const char *listen; /* HOST:PORT (IPv4, or [IPv6]); port 0 picks one */
	const struct httpd_route *routes; /* borrowed; outlives the server */
	size_t n_routes;
	/* 0 picks the default. */
	size_t max_header_bytes; /* 16 KiB */
	size_t max_body_bytes;   /* 1 MiB */
	size_t max_connections;  /* 256 */
	size_t max_per_address;  /* 16: open connections from one peer address */
	uint64_t read_timeout_ms; /* 10 s: idle keep-alive or a slow request */
	uint64_t request_timeout_ms; /* 30 s: first byte to whole request */
	/* PEM files: with both, the listener serves TLS only (engine/tlsio.h). */
	const char *tls_cert_file;
	const char *tls_key_file;
};

/*
 * Binds and starts listening. On success *out is the caller's; it ends with
 * httpd_stop. Errors name the address ("http listen 1.2.3.4:80: permission
 * denied").
 */
int httpd_start(uv_loop_t *loop, const struct httpd_options *opt, struct httpd **out,
		struct kpl_err *err);

/* The port actually bound (useful with port 0). */
int httpd_port(struct httpd *h);

/*
 * Stops accepting, closes every connection (requests handlers still hold
 * are answered into the void), frees the server once every handle has
 * closed, then calls done(data) on the loop.
 */
void httpd_stop(struct httpd *h, void (*done)(void *data), void *data);

/* --- A request, valid until httpd_respond. Strings are NUL-terminated. --- */

const char *httpd_req_method(struct httpd_req *req);
/* The path without the query string. */
const char *httpd_req_path(struct httpd_req *req);
/* The raw query string without '?' (still percent-encoded), or "". */
const char *httpd_req_query(struct httpd_req *req);
/* The first header of that name (case-insensitive), or NULL. */
const char *httpd_req_header(struct httpd_req *req, const char *name);
/* The raw body bytes (NUL-terminated for convenience; may hold NULs). */
const char *httpd_req_body(struct httpd_req *req, size_t *len);
/* The peer's address ("127.0.0.1"), for log lines. */
const char *httpd_req_peer(struct httpd_req *req);

/*
 * Answers req (status, a Content-Type, len bytes of body, copied) and frees
 * it. For 204 the body is ignored.
 */
void httpd_respond(struct httpd_req *req, int status, const char *content_type,
		   const char *body, size_t len);
/* httpd_respond with more headers: extra is "Name: value\r\n" lines (at
 * most 2 KiB), borrowed for the call. */
void httpd_respond_headers(struct httpd_req *req, int status, const char *content_type,
			   const char *extra, const char *body, size_t len);
/*
 * Starts a response without a length (headers as httpd_respond_headers). From
 * now on the connection reads only to see the client go: on_gone(req,
 * data) is called once if it goes (or the server stops) before
 * httpd_stream_end; req stays valid and must still be ended. Returns -1
 * (nothing called) if the client is already gone.
 */
int httpd_stream_begin(struct httpd_req *req, int status, const char *content_type,
		       const char *headers,
		       void (*on_gone)(struct httpd_req *req, void *data), void *data);
/*
 * Writes len bytes (copied) of the stream. done(data, status) is called
 * once, on the loop, never from inside this call: status 0 when the bytes
 * went to the kernel, < 0 (a libuv error) when they never will, also after
 * httpd_stream_end. Returns -1 (done not called) if the client is gone.
 */
int httpd_stream_write(struct httpd_req *req, const char *buf, size_t len,
		       void (*done)(void *data, int status), void *data);
/* Ends the stream (after what was written goes out) and frees req. */
void httpd_stream_end(struct httpd_req *req);
/* httpd_respond with a text/plain body, printf style; a newline is added. */
void httpd_respondf(struct httpd_req *req, int status, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

#endif
