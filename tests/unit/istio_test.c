/*
 * istio_test.c - stages/istio.h without I/O: paths, label values, the
 * DestinationRule and VirtualService builders and editors (weights, the
 * header route, idempotence), and the canary Deployment clone.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "stages/istio.h"

static json_t *parse(const char *text)
{
	json_error_t e;
	json_t *j = json_loads(text, 0, &e);

	if (!j)
		fail_msg("fixture JSON: %s", e.text);
	return j;
}

static void assert_json(const json_t *got, const char *want_text)
{
	json_t *want = parse(want_text);

	if (!json_equal(got, want)) {
		char *g = json_dumps(got, JSON_COMPACT | JSON_SORT_KEYS);
		char *w = json_dumps(want, JSON_COMPACT | JSON_SORT_KEYS);
		fail_msg("got  %s\nwant %s", g, w);
	}
	json_decref(want);
}

static void test_paths_and_labels(void **state)
{
	char *p = istio_path("virtualservices", "shop", "web");

	(void)state;
	assert_string_equal(p, "/apis/networking.istio.io/v1/namespaces/shop/virtualservices/web");
	free(p);
	p = istio_path("destinationrules", "shop", NULL);
	assert_string_equal(p, "/apis/networking.istio.io/v1/namespaces/shop/destinationrules");
	free(p);
	assert_true(istio_label_value_ok("v2"));
	assert_true(istio_label_value_ok("2.0-rc_1"));
	assert_false(istio_label_value_ok(""));
	assert_false(istio_label_value_ok("-v2"));
	assert_false(istio_label_value_ok("v2."));
	assert_false(istio_label_value_ok("a/b"));
	assert_false(istio_label_value_ok("0123456789012345678901234567890123456789012345678901"
					  "234567890123"));
}

static void test_destination_rule(void **state)
{
	json_t *dr = istio_destination_rule("shop", "web", "web", "web", "version", "v1");

	(void)state;
	assert_json(dr, "{\"apiVersion\":\"networking.istio.io/v1\",\"kind\":\"DestinationRule\","
		    "\"metadata\":{\"name\":\"web\",\"namespace\":\"shop\",\"labels\":{"
		    "\"app.kubernetes.io/managed-by\":\"kpl\",\"kpl.dev/deployment\":\"web\"}},"
		    "\"spec\":{\"host\":\"web\",\"subsets\":[{\"name\":\"stable\",\"labels\":"
		    "{\"version\":\"v1\"}}]}}");
	assert_int_equal(istio_dr_set(dr, "web", "version", "v1", NULL), 0);
	assert_int_equal(istio_dr_set(dr, "web", "version", "v1", "v2"), 1);
	assert_int_equal(istio_dr_set(dr, "web", "version", "v1", "v2"), 0);
	/* the canary subset stays when a later mesh on leaves it alone */
	assert_int_equal(istio_dr_set(dr, "web", "version", "v1", NULL), 0);
	assert_json(json_object_get(json_object_get(dr, "spec"), "subsets"),
		    "[{\"name\":\"stable\",\"labels\":{\"version\":\"v1\"}},"
		    "{\"name\":\"canary\",\"labels\":{\"version\":\"v2\"}}]");
	assert_int_equal(istio_dr_set(dr, "web", "version", "v1", "v3"), 1);
	assert_string_equal(json_string_value(json_object_get(json_object_get(json_array_get(
		json_object_get(json_object_get(dr, "spec"), "subsets"), 1), "labels"), "version")),
		"v3");
	json_decref(dr);
}

static void test_virtual_service(void **state)
{
	const char *hosts[] = { "web", "web.example.com" }, *gws[] = { "istio-system/public" };
	json_t *vs = istio_virtual_service("shop", "web", hosts, 2, gws, 1, "web", 80, "web");
	struct istio_weights w;
	struct kpl_err err = { 0 };

	(void)state;
	assert_json(json_object_get(vs, "spec"),
		    "{\"hosts\":[\"web\",\"web.example.com\"],\"gateways\":[\"istio-system/public\","
		    "\"mesh\"],\"http\":[{\"name\":\"primary\",\"route\":[{\"destination\":{"
		    "\"host\":\"web\",\"subset\":\"stable\",\"port\":{\"number\":80}},"
		    "\"weight\":100}]}]}");
	assert_int_equal(istio_vs_weights(vs, &w, &err), 0);
	assert_int_equal(w.stable, 100);
	assert_int_equal(w.canary, 0);
	assert_false(w.header);
	/* the same hosts: unchanged; no gateways: mesh only */
	assert_int_equal(istio_vs_set_hosts(vs, hosts, 2, gws, 1, "web", 80), 0);
	assert_int_equal(istio_vs_set_hosts(vs, hosts, 1, NULL, 0, "web", 80), 1);
	assert_null(json_object_get(json_object_get(vs, "spec"), "gateways"));
	json_decref(vs);
}

