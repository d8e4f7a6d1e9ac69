"""Stage `export`: every trained model of the run directory (each complete `sft/<method>` and `rl/<method>` stage)
as a self-contained HF folder with a model card, in `<run_dir>/export/<sft|rl>-<method>/`.

    python -m eksft_pipeline stage=export                                  # after stage=all (its last stage)
    python -m eksft_pipeline stage=export hub.repo_id=me/eksft-tiny-{name}   # and upload each folder

A folder holds the stage's `hf_model` files (weights, config, tokenizer; hard links where the file system allows,
else copies), the run's chat template (`split/tokenizer/chat_template.jinja`, the one every stage used), a
`generation_config.json` whose `eos_token_id` is the run's stop tokens (the split stage's EOS check: the token that
ends every SFT target; set when the trainer's export lacks it, and the card says so) and README.md, the model card
(eksft_pipeline/export/card.py). Everything is read from the manifest and the stages' files; no stage is imported.

Upload (`hub.repo_id`, `{name}` = the folder name, else `-<name>` is appended): with Hugging Face credentials
(`huggingface_hub.get_token()`) each folder is uploaded with `HfApi.upload_folder`; without them the stage prints,
per folder, the one `hf upload` command that would do it, and records it. Nothing touches the network otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from eksft_pipeline.contract.artifacts import atomic_write_json, atomic_write_text
from eksft_pipeline.contract.manifest import resolve_recorded
from eksft_pipeline.contract.recipes import plain
from eksft_pipeline.contract.stage_api import ConfigError, Stage, StageContext, StageResult

SKIP_FILES = ("EXPORTED_FROM",)



def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _override_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list | tuple):
        return "[" + ",".join(_override_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_override_value(x)}" for k, x in v.items()) + "}"
    s = str(v)
    return s if s and all(c.isalnum() or c in "_-./:" for c in s) else "'" + s.replace("'", "\\'") + "'"


def fix_generation_config(folder: Path, eos: dict | None) -> list[str]:
    """Make `generation_config.json`'s eos_token_id the run's stop tokens; the notes for the card."""
    path = folder / "generation_config.json"
    gen = json.loads(path.read_text()) if path.exists() else {}
    notes = []
    if not eos or not eos.get("stop_token_ids"):
        notes.append(f"eos_token_id: {gen.get('eos_token_id')} (the run recorded no stop tokens to check it against)")
        return notes
    stop = [int(t) for t in eos["stop_token_ids"]]
    have = gen.get("eos_token_id")
    have_list = [have] if isinstance(have, int) else list(have or [])
    want = stop[0] if len(stop) == 1 else stop
    if sorted(have_list) != sorted(stop):
        gen["eos_token_id"] = want
        atomic_write_json(path, gen, indent=2)
        notes.append(f"eos_token_id: {want} ({', '.join(eos.get('stop_tokens') or [])}), the run's stop tokens; "
                     f"set by the export (the trainer's folder had {have})")
    else:
        notes.append(f"eos_token_id: {want} ({', '.join(eos.get('stop_tokens') or [])}), the run's stop tokens")
    return notes


def repo_for(repo_id: str, name: str) -> str:
    return repo_id.format(name=name) if "{name}" in repo_id else f"{repo_id}-{name}"


def upload(folder: Path, repo: str, *, private: bool) -> dict[str, str]:
    """Upload with huggingface_hub when credentials exist; else print (and return) the one command that would."""
    from huggingface_hub import get_token

    command = f"hf upload {repo} {folder} ." + (" --private" if private else "")
    if not get_token():
        print(f"[export] no Hugging Face credentials (HF_TOKEN / `hf auth login`): upload {folder.name} with\n"
              f"    {command}", flush=True)
        return {"repo_id": repo, "uploaded": "no (no credentials)", "command": command}
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo, folder_path=str(folder))
    print(f"[export] uploaded {folder.name} to {repo}", flush=True)
    return {"repo_id": repo, "uploaded": "yes", "commit": str(getattr(info, "oid", "") or info)}


class ExportStage(Stage):
    name = "export"

    def config(self, cfg):
        return {"hub": plain(cfg.get("hub")), "model": str(cfg.model.name)}

    def _stages(self, ctx: StageContext) -> dict[str, dict]:
        return ctx.manifest.read().get("stages", {})

    def trained(self, ctx: StageContext) -> list[str]:
        """Keys of the complete SFT / RL stages that wrote an `hf_model`."""
        return sorted(k for k, e in self._stages(ctx).items()
                      if k.split("/")[0] in ("sft", "rl") and e.get("status") == "complete"
                      and "hf_model" in (e.get("outputs") or {}))

    def inputs(self, ctx):
        stages = self._stages(ctx)
        inp = {}
        for key in self.trained(ctx):
            inp[f"{key}:hf_model"] = resolve_recorded(ctx.run_dir, stages[key]["outputs"]["hf_model"]["path"])
            ev = stages.get("eval/" + key.split("/", 1)[1]) or {}
            m = (ev.get("outputs") or {}).get(f"{key.split('/')[0]}_metrics")
            if ev.get("status") == "complete" and m:
                inp[f"{key}:eval"] = resolve_recorded(ctx.run_dir, m["path"])
        return inp

    def check(self, ctx):
        repo = (ctx.cfg.get("hub") or {}).get("repo_id")
        if repo and "/" not in str(repo):
            raise ConfigError(f"hub.repo_id={repo} is not <owner>/<name>; e.g. hub.repo_id=me/eksft-tiny-{{name}}")

    def describe(self, ctx):
        return {"stage": "export", "out_dir": str(ctx.out_dir), "models": self.trained(ctx),
                "hub": plain(ctx.cfg.get("hub"))}

    # -- run ----------------------------------------------------------------------------------------
    def run(self, ctx: StageContext) -> StageResult:
        keys = self.trained(ctx)
        if not keys:
            raise ConfigError(f"nothing to export: no complete sft/<method> or rl/<method> stage with an hf_model in "
                              f"{ctx.run_dir}; run stage=all (or stage=sft) first")
        hub = plain(ctx.cfg.get("hub")) or {}
        outputs, summary = {}, {}
        for key in keys:
            name = key.replace("/", "-")
            folder = self.export_one(ctx, key, ctx.out_dir / name)
            outputs[name] = str(folder)
            summary[name] = {"folder": str(folder)}
            if hub.get("repo_id"):
                summary[name] |= upload(folder, repo_for(str(hub["repo_id"]), name), private=bool(hub.get("private")))
        return StageResult(outputs=outputs, summary=summary)

    def export_one(self, ctx: StageContext, key: str, folder: Path) -> Path:
        from eksft_pipeline.export import card

        stages = self._stages(ctx)
        entry = stages[key]
        kind, tag = key.split("/", 1)
        src = Path(resolve_recorded(ctx.run_dir, entry["outputs"]["hf_model"]["path"]))
        folder.mkdir(parents=True, exist_ok=True)
        for f in sorted(src.iterdir()):
            if f.is_file() and f.name not in SKIP_FILES:
                _link_or_copy(f, folder / f.name)
        split = stages.get("split") or {}
        tok = (split.get("outputs") or {}).get("tokenizer")
        template = "the trainer's export (no split tokenizer recorded)"
        if tok and (Path(resolve_recorded(ctx.run_dir, tok["path"])) / "chat_template.jinja").is_file():
            run_tpl = Path(resolve_recorded(ctx.run_dir, tok["path"])) / "chat_template.jinja"
            (folder / "chat_template.jinja").unlink(missing_ok=True)
            shutil.copy2(run_tpl, folder / "chat_template.jinja")
            template = "chat_template.jinja, the run's template (split/tokenizer; every stage used it)"
        generation = fix_generation_config(folder, (split.get("summary") or {}).get("eos"))
        atomic_write_text(folder / "README.md", card.render_card(self.card_info(ctx, key, kind, tag, generation,
                                                                                template)))
        return folder

    def card_info(self, ctx, key, kind, tag, generation, template) -> dict[str, Any]:
        from eksft_pipeline.export import card

        cfg = ctx.cfg
        stages = self._stages(ctx)
        entry = stages[key]
        rec = entry.get("config") or {}
        sft_rec = (stages.get(f"sft/{tag}") or {}).get("config") or {}
        method_cfg = (sft_rec.get("method") if isinstance(sft_rec.get("method"), dict) else None) or \
            (rec.get("method") if isinstance(rec.get("method"), dict) else {})
        method = str(method_cfg.get("name") or (rec.get("method") if isinstance(rec.get("method"), str) else tag))
        assets = (stages.get("assets") or {}).get("summary") or {}
        base = assets.get("hub_name") or (sft_rec.get("model") or {}).get("path") or str(cfg.model.path)
        base_rev = self._revision(stages)
        recipe = f"model={cfg.model.name} method={method} cluster={cfg.cluster.name}"
        info: dict[str, Any] = {
            "name": f"{cfg.model.name}-{kind}-{tag}", "kind": kind, "method": method, "stage_key": key,
            "base_model": base, "base_revision": base_rev, "recipe": recipe,
            "method_params": {("params." + k): v for k, v in (method_cfg.get("params") or {}).items()},
            "versions": card.versions(), "generation": generation, "template": template,
        }
        if kind == "rl":
            info["init"] = ((entry.get("inputs") or {}).get("model") or {}).get("path") or rec.get("init")
            info["method_params"]["RL"] = "DAPO (recipes/verl/dapo.yaml)"
        try:
            from eksft_pipeline.contract.recipes import compose_pipeline

            full = OmegaConf.to_container(compose_pipeline(*recipe.split()), resolve=True)
            # an RL model is also what its SFT stage was: both stages' differences (each key once)
            diff = card.recipe_diff(sft_rec, full) if kind == "rl" and sft_rec else []
            info["diff"] = diff + [d for d in card.recipe_diff(rec, full) if d[0] not in {x[0] for x in diff}]
        except Exception as e:  # noqa: BLE001 - a recipe renamed since the run: say so in the card
            info["diff"], info["diff_note"] = None, f"recipes not composable here ({type(e).__name__}: {e})"[:300]
        overrides = []
        for k, recipe_v, v in info["diff"] or []:
            overrides.append(("+" if recipe_v is card._MISSING else "") + f"{k}={_override_value(v)}")
        info["command"] = card.reproduce_command(str(cfg.model.name), method, str(cfg.cluster.name), overrides)
        info["data"] = self._data(ctx, stages, kind)
        ev = stages.get(f"eval/{tag}") or {}
        m = (ev.get("outputs") or {}).get(f"{kind}_metrics")
        if ev.get("status") == "complete" and m and Path(resolve_recorded(ctx.run_dir, m["path"])).is_file():
            metrics = json.loads(Path(resolve_recorded(ctx.run_dir, m["path"])).read_text())
            info["metrics"], info["sampling"] = metrics, metrics.get("sampling") or {}
        return info

    @staticmethod
    def _revision(stages: dict) -> str | None:
        """The base model's revision as the run recorded it: the resolved hub commit (assets stage), else the
        content hash the manifest holds for the model directory."""
        s = (stages.get("assets") or {}).get("summary") or {}
        if s.get("revision_resolved"):
            asked = s.get("revision")
            return f"`{s['revision_resolved']}`" + (f" (asked: `{asked}`)" if asked else " (unpinned: the hub's head then)")
        for key in ("sft", "split"):
            for k, e in stages.items():
                if k.split("/")[0] == key:
                    inp = (e.get("inputs") or {}).get("model") or (e.get("inputs") or {}).get("tokenizer")
                    if inp and inp.get("hash"):
                        return f"local directory, content hash `{inp['hash']}`"
        return None

    @staticmethod
    def _data(ctx, stages: dict, kind: str) -> dict[str, str]:
        split = stages.get("split") or {}
        inp, out, s = split.get("inputs") or {}, split.get("outputs") or {}, split.get("summary") or {}
        conf = (split.get("config") or {}).get("split") or {}
        src = inp.get("source") or {}
        d = {"source": f"`{conf.get('source') or src.get('path')}`"
                       + (f", content hash `{src['hash']}`" if src.get("hash") else "")
                       + (f", revision `{s['source_revision']}`" if s.get("source_revision") else "")}
        d["split"] = (f"{s.get('n_input')} rows read, {s.get('n_valid')} valid, {s.get('n_sft')} SFT / {s.get('n_rl')} "
                      f"RL, {s.get('n_dropped')} dropped (split seed {conf.get('seed')}, cutoff {conf.get('cutoff_tokens')} "
                      "tokens)")
        name = "sft_train" if kind == "sft" else "rl_train"
        if out.get(name):
            d[f"{kind.upper()} training set"] = f"`{out[name]['path']}`, content hash `{out[name].get('hash')}`"
        return d
