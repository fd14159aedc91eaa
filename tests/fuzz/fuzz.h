/*
 * fuzz.h - what the fuzz targets of tests/fuzz share: the libFuzzer entry
 * points and a reader for the text form their seeds are written in.
 *
 * Most targets take an HTTP reply, or a few in a row, as text:
 *
 *   200                         status line: a number (or "E" for a reply
 *   Content-Type: text/plain    that never came: a transport error)
 *                               headers until an empty line
 *   {"the": "body"}             the body, up to the end or to a line "%%"
 *   %%
 *   404                         the next reply
 *
 * so a seed reads like the exchange it stands for, and libFuzzer's
 * mutations of it still split into replies. Everything here is bounded by
 * the input; nothing is kept between inputs.
 */
#ifndef KPL_FUZZ_H
#define KPL_FUZZ_H

#include <stddef.h>
#include <stdint.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

#define FZ_MAX_HEADERS 16

/* One reply cut out of the input. Strings are NUL-terminated copies owned
 * by the reply (fz_reply_release). */
struct fz_reply {
	int error; /* 1: "E" in place of a status */
	long status;
	char *names[FZ_MAX_HEADERS];
	char *values[FZ_MAX_HEADERS];
	size_t n_headers;
	char *body; /* may hold NULs; body_len bytes */
	size_t body_len;
};

/* A cursor over the input. */
struct fz_in {
	const char *p;
	size_t n;
};

/* The next reply; 0 when the input is used up (r is then empty). */
int fz_next_reply(struct fz_in *in, struct fz_reply *r);
void fz_reply_release(struct fz_reply *r);
/* The first header called name (case-insensitive), or NULL. */
const char *fz_header(const struct fz_reply *r, const char *name);
/* A NUL-terminated malloc'd copy of p[0..n). */
char *fz_strndup(const void *p, size_t n);

#endif
