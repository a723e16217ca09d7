"""Unit tests for the pure wire-protocol module `ccexec.protocol`.

The expectations come from the wire contract (docs/PROTOCOL.md) first and
the module second.
"""

from __future__ import annotations

import json
import math
import re
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ccexec import protocol as p
from ccexec.protocol import (
    CHUNK_CHARS,
    ControlSpec,
    ExecuteSpec,
    OutputSplitter,
    Piece,
    ProtocolError,
    Request,
    parse_control,
    parse_execute,
    parse_frame,
)

PROPERTY = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
PROPERTY_BIG = settings(max_examples=25, deadline=None,
                        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ------------------------------------------------------------------ helpers

def frame(**message) -> str:
    return json.dumps(message)


def rpc(method="ping", params=None, id=1, **extra) -> str:
    message = {"jsonrpc": "2.0", "method": method, "id": id, **extra}
    if params is not None:
        message["params"] = params
    return json.dumps(message)


def parse_error(text) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_frame(text)
    return info.value


def execute_request(request_id=1, **params) -> Request:
    return Request(method="execute", params=params, id=request_id, has_id=True)


def control_request(request_id=1, **params) -> Request:
    return Request(method="control", params=params, id=request_id, has_id=True)


def execute_error(**params) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_execute(execute_request(**params))
    return info.value


def run(splitter: OutputSplitter, parts) -> list[Piece]:
    pieces: list[Piece] = []
    for part in parts:
        pieces += splitter.feed(part)
    pieces += splitter.finish()
    return pieces


def run_flushing(splitter: OutputSplitter, parts, flush_after) -> list[Piece]:
    """Like run(), but flush() (chunks mode, stream gone quiet) after chosen feeds."""
    pieces: list[Piece] = []
    for index, part in enumerate(parts):
        pieces += splitter.feed(part)
        if index in flush_after:
            pieces += splitter.flush()
    pieces += splitter.finish()
    return pieces


def split_at(data: bytes, cuts) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def in_pieces(data: bytes, step: int) -> list[bytes]:
    return [data[i:i + step] for i in range(0, len(data), step)]


def assert_contiguous(pieces, raw: bytes, start: int = 0) -> None:
    """offsets run contiguously from start, sizes add up, data matches its bytes."""
    offset = start
    for piece in pieces:
        assert piece.offset == offset
        assert piece.size > 0
        chunk = raw[offset - start:offset - start + piece.size]
        assert piece.data == chunk.decode("utf-8", errors="replace")
        offset += piece.size
    assert offset - start == len(raw)


def lines_of(text: str) -> list[str]:
    """Split on "\n" only, keeping the newline (str.splitlines splits on more)."""
    return re.findall(r"[^\n]*\n|[^\n]+\Z", text)


def group_lines(pieces) -> list[list[Piece]]:
    """Group lines-mode pieces by line: a line ends at a piece that is not truncated."""
    groups, current = [], []
    for piece in pieces:
        current.append(piece)
        if not piece.truncated:
            groups.append(current)
            current = []
    assert not current, "a stream must not end on a truncated chunk"
    return groups


def decoded(message: str) -> dict:
    return json.loads(message)


# ============================================================ parse_frame

class TestParseFrame:
    def test_valid_request_is_parsed(self):
        request = parse_frame(rpc("execute", {"command": "echo hi"}, id="abc"))
        assert request == Request(method="execute", params={"command": "echo hi"},
                                  id="abc", has_id=True)

    def test_missing_params_become_empty_object(self):
        request = parse_frame(rpc("ping", id=3))
        assert request.params == {}

    @pytest.mark.parametrize("data", [
        b'{"jsonrpc":"2.0","method":"ping","id":1}',
        bytearray(b'{"jsonrpc":"2.0","method":"ping","id":1}'),
        memoryview(b'{"jsonrpc":"2.0","method":"ping","id":1}'),
        b"",
        b"\xff\xfe",
    ])
    def test_binary_frame_is_invalid_request(self, data):
        error = parse_error(data)
        assert error.code == p.INVALID_REQUEST == -32600
        assert error.request_id is None

    @pytest.mark.parametrize("text", ["{not json", "", "   ", '{"jsonrpc":"2.0",', "\ufeff{}",
                                      "{'single': 'quotes'}", '{"a":1}}'])
    def test_invalid_json_is_parse_error_with_null_id(self, text):
        error = parse_error(text)
        assert error.code == p.PARSE_ERROR == -32700
        assert error.request_id is None
        message = decoded(error.to_message())
        assert message["id"] is None
        assert message["error"]["code"] == -32700

    @pytest.mark.parametrize("text", ["[]", '[{"jsonrpc":"2.0","method":"ping","id":1}]',
                                      "1", '"execute"', "null", "true", "3.5"])
    def test_non_object_json_is_invalid_request(self, text):
        error = parse_error(text)
        assert error.code == -32600
        assert error.request_id is None

    @pytest.mark.parametrize("version", ["1.0", 2.0, 2, None, "2", " 2.0"])
    def test_bad_jsonrpc_version_is_invalid_request_carrying_the_id(self, version):
        error = parse_error(frame(jsonrpc=version, method="ping", id=7))
        assert error.code == -32600
        assert error.request_id == 7
        assert decoded(error.to_message())["id"] == 7

    def test_missing_jsonrpc_member_is_invalid_request_carrying_the_id(self):
        error = parse_error(frame(method="ping", id="req-1"))
        assert error.code == -32600
        assert error.request_id == "req-1"

    @pytest.mark.parametrize("request_id", ["abc", "", 0, 1, -5, 2**53, "42"])
    def test_string_and_integer_ids_are_accepted(self, request_id):
        request = parse_frame(rpc(id=request_id))
        assert request.id == request_id
        assert type(request.id) is type(request_id)
        assert request.has_id is True

    @pytest.mark.parametrize("raw_id", ["1.5", "1.0", "1e3", "true", "false", "null",
                                        "[1]", '{"a":1}', "NaN"])
    def test_float_bool_null_list_and_object_ids_are_invalid_request(self, raw_id):
        text = '{"jsonrpc":"2.0","method":"ping","id":%s}' % raw_id
        error = parse_error(text)
        assert error.code == -32600
        assert error.request_id is None  # no valid id could be read
        assert decoded(error.to_message())["id"] is None

    def test_request_without_id_has_has_id_false(self):
        request = parse_frame(frame(jsonrpc="2.0", method="execute", params={"command": "true"}))
        assert request.has_id is False
        assert request.id is None
        assert request.method == "execute"

    def test_error_for_request_without_id_carries_null_id(self):
        error = parse_error(frame(jsonrpc="2.0", method="", params={}))
        assert error.request_id is None

    @pytest.mark.parametrize("method", [None, "", 5, ["execute"], {"a": 1}, True])
    def test_missing_or_empty_or_non_string_method_is_invalid_request(self, method):
        message = {"jsonrpc": "2.0", "id": 9}
        if method is not None:
            message["method"] = method
        error = parse_error(json.dumps(message))
        assert error.code == -32600
        assert error.request_id == 9

    @pytest.mark.parametrize("params", [[1, 2], [], "x", 5, True])
    def test_params_that_are_not_an_object_are_invalid_params(self, params):
        error = parse_error(rpc("execute", params, id=11))
        assert error.code == p.INVALID_PARAMS == -32602
        assert error.request_id == 11

    @pytest.mark.parametrize("text", [
        "[" * 100_000,
        "[" * 100_000 + "]" * 100_000,
        '{"a":' * 100_000,
        '{"jsonrpc":"2.0","method":"execute","id":1,"params":{"x":' + "[" * 100_000
        + "]" * 100_000 + "}}",
    ])
    def test_deep_nesting_is_parse_error_not_recursion_error(self, text):
        error = parse_error(text)
        assert error.code == -32700
        assert error.request_id is None

    @pytest.mark.parametrize("open_, close", [("[", "]"), ('{"a":', "}")])
    def test_deep_nesting_with_a_lone_surrogate_is_an_error_at_every_depth(self, open_, close):
        # Whatever depth the parser just manages, checking its strings must not
        # run out of stack where parsing did not (-32603 and a traceback).
        import sys
        for depth in range(sys.getrecursionlimit() - 100, sys.getrecursionlimit() + 10):
            error = parse_error(open_ * depth + '"\\ud800"' + close * depth)
            assert error.code in (-32700, -32600) and error.request_id is None, depth

    def test_parse_error_message_is_valid_json_rpc_error(self):
        message = decoded(parse_error("{oops").to_message())
        assert message["jsonrpc"] == "2.0"
        assert set(message) == {"jsonrpc", "error", "id"}
        assert set(message["error"]) == {"code", "message", "data"}
        assert isinstance(message["error"]["message"], str)

    @PROPERTY
    @given(st.one_of(st.text(), st.binary()))
    def test_any_frame_gives_request_or_protocol_error(self, data):
        try:
            request = parse_frame(data)
        except ProtocolError as error:
            assert error.code in (-32700, -32600, -32602)
        else:
            assert isinstance(request, Request)

    @PROPERTY
    @given(st.fixed_dictionaries({}, optional={
        "jsonrpc": st.one_of(st.just("2.0"), st.just("1.0"), st.integers(), st.none()),
        "method": st.one_of(st.sampled_from(["execute", "control", "ping", ""]), st.text(),
                            st.integers(), st.none()),
        "id": st.one_of(st.text(max_size=5), st.integers(), st.floats(allow_nan=False),
                        st.booleans(), st.none(), st.lists(st.integers(), max_size=2)),
        "params": st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
            lambda children: st.lists(children, max_size=3)
            | st.dictionaries(st.text(max_size=5), children, max_size=3),
            max_leaves=10),
    }))
    def test_any_json_object_frame_gives_request_or_protocol_error(self, message):
        try:
            request = parse_frame(json.dumps(message))
        except ProtocolError as error:
            assert error.code in (-32600, -32602)
            assert error.request_id is None or isinstance(error.request_id, (str, int))
        else:
            assert isinstance(request.method, str) and request.method
            assert isinstance(request.params, dict)
            assert request.has_id == ("id" in message)
            assert request.id is None or (isinstance(request.id, (str, int))
                                          and not isinstance(request.id, bool))


