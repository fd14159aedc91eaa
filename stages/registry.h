/*
 * registry.h - kpl's OCI registry client (the Docker registry HTTP API v2 /
 * OCI distribution spec): the protocol logic, without I/O.
 *
 * Everything here turns replies (status, a few headers, a body) into
 * decisions and next requests, so the push stage (stages/push.c) only moves
 * bytes with base/http.h, and the rules are unit-tested over fixture
 * replies (tests/unit/registry_test.c). The one exception is
 * reg_layout_load, which reads an OCI image layout from disk with blocking
 * calls: run it on libuv's thread pool, never on the loop.
 *
 * What is covered:
 *   - digests: sha256 only (OpenSSL EVP), "sha256:" + 64 lowercase hex;
 *   - WWW-Authenticate challenges (Basic and Bearer), the token request URL
 *     and the token reply (token / access_token);
 *   - error bodies {"errors":[{"code","message"}]} as one line for a person;
 *   - image references ("host:port/team/app@sha256:..", "team/app:v1");
 *   - manifests: OCI image manifest and index, Docker schema 2 manifest and
 *     manifest list (media types, referenced blobs and child manifests);
 *   - a blob upload as a small state machine: POST (or a cross-repository
 *     mount), then either one PUT with the whole blob (monolithic) or PATCH
 *     chunks then a closing PUT, following Location (absolute or relative)
 *     and Range, recovering from a 416 with a status GET;
 *   - the OCI image layout (oci-layout, index.json, blobs/sha256/..) as a
 *     push plan: the blobs to send and the manifests to PUT, in order.
 *
 * Memory: every char * a function returns or stores in a struct is malloc'd
 * and owned by the caller (or by the struct, freed by its _release).
 * Threads: any; no global state.
 */
#ifndef KPL_REGISTRY_H
#define KPL_REGISTRY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/kpl.h"

/* "sha256:" + 64 hex + NUL. */
#define REG_DIGEST_MAX 72
/* The largest manifest kpl reads or pushes (registries must take 4 MB). */
#define REG_MAX_MANIFEST (4u * 1024 * 1024)

/* --- Digests --- */

/* An incremental sha256 (an EVP_MD_CTX inside). */
struct reg_hash {
	void *ctx;
};
void reg_hash_init(struct reg_hash *h);
void reg_hash_update(struct reg_hash *h, const void *p, size_t n);
/* Writes "sha256:<hex>" and releases the context (init again to reuse). */
void reg_hash_final(struct reg_hash *h, char out[REG_DIGEST_MAX]);
/* Releases a context not finalized (no-op after final). */
void reg_hash_release(struct reg_hash *h);
/* The digest of p[0..n). */
void reg_digest(const void *p, size_t n, char out[REG_DIGEST_MAX]);
/* 1 if d is "sha256:" + 64 lowercase hex digits. */
int reg_digest_valid(const char *d);

/* --- Media types --- */

#define REG_MEDIA_MAP(X)                                                           \
	X(UNKNOWN, "")                                                             \
	X(OCI_MANIFEST, "application/vnd.oci.image.manifest.v1+json")              \
	X(OCI_INDEX, "application/vnd.oci.image.index.v1+json")                    \
	X(DOCKER_MANIFEST, "application/vnd.docker.distribution.manifest.v2+json") \
	X(DOCKER_LIST, "application/vnd.docker.distribution.manifest.list.v2+json")

enum reg_media {
#define REG_MEDIA_ENUM(e, s) REG_MEDIA_##e,
	REG_MEDIA_MAP(REG_MEDIA_ENUM)
#undef REG_MEDIA_ENUM
	REG_MEDIA_LAST_
};

/* The media type string ("" for UNKNOWN); static. */
const char *reg_media_name(enum reg_media m);
/* A Content-Type (parameters after ';' ignored) to a manifest type. */
enum reg_media reg_media_parse(const char *content_type);
/* 1 for an index or a manifest list (it names manifests, not layers). */
int reg_media_is_index(enum reg_media m);
/* The Accept header value naming every manifest type kpl handles (static).
 * Always send it: a distribution registry may otherwise convert to schema 1. */
const char *reg_manifest_accept(void);

/* --- Replies --- */

/* What the protocol logic needs of an HTTP reply (all borrowed; any header
 * may be NULL when absent). */
struct reg_reply {
	long status;
	const char *location;         /* Location */
	const char *range;            /* Range */
	const char *digest;           /* Docker-Content-Digest */
	const char *content_type;     /* Content-Type */
	const char *www_authenticate; /* WWW-Authenticate */
	const char *body;
	size_t body_len;
};

/*
 * The registry's own words for a failed reply: "400 MANIFEST_INVALID:
 * manifest invalid" (every error of the body, "; " between them, code and
 * message verbatim), or "404 Not Found" style text when the body is not the
 * registry error JSON ("404: <first line of the body>" if it has one, cut at
 * 200 bytes). Written into out (always NUL-terminated).
 */
void reg_error_text(long status, const char *body, size_t len, char *out, size_t n);

