/*
 * spawner_test.c - the spawner process (stages/spawner.c) over its socket:
 * its hello; a request forks a shim that runs the command in CWD with ENV,
 * shows `kpl-shim __shim DIR GRACE` as its cmdline, writes DIR/output and
 * DIR/exit, and comes with a pidfd; a missing CWD and a DIR too long for
 * the cmdline are refused without a fork; SPAWNER_MKDIR makes DIR first,
 * and refuses one reached through a symlink; a malformed request (bad magic,
 * fewer strings than it says, a length over the bound) and EOF end the
 * spawner.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "stages/spawner.h"

static char root[256];

struct sp {
	int fd;
	pid_t pid;
};

/* A spawner as a child of the test: this binary exec'd again (main sends
 * it to spawner_main), its argv with the pad as kpld gives it. */
static struct sp sp_start(void)
{
	struct sp s;
	int sv[2];

	assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
	s.pid = fork();
	assert_true(s.pid >= 0);
	if (s.pid == 0) {
		static char pad[SPAWNER_PAD + 1];
		char *argv[] = { (char *)"kpl-shim", (char *)SPAWNER_ARGV1, pad, NULL };

		dup2(sv[1], 3); /* clears close-on-exec */
		memset(pad, ' ', SPAWNER_PAD);
		execv("/proc/self/exe", argv);
		_exit(127);
	}
	close(sv[1]);
	s.fd = sv[0];
	return s;
}

/* A reply, and the fd that came with it (or -1). */
static struct spawner_reply sp_reply(struct sp *s, int *fd)
{
	struct spawner_reply r;
	union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } u;
	struct iovec iov = { &r, sizeof r };
	struct msghdr m = { 0 };
	struct cmsghdr *c;

	m.msg_iov = &iov;
	m.msg_iovlen = 1;
	m.msg_control = u.buf;
	m.msg_controllen = sizeof u.buf;
	assert_int_equal(recvmsg(s->fd, &m, MSG_CMSG_CLOEXEC), sizeof r);
	*fd = -1;
	c = CMSG_FIRSTHDR(&m);
	if (c && c->cmsg_type == SCM_RIGHTS)
		memcpy(fd, CMSG_DATA(c), sizeof *fd);
	assert_int_equal(r.magic, SPAWNER_MAGIC);
	return r;
}

/* Sends a request with the strings given (DIR, CWD, ARGV..., ENV...). */
static void sp_send_flags(struct sp *s, uint32_t seq, uint32_t flags, uint32_t nargv,
			  uint32_t nenv, const char *const *strs, size_t nstrs)
{
	struct spawner_req q = { SPAWNER_MAGIC, seq, 1000, flags, nargv, nenv, 0 };
	char buf[16384];
	size_t len = 0;

	for (size_t i = 0; i < nstrs; i++) {
		size_t n = strlen(strs[i]) + 1;
		assert_true(len + n <= sizeof buf);
		memcpy(buf + len, strs[i], n);
		len += n;
	}
	q.len = (uint32_t)len;
	assert_int_equal(write(s->fd, &q, sizeof q), sizeof q);
	assert_int_equal(write(s->fd, buf, len), (ssize_t)len);
}

static void sp_send(struct sp *s, uint32_t seq, uint32_t nargv, uint32_t nenv,
		    const char *const *strs, size_t nstrs)
{
	sp_send_flags(s, seq, 0, nargv, nenv, strs, nstrs);
}

/* The spawner has ended (the socket at EOF) with status 0. */
static void sp_ended(struct sp *s)
{
	char c;
	int st;

	assert_int_equal(read(s->fd, &c, 1), 0);
	assert_int_equal(waitpid(s->pid, &st, 0), s->pid);
	assert_true(WIFEXITED(st));
	assert_int_equal(WEXITSTATUS(st), 0);
	close(s->fd);
}

static char *slurp(const char *path)
{
	static char buf[4096];
	int fd = open(path, O_RDONLY);
	ssize_t n;

	if (fd < 0)
		return NULL;
	n = read(fd, buf, sizeof buf - 1);
	close(fd);
	buf[n > 0 ? n : 0] = '\0';
	return buf;
}

static int setup(void **state)
{
	const char *tmp = getenv("TEST_TMPDIR");
	char p[400];

	(void)state;
	snprintf(root, sizeof root, "%s/kpl-spawner-XXXXXX", tmp ? tmp : "/tmp");
	if (!mkdtemp(root))
		return -1;
	snprintf(p, sizeof p, "%s/.kpl", root);
	mkdir(p, 0700);
	return 0;
}

