/*
 * checkout.c - the `checkout` stage kind: a git repository at a ref, in the
 * run's workspace.
 *
 *   with: { repo: URL or path (required),
 *           ref: branch, tag or full commit sha (default: the remote's HEAD),
 *           depth: commits of history (default 1; 0 for all of it),
 *           submodules: true|false (default false),
 *           path: directory in the workspace (default "src"),
 *           token: ${{ secrets.X }} for https (optional),
 *           username: for https with token (default "x-access-token") }
 *
 * git runs as argv, never through a shell, one command at a time through
 * stages/proc (each logged, each surviving a kpld restart exactly once):
 *   init, point origin at repo, fetch ref (shallow, --depth), checkout it
 *   detached, submodules if asked, rev-parse HEAD.
 * A sha that the server refuses to fetch directly (protocol v0 without
 * uploadpack.allowReachableSHA1InWant) is found by a full fetch instead.
 *
 * Credentials never reach a URL, an argv or a log: a URL with userinfo is
 * refused; the token reaches git through GIT_ASKPASS, a small script in the
 * attempt's directory that prints $KPL_GIT_USERNAME or $KPL_GIT_TOKEN from
 * git's environment. Messages built from git's output go through
 * stage_redact.
 *
 * Outputs: sha, short_sha (12 hex digits), ref (as asked; "HEAD" if none).
 */
#define _GNU_SOURCE /* memrchr */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "stages/kinds.h"
#include "stages/proc.h"

#define LOG "checkout"

enum co_step {
	CO_INIT,
	CO_REMOTE,
	CO_FETCH,
	CO_FETCH_ALL,   /* only after a refused fetch of a sha */
	CO_CHECKOUT,
	CO_SUBMODULES,  /* only with submodules: true */
	CO_REVPARSE,
	CO_STEP_LAST
};

static const char *const step_names[CO_STEP_LAST] = {
	"init", "remote", "fetch", "fetch-all", "checkout", "submodules", "rev-parse",
};

/* One attempt. */
struct checkout {
	struct stage *st;
	struct proc_steps steps;
	char *repo, *ref, *path, *token, *username;
	long depth;
	bool submodules;
	bool is_sha;
	char **env;
};

/* ---------------------------------------------------------------------- */
/* with: */

static int with_err(struct kpl_err *err, const char *file, const struct pl_node *n,
		    const char *path, const char *key, const char *msg)
{
	return kpl_errf(err, KPL_EINVAL, "%s:%d:%d: %s%s%s: %s", file, n->pos.line,
			n->pos.col, path, key ? "." : "", key ? key : "", msg);
}

static bool has_template(const char *s)
{
	return strstr(s, "${{") != NULL;
}

/*
 * NULL if url may reach git and its logs, else why not. The same rules as
 * a registered repository's (engine/hooks.c hooks_repo_url_problem): no
 * remote helper (transport::address; ext:: runs any command), no user@ in
 * any scheme but ssh (https://TOKEN@host/...), no user:password@ at all.
 */
static const char *url_problem(const char *url)
{
	static const char scheme_chars[] = "abcdefghijklmnopqrstuvwxyz"
					   "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+.-";
	const char *p = strstr(url, "://"), *end, *at;
	size_t n = strspn(url, scheme_chars);
	bool ssh;

	if (n && strncmp(url + n, "::", 2) == 0)
		return "must not name a remote helper (ext::, fd::, ...): give a URL or a path";
	if (!p || (size_t)(p - url) != n || n == 0)
		return NULL; /* a path, or scp-like user@host:path (ssh keys) */
	p += 3;
	end = p + strcspn(p, "/?#");
	at = memrchr(p, '@', (size_t)(end - p));
	if (!at)
		return NULL;
	ssh = (n == 3 && strncasecmp(url, "ssh", 3) == 0) ||
	      (n == 7 && (strncasecmp(url, "git+ssh", 7) == 0 ||
			  strncasecmp(url, "ssh+git", 7) == 0));
	/* ssh://git@host/... names a user and no secret; other schemes never
	 * may (https://TOKEN@host/... is a token in every log line). */
	if (!ssh || memchr(p, ':', (size_t)(at - p)))
		return "must not hold credentials (user@ or user:password@): give a secret as "
		       "`token: ${{ secrets.NAME }}` instead";
	return NULL;
}

/* NULL if path stays inside the workspace. */
static const char *path_problem(const char *path)
{
	const char *p = path;

	if (!*path)
		return "must not be empty";
	if (path[0] == '/')
		return "must be relative to the workspace";
	while (*p) {
		size_t n = strcspn(p, "/");
		if (n == 2 && p[0] == '.' && p[1] == '.')
			return "must stay inside the workspace (no ..)";
		p += n;
		while (*p == '/')
			p++;
	}
	return NULL;
}

