/*
 * retention.h - the retention policy for finished runs: by age and by count,
 * freeing their records, events and workspaces (see retention.c).
 *
 * Threads: loop thread only.
 */
#ifndef KPL_RETENTION_H
#define KPL_RETENTION_H

#include <stdint.h>
#include <uv.h>

#include "base/kpl.h"
#include "store/store.h"

struct retention_options {
	unsigned max_age_days; /* 0: no age limit */
	unsigned max_runs;     /* finished runs kept; 0: no count limit */
	/* Tests only (kpld reads KPL_TEST_RETENTION_CLOCK): a file holding the
	 * sweep's "now" in ms since the epoch, looked at every 50 ms; a sweep
	 * runs at start and whenever that clock has passed the last sweep's
	 * time plus an hour. NULL: the real clock and an hourly timer. */
	const char *clock_file;
};

struct retention;

/* Starts sweeping (at once, then hourly). work_dir holds run workspaces. */
int retention_start(uv_loop_t *loop, struct store *store, const char *work_dir,
		    const struct retention_options *opt, struct retention **out);

/* Stops sweeping; done(data) runs once no removal is in flight and the
 * timer is closed; then the caller frees r with retention_free. */
void retention_stop(struct retention *r, void (*done)(void *data), void *data);
void retention_free(struct retention *r);

/* Runs deleted since start. */
uint64_t retention_deleted(const struct retention *r);

#endif
