/*
 * pipeline_test.c - the pipeline parser and validator, the expression
 * language and templates.
 *
 * Fixtures live in testdata/pipelines/{good,bad}; every bad file has its
 * exact first diagnostic in bad_cases below, and a file without an entry
 * fails the test, so a new fixture cannot go unchecked.
 */
#include <dirent.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "base/kpl.h"
#include "pipelines/expr.h"
#include "pipelines/pipeline.h"
#include "pipelines/runs_on.h"
#include "pipelines/template.h"

/* ---- the test kinds (the real ones live in stages/) ---- */

static int with_err(struct kpl_err *err, const char *file,
		    const struct pl_node *n, const char *path, const char *key,
		    const char *msg)
{
	return kpl_errf(err, KPL_EINVAL, "%s:%d:%d: %s%s%s: %s", file, n->pos.line,
			n->pos.col, path, key ? "." : "", key ? key : "", msg);
}

static int check_script(const struct pl_node *with, const char *file,
			const char *path, struct kpl_err *err)
{
	static const char *const allowed[] = { "command", "shell", "workdir", "env",
					       "timeout" };
	if (!with)
		return kpl_errf(err, KPL_EINVAL, "%s: %s: a script stage needs with.command or with.shell",
				file, path);
	for (size_t i = 0; i < with->n; i++) {
		size_t j;
		for (j = 0; j < KPL_ARRAY_SIZE(allowed); j++)
			if (!strcmp(with->keys[i]->scalar, allowed[j]))
				break;
		if (j == KPL_ARRAY_SIZE(allowed))
			return with_err(err, file, with->keys[i], path,
					with->keys[i]->scalar, "unknown key");
	}
	const struct pl_node *cmd = pl_map_get(with, "command");
	const struct pl_node *sh = pl_map_get(with, "shell");
	if (cmd && sh)
		return with_err(err, file, sh, path, "shell",
				"give command or shell, not both");
	if (!cmd && !sh)
		return with_err(err, file, with, path, NULL,
				"a script stage needs command or shell");
	if (cmd && (cmd->type != PL_SEQ || cmd->n == 0))
		return with_err(err, file, cmd, path, "command",
				"expected a non-empty list of strings");
	for (size_t i = 0; cmd && i < cmd->n; i++)
		if (cmd->items[i]->type != PL_SCALAR)
			return with_err(err, file, cmd->items[i], path, "command",
					"expected a string");
	if (sh && sh->type != PL_SCALAR)
		return with_err(err, file, sh, path, "shell", "expected a string");
	const struct pl_node *t = pl_map_get(with, "timeout");
	if (t && (t->type != PL_SCALAR || pl_parse_duration(t->scalar) < 0))
		return with_err(err, file, t, path, "timeout", "bad duration");
	const struct pl_node *env = pl_map_get(with, "env");
	if (env && env->type != PL_MAP)
		return with_err(err, file, env, path, "env", "expected a mapping");
	return 0;
}

static int check_noop(const struct pl_node *with, const char *file,
		      const char *path, struct kpl_err *err)
{
	if (with && with->n)
		return with_err(err, file, with, path, NULL, "a noop stage takes no with");
	return 0;
}

static const char *const script_with_keys[] = { "command", "shell", "workdir", "env",
						 "timeout", NULL };

static const struct pl_kind kinds[] = {
	{ "script", check_script, 0, NULL, script_with_keys, true },
	{ "noop", check_noop },
};

/* ---- fixtures ---- */

static char *fixture_path(const char *rel)
{
	const char *src = getenv("TEST_SRCDIR");
	return kpl_asprintf("%s/kpl/tests/unit/testdata/pipelines/%s",
			    src ? src : ".", rel);
}

static char *read_all(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		fail_msg("cannot open %s", path);
	char *buf = NULL;
	size_t cap = 0, n = 0, got;
	do {
		cap = cap ? cap * 2 : 4096;
		buf = kpl_realloc(buf, cap + 1);
		got = fread(buf + n, 1, cap - n, f);
		n += got;
	} while (n == cap);
	fclose(f);
	buf[n] = '\0';
	*len = n;
	return buf;
}

static int parse_fixture(const char *rel, struct pipeline **out,
			 struct kpl_err *err)
{
	char *path = fixture_path(rel);
	size_t len;
	char *text = read_all(path, &len);
	const char *base = strrchr(rel, '/') ? strrchr(rel, '/') + 1 : rel;
	int rc = pipeline_parse(text, len, base, kinds, KPL_ARRAY_SIZE(kinds),
				out, err);
	free(text);
	free(path);
	return rc;
}

/* ---- bad files: the exact first diagnostic of each ---- */

struct bad_case {
	const char *file;
	int code;
	const char *expect;
};

#define INVAL KPL_EINVAL
#define TOOBIG KPL_ETOOBIG

