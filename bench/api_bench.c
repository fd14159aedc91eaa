/*
 * api_bench.c - what a running kpld sustains through its gRPC API, measured
 * from the outside with the blocking client (clients/kplclient.h):
 *
 *   submit_per_sec        SubmitRun replies with OK per second, for a
 *                         one-stage script pipeline, from --callers threads
 *                         over --duration seconds; once per entry of --conns
 *                         (how many channels the callers share: "64,1" is
 *                         one channel per caller, then one for all; the
 *                         default is "64p,64,1", see below).
 *   submit_noop_per_sec   the same with a noop stage, so no child process.
 *   watch_events_per_sec  events per second through one WatchRun of a run
 *                         whose script prints --lines lines: following it
 *                         live from its submit, then replaying the stored
 *                         run from seq 1 (--repeat times on a new
 *                         connection; the median), each with its ratio to
 *                         bare_stream_events_per_sec: the same events sent
 *                         by a bare grpc core server in this process to
 *                         the same client code (and once more with
 *                         GRPC_WRITE_BUFFER_HINT).
 *   noop_runs_per_sec     --noop-runs runs of ten chained noop stages,
 *                         submitted by --callers threads and each followed
 *                         to its end with WatchRun; the figure is durable
 *                         stage transitions (STAGE_STATE events) per second
 *                         of wall time, the runs/s is in the details.
 *
 * Between phases it waits until kpld has no QUEUED or RUNNING run (ListRuns,
 * twice a second), so one phase's backlog does not slow the next.
 *
 * Every figure is one line "name=value (details)" on stdout; progress goes
 * to stderr. Exit status 0 when every phase ran, 1 otherwise (errors counted
 * in a phase are reported, not fatal).
 *
 * grpc shares one TCP connection between channels with equal arguments to
 * the same address (its global subchannel pool), so "one channel per
 * caller" need not mean one connection per caller: the details give the
 * number of established client connections to kpld, read from
 * /proc/net/tcp in the middle of the phase. An entry "Np" in --conns makes
 * N private connections instead: plain grpc core channels with
 * GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, since kplc_connect cannot ask for
 * one (SubmitRun only; the reply is unpacked as kplc would).
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
#include <time.h>
#include <unistd.h>

#include "clients/kplclient.h"

#define N_CODES 17 /* grpc status codes 0..16; one more slot for others */

static const char submit_pipeline[] =
	"name: b\n"
	"stages:\n"
	"  - {name: t, kind: script, with: {command: [\"true\"]}}\n";

/* The same without a child process: what SubmitRun costs when the run
 * behind it is cheap (a script stage forks and execs). */
static const char submit_noop_pipeline[] =
	"name: bn1\n"
	"stages:\n"
	"  - {name: t, kind: noop}\n";

struct opts {
	const char *target;
	double duration;
	int callers;
	int conns[8];
	bool private_conns[8]; /* "Np": raw grpc channels, one TCP connection each */
	int n_conns;
	long lines;
	int repeat;
	int noop_runs;
	int noop_stages;
	double idle_timeout;
	bool do_submit, do_submit_noop, do_watch, do_noop;
	long kpld_pid;         /* --kpld-pid: its CPU time per run is reported */
	const char *echo_target; /* --echo-target: tests/api/echo_server, the limit */
};

/* CPU seconds (user + system) of a process; *children gets what its
 * children used, running or waited for (the shims, and through them the
 * commands; or kpld's spawner and through it the shims). */
static double cpu_s(long pid, double *children)
{
	char path[64], buf[1024], *p;
	unsigned long ut = 0, st = 0;
	long cut = 0, cst = 0;
	FILE *f;
	size_t n;

	snprintf(path, sizeof path, "/proc/%ld/stat", pid);
	if (pid <= 0 || !(f = fopen(path, "r")))
		return -1;
	n = fread(buf, 1, sizeof buf - 1, f);
	fclose(f);
	buf[n] = '\0';
	/* Fields after the command's ")": state is 3, utime 14, stime 15. */
	if (!(p = strrchr(buf, ')')) ||
	    sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu %ld %ld",
		   &ut, &st, &cut, &cst) != 4)
		return -1;
	*children = (double)(cut + cst) / (double)sysconf(_SC_CLK_TCK);
	/* The children still running count too: kpld's spawner
	 * (stages/spawner.h) waits for the shims it forks, not kpld. */
	snprintf(path, sizeof path, "/proc/%ld/task/%ld/children", pid, pid);
	if ((f = fopen(path, "r")) != NULL) {
		long kid;
		double kk;

		while (fscanf(f, "%ld", &kid) == 1) {
			double c = cpu_s(kid, &kk);
			if (c >= 0)
				*children += c + kk;
		}
		fclose(f);
	}
	return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *fmt, const char *a, const struct kplc_status *st)
{
	fprintf(stderr, "api_bench: ");
	fprintf(stderr, fmt, a);
	if (st)
		fprintf(stderr, ": %s: %s", kplc_status_name(st->code), st->message);
	fputc('\n', stderr);
	exit(1);
}

static struct kplc *connect_or_die(const char *target)
{
	struct kplc *c;
	struct kpl_err err = { 0 };

