#define _GNU_SOURCE
/*
 * shim.c - the process between kpld and a script's command, so that the
 * command outlives a kpld restart and is never run twice.
 *
 * kpld starts `kpld __shim DIR GRACE_MS [--sandboxed] -- ARGV...` detached
 * (its own session). The shim:
 *   1. claims DIR/lock (linked in, which fails like O_CREAT|O_EXCL) and
 *      holds an flock on it for its whole life, its pid written inside. A
 *      kpld that restarts and finds no lock file claims it itself, so a
 *      shim that was forked but had not got this far can never start the
 *      command afterwards: exactly once.
 *   2. runs ARGV in a process group of its own, stdin from /dev/null, and
 *      appends each line of its stdout/stderr to DIR/output as a record:
 *      '1' or '2' (or 'S' for the shim's own notes), the line, '\n'. A
 *      line over KPL_MAX_LOG_LINE bytes is cut into pieces, each cut between
 *      characters (UTF-8) and tagged so kpld can redact a secret the cut
 *      split: stdout/stderr '3'/'4' the first piece, '5'/'6' a middle one,
 *      '7'/'8' the last.
 *   3. on SIGTERM forwards SIGTERM to the command's group and SIGKILLs the
 *      group GRACE_MS later; when the command exits, SIGKILLs whatever it
 *      left in its group so the pipes reach EOF.
 *   4. writes DIR/exit ("exit N" or "signal N" or "error TEXT") through a
 *      rename, after every output record, and exits.
 * --sandboxed: ARGV is bwrap's (stages/proc.c builds it) with --info-fd 3
 * and --new-session; the shim hands bwrap fd 3 and reads the sandbox's pid
 * from it. That pid leads the process group of everything in the sandbox
 * (bwrap's pid 1 and the command), so signals go there, not to bwrap's
 * outer process: the command gets its SIGTERM and its grace, and a SIGKILL
 * of that pid 1 ends the whole sandbox. A bwrap that never reports the pid,
 * or that fails with its own "bwrap: " line first, could not set the sandbox
 * up: DIR/exit says so as an error, never as the command's status.
 * kpld follows DIR/output and waits for DIR/exit, with the read offset kept
 * in LMDB in the same commit as the log events, so a restarted kpld carries
 * on exactly where it was.
 *
 * Plain POSIX; no loop, no allocation beyond buffers. Runs in the child only.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "base/kpl.h"
#include "base/logline.h"
#include "stages/shim.h"

/* The output file stops growing here (the pipes are still drained); kpld
 * caps what it stores per stage well below this. */
#define SHIM_MAX_OUTPUT_BYTES ((off_t)64 * 1024 * 1024)

static volatile sig_atomic_t got_term;
static volatile sig_atomic_t got_chld;

static void on_term(int sig) { (void)sig; got_term = 1; }
static void on_chld(int sig) { (void)sig; got_chld = 1; }

struct shim_line {
	char buf[KPL_MAX_LOG_LINE + 2];
	size_t len;
	int cont; /* buf continues a piece already recorded */
};

static int out_fd = -1;
static off_t out_size;
static int out_capped;
/* The first stderr line, to tell bwrap's own failure from the command's. */
static char first_err[256];
static int have_first_err;

