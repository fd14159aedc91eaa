#define _GNU_SOURCE /* O_PATH */
/*
 * proc.c - a stage's command run through the shim, followed durably (see
 * proc.h). Factored out of the script kind, whose semantics it keeps: a
 * kpld that stops or crashes and starts again re-attaches to the same
 * process, loses no line, repeats none, and never runs the command twice.
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
#include <limits.h>
#include <spawn.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "stages/proc.h"
#include "stages/shim.h"
#include "stages/spawner.h"

#define LOG "proc"
#define PROC_KILL_GRACE_MS 5000
/* kpld's own SIGKILL of the shim, this long after the shim's grace. */
#define PROC_SHIM_KILL_EXTRA_MS 5000
#define PROC_TAIL_BYTES 65536
#define PROC_LOCKPOLL_MS 100 /* following a shim without pidfd_open */
/* What kpld writes in a lock it takes for an attempt it gives up. */
#define PROC_CLAIMED "claimed by kpld\n"

extern char **environ;

/* One command. Freed when its last handle has closed. */
struct proc {
	struct stage *st;       /* NULL once reported or abandoned */
	uv_loop_t *loop;
	const struct proc_ops *ops;
	void *data;
	char *dir;              /* owned */
	char *prefix;           /* resume prefix (owned) */
	int64_t shim_pid;
	int grace_ms;
	uint64_t offset;        /* bytes of DIR/output delivered */
	uv_process_t proc;      /* the shim, when this kpld started it */
	bool have_proc;
	bool direct;            /* this kpld posix_spawned the shim, not yet reaped */
	bool spawning;          /* asked the spawner; its answer (on_spawned) pending */
	bool spawner_made_dir;  /* ... which makes DIR, so nothing watches it yet */
	uv_poll_t pidpoll;      /* the shim, when attached to (pidfd) */
	int pidfd;
	bool have_pidpoll;
	uv_timer_t lockpoll;    /* the shim's lock, when there is no pidfd_open */
	bool have_lockpoll;
	uv_fs_event_t watch;    /* changes in dir */
	uv_timer_t kill_timer;
	uv_timer_t kick;        /* the first read after attaching, off the stack */
	uv_fs_t req;
	int out_fd;
	bool reading;
	bool reread;            /* a change came while reading */
	bool shim_gone;
	bool cancelled;
	bool finished;
	bool closed;            /* proc_close_all ran */
	int open_handles;
	char buf[65536];
};

void *proc_data(struct proc *p) { return p->data; }
struct stage *proc_stage(struct proc *p) { return p->st; }
const char *proc_dir(struct proc *p) { return p->dir; }

/* ---------------------------------------------------------------------- */
/* Files */

int proc_mkdir_p(const char *path)
{
	/* The shim's: one mkdir when only the last directory is missing. */
	return shim_mkdir_p(path) == 0 ? 0 : -errno;
}

static char *dir_file(const struct proc *p, const char *name)
{
	return kpl_asprintf("%s/%s", p->dir, name);
}