static void test_hello_and_a_shim(void **state)
{
	struct sp s = sp_start();
	struct spawner_reply r;
	char dir[400], fifo[400], path[500], cmd[1200], want[600];
	const char *strs[8];
	struct pollfd pf;
	int fd;
	FILE *f;

	(void)state;
	r = sp_reply(&s, &fd);
	assert_int_equal(r.seq, 0);
	assert_int_equal(r.err, 0);
	assert_int_equal(r.pid, s.pid);
	assert_int_equal(fd, -1);

	snprintf(dir, sizeof dir, "%s/.kpl/t.1", root);
	assert_int_equal(mkdir(dir, 0700), 0);
	snprintf(fifo, sizeof fifo, "%s/fifo", root);
	assert_int_equal(mkfifo(fifo, 0600), 0);
	/* Blocks on the fifo until the test has looked at it. */
	snprintf(cmd, sizeof cmd, "cat %s >/dev/null; pwd; echo \"x=$X\"; echo oops >&2; "
		 "exit 3", fifo);
	strs[0] = dir;
	strs[1] = root;
	strs[2] = "sh";
	strs[3] = "-c";
	strs[4] = cmd;
	strs[5] = "PATH=/usr/bin:/bin";
	strs[6] = "X=secret-ish";
	sp_send(&s, 7, 3, 2, strs, 7);
	r = sp_reply(&s, &fd);
	assert_int_equal(r.seq, 7);
	assert_true(r.pid > 0);
	assert_true(fd >= 0);

	/* The shim's cmdline, as a restarted kpld reads it (rewritten by the
	 * child before it takes the lock; the reply may come first). */
	{
		char cl[8192];
		size_t n;

		snprintf(path, sizeof path, "/proc/%d/cmdline", r.pid);
		for (int i = 0; i < 60000; i++) {
			f = fopen(path, "r");
			assert_non_null(f);
			n = fread(cl, 1, sizeof cl, f);
			fclose(f);
			assert_true(n > 40);
			if (strcmp(cl + 9, SPAWNER_ARGV1) != 0)
				break;
			usleep(1000);
		}
		assert_string_equal(cl, "kpl-shim");
		assert_string_equal(cl + 9, "__shim");
		assert_string_equal(cl + 16, dir);
		assert_string_equal(cl + 16 + strlen(dir) + 1, "1000");
	}
	f = fopen(fifo, "w");
	assert_non_null(f);
	fclose(f);

	pf.fd = fd;
	pf.events = POLLIN;
	assert_int_equal(poll(&pf, 1, 60000), 1);
	close(fd);
	snprintf(path, sizeof path, "%s/exit", dir);
	assert_string_equal(slurp(path), "exit 3\n");
	snprintf(path, sizeof path, "%s/output", dir);
	snprintf(want, sizeof want, "1%s\n", root);
	assert_non_null(strstr(slurp(path), want));
	assert_non_null(strstr(slurp(path), "1x=secret-ish\n"));
	assert_non_null(strstr(slurp(path), "2oops\n"));

	shutdown(s.fd, SHUT_WR); /* EOF: the spawner exits */
	sp_ended(&s);
}

static void test_refused_without_a_fork(void **state)
{
	struct sp s = sp_start();
	struct spawner_reply r;
	char dir[400], nocwd[400], *longdir;
	const char *strs[4];
	int fd;

	(void)state;
	sp_reply(&s, &fd);
	snprintf(dir, sizeof dir, "%s/.kpl/r.1", root);
	snprintf(nocwd, sizeof nocwd, "%s/nowhere", root);
	strs[0] = dir;
	strs[1] = nocwd;
	strs[2] = "true";
	sp_send(&s, 1, 1, 0, strs, 3);
	r = sp_reply(&s, &fd);
	assert_int_equal(r.seq, 1);
	assert_int_equal(r.pid, 0);
	assert_int_equal(r.err, ENOENT);
	assert_int_equal(r.step, SPAWNER_STEP_CWD);
	assert_int_equal(fd, -1);

	longdir = malloc(SPAWNER_PAD + 2);
	memset(longdir, 'd', SPAWNER_PAD + 1);
	longdir[SPAWNER_PAD + 1] = '\0';
	strs[0] = longdir;
	strs[1] = root;
	sp_send(&s, 2, 1, 0, strs, 3);
	r = sp_reply(&s, &fd);
	free(longdir);
	assert_int_equal(r.seq, 2);
	assert_int_equal(r.pid, 0);
	assert_int_equal(r.err, E2BIG);
	assert_int_equal(r.step, SPAWNER_STEP_ROOM);
	/* Nothing ran there. */
	{
		char p[500];
		snprintf(p, sizeof p, "%s/lock", dir);
		assert_int_equal(access(p, F_OK), -1);
	}
	shutdown(s.fd, SHUT_WR);
	sp_ended(&s);
}

