#define _GNU_SOURCE
/*
 * spawner.c - the spawner process (see spawner.h): reads kpld's requests
 * one at a time, forks each attempt's shim without an exec, replies its pid
 * and a pidfd, reaps it when it ends. Plain libc, single-threaded: a fork
 * of it copies almost nothing.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "stages/shim.h"
#include "stages/spawner.h"

#define SPAWNER_FD 3

extern char **environ;

/* The bytes of our argv (contiguous, as exec lays them out), which a
 * forked shim overwrites with its own cmdline. */
static char *cmd_area;
static size_t cmd_area_len;

static void on_chld(int sig) { (void)sig; }

static int read_full(int fd, void *buf, size_t n)
{
	char *p = buf;

	while (n) {
		ssize_t r = read(fd, p, n);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		p += r;
		n -= (size_t)r;
	}
	return 0;
}

/* The reply, with fd (if >= 0) as SCM_RIGHTS; -1 when kpld is gone. */
static int reply(int sock, uint32_t seq, pid_t pid, int err, int step, int fd)
{
	struct spawner_reply r = { SPAWNER_MAGIC, seq, pid, err, step };
	struct iovec iov = { &r, sizeof r };
	union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } u;
	struct msghdr m = { 0 };
	ssize_t w;

	m.msg_iov = &iov;
	m.msg_iovlen = 1;
	if (fd >= 0) {
		struct cmsghdr *c;

		memset(&u, 0, sizeof u);
		m.msg_control = u.buf;
		m.msg_controllen = sizeof u.buf;
		c = CMSG_FIRSTHDR(&m);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(c), &fd, sizeof fd);
	}
	do
		w = sendmsg(sock, &m, MSG_NOSIGNAL);
	while (w < 0 && errno == EINTR);
	/* 16 bytes on an empty stream socket go whole or not at all. */
	return w == (ssize_t)sizeof r ? 0 : -1;
}

/* Splits n NUL-terminated strings off *p (within end) into v. */
static int take_strings(char **p, const char *end, char **v, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++) {
		char *nul = memchr(*p, '\0', (size_t)(end - *p));
		if (!nul)
			return -1;
		v[i] = *p;
		*p = nul + 1;
	}
	v[n] = NULL;
	return 0;
}

/* The shim's cmdline over ours: `kpl-shim __shim DIR GRACE`, what
 * stages/proc.c's is_shim_of and the crash test read back. */
static void set_cmdline(const char *dir, const char *grace)
{
	const char *parts[] = { "kpl-shim", SHIM_ARGV1, dir, grace };
	size_t at = 0;

	memset(cmd_area, 0, cmd_area_len);
	for (size_t i = 0; i < sizeof parts / sizeof *parts; i++) {
		size_t n = strlen(parts[i]) + 1;
		if (at + n > cmd_area_len)
			break; /* the spawner checked that DIR fits */
		memcpy(cmd_area + at, parts[i], n);
		at += n;
	}
}

/* In the forked child: becomes the shim. Never returns. */
static void child(int sock, int cwd_fd, const char *dir, int grace_ms, bool sandboxed,
		  char **cmd, char **env)
{
	char grace[16];
	char **argv;
	size_t n = 0, a = 0;
	sigset_t none;
	struct sigaction dfl;

	close(sock);
	memset(&dfl, 0, sizeof dfl);
	dfl.sa_handler = SIG_DFL;
	for (int sig = 1; sig < NSIG; sig++)
		sigaction(sig, &dfl, NULL); /* SIGKILL, SIGSTOP: EINVAL, fine */
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	setsid();
	if (fchdir(cwd_fd) != 0)
		_exit(127); /* the spawner opened it: cannot happen */
	close(cwd_fd);
	snprintf(grace, sizeof grace, "%d", grace_ms);
	set_cmdline(dir, grace);
	environ = env;
	while (cmd[n])
		n++;
	argv = calloc(n + 7, sizeof *argv);
	if (!argv)
		_exit(127);
	argv[a++] = (char *)"kpl-shim";
	argv[a++] = (char *)SHIM_ARGV1;
	argv[a++] = (char *)dir;
	argv[a++] = grace;
	if (sandboxed)
		argv[a++] = (char *)"--sandboxed";
	argv[a++] = (char *)"--";
	for (size_t i = 0; i < n; i++)
		argv[a++] = cmd[i];
	_exit(shim_main((int)a, argv));
}

/* One request: reads it, forks the shim, replies. -1 when kpld is gone
 * (EOF) or broke the protocol: the spawner then exits. */
