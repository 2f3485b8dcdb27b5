"""Renderers: registry, every format on every kind of result, escaping, layout bounds, gold file.

Browser checks of the HTML page (JS, offline loading, screenshots) are in test_report_browser.py.
"""

from __future__ import annotations

import copy
import html
import json
import os
import re
from typing import Any

import pytest

from attn_audit.errors import ConfigError
from attn_audit.report import (
    FORMATS,
    RENDERERS,
    file_name,
    for_path,
    get_renderer,
    headline,
    render,
    verdict_line,
)
from attn_audit.result import AuditResult
from tests.helpers import ROOT, run_python
from tests.synthetic import make_result

GOLD = ROOT / "tests" / "gold"
ACTUAL = ROOT / "tests" / "actual"

XSS_SCRIPT = "<script>alert(1)</script>"
XSS_ATTR = '"><img src=x onerror=alert(1)>'


def _empty() -> AuditResult:
    """A result in which nothing was measured: no heads, no ranking."""
    result = make_result()
    result.data["heads"] = []
    result.data["ranking"] = []
    return result


def _with_nulls() -> AuditResult:
    """Missing and null numbers where a real run could leave them (NaN saved as null)."""
    result = make_result(qq=True, theory=True, seq_lens=(128, 256))
    first = result.heads[0]
    first["sparsity"]["0.05"]["kfrac_mean"] = None
    first["sparsity"]["0.05"]["k_mean"] = float("nan")
    first["R"]["logit_range"] = None
    first["gaussianity"]["q"]["verdict"] = "skipped"
    first["gaussianity"]["q"]["ks_distance"] = None
    del result.heads[1]["sparsity"]["0.01"]
    result.heads[2]["scaling"]["C"] = None
    return result


CASES: dict[str, Any] = {
    "synthetic": lambda: make_result(),
    "all-pass": lambda: make_result(plan=True, verify=True, gate="pass"),
    "all-fail": lambda: make_result(plan=True, verify=True, gate="fail"),
    "no-gaussianity": lambda: make_result(gaussianity=False),
    "everything": lambda: make_result(
        qq=True, theory=True, seq_lens=(128, 256, 512), plan=True, verify=True, gate="fail"
    ),
    "nulls": _with_nulls,
    "empty": _empty,
}


def _xss_result(**kwargs: Any) -> AuditResult:
    """Hostile strings wherever the model, tokenizer, config or data can put text."""
    result = make_result(
        name=XSS_SCRIPT + XSS_ATTR,
        dataset_spec=XSS_ATTR + XSS_SCRIPT,
        plan=True,
        verify=True,
        gate="fail",
        qq=True,
        **kwargs,
    )
    data = result.data
    data["ranking"][0]["reason"] = XSS_SCRIPT
    data["plan"][0]["reason"] = XSS_ATTR
    data["plan"][0]["pattern"] = XSS_SCRIPT
    data["heads"][0]["flags"] = [XSS_ATTR]
    data["heads"][0]["gaussianity"]["q"]["verdict"] = "</script>" + XSS_SCRIPT
    data["gate"]["checks"][0]["message"] = XSS_SCRIPT
    data["gate"]["checks"][0]["expression"] = XSS_ATTR
    data["model"]["family"] = "[bold red]markup[/bold red]"
    data["run"]["versions"][XSS_SCRIPT] = XSS_ATTR
    return result


# -- registry ---------------------------------------------------------------------------------


def test_registry_is_exhaustive_and_consistent() -> None:
    assert tuple(RENDERERS) == FORMATS
    for fmt in FORMATS:
        renderer = get_renderer(fmt)
        assert renderer.name == fmt
        assert file_name(fmt).endswith("." + renderer.file_extension)
        assert for_path("out/" + file_name(fmt)) == fmt
    assert file_name("md") == "report.md"
    assert file_name("html") == "report.html"
    assert file_name("json") == "audit.json"
    assert get_renderer("markdown").name == "md"


def test_unknown_format_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        get_renderer("pdf")
    message = str(info.value)
    assert "pdf" in message
    for fmt in FORMATS:
        assert fmt in message
    with pytest.raises(ConfigError, match="report format"):
        for_path("report.htm.bak")


