/*
 * registry_test.c - stages/registry.c over fixture replies: challenges,
 * token requests and replies, error bodies, references, URLs, manifests,
 * the blob upload state machine and the OCI layout reader. No sockets.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "stages/registry.h"

/* sha256("") and sha256("abc") */
#define D_EMPTY "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
#define D_ABC "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"

static void test_digest(void **state)
{
	char d[REG_DIGEST_MAX];
	struct reg_hash h;

	(void)state;
	reg_digest("", 0, d);
	assert_string_equal(d, D_EMPTY);
	reg_hash_init(&h);
	reg_hash_update(&h, "a", 1);
	reg_hash_update(&h, "bc", 2);
	reg_hash_final(&h, d);
	assert_string_equal(d, D_ABC);
	assert_true(reg_digest_valid(D_ABC));
	assert_false(reg_digest_valid("sha256:BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD"));
	assert_false(reg_digest_valid("sha512:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"));
	assert_false(reg_digest_valid("sha256:ba78"));
	assert_false(reg_digest_valid(NULL));
}

static void test_media(void **state)
{
	(void)state;
	assert_int_equal(reg_media_parse("application/vnd.oci.image.manifest.v1+json"),
			 REG_MEDIA_OCI_MANIFEST);
	assert_int_equal(reg_media_parse("application/vnd.docker.distribution.manifest.list.v2+json; charset=utf-8"),
			 REG_MEDIA_DOCKER_LIST);
	assert_int_equal(reg_media_parse("application/json"), REG_MEDIA_UNKNOWN);
	assert_int_equal(reg_media_parse(NULL), REG_MEDIA_UNKNOWN);
	assert_string_equal(reg_media_name(REG_MEDIA_DOCKER_MANIFEST),
			    "application/vnd.docker.distribution.manifest.v2+json");
	assert_true(reg_media_is_index(REG_MEDIA_OCI_INDEX));
	assert_false(reg_media_is_index(REG_MEDIA_OCI_MANIFEST));
	for (int m = 1; m < REG_MEDIA_LAST_; m++)
		assert_non_null(strstr(reg_manifest_accept(), reg_media_name((enum reg_media)m)));
}

static void test_error_text(void **state)
{
	char out[300];
	const char *two = "{\"errors\":[{\"code\":\"MANIFEST_BLOB_UNKNOWN\",\"message\":\"blob unknown to registry\",\"detail\":\"sha256:aa\"},"
			  "{\"code\":\"MANIFEST_INVALID\",\"message\":\"manifest invalid\"}]}";

	(void)state;
	reg_error_text(400, two, strlen(two), out, sizeof out);
	assert_string_equal(out, "400 MANIFEST_BLOB_UNKNOWN: blob unknown to registry; "
				 "MANIFEST_INVALID: manifest invalid");
	reg_error_text(401, "{\"errors\":[{\"code\":\"UNAUTHORIZED\"}]}", 36, out, sizeof out);
	assert_string_equal(out, "401 UNAUTHORIZED");
	reg_error_text(502, "<html>bad gateway</html>\nmore", 30, out, sizeof out);
	assert_string_equal(out, "502: <html>bad gateway</html>");
	reg_error_text(404, "", 0, out, sizeof out);
	assert_string_equal(out, "404 Not Found");
	reg_error_text(400, two, strlen(two), out, 12);
	assert_int_equal(strlen(out), 11); /* cut, terminated */
}

static void test_reply_error(void **state)
{
	struct kpl_err err = { 0 };
	const char *body = "{\"errors\":[{\"code\":\"MANIFEST_INVALID\",\"message\":\"manifest invalid\"}]}";
	struct reg_reply r = { .status = 400, .body = body, .body_len = strlen(body) };

	(void)state;
	assert_int_equal(reg_reply_error(&err, "PUT", "https://u:pw@reg/v2/app/manifests/v1?token=abc", &r),
			 KPL_EINVAL);
	assert_string_equal(err.msg, "PUT https://***@reg/v2/app/manifests/v1?token=***: "
				     "400 MANIFEST_INVALID: manifest invalid");
	r.status = 503;
	r.body = "";
	r.body_len = 0;
	assert_int_equal(reg_reply_error(&err, "GET", "http://r/v2/", &r), KPL_EUNAVAILABLE);
	assert_string_equal(err.msg, "GET http://r/v2/: 503 Service Unavailable");
}

