/*
 * chatbot_test.c - kpl-chatbot's logic against fixtures (no sockets): the
 * bodies each chat kind gets, DingTalk's signature (a known value), reply
 * verdicts, which events make notices, the log rings, config errors and the
 * state file.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>

#include "clients/chatbot/chatbot.h"

#define DINGTALK_SIGN_FIXTURE "jcUpW0QmtKduN03n4JqQ0PBosVjqnM8gU7fIIvsDmCM%3D"

static Kpl__V1__RunEvent stage_ev(const char *stage, Kpl__V1__StageState s, const char *msg,
				  uint32_t attempt)
{
	Kpl__V1__RunEvent ev = KPL__V1__RUN_EVENT__INIT;

	ev.run_id = "r-1";
	ev.pipeline_name = "shop";
	ev.kind = KPL__V1__EVENT_KIND__EVENT_KIND_STAGE_STATE;
	ev.stage = (char *)stage;
	ev.stage_state = s;
	ev.message = (char *)(msg ? msg : "");
	ev.attempt = attempt;
	ev.global_seq = 7;
	return ev;
}

static Kpl__V1__RunEvent log_ev(const char *stage, const char *line, uint32_t attempt)
{
	Kpl__V1__RunEvent ev = KPL__V1__RUN_EVENT__INIT;

	ev.run_id = "r-1";
	ev.pipeline_name = "shop";
	ev.kind = KPL__V1__EVENT_KIND__EVENT_KIND_LOG;
	ev.stage = (char *)stage;
	ev.message = (char *)line;
	ev.attempt = attempt;
	return ev;
}

static void test_classify(void **state)
{
	Kpl__V1__RunEvent ev = KPL__V1__RUN_EVENT__INIT;

	(void)state;
	ev.kind = KPL__V1__EVENT_KIND__EVENT_KIND_RUN_STATE;
	ev.run_state = KPL__V1__RUN_STATE__RUN_STATE_RUNNING;
	assert_int_equal(notice_classify(&ev, 0), NOTICE_STARTED);
	ev.run_state = KPL__V1__RUN_STATE__RUN_STATE_QUEUED;
	assert_int_equal(notice_classify(&ev, 0), NOTICE_LAST);
	ev.run_state = KPL__V1__RUN_STATE__RUN_STATE_CANCELLED;
	assert_int_equal(notice_classify(&ev, 0), NOTICE_CANCELLED);
	ev = stage_ev("b", KPL__V1__STAGE_STATE__STAGE_STATE_SUCCEEDED, NULL, 1);
	assert_int_equal(notice_classify(&ev, 0), NOTICE_LAST);
	assert_int_equal(notice_classify(&ev, 1), NOTICE_ROLLED_BACK);
	ev.stage_state = KPL__V1__STAGE_STATE__STAGE_STATE_WAITING;
	assert_int_equal(notice_classify(&ev, 0), NOTICE_WAITING);
	ev.stage_state = KPL__V1__STAGE_STATE__STAGE_STATE_PENDING;
	assert_int_equal(notice_classify(&ev, 0), NOTICE_LAST);
}

static json_t *parse(char *body)
{
	json_t *j = json_loads(body, 0, NULL);

	assert_non_null(j);
	free(body);
	return j;
}

static void test_render_stage_failed(void **state)
{
	Kpl__V1__RunEvent ev = stage_ev("build", KPL__V1__STAGE_STATE__STAGE_STATE_FAILED,
					"exit status 2", 1);
	struct notice n;
	char *lines[] = { "cc -c a.c", "a.c:1: error: <boom> & more" };
	json_t *j;

	(void)state;
	notice_init_from(&n, NOTICE_STAGE_FAILED, &ev);
	n.log = kpl_calloc(2, sizeof *n.log);
	n.log[0] = kpl_strdup(lines[0]);
	n.log[1] = kpl_strdup(lines[1]);
	n.n_log = 2;

	j = parse(notice_render(CHAT_WECOM, &n));
	assert_string_equal(json_string_value(json_object_get(j, "msgtype")), "markdown");
	assert_string_equal(
		json_string_value(json_object_get(json_object_get(j, "markdown"), "content")),
		"<font color=\"warning\">**shop run r-1: stage build failed**</font>\n\n"
		"exit status 2\n\nlast log lines:\n> cc -c a.c\n> a.c:1: error: <boom> & more");
	json_decref(j);

	j = parse(notice_render(CHAT_DINGTALK, &n));
	assert_string_equal(
		json_string_value(json_object_get(json_object_get(j, "markdown"), "title")),
		"shop run r-1: stage build failed");
	assert_string_equal(
		json_string_value(json_object_get(json_object_get(j, "markdown"), "text")),
		"#### shop run r-1: stage build failed\n\nexit status 2\n\n"
		"last log lines:\n> cc -c a.c\n> a.c:1: error: <boom> & more");
	json_decref(j);

	j = parse(notice_render(CHAT_SLACK, &n));
	assert_string_equal(json_string_value(json_object_get(j, "text")),
			    "shop run r-1: stage build failed");
	{
		json_t *sec = json_array_get(json_object_get(j, "blocks"), 0);

		assert_string_equal(json_string_value(json_object_get(sec, "type")), "section");
		assert_string_equal(
			json_string_value(json_object_get(json_object_get(sec, "text"), "text")),
			"*shop run r-1: stage build failed*\nexit status 2\n```\ncc -c a.c\n"
			"a.c:1: error: &lt;boom&gt; &amp; more\n```");
	}
	json_decref(j);
	notice_release(&n);
}

/* Slack's chatops buttons: only when asked, only for kinds with an action. */
static void test_render_buttons(void **state)
{
	Kpl__V1__RunEvent ev = stage_ev("prod", KPL__V1__STAGE_STATE__STAGE_STATE_WAITING,
					"waiting for approval: ship?", 1);
	struct notice n;
	json_t *j, *a, *b;

	(void)state;
	notice_init_from(&n, NOTICE_WAITING, &ev);
	j = parse(notice_render(CHAT_SLACK, &n));
	assert_int_equal(json_array_size(json_object_get(j, "blocks")), 1);
	json_decref(j);
	j = parse(notice_render_buttons(CHAT_SLACK, &n, 1));
	assert_int_equal(json_array_size(json_object_get(j, "blocks")), 2);
	a = json_array_get(json_object_get(j, "blocks"), 1);
	assert_string_equal(json_string_value(json_object_get(a, "type")), "actions");
	b = json_array_get(json_object_get(a, "elements"), 0);
	assert_string_equal(json_string_value(json_object_get(b, "action_id")), "kpl_approve");
	assert_string_equal(json_string_value(json_object_get(b, "value")), "r-1 prod");
	assert_string_equal(json_string_value(json_object_get(b, "style")), "primary");
	assert_non_null(json_object_get(b, "confirm"));
	b = json_array_get(json_object_get(a, "elements"), 1);
	assert_string_equal(json_string_value(json_object_get(b, "action_id")), "kpl_reject");
	assert_string_equal(json_string_value(json_object_get(b, "style")), "danger");
	json_decref(j);
	/* Not for WeCom or DingTalk. */
	j = parse(notice_render_buttons(CHAT_DINGTALK, &n, 1));
	assert_null(json_object_get(j, "blocks"));
	json_decref(j);
	notice_release(&n);

	ev = stage_ev("build", KPL__V1__STAGE_STATE__STAGE_STATE_SUCCEEDED, NULL, 1);
	notice_init_from(&n, NOTICE_SUCCEEDED, &ev);
	j = parse(notice_render_buttons(CHAT_SLACK, &n, 1));
	assert_int_equal(json_array_size(json_object_get(j, "blocks")), 1);
	json_decref(j);
	n.kind = NOTICE_STARTED;
	j = parse(notice_render_buttons(CHAT_SLACK, &n, 1));
	a = json_array_get(json_object_get(j, "blocks"), 1);
	b = json_array_get(json_object_get(a, "elements"), 0);
	assert_string_equal(json_string_value(json_object_get(b, "action_id")), "kpl_cancel");
	assert_string_equal(json_string_value(json_object_get(b, "value")), "r-1");
	json_decref(j);
	n.kind = NOTICE_CANCELLED;
	j = parse(notice_render_buttons(CHAT_SLACK, &n, 1));
	a = json_array_get(json_object_get(j, "blocks"), 1);
	b = json_array_get(json_object_get(a, "elements"), 0);
	assert_string_equal(json_string_value(json_object_get(b, "action_id")), "kpl_retry");
	json_decref(j);
	notice_release(&n);
}

