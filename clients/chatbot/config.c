/*
 * config.c - kpl-chatbot's config file: a positioned tree from pl_doc_parse,
 * checked key by key, so every error names file:line:col and the key path.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clients/chatbot/chatbot.h"
#include "pipelines/pipeline.h"

#define ALL_EVENTS ((1u << NOTICE_LAST) - 1)

struct cfg_ctx {
	const char *file;
	struct kpl_err *err;
};

static int bad(struct cfg_ctx *cx, const struct pl_node *n, const char *path,
	       const char *what)
{
	return kpl_errf(cx->err, KPL_EINVAL, "%s:%d:%d: %s: %s", cx->file,
			n ? n->pos.line : 0, n ? n->pos.col : 0, path, what);
}

static int check_keys(struct cfg_ctx *cx, const struct pl_node *map, const char *path,
		      const char *const *known)
{
	for (size_t i = 0; i < map->n; i++) {
		size_t k;

		for (k = 0; known[k]; k++)
			if (strcmp(map->keys[i]->scalar, known[k]) == 0)
				break;
		if (!known[k]) {
			char what[256];

			snprintf(what, sizeof what, "unknown key \"%s\"", map->keys[i]->scalar);
			return bad(cx, map->keys[i], path, what);
		}
	}
	return 0;
}

static int get_string(struct cfg_ctx *cx, const struct pl_node *map, const char *key,
		      const char *path, char **out)
{
	const struct pl_node *v = pl_map_get(map, key);
	char p[256];

	if (!v)
		return 0;
	snprintf(p, sizeof p, "%s%s%s", path, *path ? "." : "", key);
	if (v->type != PL_SCALAR || !*v->scalar)
		return bad(cx, v, p, "must be a non-empty string");
	free(*out);
	*out = kpl_strdup(v->scalar);
	return 0;
}

/* `key: value` or `key_env: VAR` (the value from the environment); at most
 * one of them. The value itself never appears in a message. */
static int get_secretish(struct cfg_ctx *cx, const struct pl_node *map, const char *key,
			 const char *path, char **out)
{
	char env_key[64], p[256];
	const struct pl_node *env;
	const char *val;

	snprintf(env_key, sizeof env_key, "%s_env", key);
	env = pl_map_get(map, env_key);
	if (!env)
		return get_string(cx, map, key, path, out);
	snprintf(p, sizeof p, "%s%s%s", path, *path ? "." : "", env_key);
	if (pl_map_get(map, key))
		return bad(cx, env, p, "give the value or the variable, not both");
	if (env->type != PL_SCALAR || !*env->scalar)
		return bad(cx, env, p, "must name an environment variable");
	val = getenv(env->scalar);
	if (!val || !*val) {
		char what[256];

		snprintf(what, sizeof what, "environment variable %s is not set", env->scalar);
		return bad(cx, env, p, what);
	}
	*out = kpl_strdup(val);
	return 0;
}

static int get_duration(struct cfg_ctx *cx, const struct pl_node *map, const char *key,
			int64_t *out)
{
	const struct pl_node *v = pl_map_get(map, key);
	const char *why;

	if (!v)
		return 0;
	if (v->type != PL_SCALAR)
		return bad(cx, v, key, "must be a duration such as 500ms, 10s or 1m");
	if (pl_duration_parse(v->scalar, out, &why) || *out <= 0)
		return bad(cx, v, key, *out <= 0 ? "must be more than 0" : why);
	return 0;
}

static int get_int(struct cfg_ctx *cx, const struct pl_node *map, const char *key,
		   int lo, int hi, int *out)
{
	const struct pl_node *v = pl_map_get(map, key);
	char *end, what[128];
	long x;

	if (!v)
		return 0;
	snprintf(what, sizeof what, "must be a whole number from %d to %d", lo, hi);
	if (v->type != PL_SCALAR)
		return bad(cx, v, key, what);
	x = strtol(v->scalar, &end, 10);
	if (!*v->scalar || *end || x < lo || x > hi)
		return bad(cx, v, key, what);
	*out = (int)x;
	return 0;
}

static int get_string_list(struct cfg_ctx *cx, const struct pl_node *v, const char *path,
			   char ***out, size_t *n_out)
{
	if (v->type != PL_SEQ)
		return bad(cx, v, path, "must be a list of names");
	*out = kpl_calloc(v->n ? v->n : 1, sizeof **out);
	*n_out = 0;
	for (size_t i = 0; i < v->n; i++) {
		char p[256];

		snprintf(p, sizeof p, "%s[%zu]", path, i);
		if (v->items[i]->type != PL_SCALAR || !*v->items[i]->scalar)
			return bad(cx, v->items[i], p, "must be a non-empty string");
		(*out)[(*n_out)++] = kpl_strdup(v->items[i]->scalar);
	}
	return 0;
}

