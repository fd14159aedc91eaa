/*
 * registry.c - the OCI registry protocol without I/O (see registry.h).
 */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>
#include <openssl/evp.h>

#include "base/http.h"
#include "stages/registry.h"

/* ---------------------------------------------------------------------- */
/* Digests */

void reg_hash_init(struct reg_hash *h)
{
	EVP_MD_CTX *ctx = EVP_MD_CTX_new();

	if (!ctx || EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) != 1)
		BUG("cannot initialize sha256");
	h->ctx = ctx;
}

void reg_hash_update(struct reg_hash *h, const void *p, size_t n)
{
	if (n && EVP_DigestUpdate(h->ctx, p, n) != 1)
		BUG("sha256 update failed");
}

void reg_hash_final(struct reg_hash *h, char out[REG_DIGEST_MAX])
{
	unsigned char md[32];
	unsigned int len = 0;

	if (EVP_DigestFinal_ex(h->ctx, md, &len) != 1 || len != 32)
		BUG("sha256 final failed");
	memcpy(out, "sha256:", 7);
	for (unsigned i = 0; i < 32; i++)
		snprintf(out + 7 + 2 * i, 3, "%02x", md[i]);
	reg_hash_release(h);
}

void reg_hash_release(struct reg_hash *h)
{
	if (h->ctx)
		EVP_MD_CTX_free(h->ctx);
	h->ctx = NULL;
}

void reg_digest(const void *p, size_t n, char out[REG_DIGEST_MAX])
{
	struct reg_hash h;

	reg_hash_init(&h);
	reg_hash_update(&h, p, n);
	reg_hash_final(&h, out);
}

int reg_digest_valid(const char *d)
{
	if (!d || strncmp(d, "sha256:", 7) != 0 || strlen(d) != 71)
		return 0;
	for (const char *p = d + 7; *p; p++)
		if (!isdigit((unsigned char)*p) && !(*p >= 'a' && *p <= 'f'))
			return 0;
	return 1;
}

/* ---------------------------------------------------------------------- */
/* Media types */

static const char *const media_names[] = {
#define REG_MEDIA_STR(e, s) s,
	REG_MEDIA_MAP(REG_MEDIA_STR)
#undef REG_MEDIA_STR
};

const char *reg_media_name(enum reg_media m)
{
	return (unsigned)m < REG_MEDIA_LAST_ ? media_names[m] : "";
}

enum reg_media reg_media_parse(const char *ct)
{
	size_t n;

	if (!ct)
		return REG_MEDIA_UNKNOWN;
	while (*ct == ' ')
		ct++;
	n = strcspn(ct, "; ");
	for (int m = 1; m < REG_MEDIA_LAST_; m++)
		if (strlen(media_names[m]) == n && strncasecmp(ct, media_names[m], n) == 0)
			return (enum reg_media)m;
	return REG_MEDIA_UNKNOWN;
}

int reg_media_is_index(enum reg_media m)
{
	return m == REG_MEDIA_OCI_INDEX || m == REG_MEDIA_DOCKER_LIST;
}

const char *reg_manifest_accept(void)
{
	return "application/vnd.oci.image.manifest.v1+json, "
	       "application/vnd.oci.image.index.v1+json, "
	       "application/vnd.docker.distribution.manifest.v2+json, "
	       "application/vnd.docker.distribution.manifest.list.v2+json";
}

/* ---------------------------------------------------------------------- */
/* Errors */

static const char *status_text(long status)
{
	switch (status) {
	case 400: return "Bad Request";
	case 401: return "Unauthorized";
	case 403: return "Forbidden";
	case 404: return "Not Found";
	case 405: return "Method Not Allowed";
	case 409: return "Conflict";
	case 413: return "Payload Too Large";
	case 416: return "Range Not Satisfiable";
	case 429: return "Too Many Requests";
	case 500: return "Internal Server Error";
	case 502: return "Bad Gateway";
	case 503: return "Service Unavailable";
	case 504: return "Gateway Timeout";
	default: return "";
	}
}

void reg_error_text(long status, const char *body, size_t len, char *out, size_t n)
{
	json_t *root = NULL, *errs;
	size_t used;

	used = (size_t)snprintf(out, n, "%ld", status);
	if (used >= n)
		return;
	if (body && len)
		root = json_loadb(body, len, 0, NULL);
	errs = root ? json_object_get(root, "errors") : NULL;
	if (json_is_array(errs) && json_array_size(errs) > 0) {
		for (size_t i = 0; i < json_array_size(errs) && used < n; i++) {
			json_t *e = json_array_get(errs, i);
			const char *code = json_string_value(json_object_get(e, "code"));
			const char *msg = json_string_value(json_object_get(e, "message"));
			used += (size_t)snprintf(out + used, n - used, "%s%s%s%s", i ? "; " : " ",
						 code ? code : "UNKNOWN", msg && *msg ? ": " : "",
						 msg ? msg : "");
		}
	} else if (body && len) {
		size_t line = strcspn(body, "\r\n");
		if (line > 200)
			line = 200;
		if (line)
			snprintf(out + used, n - used, ": %.*s", (int)line, body);
		else
			snprintf(out + used, n - used, " %s", status_text(status));
	} else if (*status_text(status)) {
		snprintf(out + used, n - used, " %s", status_text(status));
	}
	json_decref(root);
}

