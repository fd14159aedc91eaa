#define _GNU_SOURCE
/*
 * spawner_client.c - kpld's side of the spawner (see spawner.h): starts it
 * once (again when it died), writes each request and goes on; the replies
 * come back in order on a uv_poll of the socket, each handed to its
 * request's callback.
 *
 * Asynchronous, so the loop thread does not wait while the spawner makes
 * the attempt's directory and forks (that wait left a core idle). Writing
 * a request is blocking but bounded (SPAWNER_TIMEOUT_MS; a request is a
 * few KiB and the spawner reads them as fast as it forks). A spawner that
 * goes SPAWNER_TIMEOUT_MS without a reply owed, or dies, is killed; the
 * requests it owed end SPAWNER_UNKNOWN and proc.c finds out from each
 * attempt's lock, as after a restart.
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

#include <uv.h>

#include "stages/proc.h"
#include "stages/spawner.h"

#define LOG "spawner"
#define SPAWNER_TIMEOUT_MS 10000
/* After this many spawners that could not start or died young, kpld stops
 * trying and starts shims with posix_spawn. */
#define SPAWNER_MAX_FAILS 5

/* A request sent and not yet answered. */
struct pending {
	struct pending *next;
	uint32_t seq;
	spawner_cb cb;
	void *data;
	char *dir;              /* for messages */
	char *cwd;
};

/* One spawner process and its socket; freed when its poll handle closed. */
struct conn {
	uv_poll_t poll;
	int fd;
	pid_t pid;
	unsigned char got[sizeof(struct spawner_reply)];
	size_t ngot;
	int pidfd;              /* came with the reply being read, or -1 */
};

/* One spawner per kpld; loop thread only. */
static struct {
	uv_loop_t *loop;
	struct conn *c;         /* NULL: none running */
	uv_timer_t timer;       /* no reply owed for SPAWNER_TIMEOUT_MS */
	bool have_timer;
	struct pending *head, **tail;
	uint32_t seq;
	int fails;              /* spawners in a row that failed */
	bool off;               /* KPL_NO_SPAWNER, too many failures, shut down */
	bool checked_env;
} sp = { .tail = &sp.head };

pid_t spawner_pid(void)
{
	return sp.c ? sp.c->pid : 0;
}

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void conn_closed(uv_handle_t *h)
{
	struct conn *c = h->data;

	close(c->fd);
	if (c->pidfd >= 0)
		close(c->pidfd);
	free(c);
}

/* Kills and reaps the spawner (it may be gone already), then ends every
 * request it owed with SPAWNER_UNKNOWN (why). Its shims live on: each is
 * in a session of its own and no longer its child once reaped. */
static void stop(const char *why)
{
	struct conn *c = sp.c;
	struct pending *list = sp.head, *next;
	struct kpl_err err = { 0 };

	if (!c)
		return;
	if (why)
		kpl_warn(LOG, "the spawner (pid %ld) %s; the next script attempt starts "
			 "another", (long)c->pid, why);
	sp.c = NULL;
	uv_close((uv_handle_t *)&c->poll, conn_closed);
	kill(c->pid, SIGKILL);
	while (waitpid(c->pid, NULL, 0) < 0 && errno == EINTR)
		;
	if (sp.have_timer)
		uv_timer_stop(&sp.timer);
	if (++sp.fails >= SPAWNER_MAX_FAILS && !sp.off) {
		kpl_warn(LOG, "the spawner failed %d times; script attempts start their shim "
			 "with posix_spawn from now on", sp.fails);
		sp.off = true;
	}
	/* Detached first: a callback may send a request (a new spawner). */
	sp.head = NULL;
	sp.tail = &sp.head;
	for (; list; list = next) {
		next = list->next;
		kpl_errf(&err, KPL_EIO, "the spawner %s while starting the shim in %s",
			 why ? why : "stopped", list->dir);
		list->cb(list->data, SPAWNER_UNKNOWN, 0, -1, &err);
		free(list->dir);
		free(list->cwd);
		free(list);
	}
}

static void on_timeout(uv_timer_t *t)
{
	(void)t;
	if (sp.head)
		stop("did not answer in time");
}

/* (Re)arms the timeout while a reply is owed. */
static void arm(void)
{
	if (!sp.have_timer) {
		uv_timer_init(sp.loop, &sp.timer);
		sp.have_timer = true;
	}
	if (sp.head)
		uv_timer_start(&sp.timer, on_timeout, SPAWNER_TIMEOUT_MS, 0);
	else
		uv_timer_stop(&sp.timer);
}

