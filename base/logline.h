/*
 * logline.h - log text made fit for events: valid UTF-8 (protobuf `string`
 * fields must be; strict clients such as Python grpc drop a stream on a bad
 * one) and cut into event-sized pieces only between characters.
 *
 * Pure functions, no I/O, any thread. The shim (a separate process) uses
 * logline_utf8_cut so that the 8 KiB records it writes never end inside a
 * character; kpld cleans and splits what it stores.
 */
#ifndef KPL_LOGLINE_H
#define KPL_LOGLINE_H

#include <stddef.h>

/*
 * The length of the longest prefix of p[0..len) that does not end inside a
 * multi-byte sequence: len, or less by the 1 to 3 bytes of a sequence the
 * text cut short. Only complete-looking starts are held back; bytes that are
 * invalid anyway stay (logline_utf8_clean replaces them).
 */
size_t logline_utf8_cut(const char *p, size_t len);

/*
 * Returns a malloc'd, NUL-terminated copy of p[0..len) in valid UTF-8: each
 * byte that does not start a well-formed sequence (stray continuation,
 * overlong form, surrogate, past U+10FFFF, cut short) becomes U+FFFD. The
 * copy's length goes to *out_len (at most 3 * len).
 */
char *logline_utf8_clean(const char *p, size_t len, size_t *out_len);

/*
 * The length of the next piece of valid UTF-8 text p[0..len) to put in one
 * event: len if len <= max, else the longest prefix of at most max bytes
 * that ends between characters (never 0 for max >= 4).
 */
size_t logline_split(const char *p, size_t len, size_t max);

#endif
