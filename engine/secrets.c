/* secrets.c - sealed secrets and redaction (secrets.h). */
#define _GNU_SOURCE
#include "engine/secrets.h"

#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define LOG "secrets"
#define KEY_LEN 32
#define NONCE_LEN 12
#define TAG_LEN 16
/* Sealed blob, version 1: version byte, nonce, ciphertext, tag, with the
 * name as associated data. Version 2 (a secret limited to pipelines): 2,
 * be16 length and the pipeline names ('\n' between them), nonce,
 * ciphertext, tag, with the name, a NUL and the names as associated data,
 * so the list cannot be changed without the key either. */
#define BLOB_VERSION 1
#define BLOB_VERSION_PIPELINES 2

struct secret {
	char *name;
	char *value; /* NUL-terminated */
	size_t len;
	char *pipelines; /* names, '\n' between them; "" for every pipeline */
};

/* A staged change, applied to memory once its commit lands. */
struct secrets_change {
	char *name;
	char *value; /* NULL: a delete */
	size_t len;
	char *pipelines;
};

/* What redaction looks for: a value, or a line of a multi-line one. */
struct pattern {
	char *text; /* owned copy, cleansed when freed */
	size_t len;
};

struct secrets {
	struct store *store;
	unsigned char key[KEY_LEN];
	struct secret *items; /* sorted by name */
	size_t n;
	const char **names;   /* parallel view for secrets_names */
	struct pattern *pats; /* longest first, no duplicates; rebuilt on change */
	size_t n_pats;
	/* pats by first byte: by_first[first[b] .. first[b + 1]) index the
	 * patterns starting with byte b, so a text is scanned once. */
	size_t first[257];
	size_t *by_first;
	char *key_path;
};

int secrets_check_name(const char *name, struct kpl_err *err)
{
	size_t n = name ? strlen(name) : 0;

	if (n == 0 || n > 64)
		return kpl_errf(err, KPL_EINVAL, "secret name: 1 to 64 characters");
	for (size_t i = 0; i < n; i++) {
		char c = name[i];
		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
		      c == '_'))
			return kpl_errf(err, KPL_EINVAL,
					"secret name %.64s: only letters, digits and '_' are allowed",
					name);
	}
	return 0;
}

static int count_one(void *data, const char *name, const void *blob, size_t len)
{
	(void)name;
	(void)blob;
	(void)len;
	(*(size_t *)data)++;
	return 0;
}

static int load_key(struct secrets *sec, const char *data_dir, struct kpl_err *err)
{
	struct stat st;
	size_t sealed = 0;
	int fd;
	ssize_t n;

	sec->key_path = kpl_asprintf("%s/secret.key", data_dir);
	fd = open(sec->key_path, O_RDONLY | O_CLOEXEC);
	if (fd < 0 && errno == ENOENT) {
		/* A new key would never open what the old one sealed, and would
		 * stand where the backup must be put back. */
		store_list_secrets(sec->store, count_one, &sealed);
		if (sealed)
			return kpl_errf(err, KPL_EINVAL, "%s is missing and the store holds %zu "
					"sealed secret%s: put back the secret.key this data "
					"directory was made with (from your backup), mode 0600; "
					"kpld makes a new key only for a store without secrets",
					sec->key_path, sealed, sealed == 1 ? "" : "s");
		/* First start: make the key, readable by kpld's user only. */
		if (RAND_bytes(sec->key, KEY_LEN) != 1)
			return kpl_errf(err, KPL_EINTERNAL, "no randomness for a new secret key");
		fd = open(sec->key_path, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0600);
		if (fd < 0)
			return kpl_errf(err, KPL_EIO, "cannot create %s: %s", sec->key_path,
					strerror(errno));
		n = write(fd, sec->key, KEY_LEN);
		if (n != KEY_LEN || fsync(fd) != 0) {
			close(fd);
			unlink(sec->key_path);
			return kpl_errf(err, KPL_EIO, "cannot write %s", sec->key_path);
		}
		close(fd);
		kpl_info(LOG, "created a new secret key in %s (keep it with the data, back it "
			 "up separately)", sec->key_path);
		return 0;
	}
	if (fd < 0)
		return kpl_errf(err, KPL_EIO, "cannot open %s: %s", sec->key_path, strerror(errno));
	if (fstat(fd, &st) == 0 && (st.st_mode & 077)) {
		close(fd);
		return kpl_errf(err, KPL_EINVAL, "%s is readable by others (mode %03o): "
				"chmod 600 it", sec->key_path, (unsigned)(st.st_mode & 0777));
	}
	{
		/* One byte more than a key, to tell a longer file from a key. */
		unsigned char buf[KEY_LEN + 1];
		n = read(fd, buf, sizeof buf);
		close(fd);
		if (n != KEY_LEN) {
			OPENSSL_cleanse(buf, sizeof buf);
			return kpl_errf(err, KPL_EINVAL, "%s: %zd bytes, a key is %d: put back "
					"the secret.key this data directory was made with (from "
					"your backup)", sec->key_path, n, KEY_LEN);
		}
		memcpy(sec->key, buf, KEY_LEN);
		OPENSSL_cleanse(buf, sizeof buf);
	}
	return 0;
}

