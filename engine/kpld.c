/*
 * kpld.c - the daemon: one libuv loop that owns the store, the engine and
 * the gRPC server, and a clean stop on SIGINT/SIGTERM.
 *
 * Stop order: end watch streams with a status saying where to resume, stop
 * the gRPC server (in-flight calls are answered or cancelled), stop the
 * engine (running attempts are abandoned for the next start to resume,
 * pending commits land), close LMDB, close the loop.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "api/httpapi.h"
#include "api/rpc_pipelines.h"
#include "api/rpc_hooks.h"
#include "api/rpc_tokens.h"
#include "stages/spawner.h"
#include "stages/proc.h"
#include "stages/shim.h"
#include "api/server.h"
#include "engine/chatops.h"
#include "engine/config.h"
#include "engine/engine.h"
#include "engine/forge.h"
#include "engine/hooks.h"
#include "base/kpl.h"
#include "engine/retention.h"
#include "engine/sched.h"
#include "engine/secrets.h"
#include "store/dirlock.h"
#include "store/store.h"

#define LOG "kpld"

struct kpld {
	uv_loop_t *loop;
	struct dirlock *lock; /* held from before the store opens until exit */
	struct store *store;
	struct cfg *cfg;
	struct secrets *secrets;
	struct engine *eng;
	struct retention *retention;
	struct rpc *rpc;
	struct tokens *tokens;
	struct api_method *methods; /* Pipelines, then Security */
	struct api_server *server;
	struct rpc_hooks *rpc_hooks;
	struct hooks *hooks; /* --http-listen */
	struct chatops *chatops; /* its routes are on the hooks' listener */
	struct httpapi *httpapi; /* the HTTP API on that listener */
	struct forge *forge; /* commit statuses of pull requests' runs */
	struct sched *sched; /* registered pipelines' schedules */
	uv_signal_t sigint, sigterm;
	uv_idle_t closer; /* closes the store once no commit is in flight */
	bool stopping;
	int exit_code;
};

static void usage(FILE *f)
{
	fprintf(f,
		"usage: kpld [--listen HOST:PORT] [--data-dir DIR] [--config FILE]\n"
		"            [--log-level LEVEL] [--ready-file PATH]\n"
		"            [--tls-cert FILE --tls-key FILE [--client-ca FILE]]\n"
		"            [--bootstrap-token-file PATH] [--http-listen HOST:PORT]\n"
		"            [--standby] [--max-streams N] [--max-streams-per-conn N]\n"
		"            [--http-request-timeout SECONDS] [--http-max-per-address N]\n"
		"            [--http-max-connections N]\n"
		"            [--sse-heartbeat SECONDS] [--print-http-routes]\n"
		"            [--http-tls-cert FILE --http-tls-key FILE]\n"
		"            [--map-size SIZE] [--run-budget SIZE] [--log-cap SIZE]\n"
		"            [--sandbox bwrap|none] [--sandbox-bwrap PATH]\n"
		"            [--sandbox-bind PATH]... [--sandbox-hide PATH]...\n"
		"\n"
		"  --listen HOST:PORT   gRPC address (default 127.0.0.1:7070; port 0 picks one)\n"
		"  --data-dir DIR       store and run workspaces (default ./var/kpl); one\n"
		"                       kpld at a time (it locks DIR/kpld.lock)\n"
		"  --map-size SIZE      most the store may ever hold (LMDB map; address\n"
		"                       space, the file grows as used; default 8G;\n"
		"                       suffixes K, M, G); the last eighth (512K..64M) is\n"
		"                       kept for state changes and deletes: past that new\n"
		"                       runs are refused and running ones fail\n"
		"  --run-budget SIZE    store bytes one run's events may take (default 256M)\n"
		"  --log-cap SIZE       store bytes of one stage attempt's log (default 16M)\n"
		"  --standby            if another kpld holds DIR, wait for it to stop,\n"
		"                       then take over (resuming every run) instead of\n"
		"                       exiting\n"
		"  --config FILE        endpoints and credentials of external systems (YAML)\n"
		"  --log-level LEVEL    debug, info, warn or error (default info)\n"
		"  --ready-file PATH    write the bound HOST:PORT there once serving\n"
		"  --retain-days N      forget finished runs older than N days (default 30; 0 = never)\n"
		"  --retain-runs N      keep at most N finished runs (default 10000; 0 = no limit)\n"
		"  --tls-cert FILE      serve TLS with this PEM certificate (chain) ...\n"
		"  --tls-key FILE       ... and this PEM private key\n"
		"  --client-ca FILE     require client certificates signed by this CA (mTLS)\n"
		"  --bootstrap-token-file PATH\n"
		"                       if no admin token exists, make one and write it to\n"
		"                       PATH (mode 0600)\n"
		"  --http-listen HOST:PORT\n"
		"                       serve the JSON API, the web console (/), webhooks,\n"
		"                       /metrics and /healthz over HTTP there (off by\n"
		"                       default; docs/http.md, docs/console.md)\n"
		"  --max-streams N      open streaming calls (WatchRun, WatchRuns, health\n"
		"                       Watch, reflection) in all (default 1024); more are\n"
		"                       answered RESOURCE_EXHAUSTED\n"
		"  --max-streams-per-conn N\n"
		"                       the same on one client connection (default 32)\n"
		"  --http-request-timeout SECONDS\n"
		"                       an HTTP request must arrive whole this long after\n"
		"                       its first byte, else 408 (default 30)\n"
		"  --console-url URL    the console's address: commit statuses link to\n"
		"                       URL/#/runs/RUN_ID (docs/hooks.md)\n"
		"  --github-api-url URL GitHub's REST API for commit statuses (default\n"
		"                       https://api.github.com; GitHub Enterprise:\n"
		"                       https://HOST/api/v3)\n"
		"  --gitlab-api-url URL GitLab's REST API (default https://gitlab.com/api/v4)\n"
		"  --http-max-per-address N\n"
		"                       open HTTP connections from one address (default 16)\n"
		"  --http-max-connections N\n"
		"                       open HTTP connections in all (default 256)\n"
		"  --sse-heartbeat SECONDS\n"
		"                       a comment line on idle HTTP API event streams this\n"
		"                       often (default 15; docs/http.md)\n"
		"  --print-http-routes  print the HTTP API's routes and exit\n"
		"  --http-tls-cert FILE serve the HTTP listener over TLS with this PEM\n"
		"                       certificate (chain) ...\n"
		"  --http-tls-key FILE  ... and this PEM key (default: --tls-cert and\n"
		"                       --tls-key, when those are given)\n"
		"  --sandbox bwrap|none how stage commands are isolated (default bwrap:\n"
		"                       bubblewrap, the data directory out of reach; none:\n"
		"                       as kpld's user, unconfined; docs/security.md)\n"
		"  --sandbox-bwrap PATH the bubblewrap program (default bwrap on PATH)\n"
		"  --sandbox-bind PATH  also give stages PATH read-write (repeatable)\n"
		"  --sandbox-hide PATH  also hide PATH from stages (repeatable; the config\n"
		"                       file, TLS key, bootstrap token file and the\n"
		"                       config's kubeconfigs and keys are hidden anyway)\n"
		"\n"
		"Until an API token exists every call is allowed, so kpld then refuses to\n"
		"listen on anything but loopback (docs/security.md).\n");
}