# ========================================================== parse_execute

class TestParseExecute:
    def test_plain_command_gets_defaults(self):
        spec = parse_execute(execute_request(command="echo hi"))
        assert isinstance(spec, ExecuteSpec)
        assert spec.command == "echo hi"
        assert spec.argv is None
        assert spec.timeout is None
        assert spec.stall_timeout is None
        assert spec.detach is False
        assert spec.parallel is False
        assert spec.stream_mode == "lines"
        assert spec.env == {}
        assert spec.cwd is None and spec.stdin is None and spec.name is None

    @pytest.mark.parametrize("params", [{}, {"command": ""}, {"command": "   "},
                                        {"command": None}, {"command": 5},
                                        {"command": ["echo", "hi"]}, {"command": "a\0b"}])
    def test_command_is_required_and_non_empty(self, params):
        error = execute_error(**params)
        assert error.code == -32602
        assert error.data == {"param": "command"}
        assert "'command'" in error.message

    def test_argv_list_of_strings_is_accepted(self):
        spec = parse_execute(execute_request(argv=["ls", "-l", "a b"]))
        assert spec.argv == ("ls", "-l", "a b")
        assert spec.command is None

    @pytest.mark.parametrize("argv", [[], "ls -l", ["ls", 1], [None], [""], ["ls", "a\0b"],
                                      {"0": "ls"}])
    def test_argv_must_be_non_empty_list_of_strings(self, argv):
        error = execute_error(argv=argv)
        assert error.code == -32602
        assert error.data == {"param": "argv"}

    def test_command_and_argv_together_is_an_error(self):
        error = execute_error(command="ls", argv=["ls"])
        assert error.code == -32602
        assert error.data["param"] in ("argv", "command")
        assert f"'{error.data['param']}'" in error.message

    @pytest.mark.parametrize("value, expected", [
        (30, 30.0), (2.5, 2.5), ("30", 30.0), ("2.5", 2.5), (" 10 ", 10.0), (1e-3, 0.001),
    ])
    def test_timeout_accepts_int_float_and_numeric_string(self, value, expected):
        spec = parse_execute(execute_request(command="true", timeout=value))
        assert spec.timeout == expected
        assert isinstance(spec.timeout, float)

    def test_timeout_null_means_no_limit(self):
        assert parse_execute(execute_request(command="true", timeout=None)).timeout is None

    @pytest.mark.parametrize("value", [True, False, -1, -0.5, 0, 0.0, "0", "-3",
                                       math.nan, math.inf, -math.inf, "nan", "inf",
                                       "Infinity", "1e400", "abc", "", "30s", [30], {"s": 30}])
    def test_timeout_rejects_bool_negative_zero_non_finite_and_non_numeric(self, value):
        error = execute_error(command="true", timeout=value)
        assert error.code == -32602
        assert error.data == {"param": "timeout"}
        assert "'timeout'" in error.message

    def test_timeout_infinity_from_the_wire_is_invalid_params(self):
        request = parse_frame('{"jsonrpc":"2.0","id":1,"method":"execute",'
                              '"params":{"command":"true","timeout":Infinity}}')
        with pytest.raises(ProtocolError) as info:
            parse_execute(request)
        assert info.value.code == -32602
        assert info.value.data == {"param": "timeout"}

    def test_huge_integer_timeout_is_invalid_params_not_overflow_error(self):
        request = parse_frame('{"jsonrpc":"2.0","id":1,"method":"execute","params":'
                              '{"command":"true","timeout":1' + "0" * 400 + "}}")
        with pytest.raises(ProtocolError) as info:
            parse_execute(request)
        assert info.value.code == -32602
        assert info.value.data == {"param": "timeout"}

    @pytest.mark.parametrize("value, expected", [(0, 0.0), (0.0, 0.0), ("0", 0.0), (5, 5.0),
                                                 ("7.5", 7.5)])
    def test_stall_timeout_allows_zero(self, value, expected):
        spec = parse_execute(execute_request(command="true", stall_timeout=value))
        assert spec.stall_timeout == expected

    @pytest.mark.parametrize("value", [-1, True, "x", math.nan, math.inf, [1]])
    def test_stall_timeout_rejects_negative_bool_and_non_numbers(self, value):
        error = execute_error(command="true", stall_timeout=value)
        assert error.code == -32602
        assert error.data == {"param": "stall_timeout"}

    @pytest.mark.parametrize("mode", ["lines", "chunks"])
    def test_stream_mode_lines_and_chunks_are_accepted(self, mode):
        assert parse_execute(execute_request(command="true", stream_mode=mode)).stream_mode == mode

    @pytest.mark.parametrize("mode", ["bytes", "LINES", "line", 1, ["lines"], {"a": 1}])
    def test_other_stream_mode_is_invalid_params(self, mode):
        error = execute_error(command="true", stream_mode=mode)
        assert error.code == -32602
        assert error.data == {"param": "stream_mode"}

    def test_env_of_string_names_to_string_values_is_accepted(self):
        env = {"FOO": "1", "EMPTY": "", "UNI": "é"}
        spec = parse_execute(execute_request(command="true", env=env))
        assert spec.env == env

    @pytest.mark.parametrize("env", [["FOO=1"], "FOO=1", {"FOO": 1}, {"FOO": None},
                                     {"A=B": "1"}, {"": "x"}, {"A\0": "x"}, {"A": "x\0y"},
                                     {"A": ["x"]}])
    def test_env_with_bad_names_or_values_is_invalid_params(self, env):
        error = execute_error(command="true", env=env)
        assert error.code == -32602
        assert error.data == {"param": "env"}

    @pytest.mark.parametrize("flag", ["detach", "parallel"])
    def test_detach_and_parallel_accept_booleans(self, flag):
        assert getattr(parse_execute(execute_request(command="true", **{flag: True})), flag) is True
        assert getattr(parse_execute(execute_request(command="true", **{flag: False})), flag) is False

    @pytest.mark.parametrize("flag", ["detach", "parallel"])
    @pytest.mark.parametrize("value", [1, 0, "true", "yes", [True]])
    def test_detach_and_parallel_must_be_bool(self, flag, value):
        error = execute_error(command="true", **{flag: value})
        assert error.code == -32602
        assert error.data == {"param": flag}

    def test_unknown_extra_params_are_ignored(self):
        spec = parse_execute(execute_request(command="echo", foo=1, bar={"baz": [None]},
                                             session="x", timeout=5))
        assert spec.command == "echo"
        assert spec.timeout == 5.0

    def test_cwd_stdin_and_name_strings_are_kept(self):
        spec = parse_execute(execute_request(command="cat", cwd="/tmp", stdin="data\n",
                                             name="my job"))
        assert (spec.cwd, spec.stdin, spec.name) == ("/tmp", "data\n", "my job")

    @pytest.mark.parametrize("params, param", [
        ({"cwd": ""}, "cwd"), ({"cwd": 5}, "cwd"), ({"cwd": "/t\0mp"}, "cwd"),
        ({"stdin": 5}, "stdin"), ({"name": ["x"]}, "name"),
    ])
    def test_bad_optional_strings_are_invalid_params(self, params, param):
        error = execute_error(command="true", **params)
        assert error.data == {"param": param}

    @pytest.mark.parametrize("params, param", [
        ({}, "command"),
        ({"argv": []}, "argv"),
        ({"command": "x", "timeout": "soon"}, "timeout"),
        ({"command": "x", "stall_timeout": -1}, "stall_timeout"),
        ({"command": "x", "stream_mode": "raw"}, "stream_mode"),
        ({"command": "x", "env": {"A": 1}}, "env"),
        ({"command": "x", "detach": "no"}, "detach"),
        ({"command": "x", "parallel": 1}, "parallel"),
        ({"command": "x", "cwd": ""}, "cwd"),
    ])
    def test_invalid_params_error_names_the_param_and_carries_the_request_id(self, params, param):
        with pytest.raises(ProtocolError) as info:
            parse_execute(execute_request(request_id="req-9", **params))
        error = info.value
        assert error.code == -32602
        assert error.data == {"param": param}
        assert f"'{param}'" in error.message
        message = decoded(error.to_message())
        assert message == {"jsonrpc": "2.0", "id": "req-9",
                           "error": {"code": -32602, "message": error.message,
                                     "data": {"param": param}}}

    def test_spec_to_dict_round_trips_the_fields(self):
        spec = parse_execute(execute_request(argv=["ls"], env={"A": "1"}, timeout="3",
                                             stall_timeout=0, detach=True, stream_mode="chunks",
                                             name="n"))
        assert spec.to_dict() == {
            "command": None, "argv": ["ls"], "cwd": None, "env": {"A": "1"}, "stdin": None,
            "timeout": 3.0, "stall_timeout": 0.0, "detach": True, "stream_mode": "chunks",
            "name": "n",
        }
        json.dumps(spec.to_dict())

    @PROPERTY
    @given(st.dictionaries(
        st.sampled_from(["command", "argv", "timeout", "stall_timeout", "stream_mode", "env",
                         "detach", "parallel", "cwd", "stdin", "name", "other"]),
        st.recursive(
            st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats()
            | st.text(max_size=8) | st.sampled_from(["lines", "chunks", "30", "0", "-1"]),
            lambda children: st.lists(children, max_size=3)
            | st.dictionaries(st.text(max_size=4), children, max_size=3),
            max_leaves=6)))
    def test_any_execute_params_give_spec_or_invalid_params(self, params):
        # Integers are bounded here; the unbounded case has its own test.
        try:
            spec = parse_execute(execute_request(**params))
        except ProtocolError as error:
            assert error.code == -32602
            assert isinstance(error.data["param"], str)
            assert f"'{error.data['param']}'" in error.message
        else:
            assert (spec.command is None) != (spec.argv is None)
            assert spec.stream_mode in ("lines", "chunks")
            for value in (spec.timeout, spec.stall_timeout):
                assert value is None or (isinstance(value, float) and math.isfinite(value)
                                         and value >= 0)
            assert spec.timeout is None or spec.timeout > 0


