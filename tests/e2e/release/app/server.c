/*
 * server.c - the demo's application: a tiny HTTP/1.0 server, built static
 * so it runs in an image FROM scratch.
 *
 *   server [--port N]   serve GET / ("hello from app VERSION") and
 *                       GET /healthz ("ok") on 0.0.0.0:N (default 8080)
 *   server --selftest   serve one request on 127.0.0.1 (an ephemeral port),
 *                       ask it for /healthz as a client, check the answer;
 *                       exit 0 only if it was "200" with body "ok"
 *
 * VERSION is compiled in (-DVERSION=\"...\"), from the repository's VERSION
 * file.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef VERSION
#define VERSION "dev"
#endif

static int listen_on(const char *addr, int port)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port) };
	int one = 1, fd = socket(AF_INET, SOCK_STREAM, 0);

	if (fd < 0)
		return -1;
	inet_pton(AF_INET, addr, &sa.sin_addr);
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(fd, 16) < 0) {
		close(fd);
		return -1;
	}
	return fd;
}

/* Answers one request on c, then closes it. */
static void serve_one(int c)
{
	char req[2048], resp[512];
	ssize_t n = read(c, req, sizeof req - 1);
	const char *status = "404 Not Found", *body = "not found\n";
	char hello[128];

	if (n > 0) {
		req[n] = 0;
		if (strncmp(req, "GET /healthz ", 13) == 0) {
			status = "200 OK";
			body = "ok\n";
		} else if (strncmp(req, "GET / ", 6) == 0) {
			snprintf(hello, sizeof hello, "hello from app %s\n", VERSION);
			status = "200 OK";
			body = hello;
		}
	}
	n = snprintf(resp, sizeof resp,
		     "HTTP/1.0 %s\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\n"
		     "Connection: close\r\n\r\n%s", status, strlen(body), body);
	if (write(c, resp, n) != n)
		perror("write");
	close(c);
}

static int selftest(void)
{
	struct sockaddr_in sa;
	socklen_t len = sizeof sa;
	char buf[1024];
	ssize_t n, got = 0;
	int fd = listen_on("127.0.0.1", 0), c, status;
	pid_t pid;

	if (fd < 0 || getsockname(fd, (struct sockaddr *)&sa, &len) < 0) {
		perror("selftest: listen");
		return 1;
	}
	pid = fork();
	if (pid == 0) {
		int s = accept(fd, NULL, NULL);
		if (s >= 0)
			serve_one(s);
		_exit(0);
	}
	close(fd);
	c = socket(AF_INET, SOCK_STREAM, 0);
	if (c < 0 || connect(c, (struct sockaddr *)&sa, sizeof sa) < 0) {
		perror("selftest: connect");
		return 1;
	}
	if (write(c, "GET /healthz HTTP/1.0\r\n\r\n", 25) != 25) {
		perror("selftest: write");
		return 1;
	}
	while (got < (ssize_t)sizeof buf - 1 && (n = read(c, buf + got, sizeof buf - 1 - got)) > 0)
		got += n;
	buf[got] = 0;
	close(c);
	waitpid(pid, &status, 0);
	if (strncmp(buf, "HTTP/1.0 200 ", 13) != 0 || !strstr(buf, "\r\n\r\nok\n")) {
		fprintf(stderr, "selftest: unexpected answer: %s\n", buf);
		return 1;
	}
	printf("selftest passed: GET /healthz on 127.0.0.1:%d = 200 ok (version %s)\n",
	       ntohs(sa.sin_port), VERSION);
	return 0;
}

int main(int argc, char **argv)
{
	int port = 8080, fd;

	if (argc > 1 && strcmp(argv[1], "--selftest") == 0)
		return selftest();
	if (argc > 2 && strcmp(argv[1], "--port") == 0)
		port = atoi(argv[2]);
	signal(SIGCHLD, SIG_IGN);
	fd = listen_on("0.0.0.0", port);
	if (fd < 0) {
		perror("listen");
		return 1;
	}
	printf("app %s listening on :%d\n", VERSION, port);
	fflush(stdout);
	for (;;) {
		int c = accept(fd, NULL, NULL);
		if (c >= 0)
			serve_one(c);
	}
}
