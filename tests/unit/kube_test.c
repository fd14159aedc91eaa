/*
 * kube_test.c - the Kubernetes client's protocol logic without I/O
 * (stages/kube.h): kubeconfig parsing with every auth form, in-cluster
 * config, Status parsing, kubectl's rollout-status rules over fixture
 * Deployments, the current ReplicaSet, watch events and URLs.
 *
 * Fixtures live in testdata/kube.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "stages/kube.h"

static char *fixture(const char *rel)
{
	const char *src = getenv("TEST_SRCDIR");
	return kpl_asprintf("%s/kpl/tests/unit/testdata/kube/%s", src ? src : ".", rel);
}

static int load(const char *name, const char *context, struct kube_config *c,
		struct kpl_err *err)
{
	char *p = fixture(name);
	int rc = kube_config_load(p, context, c, err);
	free(p);
	return rc;
}

/* ---- kubeconfig ---- */

static void test_token_current_context(void **state)
{
	struct kube_config c;
	struct kpl_err err = { 0 };
	char *dir = fixture("");

	(void)state;
	assert_int_equal(load("token.yaml", NULL, &c, &err), 0);
	assert_string_equal(c.context, "prod");
	assert_string_equal(c.server, "https://10.0.0.1:6443"); /* trailing '/' dropped */
	assert_string_equal(c.namespace, "shop");
	assert_string_equal(c.token, "tok-123456");
	/* relative to the kubeconfig's directory */
	char *want = kpl_asprintf("%scerts/ca.crt", dir);
	assert_string_equal(c.ca_file, want);
	assert_null(c.ca_data);
	assert_null(c.client_cert_data);
	assert_int_equal(c.insecure, 0);
	assert_string_equal(c.tls_server_name, "api.internal");
	kube_config_release(&c);
	free(want);

	/* a named context wins over current-context */
	assert_int_equal(load("token.yaml", "staging", &c, &err), 0);
	assert_string_equal(c.namespace, "staging");
	kube_config_release(&c);
	free(dir);
}

static void test_cert_data(void **state)
{
	struct kube_config c;
	struct kpl_err err = { 0 };

	(void)state;
	/* current-context names a missing cluster; the named one is fine */
	assert_int_equal(load("certdata.yaml", NULL, &c, &err), KPL_EINVAL);
	assert_non_null(strstr(err.msg, "no cluster named \"missing\" (declared: c1)"));
	assert_int_equal(load("certdata.yaml", "mtls", &c, &err), 0);
	assert_string_equal(c.ca_data,
			    "-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n");
	assert_string_equal(c.client_cert_data,
			    "-----BEGIN CERTIFICATE-----\nCLIENT\n-----END CERTIFICATE-----\n");
	assert_string_equal(c.client_key_data,
			    "-----BEGIN PRIVATE KEY-----\nKEY\n-----END PRIVATE KEY-----\n");
	assert_null(c.token);
	assert_null(c.namespace);
	kube_config_release(&c);
}

static void test_cert_files_insecure(void **state)
{
	struct kube_config c;
	struct kpl_err err = { 0 };
	char *key = fixture("keys/cli.key");

	(void)state;
	assert_int_equal(load("certfiles.yaml", NULL, &c, &err), 0);
	assert_string_equal(c.server, "https://kube.example:443");
	assert_int_equal(c.insecure, 1);
	assert_string_equal(c.client_cert, "/etc/kpl/cli.crt");
	assert_string_equal(c.client_key, key);
	kube_config_release(&c);
	free(key);
}

