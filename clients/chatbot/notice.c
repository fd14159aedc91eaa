/*
 * notice.c - from a RunEvent to the bytes a chat webhook takes, and back
 * from its reply to a verdict (notice.h); no I/O (style.md practice 2), so
 * chatbot_test.c checks every rule with fixtures.
 */
#include <jansson.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clients/chatbot/notice.h"

/* Limits of the chat services (external-apis.md section 7). */
#define WECOM_MAX_CONTENT 4096
#define SLACK_MAX_SECTION 3000
#define DINGTALK_MAX_TEXT 4096
/* One log line in a message: longer ones are cut with "...". */
#define MAX_LINE_IN_MESSAGE 300

static const char *const chat_kind_names[] = {
#define CHAT_KIND_NAME(id, name) name,
	CHAT_KIND_MAP(CHAT_KIND_NAME)
#undef CHAT_KIND_NAME
};

static const char *const notice_kind_names[] = {
#define NOTICE_KIND_NAME(id, name) name,
	NOTICE_KIND_MAP(NOTICE_KIND_NAME)
#undef NOTICE_KIND_NAME
};

const char *chat_kind_name(enum chat_kind k)
{
	return (unsigned)k < CHAT_KIND_LAST ? chat_kind_names[k] : "?";
}

const char *notice_kind_name(enum notice_kind k)
{
	return (unsigned)k < NOTICE_LAST ? notice_kind_names[k] : "?";
}

enum chat_kind chat_kind_parse(const char *name)
{
	int k;

	for (k = 0; k < CHAT_KIND_LAST; k++)
		if (strcmp(name, chat_kind_names[k]) == 0)
			break;
	return (enum chat_kind)k;
}

enum notice_kind notice_kind_parse(const char *name)
{
	int k;

	for (k = 0; k < NOTICE_LAST; k++)
		if (strcmp(name, notice_kind_names[k]) == 0)
			break;
	return (enum notice_kind)k;
}

enum notice_kind notice_classify(const Kpl__V1__RunEvent *ev, int is_rollback)
{
	switch (ev->kind) {
	case KPL__V1__EVENT_KIND__EVENT_KIND_RUN_STATE:
		switch (ev->run_state) {
		case KPL__V1__RUN_STATE__RUN_STATE_RUNNING: return NOTICE_STARTED;
		case KPL__V1__RUN_STATE__RUN_STATE_SUCCEEDED: return NOTICE_SUCCEEDED;
		case KPL__V1__RUN_STATE__RUN_STATE_FAILED: return NOTICE_FAILED;
		case KPL__V1__RUN_STATE__RUN_STATE_CANCELLED: return NOTICE_CANCELLED;
		default: return NOTICE_LAST;
		}
	case KPL__V1__EVENT_KIND__EVENT_KIND_STAGE_STATE:
		switch (ev->stage_state) {
		case KPL__V1__STAGE_STATE__STAGE_STATE_FAILED: return NOTICE_STAGE_FAILED;
		case KPL__V1__STAGE_STATE__STAGE_STATE_WAITING: return NOTICE_WAITING;
		case KPL__V1__STAGE_STATE__STAGE_STATE_SUCCEEDED:
			return is_rollback ? NOTICE_ROLLED_BACK : NOTICE_LAST;
		default: return NOTICE_LAST;
		}
	default:
		return NOTICE_LAST;
	}
}

static char *dup_or_null(const char *s)
{
	return s && *s ? kpl_strdup(s) : NULL;
}

void notice_init_from(struct notice *n, enum notice_kind kind, const Kpl__V1__RunEvent *ev)
{
	memset(n, 0, sizeof *n);
	n->kind = kind;
	n->global_seq = ev->global_seq;
	n->run_id = kpl_strdup(ev->run_id ? ev->run_id : "");
	n->pipeline = kpl_strdup(ev->pipeline_name ? ev->pipeline_name : "");
	if (ev->kind == KPL__V1__EVENT_KIND__EVENT_KIND_STAGE_STATE)
		n->stage = dup_or_null(ev->stage);
	n->message = dup_or_null(ev->message);
}

void notice_release(struct notice *n)
{
	free(n->run_id);
	free(n->pipeline);
	free(n->stage);
	free(n->message);
	for (size_t i = 0; i < n->n_log; i++)
		free(n->log[i]);
	free(n->log);
	memset(n, 0, sizeof *n);
}

