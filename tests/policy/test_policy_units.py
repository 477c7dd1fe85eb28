"""The pure policy modules without sockets: Cedar text, the model, layering, list filtering, limits."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outrider.sidecar.inbound import jsonrpc
from outrider.sidecar.inbound.jsonrpc import McpMessage, parse_message
from outrider.sidecar.policy import answers
from outrider.sidecar.policy.cedar_text import CedarError, compile_policies
from outrider.sidecar.policy.config import MAX_ARGUMENT_VALUES, LayerSource, PolicyConfig
from outrider.sidecar.policy.engine import Decision, build, compile_layers, decide, may_use
from outrider.sidecar.policy.limits_config import RateLimits, budgets, user_key
from outrider.sidecar.policy.model import Server, cedar_string, cedar_value, more_values_than, request_for
from outrider.sidecar.policy.reload import parse_file
from outrider.sidecar.policy.schema import ServerTools, mismatches
from outrider.sidecar.telemetry.observer import Principal

SERVER = Server.from_facts("spiffe://example.org/ns/tools/sa/issues", None, "pod-1")
ALICE = Principal("oidc", "alice", "https://idp")
BOB = Principal("oidc", "bob", "https://idp", groups=("admins",))
CEILING = """
@id("echo") permit(principal, action == Action::"call_tool", resource == Tool::"echo");
@id("admins") permit(principal in Group::"admins", action, resource);
@id("lists") permit(principal, action == Action::"list_tools", resource);
"""


def tool_call(name: str, **arguments: Any) -> McpMessage:
    return parse_message(
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": name, "arguments": arguments}}
    )


def policies(*layers: tuple[str, bool]) -> Any:
    compiled, errors = compile_layers(LayerSource(f"layer{i}", t, n) for i, (t, n) in enumerate(layers))
    assert errors == []
    return build(compiled)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("permit(principal, action, resource);\npermit(principal action, resource);", "line 2, column 18"),
        (
            "permit(principal, action, resource);\n\n  frobid(principal, action, resource);",
            "line 3, column 3",
        ),
        ('forbid(principal, action, resource) when { context.x == "a };', "line 1, column 57"),
        ("permit(principal, action, resource);\npermit(principal, action, reso", "line 2"),
    ],
)
def test_syntax_errors_name_line_and_column(text: str, where: str) -> None:
    with pytest.raises(CedarError, match=where):
        compile_policies(text, "test")


def test_forbid_only_refuses_a_permit_and_names_it() -> None:
    text = 'forbid(principal, action, resource);\n\n@id("sneaky")\npermit(principal, action, resource);'
    with pytest.raises(CedarError, match=r"line 3, column 1: policy 'sneaky' is a `permit`"):
        compile_policies(text, "annotation", forbid_only=True)
    assert len(compile_policies(text, "operator")) == 2


def test_duplicate_ids_and_templates_are_refused() -> None:
    with pytest.raises(CedarError, match="share @id"):
        compile_policies(
            '@id("a") permit(principal, action, resource);\n@id("a") forbid(principal, action, resource);',
            "t",
        )
    with pytest.raises(CedarError, match="templates"):
        compile_policies("permit(principal == ?principal, action, resource);", "t")


def test_no_policy_allows_everything() -> None:
    empty = build([])
    assert not empty.enabled
    assert decide(empty, ALICE, SERVER, [tool_call("delete")], "streamable-http")[0].allowed


def test_ceiling_groups_and_determining_ids() -> None:
    p = policies((CEILING, False))
    echo, delete = decide(p, ALICE, SERVER, [tool_call("echo"), tool_call("delete")], "stateless")
    assert echo.allowed and echo.policies == ("echo",)
    assert not delete.allowed and delete.policies == () and "permits" in delete.reason
    assert decide(p, BOB, SERVER, [tool_call("delete")], "stateless")[0].policies == ("admins",)


def test_narrowing_can_only_narrow() -> None:
    narrowing = '@id("no-echo") forbid(principal == User::"alice", action, resource == Tool::"echo");'
    p = policies((CEILING, False), (narrowing, True))
    denied = decide(p, ALICE, SERVER, [tool_call("echo")], "stateless")[0]
    assert not denied.allowed and denied.policies == ("no-echo",)
    assert decide(p, BOB, SERVER, [tool_call("echo")], "stateless")[0].allowed
    # A narrowing alone (no operator policy): everything else stays allowed (today's behaviour).
    alone = policies((narrowing, True))
    assert not decide(alone, ALICE, SERVER, [tool_call("echo")], "s")[0].allowed
    assert decide(alone, ALICE, SERVER, [tool_call("delete")], "s")[0].allowed


def test_two_ceilings_intersect() -> None:
    p = policies((CEILING, False), ('permit(principal, action, resource == Tool::"delete");', False))
    # echo: first ceiling yes, second no. delete for bob: both yes.
    assert not decide(p, ALICE, SERVER, [tool_call("echo")], "s")[0].allowed
    assert decide(p, BOB, SERVER, [tool_call("delete")], "s")[0].allowed


def test_argument_conditions_and_reserved_keys() -> None:
    forbid = """forbid(principal, action == Action::"call_tool", resource == Tool::"fetch")
      unless { context.arguments has url && context.arguments.url like "https://api.example.com/*" };"""
    p = policies(("permit(principal, action, resource);", False), (forbid, True))
    ok = tool_call("fetch", url="https://api.example.com/x")
    bad = tool_call("fetch", url="http://169.254.169.254/")
    smuggled = tool_call("fetch", url={"__entity": {"type": "Tool", "id": "x"}})
    # A wrong type makes the forbid fail to evaluate: that denies (Cedar alone would skip the forbid).
    wrong_type = tool_call("fetch", url=42)
    decisions = decide(p, ALICE, SERVER, [ok, bad, smuggled, wrong_type], "s")
    assert [d.allowed for d in decisions] == [True, False, False, False]
    assert decisions[3].reason == "a forbid policy could not be evaluated"
    assert cedar_value({"__extn": {"fn": "ip", "arg": "1.2.3.4"}, "n": 2**70, "f": 1.5, "z": None}) == {
        "n": str(2**70),
        "f": "1.5",
    }


def test_request_model() -> None:
    request, resource = request_for(tool_call("echo", text="x"), BOB, SERVER, "stateless")
    assert request["principal"] == {"type": "User", "id": "bob"}
    assert request["action"] == {"type": "Action", "id": "call_tool"}
    assert resource == {"uid": {"type": "Tool", "id": "echo"}, "attrs": {}, "parents": [SERVER.uid]}
    assert request["context"]["arguments"] == {"text": "x"}
    listing, none = request_for(
        parse_message({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}), ALICE, SERVER, "s"
    )
    assert listing["resource"] == SERVER.uid and none is None
    assert SERVER.service_account == "issues" and SERVER.namespace == "tools"
    assert cedar_string('a"b\\c\n') == '"a\\"b\\\\c\\n"'


def test_a_caller_cedar_cannot_name_sees_no_listed_item() -> None:
    """A subject with a lone surrogate cannot be written as a Cedar UID: all of its calls are refused,
    so may_use hides every item (even under a policy that permits everyone everything)."""
    p = policies((CEILING, False))
    assert may_use(p, BOB, SERVER, "tools", ["echo", "fetch"]) == [True, True]
    caller = Principal("oidc", "x\ud800", "https://idp")
    assert may_use(p, caller, SERVER, "tools", ["echo", "fetch"]) == [False, False]
    assert may_use(p, caller, SERVER, "prompts", ["greet"]) == [False]


def test_list_filtering_uses_partial_evaluation() -> None:
    conditional = (
        'permit(principal, action == Action::"call_tool", resource == Tool::"fetch")'
        ' when { context.arguments.url like "https://*" };'
    )
    p = policies((CEILING + conditional, False))
    # fetch stays visible: some arguments would be allowed; delete is hidden for alice only.
    assert may_use(p, ALICE, SERVER, "tools", ["echo", "fetch", "delete"]) == [True, True, False]
    assert may_use(p, BOB, SERVER, "tools", ["echo", "fetch", "delete"]) == [True, True, True]
    answer = {
        "jsonrpc": "2.0",
        "id": 1,
        "result": {"tools": [{"name": "echo"}, {"name": "delete"}, {"x": 1}]},
    }
    filtered, removed = answers.filter_list_result(answer, lambda k, n: may_use(p, ALICE, SERVER, k, n))
    assert filtered["result"]["tools"] == [{"name": "echo"}] and removed == 2


def test_resource_templates_are_judged_as_reading_their_template_text() -> None:
    reader = (
        '@id("docs") permit(principal, action == Action::"read_resource", resource)'
        ' when { resource == Resource::"file:///docs/{path}" };'
    )
    p = policies((CEILING + reader, False))
    answer = {
        "jsonrpc": "2.0",
        "id": 1,
        "result": {
            "resourceTemplates": [
                {"uriTemplate": "file:///docs/{path}"},
                {"uriTemplate": "file:///etc/{path}"},
            ]
        },
    }
    payload = json.dumps(answer).encode()
    assert answers.may_hold_list(payload)
    filtered, removed = answers.filter_list_result(answer, lambda k, n: may_use(p, ALICE, SERVER, k, n))
    assert (
        filtered["result"]["resourceTemplates"] == [{"uriTemplate": "file:///docs/{path}"}] and removed == 1
    )
    assert may_use(p, BOB, SERVER, "resourceTemplates", ["file:///etc/{path}"]) == [True]


def test_schema_mismatches() -> None:
    compiled = compile_policies(
        '@id("a") forbid(principal, action, resource == Tool::"delet");\n'
        '@id("b") forbid(principal, action, resource == Tool::"echo") when { context.arguments has txt };\n'
        '@id("c") forbid(principal, action, resource == Tool::"echo") when { context.arguments has text };',
        "op",
    )
    tools = ServerTools.from_list_result(
        {"tools": [{"name": "echo", "inputSchema": {"properties": {"text": {}}}}, {"name": "fetch"}]}
    )
    assert tools is not None
    problems = mismatches([compiled], tools)
    assert (
        len(problems) == 2
        and "'a' names tool 'delet'" in problems[0]
        and "'b' tests argument 'txt'" in problems[1]
    )


def test_rate_limit_layers_and_budgets() -> None:
    spec = RateLimits.from_mapping({"per_user": "100/minute", "per_tool": {"fetch": "10/minute"}}, "spec")
    narrowed = spec.narrowed(
        RateLimits.from_mapping({"per_user_tool": "5/minute", "per_tool": "50/minute"}, "file")
    )
    spent = budgets(narrowed, tool_call("fetch"), "alice", "pod")
    assert [b.scope for b in spent] == ["per_pod"] * 0 + ["per_tool", "per_tool", "per_user", "per_user_tool"]
    assert (
        budgets(narrowed, parse_message({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}), "a", "p") == ()
    )
    # No part of a key holds '/' (what `limits` joins them with) and the user's parts cannot blur.
    user = user_key("oidc", "https://a:1", "x/y")
    assert user != user_key("oidc", "https://a", "1:x/y") and user == "oidc:https%3A%2F%2Fa%3A1:x%2Fy"
    assert user_key("spiffe", None, "spiffe://td/w") == "spiffe::spiffe%3A%2F%2Ftd%2Fw"
    crafted = budgets(narrowed, tool_call("y/z"), user, "spiffe://td/ns/a/sa/b")
    assert [b.key for b in crafted] == [
        ("tool", "spiffe%3A%2F%2Ftd%2Fns%2Fa%2Fsa%2Fb", "y%2Fz", "%2A"),
        ("user", "spiffe%3A%2F%2Ftd%2Fns%2Fa%2Fsa%2Fb", user),
        ("user_tool", "spiffe%3A%2F%2Ftd%2Fns%2Fa%2Fsa%2Fb", user, "y%2Fz"),
    ]
    with pytest.raises(ValueError, match="not a rate"):
        RateLimits.from_mapping({"per_user": "ten a minute"}, "x")
    with pytest.raises(ValueError, match="unknown key"):
        RateLimits.from_mapping({"per_usr": "1/second"}, "x")


def test_config_and_file_errors_are_clear() -> None:
    from outrider.sidecar.config import ConfigError

    with pytest.raises(ConfigError, match="on_store_error"):
        PolicyConfig.from_mapping({"on_store_error": "maybe"})
    with pytest.raises(ConfigError, match="storage"):
        PolicyConfig.from_mapping({"storage": "redis"})
    with pytest.raises(ValueError, match="may hold `forbid` policies only"):
        parse_file("cedar: 'permit(principal, action, resource);'", "f")
    with pytest.raises(ValueError, match="line 1, column"):
        parse_file("cedar: [unclosed", "f")
    assert parse_file("", "f").policies is None


def test_sse_framer_and_rewrite() -> None:
    framer = jsonrpc.SseFramer(max_event_bytes=64)
    assert framer.feed(b"event: message\r\ndata: {}\r") == []
    assert framer.feed(b"\n\r\nid: 1\n") == [b"event: message\r\ndata: {}\r\n\r\n"]
    assert framer.feed(b"data: x\n\n") == [b"id: 1\ndata: x\n\n"]
    with pytest.raises(jsonrpc.SseTooLarge):
        framer.feed(b"data: " + b"x" * 100)
    raw = b'id: 7\nevent: message\ndata: {"a":\ndata: 1}\n\n'
    out = jsonrpc.rewrite_event(raw, lambda data: json.dumps(json.loads(data) | {"b": 2}))
    assert out == b'id: 7\nevent: message\ndata: {"a": 1, "b": 2}\n\n'
    assert (
        jsonrpc.rewrite_event(b"event: endpoint\ndata: /m\n\n", lambda d: "x")
        == b"event: endpoint\ndata: /m\n\n"
    )


def test_schema_validation_of_layers_and_typed_arguments() -> None:
    from outrider.sidecar.policy.schema import base_schema, validate

    compiled = compile_policies(
        '@id("typo-action") permit(principal, action == Action::"cal_tool", resource);\n'
        '@id("bad-attr") permit(principal, action, resource) when { principal.subb == "x" };\n'
        '@id("fine") forbid(principal, action, resource)'
        ' when { context.arguments has url && context.arguments.url like "x*" };',
        "op",
    )
    problems = validate([compiled], base_schema())
    assert any("'typo-action'" in p and "cal_tool" in p for p in problems)
    assert any("'bad-attr'" in p and "subb" in p for p in problems)
    assert not any("'fine'" in p for p in problems)
    tools = ServerTools.from_list_result(
        {"tools": [{"name": "fetch", "inputSchema": {"properties": {"url": {"type": "string"}}}}]}
    )
    assert tools is not None and '"url"?: String' in tools.schema()
    typed = compile_policies(
        '@id("wrong-type") forbid(principal, action, resource)'
        " when { context.arguments has url && context.arguments.url > 3 };",
        "op",
    )
    assert any("'wrong-type'" in p for p in validate([typed], tools.schema()))


def test_admission_refuses_annotations_that_do_not_fit_the_schema() -> None:
    from outrider.webhook.annotations import AnnotationError, parse_policy

    with pytest.raises(AnnotationError, match="subb"):
        parse_policy('forbid(principal, action, resource) when { principal.subb == "x" };')
    with pytest.raises(AnnotationError, match="is a `permit`"):
        parse_policy("permit(principal, action, resource);")
    assert parse_policy('forbid(principal in Group::"interns", action, resource == Tool::"rm");')


def test_webhook_config_validates_operator_policies() -> None:
    from outrider.webhook.config import ConfigError, parse_config

    good = parse_config({"mcp_policy": {"default": {"cedar": "permit(principal, action, resource);"}}})
    assert good.plain_mcp_policy["default"]["cedar"].startswith("permit")
    with pytest.raises(ConfigError, match=r"mcp_policy.namespaces\['a'\].cedar: line 1, column 18"):
        parse_config({"mcp_policy": {"namespaces": {"a": {"cedar": "permit(principal action, resource);"}}}})
    with pytest.raises(ConfigError, match="not a rate"):
        parse_config({"mcp_policy": {"default": {"rate_limits": {"per_user": "lots"}}}})
    huge = "\n".join(f'permit(principal in Group::"g{i}", action, resource);' for i in range(3000))
    with pytest.raises(ConfigError, match="OUTRIDER_CONFIG"):
        parse_config({"mcp_policy": {"default": {"cedar": huge}}})
    # No mcp_policy: the config hash is what it was before this feature (pods are not re-rolled).
    assert "mcp_policy" not in parse_config({}).to_mapping()


def test_scope_slices_decide_exactly_as_the_whole_set() -> None:
    """Slicing by action and resource is an optimisation: the decision must never differ."""
    import cedarpy

    from outrider.sidecar.policy.engine import _entities

    text = "\n".join(
        [
            '@id("a") permit(principal, action == Action::"call_tool", resource == Tool::"echo");',
            '@id("b") permit(principal, action in [Action::"call_tool", Action::"get_prompt"],'
            " resource is Tool);",
            '@id("c") forbid(principal in Group::"admins", action, resource in McpServer::"'
            + SERVER.id
            + '") when { context.method == "tools/call" };',
            '@id("d") permit(principal, action == Action::"list_tools", resource);',
            '@id("e") forbid(principal, action, resource == Prompt::"secret");',
            '@id("f") permit(principal, action == Action::"get_prompt", resource is Prompt);',
            # scoped to this server exactly: it must stay in the slice of a server-level call
            '@id("g") forbid(principal == User::"alice", action, resource == McpServer::"'
            + SERVER.id
            + '");',
            '@id("h") permit(principal == User::"bob", action == Action::"other", resource == McpServer::"'
            + SERVER.id
            + '");',
        ]
    )
    sliced = policies((text, False))
    whole = cedarpy.PolicySet.from_str(text)
    requests = [
        tool_call("echo"),
        tool_call("rm"),
        parse_message({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
        parse_message({"jsonrpc": "2.0", "id": 1, "method": "prompts/get", "params": {"name": "secret"}}),
        parse_message({"jsonrpc": "2.0", "id": 1, "method": "prompts/get", "params": {"name": "hello"}}),
        parse_message(
            {"jsonrpc": "2.0", "id": 1, "method": "resources/read", "params": {"uri": "file:///x"}}
        ),
        parse_message({"jsonrpc": "2.0", "id": 1, "method": "logging/setLevel", "params": {"level": "x"}}),
    ]
    # The server-scoped forbid denies alice's tools/list; the server-scoped permit lets bob set levels.
    assert not decide(sliced, ALICE, SERVER, [requests[2]], "s")[0].allowed
    assert decide(sliced, BOB, SERVER, [requests[6]], "s")[0].policies == ("h",)
    for who in (ALICE, BOB):
        got = decide(sliced, who, SERVER, requests, "stateless")
        for message, decision in zip(requests, got, strict=True):
            request, resource = request_for(message, who, SERVER, "stateless")
            expected = cedarpy.is_authorized(request, whole, _entities(who, SERVER, [resource]))
            assert decision.allowed == expected.allowed, (who.subject, message.method, message.target)


def test_no_policy_decides_nothing_and_hides_nothing() -> None:
    empty = build([])
    assert (
        decide(empty, ALICE, SERVER, [tool_call("delete"), tool_call("x")], "s")
        == [Decision(True, (), "no policy configured")] * 2
    )
    assert may_use(empty, ALICE, SERVER, "tools", ["echo", "delete"]) == [True, True]
    assert decide(policies((CEILING, False)), ALICE, SERVER, [], "s") == []


def test_decisions_in_full() -> None:
    narrowing = '@id("no-rm") forbid(principal, action, resource == Tool::"rm");'
    p = policies((CEILING, False), (narrowing, True))
    echo, rm, other = decide(p, BOB, SERVER, [tool_call("echo"), tool_call("rm"), tool_call("x")], "s")
    assert echo == Decision(True, ("echo", "admins"), "permitted by policy") or echo == Decision(
        True, ("admins", "echo"), "permitted by policy"
    )
    assert rm == Decision(False, ("no-rm",), "forbidden by policy")
    assert other == Decision(True, ("admins",), "permitted by policy")
    (nobody,) = decide(p, ALICE, SERVER, [tool_call("x")], "s")
    assert nobody == Decision(False, (), "no policy in layer0 permits this call")


def test_a_permit_that_fails_to_evaluate_is_skipped_a_forbid_denies() -> None:
    """Cedar skips a policy whose condition errors: for a permit that is right (another permit may still
    allow), for a forbid it would be a way around it, so that one denies, naming the forbid."""
    typed = '@id("typed") permit(principal, action, resource) when { context.arguments.n > 1 };'
    p = policies(('@id("all") permit(principal, action, resource);\n' + typed, False))
    (allowed,) = decide(p, ALICE, SERVER, [tool_call("echo", n="text")], "s")
    assert allowed.allowed and allowed.policies == ("all",) and len(allowed.errors) == 1
    assert "typed" in allowed.errors[0] or "policy1" in allowed.errors[0]
    assert 0 < len(allowed.errors[0]) <= 200
    forbid = '@id("no-big") forbid(principal, action, resource) when { context.arguments.n > 10 };'
    q = policies(('@id("all") permit(principal, action, resource);', False), (forbid, True))
    (denied,) = decide(q, ALICE, SERVER, [tool_call("echo", n="text")], "s")
    assert (denied.allowed, denied.policies, denied.reason) == (
        False,
        ("no-big",),
        "a forbid policy could not be evaluated",
    )
    assert len(denied.errors) == 1


def test_a_batch_mixing_server_level_and_tool_calls_keeps_every_entity() -> None:
    """A server-level request (no resource entity of its own) before tool calls in one JSON-RPC batch:
    the tools after it still have their entity (and its parent, the server)."""
    text = f'@id("in-server") permit(principal, action, resource in McpServer::"{SERVER.id}");'
    p = policies((text, False))
    listing = parse_message({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    got = decide(p, ALICE, SERVER, [listing, tool_call("echo"), tool_call("echo"), tool_call("rm")], "s")
    assert [d.allowed for d in got] == [True, True, True, True]


def test_list_filtering_hides_what_a_forbid_always_denies() -> None:
    forbid = '@id("no-rm") forbid(principal, action in [Action::"call_tool"], resource == Tool::"rm");'
    p = policies(("permit(principal, action, resource);", False), (forbid, True))
    assert may_use(p, ALICE, SERVER, "tools", ["echo", "rm"]) == [True, False]
    only_action = policies(('permit(principal, action == Action::"call_tool", resource);', False))
    assert may_use(only_action, ALICE, SERVER, "tools", ["echo"]) == [True]
    assert may_use(only_action, ALICE, SERVER, "prompts", ["hello"]) == [False]


def test_a_narrowing_layer_may_not_permit_and_bad_layers_are_reported() -> None:
    sources = [
        LayerSource("operator", "permit(principal, action, resource);", False),
        LayerSource("annotation", '@id("widen") permit(principal, action, resource);', True),
        LayerSource("file", "permit(principal, action resource);", False),
    ]
    compiled, errors = compile_layers(sources)
    assert [(c.origin, narrowing) for c, narrowing in compiled] == [("operator", False)]
    assert len(errors) == 2
    assert errors[0].startswith("annotation") and "'widen' is a `permit`" in errors[0]
    assert errors[1].startswith("file") and "line 1" in errors[1]


def test_narrowings_alone_name_their_policies_and_a_failing_forbid_still_denies() -> None:
    narrowing = (
        '@id("no-echo") forbid(principal, action, resource == Tool::"echo");\n'
        '@id("no-big") forbid(principal, action, resource)'
        " when { context.arguments has n && context.arguments.n > 10 };"
    )
    alone = policies((narrowing, True))
    echo, wrong_type, fine = decide(
        alone, ALICE, SERVER, [tool_call("echo"), tool_call("x", n="text"), tool_call("x", n=1)], "s"
    )
    assert (echo.allowed, echo.policies, echo.reason) == (False, ("no-echo",), "forbidden by policy")
    assert (wrong_type.allowed, wrong_type.policies) == (False, ("no-big",))
    assert fine == Decision(True, (), "permitted by policy")  # the implicit permit is never named


def test_policies_describe_themselves() -> None:
    assert build([]).count == 0
    assert build([]).describe() == "no policy (every authenticated caller may call every tool)"
    p = policies((CEILING, False), ('forbid(principal, action, resource == Tool::"rm");', True))
    assert p.count == 4 and p.enabled
    assert p.describe() == "4 Cedar policies (layer0: 3; layer1: 1)"


def test_evaluation_errors_are_cut_to_200_characters() -> None:
    """They go to the log line by line: a policy naming a huge attribute must not make huge lines."""
    long = "a" * 250
    text = (
        "permit(principal, action, resource);\n"
        f"permit(principal, action, resource) when {{ context.arguments.{long} > 1 }};"
    )
    (decision,) = decide(policies((text, False)), ALICE, SERVER, [tool_call("echo")], "s")
    assert decision.allowed and [len(e) for e in decision.errors] == [200]
    assert decision.errors[0].startswith("error while evaluating policy `policy1`: record does not have")


def test_denials_keep_the_evaluation_errors_for_the_log() -> None:
    broken = '@id("broken") permit(principal, action, resource) when { context.arguments.n > 1 };'
    forbid = '@id("no-rm") forbid(principal, action, resource == Tool::"rm");'
    p = policies(("permit(principal, action, resource);\n" + broken, False), (forbid, True))
    (forbidden,) = decide(p, ALICE, SERVER, [tool_call("rm", n="x")], "s")
    assert (forbidden.allowed, forbidden.policies, len(forbidden.errors)) == (False, ("no-rm",), 1)
    only_broken = policies((broken, False))
    (nobody,) = decide(only_broken, ALICE, SERVER, [tool_call("echo", n="x")], "s")
    assert (nobody.allowed, nobody.policies, len(nobody.errors)) == (False, (), 1)


def test_more_values_than_counts_every_scalar_list_and_record() -> None:
    assert not more_values_than(5, 1) and more_values_than(5, 0)
    value = {"a": [1, 2], "b": {"c": "x"}}  # the record, the list, 1, 2, the inner record, "x"
    assert not more_values_than(value, 6) and more_values_than(value, 5)
    assert more_values_than([[1]] * 4, 8) and not more_values_than([[1]] * 4, 9)
    assert more_values_than({"deep": [[[[[[1]]]]]]}, 7) and not more_values_than({"deep": [[[[[[1]]]]]]}, 8)


def test_arguments_over_the_limit_are_denied_unjudged_and_the_rest_judged_in_order() -> None:
    p = policies((CEILING, False))
    fits = tool_call("echo", rows=[1, 2, 3])  # the arguments record, the list and 3 numbers: 5
    big = tool_call("echo", rows=[1, 2, 3, 4])  # 6
    denied_small = tool_call("delete")
    decisions = decide(p, ALICE, SERVER, [big, fits, denied_small, big], "s", 5)
    assert [d.allowed for d in decisions] == [False, True, False, False]
    assert decisions[0] == decisions[3]
    assert decisions[0].reason == "the arguments hold more than 5 values: too many to judge"
    assert decisions[0].policies == () and decisions[0].errors == ()
    assert decisions[1].policies == ("echo",) and decisions[2].reason != decisions[0].reason
    assert [d.allowed for d in decide(p, ALICE, SERVER, [big], "s", 6)] == [True]
    # No policy: nothing is judged, so nothing is too large to judge.
    assert decide(build([]), ALICE, SERVER, [big], "s", 1)[0].allowed
    # The default bound is the configuration's, and a message with no arguments is never too large.
    huge = tool_call("echo", rows=list(range(MAX_ARGUMENT_VALUES)))
    assert not decide(p, ALICE, SERVER, [huge], "s")[0].allowed
    assert decide(p, ALICE, SERVER, [tool_call("echo", rows=list(range(MAX_ARGUMENT_VALUES - 2)))], "s")[
        0
    ].allowed
    listing = parse_message({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
    assert decide(p, ALICE, SERVER, [listing], "s", 1)[0].allowed


def test_the_calls_left_to_judge_beside_a_refused_one_keep_the_transport_and_the_limit() -> None:
    p = policies(
        (
            '@id("stateless-only") permit(principal, action, resource) when { context.transport == "s" };',
            False,
        )
    )
    limit = MAX_ARGUMENT_VALUES + 10
    over = tool_call("echo", rows=list(range(limit)))  # limit + 2 values
    above_default = tool_call("echo", rows=list(range(MAX_ARGUMENT_VALUES + 5)))  # under this limit
    decisions = decide(p, ALICE, SERVER, [over, above_default, tool_call("echo")], "s", limit)
    assert [d.allowed for d in decisions] == [False, True, True]
    assert decisions[1].policies == ("stateless-only",)
    assert [d.allowed for d in decide(p, ALICE, SERVER, [over, tool_call("echo")], "t", limit)] == [
        False,
        False,
    ]


def test_a_lone_surrogate_in_a_name_or_the_principal_is_denied_not_an_exception() -> None:
    """JSON can spell a lone surrogate (`"\\ud800"`) and Python's decoder keeps it; Cedar cannot hold
    one and refused the whole entity set with a ValueError (a 500 for every call of the batch)."""
    p = policies((CEILING, False))
    odd = [
        tool_call("ech\ud800"),
        parse_message(
            {"jsonrpc": "2.0", "id": 2, "method": "resources/read", "params": {"uri": "file:///\udc00"}}
        ),
        parse_message({"jsonrpc": "2.0", "id": 3, "method": "prompts/get", "params": {"name": "\ud83d"}}),
    ]
    decisions = decide(p, BOB, SERVER, [tool_call("echo"), *odd, tool_call("delete")], "s")
    assert [d.allowed for d in decisions] == [True, False, False, False, True]
    reason = "the call names its tool, prompt or resource with text that is not valid Unicode"
    assert {(d.reason, d.policies, d.errors) for d in decisions[1:4]} == {(reason, (), ())}
    assert decisions[4].policies == ("admins",)
    # A JSON surrogate pair decodes to one valid character (U+1F600), judged as any name.
    (pair,) = jsonrpc.parse_body(
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"\\ud83d\\ude00"}}'
    ).messages
    assert pair.tool_name == "\U0001f600" and decide(p, BOB, SERVER, [pair], "s")[0].allowed
    assert decide(p, ALICE, SERVER, [pair], "s")[0].reason.startswith("no policy")
    odd_caller = Principal("oidc", "al\udc00ce", "https://idp")
    refused = decide(p, odd_caller, SERVER, [tool_call("echo"), tool_call("delete")], "s")
    assert [(d.allowed, d.reason) for d in refused] == [
        (False, "the caller's token names it with text that is not valid Unicode: it cannot be judged")
    ] * 2
    assert may_use(p, BOB, SERVER, "tools", ["echo", "ech\ud800", "é"]) == [True, False, True]


def test_a_completion_spends_what_getting_its_prompt_or_reading_its_template_spends() -> None:
    limits = RateLimits.from_mapping(
        {"per_user": "9/minute", "per_pod": "9/minute", "per_tool": "9/minute", "per_user_tool": "9/minute"},
        "spec",
    )

    def message(method: str, params: dict[str, Any]) -> McpMessage:
        return parse_message({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})

    get = budgets(limits, message("prompts/get", {"name": "x"}), "alice", "pod")
    for ref in ({"type": "ref/prompt", "name": "x"}, {"type": "ref/resource", "uri": "file:///{p}"}):
        spent = budgets(limits, message("completion/complete", {"ref": ref}), "alice", "pod")
        # The same budgets under the same keys (per_tool and per_user_tool name tools only).
        assert spent == get and [b.scope for b in spent] == ["per_pod", "per_user"]
    # A ref of no known shape names nothing (refused as invalid before the budgets are asked).
    assert budgets(limits, message("completion/complete", {"ref": {"type": "ref/tool"}}), "a", "p") == ()


def _reference_events(stream: bytes, cuts: list[int]) -> list[bytes]:
    """The SSE framer as it was before it resumed its search (searching everything held each time)."""
    buffer = b""
    events: list[bytes] = []
    previous = 0
    for cut in [*sorted(set(cuts)), len(stream)]:
        buffer += stream[previous:cut]
        previous = cut
        start = 0
        for match in jsonrpc._EVENT_END.finditer(buffer):
            if match.end() == len(buffer) and buffer.endswith(b"\r"):
                break
            events.append(buffer[start : match.end()])
            start = match.end()
        buffer = buffer[start:]
    return events


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"data: x", b"id: 1", b":c", b"a"]), max_size=30),
    st.lists(st.integers(0, 80), max_size=10),
)
def test_the_sse_framer_cuts_events_as_before_in_any_split(pieces: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(pieces)
    framer = jsonrpc.SseFramer()
    events: list[bytes] = []
    previous = 0
    for cut in [*sorted(set(cuts)), len(stream)]:
        events += framer.feed(stream[previous:cut])
        previous = cut
    assert events == _reference_events(stream, cuts)


def test_a_large_event_in_many_chunks_is_searched_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each chunk of a large SSE event (a long tools/list answer) used to search everything held
    again: 1 MB in 1 KB chunks searched ~512 MB. The search now resumes where it stopped (counted:
    the bytes each search was given, not a time)."""
    searched: list[int] = []
    real = jsonrpc._EVENT_END

    class Counting:
        def finditer(self, string: Any, pos: int = 0) -> Any:
            searched.append(len(string) - pos)
            return real.finditer(string, pos)

    monkeypatch.setattr(jsonrpc, "_EVENT_END", Counting())
    framer = jsonrpc.SseFramer()
    event = b"event: message\ndata: " + b"x" * (1 << 20) + b"\n\n"
    events: list[bytes] = []
    for at in range(0, len(event), 1024):
        events += framer.feed(event[at : at + 1024])
    assert events == [event]
    assert sum(searched) < 2 * len(event), sum(searched)