	if (kplc_connect(target, &c, &err))
		die("connect %s", target, NULL);
	return c;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

/* Established TCP connections whose remote port is port: the client ends of
 * connections to kpld (only we connect to it during a bench). */
static int count_conns(int port)
{
	static const char *files[] = { "/proc/net/tcp", "/proc/net/tcp6" };
	char line[512];
	int n = 0;

	for (size_t i = 0; i < 2; i++) {
		FILE *f = fopen(files[i], "r");

		if (!f)
			continue;
		while (fgets(line, sizeof line, f)) {
			char local[128], remote[128];
			unsigned st;
			char *colon;

			if (sscanf(line, " %*d: %127s %127s %x", local, remote, &st) != 3)
				continue;
			colon = strrchr(remote, ':');
			if (st == 1 && colon && strtol(colon + 1, NULL, 16) == port)
				n++;
		}
		fclose(f);
	}
	return n;
}

static int target_port(const char *target)
{
	const char *colon = strrchr(target, ':');

	return colon ? atoi(colon + 1) : -1;
}

/* ---------------------------------------------------------------------- */
/* waiting for kpld to be idle */

/* 1 if some run is in state, 0 if none, <0 on error. Pages on, because
 * kpld scans at most 20000 runs per ListRuns. */
static int any_run_in(struct kplc *c, Kpl__V1__RunState state, struct kplc_status *st)
{
	Kpl__V1__ListRunsRequest req = KPL__V1__LIST_RUNS_REQUEST__INIT;
	Kpl__V1__ListRunsResponse *resp;
	char token[128] = "";
	int rc;

	req.state = state;
	req.page_size = 1;
	for (;;) {
		req.page_token = token;
		if ((rc = kplc_list_runs(c, &req, &resp, st)))
			return rc;
		rc = resp->n_runs > 0;
		if (!rc && resp->next_page_token && *resp->next_page_token)
			snprintf(token, sizeof token, "%s", resp->next_page_token);
		else
			token[0] = 0;
		kplc_msg_free(resp);
		if (rc || !token[0])
			return rc;
	}
}

/* Waits until no run is QUEUED or RUNNING; returns the seconds it took. */
static double wait_idle(struct kplc *c, double timeout)
{
	struct kplc_status st;
	double t0 = now_s();
	int rc;

	for (;;) {
		rc = any_run_in(c, KPL__V1__RUN_STATE__RUN_STATE_RUNNING, &st);
		if (rc == 0)
			rc = any_run_in(c, KPL__V1__RUN_STATE__RUN_STATE_QUEUED, &st);
		if (rc < 0)
			die("%s", "ListRuns", &st);
		if (rc == 0)
			return now_s() - t0;
		if (now_s() - t0 > timeout)
			die("kpld still busy after %s s", "the idle timeout", NULL);
		/* Often enough that the drain's wall time is the backlog's, not
		 * the poll's (it was 0.5 s, a sixth of a 3 s phase). */
		usleep(50 * 1000);
	}
}

/* ---------------------------------------------------------------------- */
/* submit_per_sec */

struct submit_shared {
	const char *pipeline;
	bool echo;              /* GetRun on --echo-target instead of SubmitRun */
	bool private_conns;
	grpc_channel **raw;     /* if private_conns */
	uint8_t *req;           /* the packed request, for raw */
	size_t req_len;
	struct kplc **conns;
	int n_conns;
	pthread_barrier_t start;
	double t_end;
};

struct submit_worker {
	struct submit_shared *sh;
	int i;
	pthread_t th;
	long ok;
	long errs[N_CODES + 1];
	char first_err[N_CODES + 1][160];
	double *lat; /* seconds, of the OK calls */
	size_t n_lat, cap_lat;
};

static int submit_one(struct kplc *c, const char *pipeline, struct kplc_status *st)
{
	Kpl__V1__SubmitRunRequest req = KPL__V1__SUBMIT_RUN_REQUEST__INIT;
	Kpl__V1__Run *run = NULL;
	int rc;

	req.pipeline = (char *)pipeline;
	rc = kplc_submit_run(c, &req, &run, st);
	kplc_msg_free(run);
	return rc;
}

/* A channel with a TCP connection of its own. */
static grpc_channel *raw_channel(const char *target)
{
	grpc_arg arg = { .type = GRPC_ARG_INTEGER,
			 .key = GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL,
			 .value.integer = 1 };
	grpc_channel_args args = { 1, &arg };
	grpc_channel_credentials *creds = grpc_insecure_credentials_create();
	grpc_channel *ch = grpc_channel_create(target, creds, &args);

	grpc_channel_credentials_release(creds);
	return ch;
}

/* SubmitRun on grpc core, as kplc_call_unary does it (a queue per call). */
static int raw_submit(grpc_channel *ch, const uint8_t *req, size_t len,
		      struct kplc_status *st)
{
	grpc_slice body = grpc_slice_from_copied_buffer((const char *)req, len);
	grpc_byte_buffer *out = grpc_raw_byte_buffer_create(&body, 1), *in = NULL;
	grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
	grpc_metadata_array imd, tmd;
	grpc_status_code code = GRPC_STATUS_UNKNOWN;
	grpc_slice details = grpc_empty_slice();
	grpc_op ops[6];
	grpc_call *call;
	int rc = -1;

