"""CFG schedule grammar: values from the formulas, canonical specs, chain axis, presets and error messages."""

from __future__ import annotations

import math

import pytest

from redifine_core.guidance import FORMS, PRESETS, Schedule, ScheduleSyntaxError, parse_schedule


def approx(x):
    return pytest.approx(x, rel=1e-12, abs=1e-12)


# --- per-step forms at known points (expected values worked out from the formulas by hand) -------------------

@pytest.mark.parametrize(
    "spec, p, expected",
    [
        ("7.5", 0.0, 7.5),
        ("7.5", 0.37, 7.5),
        ("linear(7, 1)", 0.0, 7.0),
        ("linear(7, 1)", 0.5, 4.0),
        ("linear(7, 1)", 1.0, 1.0),
        ("linear(2, 10)", 0.25, 4.0),
        ("cosine(7, 1)", 0.0, 7.0),
        ("cosine(7, 1)", 0.5, 4.0),  # cos(pi/2) = 0: the midpoint
        ("cosine(7, 1)", 1.0, 1.0),
        ("cosine(9, 1)", 1 / 3, 1 + 8 * 0.75),  # (1 + cos(pi/3))/2 = 0.75
        ("exp(7.5, 1, 3)", 0.0, 7.5),
        ("exp(7.5, 1, 3)", 1.0, 1 + 6.5 * math.exp(-3)),
        ("exp(8, 2, 2)", 0.5, 2 + 6 * math.exp(-1)),
        ("exp(1, 5, 0)", 0.7, 1.0),  # rate 0 stays at a
        ("interval(5, 0.2, 0.8)", 0.1, 1.0),
        ("interval(5, 0.2, 0.8)", 0.2, 5.0),  # bounds are inside
        ("interval(5, 0.2, 0.8)", 0.5, 5.0),
        ("interval(5, 0.2, 0.8)", 0.8, 5.0),
        ("interval(5, 0.2, 0.8)", 0.81, 1.0),
        ("keys(0:7.5, 0.5:3, 1:1)", 0.25, 5.25),  # halfway between 7.5 and 3
        ("keys(0:7.5, 0.5:3, 1:1)", 0.5, 3.0),
        ("keys(0:7.5, 0.5:3, 1:1)", 0.75, 2.0),
        ("keys(0.2:6, 0.6:2)", 0.0, 6.0),  # clamped before the first key
        ("keys(0.2:6, 0.6:2)", 0.4, 4.0),
        ("keys(0.2:6, 0.6:2)", 1.0, 2.0),  # clamped after the last key
        ("keys(0.5:3)", 0.9, 3.0),
    ],
)
def test_per_step_values_match_formula(spec, p, expected):
    assert parse_schedule(spec).scale(p) == approx(expected)


def test_values_length_endpoints_and_step_positions():
    s = parse_schedule("linear(7, 1)")
    v = s.values(7)
    assert len(v) == 7
    assert v[0] == 7.0 and v[-1] == 1.0
    assert v == approx([7 - i for i in range(7)])  # step i at p = i/6: 7 - 6*(i/6)
    assert s.values(1) == [7.0]  # a single step sits at p = 0
    assert s.values(2) == [7.0, 1.0]
    e = parse_schedule("exp(10, 2, 4)")
    assert e.values(5) == approx([2 + 8 * math.exp(-4 * i / 4) for i in range(5)])


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_values_rejects_bad_step_counts(bad):
    with pytest.raises(ValueError, match="steps"):
        parse_schedule("linear(7, 1)").values(bad)


@pytest.mark.parametrize("p", [-0.01, 1.01, float("nan")])
def test_scale_rejects_progress_outside_unit_interval(p):
    with pytest.raises(ValueError, match="progress"):
        parse_schedule("7").scale(p)


def test_at_iteration_rejects_negative_iteration():
    with pytest.raises(ValueError, match="iteration"):
        parse_schedule("cycle(1, 2)").at_iteration(-1)