static void test_basic_and_token_file(void **state)
{
	struct kube_config c;
	struct kpl_err err = { 0 };
	char *tf = fixture("sa/token");

	(void)state;
	assert_int_equal(load("basic.yaml", NULL, &c, &err), 0); /* JSON kubeconfig */
	assert_string_equal(c.server, "http://127.0.0.1:8080");
	assert_string_equal(c.username, "admin");
	assert_string_equal(c.password, "pw-secret");
	char *r = kube_redact(&c, "user admin password pw-secret here");
	assert_string_equal(r, "user admin password *** here");
	free(r);
	kube_config_release(&c);

	assert_int_equal(load("tokenfile.yaml", NULL, &c, &err), 0);
	assert_null(c.token);
	assert_string_equal(c.token_file, tf);
	kube_config_release(&c);
	free(tf);
}

static void test_kubeconfig_errors(void **state)
{
	struct kube_config c;
	struct kpl_err err = { 0 };

	(void)state;
	assert_int_equal(load("exec.yaml", NULL, &c, &err), KPL_EINVAL);
	assert_non_null(strstr(err.msg, "users[u].user.exec: not supported"));
	assert_int_equal(load("nocontext.yaml", NULL, &c, &err), KPL_EINVAL);
	assert_non_null(strstr(err.msg, "no current-context"));
	assert_int_equal(load("token.yaml", "nope", &c, &err), KPL_EINVAL);
	assert_non_null(strstr(err.msg, "no context named \"nope\" (declared: staging, prod)"));
	assert_int_equal(load("certnokey.yaml", NULL, &c, &err), KPL_EINVAL);
	assert_non_null(strstr(err.msg, "a client certificate needs its key"));
	assert_int_equal(load("badbase64.yaml", NULL, &c, &err), KPL_EINVAL);
	assert_non_null(strstr(err.msg, "certificate-authority-data: not base64"));
	assert_int_equal(load("missing.yaml", NULL, &c, &err), KPL_EINVAL);
	assert_non_null(strstr(err.msg, "No such file"));
	/* a server that is not http(s) */
	const char *bad = "current-context: a\nclusters: [{name: c, cluster: {server: ftp://x}}]\n"
			  "contexts: [{name: a, context: {cluster: c}}]\n";
	assert_int_equal(kube_config_parse(bad, strlen(bad), "/k", NULL, &c, &err), KPL_EINVAL);
	assert_non_null(strstr(err.msg, "clusters[c].cluster.server: not an http(s) URL"));
}

static void test_in_cluster(void **state)
{
	struct kube_config c;
	struct kpl_err err = { 0 };
	char *dir = fixture("sa"), *tf = fixture("sa/token"), *ca = fixture("sa/ca.crt");

	(void)state;
	unsetenv("POD_NAMESPACE");
	assert_int_equal(kube_config_in_cluster("10.96.0.1", "443", dir, &c, &err), 0);
	assert_string_equal(c.server, "https://10.96.0.1:443");
	assert_string_equal(c.token_file, tf);
	assert_string_equal(c.ca_file, ca);
	assert_string_equal(c.namespace, "payments");
	kube_config_release(&c);

	setenv("POD_NAMESPACE", "from-env", 1);
	assert_int_equal(kube_config_in_cluster("fd00::1", "6443", dir, &c, &err), 0);
	assert_string_equal(c.server, "https://[fd00::1]:6443");
	assert_string_equal(c.namespace, "from-env");
	kube_config_release(&c);
	unsetenv("POD_NAMESPACE");

	assert_int_equal(kube_config_in_cluster("", "443", dir, &c, &err), KPL_EINVAL);
	assert_non_null(strstr(err.msg, "not running in a cluster"));
	assert_int_equal(kube_config_in_cluster("h", "1", "/nonexistent", &c, &err), KPL_EINVAL);
	assert_non_null(strstr(err.msg, "cannot read /nonexistent/token"));
	free(dir);
	free(tf);
	free(ca);
}

/* ---- Status ---- */

