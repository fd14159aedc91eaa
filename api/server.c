/*
 * server.c - kpld's gRPC server core: grpc core's completion queue drained on
 * its own thread and handed to the libuv loop.
 *
 * The pattern (style.md, "grpc core from a libuv loop"): a thread loops on
 * grpc_completion_queue_next and appends each completed tag to a
 * mutex-protected list, calling uv_async_send only when the list goes from
 * empty to non-empty; the async callback drains the whole list on the loop,
 * since libuv coalesces wake-ups. Every tag is a struct tag whose first member
 * is its run function, so the loop just calls tag->run(tag, success).
 * Batches are started only on the loop thread, with one exception: a send of
 * several queued messages (api_call_flush) is chained on the queue thread,
 * which starts each next message as the one before completes (send_chain),
 * so the loop is woken once per batch, not once per message.
 *
 * There are API_CQS such queues, each with its own thread (each call stays
 * on one, so its tags still come back in order on one thread). One would
 * do, but Debian's libgrpc is built without NDEBUG: every completion then
 * looks its tag up in a flat array of the queue's outstanding tags
 * (cq_check_tag, under the queue's mutex), and each open call keeps one
 * there (RECV_CLOSE_ON_SERVER). With one queue a send to each of 10,000
 * streams cost 10,000 x 10,000 compares: most of kpld's CPU with many
 * watchers (bench/README.md, "Many watchers"). New calls fill the first
 * queue up to API_CQ_FILL calls before the next one gets any (request_arm):
 * each busy queue's thread costs wake-ups, so with few calls one thread
 * does it all, as before. Each thread takes what its queue has ready (up to
 * API_CQ_DRAIN tags) before it hands them to the loop in one go.
 *
 * A call is reference counted: one reference for the handler (dropped when it
 * ends the call) plus one per batch in flight (dropped when its tag comes
 * back). RECV_CLOSE_ON_SERVER is started as soon as a call arrives, for every
 * call, so a client that goes away is seen at once; it holds its reference
 * until grpc is done with the call. The call is freed at zero.
 *
 * Shutdown: grpc_server_shutdown_and_notify, grpc_server_cancel_all_calls,
 * then (once the notify tag, every request_call tag and every call are back)
 * grpc_server_destroy and grpc_completion_queue_shutdown. The thread sees
 * GRPC_QUEUE_SHUTDOWN, queues one last tag and exits; that tag joins it,
 * destroys the queue and closes the async handle, whose close callback frees
 * the server and calls done. The queue is shut down only when no call is left
 * because starting a batch on a shut-down queue is a grpc assertion failure.
 */
#include "api/server.h"

#include <errno.h>
#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/health.pb-c.h"
#include "api/reflection.pb-c.h"
#include "api/server_internal.h"
#include "engine/metrics.h"

#define SUB "api"

/* request_call tags kept outstanding: how many new calls grpc can hand us
 * between two turns of the loop. */
#define API_REQUESTS 32

/* Completion queues, each drained by its own thread (see the top); calls a
 * queue gets before the next one is used; tags a thread hands over at once
 * at most. */
#define API_CQS 16
#define API_CQ_FILL 2048
#define API_CQ_DRAIN 64

/* Streaming calls open at once (api_server_options). */
#define API_DEFAULT_MAX_STREAMS 1024
#define API_DEFAULT_MAX_STREAMS_PER_CONN 32
/* HTTP/2 streams (calls of any kind) one connection may have open; more
 * wait in the client. Above the streaming cap, so that cap answers first. */
#define API_MIN_H2_STREAMS 128

/* Status messages are cut to this many bytes. */
#define API_MAX_STATUS_MSG 1024

/* Built-in method paths. */
#define HEALTH_CHECK "/grpc.health.v1.Health/Check"
#define HEALTH_WATCH "/grpc.health.v1.Health/Watch"
#define REFLECTION_V1ALPHA \
	"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
#define REFLECTION_V1 "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"

struct tag {
	void (*run)(struct tag *t, int success);
	/* Queue thread, before the tag goes to the loop: true if it started
	 * another batch with the same tag instead (then the tag is not queued
	 * now). NULL for most tags. */
	bool (*chain)(struct tag *t, int success);
	struct tag *next; /* in the ready list; guarded by api_server.mu */
	int success;      /* the event's success, set when queued */
};

/* A tag inside an api_call. */
struct call_tag {
	struct tag tag;
	struct api_call *call;
};

/* One outstanding grpc_server_request_call. */
struct request {
	struct tag tag;
	struct api_server *s;
	struct cq_worker *wk; /* the call's queue, once it arrives */
	grpc_call *gc;
	grpc_call_details details;
	grpc_metadata_array md;
};

struct api_call {
	struct api_server *s;
	struct cq_worker *wk; /* its queue; NULL for another transport */
	struct api_call *prev, *next; /* s->calls */
	grpc_call *gc;
	grpc_call_details details;
	grpc_metadata_array md;
	char **md_values; /* NUL-terminated copies, lazily, by md index */
	char *method;     /* NUL-terminated copy of details.method */
	char *who;        /* api_call_set_who; NULL: "local" */
	char *peer_subject; /* client certificate subject, read lazily */
	bool peer_read;
	const struct api_method *m; /* NULL: unknown method */
	ProtobufCMessage *req;      /* the decoded request (unary, stream) */
	char *peer;        /* grpc's peer ("ipv4:127.0.0.1:50000"); streams only */
	bool counted;      /* in the server's open streams (stream_admit) */

	int refs;          /* 1 for the handler until it ends the call + batches */
	bool ended;        /* the handler (or the server) ended the call */
	bool cancelled;    /* client gone or server shutting down */
	bool cancel_queued; /* on_cancel queued (it runs at most once) */
	bool md_sent;      /* SEND_INITIAL_METADATA started */
	int close_cancelled; /* out-argument of RECV_CLOSE_ON_SERVER */

	struct call_tag close_tag, recv_tag, send_tag, status_tag, cancel_tag;

	grpc_byte_buffer *recv_buf;
	bool recv_busy;
	const ProtobufCMessageDescriptor *recv_desc;
	void (*recv_fn)(struct api_call *, ProtobufCMessage *,
			enum api_recv_status, void *);
	void *recv_data;

	/* Queued messages (api_call_push), sent in order by api_call_flush.
	 * The loop fills send_q while no send is in flight; from the flush
	 * until send_tag is back on the loop the queue thread owns send_i and
	 * send_failed (send_chain), and the loop touches none of these. */
	grpc_byte_buffer **send_q;
	size_t send_n, send_cap, send_i, send_bytes;
	bool send_failed; /* a chained start_batch was refused */
	bool send_busy;
	void (*sent)(struct api_call *, bool, void *);
	void *sent_data;

	/* api_call_finish while a send was in flight: started when it is back */
	bool status_pending;
	int pending_code;
	char *pending_msg;
	grpc_byte_buffer *pending_reply;
	grpc_byte_buffer *status_buf; /* unary reply */
	grpc_slice status_details;
	bool has_status_details;

	void (*on_cancel)(struct api_call *, void *);
	void *cancel_data;