static void signal_closed(uv_handle_t *h)
{
	(void)h;
}

/* engine_stopped runs inside a commit callback: the store can only close
 * once that commit has fully unwound, on a later loop turn. */
static void close_store(uv_idle_t *h)
{
	struct kpld *d = h->data;

	if (store_pending_commits(d->store) || d->retention || d->sched)
		return;
	uv_idle_stop(h);
	uv_close((uv_handle_t *)h, signal_closed);
	store_close(d->store);
	d->store = NULL;
	secrets_free(d->secrets);
	d->secrets = NULL;
	cfg_free(d->cfg);
	d->cfg = NULL;
	uv_close((uv_handle_t *)&d->sigint, signal_closed);
	uv_close((uv_handle_t *)&d->sigterm, signal_closed);
	kpl_info(LOG, "stopped");
}

static void engine_stopped(void *data)
{
	struct kpld *d = data;

	d->eng = NULL;
	/* Every stage is abandoned: the spawner's socket and handles go. */
	spawner_shutdown();
	rpc_free(d->rpc);
	d->rpc = NULL;
	tokens_free(d->tokens);
	rpc_hooks_free(d->rpc_hooks);
	d->rpc_hooks = NULL;
	d->tokens = NULL;
	free(d->methods);
	d->methods = NULL;
	uv_idle_init(d->loop, &d->closer);
	d->closer.data = d;
	uv_idle_start(&d->closer, close_store);
}

/* The engine stops once nothing can submit to it: the gRPC server and the
 * HTTP endpoints have both stopped. */
static void maybe_stop_engine(struct kpld *d)
{
	if (!d->server && !d->hooks && !d->chatops && !d->forge)
		engine_stop(d->eng, engine_stopped, d);
}

static void server_stopped(void *data)
{
	struct kpld *d = data;

	d->server = NULL;
	maybe_stop_engine(d);
}

static void forge_stopped(void *data)
{
	struct kpld *d = data;

	d->forge = NULL;
	maybe_stop_engine(d);
}

static void hooks_stopped(void *data)
{
	struct kpld *d = data;

	d->hooks = NULL;
	if (d->rpc)
		rpc_set_hooks(d->rpc, NULL);
	/* After the hooks: a delivery finishing may still ask for statuses. */
	if (d->forge)
		forge_close(d->forge, forge_stopped, d);
	else
		maybe_stop_engine(d);
}

