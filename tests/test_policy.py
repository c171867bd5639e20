"""Rates are validated here, not clamped silently by Keras."""

from __future__ import annotations

import keras
import pytest
from helpers import L
from helpers import mlp_sequential

import regularize
from regularize.core.errors import PolicyError
from regularize.core.errors import UnsupportedModelError


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan"), "0.3", True, None, [0.1]])
def test_invalid_rate_is_refused(rate):
    case = mlp_sequential()
    with pytest.raises(PolicyError, match=r"Invalid `rate`. Expected a float in \[0, 1\)"):
        regularize.add_dropout(case.model, rate=rate)


@pytest.mark.parametrize("rate", [-1, 1.0, 2])
def test_invalid_recurrent_rate_is_refused(rate):
    case = mlp_sequential()
    with pytest.raises(PolicyError, match=r"Received: recurrent_rate="):
        regularize.add_dropout(case.model, 0.2, recurrent_rate=rate)


def test_policy_error_is_a_value_error():
    with pytest.raises(ValueError):
        regularize.Policy(rate=1.0)


def test_rate_zero_inserts_nothing():
    case = mlp_sequential()
    report = regularize.Report()
    new = regularize.add_dropout(case.model, 0.0, report=report)
    assert [layer.name for layer in new.layers] == [layer.name for layer in case.model.layers]
    assert {s.reason for s in report.sites} == {"rate is 0", "model output"}


def test_subclassed_model_is_refused():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.fc = L.Dense(2)

        def call(self, x):
            return self.fc(x)

    net = Net()
    net(keras.ops.ones((1, 3)))
    with pytest.raises(UnsupportedModelError, match="subclassed model 'Net'") as info:
        regularize.add_dropout(net)
    assert isinstance(info.value, TypeError)


def test_unbuilt_sequential_is_refused():
    model = keras.Sequential([L.Dense(2, activation="relu"), L.Dense(1)])
    with pytest.raises(UnsupportedModelError, match="not built"):
        regularize.add_dropout(model)


def test_not_a_model_is_refused():
    with pytest.raises(UnsupportedModelError, match="Received: model of type 'Dense'"):
        regularize.add_dropout(L.Dense(3))


# -- policy files and their errors (no model needed) ---------------------------

ISSUE_EXAMPLE = """\
preset = "all"
rate = 0.2

[[rule]]
match = "block5_*"
rate = 0.4

[[rule]]
match = "block1_*"
skip = true
"""


