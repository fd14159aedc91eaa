/*
 * script.c - the `script` stage kind: one command, run through the shim.
 *
 *   with: { command: [argv...] }   or   with: { shell: "..." }  (/bin/sh -c)
 *         workdir: path (relative to the run's workspace; default the
 *                  workspace itself)
 *
 * Parameters reach the command as KPL_PARAM_<NAME> environment variables,
 * never spliced into a shell line; a ${{ }} template in `shell` becomes a
 * reference to a variable KPL_T_N that holds its value (tpl_expand_shell),
 * so no value (a webhook's branch name, say) is ever shell text. The command runs under `kpld __shim`
 * (stages/shim.c), detached from kpld: its output lines go to a file in the
 * attempt's directory, which this kind follows (inotify through uv_fs_event)
 * and turns into log events, storing the read offset in the same commit as
 * the events (stages/proc.c). So a kpld that stops or crashes and starts
 * again re-attaches to the same process, loses no line, repeats none, and
 * never runs the command a second time.
 *
 * A stage publishes outputs by writing KEY=VALUE lines to $KPL_OUTPUTS.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "stages/kinds.h"
#include "stages/pod.h"
#include "stages/proc.h"

#define SCRIPT_MAX_OUTPUTS_BYTES (256 * 1024)

/* One attempt. */
struct script {
	struct stage *st;
	struct proc *proc;
	char *what;             /* the program, for messages (owned) */
};

/* ---------------------------------------------------------------------- */
/* with: */

static int with_err(struct kpl_err *err, const char *file, const struct pl_node *n,
		    const char *path, const char *key, const char *msg)
{
	return kpl_errf(err, KPL_EINVAL, "%s:%d:%d: %s%s%s: %s", file, n->pos.line,
			n->pos.col, path, key ? "." : "", key ? key : "", msg);
}

/*
 * `with` of the script kind: command | shell, workdir, and, as in the
 * format's first version, env (more variables for the command, after the
 * stage's) and timeout (the stage's, when it has no `timeout` of its own).
 * The messages are the ones the parser's table of bad files expects
 * (tests/unit/pipeline_test.c).
 */
static int script_check_with(const struct pl_node *with, const char *file,
			     const char *path, struct kpl_err *err)
{
	static const char *const allowed[] = { "command", "shell", "workdir", "env", "timeout" };
	const struct pl_node *cmd, *sh, *wd, *env, *t;

	if (!with)
		return kpl_errf(err, KPL_EINVAL, "%s: %s: a script stage needs with.command or "
				"with.shell", file, path);
	if (with->type != PL_MAP)
		return with_err(err, file, with, path, NULL, "expected a mapping");
	for (size_t i = 0; i < with->n; i++) {
		size_t j;
		for (j = 0; j < KPL_ARRAY_SIZE(allowed); j++)
			if (!strcmp(with->keys[i]->scalar, allowed[j]))
				break;
		if (j == KPL_ARRAY_SIZE(allowed))
			return with_err(err, file, with->keys[i], path, with->keys[i]->scalar,
					"unknown key (allowed: command, shell, workdir, env, timeout)");
	}
	cmd = pl_map_get(with, "command");
	sh = pl_map_get(with, "shell");
	wd = pl_map_get(with, "workdir");
	env = pl_map_get(with, "env");
	t = pl_map_get(with, "timeout");
	if (cmd && sh)
		return with_err(err, file, sh, path, "shell", "give command or shell, not both");
	if (!cmd && !sh)
		return with_err(err, file, with, path, NULL, "a script stage needs command or shell");
	if (cmd && (cmd->type != PL_SEQ || cmd->n == 0))
		return with_err(err, file, cmd, path, "command",
				"expected a non-empty list of strings");
	for (size_t i = 0; cmd && i < cmd->n; i++)
		if (cmd->items[i]->type != PL_SCALAR)
			return with_err(err, file, cmd->items[i], path, "command",
					"expected a string");
	if (cmd && !cmd->items[0]->scalar[0])
		return with_err(err, file, cmd->items[0], path, "command",
				"the program (the first string) must not be empty");
	if (sh && (sh->type != PL_SCALAR || !sh->scalar[0]))
		return with_err(err, file, sh, path, "shell", "expected a non-empty string");
	if (wd && wd->type != PL_SCALAR)
		return with_err(err, file, wd, path, "workdir", "expected a string");
	if (t && (t->type != PL_SCALAR || pl_parse_duration(t->scalar) <= 0))
		return with_err(err, file, t, path, "timeout", "bad duration");
	if (env && env->type != PL_MAP)
		return with_err(err, file, env, path, "env", "expected a mapping");
	for (size_t i = 0; env && i < env->n; i++)
		if (env->items[i]->type != PL_SCALAR)
			return with_err(err, file, env->items[i], path, "env",
					"expected a string value");
	return 0;
}

