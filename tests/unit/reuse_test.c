/*
 * reuse_test.c - matrix stages and stage templates (pipelines/reuse.h):
 * expansion, instance names, needs, limits, input typing, and diagnostics
 * that name both files.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "base/kpl.h"
#include "pipelines/pipeline.h"
#include "pipelines/reuse.h"

static int check_script(const struct pl_node *with, const char *file, const char *path,
			struct kpl_err *err)
{
	const struct pl_node *sh = pl_map_get(with, "shell");

	if (!sh || sh->type != PL_SCALAR)
		return kpl_errf(err, KPL_EINVAL, "%s: %s: a script stage needs with.shell", file,
				path);
	return 0;
}

static const char *const script_keys[] = { "shell", "count", NULL };

static const struct pl_kind kinds[] = {
	{ "script", check_script, 0, NULL, script_keys },
	{ "noop", NULL, 0, NULL, NULL },
};

static struct pipeline *parse_ok(const char *text, const struct pl_files *files)
{
	struct pipeline *p = NULL;
	struct kpl_err err = { 0 };
	int rc = pipeline_parse_files(text, strlen(text), "release.kpl.yaml", files, kinds,
				      KPL_ARRAY_SIZE(kinds), &p, &err);
	if (rc)
		fail_msg("unexpected error: %s", err.msg);
	return p;
}

/* The first error, formatted as pipeline_parse gives it. */
static void parse_err(const char *text, const struct pl_files *files, char *msg, size_t size)
{
	struct pipeline *p = NULL;
	struct kpl_err err = { 0 };
	int rc = pipeline_parse_files(text, strlen(text), "release.kpl.yaml", files, kinds,
				      KPL_ARRAY_SIZE(kinds), &p, &err);
	assert_int_not_equal(rc, 0);
	assert_null(p);
	snprintf(msg, size, "%s", err.msg);
}

static void assert_contains(const char *s, const char *want)
{
	if (!strstr(s, want))
		fail_msg("\"%s\" does not contain \"%s\"", s, want);
}

static const struct pl_stage *stage(const struct pipeline *p, const char *name)
{
	for (size_t i = 0; i < p->n_stages; i++)
		if (!strcmp(p->stages[i].name, name))
			return &p->stages[i];
	fail_msg("no stage %s", name);
	return NULL;
}

static const char *shell(const struct pl_stage *st)
{
	return pl_map_get(st->with, "shell")->scalar;
}

static void test_matrix_expands(void **state)
{
	(void)state;
	const char *text =
		"name: m\n"
		"stages:\n"
		"  - name: prep\n"
		"    kind: noop\n"
		"  - name: build\n"
		"    needs: prep\n"
		"    matrix: { os: [linux, darwin], ver: [1, 2] }\n"
		"    max_parallel: 2\n"
		"    when: matrix.os != 'darwin' || matrix.ver == 2\n"
		"    kind: script\n"
		"    with: { shell: \"make OS=${{ matrix.os }} V=${{ matrix.ver }}\", count: \"${{ matrix.ver }}\" }\n"
		"  - name: ship\n"
		"    needs: [build, prep]\n"
		"    kind: noop\n";
	struct pipeline *p = parse_ok(text, NULL);
	static const char *const names[] = { "prep", "build[os=linux,ver=1]",
					     "build[os=linux,ver=2]", "build[os=darwin,ver=1]",
					     "build[os=darwin,ver=2]", "ship" };

	assert_int_equal(p->n_stages, 6);
	for (size_t i = 0; i < 6; i++)
		assert_string_equal(p->stages[i].name, names[i]);
	const struct pl_stage *b = stage(p, "build[os=darwin,ver=1]");
	assert_string_equal(b->matrix, "build");
	assert_int_equal(b->max_parallel, 2);
	assert_int_equal(b->n_needs, 1);
	assert_string_equal(b->needs[0], "prep");
	assert_string_equal(shell(b), "make OS=darwin V=1");
	/* A whole-value reference keeps the value's type (a plain 1). */
	const struct pl_node *count = pl_map_get(b->with, "count");
	assert_string_equal(count->scalar, "1");
	assert_true(count->plain);
	assert_string_equal(b->when, "'darwin' != 'darwin' || 1 == 2");
	/* needs: [build] waits for every instance. */
	const struct pl_stage *s = stage(p, "ship");
	assert_int_equal(s->n_needs, 5);
	assert_string_equal(s->needs[0], names[1]);
	assert_string_equal(s->needs[3], names[4]);
	assert_string_equal(s->needs[4], "prep");
	assert_null(s->matrix);
	assert_null(stage(p, "prep")->matrix);
	pipeline_free(p);
}

