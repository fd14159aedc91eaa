/*
 * main.c - kpl-chatbot: follows kpld's WatchRuns and posts notices to chat
 * webhooks (docs/chatbot.md).
 *
 * Two threads. The follower thread reads WatchRuns with the blocking client
 * (clients/kplclient.h), keeps the last log lines of every stage, asks
 * GetRun for stage kinds when it must, and turns each event into an item:
 * the notice it makes, if any, or just its global seq. Items go to the loop
 * through a mutex-protected list and uv_async_send, sent only when the list
 * goes from empty to non-empty (libuv coalesces wake-ups; the async callback
 * drains the whole list).
 *
 * The loop thread owns everything else: one queue per chat, each sending one
 * message at a time, in order, through base/http.h, so a slow or failing
 * chat delays only itself; a failed message is tried again after a doubling
 * backoff, and given up after max_tries. Every chat's progress is the last
 * global seq all of whose messages it took (or gave up on); the state file
 * holds them all and is written after every delivery, so a restart resumes
 * from the smallest + 1 and skips, per chat, what that chat already took.
 */
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <uv.h>

#include "clients/chatbot/chatbot.h"
#include "clients/kplclient.h"
#include "base/http.h"

#define LOG "chatbot"
/* State writes that only move progress past events without messages (log
 * lines, say) wait this long, to group them. */
#define FLUSH_DELAY_MS 1000
/* At shutdown, requests in flight get this long to finish. */
#define SHUTDOWN_GRACE_MS 5000
#define KIND_CACHE_MAX 256

/* One event, handed from the follower thread to the loop. */
struct item {
	struct item *next;
	uint64_t global_seq;
	int has_notice;
	struct notice n;
};

/* One message for one chat. */
struct msg {
	struct msg *next;
	uint64_t global_seq;
	char *body;
	char *what; /* "stage_failed of run r-1 (global seq 42)", for logs */
};

struct bot;

struct chat {
	struct bot *bot;
	const struct chat_config *cfg;
	size_t idx;
	struct msg *head, *tail;
	size_t queued;
	struct http_request *req; /* in flight, or NULL */
	uv_timer_t retry_timer;
	int backing_off;
	int tries; /* failed tries of the head message */
	char log_name[96]; /* "chat NAME": what logs show instead of the URL */
};

/* Stage kinds of one run, from GetRun (follower thread only). */
struct run_kinds {
	char *run_id;
	char **names, **kinds;
	size_t n;
	struct run_kinds *next;
};

struct bot {
	struct chatbot_config cfg;
	uv_loop_t *loop;
	uv_async_t async;
	uv_signal_t sigint, sigterm;
	uv_timer_t flush_timer, grace_timer;
	struct http_client *http;
	struct chat *chats;
	char **names;
	uint64_t *acked;
	uint64_t processed; /* highest global seq handed to the chats */
	int have_state;     /* acked[] means something (loaded or begun) */
	int dirty;
	int shutting_down, finishing;

	/* Shared with the follower thread, under mu. */
	pthread_mutex_t mu;
	struct item *head, *tail;
	int follower_done;

	/* Follower thread only (and set before it starts). */
	pthread_t thread;
	struct kplc *c;
	uint64_t resume_from; /* 0: only new events */
	uint64_t f_last;      /* last global seq seen */
	struct log_rings *rings;
	struct run_kinds *kinds;
	size_t n_kinds;
	int want_rollback;

	volatile sig_atomic_t stop;
	int exit_code;
};

/* ---------------------------------------------------------------------- */
/* Follower thread */

static void post_item(struct bot *b, struct item *it)
{
	int wake;

	pthread_mutex_lock(&b->mu);
	wake = b->head == NULL;
	if (!it->has_notice && b->tail && !b->tail->has_notice) {
		/* Only progress: the last such item can carry it. */
		b->tail->global_seq = it->global_seq;
		free(it);
		it = NULL;
	} else {
		if (b->tail)
			b->tail->next = it;
		else
			b->head = it;
		b->tail = it;
	}
	pthread_mutex_unlock(&b->mu);
	if (wake)
		uv_async_send(&b->async);
}

