/*
 * pbjson.h - proto3 JSON <-> protobuf-c messages, driven by the message
 * descriptors alone (so one converter serves every message of the API).
 *
 * The mapping is the protobuf project's ProtoJSON
 * (/work/shared/reference/external-apis-2.md §9.2): field names in
 * lowerCamelCase on output, either that or the proto name on input;
 * int64/uint64 as strings (numbers accepted on input); enums by name (the
 * number accepted on input); bytes as base64 (URL-safe and unpadded
 * accepted); maps as objects; google.protobuf.Timestamp as RFC 3339 with
 * "Z"; fields at their default value omitted on output; null on input is
 * "unset". An unknown field is an error naming it, never dropped silently.
 *
 * Limits (input): PBJSON_MAX_DEPTH nested objects/arrays, PBJSON_MAX_ITEMS
 * elements in one repeated field or map; the caller bounds the bytes.
 *
 * Errors are KPL_EINVAL with err->msg naming the field path
 * ("stages[2].name: want a string"). No I/O; any thread.
 */
#ifndef KPL_API_PBJSON_H
#define KPL_API_PBJSON_H

#include <protobuf-c/protobuf-c.h>
#include <stddef.h>

#include "base/kpl.h"

#define PBJSON_MAX_DEPTH 32
#define PBJSON_MAX_ITEMS 10000

/*
 * Parses len bytes of JSON (an object; empty or blank text reads as {})
 * into a new message of type d. On success *out is the caller's (free with
 * protobuf_c_message_free_unpacked(*out, NULL)); on error *out is NULL.
 */
int pbjson_decode(const ProtobufCMessageDescriptor *d, const char *json, size_t len,
		  ProtobufCMessage **out, struct kpl_err *err);

/*
 * Sets one field of m from text, as a URL path variable or query
 * parameter does: name is the proto or JSON name, with dots into nested
 * messages ("filter.state"); a repeated field gets value appended; a
 * scalar field is parsed as its type (enum: name or number). Maps and
 * repeated messages cannot be set this way (KPL_EINVAL).
 */
int pbjson_set_field(ProtobufCMessage *m, const char *name, const char *value,
		     struct kpl_err *err);

/*
 * Encodes m as compact JSON text, NUL-terminated; malloc'd, the caller's.
 * *len (if not NULL) is its length. Strings that are not valid UTF-8 have
 * each bad byte replaced by U+FFFD.
 */
char *pbjson_encode(const ProtobufCMessage *m, size_t *len);

/* s as a JSON string literal, quotes included (bad UTF-8 repaired as in
 * pbjson_encode); malloc'd, the caller's. */
char *pbjson_string(const char *s);

/* The JSON name of a proto field name ("page_size" -> "pageSize"), into
 * buf (NUL-terminated, cut to size). */
void pbjson_json_name(const char *proto_name, char *buf, size_t size);

#endif