static void test_matrix_include_exclude(void **state)
{
	(void)state;
	const char *text =
		"name: m\n"
		"stages:\n"
		"  - name: t\n"
		"    matrix:\n"
		"      py: ['3.11', '3.12']\n"
		"      os: [linux, macos]\n"
		"      exclude: [{py: '3.11', os: macos}]\n"
		"      include: [{py: '3.13', os: linux}, {py: '3.12', os: linux}]\n"
		"    kind: noop\n";
	struct pipeline *p = parse_ok(text, NULL);
	static const char *const names[] = { "t[py=3.11,os=linux]", "t[py=3.12,os=linux]",
					     "t[py=3.12,os=macos]", "t[py=3.13,os=linux]" };

	assert_int_equal(p->n_stages, 4);
	for (size_t i = 0; i < 4; i++)
		assert_string_equal(p->stages[i].name, names[i]);
	assert_int_equal(p->stages[0].max_parallel, 0);
	pipeline_free(p);
}

static void test_matrix_errors(void **state)
{
	(void)state;
	char msg[512];
	struct {
		const char *stage, *want;
	} cases[] = {
		{ "    matrix: { os: [linux, 'a b'] }\n",
		  "release.kpl.yaml:5:27: stages[0].matrix.os[1]: matrix value \"a b\" is not valid" },
		{ "    matrix: { os: [] }\n",
		  "stages[0].matrix.os: expected a non-empty list of values" },
		{ "    matrix: { os: [a, a] }\n", "\"a\" is listed twice" },
		{ "    max_parallel: 2\n",
		  "stages[0].max_parallel: max_parallel bounds the instances of a matrix stage" },
		{ "    matrix: { os: [a] }\n    max_parallel: 0\n",
		  "expected a whole number from 1 to 256" },
		{ "    matrix: { os: [a], exclude: [{os: a}] }\n", "every combination is excluded" },
		{ "    matrix: { os: [a], exclude: [{arch: a}] }\n",
		  "\"arch\" is not a key of this matrix" },
		{ "    matrix: { os: [a, b], include: [{os: c, x: 1}] }\n",
		  "\"x\" is not a key of this matrix" },
		{ "    matrix: { os: [a] }\n    with: { shell: \"echo ${{ matrix.arch }}\" }\n",
		  "unknown matrix key \"arch\" in ${{ matrix.arch }} (the matrix has: os)" },
	};

	for (size_t i = 0; i < KPL_ARRAY_SIZE(cases); i++) {
		/* noop takes no with: a case with one is a script. */
		char *text = kpl_asprintf("name: m\nstages:\n  - name: b\n    kind: %s\n%s",
					  strstr(cases[i].stage, "with:") ? "script" : "noop",
					  cases[i].stage);
		parse_err(text, NULL, msg, sizeof msg);
		assert_contains(msg, cases[i].want);
		free(text);
	}
}