/* blob (malloc'd, *blob_len): see BLOB_VERSION. pipelines "" makes a
 * version 1 blob, anything else version 2. */
static int seal(const struct secrets *sec, const char *name, const char *pipelines,
		const char *value, size_t len, unsigned char **blob, size_t *blob_len)
{
	EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
	size_t plen = strlen(pipelines), head = plen ? 3 + plen : 1;
	unsigned char *b = kpl_malloc(head + NONCE_LEN + len + TAG_LEN), *n = b + head;
	int outl, ok = 0;

	b[0] = plen ? BLOB_VERSION_PIPELINES : BLOB_VERSION;
	if (plen) {
		b[1] = (unsigned char)(plen >> 8);
		b[2] = (unsigned char)plen;
		memcpy(b + 3, pipelines, plen);
	}
	if (ctx && RAND_bytes(n, NONCE_LEN) == 1 &&
	    EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, sec->key, n) == 1 &&
	    EVP_EncryptUpdate(ctx, NULL, &outl, (const unsigned char *)name,
			      (int)strlen(name) + (plen ? 1 : 0)) == 1 &&
	    (!plen || EVP_EncryptUpdate(ctx, NULL, &outl, (const unsigned char *)pipelines,
					(int)plen) == 1) &&
	    EVP_EncryptUpdate(ctx, n + NONCE_LEN, &outl, (const unsigned char *)value,
			      (int)len) == 1 &&
	    EVP_EncryptFinal_ex(ctx, n + NONCE_LEN + outl, &outl) == 1 &&
	    EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, TAG_LEN, n + NONCE_LEN + len) == 1)
		ok = 1;
	EVP_CIPHER_CTX_free(ctx);
	if (!ok) {
		free(b);
		return KPL_EINTERNAL;
	}
	*blob = b;
	*blob_len = head + NONCE_LEN + len + TAG_LEN;
	return 0;
}

/* *value and *pipelines are new (pipelines "" for a version 1 blob). */
static int unseal(const struct secrets *sec, const char *name, const unsigned char *b,
		  size_t blen, char **value, size_t *len, char **pipelines)
{
	EVP_CIPHER_CTX *ctx;
	const unsigned char *n;
	size_t clen, plen = 0, head = 1;
	char *out;
	int outl, ok = 0;

	if (blen < 1)
		return KPL_ECORRUPT;
	if (b[0] == BLOB_VERSION_PIPELINES) {
		if (blen < 3)
			return KPL_ECORRUPT;
		plen = (size_t)b[1] << 8 | b[2];
		head = 3 + plen;
		if (plen == 0)
			return KPL_ECORRUPT;
	} else if (b[0] != BLOB_VERSION) {
		return KPL_ECORRUPT;
	}
	if (blen < head + NONCE_LEN + TAG_LEN)
		return KPL_ECORRUPT;
	n = b + head;
	clen = blen - head - NONCE_LEN - TAG_LEN;
	out = kpl_malloc(clen + 1);
	ctx = EVP_CIPHER_CTX_new();
	if (ctx && EVP_DecryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, sec->key, n) == 1 &&
	    EVP_DecryptUpdate(ctx, NULL, &outl, (const unsigned char *)name,
			      (int)strlen(name) + (plen ? 1 : 0)) == 1 &&
	    (!plen || EVP_DecryptUpdate(ctx, NULL, &outl, b + 3, (int)plen) == 1) &&
	    EVP_DecryptUpdate(ctx, (unsigned char *)out, &outl, n + NONCE_LEN, (int)clen) == 1 &&
	    EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, TAG_LEN,
				(void *)(n + NONCE_LEN + clen)) == 1 &&
	    EVP_DecryptFinal_ex(ctx, (unsigned char *)out + outl, &outl) == 1)
		ok = 1;
	EVP_CIPHER_CTX_free(ctx);
	if (!ok) {
		OPENSSL_cleanse(out, clen + 1);
		free(out);
		return KPL_ECORRUPT;
	}
	out[clen] = '\0';
	*value = out;
	*len = clen;
	*pipelines = plen ? kpl_strndup((const char *)b + 3, plen) : kpl_strdup("");
	return 0;
}

