/*
 * kplctl_live.h - the live stage table that `kplctl watch` (and submit,
 * retry and rollback with --watch) draws on a terminal.
 *
 * A model of one run, fed with the run (GetRun) and its events (WatchRun),
 * and a renderer that turns the model into the lines of one frame for a
 * terminal of a given size at a given time. No I/O and no terminal control:
 * kplctl moves the cursor and writes the lines, so the table is testable
 * without a terminal.
 *
 * Canary weight and verify values come from the stages' SYSTEM log lines
 * (docs/kplctl.md, "Live table"): a line with the word `weight` followed by
 * a number, or with `N% of traffic` (stages/canary.c), sets the stage's
 * WEIGHT; a line `NAME = VALUE ...` ending in
 * `, round R/N` (what stages/verify.c writes each round) or starting with
 * `verify ` sets its VERIFY. The most recent SYSTEM line of a running stage
 * is its MESSAGE.
 *
 * Threads: a struct live belongs to one thread.
 */
#ifndef KPL_CLIENTS_KPLCTL_LIVE_H
#define KPL_CLIENTS_KPLCTL_LIVE_H

#include <stdint.h>

#include "api/kpl.pb-c.h"

/* Log lines shown under the table, at most. */
#define LIVE_LOG_LINES 5

struct live; /* opaque */

/*
 * A model of run r (borrowed for the call). utf8: the terminal takes UTF-8
 * (the spinner is then a braille dot, else one of | / - \). Free with
 * live_free.
 */
struct live *live_new(const Kpl__V1__Run *r, int utf8);
void live_free(struct live *l);

/* Takes the state of the run and of each stage from r (borrowed): at the
 * start, and at the end, where GetRun has the last word. */
void live_set_run(struct live *l, const Kpl__V1__Run *r);

/* Applies one event (borrowed), in seq order. */
void live_event(struct live *l, const Kpl__V1__RunEvent *ev);

/* 1 while some stage is RUNNING (the frame changes with time alone). */
int live_ticking(const struct live *l);

/*
 * The lines of a frame for a terminal of cols x rows at now_ms (Unix ms):
 * at most rows - 1 lines (so drawing them never scrolls the frame's top
 * off the screen), none wider than cols - 1 columns (so none wraps), without
 * control characters or trailing blanks, without newlines. Returns a
 * NULL-terminated array the caller frees with live_lines_free; *n is its
 * length.
 */
char **live_frame(const struct live *l, int64_t now_ms, int cols, int rows,
		  int *n);
void live_lines_free(char **lines);

#endif
