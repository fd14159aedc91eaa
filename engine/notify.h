/*
 * notify.h - pipeline-level notifications, sent by kpld itself.
 *
 * A pipeline's `notify:` (pipelines/pipeline.h) names notifiers of the
 * daemon config (`notifiers:`, engine/config.h: a chat webhook's kind, url
 * and DingTalk secret) and the events each wants: started, stage_failed,
 * waiting, succeeded, failed, cancelled. The messages are the ones
 * kpl-chatbot sends (clients/chatbot/notice.h renders both), so a chat gets
 * the same text from either.
 *
 * Delivery (docs in README.md, "Notifications"):
 *   - durable: the engine hands every event to notify_event right after
 *     staging it; a notification it wants is staged into the store's notify
 *     outbox in the same group as the event, so it exists exactly when the
 *     event is durable, and is deleted once the chat took it (or it was
 *     given up). A restart sends what the outbox holds. That is
 *     at-least-once: a message the chat took just before a crash, whose
 *     delete had not committed, is sent again;
 *   - on the loop, through the engine's HTTP client; never blocking a run,
 *     and never failing one: a notification that cannot be delivered is
 *     logged and dropped;
 *   - in order per notifier (one request at a time each); a reply the chat
 *     service calls temporary (5xx, 429, a non-zero errcode, no connection)
 *     is retried after NOTIFY_BACKOFF_MS, doubling up to
 *     NOTIFY_MAX_BACKOFF_MS, NOTIFY_MAX_TRIES tries in all; a rejection
 *     (other 4xx) is given up at once;
 *   - no log line holds a webhook url or secret (Slack's secret is in the
 *     url's path, which http_redact_url cannot mask): lines name the
 *     notifier, the run and the notice.
 *
 * Threads: loop thread only, all of it.
 */
#ifndef KPL_NOTIFY_H
#define KPL_NOTIFY_H

#include <uv.h>

#include "api/kpl.pb-c.h"
#include "engine/config.h"
#include "base/kpl.h"
#include "engine/secrets.h"
#include "pipelines/pipeline.h"
#include "base/http.h"
#include "store/store.h"

#define NOTIFY_MAX_TRIES 6
#define NOTIFY_BACKOFF_MS 1000
#define NOTIFY_MAX_BACKOFF_MS 60000
#define NOTIFY_TIMEOUT_MS 15000
/* The last log lines a stage_failed message quotes (like kpl-chatbot's
 * default), found among the NOTIFY_LOG_SCAN events before the failure. */
#define NOTIFY_LOG_LINES 10
#define NOTIFY_LOG_SCAN 5000

struct notify; /* opaque */

struct notify_options {
	uv_loop_t *loop;
	struct store *store;      /* borrowed; outlives notify */
	struct http_client *http; /* borrowed; closed only after notify_close completes */
	const struct cfg *cfg;    /* borrowed: the notifiers */
	struct secrets *secrets;  /* borrowed: ${{ secrets.X }} in url and secret */
};

/*
 * Creates the sender and queues every notification left in the outbox by
 * an earlier kpld (sending starts on a later loop iteration). *out is the
 * caller's until notify_close completes. Returns 0, or a negative KPL_E*
 * code if the outbox cannot be read (err says why).
 */
int notify_new(const struct notify_options *opt, struct notify **out, struct kpl_err *err);

/*
 * Checks a submitted pipeline's notify entries against the daemon config:
 * KPL_EINVAL naming the entry ("pipeline:3:5: notify[0].notifier: no
 * notifier named ...") if one is not declared; 0 otherwise.
 */
int notify_check(const struct cfg *cfg, const struct pipeline *pl, struct kpl_err *err);

/*
 * Hands an event of a run of pl to the sender. Call it right after the
 * event is staged (store_stage_event) and before the commit that makes it
 * durable: every notification pl wants for it is staged in the same group,
 * and sent once that group has committed. ev is borrowed for the call.
 * While notify is closing, the outbox record is still staged (the next kpld
 * sends it) but nothing is sent.
 */
void notify_event(struct notify *n, const struct pipeline *pl, const Kpl__V1__RunEvent *ev);

/*
 * Stops sending: requests in flight are cancelled (their notifications stay
 * in the outbox for the next kpld), timers are closed; once the last
 * callback and outbox commit of notify has run, done(data) runs on the loop
 * (possibly before notify_close returns) and notify is freed.
 */
void notify_close(struct notify *n, void (*done)(void *data), void *data);

#endif
