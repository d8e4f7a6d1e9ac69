"""The `hf_cpu` rollout (eksft_pipeline/verl_ext/cpu_rollout.py) and DAPO through verl's own main_ppo on CPU.

Fast tests exercise the generation engine against an independent reference (a plain forward pass: greedy
argmax loop, log-softmax of the logits), the server's batching / abort / weight-update protocol (the plain
class, driven by asyncio, no Ray), and the entry point's environment handling. The slow test runs
`python -m eksft_pipeline.verl_ext.ppo_main ... dapo_platform=cpu` for two DAPO steps on a throwaway tiny Qwen3 and
checks that it finishes, trains on whole mixed-outcome groups only (dynamic sampling evicts uniform ones;
checked group by group in verl's rollout dump), and that after every weight sync the rollout server's weights
are bit-identical to the actor's checkpoint of that step. A second
slow test runs 8 DAPO steps on an easy task (every prompt's answer is 4; the base model guesses among five
digits) and checks that the sampled accuracy (verl's validation, before and after) and the training score rise.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import torch
from rl_assets import build_model, dapo_cmd, make_easy_rl_assets, make_rl_assets, run_dapo  # tests/rl/rl_assets.py

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """Random-weight tiny Qwen3 + tokenizer (no training): enough for exact engine checks."""
    d = tmp_path_factory.mktemp("tiny_rand") / "model"
    tok = build_model(d, hidden=32, layers=1)
    return d, tok


@pytest.fixture(scope="module")
def engine(tiny_model):
    from transformers import AutoConfig

    from eksft_pipeline.verl_ext.cpu_rollout import HFCausalLMEngine

    path, tok = tiny_model
    return HFCausalLMEngine(
        str(path),
        AutoConfig.from_pretrained(path),
        load_format="auto",
        eos_token_ids=[tok.eos_token_id],
        pad_token_id=tok.pad_token_id,
    )


def _prompt(tok, text: str) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids)


# ---------------------------------------------------------------------------------------------- pure functions


def test_parse_sampling_params_semantics():
    from eksft_pipeline.verl_ext.cpu_rollout import parse_sampling_params

    spec, logprobs, max_tokens = parse_sampling_params(
        {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}
    )
    assert (spec.do_sample, spec.temperature, spec.top_p, spec.top_k) == (True, 1.0, 1.0, -1)
    assert logprobs is True and max_tokens is None
    # verl's greedy validation (temperature 0) -> greedy, warpers canonicalised so all greedy requests batch together
    g1, _, _ = parse_sampling_params({"temperature": 0, "top_p": 0.7, "top_k": 20})
    g2, _, _ = parse_sampling_params({"temperature": 0.0})
    assert g1 == g2 and not g1.do_sample
    assert parse_sampling_params({"max_new_tokens": 7})[2] == 7
    assert parse_sampling_params({"top_k": 0})[0].top_k == -1
    with pytest.raises(ValueError, match="best_of"):
        parse_sampling_params({"best_of": 2})
    with pytest.raises(ValueError, match="top_p"):
        parse_sampling_params({"top_p": 0.0})
    with pytest.raises(ValueError, match="temperature"):
        parse_sampling_params({"temperature": -0.5})


def test_resolve_max_tokens_matches_vllm_server_rule():
    from eksft_pipeline.verl_ext.cpu_rollout import resolve_max_tokens

    kw = dict(prompt_length=100, response_length=50, max_model_len=160)
    # default: min(response_length, prompt_length + response_length - len(prompt)) = min(50, 150 - 30)
    assert resolve_max_tokens(None, 30, **kw) == 50
    # a prompt longer than prompt_length eats into the budget: min(50, 150 - 120) = 30
    assert resolve_max_tokens(None, 120, **kw) == 30
    # explicit limits are clamped to the room left in the context: 160 - 150 = 10
    assert resolve_max_tokens(99, 150, **kw) == 10
    assert resolve_max_tokens(0, 10, **kw) == 1
    with pytest.raises(ValueError, match="no room"):
        resolve_max_tokens(None, 160, **kw)


def test_cut_response():
    from eksft_pipeline.verl_ext.cpu_rollout import cut_response

    stop = frozenset({2})
    assert cut_response([5, 6, 2, 0, 0], 10, stop) == ([5, 6, 2], True)  # EOS kept, HF padding dropped
    assert cut_response([5, 6, 7, 8], 3, stop) == ([5, 6, 7], True)  # length limit
    assert cut_response([5, 2, 7], 1, stop) == ([5], True)  # limit before the EOS
    assert cut_response([5, 6], 4, stop) == ([5, 6], False)  # stopped early without EOS (abort)
    assert cut_response([0, 0, 2], 5, stop) == ([0, 0, 2], True)  # generated pad ids are real tokens


def test_server_options_defaults_and_unknown_key():
    from eksft_pipeline.verl_ext.cpu_rollout import SERVER_OPTION_DEFAULTS, server_options

    assert server_options({"engine_kwargs": {}}) == SERVER_OPTION_DEFAULTS
    assert server_options({"engine_kwargs": {"hf_cpu": {"max_batch_size": 3}}})["max_batch_size"] == 3
    with pytest.raises(ValueError, match="max_batchsize"):
        server_options({"engine_kwargs": {"hf_cpu": {"max_batchsize": 3}}})
    with pytest.raises(ValueError, match="max_batch_size"):
        server_options({"engine_kwargs": {"hf_cpu": {"max_batch_size": 0}}})


def test_registered_in_verl_registries():
    from verl.workers.rollout.base import get_rollout_class
    from verl.workers.rollout.replica import get_rollout_replica_class

    from eksft_pipeline.verl_ext import cpu_rollout

    assert get_rollout_class("hf_cpu", "async") is cpu_rollout.ServerAdapter
    assert get_rollout_replica_class("hf_cpu") is cpu_rollout.HFCPUReplica


def test_entry_point_environment():
    from eksft_pipeline.verl_ext.ppo_main import ROLLOUT_MODULE, STEPS_MODULE, add_external_module, allow_logical_gpus

    env = {"VERL_USE_EXTERNAL_MODULES": "eksft_pipeline.verl_ext.cpu_platform,"}
    both = f"{ROLLOUT_MODULE},{STEPS_MODULE}"
    assert add_external_module(env=env) == f"eksft_pipeline.verl_ext.cpu_platform,{both}"
    assert add_external_module(env=env) == f"eksft_pipeline.verl_ext.cpu_platform,{both}"  # idempotent
    assert add_external_module(env={}) == both
    assert add_external_module(ROLLOUT_MODULE, env={}) == ROLLOUT_MODULE
    env = {"VERL_PLATFORM": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    assert allow_logical_gpus(env) and "CUDA_VISIBLE_DEVICES" not in env
    for env in ({"VERL_PLATFORM": "cpu", "CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": ""}):
        before = dict(env)
        assert not allow_logical_gpus(env) and env == before


# ---------------------------------------------------------------------------------------------- engine


def _greedy_reference(model, prompt: list[int], max_new: int, eos: int) -> list[int]:
    """Independent greedy decoder: full forward over the whole sequence at every step, argmax, stop at EOS."""
    seq = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            out.append(nxt)
            seq.append(nxt)
            if nxt == eos:
                break
    return out


def test_engine_greedy_batch_equals_unbatched_reference(engine, tiny_model):
    from eksft_pipeline.verl_ext.cpu_rollout import parse_sampling_params

    _, tok = tiny_model
    prompts = [_prompt(tok, "What is 1 + 2?"), _prompt(tok, "Hi")[:-2], _prompt(tok, "What is 33 + 4 and 5?")]
    assert len({len(p) for p in prompts}) == 3  # left padding really happens
    spec, _, _ = parse_sampling_params({"temperature": 0})
    limits = [12, 12, 4]
    results = engine.generate_batch(spec, prompts, limits)
    for p, lim, (toks, logps, finished) in zip(prompts, limits, results, strict=True):
        assert toks == _greedy_reference(engine.model, p, lim, tok.eos_token_id)
        assert finished and len(logps) == len(toks)


@pytest.mark.parametrize(
    "mode,temperature", [("processed_logprobs", 1.0), ("processed_logprobs", 0.5), ("raw_logprobs", 0.5)]
)
def test_engine_logprobs_match_forward_pass(tiny_model, mode, temperature):
    from transformers import AutoConfig

    from eksft_pipeline.verl_ext.cpu_rollout import HFCausalLMEngine, parse_sampling_params

    path, tok = tiny_model
    eng = HFCausalLMEngine(
        str(path), AutoConfig.from_pretrained(path), load_format="auto", eos_token_ids=[tok.eos_token_id],
        pad_token_id=tok.pad_token_id, logprobs_mode=mode, seed=3,
    )  # fmt: skip
    prompts = [_prompt(tok, "What is 1 + 2?"), _prompt(tok, "x")]
    spec, _, _ = parse_sampling_params({"temperature": temperature, "top_p": 1.0, "top_k": -1})
    for p, (toks, logps, _) in zip(prompts, eng.generate_batch(spec, prompts, [10, 10]), strict=True):
        with torch.no_grad():
            logits = eng.model(torch.tensor([p + toks])).logits[0, len(p) - 1 : len(p) - 1 + len(toks)]
        scale = temperature if mode == "processed_logprobs" else 1.0
        ref = torch.log_softmax(logits / scale, -1).gather(-1, torch.tensor(toks)[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(logps), ref, atol=1e-4), (mode, temperature)


def test_engine_top_k_1_is_greedy_and_seed_is_reproducible(engine, tiny_model):
    from eksft_pipeline.verl_ext.cpu_rollout import parse_sampling_params

    _, tok = tiny_model
    p = [_prompt(tok, "What is 2 + 2?")]
    greedy = engine.generate_batch(parse_sampling_params({"temperature": 0})[0], p, [8])[0][0]
    assert engine.generate_batch(parse_sampling_params({"temperature": 1.0, "top_k": 1})[0], p, [8])[0][0] == greedy
    seeded = parse_sampling_params({"temperature": 1.0, "seed": 11})[0]
    a = engine.generate_batch(seeded, p * 3, [16] * 3)
    b = engine.generate_batch(seeded, p * 3, [16] * 3)
    assert [r[0] for r in a] == [r[0] for r in b]


def test_engine_row_samples_do_not_depend_on_the_batch(engine, tiny_model):
    """Each row samples from its own seeded generator: alone or batched (and left-padded) with other prompts, a
    request with the same seed gets the same response; HF's own sampling would draw the batch from one stream."""
    from eksft_pipeline.verl_ext.cpu_rollout import parse_sampling_params

    _, tok = tiny_model
    spec = parse_sampling_params({"temperature": 1.0, "top_p": 0.95, "top_k": 20})[0]
    a, b = _prompt(tok, "What is 12 + 7?"), _prompt(tok, "Hi")
    assert len(a) != len(b)  # the batch pads b on the left
    alone = engine.generate_batch(spec, [a], [16], seeds=[101])[0]
    batched = engine.generate_batch(spec, [b, a, b], [16, 16, 16], seeds=[5, 101, 6])
    assert batched[1][0] == alone[0]
    assert torch.allclose(torch.tensor(batched[1][1]), torch.tensor(alone[1]), atol=1e-5)
    assert batched[0][0] != batched[2][0] or batched[0][1] != batched[2][1]  # other seeds, other samples
    with pytest.raises(ValueError, match="seeds"):
        engine.generate_batch(spec, [a, b], [4, 4], seeds=[1])


