/*
 * reflection.c - grpc.reflection.v1alpha and v1 ServerReflection over the
 * FileDescriptorSet embedded at build time (//api:descriptor_set).
 *
 * The set is decoded once, each file re-serialized once, and every symbol
 * (services, methods as "pkg.Svc.Method", messages including nested ones,
 * enums) indexed to its file. A file answer carries the file and all its
 * transitive dependencies, each once, file first (as grpc's C++ reflection
 * does). The v1 service has the same messages as v1alpha under another
 * package; its file is synthesized from the v1alpha one so that clients
 * using v1 can resolve the service they are talking to.
 */
#include <stdlib.h>
#include <string.h>

#include "api/reflection.pb-c.h"
#include "api/server_internal.h"
#include "google/protobuf/descriptor.pb-c.h"

extern const unsigned char api_descriptor_set[];
extern const size_t api_descriptor_set_len;

#define V1ALPHA_PKG "grpc.reflection.v1alpha"
#define V1_PKG "grpc.reflection.v1"
#define V1_FILE "grpc/reflection/v1/reflection.proto"

/* grpc status codes used in error_response. */
#define CODE_INVALID_ARGUMENT 3
#define CODE_NOT_FOUND 5
#define CODE_UNIMPLEMENTED 12

struct file {
	Google__Protobuf__FileDescriptorProto *fd; /* in set, or v1_fd */
	ProtobufCBinaryData bytes;                 /* serialized fd */
	size_t *deps;                              /* indexes into files */
	size_t n_deps;
};

struct sym {
	char *name;
	size_t file;
};

struct api_reflection {
	struct api_server *s;
	Google__Protobuf__FileDescriptorSet *set;
	Google__Protobuf__FileDescriptorProto *v1_fd; /* synthesized, owned */
	struct file *files;
	size_t n_files;
	struct sym *syms;
	size_t n_syms, cap_syms;
};

/* --- The index. --- */

static void sym_add(struct api_reflection *r, char *name, size_t file)
{
	if (r->n_syms == r->cap_syms) {
		r->cap_syms = r->cap_syms ? 2 * r->cap_syms : 64;
		r->syms = kpl_realloc(r->syms, r->cap_syms * sizeof *r->syms);
	}
	r->syms[r->n_syms].name = name;
	r->syms[r->n_syms].file = file;
	r->n_syms++;
}

static char *qualify(const char *prefix, const char *name)
{
	return *prefix ? kpl_asprintf("%s.%s", prefix, name) : kpl_strdup(name);
}

static void index_enums(struct api_reflection *r, const char *prefix,
			Google__Protobuf__EnumDescriptorProto **e, size_t n,
			size_t file)
{
	for (size_t i = 0; i < n; i++)
		sym_add(r, qualify(prefix, e[i]->name), file);
}

static void index_messages(struct api_reflection *r, const char *prefix,
			   Google__Protobuf__DescriptorProto **m, size_t n,
			   size_t file, int depth)
{
	if (depth > KPL_MAX_DEPTH)
		return;
	for (size_t i = 0; i < n; i++) {
		char *name = qualify(prefix, m[i]->name);
		sym_add(r, name, file);
		index_messages(r, name, m[i]->nested_type, m[i]->n_nested_type,
			       file, depth + 1);
		index_enums(r, name, m[i]->enum_type, m[i]->n_enum_type, file);
	}
}

static void index_file(struct api_reflection *r, size_t fi)
{
	Google__Protobuf__FileDescriptorProto *fd = r->files[fi].fd;
	const char *pkg = fd->package ? fd->package : "";

	index_messages(r, pkg, fd->message_type, fd->n_message_type, fi, 0);
	index_enums(r, pkg, fd->enum_type, fd->n_enum_type, fi);
	for (size_t i = 0; i < fd->n_service; i++) {
		Google__Protobuf__ServiceDescriptorProto *svc = fd->service[i];
		char *name = qualify(pkg, svc->name);
		sym_add(r, name, fi);
		for (size_t j = 0; j < svc->n_method; j++)
			sym_add(r, qualify(name, svc->method[j]->name), fi);
	}
}