static void free_patterns(struct secrets *sec)
{
	for (size_t i = 0; i < sec->n_pats; i++) {
		OPENSSL_cleanse(sec->pats[i].text, sec->pats[i].len);
		free(sec->pats[i].text);
	}
	free(sec->pats);
	sec->pats = NULL;
	sec->n_pats = 0;
	free(sec->by_first);
	sec->by_first = NULL;
	memset(sec->first, 0, sizeof sec->first);
}

static void add_pattern(struct secrets *sec, const char *p, size_t len, size_t *cap)
{
	/* Blanks around a line are how it was indented, not the secret. */
	while (len && (*p == ' ' || *p == '\t'))
		p++, len--;
	while (len && (p[len - 1] == ' ' || p[len - 1] == '\t' || p[len - 1] == '\r'))
		len--;
	if (len < SECRETS_MIN_VALUE)
		return;
	for (size_t i = 0; i < sec->n_pats; i++)
		if (sec->pats[i].len == len && memcmp(sec->pats[i].text, p, len) == 0)
			return;
	if (sec->n_pats == *cap) {
		*cap = *cap ? 2 * *cap : 16;
		sec->pats = kpl_realloc(sec->pats, *cap * sizeof *sec->pats);
	}
	sec->pats[sec->n_pats].text = kpl_strndup(p, len);
	sec->pats[sec->n_pats].len = len;
	sec->n_pats++;
}

static int longer_first(const void *a, const void *b)
{
	const struct pattern *x = a, *y = b;
	return x->len < y->len ? 1 : x->len > y->len ? -1 : 0;
}

/* The names view and the redaction patterns, after any change. */
static void rebuild_names(struct secrets *sec)
{
	size_t cap = 0;

	free(sec->names);
	sec->names = kpl_calloc(sec->n + 1, sizeof *sec->names);
	for (size_t i = 0; i < sec->n; i++)
		sec->names[i] = sec->items[i].name;
	free_patterns(sec);
	for (size_t i = 0; i < sec->n; i++) {
		const struct secret *s = &sec->items[i];
		const char *p = s->value, *end = s->value + s->len;

		add_pattern(sec, s->value, s->len, &cap);
		if (!memchr(s->value, '\n', s->len))
			continue;
		while (p < end) {
			const char *nl = memchr(p, '\n', (size_t)(end - p));
			const char *le = nl ? nl : end;
			add_pattern(sec, p, (size_t)(le - p), &cap);
			p = le + 1;
		}
	}
	/* Longest first: the order the docs promise; masking is a union of
	 * all matches, so it does not change what is masked. */
	if (sec->n_pats)
		qsort(sec->pats, sec->n_pats, sizeof *sec->pats, longer_first);
	/* Counting sort by first byte (stable: longest first within one). */
	sec->by_first = kpl_calloc(sec->n_pats + 1, sizeof *sec->by_first);
	for (size_t i = 0; i < sec->n_pats; i++)
		sec->first[(unsigned char)sec->pats[i].text[0] + 1]++;
	for (size_t b = 1; b <= 256; b++)
		sec->first[b] += sec->first[b - 1];
	{
		size_t fill[256];
		memcpy(fill, sec->first, sizeof fill);
		for (size_t i = 0; i < sec->n_pats; i++)
			sec->by_first[fill[(unsigned char)sec->pats[i].text[0]]++] = i;
	}
}

static size_t find(const struct secrets *sec, const char *name, int *found)
{
	size_t lo = 0, hi = sec->n;

	while (lo < hi) {
		size_t mid = (lo + hi) / 2;
		int c = strcmp(sec->items[mid].name, name);
		if (c == 0) {
			*found = 1;
			return mid;
		}
		if (c < 0)
			lo = mid + 1;
		else
			hi = mid;
	}
	*found = 0;
	return lo;
}