static void test_render_bounds(void **state)
{
	Kpl__V1__RunEvent ev = stage_ev("build", KPL__V1__STAGE_STATE__STAGE_STATE_FAILED,
					"x", 1);
	struct notice n;
	char line[2000];
	json_t *j;

	(void)state;
	memset(line, 'y', sizeof line - 1);
	line[sizeof line - 1] = '\0';
	notice_init_from(&n, NOTICE_STAGE_FAILED, &ev);
	n.log = kpl_calloc(40, sizeof *n.log);
	for (n.n_log = 0; n.n_log < 40; n.n_log++)
		n.log[n.n_log] = kpl_strdup(line);
	j = parse(notice_render(CHAT_WECOM, &n));
	assert_true(strlen(json_string_value(
			    json_object_get(json_object_get(j, "markdown"), "content"))) <= 4096);
	json_decref(j);
	j = parse(notice_render(CHAT_SLACK, &n));
	assert_true(strlen(json_string_value(json_object_get(
			    json_object_get(json_array_get(json_object_get(j, "blocks"), 0),
					    "text"),
			    "text"))) <= 3000);
	json_decref(j);
	notice_release(&n);
}

static void test_utf8_truncate(void **state)
{
	char s[] = "ab\xc3\xa9z"; /* "abéz" */

	(void)state;
	utf8_truncate(s, 3);
	assert_string_equal(s, "ab");
}

