/*
 * echo_server.c - a kpld-shaped gRPC server for tests/api/server_test.py:
 * api/server.c serving a few kpl.v1.Pipelines methods with canned behaviour.
 *
 *   GetRun    id "missing"  -> NOT_FOUND
 *             id "slow..."  -> replies after 20 ms (from a uv_timer)
 *             id "err"      -> api_call_fail_err(KPL_ESTATE)
 *             id "long"     -> FAILED_PRECONDITION, 5000-byte message
 *             id "stats"    -> message "live=N cancels=N" (handler contexts
 *                              alive, stream cancels seen)
 *             otherwise     -> Run{id, pipeline_name "echo", message = the
 *                              "x-echo" metadata value or ""}
 *   WatchRun  id "forever"  -> one RunEvent every 2 ms until the client
 *                              cancels; "reply-last": event 1, then
 *                              api_call_reply(event 2) while the send is in
 *                              flight; "finish-early": event 1 and OK
 *                              without waiting for it; otherwise from_seq
 *                              events, seq 1..N, then OK
 *   CancelRun id "serving" / "not-serving" -> api_server_set_serving
 *
 * Prints "PORT=n" once listening; on SIGTERM shuts the server down and exits
 * 0 only if the loop closes clean and no handler context is left.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "api/kpl.pb-c.h"
#include "api/server.h"

static struct api_server *server;
static int live;    /* handler contexts not yet freed */
static int cancels; /* stream cancels seen by handlers (on_cancel or a failed send) */
static bool stopped;

/* --- GetRun --- */

struct slow {
	uv_timer_t timer;
	struct api_call *call;
	char *id;
};

static void reply_run(struct api_call *call, const char *id, const char *msg)
{
	Kpl__V1__Run run = KPL__V1__RUN__INIT;

	run.id = (char *)id;
	run.pipeline_name = "echo";
	run.message = (char *)(msg ? msg : "");
	run.state = KPL__V1__RUN_STATE__RUN_STATE_SUCCEEDED;
	api_call_reply(call, &run.base);
}

static void slow_closed(uv_handle_t *h)
{
	struct slow *sl = h->data;

	free(sl->id);
	free(sl);
	live--;
}

static void slow_fire(uv_timer_t *t)
{
	struct slow *sl = t->data;

	reply_run(sl->call, sl->id, "slow");
	uv_close((uv_handle_t *)&sl->timer, slow_closed);
}

static void get_run(struct api_call *call, const ProtobufCMessage *req,
		    void *data)
{
	const Kpl__V1__GetRunRequest *r = (const Kpl__V1__GetRunRequest *)req;
	uv_loop_t *loop = data;
	char msg[64];

	if (strcmp(r->id, "missing") == 0) {
		api_call_fail(call, 5, "run \"missing\" not found");
	} else if (strcmp(r->id, "err") == 0) {
		struct kpl_err err;
		kpl_errf(&err, KPL_ESTATE, "run \"err\" is finished");
		api_call_fail_err(call, &err);
	} else if (strcmp(r->id, "long") == 0) {
		char *big = kpl_malloc(5001);
		memset(big, 'm', 5000);
		big[5000] = '\0';
		api_call_fail(call, 9, big);
		free(big);
	} else if (strcmp(r->id, "stats") == 0) {
		snprintf(msg, sizeof msg, "live=%d cancels=%d", live, cancels);
		reply_run(call, r->id, msg);
	} else if (strncmp(r->id, "slow", 4) == 0) {
		struct slow *sl = kpl_calloc(1, sizeof *sl);
		live++;
		sl->call = call;
		sl->id = kpl_strdup(r->id);
		uv_timer_init(loop, &sl->timer);
		sl->timer.data = sl;
		uv_timer_start(&sl->timer, slow_fire, 20, 0);
	} else {
		reply_run(call, r->id, api_call_metadata(call, "x-echo"));
	}
}

/* --- WatchRun --- */

struct watch {
	uv_timer_t timer;
	struct api_call *call;
	char *id;
	uint64_t seq, last; /* last == 0: forever */
	bool ended;   /* the call is ended */
	bool sending; /* a send is in flight: its callback is still due */
	bool closing;
};

static void watch_closed(uv_handle_t *h)
{
	struct watch *w = h->data;

	free(w->id);
	free(w);
	live--;
}

/* Frees w once the call is ended and no send callback is due. */
static void watch_release(struct watch *w)
{
	if (w->ended && !w->sending && !w->closing) {
		w->closing = true;
		uv_close((uv_handle_t *)&w->timer, watch_closed);
	}
}

static void watch_end(struct watch *w, int code, const char *msg)
{
	if (!w->ended) {
		w->ended = true;
		api_call_finish(w->call, code, msg);
	}
	watch_release(w);
}

static void watch_sent(struct api_call *call, bool ok, void *data);