/* Fills err with "METHOD <redacted url>: <reg_error_text>" and returns
 * KPL_EUNAVAILABLE for a 5xx or 429, KPL_EINVAL otherwise. */
int reg_reply_error(struct kpl_err *err, const char *method, const char *url,
		    const struct reg_reply *r);

/* --- Authentication --- */

enum reg_auth_scheme { REG_AUTH_NONE, REG_AUTH_BASIC, REG_AUTH_BEARER, REG_AUTH_LAST_ };

/* A WWW-Authenticate challenge (RFC 7235 / RFC 6750 §3). */
struct reg_challenge {
	enum reg_auth_scheme scheme;
	char *realm;
	char *service; /* bearer */
	char *scope;   /* bearer; may hold commas ("repository:a/b:pull,push") */
	char *error;   /* bearer, e.g. "insufficient_scope" */
};

/* Parses a header value: the scheme (case-insensitive) then key=value or
 * key="quoted, value" pairs. 0, or KPL_EINVAL for an unknown scheme or a
 * malformed header (c is then empty). */
int reg_challenge_parse(const char *header, struct reg_challenge *c);
void reg_challenge_release(struct reg_challenge *c);

/*
 * What a ping (GET /v2/ without credentials) says: 0 with c->scheme NONE
 * (200: no auth needed), BASIC or BEARER (401 and its challenge); otherwise
 * KPL_EINVAL (not a v2 registry, or a 401 without a usable challenge) or
 * KPL_EUNAVAILABLE (5xx), err naming the URL and the reply.
 */
int reg_ping_reply(const char *url, const struct reg_reply *r, struct reg_challenge *c,
		   struct kpl_err *err);

/* "repository:<repo>:<actions>" (actions like "pull,push"). */
char *reg_scope(const char *repo, const char *actions);

/* The token request: realm?service=S&scope=A&scope=B (each value
 * percent-encoded; '&' if realm already has a query). NULL if the challenge
 * has no http(s) realm. */
char *reg_token_url(const struct reg_challenge *c, const char *const *scopes, size_t n);

/* The token server's JSON: "token", else "access_token". *token is
 * malloc'd. *expires_in is the lifetime in seconds (60 when absent or
 * smaller, as the spec says). KPL_EINVAL with err if neither is there. */
int reg_token_parse(const char *body, size_t len, char **token, long *expires_in,
		    struct kpl_err *err);

/* --- Names and URLs --- */

/* 1 if repo matches the distribution spec's <name> grammar. */
int reg_repo_valid(const char *repo);
/* 1 if tag matches [a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}. */
int reg_tag_valid(const char *tag);

/* An image reference. host is NULL when the reference names none. */
struct reg_ref {
	char *host;   /* "reg.example.com:5000" */
	char *repo;   /* "team/app" */
	char *tag;    /* "v1" or NULL */
	char *digest; /* "sha256:..." or NULL */
};
/* Parses "[host[:port]/]repo[:tag][@digest]"; the first path component is
 * a host when it holds '.' or ':' or is "localhost" (Docker's rule). A tag
 * or a digest is required. KPL_EINVAL with err saying what is wrong. */
int reg_ref_parse(const char *s, struct reg_ref *r, struct kpl_err *err);
void reg_ref_release(struct reg_ref *r);

/* The "host[:port]" of an http(s) URL (malloc'd), NULL if it has none. */
char *reg_url_host(const char *url);
/* base (an endpoint URL, trailing '/' or not) + "/v2/" + repo + rest
 * ("/blobs/sha256:..", "/manifests/v1", "/blobs/uploads/"). */
char *reg_api_url(const char *base, const char *repo, const char *rest);
/* Resolves a Location header against the URL of the request that got it:
 * absolute (http://, https://) as is, "/path" on the same scheme and host,
 * anything else relative to the request URL's directory. NULL for NULL or
 * an empty location. */
char *reg_resolve_location(const char *request_url, const char *location);
/* url + "?digest=" or "&digest=" + the digest percent-encoded. */
char *reg_url_with_digest(const char *url, const char *digest);
/* Parses a Range header "0-<end>" (or "bytes=0-<end>"); 0 and *end, or
 * KPL_EINVAL. */
int reg_parse_range(const char *range, uint64_t *end);

/* --- Manifests --- */

struct reg_desc {
	char *media_type; /* may be NULL */
	char digest[REG_DIGEST_MAX];
	uint64_t size;
};

struct reg_manifest {
	enum reg_media media;
	/* An image manifest: config first, then the layers, in order. */
	struct reg_desc *blobs;
	size_t n_blobs;
	/* An index or manifest list: the manifests it names. */
	struct reg_desc *children;
	size_t n_children;
};

/*
 * Parses manifest bytes. The type is the body's "mediaType"; without one,
 * content_type (may be NULL); without either, an OCI index if there is a
 * "manifests" array, else an OCI manifest. Both given and different is an
 * error (a registry would reject the PUT). KPL_EINVAL with err otherwise:
 * not JSON, a descriptor without a valid sha256 digest or size, no config.
 */
