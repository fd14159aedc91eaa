/*
 * kplctl.c - the command-line client of kpld: submit, get, list, watch,
 * cancel, retry and approve runs, read their logs, lint pipeline files,
 * follow the events of every run, manage secrets and tokens, list and roll
 * back releases, over kpl.v1.Pipelines and kpl.v1.Security (see
 * docs/kplctl.md). On a terminal, watches draw a live stage table
 * (kplctl_live.h).
 *
 * Commands and options are data (the two tables below); parsing, --help and
 * the per-command checks all read them. Exit codes are part of the
 * interface, since scripts and CI jobs branch on them.
 */
#include <ctype.h>
#include <errno.h>
#include <jansson.h>
#include <langinfo.h>
#include <locale.h>
#include <pwd.h>
#include <signal.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "api/kpl.pb-c.h"
#include "clients/kplclient.h"
#include "clients/kplctl_live.h"
#include "clients/textdiff.h"
#include "base/kpl.h"
#include "google/protobuf/timestamp.pb-c.h"
#include "engine/tzfile.h"
#include "pipelines/pipeline.h"
#include "pipelines/reuse.h"
#include "stages/stage.h"

enum exit_code {
	EXIT_OK = 0,         /* done; for watch: the run SUCCEEDED */
	EXIT_RUN_FAILED = 1, /* the watched run ended FAILED or CANCELLED;
				for lint: a file has an error */
	EXIT_USAGE = 2,      /* bad command line, or FILE unreadable */
	EXIT_RPC = 3,        /* cannot reach kpld, or it returned an error */
	EXIT_INTERRUPTED = 130, /* a watch or logs --follow ended by Ctrl-C */
};

enum opt_bit {
	O_SERVER = 1 << 0,
	O_OUTPUT = 1 << 1,
	O_PARAM = 1 << 2,
	O_IDEM = 1 << 3,
	O_WATCH = 1 << 4,
	O_STATE = 1 << 5,
	O_PIPELINE = 1 << 6,
	O_LIMIT = 1 << 7,
	O_FROM_SEQ = 1 << 8,
	O_HELP = 1 << 9,
	O_REJECT = 1 << 10,
	O_COMMENT = 1 << 11,
	O_BY = 1 << 12,
	O_FROM = 1 << 13,
	O_KIND = 1 << 14,
	O_CA = 1 << 15,
	O_TOKEN = 1 << 16,
	O_SCOPE = 1 << 17,
	O_DESCRIPTION = 1 << 18,
	O_STAGE = 1 << 19,
	O_FOLLOW = 1 << 20,
	O_TO = 1 << 21,
	O_PLAIN = 1 << 22,
	O_CERT = 1 << 23,
	O_KEY = 1 << 24,
	O_REPO = 1 << 25,
	O_BRANCH = 1 << 26,
	O_PATH = 1 << 27,
	O_SECRET = 1 << 28,
	O_REF = 1 << 29,
	O_SHA = 1 << 30,
	/* The last bit (1u << 31), shared by pipeline register's pull request
	 * options: opt_set tells them apart by name. */
	O_PR = INT_MIN,
};
#define O_GLOBAL (O_SERVER | O_HELP | O_CA | O_CERT | O_KEY | O_TOKEN)

struct opt_def {
	const char *long_name;
	char short_name;
	const char *arg; /* NULL for a flag */
	enum opt_bit bit;
	const char *help;
};

static const struct opt_def opt_defs[] = {
	{ "server", 0, "HOST:PORT", O_SERVER,
	  "kpld address (else $KPL_SERVER, else " KPLC_DEFAULT_TARGET ")" },
	{ "output", 'o', "FORMAT", O_OUTPUT,
	  "text (default) or json; for watch, logs, events: one object a line" },
	{ "param", 'p', "KEY=VALUE", O_PARAM, "a run parameter (repeatable)" },
	{ "idempotency-key", 0, "K", O_IDEM,
	  "submitting the same key again returns the same run" },
	{ "watch", 0, NULL, O_WATCH,
	  "after submit, retry or rollback, follow the run like watch" },
	{ "state", 0, "S", O_STATE,
	  "only runs in state S (queued, running, succeeded, failed, "
	  "cancelled)" },
	{ "pipeline", 0, "NAME", O_PIPELINE,
	  "only runs (events) of pipeline NAME; for secret set, a pipeline that may use "
	  "the secret (repeat it, or NAME,NAME...)" },
	{ "limit", 0, "N", O_LIMIT, "at most N runs, audit entries or releases (default 50)" },
	{ "from-seq", 0, "N", O_FROM_SEQ, "start at event N (default 1)" },
	{ "reject", 0, NULL, O_REJECT, "reject the stage instead of approving" },
	{ "comment", 'm', "COMMENT", O_COMMENT, "why, for the record" },
	{ "by", 0, "NAME", O_BY, "who answers (default $USER@HOSTNAME)" },
	{ "from", 0, "N", O_FROM,
	  "start at global event N (default: only new events)" },
	{ "kind", 0, "K", O_KIND,
	  "only events of kind K: run, stage, log or audit (repeatable)" },
	{ "ca", 0, "FILE", O_CA,
	  "use TLS, trusting the CAs in PEM FILE (else $KPL_CA, else ca in the config file)" },
	{ "cert", 0, "FILE", O_CERT,
	  "with --ca: send the client certificate in PEM FILE, for a kpld with --client-ca "
	  "(else $KPL_CERT, else cert in the config file)" },
	{ "key", 0, "FILE", O_KEY,
	  "the private key of --cert, PEM (else $KPL_KEY, else key in the config file)" },
	{ "token", 0, "TOKEN", O_TOKEN,
	  "API token (else $KPL_TOKEN, else token in the config file); never printed" },
	{ "scope", 0, "SCOPE", O_SCOPE, "read, submit, approve or admin" },
	{ "description", 0, "TEXT", O_DESCRIPTION, "who or what the token is for" },
	{ "stage", 0, "S", O_STAGE, "only the log lines of stage S" },
	{ "follow", 'f', NULL, O_FOLLOW,
	  "keep printing log lines as they come, until the run ends" },
	{ "to", 0, "REV", O_TO,
	  "the revision to restore (default: the one before the last deploy)" },
	{ "plain", 0, NULL, O_PLAIN,
	  "print event lines even on a terminal (no live table)" },
	{ "repo", 0, "URL", O_REPO,
	  "pipeline register: the repository kpld reads the pipeline file from" },
	{ "branch", 0, "B", O_BRANCH,
	  "pipeline register: a branch (or glob) whose pushes start runs (repeatable; "
	  "default main)" },
	{ "path", 0, "FILE", O_PATH,
	  "pipeline register: the pipeline file in the repository (default .kpl.yaml)" },
	{ "secret", 0, "NAME", O_SECRET,
	  "pipeline register: the secret holding the webhook key" },
	{ "ref", 0, "REF", O_REF,
	  "pipeline run: the branch or tag to read the file at (default: the first "
	  "registered branch)" },
	{ "sha", 0, "SHA", O_SHA, "pipeline run: the commit to read the file at" },
	{ "pull-requests", 0, NULL, O_PR,
	  "pipeline register: pull/merge requests into a watched branch start runs" },
	{ "fork-secrets", 0, NULL, O_PR,
	  "pipeline register: give secrets to runs of pull requests from forks too" },
	{ "status-token", 0, "NAME", O_PR,
	  "pipeline register: the secret holding a forge API token; pull requests' runs "
	  "then send commit statuses" },
	/* Shares --repo's bit (register only); opt_set tells them apart. */
	{ "schedule", 0, "SPEC", O_REPO,
	  "pipeline register: start runs by the clock: 'CRON[; timezone=ZONE][; branch=B]"
	  "[; starting_deadline=DURATION][; param.NAME=VALUE]...' (repeatable)" },
	{ "help", 'h', NULL, O_HELP, "show this help" },
};

#define MAX_PARAMS KPL_MAX_PARAMS
#define MAX_KINDS 4
#define MAX_PIPELINES 64 /* SECRETS_MAX_PIPELINES */
#define MAX_BRANCHES 32  /* HOOKS_MAX_BRANCHES */
#define MAX_SCHEDULES 16 /* SCHED_MAX */

struct ctl {
	const char *server;
	int json;
	const char *params[MAX_PARAMS];
	size_t n_params;
	const char *idem;
	int watch;
	const char *state;
	const char *pipeline; /* the last --pipeline */
	const char *pipelines[MAX_PIPELINES]; /* every --pipeline (secret set) */
	size_t n_pipelines;
	const char *limit;
	const char *from_seq;
	int reject;
	const char *comment;
	const char *by;
	const char *from;
	const char *ca;
	const char *cert;
	const char *key;
	const char *token;
	const char *scope;
	const char *description;
	const char *stage;
	int follow;
	const char *to;
	int plain;
	const char *repo, *path, *secret, *ref, *sha;
	int pull_requests, fork_secrets;
	const char *status_token;
	const char *branches[MAX_BRANCHES];
	size_t n_branches;
	const char *schedules[MAX_SCHEDULES];
	size_t n_schedules;
	Kpl__V1__EventKind kinds[MAX_KINDS]; /* no repeats */
	size_t n_kinds;
	const char **pos; /* argc entries */
	int n_pos;
	unsigned seen; /* enum opt_bit of the options given */
	/* Where server and token came from, for messages ("--server",
	 * "$KPL_SERVER", "server in CONFIG", "the default"); static or leaked. */
	const char *server_from;
	const char *token_from;
	const struct command *cmd;
	struct kplc *c;
};

struct command {
	const char *name;
	const char *args; /* positional arguments, for usage */
	int min_args, max_args; /* max_args -1: no limit */
	unsigned opts;
	int (*run)(struct ctl *ctl);
	const char *help;
};

static int cmd_submit(struct ctl *ctl);
static int cmd_get(struct ctl *ctl);
static int cmd_list(struct ctl *ctl);
static int cmd_watch(struct ctl *ctl);
static int cmd_cancel(struct ctl *ctl);
static int cmd_retry(struct ctl *ctl);
static int cmd_approve(struct ctl *ctl);
static int cmd_lint(struct ctl *ctl);
static int cmd_events(struct ctl *ctl);
static int cmd_token(struct ctl *ctl);
static int cmd_audit(struct ctl *ctl);
static int cmd_logs(struct ctl *ctl);
static int cmd_secret(struct ctl *ctl);
static int cmd_releases(struct ctl *ctl);
static int cmd_rollback(struct ctl *ctl);
static int cmd_pipeline(struct ctl *ctl);
static int cmd_diff(struct ctl *ctl);

static const struct command commands[] = {
	{ "submit", "FILE", 1, 1, O_OUTPUT | O_PARAM | O_IDEM | O_WATCH | O_PLAIN,
	  cmd_submit,
	  "submit the pipeline in FILE (- for stdin), print the run id" },
	{ "get", "ID", 1, 1, O_OUTPUT, cmd_get,
	  "show a run: state, times, params, stages and outputs" },
	{ "list", "", 0, 0, O_OUTPUT | O_STATE | O_PIPELINE | O_LIMIT, cmd_list,
	  "list runs, newest first" },
	{ "watch", "ID", 1, 1, O_OUTPUT | O_FROM_SEQ | O_PLAIN, cmd_watch,
	  "follow a run to its end: a live table on a terminal, else event lines" },
	{ "logs", "ID", 1, 1, O_OUTPUT | O_STAGE | O_FOLLOW, cmd_logs,
	  "print a run's log lines (so far, or --follow to its end)" },
	{ "cancel", "ID", 1, 1, O_OUTPUT, cmd_cancel, "cancel a run" },
	{ "retry", "ID", 1, 1, O_OUTPUT | O_WATCH | O_PLAIN, cmd_retry,
	  "start a new attempt of a failed or cancelled run" },
	{ "approve", "ID STAGE", 2, 2, O_OUTPUT | O_REJECT | O_COMMENT | O_BY,
	  cmd_approve, "approve (or --reject) a stage waiting for approval" },
	{ "lint", "FILE...", 1, -1, O_OUTPUT, cmd_lint,
	  "check pipeline files, print every problem (offline when no kpld answers)" },
	{ "events", "", 0, 0, O_OUTPUT | O_FROM | O_PIPELINE | O_KIND,
	  cmd_events, "print the events of every run until interrupted" },
	{ "token", "create|list|revoke [ID]", 1, 2,
	  O_OUTPUT | O_SCOPE | O_PIPELINE | O_DESCRIPTION, cmd_token,
	  "make (print once), list or revoke API tokens (admin)" },
	{ "audit", "", 0, 0, O_OUTPUT | O_FROM | O_LIMIT, cmd_audit,
	  "print the audit log: approvals, cancels, token and secret changes (admin)" },
	{ "secret", "set|list|rm [NAME]", 1, 2, O_OUTPUT | O_PIPELINE, cmd_secret,
	  "set (value from stdin), list or remove secrets (admin)" },
	{ "releases", "DEPLOYMENT", 1, 1, O_OUTPUT | O_LIMIT, cmd_releases,
	  "list the releases of cluster/namespace/deployment, newest first" },
	{ "rollback", "DEPLOYMENT", 1, 1, O_OUTPUT | O_TO | O_WATCH | O_PLAIN,
	  cmd_rollback, "start a run that rolls cluster/namespace/deployment back" },
	{ "pipeline", "register|list|show|delete|run [NAME]", 1, 2,
	  O_OUTPUT | O_REPO | O_BRANCH | O_PATH | O_SECRET | O_REF | O_SHA | O_PARAM |
		  O_IDEM | O_WATCH | O_PLAIN | O_PR,
	  cmd_pipeline,
	  "registered pipelines: register (admin), list, show, delete (admin), or run one "
	  "at a ref or sha" },
	{ "diff", "RUN_A RUN_B", 2, 2, O_OUTPUT, cmd_diff,
	  "a unified diff of the pipeline files two runs ran (exit 1 if they differ)" },
};

static const char *prog = "kplctl";

