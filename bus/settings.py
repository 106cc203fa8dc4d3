"""Loading node settings: defaults < TOML file < environment (SLIPSTREAM_*) < dotted CLI overrides.

Every node's config is a `NodeSettings` subclass whose fields are sections (pydantic models that forbid unknown
keys, so a typo names itself). One TOML file may hold the sections of several nodes: a node ignores top-level
sections it does not own, but a CLI override must name a section the node has.

    settings = load_settings(LearnerSettings, "configs/demo.toml", ["--learner.lr", "1e-6", "--bus.url=redis://h:6379"])
"""

from __future__ import annotations

import contextvars
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"  # a setting that names an environment variable
API_KEY_ENV = "SLIPSTREAM_ENGINE_API_KEY"  # the engines' key, on the rollout nodes and the learner alike

_toml_data: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("_toml_data", default=None)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the field and the rule."""


def read_secret(file: str | None, env: str | None, field: str, what: str = "secret") -> str | None:
    """A secret (password, token, API key): the first line of `file`, else the variable named `env`, else None.

    Surrounding whitespace is ignored. Secrets never come from a config value or the command line, so that none
    reaches `ps`, shell history or a config repository. `field` names the setting that named `file` and `what` the
    secret, in the ConfigError raised for a file that cannot be read or holds nothing.
    """
    if file is None:
        return (os.environ.get(env, "").strip() or None) if env else None
    try:
        lines = Path(file).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not text"
        raise ConfigError(f"{field}: cannot read a {what} from {file}: {reason}") from exc
    secret = lines[0].strip() if lines else ""
    if not secret:
        raise ConfigError(f"{field}: {file} is empty (the {what} is its first line)")
    return secret


class ApiKeySource(Section):
    """Where a bearer API key comes from: a file (first) or an environment variable; neither set means no key."""

    api_key_file: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description="file whose first line is the API key (surrounding whitespace ignored)",
    )
    api_key_env: str | None = Field(
        API_KEY_ENV,
        pattern=ENV_NAME_PATTERN,
        max_length=128,
        description="environment variable holding the API key, read when api_key_file is unset; unset or empty "
        "variable: no key",
    )

    def api_key(self) -> str | None:
        """The key, or None when none is configured. Raises ConfigError for a missing or empty key file."""
        return read_secret(self.api_key_file, self.api_key_env, "api_key_file", "key")


class _TomlSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return (_toml_data.get() or {}).get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in (_toml_data.get() or {}).items() if k in self.settings_cls.model_fields}


class NodeSettings(BaseSettings):
    """Base of a node's settings. Environment: SLIPSTREAM_<SECTION>__<FIELD>, e.g. SLIPSTREAM_BUS__URL."""

    model_config = SettingsConfigDict(env_prefix="SLIPSTREAM_", env_nested_delimiter="__", extra="ignore")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _TomlSource(settings_cls)


S = TypeVar("S", bound=NodeSettings)