static int parse_chat(struct cfg_ctx *cx, const struct pl_node *m, size_t idx,
		      struct chat_config *chat)
{
	static const char *const known[] = { "name", "kind", "url", "url_env", "secret",
					     "secret_env", "pipelines", "events", "buttons", NULL };
	const struct pl_node *v;
	char path[64], p[128];
	int rc;

	snprintf(path, sizeof path, "chats[%zu]", idx);
	if (m->type != PL_MAP)
		return bad(cx, m, path, "must be a mapping");
	if ((rc = check_keys(cx, m, path, known)))
		return rc;
	if ((rc = get_string(cx, m, "name", path, &chat->name)))
		return rc;
	if (!chat->name)
		return bad(cx, m, path, "name is required");
	for (const char *s = chat->name; *s; s++)
		if (!(*s >= 'a' && *s <= 'z') && !(*s >= 'A' && *s <= 'Z') &&
		    !(*s >= '0' && *s <= '9') && *s != '-' && *s != '_' && *s != '.')
			return bad(cx, pl_map_get(m, "name"), path,
				   "name: letters, digits, '-', '_' and '.' only");
	v = pl_map_get(m, "kind");
	snprintf(p, sizeof p, "%s.kind", path);
	if (!v)
		return bad(cx, m, path, "kind is required (wecom, dingtalk or slack)");
	chat->kind = v->type == PL_SCALAR ? chat_kind_parse(v->scalar) : CHAT_KIND_LAST;
	if (chat->kind == CHAT_KIND_LAST)
		return bad(cx, v, p, "unknown kind (known: wecom, dingtalk, slack)");
	if ((rc = get_secretish(cx, m, "url", path, &chat->url)))
		return rc;
	if (!chat->url)
		return bad(cx, m, path, "url or url_env is required");
	if (strncmp(chat->url, "http://", 7) != 0 && strncmp(chat->url, "https://", 8) != 0)
		return bad(cx, pl_map_get(m, "url") ? pl_map_get(m, "url")
						    : pl_map_get(m, "url_env"),
			   path, "url must start with http:// or https://");
	if ((rc = get_secretish(cx, m, "secret", path, &chat->secret)))
		return rc;
	if (chat->secret && chat->kind != CHAT_DINGTALK)
		return bad(cx, m, path, "secret is for dingtalk chats only");
	if ((v = pl_map_get(m, "pipelines"))) {
		snprintf(p, sizeof p, "%s.pipelines", path);
		if ((rc = get_string_list(cx, v, p, &chat->pipelines, &chat->n_pipelines)))
			return rc;
	}
	if ((v = pl_map_get(m, "buttons"))) {
		snprintf(p, sizeof p, "%s.buttons", path);
		if (v->type != PL_SCALAR || (strcmp(v->scalar, "true") && strcmp(v->scalar, "false")))
			return bad(cx, v, p, "must be true or false");
		if (strcmp(v->scalar, "true") == 0 && chat->kind != CHAT_SLACK)
			return bad(cx, v, p, "buttons are for slack chats only");
		chat->buttons = strcmp(v->scalar, "true") == 0;
	}
	chat->events = ALL_EVENTS;
	if ((v = pl_map_get(m, "events"))) {
		snprintf(p, sizeof p, "%s.events", path);
		if (v->type != PL_SEQ)
			return bad(cx, v, p, "must be a list of event names");
		chat->events = 0;
		for (size_t i = 0; i < v->n; i++) {
			const struct pl_node *e = v->items[i];
			int k;

			k = e->type == PL_SCALAR ? (int)notice_kind_parse(e->scalar)
						 : NOTICE_LAST;
			if (k == NOTICE_LAST)
				return bad(cx, e, p,
					   "unknown event (known: started, stage_failed, "
					   "waiting, succeeded, failed, cancelled, rolled_back)");
			chat->events |= 1u << k;
		}
	}
	return 0;
}

int chatbot_config_parse(const char *text, size_t len, const char *file,
			 struct chatbot_config *out, struct kpl_err *err)
{
	static const char *const known[] = { "server", "ca", "cert", "key", "token",
					     "token_env", "state_file", "start", "rollback_stages",
					     "log_lines", "max_tries", "backoff", "max_backoff",
					     "timeout", "chats", NULL };
	struct cfg_ctx cx = { file, err };
	struct pl_node *root = NULL;
	const struct pl_node *v;
	int rc;