static void write_all(int fd, const char *p, size_t n)
{
	while (n) {
		ssize_t w = write(fd, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return;
		p += w;
		n -= (size_t)w;
	}
}

/* One record: stream tag, text, newline. */
static void record(char tag, const char *p, size_t n)
{
	char head = tag;

	if (tag == '2' && !have_first_err) {
		snprintf(first_err, sizeof first_err, "%.*s", (int)n, p);
		have_first_err = 1;
	}
	if (out_capped)
		return;
	if (out_size + (off_t)n + 2 > SHIM_MAX_OUTPUT_BYTES) {
		static const char msg[] = "Soutput over 64 MiB: the rest was not kept\n";
		write_all(out_fd, msg, sizeof msg - 1);
		out_capped = 1;
		return;
	}
	/* One write per record keeps records whole for a concurrent reader
	 * up to PIPE_BUF; kpld only consumes complete lines anyway. */
	{
		char stackbuf[KPL_MAX_LOG_LINE + 2];
		stackbuf[0] = head;
		memcpy(stackbuf + 1, p, n);
		stackbuf[n + 1] = '\n';
		write_all(out_fd, stackbuf, n + 2);
	}
	out_size += (off_t)n + 2;
}

/* The tag of a record of stream tag ('1' or '2') cut at its start and/or
 * end: the first piece tag + 2, a middle one + 4, the last + 6. */
static char piece_tag(char tag, int cut_start, int cut_end)
{
	return (char)(tag + (cut_start ? (cut_end ? 4 : 6) : (cut_end ? 2 : 0)));
}

/* Records the line in l, whole (its end seen) or a piece of it. */
static void flush_line(char tag, struct shim_line *l, int ended)
{
	size_t n = l->len;

	if (!ended) {
		/* Never inside a character: its first bytes wait for the rest. */
		n = logline_utf8_cut(l->buf, l->len);
		if (n == 0)
			n = l->len;
	}
	record(piece_tag(tag, l->cont, !ended), l->buf, n);
	memmove(l->buf, l->buf + n, l->len - n);
	l->len -= n;
	l->cont = !ended;
}

static void feed(char tag, struct shim_line *l, const char *p, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		if (p[i] == '\n') {
			flush_line(tag, l, 1);
			continue;
		}
		if (l->len == KPL_MAX_LOG_LINE)
			flush_line(tag, l, 0);
		l->buf[l->len++] = p[i];
	}
}

/* The attempt's directory, opened once (shim_open_dir): every file of the shim
 * is made there with *at() and O_NOFOLLOW. */
static int dir_fd = -1;

/*
 * Opens DIR for the shim's files. DIR is WORKSPACE/.kpl/...: the command
 * (or another stage of the run) can write the workspace and put a symlink
 * in DIR's place or in it, which would have this process, unconfined,
 * write its files elsewhere. So below the workspace no symlink is
 * followed (openat2), and the directory is held by its descriptor.
 */
