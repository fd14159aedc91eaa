/*
 * script.c - the `script` stage kind: one command, run through the shim.
 *
 *   with: { command: [argv...] }   or   with: { shell: "..." }  (/bin/sh -c)
 *         workdir: path (relative to the run's workspace; default the
 *                  workspace itself)
 *
 * Parameters reach the command as KPL_PARAM_<NAME> environment variables,
 * never spliced into a shell line. The command runs under `kpld __shim`
 * (stages/shim.c), detached from kpld: its output lines go to a file in the
 * attempt's directory, which this kind follows (inotify through uv_fs_event)
 * and turns into log events, storing the read offset in the same commit as
 * the events. So a kpld that stops or crashes and starts again re-attaches
 * to the same process, loses no line, repeats none, and never runs the
 * command a second time.
 *
 * A stage publishes outputs by writing KEY=VALUE lines to $KPL_OUTPUTS.
 */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "stages/kinds.h"
#include "stages/shim.h"

#define LOG "script"
#define SCRIPT_KILL_GRACE_MS 5000
/* kpld's own SIGKILL of the shim, if the shim has not ended by then. */
#define SCRIPT_SHIM_KILL_MS (SCRIPT_KILL_GRACE_MS + 5000)
#define SCRIPT_MAX_OUTPUTS_BYTES (256 * 1024)

extern char **environ;

/* One attempt. Freed when its last handle has closed. */
struct script {
	struct stage *st;       /* NULL once reported or abandoned */
	uv_loop_t *loop;
	char *dir;              /* the attempt's directory (owned) */
	char *what;             /* the program, for messages (owned) */
	int64_t shim_pid;
	uint64_t offset;        /* bytes of DIR/output turned into events */
	uv_process_t proc;      /* the shim, when this kpld started it */
	bool have_proc;
	uv_poll_t pidpoll;      /* the shim, when re-attached (pidfd) */
	int pidfd;
	bool have_pidpoll;
	uv_fs_event_t watch;    /* changes in dir */
	uv_timer_t kill_timer;
	uv_fs_t req;
	int out_fd;
	bool reading;
	bool reread;            /* a change came while reading */
	bool shim_gone;
	bool cancelled;
	bool finished;
	bool closed;            /* script_close_all ran */
	int open_handles;
	char buf[65536];
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
/* Files of an attempt */

/* Start time of pid in clock ticks since boot (/proc/PID/stat field 22). */
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

static char *attempt_dir(struct stage *st)
{
	return kpl_asprintf("%s/.kpl/%s.%u", stage_workspace(st), stage_name(st),
			    stage_attempt(st));
}

static char *dir_file(const struct script *s, const char *name)
{
	return kpl_asprintf("%s/%s", s->dir, name);
}

/* Reads a small file whole; NULL if it is not there. */
static char *slurp(const char *path, size_t max)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	char *buf;
	ssize_t n;

	if (fd < 0)
		return NULL;
	buf = kpl_malloc(max + 1);
	n = read(fd, buf, max);
	close(fd);
	if (n < 0)
		n = 0;
	buf[n] = '\0';
	return buf;
}

/* ---------------------------------------------------------------------- */
/* Lifetime */

static void script_closed(uv_handle_t *h)
{
	struct script *s = h->data;

	if (--s->open_handles == 0) {
		if (s->out_fd >= 0)
			close(s->out_fd);
		if (s->pidfd >= 0)
			close(s->pidfd);
		free(s->dir);
		free(s->what);
		free(s);
	}
}

static void script_close_all(struct script *s)
{
	if (s->closed)
		return;
	s->closed = true;
	if (s->have_proc)
		uv_close((uv_handle_t *)&s->proc, script_closed);
	if (s->have_pidpoll)
		uv_close((uv_handle_t *)&s->pidpoll, script_closed);
	uv_close((uv_handle_t *)&s->watch, script_closed);
	uv_close((uv_handle_t *)&s->kill_timer, script_closed);
	s->have_proc = s->have_pidpoll = false;
}

static struct script *script_new(struct stage *st, char *dir)
{
	struct script *s = kpl_calloc(1, sizeof *s);

