/*
 * podspec.c - a pod stage without I/O (stages/podspec.h).
 */
#define _GNU_SOURCE /* timegm */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "stages/podspec.h"

#define NAME_MAX_LEN 63

/* ---------------------------------------------------------------------- */
/* Names */

static uint32_t fnv1a(const char *a, const char *b)
{
	uint32_t h = 2166136261u;

	for (const char *p = a; *p; p++)
		h = (h ^ (unsigned char)*p) * 16777619u;
	h = (h ^ 0u) * 16777619u; /* a separator no name holds */
	for (const char *p = b ? b : ""; *p; p++)
		h = (h ^ (unsigned char)*p) * 16777619u;
	return h;
}

static bool dns_label_char(char c)
{
	return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-';
}

/* s lower-cased with every other character '-', runs of '-' collapsed,
 * no '-' at the ends, at most max characters. */
static void fit_dns(const char *s, char *out, size_t max)
{
	size_t n = 0;

	for (; *s && n < max; s++) {
		char c = (char)tolower((unsigned char)*s);
		if (!dns_label_char(c))
			c = '-';
		if (c == '-' && (n == 0 || out[n - 1] == '-'))
			continue;
		out[n++] = c;
	}
	while (n > 0 && out[n - 1] == '-')
		n--;
	out[n] = '\0';
}

char *podspec_name(const char *run_id, const char *stage, uint32_t attempt)
{
	char *plain = kpl_asprintf("kpl-%s-%s-%u", run_id, stage, attempt);
	char run[64], st[64], tail[32];
	size_t len = strlen(plain), room;
	bool ok = len <= NAME_MAX_LEN && plain[len - 1] != '-';

	for (size_t i = 0; ok && plain[i]; i++)
		ok = dns_label_char(plain[i]) && !(plain[i] == '-' && plain[i + 1] == '-');
	if (ok)
		return plain;
	free(plain);
	snprintf(tail, sizeof tail, "-%08x-%u", fnv1a(run_id, stage), attempt);
	/* "kpl-" RUN "-" STAGE TAIL: the stage gets what the run leaves,
	 * the run at most 24. */
	room = NAME_MAX_LEN - strlen("kpl-") - strlen(tail) - 1;
	fit_dns(run_id, run, room / 2 < 24 ? room / 2 : 24);
	fit_dns(stage, st, room - strlen(run));
	return kpl_asprintf("kpl-%s%s%s%s", run, run[0] && st[0] ? "-" : "", st, tail);
}

static bool label_char(char c)
{
	return isalnum((unsigned char)c) || c == '-' || c == '_' || c == '.';
}

char *podspec_label_value(const char *s)
{
	size_t n = strlen(s), k = 0;
	bool ok = n <= NAME_MAX_LEN;
	char buf[NAME_MAX_LEN + 1];

	for (size_t i = 0; ok && i < n; i++)
		ok = label_char(s[i]);
	if (ok && (n == 0 || (isalnum((unsigned char)s[0]) && isalnum((unsigned char)s[n - 1]))))
		return kpl_strdup(s);
	for (size_t i = 0; s[i] && k < NAME_MAX_LEN - 9; i++)
		if (label_char(s[i]) && (k || isalnum((unsigned char)s[i])))
			buf[k++] = s[i];
	while (k && !isalnum((unsigned char)buf[k - 1]))
		k--;
	buf[k] = '\0';
	return kpl_asprintf("%s%s%08x", buf, k ? "-" : "", fnv1a(s, NULL));
}

char *podspec_escape_expansion(const char *s)
{
	size_t n = strlen(s), k = 0;
	char *out = kpl_malloc(2 * n + 1);

	for (size_t i = 0; i < n; i++) {
		out[k++] = s[i];
		if (s[i] == '$' && (s[i + 1] == '(' || s[i + 1] == '$'))
			out[k++] = '$';
	}
	out[k] = '\0';
	return out;
}

/* ---------------------------------------------------------------------- */
/* Objects */