static void usage(FILE *f)
{
	fprintf(f, "usage: %s [--server HOST:PORT] COMMAND [ARGS] [OPTIONS]\n\n"
		   "commands:\n", prog);
	for (size_t i = 0; i < KPL_ARRAY_SIZE(commands); i++) {
		const struct command *cmd = &commands[i];
		char head[64];

		snprintf(head, sizeof head, "%s %s", cmd->name, cmd->args);
		fprintf(f, "  %-16s %s\n", head, cmd->help);
		for (size_t j = 0; j < KPL_ARRAY_SIZE(opt_defs); j++) {
			const struct opt_def *o = &opt_defs[j];
			if (!(cmd->opts & o->bit))
				continue;
			fprintf(f, "  %16s   --%s%s%s\n", "", o->long_name,
				o->arg ? " " : "", o->arg ? o->arg : "");
		}
	}
	fprintf(f, "\noptions:\n");
	for (size_t j = 0; j < KPL_ARRAY_SIZE(opt_defs); j++) {
		const struct opt_def *o = &opt_defs[j];
		char head[64];

		snprintf(head, sizeof head, "%s%c%s--%s%s%s",
			 o->short_name ? "-" : "", o->short_name ? o->short_name : ' ',
			 o->short_name ? ", " : "  ", o->long_name,
			 o->arg ? " " : "", o->arg ? o->arg : "");
		fprintf(f, "  %-28s %s\n", o->short_name ? head : head + 2,
			o->help);
	}
	fprintf(f,
		"\nwatch output: \"[HH:MM:SS] STAGE STATE\" for a stage's state, "
		"\"[HH:MM:SS] STAGE | LINE\"\n"
		"for its stdout (\"!\" for stderr, \"*\" for kpl's own notes), "
		"\"[HH:MM:SS] == run STATE\"\n"
		"for the run; then a table of stages and the run's final state.\n"
		"On a terminal, a live table of the stages is drawn instead (--plain\n"
		"for the lines).\n"
		"events prints the same lines with \"GLOBAL_SEQ RUN_ID PIPELINE\" "
		"after the time.\n"
		"\nexit status:\n"
		"  0  success; for watch and --watch: the run SUCCEEDED; for\n"
		"     lint: every file is valid; for events: interrupted\n"
		"  1  the watched run ended FAILED or CANCELLED; for lint: a file\n"
		"     has an error; for diff: the two files differ\n"
		"  2  usage error (bad arguments, unreadable FILE, --ca, --cert\n"
		"     or --key file)\n"
		"  3  cannot reach kpld, or it returned an error (printed as\n"
		"     \"kplctl: COMMAND: STATUS_NAME: message\")\n"
		"  130  a watch (or logs --follow) interrupted by Ctrl-C\n");
}

static int usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int usage_error(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "%s: ", prog);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\ntry '%s --help'\n", prog);
	return EXIT_USAGE;
}

/*
 * After an UNAVAILABLE over TLS: what grpc's message means, in our terms.
 * A kpld with --client-ca that refuses our certificate (or the lack of one)
 * just closes the connection: with TLS 1.3 our side of the handshake is
 * already done, so grpc says only "Socket closed".
 */
static void tls_hint(const struct ctl *ctl, const char *msg)
{
	const char *why = NULL;

	if (strstr(msg, "certificate verify failed"))
		why = "kpld's certificate does not verify against --ca (is that the CA "
		      "that signed kpld's --tls-cert, for this address?)";
	else if (strstr(msg, "Socket closed") || strstr(msg, "andshake"))
		why = ctl->cert ? "kpld closed the connection; if it requires client "
				  "certificates (--client-ca), is --cert signed by that CA, "
				  "for client authentication?"
				: "kpld closed the connection; if it requires client "
				  "certificates (--client-ca), give --cert FILE --key FILE";
	else if (ctl->cert && strstr(msg, "empty address list"))
		why = "grpc could not use --cert and --key (does the key belong to "
		      "the certificate?)";
	if (why)
		fprintf(stderr, "%s: TLS to %s: %s\n", prog, ctl->server, why);
}

static int nobody_listening(const struct kplc_status *st);

/*
 * A newcomer's mistakes, said in kplctl's terms before grpc's: nothing
 * listening, a name that does not resolve, plain text to a TLS kpld and TLS
 * to a plain one, a token kpld does not know. NULL: grpc's words will do.
 */
static const char *rpc_hint(const struct ctl *ctl, const struct kplc_status *st,
			    char *buf, size_t size)
{
	if (st->code == KPLC_UNAVAILABLE && strstr(st->message, "DNS resolution failed")) {
		snprintf(buf, size, "cannot resolve the host of %s (%s): pass --server "
			 "HOST:PORT or KPL_SERVER", ctl->server, ctl->server_from);
	} else if (nobody_listening(st)) {
		snprintf(buf, size, "no kpld at %s (%s): start one with kpld, or pass "
			 "--server / KPL_SERVER", ctl->server, ctl->server_from);
	} else if (st->code == KPLC_UNAVAILABLE && ctl->ca &&
		   strstr(st->message, "wrong version number")) {
		snprintf(buf, size, "%s does not speak TLS: drop --ca (and KPL_CA, or ca in "
			 "the config file), or start kpld with --tls-cert and --tls-key",
			 ctl->server);
	} else if (st->code == KPLC_UNAVAILABLE && !ctl->ca &&
		   strstr(st->message, "Socket closed")) {
		snprintf(buf, size, "%s closed the connection: if kpld serves TLS "
			 "(--tls-cert), pass --ca FILE (or KPL_CA) with the CA that signed it",
			 ctl->server);
	} else if (st->code == KPLC_UNAUTHENTICATED && ctl->token &&
		   (strstr(st->message, "unknown token") || strstr(st->message, "revoked"))) {
		snprintf(buf, size, "kpld at %s does not accept the token from %s: ask an "
			 "admin for one (kplctl token create)", ctl->server, ctl->token_from);
	} else {
		return NULL;
	}
	return buf;
}

static int rpc_error(struct ctl *ctl, const struct kplc_status *st)
{
	char hint[600];
	const char *h = rpc_hint(ctl, st, hint, sizeof hint);

	if (h)
		fprintf(stderr, "%s: %s: %s: %s\n  (grpc: %s)\n", prog, ctl->cmd->name,
			kplc_status_name(st->code), h, st->message);
	else
		fprintf(stderr, "%s: %s: %s: %s\n", prog, ctl->cmd->name,
			kplc_status_name(st->code), st->message);
	if (!h && ctl->ca && st->code == KPLC_UNAVAILABLE)
		tls_hint(ctl, st->message);
	return EXIT_RPC;
}

/* --- Command line. --- */

static const struct opt_def *opt_find(const char *name, size_t len, char c)
{
	for (size_t i = 0; i < KPL_ARRAY_SIZE(opt_defs); i++) {
		const struct opt_def *o = &opt_defs[i];
		if (c ? o->short_name == c
		      : strlen(o->long_name) == len &&
				!strncmp(o->long_name, name, len))
			return o;
	}
	return NULL;
}

static int opt_set(struct ctl *ctl, const struct opt_def *o, const char *v)
{
	ctl->seen |= o->bit;
	switch (o->bit) {
	case O_SERVER: ctl->server = v; break;
	case O_OUTPUT:
		if (!strcmp(v, "json"))
			ctl->json = 1;
		else if (!strcmp(v, "text"))
			ctl->json = 0;
		else
			return usage_error("-o: unknown format \"%s\" (text or json)", v);
		break;
	case O_PARAM:
		if (!strchr(v, '=') || v[0] == '=')
			return usage_error("-p: \"%s\" is not KEY=VALUE", v);
		if (ctl->n_params == MAX_PARAMS)
			return usage_error("-p: more than %d params", MAX_PARAMS);
		ctl->params[ctl->n_params++] = v;
		break;
	case O_IDEM: ctl->idem = v; break;
	case O_REPO:
		if (strcmp(o->long_name, "schedule") != 0) {
			ctl->repo = v;
		} else if (ctl->n_schedules == MAX_SCHEDULES) {
			return usage_error("--schedule: more than %d", MAX_SCHEDULES);
		} else {
			ctl->schedules[ctl->n_schedules++] = v;
		}
		break;
	case O_PATH: ctl->path = v; break;
	case O_SECRET: ctl->secret = v; break;
	case O_REF: ctl->ref = v; break;
	case O_SHA: ctl->sha = v; break;
	case O_PR:
		if (!strcmp(o->long_name, "pull-requests"))
			ctl->pull_requests = 1;
		else if (!strcmp(o->long_name, "fork-secrets"))
			ctl->fork_secrets = 1;
		else
			ctl->status_token = v;
		break;
	case O_BRANCH:
		if (ctl->n_branches == MAX_BRANCHES)
			return usage_error("--branch: more than %d", MAX_BRANCHES);
		ctl->branches[ctl->n_branches++] = v;
		break;
	case O_WATCH: ctl->watch = 1; break;
	case O_STATE: ctl->state = v; break;
	case O_PIPELINE:
		if (ctl->n_pipelines == MAX_PIPELINES)
			return usage_error("--pipeline: more than %d", MAX_PIPELINES);
		ctl->pipeline = ctl->pipelines[ctl->n_pipelines++] = v;
		break;
	case O_LIMIT: ctl->limit = v; break;
	case O_FROM_SEQ: ctl->from_seq = v; break;
	case O_REJECT: ctl->reject = 1; break;
	case O_COMMENT: ctl->comment = v; break;
	case O_BY: ctl->by = v; break;
	case O_FROM: ctl->from = v; break;
	case O_CA: ctl->ca = v; break;
	case O_CERT: ctl->cert = v; break;
	case O_KEY: ctl->key = v; break;
	case O_TOKEN: ctl->token = v; break;
	case O_SCOPE: ctl->scope = v; break;
	case O_DESCRIPTION: ctl->description = v; break;
	case O_STAGE: ctl->stage = v; break;
	case O_FOLLOW: ctl->follow = 1; break;
	case O_TO: ctl->to = v; break;
	case O_PLAIN: ctl->plain = 1; break;
	case O_KIND: {
		static const struct {
			const char *name;
			Kpl__V1__EventKind kind;
		} kinds[] = {
			{ "run", KPL__V1__EVENT_KIND__EVENT_KIND_RUN_STATE },
			{ "stage", KPL__V1__EVENT_KIND__EVENT_KIND_STAGE_STATE },
			{ "log", KPL__V1__EVENT_KIND__EVENT_KIND_LOG },
			{ "audit", KPL__V1__EVENT_KIND__EVENT_KIND_AUDIT },
		};
		size_t k = 0;

		while (k < KPL_ARRAY_SIZE(kinds) && strcmp(kinds[k].name, v))
			k++;
		if (k == KPL_ARRAY_SIZE(kinds))
			return usage_error("--kind: unknown kind \"%s\" (run, stage, log or audit)", v);
		for (size_t i = 0; i < ctl->n_kinds; i++)
			if (ctl->kinds[i] == kinds[k].kind)
				return 0;
		ctl->kinds[ctl->n_kinds++] = kinds[k].kind;
		break;
	}
	case O_HELP: break;
	}
	return 0;
}

/* Options may come before or after the command; "--" ends them. */
static int parse_args(struct ctl *ctl, int argc, char **argv)
{
	int only_pos = 0, rc;

	for (int i = 1; i < argc; i++) {
		const char *a = argv[i], *v = NULL;
		const struct opt_def *o;

		if (only_pos || a[0] != '-' || !strcmp(a, "-")) {
			if (!ctl->cmd) {
				for (size_t k = 0; k < KPL_ARRAY_SIZE(commands); k++)
					if (!strcmp(commands[k].name, a))
						ctl->cmd = &commands[k];
				if (!ctl->cmd)
					return usage_error("unknown command \"%s\"", a);
			} else {
				ctl->pos[ctl->n_pos++] = a;
			}
			continue;
		}
		if (!strcmp(a, "--")) {
			only_pos = 1;
			continue;
		}
		if (a[1] == '-') {
			const char *eq = strchr(a + 2, '=');
			size_t len = eq ? (size_t)(eq - a - 2) : strlen(a + 2);

			o = opt_find(a + 2, len, 0);
			if (!o)
				return usage_error("unknown option \"%s\"", a);
			if (eq && !o->arg)
				return usage_error("--%s takes no value", o->long_name);
			if (eq)
				v = eq + 1;
		} else {
			o = opt_find(NULL, 0, a[1]);
			if (!o)
				return usage_error("unknown option \"%s\"", a);
			if (a[2] && !o->arg)
				return usage_error("-%c takes no value", a[1]);
			if (a[2])
				v = a + 2;
		}
		if (o->arg && !v) {
			if (i + 1 >= argc)
				return usage_error("--%s needs %s", o->long_name, o->arg);
			v = argv[++i];
		}
		rc = opt_set(ctl, o, v);
		if (rc)
			return rc;
	}
	return 0;
}

static int parse_u64(const char *s, uint64_t *out)
{
	char *end;

	if (!s || !isdigit((unsigned char)*s))
		return -1;
	errno = 0;
	*out = strtoull(s, &end, 10);
	return errno || *end ? -1 : 0;
}

/* Accepts "failed", "FAILED" and "RUN_STATE_FAILED". */
static int parse_run_state(const char *s)
{
	char name[64] = "RUN_STATE_";
	size_t off = strncasecmp(s, name, 10) ? 10 : 0;
	const ProtobufCEnumValue *v;

	if (strlen(s) + off >= sizeof name)
		return -1;
	for (size_t i = 0; s[i]; i++)
		name[off + i] = (char)toupper((unsigned char)s[i]);
	name[off + strlen(s)] = '\0';
	v = protobuf_c_enum_descriptor_get_value_by_name(
		&kpl__v1__run_state__descriptor, name);
	return v && v->value != 0 ? v->value : -1;
}

/* --- Formatting. --- */

/* "SUCCEEDED" for RUN_STATE_SUCCEEDED: the enum name after its prefix. */
static const char *enum_short(const ProtobufCEnumDescriptor *d, int value)
{
	const ProtobufCEnumValue *v = protobuf_c_enum_descriptor_get_value(d, value);
	const char *u;

	if (!v)
		return "?";
	u = strstr(v->name, "_STATE_");
	return u ? u + 7 : v->name;
}

static const char *run_state(int v)
{
	return enum_short(&kpl__v1__run_state__descriptor, v);
}

static const char *stage_state(int v)
{
	return enum_short(&kpl__v1__stage_state__descriptor, v);
}

static int ts_set(const Google__Protobuf__Timestamp *t)
{
	return t && (t->seconds || t->nanos);
}

static int64_t ts_ms(const Google__Protobuf__Timestamp *t)
{
	return t->seconds * 1000 + t->nanos / 1000000;
}

/* Local time with fmt (strftime), or "-" if t is unset. */
static const char *ts_local(const Google__Protobuf__Timestamp *t,
			    const char *fmt, char *buf, size_t size)
{
	time_t s;
	struct tm tm;

	if (!ts_set(t))
		return "-";
	s = (time_t)t->seconds;
	localtime_r(&s, &tm);
	strftime(buf, size, fmt, &tm);
	return buf;
}

/* "850ms", "12.3s", "2m05s", "1h02m"; "-" if it never started. */
static const char *duration(const Google__Protobuf__Timestamp *start,
			    const Google__Protobuf__Timestamp *end, char *buf,
			    size_t size)
{
	int64_t ms;

	if (!ts_set(start))
		return "-";
	ms = (ts_set(end) ? ts_ms(end) : kpl_now_ms()) - ts_ms(start);
	if (ms < 0)
		ms = 0;
	if (ms < 1000)
		snprintf(buf, size, "%dms", (int)ms);
	else if (ms < 60000)
		snprintf(buf, size, "%.1fs", ms / 1000.0);
	else if (ms < 3600000)
		snprintf(buf, size, "%dm%02ds", (int)(ms / 60000),
			 (int)(ms / 1000 % 60));
	else
		snprintf(buf, size, "%dh%02dm", (int)(ms / 3600000),
			 (int)(ms / 60000 % 60));
	return buf;
}