static void sleep_ms(struct bot *b, int ms)
{
	for (int waited = 0; waited < ms && !b->stop; waited += 50) {
		struct timespec ts = { 0, 50 * 1000000L };

		nanosleep(&ts, NULL);
	}
}

static void run_kinds_free(struct run_kinds *k)
{
	for (size_t i = 0; i < k->n; i++) {
		free(k->names[i]);
		free(k->kinds[i]);
	}
	free(k->names);
	free(k->kinds);
	free(k->run_id);
	free(k);
}

static void kinds_forget(struct bot *b, const char *run_id)
{
	for (struct run_kinds **pp = &b->kinds; *pp; pp = &(*pp)->next)
		if (strcmp((*pp)->run_id, run_id) == 0) {
			struct run_kinds *k = *pp;

			*pp = k->next;
			run_kinds_free(k);
			b->n_kinds--;
			return;
		}
}

/* The kind of a run's stage, from GetRun (cached per run until its final
 * event). NULL if the run or stage is unknown. Retries while kpld is
 * unavailable (WatchRuns would not go on either). */
static const char *stage_kind(struct bot *b, const char *run_id, const char *stage)
{
	struct run_kinds *k;
	Kpl__V1__Run *run = NULL;
	struct kplc_status st;
	int backoff = 200;

	for (k = b->kinds; k; k = k->next)
		if (strcmp(k->run_id, run_id) == 0)
			goto found;
	while (kplc_get_run(b->c, run_id, &run, &st) < 0) {
		if (st.code != KPLC_UNAVAILABLE || b->stop) {
			kpl_warn(LOG, "GetRun %s: %s: %s (taking no stage as a rollback)", run_id,
				 kplc_status_name(st.code), st.message);
			break;
		}
		sleep_ms(b, backoff);
		backoff = backoff < 5000 ? backoff * 2 : 5000;
	}
	if (b->n_kinds >= KIND_CACHE_MAX) {
		struct run_kinds **pp = &b->kinds;

		while ((*pp)->next)
			pp = &(*pp)->next;
		run_kinds_free(*pp);
		*pp = NULL;
		b->n_kinds--;
	}
	k = kpl_calloc(1, sizeof *k);
	k->run_id = kpl_strdup(run_id);
	if (run) {
		k->n = run->n_stages;
		k->names = kpl_calloc(k->n + 1, sizeof *k->names);
		k->kinds = kpl_calloc(k->n + 1, sizeof *k->kinds);
		for (size_t i = 0; i < k->n; i++) {
			k->names[i] = kpl_strdup(run->stages[i]->name ? run->stages[i]->name : "");
			k->kinds[i] = kpl_strdup(run->stages[i]->kind ? run->stages[i]->kind : "");
		}
		kplc_msg_free(run);
	}
	k->next = b->kinds;
	b->kinds = k;
	b->n_kinds++;
found:
	for (size_t i = 0; i < k->n; i++)
		if (strcmp(k->names[i], stage) == 0)
			return k->kinds[i];
	return NULL;
}

static int is_rollback(struct bot *b, const Kpl__V1__RunEvent *ev)
{
	const char *kind;

	if (!b->want_rollback || ev->kind != KPL__V1__EVENT_KIND__EVENT_KIND_STAGE_STATE ||
	    ev->stage_state != KPL__V1__STAGE_STATE__STAGE_STATE_SUCCEEDED)
		return 0;
	for (size_t i = 0; i < b->cfg.n_rollback_stages; i++)
		if (strcmp(b->cfg.rollback_stages[i], ev->stage) == 0)
			return 1;
	kind = stage_kind(b, ev->run_id, ev->stage);
	return kind && strcmp(kind, "rollback") == 0;
}

/*
 * The bot did not see the failed stage's attempt from its start (it started
 * or resumed in the middle): read the run's stored events up to the failure
 * with WatchRun and keep the stage's last lines.
 */