/* One whole reply: the head request's outcome. */
static void answered(struct conn *c, const struct spawner_reply *r)
{
	struct pending *q = sp.head;
	struct kpl_err err = { 0 };
	enum spawner_result res = SPAWNER_STARTED;
	int pidfd = c->pidfd;

	c->pidfd = -1;
	if (!q || r->magic != SPAWNER_MAGIC || r->seq != q->seq) {
		if (pidfd >= 0)
			close(pidfd);
		stop(!q ? "answered out of turn" : "answered garbage");
		return;
	}
	sp.head = q->next;
	if (!sp.head)
		sp.tail = &sp.head;
	if (r->pid <= 0) {
		if (pidfd >= 0)
			close(pidfd);
		pidfd = -1;
		res = SPAWNER_FALLBACK; /* nothing forked */
		kpl_errf(&err, KPL_EIO, "cannot start the shim: %s", strerror(r->err));
		switch (r->step) {
		case SPAWNER_STEP_MKDIR:
			kpl_errf(&err, KPL_EIO, "cannot create %s: %s", q->dir, strerror(r->err));
			res = SPAWNER_FAILED;
			break;
		case SPAWNER_STEP_DIR:
			/* As proc.c's dir_state says it. */
			kpl_errf(&err, KPL_ESTATE, "its directory %s is not a directory of the "
				 "workspace (%s): a symlink put there is never followed", q->dir,
				 r->err == ELOOP || r->err == EXDEV ? "a symlink on the way" :
				 strerror(r->err));
			res = SPAWNER_FAILED;
			break;
		case SPAWNER_STEP_CWD:
			if (r->err == ENOENT || r->err == ENOTDIR) {
				kpl_errf(&err, KPL_EINVAL, "cannot run in %s: no such directory",
					 q->cwd);
				res = SPAWNER_FAILED;
			}
			break;
		}
	} else {
		sp.fails = 0;
	}
	arm();
	q->cb(q->data, res, r->pid > 0 ? r->pid : 0, pidfd, &err);
	free(q->dir);
	free(q->cwd);
	free(q);
}