	grpc_slice_unref(body);
	grpc_metadata_array_init(&imd);
	grpc_metadata_array_init(&tmd);
	memset(ops, 0, sizeof ops);
	ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
	ops[1].op = GRPC_OP_SEND_MESSAGE;
	ops[1].data.send_message.send_message = out;
	ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
	ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
	ops[3].data.recv_initial_metadata.recv_initial_metadata = &imd;
	ops[4].op = GRPC_OP_RECV_MESSAGE;
	ops[4].data.recv_message.recv_message = &in;
	ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
	ops[5].data.recv_status_on_client.trailing_metadata = &tmd;
	ops[5].data.recv_status_on_client.status = &code;
	ops[5].data.recv_status_on_client.status_details = &details;
	call = grpc_channel_create_call(
		ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq,
		grpc_slice_from_static_string("/kpl.v1.Pipelines/SubmitRun"), NULL,
		gpr_time_add(gpr_now(GPR_CLOCK_REALTIME),
			     gpr_time_from_millis(KPLC_DEFAULT_DEADLINE_MS, GPR_TIMESPAN)),
		NULL);
	if (grpc_call_start_batch(call, ops, 6, call, NULL) == GRPC_CALL_OK) {
		grpc_completion_queue_pluck(cq, call, gpr_inf_future(GPR_CLOCK_REALTIME),
					    NULL);
		st->code = (int)code;
		snprintf(st->message, sizeof st->message, "%.*s",
			 (int)GRPC_SLICE_LENGTH(details),
			 (const char *)GRPC_SLICE_START_PTR(details));
	} else {
		st->code = KPLC_INTERNAL;
		snprintf(st->message, sizeof st->message, "grpc_call_start_batch failed");
	}
	if (st->code == KPLC_OK && in) {
		grpc_byte_buffer_reader r;
		grpc_slice all;
		Kpl__V1__Run *run;

		grpc_byte_buffer_reader_init(&r, in);
		all = grpc_byte_buffer_reader_readall(&r);
		grpc_byte_buffer_reader_destroy(&r);
		run = kpl__v1__run__unpack(NULL, GRPC_SLICE_LENGTH(all),
					   GRPC_SLICE_START_PTR(all));
		grpc_slice_unref(all);
		if (run)
			rc = 0;
		else
			snprintf(st->message, sizeof st->message, "cannot decode the reply");
		kplc_msg_free(run);
	}
	grpc_call_unref(call);
	grpc_completion_queue_shutdown(cq);
	while (grpc_completion_queue_pluck(cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME),
					   NULL).type != GRPC_QUEUE_SHUTDOWN)
		;
	grpc_completion_queue_destroy(cq);
	grpc_byte_buffer_destroy(out);
	if (in)
		grpc_byte_buffer_destroy(in);
	grpc_slice_unref(details);
	grpc_metadata_array_destroy(&imd);
	grpc_metadata_array_destroy(&tmd);
	return rc;
}

static int worker_submit(struct submit_worker *w, struct kplc_status *st)
{
	struct submit_shared *sh = w->sh;

	if (sh->echo) {
		Kpl__V1__Run *run = NULL;
		int rc = kplc_get_run(sh->conns[w->i % sh->n_conns], "bench", &run, st);

		kplc_msg_free(run);
		return rc;
	}
	if (sh->private_conns)
		return raw_submit(sh->raw[w->i % sh->n_conns], sh->req, sh->req_len, st);
	return submit_one(sh->conns[w->i % sh->n_conns], sh->pipeline, st);
}

static void *submit_thread(void *arg)
{
	struct submit_worker *w = arg;
	struct kplc_status st;

	/* Not timed: connects the channel. */
	worker_submit(w, &st);
	pthread_barrier_wait(&w->sh->start);
	pthread_barrier_wait(&w->sh->start);
	for (;;) {
		double t0 = now_s(), t1;
		int rc = worker_submit(w, &st);

		t1 = now_s();
		if (t1 > w->sh->t_end)
			break;
		if (rc == 0) {
			w->ok++;
			if (w->n_lat == w->cap_lat) {
				w->cap_lat = w->cap_lat * 2 + 1024;
				w->lat = realloc(w->lat, w->cap_lat * sizeof *w->lat);
				if (!w->lat)
					abort();
			}
			w->lat[w->n_lat++] = t1 - t0;
		} else {
			int code = st.code >= 0 && st.code < N_CODES ? st.code : N_CODES;

			if (!w->errs[code]++)
				snprintf(w->first_err[code], sizeof w->first_err[code],
					 "%.150s", st.message);
		}
	}
	return NULL;
}

/* Returns the calls answered OK per second. pipeline NULL: the echo phase
 * (GetRun on --echo-target, nothing to drain). */
