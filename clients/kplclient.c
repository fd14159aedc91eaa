/* kplclient.c - blocking kpl.v1.Pipelines client on grpc core. */
#include "clients/kplclient.h"

#include <errno.h>
#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct kplc {
	grpc_channel *channel;
	char *token_header; /* "Bearer <token>", or NULL */
	int64_t deadline_ms;
};

struct kplc_stream {
	struct kplc *c;
	grpc_completion_queue *cq;
	grpc_call *call;
	const ProtobufCMessageDescriptor *desc;
	int md_received; /* initial metadata asked for */
	/* Polled while waiting, if set; cancelled: we cancelled for it. */
	const volatile sig_atomic_t *stop;
	/* Called every 100 ms while waiting, if set. */
	void (*idle)(void *data);
	void *idle_data;
	int cancelled;
	/* 1 once the status is known; then result/st are replayed. */
	int done;
	int result;
	struct kplc_status st;
};

const char *kplc_status_name(int code)
{
	switch (code) {
#define KPLC_STATUS_CASE(name, n) case n: return #name;
		KPLC_STATUS_MAP(KPLC_STATUS_CASE)
#undef KPLC_STATUS_CASE
	}
	return "UNKNOWN_STATUS";
}

int kplc_status_to_err(int code)
{
	switch (code) {
	case KPLC_OK: return 0;
	case KPLC_CANCELLED: return KPL_ECANCELLED;
	case KPLC_INVALID_ARGUMENT: return KPL_EINVAL;
	case KPLC_OUT_OF_RANGE: return KPL_EINVAL;
	case KPLC_DEADLINE_EXCEEDED: return KPL_ETIMEOUT;
	case KPLC_NOT_FOUND: return KPL_ENOTFOUND;
	case KPLC_ALREADY_EXISTS: return KPL_EEXISTS;
	case KPLC_FAILED_PRECONDITION: return KPL_ESTATE;
	case KPLC_RESOURCE_EXHAUSTED: return KPL_ETOOBIG;
	case KPLC_UNAVAILABLE: return KPL_EUNAVAILABLE;
	}
	return KPL_EINTERNAL;
}

