/*
 * pbjson_test.c - api/pbjson.c (proto3 JSON by descriptor) and
 * engine/tlsio.c (server TLS over memory BIOs, driven here by an OpenSSL
 * client in memory too): no loop, no sockets.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

#include "api/kpl.pb-c.h"
#include "api/pbjson.h"
#include "base/kpl.h"
#include "engine/tlsio.h"

/* Encodes m and checks the text. */
static void assert_json(const ProtobufCMessage *m, const char *want)
{
	size_t len;
	char *got = pbjson_encode(m, &len);

	assert_int_equal(len, strlen(got));
	assert_string_equal(got, want);
	free(got);
}

static void test_encode_run(void **state)
{
	Kpl__V1__Run run = KPL__V1__RUN__INIT;
	Kpl__V1__StageStatus st = KPL__V1__STAGE_STATUS__INIT, *stp = &st;
	Kpl__V1__Run__ParamsEntry pe = KPL__V1__RUN__PARAMS_ENTRY__INIT, *pep = &pe;
	Google__Protobuf__Timestamp ts = GOOGLE__PROTOBUF__TIMESTAMP__INIT;
	char *needs[] = { "a", "b\"c" };

	(void)state;
	/* Defaults are left out: an empty message is {}. */
	assert_json(&run.base, "{}");
	run.id = "01m91ms6279qs5ek";
	run.state = KPL__V1__RUN_STATE__RUN_STATE_RUNNING;
	run.last_seq = 18446744073709551615ull;
	run.attempt = 2;
	ts.seconds = 1780000000;
	ts.nanos = 5000000;
	run.created_at = &ts;
	pe.key = "version";
	pe.value = "1.2.3";
	run.params = &pep;
	run.n_params = 1;
	st.name = "build";
	st.state = KPL__V1__STAGE_STATE__STAGE_STATE_WAITING;
	st.needs = needs;
	st.n_needs = 2;
	run.stages = &stp;
	run.n_stages = 1;
	assert_json(&run.base,
		    "{\"id\":\"01m91ms6279qs5ek\",\"state\":\"RUN_STATE_RUNNING\","
		    "\"stages\":[{\"name\":\"build\",\"state\":\"STAGE_STATE_WAITING\","
		    "\"needs\":[\"a\",\"b\\\"c\"]}],\"createdAt\":\"2026-05-28T20:26:40.005Z\","
		    "\"params\":{\"version\":\"1.2.3\"},\"lastSeq\":\"18446744073709551615\","
		    "\"attempt\":2}");
}

static void test_encode_bad_utf8(void **state)
{
	Kpl__V1__RunEvent ev = KPL__V1__RUN_EVENT__INIT;

	(void)state;
	ev.message = "ok \xff\xfe end \xc3\xa9";
	assert_json(&ev.base, "{\"message\":\"ok \xef\xbf\xbd\xef\xbf\xbd end \xc3\xa9\"}");
	{
		char *q = pbjson_string("a\"b\n<\xff");
		assert_string_equal(q, "\"a\\\"b\\n<\xef\xbf\xbd\"");
		free(q);
	}
}

static ProtobufCMessage *decode_ok(const ProtobufCMessageDescriptor *d, const char *json)
{
	ProtobufCMessage *m = NULL;
	struct kpl_err err = { 0 };

	if (pbjson_decode(d, json, strlen(json), &m, &err))
		fail_msg("decode %s: %s", json, err.msg);
	return m;
}

/* Decoding fails with KPL_EINVAL and a message holding want. */
static void decode_bad(const ProtobufCMessageDescriptor *d, const char *json, const char *want)
{
	ProtobufCMessage *m = (void *)1;
	struct kpl_err err = { 0 };

	assert_int_equal(pbjson_decode(d, json, strlen(json), &m, &err), KPL_EINVAL);
	assert_null(m);
	if (!strstr(err.msg, want))
		fail_msg("decode %s: error %s lacks %s", json, err.msg, want);
}