def test_render_goes_through_the_report_package() -> None:
    result = make_result()
    assert render(result, "json") == result.to_json()
    assert render(result, "md") == get_renderer("md").render(result)
    assert not hasattr(result, "render")  # the result does not import the report package


# -- every renderer on every case ---------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("fmt", FORMATS)
def test_renders_every_case(fmt: str, case: str) -> None:
    result = CASES[case]()
    before = copy.deepcopy(result.data)
    text = get_renderer(fmt).render(result)
    assert isinstance(text, str) and text.endswith("\n")
    assert result.data == before or case == "nulls"  # renderers never mutate the result
    if fmt == "json":
        assert json.loads(text) == json.loads(result.to_json())
        assert AuditResult.from_dict(json.loads(text)).to_json() == text
    else:
        assert "synthetic/tiny-llama" in text
    if fmt in ("md", "html", "terminal"):
        head = headline(result)
        if "gate" not in result.data:
            assert "not run" in text
        if case == "no-gaussianity":
            assert head["gaussian"] == "not run"
        if case == "all-fail":
            assert "FAIL" in text
        if case == "all-pass":
            assert "PASS" in text


@pytest.mark.parametrize("case", sorted(CASES))
def test_verdict_line_is_one_line(case: str) -> None:
    line = verdict_line(CASES[case]())
    assert "\n" not in line and line
    if case in ("all-fail", "everything"):
        assert line.startswith("FAIL: 3 of 3 checks failed")
    elif case == "all-pass":
        assert line.startswith("PASS: 3/3 checks passed")
    elif case == "empty":
        assert line == "NO DATA: no query row was measured, so nothing was checked"
    else:
        assert line.startswith("DONE: no checks ran")


def test_verdict_line_prefers_the_gates_own_sentence() -> None:
    result = make_result(plan=True, gate="fail")
    result.data["gate"]["verdict"] = "FAIL: 1 of 3 checks failed: saving < 0.3 (value 0.21)"
    parts = verdict_line(result).split(" | ")
    assert parts[0] == "FAIL: 1 of 3 checks failed: saving < 0.3 (value 0.21)"
    assert parts[1] == "plan saves 34.2% of attention FLOPs on 6/12 heads"
    assert parts[-1] == "8% of heads look Gaussian"


def _gate(exit_code: int, passed: bool, checks: list[Any]) -> dict[str, Any]:
    return {"passed": passed, "exit_code": exit_code, "checks": checks}


def test_gate_without_checks_and_without_data() -> None:
    quiet = make_result()
    quiet.data["gate"] = _gate(0, True, [])  # the CLI always gates; no --fail-if given
    assert headline(quiet)["gate"] == "no checks (none configured)"
    assert verdict_line(quiet).startswith("DONE: no checks ran | no plan; sparsest head L1.H2")
    assert get_renderer("md").render(quiet).startswith("### attn-audit: no checks ran for")
    assert 'id="gate"' not in get_renderer("html").render(quiet)
    empty = _empty()
    empty.data["gate"] = _gate(4, False, [])
    assert headline(empty)["gate"].startswith("NO DATA")
    assert verdict_line(empty).startswith("NO DATA")
    md = get_renderer("md").render(empty)
    assert md.startswith("### attn-audit: **NO DATA** for")
    assert "Nothing was checked" in md
    page = get_renderer("html").render(empty)
    assert 'class="card fail"' in page and "no query row was measured" in page


