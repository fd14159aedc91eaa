/*
 * kplclient.h - a small blocking client for kpl.v1.Pipelines (api/kpl.proto)
 * on grpc core, for kplctl, tests and tools.
 *
 * Every call is synchronous: it runs on its own completion queue and waits in
 * grpc_completion_queue_pluck, so the caller's thread blocks until the call
 * ends or its deadline passes. There is no event loop to drive.
 *
 * Errors: functions return 0 or a negative KPL_E* code (base/kpl.h). RPCs
 * also fill a caller-owned struct kplc_status with the gRPC status the server
 * (or grpc itself) reported; that is what a person should read.
 *
 * Threads: a struct kplc may be used from several threads at once (grpc
 * channels are thread-safe and every call has its own queue); one struct
 * kplc_stream belongs to one thread at a time.
 *
 * Messages: requests are borrowed for the duration of the call. Responses are
 * unpacked by protobuf-c with the default allocator; the caller owns them and
 * frees them with kplc_msg_free.
 */
#ifndef KPL_CLIENTS_KPLCLIENT_H
#define KPL_CLIENTS_KPLCLIENT_H

#include <protobuf-c/protobuf-c.h>
#include <signal.h>
#include <stdint.h>

#include "api/kpl.pb-c.h"
#include "base/kpl.h"

#define KPLC_DEFAULT_TARGET "127.0.0.1:7070"
#define KPLC_DEFAULT_DEADLINE_MS 30000

/* gRPC status codes (grpc_status_code), so callers need not include grpc. */
#define KPLC_STATUS_MAP(X)                                                    \
	X(OK, 0)                                                              \
	X(CANCELLED, 1)                                                       \
	X(UNKNOWN, 2)                                                         \
	X(INVALID_ARGUMENT, 3)                                                \
	X(DEADLINE_EXCEEDED, 4)                                               \
	X(NOT_FOUND, 5)                                                       \
	X(ALREADY_EXISTS, 6)                                                  \
	X(PERMISSION_DENIED, 7)                                               \
	X(RESOURCE_EXHAUSTED, 8)                                              \
	X(FAILED_PRECONDITION, 9)                                             \
	X(ABORTED, 10)                                                        \
	X(OUT_OF_RANGE, 11)                                                   \
	X(UNIMPLEMENTED, 12)                                                  \
	X(INTERNAL, 13)                                                       \
	X(UNAVAILABLE, 14)                                                    \
	X(DATA_LOSS, 15)                                                      \
	X(UNAUTHENTICATED, 16)

enum kplc_status_code {
#define KPLC_STATUS_ENUM(name, n) KPLC_##name = n,
	KPLC_STATUS_MAP(KPLC_STATUS_ENUM)
#undef KPLC_STATUS_ENUM
};

/*
 * The outcome of one RPC as gRPC reports it. code is a grpc_status_code;
 * message is the server's status details (or grpc's own reason, or ours for
 * a response we could not decode), NUL-terminated, possibly truncated.
 */
struct kplc_status {
	int code;
	char message[1024];
};

/* "NOT_FOUND" for 5; "UNKNOWN_STATUS" for a code outside 0..16. Static. */
const char *kplc_status_name(int code);

/* The KPL_E* code that best matches a gRPC status; 0 for OK. */
int kplc_status_to_err(int code);

/*
 * Connection settings. Zero-initialize, then set what you need.
 * tests/e2e/security_test.py exercises TLS, client certificates and tokens
 * against kpld (docs/security.md).
 */
struct kplc_options {
	/* PEM file of CAs to trust; NULL means an insecure (plaintext)
	 * channel. */
	const char *tls_ca_file;
	/* A client certificate (PEM, may hold a chain) and its private key
	 * (PEM), for a server that requires one (kpld --client-ca). Both or
	 * neither; only with tls_ca_file. */
	const char *tls_cert_file;
	const char *tls_key_file;
	/* Sent as "authorization: Bearer <token>" on every call if set. */
	const char *token;
	/* Deadline of unary calls; 0 means KPLC_DEFAULT_DEADLINE_MS. */
	int64_t deadline_ms;
};

struct kplc;        /* a channel to one server; opaque */
struct kplc_stream; /* one server-streaming call; opaque */

