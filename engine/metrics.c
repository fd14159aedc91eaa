/*
 * metrics.c - the process-wide metrics registry and its Prometheus text
 * rendering (exposition format 0.0.4).
 */
#include "engine/metrics.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/kpl.h"

/* kpl.v1.RunState values 1..5, in this order. */
#define RUN_STATES 6
static const char *const run_state_label[RUN_STATES] = {
	NULL, "queued", "running", "succeeded", "failed", "cancelled",
};
#define RUN_QUEUED 1
#define RUN_RUNNING 2

/* Stage attempts take from a second (a script) to an hour (a rollout). */
static const double stage_buckets[] = {
	0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600,
};
#define N_BUCKETS KPL_ARRAY_SIZE(stage_buckets)

/* grpc_status_code names, as grpc's own metrics label them. */
static const char *const grpc_code_name[] = {
	"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
	"NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
	"FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
	"INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
};

struct stage_hist {
	char *kind;
	uint64_t buckets[N_BUCKETS]; /* non-cumulative; summed when rendered */
	uint64_t count;
	double sum;
};

struct pair_counter {
	char *a, *b;
	uint64_t n;
};

struct pairs {
	struct pair_counter *v;
	size_t n, cap;
};

static struct {
	int64_t runs[RUN_STATES];
	struct stage_hist *hists;
	size_t n_hists, cap_hists;
	struct pairs grpc;    /* method, code name */
	struct pairs webhook; /* source, result */
	struct {
		const char *method; /* static */
		uint64_t n;
	} reads[8];
	size_t n_reads;
	uint64_t watch_scan_max;
} m;

static void pairs_add(struct pairs *p, const char *a, const char *b)
{
	for (size_t i = 0; i < p->n; i++) {
		if (strcmp(p->v[i].a, a) == 0 && strcmp(p->v[i].b, b) == 0) {
			p->v[i].n++;
			return;
		}
	}
	if (p->n == p->cap) {
		p->cap = p->cap ? p->cap * 2 : 16;
		p->v = kpl_realloc(p->v, p->cap * sizeof *p->v);
	}
	p->v[p->n++] = (struct pair_counter){ kpl_strdup(a), kpl_strdup(b), 1 };
}

static void pairs_clear(struct pairs *p)
{
	for (size_t i = 0; i < p->n; i++) {
		free(p->v[i].a);
		free(p->v[i].b);
	}
	free(p->v);
	*p = (struct pairs){ 0 };
}

void metrics_run_state(int from, int to)
{
	/* Queued and running are counts of now; a final state counts the
	 * runs that reached it, so a retry (FAILED -> QUEUED) takes nothing
	 * back from FAILED. */
	if ((from == RUN_QUEUED || from == RUN_RUNNING) && m.runs[from] > 0)
		m.runs[from]--;
	if (to > 0 && to < RUN_STATES)
		m.runs[to]++;
}

void metrics_seed_run(int state)
{
	if (state == RUN_QUEUED || state == RUN_RUNNING)
		m.runs[state]++;
}

void metrics_stage_done(const char *kind, double seconds)
{
	struct stage_hist *h = NULL;
	size_t b;

	if (!kind || !*kind)
		kind = "unknown";
	if (seconds < 0)
		seconds = 0;
	for (size_t i = 0; i < m.n_hists && !h; i++)
		if (strcmp(m.hists[i].kind, kind) == 0)
			h = &m.hists[i];
	if (!h) {
		if (m.n_hists == m.cap_hists) {
			m.cap_hists = m.cap_hists ? m.cap_hists * 2 : 8;
			m.hists = kpl_realloc(m.hists, m.cap_hists * sizeof *m.hists);
		}
		h = &m.hists[m.n_hists++];
		*h = (struct stage_hist){ .kind = kpl_strdup(kind) };
	}
	for (b = 0; b < N_BUCKETS && seconds > stage_buckets[b]; b++)
		;
	if (b < N_BUCKETS)
		h->buckets[b]++;
	h->count++;
	h->sum += seconds;
}

void metrics_grpc_call(const char *method, int code)
{
	char other[16];
	const char *name = other;

	if (code >= 0 && (size_t)code < KPL_ARRAY_SIZE(grpc_code_name))
		name = grpc_code_name[code];
	else
		snprintf(other, sizeof other, "%d", code);
	pairs_add(&m.grpc, method ? method : "unknown", name);
}

void metrics_webhook(const char *source, const char *result)
{
	pairs_add(&m.webhook, source, result);
}

void metrics_events_read(const char *method, uint64_t n)
{
	size_t i;

	for (i = 0; i < m.n_reads; i++)
		if (strcmp(m.reads[i].method, method) == 0)
			break;
	if (i == m.n_reads) {
		if (i == KPL_ARRAY_SIZE(m.reads))
			BUG("metrics_events_read: more than %zu methods", i);
		m.reads[m.n_reads++].method = method;
	}
	m.reads[i].n += n;
}

void metrics_watch_scan(uint64_t n)
{
	if (n > m.watch_scan_max)
		m.watch_scan_max = n;
}

void metrics_reset(void)
{
	for (size_t i = 0; i < m.n_hists; i++)
		free(m.hists[i].kind);
	free(m.hists);
	pairs_clear(&m.grpc);
	pairs_clear(&m.webhook);
	memset(&m, 0, sizeof m);
}

/* --- Rendering --- */

