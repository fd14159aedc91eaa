/*
 * script.c - the `script` stage kind: one child process through libuv.
 *
 *   with: { command: [argv...] }   or   with: { shell: "..." }  (/bin/sh -c)
 *         workdir: path (relative to the run's workspace; default the
 *                  workspace itself)
 *
 * Parameters reach the command as KPL_PARAM_<NAME> environment variables,
 * never spliced into a shell line. stdout and stderr become log events line
 * by line; the exit status decides the result. The child leads its own
 * process group (UV_PROCESS_DETACHED makes it a session leader), so cancel
 * and timeout stop everything it started: SIGTERM to the group, SIGKILL
 * after a grace period. A stage publishes outputs by writing KEY=VALUE lines
 * to the file named by $KPL_OUTPUTS.
 */
#include <ctype.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "stages/kinds.h"

#define LOG "script"
#define SCRIPT_KILL_GRACE_MS 5000
#define SCRIPT_MAX_OUTPUTS_BYTES (256 * 1024)

extern char **environ;

struct linebuf {
	char buf[KPL_MAX_LOG_LINE];
	size_t len;
};

/* One attempt. Freed when its last handle has closed. */
struct script {
	struct stage *st;     /* NULL once the result was reported or abandoned */
	uv_process_t proc;
	uv_pipe_t out, err;
	uv_timer_t kill_timer;
	struct linebuf lout, lerr;
	char readbuf[65536];
	int open_handles;
	int eofs;
	bool exited;
	int64_t exit_status;
	int term_signal;
	bool cancelled;
	char *outputs_path;   /* owned */
	char *argv0;          /* owned, for messages */
};

/* ---------------------------------------------------------------------- */
/* with: */

static int with_err(struct kpl_err *err, const char *file, const struct pl_node *n,
		    const char *path, const char *key, const char *msg)
{
	return kpl_errf(err, KPL_EINVAL, "%s:%d:%d: %s%s%s: %s", file, n->pos.line,
			n->pos.col, path, key ? "." : "", key ? key : "", msg);
}

static int script_check_with(const struct pl_node *with, const char *file,
			     const char *path, struct kpl_err *err)
{
	const struct pl_node *cmd, *sh, *wd;

	if (!with)
		return kpl_errf(err, KPL_EINVAL, "%s: %s: a script stage needs `with` "
				"with `command` or `shell`", file, path);
	if (with->type != PL_MAP)
		return with_err(err, file, with, path, NULL, "must be a mapping");
	for (size_t i = 0; i < with->n; i++) {
		const char *k = with->keys[i]->scalar;
		if (strcmp(k, "command") && strcmp(k, "shell") && strcmp(k, "workdir"))
			return with_err(err, file, with->keys[i], path, k,
					"unknown key (allowed: command, shell, workdir)");
	}
	cmd = pl_map_get(with, "command");
	sh = pl_map_get(with, "shell");
	wd = pl_map_get(with, "workdir");
	if (cmd && sh)
		return with_err(err, file, with, path, NULL,
				"give either `command` or `shell`, not both");
	if (!cmd && !sh)
		return with_err(err, file, with, path, NULL,
				"needs `command` (a list of arguments) or `shell` (a string)");
	if (cmd) {
		if (cmd->type != PL_SEQ || cmd->n == 0)
			return with_err(err, file, cmd, path, "command",
					"must be a non-empty list of strings");
		for (size_t i = 0; i < cmd->n; i++) {
			if (cmd->items[i]->type != PL_SCALAR) {
				char key[64];
				snprintf(key, sizeof key, "command[%zu]", i);
				return with_err(err, file, cmd->items[i], path, key,
						"must be a string");
			}
		}
		if (!cmd->items[0]->scalar[0])
			return with_err(err, file, cmd->items[0], path, "command[0]",
					"the program must not be empty");
	}
	if (sh && (sh->type != PL_SCALAR || !sh->scalar[0]))
		return with_err(err, file, sh, path, "shell", "must be a non-empty string");
	if (wd && wd->type != PL_SCALAR)
		return with_err(err, file, wd, path, "workdir", "must be a string");
	return 0;
}

/* ---------------------------------------------------------------------- */
/* Process bookkeeping */

/* Start time of pid in clock ticks since boot (/proc/PID/stat field 22),
 * so a recorded pid is not mistaken for a new process that reused it. */
uint64_t script_pid_start_time(int64_t pid)
{
	char path[64], buf[1024];
	FILE *f;
	size_t n;
	char *p;
	unsigned long long start = 0;

	snprintf(path, sizeof path, "/proc/%lld/stat", (long long)pid);
	if (!(f = fopen(path, "r")))
		return 0;
	n = fread(buf, 1, sizeof buf - 1, f);
	fclose(f);
	buf[n] = '\0';
	/* comm may hold spaces and parentheses: fields restart after the last ')'. */
	if (!(p = strrchr(buf, ')')))
		return 0;
	p++;
	for (int field = 3; field < 22 && p; field++)
		p = strchr(p + 1, ' ');
	if (p)
		sscanf(p + 1, "%llu", &start);
	return start;
}

