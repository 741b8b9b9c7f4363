"""The built-in models' byte-level BPE tokenizer: trained on our corpus, saved in two flavours.

Ids 0–3 are ``<s> </s> <pad> <unk>``; the InternLM2/Llama flavour prepends ``<s>`` itself, the RWKV-7 flavour
leaves that to the caller (as RWKV's tokenizer does).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from .._util.atomic import atomic_write
from .._util.paths import data_dir
from ..errors import ParityKitError
from .corpus import BOS, BOS_ID, EOS, PAD, SPECIAL_TOKENS, UNK

DEFAULT_VOCAB_SIZE = 1536


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE):
    """Train a byte-level BPE (``tokenizers.Tokenizer``) with ``<s> </s> <pad> <unk>`` as ids 0–3.

    >>> from parity_kit.builtins.corpus import training_documents
    >>> tok = train_tokenizer(training_documents(200), vocab_size=300)
    >>> tok.token_to_id("<s>"), tok.token_to_id("<unk>")
    (0, 3)
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok


def save_tokenizer(tokenizer, folder: str | Path, *, add_bos: bool) -> Path:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` loadable by ``AutoTokenizer.from_pretrained``.

    ``add_bos=True`` is the InternLM2/Llama flavour (the tokenizer prepends ``<s>`` itself);
    ``add_bos=False`` is the RWKV-7 flavour (the caller prepends token 0 when wanted).

    >>> import tempfile
    >>> from parity_kit.builtins.corpus import training_documents
    >>> tok = train_tokenizer(training_documents(200), vocab_size=300)
    >>> save_tokenizer(tok, tempfile.mkdtemp(), add_bos=True).name
    'tokenizer.json'
    """
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_str(tokenizer.to_str())  # a copy: the flavours must not leak into each other
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
        )
    else:
        tok.post_processor = None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "tokenizer.json"
    with atomic_write(target) as f:
        f.write(tok.to_str(pretty=True))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK,
        "add_bos_token": add_bos, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1024,
    }
    with atomic_write(folder / "tokenizer_config.json") as f:
        f.write(json.dumps(config, indent=2) + "\n")
    return target


def load_base_tokenizer(folder: str | Path | None = None):
    """The committed base tokenizer (``parity_kit/data/tokenizer/tokenizer.json``) as a ``tokenizers.Tokenizer``.

    >>> load_base_tokenizer().token_to_id("<s>")
    0
    """
    from tokenizers import Tokenizer

    path = Path(folder) if folder is not None else data_dir() / "tokenizer"
    file = path / "tokenizer.json"
    if not file.is_file():
        raise ParityKitError(f"no tokenizer at {file}; build it with parity_kit.builtins.data.build_data()")
    return Tokenizer.from_file(str(file))