	s->st = st;
	s->loop = stage_loop(st);
	s->dir = dir;
	s->out_fd = -1;
	s->pidfd = -1;
	uv_fs_event_init(s->loop, &s->watch);
	uv_timer_init(s->loop, &s->kill_timer);
	s->watch.data = s->kill_timer.data = s->proc.data = s->pidpoll.data = s;
	s->open_handles = 2;
	return s;
}

/* ---------------------------------------------------------------------- */
/* Following the output file */

static void script_read(struct script *s);

/* Reads KEY=VALUE lines the command wrote to $KPL_OUTPUTS. */
static void read_outputs(struct script *s)
{
	char *path = dir_file(s, "outputs");
	FILE *f = fopen(path, "r");
	char *line = NULL;
	size_t cap = 0, total = 0;
	ssize_t n;

	free(path);
	if (!f)
		return;
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

/* The shim has ended and its output is read: report once. */
static void script_finish(struct script *s)
{
	struct stage *st = s->st;
	char msg[512], *path, *exit_text;
	int code;

	if (s->finished)
		return;
	s->finished = true;
	if (st) {
		path = dir_file(s, "exit");
		exit_text = slurp(path, 400);
		free(path);
		read_outputs(s);
		s->st = NULL;
		if (exit_text && sscanf(exit_text, "exit %d", &code) == 1) {
			if (code == 0)
				stage_done(st, KPL__V1__STAGE_STATE__STAGE_STATE_SUCCEEDED, NULL);
			else if (s->cancelled)
				stage_done(st, KPL__V1__STAGE_STATE__STAGE_STATE_CANCELLED, "cancelled");
			else {
				snprintf(msg, sizeof msg, "%s exited with status %d", s->what, code);
				stage_done(st, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, msg);
			}
		} else if (exit_text && sscanf(exit_text, "signal %d", &code) == 1) {
			if (s->cancelled) {
				stage_done(st, KPL__V1__STAGE_STATE__STAGE_STATE_CANCELLED, "cancelled");
			} else {
				snprintf(msg, sizeof msg, "%s killed by signal %d (%s)", s->what,
					 code, strsignal(code));
				stage_done(st, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, msg);
			}
		} else if (exit_text && strncmp(exit_text, "error ", 6) == 0) {
			exit_text[strcspn(exit_text, "\n")] = '\0';
			snprintf(msg, sizeof msg, "%s", exit_text + 6);
			stage_done(st, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, msg);
		} else if (s->cancelled) {
			stage_done(st, KPL__V1__STAGE_STATE__STAGE_STATE_CANCELLED, "cancelled");
		} else {
			stage_done(st, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED,
				   "its process ended without reporting an exit status (killed?)");
		}
		free(exit_text);
	}
	script_close_all(s);
}

/* Turns the complete records in buf[0..n) into log events; returns the
 * bytes consumed (up to the last newline). */
static size_t emit_records(struct script *s, const char *p, size_t n)
{
	size_t used = 0;

	while (used < n) {
		const char *nl = memchr(p + used, '\n', n - used);
		const char *rec = p + used;
		size_t len;
		Kpl__V1__LogStream stream;

		if (!nl)
			break;
		len = (size_t)(nl - rec);
		used += len + 1;
		if (len == 0)
			continue;
		stream = rec[0] == '1' ? KPL__V1__LOG_STREAM__LOG_STREAM_STDOUT
		       : rec[0] == '2' ? KPL__V1__LOG_STREAM__LOG_STREAM_STDERR
				       : KPL__V1__LOG_STREAM__LOG_STREAM_SYSTEM;
		rec++;
		len--;
		if (len && rec[len - 1] == '\r')
			len--;
		stage_log_staged(s->st, stream, rec, len);
	}
	return used;
}

static void on_read(uv_fs_t *req)
{
	struct script *s = req->data;
	ssize_t n = req->result;
	size_t used = 0;
	char off[32];

	uv_fs_req_cleanup(req);
	s->reading = false;
	if (!s->st) {
		if (s->finished)
			script_close_all(s); /* abandoned while reading */
		else if (s->shim_gone)
			script_finish(s);
		return;
	}
	if (n < 0) {
		kpl_warn(LOG, "run %s stage %s: reading %s/output: %s", stage_run_id(s->st),
			 stage_name(s->st), s->dir, uv_strerror((int)n));
	} else if (n > 0) {
		used = emit_records(s, s->buf, (size_t)n);
		s->offset += used;
		/* The offset rides in the same commit as the events it covers. */
		snprintf(off, sizeof off, "%llu", (unsigned long long)s->offset);
		stage_save_resume(s->st, off);
	}
	if (n == (ssize_t)sizeof s->buf || s->reread) {
		s->reread = false;
		script_read(s);
		return;
	}
	if (s->shim_gone)
		script_finish(s);
}

static void script_read(struct script *s)
{
	uv_buf_t b = uv_buf_init(s->buf, sizeof s->buf);

	if (s->reading) {
		s->reread = true;
		return;
	}
	if (s->out_fd < 0) {
		char *path = dir_file(s, "output");
		s->out_fd = open(path, O_RDONLY | O_CLOEXEC);
		free(path);
		if (s->out_fd < 0) {
			/* No output yet (or ever): nothing to read. */
			if (s->shim_gone)
				script_finish(s);
			return;
		}
	}
	s->reading = true;
	s->req.data = s;
	uv_fs_read(s->loop, &s->req, s->out_fd, &b, 1, (int64_t)s->offset, on_read);
}

static void on_dir_change(uv_fs_event_t *h, const char *name, int events, int status)
{
	struct script *s = h->data;

	(void)name;
	(void)events;
	if (status == 0 && !s->finished)
		script_read(s);
}

/* The shim is gone: read what is left, then report. */
static void shim_ended(struct script *s)
{
	if (s->shim_gone)
		return;
	s->shim_gone = true;
	uv_timer_stop(&s->kill_timer);
	script_read(s);
}

static void on_shim_exit(uv_process_t *p, int64_t exit_status, int term_signal)
{
	struct script *s = p->data;

	if (exit_status == SHIM_EXIT_CLAIMED)
		kpl_warn(LOG, "shim for %s found its attempt already claimed", s->dir);
	(void)term_signal;
	shim_ended(s);
}

static void on_pidfd(uv_poll_t *h, int status, int events)
{
	struct script *s = h->data;

	(void)status;
	(void)events;
	uv_poll_stop(h);
	shim_ended(s);
}

static void on_kill_timer(uv_timer_t *t)
{
	struct script *s = t->data;

	/* The shim forwards SIGTERM and escalates itself; this is for a shim
	 * that does not answer. */
	if (!s->shim_gone && s->shim_pid > 0)
		kill((pid_t)s->shim_pid, SIGKILL);
}

static int start_watching(struct script *s, struct kpl_err *err)
{
	int rc = uv_fs_event_start(&s->watch, on_dir_change, s->dir, 0);

	if (rc)
		return kpl_errf(err, KPL_EIO, "cannot watch %s: %s", s->dir, uv_strerror(rc));
	return 0;
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
 * every stage, the params, the pipeline's env and the stage's env (both
 * with their templates expanded by the engine).
 */
static char **build_env(struct stage *st, const char *outputs_path)
{
	char **env = NULL;
	size_t n = 0, cap = 0, nenv, nparams;
	const char *const *names, *const *values;
	const char *const *env_names, *const *env_values;
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
	stage_env_expanded(st, &env_names, &env_values, &nenv);
	for (size_t i = 0; i < nenv; i++)
		env_set(&env, &n, &cap, env_names[i], env_values[i]);
	if (!env)
		env_push(&env, &n, &cap, kpl_strdup("KPL_EMPTY=1"));
	return env;
}

static void free_strv(char **v)
{
	for (char **p = v; p && *p; p++)
		free(*p);
	free(v);
}

static int mkdir_p(const char *path)
{
	char *p = kpl_strdup(path);
	int rc = 0;

	for (char *c = p + 1; *c && !rc; c++) {
		if (*c != '/')
			continue;
		*c = '\0';
		if (mkdir(p, 0700) && errno != EEXIST)
			rc = -errno;
		*c = '/';
	}
	if (!rc && mkdir(p, 0700) && errno != EEXIST)
		rc = -errno;
	free(p);
	return rc;
}

/* ---------------------------------------------------------------------- */
/* The kind */

static void pid_recorded(struct stage *st, int status, void *data)
{
	(void)st;
	(void)data;
	if (status)
		kpl_warn(LOG, "could not record the shim's pid: %s", kpl_strerror(status));
}

static int script_start(struct stage *st, struct kpl_err *err)
{
	const struct pl_node *cmd = stage_with_get(st, "command");
	const struct pl_node *sh = stage_with_get(st, "shell");
	char *wd = stage_expand(st, stage_with_get(st, "workdir"));
	uv_process_options_t o = { 0 };
	uv_stdio_container_t stdio[3];
	struct script *s;
	char exe[4096], grace[32], **argv, **env = NULL, *cwd = NULL, *outputs;
	size_t exe_len = sizeof exe, argc = 0;
	int rc;

	if ((rc = uv_exepath(exe, &exe_len)) != 0) {
		free(wd);
		return kpl_errf(err, KPL_EIO, "cannot find kpld's own executable: %s",
				uv_strerror(rc));
	}
	s = script_new(st, attempt_dir(st));
	if ((rc = mkdir_p(s->dir)) != 0) {
		kpl_errf(err, KPL_EIO, "cannot create %s: %s", s->dir, strerror(-rc));
		s->st = NULL;
		script_close_all(s);
		free(wd);
		return KPL_EIO;
	}
	/* kpld __shim DIR GRACE -- argv... */
	argv = kpl_calloc((cmd ? cmd->n : 3) + 6, sizeof *argv);
	argv[argc++] = kpl_strdup(exe);
	argv[argc++] = kpl_strdup(SHIM_ARGV1);
	argv[argc++] = kpl_strdup(s->dir);
	snprintf(grace, sizeof grace, "%d", SCRIPT_KILL_GRACE_MS);
	argv[argc++] = kpl_strdup(grace);
	argv[argc++] = kpl_strdup("--");
	if (cmd) {
		for (size_t i = 0; i < cmd->n; i++)
			argv[argc++] = stage_expand(st, cmd->items[i]);
		s->what = kpl_strdup(argv[5]);
	} else {
		argv[argc++] = kpl_strdup("/bin/sh");
		argv[argc++] = kpl_strdup("-c");
		argv[argc++] = stage_expand(st, sh);
		s->what = kpl_strdup("shell script");
	}
	if (wd && wd[0] == '/')
		cwd = kpl_strdup(wd);
	else if (wd)
		cwd = kpl_asprintf("%s/%s", stage_workspace(st), wd);
	else
		cwd = kpl_strdup(stage_workspace(st));
	outputs = dir_file(s, "outputs");
	env = build_env(st, outputs);
	free(outputs);

	if ((rc = start_watching(s, err)) != 0)
		goto fail;
	stdio[0].flags = UV_IGNORE;
	stdio[1].flags = UV_IGNORE;
	stdio[2].flags = UV_INHERIT_FD; /* the shim's own complaints, to kpld's log */
	stdio[2].data.fd = 2;
	o.exit_cb = on_shim_exit;
	o.file = argv[0];
	o.args = argv;
	o.env = env;
	o.cwd = cwd;
	o.stdio = stdio;
	o.stdio_count = 3;
	/* Its own session: it outlives kpld, and kpld's signals do not reach it. */
	o.flags = UV_PROCESS_DETACHED;
	rc = uv_spawn(s->loop, &s->proc, &o);
	s->have_proc = true;
	s->open_handles++;
	if (rc) {
		if (rc == UV_ENOENT)
			kpl_errf(err, KPL_EINVAL, "cannot run in %s: no such directory", cwd);
		else
			kpl_errf(err, KPL_EIO, "cannot start the shim: %s", uv_strerror(rc));
		rc = KPL_EINVAL;
		goto fail;
	}
	s->shim_pid = s->proc.pid;
	stage_set_impl(st, s);
	stage_record_resume(st, s->shim_pid, script_pid_start_time(s->shim_pid), "0",
			    pid_recorded, NULL);
	kpl_debug(LOG, "run %s stage %s: shim pid %d runs %s", stage_run_id(st),
		  stage_name(st), s->proc.pid, s->what);
	rc = 0;
	goto out;
fail:
	s->st = NULL;
	script_close_all(s);
out:
	free_strv(argv);
	free_strv(env);
	free(cwd);
	free(wd);
	return rc;
}

static void script_cancel(struct stage *st)
{
	struct script *s = stage_impl(st);

	if (!s || s->shim_gone)
		return;
	s->cancelled = true;
	if (s->shim_pid > 0)
		kill((pid_t)s->shim_pid, SIGTERM);
	uv_timer_start(&s->kill_timer, on_kill_timer, SCRIPT_SHIM_KILL_MS, 0);
}

/* kpld is stopping: leave the shim running for the next kpld to re-attach. */
static void script_abandon(struct stage *st)
{
	struct script *s = stage_impl(st);

	if (!s)
		return;
	s->st = NULL;
	s->finished = true;
	if (!s->reading)
		script_close_all(s); /* else on_read closes it */
}

/* Tries to take the lock without waiting: 1 if the shim holds it (alive),
 * 0 if free, -1 if there is no lock file. */
static int lock_held(const char *path, int64_t *pid)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC), held;
	char buf[32] = { 0 };

	if (fd < 0)
		return -1;
	if (read(fd, buf, sizeof buf - 1) > 0)
		*pid = atoll(buf);
	held = flock(fd, LOCK_SH | LOCK_NB) != 0 && errno == EWOULDBLOCK;
	close(fd);
	return held;
}

