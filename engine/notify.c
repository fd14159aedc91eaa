/*
 * notify.c - pipeline-level notifications (notify.h): the outbox in the
 * store, one ordered queue per notifier, webhook requests on the engine's
 * HTTP client. What a message says and how a reply is judged is
 * clients/chatbot/notice.c, shared with kpl-chatbot.
 *
 * An item's life: notify_event stages its outbox record and puts it on the
 * pending list; a zero timer (so the engine's own commit of the event is
 * not split) commits the pending list as one batch; once durable the items
 * join their notifier's queue; the queue's head is sent, retried after a
 * backoff, and finally delivered or given up; then its outbox record is
 * deleted and the item freed when that delete is durable.
 */
#include "engine/notify.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "clients/chatbot/notice.h"
#include "pipelines/expr.h"
#include "pipelines/template.h"

#define LOG "notify"

struct queue;

struct item {
	struct queue *q;       /* set once durable */
	char *notifier;        /* owned */
	uint64_t gseq;         /* outbox key: the event's global seq ... */
	uint32_t index;        /* ... and the pipeline's notify entry */
	struct notice nc;      /* what to say; nc.log filled before the first try */
	uint32_t attempt;      /* the stage attempt, for its log lines */
	uint64_t seq;          /* the event's seq in its run */
	bool log_read;
	char *what;            /* "waiting of run X (global seq N)", for logs */
	struct item *next;
};

struct queue {
	struct notify *n;
	char *name;                 /* the notifier */
	struct item *head, *tail;   /* durable items in event order */
	struct http_request *req;   /* the head's request in flight */
	uv_timer_t *timer;          /* backoff before the head's next try */
	int tries;                  /* tries of the head so far */
	struct queue *next;
};

/* Items whose outbox records one commit makes durable. */
struct batch {
	struct notify *n;
	struct item *items;
};

struct notify {
	uv_loop_t *loop;
	struct store *store;
	struct http_client *http;
	const struct cfg *cfg;
	struct secrets *secrets;
	struct queue *queues;
	struct item *pending, **pending_tail; /* staged, no commit asked yet */
	uv_timer_t flush;
	/* Callbacks still to come (requests, commits, handle closes): notify
	 * is freed only when none is left after notify_close. */
	size_t busy;
	bool closing;
	void (*done)(void *data);
	void *done_data;
	/* The notice kind of each pipeline notify event. */
	enum notice_kind by_event[PL_NOTIFY_LAST];
};

static void pump(struct queue *q);

/* ---------------------------------------------------------------------- */
/* Items and queues */

static struct item *item_new(const Kpl__V1__RunEvent *ev, enum notice_kind kind,
			     const char *notifier, uint32_t index)
{
	struct item *it = kpl_calloc(1, sizeof *it);

	it->notifier = kpl_strdup(notifier);
	it->gseq = ev->global_seq;
	it->index = index;
	notice_init_from(&it->nc, kind, ev);
	it->attempt = ev->attempt;
	it->seq = ev->seq;
	it->what = kpl_asprintf("%s of run %s (global seq %llu)", notice_kind_name(kind),
				ev->run_id ? ev->run_id : "", (unsigned long long)ev->global_seq);
	return it;
}

static void item_free(struct item *it)
{
	notice_release(&it->nc);
	free(it->notifier);
	free(it->what);
	free(it);
}

static struct queue *queue_get(struct notify *n, const char *name)
{
	struct queue *q;

	for (q = n->queues; q; q = q->next)
		if (strcmp(q->name, name) == 0)
			return q;
	q = kpl_calloc(1, sizeof *q);
	q->n = n;
	q->name = kpl_strdup(name);
	q->next = n->queues;
	n->queues = q;
	return q;
}

/* Appends a durable item to its notifier's queue. */
static void queue_push(struct notify *n, struct item *it)
{
	struct queue *q = queue_get(n, it->notifier);

	it->q = q;
	it->next = NULL;
	if (q->tail)
		q->tail->next = it;
	else
		q->head = it;
	q->tail = it;
}