static void chatops_stopped(void *data)
{
	struct kpld *d = data;

	d->chatops = NULL;
	if (!d->server && !d->hooks)
		maybe_stop_engine(d);
}

static void sched_stopped(void *data)
{
	struct kpld *d = data;

	if (d->rpc_hooks)
		rpc_hooks_on_change(d->rpc_hooks, NULL, NULL);
	sched_free(d->sched);
	d->sched = NULL;
}

static void retention_stopped(void *data)
{
	struct kpld *d = data;

	retention_free(d->retention);
	d->retention = NULL;
}

static void on_signal(uv_signal_t *h, int signum)
{
	struct kpld *d = h->data;

	if (d->stopping) {
		kpl_warn(LOG, "second signal: exiting at once");
		exit(1);
	}
	d->stopping = true;
	kpl_info(LOG, "%s: stopping", strsignal(signum));
	api_server_set_serving(d->server, false);
	if (d->httpapi)
		httpapi_stop(d->httpapi);
	retention_stop(d->retention, retention_stopped, d);
	/* Before the hooks: they answer its submissions still waiting. */
	if (d->sched)
		sched_stop(d->sched, sched_stopped, d);
	rpc_close_streams(d->rpc);
	if (d->hooks)
		hooks_stop(d->hooks, hooks_stopped, d);
	/* After hooks_stop, which closed every connection: no chat request
	 * reaches chatops once it may be freed. */
	if (d->chatops)
		chatops_stop(d->chatops, chatops_stopped, d);
	api_server_shutdown(d->server, server_stopped, d);
}

/* "512M", "8G", "65536": bytes, with an optional K, M or G (powers of 1024,
 * "KiB" and "MB" read the same). 0 or -1. */
static int parse_size(const char *s, uint64_t *out)
{
	char *end;
	unsigned long long v;
	int shift = 0;

	if (!*s || *s == '-')
		return -1;
	v = strtoull(s, &end, 10);
	if (end == s)
		return -1;
	switch (*end) {
	case 'k': case 'K': shift = 10; end++; break;
	case 'm': case 'M': shift = 20; end++; break;
	case 'g': case 'G': shift = 30; end++; break;
	case 't': case 'T': shift = 40; end++; break;
	}
	if (shift && (strcmp(end, "iB") == 0 || strcmp(end, "B") == 0))
		end += strlen(end);
	if (*end || v > (UINT64_MAX >> 1) >> shift)
		return -1;
	*out = (uint64_t)v << shift;
	return 0;
}

/* A standby that is told to stop while it waits has nothing to close. */
static void standby_stop(int signum)
{
	(void)signum;
	_exit(0);
}

static void standby_waiting(void *data, const char *dir, pid_t holder)
{
	(void)data;
	if (holder > 0)
		kpl_info(LOG, "standby: waiting for the lock on %s held by pid %ld", dir,
			 (long)holder);
	else
		kpl_info(LOG, "standby: waiting for the lock on %s", dir);
}

static int write_ready_file(const char *path, const char *host, int port,
			    const char *http_host, int http_port)
{
	char tmp[4096];
	FILE *f;

	/* Written whole, then renamed, so a reader never sees half of it. */
	snprintf(tmp, sizeof tmp, "%s.tmp", path);
	if (!(f = fopen(tmp, "w")))
		return -1;
	fprintf(f, "%s:%d\n", host, port);
	if (http_host)
		fprintf(f, "http=%s:%d\n", http_host, http_port);
	if (fclose(f) || rename(tmp, path))
		return -1;
	return 0;
}

/* True for 127.0.0.0/8, ::1, localhost and unix sockets (host is --listen
 * without its port). */
static bool listen_is_loopback(const char *listen, const char *host)
{
	char h[256];
	unsigned char a[16];
	size_t n = strlen(host);

	if (strncmp(listen, "unix:", 5) == 0 || strncmp(listen, "unix-abstract:", 14) == 0)
		return true;
	if (n >= 2 && host[0] == '[' && host[n - 1] == ']')
		snprintf(h, sizeof h, "%.*s", (int)(n - 2), host + 1);
	else
		snprintf(h, sizeof h, "%s", host);
	if (strcmp(h, "localhost") == 0)
		return true;
	if (inet_pton(AF_INET, h, a) == 1)
		return a[0] == 127;
	if (inet_pton(AF_INET6, h, a) == 1)
		return memcmp(a, "\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\1", 16) == 0;
	return false;
}

