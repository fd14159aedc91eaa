/*
 * kinds.c - the stage kinds, listed once. Dispatch (the engine), the
 * pipeline validator and the docs all read this table.
 */
#include <string.h>

#include "stages/kinds.h"

static const struct stage_kind *const kinds[] = {
	&script_kind,
	&noop_kind,
	&approval_kind,
	&verify_kind,
	&deploy_kind,
	&rollback_kind,
	&build_kind,
	&push_kind,
	&checkout_kind,
	&mesh_kind,
	&canary_kind,
};

const struct stage_kind *stage_kind_find(const char *name)
{
	for (size_t i = 0; i < KPL_ARRAY_SIZE(kinds); i++)
		if (strcmp(kinds[i]->name, name) == 0)
			return kinds[i];
	return NULL;
}

const struct pl_kind *stage_kinds_for_parser(size_t *n)
{
	static struct pl_kind table[KPL_ARRAY_SIZE(kinds)];

	if (!table[0].kind)
		for (size_t i = 0; i < KPL_ARRAY_SIZE(kinds); i++) {
			table[i].kind = kinds[i]->name;
			table[i].check_with = kinds[i]->check_with;
			table[i].with_roots = kinds[i]->with_roots;
			table[i].argv_keys = kinds[i]->argv_keys;
			table[i].with_keys = kinds[i]->with_keys;
			table[i].runs_on = kinds[i]->runs_on;
			table[i].pod_capable = kinds[i]->pod_capable;
			table[i].check_pod = kinds[i]->check_pod;
		}
	*n = KPL_ARRAY_SIZE(kinds);
	return table;
}