# ========================================================== parse_control

JOB_ID_PARAMS = pytest.mark.parametrize("param", ["job_id", "after"])


class TestJobIdParams:
    """`job_id` (the client's id for its job) and `after` (the job to wait for)."""

    @JOB_ID_PARAMS
    def test_a_job_id_reaches_the_spec_and_not_the_job_itself(self, param):
        job_id = uuid.uuid4().hex
        spec = parse_execute(execute_request(command="x", **{param: job_id}))
        assert getattr(spec, param) == job_id
        assert param not in spec.to_dict()

    @JOB_ID_PARAMS
    def test_absent_or_null_is_none(self, param):
        assert getattr(parse_execute(execute_request(command="x")), param) is None
        assert getattr(parse_execute(execute_request(command="x", **{param: None})), param) is None

    @JOB_ID_PARAMS
    @pytest.mark.parametrize("value", ["", "abc", "A" * 32, "g" * 32, "0" * 33,
                                       "5f0c8e2a-3b1d-4c6e-9a7f-0d2e4b6c8a1f", 12, ["x"]])
    def test_one_that_is_not_32_lowercase_hex_digits_is_invalid_params(self, param, value):
        error = execute_error(command="x", **{param: value})
        assert error.code == p.INVALID_PARAMS and error.data == {"param": param}

    def test_a_job_cannot_wait_for_itself(self):
        job_id = uuid.uuid4().hex
        error = execute_error(command="x", job_id=job_id, after=job_id)
        assert error.code == p.INVALID_PARAMS and "itself" in str(error)

    def test_a_parallel_job_waits_for_none(self):
        error = execute_error(command="x", parallel=True, after=uuid.uuid4().hex)
        assert error.code == p.INVALID_PARAMS and "parallel" in str(error)