/* ---------------------------------------------------------------------- */
/* The kind */

static void script_free(struct script *s)
{
	free(s->what);
	free(s);
}

/* Reads KEY=VALUE lines the command wrote to $KPL_OUTPUTS. */
static void read_outputs(struct script *s)
{
	char *path = kpl_asprintf("%s/outputs", proc_dir(s->proc));
	/* The command wrote it: no symlink out of the workspace is followed. */
	int fd = kpl_open_ws(path, O_RDONLY | O_CLOEXEC);
	FILE *f = fd >= 0 ? fdopen(fd, "r") : NULL;
	char *line = NULL;
	size_t cap = 0, total = 0;
	ssize_t n;

	free(path);
	if (!f) {
		if (fd >= 0)
			close(fd);
		return;
	}
	while ((n = getline(&line, &cap, f)) > 0) {
		char *eq;
		total += (size_t)n;
		if (total > SCRIPT_MAX_OUTPUTS_BYTES) {
			stage_logf(s->st, "outputs file over %d bytes: the rest is ignored",
				   SCRIPT_MAX_OUTPUTS_BYTES);
			break;
		}
		if (line[n - 1] == '\n')
			line[--n] = '\0';
		if (!n)
			continue;
		eq = strchr(line, '=');
		if (!eq || eq == line) {
			stage_logf(s->st, "outputs file: ignored a line without KEY=VALUE");
			continue;
		}
		*eq = '\0';
		if (stage_set_output(s->st, line, eq + 1))
			stage_logf(s->st, "outputs file: output %s is too long; ignored", line);
	}
	free(line);
	fclose(f);
}

/* The command has ended and its output is read: report. */
static void script_exit(struct proc *p, const struct proc_exit *e)
{
	struct script *s = proc_data(p);
	struct stage *st = s->st;
	char msg[512];

	read_outputs(s);
	stage_set_impl(st, NULL);
	if (e->how == PROC_EXITED) {
		if (e->code == 0)
			stage_done(st, KPL__V1__STAGE_STATE__STAGE_STATE_SUCCEEDED, NULL);
		else if (e->cancelled)
			stage_done(st, KPL__V1__STAGE_STATE__STAGE_STATE_CANCELLED, "cancelled");
		else {
			snprintf(msg, sizeof msg, "%s exited with status %d", s->what, e->code);
			stage_done(st, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, msg);
		}
	} else if (e->how == PROC_SIGNALED) {
		if (e->cancelled) {
			stage_done(st, KPL__V1__STAGE_STATE__STAGE_STATE_CANCELLED, "cancelled");
		} else {
			snprintf(msg, sizeof msg, "%s killed by signal %d (%s)", s->what,
				 e->code, strsignal(e->code));
			stage_done(st, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, msg);
		}
	} else if (e->how == PROC_ERROR) {
		snprintf(msg, sizeof msg, "%s", e->error);
		stage_done(st, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, msg);
	} else if (e->cancelled) {
		stage_done(st, KPL__V1__STAGE_STATE__STAGE_STATE_CANCELLED, "cancelled");
	} else {
		stage_done(st, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED,
			   "its process ended without reporting an exit status (killed?)");
	}
	script_free(s);
}

static const struct proc_ops script_ops = { .exit = script_exit };