/*
 * Creates a channel to target ("host:port", any grpc target string) with
 * default options. grpc connects lazily: an unreachable server shows up as
 * UNAVAILABLE on the first call, not here. On success *out is the caller's;
 * free it with kplc_free. Errors: KPL_EINVAL (empty target; only one of
 * tls_cert_file and tls_key_file; a certificate without tls_ca_file;
 * a file without the PEM block it should hold, or an encrypted key),
 * KPL_EIO (an unreadable CA, certificate or key file; the message names
 * it), KPL_EINTERNAL (grpc refused the channel).
 */
int kplc_connect(const char *target, struct kplc **out, struct kpl_err *err);
/* The same with options (opt may be NULL). Copies what it needs of opt. */
int kplc_connect_opts(const char *target, const struct kplc_options *opt,
		      struct kplc **out, struct kpl_err *err);
/* Closes the channel. Every stream of c must be closed first. NULL is ok. */
void kplc_free(struct kplc *c);

/*
 * Calls a unary method ("/kpl.v1.Pipelines/GetRun") with req and waits for
 * the reply, at most the channel's deadline. On OK returns 0 and sets *resp
 * to a message of type resp_desc that the caller frees with kplc_msg_free.
 * Otherwise *resp is NULL and the return value is kplc_status_to_err(st->code)
 * (negative). st is always filled.
 */
int kplc_call_unary(struct kplc *c, const char *method_path,
		    const ProtobufCMessage *req,
		    const ProtobufCMessageDescriptor *resp_desc,
		    ProtobufCMessage **resp, struct kplc_status *st);

/*
 * Starts a server-streaming call and sends req. deadline_ms bounds the whole
 * stream; 0 means none (a watch may last as long as a run). The server's
 * status only shows up through kplc_stream_next, so an open that returns 0
 * may still end with an error. Returns 0 and sets *out (caller closes it
 * with kplc_stream_close), or a negative code with st filled.
 */
int kplc_stream_open(struct kplc *c, const char *method_path,
		     const ProtobufCMessage *req,
		     const ProtobufCMessageDescriptor *msg_desc,
		     int64_t deadline_ms, struct kplc_stream **out,
		     struct kplc_status *st);

/*
 * Waits for the next message. Returns 1 with *msg set (caller frees it with
 * kplc_msg_free); 0 when the server ended the stream with OK; or a negative
 * code when it ended otherwise (st tells how). After 0 or <0, every further
 * call returns the same result again. st is always filled.
 */
int kplc_stream_next(struct kplc_stream *s, ProtobufCMessage **msg,
		     struct kplc_status *st);

/* Cancels the call if it is still going and frees s. NULL is ok. */
void kplc_stream_close(struct kplc_stream *s);

/* Frees a message returned by this library. NULL is ok. */
void kplc_msg_free(void *msg);

/* --- Typed wrappers for kpl.v1.Pipelines (same contracts as above). --- */

int kplc_submit_run(struct kplc *c, const Kpl__V1__SubmitRunRequest *req,
		    Kpl__V1__Run **out, struct kplc_status *st);
int kplc_get_run(struct kplc *c, const char *id, Kpl__V1__Run **out,
		 struct kplc_status *st);
int kplc_list_runs(struct kplc *c, const Kpl__V1__ListRunsRequest *req,
		   Kpl__V1__ListRunsResponse **out, struct kplc_status *st);
int kplc_cancel_run(struct kplc *c, const char *id, Kpl__V1__Run **out,
		    struct kplc_status *st);
/* Opens WatchRun; read it with kplc_watch_next or kplc_stream_next. */
int kplc_watch_run(struct kplc *c, const char *id, uint64_t from_seq,
		   struct kplc_stream **out, struct kplc_status *st);
int kplc_watch_next(struct kplc_stream *s, Kpl__V1__RunEvent **ev,
		    struct kplc_status *st);

/* ValidatePipeline: every problem of the pipeline text, nothing run.
 * Diagnostics carry line, column and key path, but no file name. */
int kplc_validate_pipeline(struct kplc *c, const char *pipeline,
			   Kpl__V1__ValidatePipelineResponse **out,
			   struct kplc_status *st);
/* ApproveStage: approves (req->approve) or rejects a WAITING stage; *out is
 * the run afterwards. FAILED_PRECONDITION if the stage is not waiting. */
int kplc_approve_stage(struct kplc *c, const Kpl__V1__ApproveStageRequest *req,
		       Kpl__V1__Run **out, struct kplc_status *st);
/* RetryRun: a new attempt of a FAILED or CANCELLED run (*out->attempt). */
int kplc_retry_run(struct kplc *c, const char *id, Kpl__V1__Run **out,
		   struct kplc_status *st);
/* Opens WatchRuns (no deadline; it streams until closed); read it with
 * kplc_watch_next. */