/* Map entries sorted by key, for stable output. */
struct kv {
	const char *key, *value;
};

static int kv_cmp(const void *a, const void *b)
{
	return strcmp(((const struct kv *)a)->key, ((const struct kv *)b)->key);
}

/* entries: a protobuf-c map field (array of key/value entry messages,
 * which all share the layout { base; char *key; char *value; }). */
static struct kv *kv_sorted(size_t n, void **entries)
{
	struct kv *kv = kpl_calloc(n ? n : 1, sizeof *kv);

	for (size_t i = 0; i < n; i++) {
		const Kpl__V1__Run__ParamsEntry *e = entries[i];
		kv[i].key = e->key;
		kv[i].value = e->value;
	}
	qsort(kv, n, sizeof *kv, kv_cmp);
	return kv;
}

/* --- JSON: the proto3 mapping, read off the protobuf-c descriptors. ---
 * Field names as in api/kpl.proto, enums as names, Timestamps as RFC 3339
 * UTC strings, maps as objects; every field is present, even at its default,
 * so scripts need no defaults of their own. */

static json_t *msg_to_json(const ProtobufCMessage *m);

static json_t *ts_to_json(const Google__Protobuf__Timestamp *t)
{
	char buf[64], frac[16] = "";
	time_t s;
	struct tm tm;

	if (!ts_set(t))
		return json_null();
	s = (time_t)t->seconds;
	gmtime_r(&s, &tm);
	if (t->nanos)
		snprintf(frac, sizeof frac, ".%03d", t->nanos / 1000000);
	strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &tm);
	return json_sprintf("%s%sZ", buf, frac);
}

static int is_map_entry(const ProtobufCMessageDescriptor *d)
{
	size_t n = strlen(d->name);

	return n > 5 && !strcmp(d->name + n - 5, "Entry") && d->n_fields == 2 &&
	       !strcmp(d->fields[0].name, "key") &&
	       !strcmp(d->fields[1].name, "value");
}

static size_t field_size(const ProtobufCFieldDescriptor *f)
{
	switch (f->type) {
	case PROTOBUF_C_TYPE_INT32: case PROTOBUF_C_TYPE_SINT32:
	case PROTOBUF_C_TYPE_SFIXED32: case PROTOBUF_C_TYPE_UINT32:
	case PROTOBUF_C_TYPE_FIXED32: return 4;
	case PROTOBUF_C_TYPE_INT64: case PROTOBUF_C_TYPE_SINT64:
	case PROTOBUF_C_TYPE_SFIXED64: case PROTOBUF_C_TYPE_UINT64:
	case PROTOBUF_C_TYPE_FIXED64: return 8;
	case PROTOBUF_C_TYPE_FLOAT: return sizeof(float);
	case PROTOBUF_C_TYPE_DOUBLE: return sizeof(double);
	case PROTOBUF_C_TYPE_BOOL: return sizeof(protobuf_c_boolean);
	case PROTOBUF_C_TYPE_ENUM: return sizeof(int);
	case PROTOBUF_C_TYPE_STRING: return sizeof(char *);
	case PROTOBUF_C_TYPE_BYTES: return sizeof(ProtobufCBinaryData);
	case PROTOBUF_C_TYPE_MESSAGE: return sizeof(ProtobufCMessage *);
	}
	BUG("field %s: unknown type %d", f->name, f->type);
}

static json_t *value_to_json(const ProtobufCFieldDescriptor *f, const void *p)
{
	switch (f->type) {
	case PROTOBUF_C_TYPE_INT32: case PROTOBUF_C_TYPE_SINT32:
	case PROTOBUF_C_TYPE_SFIXED32:
		return json_integer(*(const int32_t *)p);
	case PROTOBUF_C_TYPE_UINT32: case PROTOBUF_C_TYPE_FIXED32:
		return json_integer(*(const uint32_t *)p);
	case PROTOBUF_C_TYPE_INT64: case PROTOBUF_C_TYPE_SINT64:
	case PROTOBUF_C_TYPE_SFIXED64:
		return json_integer(*(const int64_t *)p);
	case PROTOBUF_C_TYPE_UINT64: case PROTOBUF_C_TYPE_FIXED64:
		/* Sequence numbers and the like stay far below 2^63. */
		return json_integer((json_int_t)*(const uint64_t *)p);
	case PROTOBUF_C_TYPE_FLOAT: return json_real(*(const float *)p);
	case PROTOBUF_C_TYPE_DOUBLE: return json_real(*(const double *)p);
	case PROTOBUF_C_TYPE_BOOL:
		return json_boolean(*(const protobuf_c_boolean *)p);
	case PROTOBUF_C_TYPE_ENUM: {
		const ProtobufCEnumValue *v = protobuf_c_enum_descriptor_get_value(
			f->descriptor, *(const int *)p);
		return v ? json_string(v->name) : json_integer(*(const int *)p);
	}
	case PROTOBUF_C_TYPE_STRING: {
		const char *s = *(char *const *)p;
		return json_string(s ? s : "");
	}
	case PROTOBUF_C_TYPE_BYTES: {
		/* kpl.proto has none; hex keeps this total. */
		const ProtobufCBinaryData *b = p;
		char *hex = kpl_malloc(b->len * 2 + 1);
		json_t *j;
		for (size_t i = 0; i < b->len; i++)
			sprintf(hex + 2 * i, "%02x", b->data[i]);
		hex[b->len * 2] = '\0';
		j = json_string(hex);
		free(hex);
		return j;
	}
	case PROTOBUF_C_TYPE_MESSAGE: {
		const ProtobufCMessage *m = *(ProtobufCMessage *const *)p;
		if (!m)
			return json_null();
		if (m->descriptor == &google__protobuf__timestamp__descriptor)
			return ts_to_json((const Google__Protobuf__Timestamp *)m);
		return msg_to_json(m);
	}
	}
	BUG("field %s: unknown type %d", f->name, f->type);
}

static json_t *msg_to_json(const ProtobufCMessage *m)
{
	const ProtobufCMessageDescriptor *d = m->descriptor;
	json_t *obj = json_object();

	for (unsigned i = 0; i < d->n_fields; i++) {
		const ProtobufCFieldDescriptor *f = &d->fields[i];
		const char *base = (const char *)m;
		const void *p = base + f->offset;
		json_t *j;

		if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF &&
		    *(const uint32_t *)(base + f->quantifier_offset) != f->id)
			continue;
		if (f->label != PROTOBUF_C_LABEL_REPEATED) {
			j = value_to_json(f, p);
		} else if (f->type == PROTOBUF_C_TYPE_MESSAGE &&
			   is_map_entry(f->descriptor)) {
			size_t n = *(const size_t *)(base + f->quantifier_offset);
			ProtobufCMessage *const *e = *(ProtobufCMessage *const *const *)p;
			const ProtobufCMessageDescriptor *ed = f->descriptor;
			j = json_object();
			for (size_t k = 0; k < n; k++) {
				const char *eb = (const char *)e[k];
				json_t *key = value_to_json(&ed->fields[0],
							    eb + ed->fields[0].offset);
				json_t *val = value_to_json(&ed->fields[1],
							    eb + ed->fields[1].offset);
				const char *ks = json_is_string(key)
						       ? json_string_value(key) : "";
				json_object_set_new(j, ks, val);
				json_decref(key);
			}
		} else {
			size_t n = *(const size_t *)(base + f->quantifier_offset);
			const char *arr = *(const char *const *)p;
			j = json_array();
			for (size_t k = 0; k < n; k++)
				json_array_append_new(
					j, value_to_json(f, arr + k * field_size(f)));
		}
		json_object_set_new(obj, f->name, j);
	}
	return obj;
}