static double bench_submit(const struct opts *o, const char *name, const char *pipeline,
			   int n_conns, bool private_conns, struct kplc *ctl)
{
	struct submit_shared sh = { .pipeline = pipeline, .n_conns = n_conns,
				    .private_conns = private_conns, .echo = !pipeline };
	const char *target = pipeline ? o->target : o->echo_target;
	double rate;
	Kpl__V1__SubmitRunRequest req = KPL__V1__SUBMIT_RUN_REQUEST__INIT;
	struct submit_worker *ws = calloc((size_t)o->callers, sizeof *ws);
	long ok = 0, errs[N_CODES + 1] = { 0 };
	double *lat, t0, drain, cpu0, cpu1, kids0 = 0, kids1 = 0;
	struct kplc_status fst;
	int failed;
	size_t n_lat = 0;
	char errbuf[1024] = "";
	size_t errlen = 0;
	int tcp;

	fprintf(stderr, "api_bench: %s: %d callers on %d %schannel(s), %.0f s\n",
		name, o->callers, n_conns, private_conns ? "private " : "", o->duration);
	sh.conns = calloc((size_t)n_conns, sizeof *sh.conns);
	sh.raw = calloc((size_t)n_conns, sizeof *sh.raw);
	req.pipeline = (char *)pipeline;
	sh.req_len = protobuf_c_message_get_packed_size(&req.base);
	sh.req = malloc(sh.req_len + 1);
	protobuf_c_message_pack(&req.base, sh.req);
	for (int i = 0; i < n_conns; i++) {
		if (private_conns)
			sh.raw[i] = raw_channel(target);
		else
			sh.conns[i] = connect_or_die(target);
	}
	pthread_barrier_init(&sh.start, NULL, (unsigned)o->callers + 1);
	for (int i = 0; i < o->callers; i++) {
		ws[i].sh = &sh;
		ws[i].i = i;
		if (pthread_create(&ws[i].th, NULL, submit_thread, &ws[i]))
			die("%s", "pthread_create", NULL);
	}
	/* Twice: once all callers are connected, then to publish t_end. */
	pthread_barrier_wait(&sh.start);
	cpu0 = sh.echo ? -1 : cpu_s(o->kpld_pid, &kids0);
	t0 = now_s();
	sh.t_end = t0 + o->duration;
	pthread_barrier_wait(&sh.start);
	usleep((useconds_t)(o->duration * 1e6 / 2));
	tcp = count_conns(target_port(target));
	for (int i = 0; i < o->callers; i++)
		pthread_join(ws[i].th, NULL);

	for (int i = 0; i < o->callers; i++) {
		ok += ws[i].ok;
		n_lat += ws[i].n_lat;
		for (int k = 0; k <= N_CODES; k++)
			errs[k] += ws[i].errs[k];
	}
	lat = malloc((n_lat + 1) * sizeof *lat);
	n_lat = 0;
	for (int i = 0; i < o->callers; i++) {
		memcpy(lat + n_lat, ws[i].lat, ws[i].n_lat * sizeof *lat);
		n_lat += ws[i].n_lat;
	}
	qsort(lat, n_lat, sizeof *lat, cmp_double);
	for (int k = 0; k <= N_CODES; k++) {
		const char *msg = "";

		if (!errs[k])
			continue;
		for (int i = 0; i < o->callers && !*msg; i++)
			msg = ws[i].first_err[k];
		errlen += (size_t)snprintf(errbuf + errlen, sizeof errbuf - errlen,
					   "%s%s=%ld [%.60s]", errlen ? " " : "",
					   k < N_CODES ? kplc_status_name(k) : "OTHER",
					   errs[k], msg);
		if (errlen >= sizeof errbuf)
			errlen = sizeof errbuf - 1;
	}
	/* The runs themselves execute after their submit: how long the
	 * backlog takes is a figure too (script runs/s end to end). */
	drain = sh.echo ? 0 : wait_idle(ctl, o->idle_timeout);
	cpu1 = sh.echo ? -1 : cpu_s(o->kpld_pid, &kids1);
	/* A fast run that failed is no figure. */
	failed = sh.echo ? 0 : any_run_in(ctl, KPL__V1__RUN_STATE__RUN_STATE_FAILED, &fst);
	rate = (double)ok / o->duration;
	printf("%s=%.0f (%ld OK in %.1f s, %d callers, %d %schannel(s), "
	       "%d tcp conn(s); latency p50 %.1f ms p99 %.1f ms max %.1f ms; "
	       "errors: %s; backlog drained %.2f s after the end, so %.0f "
	       "runs/s end to end%s)\n",
	       name, (double)ok / o->duration, ok, o->duration, o->callers, n_conns,
	       private_conns ? "private " : "", tcp,
	       n_lat ? lat[n_lat / 2] * 1e3 : 0, n_lat ? lat[n_lat * 99 / 100] * 1e3 : 0,
	       n_lat ? lat[n_lat - 1] * 1e3 : 0, errlen ? errbuf : "none", drain,
	       (double)(ok + o->callers) / (o->duration + drain),
	       failed > 0 ? "; SOME RUNS FAILED" : failed < 0 ? "; FAILED runs not listed" : "");
	/* kpld's own CPU (its threads, not the shims or commands) per run,
	 * over the phase and its backlog. */
	if (cpu0 >= 0 && cpu1 >= 0 && ok > 0)
		printf("%s_kpld_cpu_ms_per_run=%.2f (%.2f s of kpld CPU for %ld runs; "
		       "its children, shims and commands: %.2f ms per run)\n",
		       name, (cpu1 - cpu0) * 1e3 / (double)ok, cpu1 - cpu0, ok,
		       (kids1 - kids0) * 1e3 / (double)ok);
	fflush(stdout);

	for (int i = 0; i < o->callers; i++)
		free(ws[i].lat);
	free(ws);
	free(lat);
	for (int i = 0; i < n_conns; i++) {
		kplc_free(sh.conns[i]);
		if (sh.raw[i])
			grpc_channel_destroy(sh.raw[i]);
	}
	free(sh.conns);
	free(sh.raw);
	free(sh.req);
	pthread_barrier_destroy(&sh.start);
	return rate;
}

/* ---------------------------------------------------------------------- */
/* following runs */

struct count {
	long events, stage_events, log_events;
	int final_state;     /* RunState of the last RUN_STATE event */
	int64_t first_ns, last_ns; /* server times of the first and last event */
};

static int count_event(const Kpl__V1__RunEvent *ev, void *data)
{
	struct count *n = data;
	int64_t t = ev->time ? ev->time->seconds * 1000000000 + ev->time->nanos : 0;

	n->events++;
	if (ev->kind == KPL__V1__EVENT_KIND__EVENT_KIND_STAGE_STATE)
		n->stage_events++;
	else if (ev->kind == KPL__V1__EVENT_KIND__EVENT_KIND_LOG)
		n->log_events++;
	else if (ev->kind == KPL__V1__EVENT_KIND__EVENT_KIND_RUN_STATE)
		n->final_state = ev->run_state;
	if (t && (!n->first_ns || t < n->first_ns))
		n->first_ns = t;
	if (t > n->last_ns)
		n->last_ns = t;
	return 0;
}

static const char *run_state_name(int s)
{
	const ProtobufCEnumValue *v =
		protobuf_c_enum_descriptor_get_value(&kpl__v1__run_state__descriptor, s);

	return v ? v->name : "?";
}

/* ---------------------------------------------------------------------- */
/* watch_events_per_sec, and the bare grpc core server it is measured against */

/* The replayed events, packed, for the bare server to send the same bytes. */
struct capture {
	grpc_slice *ev;
	size_t n, cap, bytes;
};

struct replay_count {
	struct count n;
	struct capture *cap; /* NULL: do not capture */
};

static int capture_event(const Kpl__V1__RunEvent *ev, void *data)
{
	struct replay_count *r = data;
	struct capture *cp = r->cap;

	if (cp) {
		size_t len = protobuf_c_message_get_packed_size(&ev->base);
		grpc_slice sl = grpc_slice_malloc(len);

		protobuf_c_message_pack(&ev->base, GRPC_SLICE_START_PTR(sl));
		if (cp->n == cp->cap) {
			cp->cap = cp->cap ? cp->cap * 2 : 1024;
			cp->ev = realloc(cp->ev, cp->cap * sizeof *cp->ev);
			if (!cp->ev)
				die("%s", "out of memory", NULL);
		}
		cp->ev[cp->n++] = sl;
		cp->bytes += len;
	}
	return count_event(ev, &r->n);
}