static void test_decode(void **state)
{
	Kpl__V1__SubmitRunRequest *s;
	Kpl__V1__ListRunsRequest *l;
	Kpl__V1__WatchRunRequest *w;
	Kpl__V1__Run *r;

	(void)state;
	s = (void *)decode_ok(&kpl__v1__submit_run_request__descriptor,
			      "{\"pipeline\":\"x\",\"params\":{\"a\":\"1\",\"b\":\"\"},"
			      "\"idempotency_key\":\"k\"}");
	assert_string_equal(s->pipeline, "x");
	assert_int_equal(s->n_params, 2);
	assert_string_equal(s->params[1]->key, "b");
	assert_string_equal(s->idempotency_key, "k");
	protobuf_c_message_free_unpacked(&s->base, NULL);
	/* Both spellings, enums by name or number, null is unset. */
	l = (void *)decode_ok(&kpl__v1__list_runs_request__descriptor,
			      "{\"pipelineName\":\"web\",\"state\":4,\"page_size\":\"10\","
			      "\"pageToken\":null}");
	assert_string_equal(l->pipeline_name, "web");
	assert_int_equal(l->state, KPL__V1__RUN_STATE__RUN_STATE_FAILED);
	assert_int_equal(l->page_size, 10);
	assert_string_equal(l->page_token, "");
	protobuf_c_message_free_unpacked(&l->base, NULL);
	/* uint64 as a string or a number; blank text is {}. */
	w = (void *)decode_ok(&kpl__v1__watch_run_request__descriptor,
			      "{\"fromSeq\":\"18446744073709551615\"}");
	assert_true(w->from_seq == 18446744073709551615ull);
	protobuf_c_message_free_unpacked(&w->base, NULL);
	w = (void *)decode_ok(&kpl__v1__watch_run_request__descriptor, " \n");
	assert_true(w->from_seq == 0);
	protobuf_c_message_free_unpacked(&w->base, NULL);
	r = (void *)decode_ok(&kpl__v1__run__descriptor,
			      "{\"createdAt\":\"2026-05-28T22:26:40.005+02:00\"}");
	assert_true(r->created_at->seconds == 1780000000 && r->created_at->nanos == 5000000);
	protobuf_c_message_free_unpacked(&r->base, NULL);
}

static void test_decode_errors(void **state)
{
	const ProtobufCMessageDescriptor *sub = &kpl__v1__submit_run_request__descriptor;
	char deep[200];

	(void)state;
	decode_bad(sub, "{\"pipelin\":\"x\"}", "pipelin: unknown field of kpl.v1.SubmitRunRequest");
	decode_bad(sub, "{\"pipeline\":1}", "pipeline: want a string");
	decode_bad(sub, "{\"params\":{\"a\":2}}", "params.a: want a string");
	decode_bad(sub, "{\"pipeline\":\"x\",\"pipeline\":\"y\"}", "not JSON");
	decode_bad(sub, "[]", "want an object");
	decode_bad(sub, "{\"pipeline\":", "not JSON");
	decode_bad(&kpl__v1__list_runs_request__descriptor, "{\"state\":\"RUNNING\"}",
		   "state: want a value of kpl.v1.RunState");
	decode_bad(&kpl__v1__list_runs_request__descriptor, "{\"pageSize\":3000000000}",
		   "pageSize: want a 32-bit");
	decode_bad(&kpl__v1__watch_run_request__descriptor, "{\"fromSeq\":-1}",
		   "fromSeq: want a 64-bit whole number, not negative");
	decode_bad(&kpl__v1__run__descriptor, "{\"stages\":[{\"name\":\"a\"},{\"nme\":1}]}",
		   "stages[1].nme: unknown field");
	decode_bad(&kpl__v1__run__descriptor, "{\"stages\":[null]}", "stages[0]: null");
	decode_bad(&kpl__v1__run__descriptor, "{\"createdAt\":\"yesterday\"}", "createdAt: want");
	memset(deep, '[', 40);
	memset(deep + 40, ']', 40);
	deep[80] = '\0';
	{
		char body[300];
		snprintf(body, sizeof body, "{\"pipeline\":%s}", deep);
		decode_bad(sub, body, "nested deeper than 32");
	}
}

static void test_set_field(void **state)
{
	Kpl__V1__WatchRunsRequest w = KPL__V1__WATCH_RUNS_REQUEST__INIT;
	Kpl__V1__ListRunsRequest *l;
	struct kpl_err err = { 0 };

	(void)state;
	l = (void *)decode_ok(&kpl__v1__list_runs_request__descriptor, "{}");
	assert_int_equal(pbjson_set_field(&l->base, "page_size", "7", &err), 0);
	assert_int_equal(pbjson_set_field(&l->base, "state", "RUN_STATE_QUEUED", &err), 0);
	assert_int_equal(pbjson_set_field(&l->base, "pipelineName", "a b", &err), 0);
	assert_int_equal(pbjson_set_field(&l->base, "pipelineName", "c", &err), 0);
	assert_int_equal(l->page_size, 7);
	assert_int_equal(l->state, KPL__V1__RUN_STATE__RUN_STATE_QUEUED);
	assert_string_equal(l->pipeline_name, "c");
	assert_int_equal(pbjson_set_field(&l->base, "page_size", "x", &err), KPL_EINVAL);
	assert_non_null(strstr(err.msg, "page_size"));
	assert_int_equal(pbjson_set_field(&l->base, "nope", "1", &err), KPL_EINVAL);
	assert_non_null(strstr(err.msg, "nope: unknown field"));
	protobuf_c_message_free_unpacked(&l->base, NULL);
	/* Repeated: each value appended. */
	assert_int_equal(pbjson_set_field(&w.base, "kinds", "EVENT_KIND_LOG", &err), 0);
	assert_int_equal(pbjson_set_field(&w.base, "kinds", "1", &err), 0);
	assert_int_equal(w.n_kinds, 2);
	assert_int_equal(w.kinds[0], KPL__V1__EVENT_KIND__EVENT_KIND_LOG);
	assert_int_equal(w.kinds[1], KPL__V1__EVENT_KIND__EVENT_KIND_RUN_STATE);
	free(w.kinds);
}