int kplc_watch_runs(struct kplc *c, const Kpl__V1__WatchRunsRequest *req,
		    struct kplc_stream **out, struct kplc_status *st);

/* SetSecret: stores value (4 bytes to 64 KiB) under name; *out names it.
 * No call ever returns a value. */
int kplc_set_secret(struct kplc *c, const char *name, const char *value,
		    Kpl__V1__Secret **out, struct kplc_status *st);
/* The same, for the pipelines named (n_pipelines of them; none: every
 * pipeline) only: another pipeline that refers to the secret fails at
 * submit. */
int kplc_set_secret_for(struct kplc *c, const char *name, const char *value,
			const char *const *pipelines, size_t n_pipelines,
			Kpl__V1__Secret **out, struct kplc_status *st);
/* ListSecrets: the names of every secret. */
int kplc_list_secrets(struct kplc *c, Kpl__V1__ListSecretsResponse **out,
		      struct kplc_status *st);
/* DeleteSecret: NOT_FOUND if there is no such secret. */
int kplc_delete_secret(struct kplc *c, const char *name, Kpl__V1__Secret **out,
		       struct kplc_status *st);
/* ListReleases: what changed deployment ("cluster/namespace/name"), newest
 * first, at most limit (0: the server's default, 50). */
int kplc_list_releases(struct kplc *c, const char *deployment, int32_t limit,
		       Kpl__V1__ListReleasesResponse **out,
		       struct kplc_status *st);
/* RollbackRelease: starts a run restoring deployment to to_revision (NULL
 * or "": the one before its last deploy); *out is that run. */
int kplc_rollback_release(struct kplc *c, const char *deployment,
			  const char *to_revision, Kpl__V1__Run **out,
			  struct kplc_status *st);

/*
 * Follows a run's events to the end, surviving broken streams: when WatchRun
 * ends with UNAVAILABLE it reopens it with from_seq = last seen seq + 1,
 * after a doubling backoff, up to max_retries times in a row (the count
 * resets once an event arrives). Events with a seq at or below the last one
 * delivered are dropped, so fn sees each seq once, in order.
 *
 * fn gets a borrowed event, valid during the call only; a non-zero return
 * stops the follow and is returned as is. Returns 0 when the stream ended
 * with OK (the run's final event was sent), or a negative code with st
 * filled from the last attempt. *last_seq (if not NULL) is the last seq
 * delivered.
 */
struct kplc_follow_options {
	int max_retries;       /* 0 means 5 */
	int initial_backoff_ms; /* 0 means 200; doubles, at most 5000 */
	/* If not NULL, looked at every 100 ms while waiting: once it is
	 * non-zero (a signal handler may set it) the stream is cancelled and
	 * the follow returns KPL_ECANCELLED with st->code CANCELLED. */
	const volatile sig_atomic_t *stop;
	/* If not NULL, called with idle_data about every 100 ms while no
	 * event arrives (waiting on the stream or in a backoff), on the
	 * calling thread: a live display ticks its clocks with it. It must
	 * not call into this library with the same stream. */
	void (*idle)(void *idle_data);
	void *idle_data;
};
typedef int (*kplc_event_fn)(const Kpl__V1__RunEvent *ev, void *data);
int kplc_follow_run(struct kplc *c, const char *id, uint64_t from_seq,
		    const struct kplc_follow_options *opt, kplc_event_fn fn,
		    void *data, uint64_t *last_seq, struct kplc_status *st);

/*
 * Follows WatchRuns like kplc_follow_run follows WatchRun, by global_seq:
 * starts at req->from_global_seq (0: only new events), and on UNAVAILABLE
 * reopens the stream with from_global_seq = last delivered global_seq + 1
 * (or req's own from_global_seq if nothing came yet), dropping events at or
 * below the last delivered one. req is borrowed; its filters are kept on
 * every reopen. WatchRuns does not end by itself: this returns when fn
 * returns non-zero (that value), when opt->stop is set (KPL_ECANCELLED),
 * when the server ends the stream with OK (0), or on an error that is not
 * retried (negative, st filled). *last_global_seq (if not NULL) is the last
 * global_seq delivered (from_global_seq - 1, or 0, if none came).
 */
int kplc_follow_runs(struct kplc *c, const Kpl__V1__WatchRunsRequest *req,
		     const struct kplc_follow_options *opt, kplc_event_fn fn,
		     void *data, uint64_t *last_global_seq,
		     struct kplc_status *st);

#endif
