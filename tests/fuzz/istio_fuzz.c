/*
 * istio_fuzz.c - the Istio objects kpl reads back and edits
 * (stages/istio.c) over any JSON from the cluster: a VirtualService
 * (weights read, then set with and without a header route; hosts and
 * gateways set), a DestinationRule (subsets set and cleared) and a
 * Deployment (the canary clone and its container). Input: replies in
 * fuzz.h's text form; each body is tried as each kind of object.
 */
#include <jansson.h>
#include <stdlib.h>

#include "base/kpl.h"
#include "stages/istio.h"
#include "tests/fuzz/fuzz.h"

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	kpl_log_threshold = (enum kpl_log_level)(KPL_LOG_ERROR + 1);
	return 0;
}

static void virtual_service(const json_t *vs, long status)
{
	static const char *const hosts[] = { "web.example.com", "web" };
	static const char *const gateways[] = { "istio-system/gw" };
	struct istio_weights w;
	struct kpl_err err = { 0 };
	json_t *c;
	int canary = (int)((unsigned long)status % 101);

	istio_vs_weights(vs, &w, &err);
	c = json_deep_copy(vs);
	if (istio_vs_set_weights(c, canary, "x-canary", "1", &err) >= 0)
		istio_vs_weights(c, &w, &err);
	istio_vs_set_weights(c, 100 - canary, NULL, NULL, &err);
	json_decref(c);
	c = json_deep_copy(vs);
	istio_vs_set_hosts(c, hosts, 2, gateways, status & 1, "web", status & 2 ? 80 : 0);
	istio_vs_weights(c, &w, &err);
	json_decref(c);
}

static void destination_rule(const json_t *dr)
{
	json_t *c = json_deep_copy(dr);

	istio_dr_set(c, "web", "version", "v1", "v2");
	istio_dr_set(c, "web", "version", "v1", NULL);
	json_decref(c);
}

static void deployment(const json_t *d)
{
	struct kpl_err err = { 0 };
	json_t *c;
	const json_t *tmpl = json_object_get(json_object_get(d, "spec"), "template");

	istio_find_container(tmpl, "web", NULL, &err);
	istio_find_container(tmpl, "web", "web", &err);
	c = istio_canary_deployment(d, "web-canary", "version", "v2", NULL, "reg/web:2", 1,
				    &err);
	json_decref(c);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct fz_in in = { (const char *)data, size };
	struct fz_reply r;

	while (fz_next_reply(&in, &r)) {
		json_t *doc = json_loadb(r.body, r.body_len, 0, NULL);

		if (doc) {
			virtual_service(doc, r.status);
			destination_rule(doc);
			deployment(doc);
			json_decref(doc);
		}
		istio_label_value_ok(r.body);
		fz_reply_release(&r);
	}
	return 0;
}
