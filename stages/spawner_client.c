#define _GNU_SOURCE
/*
 * spawner_client.c - kpld's side of the spawner (see spawner.h): starts it
 * once (again when it died), sends one request and waits for its reply.
 *
 * Synchronous, bounded by SPAWNER_TIMEOUT_MS: the loop thread already
 * waited for posix_spawn's vfork until the shim's exec; a fork of the tiny
 * spawner is shorter. A spawner that does not answer in time is killed;
 * the request's outcome is then unknown (SPAWNER_UNKNOWN) and proc.c finds
 * out from the attempt's lock, as after a restart.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "stages/spawner.h"

#define LOG "spawner"
#define SPAWNER_TIMEOUT_MS 10000
/* After this many spawners that could not start or died young, kpld stops
 * trying and starts shims with posix_spawn. */
#define SPAWNER_MAX_FAILS 5

/* One spawner per kpld; loop thread only. */
static struct {
	int fd;                 /* our end of the socketpair; -1: none running */
	pid_t pid;
	uint32_t seq;
	int fails;              /* spawners in a row that failed */
	bool off;               /* KPL_NO_SPAWNER, or too many failures */
	bool checked_env;
} sp = { .fd = -1 };

pid_t spawner_pid(void)
{
	return sp.fd >= 0 ? sp.pid : 0;
}

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Kills and reaps the spawner (it may be gone already). Its shims live on:
 * each is in a session of its own and no longer its child once reaped. */
static void stop(const char *why)
{
	if (sp.fd < 0)
		return;
	if (why)
		kpl_warn(LOG, "the spawner (pid %ld) %s; the next script attempt starts "
			 "another", (long)sp.pid, why);
	close(sp.fd);
	sp.fd = -1;
	kill(sp.pid, SIGKILL);
	while (waitpid(sp.pid, NULL, 0) < 0 && errno == EINTR)
		;
	sp.pid = 0;
	if (++sp.fails >= SPAWNER_MAX_FAILS) {
		kpl_warn(LOG, "the spawner failed %d times; script attempts start their shim "
			 "with posix_spawn from now on", sp.fails);
		sp.off = true;
	}
}

/* Waits for fd to be ready for events until deadline; 0, or -1 on timeout
 * or error. */
static int wait_fd(int fd, short events, int64_t deadline)
{
	for (;;) {
		struct pollfd pf = { fd, events, 0 };
		int64_t left = deadline - now_ms();
		int n;

		if (left <= 0)
			return -1;
		n = poll(&pf, 1, (int)left);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		return 0;
	}
}

/* Reads one reply (and a pidfd with it, or -1). 0, or -1 with *why. */
static int read_reply(struct spawner_reply *r, int *fd, int64_t deadline, const char **why)
{
	size_t got = 0;

	*fd = -1;
	while (got < sizeof *r) {
		union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } u;
		struct iovec iov = { (char *)r + got, sizeof *r - got };
		struct msghdr m = { 0 };
		struct cmsghdr *c;
		ssize_t n;

		if (wait_fd(sp.fd, POLLIN, deadline) != 0) {
			*why = "did not answer in time";
			return -1;
		}
		m.msg_iov = &iov;
		m.msg_iovlen = 1;
		m.msg_control = u.buf;
		m.msg_controllen = sizeof u.buf;
		n = recvmsg(sp.fd, &m, MSG_CMSG_CLOEXEC);
		if (n < 0 && (errno == EINTR || errno == EAGAIN))
			continue;
		if (n <= 0) {
			*why = "has gone";
			return -1;
		}
		for (c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c))
			if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS &&
			    c->cmsg_len == CMSG_LEN(sizeof(int)) && *fd < 0)
				memcpy(fd, CMSG_DATA(c), sizeof *fd);
		got += (size_t)n;
	}
	if (r->magic != SPAWNER_MAGIC) {
		*why = "answered garbage";
		return -1;
	}
	return 0;
}