static void backfill_log(struct bot *b, const Kpl__V1__RunEvent *ev)
{
	struct kplc_stream *s = NULL;
	struct kplc_status st;
	Kpl__V1__RunEvent *e;
	size_t cap = (size_t)b->cfg.log_lines, n = 0;
	char **lines = kpl_calloc(cap + 1, sizeof *lines);
	int rc;

	if (cap == 0)
		goto out;
	if (kplc_watch_run(b->c, ev->run_id, 1, &s, &st) < 0)
		goto fail;
	while ((rc = kplc_watch_next(s, &e, &st)) == 1) {
		uint64_t seq = e->seq;

		if (e->kind == KPL__V1__EVENT_KIND__EVENT_KIND_LOG && e->stage &&
		    strcmp(e->stage, ev->stage) == 0 && e->attempt == ev->attempt) {
			if (n == cap) {
				free(lines[0]);
				memmove(lines, lines + 1, (cap - 1) * sizeof *lines);
				n--;
			}
			lines[n++] = kpl_strdup(e->message ? e->message : "");
		}
		kplc_msg_free(e);
		if (seq >= ev->seq)
			break;
	}
	if (rc < 0)
		goto fail;
	log_rings_set(b->rings, ev->run_id, ev->stage, ev->attempt, lines, n);
	goto out;
fail:
	kpl_warn(LOG, "run %s stage %s: cannot read its log lines: %s: %s", ev->run_id,
		 ev->stage, kplc_status_name(st.code), st.message);
out:
	kplc_stream_close(s);
	for (size_t i = 0; i < n; i++)
		free(lines[i]);
	free(lines);
}

static int on_event(const Kpl__V1__RunEvent *ev, void *data)
{
	struct bot *b = data;
	struct item *it;
	enum notice_kind kind;

	if (ev->global_seq <= b->f_last)
		return 0;
	b->f_last = ev->global_seq;
	it = kpl_calloc(1, sizeof *it);
	it->global_seq = ev->global_seq;
	kind = notice_classify(ev, is_rollback(b, ev));
	if (kind != NOTICE_LAST) {
		it->has_notice = 1;
		notice_init_from(&it->n, kind, ev);
		if (kind == NOTICE_STAGE_FAILED && b->cfg.log_lines > 0 &&
		    !log_rings_take(b->rings, ev->run_id, ev->stage, ev->attempt, &it->n)) {
			notice_release(&it->n);
			notice_init_from(&it->n, kind, ev);
			backfill_log(b, ev);
			log_rings_take(b->rings, ev->run_id, ev->stage, ev->attempt, &it->n);
		}
	}
	log_rings_feed(b->rings, ev);
	if (ev->kind == KPL__V1__EVENT_KIND__EVENT_KIND_RUN_STATE &&
	    (ev->run_state == KPL__V1__RUN_STATE__RUN_STATE_SUCCEEDED ||
	     ev->run_state == KPL__V1__RUN_STATE__RUN_STATE_FAILED ||
	     ev->run_state == KPL__V1__RUN_STATE__RUN_STATE_CANCELLED))
		kinds_forget(b, ev->run_id);
	post_item(b, it);
	return 0;
}