/* Reads a small file whole; NULL if it is not there. */
static char *slurp(const char *path, size_t max)
{
	int fd = kpl_open_ws(path, O_RDONLY | O_CLOEXEC);
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

/* The last whole line of stream in the output's tail, or with prefix the
 * first line there that starts with it. */
static char *tail_line(struct proc *p, Kpl__V1__LogStream stream, const char *prefix)
{
	char tag = stream == KPL__V1__LOG_STREAM__LOG_STREAM_STDERR ? '2' : '1';
	size_t plen = prefix ? strlen(prefix) : 0;
	char *path = dir_file(p, "output"), *buf, *end, *line = NULL;
	int fd = kpl_open_ws(path, O_RDONLY | O_CLOEXEC);
	struct stat sb;
	off_t from;
	ssize_t n;

	free(path);
	if (fd < 0)
		return NULL;
	if (fstat(fd, &sb)) {
		close(fd);
		return NULL;
	}
	from = sb.st_size > PROC_TAIL_BYTES ? sb.st_size - PROC_TAIL_BYTES : 0;
	buf = kpl_malloc(PROC_TAIL_BYTES + 1);
	n = pread(fd, buf, PROC_TAIL_BYTES, from);
	close(fd);
	if (n <= 0) {
		free(buf);
		return NULL;
	}
	buf[n] = '\0';
	/* Records end with '\n'; a record starts after one (or at offset 0). */
	end = buf + n;
	while (end > buf) {
		char *start = end - 1; /* the '\n' ending this record, or a partial */
		while (start > buf && start[-1] != '\n')
			start--;
		if ((start > buf || from == 0) && end[-1] == '\n' && start[0] == tag &&
		    end - start > 2 &&
		    (!prefix || ((size_t)(end - start) - 2 >= plen &&
				 memcmp(start + 1, prefix, plen) == 0))) {
			size_t len = (size_t)(end - start) - 2;
			if (len && start[len] == '\r')
				len--;
			free(line); /* with a prefix, an earlier match is wanted */
			line = kpl_malloc(len + 1);
			memcpy(line, start + 1, len);
			line[len] = '\0';
			if (!prefix)
				break;
		}
		end = start;
	}
	free(buf);
	return line;
}

char *proc_last_line(struct proc *p, Kpl__V1__LogStream stream)
{
	return tail_line(p, stream, NULL);
}

char *proc_first_line_with(struct proc *p, Kpl__V1__LogStream stream, const char *prefix)
{
	return tail_line(p, stream, prefix);
}

/* ---------------------------------------------------------------------- */
/* Lifetime */

/* One reference fewer: a handle closed, or the spawner's answer came. */
static void proc_unref(struct proc *p)
{
	if (--p->open_handles == 0) {
		if (p->out_fd >= 0)
			close(p->out_fd);
		if (p->pidfd >= 0)
			close(p->pidfd);
		free(p->dir);
		free(p->prefix);
		free(p);
	}
}

static void proc_closed(uv_handle_t *h)
{
	proc_unref(h->data);
}

static void proc_close_all(struct proc *p)
{
	if (p->closed)
		return;
	p->closed = true;
	if (p->have_proc)
		uv_close((uv_handle_t *)&p->proc, proc_closed);
	if (p->have_pidpoll)
		uv_close((uv_handle_t *)&p->pidpoll, proc_closed);
	if (p->have_lockpoll)
		uv_close((uv_handle_t *)&p->lockpoll, proc_closed);
	uv_close((uv_handle_t *)&p->watch, proc_closed);
	uv_close((uv_handle_t *)&p->kill_timer, proc_closed);
	uv_close((uv_handle_t *)&p->kick, proc_closed);
	p->have_proc = p->have_pidpoll = p->have_lockpoll = false;
}

static struct proc *proc_new(struct stage *st, const char *dir, const char *prefix,
			     const struct proc_ops *ops, void *data)
{
	struct proc *p = kpl_calloc(1, sizeof *p);

	p->st = st;
	p->loop = stage_loop(st);
	p->ops = ops;
	p->data = data;
	p->dir = kpl_strdup(dir);
	p->prefix = kpl_strdup(prefix ? prefix : "");
	p->grace_ms = PROC_KILL_GRACE_MS;
	p->out_fd = -1;
	p->pidfd = -1;
	uv_fs_event_init(p->loop, &p->watch);
	uv_timer_init(p->loop, &p->kill_timer);
	uv_timer_init(p->loop, &p->kick);
	p->watch.data = p->kill_timer.data = p->kick.data = p->proc.data = p;
	p->pidpoll.data = p->lockpoll.data = p;
	p->open_handles = 3;
	return p;
}

/* ---------------------------------------------------------------------- */
/* Following the output file */

static void proc_read(struct proc *p);

/* The shim has ended and its output is read: report once. */
static void proc_finish(struct proc *p)
{
	struct proc_exit e = { .cancelled = p->cancelled };
	char *path, *exit_text;

	if (p->finished)
		return;
	p->finished = true;
	if (p->st) {
		path = dir_file(p, "exit");
		exit_text = slurp(path, 400);
		free(path);
		if (exit_text && sscanf(exit_text, "exit %d", &e.code) == 1) {
			e.how = PROC_EXITED;
		} else if (exit_text && sscanf(exit_text, "signal %d", &e.code) == 1) {
			e.how = PROC_SIGNALED;
		} else if (exit_text && strncmp(exit_text, "error ", 6) == 0) {
			exit_text[strcspn(exit_text, "\n")] = '\0';
			e.how = PROC_ERROR;
			e.error = exit_text + 6;
		} else {
			e.how = PROC_LOST;
		}
		p->ops->exit(p, &e);
		p->st = NULL;
		free(exit_text);
	}
	proc_close_all(p);
}

/* A record's stream by its tag (shim.c): '1'/'2' a whole line, + 2 the
 * first piece of a longer one, + 4 a middle piece, + 6 the last. */
static Kpl__V1__LogStream record_stream(char tag, unsigned *cut)
{
	static const unsigned cuts[] = { 0, STAGE_LOG_CUT_END,
		STAGE_LOG_CUT_START | STAGE_LOG_CUT_END, STAGE_LOG_CUT_START };

	*cut = 0;
	if (tag < '1' || tag > '8')
		return KPL__V1__LOG_STREAM__LOG_STREAM_SYSTEM;
	*cut = cuts[(tag - '1') / 2];
	return (tag - '1') % 2 ? KPL__V1__LOG_STREAM__LOG_STREAM_STDERR
			       : KPL__V1__LOG_STREAM__LOG_STREAM_STDOUT;
}

/* Hands the complete records in p[0..n) to the kind; returns the bytes
 * consumed (up to the last newline). */
static size_t emit_records(struct proc *pr, const char *p, size_t n)
{
	size_t used = 0;

	while (used < n) {
		const char *nl = memchr(p + used, '\n', n - used);
		const char *rec = p + used;
		size_t len;
		unsigned cut;
		Kpl__V1__LogStream stream;

		if (!nl)
			break;
		len = (size_t)(nl - rec);
		used += len + 1;
		if (len == 0)
			continue;
		stream = record_stream(rec[0], &cut);
		rec++;
		len--;
		if (len && rec[len - 1] == '\r' && !(cut & STAGE_LOG_CUT_END))
			len--;
		if (pr->ops->line)
			pr->ops->line(pr, stream, rec, len);
		else
			stage_log_piece_staged(pr->st, stream, rec, len, cut);
	}
	return used;
}

static void on_read(uv_fs_t *req)
{
	struct proc *p = req->data;
	ssize_t n = req->result;
	size_t used = 0;

	uv_fs_req_cleanup(req);
	p->reading = false;
	if (!p->st) {
		if (p->finished)
			proc_close_all(p); /* abandoned while reading */
		else if (p->shim_gone)
			proc_finish(p);
		return;
	}
	if (n < 0) {
		kpl_warn(LOG, "run %s stage %s: reading %s/output: %s", stage_run_id(p->st),
			 stage_name(p->st), p->dir, uv_strerror((int)n));
	} else if (n > 0) {
		char *resume;

		used = emit_records(p, p->buf, (size_t)n);
		p->offset += used;
		/* The offset rides in the same commit as the events it covers. */
		resume = kpl_asprintf("%s%llu", p->prefix, (unsigned long long)p->offset);
		stage_save_resume(p->st, resume);
		free(resume);
	}
	if (n == (ssize_t)sizeof p->buf || p->reread) {
		p->reread = false;
		proc_read(p);
		return;
	}
	if (p->shim_gone)
		proc_finish(p);
}

static void proc_read(struct proc *p)
{
	uv_buf_t b = uv_buf_init(p->buf, sizeof p->buf);

	if (p->reading) {
		p->reread = true;
		return;
	}
	/* Nothing recorded yet: a read would save an offset that the record
	 * of the start then sets back to 0. on_spawned reads. */
	if (p->spawning)
		return;
	if (p->out_fd < 0) {
		char *path = dir_file(p, "output");
		p->out_fd = kpl_open_ws(path, O_RDONLY | O_CLOEXEC);
		free(path);
		if (p->out_fd < 0) {
			/* No output yet (or ever): nothing to read. */
			if (p->shim_gone)
				proc_finish(p);
			return;
		}
	}
	p->reading = true;
	p->req.data = p;
	uv_fs_read(p->loop, &p->req, p->out_fd, &b, 1, (int64_t)p->offset, on_read);
}

static void on_dir_change(uv_fs_event_t *h, const char *name, int events, int status)
{
	struct proc *p = h->data;

	(void)name;
	(void)events;
	if (status == 0 && !p->finished)
		proc_read(p);
}

/* The shim is gone: read what is left, then report. */
static void shim_ended(struct proc *p)
{
	if (p->shim_gone)
		return;
	p->shim_gone = true;
	uv_timer_stop(&p->kill_timer);
	proc_read(p);
}

static void on_shim_exit(uv_process_t *h, int64_t exit_status, int term_signal)
{
	struct proc *p = h->data;

	if (exit_status == SHIM_EXIT_CLAIMED)
		kpl_warn(LOG, "shim for %s found its attempt already claimed", p->dir);
	(void)term_signal;
	shim_ended(p);
}

static void reap_direct(struct proc *p);

static void on_pidfd(uv_poll_t *h, int status, int events)
{
	struct proc *p = h->data;

	(void)status;
	(void)events;
	uv_poll_stop(h);
	reap_direct(p);
	shim_ended(p);
}

static int lock_held(const char *path, int64_t *pid, bool *claimed);

/* Without pidfd_open (Linux before 5.3, valgrind): the shim holds its
 * lock until it ends, so a lock no longer held is a shim gone. */
static void on_lockpoll(uv_timer_t *t)
{
	struct proc *p = t->data;
	char *lock = dir_file(p, "lock");
	int64_t pid = 0;

	if (lock_held(lock, &pid, NULL) != 1) {
		uv_timer_stop(t);
		shim_ended(p);
	}
	free(lock);
}

static void on_kill_timer(uv_timer_t *t)
{
	struct proc *p = t->data;

	/* The shim forwards SIGTERM and escalates itself; this is for a shim
	 * that does not answer. */
	if (!p->shim_gone && p->shim_pid > 0)
		kill((pid_t)p->shim_pid, SIGKILL);
}

static void on_kick(uv_timer_t *t)
{
	struct proc *p = t->data;

	if (p->finished)
		uv_timer_stop(t); /* repeating when there is no watch (watch_late) */
	else
		proc_read(p);
}

/* Reads what the shim wrote while nobody followed, from the loop: the
 * kind's exit callback never runs inside proc_start or proc_resume. */
static void kick(struct proc *p)
{
	uv_timer_start(&p->kick, on_kick, 0, 0);
}

static int start_watching(struct proc *p, struct kpl_err *err)
{
	int rc = uv_fs_event_start(&p->watch, on_dir_change, p->dir, 0);

	if (rc)
		return kpl_errf(err, KPL_EIO, "cannot watch %s: %s", p->dir, uv_strerror(rc));
	return 0;
}

/* ---------------------------------------------------------------------- */
/* Environment */

static void strv_push(char ***v, char *entry)
{
	size_t n = 0;

	while (*v && (*v)[n])
		n++;
	/* A few dozen entries: growing by one each time costs nothing here. */
	*v = kpl_realloc(*v, (n + 2) * sizeof **v);
	(*v)[n] = entry;
	(*v)[n + 1] = NULL;
}

void proc_env_set(char ***env, const char *name, const char *value)
{
	size_t len = strlen(name);

	for (char **e = *env; e && *e; e++) {
		if (strncmp(*e, name, len) == 0 && (*e)[len] == '=') {
			free(*e);
			*e = kpl_asprintf("%s=%s", name, value);
			return;
		}
	}
	strv_push(env, kpl_asprintf("%s=%s", name, value));
}

void proc_strv_free(char **v)
{
	for (char **p = v; p && *p; p++)
		free(*p);
	free(v);
}

/* KPL_PARAM_ + the name upper-cased, other characters as '_'. */
static char *param_env_name(const char *name)
{
	char *s = kpl_asprintf("KPL_PARAM_%s", name);

	for (char *p = s + strlen("KPL_PARAM_"); *p; p++)
		*p = isalnum((unsigned char)*p) ? (char)toupper((unsigned char)*p) : '_';
	return s;
}

char **proc_stage_env(struct stage *st, const char *outputs_path)
{
	return proc_stage_env_at(st, outputs_path, stage_workspace(st), true);
}

char **proc_stage_env_at(struct stage *st, const char *outputs_path, const char *workspace,
			 bool inherit)
{
	char **env = NULL;
	size_t nenv, nparams;
	const char *const *names, *const *values;
	const char *const *env_names, *const *env_values;
	char attempt[16];

	for (char **e = environ; inherit && e && *e; e++)
		if (strncmp(*e, "KPL_", 4) != 0)
			strv_push(&env, kpl_strdup(*e));
	proc_env_set(&env, "KPL_RUN_ID", stage_run_id(st));
	proc_env_set(&env, "KPL_STAGE", stage_name(st));
	snprintf(attempt, sizeof attempt, "%u", stage_attempt(st));
	proc_env_set(&env, "KPL_ATTEMPT", attempt);
	proc_env_set(&env, "KPL_WORKSPACE", workspace);
	if (outputs_path)
		proc_env_set(&env, "KPL_OUTPUTS", outputs_path);
	stage_params(st, &names, &values, &nparams);
	for (size_t i = 0; i < nparams; i++) {
		char *k = param_env_name(names[i]);
		proc_env_set(&env, k, values[i]);
		free(k);
	}
	stage_env_expanded(st, &env_names, &env_values, &nenv);
	for (size_t i = 0; i < nenv; i++)
		proc_env_set(&env, env_names[i], env_values[i]);
	/* Never NULL: uv_spawn would hand the child kpld's own environment. */
	if (!env)
		strv_push(&env, kpl_strdup("KPL_EMPTY=1"));
	return env;
}

/* ---------------------------------------------------------------------- */
/* Start, attach, resume */

static void pid_recorded(struct stage *st, int status, void *data)
{
	(void)st;
	(void)data;
	if (status)
		kpl_warn(LOG, "could not record the shim's pid: %s", kpl_strerror(status));
}

/* Tries to take the lock without waiting: 1 if the shim holds it (alive),
 * 0 if free, -1 if there is no lock file. *pid is the pid written inside,
 * 0 for none; *claimed says kpld wrote it. */
static int lock_held(const char *path, int64_t *pid, bool *claimed)
{
	int fd = kpl_open_ws(path, O_RDONLY | O_CLOEXEC), held;
	char buf[32] = { 0 };

	if (fd < 0)
		return -1;
	if (read(fd, buf, sizeof buf - 1) > 0)
		*pid = atoll(buf);
	if (claimed)
		*claimed = strcmp(buf, PROC_CLAIMED) == 0;
	held = flock(fd, LOCK_SH | LOCK_NB) != 0 && errno == EWOULDBLOCK;
	close(fd);
	return held;
}

/* True if pid runs `kpld __shim DIR ...` (its /proc cmdline). */
static bool is_shim_of(int64_t pid, const char *dir)
{
	char path[64], buf[8192], a[PATH_MAX], b[PATH_MAX];
	const char *named;
	size_t n, a1;
	FILE *f;

	snprintf(path, sizeof path, "/proc/%lld/cmdline", (long long)pid);
	if (pid <= 0 || !(f = fopen(path, "r")))
		return pid > 0; /* gone already: pidfd_open says so next */
	n = fread(buf, 1, sizeof buf - 1, f);
	fclose(f);
	if (n == 0)
		return true; /* exiting (no memory left to show): the lock says next */
	buf[n] = '\0';
	a1 = strlen(buf) + 1;
	if (a1 >= n || strcmp(buf + a1, SHIM_ARGV1) != 0 || a1 + strlen(SHIM_ARGV1) + 1 >= n)
		return false;
	named = buf + a1 + strlen(SHIM_ARGV1) + 1;
	/* The same directory, however --data-dir was spelt then and now. */
	return strcmp(named, dir) == 0 ||
	       (realpath(named, a) && realpath(dir, b) && strcmp(a, b) == 0);
}

/*
 * Follows the shim of p->dir, which has claimed its lock (or ended):
 * KPL_ENOTFOUND when kpld claimed it instead, KPL_ESTATE when the shim ended
 * without reporting, KPL_EIO when it cannot be followed.
 */
static int attach(struct proc *p, struct kpl_err *err)
{
	char *lock = dir_file(p, "lock"), *exit_path = dir_file(p, "exit");
	int64_t pid = 0;
	bool claimed = false;
	int held, rc = 0;

	held = lock_held(lock, &pid, &claimed);
	if (claimed) {
		/* A kpld gave the attempt up before (and then stopped before the
		 * restart it asked for was committed): still nothing ran. */
		rc = kpl_errf(err, KPL_ENOTFOUND, "its process had not started");
		goto out;
	}
	if (held == 1 && !is_shim_of(pid, p->dir)) {
		/* The lock is in the workspace, which the command can write: a
		 * pid there that is not this attempt's shim is never signalled. */
		rc = kpl_errf(err, KPL_ESTATE, "its lock names process %lld, which is not "
			      "its shim", (long long)pid);
		goto out;
	}
	if (held == 1) {
		p->shim_pid = pid;
		p->pidfd = (int)syscall(SYS_pidfd_open, (pid_t)pid, 0);
		/* The pid came from a lock still held, so it is the shim's. */
		if (p->pidfd < 0 && errno == ENOSYS) {
			uv_timer_init(p->loop, &p->lockpoll);
			p->have_lockpoll = true;
			p->open_handles++;
			uv_timer_start(&p->lockpoll, on_lockpoll, PROC_LOCKPOLL_MS,
				       PROC_LOCKPOLL_MS);
		} else if (p->pidfd < 0 || lock_held(lock, &pid, NULL) != 1) {
			if (p->pidfd < 0 && errno != ESRCH) {
				rc = kpl_errf(err, KPL_EIO, "cannot follow process %lld: %s",
					      (long long)pid, strerror(errno));
				goto out;
			}
			p->shim_gone = true; /* it ended just now */
		} else {
			uv_poll_init(p->loop, &p->pidpoll, p->pidfd);
			p->have_pidpoll = true;
			p->open_handles++;
			uv_poll_start(&p->pidpoll, UV_READABLE, on_pidfd);
		}
	} else if (access(exit_path, F_OK) == 0) {
		p->shim_gone = true; /* finished while kpld was away */
	} else {
		rc = kpl_errf(err, KPL_ESTATE, "its process ended without reporting (killed?)");
		goto out;
	}
	rc = start_watching(p, err);
out:
	free(lock);
	free(exit_path);
	return rc;
}

/*
 * An attempt's directory is in the workspace, where a stage's command can
 * put a symlink: kpld and its shim never follow one there. 1 when dir is a
 * directory reached without a symlink, 0 when it does not exist, else
 * KPL_ESTATE with err saying so.
 */
static int dir_state(const char *dir, struct kpl_err *err)
{
	int fd = kpl_open_ws(dir, O_PATH | O_DIRECTORY | O_CLOEXEC);

	if (fd >= 0) {
		close(fd);
		return 1;
	}
	if (errno == ENOENT)
		return 0;
	return kpl_errf(err, KPL_ESTATE, "its directory %s is not a directory of the "
			"workspace (%s): a symlink put there is never followed", dir,
			errno == ELOOP || errno == EXDEV ? "a symlink on the way" : strerror(errno));
}

/* Takes dir's lock for kpld if no shim has: 1 taken (no shim will ever run
 * there), 0 a shim (or kpld) has it, negative on error. Like the shim's,
 * the lock is written aside and then linked in (which fails like O_EXCL if
 * one exists): a kpld killed between creating it and writing it would
 * leave an empty lock, which reads as a shim that died without reporting. */
static int claim(const char *dir)
{
	char *tmp = kpl_asprintf("%s/lock.kpld", dir), *lock = kpl_asprintf("%s/lock", dir);
	int fd, rc;

	/* Left by a kpld killed here before, or planted by a stage: unlink
	 * takes a symlink itself, and O_EXCL never follows one. */
	unlink(tmp);
	fd = open(tmp, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC | O_NOFOLLOW, 0600);
	if (fd < 0) {
		rc = -errno;
		goto out;
	}
	if (write(fd, PROC_CLAIMED, strlen(PROC_CLAIMED)) < 0)
		kpl_warn(LOG, "cannot write the claim in %s: %s", dir, strerror(errno));
	close(fd);
	rc = link(tmp, lock) == 0 ? 1 : errno == EEXIST ? 0 : -errno;
	unlink(tmp);
out:
	free(tmp);
	free(lock);
	return rc;
}

/* ---------------------------------------------------------------------- */
/* Stage isolation */

/* Set once at startup (proc_set_sandbox), read by every spawn after. */
static struct proc_sandbox sandbox = { .mode = PROC_SANDBOX_BWRAP, .bwrap = "bwrap" };

static const char **strv_copy(const char *const *v)
{
	size_t n = 0;
	const char **c;

	while (v && v[n])
		n++;
	c = kpl_calloc(n + 1, sizeof *c);
	for (size_t i = 0; i < n; i++)
		c[i] = kpl_strdup(v[i]);
	return c;
}

void proc_set_sandbox(const struct proc_sandbox *sb)
{
	/* Kept for the life of the process: set once, before any stage. */
	sandbox.mode = sb->mode;
	sandbox.bwrap = kpl_strdup(sb->bwrap ? sb->bwrap : "bwrap");
	sandbox.data_dir = sb->data_dir ? kpl_strdup(sb->data_dir) : NULL;
	sandbox.hide = strv_copy(sb->hide);
	sandbox.bind = strv_copy(sb->bind);
}

const struct proc_sandbox *proc_sandbox(void)
{
	return &sandbox;
}

char *proc_find_program(const char *prog, const char *path)
{
	const char *p = path && *path ? path : "/usr/local/bin:/usr/bin:/bin";

	if (strchr(prog, '/'))
		return access(prog, X_OK) == 0 ? kpl_strdup(prog) : NULL;
	while (*p) {
		size_t len = strcspn(p, ":");
		char *cand = kpl_asprintf("%.*s/%s", (int)len, len ? p : ".", prog);

		if (access(cand, X_OK) == 0)
			return cand;
		free(cand);
		p += len;
		if (*p == ':')
			p++;
	}
	errno = ENOENT;
	return NULL;
}

static const char *env_get(char *const *env, const char *name)
{
	size_t len = strlen(name);

	for (char *const *e = env; e && *e; e++)
		if (strncmp(*e, name, len) == 0 && (*e)[len] == '=')
			return *e + len + 1;
	return NULL;
}

static void argv_add(char ***v, size_t *n, size_t *cap, const char *s)
{
	if (*n + 2 > *cap) {
		*cap = *cap ? *cap * 2 : 64;
		*v = kpl_realloc(*v, *cap * sizeof **v);
	}
	(*v)[(*n)++] = kpl_strdup(s);
	(*v)[*n] = NULL;
}

static void argv_add3(char ***v, size_t *n, size_t *cap, const char *a, const char *b,
		      const char *c)
{
	argv_add(v, n, cap, a);
	argv_add(v, n, cap, b);
	if (c)
		argv_add(v, n, cap, c);
}

/*
 * bwrap's argv around spec's command (malloc'd strv), or NULL with err set
 * when the stage cannot be isolated as configured. The mounts, in order
 * (later ones cover earlier ones): the whole system read-only, a /dev and
 * /proc of the sandbox's own, a private /tmp, the operator's --sandbox-bind
 * paths read-write, an empty read-only DATA_DIR, the hidden paths, then the
 * run's workspace read-write at its own path. No new privileges, no
 * capabilities, own pid/ipc/uts namespaces; the network is the host's.
 */
static char **sandbox_argv(struct proc *p, const struct proc_spec *spec,
			   struct kpl_err *err)
{
	const char *path = env_get(spec->env, "PATH");
	char *bwrap, ws[PATH_MAX], cwd[PATH_MAX], **v = NULL;
	size_t n = 0, cap = 0;
	struct stat sb;

	if (!(bwrap = proc_find_program(sandbox.bwrap, path ? path : getenv("PATH")))) {
		kpl_errf(err, KPL_EINVAL, "stage isolation: cannot run %s: %s; install "
			 "bubblewrap, or start kpld with --sandbox none to run stages "
			 "unconfined (docs/security.md)", sandbox.bwrap, strerror(errno));
		return NULL;
	}
	if (!realpath(stage_workspace(p->st), ws) || !realpath(spec->cwd, cwd)) {
		kpl_errf(err, KPL_EINVAL, "cannot run in %s: %s", spec->cwd, strerror(errno));
		free(bwrap);
		return NULL;
	}
	argv_add(&v, &n, &cap, bwrap);
	free(bwrap);
	/* --die-with-parent ties the sandbox to bwrap's outer process, the
	 * shim's child, not to kpld: the command still outlives kpld. */
	argv_add3(&v, &n, &cap, "--die-with-parent", "--new-session", "--unshare-pid");
	argv_add3(&v, &n, &cap, "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try");
	if (geteuid() == 0 && spec->profile != PROC_PROFILE_BUILDAH)
		argv_add3(&v, &n, &cap, "--cap-drop", "ALL", NULL);
	argv_add3(&v, &n, &cap, "--ro-bind", "/", "/");
	argv_add3(&v, &n, &cap, "--dev", "/dev", NULL);
	argv_add3(&v, &n, &cap, "--proc", "/proc", NULL);
	argv_add3(&v, &n, &cap, "--tmpfs", "/tmp", NULL);
	if (spec->profile == PROC_PROFILE_BUILDAH) {
		/* buildah's locks and big temporary files. */
		argv_add3(&v, &n, &cap, "--tmpfs", "/run", NULL);
		argv_add3(&v, &n, &cap, "--tmpfs", "/var/tmp", NULL);
	}
	for (const char *const *b = sandbox.bind; b && *b; b++)
		argv_add3(&v, &n, &cap, "--bind-try", *b, *b);
	if (sandbox.data_dir)
		argv_add3(&v, &n, &cap, "--tmpfs", sandbox.data_dir, NULL);
	for (const char *const *h = sandbox.hide; h && *h; h++) {
		if (stat(*h, &sb) != 0)
			continue;
		if (S_ISDIR(sb.st_mode))
			argv_add3(&v, &n, &cap, "--tmpfs", *h, NULL);
		else
			argv_add3(&v, &n, &cap, "--ro-bind", "/dev/null", *h);
	}
	argv_add3(&v, &n, &cap, "--bind", ws, ws);
	if (spec->profile == PROC_PROFILE_BUILDAH && sandbox.data_dir) {
		/* Its storage, shared by every run's builds (build_local.c). */
		char *store = kpl_asprintf("%s/buildah", sandbox.data_dir);
		proc_mkdir_p(store);
		argv_add3(&v, &n, &cap, "--bind", store, store);
		free(store);
	}
	if (sandbox.data_dir)
		argv_add3(&v, &n, &cap, "--remount-ro", sandbox.data_dir, NULL);
	argv_add3(&v, &n, &cap, "--chdir", cwd, NULL);
	argv_add3(&v, &n, &cap, "--info-fd", "3", "--");
	for (size_t i = 0; spec->argv[i]; i++)
		argv_add(&v, &n, &cap, spec->argv[i]);
	return v;
}

/*
 * The program the shim runs as: kpl-shim beside kpld's own executable when
 * it is there (libc only: its exec is a fraction of kpld's), else kpld
 * itself; both take the same `__shim` argv. Looked up once; loop thread.
 */
static int shim_exe(const char **out, struct kpl_err *err)
{
	static char exe[4096];
	static bool found;
	size_t len = sizeof exe - sizeof "kpl-shim";
	char *slash;
	int rc;

	if (!found) {
		if ((rc = uv_exepath(exe, &len)) != 0)
			return kpl_errf(err, KPL_EIO, "cannot find kpld's own executable: %s",
					uv_strerror(rc));
		if ((slash = strrchr(exe, '/')) != NULL) {
			char own[sizeof exe];

			memcpy(own, exe, len + 1);
			strcpy(slash + 1, "kpl-shim");
			if (access(exe, X_OK) != 0)
				memcpy(exe, own, len + 1);
		}
		kpl_debug(LOG, "script stages start their shim as %s", exe);
		found = true;
	}
	*out = exe;
	return 0;
}

/* The shim this kpld started directly has ended: reap it (nobody else
 * waits for it) and note a shim that found its attempt claimed. */
static void reap_direct(struct proc *p)
{
	int st;

	if (!p->direct || p->shim_pid <= 0)
		return;
	if (waitpid((pid_t)p->shim_pid, &st, WNOHANG) == (pid_t)p->shim_pid) {
		p->direct = false;
		if (WIFEXITED(st) && WEXITSTATUS(st) == SHIM_EXIT_CLAIMED)
			kpl_warn(LOG, "shim for %s found its attempt already claimed", p->dir);
	}
}

/* Without pidfd_open (valgrind, old kernels): asks for the shim's exit. */
static void on_reappoll(uv_timer_t *t)
{
	struct proc *p = t->data;

	reap_direct(p);
	if (!p->direct) {
		uv_timer_stop(t);
		shim_ended(p);
	}
}

/* KPL_UV_SPAWN: the old path (uv_spawn, a fork of kpld), for bench/ to
 * compare. Read once. */
static bool uv_spawn_path(void)
{
	static int uv_path = -1;

	if (uv_path < 0)
		uv_path = getenv("KPL_UV_SPAWN") != NULL;
	return uv_path;
}

/* Follows the shim pid the spawner forked, through pidfd (its own, or
 * one opened here). */
static void follow_spawned(struct proc *p, pid_t pid, int pidfd)
{
	p->shim_pid = pid;
	if (pidfd < 0)
		pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
	if (pidfd < 0) {
		/* Gone (and reaped) already: read what it left, from the loop. */
		p->shim_gone = true;
		kick(p);
		return;
	}
	p->pidfd = pidfd;
	uv_poll_init(p->loop, &p->pidpoll, p->pidfd);
	p->have_pidpoll = true;
	p->open_handles++;
	uv_poll_start(&p->pidpoll, UV_READABLE, on_pidfd);
}

/* Makes a fresh attempt's directory (on the loop thread). */
static int make_dir(struct proc *p, struct kpl_err *err)
{
	int rc;

	if ((rc = proc_mkdir_p(p->dir)) != 0)
		return kpl_errf(err, KPL_EIO, "cannot create %s: %s", p->dir, strerror(-rc));
	/* A symlink put in its way meanwhile sent mkdir elsewhere. */
	if ((rc = dir_state(p->dir, err)) != 1) {
		if (rc == 0)
			rc = kpl_errf(err, KPL_EIO, "%s went away", p->dir);
		return rc;
	}
	return 0;
}

/* Starts following DIR once the spawner made it and forked its shim:
 * whatever the shim wrote before the watch is read at once. A watch that
 * cannot be had (the shim runs already) is made up for by reading every
 * PROC_LOCKPOLL_MS. */
static void watch_late(struct proc *p)
{
	struct kpl_err err = { 0 };

	if (start_watching(p, &err) != 0) {
		kpl_warn(LOG, "%s; following it by polling", err.msg);
		uv_timer_start(&p->kick, on_kick, 0, PROC_LOCKPOLL_MS);
		return;
	}
	kick(p);
}

/*
 * The spawner (stages/spawner.h) died or hung while starting p's shim: it
 * may have forked it. The attempt's lock tells, as after a restart: a shim
 * that took it is followed; otherwise kpld takes it, so a shim forked late
 * never runs the command, and the attempt fails without having run it.
 * 1 when DIR was never made (nothing can have been forked): start the
 * shim another way.
 */
static int spawn_unknown(struct proc *p, struct kpl_err *err)
{
	char why[sizeof err->msg];
	int rc;

	snprintf(why, sizeof why, "%s", err->msg);
	if (dir_state(p->dir, err) == 0)
		return 1;
	uv_fs_event_stop(&p->watch); /* attach watches again */
	rc = claim(p->dir);
	if (rc == 0) {
		if ((rc = attach(p, err)) != 0)
			return rc;
		kpl_info(LOG, "%s; its shim had started and is followed", why);
		kick(p);
		return 0;
	}
	if (rc == 1)
		return kpl_errf(err, KPL_EIO, "%s; the command did not run", why);
	return kpl_errf(err, KPL_EIO, "%s; cannot create %s/lock: %s", why, p->dir,
			strerror(-rc));
}

/* True when the spawner may start this shim: kpl-shim is its program,
 * KPL_UV_SPAWN does not ask for the old path, DIR fits its cmdline. */
static bool spawner_may(const char *exe, const char *dir)
{
	const char *slash = strrchr(exe, '/');

	/* The shim's cmdline must fit where the spawner rewrites it. */
	return !uv_spawn_path() && slash && strcmp(slash + 1, "kpl-shim") == 0 &&
	       strlen(dir) + 64 < SPAWNER_PAD;
}

static void pid_recorded(struct stage *st, int status, void *data);

/* The shim runs (started or attached to): records its pid and PREFIX "0"
 * as the stage's resume data. */
static void record_start(struct proc *p)
{
	char *resume = kpl_asprintf("%s0", p->prefix);

	stage_record_resume(p->st, p->shim_pid, kpl_pid_start_time(p->shim_pid), resume,
			    pid_recorded, NULL);
	free(resume);
	kpl_debug(LOG, "run %s stage %s: shim pid %lld runs in %s", stage_run_id(p->st),
		  stage_name(p->st), (long long)p->shim_pid, p->dir);
}

/* The shim could not be started after proc_start returned: the kind hears
 * it as the shim's error (PROC_ERROR). */
static void proc_fail(struct proc *p, const char *msg)
{
	struct proc_exit e = { .how = PROC_ERROR, .error = msg, .cancelled = p->cancelled };

	p->finished = true;
	p->ops->exit(p, &e);
	p->st = NULL;
	proc_close_all(p);
}

/* The spawner's answer to spawn_spawner's request. */
static void on_spawned(void *data, enum spawner_result res, pid_t pid, int pidfd,
		       const struct kpl_err *e)
{
	struct proc *p = data;
	struct kpl_err err = *e;
	int rc = 0;

	p->spawning = false;
	if (!p->st) {
		/* Abandoned meanwhile (kpld stopping): the shim, if any, runs on
		 * for the next kpld, which attaches to it. */
		if (pidfd >= 0)
			close(pidfd);
		proc_unref(p);
		return;
	}
	switch (res) {
	case SPAWNER_STARTED:
		follow_spawned(p, pid, pidfd);
		if (p->spawner_made_dir)
			watch_late(p);
		else
			kick(p); /* what it wrote while nothing read */
		break;
	case SPAWNER_UNKNOWN:
		rc = spawn_unknown(p, &err);
		if (rc == 1)
			rc = kpl_errf(&err, KPL_EIO, "%s; the command did not run", e->msg);
		break;
	default:
		rc = err.code ? err.code : KPL_EIO;
		break;
	}
	if (rc == 0) {
		record_start(p);
		/* proc_cancel came first: the shim passes it on. */
		if (p->cancelled && p->shim_pid > 0 && !p->shim_gone)
			kill((pid_t)p->shim_pid, SIGTERM);
	} else {
		proc_fail(p, err.msg);
	}
	proc_unref(p);
}

/* Asks the spawner for the shim (which makes DIR first when make_dir);
 * false when another way must (nothing asked), true with *rc otherwise:
 * 0 and on_spawned follows. */
static bool spawn_spawner(struct proc *p, const char *exe, char *const *cmd, bool sandboxed,
			  bool make_dir, const struct proc_spec *spec, int *rc)
{
	struct spawner_spawn s = { 0 };

	s.exe = exe;
	s.dir = p->dir;
	s.cwd = spec->cwd;
	s.grace_ms = p->grace_ms;
	s.sandboxed = sandboxed;
	s.mkdir = make_dir;
	s.argv = cmd;
	s.env = spec->env ? spec->env : environ;
	if (spawner_request(p->loop, &s, on_spawned, p) != SPAWNER_SENT)
		return false;
	p->spawning = true;
	p->spawner_made_dir = make_dir;
	p->open_handles++; /* until on_spawned */
	*rc = 0;
	return true;
}

void proc_spawn_detached(posix_spawn_file_actions_t *fa, posix_spawnattr_t *at)
{
	sigset_t all, none;

	posix_spawn_file_actions_addopen(fa, 0, "/dev/null", O_RDONLY, 0);
	posix_spawn_file_actions_addopen(fa, 1, "/dev/null", O_RDWR, 0);
	posix_spawnattr_init(at);
	sigfillset(&all);
	sigemptyset(&none);
	posix_spawnattr_setsigdefault(at, &all);
	posix_spawnattr_setsigmask(at, &none);
	posix_spawnattr_setflags(at, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGDEF |
				     POSIX_SPAWN_SETSIGMASK);
}

/*
 * Starts the shim with posix_spawn, which glibc does with
 * clone(CLONE_VM|CLONE_VFORK): kpld's page tables are not copied (a fork
 * of kpld was most of its CPU per script stage), and the loop thread waits
 * only until the shim's exec. Followed through a pidfd (or a timer that
 * asks waitpid). The shim gets what uv_spawn gave it: its own session,
 * stdin and stdout /dev/null, kpld's stderr, default signal dispositions,
 * an empty mask. Returns false when the fast path is not available, for
 * uv_spawn to do it; true with *rc set otherwise.
 */
static bool spawn_direct(struct proc *p, const char *exe, char **argv,
			 const struct proc_spec *spec, struct kpl_err *err, int *rc)
{
	posix_spawn_file_actions_t fa;
	posix_spawnattr_t at;
	pid_t pid;
	int e;

	if (uv_spawn_path())
		return false;
	posix_spawn_file_actions_init(&fa);
	proc_spawn_detached(&fa, &at);
	posix_spawn_file_actions_addchdir_np(&fa, spec->cwd);
	e = posix_spawn(&pid, exe, &fa, &at, argv, (char *const *)spec->env);
	posix_spawn_file_actions_destroy(&fa);
	posix_spawnattr_destroy(&at);
	if (e != 0) {
		if (e == ENOENT && access(exe, X_OK) == 0)
			*rc = kpl_errf(err, KPL_EINVAL, "cannot run in %s: no such directory",
				       spec->cwd);
		else
			*rc = kpl_errf(err, KPL_EINVAL, "cannot start the shim: %s", strerror(e));
		return true;
	}
	p->shim_pid = pid;
	p->direct = true;
	p->pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
	if (p->pidfd >= 0) {
		uv_poll_init(p->loop, &p->pidpoll, p->pidfd);
		p->have_pidpoll = true;
		p->open_handles++;
		uv_poll_start(&p->pidpoll, UV_READABLE, on_pidfd);
	} else {
		uv_timer_init(p->loop, &p->lockpoll);
		p->have_lockpoll = true;
		p->open_handles++;
		uv_timer_start(&p->lockpoll, on_reappoll, PROC_LOCKPOLL_MS, PROC_LOCKPOLL_MS);
	}
	*rc = 0;
	return true;
}

/* Starts p's shim; fresh: DIR does not exist yet. */
static int spawn(struct proc *p, const struct proc_spec *spec, bool fresh,
		 struct kpl_err *err)
{
	uv_process_options_t o = { 0 };
	uv_stdio_container_t stdio[3];
	char grace[32], **argv, **boxed = NULL;
	char *const *cmd = spec->argv;
	const char *exe;
	size_t argc = 0, n = 0;
	/* Rootless buildah makes user namespaces of its own: not in bwrap's. */
	bool sandboxed = sandbox.mode == PROC_SANDBOX_BWRAP &&
			 (spec->profile != PROC_PROFILE_BUILDAH || geteuid() == 0);
	bool via_spawner, watching = false;
	int rc;

	if ((rc = shim_exe(&exe, err)) != 0)
		return rc;
	via_spawner = spawner_may(exe, p->dir);
	/* Unsandboxed, the spawner makes a fresh DIR, off the loop thread
	 * (three mkdirs: a third of kpld's CPU per script run on ext4);
	 * bwrap's argv needs the workspace made first. */
	if (fresh && (sandboxed || !via_spawner) && (rc = make_dir(p, err)) != 0)
		return rc;
	/* Never unconfined for want of the sandbox: the stage fails instead. */
	if (sandboxed && !(boxed = sandbox_argv(p, spec, err)))
		return err->code;
	if (boxed)
		cmd = boxed;
	if (via_spawner) {
		bool spawner_mkdir = fresh && !sandboxed;

		if (!spawner_mkdir && (rc = start_watching(p, err)) != 0) {
			proc_strv_free(boxed);
			return rc;
		}
		watching = !spawner_mkdir;
		if (spawn_spawner(p, exe, cmd, boxed != NULL, spawner_mkdir, spec, &rc)) {
			proc_strv_free(boxed);
			return rc;
		}
		/* Nothing started: the old ways, DIR made if it is not yet. */
		if (spawner_mkdir && (rc = make_dir(p, err)) != 0) {
			proc_strv_free(boxed);
			return rc;
		}
	}
	if (!watching && (rc = start_watching(p, err)) != 0) {
		proc_strv_free(boxed);
		return rc;
	}
	while (cmd[n])
		n++;
	/* kpl-shim (or kpld) __shim DIR GRACE [--sandboxed] -- argv... */
	argv = kpl_calloc(n + 7, sizeof *argv);
	argv[argc++] = (char *)exe;
	argv[argc++] = (char *)SHIM_ARGV1;
	argv[argc++] = p->dir;
	snprintf(grace, sizeof grace, "%d", p->grace_ms);
	argv[argc++] = grace;
	if (boxed)
		argv[argc++] = (char *)"--sandboxed";
	argv[argc++] = (char *)"--";
	for (size_t i = 0; i < n; i++)
		argv[argc++] = cmd[i];
	if (spawn_direct(p, exe, argv, spec, err, &rc)) {
		free(argv);
		proc_strv_free(boxed);
		return rc;
	}
	stdio[0].flags = UV_IGNORE;
	stdio[1].flags = UV_IGNORE;
	stdio[2].flags = UV_INHERIT_FD; /* the shim's own complaints, to kpld's log */
	stdio[2].data.fd = 2;
	o.exit_cb = on_shim_exit;
	o.file = argv[0];
	o.args = argv;
	o.env = (char **)spec->env;
	o.cwd = spec->cwd;
	o.stdio = stdio;
	o.stdio_count = 3;
	/* Its own session: it outlives kpld, and kpld's signals do not reach it. */
	o.flags = UV_PROCESS_DETACHED;
	rc = uv_spawn(p->loop, &p->proc, &o);
	p->have_proc = true;
	p->open_handles++;
	free(argv);
	proc_strv_free(boxed);
	if (rc) {
		if (rc == UV_ENOENT)
			kpl_errf(err, KPL_EINVAL, "cannot run in %s: no such directory", spec->cwd);
		else
			kpl_errf(err, KPL_EIO, "cannot start the shim: %s", uv_strerror(rc));
		return KPL_EINVAL;
	}
	p->shim_pid = p->proc.pid;
	return 0;
}

int proc_start(struct stage *st, const struct proc_spec *spec,
	       const struct proc_ops *ops, void *data, struct proc **out,
	       struct kpl_err *err)
{
	struct proc *p = proc_new(st, spec->dir, spec->resume_prefix, ops, data);
	char *lock = dir_file(p, "lock");
	const char *what = spec->what ? spec->what : spec->argv[0];
	int rc;

	if (spec->grace_ms > 0)
		p->grace_ms = spec->grace_ms;
	if ((rc = dir_state(p->dir, err)) < 0)
		goto fail;
	if (rc == 0) {
		/* A fresh directory: no shim can be there yet. */
		if ((rc = spawn(p, spec, true, err)) != 0)
			goto fail;
	} else {
		/* A previous kpld made it, then stopped before recording so. */
		int64_t pid = 0;
		bool claimed = false;

		rc = claim(p->dir);
		if (rc == 0)
			lock_held(lock, &pid, &claimed);
		if (rc < 0) {
			rc = kpl_errf(err, KPL_EIO, "cannot create %s: %s", lock, strerror(-rc));
			goto fail;
		}
		if (rc == 1 || claimed) {
			/* Its shim never started the command, and now never will;
			 * a new shim here could race a late one for the lock. */
			rc = kpl_errf(err, KPL_ESTATE, "kpld stopped while starting %s", what);
			goto fail;
		}
		/* Its shim runs or ran the command: follow it from the start, as
		 * no line of it was committed (the commit naming it never was). */
		if ((rc = attach(p, err)) != 0)
			goto fail;
		kpl_info(LOG, "run %s stage %s: attached to the shim a previous kpld "
			 "started in %s", stage_run_id(st), stage_name(st), p->dir);
		kick(p);
	}
	*out = p;
	/* Through the spawner, on_spawned records it once the pid is known. */
	if (!p->spawning)
		record_start(p);
	free(lock);
	return 0;
fail:
	p->st = NULL;
	proc_close_all(p);
	free(lock);
	return rc;
}

int proc_resume(struct stage *st, const char *dir, const char *resume_prefix,
		uint64_t offset, const struct proc_ops *ops, void *data,
		struct proc **out, struct kpl_err *err)
{
	struct proc *p = proc_new(st, dir, resume_prefix, ops, data);
	int rc;

	p->offset = offset;
	proc_mkdir_p(p->dir);
	if ((rc = dir_state(p->dir, err)) != 1) {
		if (rc == 0)
			rc = kpl_errf(err, KPL_ESTATE, "%s went away", p->dir);
		goto fail;
	}
	rc = claim(p->dir);
	if (rc == 1) {
		/* Claimed: a shim that was forked but not yet this far exits. */
		rc = kpl_errf(err, KPL_ENOTFOUND, "its process had not started");
		goto fail;
	}
	if (rc < 0) {
		rc = kpl_errf(err, KPL_EIO, "cannot create %s/lock: %s", p->dir, strerror(-rc));
		goto fail;
	}
	if ((rc = attach(p, err)) != 0)
		goto fail;
	kpl_debug(LOG, "run %s stage %s: re-attached to %s at output offset %llu%s",
		  stage_run_id(st), stage_name(st), p->dir, (unsigned long long)p->offset,
		  p->shim_gone ? " (it has finished)" : "");
	*out = p;
	kick(p);
	return 0;
fail:
	p->st = NULL;
	proc_close_all(p);
	return rc;
}

void proc_cancel(struct proc *p)
{
	if (!p || p->shim_gone || p->finished)
		return;
	p->cancelled = true;
	if (p->shim_pid > 0)
		kill((pid_t)p->shim_pid, SIGTERM);
	uv_timer_start(&p->kill_timer, on_kill_timer,
		       (uint64_t)p->grace_ms + PROC_SHIM_KILL_EXTRA_MS, 0);
}

void proc_abandon(struct proc *p)
{
	if (!p)
		return;
	p->st = NULL;
	p->finished = true;
	if (!p->reading)
		proc_close_all(p); /* else on_read closes it */
}

/* ---------------------------------------------------------------------- */
/* Steps */

char *proc_attempt_dir(struct stage *st)
{
	return kpl_asprintf("%s/.kpl/%s.%u", stage_workspace(st), stage_name(st),
			    stage_attempt(st));
}

/* Logs "$ argv..." (staged, so it lands with the step's first record) and
 * starts step n like proc_start, in cwd with env. */
static int step_start(struct stage *st, unsigned n, const char *name,
		      char *const *argv, char *const *env, const char *cwd,
		      enum proc_profile profile, const struct proc_ops *ops, void *data,
		      struct proc **out, struct kpl_err *err)
{
	char *attempt = proc_attempt_dir(st), *dir, prefix[32];
	struct proc_spec spec = { 0 };
	size_t len = 2;
	char *line;
	int rc;

	for (size_t i = 0; argv[i]; i++)
		len += strlen(argv[i]) + 1;
	line = kpl_malloc(len + 1);
	strcpy(line, "$");
	for (size_t i = 0; argv[i]; i++) {
		strcat(line, " ");
		strcat(line, argv[i]);
	}
	stage_log_staged(st, KPL__V1__LOG_STREAM__LOG_STREAM_SYSTEM, line, strlen(line));
	free(line);
	dir = kpl_asprintf("%s/%u-%s", attempt, n, name);
	snprintf(prefix, sizeof prefix, "%u:", n);
	spec.dir = dir;
	spec.argv = argv;
	spec.env = env;
	spec.cwd = cwd;
	spec.what = name;
	spec.resume_prefix = prefix;
	spec.profile = profile;
	rc = proc_start(st, &spec, ops, data, out, err);
	free(dir);
	free(attempt);
	return rc;
}

/* After a restart: re-attaches to the step the resume data names (step 0
 * at offset 0 if none), like proc_resume; *n is that step. */
static int step_resume(struct stage *st, const char *const *names, unsigned n_names,
		       const struct proc_ops *ops, void *data, struct proc **out,
		       unsigned *n, struct kpl_err *err)
{
	int64_t pid;
	uint64_t start;
	const char *resume;
	unsigned long long step = 0, offset = 0;
	char *attempt, *dir, prefix[32];
	int rc;

	stage_resume_info(st, &pid, &start, &resume);
	if (*resume && sscanf(resume, "%llu:%llu", &step, &offset) != 2)
		return kpl_errf(err, KPL_ESTATE, "unreadable resume data \"%.40s\"", resume);
	if (step >= n_names)
		return kpl_errf(err, KPL_ESTATE, "resume data names step %llu of %u",
				step, n_names);
	attempt = proc_attempt_dir(st);
	dir = kpl_asprintf("%s/%llu-%s", attempt, step, names[step]);
	snprintf(prefix, sizeof prefix, "%llu:", step);
	rc = proc_resume(st, dir, prefix, offset, ops, data, out, err);
	/* The steps before it ran, but a step runner's steps act only on the
	 * workspace (git into it, buildah into its layout): the engine starts
	 * the attempt again from its first step, which repeats no effect
	 * outside kpld. (This was KPL_ESTATE, and a kill -9 between two
	 * checkout steps failed the stage.) */
	if (rc == KPL_ENOTFOUND && step > 0)
		rc = kpl_errf(err, KPL_ENOTFOUND, "kpld stopped while starting step %s",
			      names[step]);
	*n = (unsigned)step;
	free(dir);
	free(attempt);
	return rc;
}

/* ---------------------------------------------------------------------- */
/* The step runner */

static void steps_exit(struct proc *p, const struct proc_exit *e)
{
	struct proc_steps *s = proc_data(p);
	struct kpl_err err = { 0 };
	char *msg;
	int next;

	s->proc = NULL;
	if (s->cancelled || e->cancelled) {
		proc_steps_finish(s, KPL__V1__STAGE_STATE__STAGE_STATE_CANCELLED, "cancelled");
		return;
	}
	next = s->ops->exit(s, p, e);
	if (next == PROC_STEPS_END)
		return;
	if (next < 0 || (unsigned)next >= s->ops->n_names)
		BUG("step runner: step %u of %s chose step %d", s->step, stage_name(s->st), next);
	if (s->ops->start(s, (unsigned)next, &err)) {
		msg = stage_redact(s->st, err.msg);
		proc_steps_finish(s, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, msg);
		free(msg);
	}
}

static const struct proc_ops steps_proc_ops = { .exit = steps_exit };

void proc_steps_init(struct proc_steps *s, struct stage *st,
		     const struct proc_steps_ops *ops, void *data)
{
	memset(s, 0, sizeof *s);
	s->ops = ops;
	s->st = st;
	s->data = data;
}

int proc_steps_start(struct stage *st, const struct proc_steps_ops *ops,
		     struct kpl_err *err)
{
	struct proc_steps *s = ops->attempt_new(st, err);
	int rc;

	if (!s)
		return err->code;
	if ((rc = ops->start(s, ops->first, err)) != 0) {
		s->ops->free(s);
		return rc;
	}
	stage_set_impl(s->st, s);
	return 0;
}

int proc_steps_resume(struct stage *st, const struct proc_steps_ops *ops,
		      struct kpl_err *err)
{
	struct proc_steps *s = ops->attempt_new(st, err);
	unsigned step = 0;
	int rc;

	if (!s)
		return KPL_ESTATE;
	rc = step_resume(st, ops->names, ops->n_names, &steps_proc_ops, s, &s->proc, &step,
			 err);
	if (rc) {
		s->ops->free(s);
		return rc;
	}
	s->step = step;
	stage_set_impl(s->st, s);
	return 0;
}

int proc_steps_run(struct proc_steps *s, unsigned n, char *const *argv,
		   char *const *env, const char *cwd, struct kpl_err *err)
{
	if (n >= s->ops->n_names)
		BUG("step runner: no step %u in %s", n, stage_name(s->st));
	s->step = n;
	return step_start(s->st, n, s->ops->names[n], argv, env, cwd, s->ops->profile,
			  &steps_proc_ops, s, &s->proc, err);
}

void proc_steps_finish(struct proc_steps *s, Kpl__V1__StageState state, const char *msg)
{
	struct stage *st = s->st;

	stage_set_impl(st, NULL);
	stage_done(st, state, msg);
	s->ops->free(s);
}

void proc_steps_fail(struct proc_steps *s, struct proc *p, const struct proc_exit *e,
		     const char *prog)
{
	const char *name = s->ops->names[s->step];
	char *last = NULL, *msg, *red;

	/* git ends with advice ("... and the repository exists."): its first
	 * "fatal: " line says what went wrong. */
	if (strcmp(prog, "git") == 0)
		last = proc_first_line_with(p, KPL__V1__LOG_STREAM__LOG_STREAM_STDERR, "fatal: ");
	if (!last)
		last = proc_last_line(p, KPL__V1__LOG_STREAM__LOG_STREAM_STDERR);

	if (e->how == PROC_EXITED)
		msg = kpl_asprintf("%s %s failed (exit status %d)%s%s", prog, name, e->code,
				   last ? ": " : "", last ? last : "");
	else if (e->how == PROC_SIGNALED)
		msg = kpl_asprintf("%s %s killed by signal %d", prog, name, e->code);
	else if (e->how == PROC_ERROR)
		msg = kpl_asprintf("%s %s: %s", prog, name, e->error);
	else
		msg = kpl_asprintf("%s %s: its process ended without reporting an exit "
				   "status (killed?)", prog, name);
	red = stage_redact(s->st, msg);
	free(msg);
	free(last);
	proc_steps_finish(s, KPL__V1__STAGE_STATE__STAGE_STATE_FAILED, red);
	free(red);
}

void proc_steps_cancel(struct stage *st)
{
	struct proc_steps *s = stage_impl(st);

	if (!s)
		return;
	s->cancelled = true;
	proc_cancel(s->proc);
}

void proc_steps_abandon(struct stage *st)
{
	struct proc_steps *s = stage_impl(st);

	if (!s)
		return;
	stage_set_impl(st, NULL);
	proc_abandon(s->proc);
	s->ops->free(s);
}