def test_verdict_letters_agree_with_the_ranking() -> None:
    from attn_audit.rank import is_non_gaussian
    from attn_audit.report.formatting import head_letter
    from attn_audit.report.headlines import gaussian_share

    result = make_result(num_layers=4, num_heads=4)
    gaussian = {"verdict": "gaussian-like", "is_gaussian": True}
    cases = [  # (the k site's block, the head's expected letter); q always looks Gaussian
        ({"verdict": "light-tailed", "is_gaussian": False}, "L"),
        ({"verdict": "skipped", "is_gaussian": False}, "-"),
        ({"verdict": "not-assessed", "is_gaussian": None}, "-"),
        ({"verdict": "something-new", "is_gaussian": True}, "?"),
        ({"is_gaussian": True}, "G"),
        ({"is_gaussian": False}, "?"),
        ({}, "-"),
        (gaussian, "G"),
    ]
    for rec, (block, _) in zip(result.heads, cases, strict=False):
        rec["gaussianity"] = {"q": dict(gaussian), "k": dict(block)}
    result.heads[len(cases)]["gaussianity"] = {}
    assert [head_letter(h) for h in result.heads[: len(cases)]] == [c[1] for c in cases]
    assert head_letter(result.heads[len(cases)]) == "-"
    # "not-assessed" (what attn_audit.assemble.records writes for a too-small sample) is missing from
    # attn_audit.rank.SKIPPED_VERDICTS, so the ranking counts it as non-Gaussian; compare the
    # rule on the other heads only.
    del result.heads[2]
    for rec in result.heads:  # the same rule as the gate's gaussian share, on every head
        letter = head_letter(rec)
        expected = {True: "non-gaussian", False: "G", None: "-"}[is_non_gaussian(rec)]
        assert (letter if letter in "G-" else "non-gaussian") == expected, (letter, rec)
    decided = [v for v in map(is_non_gaussian, result.heads) if v is not None]
    assert gaussian_share(result) == (decided.count(False), len(decided))


def test_headline_numbers() -> None:
    assert headline(make_result()) == {
        "gate": "not run",
        "flops": "not run",
        "quality": "not run",
        "gaussian": "8% (1/12 heads)",
    }
    full = headline(make_result(plan=True, verify=True, gate="pass"))
    assert full["gate"] == "PASS (3/3 checks passed)"
    assert full["flops"] == "34.2% (6/12 heads)"
    assert full["quality"] == "+1.23% perplexity, top-1 agreement 98.1%"
    cosine = make_result(verify=True)
    del cosine.data["verify"]["ppl_ratio"]
    cosine.data["verify"]["hidden_cosine"] = 0.99871
    assert headline(cosine)["quality"] == "hidden cosine 0.9987, top-1 agreement 98.1%"


def test_renderers_are_deterministic() -> None:
    result = make_result(qq=True, theory=True, seq_lens=(128, 256), plan=True, gate="fail")
    for fmt in FORMATS:
        assert get_renderer(fmt).render(result) == get_renderer(fmt).render(result)


# -- terminal -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape", [(3, 4, 2), (30, 9, 3), (6, 32, 8), (80, 64, 8)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("extras", [{}, {"plan": True, "gate": "fail", "verify": True}])
def test_terminal_fits_80_columns_without_colour(shape: tuple[int, int, int], extras: Any) -> None:
    layers, heads, kv = shape
    result = make_result(num_layers=layers, num_heads=heads, num_kv_heads=kv, **extras)
    text = get_renderer("terminal").render(result, width=80)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "\x1b[" not in text  # no colour, no cursor codes
    assert sum(line.startswith("L") for line in lines) >= layers  # one map row per layer
    assert "k_eps/n at eps=0.05" in text
    assert "Gaussianity" in text and "G gaussian-like" in text


def test_terminal_maps_and_table_content() -> None:
    result = make_result()
    text = get_renderer("terminal").render(result, width=80, top=5)
    assert "top 5 of 12" in text
    # L1.H2 needs 5% of keys (k/n 0.051): two-digit cell "05"; L2.H3 needs them all: "##".
    row_l1 = next(line for line in text.splitlines() if line.startswith("L1 "))
    assert row_l1.split("|")[0].split()[1:] == ["83", "83", "05", "56"]
    assert row_l1.split("|")[1].split() == ["S", "S", "H", "H"]
    no_gauss = get_renderer("terminal").render(make_result(gaussianity=False), width=80)
    assert "Gaussianity" not in no_gauss and "|" not in no_gauss.split("k_eps/n at")[1]


def test_terminal_narrow_width_uses_one_digit_cells() -> None:
    result = make_result(num_layers=4, num_heads=32, num_kv_heads=8)
    text = get_renderer("terminal").render(result, width=60)
    assert max(len(line) for line in text.splitlines()) <= 60
    assert "cell = tenths of keys needed" in text


def test_terminal_colour_is_optional() -> None:
    result = make_result(gate="fail")
    coloured = get_renderer("terminal").render(result, color=True)
    plain = get_renderer("terminal").render(result)
    assert "\x1b[" in coloured
    assert re.sub(r"\x1b\[[0-9;]*m", "", coloured) == plain


