"""kpl_fuzz_test: one fuzz target as a binary and a test."""

def kpl_fuzz_test(name, deps, dict = None, corpus = None, seconds = 15, srcs = None, size = "small"):
    """NAME_fuzz.c as binary NAME_fuzz and test NAME_fuzz_test.

    With --config=fuzz (clang) the binary is a libFuzzer binary and the test
    fuzzes it for `seconds` from corpus/CORPUS; otherwise the binary replays
    the corpus once (tests/fuzz/replay_main.c), in any build.
    """
    corpus = corpus or name
    native.cc_binary(
        name = name + "_fuzz",
        srcs = srcs or [name + "_fuzz.c"],
        deps = deps + [":fuzz_lib"] + select({
            ":fuzzing": [],
            "//conditions:default": [":replay_main"],
        }),
        linkopts = select({
            ":fuzzing": ["-fsanitize=fuzzer"],
            "//conditions:default": [],
        }),
        testonly = True,
    )
    native.sh_test(
        name = name + "_fuzz_test",
        size = size,
        srcs = ["run_fuzz.sh"],
        args = select({
            ":fuzzing": ["fuzz"],
            "//conditions:default": ["replay"],
        }) + [
            "$(location :%s_fuzz)" % name,
            "tests/fuzz/corpus/" + corpus,
            "$(location %s)" % dict if dict else "-",
            str(seconds),
        ],
        data = [":" + name + "_fuzz"] + native.glob(["corpus/%s/**" % corpus]) + ([dict] if dict else []),
        tags = ["fuzz"],
    )
