/*
 * tlsio.h - TLS for a server connection with no I/O of its own (OpenSSL
 * with memory BIOs): the caller feeds it the bytes it read from the socket
 * and writes out the bytes it hands back, so any loop can drive it
 * (engine/httpd.c, on libuv) and a test needs no socket.
 *
 * Threads: a tlsio is used from one thread at a time; a tlsio_ctx may be
 * shared by the tlsios of one thread.
 */
#ifndef KPL_TLSIO_H
#define KPL_TLSIO_H

#include <stddef.h>

#include "base/kpl.h"

struct tlsio_ctx; /* certificate and key; opaque */
struct tlsio;     /* one connection; opaque */

/*
 * Loads a PEM certificate chain and its private key (TLS 1.2 and up,
 * ALPN http/1.1). Errors name the file and what OpenSSL said. *out is the
 * caller's (tlsio_ctx_free).
 */
int tlsio_ctx_new(const char *cert_file, const char *key_file, struct tlsio_ctx **out,
		  struct kpl_err *err);
void tlsio_ctx_free(struct tlsio_ctx *ctx);

/* A server-side connection over ctx (borrowed; outlives it). */
struct tlsio *tlsio_new(struct tlsio_ctx *ctx);
void tlsio_free(struct tlsio *t);

/*
 * Takes n bytes read from the socket. *plain is the plaintext they
 * completed (malloc'd, the caller's; NULL and *plain_len 0 if none).
 * Returns 0, 1 if the peer closed the TLS session (close_notify), or -1 on
 * a TLS error (handshake failure, a bad record): close the connection.
 * Either way, send what tlsio_take_out has.
 */
int tlsio_feed(struct tlsio *t, const char *in, size_t n, char **plain, size_t *plain_len);

/* Encrypts n bytes of plaintext for sending; take them with
 * tlsio_take_out. -1 on a TLS error. */
int tlsio_write(struct tlsio *t, const char *plain, size_t n);

/* The bytes to send to the peer now (malloc'd, the caller's), or NULL
 * with *len 0 if none. */
char *tlsio_take_out(struct tlsio *t, size_t *len);

#endif