static int sym_cmp(const void *a, const void *b)
{
	return strcmp(((const struct sym *)a)->name, ((const struct sym *)b)->name);
}

static long file_by_name(struct api_reflection *r, const char *name)
{
	for (size_t i = 0; i < r->n_files; i++)
		if (r->files[i].fd->name && strcmp(r->files[i].fd->name, name) == 0)
			return (long)i;
	return -1;
}

static long file_by_symbol(struct api_reflection *r, const char *name)
{
	struct sym key = { (char *)name, 0 };
	struct sym *hit;

	if (*name == '.')
		key.name++;
	hit = bsearch(&key, r->syms, r->n_syms, sizeof *r->syms, sym_cmp);
	return hit ? (long)hit->file : -1;
}

/* ".grpc.reflection.v1alpha.X" -> ".grpc.reflection.v1.X", in place. */
static void v1_rename(char **type_name)
{
	static const char from[] = "." V1ALPHA_PKG ".";
	char *old = *type_name;

	if (!old || strncmp(old, from, sizeof from - 1) != 0)
		return;
	*type_name = kpl_asprintf("." V1_PKG ".%s", old + sizeof from - 1);
	free(old);
}

/*
 * The v1 reflection file: the v1alpha one decoded afresh and renamed. Its
 * strings are replaced with malloc'd ones, which free_unpacked (system
 * allocator) frees.
 */
static Google__Protobuf__FileDescriptorProto *
v1_synthesize(const ProtobufCBinaryData *v1alpha)
{
	Google__Protobuf__FileDescriptorProto *fd =
		google__protobuf__file_descriptor_proto__unpack(NULL, v1alpha->len,
								 v1alpha->data);

	if (!fd)
		return NULL;
	free(fd->name);
	fd->name = kpl_strdup(V1_FILE);
	free(fd->package);
	fd->package = kpl_strdup(V1_PKG);
	for (size_t i = 0; i < fd->n_message_type; i++) {
		Google__Protobuf__DescriptorProto *m = fd->message_type[i];
		for (size_t j = 0; j < m->n_field; j++)
			v1_rename(&m->field[j]->type_name);
	}
	for (size_t i = 0; i < fd->n_service; i++)
		for (size_t j = 0; j < fd->service[i]->n_method; j++) {
			Google__Protobuf__MethodDescriptorProto *md =
				fd->service[i]->method[j];
			v1_rename(&md->input_type);
			v1_rename(&md->output_type);
		}
	if (fd->options) {
		/* Language options (java_package, go_package...) name v1alpha. */
		google__protobuf__file_options__free_unpacked(fd->options, NULL);
		fd->options = NULL;
	}
	return fd;
}

static void file_pack(struct file *f)
{
	f->bytes.len = google__protobuf__file_descriptor_proto__get_packed_size(f->fd);
	f->bytes.data = kpl_malloc(f->bytes.len ? f->bytes.len : 1);
	google__protobuf__file_descriptor_proto__pack(f->fd, f->bytes.data);
}

int api_reflection_new(struct api_server *s, struct api_reflection **out,
		       struct kpl_err *err)
{
	struct api_reflection *r = kpl_calloc(1, sizeof *r);
	long v1alpha = -1;

	r->s = s;
	r->set = google__protobuf__file_descriptor_set__unpack(
		NULL, api_descriptor_set_len, api_descriptor_set);
	if (!r->set) {
		free(r);
		*out = NULL;
		return kpl_errf(err, KPL_ECORRUPT,
				"embedded descriptor set does not decode");
	}
	r->files = kpl_calloc(r->set->n_file + 1, sizeof *r->files);
	for (size_t i = 0; i < r->set->n_file; i++) {
		struct file *f = &r->files[r->n_files++];
		f->fd = r->set->file[i];
		file_pack(f);
		if (f->fd->package && strcmp(f->fd->package, V1ALPHA_PKG) == 0)
			v1alpha = (long)i;
	}
	if (v1alpha >= 0 && (r->v1_fd = v1_synthesize(&r->files[v1alpha].bytes))) {
		struct file *f = &r->files[r->n_files++];
		f->fd = r->v1_fd;
		file_pack(f);
	}
	for (size_t i = 0; i < r->n_files; i++) {
		struct file *f = &r->files[i];
		f->deps = kpl_calloc(f->fd->n_dependency + 1, sizeof *f->deps);
		for (size_t j = 0; j < f->fd->n_dependency; j++) {
			long d = file_by_name(r, f->fd->dependency[j]);
			if (d < 0)
				kpl_warn("api", "reflection: %s imports %s, not embedded",
					 f->fd->name, f->fd->dependency[j]);
			else
				f->deps[f->n_deps++] = (size_t)d;
		}
		index_file(r, i);
	}
	qsort(r->syms, r->n_syms, sizeof *r->syms, sym_cmp);
	*out = r;
	return 0;
}