/* Starts the spawner as exe; true when it said hello and can serve. */
static bool start(const char *exe)
{
	posix_spawn_file_actions_t fa;
	posix_spawnattr_t at;
	sigset_t all, none;
	struct spawner_reply hello;
	char *pad = kpl_malloc(SPAWNER_PAD + 1), *argv[4], *env[] = { NULL };
	const char *why = NULL;
	int sv[2], e, fd;

	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
		kpl_warn(LOG, "cannot start the spawner: socketpair: %s", strerror(errno));
		free(pad);
		return false;
	}
	memset(pad, ' ', SPAWNER_PAD);
	pad[SPAWNER_PAD] = '\0';
	argv[0] = (char *)exe;
	argv[1] = (char *)SPAWNER_ARGV1;
	argv[2] = pad; /* room for each shim's cmdline (spawner.h) */
	argv[3] = NULL;
	posix_spawn_file_actions_init(&fa);
	posix_spawn_file_actions_adddup2(&fa, sv[1], 3);
	posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
	posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_RDWR, 0);
	posix_spawnattr_init(&at);
	sigfillset(&all);
	sigemptyset(&none);
	posix_spawnattr_setsigdefault(&at, &all);
	posix_spawnattr_setsigmask(&at, &none);
	/* Its own session, like the shims: kpld's terminal's signals stay
	 * kpld's; it exits when kpld's end of the socket closes. */
	posix_spawnattr_setflags(&at, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGDEF |
				      POSIX_SPAWN_SETSIGMASK);
	/* sv[1] == 3 would keep its close-on-exec through adddup2. */
	if (sv[1] == 3) {
		int d = fcntl(sv[1], F_DUPFD_CLOEXEC, 4);
		close(sv[1]);
		sv[1] = d;
		posix_spawn_file_actions_destroy(&fa);
		posix_spawn_file_actions_init(&fa);
		posix_spawn_file_actions_adddup2(&fa, sv[1], 3);
		posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
		posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_RDWR, 0);
	}
	e = posix_spawn(&sp.pid, exe, &fa, &at, argv, env);
	posix_spawn_file_actions_destroy(&fa);
	posix_spawnattr_destroy(&at);
	close(sv[1]);
	free(pad);
	if (e != 0) {
		kpl_warn(LOG, "cannot start the spawner %s: %s", exe, strerror(e));
		close(sv[0]);
		sp.fails++;
		return false;
	}
	sp.fd = sv[0];
	fcntl(sp.fd, F_SETFL, O_NONBLOCK);
	if (read_reply(&hello, &fd, now_ms() + SPAWNER_TIMEOUT_MS, &why) != 0 || hello.seq != 0) {
		stop(why ? why : "said no hello");
		return false;
	}
	if (fd >= 0)
		close(fd);
	if (hello.err) {
		/* Never better next time: posix_spawn from now on. */
		kpl_info(LOG, "the spawner cannot serve here (%s); script attempts start "
			 "their shim with posix_spawn", strerror(hello.err));
		stop(NULL);
		sp.off = true;
		return false;
	}
	kpl_debug(LOG, "the spawner runs as pid %ld", (long)sp.pid);
	return true;
}

static void put(char **at, const char *s)
{
	size_t n = strlen(s) + 1;

	memcpy(*at, s, n);
	*at += n;
}

/* Writes all of buf until deadline; 0 or -1. */
static int write_all(const char *buf, size_t n, int64_t deadline)
{
	while (n) {
		ssize_t w = send(sp.fd, buf, n, MSG_NOSIGNAL);

		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0 && errno == EAGAIN) {
			if (wait_fd(sp.fd, POLLOUT, deadline) != 0)
				return -1;
			continue;
		}
		if (w <= 0)
			return -1;
		buf += w;
		n -= (size_t)w;
	}
	return 0;
}

enum spawner_result spawner_spawn(const struct spawner_spawn *s, pid_t *pid, int *pidfd,
				  struct kpl_err *err)
{
	struct spawner_req q = { .magic = SPAWNER_MAGIC };
	struct spawner_reply r;
	size_t len = strlen(s->dir) + strlen(s->cwd) + 2;
	char *buf, *at;
	const char *why = NULL;
	int64_t deadline;
	int fd;

