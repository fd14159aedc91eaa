/*
 * fanout.h - one run's newest committed events, read from the store and
 * encoded once for every WatchRun stream of that run that is caught up.
 *
 * A tail is a window of chunks of consecutive events (by seq), oldest
 * first, each read in one store transaction and encoded as the RunEvent
 * messages a stream sends. Streams at the window's end make it grow (the
 * first one to ask reads the next chunk; the others find it there); a
 * stream behind the window (a replay, a slow client) reads the store
 * itself, as if there were no tail, until it reaches the window. The
 * window keeps at most FAN_WINDOW_CHUNKS chunks and about FAN_WINDOW_BYTES
 * of encoded events: the oldest go first. A stream sends the chunk's
 * slices, which grpc references while it writes them, so a stalled client
 * pins at most what it has in flight (one batch), never the window.
 *
 * Ownership: the caller owns the tail; the store is borrowed and outlives
 * it. Chunks belong to the tail and are valid until the next call on it
 * (fan_tail_at may evict them). Threads: loop thread only.
 */
#ifndef KPL_FANOUT_H
#define KPL_FANOUT_H

#include <grpc/slice.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "api/kpl.pb-c.h"
#include "store/store.h"

/* The window's bounds; chunk bounds are the caller's (fan_tail_new). */
#define FAN_WINDOW_CHUNKS 8
#define FAN_WINDOW_BYTES (256 * 1024)

struct fan_chunk {
	uint64_t first_seq; /* the seq of wire[0] */
	size_t n;
	grpc_slice *wire;   /* each event encoded as a RunEvent message */
	Kpl__V1__RunEvent **ev; /* decoded on demand (fan_chunk_event) */
	size_t bytes;       /* sum of the wire lengths */
	struct fan_chunk *next;
};

struct fan_tail;

/* A tail of run_id's events; a chunk holds at most max_events events and
 * stops after the event that reaches max_bytes. */
struct fan_tail *fan_tail_new(struct store *st, const char *run_id, size_t max_events,
			      size_t max_bytes);
void fan_tail_free(struct fan_tail *t);

/* A commit added events to the run: the next read at the window's end
 * goes to the store again. */
void fan_tail_committed(struct fan_tail *t);

enum fan_at {
	FAN_HIT = 0,  /* *c holds seq at index *i */
	FAN_DRY = 1,  /* seq is past the last stored event (as of the last commit) */
	FAN_MISS = 2, /* seq is older than the window: read the store */
};

/*
 * Where the stream that wants seq next finds it: FAN_HIT, FAN_DRY or
 * FAN_MISS, or a negative KPL_E* from the store. A seq past the window's
 * end moves the window there (the streams it served are behind then, and
 * read the store until they catch up).
 */
int fan_tail_at(struct fan_tail *t, uint64_t seq, struct fan_chunk **c, size_t *i);

/* The chunk's event i, decoded (for transports that need the message, not
 * the bytes); NULL if it does not decode. Valid as long as the chunk. */
const Kpl__V1__RunEvent *fan_chunk_event(struct fan_chunk *c, size_t i);

/* Store reads the tail made so far (each one chunk, or one that found
 * nothing new); for tests and metrics. */
uint64_t fan_tail_reads(const struct fan_tail *t);

#endif