static void test_challenge(void **state)
{
	struct reg_challenge c;

	(void)state;
	assert_int_equal(reg_challenge_parse("Bearer realm=\"https://auth.docker.io/token\","
					     "service=\"registry.docker.io\",scope=\"repository:samalba/my-app:pull,push\"",
					     &c), 0);
	assert_int_equal(c.scheme, REG_AUTH_BEARER);
	assert_string_equal(c.realm, "https://auth.docker.io/token");
	assert_string_equal(c.service, "registry.docker.io");
	assert_string_equal(c.scope, "repository:samalba/my-app:pull,push");
	assert_null(c.error);
	reg_challenge_release(&c);

	assert_int_equal(reg_challenge_parse("bearer  realm=http://127.0.0.1:9/t , service = reg ,"
					     " error=\"insufficient_scope\", scope=\"a \\\"b\\\"\"", &c), 0);
	assert_int_equal(c.scheme, REG_AUTH_BEARER);
	assert_string_equal(c.realm, "http://127.0.0.1:9/t");
	assert_string_equal(c.service, "reg");
	assert_string_equal(c.error, "insufficient_scope");
	assert_string_equal(c.scope, "a \"b\"");
	reg_challenge_release(&c);

	assert_int_equal(reg_challenge_parse("Basic realm=\"basic-realm\"", &c), 0);
	assert_int_equal(c.scheme, REG_AUTH_BASIC);
	assert_string_equal(c.realm, "basic-realm");
	reg_challenge_release(&c);

	assert_int_equal(reg_challenge_parse("Negotiate abc", &c), KPL_EINVAL);
	assert_int_equal(reg_challenge_parse("Bearer realm=\"unterminated", &c), KPL_EINVAL);
	assert_null(c.realm);
	assert_int_equal(reg_challenge_parse(NULL, &c), KPL_EINVAL);
}

static void test_ping(void **state)
{
	struct reg_challenge c;
	struct kpl_err err = { 0 };
	struct reg_reply r = { .status = 200 };

	(void)state;
	assert_int_equal(reg_ping_reply("http://r/v2/", &r, &c, &err), 0);
	assert_int_equal(c.scheme, REG_AUTH_NONE);
	r.status = 401;
	r.www_authenticate = "Basic realm=\"basic-realm\"";
	assert_int_equal(reg_ping_reply("http://r/v2/", &r, &c, &err), 0);
	assert_int_equal(c.scheme, REG_AUTH_BASIC);
	reg_challenge_release(&c);
	r.www_authenticate = "Bearer realm=\"http://t/token\",service=\"s\"";
	assert_int_equal(reg_ping_reply("http://r/v2/", &r, &c, &err), 0);
	assert_int_equal(c.scheme, REG_AUTH_BEARER);
	assert_string_equal(c.realm, "http://t/token");
	reg_challenge_release(&c);
	r.www_authenticate = "Bearer service=\"s\"";
	assert_int_equal(reg_ping_reply("http://r/v2/", &r, &c, &err), KPL_EINVAL);
	assert_non_null(strstr(err.msg, "without a usable WWW-Authenticate"));
	r.www_authenticate = NULL;
	r.status = 404;
	assert_int_equal(reg_ping_reply("http://r/v2/", &r, &c, &err), KPL_EINVAL);
	assert_string_equal(err.msg, "GET http://r/v2/: 404: not a registry (no v2 API there)");
}

static void test_token(void **state)
{
	struct reg_challenge c = { 0 };
	const char *scopes[] = { "repository:team/app:pull,push", "repository:base/img:pull" };
	struct kpl_err err = { 0 };
	char *url, *tok;
	const char *body;
	long exp;

	(void)state;
	c.scheme = REG_AUTH_BEARER;
	c.realm = "http://127.0.0.1:8/token";
	c.service = "my registry";
	url = reg_token_url(&c, scopes, 2);
	assert_string_equal(url, "http://127.0.0.1:8/token?service=my%20registry"
				 "&scope=repository%3Ateam%2Fapp%3Apull%2Cpush"
				 "&scope=repository%3Abase%2Fimg%3Apull");
	free(url);
	c.realm = "https://auth/t?x=1";
	c.service = NULL;
	url = reg_token_url(&c, scopes, 1);
	assert_string_equal(url, "https://auth/t?x=1&scope=repository%3Ateam%2Fapp%3Apull%2Cpush");
	free(url);
	c.realm = "ftp://x";
	assert_null(reg_token_url(&c, scopes, 1));

	body = "{\"token\":\"T1\",\"access_token\":\"T2\",\"expires_in\":300}";
	assert_int_equal(reg_token_parse(body, strlen(body), &tok, &exp, &err), 0);
	assert_string_equal(tok, "T1");
	assert_int_equal(exp, 300);
	free(tok);
	body = "{\"access_token\":\"T2\",\"expires_in\":5}";
	assert_int_equal(reg_token_parse(body, strlen(body), &tok, &exp, &err), 0);
	assert_string_equal(tok, "T2");
	assert_int_equal(exp, 60);
	free(tok);
	assert_int_equal(reg_token_parse("{\"expires_in\":5}", 16, &tok, &exp, &err), KPL_EINVAL);
	assert_null(tok);
	assert_int_equal(reg_token_parse("nope", 4, &tok, &exp, &err), KPL_EINVAL);

	url = reg_scope("team/app", "pull,push");
	assert_string_equal(url, "repository:team/app:pull,push");
	free(url);
}

