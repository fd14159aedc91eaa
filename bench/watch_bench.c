/*
 * watch_bench.c - many followers of one run: the delay from an event's commit
 * (its time, set by kpld when it is made, milliseconds) to its arrival at
 * each of N concurrent WatchRun streams, and kpld's memory per open stream.
 *
 *   watch_bench --ready-file PATH [--watchers N] [--conns C] [--lines L]
 *               [--interval-ms I] [--kpld-pid PID] [--cqs Q]
 *
 * It submits a run whose first stage waits for approval and whose second
 * prints L lines I ms apart; opens N WatchRun streams on it over C raw grpc
 * channels (each its own TCP connection: GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL),
 * spread over Q completion queues, each drained by its own thread (Debian's
 * libgrpc, built without NDEBUG, looks each completed tag up in a flat array
 * of the queue's outstanding tags: with 10,000 streams on one queue the
 * client, not kpld, was the limit); once every stream has
 * its first event, reads kpld's VmRSS, approves, and measures each log
 * line's delay at each stream until every stream has seen the run end.
 * kpld needs --max-streams > N and --max-streams-per-conn >= N/C.
 *
 * Prints "watchers_delay_ms=p99 (p50, max, counts; ...)" and
 * "watchers_rss_per_stream_kib=..." lines. Exit 0 if every stream saw
 * every line and the run's end.
 */
#include <errno.h>
#include <getopt.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/time.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "clients/kplclient.h"

#define MAX_DELAY_MS 60000 /* histogram bound; later counts as this */
#define SEND_TAG ((void *)(intptr_t)-2) /* the requests' send batches */

struct watcher {
	grpc_call *call;
	grpc_byte_buffer *in;
	grpc_metadata_array imd, tmd;
	grpc_status_code code;
	grpc_slice details;
	long lines;       /* log lines received */
	bool first, ended, failed;
};

static struct {
	struct watcher *w;
	int n;
	grpc_completion_queue **cqs;
	int n_cqs;
	atomic_long hist[MAX_DELAY_MS + 1];
	atomic_int firsts, ended, failed, closed;
} g;

static int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void die(const char *what, const struct kplc_status *st)
{
	fprintf(stderr, "watch_bench: %s%s%s\n", what, st ? ": " : "", st ? st->message : "");
	exit(1);
}

/* Tags: the watcher's index * 2, + 1 for its final status. */
static void recv_next(struct watcher *w, intptr_t i)
{
	grpc_op op = { 0 };

	op.op = GRPC_OP_RECV_MESSAGE;
	op.data.recv_message.recv_message = &w->in;
	if (grpc_call_start_batch(w->call, &op, 1, (void *)(i * 2), NULL) != GRPC_CALL_OK)
		die("grpc_call_start_batch (recv)", NULL);
}

static void on_message(struct watcher *w, intptr_t i)
{
	grpc_byte_buffer_reader r;
	grpc_slice all;
	Kpl__V1__RunEvent *ev;

	if (!w->in) { /* the stream ended: its status tag follows */
		return;
	}
	grpc_byte_buffer_reader_init(&r, w->in);
	all = grpc_byte_buffer_reader_readall(&r);
	grpc_byte_buffer_reader_destroy(&r);
	grpc_byte_buffer_destroy(w->in);
	w->in = NULL;
	ev = kpl__v1__run_event__unpack(NULL, GRPC_SLICE_LENGTH(all), GRPC_SLICE_START_PTR(all));
	grpc_slice_unref(all);
	if (!ev) {
		w->failed = true;
		return;
	}
	if (!w->first) {
		w->first = true;
		atomic_fetch_add(&g.firsts, 1);
	}
	if (ev->kind == KPL__V1__EVENT_KIND__EVENT_KIND_LOG &&
	    ev->stream == KPL__V1__LOG_STREAM__LOG_STREAM_STDOUT && ev->time) {
		int64_t d = now_ms() - (ev->time->seconds * 1000 + ev->time->nanos / 1000000);

		atomic_fetch_add(&g.hist[d < 0 ? 0 : d > MAX_DELAY_MS ? MAX_DELAY_MS : d], 1);
		w->lines++;
	}
	if (ev->kind == KPL__V1__EVENT_KIND__EVENT_KIND_RUN_STATE &&
	    (ev->run_state == KPL__V1__RUN_STATE__RUN_STATE_SUCCEEDED ||
	     ev->run_state == KPL__V1__RUN_STATE__RUN_STATE_FAILED ||
	     ev->run_state == KPL__V1__RUN_STATE__RUN_STATE_CANCELLED) && !w->ended) {
		w->ended = true;
		atomic_fetch_add(&g.ended, 1);
	}
	kpl__v1__run_event__free_unpacked(ev, NULL);
	recv_next(w, i);
}