/* Frees everything once nothing can call back any more. */
static void maybe_done(struct notify *n)
{
	void (*done)(void *);
	void *data;

	if (!n->closing || n->busy)
		return;
	while (n->queues) {
		struct queue *q = n->queues;

		n->queues = q->next;
		while (q->head) {
			struct item *it = q->head;

			q->head = it->next;
			item_free(it);
		}
		free(q->name);
		free(q);
	}
	done = n->done;
	data = n->done_data;
	free(n);
	if (done)
		done(data);
}

/* ---------------------------------------------------------------------- */
/* The outbox */

static void batch_durable(void *data, int status)
{
	struct batch *b = data;
	struct notify *n = b->n;
	struct item *it, *next;

	n->busy--;
	for (it = b->items; it; it = next) {
		next = it->next;
		if (n->closing || status) {
			/* status: the engine stops kpld on a failed commit. */
			item_free(it);
			continue;
		}
		queue_push(n, it);
		pump(it->q);
	}
	free(b);
	maybe_done(n);
}

static void flush_fired(uv_timer_t *t)
{
	struct notify *n = t->data;
	struct batch *b;

	if (!n->pending || n->closing)
		return;
	b = kpl_calloc(1, sizeof *b);
	b->n = n;
	b->items = n->pending;
	n->pending = NULL;
	n->pending_tail = &n->pending;
	n->busy++;
	/* Covers every record staged so far: ours were staged before. */
	store_commit(n->store, batch_durable, b);
}

void notify_event(struct notify *n, const struct pipeline *pl, const Kpl__V1__RunEvent *ev)
{
	enum notice_kind kind = notice_classify(ev, 0);
	Kpl__Store__V1__NotifyRecord rec = KPL__STORE__V1__NOTIFY_RECORD__INIT;
	int e;

	if (kind == NOTICE_LAST)
		return;
	for (e = 0; e < PL_NOTIFY_LAST; e++)
		if (n->by_event[e] == kind)
			break;
	if (e == PL_NOTIFY_LAST)
		return;
	rec.event = (Kpl__V1__RunEvent *)ev;
	for (size_t i = 0; i < pl->n_notify; i++) {
		struct item *it;

		if (!(pl->notify[i].events & (1u << e)))
			continue;
		rec.notifier = pl->notify[i].notifier;
		store_stage_notify(n->store, ev->global_seq, (uint32_t)i, &rec);
		if (n->closing)
			continue; /* the next kpld sends it */
		it = item_new(ev, kind, pl->notify[i].notifier, (uint32_t)i);
		*n->pending_tail = it;
		n->pending_tail = &it->next;
		/* Not store_commit here: that would start a group holding the
		 * event without the records the engine stages right after it. */
		if (!uv_is_active((uv_handle_t *)&n->flush))
			uv_timer_start(&n->flush, flush_fired, 0, 0);
	}
}

static void deleted(void *data, int status)
{
	struct item *it = data;
	struct notify *n = it->q->n;

	(void)status; /* a failed commit stops kpld (engine.c) */
	n->busy--;
	item_free(it);
	maybe_done(n);
}

/* The head is done with (delivered or given up): out of the queue and the
 * outbox, and on to the next. */
static void pop(struct queue *q)
{
	struct notify *n = q->n;
	struct item *it = q->head;

	q->head = it->next;
	if (!q->head)
		q->tail = NULL;
	q->tries = 0;
	store_stage_notify(n->store, it->gseq, it->index, NULL);
	n->busy++;
	store_commit(n->store, deleted, it);
	pump(q);
}

/* ---------------------------------------------------------------------- */
/* Sending */

static int secret_lookup(void *data, const struct expr *ref, const char **value)
{
	struct secrets *sec = data;

	if (strcmp(ref->part[0], "secrets") == 0 && ref->n_part == 2 && sec &&
	    (*value = secrets_get(sec, ref->part[1])) != NULL)
		return 0;
	return KPL_ENOTFOUND;
}

/* A config value that may be ${{ secrets.X }}; err names what, never the
 * value. */
static int resolve(struct notify *n, const char *what, const char *text, char **out,
		   struct kpl_err *err)
{
	struct kpl_err e2 = { 0 };