static void test_names(void **state)
{
	(void)state;
	assert_true(reg_repo_valid("team/app"));
	assert_true(reg_repo_valid("a/b.c/d__e/f-g---h"));
	assert_false(reg_repo_valid("Team/app"));
	assert_false(reg_repo_valid("team//app"));
	assert_false(reg_repo_valid("team/app/"));
	assert_false(reg_repo_valid("-app"));
	assert_false(reg_repo_valid("a___b"));
	assert_false(reg_repo_valid(""));
	assert_true(reg_tag_valid("v1.2.3-rc_1"));
	assert_true(reg_tag_valid("_x"));
	assert_false(reg_tag_valid(".x"));
	assert_false(reg_tag_valid("a/b"));
	assert_false(reg_tag_valid(""));
}

static void test_ref(void **state)
{
	struct reg_ref r;
	struct kpl_err err = { 0 };

	(void)state;
	assert_int_equal(reg_ref_parse("127.0.0.1:5000/team/app@" D_ABC, &r, &err), 0);
	assert_string_equal(r.host, "127.0.0.1:5000");
	assert_string_equal(r.repo, "team/app");
	assert_null(r.tag);
	assert_string_equal(r.digest, D_ABC);
	reg_ref_release(&r);
	assert_int_equal(reg_ref_parse("team/app:v1", &r, &err), 0);
	assert_null(r.host);
	assert_string_equal(r.repo, "team/app");
	assert_string_equal(r.tag, "v1");
	reg_ref_release(&r);
	assert_int_equal(reg_ref_parse("localhost/app:v1@" D_ABC, &r, &err), 0);
	assert_string_equal(r.host, "localhost");
	assert_string_equal(r.tag, "v1");
	assert_string_equal(r.digest, D_ABC);
	reg_ref_release(&r);
	assert_int_equal(reg_ref_parse("team/app", &r, &err), KPL_EINVAL);
	assert_non_null(strstr(err.msg, "needs a tag"));
	assert_int_equal(reg_ref_parse("Team/app:v1", &r, &err), KPL_EINVAL);
	assert_non_null(strstr(err.msg, "invalid repository name"));
	assert_int_equal(reg_ref_parse("app@sha256:abc", &r, &err), KPL_EINVAL);
	assert_int_equal(reg_ref_parse("", &r, &err), KPL_EINVAL);
}