int reg_reply_error(struct kpl_err *err, const char *method, const char *url,
		    const struct reg_reply *r)
{
	char text[400];
	char *red = http_redact_url(url);
	int code = r->status >= 500 || r->status == 429 ? KPL_EUNAVAILABLE : KPL_EINVAL;

	reg_error_text(r->status, r->body, r->body_len, text, sizeof text);
	kpl_errf(err, code, "%s %s: %s", method, red, text);
	free(red);
	return code;
}

/* ---------------------------------------------------------------------- */
/* Authentication */

void reg_challenge_release(struct reg_challenge *c)
{
	free(c->realm);
	free(c->service);
	free(c->scope);
	free(c->error);
	memset(c, 0, sizeof *c);
}

int reg_challenge_parse(const char *h, struct reg_challenge *c)
{
	const char *p = h;
	size_t n;

	memset(c, 0, sizeof *c);
	if (!h)
		return KPL_EINVAL;
	while (*p == ' ' || *p == '\t')
		p++;
	n = strcspn(p, " \t");
	if (n == 5 && strncasecmp(p, "Basic", 5) == 0)
		c->scheme = REG_AUTH_BASIC;
	else if (n == 6 && strncasecmp(p, "Bearer", 6) == 0)
		c->scheme = REG_AUTH_BEARER;
	else
		return KPL_EINVAL;
	p += n;
	for (;;) {
		const char *key;
		size_t klen;
		char *val;

		while (*p == ' ' || *p == '\t' || *p == ',')
			p++;
		if (!*p)
			break;
		key = p;
		klen = strcspn(p, "= \t,");
		p += klen;
		while (*p == ' ' || *p == '\t')
			p++;
		if (*p != '=' || klen == 0)
			goto bad;
		p++;
		while (*p == ' ' || *p == '\t')
			p++;
		if (*p == '"') {
			/* quoted-string: backslash escapes one character */
			size_t cap = strlen(p), len = 0;
			val = kpl_malloc(cap + 1);
			p++;
			while (*p && *p != '"') {
				if (*p == '\\' && p[1])
					p++;
				val[len++] = *p++;
			}
			if (*p != '"') {
				free(val);
				goto bad;
			}
			p++;
			val[len] = '\0';
		} else {
			size_t vlen = strcspn(p, ", \t");
			val = kpl_strndup(p, vlen);
			p += vlen;
		}
		if (klen == 5 && strncasecmp(key, "realm", 5) == 0) {
			free(c->realm);
			c->realm = val;
		} else if (klen == 7 && strncasecmp(key, "service", 7) == 0) {
			free(c->service);
			c->service = val;
		} else if (klen == 5 && strncasecmp(key, "scope", 5) == 0) {
			free(c->scope);
			c->scope = val;
		} else if (klen == 5 && strncasecmp(key, "error", 5) == 0) {
			free(c->error);
			c->error = val;
		} else {
			free(val);
		}
	}
	return 0;
bad:
	reg_challenge_release(c);
	return KPL_EINVAL;
}

int reg_ping_reply(const char *url, const struct reg_reply *r, struct reg_challenge *c,
		   struct kpl_err *err)
{
	char *red;

	memset(c, 0, sizeof *c);
	if (r->status >= 200 && r->status < 300)
		return 0;
	if (r->status == 401) {
		if (reg_challenge_parse(r->www_authenticate, c) == 0) {
			if (c->scheme == REG_AUTH_BASIC || (c->realm && *c->realm))
				return 0;
			reg_challenge_release(c);
		}
		red = http_redact_url(url);
		kpl_errf(err, KPL_EINVAL, "GET %s: 401 without a usable WWW-Authenticate "
			 "challenge (got \"%.120s\")", red,
			 r->www_authenticate ? r->www_authenticate : "");
		free(red);
		return KPL_EINVAL;
	}
	if (r->status == 404) {
		red = http_redact_url(url);
		kpl_errf(err, KPL_EINVAL, "GET %s: 404: not a registry (no v2 API there)", red);
		free(red);
		return KPL_EINVAL;
	}
	return reg_reply_error(err, "GET", url, r);
}

char *reg_scope(const char *repo, const char *actions)
{
	return kpl_asprintf("repository:%s:%s", repo, actions);
}

/* Percent-encodes everything but RFC 3986 unreserved characters. */
static void url_encode_to(char **buf, size_t *len, size_t *cap, const char *s)
{
	static const char hex[] = "0123456789ABCDEF";
	size_t need = *len + 3 * strlen(s) + 1;

	if (need > *cap) {
		*cap = need * 2;
		*buf = kpl_realloc(*buf, *cap);
	}
	for (; *s; s++) {
		unsigned char ch = (unsigned char)*s;
		if (isalnum(ch) || ch == '-' || ch == '.' || ch == '_' || ch == '~') {
			(*buf)[(*len)++] = (char)ch;
		} else {
			(*buf)[(*len)++] = '%';
			(*buf)[(*len)++] = hex[ch >> 4];
			(*buf)[(*len)++] = hex[ch & 15];
		}
	}
	(*buf)[*len] = '\0';
}