static int serve(int sock)
{
	struct spawner_req q;
	char *buf = NULL, *p, *end, **v = NULL;
	int cwd_fd = -1, pidfd = -1, rc = -1;
	pid_t pid;

	if (read_full(sock, &q, sizeof q) != 0)
		return -1;
	if (q.magic != SPAWNER_MAGIC || q.len > SPAWNER_MAX_REQ || q.nargv == 0 ||
	    q.nargv > SPAWNER_MAX_STRINGS || q.nenv > SPAWNER_MAX_STRINGS) {
		fprintf(stderr, "kpl-shim spawner: a malformed request; exiting\n");
		return -1;
	}
	buf = malloc(q.len + 1u);
	v = calloc((size_t)q.nargv + q.nenv + 4, sizeof *v);
	if (!buf || !v || read_full(sock, buf, q.len) != 0)
		goto out;
	p = buf;
	end = buf + q.len;
	/* DIR, CWD, ARGV..., ENV...: v[0], v[1], v[2..], then ENV after a NULL. */
	if (take_strings(&p, end, v, 2) != 0 || take_strings(&p, end, v + 2, q.nargv) != 0 ||
	    take_strings(&p, end, v + 3 + q.nargv, q.nenv) != 0 || p != end) {
		fprintf(stderr, "kpl-shim spawner: a malformed request; exiting\n");
		goto out;
	}
	/* Room for `kpl-shim __shim DIR GRACE` in the cmdline, else kpld
	 * starts this one another way. */
	if (strlen(v[0]) + 40 > cmd_area_len) {
		rc = reply(sock, q.seq, 0, E2BIG, SPAWNER_STEP_ROOM, -1);
		goto out;
	}
	if (q.flags & SPAWNER_MKDIR) {
		int dfd;

		if (shim_mkdir_p(v[0]) != 0) {
			rc = reply(sock, q.seq, 0, errno, SPAWNER_STEP_MKDIR, -1);
			goto out;
		}
		/* A symlink put in its way meanwhile sent mkdir elsewhere. */
		if ((dfd = shim_open_dir(v[0])) < 0) {
			rc = reply(sock, q.seq, 0, errno, SPAWNER_STEP_DIR, -1);
			goto out;
		}
		close(dfd);
	}
	/* Checked here, so kpld hears "no such directory" from the reply. */
	cwd_fd = open(v[1], O_PATH | O_DIRECTORY | O_CLOEXEC);
	if (cwd_fd < 0) {
		rc = reply(sock, q.seq, 0, errno, SPAWNER_STEP_CWD, -1);
		goto out;
	}
	pid = fork();
	if (pid == 0)
		child(sock, cwd_fd, v[0], q.grace_ms, q.flags & SPAWNER_SANDBOXED, v + 2,
		      v + 3 + q.nargv);
	if (pid < 0) {
		rc = reply(sock, q.seq, 0, errno, SPAWNER_STEP_FORK, -1);
		goto out;
	}
	/* Not reaped before this (only serve's caller reaps), so the pidfd is
	 * of this child, never of a pid used again. */
	pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
	rc = reply(sock, q.seq, pid, 0, SPAWNER_STEP_FORK, pidfd);
out:
	if (pidfd >= 0)
		close(pidfd);
	if (cwd_fd >= 0)
		close(cwd_fd);
	free(buf);
	free(v);
	return rc;
}

static void reap(void)
{
	int st;
	pid_t pid;

	while ((pid = waitpid(-1, &st, WNOHANG)) > 0)
		if (WIFEXITED(st) && WEXITSTATUS(st) == SHIM_EXIT_CLAIMED)
			fprintf(stderr, "kpl-shim spawner: shim %ld found its attempt already "
				"claimed\n", (long)pid);
}

int spawner_main(int argc, char **argv)
{
	struct sigaction sa;
	sigset_t chld, none;
	int err = 0, fd;

	/* Our argv is one block: argv[0] to the end of the last argument. */
	cmd_area = argv[0];
	for (int i = 0; i < argc; i++) {
		if (argv[i] != cmd_area + cmd_area_len)
			break;
		cmd_area_len += strlen(argv[i]) + 1;
	}
	if (cmd_area_len < SPAWNER_PAD)
		err = E2BIG;
	fd = (int)syscall(SYS_pidfd_open, getpid(), 0);
	if (fd < 0)
		err = errno;
	else
		close(fd);
	/* Only the socket goes on; nothing of kpld's. */
	if (close_range(SPAWNER_FD + 1, ~0U, 0) != 0)
		for (long i = SPAWNER_FD + 1, max = sysconf(_SC_OPEN_MAX); i < max; i++)
			close((int)i);
	fcntl(SPAWNER_FD, F_SETFD, FD_CLOEXEC);
	signal(SIGPIPE, SIG_IGN);
	signal(SIGINT, SIG_IGN);
	signal(SIGHUP, SIG_IGN);
	/* SIGCHLD only interrupts ppoll, so a shim is reaped when it ends. */
	sigemptyset(&chld);
	sigaddset(&chld, SIGCHLD);
	sigprocmask(SIG_BLOCK, &chld, NULL);
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_chld;
	sigaction(SIGCHLD, &sa, NULL);
	sigemptyset(&none);

	if (reply(SPAWNER_FD, 0, getpid(), err, SPAWNER_STEP_FORK, -1) != 0 || err)
		return 1;
	for (;;) {
		struct pollfd pf = { SPAWNER_FD, POLLIN, 0 };

		reap();
		if (ppoll(&pf, 1, NULL, &none) < 0) {
			if (errno == EINTR)
				continue;
			return 1;
		}
		if (serve(SPAWNER_FD) != 0)
			break;
	}
	reap();
	return 0;
}