static void *follower_main(void *arg)
{
	struct bot *b = arg;
	Kpl__V1__WatchRunsRequest req = KPL__V1__WATCH_RUNS_REQUEST__INIT;
	Kpl__V1__EventKind kinds[3];
	struct kplc_follow_options fo = { 0 };
	struct kplc_status st;
	int want_logs = 0, rc;

	for (size_t i = 0; i < b->cfg.n_chats; i++)
		if ((b->cfg.chats[i].events & (1u << NOTICE_STAGE_FAILED)) &&
		    b->cfg.log_lines > 0)
			want_logs = 1;
	kinds[0] = KPL__V1__EVENT_KIND__EVENT_KIND_RUN_STATE;
	kinds[1] = KPL__V1__EVENT_KIND__EVENT_KIND_STAGE_STATE;
	kinds[2] = KPL__V1__EVENT_KIND__EVENT_KIND_LOG;
	req.kinds = kinds;
	req.n_kinds = want_logs ? 3 : 2;
	req.pipeline_name = "";
	fo.max_retries = 1000000;
	fo.initial_backoff_ms = 200;
	fo.stop = &b->stop;
	b->f_last = b->resume_from ? b->resume_from - 1 : 0;
	while (!b->stop) {
		req.from_global_seq = b->f_last || b->resume_from ? b->f_last + 1 : 0;
		kpl_info(LOG, "following WatchRuns on %s from %s %llu", b->cfg.server,
			 req.from_global_seq ? "global seq" : "new events, seq 0 =",
			 (unsigned long long)req.from_global_seq);
		rc = kplc_follow_runs(b->c, &req, &fo, on_event, b, NULL, &st);
		if (b->stop)
			break;
		kpl_warn(LOG, "WatchRuns ended: %s: %s (rc %d); again in 1 s",
			 kplc_status_name(st.code), st.message, rc);
		sleep_ms(b, 1000);
	}
	pthread_mutex_lock(&b->mu);
	b->follower_done = 1;
	pthread_mutex_unlock(&b->mu);
	uv_async_send(&b->async);
	return NULL;
}

/* ---------------------------------------------------------------------- */
/* Loop thread: state */

static void save_state(struct bot *b)
{
	struct kpl_err err = { 0 };

	if (!b->have_state)
		return;
	if (chatbot_state_save(b->cfg.state_file, b->names, b->cfg.n_chats, b->acked, &err))
		kpl_error(LOG, "cannot write the state file: %s", err.msg);
	else
		b->dirty = 0;
}

static void on_flush_timer(uv_timer_t *t)
{
	struct bot *b = t->data;

	if (b->dirty)
		save_state(b);
}

static void mark_dirty(struct bot *b)
{
	b->dirty = 1;
	if (!uv_is_active((uv_handle_t *)&b->flush_timer) && !b->finishing)
		uv_timer_start(&b->flush_timer, on_flush_timer, FLUSH_DELAY_MS, 0);
}

/* ---------------------------------------------------------------------- */
/* Loop thread: chats */

static void pump(struct chat *ch);
static void maybe_finish(struct bot *b);

static void msg_free(struct msg *m)
{
	free(m->body);
	free(m->what);
	free(m);
}

/* The head message is done (taken or given up): the chat has taken
 * everything before the next one it still holds. */
static void pop(struct chat *ch)
{
	struct bot *b = ch->bot;
	struct msg *m = ch->head;

	ch->head = m->next;
	if (!ch->head)
		ch->tail = NULL;
	ch->queued--;
	ch->tries = 0;
	b->acked[ch->idx] = ch->head ? ch->head->global_seq - 1 : b->processed;
	msg_free(m);
	/* Right away: the window in which a crash re-sends a message the
	 * chat already took is this write. */
	save_state(b);
}

static void on_retry_timer(uv_timer_t *t)
{
	struct chat *ch = t->data;

	ch->backing_off = 0;
	pump(ch);
}

