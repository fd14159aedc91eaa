/*
 * chatbot.h - kpl-chatbot's logic without I/O: the config file, which
 * chats want which notice, the last log lines of stages and the state file.
 * The notices themselves (webhook bodies, DingTalk's signature, reply
 * verdicts) are clients/chatbot/notice.h, shared with kpld's own `notify:`. clients/chatbot/main.c is the thin glue (the WatchRuns
 * thread, the libuv loop, base/http.h); docs/chatbot.md is the user's
 * side.
 *
 * Threads: nothing here keeps global state; any thread may call any function
 * on objects it owns.
 *
 * Secrets: a chat's url and secret, and the kpld token, are credentials. Nothing here logs, and
 * no error message built here contains either (they name the chat).
 */
#ifndef KPL_CLIENTS_CHATBOT_H
#define KPL_CLIENTS_CHATBOT_H

#include <stddef.h>
#include <stdint.h>

#include "api/kpl.pb-c.h"
#include "clients/chatbot/notice.h"
#include "base/kpl.h"

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
	int buttons; /* slack: chatops buttons (notice_render_buttons) */
};

struct chatbot_config {
	char *server;     /* "127.0.0.1:7070" */
	/* Connection to kpld, as kplctl's --ca, --cert, --key and --token
	 * (docs/security.md); NULL if not set. cert and key come together
	 * and need ca. token is a credential: never log it. */
	char *ca;
	char *cert;
	char *key;
	char *token;
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
 * written as `url_env: VAR` / `secret_env: VAR` / `token_env: VAR` are read
 * from the environment here. On success fills *out (caller releases it with
 * chatbot_config_release); on error returns KPL_EINVAL with err saying
 * "file:line:col: path: what" (never a url or secret value).
 */
int chatbot_config_parse(const char *text, size_t len, const char *file,
			 struct chatbot_config *out, struct kpl_err *err);
void chatbot_config_release(struct chatbot_config *c);

/* 1 if chat wants notices of kind k for pipeline. */
int chat_wants(const struct chat_config *chat, enum notice_kind k, const char *pipeline);

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
