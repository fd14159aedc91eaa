/*
 * chatops_test.c - the pure parts of engine/chatops.c: Slack's v0 signature
 * (on Slack's own published example) and its window, DingTalk's outgoing
 * robot signature and window, and the command parser. No sockets, no loop.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "engine/chatops.h"

/* docs.slack.dev/authentication/verifying-requests-from-slack, worked example. */
static const char DOC_SECRET[] = "8f742231b10e8888abcd99yyyzzz85a5";
static const char DOC_TS[] = "1531420618";
static const char DOC_BODY[] =
	"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&"
	"channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&"
	"command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2F"
	"commands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id="
	"398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
static const char DOC_SIG[] =
	"v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";

static void test_slack_verify(void **state)
{
	const int64_t t = 1531420618;
	char sig[sizeof DOC_SIG];

	(void)state;
	assert_int_equal(chatops_slack_verify(DOC_SECRET, DOC_TS, DOC_SIG, DOC_BODY,
					      strlen(DOC_BODY), t + 10), CHATOPS_OK);
	/* The window: 300 s either way, not one more. */
	assert_int_equal(chatops_slack_verify(DOC_SECRET, DOC_TS, DOC_SIG, DOC_BODY,
					      strlen(DOC_BODY), t + 300), CHATOPS_OK);
	assert_int_equal(chatops_slack_verify(DOC_SECRET, DOC_TS, DOC_SIG, DOC_BODY,
					      strlen(DOC_BODY), t + 301), CHATOPS_STALE);
	assert_int_equal(chatops_slack_verify(DOC_SECRET, DOC_TS, DOC_SIG, DOC_BODY,
					      strlen(DOC_BODY), t - 301), CHATOPS_STALE);
	/* One byte of the body, the secret or the signature changed. */
	assert_int_equal(chatops_slack_verify(DOC_SECRET, DOC_TS, DOC_SIG, DOC_BODY,
					      strlen(DOC_BODY) - 1, t), CHATOPS_BAD_SIGNATURE);
	assert_int_equal(chatops_slack_verify("8f742231b10e8888abcd99yyyzzz85a6", DOC_TS, DOC_SIG,
					      DOC_BODY, strlen(DOC_BODY), t),
			 CHATOPS_BAD_SIGNATURE);
	memcpy(sig, DOC_SIG, sizeof sig);
	sig[sizeof sig - 2] = '4';
	assert_int_equal(chatops_slack_verify(DOC_SECRET, DOC_TS, sig, DOC_BODY,
					      strlen(DOC_BODY), t), CHATOPS_BAD_SIGNATURE);
	/* The timestamp is signed too. */
	assert_int_equal(chatops_slack_verify(DOC_SECRET, "1531420619", DOC_SIG, DOC_BODY,
					      strlen(DOC_BODY), t), CHATOPS_BAD_SIGNATURE);
	/* Missing or malformed headers, no secret. */
	assert_int_equal(chatops_slack_verify(DOC_SECRET, NULL, DOC_SIG, DOC_BODY,
					      strlen(DOC_BODY), t), CHATOPS_BAD_SIGNATURE);
	assert_int_equal(chatops_slack_verify(DOC_SECRET, DOC_TS, NULL, DOC_BODY,
					      strlen(DOC_BODY), t), CHATOPS_BAD_SIGNATURE);
	assert_int_equal(chatops_slack_verify(DOC_SECRET, "15314x0618", DOC_SIG, DOC_BODY,
					      strlen(DOC_BODY), t), CHATOPS_BAD_SIGNATURE);
	assert_int_equal(chatops_slack_verify(DOC_SECRET, DOC_TS, "v0=a2114d", DOC_BODY,
					      strlen(DOC_BODY), t), CHATOPS_BAD_SIGNATURE);
	assert_int_equal(chatops_slack_verify("", DOC_TS, DOC_SIG, DOC_BODY, strlen(DOC_BODY), t),
			 CHATOPS_BAD_SIGNATURE);
}