static void on_sent(struct http_response *resp, int status, void *data)
{
	struct chat *ch = data;
	struct bot *b = ch->bot;
	const struct chatbot_config *cfg = &b->cfg;
	enum chat_verdict v;
	char why[256];
	int64_t delay;

	ch->req = NULL;
	if (status == KPL_ECANCELLED) {
		/* Shutdown: the message stays for the next start. */
		maybe_finish(b);
		return;
	}
	if (status < 0) {
		/* Not resp->err.msg: it names the URL, and a Slack URL's
		 * secret is in its path. */
		snprintf(why, sizeof why, "%s after %d attempt%s", kpl_strerror(status),
			 resp->attempts, resp->attempts == 1 ? "" : "s");
		v = CHAT_RETRY;
	} else {
		v = chat_judge_reply(ch->cfg->kind, resp->status, resp->body, why, sizeof why);
	}
	switch (v) {
	case CHAT_DELIVERED:
		kpl_info(LOG, "chat %s: delivered %s", ch->cfg->name, ch->head->what);
		pop(ch);
		break;
	case CHAT_REJECTED:
		kpl_error(LOG, "chat %s: giving up on %s: the chat refused it: %s",
			  ch->cfg->name, ch->head->what, why);
		pop(ch);
		break;
	case CHAT_RETRY:
		ch->tries++;
		if (ch->tries >= cfg->max_tries) {
			kpl_error(LOG, "chat %s: giving up on %s after %d tries: %s",
				  ch->cfg->name, ch->head->what, ch->tries, why);
			pop(ch);
			break;
		}
		delay = cfg->backoff_ms;
		for (int i = 1; i < ch->tries && delay < cfg->max_backoff_ms; i++)
			delay *= 2;
		if (delay > cfg->max_backoff_ms)
			delay = cfg->max_backoff_ms;
		if (status == 0 && resp->status == 429) {
			const char *ra = http_response_header(resp, "Retry-After");
			int64_t ms = ra ? http_parse_retry_after(ra, kpl_now_ms()) : -1;

			if (ms > delay)
				delay = ms < cfg->max_backoff_ms ? ms : cfg->max_backoff_ms;
		}
		kpl_warn(LOG, "chat %s: try %d of %s failed: %s; again in %lld ms",
			 ch->cfg->name, ch->tries, ch->head->what, why, (long long)delay);
		if (!b->shutting_down) {
			ch->backing_off = 1;
			uv_timer_start(&ch->retry_timer, on_retry_timer, (uint64_t)delay, 0);
		}
		break;
	}
	if (b->shutting_down)
		maybe_finish(b);
	else
		pump(ch);
}

static void pump(struct chat *ch)
{
	struct bot *b = ch->bot;
	struct http_request_options o = { 0 };
	struct http_header hdr;
	struct kpl_err err = { 0 };
	char *url;

	if (ch->req || ch->backing_off || !ch->head || b->shutting_down)
		return;
	if (ch->cfg->kind == CHAT_DINGTALK && ch->cfg->secret)
		url = dingtalk_signed_url(ch->cfg->url, ch->cfg->secret, kpl_now_ms());
	else
		url = kpl_strdup(ch->cfg->url);
	hdr.name = "Content-Type";
	hdr.value = ch->cfg->kind == CHAT_DINGTALK ? "application/json; charset=utf-8"
						   : "application/json";
	o.method = "POST";
	o.url = url;
	/* A webhook URL is the credential itself (Slack's secret is its path,
	 * DingTalk's sign= is valid for an hour): logs name the chat instead. */
	snprintf(ch->log_name, sizeof ch->log_name, "chat %s", ch->cfg->name);
	o.log_url = ch->log_name;
	o.headers = &hdr;
	o.n_headers = 1;
	o.body = ch->head->body;
	o.body_len = strlen(ch->head->body);
	o.timeout_ms = b->cfg.timeout_ms;
	/* A POST is not repeated by the HTTP layer unless nothing was sent;
	 * the chat's queue does the rest, in order. */
	o.idempotent = HTTP_IDEMPOTENT_NO;
	o.max_body = 64 * 1024;
	o.on_done = on_sent;
	o.data = ch;
	if (http_request_start(b->http, &o, &ch->req, &err)) {
		/* err.msg may name the URL: keep it out of the log. */
		kpl_error(LOG, "chat %s: giving up on %s: cannot start the request (%s)",
			  ch->cfg->name, ch->head->what, kpl_err_name(err.code));
		ch->req = NULL;
		free(url);
		pop(ch);
		pump(ch);
		return;
	}
	free(url);
}

