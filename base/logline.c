/* logline.c - UTF-8 repair and splitting of log text (logline.h). */
#include "base/logline.h"

#include <stdint.h>
#include <string.h>

#include "base/kpl.h"

/* The length a lead byte announces, or 0 for a byte no sequence starts
 * with (a continuation byte, 0xC0, 0xC1, 0xF5..0xFF). */
static size_t seq_len(unsigned char c)
{
	if (c < 0x80)
		return 1;
	if (c >= 0xC2 && c <= 0xDF)
		return 2;
	if (c >= 0xE0 && c <= 0xEF)
		return 3;
	if (c >= 0xF0 && c <= 0xF4)
		return 4;
	return 0;
}

/* The length of the well-formed sequence at p[0..len), or 0 (RFC 3629's
 * table: no overlong forms, no surrogates, nothing past U+10FFFF). */
static size_t valid_seq(const unsigned char *p, size_t len)
{
	size_t n = seq_len(p[0]);
	unsigned char lo = 0x80, hi = 0xBF;

	if (n <= 1 || n > len)
		return n == 1 ? 1 : 0;
	/* The second byte's range depends on the lead byte. */
	if (p[0] == 0xE0)
		lo = 0xA0;
	else if (p[0] == 0xED)
		hi = 0x9F;
	else if (p[0] == 0xF0)
		lo = 0x90;
	else if (p[0] == 0xF4)
		hi = 0x8F;
	if (p[1] < lo || p[1] > hi)
		return 0;
	for (size_t i = 2; i < n; i++)
		if ((p[i] & 0xC0) != 0x80)
			return 0;
	return n;
}

size_t logline_utf8_cut(const char *p, size_t len)
{
	const unsigned char *u = (const unsigned char *)p;

	/* A lead byte among the last three bytes whose sequence would need
	 * more bytes than there are: cut before it. */
	for (size_t back = 1; back <= 3 && back <= len; back++) {
		unsigned char c = u[len - back];
		size_t n;

		if ((c & 0xC0) == 0x80)
			continue; /* a continuation byte: look further back */
		n = seq_len(c);
		return n > back ? len - back : len;
	}
	return len;
}

char *logline_utf8_clean(const char *p, size_t len, size_t *out_len)
{
	const unsigned char *u = (const unsigned char *)p;
	char *out = kpl_malloc(3 * len + 1);
	size_t o = 0;

	for (size_t i = 0; i < len;) {
		size_t n = valid_seq(u + i, len - i);

		if (n) {
			memcpy(out + o, p + i, n);
			o += n;
			i += n;
		} else {
			memcpy(out + o, "\xEF\xBF\xBD", 3); /* U+FFFD */
			o += 3;
			i++;
		}
	}
	out[o] = '\0';
	*out_len = o;
	return out;
}

size_t logline_split(const char *p, size_t len, size_t max)
{
	size_t n;

	if (len <= max)
		return len;
	n = max;
	/* p[n] is where the next piece starts: not a continuation byte. */
	while (n > 0 && ((unsigned char)p[n] & 0xC0) == 0x80)
		n--;
	return n ? n : max;
}