void api_reflection_free(struct api_reflection *r)
{
	for (size_t i = 0; i < r->n_files; i++) {
		free(r->files[i].bytes.data);
		free(r->files[i].deps);
	}
	free(r->files);
	for (size_t i = 0; i < r->n_syms; i++)
		free(r->syms[i].name);
	free(r->syms);
	if (r->v1_fd)
		google__protobuf__file_descriptor_proto__free_unpacked(r->v1_fd, NULL);
	google__protobuf__file_descriptor_set__free_unpacked(r->set, NULL);
	free(r);
}

/* --- Answers. --- */

/* Appends file fi, then its dependencies, each once. */
static void collect(struct api_reflection *r, size_t fi, bool *seen,
		    ProtobufCBinaryData *out, size_t *n)
{
	if (seen[fi])
		return;
	seen[fi] = true;
	out[(*n)++] = r->files[fi].bytes;
	for (size_t i = 0; i < r->files[fi].n_deps; i++)
		collect(r, r->files[fi].deps[i], seen, out, n);
}

static void answer(struct api_reflection *r,
		   const Grpc__Reflection__V1alpha__ServerReflectionRequest *req,
		   Grpc__Reflection__V1alpha__ServerReflectionResponse *resp)
{
	static Grpc__Reflection__V1alpha__FileDescriptorResponse fdr_init =
		GRPC__REFLECTION__V1ALPHA__FILE_DESCRIPTOR_RESPONSE__INIT;
	static Grpc__Reflection__V1alpha__ListServiceResponse ls_init =
		GRPC__REFLECTION__V1ALPHA__LIST_SERVICE_RESPONSE__INIT;
	static Grpc__Reflection__V1alpha__ServiceResponse sr_init =
		GRPC__REFLECTION__V1ALPHA__SERVICE_RESPONSE__INIT;
	static Grpc__Reflection__V1alpha__ErrorResponse er_init =
		GRPC__REFLECTION__V1ALPHA__ERROR_RESPONSE__INIT;
	int code = 0;
	char *msg = NULL;
	long fi = -1;

	resp->valid_host = req->host;
	resp->original_request =
		(Grpc__Reflection__V1alpha__ServerReflectionRequest *)req;

	switch (req->message_request_case) {
	case GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_LIST_SERVICES: {
		const char *const *names;
		size_t n = api_server_services(r->s, &names);
		Grpc__Reflection__V1alpha__ListServiceResponse *ls =
			kpl_malloc(sizeof *ls);
		*ls = ls_init;
		ls->n_service = n;
		ls->service = kpl_calloc(n + 1, sizeof *ls->service);
		for (size_t i = 0; i < n; i++) {
			ls->service[i] = kpl_malloc(sizeof *ls->service[i]);
			*ls->service[i] = sr_init;
			ls->service[i]->name = (char *)names[i];
		}
		resp->message_response_case =
			GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_LIST_SERVICES_RESPONSE;
		resp->list_services_response = ls;
		return;
	}
	case GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_BY_FILENAME:
		fi = file_by_name(r, req->file_by_filename);
		if (fi < 0) {
			code = CODE_NOT_FOUND;
			msg = kpl_asprintf("file not found: %.512s",
					   req->file_by_filename);
		}
		break;
	case GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_CONTAINING_SYMBOL:
		fi = file_by_symbol(r, req->file_containing_symbol);
		if (fi < 0) {
			code = CODE_NOT_FOUND;
			msg = kpl_asprintf("symbol not found: %.512s",
					   req->file_containing_symbol);
		}
		break;
	case GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_CONTAINING_EXTENSION:
	case GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_ALL_EXTENSION_NUMBERS_OF_TYPE:
		code = CODE_UNIMPLEMENTED;
		msg = kpl_strdup("extensions are not supported");
		break;
	default:
		code = CODE_INVALID_ARGUMENT;
		msg = kpl_strdup("request names no question");
		break;
	}

	if (code) {
		Grpc__Reflection__V1alpha__ErrorResponse *er =
			kpl_malloc(sizeof *er);
		*er = er_init;
		er->error_code = code;
		er->error_message = msg;
		resp->message_response_case =
			GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_ERROR_RESPONSE;
		resp->error_response = er;
	} else {
		Grpc__Reflection__V1alpha__FileDescriptorResponse *fdr =
			kpl_malloc(sizeof *fdr);
		bool *seen = kpl_calloc(r->n_files, sizeof *seen);
		*fdr = fdr_init;
		fdr->file_descriptor_proto =
			kpl_calloc(r->n_files, sizeof *fdr->file_descriptor_proto);
		collect(r, (size_t)fi, seen, fdr->file_descriptor_proto,
			&fdr->n_file_descriptor_proto);
		free(seen);
		resp->message_response_case =
			GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_FILE_DESCRIPTOR_RESPONSE;
		resp->file_descriptor_response = fdr;
	}
}