static void test_weights_and_header_route(void **state)
{
	const char *hosts[] = { "web" };
	json_t *vs = istio_virtual_service("shop", "web", hosts, 1, NULL, 0, "web", 0, "web");
	struct istio_weights w;
	struct kpl_err err = { 0 };

	(void)state;
	assert_int_equal(istio_vs_set_weights(vs, 10, "X-Canary", "yes", &err), 1);
	assert_json(json_object_get(json_object_get(vs, "spec"), "http"),
		    "[{\"name\":\"canary-header\",\"match\":[{\"headers\":{\"x-canary\":{\"exact\":"
		    "\"yes\"}}}],\"route\":[{\"destination\":{\"host\":\"web\",\"subset\":"
		    "\"canary\"}}]},{\"name\":\"primary\",\"route\":[{\"destination\":{\"host\":"
		    "\"web\",\"subset\":\"stable\"},\"weight\":90},{\"destination\":{\"host\":"
		    "\"web\",\"subset\":\"canary\"},\"weight\":10}]}]");
	/* applying the same step again changes nothing: no second PUT */
	assert_int_equal(istio_vs_set_weights(vs, 10, "X-Canary", "yes", &err), 0);
	assert_int_equal(istio_vs_weights(vs, &w, &err), 0);
	assert_int_equal(w.stable, 90);
	assert_int_equal(w.canary, 10);
	assert_true(w.header);
	assert_int_equal(istio_vs_set_weights(vs, 50, "X-Canary", "yes", &err), 1);
	assert_int_equal(json_array_size(json_object_get(json_object_get(vs, "spec"), "http")), 2);
	/* back to stable: 100/0, header route removed */
	assert_int_equal(istio_vs_set_weights(vs, 0, NULL, NULL, &err), 1);
	assert_int_equal(istio_vs_weights(vs, &w, &err), 0);
	assert_int_equal(w.stable, 100);
	assert_int_equal(w.canary, 0);
	assert_false(w.header);
	assert_int_equal(istio_vs_set_weights(vs, 101, NULL, NULL, &err), KPL_EINVAL);
	json_decref(vs);
}

static void test_primary_route_found_by_shape(void **state)
{
	/* someone's VS: a matched route first, an unnamed default route, a port */
	json_t *vs = parse("{\"metadata\":{\"name\":\"web\"},\"spec\":{\"hosts\":[\"web\"],"
			   "\"http\":[{\"match\":[{\"uri\":{\"prefix\":\"/admin\"}}],\"route\":"
			   "[{\"destination\":{\"host\":\"admin\"}}]},{\"route\":[{\"destination\":"
			   "{\"host\":\"web.shop.svc.cluster.local\",\"subset\":\"stable\",\"port\":"
			   "{\"number\":8080}}}]}]}}");
	json_t *bare = parse("{\"metadata\":{\"name\":\"x\"},\"spec\":{\"hosts\":[\"x\"],\"http\":"
			     "[{\"route\":[{\"destination\":{\"host\":\"x\"}}]}]}}");
	struct istio_weights w;
	struct kpl_err err = { 0 };

	(void)state;
	assert_int_equal(istio_vs_weights(vs, &w, &err), 0);
	assert_int_equal(w.stable, 100); /* a lone destination without weight */
	assert_int_equal(istio_vs_set_weights(vs, 25, NULL, NULL, &err), 1);
	assert_json(json_array_get(json_object_get(json_object_get(vs, "spec"), "http"), 1),
		    "{\"name\":\"primary\",\"route\":[{\"destination\":{\"host\":"
		    "\"web.shop.svc.cluster.local\",\"subset\":\"stable\",\"port\":{\"number\":8080}},"
		    "\"weight\":75},{\"destination\":{\"host\":\"web.shop.svc.cluster.local\","
		    "\"subset\":\"canary\",\"port\":{\"number\":8080}},\"weight\":25}]}");
	/* the matched route is left alone */
	assert_json(json_array_get(json_object_get(json_object_get(vs, "spec"), "http"), 0),
		    "{\"match\":[{\"uri\":{\"prefix\":\"/admin\"}}],\"route\":[{\"destination\":"
		    "{\"host\":\"admin\"}}]}");
	assert_int_equal(istio_vs_set_weights(bare, 10, NULL, NULL, &err), KPL_ENOTFOUND);
	assert_string_equal(err.msg, "virtualservice x has no primary route to a \"stable\" "
			    "subset (the mesh kind creates it)");
	json_decref(vs);
	json_decref(bare);
}