char *notice_title(const struct notice *n)
{
	const char *p = n->pipeline, *r = n->run_id, *s = n->stage ? n->stage : "?";

	switch (n->kind) {
	case NOTICE_STARTED: return kpl_asprintf("%s run %s started", p, r);
	case NOTICE_STAGE_FAILED: return kpl_asprintf("%s run %s: stage %s failed", p, r, s);
	case NOTICE_WAITING:
		return kpl_asprintf("%s run %s: stage %s is waiting for approval", p, r, s);
	case NOTICE_SUCCEEDED: return kpl_asprintf("%s run %s succeeded", p, r);
	case NOTICE_FAILED: return kpl_asprintf("%s run %s failed", p, r);
	case NOTICE_CANCELLED: return kpl_asprintf("%s run %s was cancelled", p, r);
	case NOTICE_ROLLED_BACK:
		return kpl_asprintf("%s run %s rolled back (stage %s succeeded)", p, r, s);
	default: BUG("notice kind %d", n->kind);
	}
}

/* The event's message is worth showing for these kinds only (the others
 * carry "all stages succeeded" or "cancelled", which the title says). */
static int shows_message(const struct notice *n)
{
	return n->message && (n->kind == NOTICE_STAGE_FAILED || n->kind == NOTICE_WAITING ||
			      n->kind == NOTICE_FAILED);
}

void utf8_truncate(char *s, size_t max)
{
	size_t len = strlen(s);

	if (len <= max)
		return;
	/* Back up over continuation bytes (10xxxxxx) to a character start. */
	while (max > 0 && ((unsigned char)s[max] & 0xC0) == 0x80)
		max--;
	s[max] = '\0';
}

/* A log line fit for a message: one line, at most MAX_LINE_IN_MESSAGE
 * bytes. Malloc'd. */
static char *clip_line(const char *line)
{
	char *c = kpl_strdup(line);

	for (char *p = c; *p; p++)
		if (*p == '\r' || *p == '\n' || *p == '\t')
			*p = ' ';
	if (strlen(c) > MAX_LINE_IN_MESSAGE) {
		utf8_truncate(c, MAX_LINE_IN_MESSAGE - 3);
		c = kpl_realloc(c, strlen(c) + 4);
		strcat(c, "...");
	}
	return c;
}

/* Slack mrkdwn: &, < and > are control characters. */
static void sb_slack(struct kpl_buf *b, const char *s)
{
	for (; *s; s++)
		switch (*s) {
		case '&': kpl_buf_str(b, "&amp;"); break;
		case '<': kpl_buf_str(b, "&lt;"); break;
		case '>': kpl_buf_str(b, "&gt;"); break;
		default: kpl_buf_add(b, s, 1);
		}
}

/* The log lines that fit in budget bytes once rendered, newest kept: the
 * first line to show. Each rendered line costs its length plus per_line. */
static size_t first_fitting_line(char **lines, size_t n, size_t budget, size_t per_line)
{
	size_t used = 0, i = n;

	while (i > 0 && used + strlen(lines[i - 1]) + per_line <= budget) {
		used += strlen(lines[i - 1]) + per_line;
		i--;
	}
	return i;
}

static const char *wecom_color(enum notice_kind k)
{
	switch (k) {
	case NOTICE_SUCCEEDED: return "info";
	case NOTICE_STARTED:
	case NOTICE_WAITING:
	case NOTICE_CANCELLED: return "comment";
	default: return "warning";
	}
}

/* The markdown text for WeCom (color) or DingTalk (heading); both quote the
 * log lines with "> ". */
static char *render_markdown(enum chat_kind kind, const struct notice *n, char **lines,
			     size_t max)
{
	struct kpl_buf b = { 0 };
	char *title = notice_title(n), *head;
	size_t first;

	if (kind == CHAT_WECOM)
		head = kpl_asprintf("<font color=\"%s\">**%s**</font>", wecom_color(n->kind),
				    title);
	else
		head = kpl_asprintf("#### %s", title);
	kpl_buf_str(&b, head);
	if (shows_message(n)) {
		char *m = clip_line(n->message);

		kpl_buf_str(&b, "\n\n");
		kpl_buf_str(&b, m);
		free(m);
	}
	utf8_truncate(b.s, max);
	b.len = strlen(b.s);
	if (n->n_log) {
		static const char intro[] = "\n\nlast log lines:";

		first = b.len + sizeof intro - 1 < max
				? first_fitting_line(lines, n->n_log,
						     max - b.len - (sizeof intro - 1), 3)
				: n->n_log;
		if (first < n->n_log) {
			kpl_buf_str(&b, intro);
			for (size_t i = first; i < n->n_log; i++) {
				kpl_buf_str(&b, "\n> ");
				kpl_buf_str(&b, lines[i]);
			}
		}
	}
	free(head);
	free(title);
	return b.s;
}

