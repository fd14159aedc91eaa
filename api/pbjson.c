/*
 * pbjson.c - proto3 JSON <-> protobuf-c messages by descriptor (pbjson.h).
 *
 * JSON text is parsed and printed by jansson; this file walks the message
 * descriptors. Decoding fills a message made with protobuf_c_message_init,
 * allocating every string, array and sub-message with malloc, so that
 * protobuf_c_message_free_unpacked(m, NULL) frees a message whatever point
 * decoding failed at: each field is whole (array and count agree) before
 * the next is touched.
 */
#include "api/pbjson.h"

#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define TIMESTAMP_NAME "google.protobuf.Timestamp"

/* Where the walker is, for error messages: "stages[2].name". */
struct path {
	char buf[256];
};

static void path_push(struct path *p, size_t *mark, const char *name, long index)
{
	size_t n = strlen(p->buf);

	*mark = n;
	if (index >= 0)
		snprintf(p->buf + n, sizeof p->buf - n, "[%ld]", index);
	else
		snprintf(p->buf + n, sizeof p->buf - n, "%s%s", n ? "." : "", name);
}

static void path_pop(struct path *p, size_t mark)
{
	p->buf[mark] = '\0';
}

static int bad(struct kpl_err *err, const struct path *p, const char *what)
{
	return kpl_errf(err, KPL_EINVAL, "%s: %s", p->buf[0] ? p->buf : "body", what);
}

void pbjson_json_name(const char *proto_name, char *buf, size_t size)
{
	size_t n = 0;
	bool up = false;

	if (!size)
		return;
	for (const char *s = proto_name; *s && n + 1 < size; s++) {
		if (*s == '_') {
			up = true;
			continue;
		}
		buf[n++] = up && *s >= 'a' && *s <= 'z' ? (char)(*s - 'a' + 'A') : *s;
		up = false;
	}
	buf[n] = '\0';
}

static bool is_map_entry(const ProtobufCFieldDescriptor *f)
{
	const ProtobufCMessageDescriptor *d = f->descriptor;
	size_t n;

	if (f->type != PROTOBUF_C_TYPE_MESSAGE || f->label != PROTOBUF_C_LABEL_REPEATED)
		return false;
	n = strlen(d->name);
	return n > 5 && strcmp(d->name + n - 5, "Entry") == 0 && d->n_fields == 2 &&
	       strcmp(d->fields[0].name, "key") == 0 && d->fields[0].id == 1 &&
	       strcmp(d->fields[1].name, "value") == 0 && d->fields[1].id == 2;
}

static bool is_timestamp(const ProtobufCMessageDescriptor *d)
{
	return strcmp(d->name, TIMESTAMP_NAME) == 0;
}

static void *member(const void *m, const ProtobufCFieldDescriptor *f)
{
	return (char *)m + f->offset;
}

static size_t *quantity(const void *m, const ProtobufCFieldDescriptor *f)
{
	return (size_t *)(void *)((char *)m + f->quantifier_offset);
}

static size_t scalar_size(ProtobufCType t)
{
	switch (t) {
	case PROTOBUF_C_TYPE_INT32: case PROTOBUF_C_TYPE_SINT32: case PROTOBUF_C_TYPE_SFIXED32:
	case PROTOBUF_C_TYPE_UINT32: case PROTOBUF_C_TYPE_FIXED32: case PROTOBUF_C_TYPE_ENUM:
		return 4;
	case PROTOBUF_C_TYPE_INT64: case PROTOBUF_C_TYPE_SINT64: case PROTOBUF_C_TYPE_SFIXED64:
	case PROTOBUF_C_TYPE_UINT64: case PROTOBUF_C_TYPE_FIXED64:
		return 8;
	case PROTOBUF_C_TYPE_FLOAT: return sizeof(float);
	case PROTOBUF_C_TYPE_DOUBLE: return sizeof(double);
	case PROTOBUF_C_TYPE_BOOL: return sizeof(protobuf_c_boolean);
	case PROTOBUF_C_TYPE_STRING: return sizeof(char *);
	case PROTOBUF_C_TYPE_BYTES: return sizeof(ProtobufCBinaryData);
	case PROTOBUF_C_TYPE_MESSAGE: return sizeof(ProtobufCMessage *);
	}
	return 0;
}

/* ---------------------------------------------------------------------- */
/* Base64 */