	*out = NULL;
	if (!text)
		return 0;
	if (!tpl_has_template(text)) {
		*out = kpl_strdup(text);
		return 0;
	}
	if (tpl_expand_str(text, EXPR_ROOT_SECRETS, secret_lookup, n->secrets, out, &e2))
		return kpl_errf(err, KPL_EINVAL, "%s: %s (set it with: kplctl secret set NAME)",
				what, e2.msg);
	return 0;
}

static void wipe_free(char *s)
{
	if (s)
		memset(s, 0, strlen(s));
	free(s);
}

/* The last NOTIFY_LOG_LINES log lines of the failed stage attempt. */
struct log_scan {
	struct item *it;
	char *lines[NOTIFY_LOG_LINES];
	size_t start, n;
};

static int scan_event(void *data, const Kpl__V1__RunEvent *ev)
{
	struct log_scan *s = data;

	if (ev->seq >= s->it->seq)
		return 1;
	if (ev->kind != KPL__V1__EVENT_KIND__EVENT_KIND_LOG || ev->attempt != s->it->attempt ||
	    !ev->stage || !s->it->nc.stage || strcmp(ev->stage, s->it->nc.stage) != 0)
		return 0;
	if (s->n == NOTIFY_LOG_LINES) {
		free(s->lines[s->start]);
		s->lines[s->start] = kpl_strdup(ev->message ? ev->message : "");
		s->start = (s->start + 1) % NOTIFY_LOG_LINES;
	} else {
		s->lines[(s->start + s->n++) % NOTIFY_LOG_LINES] =
			kpl_strdup(ev->message ? ev->message : "");
	}
	return 0;
}

static void read_log(struct notify *n, struct item *it)
{
	struct log_scan s = { .it = it };
	uint64_t from = it->seq > NOTIFY_LOG_SCAN ? it->seq - NOTIFY_LOG_SCAN : 1;
	int rc;

	it->log_read = true;
	if (it->nc.kind != NOTICE_STAGE_FAILED || !it->nc.stage)
		return;
	rc = store_read_events(n->store, it->nc.run_id, from, 0, scan_event, &s);
	if (rc < 0)
		kpl_warn(LOG, "notifier %s: %s: cannot read the stage's log (%s); sent "
			 "without it", it->notifier, it->what, kpl_strerror(rc));
	it->nc.log = kpl_calloc(s.n + 1, sizeof *it->nc.log);
	for (size_t i = 0; i < s.n; i++)
		it->nc.log[i] = s.lines[(s.start + i) % NOTIFY_LOG_LINES];
	it->nc.n_log = s.n;
}

static void backoff_closed(uv_handle_t *h)
{
	struct notify *n = h->data;

	free(h);
	n->busy--;
	maybe_done(n);
}

static void backoff_fired(uv_timer_t *t)
{
	struct queue *q = t->data;

	t->data = q->n;
	q->n->busy++;
	uv_close((uv_handle_t *)t, backoff_closed);
	q->timer = NULL;
	pump(q);
}

/* A try of the head failed for a reason worth another: wait, or give up. */
static void retry_later(struct queue *q, const char *why, int64_t retry_after_ms)
{
	struct item *it = q->head;
	int64_t delay = NOTIFY_BACKOFF_MS;

	q->tries++;
	if (q->tries >= NOTIFY_MAX_TRIES) {
		kpl_error(LOG, "notifier %s: giving up on %s after %d tries: %s", q->name,
			  it->what, q->tries, why);
		pop(q);
		return;
	}
	for (int i = 1; i < q->tries && delay < NOTIFY_MAX_BACKOFF_MS; i++)
		delay *= 2;
	if (retry_after_ms > delay)
		delay = retry_after_ms;
	if (delay > NOTIFY_MAX_BACKOFF_MS)
		delay = NOTIFY_MAX_BACKOFF_MS;
	kpl_warn(LOG, "notifier %s: %s: try %d of %d failed: %s; again in %lld ms", q->name,
		 it->what, q->tries, NOTIFY_MAX_TRIES, why, (long long)delay);
	q->timer = kpl_malloc(sizeof *q->timer);
	uv_timer_init(q->n->loop, q->timer);
	q->timer->data = q;
	uv_timer_start(q->timer, backoff_fired, (uint64_t)delay, 0);
}