/* Known answer: python3 -c 'import hmac,hashlib,base64,urllib.parse;
 * s="SECabc";t=1700000000000;print(urllib.parse.quote_plus(base64.b64encode(
 * hmac.new(s.encode(),f"{t}\n{s}".encode(),hashlib.sha256).digest())))' */
static void test_dingtalk_sign(void **state)
{
	char *sig = dingtalk_sign("SECabc", 1700000000000LL);
	char *url = dingtalk_signed_url("http://h/robot/send?access_token=T", "SECabc",
					1700000000000LL);
	char want[256];

	(void)state;
	snprintf(want, sizeof want,
		 "http://h/robot/send?access_token=T&timestamp=1700000000000&sign=%s", sig);
	assert_string_equal(url, want);
	assert_string_equal(sig, DINGTALK_SIGN_FIXTURE);
	free(sig);
	free(url);
}

static void test_judge(void **state)
{
	char why[256];

	(void)state;
	assert_int_equal(chat_judge_reply(CHAT_SLACK, 200, "ok", why, sizeof why),
			 CHAT_DELIVERED);
	assert_int_equal(chat_judge_reply(CHAT_SLACK, 400, "invalid_payload", why, sizeof why),
			 CHAT_REJECTED);
	assert_string_equal(why, "HTTP 400: invalid_payload");
	assert_int_equal(chat_judge_reply(CHAT_SLACK, 429, "", why, sizeof why), CHAT_RETRY);
	assert_int_equal(chat_judge_reply(CHAT_WECOM, 500, "", why, sizeof why), CHAT_RETRY);
	assert_int_equal(chat_judge_reply(CHAT_WECOM, 200, "{\"errcode\":0,\"errmsg\":\"ok\"}",
					  why, sizeof why),
			 CHAT_DELIVERED);
	assert_int_equal(chat_judge_reply(CHAT_DINGTALK, 200,
					  "{\"errcode\":130101,\"errmsg\":\"send too fast\"}", why,
					  sizeof why),
			 CHAT_RETRY);
	assert_string_equal(why, "HTTP 200, errcode 130101 send too fast");
	assert_int_equal(chat_judge_reply(CHAT_DINGTALK, 200, "<html>", why, sizeof why),
			 CHAT_RETRY);
}

