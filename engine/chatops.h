/*
 * chatops.h - commands from chat, on kpld's HTTP listener (--http-listen):
 * Slack slash commands and buttons, DingTalk's outgoing robot. Each command
 * runs through the same operation as its gRPC method (engine/ops.h) and is
 * audited with the chat user's name ("slack:U123 (alice)"). docs/chatbot.md
 * is the user's side.
 *
 *   POST /chatops/slack     slash command (form: command, text, user_id, ...)
 *                           or button (form: payload = block_actions JSON);
 *                           X-Slack-Signature v0=hex(HMAC-SHA256(signing
 *                           secret, "v0:" TS ":" raw body)),
 *                           X-Slack-Request-Timestamp within 5 minutes
 *   POST /chatops/dingtalk  outgoing robot JSON (text.content,
 *                           senderStaffId, senderNick); headers timestamp
 *                           (ms) within 1 hour and sign = base64(HMAC-
 *                           SHA256(app secret, TS "\n" app secret))
 *
 * A request is verified before anything in its body is read; a bad or stale
 * signature is 401 and a signature seen before within its window (a replay)
 * is 401 too. The replay memory is bounded (CHATOPS_REPLAY_SLOTS per
 * service): when every slot holds a live signature the request is refused
 * with 429 rather than forgetting one.
 *
 * Commands: approve RUN STAGE [comment], reject RUN STAGE [comment],
 * cancel RUN, retry RUN, rollback CLUSTER/NAMESPACE/DEPLOYMENT [REVISION],
 * status RUN, help. A button's action_id kpl_VERB and value ARGS read as the
 * command "VERB ARGS". The chat user must be mapped in the daemon config
 * (chatops.SERVICE.users.ID: identity, scope, pipelines); an unmapped user,
 * or one whose scope or pipelines do not allow the command, is told so and
 * nothing happens.
 *
 * Answers: Slack gets 200 at once (its 3 s limit) with an ephemeral or
 * in-channel message, and the outcome is POSTed to the request's
 * response_url (a button's replaces the clicked message, so its buttons go
 * away) — only when response_url starts with the configured
 * response_url_prefix (default https://hooks.slack.com/). DingTalk's
 * request is answered with a text message once the operation is durable.
 *
 * Secrets: the signing secret and app secret come from the config (a
 * ${{ secrets.NAME }} template or the value) and are never logged or echoed.
 *
 * Threads: loop thread only.
 */
#ifndef KPL_CHATOPS_H
#define KPL_CHATOPS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "engine/engine.h"
#include "engine/httpd.h"
#include "base/kpl.h"

#define CHATOPS_REPLAY_SLOTS 4096
#define CHATOPS_SLACK_WINDOW_S 300
#define CHATOPS_DINGTALK_WINDOW_MS 3600000

struct chatops; /* opaque */

/*
 * Reads the `chatops:` section of the daemon config file config_path (NULL:
 * none) and makes the endpoints. With no such section *out is still made,
 * with no routes. Errors name "FILE:LINE:COL: chatops.KEY: ...". *out ends
 * with chatops_stop. Before serving, give it the engine.
 */
int chatops_new(uv_loop_t *loop, const char *config_path, struct chatops **out,
		struct kpl_err *err);

/* The engine commands go to (borrowed; outlives the chatops). */
void chatops_set_engine(struct chatops *c, struct engine *eng);

/* The routes to serve (borrowed, valid until chatops_stop completes); n 0
 * when nothing is configured. */
const struct httpd_route *chatops_routes(struct chatops *c, size_t *n);

/*
 * Stops: response_url posts in flight are cancelled; operations waiting for
 * the engine finish first (call it before engine_stop). done(data) runs on
 * the loop once c is freed.
 */
void chatops_stop(struct chatops *c, void (*done)(void *data), void *data);

/* --- Protocol logic, no I/O (tests call these) --- */

enum chatops_verdict {
	CHATOPS_OK,
	CHATOPS_BAD_SIGNATURE, /* missing, malformed or wrong */
	CHATOPS_STALE,         /* timestamp outside the window */
};

/* Slack's v0 signature over the raw body; now_s is the unix time. */
enum chatops_verdict chatops_slack_verify(const char *secret, const char *timestamp,
					  const char *signature, const char *body,
					  size_t len, int64_t now_s);

/* DingTalk's outgoing robot signature; now_ms is unix milliseconds. */
enum chatops_verdict chatops_dingtalk_verify(const char *secret, const char *timestamp,
					     const char *sign, int64_t now_ms);

#define CHATOPS_VERB_MAP(X)          \
	X(HELP, "help")              \
	X(STATUS, "status")          \
	X(APPROVE, "approve")        \
	X(REJECT, "reject")          \
	X(CANCEL, "cancel")          \
	X(RETRY, "retry")            \
	X(ROLLBACK, "rollback")

enum chatops_verb {
#define CHATOPS_VERB_ENUM(id, name) CHATOPS_##id,
	CHATOPS_VERB_MAP(CHATOPS_VERB_ENUM)
#undef CHATOPS_VERB_ENUM
	CHATOPS_VERB_LAST
};

/* A parsed command. Strings point into buf. */
struct chatops_cmd {
	enum chatops_verb verb;
	const char *run;     /* status approve reject cancel retry */
	const char *stage;   /* approve reject */
	const char *comment; /* approve reject; NULL if none */
	const char *target;  /* rollback */
	const char *revision; /* rollback; NULL: the previous */
	char buf[2048];
};

/* Parses "VERB ARGS..." (blanks around and between words are ignored).
 * KPL_EINVAL with err saying the usage of that verb. */
int chatops_parse(const char *text, struct chatops_cmd *cmd, struct kpl_err *err);

#endif