/* SPAWNER_MKDIR: the spawner makes DIR and its parents (the workspace,
 * .kpl) before the fork; a symlink on the way below the workspace is
 * refused without one. */
static void test_mkdir(void **state)
{
	struct sp s = sp_start();
	struct spawner_reply r;
	char ws[400], dir[500], path[600], target[400];
	const char *strs[4];
	struct pollfd pf;
	int fd;

	(void)state;
	sp_reply(&s, &fd);
	snprintf(ws, sizeof ws, "%s/ws-new", root);
	snprintf(dir, sizeof dir, "%s/.kpl/t.1", ws);
	strs[0] = dir;
	strs[1] = ws;
	strs[2] = "true";
	sp_send_flags(&s, 1, SPAWNER_MKDIR, 1, 0, strs, 3);
	r = sp_reply(&s, &fd);
	assert_int_equal(r.seq, 1);
	assert_true(r.pid > 0);
	assert_true(fd >= 0);
	pf.fd = fd;
	pf.events = POLLIN;
	assert_int_equal(poll(&pf, 1, 60000), 1);
	close(fd);
	snprintf(path, sizeof path, "%s/exit", dir);
	assert_string_equal(slurp(path), "exit 0\n");

	/* .kpl made a symlink to elsewhere: no fork, no lock there. */
	snprintf(ws, sizeof ws, "%s/ws-planted", root);
	assert_int_equal(mkdir(ws, 0700), 0);
	snprintf(target, sizeof target, "%s/elsewhere", root);
	assert_int_equal(mkdir(target, 0700), 0);
	snprintf(path, sizeof path, "%s/.kpl", ws);
	assert_int_equal(symlink(target, path), 0);
	snprintf(dir, sizeof dir, "%s/.kpl/t.1", ws);
	strs[0] = dir;
	strs[1] = ws;
	sp_send_flags(&s, 2, SPAWNER_MKDIR, 1, 0, strs, 3);
	r = sp_reply(&s, &fd);
	assert_int_equal(r.seq, 2);
	assert_int_equal(r.pid, 0);
	assert_int_equal(r.step, SPAWNER_STEP_DIR);
	assert_int_equal(fd, -1);
	snprintf(path, sizeof path, "%s/t.1/lock", target);
	assert_int_equal(access(path, F_OK), -1);
	shutdown(s.fd, SHUT_WR);
	sp_ended(&s);
}

static void test_malformed_requests_end_it(void **state)
{
	const char *strs[3] = { "/nonexistent/.kpl/m.1", "/", "true" };
	int fd;

	(void)state;
	/* A bad magic. */
	{
		struct sp s = sp_start();
		struct spawner_req q = { 0x12345678, 1, 0, 0, 1, 0, 0 };

		sp_reply(&s, &fd);
		assert_int_equal(write(s.fd, &q, sizeof q), sizeof q);
		sp_ended(&s);
	}
	/* Fewer strings than it says. */
	{
		struct sp s = sp_start();

		sp_reply(&s, &fd);
		sp_send(&s, 1, 2, 1, strs, 3);
		sp_ended(&s);
	}
	/* A length over the bound: refused before reading it. */
	{
		struct sp s = sp_start();
		struct spawner_req q = { SPAWNER_MAGIC, 1, 0, 0, 1, 0, SPAWNER_MAX_REQ + 1 };

		sp_reply(&s, &fd);
		assert_int_equal(write(s.fd, &q, sizeof q), sizeof q);
		sp_ended(&s);
	}
	/* Cut short, then EOF. */
	{
		struct sp s = sp_start();
		struct spawner_req q = { SPAWNER_MAGIC, 1, 0, 0, 1, 0, 100 };

		sp_reply(&s, &fd);
		assert_int_equal(write(s.fd, &q, sizeof q), sizeof q);
		assert_int_equal(write(s.fd, "abc", 3), 3);
		shutdown(s.fd, SHUT_WR);
		sp_ended(&s);
	}
}

int main(int argc, char **argv)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_hello_and_a_shim),
		cmocka_unit_test(test_refused_without_a_fork),
		cmocka_unit_test(test_mkdir),
		cmocka_unit_test(test_malformed_requests_end_it),
	};

	if (argc > 1 && strcmp(argv[1], SPAWNER_ARGV1) == 0)
		return spawner_main(argc, argv);
	signal(SIGPIPE, SIG_IGN);
	return cmocka_run_group_tests(tests, setup, NULL);
}
