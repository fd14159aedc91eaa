/*
 * rpc_fuzz.c - the gRPC API's requests as kpld decodes and checks them.
 * The first byte picks a method of kpl.v1.Pipelines or kpl.v1.Security
 * (from the services' descriptors, so a new method is fuzzed without a
 * change here); the rest is its request message in protobuf wire format,
 * decoded as api/server.c does (protobuf-c, the size cap), encoded again
 * (the round trip must agree), and then checked as its handler checks it
 * before any engine call:
 *   SubmitRun         the pipeline (parse and validate with the real stage
 *                     kinds) and its params (pipeline_resolve_params)
 *   ValidatePipeline  pipeline_validate_all, every diagnostic formatted
 *   RegisterPipeline  hooks_check_registration against a secret store
 *                     holding one secret, "hook", and
 *                     sched_check_registration (cron texts, zone names)
 *   Set/DeleteSecret  the secret's name
 * The other handlers' field checks (run ids, deployment targets, token
 * scopes) are static in api/rpc_*.c and reached here only by decoding.
 */
#define _XOPEN_SOURCE 700
#include <ftw.h>
#include <protobuf-c/protobuf-c.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/kpl.pb-c.h"
#include "engine/hooks.h"
#include "engine/sched.h"
#include "base/kpl.h"
#include "engine/secrets.h"
#include "pipelines/pipeline.h"
#include "stages/stage.h"
#include "store/store.h"
#include "tests/fuzz/fuzz.h"

/* See pipeline_fuzz.c: engine.o before the stage kinds. */
void *const rpc_fuzz_engine_ref = (void *)stage_http;

static struct store *store;
static struct secrets *secrets;
static char dir[4096];

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	(void)st;
	(void)flag;
	(void)ftw;
	return remove(path);
}

/* The store lives in a temporary directory, gone at exit. */
static void rm_dir(void)
{
	store_close(store);
	nftw(dir, rm_one, 8, FTW_DEPTH | FTW_PHYS);
}

static const ProtobufCServiceDescriptor *const services[] = {
	&kpl__v1__pipelines__descriptor,
	&kpl__v1__security__descriptor,
};

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	const char *tmp = getenv("TEST_TMPDIR") ? getenv("TEST_TMPDIR") : getenv("TMPDIR");
	struct kpl_err err = { 0 };

	(void)argc;
	(void)argv;
	kpl_log_threshold = (enum kpl_log_level)(KPL_LOG_ERROR + 1);
	snprintf(dir, sizeof dir, "%s/kpl-rpc-fuzz-XXXXXX", tmp ? tmp : "/tmp");
	if (!mkdtemp(dir) || store_open(NULL, dir, NULL, &store, &err) != 0 ||
	    secrets_open(store, dir, &secrets, &err) != 0 ||
	    secrets_set(secrets, "hook", "webhook-key-1", 13, &err) != 0 ||
	    store_commit_sync(store) != 0) {
		fprintf(stderr, "rpc_fuzz: %s: %s\n", dir, err.msg);
		abort();
	}
	atexit(rm_dir);
	return 0;
}

static void check_pipeline(const char *text, Kpl__V1__SubmitRunRequest__ParamsEntry **params,
			   size_t n_params)
{
	const struct pl_kind *kinds;
	size_t n_kinds;
	struct pipeline *p = NULL;
	struct kpl_err err = { 0 };

	kinds = stage_kinds_for_parser(&n_kinds);
	if (!text || pipeline_parse(text, strlen(text), "pipeline", kinds, n_kinds, &p, &err))
		return;
	if (n_params <= KPL_MAX_PARAMS) {
		const char **names = calloc(n_params + 1, sizeof *names);
		const char **values = calloc(n_params + 1, sizeof *values);
		char **on = NULL, **ov = NULL;
		size_t n = 0;

		for (size_t i = 0; i < n_params; i++) {
			names[i] = params[i]->key;
			values[i] = params[i]->value;
		}
		if (pipeline_resolve_params(p, names, values, n_params, &on, &ov, &n, &err) == 0) {
			for (size_t i = 0; i < n; i++) {
				free(on[i]);
				free(ov[i]);
			}
			free(on);
			free(ov);
		}
		free(names);
		free(values);
	}
	pipeline_free(p);
}

