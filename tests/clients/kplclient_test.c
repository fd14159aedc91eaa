/*
 * kplclient_test.c - the client library against tests/clients/fake_pipelines.py
 * (started by with_fake.sh, which sets KPL_SERVER): unary success and error
 * statuses, deadlines, the token, streams read to the end or closed early,
 * kplc_follow_run over a broken stream, the ValidatePipeline, ApproveStage
 * and RetryRun wrappers, and kplc_follow_runs resumed and stopped; the
 * idle tick of a follow; the secret, release and rollback wrappers.
 */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "clients/kplclient.h"
#include "base/kpl.h"

static const char *server(void)
{
	const char *s = getenv("KPL_SERVER");

	if (!s || !*s)
		fail_msg("KPL_SERVER is not set; run under with_fake.sh");
	return s;
}

static struct kplc *client(const struct kplc_options *opt)
{
	struct kpl_err err = { 0 };
	struct kplc *c = NULL;

	assert_int_equal(kplc_connect_opts(server(), opt, &c, &err), 0);
	assert_non_null(c);
	return c;
}

/* Submits a pipeline with stages build and test and the given markers. */
static char *submit(struct kplc *c, const char *markers)
{
	Kpl__V1__SubmitRunRequest req = KPL__V1__SUBMIT_RUN_REQUEST__INIT;
	struct kplc_status st;
	Kpl__V1__Run *r = NULL;
	char *id;

	req.pipeline = kpl_asprintf("name: lib\n%s\nstages:\n  - name: build\n"
				    "  - name: test\n", markers);
	assert_int_equal(kplc_submit_run(c, &req, &r, &st), 0);
	assert_int_equal(st.code, KPLC_OK);
	assert_string_equal(r->pipeline_name, "lib");
	assert_int_equal(r->n_stages, 2);
	id = kpl_strdup(r->id);
	kplc_msg_free(r);
	free(req.pipeline);
	return id;
}

static void test_status_names(void **state)
{
	assert_string_equal(kplc_status_name(0), "OK");
	assert_string_equal(kplc_status_name(5), "NOT_FOUND");
	assert_string_equal(kplc_status_name(14), "UNAVAILABLE");
	assert_string_equal(kplc_status_name(16), "UNAUTHENTICATED");
	assert_string_equal(kplc_status_name(17), "UNKNOWN_STATUS");
	assert_string_equal(kplc_status_name(-1), "UNKNOWN_STATUS");
	assert_int_equal(kplc_status_to_err(KPLC_OK), 0);
	assert_int_equal(kplc_status_to_err(KPLC_NOT_FOUND), KPL_ENOTFOUND);
	assert_int_equal(kplc_status_to_err(KPLC_INVALID_ARGUMENT), KPL_EINVAL);
	assert_int_equal(kplc_status_to_err(KPLC_UNAVAILABLE), KPL_EUNAVAILABLE);
	assert_int_equal(kplc_status_to_err(KPLC_DEADLINE_EXCEEDED), KPL_ETIMEOUT);
	assert_int_equal(kplc_status_to_err(KPLC_DATA_LOSS), KPL_EINTERNAL);
}

static void test_connect_errors(void **state)
{
	struct kplc_options opt = { .tls_ca_file = "/nonexistent/ca.pem" };
	struct kpl_err err = { 0 };
	struct kplc *c = (struct kplc *)&err;

	assert_int_equal(kplc_connect("", &c, &err), KPL_EINVAL);
	assert_null(c);
	assert_string_equal(err.msg, "empty server address");
	assert_int_equal(kplc_connect_opts("127.0.0.1:1", &opt, &c, &err), KPL_EIO);
	assert_null(c);
	assert_non_null(strstr(err.msg, "/nonexistent/ca.pem"));
}

/* A client certificate: both files or neither, only over TLS, and an
 * unreadable file named. (That a server with --client-ca takes it is
 * tests/e2e/security_test.py.) */
