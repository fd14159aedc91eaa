/*
 * web.h - the console (clients/web) served by kpld's HTTP listener.
 *
 * The assets are built into kpld (clients/web/embed.py makes web_assets[]
 * at build time): GET / answers index.html, GET /assets/NAME the file NAME.
 * Every answer carries a strict Content-Security-Policy (scripts, styles
 * and connections to this origin only, no inline code, no framing),
 * X-Content-Type-Options: nosniff and Referrer-Policy: no-referrer; assets
 * carry a strong ETag (SHA-256 of the bytes) and If-None-Match is answered
 * 304. The console talks to kpld through the JSON API on the same listener
 * with a bearer token; these routes need none (the assets hold no data).
 *
 * Threads: loop thread only.
 */
#ifndef KPL_WEB_H
#define KPL_WEB_H

#include <stddef.h>

#include "engine/httpd.h"

/* One embedded file. Everything is static, valid for the process's life. */
struct web_asset {
	const char *path;         /* "/assets/app.js" */
	const char *content_type; /* "text/javascript; charset=utf-8" */
	const char *etag;         /* "\"<sha256 hex>\"", quotes included */
	const unsigned char *data;
	size_t len;
};

extern const struct web_asset web_assets[];
extern const size_t web_n_assets;

/* The headers every console answer carries ("Name: value\r\n" lines). */
extern const char web_security_headers[];

/* The asset served at path ("/" is index.html), or NULL. */
const struct web_asset *web_find(const char *path);

#define WEB_N_ROUTES 2
/*
 * Writes the console's WEB_N_ROUTES routes (GET /, GET /assets/...) into
 * out, for the listener's route table.
 */
void web_routes(struct httpd_route *out);

#endif
