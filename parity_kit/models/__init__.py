"""Model registry and loader: built-in tiny models, local folders and hub ids, all through one ``load``.

>>> from parity_kit import models
>>> sorted(models.list_models())
['tiny-internlm2', 'tiny-internlm2-llama', 'tiny-rwkv7']
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..dtypes import DtypeLike, check_dtype_on_device
from ..errors import ParityKitError
from .._util.paths import data_dir
from .from_config import FROM_CONFIG_LLAMA, load_from_config

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BUILTINS: dict[str, str] = {
    "tiny-internlm2": "InternLM2 architecture (fused wqkv, GQA, eager attention, dynamic NTK rope), "
                      "trained by `parity-kit train tiny-internlm2`",
    "tiny-internlm2-llama": "tiny-internlm2 converted to the Llama layout by convert_internlm2_to_llama; "
                            "loads with plain transformers.LlamaForCausalLM",
    "tiny-rwkv7": "RWKV-7 with flash-linear-attention parameter names and config, trained in chunk mode",
}

# modules whose import registers our architectures with AutoConfig / AutoModelForCausalLM
_ARCHITECTURE_MODULES = ("parity_kit.models.internlm2", "parity_kit.models.rwkv7")
# "org/name" as the hub accepts it (letters, digits, '-', '_', '.'; no '..' or leading/trailing separators)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def list_models() -> list[str]:
    """Names of the built-in models, in registry order.

    >>> list_models()[0]
    'tiny-internlm2'
    """
    return list(BUILTINS)


def builtin_path(name: str) -> Path:
    """Folder of a built-in model: ``parity_kit/data/models/<name>/`` (see :func:`parity_kit._util.paths.data_dir`).

    >>> builtin_path("tiny-rwkv7").name
    'tiny-rwkv7'
    """
    if name not in BUILTINS:
        raise ParityKitError(_unknown_name_message(name))
    return data_dir() / "models" / name


def register_architectures() -> None:
    """Import our model modules so that AutoConfig / AutoModelForCausalLM know "internlm2" and "rwkv7".

    >>> register_architectures()
    """
    for module in _ARCHITECTURE_MODULES:
        importlib.import_module(module)


def _unknown_name_message(name: str) -> str:
    close = difflib.get_close_matches(name, list(BUILTINS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return (
        f"{name!r} is neither a built-in model, nor an existing folder, nor a hub id of the form 'org/name'.{hint} "
        f"Built-in models: {', '.join(BUILTINS)}. For your own checkpoint pass the path of its folder "
        "(the one with config.json)."
    )


def _offline() -> bool:
    return any(
        os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _resolve(name_or_path: str | os.PathLike[str]) -> tuple[str, str]:
    """(kind, location) with kind in {"builtin", "folder", "hub"}."""
    text = os.fspath(name_or_path)
    if text in BUILTINS:
        folder = builtin_path(text)
        if not (folder / "config.json").is_file():
            raise ParityKitError(
                f"built-in model {text!r} has no files in {folder}; create them with `parity-kit train {text}` "
                "(or set PARITY_KIT_DATA to a data folder that holds them)"
            )
        return "builtin", str(folder)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ParityKitError(f"{text!r} is a file; pass the model's folder (the one with config.json) instead")
        if not (path / "config.json").is_file():
            raise ParityKitError(
                f"folder {text!r} has no config.json; pass the folder that holds config.json and the weights"
            )
        return "folder", str(path)
    looks_like_path = text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1
    if looks_like_path:
        raise ParityKitError(f"folder {text!r} does not exist; check the path (built-in models: {', '.join(BUILTINS)})")
    if _HUB_ID.match(text) and ".." not in text:
        return "hub", text
    raise ParityKitError(_unknown_name_message(text))


def locate(name_or_path: str | os.PathLike[str]) -> tuple[str, str]:
    """Where a model would be loaded from, ``(kind, location)`` with kind "builtin", "folder" or "hub", without
    loading it; ParityKitError (naming the built-ins) for a name that is none of these.

    >>> locate("tiny-rwkv7")[0]
    'builtin'
    """
    return _resolve(name_or_path)


def _hub_unavailable(name: str, reason: str) -> ParityKitError:
    return ParityKitError(
        f"cannot get {name!r} from the model hub ({reason}). Download it elsewhere "
        f"(e.g. `hf download {name} --local-dir {name.split('/')[-1]}`), copy the folder to this machine "
        f"and pass the folder path instead: parity_kit.models.load('/path/to/{name.split('/')[-1]}')"
    )


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "*.tiktoken", "*vocab*.txt",
                    "spiece.model", "sentencepiece*.model")


def tokenizer_files(folder: str | os.PathLike[str]) -> list[str]:
    """The files in a checkpoint folder a tokenizer can be built from (``tokenizer.json``, ``tokenizer.model``,
    ``vocab.json``, ...); ``tokenizer_config.json`` alone is not enough.

    >>> tokenizer_files(builtin_path("tiny-internlm2-llama"))
    ['tokenizer.json']
    """
    path = Path(folder)
    return sorted({f.name for pattern in _TOKENIZER_FILES for f in path.glob(pattern) if f.is_file()})


def _no_tokenizer_message(location: str) -> str:
    return (f"{location!r} has no tokenizer files (none of {', '.join(_TOKENIZER_FILES)}), so the prompt cannot be "
            "encoded; copy the tokenizer files of the checkpoint it came from into the folder "
            "(tokenizer.save_pretrained(folder) writes them)")


def load(
    name_or_path: str | os.PathLike[str],
    dtype: DtypeLike = "fp32",
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    **config_overrides: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode, in ``dtype`` on ``device``.

    ``name_or_path`` is a built-in name (:data:`BUILTINS`), a local folder (plain transformers models,
    our InternLM2 / RWKV-7 architectures, FLA RWKV-7 folders, InternLM2 remote-code folders with
    ``trust_remote_code=True``), a hub id ``org/name`` (needs network; the local cache is used offline) or
    ``"tiny-llama-from-config"`` (the quickstart's default: a small Llama with seeded random weights and the
    project's tokenizer, no files; ``seed=`` and ``layers=`` choose it).
    ``attn_implementation`` ("eager", "sdpa", ...) is passed to ``from_pretrained``; ``config_overrides``
    set config fields, e.g. ``wkv_mode="recurrent"`` for RWKV-7.

    >>> model, tok = load("tiny-internlm2-llama", dtype="fp32")
    >>> model.training, next(model.parameters()).dtype
    (False, torch.float32)
    """
    if str(name_or_path) == FROM_CONFIG_LLAMA:
        return load_from_config(dtype, device, attn_implementation, **config_overrides)
    torch_dtype = check_dtype_on_device(dtype, device)
    kind, location = _resolve(name_or_path)
    register_architectures()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code, **config_overrides}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if kind == "folder" and not tokenizer_files(location):
        raise ParityKitError(_no_tokenizer_message(location))
    offline = kind == "hub" and _offline()
    if offline:
        kwargs["local_files_only"] = True  # the cache may still hold it
    try:
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(
            location, trust_remote_code=trust_remote_code, **({"local_files_only": True} if offline else {})
        )
    except (OSError, ConnectionError) as e:
        if kind == "hub":
            reason = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else f"{type(e).__name__}: {e}"
            raise _hub_unavailable(location, reason) from None
        raise ParityKitError(
            f"could not load {location!r} ({type(e).__name__}: {e}); the folder needs config.json, the weights "
            "(model.safetensors or pytorch_model.bin) and the tokenizer files"
        ) from None
    except ValueError as e:
        message = str(e)
        if "trust_remote_code" in message:
            raise ParityKitError(
                f"{location!r} needs its own modelling code: pass trust_remote_code=True if you trust it ({message})"
            ) from None
        if attn_implementation is not None and "attn" in message.lower():
            raise ParityKitError(
                f"attn_implementation={attn_implementation!r} is not supported by {location!r} ({message}); "
                "use 'eager' or 'sdpa', or leave it None for the model's default"
            ) from None
        raise ParityKitError(f"could not load {location!r}: {message}") from None
    except Exception as e:  # a bad field type, weights of other shapes, a damaged safetensors file, ...
        raise _load_failure(location, e) from None
    model = model.to(device).eval()
    return model, tokenizer