static bool is_full_sha(const char *s)
{
	size_t n = strlen(s);

	if (n != 40 && n != 64)
		return false;
	for (size_t i = 0; i < n; i++)
		if (!isxdigit((unsigned char)s[i]) || isupper((unsigned char)s[i]))
			return false;
	return true;
}

static int checkout_check_with(const struct pl_node *with, const char *file,
			       const char *path, struct kpl_err *err)
{
	static const char *const keys[] = { "repo", "ref", "depth", "submodules",
					    "path", "token", "username" };
	const struct pl_node *n;
	const char *why;

	if (!with)
		return kpl_errf(err, KPL_EINVAL, "%s: %s: a checkout stage needs `with` "
				"with `repo`", file, path);
	if (with->type != PL_MAP)
		return with_err(err, file, with, path, NULL, "must be a mapping");
	for (size_t i = 0; i < with->n; i++) {
		const char *k = with->keys[i]->scalar;
		size_t j;
		for (j = 0; j < KPL_ARRAY_SIZE(keys); j++)
			if (strcmp(k, keys[j]) == 0)
				break;
		if (j == KPL_ARRAY_SIZE(keys))
			return with_err(err, file, with->keys[i], path, k, "unknown key "
					"(allowed: repo, ref, depth, submodules, path, token, "
					"username)");
		if (with->items[i]->type != PL_SCALAR)
			return with_err(err, file, with->items[i], path, k, "must be a string");
	}
	n = pl_map_get(with, "repo");
	if (!n)
		return with_err(err, file, with, path, NULL, "needs `repo` (a git URL or path)");
	if (!n->scalar[0])
		return with_err(err, file, n, path, "repo", "must not be empty");
	if ((why = url_problem(n->scalar)))
		return with_err(err, file, n, path, "repo", why);
	if ((n = pl_map_get(with, "ref")) && (!n->scalar[0] || n->scalar[0] == '-'))
		return with_err(err, file, n, path, "ref",
				"must be a branch, tag or commit sha");
	if ((n = pl_map_get(with, "depth")) && !has_template(n->scalar)) {
		char *end;
		long d = strtol(n->scalar, &end, 10);
		if (!n->scalar[0] || *end || d < 0)
			return with_err(err, file, n, path, "depth",
					"must be a whole number of commits (0: all history)");
	}
	if ((n = pl_map_get(with, "submodules")) && !has_template(n->scalar) &&
	    strcmp(n->scalar, "true") && strcmp(n->scalar, "false"))
		return with_err(err, file, n, path, "submodules", "must be true or false");
	if ((n = pl_map_get(with, "path")) && !has_template(n->scalar) &&
	    (why = path_problem(n->scalar)))
		return with_err(err, file, n, path, "path", why);
	return 0;
}

/* ---------------------------------------------------------------------- */
/* The attempt */

static void checkout_free(struct checkout *c)
{
	free(c->repo);
	free(c->ref);
	free(c->path);
	if (c->token) {
		memset(c->token, 0, strlen(c->token));
		free(c->token);
	}
	free(c->username);
	proc_strv_free(c->env);
	free(c);
}

static void checkout_free_steps(struct proc_steps *s)
{
	checkout_free(s->data);
}

static char *with_text(struct stage *st, const char *key, const char *def)
{
	char *v = stage_expand(st, stage_with_get(st, key));

	return v ? v : def ? kpl_strdup(def) : NULL;
}

/* The askpass helper: answers git's prompts from its own environment, so
 * the token is never written to disk. */
static int write_askpass(const char *path, struct kpl_err *err)
{
	static const char script[] =
		"#!/bin/sh\n"
		"# kpl checkout: git's GIT_ASKPASS; the secret is in git's environment.\n"
		"case \"$1\" in\n"
		"[Uu]sername*) printf '%s\\n' \"$KPL_GIT_USERNAME\" ;;\n"
		"*) printf '%s\\n' \"$KPL_GIT_TOKEN\" ;;\n"
		"esac\n";
	int fd = open(path, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0700);

	if (fd < 0 || write(fd, script, sizeof script - 1) != (ssize_t)(sizeof script - 1)) {
		int e = errno;
		if (fd >= 0)
			close(fd);
		return kpl_errf(err, KPL_EIO, "cannot write %s: %s", path, strerror(e));
	}
	close(fd);
	return 0;
}