static void process_item(struct bot *b, struct item *it)
{
	if (!b->have_state) {
		/* First event after a start from "new": nothing before it is
		 * ours to send. Recorded at once, so a crash from now on
		 * resumes here rather than at whatever is new then. */
		for (size_t i = 0; i < b->cfg.n_chats; i++)
			b->acked[i] = it->global_seq - 1;
		b->have_state = 1;
		save_state(b);
	}
	if (it->global_seq <= b->processed)
		return;
	b->processed = it->global_seq;
	for (size_t i = 0; i < b->cfg.n_chats; i++) {
		struct chat *ch = &b->chats[i];

		if (it->has_notice && it->global_seq > b->acked[i] &&
		    chat_wants(ch->cfg, it->n.kind, it->n.pipeline)) {
			struct msg *m = kpl_calloc(1, sizeof *m);

			m->global_seq = it->global_seq;
			m->body = notice_render_buttons(ch->cfg->kind, &it->n, ch->cfg->buttons);
			m->what = kpl_asprintf("%s of run %s (global seq %llu)",
					       notice_kind_name(it->n.kind), it->n.run_id,
					       (unsigned long long)it->global_seq);
			if (ch->tail)
				ch->tail->next = m;
			else
				ch->head = m;
			ch->tail = m;
			ch->queued++;
			pump(ch);
		} else if (!ch->head && b->acked[i] < it->global_seq) {
			b->acked[i] = it->global_seq;
			mark_dirty(b);
		}
	}
}

static void item_free(struct item *it)
{
	if (it->has_notice)
		notice_release(&it->n);
	free(it);
}

static void begin_shutdown(struct bot *b);

static void on_async(uv_async_t *a)
{
	struct bot *b = a->data;
	struct item *list;
	int done;

	pthread_mutex_lock(&b->mu);
	list = b->head;
	b->head = b->tail = NULL;
	done = b->follower_done;
	pthread_mutex_unlock(&b->mu);
	while (list) {
		struct item *next = list->next;

		if (!b->shutting_down)
			process_item(b, list);
		item_free(list);
		list = next;
	}
	if (done && !b->shutting_down)
		begin_shutdown(b);
}

/* ---------------------------------------------------------------------- */
/* Shutdown */

static void on_closed_free_nothing(uv_handle_t *h)
{
	(void)h;
}

static void on_http_closed(void *data)
{
	struct bot *b = data;

	b->http = NULL;
	/* The follower sees b->stop within 100 ms (or when a GetRun or
	 * backfill ends). */
	pthread_join(b->thread, NULL);
	on_async(&b->async); /* free what it posted last */
	if (b->dirty)
		save_state(b);
	uv_close((uv_handle_t *)&b->async, on_closed_free_nothing);
	uv_close((uv_handle_t *)&b->flush_timer, on_closed_free_nothing);
	uv_close((uv_handle_t *)&b->grace_timer, on_closed_free_nothing);
	uv_close((uv_handle_t *)&b->sigint, on_closed_free_nothing);
	uv_close((uv_handle_t *)&b->sigterm, on_closed_free_nothing);
	for (size_t i = 0; i < b->cfg.n_chats; i++)
		uv_close((uv_handle_t *)&b->chats[i].retry_timer, on_closed_free_nothing);
}

static void finish(struct bot *b)
{
	if (b->finishing)
		return;
	b->finishing = 1;
	uv_timer_stop(&b->grace_timer);
	uv_timer_stop(&b->flush_timer);
	http_client_close(b->http, on_http_closed, b);
}

static void maybe_finish(struct bot *b)
{
	if (!b->shutting_down)
		return;
	for (size_t i = 0; i < b->cfg.n_chats; i++)
		if (b->chats[i].req)
			return;
	finish(b);
}

static void on_grace_timer(uv_timer_t *t)
{
	struct bot *b = t->data;

	kpl_warn(LOG, "requests still in flight after %d ms: cancelled (sent again on the "
		      "next start)", SHUTDOWN_GRACE_MS);
	finish(b);
}

