"""AdapterSet with merging: which weights the engine holds and what each version is served as."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from serving.adapters import AdapterConflictError, AdapterSet, VersionGate
from serving.weights import WeightStore
from tests.utils.adapters import make_lora_adapter
from tests.utils.fake_engine import FakeEngine


@pytest.fixture(scope="module")
def trained(base_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("versions")
    seeds = {"a": 1, "b": 2}
    return {
        name: make_lora_adapter(base_model_path, root / name, rank=4, seed=seed)
        for name, seed in seeds.items()
    }


def _served(engine: FakeEngine) -> dict[str, Path]:
    return {spec.name: spec.path for spec in engine.adapters.values()}


def test_promotion_merges_the_version_and_serves_the_others_as_deltas(
    base_model_path: Path, trained: dict[str, Path], tmp_path: Path
) -> None:
    async def scenario() -> None:
        engine = FakeEngine(model_name="base")
        store = WeightStore(tmp_path / "weights", base_model_path)
        adapters = AdapterSet(engine, weights=store)
        for name, path in trained.items():
            await adapters.load(name, path)
        # Nothing merged yet: each version is its own adapter over the base weights.
        assert _served(engine) == trained and adapters.live.name == "base"

        await adapters.set_active("a")
        assert adapters.live.name == "a" and engine.pauses == 1
        merged = engine.weights[-1]
        assert (merged / "config.json").is_file() and merged.parent == tmp_path / "weights" / "merged"
        served = _served(engine)
        assert set(served) == {"base", "b"}  # the live version needs no LoRA
        assert all(path.is_relative_to(tmp_path / "weights" / "deltas") for path in served.values())
        assert json.loads((served["b"] / "adapter_config.json").read_text())["r"] == 8  # 4 + 4
        with pytest.raises(AdapterConflictError):
            await adapters.unload("a")

        # Activating the same version again changes nothing; going back to the base reloads it.
        await adapters.set_active("a")
        assert engine.pauses == 1
        await adapters.set_active(None)
        assert engine.weights[-1] == base_model_path and _served(engine) == trained
        assert not list((tmp_path / "weights" / "merged").iterdir())  # pruned
        await adapters.unload("a")

    asyncio.run(scenario())


def test_a_version_that_cannot_be_merged_stays_served_as_its_adapter(
    base_model_path: Path, trained: dict[str, Path], tmp_path: Path
) -> None:
    async def scenario() -> None:
        engine = FakeEngine(model_name="base")
        adapters = AdapterSet(engine, weights=WeightStore(tmp_path / "weights", base_model_path))
        dora = tmp_path / "dora"
        dora.mkdir()
        config = json.loads((trained["a"] / "adapter_config.json").read_text())
        (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
        (dora / "adapter_model.safetensors").write_bytes(
            (trained["a"] / "adapter_model.safetensors").read_bytes()
        )
        await adapters.load("dora", dora)
        await adapters.set_active("dora")
        assert adapters.active.name == "dora" and adapters.live.name == "base"
        assert engine.weights == [] and _served(engine) == {"dora": dora}
        await adapters.set_active("dora")  # not tried again at every sync
        assert engine.pauses == 0

    asyncio.run(scenario())


def test_a_switch_waits_for_answers_in_flight_and_holds_new_ones() -> None:
    async def scenario() -> list[str]:
        gate, events = VersionGate(), []
        first = await gate.enter()

        async def switch() -> None:
            async with gate.closed():
                events.append("switch")

        async def late_request() -> None:
            taken = await gate.enter()
            events.append("late request")
            gate.leave(taken)

        switching = asyncio.create_task(switch())
        await asyncio.sleep(0.05)
        late = asyncio.create_task(late_request())
        await asyncio.sleep(0.05)
        events.append("first answer ends")
        gate.leave(first)
        await asyncio.gather(switching, late)
        return events

    assert asyncio.run(scenario()) == ["first answer ends", "switch", "late request"]


def test_deltas_above_the_engine_rank_keep_the_version_an_adapter(
    base_model_path: Path, trained: dict[str, Path], tmp_path: Path
) -> None:
    """Two rank-4 versions make rank-8 deltas: with max_lora_rank 6 nothing is merged."""

    async def scenario() -> None:
        engine = FakeEngine(model_name="base")
        adapters = AdapterSet(engine, weights=WeightStore(tmp_path / "weights", base_model_path, max_rank=6))
        for name, path in trained.items():
            await adapters.load(name, path)
        await adapters.set_active("a")
        assert (adapters.active.name, adapters.live.name) == ("a", "base")
        assert engine.pauses == 0 and _served(engine) == trained

    asyncio.run(scenario())