static const struct bad_case bad_cases[] = {
	{ "alias.yaml", INVAL,
	  "alias.yaml:3:5: stages: aliases (*base) and anchors are not supported: write the value out" },
	{ "anchor.yaml", INVAL,
	  "anchor.yaml:3:5: stages: anchors (&base) and aliases are not supported: write the value out" },
	{ "bad_pipeline_name.yaml", INVAL,
	  "bad_pipeline_name.yaml:1:7: name: pipeline name \"My Pipeline\" is not valid: use lowercase letters, digits, '_', '.' and '-', starting with a letter or digit" },
	{ "bad_stage_name.yaml", INVAL,
	  "bad_stage_name.yaml:3:11: stages[0].name: stage name \"build step\" is not valid: use letters, digits, '_' and '-'" },
	{ "bad_utf8.yaml", INVAL,
	  "bad_utf8.yaml:2:19: cannot read the text: invalid trailing UTF-8 octet" },
	{ "bool_quoted.yaml", INVAL,
	  "bool_quoted.yaml:5:24: stages[0].continue_on_error: expected a bool, found the quoted string \"true\": remove the quotes" },
	{ "bool_yes.yaml", INVAL,
	  "bool_yes.yaml:5:24: stages[0].continue_on_error: expected a bool (true or false), found the value \"yes\"" },
	{ "concurrency_list.yaml", INVAL,
	  "concurrency_list.yaml:2:14: concurrency: expected a group name or a mapping {group, cancel_in_progress}, found a list" },
	{ "concurrency_missing_group.yaml", INVAL,
	  "concurrency_missing_group.yaml:3:3: concurrency.group: missing required key \"group\"" },
	{ "cycle.yaml", INVAL,
	  "cycle.yaml:8:13: stages[1].needs[0]: dependency cycle: a -> c -> b -> a" },
	{ "dup_key.yaml", INVAL,
	  "dup_key.yaml:5:1: name: duplicate key \"name\" (first at 1:1)" },
	{ "dup_stage_name.yaml", INVAL,
	  "dup_stage_name.yaml:6:11: finally[0].name: duplicate stage name \"a\" (first at 3:5)" },
	{ "duration_negative.yaml", INVAL,
	  "duration_negative.yaml:5:14: stages[0].timeout: bad duration \"-5s\": durations cannot be negative" },
	{ "duration_no_unit.yaml", INVAL,
	  "duration_no_unit.yaml:5:14: stages[0].timeout: bad duration \"90\": missing unit: use ms, s, m or h (e.g. 90s)" },
	{ "duration_over_cap.yaml", INVAL,
	  "duration_over_cap.yaml:5:14: stages[0].timeout: bad duration \"721h\": longer than the 30 day limit" },
	{ "duration_overflow.yaml", INVAL,
	  "duration_overflow.yaml:5:14: stages[0].timeout: bad duration \"99999999999999999999h\": longer than the 30 day limit" },
	{ "duration_unit.yaml", INVAL,
	  "duration_unit.yaml:5:14: stages[0].timeout: bad duration \"5x\": unknown unit: use ms, s, m or h" },
	{ "duration_zero.yaml", INVAL,
	  "duration_zero.yaml:5:14: stages[0].timeout: a timeout of 0 would fail at once: leave timeout out for none" },
	{ "run_timeout_zero.yaml", INVAL,
	  "run_timeout_zero.yaml:2:10: timeout: a timeout of 0 would fail the run at once: leave timeout out for none" },
	{ "run_timeout_bad.yaml", INVAL,
	  "run_timeout_bad.yaml:2:10: timeout: bad duration \"2 hours\": unknown unit: use ms, s, m or h" },
	{ "empty.yaml", INVAL,
	  "empty.yaml:1:1: the pipeline is empty: it needs at least name and stages" },
	{ "empty_stages.yaml", INVAL,
	  "empty_stages.yaml:2:9: stages: no stages: a pipeline needs at least one" },
	{ "env_bad_name.yaml", INVAL,
	  "env_bad_name.yaml:3:3: env.MY-VAR: variable name \"MY-VAR\" is not valid: use letters, digits and '_', not starting with a digit" },
	{ "env_not_string.yaml", INVAL,
	  "env_not_string.yaml:7:9: stages[0].env.X: expected a string, found a mapping" },
	{ "json_dup_key.json", INVAL,
	  "json_dup_key.json:3:8: invalid JSON: duplicate object key near '\"name\"'" },
	{ "json_needs_unknown.json", INVAL,
	  "json_needs_unknown.json:2:43: stages[0].needs[0]: unknown stage \"biuld\"" },
	{ "json_trailing_comma.json", INVAL,
	  "json_trailing_comma.json:4:1: invalid JSON: string or '}' expected near '}'" },
	{ "json_unknown_kind.json", INVAL,
	  "json_unknown_kind.json:2:35: stages[0].kind: unknown kind \"shell\" (known: script, noop)" },
	{ "json_wrong_bool.json", INVAL,
	  "json_wrong_bool.json:4:56: stages[0].continue_on_error: expected a bool, found the quoted string \"true\": remove the quotes" },
	{ "missing_name.yaml", INVAL,
	  "missing_name.yaml:1:1: name: missing required key \"name\"" },
	{ "missing_stages.yaml", INVAL,
	  "missing_stages.yaml:1:1: stages: missing required key \"stages\"" },
	{ "multi_doc.yaml", INVAL,
	  "multi_doc.yaml:5:1: a second document: one file holds one pipeline, remove the \"---\"" },
	{ "name_too_long.yaml", TOOBIG,
	  "name_too_long.yaml:3:11: stages[0].name: stage name is 129 characters long; the limit is 128" },
	{ "needs_dup.yaml", INVAL,
	  "needs_dup.yaml:7:16: stages[1].needs[1]: \"a\" is listed twice" },
	{ "needs_finally.yaml", INVAL,
	  "needs_finally.yaml:5:13: stages[0].needs[0]: \"done\" is a finally stage: stages can only need stages of their own list" },
	{ "needs_self.yaml", INVAL,
	  "needs_self.yaml:5:12: stages[0].needs: a stage cannot need itself" },
	{ "needs_unknown.yaml", INVAL,
	  "needs_unknown.yaml:7:13: stages[1].needs[0]: unknown stage \"biuld\"" },
	{ "non_string_key.yaml", INVAL,
	  "non_string_key.yaml:5:3: keys must be strings, found a list as a key" },
	{ "null_key.yaml", INVAL,
	  "null_key.yaml:5:1: keys must be strings, found an empty (null) key" },
	{ "param_bad_name.yaml", INVAL,
	  "param_bad_name.yaml:3:3: params.my param: param name \"my param\" is not valid: use letters, digits, '_' and '-'" },
	{ "param_bad_type.yaml", INVAL,
	  "param_bad_type.yaml:4:11: params.ratio.type: unknown type \"float\" (allowed: string, int, bool)" },
	{ "param_default_type.yaml", INVAL,
	  "param_default_type.yaml:5:14: params.n.default: expected a whole number, found the value \"abc\"" },
	{ "param_enum_default.yaml", INVAL,
	  "param_enum_default.yaml:5:14: params.target.default: default \"qa\" is not one of the enum values" },
	{ "param_required_default.yaml", INVAL,
	  "param_required_default.yaml:5:14: params.v.default: a required param takes no default: drop one of them" },
	{ "param_unknown_key.yaml", INVAL,
	  "param_unknown_key.yaml:4:5: params.v.defualt: unknown key \"defualt\": did you mean \"default\"? (allowed: type, default, required, enum, description)" },
	{ "retries_backoff.yaml", INVAL,
	  "retries_backoff.yaml:8:20: stages[0].retries.max_backoff: max_backoff is shorter than backoff" },
	{ "retries_count.yaml", INVAL,
	  "retries_count.yaml:6:14: stages[0].retries.count: 11 retries: use 0 to 10" },
	{ "retries_not_map.yaml", INVAL,
	  "retries_not_map.yaml:5:14: stages[0].retries: expected a mapping (key: value lines), found the value \"3\"" },
	{ "retries_quoted_count.yaml", INVAL,
	  "retries_quoted_count.yaml:6:14: stages[0].retries.count: expected a whole number, found the quoted string \"3\": remove the quotes" },
	{ "root_not_map.yaml", INVAL,
	  "root_not_map.yaml:1:1: a pipeline is a mapping (name:, stages:, ...), found a list" },
	{ "stage_missing_kind.yaml", INVAL,
	  "stage_missing_kind.yaml:3:5: stages[0].kind: missing required key \"kind\"" },
	{ "stage_name_not_string.yaml", INVAL,
	  "stage_name_not_string.yaml:3:11: stages[0].name: expected a string, found a mapping" },
	{ "stage_unknown_key.yaml", INVAL,
	  "stage_unknown_key.yaml:5:5: stages[0].need: unknown key \"need\": did you mean \"needs\"? (allowed: name, kind, needs, when, timeout, retries, continue_on_error, env, with, runs_on)" },
	{ "stages_not_list.yaml", INVAL,
	  "stages_not_list.yaml:3:3: stages: expected a list, found a mapping" },
	{ "tag.yaml", INVAL,
	  "tag.yaml:1:7: tags (tag:yaml.org,2002:str) are not supported: remove the tag" },
	{ "template_bad_root.yaml", INVAL,
	  "template_bad_root.yaml:6:28: stages[0].with.command[1]: unknown reference \"foo.bar\": references here start with params., stages., env., run., secrets." },
	{ "template_empty.yaml", INVAL,
	  "template_empty.yaml:6:19: stages[0].with.shell: empty \"${{ }}\": put a reference inside, like ${{ params.NAME }}" },
	{ "template_needs_missing.yaml", INVAL,
	  "template_needs_missing.yaml:8:26: stages[1].with.shell: stages.build.outputs.image: stage \"build\" is not in this stage's needs; add it to needs to use its outputs" },
	{ "template_run_field.yaml", INVAL,
	  "template_run_field.yaml:6:23: stages[0].with.shell: bad reference \"run.name\": the only run value is run.id" },
	{ "template_top_env_stage.yaml", INVAL,
	  "template_top_env_stage.yaml:3:10: env.X: stages.a.outputs.y: stages can only be referenced inside a stage" },
	{ "template_unknown_param.yaml", INVAL,
	  "template_unknown_param.yaml:6:23: stages[0].with.shell: unknown param \"versoin\" in params.versoin: declare it under params" },
	{ "template_unknown_stage.yaml", INVAL,
	  "template_unknown_stage.yaml:6:14: stages[0].env.X: unknown stage \"nope\" in stages.nope.outputs.y" },
	{ "template_unterminated.yaml", INVAL,
	  "template_unterminated.yaml:6:19: stages[0].with.shell: unterminated \"${{\": add the closing \"}}\"" },
	{ "too_deep.yaml", TOOBIG,
	  "too_deep.yaml:7:38: stages[0].with.x[0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0]: nested deeper than 32 levels" },
	{ "too_many_params.yaml", TOOBIG,
	  "too_many_params.yaml:3:3: params: 129 params; the limit is 128" },
	{ "too_many_stages.yaml", TOOBIG,
	  "too_many_stages.yaml:3:3: stages: 257 stages (finally included); the limit is 256" },
	{ "unknown_kind.yaml", INVAL,
	  "unknown_kind.yaml:4:11: stages[0].kind: unknown kind \"scirpt\" (known: script, noop)" },
	{ "unknown_top_key.yaml", INVAL,
	  "unknown_top_key.yaml:1:1: stages: missing required key \"stages\" (is \"stagse\" a typo?)" },
	{ "when_env_root.yaml", INVAL,
	  "when_env_root.yaml:5:11: stages[0].when: unknown reference \"env.HOME\": references here start with params., stages." },
	{ "when_needs_missing.yaml", INVAL,
	  "when_needs_missing.yaml:7:11: stages[1].when: stages.a.state: stage \"a\" is not in this stage's needs; add it to needs to read its state" },
	{ "when_wrapped_needs_missing.yaml", INVAL,
	  "when_wrapped_needs_missing.yaml:7:15: stages[1].when: stages.a.state: stage \"a\" is not in this stage's needs; add it to needs to read its state" },
	{ "when_template_part.yaml", INVAL,
	  "when_template_part.yaml:7:11: stages[0].when: unexpected character '$': write the expression bare (a == 'x'), or wrap all of it in one ${{ }}" },
	{ "with_unknown_key.yaml", INVAL,
	  "with_unknown_key.yaml:6:7: stages[0].with.comand: unknown key \"comand\": did you mean \"command\"? (allowed: command, shell, workdir, env, timeout)" },
	{ "when_single_eq.yaml", INVAL,
	  "when_single_eq.yaml:7:22: stages[0].when: '=' is not an operator; compare with '=='" },
	{ "when_syntax.yaml", INVAL,
	  "when_syntax.yaml:5:22: stages[0].when: expected a value, found the end of the expression" },
	{ "when_unbalanced.yaml", INVAL,
	  "when_unbalanced.yaml:7:28: stages[0].when: expected ')' to close '(', found the end of the expression" },
	{ "when_unknown_param.yaml", INVAL,
	  "when_unknown_param.yaml:5:11: stages[0].when: unknown param \"target\" in params.target: declare it under params" },
	{ "with_noop_nonempty.yaml", INVAL,
	  "with_noop_nonempty.yaml:6:7: stages[0].with: a noop stage takes no with" },
	{ "with_not_map.yaml", INVAL,
	  "with_not_map.yaml:5:11: stages[0].with: expected a mapping (key: value lines), found a list" },
	{ "with_script_both.yaml", INVAL,
	  "with_script_both.yaml:6:14: stages[0].with.shell: give command or shell, not both" },
	{ "with_script_empty_command.yaml", INVAL,
	  "with_script_empty_command.yaml:6:16: stages[0].with.command: expected a non-empty list of strings" },
	{ "with_script_missing.yaml", INVAL,
	  "with_script_missing.yaml:3:5: stages[0].with: a script stage needs with.command or with.shell" },
	{ "with_script_timeout.yaml", INVAL,
	  "with_script_timeout.yaml:7:16: stages[0].with.timeout: bad duration" },
	{ "yaml_syntax.yaml", INVAL,
	  "yaml_syntax.yaml:4:4: stages: syntax error: did not find expected '-' indicator (while parsing a block collection at 3:3)" },
	{ "notify_kind_key.yaml", INVAL,
	  "notify_kind_key.yaml:3:28: notify[0].kind: a notifier's kind (wecom, dingtalk, slack) is declared with its url in the daemon config (notifiers.NAME.kind), not here" },
	{ "notify_missing_notifier.yaml", INVAL,
	  "notify_missing_notifier.yaml:3:5: notify[0].notifier: missing required key \"notifier\"" },
	{ "notify_not_list.yaml", INVAL,
	  "notify_not_list.yaml:2:9: notify: expected a list, found the value \"team-chat\"" },
	{ "notify_twice.yaml", INVAL,
	  "notify_twice.yaml:4:17: notify[1].notifier: notifier \"team-chat\" is listed twice (first at 3:5): put all its events in one entry" },
	{ "notify_unknown_event.yaml", INVAL,
	  "notify_unknown_event.yaml:4:23: notify[0].events[1]: unknown event \"faild\": did you mean \"failed\"? (known: started, stage_failed, waiting, succeeded, failed, cancelled)" },
	{ "runs_on_namespace.yaml", INVAL,
	  "runs_on_namespace.yaml:9:18: stages[0].runs_on.namespace: \"CI_Team\" is not a namespace name (lower-case letters, digits and '-', at most 63)" },
	{ "runs_on_no_image.yaml", INVAL,
	  "runs_on_no_image.yaml:5:5: stages[0].runs_on: image: required (the container image to run the command in), here or in defaults.runs_on" },
	{ "runs_on_noop.yaml", INVAL,
	  "runs_on_noop.yaml:5:14: stages[0].runs_on: a noop stage runs in kpld and cannot run as a pod (runs_on is for script stages and local builds)" },
	{ "runs_on_quantity.yaml", INVAL,
	  "runs_on_quantity.yaml:9:38: stages[0].runs_on.resources.limits.memory: \"lots\" is not a quantity (500m, 2, 512Mi, 1Gi)" },
	{ "runs_on_scalar.yaml", INVAL,
	  "runs_on_scalar.yaml:6:14: stages[0].runs_on: expected a mapping (cluster, namespace, image, ...) or `local` for kpld's host; found \"kubernetes\"" },
	{ "runs_on_secret.yaml", INVAL,
	  "runs_on_secret.yaml:6:52: stages[0].runs_on.image: secrets.token would be in the Pod spec, which every reader of pods sees: pass secrets through env (env: { token: \"${{ secrets.token }}\" }), which a pod stage gets through a Kubernetes Secret" },
	{ "runs_on_toleration.yaml", INVAL,
	  "runs_on_toleration.yaml:9:41: stages[0].runs_on.tolerations[0]: effect \"Sometimes\": use NoSchedule, PreferNoSchedule or NoExecute" },
	{ "runs_on_unknown_key.yaml", INVAL,
	  "runs_on_unknown_key.yaml:6:46: stages[0].runs_on.cpu: unknown key (allowed: cluster, namespace, image, resources, service_account, node_selector, tolerations, image_pull_timeout, schedule_timeout, workspace)" },
	{ "yaml_unterminated_quote.yaml", INVAL,
	  "yaml_unterminated_quote.yaml:3:1: syntax error: found unexpected end of stream (while scanning a quoted scalar at 1:7)" },
};

