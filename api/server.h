/*
 * server.h - kpld's gRPC server: grpc core's completion queue drained on its
 * own thread and handed to the libuv loop, so every handler, and every byte
 * of engine state, is touched on the loop thread only.
 *
 * Methods are data: a table of struct api_method, each with its full path,
 * request type and handler. The server decodes requests with protobuf-c
 * (refusing ones over KPL_MAX_GRPC_MESSAGE_BYTES), calls the handler on the
 * loop, and encodes what the handler sends. It also serves
 * grpc.health.v1.Health and grpc.reflection.v1alpha/v1.ServerReflection from
 * the descriptor set embedded at build time.
 *
 * Threads: every function here is loop-thread only.
 */
#ifndef KPL_API_SERVER_H
#define KPL_API_SERVER_H

#include <grpc/slice.h>
#include <protobuf-c/protobuf-c.h>
#include <stdbool.h>
#include <uv.h>

#include "base/kpl.h"

struct api_server; /* opaque */
struct api_call;   /* one RPC in flight; owned by the server */

enum api_method_type {
	API_UNARY,         /* one request, one response */
	API_SERVER_STREAM, /* one request, a stream of responses */
};

/*
 * A handler receives the decoded request (owned by the call, valid until the
 * call ends) and must end the call exactly once, now or later, with
 * api_call_reply (unary), api_call_finish (stream) or api_call_fail (both).
 */
typedef void (*api_handler_fn)(struct api_call *call,
			       const ProtobufCMessage *req, void *data);

/*
 * What a caller's token must allow for a method (docs/security.md). The
 * token scopes are ordered (values as kpl.v1.TokenScope): each allows what
 * the ones below it allow. API_SCOPE_OPEN needs no token at all (health,
 * reflection). A method that leaves scope 0 (API_SCOPE_UNSET) is treated as
 * API_SCOPE_ADMIN: a new method stays closed until someone decides.
 */
enum api_scope {
	API_SCOPE_UNSET = 0,
	API_SCOPE_READ = 1,
	API_SCOPE_SUBMIT = 2,
	API_SCOPE_APPROVE = 3,
	API_SCOPE_ADMIN = 4,
	API_SCOPE_OPEN = 100,
};

/*
 * What a request is about, for tokens limited to one pipeline
 * (docs/security.md): the authorize hook reads the named field and lets a
 * limited token through only when it is about the token's pipeline. A
 * method that leaves bind 0 (API_BIND_NONE) is about no one pipeline and
 * is refused to every limited token: a new method stays closed to them
 * until someone decides.
 */
enum api_bind {
	API_BIND_NONE = 0,
	API_BIND_RUN = 1,    /* "id" or "run_id": a stored run, of that pipeline */
	API_BIND_TEXT = 2,   /* "pipeline": a pipeline file whose name is that one */
	API_BIND_FILTER = 3, /* "pipeline_name": a filter, set to that pipeline */
	API_BIND_NAME = 4,   /* "name": the registered pipeline of that name */
	API_BIND_SELF = 5,   /* about the caller itself (WhoAmI): every token */
};

struct api_method {
	const char *path; /* "/kpl.v1.Pipelines/SubmitRun" */
	enum api_method_type type;
	const ProtobufCMessageDescriptor *request;
	api_handler_fn handler;
	void *data;
	enum api_scope scope;
	enum api_bind bind;
};

/*
 * Decides whether a call may go on. Runs on the loop for every method that
 * is not API_SCOPE_OPEN: first as the call arrives, with req NULL, before
 * its request is read (decide what the metadata alone decides; let through
 * what needs the request), then for unary and server-streaming methods
 * again once the request has decoded, before the handler sees it. scope is
 * the method's (API_SCOPE_UNSET already made API_SCOPE_ADMIN);
 * authorization is the call's "authorization" metadata or NULL; req is the
 * decoded request (borrowed) or NULL. Returns 0 (GRPC_STATUS_OK)
 * to let the call through, or the grpc status to end it with, with msg
 * (NUL-terminated, at most msg_size bytes) saying why. msg must never hold
 * the token. It may name the caller with api_call_set_who.
 */
typedef int (*api_authorize_fn)(struct api_call *call, const struct api_method *m,
				enum api_scope scope, const char *authorization,
				const ProtobufCMessage *req, void *data, char *msg,
				size_t msg_size);