static const struct proc_steps_ops checkout_steps;

/* Reads `with` (expanded) and makes the environment; also on resume. */
static struct proc_steps *checkout_new(struct stage *st, struct kpl_err *err)
{
	struct checkout *c = kpl_calloc(1, sizeof *c);
	char *depth, *sub, *attempt, *askpass, *end;
	const char *why;
	int rc;

	c->st = st;
	proc_steps_init(&c->steps, st, &checkout_steps, c);
	c->repo = with_text(st, "repo", NULL);
	c->ref = with_text(st, "ref", NULL);
	c->path = with_text(st, "path", "src");
	c->token = with_text(st, "token", NULL);
	c->username = with_text(st, "username", "x-access-token");
	depth = with_text(st, "depth", "1");
	sub = with_text(st, "submodules", "false");
	c->depth = strtol(depth, &end, 10);
	rc = 0;
	if (!depth[0] || *end || c->depth < 0)
		rc = kpl_errf(err, KPL_EINVAL, "with.depth: \"%.40s\" is not a whole number "
			      "of commits", depth);
	else if (strcmp(sub, "true") && strcmp(sub, "false"))
		rc = kpl_errf(err, KPL_EINVAL, "with.submodules: \"%.40s\" is not true or "
			      "false", sub);
	else if (!c->repo || !c->repo[0])
		rc = kpl_errf(err, KPL_EINVAL, "with.repo: empty");
	else if ((why = url_problem(c->repo)))
		rc = kpl_errf(err, KPL_EINVAL, "with.repo: %s", why);
	else if ((why = path_problem(c->path)))
		rc = kpl_errf(err, KPL_EINVAL, "with.path: %s", why);
	else if (c->ref && (!c->ref[0] || c->ref[0] == '-'))
		rc = kpl_errf(err, KPL_EINVAL, "with.ref: \"%.60s\" is not a branch, tag or "
			      "commit sha", c->ref);
	c->submodules = strcmp(sub, "true") == 0;
	free(depth);
	free(sub);
	if (rc) {
		checkout_free(c);
		return NULL;
	}
	c->is_sha = c->ref && is_full_sha(c->ref);
	c->env = proc_stage_env(st, NULL);
	/* Never wait on a terminal that is not there. */
	proc_env_set(&c->env, "GIT_TERMINAL_PROMPT", "0");
	if (c->token && c->token[0]) {
		attempt = proc_attempt_dir(st);
		askpass = kpl_asprintf("%s/askpass", attempt);
		if ((rc = proc_mkdir_p(attempt)) != 0)
			rc = kpl_errf(err, KPL_EIO, "cannot create %s: %s", attempt, strerror(-rc));
		else
			rc = write_askpass(askpass, err);
		proc_env_set(&c->env, "GIT_ASKPASS", askpass);
		proc_env_set(&c->env, "KPL_GIT_USERNAME", c->username);
		proc_env_set(&c->env, "KPL_GIT_TOKEN", c->token);
		free(askpass);
		free(attempt);
		if (rc) {
			checkout_free(c);
			return NULL;
		}
	}
	return &c->steps;
}

static int run_step(struct proc_steps *s, unsigned step, struct kpl_err *err)
{
	struct checkout *c = s->data;
	char *argv[16], depth[32];
	const char *git = "git";
	size_t n = 0;

	argv[n++] = (char *)git;
	/* Whatever the user's or system's git config says: no ext:: transport
	 * (it runs commands), and local repositories (file://, paths) only
	 * when asked for directly in `repo`, never by a submodule of a fetched
	 * repository (git marks those not from the user). */
	argv[n++] = (char *)"-c";
	argv[n++] = (char *)"protocol.ext.allow=never";
	argv[n++] = (char *)"-c";
	argv[n++] = (char *)"protocol.file.allow=user";
	if (step != CO_INIT) {
		argv[n++] = (char *)"-C";
		argv[n++] = c->path;
	}
	snprintf(depth, sizeof depth, "--depth=%ld", c->depth);
	switch (step) {
	case CO_INIT:
		argv[n++] = (char *)"init";
		argv[n++] = (char *)"-q";
		argv[n++] = (char *)"--";
		argv[n++] = c->path;
		break;
	case CO_REMOTE:
		argv[n++] = (char *)"config";
		argv[n++] = (char *)"remote.origin.url";
		argv[n++] = c->repo;
		break;
	case CO_FETCH:
		argv[n++] = (char *)"fetch";
		argv[n++] = (char *)"--no-tags";
		if (c->depth > 0)
			argv[n++] = depth;
		argv[n++] = (char *)"origin";
		argv[n++] = c->ref ? c->ref : (char *)"HEAD";
		break;
	case CO_FETCH_ALL:
		argv[n++] = (char *)"fetch";
		argv[n++] = (char *)"--tags";
		argv[n++] = (char *)"origin";
		argv[n++] = (char *)"+refs/heads/*:refs/remotes/origin/*";
		break;
	case CO_CHECKOUT:
		argv[n++] = (char *)"checkout";
		argv[n++] = (char *)"-q";
		argv[n++] = (char *)"--force";
		argv[n++] = (char *)"--detach";
		argv[n++] = c->is_sha ? c->ref : (char *)"FETCH_HEAD";
		break;
	case CO_SUBMODULES:
		argv[n++] = (char *)"submodule";
		argv[n++] = (char *)"update";
		argv[n++] = (char *)"--init";
		argv[n++] = (char *)"--recursive";
		argv[n++] = (char *)"--force";
		if (c->depth > 0)
			argv[n++] = depth;
		break;
	case CO_REVPARSE:
		argv[n++] = (char *)"rev-parse";
		argv[n++] = (char *)"HEAD";
		break;
	default:
		BUG("checkout step %u", step);
	}
	argv[n] = NULL;
	return proc_steps_run(s, step, argv, c->env, stage_workspace(c->st), err);
}