	memset(out, 0, sizeof *out);
	out->log_lines = CHATBOT_DEFAULT_LOG_LINES;
	out->max_tries = 8;
	out->backoff_ms = 1000;
	out->max_backoff_ms = 60000;
	out->timeout_ms = 10000;
	if ((rc = pl_doc_parse(text, len, file, &root, err)))
		goto fail;
	if (root->type != PL_MAP) {
		rc = bad(&cx, root, "(top)", "must be a mapping");
		goto fail;
	}
	if ((rc = check_keys(&cx, root, "(top)", known)) ||
	    (rc = get_string(&cx, root, "server", "", &out->server)) ||
	    (rc = get_string(&cx, root, "ca", "", &out->ca)) ||
	    (rc = get_string(&cx, root, "cert", "", &out->cert)) ||
	    (rc = get_string(&cx, root, "key", "", &out->key)) ||
	    (rc = get_secretish(&cx, root, "token", "", &out->token)) ||
	    (rc = get_string(&cx, root, "state_file", "", &out->state_file)) ||
	    (rc = get_int(&cx, root, "log_lines", 0, CHATBOT_MAX_LOG_LINES, &out->log_lines)) ||
	    (rc = get_int(&cx, root, "max_tries", 1, 1000, &out->max_tries)) ||
	    (rc = get_duration(&cx, root, "backoff", &out->backoff_ms)) ||
	    (rc = get_duration(&cx, root, "max_backoff", &out->max_backoff_ms)) ||
	    (rc = get_duration(&cx, root, "timeout", &out->timeout_ms)))
		goto fail;
	if (!out->server)
		out->server = kpl_strdup("127.0.0.1:7070");
	if (!out->cert != !out->key) {
		rc = bad(&cx, pl_map_get(root, out->cert ? "cert" : "key"),
			 out->cert ? "cert" : "key",
			 out->cert ? "needs key too (the client certificate's private key)"
				   : "needs cert too (the client certificate)");
		goto fail;
	}
	if (out->cert && !out->ca) {
		rc = bad(&cx, pl_map_get(root, "cert"), "cert",
			 "needs ca: a client certificate is sent over TLS only");
		goto fail;
	}
	if (!out->state_file) {
		rc = bad(&cx, root, "state_file", "is required");
		goto fail;
	}
	if ((v = pl_map_get(root, "start"))) {
		if (v->type == PL_SCALAR && strcmp(v->scalar, "beginning") == 0)
			out->start_beginning = 1;
		else if (!(v->type == PL_SCALAR && strcmp(v->scalar, "new") == 0)) {
			rc = bad(&cx, v, "start", "must be \"new\" or \"beginning\"");
			goto fail;
		}
	}
	if ((v = pl_map_get(root, "rollback_stages")) &&
	    (rc = get_string_list(&cx, v, "rollback_stages", &out->rollback_stages,
				  &out->n_rollback_stages)))
		goto fail;
	v = pl_map_get(root, "chats");
	if (!v || v->type != PL_SEQ || v->n == 0 || v->n > CHATBOT_MAX_CHATS) {
		rc = bad(&cx, v ? v : root, "chats", "must be a list of 1 to 64 chats");
		goto fail;
	}
	out->chats = kpl_calloc(v->n, sizeof *out->chats);
	for (size_t i = 0; i < v->n; i++) {
		out->n_chats = i + 1;
		if ((rc = parse_chat(&cx, v->items[i], i, &out->chats[i])))
			goto fail;
		for (size_t j = 0; j < i; j++)
			if (strcmp(out->chats[j].name, out->chats[i].name) == 0) {
				char p[64];

				snprintf(p, sizeof p, "chats[%zu].name", i);
				rc = bad(&cx, pl_map_get(v->items[i], "name"), p,
					 "the same name as an earlier chat");
				goto fail;
			}
	}
	pl_doc_free(root);
	return 0;
fail:
	pl_doc_free(root);
	chatbot_config_release(out);
	return rc;
}

static void free_list(char **l, size_t n)
{
	for (size_t i = 0; i < n; i++)
		free(l[i]);
	free(l);
}

void chatbot_config_release(struct chatbot_config *c)
{
	for (size_t i = 0; i < c->n_chats; i++) {
		struct chat_config *ch = &c->chats[i];

		free(ch->name);
		free(ch->url);
		free(ch->secret);
		free_list(ch->pipelines, ch->n_pipelines);
	}
	free(c->chats);
	free(c->server);
	free(c->ca);
	free(c->cert);
	free(c->key);
	if (c->token)
		memset(c->token, 0, strlen(c->token));
	free(c->token);
	free(c->state_file);
	free_list(c->rollback_stages, c->n_rollback_stages);
	memset(c, 0, sizeof *c);
}

int chat_wants(const struct chat_config *chat, enum notice_kind k, const char *pipeline)
{
	if ((unsigned)k >= NOTICE_LAST || !(chat->events & (1u << k)))
		return 0;
	if (chat->n_pipelines == 0)
		return 1;
	for (size_t i = 0; i < chat->n_pipelines; i++)
		if (pipeline && strcmp(chat->pipelines[i], pipeline) == 0)
			return 1;
	return 0;
}