static void group_kill(int64_t pid, int sig)
{
	if (pid > 0 && kill(-(pid_t)pid, sig) && errno != ESRCH)
		kpl_warn(LOG, "kill(-%lld, %d): %s", (long long)pid, sig, strerror(errno));
}

static void script_closed(uv_handle_t *h)
{
	struct script *s = h->data;

	if (--s->open_handles == 0) {
		free(s->outputs_path);
		free(s->argv0);
		free(s);
	}
}

static void script_close_all(struct script *s)
{
	uv_close((uv_handle_t *)&s->proc, script_closed);
	uv_close((uv_handle_t *)&s->out, script_closed);
	uv_close((uv_handle_t *)&s->err, script_closed);
	uv_close((uv_handle_t *)&s->kill_timer, script_closed);
}

static void emit_line(struct script *s, Kpl__V1__LogStream stream, const char *p,
		      size_t n)
{
	if (n && p[n - 1] == '\r')
		n--;
	if (s->st)
		stage_log(s->st, stream, p, n);
}

static void linebuf_feed(struct script *s, struct linebuf *lb,
			 Kpl__V1__LogStream stream, const char *p, size_t n)
{
	while (n) {
		const char *nl = memchr(p, '\n', n);
		size_t take = nl ? (size_t)(nl - p) : n;
		size_t room = sizeof lb->buf - lb->len;

		if (take > room)
			take = room;
		memcpy(lb->buf + lb->len, p, take);
		lb->len += take;
		p += take;
		n -= take;
		if (n && *p == '\n') {
			emit_line(s, stream, lb->buf, lb->len);
			lb->len = 0;
			p++;
			n--;
		} else if (lb->len == sizeof lb->buf) {
			/* An over-long line is cut into pieces of the cap. */
			emit_line(s, stream, lb->buf, lb->len);
			lb->len = 0;
		}
	}
}

static void linebuf_flush(struct script *s, struct linebuf *lb, Kpl__V1__LogStream stream)
{
	if (lb->len)
		emit_line(s, stream, lb->buf, lb->len);
	lb->len = 0;
}

