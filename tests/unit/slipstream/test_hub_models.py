"""Models named by a Hugging Face Hub id: the id and `model.local_files_only` / `model.trust_remote_code` reach every
`from_pretrained`, a model that cannot be found is an error naming the path and both settings, and `slipstream up`
builds the demo model only where asked (no network here: ids are checked passed through, not fetched)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from bus.settings import ConfigError, ModelConfig, load_pretrained
from rollout_node.config import RolloutSettings
from slipstream.launcher import Cluster, UpSettings

HUB_ID = "Qwen/Qwen2.5-0.5B-Instruct"


class Recording:
    """Stands in for a transformers Auto class: records what `from_pretrained` was given."""

    calls: list[tuple[str, dict[str, Any]]] = []

    @classmethod
    def from_pretrained(cls, path: str, **kwargs: Any) -> str:
        cls.calls.append((path, kwargs))
        return "loaded"


def test_a_hub_id_and_both_settings_reach_from_pretrained() -> None:
    Recording.calls.clear()
    model = ModelConfig(path=HUB_ID, trust_remote_code=True)
    assert load_pretrained(Recording, model.path, model, dtype="bfloat16") == "loaded"
    assert Recording.calls == [(HUB_ID, {"local_files_only": False, "trust_remote_code": True, "dtype": "bfloat16"})]


def test_a_model_that_cannot_be_found_is_an_error_naming_the_path_and_both_settings() -> None:
    from transformers import AutoConfig

    model = ModelConfig(path="nobody/no-such-model", local_files_only=True)  # no network: the cache only
    with pytest.raises(ConfigError) as caught:
        load_pretrained(AutoConfig, model.path, model)
    message = str(caught.value)
    assert message.startswith("model.path: cannot load 'nobody/no-such-model' (no local folder, so a Hub id;")
    assert "model.local_files_only=True, model.trust_remote_code=False" in message


def test_the_rollout_engine_takes_the_models_settings() -> None:
    settings = RolloutSettings(model={"path": HUB_ID, "local_files_only": True, "trust_remote_code": True})
    engine = settings.torch_engine_config()
    assert (engine.model_path, engine.local_files_only, engine.trust_remote_code) == (HUB_ID, True, True)


def cluster(tmp_path: Path, path: str, build: bool) -> tuple[Cluster, io.StringIO]:
    settings = UpSettings(model={"path": path}, up={"build_demo_model": build}, run={"output_dir": str(tmp_path)})
    out = io.StringIO()
    return Cluster(settings, "run.toml", [], out, progress=None), out  # type: ignore[arg-type]


def test_up_builds_the_demo_model_only_where_asked_and_leaves_a_hub_id_to_the_nodes(tmp_path: Path) -> None:
    hub, out = cluster(tmp_path, HUB_ID, build=False)
    hub._prepare_model()
    assert "loaded as a Hugging Face Hub id" in out.getvalue() and not Path(HUB_ID).exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="a folder without config.json"):
        cluster(tmp_path, str(tmp_path / "empty"), build=False)[0]._prepare_model()
    demo, _ = cluster(tmp_path, str(tmp_path / "demo"), build=True)
    demo._prepare_model()
    assert (tmp_path / "demo" / "config.json").exists()