/* --- tlsio, against an OpenSSL client in memory --- */

static void make_cert(char *dir, char *cert, char *key)
{
	char cmd[2048];

	snprintf(dir, 256, "%s/pbjson-XXXXXX",
		 getenv("TEST_TMPDIR") ? getenv("TEST_TMPDIR") : "/tmp");
	assert_non_null(mkdtemp(dir));
	snprintf(cert, 512, "%s/cert.pem", dir);
	snprintf(key, 512, "%s/key.pem", dir);
	snprintf(cmd, sizeof cmd,
		 "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes "
		 "-keyout %s -out %s -days 2 -subj /CN=kpl-test >/dev/null 2>&1", key, cert);
	assert_int_equal(system(cmd), 0);
}

/* Moves what one side has for the other. */
static void pump_to_server(BIO *cli_out, struct tlsio *t, char **plain, size_t *n, int *rc)
{
	char buf[65536];
	int k = BIO_read(cli_out, buf, sizeof buf);

	*rc = tlsio_feed(t, buf, k > 0 ? (size_t)k : 0, plain, n);
}

static void pump_to_client(struct tlsio *t, BIO *cli_in)
{
	size_t n;
	char *out = tlsio_take_out(t, &n);

	if (out)
		assert_int_equal(BIO_write(cli_in, out, (int)n), (int)n);
	free(out);
}

static void test_tlsio(void **state)
{
	char dir[256], cert[512], key[512], *plain = NULL, buf[64];
	struct tlsio_ctx *ctx;
	struct kpl_err err = { 0 };
	struct tlsio *t;
	SSL_CTX *cctx = SSL_CTX_new(TLS_client_method());
	SSL *cli = SSL_new(cctx);
	BIO *cin = BIO_new(BIO_s_mem()), *cout = BIO_new(BIO_s_mem());
	size_t n;
	int rc, i;

	(void)state;
	make_cert(dir, cert, key);
	assert_int_equal(tlsio_ctx_new(cert, "/nonexistent.pem", &ctx, &err), KPL_EINVAL);
	assert_non_null(strstr(err.msg, "/nonexistent.pem"));
	assert_int_equal(tlsio_ctx_new(cert, key, &ctx, &err), 0);
	t = tlsio_new(ctx);
	BIO_set_mem_eof_return(cin, -1);
	BIO_set_mem_eof_return(cout, -1);
	SSL_set_bio(cli, cin, cout);
	SSL_set_connect_state(cli);
	/* Handshake: a few flights each way. */
	for (i = 0; i < 10 && !SSL_is_init_finished(cli); i++) {
		SSL_do_handshake(cli);
		pump_to_server(cout, t, &plain, &n, &rc);
		assert_int_equal(rc, 0);
		assert_null(plain);
		pump_to_client(t, cin);
	}
	assert_true(SSL_is_init_finished(cli));
	/* Client to server. */
	assert_int_equal(SSL_write(cli, "GET / HTTP/1.1\r\n\r\n", 18), 18);
	pump_to_server(cout, t, &plain, &n, &rc);
	assert_int_equal(rc, 0);
	assert_int_equal(n, 18);
	assert_memory_equal(plain, "GET / HTTP/1.1\r\n\r\n", 18);
	free(plain);
	/* Server to client. */
	assert_int_equal(tlsio_write(t, "HTTP/1.1 200 OK\r\n", 17), 0);
	pump_to_client(t, cin);
	assert_int_equal(SSL_read(cli, buf, sizeof buf), 17);
	assert_memory_equal(buf, "HTTP/1.1 200 OK\r\n", 17);
	/* close_notify reads as the end. */
	SSL_shutdown(cli);
	pump_to_server(cout, t, &plain, &n, &rc);
	assert_int_equal(rc, 1);
	free(plain);
	tlsio_free(t);
	/* Garbage instead of a ClientHello is an error, not a hang. */
	t = tlsio_new(ctx);
	assert_int_equal(tlsio_feed(t, "GET / HTTP/1.1\r\nHost: x\r\n\r\n", 27, &plain, &n), -1);
	assert_null(plain);
	tlsio_free(t);
	tlsio_ctx_free(ctx);
	SSL_free(cli);
	SSL_CTX_free(cctx);
	unlink(cert);
	unlink(key);
	rmdir(dir);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_encode_run),
		cmocka_unit_test(test_encode_bad_utf8),
		cmocka_unit_test(test_decode),
		cmocka_unit_test(test_decode_errors),
		cmocka_unit_test(test_set_field),
		cmocka_unit_test(test_tlsio),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
