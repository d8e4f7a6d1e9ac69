"""The package's import boundaries, read from the source (ast), so a violation fails before anything runs.

- The layers, top to bottom (README "What runs where"): entry (`__main__`) > orchestrator/ (runner, watchdog: loads
  the stages by string) > the stages > verl_ext/ (all verl knowledge) > data/'s libraries > contract/ (stage_api,
  keys, manifest, artifacts, procs, tracking, recipes) > the libraries (losses, models, scoring, chatml). No module
  imports a higher layer, function-level imports included, and the module graph has no cycle.

- verl is imported ONLY under `eksft_pipeline/verl_ext/`: when verl changes, that package is the one place to
  re-read. The allow-list outside it is empty on purpose: everything that needs verl's code (config composition
  and dataclass validation, the trainers, the rollout, the platform shim) lives in verl_ext, and the stages use
  verl otherwise only through its public command lines (`python -m verl.model_merger`) and Hydra config tree
  (`pkg://verl.trainer.config`), which are strings, not imports.
- The loss library (`losses/`) imports no trainer, no stage and no verl: losses are small pure modules.
- `data/` imports no trainer and no verl.
- The stage packages (sft, rl, eval, analysis, export) do not import each other: stages hand off through the run
  directory's manifest. What two stages share is a library package below them: `data/` (chat template, eval
  sets), `scoring/` (the reward RL and eval both use), `contract/` (keys, artifacts), `losses/`, `models/`.
- `verl_ext/` sits below the stages: it imports no stage package (the stages launch it or call its validators).
- `scoring/` imports no stage package and no verl (verl calls it by name: `pkg://eksft_pipeline.scoring.reward`).
- `models/` imports no `data/` (what both need, the ChatML text, is in `eksft_pipeline/chatml.py`, which imports
  nothing of the package).
- `scripts/` (entry points and scripts/devtools) import the package's public names only, and no verl: what needs
  verl's code lives in verl_ext (e.g. verl_ext/sft_bench.py for scripts/bench_sft_step.py).
- verl_ext's inventory (its `__init__` docstring) names every module of it that imports verl, and every file it
  lists outside verl_ext exists: a verl upgrade starts from that list.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "eksft_pipeline"
SCRIPTS = PKG.parent / "scripts"
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
    forbidden = ("verl", "eksft_pipeline.verl_ext", "eksft_pipeline.contract", "eksft_pipeline.orchestrator", "ray",
                 "eksft_pipeline.data") + tuple(
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


def test_models_import_no_data_and_chatml_imports_nothing_of_the_package():
    bad = _violations(_modules("models"), lambda m: _is(m, "eksft_pipeline.data"))
    assert not bad, "models/ imports data/ (put what both need below both, like eksft_pipeline/chatml.py):\n" + "\n".join(bad)
    assert not _violations([PKG / "chatml.py"], lambda m: _is(m, "eksft_pipeline"))


def _private(mod: str) -> bool:
    return _is(mod, "eksft_pipeline") and any(part.startswith("_") and part != "__future__" for part in mod.split("."))


def test_scripts_import_no_verl_and_only_public_names():
    scripts = sorted(SCRIPTS.rglob("*.py"))
    assert len(scripts) >= 5, "no scripts found"
    bad = _violations(scripts, lambda m: _is(m, "verl") or _private(m))
    assert not bad, ("scripts/ imports verl or a private name of the package (route verl through "
                     "eksft_pipeline/verl_ext, use public names):\n" + "\n".join(bad))


def test_checker_flags_a_private_name_and_verl_in_a_script():
    src = "from eksft_pipeline.verl_ext.sft_trainer import _flat\nimport verl.utils.fsdp_utils\n"
    mods = [m for _, m in _imports(SCRIPTS / "probe.py", source=src)]
    assert any(_private(m) for m in mods) and any(_is(m, "verl") for m in mods)
    assert not _private("eksft_pipeline.verl_ext.sft_bench.timed_sft_steps")


def test_verl_inventory_names_every_verl_importing_module_and_existing_files():
    doc = ast.get_docstring(ast.parse((PKG / "verl_ext" / "__init__.py").read_text()))
    patched = doc.split("Patched or private verl APIs", 1)[1].split("Files OUTSIDE this package", 1)[0]
    listed = {line.split()[0] for line in patched.splitlines() if line[:4] == "    " and line[4:5].isalpha()}
    importing = {p.stem for p in _modules("verl_ext") if p.stem != "__init__" and _violations([p], lambda m: _is(m, "verl"))}
    assert importing and not importing - listed, f"verl_ext modules importing verl missing from the inventory: {importing - listed}"
    outside = doc.split("Files OUTSIDE this package", 1)[1].split("\n\n", 1)[0]
    files = [line.split()[0] for line in outside.splitlines()[1:] if line[:4] == "    " and line[4:5].isalpha()]
    assert len(files) >= 10
    for f in files:
        base = PKG.parent if f.startswith(("recipes/", "scripts/")) else PKG
        assert list(base.glob(f)), f"the verl inventory lists {f}, which does not exist"


# ---- the layers -------------------------------------------------------------------------------------------------

LAYERS = ("library", "contract", "data", "verl_ext", "stage", "orchestrator", "entry")  # bottom to top
STAGE_MODULES = {"eksft_pipeline.data.stage", "eksft_pipeline.data.tool_use.stage"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(mod: str) -> str | None:
    """The layer of a module of the package (None: not the package's)."""
    if not _is(mod, "eksft_pipeline"):
        return None
    parts = mod.split(".")
    top = parts[1] if len(parts) > 1 else ""
    if mod == "eksft_pipeline.__main__":
        return "entry"
    if top == "orchestrator":
        return "orchestrator"
    if top in STAGE_PACKAGES or any(_is(mod, s) for s in STAGE_MODULES):
        return "stage"
    if top == "verl_ext":
        return "verl_ext"
    if top == "data":
        return "data"
    if top == "contract":
        return "contract"
    return "library"  # losses, models, scoring, chatml, the package's __init__


def _graph() -> dict[str, set[str]]:
    names = {_module_name(p): p for p in _modules()}
    graph = {}
    for name, p in names.items():
        # `from . import sibling` names the parent package, which is already importing: not an edge
        graph[name] = {m for _, m in _imports(p) if m in names and m != name and not name.startswith(m + ".")}
    return graph


def _upward(graph: dict[str, set[str]]) -> list[str]:
    rank = {name: i for i, name in enumerate(LAYERS)}
    return [f"{a} ({layer_of(a)}) imports {b} ({layer_of(b)})" for a, deps in sorted(graph.items()) for b in sorted(deps)
            if rank[layer_of(b)] > rank[layer_of(a)]]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                elif nxt in on:
                    low[v] = min(low[v], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_every_module_has_a_layer_and_each_layer_is_populated():
    graph = _graph()
    seen = {layer_of(m) for m in graph}
    assert seen == set(LAYERS), f"layers with no module: {set(LAYERS) - seen}"
    assert layer_of("eksft_pipeline.orchestrator.runner") == "orchestrator"
    assert layer_of("eksft_pipeline.data.tool_use.stage") == "stage" and layer_of("eksft_pipeline.data.split") == "data"


def test_no_module_imports_a_higher_layer():
    bad = _upward(_graph())
    assert not bad, ("a lower layer imports a higher one (layers, bottom to top: " + " < ".join(LAYERS) + "):\n"
                     + "\n".join(bad))


def test_the_orchestrator_is_imported_only_by_the_entry_point():
    users = sorted(a for a, deps in _graph().items() for b in deps
                   if layer_of(b) == "orchestrator" and layer_of(a) != "orchestrator")
    assert users == ["eksft_pipeline.__main__"]


def test_the_module_graph_has_no_cycle():
    assert not _cycles(_graph())


def test_layer_and_cycle_checkers_catch_a_planted_violation():
    """The checkers themselves, on a graph with a contract module importing the runner and a two-module cycle."""
    graph = {"eksft_pipeline.contract.keys": {"eksft_pipeline.orchestrator.runner"},
             "eksft_pipeline.orchestrator.runner": {"eksft_pipeline.contract.keys"},
             "eksft_pipeline.losses.base": set()}
    assert _upward(graph) == ["eksft_pipeline.contract.keys (contract) imports eksft_pipeline.orchestrator.runner "
                              "(orchestrator)"]
    assert _cycles(graph) == [["eksft_pipeline.contract.keys", "eksft_pipeline.orchestrator.runner"]]


# ---- verl knowledge outside verl_ext: the inventory against a grep ----------------------------------------------

# what a file knows of verl when its text names one of these: verl's config keys, environment variables, files on
# disk, its command lines, its source files (a citation of verl/<sub>/... as the reference for what is reproduced)
VERL_MARKERS = re.compile(
    r"actor_rollout_ref|global_step_|latest_checkpointed_iteration|verl\.model_merger|pkg://verl|max_token_len_per_gpu"
    r"|VERL_[A-Z_]+|trainer\.logger|model_world_size_|custom_reward_function|micro_batch_size_per_gpu"
    r"|(?:^|[^/\w])verl/(?:trainer|workers|utils|experimental|models|third_party)/"
)
REPO = PKG.parent


def _inventory_outside() -> list[str]:
    doc = ast.get_docstring(ast.parse((PKG / "verl_ext" / "__init__.py").read_text()))
    outside = doc.split("Files OUTSIDE this package", 1)[1].split("\n\n", 1)[0]
    return [line.split()[0] for line in outside.splitlines()[1:] if line[:4] == "    " and line[4:5].isalpha()]


def _listed_files(entries: list[str]) -> set[Path]:
    out = set()
    for f in entries:
        base = REPO if f.startswith(("recipes/", "scripts/")) else PKG
        out |= {p.resolve() for p in base.glob(f)}
    return out


def _verl_knowing_files() -> list[Path]:
    files = [p for p in _modules() if "verl_ext" not in p.relative_to(PKG).parts]
    files += sorted(SCRIPTS.rglob("*.py")) + sorted((REPO / "recipes").rglob("*.yaml"))
    return [p for p in files if VERL_MARKERS.search(p.read_text())]


def test_verl_inventory_lists_every_file_outside_verl_ext_that_names_verl_keys_or_files():
    found = _verl_knowing_files()
    assert len(found) >= 10, "the grep found almost nothing: is VERL_MARKERS still right?"
    listed = _listed_files(_inventory_outside())
    missing = [str(p.relative_to(REPO)) for p in found if p.resolve() not in listed]
    assert not missing, ("files outside verl_ext that name verl's keys/files but are missing from verl_ext/__init__.py's "
                         "inventory ('Files OUTSIDE this package'):\n" + "\n".join(missing))


def test_verl_marker_grep_sees_keys_env_and_source_citations():
    for text in ("actor_rollout_ref.rollout.n", "VERL_FILE_LOGGER_PATH", "see verl/trainer/ppo/core_algos.py",
                 "trainer.logger=[console]"):
        assert VERL_MARKERS.search(text), text
    assert not VERL_MARKERS.search("recipes/verl/dapo.yaml composes on top")