static void append(char **buf, size_t *len, size_t *cap, const char *s)
{
	size_t n = strlen(s);

	if (*len + n + 1 > *cap) {
		*cap = (*len + n + 1) * 2;
		*buf = kpl_realloc(*buf, *cap);
	}
	memcpy(*buf + *len, s, n + 1);
	*len += n;
}

static int is_http_url(const char *u)
{
	return u && (strncmp(u, "http://", 7) == 0 || strncmp(u, "https://", 8) == 0);
}

char *reg_token_url(const struct reg_challenge *c, const char *const *scopes, size_t n)
{
	char *buf = NULL;
	size_t len = 0, cap = 0;
	char sep;

	if (!is_http_url(c->realm))
		return NULL;
	append(&buf, &len, &cap, c->realm);
	sep = strchr(c->realm, '?') ? '&' : '?';
	if (c->service && *c->service) {
		append(&buf, &len, &cap, sep == '?' ? "?service=" : "&service=");
		url_encode_to(&buf, &len, &cap, c->service);
		sep = '&';
	}
	for (size_t i = 0; i < n; i++) {
		append(&buf, &len, &cap, sep == '?' ? "?scope=" : "&scope=");
		url_encode_to(&buf, &len, &cap, scopes[i]);
		sep = '&';
	}
	return buf;
}

int reg_token_parse(const char *body, size_t len, char **token, long *expires_in,
		    struct kpl_err *err)
{
	json_t *root = json_loadb(body ? body : "", len, 0, NULL);
	const char *t = NULL;
	json_t *exp;

	*token = NULL;
	*expires_in = 60;
	if (!json_is_object(root)) {
		json_decref(root);
		return kpl_errf(err, KPL_EINVAL, "token server reply is not a JSON object");
	}
	t = json_string_value(json_object_get(root, "token"));
	if (!t || !*t)
		t = json_string_value(json_object_get(root, "access_token"));
	if (!t || !*t) {
		json_decref(root);
		return kpl_errf(err, KPL_EINVAL,
				"token server reply has neither \"token\" nor \"access_token\"");
	}
	*token = kpl_strdup(t);
	exp = json_object_get(root, "expires_in");
	if (json_is_integer(exp) && json_integer_value(exp) > 60)
		*expires_in = (long)json_integer_value(exp);
	json_decref(root);
	return 0;
}

/* ---------------------------------------------------------------------- */
/* Names and URLs */

/* One path component: [a-z0-9]+((\.|_|__|-+)[a-z0-9]+)* */
static int repo_component_valid(const char *s, size_t n)
{
	size_t i = 0;

	if (n == 0)
		return 0;
	while (i < n) {
		size_t run = 0, sep;
		while (i < n && (islower((unsigned char)s[i]) || isdigit((unsigned char)s[i]))) {
			i++;
			run++;
		}
		if (!run)
			return 0;
		if (i == n)
			return 1;
		sep = i;
		if (s[i] == '.') {
			i++;
		} else if (s[i] == '_') {
			i++;
			if (i < n && s[i] == '_')
				i++;
		} else if (s[i] == '-') {
			while (i < n && s[i] == '-')
				i++;
		} else {
			return 0;
		}
		if (i == n || i == sep)
			return 0;
	}
	return 1;
}

int reg_repo_valid(const char *repo)
{
	const char *p = repo;

	if (!repo || !*repo || strlen(repo) > 255)
		return 0;
	for (;;) {
		size_t n = strcspn(p, "/");
		if (!repo_component_valid(p, n))
			return 0;
		if (!p[n])
			return 1;
		p += n + 1;
	}
}

int reg_tag_valid(const char *tag)
{
	size_t n = tag ? strlen(tag) : 0;

	if (n == 0 || n > 128)
		return 0;
	if (!isalnum((unsigned char)tag[0]) && tag[0] != '_')
		return 0;
	for (size_t i = 1; i < n; i++)
		if (!isalnum((unsigned char)tag[i]) && !strchr("._-", tag[i]))
			return 0;
	return 1;
}

void reg_ref_release(struct reg_ref *r)
{
	free(r->host);
	free(r->repo);
	free(r->tag);
	free(r->digest);
	memset(r, 0, sizeof *r);
}

