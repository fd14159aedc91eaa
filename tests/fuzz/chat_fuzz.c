/*
 * chat_fuzz.c - the chat webhooks' replies (WeCom, DingTalk, Slack) as
 * kpld's notifications and kpl-chatbot judge them
 * (clients/chatbot/notice.c chat_judge_reply: delivered, retry or
 * rejected), and UTF-8 truncation of the text they send. Input: replies in
 * fuzz.h's text form.
 */
#include <stdlib.h>
#include <string.h>

#include "clients/chatbot/notice.h"
#include "tests/fuzz/fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct fz_in in = { (const char *)data, size };
	struct fz_reply r;

	while (fz_next_reply(&in, &r)) {
		char why[200];

		for (int k = 0; k < CHAT_KIND_LAST; k++)
			chat_judge_reply((enum chat_kind)k, r.status, r.body, why, sizeof why);
		utf8_truncate(r.body, r.body_len / 2);
		fz_reply_release(&r);
	}
	return 0;
}