static void test_status(void **state)
{
	struct kube_status st;
	char buf[600];
	const char *nf = "{\"kind\":\"Status\",\"apiVersion\":\"v1\",\"metadata\":{},"
			 "\"status\":\"Failure\",\"message\":\"deployments.apps \\\"web\\\" not "
			 "found\",\"reason\":\"NotFound\",\"details\":{\"name\":\"web\","
			 "\"group\":\"apps\",\"kind\":\"deployments\"},\"code\":404}";
	const char *conflict = "{\"kind\":\"Status\",\"status\":\"Failure\",\"message\":"
			       "\"Operation cannot be fulfilled on deployments.apps \\\"web\\\": the "
			       "object has been modified; please apply your changes to the latest "
			       "version and try again\",\"reason\":\"Conflict\",\"code\":409}";
	const char *expired = "{\"kind\":\"Status\",\"status\":\"Failure\",\"message\":"
			      "\"too old resource version: 123 (456)\",\"reason\":\"Expired\","
			      "\"code\":410}";

	(void)state;
	kube_status_parse(404, nf, strlen(nf), &st);
	assert_int_equal(st.code, 404);
	assert_string_equal(st.reason, "NotFound");
	assert_string_equal(kube_status_text(&st, buf, sizeof buf),
			    "NotFound: deployments.apps \"web\" not found");
	assert_false(kube_status_is_gone(&st));

	kube_status_parse(409, conflict, strlen(conflict), &st);
	assert_string_equal(st.reason, "Conflict");
	assert_non_null(strstr(st.message, "the object has been modified"));

	/* an ERROR watch event's Status inside a 200 stream */
	kube_status_parse(200, expired, strlen(expired), &st);
	assert_int_equal(st.code, 410);
	assert_true(kube_status_is_gone(&st));

	/* not a Status: the start of the body, one line */
	kube_status_parse(502, "<html>\nBad gateway\n</html>", 27, &st);
	assert_string_equal(st.reason, "");
	assert_string_equal(kube_status_text(&st, buf, sizeof buf),
			    "HTTP 502: <html> Bad gateway </html>");
	kube_status_parse(503, "", 0, &st);
	assert_string_equal(st.message, "HTTP 503");
}

/* ---- rollout status ---- */

static json_t *load_json(const char *name)
{
	char *p = fixture(name);
	json_t *j = json_load_file(p, 0, NULL);
	free(p);
	assert_non_null(j);
	return j;
}

static void expect_rollout(const char *file, enum kube_rollout want, const char *msg)
{
	json_t *d = load_json(file);
	char buf[512];

	assert_int_equal(kube_rollout_status(d, buf, sizeof buf), want);
	assert_string_equal(buf, msg);
	json_decref(d);
}

static void test_rollout_rules(void **state)
{
	(void)state;
	expect_rollout("deploy_not_observed.json", KUBE_ROLLOUT_WAITING,
		       "Waiting for deployment spec update to be observed...");
	/* the deadline counts only once the generation is observed */
	expect_rollout("deploy_not_observed_deadline.json", KUBE_ROLLOUT_WAITING,
		       "Waiting for deployment spec update to be observed...");
	expect_rollout("deploy_deadline.json", KUBE_ROLLOUT_FAILED,
		       "deployment \"web\" exceeded its progress deadline");
	expect_rollout("deploy_updating.json", KUBE_ROLLOUT_WAITING,
		       "Waiting for deployment \"web\" rollout to finish: 1 out of 3 new replicas "
		       "have been updated...");
	expect_rollout("deploy_old_pending.json", KUBE_ROLLOUT_WAITING,
		       "Waiting for deployment \"web\" rollout to finish: 2 old replicas are "
		       "pending termination...");
	expect_rollout("deploy_available.json", KUBE_ROLLOUT_WAITING,
		       "Waiting for deployment \"web\" rollout to finish: 2 of 3 updated replicas "
		       "are available...");
	expect_rollout("deploy_done.json", KUBE_ROLLOUT_DONE,
		       "deployment \"web\" successfully rolled out");
	expect_rollout("deploy_done_observed_ahead.json", KUBE_ROLLOUT_DONE,
		       "deployment \"web\" successfully rolled out");
	/* spec.replicas nil: kubectl skips the first count */
	expect_rollout("deploy_no_spec_replicas.json", KUBE_ROLLOUT_DONE,
		       "deployment \"web\" successfully rolled out");
	/* only the Progressing condition's reason counts */
	expect_rollout("deploy_other_condition_deadline.json", KUBE_ROLLOUT_DONE,
		       "deployment \"web\" successfully rolled out");
}

