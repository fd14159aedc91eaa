/*
 * server_internal.h - what the gRPC server core (server.c) shares with the
 * services it serves itself: health (health.c) and reflection
 * (reflection.c). Not for users of api/server.h.
 *
 * Threads: loop thread only, like server.h.
 */
#ifndef KPL_API_SERVER_INTERNAL_H
#define KPL_API_SERVER_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>

#include "api/server.h"

/* --- Core services to the built-in ones. --- */

/*
 * The distinct services the server serves ("kpl.v1.Pipelines",
 * "grpc.health.v1.Health", ...), in registration order. Borrowed, valid until
 * the server is freed.
 */
size_t api_server_services(struct api_server *s, const char *const **names);

/* True if name is one of api_server_services. */
bool api_server_has_service(struct api_server *s, const char *name);

/* The value of the last api_server_set_serving (false at start). */
bool api_server_serving(struct api_server *s);

/*
 * Built-in methods only: a bidirectional stream. The handler is called with
 * req == NULL as soon as the call arrives and reads with api_call_recv.
 */
#define API_BIDI_STREAM_ ((enum api_method_type)100)

enum api_recv_status {
	API_RECV_MSG,    /* msg is the next request (owned by fn's callee) */
	API_RECV_END,    /* the client half-closed: no more requests */
	API_RECV_FAILED, /* the call is gone (cancelled, shutdown) */
	API_RECV_BADMSG, /* a message came but does not decode as desc */
};

/*
 * Bidi streams: reads the next request message. At most one read may be
 * outstanding. fn runs on the loop; on API_RECV_MSG it owns msg (free with
 * protobuf_c_message_free_unpacked(msg, NULL)), otherwise msg is NULL. Like
 * api_call_send's sent, fn is called exactly once, even if the handler ended
 * the call meanwhile (then it must not end it again).
 */
void api_call_recv(struct api_call *call,
		   const ProtobufCMessageDescriptor *desc,
		   void (*fn)(struct api_call *call, ProtobufCMessage *msg,
			      enum api_recv_status st, void *data),
		   void *data);

/* --- Health (health.c). --- */

struct api_health;

struct api_health *api_health_new(struct api_server *s);
/* Frees h; every Watch call must have ended (shutdown cancels them). */
void api_health_free(struct api_health *h);
/* The server's serving state changed: Watch calls send the new status. */
void api_health_changed(struct api_health *h);
void api_health_check(struct api_call *call, const ProtobufCMessage *req,
		      void *data);
void api_health_watch(struct api_call *call, const ProtobufCMessage *req,
		      void *data);

/* --- Reflection (reflection.c). --- */

struct api_reflection;

/*
 * Decodes the embedded descriptor set and indexes it. Fails (KPL_ECORRUPT)
 * only if the embedded set does not decode, which is a build bug.
 */
int api_reflection_new(struct api_server *s, struct api_reflection **out,
		       struct kpl_err *err);
void api_reflection_free(struct api_reflection *r);
/* The ServerReflectionInfo handler (v1alpha and v1); API_BIDI_STREAM_. */
void api_reflection_info(struct api_call *call, const ProtobufCMessage *req,
			 void *data);

#endif
