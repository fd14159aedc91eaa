/*
 * kube_fuzz.c - what kpl reads from Kubernetes (stages/kube.c) over any
 * replies in fuzz.h's text form: a Status (kube_status_parse), watch
 * stream lines, a Deployment (kubectl's rollout rules, revision, images,
 * selector) and a ReplicaSet list (the next reply's body) for the current
 * ReplicaSet; the body also as a kubeconfig, with and without a context.
 */
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "base/kpl.h"
#include "stages/kube.h"
#include "tests/fuzz/fuzz.h"

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	kpl_log_threshold = (enum kpl_log_level)(KPL_LOG_ERROR + 1);
	return 0;
}

static void deployment(const json_t *d, const json_t *list)
{
	char msg[512];
	const json_t *tmpl = json_object_get(json_object_get(d, "spec"), "template");

	kube_rollout_status(d, msg, sizeof msg);
	kube_revision(d);
	kube_template_image(tmpl, "web");
	free(kube_label_selector(d));
	if (list)
		kube_current_replicaset(d, list);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct fz_in in = { (const char *)data, size };
	struct fz_reply r;
	json_t *prev = NULL;

	while (fz_next_reply(&in, &r)) {
		struct kube_status st;
		struct kube_config cfg;
		struct kpl_err err = { 0 };
		char buf[700];
		json_t *doc;

		kube_status_parse(r.status, r.body, r.body_len, &st);
		kube_status_text(&st, buf, sizeof buf);
		kube_status_is_gone(&st);
		/* A watch stream: one event per line. */
		for (const char *p = r.body, *end = r.body + r.body_len; p < end;) {
			const char *nl = memchr(p, '\n', (size_t)(end - p));
			size_t n = nl ? (size_t)(nl - p) : (size_t)(end - p);
			json_t *root, *obj;
			const char *type;
			if (kube_watch_event_parse(p, n, &root, &type, &obj) == 0) {
				if (obj)
					deployment(obj, NULL);
				json_decref(root);
			}
			p += n + 1;
		}
		doc = json_loadb(r.body, r.body_len, 0, NULL);
		if (doc) {
			deployment(doc, doc);
			if (prev)
				deployment(prev, doc);
		}
		json_decref(prev);
		prev = doc;
		for (int i = 0; i < 2; i++) {
			kube_config_init(&cfg);
			if (kube_config_parse(r.body, r.body_len, "/k", i ? "ctx" : NULL, &cfg,
					      &err) == 0)
				free(kube_redact(&cfg, r.body));
			kube_config_release(&cfg);
		}
		fz_reply_release(&r);
	}
	json_decref(prev);
	return 0;
}