static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static char *b64_encode(const uint8_t *p, size_t n)
{
	char *out = kpl_malloc((n + 2) / 3 * 4 + 1), *o = out;

	for (size_t i = 0; i < n; i += 3) {
		uint32_t v = (uint32_t)p[i] << 16 | (i + 1 < n ? (uint32_t)p[i + 1] << 8 : 0) |
			     (i + 2 < n ? p[i + 2] : 0);
		*o++ = b64[v >> 18 & 63];
		*o++ = b64[v >> 12 & 63];
		*o++ = i + 1 < n ? b64[v >> 6 & 63] : '=';
		*o++ = i + 2 < n ? b64[v & 63] : '=';
	}
	*o = '\0';
	return out;
}

static int b64_val(char c)
{
	if (c >= 'A' && c <= 'Z') return c - 'A';
	if (c >= 'a' && c <= 'z') return c - 'a' + 26;
	if (c >= '0' && c <= '9') return c - '0' + 52;
	if (c == '+' || c == '-') return 62;
	if (c == '/' || c == '_') return 63;
	return -1;
}

/* Standard or URL-safe, padded or not. -1 if malformed. */
static int b64_decode(const char *s, size_t n, uint8_t **out, size_t *out_len)
{
	uint8_t *o;
	uint32_t acc = 0;
	size_t k = 0, bits = 0;

	while (n && s[n - 1] == '=')
		n--;
	o = kpl_malloc(n * 3 / 4 + 1);
	for (size_t i = 0; i < n; i++) {
		int v = b64_val(s[i]);
		if (v < 0) {
			free(o);
			return -1;
		}
		acc = acc << 6 | (uint32_t)v;
		bits += 6;
		if (bits >= 8) {
			bits -= 8;
			o[k++] = (uint8_t)(acc >> bits);
		}
	}
	if (bits >= 6) {
		free(o);
		return -1;
	}
	*out = o;
	*out_len = k;
	return 0;
}

/* ---------------------------------------------------------------------- */
/* Timestamps: RFC 3339 */

static void ts_format(int64_t sec, int32_t nanos, char *buf, size_t size)
{
	time_t t = (time_t)sec;
	struct tm tm;
	size_t n;

	if (!gmtime_r(&t, &tm)) {
		snprintf(buf, size, "1970-01-01T00:00:00Z");
		return;
	}
	/* %04d: strftime's %Y does not pad years before 1000. */
	n = (size_t)snprintf(buf, size, "%04d-%02d-%02dT%02d:%02d:%02d", tm.tm_year + 1900,
			     tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec);
	if (n >= size)
		return;
	if (nanos <= 0 || nanos > 999999999)
		snprintf(buf + n, size - n, "Z");
	else if (nanos % 1000000 == 0)
		snprintf(buf + n, size - n, ".%03dZ", nanos / 1000000);
	else if (nanos % 1000 == 0)
		snprintf(buf + n, size - n, ".%06dZ", nanos / 1000);
	else
		snprintf(buf + n, size - n, ".%09dZ", nanos);
}

static int digits(const char **s, int n)
{
	int v = 0;

	for (int i = 0; i < n; i++, (*s)++) {
		if (**s < '0' || **s > '9')
			return -1;
		v = v * 10 + (**s - '0');
	}
	return v;
}

/* "2026-03-01T10:00:00.5+01:00" -> seconds, nanos. */
static int ts_parse(const char *s, int64_t *sec, int32_t *nanos)
{
	struct tm tm = { 0 };
	int y, mo, d, h, mi, se, off = 0;
	int32_t ns = 0;

	if ((y = digits(&s, 4)) < 1 || *s++ != '-' || (mo = digits(&s, 2)) < 1 || mo > 12 ||
	    *s++ != '-' || (d = digits(&s, 2)) < 1 || d > 31 || (*s != 'T' && *s != 't') ||
	    !*s++ || (h = digits(&s, 2)) < 0 || h > 23 || *s++ != ':' ||
	    (mi = digits(&s, 2)) < 0 || mi > 59 || *s++ != ':' || (se = digits(&s, 2)) < 0 ||
	    se > 60)
		return -1;
	if (*s == '.') {
		int nd = 0;
		s++;
		while (*s >= '0' && *s <= '9') {
			if (nd < 9) {
				ns = ns * 10 + (*s - '0');
				nd++;
			}
			s++;
		}
		if (nd == 0)
			return -1;
		while (nd++ < 9)
			ns *= 10;
	}
	if (*s == 'Z' || *s == 'z') {
		s++;
	} else if (*s == '+' || *s == '-') {
		int sign = *s++ == '-' ? -1 : 1, oh, om;
		if ((oh = digits(&s, 2)) < 0 || oh > 23 || *s++ != ':' ||
		    (om = digits(&s, 2)) < 0 || om > 59)
			return -1;
		off = sign * (oh * 3600 + om * 60);
	} else {
		return -1;
	}
	if (*s)
		return -1;
	tm.tm_year = y - 1900;
	tm.tm_mon = mo - 1;
	tm.tm_mday = d;
	tm.tm_hour = h;
	tm.tm_min = mi;
	tm.tm_sec = se;
	*sec = (int64_t)timegm(&tm) - off;
	*nanos = ns;
	return 0;
}