class TestLabels:
    def test_labels_reach_the_spec_and_the_broker(self):
        spec = parse_execute(execute_request(command="x", labels={"gpu": "a100", "site": "eu-1"}))
        assert spec.labels == {"gpu": "a100", "site": "eu-1"}
        assert spec.to_dict()["labels"] == {"gpu": "a100", "site": "eu-1"}

    def test_no_labels_leave_no_trace(self):
        assert "labels" not in parse_execute(execute_request(command="x", labels={})).to_dict()
        assert "labels" not in parse_execute(execute_request(command="x")).to_dict()

    @pytest.mark.parametrize("labels", [["gpu"], "gpu=a100", {"gpu": 1}, {"": "x"}, {"a b": "x"},
                                        {"gpu": ""}, {"x" * 65: "y"}, {f"k{i}": "v" for i in range(33)}])
    def test_bad_labels_are_invalid_params(self, labels):
        error = execute_error(command="x", labels=labels)
        assert error.code == p.INVALID_PARAMS and error.data["param"] == "labels"


class TestParseControl:
    @pytest.mark.parametrize("kind, action", [
        ("PAUSE", "PAUSE"), ("pause", "PAUSE"), ("Resume", "RESUME"), ("resume", "RESUME"),
        ("CANCEL", "CANCEL"), ("cAnCeL", "CANCEL"),
    ])
    def test_type_is_case_insensitive(self, kind, action):
        spec = parse_control(control_request(type=kind))
        assert spec == ControlSpec(action=action, job_id=None)

    def test_job_id_is_optional_and_kept(self):
        assert parse_control(control_request(type="cancel", job_id="j-1")).job_id == "j-1"
        assert parse_control(control_request(type="cancel")).job_id is None

    @pytest.mark.parametrize("params", [{}, {"type": None}, {"type": ""}, {"type": "STOP"},
                                        {"type": "PAUSED"}, {"type": 1}, {"type": ["PAUSE"]},
                                        {"type": " PAUSE"}])
    def test_invalid_type_is_invalid_params(self, params):
        with pytest.raises(ProtocolError) as info:
            parse_control(control_request(request_id=4, **params))
        assert info.value.code == -32602
        assert info.value.data == {"param": "type"}
        assert info.value.request_id == 4

    @pytest.mark.parametrize("job_id", [5, ["j"], {"id": "j"}, True])
    def test_non_string_job_id_is_invalid_params(self, job_id):
        with pytest.raises(ProtocolError) as info:
            parse_control(control_request(type="PAUSE", job_id=job_id))
        assert info.value.data == {"param": "job_id"}


class TestParseAttach:
    JOB = "a" * 32

    def attach(self, **params):
        return p.parse_attach(Request(method="attach", params={"job_id": self.JOB, **params}, id=3, has_id=True))

    def test_offsets_default_to_the_start_and_claude_offset_to_none(self):
        assert self.attach() == p.AttachSpec(self.JOB, 0, 0, "lines", None)
        assert self.attach(claude_offset=None).claude_offset is None

    def test_claude_offset_is_a_count_kept_as_given(self):
        assert self.attach(stdout_offset=10, claude_offset=0).claude_offset == 0
        assert self.attach(claude_offset=7) == p.AttachSpec(self.JOB, 0, 0, "lines", 7)

    @pytest.mark.parametrize("value", [-1, True, 1.5, "2", [1]])
    def test_a_bad_claude_offset_is_invalid_params(self, value):
        with pytest.raises(ProtocolError) as info:
            self.attach(claude_offset=value)
        assert (info.value.code, info.value.data, info.value.request_id) == (-32602, {"param": "claude_offset"}, 3)


# ======================================================= message builders

def output_text(job_id: str, stream: str, piece: Piece) -> str:
    """One `process.output` message, as the text a client receives."""
    return p.process_output_frames(job_id, stream, [piece])[0].decode()


