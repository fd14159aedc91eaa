/*
 * open_ws_test.c - kpl_open_ws (openat2 below the workspaces) and
 * kpl_open_beneath, its walk for kernels without openat2: a file below the
 * directory opens; a symlink anywhere on the way, a ".." or a path out of
 * it does not.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "base/kpl.h"

static char root[256];   /* the workspaces' directory */
static char outside[300]; /* a file outside it */

static void put(const char *path, const char *text)
{
	FILE *f = fopen(path, "w");

	assert_non_null(f);
	fputs(text, f);
	fclose(f);
}

static int setup(void **state)
{
	char p[400];
	const char *tmp = getenv("TEST_TMPDIR");

	(void)state;
	snprintf(root, sizeof root, "%s/kpl-open-ws-XXXXXX", tmp ? tmp : "/tmp");
	if (!mkdtemp(root))
		return -1;
	snprintf(p, sizeof p, "%s/run", root);
	mkdir(p, 0700);
	snprintf(p, sizeof p, "%s/run/a", root);
	mkdir(p, 0700);
	snprintf(p, sizeof p, "%s/run/a/f", root);
	put(p, "inside\n");
	snprintf(outside, sizeof outside, "%s.outside", root);
	put(outside, "outside\n");
	/* A stage's plants: a file symlink out, a directory symlink in. */
	snprintf(p, sizeof p, "%s/run/out", root);
	if (symlink(outside, p))
		return -1;
	snprintf(p, sizeof p, "%s/run/dir", root);
	if (symlink("a", p))
		return -1;
	kpl_set_workspaces_dir(root);
	return 0;
}

static int teardown(void **state)
{
	(void)state;
	unlink(outside);
	return 0;
}

/* What fd reads, as a string (closes fd); NULL for fd < 0. */
static char *slurp_fd(int fd)
{
	static char buf[64];
	ssize_t n;

	if (fd < 0)
		return NULL;
	n = read(fd, buf, sizeof buf - 1);
	close(fd);
	buf[n > 0 ? n : 0] = '\0';
	return buf;
}

static void test_beneath(void **state)
{
	int dfd = open(root, O_PATH | O_DIRECTORY | O_CLOEXEC);

	(void)state;
	assert_true(dfd >= 0);
	assert_string_equal(slurp_fd(kpl_open_beneath(dfd, "run/a/f", O_RDONLY)), "inside\n");
	assert_string_equal(slurp_fd(kpl_open_beneath(dfd, "./run//a/f", O_RDONLY)), "inside\n");

	errno = 0;
	assert_true(kpl_open_beneath(dfd, "run/out", O_RDONLY) < 0);
	assert_int_equal(errno, ELOOP);
	errno = 0;
	assert_true(kpl_open_beneath(dfd, "run/dir/f", O_RDONLY) < 0);
	assert_int_equal(errno, ENOTDIR);
	errno = 0;
	assert_true(kpl_open_beneath(dfd, "run/../run/a/f", O_RDONLY) < 0);
	assert_int_equal(errno, EXDEV);
	errno = 0;
	assert_true(kpl_open_beneath(dfd, "../x", O_RDONLY) < 0);
	assert_int_equal(errno, EXDEV);
	assert_true(kpl_open_beneath(dfd, "run/a/missing", O_RDONLY) < 0);
	assert_int_equal(errno, ENOENT);
	close(dfd);
}

static void test_open_ws(void **state)
{
	char p[400];

	(void)state;
	snprintf(p, sizeof p, "%s/run/a/f", root);
	assert_string_equal(slurp_fd(kpl_open_ws(p, O_RDONLY)), "inside\n");
	snprintf(p, sizeof p, "%s/run/out", root);
	assert_null(slurp_fd(kpl_open_ws(p, O_RDONLY)));
	snprintf(p, sizeof p, "%s/run/dir/f", root);
	assert_null(slurp_fd(kpl_open_ws(p, O_RDONLY)));
	snprintf(p, sizeof p, "%s/run/../../%s", root, strrchr(outside, '/') + 1);
	assert_null(slurp_fd(kpl_open_ws(p, O_RDONLY)));
	/* Not below the workspaces: an ordinary open. */
	assert_string_equal(slurp_fd(kpl_open_ws(outside, O_RDONLY)), "outside\n");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_beneath),
		cmocka_unit_test(test_open_ws),
	};

	return cmocka_run_group_tests(tests, setup, teardown);
}
