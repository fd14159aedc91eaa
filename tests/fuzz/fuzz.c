/* fuzz.c - see fuzz.h. */
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "tests/fuzz/fuzz.h"

char *fz_strndup(const void *p, size_t n)
{
	char *s = malloc(n + 1);

	if (!s)
		abort();
	memcpy(s, p, n);
	s[n] = '\0';
	return s;
}

/* The next line without its '\n' (len in *len); NULL at the end. */
static const char *next_line(struct fz_in *in, size_t *len)
{
	const char *s = in->p, *nl;

	if (in->n == 0)
		return NULL;
	nl = memchr(s, '\n', in->n);
	*len = nl ? (size_t)(nl - s) : in->n;
	in->p += *len + (nl ? 1 : 0);
	in->n -= *len + (nl ? 1 : 0);
	return s;
}

int fz_next_reply(struct fz_in *in, struct fz_reply *r)
{
	const char *line, *body, *end;
	size_t len;

	memset(r, 0, sizeof *r);
	if (!(line = next_line(in, &len)))
		return 0;
	if (len > 0 && line[0] == 'E') {
		r->error = 1;
	} else {
		char *s = fz_strndup(line, len > 20 ? 20 : len);
		r->status = strtol(s, NULL, 10);
		free(s);
	}
	while ((line = next_line(in, &len)) != NULL && len > 0) {
		const char *colon = memchr(line, ':', len);
		size_t k;

		if (!colon || r->n_headers == FZ_MAX_HEADERS)
			continue;
		k = (size_t)(colon - line);
		r->names[r->n_headers] = fz_strndup(line, k);
		colon++;
		while (colon < line + len && *colon == ' ')
			colon++;
		r->values[r->n_headers] = fz_strndup(colon, (size_t)(line + len - colon));
		r->n_headers++;
	}
	/* The body runs to a line "%%" or the end. */
	body = in->p;
	end = NULL;
	for (const char *q = in->p; q + 3 <= in->p + in->n; q++)
		if (q[0] == '%' && q[1] == '%' && (q == in->p || q[-1] == '\n') &&
		    (q + 2 == in->p + in->n || q[2] == '\n')) {
			end = q;
			break;
		}
	if (end) {
		len = (size_t)(end - body);
		if (len > 0 && body[len - 1] == '\n')
			len--;
		in->n -= (size_t)(end - in->p);
		in->p = end;
		next_line(in, &(size_t){ 0 }); /* the "%%" */
	} else {
		len = in->n;
		in->p += in->n;
		in->n = 0;
	}
	r->body = fz_strndup(body, len);
	r->body_len = len;
	return 1;
}

void fz_reply_release(struct fz_reply *r)
{
	for (size_t i = 0; i < r->n_headers; i++) {
		free(r->names[i]);
		free(r->values[i]);
	}
	free(r->body);
	memset(r, 0, sizeof *r);
}

const char *fz_header(const struct fz_reply *r, const char *name)
{
	for (size_t i = 0; i < r->n_headers; i++)
		if (strcasecmp(r->names[i], name) == 0)
			return r->values[i];
	return NULL;
}