/* Long-only options, beyond any short option's letter. */
enum {
	OPT_SANDBOX = 1000,
	OPT_SANDBOX_BWRAP,
	OPT_HTTP_MAX_CONNS,
	OPT_SANDBOX_BIND,
	OPT_SANDBOX_HIDE,
	OPT_SSE_HEARTBEAT,
	OPT_HTTP_TLS_CERT,
	OPT_HTTP_TLS_KEY,
	OPT_PRINT_HTTP_ROUTES,
	OPT_CONSOLE_URL,
	OPT_GITHUB_API_URL,
	OPT_GITLAB_API_URL,
};

/* Appends an absolute form of path to a NULL-terminated list (NULL paths
 * are skipped; one that does not exist is kept as given, made absolute). */
static void paths_add(char ***v, size_t *n, const char *path)
{
	char buf[PATH_MAX], cwd[PATH_MAX];

	if (!path || !*path)
		return;
	*v = kpl_realloc(*v, (*n + 2) * sizeof **v);
	if (realpath(path, buf))
		(*v)[*n] = kpl_strdup(buf);
	else if (path[0] != '/' && getcwd(cwd, sizeof cwd))
		(*v)[*n] = kpl_asprintf("%s/%s", cwd, path);
	else
		(*v)[*n] = kpl_strdup(path);
	(*v)[++*n] = NULL;
}

/*
 * Stage isolation (docs/security.md): hands proc the mode, the data
 * directory and the paths to hide. Besides --sandbox-hide, what kpld
 * itself reads secrets from is hidden: the config file, the TLS key, the
 * bootstrap token file, and the kubeconfigs and client keys the config
 * names. Returns 0, or 2 after saying why on stderr.
 */
