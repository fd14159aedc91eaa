/*
 * pbjson_fuzz.c - proto3 JSON as the HTTP API decodes it (api/pbjson.h).
 * The first byte picks an input type of a method of kpl.v1.Pipelines or
 * kpl.v1.Security (from the services' descriptors, so a new method is
 * fuzzed without a change here) or its output type; the rest is JSON
 * text. What decodes must encode, and the encoding must decode again to
 * the same message (compared packed): the converter loses nothing and
 * reads what it writes.
 */
#include <protobuf-c/protobuf-c.h>
#include <stdlib.h>
#include <string.h>

#include "api/kpl.pb-c.h"
#include "api/pbjson.h"
#include "base/kpl.h"
#include "tests/fuzz/fuzz.h"

static const ProtobufCServiceDescriptor *const services[] = {
	&kpl__v1__pipelines__descriptor,
	&kpl__v1__security__descriptor,
};

static const ProtobufCMessageDescriptor *pick(uint8_t b)
{
	size_t n = 0, want;

	for (size_t i = 0; i < KPL_ARRAY_SIZE(services); i++)
		n += services[i]->n_methods * 2;
	want = b % n;
	for (size_t i = 0; i < KPL_ARRAY_SIZE(services); i++) {
		if (want < services[i]->n_methods * 2) {
			const ProtobufCMethodDescriptor *m = &services[i]->methods[want / 2];
			return want % 2 ? m->output : m->input;
		}
		want -= services[i]->n_methods * 2;
	}
	abort();
}

static uint8_t *packed(const ProtobufCMessage *m, size_t *len)
{
	*len = protobuf_c_message_get_packed_size(m);
	uint8_t *buf = kpl_malloc(*len ? *len : 1);
	protobuf_c_message_pack(m, buf);
	return buf;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const ProtobufCMessageDescriptor *d;
	ProtobufCMessage *m = NULL, *again = NULL;
	struct kpl_err err = { 0 };
	uint8_t *p1, *p2;
	size_t n1, n2, jl;
	char *json;

	if (size < 1 || size > (1u << 20))
		return 0;
	d = pick(data[0]);
	if (pbjson_decode(d, (const char *)data + 1, size - 1, &m, &err) != 0) {
		if (m || err.code != KPL_EINVAL || !err.msg[0])
			abort(); /* an error leaves nothing and says why */
		return 0;
	}
	json = pbjson_encode(m, &jl);
	if (pbjson_decode(d, json, jl, &again, &err) != 0)
		abort(); /* what it wrote, it must read */
	p1 = packed(m, &n1);
	p2 = packed(again, &n2);
	/* Map entries keep their order and NaN never compares: compare bytes. */
	if (n1 != n2 || memcmp(p1, p2, n1) != 0)
		abort();
	free(p1);
	free(p2);
	free(json);
	protobuf_c_message_free_unpacked(m, NULL);
	protobuf_c_message_free_unpacked(again, NULL);
	return 0;
}
