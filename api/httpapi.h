/*
 * httpapi.h - the HTTP/JSON face of kpld's API (docs/http.md): every
 * method of kpl.v1.Pipelines and kpl.v1.Security at a URL in the
 * google.api.http / grpc-gateway conventions, served on the HTTP listener
 * (engine/httpd.h) under /v1/.
 *
 * There is no second implementation of any operation: a request becomes
 * the method's request message (path variables, query parameters and the
 * JSON body, through api/pbjson.h) and is started with api_call_start, so
 * the gRPC handler, the authorize hook (Authorization: Bearer), the stream
 * caps and the audit entries are the gRPC ones. A unary reply is the
 * response message as proto3 JSON; a failure is {"code": <grpc code>,
 * "message": "..."} with the HTTP status grpc-gateway maps the code to.
 * Server-streaming methods (WatchRun, WatchRuns) are Server-Sent Events:
 * "id:" is the event's seq (global_seq for WatchRuns), "data:" the event
 * as proto3 JSON; Last-Event-ID resumes right after that id; a comment
 * line every heartbeat interval while nothing else is written; a slow
 * reader holds one batch (the pump reads on only once the socket took the
 * last one).
 *
 * Threads: loop thread only.
 */
#ifndef KPL_API_HTTPAPI_H
#define KPL_API_HTTPAPI_H

#include <stdint.h>
#include <stdio.h>
#include <uv.h>

#include "api/server.h"
#include "engine/httpd.h"

struct httpapi; /* opaque */

struct httpapi_options {
	uint64_t heartbeat_ms; /* 0: 15 s */
};

/* Serves s's methods (borrowed; see httpapi_stop). */
struct httpapi *httpapi_new(uv_loop_t *loop, struct api_server *s,
			    const struct httpapi_options *opt);

/* The httpd route to add: prefix "/v1/", any method, data the httpapi. */
struct httpd_route httpapi_route(struct httpapi *a);

/*
 * The API server is going away: requests from now on are answered 503.
 * Streams already open end with their calls (rpc_close_streams).
 */
void httpapi_stop(struct httpapi *a);

/* Frees a (after httpapi_stop; open requests need nothing of it). */
void httpapi_free(struct httpapi *a);

/* Writes the route table, one "METHOD PATH RPC-PATH" line each (kpld
 * --print-http-routes; tests and docs compare with it). */
void httpapi_print_routes(FILE *f);

/* The HTTP status a grpc status code maps to (grpc-gateway v2). */
int httpapi_status(int grpc_code);

#endif