class _ReferenceSseParser:
    """The SSE parser as it was before it cut lines in place (to compare events with)."""

    def __init__(self, max_event_bytes: int = 1 << 20) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self._size = 0
        self._event: str | None = None
        self._id: str | None = None
        self._max = max_event_bytes

    def feed(self, chunk: bytes) -> list[jsonrpc.SseEvent]:
        events: list[jsonrpc.SseEvent] = []
        self._buffer += chunk
        while True:
            lf, cr = self._buffer.find(b"\n"), self._buffer.find(b"\r")
            cr_first = cr != -1 and (lf == -1 or cr < lf)
            if (cr == -1 and lf == -1) or (cr_first and cr + 1 == len(self._buffer)):
                if len(self._buffer) > self._max:
                    self._buffer, self._data, self._size = b"", [], self._max + 1
                return events
            if cr_first:
                line_end, next_start = (
                    (cr, cr + 2) if self._buffer[cr + 1 : cr + 2] == b"\n" else (cr, cr + 1)
                )
            else:
                line_end, next_start = lf, lf + 1
            line = self._buffer[:line_end].decode("utf-8", "replace")
            self._buffer = self._buffer[next_start:]
            if not line:
                if (self._data or self._event) and self._size <= self._max:
                    events.append(jsonrpc.SseEvent(self._event, "\n".join(self._data), self._id))
                self._data, self._size, self._event = [], 0, None
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                self._size += len(value)
                if self._size <= self._max:
                    self._data.append(value)
            elif name == "event":
                self._event = value
            elif name == "id":
                self._id = value


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [b"\r", b"\n", b"\r\n", b"data: x", b"data:yy", b"id: 1", b"event: m", b":c", b"a" * 40]
        ),
        max_size=30,
    ),
    st.lists(st.integers(0, 200), max_size=10),
)
def test_the_sse_parser_reads_events_as_before_in_any_split(pieces: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(pieces)
    parser, reference = jsonrpc.SseParser(max_event_bytes=64), _ReferenceSseParser(max_event_bytes=64)
    got: list[jsonrpc.SseEvent] = []
    expected: list[jsonrpc.SseEvent] = []
    previous = 0
    for cut in [*sorted(set(cuts)), len(stream)]:
        got += parser.feed(stream[previous:cut])
        expected += reference.feed(stream[previous:cut])
        previous = cut
    assert got == expected


def test_a_chunk_of_many_lines_is_not_copied_per_line() -> None:
    """The SSE watcher re-made its held bytes at every line (slicing off the rest): one chunk of
    10,000 short lines copied ~half a gigabyte. Counted: the sizes of the held buffers it made."""
    made: list[int] = []

    class Counting(jsonrpc.SseParser):
        def __setattr__(self, name: str, value: Any) -> None:
            if name == "_buffer":
                made.append(len(value))
            super().__setattr__(name, value)

    chunk = b"".join(b"data: %d\n\n" % i for i in range(10000))
    events = Counting().feed(chunk)
    assert len(events) == 10000 and events[-1].data == "9999"
    assert sum(made) < 2 * len(chunk), sum(made)


def _cedar_rendering(text: str) -> str:
    """How Cedar itself writes `text` as an entity id (its normalised form, which partial
    evaluation requires of a textual entity UID)."""
    import cedarpy

    scope = {"op": "==", "entity": {"type": "User", "id": text}}
    policy = {"effect": "permit", "principal": scope, "action": {"op": "All"}, "resource": {"op": "All"}}
    document = {"staticPolicies": {"p": {**policy, "conditions": []}}, "templates": {}, "templateLinks": []}
    rendered = cedarpy.policies_from_json_str(json.dumps(document))
    return rendered[rendered.index("User::") + len("User::") : rendered.rindex(", action, resource")]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=12) | st.sampled_from(["josé", "o'brien", "ec\0ho", "\u0301x", "\u00a0", "e\u0301"]))