def _file(tmp_path, text, name="policy.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_documented_policy_file_works_as_written(tmp_path):
    policy = regularize.Policy.from_file(_file(tmp_path, ISSUE_EXAMPLE))
    assert policy.preset == "all" and policy.rate == 0.2
    assert [(r.match, r.rate, r.skip) for r in policy.rules] == [
        ("block5_*", 0.4, None),
        ("block1_*", None, True),
    ]


def test_the_file_wins_for_what_it_states_and_the_flags_for_the_rest(tmp_path):
    path = _file(tmp_path, 'preset = "head"\nrate = 0.2\n')
    policy = regularize.Policy.from_file(path, rate=0.5, recurrent_rate=0.1)
    assert (policy.preset, policy.rate, policy.recurrent_rate) == ("head", 0.2, 0.1)
    policy = regularize.Policy.from_file(_file(tmp_path, 'preset = "blocks"\n'), rate=0.5)
    assert policy.rate == 0.5


def test_a_policy_round_trips_through_a_dict(tmp_path):
    text = ISSUE_EXAMPLE + "\n[schedule]\nstart = 0.1\nend = 0.3\n"
    text = text.replace("rate = 0.2", 'rate = 0.2\nrecurrent_rate = 0.1\nexisting = "remove"')
    policy = regularize.Policy.from_file(_file(tmp_path, text))
    assert regularize.Policy.from_dict(policy.to_dict()) == policy
    assert policy.schedule == (0.1, 0.3) and policy.existing == "remove"


def _error(tmp_path, text):
    with pytest.raises(PolicyError) as info:
        regularize.Policy.from_file(_file(tmp_path, text))
    return str(info.value).replace(str(tmp_path / "policy.toml"), "F")


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "rates = 0.2",
            "Unknown policy key 'rates' in F. Expected one of preset, rate, recurrent_rate, "
            "attention_rate, schedule, rule, existing, mc, drop_path, skip_inference_only, "
            "exact. "
            "Received: rates=0.2",
        ),
        ("rate = 1.0", "Invalid `rate` in F. Expected a float in [0, 1). Received: rate=1.0"),
        ("rate = -0.1", "Invalid `rate` in F. Expected a float in [0, 1). Received: rate=-0.1"),
        ('rate = "0.3"', "Invalid `rate` in F. Expected a float in [0, 1). Received: rate='0.3'"),
        (
            "attention_rate = 1",
            "Invalid `attention_rate` in F. Expected a float in [0, 1). Received: attention_rate=1",
        ),
        (
            "recurrent_rate = 1.5",
            "Invalid `recurrent_rate` in F. Expected a float in [0, 1). "
            "Received: recurrent_rate=1.5",
        ),
        (
            'preset = "tail"',
            "Invalid `preset` in F. Expected one of 'all', 'head', 'blocks'. "
            "Received: preset='tail'",
        ),
        (
            'existing = "drop"',
            "Invalid `existing` in F. Expected one of 'keep', 'retarget', 'remove'. "
            "Received: existing='drop'",
        ),
        ("mc = 1", "Invalid `mc` in F. Expected true or false. Received: mc=1"),
        (
            "[schedule]\nstart = 0.1",
            "Invalid `schedule` in F. Expected both `start` and `end`. "
            "Received: schedule={'start': 0.1}",
        ),
        (
            "[schedule]\nstart = 0.1\nend = 1.0",
            "Invalid `schedule.end` in F. Expected a float in [0, 1). Received: schedule.end=1.0",
        ),
        (
            "[schedule]\nstart = 0.1\nend = 0.2\nstep = 1",
            "Unknown schedule key 'step' in F. Expected one of start, end. Received: step=1",
        ),
        (
            '[[rule]]\nmatch = "a*"\nrte = 0.2',
            "Unknown key 'rte' in rule 1 in F. Expected one of match, class, depth, trainable, "
            "rate, recurrent_rate, attention_rate, kind, skip. Received: rte=0.2",
        ),
        (
            '[[rule]]\nmatch = "a*"\n[[rule]]\nmatch = "b*"\nrate = 2',
            "Invalid `rate` in rule 2 in F. Expected a float in [0, 1). Received: rate=2",
        ),
        (
            '[[rule]]\nmatch = "a*"\nkind = "spacial"',
            "Invalid `kind` in rule 1 in F. Expected one of 'auto', 'dropout', 'spatial', "
            "'gaussian', 'alpha'. Received: kind='spacial'",
        ),
        (
            "[[rule]]\nmatch = 3",
            "Invalid `match` in rule 1 in F. Expected a non-empty string. Received: match=3",
        ),
        (
            '[[rule]]\nclass = ""',
            "Invalid `class` in rule 1 in F. Expected a non-empty string. Received: class=''",
        ),
        (
            "[[rule]]\ndepth = [0.8, 0.2]",
            "Invalid `depth` in rule 1 in F. Expected [low, high] with 0 <= low <= high <= 1. "
            "Received: depth=[0.8, 0.2]",
        ),
        (
            '[[rule]]\nskip = "yes"',
            "Invalid `skip` in rule 1 in F. Expected true or false. Received: skip='yes'",
        ),
        (
            "[[rule]]\ntrainable = 0",
            "Invalid `trainable` in rule 1 in F. Expected true or false. Received: trainable=0",
        ),
    ],
)
def test_every_invalid_policy_names_the_file_the_key_and_the_value(tmp_path, text, message):
    assert _error(tmp_path, text) == message


def test_a_file_that_is_not_toml_is_one_line(tmp_path):
    message = _error(tmp_path, "rate = = 0.2")
    assert message.startswith("Cannot read policy file 'F': not valid TOML (")
    assert "\n" not in message


def test_a_missing_policy_file(tmp_path):
    with pytest.raises(PolicyError, match="no such file. Expected a TOML file. Received: "):
        regularize.Policy.from_file(tmp_path / "nope.toml")


def test_add_dropout_accepts_a_policy_file_path(tmp_path):
    case = mlp_sequential()
    path = _file(tmp_path, '[[rule]]\nmatch = "act"\nrate = 0.4\n')
    new = regularize.add_dropout(case.model, rate=0.1, policy=str(path))
    rates = {layer.name: layer.rate for layer in new.layers if "__dropout" in layer.name}
    assert rates == {"d1__dropout": 0.1, "act__dropout": 0.4}
    with pytest.raises(PolicyError, match="Received: policy of type 'int'"):
        regularize.add_dropout(case.model, policy=3)