/* ---------------------------------------------------------------------- */
/* Decoding */

static int decode_message(const ProtobufCMessageDescriptor *d, json_t *obj, ProtobufCMessage **out,
			  struct path *p, int depth, struct kpl_err *err);

static ProtobufCMessage *message_new(const ProtobufCMessageDescriptor *d)
{
	ProtobufCMessage *m = kpl_malloc(d->sizeof_message);

	protobuf_c_message_init(d, m);
	return m;
}

/* A whole number from a JSON number or a string of one. */
static int get_int(json_t *v, bool is_signed, int64_t *si, uint64_t *ui)
{
	if (json_is_integer(v)) {
		json_int_t n = json_integer_value(v);
		if (!is_signed && n < 0)
			return -1;
		*si = n;
		*ui = (uint64_t)n;
		return 0;
	}
	if (json_is_real(v)) {
		double x = json_real_value(v);
		/* Exact powers of two as bounds, and only the cast that fits:
		 * 1.48e19 into int64_t was undefined (pbjson_fuzz, UBSan). */
		if (x != floor(x))
			return -1;
		if (is_signed) {
			if (x < -9223372036854775808.0 || x >= 9223372036854775808.0)
				return -1;
			*si = (int64_t)x;
			*ui = (uint64_t)*si;
		} else {
			if (x < 0 || x >= 18446744073709551616.0)
				return -1;
			*ui = (uint64_t)x;
			*si = (int64_t)*ui;
		}
		return 0;
	}
	if (json_is_string(v)) {
		const char *s = json_string_value(v);
		char *end;
		errno = 0;
		if (!*s || *s == ' ' || (!is_signed && *s == '-'))
			return -1;
		if (is_signed)
			*si = strtoll(s, &end, 10), *ui = (uint64_t)*si;
		else
			*ui = strtoull(s, &end, 10), *si = (int64_t)*ui;
		return *end || errno ? -1 : 0;
	}
	return -1;
}