static void test_matrix_limits(void **state)
{
	(void)state;
	char msg[512];
	/* 17 x 17 = 289 instances. */
	const char *vals = "[a,b,c,d,e,f,g,h,i,j,k,l,m,n,o,p,q]";
	char *text = kpl_asprintf("name: m\nstages:\n  - name: b\n    kind: noop\n"
				  "    matrix: { x: %s, y: %s }\n", vals, vals);
	parse_err(text, NULL, msg, sizeof msg);
	assert_contains(msg, "289 instances; the limit is 256");
	free(text);
	/* 16 x 16 = 256 is fine. */
	text = kpl_asprintf("name: m\nstages:\n  - name: b\n    kind: noop\n"
			    "    matrix: { x: [a,b,c,d,e,f,g,h,i,j,k,l,m,n,o,p], "
			    "y: [a,b,c,d,e,f,g,h,i,j,k,l,m,n,o,p] }\n");
	struct pipeline *p = parse_ok(text, NULL);
	assert_int_equal(p->n_stages, 256);
	pipeline_free(p);
	free(text);
	/* An instance name over the name limit. */
	text = kpl_asprintf("name: m\nstages:\n  - name: b\n    kind: noop\n    matrix: { "
			    "k1: [aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa], "
			    "k2: [aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa], "
			    "k3: [aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa] }\n");
	parse_err(text, NULL, msg, sizeof msg);
	assert_contains(msg, "characters long; the limit is 128");
	free(text);
	/* Other stages still count against the stage limit. */
	text = kpl_asprintf("name: m\nstages:\n  - name: b\n    kind: noop\n"
			    "    matrix: { x: [a,b,c,d,e,f,g,h,i,j,k,l,m,n,o,p], "
			    "y: [a,b,c,d,e,f,g,h,i,j,k,l,m,n,o,p] }\n"
			    "  - name: c\n    kind: noop\n");
	parse_err(text, NULL, msg, sizeof msg);
	assert_contains(msg, "257 stages (finally included); the limit is 256");
	free(text);
}

static const char *deploy_tpl =
	"description: deploy one environment\n"
	"inputs:\n"
	"  env: { type: string, required: true }\n"
	"  replicas: { type: number, default: 2 }\n"
	"  dry_run: { type: boolean }\n"
	"  note: { type: string, default: \"it's a 'test'\" }\n"
	"stage:\n"
	"  kind: script\n"
	"  timeout: 5m\n"
	"  env: { TARGET: \"${{ inputs.env }}\", KEEP: x }\n"
	"  when: inputs.dry_run == false\n"
	"  with:\n"
	"    shell: deploy --env ${{ inputs.env }} -n ${{ inputs.replicas }} --note ${{ inputs.note }}\n"
	"    count: ${{ inputs.replicas }}\n";

static void test_uses_expands(void **state)
{
	(void)state;
	struct pl_file f[] = { { "ci/deploy.kpl.yaml", deploy_tpl, strlen(deploy_tpl) } };
	struct pl_files files = { f, 1 };
	const char *text =
		"name: r\n"
		"params: { version: {} }\n"
		"stages:\n"
		"  - name: staging\n"
		"    uses: ./ci/deploy.kpl.yaml\n"
		"    with: { env: staging }\n"
		"  - name: prod\n"
		"    needs: staging\n"
		"    uses: ./ci/deploy.kpl.yaml\n"
		"    timeout: 20m\n"
		"    env: { KEEP: mine }\n"
		"    with: { env: \"prod ${{ params.version }}\", replicas: 5, dry_run: false }\n";
	struct pipeline *p = parse_ok(text, &files);

	assert_int_equal(p->n_stages, 2);
	const struct pl_stage *s = stage(p, "staging");
	assert_string_equal(s->kind, "script");
	assert_int_equal(s->timeout_ms, 5 * 60 * 1000);
	/* Plain values go in as written; others as quoted expressions, which
	 * a shell sees through a variable. */
	assert_string_equal(shell(s), "deploy --env staging -n 2 --note ${{ \"it's a 'test'\" }}");
	assert_string_equal(pl_map_get(s->with, "count")->scalar, "2");
	assert_string_equal(s->when, "false == false");
	assert_null(s->matrix);
	assert_string_equal(s->uses, "ci/deploy.kpl.yaml");
	const struct pl_stage *pr = stage(p, "prod");
	assert_int_equal(pr->timeout_ms, 20 * 60 * 1000);
	assert_string_equal(shell(pr), "deploy --env prod ${{ params.version }} -n 5 --note "
				       "${{ \"it's a 'test'\" }}");
	assert_string_equal(pl_map_get(pr->with, "count")->scalar, "5");
	assert_int_equal(pr->n_needs, 1);
	assert_int_equal(pr->n_env, 2);
	assert_string_equal(pr->env[0].name, "KEEP");
	assert_string_equal(pr->env[0].value, "mine");
	assert_string_equal(pr->env[1].name, "TARGET");
	assert_string_equal(pr->env[1].value, "prod ${{ params.version }}");
	pipeline_free(p);
}

