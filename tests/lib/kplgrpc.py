"""kplgrpc - a gRPC client for kpld that learns every type by server reflection.

No generated stubs: the reflection messages are described here by hand (a
FileDescriptorProto built in code), and every other type comes from the
server's own answers, so tests check what the server really publishes.

    from kplgrpc import Client
    with Client.connect("127.0.0.1:7070") as c:
        c.list_services()                     # ["kpl.v1.Pipelines", ...]
        run = c.call("kpl.v1.Pipelines/GetRun", {"id": "r1"})
        for ev in c.stream("kpl.v1.Pipelines/WatchRun", {"id": "r1"}):
            ...
        c.health_check("")                    # "SERVING"

Needs Debian's python3-grpcio and python3-protobuf (run with /usr/bin/python3).
Errors from calls are grpc.RpcError (code(), details()); reflection errors are
ReflectionError.
"""

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

__all__ = ["Client", "ReflectionError", "REFLECTION_V1ALPHA", "REFLECTION_V1"]

REFLECTION_V1ALPHA = "grpc.reflection.v1alpha"
REFLECTION_V1 = "grpc.reflection.v1"

_F = descriptor_pb2.FieldDescriptorProto


class ReflectionError(Exception):
    """The server answered a reflection request with error_response."""

    def __init__(self, code, message):
        super().__init__("reflection error %d: %s" % (code, message))
        self.code = code
        self.message = message


def _reflection_file(package):
    """The reflection protocol's messages (grpc's reflection.proto) under
    package, built by hand: v1alpha and v1 have the same wire format."""
    fd = descriptor_pb2.FileDescriptorProto(
        name="kplgrpc/%s/reflection.proto" % package, package=package, syntax="proto3")
    pkg = "." + package + "."

    def message(name, *fields, oneof=None):
        m = fd.message_type.add(name=name)
        if oneof:
            m.oneof_decl.add(name=oneof)
        for number, fname, ftype, extra in fields:
            f = m.field.add(name=fname, number=number, type=ftype,
                            label=extra.get("label", _F.LABEL_OPTIONAL))
            if "type_name" in extra:
                f.type_name = pkg + extra["type_name"]
            if extra.get("oneof"):
                f.oneof_index = 0
        return m

    S, B, I32, M = _F.TYPE_STRING, _F.TYPE_BYTES, _F.TYPE_INT32, _F.TYPE_MESSAGE
    rep = {"label": _F.LABEL_REPEATED}
    message("ServerReflectionRequest",
            (1, "host", S, {}),
            (3, "file_by_filename", S, {"oneof": True}),
            (4, "file_containing_symbol", S, {"oneof": True}),
            (5, "file_containing_extension", M, {"oneof": True, "type_name": "ExtensionRequest"}),
            (6, "all_extension_numbers_of_type", S, {"oneof": True}),
            (7, "list_services", S, {"oneof": True}),
            oneof="message_request")
    message("ExtensionRequest",
            (1, "containing_type", S, {}),
            (2, "extension_number", I32, {}))
    message("ServerReflectionResponse",
            (1, "valid_host", S, {}),
            (2, "original_request", M, {"type_name": "ServerReflectionRequest"}),
            (4, "file_descriptor_response", M, {"oneof": True, "type_name": "FileDescriptorResponse"}),
            (5, "all_extension_numbers_response", M,
             {"oneof": True, "type_name": "ExtensionNumberResponse"}),
            (6, "list_services_response", M, {"oneof": True, "type_name": "ListServiceResponse"}),
            (7, "error_response", M, {"oneof": True, "type_name": "ErrorResponse"}),
            oneof="message_response")
    message("FileDescriptorResponse", (1, "file_descriptor_proto", B, rep))
    message("ExtensionNumberResponse",
            (1, "base_type_name", S, {}),
            (2, "extension_number", I32, rep))
    message("ListServiceResponse", (1, "service", M, dict(rep, type_name="ServiceResponse")))
    message("ServiceResponse", (1, "name", S, {}))
    message("ErrorResponse", (1, "error_code", I32, {}), (2, "error_message", S, {}))
    return fd


class _Pool:
    """A descriptor pool with a message-class cache."""

    def __init__(self):
        self.pool = descriptor_pool.DescriptorPool()
        self._factory = message_factory.MessageFactory(self.pool)
        self._classes = {}

    def has_file(self, name):
        try:
            self.pool.FindFileByName(name)
            return True
        except KeyError:
            return False

    def add(self, fd):
        self.pool.AddSerializedFile(fd.SerializeToString())

    def message_class(self, full_name):
        cls = self._classes.get(full_name)
        if cls is None:
            desc = self.pool.FindMessageTypeByName(full_name)
            get = getattr(message_factory, "GetMessageClass", None)
            cls = get(desc) if get else self._factory.GetPrototype(desc)
            self._classes[full_name] = cls
        return cls