static const struct bad_case *find_bad_case(const char *file)
{
	for (size_t i = 0; i < KPL_ARRAY_SIZE(bad_cases); i++)
		if (!strcmp(bad_cases[i].file, file))
			return &bad_cases[i];
	return NULL;
}

static void test_bad_fixtures(void **state)
{
	char *dir_path = fixture_path("bad");
	DIR *dir = opendir(dir_path);
	struct dirent *de;
	size_t seen = 0, failed = 0;

	assert_non_null(dir);
	while ((de = readdir(dir))) {
		if (de->d_name[0] == '.')
			continue;
		const struct bad_case *bc = find_bad_case(de->d_name);
		char rel[300];
		snprintf(rel, sizeof rel, "bad/%s", de->d_name);
		struct pipeline *p = (struct pipeline *)1;
		struct kpl_err err = { 0 };
		int rc = parse_fixture(rel, &p, &err);
		seen++;
		if (!bc) {
			print_error("%s: no entry in bad_cases; got:\n  { \"%s\", %s, \"%s\" },\n",
				    de->d_name, de->d_name,
				    rc == KPL_ETOOBIG ? "TOOBIG" : "INVAL", err.msg);
			failed++;
			continue;
		}
		if (rc != bc->code || strcmp(err.msg, bc->expect) != 0 || p != NULL) {
			print_error("%s:\n  want %s \"%s\"\n  got  %s \"%s\"\n", de->d_name,
				    kpl_err_name(bc->code), bc->expect,
				    kpl_err_name(rc), err.msg);
			failed++;
		}
	}
	closedir(dir);
	free(dir_path);
	assert_int_equal(failed, 0);
	/* Every table entry has its file. */
	assert_int_equal(seen, KPL_ARRAY_SIZE(bad_cases));
	assert_true(seen >= 40);
}

/* ---- good files ---- */

/* runs_on: the defaults' keys under each script stage's own, local opting
 * out, and none for kinds without runs_on. */
static void test_runs_on(void **state)
{
	struct pipeline *p = NULL;
	struct kpl_err err = { 0 };
	const struct pl_stage *st;

	(void)state;
	assert_int_equal(parse_fixture("good/runs_on.yaml", &p, &err), 0);
	st = &p->stages[0]; /* compile: the defaults alone */
	assert_null(st->runs_on);
	assert_true(pl_runs_on_pod(st->runs_on, st->runs_on_defaults));
	assert_string_equal(pl_runs_on_get(st->runs_on, st->runs_on_defaults, "image")->scalar,
			    "golang:${{ params.go }}");
	st = &p->stages[1]; /* image: its own image over the defaults' */
	assert_true(pl_runs_on_pod(st->runs_on, st->runs_on_defaults));
	assert_string_equal(pl_runs_on_get(st->runs_on, st->runs_on_defaults, "image")->scalar,
			    "quay.io/buildah/stable");
	assert_string_equal(pl_runs_on_get(st->runs_on, st->runs_on_defaults, "cluster")->scalar,
			    "kind");
	assert_string_equal(pl_runs_on_get(st->runs_on, st->runs_on_defaults,
					   "schedule_timeout")->scalar, "2m");
	st = &p->stages[2]; /* notes: local */
	assert_false(pl_runs_on_pod(st->runs_on, st->runs_on_defaults));
	st = &p->stages[3]; /* gate: a noop */
	assert_null(st->runs_on_defaults);
	assert_false(pl_runs_on_pod(st->runs_on, st->runs_on_defaults));
	pipeline_free(p);
}