static void test_uses_with_matrix(void **state)
{
	(void)state;
	struct pl_file f[] = { { "deploy.kpl.yaml", deploy_tpl, strlen(deploy_tpl) } };
	struct pl_files files = { f, 1 };
	const char *text =
		"name: r\n"
		"stages:\n"
		"  - name: deploy\n"
		"    matrix: { region: [eu, us] , n: [3] }\n"
		"    uses: ./deploy.kpl.yaml\n"
		"    with: { env: \"${{ matrix.region }}\", replicas: \"${{ matrix.n }}\" }\n";
	struct pipeline *p = parse_ok(text, &files);

	assert_int_equal(p->n_stages, 2);
	assert_string_equal(p->stages[1].name, "deploy[region=us,n=3]");
	assert_string_equal(shell(&p->stages[1]),
			    "deploy --env us -n 3 --note ${{ \"it's a 'test'\" }}");
	assert_string_equal(p->stages[1].matrix, "deploy");
	assert_string_equal(p->stages[1].uses, "deploy.kpl.yaml");
	pipeline_free(p);
}

static void test_uses_errors(void **state)
{
	(void)state;
	struct pl_file f[] = {
		{ "ci/deploy.kpl.yaml", deploy_tpl, strlen(deploy_tpl) },
		{ "ci/nested.kpl.yaml", "stage:\n  uses: ./ci/deploy.kpl.yaml\n  kind: noop\n", 0 },
		{ "ci/bad.kpl.yaml", "inputs:\n  x: { type: number, default: abc }\nstage: { kind: noop }\n", 0 },
		{ "ci/badkind.kpl.yaml", "stage:\n  kind: script\n  with:\n    shel: x\n", 0 },
	};
	for (size_t i = 1; i < KPL_ARRAY_SIZE(f); i++)
		f[i].len = strlen(f[i].text);
	struct pl_files files = { f, KPL_ARRAY_SIZE(f) };
	char msg[512];
	struct {
		const char *stage, *want;
	} cases[] = {
		{ "    uses: ./ci/deploy.kpl.yaml\n    with: { env: a, replica: 3 }\n",
		  "release.kpl.yaml:5:21: stages[0].with.replica: unknown input \"replica\": "
		  "ci/deploy.kpl.yaml declares env, replicas, dry_run, note" },
		{ "    uses: ./ci/deploy.kpl.yaml\n    with: { replicas: 3 }\n",
		  "ci/deploy.kpl.yaml:3:3: input \"env\" is required, and the stage that uses the "
		  "template gives no with.env (used at release.kpl.yaml:4:11)" },
		{ "    uses: ./ci/deploy.kpl.yaml\n    with: { env: a, replicas: many }\n",
		  "release.kpl.yaml:5:31: stages[0].with.replicas: input \"replicas\" (declared at "
		  "ci/deploy.kpl.yaml:4:3) is a number, found \"many\"" },
		{ "    uses: ./ci/deploy.kpl.yaml\n    with: { env: a, dry_run: 'true' }\n",
		  "is a boolean, found the quoted string \"true\": remove the quotes" },
		{ "    uses: ./ci/deploy.kpl.yaml\n    with: { env: a, replicas: '${{ params.n }}' }\n",
		  "a ${{ }} template can be given to a string input only" },
		{ "    uses: ./ci/deploy.kpl.yaml\n    kind: noop\n    with: { env: a }\n",
		  "stages[0].kind: the template sets the kind" },
		{ "    uses: ./ci/nested.kpl.yaml\n",
		  "ci/nested.kpl.yaml:2:3: stage.uses: a template cannot use another template "
		  "(used at release.kpl.yaml:4:11)" },
		{ "    uses: ./ci/bad.kpl.yaml\n",
		  "ci/bad.kpl.yaml:2:31: inputs.x.default: the default is a number, found \"abc\" "
		  "(used at release.kpl.yaml:4:11)" },
		{ "    uses: ./ci/badkind.kpl.yaml\n",
		  "ci/badkind.kpl.yaml:4:5: stages[0].with.shel: unknown key \"shel\"" },
		{ "    uses: ./ci/missing.kpl.yaml\n",
		  "stages[0].uses: \"./ci/missing.kpl.yaml\": no such file beside the pipeline" },
		{ "    uses: ./../secrets.kpl.yaml\n", "\"..\" would leave the pipeline's directory" },
		{ "    uses: /etc/passwd\n", "an absolute path" },
		{ "    uses: https://example.com/t.kpl.yaml\n", "never from a URL" },
		{ "    uses: ci/deploy.kpl.yaml\n", "starting with ./" },
	};

	for (size_t i = 0; i < KPL_ARRAY_SIZE(cases); i++) {
		char *text = kpl_asprintf("name: m\nstages:\n  - name: b\n%s", cases[i].stage);
		parse_err(text, &files, msg, sizeof msg);
		assert_contains(msg, cases[i].want);
		free(text);
	}
}