struct api_server_options {
	const char *listen;  /* "127.0.0.1:7070"; port 0 picks a free port */
	const struct api_method *methods;
	size_t n_methods;
	/* NULL: every call goes through, and its who is "local". */
	api_authorize_fn authorize;
	void *authorize_data;
	/* PEM files. With tls_cert_file and tls_key_file the port serves TLS
	 * only; client_ca_file (needs them) also requires every client to
	 * present a certificate that CA signed. All NULL: plaintext. */
	const char *tls_cert_file;
	const char *tls_key_file;
	const char *client_ca_file;
	/* Streaming calls (server streams and the built-in bidi ones: health
	 * Watch, reflection) open at once, in all and on one client connection
	 * (grpc's peer address and port); more are answered RESOURCE_EXHAUSTED
	 * before anything else is done for them. 0 picks the default (1024,
	 * 32). */
	size_t max_streams;
	size_t max_streams_per_conn;
};

/*
 * Creates the server, binds the address and starts the completion-queue
 * thread. Health reports NOT_SERVING until api_server_set_serving.
 * On success *out is the caller's; it ends with api_server_shutdown.
 * Errors name the address ("listen 127.0.0.1:7070: address in use ...").
 */
int api_server_start(uv_loop_t *loop, const struct api_server_options *opt,
		     struct api_server **out, struct kpl_err *err);

/* The port actually bound (useful with port 0). */
int api_server_port(struct api_server *s);

/* Sets the health status of "" and every served service. */
void api_server_set_serving(struct api_server *s, bool serving);

/*
 * Stops accepting calls, cancels the ones in flight (their handlers see
 * api_call_cancelled and must still end them), waits for grpc to hand back
 * every tag, joins the thread and frees the server; then calls done(data) on
 * the loop. The loop must keep running until then.
 */
void api_server_shutdown(struct api_server *s, void (*done)(void *data),
			 void *data);

/* --- Ending and streaming a call. --- */

/* Sends resp (serialized at once; caller keeps ownership) and status OK. */
void api_call_reply(struct api_call *call, const ProtobufCMessage *resp);

/*
 * Ends the call with a non-OK status. code is a grpc_status_code; msg is a
 * message a person can act on (copied).
 */
void api_call_fail(struct api_call *call, int code, const char *msg);

/* Ends the call with the status a KPL_E* code maps to and err's message. */
void api_call_fail_err(struct api_call *call, const struct kpl_err *err);

/*
 * Server streaming: sends one message (serialized at once). At most one send
 * may be outstanding: sent(call, ok, data) is called on the loop when grpc has
 * taken it (ok false: the client is gone; stop sending and finish). It is
 * called once for every send, also when the call ended (finish, fail) while
 * the send was in flight: then call is still valid during the callback but
 * must not be ended again, and the handler frees its state there.
 */
void api_call_send(struct api_call *call, const ProtobufCMessage *msg,
		   void (*sent)(struct api_call *call, bool ok, void *data),
		   void *data);

/*
 * Server streaming, several messages per wake-up: api_call_push serializes
 * msg (caller keeps ownership) onto the call's queue and returns the bytes
 * queued so far; api_call_flush sends the queue in order and calls sent
 * once, on the loop, when grpc has taken every message of it (ok false: the
 * client is gone, or went partway through; stop sending and finish).
 * api_call_send is a push and a flush. The rules of api_call_send hold for
 * a flush (one outstanding; sent also after the call ended); push only
 * while no flush is outstanding, and flush a non-empty queue. All but the
 * last message go with GRPC_WRITE_BUFFER_HINT, and the completion-queue
 * thread starts each next one itself: grpc writes the batch with few
 * syscalls and the loop wakes once per flush. A slow client holds one
 * queue of memory per call, so keep flushes bounded (tens of KiB).
 */
size_t api_call_push(struct api_call *call, const ProtobufCMessage *msg);
/*
 * api_call_push of a message already encoded: wire is its serialized bytes,
 * shared (the call takes its own reference, so one encoding can go to many
 * calls: api/fanout.h); msg is the same message decoded, for a transport
 * that needs it (the HTTP API's SSE, api_call_start), or NULL if wire is
 * enough (a grpc call). Borrowed for the call only.
 */