	/* Another transport (api_call_start): gc is NULL, and every end,
	 * push and flush goes to ops. ops_t is NULL once the transport
	 * detached (its client is gone): then nothing goes to it. */
	const struct api_call_ops *ops;
	void *ops_t;
	struct api_call **ops_out;  /* cleared when the call is freed */
	const ProtobufCMessage *ops_reply; /* api_call_reply, during call_end */
	bool ops_flushing;          /* ops->flush called, api_call_sent not yet */
};

enum server_state { SRV_RUNNING, SRV_STOPPING };

/* A completion queue and the thread that drains it. */
struct cq_worker {
	struct api_server *s;
	grpc_completion_queue *cq;
	size_t n_calls; /* calls on this queue, not yet freed (loop thread) */
	uv_thread_t thread;
	struct tag exit_tag; /* queued by the thread as it exits */
};

struct api_server {
	uv_loop_t *loop;
	grpc_server *server;
	struct cq_worker workers[API_CQS];
	int workers_exited; /* exit tags seen on the loop */
	uv_async_t async;
	uv_mutex_t mu;
	struct tag *ready_head, *ready_tail; /* guarded by mu */

	struct api_method *methods; /* user's, then built-in ones */
	size_t n_methods;
	char **services; /* distinct service names, in order */
	size_t n_services;
	int port;
	bool serving;

	struct request requests[API_REQUESTS];
	int requests_out; /* request_call tags in flight */
	struct api_call *calls; /* every call not yet freed */
	size_t n_calls;
	size_t n_streams;        /* calls counted by stream_admit, not yet ended */
	size_t max_streams, max_streams_per_conn;

	enum server_state state;
	struct tag shutdown_tag; /* grpc_server_shutdown_and_notify */
	bool shutdown_notified;
	bool cq_shut;
	void (*done)(void *);
	void *done_data;

	struct api_health *health;
	struct api_reflection *refl;

	api_authorize_fn authorize; /* NULL: every call goes through */
	void *authorize_data;
	bool mtls; /* client certificates required */
};

/* --- The ready list: completion-queue thread (and loop) to loop. --- */

/* Any thread. Appends the list head..tail (linked by next, tail's NULL)
 * and wakes the loop if the ready list was empty. */
static void ready_push_list(struct api_server *s, struct tag *head, struct tag *tail)
{
	bool was_empty;

	uv_mutex_lock(&s->mu);
	was_empty = s->ready_head == NULL;
	if (s->ready_tail)
		s->ready_tail->next = head;
	else
		s->ready_head = head;
	s->ready_tail = tail;
	uv_mutex_unlock(&s->mu);
	if (was_empty)
		uv_async_send(&s->async);
}

/* Any thread. Appends t and wakes the loop if the list was empty. */
static void ready_push(struct api_server *s, struct tag *t, int success)
{
	t->success = success;
	t->next = NULL;
	ready_push_list(s, t, t);
}

static void on_async(uv_async_t *h)
{
	struct api_server *s = h->data;
	struct tag *t, *next;

	uv_mutex_lock(&s->mu);
	t = s->ready_head;
	s->ready_head = s->ready_tail = NULL;
	uv_mutex_unlock(&s->mu);
	/* Tags run in completion order; a run may free its tag. */
	for (; t; t = next) {
		next = t->next;
		t->run(t, t->success);
	}
}

