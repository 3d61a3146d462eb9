from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from loopchat.settings import Settings
from serving.engine.base import EngineError, LoRACapacity


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
    config.write_text(
        "port: 8100\nhost: 0.0.0.0\naccess:\n  require_keys: true\n"
        "engine:\n  max_model_len: 1024\n  max_loras: 2\n"
    )
    monkeypatch.setenv("LOOPCHAT_CONFIG_FILE", str(config))
    monkeypatch.setenv("LOOPCHAT_PORT", "8200")
    settings = Settings()
    assert settings.host == "0.0.0.0" and settings.keys_required
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


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "[2001:db8::1]", "chat.example", ""])
@pytest.mark.parametrize("require_keys", [None, False])
def test_development_refuses_a_host_the_network_reaches(host: str, require_keys: bool | None) -> None:
    # Development serves /v1 without keys: on such a host the model would be open to anyone.
    with pytest.raises(ValidationError, match="not a loopback address") as refused:
        Settings(environment="development", host=host, access={"require_keys": require_keys})
    message = str(refused.value)
    assert "LOOPCHAT_ACCESS__REQUIRE_KEYS=true" in message and "LOOPCHAT_ENVIRONMENT=production" in message


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.0.1.1", "::1", "[::1]", "::ffff:127.0.0.1", "localhost", "LocalHost"]
)
def test_development_binds_loopback_without_keys(host: str) -> None:
    settings = Settings(environment="development", host=host)
    assert settings.host == host and not settings.keys_required


def test_development_binds_any_host_once_keys_are_required(monkeypatch) -> None:
    monkeypatch.setenv("LOOPCHAT_HOST", "0.0.0.0")
    with pytest.raises(ValidationError, match="not a loopback address"):
        Settings(environment="development")
    monkeypatch.setenv("LOOPCHAT_ACCESS__REQUIRE_KEYS", "true")
    settings = Settings(environment="development")
    assert settings.host == "0.0.0.0" and settings.keys_required


def test_development_on_a_network_host_refuses_a_placeholder_admin_token() -> None:
    access = {"require_keys": True}
    with pytest.raises(ValidationError, match="admin_token is a placeholder"):
        Settings(environment="development", host="0.0.0.0", access=access, admin_token="admin")
    assert Settings(environment="development", host="127.0.0.1", admin_token="admin").admin_token
    token = "x" * 32
    assert Settings(environment="development", host="0.0.0.0", access=access, admin_token=token).admin_token


@pytest.mark.parametrize("require_keys", [None, True, False])
def test_production_binds_any_host_as_before(require_keys: bool | None) -> None:
    settings = Settings(environment="production", host="0.0.0.0", access={"require_keys": require_keys})
    assert settings.keys_required is (require_keys is not False)


def test_serve_on_a_network_host_in_development_stops_before_starting(monkeypatch, tmp_path: Path) -> None:
    from loopchat.cli import app

    for variable in ("ENVIRONMENT", "HOST", "ACCESS__REQUIRE_KEYS", "CONFIG_FILE"):
        monkeypatch.delenv(f"LOOPCHAT_{variable}", raising=False)
    monkeypatch.setenv("LOOPCHAT_DATA_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--port", "1"])
    assert result.exit_code != 0
    assert isinstance(result.exception, ValueError)
    assert "'0.0.0.0' is not a loopback address" in str(result.exception)
    assert list(tmp_path.iterdir()) == []  # nothing was started or created


@pytest.mark.parametrize("password", ["REPLACE_ME", "changeme", "password", ""])
def test_placeholder_database_password_refused_in_production(password: str) -> None:
    url = f"postgresql+psycopg://loopchat:{password}@postgres:5432/loopchat"
    with pytest.raises(ValidationError, match="database_url has a placeholder password"):
        Settings(environment="production", database_url=url)
    assert Settings(environment="development", database_url=url).database_url == url


@pytest.mark.parametrize(
    "url",
    ["postgresql+psycopg://loopchat:a-real-password@postgres/loopchat", "postgresql+psycopg://loopchat@db/x"],
)
def test_real_or_no_database_password_accepted_in_production(url: str) -> None:
    assert Settings(environment="production", database_url=url).db_url == url