def parse_value(text: str) -> Any:
    """A CLI value: JSON (numbers, true/false, lists, objects), else a TOML literal, else the plain string."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`["--a.b", "1", "--c.d=x"]` -> `{"a": {"b": 1}, "c": {"d": "x"}}`; a flag with no value means true."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise ConfigError(f"override {arg!r}: expected --section.field VALUE or --section.field=VALUE")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            else:
                value = "true"
        i += 1
        node = out
        parts = key.replace("-", "_").split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override --{key}: {part!r} is set both as a value and as a section")
        node[parts[-1]] = parse_value(value)
    return out


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in top.items():
        merged[k] = deep_merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def read_toml(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path}: not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: invalid TOML: {exc}") from exc


def load_settings(cls: type[S], config: str | Path | None = None, overrides: list[str] | None = None) -> S:
    """Build `cls` from defaults, the TOML file, SLIPSTREAM_* environment and CLI overrides (highest wins)."""
    cli = parse_overrides(overrides or [])
    unknown = sorted(set(cli) - set(cls.model_fields))
    if unknown:
        raise ConfigError(f"override section(s) {unknown}: not a section of {cls.__name__} {sorted(cls.model_fields)}")
    toml = read_toml(config)
    # Sections given both in TOML and on the CLI are merged here so a CLI override replaces one field, not a section.
    merged_cli = {k: deep_merge(toml[k], v) if isinstance(toml.get(k), dict) else v for k, v in cli.items()}
    token = _toml_data.set(toml)
    try:
        return cls(**merged_cli)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, config)) from exc
    finally:
        _toml_data.reset(token)


def format_validation_error(exc: ValidationError, source: str | Path | None) -> str:
    where = f" (from {source})" if source else ""
    lines = [f"invalid settings{where}:"]
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"])
        lines.append(f"  {field}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


class RunConfig(Section):
    """What names a run and where its files go; shared by every node of the run."""

    name: str = Field("slipstream", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$", description="run name")
    output_dir: str = Field("runs/slipstream", min_length=1, description="checkpoints, exports and logs go here")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="base random seed; each node and rank derives its own")


class HubSource(Section):
    """How `from_pretrained` may resolve a model named by a path: a local folder, or a Hugging Face Hub id."""

    local_files_only: bool = Field(
        False, description="never reach the Hugging Face Hub: a Hub id must already be in the local cache (HF_HOME)"
    )
    trust_remote_code: bool = Field(
        False, description="run a model's own Python code (a Hub repository's modeling files): only for ones you trust"
    )

    def pretrained_kwargs(self) -> dict[str, bool]:
        """The keyword arguments every `from_pretrained` of this model takes."""
        return {"local_files_only": self.local_files_only, "trust_remote_code": self.trust_remote_code}


def load_pretrained(loader: Any, path: str, source: HubSource, field: str = "model.path", **kwargs: Any) -> Any:
    """`loader.from_pretrained(path, ...)` (an Auto class of transformers), with a ConfigError naming `field`, the
    path and both `source` settings when the model cannot be found or loaded that way."""
    try:
        return loader.from_pretrained(path, **source.pretrained_kwargs(), **kwargs)
    except (OSError, ValueError) as exc:
        where = "a local folder" if Path(path).exists() else "no local folder, so a Hub id"
        raise ConfigError(
            f"{field}: cannot load {path!r} ({where}; model.local_files_only={source.local_files_only}, "
            f"model.trust_remote_code={source.trust_remote_code}): {exc}"
        ) from exc


LORA_MODULE_PATTERN = r"^[A-Za-z0-9_.]+$"  # a module name (or name suffix) of the model, e.g. q_proj


class LoraConfig(Section):
    """`[model.lora]`: train low-rank adapters (PEFT LoRA) on the policy's linear layers instead of all its weights.

    The learner freezes the base weights and trains `rank`-wide A/B pairs per targeted layer; the engines are sent the
    merged weights (W + alpha/rank * B @ A) under the base model's names, so they need no LoRA support."""

    rank: int = Field(16, ge=1, le=1024, description="rank r of each adapter (the A/B matrices' inner width)")
    alpha: float = Field(32.0, gt=0, le=65536, description="LoRA alpha: the adapter's update is scaled by alpha / rank")
    dropout: float = Field(
        0.0, ge=0, lt=1, description="dropout on the adapters' input in the learner's forwards; 0 keeps the learner's "
        "logprobs those of the policy the rollouts sampled (dropout > 0 perturbs them)"
    )  # fmt: skip
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear",
        description="the linear layers that get adapters: 'all-linear' (every linear layer but the output head) or "
        "module names / name suffixes (e.g. ['q_proj', 'v_proj'])",
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        max_length=8,
        description="modules trained in full beside the adapters (PEFT's modules_to_save), by name or name suffix, "
        "e.g. ['embed_tokens']: a tied output head trains with its embedding. Each must match a module",
    )
    export_merged: bool = Field(
        False, description="the HF export also writes the merged full model (W + B @ A) under merged/ in the folder"
    )

    @field_validator("target_modules", "modules_to_save")
    @classmethod
    def _module_names(cls, value: str | list[str], info: ValidationInfo) -> str | list[str]:
        if isinstance(value, list):
            if not value and info.field_name == "target_modules":
                raise ValueError("must name at least one module (or be 'all-linear')")
            bad = [name for name in value if not re.fullmatch(LORA_MODULE_PATTERN, name)]
            if bad:
                raise ValueError(f"{bad} are not module names (letters, digits, '_' and '.')")
        return value


class ModelConfig(HubSource):
    """The policy model: a local Hugging Face causal-LM folder (config, safetensors, tokenizer) or a Hub id."""

    path: str = Field(
        "runs/demo/model",
        min_length=1,
        description="local HF checkpoint folder, or a Hugging Face Hub id (e.g. Qwen/Qwen2.5-0.5B-Instruct) on hosts "
        "that reach the Hub (or have it cached: local_files_only)",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="parameter dtype for generation; the learner keeps float32 master weights"
    )
    lora: LoraConfig | None = Field(
        None, description="[model.lora]: train LoRA adapters only (absent: every weight of the policy trains)"
    )