int reg_ref_parse(const char *s, struct reg_ref *r, struct kpl_err *err)
{
	char *copy, *at, *slash, *colon, *name;

	memset(r, 0, sizeof *r);
	if (!s || !*s)
		return kpl_errf(err, KPL_EINVAL, "empty image reference");
	copy = kpl_strdup(s);
	if ((at = strchr(copy, '@')) != NULL) {
		*at = '\0';
		r->digest = kpl_strdup(at + 1);
		if (!reg_digest_valid(r->digest)) {
			kpl_errf(err, KPL_EINVAL, "image %s: digest must be sha256: and 64 "
				 "lowercase hex digits", s);
			goto fail;
		}
	}
	name = copy;
	slash = strchr(copy, '/');
	if (slash && (memchr(copy, '.', (size_t)(slash - copy)) ||
		      memchr(copy, ':', (size_t)(slash - copy)) ||
		      ((size_t)(slash - copy) == 9 && strncmp(copy, "localhost", 9) == 0))) {
		r->host = kpl_strndup(copy, (size_t)(slash - copy));
		name = slash + 1;
	}
	/* A tag follows the last ':' after the last '/'. */
	colon = strrchr(name, ':');
	if (colon && !strchr(colon, '/')) {
		*colon = '\0';
		r->tag = kpl_strdup(colon + 1);
		if (!reg_tag_valid(r->tag)) {
			kpl_errf(err, KPL_EINVAL, "image %s: invalid tag \"%s\"", s, r->tag);
			goto fail;
		}
	}
	r->repo = kpl_strdup(name);
	if (!reg_repo_valid(r->repo)) {
		kpl_errf(err, KPL_EINVAL, "image %s: invalid repository name \"%s\" "
			 "(lowercase letters, digits, separators . _ __ -, and /)", s, r->repo);
		goto fail;
	}
	if (!r->tag && !r->digest) {
		kpl_errf(err, KPL_EINVAL, "image %s: needs a tag (:v1) or a digest "
			 "(@sha256:...)", s);
		goto fail;
	}
	free(copy);
	return 0;
fail:
	free(copy);
	reg_ref_release(r);
	return KPL_EINVAL;
}

/* Length of "scheme://authority" in an http(s) URL, 0 if it is not one. */
static size_t origin_len(const char *url)
{
	const char *p;

	if (!is_http_url(url))
		return 0;
	p = strstr(url, "://") + 3;
	return (size_t)(p - url) + strcspn(p, "/?#");
}

char *reg_url_host(const char *url)
{
	size_t o = origin_len(url);
	const char *h, *at;
	size_t n;

	if (!o)
		return NULL;
	h = strstr(url, "://") + 3;
	n = (size_t)(url + o - h);
	/* userinfo is not part of the host */
	at = memchr(h, '@', n);
	if (at) {
		n -= (size_t)(at + 1 - h);
		h = at + 1;
	}
	return n ? kpl_strndup(h, n) : NULL;
}

char *reg_api_url(const char *base, const char *repo, const char *rest)
{
	size_t n = strlen(base);

	while (n && base[n - 1] == '/')
		n--;
	return kpl_asprintf("%.*s/v2/%s%s", (int)n, base, repo, rest);
}

char *reg_resolve_location(const char *req_url, const char *loc)
{
	size_t o, dir;

	if (!loc || !*loc)
		return NULL;
	if (is_http_url(loc))
		return kpl_strdup(loc);
	o = origin_len(req_url);
	if (!o)
		return kpl_strdup(loc);
	if (loc[0] == '/')
		return kpl_asprintf("%.*s%s", (int)o, req_url, loc);
	/* relative: replace what follows the last '/' of the path */
	dir = o + strcspn(req_url + o, "?#");
	while (dir > o && req_url[dir - 1] != '/')
		dir--;
	if (dir == o)
		return kpl_asprintf("%.*s/%s", (int)o, req_url, loc);
	return kpl_asprintf("%.*s%s", (int)dir, req_url, loc);
}

char *reg_url_with_digest(const char *url, const char *digest)
{
	char *buf = NULL;
	size_t len = 0, cap = 0;

	append(&buf, &len, &cap, url);
	append(&buf, &len, &cap, strchr(url, '?') ? "&digest=" : "?digest=");
	url_encode_to(&buf, &len, &cap, digest);
	return buf;
}

int reg_parse_range(const char *range, uint64_t *end)
{
	const char *p = range;
	char *e;
	unsigned long long v;

	if (!p)
		return KPL_EINVAL;
	while (*p == ' ')
		p++;
	if (strncmp(p, "bytes=", 6) == 0)
		p += 6;
	if (p[0] != '0' || p[1] != '-' || !isdigit((unsigned char)p[2]))
		return KPL_EINVAL;
	errno = 0;
	v = strtoull(p + 2, &e, 10);
	if (errno || (*e && *e != ' '))
		return KPL_EINVAL;
	*end = v;
	return 0;
}

/* ---------------------------------------------------------------------- */
/* Manifests */

static int parse_desc(json_t *j, const char *what, struct reg_desc *d, struct kpl_err *err)
{
	const char *digest = json_string_value(json_object_get(j, "digest"));
	const char *mt = json_string_value(json_object_get(j, "mediaType"));
	json_t *size = json_object_get(j, "size");

	memset(d, 0, sizeof *d);
	if (!json_is_object(j))
		return kpl_errf(err, KPL_EINVAL, "manifest: %s is not an object", what);
	if (!reg_digest_valid(digest))
		return kpl_errf(err, KPL_EINVAL, "manifest: %s: digest %s%s%s is not sha256: "
				"and 64 hex digits", what, digest ? "\"" : "",
				digest ? digest : "missing", digest ? "\"" : "");
	if (!json_is_integer(size) || json_integer_value(size) < 0)
		return kpl_errf(err, KPL_EINVAL, "manifest: %s: size must be a "
				"non-negative integer", what);
	snprintf(d->digest, sizeof d->digest, "%s", digest);
	d->size = (uint64_t)json_integer_value(size);
	d->media_type = mt ? kpl_strdup(mt) : NULL;
	return 0;
}

