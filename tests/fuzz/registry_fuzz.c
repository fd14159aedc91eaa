/*
 * registry_fuzz.c - the OCI registry protocol (stages/registry.c) over any
 * replies in fuzz.h's text form. Every reply goes to each parser of a
 * reply: the ping (/v2/ and its WWW-Authenticate challenge), the token
 * server's JSON, an error body, a manifest (as its Content-Type says, and
 * into a push plan with and without an expected digest), a Location and a
 * Range; and the replies in order drive one blob upload (POST, PATCH
 * chunks, 416 recovery, PUT). The first byte picks the upload's shape.
 * The body is also read as an image reference and as a URL.
 */
#include <stdlib.h>
#include <string.h>

#include "base/kpl.h"
#include "stages/registry.h"
#include "tests/fuzz/fuzz.h"

#define URL "http://reg:5000/v2/team/app/blobs/uploads/"

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	kpl_log_threshold = (enum kpl_log_level)(KPL_LOG_ERROR + 1);
	return 0;
}

static void one_reply(const struct fz_reply *fr, const struct reg_reply *r)
{
	struct kpl_err err = { 0 };
	struct reg_challenge c = { 0 };
	struct reg_manifest m = { 0 };
	struct reg_plan plan = { 0 };
	struct reg_ref ref = { 0 };
	char buf[300], digest[REG_DIGEST_MAX];
	char *token = NULL, *s;
	long expires;
	uint64_t end;

	if (reg_ping_reply("http://reg:5000/v2/", r, &c, &err) == 0) {
		const char *scopes[] = { "repository:team/app:pull,push", "repository:x:pull" };
		free(reg_token_url(&c, scopes, 2));
	}
	reg_challenge_release(&c);
	if (r->www_authenticate && reg_challenge_parse(r->www_authenticate, &c) == 0)
		free(reg_token_url(&c, NULL, 0));
	reg_challenge_release(&c);
	if (reg_token_parse(r->body, r->body_len, &token, &expires, &err) == 0)
		free(token);
	reg_error_text(r->status, r->body, r->body_len, buf, sizeof buf);
	reg_reply_error(&err, "GET", "http://u:p@reg:5000/v2/x", r);
	reg_media_is_index(reg_media_parse(r->content_type ? r->content_type : ""));
	if (reg_manifest_parse(r->body, r->body_len, r->content_type, &m, &err) == 0)
		reg_manifest_release(&m);
	reg_digest(r->body, r->body_len, digest);
	if (reg_plan_add_manifest(&plan, r->body, r->body_len, r->content_type, NULL, &m,
				  &err) == 0)
		reg_manifest_release(&m);
	reg_plan_add_manifest(&plan, r->body, r->body_len, r->content_type, digest, NULL, &err);
	if (plan.n_manifests > 1)
		reg_plan_move_to_end(&plan, 0);
	reg_plan_release(&plan);
	free(reg_resolve_location(URL, r->location));
	if (r->range)
		reg_parse_range(r->range, &end);
	if (r->digest)
		reg_digest_valid(r->digest);
	/* The body as names a stage is given. */
	if (reg_ref_parse(fr->body, &ref, &err) == 0) {
		if ((s = reg_api_url("http://reg:5000", ref.repo, "/manifests/v1")))
			free(s);
		reg_ref_release(&ref);
	}
	reg_repo_valid(fr->body);
	reg_tag_valid(fr->body);
	free(reg_url_host(fr->body));
	free(reg_url_with_digest(fr->body, digest));
	free(reg_scope(fr->body, "pull"));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct fz_in in = { (const char *)data, size };
	struct reg_upload u;
	struct fz_reply fr;
	unsigned shape = size ? data[0] : 0;
	int steps = 0, uploading = 1;

	/* 3 bytes in one PUT, or 10 in chunks of 4; with a mount or not. */
	reg_upload_init(&u, "http://reg:5000", "team/app",
			"sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
			shape & 1 ? 10 : 3, shape & 1 ? 4 : 0, shape & 2 ? "team/base" : NULL);
	while (fz_next_reply(&in, &fr) && steps++ < 200) {
		struct reg_reply r = {
			.status = fr.status,
			.location = fz_header(&fr, "Location"),
			.range = fz_header(&fr, "Range"),
			.digest = fz_header(&fr, "Docker-Content-Digest"),
			.content_type = fz_header(&fr, "Content-Type"),
			.www_authenticate = fz_header(&fr, "WWW-Authenticate"),
			.body = fr.body,
			.body_len = fr.body_len,
		};
		one_reply(&fr, &r);
		if (uploading && u.state != REG_UP_DONE) {
			struct reg_step st = { 0 };
			struct kpl_err err = { 0 };
			reg_upload_next(&u, &st);
			if (reg_upload_reply(&u, &st, &r, &err) != 0)
				uploading = 0;
			reg_step_release(&st);
			reg_up_state_name(u.state);
		}
		fz_reply_release(&fr);
	}
	reg_upload_release(&u);
	return 0;
}
