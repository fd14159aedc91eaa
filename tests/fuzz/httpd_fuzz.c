/*
 * httpd_fuzz.c - kpld's HTTP/1.1 server (engine/httpd.c) on any bytes a
 * client may send: one server on 127.0.0.1 for the whole run, small
 * limits so the 413/431 paths are near, and per input one connection that
 * writes the input (one or more requests, pipelined), half-closes and
 * reads until the server is done with it. Routes answer at once, later
 * (from a timer, as the webhook handlers do after git), or read every
 * header and the body first, so each way a request can end is reached.
 *
 * The parser itself is Debian's libhttp-parser; what is fuzzed is kpld's
 * use of it: header and body accounting, keep-alive, pipelined bytes kept
 * while a handler holds a request, routing and the 404/405 answers.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "engine/httpd.h"
#include "base/kpl.h"
#include "tests/fuzz/fuzz.h"

static uv_loop_t loop;
static struct httpd *server;
static int port;

static void h_now(struct httpd_req *req, void *data)
{
	size_t len;
	const char *body = httpd_req_body(req, &len);
	const char *sig = httpd_req_header(req, "X-Hub-Signature-256");

	(void)data;
	httpd_req_header(req, "Content-Type");
	httpd_req_peer(req);
	httpd_respondf(req, 202, "%s %s %zu %s", httpd_req_method(req), httpd_req_path(req),
		       len, sig ? sig : "-");
	(void)body;
}

static void later_fire(uv_timer_t *t)
{
	struct httpd_req *req = t->data;

	httpd_respond(req, 204, NULL, NULL, 0);
	uv_close((uv_handle_t *)t, (uv_close_cb)free);
}

/* Answers from the loop, as a handler waiting for git would. */
static void h_later(struct httpd_req *req, void *data)
{
	uv_timer_t *t = malloc(sizeof *t);

	(void)data;
	uv_timer_init(&loop, t);
	t->data = req;
	uv_timer_start(t, later_fire, 0, 0);
}

static void h_text(struct httpd_req *req, void *data)
{
	(void)data;
	httpd_respond(req, 200, "text/plain; version=0.0.4", "kpl_up 1\n", 9);
}

/* The console's answer (api/web.c): a prefix route, long extra headers,
 * 304 without a body. */
static void h_assets(struct httpd_req *req, void *data)
{
	static const char extra[] =
		"Content-Security-Policy: default-src 'none'; script-src 'self'; style-src 'self'; "
		"img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
		"form-action 'none'\r\nX-Content-Type-Options: nosniff\r\nETag: \"0123\"\r\n";

	(void)data;
	if (httpd_req_header(req, "If-None-Match"))
		httpd_respond_headers(req, 304, "text/css", extra, NULL, 0);
	else
		httpd_respond_headers(req, 200, "text/css", extra, httpd_req_path(req),
				      strlen(httpd_req_path(req)));
}

static const struct httpd_route routes[] = {
	{ "POST", "/hooks/github", h_now, NULL },
	{ "POST", "/hooks/gitlab", h_later, NULL },
	{ "GET", "/metrics", h_text, NULL },
	{ "GET", "/healthz", h_later, NULL },
	{ "PUT", "/healthz", h_now, NULL },
	{ "GET", "/assets/*", h_assets, NULL },
};

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	struct httpd_options o = {
		.listen = "127.0.0.1:0",
		.routes = routes,
		.n_routes = KPL_ARRAY_SIZE(routes),
		.max_header_bytes = 2048,
		.max_body_bytes = 4096,
		.max_connections = 8,
		.read_timeout_ms = 5000,
	};
	struct kpl_err err = { 0 };

	(void)argc;
	(void)argv;
	kpl_log_threshold = (enum kpl_log_level)(KPL_LOG_ERROR + 1);
	uv_loop_init(&loop);
	if (httpd_start(&loop, &o, &server, &err) != 0) {
		fprintf(stderr, "httpd_fuzz: %s\n", err.msg);
		abort();
	}
	port = httpd_port(server);
	return 0;
}

/* One client connection's life. */
struct client {
	uv_tcp_t tcp;
	uv_connect_t connect;
	uv_write_t write;
	uv_shutdown_t shutdown;
	uv_buf_t out;
	char in[4096];
	bool closed;
};

static void c_closed(uv_handle_t *h)
{
	((struct client *)h->data)->closed = true;
}

static void c_close(struct client *c)
{
	if (!uv_is_closing((uv_handle_t *)&c->tcp))
		uv_close((uv_handle_t *)&c->tcp, c_closed);
}

static void c_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
	struct client *c = h->data;

	(void)suggested;
	*buf = uv_buf_init(c->in, sizeof c->in);
}

static void c_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
	(void)buf;
	if (n < 0) /* EOF: the server is done with us; or a reset */
		c_close(s->data);
}

static void c_shut(uv_shutdown_t *sd, int status)
{
	(void)sd;
	(void)status;
}

static void c_written(uv_write_t *w, int status)
{
	struct client *c = w->data;

	if (status < 0) {
		c_close(c);
		return;
	}
	c->shutdown.data = c;
	if (uv_shutdown(&c->shutdown, (uv_stream_t *)&c->tcp, c_shut) != 0)
		c_close(c);
}

static void c_connected(uv_connect_t *cr, int status)
{
	struct client *c = cr->data;

	if (status < 0) {
		c_close(c);
		return;
	}
	uv_read_start((uv_stream_t *)&c->tcp, c_alloc, c_read);
	c->write.data = c;
	if (uv_write(&c->write, (uv_stream_t *)&c->tcp, &c->out, 1, c_written) != 0)
		c_close(c);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct client c = { 0 };
	struct sockaddr_in sa;

	if (size == 0)
		return 0;
	uv_ip4_addr("127.0.0.1", port, &sa);
	uv_tcp_init(&loop, &c.tcp);
	c.tcp.data = &c;
	c.connect.data = &c;
	c.out = uv_buf_init((char *)data, (unsigned)size);
	if (uv_tcp_connect(&c.connect, &c.tcp, (const struct sockaddr *)&sa, c_connected) != 0)
		c_close(&c);
	while (!c.closed)
		uv_run(&loop, UV_RUN_ONCE);
	/* Let the server close its side and run its timers. */
	for (int i = 0; i < 4; i++)
		uv_run(&loop, UV_RUN_NOWAIT);
	return 0;
}