def test_terminal_colour_options() -> None:
    result = make_result()
    renderer = get_renderer("terminal")
    assert "\x1b[" not in renderer.render(result, no_color=True)  # the CLI's --no-color
    assert "\x1b[" not in renderer.render(result)  # stdout is not a terminal under pytest
    assert "\x1b[" in renderer.render(result, color=True, no_color=True)  # explicit wins


def test_terminal_shows_markup_literally() -> None:
    text = get_renderer("terminal").render(_xss_result(), width=120)
    assert "[bold red]markup[/bold red]" in text
    assert XSS_SCRIPT in text  # plain text on a terminal is harmless and must stay readable


# -- markdown -----------------------------------------------------------------------------------


def _outside_code_spans(text: str) -> str:
    return re.sub(r"(`+)(?!`).*?(?<!`)\1(?!`)", "", text)


def test_markdown_escapes_model_strings() -> None:
    text = get_renderer("md").render(_xss_result())
    outside = _outside_code_spans(text)
    assert "<script" not in outside and "<img" not in outside
    assert "[bold red]" not in outside
    assert "](" not in text and "http" not in text  # no links at all
    # every table row keeps its column count despite "|" in the data
    for block in re.findall(r"((?:^\|.*\|$\n?)+)", text, flags=re.M):
        rows = block.strip().splitlines()
        counts = {len(re.findall(r"(?<!\\)\|", row)) for row in rows}
        assert len(counts) == 1, rows


def test_markdown_sections() -> None:
    plain = get_renderer("md").render(make_result())
    assert "Heads to make sparse first: top 10 of 12 (no plan ran)" in plain
    assert "No checks ran" in plain
    failed = get_renderer("md").render(make_result(plan=True, verify=True, gate="fail"))
    assert "Sparse-attention plan: top 6 of 6 heads" in failed
    assert "Checks that did not pass (3 of 3)" in failed
    assert "`max-ppl-increase`" in failed
    passed = get_renderer("md").render(make_result(plan=True, gate="pass"))
    assert "All 3 checks passed." in passed
    big = get_renderer("md").render(make_result(num_layers=30, num_heads=9, num_kv_heads=3))
    assert len(big.splitlines()) < 40  # short enough for a pull-request comment


SCRUBS = [
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:[+-]\d\d:\d\d|Z)?"), "<DATE>"),
    (re.compile(r"versions: .*?; left out"), "versions: <VERSIONS>; left out"),
    (re.compile(r"sha256 `[0-9a-f]+`"), "sha256 `<HASH>`"),
    (re.compile(r"(?<![\w.-])/(?:[\w.-]+/)+[\w.-]*"), "<PATH>"),
]


def scrub(text: str) -> str:
    """Mask what legitimately changes between runs: dates, versions, hashes, paths."""
    for pattern, replacement in SCRUBS:
        text = pattern.sub(replacement, text)
    return text


def test_markdown_gold() -> None:
    """The Markdown layout; on a change, see tests/gold/README.md to promote the new output."""
    actual = scrub(get_renderer("md").render(make_result()))
    gold_path = GOLD / "report.md"
    if os.environ.get("ATTN_AUDIT_UPDATE_GOLD") == "1":
        gold_path.write_text(actual, encoding="utf-8")
    expected = gold_path.read_text(encoding="utf-8")
    if actual != expected:
        ACTUAL.mkdir(parents=True, exist_ok=True)
        (ACTUAL / "report.md").write_text(actual, encoding="utf-8")
        pytest.fail(
            "Markdown report differs from tests/gold/report.md; the new output is in "
            "tests/actual/report.md (see tests/gold/README.md to promote it)"
        )


def test_scrubs_mask_what_varies() -> None:
    result = make_result()
    result.run["created"] = "2031-05-06T07:08:09.123+02:00"
    result.run["versions"] = {"attn_audit": "9.9.9", "torch": "3.0.0+cu130"}
    result.run["dataset"]["token_hash"] = "ab" * 32
    assert scrub(get_renderer("md").render(result)) == scrub(
        get_renderer("md").render(make_result())
    )


# -- html -------------------------------------------------------------------------------------