static void test_rings(void **state)
{
	struct log_rings *r = log_rings_new(3);
	Kpl__V1__RunEvent ev;
	struct notice n = { 0 };
	char line[16];

	(void)state;
	/* Lines without the RUNNING event: incomplete. */
	ev = log_ev("b", "early", 1);
	log_rings_feed(r, &ev);
	assert_int_equal(log_rings_take(r, "r-1", "b", 1, &n), 0);
	assert_int_equal(n.n_log, 1);
	notice_release(&n);
	ev = stage_ev("b", KPL__V1__STAGE_STATE__STAGE_STATE_RUNNING, NULL, 2);
	log_rings_feed(r, &ev);
	for (int i = 0; i < 5; i++) {
		snprintf(line, sizeof line, "l%d", i);
		ev = log_ev("b", line, 2);
		log_rings_feed(r, &ev);
	}
	assert_int_equal(log_rings_take(r, "r-1", "b", 2, &n), 1);
	assert_int_equal(n.n_log, 3);
	assert_string_equal(n.log[0], "l2");
	assert_string_equal(n.log[2], "l4");
	notice_release(&n);
	/* An approval's RUNNING after WAITING keeps the attempt's lines. */
	ev = stage_ev("b", KPL__V1__STAGE_STATE__STAGE_STATE_RUNNING, NULL, 2);
	log_rings_feed(r, &ev);
	assert_int_equal(log_rings_take(r, "r-1", "b", 2, &n), 1);
	assert_int_equal(n.n_log, 3);
	notice_release(&n);
	/* The run's end drops its rings. */
	ev = (Kpl__V1__RunEvent)KPL__V1__RUN_EVENT__INIT;
	ev.run_id = "r-1";
	ev.kind = KPL__V1__EVENT_KIND__EVENT_KIND_RUN_STATE;
	ev.run_state = KPL__V1__RUN_STATE__RUN_STATE_FAILED;
	log_rings_feed(r, &ev);
	assert_int_equal(log_rings_take(r, "r-1", "b", 2, &n), 0);
	assert_int_equal(n.n_log, 0);
	log_rings_free(r);
}

static void test_config(void **state)
{
	static const char good[] =
		"server: 127.0.0.1:1\n"
		"state_file: /tmp/x\n"
		"start: beginning\n"
		"backoff: 200ms\n"
		"chats:\n"
		"  - { name: a, kind: slack, url_env: CHATBOT_TEST_URL, pipelines: [shop],\n"
		"      events: [failed, stage_failed] }\n"
		"  - { name: b, kind: dingtalk, url: 'http://h/x?access_token=t', secret: SEC1 }\n"
		"  - { name: c, kind: slack, url: 'http://h/T/B/X', buttons: true }\n";
	struct chatbot_config c;
	struct kpl_err err = { 0 };

	(void)state;
	setenv("CHATBOT_TEST_URL", "http://127.0.0.1:9/hook", 1);
	assert_int_equal(chatbot_config_parse(good, strlen(good), "bot.yaml", &c, &err), 0);
	assert_int_equal(c.n_chats, 3);
	assert_string_equal(c.chats[0].url, "http://127.0.0.1:9/hook");
	assert_int_equal(c.chats[0].buttons, 0);
	assert_int_equal(c.chats[2].buttons, 1);
	assert_int_equal(c.backoff_ms, 200);
	assert_int_equal(c.start_beginning, 1);
	assert_true(chat_wants(&c.chats[0], NOTICE_FAILED, "shop"));
	assert_false(chat_wants(&c.chats[0], NOTICE_FAILED, "other"));
	assert_false(chat_wants(&c.chats[0], NOTICE_STARTED, "shop"));
	assert_true(chat_wants(&c.chats[1], NOTICE_STARTED, "any"));
	chatbot_config_release(&c);

	unsetenv("CHATBOT_TEST_URL");
	assert_int_equal(chatbot_config_parse(good, strlen(good), "bot.yaml", &c, &err),
			 KPL_EINVAL);
	assert_string_equal(err.msg, "bot.yaml:6:38: chats[0].url_env: environment variable "
				     "CHATBOT_TEST_URL is not set");

	static const char bad_event[] = "state_file: s\nchats:\n"
					"  - { name: a, kind: slack, url: 'http://h/T/B/SECRETPATH',"
					" events: [done] }\n";
	assert_int_equal(chatbot_config_parse(bad_event, strlen(bad_event), "bot.yaml", &c, &err),
			 KPL_EINVAL);
	assert_non_null(strstr(err.msg, "bot.yaml:3:"));
	assert_non_null(strstr(err.msg, "unknown event"));
	assert_null(strstr(err.msg, "SECRETPATH"));

	static const char bad_buttons[] = "state_file: s\nchats:\n"
					  "  - { name: a, kind: wecom, url: 'http://h/x', buttons: true }\n";
	assert_int_equal(chatbot_config_parse(bad_buttons, strlen(bad_buttons), "bot.yaml", &c,
					      &err), KPL_EINVAL);
	assert_non_null(strstr(err.msg, "chats[0].buttons: buttons are for slack chats only"));
}

