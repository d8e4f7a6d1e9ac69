"""Every recipe value names its source next to it (issue 26, item 5). The convention, checked line by line here:

A *value line* is a YAML line ``key: value`` with a value on the line (a scalar or a flow list / map), in
recipes/method, recipes/model, recipes/verl (with dapo_platform) and recipes/config.yaml -- the files that set
training, RL and evaluation hyper-parameters. (recipes/cluster, stage, tracking and benchmarks set hardware, stage
lists, trackers and benchmark files: no hyper-parameter, not checked.) Exempt: the Hydra composition (``defaults:``,
``hydra:``) and values that only point at another key (``${...}``: the source sits where the value is set).

Each value line carries ``src: <source>`` either in its own trailing comment (``lr: 1.0e-5  # src: authors'
eksft.sh:L10``), or in the comment lines directly above it (no blank line between), or on a block header above it
(``optim:  # src: ...`` covers every value nested under it). ``<source>`` starts with one of

    paper ...                  the EKSFT paper (say where: ``paper App. H``, ``paper Table 8``)
    authors' <file>:L<n>       the authors' code, github.com/MINE-USTC/EKSFT (file and line, e.g. eksft.sh:L62)
    DAPO ...                   the DAPO paper (Yu et al. 2025)
    verl ...                   verl: its DAPO recipe scripts or its defaults
    baseline <method> ...      a compared method's own publication or script (PSFT, ASFT, DFT, IW-SFT)
    assumption (<why>)         a choice of this project; the parenthesis says why
    setup ...                  not a hyper-parameter: names, paths, data columns, logging, checkpointing, memory /
                               throughput knobs that leave the maths unchanged

Several sources are separated by commas or semicolons (``# src: DAPO, verl``); every ``authors'`` must name a
file:line and every ``assumption`` a reason in parentheses.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from eksft_pipeline.contract.recipes import recipes_dir

RECIPES = recipes_dir()
CHECKED = sorted([*(RECIPES / "method").glob("*.yaml"), *(RECIPES / "model").glob("*.yaml"),
                  *(RECIPES / "verl").rglob("*.yaml"), RECIPES / "config.yaml"])
EXEMPT_TOP = ("defaults", "hydra")

KEY = re.compile(r"^(\s*)([A-Za-z0-9_+@./\-]+):(?:\s+(.*))?$")
KINDS = re.compile(r"^(paper\b|authors' \S+:L\d+|DAPO\b|verl\b|baseline \S+|assumption \(|setup\b)")


def _split_comment(text: str) -> tuple[str, str]:
    """(value, comment) of the rest of a line: the comment starts at a '#' after whitespace outside quotes."""
    quote = None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i].strip(), text[i + 1 :].strip()
    return text.strip(), ""


def source_problem(comment: str) -> str | None:
    """None when `comment` holds a well-formed `src:` tag, else what is wrong with it."""
    if "src:" not in comment:
        return "no `src:`"
    src = comment.split("src:", 1)[1].strip()
    if not KINDS.match(src):
        return f"`src: {src[:40]}` starts with none of paper / authors' <file>:L<n> / DAPO / verl / baseline / " \
               "assumption (why) / setup"
    if "authors'" in src and not re.search(r"authors' \S+:L\d+", src):
        return f"`src: {src[:40]}`: authors' needs <file>:L<n>"
    if re.search(r"\bassumption\b(?! \()", src):
        return f"`src: {src[:40]}`: assumption needs (why)"
    return None


def unsourced(path: Path) -> list[str]:
    """`file:line key` of every value line of `path` without a well-formed source (module docstring)."""
    bad: list[str] = []
    stack: list[tuple[int, str, bool]] = []  # (indent, key, header carries a source)
    above: list[str] = []  # the comment lines directly above the current line
    for no, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped:
            above = []
            continue
        if stripped.startswith("#"):
            above.append(stripped[1:].strip())
            continue
        m = KEY.match(line)
        if m is None or stripped.startswith("-"):
            above = []
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3) or ""
        while stack and stack[-1][0] >= indent:
            stack.pop()
        value, comment = _split_comment(rest)
        own = " ".join([*above, comment])
        above = []
        path_keys = [k for _, k, _ in stack] + [key]
        if path_keys[0] in EXEMPT_TOP:
            stack.append((indent, key, True))
            continue
        if not value:  # a block header
            stack.append((indent, key, source_problem(own) is None))
            continue
        if value.startswith("${") and value.endswith("}"):
            continue
        if any(tagged for _, _, tagged in stack):
            continue
        problem = source_problem(own)
        if problem:
            bad.append(f"{path.relative_to(RECIPES.parent)}:{no} {'.'.join(path_keys)}: {problem}")
    return bad


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_recipe_value_names_its_source(path):
    bad = unsourced(path)
    assert not bad, "recipe values without a source comment (tests/contract/test_recipe_sources.py):\n" + "\n".join(bad)


def test_the_checker_catches_a_value_without_a_source(tmp_path, monkeypatch):
    monkeypatch.setattr(__import__(__name__), "RECIPES", tmp_path)
    f = tmp_path / "r" / "x.yaml"
    f.parent.mkdir()
    f.write_text(
        "defaults:\n  - a\n"
        "optim:\n"
        "  lr: 1.0e-5  # src: authors' eksft.sh:L10\n"
        "  # src: paper App. H\n"
        "  ratio: 0.1\n"
        "\n"
        "  wd: 0.1\n"  # no source
        "  clip: 1.0  # the authors' script\n"  # a comment, but no src:
        "  warm: 0.01  # src: authors' script\n"  # no file:line
        "  seed: 0  # src: assumption\n"  # no reason
        "  other: ${x.y}\n"  # points elsewhere
        "data:  # src: setup (paths)\n"
        "  path: a/b  # no tag needed: the header has one\n"
        "  nested:\n"
        "    deep: 3\n"
        "name: \"#not a comment\"  # src: setup\n"
        "grab: bag  # src: vibes\n"
    )
    bad = unsourced(f)
    assert [b.split(" ", 1)[1].split(":", 1)[0] for b in bad] == ["optim.wd", "optim.clip", "optim.warm", "optim.seed",
                                                                   "grab"]
    assert "authors' <file>:L<n>" in bad[2] and "assumption (why)" in bad[3]