static void desc_list_free(struct reg_desc *d, size_t n)
{
	for (size_t i = 0; i < n; i++)
		free(d[i].media_type);
	free(d);
}

void reg_manifest_release(struct reg_manifest *m)
{
	desc_list_free(m->blobs, m->n_blobs);
	desc_list_free(m->children, m->n_children);
	memset(m, 0, sizeof *m);
}

int reg_manifest_parse(const char *bytes, size_t len, const char *content_type,
		       struct reg_manifest *m, struct kpl_err *err)
{
	json_error_t jerr;
	json_t *root, *arr;
	const char *body_mt;
	enum reg_media from_body = REG_MEDIA_UNKNOWN, from_ct;
	char what[64];
	int rc = 0;

	memset(m, 0, sizeof *m);
	root = json_loadb(bytes, len, 0, &jerr);
	if (!json_is_object(root)) {
		json_decref(root);
		return kpl_errf(err, KPL_EINVAL, "manifest is not a JSON object%s%s",
				root ? "" : ": ", root ? "" : jerr.text);
	}
	body_mt = json_string_value(json_object_get(root, "mediaType"));
	from_ct = reg_media_parse(content_type);
	if (body_mt) {
		from_body = reg_media_parse(body_mt);
		if (from_body == REG_MEDIA_UNKNOWN) {
			rc = kpl_errf(err, KPL_EINVAL, "manifest: unsupported mediaType \"%.100s\"",
				      body_mt);
			goto out;
		}
		if (from_ct != REG_MEDIA_UNKNOWN && from_ct != from_body) {
			rc = kpl_errf(err, KPL_EINVAL, "manifest: mediaType %s but Content-Type %s",
				      body_mt, reg_media_name(from_ct));
			goto out;
		}
		m->media = from_body;
	} else if (from_ct != REG_MEDIA_UNKNOWN) {
		m->media = from_ct;
	} else {
		m->media = json_is_array(json_object_get(root, "manifests"))
				   ? REG_MEDIA_OCI_INDEX : REG_MEDIA_OCI_MANIFEST;
	}
	if (reg_media_is_index(m->media)) {
		arr = json_object_get(root, "manifests");
		if (!json_is_array(arr)) {
			rc = kpl_errf(err, KPL_EINVAL, "manifest: an index needs a \"manifests\" "
				      "array");
			goto out;
		}
		m->children = kpl_calloc(json_array_size(arr) + 1, sizeof *m->children);
		for (size_t i = 0; i < json_array_size(arr); i++) {
			snprintf(what, sizeof what, "manifests[%zu]", i);
			if ((rc = parse_desc(json_array_get(arr, i), what, &m->children[i], err)))
				goto out;
			m->n_children++;
		}
	} else {
		arr = json_object_get(root, "layers");
		if (!json_is_object(json_object_get(root, "config"))) {
			rc = kpl_errf(err, KPL_EINVAL, "manifest: no \"config\" descriptor");
			goto out;
		}
		if (arr && !json_is_array(arr)) {
			rc = kpl_errf(err, KPL_EINVAL, "manifest: \"layers\" must be an array");
			goto out;
		}
		m->blobs = kpl_calloc(json_array_size(arr) + 1, sizeof *m->blobs);
		if ((rc = parse_desc(json_object_get(root, "config"), "config", &m->blobs[0], err)))
			goto out;
		m->n_blobs = 1;
		for (size_t i = 0; i < json_array_size(arr); i++) {
			snprintf(what, sizeof what, "layers[%zu]", i);
			if ((rc = parse_desc(json_array_get(arr, i), what, &m->blobs[i + 1], err)))
				goto out;
			m->n_blobs++;
		}
	}
out:
	json_decref(root);
	if (rc)
		reg_manifest_release(m);
	return rc;
}

/* ---------------------------------------------------------------------- */
/* Plans */

void reg_plan_release(struct reg_plan *p)
{
	for (size_t i = 0; i < p->n_blobs; i++)
		free(p->blobs[i].path);
	free(p->blobs);
	for (size_t i = 0; i < p->n_manifests; i++)
		free(p->manifests[i].bytes);
	free(p->manifests);
	memset(p, 0, sizeof *p);
}

int reg_plan_add_manifest(struct reg_plan *p, const char *bytes, size_t len,
			  const char *content_type, const char *digest_want,
			  struct reg_manifest *parsed, struct kpl_err *err)
{
	struct reg_manifest m;
	struct reg_mfile *mf;
	char digest[REG_DIGEST_MAX];
	int rc;

