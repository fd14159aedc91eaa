/*
 * build_local.c - the `build` kind's `local` driver: a Dockerfile built on
 * the kpld host with buildah, into an OCI image layout in the workspace.
 *
 *   with: { driver: local,
 *           context: directory in the workspace (default: the workspace),
 *           dockerfile: path in the context (default "Dockerfile"),
 *           target: a stage of a multi-stage Dockerfile (optional),
 *           args: { NAME: value, ... }   (--build-arg, optional),
 *           output: directory in the workspace (default "image") }
 *
 * Commands, one after another through stages/proc (each logged, each
 * surviving a kpld restart exactly once; cancel stops buildah's process
 * group):
 *   buildah bud     (vfs storage, chroot isolation: no daemon, no fuse)
 *   rm -rf OUTPUT   (a layout is written whole, never merged into)
 *   buildah push NAME oci:OUTPUT
 *   buildah rmi NAME (the layout is what the run keeps)
 * buildah's storage is shared by runs under DATA_DIR/buildah (root and
 * runroot), so base images are pulled once.
 *
 * Outputs: image_dir (the layout's absolute path), digest (its manifest's,
 * from OUTPUT/index.json).
 *
 * With runs_on (a pod, stages/pod.c): one pod per attempt runs the same
 * buildah bud on the context in the run's workspace claim (runs_on.
 * workspace is required), then pushes to
 *   with: { registry: a `registries:` endpoint, repository: team/app,
 *           tags: [v1, latest] (default: the run id) }
 * itself (buildah login --password-stdin, the password in the attempt's
 * Secret); outputs image (host/repo@digest), digest, tags, as push's, by
 * the termination message. No layout: kpld cannot read the pod's files.
 */
#include <ctype.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pipelines/runs_on.h"
#include "stages/build.h"
#include "stages/pod.h"
#include "stages/podspec.h"
#include "stages/proc.h"

#define LOG "build"
#define BL_MAX_ARGS 64

enum bl_step { BL_BUD, BL_CLEAN, BL_PUSH, BL_RMI, BL_STEP_LAST };

static const char *const step_names[BL_STEP_LAST] = { "bud", "clean", "push", "rmi" };