static const char b64chars[] =
	"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static char *b64(const char *s)
{
	size_t n = strlen(s), k = 0;
	char *out = kpl_malloc(4 * ((n + 2) / 3) + 1);

	for (size_t i = 0; i < n; i += 3) {
		uint32_t v = (uint32_t)(unsigned char)s[i] << 16;
		if (i + 1 < n)
			v |= (uint32_t)(unsigned char)s[i + 1] << 8;
		if (i + 2 < n)
			v |= (unsigned char)s[i + 2];
		out[k++] = b64chars[(v >> 18) & 63];
		out[k++] = b64chars[(v >> 12) & 63];
		out[k++] = i + 1 < n ? b64chars[(v >> 6) & 63] : '=';
		out[k++] = i + 2 < n ? b64chars[v & 63] : '=';
	}
	out[k] = '\0';
	return out;
}

static json_t *metadata(const struct podspec_input *in, const char *name)
{
	char att[16];
	char *run = podspec_label_value(in->run_id);
	char *stage = podspec_label_value(in->stage);
	json_t *m;

	snprintf(att, sizeof att, "%u", in->attempt);
	m = json_pack("{s:s, s:s, s:{s:s, s:s, s:s, s:s}, s:{s:s, s:s}}", "name", name,
		      "namespace", in->namespace, "labels", PODSPEC_LABEL_RUN, run,
		      PODSPEC_LABEL_STAGE, stage, PODSPEC_LABEL_ATTEMPT, att,
		      "app.kubernetes.io/managed-by", "kpl", "annotations",
		      PODSPEC_LABEL_RUN, in->run_id, PODSPEC_LABEL_STAGE, in->stage);
	free(run);
	free(stage);
	return m;
}

json_t *podspec_pod(const struct podspec_input *in)
{
	json_t *cmd = json_array(), *env = json_array(), *c, *spec, *pod;
	char *wd;

	for (size_t i = 0; i < in->n_argv; i++) {
		char *e = podspec_escape_expansion(in->argv[i]);
		json_array_append_new(cmd, json_string(e));
		free(e);
	}
	for (size_t i = 0; i < in->n_env; i++) {
		const struct podspec_env *v = &in->env[i];
		if (v->secret)
			json_array_append_new(env, json_pack("{s:s, s:{s:{s:s, s:s}}}", "name",
							     v->name, "valueFrom", "secretKeyRef",
							     "name", in->secret_name, "key",
							     v->name));
		else {
			/* Kubernetes expands $(VAR) in env values too. */
			char *e = podspec_escape_expansion(v->value);
			json_array_append_new(env, json_pack("{s:s, s:s}", "name", v->name,
							     "value", e));
			free(e);
		}
	}
	if (!in->workdir || !*in->workdir)
		wd = kpl_strdup(PODSPEC_WORKSPACE);
	else if (in->workdir[0] == '/')
		wd = kpl_strdup(in->workdir);
	else
		wd = kpl_asprintf("%s/%s", PODSPEC_WORKSPACE, in->workdir);
	c = json_pack("{s:s, s:s, s:o, s:o, s:s, s:s, s:s, s:[{s:s, s:s}]}", "name",
		      PODSPEC_CONTAINER, "image", in->image, "command", cmd, "env", env,
		      "workingDir", wd, "terminationMessagePath", PODSPEC_OUTPUTS_PATH,
		      "terminationMessagePolicy", "File", "volumeMounts", "name", "workspace",
		      "mountPath", PODSPEC_WORKSPACE);
	free(wd);
	if (in->resources)
		json_object_set(c, "resources", (json_t *)in->resources);
	spec = json_pack("{s:s, s:[o], s:[o], s:b, s:I}", "restartPolicy", "Never",
			 "containers", c, "volumes",
			 in->claim ? json_pack("{s:s, s:{s:s}}", "name", "workspace",
					       "persistentVolumeClaim", "claimName", in->claim)
				   : json_pack("{s:s, s:{}}", "name", "workspace", "emptyDir"),
			 "automountServiceAccountToken", in->service_account != NULL,
			 "terminationGracePeriodSeconds", (json_int_t)in->grace_seconds);
	if (in->service_account)
		json_object_set_new(spec, "serviceAccountName", json_string(in->service_account));
	if (in->node_selector)
		json_object_set(spec, "nodeSelector", (json_t *)in->node_selector);
	if (in->tolerations)
		json_object_set(spec, "tolerations", (json_t *)in->tolerations);
	pod = json_pack("{s:s, s:s, s:o, s:o}", "apiVersion", "v1", "kind", "Pod", "metadata",
			metadata(in, in->name), "spec", spec);
	return pod;
}