/* Takes value and pipelines. */
static void put_item(struct secrets *sec, const char *name, char *value, size_t len,
		     char *pipelines)
{
	int found;
	size_t i = find(sec, name, &found);

	if (found) {
		OPENSSL_cleanse(sec->items[i].value, sec->items[i].len);
		free(sec->items[i].value);
		free(sec->items[i].pipelines);
	} else {
		sec->items = kpl_realloc(sec->items, (sec->n + 1) * sizeof *sec->items);
		memmove(&sec->items[i + 1], &sec->items[i], (sec->n - i) * sizeof *sec->items);
		sec->items[i].name = kpl_strdup(name);
		sec->n++;
	}
	sec->items[i].value = value;
	sec->items[i].len = len;
	sec->items[i].pipelines = pipelines;
	rebuild_names(sec);
}

static void drop_item(struct secrets *sec, size_t i)
{
	OPENSSL_cleanse(sec->items[i].value, sec->items[i].len);
	free(sec->items[i].value);
	free(sec->items[i].name);
	free(sec->items[i].pipelines);
	memmove(&sec->items[i], &sec->items[i + 1], (sec->n - i - 1) * sizeof *sec->items);
	sec->n--;
	rebuild_names(sec);
}

struct load_ctx {
	struct secrets *sec;
	struct kpl_err *err;
};

/* The length of the first line of value over SECRETS_MAX_LINE (its number,
 * from 1, in *line), or 0 if none is. */
static size_t long_line(const char *value, size_t len, size_t *line)
{
	*line = 1;
	for (size_t i = 0; i < len; (*line)++) {
		const char *nl = memchr(value + i, '\n', len - i);
		size_t ll = nl ? (size_t)(nl - (value + i)) : len - i;

		if (ll > SECRETS_MAX_LINE)
			return ll;
		i += ll + 1;
	}
	return 0;
}

static int load_one(void *data, const char *name, const void *blob, size_t len)
{
	struct load_ctx *c = data;
	char *value, *pipelines;
	size_t vlen, ll, line;

	if (unseal(c->sec, name, blob, len, &value, &vlen, &pipelines))
		return kpl_errf(c->err, KPL_ECORRUPT, "secret %s does not open with %s: wrong "
				"key file, or the store was changed; put back the secret.key "
				"this data directory was made with (from your backup)", name,
				c->sec->key_path);
	/* Set before the limit existed: kept, but said. */
	if ((ll = long_line(value, vlen, &line)) != 0)
		kpl_warn(LOG, "secret %s: line %zu of the value is %zu bytes, over %d: where "
			 "a log line over 8 KiB is cut, parts of it may not be redacted; set it "
			 "again in shorter lines", name, line, ll, SECRETS_MAX_LINE);
	put_item(c->sec, name, value, vlen, pipelines);
	return 0;
}

int secrets_open(struct store *s, const char *data_dir, struct secrets **out,
		 struct kpl_err *err)
{
	struct secrets *sec = kpl_calloc(1, sizeof *sec);
	struct load_ctx c = { sec, err };
	int rc;

	sec->store = s;
	if ((rc = load_key(sec, data_dir, err)) != 0 ||
	    (rc = store_list_secrets(s, load_one, &c)) != 0) {
		if (!err->msg[0])
			kpl_errf(err, rc, "cannot read the secrets: %s", kpl_strerror(rc));
		secrets_free(sec);
		return rc;
	}
	rebuild_names(sec);
	*out = sec;
	return 0;
}

void secrets_free(struct secrets *sec)
{
	if (!sec)
		return;
	for (size_t i = 0; i < sec->n; i++) {
		OPENSSL_cleanse(sec->items[i].value, sec->items[i].len);
		free(sec->items[i].value);
		free(sec->items[i].name);
		free(sec->items[i].pipelines);
	}
	OPENSSL_cleanse(sec->key, sizeof sec->key);
	free_patterns(sec);
	free(sec->items);
	free(sec->names);
	free(sec->key_path);
	free(sec);
}

/* Pipeline names as pipelines/pipeline.c allows them. */
static bool pipeline_name_ok(const char *s)
{
	size_t n = strlen(s);

	if (n == 0 || n > KPL_MAX_NAME_LEN)
		return false;
	for (size_t i = 0; i < n; i++) {
		char c = s[i];
		bool alnum = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
		if (!alnum && (i == 0 || (c != '_' && c != '.' && c != '-')))
			return false;
	}
	return true;
}