static void test_good_fixtures_parse(void **state)
{
	static const char *const files[] = {
		"good/full.yaml", "good/full.json", "good/minimal.yaml",
		"good/minimal.json", "good/block_scalars.yaml", "good/diamond.yaml",
		"good/notify.yaml", "good/when_wrapped.yaml", "good/runs_on.yaml",
	};
	for (size_t i = 0; i < KPL_ARRAY_SIZE(files); i++) {
		struct pipeline *p = NULL;
		struct kpl_err err = { 0 };
		int rc = parse_fixture(files[i], &p, &err);
		if (rc != 0)
			fail_msg("%s: %s", files[i], err.msg);
		assert_non_null(p);
		assert_true(p->n_stages > 0);
		pipeline_free(p);
	}
}

/* A when wrapped whole in ${{ }} (as GitHub Actions writes it) is the
 * expression inside. */
static void test_when_wrapped(void **state)
{
	struct pipeline *p = NULL;
	struct kpl_err err = { 0 };

	(void)state;
	assert_int_equal(parse_fixture("good/when_wrapped.yaml", &p, &err), 0);
	assert_string_equal(p->stages[1].when, "stages.a.outputs.ver == '7'");
	assert_int_equal(p->stages[1].when_expr->kind, EXPR_EQ);
	assert_int_equal(p->stages[2].when_expr->kind, EXPR_AND);
	pipeline_free(p);
}

/* notify: names and events as bits in PL_NOTIFY_EVENT_MAP order; a
 * missing events list means every event. */
static void test_notify_model(void **state)
{
	struct pipeline *p = NULL;
	struct kpl_err err = { 0 };

	(void)state;
	if (parse_fixture("good/notify.yaml", &p, &err) != 0)
		fail_msg("%s", err.msg);
	assert_int_equal(p->n_notify, 2);
	assert_string_equal(p->notify[0].notifier, "team-chat");
	assert_int_equal(p->notify[0].events, (1u << PL_NOTIFY_STAGE_FAILED) |
						   (1u << PL_NOTIFY_WAITING) |
						   (1u << PL_NOTIFY_FAILED));
	assert_int_equal(p->notify[0].pos.line, 3);
	assert_string_equal(p->notify[1].notifier, "ops");
	assert_int_equal(p->notify[1].events, (1u << PL_NOTIFY_LAST) - 1);
	assert_string_equal(pl_notify_event_name(PL_NOTIFY_STAGE_FAILED), "stage_failed");
	assert_string_equal(pl_notify_event_name(PL_NOTIFY_LAST), "?");
	pipeline_free(p);
}

static void assert_env(const struct pl_env *e, const char *name, const char *value)
{
	assert_string_equal(e->name, name);
	assert_string_equal(e->value, value);
}

/* The model of full.yaml / full.json, field by field. */
static void check_full_model(const struct pipeline *p)
{
	assert_string_equal(p->name, "release.web-app_2");
	assert_string_equal(p->description, "Build, test and ship the web app");

	assert_int_equal(p->n_params, 4);
	assert_string_equal(p->params[0].name, "version");
	assert_int_equal(p->params[0].type, PL_TYPE_STRING);
	assert_true(p->params[0].required);
	assert_null(p->params[0].def);
	assert_string_equal(p->params[1].name, "replicas");
	assert_int_equal(p->params[1].type, PL_TYPE_INT);
	assert_string_equal(p->params[1].def, "3");
	assert_string_equal(p->params[2].name, "dry_run");
	assert_int_equal(p->params[2].type, PL_TYPE_BOOL);
	assert_string_equal(p->params[2].def, "false");
	assert_false(p->params[2].required);
	assert_string_equal(p->params[3].name, "target");
	assert_int_equal(p->params[3].n_enum, 2);
	assert_string_equal(p->params[3].enum_values[0], "staging");
	assert_string_equal(p->params[3].enum_values[1], "prod");
	assert_string_equal(p->params[3].def, "staging");

	assert_int_equal(p->n_env, 2);
	assert_env(&p->env[0], "REGION", "eu-west-1");
	assert_env(&p->env[1], "TAG", "v${{ params.version }}");
	assert_string_equal(p->concurrency.group, "release-${{ params.target }}");
	assert_true(p->concurrency.cancel_in_progress);

	assert_int_equal(p->n_stages, 5);
	assert_int_equal(p->n_finally, 2);
	const struct pl_stage *s = p->stages;
	assert_string_equal(s[0].name, "build");
	assert_string_equal(s[0].kind, "script");
	assert_int_equal(s[0].timeout_ms, 10 * 60 * 1000);
	assert_int_equal(s[0].n_needs, 0);
	assert_false(s[0].is_finally);
	assert_non_null(s[0].with);
	const struct pl_node *cmd = pl_map_get(s[0].with, "command");
	assert_non_null(cmd);
	assert_int_equal(cmd->type, PL_SEQ);
	assert_int_equal(cmd->n, 2);
	assert_string_equal(cmd->items[1]->scalar, "VERSION=${{ params.version }}");
	assert_string_equal(pl_map_get(s[0].with, "workdir")->scalar, "/src");

	assert_string_equal(s[1].name, "test");
	assert_int_equal(s[1].n_needs, 1);
	assert_string_equal(s[1].needs[0], "build");
	assert_int_equal(s[1].retries.count, 2);
	assert_int_equal(s[1].retries.backoff_ms, 5000);
	assert_int_equal(s[1].retries.max_backoff_ms, 60000);
	assert_int_equal(s[1].timeout_ms, 0);
	assert_null(s[1].when);

	assert_string_equal(s[2].name, "deploy");
	assert_string_equal(s[2].when, "params.target == 'prod' && !params.dry_run");
	assert_non_null(s[2].when_expr);
	assert_int_equal(s[2].when_expr->kind, EXPR_AND);
	assert_true(s[2].continue_on_error);
	assert_int_equal(s[2].n_env, 3);
	assert_env(&s[2].env[0], "IMAGE", "${{ stages.build.outputs.image }}");
	assert_env(&s[2].env[2], "TOKEN", "${{ secrets.deploy_token }}");
	assert_int_equal(s[2].retries.count, 0);

	assert_string_equal(s[3].name, "notify");
	assert_string_equal(s[3].kind, "noop");
	assert_true(s[3].is_finally);
	assert_null(s[3].with);
	assert_string_equal(s[4].name, "cleanup");
	assert_true(s[4].is_finally);
	assert_int_equal(s[4].n_needs, 1);
	assert_string_equal(s[4].needs[0], "notify");
}

/* Every node the same: type, text, keys. Positions differ, and so does
 * quoting (JSON quotes every string); check_full_model covers the typed
 * values that depend on it. */
static void assert_same_tree(const struct pl_node *a, const struct pl_node *b)
{
	assert_int_equal(a->type, b->type);
	if (a->type == PL_SCALAR) {
		assert_string_equal(a->scalar, b->scalar);
		return;
	}
	assert_int_equal(a->n, b->n);
	for (size_t i = 0; i < a->n; i++) {
		if (a->type == PL_MAP)
			assert_string_equal(a->keys[i]->scalar, b->keys[i]->scalar);
		assert_same_tree(a->items[i], b->items[i]);
	}
}

static void test_yaml_and_json_same_model(void **state)
{
	struct pipeline *y = NULL, *j = NULL;
	struct kpl_err err = { 0 };

	if (parse_fixture("good/full.yaml", &y, &err) != 0)
		fail_msg("%s", err.msg);
	if (parse_fixture("good/full.json", &j, &err) != 0)
		fail_msg("%s", err.msg);
	check_full_model(y);
	check_full_model(j);
	assert_same_tree(y->root, j->root);
	/* Positions come from the file each was read from. */
	assert_int_equal(y->stages[0].pos.line, 26);
	assert_int_equal(y->stages[0].pos.col, 5);
	assert_int_equal(j->stages[0].pos.line, 16);
	assert_int_equal(j->stages[0].pos.col, 5);
	pipeline_free(y);
	pipeline_free(j);

	struct pipeline *a = NULL, *b = NULL;
	assert_int_equal(parse_fixture("good/minimal.yaml", &a, &err), 0);
	assert_int_equal(parse_fixture("good/minimal.json", &b, &err), 0);
	assert_same_tree(a->root, b->root);
	assert_string_equal(b->stages[0].name, "say");
	assert_string_equal(pl_map_get(b->stages[0].with, "shell")->scalar, "echo hello");
	pipeline_free(a);
	pipeline_free(b);
}