/* kpld connection keys: ca, cert and key together, token or token_env. */
static void test_config_connection(void **state)
{
	static const char chats[] = "state_file: s\n"
				    "chats: [{ name: a, kind: slack, url: 'http://h/x' }]\n";
	struct chatbot_config c;
	struct kpl_err err = { 0 };
	char text[512];

	(void)state;
	assert_int_equal(chatbot_config_parse(chats, strlen(chats), "bot.yaml", &c, &err), 0);
	assert_null(c.ca);
	assert_null(c.cert);
	assert_null(c.token);
	chatbot_config_release(&c);

	snprintf(text, sizeof text, "ca: /etc/kpl/ca.pem\ncert: /etc/kpl/bot.pem\n"
				    "key: /etc/kpl/bot.key\ntoken_env: CHATBOT_TEST_TOKEN\n%s",
		 chats);
	setenv("CHATBOT_TEST_TOKEN", "kpl_TESTTOKEN", 1);
	assert_int_equal(chatbot_config_parse(text, strlen(text), "bot.yaml", &c, &err), 0);
	assert_string_equal(c.ca, "/etc/kpl/ca.pem");
	assert_string_equal(c.cert, "/etc/kpl/bot.pem");
	assert_string_equal(c.key, "/etc/kpl/bot.key");
	assert_string_equal(c.token, "kpl_TESTTOKEN");
	chatbot_config_release(&c);
	unsetenv("CHATBOT_TEST_TOKEN");
	assert_int_equal(chatbot_config_parse(text, strlen(text), "bot.yaml", &c, &err),
			 KPL_EINVAL);
	assert_string_equal(err.msg, "bot.yaml:4:12: token_env: environment variable "
				     "CHATBOT_TEST_TOKEN is not set");

	snprintf(text, sizeof text, "token: kpl_SECRET\ntoken_env: X\n%s", chats);
	assert_int_equal(chatbot_config_parse(text, strlen(text), "bot.yaml", &c, &err),
			 KPL_EINVAL);
	assert_null(strstr(err.msg, "kpl_SECRET"));

	snprintf(text, sizeof text, "ca: /ca.pem\ncert: /bot.pem\n%s", chats);
	assert_int_equal(chatbot_config_parse(text, strlen(text), "bot.yaml", &c, &err),
			 KPL_EINVAL);
	assert_string_equal(err.msg, "bot.yaml:2:7: cert: needs key too (the client "
				     "certificate's private key)");

	snprintf(text, sizeof text, "cert: /bot.pem\nkey: /bot.key\n%s", chats);
	assert_int_equal(chatbot_config_parse(text, strlen(text), "bot.yaml", &c, &err),
			 KPL_EINVAL);
	assert_non_null(strstr(err.msg, "cert: needs ca"));
}

static void test_state_roundtrip(void **state)
{
	char dir[] = "/tmp/chatbot_test.XXXXXX", path[256];
	char *names[] = { "a", "b" }, *names3[] = { "a", "b", "c" };
	uint64_t acked[2] = { 40, 37 }, got[3];
	struct kpl_err err = { 0 };
	FILE *f;

	(void)state;
	assert_non_null(mkdtemp(dir));
	snprintf(path, sizeof path, "%s/state.json", dir);
	assert_int_equal(chatbot_state_load(path, names, 2, got, &err), KPL_ENOTFOUND);
	assert_int_equal(chatbot_state_save(path, names, 2, acked, &err), 0);
	/* "c" is new: it starts where the others resume. */
	assert_int_equal(chatbot_state_load(path, names3, 3, got, &err), 0);
	assert_int_equal(got[0], 40);
	assert_int_equal(got[1], 37);
	assert_int_equal(got[2], 37);
	f = fopen(path, "w");
	fputs("{\"global_seq\": \"x\"}", f);
	fclose(f);
	assert_int_equal(chatbot_state_load(path, names, 2, got, &err), KPL_ECORRUPT);
	unlink(path);
	rmdir(dir);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_classify),
		cmocka_unit_test(test_render_stage_failed),
		cmocka_unit_test(test_render_buttons),
		cmocka_unit_test(test_render_bounds),
		cmocka_unit_test(test_utf8_truncate),
		cmocka_unit_test(test_dingtalk_sign),
		cmocka_unit_test(test_judge),
		cmocka_unit_test(test_rings),
		cmocka_unit_test(test_config),
		cmocka_unit_test(test_config_connection),
		cmocka_unit_test(test_state_roundtrip),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
