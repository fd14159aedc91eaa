/*
 * hooks_fuzz.c - a webhook delivery as kpld's /hooks endpoints see it
 * (engine/hooks.c, the parts before any I/O): the signature or token
 * check, the push payload of GitHub and of GitLab, the repository URLs it
 * names (hooks_repo_key, which decides which registered pipelines match)
 * and the branch against glob patterns. Input: a request in fuzz.h's text
 * form (the status line is ignored; X-Hub-Signature-256, X-Gitlab-Token
 * and X-Pattern, a branch glob, are read from the headers). The body is
 * also read as a pull request of each forge (engine/forge.c).
 */
#include <stdlib.h>
#include <string.h>

#include "engine/forge.h"
#include "engine/hooks.h"
#include "base/kpl.h"
#include "tests/fuzz/fuzz.h"

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	kpl_log_threshold = (enum kpl_log_level)(KPL_LOG_ERROR + 1);
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static const char *const patterns[] = { "main", "release/*", "*", "v?.*", "[a-z]*" };
	struct fz_in in = { (const char *)data, size };
	struct fz_reply r;

	while (fz_next_reply(&in, &r)) {
		const char *pattern = fz_header(&r, "X-Pattern");
		char key[HOOKS_MAX_URL + 1];

		hooks_github_verify("It's a Secret to Everybody", r.body, r.body_len,
				    fz_header(&r, "X-Hub-Signature-256"));
		hooks_gitlab_verify("s3cret", fz_header(&r, "X-Gitlab-Token"));
		for (int src = HOOKS_GITHUB; src <= HOOKS_GITLAB; src++) {
			struct hooks_push p = { 0 };
			struct kpl_err err = { 0 };

			if (hooks_parse_push(src, r.body, r.body_len, &p, &err) != 0)
				continue;
			for (size_t i = 0; i < p.n_urls; i++)
				hooks_repo_key(p.urls[i], key, sizeof key);
			if (p.branch) {
				for (size_t i = 0; i < KPL_ARRAY_SIZE(patterns); i++)
					hooks_branch_match(patterns[i], p.branch);
				if (pattern)
					hooks_branch_match(pattern, p.branch);
			}
			hooks_push_free(&p);
		}
		/* The same body as a pull (merge) request (engine/forge.h). */
		for (int k = FORGE_GITHUB; k < FORGE__LAST; k++) {
			struct forge_pr pr;
			struct kpl_err err = { 0 };
			char why[200], pkey[FORGE_PR_KEY_LEN + 1];

			if (forge_parse_pr(k, r.body, r.body_len, &pr, why, sizeof why, &err) != 0)
				continue;
			for (size_t i = 0; i < pr.n_urls; i++)
				forge_pr_key(k, pr.urls[i], &pr, "app", pkey, sizeof pkey);
			hooks_branch_match("main", pr.base_branch);
			forge_pr_free(&pr);
		}
		/* The body as a registration's repo URL. */
		if (r.body_len < sizeof key && !memchr(r.body, '\0', r.body_len))
			hooks_repo_key(r.body, key, sizeof key);
		if (pattern && !memchr(r.body, '\0', r.body_len))
			hooks_branch_match(pattern, r.body);
		fz_reply_release(&r);
	}
	return 0;
}