static void test_block_scalars_model(void **state)
{
	struct pipeline *p = NULL;
	struct kpl_err err = { 0 };

	if (parse_fixture("good/block_scalars.yaml", &p, &err) != 0)
		fail_msg("%s", err.msg);
	assert_string_equal(p->name, "blocks");
	assert_int_equal(p->n_params, 1);
	assert_int_equal(p->params[0].type, PL_TYPE_STRING);
	assert_null(p->params[0].def);
	assert_env(&p->env[0], "PORT", "8080");
	assert_env(&p->env[1], "EMPTY", "");
	assert_string_equal(p->concurrency.group, "blocks-${{ params.who }}");
	assert_false(p->concurrency.cancel_in_progress);
	assert_int_equal(p->stages[0].timeout_ms, 90 * 60 * 1000);
	assert_string_equal(pl_map_get(p->stages[0].with, "shell")->scalar,
			    "echo \"hello ${{ params.who }}\"\necho '$${{ not a template }}'\n");
	assert_string_equal(p->stages[1].needs[0], "1st-step");
	/* `with: {}` is present and empty (`with:` alone would be NULL). */
	assert_non_null(p->stages[1].with);
	assert_int_equal(p->stages[1].with->n, 0);
	assert_string_equal(p->stages[1].when,
			    "stages.1st-step.state == 'succeeded' || params.who != \"\"");
	pipeline_free(p);
}

/* ---- limits built in memory (too large to keep as files) ---- */

static int parse_text(const char *text, size_t len, struct kpl_err *err)
{
	struct pipeline *p = NULL;
	int rc = pipeline_parse(text, len, "mem", kinds, KPL_ARRAY_SIZE(kinds), &p, err);
	pipeline_free(p);
	return rc;
}

static void test_limits_in_memory(void **state)
{
	struct kpl_err err = { 0 };
	size_t big = KPL_MAX_PIPELINE_BYTES + 1;
	char *text = kpl_malloc(big + 1);

	memset(text, ' ', big);
	text[big] = '\0';
	assert_int_equal(parse_text(text, big, &err), KPL_ETOOBIG);
	assert_string_equal(err.msg, "mem:1:1: the pipeline is 1048577 bytes; the limit is 1048576");

	/* One scalar over KPL_MAX_VALUE_LEN. */
	size_t n = (size_t)sprintf(text, "name: p\ndescription: ");
	memset(text + n, 'x', KPL_MAX_VALUE_LEN + 1);
	n += KPL_MAX_VALUE_LEN + 1;
	n += (size_t)sprintf(text + n, "\nstages: []\n");
	assert_int_equal(parse_text(text, n, &err), KPL_ETOOBIG);
	assert_string_equal(err.msg, "mem:2:14: a value of 65537 bytes; the limit is 65536");

	/* More nodes than PL_MAX_NODES, each tiny. */
	n = (size_t)sprintf(text, "name: p\nstages: []\ndescription: [");
	for (int i = 0; i < PL_MAX_NODES; i++)
		n += (size_t)sprintf(text + n, "1,");
	n += (size_t)sprintf(text + n, "1]\n");
	assert_true(n < big);
	assert_int_equal(parse_text(text, n, &err), KPL_ETOOBIG);
	assert_string_equal(err.msg, "mem:3:200001: description: more than 100000 values in the document");

	/* A NUL inside the text and a NUL escape. */
	assert_int_equal(parse_text("name: p\0x\nstages: []\n", 20, &err), KPL_EINVAL);
	assert_string_equal(err.msg, "mem:1:8: cannot read the text: control characters are not allowed");
	const char *nul = "name: \"a\\0b\"\nstages: []\n";
	assert_int_equal(parse_text(nul, strlen(nul), &err), KPL_EINVAL);
	assert_string_equal(err.msg, "mem:1:7: a value holds a NUL character");
	/* Not even one byte. */
	assert_int_equal(parse_text("", 0, &err), KPL_EINVAL);
	assert_string_equal(err.msg, "mem:1:1: the pipeline is empty: it needs at least name and stages");
	free(text);
}

/* ---- every diagnostic, not only the first ---- */

static void test_validate_all(void **state)
{
	const char *text =
		"name: p\n"
		"stages:\n"
		"  - name: a\n"
		"    kind: nope\n"
		"  - name: b\n"
		"    kind: noop\n"
		"    needs: [zz]\n"
		"    timeout: 1y\n"
		"  - kind: noop\n";
	struct pl_diag *d = NULL;
	size_t n = 0;
	char line[600];

	int rc = pipeline_validate_all(text, strlen(text), "f.yaml", kinds,
				       KPL_ARRAY_SIZE(kinds), &d, &n);
	assert_int_equal(rc, KPL_EINVAL);
	assert_int_equal(n, 4);
	pl_diag_format(&d[0], "f.yaml", line, sizeof line);
	assert_string_equal(line, "f.yaml:4:11: stages[0].kind: unknown kind \"nope\" (known: script, noop)");
	assert_int_equal(d[1].line, 7);
	assert_int_equal(d[1].col, 13);
	assert_string_equal(d[1].path, "stages[1].needs[0]");
	assert_string_equal(d[1].message, "unknown stage \"zz\"");
	assert_string_equal(d[2].path, "stages[1].timeout");
	assert_string_equal(d[2].message, "bad duration \"1y\": unknown unit: use ms, s, m or h");
	assert_int_equal(d[3].line, 9);
	assert_string_equal(d[3].path, "stages[2].name");
	assert_string_equal(d[3].message, "missing required key \"name\"");
	pl_diags_free(d, n);

	/* A syntax error ends the scan with one diagnostic. */
	const char *bad = "name: [\n";
	rc = pipeline_validate_all(bad, strlen(bad), NULL, kinds, 2, &d, &n);
	assert_int_equal(rc, KPL_EINVAL);
	assert_int_equal(n, 1);
	assert_int_equal(d[0].code, KPL_EINVAL);
	pl_diags_free(d, n);

	/* Valid: nothing. */
	const char *good = "name: p\nstages: [{name: a, kind: noop}]\n";
	rc = pipeline_validate_all(good, strlen(good), NULL, kinds, 2, &d, &n);
	assert_int_equal(rc, 0);
	assert_int_equal(n, 0);
	assert_null(d);
}

/* ---- durations ---- */

static void test_durations(void **state)
{
	const char *why;
	int64_t ms;

	assert_int_equal(pl_parse_duration("250ms"), 250);
	assert_int_equal(pl_parse_duration("90s"), 90000);
	assert_int_equal(pl_parse_duration("5m"), 300000);
	assert_int_equal(pl_parse_duration("1h"), 3600000);
	assert_int_equal(pl_parse_duration("1h30m"), 5400000);
	assert_int_equal(pl_parse_duration("1h1m1s1ms"), 3661001);
	assert_int_equal(pl_parse_duration("0s"), 0);
	assert_int_equal(pl_parse_duration("720h"), PL_MAX_DURATION_MS);
	assert_int_equal(pl_parse_duration("721h"), -1);
	assert_int_equal(pl_parse_duration("2592000001ms"), -1);
	assert_int_equal(pl_parse_duration("99999999999999999999999s"), -1);
	assert_int_equal(pl_parse_duration(""), -1);
	assert_int_equal(pl_parse_duration(NULL), -1);
	assert_int_equal(pl_parse_duration("-5s"), -1);
	assert_int_equal(pl_parse_duration("5"), -1);
	assert_int_equal(pl_parse_duration("5d"), -1);
	assert_int_equal(pl_parse_duration("1.5h"), -1);
	assert_int_equal(pl_parse_duration("30m1h"), -1);
	assert_int_equal(pl_parse_duration("1m1m"), -1);
	assert_int_equal(pl_parse_duration(" 5s"), -1);
	assert_int_equal(pl_parse_duration("5s "), -1);
	assert_int_equal(pl_duration_parse("5d", &ms, &why), KPL_EINVAL);
	assert_string_equal(why, "unknown unit: use ms, s, m or h");
	assert_int_equal(ms, -1);
}