def test_cedar_strings_are_written_as_cedar_writes_them(text: str) -> None:
    """Partial evaluation takes textual entity UIDs and refuses any not in Cedar's own normalised
    form (`Tool::"\\u{e9}"` for `é`): the request then ended in no decision, which the list filter
    read as "shown". Written as Cedar writes them, they are judged."""
    assert cedar_string(text) == _cedar_rendering(text)


def test_prompt_budgets_are_spent_by_getting_a_prompt_and_completing_its_arguments() -> None:
    limits = RateLimits.from_mapping(
        {
            "per_prompt": {"x": "5/minute", "*": "9/minute"},
            "per_user_prompt": "3/minute",
            "per_tool": "9/minute",
        },
        "spec",
    ).narrowed(RateLimits.from_mapping({"per_prompt": {"x": "4/minute"}}, "file"))

    def message(method: str, params: dict[str, Any]) -> McpMessage:
        return parse_message({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})

    get = budgets(limits, message("prompts/get", {"name": "x"}), "alice", "pod")
    complete = budgets(
        limits, message("completion/complete", {"ref": {"type": "ref/prompt", "name": "x"}}), "alice", "pod"
    )
    assert get == complete
    assert [(b.scope, b.key) for b in get] == [
        ("per_prompt", ("prompt", "pod", "x", "x")),
        ("per_prompt", ("prompt", "pod", "x", "x")),
        ("per_prompt", ("prompt", "pod", "x", "%2A")),
        ("per_user_prompt", ("user_prompt", "pod", "alice", "x")),
    ]
    # A tool of the same name draws from its own budgets; a template's completion from no prompt's.
    tool = budgets(limits, tool_call("x"), "alice", "pod")
    assert [b.key[0] for b in tool] == ["tool"]
    template = {"ref": {"type": "ref/resource", "uri": "x"}}
    assert budgets(limits, message("completion/complete", template), "alice", "pod") == ()
    with pytest.raises(ValueError, match=r"per_prompt: must map prompt names \(or '\*'\) to rates"):
        RateLimits.from_mapping({"per_prompt": 5}, "x")
    assert not RateLimits.from_mapping({"per_user_prompt": "1/second"}, "x").empty


def test_a_tool_or_prompt_named_star_spends_the_star_budget_once() -> None:
    limits = RateLimits.from_mapping({"per_tool": "9/minute", "per_prompt": "9/minute"}, "spec")
    get = parse_message({"jsonrpc": "2.0", "id": 1, "method": "prompts/get", "params": {"name": "*"}})
    assert len(budgets(limits, tool_call("*"), "alice", "pod")) == 1
    assert len(budgets(limits, get, "alice", "pod")) == 1