/* Stores one scalar (or string, bytes, enum, message) value at dst. */
static int decode_value(const ProtobufCFieldDescriptor *f, json_t *v, void *dst, struct path *p,
			int depth, struct kpl_err *err)
{
	int64_t si = 0;
	uint64_t ui = 0;
	char msg[160];

	switch (f->type) {
	case PROTOBUF_C_TYPE_INT32: case PROTOBUF_C_TYPE_SINT32: case PROTOBUF_C_TYPE_SFIXED32:
		if (get_int(v, true, &si, &ui) || si < INT32_MIN || si > INT32_MAX)
			return bad(err, p, "want a 32-bit whole number");
		*(int32_t *)dst = (int32_t)si;
		return 0;
	case PROTOBUF_C_TYPE_UINT32: case PROTOBUF_C_TYPE_FIXED32:
		if (get_int(v, false, &si, &ui) || ui > UINT32_MAX)
			return bad(err, p, "want a 32-bit whole number, not negative");
		*(uint32_t *)dst = (uint32_t)ui;
		return 0;
	case PROTOBUF_C_TYPE_INT64: case PROTOBUF_C_TYPE_SINT64: case PROTOBUF_C_TYPE_SFIXED64:
		if (get_int(v, true, &si, &ui))
			return bad(err, p, "want a 64-bit whole number (a string or a number)");
		*(int64_t *)dst = si;
		return 0;
	case PROTOBUF_C_TYPE_UINT64: case PROTOBUF_C_TYPE_FIXED64:
		if (get_int(v, false, &si, &ui))
			return bad(err, p, "want a 64-bit whole number, not negative (a string or "
				      "a number)");
		*(uint64_t *)dst = ui;
		return 0;
	case PROTOBUF_C_TYPE_FLOAT: case PROTOBUF_C_TYPE_DOUBLE: {
		double x;
		if (json_is_number(v)) {
			x = json_number_value(v);
		} else if (json_is_string(v)) {
			const char *s = json_string_value(v);
			char *end;
			if (strcmp(s, "NaN") == 0)
				x = NAN;
			else if (strcmp(s, "Infinity") == 0)
				x = INFINITY;
			else if (strcmp(s, "-Infinity") == 0)
				x = -INFINITY;
			else if (!*s || (x = strtod(s, &end), *end))
				return bad(err, p, "want a number");
		} else {
			return bad(err, p, "want a number");
		}
		if (f->type == PROTOBUF_C_TYPE_FLOAT)
			*(float *)dst = (float)x;
		else
			*(double *)dst = x;
		return 0;
	}
	case PROTOBUF_C_TYPE_BOOL:
		if (!json_is_boolean(v))
			return bad(err, p, "want true or false");
		*(protobuf_c_boolean *)dst = json_is_true(v);
		return 0;
	case PROTOBUF_C_TYPE_ENUM: {
		const ProtobufCEnumDescriptor *ed = f->descriptor;
		const ProtobufCEnumValue *ev = NULL;
		if (json_is_string(v))
			ev = protobuf_c_enum_descriptor_get_value_by_name(ed, json_string_value(v));
		else if (json_is_integer(v) && json_integer_value(v) >= INT32_MIN &&
			 json_integer_value(v) <= INT32_MAX)
			ev = protobuf_c_enum_descriptor_get_value(ed, (int)json_integer_value(v));
		if (!ev) {
			snprintf(msg, sizeof msg, "want a value of %s, such as \"%s\"", ed->name,
				 ed->n_values > 1 ? ed->values[1].name : ed->values[0].name);
			return bad(err, p, msg);
		}
		*(int *)dst = ev->value;
		return 0;
	}
	case PROTOBUF_C_TYPE_STRING:
		if (!json_is_string(v))
			return bad(err, p, "want a string");
		*(char **)dst = kpl_strdup(json_string_value(v));
		return 0;
	case PROTOBUF_C_TYPE_BYTES: {
		ProtobufCBinaryData *b = dst;
		if (!json_is_string(v) ||
		    b64_decode(json_string_value(v), json_string_length(v), &b->data, &b->len))
			return bad(err, p, "want base64 text");
		return 0;
	}
	case PROTOBUF_C_TYPE_MESSAGE: {
		const ProtobufCMessageDescriptor *md = f->descriptor;
		if (is_timestamp(md)) {
			ProtobufCMessage *ts;
			int64_t sec;
			int32_t ns;
			if (!json_is_string(v) || ts_parse(json_string_value(v), &sec, &ns))
				return bad(err, p, "want an RFC 3339 time such as "
					      "\"2026-03-01T10:00:00Z\"");
			ts = message_new(md);
			*(int64_t *)member(ts, &md->fields[0]) = sec;
			*(int32_t *)member(ts, &md->fields[1]) = ns;
			*(ProtobufCMessage **)dst = ts;
			return 0;
		}
		return decode_message(md, v, (ProtobufCMessage **)dst, p, depth + 1, err);
	}
	}
	return bad(err, p, "unsupported field type");
}

/* Appends room for one more element to a repeated field; returns it. */
static void *repeated_add(void *m, const ProtobufCFieldDescriptor *f)
{
	size_t *n = quantity(m, f), sz = scalar_size(f->type);
	void **arr = member(m, f);
	char *a = kpl_realloc(*arr, (*n + 1) * sz);

	memset(a + *n * sz, 0, sz);
	*arr = a;
	return a + (*n)++ * sz;
}