	if (len > REG_MAX_MANIFEST)
		return kpl_errf(err, KPL_EINVAL, "manifest is over %u bytes", REG_MAX_MANIFEST);
	reg_digest(bytes, len, digest);
	if (digest_want && strcmp(digest, digest_want) != 0)
		return kpl_errf(err, KPL_EINVAL, "manifest %s: its bytes hash to %s",
				digest_want, digest);
	if ((rc = reg_manifest_parse(bytes, len, content_type, &m, err)))
		return rc;
	for (size_t i = 0; i < m.n_blobs; i++) {
		size_t j;
		for (j = 0; j < p->n_blobs; j++)
			if (strcmp(p->blobs[j].digest, m.blobs[i].digest) == 0)
				break;
		if (j < p->n_blobs)
			continue;
		p->blobs = kpl_realloc(p->blobs, (p->n_blobs + 1) * sizeof *p->blobs);
		memset(&p->blobs[p->n_blobs], 0, sizeof *p->blobs);
		memcpy(p->blobs[p->n_blobs].digest, m.blobs[i].digest, REG_DIGEST_MAX);
		p->blobs[p->n_blobs].size = m.blobs[i].size;
		p->n_blobs++;
	}
	p->manifests = kpl_realloc(p->manifests, (p->n_manifests + 1) * sizeof *p->manifests);
	mf = &p->manifests[p->n_manifests++];
	mf->media = m.media;
	memcpy(mf->digest, digest, REG_DIGEST_MAX);
	mf->bytes = kpl_malloc(len + 1);
	memcpy(mf->bytes, bytes, len);
	mf->bytes[len] = '\0';
	mf->len = len;
	if (parsed)
		*parsed = m;
	else
		reg_manifest_release(&m);
	return 0;
}

void reg_plan_move_to_end(struct reg_plan *p, size_t i)
{
	struct reg_mfile m;

	if (i >= p->n_manifests)
		BUG("reg_plan_move_to_end: %zu of %zu", i, p->n_manifests);
	m = p->manifests[i];
	memmove(&p->manifests[i], &p->manifests[i + 1],
		(p->n_manifests - i - 1) * sizeof *p->manifests);
	p->manifests[p->n_manifests - 1] = m;
}

/* ---------------------------------------------------------------------- */
/* OCI image layout (blocking) */

static int read_file(const char *path, size_t max, char **out, size_t *len,
		     struct kpl_err *err)
{
	/* A layout in a workspace: written by a stage's command. */
	int fd = kpl_open_ws(path, O_RDONLY | O_CLOEXEC);
	struct stat sb;
	char *buf;
	size_t got = 0;

	*out = NULL;
	if (fd < 0)
		return kpl_errf(err, errno == ENOENT ? KPL_EINVAL : KPL_EIO, "%s: %s", path,
				strerror(errno));
	if (fstat(fd, &sb) || !S_ISREG(sb.st_mode)) {
		close(fd);
		return kpl_errf(err, KPL_EINVAL, "%s: not a regular file", path);
	}
	if ((uint64_t)sb.st_size > max) {
		close(fd);
		return kpl_errf(err, KPL_EINVAL, "%s: over %zu bytes", path, max);
	}
	buf = kpl_malloc((size_t)sb.st_size + 1);
	while (got < (size_t)sb.st_size) {
		ssize_t n = read(fd, buf + got, (size_t)sb.st_size - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			int e = n < 0 ? errno : EIO;
			close(fd);
			free(buf);
			return kpl_errf(err, KPL_EIO, "%s: %s", path, strerror(e));
		}
		got += (size_t)n;
	}
	close(fd);
	buf[got] = '\0';
	*out = buf;
	*len = got;
	return 0;
}

static char *blob_path(const char *dir, const char *digest)
{
	return kpl_asprintf("%s/blobs/sha256/%s", dir, digest + 7);
}

/* Reads the manifest d names from the layout, checks it against d and adds
 * it to the plan. */
static int layout_manifest(const char *dir, const struct reg_desc *d, struct reg_plan *p,
			   struct reg_manifest *parsed, struct kpl_err *err)
{
	char *path = blob_path(dir, d->digest), *bytes = NULL;
	size_t len = 0;
	int rc;

	if ((rc = read_file(path, REG_MAX_MANIFEST, &bytes, &len, err)))
		goto out;
	if (len != d->size) {
		rc = kpl_errf(err, KPL_EINVAL, "%s: %zu bytes, but its descriptor says %" PRIu64,
			      path, len, d->size);
		goto out;
	}
	if ((rc = reg_plan_add_manifest(p, bytes, len, d->media_type, d->digest, parsed, err))) {
		char tmp[sizeof err->msg];
		snprintf(tmp, sizeof tmp, "%s", err->msg);
		kpl_errf(err, rc, "%s: %s", path, tmp);
	}
out:
	free(bytes);
	free(path);
	return rc;
}