/* The names joined with '\n', duplicates dropped; *out new. */
static int join_pipelines(const char *name, const char *const *pipelines, size_t n,
			  char **out, struct kpl_err *err)
{
	size_t cap = 1, len = 0;
	char *t;

	if (n > SECRETS_MAX_PIPELINES)
		return kpl_errf(err, KPL_EINVAL, "secret %s: pipelines: at most %d", name,
				SECRETS_MAX_PIPELINES);
	for (size_t i = 0; i < n; i++) {
		if (!pipelines[i] || !pipeline_name_ok(pipelines[i]))
			return kpl_errf(err, KPL_EINVAL,
					"secret %s: pipelines[%zu]: \"%.60s\" is not a pipeline "
					"name (lowercase letters, digits, '_', '.' and '-', starting "
					"with a letter or digit, at most %d)",
					name, i, pipelines[i] ? pipelines[i] : "", KPL_MAX_NAME_LEN);
		cap += strlen(pipelines[i]) + 1;
	}
	t = kpl_malloc(cap);
	t[0] = '\0';
	for (size_t i = 0; i < n; i++) {
		bool dup = false;
		for (size_t k = 0; k < i && !dup; k++)
			dup = strcmp(pipelines[k], pipelines[i]) == 0;
		if (dup)
			continue;
		len += (size_t)sprintf(t + len, "%s%s", len ? "\n" : "", pipelines[i]);
	}
	*out = t;
	return 0;
}

static void change_free(struct secrets_change *ch)
{
	if (ch->value) {
		OPENSSL_cleanse(ch->value, ch->len);
		free(ch->value);
	}
	free(ch->name);
	free(ch->pipelines);
	free(ch);
}

int secrets_stage_set(struct secrets *sec, const char *name, const char *value, size_t len,
		      const char *const *pipelines, size_t n_pipelines,
		      struct secrets_change **out, struct kpl_err *err)
{
	struct secrets_change *ch;
	unsigned char *blob;
	char *joined = NULL;
	size_t blen, ll, line;
	int found, rc;

	if ((rc = secrets_check_name(name, err)) != 0)
		return rc;
	if (len < SECRETS_MIN_VALUE || len > SECRETS_MAX_VALUE)
		return kpl_errf(err, KPL_EINVAL, "secret %s: the value must be %d to %d bytes "
				"(shorter ones could not be told apart from ordinary text in "
				"logs)", name, SECRETS_MIN_VALUE, SECRETS_MAX_VALUE);
	if (memchr(value, '\0', len))
		return kpl_errf(err, KPL_EINVAL, "secret %s: the value holds a NUL byte", name);
	if ((ll = long_line(value, len, &line)) != 0)
		return kpl_errf(err, KPL_EINVAL, "secret %s: line %zu of the value is %zu "
				"bytes, over the %d a line can have (longer ones could "
				"not be found in a log line kpld reads in 8 KiB pieces)",
				name, line, ll, SECRETS_MAX_LINE);
	find(sec, name, &found);
	if (!found && sec->n >= SECRETS_MAX_COUNT)
		return kpl_errf(err, KPL_ETOOBIG, "at most %d secrets", SECRETS_MAX_COUNT);
	if ((rc = join_pipelines(name, pipelines, n_pipelines, &joined, err)) != 0)
		return rc;
	if (seal(sec, name, joined, value, len, &blob, &blen)) {
		free(joined);
		return kpl_errf(err, KPL_EINTERNAL, "cannot seal secret %s", name);
	}
	store_stage_secret(sec->store, name, blob, blen);
	free(blob);
	ch = kpl_calloc(1, sizeof *ch);
	ch->name = kpl_strdup(name);
	ch->value = kpl_strndup(value, len);
	ch->len = len;
	ch->pipelines = joined;
	*out = ch;
	return 0;
}

int secrets_stage_delete(struct secrets *sec, const char *name, struct secrets_change **out,
			 struct kpl_err *err)
{
	int found;

	find(sec, name, &found);
	if (!found)
		return kpl_errf(err, KPL_ENOTFOUND, "no secret named %.64s", name);
	store_stage_secret(sec->store, name, NULL, 0);
	*out = kpl_calloc(1, sizeof **out);
	(*out)->name = kpl_strdup(name);
	return 0;
}

void secrets_change_end(struct secrets *sec, struct secrets_change *ch, int status)
{
	int found;
	size_t i;

	if (status == 0 && ch->value) {
		put_item(sec, ch->name, ch->value, ch->len, ch->pipelines);
		ch->value = ch->pipelines = NULL;
	} else if (status == 0) {
		i = find(sec, ch->name, &found);
		if (found)
			drop_item(sec, i);
	}
	change_free(ch);
}