/*
 * The bare server: grpc core alone, one thread, one completion queue. Every
 * call (whatever its method; kplc calls WatchRun) gets initial metadata, the
 * captured events one send at a time (each waited for before the next, the
 * obvious way to stream with grpc core), and status OK. With hint, every
 * message but each 256th and the last goes with GRPC_WRITE_BUFFER_HINT.
 * What kpld's WatchRun does on top of this is the store read, the
 * protobuf-c encoding and the hand-over between its two threads.
 */
struct bare {
	grpc_server *srv;
	grpc_completion_queue *cq;
	pthread_t th;
	int port;
	bool hint;
	const struct capture *cap;
};

static bool bare_op(struct bare *b, grpc_call *call, const grpc_op *ops, size_t n)
{
	grpc_event ev;

	if (grpc_call_start_batch(call, ops, n, (void *)2, NULL) != GRPC_CALL_OK)
		return false;
	ev = grpc_completion_queue_next(b->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
	return ev.type == GRPC_OP_COMPLETE && ev.tag == (void *)2 && ev.success;
}

static void *bare_thread(void *arg)
{
	struct bare *b = arg;

	for (;;) {
		grpc_call *call = NULL;
		grpc_call_details details;
		grpc_metadata_array md;
		grpc_event ev;
		grpc_op ops[2];
		int cancelled = 0;
		bool ok = true;

		grpc_call_details_init(&details);
		grpc_metadata_array_init(&md);
		if (grpc_server_request_call(b->srv, &call, &details, &md, b->cq, b->cq,
					     (void *)1) != GRPC_CALL_OK)
			break;
		ev = grpc_completion_queue_next(b->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
		if (ev.type != GRPC_OP_COMPLETE || ev.tag != (void *)1 || !ev.success) {
			grpc_call_details_destroy(&details);
			grpc_metadata_array_destroy(&md);
			if (call)
				grpc_call_unref(call);
			break; /* shutting down */
		}
		memset(ops, 0, sizeof ops);
		ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
		ok = bare_op(b, call, ops, 1);
		for (size_t i = 0; ok && i < b->cap->n; i++) {
			grpc_slice sl = grpc_slice_ref(b->cap->ev[i]);
			grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&sl, 1);

			grpc_slice_unref(sl);
			memset(ops, 0, sizeof ops);
			ops[0].op = GRPC_OP_SEND_MESSAGE;
			ops[0].flags = b->hint && i + 1 < b->cap->n && (i + 1) % 256 != 0
					       ? GRPC_WRITE_BUFFER_HINT : 0;
			ops[0].data.send_message.send_message = bb;
			ok = bare_op(b, call, ops, 1);
			grpc_byte_buffer_destroy(bb);
		}
		memset(ops, 0, sizeof ops);
		ops[0].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
		ops[0].data.send_status_from_server.status = GRPC_STATUS_OK;
		ops[1].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
		ops[1].data.recv_close_on_server.cancelled = &cancelled;
		bare_op(b, call, ops, 2);
		grpc_call_unref(call);
		grpc_call_details_destroy(&details);
		grpc_metadata_array_destroy(&md);
	}
	return NULL;
}

static void bare_start(struct bare *b, const struct capture *cap, bool hint)
{
	grpc_server_credentials *creds = grpc_insecure_server_credentials_create();

	memset(b, 0, sizeof *b);
	b->cap = cap;
	b->hint = hint;
	b->cq = grpc_completion_queue_create_for_next(NULL);
	b->srv = grpc_server_create(NULL, NULL);
	grpc_server_register_completion_queue(b->srv, b->cq, NULL);
	b->port = grpc_server_add_http2_port(b->srv, "127.0.0.1:0", creds);
	grpc_server_credentials_release(creds);
	if (b->port <= 0)
		die("%s", "bare server: cannot bind 127.0.0.1:0", NULL);
	grpc_server_start(b->srv);
	if (pthread_create(&b->th, NULL, bare_thread, b))
		die("%s", "bare server: pthread_create", NULL);
}

static void bare_stop(struct bare *b)
{
	grpc_server_shutdown_and_notify(b->srv, b->cq, (void *)3);
	grpc_server_cancel_all_calls(b->srv);
	pthread_join(b->th, NULL); /* its request_call fails: it exits */
	for (;;) {
		grpc_event ev = grpc_completion_queue_next(
			b->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
		if (ev.type == GRPC_OP_COMPLETE && ev.tag == (void *)3)
			break;
	}
	grpc_server_destroy(b->srv);
	grpc_completion_queue_shutdown(b->cq);
	while (grpc_completion_queue_next(b->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
	       GRPC_QUEUE_SHUTDOWN)
		;
	grpc_completion_queue_destroy(b->cq);
}

static int cmp_dbl(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

/*
 * --repeat WatchRuns of run id from seq 1 on one fresh connection to
 * target; the events/s of each, sorted, in rate[]. The first one captures
 * the events if cap is not NULL. Every replay must see want events (0:
 * whatever the first saw).
 */
static void replays(const struct opts *o, const char *target, const char *id,
		    struct capture *cap, long want, double *rate, const char *what)
{
	struct kplc *c = connect_or_die(target);
	struct kplc_status st;

	for (int i = 0; i < o->repeat; i++) {
		struct replay_count r = { .cap = i == 0 ? cap : NULL };
		double t0 = now_s(), t;

		if (kplc_follow_run(c, id, 1, NULL, capture_event, &r, NULL, &st))
			die("%s", what, &st);
		t = now_s() - t0;
		if (want && r.n.events != want) {
			fprintf(stderr, "api_bench: %s saw %ld events, want %ld\n", what,
				r.n.events, want);
			exit(1);
		}
		want = r.n.events;
		rate[i] = (double)r.n.events / t;
	}
	kplc_free(c);
	qsort(rate, (size_t)o->repeat, sizeof *rate, cmp_dbl);
}

static void bench_watch(const struct opts *o, struct kplc *c)
{
	Kpl__V1__SubmitRunRequest req = KPL__V1__SUBMIT_RUN_REQUEST__INIT;
	Kpl__V1__Run *run = NULL;
	struct kplc_status st;
	struct count live = { 0 };
	struct capture cap = { 0 };
	struct bare bare;
	char pipeline[256], id[128], bare_target[64];
	double t0, t_live, live_rate, *rp, *rb, *rh, med_p, med_b, med_h;
	int mid = o->repeat / 2;

	fprintf(stderr, "api_bench: watch: a run printing %ld lines\n", o->lines);
	snprintf(pipeline, sizeof pipeline,
		 "name: bw\n"
		 "stages:\n"
		 "  - {name: t, kind: script, with: {command: [\"seq\", \"1\", \"%ld\"]}}\n",
		 o->lines);
	req.pipeline = pipeline;
	t0 = now_s();
	if (kplc_submit_run(c, &req, &run, &st))
		die("%s", "SubmitRun", &st);
	snprintf(id, sizeof id, "%s", run->id);
	kplc_msg_free(run);
	if (kplc_follow_run(c, id, 1, NULL, count_event, &live, NULL, &st))
		die("follow %s", id, &st);
	t_live = now_s() - t0;
	live_rate = (double)live.events / t_live;

	rp = calloc((size_t)o->repeat, sizeof *rp);
	rb = calloc((size_t)o->repeat, sizeof *rb);
	rh = calloc((size_t)o->repeat, sizeof *rh);
	if (!rp || !rb || !rh)
		die("%s", "out of memory", NULL);
	replays(o, o->target, id, &cap, live.events, rp, "replay");
	/* The same bytes from grpc core alone, through the same client. */
	bare_start(&bare, &cap, false);
	snprintf(bare_target, sizeof bare_target, "127.0.0.1:%d", bare.port);
	replays(o, bare_target, id, NULL, (long)cap.n, rb, "bare stream");
	bare_stop(&bare);
	bare_start(&bare, &cap, true);
	snprintf(bare_target, sizeof bare_target, "127.0.0.1:%d", bare.port);
	replays(o, bare_target, id, NULL, (long)cap.n, rh, "bare stream (hint)");
	bare_stop(&bare);
	med_p = rp[mid];
	med_b = rb[mid];
	med_h = rh[mid];

	printf("watch_events_per_sec=%.0f ratio_to_bare=%.2f ratio_to_goal=%.2f "
	       "(stored replay of run %s: %ld events of %.0f bytes on average, median of %d "
	       "fresh WatchRuns from seq 1 on one new connection, min %.0f max %.0f; "
	       "goal 200000/s and 0.5 of bare)\n",
	       med_p, med_p / med_b, med_p / 200000, id, live.events,
	       cap.n ? (double)cap.bytes / (double)cap.n : 0.0, o->repeat, rp[0],
	       rp[o->repeat - 1]);
	printf("watch_live_events_per_sec=%.0f ratio_to_bare=%.2f ratio_to_goal=%.2f "
	       "(live: %ld events, %ld of them log lines, followed from the submit to the "
	       "final event in %.2f s; run %s; server-side first to last event %.2f s; "
	       "goal 100000/s)\n",
	       live_rate, live_rate / med_b, live_rate / 100000, live.events, live.log_events,
	       t_live, run_state_name(live.final_state),
	       (double)(live.last_ns - live.first_ns) / 1e9);
	printf("bare_stream_events_per_sec=%.0f ratio=1.00 (grpc core alone, one thread, the "
	       "same %zu events one send at a time to the same client; median of %d, min %.0f "
	       "max %.0f)\n",
	       med_b, cap.n, o->repeat, rb[0], rb[o->repeat - 1]);
	printf("bare_stream_hint_events_per_sec=%.0f ratio_to_bare=%.2f (the same with "
	       "GRPC_WRITE_BUFFER_HINT on all but every 256th; median of %d, min %.0f max "
	       "%.0f)\n",
	       med_h, med_h / med_b, o->repeat, rh[0], rh[o->repeat - 1]);
	fflush(stdout);
	for (size_t i = 0; i < cap.n; i++)
		grpc_slice_unref(cap.ev[i]);
	free(cap.ev);
	free(rp);
	free(rb);
	free(rh);
}

/* ---------------------------------------------------------------------- */
/* noop_runs_per_sec */

struct noop_shared {
	struct kplc **conns;
	int n_conns;
	const char *pipeline;
	int runs;
	atomic_int next;
	pthread_barrier_t start;
};

struct noop_worker {
	struct noop_shared *sh;
	int i;
	pthread_t th;
	char (*ids)[128];
	int n_ids;
	struct count n;
	long submit_errs, follow_errs, not_succeeded;
	char first_err[200];
};

static void *noop_thread(void *arg)
{
	struct noop_worker *w = arg;
	struct kplc *c = w->sh->conns[w->i % w->sh->n_conns];
	Kpl__V1__SubmitRunRequest req = KPL__V1__SUBMIT_RUN_REQUEST__INIT;
	struct kplc_status st;
	int k;

	req.pipeline = (char *)w->sh->pipeline;
	w->ids = calloc((size_t)w->sh->runs, sizeof *w->ids);
	pthread_barrier_wait(&w->sh->start);
	while ((k = atomic_fetch_add(&w->sh->next, 1)) < w->sh->runs) {
		Kpl__V1__Run *run = NULL;

		if (kplc_submit_run(c, &req, &run, &st)) {
			if (!w->submit_errs++)
				snprintf(w->first_err, sizeof w->first_err, "submit: %s: %.150s",
					 kplc_status_name(st.code), st.message);
			continue;
		}
		snprintf(w->ids[w->n_ids++], sizeof w->ids[0], "%s", run->id);
		kplc_msg_free(run);
	}
	for (int i = 0; i < w->n_ids; i++) {
		struct count one = { 0 };

		if (kplc_follow_run(c, w->ids[i], 1, NULL, count_event, &one, NULL, &st)) {
			if (!w->follow_errs++)
				snprintf(w->first_err, sizeof w->first_err, "follow: %s: %.150s",
					 kplc_status_name(st.code), st.message);
		}
		if (one.final_state != KPL__V1__RUN_STATE__RUN_STATE_SUCCEEDED)
			w->not_succeeded++;
		w->n.events += one.events;
		w->n.stage_events += one.stage_events;
		if (one.first_ns && (!w->n.first_ns || one.first_ns < w->n.first_ns))
			w->n.first_ns = one.first_ns;
		if (one.last_ns > w->n.last_ns)
			w->n.last_ns = one.last_ns;
	}
	return NULL;
}

static void bench_noop(const struct opts *o)
{
	struct noop_shared sh = { .n_conns = o->conns[0], .runs = o->noop_runs };
	struct noop_worker *ws = calloc((size_t)o->callers, sizeof *ws);
	struct count n = { 0 };
	long submitted = 0, submit_errs = 0, follow_errs = 0, not_succeeded = 0;
	const char *first_err = "";
	char *pl;
	size_t len = 0, cap = 64 + (size_t)o->noop_stages * 64;
	double t0, wall, span;

	fprintf(stderr, "api_bench: noop: %d runs of %d chained noop stages, "
		"%d callers\n", o->noop_runs, o->noop_stages, o->callers);
	pl = malloc(cap);
	len += (size_t)snprintf(pl + len, cap - len, "name: bn\nstages:\n");
	for (int i = 0; i < o->noop_stages; i++) {
		if (i)
			len += (size_t)snprintf(pl + len, cap - len,
						"  - {name: s%d, kind: noop, needs: [s%d]}\n",
						i, i - 1);
		else
			len += (size_t)snprintf(pl + len, cap - len,
						"  - {name: s0, kind: noop}\n");
	}
	sh.pipeline = pl;
	sh.conns = calloc((size_t)sh.n_conns, sizeof *sh.conns);
	for (int i = 0; i < sh.n_conns; i++)
		sh.conns[i] = connect_or_die(o->target);
	atomic_init(&sh.next, 0);
	pthread_barrier_init(&sh.start, NULL, (unsigned)o->callers + 1);
	for (int i = 0; i < o->callers; i++) {
		ws[i].sh = &sh;
		ws[i].i = i;
		if (pthread_create(&ws[i].th, NULL, noop_thread, &ws[i]))
			die("%s", "pthread_create", NULL);
	}
	pthread_barrier_wait(&sh.start);
	t0 = now_s();
	for (int i = 0; i < o->callers; i++)
		pthread_join(ws[i].th, NULL);
	wall = now_s() - t0;

	for (int i = 0; i < o->callers; i++) {
		struct noop_worker *w = &ws[i];

		submitted += w->n_ids;
		submit_errs += w->submit_errs;
		follow_errs += w->follow_errs;
		not_succeeded += w->not_succeeded;
		if (!*first_err)
			first_err = w->first_err;
		n.events += w->n.events;
		n.stage_events += w->n.stage_events;
		if (w->n.first_ns && (!n.first_ns || w->n.first_ns < n.first_ns))
			n.first_ns = w->n.first_ns;
		if (w->n.last_ns > n.last_ns)
			n.last_ns = w->n.last_ns;
	}
	span = (double)(n.last_ns - n.first_ns) / 1e9;
	printf("noop_runs_per_sec=%.0f (stage transitions/s over wall time; "
	       "%ld runs x %d noop stages, %ld STAGE_STATE events of %ld in %.2f s "
	       "from the first submit to the last watch's end, %d callers; "
	       "%.0f runs/s; server first-to-last event %.2f s = %.0f transitions/s; "
	       "submit errors %ld, follow errors %ld, not SUCCEEDED %ld%s%s)\n",
	       (double)n.stage_events / wall, submitted, o->noop_stages,
	       n.stage_events, n.events, wall, o->callers, (double)submitted / wall,
	       span, span > 0 ? (double)n.stage_events / span : 0, submit_errs,
	       follow_errs, not_succeeded, *first_err ? "; first: " : "", first_err);
	fflush(stdout);

	for (int i = 0; i < o->callers; i++)
		free(ws[i].ids);
	free(ws);
	for (int i = 0; i < sh.n_conns; i++)
		kplc_free(sh.conns[i]);
	free(sh.conns);
	free(pl);
	pthread_barrier_destroy(&sh.start);
}

/* ---------------------------------------------------------------------- */

static void usage(FILE *f)
{
	fprintf(f,
		"usage: api_bench [--target HOST:PORT | --ready-file PATH] [--duration S]\n"
		"                 [--callers N] [--conns N[,N...]] [--lines N] [--repeat R]\n"
		"                 [--noop-runs M] [--noop-stages K] [--only submit,watch,noop]\n"
		"\n"
		"  --target HOST:PORT  kpld to measure (default " KPLC_DEFAULT_TARGET ")\n"
		"  --ready-file PATH   read HOST:PORT from kpld's --ready-file instead\n"
		"  --duration S        seconds of SubmitRun per run of the phase (default 10)\n"
		"  --callers N         concurrent callers, one thread each (default 64)\n"
		"  --conns LIST        channels the callers share, one submit phase per\n"
		"                      entry (default Np,N,1: a connection per caller,\n"
		"                      a kplc channel per caller, one for all);\n"
		"                      Np: N raw channels with a TCP connection each\n"
		"  --lines N           lines the watched run prints (default 50000)\n"
		"  --repeat R          replays of it, from kpld and from the bare server\n"
		"                      (default 5; the median is the figure)\n"
		"  --noop-runs M       runs in the noop phase (default 1000)\n"
		"  --noop-stages K     chained noop stages per run (default 10)\n"
		"  --idle-timeout S    longest wait for kpld to finish a backlog (default 600)\n"
		"  --only LIST         phases to run (default submit,submit_noop,watch,noop;\n"
		"                      submit: a script stage running true, once per\n"
		"                      --conns entry; submit_noop: a noop stage instead)\n"
		"  --echo-target HOST:PORT  tests/api/echo_server: after submit_noop, the\n"
		"                      same callers' GetRun there (the API alone), and\n"
		"                      submit_noop's ratio to it\n"
		"  --kpld-pid PID      also report kpld's own CPU time per run in the\n"
		"                      submit phases (bench/run.sh passes it)\n");
}

static void read_ready(const char *path, char *buf, size_t size)
{
	FILE *f = fopen(path, "r");

	if (!f || !fgets(buf, (int)size, f))
		die("cannot read %s", path, NULL);
	fclose(f);
	buf[strcspn(buf, "\r\n")] = 0;
}

int main(int argc, char **argv)
{
	static const struct option lopts[] = {
		{ "target", required_argument, NULL, 't' },
		{ "ready-file", required_argument, NULL, 'r' },
		{ "duration", required_argument, NULL, 'd' },
		{ "callers", required_argument, NULL, 'c' },
		{ "conns", required_argument, NULL, 'n' },
		{ "lines", required_argument, NULL, 'l' },
		{ "repeat", required_argument, NULL, 'R' },
		{ "noop-runs", required_argument, NULL, 'm' },
		{ "noop-stages", required_argument, NULL, 'k' },
		{ "idle-timeout", required_argument, NULL, 'i' },
		{ "only", required_argument, NULL, 'o' },
		{ "kpld-pid", required_argument, NULL, 'P' },
		{ "echo-target", required_argument, NULL, 'E' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct opts o = {
		.target = KPLC_DEFAULT_TARGET,
		.duration = 10,
		.callers = 64,
		.lines = 50000,
		.repeat = 5,
		.noop_runs = 1000,
		.noop_stages = 10,
		.idle_timeout = 600,
		.do_submit = true, .do_submit_noop = true, .do_watch = true,
		.do_noop = true,
	};
	const char *conns = NULL;
	char target[256];
	struct kplc *ctl;
	int c;

	while ((c = getopt_long(argc, argv, "h", lopts, NULL)) != -1) {
		switch (c) {
		case 't': o.target = optarg; break;
		case 'r':
			read_ready(optarg, target, sizeof target);
			o.target = target;
			break;
		case 'd': o.duration = atof(optarg); break;
		case 'c': o.callers = atoi(optarg); break;
		case 'n': conns = optarg; break;
		case 'l': o.lines = atol(optarg); break;
		case 'R': o.repeat = atoi(optarg); break;
		case 'm': o.noop_runs = atoi(optarg); break;
		case 'k': o.noop_stages = atoi(optarg); break;
		case 'i': o.idle_timeout = atof(optarg); break;
		case 'P': o.kpld_pid = atol(optarg); break;
		case 'E': o.echo_target = optarg; break;
		case 'o': {
			/* Comma-separated names; ",LIST," makes matching exact. */
			char buf[256];

			snprintf(buf, sizeof buf, ",%s,", optarg);
			o.do_submit = strstr(buf, ",submit,") != NULL;
			o.do_submit_noop = strstr(buf, ",submit_noop,") != NULL;
			o.do_watch = strstr(buf, ",watch,") != NULL;
			o.do_noop = strstr(buf, ",noop,") != NULL;
			break;
		}
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (optind != argc || o.duration <= 0 || o.callers < 1 || o.lines < 1 || o.repeat < 1 ||
	    o.noop_runs < 1 || o.noop_stages < 1 || o.noop_stages > 256) {
		usage(stderr);
		return 2;
	}
	if (conns) {
		for (char *p = (char *)conns; *p && o.n_conns < 8; p++) {
			int n = (int)strtol(p, &p, 10);

			o.private_conns[o.n_conns] = *p == 'p';
			if (*p == 'p')
				p++;
			o.conns[o.n_conns++] = n < 1 ? 1 : n > o.callers ? o.callers : n;
			if (!*p)
				break;
		}
	} else {
		o.private_conns[o.n_conns] = true;
		o.conns[o.n_conns++] = o.callers;
		o.conns[o.n_conns++] = o.callers;
		if (o.callers > 1)
			o.conns[o.n_conns++] = 1;
	}

	ctl = connect_or_die(o.target);
	wait_idle(ctl, o.idle_timeout);
	if (o.do_submit)
		for (int i = 0; i < o.n_conns; i++)
			bench_submit(&o, "submit_per_sec", submit_pipeline, o.conns[i],
				     o.private_conns[i], ctl);
	if (o.do_submit_noop) {
		double noop = 0, echo;

		for (int i = 0; i < o.n_conns; i++)
			noop = bench_submit(&o, "submit_noop_per_sec", submit_noop_pipeline,
					    o.conns[i], o.private_conns[i], ctl);
		/* The limit: the same callers' unary calls on the last --conns
		 * entry's channels to a server that is api/server.c alone. */
		if (o.echo_target) {
			echo = bench_submit(&o, "echo_unary_per_sec", NULL,
					    o.conns[o.n_conns - 1], false, ctl);
			if (echo > 0)
				printf("submit_noop_per_sec=%.0f ratio=%.2f of echo_unary_per_sec=%.0f "
				       "(goal 0.60)\n", noop, noop / echo, echo);
		}
	}
	if (o.do_watch) {
		bench_watch(&o, ctl);
		wait_idle(ctl, o.idle_timeout);
	}
	if (o.do_noop)
		bench_noop(&o);
	kplc_free(ctl);
	return 0;
}