static void watch_send(struct watch *w)
{
	Kpl__V1__RunEvent ev = KPL__V1__RUN_EVENT__INIT;

	ev.run_id = w->id;
	ev.seq = ++w->seq;
	ev.kind = KPL__V1__EVENT_KIND__EVENT_KIND_LOG;
	ev.message = "line";
	w->sending = true;
	api_call_send(w->call, &ev.base, watch_sent, w);
}

static void watch_tick(uv_timer_t *t)
{
	watch_send(t->data);
}

static void watch_sent(struct api_call *call, bool ok, void *data)
{
	struct watch *w = data;

	w->sending = false;
	if (w->ended)
		watch_release(w);
	else if (!ok) {
		/* The client's cancel reached this send before on_cancel
		 * (grpc completes the two in either order): heard all the
		 * same. */
		cancels++;
		watch_end(w, 1, "client went away");
	}
	else if (w->last && w->seq >= w->last)
		watch_end(w, 0, NULL);
	else if (w->last)
		watch_send(w);
	else
		uv_timer_start(&w->timer, watch_tick, 2, 0);
}

static void watch_cancelled(struct api_call *call, void *data)
{
	cancels++;
	watch_end(data, 1, "cancelled");
}

static void watch_run(struct api_call *call, const ProtobufCMessage *req,
		      void *data)
{
	const Kpl__V1__WatchRunRequest *r = (const Kpl__V1__WatchRunRequest *)req;
	struct watch *w = kpl_calloc(1, sizeof *w);

	live++;
	w->call = call;
	w->id = kpl_strdup(r->id);
	w->last = strcmp(r->id, "forever") == 0 ? 0 : r->from_seq;
	uv_timer_init(data, &w->timer);
	w->timer.data = w;
	api_call_on_cancel(call, watch_cancelled, w);
	if (strcmp(r->id, "reply-last") == 0) {
		/* Ends while a send is in flight: the final message and the
		 * status follow it. */
		Kpl__V1__RunEvent last = KPL__V1__RUN_EVENT__INIT;
		watch_send(w);
		last.run_id = w->id;
		last.seq = 2;
		w->ended = true;
		api_call_reply(call, &last.base);
		watch_release(w); /* waits for watch_sent */
	} else if (strcmp(r->id, "finish-early") == 0) {
		watch_send(w);
		watch_end(w, 0, NULL);
	} else if (!strcmp(r->id, "forever") || r->from_seq > 0)
		watch_send(w);
	else
		watch_end(w, 0, NULL);
}

/* --- CancelRun: toggles health --- */

static void cancel_run(struct api_call *call, const ProtobufCMessage *req,
		       void *data)
{
	const Kpl__V1__CancelRunRequest *r = (const Kpl__V1__CancelRunRequest *)req;

	if (strcmp(r->id, "serving") == 0)
		api_server_set_serving(server, true);
	else if (strcmp(r->id, "not-serving") == 0)
		api_server_set_serving(server, false);
	else {
		api_call_fail(call, 3, "id must be \"serving\" or \"not-serving\"");
		return;
	}
	reply_run(call, r->id, NULL);
}

/* --- main --- */

static void on_stopped(void *data)
{
	stopped = true;
}

static void on_signal(uv_signal_t *sig, int signum)
{
	uv_close((uv_handle_t *)sig, NULL);
	api_server_shutdown(server, on_stopped, NULL);
}

int main(int argc, char **argv)
{
	uv_loop_t loop;
	uv_signal_t sig;
	struct kpl_err err;
	const char *listen = argc > 1 ? argv[1] : "127.0.0.1:0";
	const char *lvl = getenv("KPL_LOG");
	int rc;

	if (lvl && kpl_log_level_parse(lvl) >= 0)
		kpl_log_threshold = kpl_log_level_parse(lvl);
	uv_loop_init(&loop);
	const struct api_method methods[] = {
		{ "/kpl.v1.Pipelines/GetRun", API_UNARY,
		  &kpl__v1__get_run_request__descriptor, get_run, &loop },
		{ "/kpl.v1.Pipelines/WatchRun", API_SERVER_STREAM,
		  &kpl__v1__watch_run_request__descriptor, watch_run, &loop },
		{ "/kpl.v1.Pipelines/CancelRun", API_UNARY,
		  &kpl__v1__cancel_run_request__descriptor, cancel_run, &loop },
	};
	struct api_server_options opt = { listen, methods,
					  KPL_ARRAY_SIZE(methods) };

	if (api_server_start(&loop, &opt, &server, &err) < 0) {
		fprintf(stderr, "echo_server: %s\n", err.msg);
		return uv_loop_close(&loop) == 0 ? 1 : 2;
	}
	api_server_set_serving(server, true);
	uv_signal_init(&loop, &sig);
	uv_signal_start(&sig, on_signal, SIGTERM);
	printf("PORT=%d\n", api_server_port(server));
	fflush(stdout);

	uv_run(&loop, UV_RUN_DEFAULT);
	rc = uv_loop_close(&loop);
	printf("STOPPED=%d LIVE=%d LOOP_CLOSE=%d\n", stopped, live, rc);
	fflush(stdout);
	return stopped && live == 0 && rc == 0 ? 0 : 2;
}
