/*
 * health.c - grpc.health.v1.Health: Check and Watch over the server's one
 * serving flag (api_server_set_serving), for "" and every served service.
 *
 * Check of an unknown service fails NOT_FOUND; Watch of one reports
 * SERVICE_UNKNOWN and keeps watching, as grpc's own health service does.
 */
#include <stdlib.h>
#include <string.h>

#include "api/health.pb-c.h"
#include "api/server_internal.h"

#define STATUS_NONE (-1)

struct watcher {
	struct api_health *h;
	struct api_call *call;
	struct watcher *prev, *next;
	const char *service; /* borrowed from the call's request */
	int last_sent;       /* status last sent, or STATUS_NONE */
	bool sending;        /* one api_call_send in flight */
	bool ended;          /* call ended; freed once no send is in flight */
};

struct api_health {
	struct api_server *s;
	struct watcher *watchers;
};

struct api_health *api_health_new(struct api_server *s)
{
	struct api_health *h = kpl_calloc(1, sizeof *h);

	h->s = s;
	return h;
}

void api_health_free(struct api_health *h)
{
	if (h->watchers)
		BUG("health freed with watchers left");
	free(h);
}

static bool service_known(struct api_health *h, const char *service)
{
	return !*service || api_server_has_service(h->s, service);
}

static int status_of(struct api_health *h, const char *service)
{
	if (!service_known(h, service))
		return GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVICE_UNKNOWN;
	return api_server_serving(h->s)
		       ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
		       : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING;
}

void api_health_check(struct api_call *call, const ProtobufCMessage *req,
		      void *data)
{
	struct api_health *h = data;
	const Grpc__Health__V1__HealthCheckRequest *r =
		(const Grpc__Health__V1__HealthCheckRequest *)req;
	Grpc__Health__V1__HealthCheckResponse resp =
		GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
	char msg[256];

	if (!service_known(h, r->service)) {
		snprintf(msg, sizeof msg, "unknown service \"%.200s\"", r->service);
		api_call_fail(call, 5 /* NOT_FOUND */, msg);
		return;
	}
	resp.status = status_of(h, r->service);
	api_call_reply(call, &resp.base);
}

/* Ends the call (once) and frees w when no send is in flight. */
static void watcher_end(struct watcher *w)
{
	struct api_health *h = w->h;

	if (!w->ended) {
		w->ended = true;
		if (w->prev)
			w->prev->next = w->next;
		else
			h->watchers = w->next;
		if (w->next)
			w->next->prev = w->prev;
		api_call_finish(w->call, 1 /* CANCELLED */, "health watch ended");
	}
	if (!w->sending)
		free(w);
}

static void watcher_sent(struct api_call *call, bool ok, void *data);

/* Sends the current status if it differs from the last one sent. */
static void watcher_pump(struct watcher *w)
{
	Grpc__Health__V1__HealthCheckResponse resp =
		GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
	int st;

	if (w->sending)
		return;
	st = status_of(w->h, w->service);
	if (st == w->last_sent)
		return;
	resp.status = st;
	w->last_sent = st;
	w->sending = true;
	api_call_send(w->call, &resp.base, watcher_sent, w);
}

static void watcher_sent(struct api_call *call, bool ok, void *data)
{
	struct watcher *w = data;

	w->sending = false;
	if (w->ended || !ok) {
		watcher_end(w);
		return;
	}
	watcher_pump(w);
}

static void watcher_cancelled(struct api_call *call, void *data)
{
	watcher_end(data);
}

void api_health_watch(struct api_call *call, const ProtobufCMessage *req,
		      void *data)
{
	struct api_health *h = data;
	const Grpc__Health__V1__HealthCheckRequest *r =
		(const Grpc__Health__V1__HealthCheckRequest *)req;
	struct watcher *w = kpl_calloc(1, sizeof *w);

	w->h = h;
	w->call = call;
	w->service = r->service;
	w->last_sent = STATUS_NONE;
	w->next = h->watchers;
	if (h->watchers)
		h->watchers->prev = w;
	h->watchers = w;
	api_call_on_cancel(call, watcher_cancelled, w);
	watcher_pump(w);
}

void api_health_changed(struct api_health *h)
{
	for (struct watcher *w = h->watchers; w; w = w->next)
		watcher_pump(w);
}