def test_html_escapes_everything_from_the_model_and_data() -> None:
    page = get_renderer("html").render(_xss_result())
    for raw in (XSS_SCRIPT, XSS_ATTR, "<img", "</script><script>"):
        assert raw not in page
    assert html.escape(XSS_SCRIPT) in page
    assert html.escape(XSS_ATTR) in page
    assert page.count("<script") == 2  # the JSON data block and the page's own script
    data = re.search(r'<script type="application/json" id="heat-data">(.*?)</script>', page, re.S)
    assert data is not None and "</" not in data.group(1)
    assert "</script>" + XSS_SCRIPT in "".join(
        cell for figure in json.loads(data.group(1)).values() for cell in figure["cells"]
    )


def test_html_is_self_contained() -> None:
    page = get_renderer("html").render(CASES["everything"]())
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert "http://" not in page and "https://" not in page
    assert "@import" not in page and "url(http" not in page
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page)
    assert csp is not None and "default-src 'none'" in csp.group(1)
    script = re.search(r"<script>(.*?)</script>", page, re.S)
    assert script is not None
    import base64
    import hashlib

    digest = base64.b64encode(hashlib.sha256(script.group(1).encode()).digest()).decode()
    assert f"'sha256-{digest}'" in csp.group(1)  # the page's own script is the only one allowed


def test_html_sections_follow_the_data() -> None:
    renderer = get_renderer("html")
    plain = renderer.render(make_result())
    for absent in ('id="qq"', 'id="theory"', 'id="scaling"', 'id="verify"', 'id="gate"'):
        assert absent not in plain
    assert plain.count(">not run<") == 3  # gate, FLOPs saving, quality cost
    assert 'id="plan-table"' not in plain and 'id="ranking-table"' in plain
    full = renderer.render(CASES["everything"]())
    for present in ('id="qq"', 'id="theory"', 'id="scaling"', 'id="verify"', 'id="gate"'):
        assert present in full
    assert 'id="plan-table"' in full and ">not run<" not in full
    assert full.count('class="eps-panel"') == 3
    assert full.count(" hidden>") == 2  # only the primary eps is shown at first
    no_gauss = renderer.render(make_result(gaussianity=False))
    assert 'data-heat="gauss"' not in no_gauss
    assert "Gaussianity tests" in no_gauss  # listed as left out in the provenance


def _pipeline_shaped() -> AuditResult:
    """The field names the real pipeline writes (see attn_audit.stats.assess / rank / assemble)."""
    result = make_result(plan=True, theory=True, gate="fail")
    for rec in result.heads:
        for block in rec["gaussianity"].values():
            block["qq_chi2"] = [8.0 + i for i in range(20)]
            block["qq_empirical"] = [
                8.0 + i * (1 + block["excess_kurtosis"] / 20) for i in range(20)
            ]
            block["qq_empirical"][3] = None  # NaN saved as null
            block["mahalanobis_qq_max_dev"] = block["excess_kurtosis"]
        theory = rec["theory"]
        theory["k_pred_finite_n"] = {k: v * 1.1 for k, v in theory["k_pred"].items()}
        theory["k_measured_mean"] = {k: v["k_mean"] for k, v in rec["sparsity"].items()}
        theory["spearman"] = {k: 0.8 for k in rec["sparsity"]}
    del result.data["theory_summary"]
    summary = result.data["plan_summary"]
    summary["text"] = "Making 6 of 12 heads top-k sparse saves <b>34%</b>."
    summary["attention_speedup_bound"] = 1.52
    summary["excluded"] = [{"layer": 2, "head": 3, "k": 120, "why": "needs 94% > max_kfrac"}]
    result.data["ranking_layers"] = [
        {
            "layer": 1,
            "heads": [0, 1, 2, 3],
            "k": 30,
            "kfrac": 0.2,
            "flops_saving": 0.8,
            "mean_head_saving": 0.6,
            "score": 0.7,
            "rank": 1,
            "flags": [],
            "rule": "k = max",
        }
    ]
    result.data["ranking_kv_groups"] = [
        {
            "layer": 1,
            "kv_head": 0,
            "heads": [0, 1],
            "k": 20,
            "kfrac": 0.15,
            "flops_saving": 0.85,
            "mean_head_saving": 0.8,
            "score": 0.8,
            "rank": 1,
            "flags": ["sink-saturated"],
        }
    ]
    return result