static void test_urls(void **state)
{
	char *s;
	uint64_t end;

	(void)state;
	s = reg_url_host("https://user:pw@reg.example.com:5000/x");
	assert_string_equal(s, "reg.example.com:5000");
	free(s);
	s = reg_url_host("http://127.0.0.1:41234");
	assert_string_equal(s, "127.0.0.1:41234");
	free(s);
	assert_null(reg_url_host("file:///x"));
	s = reg_api_url("http://r:5000/", "team/app", "/blobs/uploads/");
	assert_string_equal(s, "http://r:5000/v2/team/app/blobs/uploads/");
	free(s);
	s = reg_api_url("http://r:5000", "", "");
	assert_string_equal(s, "http://r:5000/v2/");
	free(s);

	s = reg_resolve_location("http://r:5000/v2/a/blobs/uploads/", "/v2/a/blobs/uploads/u1?_state=x");
	assert_string_equal(s, "http://r:5000/v2/a/blobs/uploads/u1?_state=x");
	free(s);
	s = reg_resolve_location("http://r:5000/v2/a/blobs/uploads/", "https://s3/upload?sig=1");
	assert_string_equal(s, "https://s3/upload?sig=1");
	free(s);
	s = reg_resolve_location("http://r:5000/v2/a/blobs/uploads/u1?_state=x", "u2?_state=y");
	assert_string_equal(s, "http://r:5000/v2/a/blobs/uploads/u2?_state=y");
	free(s);
	s = reg_resolve_location("http://r:5000", "u2");
	assert_string_equal(s, "http://r:5000/u2");
	free(s);
	assert_null(reg_resolve_location("http://r/", ""));
	assert_null(reg_resolve_location("http://r/", NULL));

	s = reg_url_with_digest("http://r/v2/a/blobs/uploads/u1?_state=x", D_ABC);
	assert_string_equal(s, "http://r/v2/a/blobs/uploads/u1?_state=x&digest=sha256%3A"
			       "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
	free(s);
	s = reg_url_with_digest("http://r/u1", D_ABC);
	assert_non_null(strstr(s, "http://r/u1?digest=sha256%3Aba78"));
	free(s);

	assert_int_equal(reg_parse_range("0-1023", &end), 0);
	assert_int_equal(end, 1023);
	assert_int_equal(reg_parse_range("bytes=0-7", &end), 0);
	assert_int_equal(end, 7);
	assert_int_equal(reg_parse_range("5-7", &end), KPL_EINVAL);
	assert_int_equal(reg_parse_range("0-", &end), KPL_EINVAL);
	assert_int_equal(reg_parse_range(NULL, &end), KPL_EINVAL);
}

#define CFG_D "sha256:1111111111111111111111111111111111111111111111111111111111111111"
#define L1_D "sha256:2222222222222222222222222222222222222222222222222222222222222222"
#define L2_D "sha256:3333333333333333333333333333333333333333333333333333333333333333"

static const char oci_manifest[] =
	"{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\","
	"\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"" CFG_D "\",\"size\":10},"
	"\"layers\":[{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"" L1_D "\",\"size\":200},"
	"{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"" L2_D "\",\"size\":300},"
	"{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"" L1_D "\",\"size\":200}]}";

static void test_manifest(void **state)
{
	struct reg_manifest m;
	struct kpl_err err = { 0 };
	const char *docker = "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.docker.distribution.manifest.v2+json\","
			     "\"config\":{\"digest\":\"" CFG_D "\",\"size\":1},\"layers\":[]}";
	const char *index = "{\"schemaVersion\":2,\"manifests\":[{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\","
			    "\"digest\":\"" L1_D "\",\"size\":5,\"platform\":{\"os\":\"linux\"}}]}";

	(void)state;
	assert_int_equal(reg_manifest_parse(oci_manifest, strlen(oci_manifest), NULL, &m, &err), 0);
	assert_int_equal(m.media, REG_MEDIA_OCI_MANIFEST);
	assert_int_equal(m.n_blobs, 4);
	assert_string_equal(m.blobs[0].digest, CFG_D);
	assert_int_equal(m.blobs[0].size, 10);
	assert_string_equal(m.blobs[2].digest, L2_D);
	assert_string_equal(m.blobs[2].media_type, "application/vnd.oci.image.layer.v1.tar+gzip");
	assert_int_equal(m.n_children, 0);
	reg_manifest_release(&m);

	assert_int_equal(reg_manifest_parse(docker, strlen(docker), NULL, &m, &err), 0);
	assert_int_equal(m.media, REG_MEDIA_DOCKER_MANIFEST);
	assert_int_equal(m.n_blobs, 1);
	reg_manifest_release(&m);
	/* the Content-Type must agree with the body */
	assert_int_equal(reg_manifest_parse(docker, strlen(docker),
					    "application/vnd.oci.image.manifest.v1+json", &m, &err),
			 KPL_EINVAL);
	assert_non_null(strstr(err.msg, "but Content-Type"));

	/* no mediaType: from the Content-Type, else from the shape */
	assert_int_equal(reg_manifest_parse(index, strlen(index), NULL, &m, &err), 0);
	assert_int_equal(m.media, REG_MEDIA_OCI_INDEX);
	assert_int_equal(m.n_children, 1);
	assert_string_equal(m.children[0].digest, L1_D);
	reg_manifest_release(&m);
	assert_int_equal(reg_manifest_parse(index, strlen(index),
					    "application/vnd.docker.distribution.manifest.list.v2+json",
					    &m, &err), 0);
	assert_int_equal(m.media, REG_MEDIA_DOCKER_LIST);
	reg_manifest_release(&m);

	assert_int_equal(reg_manifest_parse("{\"layers\":[]}", 13, NULL, &m, &err), KPL_EINVAL);
	assert_string_equal(err.msg, "manifest: no \"config\" descriptor");
	assert_int_equal(reg_manifest_parse("{\"config\":{\"digest\":\"sha256:12\",\"size\":1}}",
					    42, NULL, &m, &err), KPL_EINVAL);
	assert_non_null(strstr(err.msg, "config: digest \"sha256:12\""));
	assert_int_equal(reg_manifest_parse("{\"mediaType\":\"text/plain\"}", 26, NULL, &m, &err),
			 KPL_EINVAL);
	assert_int_equal(reg_manifest_parse("[1", 2, NULL, &m, &err), KPL_EINVAL);
}

static void test_plan(void **state)
{
	struct reg_plan p = { 0 };
	struct kpl_err err = { 0 };
	char d[REG_DIGEST_MAX];

	(void)state;
	reg_digest(oci_manifest, strlen(oci_manifest), d);
	assert_int_equal(reg_plan_add_manifest(&p, oci_manifest, strlen(oci_manifest), NULL,
					       D_ABC, NULL, &err), KPL_EINVAL);
	assert_non_null(strstr(err.msg, "hash to"));
	assert_int_equal(reg_plan_add_manifest(&p, oci_manifest, strlen(oci_manifest), NULL, d,
					       NULL, &err), 0);
	assert_int_equal(p.n_blobs, 3); /* the repeated layer once */
	assert_string_equal(p.blobs[1].digest, L1_D);
	assert_int_equal(p.blobs[2].size, 300);
	assert_int_equal(p.n_manifests, 1);
	assert_string_equal(p.manifests[0].digest, d);
	assert_memory_equal(p.manifests[0].bytes, oci_manifest, strlen(oci_manifest));
	assert_int_equal(reg_plan_add_manifest(&p, oci_manifest, strlen(oci_manifest), NULL, NULL,
					       NULL, &err), 0);
	assert_int_equal(p.n_blobs, 3);
	reg_plan_release(&p);
}

/* A reply with just a status and the headers the upload looks at. */
static struct reg_reply rep(long status, const char *location, const char *range,
			    const char *digest)
{
	struct reg_reply r = { .status = status, .location = location, .range = range,
			       .digest = digest, .body = "", .body_len = 0 };
	return r;
}

static void test_upload_monolithic(void **state)
{
	struct reg_upload u;
	struct reg_step s;
	struct reg_reply r;
	struct kpl_err err = { 0 };

	(void)state;
	reg_upload_init(&u, "http://r:5000", "team/app", D_ABC, 3, 1024, NULL);
	assert_false(u.chunked);
	reg_upload_next(&u, &s);
	assert_string_equal(s.method, "POST");
	assert_string_equal(s.url, "http://r:5000/v2/team/app/blobs/uploads/");
	assert_int_equal(s.len, 0);
	r = rep(202, "/v2/team/app/blobs/uploads/u1?_state=abc", "0-0", NULL);
	assert_int_equal(reg_upload_reply(&u, &s, &r, &err), 0);
	reg_step_release(&s);
	assert_int_equal(u.state, REG_UP_PUT);
	reg_upload_next(&u, &s);
	assert_string_equal(s.method, "PUT");
	assert_string_equal(s.url, "http://r:5000/v2/team/app/blobs/uploads/u1?_state=abc&digest="
				   "sha256%3Aba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
	assert_int_equal(s.off, 0);
	assert_int_equal(s.len, 3);
	assert_true(s.octet_stream);
	assert_string_equal(s.content_range, "");
	/* the registry says it stored something else */
	r = rep(201, "/v2/team/app/blobs/" D_EMPTY, NULL, D_EMPTY);
	assert_int_equal(reg_upload_reply(&u, &s, &r, &err), KPL_EINVAL);
	assert_non_null(strstr(err.msg, "the registry stored " D_EMPTY ", not " D_ABC));
	r = rep(201, "/v2/team/app/blobs/" D_ABC, NULL, D_ABC);
	assert_int_equal(reg_upload_reply(&u, &s, &r, &err), 0);
	assert_int_equal(u.state, REG_UP_DONE);
	assert_false(u.mounted);
	reg_step_release(&s);
	reg_upload_release(&u);
}

static void test_upload_chunked(void **state)
{
	struct reg_upload u;
	struct reg_step s;
	struct reg_reply r;
	struct kpl_err err = { 0 };

	(void)state;
	/* 2500 bytes in chunks of 1000: 0-999, 1000-1999, 2000-2499 */
	reg_upload_init(&u, "https://r/", "app", D_ABC, 2500, 1000, NULL);
	assert_true(u.chunked);
	reg_upload_next(&u, &s);
	r = rep(202, "https://r/v2/app/blobs/uploads/u1", "0-0", NULL);
	assert_int_equal(reg_upload_reply(&u, &s, &r, &err), 0);
	reg_step_release(&s);
	assert_int_equal(u.state, REG_UP_PATCH);

	reg_upload_next(&u, &s);
	assert_string_equal(s.method, "PATCH");
	assert_string_equal(s.url, "https://r/v2/app/blobs/uploads/u1");
	assert_string_equal(s.content_range, "0-999");
	assert_int_equal(s.off, 0);
	assert_int_equal(s.len, 1000);
	/* relative Location for the next chunk */
	r = rep(202, "u2", "0-999", NULL);
	assert_int_equal(reg_upload_reply(&u, &s, &r, &err), 0);
	reg_step_release(&s);
	assert_string_equal(u.location, "https://r/v2/app/blobs/uploads/u2");

	reg_upload_next(&u, &s);
	assert_string_equal(s.content_range, "1000-1999");
	/* a Range that disagrees with what was sent */
	r = rep(202, NULL, "0-1500", NULL);
	assert_int_equal(reg_upload_reply(&u, &s, &r, &err), KPL_EINVAL);
	assert_non_null(strstr(err.msg, "has bytes 0-1500 after a chunk ending at byte 1999"));
	/* out of order: ask where the registry is */
	r = rep(416, NULL, NULL, NULL);
	assert_int_equal(reg_upload_reply(&u, &s, &r, &err), 0);
	reg_step_release(&s);
	assert_int_equal(u.state, REG_UP_STATUS);
	reg_upload_next(&u, &s);
	assert_string_equal(s.method, "GET");
	assert_string_equal(s.url, "https://r/v2/app/blobs/uploads/u2");
	r = rep(204, "/v2/app/blobs/uploads/u3", "0-1499", NULL);
	assert_int_equal(reg_upload_reply(&u, &s, &r, &err), 0);
	reg_step_release(&s);
	assert_int_equal(u.offset, 1500);
	assert_int_equal(u.state, REG_UP_PATCH);

	reg_upload_next(&u, &s);
	assert_string_equal(s.url, "https://r/v2/app/blobs/uploads/u3");
	assert_string_equal(s.content_range, "1500-2499");
	assert_int_equal(s.len, 1000);
	r = rep(202, "/v2/app/blobs/uploads/u4", "0-2499", NULL);
	assert_int_equal(reg_upload_reply(&u, &s, &r, &err), 0);
	reg_step_release(&s);
	assert_int_equal(u.state, REG_UP_PUT);
	assert_int_equal(u.chunks, 2);

	reg_upload_next(&u, &s);
	assert_string_equal(s.method, "PUT");
	assert_int_equal(s.len, 0); /* the data went in PATCHes */
	assert_non_null(strstr(s.url, "/uploads/u4?digest=sha256%3A"));
	r = rep(400, NULL, NULL, NULL);
	r.body = "{\"errors\":[{\"code\":\"DIGEST_INVALID\",\"message\":\"provided digest did not match uploaded content\"}]}";
	r.body_len = strlen(r.body);
	assert_int_equal(reg_upload_reply(&u, &s, &r, &err), KPL_EINVAL);
	assert_non_null(strstr(err.msg, "PUT https://r/v2/app/blobs/uploads/u4?digest="));
	assert_non_null(strstr(err.msg, ": 400 DIGEST_INVALID: provided digest did not match "
					"uploaded content"));
	r = rep(201, NULL, NULL, NULL); /* no Docker-Content-Digest: fine */
	assert_int_equal(reg_upload_reply(&u, &s, &r, &err), 0);
	assert_int_equal(u.state, REG_UP_DONE);
	reg_step_release(&s);
	reg_upload_release(&u);
}

static void test_upload_416_limit(void **state)
{
	struct reg_upload u;
	struct reg_step s;
	struct reg_reply r;
	struct kpl_err err = { 0 };
	int rc = 0;

	(void)state;
	reg_upload_init(&u, "http://r", "app", D_ABC, 10, 4, NULL);
	reg_upload_next(&u, &s);
	r = rep(202, "/up", NULL, NULL);
	assert_int_equal(reg_upload_reply(&u, &s, &r, &err), 0);
	reg_step_release(&s);
	for (int i = 0; i < 10 && !rc; i++) {
		reg_upload_next(&u, &s);
		if (u.state == REG_UP_PATCH)
			r = rep(416, NULL, NULL, NULL);
		else
			r = rep(204, NULL, "0-0", NULL); /* nothing yet */
		rc = reg_upload_reply(&u, &s, &r, &err);
		reg_step_release(&s);
	}
	assert_int_equal(rc, KPL_EINVAL);
	assert_non_null(strstr(err.msg, "416"));
	reg_upload_release(&u);
	/* a session without Location */
	reg_upload_init(&u, "http://r", "app", D_ABC, 10, 4, NULL);
	reg_upload_next(&u, &s);
	r = rep(202, NULL, NULL, NULL);
	assert_int_equal(reg_upload_reply(&u, &s, &r, &err), KPL_EINVAL);
	assert_non_null(strstr(err.msg, "202 without a Location header"));
	reg_step_release(&s);
	reg_upload_release(&u);
}

static void test_upload_mount(void **state)
{
	struct reg_upload u;
	struct reg_step s;
	struct reg_reply r;
	struct kpl_err err = { 0 };

	(void)state;
	reg_upload_init(&u, "http://r", "prod/app", D_ABC, 3, 0, "team/app");
	reg_upload_next(&u, &s);
	assert_string_equal(s.method, "POST");
	assert_string_equal(s.url, "http://r/v2/prod/app/blobs/uploads/?mount=sha256%3Aba7816bf8f01"
				   "cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad&from=team%2Fapp");
	r = rep(201, "/v2/prod/app/blobs/" D_ABC, NULL, D_ABC);
	assert_int_equal(reg_upload_reply(&u, &s, &r, &err), 0);
	assert_int_equal(u.state, REG_UP_DONE);
	assert_true(u.mounted);
	reg_upload_release(&u);

	/* mount refused: an ordinary session to go on with */
	reg_upload_init(&u, "http://r", "prod/app", D_ABC, 3, 0, "team/app");
	r = rep(202, "/v2/prod/app/blobs/uploads/u9", NULL, NULL);
	assert_int_equal(reg_upload_reply(&u, &s, &r, &err), 0);
	assert_int_equal(u.state, REG_UP_PUT);
	assert_false(u.mounted);
	reg_upload_release(&u);

	reg_upload_init(&u, "http://r", "prod/app", D_ABC, 3, 0, "team/app");
	r = rep(401, NULL, NULL, NULL);
	r.body = "{\"errors\":[{\"code\":\"UNAUTHORIZED\",\"message\":\"authentication required\"}]}";
	r.body_len = strlen(r.body);
	assert_int_equal(reg_upload_reply(&u, &s, &r, &err), KPL_EINVAL);
	assert_non_null(strstr(err.msg, "401 UNAUTHORIZED: authentication required"));
	reg_step_release(&s);
	reg_upload_release(&u);
}

/* --- OCI layout on disk --- */

static char tmpdir[256];

static void write_file(const char *rel, const char *data, size_t len)
{
	char path[512];
	FILE *f;

	snprintf(path, sizeof path, "%s/%s", tmpdir, rel);
	f = fopen(path, "wb");
	assert_non_null(f);
	assert_int_equal(fwrite(data, 1, len, f), len);
	fclose(f);
}

/* Writes a blob under blobs/sha256/ and its digest into d. */
static void write_blob(const char *data, size_t len, char d[REG_DIGEST_MAX])
{
	char rel[128];

	reg_digest(data, len, d);
	snprintf(rel, sizeof rel, "blobs/sha256/%s", d + 7);
	write_file(rel, data, len);
}

static void make_layout(const char *layer, size_t layer_size_claimed, char mdigest[REG_DIGEST_MAX],
			size_t *mlen)
{
	char cfg[REG_DIGEST_MAX], lay[REG_DIGEST_MAX], man[2048], idx[1024], sub[512];
	const char *config = "{\"architecture\":\"amd64\",\"os\":\"linux\"}";

	snprintf(sub, sizeof sub, "%s/blobs", tmpdir);
	mkdir(sub, 0700);
	snprintf(sub, sizeof sub, "%s/blobs/sha256", tmpdir);
	mkdir(sub, 0700);
	write_file("oci-layout", "{\"imageLayoutVersion\":\"1.0.0\"}", 30);
	write_blob(config, strlen(config), cfg);
	write_blob(layer, strlen(layer), lay);
	snprintf(man, sizeof man,
		 "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\","
		 "\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"%s\",\"size\":%zu},"
		 "\"layers\":[{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"%s\",\"size\":%zu}]}",
		 cfg, strlen(config), lay, layer_size_claimed);
	*mlen = strlen(man);
	write_blob(man, *mlen, mdigest);
	snprintf(idx, sizeof idx,
		 "{\"schemaVersion\":2,\"manifests\":[{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\","
		 "\"digest\":\"%s\",\"size\":%zu,\"annotations\":{\"org.opencontainers.image.ref.name\":\"v1\"}}]}",
		 mdigest, *mlen);
	write_file("index.json", idx, strlen(idx));
}

static int layout_setup(void **state)
{
	const char *base = getenv("TEST_TMPDIR");

	(void)state;
	snprintf(tmpdir, sizeof tmpdir, "%s/reglayoutXXXXXX", base ? base : "/tmp");
	return mkdtemp(tmpdir) ? 0 : -1;
}

static int layout_teardown(void **state)
{
	char cmd[600];

	(void)state;
	snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
	return system(cmd) == 0 ? 0 : -1;
}

static void test_layout(void **state)
{
	struct reg_plan p;
	struct kpl_err err = { 0 };
	char md[REG_DIGEST_MAX], path[512];
	size_t mlen;

	(void)state;
	make_layout("layer bytes", 11, md, &mlen);
	assert_int_equal(reg_layout_load(tmpdir, &p, &err), 0);
	assert_int_equal(p.n_manifests, 1);
	assert_string_equal(p.manifests[0].digest, md);
	assert_int_equal(p.manifests[0].len, mlen);
	assert_int_equal(p.manifests[0].media, REG_MEDIA_OCI_MANIFEST);
	assert_int_equal(p.n_blobs, 2);
	assert_int_equal(p.blobs[1].size, 11);
	snprintf(path, sizeof path, "%s/blobs/sha256/%s", tmpdir, p.blobs[1].digest + 7);
	assert_string_equal(p.blobs[1].path, path);
	reg_plan_release(&p);

	/* a layer whose size the manifest gets wrong */
	make_layout("layer bytes", 12, md, &mlen);
	assert_int_equal(reg_layout_load(tmpdir, &p, &err), KPL_EINVAL);
	assert_non_null(strstr(err.msg, "11 bytes, but the manifest says 12"));

	/* a manifest file that does not match its digest */
	make_layout("layer bytes", 11, md, &mlen);
	snprintf(path, sizeof path, "blobs/sha256/%s", md + 7);
	write_file(path, "{}", 2);
	assert_int_equal(reg_layout_load(tmpdir, &p, &err), KPL_EINVAL);
	assert_non_null(strstr(err.msg, "2 bytes, but its descriptor says"));

	make_layout("layer bytes", 11, md, &mlen);
	write_file("oci-layout", "{\"imageLayoutVersion\":\"2.0.0\"}", 30);
	assert_int_equal(reg_layout_load(tmpdir, &p, &err), KPL_EINVAL);
	assert_non_null(strstr(err.msg, "imageLayoutVersion must be \"1.0.0\""));

	make_layout("layer bytes", 11, md, &mlen);
	write_file("index.json", "{\"manifests\":[]}", 16);
	assert_int_equal(reg_layout_load(tmpdir, &p, &err), KPL_EINVAL);
	assert_non_null(strstr(err.msg, "must list exactly one manifest (found 0"));

	snprintf(path, sizeof path, "%s/nowhere", tmpdir);
	assert_int_equal(reg_layout_load(path, &p, &err), KPL_EINVAL);
	assert_non_null(strstr(err.msg, "oci-layout: No such file or directory"));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_digest),
		cmocka_unit_test(test_media),
		cmocka_unit_test(test_error_text),
		cmocka_unit_test(test_reply_error),
		cmocka_unit_test(test_challenge),
		cmocka_unit_test(test_ping),
		cmocka_unit_test(test_token),
		cmocka_unit_test(test_names),
		cmocka_unit_test(test_ref),
		cmocka_unit_test(test_urls),
		cmocka_unit_test(test_manifest),
		cmocka_unit_test(test_plan),
		cmocka_unit_test(test_upload_monolithic),
		cmocka_unit_test(test_upload_chunked),
		cmocka_unit_test(test_upload_416_limit),
		cmocka_unit_test(test_upload_mount),
		cmocka_unit_test_setup_teardown(test_layout, layout_setup, layout_teardown),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
