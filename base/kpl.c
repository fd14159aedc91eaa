#define _GNU_SOURCE /* O_PATH */
/* kpl.c - errors, logging, time and allocation shared by every subsystem. */
#include "base/kpl.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

enum kpl_log_level kpl_log_threshold = KPL_LOG_INFO;

struct err_info {
	int code;
	const char *name;
	int grpc;
	const char *text;
};

static const struct err_info err_table[] = {
#define KPL_ERR_ROW(name, grpc, text) { KPL_E##name, "KPL_E" #name, grpc, text },
	KPL_ERR_MAP(KPL_ERR_ROW)
#undef KPL_ERR_ROW
};

static const struct err_info *err_lookup(int code)
{
	for (size_t i = 0; i < KPL_ARRAY_SIZE(err_table); i++)
		if (err_table[i].code == code)
			return &err_table[i];
	return NULL;
}

const char *kpl_strerror(int code)
{
	const struct err_info *e = err_lookup(code);
	if (code == 0)
		return "success";
	return e ? e->text : "unknown error";
}

const char *kpl_err_name(int code)
{
	const struct err_info *e = err_lookup(code);
	if (code == 0)
		return "KPL_OK";
	return e ? e->name : "KPL_EUNKNOWN";
}

int kpl_err_grpc_status(int code)
{
	const struct err_info *e = err_lookup(code);
	if (code == 0)
		return 0;
	return e ? e->grpc : 2 /* UNKNOWN */;
}

int kpl_errf(struct kpl_err *err, int code, const char *fmt, ...)
{
	if (err) {
		va_list ap;
		err->code = code;
		va_start(ap, fmt);
		vsnprintf(err->msg, sizeof err->msg, fmt, ap);
		va_end(ap);
	}
	return code;
}

void kpl_err_clear(struct kpl_err *err)
{
	if (err) {
		err->code = 0;
		err->msg[0] = '\0';
	}
}

int kpl_log_level_parse(const char *s)
{
	static const char *names[] = { "debug", "info", "warn", "error" };
	for (size_t i = 0; i < KPL_ARRAY_SIZE(names); i++)
		if (strcasecmp(s, names[i]) == 0)
			return (int)i;
	return -1;
}

static void log_prefix(FILE *f, const char *level, const char *subsys)
{
	struct timespec ts;
	struct tm tm;
	clock_gettime(CLOCK_REALTIME, &ts);
	gmtime_r(&ts.tv_sec, &tm);
	fprintf(f, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %-5s %s: ", tm.tm_year + 1900,
		tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
		ts.tv_nsec / 1000000, level, subsys);
}

void kpl_log(enum kpl_log_level level, const char *subsys, const char *fmt, ...)
{
	static const char *names[] = { "DEBUG", "INFO", "WARN", "ERROR" };
	va_list ap;
	char line[2048];

	if (level < kpl_log_threshold)
		return;
	va_start(ap, fmt);
	vsnprintf(line, sizeof line, fmt, ap);
	va_end(ap);
	/* One fprintf per line so lines from the cq thread do not interleave. */
	flockfile(stderr);
	log_prefix(stderr, names[level], subsys);
	fputs(line, stderr);
	fputc('\n', stderr);
	funlockfile(stderr);
}

void kpl_bug(const char *file, int line, const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "BUG: %s:%d: ", file, line);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	abort();
}

int64_t kpl_now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void *oom(size_t n)
{
	fprintf(stderr, "fatal: out of memory allocating %zu bytes\n", n);
	abort();
}

void *kpl_malloc(size_t n)
{
	void *p = malloc(n ? n : 1);
	return p ? p : oom(n);
}

void *kpl_calloc(size_t n, size_t size)
{
	void *p = calloc(n ? n : 1, size ? size : 1);
	return p ? p : oom(n * size);
}

void *kpl_realloc(void *p, size_t n)
{
	void *q = realloc(p, n ? n : 1);
	return q ? q : oom(n);
}

char *kpl_strdup(const char *s)
{
	return kpl_strndup(s, strlen(s));
}

