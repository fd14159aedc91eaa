/*
 * fanout_test.c - unit tests of api/fanout.c, the window of a run's newest
 * events that WatchRun streams share, over a real store in a temporary
 * directory: every seq is found once and in order, a read at the end is
 * made once per commit (not once per stream), a stream behind the window
 * is sent to the store, the window stays bounded, and the bytes are the
 * stored events'.
 */
#define _GNU_SOURCE /* nftw */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <ftw.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/fanout.h"
#include "store/store.h"

#define RUN "r1"

struct fx {
	char dir[PATH_MAX];
	struct store *s;
	uint64_t n; /* events stored so far: seqs 1..n */
};

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	(void)st;
	(void)flag;
	(void)ftw;
	return remove(path);
}

static int setup(void **state)
{
	struct fx *fx = calloc(1, sizeof *fx);
	const char *tmp = getenv("TEST_TMPDIR");
	struct store_options opt = { 0 };
	struct kpl_err err;

	assert_non_null(fx);
	snprintf(fx->dir, sizeof fx->dir, "%s/fanout_test.XXXXXX", tmp ? tmp : "/tmp");
	assert_non_null(mkdtemp(fx->dir));
	assert_int_equal(store_open(NULL, fx->dir, &opt, &fx->s, &err), 0);
	*state = fx;
	return 0;
}