static void on_readable(uv_poll_t *h, int status, int events)
{
	struct conn *c = h->data;

	(void)events;
	if (status < 0) {
		stop("cannot be read");
		return;
	}
	/* Only while it is still the spawner: a callback may stop it. */
	while (sp.c == c) {
		union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } u;
		struct iovec iov = { c->got + c->ngot, sizeof c->got - c->ngot };
		struct msghdr m = { 0 };
		struct cmsghdr *cm;
		ssize_t n;

		m.msg_iov = &iov;
		m.msg_iovlen = 1;
		m.msg_control = u.buf;
		m.msg_controllen = sizeof u.buf;
		n = recvmsg(c->fd, &m, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return;
		if (n <= 0) {
			stop(sp.head ? "has gone" : NULL);
			return;
		}
		for (cm = CMSG_FIRSTHDR(&m); cm; cm = CMSG_NXTHDR(&m, cm)) {
			int fd;

			if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS ||
			    cm->cmsg_len != CMSG_LEN(sizeof(int)))
				continue;
			memcpy(&fd, CMSG_DATA(cm), sizeof fd);
			if (c->pidfd >= 0)
				close(fd); /* one per reply */
			else
				c->pidfd = fd;
		}
		c->ngot += (size_t)n;
		if (c->ngot == sizeof c->got) {
			struct spawner_reply r;

			memcpy(&r, c->got, sizeof r);
			c->ngot = 0;
			answered(c, &r);
		}
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

/* Reads one reply (the hello; and an fd with it, or -1), blocking until
 * deadline. 0, or -1 with *why. */
static int read_reply(int sfd, struct spawner_reply *r, int *fd, int64_t deadline,
		      const char **why)
{
	size_t got = 0;

	*fd = -1;
	while (got < sizeof *r) {
		union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } u;
		struct iovec iov = { (char *)r + got, sizeof *r - got };
		struct msghdr m = { 0 };
		struct cmsghdr *c;
		ssize_t n;

		if (wait_fd(sfd, POLLIN, deadline) != 0) {
			*why = "did not answer in time";
			return -1;
		}
		m.msg_iov = &iov;
		m.msg_iovlen = 1;
		m.msg_control = u.buf;
		m.msg_controllen = sizeof u.buf;
		n = recvmsg(sfd, &m, MSG_CMSG_CLOEXEC);
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
	struct spawner_reply hello;
	char *pad = kpl_malloc(SPAWNER_PAD + 1), *argv[4], *env[] = { NULL };
	const char *why = NULL;
	struct conn *c;
	pid_t pid;
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
	/* sv[1] == 3 would keep its close-on-exec through adddup2. */
	if (sv[1] == 3) {
		int d = fcntl(sv[1], F_DUPFD_CLOEXEC, 4);
		close(sv[1]);
		sv[1] = d;
	}
	posix_spawn_file_actions_init(&fa);
	posix_spawn_file_actions_adddup2(&fa, sv[1], 3);
	/* Its own session, like the shims: kpld's terminal's signals stay
	 * kpld's; it exits when kpld's end of the socket closes. */
	proc_spawn_detached(&fa, &at);
	e = posix_spawn(&pid, exe, &fa, &at, argv, env);
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
	c = kpl_calloc(1, sizeof *c);
	c->fd = sv[0];
	c->pid = pid;
	c->pidfd = -1;
	c->poll.data = c;
	sp.c = c;
	fcntl(c->fd, F_SETFL, O_NONBLOCK);
	uv_poll_init(sp.loop, &c->poll, c->fd);
	if (read_reply(c->fd, &hello, &fd, now_ms() + SPAWNER_TIMEOUT_MS, &why) != 0 ||
	    hello.seq != 0) {
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
	uv_poll_start(&c->poll, UV_READABLE, on_readable);
	kpl_debug(LOG, "the spawner runs as pid %ld", (long)pid);
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
		ssize_t w = send(sp.c->fd, buf, n, MSG_NOSIGNAL);

		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0 && errno == EAGAIN) {
			if (wait_fd(sp.c->fd, POLLOUT, deadline) != 0)
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

enum spawner_result spawner_request(uv_loop_t *loop, const struct spawner_spawn *s,
				    spawner_cb cb, void *data)
{
	struct spawner_req q = { .magic = SPAWNER_MAGIC };
	struct pending *pq;
	size_t len = strlen(s->dir) + strlen(s->cwd) + 2;
	char *buf, *at;
	bool first;

	if (!sp.checked_env) {
		sp.checked_env = true;
		sp.off = getenv("KPL_NO_SPAWNER") != NULL;
	}
	if (sp.off)
		return SPAWNER_FALLBACK;
	sp.loop = loop;
	for (char *const *a = s->argv; *a; a++, q.nargv++)
		len += strlen(*a) + 1;
	for (char *const *e = s->env; e && *e; e++, q.nenv++)
		len += strlen(*e) + 1;
	if (len > SPAWNER_MAX_REQ || q.nargv + q.nenv > SPAWNER_MAX_STRINGS)
		return SPAWNER_FALLBACK;
	q.grace_ms = s->grace_ms;
	q.flags = (s->sandboxed ? SPAWNER_SANDBOXED : 0) | (s->mkdir ? SPAWNER_MKDIR : 0);
	q.len = (uint32_t)len;
	buf = kpl_malloc(sizeof q + len);
	at = buf + sizeof q;
	put(&at, s->dir);
	put(&at, s->cwd);
	for (char *const *a = s->argv; *a; a++)
		put(&at, *a);
	for (char *const *e = s->env; e && *e; e++)
		put(&at, *e);
	/* A spawner that died since the last request is replaced (once). */
	for (int tries = 0;; tries++) {
		if (!sp.c && !start(s->exe)) {
			free(buf);
			return SPAWNER_FALLBACK;
		}
		q.seq = ++sp.seq ? sp.seq : ++sp.seq; /* never 0, the hello's */
		memcpy(buf, &q, sizeof q);
		if (write_all(buf, sizeof q + len, now_ms() + SPAWNER_TIMEOUT_MS) == 0)
			break;
		/* A request cut short is never served: the spawner forks only
		 * after reading all of it, and exits on EOF before that. The
		 * ones before it end SPAWNER_UNKNOWN. */
		stop("has gone");
		if (tries == 1 || sp.off) {
			free(buf);
			return SPAWNER_FALLBACK;
		}
	}
	free(buf);
	pq = kpl_calloc(1, sizeof *pq);
	pq->seq = q.seq;
	pq->cb = cb;
	pq->data = data;
	pq->dir = kpl_strdup(s->dir);
	pq->cwd = kpl_strdup(s->cwd);
	/* The clock runs from the oldest reply owed: more requests behind a
	 * hung spawner do not push it on. */
	first = !sp.head;
	*sp.tail = pq;
	sp.tail = &pq->next;
	if (first)
		arm();
	return SPAWNER_SENT;
}

void spawner_shutdown(void)
{
	sp.off = true;
	/* EOF for the spawner: it exits once it has served what it read. */
	if (sp.c) {
		struct conn *c = sp.c;
		struct pending *list = sp.head, *next;
		struct kpl_err err = { 0 };

		sp.c = NULL;
		sp.head = NULL;
		sp.tail = &sp.head;
		uv_close((uv_handle_t *)&c->poll, conn_closed);
		for (; list; list = next) {
			next = list->next;
			kpl_errf(&err, KPL_EIO, "kpld stopped while starting the shim in %s",
				 list->dir);
			list->cb(list->data, SPAWNER_UNKNOWN, 0, -1, &err);
			free(list->dir);
			free(list->cwd);
			free(list);
		}
	}
	if (sp.have_timer) {
		sp.have_timer = false;
		uv_close((uv_handle_t *)&sp.timer, NULL);
	}
}