static void *drive(void *arg)
{
	grpc_completion_queue *cq = arg;

	for (;;) {
		grpc_event e = grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME),
							  NULL);
		intptr_t tag, i;

		if (e.type == GRPC_QUEUE_SHUTDOWN)
			return NULL;
		if (e.type != GRPC_OP_COMPLETE)
			continue;
		tag = (intptr_t)e.tag;
		if (tag < 0)
			continue;
		i = tag / 2;
		if (tag % 2 == 1) {
			if (g.w[i].code != GRPC_STATUS_OK && !g.w[i].ended) {
				g.w[i].failed = true;
				atomic_fetch_add(&g.failed, 1);
			}
			atomic_fetch_add(&g.closed, 1);
			continue;
		}
		if (!e.success)
			continue; /* the status tag says why */
		on_message(&g.w[i], i);
	}
}

static long rss_kib(long pid)
{
	char path[64], line[256];
	long kib = -1;
	FILE *f;

	snprintf(path, sizeof path, "/proc/%ld/status", pid);
	if (pid <= 0 || !(f = fopen(path, "r")))
		return -1;
	while (fgets(line, sizeof line, f))
		if (sscanf(line, "VmRSS: %ld kB", &kib) == 1)
			break;
	fclose(f);
	return kib;
}

/* CPU seconds (user + system) of process pid (0: this one) so far. */
static double cpu_s(long pid)
{
	char path[64];
	unsigned long ut, st;
	FILE *f;
	int ok;

	if (pid == 0) {
		struct rusage ru;
		getrusage(RUSAGE_SELF, &ru);
		return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 +
		       (double)ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
	}
	snprintf(path, sizeof path, "/proc/%ld/stat", pid);
	if (pid < 0 || !(f = fopen(path, "r")))
		return -1;
	/* Fields 14 and 15 (utime, stime), after "(comm)", which has no ')' here. */
	ok = fscanf(f, "%*d (%*[^)]) %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut,
		    &st) == 2;
	fclose(f);
	return ok ? (double)(ut + st) / (double)sysconf(_SC_CLK_TCK) : -1;
}

static void wait_for(atomic_int *v, int want, double timeout_s, const char *what)
{
	struct timespec ts = { 0, 5000000 };
	double waited = 0;

	while (atomic_load(v) < want) {
		if (waited > timeout_s) {
			fprintf(stderr, "watch_bench: %s: %d of %d after %.0f s\n", what,
				atomic_load(v), want, timeout_s);
			exit(1);
		}
		nanosleep(&ts, NULL);
		waited += 0.005;
	}
}

static long percentile(long total, double p)
{
	long want = (long)((double)total * p), seen = 0;

	for (int d = 0; d <= MAX_DELAY_MS; d++) {
		seen += atomic_load(&g.hist[d]);
		if (seen > want)
			return d;
	}
	return MAX_DELAY_MS;
}