static char *render_slack(const struct notice *n, char **lines)
{
	struct kpl_buf b = { 0 };
	char *title = notice_title(n);
	size_t first;

	kpl_buf_str(&b, "*");
	sb_slack(&b, title);
	kpl_buf_str(&b, "*");
	if (shows_message(n)) {
		char *m = clip_line(n->message);

		kpl_buf_str(&b, "\n");
		sb_slack(&b, m);
		free(m);
	}
	/* Characters, not bytes, are Slack's limit; bytes are at least as
	 * many, so a byte bound is safe. Escaping may grow a line 5 times. */
	utf8_truncate(b.s, SLACK_MAX_SECTION);
	b.len = strlen(b.s);
	if (n->n_log && b.len + 8 < SLACK_MAX_SECTION) {
		struct kpl_buf logs = { 0 };

		first = first_fitting_line(lines, n->n_log, (SLACK_MAX_SECTION - b.len - 8) / 5,
					   1);
		for (size_t i = first; i < n->n_log; i++) {
			kpl_buf_str(&logs, "\n");
			sb_slack(&logs, lines[i]);
		}
		if (logs.s) {
			kpl_buf_str(&b, "\n```");
			kpl_buf_str(&b, logs.s);
			kpl_buf_str(&b, "\n```");
		}
		free(logs.s);
	}
	free(title);
	return b.s;
}

static json_t *pack(enum chat_kind kind, const char *title, const char *text)
{
	switch (kind) {
	case CHAT_WECOM:
		return json_pack("{s:s, s:{s:s}}", "msgtype", "markdown", "markdown", "content",
				 text);
	case CHAT_DINGTALK:
		return json_pack("{s:s, s:{s:s, s:s}}", "msgtype", "markdown", "markdown",
				 "title", title, "text", text);
	case CHAT_SLACK:
		return json_pack("{s:s, s:[{s:s, s:{s:s, s:s}}]}", "text", title, "blocks",
				 "type", "section", "text", "type", "mrkdwn", "text", text);
	default:
		BUG("chat kind %d", kind);
	}
}

static void ascii_only(char *s)
{
	for (; *s; s++)
		if ((unsigned char)*s >= 0x80)
			*s = '?';
}

/* A Block Kit button (external-apis-2.md section 6.4); confirm NULL: none. */
static json_t *button(const char *action, const char *label, const char *style,
		      const char *value, const char *confirm)
{
	json_t *b = json_pack("{s:s, s:s, s:s, s:{s:s, s:s}}", "type", "button", "action_id",
			      action, "value", value, "text", "type", "plain_text", "text", label);

	if (b && style)
		json_object_set_new(b, "style", json_string(style));
	if (b && confirm)
		json_object_set_new(b, "confirm",
				    json_pack("{s:{s:s, s:s}, s:{s:s, s:s}, s:{s:s, s:s}, "
					      "s:{s:s, s:s}}",
					      "title", "type", "plain_text", "text", "Are you sure?",
					      "text", "type", "plain_text", "text", confirm,
					      "confirm", "type", "plain_text", "text", label,
					      "deny", "type", "plain_text", "text", "Back"));
	return b;
}

/* The chatops buttons a notice gets, or NULL. */
static json_t *actions_block(const struct notice *n)
{
	json_t *els = json_array();
	char value[300], confirm[300];

	switch (n->kind) {
	case NOTICE_WAITING:
		if (!n->stage)
			break;
		snprintf(value, sizeof value, "%s %s", n->run_id, n->stage);
		snprintf(confirm, sizeof confirm, "Approve stage %s of run %s?", n->stage,
			 n->run_id);
		json_array_append_new(els, button("kpl_approve", "Approve", "primary", value,
						  confirm));
		json_array_append_new(els, button("kpl_reject", "Reject", "danger", value, NULL));
		break;
	case NOTICE_STARTED:
		snprintf(confirm, sizeof confirm, "Cancel run %s?", n->run_id);
		json_array_append_new(els, button("kpl_cancel", "Cancel", "danger", n->run_id,
						  confirm));
		break;
	case NOTICE_FAILED:
	case NOTICE_CANCELLED:
		json_array_append_new(els, button("kpl_retry", "Retry", NULL, n->run_id, NULL));
		break;
	default:
		break;
	}
	if (json_array_size(els) == 0) {
		json_decref(els);
		return NULL;
	}
	return json_pack("{s:s, s:s, s:o}", "type", "actions", "block_id", "kpl", "elements",
			 els);
}

char *notice_render(enum chat_kind kind, const struct notice *n)
{
	return notice_render_buttons(kind, n, 0);
}