/* One attempt. */
struct build_local {
	struct stage *st;
	struct proc_steps steps;
	char *context, *dockerfile, *target, *output, *name, *root, *runroot;
	char **build_args;      /* "NAME=value", NULL-terminated */
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

/* NULL if path stays inside the workspace (or the context). */
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

static int build_local_check_with(const struct pl_node *with, const char *file,
				  const char *path, struct kpl_err *err)
{
	static const char *const keys[] = { "driver", "context", "dockerfile", "target",
					    "args", "output", "registry", "repository", "tags" };
	const struct pl_node *n;
	const char *why;

	for (size_t i = 0; i < with->n; i++) {
		const char *k = with->keys[i]->scalar;
		const struct pl_node *v = with->items[i];
		size_t j;
		for (j = 0; j < KPL_ARRAY_SIZE(keys); j++)
			if (strcmp(k, keys[j]) == 0)
				break;
		if (j == KPL_ARRAY_SIZE(keys))
			return with_err(err, file, with->keys[i], path, k, "unknown key for "
					"driver local (allowed: driver, context, dockerfile, "
					"target, args, output, registry, repository, tags)");
		if (strcmp(k, "args") && strcmp(k, "tags") && v->type != PL_SCALAR)
			return with_err(err, file, v, path, k, "must be a string");
		if (!strcmp(k, "tags") && v->type == PL_MAP)
			return with_err(err, file, v, path, k, "must be a list of tags or one "
					"string \"v1, latest\"");
		for (size_t j2 = 0; !strcmp(k, "tags") && v->type == PL_SEQ && j2 < v->n; j2++)
			if (v->items[j2]->type != PL_SCALAR)
				return with_err(err, file, v->items[j2], path, k,
						"each tag must be a string");
		if (v->type == PL_SCALAR && !strcmp(k, "repository") && !v->scalar[0])
			return with_err(err, file, v, path, k, "must not be empty");
		if (v->type == PL_SCALAR && (!strcmp(k, "target") || !strcmp(k, "driver") ||
					     !strcmp(k, "registry") || !strcmp(k, "repository") ||
					     !strcmp(k, "tags")))
			continue;
		if (v->type == PL_SCALAR && !strstr(v->scalar, "${{") &&
		    (why = path_problem(v->scalar)))
			return with_err(err, file, v, path, k, why);
	}
	if ((n = pl_map_get(with, "target")) && (!n->scalar[0] || n->scalar[0] == '-'))
		return with_err(err, file, n, path, "target", "must name a stage of the "
				"Dockerfile");
	if ((n = pl_map_get(with, "args"))) {
		if (n->type != PL_MAP)
			return with_err(err, file, n, path, "args",
					"must be a mapping of build argument names to values");
		if (n->n > BL_MAX_ARGS)
			return with_err(err, file, n, path, "args", "too many build arguments");
		for (size_t i = 0; i < n->n; i++) {
			const char *k = n->keys[i]->scalar;
			char key[160];
			snprintf(key, sizeof key, "args.%s", k);
			if (!k[0] || strchr(k, '='))
				return with_err(err, file, n->keys[i], path, key,
						"not a build argument name");
			if (n->items[i]->type != PL_SCALAR)
				return with_err(err, file, n->items[i], path, key,
						"must be a string");
		}
	}
	return 0;
}

/* ---------------------------------------------------------------------- */
/* The attempt */

static void bl_free(struct build_local *b)
{
	free(b->context);
	free(b->dockerfile);
	free(b->target);
	free(b->output);
	free(b->name);
	free(b->root);
	free(b->runroot);
	proc_strv_free(b->build_args);
	proc_strv_free(b->env);
	free(b);
}

static void bl_free_steps(struct proc_steps *s)
{
	bl_free(s->data);
}

static char *with_text(struct stage *st, const char *key, const char *def)
{
	char *v = stage_expand(st, stage_with_get(st, key));

	return v ? v : def ? kpl_strdup(def) : NULL;
}

/* localhost/kpl-RUN-STAGE:ATTEMPT, in the characters image names allow. */
static char *image_name(struct stage *st)
{
	char *s = kpl_asprintf("localhost/kpl-%s-%s:%u", stage_run_id(st), stage_name(st),
			       stage_attempt(st));

	for (char *p = s + strlen("localhost/"); *p && *p != ':'; p++)
		*p = isalnum((unsigned char)*p) ? (char)tolower((unsigned char)*p) : '-';
	return s;
}

static const struct proc_steps_ops bl_steps;

/* Reads `with` (expanded); also on resume. The attempt's steps, or NULL. */
static struct proc_steps *bl_new(struct stage *st, struct kpl_err *err)
{
	struct build_local *b = kpl_calloc(1, sizeof *b);
	const struct pl_node *args = stage_with_get(st, "args");
	const char *ws = stage_workspace(st), *why = NULL, *key = NULL;
	char *context = with_text(st, "context", "."), *output = with_text(st, "output", "image");
	char *dockerfile = with_text(st, "dockerfile", "Dockerfile"), *data, *slash;
	size_t nargs = 0;