def test_decide_is_pure_and_reports_the_rule():
    from regularize.core.rules import Candidate

    policy = regularize.Policy(rate=0.2, rules=[{"match": "x*", "rate": 0.4}])
    site = Candidate("m/x1", "Dense", "relu", 0.5, True, "Dropout")
    decision = policy.decide(site)
    assert (decision.rate, decision.kind, decision.rule) == (0.4, "Dropout", 0)
    assert decision.reason == "after relu, rule 1 (match='x*')"
    assert policy.decide(Candidate("m/y", "Dense", "selu", 0.5, True, "Dropout")).kind == (
        "AlphaDropout"
    )


# -- files that are not a policy, values too big to echo -----------------------


def test_a_deeply_nested_value_is_one_short_line(tmp_path):
    for text in (
        "rate = " + "[" * 5000 + "]" * 5000,
        "rate = " + "{a = " * 5000 + "1" + "}" * 5000,
    ):
        message = _error(tmp_path, text)
        assert message == (
            "Cannot read policy file 'F': it nests arrays or tables too deeply to parse. "
            "Expected `key = value` lines and [[rule]] tables."
        )


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/dev/null", "Cannot read policy file: it is a character device, not a regular file."),
        (".", "Cannot read policy file: it is a folder. Expected a TOML file. Received: '.'"),
    ],
)
def test_a_policy_path_that_is_not_a_regular_file_is_refused(path, message):
    with pytest.raises(PolicyError) as info:
        regularize.Policy.from_file(path)
    assert str(info.value).startswith(message)


def test_a_symlink_loop_and_a_long_name_are_one_line(tmp_path):
    loop = tmp_path / "loop.toml"
    loop.symlink_to(loop)
    with pytest.raises(PolicyError, match="its path is a symlink loop. Expected a TOML file"):
        regularize.Policy.from_file(loop)
    with pytest.raises(PolicyError, match="a name in its path is too long") as info:
        regularize.Policy.from_file(tmp_path / ("p" * 300 + ".toml"))
    assert "(" in str(info.value) and len(str(info.value)) < 500


CUT = "'" + "a" * 80 + "...' (5000000 chars)"


@pytest.mark.parametrize(
    ("text", "received"),
    [
        ('zzz = "BIG"', f"Received: zzz={CUT}"),
        ('"BIG" = 1', "Unknown policy key '" + "a" * 40 + "...' (5000000 chars) in F."),
        ('rate = "BIG"', f"Received: rate={CUT}"),
        ('preset = "BIG"', f"Received: preset={CUT}"),
        ("mc = [" + "1, " * 100_000 + "]", "Received: mc=[1, 1, 1, 1, 1, 1, 1, 1, ...]"),
        ('[[rule]]\nmatch = "BIG"\nkind = "x"', "Received: kind='x'"),
        ('[[rule]]\nkind = "BIG"', f"Received: kind={CUT}"),
        (
            '[[rule]]\ndepth = ["BIG", 1]',
            "Received: depth=['aaaaaaaaaaaaaaaaa...aaaaaaaaaaaaaaaaaa', 1]",
        ),
        (
            "[schedule]\nstart = 0.1\nend = [" + "[" * 200 + "]" * 200 + "]",
            "Received: schedule.end=[[[[[...]]]]]",
        ),
    ],
    ids=["key", "long-key", "rate", "preset", "long-list", "rule", "kind", "depth", "nested"],
)
def test_every_echoed_value_is_cut_to_a_readable_length(tmp_path, text, received):
    # A 5 MB value stands for the 50 MB one of the issue: the same cut, faster.
    message = _error(tmp_path, text.replace("BIG", "a" * 5_000_000))
    assert received in message
    assert len(message) < 400 and "\n" not in message


def test_a_long_rule_match_is_cut_in_every_reason():
    rule = regularize.Policy(rules=[{"match": "x" * 10_000, "rate": 0.1}]).rules[0]
    assert rule.describe(0) == f"rule 1 (match='{'x' * 40}...' (10000 chars))"


def test_short_repr_cuts_strings_bytes_and_deep_or_huge_values():
    from regularize.core.text import short_repr

    assert short_repr("a" * 52428800, limit=4) == "'aaaa...' (52428800 chars)"
    assert short_repr(b"\x00" * 100, limit=2) == "b'\\x00\\x00...' (100 bytes)"
    assert short_repr("ok") == "'ok'" and short_repr(0.25) == "0.25"
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert short_repr(deep) == "[[[[[...]]]]]"
    assert short_repr(10**5000) == "<int>"
    assert len(short_repr({str(i): "v" * 1000 for i in range(1000)})) < 200