/* ---- ReplicaSets, templates, revisions ---- */

static void test_current_replicaset(void **state)
{
	const char *dtext =
		"{\"metadata\":{\"name\":\"web\",\"uid\":\"d-1\",\"annotations\":"
		"{\"deployment.kubernetes.io/revision\":\"3\"}},\"spec\":{\"selector\":"
		"{\"matchLabels\":{\"app\":\"web\",\"tier\":\"fe\"}},\"template\":{\"metadata\":"
		"{\"labels\":{\"app\":\"web\"}},\"spec\":{\"containers\":[{\"name\":\"web\","
		"\"image\":\"w:2\"},{\"name\":\"side\",\"image\":\"s:1\"}]}}}}";
	const char *ltext =
		"{\"items\":["
		/* same template, but another owner */
		"{\"metadata\":{\"name\":\"x\",\"ownerReferences\":[{\"uid\":\"other\","
		"\"controller\":true}],\"annotations\":{\"deployment.kubernetes.io/revision\":"
		"\"9\"}},\"spec\":{\"template\":{\"metadata\":{\"labels\":{\"app\":\"web\","
		"\"pod-template-hash\":\"h9\"}},\"spec\":{\"containers\":[{\"name\":\"web\","
		"\"image\":\"w:2\"},{\"name\":\"side\",\"image\":\"s:1\"}]}}}},"
		/* an old revision */
		"{\"metadata\":{\"name\":\"old\",\"ownerReferences\":[{\"uid\":\"d-1\","
		"\"controller\":true}],\"annotations\":{\"deployment.kubernetes.io/revision\":"
		"\"2\"}},\"spec\":{\"template\":{\"metadata\":{\"labels\":{\"app\":\"web\","
		"\"pod-template-hash\":\"h2\"}},\"spec\":{\"containers\":[{\"name\":\"web\","
		"\"image\":\"w:1\"},{\"name\":\"side\",\"image\":\"s:1\"}]}}}},"
		/* the current one */
		"{\"metadata\":{\"name\":\"cur\",\"ownerReferences\":[{\"uid\":\"d-1\","
		"\"controller\":true}],\"annotations\":{\"deployment.kubernetes.io/revision\":"
		"\"3\"}},\"spec\":{\"template\":{\"metadata\":{\"labels\":{\"app\":\"web\","
		"\"pod-template-hash\":\"h3\"}},\"spec\":{\"containers\":[{\"name\":\"web\","
		"\"image\":\"w:2\"},{\"name\":\"side\",\"image\":\"s:1\"}]}}}}]}";
	json_t *d = json_loads(dtext, 0, NULL), *l = json_loads(ltext, 0, NULL);
	const json_t *rs;
	char *sel;

	(void)state;
	assert_non_null(d);
	assert_non_null(l);
	rs = kube_current_replicaset(d, l);
	assert_non_null(rs);
	assert_string_equal(json_string_value(json_object_get(json_object_get(rs, "metadata"),
							      "name")), "cur");
	assert_string_equal(kube_revision(rs), "3");
	assert_string_equal(kube_template_image(json_object_get(json_object_get(d, "spec"),
								"template"), "side"), "s:1");
	assert_null(kube_template_image(json_object_get(json_object_get(d, "spec"), "template"),
					"nope"));
	sel = kube_label_selector(d);
	assert_string_equal(sel, "app=web,tier=fe");
	free(sel);
	json_decref(d);
	json_decref(l);
}