def test_server_request_seeds_depend_on_step_prompt_and_copy_not_on_arrival():
    """A GRPO group's n identical prompts get n different seeds; the next step gets new ones; the same calls
    in the same step give the same seeds (HFCPUServer._request_seed, without Ray)."""
    from eksft_pipeline.verl_ext.cpu_rollout import HFCPUServer, parse_sampling_params

    def server(seed: int) -> HFCPUServer:
        s = object.__new__(HFCPUServer)
        s.engine_seed, s.global_steps, s.weight_version, s._seen_phase, s._seen = seed, 1, 1, None, {}
        return s

    spec = parse_sampling_params({"temperature": 1.0})[0]
    one, two = server(0), server(0)
    step1 = [one._request_seed(spec, [1, 2, 3]) for _ in range(4)] + [one._request_seed(spec, [4])]
    assert len(set(step1)) == 5
    # another order of arrival of the same requests: the same set of seeds
    other = [two._request_seed(spec, [4])] + [two._request_seed(spec, [1, 2, 3]) for _ in range(4)]
    assert sorted(other) == sorted(step1)
    one.global_steps, one.weight_version = 2, 2
    assert one._request_seed(spec, [1, 2, 3]) not in step1
    assert server(1)._request_seed(spec, [1, 2, 3]) != step1[0]  # another replica / rollout.seed


