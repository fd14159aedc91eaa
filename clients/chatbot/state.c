/*
 * state.c - kpl-chatbot's state file: how far each chat has taken the
 * stream of events. Written whole, atomically, after every delivery.
 */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "clients/chatbot/chatbot.h"

int chatbot_state_load(const char *path, char *const *names, size_t n, uint64_t *acked,
		       struct kpl_err *err)
{
	json_error_t jerr;
	json_t *root, *gs, *chats;
	FILE *f = fopen(path, "r");

	if (!f) {
		if (errno == ENOENT)
			return KPL_ENOTFOUND;
		return kpl_errf(err, KPL_EIO, "%s: %s", path, strerror(errno));
	}
	root = json_loadf(f, 0, &jerr);
	fclose(f);
	if (!root)
		return kpl_errf(err, KPL_ECORRUPT, "%s:%d: %s", path, jerr.line, jerr.text);
	gs = json_object_get(root, "global_seq");
	chats = json_object_get(root, "chats");
	if (!json_is_integer(gs) || json_integer_value(gs) < 0 || !json_is_object(chats)) {
		json_decref(root);
		return kpl_errf(err, KPL_ECORRUPT,
				"%s: want {\"global_seq\": N, \"chats\": {...}}", path);
	}
	for (size_t i = 0; i < n; i++) {
		json_t *v = json_object_get(chats, names[i]);

		/* A chat new to the config starts where the others resume. */
		acked[i] = (uint64_t)json_integer_value(gs);
		if (json_is_integer(v) && json_integer_value(v) >= json_integer_value(gs))
			acked[i] = (uint64_t)json_integer_value(v);
	}
	json_decref(root);
	return 0;
}

int chatbot_state_save(const char *path, char *const *names, size_t n,
		       const uint64_t *acked, struct kpl_err *err)
{
	json_t *root = json_object(), *chats = json_object();
	uint64_t min = UINT64_MAX;
	char *tmp = kpl_asprintf("%s.tmp", path), *dir_copy = kpl_strdup(path), *text;
	int fd = -1, dfd, rc = 0;
	size_t len, off = 0;

	for (size_t i = 0; i < n; i++) {
		json_object_set_new(chats, names[i], json_integer((json_int_t)acked[i]));
		if (acked[i] < min)
			min = acked[i];
	}
	if (n == 0)
		min = 0;
	json_object_set_new(root, "global_seq", json_integer((json_int_t)min));
	json_object_set_new(root, "chats", chats);
	text = json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER);
	json_decref(root);
	len = strlen(text);
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0) {
		rc = kpl_errf(err, KPL_EIO, "%s: %s", tmp, strerror(errno));
		goto fail;
	}
	while (off < len) {
		ssize_t w = write(fd, text + off, len - off);

		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0) {
			rc = kpl_errf(err, KPL_EIO, "%s: %s", tmp, strerror(errno));
			goto fail;
		}
		off += (size_t)w;
	}
	if (fsync(fd) < 0) {
		rc = kpl_errf(err, KPL_EIO, "%s: fsync: %s", tmp, strerror(errno));
		goto fail;
	}
	close(fd);
	fd = -1;
	if (rename(tmp, path) < 0) {
		rc = kpl_errf(err, KPL_EIO, "rename %s: %s", tmp, strerror(errno));
		goto fail;
	}
	/* The rename is durable once the directory is. */
	dfd = open(dirname(dir_copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dfd >= 0) {
		fsync(dfd);
		close(dfd);
	}
fail:
	if (fd >= 0)
		close(fd);
	if (rc)
		unlink(tmp);
	free(text);
	free(tmp);
	free(dir_copy);
	return rc;
}