static void test_connect_cert_errors(void **state)
{
	char dir[] = "/tmp/kplc-cert-XXXXXX", ca[64], cert[64], key[64];
	struct kplc_options opt = { 0 };
	struct kpl_err err = { 0 };
	struct kplc *c = (struct kplc *)&err;
	FILE *f;

	assert_non_null(mkdtemp(dir));
	snprintf(ca, sizeof ca, "%s/ca.pem", dir);
	snprintf(cert, sizeof cert, "%s/cli.pem", dir);
	snprintf(key, sizeof key, "%s/cli.key", dir);
	/* Not a real CA: grpc reads the PEM when it first connects, and
	 * these tests never do. */
	assert_non_null(f = fopen(ca, "w"));
	fputs("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n", f);
	fclose(f);
	assert_non_null(f = fopen(cert, "w"));
	fputs("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n", f);
	fclose(f);

	opt.tls_ca_file = ca;
	opt.tls_cert_file = cert;
	assert_int_equal(kplc_connect_opts("127.0.0.1:1", &opt, &c, &err), KPL_EINVAL);
	assert_null(c);
	assert_non_null(strstr(err.msg, cert));
	assert_non_null(strstr(err.msg, "both"));

	opt.tls_cert_file = NULL;
	opt.tls_key_file = key;
	assert_int_equal(kplc_connect_opts("127.0.0.1:1", &opt, &c, &err), KPL_EINVAL);
	assert_non_null(strstr(err.msg, key));

	opt.tls_cert_file = cert;
	assert_int_equal(kplc_connect_opts("127.0.0.1:1", &opt, &c, &err), KPL_EIO);
	assert_null(c);
	assert_non_null(strstr(err.msg, "tls key"));
	assert_non_null(strstr(err.msg, key));

	opt.tls_ca_file = NULL;
	assert_int_equal(kplc_connect_opts("127.0.0.1:1", &opt, &c, &err), KPL_EINVAL);
	assert_non_null(strstr(err.msg, "CA"));

	/* Both readable: the channel is made (grpc connects lazily). */
	assert_non_null(f = fopen(key, "w"));
	fputs("-----BEGIN PRIVATE KEY-----\n-----END PRIVATE KEY-----\n", f);
	fclose(f);
	opt.tls_ca_file = ca;
	assert_int_equal(kplc_connect_opts("127.0.0.1:1", &opt, &c, &err), 0);
	assert_non_null(c);
	kplc_free(c);

	unlink(ca);
	unlink(cert);
	unlink(key);
	rmdir(dir);
}

static void test_unary(void **state)
{
	struct kplc *c = client(NULL);
	struct kplc_status st;
	Kpl__V1__Run *r = (Kpl__V1__Run *)&st;
	char *id = submit(c, "");

	assert_int_equal(kplc_get_run(c, id, &r, &st), 0);
	assert_string_equal(r->id, id);
	kplc_msg_free(r);

	assert_int_equal(kplc_get_run(c, "nope", &r, &st), KPL_ENOTFOUND);
	assert_null(r);
	assert_int_equal(st.code, KPLC_NOT_FOUND);
	assert_string_equal(st.message, "run \"nope\" not found");

	/* The generic call, with a method the server does not have. */
	Kpl__V1__GetRunRequest req = KPL__V1__GET_RUN_REQUEST__INIT;
	ProtobufCMessage *m = (ProtobufCMessage *)&st;
	req.id = id;
	assert_int_equal(kplc_call_unary(c, "/kpl.v1.Pipelines/Nope", &req.base,
					 &kpl__v1__run__descriptor, &m, &st),
			 KPL_EINTERNAL);
	assert_null(m);
	assert_int_equal(st.code, KPLC_UNIMPLEMENTED);

	free(id);
	kplc_free(c);
}

static void test_unreachable(void **state)
{
	struct kpl_err err = { 0 };
	struct kplc_status st;
	struct kplc *c = NULL;
	Kpl__V1__Run *r;

	assert_int_equal(kplc_connect("127.0.0.1:1", &c, &err), 0);
	assert_int_equal(kplc_get_run(c, "x", &r, &st), KPL_EUNAVAILABLE);
	assert_int_equal(st.code, KPLC_UNAVAILABLE);
	assert_true(st.message[0] != '\0');
	kplc_free(c);
}

