/*
 * chatbot.h - kpl-chatbot's logic without I/O: the config file, which
 * notices an event makes, the webhook bodies for each chat kind, DingTalk's
 * signature, how a webhook reply is judged, the last log lines of stages and
 * the state file. clients/chatbot/main.c is the thin glue (the WatchRuns
 * thread, the libuv loop, stages/http.h); docs/chatbot.md is the user's
 * side.
 *
 * Threads: nothing here keeps global state; any thread may call any function
 * on objects it owns.
 *
 * Secrets: a chat's url and secret are credentials. Nothing here logs, and
 * no error message built here contains either (they name the chat).
 */
#ifndef KPL_CLIENTS_CHATBOT_H
#define KPL_CLIENTS_CHATBOT_H

#include <stddef.h>
#include <stdint.h>

#include "api/kpl.pb-c.h"
#include "engine/kpl.h"

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

/* --- The config file (docs/chatbot.md) --- */

#define CHATBOT_DEFAULT_LOG_LINES 10
#define CHATBOT_MAX_LOG_LINES 50
#define CHATBOT_MAX_CHATS 64

struct chat_config {
	char *name;
	enum chat_kind kind;
	char *url;    /* a credential: never log it */
	char *secret; /* dingtalk signing secret, NULL if none; never log it */
	char **pipelines; /* none: every pipeline */
	size_t n_pipelines;
	unsigned events; /* bit (1u << notice_kind) per wanted kind */
};

struct chatbot_config {
	char *server;     /* "127.0.0.1:7070" */
	char *state_file;
	/* Without a state file: 1 follows from global seq 1 ("beginning"),
	 * 0 only new events ("new", the default). */
	int start_beginning;
	/* Stage names that count as a rollback, besides kind `rollback`. */
	char **rollback_stages;
	size_t n_rollback_stages;
	int log_lines;       /* last log lines in a stage_failed notice */
	int max_tries;       /* per message and chat, then given up */
	int64_t backoff_ms;  /* first wait between tries; doubles */
	int64_t max_backoff_ms;
	int64_t timeout_ms;  /* one webhook request */
	struct chat_config *chats;
	size_t n_chats;
};

/*
 * Parses a config file (YAML or JSON; file names it in messages). Values
 * written as `url_env: VAR` / `secret_env: VAR` are read from the
 * environment here. On success fills *out (caller releases it with
 * chatbot_config_release); on error returns KPL_EINVAL with err saying
 * "file:line:col: path: what" (never a url or secret value).
 */
int chatbot_config_parse(const char *text, size_t len, const char *file,
			 struct chatbot_config *out, struct kpl_err *err);
void chatbot_config_release(struct chatbot_config *c);

/* 1 if chat wants notices of kind k for pipeline. */
int chat_wants(const struct chat_config *chat, enum notice_kind k, const char *pipeline);

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

/* --- The last log lines per (run, stage) --- */

/*
 * Keeps the last cap log lines of every stage attempt seen, for the
 * stage_failed notice. A ring is "complete" when the stage's RUNNING event
 * of that attempt was seen, so every line since came through it; otherwise
 * (the bot started in the middle) the caller must fetch the lines itself.
 * Bounded: at most LOG_RINGS_MAX rings; the oldest goes first.
 */
#define LOG_RINGS_MAX 1024
struct log_rings;
struct log_rings *log_rings_new(int cap);
void log_rings_free(struct log_rings *r);
/* Feeds one event (stage RUNNING starts a complete ring; LOG adds a line;
 * a run's final RUN_STATE drops its rings). */
void log_rings_feed(struct log_rings *r, const Kpl__V1__RunEvent *ev);
/* The lines of (run, stage, attempt), oldest first, copied into n->log.
 * Returns 1 if the ring is complete, 0 if not (n->log holds what there is). */
int log_rings_take(struct log_rings *r, const char *run_id, const char *stage,
		   uint32_t attempt, struct notice *n);
/* Replaces (run, stage, attempt)'s ring with lines (complete). */
void log_rings_set(struct log_rings *r, const char *run_id, const char *stage,
		   uint32_t attempt, char *const *lines, size_t n_lines);

/* --- The state file --- */

/*
 * {"global_seq": N, "chats": {"name": N, ...}}: chats[name] is the last
 * global seq whose messages that chat has taken (or given up on), and every
 * earlier one too; global_seq is their minimum, where a restart resumes
 * (+1). Loads into acked[i] for names[i] (a chat missing from the file gets
 * the file's global_seq). Returns 0; KPL_ENOTFOUND if the file does not
 * exist; KPL_ECORRUPT or KPL_EIO with err set.
 */
int chatbot_state_load(const char *path, char *const *names, size_t n, uint64_t *acked,
		       struct kpl_err *err);
/* Writes it atomically: temp file, fsync, rename, fsync of the directory. */
int chatbot_state_save(const char *path, char *const *names, size_t n,
		       const uint64_t *acked, struct kpl_err *err);

#endif