static int script_start(struct stage *st, struct kpl_err *err)
{
	const struct pl_node *cmd = stage_with_get(st, "command");
	const struct pl_node *sh = stage_with_get(st, "shell");
	char *wd = stage_expand(st, stage_with_get(st, "workdir"));
	struct script *s = kpl_calloc(1, sizeof *s);
	struct proc_spec spec = { 0 };
	char **argv, **env, *cwd, *dir, *outputs, **tvals = NULL;
	size_t argc = 0, ntvals = 0;
	int rc;

	if (pod_wanted(st)) {
		/* runs_on: a pod in a cluster (stages/pod.c). */
		free(wd);
		free(s);
		return pod_start(st, pod_script_command, err);
	}
	dir = proc_attempt_dir(st);
	s->st = st;
	argv = kpl_calloc((cmd ? cmd->n : 3) + 1, sizeof *argv);
	if (cmd) {
		for (size_t i = 0; i < cmd->n; i++)
			argv[argc++] = stage_expand(st, cmd->items[i]);
		s->what = kpl_strdup(argv[0]);
	} else {
		char *text;

		/* Values reach the shell as variables, never as its text. */
		if ((rc = stage_expand_shell(st, sh, &text, &tvals, &ntvals, err)) != 0) {
			free(argv);
			free(dir);
			free(wd);
			script_free(s);
			return rc;
		}
		argv[argc++] = kpl_strdup("/bin/sh");
		argv[argc++] = kpl_strdup("-c");
		argv[argc++] = text;
		s->what = kpl_strdup("shell script");
	}
	if (wd && wd[0] == '/')
		cwd = kpl_strdup(wd);
	else if (wd)
		cwd = kpl_asprintf("%s/%s", stage_workspace(st), wd);
	else
		cwd = kpl_strdup(stage_workspace(st));
	outputs = kpl_asprintf("%s/outputs", dir);
	env = proc_stage_env(st, outputs);
	free(outputs);
	{
		const struct pl_node *wenv = stage_with_get(st, "env");
		for (size_t i = 0; wenv && i < wenv->n; i++) {
			char *v = stage_expand(st, wenv->items[i]);
			proc_env_set(&env, wenv->keys[i]->scalar, v);
			free(v);
		}
	}
	for (size_t i = 0; i < ntvals; i++) {
		char name[32];

		snprintf(name, sizeof name, "KPL_T_%zu", i + 1);
		proc_env_set(&env, name, tvals[i]);
		free(tvals[i]);
	}
	free(tvals);

	spec.dir = dir;
	spec.argv = argv;
	spec.env = env;
	spec.cwd = cwd;
	spec.what = s->what;
	rc = proc_start(st, &spec, &script_ops, s, &s->proc, err);
	if (rc)
		script_free(s);
	else
		stage_set_impl(st, s);
	proc_strv_free(argv);
	proc_strv_free(env);
	free(cwd);
	free(dir);
	free(wd);
	return rc;
}

static void script_cancel(struct stage *st)
{
	struct script *s = stage_impl(st);

	if (pod_wanted(st)) {
		pod_cancel(st);
		return;
	}
	if (s)
		proc_cancel(s->proc);
}

/* kpld is stopping: leave the shim running for the next kpld to re-attach. */
static void script_abandon(struct stage *st)
{
	struct script *s = stage_impl(st);

	if (pod_wanted(st)) {
		pod_abandon(st);
		return;
	}
	if (!s)
		return;
	stage_set_impl(st, NULL);
	proc_abandon(s->proc);
	script_free(s);
}

/*
 * After a restart: find the attempt's shim again. If it never got to start
 * the command, claim the attempt so it never will, and let the engine
 * retry. If it finished, read the rest and report. If it runs, follow it.
 */
static int script_resume(struct stage *st, struct kpl_err *err)
{
	struct script *s;
	char *dir;
	int64_t pid;
	uint64_t start;
	const char *resume;
	int rc;

	if (pod_wanted(st))
		return pod_resume(st, pod_script_command, err);
	s = kpl_calloc(1, sizeof *s);
	dir = proc_attempt_dir(st);
	s->st = st;
	s->what = kpl_strdup("the command");
	stage_resume_info(st, &pid, &start, &resume);
	/* KPL_ENOTFOUND from proc tells the engine nothing ran: start afresh. */
	rc = proc_resume(st, dir, "", strtoull(resume, NULL, 10), &script_ops, s,
			 &s->proc, err);
	if (rc)
		script_free(s);
	else
		stage_set_impl(st, s);
	free(dir);
	return rc;
}

static const char *const script_argv_keys[] = { "command", "shell", NULL };

/* Every key `with` may hold (the parser checks them, docs_test reads them). */
static const char *const script_with_keys[] = {
	"command", "shell", "workdir", "env", "timeout", NULL
};

const struct stage_kind script_kind = {
	.name = "script",
	.with_keys = script_with_keys,
	/* shell's values reach sh as variables, but the rule stays one: a
	 * secret goes through env. */
	.argv_keys = script_argv_keys,
	.check_with = script_check_with,
	.start = script_start,
	.cancel = script_cancel,
	.resume = script_resume,
	.abandon = script_abandon,
	.with_timeout = true,
	.runs_on = true,
	.run_ended = pod_run_ended,
};