int main(int argc, char **argv)
{
	static const struct option lopts[] = {
		{ "ready-file", required_argument, NULL, 'r' },
		{ "watchers", required_argument, NULL, 'n' },
		{ "conns", required_argument, NULL, 'c' },
		{ "lines", required_argument, NULL, 'l' },
		{ "interval-ms", required_argument, NULL, 'i' },
		{ "kpld-pid", required_argument, NULL, 'P' },
		{ "cqs", required_argument, NULL, 'q' },
		{ NULL, 0, NULL, 0 },
	};
	const char *ready = NULL;
	int n = 1000, conns = 32, lines = 100, interval = 50, n_cqs = 16, ch;
	long pid = 0, rss0, rss1, total = 0, short_streams = 0;
	double me0, me1, kp0, kp1, wall0, wall1;
	char target[256] = "", pipeline[512];
	struct kplc *ctl;
	struct kplc_status st;
	struct kpl_err err = { 0 };
	Kpl__V1__SubmitRunRequest sreq = KPL__V1__SUBMIT_RUN_REQUEST__INIT;
	Kpl__V1__ApproveStageRequest areq = KPL__V1__APPROVE_STAGE_REQUEST__INIT;
	Kpl__V1__WatchRunRequest wreq = KPL__V1__WATCH_RUN_REQUEST__INIT;
	Kpl__V1__Run *run, *after;
	grpc_channel **chans;
	grpc_channel_credentials *creds;
	grpc_arg arg = { .type = GRPC_ARG_INTEGER, .key = GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL,
			 .value.integer = 1 };
	grpc_channel_args args = { 1, &arg };
	uint8_t *wbuf;
	size_t wlen;
	pthread_t *th;
	FILE *f;

	while ((ch = getopt_long(argc, argv, "", lopts, NULL)) != -1) {
		switch (ch) {
		case 'r': ready = optarg; break;
		case 'n': n = atoi(optarg); break;
		case 'c': conns = atoi(optarg); break;
		case 'l': lines = atoi(optarg); break;
		case 'i': interval = atoi(optarg); break;
		case 'P': pid = atol(optarg); break;
		case 'q': n_cqs = atoi(optarg); break;
		default: return 2;
		}
	}
	if (!ready || n < 1 || conns < 1 || lines < 1 || interval < 0 || n_cqs < 1) {
		fprintf(stderr, "usage: watch_bench --ready-file PATH [--watchers N] [--conns C] "
				"[--lines L] [--interval-ms I] [--kpld-pid PID] [--cqs Q]\n");
		return 2;
	}
	if (!(f = fopen(ready, "r")) || !fgets(target, sizeof target, f))
		die("cannot read the ready file", NULL);
	fclose(f);
	target[strcspn(target, "\r\n")] = '\0';

	grpc_init();
	if (kplc_connect(target, &ctl, &err))
		die(err.msg, NULL);
	snprintf(pipeline, sizeof pipeline,
		 "name: watchers\nstages:\n"
		 "  - {name: go, kind: approval, timeout: 1h, with: {message: start}}\n"
		 "  - name: talk\n    kind: script\n    needs: [go]\n"
		 "    with: {shell: 'for i in $(seq %d); do echo line $i; sleep %d.%03d; done'}\n",
		 lines, interval / 1000, interval % 1000);
	sreq.pipeline = pipeline;
	if (kplc_submit_run(ctl, &sreq, &run, &st))
		die("SubmitRun", &st);

	fprintf(stderr, "watch_bench: run %s waits for approval; opening %d streams over %d "
		"connections\n", run->id, n, conns);
	rss0 = rss_kib(pid);
	g.n = n;
	g.w = calloc((size_t)n, sizeof *g.w);
	g.n_cqs = n_cqs;
	g.cqs = calloc((size_t)n_cqs, sizeof *g.cqs);
	th = calloc((size_t)n_cqs, sizeof *th);
	for (int q = 0; q < n_cqs; q++)
		g.cqs[q] = grpc_completion_queue_create_for_next(NULL);
	chans = calloc((size_t)conns, sizeof *chans);
	creds = grpc_insecure_credentials_create();
	for (int i = 0; i < conns; i++)
		chans[i] = grpc_channel_create(target, creds, &args);
	grpc_channel_credentials_release(creds);
	wreq.id = run->id;
	wlen = protobuf_c_message_get_packed_size(&wreq.base);
	wbuf = malloc(wlen + 1);
	protobuf_c_message_pack(&wreq.base, wbuf);
	for (int t = 0; t < n_cqs; t++)
		pthread_create(&th[t], NULL, drive, g.cqs[t]);
	for (intptr_t i = 0; i < n; i++) {
		struct watcher *w = &g.w[i];
		grpc_slice body = grpc_slice_from_copied_buffer((const char *)wbuf, wlen);
		grpc_byte_buffer *out = grpc_raw_byte_buffer_create(&body, 1);
		grpc_op ops[4];

		grpc_slice_unref(body);
		grpc_metadata_array_init(&w->imd);
		grpc_metadata_array_init(&w->tmd);
		w->details = grpc_empty_slice();
		w->call = grpc_channel_create_call(chans[i % conns], NULL, GRPC_PROPAGATE_DEFAULTS,
						   g.cqs[i % n_cqs],
						   grpc_slice_from_static_string(
							   "/kpl.v1.Pipelines/WatchRun"),
						   NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
		memset(ops, 0, sizeof ops);
		ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
		ops[1].op = GRPC_OP_SEND_MESSAGE;
		ops[1].data.send_message.send_message = out;
		ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
		ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
		ops[3].data.recv_initial_metadata.recv_initial_metadata = &w->imd;
		/* Without a RECV_INITIAL_METADATA op no RECV_MESSAGE ever
		 * completed here. This batch's completion is not looked
		 * at (SEND_TAG). */
		if (grpc_call_start_batch(w->call, ops, 4, SEND_TAG, NULL) != GRPC_CALL_OK)
			die("grpc_call_start_batch (send)", NULL);
		grpc_byte_buffer_destroy(out);
		{
			grpc_op sop = { 0 };

			sop.op = GRPC_OP_RECV_STATUS_ON_CLIENT;
			sop.data.recv_status_on_client.trailing_metadata = &w->tmd;
			sop.data.recv_status_on_client.status = &w->code;
			sop.data.recv_status_on_client.status_details = &w->details;
			if (grpc_call_start_batch(w->call, &sop, 1, (void *)(i * 2 + 1), NULL) !=
			    GRPC_CALL_OK)
				die("grpc_call_start_batch (status)", NULL);
		}
		recv_next(w, i);
	}
	free(wbuf);
	/* Every stream has its first events (the run's QUEUED...), so each is
	 * open on kpld; then the memory they cost. */
	wait_for(&g.firsts, n - atomic_load(&g.failed), 300, "streams with their first event");
	if (atomic_load(&g.failed))
		fprintf(stderr, "watch_bench: %d streams failed to open (kpld's --max-streams?)\n",
			atomic_load(&g.failed));
	rss1 = rss_kib(pid);
	fprintf(stderr, "watch_bench: %d streams open; approving\n", n - atomic_load(&g.failed));
	me0 = cpu_s(0);
	kp0 = cpu_s(pid);
	wall0 = (double)now_ms() / 1000;
	areq.run_id = run->id;
	areq.stage = "go";
	areq.approve = true;
	if (kplc_approve_stage(ctl, &areq, &after, &st))
		die("ApproveStage", &st);
	kplc_msg_free(after);
	wait_for(&g.ended, n - atomic_load(&g.failed), 60 + (double)lines * interval / 1000 * 4,
		 "streams that saw the run end");
	me1 = cpu_s(0);
	kp1 = cpu_s(pid);
	wall1 = (double)now_ms() / 1000;

	for (int d = 0; d <= MAX_DELAY_MS; d++)
		total += atomic_load(&g.hist[d]);
	for (int i = 0; i < n; i++)
		if (!g.w[i].failed && g.w[i].lines != lines)
			short_streams++;
	printf("watchers_delay_ms=%ld (p99 of %ld deliveries: %d WatchRun streams over %d "
	       "connections x %d log lines %d ms apart; p50 %ld ms, p99.9 %ld ms, max %ld ms; "
	       "from the event's time (ms) to its arrival; streams failed %d, streams missing "
	       "lines %ld; goal p99 < 20 ms)\n",
	       percentile(total, 0.99), total, n, conns, lines, interval, percentile(total, 0.5),
	       percentile(total, 0.999), percentile(total, 1.0 - 1e-12), atomic_load(&g.failed),
	       short_streams);
	if (rss0 > 0 && rss1 > 0)
		printf("watchers_rss_per_stream_kib=%.1f (kpld VmRSS %ld KiB before, %ld KiB with "
		       "%d streams open)\n", (double)(rss1 - rss0) / n, rss0, rss1, n);
	if (pid > 0 && kp0 >= 0 && kp1 >= 0)
		printf("watchers_kpld_cpu_s=%.2f (kpld's user+system CPU from the approval to the "
		       "last stream's end, %.2f s wall)\n", kp1 - kp0, wall1 - wall0);
	printf("watchers_client_cpu_s=%.2f (this bench's own user+system CPU in the same "
	       "time, %d completion queues: it shares the machine with kpld)\n", me1 - me0,
	       n_cqs);
	fflush(stdout);

	for (int i = 0; i < n; i++)
		grpc_call_cancel(g.w[i].call, NULL);
	wait_for(&g.closed, n, 60, "closed streams");
	for (int i = 0; i < n; i++) {
		grpc_call_unref(g.w[i].call);
		grpc_metadata_array_destroy(&g.w[i].imd);
		grpc_metadata_array_destroy(&g.w[i].tmd);
		grpc_slice_unref(g.w[i].details);
	}
	for (int t = 0; t < n_cqs; t++)
		grpc_completion_queue_shutdown(g.cqs[t]);
	for (int t = 0; t < n_cqs; t++) {
		pthread_join(th[t], NULL);
		grpc_completion_queue_destroy(g.cqs[t]);
	}
	free(g.cqs);
	free(th);
	for (int i = 0; i < conns; i++)
		grpc_channel_destroy(chans[i]);
	kplc_msg_free(run);
	kplc_free(ctl);
	return atomic_load(&g.failed) || short_streams ? 1 : 0;
}