static int teardown(void **state)
{
	struct fx *fx = *state;

	store_close(fx->s);
	nftw(fx->dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
	free(fx);
	return 0;
}

/* Stores (durably) events n+1..n+k of RUN, each with a distinct message. */
static void add_events(struct fx *fx, uint64_t k)
{
	for (uint64_t i = 0; i < k; i++) {
		Kpl__V1__RunEvent ev = KPL__V1__RUN_EVENT__INIT;
		Google__Protobuf__Timestamp t = GOOGLE__PROTOBUF__TIMESTAMP__INIT;
		char msg[64];

		fx->n++;
		snprintf(msg, sizeof msg, "line %llu", (unsigned long long)fx->n);
		t.seconds = 1700000000 + (int64_t)fx->n;
		ev.run_id = RUN;
		ev.seq = fx->n;
		ev.time = &t;
		ev.stage = "s";
		ev.kind = KPL__V1__EVENT_KIND__EVENT_KIND_LOG;
		ev.message = msg;
		store_stage_event(fx->s, &ev);
	}
	assert_int_equal(store_commit_sync(fx->s), 0);
}

/* The event at index i of c is seq, as stored: its wire bytes decode to it
 * and the decoded copy agrees. */
static void check_event(struct fan_chunk *c, size_t i, uint64_t seq)
{
	char msg[64];
	Kpl__V1__RunEvent *wire;
	const Kpl__V1__RunEvent *ev;

	snprintf(msg, sizeof msg, "line %llu", (unsigned long long)seq);
	assert_int_equal(c->first_seq + i, seq);
	wire = kpl__v1__run_event__unpack(NULL, GRPC_SLICE_LENGTH(c->wire[i]),
					  GRPC_SLICE_START_PTR(c->wire[i]));
	assert_non_null(wire);
	assert_int_equal(wire->seq, seq);
	assert_string_equal(wire->message, msg);
	assert_string_equal(wire->run_id, RUN);
	kpl__v1__run_event__free_unpacked(wire, NULL);
	ev = fan_chunk_event(c, i);
	assert_non_null(ev);
	assert_int_equal(ev->seq, seq);
	assert_string_equal(ev->message, msg);
}

/*
 * What a caught-up stream does: from seq, take what the tail has until it
 * is dry; returns the next seq. Every event must come exactly once, in
 * order.
 */
static uint64_t follow(struct fan_tail *t, uint64_t seq)
{
	struct fan_chunk *c;
	size_t i;
	int rc;

	while ((rc = fan_tail_at(t, seq, &c, &i)) == FAN_HIT) {
		for (; i < c->n; i++)
			check_event(c, i, seq++);
	}
	assert_int_equal(rc, FAN_DRY);
	return seq;
}

/* Many streams at the end share one read per commit: the reads do not
 * grow with the streams. */
static void test_streams_share_reads(void **state)
{
	struct fx *fx = *state;
	struct fan_tail *t = fan_tail_new(fx->s, RUN, 256, 32 * 1024);
	uint64_t at[50];

	add_events(fx, 3);
	for (int k = 0; k < 50; k++)
		at[k] = follow(t, 1);
	for (int k = 0; k < 50; k++)
		assert_int_equal(at[k], 4);
	/* One read found 1..3 and the end (fewer than a chunk's worth). */
	assert_int_equal(fan_tail_reads(t), 1);

	for (int round = 0; round < 20; round++) {
		add_events(fx, 1 + (uint64_t)round % 3);
		/* Before the commit is heard of, the end stays dry. */
		assert_int_equal(follow(t, at[0]), at[0]);
		fan_tail_committed(t);
		for (int k = 0; k < 50; k++)
			at[k] = follow(t, at[k]);
		for (int k = 0; k < 50; k++)
			assert_int_equal(at[k], fx->n + 1);
	}
	assert_int_equal(fan_tail_reads(t), 21);
	fan_tail_free(t);
}

static int in_order(void *data, const Kpl__V1__RunEvent *ev)
{
	uint64_t *next = data;

	assert_int_equal(ev->seq, *next);
	(*next)++;
	return 0;
}

/* A stream that stopped reading falls behind the window (bounded), gets
 * FAN_MISS, reads the store itself, and is served by the tail again once
 * it reaches the window: no gap, no repeat. */
static void test_slow_stream_falls_back_and_catches_up(void **state)
{
	struct fx *fx = *state;
	/* Two events a chunk: the window holds at most 2 * FAN_WINDOW_CHUNKS. */
	struct fan_tail *t = fan_tail_new(fx->s, RUN, 2, 32 * 1024);
	uint64_t fast = 1, slow, seq;
	struct fan_chunk *c;
	size_t i;

	add_events(fx, 2);
	fast = follow(t, fast);
	slow = 2; /* it took seq 1 and stalled */
	for (int round = 0; round < 30; round++) {
		add_events(fx, 2); /* one chunk each */
		fan_tail_committed(t);
		fast = follow(t, fast);
	}
	assert_int_equal(fast, fx->n + 1);
	assert_int_equal(fan_tail_at(t, slow, &c, &i), FAN_MISS);
	assert_int_equal(fan_tail_at(t, fx->n + 1 - 2 * FAN_WINDOW_CHUNKS - 1, &c, &i), FAN_MISS);
	/* The newest 2 * FAN_WINDOW_CHUNKS events are still there. */
	seq = fx->n + 1 - 2 * FAN_WINDOW_CHUNKS;
	assert_int_equal(fan_tail_at(t, seq, &c, &i), FAN_HIT);
	check_event(c, i, seq);

	/* The slow stream reads the store itself, a batch at a time, until
	 * the tail has its seq. */
	while (fan_tail_at(t, slow, &c, &i) == FAN_MISS) {
		uint64_t next = slow;
		assert_int_equal(store_read_events(fx->s, RUN, slow, 3, in_order, &next), 0);
		assert_true(next > slow);
		slow = next;
	}
	assert_true(slow >= seq);
	assert_int_equal(follow(t, slow), fx->n + 1);
	fan_tail_free(t);
}

/* A stream ahead of the window (a resume past what the others read, or
 * past the end) moves the window to it; those behind read the store. */
static void test_stream_ahead_moves_window(void **state)
{
	struct fx *fx = *state;
	struct fan_tail *t = fan_tail_new(fx->s, RUN, 4, 32 * 1024);
	struct fan_chunk *c;
	size_t i;

	add_events(fx, 20);
	assert_int_equal(fan_tail_at(t, 1, &c, &i), FAN_HIT);
	check_event(c, 0, 1);
	assert_int_equal(fan_tail_at(t, 15, &c, &i), FAN_HIT);
	check_event(c, i, 15);
	assert_int_equal(fan_tail_at(t, 1, &c, &i), FAN_MISS);
	assert_int_equal(follow(t, 15), 21);
	/* Past the end: nothing, and no event invented. */
	assert_int_equal(fan_tail_at(t, 30, &c, &i), FAN_DRY);
	assert_int_equal(fan_tail_at(t, 21, &c, &i), FAN_MISS);
	add_events(fx, 15); /* 21..35 */
	fan_tail_committed(t);
	assert_int_equal(fan_tail_at(t, 30, &c, &i), FAN_HIT);
	check_event(c, 0, 30);
	assert_int_equal(follow(t, 30), 36);
	fan_tail_free(t);
}

/* A chunk stops at its byte bound, after the event that reaches it, and
 * a stream at seq 0 (never valid) is not served. */
static void test_chunk_bounds(void **state)
{
	struct fx *fx = *state;
	struct fan_tail *t = fan_tail_new(fx->s, RUN, 256, 100);
	struct fan_chunk *c;
	size_t i;

	add_events(fx, 40);
	assert_int_equal(fan_tail_at(t, 0, &c, &i), FAN_MISS);
	assert_int_equal(fan_tail_at(t, 1, &c, &i), FAN_HIT);
	assert_true(c->n >= 1 && c->n < 40);
	assert_true(c->bytes >= 100);
	assert_true(c->bytes - GRPC_SLICE_LENGTH(c->wire[c->n - 1]) < 100);
	assert_int_equal(follow(t, 1), 41);
	fan_tail_free(t);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_streams_share_reads, setup, teardown),
		cmocka_unit_test_setup_teardown(test_slow_stream_falls_back_and_catches_up, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_stream_ahead_moves_window, setup, teardown),
		cmocka_unit_test_setup_teardown(test_chunk_bounds, setup, teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
