/*
 * dirlock.c - one kpld per data directory (dirlock.h).
 *
 * A POSIX record lock (fcntl F_SETLK) rather than flock: F_GETLK names the
 * pid that holds it, and it belongs to the process, so no child ever holds
 * it, whatever fds it inherits.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "store/dirlock.h"

struct dirlock {
	int fd;
};

/* mkdir -p dir, 0700 for what it creates. 0 or -errno. */
static int make_dir(const char *dir)
{
	char *p = kpl_strdup(dir);
	struct stat st;
	int rc = 0;

	for (char *c = p + 1; ; c++) {
		if (*c != '/' && *c != '\0')
			continue;
		char saved = *c;
		*c = '\0';
		if (mkdir(p, 0700) != 0 && errno != EEXIST &&
		    (stat(p, &st) != 0 || !S_ISDIR(st.st_mode))) {
			rc = -errno;
			break;
		}
		*c = saved;
		if (saved == '\0')
			break;
	}
	free(p);
	return rc;
}

static pid_t holder(int fd)
{
	struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET };

	if (fcntl(fd, F_GETLK, &fl) != 0 || fl.l_type == F_UNLCK)
		return 0;
	return fl.l_pid;
}

int dirlock_take(const char *dir, bool wait, dirlock_wait_fn on_wait, void *data,
		 struct dirlock **out, struct kpl_err *err)
{
	struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET };
	char *path = NULL, pid[32];
	int fd = -1, rc, code;
	pid_t who;

	*out = NULL;
	kpl_err_clear(err);
	if (!dir || !*dir)
		return kpl_errf(err, KPL_EINVAL, "data directory is not set");
	if ((rc = make_dir(dir)) != 0)
		return kpl_errf(err, KPL_EIO, "data directory %s: %s", dir, strerror(-rc));
	path = kpl_asprintf("%s/kpld.lock", dir);
	fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
	if (fd < 0) {
		code = kpl_errf(err, KPL_EIO, "cannot open %s: %s", path, strerror(errno));
		goto fail;
	}
	while (fcntl(fd, F_SETLK, &fl) != 0) {
		if (errno != EACCES && errno != EAGAIN) {
			code = kpl_errf(err, KPL_EIO, "cannot lock %s: %s", path,
					strerror(errno));
			goto fail;
		}
		/* Read after the failed try: the holder may have gone since. */
		who = holder(fd);
		if (!wait) {
			if (who > 0)
				code = kpl_errf(err, KPL_EEXISTS,
						"data directory %s is in use by another kpld "
						"(pid %ld holds %s); start this one with --standby "
						"to take over when that one stops",
						dir, (long)who, path);
			else
				code = kpl_errf(err, KPL_EEXISTS,
						"data directory %s is in use by another kpld "
						"(it holds %s)", dir, path);
			goto fail;
		}
		if (on_wait) {
			on_wait(data, dir, who);
			on_wait = NULL;
		}
		if (fcntl(fd, F_SETLKW, &fl) == 0)
			break;
		if (errno != EINTR && errno != EACCES && errno != EAGAIN) {
			code = kpl_errf(err, KPL_EIO, "cannot lock %s: %s", path,
					strerror(errno));
			goto fail;
		}
	}
	/* For a person: the pid of the kpld that holds it. */
	snprintf(pid, sizeof pid, "%ld\n", (long)getpid());
	if (ftruncate(fd, 0) != 0 || pwrite(fd, pid, strlen(pid), 0) < 0)
		kpl_warn("dirlock", "cannot write the pid into %s: %s", path, strerror(errno));
	free(path);
	*out = kpl_calloc(1, sizeof **out);
	(*out)->fd = fd;
	return 0;
fail:
	if (fd >= 0)
		close(fd);
	free(path);
	return code;
}

void dirlock_release(struct dirlock *l)
{
	if (!l)
		return;
	close(l->fd);
	free(l);
}