static void validate(const char *text)
{
	const struct pl_kind *kinds;
	size_t n_kinds, n = 0;
	struct pl_diag *d = NULL;
	char buf[1024];

	kinds = stage_kinds_for_parser(&n_kinds);
	pipeline_validate_all(text ? text : "", text ? strlen(text) : 0, "pipeline", kinds,
			      n_kinds, &d, &n);
	for (size_t i = 0; i < n; i++)
		pl_diag_format(&d[i], "pipeline", buf, sizeof buf);
	pl_diags_free(d, n);
}

static void check(const ProtobufCMessage *m)
{
	const ProtobufCMessageDescriptor *d = m->descriptor;
	struct kpl_err err = { 0 };

	if (d == &kpl__v1__submit_run_request__descriptor) {
		const Kpl__V1__SubmitRunRequest *r = (const void *)m;
		check_pipeline(r->pipeline, r->params, r->n_params);
	} else if (d == &kpl__v1__validate_pipeline_request__descriptor) {
		validate(((const Kpl__V1__ValidatePipelineRequest *)m)->pipeline);
	} else if (d == &kpl__v1__register_pipeline_request__descriptor) {
		const Kpl__V1__RegisterPipelineRequest *r = (const void *)m;
		Kpl__V1__RegisteredPipeline rec;
		char *branches[HOOKS_MAX_BRANCHES];
		Kpl__V1__Schedule sched_buf[SCHED_MAX], *sched_ptrs[SCHED_MAX];

		if (hooks_check_registration(r, secrets, &rec, branches, &err) != 0)
			kpl__v1__registered_pipeline__init(&rec);
		/* Cron texts and zone names (files looked up under zoneinfo). */
		sched_check_registration(r, &rec, sched_buf, sched_ptrs, NULL, &err);
	} else if (d == &kpl__v1__set_secret_request__descriptor) {
		const char *name = ((const Kpl__V1__SetSecretRequest *)m)->name;
		secrets_check_name(name ? name : "", &err);
	} else if (d == &kpl__v1__delete_secret_request__descriptor) {
		const char *name = ((const Kpl__V1__DeleteSecretRequest *)m)->name;
		secrets_check_name(name ? name : "", &err);
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const ProtobufCMessageDescriptor *desc;
	ProtobufCMessage *m, *again;
	size_t n_methods = 0, pick, len;
	uint8_t *buf;

	if (size < 1 || size - 1 > KPL_MAX_GRPC_MESSAGE_BYTES)
		return 0;
	for (size_t i = 0; i < KPL_ARRAY_SIZE(services); i++)
		n_methods += services[i]->n_methods;
	pick = data[0] % n_methods;
	for (size_t i = 0;; i++) {
		if (pick < services[i]->n_methods) {
			desc = services[i]->methods[pick].input;
			break;
		}
		pick -= services[i]->n_methods;
	}
	if (!(m = protobuf_c_message_unpack(desc, NULL, size - 1, data + 1)))
		return 0;
	if (!protobuf_c_message_check(m))
		abort(); /* decoded, yet not a valid message */
	len = protobuf_c_message_get_packed_size(m);
	buf = malloc(len ? len : 1);
	if (protobuf_c_message_pack(m, buf) != len)
		abort();
	/* What we encode decodes to the same size. Not with unknown fields:
	 * protobuf-c keeps one numbered 0 if its key was written in two bytes
	 * (0x80 0x00) and writes it back in one, which it then refuses; kpld
	 * never re-encodes a request, so that is protobuf-c's business. */
	again = protobuf_c_message_unpack(desc, NULL, len, buf);
	if (m->n_unknown_fields == 0 &&
	    (!again || protobuf_c_message_get_packed_size(again) != len))
		abort();
	if (again)
		protobuf_c_message_free_unpacked(again, NULL);
	free(buf);
	check(m);
	protobuf_c_message_free_unpacked(m, NULL);
	return 0;
}