static void test_deadline(void **state)
{
	struct kplc_options opt = { .deadline_ms = 300 };
	struct kplc *c = client(&opt);
	struct kplc_status st;
	Kpl__V1__Run *r;

	/* The fake answers "sleep-1" NOT_FOUND after 2 s: DEADLINE_EXCEEDED
	 * says the 300 ms deadline ended the call first. */
	assert_int_equal(kplc_get_run(c, "sleep-1", &r, &st), KPL_ETIMEOUT);
	assert_int_equal(st.code, KPLC_DEADLINE_EXCEEDED);
	kplc_free(c);
}

static void test_token(void **state)
{
	struct kplc_options opt = { .token = "s3cret" };
	struct kplc *c = client(&opt);
	struct kplc_status st;
	Kpl__V1__Run *r;

	assert_int_equal(kplc_get_run(c, "whoami", &r, &st), 0);
	assert_string_equal(r->message, "Bearer s3cret");
	kplc_msg_free(r);
	kplc_free(c);

	c = client(NULL);
	assert_int_equal(kplc_get_run(c, "whoami", &r, &st), 0);
	assert_string_equal(r->message, "");
	kplc_msg_free(r);
	kplc_free(c);
}

static void test_stream_to_end(void **state)
{
	struct kplc *c = client(NULL);
	struct kplc_stream *s = NULL;
	struct kplc_status st;
	Kpl__V1__RunEvent *ev;
	char *id = submit(c, "");
	uint64_t want = 1;
	int rc;

	assert_int_equal(kplc_watch_run(c, id, 0, &s, &st), 0);
	while ((rc = kplc_watch_next(s, &ev, &st)) == 1) {
		assert_int_equal(ev->seq, want);
		assert_string_equal(ev->run_id, id);
		want++;
		kplc_msg_free(ev);
	}
	assert_int_equal(rc, 0);
	assert_int_equal(st.code, KPLC_OK);
	assert_int_equal(want, 11); /* 2 run + 2 x 4 stage events */
	/* The end is sticky. */
	assert_int_equal(kplc_watch_next(s, &ev, &st), 0);
	assert_null(ev);
	kplc_stream_close(s);
	free(id);
	kplc_free(c);
}

static void test_stream_errors_and_early_close(void **state)
{
	struct kplc *c = client(NULL);
	struct kplc_stream *s = NULL;
	struct kplc_status st;
	Kpl__V1__RunEvent *ev;
	char *id = submit(c, "");

	/* The server's error arrives through next, and stays. */
	assert_int_equal(kplc_watch_run(c, "nope", 1, &s, &st), 0);
	assert_int_equal(kplc_watch_next(s, &ev, &st), KPL_ENOTFOUND);
	assert_int_equal(st.code, KPLC_NOT_FOUND);
	assert_int_equal(kplc_watch_next(s, &ev, &st), KPL_ENOTFOUND);
	kplc_stream_close(s);

	/* A stream closed in the middle is cancelled without blocking. */
	assert_int_equal(kplc_watch_run(c, id, 1, &s, &st), 0);
	assert_int_equal(kplc_watch_next(s, &ev, &st), 1);
	kplc_msg_free(ev);
	kplc_stream_close(s);

	/* A broken stream reports UNAVAILABLE. */
	free(id);
	id = submit(c, "# fake: break-after 2");
	assert_int_equal(kplc_watch_run(c, id, 1, &s, &st), 0);
	for (int i = 0; i < 2; i++) {
		assert_int_equal(kplc_watch_next(s, &ev, &st), 1);
		kplc_msg_free(ev);
	}
	assert_int_equal(kplc_watch_next(s, &ev, &st), KPL_EUNAVAILABLE);
	assert_int_equal(st.code, KPLC_UNAVAILABLE);
	assert_string_equal(st.message, "fake: stream broken");
	kplc_stream_close(s);
	free(id);
	kplc_free(c);
}

struct seen {
	uint64_t seqs[64];
	int n;
	int stop_at; /* return 7 after this many events; 0 never */
};