/* The run-level timeout: a duration like a stage's, none when left out. */
static void test_run_timeout(void **state)
{
	static const char with[] = "name: p\ntimeout: 1h30m\nstages:\n  - { name: a, kind: noop }\n";
	static const char without[] = "name: p\nstages:\n  - { name: a, kind: noop }\n";
	struct pipeline *p = NULL;
	struct kpl_err err = { 0 };

	(void)state;
	assert_int_equal(pipeline_parse(with, sizeof with - 1, "pipeline", kinds,
					KPL_ARRAY_SIZE(kinds), &p, &err), 0);
	assert_int_equal(p->timeout_ms, 5400000);
	pipeline_free(p);
	assert_int_equal(pipeline_parse(without, sizeof without - 1, "pipeline", kinds,
					KPL_ARRAY_SIZE(kinds), &p, &err), 0);
	assert_int_equal(p->timeout_ms, 0);
	pipeline_free(p);
}

/* ---- params at run time ---- */

static void test_resolve_params(void **state)
{
	const char *text =
		"name: p\n"
		"params:\n"
		"  version: {required: true}\n"
		"  replicas: {type: int, default: 3}\n"
		"  dry_run: {type: bool}\n"
		"  target: {enum: [staging, prod], default: staging}\n"
		"  note:\n"
		"stages: [{name: a, kind: noop}]\n";
	struct pipeline *p = NULL;
	struct kpl_err err = { 0 };
	char **names, **values;
	size_t n;

	assert_int_equal(pipeline_parse(text, strlen(text), NULL, kinds, 2, &p, &err), 0);

	const char *in_names[] = { "target", "version" };
	const char *in_values[] = { "prod", "1.2.3" };
	assert_int_equal(pipeline_resolve_params(p, in_names, in_values, 2, &names,
						 &values, &n, &err), 0);
	assert_int_equal(n, 5);
	const char *want_names[] = { "version", "replicas", "dry_run", "target", "note" };
	const char *want_values[] = { "1.2.3", "3", "false", "prod", "" };
	for (size_t i = 0; i < n; i++) {
		assert_string_equal(names[i], want_names[i]);
		assert_string_equal(values[i], want_values[i]);
		free(names[i]);
		free(values[i]);
	}
	free(names);
	free(values);

	struct {
		const char *name, *value, *expect;
	} bad[] = {
		{ "replicas", "three", "params.replicas: \"three\" is not a whole number" },
		{ "replicas", "99999999999999999999", "params.replicas: \"99999999999999999999\" is not a whole number" },
		{ "dry_run", "yes", "params.dry_run: \"yes\" is not true or false" },
		{ "target", "qa", "params.target: \"qa\" is not one of: staging, prod" },
		{ "colour", "red", "params.colour: the pipeline declares no such param "
				   "(declared: version, replicas, dry_run, target, note)" },
		{ "tagret", "prod", "params.tagret: the pipeline declares no such param: did "
				    "you mean \"target\"? (declared: version, replicas, dry_run, "
				    "target, note)" },
	};
	for (size_t i = 0; i < KPL_ARRAY_SIZE(bad); i++) {
		const char *bn[] = { "version", bad[i].name };
		const char *bv[] = { "1", bad[i].value };
		assert_int_equal(pipeline_resolve_params(p, bn, bv, 2, &names, &values,
							 &n, &err), KPL_EINVAL);
		assert_string_equal(err.msg, bad[i].expect);
		assert_null(names);
	}
	/* Required and missing. */
	assert_int_equal(pipeline_resolve_params(p, NULL, NULL, 0, &names, &values,
						 &n, &err), KPL_EINVAL);
	assert_string_equal(err.msg, "params.version: required, and no value was given");
	/* Given twice. */
	const char *twice[] = { "version", "version" };
	assert_int_equal(pipeline_resolve_params(p, twice, in_values, 2, &names,
						 &values, &n, &err), KPL_EINVAL);
	assert_string_equal(err.msg, "params.version: given twice");
	pipeline_free(p);
}

/* ---- expressions ---- */

struct kv {
	const char *key, *value;
};

static const struct kv lookup_table[] = {
	{ "params.env", "prod" },
	{ "params.n", "3" },
	{ "params.flag", "true" },
	{ "params.off", "false" },
	{ "stages.build.state", "succeeded" },
	{ "stages.build.outputs.image", "reg/app:1" },
	{ "run.id", "r-42" },
	{ "secrets.token", "s3cret" },
	{ "env.HOME", "/root" },
};

static int lookup(void *data, const struct expr *ref, const char **value)
{
	int *calls = data;
	if (calls)
		(*calls)++;
	for (size_t i = 0; i < KPL_ARRAY_SIZE(lookup_table); i++) {
		if (!strcmp(lookup_table[i].key, ref->str)) {
			*value = lookup_table[i].value;
			return 0;
		}
	}
	return KPL_ENOTFOUND;
}

/* Evaluates s (when roots + the template roots) to a bool; -1 if it
 * fails, with the message in err. */
static int eval_bool(const char *s, struct kpl_err *err, int *calls)
{
	struct expr *e;
	size_t off;
	bool b;

	if (expr_parse(s, strlen(s), EXPR_ROOTS_TEMPLATE, &e, &off, err) < 0)
		fail_msg("parse %s: %s", s, err->msg);
	int rc = expr_eval_bool(e, lookup, calls, &b, err);
	expr_free(e);
	return rc < 0 ? -1 : b;
}

static void test_expr_eval(void **state)
{
	struct kpl_err err = { 0 };
	struct {
		const char *expr;
		int want;
	} cases[] = {
		{ "params.env == 'prod'", 1 },
		{ "params.env == \"prod\"", 1 },
		{ "params.env != 'prod'", 0 },
		{ "'prod' == params.env", 1 },
		{ "params.n == 3", 1 },
		{ "params.n == 4", 0 },
		{ "params.n != -3", 1 },
		{ "params.flag", 1 },
		{ "!params.flag", 0 },
		{ "params.flag == true", 1 },
		{ "params.off == false", 1 },
		{ "!params.off && params.flag", 1 },
		{ "params.off || params.env == 'prod'", 1 },
		{ "params.off || params.env == 'dev'", 0 },
		{ "true && !(false || false)", 1 },
		{ "!!true", 1 },
		{ "3 == 3 && 'a' != 'b'", 1 },
		{ "1 == true", 0 },
		{ "stages.build.state == 'succeeded' && stages.build.outputs.image == 'reg/app:1'", 1 },
		{ "(params.env == 'prod' || params.env == 'staging') && !(params.n == 0)", 1 },
		{ "true || false && false", 1 }, /* && binds tighter */
		{ "(true || false) && false", 0 },
	};
	for (size_t i = 0; i < KPL_ARRAY_SIZE(cases); i++) {
		int got = eval_bool(cases[i].expr, &err, NULL);
		if (got != cases[i].want)
			fail_msg("%s: want %d, got %d (%s)", cases[i].expr,
				 cases[i].want, got, err.msg);
	}

	/* Short circuit: the right side is not looked up. */
	int calls = 0;
	assert_int_equal(eval_bool("params.off && stages.gone.state == 'x'", &err, &calls), 0);
	assert_int_equal(calls, 1);
	calls = 0;
	assert_int_equal(eval_bool("params.flag || params.missing == 'x'", &err, &calls), 1);
	assert_int_equal(calls, 1);

	/* Evaluation errors name the problem. */
	assert_int_equal(eval_bool("params.missing == 'x'", &err, NULL), -1);
	assert_string_equal(err.msg, "params.missing: no such value");
	assert_int_equal(eval_bool("params.env && true", &err, NULL), -1);
	assert_string_equal(err.msg, "expected a bool, found the string \"prod\"");
	assert_int_equal(eval_bool("3", &err, NULL), -1);
	assert_string_equal(err.msg, "expected a bool, found the number 3");

	/* Values as text. */
	struct expr *e;
	struct expr_value v;
	size_t off;
	assert_int_equal(expr_parse("params.n", 8, EXPR_ROOTS_WHEN, &e, &off, &err), 0);
	assert_int_equal(e->kind, EXPR_REF);
	assert_int_equal(e->n_part, 2);
	assert_string_equal(e->part[0], "params");
	assert_string_equal(e->part[1], "n");
	assert_int_equal(expr_eval(e, lookup, NULL, &v, &err), 0);
	assert_int_equal(v.type, EXPR_T_STR);
	assert_string_equal(v.str, "3");
	expr_value_release(&v);
	expr_free(e);
}