class TestMessages:
    def test_output_gone_answers_a_request_or_ends_a_stream_with_id_null(self):
        answer = decoded(p.output_gone("j1", "the job's journal was removed", 7).to_message())
        assert answer == {"jsonrpc": "2.0", "id": 7, "error": {
            "code": -32006, "message": "Output no longer available: the job's journal was removed",
            "data": {"job_id": "j1"}}}
        assert decoded(p.output_gone("j1", "why").to_message())["id"] is None

    def test_process_output_has_exact_fields(self):
        piece = Piece(data="héllo\n", offset=10, size=7, truncated=True, chunk_index=2,
                      total_chunks=5)
        message = decoded(output_text("job-1", "stderr", piece))
        assert message == {"jsonrpc": "2.0", "method": "process.output", "params": {
            "type": "stderr", "data": "héllo\n", "truncated": True, "chunk_index": 2,
            "total_chunks": 5, "job_id": "job-1", "offset": 10, "size": 7,
        }}

    def test_process_output_of_a_plain_line_has_null_chunk_fields(self):
        message = decoded(output_text("j", "stdout", Piece("x\n", 0, 2)))
        params = message["params"]
        assert params["truncated"] is False
        assert params["chunk_index"] is None
        assert params["total_chunks"] is None
        assert "id" not in message

    @pytest.mark.parametrize("exit_code, status", [(0, "completed"), (1, "failed"),
                                                   (127, "failed"), (-9, "failed"),
                                                   (-15, "failed")])
    def test_process_completed_status_is_completed_only_for_exit_code_zero(self, exit_code,
                                                                             status):
        message = decoded(p.process_completed(
            "job-2", 123, 123, exit_code, "exit", None, 1.23456789, 10, 0))
        assert message == {"jsonrpc": "2.0", "method": "process.completed", "params": {
            "status": status, "pid": 123, "pgid": 123, "exit_code": exit_code, "error": None,
            "job_id": "job-2", "reason": "exit", "execution_time": round(1.23456789, 6),
            "stdout_bytes": 10, "stderr_bytes": 0,
        }}
        assert isinstance(message["params"]["execution_time"], float)

    def test_process_completed_for_rejected_job_has_null_pid_and_error_text(self):
        params = decoded(p.process_completed("j", None, None, 1, "rejected", "bad cwd",
                                             0.0, 0, 0))["params"]
        assert params["pid"] is None and params["pgid"] is None
        assert params["error"] == "bad cwd"
        assert params["reason"] == "rejected"
        assert params["status"] == "failed"

    def test_process_started_shape(self):
        message = decoded(p.process_state("started", "job-3", 4242, 4242))
        assert message == {"jsonrpc": "2.0", "method": "process.started", "params": {
            "status": "started", "pid": 4242, "pgid": 4242, "exit_code": None,
            "error": None, "job_id": "job-3",
        }}

    @pytest.mark.parametrize("status", ["paused", "resumed", "canceled"])
    def test_control_state_notifications_share_the_started_shape(self, status):
        message = decoded(p.process_state(status, "j", 1, 2))
        assert message["method"] == f"process.{status}"
        assert message["params"] == {"status": status, "pid": 1, "pgid": 2, "exit_code": None,
                                     "error": None, "job_id": "j"}

    def test_control_types_map_to_the_result_statuses(self):
        assert p.CONTROL_TYPES == {"PAUSE": "paused", "RESUME": "resumed", "CANCEL": "canceled"}

    def test_heartbeat_shape(self):
        message = decoded(p.heartbeat(1700000000.5, [("a", 1.23456), ("b", 0)]))
        assert message == {"jsonrpc": "2.0", "method": "heartbeat", "params": {
            "timestamp": 1700000000.5,
            "jobs": [{"job_id": "a", "silent_for": 1.235}, {"job_id": "b", "silent_for": 0}],
        }}

    def test_heartbeat_without_jobs_has_empty_list(self):
        assert decoded(p.heartbeat(1.0, []))["params"]["jobs"] == []

    def test_connected_shape(self):
        message = decoded(p.connected("0b1c8a52-6f43-4a5c-9b0e-3d1f1b2a9c77", "1.2.3"))
        assert message["method"] == "connected"
        assert "id" not in message
        params = message["params"]
        assert set(params) == {"session_id", "version", "capabilities"}
        assert params["session_id"] == "0b1c8a52-6f43-4a5c-9b0e-3d1f1b2a9c77"
        assert params["version"] == "1.2.3"
        assert {"execute", "control", "stream"} <= set(params["capabilities"])
        assert all(isinstance(c, str) for c in params["capabilities"])

    @pytest.mark.parametrize("request_id", [1, "abc", 0])
    def test_response_carries_result_and_id(self, request_id):
        result = p.execute_result("started", "job-4", 10, 10)
        message = decoded(p.response(request_id, result))
        assert message == {"jsonrpc": "2.0", "id": request_id, "result": {
            "status": "started", "pid": 10, "pgid": 10, "job_id": "job-4"}}

    def test_queued_execute_result_has_null_pid(self):
        assert p.execute_result("queued", "job-5") == {"status": "queued", "pid": None,
                                                       "pgid": None, "job_id": "job-5"}

    def test_response_with_none_id_has_explicit_null_id(self):
        message = decoded(p.response(None, {"pong": True}))
        assert "id" in message and message["id"] is None

    def test_error_response_shape_with_null_id(self):
        message = decoded(p.error_response(None, -32700, "Parse error"))
        assert message == {"jsonrpc": "2.0", "id": None,
                           "error": {"code": -32700, "message": "Parse error", "data": None}}

    def test_error_response_carries_id_and_data(self):
        message = decoded(p.error_response("x", -32005, "busy", {"retry_after": 2}))
        assert message == {"jsonrpc": "2.0", "id": "x",
                           "error": {"code": -32005, "message": "busy",
                                     "data": {"retry_after": 2}}}

    def test_protocol_error_to_message_uses_its_request_id(self):
        error = ProtocolError(-32002, "Job not found", {"job_id": "j"}, request_id=5)
        assert decoded(error.to_message()) == {
            "jsonrpc": "2.0", "id": 5,
            "error": {"code": -32002, "message": "Job not found", "data": {"job_id": "j"}}}
        assert str(error) == "Job not found"

    def test_error_codes_match_the_contract(self):
        assert (p.PARSE_ERROR, p.INVALID_REQUEST, p.METHOD_NOT_FOUND, p.INVALID_PARAMS,
                p.INTERNAL_ERROR, p.NOT_ALLOWED, p.JOB_NOT_FOUND, p.SESSION_LIMIT,
                p.SERVER_BUSY, p.OUTPUT_GONE) == (-32700, -32600, -32601, -32602, -32603,
                                                  -32001, -32002, -32003, -32005, -32006)
        assert p.CLOSE_POLICY_VIOLATION == 1008

    @pytest.mark.parametrize("text", ["\ud800", "a\udfffb", "\ud83d", "ok \U0001F600 \udc80"])
    @pytest.mark.parametrize("big_id", [False, True])
    def test_a_lone_surrogate_in_a_message_becomes_u_fffd_never_invalid_utf8(self, text, big_id):
        request_id = 2**70 if big_id else 1  # json, not orjson, then encodes the message
        for message in (p.notification("claude.event", {"session_id": text}),
                        p.response(request_id, {"record": {"name": text}}),
                        p.error_response(request_id, -32603, text)):
            message.encode("utf-8")  # what a WebSocket text frame needs
            assert text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace") in message

    def test_process_queued_shape(self):
        assert decoded(p.process_queued("j", 3))["params"] == {"job_id": "j", "position": 3}
        assert decoded(p.process_queued("j", 1, after="k"))["params"]["after"] == "k"

    def test_all_messages_carry_jsonrpc_and_notifications_have_no_id(self):
        notifications = [
            p.connected("s", "v"),
            p.process_state("started", "j", 1, 1),
            p.process_state("canceled", "j", 1, 1),
            p.process_queued("j", 1),
            output_text("j", "stdout", Piece("x", 0, 1)),
            p.process_completed("j", 1, 1, 0, "exit", None, 0.5, 1, 0),
            p.heartbeat(0.0, [("j", 0.0)]),
            p.notification("custom", {}),
        ]
        for text in notifications:
            message = decoded(text)
            assert message["jsonrpc"] == "2.0"
            assert "id" not in message
            assert isinstance(message["method"], str)
            assert isinstance(message["params"], dict)
        for text in (p.response(1, None), p.error_response(None, -32603, "x")):
            message = decoded(text)
            assert message["jsonrpc"] == "2.0"
            assert "id" in message

    @given(data=st.text(), offset=st.integers(0, 2**62), size=st.integers(0, 2**40), truncated=st.booleans(),
           chunk=st.one_of(st.none(), st.tuples(st.integers(0, 10**6), st.integers(1, 10**6))))
    @settings(max_examples=300)
    def test_output_frames_are_the_json_of_the_message(self, data, offset, size, truncated, chunk):
        # Surrogates cannot reach here: output is decoded with errors="replace".
        data = data.encode("utf-8", "replace").decode("utf-8")
        piece = Piece(data, offset, size, truncated, *(chunk or (None, None)))
        frames = p.process_output_frames("0" * 32, "stderr", [piece, piece])
        assert len(frames) == 2 and frames[0] == frames[1]
        assert json.loads(frames[0]) == {"jsonrpc": "2.0", "method": "process.output", "params": {
            "type": "stderr", "data": data, "truncated": truncated,
            "chunk_index": chunk and chunk[0], "total_chunks": chunk and chunk[1],
            "job_id": "0" * 32, "offset": offset, "size": size}}

    @pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 300_000])
    def test_websocket_text_frames_are_the_frames_websockets_writes(self, size):
        from websockets.frames import Frame, Opcode
        payloads = [b"a" * size, "é".encode() * 3]
        expected = b"".join(Frame(Opcode.TEXT, x).serialize(mask=False, extensions=[]) for x in payloads)
        assert p.websocket_text_frames(payloads) == expected

    def test_messages_are_single_line_json_text_with_unicode_kept(self):
        text = output_text("j", "stdout", Piece("€\n\u2028", 0, 7))
        assert "\n" not in text  # the newline inside data is escaped
        assert "€" in text
        assert decoded(text)["params"]["data"] == "€\n\u2028"


# ============================================== OutputSplitter: lines mode

