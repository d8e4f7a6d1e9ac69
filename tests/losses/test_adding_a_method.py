"""Adding a baseline loss touches three things (README, "Adding a method"): the loss module (the class, registered),
its recipe (`recipes/method/<name>.yaml`) and its tests. This test does exactly that with a loss defined here: it
registers the class, writes the recipe into a copy of `recipes/`, and then, with no other edit, the method composes
through `method=<name>`, its verl SFT config validates, the trainer's head resolution and block checks accept it,
and the SFT memory estimate counts what the loss's training pass does (measured as in test_loss_facts.py).
"""

from __future__ import annotations

import shutil

import pytest
from loss_probe import measured_facts

from eksft_pipeline.contract import recipes as recipe_cfg
from eksft_pipeline.contract.keys import known_methods, method_tag
from eksft_pipeline.contract.manifest import Manifest
from eksft_pipeline.contract.stage_api import StageContext
from eksft_pipeline.losses import REGISTRY, LinearTokenLoss, available_losses, get_loss
from eksft_pipeline.losses.base import denom, nonneg

NAME = "test_entropy_bonus_sft"


class EntropyBonusSFT(LinearTokenLoss):
    """A made-up baseline: loss = mean_t CE(t) - lambda_H · mean_t H(t) over all N valid tokens (no reference)."""

    name = NAME
    PARAMS = {"lambda_entropy": nonneg("weight of the entropy bonus on every token", 0.1)}

    @property
    def selected_fraction(self) -> float:
        return 1.0 if self.params["lambda_entropy"] else 0.0

    def coefficients(self, token, scalars, valid):
        w = valid.float() / denom(scalars["n_tokens"])
        lam = self.params["lambda_entropy"]
        return w, (w * -lam if lam else None), None


RECIPE = f"""# A made-up baseline (tests/losses/test_adding_a_method.py).
name: {NAME}
loss: {NAME}
params:
  lambda_entropy: 0.2
selection_scope: global_batch
"""


@pytest.fixture
def added_method(tmp_path, monkeypatch):
    """The three touches: the class registered, the recipe next to the others (in a copy of recipes/)."""
    monkeypatch.setitem(REGISTRY, NAME, EntropyBonusSFT)
    recipes = tmp_path / "recipes"
    shutil.copytree(recipe_cfg.recipes_dir(), recipes)
    (recipes / "method" / f"{NAME}.yaml").write_text(RECIPE)
    monkeypatch.setattr(recipe_cfg, "RECIPES_DIR", recipes)
    return recipes


def test_a_new_baseline_needs_only_its_module_recipe_and_tests(added_method, tmp_path):
    from eksft_pipeline.sft.stage import SFTStage

    assert NAME in available_losses() and NAME in known_methods()
    cfg = recipe_cfg.compose_pipeline(f"method={NAME}", "model=qwen3-8b", "cluster=8gpu")
    assert method_tag(cfg.method) == NAME and cfg.method.params.lambda_entropy == 0.2
    stage = SFTStage()
    ctx = StageContext(cfg=cfg, run_dir=tmp_path / "run", manifest=Manifest(tmp_path / "run"), key=stage.key(cfg),
                       dry_run=True)  # fmt: skip
    vc, loss = stage.configure(ctx)  # composes, validates against verl's dataclasses, checks the eksft block
    assert vc.eksft.loss == NAME and isinstance(loss, EntropyBonusSFT) and loss.params["lambda_entropy"] == 0.2
    assert loss.resolve_head(vc.eksft.get("head")) == "fused"  # the linear form runs on the fused head

    est = stage.memory_estimate(ctx, vc, loss)
    got = measured_facts(loss)
    assert got == {"selected_fraction": 1.0, "ref_in_training_pass": False, "needs_ref": False}
    assert est.loss_terms == {"loss": NAME, "head": "fused", "needs_ref": False, "ref_in_training_pass": False,
                              "selected_fraction": 1.0}  # fmt: skip
    assert not est.host_terms and est.fits  # no reference model to keep
    # its parameters drive the estimate: without the bonus it is a CE-only loss
    assert stage.memory_estimate(ctx, vc, get_loss(NAME, lambda_entropy=0.0)).loss_terms["selected_fraction"] == 0.0


def test_without_the_registration_the_method_is_refused(tmp_path, monkeypatch):
    """The recipe alone is not enough: an unregistered loss fails at configuration, naming the known losses."""
    from eksft_pipeline.contract.stage_api import ConfigError
    from eksft_pipeline.sft.stage import SFTStage

    recipes = tmp_path / "recipes"
    shutil.copytree(recipe_cfg.recipes_dir(), recipes)
    (recipes / "method" / f"{NAME}.yaml").write_text(RECIPE)
    monkeypatch.setattr(recipe_cfg, "RECIPES_DIR", recipes)
    cfg = recipe_cfg.compose_pipeline(f"method={NAME}")
    stage = SFTStage()
    ctx = StageContext(cfg=cfg, run_dir=tmp_path / "run", manifest=Manifest(tmp_path / "run"), key=stage.key(cfg),
                       dry_run=True)  # fmt: skip
    with pytest.raises(ConfigError, match=f"unknown loss '{NAME}'.*known losses: asft"):
        stage.configure(ctx)