int secrets_set(struct secrets *sec, const char *name, const char *value, size_t len,
		struct kpl_err *err)
{
	struct secrets_change *ch;
	int rc = secrets_stage_set(sec, name, value, len, NULL, 0, &ch, err);

	if (rc == 0)
		secrets_change_end(sec, ch, 0);
	return rc;
}

int secrets_delete(struct secrets *sec, const char *name, struct kpl_err *err)
{
	struct secrets_change *ch;
	int rc = secrets_stage_delete(sec, name, &ch, err);

	if (rc == 0)
		secrets_change_end(sec, ch, 0);
	return rc;
}

bool secrets_allowed(struct secrets *sec, const char *name, const char *pipeline)
{
	int found;
	size_t i = find(sec, name, &found), n = strlen(pipeline);
	const char *p;

	if (!found)
		return false;
	p = sec->items[i].pipelines;
	if (!*p)
		return true;
	for (;;) {
		size_t l = strcspn(p, "\n");
		if (l == n && memcmp(p, pipeline, n) == 0)
			return true;
		if (!p[l])
			return false;
		p += l + 1;
	}
}

const char *secrets_pipelines(struct secrets *sec, const char *name)
{
	int found;
	size_t i = find(sec, name, &found);

	return found ? sec->items[i].pipelines : NULL;
}

const char *secrets_get(struct secrets *sec, const char *name)
{
	int found;
	size_t i = find(sec, name, &found);
	return found ? sec->items[i].value : NULL;
}

size_t secrets_names(struct secrets *sec, const char *const **names)
{
	*names = (const char *const *)sec->names;
	return sec->n;
}

/* Masks in mask[] the longest tail of text that is a head of pat (cut
 * at the end), or the longest head of text that is a tail of pat. */
static void mask_edge(const char *text, size_t len, const struct pattern *pat, bool tail,
		      unsigned char *mask)
{
	size_t most = len < pat->len - 1 ? len : pat->len - 1;

	for (size_t k = most; k > 0; k--) {
		if (tail ? memcmp(text + len - k, pat->text, k) == 0
			 : memcmp(text, pat->text + pat->len - k, k) == 0) {
			memset(tail ? mask + len - k : mask, 1, k);
			return;
		}
	}
}

char *secrets_redact_cut(struct secrets *sec, const char *text, size_t len, unsigned cut,
			 size_t *out_len)
{
	unsigned char *mask = NULL;
	size_t o = 0;
	char *out;

	if (!sec || !len)
		return NULL;
	/* Every occurrence of every pattern, overlapping ones too: at each
	 * position, the patterns that start with its byte. */
	for (size_t i = 0; i < len; i++) {
		unsigned char b = (unsigned char)text[i];

		for (size_t k = sec->first[b]; k < sec->first[b + 1]; k++) {
			const struct pattern *pat = &sec->pats[sec->by_first[k]];

			if (pat->len > len - i || text[i + 1] != pat->text[1] ||
			    memcmp(text + i, pat->text, pat->len) != 0)
				continue;
			if (!mask)
				mask = kpl_calloc(len, 1);
			memset(mask + i, 1, pat->len);
		}
	}
	for (size_t i = 0; i < sec->n_pats && (cut & (SECRETS_CUT_START | SECRETS_CUT_END)); i++) {
		const struct pattern *pat = &sec->pats[i];

		if (!mask)
			mask = kpl_calloc(len, 1);
		if (cut & SECRETS_CUT_END)
			mask_edge(text, len, pat, true, mask);
		if (cut & SECRETS_CUT_START)
			mask_edge(text, len, pat, false, mask);
	}
	if (!mask || !memchr(mask, 1, len)) {
		free(mask);
		return NULL;
	}
	/* A run of masked bytes is at least one byte, "***" three: room for
	 * len bytes plus two more per run; there are at most len runs. */
	out = kpl_malloc(3 * len + 1);
	for (size_t i = 0; i < len; i++) {
		if (!mask[i]) {
			out[o++] = text[i];
		} else if (i == 0 || !mask[i - 1]) {
			memcpy(out + o, "***", 3);
			o += 3;
		}
	}
	out[o] = '\0';
	free(mask);
	*out_len = o;
	return out;
}

char *secrets_redact(struct secrets *sec, const char *text, size_t len, size_t *out_len)
{
	return secrets_redact_cut(sec, text, len, 0, out_len);
}