class TestLinesMode:
    def test_one_piece_per_line_including_trailing_newline(self):
        pieces = run(OutputSplitter("lines"), [b"a\nbb\nccc\n"])
        assert [x.data for x in pieces] == ["a\n", "bb\n", "ccc\n"]
        assert [(x.offset, x.size) for x in pieces] == [(0, 2), (2, 3), (5, 4)]
        assert all(x.truncated is False and x.chunk_index is None and x.total_chunks is None
                   for x in pieces)

    def test_empty_lines_are_pieces_of_their_own(self):
        assert [x.data for x in run(OutputSplitter("lines"), [b"\n\na\n"])] == ["\n", "\n", "a\n"]

    def test_last_line_without_newline_is_only_emitted_on_finish(self):
        splitter = OutputSplitter("lines")
        assert [x.data for x in splitter.feed(b"a\nb")] == ["a\n"]
        assert splitter.feed(b"cd") == []
        tail = splitter.finish()
        assert [(x.data, x.offset, x.size) for x in tail] == [("bcd", 2, 3)]

    def test_line_split_across_feeds_is_one_piece(self):
        splitter = OutputSplitter("lines")
        assert splitter.feed(b"hel") == []
        assert [x.data for x in splitter.feed(b"lo\nwor")] == ["hello\n"]
        assert [x.data for x in splitter.feed(b"ld\n")] == ["world\n"]
        assert splitter.finish() == []

    def test_finish_on_empty_stream_emits_nothing(self):
        assert OutputSplitter("lines").finish() == []
        assert OutputSplitter("chunks").finish() == []

    def test_100000_char_line_fed_at_once_is_two_chunks(self):
        line = b"x" * 100_000 + b"\n"
        pieces = run(OutputSplitter("lines"), [line])
        assert [len(x.data) for x in pieces] == [65536, 34465]
        assert [x.chunk_index for x in pieces] == [0, 1]
        assert [x.truncated for x in pieces] == [True, False]
        assert [x.total_chunks for x in pieces] == [2, 2]
        assert [(x.offset, x.size) for x in pieces] == [(0, 65536), (65536, 34465)]
        assert "".join(x.data for x in pieces) == line.decode()
        assert pieces[-1].data.endswith("\n")

    def test_long_line_emits_first_chunk_before_its_newline_arrives(self):
        splitter = OutputSplitter("lines")
        first = splitter.feed(b"y" * 70_000)
        assert len(first) == 1
        assert first[0].chunk_index == 0 and first[0].truncated is True
        assert first[0].total_chunks is None  # not known yet
        rest = splitter.feed(b"y\n")
        assert [(x.chunk_index, x.truncated, len(x.data)) for x in rest] == [(1, False, 4466)]

    def test_long_line_fed_in_small_pieces_reassembles_with_chunk_index_sequence(self):
        line = (b"0123456789" * 20_000) + b"\n"  # 200,001 bytes
        pieces = run(OutputSplitter("lines"), in_pieces(line, 1000))
        assert "".join(x.data for x in pieces) == line.decode()
        assert [x.chunk_index for x in pieces] == list(range(len(pieces)))
        assert len(pieces) == 4
        assert [x.truncated for x in pieces] == [True, True, True, False]
        assert all(len(x.data) <= CHUNK_CHARS for x in pieces)
        assert all(x.total_chunks in (None, 4) for x in pieces)
        assert_contiguous(pieces, line)

    def test_line_after_a_long_line_is_a_plain_piece_again(self):
        data = b"z" * 70_000 + b"\nshort\n"
        pieces = run(OutputSplitter("lines"), [data])
        assert pieces[-1].data == "short\n"
        assert pieces[-1].chunk_index is None and pieces[-1].total_chunks is None
        assert pieces[-1].truncated is False

    def test_line_of_65535_chars_plus_newline_is_one_piece(self):
        pieces = run(OutputSplitter("lines"), [b"a" * 65535 + b"\n"])
        assert len(pieces) == 1
        assert len(pieces[0].data) == 65536
        assert pieces[0].chunk_index is None

    def test_line_of_exactly_65536_chars_plus_newline_is_chunked(self):
        line = b"a" * 65536 + b"\n"
        pieces = run(OutputSplitter("lines"), [line])
        assert [(len(x.data), x.truncated, x.chunk_index, x.total_chunks) for x in pieces] == [
            (65536, True, 0, 2), (1, False, 1, 2)]
        assert pieces[1].data == "\n"
        assert_contiguous(pieces, line)

    def test_line_of_exactly_65536_chars_plus_newline_fed_bytewise_at_the_end(self):
        splitter = OutputSplitter("lines")
        pieces = splitter.feed(b"a" * 65536)
        assert pieces == []  # could still be a line of exactly the limit
        pieces += splitter.feed(b"\n") + splitter.finish()
        assert [(len(x.data), x.truncated, x.chunk_index) for x in pieces] == [
            (65536, True, 0), (1, False, 1)]

    def test_last_line_of_exactly_65536_chars_without_newline_is_one_piece(self):
        pieces = run(OutputSplitter("lines"), [b"b" * 65536])
        assert len(pieces) == 1
        assert pieces[0].chunk_index is None and pieces[0].size == 65536

    def test_last_line_longer_than_limit_without_newline_is_chunked_on_finish(self):
        data = b"c" * 65537
        pieces = run(OutputSplitter("lines"), [data])
        assert [(len(x.data), x.truncated, x.chunk_index) for x in pieces] == [
            (65536, True, 0), (1, False, 1)]
        assert_contiguous(pieces, data)

    @pytest.mark.parametrize("char", ["é", "€", "😀"])
    @pytest.mark.parametrize("prefix", [0, 1, 2, 3])
    def test_multibyte_characters_are_never_split_and_sizes_are_exact(self, char, prefix):
        text = "a" * prefix + char * (70_000) + "\n"  # > 65,536 characters
        raw = text.encode()
        pieces = run(OutputSplitter("lines"), [raw])
        assert len(pieces) >= 2
        assert "".join(x.data for x in pieces) == text
        assert "\ufffd" not in "".join(x.data for x in pieces)
        assert all(len(x.data) <= CHUNK_CHARS for x in pieces)
        assert [x.chunk_index for x in pieces] == list(range(len(pieces)))
        offset = 0
        for piece in pieces:
            assert piece.offset == offset
            assert piece.data.encode() == raw[offset:offset + piece.size]
            offset += piece.size
        assert offset == len(raw)

    @pytest.mark.parametrize("char", ["é", "€", "😀"])
    def test_multibyte_line_fed_bytewise_is_never_split(self, char):
        text = "x" + char * 40_000 + "\n" + char + "\n"
        raw = text.encode()
        pieces = run(OutputSplitter("lines"), in_pieces(raw, 7))
        assert "".join(x.data for x in pieces) == text
        assert "\ufffd" not in "".join(x.data for x in pieces)
        assert pieces[-1].data == char + "\n" and pieces[-1].size == len((char + "\n").encode())
        assert_contiguous(pieces, raw)

    def test_multibyte_line_of_fewer_than_65536_characters_is_one_piece(self):
        text = "é" * 40_000 + "\n"  # 40,001 characters, 80,001 bytes
        pieces = run(OutputSplitter("lines"), [text.encode()])
        assert [x.data for x in pieces] == [text]
        assert pieces[0].chunk_index is None and pieces[0].truncated is False

    def test_invalid_utf8_becomes_replacement_character_but_size_counts_raw_bytes(self):
        raw = b"ab\xff\xfecd\n\xc3(\n"
        pieces = run(OutputSplitter("lines"), [raw])
        assert [(x.data, x.size) for x in pieces] == [("ab\ufffd\ufffdcd\n", 7),
                                                      ("\ufffd(\n", 3)]
        assert [x.offset for x in pieces] == [0, 7]

    def test_truncated_utf8_at_end_of_stream_is_flushed_on_finish(self):
        raw = b"ok\n\xe2\x82"
        pieces = run(OutputSplitter("lines"), [raw])
        assert [x.data for x in pieces] == ["ok\n", "\ufffd"]
        assert pieces[-1].size == 2
        assert_contiguous(pieces, raw)

    def test_non_zero_start_offset(self):
        splitter = OutputSplitter("lines", offset=1000)
        pieces = run(splitter, [b"one\ntwo\nthr", b"ee"])
        assert [(x.data, x.offset, x.size) for x in pieces] == [
            ("one\n", 1000, 4), ("two\n", 1004, 4), ("three", 1008, 5)]
        assert splitter.offset == 1013

    def test_non_zero_start_offset_with_long_line(self):
        raw = b"q" * 70_000 + b"\n"
        pieces = run(OutputSplitter("lines", offset=5_000_000_000), [raw])
        assert [x.offset for x in pieces] == [5_000_000_000, 5_000_065_536]
        assert_contiguous(pieces, raw, start=5_000_000_000)