static void print_json(json_t *j)
{
	json_dumpf(j, stdout, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
	fputc('\n', stdout);
	json_decref(j);
}

/* One JSON object on one line (JSON Lines), flushed: for streams. */
static void print_json_line(json_t *j)
{
	json_dumpf(j, stdout, JSON_COMPACT | JSON_PRESERVE_ORDER);
	fputc('\n', stdout);
	fflush(stdout);
	json_decref(j);
}

/* --- Text output. --- */

/* printf for table rows, without the trailing blanks an empty last
 * column would leave. */
static void row(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void row(const char *fmt, ...)
{
	va_list ap;
	char *buf;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(NULL, 0, fmt, ap);
	va_end(ap);
	buf = kpl_malloc((size_t)n + 1);
	va_start(ap, fmt);
	vsnprintf(buf, (size_t)n + 1, fmt, ap);
	va_end(ap);
	while (n > 0 && buf[n - 1] == ' ')
		n--;
	printf("%.*s\n", n, buf);
	free(buf);
}

static void print_stages_table(const Kpl__V1__Run *r, int with_kind)
{
	int w = 5;
	char b[32];

	for (size_t i = 0; i < r->n_stages; i++)
		if ((int)strlen(r->stages[i]->name) > w)
			w = (int)strlen(r->stages[i]->name);
	if (with_kind)
		row("  %-*s  %-10s %-10s %-7s  %-8s  %s", w, "STAGE", "KIND",
		       "STATE", "ATTEMPT", "DURATION", "MESSAGE");
	else
		row("%-*s  %-10s %-7s  %-8s  %s", w, "STAGE", "STATE",
		       "ATTEMPT", "DURATION", "MESSAGE");
	for (size_t i = 0; i < r->n_stages; i++) {
		const Kpl__V1__StageStatus *s = r->stages[i];
		const char *d = duration(s->started_at, s->finished_at, b, sizeof b);

		if (with_kind)
			row("  %-*s  %-10s %-10s %-7u  %-8s  %s", w, s->name,
			       s->kind, stage_state(s->state), s->attempt, d,
			       s->message);
		else
			row("%-*s  %-10s %-7u  %-8s  %s", w, s->name,
			       stage_state(s->state), s->attempt, d, s->message);
	}
}

static void print_run(const Kpl__V1__Run *r)
{
	char b[64];
	struct kv *kv;

	printf("id:        %s\n", r->id);
	printf("pipeline:  %s\n", r->pipeline_name);
	printf("state:     %s\n", run_state(r->state));
	if (r->attempt > 1)
		printf("attempt:   %u\n", r->attempt);
	if (*r->concurrency_group)
		printf("group:     %s\n", r->concurrency_group);
	if (r->source) {
		const Kpl__V1__PipelineSource *so = r->source;
		if (*so->repo)
			printf("repo:      %s\n", so->repo);
		if (*so->commit)
			printf("commit:    %s\n", so->commit);
		if (*so->ref)
			printf("ref:       %s\n", so->ref);
		if (*so->path)
			printf("path:      %s\n", so->path);
		if (*so->sha256)
			printf("sha256:    %s\n", so->sha256);
		for (size_t i = 0; i < so->n_templates; i++)
			printf("template:  %s %s\n", so->templates[i]->path, so->templates[i]->sha256);
	}
	if (*r->message)
		printf("message:   %s\n", r->message);
	printf("created:   %s\n", ts_local(r->created_at, "%Y-%m-%d %H:%M:%S", b, sizeof b));
	printf("started:   %s\n", ts_local(r->started_at, "%Y-%m-%d %H:%M:%S", b, sizeof b));
	printf("finished:  %s\n", ts_local(r->finished_at, "%Y-%m-%d %H:%M:%S", b, sizeof b));
	printf("duration:  %s\n", duration(r->started_at, r->finished_at, b, sizeof b));
	if (*r->idempotency_key)
		printf("idempotency key: %s\n", r->idempotency_key);
	printf("last seq:  %llu\n", (unsigned long long)r->last_seq);
	if (r->n_params) {
		printf("params:\n");
		kv = kv_sorted(r->n_params, (void **)r->params);
		for (size_t i = 0; i < r->n_params; i++)
			printf("  %s=%s\n", kv[i].key, kv[i].value);
		free(kv);
	}
	if (r->n_stages) {
		printf("stages:\n");
		print_stages_table(r, 1);
	}
	for (size_t i = 0, first = 1; i < r->n_stages; i++) {
		const Kpl__V1__StageStatus *s = r->stages[i];
		if (!s->n_outputs)
			continue;
		if (first)
			printf("outputs:\n");
		first = 0;
		kv = kv_sorted(s->n_outputs, (void **)s->outputs);
		for (size_t k = 0; k < s->n_outputs; k++)
			printf("  %s.%s=%s\n", s->name, kv[k].key, kv[k].value);
		free(kv);
	}
}

/* --- Commands. --- */

static int connect_server(struct ctl *ctl)
{
	struct kpl_err err = { 0 };
	struct kplc_options o = { .tls_ca_file = ctl->ca, .tls_cert_file = ctl->cert,
				  .tls_key_file = ctl->key, .token = ctl->token };

	if (kplc_connect_opts(ctl->server, &o, &ctl->c, &err) < 0) {
		fprintf(stderr, "%s: %s: %s\n", prog, ctl->server, err.msg);
		/* An unreadable CA, certificate or key file is ours to fix,
		 * like any unreadable FILE; grpc refusing is not. */
		return err.code == KPL_EIO || err.code == KPL_EINVAL ? EXIT_USAGE : EXIT_RPC;
	}
	return 0;
}

/* Reads all of path ("-" is stdin), at most KPL_MAX_PIPELINE_BYTES. */
static char *read_file(const char *path)
{
	FILE *f = strcmp(path, "-") ? fopen(path, "rb") : stdin;
	size_t len = 0, cap = 0, n;
	char *buf = NULL;

	if (!f) {
		fprintf(stderr, "%s: %s: %s\n", prog, path, strerror(errno));
		return NULL;
	}
	do {
		if (cap - len < 4096)
			buf = kpl_realloc(buf, cap = cap * 2 + 4096);
		n = fread(buf + len, 1, cap - len - 1, f);
		len += n;
	} while (n > 0 && len <= KPL_MAX_PIPELINE_BYTES);
	if (ferror(f) || len > KPL_MAX_PIPELINE_BYTES) {
		fprintf(stderr, "%s: %s: %s\n", prog, path,
			ferror(f) ? strerror(errno) : "over 1 MiB");
		free(buf);
		buf = NULL;
	} else {
		buf[len] = '\0';
	}
	if (f != stdin)
		fclose(f);
	return buf;
}

/*
 * The stage templates a pipeline file's `uses:` name, read from beside it
 * (relative to its directory; "-" is read from the current one): what
 * submit and lint send as `files`. A template that cannot be read is left
 * out, for the parser to say "no such file" with the line that names it.
 */
struct tfiles {
	struct pl_file *v; /* path and text owned */
	size_t n;
	char *dir;         /* the pipeline file's directory, "" for "." */
};

static void tfiles_load(struct tfiles *tf, const char *pipeline_path, const char *text)
{
	char **paths = NULL;
	size_t n = 0;
	const char *slash = strcmp(pipeline_path, "-") ? strrchr(pipeline_path, '/') : NULL;

	memset(tf, 0, sizeof *tf);
	tf->dir = slash ? kpl_strndup(pipeline_path, (size_t)(slash - pipeline_path) + 1)
			: kpl_strdup("");
	reuse_list_paths(text, strlen(text), &paths, &n);
	tf->v = kpl_calloc(n + 1, sizeof *tf->v);
	for (size_t i = 0; i < n; i++) {
		char *full = kpl_asprintf("%s%s", tf->dir, paths[i]);
		FILE *f = fopen(full, "rb");
		char *buf = kpl_malloc(REUSE_MAX_FILE_BYTES + 2);
		size_t len = f ? fread(buf, 1, REUSE_MAX_FILE_BYTES + 1, f) : 0;

		if (f && !ferror(f) && !memchr(buf, '\0', len)) {
			buf[len] = '\0';
			tf->v[tf->n].path = paths[i];
			tf->v[tf->n].text = buf;
			tf->v[tf->n++].len = len;
			paths[i] = NULL;
			buf = NULL;
		}
		if (f)
			fclose(f);
		free(buf);
		free(full);
		free(paths[i]);
	}
	free(paths);
}

static void tfiles_release(struct tfiles *tf)
{
	for (size_t i = 0; i < tf->n; i++) {
		free((char *)tf->v[i].path);
		free((char *)tf->v[i].text);
	}
	free(tf->v);
	free(tf->dir);
}

/* Set by the handlers of the signals that end a watch (SIGINT; and on a
 * terminal SIGTERM and SIGHUP, so the cursor comes back) and SIGWINCH. */
static volatile sig_atomic_t interrupted;
static volatile sig_atomic_t resized;

static void on_sigint(int sig)
{
	(void)sig;
	interrupted = 1;
}

static void on_sigwinch(int sig)
{
	(void)sig;
	resized = 1;
}

static void handle(int sig, void (*fn)(int))
{
	struct sigaction sa;

	memset(&sa, 0, sizeof sa);
	sa.sa_handler = fn;
	sa.sa_flags = SA_RESTART;
	sigemptyset(&sa.sa_mask);
	sigaction(sig, &sa, NULL);
}

struct watch_state {
	int width;
};

static char log_mark(const Kpl__V1__RunEvent *ev)
{
	return ev->stream == KPL__V1__LOG_STREAM__LOG_STREAM_STDERR   ? '!'
	       : ev->stream == KPL__V1__LOG_STREAM__LOG_STREAM_SYSTEM ? '*'
								      : '|';
}

/* A watch line; with global, the global seq, run id and pipeline name
 * come after the time (the events command). */
static void print_event(const Kpl__V1__RunEvent *ev, int width, int global)
{
	char t[16];
	const char *tm = ts_local(ev->time, "%H:%M:%S", t, sizeof t);

	printf("[%s] ", tm);
	if (global)
		printf("%llu %s %s ", (unsigned long long)ev->global_seq,
		       ev->run_id, *ev->pipeline_name ? ev->pipeline_name : "-");
	switch (ev->kind) {
	case KPL__V1__EVENT_KIND__EVENT_KIND_STAGE_STATE:
		printf("%-*s %s", width, ev->stage,
		       stage_state(ev->stage_state));
		if (ev->attempt > 1)
			printf(" (attempt %u)", ev->attempt);
		if (*ev->message)
			printf("  %s", ev->message);
		putchar('\n');
		break;
	case KPL__V1__EVENT_KIND__EVENT_KIND_LOG:
		printf("%-*s %c %s\n", width, ev->stage, log_mark(ev), ev->message);
		break;
	case KPL__V1__EVENT_KIND__EVENT_KIND_RUN_STATE:
		printf("== run %s%s%s\n", run_state(ev->run_state),
		       *ev->message ? ": " : "", ev->message);
		break;
	case KPL__V1__EVENT_KIND__EVENT_KIND_AUDIT:
		printf("== audit: %s\n", ev->message);
		break;
	default:
		/* A kind newer than this kplctl: show it rather than drop it. */
		printf("%-*s ? %s\n", width, ev->stage, ev->message);
		break;
	}
	fflush(stdout);
}

static int on_event(const Kpl__V1__RunEvent *ev, void *data)
{
	struct watch_state *ws = data;

	print_event(ev, ws->width, 0);
	return 0;
}

static int on_event_json(const Kpl__V1__RunEvent *ev, void *data)
{
	(void)data;
	print_json_line(msg_to_json(&ev->base));
	return 0;
}

/* --- The live table on a terminal (the model is kplctl_live.c). --- */

/* A live table is drawn when stdout is a terminal that can move its
 * cursor, unless the user asked for lines or JSON. */
static int live_wanted(const struct ctl *ctl)
{
	const char *term = getenv("TERM");

	return !ctl->json && !ctl->plain && isatty(STDOUT_FILENO) && term &&
	       *term && strcmp(term, "dumb") != 0;
}

struct tty {
	struct live *l;
	int lines;        /* how many lines of the last frame are on screen */
	int64_t drawn_ms; /* when */
};

/*
 * Draws the frame over the last one: up to its first line, each line
 * cleared to its end, then everything below cleared (the new frame may be
 * shorter). Lines never reach the last column, so none wraps and the count
 * of lines to go up stays true. A resize may have rewrapped the old frame
 * in ways we cannot count, so then the screen is cleared instead.
 */
static void tty_draw(struct tty *t)
{
	struct winsize wsz;
	int cols = 80, rows = 24, n;
	char **lines;
	size_t len = 0, cap = 4096;
	char *buf = kpl_malloc(cap);

	if (ioctl(STDOUT_FILENO, TIOCGWINSZ, &wsz) == 0 && wsz.ws_col > 0) {
		cols = wsz.ws_col;
		rows = wsz.ws_row > 0 ? wsz.ws_row : rows;
	}
	t->drawn_ms = kpl_now_ms();
	lines = live_frame(t->l, t->drawn_ms, cols, rows, &n);
#define PUT(...)                                                               \
	do {                                                                   \
		int k_ = snprintf(buf + len, cap - len, __VA_ARGS__);          \
		if ((size_t)k_ >= cap - len) {                                 \
			cap = (cap + (size_t)k_) * 2;                          \
			buf = kpl_realloc(buf, cap);                           \
			k_ = snprintf(buf + len, cap - len, __VA_ARGS__);      \
		}                                                              \
		len += (size_t)k_;                                             \
	} while (0)
	if (resized) {
		resized = 0;
		PUT("\033[H\033[2J");
	} else if (t->lines > 0) {
		PUT("\r\033[%dA", t->lines);
	}
	for (int i = 0; i < n; i++)
		PUT("%s\033[K\n", lines[i]);
	PUT("\033[J");
#undef PUT
	fwrite(buf, 1, len, stdout);
	fflush(stdout);
	t->lines = n;
	free(buf);
	live_lines_free(lines);
}

static int on_event_live(const Kpl__V1__RunEvent *ev, void *data)
{
	struct tty *t = data;

	live_event(t->l, ev);
	/* A burst of stored events draws ten frames a second, not one an
	 * event; the idle tick draws what is left. */
	if (kpl_now_ms() - t->drawn_ms >= 100)
		tty_draw(t);
	return 0;
}

static void on_idle_live(void *data)
{
	tty_draw(data);
}

/* The last frame, and the cursor back. */
static void tty_end(struct tty *t)
{
	tty_draw(t);
	fputs("\033[?25h", stdout);
	fflush(stdout);
	live_free(t->l);
	t->l = NULL;
}

/* Follows run id to its end; the exit code says how it ended. */
static int follow(struct ctl *ctl, const char *id, uint64_t from_seq)
{
	struct watch_state ws = { .width = 10 };
	struct kplc_follow_options fo = { 0 };
	struct kplc_status st;
	struct tty t = { 0 };
	Kpl__V1__Run *r = NULL;
	kplc_event_fn fn = ctl->json ? on_event_json : on_event;
	void *data = &ws;
	int rc;

	/* The run's stages first, to align the stage column (or to draw the
	 * table before the first event). */
	if (kplc_get_run(ctl->c, id, &r, &st) < 0)
		return rpc_error(ctl, &st);
	for (size_t i = 0; i < r->n_stages; i++)
		if ((int)strlen(r->stages[i]->name) > ws.width)
			ws.width = (int)strlen(r->stages[i]->name);
	if (live_wanted(ctl)) {
		const char *cs;

		setlocale(LC_CTYPE, "");
		cs = nl_langinfo(CODESET);
		t.l = live_new(r, cs && !strcmp(cs, "UTF-8"));
		handle(SIGINT, on_sigint);
		handle(SIGTERM, on_sigint);
		handle(SIGHUP, on_sigint);
		handle(SIGWINCH, on_sigwinch);
		fo.stop = &interrupted;
		fo.idle = on_idle_live;
		fo.idle_data = &t;
		fn = on_event_live;
		data = &t;
		fputs("\033[?25l", stdout); /* no cursor blinking over the table */
		tty_draw(&t);
	}
	kplc_msg_free(r);
	r = NULL;

	rc = kplc_follow_run(ctl->c, id, from_seq, &fo, fn, data, NULL, &st);
	if (rc < 0) {
		if (t.l)
			tty_end(&t);
		if (rc == KPL_ECANCELLED && interrupted) {
			fprintf(stderr, "%s: %s: interrupted; run %s goes on\n", prog,
				ctl->cmd->name, id);
			return EXIT_INTERRUPTED;
		}
		return rpc_error(ctl, &st);
	}

	if (kplc_get_run(ctl->c, id, &r, &st) < 0) {
		if (t.l)
			tty_end(&t);
		return rpc_error(ctl, &st);
	}
	if (t.l) {
		/* GetRun has the last word; the footer is the final line. */
		live_set_run(t.l, r);
		tty_end(&t);
	} else if (!ctl->json) {
		printf("\n");
		print_stages_table(r, 0);
		printf("\nrun %s %s", r->id, run_state(r->state));
		if (r->attempt > 1)
			printf(" (attempt %u)", r->attempt);
		printf("%s%s\n", *r->message ? ": " : "", r->message);
	}
	switch (r->state) {
	case KPL__V1__RUN_STATE__RUN_STATE_SUCCEEDED:
		rc = EXIT_OK;
		break;
	case KPL__V1__RUN_STATE__RUN_STATE_FAILED:
	case KPL__V1__RUN_STATE__RUN_STATE_CANCELLED:
		rc = EXIT_RUN_FAILED;
		break;
	default:
		fprintf(stderr, "%s: %s: the event stream ended while run %s is %s\n",
			prog, ctl->cmd->name, id, run_state(r->state));
		rc = EXIT_RPC;
		break;
	}
	kplc_msg_free(r);
	return rc;
}

/* The run a command started: its JSON (one line when events follow, so
 * the whole output is JSON Lines) or its id, then a watch if asked. */
static int started(struct ctl *ctl, const Kpl__V1__Run *r, uint64_t from_seq)
{
	if (ctl->json && ctl->watch)
		print_json_line(msg_to_json(&r->base));
	else if (ctl->json)
		print_json(msg_to_json(&r->base));
	else
		printf("%s\n", r->id);
	fflush(stdout);
	return ctl->watch ? follow(ctl, r->id, from_seq) : EXIT_OK;
}

static int cmd_submit(struct ctl *ctl)
{
	Kpl__V1__SubmitRunRequest req = KPL__V1__SUBMIT_RUN_REQUEST__INIT;
	Kpl__V1__SubmitRunRequest__ParamsEntry *entries = NULL, **ptrs = NULL;
	struct kplc_status st;
	Kpl__V1__Run *r = NULL;
	char *text, *kv = NULL;
	int rc;

	struct tfiles tf;
	Kpl__V1__SubmitRunRequest__FilesEntry *fe = NULL, **fp = NULL;

	text = read_file(ctl->pos[0]);
	if (!text)
		return EXIT_USAGE;
	req.pipeline = text;
	req.idempotency_key = ctl->idem ? (char *)ctl->idem : "";
	tfiles_load(&tf, ctl->pos[0], text);
	fe = kpl_calloc(tf.n + 1, sizeof *fe);
	fp = kpl_calloc(tf.n + 1, sizeof *fp);
	for (size_t i = 0; i < tf.n; i++) {
		kpl__v1__submit_run_request__files_entry__init(&fe[i]);
		fe[i].key = (char *)tf.v[i].path;
		fe[i].value = (char *)tf.v[i].text;
		fp[i] = &fe[i];
	}
	req.n_files = tf.n;
	req.files = fp;
	if (ctl->n_params) {
		size_t total = 0, off = 0;
		for (size_t i = 0; i < ctl->n_params; i++)
			total += strlen(ctl->params[i]) + 1;
		kv = kpl_malloc(total);
		entries = kpl_calloc(ctl->n_params, sizeof *entries);
		ptrs = kpl_calloc(ctl->n_params, sizeof *ptrs);
		for (size_t i = 0; i < ctl->n_params; i++) {
			char *k = kv + off, *eq;
			strcpy(k, ctl->params[i]);
			off += strlen(k) + 1;
			eq = strchr(k, '=');
			*eq = '\0';
			kpl__v1__submit_run_request__params_entry__init(&entries[i]);
			entries[i].key = k;
			entries[i].value = eq + 1;
			ptrs[i] = &entries[i];
		}
		req.n_params = ctl->n_params;
		req.params = ptrs;
	}

	rc = kplc_submit_run(ctl->c, &req, &r, &st);
	if (rc < 0) {
		rc = rpc_error(ctl, &st);
		goto out;
	}
	rc = started(ctl, r, 1);

out:
	kplc_msg_free(r);
	free(text);
	free(kv);
	free(entries);
	free(ptrs);
	free(fe);
	free(fp);
	tfiles_release(&tf);
	return rc;
}

static int cmd_get(struct ctl *ctl)
{
	struct kplc_status st;
	Kpl__V1__Run *r;

	if (kplc_get_run(ctl->c, ctl->pos[0], &r, &st) < 0)
		return rpc_error(ctl, &st);
	if (ctl->json)
		print_json(msg_to_json(&r->base));
	else
		print_run(r);
	kplc_msg_free(r);
	return EXIT_OK;
}

static int cmd_cancel(struct ctl *ctl)
{
	struct kplc_status st;
	Kpl__V1__Run *r;

	if (kplc_cancel_run(ctl->c, ctl->pos[0], &r, &st) < 0)
		return rpc_error(ctl, &st);
	if (ctl->json)
		print_json(msg_to_json(&r->base));
	else
		printf("%s %s\n", r->id, run_state(r->state));
	kplc_msg_free(r);
	return EXIT_OK;
}

static int cmd_list(struct ctl *ctl)
{
	Kpl__V1__ListRunsRequest req = KPL__V1__LIST_RUNS_REQUEST__INIT;
	Kpl__V1__ListRunsResponse *resp = NULL;
	uint64_t limit = 50;
	struct kplc_status st;
	json_t *runs = ctl->json ? json_array() : NULL;
	char *token = NULL;
	int rc = EXIT_OK, header = 0;

	if (ctl->limit && (parse_u64(ctl->limit, &limit) || limit == 0 ||
			   limit > 100000)) {
		json_decref(runs);
		return usage_error("--limit: \"%s\" is not a number from 1 to 100000",
				   ctl->limit);
	}
	if (ctl->state) {
		int s = parse_run_state(ctl->state);
		if (s < 0) {
			json_decref(runs);
			return usage_error("--state: unknown run state \"%s\"",
					   ctl->state);
		}
		req.state = s;
	}
	req.pipeline_name = ctl->pipeline ? (char *)ctl->pipeline : "";

	/* The server caps a page at 500: page until limit runs are shown. */
	while (limit > 0) {
		req.page_size = limit > 500 ? 500 : (int32_t)limit;
		req.page_token = token ? token : "";
		if (kplc_list_runs(ctl->c, &req, &resp, &st) < 0) {
			rc = rpc_error(ctl, &st);
			break;
		}
		for (size_t i = 0; i < resp->n_runs && limit > 0; i++, limit--) {
			const Kpl__V1__Run *r = resp->runs[i];
			char c[32], d[32];

			if (runs) {
				json_array_append_new(runs, msg_to_json(&r->base));
				continue;
			}
			if (!header++)
				row("%-24s %-20s %-10s %-19s  %s", "ID",
				       "PIPELINE", "STATE", "CREATED", "DURATION");
			row("%-24s %-20s %-10s %-19s  %s", r->id,
			       r->pipeline_name, run_state(r->state),
			       ts_local(r->created_at, "%Y-%m-%d %H:%M:%S", c, sizeof c),
			       duration(r->started_at, r->finished_at, d, sizeof d));
		}
		free(token);
		token = *resp->next_page_token && resp->n_runs
				? kpl_strdup(resp->next_page_token) : NULL;
		kplc_msg_free(resp);
		resp = NULL;
		if (!token)
			break;
	}
	if (runs && rc == EXIT_OK) {
		json_t *o = json_object();
		json_object_set_new(o, "runs", runs);
		print_json(o);
	} else {
		json_decref(runs);
		if (rc == EXIT_OK && !header)
			fprintf(stderr, "no runs\n");
	}
	free(token);
	return rc;
}

static int cmd_watch(struct ctl *ctl)
{
	uint64_t from = 1;

	if (ctl->from_seq && parse_u64(ctl->from_seq, &from))
		return usage_error("--from-seq: \"%s\" is not a number",
				   ctl->from_seq);
	return follow(ctl, ctl->pos[0], from);
}

static int cmd_retry(struct ctl *ctl)
{
	struct kplc_status st;
	Kpl__V1__Run *r = NULL;
	uint64_t before = 0;
	int rc;

	/* The old attempt's events end at its last_seq and the run gets none
	 * until the retry: following from the next one shows all of the new
	 * attempt, whatever the RetryRun reply already counts. */
	if (ctl->watch) {
		if (kplc_get_run(ctl->c, ctl->pos[0], &r, &st) < 0)
			return rpc_error(ctl, &st);
		before = r->last_seq;
		kplc_msg_free(r);
	}
	if (kplc_retry_run(ctl->c, ctl->pos[0], &r, &st) < 0)
		return rpc_error(ctl, &st);
	if (ctl->json && ctl->watch)
		print_json_line(msg_to_json(&r->base));
	else if (ctl->json)
		print_json(msg_to_json(&r->base));
	else
		printf("%s attempt %u\n", r->id, r->attempt);
	fflush(stdout);
	rc = ctl->watch ? follow(ctl, r->id, before + 1) : EXIT_OK;
	kplc_msg_free(r);
	return rc;
}

/* $USER@host, for the record of who approved. */
static char *default_by(void)
{
	const char *user = getenv("USER");
	char host[256];

	if (!user || !*user) {
		struct passwd *pw = getpwuid(getuid());
		user = pw ? pw->pw_name : "unknown";
	}
	if (gethostname(host, sizeof host) != 0)
		strcpy(host, "unknown");
	host[sizeof host - 1] = '\0';
	return kpl_asprintf("%s@%s", user, host);
}

static int cmd_approve(struct ctl *ctl)
{
	Kpl__V1__ApproveStageRequest req = KPL__V1__APPROVE_STAGE_REQUEST__INIT;
	struct kplc_status st;
	Kpl__V1__Run *r;
	char *by = ctl->by ? NULL : default_by();
	int rc;

	req.run_id = (char *)ctl->pos[0];
	req.stage = (char *)ctl->pos[1];
	req.approve = !ctl->reject;
	req.comment = ctl->comment ? (char *)ctl->comment : "";
	req.by = by ? by : (char *)ctl->by;
	rc = kplc_approve_stage(ctl->c, &req, &r, &st);
	free(by);
	if (rc < 0)
		return rpc_error(ctl, &st);
	if (ctl->json)
		print_json(msg_to_json(&r->base));
	else
		printf("%s %s\n", r->id, run_state(r->state));
	kplc_msg_free(r);
	return EXIT_OK;
}

/* The stage kinds call back into engine/engine.c (stage_http, ...); a
 * reference to one of its functions pulls it in ahead of them, as the
 * pipeline fuzzer does. lint never starts an engine. */
void *const kplctl_engine_ref = (void *)stage_http;

/*
 * ValidatePipeline without a kpld: the same parser and stage kinds, so the
 * same diagnostics, but none of the names only the daemon config declares
 * (the caller says so). *out is new (lint_offline_free it).
 */
static void lint_offline(const char *text, const struct tfiles *tf,
			 Kpl__V1__ValidatePipelineResponse **out)
{
	struct pl_files files = { tf->v, tf->n };
	Kpl__V1__ValidatePipelineResponse *resp = kpl_calloc(1, sizeof *resp);
	struct pl_diag *pd = NULL;
	struct pipeline *pl = NULL;
	struct kpl_err err = { 0 };
	const struct pl_kind *kinds;
	size_t n = 0, n_kinds;

	kpl__v1__validate_pipeline_response__init(resp);
	kinds = stage_kinds_for_parser(&n_kinds);
	pipeline_validate_files(text, strlen(text), "pipeline", &files, kinds, n_kinds, &pd, &n);
	resp->diagnostics = kpl_calloc(n ? n : 1, sizeof *resp->diagnostics);
	for (size_t i = 0; i < n; i++) {
		Kpl__V1__Diagnostic *d = kpl_calloc(1, sizeof *d);
		kpl__v1__diagnostic__init(d);
		d->line = pd[i].line;
		d->column = pd[i].col;
		d->path = kpl_strdup(pd[i].path ? pd[i].path : "");
		d->message = kpl_strdup(pd[i].message ? pd[i].message : "");
		d->severity = KPL__V1__SEVERITY__SEVERITY_ERROR;
		d->file = kpl_strdup(pd[i].file ? pd[i].file : "");
		d->used_line = pd[i].use_line;
		d->used_column = pd[i].use_col;
		resp->diagnostics[resp->n_diagnostics++] = d;
	}
	if (!n && pipeline_parse_files(text, strlen(text), "pipeline", &files, kinds, n_kinds, &pl,
				       &err) == 0) {
		bool any = false;
		resp->pipeline_name = kpl_strdup(pl->name);
		for (size_t i = 0; i < pl->n_stages; i++)
			any |= pl->stages[i].matrix || pl->stages[i].uses;
		resp->stages = kpl_calloc(pl->n_stages + 1, sizeof *resp->stages);
		for (size_t i = 0; any && i < pl->n_stages; i++) {
			const struct pl_stage *st = &pl->stages[i];
			Kpl__V1__PlannedStage *p = kpl_calloc(1, sizeof *p);
			kpl__v1__planned_stage__init(p);
			p->name = kpl_strdup(st->name);
			p->kind = kpl_strdup(st->kind);
			p->needs = kpl_calloc(st->n_needs + 1, sizeof *p->needs);
			for (size_t j = 0; j < st->n_needs; j++)
				p->needs[j] = kpl_strdup(st->needs[j]);
			p->n_needs = st->n_needs;
			p->matrix = kpl_strdup(st->matrix ? st->matrix : "");
			p->max_parallel = st->max_parallel;
			p->uses = kpl_strdup(st->uses ? st->uses : "");
			p->finally = st->is_finally;
			resp->stages[resp->n_stages++] = p;
		}
		pipeline_free(pl);
	}
	resp->valid = n == 0;
	pl_diags_free(pd, n);
	*out = resp;
}

static void lint_offline_free(Kpl__V1__ValidatePipelineResponse *resp)
{
	for (size_t i = 0; i < resp->n_diagnostics; i++) {
		free(resp->diagnostics[i]->path);
		free(resp->diagnostics[i]->message);
		free(resp->diagnostics[i]->file);
		free(resp->diagnostics[i]);
	}
	free(resp->diagnostics);
	for (size_t i = 0; i < resp->n_stages; i++) {
		Kpl__V1__PlannedStage *p = resp->stages[i];
		free(p->name);
		free(p->kind);
		for (size_t j = 0; j < p->n_needs; j++)
			free(p->needs[j]);
		free(p->needs);
		free(p->matrix);
		free(p->uses);
		free(p);
	}
	free(resp->stages);
	if (resp->pipeline_name != protobuf_c_empty_string)
		free(resp->pipeline_name);
	free(resp);
}

/* Whether an UNAVAILABLE means nothing answers at the address at all (as
 * opposed to a kpld that answered and then closed, or a TLS mismatch). */
static int nobody_listening(const struct kplc_status *st)
{
	return st->code == KPLC_UNAVAILABLE &&
	       (strstr(st->message, "onnection refused") ||
		strstr(st->message, "failed to connect to all addresses") ||
		strstr(st->message, "DNS resolution failed") ||
		strstr(st->message, "No route to host") ||
		strstr(st->message, "Network is unreachable")) &&
	       !strstr(st->message, "andshake") && !strstr(st->message, "Socket closed") &&
	       !strstr(st->message, "certificate");
}

/* Lints one file: prints its diagnostics (or appends its response to
 * files), returns the exit code it deserves. *offline is set once kpld
 * proves unreachable: that file and the next are checked here. */
static int lint_one(struct ctl *ctl, const char *path, json_t *files, int *offline)
{
	Kpl__V1__ValidatePipelineResponse *resp = NULL;
	struct kplc_status st;
	const char *name = strcmp(path, "-") ? path : "<stdin>";
	char *text = read_file(path);
	struct tfiles tf;
	int rc;

	if (!text)
		return EXIT_USAGE;
	tfiles_load(&tf, path, text);
	if (*offline) {
		rc = -1;
	} else {
		Kpl__V1__ValidatePipelineRequest req = KPL__V1__VALIDATE_PIPELINE_REQUEST__INIT;
		Kpl__V1__ValidatePipelineRequest__FilesEntry *fe = kpl_calloc(tf.n + 1, sizeof *fe);
		Kpl__V1__ValidatePipelineRequest__FilesEntry **fp = kpl_calloc(tf.n + 1, sizeof *fp);
		for (size_t i = 0; i < tf.n; i++) {
			kpl__v1__validate_pipeline_request__files_entry__init(&fe[i]);
			fe[i].key = (char *)tf.v[i].path;
			fe[i].value = (char *)tf.v[i].text;
			fp[i] = &fe[i];
		}
		req.pipeline = text;
		req.n_files = tf.n;
		req.files = fp;
		rc = kplc_call_unary(ctl->c, "/kpl.v1.Pipelines/ValidatePipeline", &req.base,
				     &kpl__v1__validate_pipeline_response__descriptor,
				     (ProtobufCMessage **)&resp, &st);
		free(fe);
		free(fp);
	}
	if (rc < 0 && !*offline && nobody_listening(&st)) {
		fprintf(stderr, "%s: lint: no kpld at %s: checked offline with the same parser; "
			"names the daemon config declares (notifiers, registries, kubernetes, "
			"jenkins, prometheus) are checked only against a running kpld\n",
			prog, ctl->server);
		*offline = 1;
	}
	if (*offline)
		lint_offline(text, &tf, &resp);
	free(text);
	if (!resp) {
		tfiles_release(&tf);
		return rpc_error(ctl, &st);
	}
	if (files) {
		json_t *j = msg_to_json(&resp->base);
		json_object_set_new(j, "file", json_string(name));
		json_array_append_new(files, j);
	}
	/* The server calls every file "pipeline"; the user knows it by the
	 * name they gave, so diagnostics are rebuilt from their fields. */
	for (size_t i = 0; !files && i < resp->n_diagnostics; i++) {
		const Kpl__V1__Diagnostic *d = resp->diagnostics[i];

		/* A template's problem: its file (beside the pipeline's), then
		 * where the pipeline uses it. */
		if (d->file && *d->file)
			printf("%s%s:%d:%d: %s%s%s%s (used at %s:%d:%d)\n", tf.dir, d->file, d->line,
			       d->column,
			       d->severity == KPL__V1__SEVERITY__SEVERITY_WARNING ? "warning: " : "",
			       d->path, *d->path ? ": " : "", d->message, name, d->used_line,
			       d->used_column);
		else
			printf("%s:%d:%d: %s%s%s%s\n", name, d->line, d->column,
			       d->severity == KPL__V1__SEVERITY__SEVERITY_WARNING
				       ? "warning: " : "",
			       d->path, *d->path ? ": " : "", d->message);
	}
	if (!files && resp->valid)
		printf("%s: ok\n", name);
	else if (!files && !resp->n_diagnostics)
		printf("%s: invalid\n", name);
	/* What a matrix or a template made: the stages as they will run. */
	if (!files && resp->valid && resp->n_stages) {
		printf("%s: %zu stages once matrix and templates are expanded:\n", name,
		       resp->n_stages);
		for (size_t i = 0; i < resp->n_stages; i++) {
			const Kpl__V1__PlannedStage *p = resp->stages[i];
			printf("  %s (%s)", p->name, p->kind);
			for (size_t j = 0; j < p->n_needs; j++)
				printf("%s%s", j ? ", " : " needs: ", p->needs[j]);
			if (*p->matrix && p->max_parallel)
				printf(" [matrix %s, max_parallel %u]", p->matrix, p->max_parallel);
			else if (*p->matrix)
				printf(" [matrix %s]", p->matrix);
			if (*p->uses)
				printf(" [uses ./%s]", p->uses);
			if (p->finally)
				printf(" [finally]");
			printf("\n");
		}
	}
	rc = resp->valid ? EXIT_OK : EXIT_RUN_FAILED;
	if (*offline)
		lint_offline_free(resp);
	else
		kplc_msg_free(resp);
	tfiles_release(&tf);
	return rc;
}

static int cmd_lint(struct ctl *ctl)
{
	json_t *files = ctl->json ? json_array() : NULL;
	int rc = EXIT_OK, offline = 0;

	/* Worst outcome wins: RPC error, then unreadable file, then invalid.
	 * An RPC error stops the lint (the next file would fail alike). */
	for (int i = 0; i < ctl->n_pos; i++) {
		int one = lint_one(ctl, ctl->pos[i], files, &offline);

		fflush(stdout);
		if (one > rc)
			rc = one;
		if (one == EXIT_RPC)
			break;
	}
	if (files && rc != EXIT_RPC) {
		json_t *o = json_object();
		json_object_set_new(o, "files", files);
		print_json(o);
	} else {
		json_decref(files);
	}
	return rc;
}

static int on_any_event(const Kpl__V1__RunEvent *ev, void *data)
{
	struct ctl *ctl = data;

	if (ctl->json) {
		print_json_line(msg_to_json(&ev->base));
	} else {
		print_event(ev, 10, 1);
	}
	return 0;
}

static int cmd_events(struct ctl *ctl)
{
	Kpl__V1__WatchRunsRequest req = KPL__V1__WATCH_RUNS_REQUEST__INIT;
	struct kplc_follow_options fo = { .stop = &interrupted };
	struct kplc_status st;
	int rc;

	if (ctl->from && parse_u64(ctl->from, &req.from_global_seq))
		return usage_error("--from: \"%s\" is not a number", ctl->from);
	req.pipeline_name = ctl->pipeline ? (char *)ctl->pipeline : "";
	req.n_kinds = ctl->n_kinds;
	req.kinds = ctl->kinds;

	/* Ctrl-C is how this command ends: the follow sees the flag within
	 * 100 ms and returns. The handler stays: one Ctrl-C may arrive twice
	 * (timeout(1) signals the child and then its process group). */
	handle(SIGINT, on_sigint);

	rc = kplc_follow_runs(ctl->c, &req, &fo, on_any_event, ctl, NULL, &st);
	if (rc == KPL_ECANCELLED && interrupted)
		return EXIT_OK;
	if (rc < 0)
		return rpc_error(ctl, &st);
	return EXIT_OK;
}

/* --- Tokens and the audit log (kpl.v1.Security). --- */

static const char *scope_name(int v)
{
	static const char *const names[] = { "-", "read", "submit", "approve", "admin" };

	return v >= 0 && v < (int)KPL_ARRAY_SIZE(names) ? names[v] : "?";
}

static int parse_scope(const char *s)
{
	for (int v = 1; v <= 4; v++)
		if (!strcmp(s, scope_name(v)))
			return v;
	return -1;
}

static int token_create(struct ctl *ctl)
{
	Kpl__V1__CreateTokenRequest req = KPL__V1__CREATE_TOKEN_REQUEST__INIT;
	Kpl__V1__CreateTokenResponse *r;
	ProtobufCMessage *resp;
	struct kplc_status st;
	int scope;

	if (ctl->n_pos != 1)
		return usage_error("token create: takes no ID");
	if (!ctl->scope || (scope = parse_scope(ctl->scope)) < 0)
		return usage_error("token create: --scope read, submit, approve or admin is required");
	req.scope = (Kpl__V1__TokenScope)scope;
	req.pipeline = (char *)(ctl->pipeline ? ctl->pipeline : "");
	req.description = (char *)(ctl->description ? ctl->description : "");
	if (kplc_call_unary(ctl->c, "/kpl.v1.Security/CreateToken", &req.base,
			    &kpl__v1__create_token_response__descriptor, &resp, &st) < 0)
		return rpc_error(ctl, &st);
	r = (Kpl__V1__CreateTokenResponse *)resp;
	if (ctl->json) {
		print_json(msg_to_json(resp));
	} else {
		/* The token alone on stdout, so scripts can take it; the note
		 * goes to stderr. */
		printf("%s\n", r->token);
		fprintf(stderr, "%s: token %s (scope %s%s%s): shown only now, keep it secret\n",
			prog, r->info ? r->info->id : "?", scope_name(scope),
			*req.pipeline ? ", pipeline " : "", req.pipeline);
	}
	fflush(stdout);
	kplc_msg_free(resp);
	return EXIT_OK;
}

static int cmd_token(struct ctl *ctl)
{
	const char *sub = ctl->pos[0];
	struct kplc_status st;
	ProtobufCMessage *resp;
	char t1[32], t2[32];

	if (!strcmp(sub, "create"))
		return token_create(ctl);
	if (ctl->seen & (O_SCOPE | O_PIPELINE | O_DESCRIPTION))
		return usage_error("token %s: --scope, --pipeline and --description are for create",
				   sub);
	if (!strcmp(sub, "list")) {
		Kpl__V1__ListTokensRequest req = KPL__V1__LIST_TOKENS_REQUEST__INIT;
		Kpl__V1__ListTokensResponse *r;

		if (ctl->n_pos != 1)
			return usage_error("token list: takes no ID");
		if (kplc_call_unary(ctl->c, "/kpl.v1.Security/ListTokens", &req.base,
				    &kpl__v1__list_tokens_response__descriptor, &resp, &st) < 0)
			return rpc_error(ctl, &st);
		r = (Kpl__V1__ListTokensResponse *)resp;
		if (ctl->json) {
			print_json(msg_to_json(resp));
		} else {
			row("%-14s  %-7s  %-16s  %-16s  %-16s  %s", "ID", "SCOPE", "PIPELINE",
			    "CREATED", "REVOKED", "DESCRIPTION");
			for (size_t i = 0; i < r->n_tokens; i++) {
				const Kpl__V1__TokenInfo *t = r->tokens[i];
				row("%-14s  %-7s  %-16s  %-16s  %-16s  %s", t->id, scope_name(t->scope),
				    *t->pipeline ? t->pipeline : "-",
				    ts_local(t->created_at, "%Y-%m-%d %H:%M", t1, sizeof t1),
				    ts_local(t->revoked_at, "%Y-%m-%d %H:%M", t2, sizeof t2),
				    t->description);
			}
		}
		kplc_msg_free(resp);
		return EXIT_OK;
	}
	if (!strcmp(sub, "revoke")) {
		Kpl__V1__RevokeTokenRequest req = KPL__V1__REVOKE_TOKEN_REQUEST__INIT;
		Kpl__V1__TokenInfo *r;

		if (ctl->n_pos != 2)
			return usage_error("token revoke: expected ID");
		req.id = (char *)ctl->pos[1];
		if (kplc_call_unary(ctl->c, "/kpl.v1.Security/RevokeToken", &req.base,
				    &kpl__v1__token_info__descriptor, &resp, &st) < 0)
			return rpc_error(ctl, &st);
		r = (Kpl__V1__TokenInfo *)resp;
		if (ctl->json)
			print_json(msg_to_json(resp));
		else
			printf("%s revoked\n", r->id);
		kplc_msg_free(resp);
		return EXIT_OK;
	}
	return usage_error("token: unknown subcommand \"%s\" (create, list or revoke)", sub);
}

static int cmd_audit(struct ctl *ctl)
{
	Kpl__V1__ListAuditRequest req = KPL__V1__LIST_AUDIT_REQUEST__INIT;
	Kpl__V1__ListAuditResponse *r;
	ProtobufCMessage *resp;
	struct kplc_status st;
	uint64_t from = 1, limit = 0;
	char t[32];

	if (ctl->from && parse_u64(ctl->from, &from))
		return usage_error("--from: \"%s\" is not a number", ctl->from);
	if (ctl->limit && (parse_u64(ctl->limit, &limit) || limit == 0 || limit > 1000))
		return usage_error("--limit: \"%s\" is not a number from 1 to 1000", ctl->limit);
	req.from_seq = from;
	req.limit = (int32_t)limit;
	if (kplc_call_unary(ctl->c, "/kpl.v1.Security/ListAudit", &req.base,
			    &kpl__v1__list_audit_response__descriptor, &resp, &st) < 0)
		return rpc_error(ctl, &st);
	r = (Kpl__V1__ListAuditResponse *)resp;
	if (ctl->json) {
		print_json(msg_to_json(resp));
	} else {
		for (size_t i = 0; i < r->n_events; i++) {
			const Kpl__V1__RunEvent *ev = r->events[i];
			printf("[%s] %s%s%s%s %s\n",
			       ts_local(ev->time, "%Y-%m-%d %H:%M:%S", t, sizeof t),
			       *ev->run_id ? ev->run_id : "-", *ev->stage ? "/" : "", ev->stage,
			       "", ev->message);
		}
	}
	kplc_msg_free(resp);
	return EXIT_OK;
}

/* --- Logs. --- */

struct logs_state {
	const struct ctl *ctl;
	int width;      /* of the stage column */
	uint64_t until; /* stop after this seq; 0: at the end of the stream */
};

static int on_log(const Kpl__V1__RunEvent *ev, void *data)
{
	struct logs_state *ls = data;
	const struct ctl *ctl = ls->ctl;

	if (ev->kind == KPL__V1__EVENT_KIND__EVENT_KIND_LOG &&
	    (!ctl->stage || !strcmp(ev->stage, ctl->stage))) {
		if (ctl->json)
			print_json_line(msg_to_json(&ev->base));
		else if (ctl->stage)
			printf("%s\n", ev->message);
		else
			printf("%-*s %c %s\n", ls->width, ev->stage, log_mark(ev),
			       ev->message);
		fflush(stdout);
	}
	/* 1 is not an error: it ends the follow where the run was. */
	return ls->until && ev->seq >= ls->until;
}

/*
 * The log lines come from WatchRun like everything else. Without --follow
 * only what is stored now is shown: the run's last_seq (GetRun) is where to
 * stop, since the stream of a running run would not end by itself.
 */
static int cmd_logs(struct ctl *ctl)
{
	struct logs_state ls = { .ctl = ctl };
	struct kplc_follow_options fo = { .stop = &interrupted };
	struct kplc_status st;
	Kpl__V1__Run *r;
	int found = !ctl->stage, rc;

	if (kplc_get_run(ctl->c, ctl->pos[0], &r, &st) < 0)
		return rpc_error(ctl, &st);
	for (size_t i = 0; i < r->n_stages; i++) {
		int w = (int)strlen(r->stages[i]->name);
		if (w > ls.width)
			ls.width = w;
		if (ctl->stage && !strcmp(ctl->stage, r->stages[i]->name))
			found = 1;
	}
	ls.until = ctl->follow ? 0 : r->last_seq;
	kplc_msg_free(r);
	if (!found) {
		fprintf(stderr, "%s: logs: NOT_FOUND: run %s has no stage \"%s\"\n", prog,
			ctl->pos[0], ctl->stage);
		return EXIT_RPC;
	}
	if (!ctl->follow && ls.until == 0)
		return EXIT_OK; /* not started: no events yet */
	handle(SIGINT, on_sigint);
	rc = kplc_follow_run(ctl->c, ctl->pos[0], 1, &fo, on_log, &ls, NULL, &st);
	if (rc == KPL_ECANCELLED && interrupted)
		return EXIT_INTERRUPTED;
	if (rc < 0)
		return rpc_error(ctl, &st);
	return EXIT_OK;
}

/* --- Secrets. --- */

#define MAX_SECRET_BYTES (64 * 1024)

static struct termios secret_saved;
static volatile sig_atomic_t secret_echo_off;

/* Ctrl-C at the prompt must not leave the terminal without echo. */
static void on_sigint_secret(int sig)
{
	(void)sig;
	if (secret_echo_off) {
		tcsetattr(STDIN_FILENO, TCSANOW, &secret_saved);
		(void)!write(STDERR_FILENO, "\n", 1); /* the prompt's line */
	}
	_exit(EXIT_INTERRUPTED);
}

/*
 * The value of a secret from stdin: all of it, less one trailing newline
 * ("\n" or "\r\n"). From a terminal: one line, typed without echo. NULL
 * (and a message) if it is too big, holds a NUL byte or cannot be read.
 * The caller wipes and frees it.
 */
static char *read_secret(const char *name, size_t *len_out)
{
	int tty = isatty(STDIN_FILENO);
	size_t len = 0, cap = MAX_SECRET_BYTES + 3;
	char *buf = kpl_malloc(cap);
	struct termios quiet;
	const char *why = NULL;

	if (tty && tcgetattr(STDIN_FILENO, &secret_saved) == 0) {
		handle(SIGINT, on_sigint_secret);
		quiet = secret_saved;
		quiet.c_lflag &= ~(tcflag_t)ECHO;
		quiet.c_lflag |= ECHONL;
		fprintf(stderr, "value of secret %s: ", name);
		fflush(stderr);
		secret_echo_off = tcsetattr(STDIN_FILENO, TCSAFLUSH, &quiet) == 0;
	}
	for (;;) {
		ssize_t n = read(STDIN_FILENO, buf + len, cap - 1 - len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			why = strerror(errno);
			break;
		}
		len += (size_t)n;
		if (n == 0 || len == cap - 1 || (tty && len && buf[len - 1] == '\n'))
			break;
	}
	if (secret_echo_off) {
		tcsetattr(STDIN_FILENO, TCSAFLUSH, &secret_saved);
		secret_echo_off = 0;
	}
	buf[len] = '\0';
	if (len && buf[len - 1] == '\n')
		buf[--len] = '\0';
	if (len && buf[len - 1] == '\r')
		buf[--len] = '\0';
	if (!why && len > MAX_SECRET_BYTES)
		why = "over 64 KiB";
	if (!why && strlen(buf) != len)
		why = "holds a NUL byte";
	if (why) {
		fprintf(stderr, "%s: secret set: stdin: %s\n", prog, why);
		explicit_bzero(buf, cap);
		free(buf);
		return NULL;
	}
	*len_out = len;
	return buf;
}

static int cmd_secret(struct ctl *ctl)
{
	const char *sub = ctl->pos[0], *name = ctl->n_pos > 1 ? ctl->pos[1] : NULL;
	struct kplc_status st;
	Kpl__V1__Secret *sec;
	size_t len = 0;
	char *value;
	int rc;

	if (ctl->n_pipelines && strcmp(sub, "set"))
		return usage_error("secret %s: --pipeline is for set", sub);
	if (!strcmp(sub, "list")) {
		Kpl__V1__ListSecretsResponse *r;

		if (name)
			return usage_error("secret list: takes no NAME");
		if (kplc_list_secrets(ctl->c, &r, &st) < 0)
			return rpc_error(ctl, &st);
		if (ctl->json) {
			print_json(msg_to_json(&r->base));
		} else {
			for (size_t i = 0; i < r->n_secrets; i++) {
				const Kpl__V1__Secret *x = r->secrets[i];
				printf("%s", x->name);
				for (size_t k = 0; k < x->n_pipelines; k++)
					printf("%s%s", k ? ", " : " (pipelines: ", x->pipelines[k]);
				printf("%s\n", x->n_pipelines ? ")" : "");
			}
		}
		kplc_msg_free(r);
		return EXIT_OK;
	}
	if (strcmp(sub, "set") && strcmp(sub, "rm"))
		return usage_error("secret: unknown subcommand \"%s\" (set, list or rm)", sub);
	if (!name)
		return usage_error("secret %s: expected NAME", sub);
	if (!strcmp(sub, "rm")) {
		rc = kplc_delete_secret(ctl->c, name, &sec, &st);
	} else {
		if (!(value = read_secret(name, &len)))
			return EXIT_USAGE;
		{
			/* --pipeline a,b --pipeline c: a, b and c. */
			char *copies[MAX_PIPELINES], *list[MAX_PIPELINES];
			size_t n = 0;

			for (size_t i = 0; i < ctl->n_pipelines; i++) {
				char *save = NULL, *tok;
				copies[i] = strdup(ctl->pipelines[i]);
				for (tok = strtok_r(copies[i], ",", &save); tok;
				     tok = strtok_r(NULL, ",", &save))
					if (n < MAX_PIPELINES)
						list[n++] = tok;
			}
			rc = kplc_set_secret_for(ctl->c, name, value, (const char *const *)list, n,
						 &sec, &st);
			for (size_t i = 0; i < ctl->n_pipelines; i++)
				free(copies[i]);
		}
		explicit_bzero(value, len);
		free(value);
	}
	if (rc < 0)
		return rpc_error(ctl, &st);
	if (ctl->json)
		print_json(msg_to_json(&sec->base));
	else
	{
		printf("secret %s %s", sec->name, !strcmp(sub, "rm") ? "deleted" : "set");
		for (size_t k = 0; k < sec->n_pipelines; k++)
			printf("%s%s", k ? ", " : " for pipelines ", sec->pipelines[k]);
		printf("\n");
	}
	kplc_msg_free(sec);
	return EXIT_OK;
}

/* --- Releases. --- */

static int cmd_releases(struct ctl *ctl)
{
	static const char *const head[] = { "SEQ", "KIND", "REVISION", "IMAGE",
					    "PREVIOUS", "RUN", "TIME" };
	enum { N_COLS = 7 };
	Kpl__V1__ListReleasesResponse *r;
	struct kplc_status st;
	uint64_t limit = 0;
	int w[N_COLS];
	char (*cell)[N_COLS][256];

	if (ctl->limit && (parse_u64(ctl->limit, &limit) || limit == 0 || limit > 500))
		return usage_error("--limit: \"%s\" is not a number from 1 to 500", ctl->limit);
	if (kplc_list_releases(ctl->c, ctl->pos[0], (int32_t)limit, &r, &st) < 0)
		return rpc_error(ctl, &st);
	if (ctl->json) {
		print_json(msg_to_json(&r->base));
		kplc_msg_free(r);
		return EXIT_OK;
	}
	/* Columns as wide as their widest cell: images are long. */
	cell = kpl_calloc(r->n_releases + 1, sizeof *cell);
	for (int k = 0; k < N_COLS; k++)
		snprintf(cell[0][k], sizeof cell[0][k], "%s", head[k]);
	for (size_t i = 0; i < r->n_releases; i++) {
		const Kpl__V1__Release *x = r->releases[i];
		char (*c)[256] = cell[i + 1];
		char t[32];

		snprintf(c[0], sizeof c[0], "%llu", (unsigned long long)x->seq);
		snprintf(c[1], sizeof c[1], "%s", *x->kind ? x->kind : "-");
		snprintf(c[2], sizeof c[2], "%s", *x->revision ? x->revision : "-");
		snprintf(c[3], sizeof c[3], "%s", *x->image ? x->image : "-");
		snprintf(c[4], sizeof c[4], "%s", *x->previous_revision ? x->previous_revision : "-");
		snprintf(c[5], sizeof c[5], "%s", *x->run_id ? x->run_id : "-");
		snprintf(c[6], sizeof c[6], "%s",
			 ts_local(x->time, "%Y-%m-%d %H:%M:%S", t, sizeof t));
	}
	for (int k = 0; k < N_COLS; k++) {
		w[k] = 0;
		for (size_t i = 0; i <= r->n_releases; i++)
			if ((int)strlen(cell[i][k]) > w[k])
				w[k] = (int)strlen(cell[i][k]);
	}
	for (size_t i = 0; i <= r->n_releases; i++)
		row("%-*s  %-*s  %-*s  %-*s  %-*s  %-*s  %s", w[0], cell[i][0], w[1],
		    cell[i][1], w[2], cell[i][2], w[3], cell[i][3], w[4], cell[i][4],
		    w[5], cell[i][5], cell[i][6]);
	free(cell);
	kplc_msg_free(r);
	return EXIT_OK;
}

static int cmd_rollback(struct ctl *ctl)
{
	struct kplc_status st;
	Kpl__V1__Run *r;
	int rc;

	if (kplc_rollback_release(ctl->c, ctl->pos[0], ctl->to, &r, &st) < 0)
		return rpc_error(ctl, &st);
	rc = started(ctl, r, 1);
	kplc_msg_free(r);
	return rc;
}

/* --- Registered pipelines. --- */

/* t in zone (the schedule's; "" is UTC): "2026-12-07 02:00:00 +0800". */
static const char *ts_zone(const Google__Protobuf__Timestamp *t, const char *zone, char *buf,
			   size_t size)
{
	struct tz *tz = NULL;
	struct kpl_err err;
	int64_t wall, days, secs, y;
	int32_t off;
	unsigned m, d;

	if (!ts_set(t))
		return "-";
	if (!*zone || tz_load(NULL, zone, &tz, &err) != 0)
		tz = tz_utc();
	off = tz_offset_at(tz, t->seconds);
	tz_free(tz);
	wall = t->seconds + off;
	days = wall >= 0 ? wall / 86400 : -((-wall + 86399) / 86400);
	secs = wall - days * 86400;
	tz_civil_from_days(days, &y, &m, &d);
	snprintf(buf, size, "%04lld-%02u-%02u %02d:%02d:%02d %c%02d%02d", (long long)y, m, d,
		 (int)(secs / 3600), (int)(secs % 3600 / 60), (int)(secs % 60),
		 off < 0 ? '-' : '+', (off < 0 ? -off : off) / 3600,
		 (off < 0 ? -off : off) % 3600 / 60);
	return buf;
}

static void print_schedule(const Kpl__V1__Schedule *sc)
{
	char b[64];

	printf("schedule:  %s (%s)", sc->cron, *sc->timezone ? sc->timezone : "UTC");
	if (*sc->branch)
		printf(", branch %s", sc->branch);
	if (sc->starting_deadline_seconds)
		printf(", starting deadline %us", sc->starting_deadline_seconds);
	for (size_t k = 0; k < sc->n_params; k++)
		printf("%s%s=%s", k ? " " : ", params ", sc->params[k]->key,
		       sc->params[k]->value);
	printf("\n  next:    %s\n", ts_zone(sc->next_fire, sc->timezone, b, sizeof b));
	if (ts_set(sc->last_fire))
		printf("  last:    %s%s%s\n", ts_zone(sc->last_fire, sc->timezone, b, sizeof b),
		       *sc->last_run_id ? ", run " : "", sc->last_run_id);
	if (*sc->last_message)
		printf("  note:    %s\n", sc->last_message);
}

static void print_registered(const Kpl__V1__RegisteredPipeline *p)
{
	char b[64];

	printf("name:      %s\n", p->name);
	printf("repo:      %s\n", p->repo);
	printf("branches:  ");
	for (size_t i = 0; i < p->n_branches; i++)
		printf("%s%s", i ? ", " : "", p->branches[i]);
	printf("\npath:      %s\n", p->path);
	printf("secret:    %s\n", p->secret);
	if (p->pull_requests)
		printf("pull requests: yes%s\n", p->fork_secrets ? ", forks get secrets" : "");
	if (p->status_token && *p->status_token)
		printf("statuses:  token in secret %s\n", p->status_token);
	printf("created:   %s\n", ts_local(p->created_at, "%Y-%m-%d %H:%M:%S", b, sizeof b));
	if (*p->created_by)
		printf("by:        %s\n", p->created_by);
	for (size_t i = 0; i < p->n_schedules; i++)
		print_schedule(p->schedules[i]);
}

/* params as map entries of any request (same layout for every map<string,
 * string>); *kv holds the text, the caller frees kv, entries and ptrs. */
static void params_entries(struct ctl *ctl, char **kv,
			   Kpl__V1__RunPipelineRequest__ParamsEntry **entries,
			   Kpl__V1__RunPipelineRequest__ParamsEntry ***ptrs)
{
	size_t total = 1, off = 0;

	for (size_t i = 0; i < ctl->n_params; i++)
		total += strlen(ctl->params[i]) + 1;
	*kv = kpl_malloc(total);
	*entries = kpl_calloc(ctl->n_params + 1, sizeof **entries);
	*ptrs = kpl_calloc(ctl->n_params + 1, sizeof **ptrs);
	for (size_t i = 0; i < ctl->n_params; i++) {
		char *k = *kv + off, *eq;
		strcpy(k, ctl->params[i]);
		off += strlen(k) + 1;
		eq = strchr(k, '=');
		*eq = '\0';
		kpl__v1__run_pipeline_request__params_entry__init(&(*entries)[i]);
		(*entries)[i].key = k;
		(*entries)[i].value = eq + 1;
		(*ptrs)[i] = &(*entries)[i];
	}
}

static int pipeline_run(struct ctl *ctl, const char *name)
{
	Kpl__V1__RunPipelineRequest req = KPL__V1__RUN_PIPELINE_REQUEST__INIT;
	Kpl__V1__RunPipelineRequest__ParamsEntry *entries = NULL, **ptrs = NULL;
	struct kplc_status st;
	Kpl__V1__Run *r = NULL;
	char *kv = NULL;
	int rc;

	if (ctl->ref && ctl->sha)
		return usage_error("pipeline run: --ref or --sha, not both");
	req.name = (char *)name;
	req.ref = (char *)(ctl->ref ? ctl->ref : "");
	req.sha = (char *)(ctl->sha ? ctl->sha : "");
	req.idempotency_key = (char *)(ctl->idem ? ctl->idem : "");
	params_entries(ctl, &kv, &entries, &ptrs);
	req.n_params = ctl->n_params;
	req.params = ptrs;
	rc = kplc_call_unary(ctl->c, "/kpl.v1.Pipelines/RunPipeline", &req.base,
			     &kpl__v1__run__descriptor, (ProtobufCMessage **)&r, &st);
	free(kv);
	free(entries);
	free(ptrs);
	if (rc < 0)
		return rpc_error(ctl, &st);
	rc = started(ctl, r, 1);
	kplc_msg_free(r);
	return rc;
}

static char *trim(char *p);

/*
 * --schedule 'CRON; timezone=ZONE; branch=B; starting_deadline=5m;
 * param.NAME=VALUE' into sc. text is a writable copy the message borrows
 * from; entries are allocated here (freed by the caller, with sc).
 */
static int schedule_spec(char *text, const char *spec, Kpl__V1__Schedule *sc)
{
	char *part, *save = NULL;
	int first = 1;

	kpl__v1__schedule__init(sc);
	for (part = strtok_r(text, ";", &save); part; part = strtok_r(NULL, ";", &save)) {
		char *p = trim(part), *eq;

		if (first) {
			sc->cron = p;
			first = 0;
			continue;
		}
		if (!*p)
			continue;
		eq = strchr(p, '=');
		if (!eq)
			return usage_error("--schedule %s: \"%s\": want KEY=VALUE (timezone, "
					   "branch, starting_deadline, param.NAME)", spec, p);
		*eq = '\0';
		if (!strcmp(p, "timezone") || !strcmp(p, "tz")) {
			sc->timezone = eq + 1;
		} else if (!strcmp(p, "branch")) {
			sc->branch = eq + 1;
		} else if (!strcmp(p, "starting_deadline")) {
			const char *why = NULL;
			int64_t ms;

			if (pl_duration_parse(eq + 1, &ms, &why) != 0 || ms < 1000 ||
			    ms / 1000 > UINT32_MAX)
				return usage_error("--schedule %s: starting_deadline: want a "
						   "duration like 90s, 5m or 1h%s%s", spec,
						   why ? ": " : "", why ? why : "");
			sc->starting_deadline_seconds = (uint32_t)(ms / 1000);
		} else if (!strncmp(p, "param.", 6) && p[6]) {
			Kpl__V1__Schedule__ParamsEntry *e = kpl_calloc(1, sizeof *e);

			kpl__v1__schedule__params_entry__init(e);
			e->key = p + 6;
			e->value = eq + 1;
			sc->params = kpl_realloc(sc->params, (sc->n_params + 1) * sizeof *sc->params);
			sc->params[sc->n_params++] = e;
		} else {
			return usage_error("--schedule %s: unknown key \"%s\" (timezone, branch, "
					   "starting_deadline, param.NAME)", spec, p);
		}
	}
	if (first || !*sc->cron)
		return usage_error("--schedule %s: the cron expression comes first", spec);
	return 0;
}

static void schedules_free(Kpl__V1__Schedule *v, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		for (size_t k = 0; k < v[i].n_params; k++)
			free(v[i].params[k]);
		free(v[i].params);
	}
}

static int pipeline_register(struct ctl *ctl, const char *name)
{
	Kpl__V1__RegisterPipelineRequest req = KPL__V1__REGISTER_PIPELINE_REQUEST__INIT;
	Kpl__V1__RegisteredPipeline *p = NULL;
	Kpl__V1__Schedule sch[MAX_SCHEDULES], *schp[MAX_SCHEDULES];
	char *texts[MAX_SCHEDULES];
	struct kplc_status st;
	int rc;

	if (!ctl->repo)
		return usage_error("pipeline register: --repo URL is required");
	if (!ctl->secret)
		return usage_error("pipeline register: --secret NAME is required (the secret "
				   "holding the webhook key: kplctl secret set NAME)");
	req.name = (char *)name;
	req.repo = (char *)ctl->repo;
	req.path = (char *)(ctl->path ? ctl->path : "");
	req.secret = (char *)ctl->secret;
	req.branches = (char **)ctl->branches;
	req.n_branches = ctl->n_branches;
	req.pull_requests = ctl->pull_requests;
	req.fork_secrets = ctl->fork_secrets;
	req.status_token = (char *)(ctl->status_token ? ctl->status_token : "");
	for (size_t i = 0; i < ctl->n_schedules; i++) {
		texts[i] = kpl_strdup(ctl->schedules[i]);
		if ((rc = schedule_spec(texts[i], ctl->schedules[i], &sch[i])) != 0) {
			schedules_free(sch, i + 1);
			for (size_t k = 0; k <= i; k++)
				free(texts[k]);
			return rc;
		}
		schp[i] = &sch[i];
	}
	req.schedules = schp;
	req.n_schedules = ctl->n_schedules;
	rc = kplc_call_unary(ctl->c, "/kpl.v1.Pipelines/RegisterPipeline", &req.base,
			     &kpl__v1__registered_pipeline__descriptor, (ProtobufCMessage **)&p,
			     &st);
	schedules_free(sch, ctl->n_schedules);
	for (size_t i = 0; i < ctl->n_schedules; i++)
		free(texts[i]);
	if (rc < 0)
		return rpc_error(ctl, &st);
	if (ctl->json)
		print_json(msg_to_json(&p->base));
	else
		printf("pipeline %s registered\n", p->name);
	kplc_msg_free(p);
	return EXIT_OK;
}

static int cmd_pipeline(struct ctl *ctl)
{
	const char *sub = ctl->pos[0], *name = ctl->n_pos > 1 ? ctl->pos[1] : NULL;
	unsigned reg = O_REPO | O_BRANCH | O_PATH | O_SECRET | O_PR;
	unsigned run = O_REF | O_SHA | O_PARAM | O_IDEM | O_WATCH | O_PLAIN;
	Kpl__V1__ListPipelinesRequest lreq = KPL__V1__LIST_PIPELINES_REQUEST__INIT;
	Kpl__V1__ListPipelinesResponse *l = NULL;
	struct kplc_status st;
	int found = 0;

	if (strcmp(sub, "register") && strcmp(sub, "list") && strcmp(sub, "show") &&
	    strcmp(sub, "delete") && strcmp(sub, "run"))
		return usage_error("pipeline: unknown subcommand \"%s\" (register, list, show, "
				   "delete or run)", sub);
	if ((ctl->seen & reg) && strcmp(sub, "register"))
		return usage_error("pipeline %s: --repo, --branch, --path, --secret, "
				   "--pull-requests, --fork-secrets, --status-token and --schedule "
				   "are for register", sub);
	if ((ctl->seen & run) && strcmp(sub, "run"))
		return usage_error("pipeline %s: --ref, --sha, -p, --idempotency-key, --watch "
				   "and --plain are for run", sub);
	if (!strcmp(sub, "list") ? name != NULL : name == NULL)
		return usage_error("pipeline %s: %s", sub, name ? "takes no NAME" : "expected NAME");
	if (!strcmp(sub, "run"))
		return pipeline_run(ctl, name);
	if (!strcmp(sub, "register"))
		return pipeline_register(ctl, name);
	if (!strcmp(sub, "delete")) {
		Kpl__V1__DeletePipelineRequest req = KPL__V1__DELETE_PIPELINE_REQUEST__INIT;
		Kpl__V1__RegisteredPipeline *p = NULL;

		req.name = (char *)name;
		if (kplc_call_unary(ctl->c, "/kpl.v1.Pipelines/DeletePipeline", &req.base,
				    &kpl__v1__registered_pipeline__descriptor,
				    (ProtobufCMessage **)&p, &st) < 0)
			return rpc_error(ctl, &st);
		if (ctl->json)
			print_json(msg_to_json(&p->base));
		else
			printf("pipeline %s deleted\n", p->name);
		kplc_msg_free(p);
		return EXIT_OK;
	}
	/* list and show: ListPipelines (there is no get of one). */
	if (kplc_call_unary(ctl->c, "/kpl.v1.Pipelines/ListPipelines", &lreq.base,
			    &kpl__v1__list_pipelines_response__descriptor,
			    (ProtobufCMessage **)&l, &st) < 0)
		return rpc_error(ctl, &st);
	if (!strcmp(sub, "list")) {
		if (ctl->json) {
			print_json(msg_to_json(&l->base));
		} else {
			row("%-24s  %-10s  %-20s  %s", "NAME", "SECRET", "PATH", "REPO BRANCHES");
			for (size_t i = 0; i < l->n_pipelines; i++) {
				const Kpl__V1__RegisteredPipeline *p = l->pipelines[i];
				printf("%-24s  %-10s  %-20s  %s ", p->name, p->secret, p->path,
				       p->repo);
				for (size_t k = 0; k < p->n_branches; k++)
					printf("%s%s", k ? "," : "", p->branches[k]);
				printf("\n");
			}
		}
		kplc_msg_free(l);
		return EXIT_OK;
	}
	for (size_t i = 0; i < l->n_pipelines; i++) {
		if (strcmp(l->pipelines[i]->name, name))
			continue;
		found = 1;
		if (ctl->json)
			print_json(msg_to_json(&l->pipelines[i]->base));
		else
			print_registered(l->pipelines[i]);
	}
	kplc_msg_free(l);
	if (!found) {
		fprintf(stderr, "%s: pipeline show: NOT_FOUND: no registered pipeline %s\n", prog,
			name);
		return EXIT_RPC;
	}
	return EXIT_OK;
}

/* --- diff --- */

static int run_text(struct ctl *ctl, const char *id, Kpl__V1__GetRunPipelineResponse **out)
{
	Kpl__V1__GetRunPipelineRequest req = KPL__V1__GET_RUN_PIPELINE_REQUEST__INIT;
	struct kplc_status st;

	req.id = (char *)id;
	if (kplc_call_unary(ctl->c, "/kpl.v1.Pipelines/GetRunPipeline", &req.base,
			    &kpl__v1__get_run_pipeline_response__descriptor,
			    (ProtobufCMessage **)out, &st) < 0)
		return rpc_error(ctl, &st);
	return EXIT_OK;
}

/* "RUN_ID (PATH at COMMIT)" or "RUN_ID", the diff's label. */
static char *diff_label(const Kpl__V1__GetRunPipelineResponse *r)
{
	const Kpl__V1__PipelineSource *s = r->source;

	if (s && *s->commit)
		return kpl_asprintf("%s (%s at %.12s)", r->run_id, s->path, s->commit);
	return kpl_strdup(r->run_id);
}

/* The text of template path in r, or "" (a run that did not use it). */
static const char *template_text(const Kpl__V1__GetRunPipelineResponse *r, const char *path)
{
	for (size_t i = 0; i < r->n_templates; i++)
		if (!strcmp(r->templates[i]->path, path))
			return r->templates[i]->text;
	return "";
}

/* After the pipeline files' diff, each stage template either run used
 * (docs/pipelines.md): a's in its order, then those only b used. Labels
 * are "RUN:PATH". Returns whether any differs. */
static int diff_templates(const Kpl__V1__GetRunPipelineResponse *a,
			  const Kpl__V1__GetRunPipelineResponse *b, FILE *out)
{
	int differ = 0;

	for (int side = 0; side < 2; side++) {
		const Kpl__V1__GetRunPipelineResponse *r = side ? b : a;
		for (size_t i = 0; i < r->n_templates; i++) {
			const char *path = r->templates[i]->path;
			if (side && template_text(a, path)[0])
				continue; /* diffed with a's */
			char *la = kpl_asprintf("%s:%s", a->run_id, path);
			char *lb = kpl_asprintf("%s:%s", b->run_id, path);
			differ |= textdiff_unified(template_text(a, path), template_text(b, path), la,
						   lb, out);
			free(la);
			free(lb);
		}
	}
	return differ;
}

static int cmd_diff(struct ctl *ctl)
{
	Kpl__V1__GetRunPipelineResponse *a = NULL, *b = NULL;
	char *la = NULL, *lb = NULL;
	int rc;

	if ((rc = run_text(ctl, ctl->pos[0], &a)) != EXIT_OK ||
	    (rc = run_text(ctl, ctl->pos[1], &b)) != EXIT_OK)
		goto out;
	if (ctl->json) {
		char *buf = NULL;
		size_t len = 0;
		FILE *f = open_memstream(&buf, &len);
		json_t *j = json_object();
		int differ = textdiff_unified(a->pipeline, b->pipeline, ctl->pos[0], ctl->pos[1], f);

		differ |= diff_templates(a, b, f);

		fclose(f);
		json_object_set_new(j, "a", msg_to_json(&a->base));
		json_object_set_new(j, "b", msg_to_json(&b->base));
		json_object_set_new(j, "diff", json_string(buf ? buf : ""));
		print_json(j);
		free(buf);
		rc = differ ? EXIT_RUN_FAILED : EXIT_OK;
		goto out;
	}
	la = diff_label(a);
	lb = diff_label(b);
	rc = textdiff_unified(a->pipeline, b->pipeline, la, lb, stdout) | diff_templates(a, b, stdout)
		     ? EXIT_RUN_FAILED : EXIT_OK;
out:
	free(la);
	free(lb);
	kplc_msg_free(a);
	kplc_msg_free(b);
	return rc;
}

/* --- Config file. --- */

static char *trim(char *p)
{
	char *e;

	while (isspace((unsigned char)*p))
		p++;
	e = p + strlen(p);
	while (e > p && isspace((unsigned char)e[-1]))
		*--e = '\0';
	return p;
}

/*
 * $KPL_CONFIG, else $XDG_CONFIG_HOME/kpl/config, else ~/.config/kpl/config:
 * "key = value" lines (server, token, ca, cert, key), '#' comments. It fills only what
 * neither an option nor the environment set. A missing file is fine. The
 * values stay allocated for the life of the process.
 */
static int read_config(struct ctl *ctl)
{
	const char *env = getenv("KPL_CONFIG"), *xdg = getenv("XDG_CONFIG_HOME");
	const char *home = getenv("HOME");
	char path[4096], line[4096];
	struct stat sb;
	int lineno = 0, has_token = 0;
	FILE *f;

	if (env && *env)
		snprintf(path, sizeof path, "%s", env);
	else if (xdg && *xdg)
		snprintf(path, sizeof path, "%s/kpl/config", xdg);
	else if (home && *home)
		snprintf(path, sizeof path, "%s/.config/kpl/config", home);
	else
		return 0;
	if (!(f = fopen(path, "r"))) {
		if (errno == ENOENT && !(env && *env))
			return 0;
		fprintf(stderr, "%s: config %s: %s\n", prog, path, strerror(errno));
		return EXIT_USAGE;
	}
	while (fgets(line, sizeof line, f)) {
		char *p = trim(line), *eq, *k, *v;
		const char **slot = NULL;

		lineno++;
		if (!*p || *p == '#')
			continue;
		if (!(eq = strchr(p, '='))) {
			fprintf(stderr, "%s: config %s:%d: want key = value\n", prog, path, lineno);
			fclose(f);
			return EXIT_USAGE;
		}
		*eq = '\0';
		k = trim(p);
		v = trim(eq + 1);
		if (!strcmp(k, "server"))
			slot = &ctl->server;
		else if (!strcmp(k, "token"))
			slot = &ctl->token, has_token = 1;
		else if (!strcmp(k, "ca"))
			slot = &ctl->ca;
		else if (!strcmp(k, "cert"))
			slot = &ctl->cert;
		else if (!strcmp(k, "key"))
			slot = &ctl->key;
		else {
			fprintf(stderr, "%s: config %s:%d: unknown key \"%s\" "
				"(server, token, ca, cert, key)\n",
				prog, path, lineno, k);
			fclose(f);
			return EXIT_USAGE;
		}
		if (!*slot || !**slot) {
			*slot = kpl_strdup(v);
			if (slot == &ctl->server)
				ctl->server_from = kpl_asprintf("server in %s", path);
			else if (slot == &ctl->token)
				ctl->token_from = kpl_asprintf("token in %s", path);
		}
	}
	/* A token others can read is a token others have. */
	if (has_token && fstat(fileno(f), &sb) == 0 && (sb.st_mode & 077))
		fprintf(stderr, "%s: warning: config %s holds a token and others may read it "
			"(chmod 600)\n", prog, path);
	fclose(f);
	return 0;
}

int main(int argc, char **argv)
{
	struct ctl ctl = { 0 };
	int rc;

	ctl.pos = kpl_calloc((size_t)argc, sizeof *ctl.pos);
	rc = parse_args(&ctl, argc, argv);
	if (rc)
		return rc;
	if (ctl.seen & O_HELP) {
		usage(stdout);
		return EXIT_OK;
	}
	if (!ctl.cmd)
		return usage_error("no command");
	for (size_t j = 0; j < KPL_ARRAY_SIZE(opt_defs); j++) {
		const struct opt_def *o = &opt_defs[j];
		if ((ctl.seen & o->bit) && !((ctl.cmd->opts | O_GLOBAL) & o->bit))
			return usage_error("%s: --%s does not apply", ctl.cmd->name,
					   o->long_name);
	}
	if (ctl.n_pos < ctl.cmd->min_args ||
	    (ctl.cmd->max_args >= 0 && ctl.n_pos > ctl.cmd->max_args))
		return usage_error("%s: expected %s%s", ctl.cmd->name,
				   ctl.cmd->max_args ? ctl.cmd->args : "no arguments",
				   ctl.n_pos > ctl.cmd->min_args ? " only" : "");
	if (ctl.server && *ctl.server)
		ctl.server_from = "--server";
	else if ((ctl.server = getenv("KPL_SERVER")) && *ctl.server)
		ctl.server_from = "$KPL_SERVER";
	if (ctl.token && *ctl.token)
		ctl.token_from = "--token";
	else if ((ctl.token = getenv("KPL_TOKEN")) && *ctl.token)
		ctl.token_from = "$KPL_TOKEN";
	if (!ctl.ca || !*ctl.ca)
		ctl.ca = getenv("KPL_CA");
	if (!ctl.cert || !*ctl.cert)
		ctl.cert = getenv("KPL_CERT");
	if (!ctl.key || !*ctl.key)
		ctl.key = getenv("KPL_KEY");
	rc = read_config(&ctl);
	if (rc)
		return rc;
	if (!ctl.server || !*ctl.server) {
		ctl.server = KPLC_DEFAULT_TARGET;
		ctl.server_from = "the default";
	}
	if (ctl.ca && !*ctl.ca)
		ctl.ca = NULL;
	if (ctl.cert && !*ctl.cert)
		ctl.cert = NULL;
	if (ctl.key && !*ctl.key)
		ctl.key = NULL;
	/* Said in kplctl's words before the library says it in its own. */
	if (!ctl.cert != !ctl.key)
		return usage_error("--%s %s needs --%s too (or $KPL_%s, or %s in the config file)",
				   ctl.cert ? "cert" : "key", ctl.cert ? ctl.cert : ctl.key,
				   ctl.cert ? "key" : "cert", ctl.cert ? "KEY" : "CERT",
				   ctl.cert ? "key" : "cert");
	if (ctl.cert && !ctl.ca)
		return usage_error("--cert and --key need --ca (or $KPL_CA, or ca in the config file): "
				   "a client certificate is sent over TLS only");

	rc = connect_server(&ctl);
	if (rc)
		return rc;
	rc = ctl.cmd->run(&ctl);
	kplc_free(ctl.c);
	free(ctl.pos);
	return rc;
}
