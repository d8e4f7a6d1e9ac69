"""The package's import boundaries, read from the source (ast), so a violation fails before anything runs.

- verl is imported ONLY under `eksft_pipeline/verl_ext/`: when verl changes, that package is the one place to
  re-read. The allow-list outside it is empty on purpose: everything that needs verl's code (config composition
  and dataclass validation, the trainers, the rollout, the platform shim) lives in verl_ext, and the stages use
  verl otherwise only through its public command lines (`python -m verl.model_merger`) and Hydra config tree
  (`pkg://verl.trainer.config`), which are strings, not imports.
- The loss library (`losses/`) imports no trainer, no stage and no verl: losses are small pure modules.
- `data/` imports no trainer and no verl.
- The stage packages (sft, rl, eval, analysis, export) do not import each other: stages hand off through the run
  directory's manifest. What two stages share is a library package below them: `data/` (chat template, eval
  sets), `scoring/` (the reward RL and eval both use), `pipeline/` (keys, artifacts), `losses/`, `models/`.
- `verl_ext/` sits below the stages: it imports no stage package (the stages launch it or call its validators).
- `scoring/` imports no stage package and no verl (verl calls it by name: `pkg://eksft_pipeline.scoring.reward`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "eksft_pipeline"
STAGE_PACKAGES = ("sft", "rl", "eval", "analysis", "export")


def _imports(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `path` (or `source` as if it were `path`), including
    imports inside functions; a relative import is resolved against the module's package."""
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = parts[: len(parts) - node.level]  # a.b.c (or a.b.__init__), level 1 -> a.b
                mod = ".".join(base + ((node.module,) if node.module else ()))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
    return out


def _modules(under: str = "") -> list[Path]:
    root = PKG / under if under else PKG
    return sorted(root.rglob("*.py"))


def _violations(paths, bad) -> list[str]:
    return [f"{p.relative_to(PKG.parent)}:{line} imports {mod}" for p in paths for line, mod in _imports(p) if bad(mod)]


def _is(mod: str, prefix: str) -> bool:
    return mod == prefix or mod.startswith(prefix + ".")


def test_verl_is_imported_only_in_verl_ext():
    outside = [p for p in _modules() if "verl_ext" not in p.relative_to(PKG).parts]
    assert outside, "no modules found"
    bad = _violations(outside, lambda m: _is(m, "verl"))
    assert not bad, "verl imported outside eksft_pipeline/verl_ext (move the code there):\n" + "\n".join(bad)


def test_loss_library_imports_no_trainer_and_no_verl():
    forbidden = ("verl", "eksft_pipeline.verl_ext", "eksft_pipeline.pipeline", "ray", "eksft_pipeline.data") + tuple(
        f"eksft_pipeline.{s}" for s in STAGE_PACKAGES)
    bad = _violations(_modules("losses"), lambda m: any(_is(m, f) for f in forbidden))
    assert not bad, "\n".join(bad)


def test_data_imports_no_trainer():
    forbidden = ("verl", "eksft_pipeline.verl_ext", "eksft_pipeline.sft", "eksft_pipeline.rl", "eksft_pipeline.eval",
                 "eksft_pipeline.losses")
    bad = _violations(_modules("data"), lambda m: any(_is(m, f) for f in forbidden))
    assert not bad, "\n".join(bad)


def test_scoring_imports_no_stage_and_no_verl():
    forbidden = ("verl", "eksft_pipeline.verl_ext") + tuple(f"eksft_pipeline.{s}" for s in STAGE_PACKAGES)
    bad = _violations(_modules("scoring"), lambda m: any(_is(m, f) for f in forbidden))
    assert not bad, "\n".join(bad)


def test_verl_ext_imports_no_stage_package():
    forbidden = tuple(f"eksft_pipeline.{s}" for s in STAGE_PACKAGES)
    bad = _violations(_modules("verl_ext"), lambda m: any(_is(m, f) for f in forbidden))
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("pkg", STAGE_PACKAGES)
def test_stage_packages_do_not_import_each_other(pkg):
    others = [f"eksft_pipeline.{s}" for s in STAGE_PACKAGES if s != pkg]
    bad = _violations(_modules(pkg), lambda m: any(_is(m, o) for o in others))
    assert not bad, f"stage package {pkg!r} imports another stage's package (hand off through files):\n" + "\n".join(bad)


def test_checker_sees_function_level_and_relative_imports():
    """The checker itself: an import inside a function and a relative import are both resolved."""
    src = "def f():\n    from verl.utils import config\n\nfrom ..eval import metrics\n"
    mods = [m for _, m in _imports(PKG / "rl" / "probe.py", source=src)]
    assert "verl.utils" in mods and "eksft_pipeline.eval" in mods and "eksft_pipeline.eval.metrics" in mods
