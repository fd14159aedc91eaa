/*
 * web.c - GET / and GET /assets/NAME from the assets built into kpld.
 */
#include "api/web.h"

#include <stdio.h>
#include <string.h>

/* No inline script or style anywhere in the console, so none is allowed;
 * data: images only for what CSS draws. */
const char web_security_headers[] =
	"Content-Security-Policy: default-src 'none'; script-src 'self'; style-src 'self'; "
	"img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
	"form-action 'none'\r\n"
	"X-Content-Type-Options: nosniff\r\n"
	"Referrer-Policy: no-referrer\r\n"
	"X-Frame-Options: DENY\r\n"
	"Cross-Origin-Opener-Policy: same-origin\r\n";

const struct web_asset *web_find(const char *path)
{
	if (strcmp(path, "/") == 0 || strcmp(path, "/index.html") == 0)
		path = "/assets/index.html";
	for (size_t i = 0; i < web_n_assets; i++)
		if (strcmp(web_assets[i].path, path) == 0)
			return &web_assets[i];
	return NULL;
}

/* If-None-Match holds "*" or a list of ETags, maybe weak (W/"..."),
 * which is enough for a GET (RFC 9110 13.1.2). Ours are quoted hex, so a
 * substring match cannot confuse two. */
static int etag_matches(const char *inm, const char *etag)
{
	return inm && (strcmp(inm, "*") == 0 || strstr(inm, etag) != NULL);
}

static void on_asset(struct httpd_req *req, void *data)
{
	const struct web_asset *a = web_find(httpd_req_path(req));
	char headers[1024];

	(void)data;
	if (!a) {
		httpd_respond_headers(req, 404, "text/plain; charset=utf-8", web_security_headers,
				      "not found\n", 10);
		return;
	}
	/* no-cache: revalidate each time (names carry no hash), which the
	 * ETag makes a 304 with no body. */
	snprintf(headers, sizeof headers, "%sETag: %s\r\nCache-Control: no-cache\r\n",
		 web_security_headers, a->etag);
	if (etag_matches(httpd_req_header(req, "If-None-Match"), a->etag)) {
		httpd_respond_headers(req, 304, a->content_type, headers, NULL, 0);
		return;
	}
	httpd_respond_headers(req, 200, a->content_type, headers, (const char *)a->data,
			      a->len);
}

void web_routes(struct httpd_route *out)
{
	out[0] = (struct httpd_route){ "GET", "/", on_asset, NULL };
	out[1] = (struct httpd_route){ "GET", "/assets/*", on_asset, NULL };
}