static void begin_shutdown(struct bot *b)
{
	b->shutting_down = 1;
	b->stop = 1;
	uv_signal_stop(&b->sigint);
	uv_signal_stop(&b->sigterm);
	for (size_t i = 0; i < b->cfg.n_chats; i++) {
		uv_timer_stop(&b->chats[i].retry_timer);
		b->chats[i].backing_off = 0;
	}
	uv_timer_start(&b->grace_timer, on_grace_timer, SHUTDOWN_GRACE_MS, 0);
	maybe_finish(b);
}

static void on_signal(uv_signal_t *s, int signum)
{
	struct bot *b = s->data;

	kpl_info(LOG, "signal %d: stopping", signum);
	begin_shutdown(b);
}

/* ---------------------------------------------------------------------- */

static char *read_file(const char *path, size_t *len, struct kpl_err *err)
{
	FILE *f = fopen(path, "rb");
	char *buf = NULL;
	size_t cap = 0, n = 0;

	if (!f) {
		kpl_errf(err, KPL_EIO, "%s: %s", path, strerror(errno));
		return NULL;
	}
	for (;;) {
		size_t r;

		if (n + 4096 > cap) {
			cap = (n + 4096) * 2;
			if (cap > KPL_MAX_PIPELINE_BYTES + 8192) {
				fclose(f);
				free(buf);
				kpl_errf(err, KPL_ETOOBIG, "%s: larger than %d bytes", path,
					 KPL_MAX_PIPELINE_BYTES);
				return NULL;
			}
			buf = kpl_realloc(buf, cap);
		}
		r = fread(buf + n, 1, cap - n - 1, f);
		n += r;
		if (r == 0)
			break;
	}
	fclose(f);
	buf[n] = '\0';
	*len = n;
	return buf;
}

static void usage(FILE *out)
{
	fprintf(out, "usage: kpl-chatbot --config FILE [--log-level debug|info|warn|error]\n"
		     "Follows kpld's WatchRuns and posts run notices to WeCom, DingTalk and\n"
		     "Slack webhooks; see docs/chatbot.md. Logs name a chat, never its\n"
		     "webhook URL (the URL is the credential).\n");
}