def test_engine_abort_stops_the_batch(engine, tiny_model):
    from eksft_pipeline.verl_ext.cpu_rollout import parse_sampling_params

    _, tok = tiny_model
    engine.abort_event.set()
    try:
        res = engine.generate_batch(parse_sampling_params({"temperature": 1.0})[0], [_prompt(tok, "a")] * 2, [50, 50])
    finally:
        engine.abort_event.clear()
    # stopping criteria are checked after each new token: one token, then the whole batch stops, unfinished
    # (unless that single token happened to be EOS)
    for toks, _, finished in res:
        assert len(toks) == 1 and finished == (toks[0] == tok.eos_token_id)


def test_engine_weight_update_protocol(tiny_model):
    from transformers import AutoConfig, AutoModelForCausalLM

    from eksft_pipeline.verl_ext.cpu_rollout import HFCausalLMEngine

    path, tok = tiny_model
    cfg = AutoConfig.from_pretrained(path)
    eng = HFCausalLMEngine(str(path), cfg, load_format="dummy", eos_token_ids=[tok.eos_token_id], seed=123)
    trained = AutoModelForCausalLM.from_pretrained(path)
    sd = trained.state_dict()
    assert any(not torch.equal(v, eng.model.state_dict()[k]) for k, v in sd.items())  # dummy = random weights
    # a sync that misses a tensor is refused
    eng.begin_weight_update()
    eng.load_weights([(k, v) for k, v in sd.items() if k != "model.norm.weight"])
    with pytest.raises(RuntimeError, match="model.norm.weight"):
        eng.finish_weight_update()
    # unknown names and shape mismatches name the tensor
    with pytest.raises(KeyError, match="model.nope"):
        eng.load_weights([("model.nope", torch.zeros(1))])
    with pytest.raises(ValueError, match="model.norm.weight"):
        eng.load_weights([("model.norm.weight", torch.zeros(3))])
    # a full sync (the actor sends lm_head.weight too; tied to embed_tokens) makes the model equal the source
    eng.begin_weight_update()
    eng.load_weights([(k, v.clone()) for k, v in sd.items() if k != "lm_head.weight"])
    assert eng.finish_weight_update() == len(sd) - 1  # tied lm_head covered by embed_tokens
    for k, v in sd.items():
        assert torch.equal(eng.model.state_dict()[k], v), k
    x = torch.tensor([_prompt(tok, "q")])
    with torch.no_grad():
        assert torch.equal(eng.model(x).logits, trained(x).logits)