# ============================================= OutputSplitter: chunks mode

class TestChunksMode:
    def test_partial_last_line_is_held_until_flush(self):
        splitter = OutputSplitter("chunks")
        assert splitter.feed(b"hello") == []
        assert splitter.holding is True
        flushed = splitter.flush()
        assert [(x.data, x.offset, x.size) for x in flushed] == [("hello", 0, 5)]
        assert splitter.holding is False
        assert splitter.finish() == []

    def test_flush_sends_partial_tail_without_waiting_for_newline(self):
        splitter = OutputSplitter("chunks")
        assert [x.data for x in splitter.feed(b"a\nb\npart")] == ["a\nb\n"]
        assert [(x.data, x.offset, x.size) for x in splitter.flush()] == [("part", 4, 4)]
        assert [(x.data, x.offset) for x in splitter.feed(b"ial\nnext")] == [("ial\n", 8)]
        assert [(x.data, x.offset) for x in splitter.finish()] == [("next", 12)]

    def test_flush_with_nothing_held_emits_nothing(self):
        splitter = OutputSplitter("chunks")
        assert splitter.holding is False
        assert splitter.flush() == []
        splitter.feed(b"line\n")
        assert splitter.holding is False
        assert splitter.flush() == []

    def test_complete_lines_are_sent_as_one_piece(self):
        pieces = OutputSplitter("chunks").feed(b"a\nb\nc\n")
        assert [x.data for x in pieces] == ["a\nb\nc\n"]
        assert pieces[0].truncated is False and pieces[0].chunk_index is None

    def test_partial_last_line_is_sent_on_finish(self):
        pieces = run(OutputSplitter("chunks"), [b"a\nb\nc"])
        assert [x.data for x in pieces] == ["a\nb\n", "c"]

    def test_pieces_are_at_most_65536_bytes_without_newlines(self):
        raw = b"x" * 150_000
        splitter = OutputSplitter("chunks")
        assert [x.size for x in splitter.feed(raw)] == [65536, 65536]
        assert [x.size for x in splitter.finish()] == [18928]

    def test_cut_at_last_newline_within_window(self):
        raw = bytearray(b"x" * 100_000)
        for position in (10_000, 40_000, 70_000):
            raw[position] = ord("\n")
        raw = bytes(raw)
        pieces = run(OutputSplitter("chunks"), [raw])
        assert pieces[0].size == 40_001
        assert pieces[0].data.endswith("\n")
        assert all(x.size <= 65536 for x in pieces)
        assert_contiguous(pieces, raw)

    def test_newline_at_last_byte_of_window_makes_a_full_piece(self):
        raw = b"x" * 65535 + b"\n" + b"y" * 100
        pieces = run(OutputSplitter("chunks"), [raw])
        assert [x.size for x in pieces] == [65536, 100]
        assert pieces[0].data.endswith("\n")

    def test_newline_just_past_window_is_not_used(self):
        raw = b"x" * 65536 + b"\n" + b"y" * 100
        pieces = run(OutputSplitter("chunks"), [raw])
        assert pieces[0].size == 65536 and "\n" not in pieces[0].data
        assert all(x.size <= 65536 for x in pieces)
        assert_contiguous(pieces, raw)

    def test_flush_holds_back_incomplete_trailing_utf8_until_more_data(self):
        splitter = OutputSplitter("chunks")
        assert splitter.feed(b"abc\xe2\x82") == []
        assert [(x.data, x.size) for x in splitter.flush()] == [("abc", 3)]
        assert splitter.flush() == []  # only the incomplete character is left
        assert splitter.feed(b"\xac") == []
        assert [(x.data, x.offset, x.size) for x in splitter.flush()] == [("€", 3, 3)]
        assert splitter.finish() == []

    def test_incomplete_trailing_utf8_is_flushed_on_finish(self):
        splitter = OutputSplitter("chunks")
        splitter.feed(b"abc\xe2\x82")
        assert [x.data for x in splitter.flush()] == ["abc"]
        tail = splitter.finish()
        assert [(x.data, x.offset, x.size) for x in tail] == [("\ufffd", 3, 2)]

    def test_four_byte_character_fed_one_byte_at_a_time(self):
        splitter = OutputSplitter("chunks")
        raw = "😀".encode()
        for byte in range(3):
            assert splitter.feed(raw[byte:byte + 1]) == []
            assert splitter.flush() == []
        assert splitter.feed(raw[3:]) == []
        assert [(x.data, x.size) for x in splitter.flush()] == [("😀", 4)]

    def test_byte_that_cannot_start_a_sequence_is_not_held_by_flush(self):
        splitter = OutputSplitter("chunks")
        splitter.feed(b"ab\xff")
        assert [(x.data, x.size) for x in splitter.flush()] == [("ab\ufffd", 3)]

    @pytest.mark.parametrize("char", ["é", "€", "😀"])
    def test_multibyte_characters_are_never_split_across_pieces(self, char):
        text = "a" + char * 60_000
        raw = text.encode()
        pieces = run(OutputSplitter("chunks"), [raw])
        assert len(pieces) >= 2
        assert all(x.size <= 65536 for x in pieces)
        for piece in pieces:
            assert piece.data.encode() == raw[piece.offset:piece.offset + piece.size]
        assert "".join(x.data for x in pieces) == text

    def test_non_zero_start_offset(self):
        splitter = OutputSplitter("chunks", offset=77)
        pieces = splitter.feed(b"abc") + splitter.flush() + splitter.feed(b"def\n")
        assert [(x.offset, x.size) for x in pieces] == [(77, 3), (80, 4)]


# ===================================== OutputSplitter: property-based tests

@st.composite
def text_and_cuts(draw, max_size=120):
    text = draw(st.text(max_size=max_size))
    raw = text.encode()
    cuts = draw(st.lists(st.integers(0, len(raw)), max_size=12))
    return text, raw, cuts


@st.composite
def bytes_and_cuts(draw, max_size=120):
    raw = draw(st.binary(max_size=max_size))
    cuts = draw(st.lists(st.integers(0, len(raw)), max_size=12))
    return raw, cuts


@st.composite
def big_text_and_cuts(draw):
    unit = draw(st.text(min_size=1, max_size=6))
    newline_every = draw(st.sampled_from([None, 5_000, 20_000, 70_000]))
    repeat = 200_000 // len(unit) + 1
    text = unit * repeat
    if newline_every:
        text = "\n".join(text[i:i + newline_every] for i in range(0, len(text), newline_every))
    text = text[:draw(st.integers(60_000, len(text)))]
    raw = text.encode()
    cuts = draw(st.lists(st.integers(0, len(raw)), max_size=8))
    return text, raw, cuts