static int decode_map(const ProtobufCFieldDescriptor *f, json_t *v, void *m, struct path *p,
		      int depth, struct kpl_err *err)
{
	const ProtobufCMessageDescriptor *ed = f->descriptor;
	const char *key;
	json_t *val;
	size_t mark;
	int rc;

	if (!json_is_object(v))
		return bad(err, p, "want an object");
	if (json_object_size(v) > PBJSON_MAX_ITEMS)
		return bad(err, p, "too many entries");
	json_object_foreach(v, key, val) {
		ProtobufCMessage *e, **slot;
		json_t *jk;

		path_push(p, &mark, key, -1);
		if (json_is_null(val)) {
			rc = bad(err, p, "null is not a map value");
			goto out;
		}
		e = message_new(ed);
		slot = repeated_add(m, f);
		*slot = e;
		/* The key as its type: a string for string keys, else parsed. */
		jk = json_string(key);
		if (ed->fields[0].type != PROTOBUF_C_TYPE_STRING &&
		    ed->fields[0].type != PROTOBUF_C_TYPE_BOOL) {
			rc = decode_value(&ed->fields[0], jk, member(e, &ed->fields[0]), p, depth,
					  err);
		} else if (ed->fields[0].type == PROTOBUF_C_TYPE_BOOL) {
			json_t *jb = strcmp(key, "true") == 0 ? json_true() :
				     strcmp(key, "false") == 0 ? json_false() : json_null();
			rc = decode_value(&ed->fields[0], jb, member(e, &ed->fields[0]), p, depth,
					  err);
			json_decref(jb);
		} else {
			rc = decode_value(&ed->fields[0], jk, member(e, &ed->fields[0]), p, depth,
					  err);
		}
		json_decref(jk);
		if (rc == 0)
			rc = decode_value(&ed->fields[1], val, member(e, &ed->fields[1]), p, depth,
					  err);
out:
		path_pop(p, mark);
		if (rc)
			return rc;
	}
	return 0;
}

static const ProtobufCFieldDescriptor *field_by_json_name(const ProtobufCMessageDescriptor *d,
							  const char *name)
{
	const ProtobufCFieldDescriptor *f = protobuf_c_message_descriptor_get_field_by_name(d, name);
	char jn[128];

	if (f)
		return f;
	for (unsigned i = 0; i < d->n_fields; i++) {
		pbjson_json_name(d->fields[i].name, jn, sizeof jn);
		if (strcmp(jn, name) == 0)
			return &d->fields[i];
	}
	return NULL;
}

static int decode_field(void *m, const ProtobufCFieldDescriptor *f, json_t *v, struct path *p,
			int depth, struct kpl_err *err)
{
	size_t mark, i;
	json_t *el;
	int rc;

	if (f->label != PROTOBUF_C_LABEL_REPEATED) {
		if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) {
			uint32_t *which = (uint32_t *)(void *)((char *)m + f->quantifier_offset);
			if (*which && *which != f->id)
				return bad(err, p, "another field of its oneof is set");
			*which = f->id;
		} else if (f->label == PROTOBUF_C_LABEL_OPTIONAL) {
			*(protobuf_c_boolean *)((char *)m + f->quantifier_offset) = 1;
		}
		/* A string set twice (path and body) frees the first. */
		if (f->type == PROTOBUF_C_TYPE_STRING) {
			char **sp = member(m, f);
			if (*sp && *sp != (const char *)f->default_value) {
				free(*sp);
				*sp = (char *)f->default_value;
			}
		} else if (f->type == PROTOBUF_C_TYPE_MESSAGE) {
			ProtobufCMessage **mp = member(m, f);
			if (*mp) {
				protobuf_c_message_free_unpacked(*mp, NULL);
				*mp = NULL;
			}
		}
		return decode_value(f, v, member(m, f), p, depth, err);
	}
	if (is_map_entry(f))
		return decode_map(f, v, m, p, depth, err);
	if (!json_is_array(v))
		return bad(err, p, "want an array");
	if (json_array_size(v) + *quantity(m, f) > PBJSON_MAX_ITEMS)
		return bad(err, p, "too many elements");
	json_array_foreach(v, i, el) {
		void *slot;

		path_push(p, &mark, "", (long)i);
		if (json_is_null(el)) {
			rc = bad(err, p, "null is not an array element");
		} else {
			slot = repeated_add(m, f);
			rc = decode_value(f, el, slot, p, depth, err);
		}
		path_pop(p, mark);
		if (rc)
			return rc;
	}
	return 0;
}

static int decode_message(const ProtobufCMessageDescriptor *d, json_t *obj, ProtobufCMessage **out,
			  struct path *p, int depth, struct kpl_err *err)
{
	ProtobufCMessage *m;
	const char *key;
	json_t *v;
	size_t mark;
	int rc = 0;