static void on_sent(struct http_response *resp, int status, void *data)
{
	struct queue *q = data;
	struct notify *n = q->n;
	const struct cfg_endpoint *ep;
	char why[256];
	int64_t retry_after = -1;

	n->busy--;
	q->req = NULL;
	if (n->closing) {
		/* Cancelled by notify_close: the outbox keeps it. */
		maybe_done(n);
		return;
	}
	ep = cfg_find(n->cfg, CFG_NOTIFIER, q->name);
	if (!ep)
		BUG("notifier %s left the config", q->name); /* pump found it; cfg is read-only */
	if (status) {
		/* resp->err.msg names the URL, which may hold the secret
		 * (Slack's path): only the code goes to the log. */
		snprintf(why, sizeof why, "%s after %d attempt%s", kpl_strerror(status),
			 resp->attempts, resp->attempts == 1 ? "" : "s");
		retry_later(q, why, -1);
		return;
	}
	switch (chat_judge_reply(ep->chat_kind, resp->status, resp->body, why, sizeof why)) {
	case CHAT_DELIVERED:
		kpl_info(LOG, "notifier %s: delivered %s", q->name, q->head->what);
		pop(q);
		return;
	case CHAT_REJECTED:
		kpl_error(LOG, "notifier %s: giving up on %s: the chat refused it: %s", q->name,
			  q->head->what, why);
		pop(q);
		return;
	case CHAT_RETRY:
		if (resp->status == 429) {
			const char *ra = http_response_header(resp, "Retry-After");
			retry_after = ra ? http_parse_retry_after(ra, kpl_now_ms()) : -1;
		}
		retry_later(q, why, retry_after);
		return;
	}
}

/* Sends the queue's head, if it may go now. */
static void pump(struct queue *q)
{
	struct notify *n = q->n;
	struct item *it = q->head;
	const struct cfg_endpoint *ep;
	struct http_request_options o = { 0 };
	struct http_header hdr;
	struct kpl_err err = { 0 };
	char *url = NULL, *secret = NULL, *signed_url = NULL, *body = NULL, what[200];
	char shown[200];

	if (n->closing || q->req || q->timer || !it)
		return;
	ep = cfg_find(n->cfg, CFG_NOTIFIER, q->name);
	if (!ep) {
		kpl_error(LOG, "notifier %s: giving up on %s: no notifier of that name in the "
			  "daemon config %s", q->name, it->what, n->cfg ? n->cfg->path : "(none)");
		pop(q);
		return;
	}
	snprintf(what, sizeof what, "config notifiers.%s", q->name);
	if (resolve(n, what, ep->url, &url, &err) || resolve(n, what, ep->secret, &secret, &err)) {
		retry_later(q, err.msg, -1);
		goto out;
	}
	if (!it->log_read)
		read_log(n, it);
	body = notice_render_buttons(ep->chat_kind, &it->nc, ep->buttons);
	if (ep->chat_kind == CHAT_DINGTALK && secret && *secret)
		signed_url = dingtalk_signed_url(url, secret, kpl_now_ms());
	hdr.name = "Content-Type";
	hdr.value = ep->chat_kind == CHAT_DINGTALK ? "application/json; charset=utf-8"
						   : "application/json";
	o.method = "POST";
	o.url = signed_url ? signed_url : url;
	/* Not even a redacted URL in kpld's debug log: Slack's secret is its
	 * path, DingTalk's signature its query. */
	snprintf(shown, sizeof shown, "(notifier %s)", q->name);
	o.log_url = shown;
	o.headers = &hdr;
	o.n_headers = 1;
	o.body = body;
	o.body_len = strlen(body);
	o.timeout_ms = NOTIFY_TIMEOUT_MS;
	/* The HTTP layer repeats a POST only when nothing was sent; the
	 * queue does the rest, in order. */
	o.idempotent = HTTP_IDEMPOTENT_NO;
	o.tls.ca_file = ep->ca_file;
	o.tls.insecure = ep->insecure;
	o.max_body = 64 * 1024;
	o.on_done = on_sent;
	o.data = q;
	if (http_request_start(n->http, &o, &q->req, &err)) {
		/* err.msg may name the URL: only the code. */
		kpl_error(LOG, "notifier %s: giving up on %s: cannot start the request (%s)",
			  q->name, it->what, kpl_err_name(err.code));
		q->req = NULL;
		pop(q);
		goto out;
	}
	n->busy++;
out:
	wipe_free(url);
	wipe_free(secret);
	wipe_free(signed_url);
	free(body);
}