json_t *podspec_secret(const struct podspec_input *in)
{
	json_t *data = json_object();

	for (size_t i = 0; i < in->n_env; i++)
		if (in->env[i].secret) {
			char *v = b64(in->env[i].value);
			json_object_set_new(data, in->env[i].name, json_string(v));
			memset(v, 0, strlen(v));
			free(v);
		}
	return json_pack("{s:s, s:s, s:s, s:o, s:o}", "apiVersion", "v1", "kind", "Secret",
			 "type", "Opaque", "metadata", metadata(in, in->secret_name), "data",
			 data);
}

char *podspec_claim_name(const char *run_id)
{
	char *name = podspec_name(run_id, "ws", 0);
	size_t n = strlen(name);

	/* "...-ws-0" -> "...-ws": the claim is the run's, not an attempt's. */
	if (n > 2 && !strcmp(name + n - 2, "-0"))
		name[n - 2] = '\0';
	return name;
}

json_t *podspec_claim(const struct podspec_input *in, const char *size)
{
	json_t *md = metadata(in, in->claim);

	/* The run's, not one stage's. */
	json_object_del(json_object_get(md, "labels"), PODSPEC_LABEL_STAGE);
	json_object_del(json_object_get(md, "labels"), PODSPEC_LABEL_ATTEMPT);
	json_object_del(json_object_get(md, "annotations"), PODSPEC_LABEL_STAGE);
	return json_pack("{s:s, s:s, s:o, s:{s:[s], s:{s:{s:s}}}}", "apiVersion", "v1", "kind",
			 "PersistentVolumeClaim", "metadata", md, "spec", "accessModes",
			 "ReadWriteOnce", "resources", "requests", "storage", size);
}

/* ---------------------------------------------------------------------- */
/* Status */

static const char *const phase_names[] = {
	[PODSPEC_PENDING] = "pending",
	[PODSPEC_PULL_FAILING] = "pull-failing",
	[PODSPEC_UNSCHEDULABLE] = "unschedulable",
	[PODSPEC_CONFIG_FAILING] = "config-failing",
	[PODSPEC_RUNNING] = "running",
	[PODSPEC_SUCCEEDED] = "succeeded",
	[PODSPEC_FAILED] = "failed",
};

const char *podspec_phase_name(enum podspec_phase p)
{
	return p < PODSPEC_PHASE_LAST ? phase_names[p] : "?";
}

static const char *str_at(const json_t *o, const char *k)
{
	const char *s = json_string_value(json_object_get(o, k));
	return s ? s : "";
}

static const json_t *container_status(const json_t *status)
{
	const json_t *cs = json_object_get(status, "containerStatuses"), *c;
	size_t i;

	json_array_foreach(cs, i, c)
		if (!strcmp(str_at(c, "name"), PODSPEC_CONTAINER))
			return c;
	return json_array_get(cs, 0);
}

static bool pull_reason(const char *r)
{
	return !strcmp(r, "ErrImagePull") || !strcmp(r, "ImagePullBackOff") ||
	       !strcmp(r, "InvalidImageName") || !strcmp(r, "ErrImageNeverPull") ||
	       !strcmp(r, "ImageInspectError") || !strcmp(r, "RegistryUnavailable");
}

static bool config_reason(const char *r)
{
	return !strcmp(r, "CreateContainerConfigError") ||
	       !strcmp(r, "CreateContainerError") || !strcmp(r, "RunContainerError");
}

static void reason_message(char *buf, size_t n, const char *reason, const char *msg)
{
	snprintf(buf, n, "%s%s%s", reason, *reason && *msg ? ": " : "", msg);
}