	*out = NULL;
	if (depth > PBJSON_MAX_DEPTH)
		return bad(err, p, "nested too deep");
	if (!json_is_object(obj))
		return bad(err, p, "want an object");
	m = message_new(d);
	*out = m;
	json_object_foreach(obj, key, v) {
		const ProtobufCFieldDescriptor *f = field_by_json_name(d, key);
		char msg[200];

		path_push(p, &mark, key, -1);
		if (!f) {
			snprintf(msg, sizeof msg, "unknown field of %s", d->name);
			rc = bad(err, p, msg);
		} else if (!json_is_null(v)) {
			rc = decode_field(m, f, v, p, depth, err);
		}
		path_pop(p, mark);
		if (rc)
			return rc;
	}
	return 0;
}

/* Nesting of a JSON value, up to limit + 1 (jansson allows 2048). */
static int json_depth(json_t *v, int limit)
{
	int max = 0, d;
	const char *k;
	json_t *el;
	size_t i;

	if (limit < 0)
		return 1;
	if (json_is_object(v)) {
		json_object_foreach(v, k, el)
			if ((d = json_depth(el, limit - 1)) > max)
				max = d;
	} else if (json_is_array(v)) {
		json_array_foreach(v, i, el)
			if ((d = json_depth(el, limit - 1)) > max)
				max = d;
	} else {
		return 0;
	}
	return max + 1;
}

int pbjson_decode(const ProtobufCMessageDescriptor *d, const char *json, size_t len,
		  ProtobufCMessage **out, struct kpl_err *err)
{
	struct path p = { "" };
	json_error_t je;
	json_t *root;
	size_t i;
	int rc;

	*out = NULL;
	for (i = 0; i < len && (json[i] == ' ' || json[i] == '\t' || json[i] == '\r' ||
				json[i] == '\n');
	     i++)
		;
	if (i == len) {
		*out = message_new(d);
		return 0;
	}
	root = json_loadb(json, len, JSON_REJECT_DUPLICATES, &je);
	if (!root)
		return kpl_errf(err, KPL_EINVAL, "body: not JSON: %s (line %d, column %d)", je.text,
				je.line, je.column);
	if (json_depth(root, PBJSON_MAX_DEPTH) > PBJSON_MAX_DEPTH) {
		json_decref(root);
		return kpl_errf(err, KPL_EINVAL, "body: nested deeper than %d", PBJSON_MAX_DEPTH);
	}
	rc = decode_message(d, root, out, &p, 0, err);
	json_decref(root);
	if (rc && *out) {
		protobuf_c_message_free_unpacked(*out, NULL);
		*out = NULL;
	}
	return rc;
}

int pbjson_set_field(ProtobufCMessage *m, const char *name, const char *value,
		     struct kpl_err *err)
{
	struct path p = { "" };
	const ProtobufCMessageDescriptor *d = m->descriptor;
	const ProtobufCFieldDescriptor *f;
	const char *dot = strchr(name, '.');
	char head[128];
	json_t *v;
	int rc;

	snprintf(head, sizeof head, "%.*s", dot ? (int)(dot - name) : (int)strlen(name), name);
	snprintf(p.buf, sizeof p.buf, "%s", name);
	if (!(f = field_by_json_name(d, head))) {
		char msg[200];
		snprintf(msg, sizeof msg, "unknown field of %s", d->name);
		return bad(err, &p, msg);
	}
	if (dot) {
		ProtobufCMessage **sub = member(m, f);
		if (f->type != PROTOBUF_C_TYPE_MESSAGE || f->label == PROTOBUF_C_LABEL_REPEATED ||
		    is_timestamp(f->descriptor))
			return bad(err, &p, "not a message field");
		if (!*sub)
			*sub = message_new(f->descriptor);
		return pbjson_set_field(*sub, dot + 1, value, err);
	}
	if (f->type == PROTOBUF_C_TYPE_MESSAGE && !is_timestamp(f->descriptor))
		return bad(err, &p, "cannot be set from text (send it in a JSON body)");
	/* The text as JSON would carry it: numbers and bools are parsed by
	 * their field's rules from a string, except bool. */
	if (f->type == PROTOBUF_C_TYPE_BOOL)
		v = strcmp(value, "true") == 0 ? json_true() :
		    strcmp(value, "false") == 0 ? json_false() : json_string(value);
	else if (f->type == PROTOBUF_C_TYPE_ENUM && value[0] >= '0' && value[0] <= '9')
		v = json_integer(strtoll(value, NULL, 10));
	else
		v = json_string(value);
	if (!v)
		return bad(err, &p, "not UTF-8 text");
	if (f->label == PROTOBUF_C_LABEL_REPEATED) {
		json_t *arr = json_array();
		json_array_append(arr, v);
		rc = decode_field(m, f, arr, &p, 0, err);
		json_decref(arr);
	} else {
		rc = decode_field(m, f, v, &p, 0, err);
	}
	json_decref(v);
	return rc;
}

