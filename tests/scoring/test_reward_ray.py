"""compute_score inside an async Ray actor, as verl's RewardLoopWorker runs it (event-loop thread and executor)."""

from __future__ import annotations

import asyncio
import threading

import pytest

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow

TEXT = "<think>x</think> The answer is \\boxed{\\dfrac{1}{2}}."


@ray.remote
class Scorer:
    async def in_loop(self, text: str, gold: str):
        from eksft_pipeline.scoring.reward import compute_score

        return compute_score("m", text, gold), threading.current_thread() is threading.main_thread()

    async def in_executor(self, text: str, gold: str):
        from eksft_pipeline.scoring.reward import compute_score

        loop = asyncio.get_running_loop()
        r = await loop.run_in_executor(None, lambda: compute_score("m", text, gold))
        return r

    async def many(self, n: int):
        from eksft_pipeline.scoring.reward import compute_score, reward_stats

        loop = asyncio.get_running_loop()
        golds = ["0.5" if i % 2 else "0.25" for i in range(n)]
        futs = [loop.run_in_executor(None, lambda g=g: compute_score("m", TEXT, g)) for g in golds]
        res = await asyncio.gather(*futs)
        return [r["acc"] for r in res], reward_stats()["by_reason"]


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_compute_score_in_an_async_ray_actor(ray_local):
    actor = Scorer.remote()
    r, on_main = ray.get(actor.in_loop.remote(TEXT, "0.5"), timeout=300)
    assert (r["acc"], r["reason"]) == (1.0, "ok")
    assert on_main is False  # Ray runs async methods on an "AsyncIO Thread": signal.alarm would raise here
    r = ray.get(actor.in_executor.remote(TEXT, "0.25"), timeout=300)
    assert (r["acc"], r["reason"]) == (0.0, "ok")
    accs, reasons = ray.get(actor.many.remote(16), timeout=300)
    assert accs == [0.0 if i % 2 == 0 else 1.0 for i in range(16)]
    assert reasons["error"] == 0 and reasons["timeout"] == 0