/* Reads KEY=VALUE lines the command wrote to $KPL_OUTPUTS. */
static void read_outputs(struct script *s)
{
	FILE *f = fopen(s->outputs_path, "r");
	char *line = NULL;
	size_t cap = 0, total = 0;
	ssize_t n;

	if (!f)
		return;
	while ((n = getline(&line, &cap, f)) > 0 && s->st) {
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

/* The process has exited and both pipes are at EOF: report once. */
static void script_maybe_finish(struct script *s)
{
	char msg[256];
	struct stage *st = s->st;

	if (!s->exited || s->eofs < 2)
		return;
	if (st) {
		linebuf_flush(s, &s->lout, KPL__V1__LOG_STREAM__LOG_STREAM_STDOUT);
		linebuf_flush(s, &s->lerr, KPL__V1__LOG_STREAM__LOG_STREAM_STDERR);
		read_outputs(s);
		s->st = NULL;
		if (s->cancelled) {
			stage_done(st, KPL__V1__STAGE_STATE__STAGE_STATE_CANCELLED, "cancelled");
		} else if (s->term_signal) {
			snprintf(msg, sizeof msg, "%s killed by signal %d (%s)", s->argv0,
				 s->term_signal, strsignal(s->term_signal));
			stage_done(st, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, msg);
		} else if (s->exit_status) {
			snprintf(msg, sizeof msg, "%s exited with status %lld", s->argv0,
				 (long long)s->exit_status);
			stage_done(st, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, msg);
		} else {
			stage_done(st, KPL__V1__STAGE_STATE__STAGE_STATE_SUCCEEDED, NULL);
		}
	}
	script_close_all(s);
}

static void on_exit_cb(uv_process_t *p, int64_t exit_status, int term_signal)
{
	struct script *s = p->data;

	s->exited = true;
	s->exit_status = exit_status;
	s->term_signal = term_signal;
	uv_timer_stop(&s->kill_timer);
	/* Whatever the command left running in its group goes with it, or
	 * its open pipes would keep the stage RUNNING forever. */
	group_kill(p->pid, SIGKILL);
	script_maybe_finish(s);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
	struct script *s = h->data;
	(void)suggested;
	*buf = uv_buf_init(s->readbuf, sizeof s->readbuf);
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf)
{
	struct script *s = stream->data;
	bool is_out = stream == (uv_stream_t *)&s->out;

	if (nread > 0) {
		linebuf_feed(s, is_out ? &s->lout : &s->lerr,
			     is_out ? KPL__V1__LOG_STREAM__LOG_STREAM_STDOUT
				    : KPL__V1__LOG_STREAM__LOG_STREAM_STDERR,
			     buf->base, (size_t)nread);
		return;
	}
	if (nread == 0)
		return;
	/* EOF or an error: either way this pipe is done. */
	uv_read_stop(stream);
	s->eofs++;
	script_maybe_finish(s);
}

static void on_kill_timer(uv_timer_t *t)
{
	struct script *s = t->data;

	if (!s->exited)
		group_kill(s->proc.pid, SIGKILL);
}

/* ---------------------------------------------------------------------- */
/* Environment */

static void env_push(char ***env, size_t *n, size_t *cap, char *entry)
{
	if (*n + 2 > *cap) {
		*cap = *cap ? *cap * 2 : 64;
		*env = kpl_realloc(*env, *cap * sizeof **env);
	}
	(*env)[(*n)++] = entry;
	(*env)[*n] = NULL;
}

/* Sets NAME=value, replacing an earlier NAME. */
static void env_set(char ***env, size_t *n, size_t *cap, const char *name,
		    const char *value)
{
	size_t len = strlen(name);

	for (size_t i = 0; i < *n; i++) {
		if (strncmp((*env)[i], name, len) == 0 && (*env)[i][len] == '=') {
			free((*env)[i]);
			(*env)[i] = kpl_asprintf("%s=%s", name, value);
			return;
		}
	}
	env_push(env, n, cap, kpl_asprintf("%s=%s", name, value));
}

/* KPL_PARAM_ + the name upper-cased, other characters as '_'. */
static char *param_env_name(const char *name)
{
	char *s = kpl_asprintf("KPL_PARAM_%s", name);

	for (char *p = s + strlen("KPL_PARAM_"); *p; p++)
		*p = isalnum((unsigned char)*p) ? (char)toupper((unsigned char)*p) : '_';
	return s;
}

/*
 * kpld's environment without its own KPL_* variables, then what kpl tells
 * every stage, the params, the pipeline's env and the stage's env.
 */
static char **build_env(struct stage *st, const char *outputs_path)
{
	char **env = NULL;
	size_t n = 0, cap = 0, np, ns, nparams;
	const struct pl_env *penv, *senv;
	const char *const *names, *const *values;
	char attempt[16];

	for (char **e = environ; e && *e; e++)
		if (strncmp(*e, "KPL_", 4) != 0)
			env_push(&env, &n, &cap, kpl_strdup(*e));
	env_set(&env, &n, &cap, "KPL_RUN_ID", stage_run_id(st));
	env_set(&env, &n, &cap, "KPL_STAGE", stage_name(st));
	snprintf(attempt, sizeof attempt, "%u", stage_attempt(st));
	env_set(&env, &n, &cap, "KPL_ATTEMPT", attempt);
	env_set(&env, &n, &cap, "KPL_WORKSPACE", stage_workspace(st));
	env_set(&env, &n, &cap, "KPL_OUTPUTS", outputs_path);
	stage_params(st, &names, &values, &nparams);
	for (size_t i = 0; i < nparams; i++) {
		char *k = param_env_name(names[i]);
		env_set(&env, &n, &cap, k, values[i]);
		free(k);
	}
	stage_env(st, &penv, &np, &senv, &ns);
	for (size_t i = 0; i < np; i++)
		env_set(&env, &n, &cap, penv[i].name, penv[i].value);
	for (size_t i = 0; i < ns; i++)
		env_set(&env, &n, &cap, senv[i].name, senv[i].value);
	return env;
}

static void free_strv(char **v)
{
	for (char **p = v; p && *p; p++)
		free(*p);
	free(v);
}

/* ---------------------------------------------------------------------- */
/* The kind */

static void resume_recorded(struct stage *st, int status, void *data)
{
	(void)st;
	(void)data;
	if (status)
		kpl_warn(LOG, "could not record the child's pid: %s", kpl_strerror(status));
}

static int script_start(struct stage *st, struct kpl_err *err)
{
	const struct pl_node *with = stage_spec(st)->with;
	const struct pl_node *cmd = pl_map_get(with, "command");
	const struct pl_node *sh = pl_map_get(with, "shell");
	const struct pl_node *wd = pl_map_get(with, "workdir");
	uv_process_options_t o = { 0 };
	uv_stdio_container_t stdio[3];
	struct script *s;
	char **argv, **env = NULL, *cwd = NULL, *kdir;
	size_t argc;
	int rc;

	s = kpl_calloc(1, sizeof *s);
	if (cmd) {
		argc = cmd->n;
		argv = kpl_calloc(argc + 1, sizeof *argv);
		for (size_t i = 0; i < argc; i++)
			argv[i] = kpl_strdup(cmd->items[i]->scalar);
	} else {
		argv = kpl_calloc(4, sizeof *argv);
		argv[0] = kpl_strdup("/bin/sh");
		argv[1] = kpl_strdup("-c");
		argv[2] = kpl_strdup(sh->scalar);
	}
	s->argv0 = kpl_strdup(cmd ? argv[0] : "shell script");
	if (wd && wd->scalar[0] == '/')
		cwd = kpl_strdup(wd->scalar);
	else if (wd)
		cwd = kpl_asprintf("%s/%s", stage_workspace(st), wd->scalar);
	else
		cwd = kpl_strdup(stage_workspace(st));
	kdir = kpl_asprintf("%s/.kpl", stage_workspace(st));
	mkdir(kdir, 0700);
	s->outputs_path = kpl_asprintf("%s/outputs-%s-%u", kdir, stage_name(st),
				       stage_attempt(st));
	free(kdir);
	unlink(s->outputs_path);
	env = build_env(st, s->outputs_path);

	uv_pipe_init(stage_loop(st), &s->out, 0);
	uv_pipe_init(stage_loop(st), &s->err, 0);
	uv_timer_init(stage_loop(st), &s->kill_timer);
	s->out.data = s->err.data = s->kill_timer.data = s->proc.data = s;
	s->open_handles = 4;

	stdio[0].flags = UV_IGNORE;
	stdio[1].flags = UV_CREATE_PIPE | UV_WRITABLE_PIPE;
	stdio[1].data.stream = (uv_stream_t *)&s->out;
	stdio[2].flags = UV_CREATE_PIPE | UV_WRITABLE_PIPE;
	stdio[2].data.stream = (uv_stream_t *)&s->err;
	o.exit_cb = on_exit_cb;
	o.file = argv[0];
	o.args = argv;
	o.env = env;
	o.cwd = cwd;
	o.stdio = stdio;
	o.stdio_count = 3;
	o.flags = UV_PROCESS_DETACHED;

	rc = uv_spawn(stage_loop(st), &s->proc, &o);
	if (rc) {
		if (rc == UV_ENOENT)
			kpl_errf(err, KPL_EINVAL, "cannot run %s: %s (working directory %s)",
				 argv[0], "no such file or directory", cwd);
		else
			kpl_errf(err, KPL_EINVAL, "cannot run %s: %s", argv[0], uv_strerror(rc));
		/* uv_spawn initialised proc even on failure: close it too. */
		script_close_all(s);
		goto out;
	}
	s->st = st;
	stage_set_impl(st, s);
	uv_read_start((uv_stream_t *)&s->out, on_alloc, on_read);
	uv_read_start((uv_stream_t *)&s->err, on_alloc, on_read);
	stage_record_resume(st, s->proc.pid, script_pid_start_time(s->proc.pid), NULL,
			    resume_recorded, NULL);
	kpl_debug(LOG, "run %s stage %s: started %s as pid %d", stage_run_id(st),
		  stage_name(st), argv[0], s->proc.pid);
out:
	free_strv(argv);
	free_strv(env);
	free(cwd);
	return rc ? KPL_EINVAL : 0;
}

static void script_cancel(struct stage *st)
{
	struct script *s = stage_impl(st);

	if (!s || s->exited)
		return;
	s->cancelled = true;
	group_kill(s->proc.pid, SIGTERM);
	uv_timer_start(&s->kill_timer, on_kill_timer, SCRIPT_KILL_GRACE_MS, 0);
}

static void script_abandon(struct stage *st)
{
	struct script *s = stage_impl(st);

	if (!s)
		return;
	s->st = NULL; /* report nothing; the handles close when it is gone */
	if (!s->exited)
		group_kill(s->proc.pid, SIGKILL);
}

/*
 * A child's output pipes die with the daemon, so an attempt cannot be
 * re-attached. If the process is still there (same pid, same start time),
 * stop its group so it cannot act twice, and say so.
 */
static int script_resume(struct stage *st, struct kpl_err *err)
{
	int64_t pid;
	uint64_t start;
	const char *resume;

	stage_resume_info(st, &pid, &start, &resume);
	if (pid > 0 && start && script_pid_start_time(pid) == start) {
		group_kill(pid, SIGKILL);
		return kpl_errf(err, KPL_ESTATE,
				"its process (pid %lld) was still running and has been stopped",
				(long long)pid);
	}
	return kpl_errf(err, KPL_ESTATE, "its process did not survive");
}

const struct stage_kind script_kind = {
	.name = "script",
	.check_with = script_check_with,
	.start = script_start,
	.cancel = script_cancel,
	.resume = script_resume,
	.abandon = script_abandon,
};