int reg_layout_load(const char *dir, struct reg_plan *p, struct kpl_err *err)
{
	char *path = NULL, *text = NULL;
	size_t len;
	json_t *root = NULL, *mans;
	struct reg_desc top = { 0 };
	struct reg_manifest m = { 0 };
	const char *ver;
	int rc;

	memset(p, 0, sizeof *p);
	path = kpl_asprintf("%s/oci-layout", dir);
	if ((rc = read_file(path, 64 * 1024, &text, &len, err)))
		goto out;
	root = json_loadb(text, len, 0, NULL);
	ver = json_string_value(json_object_get(root, "imageLayoutVersion"));
	if (!ver || strcmp(ver, "1.0.0") != 0) {
		rc = kpl_errf(err, KPL_EINVAL, "%s: imageLayoutVersion must be \"1.0.0\"", path);
		goto out;
	}
	json_decref(root);
	free(text);
	free(path);
	path = kpl_asprintf("%s/index.json", dir);
	if ((rc = read_file(path, REG_MAX_MANIFEST, &text, &len, err)))
		goto out;
	root = json_loadb(text, len, 0, NULL);
	mans = json_object_get(root, "manifests");
	if (!json_is_array(mans) || json_array_size(mans) != 1) {
		rc = kpl_errf(err, KPL_EINVAL, "%s: must list exactly one manifest (found %zu; "
			      "for several platforms, list one image index)", path,
			      json_is_array(mans) ? json_array_size(mans) : 0);
		goto out;
	}
	if ((rc = parse_desc(json_array_get(mans, 0), "manifests[0]", &top, err))) {
		char tmp[sizeof err->msg];
		snprintf(tmp, sizeof tmp, "%s", err->msg);
		kpl_errf(err, rc, "%s: %s", path, tmp);
		goto out;
	}
	if ((rc = layout_manifest(dir, &top, p, &m, err)))
		goto out;
	if (reg_media_is_index(m.media)) {
		for (size_t i = 0; i < m.n_children; i++) {
			struct reg_manifest child;
			if ((rc = layout_manifest(dir, &m.children[i], p, &child, err)))
				goto out;
			if (reg_media_is_index(child.media)) {
				reg_manifest_release(&child);
				rc = kpl_errf(err, KPL_EINVAL, "%s: index %s names another index "
					      "(%s); kpl pushes one level", dir, top.digest,
					      m.children[i].digest);
				goto out;
			}
			reg_manifest_release(&child);
		}
		reg_plan_move_to_end(p, 0); /* children before the index */
	}
	for (size_t i = 0; i < p->n_blobs; i++) {
		struct stat sb;
		char *bp = blob_path(dir, p->blobs[i].digest);
		if (stat(bp, &sb) || !S_ISREG(sb.st_mode)) {
			rc = kpl_errf(err, KPL_EINVAL, "%s: blob %s is not in the layout", dir,
				      p->blobs[i].digest);
			free(bp);
			goto out;
		}
		if ((uint64_t)sb.st_size != p->blobs[i].size) {
			rc = kpl_errf(err, KPL_EINVAL, "%s: %" PRIu64 " bytes, but the manifest "
				      "says %" PRIu64, bp, (uint64_t)sb.st_size, p->blobs[i].size);
			free(bp);
			goto out;
		}
		p->blobs[i].path = bp;
	}
out:
	free(top.media_type);
	reg_manifest_release(&m);
	json_decref(root);
	free(text);
	free(path);
	if (rc)
		reg_plan_release(p);
	return rc;
}

/* ---------------------------------------------------------------------- */
/* Blob uploads */

static const char *const up_state_names[] = {
#define REG_UP_STR(e, s) #e,
	REG_UP_STATE_MAP(REG_UP_STR)
#undef REG_UP_STR
};

const char *reg_up_state_name(enum reg_up_state s)
{
	return (unsigned)s < REG_UP_LAST_ ? up_state_names[s] : "?";
}

/* At most this many 416 recoveries in one upload. */
#define REG_MAX_RECOVERIES 3

void reg_upload_init(struct reg_upload *u, const char *base, const char *repo,
		     const char *digest, uint64_t size, uint64_t chunk_size,
		     const char *mount_from)
{
	memset(u, 0, sizeof *u);
	u->base = kpl_strdup(base);
	u->repo = kpl_strdup(repo);
	snprintf(u->digest, sizeof u->digest, "%s", digest);
	u->size = size;
	u->chunk_size = chunk_size;
	u->mount_from = mount_from ? kpl_strdup(mount_from) : NULL;
	u->chunked = chunk_size > 0 && size > chunk_size;
	u->state = REG_UP_POST;
}

void reg_upload_release(struct reg_upload *u)
{
	free(u->base);
	free(u->repo);
	free(u->mount_from);
	free(u->location);
	memset(u, 0, sizeof *u);
}

void reg_step_release(struct reg_step *s)
{
	free(s->url);
	memset(s, 0, sizeof *s);
}

void reg_upload_next(const struct reg_upload *u, struct reg_step *s)
{
	memset(s, 0, sizeof *s);
	switch (u->state) {
	case REG_UP_POST:
		s->method = "POST";
		if (u->mount_from) {
			char *buf = reg_api_url(u->base, u->repo, "/blobs/uploads/?mount=");
			size_t len = strlen(buf), cap = len + 1;
			url_encode_to(&buf, &len, &cap, u->digest);
			append(&buf, &len, &cap, "&from=");
			url_encode_to(&buf, &len, &cap, u->mount_from);
			s->url = buf;
		} else {
			s->url = reg_api_url(u->base, u->repo, "/blobs/uploads/");
		}
		break;
	case REG_UP_PATCH:
		s->method = "PATCH";
		s->url = kpl_strdup(u->location);
		s->off = u->offset;
		s->len = u->size - u->offset < u->chunk_size ? u->size - u->offset : u->chunk_size;
		snprintf(s->content_range, sizeof s->content_range, "%" PRIu64 "-%" PRIu64,
			 s->off, s->off + s->len - 1);
		s->octet_stream = true;
		break;
	case REG_UP_STATUS:
		s->method = "GET";
		s->url = kpl_strdup(u->location);
		break;
	case REG_UP_PUT:
		s->method = "PUT";
		s->url = reg_url_with_digest(u->location, u->digest);
		s->octet_stream = true;
		if (!u->chunked) {
			s->off = 0;
			s->len = u->size;
		}
		break;
	default:
		BUG("reg_upload_next in state %s", reg_up_state_name(u->state));
	}
}