int main(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "config", required_argument, NULL, 'c' },
		{ "log-level", required_argument, NULL, 'l' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct bot b_, *b = &b_;
	struct http_client_options ho = { .user_agent = "kpl-chatbot" };
	struct kplc_options co = { .deadline_ms = 10000 };
	const char *config = NULL;
	struct kpl_err err = { 0 };
	uv_loop_t loop;
	char *text;
	size_t len;
	int opt, rc;

	while ((opt = getopt_long(argc, argv, "c:l:h", longopts, NULL)) != -1) {
		switch (opt) {
		case 'c': config = optarg; break;
		case 'l':
			rc = kpl_log_level_parse(optarg);
			if (rc < 0) {
				fprintf(stderr, "kpl-chatbot: unknown log level \"%s\"\n", optarg);
				return 2;
			}
			kpl_log_threshold = (enum kpl_log_level)rc;
			break;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (!config || optind != argc) {
		usage(stderr);
		return 2;
	}
	memset(b, 0, sizeof *b);
	if (!(text = read_file(config, &len, &err)) ||
	    chatbot_config_parse(text, len, config, &b->cfg, &err)) {
		fprintf(stderr, "kpl-chatbot: %s\n", err.msg);
		free(text);
		return 2;
	}
	free(text);

	b->names = kpl_calloc(b->cfg.n_chats, sizeof *b->names);
	b->acked = kpl_calloc(b->cfg.n_chats, sizeof *b->acked);
	for (size_t i = 0; i < b->cfg.n_chats; i++) {
		b->names[i] = b->cfg.chats[i].name;
		if (b->cfg.chats[i].events & (1u << NOTICE_ROLLED_BACK))
			b->want_rollback = 1;
	}
	rc = chatbot_state_load(b->cfg.state_file, b->names, b->cfg.n_chats, b->acked, &err);
	if (rc == 0) {
		uint64_t min = UINT64_MAX;

		for (size_t i = 0; i < b->cfg.n_chats; i++)
			if (b->acked[i] < min)
				min = b->acked[i];
		b->have_state = 1;
		b->processed = min;
		b->resume_from = min + 1;
		kpl_info(LOG, "state file: resuming from global seq %llu",
			 (unsigned long long)b->resume_from);
	} else if (rc == KPL_ENOTFOUND) {
		b->have_state = b->cfg.start_beginning;
		b->resume_from = b->cfg.start_beginning ? 1 : 0;
		kpl_info(LOG, "no state file: starting from %s",
			 b->cfg.start_beginning ? "the beginning" : "new events");
	} else {
		kpl_error(LOG, "%s", err.msg);
		return 1;
	}

	if (uv_loop_init(&loop))
		BUG("uv_loop_init");
	b->loop = &loop;
	/* Before the follower thread: curl_global_init is not thread-safe. */
	if (http_client_new(&loop, &ho, &b->http, &err)) {
		kpl_error(LOG, "%s", err.msg);
		return 1;
	}
	co.tls_ca_file = b->cfg.ca;
	co.tls_cert_file = b->cfg.cert;
	co.tls_key_file = b->cfg.key;
	co.token = b->cfg.token;
	if ((rc = kplc_connect_opts(b->cfg.server, &co, &b->c, &err))) {
		kpl_error(LOG, "%s: %s", config, err.msg);
		/* An unreadable ca, cert or key file is the config's fault. */
		return rc == KPL_EIO || rc == KPL_EINVAL ? 2 : 1;
	}
	kpl_info(LOG, "kpld at %s (%s%s)", b->cfg.server,
		 !b->cfg.ca ? "plaintext" : b->cfg.cert ? "TLS, client certificate" : "TLS",
		 b->cfg.token ? ", with a token" : "");
	b->rings = log_rings_new(b->cfg.log_lines);
	b->chats = kpl_calloc(b->cfg.n_chats, sizeof *b->chats);
	for (size_t i = 0; i < b->cfg.n_chats; i++) {
		struct chat *ch = &b->chats[i];

		ch->bot = b;
		ch->cfg = &b->cfg.chats[i];
		ch->idx = i;
		uv_timer_init(&loop, &ch->retry_timer);
		ch->retry_timer.data = ch;
		kpl_info(LOG, "chat %s: %s, %zu pipeline filter%s", ch->cfg->name,
			 chat_kind_name(ch->cfg->kind), ch->cfg->n_pipelines,
			 ch->cfg->n_pipelines == 1 ? "" : "s");
	}
	pthread_mutex_init(&b->mu, NULL);
	uv_async_init(&loop, &b->async, on_async);
	b->async.data = b;
	uv_timer_init(&loop, &b->flush_timer);
	b->flush_timer.data = b;
	uv_timer_init(&loop, &b->grace_timer);
	b->grace_timer.data = b;
	uv_signal_init(&loop, &b->sigint);
	uv_signal_init(&loop, &b->sigterm);
	b->sigint.data = b->sigterm.data = b;
	uv_signal_start(&b->sigint, on_signal, SIGINT);
	uv_signal_start(&b->sigterm, on_signal, SIGTERM);
	if (pthread_create(&b->thread, NULL, follower_main, b))
		BUG("pthread_create");

	uv_run(&loop, UV_RUN_DEFAULT);
	rc = uv_loop_close(&loop);
	if (rc)
		kpl_error(LOG, "loop not clean at exit: %s", uv_strerror(rc));

	kplc_free(b->c);
	log_rings_free(b->rings);
	while (b->kinds) {
		struct run_kinds *k = b->kinds;

		b->kinds = k->next;
		run_kinds_free(k);
	}
	for (size_t i = 0; i < b->cfg.n_chats; i++)
		while (b->chats[i].head) {
			struct msg *m = b->chats[i].head;

			b->chats[i].head = m->next;
			msg_free(m);
		}
	free(b->chats);
	free(b->names);
	free(b->acked);
	pthread_mutex_destroy(&b->mu);
	chatbot_config_release(&b->cfg);
	kpl_info(LOG, "stopped");
	return rc ? 1 : 0;
}