char *notice_render_buttons(enum chat_kind kind, const struct notice *n, int buttons)
{
	char **lines = kpl_calloc(n->n_log + 1, sizeof *lines);
	char *text, *title = notice_title(n), *out;
	json_t *root;

	for (size_t i = 0; i < n->n_log; i++)
		lines[i] = clip_line(n->log[i]);
	if (kind == CHAT_SLACK)
		text = render_slack(n, lines);
	else
		text = render_markdown(kind, n, lines,
				       kind == CHAT_WECOM ? WECOM_MAX_CONTENT : DINGTALK_MAX_TEXT);
	/* json_pack fails only on invalid UTF-8 (a line the server cut in the
	 * middle of a character, say): then send it without the non-ASCII. */
	root = pack(kind, title, text);
	if (!root) {
		ascii_only(text);
		ascii_only(title);
		root = pack(kind, title, text);
		if (!root)
			BUG("cannot encode a notice as JSON");
	}
	if (kind == CHAT_SLACK && buttons) {
		json_t *a = actions_block(n);
		if (a)
			json_array_append_new(json_object_get(root, "blocks"), a);
	}
	out = json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER);
	if (!out)
		BUG("json_dumps failed");
	json_decref(root);
	for (size_t i = 0; i < n->n_log; i++)
		free(lines[i]);
	free(lines);
	free(text);
	free(title);
	return out;
}

/* --- DingTalk's signature --- */

char *dingtalk_sign(const char *secret, int64_t ts_ms)
{
	unsigned char mac[EVP_MAX_MD_SIZE], b64[4 * ((EVP_MAX_MD_SIZE + 2) / 3) + 1];
	unsigned int mac_len = 0;
	char *msg = kpl_asprintf("%lld\n%s", (long long)ts_ms, secret);
	struct kpl_buf out = { 0 };
	int n;

	if (!HMAC(EVP_sha256(), secret, (int)strlen(secret), (const unsigned char *)msg,
		  strlen(msg), mac, &mac_len))
		BUG("HMAC-SHA256 failed");
	free(msg);
	n = EVP_EncodeBlock(b64, mac, (int)mac_len);
	/* URL-encode the base64 text: '+', '/' and '=' are its only
	 * characters outside [A-Za-z0-9]. */
	for (int i = 0; i < n; i++) {
		char c = (char)b64[i];

		if (c == '+')
			kpl_buf_str(&out, "%2B");
		else if (c == '/')
			kpl_buf_str(&out, "%2F");
		else if (c == '=')
			kpl_buf_str(&out, "%3D");
		else
			kpl_buf_add(&out, &c, 1);
	}
	return out.s;
}

char *dingtalk_signed_url(const char *url, const char *secret, int64_t ts_ms)
{
	char *sign = dingtalk_sign(secret, ts_ms);
	char *u = kpl_asprintf("%s%stimestamp=%lld&sign=%s", url, strchr(url, '?') ? "&" : "?",
			       (long long)ts_ms, sign);

	free(sign);
	return u;
}

/* --- Replies --- */

enum chat_verdict chat_judge_reply(enum chat_kind kind, long status, const char *body,
				   char *why, size_t why_len)
{
	json_t *root, *code, *msg;
	long long errcode;

	if (status < 200 || status > 299) {
		char snippet[81];

		snprintf(snippet, sizeof snippet, "%s", body ? body : "");
		for (char *p = snippet; *p; p++)
			if ((unsigned char)*p < 0x20)
				*p = ' ';
		snprintf(why, why_len, "HTTP %ld%s%s", status, *snippet ? ": " : "", snippet);
		if (status == 429 || status >= 500 || status == 408)
			return CHAT_RETRY;
		return CHAT_REJECTED;
	}
	if (kind == CHAT_SLACK) {
		snprintf(why, why_len, "HTTP %ld", status);
		return CHAT_DELIVERED;
	}
	root = json_loads(body ? body : "", 0, NULL);
	code = root ? json_object_get(root, "errcode") : NULL;
	if (!json_is_integer(code)) {
		snprintf(why, why_len, "HTTP %ld with a reply that has no errcode", status);
		json_decref(root);
		return CHAT_RETRY;
	}
	errcode = json_integer_value(code);
	msg = json_object_get(root, "errmsg");
	snprintf(why, why_len, "HTTP %ld, errcode %lld%s%.100s", status, errcode,
		 json_is_string(msg) ? " " : "", json_is_string(msg) ? json_string_value(msg) : "");
	json_decref(root);
	return errcode == 0 ? CHAT_DELIVERED : CHAT_RETRY;
}