# --- text handling, canonical specs, equality ---------------------------------------------------------------

def test_whitespace_case_and_number_forms_are_equivalent():
    a = parse_schedule("exp(7.5, 1, 3)")
    assert parse_schedule("  EXP ( 7.50 ,\n 1.0,3 )\t") == a
    assert parse_schedule("Exp(75e-1, +1, 0.3E1)") == a
    assert parse_schedule(".5").scale(0) == 0.5
    assert parse_schedule("1e-3").scale(0) == 0.001


@pytest.mark.parametrize(
    "spec, canonical",
    [
        ("7.50", "7.5"),
        ("3.0", "3"),
        ("-0", "0"),
        ("LINEAR(7,1)", "linear(7, 1)"),
        ("cosine( 7.5 , 1 )", "cosine(7.5, 1)"),
        ("exp(7.5,1,3)", "exp(7.5, 1, 3)"),
        ("interval(5,.2,.8)", "interval(5, 0.2, 0.8)"),
        ("keys(0:7.5,.5:3,1:1)", "keys(0:7.5, 0.5:3, 1:1)"),
        ("cycle(7.5,linear(3,1))", "cycle(7.5, linear(3, 1))"),
        ("by_iter(7.5, 5)", "by_iter(7.5, 5)"),
        ("chain_decay(7.5,5,.5)", "chain_decay(7.5, 5, 0.5)"),
        ("1e-7", "1e-07"),
    ],
)
def test_canonical_spec_and_round_trip(spec, canonical):
    s = parse_schedule(spec)
    assert s.spec == canonical
    assert str(s) == canonical
    again = parse_schedule(s.spec)
    assert again == s and hash(again) == hash(s)
    assert again.values(9) == s.values(9)


def test_round_trip_is_exact_for_awkward_floats():
    s = parse_schedule("linear(0.1, 7.123456789012345)")
    assert parse_schedule(s.spec) == s
    assert parse_schedule(s.spec).values(4) == s.values(4)


def test_equality_and_hashing_are_structural():
    assert parse_schedule("linear(7, 1)") != parse_schedule("linear(7, 2)")
    assert parse_schedule("linear(7, 1)") != parse_schedule("cosine(7, 1)")
    assert parse_schedule("7") != parse_schedule("interval(7, 0, 1)")  # same values, different schedule
    assert len({parse_schedule("redifine"), parse_schedule("exp(7.5, 1, 3)"), parse_schedule("7.5")}) == 2


def test_schedules_are_immutable():
    s = parse_schedule("linear(7, 1)")
    with pytest.raises(AttributeError):
        s.a = 3  # type: ignore[misc]