char *kpl_strndup(const char *s, size_t n)
{
	char *p = kpl_malloc(n + 1);
	memcpy(p, s, n);
	p[n] = '\0';
	return p;
}

char *kpl_asprintf(const char *fmt, ...)
{
	va_list ap;
	char *p;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(NULL, 0, fmt, ap);
	va_end(ap);
	p = kpl_malloc((size_t)n + 1);
	va_start(ap, fmt);
	vsnprintf(p, (size_t)n + 1, fmt, ap);
	va_end(ap);
	return p;
}

/* Set once at start (kpl_set_workspaces_dir); read by any thread after. */
static char *workspaces_dir;

void kpl_set_workspaces_dir(const char *dir)
{
	free(workspaces_dir);
	workspaces_dir = kpl_strdup(dir);
}

/* kpl_open_ws without openat2 (Linux before 5.6, valgrind): the same walk
 * by hand below dirfd, one component at a time, none a symlink and none
 * "..". */
int kpl_open_beneath(int dirfd, const char *rel, int flags)
{
	char *copy = kpl_strdup(rel), *part = copy, *slash;
	int cur = dirfd, next, fd = -1, e;

	for (;;) {
		while (*part == '/')
			part++;
		if ((slash = strchr(part, '/')) != NULL)
			*slash = '\0';
		if (!*part || strcmp(part, "..") == 0) {
			errno = EXDEV;
			break;
		}
		if (slash && slash[1]) {
			/* A directory on the way: O_NOFOLLOW makes a symlink ENOTDIR. */
			if (strcmp(part, ".") == 0) {
				part = slash + 1;
				continue;
			}
			next = openat(cur, part, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
			e = errno;
			if (cur != dirfd)
				close(cur);
			cur = dirfd;
			errno = e;
			if (next < 0)
				break;
			cur = next;
			part = slash + 1;
			continue;
		}
		fd = openat(cur, part, flags | O_NOFOLLOW | O_CLOEXEC, 0600);
		break;
	}
	e = errno;
	if (cur != dirfd)
		close(cur);
	free(copy);
	errno = e;
	return fd;
}

int kpl_openat_beneath(int dirfd, const char *rel, int flags)
{
	struct open_how how = { 0 };
	int fd;

	how.flags = (uint64_t)flags | O_CLOEXEC;
	how.mode = flags & O_CREAT ? 0600 : 0;
	how.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;
	fd = (int)syscall(SYS_openat2, dirfd, rel, &how, sizeof how);
	if (fd < 0 && errno == ENOSYS)
		fd = kpl_open_beneath(dirfd, rel, flags);
	return fd;
}

int kpl_open_ws(const char *path, int flags)
{
	struct open_how how = { 0 };
	size_t len = workspaces_dir ? strlen(workspaces_dir) : 0;
	int dirfd, fd, e;

	if (!len || strncmp(path, workspaces_dir, len) != 0 || path[len] != '/')
		return open(path, flags, 0600);
	dirfd = open(workspaces_dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
	if (dirfd < 0)
		return -1;
	how.flags = (uint64_t)flags | O_CLOEXEC;
	how.mode = flags & O_CREAT ? 0600 : 0;
	how.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;
	fd = (int)syscall(SYS_openat2, dirfd, path + len + 1, &how, sizeof how);
	if (fd < 0 && errno == ENOSYS)
		fd = kpl_open_beneath(dirfd, path + len + 1, flags);
	e = errno;
	close(dirfd);
	errno = e;
	return fd;
}

uint64_t kpl_pid_start_time(int64_t pid)
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

void kpl_buf_add(struct kpl_buf *b, const char *s, size_t n)
{
	if (b->len + n + 1 > b->cap) {
		b->cap = (b->len + n + 1) * 2;
		b->s = kpl_realloc(b->s, b->cap);
	}
	memcpy(b->s + b->len, s, n);
	b->len += n;
	b->s[b->len] = '\0';
}

void kpl_buf_str(struct kpl_buf *b, const char *s)
{
	kpl_buf_add(b, s, strlen(s));
}