void podspec_status_of(const json_t *pod, struct podspec_status *out)
{
	const json_t *status = json_object_get(pod, "status");
	const json_t *cs = container_status(status);
	const json_t *state = json_object_get(cs, "state");
	const json_t *term = json_object_get(state, "terminated");
	const json_t *wait = json_object_get(state, "waiting");
	const json_t *conds = json_object_get(status, "conditions"), *cond;
	const char *phase = str_at(status, "phase");
	const char *preason = str_at(status, "reason");
	size_t i;

	memset(out, 0, sizeof *out);
	out->exit_code = -1;
	out->phase = PODSPEC_PENDING;
	out->deleting = json_is_string(json_object_get(json_object_get(pod, "metadata"),
							"deletionTimestamp"));
	if (term) {
		out->started = true;
		out->exit_code = (int)json_integer_value(json_object_get(term, "exitCode"));
		snprintf(out->message, sizeof out->message, "%s", str_at(term, "message"));
	} else if (json_object_get(state, "running")) {
		out->started = true;
	}
	if (!strcmp(phase, "Succeeded")) {
		out->phase = PODSPEC_SUCCEEDED;
		out->terminal = true;
		return;
	}
	/* The pod is being killed for a reason of the cluster's (its node lost
	 * or unreachable, a preemption): it will not finish its work. */
	json_array_foreach(conds, i, cond)
		if (!strcmp(str_at(cond, "type"), "DisruptionTarget") &&
		    !strcmp(str_at(cond, "status"), "True") && strcmp(phase, "Failed")) {
			out->phase = PODSPEC_FAILED;
			out->terminal = true;
			snprintf(out->why, sizeof out->why, "it is being deleted by the cluster "
				 "(DisruptionTarget %s: %s): its node was lost or is unreachable, or it "
				 "was preempted", str_at(cond, "reason"), str_at(cond, "message"));
			return;
		}
	if (!strcmp(phase, "Failed")) {
		const char *r = term ? str_at(term, "reason") : "";
		out->phase = PODSPEC_FAILED;
		out->terminal = true;
		if (*preason) /* Evicted, DeadlineExceeded, NodeLost, ... */
			reason_message(out->why, sizeof out->why, preason, str_at(status, "message"));
		else if (!strcmp(r, "OOMKilled"))
			snprintf(out->why, sizeof out->why, "the container was OOMKilled (exit "
				 "code %d): it used more memory than its limit",
				 out->exit_code);
		else if (term && out->exit_code != 0)
			snprintf(out->why, sizeof out->why, "the command exited with status %d%s%s%s",
				 out->exit_code, *r ? " (" : "", r, *r ? ")" : "");
		else if (term)
			snprintf(out->why, sizeof out->why, "the pod failed (%s)",
				 *r ? r : "no reason given");
		else
			snprintf(out->why, sizeof out->why, "the pod failed before its container "
				 "ran%s%s", *str_at(status, "message") ? ": " : "",
				 str_at(status, "message"));
		return;
	}
	if (out->started && !term) {
		out->phase = PODSPEC_RUNNING;
		return;
	}
	if (term) {
		/* Terminated but the phase lags: it ends shortly. */
		out->phase = PODSPEC_RUNNING;
		return;
	}
	if (wait && pull_reason(str_at(wait, "reason"))) {
		out->phase = PODSPEC_PULL_FAILING;
		reason_message(out->why, sizeof out->why, str_at(wait, "reason"),
			       str_at(wait, "message"));
		return;
	}
	if (wait && config_reason(str_at(wait, "reason"))) {
		out->phase = PODSPEC_CONFIG_FAILING;
		reason_message(out->why, sizeof out->why, str_at(wait, "reason"),
			       str_at(wait, "message"));
		return;
	}
	json_array_foreach(conds, i, cond)
		if (!strcmp(str_at(cond, "type"), "PodScheduled") &&
		    !strcmp(str_at(cond, "status"), "False")) {
			out->phase = PODSPEC_UNSCHEDULABLE;
			reason_message(out->why, sizeof out->why, str_at(cond, "reason"),
				       str_at(cond, "message"));
			return;
		}
}

/* ---------------------------------------------------------------------- */
/* Log stream */

