/*
 * metrics.h - the daemon's Prometheus metrics: counters, gauges and one
 * histogram kept in process memory, rendered in the text exposition format
 * 0.0.4 for GET /metrics (engine/hooks.c serves it).
 *
 * The registry is process-wide (one kpld, one set of metrics): the engine,
 * the gRPC server and the HTTP endpoints update it with one call where the
 * thing happens, and none of them needs a handle to it. Label values come
 * from bounded sets (run states, stage kinds, the server's method table,
 * grpc status codes, webhook sources and results), never from a client's
 * input, so no series can grow without bound.
 *
 * Families:
 *   kpl_runs{state}                 gauge: queued/running now (seeded from
 *                                   the store at start); succeeded/failed/
 *                                   cancelled: runs that ended so since start
 *   kpl_runs_active                 gauge: runs the engine holds (not final)
 *   kpl_queue_depth                 gauge: runs QUEUED
 *   kpl_stage_duration_seconds{kind} histogram of finished stage attempts
 *   kpl_grpc_calls_total{method,code} counter
 *   kpl_webhook_deliveries_total{source,result} counter (source also
 *                                   "slack", "dingtalk": chat commands)
 *   kpl_api_events_read_total{method} counter: events read RPCs decoded
 *                                   from the store (GetRun and ListRuns
 *                                   seek instead, so theirs stay 0)
 *   kpl_watch_runs_scan_max         gauge: the most global-log records one
 *                                   WatchRuns stream read in one loop turn
 *
 * Threads: loop thread only, all of it.
 */
#ifndef KPL_METRICS_H
#define KPL_METRICS_H

#include <stddef.h>
#include <stdint.h>

/*
 * A run moved from state `from` to `to` (kpl.v1.RunState values; from is
 * 0 for a new run). Called by the engine's run_set_state only.
 */
void metrics_run_state(int from, int to);

/* Counts a run found in the store's active index at start (state as
 * kpl.v1.RunState), before the engine changes it. */
void metrics_seed_run(int state);

/* A stage of kind ran for seconds and reached a final state. */
void metrics_stage_done(const char *kind, double seconds);

/* A gRPC call to method (a path of the method table, or "unknown") ended
 * with grpc status code. method is copied the first time it is seen. */
void metrics_grpc_call(const char *method, int code);

/* A webhook delivery from source ("github", "gitlab") ended with result
 * ("accepted", "duplicate", "ignored", "unauthorized", "bad_request",
 * "error"; any short static word). Both are copied the first time. */
void metrics_webhook(const char *source, const char *result);

/* A read RPC (method: "GetRun", "ListRuns", "WatchRun", "WatchRuns"; a
 * static string) decoded n events from the store. */
void metrics_events_read(const char *method, uint64_t n);

/* A WatchRuns stream read n global-log records in one loop turn. */
void metrics_watch_scan(uint64_t n);

/*
 * Renders every family as Prometheus text (0.0.4), with active_runs as
 * kpl_runs_active. Returns a malloc'd NUL-terminated string (caller frees)
 * and its length in *len.
 */
char *metrics_render(size_t active_runs, size_t *len);

/* Forgets every value (tests). */
void metrics_reset(void);

#endif