/* validate_files gives every problem, each with its file. */
static void test_uses_diags(void **state)
{
	(void)state;
	struct pl_file f[] = { { "t.kpl.yaml", "stage:\n  kind: scrip\n", 0 } };
	f[0].len = strlen(f[0].text);
	struct pl_files files = { f, 1 };
	const char *text = "name: m\nstages:\n  - name: a\n    uses: ./t.kpl.yaml\n"
			   "  - name: b\n    kind: noop\n    needs: [zz]\n";
	struct pl_diag *d = NULL;
	size_t n = 0;
	char buf[512];

	assert_int_not_equal(pipeline_validate_files(text, strlen(text), "p.yaml", &files, kinds,
						     KPL_ARRAY_SIZE(kinds), &d, &n), 0);
	assert_int_equal(n, 2);
	assert_string_equal(d[0].file, "t.kpl.yaml");
	assert_int_equal(d[0].line, 2);
	assert_int_equal(d[0].use_line, 4);
	pl_diag_format(&d[0], "p.yaml", buf, sizeof buf);
	assert_contains(buf, "t.kpl.yaml:2:9: stages[0].kind: unknown kind \"scrip\"");
	assert_contains(buf, "(used at p.yaml:4:11)");
	assert_null(d[1].file);
	assert_string_equal(d[1].path, "stages[1].needs[0]");
	pl_diags_free(d, n);
}

/* One template used twice: its mistake is said for each use. A matrix
 * stage's mistake is said once, not per instance. */
static void test_diags_per_use(void **state)
{
	(void)state;
	struct pl_file f[] = { { "t.kpl.yaml", "stage:\n  kind: scrip\n", 0 } };
	f[0].len = strlen(f[0].text);
	struct pl_files files = { f, 1 };
	const char *text = "name: m\nstages:\n  - name: a\n    uses: ./t.kpl.yaml\n"
			   "  - name: b\n    uses: ./t.kpl.yaml\n"
			   "  - name: c\n    matrix: { x: [1, 2, 3] }\n    kind: noop\n    needs: [zz]\n";
	struct pl_diag *d = NULL;
	size_t n = 0;

	assert_int_not_equal(pipeline_validate_files(text, strlen(text), "p.yaml", &files, kinds,
						     KPL_ARRAY_SIZE(kinds), &d, &n), 0);
	assert_int_equal(n, 3);
	assert_int_equal(d[0].use_line, 4);
	assert_int_equal(d[1].use_line, 6);
	assert_string_equal(d[1].path, "stages[1].kind");
	assert_null(d[2].file);
	assert_string_equal(d[2].path, "stages[2].needs[0]");
	pl_diags_free(d, n);
}

