/*
 * rings.c - the last log lines of each stage attempt kpl-chatbot has seen,
 * for its stage_failed notices (chatbot.h).
 */
#include <stdlib.h>
#include <string.h>

#include "clients/chatbot/chatbot.h"

/* --- Log rings --- */

struct ring {
	char *run_id, *stage;
	uint32_t attempt;
	int complete;
	char **lines; /* cap slots, a circle */
	size_t start, n;
	uint64_t used; /* for eviction: higher is newer */
	struct ring *next;
};

struct log_rings {
	int cap;
	struct ring *head;
	size_t count;
	uint64_t clock;
};

struct log_rings *log_rings_new(int cap)
{
	struct log_rings *r = kpl_calloc(1, sizeof *r);

	r->cap = cap;
	return r;
}

static void ring_free(struct ring *g, int cap)
{
	for (int i = 0; i < cap; i++)
		free(g->lines[i]);
	free(g->lines);
	free(g->run_id);
	free(g->stage);
	free(g);
}

void log_rings_free(struct log_rings *r)
{
	if (!r)
		return;
	while (r->head) {
		struct ring *g = r->head;

		r->head = g->next;
		ring_free(g, r->cap);
	}
	free(r);
}

static struct ring *ring_find(struct log_rings *r, const char *run_id, const char *stage)
{
	for (struct ring *g = r->head; g; g = g->next)
		if (strcmp(g->run_id, run_id) == 0 && strcmp(g->stage, stage) == 0)
			return g;
	return NULL;
}

static void ring_reset(struct log_rings *r, struct ring *g, uint32_t attempt, int complete)
{
	for (int i = 0; i < r->cap; i++) {
		free(g->lines[i]);
		g->lines[i] = NULL;
	}
	g->start = g->n = 0;
	g->attempt = attempt;
	g->complete = complete;
}

/* The ring of (run, stage), made (empty, incomplete) if there is none; the
 * least recently used one goes when there are too many. */
static struct ring *ring_get(struct log_rings *r, const char *run_id, const char *stage,
			     uint32_t attempt)
{
	struct ring *g = ring_find(r, run_id, stage);

	if (!g) {
		if (r->count >= LOG_RINGS_MAX) {
			struct ring **oldest = &r->head;

			for (struct ring **pp = &r->head; *pp; pp = &(*pp)->next)
				if ((*pp)->used < (*oldest)->used)
					oldest = pp;
			struct ring *dead = *oldest;
			*oldest = dead->next;
			ring_free(dead, r->cap);
			r->count--;
		}
		g = kpl_calloc(1, sizeof *g);
		g->run_id = kpl_strdup(run_id);
		g->stage = kpl_strdup(stage);
		g->lines = kpl_calloc((size_t)(r->cap > 0 ? r->cap : 1), sizeof *g->lines);
		g->attempt = attempt;
		g->next = r->head;
		r->head = g;
		r->count++;
	}
	g->used = ++r->clock;
	return g;
}

static void ring_push(struct log_rings *r, struct ring *g, const char *line)
{
	if (r->cap <= 0)
		return;
	if (g->n == (size_t)r->cap) {
		free(g->lines[g->start]);
		g->lines[g->start] = kpl_strdup(line);
		g->start = (g->start + 1) % (size_t)r->cap;
	} else {
		g->lines[(g->start + g->n) % (size_t)r->cap] = kpl_strdup(line);
		g->n++;
	}
}

void log_rings_feed(struct log_rings *r, const Kpl__V1__RunEvent *ev)
{
	const char *run = ev->run_id ? ev->run_id : "", *stage = ev->stage ? ev->stage : "";
	struct ring *g;

	switch (ev->kind) {
	case KPL__V1__EVENT_KIND__EVENT_KIND_STAGE_STATE:
		/* RUNNING after WAITING is the same attempt (an approval that
		 * was answered): keep its lines. */
		if (ev->stage_state != KPL__V1__STAGE_STATE__STAGE_STATE_RUNNING)
			return;
		g = ring_get(r, run, stage, ev->attempt);
		if (!(g->complete && g->attempt == ev->attempt))
			ring_reset(r, g, ev->attempt, 1);
		return;
	case KPL__V1__EVENT_KIND__EVENT_KIND_LOG:
		if (!*stage)
			return;
		g = ring_get(r, run, stage, ev->attempt);
		if (g->attempt != ev->attempt)
			ring_reset(r, g, ev->attempt, 0);
		ring_push(r, g, ev->message ? ev->message : "");
		return;
	case KPL__V1__EVENT_KIND__EVENT_KIND_RUN_STATE:
		if (ev->run_state != KPL__V1__RUN_STATE__RUN_STATE_SUCCEEDED &&
		    ev->run_state != KPL__V1__RUN_STATE__RUN_STATE_FAILED &&
		    ev->run_state != KPL__V1__RUN_STATE__RUN_STATE_CANCELLED)
			return;
		for (struct ring **pp = &r->head; *pp;) {
			struct ring *g2 = *pp;

			if (strcmp(g2->run_id, run) == 0) {
				*pp = g2->next;
				ring_free(g2, r->cap);
				r->count--;
			} else {
				pp = &g2->next;
			}
		}
		return;
	default:
		return;
	}
}

int log_rings_take(struct log_rings *r, const char *run_id, const char *stage,
		   uint32_t attempt, struct notice *n)
{
	struct ring *g = ring_find(r, run_id, stage);

	if (!g || g->attempt != attempt)
		return 0;
	n->log = kpl_calloc(g->n + 1, sizeof *n->log);
	for (size_t i = 0; i < g->n; i++)
		n->log[i] = kpl_strdup(g->lines[(g->start + i) % (size_t)r->cap]);
	n->n_log = g->n;
	return g->complete;
}

void log_rings_set(struct log_rings *r, const char *run_id, const char *stage,
		   uint32_t attempt, char *const *lines, size_t n_lines)
{
	struct ring *g = ring_get(r, run_id, stage, attempt);

	ring_reset(r, g, attempt, 1);
	for (size_t i = 0; i < n_lines; i++)
		ring_push(r, g, lines[i]);
}