static int on_event(const Kpl__V1__RunEvent *ev, void *data)
{
	struct seen *sn = data;

	assert_true(sn->n < 64);
	sn->seqs[sn->n++] = ev->seq;
	return sn->stop_at && sn->n == sn->stop_at ? 7 : 0;
}

static void test_follow(void **state)
{
	struct kplc_follow_options fo = { .initial_backoff_ms = 10 };
	struct kplc *c = client(NULL);
	struct kplc_status st;
	struct seen sn = { .n = 0 };
	uint64_t last = 0;
	char *id;

	/* Broken after 3 events, and the server resends from 1 on resume:
	 * still 1..10, once each. */
	id = submit(c, "# fake: break-after 3\n# fake: resend");
	assert_int_equal(kplc_follow_run(c, id, 0, &fo, on_event, &sn, &last, &st), 0);
	assert_int_equal(sn.n, 10);
	for (int i = 0; i < sn.n; i++)
		assert_int_equal(sn.seqs[i], (uint64_t)i + 1);
	assert_int_equal(last, 10);
	free(id);

	/* The callback stops it; its value comes back. */
	id = submit(c, "");
	memset(&sn, 0, sizeof sn);
	sn.stop_at = 2;
	assert_int_equal(kplc_follow_run(c, id, 4, &fo, on_event, &sn, &last, &st), 7);
	assert_int_equal(sn.n, 2);
	assert_int_equal(sn.seqs[0], 4);
	assert_int_equal(last, 5);
	free(id);

	/* Errors other than UNAVAILABLE are not retried. */
	memset(&sn, 0, sizeof sn);
	assert_int_equal(kplc_follow_run(c, "nope", 1, &fo, on_event, &sn, &last, &st),
			 KPL_ENOTFOUND);
	assert_int_equal(sn.n, 0);
	kplc_free(c);
}

static void sleep_ms(int ms)
{
	struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };

	nanosleep(&ts, NULL);
}

static void test_validate(void **state)
{
	Kpl__V1__ValidatePipelineResponse *v = NULL;
	struct kplc *c = client(NULL);
	struct kplc_status st;

	assert_int_equal(kplc_validate_pipeline(
				 c, "name: v\nstages:\n  - name: a\n    kind: shell\n",
				 &v, &st), 0);
	assert_true(v->valid);
	assert_int_equal(v->n_diagnostics, 0);
	assert_string_equal(v->pipeline_name, "v");
	kplc_msg_free(v);

	/* Invalid is an answer, not an RPC error. */
	assert_int_equal(kplc_validate_pipeline(
				 c, "name: v\nstages:\n  - name: a\n    kind: shel\n",
				 &v, &st), 0);
	assert_int_equal(st.code, KPLC_OK);
	assert_false(v->valid);
	assert_int_equal(v->n_diagnostics, 1);
	assert_int_equal(v->diagnostics[0]->line, 4);
	assert_int_equal(v->diagnostics[0]->column, 11);
	assert_string_equal(v->diagnostics[0]->path, "stages[0].kind");
	assert_int_equal(v->diagnostics[0]->severity,
			 KPL__V1__SEVERITY__SEVERITY_ERROR);
	kplc_msg_free(v);
	kplc_free(c);
}

/* Waits (at most 10 s) until stage of run id is in state want. */
static void wait_stage(struct kplc *c, const char *id, const char *stage,
		       int want)
{
	for (int i = 0; i < 200; i++) {
		struct kplc_status st;
		Kpl__V1__Run *r = NULL;
		int state = -1;

		assert_int_equal(kplc_get_run(c, id, &r, &st), 0);
		for (size_t k = 0; k < r->n_stages; k++)
			if (!strcmp(r->stages[k]->name, stage))
				state = r->stages[k]->state;
		kplc_msg_free(r);
		if (state == want)
			return;
		sleep_ms(50);
	}
	fail_msg("stage %s of %s never reached state %d", stage, id, want);
}