# ---------------------------------------------------------------------------------------------- server (no Ray)


def _server(tiny_model, **hf_cpu):
    from omegaconf import OmegaConf
    from verl.workers.rollout.replica import RolloutMode

    from eksft_pipeline.verl_ext.cpu_rollout import HFCPUServer

    path, _ = tiny_model
    rollout = OmegaConf.create(
        {
            "_target_": "verl.workers.config.RolloutConfig",
            "name": "hf_cpu",
            "tensor_model_parallel_size": 1,
            "prompt_length": 64,
            "response_length": 16,
            "dtype": "float32",
            "load_format": "auto",
            "engine_kwargs": {"hf_cpu": {"batch_wait_s": 0.05, **hf_cpu}},
        }
    )
    model = OmegaConf.create({"path": str(path), "override_config": {"attn_implementation": "sdpa"}})
    return HFCPUServer(rollout, model, RolloutMode.HYBRID, [], replica_rank=0, name="t")


def test_server_batches_concurrent_requests_and_splits_by_params(tiny_model):
    _, tok = tiny_model
    server = _server(tiny_model)
    prompts = [_prompt(tok, f"What is {i} + 1?") for i in range(4)]

    async def go():
        await server.ready()
        # two of the four carry a `seed` (the seeded agent loop's requests): that does not split the batch
        sampled = [server.generate(p, {"temperature": 1.0, "logprobs": True, **({"seed": i} if i > 1 else {})},
                                   f"r{i}") for i, p in enumerate(prompts)]  # fmt: skip
        greedy = [server.generate(p, {"temperature": 0}, f"g{i}") for i, p in enumerate(prompts[:2])]
        outs = await asyncio.gather(*sampled, *greedy)
        with pytest.raises(ValueError, match="unsupported sampling"):
            await server.generate(prompts[0], {"n": 2}, "bad")
        # a failing batch hands its error to the caller and the batcher keeps serving
        with pytest.raises(ValueError, match="empty prompt"):
            await server.generate([], {"temperature": 1.0}, "empty")
        after = await server.generate(prompts[0], {"temperature": 1.0}, "after")
        assert after.stop_reason == "completed" and len(after.token_ids) >= 1
        return outs

    outs = asyncio.run(go())
    # one batch per sampling spec apart from the seed (+ the request after the failed one)
    assert server.stats["requests"] == 7 and server.stats["batches"] == 3
    for o in outs[:4]:
        assert o.stop_reason == "completed" and 1 <= len(o.token_ids) <= 16 and len(o.log_probs) == len(o.token_ids)
    assert all(o.log_probs is None for o in outs[4:])  # not requested