static int setup_sandbox(const char *mode, const char *bwrap, const char *data_dir,
			 char **hide, size_t n_hide, char **bind, size_t n_bind,
			 const char *config, const struct cfg *cfg, const char *tls_key,
			 const char *bootstrap)
{
	static const char *const home_secrets[] = {
		".config/kpl", ".kube", ".docker", ".ssh", ".git-credentials", ".netrc",
		".aws", ".config/gcloud", ".azure", ".gnupg", ".config/containers",
	};
	struct proc_sandbox sb = { .bwrap = bwrap };
	const char *home;
	char data[PATH_MAX], **h = NULL, **b = NULL, *found;
	size_t nh = 0, nb = 0;

	if (strcmp(mode, "none") == 0) {
		sb.mode = PROC_SANDBOX_NONE;
		proc_set_sandbox(&sb);
		kpl_warn(LOG, "--sandbox none: stage commands run as kpld's user, unconfined: "
			 "any pipeline's script can read and write the data directory "
			 "(tokens, secrets' key, every run; docs/security.md)");
		return 0;
	}
	if (strcmp(mode, "bwrap") != 0) {
		fprintf(stderr, "kpld: --sandbox %s: want bwrap or none\n", mode);
		return 2;
	}
	sb.mode = PROC_SANDBOX_BWRAP;
	if (!realpath(data_dir, data)) {
		fprintf(stderr, "kpld: --data-dir %s: %s\n", data_dir, strerror(errno));
		return 2;
	}
	sb.data_dir = data;
	for (size_t i = 0; i < n_hide; i++)
		paths_add(&h, &nh, hide[i]);
	paths_add(&h, &nh, config);
	paths_add(&h, &nh, tls_key);
	paths_add(&h, &nh, bootstrap);
	for (size_t i = 0; cfg && i < cfg->n; i++) {
		paths_add(&h, &nh, cfg->eps[i].kubeconfig);
		paths_add(&h, &nh, cfg->eps[i].client_key);
	}
	/* Where kpld's user keeps credentials: kplctl's tokens (a local admin
	 * using kplctl as this user would hand a stage an admin token), and
	 * kubectl's, docker's, ssh's, git's and the clouds'. */
	if ((home = getenv("HOME")) && home[0] == '/' && strcmp(home, "/") != 0)
		for (size_t i = 0; i < KPL_ARRAY_SIZE(home_secrets); i++) {
			char *p = kpl_asprintf("%s/%s", home, home_secrets[i]);
			if (access(p, F_OK) == 0)
				paths_add(&h, &nh, p);
			free(p);
		}
	paths_add(&h, &nh, getenv("KPL_CONFIG"));
	for (size_t i = 0; i < n_bind; i++)
		paths_add(&b, &nb, bind[i]);
	sb.hide = (const char *const *)h;
	sb.bind = (const char *const *)b;
	proc_set_sandbox(&sb);
	if ((found = proc_find_program(sb.bwrap ? sb.bwrap : "bwrap", getenv("PATH"))))
		kpl_info(LOG, "stages run in a sandbox (%s): %s and %zu more path(s) hidden, "
			 "only each run's workspace writable", found, data, nh);
	else
		kpl_warn(LOG, "stage isolation: cannot run %s: every stage that runs a "
			 "command will fail until bubblewrap is installed (or --sandbox none "
			 "is chosen; docs/security.md)", sb.bwrap ? sb.bwrap : "bwrap");
	free(found);
	proc_strv_free(h);
	proc_strv_free(b);
	return 0;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "listen", required_argument, NULL, 'l' },
		{ "data-dir", required_argument, NULL, 'd' },
		{ "log-level", required_argument, NULL, 'v' },
		{ "ready-file", required_argument, NULL, 'r' },
		{ "config", required_argument, NULL, 'c' },
		{ "retain-days", required_argument, NULL, 'D' },
		{ "retain-runs", required_argument, NULL, 'R' },
		{ "tls-cert", required_argument, NULL, 'T' },
		{ "tls-key", required_argument, NULL, 'K' },
		{ "client-ca", required_argument, NULL, 'C' },
		{ "bootstrap-token-file", required_argument, NULL, 'B' },
		{ "http-listen", required_argument, NULL, 'H' },
		{ "standby", no_argument, NULL, 'S' },
		{ "max-streams", required_argument, NULL, 'M' },
		{ "max-streams-per-conn", required_argument, NULL, 'P' },
		{ "http-request-timeout", required_argument, NULL, 'W' },
		{ "http-max-per-address", required_argument, NULL, 'A' },
		{ "http-max-connections", required_argument, NULL, OPT_HTTP_MAX_CONNS },
		{ "map-size", required_argument, NULL, 'Z' },
		{ "run-budget", required_argument, NULL, 'U' },
		{ "log-cap", required_argument, NULL, 'L' },
		{ "sandbox", required_argument, NULL, OPT_SANDBOX },
		{ "sandbox-bwrap", required_argument, NULL, OPT_SANDBOX_BWRAP },
		{ "sandbox-bind", required_argument, NULL, OPT_SANDBOX_BIND },
		{ "sandbox-hide", required_argument, NULL, OPT_SANDBOX_HIDE },
		{ "sse-heartbeat", required_argument, NULL, OPT_SSE_HEARTBEAT },
		{ "http-tls-cert", required_argument, NULL, OPT_HTTP_TLS_CERT },
		{ "http-tls-key", required_argument, NULL, OPT_HTTP_TLS_KEY },
		{ "print-http-routes", no_argument, NULL, OPT_PRINT_HTTP_ROUTES },
		{ "console-url", required_argument, NULL, OPT_CONSOLE_URL },
		{ "github-api-url", required_argument, NULL, OPT_GITHUB_API_URL },
		{ "gitlab-api-url", required_argument, NULL, OPT_GITLAB_API_URL },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	const char *listen = "127.0.0.1:7070", *data_dir = "./var/kpl", *ready = NULL;
	const char *config = NULL, *bootstrap = NULL, *http_listen = NULL;
	uint64_t http_request_timeout_ms = 0; /* 0: httpd's defaults */
	size_t http_max_per_address = 0, http_max_connections = 0;
	const char *sandbox = "bwrap", *sandbox_bwrap = NULL;
	char **sandbox_hide = kpl_calloc((size_t)argc + 1, sizeof *sandbox_hide);
	char **sandbox_bind = kpl_calloc((size_t)argc + 1, sizeof *sandbox_bind);
	size_t n_hide = 0, n_bind = 0;
	const struct api_method *hm;
	size_t n_hm;
	char http_host[256] = "";
	const struct api_method *pm, *tm;
	size_t n_pm, n_tm;
	bool made, standby = false;
	struct retention_options ro = { .max_age_days = 30, .max_runs = 10000 };
	char *end;
	struct kpld d = { 0 };
	struct kpl_err err = { 0 };
	struct engine_options eo = { 0 };
	struct forge_options fo = { 0 };
	struct store_options sto = { 0 };
	struct api_server_options so = { 0 };
	struct httpapi_options hao = { 0 };
	const char *http_tls_cert = NULL, *http_tls_key = NULL;
	struct httpd_route extra_routes[HOOKS_MAX_EXTRA_ROUTES]; /* outlive the hooks */
	char host[256];
	const char *colon;
	int c, rc;

	/* kpld runs each script command through itself as the shim. */
	if (argc > 1 && strcmp(argv[1], SHIM_ARGV1) == 0)
		return shim_main(argc, argv);

	while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
		switch (c) {
		case 'l': listen = optarg; break;
		case 'd': data_dir = optarg; break;
		case 'r': ready = optarg; break;
		case 'c': config = optarg; break;
		case 'T': so.tls_cert_file = optarg; break;
		case 'K': so.tls_key_file = optarg; break;
		case 'C': so.client_ca_file = optarg; break;
		case 'B': bootstrap = optarg; break;
		case 'D':
		case 'R': {
			unsigned long v = strtoul(optarg, &end, 10);
			if (*end || !*optarg || v > 100000000) {
				fprintf(stderr, "kpld: --%s: want a whole number, got %s\n",
					c == 'D' ? "retain-days" : "retain-runs", optarg);
				return 2;
			}
			if (c == 'D')
				ro.max_age_days = (unsigned)v;
			else
				ro.max_runs = (unsigned)v;
			break;
		}
		case 'v':
			if ((rc = kpl_log_level_parse(optarg)) < 0) {
				fprintf(stderr, "kpld: --log-level: unknown level %s "
					"(debug, info, warn, error)\n", optarg);
				return 2;
			}
			kpl_log_threshold = rc;
			break;
		case 'H': http_listen = optarg; break;
		case 'M':
		case 'P':
		case 'W':
		case OPT_HTTP_MAX_CONNS:
		case 'A': {
			/* Limits (docs/security.md, "Limits"): 1 to a million. */
			unsigned long v = strtoul(optarg, &end, 10);
			const char *name = c == 'M' ? "max-streams" : c == 'P' ? "max-streams-per-conn"
					 : c == 'W' ? "http-request-timeout"
					 : c == OPT_HTTP_MAX_CONNS ? "http-max-connections"
					 : "http-max-per-address";
			if (*end || !*optarg || v < 1 || v > 1000000) {
				fprintf(stderr, "kpld: --%s: want a whole number from 1 to 1000000, "
					"got %s\n", name, optarg);
				return 2;
			}
			if (c == 'M')
				so.max_streams = v;
			else if (c == 'P')
				so.max_streams_per_conn = v;
			else if (c == 'W')
				http_request_timeout_ms = (uint64_t)v * 1000;
			else if (c == OPT_HTTP_MAX_CONNS)
				http_max_connections = v;
			else
				http_max_per_address = v;
			break;
		}
		case 'S': standby = true; break;
		case 'Z':
		case 'U':
		case 'L': {
			uint64_t v;
			const char *name = c == 'Z' ? "map-size" : c == 'U' ? "run-budget" : "log-cap";
			if (parse_size(optarg, &v) || v < (c == 'Z' ? (1u << 20) : 4096u)) {
				fprintf(stderr, "kpld: --%s: want a size such as 512M or 8G "
					"(at least %s), got %s\n", name, c == 'Z' ? "1M" : "4K",
					optarg);
				return 2;
			}
			if (c == 'Z')
				sto.map_size = (size_t)v;
			else if (c == 'U')
				eo.run_budget_bytes = v;
			else
				eo.log_cap_bytes = v;
			break;
		}
		case OPT_SANDBOX: sandbox = optarg; break;
		case OPT_SANDBOX_BWRAP: sandbox_bwrap = optarg; break;
		case OPT_SANDBOX_BIND: sandbox_bind[n_bind++] = optarg; break;
		case OPT_SANDBOX_HIDE: sandbox_hide[n_hide++] = optarg; break;
		case OPT_SSE_HEARTBEAT: {
			unsigned long v = strtoul(optarg, &end, 10);
			if (*end || !*optarg || v < 1 || v > 3600) {
				fprintf(stderr, "kpld: --sse-heartbeat: want seconds from 1 to "
					"3600, got %s\n", optarg);
				return 2;
			}
			hao.heartbeat_ms = (uint64_t)v * 1000;
			break;
		}
		case OPT_PRINT_HTTP_ROUTES:
			httpapi_print_routes(stdout);
			free(sandbox_hide);
			free(sandbox_bind);
			return 0;
		case OPT_HTTP_TLS_CERT: http_tls_cert = optarg; break;
		case OPT_HTTP_TLS_KEY: http_tls_key = optarg; break;
		case OPT_CONSOLE_URL: fo.console_url = optarg; break;
		case OPT_GITHUB_API_URL: fo.api_url[FORGE_GITHUB] = optarg; break;
		case OPT_GITLAB_API_URL: fo.api_url[FORGE_GITLAB] = optarg; break;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (optind != argc) {
		fprintf(stderr, "kpld: unexpected argument %s\n", argv[optind]);
		usage(stderr);
		return 2;
	}
	colon = strrchr(listen, ':');
	if (!colon || colon == listen || (size_t)(colon - listen) >= sizeof host) {
		fprintf(stderr, "kpld: --listen %s: want HOST:PORT\n", listen);
		return 2;
	}
	snprintf(host, sizeof host, "%.*s", (int)(colon - listen), listen);
	if (!http_tls_cert != !http_tls_key) {
		fprintf(stderr, "kpld: --http-tls-cert and --http-tls-key go together\n");
		return 2;
	}
	/* A browser session carries a token: the HTTP listener is TLS as
	 * soon as kpld has a certificate. */
	if (!http_tls_cert && so.tls_cert_file && so.tls_key_file) {
		http_tls_cert = so.tls_cert_file;
		http_tls_key = so.tls_key_file;
	}
	/* Stages never see the key (the gRPC one is hidden by setup_sandbox). */
	if (http_tls_key && http_tls_key != so.tls_key_file)
		sandbox_hide[n_hide++] = (char *)http_tls_key;
	if (!so.tls_cert_file != !so.tls_key_file ||
	    (so.client_ca_file && !so.tls_cert_file)) {
		fprintf(stderr, "kpld: --tls-cert and --tls-key go together; "
			"--client-ca needs both\n");
		return 2;
	}

	signal(SIGPIPE, SIG_IGN);
	d.loop = uv_default_loop();
	if (config) {
		if (cfg_load(config, &d.cfg, &err)) {
			fprintf(stderr, "kpld: %s\n", err.msg);
			return 1;
		}
	} else {
		d.cfg = cfg_empty();
	}
	if (chatops_new(d.loop, config, &d.chatops, &err)) {
		fprintf(stderr, "kpld: %s\n", err.msg);
		cfg_free(d.cfg);
		return 1;
	}

	/* Before the store opens: a second kpld would resume the same runs. */
	if (standby) {
		signal(SIGTERM, standby_stop);
		signal(SIGINT, standby_stop);
	}
	if (dirlock_take(data_dir, standby, standby_waiting, NULL, &d.lock, &err)) {
		fprintf(stderr, "kpld: %s\n", err.msg);
		return 1;
	}
	if (standby) {
		/* From here on the loop's handlers stop kpld cleanly. */
		signal(SIGTERM, SIG_DFL);
		signal(SIGINT, SIG_DFL);
		kpl_info(LOG, "holding the lock on %s", data_dir);
	}
	if ((rc = store_open(d.loop, data_dir, &sto, &d.store, &err)) != 0) {
		fprintf(stderr, "kpld: store %s: %s\n", data_dir, err.msg);
		return 1;
	}
	/* After store_open, which makes the data directory. */
	rc = setup_sandbox(sandbox, sandbox_bwrap, data_dir, sandbox_hide, n_hide,
			   sandbox_bind, n_bind, config, d.cfg, so.tls_key_file, bootstrap);
	free(sandbox_hide);
	free(sandbox_bind);
	if (rc) {
		store_close(d.store);
		return rc;
	}
	if ((rc = secrets_open(d.store, data_dir, &d.secrets, &err)) != 0) {
		fprintf(stderr, "kpld: %s\n", err.msg);
		store_close(d.store);
		return 1;
	}
	/* Before the engine starts: the bootstrap commits synchronously. */
	if (bootstrap && tokens_bootstrap(d.store, bootstrap, &made, &err)) {
		fprintf(stderr, "kpld: %s\n", err.msg);
		store_close(d.store);
		return 1;
	}
	if (bootstrap && !made)
		kpl_info(LOG, "--bootstrap-token-file: an admin token exists; %s left alone",
			 bootstrap);
	/* No token: every call is allowed. Refuse before binding anything. */
	if (!tokens_exist(d.store)) {
		if (!listen_is_loopback(listen, host)) {
			fprintf(stderr,
				"kpld: refusing to listen on %s: no API token exists, so every "
				"call would be allowed; listen on loopback (127.0.0.1) and create "
				"one with kplctl token create --scope admin, or start with "
				"--bootstrap-token-file PATH (docs/security.md)\n",
				listen);
			store_close(d.store);
			return 2;
		}
		kpl_warn(LOG, "no API token exists: every call is allowed (as \"local\"), "
			 "so kpld listens on loopback only; kplctl token create --scope admin "
			 "makes the first one");
	}
	eo.loop = d.loop;
	eo.store = d.store;
	eo.data_dir = data_dir;
	eo.cfg = d.cfg;
	eo.secrets = d.secrets;
	/* Runs the engine recovers are counted before it changes them. */
	hooks_seed_metrics(d.store);
	if ((rc = engine_start(&eo, &d.eng, &err)) != 0) {
		fprintf(stderr, "kpld: %s\n", err.msg);
		store_close(d.store);
		return 1;
	}
	{
		char *work = kpl_asprintf("%s/work", data_dir);
		/* Tests only (README, "Retention"). */
		ro.clock_file = getenv("KPL_TEST_RETENTION_CLOCK");
		retention_start(d.loop, d.store, work, &ro, &d.retention);
		free(work);
	}
	d.rpc = rpc_new(d.eng);
	so.listen = listen;
	d.tokens = tokens_new(d.eng);
	pm = rpc_methods(d.rpc, &n_pm);
	tm = tokens_methods(d.tokens, &n_tm);
	d.methods = kpl_calloc(n_pm + n_tm, sizeof *d.methods);
	memcpy(d.methods, pm, n_pm * sizeof *pm);
	memcpy(d.methods + n_pm, tm, n_tm * sizeof *tm);
	so.methods = d.methods;
	so.n_methods = n_pm + n_tm;
	d.rpc_hooks = rpc_hooks_new(d.eng);
	hm = rpc_hooks_methods(d.rpc_hooks, &n_hm);
	d.methods = kpl_realloc(d.methods, (so.n_methods + n_hm) * sizeof *d.methods);
	memcpy(d.methods + so.n_methods, hm, n_hm * sizeof *hm);
	so.methods = d.methods;
	so.n_methods += n_hm;
	so.authorize = tokens_authorize;
	so.authorize_data = d.tokens;
	if ((rc = api_server_start(d.loop, &so, &d.server, &err)) != 0) {
		fprintf(stderr, "kpld: %s\n", err.msg);
		/* NEEDSWORK: stop the engine cleanly here too. */
		return 1;
	}
	fo.loop = d.loop;
	fo.eng = d.eng;
	if ((rc = forge_new(&fo, &d.forge, &err)) != 0) {
		fprintf(stderr, "kpld: %s\n", err.msg);
		/* NEEDSWORK: stop the engine cleanly here too. */
		return 1;
	}
	{
		/* Always: RunPipeline fetches with the hooks' git queue; the
		 * HTTP listener only with --http-listen. */
		struct hooks_options ho = { .loop = d.loop, .eng = d.eng, .forge = d.forge,
					    .data_dir = data_dir, .listen = http_listen,
					    .request_timeout_ms = http_request_timeout_ms,
					    .max_per_address = http_max_per_address,
					    .max_connections = http_max_connections,
					    .tls_cert_file = http_tls_cert,
					    .tls_key_file = http_tls_key };

		const struct httpd_route *chat_routes;
		size_t n_chat;

		chatops_set_engine(d.chatops, d.eng);
		chat_routes = chatops_routes(d.chatops, &n_chat);
		if (n_chat + 1 > HOOKS_MAX_EXTRA_ROUTES)
			BUG("%zu chatops routes", n_chat);
		memcpy(extra_routes, chat_routes, n_chat * sizeof *chat_routes);
		/* The HTTP API (docs/http.md). */
		d.httpapi = httpapi_new(d.loop, d.server, &hao);
		extra_routes[n_chat] = httpapi_route(d.httpapi);
		ho.extra_routes = extra_routes;
		ho.n_extra_routes = n_chat + 1;

		if ((rc = hooks_start(&ho, &d.hooks, &err)) != 0) {
			fprintf(stderr, "kpld: --http-listen: %s\n", err.msg);
			/* NEEDSWORK: stop the engine cleanly here too. */
			return 1;
		}
		rpc_set_hooks(d.rpc, d.hooks);
		if (n_chat && !http_listen)
			kpl_warn(LOG, "the config has chatops: but kpld has no --http-listen, so "
				 "no chat command can reach it");
	}
	{
		/* Tests only (README, "Schedules"). */
		struct sched_options sco = { .loop = d.loop, .eng = d.eng, .hooks = d.hooks,
					     .clock_file = getenv("KPL_TEST_SCHEDULE_CLOCK") };

		sched_start(&sco, &d.sched);
		rpc_hooks_on_change(d.rpc_hooks, sched_kick, d.sched);
	}
	if (http_listen) {
		const char *hc = strrchr(http_listen, ':');

		snprintf(http_host, sizeof http_host, "%.*s", (int)(hc - http_listen),
			 http_listen);
		kpl_info(LOG, "serving the API, the console, webhooks, /metrics and /healthz on "
			 "http://%s:%d",
			 http_host, hooks_port(d.hooks));
	}
	api_server_set_serving(d.server, true);
	uv_signal_init(d.loop, &d.sigint);
	uv_signal_init(d.loop, &d.sigterm);
	d.sigint.data = d.sigterm.data = &d;
	uv_signal_start(&d.sigint, on_signal, SIGINT);
	uv_signal_start(&d.sigterm, on_signal, SIGTERM);

	kpl_info(LOG, "serving kpl.v1.Pipelines on %s:%d, data in %s", host,
		 api_server_port(d.server), data_dir);
	if (ready && write_ready_file(ready, host, api_server_port(d.server),
				      http_listen ? http_host : NULL,
				      http_listen ? hooks_port(d.hooks) : 0))
		kpl_error(LOG, "cannot write --ready-file %s", ready);

	uv_run(d.loop, UV_RUN_DEFAULT);
	httpapi_free(d.httpapi);
	rc = uv_loop_close(d.loop);
	if (rc) {
		kpl_error(LOG, "loop did not close clean: %s", uv_strerror(rc));
		return 1;
	}
	/* Only now: the store is closed. */
	dirlock_release(d.lock);
	return d.exit_code;
}