size_t api_call_push_encoded(struct api_call *call, grpc_slice wire,
			     const ProtobufCMessage *msg);
/* True if the call is grpc's (wire bytes are enough for
 * api_call_push_encoded); false for another transport. */
bool api_call_is_grpc(struct api_call *call);
void api_call_flush(struct api_call *call,
		    void (*sent)(struct api_call *call, bool ok, void *data),
		    void *data);

/* Ends a streaming call with OK (code 0) or another status. */
void api_call_finish(struct api_call *call, int code, const char *msg);

/* True once the client has gone away or the server is shutting down. */
bool api_call_cancelled(struct api_call *call);

/*
 * Registers fn to be called (once, on the loop) when the client goes away or
 * the server shuts down before the handler ended the call. The handler must
 * still end the call (api_call_finish/fail) afterwards, which frees it.
 */
void api_call_on_cancel(struct api_call *call,
			void (*fn)(struct api_call *call, void *data),
			void *data);

/*
 * Metadata value sent by the client for key (lowercase), or NULL. Borrowed,
 * valid until the call ends; not NUL-safe for binary ("-bin") keys.
 */
const char *api_call_metadata(struct api_call *call, const char *key);

/* The method path of the call ("/kpl.v1.Pipelines/WatchRun"). */
const char *api_call_method(struct api_call *call);

/*
 * Who made the call, for audit entries and logs: what the authorize hook
 * set with api_call_set_who ("token t_0123456789ab (alice)"), else "local".
 * Borrowed, valid until the call ends or the who is set again.
 */
const char *api_call_who(struct api_call *call);
/* Sets the call's who (copied). */
void api_call_set_who(struct api_call *call, const char *who);

/*
 * The subject of the client's certificate ("CN=alice,O=..."), when the
 * server requires client certificates (client_ca_file), else NULL.
 * Borrowed, valid until the call ends.
 */
const char *api_call_peer_subject(struct api_call *call);

/* --- Other transports. ---
 *
 * The HTTP/JSON face (api/httpapi.c) drives the very methods of the table:
 * the same authorize hook (scopes, pipeline binding, who), the same stream
 * caps, the same handlers and so the same audit entries. Only the bytes
 * differ: a call started with api_call_start ends, pushes and flushes
 * through ops instead of grpc.
 */
struct api_call_ops {
	/* The call ended (once): resp is the unary reply or NULL (borrowed,
	 * valid during the call only), code a grpc status, msg NULL or why. */
	void (*end)(void *t, const ProtobufCMessage *resp, int code, const char *msg);
	/* Server streaming: queue msg (borrowed, valid during the call only);
	 * returns the bytes queued since the last flush. */
	size_t (*push)(void *t, const ProtobufCMessage *msg);
	/* Write what push queued, then call api_call_sent from a later
	 * callback (never from inside flush). */
	void (*flush)(void *t);
	/* The request's metadata for a lowercase key ("authorization"), or
	 * NULL. Borrowed, valid while the transport holds the call. */
	const char *(*metadata)(void *t, const char *key);
	/* The call is freed (optional; *out is cleared anyway). */
	void (*released)(void *t);
};

/* The method of that full path ("/kpl.v1.Pipelines/GetRun"), or NULL. */
const struct api_method *api_server_method(struct api_server *s, const char *path);

/*
 * Starts a call of m (one of s's methods; not a bidi one) over ops with
 * transport data t. Takes req (freed with protobuf_c_message_free_unpacked,
 * allocator NULL). peer names the client connection for the per-connection
 * stream cap ("http:127.0.0.1:50000"). *out is set to the call at once and
 * back to NULL when the call is freed, which may happen before this
 * returns (refused, or answered at once). The transport holds the call
 * until then or until api_call_detach.
 */
void api_call_start(struct api_server *s, const struct api_method *m,
		    ProtobufCMessage *req, const char *peer,
		    const struct api_call_ops *ops, void *t, struct api_call **out);

/* The transport wrote what ops->flush asked (ok) or could not. */
void api_call_sent(struct api_call *call, bool ok);

/*
 * The transport's client is gone: the call is cancelled (its handler's
 * on_cancel runs), nothing more goes to ops, and the transport forgets the
 * call (it ends and is freed without it).
 */
void api_call_detach(struct api_call *call);

#endif