/* ---------------------------------------------------------------------- */
/* Encoding */

/* A JSON string of s; bytes that are not UTF-8 become U+FFFD. */
static json_t *jstr(const char *s)
{
	json_t *v = json_string(s);
	size_t n, k = 0;
	char *fix;

	if (v)
		return v;
	n = strlen(s);
	fix = kpl_malloc(n * 3 + 1);
	for (size_t i = 0; i < n;) {
		const unsigned char *u = (const unsigned char *)s + i;
		size_t len = u[0] < 0x80 ? 1 : (u[0] & 0xE0) == 0xC0 ? 2 : (u[0] & 0xF0) == 0xE0 ? 3 :
			     (u[0] & 0xF8) == 0xF0 ? 4 : 0;
		bool ok = len > 0 && i + len <= n;
		for (size_t j = 1; ok && j < len; j++)
			ok = (u[j] & 0xC0) == 0x80;
		if (ok) {
			/* json_stringn checks the rest (overlong forms, ranges). */
			json_t *t = json_stringn((const char *)u, len);
			ok = t != NULL;
			json_decref(t);
		}
		if (ok) {
			memcpy(fix + k, u, len);
			k += len;
			i += len;
		} else {
			memcpy(fix + k, "\xEF\xBF\xBD", 3);
			k += 3;
			i++;
		}
	}
	v = json_stringn(fix, k);
	free(fix);
	return v ? v : json_string("");
}

static json_t *encode_message(const ProtobufCMessage *m);

static json_t *encode_value(const ProtobufCFieldDescriptor *f, const void *src)
{
	char buf[64];

	switch (f->type) {
	case PROTOBUF_C_TYPE_INT32: case PROTOBUF_C_TYPE_SINT32: case PROTOBUF_C_TYPE_SFIXED32:
		return json_integer(*(const int32_t *)src);
	case PROTOBUF_C_TYPE_UINT32: case PROTOBUF_C_TYPE_FIXED32:
		return json_integer(*(const uint32_t *)src);
	case PROTOBUF_C_TYPE_INT64: case PROTOBUF_C_TYPE_SINT64: case PROTOBUF_C_TYPE_SFIXED64:
		snprintf(buf, sizeof buf, "%" PRId64, *(const int64_t *)src);
		return json_string(buf);
	case PROTOBUF_C_TYPE_UINT64: case PROTOBUF_C_TYPE_FIXED64:
		snprintf(buf, sizeof buf, "%" PRIu64, *(const uint64_t *)src);
		return json_string(buf);
	case PROTOBUF_C_TYPE_FLOAT: case PROTOBUF_C_TYPE_DOUBLE: {
		double x = f->type == PROTOBUF_C_TYPE_FLOAT ? *(const float *)src
							    : *(const double *)src;
		if (isnan(x))
			return json_string("NaN");
		if (isinf(x))
			return json_string(x > 0 ? "Infinity" : "-Infinity");
		return json_real(x);
	}
	case PROTOBUF_C_TYPE_BOOL:
		return json_boolean(*(const protobuf_c_boolean *)src);
	case PROTOBUF_C_TYPE_ENUM: {
		const ProtobufCEnumValue *ev =
			protobuf_c_enum_descriptor_get_value(f->descriptor, *(const int *)src);
		return ev ? json_string(ev->name) : json_integer(*(const int *)src);
	}
	case PROTOBUF_C_TYPE_STRING:
		return jstr(*(char *const *)src ? *(char *const *)src : "");
	case PROTOBUF_C_TYPE_BYTES: {
		const ProtobufCBinaryData *b = src;
		char *s = b64_encode(b->data, b->len);
		json_t *v = json_string(s);
		free(s);
		return v;
	}
	case PROTOBUF_C_TYPE_MESSAGE: {
		const ProtobufCMessage *sub = *(ProtobufCMessage *const *)src;
		if (!sub)
			return json_null();
		if (is_timestamp(sub->descriptor)) {
			const ProtobufCMessageDescriptor *md = sub->descriptor;
			ts_format(*(const int64_t *)member(sub, &md->fields[0]),
				  *(const int32_t *)member(sub, &md->fields[1]), buf, sizeof buf);
			return json_string(buf);
		}
		return encode_message(sub);
	}
	}
	return json_null();
}