/* ---- watch and URLs ---- */

static void test_watch_events_and_urls(void **state)
{
	const char *ev = "{\"type\":\"MODIFIED\",\"object\":{\"kind\":\"Deployment\","
			 "\"metadata\":{\"name\":\"web\",\"resourceVersion\":\"42\"}}}";
	const char *bm = "{\"type\":\"BOOKMARK\",\"object\":{\"kind\":\"Deployment\","
			 "\"metadata\":{\"resourceVersion\":\"50\"}}}";
	json_t *root, *obj;
	const char *type;
	char *s;

	(void)state;
	assert_int_equal(kube_watch_event_parse(ev, strlen(ev), &root, &type, &obj), 0);
	assert_string_equal(type, "MODIFIED");
	assert_string_equal(json_string_value(json_object_get(json_object_get(obj, "metadata"),
							      "resourceVersion")), "42");
	json_decref(root);
	assert_int_equal(kube_watch_event_parse(bm, strlen(bm), &root, &type, &obj), 0);
	assert_string_equal(type, "BOOKMARK");
	json_decref(root);
	assert_int_equal(kube_watch_event_parse("{\"type\":1}", 10, &root, &type, &obj),
			 KPL_EINVAL);
	assert_int_equal(kube_watch_event_parse("not json", 8, &root, &type, &obj), KPL_EINVAL);

	s = kube_watch_url_query("metadata.name=web", "42", 1);
	assert_string_equal(s, "?fieldSelector=metadata.name%3Dweb&watch=1&"
			       "allowWatchBookmarks=true&resourceVersion=42");
	free(s);
	s = kube_watch_url_query("metadata.name=web", NULL, 0);
	assert_string_equal(s, "?fieldSelector=metadata.name%3Dweb");
	free(s);
	s = kube_deployment_path("shop", "web");
	assert_string_equal(s, "/apis/apps/v1/namespaces/shop/deployments/web");
	free(s);
	s = kube_deployment_path("a b", NULL);
	assert_string_equal(s, "/apis/apps/v1/namespaces/a%20b/deployments");
	free(s);
	assert_string_equal(kube_patch_content_type(KUBE_PATCH_STRATEGIC),
			    "application/strategic-merge-patch+json");
	assert_string_equal(kube_patch_content_type(KUBE_PATCH_JSON),
			    "application/json-patch+json");
	assert_string_equal(kube_patch_content_type(KUBE_PATCH_MERGE),
			    "application/merge-patch+json");
	assert_string_equal(kube_patch_content_type(KUBE_PATCH_APPLY),
			    "application/apply-patch+yaml");
}

static void test_json_from_node(void **state)
{
	const char *y = "a: 1\nb: \"1\"\nc: true\nd: [x, 2.5, null]\ne: 500m\n";
	struct pl_node *root;
	struct kpl_err err = { 0 };
	json_t *j;
	char *s;

	(void)state;
	assert_int_equal(pl_doc_parse(y, strlen(y), "t", &root, &err), 0);
	j = kube_json_from_node(root);
	s = json_dumps(j, JSON_COMPACT);
	assert_string_equal(s, "{\"a\":1,\"b\":\"1\",\"c\":true,\"d\":[\"x\",2.5,null],"
			       "\"e\":\"500m\"}");
	free(s);
	json_decref(j);
	pl_doc_free(root);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_token_current_context),
		cmocka_unit_test(test_cert_data),
		cmocka_unit_test(test_cert_files_insecure),
		cmocka_unit_test(test_basic_and_token_file),
		cmocka_unit_test(test_kubeconfig_errors),
		cmocka_unit_test(test_in_cluster),
		cmocka_unit_test(test_status),
		cmocka_unit_test(test_rollout_rules),
		cmocka_unit_test(test_current_replicaset),
		cmocka_unit_test(test_watch_events_and_urls),
		cmocka_unit_test(test_json_from_node),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