static int set_location(struct reg_upload *u, const struct reg_step *s,
			const struct reg_reply *r, struct kpl_err *err)
{
	char *loc = reg_resolve_location(s->url, r->location);
	char *red;

	if (!loc) {
		red = http_redact_url(s->url);
		kpl_errf(err, KPL_EINVAL, "%s %s: %ld without a Location header", s->method, red,
			 r->status);
		free(red);
		return KPL_EINVAL;
	}
	free(u->location);
	u->location = loc;
	return 0;
}

static int check_digest(const struct reg_upload *u, const struct reg_step *s,
			const struct reg_reply *r, struct kpl_err *err)
{
	char *red;

	/* Older registries may leave it out; the spec then means sha256 of
	 * what was sent, which the registry checked against ?digest=. */
	if (!r->digest || strcmp(r->digest, u->digest) == 0)
		return 0;
	red = http_redact_url(s->url);
	kpl_errf(err, KPL_EINVAL, "%s %s: the registry stored %.80s, not %s", s->method, red,
		 r->digest, u->digest);
	free(red);
	return KPL_EINVAL;
}

int reg_upload_reply(struct reg_upload *u, const struct reg_step *s,
		     const struct reg_reply *r, struct kpl_err *err)
{
	uint64_t end;
	char *red;
	int rc;

	switch (u->state) {
	case REG_UP_POST:
		if (r->status == 201 && u->mount_from) {
			if ((rc = check_digest(u, s, r, err)))
				return rc;
			u->mounted = true;
			u->offset = u->size;
			u->state = REG_UP_DONE;
			return 0;
		}
		if (r->status != 202)
			return reg_reply_error(err, s->method, s->url, r);
		if ((rc = set_location(u, s, r, err)))
			return rc;
		u->offset = 0;
		u->state = u->chunked ? REG_UP_PATCH : REG_UP_PUT;
		return 0;
	case REG_UP_PATCH:
		if (r->status == 416) {
			if (++u->recoveries > REG_MAX_RECOVERIES)
				return reg_reply_error(err, s->method, s->url, r);
			/* The Location of the session stays; ask it where it is. */
			u->state = REG_UP_STATUS;
			return 0;
		}
		if (r->status != 202)
			return reg_reply_error(err, s->method, s->url, r);
		if (r->location && (rc = set_location(u, s, r, err)))
			return rc;
		if (r->range) {
			if (reg_parse_range(r->range, &end) || end + 1 != s->off + s->len) {
				red = http_redact_url(s->url);
				kpl_errf(err, KPL_EINVAL, "%s %s: the registry has bytes %.40s after "
					 "a chunk ending at byte %" PRIu64, s->method, red, r->range,
					 s->off + s->len - 1);
				free(red);
				return KPL_EINVAL;
			}
		}
		u->offset = s->off + s->len;
		u->chunks++;
		u->state = u->offset == u->size ? REG_UP_PUT : REG_UP_PATCH;
		return 0;
	case REG_UP_STATUS:
		if (r->status != 204 && r->status != 200)
			return reg_reply_error(err, s->method, s->url, r);
		if (r->location && (rc = set_location(u, s, r, err)))
			return rc;
		if (reg_parse_range(r->range, &end)) {
			red = http_redact_url(s->url);
			kpl_errf(err, KPL_EINVAL, "%s %s: upload status without a valid Range "
				 "(got \"%.40s\")", s->method, red, r->range ? r->range : "");
			free(red);
			return KPL_EINVAL;
		}
		/* "0-0" is both "nothing" and "one byte" (distribution sends it
		 * for an empty session): trust it only as far as we know. */
		if (end == 0 && u->offset <= 1)
			;
		else if (end + 1 > u->size)
			return kpl_errf(err, KPL_EINVAL, "upload of %s: the registry has %" PRIu64
					" bytes of a %" PRIu64 "-byte blob", u->digest, end + 1,
					u->size);
		else
			u->offset = end + 1;
		u->state = u->offset == u->size ? REG_UP_PUT : REG_UP_PATCH;
		return 0;
	case REG_UP_PUT:
		if (r->status != 201)
			return reg_reply_error(err, s->method, s->url, r);
		if ((rc = check_digest(u, s, r, err)))
			return rc;
		u->offset = u->size;
		u->state = REG_UP_DONE;
		return 0;
	default:
		BUG("reg_upload_reply in state %s", reg_up_state_name(u->state));
	}
}

void reg_human_size(uint64_t n, char *out, size_t len)
{
	if (n < 1024)
		snprintf(out, len, "%" PRIu64 " B", n);
	else if (n < 1024 * 1024)
		snprintf(out, len, "%.1f KiB", (double)n / 1024);
	else if (n < 1024ull * 1024 * 1024)
		snprintf(out, len, "%.1f MiB", (double)n / (1024 * 1024));
	else
		snprintf(out, len, "%.1f GiB", (double)n / (1024.0 * 1024 * 1024));
}