@pytest.mark.parametrize(
    ("native_bf16", "on_gpu", "dtype"),
    [(True, False, "bfloat16"), (False, False, "float32"), (False, True, "bfloat16")],
)
def test_engine_defaults_follow_the_hardware(monkeypatch, tmp_path: Path, native_bf16, on_gpu, dtype) -> None:
    """`dtype: auto` is bfloat16 where the hardware computes it natively and float32 on CPUs that
    would emulate it; `enforce_eager` unset leaves vLLM its compiled default."""
    from serving.engine import vllm_engine

    for name in ("LOOPCHAT_ENGINE__DTYPE", "LOOPCHAT_ENGINE__ENFORCE_EAGER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(vllm_engine, "cpu_has_native_bf16", lambda: native_bf16)
    args = vllm_engine.build_engine_args(Settings(data_dir=tmp_path), on_gpu=on_gpu, lora=None)
    assert (args.dtype, args.enforce_eager) == (dtype, False)
    pinned = Settings(data_dir=tmp_path, engine={"dtype": "float32", "enforce_eager": True})
    args = vllm_engine.build_engine_args(pinned, on_gpu=on_gpu, lora=None)
    assert (args.dtype, args.enforce_eager) == ("float32", True)


@pytest.mark.parametrize("on_gpu", [False, True])
def test_the_engine_environment_keeps_compiled_models_on_cpu(
    monkeypatch, tmp_path: Path, on_gpu: bool
) -> None:
    """On CPU: loopchat's LoRA ops, and torch's inductor cache (beside vLLM's, in the data
    directory unless VLLM_CACHE_ROOT says otherwise) instead of vLLM's AOT cache, which vLLM 0.32
    cannot load there. What the user set is kept."""
    import os

    from serving.engine import cpu_lora, vllm_engine

    monkeypatch.setattr(os, "environ", {"PATH": "/bin"})
    vllm_engine.configure_vllm_environment(Settings(data_dir=tmp_path), on_gpu=on_gpu)
    cpu_only = {
        cpu_lora.ENV: "grouped",
        "VLLM_USE_AOT_COMPILE": "0",
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path.resolve() / "cache" / "vllm" / "inductor"),
    }
    for name, value in cpu_only.items():
        assert os.environ.get(name) == (None if on_gpu else value)
    monkeypatch.setattr(os, "environ", {"VLLM_USE_AOT_COMPILE": "1", "VLLM_CACHE_ROOT": "/cache"})
    vllm_engine.configure_vllm_environment(Settings(data_dir=tmp_path), on_gpu=on_gpu)
    assert os.environ["VLLM_USE_AOT_COMPILE"] == "1"
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") == (None if on_gpu else "/cache/inductor")


@pytest.mark.parametrize(
    ("mode", "on_gpu", "on_demand", "initial"),
    [
        # CPUs: the engine starts without LoRA; GPUs (CUDA graphs, bf16): the configured room.
        ("auto", False, True, None),
        ("auto", True, False, LoRACapacity(4, 64)),
        # On CPU the fixed room keeps a spare slot (vLLM's CPU kernels read the last one for
        # tokens without an adapter).
        ("always", False, False, LoRACapacity(5, 64)),
        ("on_demand", False, True, None),
    ],
)
def test_lora_room_follows_the_mode_and_the_hardware(
    tmp_path: Path, mode, on_gpu, on_demand, initial
) -> None:
    from serving.engine import vllm_engine

    settings = Settings(data_dir=tmp_path, engine={"lora": mode})
    assert vllm_engine.lora_on_demand(settings, on_gpu=on_gpu) is on_demand
    lora = vllm_engine.initial_lora(settings, on_gpu=on_gpu)
    assert lora == initial
    args = vllm_engine.build_engine_args(settings, on_gpu=on_gpu, lora=lora)
    assert args.enable_lora is (lora is not None)
    if lora is not None:
        room = (args.max_loras, args.max_lora_rank, args.max_cpu_loras)
        assert room == (lora.slots, lora.max_rank, lora.slots)
    if on_gpu:
        assert args.gpu_memory_utilization == settings.engine.gpu_memory_utilization


def test_on_demand_lora_is_refused_on_gpus(tmp_path: Path) -> None:
    from serving.engine import vllm_engine

    with pytest.raises(EngineError, match="room for two engines"):
        vllm_engine.lora_on_demand(Settings(data_dir=tmp_path, engine={"lora": "on_demand"}), on_gpu=True)


@pytest.mark.parametrize(
    ("ranks", "capacity"),
    [
        ([4], LoRACapacity(2, 8)),
        ([8, 16], LoRACapacity(3, 16)),
        ([65], LoRACapacity(2, 128)),
        ([], LoRACapacity(2, 1)),
    ],
)
def test_lora_capacity_fits_the_adapters_with_a_spare_slot(ranks, capacity) -> None:
    assert LoRACapacity.fitting(ranks, spare_slot=True) == capacity
    assert LoRACapacity.fitting(ranks, spare_slot=False).slots == capacity.slots - 1