def _load_failure(location: str, e: Exception) -> ParityKitError:
    """What went wrong loading ``location``, from the exception transformers, safetensors or the config raised."""
    message = " ".join(str(e).split())[:400]
    kind = type(e).__name__
    if "safetensor" in kind.lower() or "safetensor" in type(e).__module__.lower():
        return ParityKitError(f"could not load {location!r}: a weights file (model.safetensors) is damaged or truncated "
                              f"({kind}: {message}); restore or re-download the weights")
    if "mismatch" in message.lower():
        return ParityKitError(f"could not load {location!r}: the weights' shapes do not match config.json ({message}); "
                              "fix config.json (hidden_size, heads, vocab_size, ...) or use the weights it describes")
    return ParityKitError(f"could not load {location!r} ({kind}: {message}); check config.json (field names, types "
                          "and values) and the weights files")


def shipped_attention(name_or_path: str, *, trust_remote_code: bool = False) -> str:
    """The attention implementation a model runs when none is requested: its config's
    ``attn_implementation`` (InternLM2: "eager"), else transformers' default, "sdpa".

    >>> shipped_attention("tiny-internlm2"), shipped_attention("tiny-internlm2-llama")
    ('eager', 'sdpa')
    """
    from transformers import AutoConfig

    _, location = _resolve(name_or_path)
    register_architectures()
    config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    return getattr(config, "attn_implementation", None) or "sdpa"