static void test_expr_syntax_errors(void **state)
{
	struct {
		const char *expr;
		unsigned roots;
		size_t off;
		const char *msg;
	} cases[] = {
		{ "", EXPR_ROOTS_WHEN, 0, "empty expression" },
		{ "   ", EXPR_ROOTS_WHEN, 0, "empty expression" },
		{ "params.x ==", EXPR_ROOTS_WHEN, 11, "expected a value, found the end of the expression" },
		{ "params.x = 'a'", EXPR_ROOTS_WHEN, 9, "'=' is not an operator; compare with '=='" },
		{ "true & false", EXPR_ROOTS_WHEN, 5, "'&' is not an operator; use '&&'" },
		{ "true | false", EXPR_ROOTS_WHEN, 5, "'|' is not an operator; use '||'" },
		{ "(true", EXPR_ROOTS_WHEN, 5, "expected ')' to close '(', found the end of the expression" },
		{ "true)", EXPR_ROOTS_WHEN, 4, "unbalanced ')': no '(' to close" },
		{ "'abc", EXPR_ROOTS_WHEN, 0, "unterminated string: add the closing '" },
		{ "1 == 1 == 1", EXPR_ROOTS_WHEN, 7, "comparisons do not chain; use parentheses and '&&'" },
		{ "true false", EXPR_ROOTS_WHEN, 5, "expected an operator (==, !=, &&, ||) or the end, found 'false'" },
		{ "prod", EXPR_ROOTS_WHEN, 0, "unknown name \"prod\": strings need quotes, and references start with params., stages." },
		{ "env.HOME", EXPR_ROOTS_WHEN, 0, "unknown reference \"env.HOME\": references here start with params., stages." },
		{ "params", EXPR_ROOTS_WHEN, 0, "bad reference \"params\": write params.NAME" },
		{ "params.a.b", EXPR_ROOTS_WHEN, 0, "bad reference \"params.a.b\": write params.NAME" },
		{ "stages.a.outputs", EXPR_ROOTS_WHEN, 0, "bad reference \"stages.a.outputs\": write stages.NAME.state or stages.NAME.outputs.KEY" },
		{ "stages.a.status", EXPR_ROOTS_WHEN, 0, "bad reference \"stages.a.status\": write stages.NAME.state or stages.NAME.outputs.KEY" },
		{ "x == run.name", EXPR_ROOTS_TEMPLATE, 0, "unknown name \"x\": strings need quotes, and references start with params., stages., env., run., secrets." },
		{ "run.name", EXPR_ROOTS_TEMPLATE, 0, "bad reference \"run.name\": the only run value is run.id" },
		{ "params..x", EXPR_ROOTS_WHEN, 0, "bad reference \"params..x\": empty part" },
		{ "12ab", EXPR_ROOTS_WHEN, 0, "bad number: only whole decimal numbers are allowed" },
		{ "99999999999999999999", EXPR_ROOTS_WHEN, 0, "number out of range" },
		{ "true @ false", EXPR_ROOTS_WHEN, 5, "unexpected character '@'" },
		{ "${{ true }} && true", EXPR_ROOTS_WHEN, 0, "unexpected character '$': write the expression bare (a == 'x'), or wrap all of it in one ${{ }}" },
	};
	for (size_t i = 0; i < KPL_ARRAY_SIZE(cases); i++) {
		struct expr *e = (struct expr *)1;
		struct kpl_err err = { 0 };
		size_t off = 999;
		int rc = expr_parse(cases[i].expr, strlen(cases[i].expr), cases[i].roots,
				    &e, &off, &err);
		if (rc != KPL_EINVAL || off != cases[i].off ||
		    strcmp(err.msg, cases[i].msg) != 0 || e != NULL)
			fail_msg("%s: want %zu \"%s\", got rc %d off %zu \"%s\"",
				 cases[i].expr, cases[i].off, cases[i].msg, rc, off,
				 err.msg);
	}

	/* Nesting and size caps keep recursion bounded. */
	char deep[200];
	memset(deep, '(', 100);
	deep[100] = '\0';
	struct expr *e;
	struct kpl_err err;
	size_t off;
	assert_int_equal(expr_parse(deep, 100, EXPR_ROOTS_WHEN, &e, &off, &err), KPL_EINVAL);
	assert_int_equal(off, EXPR_MAX_NESTING);
	assert_string_equal(err.msg, "expression nested too deeply (more than 64 levels)");
	memset(deep, '!', 100);
	strcpy(deep + 100, "true");
	assert_int_equal(expr_parse(deep, strlen(deep), EXPR_ROOTS_WHEN, &e, &off, &err), KPL_EINVAL);
	size_t len = 0;
	char *chain = kpl_malloc(20000);
	for (int i = 0; i < 1500; i++)
		len += (size_t)sprintf(chain + len, "%strue", i ? "||" : "");
	assert_int_equal(expr_parse(chain, len, EXPR_ROOTS_WHEN, &e, &off, &err), KPL_EINVAL);
	assert_string_equal(err.msg, "expression too long: more than 1000 terms");
	free(chain);
}

/* ---- templates ---- */

static void test_template_expand(void **state)
{
	struct kpl_err err = { 0 };
	char *out;
	struct {
		const char *in, *out;
	} cases[] = {
		{ "plain text", "plain text" },
		{ "", "" },
		{ "${{ params.env }}", "prod" },
		{ "img=${{stages.build.outputs.image}} run=${{ run.id }}!", "img=reg/app:1 run=r-42!" },
		{ "${{ params.n == 3 }}", "true" },
		{ "${{ 42 }}-${{ 'lit}}eral' }}", "42-lit}}eral" },
		{ "cost: $${{ not expanded }} ${{ secrets.token }}", "cost: ${{ not expanded }} s3cret" },
		{ "${ not one } ${HOME} $5", "${ not one } ${HOME} $5" },
		{ "${{ env.HOME }}/bin", "/root/bin" },
	};
	for (size_t i = 0; i < KPL_ARRAY_SIZE(cases); i++) {
		int rc = tpl_expand_str(cases[i].in, EXPR_ROOTS_TEMPLATE, lookup, NULL,
					&out, &err);
		if (rc != 0)
			fail_msg("%s: %s", cases[i].in, err.msg);
		assert_string_equal(out, cases[i].out);
		free(out);
	}

	struct {
		const char *in;
		int code;
		const char *msg;
	} bad[] = {
		{ "a ${{ params.env", KPL_EINVAL, "column 3: unterminated \"${{\": add the closing \"}}\"" },
		{ "${{ }}", KPL_EINVAL, "column 1: empty \"${{ }}\": put a reference inside, like ${{ params.NAME }}" },
		{ "x ${{ params.env = 1 }}", KPL_EINVAL, "column 18: '=' is not an operator; compare with '=='" },
		{ "${{ stages.nope.outputs.x }}", KPL_ENOTFOUND, "stages.nope.outputs.x: no such value" },
		{ "${{ foo }}", KPL_EINVAL, "column 5: unknown name \"foo\": strings need quotes, and references start with params., stages., env., run., secrets." },
	};
	for (size_t i = 0; i < KPL_ARRAY_SIZE(bad); i++) {
		out = (char *)1;
		int rc = tpl_expand_str(bad[i].in, EXPR_ROOTS_TEMPLATE, lookup, NULL,
					&out, &err);
		if (rc != bad[i].code || strcmp(err.msg, bad[i].msg) != 0)
			fail_msg("%s: want %d \"%s\", got %d \"%s\"", bad[i].in,
				 bad[i].code, bad[i].msg, rc, err.msg);
		assert_null(out);
	}

	/* Parse once, expand many times; parts are kept apart. */
	struct tpl *t;
	size_t off;
	assert_int_equal(tpl_parse("a${{ params.n }}b", EXPR_ROOTS_TEMPLATE, &t, &off, &err), 0);
	assert_int_equal(t->n_parts, 3);
	assert_string_equal(t->parts[0].text, "a");
	assert_non_null(t->parts[1].expr);
	assert_int_equal(t->parts[1].off, 1);
	assert_int_equal(t->parts[1].expr_off, 4);
	assert_string_equal(t->parts[2].text, "b");
	for (int i = 0; i < 3; i++) {
		assert_int_equal(tpl_expand(t, lookup, NULL, &out, &err), 0);
		assert_string_equal(out, "a3b");
		free(out);
	}
	tpl_free(t);
	assert_true(tpl_has_template("x ${{ y }}"));
	assert_false(tpl_has_template("x ${ y }"));
}

