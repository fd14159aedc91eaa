/*
 * fanout.c - a run's newest events, read and encoded once for all its
 * caught-up WatchRun streams (fanout.h).
 *
 * The window is [start, next_seq): chunks of consecutive seqs, oldest
 * first. next_seq 0 means no stream asked yet. dry says that a read at
 * next_seq found nothing since the last commit, so the streams that reach
 * the end learn they are caught up without a store read each.
 */
#include "api/fanout.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/kpl.h"

struct fan_tail {
	struct store *st;      /* borrowed */
	char run_id[STORE_MAX_RUN_ID_LEN + 1];
	size_t max_events, max_bytes;
	struct fan_chunk *head, *tail; /* the window, oldest first */
	size_t n_chunks, bytes;
	uint64_t start, next_seq;
	bool dry;
	uint64_t reads;
};

static void chunk_free(struct fan_chunk *c)
{
	for (size_t i = 0; i < c->n; i++) {
		grpc_slice_unref(c->wire[i]);
		if (c->ev[i])
			kpl__v1__run_event__free_unpacked(c->ev[i], NULL);
	}
	free(c->wire);
	free(c->ev);
	free(c);
}

/* Drops every chunk; the window is empty at next_seq. */
static void window_clear(struct fan_tail *t)
{
	while (t->head) {
		struct fan_chunk *c = t->head;
		t->head = c->next;
		chunk_free(c);
	}
	t->tail = NULL;
	t->n_chunks = t->bytes = 0;
	t->start = t->next_seq;
}

struct fan_tail *fan_tail_new(struct store *st, const char *run_id, size_t max_events,
			      size_t max_bytes)
{
	struct fan_tail *t = kpl_calloc(1, sizeof *t);

	t->st = st;
	snprintf(t->run_id, sizeof t->run_id, "%s", run_id);
	t->max_events = max_events ? max_events : 1;
	t->max_bytes = max_bytes;
	return t;
}

void fan_tail_free(struct fan_tail *t)
{
	if (!t)
		return;
	window_clear(t);
	free(t);
}

void fan_tail_committed(struct fan_tail *t)
{
	t->dry = false;
}

uint64_t fan_tail_reads(const struct fan_tail *t)
{
	return t->reads;
}

/* A chunk being read: the events must follow each other from first_seq. */
struct chunk_read {
	struct fan_tail *t;
	struct fan_chunk *c;
	bool gap; /* an event out of sequence: the chunk ends before it */
};

static int chunk_got(void *data, const Kpl__V1__RunEvent *ev)
{
	struct chunk_read *r = data;
	struct fan_chunk *c = r->c;
	size_t n;

	if (ev->seq != c->first_seq + c->n) {
		r->gap = true;
		return 1;
	}
	n = protobuf_c_message_get_packed_size(&ev->base);
	c->wire[c->n] = grpc_slice_malloc(n);
	protobuf_c_message_pack(&ev->base, GRPC_SLICE_START_PTR(c->wire[c->n]));
	c->ev[c->n] = NULL;
	c->n++;
	c->bytes += n;
	return c->bytes >= r->t->max_bytes ? 1 : 0;
}

/* Reads the chunk at next_seq onto the window's end. FAN_HIT, FAN_DRY, or
 * a negative KPL_E*. */
static int window_grow(struct fan_tail *t)
{
	struct fan_chunk *c = kpl_calloc(1, sizeof *c);
	struct chunk_read r = { t, c, false };
	int rc;

	c->first_seq = t->next_seq;
	c->wire = kpl_calloc(t->max_events, sizeof *c->wire);
	c->ev = kpl_calloc(t->max_events, sizeof *c->ev);
	t->reads++;
	rc = store_read_events(t->st, t->run_id, t->next_seq, t->max_events, chunk_got, &r);
	if (rc < 0) {
		chunk_free(c);
		return rc;
	}
	/* Read to the end (neither full nor cut): nothing more until the next
	 * commit. A gap is not expected (seqs follow each other); the streams
	 * then read the store themselves past it. */
	if (rc == 0 && c->n < t->max_events && !r.gap)
		t->dry = true;
	if (c->n == 0) {
		chunk_free(c);
		if (r.gap)
			return FAN_MISS;
		t->dry = true;
		return FAN_DRY;
	}
	if (c->n < t->max_events) {
		c->wire = kpl_realloc(c->wire, c->n * sizeof *c->wire);
		c->ev = kpl_realloc(c->ev, c->n * sizeof *c->ev);
	}
	if (t->tail)
		t->tail->next = c;
	else
		t->head = c;
	t->tail = c;
	t->n_chunks++;
	t->bytes += c->bytes;
	t->next_seq += c->n;
	/* Bounded: the oldest chunks go, never the one just read. */
	while (t->head != c &&
	       (t->n_chunks > FAN_WINDOW_CHUNKS || t->bytes > FAN_WINDOW_BYTES)) {
		struct fan_chunk *old = t->head;
		t->head = old->next;
		t->n_chunks--;
		t->bytes -= old->bytes;
		t->start = t->head->first_seq;
		chunk_free(old);
	}
	return FAN_HIT;
}

int fan_tail_at(struct fan_tail *t, uint64_t seq, struct fan_chunk **c, size_t *i)
{
	int rc;

	*c = NULL;
	*i = 0;
	if (seq == 0)
		return FAN_MISS;
	if (t->next_seq && seq < t->start)
		return FAN_MISS;
	if (t->next_seq && seq < t->next_seq) {
		for (struct fan_chunk *k = t->head; k; k = k->next)
			if (seq < k->first_seq + k->n) {
				*c = k;
				*i = (size_t)(seq - k->first_seq);
				return FAN_HIT;
			}
		BUG("fan: seq %llu not in the window [%llu, %llu)", (unsigned long long)seq,
		    (unsigned long long)t->start, (unsigned long long)t->next_seq);
	}
	if (!t->next_seq || seq > t->next_seq) {
		/* A stream ahead of the window (or the first one): the window
		 * moves to it. */
		t->next_seq = seq;
		t->dry = false;
		window_clear(t);
	}
	if (t->dry)
		return FAN_DRY;
	rc = window_grow(t);
	if (rc == FAN_HIT) {
		*c = t->tail;
		*i = 0;
	}
	return rc;
}

const Kpl__V1__RunEvent *fan_chunk_event(struct fan_chunk *c, size_t i)
{
	if (i >= c->n)
		return NULL;
	if (!c->ev[i])
		c->ev[i] = kpl__v1__run_event__unpack(NULL, GRPC_SLICE_LENGTH(c->wire[i]),
						       GRPC_SLICE_START_PTR(c->wire[i]));
	return c->ev[i];
}