static void status_set(struct kplc_status *st, int code, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static void status_set(struct kplc_status *st, int code, const char *fmt, ...)
{
	va_list ap;

	st->code = code;
	va_start(ap, fmt);
	vsnprintf(st->message, sizeof st->message, fmt, ap);
	va_end(ap);
}

/* Frees a private key's text after overwriting it. explicit_bzero, so the
 * compiler cannot drop the stores before free. */
static void wipe_free(char *s)
{
	if (s)
		explicit_bzero(s, strlen(s));
	free(s);
}

/* Reads all of the PEM file path into *out (NUL-terminated, caller frees);
 * what ("tls ca", "tls cert", "tls key") and path name it in err. */
static int read_pem(const char *path, const char *what, char **out,
		    struct kpl_err *err)
{
	FILE *f = fopen(path, "rb");
	size_t len = 0, cap = 0, n;
	char *pem = NULL;
	int failed;

	*out = NULL;
	if (!f)
		return kpl_errf(err, KPL_EIO, "%s %s: %s", what, path,
				strerror(errno));
	do {
		if (cap - len < 4096)
			pem = kpl_realloc(pem, cap = cap * 2 + 4096);
		n = fread(pem + len, 1, cap - len - 1, f);
		len += n;
	} while (n > 0);
	failed = ferror(f);
	fclose(f);
	if (failed) {
		free(pem);
		/* fread sets errno; EISDIR for a directory, for example. */
		return kpl_errf(err, KPL_EIO, "%s %s: %s", what, path,
				strerror(errno ? errno : EIO));
	}
	pem[len] = '\0';
	if (len == 0) {
		free(pem);
		return kpl_errf(err, KPL_EIO, "%s %s: the file is empty", what,
				path);
	}
	*out = pem;
	return 0;
}

/*
 * Looks for the PEM block grpc will want, so that a swapped or wrong file is
 * named here rather than reported by grpc, much later, as "empty address
 * list". what is "tls ca", "tls cert" or "tls key". Whether the key matches
 * the certificate is left to grpc.
 */
static int pem_check(const char *pem, const char *what, const char *path,
		     struct kpl_err *err)
{
	if (strcmp(what, "tls key")) {
		if (!strstr(pem, "-----BEGIN CERTIFICATE-----"))
			return kpl_errf(err, KPL_EINVAL,
					"%s %s: not a PEM certificate (no "
					"-----BEGIN CERTIFICATE-----)",
					what, path);
		return 0;
	}
	if (!strstr(pem, "-----BEGIN ") || !strstr(pem, "PRIVATE KEY-----"))
		return kpl_errf(err, KPL_EINVAL,
				"%s %s: not a PEM private key (no -----BEGIN "
				"... PRIVATE KEY-----)", what, path);
	if (strstr(pem, "ENCRYPTED"))
		return kpl_errf(err, KPL_EINVAL,
				"%s %s: the key is encrypted; give an "
				"unencrypted one (openssl pkey -in FILE)",
				what, path);
	return 0;
}

/* grpc_init is reference counted: one per live channel. */
int kplc_connect_opts(const char *target, const struct kplc_options *opt,
		      struct kplc **out, struct kpl_err *err)
{
	static const struct kplc_options no_opts;
	grpc_channel_credentials *creds = NULL;
	struct kplc *c = NULL;
	char *pem = NULL, *cert = NULL, *key = NULL;
	int has_cert, has_key, rc;

	*out = NULL;
	if (!opt)
		opt = &no_opts;
	if (!target || !*target)
		return kpl_errf(err, KPL_EINVAL, "empty server address");
	has_cert = opt->tls_cert_file && *opt->tls_cert_file;
	has_key = opt->tls_key_file && *opt->tls_key_file;
	if (has_cert != has_key)
		return kpl_errf(err, KPL_EINVAL,
				"a client certificate needs both a certificate "
				"and a key file (only the %s %s is given)",
				has_cert ? "certificate" : "key",
				has_cert ? opt->tls_cert_file : opt->tls_key_file);
	if (has_cert && !opt->tls_ca_file)
		return kpl_errf(err, KPL_EINVAL,
				"a client certificate needs TLS: give a CA file too");

	grpc_init();
	c = kpl_calloc(1, sizeof *c);
	c->deadline_ms = opt->deadline_ms > 0 ? opt->deadline_ms
					      : KPLC_DEFAULT_DEADLINE_MS;
	if (opt->token && *opt->token)
		c->token_header = kpl_asprintf("Bearer %s", opt->token);

	if (opt->tls_ca_file) {
		if ((rc = read_pem(opt->tls_ca_file, "tls ca", &pem, err)) ||
		    (rc = pem_check(pem, "tls ca", opt->tls_ca_file, err)))
			goto fail;
		if (has_cert) {
			if ((rc = read_pem(opt->tls_cert_file, "tls cert", &cert,
					   err)) ||
			    (rc = pem_check(cert, "tls cert", opt->tls_cert_file,
					    err)) ||
			    (rc = read_pem(opt->tls_key_file, "tls key", &key,
					   err)) ||
			    (rc = pem_check(key, "tls key", opt->tls_key_file,
					    err)))
				goto fail;
			grpc_ssl_pem_key_cert_pair pair = {
				.private_key = key,
				.cert_chain = cert,
			};
			/* grpc copies the PEM strings. */
			creds = grpc_ssl_credentials_create(pem, &pair, NULL,
							    NULL);
		} else {
			creds = grpc_ssl_credentials_create(pem, NULL, NULL,
							    NULL);
		}
		if (!creds) {
			rc = kpl_errf(err, KPL_EINTERNAL,
				      "grpc refused the TLS credentials (%s)",
				      opt->tls_ca_file);
			goto fail;
		}
	} else {
		creds = grpc_insecure_credentials_create();
	}

	/* Keepalive so that a watch on a dead connection fails (UNAVAILABLE,
	 * and is resumed) instead of blocking forever; replies up to the
	 * server's own limit. */
	grpc_arg args[] = {
		{ .type = GRPC_ARG_INTEGER,
		  .key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH,
		  .value.integer = KPL_MAX_GRPC_MESSAGE_BYTES },
		{ .type = GRPC_ARG_INTEGER,
		  .key = GRPC_ARG_KEEPALIVE_TIME_MS,
		  .value.integer = 30000 },
		{ .type = GRPC_ARG_INTEGER,
		  .key = GRPC_ARG_KEEPALIVE_TIMEOUT_MS,
		  .value.integer = 10000 },
	};
	grpc_channel_args chargs = { KPL_ARRAY_SIZE(args), args };

	c->channel = grpc_channel_create(target, creds, &chargs);
	if (!c->channel) {
		rc = kpl_errf(err, KPL_EINTERNAL, "cannot create a channel to %s",
			      target);
		goto fail;
	}
	grpc_channel_credentials_release(creds);
	free(pem);
	free(cert);
	wipe_free(key);
	*out = c;
	return 0;

fail:
	if (creds)
		grpc_channel_credentials_release(creds);
	free(pem);
	free(cert);
	wipe_free(key);
	free(c->token_header);
	free(c);
	grpc_shutdown();
	return rc;
}

int kplc_connect(const char *target, struct kplc **out, struct kpl_err *err)
{
	return kplc_connect_opts(target, NULL, out, err);
}

void kplc_free(struct kplc *c)
{
	if (!c)
		return;
	grpc_channel_destroy(c->channel);
	free(c->token_header);
	free(c);
	grpc_shutdown();
}

void kplc_msg_free(void *msg)
{
	if (msg)
		protobuf_c_message_free_unpacked(msg, NULL);
}

static gpr_timespec deadline_after(int64_t ms)
{
	if (ms <= 0)
		return gpr_inf_future(GPR_CLOCK_REALTIME);
	return gpr_time_add(gpr_now(GPR_CLOCK_REALTIME),
			    gpr_time_from_millis(ms, GPR_TIMESPAN));
}

static grpc_byte_buffer *pack(const ProtobufCMessage *m)
{
	size_t len = protobuf_c_message_get_packed_size(m);
	grpc_slice s = grpc_slice_malloc(len);
	grpc_byte_buffer *bb;

	protobuf_c_message_pack(m, GRPC_SLICE_START_PTR(s));
	bb = grpc_raw_byte_buffer_create(&s, 1);
	grpc_slice_unref(s);
	return bb;
}

/* Decodes bb as desc; NULL (and st set to INTERNAL) if it does not parse. */
static ProtobufCMessage *unpack(grpc_byte_buffer *bb,
				const ProtobufCMessageDescriptor *desc,
				struct kplc_status *st)
{
	grpc_byte_buffer_reader r;
	ProtobufCMessage *m;
	grpc_slice s;

	if (!grpc_byte_buffer_reader_init(&r, bb)) {
		status_set(st, KPLC_INTERNAL, "cannot read the %s reply",
			   desc->name);
		return NULL;
	}
	s = grpc_byte_buffer_reader_readall(&r);
	grpc_byte_buffer_reader_destroy(&r);
	m = protobuf_c_message_unpack(desc, NULL, GRPC_SLICE_LENGTH(s),
				      GRPC_SLICE_START_PTR(s));
	grpc_slice_unref(s);
	if (!m)
		status_set(st, KPLC_INTERNAL, "cannot decode the reply as %s",
			   desc->name);
	return m;
}

/* Copies grpc's status details into st. */
static void status_take(struct kplc_status *st, grpc_status_code code,
			grpc_slice details)
{
	size_t n = GRPC_SLICE_LENGTH(details);

	if (n >= sizeof st->message)
		n = sizeof st->message - 1;
	st->code = code;
	memcpy(st->message, GRPC_SLICE_START_PTR(details), n);
	st->message[n] = '\0';
}

/*
 * Waits for tag on a pluck queue. The queue is ours alone and every batch
 * we start is waited for at once, so the only other outcome is a bug.
 */
static int pluck(grpc_completion_queue *cq, void *tag)
{
	grpc_event ev = grpc_completion_queue_pluck(
		cq, tag, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);

	if (ev.type != GRPC_OP_COMPLETE || ev.tag != tag)
		BUG("pluck: unexpected completion-queue event %d", ev.type);
	return ev.success;
}

/*
 * pluck for a stream's receive: the same, but with a stop flag it wakes
 * every 100 ms to look at it, and once it is set cancels the call; the
 * batch then completes at once (without a message) and the status is
 * CANCELLED. With an idle callback it wakes as often and calls it.
 */
static int stream_pluck(struct kplc_stream *s, void *tag)
{
	grpc_event ev;

	if (!s->stop && !s->idle)
		return pluck(s->cq, tag);
	for (;;) {
		if (s->stop && *s->stop && !s->cancelled) {
			grpc_call_cancel(s->call, NULL);
			s->cancelled = 1;
		}
		ev = grpc_completion_queue_pluck(
			s->cq, tag,
			gpr_time_add(gpr_now(GPR_CLOCK_REALTIME),
				     gpr_time_from_millis(100, GPR_TIMESPAN)),
			NULL);
		if (ev.type == GRPC_QUEUE_TIMEOUT) {
			if (s->idle)
				s->idle(s->idle_data);
			continue;
		}
		if (ev.type != GRPC_OP_COMPLETE || ev.tag != tag)
			BUG("pluck: unexpected completion-queue event %d",
			    ev.type);
		return ev.success;
	}
}

/* A pluck queue must be drained of its shutdown event before destroy. */
static void cq_destroy(grpc_completion_queue *cq)
{
	grpc_event ev;

	grpc_completion_queue_shutdown(cq);
	do
		ev = grpc_completion_queue_pluck(
			cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
	while (ev.type != GRPC_QUEUE_SHUTDOWN);
	grpc_completion_queue_destroy(cq);
}

static grpc_call *call_create(struct kplc *c, grpc_completion_queue *cq,
			      const char *method_path, int64_t deadline_ms)
{
	return grpc_channel_create_call(
		c->channel, NULL, GRPC_PROPAGATE_DEFAULTS, cq,
		grpc_slice_from_static_string(method_path), NULL,
		deadline_after(deadline_ms), NULL);
}

/* Fills the initial-metadata op; md must outlive the batch. */
static void op_send_md(struct kplc *c, grpc_op *op, grpc_metadata *md)
{
	memset(op, 0, sizeof *op);
	op->op = GRPC_OP_SEND_INITIAL_METADATA;
	if (c->token_header) {
		md->key = grpc_slice_from_static_string("authorization");
		md->value = grpc_slice_from_static_string(c->token_header);
		op->data.send_initial_metadata.count = 1;
		op->data.send_initial_metadata.metadata = md;
	}
}

int kplc_call_unary(struct kplc *c, const char *method_path,
		    const ProtobufCMessage *req,
		    const ProtobufCMessageDescriptor *resp_desc,
		    ProtobufCMessage **resp, struct kplc_status *st)
{
	grpc_metadata_array md_in, trailers;
	grpc_byte_buffer *out_bb, *in_bb = NULL;
	grpc_status_code code = GRPC_STATUS_UNKNOWN;
	grpc_slice details = grpc_empty_slice();
	grpc_completion_queue *cq;
	grpc_metadata auth;
	grpc_call *call;
	grpc_op ops[6], *op = ops;
	grpc_call_error ce;
	int rc;

	*resp = NULL;
	cq = grpc_completion_queue_create_for_pluck(NULL);
	call = call_create(c, cq, method_path, c->deadline_ms);
	grpc_metadata_array_init(&md_in);
	grpc_metadata_array_init(&trailers);
	out_bb = pack(req);

	op_send_md(c, op++, &auth);
	memset(op, 0, sizeof *op);
	op->op = GRPC_OP_SEND_MESSAGE;
	op->data.send_message.send_message = out_bb;
	op++;
	memset(op, 0, sizeof *op);
	op->op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
	op++;
	memset(op, 0, sizeof *op);
	op->op = GRPC_OP_RECV_INITIAL_METADATA;
	op->data.recv_initial_metadata.recv_initial_metadata = &md_in;
	op++;
	memset(op, 0, sizeof *op);
	op->op = GRPC_OP_RECV_MESSAGE;
	op->data.recv_message.recv_message = &in_bb;
	op++;
	memset(op, 0, sizeof *op);
	op->op = GRPC_OP_RECV_STATUS_ON_CLIENT;
	op->data.recv_status_on_client.trailing_metadata = &trailers;
	op->data.recv_status_on_client.status = &code;
	op->data.recv_status_on_client.status_details = &details;
	op++;

	ce = grpc_call_start_batch(call, ops, (size_t)(op - ops), ops, NULL);
	if (ce != GRPC_CALL_OK) {
		/* The tag never comes back; nothing to wait for. */
		status_set(st, KPLC_INTERNAL, "%s: grpc_call_start_batch: %d",
			   method_path, ce);
		goto out;
	}
	pluck(cq, ops);
	status_take(st, code, details);
	if (code == GRPC_STATUS_OK) {
		if (!in_bb)
			status_set(st, KPLC_INTERNAL, "%s: no reply message",
				   method_path);
		else
			*resp = unpack(in_bb, resp_desc, st);
	}

out:
	rc = *resp ? 0 : kplc_status_to_err(st->code);
	if (!*resp && rc == 0)
		rc = KPL_EINTERNAL;
	grpc_slice_unref(details);
	grpc_byte_buffer_destroy(out_bb);
	if (in_bb)
		grpc_byte_buffer_destroy(in_bb);
	grpc_metadata_array_destroy(&md_in);
	grpc_metadata_array_destroy(&trailers);
	grpc_call_unref(call);
	cq_destroy(cq);
	return rc;
}

int kplc_stream_open(struct kplc *c, const char *method_path,
		     const ProtobufCMessage *req,
		     const ProtobufCMessageDescriptor *msg_desc,
		     int64_t deadline_ms, struct kplc_stream **out,
		     struct kplc_status *st)
{
	struct kplc_stream *s = kpl_calloc(1, sizeof *s);
	grpc_metadata_array md_in;
	grpc_byte_buffer *out_bb;
	grpc_metadata auth;
	grpc_op ops[4], *op = ops;
	grpc_call_error ce;

	*out = NULL;
	s->c = c;
	s->desc = msg_desc;
	s->cq = grpc_completion_queue_create_for_pluck(NULL);
	s->call = call_create(c, s->cq, method_path, deadline_ms);
	grpc_metadata_array_init(&md_in);
	out_bb = pack(req);

	/* Initial metadata is not waited for here: with a stream it only
	 * comes once the server sends its first message or its status, and
	 * an open must not block until then. */
	op_send_md(c, op++, &auth);
	memset(op, 0, sizeof *op);
	op->op = GRPC_OP_SEND_MESSAGE;
	op->data.send_message.send_message = out_bb;
	op++;
	memset(op, 0, sizeof *op);
	op->op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
	op++;
	ce = grpc_call_start_batch(s->call, ops, (size_t)(op - ops), ops, NULL);
	if (ce != GRPC_CALL_OK) {
		status_set(st, KPLC_INTERNAL, "%s: grpc_call_start_batch: %d",
			   method_path, ce);
		goto fail;
	}
	/* A failed send means the call is already over; the status, read by
	 * the first kplc_stream_next, says why. */
	pluck(s->cq, ops);
	grpc_byte_buffer_destroy(out_bb);
	grpc_metadata_array_destroy(&md_in);
	status_set(st, KPLC_OK, "%s", "");
	*out = s;
	return 0;

fail:
	grpc_byte_buffer_destroy(out_bb);
	grpc_metadata_array_destroy(&md_in);
	kplc_stream_close(s);
	return kplc_status_to_err(st->code);
}

/* Receives the call's status, ending the stream. */
static void stream_finish(struct kplc_stream *s)
{
	grpc_metadata_array trailers;
	grpc_status_code code = GRPC_STATUS_UNKNOWN;
	grpc_slice details = grpc_empty_slice();
	grpc_op op;
	grpc_call_error ce;

	grpc_metadata_array_init(&trailers);
	memset(&op, 0, sizeof op);
	op.op = GRPC_OP_RECV_STATUS_ON_CLIENT;
	op.data.recv_status_on_client.trailing_metadata = &trailers;
	op.data.recv_status_on_client.status = &code;
	op.data.recv_status_on_client.status_details = &details;
	ce = grpc_call_start_batch(s->call, &op, 1, &op, NULL);
	if (ce != GRPC_CALL_OK) {
		status_set(&s->st, KPLC_INTERNAL,
			   "grpc_call_start_batch (status): %d", ce);
	} else {
		pluck(s->cq, &op);
		status_take(&s->st, code, details);
	}
	grpc_slice_unref(details);
	grpc_metadata_array_destroy(&trailers);
	s->done = 1;
	s->result = s->st.code == KPLC_OK ? 0 : kplc_status_to_err(s->st.code);
}

int kplc_stream_next(struct kplc_stream *s, ProtobufCMessage **msg,
		     struct kplc_status *st)
{
	grpc_metadata_array md_in;
	grpc_byte_buffer *bb = NULL;
	grpc_op ops[2], *op = ops;
	grpc_call_error ce;

	*msg = NULL;
	if (s->done)
		goto done;

	grpc_metadata_array_init(&md_in);
	/* The first receive also takes the initial metadata (grpc wants it
	 * received before or with the first message). */
	if (!s->md_received) {
		memset(op, 0, sizeof *op);
		op->op = GRPC_OP_RECV_INITIAL_METADATA;
		op->data.recv_initial_metadata.recv_initial_metadata = &md_in;
		op++;
		s->md_received = 1;
	}
	memset(op, 0, sizeof *op);
	op->op = GRPC_OP_RECV_MESSAGE;
	op->data.recv_message.recv_message = &bb;
	op++;
	ce = grpc_call_start_batch(s->call, ops, (size_t)(op - ops), ops, NULL);
	if (ce != GRPC_CALL_OK) {
		grpc_metadata_array_destroy(&md_in);
		status_set(&s->st, KPLC_INTERNAL,
			   "grpc_call_start_batch (message): %d", ce);
		s->done = 1;
		s->result = KPL_EINTERNAL;
		grpc_call_cancel(s->call, NULL);
		goto done;
	}
	stream_pluck(s, ops);
	grpc_metadata_array_destroy(&md_in);

	if (!bb) {
		/* End of stream, by the server or by a failure. */
		stream_finish(s);
		goto done;
	}
	*msg = unpack(bb, s->desc, &s->st);
	grpc_byte_buffer_destroy(bb);
	if (!*msg) {
		/* A message we cannot read ends the stream for us. */
		grpc_call_cancel(s->call, NULL);
		s->done = 1;
		s->result = KPL_EINTERNAL;
		goto done;
	}
	status_set(st, KPLC_OK, "%s", "");
	return 1;

done:
	*st = s->st;
	return s->result;
}

void kplc_stream_close(struct kplc_stream *s)
{
	if (!s)
		return;
	/* No batch is ever in flight between our calls, so after the cancel
	 * nothing can complete on the queue any more. */
	if (!s->done)
		grpc_call_cancel(s->call, NULL);
	grpc_call_unref(s->call);
	cq_destroy(s->cq);
	free(s);
}

/* --- Typed wrappers. --- */

/* The methods of kpl.v1.Pipelines, listed once. */
#define M_SUBMIT "/kpl.v1.Pipelines/SubmitRun"
#define M_GET "/kpl.v1.Pipelines/GetRun"
#define M_LIST "/kpl.v1.Pipelines/ListRuns"
#define M_WATCH "/kpl.v1.Pipelines/WatchRun"
#define M_CANCEL "/kpl.v1.Pipelines/CancelRun"
#define M_VALIDATE "/kpl.v1.Pipelines/ValidatePipeline"
#define M_APPROVE "/kpl.v1.Pipelines/ApproveStage"
#define M_RETRY "/kpl.v1.Pipelines/RetryRun"
#define M_WATCH_ALL "/kpl.v1.Pipelines/WatchRuns"
#define M_SET_SECRET "/kpl.v1.Pipelines/SetSecret"
#define M_LIST_SECRETS "/kpl.v1.Pipelines/ListSecrets"
#define M_DELETE_SECRET "/kpl.v1.Pipelines/DeleteSecret"
#define M_RELEASES "/kpl.v1.Pipelines/ListReleases"
#define M_ROLLBACK "/kpl.v1.Pipelines/RollbackRelease"

int kplc_submit_run(struct kplc *c, const Kpl__V1__SubmitRunRequest *req,
		    Kpl__V1__Run **out, struct kplc_status *st)
{
	return kplc_call_unary(c, M_SUBMIT, &req->base, &kpl__v1__run__descriptor,
			       (ProtobufCMessage **)out, st);
}

int kplc_get_run(struct kplc *c, const char *id, Kpl__V1__Run **out,
		 struct kplc_status *st)
{
	Kpl__V1__GetRunRequest req = KPL__V1__GET_RUN_REQUEST__INIT;

	req.id = (char *)id;
	return kplc_call_unary(c, M_GET, &req.base, &kpl__v1__run__descriptor,
			       (ProtobufCMessage **)out, st);
}

int kplc_list_runs(struct kplc *c, const Kpl__V1__ListRunsRequest *req,
		   Kpl__V1__ListRunsResponse **out, struct kplc_status *st)
{
	return kplc_call_unary(c, M_LIST, &req->base,
			       &kpl__v1__list_runs_response__descriptor,
			       (ProtobufCMessage **)out, st);
}

int kplc_cancel_run(struct kplc *c, const char *id, Kpl__V1__Run **out,
		    struct kplc_status *st)
{
	Kpl__V1__CancelRunRequest req = KPL__V1__CANCEL_RUN_REQUEST__INIT;

	req.id = (char *)id;
	return kplc_call_unary(c, M_CANCEL, &req.base, &kpl__v1__run__descriptor,
			       (ProtobufCMessage **)out, st);
}

int kplc_watch_run(struct kplc *c, const char *id, uint64_t from_seq,
		   struct kplc_stream **out, struct kplc_status *st)
{
	Kpl__V1__WatchRunRequest req = KPL__V1__WATCH_RUN_REQUEST__INIT;

	req.id = (char *)id;
	req.from_seq = from_seq;
	return kplc_stream_open(c, M_WATCH, &req.base,
				&kpl__v1__run_event__descriptor, 0, out, st);
}

int kplc_validate_pipeline(struct kplc *c, const char *pipeline,
			   Kpl__V1__ValidatePipelineResponse **out,
			   struct kplc_status *st)
{
	Kpl__V1__ValidatePipelineRequest req =
		KPL__V1__VALIDATE_PIPELINE_REQUEST__INIT;

	req.pipeline = (char *)pipeline;
	return kplc_call_unary(c, M_VALIDATE, &req.base,
			       &kpl__v1__validate_pipeline_response__descriptor,
			       (ProtobufCMessage **)out, st);
}

int kplc_approve_stage(struct kplc *c, const Kpl__V1__ApproveStageRequest *req,
		       Kpl__V1__Run **out, struct kplc_status *st)
{
	return kplc_call_unary(c, M_APPROVE, &req->base,
			       &kpl__v1__run__descriptor,
			       (ProtobufCMessage **)out, st);
}

int kplc_retry_run(struct kplc *c, const char *id, Kpl__V1__Run **out,
		   struct kplc_status *st)
{
	Kpl__V1__RetryRunRequest req = KPL__V1__RETRY_RUN_REQUEST__INIT;

	req.id = (char *)id;
	return kplc_call_unary(c, M_RETRY, &req.base, &kpl__v1__run__descriptor,
			       (ProtobufCMessage **)out, st);
}

int kplc_watch_runs(struct kplc *c, const Kpl__V1__WatchRunsRequest *req,
		    struct kplc_stream **out, struct kplc_status *st)
{
	return kplc_stream_open(c, M_WATCH_ALL, &req->base,
				&kpl__v1__run_event__descriptor, 0, out, st);
}

int kplc_set_secret(struct kplc *c, const char *name, const char *value,
		    Kpl__V1__Secret **out, struct kplc_status *st)
{
	return kplc_set_secret_for(c, name, value, NULL, 0, out, st);
}

int kplc_set_secret_for(struct kplc *c, const char *name, const char *value,
			const char *const *pipelines, size_t n_pipelines,
			Kpl__V1__Secret **out, struct kplc_status *st)
{
	Kpl__V1__SetSecretRequest req = KPL__V1__SET_SECRET_REQUEST__INIT;

	req.name = (char *)name;
	req.value = (char *)value;
	req.pipelines = (char **)pipelines;
	req.n_pipelines = n_pipelines;
	return kplc_call_unary(c, M_SET_SECRET, &req.base,
			       &kpl__v1__secret__descriptor,
			       (ProtobufCMessage **)out, st);
}

int kplc_list_secrets(struct kplc *c, Kpl__V1__ListSecretsResponse **out,
		      struct kplc_status *st)
{
	Kpl__V1__ListSecretsRequest req = KPL__V1__LIST_SECRETS_REQUEST__INIT;

	return kplc_call_unary(c, M_LIST_SECRETS, &req.base,
			       &kpl__v1__list_secrets_response__descriptor,
			       (ProtobufCMessage **)out, st);
}

int kplc_delete_secret(struct kplc *c, const char *name, Kpl__V1__Secret **out,
		       struct kplc_status *st)
{
	Kpl__V1__DeleteSecretRequest req = KPL__V1__DELETE_SECRET_REQUEST__INIT;

	req.name = (char *)name;
	return kplc_call_unary(c, M_DELETE_SECRET, &req.base,
			       &kpl__v1__secret__descriptor,
			       (ProtobufCMessage **)out, st);
}

int kplc_list_releases(struct kplc *c, const char *deployment, int32_t limit,
		       Kpl__V1__ListReleasesResponse **out,
		       struct kplc_status *st)
{
	Kpl__V1__ListReleasesRequest req = KPL__V1__LIST_RELEASES_REQUEST__INIT;

	req.deployment = (char *)deployment;
	req.limit = limit;
	return kplc_call_unary(c, M_RELEASES, &req.base,
			       &kpl__v1__list_releases_response__descriptor,
			       (ProtobufCMessage **)out, st);
}

int kplc_rollback_release(struct kplc *c, const char *deployment,
			  const char *to_revision, Kpl__V1__Run **out,
			  struct kplc_status *st)
{
	Kpl__V1__RollbackReleaseRequest req =
		KPL__V1__ROLLBACK_RELEASE_REQUEST__INIT;

	req.deployment = (char *)deployment;
	req.to_revision = (char *)(to_revision ? to_revision : "");
	return kplc_call_unary(c, M_ROLLBACK, &req.base,
			       &kpl__v1__run__descriptor,
			       (ProtobufCMessage **)out, st);
}

int kplc_watch_next(struct kplc_stream *s, Kpl__V1__RunEvent **ev,
		    struct kplc_status *st)
{
	return kplc_stream_next(s, (ProtobufCMessage **)ev, st);
}

/* Sleeps ms, in 100 ms slices if there is a stop flag to look at or an
 * idle callback to call. */
static void sleep_ms(int ms, const struct kplc_follow_options *opt)
{
	const volatile sig_atomic_t *stop = opt->stop;

	while (ms > 0 && !(stop && *stop)) {
		int n = (stop || opt->idle) && ms > 100 ? 100 : ms;
		struct timespec ts = { n / 1000, (long)(n % 1000) * 1000000L };

		while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
			;
		ms -= n;
		if (opt->idle)
			opt->idle(opt->idle_data);
	}
}

/*
 * What kplc_follow_run and kplc_follow_runs share: the stream to (re)open
 * and which sequence number orders its events.
 */
struct follow_src {
	const char *what; /* for the debug log */
	int (*open)(struct kplc *c, const struct follow_src *src, uint64_t from,
		    struct kplc_stream **out, struct kplc_status *st);
	uint64_t (*seq)(const Kpl__V1__RunEvent *ev);
	const char *id;                       /* WatchRun */
	const Kpl__V1__WatchRunsRequest *req; /* WatchRuns */
};

/*
 * Opens src from first, then from the last delivered seq + 1 after each
 * UNAVAILABLE; *last is the last seq handed to fn (in: the one before
 * first, or 0).
 */
static int follow(struct kplc *c, const struct follow_src *src, uint64_t first,
		  const struct kplc_follow_options *opt, kplc_event_fn fn,
		  void *data, uint64_t *last, struct kplc_status *st)
{
	static const struct kplc_follow_options no_opts;
	int max_retries, backoff, initial_backoff, retries = 0, rc;

	if (!opt)
		opt = &no_opts;
	max_retries = opt->max_retries > 0 ? opt->max_retries : 5;
	backoff = opt->initial_backoff_ms > 0 ? opt->initial_backoff_ms : 200;
	initial_backoff = backoff;

	for (;;) {
		struct kplc_stream *s = NULL;
		Kpl__V1__RunEvent *ev;
		int stop = 0;

		rc = src->open(c, src, *last ? *last + 1 : first, &s, st);
		if (rc == 0) {
			s->stop = opt->stop;
			s->idle = opt->idle;
			s->idle_data = opt->idle_data;
		}
		while (rc == 0 && (rc = kplc_watch_next(s, &ev, st)) == 1) {
			uint64_t seq = src->seq(ev);

			rc = 0;
			retries = 0;
			backoff = initial_backoff;
			/* A server that resends what we asked it to skip
			 * must not make us show a line twice. */
			if (seq <= *last) {
				kplc_msg_free(ev);
				continue;
			}
			*last = seq;
			stop = fn(ev, data);
			kplc_msg_free(ev);
			if (stop)
				break;
		}
		kplc_stream_close(s);
		if (stop) {
			rc = stop;
			break;
		}
		if (opt->stop && *opt->stop) {
			status_set(st, KPLC_CANCELLED, "%s", "stopped");
			rc = KPL_ECANCELLED;
			break;
		}
		if (rc == 0 || st->code != KPLC_UNAVAILABLE ||
		    retries >= max_retries)
			break;
		retries++;
		kpl_debug("kplclient", "%s: %s, retry %d in %d ms", src->what,
			  st->message, retries, backoff);
		sleep_ms(backoff, opt);
		backoff = backoff * 2 > 5000 ? 5000 : backoff * 2;
	}
	return rc;
}

static int open_run(struct kplc *c, const struct follow_src *src,
		    uint64_t from, struct kplc_stream **out,
		    struct kplc_status *st)
{
	return kplc_watch_run(c, src->id, from, out, st);
}

static uint64_t seq_run(const Kpl__V1__RunEvent *ev)
{
	return ev->seq;
}

int kplc_follow_run(struct kplc *c, const char *id, uint64_t from_seq,
		    const struct kplc_follow_options *opt, kplc_event_fn fn,
		    void *data, uint64_t *last_seq, struct kplc_status *st)
{
	struct follow_src src = { .what = "watch", .open = open_run,
				  .seq = seq_run, .id = id };
	/* from_seq 0 and 1 both mean "from the start". */
	uint64_t last = from_seq > 0 ? from_seq - 1 : 0;
	int rc = follow(c, &src, last + 1, opt, fn, data, &last, st);

	if (last_seq)
		*last_seq = last;
	return rc;
}

static int open_runs(struct kplc *c, const struct follow_src *src,
		     uint64_t from, struct kplc_stream **out,
		     struct kplc_status *st)
{
	Kpl__V1__WatchRunsRequest req = *src->req;

	req.from_global_seq = from;
	return kplc_watch_runs(c, &req, out, st);
}

static uint64_t seq_global(const Kpl__V1__RunEvent *ev)
{
	return ev->global_seq;
}

int kplc_follow_runs(struct kplc *c, const Kpl__V1__WatchRunsRequest *req,
		     const struct kplc_follow_options *opt, kplc_event_fn fn,
		     void *data, uint64_t *last_global_seq,
		     struct kplc_status *st)
{
	struct follow_src src = { .what = "watch runs", .open = open_runs,
				  .seq = seq_global, .req = req };
	uint64_t first = req->from_global_seq;
	uint64_t last = first > 0 ? first - 1 : 0;
	int rc = follow(c, &src, first, opt, fn, data, &last, st);

	if (last_global_seq)
		*last_global_seq = last;
	return rc;
}