/* An instance can be needed by its own name; finally stages expand too. */
static void test_matrix_instance_needs_and_finally(void **state)
{
	(void)state;
	const char *text = "name: m\nstages:\n  - name: a\n    matrix: { x: [1, 2] }\n    kind: noop\n"
			   "  - name: b\n    needs: \"a[x=2]\"\n    kind: noop\n"
			   "finally:\n  - name: f\n    matrix: { y: [p, q] }\n    max_parallel: 1\n"
			   "    kind: noop\n  - name: g\n    needs: f\n    kind: noop\n";
	struct pipeline *p = parse_ok(text, NULL);

	assert_int_equal(p->n_stages, 6);
	assert_int_equal(p->n_finally, 3);
	assert_string_equal(stage(p, "b")->needs[0], "a[x=2]");
	assert_int_equal(stage(p, "b")->n_needs, 1);
	assert_true(stage(p, "f[y=q]")->is_finally);
	assert_int_equal(stage(p, "f[y=q]")->max_parallel, 1);
	assert_int_equal(stage(p, "g")->n_needs, 2);
	pipeline_free(p);
}

static void test_paths(void **state)
{
	(void)state;
	char out[REUSE_MAX_PATH + 1];
	const char *why;
	struct kpl_err err = { 0 };

	assert_int_equal(reuse_path("./a/b.kpl.yaml", out, &why), 0);
	assert_string_equal(out, "a/b.kpl.yaml");
	assert_int_not_equal(reuse_path("./a/../b", out, &why), 0);
	assert_int_not_equal(reuse_path("./a//b", out, &why), 0);
	assert_int_not_equal(reuse_path("./a/", out, &why), 0);
	assert_int_not_equal(reuse_path("./a\\b", out, &why), 0);
	assert_int_not_equal(reuse_path("./", out, &why), 0);

	struct pl_file bad[] = { { "../x", "", 0 } };
	struct pl_files files = { bad, 1 };
	assert_int_equal(reuse_check_files(&files, &err), KPL_EINVAL);
	assert_contains(err.msg, "files[../x]");
	bad[0].path = "/etc/passwd";
	assert_int_equal(reuse_check_files(&files, &err), KPL_EINVAL);
	bad[0].path = "ok.yaml";
	bad[0].len = REUSE_MAX_FILE_BYTES + 1;
	assert_int_equal(reuse_check_files(&files, &err), KPL_ETOOBIG);
	bad[0].len = 3;
	assert_int_equal(reuse_check_files(&files, &err), 0);

	char **paths;
	size_t n;
	const char *text = "name: m\nstages:\n  - {name: a, uses: ./x.yaml}\n"
			   "  - {name: b, uses: ./x.yaml}\n  - {name: c, uses: ../y}\n"
			   "finally:\n  - {name: d, uses: ./t/z.yaml}\n";
	reuse_list_paths(text, strlen(text), &paths, &n);
	assert_int_equal(n, 2);
	assert_string_equal(paths[0], "x.yaml");
	assert_string_equal(paths[1], "t/z.yaml");
	for (size_t i = 0; i < n; i++)
		free(paths[i]);
	free(paths);
}

/* A pipeline without matrix or uses is the same tree as before. */
static void test_plain_unchanged(void **state)
{
	(void)state;
	const char *text = "name: p\nstages:\n  - name: a\n    kind: noop\n"
			   "  - name: b\n    needs: a\n    kind: noop\n";
	struct pipeline *p = parse_ok(text, NULL);
	assert_int_equal(p->n_stages, 2);
	assert_null(p->stages[1].matrix);
	pipeline_free(p);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_matrix_expands),
		cmocka_unit_test(test_matrix_include_exclude),
		cmocka_unit_test(test_matrix_errors),
		cmocka_unit_test(test_matrix_limits),
		cmocka_unit_test(test_uses_expands),
		cmocka_unit_test(test_uses_with_matrix),
		cmocka_unit_test(test_uses_errors),
		cmocka_unit_test(test_uses_diags),
		cmocka_unit_test(test_diags_per_use),
		cmocka_unit_test(test_matrix_instance_needs_and_finally),
		cmocka_unit_test(test_paths),
		cmocka_unit_test(test_plain_unchanged),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