/* ---- secret references (engine/secrets.h limits who may use one) ---- */

struct refs {
	char names[8][32];
	struct pl_pos pos[8];
	int n;
};

static int collect_ref(void *data, const char *name, struct pl_pos pos)
{
	struct refs *r = data;

	if (r->n < 8) {
		snprintf(r->names[r->n], sizeof r->names[r->n], "%s", name);
		r->pos[r->n++] = pos;
	}
	return 0;
}

static int stop_ref(void *data, const char *name, struct pl_pos pos)
{
	(void)pos;
	(*(int *)data)++;
	return strcmp(name, "B") == 0 ? KPL_EINVAL : 0;
}

/* with.shell: values become variables, written for where they stand. */
static void test_template_shell(void **state)
{
	static const struct {
		const char *in, *out;
		size_t n;
	} cases[] = {
		{ "echo ${{ params.env }}", "echo \"${KPL_T_1}\"", 1 },
		{ "echo \"v=${{ params.env }}\" x", "echo \"v=${KPL_T_1}\" x", 1 },
		{ "echo '${{ params.env }}'", "echo ''\"${KPL_T_1}\"''", 1 },
		{ "echo \"a\\\"${{ params.env }}\"", "echo \"a\\\"${KPL_T_1}\"", 1 },
		{ "echo \\'${{ params.env }}", "echo \\'\"${KPL_T_1}\"", 1 },
		{ "# don't ${{ params.n }}\necho ${{ params.env }}",
		  "# don't ${KPL_T_1}\necho \"${KPL_T_2}\"", 2 },
		{ "echo a#b '${{ params.n }}'", "echo a#b ''\"${KPL_T_1}\"''", 1 },
		{ "cat <<EOF\nv=${{ params.env }}\nEOF\necho ${{ params.n }}",
		  "cat <<EOF\nv=${KPL_T_1}\nEOF\necho \"${KPL_T_2}\"", 2 },
		{ "cat <<-EOF >f\n\tit's ${{ params.env }}\n\tEOF\necho '${{ params.n }}'",
		  "cat <<-EOF >f\n\tit's ${KPL_T_1}\n\tEOF\necho ''\"${KPL_T_2}\"''", 2 },
		{ "cat <<<${{ params.env }}", "cat <<<\"${KPL_T_1}\"", 1 },
		{ "echo $${{ params.env }}", "echo ${{ params.env }}", 0 },
	};
	struct kpl_err err = { 0 };
	struct tpl *t;
	char *out, **vals;
	size_t n, off;

	(void)state;
	for (size_t i = 0; i < KPL_ARRAY_SIZE(cases); i++) {
		assert_int_equal(tpl_parse(cases[i].in, EXPR_ROOTS_TEMPLATE, &t, &off, &err), 0);
		if (tpl_expand_shell(t, lookup, NULL, &out, &vals, &n, &err))
			fail_msg("case %zu: %s", i, err.msg);
		if (strcmp(out, cases[i].out))
			fail_msg("case %zu: got %s, want %s", i, out, cases[i].out);
		assert_int_equal(n, cases[i].n);
		if (n) {
			const char *env = strstr(cases[i].in, "params.env");
			const char *num = strstr(cases[i].in, "params.n }}");
			const char *want = num && (!env || num < env) ? "3" : "prod";
			if (strcmp(vals[0], want))
				fail_msg("case %zu: KPL_T_1=%s, want %s", i, vals[0], want);
		}
		for (size_t j = 0; j < n; j++)
			free(vals[j]);
		free(vals);
		free(out);
		tpl_free(t);
	}
	/* A quoted here-document never expands: refused, not left as text. */
	assert_int_equal(tpl_parse("cat <<'EOF'\n${{ params.env }}\nEOF\n", EXPR_ROOTS_TEMPLATE,
				   &t, &off, &err), 0);
	assert_int_equal(tpl_expand_shell(t, lookup, NULL, &out, &vals, &n, &err), KPL_EINVAL);
	assert_non_null(strstr(err.msg, "quoted here-document"));
	tpl_free(t);
}

/* A secret never goes where a command line shows it (security #9 item 7). */
static void test_secrets_not_in_argv(void **state)
{
	static const char *const argv_keys[] = { "command", "shell", NULL };
	static const struct pl_kind k[] = { { "script", check_script, 0, argv_keys } };
	static const struct {
		const char *with, *want;
	} bad[] = {
		{ "    with: { command: [\"echo\", \"${{ secrets.C }}\"] }\n",
		  "mem:5:36: stages[0].with.command[1]: secrets.C would be in a command line" },
		{ "    with: { shell: \"echo ${{ secrets.C }}\" }\n",
		  "mem:5:30: stages[0].with.shell: secrets.C would be in a command line" },
	};
	struct pipeline *p = NULL;
	struct kpl_err err = { 0 };
	char *text;

	(void)state;
	for (size_t i = 0; i < KPL_ARRAY_SIZE(bad); i++) {
		text = kpl_asprintf("name: s\nstages:\n  - name: one\n    kind: script\n%s",
				    bad[i].with);
		assert_int_equal(pipeline_parse(text, strlen(text), "mem", k, 1, &p, &err),
				 KPL_EINVAL);
		if (strncmp(err.msg, bad[i].want, strlen(bad[i].want)))
			fail_msg("case %zu: %s", i, err.msg);
		assert_non_null(strstr(err.msg, "env: { C: \"${{ secrets.C }}\" }"));
		free(text);
	}
	/* Through env, and $${{ (no template), it is fine. */
	text = kpl_strdup("name: s\nstages:\n  - name: one\n    kind: script\n"
			  "    env: { C: \"${{ secrets.C }}\" }\n"
			  "    with: { shell: 'curl -H \"auth: $C\" $${{ secrets.C }}' }\n");
	if (pipeline_parse(text, strlen(text), "mem", k, 1, &p, &err))
		fail_msg("env: %s", err.msg);
	pipeline_free(p);
	free(text);
}

static void test_secret_refs(void **state)
{
	static const char text[] =
		"name: s\n"
		"env: { TOP: \"${{ secrets.A }}\" }\n"
		"stages:\n"
		"  - name: one\n"
		"    kind: script\n"
		"    env: { X: \"pre-${{ secrets.B }}-${{ params.p }}\" }\n"
		"    with: { command: [\"echo\", \"${{ secrets.C }}\", \"$${{ secrets.NOT }}\"] }\n"
		"params:\n"
		"  p: { default: \"${{ x }}\" }\n";
	struct pipeline *p = NULL;
	struct kpl_err err = { 0 };
	struct refs r = { 0 };
	int calls = 0;

	(void)state;
	if (pipeline_parse(text, strlen(text), "mem", kinds, KPL_ARRAY_SIZE(kinds), &p, &err))
		fail_msg("parse: %s", err.msg);
	assert_int_equal(pipeline_secret_refs(p, collect_ref, &r), 0);
	assert_int_equal(r.n, 3);
	assert_string_equal(r.names[0], "A");
	assert_int_equal(r.pos[0].line, 2);
	assert_string_equal(r.names[1], "B");
	assert_int_equal(r.pos[1].line, 6);
	assert_string_equal(r.names[2], "C");
	assert_int_equal(r.pos[2].line, 7);
	/* A non-zero return stops the walk and comes back. */
	assert_int_equal(pipeline_secret_refs(p, stop_ref, &calls), KPL_EINVAL);
	assert_int_equal(calls, 2);
	pipeline_free(p);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_bad_fixtures),
		cmocka_unit_test(test_good_fixtures_parse),
		cmocka_unit_test(test_run_timeout),
		cmocka_unit_test(test_runs_on),
		cmocka_unit_test(test_when_wrapped),
		cmocka_unit_test(test_notify_model),
		cmocka_unit_test(test_yaml_and_json_same_model),
		cmocka_unit_test(test_block_scalars_model),
		cmocka_unit_test(test_limits_in_memory),
		cmocka_unit_test(test_validate_all),
		cmocka_unit_test(test_durations),
		cmocka_unit_test(test_resolve_params),
		cmocka_unit_test(test_expr_eval),
		cmocka_unit_test(test_expr_syntax_errors),
		cmocka_unit_test(test_template_expand),
		cmocka_unit_test(test_template_shell),
		cmocka_unit_test(test_secrets_not_in_argv),
		cmocka_unit_test(test_secret_refs),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