	b->st = st;
	proc_steps_init(&b->steps, st, &bl_steps, b);
	if ((why = path_problem(context)))
		key = "context";
	else if ((why = path_problem(output)))
		key = "output";
	else if ((why = path_problem(dockerfile)))
		key = "dockerfile";
	if (why) {
		kpl_errf(err, KPL_EINVAL, "with.%s: %s", key, why);
		free(context);
		free(output);
		free(dockerfile);
		bl_free(b);
		return NULL;
	}
	b->context = kpl_asprintf("%s/%s", ws, context);
	b->dockerfile = kpl_asprintf("%s/%s", b->context, dockerfile);
	b->output = kpl_asprintf("%s/%s", ws, output);
	free(context);
	free(output);
	free(dockerfile);
	b->target = with_text(st, "target", NULL);
	b->build_args = kpl_calloc((args ? args->n : 0) + 1, sizeof *b->build_args);
	for (size_t i = 0; args && i < args->n; i++) {
		char *v = stage_expand(st, args->items[i]);
		b->build_args[nargs++] = kpl_asprintf("%s=%s", args->keys[i]->scalar, v);
		free(v);
	}
	b->name = image_name(st);
	/* DATA_DIR/work/RUN is the workspace: storage goes to DATA_DIR/buildah. */
	data = kpl_strdup(ws);
	for (int i = 0; i < 2 && (slash = strrchr(data, '/')) && slash != data; i++)
		*slash = '\0';
	b->root = kpl_asprintf("%s/buildah/root", data);
	b->runroot = kpl_asprintf("%s/buildah/runroot", data);
	free(data);
	b->env = proc_stage_env(st, NULL);
	return &b->steps;
}

static int run_step(struct proc_steps *s, unsigned step, struct kpl_err *err)
{
	struct build_local *b = s->data;
	char *argv[32 + 2 * BL_MAX_ARGS];
	size_t n = 0;
	const char *cwd = stage_workspace(b->st);

	if (step == BL_CLEAN) {
		argv[n++] = (char *)"rm";
		argv[n++] = (char *)"-rf";
		argv[n++] = (char *)"--";
		argv[n++] = b->output;
	} else {
		argv[n++] = (char *)"buildah";
		argv[n++] = (char *)"--root";
		argv[n++] = b->root;
		argv[n++] = (char *)"--runroot";
		argv[n++] = b->runroot;
		argv[n++] = (char *)"--storage-driver";
		argv[n++] = (char *)"vfs";
	}
	switch (step) {
	case BL_BUD:
		argv[n++] = (char *)"bud";
		argv[n++] = (char *)"--isolation";
		argv[n++] = (char *)"chroot";
		if (b->target) {
			argv[n++] = (char *)"--target";
			argv[n++] = b->target;
		}
		for (size_t i = 0; b->build_args[i]; i++) {
			argv[n++] = (char *)"--build-arg";
			argv[n++] = b->build_args[i];
		}
		argv[n++] = (char *)"-f";
		argv[n++] = b->dockerfile;
		argv[n++] = (char *)"-t";
		argv[n++] = b->name;
		argv[n++] = b->context;
		cwd = b->context;
		break;
	case BL_CLEAN:
		break;
	case BL_PUSH: {
		/* buildah makes the layout's directory, not its parents. */
		char *parent = kpl_strdup(b->output);
		int rc;
		*strrchr(parent, '/') = '\0';
		rc = proc_mkdir_p(parent);
		if (rc) {
			kpl_errf(err, KPL_EIO, "cannot create %s: %s", parent, strerror(-rc));
			free(parent);
			return KPL_EIO;
		}
		free(parent);
	}
		argv[n++] = (char *)"push";
		argv[n++] = b->name;
		argv[n] = kpl_asprintf("oci:%s", b->output);
		n++;
		break;
	case BL_RMI:
		argv[n++] = (char *)"rmi";
		argv[n++] = b->name;
		break;
	default:
		BUG("build local step %u", step);
	}
	argv[n] = NULL;
	{
		int rc = proc_steps_run(s, step, argv, b->env, cwd, err);
		if (step == BL_PUSH)
			free(argv[n - 1]);
		return rc;
	}
}

/*
 * The manifest digest in OUTPUT/index.json ("sha256:..."), or NULL. buildah
 * writes one manifest per push and the layout was emptied first, so the
 * first "digest" of "manifests" is the image's.
 */
static char *layout_digest(const char *dir)
{
	char *path = kpl_asprintf("%s/index.json", dir), *text, *p, *q, *digest = NULL;
	int fd = kpl_open_ws(path, O_RDONLY | O_CLOEXEC);
	FILE *f = fd >= 0 ? fdopen(fd, "r") : NULL;
	size_t n;

	free(path);
	if (!f) {
		if (fd >= 0)
			close(fd);
		return NULL;
	}
	text = kpl_malloc(65537);
	n = fread(text, 1, 65536, f);
	fclose(f);
	text[n] = '\0';
	if ((p = strstr(text, "\"manifests\"")) && (p = strstr(p, "\"digest\"")) &&
	    (p = strchr(p + 8, ':')) && (p = strchr(p, '"')) && (q = strchr(p + 1, '"')) &&
	    strncmp(p + 1, "sha256:", 7) == 0 && q - p - 1 == 7 + 64) {
		digest = kpl_malloc((size_t)(q - p));
		memcpy(digest, p + 1, (size_t)(q - p - 1));
		digest[q - p - 1] = '\0';
	}
	free(text);
	return digest;
}

/* Step s->step ended; returns the next one or PROC_STEPS_END. */
static int bl_exit(struct proc_steps *s, struct proc *p, const struct proc_exit *e)
{
	struct build_local *b = s->data;
	bool ok = e->how == PROC_EXITED && e->code == 0;
	char *msg, *digest;

	if (!ok && s->step == BL_RMI) {
		/* The layout is built; a tag left in the shared storage is not
		 * worth failing the stage for. */
		stage_logf(b->st, "could not remove %s from buildah's storage; the image "
			   "layout is complete", b->name);
		ok = true;
	}
	if (!ok) {
		proc_steps_fail(s, p, e, s->step == BL_CLEAN ? "rm" : "buildah");
		return PROC_STEPS_END;
	}
	if (s->step == BL_PUSH || s->step == BL_RMI) {
		if (!(digest = layout_digest(b->output))) {
			msg = kpl_asprintf("buildah push wrote no manifest digest in "
					   "%s/index.json", b->output);
			proc_steps_finish(s, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, msg);
			free(msg);
			return PROC_STEPS_END;
		}
		if (s->step == BL_RMI) {
			stage_set_output(b->st, "image_dir", b->output);
			stage_set_output(b->st, "digest", digest);
			stage_logf(b->st, "image %s in %s", digest, b->output);
			free(digest);
			proc_steps_finish(s, KPL__V1__STAGE_STATE__STAGE_STATE_SUCCEEDED, NULL);
			return PROC_STEPS_END;
		}
		free(digest);
	}
	return (int)s->step + 1;
}

static const struct proc_steps_ops bl_steps = {
	.names = step_names,
	.n_names = BL_STEP_LAST,
	.first = BL_BUD,
	.attempt_new = bl_new,
	.start = run_step,
	.exit = bl_exit,
	.free = bl_free_steps,
	/* buildah mounts (its own namespaces, chroot isolation for RUN) and
	 * writes DATA_DIR/buildah (docs/security.md). */
	.profile = PROC_PROFILE_BUILDAH,
};

/* ---------------------------------------------------------------------- */
/* In a pod (runs_on) */

int build_local_check_pod(const struct pl_node *with, const struct pl_node *runs_on,
			  const struct pl_node *defaults, const struct pl_node *at,
			  const char *file, const char *path, struct kpl_err *err)
{
	static const char *const pod_only[] = { "registry", "repository", "tags" };
	const struct pl_node *n;

	if (!pl_runs_on_pod(runs_on, defaults)) {
		/* On kpld's host the layout is the result; a push stage sends it. */
		for (size_t i = 0; i < KPL_ARRAY_SIZE(pod_only); i++)
			if ((n = pl_map_get(with, pod_only[i])))
				return kpl_errf(err, KPL_EINVAL, "%s:%d:%d: %s.with.%s: only for a "
						"build in a pod (runs_on); on kpld's host the "
						"image is a layout in the workspace (output), "
						"pushed by a push stage", file, n->pos.line,
						n->pos.col, path, pod_only[i]);
		return 0;
	}
	if ((n = pl_map_get(with, "output")))
		return kpl_errf(err, KPL_EINVAL, "%s:%d:%d: %s.with.output: not in a pod: the "
				"pod pushes the image to with.registry (kpld cannot read the "
				"pod's files)", file, n->pos.line, n->pos.col, path);
	if (!pl_runs_on_get(runs_on, defaults, "workspace"))
		return kpl_errf(err, KPL_EINVAL, "%s:%d:%d: %s.runs_on.workspace: required for a "
				"build in a pod (here or in defaults.runs_on): the context is "
				"read from the run's workspace claim, which an earlier pod "
				"stage fills (kpld's own workspace is not in the pod)", file,
				at->pos.line, at->pos.col, path);
	for (size_t i = 0; i < 2; i++)
		if (!pl_map_get(with, pod_only[i]))
			return kpl_errf(err, KPL_EINVAL, "%s:%d:%d: %s.with.%s: required for a "
					"build in a pod: the pod pushes what it built %s",
					file, with->pos.line, with->pos.col, path, pod_only[i],
					i == 0 ? "(a `registries:` endpoint of the daemon config)"
					       : "(the image's repository in the registry)");
	return 0;
}

/* with.tags (a list, or "a, b"), expanded, space-separated, each checked
 * as a tag; default the run id. NULL with err if one is not a tag. */
static char *pod_tags(struct stage *st, struct kpl_err *err)
{
	const struct pl_node *n = stage_with_get(st, "tags");
	char *all = NULL, *out = kpl_strdup("");

	if (!n) {
		all = kpl_strdup(stage_run_id(st));
	} else if (n->type == PL_SEQ) {
		all = kpl_strdup("");
		for (size_t i = 0; i < n->n; i++) {
			char *v = stage_expand(st, n->items[i]), *t = kpl_asprintf("%s %s", all, v);
			free(v);
			free(all);
			all = t;
		}
	} else {
		all = stage_expand(st, n);
	}
	for (char *save = NULL, *t = strtok_r(all, " ,\t\n", &save); t;
	     t = strtok_r(NULL, " ,\t\n", &save)) {
		size_t len = strlen(t);
		char *u;
		bool ok = len <= 128 && (isalnum((unsigned char)t[0]) || t[0] == '_');
		for (size_t i = 0; ok && i < len; i++)
			ok = isalnum((unsigned char)t[i]) || strchr("_.-", t[i]);
		if (!ok) {
			kpl_errf(err, KPL_EINVAL, "with.tags: \"%.60s\" is not a tag "
				 "([A-Za-z0-9_][A-Za-z0-9_.-]{0,127})", t);
			free(all);
			free(out);
			return NULL;
		}
		u = kpl_asprintf("%s%s%s", out, out[0] ? " " : "", t);
		free(out);
		out = u;
	}
	free(all);
	if (!out[0]) {
		free(out);
		kpl_errf(err, KPL_EINVAL, "with.tags: no tag");
		return NULL;
	}
	return out;
}

/*
 * The pod's command: buildah with its storage in the pod's private /tmp
 * (gone with the pod), values only through the environment and "$@" (never
 * in the script's text). The password reaches buildah login on stdin.
 */
static const char bl_pod_script[] =
	"set -eu\n"
	"b() { buildah --storage-driver vfs --root /tmp/kpl-buildah/root "
	"--runroot /tmp/kpl-buildah/run \"$@\"; }\n"
	"name=localhost/kpl-build\n"
	"b bud --isolation chroot \"$@\" -f \"$KPL_BUILD_DOCKERFILE\" -t \"$name\" "
	"\"$KPL_BUILD_CONTEXT\"\n"
	"set -- --tls-verify=\"$KPL_BUILD_TLS_VERIFY\"\n"
	"if [ -n \"${KPL_BUILD_USERNAME:-}\" ]; then\n"
	"  printf '%s' \"$KPL_BUILD_PASSWORD\" | b login --authfile /tmp/kpl-auth.json "
	"--tls-verify=\"$KPL_BUILD_TLS_VERIFY\" --username \"$KPL_BUILD_USERNAME\" "
	"--password-stdin \"$KPL_BUILD_REGISTRY\" >/dev/null\n"
	"  set -- \"$@\" --authfile /tmp/kpl-auth.json\n"
	"fi\n"
	"unset KPL_BUILD_PASSWORD\n"
	"repo=\"$KPL_BUILD_REGISTRY/$KPL_BUILD_REPOSITORY\"\n"
	"for tag in $KPL_BUILD_TAGS; do\n"
	"  b push --quiet \"$@\" --digestfile /tmp/kpl-digest \"$name\" \"docker://$repo:$tag\"\n"
	"  echo \"pushed $repo:$tag ($(cat /tmp/kpl-digest))\"\n"
	"done\n"
	"d=$(cat /tmp/kpl-digest)\n"
	"{ echo \"image=$repo@$d\"; echo \"digest=$d\"; "
	"echo \"tags=$(echo $KPL_BUILD_TAGS | tr ' ' ,)\"; } >> \"$KPL_OUTPUTS\"\n";

static int bl_pod_command(struct stage *st, struct pod_command *out, struct kpl_err *err)
{
	const struct pl_node *args = stage_with_get(st, "args");
	struct stage_endpoint ep = { 0 };
	char *context = with_text(st, "context", "."), *dockerfile = with_text(st, "dockerfile",
									      "Dockerfile");
	char *target = with_text(st, "target", NULL), *repo = with_text(st, "repository", NULL);
	char *tags = NULL, *host = NULL, *v;
	const char *why = NULL, *key = NULL, *url;
	size_t argc = 0;
	bool tls = true;
	int rc;

	if ((why = path_problem(context)))
		key = "context";
	else if ((why = path_problem(dockerfile)))
		key = "dockerfile";
	if (why) {
		rc = kpl_errf(err, KPL_EINVAL, "with.%s: %s", key, why);
		goto out;
	}
	if (!repo || !repo[0]) {
		rc = kpl_errf(err, KPL_EINVAL, "with.repository: required for a build in a pod");
		goto out;
	}
	if (!(tags = pod_tags(st, err))) {
		rc = KPL_EINVAL;
		goto out;
	}
	if ((rc = stage_endpoint(st, CFG_REGISTRY, "registry", &ep, err)) != 0)
		goto out;
	if (ep.token && ep.token[0] && !(ep.username && ep.username[0])) {
		rc = kpl_errf(err, KPL_EINVAL, "with.registry: a build in a pod logs in with the "
			      "endpoint's username and password (it has a token only)");
		goto out;
	}
	/* The registry as buildah names it: host[:port], TLS unless http://. */
	url = ep.url ? ep.url : "";
	if (!strncmp(url, "http://", 7)) {
		tls = false;
		url += 7;
	} else if (!strncmp(url, "https://", 8)) {
		url += 8;
	}
	host = kpl_strdup(url);
	host[strcspn(host, "/")] = '\0';

	out->argv = kpl_calloc(6 + 2 * ((args ? args->n : 0) + 1), sizeof *out->argv);
	out->argv[argc++] = kpl_strdup("/bin/sh");
	out->argv[argc++] = kpl_strdup("-c");
	out->argv[argc++] = kpl_strdup(bl_pod_script);
	out->argv[argc++] = kpl_strdup("kpl-build"); /* $0 */
	if (target) {
		out->argv[argc++] = kpl_strdup("--target");
		out->argv[argc++] = kpl_strdup(target);
	}
	for (size_t i = 0; args && i < args->n; i++) {
		/* Refused from secrets by the parser (argv_keys), as on the host. */
		v = stage_expand(st, args->items[i]);
		out->argv[argc++] = kpl_strdup("--build-arg");
		out->argv[argc++] = kpl_asprintf("%s=%s", args->keys[i]->scalar, v);
		free(v);
	}
	out->env = pod_stage_env(st);
	v = kpl_asprintf("%s/%s", PODSPEC_WORKSPACE, context);
	proc_env_set(&out->env, "KPL_BUILD_CONTEXT", v);
	free(v);
	v = kpl_asprintf("%s/%s/%s", PODSPEC_WORKSPACE, context, dockerfile);
	proc_env_set(&out->env, "KPL_BUILD_DOCKERFILE", v);
	free(v);
	proc_env_set(&out->env, "KPL_BUILD_REGISTRY", host);
	proc_env_set(&out->env, "KPL_BUILD_REPOSITORY", repo);
	proc_env_set(&out->env, "KPL_BUILD_TAGS", tags);
	proc_env_set(&out->env, "KPL_BUILD_TLS_VERIFY", tls ? "true" : "false");
	if (ep.username && ep.username[0]) {
		proc_env_set(&out->env, "KPL_BUILD_USERNAME", ep.username);
		out->secret_env = kpl_calloc(2, sizeof *out->secret_env);
		out->secret_env[0] = kpl_asprintf("KPL_BUILD_PASSWORD=%s",
						  ep.password ? ep.password : "");
	}
	rc = 0;
out:
	stage_endpoint_release(&ep);
	free(context);
	free(dockerfile);
	free(target);
	free(repo);
	free(tags);
	free(host);
	return rc;
}

static int build_local_start(struct stage *st, struct kpl_err *err)
{
	if (pod_wanted(st))
		return pod_start(st, bl_pod_command, err);
	return proc_steps_start(st, &bl_steps, err);
}

static int build_local_resume(struct stage *st, struct kpl_err *err)
{
	if (pod_wanted(st))
		return pod_resume(st, bl_pod_command, err);
	return proc_steps_resume(st, &bl_steps, err);
}

static void build_local_cancel(struct stage *st)
{
	if (pod_wanted(st))
		pod_cancel(st);
	else
		proc_steps_cancel(st);
}

static void build_local_abandon(struct stage *st)
{
	if (pod_wanted(st))
		pod_abandon(st);
	else
		proc_steps_abandon(st);
}

const struct stage_kind build_local_driver = {
	.name = "local",
	.check_with = build_local_check_with,
	.start = build_local_start,
	.cancel = build_local_cancel,
	.resume = build_local_resume,
	.abandon = build_local_abandon,
};