int podspec_time_parse(const char *s, size_t n, struct podspec_time *t)
{
	struct tm tm = { 0 };
	size_t i = 19;
	int32_t nsec = 0, digits = 0;
	int64_t off = 0;
	char buf[20];

	if (n < 20 || s[4] != '-' || s[7] != '-' || (s[10] != 'T' && s[10] != 't') ||
	    s[13] != ':' || s[16] != ':')
		return KPL_EINVAL;
	memcpy(buf, s, 19);
	buf[19] = '\0';
	for (int k = 0; k < 19; k++)
		if (k != 4 && k != 7 && k != 10 && k != 13 && k != 16 &&
		    !isdigit((unsigned char)buf[k]))
			return KPL_EINVAL;
	tm.tm_year = atoi(buf) - 1900;
	tm.tm_mon = atoi(buf + 5) - 1;
	tm.tm_mday = atoi(buf + 8);
	tm.tm_hour = atoi(buf + 11);
	tm.tm_min = atoi(buf + 14);
	tm.tm_sec = atoi(buf + 17);
	if (i < n && s[i] == '.') {
		for (i++; i < n && isdigit((unsigned char)s[i]); i++)
			if (digits < 9) {
				nsec = nsec * 10 + (s[i] - '0');
				digits++;
			}
		if (!digits)
			return KPL_EINVAL;
		for (; digits < 9; digits++)
			nsec *= 10;
	}
	if (i < n && (s[i] == 'Z' || s[i] == 'z')) {
		i++;
	} else if (i + 6 <= n && (s[i] == '+' || s[i] == '-') && s[i + 3] == ':' &&
		   isdigit((unsigned char)s[i + 1]) && isdigit((unsigned char)s[i + 2]) &&
		   isdigit((unsigned char)s[i + 4]) && isdigit((unsigned char)s[i + 5])) {
		off = ((s[i + 1] - '0') * 10 + (s[i + 2] - '0')) * 3600 +
		      ((s[i + 4] - '0') * 10 + (s[i + 5] - '0')) * 60;
		if (s[i] == '+')
			off = -off;
		i += 6;
	} else {
		return KPL_EINVAL;
	}
	if (i != n)
		return KPL_EINVAL;
	t->sec = (int64_t)timegm(&tm) + off;
	t->nsec = nsec;
	return 0;
}

const char *podspec_time_format(const struct podspec_time *t, bool nano, char *buf, size_t n)
{
	struct tm tm;
	time_t s = (time_t)t->sec;
	char base[32];

	gmtime_r(&s, &tm);
	/* Four digits always (strftime's %Y has none for year 941): what
	 * this writes, podspec_time_parse reads. */
	snprintf(base, sizeof base, "%04d-%02d-%02dT%02d:%02d:%02d", tm.tm_year + 1900,
		 tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec);
	if (nano)
		snprintf(buf, n, "%s.%09dZ", base, (int)t->nsec);
	else
		snprintf(buf, n, "%sZ", base);
	return buf;
}

static int time_cmp(const struct podspec_time *a, const struct podspec_time *b)
{
	if (a->sec != b->sec)
		return a->sec < b->sec ? -1 : 1;
	if (a->nsec != b->nsec)
		return a->nsec < b->nsec ? -1 : 1;
	return 0;
}

void podspec_log_stream_begins(struct podspec_logpos *pos)
{
	pos->seen_at_last = 0;
}

bool podspec_log_accept(struct podspec_logpos *pos, const char *line, size_t n,
			const char **text, size_t *text_len)
{
	const char *sp = memchr(line, ' ', n);
	struct podspec_time t;
	int c;

	if (!sp || podspec_time_parse(line, (size_t)(sp - line), &t)) {
		*text = line;
		*text_len = n;
		return true;
	}
	*text = sp + 1;
	*text_len = n - (size_t)(sp + 1 - line);
	c = pos->any ? time_cmp(&t, &pos->last) : 1;
	if (c < 0)
		return false;
	if (c == 0) {
		/* The first n_at_last such lines of a stream are stored. */
		if (++pos->seen_at_last <= pos->n_at_last)
			return false;
		pos->n_at_last++;
		return true;
	}
	pos->last = t;
	pos->any = true;
	pos->n_at_last = 1;
	pos->seen_at_last = 1;
	return true;
}

const char *podspec_log_since(const struct podspec_logpos *pos, char *buf, size_t n)
{
	if (!pos->any) {
		if (n)
			buf[0] = '\0';
		return buf;
	}
	return podspec_time_format(&pos->last, false, buf, n);
}