struct out {
	char *p;
	size_t len, cap;
};

static void outf(struct out *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void outf(struct out *o, const char *fmt, ...)
{
	va_list ap;
	int n;

	for (;;) {
		va_start(ap, fmt);
		n = vsnprintf(o->p + o->len, o->cap - o->len, fmt, ap);
		va_end(ap);
		if (n < 0)
			BUG("metrics: vsnprintf failed");
		if ((size_t)n < o->cap - o->len) {
			o->len += (size_t)n;
			return;
		}
		o->cap = (o->cap + (size_t)n + 1) * 2;
		o->p = kpl_realloc(o->p, o->cap);
	}
}

/* Label values here come from fixed sets, but a method path or kind is
 * still escaped as the format requires (backslash, quote, newline). */
static void out_label(struct out *o, const char *v)
{
	for (; *v; v++) {
		if (*v == '\\' || *v == '"')
			outf(o, "\\%c", *v);
		else if (*v == '\n')
			outf(o, "\\n");
		else
			outf(o, "%c", *v);
	}
}

/* Prometheus floats: integers plainly, others with enough digits. */
static void out_double(struct out *o, double v)
{
	if (v == (double)(int64_t)v && v < 1e15 && v > -1e15)
		outf(o, "%lld", (long long)v);
	else
		outf(o, "%.6g", v);
}

static void render_pairs(struct out *o, const struct pairs *p, const char *family,
			 const char *la, const char *lb)
{
	for (size_t i = 0; i < p->n; i++) {
		outf(o, "%s{%s=\"", family, la);
		out_label(o, p->v[i].a);
		outf(o, "\",%s=\"", lb);
		out_label(o, p->v[i].b);
		outf(o, "\"} %llu\n", (unsigned long long)p->v[i].n);
	}
}

char *metrics_render(size_t active_runs, size_t *len)
{
	struct out o = { kpl_malloc(4096), 0, 4096 };

	o.p[0] = '\0';
	outf(&o, "# HELP kpl_runs Runs by state: queued and running now; "
		 "succeeded, failed and cancelled since kpld started.\n"
		 "# TYPE kpl_runs gauge\n");
	for (int s = 1; s < RUN_STATES; s++)
		outf(&o, "kpl_runs{state=\"%s\"} %lld\n", run_state_label[s],
		     (long long)m.runs[s]);
	outf(&o, "# HELP kpl_runs_active Runs the engine holds (not yet final).\n"
		 "# TYPE kpl_runs_active gauge\n"
		 "kpl_runs_active %zu\n", active_runs);
	outf(&o, "# HELP kpl_queue_depth Runs queued, waiting to start.\n"
		 "# TYPE kpl_queue_depth gauge\n"
		 "kpl_queue_depth %lld\n", (long long)m.runs[RUN_QUEUED]);

	outf(&o, "# HELP kpl_stage_duration_seconds Duration of stage attempts that "
		 "reached a final state, by kind.\n"
		 "# TYPE kpl_stage_duration_seconds histogram\n");
	for (size_t i = 0; i < m.n_hists; i++) {
		const struct stage_hist *h = &m.hists[i];
		uint64_t cum = 0;

		for (size_t b = 0; b <= N_BUCKETS; b++) {
			outf(&o, "kpl_stage_duration_seconds_bucket{kind=\"");
			out_label(&o, h->kind);
			if (b < N_BUCKETS) {
				cum += h->buckets[b];
				outf(&o, "\",le=\"");
				out_double(&o, stage_buckets[b]);
				outf(&o, "\"} %llu\n", (unsigned long long)cum);
			} else {
				outf(&o, "\",le=\"+Inf\"} %llu\n", (unsigned long long)h->count);
			}
		}
		outf(&o, "kpl_stage_duration_seconds_sum{kind=\"");
		out_label(&o, h->kind);
		outf(&o, "\"} ");
		out_double(&o, h->sum);
		outf(&o, "\nkpl_stage_duration_seconds_count{kind=\"");
		out_label(&o, h->kind);
		outf(&o, "\"} %llu\n", (unsigned long long)h->count);
	}

	outf(&o, "# HELP kpl_grpc_calls_total gRPC calls ended, by method and status code.\n"
		 "# TYPE kpl_grpc_calls_total counter\n");
	render_pairs(&o, &m.grpc, "kpl_grpc_calls_total", "method", "code");
	outf(&o, "# HELP kpl_webhook_deliveries_total Webhook deliveries, by source "
		 "and result.\n"
		 "# TYPE kpl_webhook_deliveries_total counter\n");
	render_pairs(&o, &m.webhook, "kpl_webhook_deliveries_total", "source", "result");
	outf(&o, "# HELP kpl_api_events_read_total Events read RPCs decoded from the store.\n"
		 "# TYPE kpl_api_events_read_total counter\n");
	for (size_t i = 0; i < m.n_reads; i++)
		outf(&o, "kpl_api_events_read_total{method=\"%s\"} %llu\n", m.reads[i].method,
		     (unsigned long long)m.reads[i].n);
	outf(&o, "# HELP kpl_watch_runs_scan_max The most global-log records one WatchRuns "
		 "stream read in one loop turn.\n"
		 "# TYPE kpl_watch_runs_scan_max gauge\n"
		 "kpl_watch_runs_scan_max %llu\n", (unsigned long long)m.watch_scan_max);
	*len = o.len;
	return o.p;
}