/*
 * After a restart: find the attempt's shim again. If it never got to start
 * the command, claim the attempt so it never will, and let the engine
 * retry. If it finished, read the rest and report. If it runs, follow it.
 */
static int script_resume(struct stage *st, struct kpl_err *err)
{
	struct script *s;
	char *lock, *exit_path;
	int64_t pid = 0;
	uint64_t start;
	const char *resume;
	int fd, held;

	s = script_new(st, attempt_dir(st));
	stage_resume_info(st, &pid, &start, &resume);
	s->offset = strtoull(resume, NULL, 10);
	s->what = kpl_strdup("the command");
	lock = dir_file(s, "lock");
	exit_path = dir_file(s, "exit");
	mkdir_p(s->dir);
	fd = open(lock, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0600);
	if (fd >= 0) {
		/* Claimed: a shim that was forked but not yet this far exits. */
		close(fd);
		/* KPL_ENOTFOUND tells the engine nothing ran: start afresh. */
		kpl_errf(err, KPL_ENOTFOUND, "its process had not started");
		goto fail;
	}
	held = lock_held(lock, &pid);
	if (held == 1) {
		s->shim_pid = pid;
		s->pidfd = (int)syscall(SYS_pidfd_open, (pid_t)pid, 0);
		/* The pid came from a lock still held, so it is the shim's. */
		if (s->pidfd < 0 || lock_held(lock, &pid) != 1) {
			if (s->pidfd < 0 && errno != ESRCH) {
				kpl_errf(err, KPL_EIO, "cannot follow process %lld: %s",
					 (long long)pid, strerror(errno));
				goto fail;
			}
			s->shim_gone = true; /* it ended just now */
		} else {
			uv_poll_init(s->loop, &s->pidpoll, s->pidfd);
			s->have_pidpoll = true;
			s->open_handles++;
			uv_poll_start(&s->pidpoll, UV_READABLE, on_pidfd);
		}
	} else if (access(exit_path, F_OK) == 0) {
		s->shim_gone = true; /* finished while kpld was away */
	} else {
		kpl_errf(err, KPL_ESTATE, "its process ended without reporting (killed?)");
		goto fail;
	}
	if (start_watching(s, err))
		goto fail;
	stage_set_impl(st, s);
	kpl_info(LOG, "run %s stage %s: re-attached to %s at output offset %llu%s",
		 stage_run_id(st), stage_name(st), s->dir, (unsigned long long)s->offset,
		 s->shim_gone ? " (it has finished)" : "");
	script_read(s);
	free(lock);
	free(exit_path);
	return 0;
fail:
	s->st = NULL;
	script_close_all(s);
	free(lock);
	free(exit_path);
	return err->code ? err->code : KPL_ESTATE;
}

const struct stage_kind script_kind = {
	.name = "script",
	.check_with = script_check_with,
	.start = script_start,
	.cancel = script_cancel,
	.resume = script_resume,
	.abandon = script_abandon,
};