/* ---------------------------------------------------------------------- */
/* Outputs */

int podspec_outputs(const char *message,
		    void (*fn)(void *data, const char *key, const char *value), void *data)
{
	char *copy = kpl_strdup(message), *save = NULL;
	int bad = 0;

	for (char *line = strtok_r(copy, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
		size_t n = strlen(line);
		char *eq;
		if (n && line[n - 1] == '\r')
			line[--n] = '\0';
		if (!n)
			continue;
		eq = strchr(line, '=');
		if (!eq || eq == line) {
			bad++;
			continue;
		}
		*eq = '\0';
		fn(data, line, eq + 1);
	}
	free(copy);
	return bad;
}

/* ---------------------------------------------------------------------- */
/* Record */

static const char *const state_names[] = {
	[PODSPEC_S_NONE] = "none",
	[PODSPEC_S_CLAIMED] = "claimed",
	[PODSPEC_S_CREATED] = "created",
	[PODSPEC_S_DONE] = "done",
	[PODSPEC_S_CANCELLING] = "cancelling",
};

const char *podspec_state_name(enum podspec_state s)
{
	return s < PODSPEC_S_LAST ? state_names[s] : "?";
}

void podspec_record_release(struct podspec_record *r)
{
	free(r->cluster);
	free(r->namespace);
	free(r->pod);
	free(r->secret);
	free(r->msg);
	memset(r, 0, sizeof *r);
}

char *podspec_record_encode(const struct podspec_record *r)
{
	json_t *j = json_pack("{s:i, s:s, s:s, s:s, s:s, s:s}", "v", 1, "state",
			      podspec_state_name(r->state), "cluster", r->cluster ? r->cluster : "",
			      "namespace", r->namespace ? r->namespace : "", "pod",
			      r->pod ? r->pod : "", "secret", r->secret ? r->secret : "");
	char *text;

	if (r->log.any) {
		char t[48];
		json_object_set_new(j, "log", json_pack("{s:s, s:i}", "last",
							podspec_time_format(&r->log.last, true, t,
									    sizeof t),
							"n", (int)r->log.n_at_last));
	}
	if (r->state == PODSPEC_S_DONE) {
		json_object_set_new(j, "result", json_integer(r->result));
		if (r->msg)
			json_object_set_new(j, "msg", json_string(r->msg));
	}
	text = json_dumps(j, JSON_COMPACT);
	json_decref(j);
	return text;
}

static char *dup_nonempty(const json_t *j, const char *k)
{
	const char *s = json_string_value(json_object_get(j, k));
	return s && *s ? kpl_strdup(s) : NULL;
}

int podspec_record_decode(const char *text, struct podspec_record *r)
{
	json_t *j = json_loads(text, 0, NULL), *log;
	const char *st;
	int rc = KPL_EINVAL;

	memset(r, 0, sizeof *r);
	if (!j || json_integer_value(json_object_get(j, "v")) != 1)
		goto out;
	st = json_string_value(json_object_get(j, "state"));
	for (int i = PODSPEC_S_CLAIMED; st && i < PODSPEC_S_LAST; i++)
		if (!strcmp(st, state_names[i]))
			r->state = (enum podspec_state)i;
	r->cluster = dup_nonempty(j, "cluster");
	r->namespace = dup_nonempty(j, "namespace");
	r->pod = dup_nonempty(j, "pod");
	r->secret = dup_nonempty(j, "secret");
	r->msg = dup_nonempty(j, "msg");
	r->result = (int)json_integer_value(json_object_get(j, "result"));
	if ((log = json_object_get(j, "log"))) {
		const char *t = json_string_value(json_object_get(log, "last"));
		if (!t || podspec_time_parse(t, strlen(t), &r->log.last))
			goto out;
		r->log.any = true;
		r->log.n_at_last = (uint32_t)json_integer_value(json_object_get(log, "n"));
	}
	if (r->state == PODSPEC_S_NONE || !r->pod || !r->namespace || !r->cluster)
		goto out;
	rc = 0;
out:
	if (rc)
		podspec_record_release(r);
	json_decref(j);
	return rc;
}