static void publish(struct checkout *c, const char *sha)
{
	char short_sha[13];

	snprintf(short_sha, sizeof short_sha, "%s", sha);
	stage_set_output(c->st, "sha", sha);
	stage_set_output(c->st, "short_sha", short_sha);
	stage_set_output(c->st, "ref", c->ref ? c->ref : "HEAD");
}

/* Step s->step ended; returns the next one or PROC_STEPS_END. */
static int checkout_exit(struct proc_steps *s, struct proc *p, const struct proc_exit *e)
{
	struct checkout *c = s->data;
	bool ok = e->how == PROC_EXITED && e->code == 0;

	if (!ok && s->step == CO_FETCH && c->is_sha && e->how == PROC_EXITED) {
		stage_logf(c->st, "the server would not send commit %s by itself: "
			   "fetching every branch and tag instead", c->ref);
		return CO_FETCH_ALL;
	}
	if (!ok) {
		/* git's last complaint, redacted. */
		proc_steps_fail(s, p, e, "git");
		return PROC_STEPS_END;
	}
	if (s->step == CO_REVPARSE) {
		char *sha = proc_last_line(p, KPL__V1__LOG_STREAM__LOG_STREAM_STDOUT);
		if (!sha || !is_full_sha(sha)) {
			proc_steps_finish(s, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED,
					  "git rev-parse HEAD printed no commit sha");
		} else {
			publish(c, sha);
			stage_logf(c->st, "checked out %s at %s", c->ref ? c->ref : "HEAD", sha);
			proc_steps_finish(s, KPL__V1__STAGE_STATE__STAGE_STATE_SUCCEEDED, NULL);
		}
		free(sha);
		return PROC_STEPS_END;
	}
	if (s->step == CO_FETCH || s->step == CO_FETCH_ALL)
		return CO_CHECKOUT;
	if (s->step == CO_CHECKOUT)
		return c->submodules ? CO_SUBMODULES : CO_REVPARSE;
	return (int)s->step + 1;
}

static const struct proc_steps_ops checkout_steps = {
	.names = step_names,
	.n_names = CO_STEP_LAST,
	.first = CO_INIT,
	.attempt_new = checkout_new,
	.start = run_step,
	.exit = checkout_exit,
	.free = checkout_free_steps,
};

static int checkout_start(struct stage *st, struct kpl_err *err)
{
	return proc_steps_start(st, &checkout_steps, err);
}

static int checkout_resume(struct stage *st, struct kpl_err *err)
{
	return proc_steps_resume(st, &checkout_steps, err);
}

static const char *const checkout_argv_keys[] = { "repo", "ref", "path", NULL };

/* Every key `with` may hold (the parser checks them, docs_test reads them). */
static const char *const checkout_with_keys[] = {
	"repo", "ref", "depth", "submodules", "path", "token", "username", NULL
};

const struct stage_kind checkout_kind = {
	.name = "checkout",
	.with_keys = checkout_with_keys,
	.argv_keys = checkout_argv_keys, /* git's argv; the token goes by env */
	.check_with = checkout_check_with,
	.start = checkout_start,
	.cancel = proc_steps_cancel,
	.resume = checkout_resume,
	.abandon = proc_steps_abandon,
};