def test_parse_schedule_accepts_schedule_and_numbers():
    s = parse_schedule("linear(7, 1)")
    assert parse_schedule(s) is s
    assert parse_schedule(7.5) == parse_schedule("7.5")
    assert parse_schedule(3) == parse_schedule("3")
    assert isinstance(parse_schedule(2), Schedule)
    with pytest.raises(ScheduleSyntaxError, match=r"must be in \[0, 100\]"):
        parse_schedule(-2.0)
    with pytest.raises(ScheduleSyntaxError, match="finite"):
        parse_schedule(float("inf"))
    with pytest.raises(TypeError):
        parse_schedule(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        parse_schedule(True)  # type: ignore[arg-type]


def test_guidance_below_one_is_allowed():
    assert parse_schedule("linear(1, 0)").values(3) == [1.0, 0.5, 0.0]


# --- chain axis --------------------------------------------------------------------------------------------

def test_cycle_picks_item_by_iteration_modulo():
    s = parse_schedule("cycle(7.5, linear(3, 1), 2)")
    assert s.is_chain_axis
    assert s.at_iteration(0) == parse_schedule("7.5")
    assert s.at_iteration(1) == parse_schedule("linear(3, 1)")
    assert s.at_iteration(2) == parse_schedule("2")
    assert s.at_iteration(3) == parse_schedule("7.5")
    assert s.at_iteration(7) == parse_schedule("linear(3, 1)")
    assert s.values(3, iteration=4) == [3.0, 2.0, 1.0]
    assert s.scale(0.5, iteration=1) == 2.0


def test_by_iter_holds_last_item():
    s = parse_schedule("by_iter(9, 5, linear(4, 2))")
    assert [s.at_iteration(i).spec for i in range(5)] == ["9", "5", "linear(4, 2)", "linear(4, 2)", "linear(4, 2)"]
    assert s.values(3, iteration=10) == [4.0, 3.0, 2.0]


def test_chain_decay_is_constant_per_iteration():
    s = parse_schedule("chain_decay(8, 2, 0.5)")
    assert s.is_chain_axis
    for i in range(4):
        expected = 2 + 6 * math.exp(-0.5 * i)
        assert s.values(4, iteration=i) == approx([expected] * 4)
        assert not s.at_iteration(i).is_chain_axis


def test_per_step_schedules_ignore_iteration():
    s = parse_schedule("linear(7, 1)")
    assert not s.is_chain_axis
    assert s.at_iteration(5) is s
    assert s.values(3, iteration=9) == s.values(3)


# --- presets -----------------------------------------------------------------------------------------------

def test_redifine_is_the_alias_of_the_reading_named_in_one_place(monkeypatch):
    from redifine_core import presets

    assert presets.REDIFINE_READING == "redifine_decay"  # until the pre-registered study selects one
    assert PRESETS["redifine"] == PRESETS[presets.REDIFINE_READING] == "exp(7.5, 1, 3)"
    s = parse_schedule("redifine")
    assert s == parse_schedule(PRESETS["redifine"])
    assert parse_schedule("ReDiFine()") == s
    v = s.values(20)
    assert v[0] == 7.5
    assert all(a > b for a, b in zip(v, v[1:]))  # decays every step
    assert v[-1] == approx(1 + 6.5 * math.exp(-3))  # 5% of the excess guidance left at the last step
    d = s.describe()
    assert "redifine_decay" in d and "not yet chosen by evidence" in d and "docs/toy-lab.md" in d
    assert "not the paper's formula" in d
    # the alias follows whichever reading the constant names
    for target in ("redifine_rising", "redifine_chain"):
        alias = presets._alias(presets.PRESET_DEFS[target])
        assert alias.expand([10]) == presets.PRESET_DEFS[target].expand([10])


@pytest.mark.parametrize("w, low", [(7.5, 2.625), (5, 2.0), (10, 3.25), (1, 1.0), (0, 0.75), (100, 25.75)])
def test_the_scale_rule_keeps_a_quarter_of_the_guidance_excess(w, low):
    from redifine_core.presets import low_scale

    assert low_scale(w) == low
    assert parse_schedule(f"redifine_rising({w})").values(2) == [low, float(w)]
    assert parse_schedule(f"redifine_alternate({w})").values(1, iteration=0) == [low]
    assert parse_schedule(f"redifine_alternate({w})").values(1, iteration=1) == [float(w)]
    assert parse_schedule(f"redifine_chain({w})").spec == f"chain_decay({w:g}, {low:g}, 0.5)"


def test_every_reading_is_set_by_the_usual_cfg():
    assert PRESETS["redifine_decay"] == "exp(7.5, 1, 3)"
    assert parse_schedule("redifine_decay(10)") == parse_schedule("exp(10, 1, 3)")
    assert parse_schedule("redifine_decay(5, 6)") == parse_schedule("exp(5, 1, 6)")
    assert parse_schedule("redifine(10)") == parse_schedule("exp(10, 1, 3)")
    assert PRESETS["redifine_rising"] == "linear(2.625, 7.5)"
    assert parse_schedule("redifine_rising(5)") == parse_schedule("linear(2, 5)")
    assert PRESETS["redifine_alternate"] == "cycle(2.625, 7.5)"
    assert parse_schedule("redifine_alternate(10)") == parse_schedule("cycle(3.25, 10)")
    assert PRESETS["redifine_chain"] == "chain_decay(7.5, 2.625, 0.5)"
    assert parse_schedule("redifine_chain(10, 1)") == parse_schedule("chain_decay(10, 3.25, 1)")


def test_redifine_chain_preset_decays_along_the_chain():
    s = parse_schedule("redifine_chain")
    assert s.is_chain_axis
    assert s.scale(0.3, iteration=0) == 7.5
    assert s.scale(0.3, iteration=2) == approx(2.625 + 4.875 * math.exp(-1))


def test_rising_preset_increases_over_the_denoising_steps():
    s = parse_schedule("redifine_rising")
    v = s.values(12)
    assert v[0] == 2.625 and v[-1] == 7.5 and all(a < b for a, b in zip(v, v[1:]))  # low first, then high
    assert not s.is_chain_axis
    # the mirror image of the reviewers' reading: redifine_decay decays where this one rises
    d = parse_schedule("redifine_decay").values(12)
    assert d[0] > d[-1] and v[0] < v[-1]


def test_alternate_preset_alternates_along_the_chain_starting_low():
    s = parse_schedule("redifine_alternate")
    assert s.is_chain_axis
    per_iter = [s.values(4, iteration=i) for i in range(5)]
    assert per_iter == [[2.625] * 4, [7.5] * 4, [2.625] * 4, [7.5] * 4, [2.625] * 4]
    with pytest.raises(ScheduleSyntaxError, match="at most 1 argument"):
        parse_schedule("redifine_alternate(1, 2, 3)")
    with pytest.raises(ScheduleSyntaxError, match="'W' = -1 is a guidance scale"):
        parse_schedule("redifine_rising(-1)")
    with pytest.raises(ScheduleSyntaxError, match="'rate' = -1 must be >= 0"):
        parse_schedule("redifine_chain(7.5, -1)")


@pytest.mark.parametrize("old, plain", [
    ("redifine_rising(2, 7.5)", "linear(2, 7.5)"),
    ("redifine_alternate(2, 7.5)", "cycle(2, 7.5)"),
    ("redifine_chain(7.5, 5, 0.5)", "chain_decay(7.5, 5, 0.5)"),
    ("redifine(10, 2)", "exp(10, 2, 3)"),
    ("redifine(7.5, 1, 3)", "exp(7.5, 1, 3)"),
])
def test_old_calls_whose_meaning_changed_are_refused_naming_the_plain_form(old, plain):
    with pytest.raises(ScheduleSyntaxError) as info:
        parse_schedule(old)
    reason = info.value.reason
    assert "\n" not in reason and f"meant {plain}; write {plain}" in reason
    assert "takes at most" in reason and "W" in reason
    assert parse_schedule(plain).spec == plain  # what the message says to write parses


def test_legacy_expansion_is_what_the_names_meant_before_they_took_w():
    from redifine_core.guidance import legacy_expansion

    assert legacy_expansion("redifine") == "exp(7.5, 1, 3)"
    assert legacy_expansion("redifine_rising") == "linear(2, 7.5)"
    assert legacy_expansion("redifine_alternate") == "cycle(2, 7.5)"
    assert legacy_expansion("redifine_chain") == "chain_decay(7.5, 5, 0.5)"
    assert legacy_expansion("redifine_rising(2, 7.5)") == "linear(2, 7.5)"
    assert legacy_expansion("by_iter(redifine(10), 3)") == "by_iter(exp(10, 1, 3), 3)"
    assert legacy_expansion("linear(7, 1)") == "linear(7, 1)" and legacy_expansion(7.5) == "7.5"
    with pytest.raises(ScheduleSyntaxError, match="unknown schedule form 'redifine_decay'"):
        legacy_expansion("redifine_decay")  # a name that did not exist before
    assert parse_schedule("redifine_rising").spec != legacy_expansion("redifine_rising")  # the cache keeps both


def test_every_preset_names_its_source_and_matches_the_table():
    from redifine_core.presets import PRESET_TABLE

    assert [p.name for p in PRESET_TABLE] == list(PRESETS) == [
        "redifine", "redifine_decay", "redifine_rising", "redifine_alternate", "redifine_chain"]
    for p in PRESET_TABLE:
        s = parse_schedule(p.name)
        assert s.spec == p.expansion == PRESETS[p.name]
        assert s.is_chain_axis == (p.axis == "chain")
        d = s.describe()
        assert p.source in d and "not the paper's formula" in d and "\n" not in d
        assert any(k.startswith(p.name + " |") for k in FORMS)
    assert "project" not in " ".join(p.source for p in PRESET_TABLE)


def test_describe_is_one_line_for_every_form():
    for spec in ["7.5", "1", "linear(7,1)", "cosine(7,1)", "exp(7,1,2)", "interval(5,0.2,0.8)", "keys(0:3,1:1)",
                 "cycle(1,2)", "by_iter(3,linear(2,1))", "chain_decay(7,5,1)", "redifine", "redifine_chain",
                 "redifine_rising", "redifine_alternate"]:
        d = parse_schedule(spec).describe()
        assert d and "\n" not in d
    assert "w = 5" in parse_schedule("interval(5,0.2,0.8)").describe()
    assert "no guidance" in parse_schedule("1").describe()


# --- errors: caret position and message content ------------------------------------------------------------

BAD_SPECS = [
    # spec, caret position (0-based), substrings of the message
    ("", 0, ["empty"]),
    ("   ", 0, ["empty"]),
    ("linear(7, )", 10, ["expected a number or a schedule form", "')'"]),
    ("linear(7, 1", 11, ["expected ',' or ')'", "end of the spec"]),
    ("linear(7 1)", 9, ["expected ',' or ')'", "'1'"]),
    ("linaer(7, 1)", 0, ["unknown schedule form 'linaer'", "did you mean 'linear'"]),
    ("linear 7", 7, ["expected '(' after 'linear'"]),
    ("7.5 x", 4, ["after the end of the schedule"]),
    ("lin@ear(7, 1)", 3, ["unexpected character '@'"]),
    ("linear(7, 1, 2)", 13, ["linear takes 2 argument", "got 3"]),
    ("exp(7, 1)", 8, ["exp takes 3 argument", "missing 'rate'"]),
    ("linear(-1, 2)", 7, ["linear argument 'a'", "in [0, 100]"]),
    ("cosine(3, -0.5)", 10, ["cosine argument 'b'", "in [0, 100]"]),
    ("exp(7, 1, -2)", 10, ["exp argument 'rate'", ">= 0"]),
    ("linear(1e999, 1)", 7, ["linear argument 'a'", "finite"]),
    ("interval(5, 0.2, 1.5)", 17, ["interval argument 'p1'", "[0, 1]"]),
    ("interval(5, -0.1, 0.5)", 12, ["interval argument 'p0'", "[0, 1]"]),
    ("interval(5, 0.8, 0.2)", 17, ["interval argument 'p1'", "p0"]),
    ("keys(0:7, 0.5:3, 0.5:1)", 17, ["keyframe 3", "strictly ascending"]),
    ("keys(0.6:7, 0.2:3)", 12, ["keyframe 2", "strictly ascending"]),
    ("keys(0:7, 1.5:3)", 10, ["keys argument 'p of keyframe 2'", "[0, 1]"]),
    ("keys(0:7, 1:-3)", 12, ["keys argument 'w of keyframe 2'", "in [0, 100]"]),
    ("keys(0.5)", 5, ["keyframe p:w"]),
    ("keys()", 5, ["at least one keyframe"]),
    ("keys(0: )", 8, ["keyframe's scale w"]),
    ("0.5:3", 3, ["only allowed inside keys"]),
    ("linear(0:1, 2)", 8, ["only allowed inside keys"]),
    ("linear(cosine(1, 2), 2)", 7, ["linear argument 'a' must be a number", "schedule"]),
    ("cycle()", 6, ["at least one per-step schedule"]),
    ("cycle(7, chain_decay(7, 5, 1))", 9, ["cycle item 2", "chain-axis"]),
    ("by_iter(redifine_chain)", 8, ["by_iter item 1", "chain-axis"]),
    ("redifine(7.5, 1, 3, 4)", 14, ["preset redifine takes at most 1", "redifine(W)"]),
    ("redifine_rising(2, 7.5)", 19, ["takes at most 1", "write linear(2, 7.5)"]),
    ("redifine(-2)", 9, ["redifine argument 'W'", "in [0, 100]"]),
    ("chain_decay(7, 5)", 16, ["chain_decay takes 3", "missing 'rate'"]),
    ("-linear(7, 1)", 0, ["unexpected character '-'"]),
]


@pytest.mark.parametrize("spec, pos, parts", BAD_SPECS)
def test_bad_specs_point_at_the_offending_character(spec, pos, parts):
    with pytest.raises(ScheduleSyntaxError) as info:
        parse_schedule(spec)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.position == pos
    msg = str(err)
    assert repr(spec) in msg  # quotes the spec
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"
    lines = msg.splitlines()
    # the spec is shown on its own line, the caret line underneath points at character `pos`
    shown = [i for i, line in enumerate(lines) if line.strip() and line.rstrip().endswith("^")]
    assert len(shown) == 1
    caret_line, spec_line = lines[shown[0]], lines[shown[0] - 1]
    indent = len(spec_line) - len(spec_line.lstrip(" ")) if spec.strip() else 4
    assert caret_line.index("^") - indent == pos
    if spec.strip():
        assert spec_line[indent:] == spec.replace("\t", " ").replace("\n", " ")
    # and it lists what is available
    assert "available forms" in msg and "linear(a, b)" in msg and "redifine" in msg and "keys(" in msg


def test_caret_stays_aligned_with_tabs_and_newlines():
    spec = "linear(\t7,\n -1)"
    with pytest.raises(ScheduleSyntaxError) as info:
        parse_schedule(spec)
    lines = str(info.value).splitlines()
    spec_line, caret_line = lines[1], lines[2]
    assert spec_line[caret_line.index("^")] == "-"


@pytest.mark.parametrize("spec", ["1e308", "100.5", "linear(7.5, 1000)", "keys(0:7, 1:101)", "cycle(7, 200)"])
def test_scales_above_the_documented_cfg_bound_are_refused(spec):
    from redifine_core.bounds import MAX_CFG

    with pytest.raises(ScheduleSyntaxError, match=r"guidance scale and must be in \[0, 100\]"):
        parse_schedule(spec)
    assert parse_schedule(str(MAX_CFG)).values(2) == [MAX_CFG, MAX_CFG]


@pytest.mark.parametrize("steps", [0, 10_001, 100_000_000, True, 2.0])
def test_values_refuses_step_counts_outside_the_bounds(steps):
    with pytest.raises(ValueError, match=r"steps=.* must be an integer in \[1, 10000\]"):
        parse_schedule("7.5").values(steps)


def test_the_preset_value_table_of_the_docs_is_what_the_code_computes():
    """docs/schedules.md's table of every reading at W = 7.5: per-step rows give 6 steps, chain rows iterations 0-5."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "schedules.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(redifine_\w+)`[^|]*, (steps|iterations) \| `([^`]+)` \|(.*)\|$", text, re.M)
    assert sorted(r[0] for r in rows) == sorted(n for n in PRESETS if n != "redifine")
    for name, axis, spec, cells in rows:
        s = parse_schedule(name)
        assert s.spec == spec
        got = s.values(6) if axis == "steps" else [s.values(1, iteration=i)[0] for i in range(6)]
        assert [float(c) for c in cells.split("|")] == [round(v, 3) for v in got], name