int reg_manifest_parse(const char *bytes, size_t len, const char *content_type,
		       struct reg_manifest *m, struct kpl_err *err);
void reg_manifest_release(struct reg_manifest *m);

/* --- A push plan --- */

struct reg_blob {
	char digest[REG_DIGEST_MAX];
	uint64_t size;
	char *path; /* the file holding it (a layout's), or NULL */
};

struct reg_mfile {
	enum reg_media media;
	char digest[REG_DIGEST_MAX];
	char *bytes;
	size_t len;
};

/*
 * What a push sends: every blob once (config and layers of every image
 * manifest), then the manifests in order: an index's children first (by
 * digest), the top one last (by tag).
 */
struct reg_plan {
	struct reg_blob *blobs;
	size_t n_blobs;
	struct reg_mfile *manifests;
	size_t n_manifests;
};

/*
 * Adds a manifest (bytes copied) to the end of the plan and, for an image
 * manifest, its blobs not yet listed (path NULL). With digest_want non-NULL
 * the bytes must hash to it. On success *parsed (if not NULL) holds the
 * parsed manifest (the caller releases it). KPL_EINVAL with err otherwise.
 */
int reg_plan_add_manifest(struct reg_plan *p, const char *bytes, size_t len,
			  const char *content_type, const char *digest_want,
			  struct reg_manifest *parsed, struct kpl_err *err);
/* Moves the last manifest to the end again after others were added (an
 * index's children are fetched after it but pushed before it). */
void reg_plan_move_to_end(struct reg_plan *p, size_t i);
void reg_plan_release(struct reg_plan *p);

/*
 * Reads an OCI image layout directory: oci-layout must say
 * imageLayoutVersion 1.0.0; index.json must name exactly one manifest
 * (an image manifest, or an index whose children are image manifests, all
 * in the layout); manifests are checked against their digests and sizes;
 * every blob file must exist with the size its descriptor says (its
 * content is hashed while it is uploaded). BLOCKING: thread pool only.
 * On success p is filled with paths set; KPL_EINVAL or KPL_EIO with err
 * naming the file.
 */
int reg_layout_load(const char *dir, struct reg_plan *p, struct kpl_err *err);

/* --- A blob upload --- */

#define REG_UP_STATE_MAP(X)                                                    \
	X(POST, "start the upload (or mount)")                                 \
	X(PATCH, "send a chunk")                                               \
	X(STATUS, "ask the registry how much it has (after a 416)")            \
	X(PUT, "close the upload with the digest (and the whole blob if "      \
	       "monolithic)")                                                  \
	X(DONE, "the registry has the blob")

enum reg_up_state {
#define REG_UP_ENUM(e, s) REG_UP_##e,
	REG_UP_STATE_MAP(REG_UP_ENUM)
#undef REG_UP_ENUM
	REG_UP_LAST_
};

struct reg_upload {
	char *base;       /* the endpoint URL */
	char *repo;
	char digest[REG_DIGEST_MAX];
	uint64_t size;
	/* Blobs larger than this go in PATCH chunks of this size; smaller
	 * ones, and all with 0, in one PUT. */
	uint64_t chunk_size;
	char *mount_from; /* a repository to mount from, or NULL */

	enum reg_up_state state;
	bool chunked;
	bool mounted;       /* DONE through a mount: nothing was sent */
	char *location;     /* the upload session's URL (absolute) */
	uint64_t offset;    /* bytes the registry has confirmed */
	unsigned chunks;    /* PATCH requests accepted */
	unsigned recoveries;
};

/* One request to send. The body is bytes [off, off+len) of the blob. */
struct reg_step {
	const char *method; /* static */
	char *url;          /* absolute, malloc'd */
	uint64_t off, len;
	char content_range[48]; /* "" if none */
	bool octet_stream;      /* send Content-Type: application/octet-stream */
};

void reg_upload_init(struct reg_upload *u, const char *base, const char *repo,
		     const char *digest, uint64_t size, uint64_t chunk_size,
		     const char *mount_from);
void reg_upload_release(struct reg_upload *u);
/* The request for the current state (BUG() in DONE). step->url is new;
 * release the step with reg_step_release. */
void reg_upload_next(const struct reg_upload *u, struct reg_step *step);
void reg_step_release(struct reg_step *step);
/*
 * Feeds the reply to the request of step and moves the upload on (state
 * DONE when the blob is there). Errors (err says "METHOD url: ..."):
 * the registry's reply to anything unexpected (reg_reply_error), a 202
 * without Location, a Range that disagrees with what was sent, a
 * Docker-Content-Digest that is not the blob's, too many 416s.
 */
int reg_upload_reply(struct reg_upload *u, const struct reg_step *step,
		     const struct reg_reply *r, struct kpl_err *err);
/* Static text naming a state (for debug logs). */
const char *reg_up_state_name(enum reg_up_state s);

/* "12.3 MiB" style size (for logs). */
void reg_human_size(uint64_t n, char *out, size_t len);

#endif