LIMITS = st.integers(4, 40)
MODES = st.sampled_from(["lines", "chunks"])


class TestSplitterProperties:
    @PROPERTY_BIG
    @given(st.lists(st.integers(0, 90_000), min_size=1, max_size=12), st.booleans(), MODES)
    def test_feeding_in_parts_gives_the_pieces_feeding_at_once_gives(self, lengths, ends_with_newline, mode):
        raw = b"".join(b"x" * n + b"\n" for n in lengths)[:None if ends_with_newline else -1]
        whole, parted = OutputSplitter(mode), OutputSplitter(mode)
        expected = whole.feed(raw) + whole.finish()
        assert [x for part in parted.feed_in_parts(raw) for x in part] + parted.finish() == expected

    def test_lines_mode_feeds_a_big_read_in_parts_of_whole_lines(self):
        raw = b"".join(b"%076d\n" % i for i in range(3400))  # 256 KiB of 77-byte lines
        parts = list(OutputSplitter("lines").feed_in_parts(raw))
        assert len(parts) == math.ceil(len(raw) / (p.FEED_PART + 77)) and all(parts)
        assert [x.data for part in parts for x in part] == raw.decode().splitlines(keepends=True)
        assert len(list(OutputSplitter("chunks").feed_in_parts(raw))) == 1

    @PROPERTY
    @given(text_and_cuts(), MODES, LIMITS, st.integers(0, 10**12))
    def test_valid_utf8_reassembles_exactly_with_small_limit(self, sample, mode, limit, start):
        text, raw, cuts = sample
        pieces = run(OutputSplitter(mode, offset=start, limit=limit), split_at(raw, cuts))
        assert "".join(x.data for x in pieces) == raw.decode("utf-8", errors="replace") == text
        assert_contiguous(pieces, raw, start)
        for piece in pieces:
            # never a split character: every piece is its own exact UTF-8 bytes
            chunk = raw[piece.offset - start:piece.offset - start + piece.size]
            assert piece.data.encode() == chunk
            assert len(piece.data) <= max(limit, 1)
            if mode == "chunks":
                assert piece.size <= limit

    @PROPERTY_BIG
    @given(big_text_and_cuts(), MODES)
    def test_valid_utf8_reassembles_exactly_with_default_limit(self, sample, mode):
        text, raw, cuts = sample
        pieces = run(OutputSplitter(mode), split_at(raw, cuts))
        assert "".join(x.data for x in pieces) == text
        assert_contiguous(pieces, raw)
        assert all(len(x.data) <= CHUNK_CHARS for x in pieces)
        if mode == "chunks":
            assert all(x.size <= CHUNK_CHARS for x in pieces)

    @PROPERTY
    @given(bytes_and_cuts(), MODES, LIMITS)
    def test_arbitrary_bytes_keep_offsets_contiguous_with_small_limit(self, sample, mode, limit):
        raw, cuts = sample
        pieces = run(OutputSplitter(mode, limit=limit), split_at(raw, cuts))
        assert_contiguous(pieces, raw)
        assert sum(x.size for x in pieces) == len(raw)
        assert all(len(x.data) <= limit for x in pieces)
        if mode == "chunks":
            assert all(x.size <= limit for x in pieces)
        else:
            for piece in pieces:  # a newline byte only ever ends a lines-mode piece
                assert b"\n" not in raw[piece.offset:piece.offset + piece.size - 1]

    @PROPERTY_BIG
    @given(st.binary(min_size=1, max_size=64), st.integers(1_000, 3_000),
           st.lists(st.integers(0, 200_000), max_size=8), MODES)
    def test_arbitrary_bytes_keep_offsets_contiguous_with_default_limit(self, unit, repeat,
                                                                        cuts, mode):
        raw = unit * repeat * 2
        pieces = run(OutputSplitter(mode), split_at(raw, cuts))
        assert_contiguous(pieces, raw)
        assert sum(x.size for x in pieces) == len(raw)
        assert all(len(x.data) <= CHUNK_CHARS for x in pieces)
        if mode == "chunks":
            assert all(x.size <= CHUNK_CHARS for x in pieces)

    @PROPERTY
    @given(text_and_cuts(), LIMITS)
    def test_lines_mode_pieces_group_into_the_lines_of_the_stream(self, sample, limit):
        text, raw, cuts = sample
        pieces = run(OutputSplitter("lines", limit=limit), split_at(raw, cuts))
        groups = group_lines(pieces)
        lines = lines_of(text)
        assert ["".join(x.data for x in group) for group in groups] == lines
        for group, line in zip(groups, lines):
            if len(group) == 1 and group[0].chunk_index is None:
                assert group[0].truncated is False and group[0].total_chunks is None
                assert len(line) <= limit  # a whole line in one piece fits the limit
                continue
            assert len(line.encode()) > limit  # only over-long lines are chunked
            assert len(group) >= 2
            assert [x.chunk_index for x in group] == list(range(len(group)))
            assert [x.truncated for x in group] == [True] * (len(group) - 1) + [False]
            assert all(x.total_chunks in (None, len(group)) for x in group)
            assert group[-1].total_chunks == len(group)  # known by the last chunk at the latest
        for line, group in zip(lines, groups):
            if len(line) > limit:  # longer than the limit in characters: must be chunked
                assert len(group) >= 2

    @PROPERTY
    @given(st.text(max_size=120), LIMITS)
    def test_lines_mode_total_chunks_is_exact_when_the_line_is_fed_at_once(self, text, limit):
        raw = text.encode()
        groups = group_lines(run(OutputSplitter("lines", limit=limit), [raw]))
        for group in groups:
            if len(group) > 1 and group[-1].data.endswith("\n"):
                assert [x.total_chunks for x in group] == [len(group)] * len(group)

    @PROPERTY
    @given(st.text(alphabet=st.sampled_from("ab\n"), max_size=200), LIMITS)
    def test_chunks_mode_cuts_at_last_newline_in_window(self, text, limit):
        raw = text.encode()
        pieces = run(OutputSplitter("chunks", limit=limit), [raw])
        assert_contiguous(pieces, raw)
        for piece in pieces[:-1]:  # all but the final tail were cut from a full window
            window = raw[piece.offset:piece.offset + limit]
            if b"\n" in window:
                assert piece.size == window.rfind(b"\n") + 1
            else:
                assert piece.size == limit

    @PROPERTY
    @given(text_and_cuts(), LIMITS, st.sets(st.integers(0, 12)))
    def test_chunks_mode_flush_never_splits_a_character(self, sample, limit, flush_after):
        text, raw, cuts = sample
        splitter = OutputSplitter("chunks", limit=limit)
        pieces = run_flushing(splitter, split_at(raw, cuts), flush_after)
        assert "".join(x.data for x in pieces) == text
        assert_contiguous(pieces, raw)
        for piece in pieces:
            assert piece.data.encode() == raw[piece.offset:piece.offset + piece.size]
            assert piece.size <= limit
        assert splitter.holding is False

    @PROPERTY
    @given(bytes_and_cuts(), LIMITS, st.sets(st.integers(0, 12)))
    def test_chunks_mode_flush_keeps_arbitrary_bytes_contiguous(self, sample, limit, flush_after):
        raw, cuts = sample
        pieces = run_flushing(OutputSplitter("chunks", limit=limit), split_at(raw, cuts),
                              flush_after)
        assert_contiguous(pieces, raw)
        assert all(x.size <= limit for x in pieces)