static void test_approve_retry(void **state)
{
	Kpl__V1__ApproveStageRequest req = KPL__V1__APPROVE_STAGE_REQUEST__INIT;
	struct kplc *c = client(NULL);
	struct kplc_status st;
	Kpl__V1__Run *r = NULL;
	char *id = submit(c, "# fake: approval test");

	req.run_id = id;
	req.stage = "test";
	req.approve = 0;
	req.comment = "not today";
	req.by = "lib";
	/* Not yet waiting: FAILED_PRECONDITION, as a KPL_ESTATE. */
	assert_int_equal(kplc_approve_stage(c, &req, &r, &st), KPL_ESTATE);
	assert_null(r);
	assert_int_equal(st.code, KPLC_FAILED_PRECONDITION);

	wait_stage(c, id, "test", KPL__V1__STAGE_STATE__STAGE_STATE_WAITING);
	assert_int_equal(kplc_approve_stage(c, &req, &r, &st), 0);
	assert_int_equal(r->state, KPL__V1__RUN_STATE__RUN_STATE_FAILED);
	assert_int_equal(r->attempt, 1);
	assert_string_equal(r->stages[1]->message, "rejected by lib: not today");
	kplc_msg_free(r);

	assert_int_equal(kplc_retry_run(c, id, &r, &st), 0);
	assert_int_equal(r->attempt, 2);
	kplc_msg_free(r);
	assert_int_equal(kplc_retry_run(c, "nope", &r, &st), KPL_ENOTFOUND);
	assert_null(r);
	free(id);
	kplc_free(c);
}

struct gseen {
	uint64_t gseqs[64];
	char *run;
	int n;
	int stop_at; /* return 9 after this many events; 0 never */
};

static int on_global(const Kpl__V1__RunEvent *ev, void *data)
{
	struct gseen *g = data;

	assert_string_equal(ev->pipeline_name, "lib");
	assert_int_equal(ev->kind, KPL__V1__EVENT_KIND__EVENT_KIND_STAGE_STATE);
	if (!g->run || strcmp(ev->run_id, g->run))
		return 0;
	assert_true(g->n < 64);
	g->gseqs[g->n++] = ev->global_seq;
	return g->stop_at && g->n == g->stop_at ? 9 : 0;
}

static volatile sig_atomic_t stop_flag;

static void *set_stop(void *arg)
{
	(void)arg;
	sleep_ms(300);
	stop_flag = 1;
	return NULL;
}

static void test_follow_runs(void **state)
{
	struct kplc_follow_options fo = { .initial_backoff_ms = 10 };
	Kpl__V1__WatchRunsRequest req = KPL__V1__WATCH_RUNS_REQUEST__INIT;
	Kpl__V1__EventKind kinds[] = {
		KPL__V1__EVENT_KIND__EVENT_KIND_STAGE_STATE,
	};
	struct kplc *c = client(NULL);
	struct kplc_status st;
	struct gseen g = { .n = 0 };
	uint64_t last = 0;
	pthread_t t;

	/* Broken after the run's first event, resumed by global seq: the 4
	 * stage events of the run, each once, in order (other tests' runs
	 * of "lib" come too, and are not counted). */
	g.run = submit(c, "# fake: break-events");
	g.stop_at = 4;
	req.from_global_seq = 1;
	req.pipeline_name = "lib";
	req.n_kinds = 1;
	req.kinds = kinds;
	assert_int_equal(kplc_follow_runs(c, &req, &fo, on_global, &g, &last, &st), 9);
	assert_int_equal(g.n, 4);
	for (int i = 1; i < g.n; i++)
		assert_true(g.gseqs[i] > g.gseqs[i - 1]);
	assert_int_equal(last, g.gseqs[3]);
	free(g.run);

	/* Nothing comes (only new events of a pipeline nobody runs): the
	 * stop flag ends the wait within about 100 ms. */
	req.from_global_seq = 0;
	req.pipeline_name = "nobody";
	fo.stop = &stop_flag;
	memset(&g, 0, sizeof g);
	assert_int_equal(pthread_create(&t, NULL, set_stop, NULL), 0);
	assert_int_equal(kplc_follow_runs(c, &req, &fo, on_global, &g, &last, &st),
			 KPL_ECANCELLED);
	pthread_join(t, NULL);
	assert_int_equal(st.code, KPLC_CANCELLED);
	assert_int_equal(g.n, 0);
	assert_int_equal(last, 0);
	kplc_free(c);
}