/* True if a singular field holds its default (and is then omitted). */
static bool is_default(const ProtobufCMessage *m, const ProtobufCFieldDescriptor *f)
{
	const void *v = member(m, f);

	if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF)
		return *(const uint32_t *)(const void *)((const char *)m + f->quantifier_offset) !=
		       f->id;
	if (f->label == PROTOBUF_C_LABEL_OPTIONAL)
		return !*(const protobuf_c_boolean *)((const char *)m + f->quantifier_offset);
	switch (f->type) {
	case PROTOBUF_C_TYPE_STRING:
		return !*(char *const *)v || !**(char *const *)v;
	case PROTOBUF_C_TYPE_MESSAGE:
		return !*(ProtobufCMessage *const *)v;
	case PROTOBUF_C_TYPE_BYTES:
		return ((const ProtobufCBinaryData *)v)->len == 0;
	case PROTOBUF_C_TYPE_FLOAT:
		return *(const float *)v == 0 && !signbit(*(const float *)v);
	case PROTOBUF_C_TYPE_DOUBLE:
		return *(const double *)v == 0 && !signbit(*(const double *)v);
	default: {
		size_t sz = scalar_size(f->type);
		for (size_t i = 0; i < sz; i++)
			if (((const unsigned char *)v)[i])
				return false;
		return true;
	}
	}
}

static json_t *encode_message(const ProtobufCMessage *m)
{
	const ProtobufCMessageDescriptor *d = m->descriptor;
	json_t *obj = json_object();
	char jn[128];

	for (unsigned i = 0; i < d->n_fields; i++) {
		const ProtobufCFieldDescriptor *f = &d->fields[i];
		json_t *v;

		pbjson_json_name(f->name, jn, sizeof jn);
		if (f->label == PROTOBUF_C_LABEL_REPEATED) {
			size_t n = *quantity(m, f), sz = scalar_size(f->type);
			const char *arr = *(char *const *)member(m, f);

			if (!n)
				continue;
			if (is_map_entry(f)) {
				const ProtobufCMessageDescriptor *ed = f->descriptor;
				v = json_object();
				for (size_t k = 0; k < n; k++) {
					const ProtobufCMessage *e = ((ProtobufCMessage *const *)arr)[k];
					json_t *key = encode_value(&ed->fields[0], member(e, &ed->fields[0]));
					char kb[64];
					const char *ks;

					if (json_is_string(key))
						ks = json_string_value(key);
					else if (json_is_integer(key))
						snprintf(kb, sizeof kb, "%" JSON_INTEGER_FORMAT,
							 json_integer_value(key)), ks = kb;
					else
						ks = json_is_true(key) ? "true" : "false";
					json_object_set_new(v, ks,
							    encode_value(&ed->fields[1],
									 member(e, &ed->fields[1])));
					json_decref(key);
				}
			} else {
				v = json_array();
				for (size_t k = 0; k < n; k++)
					json_array_append_new(v, encode_value(f, arr + k * sz));
			}
		} else {
			if (is_default(m, f))
				continue;
			v = encode_value(f, member(m, f));
		}
		json_object_set_new(obj, jn, v);
	}
	return obj;
}

char *pbjson_string(const char *s)
{
	json_t *v = jstr(s ? s : "");
	char *out = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT);

	json_decref(v);
	if (!out)
		BUG("pbjson: json_dumps failed (out of memory?)");
	return out;
}

char *pbjson_encode(const ProtobufCMessage *m, size_t *len)
{
	json_t *obj = encode_message(m);
	char *s = json_dumps(obj, JSON_COMPACT | JSON_PRESERVE_ORDER);

	json_decref(obj);
	if (!s)
		BUG("pbjson: json_dumps failed (out of memory?)");
	if (len)
		*len = strlen(s);
	return s;
}
