/*
 * notice.h - from a run event to a chat message and back: which notice an
 * event makes, the webhook body for each chat kind (WeCom, DingTalk, Slack),
 * DingTalk's signature, and how a webhook's reply is judged. No I/O and no
 * global state (style.md practice 2): kpl-chatbot (clients/chatbot/main.c)
 * and kpld's pipeline-level `notify:` (engine/notify.c) both send what this
 * renders, so a chat gets the same message from either.
 *
 * Threads: any thread may call any function on objects it owns.
 *
 * Secrets: a chat's url and secret are credentials. Nothing here logs, and
 * no text built here (a verdict's reason) contains either.
 */
#ifndef KPL_CLIENTS_CHATBOT_NOTICE_H
#define KPL_CLIENTS_CHATBOT_NOTICE_H

#include <stddef.h>
#include <stdint.h>

#include "api/kpl.pb-c.h"
#include "base/kpl.h"

/* --- Chat kinds and notice kinds, listed once --- */

#define CHAT_KIND_MAP(X)                                                      \
	X(WECOM, "wecom")                                                     \
	X(DINGTALK, "dingtalk")                                               \
	X(SLACK, "slack")

enum chat_kind {
#define CHAT_KIND_ENUM(id, name) CHAT_##id,
	CHAT_KIND_MAP(CHAT_KIND_ENUM)
#undef CHAT_KIND_ENUM
	CHAT_KIND_LAST
};

#define NOTICE_KIND_MAP(X)                                                    \
	X(STARTED, "started")                                                 \
	X(STAGE_FAILED, "stage_failed")                                       \
	X(WAITING, "waiting")                                                 \
	X(SUCCEEDED, "succeeded")                                             \
	X(FAILED, "failed")                                                   \
	X(CANCELLED, "cancelled")                                             \
	X(ROLLED_BACK, "rolled_back")

enum notice_kind {
#define NOTICE_KIND_ENUM(id, name) NOTICE_##id,
	NOTICE_KIND_MAP(NOTICE_KIND_ENUM)
#undef NOTICE_KIND_ENUM
	NOTICE_LAST /* also "no notice" */
};

/* Static names ("wecom", "stage_failed"); "?" outside the range. */
const char *chat_kind_name(enum chat_kind k);
const char *notice_kind_name(enum notice_kind k);

/* The kind named name ("slack"), or CHAT_KIND_LAST / NOTICE_LAST. */
enum chat_kind chat_kind_parse(const char *name);
enum notice_kind notice_kind_parse(const char *name);

/* --- Notices --- */

struct notice {
	enum notice_kind kind;
	uint64_t global_seq;
	char *run_id;
	char *pipeline;
	char *stage;   /* stage notices; NULL otherwise */
	char *message; /* the event's message (server-redacted); may be NULL */
	char **log;    /* stage_failed: the last log lines, oldest first */
	size_t n_log;
};

/*
 * The notice an event makes, NOTICE_LAST for none. is_rollback says whether
 * ev's stage counts as a rollback (its kind is `rollback`, or its name is in
 * the config's rollback_stages); it matters only for a stage that
 * SUCCEEDED.
 */
enum notice_kind notice_classify(const Kpl__V1__RunEvent *ev, int is_rollback);

/* Fills n from ev (strings copied; the log lines are the caller's to add).
 * notice_release frees what n holds. */
void notice_init_from(struct notice *n, enum notice_kind kind, const Kpl__V1__RunEvent *ev);
void notice_release(struct notice *n);

/* The one-line title ("shop run r-1: stage build failed"). Malloc'd. */
char *notice_title(const struct notice *n);

/*
 * The webhook body for a chat kind, JSON as the reference says
 * (/work/shared/reference/external-apis.md section 7): WeCom
 * {"msgtype":"markdown","markdown":{"content":..}} (at most 4096 bytes),
 * DingTalk {"msgtype":"markdown","markdown":{"title":..,"text":..}}, Slack
 * {"text":title,"blocks":[{"type":"section","text":{"type":"mrkdwn",..}}]}
 * (at most 3000 characters). Malloc'd, NUL-terminated.
 */
char *notice_render(enum chat_kind kind, const struct notice *n);

/*
 * notice_render, and for Slack with buttons set, an `actions` block whose
 * buttons run chat commands on kpld (engine/chatops.h, docs/chatbot.md):
 * Approve / Reject on `waiting` (action_id kpl_approve / kpl_reject, value
 * "RUN STAGE"), Cancel on `started` (kpl_cancel, "RUN"), Retry on `failed`
 * and `cancelled` (kpl_retry, "RUN"). Other kinds and chats: no buttons.
 */
char *notice_render_buttons(enum chat_kind kind, const struct notice *n, int buttons);

/* Cuts s in place to at most max bytes, at a UTF-8 character boundary. */
void utf8_truncate(char *s, size_t max);

/* --- Webhook protocol --- */

/* DingTalk's sign: urlencode(base64(HMAC-SHA256(secret, ts "\n" secret))).
 * Malloc'd. */
char *dingtalk_sign(const char *secret, int64_t ts_ms);
/* url with "timestamp=<ts>&sign=<sign>" appended ('?' or '&'). Malloc'd;
 * a credential like url. */
char *dingtalk_signed_url(const char *url, const char *secret, int64_t ts_ms);

enum chat_verdict {
	CHAT_DELIVERED,  /* the chat took the message */
	CHAT_RETRY,      /* try again after a backoff */
	CHAT_REJECTED,   /* the chat will never take it (bad payload, revoked
			    webhook): give up now */
};
/*
 * Judges a webhook reply: 2xx with (WeCom, DingTalk) {"errcode":0} or
 * (Slack) any body; 429, 5xx and a non-zero errcode are retried (rate limits
 * come as errcodes); other 4xx are rejected. why gets a short reason for the
 * log (status, errcode and errmsg; never the url).
 */
enum chat_verdict chat_judge_reply(enum chat_kind kind, long status, const char *body,
				   char *why, size_t why_len);

#endif