def test_server_abort_pause_and_weight_update(tiny_model):
    from transformers import AutoModelForCausalLM

    path, tok = tiny_model
    server = _server(tiny_model, max_batch_size=2)
    p = _prompt(tok, "hello")
    sd = AutoModelForCausalLM.from_pretrained(path).state_dict()

    async def go():
        await server.ready()
        res = await server.abort_all_requests(reject_request=True)
        assert res["aborted_count"] == 0
        rejected = await server.generate(p, {"temperature": 1.0}, "x")  # paused + rejecting: answered at once
        await server.resume_generation()
        ok = await server.generate(p, {"temperature": 1.0}, "y")
        # paused without rejecting: the request waits for resume_generation
        await server.abort_all_requests(reject_request=False)
        waiting = asyncio.ensure_future(server.generate(p, {"temperature": 1.0}, "z"))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        await server.resume_generation()
        late = await waiting
        digest0 = await server.weights_digest()
        await server.begin_weight_update()
        await server.load_weights([(k, v * 0.5) for k, v in sd.items()])
        info = await server.finish_weight_update(global_steps=7)
        return rejected, ok, late, digest0, info, await server.weights_digest()

    rejected, ok, late, digest0, info, digest1 = asyncio.run(go())
    assert rejected.stop_reason == "aborted" and rejected.token_ids == []
    assert ok.stop_reason == "completed" and late.stop_reason == "completed" and len(late.token_ids) >= 1
    assert info["global_steps"] == 7 and info["weight_version"] == 1 and digest1 != digest0
    assert torch.equal(server.engine.model.state_dict()["model.norm.weight"], sd["model.norm.weight"] * 0.5)


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_dapo_two_steps_through_verl_main_ppo(tmp_path):
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    assets = make_rl_assets(tmp_path / "assets")
    t_assets = time.perf_counter() - t0
    metrics_file, dump, ckpt = tmp_path / "metrics.jsonl", tmp_path / "rollout_dump", tmp_path / "ckpt"
    cmd = dapo_cmd(
        assets,
        "trainer.total_training_steps=2", "trainer.save_freq=1", "trainer.test_freq=2",
        f"trainer.default_local_dir={ckpt}",
        "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]",
        f"+actor_rollout_ref.rollout.engine_kwargs.hf_cpu.weights_dump_dir={dump}",
        f"trainer.rollout_data_dir={tmp_path / 'rollouts'}",
    )  # fmt: skip
    rc, tail, marks, total = run_dapo(cmd, tmp_path, metrics_file, steps=2)
    assert rc == 0, f"main_ppo failed (rc={rc}):\n{tail}"
    print(
        f"\n[dapo cpu] assets {t_assets:.1f}s; startup to ready-to-fit {marks.get('ready', -1):.1f}s; "
        f"step1 done at {marks.get('step1', -1):.1f}s, step2 at {marks.get('step2', -1):.1f}s; total {total:.1f}s"
    )

    # rewards were logged for both steps, and dynamic sampling kept only groups with mixed outcomes:
    # every kept group has a correct (+1) and a wrong (<= -1) answer, so each step's batch has both
    rows = [json.loads(x) for x in metrics_file.read_text().splitlines()]
    steps = {r["step"]: r["data"] for r in rows if "critic/score/mean" in r["data"]}
    assert sorted(steps) == [1, 2], tail
    for s, m in steps.items():
        assert m["critic/score/max"] == 1.0 and m["critic/score/min"] <= -1.0, (s, m)
        assert -2.0 <= m["critic/score/mean"] < 1.0
        # rollout log-probs equal the actor's recomputed old log-probs: same weights generated the batch
        assert m["training/rollout_probs_diff_max"] < 1e-4, m["training/rollout_probs_diff_max"]
        assert m["actor/pg_clipfrac"] >= 0.0 and m["actor/grad_norm"] > 0.0
    assert any(k.startswith("val-core/tiny_add/") for r in rows for k in r["data"]), "no validation metrics"

    # dynamic sampling, group by group: verl dumps each trained batch (trainer.rollout_data_dir) with the sample
    # key "<group uid>_<rollout>_<output>"; every trained group is whole (n=4) and mixes right (score +1, or
    # +1 minus an overlong penalty >= 0) and wrong (-1, or less with the penalty) answers
    evicted = [r["data"][k] for r in rows for k in r["data"] if k.endswith("filter_groups/evicted_samples")]
    for step in (1, 2):
        groups: dict[str, list[float]] = {}
        for line in (tmp_path / "rollouts" / f"{step}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            groups.setdefault(rec["uid"].rsplit("_", 2)[0], []).append(float(rec["score"]))
        assert len(groups) == 8, (step, len(groups))  # data.train_batch_size prompts
        for uid, scores in groups.items():
            assert len(scores) == 4, (step, uid, scores)
            assert max(scores) >= 0.0 and min(scores) <= -1.0, (step, uid, scores)
    print(f"[dapo cpu] groups evicted by dynamic sampling per step: {evicted}")
    # ... and the filter did drop uniform groups on the way (measured: 9 and 8 of the generated groups)
    assert len(evicted) == 2 and sum(evicted) > 0, evicted

    # weight sync: initial sync = the model on disk; after step k the rollout holds exactly the actor's weights
    initial = load_file(str(assets["model"] / "model.safetensors"))
    synced = {k: load_file(str(dump / f"replica0_step{k}.safetensors")) for k in (0, 1, 2)}
    for k in (0, 1, 2):
        assert torch.equal(synced[k]["lm_head.weight"], synced[k]["model.embed_tokens.weight"])  # still tied
    assert all(torch.equal(synced[0][n], t) for n, t in initial.items())
    for k in (1, 2):
        actor = load_file(str(ckpt / f"global_step_{k}" / "actor" / "huggingface" / "model.safetensors"))
        assert sorted(actor) == sorted(initial)
        for n, t in actor.items():
            assert torch.equal(synced[k][n], t), (k, n)
        assert any(not torch.equal(synced[k][n], synced[k - 1][n]) for n in actor), f"step {k} changed nothing"


@pytest.mark.slow
def test_dapo_runs_repeat_exactly(tmp_path):
    """Two DAPO runs of the same config from the same model end with bit-identical weights.

    What it takes (eksft_pipeline/verl_ext/reproducible_steps.py): each request is sampled from a generator
    seeded by the step, its dataset row and session (the seeded agent loop + the hf_cpu server), and the trainer's
    batch is in dataset order rather than the order the responses finished in. 2 mini-batches per step, so a
    change of row order changes the update. Without both, the first actor update already differed (pg_loss 0.0485
    vs 0.0500 on the tiny testbed)."""
    from safetensors.torch import load_file

    assets = make_rl_assets(tmp_path / "assets")
    runs = []
    for name in ("a", "b"):
        run = tmp_path / name
        run.mkdir()
        cmd = dapo_cmd(
            assets,
            "trainer.total_training_steps=2", "trainer.save_freq=2", "trainer.test_freq=-1",
            f"trainer.default_local_dir={run / 'ckpt'}", f"trainer.rollout_data_dir={run / 'rollouts'}",
            "actor_rollout_ref.actor.checkpoint.save_contents=[model,hf_model]",
            # fixed-size steps (dynamic sampling refills at times that depend on the machine's timing)
            "algorithm.filter_groups.enable=false",
            "actor_rollout_ref.actor.ppo_mini_batch_size=4", "actor_rollout_ref.actor.optim.lr=1e-4",
        )  # fmt: skip
        rc, tail, _, total = run_dapo(cmd, run, run / "metrics.jsonl", steps=2)
        assert rc == 0, f"main_ppo run {name} failed (rc={rc}):\n{tail}"
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        metrics = {r["step"]: r["data"] for r in rows if "actor/pg_loss" in r["data"]}
        weights = load_file(str(run / "ckpt" / "global_step_2" / "actor" / "huggingface" / "model.safetensors"))
        dumps = {k: (run / "rollouts" / f"{k}.jsonl").read_text().splitlines() for k in (1, 2)}
        runs.append((metrics, weights, dumps, total))
    (ma, wa, da, ta), (mb, wb, db, tb) = runs
    print(f"\n[dapo cpu repeat] two runs {ta:.0f}s, {tb:.0f}s; pg_loss {[ma[s]['actor/pg_loss'] for s in (1, 2)]}")
    # the samples are random: a group's responses differ (else equality would say nothing)
    outputs: dict[str, set[str]] = {}
    for line in da[1]:
        rec = json.loads(line)
        outputs.setdefault(rec["uid"].rsplit("_", 2)[0], set()).add(rec["output"])
    assert max(len(o) for o in outputs.values()) > 1, outputs
    initial = load_file(str(assets["model"] / "model.safetensors"))
    assert any(not torch.equal(wa[n], initial[n]) for n in initial), "training changed nothing"
    assert sorted(wa) == sorted(wb)
    differ = [n for n in wa if not torch.equal(wa[n], wb[n])]
    assert not differ, f"the two runs' weights differ in {differ[:5]}"
    for step in (1, 2):
        for key in ("critic/score/mean", "response_length/mean", "actor/pg_loss", "actor/grad_norm", "actor/ppo_kl"):
            assert ma[step][key] == mb[step][key], (step, key, ma[step][key], mb[step][key])
        # the same responses with the same scores (verl dumps them sorted by its random group uids: compare sets)
        as_set = lambda lines: sorted((json.loads(x)["output"], json.loads(x)["score"]) for x in lines)  # noqa: E731
        assert as_set(da[step]) == as_set(db[step]), step


# ---------------------------------------------------------------------------------------------- learning signal

@pytest.mark.long
def test_dapo_mean_reward_rises_on_an_easy_task(tmp_path):
    """DAPO through verl's main_ppo on CPU raises the sampled accuracy of an easy task (about 0.2 -> above 0.6).

    `make test-long` (about 2.5 minutes): on every `make test` the tiny end-to-end run already requires DAPO to
    raise pass@1 over the SFT model with a 95% CI above zero (tests/test_e2e_tiny.py).

    Accuracy is measured by verl's validation on the 5 prompts x 16 samples at temperature 1 (the training
    distribution), before training (step 0) and after the last step, so it is not confounded by which
    prompts a training batch drew; the training batches' mean score must rise as well.
    """
    steps = 8
    assets = make_easy_rl_assets(tmp_path / "assets")
    metrics_file = tmp_path / "metrics.jsonl"
    cmd = dapo_cmd(
        assets,
        f"trainer.total_training_steps={steps}", f"trainer.save_freq={steps}", f"trainer.test_freq={steps}",
        "trainer.val_before_train=true", f"trainer.default_local_dir={tmp_path / 'ckpt'}",
        "actor_rollout_ref.actor.checkpoint.save_contents=[model]",
        # constant-answer groups are common at the start (0.2^4 + 0.8^4 = 41%); keep them (zero advantage)
        # rather than refilling, so that every step costs the same
        "algorithm.filter_groups.enable=false",
        # a toy model, a handful of steps: a large step size (the CPU recipe's 1e-5 moves nothing in 6 steps)
        "actor_rollout_ref.actor.optim.lr=5e-4",
        # 8 samples per prompt for steadier group baselines; 2 mini-batches x 2 epochs = 4 updates per step
        "actor_rollout_ref.rollout.n=8", "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "actor_rollout_ref.actor.ppo_epochs=2",
        "actor_rollout_ref.rollout.val_kwargs.do_sample=true", "actor_rollout_ref.rollout.val_kwargs.n=16",
        "actor_rollout_ref.rollout.val_kwargs.temperature=1.0",
    )  # fmt: skip
    rc, tail, marks, total = run_dapo(cmd, tmp_path, metrics_file, steps=steps, timeout_s=600)
    assert rc == 0, f"main_ppo failed (rc={rc}):\n{tail}"
    rows = [json.loads(x) for x in metrics_file.read_text().splitlines()]

    def val_acc(step: int) -> float:
        found = [v for r in rows if r["step"] == step for k, v in r["data"].items()
                 if k.startswith("val-core/tiny_add/acc/mean@")]  # fmt: skip
        assert len(found) == 1, (step, [r["data"].keys() for r in rows if r["step"] == step])
        return found[0]

    train_score = {r["step"]: r["data"]["critic/score/mean"] for r in rows if "critic/score/mean" in r["data"]}
    assert sorted(train_score) == list(range(1, steps + 1)), tail
    before, after = val_acc(0), val_acc(steps)
    print(f"\n[dapo cpu easy] val acc@16 {before:.3f} -> {after:.3f}; train score/mean per step "
          f"{[round(train_score[s], 3) for s in sorted(train_score)]}; {total:.0f}s")  # fmt: skip
    # the base model guesses among 5 digits: 0.2 expected; 80 samples give a std of about 0.045
    assert 0.05 <= before <= 0.4, before
    # measured here (two runs): 0.24 -> 0.85 and 0.18 -> 0.90
    assert after >= max(0.6, before + 0.35), (before, after)
    first = (train_score[1] + train_score[2]) / 2
    last = (train_score[steps - 1] + train_score[steps]) / 2
    assert last >= first + 0.5, train_score  # measured: -0.48 -> 0.61, -0.41 -> 0.70


# ---------------------------------------------------------------------------------------------- rollout correction


@pytest.mark.long
def test_rollout_correction_changes_the_loss(tmp_path):
    """verl's rollout correction (`algorithm.rollout_correction`, the RL stage's `rl.rollout_correction` preset) on the
    CPU trainer: one DAPO step with it off and one with token-level truncated IS (preset `decoupled_token_is`), from
    the same model and seeds.

    The rollout samples in bf16 and the trainer recomputes the log-probs in fp32 (the GPU situation: vLLM bf16 vs
    FSDP fp32), so the two disagree. Both runs log the mismatch (rollout_corr/kl, rollout_probs_diff) with identical
    values (same responses, same old log-probs); only the corrected run logs IS weights, and its policy loss differs.
    `make test-long` (measured: 2 x ~55 s, 116 s in all, on a busy 2-core machine)."""
    assets = make_rl_assets(tmp_path / "assets")
    runs = {}
    for name, extra in (("off", ()), ("tis", ("algorithm.rollout_correction.rollout_is=token",
                                              "algorithm.rollout_correction.rollout_is_threshold=2.0"))):
        run = tmp_path / name
        run.mkdir()
        cmd = dapo_cmd(
            assets,
            "trainer.total_training_steps=1", "trainer.save_freq=1", "trainer.test_freq=-1",
            f"trainer.default_local_dir={run / 'ckpt'}", "actor_rollout_ref.actor.checkpoint.save_contents=[model]",
            "algorithm.filter_groups.enable=false",  # a fixed batch: no refill at timing-dependent moments
            "actor_rollout_ref.rollout.dtype=bfloat16",
            *extra,
        )  # fmt: skip
        rc, tail, _, total = run_dapo(cmd, run, run / "metrics.jsonl", steps=1)
        assert rc == 0, f"main_ppo ({name}) failed (rc={rc}):\n{tail}"
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        runs[name] = next(r["data"] for r in rows if r["step"] == 1 and "actor/pg_loss" in r["data"])
        print(f"\n[rollout correction] {name}: {total:.0f}s, pg_loss {runs[name]['actor/pg_loss']:.6f}")
    off, tis = runs["off"], runs["tis"]
    # the same responses, scored the same, and the same mismatch (bf16 rollout vs fp32 trainer: not zero)
    for key in ("critic/score/mean", "response_length/mean"):
        assert off[key] == tis[key], (key, off[key], tis[key])
    for key in ("rollout_corr/kl", "rollout_corr/log_ppl_abs_diff", "training/rollout_probs_diff_max"):
        assert off[key] == pytest.approx(tis[key], rel=1e-6, abs=1e-9), key
    assert off["training/rollout_probs_diff_max"] > 1e-3 and off["rollout_corr/log_ppl_abs_diff"] > 1e-4, off
    # IS weights only where the correction is on; they are not all 1 (the mismatch is real) ...
    assert "rollout_corr/rollout_is_mean" not in off
    assert tis["rollout_corr/rollout_is_mean"] != 1.0, tis
    # ... and they reach the loss
    a, b = off["actor/pg_loss"], tis["actor/pg_loss"]
    assert abs(a - b) > 1e-5 * max(1.0, abs(a)), (a, b)
