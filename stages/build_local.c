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
 */
#include <ctype.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "stages/build.h"
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
					    "args", "output" };
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
					"target, args, output)");
		if (strcmp(k, "args") && v->type != PL_SCALAR)
			return with_err(err, file, v, path, k, "must be a string");
		if (v->type == PL_SCALAR && strcmp(k, "target") && strcmp(k, "driver") &&
		    !strstr(v->scalar, "${{") && (why = path_problem(v->scalar)))
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

static int build_local_start(struct stage *st, struct kpl_err *err)
{
	return proc_steps_start(st, &bl_steps, err);
}

static int build_local_resume(struct stage *st, struct kpl_err *err)
{
	return proc_steps_resume(st, &bl_steps, err);
}

const struct stage_kind build_local_driver = {
	.name = "local",
	.check_with = build_local_check_with,
	.start = build_local_start,
	.cancel = proc_steps_cancel,
	.resume = build_local_resume,
	.abandon = proc_steps_abandon,
};