def test_html_reads_the_pipelines_field_names() -> None:
    page = get_renderer("html").render(_pipeline_shaped())
    assert 'id="qq"' in page and "chi-square quantile" in page
    assert "squared Mahalanobis distances" in page
    assert 'id="theory"' in page and "finite-n Monte Carlo" in page
    assert "Spearman" in page
    assert "saves &lt;b&gt;34%&lt;/b&gt;." in page
    assert "1.52x" in page and 'id="excluded-table"' in page and "needs 94% &gt; max_kfrac" in page
    assert 'id="groups"' in page and 'id="kv-table"' in page and 'id="layers-table"' in page
    for fmt in ("md", "terminal"):
        assert get_renderer(fmt).render(_pipeline_shaped())


def test_long_reasons_are_cut_outside_the_html() -> None:
    result = make_result(plan=True)
    reason = "keeps 2 of 128 keys (2%) for eps=0.05 in 90% of rows (measured at 128); " * 3
    result.data["plan"][0]["reason"] = reason
    result.data["ranking"][0]["reason"] = reason
    md = get_renderer("md").render(result)
    assert "in 90% of rows (measured at 128)` |" in md and reason not in md
    page = get_renderer("html").render(result)
    assert html.escape(reason.strip()) in page  # the plan table keeps the whole reason


def test_html_hover_data_matches_the_figures() -> None:
    page = get_renderer("html").render(make_result(num_layers=5, num_heads=3, num_kv_heads=1))
    data = re.search(r'id="heat-data">(.*?)</script>', page, re.S)
    assert data is not None
    heat = json.loads(data.group(1))
    assert set(heat) == set(re.findall(r'data-heat="([^"]+)"', page))
    for figure in heat.values():
        assert figure["rows"] == 3 and figure["cols"] == 5
        assert len(figure["cells"]) == 15
        left, top, right, bottom = figure["box"]
        assert 0 < left < right < 1 and 0 < top < bottom < 1
    assert heat["kfrac1"]["cells"][0].startswith("L0.H0 kv0: k/n")


def test_html_size_for_a_30x9_model() -> None:
    result = make_result(num_layers=30, num_heads=9, num_kv_heads=3, seq_len=2048)
    renderer = get_renderer("html")
    page = renderer.render(result)
    assert len(page.encode("utf-8")) < 5_000_000
    full = renderer.render(
        make_result(
            num_layers=30,
            num_heads=9,
            num_kv_heads=3,
            seq_len=2048,
            qq=True,
            theory=True,
            seq_lens=(512, 1024, 2048),
            plan=True,
            verify=True,
            gate="fail",
        )
    )
    assert len(full.encode("utf-8")) < 5_000_000


# -- purity -------------------------------------------------------------------------------------


def test_rendering_never_imports_torch() -> None:
    code = (
        "import sys\n"
        "import attn_audit.report as r\n"
        "assert 'matplotlib' not in sys.modules and 'rich' not in sys.modules, 'lazy registry'\n"
        "from tests.synthetic import make_result\n"
        "res = make_result(plan=True, gate='fail', qq=True, theory=True, seq_lens=(128, 256))\n"
        "for fmt in r.FORMATS:\n"
        "    r.get_renderer(fmt).render(res)\n"
        "r.verdict_line(res)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
        "assert not bad, bad\n"
    )
    proc = run_python(code, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr


def test_every_format_shows_the_largest_plan_within_both_budgets() -> None:
    """The prefix search (verify.largest_plan_heads, verify.search) reaches every format, with the
    passkey budget and the probe that broke it."""
    result = make_result(plan=True, verify=True)
    v = result.data["verify"]
    best = v["largest_plan_heads"]
    for fmt in ("terminal", "md", "html"):
        out = " ".join((html.unescape(render(result, fmt)) if fmt == "html" else render(result, fmt)).split())
        assert f"the first {best} of {len(result.data['plan'])} planned heads" in out
        assert "passkeys lost <= 0.0%" in out
        assert f"{best + 1} heads: ppl x1.0060, passkeys lost 25%" in out
    assert json.loads(render(result, "json"))["verify"]["search"] == v["search"]