	*pid = 0;
	*pidfd = -1;
	if (!sp.checked_env) {
		sp.checked_env = true;
		sp.off = getenv("KPL_NO_SPAWNER") != NULL;
	}
	if (sp.off)
		return SPAWNER_FALLBACK;
	for (char *const *a = s->argv; *a; a++, q.nargv++)
		len += strlen(*a) + 1;
	for (char *const *e = s->env; e && *e; e++, q.nenv++)
		len += strlen(*e) + 1;
	if (len > SPAWNER_MAX_REQ || q.nargv + q.nenv > SPAWNER_MAX_STRINGS)
		return SPAWNER_FALLBACK;
	q.seq = ++sp.seq ? sp.seq : ++sp.seq; /* never 0, the hello's */
	q.grace_ms = s->grace_ms;
	q.flags = (s->sandboxed ? SPAWNER_SANDBOXED : 0) | (s->mkdir ? SPAWNER_MKDIR : 0);
	q.len = (uint32_t)len;
	buf = kpl_malloc(sizeof q + len);
	memcpy(buf, &q, sizeof q);
	at = buf + sizeof q;
	put(&at, s->dir);
	put(&at, s->cwd);
	for (char *const *a = s->argv; *a; a++)
		put(&at, *a);
	for (char *const *e = s->env; e && *e; e++)
		put(&at, *e);
	/* A spawner that died since the last request is replaced (once). */
	for (int tries = 0;; tries++) {
		struct pollfd pf = { sp.fd, POLLIN, 0 };

		if (sp.fd >= 0 && poll(&pf, 1, 0) > 0)
			stop("has gone"); /* it never speaks out of turn */
		if (sp.fd < 0 && !start(s->exe)) {
			free(buf);
			return SPAWNER_FALLBACK;
		}
		deadline = now_ms() + SPAWNER_TIMEOUT_MS;
		if (write_all(buf, sizeof q + len, deadline) == 0)
			break;
		/* A request cut short is never served: the spawner forks only
		 * after reading all of it, and exits on EOF before that. */
		stop("has gone");
		if (tries == 1) {
			free(buf);
			return SPAWNER_FALLBACK;
		}
	}
	free(buf);
	if (read_reply(&r, &fd, deadline, &why) != 0 || r.seq != q.seq) {
		if (fd >= 0)
			close(fd);
		stop(why ? why : "answered out of turn");
		kpl_errf(err, KPL_EIO, "the spawner %s while starting the shim in %s",
			 why ? why : "answered out of turn", s->dir);
		return SPAWNER_UNKNOWN;
	}
	if (r.pid <= 0) {
		if (fd >= 0)
			close(fd);
		switch (r.step) {
		case SPAWNER_STEP_MKDIR:
			kpl_errf(err, KPL_EIO, "cannot create %s: %s", s->dir, strerror(r.err));
			return SPAWNER_FAILED;
		case SPAWNER_STEP_DIR:
			/* As proc.c's dir_state says it. */
			kpl_errf(err, KPL_ESTATE, "its directory %s is not a directory of the "
				 "workspace (%s): a symlink put there is never followed", s->dir,
				 r.err == ELOOP || r.err == EXDEV ? "a symlink on the way" :
				 strerror(r.err));
			return SPAWNER_FAILED;
		case SPAWNER_STEP_CWD:
			if (r.err == ENOENT || r.err == ENOTDIR) {
				kpl_errf(err, KPL_EINVAL, "cannot run in %s: no such directory",
					 s->cwd);
				return SPAWNER_FAILED;
			}
			break;
		}
		return SPAWNER_FALLBACK; /* nothing forked: posix_spawn tells */
	}
	sp.fails = 0;
	*pid = r.pid;
	*pidfd = fd;
	return SPAWNER_STARTED;
}
