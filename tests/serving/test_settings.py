from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from serving.settings import Settings


def test_env_prefix_and_nested_engine_options(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LOOPCHAT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("LOOPCHAT_PORT", "9001")
    monkeypatch.setenv("LOOPCHAT_ENGINE__KV_CACHE_SPACE_GIB", "2")
    monkeypatch.setenv("LOOPCHAT_ADAPTERS", '{"v1": "/adapters/v1"}')
    settings = Settings()
    assert settings.port == 9001
    assert settings.engine.kv_cache_space_gib == 2
    assert settings.data_dir == tmp_path.resolve()
    assert settings.model_path == tmp_path.resolve() / "models" / "SmolLM2-135M-Instruct"
    assert settings.model_name == "SmolLM2-135M-Instruct"
    assert settings.adapters == {"v1": Path("/adapters/v1")}


def test_yaml_file_with_env_override(monkeypatch, tmp_path: Path) -> None:
    config = tmp_path / "loopchat.yaml"
    config.write_text("port: 8100\nhost: 0.0.0.0\nengine:\n  max_model_len: 1024\n  max_loras: 2\n")
    monkeypatch.setenv("LOOPCHAT_CONFIG_FILE", str(config))
    monkeypatch.setenv("LOOPCHAT_PORT", "8200")
    settings = Settings()
    assert settings.host == "0.0.0.0"
    assert settings.port == 8200
    assert settings.engine.max_model_len == 1024 and settings.engine.max_loras == 2


def test_missing_config_file_is_an_error(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LOOPCHAT_CONFIG_FILE", str(tmp_path / "absent.yaml"))
    with pytest.raises(ValueError, match="is not a file"):
        Settings()


def test_unknown_setting_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        Settings(data_dir=tmp_path, prot=1)


@pytest.mark.parametrize("token", ["changeme", "short", "admin"])
def test_placeholder_admin_token_refused_in_production(token: str) -> None:
    with pytest.raises(ValidationError, match="admin_token"):
        Settings(environment="production", admin_token=token)


def test_real_admin_token_accepted_in_production() -> None:
    assert Settings(environment="production", admin_token="x" * 32).admin_token is not None


def test_cpu_kv_cache_space_takes_whole_gib(monkeypatch, tmp_path: Path) -> None:
    # vLLM reads VLLM_CPU_KVCACHE_SPACE as an integer: refuse a fraction here, not in the engine.
    monkeypatch.setenv("LOOPCHAT_ENGINE__KV_CACHE_SPACE_GIB", "0.5")
    with pytest.raises(ValidationError, match="kv_cache_space_gib"):
        Settings(data_dir=tmp_path)