def _pem(v):
    """PEM bytes from bytes, or from the file a str names; None stays None."""
    if v is None or isinstance(v, bytes):
        return v
    with open(v, "rb") as f:
        return f.read()


def split_method(name):
    """"/pkg.Svc/M", "pkg.Svc/M" or "pkg.Svc.M" -> ("pkg.Svc", "M")."""
    name = name.lstrip("/")
    if "/" in name:
        svc, _, m = name.partition("/")
    else:
        svc, _, m = name.rpartition(".")
    if not svc or not m:
        raise ValueError("method name %r: want pkg.Service/Method" % name)
    return svc, m


class Client:
    """A kpld client whose types all come from server reflection."""

    def __init__(self, addr, timeout=10.0, reflection=REFLECTION_V1ALPHA, options=None,
                 token=None, tls_ca=None, client_cert=None, client_key=None):
        """token: sent as "authorization: Bearer TOKEN" on every call that
        does not pass its own authorization metadata. tls_ca (PEM bytes or a
        file name) makes a TLS channel; client_cert and client_key (PEM bytes
        or file names) add a client certificate (mTLS)."""
        self.addr = addr
        self.timeout = timeout
        self.token = token
        if tls_ca is not None:
            creds = grpc.ssl_channel_credentials(
                root_certificates=_pem(tls_ca), private_key=_pem(client_key),
                certificate_chain=_pem(client_cert))
            self.channel = grpc.secure_channel(addr, creds, options=options or [])
        else:
            self.channel = grpc.insecure_channel(addr, options=options or [])
        self.types = _Pool()
        self._refl = _Pool()
        self._refl.add(_reflection_file(reflection))
        self._refl_pkg = reflection
        self._refl_req = self._refl.message_class(reflection + ".ServerReflectionRequest")
        self._refl_resp = self._refl.message_class(reflection + ".ServerReflectionResponse")
        self._refl_rpc = self.channel.stream_stream(
            "/%s.ServerReflection/ServerReflectionInfo" % reflection,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=self._refl_resp.FromString)

    @classmethod
    def connect(cls, addr, **kw):
        """Connects, waiting (up to timeout) for the channel to be ready."""
        c = cls(addr, **kw)
        try:
            grpc.channel_ready_future(c.channel).result(timeout=c.timeout)
        except Exception:
            c.close()
            raise
        return c

    def close(self):
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- Reflection. ---

    def reflection_request(self, **fields):
        """A ServerReflectionRequest message (e.g. list_services="")."""
        return self._refl_req(**fields)

    def reflect(self, requests, timeout=None):
        """Sends requests (messages or dicts of fields) on one
        ServerReflectionInfo stream and returns the responses, in order."""
        msgs = [r if not isinstance(r, dict) else self._refl_req(**r) for r in requests]
        return list(self._refl_rpc(iter(msgs), timeout=timeout or self.timeout))

    def _reflect_one(self, **fields):
        (resp,) = self.reflect([fields])
        if resp.WhichOneof("message_response") == "error_response":
            raise ReflectionError(resp.error_response.error_code,
                                  resp.error_response.error_message)
        return resp

    def list_services(self):
        resp = self._reflect_one(list_services="")
        return [s.name for s in resp.list_services_response.service]

    def _files(self, resp):
        out = []
        for raw in resp.file_descriptor_response.file_descriptor_proto:
            fd = descriptor_pb2.FileDescriptorProto()
            fd.ParseFromString(raw)
            out.append(fd)
        return out

    def file_containing_symbol(self, symbol):
        """The FileDescriptorProtos the server sends for symbol (its file
        first, then its transitive dependencies)."""
        return self._files(self._reflect_one(file_containing_symbol=symbol))

    def file_by_filename(self, name):
        return self._files(self._reflect_one(file_by_filename=name))

    def add_files(self, files):
        """Adds FileDescriptorProtos to the type pool, dependencies first;
        files already there are skipped."""
        by_name = {f.name: f for f in files}
        adding = set()

        def add(name):
            if self.types.has_file(name):
                return
            if name in adding:
                raise ValueError("import cycle through %s" % name)
            fd = by_name.get(name)
            if fd is None:
                raise KeyError("server did not send %s" % name)
            adding.add(name)
            for dep in fd.dependency:
                add(dep)
            self.types.add(fd)

        for f in files:
            add(f.name)

    def load_symbol(self, symbol):
        """Makes symbol (and everything its file needs) known locally."""
        self.add_files(self.file_containing_symbol(symbol))

    def _ensure(self, find, full_name):
        try:
            return find(full_name)
        except KeyError:
            self.load_symbol(full_name)
            return find(full_name)

    def message_class(self, full_name):
        """The Python class of a message type, loaded by reflection."""
        self._ensure(self.types.pool.FindMessageTypeByName, full_name)
        return self.types.message_class(full_name)

    def method(self, name):
        """(path, request class, response class, server_streaming)."""
        svc, m = split_method(name)
        sd = self._ensure(self.types.pool.FindServiceByName, svc)
        md = sd.methods_by_name.get(m)
        if md is None:
            raise KeyError("service %s has no method %s" % (svc, m))
        return ("/%s/%s" % (svc, m), self.types.message_class(md.input_type.full_name),
                self.types.message_class(md.output_type.full_name), md.server_streaming)

    # --- Calls. ---

    def _md(self, metadata):
        """metadata plus the client's token, unless metadata has its own
        authorization."""
        md = list(metadata or [])
        if self.token and not any(k.lower() == "authorization" for k, _ in md):
            md.append(("authorization", "Bearer " + self.token))
        return md or None

    @staticmethod
    def _request(cls, req):
        if req is None:
            return cls()
        if isinstance(req, dict):
            return json_format.ParseDict(req, cls())
        if req.DESCRIPTOR.full_name != cls.DESCRIPTOR.full_name:
            raise TypeError("request is %s, method wants %s"
                            % (req.DESCRIPTOR.full_name, cls.DESCRIPTOR.full_name))
        return req

    def call(self, method, request=None, timeout=None, metadata=None):
        """Calls a unary method; returns the response message or raises
        grpc.RpcError."""
        path, req_cls, resp_cls, streaming = self.method(method)
        if streaming:
            raise TypeError("%s is server-streaming: use stream()" % method)
        rpc = self.channel.unary_unary(path, request_serializer=lambda m: m.SerializeToString(),
                                       response_deserializer=resp_cls.FromString)
        return rpc(self._request(req_cls, request), timeout=timeout or self.timeout,
                   metadata=self._md(metadata))

    def call_future(self, method, request=None, timeout=None, metadata=None):
        """Starts a unary call; returns a grpc future (result(), code())."""
        path, req_cls, resp_cls, _ = self.method(method)
        rpc = self.channel.unary_unary(path, request_serializer=lambda m: m.SerializeToString(),
                                       response_deserializer=resp_cls.FromString)
        return rpc.future(self._request(req_cls, request), timeout=timeout or self.timeout,
                          metadata=self._md(metadata))

    def stream(self, method, request=None, timeout=None, metadata=None):
        """Calls a server-streaming method; returns the grpc call: iterate it
        for responses, cancel() it to stop early."""
        path, req_cls, resp_cls, streaming = self.method(method)
        if not streaming:
            raise TypeError("%s is unary: use call()" % method)
        rpc = self.channel.unary_stream(path, request_serializer=lambda m: m.SerializeToString(),
                                        response_deserializer=resp_cls.FromString)
        return rpc(self._request(req_cls, request), timeout=timeout or self.timeout,
                   metadata=self._md(metadata))

    def raw_call(self, path, payload, timeout=None, metadata=None):
        """Calls path with raw request bytes; returns raw response bytes."""
        rpc = self.channel.unary_unary(path)
        return rpc(payload, timeout=timeout or self.timeout, metadata=self._md(metadata))

    # --- Health. ---

    def _health_status_name(self, resp):
        return resp.DESCRIPTOR.fields_by_name["status"].enum_type.values_by_number[resp.status].name

    def health_check(self, service="", timeout=None):
        """"SERVING", "NOT_SERVING", ...; raises grpc.RpcError (NOT_FOUND)
        for a service the server does not know."""
        return self._health_status_name(
            self.call("grpc.health.v1.Health/Check", {"service": service}, timeout=timeout))

    def health_watch(self, service="", timeout=None):
        """The Watch call: iterate it for HealthCheckResponse messages
        (health_status_name() names them), cancel() it to stop."""
        return self.stream("grpc.health.v1.Health/Watch", {"service": service}, timeout=timeout)

    def health_status_name(self, resp):
        return self._health_status_name(resp)

    @staticmethod
    def to_dict(msg):
        return json_format.MessageToDict(msg, preserving_proto_field_name=True)