/* ---------------------------------------------------------------------- */
/* Life */

int notify_check(const struct cfg *cfg, const struct pipeline *pl, struct kpl_err *err)
{
	char names[300];

	for (size_t i = 0; i < pl->n_notify; i++) {
		const struct pl_notify *pn = &pl->notify[i];

		if (!cfg_find(cfg, CFG_NOTIFIER, pn->notifier))
			return kpl_errf(err, KPL_EINVAL, "pipeline:%d:%d: notify[%zu].notifier: no "
					"notifier named \"%s\" in the daemon config %s (declared: %s)",
					pn->pos.line, pn->pos.col, i, pn->notifier,
					cfg ? cfg->path : "(none)",
					cfg_names(cfg, CFG_NOTIFIER, names, sizeof names));
	}
	return 0;
}

static int load_one(void *data, uint64_t gseq, uint32_t index,
		    const Kpl__Store__V1__NotifyRecord *rec)
{
	struct notify *n = data;
	enum notice_kind kind;
	struct item *it;

	kind = rec->event ? notice_classify(rec->event, 0) : NOTICE_LAST;
	if (kind == NOTICE_LAST || !rec->notifier || !*rec->notifier) {
		kpl_error(LOG, "outbox record %llu#%u is not a notification; dropped",
			  (unsigned long long)gseq, index);
		store_stage_notify(n->store, gseq, index, NULL);
		return 0;
	}
	it = item_new(rec->event, kind, rec->notifier, index);
	it->gseq = gseq;
	queue_push(n, it);
	return 0;
}

int notify_new(const struct notify_options *opt, struct notify **out, struct kpl_err *err)
{
	struct notify *n = kpl_calloc(1, sizeof *n);
	size_t queued = 0;
	int rc;

	n->loop = opt->loop;
	n->store = opt->store;
	n->http = opt->http;
	n->cfg = opt->cfg;
	n->secrets = opt->secrets;
	n->pending_tail = &n->pending;
	for (int e = 0; e < PL_NOTIFY_LAST; e++) {
		n->by_event[e] = notice_kind_parse(pl_notify_event_name(e));
		if (n->by_event[e] == NOTICE_LAST)
			BUG("pipeline notify event %s is no notice kind", pl_notify_event_name(e));
	}
	if ((rc = store_list_notify(n->store, load_one, n)) != 0) {
		n->closing = true;
		maybe_done(n); /* frees what was loaded */
		return kpl_errf(err, rc, "cannot read the notification outbox: %s",
				kpl_strerror(rc));
	}
	uv_timer_init(n->loop, &n->flush);
	n->flush.data = n;
	for (struct queue *q = n->queues; q; q = q->next) {
		for (struct item *it = q->head; it; it = it->next)
			queued++;
		pump(q);
	}
	if (queued)
		kpl_info(LOG, "%zu notification%s left unsent by the last kpld: sending", queued,
			 queued == 1 ? "" : "s");
	*out = n;
	return 0;
}

static void flush_closed(uv_handle_t *h)
{
	struct notify *n = h->data;

	n->busy--;
	maybe_done(n);
}

void notify_close(struct notify *n, void (*done)(void *data), void *data)
{
	if (n->closing)
		BUG("notify_close called twice");
	n->closing = true;
	n->done = done;
	n->done_data = data;
	/* Staged records are committed by whoever commits next (at worst the
	 * store's close): the next kpld sends them. */
	while (n->pending) {
		struct item *it = n->pending;

		n->pending = it->next;
		item_free(it);
	}
	n->pending_tail = &n->pending;
	for (struct queue *q = n->queues; q; q = q->next) {
		if (q->req)
			http_request_cancel(q->req); /* on_sent comes, with closing set */
		if (q->timer) {
			q->timer->data = n;
			n->busy++;
			uv_close((uv_handle_t *)q->timer, backoff_closed);
			q->timer = NULL;
		}
	}
	n->busy++;
	uv_close((uv_handle_t *)&n->flush, flush_closed);
}