int shim_open_dir(const char *dir)
{
	const char *k = NULL;
	char ws[4096];
	int wsfd, fd;

	/* The last one: DATA_DIR's own path may hold a .kpl. */
	for (const char *s = strstr(dir, "/.kpl/"); s; s = strstr(s + 1, "/.kpl/"))
		k = s;
	if (!k || (size_t)(k - dir) >= sizeof ws)
		return open(dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
	snprintf(ws, sizeof ws, "%.*s", (int)(k - dir), dir);
	if ((wsfd = open(ws, O_PATH | O_DIRECTORY | O_CLOEXEC)) < 0)
		return -1;
	fd = kpl_openat_beneath(wsfd, k + 1, O_PATH | O_DIRECTORY);
	close(wsfd);
	return fd;
}

int shim_mkdir_p(const char *dir)
{
	char path[4096], *slash;
	size_t len = strlen(dir);

	/* Mostly only the last one is missing: one mkdir, no walk up. */
	if (mkdir(dir, 0700) == 0 || errno == EEXIST)
		return 0;
	if (errno != ENOENT || len >= sizeof path)
		return -1;
	memcpy(path, dir, len + 1);
	while (len > 1 && path[len - 1] == '/')
		path[--len] = '\0';
	if (!(slash = strrchr(path, '/')) || slash == path)
		return -1;
	*slash = '\0';
	if (shim_mkdir_p(path) != 0)
		return -1;
	return mkdir(dir, 0700) == 0 || errno == EEXIST ? 0 : -1;
}

static void write_exit(const char *dir, const char *text)
{
	int fd;

	(void)dir;
	/* Made new (a file of that name could be a symlink), then renamed. */
	unlinkat(dir_fd, "exit.tmp", 0);
	fd = openat(dir_fd, "exit.tmp", O_CREAT | O_EXCL | O_WRONLY | O_NOFOLLOW | O_CLOEXEC,
		    0600);
	if (fd < 0)
		return;
	write_all(fd, text, strlen(text));
	close(fd);
	renameat(dir_fd, "exit.tmp", dir_fd, "exit");
}

static int64_t mono_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* The sandbox's pid from bwrap's --info-fd JSON ("child-pid": N), read
 * until it comes or bwrap closes the pipe (it writes it right after its
 * clone, before the command runs); 0 if it never came. */
static pid_t read_sandbox_pid(int fd)
{
	char buf[1024];
	size_t len = 0;
	const char *key = "\"child-pid\":";

	for (;;) {
		ssize_t n;
		char *at, *end;
		long v;

		buf[len] = '\0';
		if ((at = strstr(buf, key)) != NULL) {
			v = strtol(at + strlen(key), &end, 10);
			/* The number is whole once something follows it. */
			if (*end && v > 0)
				return (pid_t)v;
		}
		if (len == sizeof buf - 1)
			return 0;
		n = read(fd, buf + len, sizeof buf - 1 - len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return 0;
		len += (size_t)n;
	}
}

int shim_main(int argc, char **argv)
{
	const char *dir;
	char path[4096], text[512];
	int lock_fd, po[2], pe[2], pi[2] = { -1, -1 }, status = 0, sandboxed, cmd_at;
	int64_t grace_ms, kill_at = 0;
	struct shim_line lo = { 0 }, le = { 0 };
	struct sigaction sa;
	pid_t child, group, sandbox = 0;
	int open_pipes = 2, exited = 0;
	char buf[65536];

	/* argv: kpld __shim DIR GRACE_MS [--sandboxed] -- ARGV... */
	sandboxed = argc > 4 && strcmp(argv[4], "--sandboxed") == 0;
	cmd_at = sandboxed ? 6 : 5;
	if (argc < cmd_at + 1 || strcmp(argv[cmd_at - 1], "--") != 0) {
		fprintf(stderr, "usage: kpld __shim DIR GRACE_MS [--sandboxed] -- ARGV...\n");
		return 2;
	}
	dir = argv[2];
	grace_ms = atoll(argv[3]);

	/* kpld's descriptors without close-on-exec (LMDB's data.mdb among
	 * them) must not reach the command: only stdio goes on. */
	if (close_range(3, ~0U, 0) != 0)
		for (long fd = 3, max = sysconf(_SC_OPEN_MAX); fd < max; fd++)
			close((int)fd);

	/* The lock appears already flocked with the pid inside (made aside,
	 * then linked in, which fails like O_EXCL if it exists): a kpld never
	 * sees a lock that is neither held nor finished while the shim lives. */
	if ((dir_fd = shim_open_dir(dir)) < 0) {
		fprintf(stderr, "kpld shim: %s: %s\n", dir, strerror(errno));
		return SHIM_EXIT_CLAIMED;
	}
	snprintf(path, sizeof path, "lock.%ld", (long)getpid());
	unlinkat(dir_fd, path, 0);
	lock_fd = openat(dir_fd, path, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC | O_NOFOLLOW,
			 0600);
	if (lock_fd < 0 || flock(lock_fd, LOCK_EX) != 0)
		return SHIM_EXIT_CLAIMED;
	snprintf(text, sizeof text, "%ld\n", (long)getpid());
	write_all(lock_fd, text, strlen(text));
	{
		int linked;

		linked = linkat(dir_fd, path, dir_fd, "lock", 0) == 0;
		unlinkat(dir_fd, path, 0);
		if (!linked)
			return SHIM_EXIT_CLAIMED; /* kpld gave this attempt up already */
	}

	out_fd = openat(dir_fd, "output", O_CREAT | O_APPEND | O_WRONLY | O_CLOEXEC | O_NOFOLLOW,
			0600);
	if (out_fd < 0 || pipe2(po, O_CLOEXEC) || pipe2(pe, O_CLOEXEC) ||
	    (sandboxed && pipe2(pi, O_CLOEXEC))) {
		snprintf(text, sizeof text, "error cannot set up the command's output: %s\n",
			 strerror(errno));
		write_exit(dir, text);
		return 1;
	}

	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_term;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	sa.sa_handler = on_chld;
	sigaction(SIGCHLD, &sa, NULL);
	signal(SIGHUP, SIG_IGN);
	signal(SIGPIPE, SIG_IGN);

	child = fork();
	if (child < 0) {
		snprintf(text, sizeof text, "error fork: %s\n", strerror(errno));
		write_exit(dir, text);
		return 1;
	}
	if (child == 0) {
		sigset_t none;
		int devnull = open("/dev/null", O_RDONLY);

		setpgid(0, 0);
		signal(SIGTERM, SIG_DFL);
		signal(SIGINT, SIG_DFL);
		signal(SIGCHLD, SIG_DFL);
		signal(SIGHUP, SIG_DFL);
		signal(SIGPIPE, SIG_DFL);
		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, NULL);
		if (devnull >= 0)
			dup2(devnull, 0);
		dup2(po[1], 1);
		dup2(pe[1], 2);
		if (sandboxed)
			dup2(pi[1], 3); /* bwrap's --info-fd 3; dup2 clears CLOEXEC */
		execvp(argv[cmd_at], argv + cmd_at);
		dprintf(2, "cannot run %s: %s\n", argv[cmd_at], strerror(errno));
		_exit(127);
	}
	setpgid(child, child); /* also here: no race with an early SIGTERM */
	close(po[1]);
	close(pe[1]);
	group = child;
	if (sandboxed) {
		close(pi[1]);
		sandbox = read_sandbox_pid(pi[0]);
		/* Left open until the end: bwrap writes more after the pid, and
		 * a closed pipe would kill it with SIGPIPE. */
		if (sandbox)
			group = sandbox; /* --new-session: it leads its own group */
	}
	fcntl(po[0], F_SETFL, O_NONBLOCK);
	fcntl(pe[0], F_SETFL, O_NONBLOCK);

	while (open_pipes || !exited) {
		struct pollfd pf[2] = { { po[0], POLLIN, 0 }, { pe[0], POLLIN, 0 } };
		int timeout = -1;

		if (got_term && !kill_at) {
			kill(-group, SIGTERM);
			kill_at = mono_ms() + grace_ms;
		}
		if (kill_at && kill_at != INT64_MAX) {
			int64_t left = kill_at - mono_ms();
			if (left <= 0) {
				kill(-group, SIGKILL);
				kill_at = INT64_MAX;
			} else {
				timeout = (int)left;
			}
		}
		if (got_chld || !open_pipes) {
			pid_t w = waitpid(child, &status, open_pipes ? WNOHANG : 0);
			got_chld = 0;
			if (w == child) {
				exited = 1;
				/* Leftovers in its group would hold the pipes open. */
				kill(-child, SIGKILL);
				if (group != child)
					kill(-group, SIGKILL);
			}
			if (!open_pipes)
				continue;
		}
		if (pf[0].fd < 0 && pf[1].fd < 0)
			continue;
		if (poll(pf, 2, timeout) < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		for (int i = 0; i < 2; i++) {
			int *fd = i ? &pe[0] : &po[0];
			ssize_t n;

			if (*fd < 0 || !(pf[i].revents & (POLLIN | POLLHUP | POLLERR)))
				continue;
			n = read(*fd, buf, sizeof buf);
			if (n > 0) {
				feed(i ? '2' : '1', i ? &le : &lo, buf, (size_t)n);
			} else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
				close(*fd);
				*fd = -1;
				open_pipes--;
			}
			pf[i].fd = *fd;
		}
	}
	if (pi[0] >= 0)
		close(pi[0]);
	if (lo.len)
		flush_line('1', &lo, 1);
	if (le.len)
		flush_line('2', &le, 1);
	close(out_fd);

	if (sandboxed && !sandbox)
		snprintf(text, sizeof text, "error stage isolation: %s did not start the "
			 "sandbox (%s %d)%s%s\n", argv[cmd_at],
			 WIFSIGNALED(status) ? "signal" : "exit status",
			 WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status),
			 have_first_err ? ": " : "", have_first_err ? first_err : "");
	else if (sandboxed && have_first_err && !WIFSIGNALED(status) &&
		 WEXITSTATUS(status) != 0 && strncmp(first_err, "bwrap: ", 7) == 0)
		snprintf(text, sizeof text, "error stage isolation: the sandbox could not be "
			 "set up: %s\n", first_err);
	else if (WIFSIGNALED(status))
		snprintf(text, sizeof text, "signal %d\n", WTERMSIG(status));
	else
		snprintf(text, sizeof text, "exit %d\n", WEXITSTATUS(status));
	write_exit(dir, text);
	return 0;
}