static void test_dingtalk_verify(void **state)
{
	/* Computed with Python's hmac and base64 (no published vector). */
	static const char secret[] = "SECret-app-9f2c", ts[] = "1577262236757",
			  sign[] = "FePlpbL/edNBTThaA7Q+Ym1FmU9TkCrjxGCEnIECPkw=";
	const int64_t t = 1577262236757;

	(void)state;
	assert_int_equal(chatops_dingtalk_verify(secret, ts, sign, t + 1000), CHATOPS_OK);
	assert_int_equal(chatops_dingtalk_verify(secret, ts, sign, t + 3600000), CHATOPS_OK);
	assert_int_equal(chatops_dingtalk_verify(secret, ts, sign, t + 3600001), CHATOPS_STALE);
	assert_int_equal(chatops_dingtalk_verify(secret, ts, sign, t - 3600001), CHATOPS_STALE);
	assert_int_equal(chatops_dingtalk_verify("SECret-app-9f2d", ts, sign, t),
			 CHATOPS_BAD_SIGNATURE);
	assert_int_equal(chatops_dingtalk_verify(secret, "1577262236758", sign, t),
			 CHATOPS_BAD_SIGNATURE);
	/* Not URL-encoded in the header (the outbound robot's query is). */
	assert_int_equal(chatops_dingtalk_verify(secret, ts,
						 "FePlpbL%2FedNBTThaA7Q%2BYm1FmU9TkCrjxGCEnIECPkw%3D",
						 t), CHATOPS_BAD_SIGNATURE);
	assert_int_equal(chatops_dingtalk_verify(secret, NULL, sign, t), CHATOPS_BAD_SIGNATURE);
	assert_int_equal(chatops_dingtalk_verify(secret, ts, NULL, t), CHATOPS_BAD_SIGNATURE);
}

static void test_parse(void **state)
{
	struct chatops_cmd c;
	struct kpl_err err = { 0 };

	(void)state;
	assert_int_equal(chatops_parse("  approve  r-1   prod  lgtm, ship it  ", &c, &err), 0);
	assert_int_equal(c.verb, CHATOPS_APPROVE);
	assert_string_equal(c.run, "r-1");
	assert_string_equal(c.stage, "prod");
	assert_string_equal(c.comment, "lgtm, ship it");
	assert_int_equal(chatops_parse("Reject r-1 prod", &c, &err), 0);
	assert_int_equal(c.verb, CHATOPS_REJECT);
	assert_null(c.comment);
	assert_int_equal(chatops_parse("cancel r-2", &c, &err), 0);
	assert_int_equal(c.verb, CHATOPS_CANCEL);
	assert_string_equal(c.run, "r-2");
	assert_int_equal(chatops_parse("retry r-2", &c, &err), 0);
	assert_int_equal(c.verb, CHATOPS_RETRY);
	assert_int_equal(chatops_parse("status r-2", &c, &err), 0);
	assert_int_equal(c.verb, CHATOPS_STATUS);
	assert_int_equal(chatops_parse("rollback prod/shop/web 4", &c, &err), 0);
	assert_int_equal(c.verb, CHATOPS_ROLLBACK);
	assert_string_equal(c.target, "prod/shop/web");
	assert_string_equal(c.revision, "4");
	assert_int_equal(chatops_parse("rollback prod/shop/web", &c, &err), 0);
	assert_null(c.revision);
	assert_int_equal(chatops_parse("help", &c, &err), 0);
	assert_int_equal(c.verb, CHATOPS_HELP);

	assert_int_equal(chatops_parse("approve r-1", &c, &err), KPL_EINVAL);
	assert_string_equal(err.msg, "usage: approve RUN STAGE [comment]");
	assert_int_equal(chatops_parse("cancel r-1 r-2", &c, &err), KPL_EINVAL);
	assert_string_equal(err.msg, "usage: cancel RUN");
	assert_int_equal(chatops_parse("rollback a/b/c 1 2", &c, &err), KPL_EINVAL);
	assert_int_equal(chatops_parse("deploy everything", &c, &err), KPL_EINVAL);
	assert_non_null(strstr(err.msg, "unknown command deploy; commands: approve"));
	assert_int_equal(chatops_parse("   ", &c, &err), KPL_EINVAL);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_slack_verify),
		cmocka_unit_test(test_dingtalk_verify),
		cmocka_unit_test(test_parse),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