/* Frees what answer() allocated (borrowed strings and bytes stay). */
static void answer_free(Grpc__Reflection__V1alpha__ServerReflectionResponse *resp)
{
	switch (resp->message_response_case) {
	case GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_LIST_SERVICES_RESPONSE:
		for (size_t i = 0; i < resp->list_services_response->n_service; i++)
			free(resp->list_services_response->service[i]);
		free(resp->list_services_response->service);
		free(resp->list_services_response);
		break;
	case GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_ERROR_RESPONSE:
		free(resp->error_response->error_message);
		free(resp->error_response);
		break;
	case GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_FILE_DESCRIPTOR_RESPONSE:
		free(resp->file_descriptor_response->file_descriptor_proto);
		free(resp->file_descriptor_response);
		break;
	default:
		break;
	}
}

static void on_request(struct api_call *call, ProtobufCMessage *msg,
		       enum api_recv_status st, void *data);

static void on_sent(struct api_call *call, bool ok, void *data)
{
	if (!ok) {
		api_call_finish(call, 1 /* CANCELLED */, "client went away");
		return;
	}
	api_call_recv(call,
		      &grpc__reflection__v1alpha__server_reflection_request__descriptor,
		      on_request, data);
}

static void on_request(struct api_call *call, ProtobufCMessage *msg,
		       enum api_recv_status st, void *data)
{
	struct api_reflection *r = data;
	Grpc__Reflection__V1alpha__ServerReflectionResponse resp =
		GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_RESPONSE__INIT;

	switch (st) {
	case API_RECV_END:
		api_call_finish(call, 0, NULL);
		return;
	case API_RECV_FAILED:
		api_call_finish(call, 1 /* CANCELLED */, "client went away");
		return;
	case API_RECV_BADMSG:
		api_call_finish(call, 3 /* INVALID_ARGUMENT */,
				"request does not decode as "
				"grpc.reflection.v1alpha.ServerReflectionRequest");
		return;
	case API_RECV_MSG:
		break;
	}
	answer(r, (const Grpc__Reflection__V1alpha__ServerReflectionRequest *)msg,
	       &resp);
	api_call_send(call, &resp.base, on_sent, r);
	answer_free(&resp);
	protobuf_c_message_free_unpacked(msg, NULL);
}

void api_reflection_info(struct api_call *call, const ProtobufCMessage *req,
			 void *data)
{
	api_call_recv(call,
		      &grpc__reflection__v1alpha__server_reflection_request__descriptor,
		      on_request, data);
}