static void cq_thread(void *arg)
{
	struct cq_worker *wk = arg;
	struct api_server *s = wk->s;

	bool shut = false;

	while (!shut) {
		grpc_event ev = grpc_completion_queue_next(
			wk->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
		struct tag *head = NULL, *tail = NULL;

		/* This one, and what else is ready now, in one hand-over. */
		for (int n = 0;; n++) {
			if (ev.type == GRPC_QUEUE_SHUTDOWN) {
				shut = true;
				break;
			}
			if (ev.type == GRPC_OP_COMPLETE) {
				struct tag *t = ev.tag;
				if (!t->chain || !t->chain(t, ev.success)) {
					t->success = ev.success;
					t->next = NULL;
					if (tail)
						tail->next = t;
					else
						head = t;
					tail = t;
				}
			}
			if (n + 1 >= API_CQ_DRAIN)
				break;
			ev = grpc_completion_queue_next(wk->cq, gpr_inf_past(GPR_CLOCK_REALTIME),
							NULL);
			if (ev.type == GRPC_QUEUE_TIMEOUT)
				break;
		}
		if (head)
			ready_push_list(s, head, tail);
	}
	ready_push(s, &wk->exit_tag, 1);
}

/* --- Calls. --- */

static void call_unref(struct api_call *c);
static void maybe_finish_shutdown(struct api_server *s);
static void request_arm(struct request *r);

static struct api_call *tag_call(struct tag *t)
{
	return ((struct call_tag *)t)->call;
}

/*
 * Starts a batch holding a call reference. If grpc refuses it the tag will
 * never come back: the reference is dropped at once (never the last one,
 * since the caller holds one) and false returned.
 */
static bool call_batch(struct api_call *c, struct call_tag *ct,
		       const grpc_op *ops, size_t n)
{
	grpc_call_error e;

	c->refs++;
	e = grpc_call_start_batch(c->gc, ops, n, &ct->tag, NULL);
	if (e != GRPC_CALL_OK) {
		kpl_warn(SUB, "%s: grpc_call_start_batch: error %d", c->method,
			 (int)e);
		c->refs--;
		return false;
	}
	return true;
}

/* Runs ct's tag on a later turn of the loop, as if grpc returned it. */
static void call_defer(struct api_call *c, struct call_tag *ct, int success)
{
	c->refs++;
	ready_push(c->s, &ct->tag, success);
}

static grpc_byte_buffer *pack_message(const ProtobufCMessage *m)
{
	size_t n = protobuf_c_message_get_packed_size(m);
	grpc_slice sl = grpc_slice_malloc(n);
	grpc_byte_buffer *bb;

	protobuf_c_message_pack(m, GRPC_SLICE_START_PTR(sl));
	bb = grpc_raw_byte_buffer_create(&sl, 1);
	grpc_slice_unref(sl);
	return bb;
}

/* Takes bb; NULL if it does not decode as desc. */
static ProtobufCMessage *unpack_message(const ProtobufCMessageDescriptor *desc,
					grpc_byte_buffer *bb)
{
	grpc_byte_buffer_reader rd;
	ProtobufCMessage *m = NULL;
	grpc_slice sl;

	if (grpc_byte_buffer_reader_init(&rd, bb)) {
		sl = grpc_byte_buffer_reader_readall(&rd);
		grpc_byte_buffer_reader_destroy(&rd);
		m = protobuf_c_message_unpack(desc, NULL, GRPC_SLICE_LENGTH(sl),
					      GRPC_SLICE_START_PTR(sl));
		grpc_slice_unref(sl);
	}
	grpc_byte_buffer_destroy(bb);
	return m;
}

static void call_free(struct api_call *c)
{
	struct api_server *s = c->s;

	if (c->md_values) {
		for (size_t i = 0; i < c->md.count; i++)
			free(c->md_values[i]);
		free(c->md_values);
	}
	grpc_metadata_array_destroy(&c->md);
	grpc_call_details_destroy(&c->details);
	if (c->gc)
		grpc_call_unref(c->gc);
	if (c->ops_out)
		*c->ops_out = NULL;
	if (c->ops_t && c->ops->released)
		c->ops->released(c->ops_t); /* last: it may free what ops_out is in */
	if (c->req)
		protobuf_c_message_free_unpacked(c->req, NULL);
	if (c->recv_buf)
		grpc_byte_buffer_destroy(c->recv_buf);
	for (size_t i = 0; i < c->send_n; i++)
		grpc_byte_buffer_destroy(c->send_q[i]);
	free(c->send_q);
	if (c->status_buf)
		grpc_byte_buffer_destroy(c->status_buf);
	if (c->pending_reply)
		grpc_byte_buffer_destroy(c->pending_reply);
	if (c->has_status_details)
		grpc_slice_unref(c->status_details);
	free(c->pending_msg);
	free(c->peer);
	free(c->method);
	free(c->who);
	free(c->peer_subject);
	if (c->prev)
		c->prev->next = c->next;
	else
		s->calls = c->next;
	if (c->next)
		c->next->prev = c->prev;
	s->n_calls--;
	if (c->wk)
		c->wk->n_calls--;
	free(c);
	maybe_finish_shutdown(s);
}

static void call_unref(struct api_call *c)
{
	if (c->refs <= 0)
		BUG("call %s: reference count %d", c->method, c->refs);
	if (--c->refs == 0)
		call_free(c);
}

/* The call is cancelled: queue on_cancel if the handler wants it. */
static void call_maybe_fire_cancel(struct api_call *c)
{
	if (!c->cancelled || c->ended || !c->on_cancel || c->cancel_queued)
		return;
	c->cancel_queued = true;
	call_defer(c, &c->cancel_tag, 1);
}

static void call_set_cancelled(struct api_call *c)
{
	if (c->cancelled)
		return;
	c->cancelled = true;
	kpl_debug(SUB, "%s: cancelled", c->method);
	call_maybe_fire_cancel(c);
}

static void on_cancel_tag(struct tag *t, int success)
{
	struct api_call *c = tag_call(t);

	if (!c->ended && c->on_cancel)
		c->on_cancel(c, c->cancel_data);
	call_unref(c);
}

static void on_close(struct tag *t, int success)
{
	struct api_call *c = tag_call(t);

	/* After the status went out this is the normal end; before, or with
	 * cancelled set, the client is gone. */
	if (!success || c->close_cancelled)
		call_set_cancelled(c);
	call_unref(c);
}

static void on_status(struct tag *t, int success)
{
	struct api_call *c = tag_call(t);

	if (!success)
		kpl_debug(SUB, "%s: status not sent (client gone)", c->method);
	call_unref(c);
}

/* Copies msg into c->status_details, cut to API_MAX_STATUS_MSG bytes
 * without splitting a UTF-8 sequence. */
static void set_status_details(struct api_call *c, const char *msg)
{
	char buf[API_MAX_STATUS_MSG + 1];
	size_t n;

	if (!msg || !*msg)
		return;
	n = strlen(msg);
	if (n > API_MAX_STATUS_MSG) {
		n = API_MAX_STATUS_MSG;
		while (n > 0 && ((unsigned char)msg[n] & 0xC0) == 0x80)
			n--;
	}
	memcpy(buf, msg, n);
	buf[n] = '\0';
	c->status_details = grpc_slice_from_copied_string(buf);
	c->has_status_details = true;
}

/* Starts the final batch: initial metadata if not yet sent, the reply
 * (unary, may be NULL) and the status. Takes reply. */
static void call_send_status(struct api_call *c, grpc_byte_buffer *reply,
			     int code, const char *msg)
{
	grpc_op ops[3];
	size_t n = 0;

	if (c->ops) {
		/* The transport encodes the reply now (it is borrowed). */
		if (c->ops_t)
			c->ops->end(c->ops_t, c->ops_reply, code, msg);
		return;
	}
	memset(ops, 0, sizeof ops);
	if (!c->md_sent) {
		ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
		n++;
		c->md_sent = true;
	}
	if (reply) {
		c->status_buf = reply;
		ops[n].op = GRPC_OP_SEND_MESSAGE;
		ops[n].data.send_message.send_message = reply;
		n++;
	}
	set_status_details(c, msg);
	ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
	ops[n].data.send_status_from_server.status = (grpc_status_code)code;
	ops[n].data.send_status_from_server.status_details =
		c->has_status_details ? &c->status_details : NULL;
	n++;
	c->status_tag.tag.run = on_status;
	if (!call_batch(c, &c->status_tag, ops, n))
		kpl_warn(SUB, "%s: could not send status %d", c->method, code);
}

/* An ended stream no longer counts against the caps. */
static void stream_release(struct api_call *c)
{
	if (c->counted) {
		c->counted = false;
		c->s->n_streams--;
	}
}

/* Ends the call (exactly once) and drops the handler's reference. */
static void call_end(struct api_call *c, grpc_byte_buffer *reply, int code,
		     const char *msg)
{
	if (c->ended)
		BUG("call %s ended twice", c->method);
	c->ended = true;
	stream_release(c);
	/* The table's path, not the client's: no label the client makes up. */
	metrics_grpc_call(c->m ? c->m->path : "unknown", code);
	kpl_debug(SUB, "%s: end status %d%s%s", c->method, code,
		  msg && *msg ? ": " : "", msg ? msg : "");
	if (c->send_busy) {
		/* One send in flight: the status follows it (on_sent). */
		c->status_pending = true;
		c->pending_code = code;
		c->pending_msg = msg ? kpl_strdup(msg) : NULL;
		c->pending_reply = reply;
	} else {
		call_send_status(c, reply, code, msg);
	}
	call_unref(c);
}

/* Ends a call the handler never saw (it is gone, or refused early). */
static void call_end_quiet(struct api_call *c)
{
	c->ended = true;
	stream_release(c);
	call_unref(c);
}

static void on_sent(struct tag *t, int success)
{
	struct api_call *c = tag_call(t);
	void (*sent)(struct api_call *, bool, void *) = c->sent;

	c->send_busy = false;
	c->sent = NULL;
	if (c->send_failed)
		success = 0;
	c->send_failed = false;
	/* grpc holds its own references to the slices it still writes. */
	for (size_t i = 0; i < c->send_n; i++)
		grpc_byte_buffer_destroy(c->send_q[i]);
	c->send_n = c->send_i = c->send_bytes = 0;
	if (c->status_pending) {
		c->status_pending = false;
		call_send_status(c, c->pending_reply, c->pending_code,
				 c->pending_msg);
		c->pending_reply = NULL;
	}
	/* Every send gets its callback, even after the handler ended the
	 * call (libuv's rule: no free while a callback may still fire). The
	 * send's reference keeps the call valid until it returns. */
	if (sent)
		sent(c, success != 0, c->sent_data);
	call_unref(c);
}

/* Starts send_q[i]: with GRPC_WRITE_BUFFER_HINT unless it is the last
 * queued, so grpc completes it at once (up to its write buffer size,
 * 64 KiB) and writes it with the next ones. */
static grpc_call_error send_start(struct api_call *c, size_t i, bool with_md)
{
	grpc_op ops[2];
	size_t n = 0;

	memset(ops, 0, sizeof ops);
	if (with_md) {
		ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
		n++;
	}
	ops[n].op = GRPC_OP_SEND_MESSAGE;
	/* Never with the initial metadata: chttp2 then starts no write for
	 * the headers, and the batch waits for them for good. */
	ops[n].flags = i + 1 < c->send_n && !with_md ? GRPC_WRITE_BUFFER_HINT : 0;
	ops[n].data.send_message.send_message = c->send_q[i];
	n++;
	return grpc_call_start_batch(c->gc, ops, n, &c->send_tag.tag, NULL);
}

/*
 * Queue thread: one message of a flush completed. Starts the next one, if
 * any and this one went, and keeps the tag (true); otherwise the tag goes
 * to the loop (on_sent). The call's reference for the send is held across
 * the whole chain, and the loop leaves send_q alone until on_sent.
 */
static bool send_chain(struct tag *t, int success)
{
	struct api_call *c = tag_call(t);

	if (!success || c->send_i + 1 >= c->send_n)
		return false;
	c->send_i++;
	if (send_start(c, c->send_i, false) != GRPC_CALL_OK) {
		c->send_failed = true;
		return false;
	}
	return true;
}

static void on_recv(struct tag *t, int success)
{
	struct api_call *c = tag_call(t);
	grpc_byte_buffer *bb = c->recv_buf;
	ProtobufCMessage *msg = NULL;
	enum api_recv_status st;

	c->recv_buf = NULL;
	c->recv_busy = false;
	if (!success || c->cancelled) {
		st = API_RECV_FAILED;
		if (bb)
			grpc_byte_buffer_destroy(bb);
	} else if (!bb) {
		st = API_RECV_END;
	} else {
		msg = unpack_message(c->recv_desc, bb);
		st = msg ? API_RECV_MSG : API_RECV_BADMSG;
	}
	/* Like sends, every read gets its callback. */
	c->recv_fn(c, msg, st, c->recv_data);
	call_unref(c);
}

/*
 * Runs the authorize hook (style: the check lives here, once, so handlers
 * stay thin). Returns false if it ended the call. It runs twice for unary
 * and server-streaming calls: from the metadata alone (req NULL) before
 * the request is read, so no caller without a valid token gets a request
 * decoded, then with the request (a pipeline-limited token's binding).
 */
static bool call_authorize(struct api_call *c, const ProtobufCMessage *req)
{
	struct api_server *s = c->s;
	enum api_scope scope = c->m->scope ? c->m->scope : API_SCOPE_ADMIN;
	char msg[API_MAX_STATUS_MSG];
	int code;

	if (!s->authorize || scope == API_SCOPE_OPEN)
		return true;
	msg[0] = '\0';
	code = s->authorize(c, c->m, scope, api_call_metadata(c, "authorization"), req,
			    s->authorize_data, msg, sizeof msg);
	if (code == GRPC_STATUS_OK)
		return true;
	/* msg never holds the token (the hook's contract). */
	kpl_info(SUB, "%s: refused (status %d): %s", c->method, code, msg);
	call_end(c, NULL, code, msg[0] ? msg : "the call is not allowed");
	return false;
}

/* The request of a unary or server-streaming call arrived. */
static void on_request_msg(struct tag *t, int success)
{
	struct api_call *c = tag_call(t);
	grpc_byte_buffer *bb = c->recv_buf;
	char msg[256];

	c->recv_buf = NULL;
	c->recv_busy = false;
	if (!success) {
		/* Cancelled, or refused by grpc (over the size limit: grpc
		 * already sent RESOURCE_EXHAUSTED). */
		if (bb)
			grpc_byte_buffer_destroy(bb);
		call_end_quiet(c);
	} else if (!bb) {
		call_end(c, NULL, GRPC_STATUS_INVALID_ARGUMENT,
			 "the request has no message");
	} else if (!(c->req = unpack_message(c->m->request, bb))) {
		snprintf(msg, sizeof msg, "request does not decode as %s",
			 c->m->request->name);
		call_end(c, NULL, GRPC_STATUS_INVALID_ARGUMENT, msg);
	} else if (call_authorize(c, c->req)) {
		c->m->handler(c, c->req, c->m->data);
	}
	call_unref(c);
}

static const struct api_method *method_find(struct api_server *s,
					    grpc_slice path)
{
	size_t n = GRPC_SLICE_LENGTH(path);

	for (size_t i = 0; i < s->n_methods; i++)
		if (strlen(s->methods[i].path) == n &&
		    memcmp(s->methods[i].path, GRPC_SLICE_START_PTR(path), n) ==
			    0)
			return &s->methods[i];
	return NULL;
}

/*
 * Counts a streaming call against the caps (total, and per connection: the
 * same grpc peer), or ends it RESOURCE_EXHAUSTED. Streams live long and
 * some need no token (health Watch, reflection): without a cap, one client
 * could hold any number. Returns false if it ended the call.
 */
static bool stream_admit(struct api_call *c)
{
	struct api_server *s = c->s;
	char msg[256];
	size_t on_conn = 0;

	if (!c->peer) {
		char *peer = grpc_call_get_peer(c->gc);
		c->peer = kpl_strdup(peer ? peer : "");
		gpr_free(peer);
	}
	for (const struct api_call *o = s->calls; o; o = o->next)
		if (o != c && o->counted && strcmp(o->peer, c->peer) == 0)
			on_conn++;
	if (s->n_streams >= s->max_streams) {
		snprintf(msg, sizeof msg, "too many open streams: %zu in all, the limit "
			 "(kpld --max-streams)", s->max_streams);
	} else if (on_conn >= s->max_streams_per_conn) {
		snprintf(msg, sizeof msg, "too many open streams on this connection: %zu, "
			 "the limit (kpld --max-streams-per-conn)", s->max_streams_per_conn);
	} else {
		c->counted = true;
		s->n_streams++;
		return true;
	}
	kpl_debug(SUB, "%s from %s: %s", c->method, c->peer, msg);
	call_end(c, NULL, GRPC_STATUS_RESOURCE_EXHAUSTED, msg);
	return false;
}

/* A call arrived: takes r's call, details and metadata. */
static void call_new(struct request *r)
{
	struct api_server *s = r->s;
	struct api_call *c = kpl_calloc(1, sizeof *c);
	grpc_op op;
	char msg[API_MAX_STATUS_MSG];

	c->s = s;
	c->wk = r->wk;
	c->wk->n_calls++;
	c->gc = r->gc;
	c->details = r->details;
	c->md = r->md;
	c->refs = 1;
	c->method = kpl_strndup((const char *)GRPC_SLICE_START_PTR(c->details.method),
				GRPC_SLICE_LENGTH(c->details.method));
	c->m = method_find(s, c->details.method);
	c->close_tag = (struct call_tag){ { on_close, NULL, NULL, 0 }, c };
	c->recv_tag = (struct call_tag){ { on_request_msg, NULL, NULL, 0 }, c };
	c->send_tag = (struct call_tag){ { on_sent, send_chain, NULL, 0 }, c };
	c->status_tag = (struct call_tag){ { on_status, NULL, NULL, 0 }, c };
	c->cancel_tag = (struct call_tag){ { on_cancel_tag, NULL, NULL, 0 }, c };
	c->next = s->calls;
	if (s->calls)
		s->calls->prev = c;
	s->calls = c;
	s->n_calls++;
	r->gc = NULL;
	grpc_call_details_init(&r->details);
	grpc_metadata_array_init(&r->md);
	kpl_debug(SUB, "%s: new call", c->method);

	memset(&op, 0, sizeof op);
	op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
	op.data.recv_close_on_server.cancelled = &c->close_cancelled;
	if (!call_batch(c, &c->close_tag, &op, 1)) {
		call_end_quiet(c);
		return;
	}
	if (s->state != SRV_RUNNING) {
		call_end(c, NULL, GRPC_STATUS_UNAVAILABLE,
			 "the server is shutting down");
		return;
	}
	if (!c->m) {
		snprintf(msg, sizeof msg, "unknown method %.900s", c->method);
		call_end(c, NULL, GRPC_STATUS_UNIMPLEMENTED, msg);
		return;
	}
	if (c->m->type != API_UNARY && !stream_admit(c))
		return;
	if (!call_authorize(c, NULL))
		return;
	if (c->m->type == API_BIDI_STREAM_) {
		c->m->handler(c, NULL, c->m->data);
		return;
	}
	memset(&op, 0, sizeof op);
	op.op = GRPC_OP_RECV_MESSAGE;
	op.data.recv_message.recv_message = &c->recv_buf;
	c->recv_busy = true;
	if (!call_batch(c, &c->recv_tag, &op, 1)) {
		c->recv_busy = false;
		call_end_quiet(c);
	}
}

/* --- Requests for new calls. --- */

static void on_request(struct tag *t, int success)
{
	struct request *r = (struct request *)t;
	struct api_server *s = r->s;

	s->requests_out--;
	if (success && r->gc)
		call_new(r);
	if (s->state == SRV_RUNNING)
		request_arm(r);
	else
		maybe_finish_shutdown(s);
}

/* The queue for the next call: the first with room (API_CQ_FILL), or, all
 * full, the one with the fewest calls. */
static struct cq_worker *cq_pick(struct api_server *s)
{
	struct cq_worker *best = &s->workers[0];

	for (size_t i = 0; i < API_CQS; i++) {
		if (s->workers[i].n_calls < API_CQ_FILL)
			return &s->workers[i];
		if (s->workers[i].n_calls < best->n_calls)
			best = &s->workers[i];
	}
	return best;
}

static void request_arm(struct request *r)
{
	struct api_server *s = r->s;
	grpc_call_error e;

	r->gc = NULL;
	grpc_call_details_destroy(&r->details);
	grpc_metadata_array_destroy(&r->md);
	grpc_call_details_init(&r->details);
	grpc_metadata_array_init(&r->md);
	r->wk = cq_pick(s);
	s->requests_out++;
	e = grpc_server_request_call(s->server, &r->gc, &r->details, &r->md,
				     r->wk->cq, r->wk->cq, &r->tag);
	if (e != GRPC_CALL_OK) {
		s->requests_out--;
		kpl_error(SUB, "grpc_server_request_call: error %d", (int)e);
	}
}

/* --- Start and shutdown. --- */

static void server_free(struct api_server *s)
{
	for (size_t i = 0; i < API_REQUESTS; i++) {
		grpc_call_details_destroy(&s->requests[i].details);
		grpc_metadata_array_destroy(&s->requests[i].md);
	}
	for (size_t i = 0; i < s->n_services; i++)
		free(s->services[i]);
	free(s->services);
	free(s->methods);
	if (s->health)
		api_health_free(s->health);
	if (s->refl)
		api_reflection_free(s->refl);
	free(s);
}

static void on_async_closed(uv_handle_t *h)
{
	struct api_server *s = h->data;
	void (*done)(void *) = s->done;
	void *data = s->done_data;

	uv_mutex_destroy(&s->mu);
	server_free(s);
	grpc_shutdown();
	kpl_info(SUB, "server stopped");
	if (done)
		done(data);
}

static void on_exit_tag(struct tag *t, int success)
{
	struct cq_worker *wk =
		(struct cq_worker *)((char *)t - offsetof(struct cq_worker, exit_tag));
	struct api_server *s = wk->s;

	/* The thread queued this as its last act: joining waits only for it to
	 * return. */
	uv_thread_join(&wk->thread);
	grpc_completion_queue_destroy(wk->cq);
	wk->cq = NULL;
	if (++s->workers_exited == API_CQS)
		uv_close((uv_handle_t *)&s->async, on_async_closed);
}

static void maybe_finish_shutdown(struct api_server *s)
{
	if (s->state != SRV_STOPPING || !s->shutdown_notified || s->cq_shut ||
	    s->n_calls > 0 || s->requests_out > 0)
		return;
	s->cq_shut = true;
	grpc_server_destroy(s->server);
	s->server = NULL;
	for (size_t i = 0; i < API_CQS; i++)
		grpc_completion_queue_shutdown(s->workers[i].cq);
}

static void on_shutdown_notified(struct tag *t, int success)
{
	struct api_server *s = (struct api_server *)((char *)t -
		offsetof(struct api_server, shutdown_tag));

	s->shutdown_notified = true;
	maybe_finish_shutdown(s);
}

void api_server_shutdown(struct api_server *s, void (*done)(void *data),
			 void *data)
{
	if (s->state != SRV_RUNNING)
		BUG("api_server_shutdown called twice");
	kpl_info(SUB, "server shutting down (%zu calls in flight)", s->n_calls);
	s->state = SRV_STOPPING;
	s->done = done;
	s->done_data = data;
	grpc_server_shutdown_and_notify(s->server, s->workers[0].cq, &s->shutdown_tag);
	grpc_server_cancel_all_calls(s->server);
	/* grpc cancels too, but not necessarily before a handler that is
	 * between batches would notice: tell them all now. */
	for (struct api_call *c = s->calls; c; c = c->next)
		call_set_cancelled(c);
}

/* "/pkg.Svc/Method" -> "pkg.Svc" (malloc'd), or NULL if malformed. */
static char *path_service(const char *path)
{
	const char *slash;

	if (!path || path[0] != '/')
		return NULL;
	slash = strchr(path + 1, '/');
	if (!slash || slash == path + 1 || !slash[1] || strchr(slash + 1, '/'))
		return NULL;
	return kpl_strndup(path + 1, (size_t)(slash - path - 1));
}

static int add_method(struct api_server *s, const struct api_method *m,
		      struct kpl_err *err)
{
	char *svc = path_service(m->path);
	size_t i;

	if (!svc)
		return kpl_errf(err, KPL_EINVAL,
				"method path \"%s\": want \"/package.Service/Method\"",
				m->path ? m->path : "(null)");
	if (!m->handler ||
	    (m->type != API_BIDI_STREAM_ && !m->request)) {
		free(svc);
		return kpl_errf(err, KPL_EINVAL,
				"method %s: handler and request type are required",
				m->path);
	}
	for (i = 0; i < s->n_methods; i++)
		if (strcmp(s->methods[i].path, m->path) == 0) {
			free(svc);
			return kpl_errf(err, KPL_EEXISTS,
					"method %s registered twice", m->path);
		}
	s->methods[s->n_methods++] = *m;
	for (i = 0; i < s->n_services; i++)
		if (strcmp(s->services[i], svc) == 0)
			break;
	if (i < s->n_services)
		free(svc);
	else
		s->services[s->n_services++] = svc;
	return 0;
}

/* Reads a whole PEM file; *out is malloc'd and NUL-terminated. */
static int read_pem(const char *what, const char *path, char **out, struct kpl_err *err)
{
	FILE *f = fopen(path, "rb");
	size_t len = 0, cap = 0, n;
	char *buf = NULL;

	*out = NULL;
	if (!f)
		return kpl_errf(err, KPL_EIO, "%s %s: %s", what, path, strerror(errno));
	do {
		if (cap - len < 4096)
			buf = kpl_realloc(buf, cap = cap * 2 + 4096);
		n = fread(buf + len, 1, cap - len - 1, f);
		len += n;
	} while (n > 0 && len < (1u << 20));
	if (ferror(f) || len == 0 || len >= (1u << 20)) {
		fclose(f);
		free(buf);
		return kpl_errf(err, KPL_EIO, "%s %s: empty, unreadable or over 1 MiB", what, path);
	}
	fclose(f);
	buf[len] = '\0';
	if (!strstr(buf, "-----BEGIN ")) {
		free(buf);
		return kpl_errf(err, KPL_EINVAL, "%s %s: not a PEM file", what, path);
	}
	*out = buf;
	return 0;
}

/* Plaintext, TLS, or TLS that requires and verifies client certificates. */
static int server_creds(struct api_server *s, const struct api_server_options *opt,
			grpc_server_credentials **out, struct kpl_err *err)
{
	grpc_ssl_pem_key_cert_pair pair;
	char *cert = NULL, *key = NULL, *ca = NULL;
	int rc;

	*out = NULL;
	if (!opt->tls_cert_file && !opt->tls_key_file && !opt->client_ca_file) {
		*out = grpc_insecure_server_credentials_create();
		return 0;
	}
	if (!opt->tls_cert_file || !opt->tls_key_file)
		return kpl_errf(err, KPL_EINVAL, "TLS needs both a certificate and a key%s",
				opt->client_ca_file ? " (a client CA alone is not enough)" : "");
	if ((rc = read_pem("TLS certificate", opt->tls_cert_file, &cert, err)) < 0 ||
	    (rc = read_pem("TLS key", opt->tls_key_file, &key, err)) < 0 ||
	    (opt->client_ca_file &&
	     (rc = read_pem("client CA", opt->client_ca_file, &ca, err)) < 0))
		goto fail;
	pair.private_key = key;
	pair.cert_chain = cert;
	*out = grpc_ssl_server_credentials_create_ex(
		ca, &pair, 1,
		ca ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
		   : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE,
		NULL);
	if (!*out) {
		rc = kpl_errf(err, KPL_EINVAL, "TLS: grpc refused the certificate or key (%s, %s)",
			      opt->tls_cert_file, opt->tls_key_file);
		goto fail;
	}
	s->mtls = ca != NULL;
	rc = 0;
fail:
	free(cert);
	/* The key's bytes are secret: wipe them before giving the memory back. */
	if (key) {
		memset(key, 0, strlen(key));
		free(key);
	}
	free(ca);
	return rc;
}

int api_server_start(uv_loop_t *loop, const struct api_server_options *opt,
		     struct api_server **out, struct kpl_err *err)
{
	struct api_server *s;
	grpc_server_credentials *creds;
	int rc;
	grpc_arg args[8];
	grpc_channel_args chargs = { KPL_ARRAY_SIZE(args), args };
	size_t n_builtin = 4;

	*out = NULL;
	if (!opt->listen || !*opt->listen)
		return kpl_errf(err, KPL_EINVAL, "listen: no address");
	grpc_init();
	s = kpl_calloc(1, sizeof *s);
	s->loop = loop;
	s->shutdown_tag.run = on_shutdown_notified;
	for (size_t i = 0; i < API_CQS; i++) {
		s->workers[i].s = s;
		s->workers[i].exit_tag.run = on_exit_tag;
	}
	for (size_t i = 0; i < API_REQUESTS; i++) {
		s->requests[i].tag.run = on_request;
		s->requests[i].s = s;
		grpc_call_details_init(&s->requests[i].details);
		grpc_metadata_array_init(&s->requests[i].md);
	}

	s->methods = kpl_calloc(opt->n_methods + n_builtin, sizeof *s->methods);
	s->services = kpl_calloc(opt->n_methods + n_builtin, sizeof *s->services);
	for (size_t i = 0; i < opt->n_methods; i++)
		if ((rc = add_method(s, &opt->methods[i], err)) < 0)
			goto fail;
	s->health = api_health_new(s);
	if ((rc = api_reflection_new(s, &s->refl, err)) < 0)
		goto fail;
	{
		const struct api_method builtin[] = {
			{ HEALTH_CHECK, API_UNARY,
			  &grpc__health__v1__health_check_request__descriptor,
			  api_health_check, s->health, API_SCOPE_OPEN },
			{ HEALTH_WATCH, API_SERVER_STREAM,
			  &grpc__health__v1__health_check_request__descriptor,
			  api_health_watch, s->health, API_SCOPE_OPEN },
			{ REFLECTION_V1ALPHA, API_BIDI_STREAM_, NULL,
			  api_reflection_info, s->refl, API_SCOPE_OPEN },
			{ REFLECTION_V1, API_BIDI_STREAM_, NULL,
			  api_reflection_info, s->refl, API_SCOPE_OPEN },
		};
		for (size_t i = 0; i < KPL_ARRAY_SIZE(builtin); i++)
			if ((rc = add_method(s, &builtin[i], err)) < 0)
				goto fail;
	}

	args[0].type = GRPC_ARG_INTEGER;
	args[0].key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
	args[0].value.integer = KPL_MAX_GRPC_MESSAGE_BYTES;
	/* Keepalive: ping idle connections every minute, without limit on
	 * pings between data frames, so a vanished watcher is found within
	 * ~1.5 min; let clients ping every 10 s, even without calls, without
	 * being sent away. */
	args[1].type = GRPC_ARG_INTEGER;
	args[1].key = GRPC_ARG_KEEPALIVE_TIME_MS;
	args[1].value.integer = 60 * 1000;
	args[2].type = GRPC_ARG_INTEGER;
	args[2].key = GRPC_ARG_KEEPALIVE_TIMEOUT_MS;
	args[2].value.integer = 20 * 1000;
	args[3].type = GRPC_ARG_INTEGER;
	args[3].key = GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS;
	args[3].value.integer = 1;
	args[4].type = GRPC_ARG_INTEGER;
	args[4].key = GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS;
	args[4].value.integer = 10 * 1000;
	args[5].type = GRPC_ARG_INTEGER;
	args[5].key = GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA;
	args[5].value.integer = 0;
	/* grpc sets SO_REUSEPORT by default: a second kpld on the same port
	 * would then start and share the traffic instead of failing. */
	args[6].type = GRPC_ARG_INTEGER;
	args[6].key = GRPC_ARG_ALLOW_REUSEPORT;
	args[6].value.integer = 0;
	args[7].type = GRPC_ARG_INTEGER;
	args[7].key = GRPC_ARG_MAX_CONCURRENT_STREAMS;
	args[7].value.integer = (int)(opt->max_streams_per_conn + 16 > API_MIN_H2_STREAMS
				      ? opt->max_streams_per_conn + 16 : API_MIN_H2_STREAMS);

	s->server = grpc_server_create(&chargs, NULL);
	for (size_t i = 0; i < API_CQS; i++) {
		s->workers[i].cq = grpc_completion_queue_create_for_next(NULL);
		grpc_server_register_completion_queue(s->server, s->workers[i].cq, NULL);
	}

	s->authorize = opt->authorize;
	s->authorize_data = opt->authorize_data;
	s->max_streams = opt->max_streams ? opt->max_streams : API_DEFAULT_MAX_STREAMS;
	s->max_streams_per_conn = opt->max_streams_per_conn ? opt->max_streams_per_conn
							    : API_DEFAULT_MAX_STREAMS_PER_CONN;
	if ((rc = server_creds(s, opt, &creds, err)) < 0)
		goto fail;
	s->port = grpc_server_add_http2_port(s->server, opt->listen, creds);
	grpc_server_credentials_release(creds);
	if (s->port <= 0) {
		rc = kpl_errf(err, KPL_EIO,
			      "listen %s: cannot bind (address in use, or not host:port)",
			      opt->listen);
		goto fail;
	}
	grpc_server_start(s->server);

	if (uv_mutex_init(&s->mu) != 0)
		BUG("uv_mutex_init failed");
	if ((rc = uv_async_init(loop, &s->async, on_async)) < 0)
		BUG("uv_async_init: %s", uv_strerror(rc));
	s->async.data = s;
	for (size_t i = 0; i < API_REQUESTS; i++)
		request_arm(&s->requests[i]);
	for (size_t i = 0; i < API_CQS; i++)
		if ((rc = uv_thread_create(&s->workers[i].thread, cq_thread, &s->workers[i])) < 0)
			BUG("uv_thread_create: %s", uv_strerror(rc));
	kpl_info(SUB, "listening on %s (port %d, %s)", opt->listen, s->port,
		 s->mtls ? "TLS, client certificates required"
			 : opt->tls_cert_file ? "TLS" : "plaintext");
	*out = s;
	return 0;

fail:
	if (s->server) {
		/* Never started and no call: shutdown completes at once, and
		 * nothing else is on the queue (no loop runs yet). */
		grpc_server_shutdown_and_notify(s->server, s->workers[0].cq, &s->shutdown_tag);
		for (size_t i = 0; i < API_CQS; i++) {
			grpc_completion_queue_shutdown(s->workers[i].cq);
			while (grpc_completion_queue_next(s->workers[i].cq,
							  gpr_inf_future(GPR_CLOCK_REALTIME),
							  NULL).type != GRPC_QUEUE_SHUTDOWN)
				;
		}
		grpc_server_destroy(s->server);
		for (size_t i = 0; i < API_CQS; i++)
			grpc_completion_queue_destroy(s->workers[i].cq);
	}
	server_free(s);
	grpc_shutdown();
	return rc;
}

int api_server_port(struct api_server *s)
{
	return s->port;
}

void api_server_set_serving(struct api_server *s, bool serving)
{
	if (s->serving == serving)
		return;
	s->serving = serving;
	api_health_changed(s->health);
}

size_t api_server_services(struct api_server *s, const char *const **names)
{
	*names = (const char *const *)s->services;
	return s->n_services;
}

bool api_server_has_service(struct api_server *s, const char *name)
{
	for (size_t i = 0; i < s->n_services; i++)
		if (strcmp(s->services[i], name) == 0)
			return true;
	return false;
}

bool api_server_serving(struct api_server *s)
{
	return s->serving;
}

/* --- Ending and streaming a call. --- */

void api_call_reply(struct api_call *call, const ProtobufCMessage *resp)
{
	if (call->ops) {
		call->ops_reply = resp;
		call_end(call, NULL, GRPC_STATUS_OK, NULL);
		return;
	}
	call_end(call, pack_message(resp), GRPC_STATUS_OK, NULL);
}

void api_call_fail(struct api_call *call, int code, const char *msg)
{
	if (code == GRPC_STATUS_OK) {
		kpl_warn(SUB, "%s: api_call_fail with status OK; sending UNKNOWN",
			 call->method);
		code = GRPC_STATUS_UNKNOWN;
	}
	call_end(call, NULL, code, msg);
}

void api_call_fail_err(struct api_call *call, const struct kpl_err *err)
{
	int code = err->code ? kpl_err_grpc_status(err->code) : GRPC_STATUS_UNKNOWN;

	api_call_fail(call, code, err->msg[0] ? err->msg : kpl_strerror(err->code));
}

size_t api_call_push(struct api_call *call, const ProtobufCMessage *msg)
{
	size_t n = protobuf_c_message_get_packed_size(msg);
	grpc_slice sl;

	if (call->ended)
		BUG("%s: api_call_push after the call ended", call->method);
	if (call->send_busy)
		BUG("%s: api_call_push with a send in flight", call->method);
	if (call->ops)
		return call->ops_t ? call->ops->push(call->ops_t, msg) : 0;
	if (call->send_n == call->send_cap) {
		call->send_cap = call->send_cap ? call->send_cap * 2 : 4;
		call->send_q = kpl_realloc(call->send_q, call->send_cap * sizeof *call->send_q);
	}
	sl = grpc_slice_malloc(n);
	protobuf_c_message_pack(msg, GRPC_SLICE_START_PTR(sl));
	call->send_q[call->send_n++] = grpc_raw_byte_buffer_create(&sl, 1);
	grpc_slice_unref(sl);
	/* grpc's frame header is 5 bytes. */
	call->send_bytes += n + 5;
	return call->send_bytes;
}

size_t api_call_push_encoded(struct api_call *call, grpc_slice wire,
			     const ProtobufCMessage *msg)
{
	if (call->ended)
		BUG("%s: api_call_push_encoded after the call ended", call->method);
	if (call->send_busy)
		BUG("%s: api_call_push_encoded with a send in flight", call->method);
	if (call->ops)
		return call->ops_t && msg ? call->ops->push(call->ops_t, msg) : 0;
	if (call->send_n == call->send_cap) {
		call->send_cap = call->send_cap ? call->send_cap * 2 : 4;
		call->send_q = kpl_realloc(call->send_q, call->send_cap * sizeof *call->send_q);
	}
	/* The buffer takes its own reference to the shared bytes. */
	call->send_q[call->send_n++] = grpc_raw_byte_buffer_create(&wire, 1);
	call->send_bytes += GRPC_SLICE_LENGTH(wire) + 5;
	return call->send_bytes;
}

bool api_call_is_grpc(struct api_call *call)
{
	return call->ops == NULL;
}

void api_call_flush(struct api_call *call,
		    void (*sent)(struct api_call *call, bool ok, void *data),
		    void *data)
{
	bool with_md;

	if (call->ended)
		BUG("%s: api_call_flush after the call ended", call->method);
	if (call->send_busy)
		BUG("%s: api_call_flush with a send in flight", call->method);
	if (call->send_n == 0 && !call->ops)
		BUG("%s: api_call_flush with nothing queued", call->method);
	call->send_busy = true;
	call->sent = sent;
	call->sent_data = data;
	call->send_i = 0;
	call->send_failed = false;
	if (call->cancelled || (call->ops && !call->ops_t)) {
		call_defer(call, &call->send_tag, 0);
		return;
	}
	if (call->ops) {
		call->refs++; /* the send's, until api_call_sent */
		call->ops_flushing = true;
		call->ops->flush(call->ops_t);
		return;
	}
	with_md = !call->md_sent;
	call->md_sent = true;
	call->refs++; /* the send's, held across the whole chain */
	if (send_start(call, 0, with_md) != GRPC_CALL_OK) {
		kpl_warn(SUB, "%s: grpc_call_start_batch refused a send", call->method);
		call->refs--;
		call_defer(call, &call->send_tag, 0);
	}
}

void api_call_send(struct api_call *call, const ProtobufCMessage *msg,
		   void (*sent)(struct api_call *call, bool ok, void *data),
		   void *data)
{
	api_call_push(call, msg);
	api_call_flush(call, sent, data);
}

void api_call_finish(struct api_call *call, int code, const char *msg)
{
	call_end(call, NULL, code, msg);
}

bool api_call_cancelled(struct api_call *call)
{
	return call->cancelled;
}

void api_call_on_cancel(struct api_call *call,
			void (*fn)(struct api_call *call, void *data),
			void *data)
{
	call->on_cancel = fn;
	call->cancel_data = data;
	call_maybe_fire_cancel(call);
}

const char *api_call_metadata(struct api_call *call, const char *key)
{
	size_t klen = strlen(key);

	if (call->ops)
		return call->ops_t ? call->ops->metadata(call->ops_t, key) : NULL;
	for (size_t i = 0; i < call->md.count; i++) {
		const grpc_metadata *md = &call->md.metadata[i];
		if (GRPC_SLICE_LENGTH(md->key) != klen ||
		    memcmp(GRPC_SLICE_START_PTR(md->key), key, klen) != 0)
			continue;
		if (!call->md_values)
			call->md_values = kpl_calloc(call->md.count,
						     sizeof *call->md_values);
		if (!call->md_values[i])
			call->md_values[i] = kpl_strndup(
				(const char *)GRPC_SLICE_START_PTR(md->value),
				GRPC_SLICE_LENGTH(md->value));
		return call->md_values[i];
	}
	return NULL;
}

const char *api_call_method(struct api_call *call)
{
	return call->method;
}

const char *api_call_who(struct api_call *call)
{
	return call->who ? call->who : "local";
}

void api_call_set_who(struct api_call *call, const char *who)
{
	free(call->who);
	call->who = kpl_strdup(who);
}

const char *api_call_peer_subject(struct api_call *call)
{
	grpc_auth_context *ctx;
	grpc_auth_property_iterator it;
	const grpc_auth_property *p;

	if (call->peer_read || !call->s->mtls || !call->gc)
		return call->peer_subject;
	call->peer_read = true;
	if (!(ctx = grpc_call_auth_context(call->gc)))
		return NULL;
	it = grpc_auth_context_find_properties_by_name(ctx, GRPC_X509_SUBJECT_PROPERTY_NAME);
	if ((p = grpc_auth_property_iterator_next(&it)) != NULL && p->value)
		call->peer_subject = kpl_strndup(p->value, p->value_length);
	grpc_auth_context_release(ctx);
	return call->peer_subject;
}

void api_call_recv(struct api_call *call,
		   const ProtobufCMessageDescriptor *desc,
		   void (*fn)(struct api_call *call, ProtobufCMessage *msg,
			      enum api_recv_status st, void *data),
		   void *data)
{
	grpc_op op;

	if (call->ended)
		BUG("%s: api_call_recv after the call ended", call->method);
	if (call->recv_busy)
		BUG("%s: api_call_recv with a read in flight", call->method);
	call->recv_busy = true;
	call->recv_desc = desc;
	call->recv_fn = fn;
	call->recv_data = data;
	call->recv_tag.tag.run = on_recv;
	if (call->cancelled) {
		call_defer(call, &call->recv_tag, 0);
		return;
	}
	memset(&op, 0, sizeof op);
	op.op = GRPC_OP_RECV_MESSAGE;
	op.data.recv_message.recv_message = &call->recv_buf;
	if (!call_batch(call, &call->recv_tag, &op, 1))
		call_defer(call, &call->recv_tag, 0);
}

/* --- Other transports. --- */

const struct api_method *api_server_method(struct api_server *s, const char *path)
{
	for (size_t i = 0; i < s->n_methods; i++)
		if (strcmp(s->methods[i].path, path) == 0)
			return &s->methods[i];
	return NULL;
}

/*
 * The same steps as a grpc call's (call_new, on_request_msg): refused while
 * shutting down, counted against the stream caps, authorized from the
 * metadata alone and then with the request, then handed to the handler.
 */
void api_call_start(struct api_server *s, const struct api_method *m,
		    ProtobufCMessage *req, const char *peer,
		    const struct api_call_ops *ops, void *t, struct api_call **out)
{
	struct api_call *c = kpl_calloc(1, sizeof *c);

	c->s = s;
	c->ops = ops;
	c->ops_t = t;
	c->ops_out = out;
	*out = c;
	grpc_call_details_init(&c->details);
	grpc_metadata_array_init(&c->md);
	c->refs = 2; /* the handler's, and ours until the end of this function */
	c->method = kpl_strdup(m->path);
	c->m = m;
	c->req = req;
	c->peer = kpl_strdup(peer ? peer : "");
	c->send_tag = (struct call_tag){ { on_sent, NULL, NULL, 0 }, c };
	c->cancel_tag = (struct call_tag){ { on_cancel_tag, NULL, NULL, 0 }, c };
	c->next = s->calls;
	if (s->calls)
		s->calls->prev = c;
	s->calls = c;
	s->n_calls++;
	kpl_debug(SUB, "%s: new call from %s", c->method, c->peer);
	if (m->type == API_BIDI_STREAM_)
		call_end(c, NULL, GRPC_STATUS_UNIMPLEMENTED, "not served over this transport");
	else if (s->state != SRV_RUNNING)
		call_end(c, NULL, GRPC_STATUS_UNAVAILABLE, "the server is shutting down");
	else if ((m->type == API_UNARY || stream_admit(c)) && call_authorize(c, NULL) &&
		 call_authorize(c, c->req))
		m->handler(c, c->req, m->data);
	call_unref(c);
}

void api_call_sent(struct api_call *call, bool ok)
{
	if (!call->ops_flushing)
		BUG("%s: api_call_sent without a flush", call->method);
	call->ops_flushing = false;
	on_sent(&call->send_tag.tag, ok ? 1 : 0);
}

void api_call_detach(struct api_call *call)
{
	call->ops_t = NULL;
	call->ops_out = NULL;
	if (call->ops_flushing) {
		/* The transport will not say: the send failed. */
		call->ops_flushing = false;
		ready_push(call->s, &call->send_tag.tag, 0);
	}
	call_set_cancelled(call);
}