static void test_canary_deployment(void **state)
{
	json_t *stable = parse(
		"{\"metadata\":{\"name\":\"web\",\"namespace\":\"shop\",\"uid\":\"u1\","
		"\"resourceVersion\":\"42\",\"labels\":{\"app\":\"web\"}},\"spec\":{\"replicas\":4,"
		"\"progressDeadlineSeconds\":3,\"selector\":{\"matchLabels\":{\"app\":\"web\","
		"\"version\":\"v1\"}},\"template\":{\"metadata\":{\"labels\":{\"app\":\"web\","
		"\"version\":\"v1\",\"pod-template-hash\":\"abc\",\"sidecar.istio.io/inject\":"
		"\"true\"}},\"spec\":{\"containers\":[{\"name\":\"web\",\"image\":\"reg/web:1\"},"
		"{\"name\":\"proxy\",\"image\":\"reg/proxy:1\"}]}}},\"status\":{\"replicas\":4}}");
	struct kpl_err err = { 0 };
	json_t *c;

	(void)state;
	assert_null(istio_canary_deployment(stable, "web-canary", "version", "v2", NULL,
					    "reg/web:2", 1, &err));
	assert_string_equal(err.msg, "deployment \"web\" has 2 containers (web, proxy): name one "
			    "with container");
	assert_null(istio_canary_deployment(stable, "web-canary", "version", "v2", "api",
					    "reg/web:2", 1, &err));
	assert_string_equal(err.msg, "deployment \"web\" has no container \"api\" (containers: "
			    "web, proxy)");
	c = istio_canary_deployment(stable, "web-canary", "version", "v2", "web", "reg/web:2", 1,
				    &err);
	assert_non_null(c);
	assert_json(c, "{\"apiVersion\":\"apps/v1\",\"kind\":\"Deployment\",\"metadata\":{"
		    "\"name\":\"web-canary\",\"namespace\":\"shop\",\"annotations\":{"
		    "\"kpl.dev/canary-of\":\"web\"},\"labels\":{\"app\":\"web\",\"version\":\"v2\"}},"
		    "\"spec\":{\"replicas\":1,\"progressDeadlineSeconds\":3,\"selector\":{"
		    "\"matchLabels\":{\"app\":\"web\",\"version\":\"v2\"}},\"template\":{"
		    "\"metadata\":{\"labels\":{\"app\":\"web\",\"version\":\"v2\","
		    "\"sidecar.istio.io/inject\":\"true\"}},\"spec\":{\"containers\":[{\"name\":"
		    "\"web\",\"image\":\"reg/web:2\"},{\"name\":\"proxy\",\"image\":"
		    "\"reg/proxy:1\"}]}}}}");
	/* the stable object is not touched */
	assert_string_equal(json_string_value(json_object_get(json_array_get(json_object_get(
		json_object_get(json_object_get(json_object_get(stable, "spec"), "template"),
				"spec"), "containers"), 0), "image")), "reg/web:1");
	json_decref(c);
	json_decref(stable);

	/* A spec that is not an object (found by tests/fuzz:istio_fuzz): no
	 * container, and the copy of the number is released (the ASan run of
	 * this test fails on the leak). */
	stable = parse("{\"metadata\":{\"name\":\"web\"},\"spec\":2}");
	assert_null(istio_canary_deployment(stable, "web-canary", "version", "v2", NULL,
					    "reg/web:2", 1, &err));
	json_decref(stable);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_paths_and_labels),
		cmocka_unit_test(test_destination_rule),
		cmocka_unit_test(test_virtual_service),
		cmocka_unit_test(test_weights_and_header_route),
		cmocka_unit_test(test_primary_route_found_by_shape),
		cmocka_unit_test(test_canary_deployment),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