struct idle {
	int ticks, events;
	volatile sig_atomic_t stop;
};

static void on_idle(void *data)
{
	struct idle *id = data;

	if (++id->ticks == 3)
		id->stop = 1;
}

static int count_event(const Kpl__V1__RunEvent *ev, void *data)
{
	((struct idle *)data)->events++;
	return 0;
}

/* A run that waits for an approval sends nothing for a while: the idle
 * callback ticks about every 100 ms meanwhile, and may stop the follow. */
static void test_follow_idle(void **state)
{
	struct idle id = { 0 };
	struct kplc_follow_options fo = { .stop = &id.stop, .idle = on_idle,
					  .idle_data = &id };
	struct kplc *c = client(NULL);
	struct kplc_status st;
	char *run = submit(c, "# fake: approval test");
	int64_t t0 = kpl_now_ms();

	assert_int_equal(kplc_follow_run(c, run, 1, &fo, count_event, &id, NULL, &st),
			 KPL_ECANCELLED);
	assert_int_equal(st.code, KPLC_CANCELLED);
	assert_int_equal(id.ticks, 3);
	assert_true(id.events >= 6); /* up to test WAITING */
	assert_true(kpl_now_ms() - t0 >= 250); /* three ticks about 100 ms apart */
	free(run);
	kplc_free(c);
}

static void test_secrets_releases_rollback(void **state)
{
	struct kplc *c = client(NULL);
	Kpl__V1__ListSecretsResponse *ls;
	Kpl__V1__ListReleasesResponse *lr;
	struct kplc_status st;
	Kpl__V1__Secret *sec;
	Kpl__V1__Run *r;

	assert_int_equal(kplc_set_secret(c, "LIB_S", "value-1", &sec, &st), 0);
	assert_string_equal(sec->name, "LIB_S");
	kplc_msg_free(sec);
	assert_int_equal(kplc_set_secret(c, "LIB_T", "ab", &sec, &st), KPL_EINVAL);
	assert_null(sec);
	assert_int_equal(st.code, KPLC_INVALID_ARGUMENT);
	assert_int_equal(kplc_list_secrets(c, &ls, &st), 0);
	assert_int_equal(ls->n_secrets, 1);
	assert_string_equal(ls->secrets[0]->name, "LIB_S");
	kplc_msg_free(ls);
	assert_int_equal(kplc_delete_secret(c, "LIB_S", &sec, &st), 0);
	kplc_msg_free(sec);
	assert_int_equal(kplc_delete_secret(c, "LIB_S", &sec, &st), KPL_ENOTFOUND);

	assert_int_equal(kplc_list_releases(c, "prod/shop/web", 1, &lr, &st), 0);
	assert_int_equal(lr->n_releases, 1);
	assert_int_equal(lr->releases[0]->seq, 2);
	assert_string_equal(lr->releases[0]->previous_image, "registry.example/web:1.1");
	kplc_msg_free(lr);
	assert_int_equal(kplc_list_releases(c, "web", 0, &lr, &st), KPL_EINVAL);

	assert_int_equal(kplc_rollback_release(c, "prod/shop/web", NULL, &r, &st), 0);
	assert_string_equal(r->pipeline_name, "rollback-web");
	kplc_msg_free(r);
	kplc_free(c);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_status_names),
		cmocka_unit_test(test_connect_errors),
		cmocka_unit_test(test_connect_cert_errors),
		cmocka_unit_test(test_unary),
		cmocka_unit_test(test_unreachable),
		cmocka_unit_test(test_deadline),
		cmocka_unit_test(test_token),
		cmocka_unit_test(test_stream_to_end),
		cmocka_unit_test(test_stream_errors_and_early_close),
		cmocka_unit_test(test_follow),
		cmocka_unit_test(test_validate),
		cmocka_unit_test(test_approve_retry),
		cmocka_unit_test(test_follow_runs),
		cmocka_unit_test(test_follow_idle),
		cmocka_unit_test(test_secrets_releases_rollback),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
