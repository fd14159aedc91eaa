/*
 * tlsio.c - server TLS over memory BIOs (tlsio.h): rbio holds what the
 * socket gave us, wbio what the socket must get; SSL_read/SSL_write and
 * the handshake run between them.
 */
#include "engine/tlsio.h"

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct tlsio_ctx {
	SSL_CTX *ssl;
};

struct tlsio {
	SSL *ssl;
	BIO *rbio, *wbio; /* owned by ssl */
};

/* OpenSSL's last error as text, and the error queue cleared. */
static void ssl_errors(char *buf, size_t size)
{
	unsigned long e = ERR_get_error();

	if (e)
		ERR_error_string_n(e, buf, size);
	else
		snprintf(buf, size, "unknown error");
	ERR_clear_error();
}

/* Offer http/1.1 only: the listener speaks nothing else. */
static int alpn_select(SSL *ssl, const unsigned char **out, unsigned char *outlen,
		       const unsigned char *in, unsigned int inlen, void *arg)
{
	(void)ssl;
	(void)arg;
	for (unsigned i = 0; i < inlen; i += 1u + in[i])
		if (in[i] == 8 && i + 9 <= inlen && memcmp(in + i + 1, "http/1.1", 8) == 0) {
			*out = in + i + 1;
			*outlen = 8;
			return SSL_TLSEXT_ERR_OK;
		}
	return SSL_TLSEXT_ERR_NOACK;
}

int tlsio_ctx_new(const char *cert_file, const char *key_file, struct tlsio_ctx **out,
		  struct kpl_err *err)
{
	struct tlsio_ctx *ctx = kpl_calloc(1, sizeof *ctx);
	char why[256];
	int rc;

	*out = NULL;
	ERR_clear_error();
	if (!(ctx->ssl = SSL_CTX_new(TLS_server_method()))) {
		ssl_errors(why, sizeof why);
		rc = kpl_errf(err, KPL_EIO, "TLS: %s", why);
		goto fail;
	}
	SSL_CTX_set_min_proto_version(ctx->ssl, TLS1_2_VERSION);
	SSL_CTX_set_mode(ctx->ssl, SSL_MODE_RELEASE_BUFFERS);
	SSL_CTX_set_alpn_select_cb(ctx->ssl, alpn_select, NULL);
	if (SSL_CTX_use_certificate_chain_file(ctx->ssl, cert_file) != 1) {
		ssl_errors(why, sizeof why);
		rc = kpl_errf(err, KPL_EINVAL, "TLS certificate %s: %s", cert_file, why);
		goto fail;
	}
	if (SSL_CTX_use_PrivateKey_file(ctx->ssl, key_file, SSL_FILETYPE_PEM) != 1) {
		ssl_errors(why, sizeof why);
		rc = kpl_errf(err, KPL_EINVAL, "TLS key %s: %s", key_file, why);
		goto fail;
	}
	if (SSL_CTX_check_private_key(ctx->ssl) != 1) {
		ssl_errors(why, sizeof why);
		rc = kpl_errf(err, KPL_EINVAL, "TLS key %s does not match certificate %s: %s",
			      key_file, cert_file, why);
		goto fail;
	}
	*out = ctx;
	return 0;
fail:
	tlsio_ctx_free(ctx);
	return rc;
}

void tlsio_ctx_free(struct tlsio_ctx *ctx)
{
	if (!ctx)
		return;
	SSL_CTX_free(ctx->ssl);
	free(ctx);
}

struct tlsio *tlsio_new(struct tlsio_ctx *ctx)
{
	struct tlsio *t = kpl_calloc(1, sizeof *t);

	if (!(t->ssl = SSL_new(ctx->ssl)) || !(t->rbio = BIO_new(BIO_s_mem())) ||
	    !(t->wbio = BIO_new(BIO_s_mem())))
		BUG("tlsio: out of memory");
	/* A memory BIO that is empty says "retry", not EOF. */
	BIO_set_mem_eof_return(t->rbio, -1);
	BIO_set_mem_eof_return(t->wbio, -1);
	SSL_set_bio(t->ssl, t->rbio, t->wbio);
	SSL_set_accept_state(t->ssl);
	return t;
}

void tlsio_free(struct tlsio *t)
{
	if (!t)
		return;
	SSL_free(t->ssl);
	free(t);
}

int tlsio_feed(struct tlsio *t, const char *in, size_t n, char **plain, size_t *plain_len)
{
	size_t len = 0, cap = 0;
	char *out = NULL;
	int rc = 0;

	*plain = NULL;
	*plain_len = 0;
	if (n && BIO_write(t->rbio, in, (int)n) != (int)n)
		return -1;
	for (;;) {
		int r, e;

		if (cap - len < 16384)
			out = kpl_realloc(out, cap = cap * 2 + 16384);
		ERR_clear_error();
		r = SSL_read(t->ssl, out + len, (int)(cap - len));
		if (r > 0) {
			len += (size_t)r;
			continue;
		}
		e = SSL_get_error(t->ssl, r);
		if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
			break;
		rc = e == SSL_ERROR_ZERO_RETURN ? 1 : -1;
		ERR_clear_error();
		break;
	}
	if (len) {
		*plain = out;
		*plain_len = len;
	} else {
		free(out);
	}
	return rc;
}

int tlsio_write(struct tlsio *t, const char *plain, size_t n)
{
	while (n) {
		int chunk = n > (1u << 30) ? 1 << 30 : (int)n, r;

		ERR_clear_error();
		r = SSL_write(t->ssl, plain, chunk);
		if (r <= 0) {
			ERR_clear_error();
			return -1;
		}
		plain += r;
		n -= (size_t)r;
	}
	return 0;
}

char *tlsio_take_out(struct tlsio *t, size_t *len)
{
	size_t n = BIO_ctrl_pending(t->wbio);
	char *buf;

	*len = 0;
	if (!n)
		return NULL;
	buf = kpl_malloc(n);
	if (BIO_read(t->wbio, buf, (int)n) != (int)n)
		BUG("tlsio: short read of a memory BIO");
	*len = n;
	return buf;
}
